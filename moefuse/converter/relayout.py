"""A verified block's in_out expert weights stored out_in (``convert --weight-layout out_in``).

The CUDA kernel computes from out_in weights: for constant in_out weights it makes a transposed
device copy of its own at session creation, which sits beside onnxruntime's copy of the
initializers, so those weights take twice their size in GPU memory. Stored out_in, the kernel
reads onnxruntime's copy as it is. The CPU kernel packs either layout alike.

The reading is the verified one with every projection matrix transposed and the layout attribute
switched, which the op spec defines as the same function; the transposed values are copies, never
rounded. A stored matrix also read outside the block (by a node or a subgraph) keeps the block
in_out: transposing it would store it twice in the model. One the in_out reading had transposed
(a torch Linear's [out, in] weight) is then read as stored.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from .graph import GraphIndex
from .lift import Hypothesis, Operand

# the MoEFFN inputs whose layout weight_layout names (biases and shared_gate never change shape)
PROJECTIONS = ("w1", "w2", "w3", "shared_w1", "shared_w2", "shared_w3")


def out_in_reading(g: GraphIndex, h: Hypothesis, region: list) -> tuple[Optional[Hypothesis], str]:
    """The block's reading with out_in weights, or None and why it stays in_out."""
    if h.attrs.weight_layout != "in_out":
        return None, ""
    inside = set(region)
    operands = dict(h.operands)
    for name in PROJECTIONS:
        op = operands.get(name)
        if op is None:
            continue
        if op.reshape is not None:
            return None, f"{name} is read through a reshape"
        tensor = op.ref.initializer
        if tensor is not None and not op.swap:  # stored as read: transposed, it is a new copy
            if tensor in g.graph_outputs or any(c not in inside for c in g.consumers.get(tensor, [])):
                return None, f"{name} ({tensor}) is also read outside the block"
        operands[name] = Operand(op.ref, swap=not op.swap)
    return Hypothesis(dataclasses.replace(h.attrs, weight_layout="out_in"), operands), ""
