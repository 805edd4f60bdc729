"""Real exports of transformers MoE blocks and decoders, converted and checked by execution.

Every family x exporter is exported at test time from transformers' own code, converted, and
run in stock onnxruntime (the MoEFFN nodes run through their embedded function): the converted
model must match the original within 1e-5 relative on inputs whose shapes the export never saw.
The converted model's structural summary is compared with tests/golden/ (set
MOEFUSE_UPDATE_GOLDEN=1 to rewrite the files after a deliberate change).
"""

import dataclasses
import difflib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from exports import EXPORTERS, VOCAB, export_family_block, export_family_decoder, run_onnx
from families import FAMILIES
from moefuse.compare import max_relative_error
from moefuse.converter import convert_model
from moefuse.diff import summary
from moefuse.spec import INPUT_NAMES

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
DECODERS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "ernie4_5_moe", "granitemoe"]


def check_golden(name: str, model: onnx.ModelProto):
    path = os.path.join(GOLDEN, f"{name}.txt")
    text = summary(model)
    if os.environ.get("MOEFUSE_UPDATE_GOLDEN") or not os.path.exists(path):
        with open(path, "w") as f:
            f.write(text)
        if not os.environ.get("MOEFUSE_UPDATE_GOLDEN"):
            pytest.fail(f"golden file {path} was missing and has been written; review it")
        return
    with open(path) as f:
        want = f.read()
    if text != want:
        delta = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                             f"golden/{name}.txt", "converted"))
        pytest.fail(f"converted graph differs from the golden summary:\n{delta}")


def converted(model):
    conv = convert_model(model)
    assert conv.model is not None, "; ".join(f"{b.name}: {b.reason}" for b in conv.near_misses)
    onnx.checker.check_model(conv.model, full_check=True)
    return conv


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block(family, exporter, tmp_path):
    model = export_family_block(family, exporter, tmp_path / "block.onnx")
    conv = converted(model)
    assert [n.op_type for n in conv.model.graph.node].count("MoEFFN") == 1
    assert len(conv.blocks) == 1 and conv.blocks[0].converted
    hidden = FAMILIES[family].hidden
    rng = np.random.default_rng(11)
    for shape in [(1, 1), (3, 11), (2, 37)]:  # the export saw (2, 5)
        x = rng.standard_normal(shape + (hidden,), dtype=np.float32)
        want = run_onnx(model, {"x": x})
        got = run_onnx(conv.model, {"x": x})
        assert got.shape == want.shape
        assert max_relative_error(want, got) < 1e-5, shape
    check_golden(f"block_{family}_{exporter}", conv.model)


@pytest.mark.slow
@pytest.mark.parametrize("family", DECODERS)
def test_whole_decoder(family, tmp_path):
    model, module, moe_layers = export_family_decoder(family, tmp_path / "lm.onnx")
    conv = converted(model)
    assert [n.op_type for n in conv.model.graph.node].count("MoEFFN") == moe_layers
    rng = np.random.default_rng(5)
    for shape in [(1, 1), (3, 9)]:
        ids = rng.integers(0, VOCAB, shape).astype(np.int64)
        want = run_onnx(model, {"input_ids": ids})
        got = run_onnx(conv.model, {"input_ids": ids})
        assert max_relative_error(want, got) < 1e-5, shape
    # every unrelated node, input, output and metadata is kept
    assert [i.name for i in conv.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in conv.model.graph.output] == [o.name for o in model.graph.output]
    assert list(conv.model.metadata_props) == list(model.metadata_props)
    kept = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "RMSNormalization")]
    names_after = {n.name for n in conv.model.graph.node}
    assert all(n.name in names_after for n in kept)
    check_golden(f"decoder_{family}", conv.model)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("eps", [0.0, 0.01])
