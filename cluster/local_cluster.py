"""A multi-node Ray cluster on one machine: a head plus N worker nodes, each its own `ray start`
process with its own ports and declared resources (e.g. a custom `accel` accelerator resource), so
placement across nodes can be tried without a second machine. Everything listens on 127.0.0.1.

    python cluster/local_cluster.py --workers 2 --resources '{"accel": 1}'   # Ctrl-C stops it
    serve deploy serve_config.yaml -a http://127.0.0.1:<dashboard port it prints>

Tests use `LocalCluster` directly (tests/e2e/test_multinode.py)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.front import free_port, local_front_ports

RAY = Path(sys.executable).with_name("ray")


def _node_ports() -> list[str]:
    """Ports every node would otherwise take at a fixed default, so nodes on one host collide."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


class NodeStartFailed(RuntimeError):
    pass


def _stop_process(proc: subprocess.Popen, wait_s: float = 10) -> None:
    """Stop one `ray start` and every process of its node (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(wait_s)
    except ProcessLookupError:  # the whole group is gone already
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the node, or a `ray start` that hung
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass
class LocalCluster:
    num_workers: int = 2
    head_cpus: float = 2
    worker_cpus: float = 1
    worker_resources: dict = field(default_factory=lambda: {"accel": 1})
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    # Ray's socket paths must stay short (a Unix socket path is at most ~107 bytes)
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    processes: list[subprocess.Popen] = field(default_factory=list)
    _launched: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str]) -> None:
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
        # Each node's HAProxy front (docs/haproxy-mode.md) binds its own stats/exporter/fallback ports,
        # and a worker node's its own HTTP port (the head's is http_options.port): on one machine the
        # nodes' fronts would otherwise collide. Only when the environment runs the HAProxy front.
        if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
            env.update(local_front_ports())
            if "--head" not in args:
                env.update(RAY_SERVE_WORKER_PROXY_HTTP_PORT=str(free_port()),
                           RAY_SERVE_WORKER_PROXY_GRPC_PORT=str(free_port()))
        self._launched += 1
        with open(Path(self.temp_dir) / f"ray-start-{self._launched}.log", "wb") as log:
            proc = subprocess.Popen(
                [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                 f"--temp-dir={self.temp_dir}", *_node_ports(), *args],
                env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
            )
        proc.log = log.name
        self.processes.append(proc)

    def start(self, timeout_s: float = 120) -> LocalCluster:
        try:
            self._start_node(self._head_args, 1, timeout_s)
            for i in range(self.num_workers):  # one at a time: nodes joining at once can time out a busy GCS
                self._start_node(self._worker_args, 2 + i, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _head_args(self) -> list[str]:
        self.gcs_port, self.dashboard_port = free_port(), free_port()  # fresh ones on a retry
        return ["--head", f"--port={self.gcs_port}", f"--ray-client-server-port={free_port()}",
                f"--num-cpus={self.head_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}"]

    def _worker_args(self) -> list[str]:
        return [f"--address={self.address}", f"--num-cpus={self.worker_cpus}",
                f"--resources={json.dumps(self.worker_resources)}"]

    def _start_node(self, make_args, expected_nodes: int, timeout_s: float, attempts: int = 3) -> None:
        """Start one node and wait until the cluster counts it. `ray start` gives a new node a fixed
        30 s to register, which a loaded machine can miss; such a start is retried."""
        for attempt in range(attempts):
            self._start(make_args())
            try:
                return self._wait_for_nodes(expected_nodes, timeout_s)
            except NodeStartFailed:
                _stop_process(self.processes.pop())
                if attempt + 1 == attempts:
                    raise

    def alive_nodes(self) -> int:
        """Alive nodes, as the dashboard reports them (0 while it is not up yet)."""
        from ray.util.state import list_nodes

        try:
            return len(list_nodes(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], timeout=5))
        except Exception:  # the dashboard's API comes up a few seconds after the GCS
            return 0

    def _wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.alive_nodes() < count:
            for proc in self.processes:
                if proc.poll() is not None:
                    log = Path(proc.log).read_text(errors="replace")[-3000:]
                    raise NodeStartFailed(f"`ray start` exited ({proc.returncode}) before its node joined:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local cluster did not reach {count} alive nodes in {timeout_s:.0f} s")
            time.sleep(1)

    def stop(self) -> None:
        """Workers first, then the head; each `ray start --block` takes its node's processes with it."""
        while self.processes:
            _stop_process(self.processes.pop())
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--head-cpus", type=float, default=2)
    parser.add_argument("--worker-cpus", type=float, default=1)
    parser.add_argument("--resources", type=json.loads, default={"accel": 1}, help="each worker's custom resources (JSON)")
    args = parser.parse_args()
    cluster = LocalCluster(args.workers, args.head_cpus, args.worker_cpus, args.resources)
    with cluster:
        print(f"ray address {cluster.address}; dashboard {cluster.dashboard_url}; Ctrl-C stops", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
