"""OpenAI's batch file format, line by line: what an input line holds, what an output line says,
and which lines an output already answers (resume). No Ray, no engine: `conduit batch` and the
Batch API routes read and write the same lines.

Input line:  {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings",
              "body"}
Output line: {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": null | {...}}

A body the route would refuse gets the route's own 4xx as its response (status code and OpenAI's
error body, `error: null`), as OpenAI's error files hold them. A line that is no request at all
(not JSON, no custom_id, an unknown url) gets `response: null` and `error: {"code", "message"}`."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from app.api.input_limits import surrogate_error

METHOD = "POST"
URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}  # a text-generation model's routes
EMBEDDING_URLS = {"/v1/embeddings": "embedding"}  # an embedding model's
KINDS = {**URLS, **EMBEDDING_URLS}  # url -> the kind of request (chat and completion: ResponseBuilder's kinds)
MAX_CUSTOM_ID = 512  # characters; longer ones are refused (OpenAI asks for short ids too)


@dataclass
class BatchLine:
    """One input line that is a request: its id, the route it asks for, and the route's body."""

    custom_id: str
    url: str
    body: dict

    @property
    def kind(self) -> str:
        return KINDS[self.url]


@dataclass
class LineError:
    """An input line that is no request: the output line says why, under `error`."""

    code: str
    message: str
    custom_id: str | None = None  # when the line had a usable one
    line_id: str | None = None  # the output id of a line with none: the same for the same text


def parse_line(text: str, utf8: bool = True, urls: Iterable[str] = URLS) -> BatchLine | LineError:
    """`utf8`: whether the line's bytes were UTF-8 (`text` then holds them decoded with replacements);
    `urls`: the routes a line may ask for (the Batch API's, which take embeddings too)."""
    if not utf8:
        return LineError("invalid_encoding", "The line is not UTF-8 text", line_id=line_id(text))
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        return LineError("invalid_json", f"The line is not valid JSON: {e}", line_id=line_id(text))
    if (surrogate := surrogate_error(text.encode())) is not None:  # as the routes refuse it
        return LineError("invalid_json", surrogate.message, line_id=line_id(text))
    if not isinstance(obj, dict):
        return LineError("invalid_json", "The line must be a JSON object", line_id=line_id(text))
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        return LineError("invalid_custom_id", f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters",
                         line_id=line_id(text))
    if obj.get("method") != METHOD:
        return LineError("invalid_method", f"method must be {METHOD!r}", custom_id)
    url = obj.get("url")
    if url not in urls:
        supported = ", ".join(urls)
        return LineError("invalid_url", f"url {url!r} is not supported here; use one of {supported}", custom_id)
    if not isinstance(obj.get("body"), dict):
        return LineError("invalid_body", "body must be a JSON object", custom_id)
    extra = set(obj) - {"custom_id", "method", "url", "body"}
    if extra:
        return LineError("invalid_line", f"Unrecognized line fields: {', '.join(sorted(extra))}", custom_id)
    return BatchLine(custom_id, url, obj["body"])


def job_line_error(err: LineError, number: int, model: str) -> str:
    """The output line of a line that is no request for a `conduit batch` job running `model`:
    `number` is its line in the input (0 for Parquet rows, which have none)."""
    if err.code == "invalid_url":  # one job runs one model, and so its kind of route
        err.message += f": this job runs {model!r}, and one job runs one model"
    if number:
        err.message += f" (line {number})"
    return error_line(err)


def line_id(text: str) -> str:
    """Output id of a line without a custom_id, so that a resumed job knows it answered it."""
    return "batch_req_" + hashlib.sha256(text.encode()).hexdigest()[:32]


def new_id() -> str:
    return "batch_req_" + uuid.uuid4().hex


# output ----------------------------------------------------------------------------------------
def response_line(custom_id: str, status_code: int, request_id: str, body: dict) -> str:
    """The line for a request the route answered (2xx), or refused (4xx/5xx with its error body)."""
    return _dump({"id": new_id(), "custom_id": custom_id,
                  "response": {"status_code": status_code, "request_id": request_id, "body": body}, "error": None})


def error_line(err: LineError) -> str:
    return _dump({"id": err.line_id or new_id(), "custom_id": err.custom_id, "response": None,
                  "error": {"code": err.code, "message": err.message}})


def is_error(line: dict) -> bool:
    """Whether an output line belongs in OpenAI's error file rather than its output file."""
    return line.get("error") is not None or not 200 <= (line.get("response") or {}).get("status_code", 0) < 300


def _dump(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# resume ----------------------------------------------------------------------------------------
@dataclass
class Answered:
    """What an output file already answers: custom_ids, and the ids of lines that had none."""

    custom_ids: set[str] = field(default_factory=set)
    line_ids: set[str] = field(default_factory=set)

    def add(self, output_line: str) -> bool:
        """Note one output line; False when it is no complete output line (a torn last write)."""
        try:
            obj = json.loads(output_line)
        except ValueError:
            return False
        if not isinstance(obj, dict) or "id" not in obj:
            return False
        if obj.get("custom_id") is not None:
            self.custom_ids.add(obj["custom_id"])
        else:
            self.line_ids.add(obj["id"])
        return True

    def __len__(self) -> int:
        return len(self.custom_ids) + len(self.line_ids)

    def answers(self, text: str, utf8: bool = True) -> bool:
        """Whether input line `text` is answered already (then a resumed job skips it)."""
        parsed = parse_line(text, utf8)
        if isinstance(parsed, LineError) and parsed.custom_id is None:
            return parsed.line_id in self.line_ids
        return parsed.custom_id in self.custom_ids


def answered(output_lines: Iterable[str]) -> Answered:
    done = Answered()
    for text in output_lines:
        if text.strip():
            done.add(text)
    return done


def pending(texts: Iterable[str], done: Answered) -> list[str]:
    """The non-blank input lines `done` does not answer yet."""
    return [t for t in texts if t.strip() and not done.answers(t)]
