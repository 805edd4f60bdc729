"""Tiny random MoE blocks built from transformers' own code, and their MoEFFN reading.

Used by the reference-semantics tests here and by the converter tests (which export the same
blocks with torch and convert them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

torch = None  # imported lazily: only the tests that need transformers pay for it


def _torch():
    global torch
    if torch is None:
        import torch as _t

        torch = _t
    return torch


@dataclass
class Family:
    name: str
    build: Callable  # seed -> torch module taking hidden states [B, S, D]
    to_moeffn: Callable  # module -> (MoEFFNAttrs, {input: array}, logits_fn(x2d) -> logits)
    hidden: int


def _np(t):
    return t.detach().float().numpy().copy()


def _randomize(module, seed):
    t = _torch()
    g = t.Generator().manual_seed(seed)
    with t.no_grad():
        for name, p in sorted(module.named_parameters()):
            p.copy_(t.randn(p.shape, generator=g) / np.sqrt(p.shape[-1]))
        for name, b in sorted(module.named_buffers()):
            if b.is_floating_point():
                b.copy_(t.randn(b.shape, generator=g) * 0.05)
    return module.eval()


def _linear_logits(weight, bias=None):
    w = _np(weight)
    b = None if bias is None else _np(bias)
    return lambda x: x @ w.T + (0 if b is None else b)


def mixtral(seed=0, impl="eager"):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=6,
                        num_experts_per_tok=2, experts_implementation=impl)
    return _randomize(MixtralSparseMoeBlock(cfg), seed)


def qwen3_moe(seed=0, impl="eager"):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8,
                         num_experts_per_tok=3, norm_topk_prob=True,
                         experts_implementation=impl)
    return _randomize(Qwen3MoeSparseMoeBlock(cfg), seed)


def olmoe(seed=0, impl="eager"):
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = OlmoeConfig(hidden_size=32, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=False, experts_implementation=impl)
    return _randomize(OlmoeSparseMoeBlock(cfg), seed)


def qwen2_moe(seed=0, impl="eager"):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=6,
                         num_experts_per_tok=2, shared_expert_intermediate_size=24,
                         norm_topk_prob=False, experts_implementation=impl)
    return _randomize(Qwen2MoeSparseMoeBlock(cfg), seed)


def gpt_oss(seed=0, impl="eager"):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4,
                       num_experts_per_tok=2, experts_implementation=impl)
    module = _randomize(GptOssMLP(cfg), seed)
    return module


def deepseek_v3(seed=0, impl="eager"):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8,
                           num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                           routed_scaling_factor=2.5, norm_topk_prob=True,
                           experts_implementation=impl)
    return _randomize(DeepseekV3MoE(cfg), seed)


def deepseek_v2(seed=0, impl="eager"):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    # group_limited_greedy: groups ranked by their best probability (DeepSeek-V2; V2-Lite is greedy)
    # (fewer kept groups than picks: with the best probability as a group's score, groups limit
    # nothing otherwise, since the top k's groups are always among the k best)
    cfg = DeepseekV2Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=12,
                           num_experts_per_tok=3, n_group=4, topk_group=2,
                           topk_method="group_limited_greedy", n_shared_experts=1,
                           routed_scaling_factor=2.5, experts_implementation=impl)
    return _randomize(DeepseekV2Moe(cfg), seed)


def llama4(seed=0, impl="eager"):
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    cfg = Llama4TextConfig(hidden_size=32, intermediate_size=16, intermediate_size_mlp=24,
                           num_local_experts=4, num_experts_per_tok=1,
                           experts_implementation=impl)
    return _randomize(Llama4TextMoe(cfg), seed)


def granitemoe(seed=0, impl="eager"):
    from transformers import GraniteMoeConfig
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeMoE

    cfg = GraniteMoeConfig(hidden_size=32, intermediate_size=24, num_local_experts=4,
                           num_experts_per_tok=2, experts_implementation=impl)
    return _randomize(GraniteMoeMoE(cfg), seed)


def ernie4_5_moe(seed=0, impl="eager"):
    from transformers import Ernie4_5_MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    cfg = Ernie4_5_MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=6,
                             num_experts_per_tok=2, moe_num_shared_experts=1,
                             experts_implementation=impl)
    m = _randomize(Ernie4_5_MoeSparseMoeBlock(cfg), seed)
    # its selection bias is a parameter: scaled to the probabilities it shifts, so that it changes
    # some picks without making an expert unreachable
    bias = m.gate.moe_statics.e_score_correction_bias
    with _torch().no_grad():
        bias.copy_(_torch().randn(bias.shape, generator=_torch().Generator().manual_seed(seed)) * 0.1)
    return m


def phimoe(seed=0, impl="eager"):
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

    # a threshold wide enough that the sparsemixer's masks keep several experts (0.01 in Phi-3.5)
    cfg = PhimoeConfig(hidden_size=32, intermediate_size=24, num_local_experts=4,
                       num_experts_per_tok=2, router_jitter_noise=0.3, experts_implementation=impl)
    return _randomize(PhimoeSparseMoeBlock(cfg), seed)


def longcat_flash(seed=0, impl="eager"):
    from transformers import LongcatFlashConfig
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE

    # zero experts: ranked after the experts by the router, each returning its input
    cfg = LongcatFlashConfig(hidden_size=32, expert_ffn_hidden_size=16, n_routed_experts=6,
                             zero_expert_num=3, moe_topk=3, routed_scaling_factor=1.5,
                             experts_implementation=impl)
    m = _randomize(LongcatFlashMoE(cfg), seed)
    bias = m.router.e_score_correction_bias  # a buffer that starts at zero: make it matter
    with _torch().no_grad():
        bias.copy_(_torch().randn(bias.shape, generator=_torch().Generator().manual_seed(seed)) * 0.1)
    return m


def _mlp_weights(mlp):
    """gate/up/down of a transformers dense MLP (Linear weights, out_in layout)."""
    return _np(mlp.gate_proj.weight), _np(mlp.up_proj.weight), _np(mlp.down_proj.weight)


def read_out_in_experts(m, attrs_kw, logits_fn, shared=None, shared_gate=None, **extra):
    from moefuse import MoEFFNAttrs

    inputs = {"w1": _np(m.experts.gate_up_proj), "w2": _np(m.experts.down_proj)}
    attrs = MoEFFNAttrs(**attrs_kw)
    if shared is not None:
        g, u, d = _mlp_weights(shared)
        inputs.update(shared_w1=np.concatenate([g, u], axis=0), shared_w2=d)
    if shared_gate is not None:
        inputs["shared_gate"] = _np(shared_gate.weight).reshape(-1)
    inputs.update(extra)
    return attrs, inputs, logits_fn


def read_mixtral(m):
    return read_out_in_experts(m, dict(k=m.gate.top_k, routing="softmax_topk"),
                               _linear_logits(m.gate.weight))


def read_qwen3_moe(m):
    return read_out_in_experts(m, dict(k=m.gate.top_k, normalize_topk=int(m.gate.norm_topk_prob)),
                               _linear_logits(m.gate.weight))


read_olmoe = read_qwen3_moe


def read_qwen2_moe(m):
    return read_out_in_experts(m, dict(k=m.gate.top_k, normalize_topk=int(m.gate.norm_topk_prob)),
                               _linear_logits(m.gate.weight), shared=m.shared_expert,
                               shared_gate=m.shared_expert_gate)


def read_granitemoe(m):  # router: logits (cast to float32), top-k, softmax over the k
    return read_out_in_experts(m, dict(k=m.router.top_k, routing="topk_softmax"),
                               _linear_logits(m.router.weight))


def read_ernie4_5_moe(m):  # softmax; picks by probability + bias, weights the probabilities
    g = m.gate
    return read_out_in_experts(m, dict(k=g.top_k, routing="softmax_topk", normalize_topk=1),
                               _linear_logits(g.weight), shared=m.shared_experts,
                               selection_bias=_np(g.moe_statics.e_score_correction_bias).reshape(-1))


def read_phimoe(m):  # sparsemixer: two arg-maxes, each weighted by a thresholded softmax
    return read_out_in_experts(m, dict(k=2, routing="sparsemixer",
                                       jitter_eps=float(np.float32(m.router.router_jitter_noise))),
                               _linear_logits(m.router.weight))


def read_deepseek_v3(m):
    g = m.gate
    return read_out_in_experts(
        m, dict(k=g.top_k, routing="sigmoid_topk", n_group=g.num_group, topk_group=g.topk_group,
                normalize_topk=int(g.norm_topk_prob),
                routed_scaling_factor=float(g.routed_scaling_factor)),
        _linear_logits(g.weight), shared=m.shared_experts,
        selection_bias=_np(g.e_score_correction_bias))


def read_deepseek_v2(m):  # softmax, group-limited by each group's best probability, no normalization
    g = m.gate
    return read_out_in_experts(
        m, dict(k=g.top_k, routing="softmax_topk", normalize_topk=0, n_group=g.num_group,
                topk_group=g.topk_group, group_score="max",
                routed_scaling_factor=float(g.routed_scaling_factor)),
        _linear_logits(g.weight), shared=m.shared_experts)


def read_longcat_flash(m):  # softmax over experts + zero experts, picks by probability + bias
    r = m.router
    return read_out_in_experts(
        m, dict(k=r.top_k, routing="softmax_topk", normalize_topk=0, zero_experts=m.zero_expert_num,
                routed_scaling_factor=float(r.routed_scaling_factor)),
        _linear_logits(r.classifier.weight), selection_bias=_np(r.e_score_correction_bias))


def read_gpt_oss(m):
    from moefuse import MoEFFNAttrs

    e = m.experts
    attrs = MoEFFNAttrs(k=m.router.top_k, routing="topk_softmax", gate_up_layout="interleaved",
                        weight_layout="in_out", activation_alpha=float(e.alpha),
                        clamp_limit=float(e.limit), up_offset=1.0)
    inputs = {"w1": _np(e.gate_up_proj), "w2": _np(e.down_proj), "b1": _np(e.gate_up_proj_bias),
              "b2": _np(e.down_proj_bias)}
    return attrs, inputs, _linear_logits(m.router.weight, m.router.bias)


def read_llama4(m):
    from moefuse import MoEFFNAttrs

    e = m.experts
    attrs = MoEFFNAttrs(k=m.top_k, routing="sigmoid_topk", normalize_topk=0, weight_on_input=1,
                        weight_layout="in_out")
    g, u, d = _mlp_weights(m.shared_expert)
    inputs = {"w1": _np(e.gate_up_proj), "w2": _np(e.down_proj),
              "shared_w1": np.concatenate([g, u], axis=0).T.copy(), "shared_w2": d.T.copy()}
    return attrs, inputs, _linear_logits(m.router.weight)


FAMILIES = {
    "mixtral": Family("mixtral", mixtral, read_mixtral, 32),
    "qwen3_moe": Family("qwen3_moe", qwen3_moe, read_qwen3_moe, 32),
    "olmoe": Family("olmoe", olmoe, read_olmoe, 32),
    "qwen2_moe": Family("qwen2_moe", qwen2_moe, read_qwen2_moe, 32),
    "gpt_oss": Family("gpt_oss", gpt_oss, read_gpt_oss, 32),
    "deepseek_v2": Family("deepseek_v2", deepseek_v2, read_deepseek_v2, 32),
    "deepseek_v3": Family("deepseek_v3", deepseek_v3, read_deepseek_v3, 32),
    "llama4": Family("llama4", llama4, read_llama4, 32),
    "granitemoe": Family("granitemoe", granitemoe, read_granitemoe, 32),
    "ernie4_5_moe": Family("ernie4_5_moe", ernie4_5_moe, read_ernie4_5_moe, 32),
    "phimoe": Family("phimoe", phimoe, read_phimoe, 32),
    "longcat_flash": Family("longcat_flash", longcat_flash, read_longcat_flash, 32),
}


def block_output(module, x):
    """Run a transformers MoE block on numpy x [B, S, D]; returns numpy [B, S, D]."""
    t = _torch()
    with t.no_grad():
        out = module(t.from_numpy(x))
    if isinstance(out, tuple):
        out = out[0]
    return out.reshape(x.shape).float().numpy()
