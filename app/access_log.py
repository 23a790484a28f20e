"""One access-log line per request, written by the ingress when the response's last byte is sent.

The middleware in app/api/server.py (`RequestContext`) opens an `AccessRecord` for each request and keeps it in a
context variable; the pipeline fills in what only it knows (model, token counts, first-token time,
finish reasons) through `tokenized` and `output`, which do nothing outside a request. The line is
`key=value` text; with `logging.format: json` Serve's JSON formatter also writes the fields as an
object under the record's "access" key."""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from app import metrics
from app.auth import probe_paths

log = logging.getLogger("ray.serve")
UNLOGGED_ROUTES = probe_paths()  # probes and scrapes (Vertex's route too): counted, not logged
_current: ContextVar[AccessRecord | None] = ContextVar("conduit_access_record", default=None)


@dataclass
class AccessRecord:
    request_id: str
    method: str
    path: str
    log_prompts: bool = False
    started: float = field(default_factory=time.monotonic)
    route: str = ""  # the route template (e.g. /v1/models/{model}); set once routed
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_output: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    output_text: list[str] = field(default_factory=list)  # only when log_prompts
    prompt: object = None  # only when log_prompts

    def fields(self, status: int) -> dict:
        now = time.monotonic()
        out = {
            "request_id": self.request_id, "method": self.method, "route": self.route or self.path,
            "model": self.model, "status": status, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": None if self.first_output is None else round((self.first_output - self.started) * 1e3, 1),
            "total_ms": round((now - self.started) * 1e3, 1),
            "finish_reason": ",".join(self.finish_reasons) or None,
        }
        if self.log_prompts:
            out.update(prompt=self.prompt, output="".join(self.output_text))
        return out

    def line(self, status: int) -> tuple[str, dict]:
        """The access line's text (key=value, fields not known left out) and its fields."""
        fields = self.fields(status)
        text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and k not in ("prompt", "output"))
        if self.log_prompts:
            text += f" prompt={fields['prompt']!r} output={fields['output']!r}"
        return text, fields


def start(request, log_prompts: bool) -> AccessRecord:
    """Open the record of one HTTP request (a starlette Request whose request id is set)."""
    record = AccessRecord(request.state.request_id, request.method, request.url.path, log_prompts)
    _current.set(record)
    return record


def finish(record: AccessRecord, scope, status: int) -> None:
    """Close the record of the request of `scope` once its response (of `status`) is sent."""
    route = scope.get("route")  # set by the router: the template, not the raw path
    record.route = getattr(route, "path", "")
    close_record(record, status)


def tokenized(model: str, prompt_tokens: int, seconds: float, prompt=None) -> None:
    """The tokenizer stage is done: `prompt_tokens` for `model`, taking `seconds` (hop included)."""
    metrics.deferred.observe("conduit:tokenizer_latency_seconds", seconds, model_name=model)
    record = _current.get()
    if record is not None:
        record.model, record.prompt_tokens = model, prompt_tokens
        if record.log_prompts:
            record.prompt = prompt


def output(out) -> None:
    """One delta (RequestOutput) of one choice reached the ingress."""
    record = _current.get()
    if record is None:
        return
    if record.first_output is None:
        record.first_output = time.monotonic()
    record.completion_tokens += len(out.token_ids)
    if out.finished:
        record.finish_reasons.append(out.finish_reason)
    if record.log_prompts:
        record.output_text.append(out.text)


def close_record(record: AccessRecord, status: int) -> None:
    """The response is sent: count it, time it, and write its access-log line."""
    route, model = record.route or "unmatched", record.model or ""
    metrics.deferred.inc("conduit:http_requests", 1, route=route, status=str(status))
    if status >= 400:
        metrics.deferred.inc("conduit:request_errors", 1, route=route, model_name=model, status=str(status))
    if record.model and record.first_output is not None:
        metrics.deferred.observe("conduit:time_to_first_token_seconds", record.first_output - record.started,
                                 model_name=model, route=route)
        metrics.deferred.observe("conduit:e2e_request_latency_seconds", time.monotonic() - record.started,
                                 model_name=model, route=route)
    if route in UNLOGGED_ROUTES:
        return
    text, fields = record.line(status)
    log.info("access %s", text, extra={"access": fields})
