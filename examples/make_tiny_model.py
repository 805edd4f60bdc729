"""Make examples/tiny_mixtral.onnx: a 2-layer Mixtral-style decoder from transformers' own code.

Random weights (seeded), tiny sizes, exported whole with torch.onnx.export(dynamo=True) and the
experts implementation that exports today (batched_mm). Run: python examples/make_tiny_model.py
"""

import os
import sys
import warnings

import onnx
import torch
from transformers import MixtralConfig, MixtralForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))


class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                        experts_implementation="batched_mm")
    return LogitsOnly(MixtralForCausalLM(cfg).eval())


def export(path: str, seed: int = 0) -> str:
    model = build(seed)
    ids = torch.randint(0, 256, (1, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        torch.onnx.export(model, (ids,), path, dynamo=True, input_names=["input_ids"],
                          output_names=["logits"], dynamic_shapes=({0: batch, 1: seq},),
                          external_data=False)
    m = onnx.load(path)
    m.ir_version = min(m.ir_version, 10)
    onnx.save(m, path)
    return path


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "tiny_mixtral.onnx")
    export(out)
    print(f"wrote {out}")
