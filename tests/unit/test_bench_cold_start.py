"""`conduit bench --cold-start`: waiting for zero replicas, and the figures it reports."""

from types import SimpleNamespace

import pytest

from app.bench import RequestResult, cold_start_summary, deployment_replicas, main, wait_for_zero


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_wait_for_zero_returns_the_time_it_took():
    counts = iter([2, 1, 1, 0])
    clock = FakeClock()
    assert wait_for_zero(lambda: next(counts), timeout_s=10, poll_s=0.5, clock=clock, sleep=clock.sleep) == 1.5


def test_wait_for_zero_gives_up_after_its_timeout():
    clock = FakeClock()
    with pytest.raises(TimeoutError, match="still 1 replica.*min_replicas 0"):
        wait_for_zero(lambda: 1, timeout_s=3, poll_s=1, clock=clock, sleep=clock.sleep)
    assert clock.now == 3


def test_deployment_replicas_counts_every_state():
    # a STOPPING replica still counts: the deployment is not at zero until it is gone
    deployment = SimpleNamespace(replica_states={"RUNNING": 1, "STOPPING": 1})
    status = SimpleNamespace(applications={"conduit": SimpleNamespace(deployments={"Model-m": deployment})})
    assert deployment_replicas(status, "conduit", "Model-m") == 2
    with pytest.raises(KeyError):
        deployment_replicas(status, "conduit", "Model-other")


def cold(ttft: float, e2e: float) -> RequestResult:
    return RequestResult(ok=True, ttft=ttft, e2e=e2e, output_tokens=8, chunk_times=[ttft, e2e])


def test_summary_reports_median_min_max_of_the_successful_cold_starts():
    results = [cold(9.0, 9.5), cold(11.0, 11.4), RequestResult(error="HTTP 504: deadline"), cold(10.0, 10.2)]
    summary = cold_start_summary(results, [30.0, 20.0, 25.0, 21.0], {"repeats": 4})
    assert (summary["completed"], summary["failed"], summary["errors"]) == (3, 1, ["HTTP 504: deadline"])
    assert summary["ttft_s"] == {"median": 10.0, "min": 9.0, "max": 11.0}
    assert summary["e2e_s"] == {"median": 10.2, "min": 9.5, "max": 11.4}
    assert summary["idle_to_zero_s"] == {"median": 23.0, "min": 20.0, "max": 30.0}
    assert [r["idle_to_zero_s"] for r in summary["requests"]] == [30.0, 20.0, 21.0]


def test_summary_of_no_successful_request_has_no_figures():
    summary = cold_start_summary([RequestResult(error="x")], [1.0], {})
    assert summary["ttft_s"] == summary["e2e_s"] == {"median": None, "min": None, "max": None}


def test_cold_start_without_a_server_fails_in_one_line(capsys):
    assert main(["--cold-start", "--url", "http://127.0.0.1:9"]) == 2
    assert "cold-start benchmark of http://127.0.0.1:9 failed: ClientConnectorError" in capsys.readouterr().err
