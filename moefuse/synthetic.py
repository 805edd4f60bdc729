"""Random MoEFFN inputs for a configuration: used by tests, benchmarks and examples."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .spec import ACTIVATION_INPUTS, MoEFFNAttrs


def random_inputs(attrs: MoEFFNAttrs, tokens, hidden: int, inter: int, experts: int, *,
                  biases: bool = False, shared_inter: int = 0, shared_gate: bool = False,
                  selection_bias: bool = False, dtype=np.float32,
                  seed: Optional[int] = 0) -> dict:
    """Inputs for one MoEFFN node, scaled so that outputs stay O(1).

    ``tokens`` is T or a shape tuple for X's leading dims, e.g. (B, S).
    """
    rng = np.random.default_rng(seed)
    lead = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    in_out = attrs.weight_layout == "in_out"

    def w(e, n_in, n_out):
        shape = (n_in, n_out) if in_out else (n_out, n_in)
        if e is not None:
            shape = (e,) + shape
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(n_in)).astype(dtype)

    def vec(*shape, scale=0.1):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)

    fused = attrs.gated and attrs.gate_up_layout != "separate"
    n1 = 2 * inter if fused else inter
    ranked = experts + attrs.zero_experts  # what the router ranks: the experts, then zero experts
    out = {"X": rng.standard_normal(lead + (hidden,), dtype=np.float32).astype(dtype)}
    if attrs.routing == "precomputed":
        ids = [rng.permutation(ranked)[: attrs.k] for _ in range(int(np.prod(lead)))]
        out["topk_ids"] = np.array(ids, dtype=np.int64).reshape(lead + (attrs.k,))
        out["topk_weights"] = rng.random(lead + (attrs.k,), dtype=np.float32).astype(dtype)
    else:
        out["router_logits"] = (rng.standard_normal(lead + (ranked,), dtype=np.float32)
                                * 2).astype(dtype)
    out["w1"] = w(experts, hidden, n1)
    out["w2"] = w(experts, inter, hidden)
    if attrs.gated and attrs.gate_up_layout == "separate":
        out["w3"] = w(experts, hidden, inter)
    if biases:
        out["b1"] = vec(experts, n1)
        out["b2"] = vec(experts, hidden)
        if "w3" in out:
            out["b3"] = vec(experts, inter)
    if selection_bias:
        out["selection_bias"] = vec(ranked, scale=0.05)
    if shared_inter:
        s_n1 = 2 * shared_inter if fused else shared_inter
        out["shared_w1"] = w(None, hidden, s_n1)
        out["shared_w2"] = w(None, shared_inter, hidden)
        if attrs.gated and not fused:
            out["shared_w3"] = w(None, hidden, shared_inter)
        if shared_gate:
            out["shared_gate"] = vec(hidden, scale=1 / np.sqrt(hidden))
    return out


def feeds(inputs: dict) -> dict:
    """The per-call inputs (graph inputs of a model from builder.make_moeffn_model)."""
    return {n: a for n, a in inputs.items() if n in ACTIVATION_INPUTS}
