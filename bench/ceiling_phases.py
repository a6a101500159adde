"""The phases of bench.ceiling: Embed with few and with many clients and one EmbedStream, against
this checkout's server and a baseline commit's, alternated round by round; and a py-spy profile of
each server under the few-clients Embed load. Each returns what it measured."""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.harness import FloatArray, chunks, max_abs_diff, step
from bench.inprocess import ForwardCost
from bench.load import Connections, Throughput, embed_call, probe_latency, rpc_load
from bench.load import decode as decode_vectors
from bench.phases import timed_embed, timed_stream
from bench.process import ServerProcess, thread_cpu_s
from bench.shared_phases import Spread
from embedserve.v1 import embedding_service_pb2 as pb

if TYPE_CHECKING:
    from embedserve.v1.embedding_service_pb2_grpc import EmbeddingServiceAsyncStub as Stub

# The two codes every phase runs against, in the order of odd rounds (even rounds reverse it).
NEW, OLD = "new", "old"
CODES = (NEW, OLD)
# What the request path should reach, texts/s of this checkout over the baseline's (issue 9).
TARGET = 2.0
# Functions listed per profile.
PROFILE_TOP = 15


@dataclass(frozen=True)
class Phase:
    """One load shape: `clients` unary Embed clients, or (clients 0) one EmbedStream."""

    key: str
    label: str
    clients: int


def phases(few: int, many: int, request_size: int, in_flight: int) -> list[Phase]:
    """Embed with `few` and with `many` clients of `request_size` texts, and one EmbedStream."""
    return [
        Phase(f"embed_{few}", f"Embed, {few} clients x {request_size}", few),
        Phase(f"embed_{many}", f"Embed, {many} clients x {request_size}", many),
        Phase("stream", f"EmbedStream, {request_size} a request, {in_flight} in flight", 0),
    ]


@dataclass(frozen=True)
class Sample:
    """One timed pass of the corpus through one phase on one code's server; `idle_cpu_s` is what
    the other server (which had no load) used meanwhile."""

    phase: str
    code: str
    round: int
    throughput: Throughput
    idle_cpu_s: float


@dataclass(frozen=True)
class Profile:
    """One server under load: the CPU of each thread, and py-spy's samples of the thread that held
    the GIL (`record --gil`): per thread, per innermost function (self) and per function on the
    stack (inclusive), as shares of those samples. `error` says why there is none."""

    seconds: float = 0.0
    texts: int = 0
    rate: int = 0
    samples: int = 0
    # CPU ms per 1,000 texts by thread name; threads that run no Python are NATIVE.
    thread_cpu_ms: list[tuple[str, float]] = field(default_factory=list)
    threads: list[tuple[str, float]] = field(default_factory=list)
    functions: list[tuple[str, float]] = field(default_factory=list)
    inclusive: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""

    @property
    def gil_share(self) -> float:
        """How much of the time some thread of the server held the GIL."""
        return self.samples / (self.rate * self.seconds) if self.rate and self.seconds else 0.0


@dataclass
class CeilingBench:
    """All that bench.ceiling measured, for the report."""

    model: Path
    commit: str
    baseline_commit: str
    phases: list[Phase]
    forward: dict[str, ForwardCost]  # by code: how that code's server runs a forward pass
    samples: list[Sample]
    profiles: dict[str, Profile]
    # Largest |server - in-process| per code, and between the two codes' vectors.
    diffs: dict[str, float]

    def of(self, phase: str, code: str) -> list[Sample]:
        """The samples of one phase and code, in round order."""
        return [s for s in self.samples if s.phase == phase and s.code == code]

    def rate(self, phase: str, code: str) -> Spread:
        """texts/s over the rounds."""
        return Spread.of([s.throughput.texts_per_s for s in self.of(phase, code)])

    def ratio(self, phase: str) -> Spread:
        """texts/s of the new code over the old, round by round."""
        pairs = zip(self.of(phase, NEW), self.of(phase, OLD), strict=True)
        return Spread.of([new.throughput.texts_per_s / old.throughput.texts_per_s for new, old in pairs])

    def cpu_ms_per_1000(self, phase: str, code: str, client: bool = False) -> float:
        """Server (or with `client`, bench) CPU milliseconds per 1,000 texts over all rounds."""
        runs = [s.throughput for s in self.of(phase, code)]
        cpu = sum(t.client_cpu_s if client else t.server_cpu_s for t in runs)
        return cpu * 1e6 / sum(t.texts for t in runs)

    def idle_share(self) -> float:
        """The most CPU the unloaded server used during a phase, as a share of the loaded one's."""
        return max(s.idle_cpu_s / s.throughput.server_cpu_s for s in self.samples)


# -- the load ------------------------------------------------------------------------------------


@dataclass
class Target:
    """One code's running server and its client connections."""

    server: ServerProcess
    connections: Connections

    @property
    def stubs(self) -> list[Stub]:
        """One stub per connection."""
        return self.connections.stubs


