"""LoRA metrics from `LLMEngine.lora_stats()` readings (app/metrics.py ModelMetrics.record_lora): vLLM's
info gauge (value = the reading's time, adapters comma-joined labels) and the slot loads and evictions as
increments of cumulative counts. What Ray's metrics receive is recorded here; tests/e2e/test_lora.py
covers the export."""

import time

from app import metrics


def test_info_gauge_and_counter_increments(monkeypatch):
    counted, gauges = [], []
    monkeypatch.setattr(metrics, "inc", lambda name, value, **tags: value > 0 and counted.append((name, value)))
    monkeypatch.setattr(metrics, "start_at_zero", lambda name, **tags: counted.append((name, 0)))
    monkeypatch.setattr(metrics, "ray_metric", lambda name: type("G", (), {
        "set": lambda self, value, tags: gauges.append((name, value, tags))})())
    m = metrics.ModelMetrics("demo", "r1", 16)
    counted.clear()
    readings = [
        {"running": ["a", "b"], "waiting": ["c"], "loaded": ["a", "b"], "max_lora": 2, "loads": 2, "evictions": 0},
        {"running": ["c"], "waiting": [], "loaded": ["b", "c"], "max_lora": 2, "loads": 3, "evictions": 1},
    ]
    before = time.time()
    for reading in readings:
        m.record_lora(reading)
    assert counted == [("conduit:lora_adapter_loads", 0), ("conduit:lora_adapter_loads", 2),
                       ("conduit:lora_adapter_evictions", 0),
                       ("conduit:lora_adapter_loads", 1), ("conduit:lora_adapter_evictions", 1)]
    (_, first, labels), (_, second, later) = gauges
    assert before <= first <= second <= time.time()
    assert labels == {"running_lora_adapters": "a,b", "waiting_lora_adapters": "c", "max_lora": "2",
                      "model_name": "demo", "engine": "r1"}
    assert (later["running_lora_adapters"], later["waiting_lora_adapters"]) == ("c", "")
