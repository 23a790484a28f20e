"""A flood that arrives between two engine steps is held to its key's share of the queue (issue 17):
requests let in but not yet added by the engine thread count as waiting (AsyncEngine.admit). Before,
every request posted within one step passed the check, since none was in a queue yet."""

import asyncio

import pytest

from app.config import EngineConfig
from app.engine.async_engine import AsyncEngine
from app.engine.engine import LLMEngine
from app.engine.errors import QueueFull
from app.engine.sampling_params import SamplingParams


@pytest.fixture
def engine(hf_model):
    model, tokenizer = hf_model
    config = EngineConfig(max_num_seqs=1, max_model_len=128, num_kv_blocks=32, max_waiting=4).resolved(1024)
    return AsyncEngine(LLMEngine(model, tokenizer, config))


def test_requests_let_in_within_one_step_count_against_the_keys_share(engine):
    # the engine thread has not run: as between two steps, nothing is in the scheduler's queues yet
    flood = [engine.admit("a") for _ in range(5)]  # one for the free batch slot; alone, "a" may hold all 4 places
    with pytest.raises(QueueFull, match="queue is full"):
        engine.admit("a")
    other = engine.admit("b")  # another key still gets in: "a" filled the queue, not twice it
    flood[0]()
    flood[0]()  # a release is idempotent: one request frees one place
    again = engine.admit("a")
    with pytest.raises(QueueFull):
        engine.admit("a")
    for release in [*flood[1:], other, again]:
        release()
    assert engine._arriving == {}


def test_a_request_the_engine_has_added_no_longer_counts_as_arriving(engine):
    async def main():
        admitted = engine.admit("a")
        assert engine._arriving == {"a": 1}
        outs = [o async for o in engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True),
                                                 tenant="a", admitted=admitted)]
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and engine._arriving == {}
