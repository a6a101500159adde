"""int8 for ONNX Runtime on CPU: the two recipes `DTYPES` names, rewritten from the fp32 export.

`int8` (quantize_per_token): the weight MatMuls x.W run as int8 GEMMs on x quantized per row
(each token its own scale) and W per output column. On a CPU with VNNI the value projections stay
fp32 (WITH_VNNI); without it, every MatMul is int8 but the 2 input channels per MatMul input with
the largest peaks on the shipped calibration sentences (BERT's known outlier channels) are
multiplied in fp32 (WITHOUT_VNNI). On all-MiniLM-L6-v2 each keeps every vector of the bench's
corpus and hard cases within cosine 0.99 of fp32 (mean >= 0.995) on the CPU it is chosen for.
`int8-fast` (quantize_dynamic_int8): ONNX Runtime's quantize_dynamic, one activation scale per
batch: faster, and lossier (min cosine 0.95-0.98, short and non-Latin inputs worst). Every variant
tried and its figures: bench/int8.py, docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedserve.backends.base import FloatArray, IntArray

if TYPE_CHECKING:
    import onnx
    from tokenizers import Tokenizer

# Hand-written sentences in 23 languages, emoji, queries, code and numbers; never the texts the
# bench evaluates on.
CALIBRATION_FILE = Path(__file__).with_name("int8_calibration.txt")


@dataclass(frozen=True)
class PerToken:
    """How quantize_per_token rewrites the weight MatMuls.

    outliers: input channels per MatMul input, those with the largest calibration peaks, kept out
        of the int8 product and multiplied in fp32.
    outlier_pattern: if set, only the inputs of MatMuls whose names match it keep outliers.
    exclude: MatMuls whose names match it stay fp32 (none if empty).
    unsigned_weights: U8 weights with zero point 128 (ONNX Runtime's U8U8 GEMM: no int16
        saturation on CPUs without VNNI, and slower).
    weight_max: weights per output column in +-weight_max (127: 8 bits).
    """

    outliers: int = 2
    outlier_pattern: str = ""
    exclude: str = ""
    unsigned_weights: bool = False
    weight_max: int = 127


# Value projections in the exports of BERT, XLM-R, DistilBERT, MPNet and decoder-style models.
VALUE_PROJECTIONS = r"/(value|v_lin|v_proj|v)/MatMul$"
# DTYPES=int8 on a CPU whose int8 dot product sums in int32 (VNNI): per-token activations, the
# value projections in fp32 (half of the per-token error on MiniLM came from them; keeping them
# costs 7-16% of the speed, outlier channels 20-30%: bench.int8).
WITH_VNNI = PerToken(outliers=0, exclude=VALUE_PROJECTIONS)
# Without VNNI (AVX2: vpmaddubsw sums pairs of u8 x s8 products in int16, which saturates with
# 8-bit weights) per-token int8 lost more (tok-sym's min cosine 0.977 on AVX2, 0.986 with VNNI;
# the value-projection recipe was not measured there); 2 outlier channels per input in fp32 kept
# 0.994 on AVX2.
WITHOUT_VNNI = PerToken(outliers=2)


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has AVX512-VNNI or AVX-VNNI, as Linux reports (/proc/cpuinfo); False
    where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_vnni" in flags or "avx_vnni" in flags


def int8_recipe(vnni: bool) -> tuple[str, PerToken]:
    """DTYPES=int8's recipe for a CPU with or without VNNI, and its name (in the export key)."""
    return ("per-token, value projections fp32", WITH_VNNI) if vnni else ("per-token, 2 outlier channels", WITHOUT_VNNI)


