"""Accurate int8 (issue 12): each int8 recipe built from the default dense model's fp32 export,
its throughput in process against fp32 (the server's threads, the same length-sorted batches,
rounds alternating the order), and its cosine to fp32 on a seeded corpus and on hard cases
(non-Latin scripts, emoji, 1-3 words, inputs cut at the model's max tokens), none of them in
the calibration file that the static, smoothed and outlier-channel recipes use
(server/embedserve/backends/int8_calibration.txt, the one `DTYPES=int8` calibrates on). The nbits8
recipes need onnx-ir (a dev dependency).

Usage: flock /tmp/embedserve-bench.lock .venv/bin/python -m bench.int8 [--texts 512] [--accuracy-texts 1000]

It imports embedserve's tokenizer and pooling directly, as bench.inprocess does:
a variant is an ONNX file, not a dtype the server's backend can load. Built variants are kept under
--cache-dir/bench-models/int8/ (named after the fp32 export and RECIPES_VERSION).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnxruntime as ort

from bench.harness import FloatArray, make_corpus, print_summary, step
from bench.inprocess import DEFAULT_DENSE_MODEL, cpu_session, dense_model_files, server_defaults, server_forward_setup
from bench.report import table
from embedserve.backends.base import IntArray
from embedserve.backends.config import load_fast_tokenizer, load_model_config
from embedserve.backends.quantize import (
    CALIBRATION_FILE,
    WITH_VNNI,
    WITHOUT_VNNI,
    bias_adds,
    calibration_feeds,
    channel_peaks,
    per_column,
    quantize_dynamic_int8,
    quantize_per_token,
    save_rewrite,
    split_outliers,
    weight_inputs,
    weight_matmuls,
)
from embedserve.backends.quantize import PerToken as Fused
from embedserve.engine.kinds import DENSE
from embedserve.engine.pooling import normalize
from embedserve.engine.tokenizer import TextTokenizer
from embedserve.models import resolve_model_path

RECIPES_VERSION = 3  # bump when a recipe changes, so that its cached file is rebuilt
TARGET_MIN, TARGET_MEAN, TARGET_SPEED = 0.99, 0.995, 1.8
Batch = tuple[IntArray, IntArray, IntArray]

# -- hard cases ----------------------------------------------------------------------------------

# Words of four scripts the calibration file also holds, but never these texts. Cyrillic letters
# that look Latin are the point here, hence the noqa.
SCRIPTS = {
    "chinese": "我们 今天 天气 城市 学校 老师 学生 音乐 电影 工作 时间 问题 世界 国家 公司 朋友 家庭 手机 电脑 "
    "网络 数据 模型 服务器 搜索 文件 语言 历史 科学 经济 市场 新闻 河流 山 水 火车 飞机 早上 晚上 吃饭 "
    "喜欢 非常 很 的 了 在 是 有 和 不 这个 那个 什么 为什么 怎么",
    "arabic": "مرحبا اليوم الطقس المدينة المدرسة المعلم الطالب الموسيقى العمل الوقت السؤال العالم البلد الشركة صديق "
    "العائلة الهاتف الحاسوب الشبكة البيانات البحث اللغة التاريخ العلم الاقتصاد السوق الأخبار النهر الجبل الماء القطار "
    "الصباح المساء جميل كبير صغير جديد في من على مع هذا هذه كان يكون لا نعم",
    "hindi": "नमस्ते आज मौसम शहर स्कूल शिक्षक छात्र संगीत फिल्म काम समय सवाल दुनिया देश कंपनी दोस्त परिवार फोन कंप्यूटर "
    "नेटवर्क डेटा खोज भाषा इतिहास विज्ञान बाजार खबर नदी पहाड़ पानी ट्रेन सुबह शाम अच्छा बड़ा छोटा नया में से पर और है था "
    "नहीं यह वह का की के",
    "russian": "привет сегодня погода город школа учитель студент музыка фильм работа время вопрос мир страна "
    "компания друг семья телефон компьютер сеть данные поиск язык история наука экономика рынок новости "
    "река гора вода поезд утро вечер хороший большой маленький новый в на с и не это был очень потому что",  # noqa: RUF001
}
EMOJI = "😀 😂 ❤️ 👍 🎉 🔥 🚀 🌍 🍕 🐱 😢 🤔 ✅ ⚠️ 🙏 💡 📈 🎵 ☕ 🌧️ 👨‍👩‍👧 🏳️‍🌈 🇯🇵 🥳 😴".split()


def script_texts(words: Sequence[str], count: int, rng: random.Random, joiner: str) -> list[str]:
    """Sentences of 3-40 words drawn from `words`."""
    return [joiner.join(rng.choice(words) for _ in range(rng.randint(3, 40))) for _ in range(count)]


def emoji_texts(count: int, rng: random.Random) -> list[str]:
    """Corpus-style sentences with emoji mixed in, and strings of emoji alone, half and half."""
    texts = []
    for i, text in enumerate(make_corpus(count, rng.randrange(1 << 30), 3, 30)):
        if i % 2:
            texts.append("".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 8))))
        else:
            words = text.split()
            for _ in range(rng.randint(1, 5)):
                words.insert(rng.randrange(len(words) + 1), rng.choice(EMOJI))
            texts.append(" ".join(words))
    return texts


def short_texts(count: int, rng: random.Random) -> list[str]:
    """1-3 words, from the corpus' words and the scripts'."""
    pools = [make_corpus(1, rng.randrange(1 << 30), 40, 40)[0].split()] + [s.split() for s in SCRIPTS.values()]
    return [" ".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 3))) for _ in range(count)]


def hard_cases(count: int, seed: int) -> dict[str, list[str]]:
    """`count` texts of each hard kind; the same seed gives the same texts."""
    rng = random.Random(seed)
    cases = {
        name: script_texts(words.split(), count, rng, "" if name == "chinese" else " ")
        for name, words in SCRIPTS.items()
    }
    cases["emoji"] = emoji_texts(count, rng)
    cases["short"] = short_texts(count, rng)
    cases["truncated"] = make_corpus(count, rng.randrange(1 << 30), 300, 400)  # > 256 tokens, cut
    return cases


# -- the recipes ---------------------------------------------------------------------------------

Build = Callable[[Path, Path], None]  # fp32 model file, output file


def matmuls(model_file: Path) -> list[str]:
    """Names of the MatMul nodes with a constant weight (the ones a recipe may quantize)."""
    import onnx

    return [n.name for n in weight_matmuls(onnx.load(str(model_file), load_external_data=False))]


def select(names: Sequence[str], pattern: str) -> list[str]:
    """The names that match the regular expression `pattern`."""
    return [n for n in names if re.search(pattern, n)]


def layers(names: Sequence[str]) -> list[int]:
    """Encoder layer numbers found in the MatMul names."""
    return sorted({int(m.group(1)) for n in names if (m := re.search(r"layer\.(\d+)/", n))})


def dynamic(exclude: Callable[[list[str]], list[str]] | None = None, **options: Any) -> Build:
    """The server's DTYPES=int8-fast recipe (quantize_dynamic_int8), without the nodes `exclude` picks."""

    def build(source: Path, target: Path) -> None:
        quantize_dynamic_int8(source, target, exclude(matmuls(source)) if exclude else (), **options)

    return build


