"""Tensor parallelism behind the `ModelRunner` interface, so the engine does not know about it.

A `TensorParallelRunner` starts one `TensorParallelWorker` actor per rank, each in its own bundle
of the replica's placement group (see app/resources.py). Every worker joins one `torch.distributed`
group (gloo on CPU, NCCL on CUDA), loads the model with transformers' tensor-parallel plan
(`DistributedConfig(tp_size=N)`, the `tp_plan="auto"` of older releases: attention heads and MLP
columns split across ranks, an all-reduce after `o_proj`/`down_proj`, the logits gathered), and
wraps its shard in an ordinary `ModelRunner`. Each rank's `PagedKVCache` therefore holds only its
own heads: the cache sizes its pools from the key states the shard produces. Block tables travel
with each sequence, so every rank lays its shard out in the same blocks.

Every call (`prefill`, `decode`) is sent to all ranks in
the same order (one caller, so Ray runs an actor's calls in submission order), the collectives
inside the forward line up, and rank 0's logits are returned. Ray is imported here only: the rest
of app/engine/ stays Ray-free.

Checked on CPU with gloo (tests/e2e/test_tensor_parallel.py): greedy output at size 2 equals size 1
token for token for the demo Llama. transformers needs `torch.distributed` initialised before
`from_pretrained`; we initialise it ourselves (its own path reads torchrun's env variables)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from app.config import ModelConfig
from app.engine.model_runner import ModelRunner, forward_size
from app.engine.sequence import Sequence
from app.loading import model_source


def runner_view(seq: Sequence) -> Sequence:
    """The part of a `Sequence` a runner reads, without its tokenizer and sampling state: what is
    sent to every rank on every step."""
    view = Sequence.__new__(Sequence)
    view.__dict__.update(request_id=seq.request_id, block_ids=seq.block_ids, num_cached=seq.num_cached,
                         prompt_ids=seq.prompt_ids, output_ids=seq.output_ids)
    return view


class TensorParallelWorker:
    """One rank: its process group membership, its shard of the model, its shard of the KV cache."""

    def __init__(self, rank: int, world_size: int, config: ModelConfig, device: str):
        self.rank, self.world_size = rank, world_size
        self.config, self.device = config, device
        self.runner: ModelRunner | None = None

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0's host and a free port there, for every rank's `init_process_group`."""
        with socket.socket() as s:
            s.bind(("", 0))
            return socket.gethostbyname(socket.gethostname()), s.getsockname()[1]

    def load(self, master: tuple[str, int]) -> None:
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        engine = self.config.engine
        torch.set_num_threads(engine.num_threads or 1)
        # each actor sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES), hence local rank 0
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), LOCAL_RANK="0")
        dist.init_process_group(
            "nccl" if self.device == "cuda" else "gloo",
            rank=self.rank,
            world_size=self.world_size,
            init_method=f"tcp://{master[0]}:{master[1]}",
        )
        dtype = engine.dtype if engine.dtype != "auto" else ("bfloat16" if self.device == "cuda" else "float32")
        model = AutoModelForCausalLM.from_pretrained(
            model_source(self.config),
            dtype=getattr(torch, dtype),
            trust_remote_code=self.config.trust_remote_code,
            attn_implementation="sdpa",
            distributed_config=DistributedConfig(tp_size=self.world_size),
        )
        self.runner = ModelRunner(model, engine.num_kv_blocks, engine.block_size, forward_size(engine))

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor | None:
        logits = self.runner.prefill(seqs)
        return logits.cpu() if self.rank == 0 else None

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor | None:
        logits = self.runner.decode(seqs)
        return logits.cpu() if self.rank == 0 else None

    def kv_heads(self) -> int:
        """KV heads in this rank's cache: the model's count / tensor_parallel_size once sharded."""
        return next(iter(self.runner.cache.k.values())).shape[1]


class TensorParallelRunner:
    """Same interface as `ModelRunner`; the work happens in `tensor_parallel_size` worker actors.
    `config.engine` must be resolved (max_model_len and num_kv_blocks filled in)."""

    def __init__(self, config: ModelConfig, device: str):
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        size = config.engine.tensor_parallel_size
        group = get_current_placement_group()  # the replica's: one bundle per rank (app/resources.py)
        actor = ray.remote(TensorParallelWorker)

        def placement(rank: int) -> dict:
            if group is None:  # driven outside Serve (tests): let Ray place the workers
                return {}
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)}

        self.workers = [
            # the bundle reserves the rank's CPU/GPU; the worker claims the GPU so Ray makes it
            # visible to that process, and no CPU so rank 0 can share bundle 0 with the replica
            actor.options(num_cpus=0, num_gpus=1 if device == "cuda" else 0, **placement(rank)).remote(
                rank, size, config, device
            )
            for rank in range(size)
        ]
        master = ray.get(self.workers[0].rendezvous_address.remote())
        ray.get([w.load.remote(master) for w in self.workers])

    def call_all(self, method: str, *args):
        """Run `method` on every rank (in order with earlier calls); returns rank 0's result."""
        import ray

        return ray.get([getattr(w, method).remote(*args) for w in self.workers])[0]

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        return self.call_all("prefill", [runner_view(s) for s in seqs])

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        return self.call_all("decode", [runner_view(s) for s in seqs])

    def shutdown(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)


@dataclass
class TensorParallelModel:
    """Stands in for the model in the replica process (the weights live in the rank workers): the
    configs the engine reads for eos ids. The engine refuses what needs the weights here (prompt
    logprobs), since it checks for a torch module."""

    config: object
    generation_config: object | None
