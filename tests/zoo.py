"""MoE layers written the ways people write them, for export tests.

transformers' blocks (tests/families.py) are one way to write an MoE layer; code in the wild has
others. Each module here takes hidden states ``[B, S, D]`` and returns ``[B, S, D]``; each is
small (D=16) so that both exporters and the converter run in well under a second, and each
docstring says which MoEFFN reading it should lift to (or why it must be refused).

Weights are random (seeded) and scaled so that activations stay O(1).

Forms and what the converter sees:

============================ ===================================== ============================
form                         experts stored as                     combine
============================ ===================================== ============================
``switch_top1``              ModuleList of Linear pairs (ReLU)     boolean-mask assignment
``gelu_top2``                ModuleList of Linear pairs + biases   all experts, stack, gather k
``geglu_stacked``            stacked [E, 2I, D], [E, D, I]         gathered per (token, k)
``flash_rank1``              stacked [E, D] down and up vectors    gathered per (token, k)
``dense_onehot``             ModuleList of SwiGLU MLPs             one-hot routing mask, loop
``dense_onehot_reversed``    SwiGLU MLPs, biases, up before gate   one-hot mask, last expert 1st
``sparse_loop``              ModuleList of SwiGLU MLPs + shared    where(ids == e), index_add
``sparse_loop_onehot``       ModuleList of SwiGLU MLPs             where(one_hot[e]), index_add_
``dense_fused_shared``       fused gate/up Linears + gated shared  one-hot weights, loop
``switch_capacity``          ModuleList of Linear pairs (ReLU)     capacity-limited mask (refuse)
``expert_choice``            ModuleList of SwiGLU MLPs             experts pick tokens (refuse)
``skip_empty_loop``          ModuleList of SwiGLU MLPs             loop skipping unused experts
                                                                   (trace keeps only the hit ones)
============================ ===================================== ============================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _init(module: nn.Module, seed: int) -> nn.Module:
    """Seeded weights, each scaled by 1/sqrt(fan-in); biases small but nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return module.eval()


class SwiGLU(nn.Module):
    """A Llama-style gated MLP: down(silu(gate(x)) * up(x)); optionally with biases and with
    the up projection computed before the gate (program order is not a reliable guide)."""

    def __init__(self, d: int, i: int, bias: bool = False, up_first: bool = False):
        super().__init__()
        self.up_first = up_first
        self.gate_proj = nn.Linear(d, i, bias=bias)
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)

    def forward(self, x):
        if self.up_first:
            up = self.up_proj(x)
            gate = self.gate_proj(x)
        else:
            gate = self.gate_proj(x)
            up = self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


# ---------------------------------------------------------------------------------------------
# (a) Switch Transformer style top-1


class SwitchTop1(nn.Module):
    """Switch-Transformer top-1 routing over non-gated ReLU experts (a ModuleList of Linear
    pairs, no biases), written like transformers' SwitchTransformersSparseMLP: a one-hot router
    mask, each expert applied to the tokens its boolean mask column selects, the result scaled by
    the top-1 probability.

    ``selector="argmax"`` picks with ``probs.max(-1)``; ``"topk"`` with ``probs.topk(1)``.
    Reading: softmax_topk, k=1, normalize_topk=0, relu, gated=0, per-expert weight lists.

    Exporter hazard: when an expert receives exactly one token in the trace input, the
    TorchScript tracer specializes that expert's boolean-mask indexing to one row (a Reshape to
    ``[D]``), and the graph fails on other inputs; the dynamo exporter has no such problem.
    """

    def __init__(self, d=16, e=4, i=32, selector="argmax", seed=0):
        super().__init__()
        self.num_experts, self.selector = e, selector
        self.router = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, i, bias=False), nn.ReLU(), nn.Linear(i, d, bias=False))
            for _ in range(e))
        _init(self, seed)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(h), dim=-1)
        if self.selector == "argmax":
            top_p, top_i = probs.max(dim=-1)
        else:
            top_p, top_i = probs.topk(1, dim=-1)
            top_p, top_i = top_p[:, 0], top_i[:, 0]
        router_mask = F.one_hot(top_i, self.num_experts)
        next_states = h.clone()
        for idx, expert in enumerate(self.experts):
            token_indices = router_mask[:, idx].bool()
            next_states[token_indices] = expert(h[token_indices])
        return (top_p.unsqueeze(-1) * next_states).reshape(shape)


# ---------------------------------------------------------------------------------------------
# (b) GELU non-gated, top-2 without renormalization


