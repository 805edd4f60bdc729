"""Lifting a candidate block to MoEFFN: hypotheses from the block's constants, proof by execution.

The block's constants say which tensors can be expert weights (rank-3 stacks whose first dim is
E), biases ([E, n]), a selection bias ([E] or [1, E] on the routing path), a shared expert (matrices
multiplied with X outside the routing), and scalars (clamp limits, alpha, scaling factors). The
ops on the path from the logits to the top-k and in the experts narrow the routing mode and the
activation. Every consistent reading is a hypothesis; the block itself is run in onnxruntime on
random inputs and the first hypothesis whose reference output matches is the lifted node.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import onnx
from onnx import helper

from ..reference import moeffn
from ..spec import MoEFFNAttrs, MoEFFNError, validate_arrays
from . import expert_lists
from .graph import GraphIndex, np_dtype, swapped_last_axes, to_array
from .region import Candidate


@dataclass
class ConstRef:
    """A constant the block reads: its graph tensor and, when it is one, the initializer."""

    tensor: str
    first_use: int
    consumer: onnx.NodeProto
    g: GraphIndex = field(repr=False)
    _value: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def shape(self):
        return tuple(self.g.shapes.get(self.tensor) or self.value().shape)

    @property
    def initializer(self) -> Optional[str]:
        return self.tensor if self.tensor in self.g.initializers else None

    def release(self) -> None:
        self._value = None

    def value(self) -> np.ndarray:
        if self._value is None:
            if self.tensor in self.g.initializers:
                self._value = self.g.read_initializer(self.tensor)
            else:
                self._value = evaluate_constant(self.g, self.tensor)
        return self._value


@dataclass
class Operand:
    """One MoEFFN input in a hypothesis: a constant, transposed (last two axes) or not."""

    ref: ConstRef
    swap: bool = False
    reshape: Optional[tuple] = None

    def array(self) -> np.ndarray:
        a = self.ref.value()
        if self.swap:
            a = swapped_last_axes(a)
        if self.reshape is not None:
            a = a.reshape(self.reshape)
        return np.ascontiguousarray(a)

    @property
    def reused(self) -> bool:
        return self.ref.initializer is not None and not self.swap and self.reshape is None


@dataclass
class Hypothesis:
    attrs: MoEFFNAttrs
    operands: dict  # input name -> Operand


def evaluate_constant(g: GraphIndex, tensor: str) -> np.ndarray:
    """Value of a tensor computed from constants only (e.g. Transpose of an initializer)."""
    from onnx.reference import ReferenceEvaluator

    nodes = sorted(g.ancestors([tensor]))
    needed = {i for n in nodes for i in g.reads[n] if i in g.initializers}
    inits = [_loaded(g, name) for name in sorted(needed)]
    graph = helper.make_graph([g.nodes[i] for i in nodes], "const", [],
                              [helper.make_tensor_value_info(tensor, 0, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=g.model.opset_import,
                              ir_version=g.model.ir_version)
    return ReferenceEvaluator(model).run(None, {})[0]


def _loaded(g: GraphIndex, name: str) -> onnx.TensorProto:
    init = g.initializers[name]
    if init.data_location == onnx.TensorProto.EXTERNAL:
        from .graph import _load_external

        return _load_external(init, g.base_dir)
    return init


# ---------------------------------------------------------------------------------------------
# the block's region and its constants


def region_nodes(g: GraphIndex, cand: Candidate, end: str) -> list[int]:
    """Nodes computing ``end`` from the block input, minus the router projection."""
    block = g.ancestors([end], stop=[cand.x])
    router = g.ancestors([cand.logits], stop=[cand.x])
    return sorted(block - router)


def block_constants(g: GraphIndex, nodes: list[int]) -> list[ConstRef]:
    refs: dict[str, ConstRef] = {}
    for i in nodes:
        node = g.nodes[i]
        if all(g.is_constant(t) for t in node.input):
            continue  # part of a constant computation: its result is what the block reads
        for t in node.input:
            if t and t not in refs and g.is_constant(t):
                refs[t] = ConstRef(t, i, node, g)
    return sorted(refs.values(), key=lambda r: r.first_use)


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"


def _finite_float(v) -> Optional[float]:
    """A one-element float constant's value (as float32), or None: not such a constant or not finite."""
    a = np.asarray(v)
    if a.size != 1 or not _is_float(a):
        return None
    f = float(a.astype(np.float32).reshape(-1)[0])
    return f if math.isfinite(f) else None


