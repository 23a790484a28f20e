"""`conduit`: the operator's command. `conduit run` is what `make run` calls."""

from __future__ import annotations

import enum
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

import typer
import yaml

from app.auth import check_exposure
from app.config import LOCAL_RAY_SERVE_ENV, RAY_PROXY_FRONT_ENV, ConfigError, parse_app_config
from app.resources import check_deployment_options

log = logging.getLogger("conduit")


class Front(str, enum.Enum):
    haproxy = "haproxy"
    ray_proxy = "ray-proxy"

cli = typer.Typer(help="Conduit: LLM inference on Ray Serve.", no_args_is_help=True, add_completion=False)


def _load_apps(config_path: Path) -> list[dict]:
    """Validate a serve config file: Ray's own schema, then each Conduit app's typed args."""
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(config_path.read_text())
    ServeDeploySchema.model_validate(raw)
    apps = raw.get("applications", [])
    # No host: every interface in HAProxy mode, Conduit's front (docs/haproxy-mode.md); loopback only
    # behind Ray's Python proxy
    default_host = "127.0.0.1" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0" else "0.0.0.0"
    host = (raw.get("http_options") or {}).get("host") or default_host
    for app in apps:
        if app.get("import_path", "").startswith("app.build:"):
            config = parse_app_config(app.get("args") or {})
            check_exposure(config.auth, host)  # no keys: loopback only
            check_deployment_options(config, app.get("deployments") or [])
    return apps


def with_vertex_port(config_path: Path) -> Path:
    """On Vertex AI the container must serve on $AIP_HTTP_PORT, on every interface (Vertex's traffic
    comes from outside the container): a copy of the config with those http_options, or the config
    itself when the variable is unset."""
    port = os.environ.get("AIP_HTTP_PORT")
    if not port:
        return config_path
    if not port.isdigit():
        raise ValueError(f"AIP_HTTP_PORT must be a port number, not {port!r}")
    raw = yaml.safe_load(config_path.read_text())
    raw["http_options"] = {**(raw.get("http_options") or {}), "host": "0.0.0.0", "port": int(port)}
    derived = Path(tempfile.mkdtemp(prefix="conduit-")) / config_path.name
    derived.write_text(yaml.safe_dump(raw, sort_keys=False))
    return derived


@cli.command()
def validate(config: Path = typer.Argument(Path("serve_config.yaml"), exists=True, dir_okay=False)):
    """Check a serve config (Ray's schema and Conduit's typed args) without starting anything."""
    try:
        apps = _load_apps(config)
    except (ConfigError, ValueError) as e:
        typer.echo(f"{config}: {e}", err=True)
        raise typer.Exit(1) from None
    problems = _draft_tokenizer_problems(apps)
    for problem in problems:
        typer.echo(f"{config}: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{config}: ok ({len(apps)} application(s))")


def _draft_tokenizer_problems(apps: list[dict]) -> list[str]:
    """Each draft model (engine.speculative.draft_model) whose tokenizer cannot draft for its target's:
    its token ids would mean other tokens, so nearly every draft would be rejected. Only local
    directories are read (validate fetches nothing); the check that Ray-free code can run is
    app/engine/spec/draft.py's `tokenizers_match`."""
    from transformers import AutoTokenizer

    from app.engine.spec.draft import tokenizers_match

    problems = []
    for index, app in enumerate(apps):
        if not app.get("import_path", "").startswith("app.build:"):
            continue
        for number, model in enumerate(parse_app_config(app.get("args") or {}).models):
            spec = model.engine.speculative
            if spec is None or spec.method != "draft_model":
                continue
            target, draft = Path(model.resolved_source), Path(spec.draft_model)
            if not (target.is_dir() and draft.is_dir()):
                continue
            why = tokenizers_match(AutoTokenizer.from_pretrained(target), AutoTokenizer.from_pretrained(draft))
            if why is not None:
                problems.append(f"applications[{index}].args.models[{number}].engine.speculative.draft_model: {why}")
    return problems


