"""MoE layers written the ways people write them (tests/zoo.py), exported and converted.

Each form is exported at test time with both exporters (where the exporter can export it),
converted, and the converted model run in stock onnxruntime (no custom-op library: MoEFFN runs
through its embedded function) against the original on inputs whose shapes the export never
saw. Forms that must not convert (an expert capacity, loops the tracer unrolled for its trace
input) are checked for a near-miss reason that says why.
"""

import numpy as np
import pytest
import torch

import zoo
from torch import nn
from exports import EXPORTERS, export_module, run_onnx
from moefuse import reference
from moefuse.converter import convert_model

D = 16
EXPORT_SHAPE = (2, 5)
FRESH_SHAPES = [(1, 1), (3, 11), (2, 37)]


def max_rel(want: np.ndarray, got: np.ndarray) -> float:
    return float(np.max(np.abs(want - got)) / (np.max(np.abs(want)) + 1e-30))


def export_form(name, exporter, tmp_path, shape=EXPORT_SHAPE, seed=0, **kwargs):
    module = zoo.FORMS[name](**kwargs)
    example = torch.randn(*shape, D, generator=torch.Generator().manual_seed(seed))
    model = export_module(module, example, tmp_path / f"{name}_{exporter}.onnx", exporter)
    return module, model


def check_converted(module, model, traits, moeffn_nodes=1):
    conv = convert_model(model)
    assert conv.model is not None, "; ".join(f"{b.name}: {b.reason}" for b in conv.near_misses)
    ops = [n.op_type for n in conv.model.graph.node]
    assert ops.count("MoEFFN") == moeffn_nodes
    block = conv.blocks[0]
    assert block.converted and set(traits) <= set(block.traits), block.traits
    rng = np.random.default_rng(23)
    for shape in FRESH_SHAPES:
        x = rng.standard_normal(shape + (D,), dtype=np.float32)
        want = run_onnx(model, {"x": x})
        got = run_onnx(conv.model, {"x": x})
        assert got.shape == want.shape
        assert max_rel(want, got) < 1e-5, shape
        with torch.no_grad():  # and the export itself is faithful
            ref = module(torch.from_numpy(x)).numpy()
        assert max_rel(ref, want) < 1e-5, shape
    return conv


# form -> (traits the converted block must show, exporters)
CONVERTS = {
    "switch_top1": (["softmax_topk", "k=1", "relu"], EXPORTERS),
    "gelu_top2": (["softmax_topk", "k=2", "gelu", "expert biases"], EXPORTERS),
    "geglu_stacked": (["k=2", "gated gelu_tanh halves"], EXPORTERS),
    "flash_rank1": (["k=8", "silu"], EXPORTERS),
    "dense_onehot": (["softmax_topk+norm", "k=2", "gated silu separate"], EXPORTERS),
    "dense_onehot_reversed": (["softmax_topk+norm", "k=2", "gated silu separate",
                               "expert biases"], EXPORTERS),
    "dense_fused_shared": (["softmax_topk", "k=2", "gated silu halves", "expert biases",
                            "shared expert (gated)"], EXPORTERS),
    "sparse_loop_onehot": (["k=2", "gated silu separate"], EXPORTERS),
    "sparse_loop": (["sigmoid_topk+norm", "k=2", "gated silu separate", "shared expert"],
                    EXPORTERS),
}


@pytest.mark.parametrize("form,exporter", [(f, e) for f, (_, exs) in CONVERTS.items()
                                           for e in exs])
def test_form_converts(form, exporter, tmp_path):
    module, model = export_form(form, exporter, tmp_path)
    conv = check_converted(module, model, CONVERTS[form][0])
    if form == "flash_rank1":
        assert conv.blocks[0].inter == 1 and conv.blocks[0].experts == 4096


