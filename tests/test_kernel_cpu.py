"""The CPU kernel of the moefuse custom-op library against reference.py and the embedded fallback.

The same trait matrix as test_fallback_parity.py (routing mode x expert kind x biases x shared
expert, [T, D] and [B, S, D]), T in {0, 1, 3, E + 5}, float16 / bfloat16, k = E, E = 1, shapes
that span several packed chunks and row blocks, weights that are not constant initializers,
the portable code paths, bit-identical results for 1 and 2 threads, and errors that name the
offending input. Skipped when the library has not been built (pip install -e .).
"""

import functools
import os

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cases import ALL, D, E, case, check_parity, f32, random_configs, stock_session, weights_as_inputs
from moefuse import MoEFFNAttrs, MoEFFNError, add_moeffn, make_moeffn_model
from moefuse.reference import moeffn, route
from moefuse.runtime import cpu_kernels, library_path, node_providers, run, session_options
from moefuse.spec import validate_arrays
from moefuse.synthetic import feeds, random_inputs

try:
    LIBRARY = library_path()
except FileNotFoundError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"moefuse custom-op library not built: {exc}", allow_module_level=True)


def kernel_session(model, threads=1, strip_function=True, log_level=3):
    """A session on the library. By default the model's fallback functions are removed, so a
    node that the kernel did not take would fail instead of silently running the fallback."""
    if strip_function:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        del model.functions[:]
    so = session_options(intra_op_num_threads=threads, log_severity_level=log_level)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# T = 0 included; the embedded function (fallback) must agree with the kernel too.
