"""``unfuse-skip-layernorm``: keep residual ``Add`` + ``LayerNormalization`` apart on onnxruntime CPU.

Target-specific (-O3), the one place where -O3 un-does a fusion, because it is measured to be slower:
with onnxruntime 1.32 on this CPU (1 thread, AVX-512), ``com.microsoft.SkipLayerNormalization`` on a
[1, 128, 256] float tensor takes ~220 us, while the ``Add`` plus the ``LayerNormalization`` it replaces take
~50 us (64 rows: ~117 us vs ~33 us; benchmarks/o3_latency.py, interleaved, thread CPU time).  Under
ORT_ENABLE_ALL onnxruntime itself fuses ``LayerNormalization(Add(a, b))`` into SkipLayerNormalization
whenever the Add has one consumer and two 3-D inputs of equal static shape, so leaving the graph alone is
not enough.  This pass

- rewrites an existing ``SkipLayerNormalization`` back into ``Add`` (+ bias ``Add``) + ``LayerNormalization``
  (optional mean / inv_std outputs must be unused; the sum output maps to the Add), and
- gives each ``LayerNormalization(Add(..))`` whose sum feeds only the layer norm a 2-D view:
  ``LN(Reshape(sum, [-1, H]))`` then ``Reshape`` back to ``Shape(sum)``.  Reshapes alias their input in
  onnxruntime (no copy), the normalization over the last axis is the same computation, and onnxruntime's
  fusion no longer sees an ``Add`` feeding the layer norm.

It is an exact rewrite.  On bert_mini it is worth about 8-10% of the latency under ORT_ENABLE_ALL.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import Pass, PassContext, PassResult, register_pass
from graphopt.rewrite import derived_name

from ._common import fuse_each, is_std
from ._ort import MS_DOMAIN, is_float32, op_of, static_shape


def _check_lower(graph: gs.Graph, n: gs.Node) -> str | None:
    name = n.name or "SkipLayerNormalization"
    if any(len(o.outputs) or o in graph.outputs for o in n.outputs[1:3] if not o.is_empty()):
        return f"{name}: its mean / inv_std_var outputs are used"
    return None


def _lower_skip_ln(graph: gs.Graph, n: gs.Node) -> None:
    """SkipLayerNormalization -> Add (+ Add bias) + LayerNormalization."""
    name = n.name or "SkipLayerNormalization"
    inp, skip, gamma = n.inputs[:3]
    beta = n.inputs[3] if len(n.inputs) > 3 and not n.inputs[3].is_empty() else None
    bias = n.inputs[4] if len(n.inputs) > 4 and not n.inputs[4].is_empty() else None
    y = n.outputs[0]
    total = n.outputs[3] if len(n.outputs) > 3 and not n.outputs[3].is_empty() else None
    if total is None:
        total = gs.Variable(derived_name(graph, y.name, "sum"), dtype=inp.dtype)
    eps = float(n.attrs.get("epsilon", 1e-12))
    n.inputs.clear()
    n.outputs.clear()
    a = inp
    if bias is not None:
        a = gs.Variable(derived_name(graph, y.name, "biased"), dtype=inp.dtype)
        graph.nodes.append(gs.Node("Add", name=derived_name(graph, name, "bias_add"), inputs=[inp, bias], outputs=[a]))
    graph.nodes.append(gs.Node("Add", name=derived_name(graph, name, "skip_add"), inputs=[a, skip], outputs=[total]))
    ln_in = [total, gamma] + ([beta] if beta is not None else [])
    graph.nodes.append(gs.Node("LayerNormalization", name=derived_name(graph, name, "LayerNorm"),
                               attrs={"axis": -1, "epsilon": eps}, inputs=ln_in, outputs=[y]))


def _fusable_by_ort(graph: gs.Graph, ln: gs.Node) -> gs.Node | None:
    """The Add that onnxruntime would fold into SkipLayerNormalization with ``ln``, else None."""
    if ln.op != "LayerNormalization" or not is_std(ln):
        return None
    x = ln.inputs[0]
    add = op_of(x, "Add")
    if add is None or len(x.outputs) != 1 or x in graph.outputs:
        return None
    shapes = [static_shape(i) for i in add.inputs]
    if any(s is None or len(s) != 3 for s in shapes) or shapes[0] != shapes[1]:
        return None  # onnxruntime fuses only two 3-D operands of one shape
    return add


def _view_2d(graph: gs.Graph, ln: gs.Node) -> str | None:
    x, y = ln.inputs[0], ln.outputs[0]
    name = ln.name or "LayerNormalization"
    xs = static_shape(x)
    axis = int(ln.attrs.get("axis", -1))
    if xs is None or axis not in (-1, len(xs) - 1) or not isinstance(xs[-1], int):
        return f"{name}: layer norm is not over a static last axis"
    if not is_float32(x):
        return f"{name}: not float32"
    if any(len(o.outputs) or o in graph.outputs for o in ln.outputs[1:] if not o.is_empty()):
        return f"{name}: its mean / inv_std outputs are used"
    h = xs[-1]
    shape2 = gs.Constant(derived_name(graph, x.name, "rows_shape"), np.array([-1, h], dtype=np.int64))
    x2 = gs.Variable(derived_name(graph, x.name, "rows"), dtype=x.dtype, shape=None)
    y2 = gs.Variable(derived_name(graph, y.name, "rows"), dtype=y.dtype, shape=None)
    if all(isinstance(d, int) for d in xs):
        back = gs.Constant(derived_name(graph, y.name, "shape"), np.array(xs, dtype=np.int64))
        pre = []
    else:
        back = gs.Variable(derived_name(graph, y.name, "shape"), dtype=np.int64, shape=[len(xs)])
        pre = [gs.Node("Shape", name=derived_name(graph, name, "Shape"), inputs=[x], outputs=[back])]
    ln.inputs[0] = x2
    ln.outputs[0] = y2
    graph.nodes.extend(pre + [
        gs.Node("Reshape", name=derived_name(graph, name, "to_rows"), inputs=[x, shape2], outputs=[x2]),
        gs.Node("Reshape", name=derived_name(graph, name, "from_rows"), inputs=[y2, back], outputs=[y]),
    ])
    return None


@register_pass
class UnfuseSkipLayerNorm(Pass):
    name = "unfuse-skip-layernorm"
    description = ("keep residual Add + LayerNormalization apart (faster than SkipLayerNormalization on "
                   "onnxruntime 1.32 CPU): lower SkipLayerNormalization, and stop onnxruntime re-fusing")

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from graphopt.shapes import infer_shapes

        stats = {"matched": 0, "rewritten": 0, "lowered": 0, "viewed_2d": 0}
        skipped: list[str] = []
        skip_lns = [n for n in graph.nodes if n.op == "SkipLayerNormalization" and n.domain == MS_DOMAIN]
        lns = [n for n in graph.nodes if n.op == "LayerNormalization"]
        if not skip_lns and not lns:
            return PassResult(False, stats)

        def lower_counted(g: gs.Graph, n: gs.Node) -> None:
            _lower_skip_ln(g, n)
            stats["lowered"] += 1

        # every SkipLayerNormalization is a match (no liveness filter: lowering one leaves the others alone)
        fuse_each(graph, ctx, skip_lns, stats, skipped, match=lambda g, n: (n, None), check=_check_lower,
                  rewrite=lower_counted, describe=lambda n, m: f"lower SkipLayerNormalization {n.name}")
        if stats["lowered"]:
            graph.cleanup(remove_unused_graph_inputs=False)
            graph.toposort()
            ctx.cache.pop("shapes_inferred", None)
        infer_shapes(graph, ctx)
        # not fuse_each: the 2-D view asks allow_rewrite before it knows whether it can apply
        for ln in [n for n in graph.nodes if n.op == "LayerNormalization"]:
            if _fusable_by_ort(graph, ln) is None:
                continue
            stats["matched"] += 1
            if not ctx.allow_rewrite(f"2-D view for LayerNormalization {ln.name}"):
                break
            why = _view_2d(graph, ln)
            if why:
                skipped.append(why)
                continue
            stats["rewritten"] += 1
            stats["viewed_2d"] += 1
        changed = stats["rewritten"] > 0
        if changed:
            graph.toposort()
        return PassResult(changed, stats, skipped)