class GeluTop2(nn.Module):
    """Non-gated GELU experts with biases (``fc2(gelu(fc1(x)))`` as in NLLB-MoE / fairseq),
    softmax over all experts then top-2 without renormalization. Written "compute every expert,
    then pick" on the ``[B, S, D]`` input as it comes (no flattening, so the TorchScript
    exporter writes each Linear as MatMul + Add): the expert outputs are stacked to
    ``[B, S, E, D]`` and the k selected rows gathered with ``torch.gather``. Nothing in the
    graph names an expert index, so the per-expert weights are matched to experts by program
    order.

    Reading: softmax_topk, k=2, normalize_topk=0, gelu, gated=0, b1 and b2, weight lists.
    """

    def __init__(self, d=16, e=4, i=24, k=2, seed=1):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, i), nn.GELU(), nn.Linear(i, d)) for _ in range(e))
        _init(self, seed)

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)                      # [B, S, k]
        every = torch.stack([expert(x) for expert in self.experts], dim=-2)  # [B, S, E, D]
        index = top_i.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])
        picked = torch.gather(every, -2, index)                        # [B, S, k, D]
        return (picked * top_p.unsqueeze(-1)).sum(dim=-2)


# ---------------------------------------------------------------------------------------------
# (c) GeGLU gated, stacked weights gathered per (token, slot)


class GeGLUStacked(nn.Module):
    """GeGLU experts (``gelu_tanh(gate) * up``, Gemma style) stored as stacked parameters in
    torch Linear layout: ``gate_up [E, 2I, D]`` (gate rows first) and ``down [E, D, I]``.
    Routing takes the top-k logits and a softmax over them (GPT-OSS style). Each (token, slot)
    pair gathers its expert's matrices and multiplies with einsum.

    Reading: topk_softmax, k=2, gelu_tanh, gated halves, out_in, the stacks reused as they are.
    """

    def __init__(self, d=16, e=6, i=12, k=2, seed=2):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, e, bias=False)
        self.gate_up = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down = nn.Parameter(torch.empty(e, d, i))
        _init(self, seed)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        top_l, top_i = self.router(h).topk(self.k, dim=-1)
        w = torch.softmax(top_l, dim=-1)
        hk = torch.einsum("td,tkid->tki", h, self.gate_up[top_i])
        gate, up = hk.chunk(2, dim=-1)
        a = F.gelu(gate, approximate="tanh") * up
        y = torch.einsum("tki,tkdi->tkd", a, self.down[top_i])
        return (y * w.unsqueeze(-1)).sum(dim=1).reshape(shape)


# ---------------------------------------------------------------------------------------------
# (d) rank-1 "flash expert" layer


class FlashRank1(nn.Module):
    """A PEER-style layer of many rank-1 experts: expert e is a down vector ``d_e`` and an up
    vector ``u_e`` (rows of ``down [E, D]`` and ``up [E, D]``). Top-k on the router logits,
    softmax over the k; token output ``sum_k w_k * silu(x . d_e) * u_e``, computed by gathering
    the selected rows only (export-friendly, no loop).

    Reading: topk_softmax, silu, gated=0, intermediate size 1 (w1 = down as [E, 1, D], w2 = up
    as [E, D, 1], out_in).
    """

    def __init__(self, d=16, e=4096, k=8, seed=3):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, e, bias=False)
        self.down = nn.Parameter(torch.empty(e, d))
        self.up = nn.Parameter(torch.empty(e, d))
        _init(self, seed)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        top_l, top_i = self.router(h).topk(self.k, dim=-1)
        w = torch.softmax(top_l, dim=-1)                      # [T, k]
        score = (self.down[top_i] * h.unsqueeze(1)).sum(-1)   # [T, k]
        coef = F.silu(score) * w
        return (coef.unsqueeze(-1) * self.up[top_i]).sum(dim=1).reshape(shape)


# ---------------------------------------------------------------------------------------------
# (e) the export-friendly static loop with one-hot masks


class DenseOneHot(nn.Module):
    """The usual export-friendly rewrite: every expert runs on every token and one-hot routing
    masks select. Mixtral routing (softmax, top-2, renormalize); the k weights are scattered into
    a dense ``[T, E]`` matrix and ``out += mask[:, e:e+1] * expert_e(x)`` over a ModuleList of
    SwiGLU experts (gate/up/down Linear, no biases).

    Reading: softmax_topk, k=2, normalize_topk=1, gated silu separate, weight lists tied to
    experts by the constant column each mask slice takes. With ``reverse=True`` the loop runs
    from the last expert to the first (program order no longer gives the expert index) and the
    experts have biases and compute their up projection before the gate.
    """

    def __init__(self, d=16, e=4, i=24, k=2, reverse=False, seed=4):
        super().__init__()
        self.num_experts, self.k, self.reverse = e, k, reverse
        self.router = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, i, bias=reverse, up_first=reverse)
                                     for _ in range(e))
        _init(self, seed)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(h), dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        dense = torch.zeros_like(probs).scatter(1, top_i, top_p)   # [T, E]
        out = torch.zeros_like(h)
        order = range(self.num_experts - 1, -1, -1) if self.reverse else range(self.num_experts)
        for e in order:
            out = out + dense[:, e:e + 1] * self.experts[e](h)
        return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# (f) per-expert sparse loop