def test_switch_topk_selector(tmp_path):
    """Top-1 written as probs.topk(1) instead of probs.max(-1)."""
    module = zoo.SwitchTop1(selector="topk")
    example = torch.randn(*EXPORT_SHAPE, D, generator=torch.Generator().manual_seed(0))
    model = export_module(module, example, tmp_path / "switch_topk.onnx", "torchscript")
    check_converted(module, model, ["softmax_topk", "k=1", "relu"])


def test_switch_single_token_trace_is_not_converted(tmp_path):
    """Traced with one token, TorchScript bakes that expert's one-row indexing into the graph,
    which then fails on other inputs: the converter leaves it alone and says what the tracer
    did and how to export instead."""
    module = zoo.SwitchTop1()
    model = export_module(module, torch.randn(1, 1, D), tmp_path / "one.onnx", "torchscript")
    conv = convert_model(model, partial=True)
    assert conv.model is None and not conv.blocks[0].converted
    reason = conv.blocks[0].reason
    assert "TorchScript tracer fixed the token count of an expert" in reason, reason
    assert "constant shape [16]" in reason and "single token" in reason, reason
    assert "batched_mm" in reason and "dynamo=True" in reason, reason


@pytest.mark.parametrize("exporter", [pytest.param("dynamo", marks=pytest.mark.slow),
                                      "torchscript"])
def test_stacked_forms(exporter, tmp_path):
    """Three different forms as residual layers of one model: three MoEFFN nodes."""
    module = zoo.ZooStack(["dense_fused_shared", "geglu_stacked", "sparse_loop_onehot"])
    example = torch.randn(*EXPORT_SHAPE, D, generator=torch.Generator().manual_seed(0))
    model = export_module(module, example, tmp_path / "stack.onnx", exporter)
    check_converted(module, model, [], moeffn_nodes=3)


def test_partial_with_capacity_layer(tmp_path):
    """A capacity layer next to a convertible one: all-or-nothing refuses, partial converts one."""
    module = zoo.ZooStack(["dense_onehot", "switch_capacity"])
    example = torch.randn(*EXPORT_SHAPE, D, generator=torch.Generator().manual_seed(0))
    model = export_module(module, example, tmp_path / "stack.onnx", "torchscript")
    assert convert_model(model).model is None
    conv = convert_model(model, partial=True)
    assert [b.converted for b in conv.blocks] == [True, False]
    assert "expert capacity" in conv.blocks[1].reason
    assert [n.op_type for n in conv.model.graph.node].count("MoEFFN") == 1
    x = np.random.default_rng(2).standard_normal((3, 9, D), dtype=np.float32)
    assert max_rel(run_onnx(model, {"x": x}), run_onnx(conv.model, {"x": x})) < 1e-5


def test_per_expert_weights_are_stacked_once(tmp_path):
    """A per-expert reading writes one new initializer per stacked input and drops the 3E
    per-expert matrices from the graph."""
    module, model = export_form("dense_onehot", "dynamo", tmp_path)
    conv = convert_model(model)
    block = conv.blocks[0]
    assert block.converted and block.weights_reused == 0 and block.weights_relaid == 3
    names = {t.name for t in conv.model.graph.initializer}
    assert not any(name.startswith("experts.") for name in names), sorted(names)
    node = next(n for n in conv.model.graph.node if n.op_type == "MoEFFN")
    shapes = {t.name: tuple(t.dims) for t in conv.model.graph.initializer}
    assert [shapes[node.input[i]] for i in (2, 3, 4)] == [(4, 24, 16), (4, 16, 24), (4, 24, 16)]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_capacity_is_refused(exporter, tmp_path):
    """A capacity-limited router drops tokens: never convert it, and say why."""
    _, model = export_form("switch_capacity", exporter, tmp_path)
    conv = convert_model(model, partial=True)
    assert conv.model is None
    assert len(conv.blocks) == 1 and not conv.blocks[0].converted
    reason = conv.blocks[0].reason
    assert "expert capacity" in reason and "capacity 2" in reason, reason


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_expert_choice_is_refused(exporter, tmp_path):
    """Experts choosing tokens (top-k over the token axis) is not token-choice MoE."""
    _, model = export_form("expert_choice", exporter, tmp_path)
    conv = convert_model(model, partial=True)
    assert conv.model is None and not conv.blocks[0].converted
    assert "expert-choice routing" in conv.blocks[0].reason, conv.blocks[0].reason


