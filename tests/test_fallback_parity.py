"""The embedded ONNX function, run by stock onnxruntime, against reference.py.

Every trait combination of the spec: routing mode x expert kind x biases x shared expert, for
[T, D] and [B, S, D] inputs and T in {1, 3, E + 5}.
"""

import functools

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cases import ALL, D, E, case, check_parity, stock_session
from moefuse import MoEFFNAttrs, make_moeffn_model
from moefuse.reference import moeffn
from moefuse.synthetic import feeds, random_inputs


def session(model):
    onnx.checker.check_model(model, full_check=True)
    return stock_session(model)


check = functools.partial(check_parity, session)


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("biases", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("routing,experts", ALL, ids=[f"{r}-{e}" for r, e in ALL])
def test_trait_matrix_float32(routing, experts, biases, shared):
    attrs, opts, inter = case(routing, experts)
    for rank in (2, 3):
        check(attrs, opts, inter, biases, shared, rank)


@pytest.mark.parametrize("dtype,tol", [(np.float16, 2e-2), (ml_dtypes.bfloat16, 8e-2)],
                         ids=["float16", "bfloat16"])
@pytest.mark.parametrize("routing,experts", [("softmax_topk_norm", "swiglu_halves"),
                                             ("topk_softmax", "gptoss_clamp"),
                                             ("sigmoid_grouped", "geglu_separate"),
                                             ("precomputed", "relu_plain")])
def test_half_precision(routing, experts, dtype, tol):
    # The reference upcasts to float32 and rounds once at the end; the fallback does the same,
    # so the outputs agree to the output type's precision (a few ulps of the rounding).
    attrs, opts, inter = case(routing, experts)
    check(attrs, opts, inter, True, True, 2, dtype=dtype, rtol=tol, atol=tol)


def test_k_equals_e():
    attrs, opts, inter = case("softmax_topk_norm", "swiglu_halves", k=E)
    check(attrs, opts, inter, True, True, 2)


def test_single_expert():
    attrs = MoEFFNAttrs(k=1)
    check(attrs, {}, 8, True, False, 2, experts=1)
    check(attrs.replace(routing="sigmoid_topk"), {}, 8, False, True, 3, experts=1)


@pytest.mark.parametrize("rank", [2, 3])
def test_empty_batch(rank):
    attrs, opts, inter = case("sigmoid_grouped", "swiglu_halves")
    inputs = random_inputs(attrs, (1, 2) if rank == 3 else 2, D, inter, E, selection_bias=True)
    sess = session(make_moeffn_model(attrs, inputs))
    empty = {n: a[:, :0] if rank == 3 else a[:0] for n, a in feeds(inputs).items()}
    got = sess.run(None, empty)[0]
    assert got.shape == empty["X"].shape
    assert moeffn(attrs, **dict(inputs, **empty)).shape == empty["X"].shape


@pytest.mark.skipif(tuple(int(v) for v in ort.__version__.split(".")[:2]) < (1, 27),
                    reason="onnxruntime before 1.27 runs one function overload for every node "
                           "(builder.overload_note warns of it)")
def test_two_configurations_in_one_model_use_overloads():
    from onnx import helper

    from moefuse import add_moeffn

    a1, a2 = MoEFFNAttrs(k=2), MoEFFNAttrs(k=3, activation="gelu")
    inputs = random_inputs(a1, 5, D, 8, E)
    model = make_moeffn_model(a1, inputs)
    model.graph.value_info.append(helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT,
                                                                ["T", D]))
    model.graph.output[0].name = "Z"
    add_moeffn(model, {n: ("Y" if n == "X" else n) for n in inputs}, "Z", a2, name="second")
    assert len({f.overload for f in model.functions}) == 2
    got = session(model).run(None, feeds(inputs))[0]
    weights = {n: a for n, a in inputs.items() if n != "X"}
    want = moeffn(a2, moeffn(a1, **inputs), **weights)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zero", [0, 2], ids=["experts", "zero_experts"])
@pytest.mark.parametrize("woi", [0, 1], ids=["on_output", "on_input"])
def test_repeated_precomputed_ids(woi, zero):
    """A repeated precomputed id counts once per occurrence: with the weight on the input, an
    expert picked twice adds f(w1 x) + f(w2 x), not f((w1 + w2) x)."""
    attrs = MoEFFNAttrs(k=2, routing="precomputed", weight_on_input=woi, zero_experts=zero,
                        routed_scaling_factor=1.5)
    inputs = random_inputs(attrs, 4, D, 8, E, biases=True, shared_inter=8, seed=1)
    inputs["topk_ids"][:] = [[1, 1], [2, 0], [3, 3], [E + 1 if zero else 0, 1]]
    got = session(make_moeffn_model(attrs, inputs)).run(None, feeds(inputs))[0]
    np.testing.assert_allclose(got, moeffn(attrs, **inputs), rtol=1e-5, atol=1e-6)
    if woi:  # the repeat matters: token 0 through expert 1 once with the weights summed differs
        once = dict(inputs, X=inputs["X"][:1], topk_ids=np.array([[1]]),
                    topk_weights=inputs["topk_weights"][:1].sum(axis=1, keepdims=True))
        assert not np.allclose(moeffn(attrs.replace(k=1), **once)[0], got[0], rtol=1e-3)


@pytest.mark.parametrize("attrs,shared", [
    (MoEFFNAttrs(k=2), True),  # gate/up halves in the routed and the shared expert
    (MoEFFNAttrs(k=2, routing="precomputed", weight_on_input=1), False),  # a pass per slot
    (MoEFFNAttrs(k=3, routing="precomputed", weight_on_input=1, zero_experts=2), True),
], ids=["halves_shared", "precomputed_woi", "zero_experts_woi_shared"])
def test_static_shapes(attrs, shared):
    """The model's inputs with fixed sizes: onnxruntime's optimizer then knows every dim and
    rewrites more (1.20 fused Slices of one tensor into Splits named alike and refused the
    model). The function must load and agree with the reference all the same."""
    inputs = random_inputs(attrs, 6, D, 8, E, shared_inter=8 if shared else 0, seed=3)
    model = make_moeffn_model(attrs, inputs)
    for value in list(model.graph.input) + list(model.graph.output):
        shape = (inputs.get(value.name) if value.name in inputs else inputs["X"]).shape
        dims = value.type.tensor_type.shape.dim
        for d, size in zip(dims, shape):
            d.ClearField("dim_param")
            d.dim_value = size
    got = session(model).run(None, feeds(inputs))[0]
    np.testing.assert_allclose(got, moeffn(attrs, **inputs), rtol=1e-5, atol=1e-6)