@cli.command()
def run(config: Path = typer.Argument(Path("serve_config.yaml"), exists=True, dir_okay=False),
        front: Front = typer.Option(Front.haproxy, help="HTTP front: HAProxy (Ray Serve's HAProxy mode), or Ray's "
                                    "Python proxy (to compare; bench/compare.py)")):
    """Serve a config on a local Ray instance (foreground). Ctrl-C or SIGTERM drains: requests in
    flight finish (up to each deployment's graceful_shutdown_timeout_s), then everything stops."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Set before Ray is imported (Serve reads them at import) and inherited by every Ray process.
    # Local dev server on loopback: Ray's token auth is off, as Ray's own local quick start has it.
    os.environ.update({"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), **LOCAL_RAY_SERVE_ENV,
                       **(RAY_PROXY_FRONT_ENV if front is Front.ray_proxy else {})})
    try:
        config = with_vertex_port(config)
        apps = _load_apps(config)
    except (ConfigError, ValueError) as e:
        typer.echo(f"{config}: {e}", err=True)
        raise typer.Exit(1) from None
    from app.demo_model import build_demo_model

    for app in apps:
        for model in parse_app_config(app.get("args") or {}).models:
            if model.build_demo_if_missing:
                build_demo_model(model.resolved_source)
    typer.echo("starting Ray and Serve ...")
    _serve_until_signalled(config, apps)


def _serve_until_signalled(config: Path, apps: list[dict]) -> None:
    """`serve run CONFIG --non-blocking` in this process (it applies the file exactly as `serve
    deploy` would), then one line per loading step until the apps run, one ready line, and Ctrl-C or
    SIGTERM draining first. `serve run` alone answers Ctrl-C with serve.shutdown(), which kills
    Serve's HTTP proxy at once and so cuts every stream in flight; and Ray's own SIGTERM handler tears
    the node down just as fast. Deleting the applications first lets each replica stop taking new
    work and finish what it has while the proxy still carries the responses.

    Ray's processes do not print here (log_to_driver off): a client that hangs up mid-stream made
    Ray's proxy print a traceback into the operator's terminal. Their logs stay in Ray's log folder."""
    import ray
    from ray import serve
    from ray.serve.scripts import run as serve_run

    # `serve run` keeps a Ray that is already up; started here so that the handlers below, not the
    # ones Ray installs in ray.init, are the last word on SIGINT and SIGTERM.
    context = ray.init(namespace="serve", log_to_driver=False)
    serve_run.main([str(config), "--non-blocking"], prog_name="serve run", standalone_mode=False)

    def drain_then_stop(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)  # a second signal: stop without waiting
        log.info("%s: draining; requests in flight finish, new ones are refused", signal.Signals(signum).name)
        started = time.monotonic()
        for name in serve.status().applications:
            serve.delete(name, _blocking=False)
        while serve.status().applications:
            time.sleep(0.2)
        log.info("drained in %.1f s; stopping", time.monotonic() - started)
        serve.shutdown()
        ray.shutdown()
        raise typer.Exit(0)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, drain_then_stop)
    watch = StatusWatch(lambda: serve.status().applications)
    if not watch.until_running():
        serve.shutdown()
        ray.shutdown()
        raise typer.Exit(1)
    typer.echo(ready_line(yaml.safe_load(config.read_text()), apps, context.address_info["session_dir"]))
    while True:  # report what changes (a replica restarted, a deployment unhealthy) until signalled
        time.sleep(WATCH_INTERVAL_S)
        watch.report()


# How often a serving `conduit run` asks Serve for its status. Each ask is a controller call and a full
# status to decode: at 2 s it cost the serving path 0.05-0.09 CPU-ms per token at ~850 tok/s
# (docs/profile.md), spent by this process and the controller.
WATCH_INTERVAL_S = 10


class StatusWatch:
    """Prints each deployment's replica states when they change (with the time since start), so an
    operator sees loading happen and anything that goes wrong after."""

    def __init__(self, applications):
        self.applications, self.started, self.last = applications, time.monotonic(), {}

    def report(self) -> dict:
        apps = self.applications()
        for app_name, app in apps.items():
            for name, dep in app.deployments.items():
                states = ", ".join(f"{n} {getattr(state, 'value', state).lower()}"
                                   for state, n in sorted(dep.replica_states.items())) or "no replicas"
                line = f"{getattr(dep.status, 'value', dep.status).lower()}: {states}"
                if self.last.get((app_name, name)) != line:
                    self.last[(app_name, name)] = line
                    message = f" ({dep.message})" if dep.message and "UNHEALTHY" in str(dep.status) else ""
                    typer.echo(f"[{time.monotonic() - self.started:5.0f} s] {app_name}/{name} {line}{message}")
        return apps

    def until_running(self) -> bool:
        """True once every application runs; False (after saying why) when one failed to deploy."""
        while True:
            apps = self.report()
            statuses = {name: str(getattr(app.status, "value", app.status)) for name, app in apps.items()}
            failed = [name for name, status in statuses.items() if status == "DEPLOY_FAILED"]
            if failed:
                for name in failed:
                    typer.echo(f"{name}: deploy failed: {apps[name].message}", err=True)
                return False
            if statuses and all(status == "RUNNING" for status in statuses.values()):
                return True
            time.sleep(1)


