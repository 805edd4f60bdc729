"""The single source of truth for the ``MoEFFN`` operator (domain ``moefuse``, version 1).

Everything that builds, checks, evaluates or serializes a MoEFFN node reads its attributes,
their defaults and the input table from here: the builder and the embedded ONNX function
(:mod:`moefuse.function`), the numpy reference (:mod:`moefuse.reference`), the converter and the
kernels' own checks (custom_ops/ mirrors :func:`validate` in ``moeffn_validate.h``).
docs/op-spec.md is the prose form of this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

DOMAIN = "moefuse"
OP_TYPE = "MoEFFN"
VERSION = 1

# --- attribute value sets ---------------------------------------------------------------------

ROUTINGS = ("softmax_topk", "topk_softmax", "sigmoid_topk", "precomputed", "sparsemixer")
# Routings that rank a score per expert: they take a selection bias and expert groups (n_group > 1).
RANKED_ROUTINGS = ("softmax_topk", "sigmoid_topk")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "identity")
GATE_UP_LAYOUTS = ("halves", "interleaved", "separate")
# "in_out": a projection is stored [E, in, out] and computed x @ W (GPT-OSS, ORT's old layout).
# "out_in": stored [E, out, in] and computed x @ W^T (torch Linear, transformers 5 experts).
WEIGHT_LAYOUTS = ("out_in", "in_out")
# A group's score in group-limited selection: the sum of its two best choice values (DeepSeek-V3)
# or its best one (DeepSeek-V2's group_limited_greedy).
GROUP_SCORES = ("top2_sum", "max")

FLOAT_TYPES = ("float32", "float16", "bfloat16")


class MoEFFNError(ValueError):
    """A MoEFFN node (or a request to build one) that breaks the spec.

    The message names the node, the input or attribute, and what was expected vs found.
    """


# --- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    name: str
    doc: str
    optional: bool = True
    integer: bool = False  # an index tensor (int32/int64) rather than a float of type T


# Order is the ABI: new inputs (quantization scales, zero points) are only ever appended.
INPUTS: tuple[InputSpec, ...] = (
    InputSpec("X", "activations [T, D] or [B, S, D]", optional=False),
    InputSpec("router_logits", "router projection output [..., E + zero_experts]; absent with "
              "routing=precomputed"),
    InputSpec("w1", "first projection: gate+up [E, D, 2I] (gated, fused), gate [E, D, I] "
              "(gated, separate) or fc1 [E, D, I] (non-gated); in_out layout shown", optional=False),
    InputSpec("w2", "down projection [E, I, D] (in_out layout shown)", optional=False),
    InputSpec("w3", "up projection [E, D, I]; only with gate_up_layout=separate"),
    InputSpec("b1", "bias of w1 [E, N1] where N1 is w1's output width"),
    InputSpec("b2", "bias of w2 [E, D]"),
    InputSpec("b3", "bias of w3 [E, I]"),
    InputSpec("selection_bias", "[E + zero_experts], added to the scores for selection only "
              "(softmax_topk, sigmoid_topk)"),
    InputSpec("topk_ids", "[..., k] int32/int64 expert ids (routing=precomputed)", integer=True),
    InputSpec("topk_weights", "[..., k] routing weights (routing=precomputed)"),
    InputSpec("shared_w1", "shared expert first projection, [D, N1] (in_out) or [N1, D] (out_in)"),
    InputSpec("shared_w2", "shared expert down projection, [Is, D] (in_out) or [D, Is] (out_in)"),
    InputSpec("shared_w3", "shared expert up projection (shared expert gate/up stored separately)"),
    InputSpec("shared_gate", "[D]: shared output scaled by sigmoid(x . shared_gate)"),
)
INPUT_INDEX = {spec.name: i for i, spec in enumerate(INPUTS)}
INPUT_NAMES = tuple(spec.name for spec in INPUTS)
OUTPUTS = ("Y",)
# Inputs that carry per-call data; the others are weights (initializers in a real model).
ACTIVATION_INPUTS = ("X", "router_logits", "topk_ids", "topk_weights")


# --- attributes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoEFFNAttrs:
    """The attributes of one MoEFFN node, with their v1 defaults.

    Field order and defaults here are the op's attribute table; :meth:`to_onnx` writes only
    non-default values so that nodes stay short and defaults can be read back.
    """

    k: int = 2
    routing: str = "softmax_topk"
    normalize_topk: int = 1
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    activation: str = "silu"
    gated: int = 1
    gate_up_layout: str = "halves"
    weight_layout: str = "out_in"
    activation_alpha: float = 1.0
    clamp_limit: float = 0.0
    up_offset: float = 0.0
    weight_on_input: int = 0
    jitter_eps: float = 0.009999999776482582  # 0.01 as a float32 (an ONNX FLOAT attribute)
    zero_experts: int = 0

    # ---- serialization (one place) ----
    def to_onnx(self) -> dict:
        """Attribute dict for ``onnx.helper.make_node`` (non-default values only)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = value
        return out

    @classmethod
    def from_onnx(cls, attributes: Mapping[str, object], node_name: str = "") -> "MoEFFNAttrs":
        """Build from ``{name: python value}`` (as ``onnx.helper.get_attribute_value`` gives)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in attributes.items():
            if name not in known:
                raise MoEFFNError(f"{_who(node_name)}: unknown attribute '{name}' "
                                  f"(known: {', '.join(known)})")
            if isinstance(value, bytes):
                value = value.decode()
            # ONNX's attribute type must be the op's: a kernel reads an INT, FLOAT or STRING and
            # would take the default for another type (k=3.0 would run as k=2)
            default = known[name].default
            kind = str if isinstance(default, str) else float if isinstance(default, float) else int
            if type(value) is not kind:
                onnx_type = {int: "INT", float: "FLOAT", str: "STRING"}
                given = onnx_type.get(type(value), type(value).__name__)
                raise MoEFFNError(f"{_who(node_name)}: attribute '{name}' must be of type "
                                  f"{onnx_type[kind]}, got {given} {value!r}")
            kwargs[name] = value
        return cls(**kwargs).normalized()

    def normalized(self) -> "MoEFFNAttrs":
        """Coerce python types (int/float/str) so that equality and hashing are by value."""
        values = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default
            if isinstance(default, bool) or isinstance(default, int):
                values[f.name] = int(v)
            elif isinstance(default, float):
                values[f.name] = float(v)
            else:
                values[f.name] = str(v)
        return MoEFFNAttrs(**values)

    def replace(self, **changes) -> "MoEFFNAttrs":
        return dataclasses.replace(self, **changes).normalized()

    # ---- derived facts ----
    def check(self, node_name: str = "") -> None:
        """Attribute-only validation (shapes are checked by :func:`validate`)."""
        who = _who(node_name)
        _one_of(who, "routing", self.routing, ROUTINGS)
        _one_of(who, "activation", self.activation, ACTIVATIONS)
        _one_of(who, "gate_up_layout", self.gate_up_layout, GATE_UP_LAYOUTS)
        _one_of(who, "weight_layout", self.weight_layout, WEIGHT_LAYOUTS)
        _one_of(who, "group_score", self.group_score, GROUP_SCORES)
        for name in ("normalize_topk", "gated", "weight_on_input"):
            if getattr(self, name) not in (0, 1):
                raise MoEFFNError(f"{who}: attribute '{name}' must be 0 or 1, got {getattr(self, name)}")
        if self.k < 1:
            raise MoEFFNError(f"{who}: attribute 'k' must be >= 1, got {self.k}")
        if self.zero_experts < 0:
            raise MoEFFNError(f"{who}: attribute 'zero_experts' must be >= 0, got {self.zero_experts}")
        if self.n_group < 1 or self.topk_group < 1:
            raise MoEFFNError(f"{who}: attributes 'n_group' and 'topk_group' must be >= 1, "
                              f"got n_group={self.n_group}, topk_group={self.topk_group}")
        if self.topk_group > self.n_group:
            raise MoEFFNError(f"{who}: attribute 'topk_group'={self.topk_group} must be <= "
                              f"n_group={self.n_group}")
        if self.n_group > 1 and self.routing not in RANKED_ROUTINGS:
            raise MoEFFNError(f"{who}: group-limited top-k (n_group={self.n_group}) is defined for "
                              f"routing={' or '.join(map(repr, RANKED_ROUTINGS))} only, "
                              f"got routing='{self.routing}'")
        if self.n_group == 1 and self.group_score != MoEFFNAttrs.group_score:
            raise MoEFFNError(f"{who}: 'group_score' applies to group-limited top-k (n_group > 1) "
                              f"only, got n_group=1")
        if self.routing == "sparsemixer" and self.k != 2:
            raise MoEFFNError(f"{who}: routing='sparsemixer' picks k=2 experts, got k={self.k}")
        if not (self.jitter_eps >= 0.0 and math.isfinite(self.jitter_eps)):
            raise MoEFFNError(f"{who}: attribute 'jitter_eps' must be finite and >= 0, "
                              f"got {self.jitter_eps}")
        if np.float32(self.jitter_eps) != np.float32(MoEFFNAttrs.jitter_eps) and self.routing != "sparsemixer":
            raise MoEFFNError(f"{who}: 'jitter_eps' applies to routing='sparsemixer' only, "
                              f"got routing='{self.routing}'")
        if not math.isfinite(self.routed_scaling_factor):
            raise MoEFFNError(f"{who}: attribute 'routed_scaling_factor' must be finite")
        if not (self.clamp_limit >= 0.0 and math.isfinite(self.clamp_limit)):
            raise MoEFFNError(f"{who}: attribute 'clamp_limit' must be finite and >= 0 (0 = off), "
                              f"got {self.clamp_limit}")
        if not self.gated:
            if self.clamp_limit or self.up_offset:
                raise MoEFFNError(f"{who}: 'clamp_limit' and 'up_offset' apply to gated experts "
                                  f"only (gated=0)")
        if self.activation_alpha != 1.0 and self.activation != "silu":
            raise MoEFFNError(f"{who}: 'activation_alpha' applies to activation='silu' only, "
                              f"got activation='{self.activation}'")

    def group_score_terms(self, group_size: int) -> int:
        """How many of a group's best choice values add up to its score (n_group > 1)."""
        return 1 if self.group_score == "max" else min(2, group_size)

    @property
    def uses_router_logits(self) -> bool:
        return self.routing != "precomputed"


