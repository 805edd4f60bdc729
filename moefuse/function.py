"""The portable fallback: MoEFFN as a model-local ONNX function of standard ops.

onnxruntime inlines a model-local function when no kernel is registered for its op, so a model
that carries this function runs in any onnxruntime; with the moefuse library loaded, the
registered kernel wins. The body is specialized for one node configuration (attributes and which
optional inputs are present): an ONNX function cannot branch on an attribute string or on the
absence of an input. Nodes of different configurations in one model get distinct function
overloads.

The body computes every expert densely on every token, in float32: X [T, D] against all of w1
at once ([E, T, N1]), the activation, a multiplication by the routing weights (zero for experts
not chosen) and one [T, E*I] x [E*I, D] product for the down projection and the combine. Weight
re-layouts (Transpose, Reshape, Cast of initializers) are constant-folded by onnxruntime at
session creation, so they cost nothing per call.

The body keeps to what every onnxruntime from 1.20 runs right (tests/test_fallback_parity.py on
the oldest): a tensor is cut into consecutive parts by Split, not by Slices (1.20 fuses such
Slices of one tensor into a Split, names every such fusion alike and refuses a model with two);
TopK and sums go through _topk and _sum_last, which hold for empty batches.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from .spec import DOMAIN, INPUT_NAMES, OP_TYPE, MoEFFNAttrs, attribute_names

MIN_OPSET = 18
_F = TensorProto.FLOAT
_ZERO = helper.make_tensor("zero", _F, [1], [0.0])
_ONE = helper.make_tensor("one", _F, [1], [1.0])
_NEG_INF = helper.make_tensor("neg_inf", _F, [1], [-np.inf])


class Body:
    """A tiny SSA builder for function bodies (and, with a prefix, for graph snippets)."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self._n = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        names = [f"{self.prefix}_{op_type.lower()}{self._n}_{i}" for i in range(outputs)]
        self._n += 1
        node_name = f"{self.prefix}{op_type}_{self._n}" if self.prefix else None
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=node_name, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = f"{self.prefix}_const{self._n}"
        self._n += 1
        self.nodes.append(helper.make_node(
            "Constant", [], [name], value=onnx.numpy_helper.from_array(arr, name)))
        return name

    def ints(self, *values) -> str:
        return self.const(list(values), np.int64)


