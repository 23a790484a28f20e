"""Autoscaling of the model deployment, with the same `autoscaling_config` keys serve_config.yaml
uses but short delays: load raises the replica count, and after the load stops it falls back, here
to zero (min_replicas: 0), from where one request brings a replica back.

The model is a second Serve application on the session's cluster, driven through its handle."""

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from ray import serve

from app.api.protocol import PreparedRequest
from app.config import ModelConfig
from app.engine.sampling_params import SamplingParams
from deployments.model import Model

pytestmark = pytest.mark.e2e
APP, DEPLOYMENT = "autoscale", "AutoscaledModel"
AUTOSCALING = {
    "min_replicas": 0,
    "initial_replicas": 1,
    "max_replicas": 2,
    # 2 of the test engine's 4 batch slots (serve_config.yaml uses 3/4 of 32)
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "downscale_to_zero_delay_s": 3,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
}


def running_replicas() -> int:
    deployment = serve.status().applications[APP].deployments[DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for(condition, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def complete(handle, max_tokens: int) -> int:
    request = PreparedRequest(uuid.uuid4().hex, "autoscale", [5, 6, 7, 8],
                              SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return sum(len(out.token_ids) for out in handle.options(stream=True).generate.remote(request))


def test_model_replicas_rise_under_load_then_fall_to_zero(server, model_path):
    config = ModelConfig(name="autoscale", source=model_path,
                         engine={"max_num_seqs": 4, "max_model_len": 256, "stream_interval_s": 0.05})
    deployment = Model.options(name=DEPLOYMENT, ray_actor_options={"num_cpus": 0.1},
                               max_ongoing_requests=8, autoscaling_config=AUTOSCALING)
    handle = serve.run(deployment.bind(config), name=APP, route_prefix=None)
    try:
        assert running_replicas() == 1
        stop = threading.Event()

        def keep_busy() -> None:
            while not stop.is_set():
                complete(handle, 64)

        with ThreadPoolExecutor(8) as pool:  # 8 ongoing requests against a target of 2 per replica
            workers = [pool.submit(keep_busy) for _ in range(8)]
            try:
                # a replica's start (a worker process, imports, the model, the kernel compile) took over
                # 60 s on a machine busy with other jobs
                rose = wait_for(lambda: running_replicas() == 2, 150)
            finally:
                stop.set()
            for worker in workers:
                worker.result(timeout=60)
        assert rose, f"the model deployment did not scale up under load: {serve.status().applications[APP]}"
        assert wait_for(lambda: running_replicas() == 0, 45), "it did not scale down after the load stopped"
        assert complete(handle, 4) == 4  # a request wakes the deployment from zero
        assert running_replicas() == 1
    finally:
        serve.delete(APP)
