"""Expert weights that are not stacked: per-expert matrices, rank-1 rows, and traced loops.

transformers 5 stores a block's experts as stacked ``[E, ., .]`` tensors, which lift.py reads
directly. Much code in the wild keeps one ``nn.Linear`` per expert (a ``ModuleList``): the
exported graph then holds 2E or 3E separate rank-2 initializers, one MatMul/Gemm each. This
module turns those into stacked readings that lift.py can test like any other:

1. Tie each routed matrix to its expert. Constant expert indices appear where the routing
   reaches an expert: ``Equal(ids, e)`` (sparse loops), ``Gather``/``Slice`` of column e of a
   routing mask (one-hot or dense-weight loops), output e of a ``Split`` of the mask. A matrix
   belongs to expert e when its product depends on e's indicator (the expert's tokens were
   selected through it), or else when its product first meets e's indicator downstream (the
   mask multiplies the expert's output).
2. When nothing in the graph names an expert (e.g. all experts run and a ``gather`` picks the
   k outputs), take the matrices in program order, expert by expert (or projection by
   projection), as the exporters emit a Python loop over a ``ModuleList`` in order.
3. Within an expert, matrices keep program order; position j of every expert stacks to one
   ``[E, out, in]`` input (torch Linear layout, whatever the storage: a MatMul's ``[in, out]``
   weight is transposed). Per-expert biases (a Gemm's C or the Add after a MatMul) stack to
   ``[E, out]``.

Rank-1 "flash expert" layers (one down and one up vector per expert, ``[E, D]`` each, gathered
by the selected ids) are read as intermediate size 1: w1 ``[E, 1, D]``, w2 ``[E, D, 1]``.

Matrices left untied (a shared expert, its gate) stay for lift.py's shared-expert reading.
Stacked readings are never reused in place: the rewrite writes one new initializer per stack.

The same dataflow also shows things the converter must refuse rather than convert, whatever
its probes say: a loop the TorchScript tracer unrolled for the experts its trace input hit
(per-expert constants for only some experts, or stacked weights picked by a fixed number of
scalar ids), an expert whose tokens the tracer reshaped to the count its trace input routed
to it (one row, after a single-token trace), an expert capacity (tokens ranked in their
expert's queue by a CumSum of the routing mask and dropped past a limit) and expert-choice
routing (the top-k runs over tokens), neither of which MoEFFN has. :func:`block_refusal` names
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .graph import GraphIndex

# ---------------------------------------------------------------------------------------------
# stacked constants


@dataclass(eq=False)
class StackedConst:
    """Several constants read as one stacked MoEFFN input; duck-types lift.ConstRef.

    ``parts`` are ConstRefs (one per expert), each transposed first when ``transpose[i]`` (or
    flattened, with ``flat``: per-expert biases stored [n], [1, n] or [n, 1]); the result is
    ``np.stack(parts)``, then reshaped to ``reshape`` if given (a single part is not stacked, only
    reshaped: the rank-1 reading). ``initializer`` is None: a stack is never reused in place.
    """

    parts: list
    transpose: list
    reshape: Optional[tuple] = None
    label: str = ""
    flat: bool = False
    _value: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def tensor(self) -> str:
        return self.label or f"stack({', '.join(p.tensor for p in self.parts)})"

    @property
    def first_use(self) -> int:
        return min(p.first_use for p in self.parts)

    @property
    def consumer(self):
        return self.parts[0].consumer

    @property
    def initializer(self) -> None:
        return None

    @property
    def shape(self) -> tuple:
        if self.reshape is not None:
            return tuple(self.reshape)
        one = tuple(self.parts[0].shape)
        if self.flat:
            return (len(self.parts), int(np.prod(one)))
        if self.transpose[0]:
            one = one[:-2] + (one[-1], one[-2])
        return (len(self.parts),) + one

    def release(self) -> None:
        self._value = None
        for p in self.parts:
            p.release()

    def value(self) -> np.ndarray:
        if self._value is None:
            arrays = []
            for p, t in zip(self.parts, self.transpose):
                a = p.value()
                arrays.append(a.reshape(-1) if self.flat else np.swapaxes(a, -1, -2) if t else a)
            out = arrays[0] if len(arrays) == 1 and self.reshape is not None else np.stack(arrays)
            if self.reshape is not None:
                out = out.reshape(self.reshape)
            self._value = np.ascontiguousarray(out)
        return self._value


@dataclass
class ListReading:
    """One reading of per-expert constants: stacks (program order) and stacked biases."""

    stacks: list            # StackedConst [E, out, in], 2 or 3 of them
    biases: list            # StackedConst [E, out]
    used: set               # tensor names of the constants consumed by this reading
    how: str                # "tied", "order (by expert)", "order (by projection)", "rank-1"


# ---------------------------------------------------------------------------------------------
# the block's matrices


@dataclass
class _Matrix:
    ref: object             # lift.ConstRef
    node: int               # index of the MatMul/Gemm using it
    transpose: bool         # stored [in, out]: transpose to torch's [out, in]
    out_in: tuple           # (out, in)
    bias: object = None     # ConstRef of its bias, if any
    expert: Optional[int] = None


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == a.INT else a
    return default


def _matrices(g: GraphIndex, refs, skip_nodes) -> list[_Matrix]:
    """Rank-2 constants used as the weight (B) of a MatMul/Gemm outside the routing."""
    out = []
    for r in refs:
        shape = tuple(r.shape)
        node = r.consumer
        if len(shape) != 2 or r.first_use in skip_nodes:
            continue
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 \
                or node.input[1] != r.tensor or g.is_constant(node.input[0]):
            continue
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            continue
        stored_out_in = node.op_type == "Gemm" and bool(_attr(node, "transB", 0))
        out_in = shape if stored_out_in else (shape[1], shape[0])
        out.append(_Matrix(r, r.first_use, not stored_out_in, out_in))
    by_tensor = {r.tensor: r for r in refs}
    for m in out:
        node = g.nodes[m.node]
        bias = None
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in by_tensor:
            bias = by_tensor[node.input[2]]
        elif node.op_type == "MatMul":
            users = g.users(node.output[0])
            if len(users) == 1 and users[0].op_type == "Add":
                other = [t for t in users[0].input if t != node.output[0]]
                if other and other[0] in by_tensor:
                    bias = by_tensor[other[0]]
        if bias is not None and int(np.prod(bias.shape)) == m.out_in[0] and \
                len([d for d in bias.shape if d != 1]) <= 1:
            m.bias = bias
    return out


# ---------------------------------------------------------------------------------------------
# expert indicators: where a constant expert index meets the routing


def _scalar_int(g: GraphIndex, t: str) -> Optional[int]:
    v = g.constant_value(t) if g.is_constant(t) else None
    if v is None or v.size != 1 or not np.issubdtype(np.asarray(v).dtype, np.integer):
        return None
    return int(np.asarray(v).reshape(-1)[0])


def _downstream(g: GraphIndex, starts, region: set) -> set[int]:
    """Nodes of ``region`` that depend on the outputs of the ``starts`` nodes (not walking out
    of the region: in a whole model the rest of the network is downstream of everything)."""
    seen: set[int] = set()
    stack = [o for n in starts for o in g.nodes[n].output if o]
    while stack:
        t = stack.pop()
        for c in g.consumers.get(t, []):
            if c in region and c not in seen:
                seen.add(c)
                stack.extend(o for o in g.nodes[c].output if o)
    return seen


def _expert_axis(g: GraphIndex, t: str, axis: int, E: int) -> bool:
    """Can ``axis`` of tensor ``t`` be the expert axis (size E)? Unknown sizes may be, unless
    ``t`` is a shape vector (the Shape/Gather/Concat noise every exporter emits)."""
    shape = g.shapes.get(t)
    if shape is not None:
        if len(shape) < 2 or not -len(shape) <= axis < len(shape):
            return False
        d = shape[axis]
        return d == E or not isinstance(d, int) or d <= 0
    producer = g.node_of(t)
    return producer is None or producer.op_type not in ("Shape", "Concat", "Size")


def indicators(g: GraphIndex, nodes, anchor: int, E: int) -> dict[int, list[int]]:
    """{expert index: [node indices]} of the nodes that pick one expert out of the routing."""
    region = set(nodes) | {anchor}
    routed_nodes = _downstream(g, [anchor], region)
    routed = {o for i in routed_nodes for o in g.nodes[i].output} | set(g.nodes[anchor].output)
    found: dict[int, list[int]] = {}
    for i in sorted(routed_nodes):
        node = g.nodes[i]
        e = None
        if node.op_type == "Equal":
            a, b = node.input[0], node.input[1]
            if a in routed and b not in routed:
                e = _scalar_int(g, b)
            elif b in routed and a not in routed:
                e = _scalar_int(g, a)
        elif node.op_type == "Gather" and node.input[0] in routed:
            e = _scalar_int(g, node.input[1])
            if e is not None and not _expert_axis(g, node.input[0], _attr(node, "axis", 0), E):
                e = None
        elif node.op_type == "Slice" and node.input[0] in routed and len(node.input) >= 3:
            start, end = _scalar_int(g, node.input[1]), _scalar_int(g, node.input[2])
            axis = _scalar_int(g, node.input[3]) if len(node.input) > 3 and node.input[3] else 0
            if start is not None and end is not None and end - start == 1 and start >= 0 \
                    and axis is not None and _expert_axis(g, node.input[0], axis, E):
                e = start
        elif node.op_type == "Split" and node.input[0] in routed and len(node.output) == E \
                and _expert_axis(g, node.input[0], _attr(node, "axis", 0), E):
            for j, out in enumerate(node.output):
                for c in g.consumers.get(out, []):
                    if c in region:
                        found.setdefault(j, []).append(c)
            continue
        if e is not None and 0 <= e < E:
            found.setdefault(e, []).append(i)
    return found


def _tie(g: GraphIndex, mats: list[_Matrix], inds: dict[int, list[int]], nodes) -> None:
    """Assign ``expert`` to each matrix from the indicators (None where it is unclear)."""
    region = set(nodes)
    reach = {}
    for e, ns in inds.items():
        reach[e] = _downstream(g, ns, region) | set(ns)
    for m in mats:
        up = [e for e, s in reach.items() if m.node in s]
        if len(up) == 1:
            m.expert = up[0]
            continue
        if up:
            continue
        down = _downstream(g, [m.node], region)
        meets = {e: min(s & down) for e, s in reach.items() if s & down}
        if not meets:
            continue
        first = min(meets.values())
        best = [e for e, v in meets.items() if v == first]
        if len(best) == 1:
            m.expert = best[0]


# ---------------------------------------------------------------------------------------------
# readings


def _stack(mats: list[_Matrix], label: str) -> Optional[StackedConst]:
    shapes = {m.out_in for m in mats}
    if len(shapes) != 1:
        return None
    return StackedConst([m.ref for m in mats], [m.transpose for m in mats], label=label)


def _reading(groups: list[list[_Matrix]], how: str) -> Optional[ListReading]:
    """groups[e] = expert e's matrices in program order -> stacks by position."""
    counts = {len(grp) for grp in groups}
    if len(counts) != 1 or counts.pop() not in (2, 3):
        return None
    stacks, biases, used = [], [], set()
    for j in range(len(groups[0])):
        col = [grp[j] for grp in groups]
        s = _stack(col, f"experts[*].proj{j}")
        if s is None:
            return None
        stacks.append(s)
        if all(m.bias is not None for m in col):
            biases.append(StackedConst([m.bias for m in col], [False] * len(col),
                                       label=f"experts[*].proj{j}.bias", flat=True))
            used |= {m.bias.tensor for m in col}
        used |= {m.ref.tensor for m in col}
    return ListReading(stacks, biases, used, how)


