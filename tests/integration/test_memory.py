"""Memory is bounded for every legal request: the worst ones at once (2,048 x 30 KB `Embed`,
32 x 512-token `SparseEmbed`, a 2,048-document `Rerank`) keep the default server, both default
models loaded, under 1.5 GB of resident memory, and most of the peak is handed back after."""

from __future__ import annotations

import random
import string
import threading
from collections.abc import Callable

import grpc

from bench.process import ServerProcess, process_status
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import CACHE_DIR

LIMIT_MB = 1536
MESSAGE_BYTES = 100 << 20


def resident_mb(pid: int, field: str = "VmRSS") -> float:
    """The process's resident memory now (VmRSS) or at its peak (VmHWM), in MB (Linux /proc)."""
    return process_status(pid)[field] / 1024


def prose(rng: random.Random, words: list[str], size: int) -> str:
    """`size` characters of words."""
    out: list[str] = []
    length = 0
    while length < size:
        out.append(rng.choice(words))
        length += len(out[-1]) + 1
    return " ".join(out)[:size]


def test_the_worst_legal_requests_at_once_stay_under_1_5_gb() -> None:
    rng = random.Random(7)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    # Both default models; no limit on queued work, so that all three are queued at once (by
    # default the second on the dense model's bulk lane would be refused, its ~35 s of work over
    # QUEUE_SECONDS).
    with ServerProcess(["--cache-dir", str(CACHE_DIR), "--queue-seconds", "0"]) as server:
        options = [("grpc.max_send_message_length", MESSAGE_BYTES), ("grpc.max_receive_message_length", MESSAGE_BYTES)]
        with grpc.insecure_channel(server.address, options=options) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            stub.Embed(pb.EmbedRequest(inputs=["warm up"]), timeout=60)
            calls: dict[str, Callable[[], object]] = {
                "embed": lambda: stub.Embed(
                    pb.EmbedRequest(inputs=[prose(rng, words, 30_000) for _ in range(2048)], truncate=True),
                    timeout=900,
                ),
                "sparse": lambda: stub.SparseEmbed(
                    pb.SparseEmbedRequest(inputs=[prose(rng, words, 6000) for _ in range(32)], truncate=True),
                    timeout=900,
                ),
                "rerank": lambda: stub.Rerank(
                    pb.RerankRequest(
                        query="which words", documents=[prose(rng, words, 2000) for _ in range(2048)], truncate=True
                    ),
                    timeout=900,
                ),
            }
            answers: dict[str, object] = {}
            errors: list[BaseException] = []

            def run(name: str) -> None:
                try:
                    answers[name] = calls[name]()
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(name,)) for name in calls]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=900)
        assert not errors, errors
        assert set(answers) == set(calls)
        peak, after = resident_mb(server.proc.pid, "VmHWM"), resident_mb(server.proc.pid)
        assert peak <= LIMIT_MB, f"peak {peak:.0f} MB"
        assert after <= 0.9 * peak, f"{after:.0f} MB held after a peak of {peak:.0f} MB"
