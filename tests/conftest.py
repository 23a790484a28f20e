import os

import pytest

from app.config import LOCAL_RAY_SERVE_ENV, PROJECT_ROOT
from app.demo_model import build_demo_model

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The Ray processes the tests start run as under `conduit run`. This test process
# itself keeps Serve's defaults (its constants are read at import, so import first): it calls
# handles from sync code, which the throughput-optimized mode forbids.
import ray.serve  # noqa: E402,F401

os.environ.update(LOCAL_RAY_SERVE_ENV)
DEMO_MODEL = PROJECT_ROOT / ".cache" / "demo-model"


@pytest.fixture(scope="session")
def model_path():
    return str(build_demo_model(DEMO_MODEL))


@pytest.fixture(scope="session")
def hf_model(model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_path).eval(), AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def reference_greedy(hf_model):
    """transformers' own greedy `generate`: the reference every served output must equal."""
    import torch

    model, _ = hf_model

    def generate(prompt_ids: list[int], max_tokens: int, ignore_eos: bool = True) -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens if ignore_eos else 0,
                do_sample=False,
            )
        return out[0, len(prompt_ids) :].tolist()

    return generate