class SparseLoop(nn.Module):
    """The per-expert sparse loop: for each expert, the (token, slot) pairs routed to it are
    found with ``torch.where(ids == e)``, those tokens gathered, run through the expert, scaled
    by their routing weight and accumulated with ``index_add``. DeepSeek-style routing (sigmoid
    scores, top-k, renormalize) and an ungated shared SwiGLU expert added to the routed output.

    Reading: sigmoid_topk, normalize_topk=1, gated silu separate, shared expert (w1/w3/w2),
    weight lists tied to experts through ``Equal(ids, e)``.
    """

    def __init__(self, d=16, e=4, i=20, k=2, shared_i=24, seed=5):
        super().__init__()
        self.num_experts, self.k = e, k
        self.router = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, i) for _ in range(e))
        self.shared = SwiGLU(d, shared_i)
        _init(self, seed)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        scores = torch.sigmoid(self.router(h))
        top_s, top_i = scores.topk(self.k, dim=-1)
        top_s = top_s / top_s.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(top_i == e)
            y = expert(h[tok]) * top_s[tok, slot].unsqueeze(-1)
            out = out.index_add(0, tok, y)
        return (out + self.shared(h)).reshape(shape)


class SparseLoopOneHot(nn.Module):
    """transformers' eager experts loop rewritten to trace: ``expert_mask = one_hot(ids, E)
    .permute(2, 1, 0)``, then for every expert (``range(E)``, not the experts hit)
    ``slot, tok = torch.where(expert_mask[e])`` and an in-place ``index_add_``. Per-expert
    SwiGLU modules; routing on the top-k logits with a softmax over the k.

    Reading: topk_softmax (or its softmax_topk+norm equivalent), gated silu separate, weight
    lists tied to experts by ``Gather(expert_mask, e)``.
    """

    def __init__(self, d=16, e=8, i=12, k=2, seed=8):
        super().__init__()
        self.num_experts, self.k = e, k
        self.router = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, i) for _ in range(e))
        _init(self, seed)

    def forward(self, x):
        shape = x.shape
        h = x.view(-1, shape[-1])
        top_l, top_i = torch.topk(self.router(h), self.k, dim=-1)
        w = torch.softmax(top_l, dim=-1)
        out = torch.zeros_like(h)
        expert_mask = F.one_hot(top_i, self.num_experts).permute(2, 1, 0)   # [E, k, T]
        for e in range(self.num_experts):
            slot, tok = torch.where(expert_mask[e])
            out.index_add_(0, tok, self.experts[e](h[tok]) * w[tok, slot, None])
        return out.view(shape)


class DenseFusedShared(nn.Module):
    """Per-expert fused gate/up ``Linear(D, 2I)`` (gate half first, ``chunk(2)``) and down
    ``Linear(I, D)``, both with biases, on the ``[B, S, D]`` input as it comes; dense routing
    weights from ``(one_hot(ids) * weights).sum(-2)``; a Qwen2-MoE style shared expert scaled
    by ``sigmoid(x . g)``. Softmax then top-2 without renormalization.

    Reading: softmax_topk, normalize_topk=0, gated silu halves, b1/b2, gated shared expert.
    """

    def __init__(self, d=16, e=6, i=12, k=2, shared_i=20, seed=9):
        super().__init__()
        self.num_experts, self.k = e, k
        self.router = nn.Linear(d, e, bias=False)
        self.gate_up = nn.ModuleList(nn.Linear(d, 2 * i) for _ in range(e))
        self.down = nn.ModuleList(nn.Linear(i, d) for _ in range(e))
        self.shared = SwiGLU(d, shared_i)
        self.shared_gate = nn.Linear(d, 1, bias=False)
        _init(self, seed)

    def forward(self, x):
        probs = torch.softmax(self.router(x), dim=-1)
        w, idx = probs.topk(self.k, dim=-1)
        dense = (F.one_hot(idx, self.num_experts).to(x.dtype) * w.unsqueeze(-1)).sum(-2)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            gate, up = self.gate_up[e](x).chunk(2, dim=-1)
            out = out + dense[..., e:e + 1] * self.down[e](F.silu(gate) * up)
        return out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)


