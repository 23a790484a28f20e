"""Fair share between API keys, measured through the HTTP ingress (docs/qos.md has the figures).

  1. steady alone: key B sends one streaming request at a time -> B's idle TTFT p50
  2. flood alone:  key A opens N concurrent streams of T tokens -> A's output tok/s, A's refusals
  3. flood + steady: both at once -> B's TTFT p50 and refusals while A floods, A's tok/s
  4. weights: keys H (weight 3) and L (weight 1) each keep C streams busy for a window -> tok/s ratio

The server must know the four keys, with H's and L's weights in `auth.keys` (docs/qos.md shows the
config). Keys come from the environment, never the command line:

    FLOOD_KEY=... STEADY_KEY=... HEAVY_KEY=... LIGHT_KEY=... \\
        .venv/bin/python bench/fair_share.py --url http://127.0.0.1:8000 [--flood-streams 300 --flood-tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass, field

import httpx

from app.bench import synthetic_prompt


@dataclass
class Stream:
    status: int = 0
    retry_after: float = 0.0  # a refusal's Retry-After, which a client honours before its next request
    sent: float = 0.0
    first: float | None = None  # first content chunk
    done: float | None = None
    tokens: int = 0


@dataclass
class Load:
    streams: list[Stream] = field(default_factory=list)

    def ok(self) -> list[Stream]:
        return [s for s in self.streams if s.status == 200 and s.done is not None]

    def refused(self) -> int:
        return sum(s.status == 503 for s in self.streams)

    def tok_per_s(self) -> float:
        ok = self.ok()
        if not ok:
            return 0.0
        return sum(s.tokens for s in ok) / (max(s.done for s in ok) - min(s.sent for s in self.streams))

    def ttft_p50_ms(self) -> float | None:
        ttfts = [(s.first - s.sent) * 1000 for s in self.ok() if s.first is not None]
        return statistics.median(ttfts) if ttfts else None


async def one_stream(client: httpx.AsyncClient, url: str, model: str, key: str, index: int, tokens: int) -> Stream:
    body = {"model": model, "prompt": synthetic_prompt(32, index), "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    s = Stream(sent=time.monotonic())
    async with client.stream("POST", f"{url}/v1/completions", json=body,
                             headers={"authorization": f"Bearer {key}"}) as response:
        s.status = response.status_code
        if s.status != 200:
            await response.aread()
            s.retry_after = float(response.headers.get("retry-after", 0))
            return s
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["text"] and s.first is None:
                s.first = time.monotonic()
            if chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
    s.done = time.monotonic()
    return s


async def flood(client, url, model, key, streams: int, tokens: int) -> Load:
    return Load(list(await asyncio.gather(*(one_stream(client, url, model, key, i, tokens) for i in range(streams)))))


async def one_at_a_time(client, url, model, key, until: asyncio.Event | None, count: int, tokens: int) -> Load:
    load = Load()
    for i in range(count):
        if until is not None and until.is_set():
            break
        load.streams.append(await one_stream(client, url, model, key, 10_000 + i, tokens))
    return load


async def flood_and_steady(client, url, model, keys, args) -> tuple[Load, Load]:
    flood_over = asyncio.Event()

    async def flood_then_flag() -> Load:
        try:
            return await flood(client, url, model, keys["flood"], args.flood_streams, args.flood_tokens)
        finally:
            flood_over.set()

    flooding = asyncio.create_task(flood_then_flag())
    await asyncio.sleep(args.flood_ramp_s)  # the flood's streams are all open (or refused) by then
    steady = await one_at_a_time(client, url, model, keys["steady"], flood_over, 10_000, args.steady_tokens)
    return await flooding, steady


async def weighted(client, url, model, keys, args) -> dict[str, float]:
    """Tokens per second each key got from streams that ended inside the window (after a warm-up)."""
    stop = asyncio.Event()
    finished: dict[str, list[Stream]] = {"heavy": [], "light": []}

    async def client_loop(name: str, index: int) -> None:
        while not stop.is_set():
            stream = await one_stream(client, url, model, keys[name], index, args.weight_tokens)
            finished[name].append(stream)
            await asyncio.sleep(stream.retry_after)  # as the official SDKs do after a 503

    tasks = [asyncio.create_task(client_loop(name, i)) for name in finished for i in range(args.weight_streams)]
    await asyncio.sleep(args.warmup_s)
    start = time.monotonic()
    await asyncio.sleep(args.window_s)
    end = time.monotonic()
    stop.set()
    await asyncio.gather(*tasks)
    rates = {name: sum(s.tokens for s in streams if s.done and start <= s.done <= end) / (end - start)
             for name, streams in finished.items()}
    rates["refused"] = sum(s.status == 503 for streams in finished.values() for s in streams)
    return rates


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


async def main_async(args) -> dict:
    keys = {name: os.environ[f"{name.upper()}_KEY"] for name in ("flood", "steady", "heavy", "light")}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        model = args.model
        results: dict = {}
        if args.only == "weights":
            return {"weights": await weighted_result(client, args.url, model, keys, args)}
        print("1/4 steady key alone", flush=True)
        idle = await one_at_a_time(client, args.url, model, keys["steady"], None, args.steady_requests,
                                   args.steady_tokens)
        results["steady_idle_ttft_ms_p50"] = idle.ttft_p50_ms()
        print("2/4 flood alone", flush=True)
        alone = await flood(client, args.url, model, keys["flood"], args.flood_streams, args.flood_tokens)
        results["flood_alone"] = {"tok_per_s": alone.tok_per_s(), "accepted": len(alone.ok()),
                                  "refused": alone.refused()}
        print("3/4 flood + steady", flush=True)
        mixed, steady = await flood_and_steady(client, args.url, model, keys, args)
        results["flood_with_steady"] = {"tok_per_s": mixed.tok_per_s(), "accepted": len(mixed.ok()),
                                        "refused": mixed.refused()}
        results["steady_during_flood"] = {"ttft_ms_p50": steady.ttft_p50_ms(), "requests": len(steady.streams),
                                          "refused": steady.refused(),
                                          "failed": sum(s.status not in (200, 503) for s in steady.streams)}
        if args.only != "flood":
            print("4/4 weights 3:1, both saturating", flush=True)
            results["weights"] = await weighted_result(client, args.url, model, keys, args)
    return results


async def weighted_result(client, url, model, keys, args) -> dict:
    rates = await weighted(client, url, model, keys, args)
    return {**rates, "ratio": rates["heavy"] / rates["light"] if rates["light"] else None}


def report(results: dict, args) -> str:
    lines = []
    if "flood_alone" in results:
        lines += flood_report(results, args)
    if "weights" in results:
        w = results["weights"]
        lines += [f"weights: {args.weight_streams} + {args.weight_streams} streams x {args.weight_tokens} tokens, "
                  f"{args.window_s:.0f} s window: tok/s heavy (3) / light (1) {fmt(w['heavy'])} / {fmt(w['light'])} "
                  f"= {fmt(w['ratio'], 2)} (target 2.5-3.5), {w['refused']} refused"]
    return "\n".join(lines)


def flood_report(results: dict, args) -> list[str]:
    a, m, s = results["flood_alone"], results["flood_with_steady"], results["steady_during_flood"]
    ratio_a = m["tok_per_s"] / a["tok_per_s"] if a["tok_per_s"] else None
    return [
        f"flood: {args.flood_streams} streams x {args.flood_tokens} tokens; steady: one at a time x "
        f"{args.steady_tokens} tokens",
        "| figure | value | target |",
        "|---|---|---|",
        f"| B's TTFT p50 alone | {fmt(results['steady_idle_ttft_ms_p50'])} ms | |",
        f"| B's TTFT p50 during A's flood | {fmt(s['ttft_ms_p50'])} ms | <= 2 x alone + one engine step |",
        f"| B's requests during the flood: refused / failed / sent | {s['refused']} / {s['failed']} / {s['requests']}"
        " | 0 refused |",
        f"| A's output tok/s alone / with B | {fmt(a['tok_per_s'])} / {fmt(m['tok_per_s'])} "
        f"({fmt(ratio_a, 2)} x) | >= 0.9 x |",
        f"| A's streams accepted / refused (alone; with B) | {a['accepted']} / {a['refused']}; "
        f"{m['accepted']} / {m['refused']} | |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="conduit-demo")
    parser.add_argument("--flood-streams", type=int, default=300)
    parser.add_argument("--flood-tokens", type=int, default=256)
    parser.add_argument("--flood-ramp-s", type=float, default=3.0, help="B starts this long after A's flood")
    parser.add_argument("--steady-requests", type=int, default=20, help="B's requests measured alone")
    parser.add_argument("--steady-tokens", type=int, default=16)
    parser.add_argument("--weight-streams", type=int, default=32, help="streams each weighted key keeps busy")
    parser.add_argument("--weight-tokens", type=int, default=64)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--only", choices=["flood", "weights"], default=None, help="run one part only")
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    print(json.dumps(results, indent=2))
    print(report(results, args))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