def test_sparsemixer_threshold_read_off_the_graph(eps, exporter, tmp_path):
    """Runs on random probes cannot tell sparsemixer thresholds apart (the masks rarely fall
    between two candidates), so the converter reads 2 eps off the block's Greater: PhiMoE blocks
    with eps 0 (no other scalar to guess from) and Phi-3.5's 0.01 convert to exactly theirs."""
    import torch
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

    from exports import export_module, first_output
    from families import _randomize

    cfg = PhimoeConfig(hidden_size=32, intermediate_size=24, num_local_experts=4,
                       num_experts_per_tok=2, router_jitter_noise=eps,
                       experts_implementation="batched_mm")
    block = _randomize(PhimoeSparseMoeBlock(cfg), 0)
    export_module(first_output(block), torch.randn(2, 5, 32), tmp_path / "b.onnx", exporter)
    conv = converted(onnx.load(str(tmp_path / "b.onnx")))
    (b,) = conv.blocks
    assert b.attrs.routing == "sparsemixer"
    assert b.attrs.jitter_eps == float(np.float32(eps))
    assert b.traits[:3] == ["sparsemixer", "k=2", f"eps {eps:g}"]  # no "+norm": it has no effect


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe"])
def test_bfloat16_checkpoint_in_float32(family, tmp_path, monkeypatch):
    """A float32 export of a bfloat16 checkpoint (the block's parameters rounded to bfloat16
    values, as loading a bfloat16 checkpoint in float32 leaves them), converted and run on the
    library's CPU kernel: it packs the expert weights as bfloat16 (GPT-OSS: interleaved in_out
    with biases; Qwen2-MoE: a gated shared expert too) and gives bit for bit the output of
    float32 packing, which matches the original export in stock onnxruntime."""
    import torch

    from exports import export_module, first_output
    from moefuse.runtime import library_path, session_options

    try:
        library_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    fam = FAMILIES[family]
    module = fam.build(seed=0, impl="batched_mm")
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    example = torch.randn(2, 5, fam.hidden, generator=torch.Generator().manual_seed(0))
    model = export_module(first_output(module), example, tmp_path / "block.onnx", "torchscript")
    conv = converted(model)
    # the converter keeps them bfloat16 values (re-layouts move values, never round them), so
    # the kernel's check (test_kernel_cpu.py) finds them so
    inits = {t.name: t for t in conv.model.graph.initializer}
    (node,) = [n for n in conv.model.graph.node if n.op_type == "MoEFFN"]
    matrices = [name for slot, name in zip(INPUT_NAMES, node.input)
                if slot in ("w1", "w2", "w3", "shared_w1", "shared_w2", "shared_w3") and name]
    assert len(matrices) == (5 if family == "qwen2_moe" else 2), matrices
    for name in matrices:
        w = numpy_helper.to_array(inits[name])
        assert w.dtype == np.float32 and not (w.view(np.uint32) & 0xFFFF).any(), name
    x = np.random.default_rng(3).standard_normal((3, 11, fam.hidden), dtype=np.float32)
    got = {}
    for weights in ("model", "float32"):
        monkeypatch.setenv("MOEFUSE_CPU_WEIGHTS", weights)
        sess = ort.InferenceSession(conv.model.SerializeToString(), session_options(log_severity_level=3),
                                    providers=["CPUExecutionProvider"])
        got[weights] = sess.run(None, {"x": x})[0]
    assert np.array_equal(got["model"].view(np.uint32), got["float32"].view(np.uint32))
    assert max_relative_error(run_onnx(model, {"x": x}), got["model"]) < 1e-5


