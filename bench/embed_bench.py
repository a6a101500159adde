"""Measures how close the gRPC server comes to the in-process ceiling, in one run on one corpus.

Phases, in this order so the baseline and the server phases see the same machine:

  (a1) in-process ONNX Runtime, built from the server's own pieces (no server running)
       start the server (`python -m embedserve`, the way users start it)
  (d)  idle latency of one short input through Embed
  (b)  Embed throughput, N concurrent clients
  (c)  EmbedStream throughput, one stream, a bounded number of requests in flight
  (d)  latency of one short input while (b)-style load runs
  (b') with --presorted: (b) with the corpus sent shortest first, which leaves batching almost
       nothing to pad, so (b')/(a) is the cost of the RPC path alone
       stop the server (SIGTERM: it drains and exits 0)
  (a2) in-process ONNX Runtime again; (a) = mean of a1 and a2, which cancels slow drift
  (e)  wire form: packed floats vs float32_le bytes for 2048 x 384 vectors (no server)

The bench process is both the baseline and the gRPC client, so on a small machine the client's
own CPU is part of what (b) and (c) pay; the table shows CPU seconds per process to make that
visible, and a CPU-seconds ratio beside the wall-time one, which a busy neighbour skews less.
Every server vector is compared with the in-process one. bench/README.md says how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
import numpy.typing as npt

from embedserve import convert
from embedserve.backends.config import ModelConfig, load_model_config
from embedserve.backends.onnx import OnnxBackend
from embedserve.backends.pooling import normalize, pool
from embedserve.engine.tokenizer import TextTokenizer, Tokenized
from embedserve.engine.types import EmbedResult, Timing, Usage
from embedserve.models import resolve_model_path
from embedserve.settings import DEFAULT_DENSE_MODEL, ModelSettings, Settings
from embedserve.v1 import embedding_service_pb2 as pb
from embedserve.v1 import embedding_service_pb2_grpc as pb_grpc

FloatArray = npt.NDArray[np.float32]

TARGET_RATIO = 0.90
# Largest difference between a server vector and its in-process twin before the run fails.
VECTOR_TOLERANCE = 1e-4
MAX_MESSAGE_BYTES = 64 << 20
LATENCY_INPUT = "hello world"

# A fixed vocabulary so the corpus depends only on the seed (and not on any file or locale).
WORDS = """
the of and to in is was for on that with as by at from his an were are which this be
has had have not but they their one all its new more been also after first two who
other when time would there can into only most over such some these city world year
may about between during under through where while both since than many each later
state known school house people part them made team then after before could three
system music river church album group because water season early public national
game life light market model power order paper place point road science service side
small sound space story street study table test town train tree value voice war week
word work young area body book business car case child company country day door end
eye face fact family field friend government hand head home idea job kind land law
level line lot member minute moment money month morning mother name night number
office parent party person picture problem program question reason report result
room sense share social son stage start student system teacher thing thought today
top travel truth understand university until use view wait walk want watch weather
west whole why wide window winter wish woman wonder wood write yard yellow zone
embedding vector server batch token stream request latency network memory thread
""".split()


# -- corpus ------------------------------------------------------------------------------


def make_corpus(count: int, seed: int, min_words: int = 8, max_words: int = 120) -> list[str]:
    """Returns `count` texts of min..max words drawn from WORDS; the same seed gives the same corpus."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        texts.append(" ".join(words).capitalize() + ".")
    return texts


