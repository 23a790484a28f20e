"""One response's output, built from the engine's deltas, and every step of it as the stream events
OpenAI sends (`response.created`, `response.output_item.added`, `response.output_text.delta`, ...,
`response.completed`), numbered by `sequence_number`. The whole (non-streamed) answer is built the
same way, its events unsent, so both give the same output items."""

from __future__ import annotations

import copy
import secrets
import string
import time

from app.api import tools
from app.api.errors import ConduitError
from app.api.protocol import GenerateRequest
from app.api.wire.openai_extras import chat_logprobs
from app.api.wire.responses_items import new_id
from app.engine.engine import RequestOutput

_PAD = string.ascii_letters + string.digits


def failure_code(err: ConduitError) -> str:
    """The response object's `error.code` (OpenAI's enumeration) for an error."""
    if err.status == 429:
        return "rate_limit_exceeded"
    return "invalid_prompt" if 400 <= err.status < 500 else "server_error"


class ResponseOutput:
    """`response`: the wire object (status in_progress, output empty), filled in as deltas arrive."""

    def __init__(self, response: dict, req: GenerateRequest, obfuscate: bool = False):
        self.response = response
        self.seq = 0
        self.obfuscate = obfuscate
        self.parallel = response["parallel_tool_calls"]
        self.tools = req.tools if req.tool_choice != "none" else []
        self.forced = tools.forced(req)
        self.tool_name = req.tool_name
        self.calls = (tools.ForcedCallStream() if self.forced else tools.AutoCallStream(self.tools)) if self.tools else None
        self.message: dict | None = None  # the open message item
        self.call: dict | None = None  # the open function_call item
        self.with_logprobs = req.sampling.logprobs is not None

    # events -----------------------------------------------------------------------------------
    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return event

    def _snapshot(self, kind: str) -> dict:
        return self._event(kind, response=copy.deepcopy(self.response))

    def start(self) -> list[dict]:
        return [self._snapshot("response.created"), self._snapshot("response.in_progress")]

    def feed(self, out: RequestOutput) -> list[dict]:
        """The events of one engine delta (the last one, `out.finished`, ends the response)."""
        events = []
        logprobs = chat_logprobs(out.logprobs)["content"] if out.logprobs is not None else []
        if self.calls is None:
            events += self._text(out.text, logprobs)
        elif self.forced:
            name, arguments = self.calls.feed(out.text, out.finished)
            if name is not None:
                events += self._open_call(tools.ToolCall(tools.new_call_id(), name, ""))
            if arguments:
                events += self._arguments(arguments)
        else:
            events += self._text(self.calls.feed(out.text), logprobs)
        if out.finished:
            events += self._finish(out)
        return events

    def fail(self, err: ConduitError) -> list[dict]:
        """A failure after the stream began: an `error` event, then `response.failed`."""
        self.response.update(status="failed", error={"code": failure_code(err), "message": err.message})
        return [self._event("error", code=err.code or err.type, message=err.message, param=err.param),
                self._snapshot("response.failed")]

    # the items ---------------------------------------------------------------------------------
    def _text(self, text: str, logprobs: list[dict]) -> list[dict]:
        if not text and not logprobs:
            return []
        events = [] if self.message is not None else self._open_message()
        part = self.message["content"][0]
        part["text"] += text
        part["logprobs"] += logprobs
        return events + [self._event("response.output_text.delta", item_id=self.message["id"],
                                     output_index=len(self.response["output"]) - 1, content_index=0, delta=text,
                                     logprobs=logprobs, **self._padding(text))]

    def _open_message(self) -> list[dict]:
        self.message = {"id": new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}
        self.response["output"].append(self.message)
        index = len(self.response["output"]) - 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events = [self._event("response.output_item.added", output_index=index, item=copy.deepcopy(self.message))]
        self.message["content"].append(part)
        return events + [self._event("response.content_part.added", item_id=self.message["id"], output_index=index,
                                     content_index=0, part=copy.deepcopy(part))]

    def _close_message(self, status: str) -> list[dict]:
        message, self.message = self.message, None
        message["status"] = status
        index = self.response["output"].index(message)
        part = message["content"][0]
        ids = {"item_id": message["id"], "output_index": index, "content_index": 0}
        return [self._event("response.output_text.done", **ids, text=part["text"], logprobs=part["logprobs"]),
                self._event("response.content_part.done", **ids, part=copy.deepcopy(part)),
                self._event("response.output_item.done", output_index=index, item=copy.deepcopy(message))]

    def _open_call(self, call: tools.ToolCall) -> list[dict]:
        self.call = {"id": new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": call.id,
                     "name": call.name, "arguments": ""}
        self.response["output"].append(self.call)
        events = [self._event("response.output_item.added", output_index=len(self.response["output"]) - 1,
                              item=copy.deepcopy(self.call))]
        return events + (self._arguments(call.arguments) if call.arguments else [])

    def _arguments(self, text: str) -> list[dict]:
        self.call["arguments"] += text
        return [self._event("response.function_call_arguments.delta", item_id=self.call["id"],
                            output_index=len(self.response["output"]) - 1, delta=text, **self._padding(text))]

    def _close_call(self, status: str) -> list[dict]:
        call, self.call = self.call, None
        call["status"] = status
        index = self.response["output"].index(call)
        return [self._event("response.function_call_arguments.done", item_id=call["id"], output_index=index,
                            name=call["name"], arguments=call["arguments"]),
                self._event("response.output_item.done", output_index=index, item=copy.deepcopy(call))]

    def _finish(self, out: RequestOutput) -> list[dict]:
        cut = out.finish_reason == "length"
        status = "incomplete" if cut else "completed"
        events = []
        if self.forced:
            if self.call is None:  # cut short before its name was whole: the call all the same
                events += self._open_call(tools.cut_call(self.calls.text, self.tools, self.tool_name))
        elif self.calls is not None:  # tool_choice auto: what was held back is text or calls
            rest, found = self.calls.finish()
            events += self._text(rest or "", [])
            if self.message is not None:
                events += self._close_message(status)
            for call in found if self.parallel else found[:1]:
                events += self._open_call(call) + self._close_call("completed")
        if self.message is None and self.call is None and not self.response["output"]:
            events += self._open_message()  # an empty answer is an empty message, not no output
        if self.message is not None:
            events += self._close_message(status)
        if self.call is not None:
            events += self._close_call(status)
        self.response.update(
            status=status, incomplete_details={"reason": "max_output_tokens"} if cut else None,
            completed_at=None if cut else int(time.time()), usage=usage(out))
        return events + [self._snapshot("response.incomplete" if cut else "response.completed")]

    def _padding(self, text: str) -> dict:
        """OpenAI's `obfuscation`: random characters that blur a delta's size on the wire."""
        if not self.obfuscate:
            return {}
        return {"obfuscation": "".join(secrets.choice(_PAD) for _ in range(max(1, 16 - len(text) % 16)))}


def usage(out: RequestOutput) -> dict:
    return {"input_tokens": out.num_prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": out.num_output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": out.num_prompt_tokens + out.num_output_tokens}