def _with_swapped_gate_up(r: ListReading) -> list[ListReading]:
    """lift.py pairs biases with projections by width and tries gate/up in both orders with the
    biases in place; with per-projection biases, also offer the two first projections swapped
    (up computed before gate), biases swapped along."""
    if len(r.stacks) != 3 or len(r.biases) < 2 or r.stacks[0].shape != r.stacks[1].shape:
        return [r]
    s, b = r.stacks, r.biases
    by_label = {x.label: x for x in b}
    b0, b1 = by_label.get("experts[*].proj0.bias"), by_label.get("experts[*].proj1.bias")
    if b0 is None or b1 is None:
        return [r]
    swapped_b = [b1 if x is b0 else b0 if x is b1 else x for x in b]
    return [r, ListReading([s[1], s[0], s[2]], swapped_b, r.used, r.how + ", up first")]


def _order_readings(mats: list[_Matrix], E: int) -> list[ListReading]:
    out = []
    n = len(mats)
    for m in (3, 2):
        if n < m * E:
            continue
        for s in dict.fromkeys((0, n - m * E)):
            window = mats[s:s + m * E]
            by_expert = [window[e * m:(e + 1) * m] for e in range(E)]
            r = _reading(by_expert, "order (by expert)")
            if r is not None:
                out.append(r)
            by_proj = [[window[j * E + e] for j in range(m)] for e in range(E)]
            r = _reading(by_proj, "order (by projection)")
            if r is not None:
                out.append(r)
    return out


