"""Speaking onnxruntime's own MoE: emit com.microsoft.MoE where a block fits it.

What com.microsoft.MoE computes (onnxruntime 1.32, CPU execution provider; pinned by
tests/test_ort_target.py against the real onnxruntime):

- inputs: input [.., D], router_probs [T, E] (the logits: the op applies softmax over all E),
  fc1_experts_weights [E, N1, D], fc1_experts_bias [E, N1], fc2_experts_weights [E, D, I],
  fc2_experts_bias [E, D], fc3_* (not implemented on CPU);
- routing: softmax over all experts, top-k, renormalized when normalize_routing_weights=1;
- activation_type relu | gelu (the tanh approximation on CPU) | silu | identity, non-gated, or
  swiglu: gate and up interleaved in fc1 (swiglu_fusion=1; the CPU kernel refuses 2),
  out = gate * sigmoid(activation_alpha * gate) * (up + activation_beta), with
  gate = min(gate, swiglu_limit) and up = clip(up, ±swiglu_limit) when swiglu_limit is set
  (defaults: alpha 1, beta 0, no clamp; an explicit swiglu_limit of 0 clamps to zero);
- no shared expert, no scaling factor, no sigmoid or grouped routing, no weight-on-input, no zero
  experts.

A shared expert is emitted next to the node as standard ops (MatMul, activation, Add). Before a
block is written with it, `runs_here` runs the op for the block's configuration in the installed
onnxruntime (1.23.1 and newer run it on the CPU; older ones have no usable CPU kernel for it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..builder import tensor_from_array
from ..function import Body, shared_expert
from ..spec import MoEFFNAttrs
from .graph import swapped_last_axes

ORT_DOMAIN = "com.microsoft"
ORT_OP = "MoE"


def fit(attrs: MoEFFNAttrs, operands: dict, dtype) -> str:
    """'' when the block fits com.microsoft.MoE on the CPU EP, else the reason it does not."""
    if np.dtype(dtype).name not in ("float32", "float16"):
        return f"com.microsoft.MoE has no {np.dtype(dtype).name} kernel on CPU"
    if attrs.routing == "sigmoid_topk":
        return "sigmoid routing (com.microsoft.MoE routes by softmax only)"
    if attrs.routing == "precomputed":
        return "precomputed routing (com.microsoft.MoE takes router logits)"
    if attrs.routing == "sparsemixer":  # its CPU kernel ignores use_sparse_mixer (ort_ingest.py)
        return "sparsemixer routing (com.microsoft.MoE's CPU kernel ignores use_sparse_mixer)"
    if attrs.n_group > 1:
        return "group-limited routing (com.microsoft.MoE ranks all experts)"
    if attrs.zero_experts:
        return "zero experts"
    if attrs.routed_scaling_factor != 1.0:
        return f"routed_scaling_factor {attrs.routed_scaling_factor:g}"
    if attrs.weight_on_input:
        return "routing weight applied to the expert input"
    if "selection_bias" in operands:
        return "selection bias"
    if attrs.gated:
        if attrs.activation != "silu":
            return (f"gated {attrs.activation} (com.microsoft.MoE's only gated activation is "
                    f"swiglu)")
    else:
        if attrs.activation == "gelu":
            return "erf GELU (com.microsoft.MoE's CPU gelu is the tanh approximation)"
        if attrs.activation_alpha != 1.0:
            return "silu with alpha on a non-gated expert"
    return ""


def _interleave(gate: np.ndarray, up: np.ndarray, axis: int) -> np.ndarray:
    shape = list(gate.shape)
    shape[axis] *= 2
    out = np.empty(shape, dtype=gate.dtype)
    idx = [slice(None)] * len(shape)
    idx[axis] = slice(0, None, 2)
    out[tuple(idx)] = gate
    idx[axis] = slice(1, None, 2)
    out[tuple(idx)] = up
    return out


def _out_in(a: np.ndarray, attrs: MoEFFNAttrs) -> np.ndarray:
    return a if attrs.weight_layout == "out_in" else swapped_last_axes(a)


def ort_weights(attrs: MoEFFNAttrs, arrays: dict) -> dict:
    """fc1/fc2 (and biases) in com.microsoft.MoE's layout: out_in, swiglu interleaved."""
    w1, w2 = _out_in(arrays["w1"], attrs), _out_in(arrays["w2"], attrs)
    b1 = arrays.get("b1")
    if attrs.gated:
        if attrs.gate_up_layout == "separate":
            gate, up = w1, _out_in(arrays["w3"], attrs)
            gb, ub = b1, arrays.get("b3")
        elif attrs.gate_up_layout == "halves":
            i = w1.shape[1] // 2
            gate, up = w1[:, :i], w1[:, i:]
            gb, ub = (None, None) if b1 is None else (b1[:, :i], b1[:, i:])
        else:
            gate = up = None
        if gate is not None:
            w1 = _interleave(gate, up, axis=1)
            if gb is not None or ub is not None:
                zeros = np.zeros((w1.shape[0], w1.shape[1] // 2), dtype=w1.dtype)
                b1 = _interleave(zeros if gb is None else gb, zeros if ub is None else ub, axis=1)
    out = {"fc1": w1, "fc2": w2}
    if b1 is not None:
        out["fc1_bias"] = b1
    if "b2" in arrays:
        out["fc2_bias"] = arrays["b2"]
    return out


def node_attributes(attrs: MoEFFNAttrs) -> dict:
    out = {"k": attrs.k,
           "normalize_routing_weights": int(attrs.routing == "topk_softmax" or attrs.normalize_topk)}
    if attrs.gated:
        out.update(activation_type="swiglu", swiglu_fusion=1)
        if attrs.activation_alpha != 1.0:
            out["activation_alpha"] = attrs.activation_alpha
        if attrs.up_offset:
            out["activation_beta"] = attrs.up_offset
        if attrs.clamp_limit > 0:
            out["swiglu_limit"] = attrs.clamp_limit
    else:
        out["activation_type"] = {"gelu_tanh": "gelu"}.get(attrs.activation, attrs.activation)
    return out


def emit(name: str, attrs: MoEFFNAttrs, x: str, logits: str, out: str, arrays: dict,
         unique) -> tuple[list, list]:
    """Nodes and new initializers computing the block with com.microsoft.MoE."""
    weights = ort_weights(attrs, arrays)
    inits, names = [], {}
    for key, array in weights.items():
        names[key] = unique(f"{name}.{key}")
        inits.append(tensor_from_array(np.ascontiguousarray(array), names[key]))
    inputs = [x, logits, names["fc1"], names.get("fc1_bias", ""), names["fc2"],
              names.get("fc2_bias", "")]
    while inputs[-1] == "":
        inputs.pop()
    shared = "shared_w1" in arrays
    moe_out = unique(f"{name}/routed") if shared else out
    nodes = [helper.make_node(ORT_OP, inputs, [moe_out], name=name, domain=ORT_DOMAIN,
                              **node_attributes(attrs))]
    if shared:
        more_nodes, more_inits = _shared_expert(name, attrs, x, moe_out, out, arrays, unique)
        nodes += more_nodes
        inits += more_inits
    return nodes, inits


def runs_here(attrs: MoEFFNAttrs, present: frozenset, dtype, cache: dict) -> str:
    """'' when the installed onnxruntime runs com.microsoft.MoE for this configuration (the
    block's attributes, which of its inputs are present, its type) and matches the reference on
    a small random layer of it; else why not. onnxruntime before 1.23.1 has no usable CPU kernel
    for the op (1.20.1 and 1.23.0 have none; 1.20.1 also lacks its SwiGLU attributes) and would
    refuse the written model.
    `cache` holds the answers of one conversion."""
    import onnxruntime as ort

    from ..compare import max_relative_error
    from ..reference import moeffn
    from ..synthetic import random_inputs

    key = (attrs, present, np.dtype(dtype).name)
    if key in cache:
        return cache[key]
    shared = "shared_w1" in present
    inputs = random_inputs(attrs, 3, 16, 8, max(attrs.k, 4), biases=bool(present & {"b1", "b2", "b3"}),
                           shared_inter=8 if shared else 0, shared_gate="shared_gate" in present,
                           dtype=np.dtype(dtype).type, seed=0)
    for bias in ("b1", "b2", "b3"):  # the block's biases exactly (random_inputs draws all or none)
        if bias not in present:
            inputs.pop(bias, None)
    x, logits = inputs.pop("X"), inputs.pop("router_logits")
    nodes, inits = emit("check", attrs, "x", "logits", "y", inputs, lambda t: t)
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "ort_target_check",
                              [helper.make_tensor_value_info("x", et, list(x.shape)),
                               helper.make_tensor_value_info("logits", et, list(logits.shape))],
                              [helper.make_tensor_value_info("y", et, list(x.shape))], initializer=inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid(ORT_DOMAIN, 1)])
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x, "logits": logits})[0].astype(np.float32)
    except Exception as e:  # onnxruntime's own message names what it lacks: its last clause
        said = " ".join(str(e).split())
        said = said.rsplit(" Error ", 1)[-1] if " Error " in said else said.split(" : ")[-1]
        cache[key] = f"this onnxruntime ({ort.__version__}) cannot run it: {said[:160]}"
        return cache[key]
    want = moeffn(attrs, x.astype(np.float32), logits.astype(np.float32),
                  **{n: a.astype(np.float32) for n, a in inputs.items()})
    err = max_relative_error(want, got)
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 2e-2
    cache[key] = "" if err <= tol else (f"this onnxruntime ({ort.__version__}) computes it "
                                        f"differently (max relative error {err:.1e})")
    return cache[key]


def _shared_expert(name, attrs, x, routed, out, arrays, unique):
    """routed + [sigmoid(x . g) *] FFN_shared(x), as standard ops computing in float32."""
    b = Body(prefix=unique(f"{name}/shared") + "/")
    inits, names = [], {}
    for key in ("shared_w1", "shared_w2", "shared_w3", "shared_gate"):
        if key in arrays:
            names[key] = unique(f"{name}.{key}")
            inits.append(tensor_from_array(np.ascontiguousarray(arrays[key]), names[key]))
    rows = b.op("Flatten", b.op("Cast", x, to=onnx.TensorProto.FLOAT), axis=-1)
    shared = b.op("Reshape", shared_expert(b, attrs, rows, names), b.op("Shape", x))
    b.nodes.append(helper.make_node("Add", [routed, b.op("CastLike", shared, x)], [out],
                                    name=unique(f"{name}/shared/out")))
    return b.nodes, inits