check = functools.partial(check_parity, kernel_session, token_counts=(0, 1, 3, E + 5),
                          fallback=stock_session)


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("biases", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("routing,experts", ALL, ids=[f"{r}-{e}" for r, e in ALL])
def test_trait_matrix_float32(routing, experts, biases, shared):
    attrs, opts, inter = case(routing, experts)
    for rank in (2, 3):
        check(attrs, opts, inter, biases, shared, rank)


def test_softmax_selection_bias_picks_by_probability_plus_bias():
    """softmax_topk with a selection bias (Ernie-4.5): the bias decides the picks, the weights stay
    the probabilities. A bias of 2 on expert 3 makes it every token's pick (probabilities are at
    most 1), which the reference, the kernel and the fallback must all show."""
    attrs = MoEFFNAttrs(k=2, routing="softmax_topk", normalize_topk=0)
    inputs = random_inputs(attrs, 7, D, 8, E, selection_bias=True, seed=5)
    inputs["selection_bias"] = np.array([0.0, 0.0, 0.0, 2.0], np.float32)
    ids, weights = route(attrs, inputs["router_logits"], inputs["selection_bias"])
    assert (ids == 3).any(axis=1).all()
    logits = inputs["router_logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(weights, np.take_along_axis(probs, ids, 1), rtol=1e-6)
    model = make_moeffn_model(attrs, inputs)
    want = moeffn(attrs, **inputs)
    for sess in (kernel_session(model), stock_session(model)):
        got = sess.run(None, feeds(inputs))[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routing", ["softmax_topk", "sigmoid_topk"])
def test_group_score_max_or_top2_sum(routing):
    """Group-limited selection by a group's best score (DeepSeek-V2) or its best two (V3). The
    first token's groups are built so that the two rules keep different groups: group 0 holds
    one strong expert, group 1 two nearly as strong; the kernel and the fallback must follow the
    reference, with and without a selection bias, on it and on random tokens."""
    experts = 8
    picks = {}
    for score in ("max", "top2_sum"):
        attrs = MoEFFNAttrs(k=2, routing=routing, normalize_topk=0, n_group=4, topk_group=1,
                            group_score=score)
        for bias in (False, True):
            inputs = random_inputs(attrs, 6, D, 8, experts, selection_bias=bias, seed=9)
            inputs["router_logits"][0] = [3.0, -5.0, 2.5, 2.4, -3.0, -3.0, -3.0, -3.0]
            if bias:
                inputs["selection_bias"] = np.zeros(experts, np.float32)
            ids, _ = route(attrs, inputs["router_logits"], inputs.get("selection_bias"))
            picks[score] = sorted(ids[0].tolist())
            model = make_moeffn_model(attrs, inputs)
            want = moeffn(attrs, **inputs)
            for sess in (kernel_session(model), stock_session(model)):
                got = sess.run(None, feeds(inputs))[0]
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert picks == {"max": [0, 1], "top2_sum": [2, 3]}


@pytest.mark.parametrize("inter", [8, 1], ids=["grouped", "direct"])
def test_zero_experts_add_their_input(inter):
    """LongCat-Flash's zero experts: ranked after the E experts, a pick of one adds w * x. A bias
    of 2 on zero expert E makes it every token's pick; with weight on the input too."""
    for woi in (0, 1):
        attrs = MoEFFNAttrs(k=2, routing="softmax_topk", normalize_topk=0, zero_experts=2,
                            routed_scaling_factor=1.5, weight_on_input=woi)
        inputs = random_inputs(attrs, 9, D, inter, E, biases=True, shared_inter=8,
                               selection_bias=True, seed=4)
        inputs["selection_bias"] = np.zeros(E + 2, np.float32)
        inputs["selection_bias"][E] = 2.0
        ids, weights = route(attrs, inputs["router_logits"], inputs["selection_bias"])
        assert (ids == E).any(axis=1).all() and (ids < E).any()
        want = moeffn(attrs, **inputs)
        if not woi:  # the zero experts' part is w * x; the rest, the node routed to the others
            zero = ids >= E
            rest = {n: v for n, v in inputs.items() if n not in ("router_logits", "selection_bias")}
            rest.update(topk_ids=np.where(zero, 0, ids), topk_weights=np.where(zero, 0, weights))
            routed = moeffn(MoEFFNAttrs(k=2, routing="precomputed"), **rest)
            identity = np.where(zero, weights, 0).sum(axis=1, keepdims=True) * inputs["X"]
            np.testing.assert_allclose(want, routed + identity, rtol=1e-5, atol=1e-5)
        model = make_moeffn_model(attrs, inputs)
        for sess in (kernel_session(model), stock_session(model)):
            np.testing.assert_allclose(sess.run(None, feeds(inputs))[0], want, rtol=1e-5, atol=1e-6)


def test_group_attribute_refusals_match_the_spec():
    """The library refuses bad group attributes, and router logits that leave out the zero
    experts, with the spec's own message."""
    attrs, a = _valid_arrays()
    for changes in (dict(routing="topk_softmax", n_group=2), dict(group_score="max"),
                    dict(n_group=2, group_score="mean"), dict(zero_experts=1),
                    dict(zero_experts=2**31 - E), dict(zero_experts=2**63 - 1)):
        with pytest.raises(MoEFFNError) as info:
            validate_arrays(MoEFFNAttrs(**changes), a, node_name="layer0.moe")
        _expect_error(_raw_model(changes, a), feeds(a), str(info.value))


@pytest.mark.parametrize("dtype,tol", [(np.float16, 2e-2), (ml_dtypes.bfloat16, 8e-2)],
                         ids=["float16", "bfloat16"])
@pytest.mark.parametrize("routing,experts", [("softmax_topk_norm", "swiglu_halves"),
                                             ("topk_softmax", "gptoss_clamp"),
                                             ("sigmoid_grouped", "geglu_separate"),
                                             ("sigmoid_on_input", "rank1_silu"),
                                             ("precomputed", "relu_plain")])
def test_half_precision(routing, experts, dtype, tol):
    attrs, opts, inter = case(routing, experts)
    for rank in (2, 3):
        check(attrs, opts, inter, True, True, rank, dtype=dtype, rtol=tol, atol=tol)


def test_k_equals_e():
    attrs, opts, inter = case("softmax_topk_norm", "swiglu_halves", k=E)
    check(attrs, opts, inter, True, True, 2)
    attrs, opts, inter = case("precomputed", "rank1_silu", k=E)
    check(attrs, opts, inter, True, False, 3)


def test_single_expert():
    attrs = MoEFFNAttrs(k=1)
    check(attrs, {}, 8, True, False, 2, experts=1)
    check(attrs.replace(routing="sigmoid_topk"), {}, 8, False, True, 3, experts=1)
    check(attrs.replace(gated=0, activation="gelu", weight_layout="in_out"), {}, 1, True, True, 2,
          experts=1)


# Shapes that span several packed chunks (hidden > 64, not a multiple of 64; gated I > 32),
# several row blocks per expert (> 96 rows), and the activations without a case above.
BIG = [
    ("swiglu_halves", dict(activation="silu", gate_up_layout="halves")),
    ("swiglu_interleaved_inout", dict(activation="silu", gate_up_layout="interleaved",
                                      weight_layout="in_out")),
    ("gptoss", dict(activation="silu", gate_up_layout="interleaved", activation_alpha=1.702,
                    clamp_limit=7.0, up_offset=1.0)),
    ("geglu_erf_separate", dict(activation="gelu", gate_up_layout="separate")),
    ("gelu_tanh_plain_inout", dict(activation="gelu_tanh", gated=0, weight_layout="in_out")),
    ("identity_plain", dict(activation="identity", gated=0)),
    ("rank1_relu", dict(activation="relu", gated=0)),
    ("rank1_clamped_swiglu", dict(activation="silu", clamp_limit=0.5, up_offset=1.0)),
]


@pytest.mark.parametrize("name,changes", BIG, ids=[n for n, _ in BIG])
def test_multi_chunk_shapes(name, changes):
    attrs = MoEFFNAttrs(k=2).replace(**changes)
    inter = 1 if name.startswith("rank1") else 40
    experts, hidden, tokens = 3, 136, 250
    inputs = random_inputs(attrs, tokens, hidden, inter, experts, biases=True, shared_inter=72,
                           shared_gate=True, seed=7)
    model = make_moeffn_model(attrs, inputs)
    outs = []
    for threads in (1, 2):
        outs.append(kernel_session(model, threads).run(None, feeds(inputs))[0])
    np.testing.assert_allclose(outs[0], moeffn(attrs, **inputs), rtol=1e-4, atol=2e-5)
    assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32)), \
        "1 and 2 threads must give bit-identical results"


@pytest.mark.parametrize("routing,experts", [("softmax_topk_norm", "swiglu_halves"),
                                             ("sigmoid_grouped", "geglu_separate"),
                                             ("sigmoid_on_input", "rank1_silu"),
                                             ("precomputed", "gptoss_clamp")])
def test_threads_bit_identical(routing, experts):
    attrs, opts, inter = case(routing, experts)
    inputs = random_inputs(attrs, 200, 96, inter * 5, 8 if routing != "sigmoid_on_input" else 4,
                           biases=True, shared_inter=40, shared_gate=True,
                           selection_bias=opts.get("selection_bias", False), seed=3)
    model = make_moeffn_model(attrs, inputs)
    got = [kernel_session(model, n).run(None, feeds(inputs))[0] for n in (1, 2, 2)]
    assert np.array_equal(got[0].view(np.uint32), got[1].view(np.uint32))
    assert np.array_equal(got[1].view(np.uint32), got[2].view(np.uint32))
    np.testing.assert_allclose(got[0], moeffn(attrs, **inputs), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("routing,experts", [("softmax_topk_norm", "swiglu_halves"),
                                             ("topk_softmax", "gptoss_clamp"),
                                             ("sigmoid_grouped", "geglu_separate"),
                                             ("sigmoid_on_input", "rank1_silu")])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_weights_not_constant(routing, experts, dtype):
    attrs, opts, inter = case(routing, experts)
    inputs = random_inputs(attrs, 2 * E + 3, 80, inter, E, biases=True, shared_inter=40,
                           shared_gate=True, selection_bias=opts.get("selection_bias", False),
                           dtype=dtype, seed=5)
    model = weights_as_inputs(make_moeffn_model(attrs, inputs))
    sess = kernel_session(model)
    tol = 1e-5 if dtype == np.float32 else 2e-2
    for _ in range(2):  # a second call reuses the scratch arena
        got = sess.run(None, inputs)[0]
        np.testing.assert_allclose(f32(got), f32(moeffn(attrs, **inputs)), rtol=tol, atol=tol)


@pytest.mark.parametrize("isa", ["generic", "blas", "avx2"])
def test_portable_code_paths(isa, monkeypatch):
    """MOEFUSE_CPU_ISA picks the inner loops at kernel creation (if the CPU has them)."""
    monkeypatch.setenv("MOEFUSE_CPU_ISA", isa)
    for routing, experts in [("softmax_topk_norm", "swiglu_halves"),
                             ("topk_softmax", "gptoss_clamp"),
                             ("sigmoid_grouped", "geglu_separate"),
                             ("precomputed", "relu_plain")]:
        attrs, opts, inter = case(routing, experts)
        check(attrs, opts, inter, True, True, 2, token_counts=(1, E + 5), fallback=None)
    test_multi_chunk_shapes(*BIG[1])


# Every ISA the CPU has (avx512 where present), and blas, which reads float32 chunks only.
ISAS = ["avx512", "avx2", "generic", "blas"]


WEIGHT_MATRICES = ("w1", "w2", "w3", "shared_w1", "shared_w2", "shared_w3")


def valued(inputs: dict, half) -> dict:
    """float32 inputs whose weight matrices hold values of the 16-bit type `half`, as a float32
    export of a bfloat16 or float16 checkpoint does."""
    return {n: a.astype(half).astype(np.float32) if n in WEIGHT_MATRICES else a
            for n, a in inputs.items()}


HALF_VALUED = {"float32_bf16_valued": ml_dtypes.bfloat16, "float32_f16_valued": np.float16}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, *HALF_VALUED],
                         ids=["float16", "bfloat16", *HALF_VALUED])
