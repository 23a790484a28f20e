"""serve_config.yaml as operators use it: `serve deploy` on a `ray start --head` cluster, and
`conduit run` (what `make run` does, i.e. `serve run`). Only the HTTP port is changed, so these
tests do not collide with a server on 8000."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from app.config import PROJECT_ROOT
from app.front import free_port, local_front_ports

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
# A Ray instance of its own: the HAProxy front's own ports (stats, exporter, fallback proxy) must not be
# the ones this session's Ray instance already holds (they are in os.environ; `conduit run` picks its own)
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", **local_front_ports()}


def config_on_port(tmp_path: Path, port: int) -> Path:
    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    raw["http_options"]["port"] = port
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def wait_and_ask(port: int, proc: subprocess.Popen, limit_s: float = 240) -> dict:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None or proc.args[1] != "run", "server process exited early"
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        pytest.fail(f"nothing answered /v1/models on port {port} within {limit_s:.0f} s")
    body = {"model": "conduit-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stop_group(proc: subprocess.Popen, sig=signal.SIGINT, wait_s: float = 60) -> int:
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def test_serve_deploy_on_a_ray_cluster(tmp_path):
    http_port, gcs_port, dash_port = free_port(), free_port(), free_port()
    config = config_on_port(tmp_path, http_port)
    ray_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         "--disable-usage-stats", f"--temp-dir={ray_dir}"],
        env=ENV, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        address = f"http://127.0.0.1:{dash_port}"
        deadline = time.monotonic() + 120
        while True:  # the dashboard's REST API takes a few seconds after the GCS
            res = subprocess.run([str(BIN / "serve"), "deploy", str(config), "-a", address],
                                 env=ENV, capture_output=True, text=True)
            if res.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert res.returncode == 0, res.stderr
        answer = wait_and_ask(http_port, head)
        assert answer["usage"]["completion_tokens"] > 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = subprocess.run([str(BIN / "serve"), "status", "-a", address], env=ENV, capture_output=True, text=True)
            if "status: RUNNING" in status.stdout:
                break
            time.sleep(2)
        for name in ("Ingress", "Tokenizer", "Model-conduit-demo"):
            assert name in status.stdout
        assert "UNHEALTHY" not in status.stdout and "status: RUNNING" in status.stdout
    finally:
        stop_group(head, signal.SIGTERM)
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_conduit_run_serves_and_stops_on_ctrl_c(tmp_path):
    """Serves, says so in one line (URL and models) after a line per deployment's loading, prints no
    traceback when a client hangs up mid-stream, and stops on Ctrl-C."""
    port = free_port()
    config = config_on_port(tmp_path, port)
    output = tmp_path / "conduit-run.log"
    with output.open("w") as sink:
        proc = subprocess.Popen([str(BIN / "conduit"), "run", str(config)], env=ENV, cwd=PROJECT_ROOT,
                                start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    try:
        assert wait_and_ask(port, proc)["object"] == "chat.completion"
        # Ray sized from this machine's real CPUs (2 in CI): every deployment of the default config fits
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hi"},
                       timeout=60)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384, r.text
        body = {"model": "conduit-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as stream:
            next(stream.iter_lines())  # then hang up mid-stream
        time.sleep(3)
    finally:
        stop_group(proc, wait_s=30)  # measured ~8 s before the local 5 s ingress draining period (Ray's: 30 s)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
    printed = output.read_text()
    ready = [line for line in printed.splitlines() if line.startswith("Conduit ready at")]
    assert ready and f"http://127.0.0.1:{port}" in ready[0] and "conduit-demo, all-minilm-l6-v2" in ready[0], printed
    assert "conduit/Model-conduit-demo healthy: 1 running" in printed, printed  # loading was shown
    assert "Traceback" not in printed and "Unhandled error" not in printed, printed