class Vectors:
    """Checks every pass's vectors against the in-process ones, and the two codes' against each other."""

    def __init__(self, reference: FloatArray) -> None:
        self.reference = reference
        self.first: dict[str, FloatArray] = {}
        self.diffs: dict[str, float] = {f"{code}_vs_in_process": 0.0 for code in CODES}
        self.diffs["new_vs_old"] = 0.0

    def check(self, code: str, vectors: FloatArray) -> None:
        """Keeps the largest differences seen."""
        key = f"{code}_vs_in_process"
        self.diffs[key] = max(self.diffs[key], max_abs_diff(vectors, self.reference))
        self.first.setdefault(code, vectors)
        if len(self.first) == len(CODES):
            self.diffs["new_vs_old"] = max(self.diffs["new_vs_old"], max_abs_diff(self.first[NEW], self.first[OLD]))


async def run_phase(
    phase: Phase, target: Target, corpus: list[str], request_size: int, in_flight: int
) -> tuple[Throughput, FloatArray]:
    """The corpus once through one phase."""
    if phase.clients:
        return await timed_embed(target.server, target.stubs[: phase.clients], corpus, request_size)
    requests = [
        pb.EmbedStreamRequest(id=str(i), request=pb.EmbedRequest(inputs=g))
        for i, g in enumerate(chunks(corpus, request_size))
    ]
    return await timed_stream(target.server, target.stubs[0], requests, len(corpus), in_flight)


async def warm_up(target: Target, corpus: list[str], request_size: int) -> None:
    """Every connection with a short call, then a few corpus requests from every connection."""
    for stub in target.stubs:
        await probe_latency(stub, lambda: False, 1)
    requests = [pb.EmbedRequest(inputs=g) for g in chunks(corpus, request_size)][: 2 * len(target.stubs)]
    await rpc_load(target.stubs, requests, embed_call, decode_vectors)


@dataclass(frozen=True)
class Plan:
    """What every round runs."""

    corpus: list[str]
    request_size: int
    in_flight: int
    rounds: int
    phases: list[Phase]


async def measure_rounds(plan: Plan, targets: dict[str, Target], vectors: Vectors) -> list[Sample]:
    """Every round runs every phase on both codes, one after the other; odd rounds new first,
    even rounds old first, which cancels slow drift."""
    samples = []
    for target in targets.values():
        await warm_up(target, plan.corpus, plan.request_size)
    for round_ in range(1, plan.rounds + 1):
        order = CODES if round_ % 2 else CODES[::-1]
        for phase in plan.phases:
            rates = []
            for code in order:
                other = targets[OLD if code == NEW else NEW].server
                idle_before = other.cpu_s()
                throughput, got = await run_phase(phase, targets[code], plan.corpus, plan.request_size, plan.in_flight)
                samples.append(Sample(phase.key, code, round_, throughput, other.cpu_s() - idle_before))
                vectors.check(code, got)
                rates.append(f"{code} {throughput.texts_per_s:.0f}")
            step(f"round {round_}/{plan.rounds}, {phase.label}: {', '.join(rates)} texts/s")
    return samples


# -- the profile ---------------------------------------------------------------------------------


def py_spy() -> str | None:
    """The py-spy executable (the dev extras install it into the venv), or None."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


_LINE = re.compile(r":\d+\)")
_THREAD = re.compile(r"^thread \(\d+\): (.*)$")
_DUMPED = re.compile(r'Thread (\d+) \(\w+\): "([^"]*)"')
# Threads that run no Python: ONNX Runtime's intra-op pool, the tokenizers' rayon pool, gRPC core.
NATIVE = "native (ORT intra-op, tokenizers, gRPC core)"
RATE = 100  # py-spy samples per second
# Frames on every stack of their thread, left out of the inclusive list.
_FRAMING = ("(<frozen runpy>)", "(threading.py)", "(concurrent/futures/thread.py)", "(asyncio/runners.py)",
            "(embedserve/__main__.py)", "(embedserve/cli.py)", "BaseEventLoop.run_")  # fmt: skip


def thread_kind(name: str) -> str:
    """A Python thread's name without the parts that differ per model or per pool member."""
    if name.startswith("forward-"):
        return "forward"
    if name.startswith("interactive-"):
        return "interactive"
    return re.sub(r"_\d+$", "", name)


def summarize_raw(raw: str) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]], list[tuple[str, float]]]:
    """py-spy's raw (collapsed) stacks, `--threads`: the samples, and as shares of them the samples
    per thread, per innermost function and per function anywhere on the stack (line numbers
    dropped, a function counted once a stack)."""
    threads: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        root, *frames = _LINE.sub(")", stack).split(";")
        match = _THREAD.match(root)
        thread = thread_kind(match.group(1) if match else root)
        threads[thread] += int(count)
        functions[f"{thread}: {frames[-1] if frames else '?'}"] += int(count)
        for frame in set(frames):
            if not any(part in frame for part in _FRAMING):
                inclusive[f"{thread}: {frame}"] += int(count)
    total = sum(threads.values())

    def shares(counts: collections.Counter[str], top: int) -> list[tuple[str, float]]:
        return [(name, n / max(total, 1)) for name, n in counts.most_common(top)]

    return total, shares(threads, 8), shares(functions, PROFILE_TOP), shares(inclusive, PROFILE_TOP)