def test_skip_empty_loop_trace_is_refused(tmp_path):
    """TorchScript bakes ``if not mask.any(): continue`` into the graph: the experts the trace
    input missed are gone and the graph is silently wrong. The converter names the survivors."""
    module, model = export_form("skip_empty_loop", "torchscript", tmp_path, shape=(1, 3))
    x = np.random.default_rng(1).standard_normal((3, 7, D), dtype=np.float32)
    with torch.no_grad():
        assert max_rel(module(torch.from_numpy(x)).numpy(), run_onnx(model, {"x": x})) > 1e-2
    conv = convert_model(model, partial=True)
    assert conv.model is None and not conv.blocks[0].converted
    reason = conv.blocks[0].reason
    assert "only experts [" in reason and "of E=8 survive" in reason, reason
    assert "silently ignores the others" in reason
    assert "batched_mm" in reason


def test_skip_empty_loop_dynamo_does_not_export(tmp_path):
    """The dynamo exporter refuses the data-dependent ``if`` outright (no silent graph)."""
    with pytest.raises(Exception):
        export_form("skip_empty_loop", "dynamo", tmp_path)


def _eager_trace(tmp_path):
    pytest.importorskip("transformers")
    module = zoo.transformers_eager_block("mixtral")
    example = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    return export_module(module, example, tmp_path / "eager.onnx", "torchscript")


def test_transformers_eager_trace_is_refused(tmp_path):
    """transformers' eager experts loop traced by TorchScript: the loop is unrolled for the
    experts the trace input hit and the graph fails on inputs that hit another number of
    experts. The converter refuses it before running it, and says how to export it instead."""
    conv = convert_model(_eager_trace(tmp_path), partial=True)
    assert conv.model is None and not conv.blocks[0].converted
    reason = conv.blocks[0].reason
    assert "unrolled a data-dependent expert loop" in reason, reason
    assert "exactly 6 of the 6 experts" in reason and "batched_mm" in reason, reason


def test_transformers_eager_trace_few_experts_is_refused(tmp_path):
    """The same traced with one token: two of six expert slots survive."""
    pytest.importorskip("transformers")
    module = zoo.transformers_eager_block("mixtral")
    model = export_module(module, torch.randn(1, 1, 32), tmp_path / "eager1.onnx", "torchscript")
    conv = convert_model(model, partial=True)
    assert conv.model is None
    reason = conv.blocks[0].reason
    assert "only 2 expert slots of E=6 survive" in reason, reason
    assert "TorchScript tracer" in reason and "single token" in reason, reason
    assert "dynamo=True" in reason, reason


# ---------------------------------------------------------------------------------------------
# every expert exercised by the verification


class RarelyRouted(zoo.GeGLUStacked):
    """GeGLU experts whose router bias keeps random tokens away from expert 3, and a per-expert
    output scale (which MoEFFN has no input for) of 1 except ``scale3`` for expert 3: a reading
    that is wrong for expert 3 alone."""

    def __init__(self, scale3=1.0):
        super().__init__()
        weight = self.router.weight
        self.router = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.router.weight.copy_(weight)
            self.router.bias.zero_()
            self.router.bias[3] = -12.0
        self.expert_scale = nn.Parameter(torch.ones(weight.shape[0]))
        with torch.no_grad():
            self.expert_scale[3] = scale3

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        top_l, top_i = self.router(h).topk(self.k, dim=-1)
        w = torch.softmax(top_l, dim=-1) * self.expert_scale[top_i]
        hk = torch.einsum("td,tkid->tki", h, self.gate_up[top_i])
        gate, up = hk.chunk(2, dim=-1)
        y = torch.einsum("tki,tkdi->tkd", torch.nn.functional.gelu(gate, approximate="tanh") * up,
                         self.down[top_i])
        return (y * w.unsqueeze(-1)).sum(dim=1).reshape(shape)


