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

import threading
import time
from dataclasses import dataclass, field

import torch

from app.config import EngineConfig, LoraConfig
from app.engine.block_manager import BlockManager
from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.errors import RequestRejected
from app.engine.logprobs import Logprob, TokenLogprobs, TokenNames, token_logprobs
from app.engine.lora.adapter import LoraAdapter
from app.engine.lora.slots import LoraSlots
from app.engine.model_runner import ModelRunner, forward_size
from app.engine.sampler import sample
from app.engine.sampling_params import SamplingParams
from app.engine.scheduler import Scheduler
from app.engine.schema_limits import SchemaError
from app.engine.sequence import RequestTimings, Sequence, SequenceStatus
from app.engine.spec.gate import SpecGate
from app.engine.spec.proposer import build_proposer
from app.engine.spec.stats import SpecDecodeStats
from app.engine.spec.verify import verify

# logits one chunk of a prompt being scored may hold (64 MiB in float32): the chunk is this over the
# vocabulary size in positions, e.g. 128 positions of a 128k vocabulary
PROMPT_SCORING_ELEMENTS = 2**24


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens and text since the last output."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it; None for EOS
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # only for requests that asked (SamplingParams.logprobs / prompt_logprobs), else None
    logprobs: list[TokenLogprobs] | None = None  # one per entry of token_ids
    prompt_logprobs: list[TokenLogprobs] | None = None  # first output only; the first token's logprob is None
    itl: list[float] = field(default_factory=list)  # seconds between successive tokens of this delta
    timings: RequestTimings | None = None  # on the finished output only (metrics)
    error: Exception | None = None  # finish_reason "error": why this request (and no other) ended

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
    # by priority class, by tenant (API key id), and preemptions by cause (see scheduler.py)
    running_by_class: dict[str, int] = field(default_factory=dict)
    waiting_by_class: dict[str, int] = field(default_factory=dict)
    running_by_key: dict[str, int] = field(default_factory=dict)
    waiting_by_key: dict[str, int] = field(default_factory=dict)
    keys_seen: list[str] = field(default_factory=list)  # every tenant that sent work to this engine
    preemptions_by_cause: dict[str, int] = field(default_factory=dict)
    spec: SpecDecodeStats | None = None  # speculative decoding's counters, when it is configured


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig, runner=None, lora: LoraConfig | None = None):
        """`runner`: anything with ModelRunner's interface (e.g. a TensorParallelRunner); default: a
        ModelRunner over `model`, which is otherwise read only for its config (eos ids). `lora`: the
        model's LoRA block; its adapter slots wrap `model`'s target Linear layers (docs/lora.md)."""
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len
        self.eos_ids = frozenset(_eos_ids(model, tokenizer))
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.runner = runner or ModelRunner(model, config.num_kv_blocks, config.block_size, forward_size(config))
        self.loras = None
        if lora is not None:
            if not isinstance(self.runner, ModelRunner):  # the weights are in tensor-parallel workers
                raise ValueError("lora is not supported with tensor parallelism")
            self.loras = self.runner.lora = LoraSlots(model, lora.max_adapters_per_replica, lora.max_rank)
        spec = config.speculative  # docs/speculative-decoding.md
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_prefill_tokens,
                                   config.tenant_weights, config.preempt_after_s, loras=self.loras,
                                   mix_decodes=not spec)  # a speculative decode step verifies drafts alone
        self.sequences: dict[str, Sequence] = {}
        self.model = model
        self.token_names = TokenNames(tokenizer)
        self._guided = None  # GuidedCompiler, built on the first guided request
        self._guided_lock = threading.Lock()  # the replica's compile pool and the engine thread both ask
        self.proposer = build_proposer(config, model, tokenizer) if spec else None
        self.gate = SpecGate(spec, self.max_model_len) if spec else None
        self.spec_stats = SpecDecodeStats() if spec else None

    # requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    priority: int = 0, tenant: str = "", lora: LoraAdapter | None = None) -> None:
        """Raises RequestRejected (naming the field) for a request this engine cannot serve.
        `priority` (lower runs first) and `tenant` (whose share it uses) are for the scheduler;
        `lora`: the adapter it decodes with (None: the base model)."""
        params.check()
        if lora is not None and self.loras is None:
            raise RequestRejected(f"this model serves no LoRA adapters (asked for {lora.name!r})", "model")
        if lora is not None and lora.rank > self.loras.max_rank:
            raise RequestRejected(f"adapter {lora.name!r} has rank {lora.rank}, over max_rank {self.loras.max_rank}",
                                  "model")
        total = len(prompt_ids) + params.max_tokens
        if not prompt_ids:
            raise RequestRejected("the prompt is empty", "prompt")
        if total > self.max_model_len:
            raise RequestRejected(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context window of {self.max_model_len} tokens", "max_tokens"
            )
        if -(-total // self.config.block_size) > self.config.num_kv_blocks:
            raise RequestRejected(f"prompt + max_tokens ({total} tokens) can never fit in the KV cache", "max_tokens")
        if params.prompt_logprobs is not None and not isinstance(self.model, torch.nn.Module):
            # tensor parallel: the weights, and so the scoring forward, are in the workers
            raise RequestRejected("prompt log-probs are not supported with tensor parallelism", "prompt_logprobs")
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop)
        seq = Sequence(request_id, prompt_ids, params, detok, self.eos_ids, priority, tenant, lora)
        if params.guided is not None:  # compiled off this thread by the server (AsyncEngine); tests compile here
            seq.matcher = self._matcher(params.guided)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.remove(seq)
            self._forget(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = "abort"

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def queue_full(self, tenant: str, arriving: int = 0, arriving_total: int = 0) -> str | None:
        """Why one more request of `tenant` would be refused (its key's share of the queue, then the
        replica's), or None; `arriving`: requests let in but not added yet (AsyncEngine.admit). Safe
        to call from another thread."""
        return self.scheduler.queue_full(tenant, self.config.max_waiting, arriving, arriving_total)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=self.blocks.num_used,
            kv_blocks_total=self.blocks.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_queries=self.blocks.prefix_queries,
            prefix_hits=self.blocks.prefix_hits,
            **self.scheduler.load(),
            spec=self.spec_stats.snapshot() if self.spec_stats else None,
        )

    def lora_stats(self) -> dict:
        """Adapters of running and waiting sequences, the loaded ones (least recently used first), the
        slot count, and loads and evictions so far. Safe to call from another thread."""
        if self.loras is None:
            return {"running": [], "waiting": [], "loaded": [], "max_lora": 0, "loads": 0, "evictions": 0}
        stats = self.loras.stats()
        return {"running": stats["running"], "waiting": sorted(dict(self.scheduler.lora_waiting)),
                "loaded": stats["loaded"], "max_lora": stats["max_lora"], "loads": stats["loads"],
                "evictions": stats["evictions"]}

    def unload_lora(self, name: str) -> bool:
        """Drop adapter `name` from its slot; False while a running sequence uses it (it stays). Any thread."""
        return self.loras is None or self.loras.unload(name)

    # the step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One forward over the scheduled sequences and a token for each. Whatever fails for one
        sequence (its forward, its sampling controls, its detokenizing) ends that sequence alone, with
        an output carrying the error; the rest of the batch goes on unchanged."""
        seqs, num_prefills = self.scheduler.schedule()
        if not seqs:
            return []
        now = time.monotonic()
        for seq in seqs:
            seq.timings.scheduled(now)
        failed: list[RequestOutput] = []
        if not num_prefills and self.proposer is not None:
            seqs, outputs = self._speculative_step(seqs, failed)
        else:
            prefilled = set(seqs[:num_prefills])
            seqs, logits = self._run_model(seqs, lambda batch: self._forward(batch, bool(prefilled)), failed)
            for seq in seqs:
                seq.num_cached = seq.num_tokens
                if seq in prefilled:
                    self.blocks.register_prefix(seq)
            outputs = self._next_tokens(seqs, logits, failed) if seqs else []
        for seq in seqs:
            if seq.is_finished:
                self.scheduler.remove(seq)
                self.sequences.pop(seq.request_id, None)
                self._forget(seq)
        return outputs + failed

    def _speculative_step(self, seqs: list[Sequence], failed: list[RequestOutput]) -> tuple[list[Sequence], list]:
        """A decode step with drafts: the proposer drafts up to the gate's budget for each sequence (within
        free blocks and the step's token budget), one forward scores every sequence's [last token, *draft],
        and each keeps the draft tokens verification accepts plus one of the target's own. Sequences
        without a draft decode plainly in the same forward."""
        ks = [self.blocks.reserve(seq, k) if k else 0 for seq, k in zip(seqs, self.gate.budgets(seqs))]
        over = len(seqs) + sum(ks) - self.config.max_prefill_tokens  # the forward stays within the budget
        for i in reversed(range(len(ks))):
            cut = min(max(over, 0), ks[i])
            ks[i], over = ks[i] - cut, over - cut
        draft_of = {seq.request_id: draft[:k] for seq, draft, k in zip(seqs, self.proposer.propose(seqs, ks), ks)}
        seqs, logits = self._run_model(
            seqs, lambda batch: self.runner.verify([(seq, draft_of[seq.request_id]) for seq in batch]), failed)
        if not seqs:
            return seqs, []
        return seqs, self._verified_tokens(seqs, [draft_of[seq.request_id] for seq in seqs], logits, failed)

    def _verified_tokens(self, seqs: list[Sequence], drafts: list[list[int]], logits: torch.Tensor,
                         failed: list[RequestOutput]) -> list[RequestOutput]:
        """Each sequence's rows [start, start + len(draft) + 1): sampled plainly (no draft) or verified."""
        starts = torch.tensor([0] + [len(d) + 1 for d in drafts]).cumsum(0).tolist()
        raw = logits.clone() if any(seq.params.logprobs is not None for seq in seqs) else None  # both edit in place
        plain = [i for i, d in enumerate(drafts) if not d]
        drafted = [i for i, d in enumerate(drafts) if d]
        tokens: dict[int, list[int]] = {}
        errors: dict[int, Exception] = {}
        sampled, unsampled = sample(logits[[starts[i] for i in plain]], [seqs[i] for i in plain])
        for j, i in enumerate(plain):
            if j in unsampled:
                errors[i] = unsampled[j]
            else:
                tokens[i] = [sampled[j]]
        rows = [r for i in drafted for r in range(starts[i], starts[i + 1])]
        verdicts, unverified = verify(logits[rows], [seqs[i] for i in drafted], [drafts[i] for i in drafted])
        for j, i in enumerate(drafted):
            if j in unverified:
                errors[i] = unverified[j]
                continue
            tokens[i] = verdicts[j].tokens
            self.spec_stats.record(len(drafts[i]), verdicts[j].num_accepted)
            self.gate.record(seqs[i].request_id, len(drafts[i]), verdicts[j].num_accepted)
        outputs = []
        for i, seq in enumerate(seqs):
            try:
                if i in errors:
                    raise errors[i]
                # the last token and the accepted drafts have K/V now; the rejected positions are rewritten later
                seq.num_cached = seq.num_tokens + len(tokens[i]) - 1
                out = self._append_tokens(seq, tokens[i])
                if raw is not None and seq.params.logprobs is not None:
                    n = len(out.token_ids)
                    out.logprobs = token_logprobs(raw[starts[i] : starts[i] + n], out.token_ids,
                                                  [seq.params.logprobs] * n, self.token_names)
                outputs.append(out)
            except Exception as e:
                self._fail(seq, e, failed)
        return outputs

    def _append_tokens(self, seq: Sequence, tokens: list[int]) -> RequestOutput:
        """Tokens one at a time, as plain decoding appends them: a stop string, stop token, EOS or length
        ends the run where plain decoding would have stopped, and the rest is never emitted."""
        out = self._append_token(seq, tokens[0])
        for token in tokens[1:]:
            if seq.is_finished:
                break
            out.merge(self._append_token(seq, token))
        return out

    def _forget(self, seq: Sequence) -> None:
        """A finished, aborted or failed sequence's speculative state (draft blocks, n-gram index) goes.
        A preempted one keeps it: its tokens only grow, so the index and the draft's cache stay valid."""
        if self.proposer is not None:
            self.proposer.free(seq.request_id)
            self.gate.free(seq.request_id)

    def _run_model(self, seqs: list[Sequence], forward,
                   failed: list[RequestOutput]) -> tuple[list[Sequence], torch.Tensor | None]:
        """(the sequences that computed, their last-token logits). A forward that raises is retried one
        sequence at a time, so a failure that follows one request (out of memory on its long prompt)
        ends that request only. One that every sequence of a batch hits alone is the engine's own
        fault: it is raised, ending the loop, so that Serve replaces the replica."""
        try:
            return seqs, forward(seqs)
        except torch.AcceleratorError:  # the device itself failed (a CUDA assert): no sequence can run
            raise
        except Exception as e:
            if len(seqs) == 1:
                self._fail(seqs[0], e, failed)
                return [], None
        kept, rows, errors = [], [], []
        for seq in seqs:
            try:
                rows.append(forward([seq]))
                kept.append(seq)
            except torch.AcceleratorError:
                raise
            except Exception as e:
                errors.append((seq, e))
        if not kept:
            raise errors[0][1]
        for seq, e in errors:
            self._fail(seq, e, failed)
        return kept, torch.cat(rows)

    def _forward(self, seqs: list[Sequence], any_prefill: bool) -> torch.Tensor:
        if not any_prefill:
            return self.runner.decode(seqs)
        if seqs[0].scores_prompt:  # the scheduler admits such a sequence alone
            return self._prefill_scored(seqs[0])
        return self.runner.prefill(seqs)  # each sequence's uncached tokens: a prompt's, or a decode's one

    def _prefill_scored(self, seq: Sequence) -> torch.Tensor:
        """Prefill a sequence that asked for its prompt's log-probs, in chunks through the paged KV
        cache, scoring each chunk's positions as it goes: memory is bounded by the chunk (positions x
        vocabulary), whatever the prompt's length. Returns its last position's logits."""
        k, prompt = seq.params.prompt_logprobs, seq.prompt_ids
        scores = [TokenLogprobs(Logprob(prompt[0], self.token_names(prompt[0]), None))]
        chunk = max(1, min(self.config.max_prefill_tokens, PROMPT_SCORING_ELEMENTS // self._vocab_size()))
        for start in range(0, len(prompt), chunk):
            end = min(start + chunk, len(prompt))
            logits = self.runner.prefill_span(seq, start, end)  # [end - start, vocab]: position p predicts p + 1
            targets = prompt[start + 1 : end + 1]  # the last position predicts the first output instead
            if targets:
                scores += token_logprobs(logits[: len(targets)], targets, [k] * len(targets), self.token_names)
        seq.prompt_logprobs = scores
        return logits[-1:]

    def _next_tokens(self, seqs: list[Sequence], logits: torch.Tensor, failed: list[RequestOutput]) -> list[RequestOutput]:
        scored = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        raw_logits = logits[scored] if scored else None  # a copy: sample() edits logits in place
        tokens, unsampled = sample(logits, seqs)
        outputs: dict[int, RequestOutput] = {}
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            try:
                if i in unsampled:
                    raise unsampled[i]
                outputs[i] = self._append_token(seq, token)
            except Exception as e:
                self._fail(seq, e, failed)
        kept = [j for j, i in enumerate(scored) if i in outputs]  # raw_logits rows of scored sequences still running
        if kept:
            rows = [scored[j] for j in kept]
            for i, lp in zip(rows, token_logprobs(raw_logits[kept], [tokens[i] for i in rows],
                                                  [seqs[i].params.logprobs for i in rows], self.token_names)):
                outputs[i].logprobs = [lp]
        return list(outputs.values())

    def _fail(self, seq: Sequence, error: Exception, failed: list[RequestOutput]) -> None:
        self.scheduler.remove(seq)
        self._forget(seq)
        self.sequences.pop(seq.request_id, None)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, "error"
        failed.append(RequestOutput(seq.request_id, finished=True, finish_reason="error", error=error,
                                    num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
                                    timings=seq.timings))

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

    def _vocab_size(self) -> int:
        return self.model.config.get_text_config().vocab_size

    def _matcher(self, guided):
        compiler = self.guided_compiler()
        if guided.compiled is not None:
            return compiler.matcher_from(guided.compiled)
        try:
            return compiler.matcher(guided)
        except SchemaError as e:
            raise RequestRejected(str(e), guided.param) from None

    def guided_compiler(self):
        with self._guided_lock:
            if self._guided is None:
                from app.engine.guided import GuidedCompiler  # xgrammar loads only where it is used

                self._guided = GuidedCompiler(self.tokenizer, self._vocab_size(), sorted(self.eos_ids))
            return self._guided


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids
