"""The in-process ceiling: the server's own model pieces driven directly, with no RPC and no
scheduler. The one module of bench that imports embedserve's internals (the generated
embedserve.v1 messages aside), so that a change there is mended here alone."""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.harness import FloatArray, InProcessRun, RerankSparsePass, Workload, length_order
from bench.load import decode
from bench.tiny import copy_tokenizer
from embedserve import convert
from embedserve.backends.base import IntArray
from embedserve.backends.config import ModelConfig, load_model_config
from embedserve.backends.onnx import OnnxBackend, export_model
from embedserve.engine.kinds import DENSE, KINDS
from embedserve.engine.pooling import normalize
from embedserve.engine.registry import cpu_cores, forward_threads
from embedserve.engine.tokenizer import TextTokenizer, Tokenized
from embedserve.engine.types import EmbedResult, SparseVector, Timing, Usage
from embedserve.models import bundled_path, resolve_model_path

# Re-exported (`as`): the benches' default models are the server's.
from embedserve.settings import DEFAULT_DENSE_MODEL as DEFAULT_DENSE_MODEL
from embedserve.settings import DEFAULT_SPARSE_MODEL as DEFAULT_SPARSE_MODEL
from embedserve.settings import ModelSettings, Settings
from embedserve.v1 import embedding_service_pb2 as pb

# Where the cross-encoder is built, under --cache-dir; bump the suffix when the recipe changes.
CROSS_ENCODER_FOLDER = "bench-models/minilm-l6-cross-encoder-v1"


@dataclass(frozen=True)
class ServerDefaults:
    """The server's defaults that the benches' options start from."""

    batch_size: int
    cache_dir: Path
    intra_op_threads: int
    stream_window: int


def server_defaults() -> ServerDefaults:
    """The server's defaults for the dense model."""
    settings = Settings()
    batch_size = ModelSettings(DEFAULT_DENSE_MODEL).batch_size
    return ServerDefaults(batch_size, settings.cache_dir, settings.intra_op_threads, settings.stream_window)


@dataclass(frozen=True)
class Runner:
    """How the in-process side runs: the export cache, threads per forward pass, the batch size
    and the window sorted by length at once (0: all items)."""

    cache_dir: Path
    intra_op_threads: int
    batch_size: int
    window: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Runner:
        """From the options every bench takes (bench.options)."""
        return cls(args.cache_dir, args.intra_op_threads, args.batch_size, args.baseline_window)


Finish = Callable[[FloatArray, IntArray], Sequence[Any]]


class InProcessModel:
    """The server's own pieces for one model: tokenizer, ONNX Runtime session, and its kind's
    post-processing of each batch (embedserve.engine.kinds)."""

    def __init__(self, path: Path, dtype: str, runner: Runner) -> None:
        self.config: ModelConfig = load_model_config(path)
        self.spec = KINDS[self.config.kind]
        self.tokenizer = TextTokenizer(path, self.config.max_input_tokens)
        self.backend = OnnxBackend(self.config, self.spec.graph, dtype, runner.cache_dir, runner.intra_op_threads)

    def run(
        self, tokenize: Callable[[], Tokenized], finish: Finish, batch_size: int, window: int
    ) -> tuple[list[Any], InProcessRun]:
        """Tokenizes, sorts by length (within windows of `window` items; 0 sorts all), runs
        batches of `batch_size` and turns each forward output (with its attention mask) into one
        result per item with `finish`. Returns the results in input order and where the time went."""
        cpu0, start = time.process_time(), time.perf_counter()
        tokenized = tokenize()
        tokenized_at = time.perf_counter()
        order = length_order(tokenized.lengths, window)
        results: list[Any] = [None] * len(order)
        forward_s = 0.0
        padded = 0
        for begin in range(0, len(order), batch_size):
            rows = order[begin : begin + batch_size]
            ids, mask, types = self.tokenizer.collate([tokenized.encoded[i] for i in rows])
            padded += ids.size
            t0 = time.perf_counter()
            output = self.backend.forward(ids, mask, types)
            forward_s += time.perf_counter() - t0
            for row, result in zip(rows, finish(output, mask), strict=True):
                results[row] = result
        end = time.perf_counter()
        cpu_s = time.process_time() - cpu0
        run = InProcessRun(
            end - start, tokenized_at - start, forward_s, tokenized.tokens, padded, cpu_s, tokenized.lengths
        )
        return results, run


