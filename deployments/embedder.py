"""Embedder deployment: one per configured embedding model (`Embedder-<name>`).

`embed` tokenizes a request's inputs here, then hands each input to `_forward`, which Ray Serve's
`@serve.batch` groups with the inputs of every other request in flight: one padded forward pass per
batch, then pooling and L2 normalisation (what sentence-transformers models such as all-MiniLM-L6-v2
do). Vectors travel back as one float32 array per request."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import numpy as np
import ray
from ray import serve

from app.api.errors import invalid
from app.config import EmbeddingModelConfig
from app.loading import load_tokenizer, model_source, pick_device

log = logging.getLogger("ray.serve")


@serve.deployment(
    name="Embedder",
    # a quarter CPU: MiniLM-size encoders are light, and the default pipeline must fit a 2-core machine
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=64,
    health_check_period_s=10,
)
class Embedder:
    def __init__(self, config: EmbeddingModelConfig):
        import torch
        from transformers import AutoModel

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self.device = pick_device(config)
        self.tokenizer = load_tokenizer(config)
        self.model = AutoModel.from_pretrained(
            model_source(config), dtype=torch.float32, trust_remote_code=config.trust_remote_code
        ).to(self.device).eval()
        self.pooling = config.pooling
        self.prefix, self.suffix = special_frame(self.tokenizer)
        self.max_input_tokens = input_token_limit(config, self.tokenizer, self.model.config)
        self.size = self.model.config.hidden_size
        self.dimensions = {self.size, *(d for d in config.dimensions if d < self.size)}
        self._forward.set_max_batch_size(config.max_batch_size)
        self._forward.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        log.info("embedding model %s ready: %d dimensions, inputs up to %d tokens",
                 config.name, self.size, self.max_input_tokens)

    async def embed(self, inputs: list[str] | list[list[int]], dimensions: int | None) -> tuple[np.ndarray, int]:
        """(an (n, d) float32 array of unit vectors, tokens read): `dimensions` keeps the first d
        components and renormalises (Matryoshka), where the config allows that size."""
        if dimensions is not None and dimensions not in self.dimensions:
            allowed = ", ".join(map(str, sorted(self.dimensions)))
            raise invalid(f"dimensions={dimensions} is not supported by this model; it supports: {allowed}", "dimensions")
        sequences = self._token_ids(inputs)
        vectors = np.stack(await asyncio.gather(*(self._forward(ids) for ids in sequences)))
        if dimensions is not None and dimensions != self.size:
            vectors = vectors[:, :dimensions]
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors, sum(map(len, sequences))

    def _token_ids(self, inputs: list[str] | list[list[int]]) -> list[list[int]]:
        """Each input framed with the model's special tokens, checked against vocabulary and length."""
        if isinstance(inputs[0], str):
            bodies = self.tokenizer(inputs, add_special_tokens=False)["input_ids"]
        else:
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for ids in inputs for t in ids):
                raise invalid(f"token ids must be in [0, {vocab})", "input")
            bodies = inputs
        sequences = [[*self.prefix, *ids, *self.suffix] for ids in bodies]
        for i, ids in enumerate(sequences):
            if len(ids) > self.max_input_tokens:
                raise invalid(
                    f"input[{i}] is {len(ids)} tokens long; this model reads at most {self.max_input_tokens}",
                    "input", "context_length_exceeded",
                )
        return sequences

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _forward(self, batch: list[list[int]]) -> list[np.ndarray]:
        # off the event loop, so requests keep arriving (and queueing for the next batch) meanwhile
        return list(await asyncio.to_thread(self._encode, batch))

    def _encode(self, batch: list[list[int]]) -> np.ndarray:
        import torch

        longest = max(map(len, batch))
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([seq + [pad] * (longest - len(seq)) for seq in batch], device=self.device)
        mask = torch.tensor([[1] * len(seq) + [0] * (longest - len(seq)) for seq in batch], device=self.device)
        with torch.inference_mode():
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = pool(states, mask, self.pooling)
            return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()


def pool(states, mask, pooling: str):
    """One vector per sequence: the mean over its real tokens, or its first ([CLS]) token."""
    if pooling == "cls":
        return states[:, 0]
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the model's tokenizer puts before and after a text (BERT: [CLS] ... [SEP]),
    found by encoding a probe with and without them, so token-id inputs get the same frame."""
    body = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(body) + 1):
        if full[start:start + len(body)] == body:
            return full[:start], full[start + len(body):]
    return [], []


def input_token_limit(config: EmbeddingModelConfig, tokenizer, model_config) -> int:
    """The configured limit, else the length a sentence-transformers model was trained at
    (sentence_bert_config.json), else the position table's size."""
    positions = getattr(model_config, "max_position_embeddings", None) or tokenizer.model_max_length
    if config.max_input_tokens is not None:
        if config.max_input_tokens > positions:
            raise ValueError(f"max_input_tokens={config.max_input_tokens} exceeds the model's {positions} positions")
        return config.max_input_tokens
    st_config = Path(model_source(config)) / "sentence_bert_config.json"
    if st_config.exists():
        return min(positions, json.loads(st_config.read_text()).get("max_seq_length") or positions)
    return positions
