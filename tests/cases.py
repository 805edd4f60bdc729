"""The trait matrix shared by the fallback, kernel and GPU parity tests, and the parity check
that the fallback and CPU kernel tests run it through."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from moefuse import MoEFFNAttrs, MoEFFNError, make_moeffn_model
from moefuse.reference import moeffn
from moefuse.runtime import run
from moefuse.synthetic import feeds, random_inputs

# routing variant -> (attribute changes, extra input options)
ROUTINGS = {
    "softmax_topk_norm": (dict(routing="softmax_topk", normalize_topk=1), {}),
    "softmax_topk_raw": (dict(routing="softmax_topk", normalize_topk=0), {"shared_gate": True}),
    "softmax_bias": (dict(routing="softmax_topk", normalize_topk=1), {"selection_bias": True}),
    "topk_softmax": (dict(routing="topk_softmax"), {}),
    # a threshold wide enough that the masks keep several experts
    "sparsemixer": (dict(routing="sparsemixer", jitter_eps=0.3), {}),
    "sigmoid_grouped": (dict(routing="sigmoid_topk", n_group=2, topk_group=1,
                             routed_scaling_factor=2.5), {"selection_bias": True}),
    # DeepSeek-V2's group-limited softmax: a group's score is its best probability
    "softmax_grouped": (dict(routing="softmax_topk", normalize_topk=0, n_group=2, topk_group=1,
                             group_score="max", routed_scaling_factor=2.0), {}),
    # LongCat-Flash: experts past E that return their input, ranked with the others
    "softmax_zero_experts": (dict(routing="softmax_topk", normalize_topk=0, zero_experts=3,
                                  routed_scaling_factor=1.5), {"selection_bias": True}),
    "sigmoid_on_input": (dict(routing="sigmoid_topk", normalize_topk=0, k=1, weight_on_input=1), {}),
    "precomputed": (dict(routing="precomputed"), {}),
}

# expert kind -> (attribute changes, intermediate size or None for the default)
EXPERTS = {
    "swiglu_halves": (dict(activation="silu", gate_up_layout="halves"), None),
    "swiglu_interleaved": (dict(activation="silu", gate_up_layout="interleaved",
                                weight_layout="in_out"), None),
    "gptoss_clamp": (dict(activation="silu", gate_up_layout="interleaved", weight_layout="in_out",
                          activation_alpha=1.702, clamp_limit=7.0, up_offset=1.0), None),
    "geglu_separate": (dict(activation="gelu_tanh", gate_up_layout="separate"), None),
    "relu_plain": (dict(activation="relu", gated=0), None),
    "rank1_silu": (dict(activation="silu", gated=0, weight_layout="in_out"), 1),
}

E, D, I = 4, 16, 8


def case(routing: str, experts: str, k: int = 2):
    r_attrs, r_opts = ROUTINGS[routing]
    e_attrs, inter = EXPERTS[experts]
    attrs = MoEFFNAttrs(k=k).replace(**{**r_attrs, **e_attrs})
    return attrs, r_opts, (I if inter is None else inter)


ALL = list(itertools.product(ROUTINGS, EXPERTS))


def f32(a):
    return np.asarray(a).astype(np.float32)


def stock_session(model):
    """A CPU session in stock onnxruntime: MoEFFN runs as the model's embedded function."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def check_parity(session, attrs, opts, inter, biases, shared, rank, dtype=np.float32, rtol=1e-5,
                 atol=1e-6, experts=E, hidden=D, token_counts=(1, 3, E + 5), fallback=None,
                 seed=1):
    """Run one case through ``session(model)`` and compare with reference.py.

    The weights (with biases, a shared expert of intermediate size 8 and the case's extra
    inputs as asked) are the model's initializers; X and the routing inputs are drawn afresh for
    each token count T, as ``[T, D]`` (rank 2) or ``[2, T, D]`` (rank 3); T = 0 is an empty
    slice. With ``fallback`` (a session factory), its session must agree too.
    """
    base = random_inputs(attrs, (1, 2) if rank == 3 else 2, hidden, inter, experts, biases=biases,
                         shared_inter=8 if shared else 0,
                         shared_gate=shared and opts.get("shared_gate", False),
                         selection_bias=opts.get("selection_bias", False), dtype=dtype, seed=seed)
    model = make_moeffn_model(attrs, base)
    sess = session(model)
    fb = fallback(model) if fallback else None
    for t in token_counts:
        lead = (max(t, 1),) if rank == 2 else (2, max(t, 1))
        fresh = feeds(random_inputs(attrs, lead, hidden, inter, experts, dtype=dtype, seed=100 + t))
        if t == 0:  # empty batches are slices (random_inputs cannot draw ids for no tokens)
            fresh = {n: a[:0] if rank == 2 else a[:, :0] for n, a in fresh.items()}
        inputs = dict(base, **fresh)
        shapes = {"Y": inputs["X"].shape}
        got = run(sess, feeds(inputs), shapes)[0]
        want = moeffn(attrs, **inputs)
        msg = f"{attrs} T={t} rank={rank} dtype={np.dtype(dtype).name}"
        assert got.shape == want.shape == inputs["X"].shape, msg
        assert got.dtype == want.dtype, msg
        np.testing.assert_allclose(f32(got), f32(want), rtol=rtol, atol=atol, err_msg=msg)
        if fb is not None:
            other = run(fb, feeds(inputs), shapes)[0]
            np.testing.assert_allclose(f32(got), f32(other), rtol=rtol, atol=atol,
                                       err_msg="vs fallback " + msg)


def weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every initializer turned into a graph input (not constant)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type,
                                                               list(init.dims)))
    del model.graph.initializer[:]
    return model


def random_config(rng):
    """One random MoEFFN configuration and its inputs, or None where validation refuses it:
    traits combined freely (routing, groups, zero experts, selection bias, activation, layouts,
    clamp, weight on input, biases, shared expert and gate, input type), small odd sizes."""
    E, Z = int(rng.integers(1, 12)), int(rng.choice([0, 0, 0, 1, 3]))
    routing = str(rng.choice(["softmax_topk", "topk_softmax", "sigmoid_topk", "precomputed", "sparsemixer"]))
    a = dict(k=2 if routing == "sparsemixer" else int(rng.integers(1, E + Z + 1)), routing=routing,
             normalize_topk=int(rng.integers(0, 2)), routed_scaling_factor=float(rng.choice([1.0, 2.5])),
             activation=str(rng.choice(["silu", "gelu", "gelu_tanh", "relu", "identity"])),
             gated=int(rng.integers(0, 2)), gate_up_layout=str(rng.choice(["halves", "interleaved", "separate"])),
             weight_layout=str(rng.choice(["out_in", "in_out"])), weight_on_input=int(rng.random() < 0.2),
             zero_experts=Z)
    if a["gated"] and rng.random() < 0.3:  # GPT-OSS's clamped SwiGLU
        a.update(clamp_limit=7.0, activation_alpha=1.702, up_offset=1.0, activation="silu")
    ranked = E + Z
    if routing in ("softmax_topk", "sigmoid_topk") and rng.random() < 0.4:
        groups = int(rng.choice([g for g in range(1, ranked + 1) if ranked % g == 0]))
        a.update(n_group=groups, topk_group=int(rng.integers(1, groups + 1)),
                 group_score=str(rng.choice(["top2_sum", "max"])))
    shared = int(rng.choice([0, 0, 8]))
    dtype = [np.float32, np.float16, ml_dtypes.bfloat16][int(rng.integers(0, 3))]
    try:
        attrs = MoEFFNAttrs(**a)
        inputs = random_inputs(attrs, tokens=int(rng.choice([0, 1, 2, 5, 17, 40])),
                               hidden=int(rng.choice([8, 16, 24, 64])), inter=int(rng.choice([8, 16, 40])),
                               experts=E, biases=bool(rng.random() < 0.3), shared_inter=shared,
                               shared_gate=bool(shared and rng.random() < 0.5),
                               selection_bias=bool(routing in ("softmax_topk", "sigmoid_topk") and rng.random() < 0.4),
                               dtype=dtype, seed=int(rng.integers(1 << 30)))
        return attrs, inputs, make_moeffn_model(attrs, inputs)
    except MoEFFNError:
        return None


RANDOM_SEED = 20261205


def random_configs(count: int = 200, seed: int = RANDOM_SEED):
    """`count` random configurations (random_config), each as (attrs, inputs, model, the
    reference's output); fails rather than loops if validation refuses most draws."""
    from moefuse.reference import moeffn_from_inputs

    rng = np.random.default_rng(seed)
    for _ in range(count):
        for _ in range(20):
            config = random_config(rng)
            if config is not None:
                break
        else:
            raise AssertionError("random_config: 20 draws in a row refused by validation")
        attrs, inputs, model = config
        want = moeffn_from_inputs(attrs, {n: a if a.dtype == np.int64 else a.astype(np.float32)
                                          for n, a in inputs.items()})
        yield attrs, inputs, model, want