def _projections(model):
    """A converted model's MoEFFN node and its projection matrices by input slot."""
    inits = {t.name: t for t in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.op_type == "MoEFFN"]
    mats = {slot: numpy_helper.to_array(inits[name]) for slot, name in zip(INPUT_NAMES, node.input)
            if slot in ("w1", "w2", "w3", "shared_w1", "shared_w2", "shared_w3") and name}
    return node, mats


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_in_out_weights_stored_out_in(family, tmp_path):
    """``weight_layout="out_in"`` (convert --weight-layout out_in): GPT-OSS and Llama 4 blocks,
    whose exports hold their expert weights in_out, convert to a node whose matrices are the
    transposes of the in_out ones, stored in place of them (no in_out copy is left), and which
    matches the original export through the embedded function and, where the library is built,
    gives bit for bit the CPU kernel's output of the in_out node."""
    from moefuse.runtime import library_path, session_options

    model = export_family_block(family, "torchscript", tmp_path / "block.onnx")
    found = converted(model)
    relaid = convert_model(model, weight_layout="out_in")
    assert relaid.model is not None
    onnx.checker.check_model(relaid.model, full_check=True)
    (b,) = relaid.blocks
    assert b.attrs.weight_layout == "out_in" and b.layout_note == ""
    assert found.blocks[0].attrs.weight_layout == "in_out"
    assert dataclasses.replace(b.attrs, weight_layout="in_out") == found.blocks[0].attrs
    node_found, mats_found = _projections(found.model)
    node_relaid, mats_relaid = _projections(relaid.model)
    assert mats_found.keys() == mats_relaid.keys() and mats_found
    for slot, w in mats_found.items():
        assert np.array_equal(mats_relaid[slot], np.swapaxes(w, -1, -2)), slot
    in_out_names = {name for slot, name in zip(INPUT_NAMES, node_found.input) if slot in mats_found}
    assert not in_out_names & {t.name for t in relaid.model.graph.initializer}
    assert b.weights_relaid >= len(mats_found)
    x = np.random.default_rng(2).standard_normal((3, 11, FAMILIES[family].hidden), dtype=np.float32)
    want = run_onnx(model, {"x": x})
    assert max_relative_error(want, run_onnx(relaid.model, {"x": x})) < 1e-5
    try:
        library_path()
    except FileNotFoundError:
        return  # the embedded function's check above stands alone
    got = [ort.InferenceSession(m.SerializeToString(), session_options(log_severity_level=3),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (found.model, relaid.model)]
    assert np.array_equal(got[0].view(np.uint32), got[1].view(np.uint32))
    assert max_relative_error(want, got[1]) < 1e-5


def _also_read(model, tensor, in_subgraph, plus=None):
    """``model`` with one more output computed from ``tensor`` (plus the graph input ``plus``):
    by a node of the graph, or inside the branches of an If (which reads from the enclosing
    graph)."""
    helper = onnx.helper
    total = helper.make_node("ReduceSum", [tensor], ["total"], keepdims=0)
    if plus:
        model.graph.input.append(helper.make_tensor_value_info(plus, onnx.TensorProto.FLOAT, []))
        total = [helper.make_node("ReduceSum", [tensor], ["part"], keepdims=0),
                 helper.make_node("Add", ["part", plus], ["total"])]
    total = total if isinstance(total, list) else [total]
    if in_subgraph:
        branch = helper.make_graph(total, "branch", [],
                                   [helper.make_tensor_value_info("total", onnx.TensorProto.FLOAT, [])])
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(True), "always"))
        total = [helper.make_node("If", ["always"], ["total"], then_branch=branch, else_branch=branch)]
    model.graph.node.extend(total)
    model.graph.output.append(helper.make_tensor_value_info("total", onnx.TensorProto.FLOAT, []))
    return model


