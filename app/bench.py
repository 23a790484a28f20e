"""Load generator for any OpenAI-compatible server: streaming completions from N concurrent
clients (or Poisson arrivals at a fixed rate), measuring TTFT, TPOT, ITL, end-to-end latency and
throughput. A library (`run_benchmark`) and a CLI (`main`):

    .venv/bin/python -m app.bench --url http://127.0.0.1:8000 --concurrency 32 --max-tokens 64

Definitions (as vLLM's benchmark_serving uses them, so numbers compare):
  TTFT  time from sending the request to the first chunk carrying text
  TPOT  (e2e - TTFT) / (completion_tokens - 1): decode time per token after the first
  ITL   gaps between successive text chunks as they arrive. A server that coalesces several
        tokens into one chunk (Conduit does, every stream_interval_s) shows fewer, longer gaps;
        `tokens_per_chunk` in the summary says how many tokens a chunk carried on average.
  e2e   time from sending the request to the end of its stream
Token counts come from the server's own `usage` (stream_options.include_usage), never from
counting chunks, because a chunk may hold any number of tokens.

The client is aiohttp (C-accelerated HTTP parsing, as vLLM's benchmark uses): the load generator
shares the machine with the server it measures, and httpx's pure-Python streaming cost 0.17 CPU-ms
per streamed token against aiohttp's 0.065 (32 clients against a stub SSE server, 2026-12-02),
a fifth of a core at 1,500 tokens/s taken from the server under test.

`--cold-start` measures scale to zero instead: against a model whose autoscaling_config.min_replicas
is 0, it waits until Ray Serve's status shows no replica of the model's deployment, then times one
request (TTFT, e2e), `--repeats` times (docs/latency.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

# Plain English words, drawn per request (see synthetic_prompt).
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven bright stars watch from far above "
    "quiet rivers carry old stories past green hills and small towns where people gather at "
    "evening to share bread music and news about harvests storms markets journeys and friends"
).split()


def synthetic_prompt(num_words: int, index: int = 0) -> str:
    """About `num_words` words of text, drawn for request `index` by a generator seeded with it. Prompts
    of different indices differ from their first words, so a server with a prefix cache cannot reuse
    one request's prefill for another's, which would flatter it on a benchmark of repeated prompts.
    (Rotating one word list, as this did before, gave only len(WORDS) = 46 distinct prompts.)"""
    rng = random.Random(index)
    return " ".join(rng.choice(WORDS) for _ in range(max(1, num_words)))


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float | None = None  # seconds; None: no text came (see _one_request)
    e2e: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # seconds since the request was sent

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def _chunk_text(obj: dict, chat: bool) -> str:
    text = ""
    for choice in obj.get("choices") or []:
        if chat:
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


# No read timeout: a long queue is a result to measure, not an error. A session ignores any
# HTTP(S)_PROXY in the environment (trust_env is off): the benchmark talks to the server directly.
TIMEOUT = aiohttp.ClientTimeout(total=None, connect=30)
READ_BUFFER = 1 << 22  # one SSE line may be long (log-probs, a whole non-streamed body)


def session(connections: int = 0) -> aiohttp.ClientSession:
    """A client with at most `connections` open at once (0: no limit)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), timeout=TIMEOUT,
                                 read_bufsize=READ_BUFFER)


async def _one_request(client: aiohttp.ClientSession, target: str, payload: dict, chat: bool) -> RequestResult:
    """`target`: the endpoint's whole URL."""
    result = RequestResult()
    start = time.perf_counter()
    try:
        async with client.post(target, json=payload) as resp:
            if resp.status != 200:
                body = await resp.text(errors="replace")
                result.error = f"HTTP {resp.status}: {body[:200]}"
                return result
            # SSE by hand: every event we care about is one `data: ...` line. Some servers
            # (transformers serve) end the stream without `data: [DONE]`, so the end of the
            # body also ends the request.
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    result.error = f"stream error: {str(obj['error'])[:200]}"
                    return result
                if _chunk_text(obj, chat):
                    now = time.perf_counter() - start
                    if not result.chunk_times:
                        result.ttft = now
                    result.chunk_times.append(now)
                usage = obj.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.prompt_tokens = usage.get("prompt_tokens") or 0
    except (aiohttp.ClientError, ValueError) as e:  # ValueError: bad JSON, or a line over READ_BUFFER
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    if not result.output_tokens:
        result.error = ("no usage chunk (does the server honour stream_options.include_usage?)" if result.chunk_times
                        else "no text and no usage in the stream")
    else:  # with no text, the tokens count but there is no TTFT: a random model's output can be all
        result.ok = True  # special tokens or bytes of no whole character (~1% of the demo model's prompts)
    return result


