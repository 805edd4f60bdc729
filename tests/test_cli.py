"""The command line on good and bad input: clear messages, non-zero exits, nothing lost."""

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from moefuse.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "..", "examples", "tiny_mixtral.onnx")


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def mixtral_with_broken_layer(tmp_path):
    """The tiny model with layer 1's expert activation changed to something MoEFFN lacks."""
    model = onnx.load(TINY)
    count = 0
    for node in model.graph.node:
        if node.op_type == "Sigmoid" and "layers.1" in node.name + "".join(node.input):
            node.op_type = "Sin"
            count += 1
    if count == 0:  # dynamo names: find layer 1's expert sigmoid by order instead
        sig = [n for n in model.graph.node if n.op_type == "Sigmoid"]
        sig[-1].op_type = "Sin"
    path = tmp_path / "broken.onnx"
    onnx.save(model, path)
    return path


def test_help_and_version():
    code, out = invoke("--help")
    assert code == 0 and "convert" in out and "inspect" in out and "diff" in out
    code, out = invoke("--version")
    assert code == 0 and "moefuse" in out


def test_convert_writes_report_and_checks(tmp_path):
    out, report = tmp_path / "fused.onnx", tmp_path / "r.json"
    code, text = invoke("convert", TINY, "-o", out, "--report", report, "--check", "-q")
    assert code == 0, text
    assert "check: max relative error" in text
    data = json.loads(report.read_text())
    assert data["written"] and len(data["blocks"]) == 2
    assert all(b["converted"] for b in data["blocks"])
    assert data["check_max_relative_error"] < 1e-5
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert sum(n.op_type == "MoEFFN" for n in model.graph.node) == 2


def test_inspect_writes_nothing(tmp_path):
    before = set(os.listdir(tmp_path))
    code, text = invoke("inspect", TINY)
    assert code == 0 and "model.model.layers.0.mlp" in text and "verified" in text
    assert set(os.listdir(tmp_path)) == before


def test_diff_shows_op_deltas(tmp_path):
    out = tmp_path / "fused.onnx"
    assert invoke("convert", TINY, "-o", out, "-q")[0] == 0
    code, text = invoke("diff", TINY, out)
    assert code == 0
    assert "moefuse.MoEFFN: +2" in text and "TopK: -2" in text


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model")
    code, text = invoke("convert", bad, "-o", tmp_path / "o.onnx")
    assert code != 0 and "not an ONNX model" in text
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_file(tmp_path):
    data = open(TINY, "rb").read()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: len(data) // 2])
    code, text = invoke("convert", bad, "-o", tmp_path / "o.onnx")
    assert code != 0 and "truncated" in text
    assert not (tmp_path / "o.onnx").exists()


def test_missing_file(tmp_path):
    code, text = invoke("convert", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert code != 0 and "no such file" in text


def test_missing_external_data(tmp_path):
    model = onnx.load(TINY)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.onnx.data",
              size_threshold=1024)
    os.remove(tmp_path / "ext.onnx.data")
    code, text = invoke("convert", path, "-o", tmp_path / "o.onnx")
    assert code != 0 and "ext.onnx.data" in text and "does not exist" in text


def test_unwritable_output(tmp_path):
    code, text = invoke("convert", TINY, "-o", tmp_path / "no" / "such" / "dir" / "o.onnx", "-q")
    assert code != 0 and "does not exist" in text


def test_output_equal_to_input_is_safe(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(TINY, path)
    code, text = invoke("convert", path, "-o", path, "-q")
    assert code == 0, text
    assert sum(n.op_type == "MoEFFN" for n in onnx.load(path).graph.node) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind


def test_old_opset_is_refused(tmp_path):
    model = onnx.load(TINY)
    for imp in model.opset_import:
        if imp.domain == "":
            imp.version = 17
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    code, text = invoke("convert", path, "-o", tmp_path / "o.onnx")
    assert code != 0 and "opset 17" in text and "18" in text


def test_no_moe_block_copies_input(tmp_path):
    w = np.ones((4, 4), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "dense",
                              [helper.make_tensor_value_info("x", 1, ["T", 4])],
                              [helper.make_tensor_value_info("y", 1, ["T", 4])],
                              initializer=[onnx.numpy_helper.from_array(w, "w")])
    path, out = tmp_path / "dense.onnx", tmp_path / "o.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    code, text = invoke("convert", path, "-o", out, "-q")
    assert code == 0 and "no MoE blocks found" in text
    assert out.read_bytes() == path.read_bytes()


def test_all_or_nothing_then_partial(tmp_path):
    broken = mixtral_with_broken_layer(tmp_path)
    out = tmp_path / "o.onnx"
    code, text = invoke("convert", broken, "-o", out, "-q")
    assert code != 0
    assert "near miss" in text and "did not verify; nothing written" in text
    assert not out.exists()
    code, text = invoke("convert", broken, "-o", out, "--partial", "--check", "-q")
    assert code == 0, text
    model = onnx.load(out)
    assert sum(n.op_type == "MoEFFN" for n in model.graph.node) == 1
    assert float(text.split("max relative error")[1].split()[0]) < 1e-5


def _one_stack_model(tmp_path):
    """Top-2 routing over experts of one stacked [E, D, D] matrix each: not a MoEFFN expert
    (it needs 2 or 3 projections), refused alike for every candidate output of the block."""
    import torch
    from torch import nn

    from exports import export_module

    class OneStack(nn.Module):
        def __init__(self, d=16, e=4):
            super().__init__()
            self.router = nn.Linear(d, e, bias=False)
            self.w = nn.Parameter(torch.randn(e, d, d, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            shape = x.shape
            h = x.reshape(-1, shape[-1])
            top_l, top_i = self.router(h).topk(2, dim=-1)
            y = torch.einsum("td,tkod->tko", h, self.w[top_i])
            return (y * torch.softmax(top_l, dim=-1).unsqueeze(-1)).sum(dim=1).reshape(shape)

    path = tmp_path / "one_stack.onnx"
    export_module(OneStack(), torch.randn(2, 5, 16), path, "torchscript")
    return path


def test_inspect_lists_each_near_miss_reason_once(tmp_path):
    code, text = invoke("inspect", _one_stack_model(tmp_path))
    line = next(t for t in text.splitlines() if t.startswith("near miss"))
    assert line.count("expected 2 or 3 stacked expert weight tensors") == 1, line
    assert line.count("output size differs from the block input's") == 1, line