def calibration_feeds(tokenizer: Tokenizer, max_tokens: int) -> list[dict[str, IntArray]]:
    """The calibration sentences, one feed each (padding would skew the ranges), cut at
    `max_tokens`."""
    cutting = copy.deepcopy(tokenizer)
    cutting.no_padding()
    cutting.enable_truncation(max_length=max_tokens)
    feeds = []
    for line in CALIBRATION_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            encoded = cutting.encode(line)
            feeds.append(
                {
                    "input_ids": np.array([encoded.ids], np.int64),
                    "attention_mask": np.array([encoded.attention_mask], np.int64),
                    "token_type_ids": np.array([encoded.type_ids], np.int64),
                }
            )
    return feeds


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMul nodes whose second input is a constant (the weights a recipe may quantize)."""
    weights = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def weight_inputs(model: onnx.ModelProto, skip: Callable[[str], bool] = lambda _: False) -> dict[str, list[str]]:
    """MatMul input -> the names of the weight MatMuls that read it (query/key/value share one),
    leaving out those `skip` picks by name."""
    groups: dict[str, list[str]] = {}
    for node in weight_matmuls(model):
        if not skip(node.name):
            groups.setdefault(node.input[0], []).append(node.name)
    return groups


def channel_peaks(
    model_file: Path, tensors: Sequence[str], feeds: Sequence[dict[str, IntArray]]
) -> dict[str, FloatArray]:
    """The largest |value| of each channel (last axis) of `tensors` over `feeds`."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_file))
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors if t not in known
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    peaks: dict[str, FloatArray] = {}
    for feed in feeds:
        values = session.run(list(tensors), {k: v for k, v in feed.items() if k in inputs})
        for name, value in zip(tensors, values, strict=True):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            peaks[name] = np.maximum(peaks[name], peak) if name in peaks else peak
    return peaks


def bias_adds(graph: onnx.GraphProto) -> dict[str, tuple[onnx.NodeProto, str]]:
    """MatMul output -> (its bias Add, the bias initializer), where that Add is the output's one
    consumer (so a rewrite may fold the Add into what makes the product)."""
    weights = {i.name: i for i in graph.initializer}
    consumers = Counter(name for node in graph.node for name in node.input)
    biases: dict[str, tuple[onnx.NodeProto, str]] = {}
    for node in graph.node:
        if node.op_type == "Add":
            for i, j in ((0, 1), (1, 0)):
                if node.input[i] in weights and len(weights[node.input[i]].dims) == 1 and consumers[node.input[j]] == 1:
                    biases[node.input[j]] = (node, node.input[i])
    return biases


