"""The online Batch API across a hard restart (issue 18): `conduit run` is killed with SIGKILL (its
whole process group: nothing drains, no claim is given up) while a batch runs, and started again on
the same store. The batch completes, every `custom_id` is answered exactly once, the lines answered
before the kill are kept rather than run again, and the answers equal the chat route's.

The dead server's claim on the batch holds until its lease runs out (batches_runner.LEASE_S after its
last heartbeat): the restarted server has a new runner name, so it takes the batch over only then.
The test reads that lease from the store's database and checks no line was answered before it."""

import io
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

from app.config import PROJECT_ROOT
from tests.e2e.test_serve_config import BIN, ENV, config_on_port, free_port, stop_group, wait_and_ask

pytestmark = pytest.mark.e2e
MODEL = "conduit-demo"
LINES = 40
MAX_TOKENS = 32
CONCURRENCY = 2  # lines in flight: slow enough that the kill lands mid-batch


def batch_config(tmp_path: Path, run: str, port: int) -> Path:
    """serve_config.yaml on `port`, without the embedding model (a faster start), its store (database
    and files) in `tmp_path`, shared by every run."""
    folder = tmp_path / run
    folder.mkdir()
    path = config_on_port(folder, port)
    raw = yaml.safe_load(path.read_text())
    app = raw["applications"][0]
    app["args"].pop("embedding_models")
    app["args"]["store"] = {"url": f"sqlite:///{tmp_path / 'store.db'}", "files_dir": str(tmp_path / "files"),
                            "batch_concurrency": CONCURRENCY, "batch_poll_s": 0.2}
    app["deployments"] = [d for d in app["deployments"] if not d["name"].startswith("Embedder-")]
    path.write_text(yaml.safe_dump(raw))
    return path


def start(tmp_path: Path, run: str) -> tuple[subprocess.Popen, OpenAI]:
    port = free_port()
    log = (tmp_path / f"{run}.log").open("w")
    proc = subprocess.Popen([str(BIN / "conduit"), "run", str(batch_config(tmp_path, run, port))],
                            env={**ENV, "RAY_ADDRESS": "local"}, cwd=PROJECT_ROOT, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)
    wait_and_ask(port, proc)
    return proc, OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


def body(i: int) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me a story about number {i}"}],
            "max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS, "temperature": 0}


def chat(client: OpenAI, request: dict):
    """The chat route's answer to a line's body (the SDK takes vLLM's min_tokens as an extra)."""
    extra = {"min_tokens": request["min_tokens"]}
    return client.chat.completions.create(**{k: v for k, v in request.items() if k not in extra}, extra_body=extra)


def session_alive(sid: int) -> list[int]:
    """Pids still in session `sid` (Linux /proc: field 6 of /proc/PID/stat)."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and fields[0] != "Z" and int(fields[3]) == sid:
            alive.append(int(entry.name))
    return alive


def lease_of(tmp_path: Path, batch_id: str) -> tuple[str, float]:
    """(runner, lease_until) of the batch's claim, read from the store's database."""
    with sqlite3.connect(tmp_path / "store.db") as db:
        return db.execute("SELECT runner, lease_until FROM batches WHERE id = ?", (batch_id,)).fetchone()


def answered(tmp_path: Path, batch_id: str) -> dict[int, dict]:
    """The batch's answered lines recorded in the store's database, by position."""
    with sqlite3.connect(tmp_path / "store.db") as db:
        rows = db.execute("SELECT position, line FROM batch_lines WHERE batch_id = ?", (batch_id,)).fetchall()
    return {position: json.loads(line) for position, line in rows}


def test_a_batch_survives_a_killed_server(tmp_path):
    started = time.monotonic()
    proc, client = start(tmp_path, "first")
    try:
        data = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": body(i)}) + "\n" for i in range(LINES)).encode()
        source = client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 60
        while (running := client.batches.retrieve(batch.id)).request_counts.completed < 2 * CONCURRENCY:
            assert running.status in ("validating", "in_progress") and time.monotonic() < deadline, running
            time.sleep(0.05)
        assert len(session_alive(proc.pid)) > 3, "Ray's processes are in the server's session"
        os.killpg(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = running.request_counts.completed
    assert done_before < LINES, "the batch ended before the kill: nothing was tested"
    # Ray's workers (the Ingress replica among them) have process groups of their own: they outlive
    # the kill until they see their raylet gone, and may answer lines meanwhile
    deadline = time.monotonic() + 30
    while (left := session_alive(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the killed server still run: {left}"
    gone_at = time.time()
    first = answered(tmp_path, batch.id)  # what the killed server answered, all of it
    dead_runner, lease_until = lease_of(tmp_path, batch.id)
    assert dead_runner is not None, "the killed server's claim is still recorded"
    assert done_before <= len(first) < LINES

    proc, client = start(tmp_path, "second")
    try:
        restarted_at = time.time()
        deadline = time.monotonic() + 90
        while (ended := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"batch still {ended.status} 90 s after the restart"
            time.sleep(0.5)
        output = [json.loads(line) for line in client.files.content(ended.output_file_id).text.splitlines()]
        with ThreadPoolExecutor(8) as pool:  # the chat route's answers to the same bodies
            direct = list(pool.map(lambda i: chat(client, body(i)), range(LINES)))
    finally:
        stop_group(proc, wait_s=30)
    resumed = sorted(line["response"]["body"]["created"] for line in output if line["custom_id"] not in
                     {kept["custom_id"] for kept in first.values()})
    print(f"\nkilled with {done_before}/{LINES} answered; its processes gone {gone_at - killed_at:.1f} s after the "
          f"kill, having answered {len(first)}; its lease ran out {lease_until - killed_at:.1f} s after the kill; "
          f"restarted server ready {restarted_at - killed_at:.1f} s after it, first line resumed "
          f"{resumed[0] - killed_at:.0f} s after it; whole test {time.monotonic() - started:.0f} s")

    assert ended.status == "completed", ended
    counts = ended.request_counts
    assert (counts.total, counts.completed, counts.failed) == (LINES, LINES, 0)
    assert ended.error_file_id is None
    ids = Counter(line["custom_id"] for line in output)
    assert ids == Counter(f"line-{i}" for i in range(LINES)), "each custom_id answered exactly once"
    for line in output:
        answer = line["response"]["body"]
        expected = direct[int(line["custom_id"].split("-")[1])]
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert answer["choices"][0]["message"]["content"] == expected.choices[0].message.content
        assert answer["usage"]["completion_tokens"] == expected.usage.completion_tokens == MAX_TOKENS
    # the killed server's answers are kept, not run again; the rest ran only once its lease had run out
    by_id = {line["custom_id"]: line for line in output}
    assert all(by_id[kept["custom_id"]] == kept for kept in first.values())
    assert resumed[0] >= int(lease_until), (lease_until, resumed)
    assert lease_of(tmp_path, batch.id) == (None, None), "the new server gives its claim up once the batch ends"