def config_key(attrs: MoEFFNAttrs, present: Iterable[str]) -> str:
    """A stable id of a node configuration: what the function body depends on."""
    text = repr(sorted(attrs.to_onnx().items())) + "|" + ",".join(
        n for n in INPUT_NAMES if n in set(present))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def build_function(attrs: MoEFFNAttrs, present: Iterable[str], opset: int = MIN_OPSET,
                   overload: str = "") -> onnx.FunctionProto:
    """The MoEFFN function for one configuration. ``present`` names the inputs the node sets."""
    if opset < MIN_OPSET:
        raise ValueError(f"the MoEFFN fallback function needs opset >= {MIN_OPSET}, got {opset}")
    present = set(present)
    b = Body()
    op = b.op
    in_out = attrs.weight_layout == "in_out"

    def f32(name):
        return op("Cast", name, to=_F)

    def proj3(name):  # stored [E, a, b] -> float32 [E, in, out]
        w = f32(name)
        return w if in_out else op("Transpose", w, perm=[0, 2, 1])

    def glu(h, up):
        return expert_activation(b, attrs, h, up)

    # ---- tokens as rows ----
    x = op("Flatten", f32("X"), axis=-1)                     # [T, D]

    # ---- routing: dense weights R [T, E] (zero where not chosen) ----
    k = b.ints(attrs.k)
    if attrs.routing == "precomputed":
        ids = op("Flatten", op("Cast", "topk_ids", to=TensorProto.INT64), axis=-1)   # [T, k]
        vals = op("Flatten", f32("topk_weights"), axis=-1)
        ranked = op("Shape", "w1", start=0, end=1)
        if attrs.zero_experts:
            ranked = op("Add", ranked, b.ints(attrs.zero_experts))
        zeros = op("ConstantOfShape", op("Concat", op("Shape", x, start=0, end=1), ranked, axis=0),
                   value=_ZERO)
    else:
        logits = op("Flatten", f32("router_logits"), axis=-1)  # [T, E]
        zeros = op("ConstantOfShape", op("Shape", logits),
                   value=_ZERO)
        if attrs.routing == "softmax_topk":
            ids, vals = _ranked(b, op("Softmax", logits, axis=-1), attrs, k,
                                f32("selection_bias") if "selection_bias" in present else None)
        elif attrs.routing == "topk_softmax":
            top, ids = _topk(b, logits, k)
            vals = op("Softmax", top, axis=-1)
        elif attrs.routing == "sparsemixer":
            ids, vals = _sparsemixer(b, logits, attrs.jitter_eps)
        else:  # sigmoid_topk
            ids, vals = _ranked(b, op("Sigmoid", logits), attrs, k,
                                f32("selection_bias") if "selection_bias" in present else None)
        if attrs.normalize_topk and attrs.routing not in ("topk_softmax", "sparsemixer"):
            vals = op("Div", vals, _sum_last(b, vals))
    if attrs.routed_scaling_factor != 1.0:
        vals = op("Mul", vals, b.const(attrs.routed_scaling_factor))
    route = op("ScatterElements", zeros, ids, vals, axis=1, reduction="add")       # [T, E]
    identity, experts_only = None, (lambda t: t)
    if attrs.zero_experts:  # columns past E: the zero experts' weights, [T, 1] in all
        columns = op("Concat", op("Shape", "w1", start=0, end=1), b.ints(attrs.zero_experts), axis=0)

        def experts_only(t):  # [T, E + Z] -> [T, E]
            return op("Split", t, columns, outputs=2, axis=1)[0]

        route, zero_part = op("Split", route, columns, outputs=2, axis=1)
        identity = _sum_last(b, zero_part)

    # ---- routed experts, dense over E ----
    w1p = proj3("w1")
    w3p = proj3("w3") if "w3" in present else None
    w2 = proj3("w2")                                                                # [E, I, D]
    e_times_i = op("ReduceProd", op("Shape", w2, start=0, end=2), keepdims=1)
    w2_rows = op("Reshape", w2, op("Concat", e_times_i, op("Shape", w2, start=2), axis=0))

    def experts(xin, scale_e, combine):
        """sum over e of combine[:, e] (b2) and scale_e * f_e(xin[e]) (w2): [T, D]."""
        h = op("MatMul", xin, w1p)                                                  # [E, T, N1]
        if "b1" in present:
            h = op("Add", h, op("Unsqueeze", f32("b1"), b.ints(1)))
        up = None
        if w3p is not None:
            up = op("MatMul", xin, w3p)
            if "b3" in present:
                up = op("Add", up, op("Unsqueeze", f32("b3"), b.ints(1)))
        a = op("Mul", glu(h, up), scale_e)                                          # [E, T, I]
        a_rows = op("Reshape", op("Transpose", a, perm=[1, 0, 2]),
                    op("Concat", op("Shape", x, start=0, end=1), e_times_i, axis=0))  # [T, E*I]
        out = op("MatMul", a_rows, w2_rows)                                         # [T, D]
        if "b2" in present:
            out = op("Add", out, op("MatMul", combine, f32("b2")))
        return out

    def weighted_input(route_t, ids_t, vals_t):
        """The weight on the input: expert e of token t gets route[t, e] * x_t, and its output
        is taken once where it was chosen."""
        ones = op("ConstantOfShape", op("Shape", vals_t), value=_ONE)
        chosen = experts_only(op("ScatterElements", zeros, ids_t, ones, axis=1, reduction="max"))
        xin = op("Mul", op("Unsqueeze", op("Transpose", route_t, perm=[1, 0]), b.ints(-1)), x)
        return experts(xin, op("Unsqueeze", op("Transpose", chosen, perm=[1, 0]), b.ints(-1)), chosen)

    if not attrs.weight_on_input:
        y = experts(x, op("Unsqueeze", op("Transpose", route, perm=[1, 0]), b.ints(-1)), route)
    elif attrs.routing != "precomputed":  # computed picks are distinct experts
        y = weighted_input(route, ids, vals)
    else:
        # precomputed ids may repeat an expert: f(w1 x) + f(w2 x), one pass a slot
        y = None
        slots = b.ints(*([1] * attrs.k))
        id_slots = [ids] if attrs.k == 1 else op("Split", ids, slots, outputs=attrs.k, axis=1)
        val_slots = [vals] if attrs.k == 1 else op("Split", vals, slots, outputs=attrs.k, axis=1)
        for ids_j, vals_j in zip(id_slots, val_slots):
            route_j = experts_only(op("ScatterElements", zeros, ids_j, vals_j, axis=1))
            y_j = weighted_input(route_j, ids_j, vals_j)
            y = y_j if y is None else op("Add", y, y_j)

    if identity is not None:  # a zero expert returns its input
        y = op("Add", y, op("Mul", identity, x))

    # ---- shared expert ----
    if "shared_w1" in present:
        names = {n: n for n in ("shared_w1", "shared_w2", "shared_w3", "shared_gate") if n in present}
        y = op("Add", y, shared_expert(b, attrs, x, names))

    y = op("Reshape", y, op("Shape", "X"), allowzero=1)
    b.nodes.append(helper.make_node("CastLike", [y, "X"], ["Y"]))
    return helper.make_function(
        DOMAIN, OP_TYPE, list(INPUT_NAMES), ["Y"], b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(attribute_names()),
        doc_string=f"moefuse MoEFFN v1 fallback (config {config_key(attrs, present)})",
        **({"overload": overload} if overload else {}),
    )