def _scalars(refs: list[ConstRef]) -> list[float]:
    out = []
    for r in refs:
        if int(np.prod(r.shape, dtype=np.int64)) == 1:
            f = _finite_float(r.value())
            if f is not None and f not in out:
                out.append(f)
    return out


def _ops(g: GraphIndex, nodes) -> set[str]:
    return {g.nodes[i].op_type for i in nodes}


# ---------------------------------------------------------------------------------------------
# hypotheses


def hypotheses(g: GraphIndex, cand: Candidate, nodes: list[int]) -> Iterator[Hypothesis]:
    E, D = cand.experts, cand.hidden
    refs = block_constants(g, nodes)
    routing_set = cand.routing_nodes
    expert_nodes = [i for i in nodes if i not in routing_set]
    ops_routing = _ops(g, routing_set)
    ops_experts = _ops(g, expert_nodes)
    scalars = _scalars(refs)

    def weights_of(n):
        """The stacks [n, ., .], biases [n, .] and shared-expert matrices of n stacked experts."""
        stacks = [r for r in refs if len(r.shape) == 3 and r.shape[0] == n]
        biases = [r for r in refs if len(r.shape) == 2 and r.shape[0] == n]
        shared = [r for r in refs if len(r.shape) == 2 and r not in biases
                  and r.consumer.op_type in ("MatMul", "Gemm") and r.first_use not in routing_set
                  and _is_b_operand(r)]
        return stacks, biases, shared

    stacks, biases, shared_mats = weights_of(E)
    # a selection bias: a float [E] (or [1, E]: TorchScript's Ernie-4.5) on the routing path, [E] first
    sel_bias = sorted((r for r in refs if r.shape in ((E,), (1, E)) and r.first_use in routing_set
                       and _is_float(r.value())), key=lambda r: len(r.shape))

    refusal = precheck(g, cand)
    if refusal:
        raise Refusal(refusal)
    readings = [(stacks, biases, shared_mats)]
    if len(stacks) < 2:  # per-expert matrices or rank-1 rows, stacked (expert_lists.py)
        lists = expert_lists.readings(g, refs, E, D, nodes, cand.anchor, routing_set)
        if lists:
            readings = [(r.stacks, [b for b in biases if b.tensor not in r.used] + r.biases,
                         [m for m in shared_mats if m.tensor not in r.used]) for r in lists]
            stacks = lists[0].stacks
    zero_experts = 0
    fewer = _zero_expert_stacks(refs, E) if len(stacks) not in (2, 3) else []
    if fewer:  # LongCat-Flash: the router ranks zero experts after the E' < E stacked ones
        zero_experts = E - fewer[0].shape[0]
        readings = [weights_of(E - zero_experts)]
        stacks = readings[0][0]
    if len(stacks) not in (2, 3):
        raise Refusal(f"expected 2 or 3 stacked expert weight tensors [E={E}, ., .] in the "
                      f"block, found {len(stacks)}" +
                      (f": {', '.join(f'{r.tensor} {list(r.shape)}' for r in stacks)}" if stacks
                       else "") + ", and no per-expert weight matrices for all E experts")

    k = _topk_k(g, cand)
    routings = list(_routing_options(g, cand, ops_routing, scalars, sel_bias,
                                     _greater_thresholds(g, nodes)))
    experts_shared = [(e, s) for st, bi, sm in readings
                      for e in _expert_options(st, bi, ops_experts, scalars, D)
                      for s in _shared_options(sm, D)]
    for (r_attrs, r_ops), ((e_attrs, e_ops), (s_layout, s_ops)), woi in itertools.product(
            routings, experts_shared, (0, 1)):
        if woi and k != 1 and r_attrs.get("routing") != "sigmoid_topk":
            continue
        attrs = MoEFFNAttrs(**{"k": k, **r_attrs}, weight_on_input=woi, zero_experts=zero_experts,
                            **e_attrs)
        operands = {**r_ops, **e_ops}
        for name, (ref, orient) in s_ops.items():
            want = attrs.weight_layout
            if name == "shared_gate":
                operands[name] = Operand(ref, reshape=(D,))
            else:
                operands[name] = Operand(ref, swap=(orient != want))
        yield Hypothesis(attrs, operands)


class Refusal(Exception):
    """A candidate the lifter cannot read; the message is the near-miss reason."""