def build_payload(model: str, prompt: str, max_tokens: int, chat: bool, ignore_eos: bool, extra: dict | None) -> dict:
    payload: dict = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    if ignore_eos:
        # vLLM's extension fields: every request produces exactly max_tokens tokens, so runs
        # with different servers (or random models that hit EOS early) do the same work.
        payload["ignore_eos"] = True
        payload["min_tokens"] = max_tokens
    payload.update(extra or {})
    return payload


def _stats_ms(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"mean": None, "p50": None, "p99": None}
    a = np.asarray(values) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


async def first_model_id(url: str) -> str:
    async with session() as client, client.get(f"{url.rstrip('/')}/v1/models") as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


async def run_benchmark(
    url: str,
    model: str | None = None,
    concurrency: int = 32,
    rate: float | None = None,
    num_requests: int = 128,
    prompt_tokens: int = 64,
    max_tokens: int = 64,
    chat: bool = False,
    ignore_eos: bool = True,
    progress: bool = True,
    warmup: int = 1,
    extra_body: dict | None = None,
    seed: int = 0,
    first_index: int = 0,
) -> dict:
    """Send `num_requests` streaming requests and return the summary dict (see `summarize`).

    concurrency: that many clients, each sending its next request when the last one ends.
    rate: if given, requests arrive as a Poisson process at `rate` per second instead, however
          many are in flight (`concurrency` is then ignored).
    warmup: requests sent one at a time first and not measured (model load, first-call costs).
    extra_body: fields merged into every request (e.g. a server's own extensions).
    first_index: request i's prompt is synthetic_prompt(prompt_tokens, first_index + i), the warm-up's
          the indices after those. Loads on one server that must not share prompts (a prefix cache
          would serve the later one's from the earlier one's) each take a range of their own.
    """
    url = url.rstrip("/")
    model = model or await first_model_id(url)
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"

    def payload(i: int) -> dict:
        return build_payload(model, synthetic_prompt(prompt_tokens, first_index + i), max_tokens, chat, ignore_eos,
                             extra_body)

    results: list[RequestResult] = []
    async with session(connections=0 if rate else concurrency) as client:
        for i in range(warmup):
            warm = await _one_request(client, url + endpoint, payload(num_requests + i), chat)
            if not warm.ok:
                raise RuntimeError(f"warm-up request to {url}{endpoint} failed: {warm.error}")

        bar, task = _progress(progress, num_requests)
        started = time.perf_counter()

        async def one(i: int) -> None:
            results.append(await _one_request(client, url + endpoint, payload(i), chat))
            if bar is not None:
                bar.advance(task)

        try:
            if rate:
                rng = random.Random(seed)
                tasks = []
                for i in range(num_requests):
                    tasks.append(asyncio.create_task(one(i)))
                    await asyncio.sleep(rng.expovariate(rate))  # Poisson process: exponential gaps
                await asyncio.gather(*tasks)
            else:
                counter = iter(range(num_requests))

                async def client_loop() -> None:
                    for i in counter:  # shared iterator: clients take the next index, back to back
                        await one(i)

                await asyncio.gather(*(client_loop() for _ in range(min(concurrency, num_requests))))
        finally:
            if bar is not None:
                bar.stop()
        duration = time.perf_counter() - started

    config = {
        "url": url, "model": model, "endpoint": endpoint, "concurrency": None if rate else concurrency,
        "rate": rate, "num_requests": num_requests, "prompt_words": prompt_tokens, "max_tokens": max_tokens,
        "ignore_eos": ignore_eos,
    }
    return summarize(results, duration, config)


# cold start (scale to zero) ----------------------------------------------------------------------
def deployment_replicas(status, app: str, deployment: str) -> int:
    """Replicas of `deployment` in any state, from `serve.status()`. A STOPPING replica counts: a
    request sent while it stops waits for the autoscaler to hear of it, which is not a cold start."""
    return sum(status.applications[app].deployments[deployment].replica_states.values())


