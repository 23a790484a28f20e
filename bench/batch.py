"""`conduit batch` against the raw in-process batch-32 decode, measured in the same run (issue 18's
target: output tok/s >= 0.9 x raw), on the demo model:

  (a) raw      bench/compare.py's ceiling: transformers + DynamicCache, 32 equal prompts, greedy
  (b) batch    `conduit batch` (app/batch/job.run_batch, what the command calls) on N chat lines of
               `--max-tokens` output tokens each, on a Ray started for the job

    .venv/bin/python bench/batch.py [--lines 2000] [--max-tokens 64] [--prompt-words 64] [--replicas 1]

Figures for (b): the whole job from the pipeline's start (actor start-up and model load included)
and after its first lines arrived (the engines running). Ray's own start is not counted in either.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

from app.bench import synthetic_prompt
from app.config import PROJECT_ROOT
from app.demo_model import build_demo_model

sys.path.insert(0, str(Path(__file__).parent))
from compare import MODEL_DIR, raw_ceiling  # noqa: E402  (bench/ is no package: its scripts import each other)

MODEL = "conduit-demo"


def write_input(path: Path, lines: int, prompt_words: int, max_tokens: int) -> None:
    with open(path, "w") as f:
        for i in range(lines):
            body = {"model": MODEL, "messages": [{"role": "user", "content": synthetic_prompt(prompt_words, i)}],
                    "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0}
            f.write(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")


def write_config(path: Path, replicas: int, threads: int) -> None:
    """serve_config.yaml's model with `replicas` replicas of one CPU each, `threads` torch threads."""
    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    app = raw["applications"][0]
    app["args"].pop("embedding_models", None)
    app["args"]["models"][0]["engine"]["num_threads"] = threads
    model = next(d for d in app["deployments"] if d["name"] == f"Model-{MODEL}")
    model.pop("autoscaling_config", None)
    model.update(num_replicas=replicas, ray_actor_options={"num_cpus": 1})
    path.write_text(yaml.safe_dump(raw))


def run_conduit_batch(args, workdir: Path) -> dict:
    from app.batch.job import run_batch
    from app.batch.target import find_target

    source, output, config = workdir / "in.jsonl", workdir / "out.jsonl", workdir / "serve_config.yaml"
    write_input(source, args.lines, args.prompt_words, args.max_tokens)
    write_config(config, args.replicas, args.threads)
    target = find_target(yaml.safe_load(config.read_text())["applications"], MODEL)
    started = time.monotonic()
    summary = run_batch(str(source), output, target, replicas=args.replicas)
    wall = time.monotonic() - started
    assert summary.written == args.lines and summary.errors == 0, summary.text(output)
    assert summary.completion_tokens == args.lines * args.max_tokens
    steady = summary.completion_tokens - summary.first_tokens
    return {
        "tok_s": summary.completion_tokens / summary.elapsed_s,
        "tok_s_running": steady / (summary.elapsed_s - summary.first_line_s),
        "req_s": summary.written / summary.elapsed_s,
        "startup_s": summary.first_line_s,
        "elapsed_s": summary.elapsed_s,
        "wall_s_with_ray_start": wall,
        "summary": summary.text(output),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per replica")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    build_demo_model(MODEL_DIR)

    print("raw in-process batch-32 decode ...", flush=True)
    raw = raw_ceiling(32, args.prompt_words, args.max_tokens)
    print(f"  {raw['output_throughput']:,.0f} tok/s ({raw['prompt_tokens']} prompt tokens)", flush=True)
    print(f"conduit batch: {args.lines} lines x {args.max_tokens} tokens, {args.replicas} replica(s) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="conduit-batch-bench-") as workdir:
        batch = run_conduit_batch(args, Path(workdir))
    print(batch["summary"])
    ratio, ratio_running = (batch[k] / raw["output_throughput"] for k in ("tok_s", "tok_s_running"))
    print(f"\n{'':34}{'tok/s':>10}{'x raw':>8}")
    print(f"{'raw batch-32 decode (in-process)':34}{raw['output_throughput']:>10,.0f}{1:>8.2f}")
    print(f"{'conduit batch, whole job':34}{batch['tok_s']:>10,.0f}{ratio:>8.2f}")
    print(f"{'conduit batch, engines running':34}{batch['tok_s_running']:>10,.0f}{ratio_running:>8.2f}")
    print(f"start-up (actors, model load) {batch['startup_s']:.1f} s of {batch['elapsed_s']:.1f} s; "
          f"with Ray's own start {batch['wall_s_with_ray_start']:.1f} s; target: whole job >= 0.90 x raw")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "raw": raw, "batch": batch,
                                        "ratio": ratio, "ratio_running": ratio_running}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