def precheck(g: GraphIndex, cand: Candidate) -> Optional[str]:
    """Why a candidate must be refused before it is even run, or None: an expert loop the
    tracer unrolled or fixed to its trace input's token count (its graph may not run on the
    probes at all), an expert capacity, or expert-choice routing (see
    expert_lists.block_refusal)."""
    if not cand.ends:
        return None
    nodes = region_nodes(g, cand, cand.ends[0])
    return expert_lists.block_refusal(g, block_constants(g, nodes), cand.experts, nodes,
                                      cand.anchor)


def _zero_expert_stacks(refs: list[ConstRef], E: int) -> list[ConstRef]:
    """Stacked expert weights of fewer experts than the router ranks (LongCat-Flash's zero experts,
    ranked after them, return their input): the 2 or 3 rank-3 constants that share a leading dim
    below E, when exactly one such dim has them; else none."""
    by_dim: dict[int, list[ConstRef]] = {}
    for r in refs:
        if len(r.shape) == 3 and 1 <= r.shape[0] < E:
            by_dim.setdefault(r.shape[0], []).append(r)
    found = [v for v in by_dim.values() if len(v) in (2, 3)]
    return found[0] if len(found) == 1 else []


def _is_b_operand(r: ConstRef) -> bool:
    return len(r.consumer.input) > 1 and r.consumer.input[1] == r.tensor


def _orientation(r: ConstRef) -> str:
    """How a 2-D weight is stored relative to its product: in_out for x @ W."""
    node = r.consumer
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        return "out_in"
    return "in_out"


def _topk_k(g: GraphIndex, cand: Candidate) -> int:
    node = g.nodes[cand.anchor]
    if node.op_type == "ArgMax":
        return 1
    k = g.constant_value(node.input[1])
    if k is None:
        raise Refusal("the router's top-k has a K that is not a constant")
    return int(np.asarray(k).reshape(-1)[0])


# Ops that carry the logits unchanged in form (a TorchScript export keeps e.g. GraniteMoE's
# float32 -> float32 Cast of the router's logits before its TopK): no evidence for either routing.
_ROUTING_NEUTRAL_OPS = {"Cast", "Identity"}


def _greater_thresholds(g: GraphIndex, nodes) -> list[float]:
    """The constant scalars that the block's Greater nodes compare against (sparsemixer's 2 eps:
    runs on random probes cannot tell thresholds apart, so it is read off the graph)."""
    out = []
    for i in nodes:
        node = g.nodes[i]
        if node.op_type != "Greater" or len(node.input) < 2:
            continue
        v = g.constant_value(node.input[1])
        f = None if v is None else _finite_float(v)
        if f is not None and f >= 0 and f not in out:
            out.append(f)
    return out


def _routing_options(g, cand, ops, scalars, sel_bias, thresholds=()):
    """Routing readings, most likely first. The scaling factor is fitted later."""
    E = cand.experts
    ops = ops - _ROUTING_NEUTRAL_OPS
    extra_topks = [i for i in cand.routing_nodes
                   if g.nodes[i].op_type == "TopK" and i != cand.anchor]
    if sum(g.nodes[i].op_type == "ArgMax" for i in cand.routing_nodes) == 2:
        # two arg-maxes on the logits, the second over them with the first pick masked: PhiMoE's
        # sparsemixer, whose masks compare against 2 eps (a Greater's constant)
        for t in thresholds:
            yield dict(routing="sparsemixer", k=2, jitter_eps=t / 2), {}
    group_opts = _group_options(g, extra_topks, E, ops)
    if "Sigmoid" in ops or not ({"Softmax"} & ops):
        bias_opts = [{}]
        if sel_bias:  # the bias reading first; without it where the constant was something else
            bias_opts = [{"selection_bias": _selection_bias(sel_bias[0], E)}, {}]
        for norm in (1, 0):
            for gopt in group_opts:
                for bopt in bias_opts:
                    yield dict(routing="sigmoid_topk", normalize_topk=norm, **gopt), dict(bopt)
    if "Softmax" in ops or not ops - {"TopK"}:
        # a bias constant on the routing path: selection by probability + bias (Ernie-4.5)
        bias_opts = [{"selection_bias": _selection_bias(sel_bias[0], E)}, {}] if sel_bias else [{}]
        for gopt in group_opts:
            for bopt in bias_opts:
                yield dict(routing="softmax_topk", normalize_topk=1, **gopt), dict(bopt)
                yield dict(routing="softmax_topk", normalize_topk=0, **gopt), dict(bopt)
        yield dict(routing="topk_softmax"), {}


