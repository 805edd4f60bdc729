"""com.microsoft.MoE as a target and as a source, pinned against the real onnxruntime.

The semantics in moefuse/converter/ort_target.py are what onnxruntime's CPU kernel computes: a
change in a future onnxruntime shows here first.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from exports import export_family_block, run_onnx
from families import FAMILIES
from moefuse import MoEFFNAttrs
from moefuse.compare import max_relative_error
from moefuse.converter import convert_model
from moefuse.converter.ort_target import emit, fit
from moefuse.reference import moeffn
from moefuse.synthetic import random_inputs

E, D, I = 6, 16, 8

FITTING = {
    "swiglu_halves_norm": (dict(k=2), {}),
    "swiglu_halves_raw": (dict(k=2, normalize_topk=0), {}),
    "topk_softmax_interleaved_in_out": (dict(k=2, routing="topk_softmax",
                                             gate_up_layout="interleaved",
                                             weight_layout="in_out"), {}),
    "gptoss_clamp_biases": (dict(k=2, routing="topk_softmax", gate_up_layout="interleaved",
                                 weight_layout="in_out", activation_alpha=1.702,
                                 clamp_limit=7.0, up_offset=1.0), {"biases": True}),
    "swiglu_separate_biases": (dict(k=3, gate_up_layout="separate"), {"biases": True}),
    "relu_plain": (dict(k=1, activation="relu", gated=0), {"biases": True}),
    "gelu_tanh_plain": (dict(k=2, activation="gelu_tanh", gated=0), {}),
    "silu_plain": (dict(k=2, activation="silu", gated=0), {}),
    "identity_plain": (dict(k=2, activation="identity", gated=0), {}),
    "shared_gated": (dict(k=2, normalize_topk=0), {"shared_inter": 8, "shared_gate": True}),
    "shared_separate": (dict(k=2, gate_up_layout="separate"), {"shared_inter": 8}),
    "rank1": (dict(k=4, activation="silu", gated=0, weight_layout="in_out"), {"inter": 1}),
}


def ort_moe_model(attrs, inputs, rank):
    arrays = {n: a for n, a in inputs.items() if n not in ("X", "router_logits")}
    counter = iter(range(10**6))
    nodes, inits = emit("moe", attrs, "X", "router_logits", "Y", arrays,
                        lambda t: f"{t}_{next(counter)}")
    lead = ["B", "S"] if rank == 3 else ["T"]
    graph = helper.make_graph(
        nodes, "ort_moe",
        [helper.make_tensor_value_info("X", 1, lead + [D]),
         helper.make_tensor_value_info("router_logits", 1, ["N", E])],
        [helper.make_tensor_value_info("Y", 1, lead + [D])], initializer=inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("case", sorted(FITTING))
def test_emitted_node_matches_reference(case, rank):
    kw, opts = FITTING[case]
    attrs = MoEFFNAttrs(**kw)
    opts = dict(opts)
    inter = opts.pop("inter", I)
    for t in (1, 3, E + 5):
        lead = (t,) if rank == 2 else (2, t)
        inputs = random_inputs(attrs, lead, D, inter, E, seed=t, **opts)
        inputs["router_logits"] = inputs["router_logits"].reshape(-1, E)
        assert fit(attrs, {n: None for n in inputs}, np.float32) == ""
        got = run_onnx(ort_moe_model(attrs, inputs, rank),
                       {"X": inputs["X"], "router_logits": inputs["router_logits"]})
        want = moeffn(attrs, **inputs)
        assert max_relative_error(want, got) < 1e-5, (case, t)


@pytest.mark.parametrize("attrs,operands,dtype,reason", [
    (MoEFFNAttrs(routing="sigmoid_topk"), {}, np.float32, "sigmoid routing"),
    (MoEFFNAttrs(routing="precomputed"), {}, np.float32, "precomputed routing"),
    (MoEFFNAttrs(n_group=2, group_score="max"), {}, np.float32, "group-limited routing"),
    (MoEFFNAttrs(zero_experts=2), {}, np.float32, "zero experts"),
    (MoEFFNAttrs(routed_scaling_factor=2.5), {}, np.float32, "routed_scaling_factor 2.5"),
    (MoEFFNAttrs(weight_on_input=1, k=1), {}, np.float32, "expert input"),
    (MoEFFNAttrs(), {"selection_bias": 1}, np.float32, "selection bias"),
    (MoEFFNAttrs(activation="gelu_tanh"), {}, np.float32, "only gated activation is swiglu"),
    (MoEFFNAttrs(activation="gelu", gated=0), {}, np.float32, "tanh approximation"),
    (MoEFFNAttrs(), {}, "bfloat16", "no bfloat16 kernel"),
])
def test_does_not_fit_reasons(attrs, operands, dtype, reason):
    if dtype == "bfloat16":
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
    assert reason in fit(attrs, operands, dtype)


ORT_RUNS_MOE = tuple(int(v) for v in ort.__version__.split(".")[:3]) >= (1, 23, 1)


@pytest.mark.skipif(not ORT_RUNS_MOE, reason="onnxruntime before 1.23.1 has no usable CPU kernel "
                                             "for com.microsoft.MoE (the blocks stay MoEFFN)")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_with_ort_target(family, tmp_path):
    model = export_family_block(family, "dynamo", tmp_path / "b.onnx")
    conv = convert_model(model, target="ort")
    assert conv.model is not None
    (block,) = conv.blocks
    fits = family not in ("deepseek_v2", "deepseek_v3", "llama4", "ernie4_5_moe", "phimoe",
                          "longcat_flash")  # their routing
    assert block.emitted == ("com.microsoft.MoE" if fits else "moefuse.MoEFFN")
    assert bool(block.target_note) != fits
    x = np.random.default_rng(2).standard_normal((3, 7, FAMILIES[family].hidden), dtype=np.float32)
    assert max_relative_error(run_onnx(model, {"x": x}), run_onnx(conv.model, {"x": x})) < 1e-5


def test_target_ort_keeps_moeffn_where_this_onnxruntime_cannot_run_it(monkeypatch, tmp_path):
    """Before writing com.microsoft.MoE the converter runs it, once per configuration, in the
    installed onnxruntime (older versions lack its CPU kernel or its SwiGLU attributes): where
    that fails, the block stays MoEFFN and the note quotes onnxruntime. Simulated here with an op
    name no onnxruntime has."""
    import moefuse.converter.ort_target as ort_target

    model = export_family_block("mixtral", "dynamo", tmp_path / "b.onnx")
    monkeypatch.setattr(ort_target, "ORT_OP", "NoSuchMoE")
    conv = convert_model(model, target="ort")
    (block,) = conv.blocks
    assert block.emitted == "moefuse.MoEFFN", block.emitted
    assert "this onnxruntime" in block.target_note and "cannot run it" in block.target_note, block.target_note
    assert "NoSuchMoE" in block.target_note  # onnxruntime's own words
    assert not any(n.domain == "com.microsoft" for n in conv.model.graph.node)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen2_moe"])
def test_ort_moe_model_round_trips_to_moeffn(family, tmp_path):
    original = export_family_block(family, "dynamo", tmp_path / "b.onnx")
    with_ort = convert_model(original, target="ort").model
    assert any(n.op_type == "MoE" for n in with_ort.graph.node)
    back = convert_model(with_ort)
    assert back.model is not None
    assert any(n.op_type == "MoEFFN" for n in back.model.graph.node)
    assert not any(n.op_type == "MoE" for n in back.model.graph.node)
    assert back.blocks[0].traits[0] == "from com.microsoft.MoE"
    x = np.random.default_rng(4).standard_normal((2, 9, 32), dtype=np.float32)
    assert max_relative_error(run_onnx(original, {"x": x}), run_onnx(back.model, {"x": x})) < 1e-5


def test_unverifiable_ort_node_is_a_near_miss():
    attrs = MoEFFNAttrs(k=2, gate_up_layout="separate")
    inputs = random_inputs(attrs, 4, D, I, E)
    model = ort_moe_model(MoEFFNAttrs(k=2), random_inputs(MoEFFNAttrs(k=2), 4, D, I, E), 2)
    node = next(n for n in model.graph.node if n.op_type == "MoE")
    w3 = onnx.numpy_helper.from_array(inputs["w3"], "fc3")
    model.graph.initializer.append(w3)
    while len(node.input) < 7:
        node.input.append("")
    node.input[6] = "fc3"
    conv = convert_model(model)
    assert conv.model is None
    assert "fc3" in conv.blocks[0].reason


def qmoe_model(bits=4):
    """A com.microsoft.QMoE node as model builders write it: int4 experts packed in uint8 with
    per-row scales (never run here)."""
    t, d, i, e = 3, D, I, E
    packed = 8 // bits
    inits = [
        onnx.numpy_helper.from_array(np.zeros((e, 2 * i, d // packed), np.uint8), "fc1_q"),
        onnx.numpy_helper.from_array(np.ones((e, 2 * i), np.float32), "fc1_scales"),
        onnx.numpy_helper.from_array(np.zeros((e, d, i // packed), np.uint8), "fc2_q"),
        onnx.numpy_helper.from_array(np.ones((e, d), np.float32), "fc2_scales"),
    ]
    node = helper.make_node("QMoE", ["x", "probs", "fc1_q", "fc1_scales", "", "fc2_q", "fc2_scales"],
                            ["y"], name="layer0/qmoe", domain="com.microsoft", k=2,
                            expert_weight_bits=bits, activation_type="swiglu")
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [t, d]),
                               helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, [t, e])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [t, d])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)])


def test_quantized_ort_node_is_named_as_a_near_miss(tmp_path):
    """A model builder's QMoE node cannot become MoEFFN version 1 (float experts): it is reported
    with why, and nothing is written, --partial or not (no block converts)."""
    from click.testing import CliRunner

    from moefuse.cli import main

    conv = convert_model(qmoe_model(4))
    assert conv.model is None
    (block,) = conv.blocks
    assert (block.name, block.converted) == ("layer0/qmoe", False)
    assert block.reason.startswith("com.microsoft.QMoE: its experts are 4-bit weights with scales")
    src = tmp_path / "q.onnx"
    onnx.save(qmoe_model(8), src)
    out = CliRunner().invoke(main, ["inspect", str(src)]).output
    assert "layer0/qmoe" in out and "8-bit weights" in out
    for extra in ([], ["--partial"]):
        result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "o.onnx"), "-q", *extra])
        assert result.exit_code == 1 and not (tmp_path / "o.onnx").exists()
        assert "near miss layer0/qmoe: com.microsoft.QMoE: its experts are 8-bit" in result.output


def test_sparse_mixer_node_is_a_near_miss():
    """onnxruntime's CPU MoE kernel ignores use_sparse_mixer (checked here against the installed
    onnxruntime: should that change, this test says so), so such a node cannot be verified by
    running it and stays as it is, with that reason."""
    attrs = MoEFFNAttrs(k=2, normalize_topk=0, gate_up_layout="interleaved")
    inputs = random_inputs(attrs, 5, D, I, E, seed=3)
    model = ort_moe_model(attrs, inputs, 2)
    feeds = {"X": inputs["X"], "router_logits": inputs["router_logits"]}
    plain = run_onnx(model, feeds)
    node = next(n for n in model.graph.node if n.op_type == "MoE")
    node.attribute.append(helper.make_attribute("use_sparse_mixer", 1))
    assert np.array_equal(run_onnx(model, feeds), plain)
    conv = convert_model(model)
    assert conv.model is None
    assert conv.blocks[0].reason == ("com.microsoft.MoE: use_sparse_mixer=1: onnxruntime's CPU kernel "
                                     "ignores it, so the node's routing cannot be verified by running it")