# -- dense: Embed's ceiling ------------------------------------------------------------------------


class DenseModel(InProcessModel):
    """Tokenize, forward, pool and normalize, as the server embeds."""

    def embed(self, texts: Sequence[str], batch_size: int, window: int = 0) -> tuple[FloatArray, InProcessRun]:
        """The vectors of `texts` in input order, and where the time went."""

        def finish(hidden: FloatArray, mask: IntArray) -> Sequence[Any]:
            vectors = np.stack(self.spec.outputs(hidden, mask, self.config))
            return list(normalize(vectors) if self.config.normalize else vectors)

        rows, run = self.run(lambda: self.tokenizer.encode(list(texts)), finish, batch_size, window)
        return np.stack(rows), run


def measure_dense(model: str, corpus: list[str], runner: Runner) -> tuple[FloatArray, InProcessRun]:
    """Loads the pieces, warms them up, runs the corpus once, then frees the session so its
    threads and memory are gone before the server phases."""
    engine = DenseModel(resolve_model_path(model), "auto", runner)
    engine.embed(corpus[: 4 * runner.batch_size], runner.batch_size)  # warm-up: first-run allocations
    vectors, run = engine.embed(corpus, runner.batch_size, runner.window)
    del engine
    gc.collect()
    return vectors, run


@dataclass(frozen=True)
class ForwardCost:
    """What the forward passes alone cost in this process (the least CPU of a few repeats):
    `texts` tokenized, sorted by length in windows, cut into batches and run through ONNX Runtime
    with `threads` intra-op threads (pool threads spinning between sections or not), with nothing
    else timed."""

    texts: int
    batches: int
    tokens: int
    padded_tokens: int
    cpu_s: float
    seconds: float
    threads: int
    spinning: bool

    def cpu_ms_per_1000(self) -> float:
        """CPU milliseconds per 1,000 texts."""
        return self.cpu_s * 1e6 / self.texts


# How a server runs its forward passes on CPU: intra-op threads, and whether the pool spins.
ForwardSetup = tuple[int, bool]


def server_forward_setup(intra_op_threads: int) -> ForwardSetup:
    """How this checkout's server runs each forward pass on this CPU with --intra-op-threads
    (0: its default, cores / forward workers), its pool threads never spinning."""
    settings = Settings(intra_op_threads=intra_op_threads)
    return forward_threads(settings, False, cpu_cores())[1], False


def spinning_setup(intra_op_threads: int) -> ForwardSetup:
    """How servers before the forward workers (5d22d87, say) ran it: one forward pass at a time
    on --intra-op-threads (0: every core), ONNX Runtime's pool threads spinning (its default)."""
    return intra_op_threads or os.cpu_count() or 1, True


def measure_forward(
    model: Path, texts: Sequence[str], runner: Runner, repeats: int, setups: dict[str, ForwardSetup]
) -> tuple[FloatArray, dict[str, ForwardCost]]:
    """The vectors of `texts` (tokenize, forward, pool, normalize, as bench.embed's ceiling) and,
    for each named setup, the CPU seconds of the forward passes alone over the same batches, the
    least of `repeats` (setups interleaved, so drift hits them alike)."""
    engine = DenseModel(model, "auto", runner)
    engine.embed(texts[: 4 * runner.batch_size], runner.batch_size)  # warm-up: first-run allocations
    vectors, _ = engine.embed(texts, runner.batch_size, runner.window)
    tokenized = engine.tokenizer.encode(list(texts))
    order = length_order(tokenized.lengths, runner.window)
    size = runner.batch_size
    batches = [
        engine.tokenizer.collate([tokenized.encoded[i] for i in order[b : b + size]])
        for b in range(0, len(order), size)
    ]
    model_file = export_model(engine.config, DENSE.graph, "fp32", runner.cache_dir)
    del engine
    sessions = {name: cpu_session(model_file, *setup) for name, setup in setups.items()}
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
    feeds = [{"input_ids": ids, "attention_mask": mask, "token_type_ids": types} for ids, mask, types in batches]
    for _ in range(repeats):
        for name, session in sessions.items():
            session.run(None, feeds[0])  # warm-up: first-run allocations
            cpu0, start = time.process_time(), time.perf_counter()
            for feed in feeds:
                session.run(None, feed)
            runs[name].append((time.process_time() - cpu0, time.perf_counter() - start))
    del sessions
    gc.collect()
    padded = sum(ids.size for ids, _, _ in batches)
    costs = {
        name: ForwardCost(len(texts), len(batches), tokenized.tokens, padded, *min(runs[name]), *setups[name])
        for name in setups
    }
    return vectors, costs


