"""Finding MoE candidates: anchor on the top-k over router scores, then bound the block.

A candidate is described by dataflow alone, never by names or a node list:

- the anchor is the last TopK (or ArgMax) fed by a router projection's logits;
- the logits L are the output of the nearest MatMul/Gemm upstream of the anchor whose other
  operand is a constant [D, E] / [E, D] matrix (plus a directly following constant Add: a router
  bias belongs to the logits);
- the block input X is that projection's data input, walked up through shape-only ops;
- the block output is a tensor downstream of the anchor that is a function of X alone (every
  non-constant path back from it stops at X). Such "pure" tensors are tried latest first, so a
  shared expert added after the routed sum is part of the block, and the residual add (which
  also reads the residual stream) is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .graph import GraphIndex

MAX_END_CANDIDATES = 6


@dataclass
class Candidate:
    anchor: int               # node index of the final top-k
    x: str                    # block input
    logits: str               # router logits (kept in the graph)
    experts: int              # E
    hidden: Optional[int]     # D, when known
    router_weight: str
    ends: list = field(default_factory=list)   # candidate block outputs, best first
    routing_nodes: set = field(default_factory=set)  # between logits and the anchor
    name: str = ""


@dataclass
class NearMiss:
    where: str
    reason: str
    blocking: bool = True  # False: not an MoE block at all (reported, never blocks a conversion)


def _router_projection(g: GraphIndex, start: str):
    """Nearest MatMul/Gemm upstream of ``start`` with one constant rank-2 operand."""
    seen, frontier = set(), [start]
    while frontier:
        nxt = []
        for t in frontier:
            if t in seen or g.is_constant(t):
                continue
            seen.add(t)
            node = g.node_of(t)
            if node is None:
                continue
            if node.op_type in ("MatMul", "Gemm"):
                a, b = node.input[0], node.input[1]
                if g.is_constant(b) and not g.is_constant(a) and g.rank(b) == 2:
                    return node, t
            nxt.extend(i for i in node.input if i)
        frontier = nxt
    return None, None


def _logits_after_bias(g: GraphIndex, t: str) -> str:
    users = g.users(t)
    if len(users) == 1 and users[0].op_type == "Add":
        other = [i for i in users[0].input if i != t]
        if other and g.is_constant(other[0]) and g.rank(other[0]) in (1, 2):
            return users[0].output[0]
    return t


_VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"}


def _walk_up_shape_ops(g: GraphIndex, t: str) -> str:
    """Up through views of the same data (input 0 of Reshape and friends)."""
    while True:
        node = g.node_of(t)
        if node is None or node.op_type not in _VIEW_OPS or g.is_constant(node.input[0]):
            return t
        t = node.input[0]


def _pure_nodes(g: GraphIndex, x: str) -> set[int]:
    """Nodes whose every non-constant input is x or the output of another such node."""
    pure_tensors = {x}
    pure: set[int] = set()
    candidates = sorted(g.descendants([x]))
    for i in candidates:  # graph order is topological
        node = g.nodes[i]
        if all(t in pure_tensors or g.is_constant(t) for t in g.reads[i]):
            pure.add(i)
            pure_tensors.update(o for o in node.output if o)
    return pure


def find_candidates(g: GraphIndex):
    """Yield Candidate or NearMiss for every top-k selection in the graph."""
    by_logits: dict[str, list[int]] = {}
    info = {}
    for i, node in enumerate(g.nodes):
        if node.op_type not in ("TopK", "ArgMax"):
            continue
        proj, out = _router_projection(g, node.input[0])
        if proj is None:
            yield NearMiss(node.name or f"{node.op_type}#{i}",
                           "a top-k with no router projection (MatMul/Gemm by a constant "
                           "matrix) upstream: not an MoE router", blocking=False)
            continue
        logits = _logits_after_bias(g, out)
        by_logits.setdefault(logits, []).append(i)
        info[logits] = proj
    inputs = {logits: _walk_up_shape_ops(g, info[logits].input[0]) for logits in by_logits}
    for logits, anchors in by_logits.items():
        proj = info[logits]
        anchor = max(anchors)  # group-limited routing has earlier top-ks on the same logits
        x = inputs[logits]
        w = proj.input[1]
        wshape = g.shapes.get(w)
        trans_b = any(a.name == "transB" and a.i for a in proj.attribute)
        if wshape is None:
            continue
        experts, d_in = (wshape[0], wshape[1]) if trans_b else (wshape[1], wshape[0])
        cand = Candidate(anchor=anchor, x=x, logits=logits, experts=int(experts),
                         hidden=int(d_in), router_weight=w,
                         name=_block_name(g, anchor, w))
        cand.routing_nodes = g.ancestors([g.nodes[anchor].input[0]], stop=[logits]) | set(anchors)
        pure = _pure_nodes(g, x)
        downstream = g.descendants(g.nodes[anchor].output)
        # A block ends before the next one starts: nothing that reads another block's input.
        for other_x in set(inputs.values()) - {x}:
            if g.producer.get(other_x) in downstream:
                downstream -= g.descendants([other_x])
        ends = []
        for i in sorted(pure & downstream, reverse=True):
            node = g.nodes[i]
            for out in node.output:
                shape = g.shapes.get(out)
                if shape is not None and shape and shape[-1] not in (None, cand.hidden) \
                        and isinstance(shape[-1], int):
                    continue
                if shape is not None and len(shape) not in (2, 3):
                    continue
                ends.append(out)
            if len(ends) >= MAX_END_CANDIDATES:
                break
        if not ends:
            yield NearMiss(cand.name, "no tensor downstream of the router's top-k is a function "
                                      "of the block input alone")
            continue
        cand.ends = ends
        yield cand


def _block_name(g: GraphIndex, anchor: int, router_weight: str) -> str:
    """A readable name for a block: its router weight's module path when the exporter kept it
    (model.layers.3.mlp.gate.weight -> model.layers.3.mlp), else the anchor node's scope."""
    parts = router_weight.split(".")
    if len(parts) > 2 and parts[-1] in ("weight", "bias"):
        return ".".join(parts[:-2])
    name = g.nodes[anchor].name
    if name and "/" in name:
        parts = name.strip("/").split("/")
        return "/".join(parts[:-2] or parts[:-1]) or name
    return name or f"topk#{anchor}"
