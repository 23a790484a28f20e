"""Second Serve applications beside the shared default one (own name and route prefix), for tests
that need another config: API keys, small capacity. Deployment options (replicas, queue bounds,
CPUs) are set as serve_config.yaml's `deployments:` would set them."""

from __future__ import annotations

import asyncio
import threading
import time

from ray import serve
from ray.serve import Application

from app.build import build_app
from tests.e2e.conftest import wait_until_up

LIGHT = {"ray_actor_options": {"num_cpus": 0.01}}  # logical CPUs only: these apps share the test cluster


def with_options(app: Application, options: dict[str, dict]) -> Application:
    """`app` with each deployment's options overridden by `options[name]` (and `options["*"]`)."""

    def convert(value):
        if isinstance(value, Application):
            return with_options(value, options)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        return value

    deployment = app._bound_deployment  # no public API overrides options inside a built app
    overrides = {**options.get("*", {}), **options.get(deployment.name, {})}
    return Application(deployment.options(
        _init_args=tuple(convert(a) for a in deployment.init_args),
        _init_kwargs={k: convert(v) for k, v in deployment.init_kwargs.items()},
        **overrides,
    ))


def deploy(base: str, name: str, args: dict, options: dict[str, dict]) -> str:
    """Run (or update) app `name` at route prefix /name; returns its base URL once it answers."""
    serve.run(with_options(build_app(args), {"*": LIGHT, **options}), name=name, route_prefix=f"/{name}")
    url = f"{base}/{name}"
    wait_until_up(f"{url}/health")
    return url


_handle_loop: asyncio.AbstractEventLoop | None = None
_handles: dict[tuple[str, str], object] = {}


def call_deployment(app: str, deployment: str, method: str, *args):
    """`deployment.method(*args)` through a Serve handle, from synchronous test code."""
    handle = _handles.setdefault((app, deployment), serve.get_deployment_handle(deployment, app_name=app))

    async def call():
        return await getattr(handle, method).remote(*args)

    return on_handle_loop(call())


def on_handle_loop(coroutine, timeout_s: float = 30):
    """Runs `coroutine` to its end on the tests' handle loop. The tests' Ray runs
    RAY_SERVE_THROUGHPUT_OPTIMIZED, where a handle binds to the event loop of its first call; one
    loop, kept running in a thread, serves every such call (serve.shutdown needs it open)."""
    global _handle_loop
    if _handle_loop is None:
        _handle_loop = asyncio.new_event_loop()
        threading.Thread(target=_handle_loop.run_forever, name="serve-handles", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coroutine, _handle_loop).result(timeout=timeout_s)


def model_args(model_path: str, model: str, **engine) -> dict:
    return {"name": model, "source": model_path,
            "engine": {"max_num_seqs": 4, "max_model_len": 256, "stream_interval_s": 0.005, **engine}}


def kill_replica_once_generating(app: str, deployment: str, blocks: int, within_s: float) -> None:
    """Once the deployment's one replica has filled `blocks` more KV blocks than when its first sequence
    ran (tokens that have reached the ingress), kill its process, as a crash would. Not sooner: a
    request whose replica is lost before its first delta is sent again (app/api/stream_mux.py)."""
    import ray

    deadline, started = time.monotonic() + within_s, None
    while True:
        stats = call_deployment(app, deployment, "stats")
        if stats["num_running"] and started is None:
            started = stats["kv_blocks_used"]
        if started is not None and stats["kv_blocks_used"] >= started + blocks:
            break
        assert time.monotonic() < deadline, f"{deployment} never generated {blocks} blocks' worth of tokens"
        time.sleep(0.02)
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]
    ray.kill(ray.get_actor(name, namespace="serve"))
