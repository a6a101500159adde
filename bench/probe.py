"""Times grpc.health.v1 Check against ADDRESS, one check PERIOD_MS after the last, from "ready"
until a line arrives on stdin, then prints one JSON line: each check's latency in ms and how many
ended with each status. A process of its own (bench.process.HealthProber starts it), so that the
load's clients, their event loop and their GIL cannot delay a check: it times the server's answer.

Usage: python -m bench.probe ADDRESS PERIOD_MS
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# How long one check may take before it counts as DEADLINE_EXCEEDED.
CHECK_TIMEOUT_S = 10.0


def check(stub: health_pb2_grpc.HealthStub) -> tuple[float, str]:
    """One Check of the whole server: its latency in ms, and SERVING (or what it got instead)."""
    sent = time.perf_counter()
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_S)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    except grpc.RpcError as error:
        status = error.code().name
    return (time.perf_counter() - sent) * 1e3, status


def wait_for_a_line(stop: threading.Event) -> None:
    """Sets `stop` once stdin gives a line or closes."""
    sys.stdin.readline()
    stop.set()


def main(argv: Sequence[str]) -> int:
    """Probes until stdin gives a line (or closes); prints the latencies and statuses."""
    address, period_s = argv[0], float(argv[1]) / 1e3
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        grpc.channel_ready_future(channel).result(timeout=60)
        check(stub)  # the connection's first call, untimed
        stop = threading.Event()
        threading.Thread(target=wait_for_a_line, args=(stop,), daemon=True).start()
        print("ready", flush=True)
        latencies: list[float] = []
        statuses: collections.Counter[str] = collections.Counter()
        while not stop.wait(period_s):
            ms, status = check(stub)
            latencies.append(ms)
            statuses[status] += 1
    print(json.dumps({"ms": latencies, "statuses": dict(statuses)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