def _rank1_readings(refs, E: int, D: int) -> list[ListReading]:
    rows = [r for r in refs if tuple(r.shape) == (E, D) and E != D
            and r.consumer.op_type in ("Gather", "GatherND") and r.consumer.input[0] == r.tensor]
    if len(rows) != 2:
        return []
    out = []
    for a, b in (rows, rows[::-1]):
        w1 = StackedConst([a], [False], reshape=(E, 1, D), label=f"{a.tensor} as [E, 1, D]")
        w2 = StackedConst([b], [False], reshape=(E, D, 1), label=f"{b.tensor} as [E, D, 1]")
        out.append(ListReading([w1, w2], [], {a.tensor, b.tensor}, "rank-1"))
    return out


def readings(g: GraphIndex, refs, E: int, D: int, nodes, anchor: int,
             routing_nodes=()) -> list[ListReading]:
    """Stacked readings of a block whose experts are not stored as [E, ., .] stacks.

    ``refs`` are the block's constants (lift.ConstRef, sorted by first use), ``nodes`` the
    block's node indices, ``anchor`` the router's top-k node. Best reading first; an empty list
    when the block has no per-expert weights. Raises nothing: refusals are
    :func:`block_refusal`'s.
    """
    mats = _matrices(g, refs, set(routing_nodes))
    out: list[ListReading] = []
    if len(mats) >= 2 * E:
        inds = indicators(g, nodes, anchor, E)
        _tie(g, mats, inds, nodes)
        tied = {}
        for m in mats:
            if m.expert is not None:
                tied.setdefault(m.expert, []).append(m)
        if sorted(tied) == list(range(E)):
            r = _reading([tied[e] for e in range(E)], "tied")
            if r is not None:
                out.append(r)
        out.extend(_order_readings(mats, E))
    out.extend(_rank1_readings(refs, E, D))
    return [v for r in out for v in _with_swapped_gate_up(r)]


