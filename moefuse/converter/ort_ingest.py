"""Ingest: float com.microsoft.MoE nodes (as model builders write them) become MoEFFN.

The node's attributes map onto MoEFFN (ort_target.py documents the semantics); the reading is
then proven like every other rewrite: the original node runs alone in onnxruntime on random
inputs and must match the reference of the lifted MoEFFN.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..runtime import run
from ..spec import MoEFFNAttrs
from .graph import GraphIndex, np_dtype
from .lift import ConstRef, Hypothesis, Operand, Probe, Refusal, check, probe_shapes
from .ort_target import ORT_DOMAIN, ORT_OP

_INPUTS = ("input", "router_probs", "fc1", "fc1_bias", "fc2", "fc2_bias", "fc3", "fc3_bias")


def ort_moe_nodes(g: GraphIndex):
    for i, node in enumerate(g.nodes):
        if node.op_type == ORT_OP and node.domain == ORT_DOMAIN:
            yield i, node


def quantized_moe_nodes(g: GraphIndex):
    """com.microsoft.QMoE nodes (model builders' int4/int8 experts), with why they stay."""
    for i, node in enumerate(g.nodes):
        if node.op_type == "QMoE" and node.domain == ORT_DOMAIN:
            bits = next((helper.get_attribute_value(a) for a in node.attribute
                         if a.name == "expert_weight_bits"), None)
            held = f"{bits}-bit" if bits else "quantized"
            yield i, node, (f"com.microsoft.QMoE: its experts are {held} weights with scales; "
                            "MoEFFN version 1 takes float experts, so the node stays as it is")


def read(g: GraphIndex, i: int, node: onnx.NodeProto) -> Hypothesis:
    """The MoEFFN reading of a com.microsoft.MoE node (raises Refusal when there is none)."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in a.items()}
    if a.get("use_sparse_mixer", 0):
        # onnxruntime's CPU MoE kernel ignores the attribute (its output equals that of
        # use_sparse_mixer=0: onnxruntime 1.32), so running the node cannot show its routing
        raise Refusal("use_sparse_mixer=1: onnxruntime's CPU kernel ignores it, so the node's "
                      "routing cannot be verified by running it")
    inputs = dict(zip(_INPUTS, list(node.input) + [""] * 8))
    for name in ("fc1", "fc2", "fc1_bias", "fc2_bias", "fc3", "fc3_bias"):
        if inputs[name] and not g.is_constant(inputs[name]):
            raise Refusal(f"input {name} is not a constant")
    if inputs["fc3"]:
        raise Refusal("fc3 (a third projection) cannot be verified: onnxruntime's CPU MoE "
                      "kernel does not implement it")
    act = a.get("activation_type", "relu")
    kw = dict(k=int(a.get("k", 1)), routing="softmax_topk",
              normalize_topk=int(a.get("normalize_routing_weights", 0)), weight_layout="out_in")
    if act == "swiglu":
        fusion = int(a.get("swiglu_fusion", 1))
        if fusion not in (1, 2):
            raise Refusal(f"swiglu_fusion={fusion} without fc3")
        limit = a.get("swiglu_limit")
        if limit is not None and limit <= 0:
            raise Refusal(f"swiglu_limit={limit} (clamps everything to zero)")
        kw.update(activation="silu", gated=1,
                  gate_up_layout="interleaved" if fusion == 1 else "halves",
                  activation_alpha=float(a.get("activation_alpha", 1.0)),
                  up_offset=float(a.get("activation_beta", 0.0)),
                  clamp_limit=float(limit or 0.0))
    elif act in ("relu", "gelu", "silu", "identity"):
        kw.update(activation={"gelu": "gelu_tanh"}.get(act, act), gated=0)
    else:
        raise Refusal(f"activation_type '{act}'")
    operands = {"w1": Operand(ConstRef(inputs["fc1"], i, node, g)),
                "w2": Operand(ConstRef(inputs["fc2"], i, node, g))}
    if inputs["fc1_bias"]:
        operands["b1"] = Operand(ConstRef(inputs["fc1_bias"], i, node, g))
    if inputs["fc2_bias"]:
        operands["b2"] = Operand(ConstRef(inputs["fc2_bias"], i, node, g))
    return Hypothesis(MoEFFNAttrs(**kw), operands)


def probe_node(g: GraphIndex, node: onnx.NodeProto, experts: int, hidden: int) -> list[Probe]:
    """Run the lone node on random input and router logits."""
    x_name, logits_name = node.input[0], node.input[1]
    inits = [g.initializers[t] for t in node.input[2:] if t in g.initializers]
    x_type = g.dtypes.get(x_name, onnx.TensorProto.FLOAT)
    graph = helper.make_graph(
        [node], "ort_moe",
        [helper.make_tensor_value_info(x_name, x_type, None),
         helper.make_tensor_value_info(logits_name, g.dtypes.get(logits_name, x_type), None)],
        [helper.make_tensor_value_info(node.output[0], x_type, None)],
        initializer=[_loaded(g, t) for t in inits])
    model = helper.make_model(graph, opset_imports=list(g.model.opset_import),
                              ir_version=g.model.ir_version)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    dtype = np_dtype(x_type)
    out = []
    for shape in probe_shapes(g.shapes.get(x_name) or ("T", hidden), experts, hidden):
        x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        tokens = int(np.prod(shape[:-1]))
        logits = (rng.standard_normal((tokens, experts), dtype=np.float32) * 2).astype(
            np_dtype(g.dtypes.get(logits_name, x_type)))
        (y,) = run(sess, {x_name: x, logits_name: logits})
        out.append(Probe(x=x, logits=logits, y=y))
    return out


def _loaded(g: GraphIndex, t: onnx.TensorProto) -> onnx.TensorProto:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return t
    from .graph import _load_external

    return _load_external(t, g.base_dir)


def lift_node(g: GraphIndex, i: int, node: onnx.NodeProto):
    """(Hypothesis, probes, error text) for one com.microsoft.MoE node."""
    h = read(g, i, node)
    fc1 = h.operands["w1"].ref.shape
    experts, hidden = int(fc1[0]), int(fc1[2])
    try:
        probes = probe_node(g, node, experts, hidden)
    except Exception as exc:  # noqa: BLE001 - a node onnxruntime cannot run here
        raise Refusal(f"onnxruntime could not run the node on CPU to verify it "
                      f"({str(exc).strip().splitlines()[-1][:160]})") from None
    ok, detail, h2 = check(h, probes, [])
    if not ok:
        raise Refusal(f"the MoEFFN reading does not match the node when run ({detail})")
    return h2, probes, experts, hidden
