"""`conduit batch`'s file handling without Ray running: input lines parsed as OpenAI's batch format,
output lines in OpenAI's batch output format (bodies exactly the routes'), resume (what an output
answers, a torn last line), the JSONL and Parquet readers, and the config target."""

import asyncio
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from app.api.errors import ConduitError
from app.api.model_table import ModelTable
from app.batch.job import OutputFile, pending_count
from app.batch.lines import Answered, BatchLine, LineError, answered, error_line, is_error, parse_line, pending
from app.batch.requests import answer_line, refusal_line, to_request
from app.batch.source import JsonLines, decode, parquet_to_lines, split_lines
from app.batch.target import find_target
from app.config import PROJECT_ROOT
from app.engine.engine import RequestOutput
from tests.openapi_contract import validate

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def targets(ids: set[str], name: str):
    """What the job's worker gives `to_request`: the online routes' model table, resolving synchronously."""
    table = ModelTable({name: sorted(ids - {name})}, {})
    return lambda model: asyncio.run(table.target(model))


def line(custom_id="a", url="/v1/chat/completions", body=None, **extra) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body or CHAT, **extra})


# input lines ---------------------------------------------------------------------------------
def test_a_request_line_parses():
    parsed = parse_line(line("x", "/v1/completions", {"model": "m", "prompt": "p"}))
    assert parsed == BatchLine("x", "/v1/completions", {"model": "m", "prompt": "p"})
    assert parsed.kind == "completion"


@pytest.mark.parametrize("text, code, has_custom_id", [
    ("not json", "invalid_json", False),
    ("[1, 2]", "invalid_json", False),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), "invalid_custom_id", False),
    (line(custom_id=""), "invalid_custom_id", False),
    (line(custom_id=7), "invalid_custom_id", False),
    (line().replace('"POST"', '"GET"'), "invalid_method", True),
    (line(url="/v1/embeddings"), "invalid_url", True),
    (line(url="/v1/chat/completions/../x"), "invalid_url", True),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": "x"}), "invalid_body", True),
    (line(extra_field=1), "invalid_line", True),
    ('{"custom_id": "a\\ud800", "method": "POST"}', "invalid_json", False),  # unpaired surrogate: not text
])
def test_lines_that_are_no_request_say_why(text, code, has_custom_id):
    parsed = parse_line(text)
    assert isinstance(parsed, LineError) and parsed.code == code
    assert (parsed.custom_id is not None) == has_custom_id
    assert (parsed.line_id is None) == has_custom_id  # a line without an id is known by its text


def test_a_line_that_was_not_utf8_is_an_error_of_its_own():
    text, number, utf8 = decode(b'{"custom_id": "a\xff"}', 3)
    assert (number, utf8) == (3, False)
    assert parse_line(text, utf8).code == "invalid_encoding"


def test_error_lines_in_openai_batch_output_format():
    out = json.loads(error_line(LineError("invalid_url", "no", custom_id="a")))
    assert set(out) == {"id", "custom_id", "response", "error"}
    assert out["id"].startswith("batch_req_") and out["custom_id"] == "a" and out["response"] is None
    assert out["error"] == {"code": "invalid_url", "message": "no"}
    assert is_error(out)
    # a line with no custom_id gets the same id each time it is read, so a resumed job knows it
    first, again = (json.loads(error_line(parse_line("not json"))) for _ in range(2))
    assert first["id"] == again["id"] and first["custom_id"] is None


