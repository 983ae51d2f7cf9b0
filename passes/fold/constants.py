"""``fold-constants``: evaluate nodes whose inputs are all constant.

A size limit (default 1 MiB per produced tensor) stops a small subgraph from blowing up into a huge
constant: a result is kept only if it is no larger than the limit or than the largest input it was
computed from (so a Transpose of a weight folds, a ConstantOfShape of 100 MB does not).  Q/DQ and
random ops are never folded.  A node that fails to evaluate is left alone, with the reason in the report.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass

NEVER_FOLD = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
}


def _is_const(t) -> bool:
    return isinstance(t, gs.Constant) or (isinstance(t, gs.Variable) and t.is_empty())


def evaluate_node(node: gs.Node, opset: int) -> list[np.ndarray]:
    """Run one node on constant inputs (onnx.reference first, onnxruntime as the fallback)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    proto = OnnxExporter.export_node(node)
    inits = [onnx.numpy_helper.from_array(np.asarray(t.values), t.name) for t in node.inputs if isinstance(t, gs.Constant)]
    outs = [onnx.helper.make_empty_tensor_value_info(t.name) for t in node.outputs if t.name]
    g = onnx.helper.make_graph([proto], "fold", [], outs, initializer=inits)
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        from onnx.reference import ReferenceEvaluator

        res = ReferenceEvaluator(model).run(None, {})
    except Exception as ref_err:
        try:
            from graphopt.verify import make_session

            res = make_session(model).run(None, {})
        except Exception:
            raise ref_err from None
    for r in res:
        # a sequence (list), an optional (None) or a map (dict) cannot become a tensor constant:
        # np.asarray would silently turn a sequence of tensors into one stacked tensor
        if not isinstance(r, (np.ndarray, np.generic)):
            kind = {list: "sequence", tuple: "sequence", dict: "map", type(None): "empty optional"}.get(type(r), type(r).__name__)
            raise ValueError(f"{node.op} produces a {kind}, not a tensor: only tensors fold into constants")
    return [np.asarray(r) for r in res]


@register_pass
class FoldConstants(Pass):
    name = "fold-constants"
    description = "evaluate nodes whose inputs are all constant (size-limited; never Q/DQ or random ops)"

    @dataclass(frozen=True)
    class Options:
        size_limit: int = 1 << 20

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"folded": 0, "failed": 0, "too_large": 0}
        skipped: list[str] = []
        self._fold(graph, graph.opset, stats, skipped, ctx)
        changed = stats["folded"] > 0
        if changed:
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(changed, stats, skipped)

    def _fold(self, graph: gs.Graph, opset: int, stats: dict, skipped: list[str], ctx: PassContext) -> None:
        graph.toposort()
        outputs = {id(t) for t in graph.outputs}
        for node in list(graph.nodes):
            for a in node.attrs.values():
                if isinstance(a, gs.Graph):
                    self._fold(a, opset, stats, skipped, ctx)
            if node.op in NEVER_FOLD or (node.domain or "") not in ("", "ai.onnx"):
                continue
            if any(isinstance(a, gs.Graph) for a in node.attrs.values()):
                continue
            if not node.outputs or not all(_is_const(t) for t in node.inputs):
                continue
            if any(id(t) in outputs for t in node.outputs):
                continue  # a graph output must stay produced by a node
            try:
                values = evaluate_node(node, opset)
            except Exception as e:
                stats["failed"] += 1
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                skipped.append(f"{node.name or node.op}: cannot evaluate {node.op}: {msg[:200]}")
                continue
            limit = max(self.options.size_limit, max((t.values.nbytes for t in node.inputs if isinstance(t, gs.Constant)), default=0))
            if any(v.nbytes > limit for v in values):
                stats["too_large"] += 1
                skipped.append(f"{node.name or node.op}: {node.op} result of {max(v.nbytes for v in values)} bytes is over the size limit")
                continue
            if not ctx.allow_rewrite(f"fold {node.op} {node.name}"):
                return
            for t, v in zip([t for t in node.outputs if t.name], values):
                t.to_constant(v)
            node.outputs.clear()
            node.inputs.clear()
            stats["folded"] += 1