def _rarely_routed(tmp_path, scale3):
    module = RarelyRouted(scale3)
    example = torch.randn(*EXPORT_SHAPE, D, generator=torch.Generator().manual_seed(0))
    return module, export_module(module, example, tmp_path / "rare.onnx", "torchscript")


def test_mismatch_of_a_rarely_routed_expert_is_caught(tmp_path):
    """Random probes never reach expert 3; tokens steered to it show that the reading (which
    has no per-expert scale) is wrong there, so the block is not converted."""
    _, model = _rarely_routed(tmp_path, scale3=2.0)
    conv = convert_model(model, partial=True)
    assert conv.model is None, conv.blocks[0].traits
    assert "none of" in conv.blocks[0].reason, conv.blocks[0].reason


def test_rarely_routed_expert_is_verified(tmp_path):
    """The same layer without the odd scale converts, every expert reached by some probe."""
    module, model = _rarely_routed(tmp_path, scale3=1.0)
    conv = check_converted(module, model, ["k=2", "gated gelu_tanh halves"])
    assert conv.blocks[0].experts_unreached == []


# ---------------------------------------------------------------------------------------------
# the oracle's top-k, which the probes of every block go through


def _full_sort_topk(scores, k):
    """The spec's order, written as directly as possible: largest first, ties to the lower index."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def _tied_scores(rng, mode, t, e):
    if mode == "normal":
        return rng.standard_normal((t, e)).astype(np.float32)
    if mode == "few values":  # many ties, also across the k-th place
        return rng.integers(-2, 3, (t, e)).astype(np.float32)
    if mode == "masked":  # group-limited routing: -inf for the experts of dropped groups
        return np.where(rng.random((t, e)) < 0.5, -np.inf, rng.integers(0, 2, (t, e))).astype(
            np.float32)
    if mode == "signed zeros":
        return rng.choice(np.array([0.0, -0.0, 1.0, np.inf, -np.inf], np.float32), (t, e))
    scores = rng.integers(0, 3, (t, e)).astype(np.float32)  # "nan"
    scores[rng.random((t, e)) < 0.1] = np.nan
    return scores


@pytest.mark.parametrize("mode", ["normal", "few values", "masked", "signed zeros", "nan"])
def test_topk_matches_full_sort_with_ties(mode):
    rng = np.random.default_rng(5)
    for _ in range(300):
        t, e = int(rng.integers(0, 9)), int(rng.integers(1, 40))
        k = int(rng.integers(1, e + 1))
        scores = _tied_scores(rng, mode, t, e)
        np.testing.assert_array_equal(reference.topk_indices(scores, k),
                                      _full_sort_topk(scores, k), err_msg=f"k={k}\n{scores}")


def test_topk_sorts_only_the_k_picked(monkeypatch):
    """Thousands of rank-1 experts: no row is sorted in full (it made verifying such a layer
    slow), unless ties at the k-th place need it."""
    shapes = []
    argsort = np.argsort

    def recording(a, *args, **kwargs):
        shapes.append(np.shape(a))
        return argsort(a, *args, **kwargs)

    scores = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    scores[3, [10, 20, 30]] = 9.0  # ties inside the k picked
    want = _full_sort_topk(scores, 8)
    monkeypatch.setattr(reference.np, "argsort", recording)
    got = reference.topk_indices(scores, 8)
    np.testing.assert_array_equal(got, want)
    assert list(got[3, :3]) == [10, 20, 30]
    assert shapes and all(s[-1] == 8 for s in shapes), shapes
    scores[5, :] = 1.0  # every expert tied: that row alone takes the full sort
    shapes.clear()
    got = reference.topk_indices(scores, 8)
    assert sorted(shapes) == [(1, 4096), (64, 8)], shapes
    monkeypatch.undo()
    np.testing.assert_array_equal(got, _full_sort_topk(scores, 8))
