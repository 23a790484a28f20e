"""An embedding model's encoder, Ray-free: what the Embedder deployment (online) and `conduit batch`'s
embedding actors (offline) both do to inputs. Inputs are framed with the model's special tokens and
checked (vocabulary, length), run as one padded forward pass per batch, pooled and L2-normalised (what
sentence-transformers models such as all-MiniLM-L6-v2 do), and optionally cut to fewer dimensions
(Matryoshka). Refusals are the embeddings route's own 400s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.api.errors import invalid
from app.config import EmbeddingModelConfig
from app.loading import load_tokenizer, model_source, pick_device


class Encoder:
    def __init__(self, config: EmbeddingModelConfig, threads: int):
        import torch
        from transformers import AutoModel

        torch.set_num_threads(threads)
        self.config = config
        self.device = pick_device(config)
        self.tokenizer = load_tokenizer(config)
        self.model = AutoModel.from_pretrained(
            model_source(config), dtype=torch.float32, trust_remote_code=config.trust_remote_code
        ).to(self.device).eval()
        self.prefix, self.suffix = special_frame(self.tokenizer)
        self.max_input_tokens = input_token_limit(config, self.tokenizer, self.model.config)
        self.size = self.model.config.hidden_size
        self.dimensions = {self.size, *(d for d in config.dimensions if d < self.size)}

    def sequences(self, inputs: list[str] | list[list[int]], dimensions: int | None) -> list[list[int]]:
        """Each input's token ids, framed with the model's special tokens; a 400 naming the field for
        a `dimensions` the config does not allow, a token id outside the vocabulary or an input too long."""
        if dimensions is not None and dimensions not in self.dimensions:
            allowed = ", ".join(map(str, sorted(self.dimensions)))
            raise invalid(f"dimensions={dimensions} is not supported by this model; it supports: {allowed}", "dimensions")
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

    def forward(self, batch: list[list[int]]) -> np.ndarray:
        """One padded forward pass: an (n, size) float32 array of unit vectors, one per sequence."""
        import torch

        longest = max(map(len, batch))
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([seq + [pad] * (longest - len(seq)) for seq in batch], device=self.device)
        mask = torch.tensor([[1] * len(seq) + [0] * (longest - len(seq)) for seq in batch], device=self.device)
        with torch.inference_mode():
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = pool(states, mask, self.config.pooling)
            return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()

    def encode(self, sequences: list[list[int]]) -> np.ndarray:
        """Any number of sequences, `max_batch_size` to a forward pass."""
        step = self.config.max_batch_size
        return np.concatenate([self.forward(sequences[i:i + step]) for i in range(0, len(sequences), step)])

    def resize(self, vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
        """`dimensions` (checked by `sequences`) keeps the first d components, renormalised."""
        if dimensions is None or dimensions == self.size:
            return vectors
        vectors = vectors[:, :dimensions]
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


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
