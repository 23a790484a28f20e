"""A real PostgreSQL server for tests (Debian's `postgresql` package; `make test` installs it),
started in a temporary directory with initdb and pg_ctl, as tests/e2e/test_prometheus.py starts
Prometheus. PostgreSQL refuses to run as root: under root it runs as the package's `postgres` user."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.local_cluster import free_port


def pg_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:  # a missing server must not pass as a skipped test
        raise AssertionError(f"PostgreSQL's {name} not found: apt-get install -y postgresql (make test does)")
    return found


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields the URL (postgresql://...) of a fresh, empty server; stops and removes it after."""
    root = Path(tempfile.mkdtemp(prefix="conduit-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        root.chmod(0o755)
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    run(pg_binary("initdb"), "-D", str(data), "-A", "trust", "-U", "conduit", "--no-sync", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    run(pg_binary("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start")
    try:
        yield f"postgresql://conduit@127.0.0.1:{port}/postgres"
    finally:
        run(pg_binary("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
