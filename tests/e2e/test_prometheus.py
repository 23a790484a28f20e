"""A real Prometheus (Debian's `prometheus`; .ci/run installs it) scrapes the running Conduit twice
over: the ingress's GET /metrics, and this node's Ray metrics agent through cluster/prometheus.yml's
relabelling. Through PromQL, both must give a TTFT quantile and a non-zero token rate."""

import math
import shutil
import subprocess
import threading
import time

import httpx
import pytest
import yaml

from app.config import PROJECT_ROOT
from tests.e2e.conftest import MODEL, free_port

pytestmark = pytest.mark.e2e
JOBS = ("ray", "conduit")


def prometheus_config(server: str) -> dict:
    """cluster/prometheus.yml's `ray` job pointed at this test cluster, plus the `conduit` job."""
    import ray

    config = yaml.safe_load((PROJECT_ROOT / "cluster" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (ray_job,) = config["scrape_configs"]
    ports = [node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]]
    # the test's cluster runs no dashboard, so no discovery file: name the agents directly
    del ray_job["file_sd_configs"]
    ray_job["static_configs"] = [{"targets": [f"127.0.0.1:{port}" for port in ports]}]
    host = server.removeprefix("http://")
    config["scrape_configs"].append({"job_name": "conduit", "static_configs": [{"targets": [host]}]})
    return config


@pytest.fixture
def prometheus(server, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:  # a missing tool must not pass as a skipped test
        pytest.fail("Debian's `prometheus` is not installed: apt-get install -y prometheus (.ci/run does)")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(server)))
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def promql(prometheus: str, query: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


def positive(prometheus: str, query: str) -> float | None:
    """The query's single value when it is a finite number above 0, else None."""
    result = promql(prometheus, query)
    value = float(result[0]["value"][1]) if len(result) == 1 else math.nan
    return value if math.isfinite(value) and value > 0 else None


def wait_for(what: str, check, timeout_s: float = 20):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except httpx.HTTPError:
            pass  # Prometheus still starting
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_prometheus_reads_ttft_quantile_and_token_rate(server, client, prometheus):
    up = lambda: {r["metric"]["job"] for r in promql(prometheus, "up == 1")} >= set(JOBS)  # noqa: E731
    wait_for("both scrape targets up", up, timeout_s=60)  # scrapes every few s; slow on a loaded machine

    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            client.completions.create(model=MODEL, prompt="measure me", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        for job in JOBS:
            rate = f'sum(rate(vllm:generation_tokens_total{{job="{job}",model_name="{MODEL}"}}[15s]))'
            ttft = ('histogram_quantile(0.9, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket'
                    f'{{job="{job}",model_name="{MODEL}"}}[15s])))')
            wait_for(f"{job}: a non-zero token rate", lambda: positive(prometheus, rate))
            p90 = wait_for(f"{job}: a TTFT quantile", lambda: positive(prometheus, ttft))
            assert p90 < 60, (job, p90)
    finally:
        stop.set()
        sender.join()