# ---------------------------------------------------------------------------------------------
# refusals


RE_EXPORT = ("re-export in a static form (transformers: experts_implementation='batched_mm'; "
             "own code: a loop over all experts with a routing mask) or with the dynamo "
             "exporter (torch.onnx.export(..., dynamo=True))")


def _unrolled_loop(g: GraphIndex, refs, E: int, nodes, anchor: int) -> Optional[str]:
    """A data-dependent loop over experts that the tracer unrolled for its trace input."""
    region = set(nodes)
    # stacked weights picked by scalar ids, one Gather per loop iteration
    for r in refs:
        shape = tuple(r.shape)
        if len(shape) != 3 or shape[0] != E:
            continue
        const_ids, dynamic = set(), 0
        other = False
        for c in g.consumers.get(r.tensor, []):
            if c not in region:
                continue
            node = g.nodes[c]
            if node.op_type != "Gather" or node.input[0] != r.tensor or _attr(node, "axis", 0):
                other = True
                continue
            e = _scalar_int(g, node.input[1])
            ishape = g.shapes.get(node.input[1])
            if e is not None:
                const_ids.add(e % E)
            elif ishape is not None and len(ishape) == 0:
                dynamic += 1
            else:
                other = True
        if other:
            continue
        if dynamic:
            only = (f"only {dynamic} expert slot{'s' if dynamic > 1 else ''} of E={E} survive "
                    f"in this graph: " if dynamic < E else "")
            single = (" (a trace with a single token keeps only the k experts it hit)"
                      if dynamic < E else "")
            return (f"{only}the TorchScript tracer unrolled a data-dependent expert loop for "
                    f"its trace input, one iteration per expert that input hit: {r.tensor} is "
                    f"indexed by {dynamic} scalar expert id{'s' if dynamic > 1 else ''} "
                    f"computed at run time, so the graph runs only on inputs that hit exactly "
                    f"{dynamic} of the {E} experts{single}; {RE_EXPORT}")
        if const_ids and const_ids != set(range(E)):
            return _subset_reason(sorted(const_ids), E, r.tensor)
    # per-expert matrices for only some experts (not a question for stacked experts, whose
    # 2-D matrices are a shared expert)
    if any(len(r.shape) == 3 and r.shape[0] == E for r in refs):
        return None
    mats = _matrices(g, refs, set())
    if len(mats) < 2:
        return None
    inds = indicators(g, nodes, anchor, E)
    if not inds or set(inds) >= set(range(E)):
        return None
    _tie(g, mats, inds, nodes)
    tied: dict[int, list] = {}
    for m in mats:
        if m.expert is not None:
            tied.setdefault(m.expert, []).append(m)
    untied = [m for m in mats if m.expert is None]
    sizes = {len(v) for v in tied.values()}
    if not tied or len(sizes) != 1:
        return None
    per = sizes.pop()
    missing = E - len(tied)
    if per in (2, 3) and missing > 0 and len(untied) < per * missing:
        return _subset_reason(sorted(tied), E, None)
    return None


