"""A model replica whose engine loop has died fails its health check, and Serve replaces it.

The replica is the real `Model` deployment class, with one test-only method that breaks its engine
(a step that raises), deployed as a second application on the session's cluster."""

import sys
import time

import pytest
import ray.cloudpickle
from ray import serve

from app.config import ModelConfig
from app.engine.async_engine import EngineDeadError
from app.engine.sampling_params import SamplingParams
from deployments.model import Model

pytestmark = pytest.mark.e2e
APP = "health-check"
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # replicas cannot import tests/


class BreakableModel(Model.func_or_class):
    async def break_engine_loop(self) -> str:
        """Make the next step raise, then give the loop a request so it runs one and dies."""

        def broken_step():
            raise RuntimeError("engine broken on purpose by the test")

        self.engine.engine.step = broken_step
        try:
            async for _ in self.engine.generate("kill", [5, 6, 7], SamplingParams(max_tokens=2)):
                pass
        except EngineDeadError:  # the stream hears that the loop died
            return serve.get_replica_context().replica_id.unique_id
        raise AssertionError("the broken engine still answered")

    async def replica_id(self) -> str:
        return serve.get_replica_context().replica_id.unique_id


def deployment_status() -> str:
    return serve.status().applications[APP].deployments[BreakableModel.__name__].status


def test_dead_engine_loop_fails_health_check_and_is_replaced(server, model_path):
    config = ModelConfig(name="health", source=model_path, engine={"max_num_seqs": 2, "max_model_len": 128})
    deployment = serve.deployment(BreakableModel, ray_actor_options={"num_cpus": 0.1},
                                  health_check_period_s=1, health_check_timeout_s=10)
    handle = serve.run(deployment.bind(config), name=APP, route_prefix=None)
    try:
        handle.check_health.remote().result(timeout_s=30)  # a healthy replica passes
        broken = handle.break_engine_loop.remote().result(timeout_s=30)
        with pytest.raises(EngineDeadError, match="engine loop died"):
            handle.check_health.remote().result(timeout_s=30)
        deadline = time.monotonic() + 90
        replica = broken
        while time.monotonic() < deadline and replica == broken:
            time.sleep(1)
            try:
                replica = handle.replica_id.remote().result(timeout_s=10)
            except Exception:  # the dead replica may still be picked while it is being removed
                pass
        assert replica != broken, "Serve did not replace the replica whose engine died"
        handle.check_health.remote().result(timeout_s=30)
        while time.monotonic() < deadline and deployment_status() != "HEALTHY":
            time.sleep(1)
        assert deployment_status() == "HEALTHY"
    finally:
        serve.delete(APP)
