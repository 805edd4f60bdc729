"""Every validation error names the node, the input or attribute, and expected vs actual."""

import numpy as np
import onnx
import pytest

from moefuse import MoEFFNAttrs, MoEFFNError, make_moeffn_model
from moefuse.builder import attrs_of, make_node
from moefuse.spec import validate_arrays
from moefuse.synthetic import random_inputs

E, D, I = 4, 16, 8


def inputs(attrs=MoEFFNAttrs(), **kw):
    return random_inputs(attrs, 3, D, I, E, **kw)


def expect(attrs, arrays, *fragments):
    with pytest.raises(MoEFFNError) as info:
        validate_arrays(attrs, arrays, node_name="layer0.moe")
    msg = str(info.value)
    assert "layer0.moe" in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_valid_inputs_give_sizes():
    size = validate_arrays(MoEFFNAttrs(), inputs())
    assert (size.tokens, size.hidden, size.experts, size.inter) == (3, D, E, I)


def test_x_wrong_rank():
    a = inputs()
    a["X"] = a["X"].reshape(1, 1, 3, D)
    expect(MoEFFNAttrs(), a, "'X'", "rank 2 [T, D] or rank 3 [B, S, D]", "[1, 1, 3, 16]")


def test_w1_hidden_mismatch():
    a = inputs()
    a["w1"] = a["w1"][:, :, :-1]
    expect(MoEFFNAttrs(), a, "'w1'", "in = D = 16", "[4, 16, 15]")


def test_w2_shape_mismatch():
    a = inputs()
    a["w2"] = a["w2"][:, :, :-2]
    expect(MoEFFNAttrs(), a, "'w2'", "[4, 16, 8]", "got [4, 16, 6]")


def test_mismatched_expert_counts():
    a = inputs()
    a["w2"] = a["w2"][:3]
    expect(MoEFFNAttrs(), a, "'w2'", "E=4", "got [3, 16, 8]")
    a = inputs()
    a["router_logits"] = a["router_logits"][:, :3]
    expect(MoEFFNAttrs(), a, "'router_logits'", "E=4", "[3, 3]")


def test_odd_fused_width():
    a = inputs()
    a["w1"] = a["w1"][:, :-1, :]
    expect(MoEFFNAttrs(), a, "'w1'", "even output width")


@pytest.mark.parametrize("k", [0, E + 1])
def test_top_k_out_of_range(k):
    expect_msg = "must be >= 1" if k < 1 else f"exceeds the number of experts E={E}"
    expect(MoEFFNAttrs(k=k), inputs(), "'k'", expect_msg)


def test_n_group_must_divide_experts():
    attrs = MoEFFNAttrs(routing="sigmoid_topk", n_group=3, topk_group=1, k=1)
    expect(attrs, inputs(attrs), "'n_group'=3 does not divide", "E=4")


def test_topk_group_le_n_group():
    expect(MoEFFNAttrs(routing="sigmoid_topk", n_group=2, topk_group=3), inputs(),
           "'topk_group'=3", "n_group=2")


def test_groups_only_where_scores_are_ranked():
    expect(MoEFFNAttrs(routing="topk_softmax", n_group=2), inputs(), "n_group=2",
           "'softmax_topk' or 'sigmoid_topk'", "got routing='topk_softmax'")
    for routing in ("softmax_topk", "sigmoid_topk"):
        ok = MoEFFNAttrs(routing=routing, n_group=2, group_score="max")
        assert validate_arrays(ok, inputs(ok)).experts == E


def test_group_score_values_and_scope():
    expect(MoEFFNAttrs(n_group=2, group_score="mean"), inputs(), "'group_score'", "top2_sum, max",
           "'mean'")
    expect(MoEFFNAttrs(group_score="max"), inputs(), "'group_score'", "n_group > 1", "n_group=1")


def test_selection_bias_only_where_scores_are_ranked():
    a = MoEFFNAttrs(routing="topk_softmax")
    expect(a, inputs(a, selection_bias=True), "'selection_bias'", "softmax_topk or sigmoid_topk",
           "topk_softmax")
    for routing in ("softmax_topk", "sigmoid_topk"):
        ok = MoEFFNAttrs(routing=routing)
        assert validate_arrays(ok, inputs(ok, selection_bias=True)).experts == E


def test_sparsemixer_picks_two_and_owns_its_threshold():
    expect(MoEFFNAttrs(routing="sparsemixer", k=3), inputs(), "'sparsemixer'", "k=2", "k=3")
    expect(MoEFFNAttrs(routing="sparsemixer", jitter_eps=-1.0), inputs(), "'jitter_eps'", ">= 0")
    expect(MoEFFNAttrs(jitter_eps=0.3), inputs(), "'jitter_eps'", "sparsemixer", "softmax_topk")
    ok = MoEFFNAttrs(routing="sparsemixer", jitter_eps=0.3)
    assert validate_arrays(ok, inputs(ok)).experts == E


def test_unknown_activation():
    expect(MoEFFNAttrs(activation="swish"), inputs(), "'activation'", "got 'swish'", "silu")


def test_unknown_routing_and_layouts():
    expect(MoEFFNAttrs(routing="softmax"), inputs(), "'routing'", "got 'softmax'")
    expect(MoEFFNAttrs(gate_up_layout="stacked"), inputs(), "'gate_up_layout'", "'stacked'")
    expect(MoEFFNAttrs(weight_layout="row"), inputs(), "'weight_layout'", "'row'")