def calibration() -> list[dict[str, IntArray]]:
    """The shipped calibration sentences as `DTYPES=int8` feeds them (quantize.calibration_feeds)."""
    path = resolve_model_path(DEFAULT_DENSE_MODEL)
    return calibration_feeds(load_fast_tokenizer(path)[0], load_model_config(path).max_input_tokens)


class CalibrationTexts:
    """The shipped calibration sentences, one feed each (no padding to skew the ranges), or all in
    one padded batch."""

    def __init__(self, tokenizer: TextTokenizer, one_batch: bool = False) -> None:
        if one_batch:  # histogram calibrators stack every feed, so they need one shape
            texts = [line for line in CALIBRATION_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
            keys = ("input_ids", "attention_mask", "token_type_ids")
            self.feeds = [dict(zip(keys, tokenizer.collate(tokenizer.encode(texts).encoded), strict=True))]
        else:
            self.feeds = calibration()
        self._iter: Iterator[dict[str, IntArray]] = iter(self.feeds)

    def get_next(self) -> dict[str, IntArray] | None:
        """The next feed (onnxruntime's CalibrationDataReader)."""
        return next(self._iter, None)

    def rewind(self) -> None:
        """Starts over."""
        self._iter = iter(self.feeds)


def static(method: str, activation: str, tokenizer: TextTokenizer, **extra: Any) -> Build:
    """quantize_static, QDQ, int8 per-channel weights on MatMuls and `activation` (QUInt8 or QInt8)
    activations calibrated by `method` on the shipped calibration file."""

    def build(source: Path, target: Path) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        quantize_static(
            str(source),
            str(target),
            CalibrationTexts(tokenizer, one_batch=method != "MinMax"),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType[activation],
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[method],
            extra_options={"MatMulConstBOnly": True, **extra},
        )

    return build


def smooth(source: Path, target: Path, alpha: float) -> None:
    """SmoothQuant, offline: for each activation feeding weight MatMuls, divides channel j by
    s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (a Mul before the MatMuls) and multiplies weight row
    j by s_j, so the product is unchanged in fp32 and the activation's outlier channels no longer
    set the per-tensor int8 scale alone."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    weights = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            groups.setdefault(node.input[0], []).append(node)
    peaks = channel_peaks(source, list(groups), calibration())
    nodes = list(model.graph.node)
    for k, (x, consumers) in enumerate(groups.items()):
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in consumers]
        w_peak = np.max([np.abs(a).max(axis=1) for a in arrays], axis=0)
        scale = (np.maximum(peaks[x], 1e-5) ** alpha / np.maximum(w_peak, 1e-5) ** (1 - alpha)).astype(np.float32)
        for node, array in zip(consumers, arrays, strict=True):
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(array * scale[:, None], node.input[1]))
            node.input[0] = f"{x}_smoothed"
        model.graph.initializer.append(numpy_helper.from_array(1.0 / scale, f"smooth_{k}"))
        mul = onnx.helper.make_node("Mul", [x, f"smooth_{k}"], [f"{x}_smoothed"], name=f"/smooth_{k}/Mul")
        nodes.insert(min(nodes.index(n) for n in consumers), mul)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(target))


def smoothed(alpha: float, then: Build) -> Build:
    """`then` applied to the model smoothed with `alpha` (smooth)."""

    def build(source: Path, target: Path) -> None:
        middle = target.with_suffix(".smooth.onnx")
        smooth(source, middle, alpha)
        then(middle, target)
        middle.unlink()

    return build


def nbits(block_size: int, accuracy_level: int, exclude: Callable[[list[str]], list[str]] | None = None) -> Build:
    """MatMulNBits with 8-bit symmetric weights in blocks of `block_size` along K; accuracy_level 4
    computes in int8, quantizing each row (token) of the activation per block inside the kernel,
    0 dequantizes the weights and computes in fp32."""

    def build(source: Path, target: Path) -> None:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(source)),
            bits=8,
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=accuracy_level,
            nodes_to_exclude=exclude(matmuls(source)) if exclude else None,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(target))

    return build


@dataclass(frozen=True)
class PerToken:
    """How per_token rewrites the weight MatMuls.

    asymmetric: a zero point per row too (else symmetric, zero point 128).
    weight_max: weights per output column in +-weight_max (127: 8 bits, 63: 7 bits).
    unsigned_weights: weights stored as U8 with zero point 128 (ONNX Runtime's U8U8 GEMM).
    outliers: this many input channels per MatMul input, those with the largest calibration peaks,
        stay out of the int8 product and are multiplied in fp32.
    exclude: picks the MatMuls left in fp32 from all weight MatMuls' names.
    """

    asymmetric: bool = False
    weight_max: int = 127
    unsigned_weights: bool = False
    outliers: int = 0
    exclude: Callable[[list[str]], list[str]] | None = None


def per_token(source: Path, target: Path, how: PerToken) -> None:
    """Rewrites each weight MatMul x.W as MatMulInteger on x quantized per row (per token, its own
    scale from that row's range) and W per output column, then rescales.

    Symmetric: q = round(x / s) + 128 with s = max|x_row| / 127 and a scalar zero point 128, so
    ONNX Runtime keeps its U8S8 GEMM. Asymmetric: s = (max - min) / 255 and a zero point z per
    row, which MatMulInteger's CPU kernel does not take (scalar only): the GEMM runs without it and
    z * colsum(W) is subtracted after. Without VNNI the U8S8 GEMM sums pairs of u8 x s8 products
    in int16 (vpmaddubsw), which saturates once 2 x 255 x |w| > 32767: 7-bit weights (weight_max
    63) or U8 weights (U8U8 GEMM, int16 operands, no saturation) rule it out. Outlier channels (a
    few per input in BERT, 5-15x the median channel's peak) would set every row's scale; with
    `outliers`, they are zeroed in the int8 product and added back as a thin fp32 MatMul. Inputs
    shared by several MatMuls (Q, K, V) are quantized once."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    excluded = set(how.exclude(matmuls(source))) if how.exclude else set()
    groups = weight_inputs(model, excluded.__contains__)
    peaks = channel_peaks(source, list(groups), calibration()) if how.outliers else {}
    constants: dict[str, np.ndarray[Any, Any]] = {
        "pt_axes": np.array([-1], np.int64),
        "pt_zero": np.array(0.0, np.float32),
        "pt_eps": np.array(1e-8, np.float32),
        "pt_128": np.array(128.0, np.float32),
        "pt_255": np.array(255.0, np.float32),
        "pt_inv": np.array(1 / 255 if how.asymmetric else 1 / 127, np.float32),
        "pt_zp": np.array(128, np.uint8),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())

    def quantize(x: str, p: str) -> list[onnx.NodeProto]:
        """Nodes quantizing `x` per row into {p}/q (U8), {p}/scale and, asymmetric, {p}/zp ([.., 1])."""
        if not how.asymmetric:
            return [
                helper.make_node("Abs", [x], [f"{p}/abs"]),
                helper.make_node("ReduceMax", [f"{p}/abs", "pt_axes"], [f"{p}/max"], keepdims=1),
                helper.make_node("Mul", [f"{p}/max", "pt_inv"], [f"{p}/scale0"]),
                helper.make_node("Max", [f"{p}/scale0", "pt_eps"], [f"{p}/scale"]),
                helper.make_node("Div", [x, f"{p}/scale"], [f"{p}/div"]),
                helper.make_node("Round", [f"{p}/div"], [f"{p}/round"]),
                helper.make_node("Add", [f"{p}/round", "pt_128"], [f"{p}/shift"]),
                helper.make_node("Cast", [f"{p}/shift"], [f"{p}/q"], to=TensorProto.UINT8),
            ]
        return [
            helper.make_node("ReduceMax", [x, "pt_axes"], [f"{p}/max0"], keepdims=1),
            helper.make_node("ReduceMin", [x, "pt_axes"], [f"{p}/min0"], keepdims=1),
            helper.make_node("Max", [f"{p}/max0", "pt_zero"], [f"{p}/max"]),
            helper.make_node("Min", [f"{p}/min0", "pt_zero"], [f"{p}/min"]),
            helper.make_node("Sub", [f"{p}/max", f"{p}/min"], [f"{p}/range"]),
            helper.make_node("Mul", [f"{p}/range", "pt_inv"], [f"{p}/scale0"]),
            helper.make_node("Max", [f"{p}/scale0", "pt_eps"], [f"{p}/scale"]),
            helper.make_node("Div", [f"{p}/min", f"{p}/scale"], [f"{p}/zp0"]),
            helper.make_node("Neg", [f"{p}/zp0"], [f"{p}/zp1"]),
            helper.make_node("Round", [f"{p}/zp1"], [f"{p}/zp"]),
            helper.make_node("Div", [x, f"{p}/scale"], [f"{p}/div"]),
            helper.make_node("Round", [f"{p}/div"], [f"{p}/round"]),
            helper.make_node("Add", [f"{p}/round", f"{p}/zp"], [f"{p}/shift"]),
            helper.make_node("Clip", [f"{p}/shift", "pt_zero", "pt_255"], [f"{p}/clip"]),
            helper.make_node("Cast", [f"{p}/clip"], [f"{p}/q"], to=TensorProto.UINT8),
        ]

    prefixes: dict[str, str] = {}  # MatMul input -> the prefix of its quantized tensors
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.name not in groups.get(node.input[0], ()):
            nodes.append(node)
            continue
        x, w_name = node.input
        w = numpy_helper.to_array(weights[w_name]).astype(np.float32)
        kept = np.argsort(peaks[x])[::-1][: how.outliers].astype(np.int64) if how.outliers else np.zeros(0, np.int64)
        if x not in prefixes:
            q = prefixes[x] = f"/per_token_{len(prefixes)}"
            if how.outliers:
                tensors, split = split_outliers(x, q, kept, w.shape[0], axis=-1)
                graph.initializer.extend(tensors)
                nodes += split
            nodes.extend(quantize(f"{q}/rest" if how.outliers else x, q))
        q = prefixes[x]
        p = node.name.removesuffix("/MatMul") + "/per_token"
        stored, w_scale = per_column(w, kept, how.weight_max, how.unsigned_weights)
        w_q = stored.astype(np.float32) - 128 if how.unsigned_weights else stored.astype(np.float32)
        graph.initializer.extend(
            [numpy_helper.from_array(stored, f"{p}/w"), numpy_helper.from_array(w_scale, f"{p}/ws")]
        )
        inputs = [f"{q}/q", f"{p}/w", "" if how.asymmetric else "pt_zp"]
        if how.unsigned_weights:
            inputs.append("pt_zp")
        nodes += [
            helper.make_node("MatMulInteger", inputs, [f"{p}/acc"], name=f"{p}/MatMulInteger"),
            helper.make_node("Cast", [f"{p}/acc"], [f"{p}/accf"], to=TensorProto.FLOAT),
        ]
        last = f"{p}/accf"
        if how.asymmetric:
            graph.initializer.append(numpy_helper.from_array(w_q.sum(axis=0).astype(np.float32), f"{p}/colsum"))
            nodes += [
                helper.make_node("Mul", [f"{q}/zp", f"{p}/colsum"], [f"{p}/correction"]),
                helper.make_node("Sub", [last, f"{p}/correction"], [f"{p}/centred"]),
            ]
            last = f"{p}/centred"
        out = f"{p}/int8_out" if how.outliers else node.output[0]
        nodes += [
            helper.make_node("Mul", [last, f"{q}/scale"], [f"{p}/row_scaled"]),
            helper.make_node("Mul", [f"{p}/row_scaled", f"{p}/ws"], [out]),
        ]
        if how.outliers:
            graph.initializer.append(numpy_helper.from_array(w[kept], f"{p}/w_outliers"))
            nodes += [
                helper.make_node("MatMul", [f"{q}/outliers", f"{p}/w_outliers"], [f"{p}/fp32_out"]),
                helper.make_node("Add", [out, f"{p}/fp32_out"], [node.output[0]]),
            ]
    save_rewrite(model, nodes, target)


def dynamic_outliers(source: Path, target: Path, how: PerToken) -> None:
    """dyn's arithmetic (ONNX Runtime's DynamicQuantizeMatMul: x quantized per tensor, U8 with its
    own zero point, S8 weights per column, bias added inside) on each MatMul input with its
    `how.outliers` peak channels zeroed; those channels are multiplied in fp32 and added. Tests
    whether dyn's loss is the outliers (its range is per tensor) at dyn's speed: per-token scales
    cost a Mul and a ReduceMax/ReduceMin pass per MatMul (ORT profile, AVX-512 VNNI)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    groups = weight_inputs(model)
    quantized = {name for names in groups.values() for name in names}
    biases = bias_adds(graph)
    peaks = channel_peaks(source, list(groups), calibration())
    nodes: list[onnx.NodeProto] = []
    prefixes: dict[str, tuple[str, str, np.ndarray[Any, Any]]] = {}
    skipped: set[str] = set()
    for node in graph.node:
        if node.name in skipped:
            continue
        if node.name not in quantized:
            nodes.append(node)
            continue
        x, w_name = node.input
        w = numpy_helper.to_array(weights[w_name]).astype(np.float32)
        k_dim = w.shape[0]
        if x not in prefixes:
            q = f"/dyn_outliers_{len(prefixes)}"
            kept = np.argsort(peaks[x])[::-1][: how.outliers].astype(np.int64)
            tensors, split = split_outliers(x, q, kept, k_dim, axis=2)
            graph.initializer.extend(tensors)
            nodes += split
            prefixes[x] = (f"{q}/rest", f"{q}/outliers", kept)
        rest, outliers, kept = prefixes[x]
        p = node.name.removesuffix("/MatMul") + "/dyn_outliers"
        w_q, w_scale = per_column(w, kept)
        graph.initializer.extend(
            [
                numpy_helper.from_array(w_q, f"{p}/w"),
                numpy_helper.from_array(w_scale, f"{p}/ws"),
                numpy_helper.from_array(w[kept], f"{p}/w_outliers"),
            ]
        )
        bias = biases.get(node.output[0])
        result = node.output[0]
        inputs = [rest, f"{p}/w", f"{p}/ws"]
        if bias is not None:
            skipped.add(bias[0].name)
            result = bias[0].output[0]
            inputs += ["", bias[1]]
        nodes += [
            helper.make_node("DynamicQuantizeMatMul", inputs, [f"{p}/y"], domain="com.microsoft"),
            helper.make_node("MatMul", [outliers, f"{p}/w_outliers"], [f"{p}/extra"]),
            helper.make_node("Add", [f"{p}/y", f"{p}/extra"], [result]),
        ]
    save_rewrite(model, nodes, target)


def dynamic_outliers_build(outliers: int) -> Build:
    """dynamic_outliers with `outliers` channels per MatMul input, as a recipe."""

    def build(source: Path, target: Path) -> None:
        dynamic_outliers(source, target, PerToken(outliers=outliers))

    return build


def per_token_build(**how: Any) -> Build:
    """per_token with PerToken(**how), as a recipe."""

    def build(source: Path, target: Path) -> None:
        per_token(source, target, PerToken(**how))

    return build


def fused(**how: Any) -> Build:
    """The server's quantize_per_token with quantize.PerToken(**how) (int8_recipe picks DTYPES=int8's)."""

    def build(source: Path, target: Path) -> None:
        quantize_per_token(source, target, calibration(), Fused(**how))

    return build


def edges(names: list[str]) -> list[str]:
    """The first and the last encoder layer's MatMuls."""
    first, last = layers(names)[0], layers(names)[-1]
    return select(names, rf"layer\.({first}|{last})/")


def sensitive(names: list[str]) -> list[str]:
    """First and last layer, every query/key projection, and the last FFN output (before pooling)."""
    last = layers(names)[-1]
    return sorted(set(edges(names) + select(names, r"/(query|key)/") + select(names, rf"layer\.{last}/output/dense")))


def recipes(tokenizer: TextTokenizer) -> dict[str, tuple[str, Build]]:
    """Every variant measured: name -> (what it is, how it is built)."""

    def tok(**how: Any) -> Build:
        return per_token_build(**how)

    return {
        "dyn": ("quantize_dynamic, per-channel S8 weights, all weight MatMuls (DTYPES=int8-fast)", dynamic()),
        "dyn-reduce": ("dyn with reduce_range (7-bit weights)", dynamic(reduce_range=True)),
        "dyn-no-edges": ("dyn without the first and last layer's MatMuls", dynamic(edges)),
        "dyn-no-qk": ("dyn without the query/key projections", dynamic(lambda n: select(n, r"/(query|key)/"))),
        "dyn-no-ffn-out": ("dyn without the FFN output MatMuls", dynamic(lambda n: select(n, r"/output/dense"))),
        "dyn-no-sensitive": ("dyn without first/last layer, Q/K and last FFN output", dynamic(sensitive)),
        "dyn-ffn-only": (
            "dyn on the FFN MatMuls only (intermediate + output dense)",
            dynamic(lambda n: select(n, r"attention/")),
        ),
        "dyn-smooth-0.5": ("dyn after SmoothQuant smoothing, alpha 0.5", smoothed(0.5, dynamic())),
        "dyn-smooth-0.7": ("dyn after SmoothQuant smoothing, alpha 0.7", smoothed(0.7, dynamic())),
        "static-minmax-u8": ("quantize_static QDQ, MinMax, U8 activations", static("MinMax", "QUInt8", tokenizer)),
        "static-minmax-s8": ("quantize_static QDQ, MinMax, S8 activations", static("MinMax", "QInt8", tokenizer)),
        "static-pct-u8": (
            "quantize_static QDQ, Percentile 99.999, U8 activations",
            static("Percentile", "QUInt8", tokenizer),
        ),
        "static-entropy-u8": ("quantize_static QDQ, Entropy, U8 activations", static("Entropy", "QUInt8", tokenizer)),
        "tok-sym": ("per-token symmetric U8 activations (zero point 128), per-column S8 weights", tok()),
        "tok-asym": ("per-token asymmetric U8 activations (zero point per row), S8 weights", tok(asymmetric=True)),
        "tok-sym-w7": ("tok-sym with 7-bit weights (+-63: no vpmaddubsw saturation)", tok(weight_max=63)),
        "tok-asym-w7": ("tok-asym with 7-bit weights (+-63)", tok(asymmetric=True, weight_max=63)),
        "tok-sym-u8w": ("tok-sym with U8 weights, zero point 128 (U8U8 GEMM)", tok(unsigned_weights=True)),
        "tok-out2": ("tok-sym, the 2 peak input channels of each MatMul in fp32", tok(outliers=2)),
        "tok-out2-u8w": ("tok-out2 with U8 weights (U8U8 GEMM)", tok(outliers=2, unsigned_weights=True)),
        "tok-out2-fused": (
            "tok-out2 in fused ops: MatMulIntegerToFloat, row-scale Mul, outlier Gemm with the bias "
            "(DTYPES=int8 on a CPU without VNNI)",
            fused(**vars(WITHOUT_VNNI)),
        ),
        "tok-out2-u8w-fused": ("tok-out2-fused with U8 weights (U8U8 GEMM)", fused(unsigned_weights=True)),
        "tok-sym-fused": ("tok-sym in fused ops (tok-out2-fused without outliers)", fused(outliers=0)),
        "tok-sym-fp32v": (
            "tok-sym-fused with the value projections in fp32 (DTYPES=int8 on a CPU with VNNI)",
            fused(**vars(WITH_VNNI)),
        ),
        "tok-out2-qkv": (
            "tok-out2-fused, outliers kept only at the query/key/value input",
            fused(outlier_pattern=r"attention/self/"),
        ),
        "tok-out2-qkv-l0l4": (
            "tok-out2-qkv, and at layer 0's FFN output and layer 4's FFN intermediate inputs",
            fused(outlier_pattern=r"attention/self/|layer\.0/output/dense|layer\.4/intermediate"),
        ),
        "tok-out2-ffn": (
            "tok-out2-fused, outliers kept only at the FFN inputs (calibration max/median 4-16 there)",
            fused(outlier_pattern=r"intermediate/|layer\.\d+/output/dense/"),
        ),
        "dyn-out2": (
            "dyn's fused op on inputs with the 2 peak channels zeroed, those multiplied in fp32",
            dynamic_outliers_build(2),
        ),
        "dyn-out4": ("dyn-out2 with 4 channels", dynamic_outliers_build(4)),
        "tok-sq0.5": ("tok-sym after SmoothQuant smoothing, alpha 0.5", smoothed(0.5, tok())),
        "tok-sq0.5-u8w": (
            "tok-sym-u8w after SmoothQuant smoothing, alpha 0.5",
            smoothed(0.5, tok(unsigned_weights=True)),
        ),
        "nbits8-b32": ("MatMulNBits 8-bit weights, blocks of 32, int8 compute (accuracy_level 4)", nbits(32, 4)),
        "nbits8-b128": ("MatMulNBits 8-bit weights, blocks of 128, int8 compute (accuracy_level 4)", nbits(128, 4)),
        "nbits8-b32-fp32": ("MatMulNBits 8-bit weights, blocks of 32, fp32 compute (accuracy_level 0)", nbits(32, 0)),
    }


def built(
    name: str, build: Build, fp32: Path, cache_dir: Path, bench: str = "int8", version: int = RECIPES_VERSION
) -> Path:
    """The variant's model file, built from `fp32` the first time, kept under the cache folder
    for `bench` (int8, or bench.graph's) and named after its recipes' `version`."""
    target = cache_dir / "bench-models" / bench / f"{fp32.parent.name}-{name}-v{version}.onnx"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        work = target.with_suffix(".part.onnx")
        step(f"building {name}")
        build(fp32, work)
        work.replace(target)
    return target


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class Measured:
    """One variant: texts/s per round, ratio to fp32 per round, and cosines to fp32 per corpus."""

    what: str
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    cosines: dict[str, FloatArray] = field(default_factory=dict)


class Texts:
    """Tokenizes texts with the server's tokenizer, into length-sorted batches, and pools as it does."""

    def __init__(self) -> None:
        path = resolve_model_path(DEFAULT_DENSE_MODEL)
        self.config = load_model_config(path)
        self.tokenizer = TextTokenizer(path, self.config.max_input_tokens)

    def batches(self, texts: Sequence[str], batch_size: int) -> list[Batch]:
        """`texts` sorted by token count and collated `batch_size` at a time."""
        encoded = sorted(self.tokenizer.encode(list(texts)).encoded, key=len)
        return [self.tokenizer.collate(encoded[i : i + batch_size]) for i in range(0, len(encoded), batch_size)]

    def vectors(self, session: Session, batches: Sequence[Batch]) -> FloatArray:
        """The normalized pooled vectors of every row, batch after batch (an output of 2 axes is
        pooled already: sentence-transformers')."""
        rows: list[FloatArray] = []
        for ids, mask, types in batches:
            out = np.asarray(session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0])
            rows.extend(out if out.ndim == 2 else DENSE.outputs(out.astype(np.float32), mask, self.config))
        return normalize(np.stack(rows))


class SentenceTransformersSession:
    """sentence-transformers' own forward pass (the model's modules: transformer, pooling,
    normalize, in torch) on the bench's batches, run as a session is: the reference issue 12 gives
    speeds and cosines against. Its tokenization (~1% of the time) is the bench's."""

    def __init__(self, path: Path, threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)  # as each ONNX Runtime session
        self._torch = torch
        self._model = SentenceTransformer(str(path), device="cpu").eval()

    def run(self, _outputs: None, feeds: dict[str, IntArray]) -> list[FloatArray]:
        """Its sentence embeddings for one batch."""
        with self._torch.inference_mode():
            out = self._model({k: self._torch.from_numpy(v) for k, v in feeds.items()})
        return [out["sentence_embedding"].numpy()]


Session: TypeAlias = "ort.InferenceSession | SentenceTransformersSession"
REFERENCE = "sentence-transformers"


def run_batches(session: Session, batches: Sequence[Batch]) -> float:
    """Seconds to run every batch once."""
    start = time.perf_counter()
    for ids, mask, types in batches:
        session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return time.perf_counter() - start


def measure_speed(
    sessions: dict[str, Session],
    batches: list[Batch],
    texts: int,
    rounds: int,
    results: dict[str, Measured],
) -> None:
    """Each round runs fp32 and then every variant over the same batches, in reverse order in
    even rounds; a variant's ratio is to that round's fp32 pass."""
    for session in sessions.values():
        run_batches(session, batches[:2])  # warm-up: first-run allocations
    for r in range(rounds):
        step(f"throughput round {r + 1}/{rounds}")
        order = list(sessions) if r % 2 == 0 else list(sessions)[::-1]
        seconds = {name: run_batches(sessions[name], batches) for name in order}
        for name in sessions:
            results[name].rates.append(texts / seconds[name])
            results[name].ratios.append(seconds["fp32"] / seconds[name])


def measure_accuracy(
    sessions: dict[str, Session],
    corpora: dict[str, list[Batch]],
    texts: Texts,
    results: dict[str, Measured],
) -> None:
    """Cosine of each variant's vector to fp32's, per text, on every corpus."""
    for corpus, batches in corpora.items():
        step(f"accuracy on {corpus}")
        reference = texts.vectors(sessions["fp32"], batches)
        for name, session in sessions.items():
            results[name].cosines[corpus] = np.sum(texts.vectors(session, batches) * reference, axis=1)


# -- report --------------------------------------------------------------------------------------


def meets(m: Measured) -> bool:
    """The issue's target: every cosine >= 0.99, mean >= 0.995 on each corpus, >= 1.8x fp32."""
    hard = np.concatenate([c for k, c in m.cosines.items() if k != "corpus"])
    accurate = all(float(c.min()) >= TARGET_MIN and float(c.mean()) >= TARGET_MEAN for c in (m.cosines["corpus"], hard))
    return accurate and bool(m.ratios) and float(np.median(m.ratios)) >= TARGET_SPEED


def report_rows(results: dict[str, Measured]) -> list[list[str]]:
    """One row per variant: speed, then mean / min cosine on the corpus, on all hard cases, and the
    worst hard kind."""
    rows = []
    for name, m in results.items():
        hard = {k: c for k, c in m.cosines.items() if k != "corpus"}
        every = np.concatenate(list(hard.values()))
        worst = min(hard, key=lambda k: float(hard[k].min()))
        ratio = f"{np.median(m.ratios):.2f}" if m.ratios else "1.00"
        rows.append(
            [
                name,
                f"{np.median(m.rates):.0f}",
                ratio,
                f"{m.cosines['corpus'].mean():.4f} / {m.cosines['corpus'].min():.4f}",
                f"{every.mean():.4f} / {every.min():.4f}",
                f"{worst} {hard[worst].min():.4f}",
                "yes" if name not in ("fp32", REFERENCE) and meets(m) else "",
            ]
        )
    return rows


def cpu_flags() -> str:
    """The SIMD flags that matter to int8 on x86 (/proc/cpuinfo), or what is missing."""
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return "unknown (no /proc/cpuinfo flags)"
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The bench's options."""
    defaults = server_defaults()
    p = argparse.ArgumentParser(
        prog="python -m bench.int8", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--texts", type=int, default=512, help="throughput corpus (default 512)")
    p.add_argument("--accuracy-texts", type=int, default=1000, help="accuracy corpus (default 1000)")
    p.add_argument("--hard-texts", type=int, default=60, help="texts of each hard kind (default 60)")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (default 3)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 64 texts, 100 for accuracy, 10 per hard kind, 1 round"
    )
    p.add_argument("--seed", type=int, default=12, help="corpus seed; the hard cases use seed + 1 (default 12)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"(default {defaults.batch_size})")
    p.add_argument(
        "--intra-op-threads", type=int, default=defaults.intra_op_threads, help="as the server's; 0 = its default"
    )
    p.add_argument("--cache-dir", type=Path, default=defaults.cache_dir, help=f"(default {defaults.cache_dir})")
    p.add_argument("--variants", help="comma-separated names to run (default: all)")
    p.add_argument(
        "--no-reference", action="store_true", help=f"leave out the {REFERENCE} row (its speed and cosines to fp32)"
    )
    p.add_argument("--json-out", type=Path, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.accuracy_texts, args.hard_texts, args.rounds = 64, 100, 10, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Builds the variants, measures them, prints the table and one JSON line."""
    args = parse_args(argv)
    texts = Texts()
    everything = recipes(texts.tokenizer)
    chosen = args.variants.split(",") if args.variants else list(everything)
    unknown = [n for n in chosen if n not in everything]
    if unknown:
        print(f"unknown variants {unknown}; known: {', '.join(everything)}", file=sys.stderr)
        return 2
    fp32 = dense_model_files(["fp32"], args.cache_dir)["fp32"]
    files = {"fp32": fp32} | {n: built(n, everything[n][1], fp32, args.cache_dir) for n in chosen}
    threads, spinning = server_forward_setup(args.intra_op_threads)
    sessions: dict[str, Session] = {n: cpu_session(f, threads, spinning) for n, f in files.items()}
    results = {"fp32": Measured("fp32 export, as the server runs it")} | {n: Measured(everything[n][0]) for n in chosen}
    if not args.no_reference:
        sessions[REFERENCE] = SentenceTransformersSession(resolve_model_path(DEFAULT_DENSE_MODEL), threads)
        results[REFERENCE] = Measured(
            "sentence-transformers in torch, the reference: its speed, and its vectors' cosines to fp32's"
        )
    measure_speed(
        sessions, texts.batches(make_corpus(args.texts, args.seed), args.batch_size), args.texts, args.rounds, results
    )
    corpora = {"corpus": make_corpus(args.accuracy_texts, args.seed + 1000)} | hard_cases(
        args.hard_texts, args.seed + 1
    )
    measure_accuracy(sessions, {k: texts.batches(v, args.batch_size) for k, v in corpora.items()}, texts, results)
    header = ["variant", "texts/s", "x fp32", "corpus mean / min", "hard mean / min", "worst hard kind", "meets target"]
    report = [
        f"CPU: {cpu_flags()}; {threads} intra-op thread(s) per session, batches of {args.batch_size}",
        f"throughput: {args.texts} texts, {args.rounds} rounds; "
        f"accuracy: {args.accuracy_texts} texts + {args.hard_texts} per hard kind",
        *table(report_rows(results), header),
        *(f"  {name}: {m.what}" for name, m in results.items()),
    ]
    summary = {
        n: {
            "ratio": float(np.median(m.ratios)) if m.ratios else 1.0,
            "round_ratios": [float(r) for r in m.ratios],
            **{k: [float(c.mean()), float(c.min())] for k, c in m.cosines.items()},
        }
        for n, m in results.items()
    }
    print_summary(report, summary, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