# -- rerank and sparse: Rerank's and SparseEmbed's ceilings -----------------------------------------


class PairOrTextModel(InProcessModel):
    """A cross-encoder (query/document pairs -> one logit) or a SPLADE model (texts -> positive
    terms), as the server's batch runner drives them."""

    def tokenize(self, workload: Workload) -> Tokenized:
        """Pairs (query, document) per request for a cross-encoder, plain texts otherwise."""
        if self.config.kind != "rerank":
            return self.tokenizer.encode(workload.texts)
        parts = [self.tokenizer.encode_pairs(q, g) for q, g in zip(workload.queries, workload.groups, strict=True)]
        starts = np.cumsum([0] + [len(p.lengths) for p in parts])
        return Tokenized(
            encoded=[e for p in parts for e in p.encoded],
            lengths=[n for p in parts for n in p.lengths],
            truncated=[int(start) + i for p, start in zip(parts, starts, strict=False) for i in p.truncated],
        )

    def finish(self, output: FloatArray, mask: IntArray) -> list[Any]:
        """One result per row of a forward pass, as the server's batch runner makes them: the
        logit of a pair, or the positive terms of a SPLADE vector."""
        expected = (output.shape[0], 1 if self.config.kind == "rerank" else self.config.vocab_size)
        if output.shape != expected:
            raise RuntimeError(
                f"OnnxBackend.forward returned shape {output.shape} for a {self.config.kind} model; "
                f"expected {expected} ({'one logit' if self.config.kind == 'rerank' else 'SPLADE weights'} a row)"
            )
        results = self.spec.outputs(output, mask, self.config)
        return [(r.indices, r.values) if isinstance(r, SparseVector) else r for r in results]

    def run_workload(self, workload: Workload, runner: Runner) -> tuple[list[Any], InProcessRun]:
        """The whole workload once; results in input order."""
        return self.run(lambda: self.tokenize(workload), self.finish, runner.batch_size, runner.window)


def measure_rerank_sparse(cross_encoder: Path, workload: Workload, runner: Runner) -> RerankSparsePass[InProcessRun]:
    """Loads each model, runs the workload once untimed (WARM_UP in bench.rerank_sparse), then
    once timed, then frees its session so its threads and memory are gone before the next phase."""
    outputs: dict[str, tuple[list[Any], InProcessRun]] = {}
    for name, path in (("rerank", cross_encoder), ("sparse", resolve_model_path(DEFAULT_SPARSE_MODEL))):
        model = PairOrTextModel(path, "fp32", runner)
        if model.config.kind != name:
            raise RuntimeError(f"{path} loads as a {model.config.kind} model, expected {name}")
        model.run_workload(workload, runner)  # WARM_UP
        outputs[name] = model.run_workload(workload, runner)
        del model
        gc.collect()
    scores, rerank = outputs["rerank"]
    terms, sparse = outputs["sparse"]
    return RerankSparsePass(rerank, sparse, np.asarray(scores, dtype=np.float32), terms)


def sparse_vocab_size() -> int:
    """Terms in the default sparse model's vocabulary."""
    return load_model_config(resolve_model_path(DEFAULT_SPARSE_MODEL)).vocab_size


def build_cross_encoder(cache_dir: Path) -> Path:
    """Returns a one-label BertForSequenceClassification with MiniLM-L6's encoder and a seeded random
    head (the shape of cross-encoder/ms-marco-MiniLM-L-6-v2), building it the first time."""
    target = cache_dir / CROSS_ENCODER_FOLDER
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import BertForSequenceClassification

    source = bundled_path(DEFAULT_DENSE_MODEL)
    if source is None:
        raise RuntimeError(f"the bundled {DEFAULT_DENSE_MODEL} is not installed; the cross-encoder is built from it")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    try:
        torch.manual_seed(0)
        model, info = BertForSequenceClassification.from_pretrained(str(source), num_labels=1, output_loading_info=True)
        fresh = sorted(info["missing_keys"])
        if fresh != ["classifier.bias", "classifier.weight"]:
            raise RuntimeError(f"expected only the classifier head to be new, but these are: {fresh}")
        model.eval().save_pretrained(str(work))
        copy_tokenizer(work)
        os.replace(work, target)  # atomic: a half-built folder is never seen
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# -- ONNX Runtime settings ----------------------------------------------------------------------