def test_half_weights_packed_as_stored(isa, dtype, monkeypatch):
    """16-bit weights are packed in their own type, and float32 weights that all hold bfloat16
    (or float16) values as bfloat16 (float16), and widened as they are loaded: the products are
    those of the float32 packing (MOEFUSE_CPU_WEIGHTS=float32), bit for bit, in every chunk
    layout (gated halves, interleaved and separate, plain; both weight layouts; D and I tails),
    whether packed once (constant weights) or per call (weights fed as inputs; float32 ones are
    packed as float32 there, their values unchecked). blas reads float32 only: it packs float32
    both ways."""
    monkeypatch.setenv("MOEFUSE_CPU_ISA", isa)
    monkeypatch.delenv("MOEFUSE_CPU_WEIGHTS", raising=False)
    kernels = cpu_kernels()
    if kernels["isa"] != isa:
        pytest.skip(f"this CPU does not run the {isa} kernels")
    assert kernels["half_weights"] is (isa != "blas"), kernels
    for name, changes in BIG:
        attrs = MoEFFNAttrs(k=2).replace(**changes)
        inter = 1 if name.startswith("rank1") else 40
        inputs = random_inputs(attrs, 130, 136, inter, 3, biases=True, shared_inter=72,
                               shared_gate=True, seed=11,
                               dtype=np.float32 if dtype in HALF_VALUED else dtype)
        if dtype in HALF_VALUED:
            inputs = valued(inputs, HALF_VALUED[dtype])
        model = make_moeffn_model(attrs, inputs)
        for packed, m, f in (("once", model, feeds(inputs)), ("per call", weights_as_inputs(model), inputs)):
            got = {}
            for weights in ("model", "float32"):
                monkeypatch.setenv("MOEFUSE_CPU_WEIGHTS", weights)
                got[weights] = run(kernel_session(m, 2), f, {"Y": inputs["X"].shape})[0]
            assert np.array_equal(got["model"].view(np.uint8), got["float32"].view(np.uint8)), (name, packed)
            np.testing.assert_allclose(f32(got["model"]), f32(moeffn(attrs, **inputs)), rtol=8e-2, atol=8e-2)


