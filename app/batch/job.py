"""`conduit batch`: the driver. It reads which lines OUTPUT already answers, builds the Ray Data
pipeline (read the input's pending lines -> `BatchWorker` actors, or `EmbeddingWorker` ones for an
embedding model, one per replica, each with one replica's resources) and writes each output line as
it arrives, so an interrupted job resumes where it stopped. Ray Data schedules everything; this file
only wires it up and shows progress."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from app.batch.embedding_worker import EmbeddingWorker
from app.batch.lines import Answered, answered, is_error
from app.batch.progress import Progress
from app.batch.source import READ_CPUS, count_lines, decode, is_parquet, read_input, split_lines
from app.batch.target import BatchTarget, fitting_replicas
from app.batch.worker import OFFLINE_MAX_NUM_SEQS, BatchWorker

BATCHES_PER_SLOT = 4  # a Ray Data batch is this many engine batches (the offline max_num_seqs lines each)
ACTOR_START_LIMIT_S = 1800  # an engine actor's start, its model load included (a large model on a slow disk)
OUTPUT_BLOCK_BYTES = 16 * 1024  # about the size of the 32 lines a worker yields at once (worker.FLUSH_LINES)


@dataclass
class BatchSummary:
    written: int = 0  # output lines written by this run
    errors: int = 0  # of them, refusals and bad lines
    completion_tokens: int = 0
    already_answered: int = 0  # input lines the output answered before this run
    duplicates: int = 0  # lines whose custom_id this run had answered already (not written again)
    by_node: Counter = field(default_factory=Counter)  # output lines per Ray node id
    elapsed_s: float = 0.0  # from the start of the pipeline to its last line
    first_line_s: float | None = None  # from the start of the pipeline to its first lines (start-up)
    first_tokens: int = 0  # completion tokens of those first lines

    def text(self, output: Path) -> str:
        rate = self.written / self.elapsed_s if self.elapsed_s else 0.0
        tok = self.completion_tokens / self.elapsed_s if self.elapsed_s else 0.0
        nodes = ", ".join(f"{node[:12]} {n}" for node, n in sorted(self.by_node.items()))
        return (f"wrote {self.written} lines to {output} ({self.errors} errors) in {self.elapsed_s:.1f} s: "
                f"{rate:.1f} req/s, {tok:.0f} tok/s; {self.already_answered} answered before, "
                f"{self.duplicates} duplicate custom_ids skipped; lines per node: {nodes or 'none'}")


class OutputFile:
    """OUTPUT, appended to line by line. A last line cut short (the job was killed mid-write) is
    removed before anything is appended, so it cannot glue onto the next line."""

    def __init__(self, path: Path):
        self.path = path
        self.done = self._repair_and_read()
        self.file = None

    def _repair_and_read(self) -> Answered:
        if not self.path.exists():
            return Answered()
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        return answered(line.decode("utf-8", "replace") for line in data[:keep].split(b"\n"))

    def __enter__(self) -> OutputFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        return self

    def write(self, line: str) -> None:
        self.file.write(line + "\n")

    def flush(self) -> None:
        self.file.flush()

    def __exit__(self, *exc) -> None:
        self.file.close()


def pending_count(path: str, done: Answered) -> tuple[int | None, int]:
    """(lines to answer in all, of them answered before) for the progress bar."""
    if "://" in path:
        return None, len(done)
    if is_parquet(path):
        total = count_lines(path)
        return total, min(len(done), total)
    total = answered_before = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(split_lines(f), start=1):
            text, _, utf8 = decode(raw, number)
            if text.strip():
                total += 1
                answered_before += done.answers(text, utf8)
    return total, answered_before


def run_batch(input_path: str, output: Path, target: BatchTarget, address: str = "local",
              replicas: int | None = None, batch_size: int | None = None, show_progress: bool = True) -> BatchSummary:
    import ray
    import ray.data

    out = OutputFile(output)
    total, before = pending_count(input_path, out.done)
    summary = BatchSummary(already_answered=before)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        _configure_ray_data()
        cluster = ray.cluster_resources()
        options = target.actor_options(cluster.get("GPU", 0.0))
        actors = _actors(replicas or target.replicas, options, cluster)
        worker, lines_per_batch = _worker(target)
        dataset = read_input(input_path, out.done).map_batches(
            worker, fn_constructor_args=(target.model, target.ingress), batch_format="numpy",
            batch_size=batch_size or lines_per_batch, compute=ray.data.ActorPoolStrategy(size=actors), **options)
        with out, Progress(total, before, show_progress) as progress, CtrlC() as ctrl_c:
            _write(dataset, out, progress, summary, ctrl_c)
    finally:
        if started_ray:
            ray.shutdown()
    return summary


def _worker(target: BatchTarget) -> tuple[type, int]:
    """The actor class for the target's kind of model, and its default lines per Ray Data batch:
    for an embedding model, one forward pass's worth (each line has one input or more)."""
    if target.embeds:
        return EmbeddingWorker, target.model.max_batch_size
    return BatchWorker, BATCHES_PER_SLOT * max(target.model.engine.max_num_seqs, OFFLINE_MAX_NUM_SEQS)


