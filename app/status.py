"""`conduit status`: what a running cluster serves, from Ray Serve's own status (applications,
deployments, replicas) and the per-replica engine gauges every model replica exports (the same
numbers GET /metrics serves: running, waiting, KV-cache usage, loading progress)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from app.metrics import scrape_cluster

REPLICA_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv",
    "conduit:model_load_progress": "loaded",
    # counters: acceptance, where speculative decoding runs
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}


def replica_gauges(exposition: str) -> dict[tuple[str, str], dict[str, float]]:
    """(model, replica) -> its latest engine gauges, from a /metrics text."""
    replicas: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(exposition):
        key = REPLICA_GAUGES.get(family.name.removesuffix("_total"))  # a counter's family may keep its _total
        for sample in family.samples if key else ():
            # a counter that never counted is republished without labels: no replica's reading
            if sample.name.endswith("_created") or not {"model_name", "engine"} <= sample.labels.keys():
                continue
            replicas[(sample.labels["model_name"], sample.labels["engine"])][key] = sample.value
    return dict(replicas)


def collect(address: str):
    """Serve's status and the replicas' gauges, read as a driver of the cluster at `address`."""
    import ray
    from ray import serve

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        return serve.status(), replica_gauges(asyncio.run(scrape_cluster()).decode())
    finally:
        ray.shutdown()


def _states(replica_states: dict) -> str:
    return ", ".join(f"{n} {getattr(state, 'value', state)}" for state, n in sorted(replica_states.items())) or "-"


def render(status, replicas: dict[tuple[str, str], dict[str, float]], console: Console) -> None:
    deployments = Table(title="Deployments")
    for column in ("application", "deployment", "status", "replicas", "message"):
        deployments.add_column(column)
    for app_name, app in status.applications.items():
        for name, dep in app.deployments.items():
            deployments.add_row(app_name, name, str(getattr(dep.status, "value", dep.status)),
                                _states(dep.replica_states), dep.message or app.message or "")
    console.print(deployments)

    models = Table(title="Model replicas (as of Ray's last metrics report)")
    for column, justify in (("model", "left"), ("replica", "left"), ("running", "right"), ("waiting", "right"),
                            ("KV cache", "right"), ("loaded", "right"), ("spec accept", "right")):
        models.add_column(column, justify=justify)
    for (model, replica), gauges in sorted(replicas.items()):
        def cell(key: str, fmt: str) -> str:
            return fmt.format(gauges[key]) if key in gauges else "-"

        models.add_row(model, replica, cell("running", "{:.0f}"), cell("waiting", "{:.0f}"),
                       cell("kv", "{:.1%}"), cell("loaded", "{:.0%}"), _acceptance(gauges))
    console.print(models if replicas else "[yellow]no model replica has reported metrics yet[/yellow]")


def _acceptance(gauges: dict[str, float]) -> str:
    """Draft tokens accepted / verified, and tokens per verified draft (vLLM's two figures); "-" where
    speculative decoding is off or has not drafted yet."""
    if not gauges.get("draft_tokens"):
        return "-"
    rate = gauges.get("accepted_tokens", 0) / gauges["draft_tokens"]
    length = 1 + gauges.get("accepted_tokens", 0) / gauges["drafts"] if gauges.get("drafts") else 0
    return f"{rate:.0%} ({length:.2f} tok/draft)"