_RSS_SCRIPT = """
import sys
import numpy as np, onnxruntime as ort
from moefuse import MoEFFNAttrs, make_moeffn_model
from moefuse.runtime import session_options
from moefuse.synthetic import random_inputs
import ml_dtypes

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

attrs = MoEFFNAttrs(k=2)
experts, inter = int(sys.argv[2]), int(sys.argv[3])
if sys.argv[1] in ("bfloat16", "float16"):
    dtype = ml_dtypes.bfloat16 if sys.argv[1] == "bfloat16" else np.float16
    inputs = random_inputs(attrs, 1, 1024, inter, experts, dtype=dtype, seed=0)
else:  # float32 weights holding bfloat16 (float16) values
    inputs = random_inputs(attrs, 1, 1024, inter, experts, seed=0)
    half = ml_dtypes.bfloat16 if sys.argv[1] == "float32_bf16_valued" else np.float16
    for n in ("w1", "w2"):
        inputs[n] = inputs[n].astype(half).astype(np.float32)
data = make_moeffn_model(attrs, inputs).SerializeToString()
del inputs
before = rss()
sess = ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])
print(rss() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
@pytest.mark.parametrize("experts,inter", [(8, 1024), (8192, 1)], ids=["chunks", "rank1_rows"])
@pytest.mark.parametrize("weights_dtype", ["bfloat16", "float16", *HALF_VALUED])
def test_half_weights_take_half_the_packed_memory(weights_dtype, experts, inter, monkeypatch):
    """The session of a layer of 8 experts of 1024 x 1024 (chunked packing), or of 8192 rank-1
    experts (the direct path's rows), 3 x 8M weights either way, grows by its packed copy: by
    48 MiB less with 16-bit packing than with float32 packing, for bfloat16 and float16 weights
    and for float32 weights that hold bfloat16 or float16 values (each in a fresh process, so
    that freed memory is not reused)."""
    import subprocess
    import sys

    monkeypatch.delenv("MOEFUSE_CPU_WEIGHTS", raising=False)
    if not cpu_kernels()["half_weights"]:
        pytest.skip("this CPU's kernels pack float32 only (blas)")

    grown = {}
    for weights in ("model", "float32"):
        # blocks of 1 MiB and more mapped afresh and given back when freed (glibc): the growth is
        # then what the session holds, not what the heap happened to reuse
        env = dict(os.environ, MOEFUSE_CPU_WEIGHTS=weights, MOEFUSE_LIBRARY=LIBRARY,
                   MALLOC_MMAP_THRESHOLD_="1048576")
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, weights_dtype, str(experts), str(inter)],
                             env=env, capture_output=True, text=True, check=True)
        grown[weights] = int(out.stdout.split()[-1])
    packed_f32 = experts * 3 * 1024 * inter * 4
    saved = grown["float32"] - grown["model"]
    assert saved > 0.7 * packed_f32 / 2, (grown, packed_f32)


@pytest.mark.parametrize("rank", [2, 3])
def test_empty_batch(rank):
    for routing, experts in [("sigmoid_grouped", "swiglu_halves"), ("precomputed", "rank1_silu")]:
        attrs, opts, inter = case(routing, experts)
        inputs = random_inputs(attrs, (1, 2) if rank == 3 else 2, D, inter, E,
                               selection_bias=opts.get("selection_bias", False), shared_inter=8)
        sess = kernel_session(make_moeffn_model(attrs, inputs))
        empty = {n: a[:, :0] if rank == 3 else a[:0] for n, a in feeds(inputs).items()}
        got = sess.run(None, empty)[0]
        assert got.shape == empty["X"].shape


def test_nan_stays_in_its_token():
    attrs, opts, inter = case("softmax_topk_norm", "swiglu_halves")
    inputs = random_inputs(attrs, 6, D, inter, E, shared_inter=8)
    inputs["X"][2, 3] = np.nan
    inputs["router_logits"][4, 1] = np.nan
    got = kernel_session(make_moeffn_model(attrs, inputs)).run(None, feeds(inputs))[0]
    want = moeffn(attrs, **inputs)
    assert np.isnan(got[2]).all() and np.isnan(got[4]).all()
    ok = [0, 1, 3, 5]
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-6)


def _node_ops(sess):
    return set(node_providers(sess))


def test_kernel_wins_over_embedded_function(tmp_path):
    """With the library registered the MoEFFN kernel runs, not the model-local function, also
    when the model carries function overloads (two configurations in one model)."""
    a1, a2 = MoEFFNAttrs(k=2), MoEFFNAttrs(k=3, activation="gelu")
    inputs = random_inputs(a1, 5, D, 8, E)
    single = make_moeffn_model(a1, inputs)
    double = make_moeffn_model(a1, inputs)
    double.graph.value_info.append(helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", D]))
    double.graph.output[0].name = "Z"
    add_moeffn(double, {n: ("Y" if n == "X" else n) for n in inputs}, "Z", a2, name="second")
    assert len({f.overload for f in double.functions}) == 2
    assert all(n.overload for n in double.graph.node)
    weights = {n: a for n, a in inputs.items() if n != "X"}
    # a node that leaves optional inputs out in the middle (onnxruntime 1.20-1.23 crashed on
    # these when the op registered a shape inference callback)
    a3 = MoEFFNAttrs(k=2, routing="precomputed")
    gaps = random_inputs(a3, 5, D, 8, E, shared_inter=8)
    models = (single, double, make_moeffn_model(a3, gaps))
    wants = [moeffn(a1, **inputs), moeffn(a2, moeffn(a1, **inputs), **weights), moeffn(a3, **gaps)]
    for model, want, data in zip(models, wants, (inputs, inputs, gaps)):
        so = session_options(enable_profiling=True, log_severity_level=3,
                             profile_file_prefix=str(tmp_path / "trace"))
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        got = sess.run(None, feeds(data))[0]
        assert _node_ops(sess) == {"MoEFFN"}
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --- errors ---------------------------------------------------------------------------------


def _raw_model(attrs_dict, arrays, symbolic=None):
    """A one-node model built without the builder's validation (to feed the kernel bad nodes).
    ``symbolic`` maps graph-input names to their declared shapes (None: no shape)."""
    symbolic = symbolic or {}
    names = ["X", "router_logits", "w1", "w2", "w3", "b1", "b2", "b3", "selection_bias",
             "topk_ids", "topk_weights"]
    present = [n for n in names if n in arrays]
    node = helper.make_node("MoEFFN", [n if n in arrays else "" for n in names[: names.index(present[-1]) + 1]],
                            ["Y"], domain="moefuse", name="layer0.moe", **attrs_dict)
    inputs, inits = [], []
    for n in present:
        a = arrays[n]
        if n in ("X", "router_logits", "topk_ids", "topk_weights"):
            et = helper.np_dtype_to_tensor_dtype(a.dtype)
            shape = symbolic.get(n, ["T"] + list(a.shape[1:]))
            inputs.append(helper.make_tensor_value_info(n, et, shape))
        else:
            inits.append(numpy_helper.from_array(a, n))
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("moefuse", 1)],
                             ir_version=10)


def _expect_error(model, feed, *fragments):
    with pytest.raises(Exception) as info:
        sess = kernel_session(model, strip_function=False, log_level=4)
        sess.run(None, feed)
    msg = str(info.value)
    assert "layer0.moe" in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def _valid_arrays(**kw):
    attrs = MoEFFNAttrs(**kw)
    return attrs, random_inputs(attrs, 3, D, 8, E)


def test_error_bad_weight_shape():
    attrs, a = _valid_arrays()
    a["w2"] = a["w2"][:, :, :-2]
    _expect_error(_raw_model({}, a), feeds(a), "'w2'", "[4, 16, 8]", "got [4, 16, 6]")


def test_error_w1_hidden_mismatch():
    attrs, a = _valid_arrays()
    a["w1"] = np.ascontiguousarray(a["w1"][:, :, :-1])
    _expect_error(_raw_model({}, a), feeds(a), "'w1'", "in = D = 16")


def test_error_router_logits_expert_count():
    attrs, a = _valid_arrays()
    a["router_logits"] = np.ascontiguousarray(a["router_logits"][:, :3])
    model = _raw_model({}, a, symbolic={"router_logits": ["T", "E"]})
    _expect_error(model, feeds(a), "'router_logits'", "E=4", "[3, 3]")


def test_error_router_logits_token_count():
    attrs, a = _valid_arrays()
    model = _raw_model({}, a, symbolic={"router_logits": ["T2", E]})
    f = feeds(a)
    f["router_logits"] = np.concatenate([f["router_logits"], f["router_logits"][:1]])
    _expect_error(model, f, "'router_logits'", "same tokens as X")


def test_error_x_rank():
    attrs, a = _valid_arrays()
    model = _raw_model({}, a, symbolic={"X": None, "router_logits": None})
    f = feeds(a)
    f["X"] = f["X"].reshape(1, 1, 3, D)
    _expect_error(model, f, "'X'", "rank 2 [T, D] or rank 3 [B, S, D]", "[1, 1, 3, 16]")


def test_error_topk_ids_out_of_range():
    attrs, a = _valid_arrays(routing="precomputed")
    f = feeds(a)
    f["topk_ids"] = f["topk_ids"].copy()
    f["topk_ids"][1, 0] = E
    _expect_error(_raw_model({"routing": "precomputed"}, a), f, "'topk_ids'", "outside [0, 4)")
    f["topk_ids"][1, 0] = -1
    _expect_error(_raw_model({"routing": "precomputed"}, a), f, "'topk_ids'")


def test_error_topk_ids_wrong_k():
    attrs, a = _valid_arrays(routing="precomputed")
    f = feeds(a)
    model = _raw_model({"routing": "precomputed"}, a,
                       symbolic={"topk_ids": ["T", "K"], "topk_weights": ["T", "K"]})
    f["topk_ids"] = f["topk_ids"][:, :1].copy()
    f["topk_weights"] = f["topk_weights"][:, :1].copy()
    _expect_error(model, f, "'topk_ids'", "[..., k] with k=2")


def test_error_bad_attribute():
    attrs, a = _valid_arrays()
    _expect_error(_raw_model({"routing": "bogus"}, a), feeds(a), "'routing'", "bogus")
    _expect_error(_raw_model({"k": 9}, a), feeds(a), "'k'=9", "E=4")
    _expect_error(_raw_model({"gated": 0, "clamp_limit": 3.0}, a), feeds(a), "'clamp_limit'")
    # set with another ONNX type: refused, not read as the default (k = 3.0 would run as k = 2)
    _expect_error(_raw_model({"k": 3.0}, a), feeds(a), "'k' must be of type INT, got FLOAT")
    _expect_error(_raw_model({"activation_alpha": 2}, a), feeds(a),
                  "'activation_alpha' must be of type FLOAT, got INT")
    _expect_error(_raw_model({"routing": 1}, a), feeds(a), "'routing' must be of type STRING, got INT")
    _expect_error(_raw_model({"k": [3]}, a), feeds(a), "'k' must be of type INT, got INTS")
    _expect_error(_raw_model({"up_offset": [1.0, 2.0]}, a), feeds(a),
                  "'up_offset' must be of type FLOAT, got FLOATS")


def test_error_unused_input():
    attrs, a = _valid_arrays()
    a["w3"] = a["w1"][:, :8].copy()
    _expect_error(_raw_model({}, a), feeds(a), "'w3'", "gate_up_layout=separate")


def test_error_missing_router_logits():
    attrs, a = _valid_arrays()
    del a["router_logits"]
    _expect_error(_raw_model({}, a), feeds(a), "'router_logits'", "required")


def test_library_path_and_session_options(monkeypatch, tmp_path):
    assert os.path.isfile(LIBRARY) and os.path.isabs(LIBRARY)
    so = session_options(intra_op_num_threads=1)
    assert so.intra_op_num_threads == 1
    with pytest.raises(TypeError, match="no_such_option"):
        session_options(no_such_option=1)
    monkeypatch.setenv("MOEFUSE_LIBRARY", str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match="MOEFUSE_LIBRARY"):
        library_path()
    monkeypatch.setenv("MOEFUSE_LIBRARY", LIBRARY)
    assert library_path() == LIBRARY


def test_random_trait_combinations():
    """200 random configurations (cases.random_configs, fixed seed): the kernel and the fallback
    function against the reference. The trait matrix crosses routing with expert kind; this
    crosses everything. (Both compute in float32 and round once, to the output's type.)"""
    from moefuse.compare import max_relative_error
    from moefuse.runtime import run

    for attrs, inputs, model, want in random_configs():
        tol = 1e-4 if inputs["X"].dtype == np.float32 else 3e-2
        for name, sess in (("kernel", kernel_session(model, threads=2)), ("fallback", stock_session(model))):
            got = run(sess, feeds(inputs), {"Y": inputs["X"].shape})[0]
            err = max_relative_error(want, np.asarray(got, np.float32))
            assert err <= tol, f"{name}: {err:.2e} for {attrs} {dict((n, a.shape) for n, a in inputs.items())}"
