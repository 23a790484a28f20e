"""Embedder deployment: one per configured embedding model (`Embedder-<name>`).

`embed` tokenizes a request's inputs here, then hands each input to `_forward`, which Ray Serve's
`@serve.batch` groups with the inputs of every other request in flight: one padded forward pass per
batch. What is done to the inputs (framing, checks, forward pass, pooling, normalisation, Matryoshka
dimensions) is the Ray-free `Encoder`'s (app/encoder.py), which `conduit batch` runs too. Vectors
travel back as one float32 array per request."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import ray
from ray import serve

from app.config import EmbeddingModelConfig
from app.encoder import Encoder

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
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        self.encoder = Encoder(config, threads=max(1, int(cpus)))
        self._forward.set_max_batch_size(config.max_batch_size)
        self._forward.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        log.info("embedding model %s ready: %d dimensions, inputs up to %d tokens",
                 config.name, self.encoder.size, self.encoder.max_input_tokens)

    async def embed(self, inputs: list[str] | list[list[int]], dimensions: int | None) -> tuple[np.ndarray, int]:
        """(an (n, d) float32 array of unit vectors, tokens read): `dimensions` keeps the first d
        components and renormalises (Matryoshka), where the config allows that size."""
        sequences = self.encoder.sequences(inputs, dimensions)
        vectors = np.stack(await asyncio.gather(*(self._forward(ids) for ids in sequences)))
        return self.encoder.resize(vectors, dimensions), sum(map(len, sequences))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _forward(self, batch: list[list[int]]) -> list[np.ndarray]:
        # off the event loop, so requests keep arriving (and queueing for the next batch) meanwhile
        return list(await asyncio.to_thread(self.encoder.forward, batch))