def chunks(items: Sequence[str], size: int) -> list[list[str]]:
    """Splits items into consecutive lists of at most `size`."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def length_order(lengths: Sequence[int], window: int) -> list[int]:
    """Positions sorted by length within consecutive windows of `window` items (0: all at once)."""
    window = window or len(lengths)
    order: list[int] = []
    for begin in range(0, len(lengths), window):
        order.extend(sorted(range(begin, min(begin + window, len(lengths))), key=lengths.__getitem__))
    return order


def padding_efficiency(lengths: Sequence[int], batch_size: int, window: int) -> float:
    """Real / padded tokens when batches of `batch_size` are cut from length-sorted windows."""
    order = length_order(lengths, window)
    padded = sum(
        max(lengths[i] for i in order[b : b + batch_size]) * len(order[b : b + batch_size])
        for b in range(0, len(order), batch_size)
    )
    return sum(lengths) / padded


# -- (a) the in-process ceiling ------------------------------------------------------------


@dataclass
class InProcessRun:
    """One pass of the corpus through tokenizer + ONNX Runtime + pooling in this process."""

    seconds: float
    tokenize_s: float
    forward_s: float
    tokens: int
    padded_tokens: int
    cpu_s: float
    # Tokens of each text, for padding estimates; left out of the JSON summary.
    lengths: list[int] = field(default_factory=list, repr=False)

    def texts_per_s(self, texts: int) -> float:
        """Throughput over the whole pass."""
        return texts / self.seconds

    @property
    def cores_used(self) -> float:
        """CPU seconds per wall second: how much of the machine the pass got."""
        return self.cpu_s / self.seconds


class InProcess:
    """The server's own model pieces, driven directly: the same work with no RPC, no scheduler."""

    def __init__(self, model: str, cache_dir: Path, intra_op_threads: int) -> None:
        path = resolve_model_path(model)
        self.config: ModelConfig = load_model_config(path)
        self.tokenizer = TextTokenizer(path, self.config.max_input_tokens)
        self.backend = OnnxBackend(self.config, "auto", cache_dir, intra_op_threads)

    def embed(self, texts: Sequence[str], batch_size: int, window: int = 0) -> tuple[FloatArray, InProcessRun]:
        """Tokenizes all texts, sorts them by length (within windows of `window` texts; 0 sorts
        all), runs batches, pools and normalizes. Returns the vectors in input order and where
        the time went."""
        cpu0, start = time.process_time(), time.perf_counter()
        tokenized = self.tokenizer.encode(list(texts))

        def finish(hidden: FloatArray, mask: npt.NDArray[np.int64]) -> Sequence[Any]:
            vectors = pool(hidden, mask, self.config.pooling)
            return list(normalize(vectors) if self.config.normalize else vectors)

        rows, run = run_batches(self.tokenizer, self.backend, tokenized, batch_size, window, finish, cpu0, start)
        return np.stack(rows), run


def run_batches(
    tokenizer: TextTokenizer,
    backend: OnnxBackend,
    tokenized: Tokenized,
    batch_size: int,
    window: int,
    finish: Callable[[FloatArray, npt.NDArray[np.int64]], Sequence[Any]],
    cpu0: float,
    start: float,
) -> tuple[list[Any], InProcessRun]:
    """Sorts tokenized items by length (within windows of `window`; 0 sorts all), runs them in
    batches of `batch_size`, turns each forward output (with its attention mask) into one result
    per item with `finish`. Returns the results in input order and where the time went, counted
    from `start` / `cpu0` (taken before tokenizing)."""
    tokenized_at = time.perf_counter()
    order = length_order(tokenized.lengths, window)
    results: list[Any] = [None] * len(order)
    forward_s = 0.0
    padded = 0
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        ids, mask, types = tokenizer.collate([tokenized.encodings[i] for i in rows])
        padded += ids.size
        t0 = time.perf_counter()
        output = backend.forward(ids, mask, types)
        forward_s += time.perf_counter() - t0
        for row, result in zip(rows, finish(output, mask), strict=True):
            results[row] = result
    end = time.perf_counter()
    run = InProcessRun(
        seconds=end - start,
        tokenize_s=tokenized_at - start,
        forward_s=forward_s,
        tokens=tokenized.tokens,
        padded_tokens=padded,
        cpu_s=time.process_time() - cpu0,
        lengths=tokenized.lengths,
    )
    return results, run


def measure_in_process(args: argparse.Namespace, corpus: list[str]) -> tuple[FloatArray, InProcessRun]:
    """Loads the pieces, warms them up, runs the corpus once, then frees the session so its
    threads and memory are gone before the server phases."""
    engine = InProcess(args.model, args.cache_dir, args.intra_op_threads)
    engine.embed(corpus[: 4 * args.batch_size], args.batch_size)  # warm-up: first-run allocations
    vectors, run = engine.embed(corpus, args.batch_size, args.baseline_window)
    del engine
    gc.collect()
    return vectors, run


