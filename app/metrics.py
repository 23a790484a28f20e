"""Conduit's metrics, under vLLM's names, types, labels and buckets (so vLLM's dashboards and alerts
work unchanged), plus Conduit's own `conduit:` metrics for the stages in front of the engine.

How they travel:
- Every process records through Ray's metrics API (`ray.util.metrics`). Ray allows no `:` in a
  name, so `vllm:prompt_tokens` is recorded as `vllm_prompt_tokens` (vLLM's own Ray metrics wrapper
  does the same) and each node's Ray metrics agent exports it as `ray_vllm_prompt_tokens_total`.
  A cluster's Prometheus scrapes those agents and renames the series back
  (cluster/prometheus.yml: `ray_vllm_x` -> `vllm:x`, `ray_conduit_x` -> `conduit:x`).
- `GET /metrics` on the ingress (`scrape_cluster`, shared by concurrent GETs through `SharedScrape`)
  reads the same agents of every alive node and re-serves the Conduit, vLLM and Ray Serve families
  with those names restored (and no node addresses), so one box needs no Ray-specific set-up. Both
  paths show what Ray last exported: up to `metrics_report_interval_ms` (Ray's default 10 s) behind.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("ray.serve")

# vLLM's bucket boundaries (vllm/v1/metrics: TTFT, inter-token latency, request phase latencies)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Conduit's stages before the engine are milliseconds, not seconds
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

VLLM_LABELS = ("model_name", "engine")  # engine: the Serve replica that ran the request


@dataclass(frozen=True)
class Spec:
    name: str  # as Prometheus shows it; a counter's samples get "_total" appended
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = VLLM_LABELS
    buckets: tuple[float, ...] = ()

    @property
    def ray_name(self) -> str:
        return self.name.replace(":", "_")

    @property
    def exported_names(self) -> set[str]:
        """Every sample name Prometheus will store for this metric."""
        if self.kind == "counter":
            return {self.name + "_total"}
        if self.kind == "histogram":
            return {self.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        return {self.name}


def _h(name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = VLLM_LABELS) -> Spec:
    return Spec(name, "histogram", help, labels, buckets)


VLLM = {spec.name: spec for spec in [
    Spec("vllm:num_requests_running", "gauge", "Number of requests in model execution batches."),
    Spec("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    Spec("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    Spec("vllm:prefix_cache_queries", "counter",
         "Prefix cache queries, in terms of number of queried tokens (Conduit: whole blocks looked up)."),
    Spec("vllm:prefix_cache_hits", "counter", "Prefix cache hits, in terms of number of cached tokens."),
    Spec("vllm:num_preemptions", "counter", "Cumulative number of preemption from the engine."),
    Spec("vllm:spec_decode_num_drafts", "counter", "Number of spec decoding drafts."),
    Spec("vllm:spec_decode_num_draft_tokens", "counter", "Number of draft tokens."),
    Spec("vllm:spec_decode_num_accepted_tokens", "counter", "Number of accepted tokens."),
    Spec("vllm:spec_decode_num_accepted_tokens_per_pos", "counter", "Accepted tokens per draft position.",
         VLLM_LABELS + ("position",)),
    Spec("vllm:prompt_tokens", "counter", "Number of prefill tokens processed."),
    Spec("vllm:generation_tokens", "counter", "Number of generation tokens processed."),
    Spec("vllm:request_success", "counter", "Count of successfully processed requests.",
         VLLM_LABELS + ("finished_reason",)),
    _h("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS),
    _h("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS),
    _h("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
       ITL_BUCKETS),
    _h("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS),
    _h("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
       REQUEST_LATENCY_BUCKETS),
    _h("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
       REQUEST_LATENCY_BUCKETS),
    _h("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
       REQUEST_LATENCY_BUCKETS),
    _h("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
       REQUEST_LATENCY_BUCKETS),
    Spec("vllm:lora_requests_info", "gauge", "Running stats on lora requests.",
         VLLM_LABELS + ("running_lora_adapters", "waiting_lora_adapters", "max_lora")),
]}

CONDUIT = {spec.name: spec for spec in [
    Spec("conduit:http_requests", "counter", "HTTP requests answered by the ingress, by route and status.",
         ("route", "status")),
    Spec("conduit:request_errors", "counter", "Requests answered with an error status (4xx/5xx), by status.",
         ("route", "model_name", "status")),
    _h("conduit:tokenizer_latency_seconds", "Time of the tokenizer stage as the ingress sees it (one Ray hop).",
       STAGE_BUCKETS, ("model_name",)),
    _h("conduit:router_latency_seconds", "Time the prefix-affinity router takes to rank a model's replicas.",
       STAGE_BUCKETS, ("deployment",)),
    _h("conduit:time_to_first_token_seconds",
       "Time to first token at the ingress: tokenizer, routing, queue, prefill and the hops back.",
       TTFT_BUCKETS, ("model_name", "route")),
    _h("conduit:e2e_request_latency_seconds", "Whole request at the ingress, until the last byte was sent.",
       REQUEST_LATENCY_BUCKETS, ("model_name", "route")),
    Spec("conduit:model_load_progress", "gauge",
         "A model replica's loading: finished stages / all stages (1 once it serves)."),
    Spec("conduit:num_requests_running_by_class", "gauge", "Requests in model execution batches, by priority class.",
         VLLM_LABELS + ("priority_class",)),
    Spec("conduit:num_requests_waiting_by_class", "gauge", "Requests waiting to be processed, by priority class.",
         VLLM_LABELS + ("priority_class",)),
    Spec("conduit:num_requests_running_by_key", "gauge",
         "Requests in model execution batches, by API key id (a sha256 prefix).", VLLM_LABELS + ("key",)),
    Spec("conduit:num_requests_waiting_by_key", "gauge",
         "Requests waiting to be processed, by API key id (a sha256 prefix).", VLLM_LABELS + ("key",)),
    Spec("conduit:lora_adapter_loads", "counter",
         "LoRA adapters installed into an engine slot (a first use, or a reload after eviction)."),
    Spec("conduit:lora_adapter_evictions", "counter",
         "LoRA adapters evicted from an engine slot to make room (least recently used first)."),
    Spec("conduit:preemptions", "counter",
         "Preemptions by cause: kv_cache (no free block), priority (a better class waited), fair_share (a key "
         "below its share waited).", VLLM_LABELS + ("cause",)),
]}
PRIORITY_CLASSES = ("interactive", "standard", "batch")  # app/qos.py's CLASSES (no import: the ingress loads this)
PREEMPTION_CAUSES = ("kv_cache", "priority", "fair_share")  # the engine scheduler's
FINISHED_REASONS = ("stop", "length", "abort", "error")
# EngineStats.spec's fields (app/engine/spec/stats.py) -> their metrics
SPEC_COUNTERS = {"num_drafts": "vllm:spec_decode_num_drafts", "num_draft_tokens": "vllm:spec_decode_num_draft_tokens",
                 "num_accepted_tokens": "vllm:spec_decode_num_accepted_tokens"}
SPEC_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"

# Ray Serve's own metric the dashboard counts replicas with (exported under this name by Ray)
SERVE_REPLICA_HEALTHY = "ray_serve_deployment_replica_healthy"


def exported_metric_names() -> set[str]:
    """Every sample name the server exports, as PromQL refers to it."""
    names = {SERVE_REPLICA_HEALTHY}
    for spec in [*VLLM.values(), *CONDUIT.values()]:
        names |= spec.exported_names
    return names


# recording (inside Ray processes) ---------------------------------------------------------------
_ray_metrics: dict[str, object] = {}
_ray_metrics_lock = threading.Lock()


def ray_metric(name: str):
    """The process's `ray.util.metrics` object for one spec (created once per process)."""
    with _ray_metrics_lock:
        if name not in _ray_metrics:
            from ray.util import metrics

            spec = VLLM.get(name) or CONDUIT[name]
            if spec.kind == "counter":
                metric = metrics.Counter(spec.ray_name, spec.help, spec.labels)
            elif spec.kind == "gauge":
                metric = metrics.Gauge(spec.ray_name, spec.help, spec.labels)
            else:
                metric = metrics.Histogram(spec.ray_name, spec.help, list(spec.buckets), spec.labels)
            _ray_metrics[name] = metric
        return _ray_metrics[name]