_SHAPE_OPS = {"Shape", "Size"}


def _fixed_row_count(g: GraphIndex, nodes, anchor: int) -> Optional[str]:
    """An expert's tokens, picked at run time (NonZero of its routing mask), reshaped to a
    constant shape: the TorchScript tracer turns an expert that got exactly one token while
    tracing (every expert hit by a single-token trace) into a one-row Reshape, and the graph
    then fails on any input that routes another number of tokens to that expert."""
    region = set(nodes)
    routed = _downstream(g, [anchor], region)
    frontier = [i for i in sorted(routed) if g.nodes[i].op_type == "NonZero"]
    seen = set(frontier)
    while frontier:  # the picked tokens' data, not the shape bookkeeping on their count
        i = frontier.pop()
        for out in g.nodes[i].output:
            for c in g.consumers.get(out, []):
                if c in region and c not in seen and g.nodes[c].op_type not in _SHAPE_OPS:
                    seen.add(c)
                    frontier.append(c)
    for i in sorted(seen):
        node = g.nodes[i]
        if node.op_type != "Reshape" or not g.is_constant(node.input[1]):
            continue
        shape = g.constant_value(node.input[1])
        if shape is None or not shape.size or np.any(np.asarray(shape) <= 0):
            continue
        fixed = "[" + ", ".join(str(int(d)) for d in np.asarray(shape).reshape(-1)) + "]"
        return (f"the TorchScript tracer fixed the token count of an expert to its trace "
                f"input's: the tokens routed to an expert are picked at run time (NonZero), "
                f"but {node.name or node.output[0]} reshapes them to the constant shape "
                f"{fixed}, which is what that expert got while tracing (a trace with a single "
                f"token does this to the expert it hit), so the graph fails on any input that "
                f"routes another number of tokens to it; {RE_EXPORT}")
    return None