def _actors(wanted: int, options: dict, cluster: dict) -> int:
    actors = fitting_replicas(wanted, options, cluster, READ_CPUS)
    if actors == 0:
        raise RuntimeError(f"the Ray cluster has no room for one replica ({options}; it has {cluster})")
    if actors < wanted:
        print(f"conduit batch: {actors} of {wanted} replicas: the cluster has room for {actors} "
              f"({options} each, {READ_CPUS} CPU kept for reading)", file=sys.stderr)
    return actors


class CtrlC:
    """SIGINT raises KeyboardInterrupt as usual and is also remembered: _write stops at the next batch
    even where the interrupt was raised inside Ray Data's iterator threads' machinery and lost there (a
    CI run's job went on to its last line, exit 0, after its Ctrl-C). Main thread only."""

    def __init__(self):
        self.pressed = threading.Event()
        self.previous = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        self.pressed.set()
        signal.default_int_handler(signum, frame)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _write(dataset, out: OutputFile, progress: Progress, summary: BatchSummary, ctrl_c: CtrlC) -> None:
    written = set(out.done.custom_ids)
    started = time.monotonic()
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
        if summary.first_line_s is None:
            summary.first_line_s = time.monotonic() - started
            summary.first_tokens = int(batch["completion_tokens"].sum())
        for line, tokens, node in zip(batch["line"], batch["completion_tokens"], batch["node"]):
            parsed = json.loads(line)
            custom_id = parsed["custom_id"]
            if custom_id is not None and custom_id in written:
                summary.duplicates += 1
                continue
            written.add(custom_id)
            out.write(str(line))
            summary.written += 1
            summary.errors += is_error(parsed)
            summary.completion_tokens += int(tokens)
            summary.by_node[str(node)] += 1
        out.flush()
        progress.update(len(batch["line"]), int(batch["completion_tokens"].sum()))
        if ctrl_c.pressed.is_set():
            raise KeyboardInterrupt
    summary.elapsed_s = time.monotonic() - started


def _configure_ray_data() -> None:
    """Ray Data's own bars and execution logs would tear through the one progress line shown here.
    Small blocks: Ray Data gathers a task's output up to the block size (128 MiB) before passing it
    on, which would hold finished lines back from OUTPUT (and the progress line) for minutes. Every
    engine actor is started (its model loaded) before lines are handed out: otherwise the first one
    up takes every batch while the others load, and a short job never reaches them."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.target_max_block_size = OUTPUT_BLOCK_BYTES
    context.wait_for_min_actors_s = ACTOR_START_LIMIT_S
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled": we know