def _group_options(g, extra_topks, E, ops):
    """Group-limited readings: none without a second TopK on the routing path (the one that keeps
    groups); else every n_group dividing E with a topk_group among the TopKs' constant Ks, and
    last no groups (a second TopK may serve something else). A ReduceMax there reads first as
    groups scored by their best value (DeepSeek-V2)."""
    if not extra_topks:
        return [dict()]
    ks = sorted({int(np.asarray(g.constant_value(g.nodes[i].input[1])).reshape(-1)[0])
                 for i in extra_topks if g.constant_value(g.nodes[i].input[1]) is not None})
    scores = (["max"] if "ReduceMax" in ops else []) + ["top2_sum"]
    grouped = [dict(n_group=n_group, topk_group=topk_group, group_score=score)
               for score in scores for n_group in _divisors(E)[1:]
               for topk_group in ks if 1 <= topk_group <= n_group]
    return grouped + [dict()]


def _selection_bias(ref: ConstRef, experts: int) -> Operand:
    """The [E] selection bias, from a [E] or (TorchScript's Ernie-4.5 export) [1, E] constant."""
    return Operand(ref, reshape=None if ref.shape == (experts,) else (experts,))


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


_ACTIVATION_EVIDENCE = [("Sigmoid", "silu"), ("Erf", "gelu"), ("Tanh", "gelu_tanh"),
                        ("Relu", "relu"), ("Gelu", "gelu"), ("Gelu", "gelu_tanh"),
                        ("HardSigmoid", "silu")]


def _expert_options(stacks, biases, ops, scalars, D):
    activations = [a for op, a in _ACTIVATION_EVIDENCE if op in ops] + ["identity"]
    activations = list(dict.fromkeys(activations))
    if len(stacks) == 3:
        orders = [(stacks[0], stacks[1], stacks[2]), (stacks[1], stacks[0], stacks[2])]
    else:
        orders = [(stacks[0], None, stacks[1])]
    clamp_opts = [0.0]
    if {"Clip", "Min"} & ops:
        clamp_opts = [s for s in scalars if s > 0] + [0.0]
    alpha_opts = [1.0] + [s for s in scalars if s not in (1.0, 0.0) and s > 0]
    offset_opts = [0.0] + ([1.0] if 1.0 in scalars else [])
    for w1, w3, w2 in orders:
        for layout in ("out_in", "in_out"):
            n1_in, n1 = (w1.shape[2], w1.shape[1]) if layout == "out_in" else w1.shape[1:]
            inter = w2.shape[2] if layout == "out_in" else w2.shape[1]
            if n1_in != D:
                continue
            if w3 is not None:
                gate_opts = [(1, "separate")] if n1 == inter else []
            elif n1 == 2 * inter:
                gate_opts = [(1, "halves"), (1, "interleaved")]
            elif n1 == inter:
                gate_opts = [(0, "halves")]
            else:
                gate_opts = []
            for gated, gul in gate_opts:
                base = {"w1": Operand(w1), "w2": Operand(w2)}
                if w3 is not None:
                    base["w3"] = Operand(w3)
                for bias_ops in _bias_options(biases, n1, inter, D, w3 is not None):
                    for act in activations:
                        alphas = alpha_opts if act == "silu" else [1.0]
                        clamps = clamp_opts if gated else [0.0]
                        offsets = offset_opts if gated else [0.0]
                        for alpha, clamp, offset in itertools.product(alphas, clamps, offsets):
                            attrs = dict(activation=act, gated=gated, gate_up_layout=gul,
                                         weight_layout=layout, activation_alpha=alpha,
                                         clamp_limit=clamp, up_offset=offset)
                            yield attrs, {**base, **bias_ops}


def _bias_options(biases, n1, inter, D, separate):
    """The expert biases by width: b1 [E, N1], b2 [E, D] and, stored apart, b3 [E, I].
    When widths coincide, program order decides (b1 is read before b3, b3 before b2)."""
    if not biases:
        yield {}
        return
    left = list(biases)

    def take(width, last=False):
        matches = [b for b in left if b.shape[1] == width]
        if not matches:
            return None
        pick = matches[-1] if last else matches[0]
        left.remove(pick)
        return Operand(pick)

    ops = {"b1": take(n1), "b3": take(inter) if separate else None, "b2": take(D, last=True)}
    yield {k: v for k, v in ops.items() if v is not None}


