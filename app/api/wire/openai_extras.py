"""OpenAI request fields beyond plain sampling (`response_format`, `tools`, `tool_choice`, tool
messages) and the response parts they produce (`logprobs` objects, `tool_calls`), kept out of
openai.py so that file stays the adapter's skeleton."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.errors import invalid
from app.api.protocol import ToolSpec
from app.api.tools import ToolCall
from app.engine.logprobs import Logprob, TokenLogprobs
from app.engine.sampling_params import GuidedDecoding
from app.engine.schema_limits import SchemaError, check_schema

FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    name: FunctionName
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self

    def guided(self) -> GuidedDecoding | None:
        if self.type != "json_schema":
            return None if self.type == "text" else GuidedDecoding(None)
        schema = self.json_schema.schema_ or {"type": "object"}
        check(schema, "response_format.json_schema.schema")
        return GuidedDecoding(schema, param="response_format.json_schema.schema")


class FunctionDef(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"]
    function: FunctionDef

    def to_internal(self, index: int) -> ToolSpec:
        parameters = self.function.parameters or {"type": "object", "properties": {}}
        check(parameters, f"tools.{index}.function.parameters")
        return ToolSpec(self.function.name, self.function.description, parameters)


class _Name(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _Name


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def check(schema: dict, param: str) -> None:
    """A 400 naming `param` when `schema` is over a guided-decoding cap or is not a JSON Schema. Only
    the cheap checks run here, on the ingress loop; the model replica compiles it (time-limited)."""
    try:
        check_schema(schema)
    except SchemaError as e:
        raise invalid(f"{param}: {e}", param) from None


# responses ------------------------------------------------------------------------------------
def _entry(lp: Logprob) -> dict:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprobs]) -> dict:
    """Chat's `logprobs` object: each output token with its `top_logprobs` alternatives."""
    content = [{**_entry(e.chosen), "top_logprobs": [_entry(t) for t in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprobs], offset: int) -> tuple[dict, int]:
    """The legacy completions `logprobs` object for `entries` whose text starts at char `offset`;
    returns it and the offset after it."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for e in entries:
        tokens.append(e.chosen.token)
        token_logprobs.append(e.chosen.logprob)
        # the chosen token is listed too, as OpenAI does; the prompt's first token has none
        top_logprobs.append(None if e.chosen.logprob is None else {t.token: t.logprob for t in [*e.top, e.chosen]})
        text_offset.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}, offset


def tool_call_json(call: ToolCall, index: int | None = None) -> dict:
    """One `tool_calls` entry (with its `index` inside a stream delta)."""
    head = {} if index is None else {"index": index}
    return {**head, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
