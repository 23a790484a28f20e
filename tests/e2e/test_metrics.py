"""GET /metrics: vLLM's names, numbers that equal what the API returned, everything the dashboard
queries; and request ids that come back and reach every stage's log."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import CONDUIT, SCRAPE_CACHE_S, VLLM, exported_metric_names
from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e


def scrape(server: str) -> dict:
    response = httpx.get(f"{server}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def total(families: dict, sample: str, **labels) -> float:
    """Sum of one sample name's values over the series whose labels include `labels`."""
    family = families.get(sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum"))
    if family is None:
        return 0.0
    return sum(s.value for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def settled(server: str) -> dict:
    """A scrape that no longer changes: what earlier tests sent has all been exported."""
    last = scrape(server)
    for _ in range(30):
        time.sleep(SCRAPE_CACHE_S + 0.2)  # > the ingress's scrape cache and Ray's report interval (0.5 s here)
        now = scrape(server)
        keys = ("vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count")
        if all(total(now, k, model_name=MODEL) == total(last, k, model_name=MODEL) for k in keys):
            return now
        last = now
    raise AssertionError("metrics kept changing with no traffic")


def test_counters_and_histograms_equal_what_the_api_returned(server, client):
    before = settled(server)
    completion_tokens = prompt_tokens = 0
    requests = [(5, False), (9, True), (3, False), (12, True)]
    for i, (max_tokens, stream) in enumerate(requests):
        args = dict(model=MODEL, prompt=f"count {i} these tokens", max_tokens=max_tokens, temperature=0,
                    extra_body={"ignore_eos": True})
        if stream:
            chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
            usage = chunks[-1].usage
        else:
            usage = client.completions.create(**args).usage
        completion_tokens += usage.completion_tokens
        prompt_tokens += usage.prompt_tokens
    n = len(requests)

    deadline = time.monotonic() + 30
    after = scrape(server)
    ttft_count = "vllm:time_to_first_token_seconds_count"
    while total(after, ttft_count, model_name=MODEL) < total(before, ttft_count, model_name=MODEL) + n:
        assert time.monotonic() < deadline, "the requests never reached /metrics"
        time.sleep(0.5)
        after = scrape(server)
    time.sleep(SCRAPE_CACHE_S + 0.2)  # one more report interval: nothing beyond these requests may arrive
    after = scrape(server)

    def rise(sample: str, **labels) -> float:
        return total(after, sample, model_name=MODEL, **labels) - total(before, sample, model_name=MODEL, **labels)

    assert rise("vllm:generation_tokens_total") == completion_tokens == sum(m for m, _ in requests)
    assert rise("vllm:prompt_tokens_total") == prompt_tokens
    assert rise(ttft_count) == n
    assert rise("vllm:e2e_request_latency_seconds_count") == n
    assert rise("vllm:request_success_total", finished_reason="length") == n
    # one inter-token gap per token after each request's first
    assert rise("vllm:inter_token_latency_seconds_count") == completion_tokens - n
    assert rise("conduit:e2e_request_latency_seconds_count") == n


def test_every_metric_the_dashboard_may_query_is_served(server, client):
    # traffic that makes every kind of series appear: a prefix-cache hit (same 40-token prompt
    # twice), an error, a finished request
    prompt = list(range(5, 45))
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert httpx.post(f"{server}/v1/completions", json={"model": "no-such-model", "prompt": "x"}).status_code == 404
    # Ray's report interval and the replicas' 1 s engine-stats poll; longer on a loaded machine
    wanted = exported_metric_names()  # counters that never rose (no preemption happened) are served at 0
    deadline = time.monotonic() + 20
    while True:
        time.sleep(1)
        families = scrape(server)
        served = {s.name for f in families.values() for s in f.samples}
        # counters are served (at 0) before anything rose: wait for this traffic's own rises too
        rose = (total(families, "vllm:prefix_cache_hits_total", model_name=MODEL) > 0
                and total(families, "conduit:request_errors_total", status="404") > 0)
        if (wanted <= served and rose) or time.monotonic() > deadline:
            break
    announced = set(families)
    for spec in [*VLLM.values(), *CONDUIT.values()]:
        assert spec.name in announced, spec.name
    for name in wanted:
        assert name in served, f"{name} has no samples"
    assert total(families, "vllm:prefix_cache_hits_total", model_name=MODEL) > 0
    assert total(families, "conduit:request_errors_total", status="404") > 0
    # the engine's counters start at 0 per replica, labelled: rate() sees their first rise
    for cause in ("kv_cache", "priority", "fair_share"):
        assert any(s.labels.get("cause") == cause and s.labels.get("model_name") == MODEL
                   for s in families["conduit:preemptions"].samples), cause
    assert any(s.labels.get("model_name") == MODEL for s in families["vllm:num_preemptions"].samples)
    healthy = {s.labels["deployment"] for s in families["ray_serve_deployment_replica_healthy"].samples}
    assert {"Ingress", "Tokenizer", f"Model-{MODEL}"} <= healthy


def serve_logs(prefix: str) -> list[str]:
    """Lines of this session's Serve replica logs whose file name starts with `prefix`."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return [line for path in logs.glob(f"{prefix}_*.log") for line in path.read_text().splitlines()]


def test_model_loading_reports_progress(server):
    lines = serve_logs(f"replica_conduit_Model-{MODEL}")
    for stage in ("1/4: config", "2/4: tokenizer", "3/4: weights", "4/4: engine"):
        assert any(f"model {MODEL}: loading {stage}" in line for line in lines), stage
    assert any(f"model {MODEL}: loaded in" in line for line in lines)


def test_conduit_status_shows_deployments_and_model_replicas(server):
    import ray

    conduit = Path(sys.executable).with_name("conduit")
    deadline = time.monotonic() + 30
    while True:  # the figures are Ray's last metrics report: slower on a loaded machine
        res = subprocess.run([str(conduit), "status", "--address", ray.get_runtime_context().gcs_address],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        model_rows = [line for line in lines if line.strip("│ ").startswith(MODEL + " ")]
        if (model_rows and all("100%" in row for row in model_rows)) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert any(f"Model-{MODEL}" in line and "HEALTHY" in line and "1 RUNNING" in line for line in lines), res.stdout
    assert model_rows and all("%" in row and "100%" in row for row in model_rows), res.stdout  # KV usage, loaded


def test_request_id_comes_back_and_every_stage_logs_it(server, client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, extra_headers={"x-request-id": "abc"}
    )
    assert raw.headers["x-request-id"] == "abc"
    assert raw.parse().id == "chatcmpl-abc"

    wanted = {
        "ingress access line": ("replica_conduit_Ingress", "access request_id=abc"),
        "tokenizer": ("replica_conduit_Tokenizer", "request abc: "),
        "model replica": (f"replica_conduit_Model-{MODEL}", "request abc: finished (length), 3 tokens"),
    }
    deadline = time.monotonic() + 10
    while True:
        missing = [stage for stage, (prefix, text) in wanted.items()
                   if not any(text in line for line in serve_logs(prefix))]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"no log line with request id abc from: {missing}"
    access = next(line for line in serve_logs("replica_conduit_Ingress") if "access request_id=abc" in line)
    for field in ("route=/v1/chat/completions", f"model={MODEL}", "status=200", "completion_tokens=3",
                  "ttft_ms=", "total_ms=", "finish_reason=length"):
        assert field in access
    assert "prompt=" not in access and "output=" not in access  # only with logging.log_prompts
