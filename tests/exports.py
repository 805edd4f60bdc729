"""Exporting torch modules to ONNX at test time, the way users do it.

Both exporters are covered: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript) and
the TorchScript tracer (``dynamo=False``). Every export marks the batch and sequence dims
dynamic, writes one self-contained file (no external data) and caps the IR version at 10, the
newest onnxruntime 1.20+ reads.

- :func:`export_module` exports any module taking one activation tensor.
- :func:`export_family_block` exports a transformers MoE block of tests/families.py built with
  ``experts_implementation="batched_mm"``.
- :func:`export_family_decoder` exports a whole tiny decoder (2 layers, ``use_cache=False``):
  ``input_ids [B, S] -> logits [B, S, V]``, dynamo only.

Whole-decoder dynamo exports checked with torch 2.13 / transformers 5.24: Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, DeepSeek-V3 (a dense first layer through ``first_k_dense_replace=1``) and
GPT-OSS export and run in onnxruntime (and Ernie-4.5-MoE and GraniteMoE, with transformers 5.25);
Llama-4 and DeepSeek-V2 (5.25) do not (their rotary embeddings use complex tensors, which the
dynamo exporter cannot translate).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Optional, Sequence

import onnx

MAX_IR_VERSION = 10
OPSET = 18

EXPORTERS = ("dynamo", "torchscript")


def _torch():
    import torch

    return torch


@contextlib.contextmanager
def _quiet():
    """Exporters print progress and warn about tracing; tests only care about the result."""
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield


def finish(path: str) -> onnx.ModelProto:
    """Load an exported file, cap its IR version, save it back in one file; return the model."""
    model = onnx.load(str(path))
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    onnx.save(model, str(path))
    return model


def export_module(module, example, path, exporter: str = "dynamo",
                  dynamic: Optional[Sequence[int]] = None, input_name: str = "x",
                  output_name: str = "y", opset: int = OPSET) -> onnx.ModelProto:
    """Export ``module(example)`` to ``path`` and return the loaded model.

    ``dynamic`` lists the input dims to mark dynamic: default all but the last (batch and
    sequence for [B, S, D], tokens for [T, D]). The output is named ``output_name`` (dynamo names
    it after the module's return value otherwise).
    """
    torch = _torch()
    module = module.eval()
    path = str(path)
    if dynamic is None:
        dynamic = list(range(example.dim() - 1))
    names = ["batch", "seq", "d2", "d3"]
    dims = {i: names[j] for j, i in enumerate(dynamic)}
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            shapes = ({i: torch.export.Dim(n, min=1, max=4096) for i, n in dims.items()},)
            prog = torch.onnx.export(module, (example,), dynamo=True, input_names=[input_name],
                                     output_names=[output_name], dynamic_shapes=shapes,
                                     verbose=False)
            prog.save(path, external_data=False)
        elif exporter == "torchscript":
            torch.onnx.export(module, (example,), path, dynamo=False, input_names=[input_name],
                              output_names=[output_name], opset_version=opset,
                              dynamic_axes={input_name: dims, output_name: dims})
        else:
            raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    return finish(path)


# ---------------------------------------------------------------------------------------------
# transformers blocks and decoders


def export_family_block(name: str, exporter: str, path, seed: int = 0,
                        example_shape=(2, 5)) -> onnx.ModelProto:
    """Export the tests/families.py block ``name`` built with experts_implementation=batched_mm.

    Input ``x [B, S, D]`` with B and S dynamic, output ``y``.
    """
    from families import FAMILIES

    torch = _torch()
    fam = FAMILIES[name]
    module = fam.build(seed=seed, impl="batched_mm")
    example = torch.randn(*example_shape, fam.hidden, generator=torch.Generator().manual_seed(seed))
    return export_module(first_output(module), example, path, exporter)


def _wrapped(inner, forward):
    """``inner`` in a torch module whose forward is ``forward(inner, x)``: the call to export."""
    torch = _torch()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return forward(self.inner, x)

    return Wrapped()


def _first(module, x):
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def first_output(module):
    """``module`` returning only its first output (blocks that also return router logits)."""
    return _wrapped(module, _first)


VOCAB = 64

DECODERS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
# Known not to export with the dynamo exporter (see the module docstring).
DECODERS_FAILING = ("llama4",)


def family_decoder(name: str, seed: int = 0):
    """A tiny 2-layer transformers causal LM of family ``name`` with random weights.

    Returns ``(model, moe_layers)``: the module and how many of its layers are MoE blocks.
    """
    import transformers

    torch = _torch()
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
                  experts_implementation="batched_mm", pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    moe_layers = 2
    if name == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=24, num_local_experts=4,
                                         num_experts_per_tok=2, **common)
        cls = transformers.MixtralForCausalLM
    elif name == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16,
                                          num_experts=4, num_experts_per_tok=2,
                                          shared_expert_intermediate_size=24, **common)
        cls = transformers.Qwen2MoeForCausalLM
    elif name == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16,
                                          num_experts=4, num_experts_per_tok=2, head_dim=8,
                                          norm_topk_prob=True, **common)
        cls = transformers.Qwen3MoeForCausalLM
    elif name == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=16, num_experts=4,
                                       num_experts_per_tok=2, **common)
        cls = transformers.OlmoeForCausalLM
    elif name == "deepseek_v3":
        # Multi-head latent attention needs as many kv heads as heads; layer 0 is dense.
        cfg = transformers.DeepseekV3Config(
            intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
            routed_scaling_factor=2.5, first_k_dense_replace=1, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            **{**common, "num_key_value_heads": 4})
        cls = transformers.DeepseekV3ForCausalLM
        moe_layers = 1
    elif name == "gpt_oss":
        cfg = transformers.GptOssConfig(intermediate_size=16, num_local_experts=4,
                                        num_experts_per_tok=2, head_dim=8, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"],
                                        **common)
        cls = transformers.GptOssForCausalLM
    elif name == "llama4":
        cfg = transformers.Llama4TextConfig(intermediate_size=16, intermediate_size_mlp=24,
                                            num_local_experts=4, num_experts_per_tok=1,
                                            head_dim=8, **common)
        cls = transformers.Llama4ForCausalLM
    elif name == "granitemoe":
        cfg = transformers.GraniteMoeConfig(intermediate_size=16, num_local_experts=4,
                                            num_experts_per_tok=2, **common)
        cls = transformers.GraniteMoeForCausalLM
    elif name == "ernie4_5_moe":
        cfg = transformers.Ernie4_5_MoeConfig(intermediate_size=48, moe_intermediate_size=16,
                                              num_experts=4, num_experts_per_tok=2,
                                              moe_num_shared_experts=1, moe_layer_start_index=0,
                                              head_dim=8, **common)
        cls = transformers.Ernie4_5_MoeForCausalLM
    else:
        raise ValueError(f"no tiny decoder for family {name!r}")
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # Router biases and selection biases start at zero: make them matter. (Ernie-4.5 keeps its
    # selection bias as a parameter.)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for pname, b in model.named_buffers():
            if b.is_floating_point() and "bias" in pname:
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
        for pname, b in model.named_parameters():
            if pname.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model, moe_layers


def _logits(lm, input_ids):
    """input_ids -> logits, without a cache (what a one-shot ONNX export wants)."""
    return lm(input_ids=input_ids, use_cache=False).logits


def export_family_decoder(name: str, path, seed: int = 0):
    """Export a whole tiny decoder of family ``name`` with the dynamo exporter.

    Input ``input_ids [B, S]`` (int64, B and S dynamic), output ``logits [B, S, VOCAB]``.
    Returns ``(onnx model, torch module taking input_ids, number of MoE layers)``.
    """
    torch = _torch()
    lm, moe_layers = family_decoder(name, seed)
    wrapped = _wrapped(lm, _logits).eval()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
    with _quiet(), torch.no_grad():
        shapes = ({0: torch.export.Dim("batch", min=1, max=64),
                   1: torch.export.Dim("seq", min=1, max=64)},)
        prog = torch.onnx.export(wrapped, (ids,), dynamo=True, input_names=["input_ids"],
                                 output_names=["logits"], dynamic_shapes=shapes, verbose=False)
        prog.save(str(path), external_data=False)
    return finish(path), wrapped, moe_layers


# ---------------------------------------------------------------------------------------------
# running


def run_onnx(model_or_path, feeds: dict):
    """Run in stock onnxruntime (CPU, no custom-op library); returns the first output."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) \
        else os.fspath(model_or_path)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]