def inc(name: str, value: float, **tags: str) -> None:
    if value > 0:  # Ray's counters refuse 0
        ray_metric(name).inc(value, tags=tags)


def start_at_zero(name: str, **tags: str) -> None:
    """A counter's series at 0 before its first event (as vLLM starts its own), so that dashboards show
    0 rather than no data and `rate()` sees the first increase. Ray's `Counter.inc` refuses 0; `_record`,
    which it calls, takes it."""
    ray_metric(name)._record(0, tags=tags)


def observe(name: str, value: float, **tags: str) -> None:
    ray_metric(name).observe(value, tags=tags)


class Deferred:
    """Counter increments and histogram observations made on a serving path, written to Ray by a
    thread of their own every `interval_s`. Ray's record call releases the GIL: made on an event
    loop, each one handed the GIL to another thread (a model replica's engine, Serve's router loop)
    and waited to get it back (measured in a Ray worker beside a busy Python thread: ~0.8 ms a call,
    against 3.5 us alone): a model replica made two per streamed token and eight per request while
    every stream's next delta and every arriving request waited. Appending here never releases it.
    Increments are summed per series before they are written."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self._records: deque[tuple[bool, str, float, dict[str, str]]] = deque()  # (is an increment, ...)
        self._writer: threading.Thread | None = None
        self._lock = threading.Lock()

    def inc(self, name: str, value: float, **tags: str) -> None:
        self._append((True, name, value, tags))

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._append((False, name, value, tags))

    def _append(self, record: tuple) -> None:
        self._records.append(record)
        if self._writer is None:
            with self._lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_forever, name="conduit-metrics-writer",
                                                    daemon=True)
                    self._writer.start()

    def _write_forever(self) -> None:
        while True:
            time.sleep(self.interval_s)
            try:
                self.flush()
            except Exception:  # a metrics hiccup must never take the process down
                log.exception("writing metrics failed")

    def flush(self) -> None:
        """Writes what has been recorded so far."""
        sums: dict[tuple[str, tuple], float] = {}
        while self._records:
            is_inc, name, value, tags = self._records.popleft()
            if is_inc:
                series = (name, tuple(tags.items()))
                sums[series] = sums.get(series, 0) + value
            else:
                observe(name, value, **tags)
        for (name, tags), value in sums.items():
            inc(name, value, **dict(tags))


deferred = Deferred()  # the process's: what its serving path records


class LoadProgress:
    """A model replica's loading, stage by stage: a log line per stage (with the time so far) and the
    `conduit:model_load_progress` gauge, which `conduit status` shows while the replica starts.
    (Ray Serve 2.60 gives a replica no way to set the message `serve status` prints for it.)"""

    def __init__(self, model_name: str, replica: str, stages: list[str]):
        self.model_name, self.stages = model_name, stages
        self.tags = {"model_name": model_name, "engine": replica}
        self.started = time.monotonic()
        self.done_stages = 0

    def stage(self, name: str) -> None:
        """Stage `name` begins (every earlier stage is done)."""
        self.done_stages = self.stages.index(name)
        log.info("model %s: loading %d/%d: %s (%.1f s so far)", self.model_name, self.done_stages + 1,
                 len(self.stages), name, time.monotonic() - self.started)
        ray_metric("conduit:model_load_progress").set(self.done_stages / len(self.stages), tags=self.tags)

    def finished(self) -> None:
        log.info("model %s: loaded in %.1f s", self.model_name, time.monotonic() - self.started)
        ray_metric("conduit:model_load_progress").set(1.0, tags=self.tags)


class ModelMetrics:
    """A model replica's vLLM metrics: per token and per request from the engine's outputs (through
    `deferred`), per interval from `LLMEngine.stats()` (read by a background thread)."""

    def __init__(self, model_name: str, replica: str, block_size: int):
        self.tags = {"model_name": model_name, "engine": replica}
        self.block_size = block_size  # the engine counts prefix lookups in blocks, vLLM in tokens
        self._last_counters = {"vllm:prefix_cache_queries": 0, "vllm:prefix_cache_hits": 0, "vllm:num_preemptions": 0}
        self._last_preemptions = dict.fromkeys(PREEMPTION_CAUSES, 0)
        self._last_spec: dict[str, int] | None = None  # speculative decoding's counters, once the engine has them
        self._last_accepted_per_pos: list[int] = []
        self._last_lora: dict[str, int] = {}  # LoRA slot loads and evictions so far
        for name in [*self._last_counters, "vllm:prompt_tokens", "vllm:generation_tokens"]:
            start_at_zero(name, **self.tags)
        for reason in FINISHED_REASONS:
            start_at_zero("vllm:request_success", finished_reason=reason, **self.tags)
        for cause in PREEMPTION_CAUSES:
            start_at_zero("conduit:preemptions", cause=cause, **self.tags)

    async def track(self, request_id: str, stream: AsyncIterator) -> AsyncIterator:
        """Pass a request's stream of deltas through, recording them; logs its start and end."""
        started, finished, first = time.monotonic(), False, True
        try:
            async for out in stream:
                if first:
                    log.info("request %s: started, %d prompt tokens", request_id, out.num_prompt_tokens)
                self.delta(out, first)
                first, finished = False, out.finished
                yield out
        finally:
            if finished:
                log.info("request %s: finished (%s), %d tokens in %.3f s", request_id, out.finish_reason,
                         out.num_output_tokens, time.monotonic() - started)
            else:
                self.aborted()
                log.info("request %s: aborted after %.3f s", request_id, time.monotonic() - started)

    def delta(self, out, first: bool) -> None:
        """One streamed delta (RequestOutput) of a request; `first`: the request's first delta."""
        if first:
            deferred.inc("vllm:prompt_tokens", out.num_prompt_tokens, **self.tags)
        deferred.inc("vllm:generation_tokens", len(out.token_ids), **self.tags)
        for gap in out.itl:
            deferred.observe("vllm:inter_token_latency_seconds", gap, **self.tags)
        if out.finished:
            self._finished(out)

    def _finished(self, out) -> None:
        t = out.timings
        deferred.inc("vllm:request_success", 1, finished_reason=out.finish_reason, **self.tags)
        deferred.observe("vllm:time_to_first_token_seconds", t.first_token - t.arrival, **self.tags)
        deferred.observe("vllm:e2e_request_latency_seconds", t.last_token - t.arrival, **self.tags)
        deferred.observe("vllm:request_queue_time_seconds", t.first_scheduled - t.arrival, **self.tags)
        deferred.observe("vllm:request_prefill_time_seconds", t.first_token - t.first_scheduled, **self.tags)
        deferred.observe("vllm:request_decode_time_seconds", t.last_token - t.first_token, **self.tags)
        deferred.observe("vllm:request_inference_time_seconds", t.last_token - t.first_scheduled, **self.tags)
        if out.num_output_tokens > 1:
            tpot = (t.last_token - t.first_token) / (out.num_output_tokens - 1)
            deferred.observe("vllm:request_time_per_output_token_seconds", tpot, **self.tags)

    def aborted(self) -> None:
        """The client went away (or the request failed) before the engine finished it."""
        deferred.inc("vllm:request_success", 1, finished_reason="abort", **self.tags)

    def record_stats(self, stats) -> None:
        """One `EngineStats` reading: gauges set, cumulative engine counters turned into increments."""
        ray_metric("vllm:num_requests_running").set(stats.num_running, tags=self.tags)
        ray_metric("vllm:num_requests_waiting").set(stats.num_waiting, tags=self.tags)
        usage = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        ray_metric("vllm:kv_cache_usage_perc").set(usage, tags=self.tags)
        # the engine runs, so loading is done; re-set every interval because Ray's export drops a
        # gauge series left unset for a while (seen: gone ~10 min after start)
        ray_metric("conduit:model_load_progress").set(1.0, tags=self.tags)
        current = {
            "vllm:prefix_cache_queries": stats.prefix_queries * self.block_size,
            "vllm:prefix_cache_hits": stats.prefix_hits * self.block_size,
            "vllm:num_preemptions": stats.num_preemptions,
        }
        for name, value in current.items():
            inc(name, value - self._last_counters[name], **self.tags)
        self._last_counters = current
        self._record_scheduling(stats)
        if getattr(stats, "spec", None) is not None:
            self._record_spec(stats.spec)

    def _record_spec(self, spec) -> None:
        """Speculative decoding's cumulative counters (app/engine/spec/stats.py) as increments; each series
        starts at 0 on the engine's first reading (a position's, when a draft first reaches it)."""
        if self._last_spec is None:
            self._last_spec = dict.fromkeys(SPEC_COUNTERS, 0)
            for field in SPEC_COUNTERS:
                start_at_zero(SPEC_COUNTERS[field], **self.tags)
        for field, last in self._last_spec.items():
            inc(SPEC_COUNTERS[field], getattr(spec, field) - last, **self.tags)
            self._last_spec[field] = getattr(spec, field)
        for j, value in enumerate(spec.accepted_per_position):
            if j >= len(self._last_accepted_per_pos):
                start_at_zero(SPEC_PER_POSITION, position=str(j), **self.tags)
                last = 0
            else:
                last = self._last_accepted_per_pos[j]
            inc(SPEC_PER_POSITION, value - last, position=str(j), **self.tags)
        self._last_accepted_per_pos = list(spec.accepted_per_position)

    def _record_scheduling(self, stats) -> None:
        """Running and waiting by priority class and by key, and preemptions by cause."""
        for cls in PRIORITY_CLASSES:
            tags = {"priority_class": cls, **self.tags}
            ray_metric("conduit:num_requests_running_by_class").set(stats.running_by_class.get(cls, 0), tags=tags)
            ray_metric("conduit:num_requests_waiting_by_class").set(stats.waiting_by_class.get(cls, 0), tags=tags)
        for key in stats.keys_seen:  # every key that sent work here, 0 when it has none now
            tags = {"key": key or "none", **self.tags}
            ray_metric("conduit:num_requests_running_by_key").set(stats.running_by_key.get(key, 0), tags=tags)
            ray_metric("conduit:num_requests_waiting_by_key").set(stats.waiting_by_key.get(key, 0), tags=tags)
        for cause, count in stats.preemptions_by_cause.items():
            inc("conduit:preemptions", count - self._last_preemptions.get(cause, 0), cause=cause, **self.tags)
        self._last_preemptions = dict(stats.preemptions_by_cause)

    def record_lora(self, lora: dict) -> None:
        """One `LLMEngine.lora_stats()` reading: vLLM's info gauge (the value is the time of the reading,
        the adapters are comma-joined labels, as vLLM has it) and the slot loads and evictions."""
        labels = {"running_lora_adapters": ",".join(lora["running"]),
                  "waiting_lora_adapters": ",".join(lora["waiting"]), "max_lora": str(lora["max_lora"])}
        ray_metric("vllm:lora_requests_info").set(time.time(), tags={**labels, **self.tags})
        current = {"conduit:lora_adapter_loads": lora["loads"], "conduit:lora_adapter_evictions": lora["evictions"]}
        for name, value in current.items():
            if name not in self._last_lora:  # the first reading: the series starts at 0
                start_at_zero(name, **self.tags)
            inc(name, value - self._last_lora.get(name, 0), **self.tags)
        self._last_lora = current

    def poll(self, read_stats, read_lora=None, interval_s: float = 1.0) -> threading.Thread:
        """Record `read_stats()` (and `read_lora()`, for a model serving LoRA adapters) every
        `interval_s` in a daemon thread."""

        def loop() -> None:
            while True:
                try:
                    self.record_stats(read_stats())
                    if read_lora is not None:
                        self.record_lora(read_lora())
                except Exception:  # a metrics hiccup must never take the replica down
                    log.exception("reading engine stats for metrics failed")
                time.sleep(interval_s)

        thread = threading.Thread(target=loop, name="conduit-metrics", daemon=True)
        thread.start()
        return thread


