"""ONNX Runtime backend: exports a model once with optimum, caches the export, runs it.

Exporter: optimum's (package optimum-onnx). torch.onnx.export (TorchScript path, torch
2.13, transformers 4.57) produced vectors off by ~0.2 from the torch model for BERT; optimum's
model patches give 3e-6, so it is the exporter. Dense pooling stays outside the graph, in numpy
(`pooling.py`), so both backends share one pooling implementation. A SPLADE export is cut in two
(`splade.py`): the encoder, and a head (vocabulary projection and pooling) run in chunks of
tokens, so that a batch's full masked-LM logits never exist at once.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from embedserve.backends import splade
from embedserve.backends.base import Backend, BackendInfo, FloatArray, GraphSpec, IntArray
from embedserve.backends.config import ModelConfig, load_fast_tokenizer
from embedserve.backends.quantize import (
    calibration_feeds,
    cpu_has_vnni,
    int8_recipe,
    quantize_dynamic_int8,
    quantize_per_token,
)
from embedserve.errors import ConfigError

log = logging.getLogger(__name__)

# Files that decide what the exported graph computes.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".pt")
# Padded tokens (batch x longest) from which a forward pass on CPU shrinks ONNX Runtime's arena
# when it ends. Measured on 2 cores with two 32 x 512 SparseEmbed at once: without shrinking,
# peak 996 MB and 996 MB held after; shrinking every batch, 848 MB and 528 MB after, but each
# 32 x 512 request took 2.6-2.9 s instead of 1.9-2.1 s (the arena's pages are faulted in again).
# Disabling the arena held 967 MB after (glibc kept it). Batches of short texts (32 x 64 tokens
# and under), the bulk of embedding traffic, keep their arena and pay nothing.
SHRINK_AFTER_TOKENS = 4096
# bump when the way we export or post-process changes (5: int8 became the per-token recipe, the
# old one int8-fast)
_EXPORT_FORMAT = 5


def cuda_device_count() -> int:
    """CUDA devices the driver sees (0 without a driver): asked of libcuda directly, because
    onnxruntime-gpu lists its CUDA provider on machines that have no GPU at all."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_available() -> bool:
    """True when onnxruntime has its CUDA provider and a CUDA device is there to run it."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count() > 0


def resolve_dtype(requested: str, on_cuda: bool) -> str:
    """Turns "auto" into fp16 on CUDA and fp32 on CPU; refuses fp16 on CPU."""
    if requested == "auto":
        return "fp16" if on_cuda else "fp32"
    if requested == "fp16" and not on_cuda:
        raise ConfigError(
            "dtype fp16 needs the CUDA execution provider (onnxruntime-gpu and a GPU); "
            "use fp32, int8 or int8-fast on CPU"
        )
    return requested


def export_key(config: ModelConfig, graph: GraphSpec, dtype: str) -> str:
    """Hashes the model's files and export settings: same key, same graph. Not the exporter's
    version (optimum-onnx, torch): a serving process without them (the image's lean runtime)
    must find the exports made where they were installed; a change in how we export bumps
    _EXPORT_FORMAT instead."""
    digest = hashlib.sha256()
    for file in sorted(config.path.rglob("*")):
        if file.is_file() and file.suffix in _WEIGHT_SUFFIXES and "onnx" not in file.parts:
            digest.update(str(file.relative_to(config.path)).encode())
            with file.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    settings = {
        "task": graph.onnx_task,
        "dtype": dtype,
        # int8's recipe depends on the CPU (quantize.int8_recipe): an export made on a CPU with
        # VNNI is not served on one without, nor the other way.
        "int8": int8_recipe(cpu_has_vnni())[0] if dtype == "int8" else None,
        "format": _EXPORT_FORMAT,
        "onnxruntime": version("onnxruntime") if _has_dist("onnxruntime") else version("onnxruntime-gpu"),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def _has_dist(name: str) -> bool:
    try:
        version(name)
    except Exception:
        return False
    return True


class _Heartbeat:
    """Logs every few seconds while a long step runs, so a person sees it is alive."""

    def __init__(self, what: str, every_s: float = 5.0) -> None:
        self._what = what
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            log.info("%s ... %.0f s", self._what, time.monotonic() - self._start)

    def __enter__(self) -> _Heartbeat:
        log.info("%s (one-time; the result is cached)", self._what)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def export_model(config: ModelConfig, graph: GraphSpec, dtype: str, cache_dir: Path) -> Path:
    """Returns the cached ONNX file for this model and dtype, exporting it first if needed."""
    target = cache_dir / "onnx" / export_key(config, graph, dtype)
    model_file = target / "model.onnx"
    if model_file.is_file():
        log.info("using cached ONNX export %s", model_file)
        return model_file
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as missing:
        raise ConfigError(
            f"{config.path.name} has no cached ONNX export for {dtype} in {cache_dir / 'onnx'}, and exporting "
            "one needs optimum-onnx and torch, which this environment lacks (the image's lean `runtime` target "
            "serves only the exports baked in at build time): use the image's `full` target, or install "
            "embedserve with its dependencies; or start once where they are installed with the same "
            "EMBEDSERVE_CACHE_DIR (same embedserve and onnxruntime), which then holds the export"
        ) from missing
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="export-", dir=cache_dir))
    try:
        with _Heartbeat(f"exporting {config.path.name} to ONNX ({dtype})"):
            main_export(
                str(config.path),
                output=work / "fp32",
                task=graph.onnx_task,
                device="cpu",
                library_name="transformers",
            )
            exported = work / "fp32" / "model.onnx"
            final = work / "out" / "model.onnx"
            final.parent.mkdir()
            if graph.splade:  # the head stays float32 whatever the encoder's dtype
                _split_splade(exported, final.parent / splade.HEAD_FILE)
            if dtype == "int8":
                vnni = cpu_has_vnni()
                name, recipe = int8_recipe(vnni)
                log.info("int8 for a CPU %s VNNI: %s", "with" if vnni else "without", name)
                feeds = []
                if recipe.outliers:  # calibration picks the outlier channels; nothing else reads it
                    feeds = calibration_feeds(load_fast_tokenizer(config.path)[0], config.max_input_tokens)
                quantize_per_token(exported, final, feeds, recipe)
            elif dtype == "int8-fast":
                quantize_dynamic_int8(exported, final)
            elif dtype == "fp16":
                import onnx
                from onnxruntime.transformers.float16 import convert_float_to_float16

                fp32_model = onnx.load(str(exported))
                onnx.save(convert_float_to_float16(fp32_model, keep_io_types=True), str(final))
            else:
                shutil.move(str(exported), str(final))
                for extra in (work / "fp32").glob("*.onnx_data"):
                    shutil.move(str(extra), str(final.parent / extra.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(final.parent, target)  # atomic: a half-written export is never seen
        except OSError:
            if not model_file.is_file():  # another process won the race, fine; else re-raise
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return model_file


def _split_splade(model_file: Path, head_file: Path) -> None:
    """Cuts a fill-mask export's vocabulary projection off, in place, before any quantization or
    fp16, and writes it, with the SPLADE pooling, as the head graph `head_file`."""
    import onnx

    # The encoder's weights in external data files stay where they are; only the graph is rewritten.
    model = onnx.load(str(model_file), load_external_data=False)
    head = splade.split_head(model, str(model_file.parent))
    onnx.save(model, str(model_file))
    onnx.save(head, str(head_file))


class OnnxBackend(Backend):
    """Runs an exported graph on the CUDA execution provider when present, else on CPU."""

    def __init__(
        self, config: ModelConfig, graph: GraphSpec, dtype: str, cache_dir: Path, intra_op_threads: int = 0
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # CUDA first when there is a device; ORT itself drops to CPU when the CUDA libraries it
        # was built for are missing (it logs which), and then the CPU's dtype is the right one.
        for on_cuda in (True, False) if cuda_available() else (False,):
            resolved = resolve_dtype(dtype, on_cuda)
            model_file = export_model(config, graph, resolved, cache_dir)
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_cuda else ["CPUExecutionProvider"]
            # On CPU the pool threads sleep between parallel sections instead of spinning: spinning
            # took 60-115 CPU ms per 1,000 short texts from the other forward workers, the
            # tokenizer and the event loop on 2 cores (docs/benchmarks.md).
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if on_cuda else "0")
            self._session = ort.InferenceSession(str(model_file), options, providers=providers)
            if self._session.get_providers()[0] == providers[0]:
                break
            log.warning("the CUDA execution provider did not start for %s (onnxruntime says why above)", config.path)
        dtype = resolved
        self._inputs = {i.name for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        # A SPLADE encoder's output is the head's input (splade.split_head).
        self._output = splade.HIDDEN if graph.splade else graph.onnx_output or outputs[0]
        head_file = model_file.parent / splade.HEAD_FILE
        providers = self._session.get_providers()
        self._head = ort.InferenceSession(str(head_file), options, providers=providers) if graph.splade else None
        self._chunk_tokens = splade.CHUNK_TOKENS_CUDA if on_cuda else splade.CHUNK_TOKENS_CPU
        self._shrink: ort.RunOptions | None = None
        if not on_cuda:  # a GPU keeps its memory pool, as every GPU server does
            self._shrink = ort.RunOptions()
            self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._vocab = int(self._head.get_outputs()[0].shape[1]) if self._head is not None else 0
        if self._output not in outputs:
            raise RuntimeError(f"{model_file} has no output {self._output!r} for a {config.kind} model: {outputs}")
        # Measured on 2 CPU cores: ~5 ms per session.run beyond its tokens, ~16-32 tokens of
        # MiniLM work; on a GPU a launch costs far more than a few tokens.
        overhead = 512 if on_cuda else 24
        self.info = BackendInfo(
            name="onnx",
            provider=self._session.get_providers()[0],
            dtype=dtype,
            batch_overhead_tokens=overhead,
            artifact=str(model_file.parent),
        )

    def forward(self, input_ids: IntArray, attention_mask: IntArray, token_type_ids: IntArray) -> FloatArray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        # A large batch hands its arena memory back when it ends: without it, ONNX Runtime's
        # arena kept the peak of the largest batch ever run for good.
        shrink = self._shrink if input_ids.size >= SHRINK_AFTER_TOKENS else None
        out = self._session.run([self._output], {k: v for k, v in feeds.items() if k in self._inputs}, shrink)[0]
        if self._head is not None:
            return self._splade(np.asarray(out, dtype=np.float32), attention_mask)
        return np.asarray(out, dtype=np.float32)

    def _splade(self, hidden: FloatArray, attention_mask: IntArray) -> FloatArray:
        """SPLADE weights from the encoder's output, the head run on chunks of tokens."""
        assert self._head is not None
        weights: FloatArray = np.zeros((hidden.shape[0], self._vocab), dtype=np.float32)
        for rows, tokens in splade.chunks(attention_mask, self._chunk_tokens):
            feeds = {
                splade.HIDDEN: np.ascontiguousarray(hidden[rows, tokens]),
                "attention_mask": np.ascontiguousarray(attention_mask[rows, tokens]),
            }
            np.maximum(weights[rows], self._head.run([splade.OUTPUT], feeds)[0], out=weights[rows])
        return weights
