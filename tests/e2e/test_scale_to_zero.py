"""Scale to zero: a model deployment with `autoscaling_config.min_replicas: 0` goes 1 -> 0 replicas
when idle, and the next request waits for the cold start and succeeds.

Runs as a second Serve application (own name and route prefix) on the shared test cluster, so the
short downscale delay touches nothing else."""

import time

import pytest
from openai import OpenAI

from tests.e2e.conftest import MODEL

# a 2 s look-back keeps the test short; Ray warns it is below the deprecated metrics_interval_s
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")]
APP, PREFIX = "conduit-s2z", "/s2z"
DEPLOYMENT = "Model-" + MODEL
SCALE_TO_ZERO = {
    "min_replicas": 0,
    "initial_replicas": 1,  # start warm, so the test sees 1 -> 0
    "max_replicas": 1,
    "target_ongoing_requests": 1,
    "downscale_delay_s": 2,
    "look_back_period_s": 2,  # idle means: no request in the last 2 s
}


def replicas() -> dict:
    from ray import serve

    return serve.status().applications[APP].deployments[DEPLOYMENT].replica_states


def wait_until_no_replicas(timeout_s: float) -> float:
    """Until the last replica is gone, not merely stopping (a request sent while it stops waits
    for the handle's next periodic metrics push before the autoscaler hears of it)."""
    started = time.monotonic()
    while sum(replicas().values()):
        assert time.monotonic() - started < timeout_s, f"{DEPLOYMENT} did not scale to zero: {replicas()}"
        time.sleep(0.5)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def scaled_app(server, model_path):
    from ray import serve

    from app.build import build_app
    from app.config import deployment_name
    from tests.e2e.variants import with_options

    args = {"models": [{"name": MODEL, "source": model_path, "engine": {"max_num_seqs": 2, "max_model_len": 128}}]}
    # no logical CPU: the shared cluster's are all taken by the main app (the replica still gets a thread)
    options = {deployment_name("Model", MODEL): {"autoscaling_config": SCALE_TO_ZERO, "ray_actor_options": {"num_cpus": 0}}}
    serve.run(with_options(build_app(args), options), name=APP, route_prefix=PREFIX)
    yield OpenAI(base_url=f"{server}{PREFIX}/v1", api_key="unused", max_retries=0, timeout=120)
    serve.delete(APP)


def complete(client: OpenAI):
    return client.completions.create(model=MODEL, prompt="alpha beta", max_tokens=8, temperature=0,
                                     extra_body={"min_tokens": 8})


def test_idle_scales_to_zero_and_cold_start_serves(scaled_app, client):
    expected = complete(client).choices[0].text  # the main app's answer: same weights, greedy
    assert replicas() == {"RUNNING": 1}
    assert complete(scaled_app).choices[0].text == expected  # warm

    idle_s = wait_until_no_replicas(timeout_s=90)
    print(f"\nscaled 1 -> 0 after {idle_s:.1f} s idle")

    started = time.monotonic()
    cold = complete(scaled_app)  # waits in the ingress's handle while the replica starts
    cold_start_s = time.monotonic() - started
    print(f"request served from zero replicas in {cold_start_s:.2f} s (cold start)")
    assert cold.choices[0].text == expected
    assert cold.usage.completion_tokens == 8
    assert replicas() == {"RUNNING": 1}
