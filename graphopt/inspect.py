"""``graphopt inspect``: what a model is made of."""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import ir
from .data import input_specs, output_specs
from .report import human_bytes


def inspect_model(path: Any) -> dict[str, Any]:
    m = ir.load(path)
    ops = Counter((n.domain + "." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in ir.proto_nodes(m.graph))
    params = 0
    weight_bytes = 0
    for t in m.graph.initializer:
        params += int(np.prod(t.dims)) if len(t.dims) else 1
        weight_bytes += len(t.raw_data) if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).nbytes
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    params += int(np.prod(a.t.dims)) if len(a.t.dims) else 1
    return {
        "ir_version": m.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": s.shape} for s in input_specs(m)],
        "outputs": [{"name": s.name, "dtype": str(s.dtype), "shape": s.shape} for s in output_specs(m)],
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "initializers": len(m.graph.initializer),
        "parameters": params,
        "weight_bytes": weight_bytes,
        "model_bytes": m.ByteSize(),
        "functions": len(m.functions),
    }


def print_inspection(info: dict[str, Any], console: Console) -> None:
    console.print(f"ir_version {info['ir_version']}, opsets {info['opsets']}, producer {info['producer'] or '-'}")
    t = Table(box=None, header_style="bold")
    t.add_column("")
    t.add_column("name")
    t.add_column("dtype")
    t.add_column("shape")
    for kind in ("inputs", "outputs"):
        for s in info[kind]:
            shape = "?" if s["shape"] is None else "[" + ",".join("?" if d is None else str(d) for d in s["shape"]) + "]"
            t.add_row(kind[:-1], escape(s["name"]), s["dtype"], escape(shape))
    console.print(t)
    console.print(f"nodes {info['nodes']}, initializers {info['initializers']}, parameters {info['parameters']:,}, "
                  f"weights {human_bytes(info['weight_bytes'])}, model {human_bytes(info['model_bytes'])}")
    ops = Table(box=None, header_style="bold")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, c in info["ops"].items():
        ops.add_row(escape(op), str(c))
    console.print(ops)
