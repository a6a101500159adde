"""envoy/gateway.py's supervisor on small real processes (Python one-liners, not the server or
Envoy): restart with backoff, a bounded budget, no restart after a configuration error, and a
stop that ends every child."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from bench.process import load_gateway

gateway: Any = load_gateway()  # its supervisor is not part of bench's GatewayModule protocol

UP = "print('up', flush=True)"  # what a child says once it is up
SLEEP = "import time; time.sleep(60)"


class Launches:
    """A child's launch function: starts `python -c code` and, as a launch function must, returns
    once it is up (the code prints UP); keeps every process it started."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.processes: list[subprocess.Popen[bytes]] = []

    def __call__(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, "-c", self.code], stdout=subprocess.PIPE)
        assert process.stdout is not None
        process.stdout.readline()  # UP, or nothing when it exits first
        self.processes.append(process)
        return process


def test_restart_budget_doubles_the_wait_and_runs_out_within_its_window() -> None:
    budget = gateway.RestartBudget()
    delays = [budget.next_delay(now=100.0 + i) for i in range(gateway.MAX_RESTARTS)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert budget.next_delay(now=110.0) is None
    # Once the window has passed, the budget is whole again.
    assert budget.next_delay(now=100.0 + gateway.RESTART_WINDOW_S + 20) == 0.5


def test_a_child_that_keeps_crashing_is_restarted_its_budget_then_given_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gateway, "RESTART_BACKOFF_S", 0.01)
    crashing = Launches("raise SystemExit(3)")
    steady = Launches(f"{UP}; {SLEEP}")
    children = [gateway.Child("server", crashing, grace_s=5), gateway.Child("envoy", steady, grace_s=5)]
    assert gateway.Supervisor(children).run() == 1
    assert len(crashing.processes) == 1 + gateway.MAX_RESTARTS
    assert len(steady.processes) == 1  # untouched by the other's restarts, then stopped
    assert steady.processes[0].poll() is not None
    log = capsys.readouterr().err
    assert log.count("exited with 3; restarting it in") == gateway.MAX_RESTARTS
    assert ", envoy untouched" in log
    assert f"after {gateway.MAX_RESTARTS} restarts within 60 s: giving up" in log


def test_a_configuration_error_is_not_restarted(capsys: pytest.CaptureFixture[str]) -> None:
    misconfigured = Launches(f"raise SystemExit({gateway.CONFIG_ERROR_EXIT})")
    child = gateway.Child("server", misconfigured, grace_s=5, final_exit=gateway.CONFIG_ERROR_EXIT)
    assert gateway.Supervisor([child]).run() == gateway.CONFIG_ERROR_EXIT
    assert len(misconfigured.processes) == 1
    assert "not restarting it" in capsys.readouterr().err


def test_stop_soon_stops_every_child_and_exits_0() -> None:
    draining = Launches(f"import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); {UP}; {SLEEP}")
    plain = Launches(f"{UP}; {SLEEP}")  # ends on the SIGTERM itself (-15), as asked
    children = [gateway.Child("server", draining, grace_s=5), gateway.Child("envoy", plain, grace_s=5)]
    supervisor = gateway.Supervisor(children)
    supervisor.stop_soon()  # queued: run starts both, then stops them
    assert supervisor.run() == 0
    assert draining.processes[0].returncode == 0 and plain.processes[0].returncode == -15
