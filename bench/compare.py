"""Conduit side by side with what it should be judged against, on the tiny demo model, in one run:

  (a) ceiling    batched greedy decode in-process (transformers + DynamicCache), no serving at all
  (a2) engine    Conduit's engine in-process under the served load (N sequences in flight, back to back),
                 with the model replica's torch threads: splits the gap between (a) and (b)
  (a3) engine    the same on the ceiling's threads: how much of the gap to (a) is the engine's own
  (b) Conduit    through its HTTP front, HAProxy (`conduit run serve_config.yaml`), N streaming clients
  (b1) Conduit   the same behind Ray's Python HTTP proxy, the front before (`conduit run --front ray-proxy`)
  (c) transformers serve --continuous-batching, same model directory, same clients
  (d) unbatched  `transformers serve` without continuous batching, one request at a time

then the ratios the project targets. Writes <out-dir>/benchmark.md, .png and .json.

    .venv/bin/python bench/compare.py [--concurrency 32] [--max-tokens 64] [--prompt-tokens 64] [--out-dir docs]
        [--sweep 32,128,256] [--baseline-tree ../conduit-before]

(b) and (b1) also run 128 and 256 streams (--sweep) in the same server, its batch slots raised to the
largest; --baseline-tree runs an earlier commit's Conduit the same way, beside this one.

Every served system gets one unmeasured load of its measured kind first (first-call costs, first touch
of the KV cache's pages), as (a), (a2) and (a3) get warm-up runs; and every load, warm-up included, sends
prompts of its own, so no system's prefix cache serves one load from an earlier one.

Servers listen on 127.0.0.1 only. Conduit needs port 8000 (serve_config.yaml); if it is busy this
waits for it rather than benchmark whatever is there.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app.bench import run_benchmark, synthetic_prompt
from app.config import PROJECT_ROOT
from app.demo_model import build_demo_model
from app.front import free_port

MODEL_DIR = PROJECT_ROOT / ".cache" / "demo-model"
VENV_BIN = Path(sys.executable).parent
CONDUIT_URL, CONDUIT_MODEL = "http://127.0.0.1:8000", "conduit-demo"
TARGETS = {"ceiling": 0.8, "cb": 2.0, "unbatched": 5.0, "ttft_overhead_ms": 15.0, "serving_path_ms": 0.1}
# each load's first prompt index (app/bench.py `first_index`): no two loads share a prompt
PROMPT_RANGES = itertools.count(0, 1_000_000)
# Conduit runs, side by side: this tree with each front, and --baseline-tree's with its own default
VARIANTS = {"conduit": "(b) Conduit, HAProxy front", "ray_proxy": "(b1) Conduit, Ray's Python proxy front",
            "baseline": "(b0) Conduit at {commit} (`--baseline-tree`)"}


def phase(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


# (a) in-process ceiling -----------------------------------------------------------------------
CEILING_THREADS = 2  # the ceiling's torch threads: this machine's cores, as (c) and (d) use them


def raw_ceiling(batch: int, prompt_words: int, max_tokens: int) -> dict:
    """The fastest this model decodes here with no serving at all: one batch, equal-length prompts
    (so no padding or masks), prefill once, then `max_tokens - 1` argmax steps on a KV cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    torch.set_num_threads(CEILING_THREADS)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompts = [tokenizer(synthetic_prompt(prompt_words, i))["input_ids"] for i in range(batch)]
    length = min(len(p) for p in prompts)  # cut to one length: no padding needed
    ids = torch.tensor([p[:length] for p in prompts])

    @torch.inference_mode()
    def generate(input_ids, steps: int) -> tuple[float, list[float]]:
        """Returns (prefill + first token seconds, decode step seconds)."""
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        token.tolist()  # a real server must read the token out before it can send it
        first = time.perf_counter() - start
        step_times = []
        for _ in range(steps - 1):
            t = time.perf_counter()
            out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            token.tolist()
            step_times.append(time.perf_counter() - t)
        return first, step_times

    generate(ids, 4)  # warm-up: first calls allocate and pick kernels
    runs = []
    for _ in range(3):
        cpu_start = time.process_time()
        first, steps = generate(ids, max_tokens)
        runs.append((first + sum(steps), first, steps, time.process_time() - cpu_start))
    total, first, steps, cpu = min(runs)  # a ceiling: the best of three
    # whole prompts, one at a time: the batch's are cut to its shortest, the served requests' are not
    singles = itertools.islice(itertools.cycle(prompts), 20)
    ttft_b1 = statistics.median(generate(torch.tensor([p]), 1)[0] for p in singles)
    return {
        "output_throughput": batch * max_tokens / total,
        "prompt_tokens": length,  # the batch's, cut to its shortest
        "mean_prompt_tokens": statistics.mean(map(len, prompts)),
        "prefill_s_batch": first,
        "ttft_ms_p50": ttft_b1 * 1e3,  # batch 1: the least a server could answer in
        "tpot_ms_p50": statistics.median(steps) * 1e3,  # one decode step = one token for each sequence
        "cpu_ms_per_token": cpu * 1e3 / (batch * max_tokens),
    }


