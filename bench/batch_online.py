"""Interactive latency while the online Batch API runs (issue 18's target: a single streaming chat
client's TTFT p50 during a batch <= 2 x idle), on one `conduit run` of serve_config.yaml (one model
replica, no embedding model, its store in a temporary folder):

  (a) idle     one client, streaming chat, `--requests` requests one at a time
  (b) during   the same, while a `--lines`-line batch (`--max-tokens` output tokens a line) runs
               through /v1/files and /v1/batches (official openai SDK); then the batch is awaited

    .venv/bin/python bench/batch_online.py [--lines 2000] [--max-tokens 64] [--requests 20]

Prints both TTFTs and their ratio side by side, and that the batch finished: its lines/s and output
tok/s (tokens from the output file's `usage`), from its creation to its `completed`. A progress line
shows the batch's lines while it runs. Batch lines run at the `batch` priority class (docs/qos.md);
the interactive requests at the default `standard` class.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from openai import OpenAI

from app.bench import run_benchmark
from app.config import PROJECT_ROOT
from app.demo_model import build_demo_model

sys.path.insert(0, str(Path(__file__).parent))
from batch import write_input  # noqa: E402  (bench/ is no package: its scripts import each other)
from compare import MODEL_DIR, Server, free_port  # noqa: E402

MODEL = "conduit-demo"
ENDED = ("completed", "failed", "expired", "cancelled")


def write_config(path: Path, port: int, store: Path, batch_concurrency: int | None) -> None:
    """serve_config.yaml on `port`: one model replica (no autoscaling: a second one would share the
    same cores), no embedding model, the store (database and files) under `store`."""
    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    raw["http_options"]["port"] = port
    app = raw["applications"][0]
    app["args"].pop("embedding_models", None)
    app["args"]["store"] = {"url": f"sqlite:///{store / 'conduit.db'}", "files_dir": str(store / "files"),
                            **({"batch_concurrency": batch_concurrency} if batch_concurrency else {})}
    app["deployments"] = [d for d in app["deployments"] if not d["name"].startswith("Embedder-")]
    model = next(d for d in app["deployments"] if d["name"] == f"Model-{MODEL}")
    model.pop("autoscaling_config", None)
    model["num_replicas"] = 1
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


async def ttft(url: str, args) -> dict:
    """One streaming chat client, `--requests` requests one after another: TTFT p50/p99 in ms."""
    summary = await run_benchmark(url, MODEL, concurrency=1, num_requests=args.requests, chat=True,
                                  prompt_tokens=args.prompt_words, max_tokens=args.interactive_tokens,
                                  progress=False, warmup=1)
    if summary["failed"]:
        raise RuntimeError(f"{summary['failed']} interactive requests failed: {summary['errors']}")
    return {"p50": summary["ttft_ms"]["p50"], "p99": summary["ttft_ms"]["p99"], "n": summary["completed"]}


class BatchWatch:
    """Polls the batch every second, keeps its last state, and prints one progress line."""

    def __init__(self, url: str, batch_id: str, created: float):
        self.url, self.batch_id, self.created = url, batch_id, created
        self.batch: dict = {}
        self.ended_at: float | None = None

    @property
    def completed(self) -> int:
        return (self.batch.get("request_counts") or {}).get("completed", 0)

    async def run(self, max_tokens: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, trust_env=False, timeout=30) as http:
            while True:
                self.batch = (await http.get(f"/v1/batches/{self.batch_id}")).json()
                counts, elapsed = self.batch["request_counts"], time.monotonic() - self.created
                rate = counts["completed"] / elapsed
                left = (counts["total"] - counts["completed"] - counts["failed"]) / rate if rate else None
                eta = "?" if left is None else f"{left:.0f} s"
                print(f"\r  batch {self.batch['status']}: {counts['completed'] + counts['failed']}/{counts['total']} "
                      f"lines, {rate:.1f} lines/s, ~{rate * max_tokens:,.0f} tok/s, ETA {eta}   ",
                      end="", flush=True)
                if self.batch["status"] in ENDED:
                    self.ended_at = time.monotonic()
                    print(flush=True)
                    return
                await asyncio.sleep(1)


async def during_batch(url: str, client: OpenAI, source_id: str, args) -> tuple[dict, dict]:
    """Create the batch, run the interactive client once its lines are running, await the batch.
    (the TTFT figures, what the batch did meanwhile and in all)."""
    created = time.monotonic()
    batch = client.batches.create(input_file_id=source_id, endpoint="/v1/chat/completions", completion_window="24h")
    watch = BatchWatch(url, batch.id, created)
    polling = asyncio.create_task(watch.run(args.max_tokens))
    while watch.completed < 1 and not polling.done():  # its lines hold the engine from here on
        await asyncio.sleep(0.2)
    before = watch.completed
    figures = await ttft(url, args)
    during = {"lines_before": before, "lines_after": watch.completed, "status_after": watch.batch["status"]}
    await polling
    return figures, {**during, "batch": watch.batch, "wall_s": watch.ended_at - created}


def batch_figures(client: OpenAI, batch: dict, wall_s: float) -> dict:
    lines = [json.loads(line) for line in client.files.content(batch["output_file_id"]).text.splitlines()]
    tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines)
    counts = batch["request_counts"]
    return {"status": batch["status"], "completed": counts["completed"], "failed": counts["failed"],
            "total": counts["total"], "wall_s": wall_s, "lines_s": counts["completed"] / wall_s,
            "tok_s": tokens / wall_s, "output_tokens": tokens}


def report(idle: dict, busy: dict, during: dict, batch: dict, args) -> float:
    ratio = busy["p50"] / idle["p50"]
    print(f"\n{'1 streaming chat client':34}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}{'x idle':>8}")
    print(f"{'idle':34}{idle['p50']:>13.1f}{idle['p99']:>13.1f}{1:>8.2f}")
    print(f"{'during the batch':34}{busy['p50']:>13.1f}{busy['p99']:>13.1f}{ratio:>8.2f}")
    verdict = "met" if ratio <= 2 else "NOT met"
    print(f"target: during <= 2.00 x idle: {verdict} ({args.requests} requests each, "
          f"{args.interactive_tokens} output tokens, {args.prompt_words}-word prompts)")
    print(f"the batch ran {during['lines_before']} -> {during['lines_after']} lines during the interactive run "
          f"(status then: {during['status_after']})")
    if during["status_after"] in ENDED:
        print("  warning: the batch ended before the interactive run did: use more --lines")
    print(f"batch: {batch['status']}, {batch['completed']}/{batch['total']} lines answered, {batch['failed']} failed, "
          f"in {batch['wall_s']:.1f} s: {batch['lines_s']:.2f} lines/s, {batch['tok_s']:,.0f} output tok/s")
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens of each batch line")
    parser.add_argument("--prompt-words", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20, help="interactive requests, idle and during")
    parser.add_argument("--interactive-tokens", type=int, default=16, help="output tokens of each of them")
    parser.add_argument("--batch-concurrency", type=int, default=None,
                        help="store.batch_concurrency (default: the config's own)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    build_demo_model(MODEL_DIR)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="conduit-batch-online-") as workdir:
        work = Path(workdir)
        write_config(work / "serve_config.yaml", port, work, args.batch_concurrency)
        write_input(work / "in.jsonl", args.lines, args.prompt_words, args.max_tokens)
        server = Server("conduit", [sys.executable, "-m", "app.cli", "run", str(work / "serve_config.yaml")],
                        env={"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local"})
        try:
            print("starting conduit run ...", flush=True)
            server.wait_ready(url, MODEL)
            print(f"idle: {args.requests} streaming chat requests, one at a time ...", flush=True)
            idle = asyncio.run(ttft(url, args))
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            with open(work / "in.jsonl", "rb") as lines:
                source = client.files.create(file=lines, purpose="batch")
            print(f"during a batch of {args.lines} lines x {args.max_tokens} tokens ...", flush=True)
            busy, during = asyncio.run(during_batch(url, client, source.id, args))
            batch = batch_figures(client, during["batch"], during["wall_s"])
        finally:
            print("stopping conduit run ...", flush=True)
            server.stop()
    ratio = report(idle, busy, during, batch, args)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "idle": idle,
                                        "during": busy, "ratio": ratio, "batch": batch,
                                        "during_lines": {k: during[k] for k in ("lines_before", "lines_after")}},
                                       indent=2))
    return 0 if batch["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