# -- the server process --------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """`python -m embedserve` on an ephemeral loopback port; its stderr is kept for errors."""

    def __init__(self, args: argparse.Namespace) -> None:
        command = [sys.executable, "-m", "embedserve", "--host", "127.0.0.1", "--port", "0"]
        command += ["--cache-dir", str(args.cache_dir), "--model-names", args.model]
        command += ["--batch-sizes", str(args.batch_size), "--intra-op-threads", str(args.intra_op_threads)]
        self.command = [*command, *args.server_arg]
        self.proc = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.port: int | None = None
        self.address = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(args.startup_timeout) or self.port is None:
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-40:]))
        self.address = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.search(r"serving embedserve\.v1\.EmbeddingService on [\w.:\[\]-]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                self._ready.set()
        self._ready.set()  # exited: wake the waiter, which sees port None

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used so far (Linux /proc; NaN elsewhere)."""
        return process_cpu_s(self.proc.pid)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then waits for the drain; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# -- gRPC phases ---------------------------------------------------------------------------


def decode(response: pb.EmbedResponse) -> FloatArray:
    """float32_le vectors -> (n, dimension) array, one copy (the join)."""
    raw = b"".join([e.float32_le for e in response.embeddings])
    return np.frombuffer(raw, dtype="<f4").reshape(len(response.embeddings), response.dimension)


def channel(address: str) -> grpc.aio.Channel:
    """One client connection (its own subchannel, so N clients are N HTTP/2 connections)."""
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


@dataclass
class Throughput:
    """What one gRPC throughput phase measured."""

    seconds: float
    texts: int
    client_cpu_s: float
    server_cpu_s: float
    # Means of the server's EmbedResponse.timing over all responses, in ms.
    server_timing_ms: dict[str, float] = field(default_factory=dict)
    # Client-observed request latency (send to decoded), in ms.
    request_ms_p50: float = 0.0
    request_ms_p99: float = 0.0

    @property
    def texts_per_s(self) -> float:
        """Texts answered per second of wall time."""
        return self.texts / self.seconds

    @property
    def cores_used(self) -> float:
        """CPU seconds of bench and server per wall second: how much of the machine the phase got."""
        return (self.client_cpu_s + self.server_cpu_s) / self.seconds


def mean_timing(timings: Sequence[pb.Timing]) -> dict[str, float]:
    """Averages the server-reported timing fields."""
    if not timings:
        return {}
    names = ("queue_ms", "tokenize_ms", "inference_ms", "total_ms")
    return {n: statistics.fmean(getattr(t, n) for t in timings) for n in names}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN for no values."""
    return float(np.percentile(values, q)) if values else float("nan")


class TimedResponse(Protocol):
    """A response that carries the server's timing (EmbedResponse, SparseEmbedResponse, RerankResponse)."""

    @property
    def timing(self) -> pb.Timing: ...


Req = TypeVar("Req")
Resp = TypeVar("Resp", bound=TimedResponse)
Out = TypeVar("Out")


async def rpc_load(
    stubs: Sequence[pb_grpc.EmbeddingServiceStub],
    requests: Sequence[Req],
    call: Callable[[pb_grpc.EmbeddingServiceStub, Req], Awaitable[Resp]],
    decode: Callable[[Resp], Out],
) -> tuple[list[Out], list[pb.Timing], list[float]]:
    """Each stub is one client that takes the next request from a shared queue until none are
    left, and decodes every response. Returns the decoded responses in request order, the
    server timings and the client-seen latencies in ms."""
    queue = collections.deque(enumerate(requests))
    results: list[Any] = [None] * len(requests)
    timings: list[pb.Timing] = []
    latencies: list[float] = []

    async def client(stub: pb_grpc.EmbeddingServiceStub) -> None:
        while queue:
            index, request = queue.popleft()
            sent = time.perf_counter()
            response = await call(stub, request)
            results[index] = decode(response)
            latencies.append((time.perf_counter() - sent) * 1e3)
            timings.append(response.timing)

    await asyncio.gather(*(client(stub) for stub in stubs))
    return results, timings, latencies


async def embed_load(
    stubs: Sequence[pb_grpc.EmbeddingServiceStub], requests: Sequence[pb.EmbedRequest]
) -> tuple[list[FloatArray], list[pb.Timing], list[float]]:
    """rpc_load for Embed, decoding every response into its (n, dimension) vectors."""
    return await rpc_load(stubs, requests, lambda stub, request: stub.Embed(request), decode)


async def stream_bulk(
    stub: pb_grpc.EmbeddingServiceStub, requests: Sequence[pb.EmbedStreamRequest], in_flight: int
) -> tuple[dict[str, FloatArray], list[pb.Timing]]:
    """Sends every request on one EmbedStream with at most `in_flight` unanswered; checks each
    id is answered exactly once and without error."""
    call = stub.EmbedStream()
    window = asyncio.Semaphore(in_flight)

    async def write() -> None:
        for request in requests:
            await window.acquire()
            await call.write(request)
        await call.done_writing()

    writer = asyncio.create_task(write())
    answered: dict[str, FloatArray] = {}
    timings: list[pb.Timing] = []
    try:
        while (message := await call.read()) is not grpc.aio.EOF:
            assert isinstance(message, pb.EmbedStreamResponse)
            if message.HasField("error"):
                raise RuntimeError(
                    f"stream request {message.id} failed: {message.error.status} {message.error.message}"
                )
            if message.id in answered:
                raise RuntimeError(f"stream answered id {message.id} twice")
            answered[message.id] = decode(message.response)
            timings.append(message.response.timing)
            window.release()
        await writer
    finally:
        writer.cancel()
    missing = {r.id for r in requests} - answered.keys()
    if missing:
        raise RuntimeError(f"stream never answered {len(missing)} ids, e.g. {sorted(missing)[:5]}")
    return answered, timings


async def probe_latency(
    stub: pb_grpc.EmbeddingServiceStub, until: Callable[[], bool], limit: int
) -> tuple[list[float], list[pb.Timing]]:
    """Sends one short input at a time until `until()` or `limit` calls; returns latencies in ms
    and the server's timing of each call."""
    request = pb.EmbedRequest(inputs=[LATENCY_INPUT])
    latencies: list[float] = []
    timings: list[pb.Timing] = []
    while not until() and len(latencies) < limit:
        sent = time.perf_counter()
        response = await stub.Embed(request)
        decode(response)
        latencies.append((time.perf_counter() - sent) * 1e3)
        timings.append(response.timing)
    return latencies, timings


class CpuClock:
    """CPU seconds of this process and of the server over a phase."""

    def __init__(self, server: ServerProcess) -> None:
        self._server = server
        self.client_s = 0.0
        self.server_s = 0.0

    def __enter__(self) -> CpuClock:
        self._c0, self._s0 = time.process_time(), self._server.cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client_s = time.process_time() - self._c0
        self.server_s = self._server.cpu_s() - self._s0


@dataclass
class ServerResults:
    """Everything measured against the running server."""

    embed: Throughput
    stream: Throughput
    idle_ms: list[float]
    loaded_ms: list[float]
    # Means of the server's timing of the short calls made under load, in ms.
    loaded_timing_ms: dict[str, float]
    loaded_texts_per_s: float
    embed_vectors: FloatArray
    stream_vectors: FloatArray
    # (b) again with the corpus sent in length order, and its vectors in corpus order.
    presorted: Throughput | None = None
    presorted_vectors: FloatArray | None = None


async def timed_embed_load(
    server: ServerProcess, stubs: Sequence[pb_grpc.EmbeddingServiceStub], texts: Sequence[str], request_size: int
) -> tuple[Throughput, FloatArray]:
    """Runs `texts` through Embed with one client per stub; returns the measurement and the
    vectors in the order of `texts`."""
    requests = [pb.EmbedRequest(inputs=g) for g in chunks(texts, request_size)]
    with CpuClock(server) as cpu:
        start = time.perf_counter()
        results, timings, latencies = await embed_load(stubs, requests)
        seconds = time.perf_counter() - start
    throughput = Throughput(
        seconds,
        len(texts),
        cpu.client_s,
        cpu.server_s,
        mean_timing(timings),
        percentile(latencies, 50),
        percentile(latencies, 99),
    )
    return throughput, np.concatenate(results)


async def measure_server(
    args: argparse.Namespace, server: ServerProcess, corpus: list[str], by_length: list[int] | None
) -> ServerResults:
    """Phases (d idle), (b), (c), (d under load) against one running server; with `by_length`
    (corpus positions, shortest first) also (b) on the corpus sent in that order."""
    embed_requests = [pb.EmbedRequest(inputs=g) for g in chunks(corpus, args.request_size)]
    stream_requests = [pb.EmbedStreamRequest(id=str(i), request=r) for i, r in enumerate(embed_requests)]
    channels = [channel(server.address) for _ in range(args.clients)]
    probe_channel = channel(server.address)
    try:
        await asyncio.gather(*(c.channel_ready() for c in [*channels, probe_channel]))
        stubs = [pb_grpc.EmbeddingServiceStub(c) for c in channels]
        probe = pb_grpc.EmbeddingServiceStub(probe_channel)

        # Warm-up: every connection with a short call, then two full batches of corpus texts
        # (ORT's first runs allocate); small, so a --quick corpus is not mostly warm-up.
        for stub in [*stubs, probe]:
            await probe_latency(stub, lambda: False, 3)
        await embed_load(stubs[:2], embed_requests[:2])

        step(f"(d) idle latency, {args.idle_calls} calls")
        idle, _ = await probe_latency(probe, lambda: False, args.idle_calls)

        step(f"(b) Embed, {args.clients} clients")
        embed, embed_vectors = await timed_embed_load(server, stubs, corpus, args.request_size)

        step(f"(c) EmbedStream, {args.stream_in_flight} requests in flight")
        with CpuClock(server) as cpu:
            start = time.perf_counter()
            answered, timings = await stream_bulk(stubs[0], stream_requests, args.stream_in_flight)
            seconds = time.perf_counter() - start
        stream = Throughput(seconds, len(corpus), cpu.client_s, cpu.server_s, mean_timing(timings))
        stream_vectors = np.concatenate([answered[str(i)] for i in range(len(stream_requests))])

        # The prober runs while the clients consume the corpus once more.
        step(f"(d) latency under Embed load, {args.clients} clients")
        load = asyncio.create_task(embed_load(stubs, embed_requests))
        await asyncio.sleep(0)  # let the clients send their first requests
        start = time.perf_counter()
        loaded, loaded_timings = await probe_latency(probe, load.done, limit=1 << 30)
        await load
        loaded_texts_per_s = len(corpus) / (time.perf_counter() - start)
        results = ServerResults(
            embed, stream, idle, loaded, mean_timing(loaded_timings), loaded_texts_per_s, embed_vectors, stream_vectors
        )

        if by_length is not None:
            # Requests of similar lengths make every batch nearly padding-free, as in (a):
            # what is left between this and (a) is the RPC path, not batching.
            step(f"(b') Embed, {args.clients} clients, corpus sent shortest first")
            texts = [corpus[i] for i in by_length]
            results.presorted, vectors = await timed_embed_load(server, stubs, texts, args.request_size)
            results.presorted_vectors = np.empty_like(vectors)
            results.presorted_vectors[by_length] = vectors
    finally:
        for c in [*channels, probe_channel]:
            await c.close()
    return results


# -- (e) the wire form ---------------------------------------------------------------------


@dataclass
class WireForm:
    """Median milliseconds per step for one encoding, and the serialized size."""

    build_ms: float
    serialize_ms: float
    parse_ms: float
    decode_ms: float
    bytes: int

    @property
    def total_ms(self) -> float:
        """Build + serialize + parse + decode."""
        return self.build_ms + self.serialize_ms + self.parse_ms + self.decode_ms


def measure_wire(count: int, dimension: int, seed: int, repeats: int) -> dict[str, WireForm]:
    """Builds responses with the server's own converter, then serializes, parses and decodes
    them the way a numpy client would, for packed floats and for float32_le bytes."""
    rng = np.random.default_rng(seed)
    vectors = normalize(rng.standard_normal((count, dimension), dtype=np.float32))
    result = EmbedResult(vectors, "bench", Usage(prompt_tokens=0, truncated_inputs=0), Timing(0.0, 0.0, 0.0, 0.0))
    decoders: dict[int, Callable[[pb.EmbedResponse], FloatArray]] = {
        pb.VECTOR_ENCODING_FLOAT: lambda r: np.array([e.values for e in r.embeddings], dtype=np.float32),
        pb.VECTOR_ENCODING_FLOAT32_LE: decode,
    }
    forms: dict[str, WireForm] = {}
    for name, encoding in (("values", pb.VECTOR_ENCODING_FLOAT), ("float32_le", pb.VECTOR_ENCODING_FLOAT32_LE)):
        steps: dict[str, list[float]] = {"build": [], "serialize": [], "parse": [], "decode": []}
        size = 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            response = convert.embed_response(result, encoding)
            t1 = time.perf_counter()
            data = response.SerializeToString()
            t2 = time.perf_counter()
            parsed = pb.EmbedResponse.FromString(data)
            t3 = time.perf_counter()
            decoded = decoders[encoding](parsed)
            t4 = time.perf_counter()
            if not np.array_equal(decoded, vectors):
                raise AssertionError(f"{name}: decoded vectors differ from the originals")
            size = len(data)
            for key, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                steps[key].append(seconds * 1e3)
        median = {key: statistics.median(values) for key, values in steps.items()}
        forms[name] = WireForm(median["build"], median["serialize"], median["parse"], median["decode"], size)
    return forms


# -- report --------------------------------------------------------------------------------


def max_abs_diff(a: FloatArray, b: FloatArray) -> float:
    """Largest element-wise difference between two equally shaped arrays."""
    return float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> Iterator[str]:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        yield "  ".join(cells).rstrip()


def in_process_row(label: str, run: InProcessRun, texts: int) -> tuple[str, ...]:
    """One table row for an in-process pass."""
    notes = (
        f"forward {run.forward_s / run.seconds:.0%} of wall, tokenize {run.tokenize_s / run.seconds:.0%}, "
        f"padding efficiency {run.tokens / run.padded_tokens:.0%}"
    )
    return (label, f"{run.texts_per_s(texts):.1f}", "", f"{run.cpu_s:.1f}", "", f"{run.cores_used:.2f}", "", notes)


def grpc_row(label: str, phase: Throughput, ceiling: float, ceiling_cpu_s: float) -> tuple[str, ...]:
    """One table row for a gRPC throughput phase: ratios to the ceiling in wall time and in CPU
    seconds (steadier on a shared machine), and the server's mean timing per request."""
    ratio = phase.texts_per_s / ceiling
    cpu_ratio = ceiling_cpu_s / (phase.client_cpu_s + phase.server_cpu_s)
    t = phase.server_timing_ms
    notes = (
        f"server ms/request: queue {t.get('queue_ms', 0):.0f}, tokenize {t.get('tokenize_ms', 0):.1f}, "
        f"inference {t.get('inference_ms', 0):.0f}, total {t.get('total_ms', 0):.0f}"
    )
    verdict = "ok" if ratio >= TARGET_RATIO else "LOW"
    return (label, f"{phase.texts_per_s:.1f}", f"{ratio:.2f} {verdict}", f"{phase.client_cpu_s:.1f}",
            f"{phase.server_cpu_s:.1f}", f"{phase.cores_used:.2f}", f"{cpu_ratio:.2f}", notes)  # fmt: skip


def latency_row(label: str, latencies: Sequence[float], notes: str = "") -> tuple[str, ...]:
    """p50 / p99 / count of a list of latencies in ms."""
    return (label, f"{percentile(latencies, 50):.1f}", f"{percentile(latencies, 99):.1f}", str(len(latencies)), notes)


def wire_row(label: str, w: WireForm) -> tuple[str, ...]:
    """Per-step milliseconds and size of one encoding."""
    steps = (w.build_ms, w.serialize_ms, w.parse_ms, w.decode_ms, w.total_ms)
    return (label, *(f"{ms:.2f}" for ms in steps), f"{w.bytes:,}")


def report(
    args: argparse.Namespace,
    corpus: list[str],
    a1: InProcessRun,
    a2: InProcessRun,
    server: ServerResults,
    wire: dict[str, WireForm],
    diffs: dict[str, float],
) -> dict[str, Any]:
    """Prints the tables and returns the JSON summary."""
    n = len(corpus)
    a_before, a_after = a1.texts_per_s(n), a2.texts_per_s(n)
    a_mean = (a_before + a_after) / 2
    a_cpu = (a1.cpu_s + a2.cpu_s) / 2
    ratio_b = server.embed.texts_per_s / a_mean
    ratio_c = server.stream.texts_per_s / a_mean
    values, raw = wire["values"], wire["float32_le"]
    sorted_by = f"windows of {args.baseline_window} texts" if args.baseline_window else "the whole corpus"
    visible = args.clients * args.request_size
    visible_padding = padding_efficiency(a1.lengths, args.batch_size, visible)

    print()
    print(
        f"embedserve bench: {n} texts (seed {args.seed}, 8-120 words, {a1.tokens} tokens, "
        f"{a1.tokens / n:.0f} per text), {args.model}, batch {args.batch_size}, "
        f"requests of {args.request_size}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print()
    throughput = [
        in_process_row("(a) in-process ORT, before server", a1, n),
        in_process_row("(a) in-process ORT, after server", a2, n),
        ("(a) ceiling: mean of the two", f"{a_mean:.1f}", "1.00", f"{a_cpu:.1f}", "", "", "1.00",
         f"before/after differ by {abs(a_before - a_after) / a_mean:.1%}"),
        grpc_row(f"(b) Embed, {args.clients} clients", server.embed, a_mean, a_cpu),
        grpc_row(f"(c) EmbedStream, {args.stream_in_flight} in flight", server.stream, a_mean, a_cpu),
    ]  # fmt: skip
    if server.presorted is not None:
        throughput.append(grpc_row("(b') as (b), corpus sent shortest first", server.presorted, a_mean, a_cpu))
    header = ("throughput", "texts/s", "vs (a)", "cpu s bench", "cpu s server", "cores used", "cpu vs (a)", "notes")
    print("\n".join(table(throughput, header)))
    print("  cpu vs (a): in-process CPU seconds / (bench + server) CPU seconds for the same texts")
    grpc_phases = [server.embed, server.stream, *([server.presorted] if server.presorted else [])]
    cores = [a1.cores_used, a2.cores_used, *(phase.cores_used for phase in grpc_phases)]
    if max(cores) > 1.15 * min(cores):
        print(
            f"  WARNING: the phases got between {min(cores):.2f} and {max(cores):.2f} cores: something else "
            f"used the CPU during some of them, so the wall-time ratios are off by up to "
            f"{max(cores) / min(cores) - 1:.0%}; 'cpu vs (a)' is less affected, but not immune (threads that "
            f"wait on a busy core burn CPU): rerun on a quiet machine"
        )
    print(
        f"  (b) request latency seen by the clients: p50 {server.embed.request_ms_p50:.0f} ms, "
        f"p99 {server.embed.request_ms_p99:.0f} ms"
    )
    print(
        f"  padding (real / padded tokens): (a) sorts {sorted_by} by length: {a1.tokens / a1.padded_tokens:.1%}; "
        f"a server that sees at most {visible} texts at once ({args.clients} clients x {args.request_size}) "
        f"gets at best {visible_padding:.1%} with fixed batches of {args.batch_size}"
    )
    print()
    t = server.loaded_timing_ms
    latency = [
        latency_row("(d) idle", server.idle_ms),
        latency_row(f"(d) under Embed load, {args.clients} clients", server.loaded_ms,
                    f"load ran at {server.loaded_texts_per_s:.1f} texts/s; server mean ms: "
                    f"queue {t.get('queue_ms', 0):.0f}, inference {t.get('inference_ms', 0):.0f}"),
    ]  # fmt: skip
    print("\n".join(table(latency, (f'latency of "{LATENCY_INPUT}"', "p50 ms", "p99 ms", "calls", "notes"))))
    print()
    wire_rows = [wire_row(name, w) for name, w in wire.items()]
    wire_rows.append(("values / float32_le", "", "", "", "", f"{values.total_ms / raw.total_ms:.1f}x",
                      f"{values.bytes / raw.bytes:.3f}x"))  # fmt: skip
    wire_header = (f"(e) wire, {args.wire_vectors} x {args.wire_dimension}", "build ms", "serialize ms", "parse ms",
                   "decode ms", "total ms", "bytes")  # fmt: skip
    print("\n".join(table(wire_rows, wire_header)))
    print()
    worst = max(diffs.values())
    each = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    verdict = "ok" if worst < VECTOR_TOLERANCE else "MISMATCH"
    print(f"vectors: server vs in-process max |diff| {worst:.1e} ({verdict}: {each})")
    print(f"ratios: (b)/(a) = {ratio_b:.3f}  (c)/(a) = {ratio_c:.3f}  (target >= {TARGET_RATIO:.2f})")

    def throughput_json(t: Throughput) -> dict[str, Any]:
        cpu_ratio = a_cpu / (t.client_cpu_s + t.server_cpu_s)
        return {**asdict(t), "texts_per_s": t.texts_per_s, "cores_used": t.cores_used, "cpu_ratio": cpu_ratio}

    return {
        "bench": "embed_bench",
        "model": args.model,
        "texts": n,
        "tokens": a1.tokens,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "request_size": args.request_size,
        "clients": args.clients,
        "stream_in_flight": args.stream_in_flight,
        "cores": os.cpu_count(),
        "in_process_before_texts_per_s": a_before,
        "in_process_after_texts_per_s": a_after,
        "in_process_texts_per_s": a_mean,
        "in_process_runs": [
            {**{k: v for k, v in asdict(r).items() if k != "lengths"}, "cores_used": r.cores_used} for r in (a1, a2)
        ],
        "baseline_window": args.baseline_window,
        "padding_efficiency_in_process": a1.tokens / a1.padded_tokens,
        "padding_efficiency_best_visible": visible_padding,
        "embed": throughput_json(server.embed),
        "stream": throughput_json(server.stream),
        "presorted": throughput_json(server.presorted) if server.presorted else None,
        "ratio_embed": ratio_b,
        "ratio_stream": ratio_c,
        "ratio_presorted": server.presorted.texts_per_s / a_mean if server.presorted else None,
        "target_ratio": TARGET_RATIO,
        "latency_idle_ms": {
            "p50": percentile(server.idle_ms, 50),
            "p99": percentile(server.idle_ms, 99),
            "calls": len(server.idle_ms),
        },
        "latency_loaded_ms": {
            "p50": percentile(server.loaded_ms, 50),
            "p99": percentile(server.loaded_ms, 99),
            "calls": len(server.loaded_ms),
            "server_timing_ms": server.loaded_timing_ms,
            "load_texts_per_s": server.loaded_texts_per_s,
        },
        "wire": {name: {**asdict(w), "total_ms": w.total_ms} for name, w in wire.items()},
        "wire_time_ratio": values.total_ms / raw.total_ms,
        "wire_size_ratio": values.bytes / raw.bytes,
        "max_abs_diff": diffs,
    }


# -- main ----------------------------------------------------------------------------------


def add_shared_args(p: argparse.ArgumentParser) -> None:
    """Options every server-vs-in-process bench takes: batching, load shape, server and output."""
    defaults = Settings()
    batch = ModelSettings(DEFAULT_DENSE_MODEL).batch_size
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch,
        help=f"forward-pass batch, in-process and --batch-sizes for the server (default {batch})",
    )
    p.add_argument("--request-size", type=int, default=32, help="items per request (default 32)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument(
        "--baseline-window",
        type=int,
        default=0,
        help="in-process: sort by length within windows of this many items, e.g. clients x request size "
        "to give it only what the server can see at once (default 0: sort all)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=defaults.cache_dir,
        help=f"ONNX export cache, shared with the server (default {defaults.cache_dir})",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=defaults.intra_op_threads,
        help="threads per forward pass, in-process and server; 0 = cores (default 0)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for the server, repeatable, e.g. --server-arg=--stream-window=32",
    )
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server")
    p.add_argument("--json-out", type=Path, help="also write the JSON summary to this file")


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exits with a usage error when any of the named options is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=3000, help="corpus size (default 3000)")
    p.add_argument("--quick", action="store_true", help="smoke run: 384 texts, fewer latency calls and wire repeats")
    p.add_argument("--seed", type=int, default=0, help="corpus and wire-vector seed (default 0)")
    add_shared_args(p)
    p.add_argument(
        "--presorted",
        action="store_true",
        help="also run (b) with the corpus sent shortest first, so batches barely pad: (b')/(a) is the "
        "cost of the RPC path alone, (b)/(b') the cost of batching what arrives",
    )
    p.add_argument(
        "--stream-in-flight",
        type=int,
        default=2 * defaults.stream_window,
        help=f"unanswered EmbedStream requests (default {2 * defaults.stream_window}, twice the server's window)",
    )
    p.add_argument("--idle-calls", type=int, default=50, help="sequential calls for idle latency (default 50)")
    p.add_argument("--wire-vectors", type=int, default=2048, help="vectors in the wire test (default 2048)")
    p.add_argument("--wire-dimension", type=int, default=384, help="dimension in the wire test (default 384)")
    p.add_argument("--wire-repeats", type=int, default=9, help="repeats per wire step, median taken (default 9)")
    p.add_argument("--model", default=DEFAULT_DENSE_MODEL, help=f"model (default {DEFAULT_DENSE_MODEL})")
    args = p.parse_args(argv)
    if args.quick:
        args.texts = min(args.texts, 384)
        args.idle_calls = min(args.idle_calls, 20)
        args.wire_repeats = min(args.wire_repeats, 3)
    check_positive(
        p, args, "texts", "batch_size", "request_size", "clients", "stream_in_flight", "idle_calls", "wire_repeats"
    )
    return args


