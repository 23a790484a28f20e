"""The engine: requests in, token deltas out, one `step()` at a time. No Ray, no asyncio, no HTTP —
`async_engine.py` drives it from a thread, and tests drive it directly.

Why our own scheduler rather than transformers' ContinuousBatchingManager (`generate_batch`): on
this project's 2-core CPU with the demo model, the manager gave ~400 output tok/s with its
defaults and ~1.2k tuned (figures in shared DESIGN.md, measured here), while this engine decoded
32 sequences at ~2.9-3.7k tok/s in-process (an ad-hoc run of engine.step() here; DESIGN.md puts
the raw batched-decode ceiling at ~2.8-3.8k; bench/compare.py measures them side by side). It runs
the unmodified HF model (see model_runner.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from app.config import EngineConfig
from app.engine.block_manager import BlockManager
from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.logprobs import TokenLogprobs, TokenNames, prompt_logprobs, token_logprobs
from app.engine.model_runner import ModelRunner
from app.engine.sampler import sample
from app.engine.sampling_params import SamplingParams
from app.engine.scheduler import Scheduler
from app.engine.sequence import RequestTimings, Sequence, SequenceStatus


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text since the last output."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it; None for EOS
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # only for requests that asked (SamplingParams.logprobs / prompt_logprobs), else None
    logprobs: list[TokenLogprobs] | None = None  # one per entry of token_ids
    prompt_logprobs: list[TokenLogprobs] | None = None  # first output only; the first token's logprob is None
    itl: list[float] = field(default_factory=list)  # seconds between successive tokens of this delta
    timings: RequestTimings | None = None  # on the finished output only (metrics)

    def merge(self, later: RequestOutput) -> RequestOutput:
        self.token_ids += later.token_ids
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.text += later.text
        self.finished, self.finish_reason, self.stop_reason = later.finished, later.finish_reason, later.stop_reason
        self.num_output_tokens = later.num_output_tokens
        self.itl += later.itl
        self.timings = later.timings
        return self


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    prefix_queries: int
    prefix_hits: int


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig, runner=None):
        """`runner`: anything with ModelRunner's interface (e.g. a TensorParallelRunner); default: a
        ModelRunner over `model`, which is otherwise read only for its config (eos ids)."""
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len
        self.eos_ids = frozenset(_eos_ids(model, tokenizer))
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_prefill_tokens)
        self.runner = runner or ModelRunner(model, config.num_kv_blocks, config.block_size)
        self.sequences: dict[str, Sequence] = {}
        self.model = model
        self.token_names = TokenNames(tokenizer)
        self._guided = None  # GuidedCompiler, built on the first guided request

    # requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        total = len(prompt_ids) + params.max_tokens
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context window of {self.max_model_len} tokens"
            )
        if -(-total // self.config.block_size) > self.config.num_kv_blocks:
            raise ValueError(f"prompt + max_tokens ({total} tokens) can never fit in the KV cache")
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop)
        seq = Sequence(request_id, prompt_ids, params, detok, self.eos_ids)
        if params.guided is not None:
            seq.matcher = self._guided_compiler().matcher(params.guided)
        if params.prompt_logprobs is not None:
            if not isinstance(self.model, torch.nn.Module):  # tensor parallel: the weights are in the workers
                raise ValueError("prompt log-probs are not supported with tensor parallelism")
            seq.prompt_logprobs = prompt_logprobs(self.model, prompt_ids, params.prompt_logprobs, self.token_names)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.remove(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.blocks.num_used,
            kv_blocks_total=self.blocks.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_queries=self.blocks.prefix_queries,
            prefix_hits=self.blocks.prefix_hits,
        )

    # the step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        now = time.monotonic()
        for seq in seqs:
            seq.timings.scheduled(now)
        if is_prefill:
            logits = self.runner.prefill(seqs)
            for seq in seqs:
                seq.num_cached = seq.num_tokens
                self.blocks.register_prefix(seq)
        else:
            logits = self.runner.decode(seqs)
            for seq in seqs:
                seq.num_cached = seq.num_tokens
        scored = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        raw_logits = logits[scored] if scored else None  # a copy: sample() edits logits in place
        tokens = sample(logits, seqs)
        outputs = [self._append_token(seq, token) for seq, token in zip(seqs, tokens)]
        if scored:
            for i, lp in zip(scored, token_logprobs(raw_logits, [tokens[i] for i in scored],
                                                    [seqs[i].params.logprobs for i in scored], self.token_names)):
                outputs[i].logprobs = [lp]
        for seq in seqs:
            if seq.is_finished:
                self.scheduler.remove(seq)
                self.sequences.pop(seq.request_id, None)
        return outputs

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        seq.output_ids.append(token)
        itl = seq.timings.token(time.monotonic())
        p = seq.params
        n = len(seq.output_ids)
        is_eos = token in seq.eos_ids and not p.ignore_eos
        if not is_eos:
            seq.detokenizer.add_token(token)
        if seq.matcher is not None:
            seq.matcher.advance(token)
        if is_eos or token in p.stop_token_ids or seq.detokenizer.stopped or (seq.matcher and seq.matcher.done):
            seq.finish_reason = "stop"
        elif n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason:
            seq.status = SequenceStatus.FINISHED
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=[token],
            text=seq.detokenizer.take_delta(final=seq.is_finished),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.detokenizer.matched or (token if token in p.stop_token_ids else None),
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=n,
            itl=itl,
            timings=seq.timings if seq.is_finished else None,
            prompt_logprobs=seq.prompt_logprobs if n == 1 else None,
        )

    def _guided_compiler(self):
        if self._guided is None:
            from app.engine.guided import GuidedCompiler  # xgrammar loads only where it is used

            vocab_size = self.model.config.get_text_config().vocab_size
            self._guided = GuidedCompiler(self.tokenizer, vocab_size, sorted(self.eos_ids))
        return self._guided


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids
