"""The body of `POST /v1/responses`: what this server implements of it, checked field by field, and
its translation into the internal `GenerateRequest`. A field it does not implement (built-in tools,
reasoning effort, conversations, prompt templates, ...) is a 400 naming it, never silently ignored;
unknown fields are refused as on every OpenAI route."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.bounds import PositiveCount, Priority, real
from app.api.errors import invalid
from app.api.protocol import GenerateRequest, ToolSpec
from app.api.wire.openai_extras import FunctionName, check
from app.engine.sampling_params import GuidedDecoding, SamplingParams

LOGPROBS_INCLUDE = "message.output_text.logprobs"
# fields of OpenAI's request this server does not implement: a 400 when set to anything but null
NOT_IMPLEMENTED = ("conversation", "prompt", "context_management", "moderation", "image", "access_programs",
                   "background_options", "prompt_cache_options", "prompt_cache_retention")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FunctionTool(_Strict):
    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    def to_internal(self, index: int) -> ToolSpec:
        parameters = self.parameters or {"type": "object", "properties": {}}
        check(parameters, f"tools.{index}.parameters")
        return ToolSpec(self.name, self.description, parameters)

    def wire(self) -> dict:
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": True if self.strict is None else self.strict}


class NamedFunction(_Strict):
    type: Literal["function"]
    name: str


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: FunctionName | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None

    def guided(self) -> GuidedDecoding | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return GuidedDecoding(None)
        if self.name is None or self.schema_ is None:
            raise invalid("text.format of type json_schema needs `name` and `schema`", "text.format")
        check(self.schema_, "text.format.schema")
        return GuidedDecoding(self.schema_, param="text.format.schema")

    def wire(self) -> dict:
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "name": self.name, "description": self.description, "schema": self.schema_,
                "strict": self.strict}


class TextConfig(_Strict):
    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))
    verbosity: Literal["medium"] | None = None  # the only one a model without verbosity control has


class Reasoning(_Strict):
    # no model here reasons on request: any of these set is refused (ResponsesRequest.check)
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class StreamOptions(_Strict):
    include_obfuscation: bool = True


class ResponsesRequest(_Strict):
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: PositiveCount | None = None
    temperature: real(ge=0, le=2) | None = None
    top_p: real(gt=0, le=1) | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    include: list[str] | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = None
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: PositiveCount | None = None  # bounds built-in tool calls: there are none here
    store: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    background: bool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=64)
    reasoning: Reasoning | None = None
    truncation: Literal["disabled"] | None = None  # "auto" (dropping the oldest items) is not implemented
    service_tier: Literal["auto", "default"] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # a routing hint: prefix caching here needs none
    priority: Priority = 0  # vLLM's scheduling field, as on chat
    # OpenAI's fields this server does not implement: typed loosely so the 400 can name them
    conversation: Any = None
    prompt: Any = None
    context_management: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None
    background_options: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None

    def check(self) -> None:
        """400s for what the schema alone cannot say."""
        for name in NOT_IMPLEMENTED:
            if getattr(self, name) is not None:
                raise invalid(f"`{name}` is not supported by this server", name, "unsupported_parameter")
        for name, value in (self.reasoning or Reasoning()).model_dump().items():
            if value is not None:
                raise invalid(f"reasoning.{name}: `{self.model}` does not reason on request", f"reasoning.{name}",
                              "unsupported_parameter")
        if self.metadata is not None and len(self.metadata) > 16:
            raise invalid("metadata holds at most 16 keys", "metadata")
        for item in self.include or []:
            if item != LOGPROBS_INCLUDE:
                raise invalid(f"include: {item!r} is not supported by this server (only {LOGPROBS_INCLUDE!r})",
                              "include", "unsupported_parameter")
        if self.background and self.store is False:
            raise invalid("background responses must be stored: store cannot be false", "store")
        if self.background and self.stream:
            raise invalid("streaming a background response is not supported by this server", "stream",
                          "unsupported_parameter")

    @property
    def stored(self) -> bool:
        return self.store is not False  # as OpenAI: stored unless asked not to be

    def function_tools(self) -> list[FunctionTool]:
        tools = []
        for i, tool in enumerate(self.tools or []):
            if tool.get("type") != "function":
                raise invalid(f"tools.{i}: tools of type {tool.get('type')!r} are not supported by this server; "
                              "only function tools are", f"tools.{i}.type", "unsupported_parameter")
            try:
                tools.append(FunctionTool.model_validate(tool))
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in (f"tools.{i}", *err["loc"]))
                raise invalid(f"Invalid value for '{where}': {err['msg']}", where) from None
        return tools

    def named_choice(self) -> NamedFunction | None:
        if not isinstance(self.tool_choice, dict):
            return None
        if self.tool_choice.get("type") != "function":
            raise invalid(f"tool_choice of type {self.tool_choice.get('type')!r} is not supported by this server",
                          "tool_choice", "unsupported_parameter")
        try:
            return NamedFunction.model_validate(self.tool_choice)
        except ValidationError as e:
            raise invalid(f"Invalid value for 'tool_choice': {e.errors()[0]['msg']}", "tool_choice") from None

    def to_internal(self, request_id: str, messages: list[dict], tools: list[FunctionTool]) -> GenerateRequest:
        sampling = SamplingParams(
            max_tokens=self.max_output_tokens or 1,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
        )
        if LOGPROBS_INCLUDE in (self.include or []):
            sampling.logprobs = self.top_logprobs or 0
        sampling.guided = self.text.format.guided() if self.text else None
        req = GenerateRequest(request_id=request_id, model=self.model, sampling=sampling, messages=messages,
                              max_tokens_given=self.max_output_tokens is not None, stream=bool(self.stream),
                              priority=self.priority)
        self._tools_to_internal(req, tools)
        return req

    def _tools_to_internal(self, req: GenerateRequest, tools: list[FunctionTool]) -> None:
        choice = self.tool_choice or "auto"
        named = self.named_choice()
        if not tools:
            if choice not in ("auto", "none"):
                raise invalid("tool_choice requires tools", "tool_choice")
            return
        req.tools = [tool.to_internal(i) for i, tool in enumerate(tools)]
        if named is None:
            req.tool_choice = choice
        elif named.name in {t.name for t in req.tools}:
            req.tool_choice, req.tool_name = "required", named.name
        else:
            raise invalid(f"tool_choice names {named.name!r}, which is not in tools", "tool_choice")
        # a forced call is decoded under the call's grammar (tools.constrain); text.format is for text,
        # so it applies to the turns that answer in text (as OpenAI: agents force a call, then format)

    def wire_fields(self, tools: list[FunctionTool]) -> dict:
        """The request's settings as the response object repeats them."""
        named = self.named_choice()
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": self.max_tool_calls,
            "metadata": self.metadata or {},
            "model": self.model,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "previous_response_id": self.previous_response_id,
            "prompt_cache_key": self.prompt_cache_key,
            "reasoning": {"effort": None, "summary": None},
            "safety_identifier": self.safety_identifier,
            "service_tier": "default",
            "store": self.stored,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "text": {"format": (self.text.format if self.text else TextFormat(type="text")).wire(),
                     "verbosity": "medium"},
            "tool_choice": named.model_dump() if named else (self.tool_choice or "auto"),
            "tools": [t.wire() for t in tools],
            "top_logprobs": self.top_logprobs or 0,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "truncation": "disabled",
            "user": self.user,
        }
