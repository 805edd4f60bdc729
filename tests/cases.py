"""The trait matrix shared by the fallback, kernel and GPU parity tests."""

from __future__ import annotations

import itertools

from moefuse import MoEFFNAttrs

# routing variant -> (attribute changes, extra input options)
ROUTINGS = {
    "softmax_topk_norm": (dict(routing="softmax_topk", normalize_topk=1), {}),
    "softmax_topk_raw": (dict(routing="softmax_topk", normalize_topk=0), {"shared_gate": True}),
    "topk_softmax": (dict(routing="topk_softmax"), {}),
    "sigmoid_grouped": (dict(routing="sigmoid_topk", n_group=2, topk_group=1,
                             routed_scaling_factor=2.5), {"selection_bias": True}),
    "sigmoid_on_input": (dict(routing="sigmoid_topk", normalize_topk=0, k=1, weight_on_input=1), {}),
    "precomputed": (dict(routing="precomputed"), {}),
}

# expert kind -> (attribute changes, intermediate size or None for the default)
EXPERTS = {
    "swiglu_halves": (dict(activation="silu", gate_up_layout="halves"), None),
    "swiglu_interleaved": (dict(activation="silu", gate_up_layout="interleaved",
                                weight_layout="in_out"), None),
    "gptoss_clamp": (dict(activation="silu", gate_up_layout="interleaved", weight_layout="in_out",
                          activation_alpha=1.702, clamp_limit=7.0, up_offset=1.0), None),
    "geglu_separate": (dict(activation="gelu_tanh", gate_up_layout="separate"), None),
    "relu_plain": (dict(activation="relu", gated=0), None),
    "rank1_silu": (dict(activation="silu", gated=0, weight_layout="in_out"), 1),
}

E, D, I = 4, 16, 8


def case(routing: str, experts: str, k: int = 2):
    r_attrs, r_opts = ROUTINGS[routing]
    e_attrs, inter = EXPERTS[experts]
    attrs = MoEFFNAttrs(k=k).replace(**{**r_attrs, **e_attrs})
    return attrs, r_opts, (I if inter is None else inter)


ALL = list(itertools.product(ROUTINGS, EXPERTS))
