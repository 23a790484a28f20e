"""Soak test (not in CI): mixed load on a running Conduit for a set time, then a report of memory
and KV-cache use at the start and the end, and every error by kind. A slow leak shows as growth
between the two snapshots; a stuck request as KV blocks still in use at the end.

    .venv/bin/python bench/soak.py --url http://127.0.0.1:8000 --minutes 30 --concurrency 24 \\
        --ray-address auto --app conduit

The mix, per request: streamed or not, chat or completions, a random max_tokens, and a share of
clients that walk away mid-stream (disconnects must free their slots). With --ray-address the
script also reads each model deployment's engine stats and the RSS of every Serve replica; without
it only the HTTP side is reported. --api-key is sent as `Authorization: Bearer` when the server
has keys."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time

import httpx

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from app.bench import synthetic_prompt  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="conduit-demo")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128, help="upper bound; each request draws 1..this")
    p.add_argument("--drop-share", type=float, default=0.1, help="share of streams abandoned after a chunk")
    p.add_argument("--api-key", default=None)
    p.add_argument("--ray-address", default=None, help="read engine stats and replica memory from this cluster")
    p.add_argument("--app", default="conduit", help="the Serve application name")
    p.add_argument("--json", default=None, help="also write the report here")
    return p.parse_args(argv)


class Tally:
    def __init__(self):
        self.ok = 0
        self.dropped = 0  # abandoned on purpose
        self.errors: collections.Counter[str] = collections.Counter()

    def error(self, kind: str) -> None:
        self.errors[kind] += 1


async def one_request(http: httpx.AsyncClient, args, index: int, tally: Tally) -> None:
    chat = random.random() < 0.5
    stream = random.random() < 0.6
    body = {"model": args.model, "max_tokens": random.randint(1, args.max_tokens), "stream": stream}
    prompt = synthetic_prompt(random.randint(4, 120), index)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        if not stream:
            r = await http.post(path, json=body)
            if r.status_code == 200:
                tally.ok += 1
            else:
                tally.error(f"http {r.status_code} {_code(r.content)}")
            return
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                tally.error(f"http {r.status_code} {_code(await r.aread())}")
                return
            drop = random.random() < args.drop_share
            errored = False
            async for line in r.aiter_lines():
                if drop and line.startswith("data: "):
                    tally.dropped += 1
                    return
                if line.startswith("data: {") and '"error"' in line[:20]:
                    tally.error(f"stream error {_code(line[6:].encode())}")
                    errored = True
            if not errored:
                tally.ok += 1
    except httpx.HTTPError as e:
        tally.error(f"transport {type(e).__name__}")


def _code(raw: bytes) -> str:
    try:
        err = json.loads(raw)["error"]
        return err.get("code") or err.get("type") or "?"
    except (ValueError, KeyError, TypeError):
        return "unparsed body"


async def load(args, tally: Tally) -> None:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    end = time.monotonic() + args.minutes * 60
    counter = iter(range(10**12))

    async def worker(http):
        while time.monotonic() < end:
            await one_request(http, args, next(counter), tally)

    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=600, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(args.concurrency)))


def snapshot(args) -> dict:
    """Engine stats per model deployment and RSS per Serve replica (needs --ray-address)."""
    if not args.ray_address:
        return {}
    import psutil  # noqa: F401  (imported inside each replica by the lambda below)
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=args.ray_address, log_to_driver=False)
    status = serve.status().applications[args.app]

    async def engine_stats(name: str) -> dict:  # handles inside a loop: works with RAY_SERVE_THROUGHPUT_OPTIMIZED
        return await serve.get_deployment_handle(name, app_name=args.app).stats.remote()

    engines = {name: asyncio.run(engine_stats(name)) for name in status.deployments if name.startswith("Model-")}
    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{args.app}#")]
    rss = {}
    for name in replicas:
        actor = ray.get_actor(name, namespace="serve")
        rss[name.split("#", 1)[1]] = ray.get(actor.__ray_call__.remote(
            lambda self: __import__("psutil").Process().memory_info().rss), timeout=30) // 2**20
    return {"engine_stats": engines, "replica_rss_mib": rss}


def main(argv=None) -> None:
    args = parse_args(argv)
    before = snapshot(args)
    tally = Tally()
    started = time.monotonic()
    asyncio.run(load(args, tally))
    time.sleep(1.0)  # let the last aborts reach the engines
    report = {
        "seconds": round(time.monotonic() - started, 1),
        "completed": tally.ok,
        "dropped_on_purpose": tally.dropped,
        "errors_by_kind": dict(tally.errors),
        "start": before,
        "end": snapshot(args),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