def split_outliers(
    x: str, prefix: str, kept: IntArray, k_dim: int, axis: int
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """Initializers and nodes making {prefix}/rest (x with the `kept` channels zeroed) and
    {prefix}/outliers (those channels alone, gathered on `axis`)."""
    from onnx import helper, numpy_helper

    mask = np.ones(k_dim, np.float32)
    mask[kept] = 0
    tensors = [numpy_helper.from_array(mask, f"{prefix}/mask"), numpy_helper.from_array(kept, f"{prefix}/kept")]
    nodes = [
        helper.make_node("Mul", [x, f"{prefix}/mask"], [f"{prefix}/rest"]),
        helper.make_node("Gather", [x, f"{prefix}/kept"], [f"{prefix}/outliers"], axis=axis),
    ]
    return tensors, nodes


def per_column(
    w: FloatArray, kept: IntArray, weight_max: int = 127, unsigned: bool = False
) -> tuple[np.ndarray[Any, Any], FloatArray]:
    """W with its `kept` rows zeroed, quantized symmetrically per output column to +-weight_max:
    the values (int8, or uint8 around 128 if `unsigned`) and the column scales."""
    rest = w.copy()
    rest[kept] = 0
    scale = (np.maximum(np.abs(rest).max(axis=0), 1e-12) / weight_max).astype(np.float32)
    values = np.clip(np.round(rest / scale), -weight_max, weight_max)
    return ((values + 128).astype(np.uint8) if unsigned else values.astype(np.int8)), scale


def save_rewrite(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], target: Path) -> None:
    """Gives the graph `nodes`, drops the initializers none of them reads, imports the
    com.microsoft domain where a node needs it, checks the model and saves it."""
    import onnx
    from onnx import helper

    graph = model.graph
    used = {i for n in nodes for i in n.input}
    initializers = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    del graph.node[:]
    graph.node.extend(nodes)
    needs_microsoft = any(n.domain == "com.microsoft" for n in nodes)
    if needs_microsoft and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def quantize_per_token(source: Path, target: Path, feeds: Sequence[dict[str, IntArray]], how: PerToken) -> None:
    """DTYPES=int8, with `how` from int8_recipe. Per MatMul input x, as [rows, K]: the row scale
    max|x| / 127 over the non-outlier channels (ReduceMax, ReduceMin), one per-axis QuantizeLinear
    to U8 around 128 (outlier channels saturate there; their weight rows are 0). Per MatMul: ONNX
    Runtime's MatMulIntegerToFloat (the U8S8 GEMM, column scales applied in its output stage), a
    Mul by the row scale, then the MatMul's bias, carried by the outlier channels' thin fp32 Gemm
    where there are outliers, else one Add (the bias Add after the MatMul goes). `feeds` calibrate
    which channels are outliers (none are read when `how.outliers` is 0)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    groups = weight_inputs(model, lambda name: bool(how.exclude) and re.search(how.exclude, name) is not None)
    quantized = {name for names in groups.values() for name in names}
    biases = bias_adds(graph)
    peaks = channel_peaks(source, list(groups), feeds) if how.outliers else {}
    constants: dict[str, np.ndarray[Any, Any]] = {
        "int8/last": np.array([-1], np.int64),
        "int8/zero": np.array([0], np.int64),
        "int8/eps": np.array(1e-8, np.float32),
        "int8/inv": np.array(1 / 127, np.float32),
        "int8/one": np.array(1.0, np.float32),
        "int8/zp": np.array(128, np.uint8),
    }
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    def reduce(op: str, x: str, out: str) -> onnx.NodeProto:
        """ReduceMax/ReduceMin over the last axis: an input from opset 18 on, an attribute before."""
        if opset >= 18:
            return helper.make_node(op, [x, "int8/last"], [out], keepdims=0)
        return helper.make_node(op, [x], [out], axes=[-1], keepdims=0)

    nodes: list[onnx.NodeProto] = []
    prefixes: dict[str, tuple[str, IntArray]] = {}  # MatMul input -> its tensors' prefix, its outlier channels
    folded: set[str] = set()  # bias Adds now made by the outlier Gemm or an Add of the row-scaled product
    for node in graph.node:
        if node.name in folded:
            continue
        if node.name not in quantized:
            nodes.append(node)
            continue
        x, w_name = node.input
        w = numpy_helper.to_array(weights[w_name]).astype(np.float32)
        k_dim, n_dim = w.shape
        if x not in prefixes:
            with_outliers = how.outliers and (
                not how.outlier_pattern or any(re.search(how.outlier_pattern, n) for n in groups[x])
            )
            kept = np.zeros(0, np.int64)
            if with_outliers:
                kept = np.argsort(peaks[x])[::-1][: how.outliers].astype(np.int64)
            q = f"/int8_{len(prefixes)}"
            prefixes[x] = (q, kept)
            graph.initializer.append(numpy_helper.from_array(np.array([-1, k_dim], np.int64), f"{q}/shape2d"))
            nodes += [
                helper.make_node("Reshape", [x, f"{q}/shape2d"], [f"{q}/x2"]),
                helper.make_node("Shape", [x], [f"{q}/shape"]),
                # Every axis but the last: a [batch, hidden] input (a pooler) as well as [batch, seq, hidden].
                helper.make_node("Slice", [f"{q}/shape", "int8/zero", "int8/last"], [f"{q}/lead"]),
            ]
            ranged = f"{q}/x2"
            if len(kept):
                tensors, split = split_outliers(f"{q}/x2", q, kept, k_dim, axis=1)
                graph.initializer.extend(tensors)
                nodes += split
                ranged = f"{q}/rest"
            nodes += [
                reduce("ReduceMax", ranged, f"{q}/max"),
                reduce("ReduceMin", ranged, f"{q}/min"),
                helper.make_node("Neg", [f"{q}/min"], [f"{q}/negmin"]),
                helper.make_node("Max", [f"{q}/max", f"{q}/negmin"], [f"{q}/amax"]),
                helper.make_node("Mul", [f"{q}/amax", "int8/inv"], [f"{q}/scale0"]),
                helper.make_node("Max", [f"{q}/scale0", "int8/eps"], [f"{q}/scale"]),
                helper.make_node("Shape", [f"{q}/scale"], [f"{q}/rows"]),
                helper.make_node(
                    "ConstantOfShape",
                    [f"{q}/rows"],
                    [f"{q}/zp"],
                    value=numpy_helper.from_array(np.array([128], np.uint8)),
                ),
                helper.make_node("QuantizeLinear", [f"{q}/x2", f"{q}/scale", f"{q}/zp"], [f"{q}/q"], axis=0),
                helper.make_node("Unsqueeze", [f"{q}/scale", "int8/last"], [f"{q}/scale_col"]),
            ]
        q, kept = prefixes[x]
        p = node.name.removesuffix("/MatMul") + "/int8"
        stored, w_scale = per_column(w, kept, how.weight_max, how.unsigned_weights)
        graph.initializer.extend(
            [
                numpy_helper.from_array(stored, f"{p}/w"),
                numpy_helper.from_array(w_scale, f"{p}/ws"),
                numpy_helper.from_array(np.array([n_dim], np.int64), f"{p}/n"),
            ]
        )
        gemm = [f"{q}/q", f"{p}/w", "int8/one", f"{p}/ws", "int8/zp", "int8/zp" if how.unsigned_weights else ""]
        nodes += [
            helper.make_node("MatMulIntegerToFloat", gemm, [f"{p}/y"], domain="com.microsoft"),
            helper.make_node("Mul", [f"{p}/y", f"{q}/scale_col"], [f"{p}/scaled"]),
        ]
        bias = biases.get(node.output[0])
        result = node.output[0]
        if bias is not None:  # the Add's output is now made here
            folded.add(bias[0].name)
            result = bias[0].output[0]
        flat = f"{p}/scaled"
        if len(kept) or bias is not None:
            flat, extra = f"{p}/out2", f"{p}/extra"
            if len(kept):
                graph.initializer.append(numpy_helper.from_array(w[kept], f"{p}/w_outliers"))
                nodes.append(
                    helper.make_node(
                        "Gemm", [f"{q}/outliers", f"{p}/w_outliers", *([bias[1]] if bias else [])], [extra]
                    )
                )
            elif bias is not None:
                extra = bias[1]
            nodes.append(helper.make_node("Add", [f"{p}/scaled", extra], [flat]))
        nodes += [
            helper.make_node("Concat", [f"{q}/lead", f"{p}/n"], [f"{p}/shape"], axis=0),
            helper.make_node("Reshape", [flat, f"{p}/shape"], [result]),
        ]
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    save_rewrite(model, nodes, target)


def quantize_dynamic_int8(source: Path, target: Path, nodes_to_exclude: Sequence[str] = (), **options: Any) -> None:
    """DTYPES=int8-fast: ONNX Runtime's quantize_dynamic, per-channel int8 weights on MatMuls only
    (the per-tensor default, embeddings included, gave cosine 0.74 on long inputs), one U8
    activation scale per batch. `nodes_to_exclude` and `options` (quantize_dynamic's) are for
    bench.int8, which measures variants of it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=list(nodes_to_exclude) or None,
        **options,
    )