# ---------------------------------------------------------------------------------------------
# (g) capacity-limited Switch router (must be refused)


class SwitchCapacity(nn.Module):
    """Switch-Transformer routing with an expert capacity: a token's position in its expert's
    queue is the cumulative sum of the one-hot router mask over tokens; tokens past ``capacity``
    are dropped (their output is zero), as in transformers' SwitchTransformersTop1Router.

    MoEFFN has no capacity: the converter must refuse this block, naming the capacity, even when
    its random probes happen to overflow no expert.
    """

    def __init__(self, d=16, e=4, i=32, capacity=2, seed=6):
        super().__init__()
        self.num_experts, self.capacity = e, capacity
        self.router = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, i, bias=False), nn.ReLU(), nn.Linear(i, d, bias=False))
            for _ in range(e))
        _init(self, seed)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(h), dim=-1)
        top_p, top_i = probs.max(dim=-1)
        mask = F.one_hot(top_i, self.num_experts).to(h.dtype)      # [T, E]
        priority = torch.cumsum(mask, dim=0)                        # position in the queue
        mask = mask * (priority <= self.capacity).to(h.dtype)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            out = out + mask[:, e:e + 1] * expert(h)
        return (out * top_p.unsqueeze(-1)).reshape(shape)


class ExpertChoice(nn.Module):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-``capacity`` tokens
    (a top-k over the token axis of the ``[T, E]`` scores) and the tokens it took are updated
    with ``index_add``. Every expert gets the same number of tokens; a token may get none or
    many. Not MoEFFN's token-choice routing: the converter must refuse it.
    """

    def __init__(self, d=16, e=4, i=12, capacity=2, seed=10):
        super().__init__()
        self.num_experts, self.capacity = e, capacity
        self.router = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, i) for _ in range(e))
        _init(self, seed)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(h), dim=-1)          # [T, E]
        w, tok = probs.topk(self.capacity, dim=0)              # [C, E]
        out = torch.zeros_like(h)
        for e in range(self.num_experts):
            y = self.experts[e](h[tok[:, e]]) * w[:, e:e + 1]
            out = out.index_add(0, tok[:, e], y)
        return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# (h) loops that the TorchScript tracer unrolls for the trace input only


class SkipEmptyLoop(nn.Module):
    """A per-expert loop that skips experts no token chose (``if not mask.any(): continue``), a
    common speed-up in hand-written MoE code. The TorchScript tracer turns the ``if`` into a
    constant: the graph keeps only the experts the trace input hit, runs on any input and
    silently ignores the others. The converter must refuse it, naming the surviving experts.
    """

    def __init__(self, d=16, e=8, i=16, k=1, seed=7):
        super().__init__()
        self.num_experts, self.k = e, k
        self.router = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, i) for _ in range(e))
        _init(self, seed)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(h), dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            hit = top_i == e
            if not bool(hit.any()):
                continue
            tok, slot = torch.where(hit)
            out = out.index_add(0, tok, expert(h[tok]) * top_p[tok, slot].unsqueeze(-1))
        return out.reshape(shape)


class ZooStack(nn.Module):
    """Several zoo blocks as pre-norm residual layers: ``x = x + block(LayerNorm(x))``."""

    def __init__(self, forms, seed=0):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(16) for _ in forms)
        self.blocks = nn.ModuleList(FORMS[f](seed=seed + j) for j, f in enumerate(forms))

    def forward(self, x):
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return x


def transformers_eager_block(family: str = "mixtral", seed: int = 0):
    """A transformers MoE block with ``experts_implementation="eager"``: the loop over
    ``expert_hit`` (the experts some token chose) that the TorchScript tracer unrolls for the
    trace input. The graph runs only on inputs that hit as many experts as the trace input did."""
    from families import FAMILIES

    return FAMILIES[family].build(seed=seed, impl="eager")


FORMS = {
    "switch_top1": SwitchTop1,
    "gelu_top2": GeluTop2,
    "geglu_stacked": GeGLUStacked,
    "flash_rank1": FlashRank1,
    "dense_onehot": DenseOneHot,
    "dense_onehot_reversed": lambda **kw: DenseOneHot(reverse=True, **kw),
    "sparse_loop": SparseLoop,
    "sparse_loop_onehot": SparseLoopOneHot,
    "dense_fused_shared": DenseFusedShared,
    "switch_capacity": SwitchCapacity,
    "expert_choice": ExpertChoice,
    "skip_empty_loop": SkipEmptyLoop,
}