# bodies: the route's models, the route's answers -----------------------------------------------
def test_an_answer_is_the_chat_routes_response_body():
    request = to_request(BatchLine("a", "/v1/chat/completions", {**CHAT, "n": 2}), targets({"m", "alias"}, "model-name"))
    assert request.req.model == "model-name" and request.req.n == 2
    outs = [RequestOutput("r", [1, 2], "hello", True, "length", num_prompt_tokens=5, num_output_tokens=2),
            RequestOutput("r", [3], "x", True, "stop", num_prompt_tokens=5, num_output_tokens=1)]
    out = json.loads(answer_line(request, outs, None))
    assert set(out) == {"id", "custom_id", "response", "error"} and out["error"] is None
    response = out["response"]
    assert response["status_code"] == 200 and out["custom_id"] == "a" and not is_error(out)
    body = response["body"]
    validate(body, "CreateChatCompletionResponse")
    assert body["id"] == "chatcmpl-" + response["request_id"] and body["model"] == "m"
    assert [c["message"]["content"] for c in body["choices"]] == ["hello", "x"]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_completions_answer_with_echo():
    request = to_request(BatchLine("c", "/v1/completions", {"model": "m", "prompt": "Once", "echo": True}), targets({"m"}, "m"))
    out = json.loads(answer_line(request, [RequestOutput("r", [9], " upon", True, "length", num_prompt_tokens=1,
                                                         num_output_tokens=1)], "Once"))
    body = out["response"]["body"]
    validate(body, "CreateCompletionResponse")
    assert body["choices"][0]["text"] == "Once upon" and body["id"].startswith("cmpl-")


@pytest.mark.parametrize("body, status, param", [
    ({**CHAT, "temperature": 9}, 400, "temperature"),
    ({**CHAT, "bogus": 1}, 400, "bogus"),
    ({**CHAT, "messages": []}, 400, "messages"),
    ({**CHAT, "stream": True}, 400, "stream"),
    ({**CHAT, "model": "other"}, 404, "model"),
    ({**CHAT, "tool_choice": "required"}, 400, "tool_choice"),
])
def test_bodies_the_route_refuses_get_its_error(body, status, param):
    with pytest.raises(ConduitError) as refused:
        to_request(BatchLine("a", "/v1/chat/completions", body), targets({"m"}, "m"))
    err = refused.value
    assert (err.status, err.param) == (status, param)
    out = json.loads(refusal_line("a", err, "rid"))
    assert out["response"] == {"status_code": status, "request_id": "rid", "body": {"error": {
        "message": err.message, "type": err.type, "param": err.param, "code": err.code}}}
    assert out["error"] is None and is_error(out)


# resume ----------------------------------------------------------------------------------------
def test_answered_lines_are_skipped():
    done_output = [json.loads(error_line(parse_line("garbage"))), {"id": "batch_req_1", "custom_id": "a"}]
    done = answered([json.dumps(o) for o in done_output] + ["", '{"id": "batch_req_torn", "cust'])
    assert done.custom_ids == {"a"} and len(done) == 2
    inputs = [line("a"), line("b"), "garbage", "other garbage", "   "]
    assert pending(inputs, done) == [line("b"), "other garbage"]