def test_dtype_mix():
    a = inputs()
    a["w2"] = a["w2"].astype(np.float16)
    expect(MoEFFNAttrs(), a, "'w2'", "float16", "X is float32")


def test_unsupported_float_type():
    a = {n: v.astype(np.float64) for n, v in inputs().items()}
    expect(MoEFFNAttrs(), a, "'X'", "float64", "float32, float16, bfloat16")


def test_missing_required_inputs():
    a = inputs()
    del a["router_logits"]
    expect(MoEFFNAttrs(), a, "'router_logits'", "required with routing=softmax_topk")
    a = inputs()
    a["w2"] = None
    expect(MoEFFNAttrs(), a, "required input 'w2'")


def test_precomputed_needs_ids_of_width_k():
    attrs = MoEFFNAttrs(routing="precomputed", k=2)
    a = inputs(attrs)
    a["topk_ids"] = a["topk_ids"][:, :1]
    expect(attrs, a, "'topk_ids'", "k=2", "[3, 1]")
    a = inputs(attrs)
    a["topk_ids"] = a["topk_ids"].astype(np.float32)
    expect(attrs, a, "'topk_ids'", "int32 or int64")


def test_separate_layout_needs_w3():
    attrs = MoEFFNAttrs(gate_up_layout="separate")
    a = inputs(attrs)
    del a["w3"]
    expect(attrs, a, "'w3'", "required with gate_up_layout=separate")
    a = inputs()
    a["w3"] = a["w2"]
    expect(MoEFFNAttrs(), a, "'w3' is given but gate_up_layout=halves")


def test_bias_shapes():
    a = inputs(biases=True)
    a["b1"] = a["b1"][:, :-1]
    expect(MoEFFNAttrs(), a, "'b1'", "[4, 16]", "[4, 15]")


def test_shared_expert_shapes():
    a = inputs(shared_inter=8, shared_gate=True)
    a["shared_w2"] = a["shared_w2"][:, :-1]
    expect(MoEFFNAttrs(), a, "'shared_w2'", "[16, 8]", "[16, 7]")
    a = inputs(shared_inter=8, shared_gate=True)
    a["shared_gate"] = a["shared_gate"][:-1]
    expect(MoEFFNAttrs(), a, "'shared_gate'", "[16]", "[15]")
    a = inputs(shared_inter=8)
    del a["shared_w2"]
    expect(MoEFFNAttrs(), a, "'shared_w2' is required")


def test_token_count_mismatch():
    a = inputs()
    a["router_logits"] = a["router_logits"][:2]
    expect(MoEFFNAttrs(), a, "'router_logits'", "same tokens as X")


def test_clamp_only_for_gated():
    expect(MoEFFNAttrs(gated=0, clamp_limit=7.0), inputs(), "'clamp_limit'", "gated")


def test_alpha_only_for_silu():
    expect(MoEFFNAttrs(activation="gelu", activation_alpha=1.702), inputs(),
           "'activation_alpha'", "activation='gelu'")


def test_builder_validates_against_model_shapes():
    a = inputs()
    a["w2"] = a["w2"][:3]
    with pytest.raises(MoEFFNError, match="input 'w2'.*got \\[3, 16, 8\\]"):
        make_moeffn_model(MoEFFNAttrs(), a)


def test_unknown_attribute_in_node():
    node = make_node({"X": "x", "router_logits": "l", "w1": "a", "w2": "b"}, "y", MoEFFNAttrs(),
                     name="n0")
    node.attribute.append(onnx.helper.make_attribute("capacity_factor", 1.25))
    with pytest.raises(MoEFFNError, match="'n0'.*unknown attribute 'capacity_factor'"):
        attrs_of(node)


def test_attributes_round_trip_through_onnx():
    attrs = MoEFFNAttrs(k=4, routing="sigmoid_topk", n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, activation="gelu_tanh", gated=1,
                        gate_up_layout="separate", weight_layout="in_out")
    node = make_node({"X": "x", "router_logits": "l", "w1": "a", "w2": "b", "w3": "c"}, "y", attrs)
    assert attrs_of(node) == attrs
    # defaults are not written
    assert {a.name for a in node.attribute} == {"k", "routing", "n_group", "topk_group",
                                                "routed_scaling_factor", "activation",
                                                "gate_up_layout", "weight_layout"}


def test_old_opset_is_refused_with_a_hint():
    with pytest.raises(MoEFFNError, match="opset 17.*needs opset >= 18"):
        make_moeffn_model(MoEFFNAttrs(), inputs(), opset=17)


def test_zero_experts_are_ranked_after_the_experts():
    a = MoEFFNAttrs(k=2, zero_experts=3)
    ok = inputs(a, selection_bias=True)
    assert ok["router_logits"].shape[-1] == E + 3 and ok["selection_bias"].shape == (E + 3,)
    assert validate_arrays(a, ok).experts == E
    bad = dict(ok, router_logits=ok["router_logits"][:, :E].copy())
    expect(a, bad, "'router_logits'", "[..., E + zero_experts] with E + zero_experts = 4 + 3 = 7",
           "[3, 4]")
    expect(a, dict(ok, selection_bias=ok["selection_bias"][:E].copy()), "'selection_bias'", "[7]")
    expect(MoEFFNAttrs(k=8, zero_experts=3), inputs(), "'k'=8", "E + zero_experts = 4 + 3 = 7")
    expect(MoEFFNAttrs(zero_experts=-1), inputs(), "'zero_experts'", ">= 0")