_MAX_RANKED = 2**31 - 1  # experts a router may rank (with the zero experts): 32-bit ids


def _who(node_name: str) -> str:
    return f"MoEFFN node '{node_name}'" if node_name else "MoEFFN"


def _one_of(who: str, attr: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise MoEFFNError(f"{who}: attribute '{attr}' must be one of {', '.join(allowed)}; "
                          f"got '{value}'")


# --- shape and type validation ------------------------------------------------------------------


@dataclass(frozen=True)
class MoEFFNShape:
    """The sizes a valid node implies (from :func:`validate`)."""

    tokens: Optional[int]  # T = product of X's leading dims (None when symbolic)
    hidden: int            # D
    experts: int           # E
    inter: int             # I, the routed expert's intermediate size
    shared_inter: int      # Is, 0 without shared expert
    dtype: str


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    name = np.dtype(dtype).name
    return name


def validate(
    attrs: MoEFFNAttrs,
    shapes: Mapping[str, Optional[Sequence[Optional[int]]]],
    dtypes: Mapping[str, object],
    node_name: str = "",
) -> MoEFFNShape:
    """Check a node's inputs against the spec; return the implied sizes.

    ``shapes`` maps input name to its shape (dims may be ``None`` for symbolic); an input that is
    absent is left out or maps to ``None``. ``dtypes`` maps the same names to numpy dtypes or dtype
    names ("float32", "float16", "bfloat16", "int64", ...). Raises :class:`MoEFFNError`.
    """
    attrs.check(node_name)
    who = _who(node_name)
    present = {n for n, s in shapes.items() if s is not None}

    def shape(name):
        return tuple(shapes[name])

    def fail(name, expected, got=None):
        got = shape(name) if got is None else got
        raise MoEFFNError(f"{who}: input '{name}' (#{INPUT_INDEX[name]}) expected {expected}, "
                          f"got {_fmt(got)}")

    for name in ("X", "w1", "w2"):
        if name not in present:
            raise MoEFFNError(f"{who}: required input '{name}' (#{INPUT_INDEX[name]}) is missing")
    for name in present:
        if name not in INPUT_INDEX:
            raise MoEFFNError(f"{who}: unknown input '{name}'")

    # dtypes: one float type T for every float input; index type for topk_ids
    t = _dtype_name(dtypes["X"])
    if t not in FLOAT_TYPES:
        raise MoEFFNError(f"{who}: input 'X' has element type {t}; expected one of "
                          f"{', '.join(FLOAT_TYPES)}")
    for name in present:
        d = _dtype_name(dtypes[name])
        if INPUTS[INPUT_INDEX[name]].integer:
            if d not in ("int32", "int64"):
                raise MoEFFNError(f"{who}: input '{name}' must be int32 or int64, got {d}")
        elif d != t:
            raise MoEFFNError(f"{who}: input '{name}' has element type {d} but X is {t}; all "
                              f"float inputs of a MoEFFN node share one type")

    x = shape("X")
    if len(x) not in (2, 3):
        fail("X", "rank 2 [T, D] or rank 3 [B, S, D]")
    d_model = x[-1]
    if d_model is None:
        raise MoEFFNError(f"{who}: input 'X' must have a static hidden size (last dim), got {_fmt(x)}")
    tokens = _prod(x[:-1])

    # routed expert weights
    w1, w2 = shape("w1"), shape("w2")
    if len(w1) != 3 or any(v is None for v in w1):
        fail("w1", "a static rank-3 tensor [E, ., .]")
    if len(w2) != 3 or any(v is None for v in w2):
        fail("w2", "a static rank-3 tensor [E, ., .]")
    experts = w1[0]
    in_out = attrs.weight_layout == "in_out"

    def proj(dims):  # (in, out) of a stored [E, a, b] projection
        return (dims[1], dims[2]) if in_out else (dims[2], dims[1])

    w1_in, n1 = proj(w1)
    lay = "[E, in, out]" if in_out else "[E, out, in]"
    if w1_in != d_model:
        fail("w1", f"{lay} with in = D = {d_model} (weight_layout={attrs.weight_layout})")
    fused = attrs.gated and attrs.gate_up_layout != "separate"
    if fused:
        if n1 % 2:
            fail("w1", f"an even output width 2*I (gate and up {attrs.gate_up_layout})")
        inter = n1 // 2
    else:
        inter = n1
    if experts < 1:
        fail("w1", "at least one expert")
    w2_expected = (experts, inter, d_model) if in_out else (experts, d_model, inter)
    if tuple(w2) != w2_expected:
        fail("w2", f"{_fmt(w2_expected)} (E={experts}, I={inter}, D={d_model}, "
                   f"weight_layout={attrs.weight_layout})")

    separate = attrs.gated and attrs.gate_up_layout == "separate"
    if separate:
        if "w3" not in present:
            raise MoEFFNError(f"{who}: input 'w3' (#{INPUT_INDEX['w3']}) is required with "
                              f"gate_up_layout=separate")
        if tuple(shape("w3")) != tuple(w1):
            fail("w3", f"the shape of w1 {_fmt(w1)}")
    elif "w3" in present:
        raise MoEFFNError(f"{who}: input 'w3' is given but gate_up_layout={attrs.gate_up_layout}"
                          f"{'' if attrs.gated else ' and gated=0'}; w3 is only used with "
                          f"gated=1, gate_up_layout=separate")
    for name, expected in (("b1", (experts, n1)), ("b2", (experts, d_model)),
                           ("b3", (experts, inter))):
        if name in present:
            if name == "b3" and not separate:
                raise MoEFFNError(f"{who}: input 'b3' requires gate_up_layout=separate")
            if tuple(shape(name)) != expected:
                fail(name, _fmt(expected))

    # routing inputs: the router ranks the E experts and, past them, the zero (identity) experts
    ranked = experts + attrs.zero_experts
    e_ranked = (f"E={experts}" if not attrs.zero_experts else
                f"E + zero_experts = {experts} + {attrs.zero_experts} = {ranked}")
    if ranked > _MAX_RANKED:  # expert ids are 32-bit in the kernels
        raise MoEFFNError(f"{who}: attribute 'zero_experts'={attrs.zero_experts}: {e_ranked} exceeds "
                          f"{_MAX_RANKED} experts")
    if attrs.k > ranked:
        raise MoEFFNError(f"{who}: attribute 'k'={attrs.k} exceeds the number of experts "
                          f"{e_ranked} (from w1 {_fmt(w1)})")
    if attrs.n_group > 1 and ranked % attrs.n_group:
        raise MoEFFNError(f"{who}: attribute 'n_group'={attrs.n_group} does not divide the number "
                          f"of experts {e_ranked}")
    if attrs.n_group > 1 and attrs.k > attrs.topk_group * (ranked // attrs.n_group):
        raise MoEFFNError(f"{who}: k={attrs.k} exceeds the experts in the topk_group="
                          f"{attrs.topk_group} selected groups of {ranked // attrs.n_group}")
    if attrs.routing == "precomputed":
        for name in ("topk_ids", "topk_weights"):
            if name not in present:
                raise MoEFFNError(f"{who}: input '{name}' (#{INPUT_INDEX[name]}) is required "
                                  f"with routing=precomputed")
            s = shape(name)
            if len(s) < 1 or (s[-1] is not None and s[-1] != attrs.k):
                fail(name, f"[..., k] with k={attrs.k}")
            if not _same_tokens(s[:-1], x[:-1]):
                fail(name, f"leading dims holding T={_fmt(x[:-1])} tokens like X")
        if shape("topk_ids")[:-1] != shape("topk_weights")[:-1]:
            fail("topk_weights", f"the shape of topk_ids {_fmt(shape('topk_ids'))}")
        for name in ("router_logits", "selection_bias"):
            if name in present:
                raise MoEFFNError(f"{who}: input '{name}' is not used with routing=precomputed")
    else:
        if "router_logits" not in present:
            raise MoEFFNError(f"{who}: input 'router_logits' (#1) is required with "
                              f"routing={attrs.routing}")
        lg = shape("router_logits")
        if len(lg) < 2 or lg[-1] != ranked:
            fail("router_logits", f"[..., {'E + zero_experts' if attrs.zero_experts else 'E'}] "
                                  f"with {e_ranked} (from w1 {_fmt(w1)})")
        if not _same_tokens(lg[:-1], x[:-1]):
            fail("router_logits", f"leading dims holding the same tokens as X {_fmt(x)}")
        for name in ("topk_ids", "topk_weights"):
            if name in present:
                raise MoEFFNError(f"{who}: input '{name}' is only used with routing=precomputed")
        if "selection_bias" in present:
            if attrs.routing not in RANKED_ROUTINGS:
                raise MoEFFNError(f"{who}: input 'selection_bias' is only used with "
                                  f"routing={' or '.join(RANKED_ROUTINGS)}, got routing={attrs.routing}")
            if tuple(shape("selection_bias")) != (ranked,):
                fail("selection_bias", _fmt((ranked,)))

    # shared expert
    shared_inter = 0
    shared_present = [n for n in ("shared_w1", "shared_w2", "shared_w3", "shared_gate") if n in present]
    if shared_present:
        for name in ("shared_w1", "shared_w2"):
            if name not in present:
                raise MoEFFNError(f"{who}: input '{name}' is required when any shared expert "
                                  f"input is given (got {', '.join(shared_present)})")
        s1, s2 = shape("shared_w1"), shape("shared_w2")
        if len(s1) != 2 or any(v is None for v in s1):
            fail("shared_w1", "a static rank-2 tensor")
        s_in, s_n1 = (s1[0], s1[1]) if in_out else (s1[1], s1[0])
        if s_in != d_model:
            fail("shared_w1", f"{'[D, N1]' if in_out else '[N1, D]'} with D={d_model}")
        shared_separate = "shared_w3" in present
        if shared_separate and not attrs.gated:
            raise MoEFFNError(f"{who}: input 'shared_w3' requires gated experts (gated=1)")
        if attrs.gated and not shared_separate:
            if attrs.gate_up_layout == "separate":
                raise MoEFFNError(f"{who}: input 'shared_w3' is required: with gate_up_layout="
                                  f"separate the shared expert's up projection is stored apart")
            if s_n1 % 2:
                fail("shared_w1", "an even output width 2*Is (gate and up fused)")
            shared_inter = s_n1 // 2
        else:
            shared_inter = s_n1
        if shared_separate and tuple(shape("shared_w3")) != tuple(s1):
            fail("shared_w3", f"the shape of shared_w1 {_fmt(s1)}")
        s2_expected = (shared_inter, d_model) if in_out else (d_model, shared_inter)
        if tuple(s2) != s2_expected:
            fail("shared_w2", _fmt(s2_expected))
        if "shared_gate" in present and tuple(shape("shared_gate")) != (d_model,):
            fail("shared_gate", _fmt((d_model,)))

    return MoEFFNShape(tokens=tokens, hidden=d_model, experts=experts, inter=inter,
                       shared_inter=shared_inter, dtype=t)


def _prod(dims) -> Optional[int]:
    out = 1
    for d in dims:
        if d is None:
            return None
        out *= d
    return out


def _same_tokens(a, b) -> bool:
    """Leading dims ``a`` hold the same tokens as ``b`` (equal, or equal products)."""
    a, b = tuple(a), tuple(b)
    if a == b:
        return True
    pa, pb = _prod(a), _prod(b)
    if pa is None or pb is None:
        return True  # symbolic: checked at run time
    return pa == pb


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def validate_arrays(attrs: MoEFFNAttrs, inputs: Mapping[str, Optional[np.ndarray]],
                    node_name: str = "") -> MoEFFNShape:
    """:func:`validate` for concrete numpy arrays."""
    shapes = {n: (None if a is None else tuple(a.shape)) for n, a in inputs.items()}
    dtypes = {n: a.dtype for n, a in inputs.items() if a is not None}
    return validate(attrs, shapes, dtypes, node_name)


def attribute_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(MoEFFNAttrs))
