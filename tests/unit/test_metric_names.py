"""The dashboard queries only exported metrics; /metrics republishes Ray's export under vLLM's names;
the access line and the log format option. No Ray cluster (tests/e2e/test_metrics.py has one)."""

import json
import logging
import re

from prometheus_client.parser import text_string_to_metric_families

from app.access_log import AccessRecord
from app.config import PROJECT_ROOT
from app.metrics import CONDUIT, VLLM, exported_metric_names, render

DASHBOARD = PROJECT_ROOT / "cluster" / "grafana" / "conduit-dashboard.json"
METRIC_NAME = re.compile(r"\b(?:vllm:|conduit:|ray_serve_)[A-Za-z0-9_:]+")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return queries


def test_every_metric_the_dashboard_queries_is_exported():
    used = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    assert used, "no metric names found in the dashboard"
    assert used <= exported_metric_names(), used - exported_metric_names()


def test_dashboard_covers_what_operators_need():
    queries = " ".join(dashboard_queries())
    for needed in ("vllm:generation_tokens_total",  # throughput
                   "histogram_quantile(0.99, sum by (le, model_name) (rate(vllm:time_to_first_token_seconds_bucket",
                   "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",  # queue, KV usage
                   "conduit:request_errors_total", "ray_serve_deployment_replica_healthy"):  # errors, replicas
        assert needed in queries, needed


RAY_EXPORT = """\
# HELP ray_vllm_generation_tokens_total Number of generation tokens processed.
# TYPE ray_vllm_generation_tokens_total counter
ray_vllm_generation_tokens_total{Component="core_worker",SessionName="s",Version="2.60.0",WorkerId="w1",engine="r1",model_name="m",otel_scope_name="x"} 15.0
# HELP ray_vllm_time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE ray_vllm_time_to_first_token_seconds histogram
ray_vllm_time_to_first_token_seconds_bucket{WorkerId="w1",engine="r1",le="0.1",model_name="m"} 2.0
ray_vllm_time_to_first_token_seconds_bucket{WorkerId="w1",engine="r1",le="+Inf",model_name="m"} 3.0
ray_vllm_time_to_first_token_seconds_count{WorkerId="w1",engine="r1",model_name="m"} 3.0
ray_vllm_time_to_first_token_seconds_sum{WorkerId="w1",engine="r1",model_name="m"} 0.5
# HELP ray_serve_deployment_replica_healthy Healthy replicas.
# TYPE ray_serve_deployment_replica_healthy gauge
ray_serve_deployment_replica_healthy{application="conduit",deployment="Ingress",replica="a"} 1.0
# HELP ray_node_cpu_utilization CPU.
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="1.2.3.4"} 12.0
"""


def test_republished_under_vllm_names_from_every_node():
    second_node = RAY_EXPORT.replace('WorkerId="w1"', 'WorkerId="w2"').replace('replica="a"', 'replica="b"')
    families = {f.name: f for f in text_string_to_metric_families(render([RAY_EXPORT, second_node]).decode())}
    tokens = families["vllm:generation_tokens"]
    assert tokens.type == "counter"
    assert [(s.name, s.value) for s in tokens.samples] == [("vllm:generation_tokens_total", 15.0)] * 2
    assert tokens.samples[0].labels == {"WorkerId": "w1", "engine": "r1", "model_name": "m"}  # Ray's own labels gone
    ttft = families["vllm:time_to_first_token_seconds"]
    assert {s.name for s in ttft.samples} == {"vllm:time_to_first_token_seconds" + x for x in ("_bucket", "_count", "_sum")}
    assert len(families["ray_serve_deployment_replica_healthy"].samples) == 2
    assert "ray_node_cpu_utilization" not in families  # only Conduit's, vLLM's and Serve's families
    # metrics nobody recorded yet are announced: a counter at 0, other kinds without samples
    assert set(VLLM) | set(CONDUIT) <= set(families)
    assert [(s.name, s.labels, s.value) for s in families["vllm:num_preemptions"].samples] == [
        ("vllm:num_preemptions_total", {}, 0.0)]
    assert families["vllm:num_requests_waiting"].samples == []


def test_access_line_has_the_fields_and_no_prompt_unless_asked():
    record = AccessRecord("abc", "POST", "/v1/completions", route="/v1/completions", model="m",
                          prompt_tokens=4, completion_tokens=7, finish_reasons=["length"], prompt="secret")
    record.first_output = record.started + 0.0123
    text, fields = record.line(200)
    assert text.startswith("request_id=abc method=POST route=/v1/completions model=m status=200 "
                           "prompt_tokens=4 completion_tokens=7 ttft_ms=12.3 total_ms=")
    assert text.endswith("finish_reason=length")
    assert "secret" not in text and "prompt" not in fields
    record.log_prompts, record.output_text = True, ["he", "llo"]
    text, fields = record.line(200)
    assert (fields["prompt"], fields["output"]) == ("secret", "hello")
    assert "prompt='secret' output='hello'" in text


def test_json_log_format_writes_the_access_fields_as_an_object():
    from ray._common.formatters import JSONFormatter

    text, fields = AccessRecord("abc", "GET", "/v1/models").line(404)
    record = logging.LogRecord("ray.serve", logging.INFO, __file__, 1, "access %s", (text,), None)
    record.access = fields  # what log.info(..., extra={"access": fields}) sets
    line = json.loads(JSONFormatter().format(record))
    assert line["access"]["request_id"] == "abc" and line["access"]["status"] == 404
    assert line["message"] == f"access {text}"


def test_logging_format_option_reaches_every_deployment():
    from app.build import build_app

    app = build_app({"models": [{"name": "m", "source": "/models/m"}], "logging": {"format": "json"}})
    ingress = app._bound_deployment
    _, tokenizer, models = ingress.init_args[:3]
    for deployment in (ingress, tokenizer._bound_deployment, models["m"]._bound_deployment):
        assert deployment.logging_config["encoding"] == "JSON", deployment.name