def thread_names(executable: str, pid: int) -> dict[int, str]:
    """Python thread names by thread id, from `py-spy dump`."""
    dump = subprocess.run([executable, "dump", "--pid", str(pid)], capture_output=True, text=True, check=False)
    return {int(m.group(1)): thread_kind(m.group(2)) for m in _DUMPED.finditer(dump.stdout)}


def thread_cpu(
    before: dict[int, float], after: dict[int, float], names: dict[int, str], texts: int
) -> list[tuple[str, float]]:
    """CPU ms per 1,000 texts by thread name, most first."""
    by_name: dict[str, float] = collections.defaultdict(float)
    for tid, seconds in after.items():
        by_name[names.get(tid, NATIVE)] += seconds - before.get(tid, 0.0)
    ranked = sorted(by_name.items(), key=lambda item: -item[1])
    return [(name, seconds * 1e6 / texts) for name, seconds in ranked if seconds > 0]


class Looping:
    """`clients` Embed clients running the corpus over and over until stopped; counts the texts answered."""

    def __init__(self, stubs: Sequence[Stub], requests: Sequence[pb.EmbedRequest]) -> None:
        self.stubs, self.requests, self.texts = stubs, requests, 0
        self.stopped = False

    async def run(self) -> None:
        """Until stop()."""
        queue = collections.deque(self.requests)

        async def client(stub: Stub) -> None:
            while not self.stopped:
                request = queue.popleft()
                queue.append(request)
                await stub.Embed(request)
                self.texts += len(request.inputs)

        await asyncio.gather(*(client(stub) for stub in self.stubs))

    def stop(self) -> None:
        """Clients stop after their call in flight."""
        self.stopped = True


async def profile(target: Target, clients: int, corpus: list[str], request_size: int, seconds: float) -> Profile:
    """The server's CPU per thread and py-spy (`record --gil --threads --nonblocking`) for `seconds`
    while `clients` Embed clients run the corpus over and over."""
    executable = py_spy()
    if executable is None:
        return Profile(error="py-spy is not installed (pip install -e '.[dev]')")
    pid = target.server.proc.pid
    names = thread_names(executable, pid)
    load = Looping(target.stubs[:clients], [pb.EmbedRequest(inputs=g) for g in chunks(corpus, request_size)])
    running = asyncio.ensure_future(load.run())
    with tempfile.TemporaryDirectory(prefix="embedserve-profile-") as folder:
        out = Path(folder) / "profile.txt"
        command = [executable, "record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate", str(RATE)]
        command += ["--format", "raw", "--gil", "--threads", "--nonblocking", "--output", str(out)]
        await asyncio.sleep(0.5)  # the load is running
        before, texts_before = thread_cpu_s(pid), load.texts
        spy = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, errors = await asyncio.wait_for(spy.communicate(), timeout=seconds + 60)
        except TimeoutError:
            spy.kill()
            return Profile(error="py-spy did not finish")
        finally:
            after, texts = thread_cpu_s(pid), load.texts - texts_before
            load.stop()
            await running
        if spy.returncode != 0 or not out.is_file():
            return Profile(error=f"py-spy exited {spy.returncode}: {errors.decode(errors='replace').strip()[-300:]}")
        samples, threads, functions, inclusive = summarize_raw(out.read_text())
    cpu = thread_cpu(before, after, names, texts)
    return Profile(seconds, texts, RATE, samples, cpu, threads, functions, inclusive)


async def measure_servers(
    plan: Plan, servers: dict[str, ServerProcess], reference: FloatArray, profile_s: float
) -> tuple[list[Sample], dict[str, Profile], dict[str, float]]:
    """The rounds against both servers, then a profile of each under the first phase's load."""
    vectors = Vectors(reference)
    most = max(p.clients for p in plan.phases)
    async with Connections(servers[NEW].address, most) as new, Connections(servers[OLD].address, most) as old:
        await asyncio.gather(new.ready(), old.ready())
        targets = {NEW: Target(servers[NEW], new), OLD: Target(servers[OLD], old)}
        samples = await measure_rounds(plan, targets, vectors)
        profiles = {}
        if profile_s > 0:
            first = plan.phases[0]
            for code in CODES:
                step(f"profile of the {code} server, {profile_s:g} s of {first.label}")
                profiles[code] = await profile(targets[code], first.clients, plan.corpus, plan.request_size, profile_s)
    return samples, profiles, vectors.diffs