def _shared_options(mats, D):
    """Readings of the shared-expert matrices: (layout-independent) operand options."""
    if not mats:
        yield None, {}
        return
    oriented = []
    for r in mats:
        orient = _orientation(r)
        n_in, n_out = r.shape if orient == "in_out" else r.shape[::-1]
        oriented.append((r, orient, n_in, n_out))
    gate = [o for o in oriented if o[2] == D and o[3] == 1]
    ups = [o for o in oriented if o[2] == D and o[3] != 1]
    downs = [o for o in oriented if o[3] == D and o[2] != D]
    if not downs:
        downs = [o for o in oriented if o[3] == D and o not in ups[:1]]
    if not ups or not downs:
        yield None, {}
        return
    down = downs[-1]
    base = {"shared_w2": (down[0], down[1])}
    if gate:
        base["shared_gate"] = (gate[0][0], gate[0][1])
    if len(ups) >= 2:
        for a, b in ((ups[0], ups[1]), (ups[1], ups[0])):
            yield "separate", {**base, "shared_w1": (a[0], a[1]), "shared_w3": (b[0], b[1])}
    else:
        yield "fused", {**base, "shared_w1": (ups[0][0], ups[0][1])}


# ---------------------------------------------------------------------------------------------
# proof by execution


@dataclass
class Probe:
    x: np.ndarray
    logits: np.ndarray
    y: np.ndarray


def tolerance(dtype) -> float:
    name = np.dtype(dtype).name
    return {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}.get(name, 1e-4)


def check(h: Hypothesis, probes: list[Probe], scale_options: list[float]) -> tuple[bool, str, Hypothesis]:
    """Does hypothesis h reproduce every probe? Fits routed_scaling_factor among scale_options."""
    arrays = {n: op.array() for n, op in h.operands.items()}
    attrs = h.attrs
    first = probes[0]
    try:
        validate_arrays(attrs, {"X": first.x, "router_logits": first.logits, **arrays})
    except MoEFFNError as exc:
        return False, f"inconsistent: {exc}", h
    worst = 0.0
    for scale in ([1.0] + [s for s in scale_options if s != 1.0]):
        trial = attrs.replace(routed_scaling_factor=scale)
        ok, worst = _matches(trial, arrays, probes)
        if ok:
            return True, f"max relative error {worst:.2e}", Hypothesis(trial, h.operands)
    return False, f"max relative error {worst:.2e}", h


def matches(h: Hypothesis, probes: list[Probe]) -> tuple[bool, float]:
    """Does h, its scaling factor as fitted, reproduce every probe? (ok, worst error)"""
    return _matches(h.attrs, {n: op.array() for n, op in h.operands.items()}, probes)


def _matches(attrs, arrays, probes):
    worst = 0.0
    for p in probes:
        ref = moeffn(attrs, p.x, p.logits, **arrays)
        y = p.y.reshape(ref.shape) if p.y.size == ref.size else None
        if y is None:
            return False, float("inf")
        ref32, y32 = ref.astype(np.float32), y.astype(np.float32)
        scale = float(np.max(np.abs(y32))) + 1e-30
        err = float(np.max(np.abs(ref32 - y32))) / scale if y32.size else 0.0
        if not np.isfinite(err):
            return False, float("inf")
        worst = max(worst, err)
        if err > tolerance(p.x.dtype):
            return False, worst
    return True, worst


def probe_shapes(x_shape, experts: int, hidden: int):
    """Token shapes to test: T = 1, T < E, T > E, and more than one batch row when dynamic."""
    x_shape = tuple(x_shape[:-1]) + (hidden,)
    dynamic = [i for i, d in enumerate(x_shape[:-1]) if not isinstance(d, int) or d <= 0]
    if not dynamic:
        return [tuple(x_shape)]
    out = []
    counts = [1, max(2, experts // 2 - 1), experts + 5]
    for n in counts:
        shape = list(x_shape)
        for j, i in enumerate(dynamic):
            shape[i] = n if j == len(dynamic) - 1 else 1
        out.append(tuple(shape))
    if len(dynamic) >= 2:
        shape = list(x_shape)
        for i in dynamic:
            shape[i] = 3
        out.append(tuple(shape))
    return out
