"""The converter: find MoE blocks in exported graphs and collapse each into one MoEFFN node.

Pipeline (one module per step):
  region.py   candidates by dataflow: router top-k anchor, block input, logits, block outputs
  lift.py     readings of a block as MoEFFN (weights, routing, activation) and their check
  verify.py   runs a candidate block on its own in onnxruntime (the proof by execution)
  convert.py  orchestration and the graph rewrite
  relayout.py in_out weights stored out_in for the CUDA kernel (convert --weight-layout out_in)
  io.py       safe loading and writing of model files (external data, atomic writes)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import onnx

from .convert import Block, analyze, rewrite
from .io import Spill


@dataclass
class Conversion:
    """What ``convert_model`` did."""

    model: Optional[onnx.ModelProto]  # the converted model, or None when nothing was rewritten
    blocks: list = field(default_factory=list)

    @property
    def converted(self) -> list:
        return [b for b in self.blocks if b.converted]

    @property
    def near_misses(self) -> list:
        return [b for b in self.blocks if not b.converted]


WEIGHT_LAYOUTS = ("as-found", "out_in")


def convert_model(model: onnx.ModelProto, base_dir: str = "", partial: bool = False,
                  progress: Optional[Callable[[str], None]] = None,
                  target: str = "moefuse", weight_layout: str = "as-found",
                  store: Optional[Spill] = None) -> Conversion:
    """Convert every verified MoE block. All-or-nothing unless ``partial``: if any block found
    fails to verify, ``model`` is None and the blocks explain why. ``target="ort"`` writes
    onnxruntime's com.microsoft.MoE for the blocks that fit it (see ort_target.py).
    ``weight_layout="out_in"`` stores MoEFFN nodes' in_out expert weights transposed, so that the
    CUDA kernel needs no copy of its own (see relayout.py); "as-found" keeps the layout read.
    ``store`` (an ``io.Spill``) writes each new tensor of the rewrite to disk as it is made."""
    if target not in ("moefuse", "ort"):
        raise ValueError(f"unknown target {target!r}: expected 'moefuse' or 'ort'")
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"unknown weight_layout {weight_layout!r}: expected one of {WEIGHT_LAYOUTS}")
    g, blocks = analyze(model, base_dir, progress)
    converted = [b for b in blocks if b.converted]
    if not converted or (not partial and len(converted) != len(blocks)):
        return Conversion(None, blocks)
    return Conversion(rewrite(model, g, blocks, target, weight_layout, store), blocks)


__all__ = ["Block", "Conversion", "WEIGHT_LAYOUTS", "convert_model", "analyze", "rewrite"]