def wait_for_zero(count_replicas: Callable[[], int], timeout_s: float, poll_s: float = 0.5,
                  clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> float:
    """Seconds until `count_replicas()` reads 0; TimeoutError once `timeout_s` has passed."""
    started = clock()
    while (count := count_replicas()) > 0:
        waited = clock() - started
        if waited >= timeout_s:
            raise TimeoutError(f"still {count} replica(s) after {waited:.0f} s idle: is the model's "
                               "autoscaling_config.min_replicas 0?")
        sleep(poll_s)
    return clock() - started


def ray_replica_counter(address: str, app: str, deployment: str) -> Callable[[], int]:
    """A `count_replicas` for `wait_for_zero` that reads Serve's status as a driver of the cluster."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    return lambda: deployment_replicas(serve.status(), app, deployment)


async def run_cold_start(
    url: str, model: str | None, count_replicas: Callable[[], int], repeats: int = 3,
    idle_timeout_s: float = 600, prompt_tokens: int = 64, max_tokens: int = 64, chat: bool = False,
    extra_body: dict | None = None,
) -> dict:
    """`repeats` times: wait until the model deployment has no replica, then time one streaming
    request, which waits for a replica to start (the cold start) and is then served."""
    url = url.rstrip("/")
    model = model or await first_model_id(url)
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    results, idle_s = [], []
    async with session() as client:
        for i in range(repeats):
            idle_s.append(await asyncio.to_thread(wait_for_zero, count_replicas, idle_timeout_s))
            payload = build_payload(model, synthetic_prompt(prompt_tokens, i), max_tokens, chat, True, extra_body)
            results.append(await _one_request(client, url + endpoint, payload, chat))
    config = {"url": url, "model": model, "endpoint": endpoint, "repeats": repeats,
              "prompt_words": prompt_tokens, "max_tokens": max_tokens}
    return cold_start_summary(results, idle_s, config)


def _spread_s(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": float(np.median(values)), "min": min(values), "max": max(values)}


def cold_start_summary(results: list[RequestResult], idle_s: list[float], config: dict) -> dict:
    """Median, min and max (seconds) of the cold requests' TTFT and e2e, and of the idle time the
    deployment took to reach zero replicas before each."""
    ok = [r for r in results if r.ok]
    return {
        **config,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "ttft_s": _spread_s([r.ttft for r in ok if r.ttft is not None]),
        "e2e_s": _spread_s([r.e2e for r in ok]),
        "idle_to_zero_s": _spread_s(idle_s),
        "requests": [{"ttft_s": r.ttft, "e2e_s": r.e2e, "output_tokens": r.output_tokens, "idle_to_zero_s": idle}
                     for r, idle in zip(results, idle_s) if r.ok],
    }


def print_cold_start(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cold start from zero replicas: {summary['url']}{summary['endpoint']}  "
                        f"model={summary['model']}  {summary['completed']}/{summary['repeats']} ok")
    table.add_column("seconds")
    for col in ("median", "min", "max"):
        table.add_column(col, justify="right")
    for key, label in (("ttft_s", "TTFT (cold)"), ("e2e_s", "e2e (cold)"), ("idle_to_zero_s", "idle until 0 replicas")):
        s = summary[key]
        table.add_row(label, *("-" if s[k] is None else f"{s[k]:.2f}" for k in ("median", "min", "max")))
    console = Console()
    console.print(table)
    for err in summary["errors"]:
        console.print(f"[red]error:[/red] {err}")


def _progress(enabled: bool, total: int):
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("benchmark"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    task = bar.add_task("requests", total=total)
    bar.start()
    return bar, task


def summarize(results: list[RequestResult], duration: float, config: dict) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    chunks = sum(len(r.chunk_times) for r in ok)
    errors = sorted({r.error for r in results if not r.ok})
    return {
        **config,
        "completed": len(ok),
        "without_text": sum(r.ttft is None for r in ok),  # completed, but no TTFT (see _one_request)
        "failed": len(results) - len(ok),
        "errors": errors[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_output_tokens": output_tokens,
        "mean_prompt_tokens": sum(r.prompt_tokens for r in ok) / len(ok) if ok else None,
        "tokens_per_chunk": sum(r.output_tokens for r in ok if r.chunk_times) / chunks if chunks else None,
        "ttft_ms": _stats_ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _stats_ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats_ms([gap for r in ok for gap in r.itls]),
        "e2e_ms": _stats_ms([r.e2e for r in ok]),
        # per request, for plots and later analysis (ITL gaps are summarized above only)
        "requests": [
            {"ttft_ms": None if r.ttft is None else r.ttft * 1e3, "e2e_ms": r.e2e * 1e3, "tpot_ms": (r.tpot or 0) * 1e3,
             "output_tokens": r.output_tokens, "chunks": len(r.chunk_times)}
            for r in ok
        ],
    }


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    mode = f"rate {summary['rate']}/s" if summary["rate"] else f"concurrency {summary['concurrency']}"
    table = Table(title=f"{summary['url']}{summary['endpoint']}  model={summary['model']}  {mode}")
    table.add_column("metric")
    for col in ("mean", "p50", "p99"):
        table.add_column(col, justify="right")
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = summary[f"{name}_ms"]
        table.add_row(f"{name.upper()} (ms)", *("-" if s[k] is None else f"{s[k]:.1f}" for k in ("mean", "p50", "p99")))
    console = Console()
    console.print(table)
    tpc = summary["tokens_per_chunk"]
    console.print(
        f"requests: {summary['completed']} ok ({summary['without_text']} with no text, so no TTFT), "
        f"{summary['failed']} failed in {summary['duration_s']:.2f} s | "
        f"{summary['request_throughput']:.2f} req/s | {summary['output_throughput']:.1f} output tok/s | "
        f"{summary['total_output_tokens']} output tokens, {tpc if tpc is None else round(tpc, 2)} per chunk"
    )
    for err in summary["errors"]:
        console.print(f"[red]error:[/red] {err}")


def plot_summary(summary: dict, path: str | Path) -> None:
    """TTFT and e2e latency CDFs, and the two throughputs, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "e2e_ms", "end-to-end latency")):
        values = np.sort([r[key] for r in summary["requests"]])
        if len(values):
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), drawstyle="steps-post")
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of requests")
        ax.grid(alpha=0.3)
    bars = axes[2].bar(["output tokens/s"], [summary["output_throughput"]], width=0.4)
    axes[2].bar_label(bars, fmt="%.0f")
    axes[2].set_title(f"throughput ({summary['request_throughput']:.2f} requests/s)")
    mode = f"rate {summary['rate']}/s" if summary["rate"] else f"concurrency {summary['concurrency']}"
    fig.suptitle(f"{summary['model']} @ {summary['url']}: {mode}, {summary['max_tokens']} output tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str = "python -m app.bench") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Benchmark an OpenAI-compatible server with streaming requests."
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    parser.add_argument("--model", default=None, help="model id (default: the first one /v1/models lists)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients, back to back")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrival rate (req/s) instead of clients")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="approximate prompt length in words")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos / min_tokens")
    parser.add_argument("--suffix", default=None,
                        help="fill-in-the-middle: send this suffix with each prompt (code-completion latency)")
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--out-png", type=Path, default=None)
    cold = parser.add_argument_group(
        "cold start", "with --cold-start: against a model whose autoscaling_config.min_replicas is 0, wait until "
        "Serve reports no replica of it, time one request, --repeats times")
    cold.add_argument("--cold-start", action="store_true", help="measure the cold start from zero replicas")
    cold.add_argument("--repeats", type=int, default=3, help="cold starts to measure")
    cold.add_argument("--ray-address", default="auto", help="the server's Ray cluster, read for its replica count")
    cold.add_argument("--app", default="conduit", help="the Serve application serving --model")
    cold.add_argument("--idle-timeout", type=float, default=600,
                      help="seconds to wait for the model to scale to zero before giving up")
    args = parser.parse_args(argv)
    extra_body = None if args.suffix is None else {"suffix": args.suffix}
    if args.cold_start:
        return cold_start_main(args, extra_body)

    try:
        summary = asyncio.run(run_benchmark(
            args.url, args.model, concurrency=args.concurrency, rate=args.rate, num_requests=args.num_requests,
            prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, chat=args.chat,
            ignore_eos=not args.no_ignore_eos, extra_body=extra_body,
        ))
    except (aiohttp.ClientError, RuntimeError) as e:  # server down or refusing: one line, not a traceback
        print(f"benchmark of {args.url} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    if args.out_json:
        args.out_json.write_text(json.dumps(summary, indent=2))
    if args.out_png:
        plot_summary(summary, args.out_png)
    return 1 if summary["failed"] else 0


def cold_start_main(args: argparse.Namespace, extra_body: dict | None) -> int:
    from app.config import deployment_name

    async def measure() -> dict:
        model = args.model or await first_model_id(args.url)
        counter = ray_replica_counter(args.ray_address, args.app, deployment_name("Model", model))
        return await run_cold_start(args.url, model, counter, args.repeats, args.idle_timeout, args.prompt_tokens,
                                    args.max_tokens, args.chat, extra_body)

    try:
        summary = asyncio.run(measure())
    except (aiohttp.ClientError, ConnectionError, KeyError, TimeoutError) as e:  # KeyError: no such app/deployment
        print(f"cold-start benchmark of {args.url} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print_cold_start(summary)
    if args.out_json:
        args.out_json.write_text(json.dumps(summary, indent=2))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