def replica_threads() -> int:
    """The served model replica's torch threads: engine.num_threads, else its num_cpus (deployments/model.py)."""
    import yaml

    app = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())["applications"][0]
    model = next(m for m in app["args"]["models"] if m["name"] == CONDUIT_MODEL)
    options = next(d for d in app["deployments"] if d["name"] == f"Model-{CONDUIT_MODEL}")
    return model["engine"].get("num_threads") or max(1, int(options["ray_actor_options"].get("num_cpus", 1)))


def engine_alone(concurrency: int, prompt_words: int, max_tokens: int, num_requests: int, threads: int) -> dict:
    """Conduit's engine with no serving around it, under the served runs' load: `concurrency`
    sequences in flight, the next request added as one finishes, on `threads` torch threads. On the
    replica's thread count (a2), what lies between this and the served rate is the serving path's; on
    the ceiling's (a3), what lies between this and the ceiling is the engine's (prefills between decode
    steps, the paged cache, per-request sampling)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.config import EngineConfig
    from app.engine.engine import LLMEngine
    from app.engine.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=concurrency, max_model_len=1024).resolved(1024))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def run(total: int) -> tuple[float, float]:
        first = next(PROMPT_RANGES)  # prompts of its own: the prefix cache must not serve one run from another

        def add(i: int) -> None:
            engine.add_request(str(i), tokenizer(synthetic_prompt(prompt_words, first + i))["input_ids"], params)

        sent = tokens = 0
        for sent in range(min(concurrency, total)):
            add(sent)
        sent += 1
        start, cpu_start = time.perf_counter(), time.process_time()
        while engine.has_work():
            for out in engine.step():
                tokens += len(out.token_ids)
                if out.finished and sent < total:
                    add(sent)
                    sent += 1
        return tokens / (time.perf_counter() - start), (time.process_time() - cpu_start) * 1e3 / tokens

    run(concurrency)  # warm-up: the attention kernel's compilations, first-touch pages
    throughput, cpu = max(run(num_requests) for _ in range(2))
    return {"output_throughput": throughput, "cpu_ms_per_token": cpu, "threads": threads,
            "ttft_ms_p50": None, "tpot_ms_p50": None}


def engine_alone_run(args, threads: int) -> dict:
    result = engine_alone(args.concurrency, args.prompt_tokens, args.max_tokens, args.num_requests, threads)
    print(f"  {result['output_throughput']:.0f} tok/s on {threads} thread(s), "
          f"{result['cpu_ms_per_token']:.2f} CPU-ms per token", flush=True)
    return result


def sequential_generate(prompt_words: int, max_tokens: int, num_requests: int) -> dict:
    """Fallback unbatched baseline: `model.generate` one request at a time, in-process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(CEILING_THREADS)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    start, tokens = time.perf_counter(), 0
    for i in range(num_requests):
        ids = tokenizer(synthetic_prompt(prompt_words, i), return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    return {"output_throughput": tokens / (time.perf_counter() - start), "ttft_ms_p50": None, "tpot_ms_p50": None}


# servers --------------------------------------------------------------------------------------
def port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Server:
    """A server in its own session (process group), so it and everything it spawns (Ray's
    processes included) can be stopped together, and found by session id if anything lingers."""

    def __init__(self, name: str, cmd: list[str], env: dict | None = None, cwd: Path = PROJECT_ROOT):
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, url: str, model: str, timeout: float = 240) -> None:
        """/v1/models answering 200, then one small completion succeeding (the model is loaded)."""
        deadline = time.monotonic() + timeout
        body = {"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0}
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
                try:
                    if client.get("/v1/models").status_code == 200 and \
                            client.post("/v1/completions", json=body).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        # SIGINT is Ctrl-C: `serve run` shuts Serve and its own Ray instance down cleanly on it.
        # Then escalate, and finally kill by pid anything still in the session we created.
        for sig, grace in ((signal.SIGINT, 60), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(grace)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        for pid in session_members(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def session_members(sid: int) -> list[int]:
    """Pids whose session id is `sid` (Linux /proc; field 6 of /proc/PID/stat)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def cpu_seconds_by_process(sid: int) -> dict[int, tuple[str, float]]:
    """Per pid in session `sid`: (its title, its CPU seconds so far, user + system). Ray names its
    workers `ray::ServeReplica:<app>:<deployment>`, `ray::ProxyActor`, ... and appends the method
    running now (`ray::ServeController.listen_for_change`), which is stripped: the title changes
    while the process lives, so the CPU deltas are taken per pid, never per title."""
    import psutil

    found: dict[int, tuple[str, float]] = {}
    for pid in session_members(sid):
        try:
            proc = psutil.Process(pid)
            title = (proc.cmdline() or [proc.name()])[0].split(" ")[0]
            times = proc.cpu_times()
        except (psutil.Error, IndexError):
            continue
        if title.startswith("ray::"):
            title = re.sub(r"\.[A-Za-z_]\w*$", "", title).removeprefix("ray::ServeReplica:conduit:")
        else:
            title = proc.name()
        found[pid] = (title, times.user + times.system)
    return found


def direct_ingress_port(sid: int) -> int | None:
    """The port on which the Ingress replica itself serves HTTP (Serve's direct ingress, on in its
    throughput-optimized mode): the Python HTTP proxy on :8000 forwards every request and chunk to it."""
    import psutil

    for pid in session_members(sid):
        try:
            proc = psutil.Process(pid)
            if not (proc.cmdline() or [""])[0].startswith("ray::ServeReplica:conduit:Ingress"):
                continue
            ports = [c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
        return min(ports) if ports else None
    return None


def cpu_ms_per_token(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                     tokens: int) -> dict[str, float]:
    """Where a served token's CPU goes: each process's CPU during the run, per output token, summed by
    title (a process started during the run counts from zero). On a 2-core box the sum bounds
    throughput at 2000 / sum tok/s, however the work is scheduled."""
    spent: dict[str, float] = {}
    for pid, (title, seconds) in after.items():
        spent[title] = spent.get(title, 0.0) + (seconds - before.get(pid, (title, 0.0))[1]) * 1e3 / tokens
    return dict(sorted(((n, v) for n, v in spent.items() if v >= 0.01), key=lambda kv: -kv[1]))


def bench(url: str, model: str, **kw) -> dict:
    summary = asyncio.run(run_benchmark(url, model, first_index=next(PROMPT_RANGES), **kw))
    print(f"  {summary['completed']} ok, {summary['failed']} failed: {summary['output_throughput']:.0f} tok/s, "
          f"TTFT p50 {summary['ttft_ms']['p50']:.1f} ms, TPOT p50 {summary['tpot_ms']['p50']:.1f} ms", flush=True)
    if summary["failed"]:
        raise RuntimeError(f"{summary['failed']} requests failed: {summary['errors']}")
    return summary


def row(summary: dict, max_tokens: int) -> dict:
    """The table's figures from a run_benchmark summary; flags runs that stopped short (EOS)."""
    short = summary["total_output_tokens"] != summary["completed"] * max_tokens
    return {"output_throughput": summary["output_throughput"], "ttft_ms_p50": summary["ttft_ms"]["p50"],
            "tpot_ms_p50": summary["tpot_ms"]["p50"], "all_full_length": not short,
            "summary": {k: v for k, v in summary.items() if k != "requests"}}


def sweep_config(args, path: Path) -> Path:
    """serve_config.yaml with batch slots, KV cache and queues for the largest sweep load: every
    stream of it decodes at once (`max_num_seqs`), nothing waits in Serve's or the engine's queue;
    one model replica (no autoscaling), so every load runs on the same engine."""
    import yaml

    most = max(args.sweep)
    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    app = config["applications"][0]
    model = next(m for m in app["args"]["models"] if m["name"] == CONDUIT_MODEL)
    per_sequence = -(-(2 * args.prompt_tokens + args.max_tokens + 16) // 16)  # blocks; ~2 tokens a word
    model["engine"].update(max_num_seqs=most, max_waiting=most, num_kv_blocks=most * per_sequence)
    options = next(d for d in app["deployments"] if d["name"] == f"Model-{CONDUIT_MODEL}")
    options.pop("autoscaling_config", None)  # one model replica throughout: a second would share the 2 cores
    options.pop("max_ongoing_requests", None)  # the builder derives it from the engine (app/resources.py)
    options.update(num_replicas=1, max_queued_requests=2 * most)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_conduit(args, tree: Path = PROJECT_ROOT, front: str | None = None) -> dict:
    """Conduit from `tree` (this checkout, or --baseline-tree: an earlier commit's checkout, run with
    this venv) through its HTTP front (`front`: `conduit run --front`; None: the tree's default): the
    loaded run with its CPU profile, 1 client, the sweep; for this tree's default front also the same
    loads straight to the Ingress replica's port."""
    waited = 0
    while port_busy(8000):  # someone else's server: wait rather than measure it
        if waited % 30 == 0:
            print("  port 8000 is busy; waiting for it to be free ...", flush=True)
        time.sleep(5)
        waited += 5
        if waited > 600:
            raise RuntimeError("port 8000 stayed busy for 10 minutes")
    # RAY_ADDRESS=local: always a fresh Ray instance of our own, never one already running here
    config = sweep_config(args, Path(tempfile.mkdtemp()) / "serve_config.yaml")
    server = Server("conduit", [sys.executable, "-m", "app.cli", "run", str(config),
                                *(["--front", front] if front else [])], cwd=tree,
                    env={"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local", "PYTHONPATH": str(tree)})
    try:
        started = time.monotonic()
        server.wait_ready(CONDUIT_URL, CONDUIT_MODEL)
        print(f"  ready in {time.monotonic() - started:.0f} s; warm-up, {args.concurrency} clients (not measured) ...",
              flush=True)
        loaded_run(CONDUIT_URL, args)
        print(f"  {args.concurrency} clients ...", flush=True)
        cpu_before = cpu_seconds_by_process(server.proc.pid)
        client_before = time.process_time()
        loaded = loaded_run(CONDUIT_URL, args)
        tokens = loaded["total_output_tokens"]
        profile = cpu_ms_per_token(cpu_before, cpu_seconds_by_process(server.proc.pid), tokens)
        profile["benchmark client (this process)"] = (time.process_time() - client_before) * 1e3 / tokens
        print("  CPU ms per output token:", ", ".join(f"{n} {v:.2f}" for n, v in profile.items()), flush=True)
        print(f"  serving path (all but the model replica and the client): {serving_path(profile):.2f}", flush=True)
        print("  1 client (TTFT) ...", flush=True)
        single = single_client_run(CONDUIT_URL, args)
        sweep = {args.concurrency: row(loaded, args.max_tokens)}
        for clients in (c for c in args.sweep if c != args.concurrency):
            print(f"  {clients} clients ...", flush=True)
            sweep[clients] = row(loaded_run(CONDUIT_URL, args, clients), args.max_tokens)
        direct = bypass_front(server.proc.pid, args) if tree == PROJECT_ROOT and front is None else {}
    finally:
        print("  stopping Conduit ...", flush=True)
        server.stop()
    return {"loaded": row(loaded, args.max_tokens), "single": row(single, args.max_tokens), "cpu_profile": profile,
            "sweep": {str(c): sweep[c] for c in sorted(sweep)}, "commit": commit_of(tree), **direct}


def commit_of(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=False,
                          capture_output=True, text=True).stdout.strip() or "?"


def serving_path(profile: dict[str, float]) -> float:
    """CPU ms per output token of every process but the model replica and the load generator: what
    carrying tokens from the engine to the client costs (proxy, ingress, tokenizer, Ray's own)."""
    return sum(v for name, v in profile.items() if not name.startswith(("Model-", "benchmark client")))


def bypass_front(sid: int, args) -> dict:
    """The same loads sent straight to the Ingress replica's own HTTP port: the front's share."""
    port = direct_ingress_port(sid)
    if port is None:
        print("  no direct-ingress port found; skipping the front-bypass runs", flush=True)
        return {}
    url = f"http://127.0.0.1:{port}"
    print(f"  the same, straight to the Ingress replica on :{port} (no front) ...", flush=True)
    loaded, single = loaded_run(url, args), single_client_run(url, args)
    return {"direct_loaded": row(loaded, args.max_tokens), "direct_single": row(single, args.max_tokens)}


def loaded_run(url: str, args, clients: int | None = None) -> dict:
    """`clients` streaming clients (default --concurrency); past it, 2 requests per client."""
    clients = clients or args.concurrency
    requests = args.num_requests if clients == args.concurrency else 2 * clients
    return bench(url, CONDUIT_MODEL, concurrency=clients, num_requests=requests,
                 prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens)


def single_client_run(url: str, args) -> dict:
    """1 client: TTFT without queueing."""
    return bench(url, CONDUIT_MODEL, concurrency=1, num_requests=10,
                 prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens)


def run_transformers_serve(args, continuous_batching: bool) -> dict:
    port = free_port()
    url, model = f"http://127.0.0.1:{port}", str(MODEL_DIR)  # the forced model's id is its path
    flag = "--continuous-batching" if continuous_batching else "--no-continuous-batching"
    server = Server("transformers-serve", [str(VENV_BIN / "transformers"), "serve", flag, "--host", "127.0.0.1",
                                           "--port", str(port), "--device", "cpu", model])
    try:
        server.wait_ready(url, model, timeout=120)
        # transformers serve refuses unknown fields (ignore_eos, min_tokens): plain greedy requests;
        # row() checks every request still produced max_tokens tokens.
        if continuous_batching:
            kw = {"concurrency": args.concurrency, "num_requests": args.num_requests}
        else:  # sequential generation: one client, a few requests, is the whole story
            kw = {"concurrency": 1, "num_requests": args.baseline_requests}
        print("  warm-up (not measured) ...", flush=True)
        for _ in range(2):  # the second is the measured one
            summary = bench(url, model, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                            ignore_eos=False, **kw)
    finally:
        server.stop()
    return row(summary, args.max_tokens)


# report ---------------------------------------------------------------------------------------
def machine() -> dict:
    import ray
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "nproc": subprocess.run(["nproc"], check=False, capture_output=True, text=True).stdout.strip(),
        "cpu": cpu,
        "free_g": subprocess.run(["free", "-g"], check=False, capture_output=True, text=True).stdout.rstrip(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__, "ray": ray.__version__, "transformers": transformers.__version__,
    }


def fmt(value, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def ratio_rows(results: dict) -> list[tuple[str, float | None, str, bool | None]]:
    conduit = results["conduit"]["loaded"]["output_throughput"] if "conduit" in results else None

    def ratio(key: str) -> float | None:
        other = results.get(key)
        return conduit / other["output_throughput"] if conduit and other else None

    served_over_engine = conduit / results["engine"]["output_throughput"] if conduit and "engine" in results else None
    overhead = None
    if "conduit" in results:
        overhead = results["conduit"]["single"]["ttft_ms_p50"] - results["ceiling"]["ttft_ms_p50"]
    rows = [
        ("Conduit / in-process ceiling (tok/s)", ratio("ceiling"), f">= {TARGETS['ceiling']}", TARGETS["ceiling"]),
        ("Conduit / transformers serve CB (tok/s)", ratio("cb"), f">= {TARGETS['cb']}", TARGETS["cb"]),
        ("Conduit / unbatched (tok/s)", ratio("unbatched"), f">= {TARGETS['unbatched']}", TARGETS["unbatched"]),
    ]
    out = [(name, v, target, None if v is None else v >= t) for name, v, target, t in rows]
    out.append(("Conduit / its engine alone under the same load (tok/s)", served_over_engine, "(what serving keeps)",
                None))
    if "engine_all" in results:
        out.append((f"engine alone on {CEILING_THREADS} threads / in-process ceiling (tok/s)",
                    results["engine_all"]["output_throughput"] / results["ceiling"]["output_throughput"],
                    "(the engine's own share of the gap)", None))
    limit = TARGETS["ttft_overhead_ms"]
    out.append(("single-client TTFT p50 - raw prefill+first token (ms)", overhead, f"<= {limit:.0f}",
                None if overhead is None else overhead <= limit))
    path = serving_path(results["conduit"]["cpu_profile"]) if "conduit" in results else None
    limit = TARGETS["serving_path_ms"]
    out.append(("serving path CPU per output token (ms)", path, f"<= {limit}", None if path is None else path <= limit))
    sweep = results.get("conduit", {}).get("sweep", {})
    if len(sweep) > 1:
        first, *more = sweep.values()
        worst = min(r["output_throughput"] for r in more) / first["output_throughput"]
        out.append((f"tok/s at {', '.join(list(sweep)[1:])} streams / at {list(sweep)[0]} (lowest)", worst,
                    ">= 1.0", worst >= 1.0))
    return out


def markdown(results: dict, unavailable: dict, args, info: dict, command: str) -> str:
    c, m = args.concurrency, args.max_tokens
    labels = {
        "ceiling": f"(a) in-process ceiling: batch {c}, greedy + DynamicCache, no serving",
        "engine": (f"(a2) Conduit's engine alone, in-process: {c} sequences in flight back to back, "
                   f"{results.get('engine', {}).get('threads', '?')} torch thread(s) as the replica, no serving"),
        "engine_all": (f"(a3) the same engine alone on the ceiling's {CEILING_THREADS} torch threads "
                       f"(what the engine makes of every core)"),
        "cb": f"(c) transformers serve --continuous-batching, {c} clients",
        "unbatched": "(d) unbatched: one request at a time",
    }
    lines = ["| system | output tok/s | TTFT p50 (ms) | TPOT p50 (ms) |", "|---|---:|---:|---:|"]
    entries = [("ceiling", results.get("ceiling")), ("engine", results.get("engine"))]
    if "engine_all" in results:
        entries.append(("engine_all", results["engine_all"]))
    for key in VARIANTS:
        if key == "baseline" and key not in results and key not in unavailable:
            continue
        name = variant_name(results, key)
        labels[key], labels[key + "1"] = f"{name}, {c} streaming clients", f"{name}, 1 client"
        entries += [(key, results.get(key, {}).get("loaded")), (key + "1", results.get(key, {}).get("single"))]
    entries += [("cb", results.get("cb")), ("unbatched", results.get("unbatched"))]
    for key, r in entries:
        if r is None:
            reason = unavailable.get(key.removesuffix("1"), "not run")
            lines.append(f"| {labels[key]} | unavailable: {reason} | | |")
            continue
        note = "" if r.get("all_full_length", True) else " (some requests ended early at EOS)"
        lines.append(f"| {labels[key]}{note} | {fmt(r['output_throughput'])} | {fmt(r['ttft_ms_p50'], 1)} | "
                     f"{fmt(r['tpot_ms_p50'], 1)} |")
    table = "\n".join(lines)
    ratios = ["| ratio | value | target | met |", "|---|---:|---:|:---:|"]
    for name, value, target, met in ratio_rows(results):
        ratios.append(f"| {name} | {fmt(value, 1 if 'TTFT' in name else 2)} | {target} | "
                      f"{'n/a' if met is None else ('yes' if met else 'no')} |")
    unbatched_how = results.get("unbatched", {}).get("how", "not run")
    return f"""# Benchmark: Conduit side by side

{c} concurrent streaming clients (`/v1/completions`, `stream: true`), {m} output tokens per request,
prompts of ~{args.prompt_tokens} words ({fmt(results.get('ceiling', {}).get('mean_prompt_tokens'))} tokens on average; (a)'s batch
cut to its shortest, {results.get('ceiling', {}).get('prompt_tokens', '?')}, so that it needs no padding), greedy,
{args.num_requests} requests per loaded run, on the tiny random demo model (`.cache/demo-model`: Llama,
4 layers, hidden 256, vocab 3000). Every prompt of the run is its own (no prefix cache reuses one
request's prefill for another), and each served system gets one unmeasured load of the measured kind
first, as (a), (a2) and (a3) get warm-up runs.

{table}

TTFT for (a) is prefill + first token at batch 1 (the least a server could answer in); TPOT for (a) is
one decode step of the batch of {c}. Conduit sends `ignore_eos`/`min_tokens` so every request makes
exactly {m} tokens; transformers serve refuses those fields, so its requests are plain greedy ones and
the table flags any run where a request ended before {m} tokens. The unbatched baseline (d) is
{unbatched_how}.

{chr(10).join(ratios)}

{cpu_section(results)}

{sweep_section(results)}

## Machine

- CPUs (`nproc`): {info['nproc']} ({info['cpu']}); load average at start: {info['loadavg']}
- Python {info['python']}, torch {info['torch']}, ray {info['ray']}, transformers {info['transformers']}
- the in-process ceiling uses `torch.set_num_threads(2)`; servers use their own defaults (Conduit's
  model replica sizes its threads from `num_cpus` in `serve_config.yaml`, or `engine.num_threads`)

```
$ free -g
{info['free_g']}
```

## Command

```
{command}
```

![tok/s](benchmark.png)

Single-request latencies (fill-in-the-middle, cold start from zero replicas): [latency.md](latency.md).
Sampled stacks of the model and Ingress replicas under this load: [profile.md](profile.md).
Ray Serve's HAProxy mode, Conduit's front: [haproxy-mode.md](haproxy-mode.md).
"""


def variant_name(results: dict, key: str) -> str:
    commit = results.get(key, {}).get("commit", "?")
    return VARIANTS[key].format(commit=commit)


def cpu_section(results: dict) -> str:
    """Where the time goes: CPU per output token in each process of the served run, next to the
    in-process ceiling's. With 2 cores, 2000 / total is the most tok/s any scheduling could give."""
    profile = results.get("conduit", {}).get("cpu_profile")
    if not profile or "ceiling" not in results:
        return ""
    total = sum(profile.values())
    runs = {key: results[key]["cpu_profile"] for key in VARIANTS if results.get(key, {}).get("cpu_profile")}
    names = list(dict.fromkeys(name for run in runs.values() for name in run))
    lines = ["## Where the time goes (CPU ms per output token, loaded run)", "",
             "| process | " + " | ".join(variant_name(results, key) for key in runs) + " |",
             "|---|" + "---:|" * len(runs)]
    lines += [f"| {name} | " + " | ".join(f"{run.get(name, 0):.2f}" for run in runs.values()) + " |" for name in names]
    lines.append("| **serving path: all but the model replica and the client** | "
                 + " | ".join(f"**{serving_path(run):.2f}**" for run in runs.values()) + " |")
    lines.append("| **all processes** | " + " | ".join(f"**{sum(run.values()):.2f}**" for run in runs.values()) + " |")
    lines.append(f"| (a) in-process ceiling, for comparison | {results['ceiling']['cpu_ms_per_token']:.2f} |")
    if "engine" in results:
        lines.append(f"| (a2) Conduit's engine alone, for comparison | {results['engine']['cpu_ms_per_token']:.2f} |")
    if "engine_all" in results:
        lines.append(f"| (a3) the engine alone on {CEILING_THREADS} threads, for comparison | "
                     f"{results['engine_all']['cpu_ms_per_token']:.2f} |")
    cores = os.cpu_count() or 1
    lines += ["", f"On {cores} cores this CPU bill alone caps the served rate at {cores * 1e3 / total:,.0f} tok/s, "
              f"whatever the scheduling; the ceiling's bill caps it at "
              f"{cores * 1e3 / results['ceiling']['cpu_ms_per_token']:,.0f} tok/s."]
    return "\n".join(lines + front_lines(results))


def sweep_section(results: dict) -> str:
    """Throughput and TTFT as the number of streams grows, in one server (and the baseline's)."""
    runs = [(variant_name(results, key), results[key]["sweep"]) for key in VARIANTS if "sweep" in results.get(key, {})]
    if not runs:
        return ""
    lines = ["## More streams (same server: batch slots for the largest load)", "",
             "| Conduit | clients | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, sweep in runs:
        for clients, r in sweep.items():
            lines.append(f"| {name} | {clients} | {fmt(r['output_throughput'])} | {fmt(r['ttft_ms_p50'], 1)} | "
                         f"{fmt(r['summary']['ttft_ms'].get('p99'), 1)} | {fmt(r['tpot_ms_p50'], 1)} |")
    return "\n".join(lines)


def front_lines(results: dict) -> list[str]:
    """The front's share: each front's loads next to the same loads sent straight to the Ingress
    replica's own HTTP port (Serve's direct ingress) in the HAProxy-front server."""
    conduit = results["conduit"]
    if "direct_loaded" not in conduit:
        return []
    paths = [("client -> HAProxy :8000 -> Ingress", conduit["loaded"], conduit["single"])]
    if "ray_proxy" in results:
        paths.append(("client -> Ray proxy :8000 -> Ingress (another server)", results["ray_proxy"]["loaded"],
                      results["ray_proxy"]["single"]))
    paths.append(("client -> Ingress replica port", conduit["direct_loaded"], conduit["direct_single"]))
    return ["", "The front's share: the same runs sent straight to the Ingress replica's own HTTP port:", "",
            "| path | output tok/s | 1-client TTFT p50 (ms) |", "|---|---:|---:|",
            *(f"| {name} | {fmt(loaded['output_throughput'])} | {fmt(single['ttft_ms_p50'], 1)} |"
              for name, loaded, single in paths)]


def plot(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"ceiling": "(a) in-process\nceiling", "engine": "(a2) engine\nalone", "engine_all": "(a3) engine\nalone, all cores",
             "conduit": "(b) Conduit\nHAProxy",
             "ray_proxy": "(b1) Conduit\nRay proxy", "baseline": "(b0) Conduit\nbaseline",
             "cb": "(c) transformers\nserve CB", "unbatched": "(d) unbatched"}
    keys = [k for k in names if k not in ("baseline", "engine_all") or k in results]  # only when measured
    values = [(results[k]["loaded"] if k in VARIANTS else results[k])["output_throughput"]
              if k in results else 0.0 for k in keys]
    fig, (ax, sweep_tps, sweep_ttft) = plt.subplots(1, 3, figsize=(19, 4.5), width_ratios=[2, 1, 1])
    colors = {"ceiling": "0.6", "engine": "0.8", "engine_all": "0.7", "conduit": "C0", "ray_proxy": "C3", "baseline": "C4", "cb": "C1", "unbatched": "C2"}
    bars = ax.bar([names[k] for k in keys], values, color=[colors[k] for k in keys])
    ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "n/a" for v in values])
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"demo model, {args.concurrency} streaming clients x {args.max_tokens} tokens")
    for key, color in (("conduit", "C0"), ("ray_proxy", "C3"), ("baseline", "C4")):
        sweep = results.get(key, {}).get("sweep")
        if not sweep:
            continue
        clients = [int(c) for c in sweep]
        label = variant_name(results, key).split(") ", 1)[1]
        sweep_tps.plot(clients, [r["output_throughput"] for r in sweep.values()], "o-", color=color, label=label)
        sweep_ttft.plot(clients, [r["ttft_ms_p50"] for r in sweep.values()], "o-", color=color, label=label)
    for axis, what in ((sweep_tps, "output tokens/s"), (sweep_ttft, "TTFT p50 (ms)")):
        axis.set_xlabel("concurrent streams")
        axis.set_ylabel(what)
        axis.set_xscale("log", base=2)
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=8)
    sweep_tps.set_title("Conduit: throughput vs streams")
    sweep_ttft.set_title("Conduit: TTFT vs streams")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Conduit vs. ceiling, transformers serve, unbatched.")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="approximate prompt length in words")
    parser.add_argument("--num-requests", type=int, default=None, help="per loaded run (default 4 x concurrency)")
    parser.add_argument("--baseline-requests", type=int, default=16, help="requests for the unbatched baseline")
    parser.add_argument("--out-dir", type=Path, default=PROJECT_ROOT / "docs")
    parser.add_argument("--sweep", type=lambda v: [int(c) for c in v.split(",")], default=[32, 128, 256],
                        help="concurrent streams for the throughput/TTFT sweep (max_num_seqs is raised to the largest)")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="a checkout of an earlier commit (git worktree add): its Conduit runs the same loads "
                        "with this venv, shown beside this tree's")
    args = parser.parse_args(argv)
    args.num_requests = args.num_requests or 4 * args.concurrency
    command = " ".join([".venv/bin/python bench/compare.py", *(sys.argv[1:] if argv is None else argv)])

    info = machine()
    build_demo_model(MODEL_DIR)
    results: dict = {}
    unavailable: dict = {}
    started = time.monotonic()

    phase("(a) in-process ceiling: batched greedy decode, no serving")
    results["ceiling"] = raw_ceiling(args.concurrency, args.prompt_tokens, args.max_tokens)
    print(f"  {results['ceiling']['output_throughput']:.0f} tok/s; batch-1 prefill+first token "
          f"{results['ceiling']['ttft_ms_p50']:.1f} ms", flush=True)

    phase("(a2) Conduit's engine alone, in-process, under the same load")
    results["engine"] = engine_alone_run(args, replica_threads())
    if CEILING_THREADS != results["engine"]["threads"]:
        phase(f"(a3) Conduit's engine alone on the ceiling's {CEILING_THREADS} threads, under the same load")
        results["engine_all"] = engine_alone_run(args, CEILING_THREADS)

    for key, front in (("conduit", None), ("ray_proxy", "ray-proxy")):
        phase(f"{VARIANTS[key]}")
        try:
            results[key] = run_conduit(args, front=front)
        except Exception as e:  # report, and still measure the others
            unavailable[key] = str(e).splitlines()[0]
            print(f"  FAILED: {e}", flush=True)

    if args.baseline_tree:
        phase(f"(b0) Conduit from {args.baseline_tree} ({commit_of(args.baseline_tree)})")
        try:
            results["baseline"] = run_conduit(args, args.baseline_tree.resolve())
        except Exception as e:
            unavailable["baseline"] = str(e).splitlines()[0]
            print(f"  FAILED: {e}", flush=True)

    phase("(c) transformers serve --continuous-batching")
    try:
        results["cb"] = run_transformers_serve(args, continuous_batching=True)
    except Exception as e:
        unavailable["cb"] = str(e).splitlines()[0]
        print(f"  unavailable: {e}", flush=True)

    phase("(d) unbatched baseline: transformers serve without continuous batching, one request at a time")
    try:
        results["unbatched"] = run_transformers_serve(args, continuous_batching=False)
        results["unbatched"]["how"] = (f"`transformers serve` without `--continuous-batching` (it runs "
                                       f"`model.generate` for one request at a time on one thread, so more clients would only "
                                       f"queue), 1 client, {args.baseline_requests} requests")
    except Exception as e:
        print(f"  transformers serve failed ({e}); falling back to in-process model.generate", flush=True)
        results["unbatched"] = sequential_generate(args.prompt_tokens, args.max_tokens, args.baseline_requests)
        results["unbatched"]["how"] = ("`model.generate` in-process, one request at a time "
                                       f"(transformers serve failed: {e})")

    print(f"\ntotal {time.monotonic() - started:.0f} s\n")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = markdown(results, unavailable, args, info, command)
    (args.out_dir / "benchmark.md").write_text(report)
    (args.out_dir / "benchmark.json").write_text(json.dumps({"results": results, "unavailable": unavailable,
                                                              "machine": info, "command": command}, indent=2))
    plot(results, args.out_dir / "benchmark.png", args)
    print(report.split("## Machine")[0])
    print(f"wrote {args.out_dir / 'benchmark.md'}, benchmark.png, benchmark.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