@pytest.mark.parametrize("in_subgraph", [False, True])
def test_in_out_weights_read_elsewhere_stay(tmp_path, in_subgraph):
    """A stored matrix that the graph also reads outside the block (by a node, or inside an If's
    branches) keeps the block in_out under ``weight_layout="out_in"`` (transposing it would store it
    twice), and the reason is given; the reader keeps its matrix, and the model runs."""
    model = export_family_block("gpt_oss", "torchscript", tmp_path / "block.onnx")
    node, _ = _projections(converted(model).model)
    w1 = node.input[INPUT_NAMES.index("w1")]
    model = _also_read(model, w1, in_subgraph)
    relaid = convert_model(model, weight_layout="out_in")
    (b,) = relaid.blocks
    assert b.converted and b.attrs.weight_layout == "in_out"
    assert b.layout_note == f"w1 ({w1}) is also read outside the block"
    onnx.checker.check_model(relaid.model, full_check=True)
    x = np.random.default_rng(4).standard_normal((2, 3, FAMILIES["gpt_oss"].hidden), dtype=np.float32)
    assert max_relative_error(run_onnx(model, {"x": x}), run_onnx(relaid.model, {"x": x})) < 1e-5
    with pytest.raises(ValueError, match="weight_layout"):
        convert_model(model, weight_layout="transposed")


def test_subgraph_reads_keep_their_initializers(tmp_path):
    """An initializer read only inside an If's branches stays in the converted model (the rewrite
    counts what subgraphs read from the enclosing graph as read)."""
    model = export_family_block("mixtral", "torchscript", tmp_path / "block.onnx")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(6, dtype=np.float32), "elsewhere"))
    model = _also_read(model, "elsewhere", in_subgraph=True)
    conv = converted(model)
    assert "elsewhere" in {t.name for t in conv.model.graph.initializer}
    sess = ort.InferenceSession(conv.model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros((1, 2, FAMILIES["mixtral"].hidden), np.float32)
    assert sess.run(["total"], {"x": x})[0] == 15.0


@pytest.mark.parametrize("what", ["block output", "routing weights"])
def test_a_subgraph_reading_the_block(tmp_path, what):
    """An If after the block whose branches read the block's output (with another graph input),
    or a tensor inside the block (the router's top-k values): the block still converts, the If
    keeps what it reads, and both outputs match the original's."""
    model = export_family_block("mixtral", "torchscript", tmp_path / "block.onnx")
    if what == "block output":
        tensor = model.graph.output[0].name
    else:
        tensor = next(n for n in model.graph.node if n.op_type == "TopK").output[0]
    model = _also_read(model, tensor, in_subgraph=True, plus="r")
    conv = converted(model)
    assert [n.op_type for n in conv.model.graph.node].count("MoEFFN") == 1
    feeds = {"x": np.random.default_rng(8).standard_normal((2, 3, FAMILIES["mixtral"].hidden), dtype=np.float32),
             "r": np.array(0.5, np.float32)}
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
            for m in (model, conv.model)]
    for want, got in zip(*runs):
        assert max_relative_error(want, got) < 1e-5


def test_transposed_reading_of_a_stored_linear_weight_becomes_a_reuse(tmp_path):
    """Llama-4's shared expert, exported by dynamo, keeps torch Linear's [out, in] weights, which
    the in_out reading transposes into new tensors; out_in reads them as stored, even where the
    graph also reads them elsewhere (nothing is stored twice), and re-lays out the routed ones."""
    model = export_family_block("llama4", "dynamo", tmp_path / "block.onnx")
    found = converted(model)
    shared = found.blocks[0]._hypothesis.operands["shared_w1"]
    assert shared.swap and shared.ref.initializer
    model = _also_read(model, shared.ref.tensor, in_subgraph=False)
    relaid = convert_model(model, weight_layout="out_in")
    (b,) = relaid.blocks
    assert b.attrs.weight_layout == "out_in" and b.layout_note == ""
    node, mats = _projections(relaid.model)
    assert node.input[INPUT_NAMES.index("shared_w1")] == shared.ref.tensor  # reused as stored
    assert (b.weights_reused, b.weights_relaid) == (found.blocks[0].weights_relaid, found.blocks[0].weights_reused)
    x = np.random.default_rng(6).standard_normal((2, 3, FAMILIES["llama4"].hidden), dtype=np.float32)
    assert max_relative_error(run_onnx(model, {"x": x}), run_onnx(relaid.model, {"x": x})) < 1e-5