def activation(b: Body, attrs: MoEFFNAttrs, v: str) -> str:
    """act(v) in float32 (spec: Experts)."""
    op, name = b.op, attrs.activation
    if name == "silu":
        z = v if attrs.activation_alpha == 1.0 else op("Mul", v, b.const(attrs.activation_alpha))
        return op("Mul", v, op("Sigmoid", z))
    if name == "gelu":
        e = op("Erf", op("Mul", v, b.const(1.0 / np.sqrt(2.0))))
        return op("Mul", op("Mul", v, b.const(0.5)), op("Add", e, b.const(1.0)))
    if name == "gelu_tanh":
        cube = op("Mul", op("Mul", v, v), v)
        inner = op("Add", v, op("Mul", cube, b.const(0.044715)))
        t = op("Tanh", op("Mul", inner, b.const(np.sqrt(2.0 / np.pi))))
        return op("Mul", op("Mul", v, b.const(0.5)), op("Add", t, b.const(1.0)))
    if name == "relu":
        return op("Relu", v)
    if name == "identity":
        return v
    raise ValueError(f"unknown activation '{name}'")


def expert_activation(b: Body, attrs: MoEFFNAttrs, h: str, up: Optional[str]) -> str:
    """The expert's activation on the first projection h (features on the last axis); ``up``
    is the separate up projection when gate and up are stored apart."""
    op = b.op
    if not attrs.gated:
        return activation(b, attrs, h)
    if up is None:
        if attrs.gate_up_layout == "interleaved":
            gate = op("Slice", h, b.ints(0), b.ints(2**62), b.ints(-1), b.ints(2))
            up = op("Slice", h, b.ints(1), b.ints(2**62), b.ints(-1), b.ints(2))
        else:  # halves
            gate, up = op("Split", h, axis=-1, num_outputs=2, outputs=2)
    else:
        gate = h
    if attrs.clamp_limit > 0:
        lim = attrs.clamp_limit
        gate = op("Min", gate, b.const(lim))
        up = op("Clip", up, b.const(-lim), b.const(lim))
    if attrs.up_offset:
        up = op("Add", up, b.const(attrs.up_offset))
    return op("Mul", activation(b, attrs, gate), up)


def shared_expert(b: Body, attrs: MoEFFNAttrs, x: str, names: dict) -> str:
    """The shared expert on float32 rows x [T, D]; ``names`` maps shared_w1/w2 (and shared_w3,
    shared_gate when present) to the tensors holding them, stored as the spec says."""
    op = b.op

    def proj(key):  # stored [a, b] -> float32 [in, out]
        w = op("Cast", names[key], to=_F)
        return w if attrs.weight_layout == "in_out" else op("Transpose", w, perm=[1, 0])

    h = op("MatMul", x, proj("shared_w1"))
    up = op("MatMul", x, proj("shared_w3")) if "shared_w3" in names else None
    out = op("MatMul", expert_activation(b, attrs, h, up), proj("shared_w2"))
    if "shared_gate" in names:
        gate = op("Unsqueeze", op("Cast", names["shared_gate"], to=_F), b.ints(1))
        out = op("Mul", out, op("Sigmoid", op("MatMul", x, gate)))
    return out


