"""Tensor parallel on CPU: two gloo ranks (Ray actors) must give the same greedy tokens as one
process, through the same engine (batching, slot moves, prefix-cache reuse)."""

import random

import pytest
import ray

from app.config import ModelConfig
from app.engine.engine import LLMEngine
from app.engine.sampling_params import SamplingParams
from app.loading import build_engine

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_up():
    """Reuses the session's Ray when another test started it; the TP workers ask for no CPU."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def make_engine(model_path: str, tensor_parallel_size: int) -> LLMEngine:
    engine = {"max_num_seqs": 4, "max_model_len": 256, "tensor_parallel_size": tensor_parallel_size, "num_threads": 1}
    return build_engine(ModelConfig(name="tp", source=model_path, engine=engine), "cpu")


def generate_all(engine: LLMEngine, requests: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
    """More requests than batch slots, with different lengths: slots free up and get moved."""
    for request_id, (prompt, max_tokens) in requests.items():
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    outputs: dict[str, list[int]] = {}
    for _ in range(2_000):
        if not engine.has_work():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    return outputs


def workload(tokenizer) -> dict[str, tuple[list[int], int]]:
    rng = random.Random(7)
    words = "the quick brown fox jumps over lazy dogs while python code returns values".split()
    system = tokenizer.encode("You are a helpful assistant that answers in python code. " * 4)
    requests = {}
    for i in range(6):
        question = tokenizer.encode(" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))))
        # half share a long prefix: the second and later ones load it from the prefix cache
        requests[f"r{i}"] = ((system if i % 2 else []) + question, 6 + 5 * i)
    return requests


def test_tensor_parallel_2_equals_1_token_for_token(ray_up, model_path, reference_greedy):
    single = make_engine(model_path, 1)
    requests = workload(single.tokenizer)
    expected = generate_all(single, requests)
    sharded = make_engine(model_path, 2)
    try:
        got = generate_all(sharded, requests)
        assert sharded.stats().prefix_hits > 0  # both ranks read the shared prefix blocks
        # each rank really holds half of the demo model's 4 KV heads
        assert ray.get([w.kv_heads.remote() for w in sharded.runner.workers]) == [2, 2]
    finally:
        sharded.runner.shutdown()
    assert got == expected
    prompt, max_tokens = requests["r0"]
    assert expected["r0"] == reference_greedy(prompt, max_tokens)
