"""Reference semantics of MoEFFN in numpy: the test oracle.

Written for clarity first and then for speed enough to be an oracle at T <= 512, E <= 256:
routing is vectorized over tokens, experts are computed per active expert on the tokens routed to
it. Every float input is upcast to float32 and all arithmetic is float32 (float64 for nothing);
the result is cast back to X's type.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.special import erf

from .spec import INPUT_NAMES, MoEFFNAttrs, MoEFFNError, validate_arrays

F32 = np.float32


def activation(name: str, x: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    if name == "silu":
        return x * _sigmoid(x * F32(alpha)) if alpha != 1.0 else x * _sigmoid(x)
    if name == "gelu":
        return F32(0.5) * x * (F32(1.0) + erf(x / F32(np.sqrt(2.0))).astype(F32))
    if name == "gelu_tanh":
        c = F32(np.sqrt(2.0 / np.pi))
        return F32(0.5) * x * (F32(1.0) + np.tanh(c * (x + F32(0.044715) * x * x * x)))
    if name == "relu":
        return np.maximum(x, F32(0.0))
    if name == "identity":
        return x
    raise MoEFFNError(f"unknown activation '{name}'")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a large positive argument overflows to inf harmlessly: 1/(1+inf) = 0.
    with np.errstate(over="ignore"):
        return (F32(1.0) / (F32(1.0) + np.exp(-x))).astype(F32)


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first; ties go to the lower index.

    The same as a stable argsort of -scores cut at k, but only the k picked by a partition are
    sorted: layers of thousands of rank-1 experts would otherwise sort every row in full."""
    neg = -scores
    if not 0 < k < neg.shape[-1] or np.isnan(neg).any():  # NaNs sort last: keep the full sort
        return np.argsort(neg, axis=-1, kind="stable")[:, :k]
    # In index order, so that the stable sort by value leaves ties lowest index first.
    picked = np.sort(_partition_k(neg, k), axis=-1)
    order = np.argsort(np.take_along_axis(neg, picked, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(picked, order, axis=-1)


def _partition_k(neg: np.ndarray, k: int) -> np.ndarray:
    """The k smallest of each row, in any order, ties at the k-th value going to the lower index.

    A partition picks an arbitrary subset of the values tied with the k-th; a row where some of
    them were left out takes its k from the full stable sort instead."""
    picked = np.argpartition(neg, k - 1, axis=-1)[:, :k]
    values = np.take_along_axis(neg, picked, axis=-1)
    kth = np.max(values, axis=-1, keepdims=True)
    left_out = np.sum(neg == kth, axis=-1) > np.sum(values == kth, axis=-1)
    rows = np.nonzero(left_out)[0]
    if rows.size:
        picked[rows] = np.argsort(neg[rows], axis=-1, kind="stable")[:, :k]
    return picked


def route(attrs: MoEFFNAttrs, logits: Optional[np.ndarray], selection_bias: Optional[np.ndarray],
          topk_ids: Optional[np.ndarray] = None, topk_weights: Optional[np.ndarray] = None,
          experts: Optional[int] = None):
    """Routing: returns (ids [T, k] int64, weights [T, k] float32)."""
    k = attrs.k
    if attrs.routing == "precomputed":
        ids = topk_ids.reshape(-1, k).astype(np.int64)
        if experts is not None and ids.size and (ids.min() < 0 or ids.max() >= experts):
            raise MoEFFNError(f"MoEFFN: input 'topk_ids' holds an expert id outside [0, {experts})")
        weights = topk_weights.reshape(-1, k).astype(F32)
    else:
        logits = logits.reshape(-1, logits.shape[-1]).astype(F32)
        if attrs.routing == "softmax_topk":
            probs = _softmax(logits)
            choice = probs if selection_bias is None else probs + selection_bias.astype(F32)
            if attrs.n_group > 1:
                choice = _mask_groups(choice, attrs)
            ids = topk_indices(choice, k)
            weights = np.take_along_axis(probs, ids, axis=1)
            if attrs.normalize_topk:
                weights = weights / np.sum(weights, axis=1, keepdims=True)
        elif attrs.routing == "topk_softmax":
            ids = topk_indices(logits, k)
            weights = _softmax(np.take_along_axis(logits, ids, axis=1))
        elif attrs.routing == "sparsemixer":
            ids, weights = _sparsemixer(logits, F32(attrs.jitter_eps))
        elif attrs.routing == "sigmoid_topk":
            scores = _sigmoid(logits)
            choice = scores if selection_bias is None else scores + selection_bias.astype(F32)
            if attrs.n_group > 1:
                choice = _mask_groups(choice, attrs)
            ids = topk_indices(choice, k)
            weights = np.take_along_axis(scores, ids, axis=1)
            if attrs.normalize_topk:
                weights = weights / np.sum(weights, axis=1, keepdims=True)
        else:
            raise MoEFFNError(f"unknown routing '{attrs.routing}'")
    if attrs.routed_scaling_factor != 1.0:
        weights = weights * F32(attrs.routed_scaling_factor)
    return ids, weights.astype(F32)


def _sparsemixer(logits: np.ndarray, eps: np.float32):
    """PhiMoE's sparsemixer at inference, k = 2: pick j is the largest logit not yet picked; its
    weight is its probability in a softmax over the logits not yet picked that lie within
    2 eps (relative, to max(|l|, the pick's logit)) of the pick's."""
    ids, weights = [], []
    scores = logits
    for _ in range(2):
        pick = topk_indices(scores, 1)                               # [T, 1]
        top = np.take_along_axis(scores, pick, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            drop = (top - logits) / np.maximum(np.abs(logits), top) > F32(2) * eps
        probs = _softmax(np.where(drop, F32(-np.inf), scores).astype(F32))
        ids.append(pick)
        weights.append(np.take_along_axis(probs, pick, axis=1))
        scores = scores.copy()
        np.put_along_axis(scores, pick, F32(-np.inf), axis=1)
    return np.concatenate(ids, axis=1).astype(np.int64), np.concatenate(weights, axis=1)


def _mask_groups(choice: np.ndarray, attrs: MoEFFNAttrs) -> np.ndarray:
    """Group-limited selection: keep the experts of the topk_group best groups, where a group's
    score is the sum of its top min(2, group size) choice scores (group_score=top2_sum) or its
    largest one (max); the rest become -inf."""
    t, e = choice.shape
    n_group = attrs.n_group
    grouped = choice.reshape(t, n_group, e // n_group)
    top = attrs.group_score_terms(e // n_group)
    group_scores = -np.sort(-grouped, axis=-1)[..., :top].sum(axis=-1)
    keep = topk_indices(group_scores, attrs.topk_group)
    mask = np.zeros((t, n_group), dtype=bool)
    np.put_along_axis(mask, keep, True, axis=1)
    out = np.where(np.repeat(mask, e // n_group, axis=1), choice, F32(-np.inf))
    return out.astype(F32)


def _as_in_out(w: np.ndarray, layout: str) -> np.ndarray:
    """A projection as [..., in, out] float32 regardless of storage layout."""
    w = w.astype(F32, copy=False)
    return w if layout == "in_out" else np.swapaxes(w, -1, -2)


def _glu(attrs: MoEFFNAttrs, h: np.ndarray, up: Optional[np.ndarray], layout: str) -> np.ndarray:
    """Expert activation on the first projection's output h (and up, when stored apart)."""
    if not attrs.gated:
        return activation(attrs.activation, h, attrs.activation_alpha)
    if up is None:
        if layout == "interleaved":
            gate, up = h[..., 0::2], h[..., 1::2]
        else:  # halves
            half = h.shape[-1] // 2
            gate, up = h[..., :half], h[..., half:]
    else:
        gate = h
    if attrs.clamp_limit > 0:
        lim = F32(attrs.clamp_limit)
        gate = np.minimum(gate, lim)
        up = np.clip(up, -lim, lim)
    if attrs.up_offset:
        up = up + F32(attrs.up_offset)
    return activation(attrs.activation, gate, attrs.activation_alpha) * up


def moeffn(attrs: MoEFFNAttrs, X: np.ndarray, router_logits=None, w1=None, w2=None, w3=None,
           b1=None, b2=None, b3=None, selection_bias=None, topk_ids=None, topk_weights=None,
           shared_w1=None, shared_w2=None, shared_w3=None, shared_gate=None,
           node_name: str = "") -> np.ndarray:
    """Evaluate one MoEFFN node. Arguments are named as the op's inputs (spec.INPUTS)."""
    inputs = dict(zip(INPUT_NAMES, (X, router_logits, w1, w2, w3, b1, b2, b3, selection_bias,
                                    topk_ids, topk_weights, shared_w1, shared_w2, shared_w3,
                                    shared_gate)))
    sizes = validate_arrays(attrs, inputs, node_name)
    out_dtype = X.dtype
    x = X.reshape(-1, sizes.hidden).astype(F32, copy=False)
    tokens = x.shape[0]
    y = np.zeros((tokens, sizes.hidden), dtype=F32)
    if tokens == 0:
        return y.reshape(X.shape).astype(out_dtype)

    ids, weights = route(attrs, router_logits, selection_bias, topk_ids, topk_weights,
                         sizes.experts + attrs.zero_experts)
    lay = attrs.weight_layout
    w1_io, w2_io = _as_in_out(w1, lay), _as_in_out(w2, lay)
    w3_io = None if w3 is None else _as_in_out(w3, lay)

    # Group (token, slot) pairs by expert: a counting sort over the flattened ids.
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(sizes.experts + 1))
    pair_tokens = order // attrs.k
    pair_weights = weights.reshape(-1)[order]
    routed = np.zeros_like(y)
    for e in np.nonzero(np.diff(bounds))[0]:
        sel = slice(bounds[e], bounds[e + 1])
        rows = pair_tokens[sel]
        w = pair_weights[sel][:, None]
        xin = x[rows] * w if attrs.weight_on_input else x[rows]
        h = xin @ w1_io[e]
        if b1 is not None:
            h = h + b1[e].astype(F32)
        up = None
        if w3_io is not None:
            up = xin @ w3_io[e]
            if b3 is not None:
                up = up + b3[e].astype(F32)
        a = _glu(attrs, h, up, attrs.gate_up_layout)
        out = a @ w2_io[e]
        if b2 is not None:
            out = out + b2[e].astype(F32)
        if not attrs.weight_on_input:
            out = out * w
        np.add.at(routed, rows, out)
    y += routed
    if attrs.zero_experts:  # a zero expert returns its input: w . x (weight on input or not)
        identity = np.where(ids >= sizes.experts, weights, F32(0)).sum(axis=1, dtype=F32)
        y += identity[:, None] * x

    if shared_w1 is not None:
        s1 = _as_in_out(shared_w1, lay)
        h = x @ s1
        up = None if shared_w3 is None else x @ _as_in_out(shared_w3, lay)
        s_out = _glu(attrs, h, up, attrs.gate_up_layout) @ _as_in_out(shared_w2, lay)
        if shared_gate is not None:
            s_out = s_out * _sigmoid(x @ shared_gate.astype(F32))[:, None]
        y += s_out
    return y.reshape(X.shape).astype(out_dtype)


def moeffn_from_inputs(attrs: MoEFFNAttrs, inputs: dict, node_name: str = "") -> np.ndarray:
    """:func:`moeffn` with a ``{input name: array}`` dict (missing names are absent inputs)."""
    return moeffn(attrs, **inputs, node_name=node_name)
