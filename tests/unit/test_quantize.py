"""quantize_per_token (DTYPES=int8) on small graphs: any input rank, outlier channels, exclusions;
and the recipe the CPU picks, in the export key."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import embedserve.backends.onnx as onnx_backend
from embedserve.backends.config import load_model_config
from embedserve.backends.quantize import VALUE_PROJECTIONS, PerToken, int8_recipe, quantize_per_token
from embedserve.engine.kinds import DENSE
from embedserve.models import resolve_model_path
from embedserve.settings import DEFAULT_DENSE_MODEL

K, N = 32, 8


def linear(path: Path, rank: int, opset: int = 18, seed: int = 0) -> np.ndarray:
    """Writes y = x.W + b with x of `rank` axes (the last K), in `opset`, and returns W."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(K, N)).astype(np.float32)
    b = rng.normal(size=N).astype(np.float32)
    dims: list[str | int] = [f"d{i}" for i in range(rank - 1)]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"], name="/dense/MatMul"),
            helper.make_node("Add", ["b", "xw"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*dims, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, N])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9), str(path))
    return w


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_inputs_of_two_and_three_axes_keep_their_leading_axes(tmp_path: Path) -> None:
    """In opset 17 (ReduceMax's axes an attribute) and 18 (an input) alike."""
    rng = np.random.default_rng(1)
    for x, opset in ((rng.normal(size=(5, K)), 17), (rng.normal(size=(2, 3, K)), 18)):
        source, target = tmp_path / f"fp32-{x.ndim}.onnx", tmp_path / f"int8-{x.ndim}.onnx"
        linear(source, x.ndim, opset)
        quantize_per_token(source, target, [], PerToken(outliers=0))
        ops = [n.op_type for n in onnx.load(str(target)).graph.node]
        assert "MatMulIntegerToFloat" in ops and "MatMul" not in ops
        want, got = run(source, x.astype(np.float32)), run(target, x.astype(np.float32))
        assert got.shape == want.shape == (*x.shape[:-1], N)
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_outlier_channels_are_multiplied_in_fp32(tmp_path: Path) -> None:
    """One channel 100x the others sets every row's int8 scale unless it is kept out of the GEMM."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6, K)).astype(np.float32)
    x[..., 3] *= 100
    source = tmp_path / "fp32.onnx"
    linear(source, 3)
    errors = {}
    for outliers in (0, 1):
        target = tmp_path / f"int8-{outliers}.onnx"
        quantize_per_token(source, target, [{"x": x[:1]}], PerToken(outliers=outliers))  # type: ignore[dict-item]
        rest = x.copy()
        rest[..., 3] = 0  # what the int8 product sees without the outlier
        errors[outliers] = np.abs(run(target, x) - run(source, x)).max() / np.abs(run(source, rest)).max()
    assert errors[1] < 0.02 < errors[0]


def test_excluded_matmuls_stay_fp32(tmp_path: Path) -> None:
    source, target = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    linear(source, 3)
    quantize_per_token(source, target, [], PerToken(outliers=0, exclude=r"/dense/"))
    ops = [n.op_type for n in onnx.load(str(target)).graph.node]
    assert ops == ["MatMul", "Add"]


def test_the_value_projection_pattern_picks_value_projections_only() -> None:
    values = ["/encoder/layer.3/attention/self/value/MatMul", "/layers.0/self_attn/v_proj/MatMul", "/attn/v/MatMul"]
    others = ["/encoder/layer.3/attention/self/query/MatMul", "/encoder/layer.3/output/dense/MatMul", "/value/Add"]
    assert [bool(re.search(VALUE_PROJECTIONS, n)) for n in values + others] == [True] * 3 + [False] * 3


def test_the_int8_export_key_names_the_recipe_the_cpu_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    """An int8 export made for a CPU with VNNI is never served on one without (its recipe
    saturates there), nor the other way; fp32's key does not depend on the CPU."""
    assert int8_recipe(True) != int8_recipe(False)
    config = load_model_config(resolve_model_path(DEFAULT_DENSE_MODEL))
    keys = {}
    for vnni in (True, False):
        monkeypatch.setattr(onnx_backend, "cpu_has_vnni", lambda vnni=vnni: vnni)
        keys[vnni] = [onnx_backend.export_key(config, DENSE.graph, d) for d in ("int8", "fp32", "int8-fast")]
    assert keys[True][0] != keys[False][0]
    assert keys[True][1:] == keys[False][1:]


def test_a_product_read_by_more_than_its_bias_add_is_still_made(tmp_path: Path) -> None:
    """The bias Add folds into the int8 graph only where it is the product's one consumer."""
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(K, N)).astype(np.float32), rng.normal(size=N).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"], name="/dense/MatMul"),
            helper.make_node("Add", ["xw", "b"], ["y"]),
            helper.make_node("Relu", ["xw"], ["z"]),
        ],
        "two_consumers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", N]) for o in ("y", "z")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    source, target = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(source))
    quantize_per_token(source, target, [], PerToken(outliers=0))
    x = rng.normal(size=(6, K)).astype(np.float32)
    want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for expected, actual in zip(want, got, strict=True):
        assert np.abs(actual - expected).max() < 0.05 * np.abs(expected).max()