def _sparsemixer(b: Body, logits: str, eps: float):
    """PhiMoE's sparsemixer, k = 2 (see reference._sparsemixer): ids and weights [T, 2]."""
    op = b.op
    abs_logits = op("Abs", logits)
    threshold, minus_inf = b.const([2.0 * np.float32(eps)]), b.const(-np.inf)
    scores, ids, vals = logits, [], []
    for j in range(2):
        top, pick = _topk(b, scores, b.ints(1))                               # [T, 1]
        drop = op("Greater", op("Div", op("Sub", top, logits), op("Max", abs_logits, top)), threshold)
        probs = op("Softmax", op("Where", drop, minus_inf, scores), axis=-1)
        ids.append(pick)
        vals.append(op("GatherElements", probs, pick, axis=1))
        if j == 0:
            infs = op("ConstantOfShape", op("Shape", pick), value=_NEG_INF)
            scores = op("ScatterElements", logits, pick, infs, axis=1)
    return op("Concat", *ids, axis=1), op("Concat", *vals, axis=1)


def _sum_last(b: Body, x: str) -> str:
    """The sum over the last axis, kept as a dimension of 1. A product with ones, not ReduceSum:
    onnxruntime up to 1.31 returns an empty input's shape unreduced ([0, n] for [0, 1])."""
    op = b.op
    ones = op("ConstantOfShape", op("Concat", op("Shape", x, start=-1), b.ints(1), axis=0), value=_ONE)
    return op("MatMul", x, ones)


def _topk(b: Body, x: str, k: str) -> tuple[str, str]:
    """TopK over the last axis: (values, indices), ties to the lower index. The batch gets one
    row of zeros in front that the results drop: onnxruntime 1.20 to 1.30 stop the process with
    an integer division by zero (SIGFPE) in TopK over no rows, and an empty batch is valid input."""
    op = b.op
    pad = op("ConstantOfShape", op("Concat", b.ints(1), op("Shape", x, start=1), axis=0), value=_ZERO)
    vals, ids = op("TopK", op("Concat", pad, x, axis=0), k, outputs=2, axis=-1)
    sizes = op("Concat", b.ints(1), op("Shape", x, start=0, end=1), axis=0)
    return (op("Split", vals, sizes, outputs=2, axis=0)[1],
            op("Split", ids, sizes, outputs=2, axis=0)[1])


def _ranked(b: Body, scores: str, attrs: MoEFFNAttrs, k: str, bias: Optional[str]):
    """The top-k of scores (+ bias), limited to the best groups when n_group > 1; the weights are
    the picks' scores without the bias. Returns (ids, weights)."""
    op = b.op
    if bias is None and attrs.n_group == 1:
        vals, ids = _topk(b, scores, k)
        return ids, vals
    choice = scores if bias is None else op("Add", scores, bias)
    if attrs.n_group > 1:
        choice = _group_limited(b, choice, attrs)
    _, ids = _topk(b, choice, k)
    return ids, op("GatherElements", scores, ids, axis=1)


def _group_limited(b: Body, choice: str, attrs: MoEFFNAttrs) -> str:
    """Mask to -inf the experts outside the topk_group best groups (see reference._mask_groups)."""
    op = b.op
    n_group, topk_group = attrs.n_group, attrs.topk_group
    shape = op("Shape", choice)
    # Explicit [T, G, E/G] with allowzero=1: onnxruntime would otherwise fold the dims into a
    # [0, G, -1] that cannot reshape an empty batch.
    tokens = op("Shape", choice, start=0, end=1)
    group_size = op("Div", op("Shape", choice, start=1), b.ints(n_group))
    grouped = op("Reshape", choice, op("Concat", tokens, b.ints(n_group), group_size, axis=0),
                 allowzero=1)                                                  # [T, G, E/G]
    # a group's score: the sum of its best group_score_terms values (1, or 2 capped by its size)
    terms = b.ints(1) if attrs.group_score == "max" else op("Min", group_size, b.ints(2))
    best, _ = _topk(b, grouped, terms)
    group_scores = op("Squeeze", _sum_last(b, best), b.ints(-1))                # [T, G]
    _, keep = _topk(b, group_scores, b.ints(topk_group))
    gzeros = op("ConstantOfShape", op("Shape", group_scores),
                value=_ZERO)
    ones = op("ConstantOfShape", op("Shape", keep), value=_ONE)
    gmask = op("ScatterElements", gzeros, keep, ones, axis=1)                   # [T, G]
    emask = op("Reshape", op("Expand", op("Unsqueeze", gmask, b.ints(-1)),
                             op("Shape", grouped)), shape)                      # [T, E]
    keep_mask = op("Greater", emask, b.const(0.5))
    return op("Where", keep_mask, choice, b.const(-np.inf))


def opset_of(model: onnx.ModelProto) -> Optional[int]:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None