# re-serving: GET /metrics on the ingress ----------------------------------------------------------
# labels Ray adds that say nothing about Conduit (WorkerId stays: it keeps two processes' series
# apart), and the ones holding a node's internal IP address, which /metrics must not show
RAY_ONLY_LABELS = {"Component", "SessionName", "Version", "otel_scope_name", "otel_scope_schema_url", "otel_scope_version",
                   "NodeAddress", "node_ip_address"}


def published_name(ray_family: str) -> str | None:
    """The name a family exported by Ray is published under, or None if /metrics leaves it out."""
    if ray_family.startswith("ray_serve_"):
        return ray_family
    for prefix in ("vllm", "conduit"):
        if ray_family.startswith(f"ray_{prefix}_"):
            return f"{prefix}:{ray_family[len(prefix) + 5:]}"
    return None


def republish(exports: list[str]):
    """Ray metrics-agent texts (one per node) -> the families /metrics serves, with vLLM's and
    Conduit's names restored; metrics not recorded yet are announced with no samples."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for text in exports:
        for family in text_string_to_metric_families(text):
            name = published_name(family.name)
            if name is None:
                continue
            out = families.setdefault(name, Metric(name, family.documentation, family.type))
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k not in RAY_ONLY_LABELS}
                out.add_sample(name + sample.name[len(family.name):], labels, sample.value)
    for spec in [*VLLM.values(), *CONDUIT.values()]:
        family = families.setdefault(spec.name, Metric(spec.name, spec.help, spec.kind))
        if spec.kind == "counter" and not family.samples:  # nothing counted yet anywhere: 0, not absent
            family.add_sample(spec.name + "_total", {}, 0.0)
    return list(families.values())


def render(exports: list[str]) -> bytes:
    """The Prometheus text exposition of `republish(exports)`, written by prometheus_client."""
    from prometheus_client import CollectorRegistry, generate_latest

    class Snapshot:
        def collect(self):
            return republish(exports)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)


def _exporter_urls() -> list[str]:
    """Every alive node's Ray metrics agent; this node's on loopback (it listens on all addresses)."""
    import ray

    here = ray.util.get_node_ip_address()
    urls = []
    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            host = "127.0.0.1" if node["NodeManagerAddress"] == here else node["NodeManagerAddress"]
            urls.append(f"http://{host}:{node['MetricsExportPort']}/metrics")
    return urls


async def scrape_cluster(timeout_s: float = 5.0) -> bytes:
    """What GET /metrics serves: every node's Ray metrics, republished (see `render`)."""
    import httpx

    urls = await asyncio.to_thread(_exporter_urls)

    async def fetch(client: httpx.AsyncClient, url: str) -> str:
        try:
            response = await client.get(url)
            response.raise_for_status()
            return response.text
        except httpx.HTTPError as e:  # one unreachable node must not hide the others
            log.warning("metrics: could not read %s: %s", url, e)
            return ""

    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
        exports = await asyncio.gather(*(fetch(client, url) for url in urls))
    return await asyncio.to_thread(render, list(exports))  # parsing thousands of lines: off the event loop


SCRAPE_CACHE_S = 1.0


class SharedScrape:
    """What GET /metrics serves, shared: one `scrape` in flight at a time, its result reused for
    `ttl_s` after it finishes, so a loop of GETs costs the cluster (and the ingress's event loop,
    which streams replies) one scrape per `ttl_s` however many clients ask."""

    def __init__(self, ttl_s: float = SCRAPE_CACHE_S, scrape=scrape_cluster):
        self.ttl_s, self.scrape = ttl_s, scrape
        self.latest: asyncio.Task | None = None
        self.finished_at = -math.inf

    async def get(self) -> bytes:
        now = asyncio.get_running_loop().time()
        if self.latest is None or (self.latest.done() and now - self.finished_at > self.ttl_s):
            self.latest = asyncio.create_task(self._scrape())
        return await asyncio.shield(self.latest)  # a client that leaves does not cancel the others' scrape

    async def _scrape(self) -> bytes:
        try:
            return await self.scrape()
        finally:
            self.finished_at = asyncio.get_running_loop().time()