def dense_model_files(dtypes: Sequence[str], cache_dir: Path) -> dict[str, Path]:
    """The default dense model exported for each dtype, as the server would load it."""
    config = load_model_config(resolve_model_path(DEFAULT_DENSE_MODEL))
    return {dtype: export_model(config, DENSE.graph, dtype, cache_dir) for dtype in dtypes}


def sorted_batches(texts: list[str], batch_size: int) -> list[tuple[IntArray, IntArray, IntArray]]:
    """`texts` tokenized by the default dense model's tokenizer, sorted by length and collated
    into (input_ids, attention_mask, token_type_ids) batches of `batch_size`."""
    path = resolve_model_path(DEFAULT_DENSE_MODEL)
    tokenizer = TextTokenizer(path, load_model_config(path).max_input_tokens)
    encodings = tokenizer.encode(texts).encoded
    encodings.sort(key=len)
    return [tokenizer.collate(encodings[i : i + batch_size]) for i in range(0, len(encodings), batch_size)]


OrtSetting = tuple[int, str, str]  # intra-op threads, graph optimization level (of LEVELS), dtype
LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def cpu_session(model_file: Path, threads: int, spinning: bool, level: str = "all") -> ort.InferenceSession:
    """A CPU session built as the server builds one (one inter-op thread), with these intra-op
    threads, pool spinning or not (the server's does not) and graph optimization level (of LEVELS)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def ort_session(model_file: Path, setting: OrtSetting) -> ort.InferenceSession:
    """A CPU session with these settings, as the server would build it."""
    threads, level, _ = setting
    return cpu_session(model_file, threads, False, level)


def measure_ort_settings(
    settings: Sequence[OrtSetting], texts: list[str], batch_size: int, repeats: int, cache_dir: Path
) -> dict[OrtSetting, float]:
    """Median texts/s of each setting over `repeats` passes of `texts` in length-sorted batches."""
    model_files = dense_model_files(sorted({dtype for _, _, dtype in settings}), cache_dir)
    batches = sorted_batches(texts, batch_size)
    sessions = {setting: ort_session(model_files[setting[2]], setting) for setting in settings}
    rates: dict[OrtSetting, list[float]] = {setting: [] for setting in settings}
    # Interleave settings across repeats so drift on a shared machine hits them all alike.
    for _ in range(repeats):
        for setting, session in sessions.items():
            started = time.perf_counter()
            for ids, mask, types in batches:
                session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
            rates[setting].append(len(texts) / (time.perf_counter() - started))
    return {setting: float(np.median(values)) for setting, values in rates.items()}


# -- (e) the wire form -------------------------------------------------------------------------


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


WIRE_DECODERS: dict[int, Callable[[pb.EmbedResponse], FloatArray]] = {
    pb.VECTOR_ENCODING_FLOAT: lambda r: np.array([e.values for e in r.embeddings], dtype=np.float32),
    pb.VECTOR_ENCODING_FLOAT32_LE: decode,
}


def measure_wire(count: int, dimension: int, seed: int, repeats: int) -> dict[str, WireForm]:
    """Builds responses with the server's own converter, then serializes, parses and decodes
    them the way a numpy client would, for packed floats and for float32_le bytes."""
    rng = np.random.default_rng(seed)
    vectors = normalize(rng.standard_normal((count, dimension), dtype=np.float32))
    result = EmbedResult(
        model="bench",
        usage=Usage(prompt_tokens=0, truncated_inputs=0),
        timing=Timing(0.0, 0.0, 0.0, 0.0),
        vectors=vectors,
    )
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
            decoded = WIRE_DECODERS[encoding](parsed)
            t4 = time.perf_counter()
            if not np.array_equal(decoded, vectors):
                raise AssertionError(f"{name}: decoded vectors differ from the originals")
            size = len(data)
            for key, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                steps[key].append(seconds * 1e3)
        median = {key: statistics.median(values) for key, values in steps.items()}
        forms[name] = WireForm(median["build"], median["serialize"], median["parse"], median["decode"], size)
    return forms
