"""Structural summaries and diffs of models, for people and for CI graph-diff tests.

A summary is stable text: op histogram, MoEFFN nodes with their attributes and input shapes,
counts of initializers. Golden files in tests/golden/ hold summaries of converted examples so a
change in an exporter or in moefuse shows as a readable diff.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from .spec import DOMAIN, INPUT_NAMES, OP_TYPE


def _op_name(node: onnx.NodeProto) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def histogram(model: onnx.ModelProto) -> Counter:
    return Counter(_op_name(n) for n in model.graph.node)


def _shapes(model: onnx.ModelProto) -> dict:
    out = {t.name: list(t.dims) for t in model.graph.initializer}
    for vi in list(model.graph.input) + list(model.graph.value_info):
        if vi.name in out or not vi.type.tensor_type.HasField("shape"):
            continue
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                        for d in vi.type.tensor_type.shape.dim]
    return out


def moeffn_nodes(model: onnx.ModelProto) -> list[dict]:
    shapes = _shapes(model)
    out = []
    for n in model.graph.node:
        if n.domain != DOMAIN or n.op_type != OP_TYPE:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else
                     (round(v, 6) if isinstance(v, float) else v)) for k, v in sorted(attrs.items())}
        inputs = {INPUT_NAMES[i]: shapes.get(t, "?") for i, t in enumerate(n.input) if t}
        out.append({"name": n.name, "attrs": attrs, "inputs": inputs})
    return out


def summary(model: onnx.ModelProto) -> str:
    """Stable, name-independent text describing a model's structure."""
    lines = [f"nodes: {len(model.graph.node)}"]
    for op, count in sorted(histogram(model).items()):
        lines.append(f"  {op}: {count}")
    inits = model.graph.initializer
    lines.append(f"initializers: {len(inits)}")
    lines.append(f"functions: {', '.join(sorted(f'{f.domain}.{f.name}' for f in model.functions)) or '-'}")
    for i, node in enumerate(moeffn_nodes(model)):
        lines.append(f"MoEFFN #{i}:")
        lines.append("  attributes: " + ", ".join(f"{k}={v}" for k, v in node["attrs"].items()))
        lines.append("  inputs: " + ", ".join(f"{k}{v}" for k, v in node["inputs"].items()))
    return "\n".join(lines) + "\n"


def diff(a: onnx.ModelProto, b: onnx.ModelProto) -> dict:
    """Structural difference from a to b."""
    ha, hb = histogram(a), histogram(b)
    ops = {op: hb.get(op, 0) - ha.get(op, 0) for op in sorted(set(ha) | set(hb))
           if hb.get(op, 0) != ha.get(op, 0)}
    names_a = {n.name or f"{_op_name(n)}:{n.output[0]}" for n in a.graph.node}
    names_b = {n.name or f"{_op_name(n)}:{n.output[0]}" for n in b.graph.node}

    def total_bytes(m):
        return int(sum(np.prod(t.dims, dtype=np.int64) * _itemsize(t.data_type)
                       for t in m.graph.initializer))

    return {
        "nodes": [len(a.graph.node), len(b.graph.node)],
        "op_deltas": ops,
        "nodes_removed": sorted(names_a - names_b),
        "nodes_added": sorted(names_b - names_a),
        "initializers": [len(a.graph.initializer), len(b.graph.initializer)],
        "initializer_bytes": [total_bytes(a), total_bytes(b)],
        "inputs_equal": [v.name for v in a.graph.input] == [v.name for v in b.graph.input],
        "outputs_equal": [v.name for v in a.graph.output] == [v.name for v in b.graph.output],
        "moeffn": {"a": moeffn_nodes(a), "b": moeffn_nodes(b)},
    }


def _itemsize(elem_type: int) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        return 2 if elem_type == onnx.TensorProto.BFLOAT16 else 1


def format_diff(d: dict, max_names: int = 20) -> str:
    lines = [f"nodes: {d['nodes'][0]} -> {d['nodes'][1]}"]
    if d["op_deltas"]:
        lines.append("op histogram:")
        for op, delta in d["op_deltas"].items():
            lines.append(f"  {op}: {delta:+d}")
    for key, label in (("nodes_removed", "removed"), ("nodes_added", "added")):
        names = d[key]
        if names:
            shown = ", ".join(names[:max_names]) + (f", ... ({len(names)} in all)"
                                                    if len(names) > max_names else "")
            lines.append(f"{label} ({len(names)}): {shown}")
    lines.append(f"initializers: {d['initializers'][0]} -> {d['initializers'][1]} "
                 f"({d['initializer_bytes'][0]:,} -> {d['initializer_bytes'][1]:,} bytes)")
    if not d["inputs_equal"] or not d["outputs_equal"]:
        lines.append("graph inputs/outputs CHANGED")
    for side in ("a", "b"):
        for i, node in enumerate(d["moeffn"][side]):
            attrs = ", ".join(f"{k}={v}" for k, v in node["attrs"].items()) or "default attributes"
            inputs = ", ".join(f"{k}{v}" for k, v in node["inputs"].items())
            lines.append(f"MoEFFN {side}#{i} {node['name'] or '(unnamed)'}: {attrs}; inputs {inputs}")
    return "\n".join(lines)