def ready_line(raw_config: dict, apps: list[dict], session_dir: str) -> str:
    """One line, as vLLM and TGI print: where it serves, what, and where the logs are."""
    http = raw_config.get("http_options") or {}
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    urls, models = [], []
    for app in apps:
        urls.append(base + (app.get("route_prefix") or "/").rstrip("/"))
        if app.get("import_path", "").startswith("app.build:"):
            config = parse_app_config(app.get("args") or {})
            models += [m.name for m in (*config.models, *config.embedding_models)]
    return (f"Conduit ready at {', '.join(urls)} serving {', '.join(models)} "
            f"(logs: {session_dir}/logs/serve; Ctrl-C drains and stops)")


@cli.command()
def kuberay(
    config: Path = typer.Argument(Path("serve_config.yaml"), exists=True, dir_okay=False),
    output: Path = typer.Option(Path("cluster/kuberay-rayservice.yaml"), "-o", "--output"),
    image: str = typer.Option("conduit:0.1.0", help="an image with Conduit installed (cluster/Dockerfile)"),
):
    """Write the KubeRay RayService manifest that embeds CONFIG as its serveConfigV2."""
    from app.kuberay import rayservice_manifest

    _load_apps(config)
    output.write_text(rayservice_manifest(yaml.safe_load(config.read_text()), image))
    typer.echo(f"wrote {output}")


@cli.command()
def status(address: str = typer.Option("auto", help="Ray cluster address (default: the one on this machine)")):
    """Deployments, replicas, and each model replica's queue and KV-cache usage, from the running cluster."""
    from rich.console import Console

    from app.status import collect, render

    try:
        serve_status, replicas = collect(address)
    except ConnectionError as e:
        typer.echo(f"no running Ray cluster at {address}: {e}", err=True)
        raise typer.Exit(1) from None
    render(serve_status, replicas, Console())


# every argument goes to app/bench.py's own parser (`conduit bench --help` prints its options)
@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context):
    """Benchmark a running server with streaming requests: TTFT, ITL, throughput (see --help)."""
    from app.bench import main as bench_main

    raise typer.Exit(bench_main(ctx.args, prog="conduit bench"))


@cli.command("batch")
def batch_job(
    input_path: str = typer.Argument(..., metavar="INPUT", help="JSONL of OpenAI batch lines, or Parquet (a path or URL)"),
    output: Path = typer.Option(..., "-o", "--output", help="JSONL of output lines; lines already there are skipped"),
    config: Path = typer.Option(Path("serve_config.yaml"), "--config", exists=True, dir_okay=False),
    model: str | None = typer.Option(None, "--model", help="a served model's name or alias, embedding models too "
                                     "(default: the one the input's first line names, else the only one)"),
    address: str = typer.Option("local", help="Ray cluster: `local` starts one for this job; `auto` or HOST:PORT joins one"),
    replicas: int | None = typer.Option(None, help="engine actors (default: the model deployment's replicas)"),
    batch_size: int | None = typer.Option(None, help="lines per Ray Data batch (default: 4 x the offline engine "
                                          "batch, engine.max_num_seqs but at least 128; embedding models: max_batch_size)"),
):
    """Run a file of OpenAI batch lines offline on Ray Data (docs/batch.md); resumable."""
    from app.batch.job import run_batch
    from app.batch.target import find_target, first_line_model
    from app.demo_model import build_demo_model

    try:
        target = find_target(_load_apps(config), model, None if model else first_line_model(input_path))
    except (ConfigError, ValueError) as e:
        typer.echo(f"{config}: {e}", err=True)
        raise typer.Exit(1) from None
    if getattr(target.model, "build_demo_if_missing", False):  # embedding models have no demo
        build_demo_model(target.model.resolved_source)
    try:
        summary = run_batch(input_path, output, target, address, replicas, batch_size)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; the lines in {output} are kept: run the same command to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(summary.text(output))


@cli.command("demo-model")
def demo_model(path: Path = typer.Argument(Path(".cache/demo-model"))):
    """Build the tiny random demo model (Llama architecture, local BPE tokenizer)."""
    from app.demo_model import build_demo_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    typer.echo(build_demo_model(path))


def main() -> None:
    cli()
if __name__ == "__main__":
    main()
