"""The internal request that every wire format is translated into, and what the tokenizer makes
of it. Plain dataclasses: they cross Ray hops (pickled) on every request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from app.engine.sampling_params import SamplingParams


@dataclass
class GenerateRequest:
    request_id: str
    model: str
    sampling: SamplingParams
    prompt: str | list[int] | None = None  # text, or token ids used as they are
    # chat, rendered with the model's chat template, in transformers' message format:
    # {"role", "content": str}; a call in the history is {"role": "assistant", "content": str | None,
    # "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": dict}}]}, and its
    # result {"role": "tool", "tool_call_id", "name", "content": str}
    messages: list[dict] | None = None
    continue_final_message: bool = False  # chat: continue the last (assistant) message, e.g. Anthropic's prefill
    max_tokens_given: bool = True  # False: fill the rest of the context window
    stream: bool = False
    n: int = 1  # choices: n engine sequences from one prepared prompt
    # fill-in-the-middle: the text after the completion; the tokenizer deployment renders
    # prompt + suffix with the model's own FIM tokens (a 400 naming `suffix` when it has none)
    suffix: str | None = None
    # tools the model may call (chat): rendered into the chat template by the tokenizer deployment.
    # tool_choice "auto": the model decides and adapters parse its text with app/api/tools.py;
    # "none": no call; "required": output constrained to a call of one of `tools`; `tool_name`
    # set: constrained to a call of that one (the constraint is SamplingParams.guided).
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: Literal["auto", "none", "required"] = "auto"
    tool_name: str | None = None
    priority: int = 0  # asked by the client (vLLM's field; lower runs first); capped by the key's policy


@dataclass
class ToolSpec:
    """A function the model may call, wire-neutral (OpenAI `function`, Anthropic `tool`)."""

    name: str
    description: str | None = None
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})  # JSON Schema


@dataclass
class PreparedRequest:
    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # what the engine's scheduler uses: the asked priority after the key's cap
    tenant: str = ""  # whose fair share it uses (the API key's id)
    # the LoRA adapter it decodes with (None: the base model): `lora` is the adapter's key on the
    # model replicas (Serve's multiplexed model id, the engine's adapter name), `lora_path` its files
    lora: str | None = None
    lora_path: str | None = None
