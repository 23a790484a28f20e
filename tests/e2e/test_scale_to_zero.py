"""Scale to zero: a model deployment with `autoscaling_config.min_replicas: 0` goes 1 -> 0 replicas
when idle, and the next request waits for the cold start and succeeds; one whose deadline passes
during the cold start gets Bedrock's ModelNotReadyException through boto3.

Runs as a second Serve application (own name and route prefix) on the shared test cluster, so the
short downscale delay touches nothing else."""

import time

import boto3
import pytest
from botocore.config import Config
from openai import OpenAI

from app.bench import deployment_replicas, wait_for_zero
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
    """Until the last replica is gone (as `conduit bench --cold-start` waits), not merely stopping."""
    from ray import serve

    return wait_for_zero(lambda: deployment_replicas(serve.status(), APP, DEPLOYMENT), timeout_s)


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


def test_deadline_during_cold_start_raises_model_not_ready(scaled_app, server):
    bedrock = boto3.client("bedrock-runtime", endpoint_url=f"{server}{PREFIX}", region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="y",
                           config=Config(retries={"total_max_attempts": 1}))  # boto3 would retry it itself

    def short_deadline(request, **_):  # a client may shorten its deadline by header
        request.headers["x-request-timeout"] = "1"

    bedrock.meta.events.register("before-sign.bedrock-runtime.*", short_deadline)
    wait_until_no_replicas(timeout_s=90)
    messages = [{"role": "user", "content": [{"text": "alpha beta"}]}]
    config = {"maxTokens": 4, "temperature": 0}
    # the first call starts the replica (~10 s here); the second comes while it is still starting
    for call in (bedrock.converse, bedrock.converse_stream):
        with pytest.raises(bedrock.exceptions.ModelNotReadyException, match="not ready") as raised:
            call(modelId=MODEL, messages=messages, inferenceConfig=config)
        assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert not replicas().get("RUNNING")

    bedrock.meta.events.unregister("before-sign.bedrock-runtime.*", short_deadline)
    res = bedrock.converse(modelId=MODEL, messages=messages, inferenceConfig=config)  # the retry
    assert res["usage"]["outputTokens"] >= 1