def test_output_file_cuts_a_torn_last_line_and_appends(tmp_path: Path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "batch_req_1", "custom_id": "a"}\n{"id": "batch_req_2", "custom_id": "b", "resp')
    out = OutputFile(path)
    assert out.done.custom_ids == {"a"}  # b was cut short: it is answered again
    with out:
        out.write('{"id": "batch_req_3", "custom_id": "b"}')
    assert path.read_text() == '{"id": "batch_req_1", "custom_id": "a"}\n{"id": "batch_req_3", "custom_id": "b"}\n'


def test_pending_count(tmp_path: Path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([line("a"), "", line("b"), "junk"]) + "\n")
    assert pending_count(str(path), Answered(custom_ids={"a"})) == (3, 1)


# readers ---------------------------------------------------------------------------------------
class Stream:
    """A binary stream read in small pieces, as Ray Data hands a file to a datasource."""

    def __init__(self, data: bytes, piece: int = 7):
        self.data, self.piece = data, piece

    def read(self, n: int) -> bytes:
        chunk, self.data = self.data[: min(n, self.piece)], self.data[min(n, self.piece):]
        return chunk


def test_lines_split_on_newline_only():
    text = line("a", body={**CHAT, "messages": [{"role": "user", "content": "x\u2028y\u0085z"}]})
    data = (text + "\r\n" + line("b") + "\n\n" + line("c")).encode()  # no newline at the end
    raw = list(split_lines(Stream(data)))
    assert [decode(r, i)[0] for i, r in enumerate(raw)] == [text, line("b"), "", line("c")]
    assert parse_line(decode(raw[0], 1)[0]).body["messages"][0]["content"] == "x\u2028y\u0085z"


def test_jsonl_reader_keeps_pending_lines_with_their_numbers():
    data = "\n".join([line("a"), "", line("b"), "junk", line("c")]).encode() + b"\n\xff\xfe\n"
    source = JsonLines.__new__(JsonLines)  # _read_stream needs no Ray: only the answered set
    source.done = Answered(custom_ids={"b"})
    rows = [r for block in source._read_stream(Stream(data, 1000), "x") for r in block.to_pylist()]
    assert [(r["line"], r["utf8"]) for r in rows] == [(1, True), (4, True), (5, True), (6, False)]
    assert rows[0]["text"] == line("a")


def test_parquet_rows_become_lines(tmp_path: Path):
    table = pa.table({"custom_id": ["s", "t", "done"], "method": ["POST"] * 3,
                      "url": ["/v1/chat/completions"] * 3,
                      "body": [json.dumps(CHAT), json.dumps({**CHAT, "max_tokens": 9}), json.dumps(CHAT)]})
    structs = pa.table({"custom_id": ["u"], "method": ["POST"], "url": ["/v1/completions"],
                        "body": [{"model": "m", "prompt": "p", "max_tokens": None}]})  # null: absent
    pq.write_table(table, tmp_path / "in.parquet")
    lines = parquet_to_lines(pq.read_table(tmp_path / "in.parquet"), Answered(custom_ids={"done"}))
    parsed = [parse_line(t) for t in lines.column("text").to_pylist()]
    assert [(p.custom_id, p.body["max_tokens"]) for p in parsed] == [("s", 4), ("t", 9)]
    assert parse_line(parquet_to_lines(structs, Answered()).column("text")[0].as_py()).body == {"model": "m",
                                                                                               "prompt": "p"}


# the config target -----------------------------------------------------------------------------
def test_target_from_serve_config():
    apps = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())["applications"]
    target = find_target(apps, "conduit-demo")
    assert target.model.name == "conduit-demo" and target.replicas == 2  # the autoscaling maximum
    assert target.actor_options(0) == {"num_cpus": 1}
    assert find_target(apps, None).model.name == "conduit-demo"  # the only model
    with pytest.raises(ValueError, match="no model matches nope"):
        find_target(apps, "nope")
    apps[0]["deployments"] = []
    assert find_target(apps, None).actor_options(1) == {"num_cpus": 1, "num_gpus": 1}  # device auto, GPUs there


def test_replicas_that_fit_the_cluster(monkeypatch):
    from app.batch.target import fitting_replicas

    monkeypatch.delenv("CONDUIT_ALLOW_PENDING_NODES", raising=False)
    assert fitting_replicas(2, {"num_cpus": 1}, {"CPU": 2.0}, 0.25) == 1  # room kept for reading the input
    assert fitting_replicas(4, {"num_cpus": 1, "num_gpus": 1}, {"CPU": 16.0, "GPU": 2.0}, 0.25) == 2
    assert fitting_replicas(2, {"num_cpus": 0.5, "resources": {"accel": 1}}, {"CPU": 3.0, "accel": 2.0}, 0.25) == 2
    assert fitting_replicas(1, {"resources": {"accel": 1}}, {"CPU": 3.0}, 0.25) == 0
    monkeypatch.setenv("CONDUIT_ALLOW_PENDING_NODES", "1")  # an autoscaler may add nodes
    assert fitting_replicas(4, {"num_cpus": 1}, {"CPU": 2.0}, 0.25) == 4