def _subset_reason(experts: list, E: int, tensor: Optional[str]) -> str:
    where = f" (constant indices into {tensor})" if tensor else ""
    return (f"only experts {experts} of E={E} survive in this graph{where}: the TorchScript "
            f"tracer unrolled a data-dependent expert loop for its trace input and kept only "
            f"the experts that input hit (with a single-token trace, that token's k experts), "
            f"so the graph silently ignores the others; {RE_EXPORT}")


_COMPARE = {"Less": "<", "LessOrEqual": "<=", "Greater": ">", "GreaterOrEqual": ">="}
_PASS = {"Mul", "Cast", "Sub", "Add", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Gather",
         "GatherElements", "Transpose", "Slice"}


def _capacity(g: GraphIndex, nodes, anchor: int) -> Optional[str]:
    """A CumSum of routing-derived data compared with a limit: tokens dropped past capacity."""
    region = set(nodes)
    routed = _downstream(g, [anchor], region)
    for i in sorted(routed):
        node = g.nodes[i]
        if node.op_type != "CumSum":
            continue
        frontier, seen = [node.output[0]], set()
        for _ in range(4):
            nxt = []
            for t in frontier:
                for c in g.consumers.get(t, []):
                    if c in seen or c not in region:
                        continue
                    seen.add(c)
                    user = g.nodes[c]
                    if user.op_type in _COMPARE:
                        limit = [x for x in user.input if x != t]
                        value = None
                        if limit and g.is_constant(limit[0]):
                            v = g.constant_value(limit[0])
                            if v is not None and v.size == 1:
                                value = float(np.asarray(v, dtype=np.float64).reshape(-1)[0])
                        cap = (f"the constant capacity {value:g}" if value is not None
                               else "a capacity computed from the token count")
                        return (f"expert capacity: tokens are ranked in their expert's queue by a "
                                f"CumSum of the routing mask ({node.name or node.output[0]}) and "
                                f"those past {cap} are dropped ({user.op_type}); MoEFFN has no "
                                f"expert capacity (every token reaches its k experts), so this "
                                f"block is left unconverted")
                    if user.op_type in _PASS:
                        nxt.extend(o for o in user.output if o)
            frontier = nxt
    return None


def _expert_choice(g: GraphIndex, anchor: int) -> Optional[str]:
    """A top-k over the token axis of the scores: each expert picks its tokens."""
    node = g.nodes[anchor]
    axis = _attr(node, "axis", -1 if node.op_type == "TopK" else 0)
    shape = g.shapes.get(node.input[0])
    if shape is None or not shape or not -len(shape) <= axis < len(shape):
        return None
    if axis % len(shape) == len(shape) - 1:
        return None
    return (f"expert-choice routing: the router's {node.op_type} ({node.name or node.output[0]}) "
            f"selects along axis {axis} of the scores {_fmt_shape(shape)}, not along the experts "
            f"axis, so each expert picks its tokens (a capacity per expert) instead of each token "
            f"picking k experts; MoEFFN routes tokens to experts, so this block is left "
            f"unconverted")


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in shape) + "]"


def block_refusal(g: GraphIndex, refs, E: int, nodes, anchor: int) -> Optional[str]:
    """Why this block must not be converted whatever its probes say, or None."""
    return (_expert_choice(g, anchor) or _capacity(g, nodes, anchor)
            or _unrolled_loop(g, refs, E, nodes, anchor) or _fixed_row_count(g, nodes, anchor))