def step(message: str) -> None:
    """Progress on stderr, so stdout holds only the report and the JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    corpus = make_corpus(args.texts, args.seed)

    step(f"(a1) in-process baseline on {len(corpus)} texts")
    a_vectors, a1 = measure_in_process(args, corpus)
    step(f"(a1) {a1.texts_per_s(len(corpus)):.1f} texts/s; starting the server")

    server = ServerProcess(args)
    try:
        step(f"server on {server.address} ({' '.join(server.command[1:])})")
        by_length = length_order(a1.lengths, 0) if args.presorted else None
        results = asyncio.run(measure_server(args, server, corpus, by_length))
    finally:
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"server exited {code} after SIGTERM:\n" + "".join(server.lines[-40:]))
    step(
        f"(b) {results.embed.texts_per_s:.1f} texts/s, (c) {results.stream.texts_per_s:.1f} texts/s; "
        f"server stopped (exit 0); (a2) in-process baseline"
    )

    _, a2 = measure_in_process(args, corpus)
    step(f"(a2) {a2.texts_per_s(len(corpus)):.1f} texts/s; (e) wire form")
    wire = measure_wire(args.wire_vectors, args.wire_dimension, args.seed, args.wire_repeats)

    diffs = {
        "embed": max_abs_diff(results.embed_vectors, a_vectors),
        "stream": max_abs_diff(results.stream_vectors, a_vectors),
    }
    if results.presorted_vectors is not None:
        diffs["presorted"] = max_abs_diff(results.presorted_vectors, a_vectors)
    return report(args, corpus, a1, a2, results, wire, diffs)


def emit_summary(summary: dict[str, Any], json_out: Path | None, mismatch: str) -> int:
    """Prints the JSON line (and writes it to json_out); returns 1 when the server's results
    differ from the in-process ones beyond the tolerance, saying `mismatch`, else 0."""
    line = json.dumps(summary, sort_keys=True)
    print(line)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(line + "\n")
    worst = max(summary["max_abs_diff"].values())
    if worst >= VECTOR_TOLERANCE:
        print(f"{mismatch} by up to {worst:.1e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return emit_summary(run(args), args.json_out, "embed_bench: server vectors differ from in-process ones")


if __name__ == "__main__":
    sys.exit(main())
