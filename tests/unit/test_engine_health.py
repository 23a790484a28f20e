"""`AsyncEngine.check_health` (what the model replica's `check_health` calls, so Ray replaces a
replica whose engine loop died or hangs), with a stub engine in place of the model."""

import asyncio
import threading

import pytest

from app.engine.async_engine import AsyncEngine, EngineDeadError
from app.engine.sampling_params import SamplingParams


class StubEngine:
    """Takes requests; each step fails, or blocks until released (a hung kernel)."""

    def __init__(self, fail: bool):
        self.fail, self.waiting, self.release = fail, [], threading.Event()

    def add_request(self, request_id, prompt_ids, params, priority=0, tenant="", lora=None):
        self.waiting.append(request_id)

    def abort_request(self, request_id):
        if request_id in self.waiting:
            self.waiting.remove(request_id)

    def has_work(self):
        return bool(self.waiting)

    def step(self):
        if self.fail:
            raise RuntimeError("CUDA error: device-side assert")
        self.release.wait()
        self.waiting.clear()  # then idle: the thread sleeps instead of spinning
        return []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread's death
def test_dead_engine_loop_fails_health_and_the_waiting_stream():
    async def run():
        engine = AsyncEngine(StubEngine(fail=True))
        engine.check_health(60)  # not started yet: healthy
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("r1", [1, 2], SamplingParams(max_tokens=4)):
                pass
        with pytest.raises(EngineDeadError, match="died"):
            engine.check_health(60)

    asyncio.run(run())


def test_stalled_engine_fails_health():
    async def run():
        stub = StubEngine(fail=False)
        engine = AsyncEngine(stub)
        stream = engine.generate("r1", [1, 2], SamplingParams(max_tokens=4))
        task = asyncio.create_task(anext(stream))
        await asyncio.sleep(0.2)
        engine.check_health(60)  # a long step is not yet a stall
        with pytest.raises(EngineDeadError, match="stalled"):
            engine.check_health(0.1)
        stub.release.set()
        task.cancel()

    asyncio.run(run())
