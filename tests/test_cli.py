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
    # each node by name, its attributes (all default here: said so) and its input shapes
    assert "MoEFFN b#0 model.model.layers.0.mlp/MoEFFN: default attributes; inputs X[" in text
    assert "w1[8, 256, 64]" in text and "w2[8, 64, 128]" in text


def test_a_converted_model_is_named_as_such(tmp_path):
    fused = tmp_path / "fused.onnx"
    assert invoke("convert", TINY, "-o", fused, "-q")[0] == 0
    code, text = invoke("inspect", fused)
    assert code == 0 and text.strip() == ("no MoE blocks found; it already has 2 MoEFFN node(s) "
                                          "(`moefuse validate` checks them)")
    code, text = invoke("convert", fused, "-o", tmp_path / "again.onnx", "-q")
    assert code == 0 and "the output is a copy of the input; it already has 2 MoEFFN node(s)" in text


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
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".moefuse-")]  # no temporary left
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


# --- external data, output paths and the report: nothing of the user's overwritten ------------

def external_tiny(folder, location="model.onnx.data"):
    """The tiny model with its weights in an external data file, as torch's exporter names it."""
    folder.mkdir(exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(onnx.load(TINY), path, save_as_external_data=True, location=location)
    return path


def runs(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_outputs()


def test_in_place_conversion_keeps_the_weights_file(tmp_path, monkeypatch):
    """New tensors of a re-layout go to a file of their own, not over the model's
    `model.onnx.data` that the kept tensors still read; --check compares with the original."""
    from moefuse.converter import io

    monkeypatch.setattr(io, "_EXTERNAL_THRESHOLD", 1024)  # the tiny model's new tensors go out too
    path = external_tiny(tmp_path)
    before = (tmp_path / "model.onnx.data").read_bytes()
    code, text = invoke("convert", path, "-o", path, "--target", "ort", "--check", "-q")
    assert code == 0, text
    assert (tmp_path / "model.onnx.data").read_bytes() == before
    locations = {e.value for t in onnx.load(path, load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data", "model.onnx.moefuse.data"}
    assert runs(path)
    assert "max relative error 0.00e+00" not in text  # (the converted model against itself)


def test_output_in_another_folder_gets_the_data(tmp_path):
    """onnxruntime refuses data paths that leave the model's folder: the output's folder gets the
    input's data files (hard links, or copies), for converted and for unchanged models."""
    path = external_tiny(tmp_path / "a")
    out = tmp_path / "b" / "fused.onnx"
    out.parent.mkdir()
    code, text = invoke("convert", path, "-o", out, "-q")
    assert code == 0, text
    assert (out.parent / "model.onnx.data").read_bytes() == (tmp_path / "a" / "model.onnx.data").read_bytes()
    assert runs(out)
    # copies, not hard links: onnx's loader refuses data files with several links
    assert (tmp_path / "a" / "model.onnx.data").stat().st_nlink == 1
    onnx.load(path)
    onnx.load(out)
    code, text = invoke("convert", path, "-o", out, "-q")  # again: the data file is reused
    assert code == 0, text
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "model.onnx.data"]

    w = np.ones((512, 512), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "dense",
                              [helper.make_tensor_value_info("x", 1, ["T", 512])],
                              [helper.make_tensor_value_info("y", 1, ["T", 512])],
                              initializer=[onnx.numpy_helper.from_array(w, "w")])
    dense = tmp_path / "a" / "dense.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), dense,
              save_as_external_data=True, location="dense.bin")
    copy = tmp_path / "c" / "dense.onnx"
    copy.parent.mkdir()
    code, text = invoke("convert", dense, "-o", copy, "-q")
    assert code == 0 and "no MoE blocks found" in text
    assert copy.read_bytes() == dense.read_bytes() and (copy.parent / "dense.bin").exists()
    assert runs(copy)


def test_the_report_may_not_replace_the_model_or_the_output(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(TINY, path)
    before = path.read_bytes()
    for report in (path, tmp_path / "o.onnx"):
        code, text = invoke("convert", path, "-o", tmp_path / "o.onnx", "--report", report, "-q")
        assert code == 2 and "--report" in text and "its own path" in text
    assert path.read_bytes() == before and not (tmp_path / "o.onnx").exists()
    code, text = invoke("convert", path, "-o", tmp_path / "o.onnx", "--report",
                        tmp_path / "nodir" / "r.json", "-q")
    assert code == 2 and "no such folder" in text and not (tmp_path / "o.onnx").exists()


def test_output_that_is_not_a_file_is_refused_and_a_link_writes_its_target(tmp_path):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    code, text = invoke("convert", TINY, "-o", fifo, "-q")
    assert code == 1 and "not a regular file" in text
    assert not fifo.is_file() and fifo.exists()
    target, link = tmp_path / "target.onnx", tmp_path / "link.onnx"
    target.write_bytes(b"old")
    link.symlink_to(target)
    code, text = invoke("convert", TINY, "-o", link, "-q")
    assert code == 0, text
    assert link.is_symlink() and sum(n.op_type == "MoEFFN" for n in onnx.load(target).graph.node) == 2
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("argv,message", [
    (["--tokens", "a,b"], "expected comma-separated whole numbers"),
    (["--tokens", ","], "token counts of at least 1"),
    (["--tokens", "0"], "token counts of at least 1"),
    (["--batch", "0"], "--batch"),
    (["--threads", "-1"], "--threads"),
])
def test_bench_refuses_bad_sizes(argv, message):
    code, text = invoke("bench", TINY, *argv, "-q")
    assert code == 2 and message in text, text


def test_bench_of_a_converted_model_times_the_library_against_the_function(tmp_path):
    """A model that is already fused has nothing to convert: bench times its MoEFFN nodes with
    the library against the embedded function that stock onnxruntime runs, and without that
    function (a model fused elsewhere) the library alone, saying why."""
    fused = tmp_path / "fused.onnx"
    assert invoke("convert", TINY, "-o", fused, "-q")[0] == 0
    code, text = invoke("bench", fused, "--tokens", "1,5", "--json", "-q")
    assert code == 0, text
    rows = json.loads(text)
    assert [r["variant"] for r in rows] == ["MoEFFN, embedded function", "MoEFFN + moefuse library"]
    assert all(ms > 0 for r in rows for ms in r["ms_per_call"].values())
    assert max(rows[1]["max_relative_error"].values()) < 1e-4
    bare = onnx.load(fused)
    del bare.functions[:]
    onnx.save(bare, tmp_path / "bare.onnx")
    code, text = invoke("bench", tmp_path / "bare.onnx", "--tokens", "3")
    assert code == 0, text
    assert "no embedded MoEFFN function" in text
    assert "MoEFFN + moefuse library" in text and "embedded function  " not in text


def test_bench_cuda_without_a_cuda_provider():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA execution provider")
    code, text = invoke("bench", TINY, "--provider", "cuda", "-q")
    assert code == 2 and "no CUDA execution provider" in text


@pytest.mark.parametrize("value,said", [("two", "got STRING 'two'"), (3.0, "got FLOAT 3.0"),
                                        ([3], "got list [3]")])
def test_validate_refuses_an_attribute_of_another_type(tmp_path, value, said):
    """A kernel reads k as an INT and would take its default for a FLOAT 3.0 (running k = 2):
    validate says so rather than reading the value as 3."""
    from moefuse import MoEFFNAttrs, make_moeffn_model
    from moefuse.synthetic import random_inputs

    attrs = MoEFFNAttrs(k=2)
    model = make_moeffn_model(attrs, random_inputs(attrs, 3, 16, 8, 4))
    node = next(n for n in model.graph.node if n.op_type == "MoEFFN")
    node.name = "moe0"
    kept = [a for a in node.attribute if a.name != "k"]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute("k", value)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code, text = invoke("validate", path)
    assert code == 1 and "'moe0'" in text and f"'k' must be of type INT, {said}" in text, text


def test_validate_notes_function_overloads(tmp_path):
    """Two MoEFFN configurations in one model need two fallback functions, told apart by overload,
    which onnxruntime before 1.27 ignores: validate says so; one configuration gets no note."""
    from moefuse import MoEFFNAttrs, add_moeffn, make_moeffn_model
    from moefuse.synthetic import random_inputs

    a1 = MoEFFNAttrs(k=2)
    inputs = random_inputs(a1, 3, 16, 8, 4)
    model = make_moeffn_model(a1, inputs)
    single = tmp_path / "one.onnx"
    onnx.save(model, single)
    code, text = invoke("validate", single)
    assert code == 0 and "note:" not in text, text
    model.graph.value_info.append(helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["T", 16]))
    model.graph.output[0].name = "Z"
    add_moeffn(model, {n: ("Y" if n == "X" else n) for n in inputs}, "Z", a1.replace(k=3), name="second")
    two = tmp_path / "two.onnx"
    onnx.save(model, two)
    code, text = invoke("validate", two)
    assert code == 0 and "note: 2 MoEFFN configurations" in text and "from 1.27" in text, text


def test_new_data_never_replaces_a_file_of_the_user(tmp_path, monkeypatch):
    """`<output>.data` on disk that the output being replaced does not use is left alone; the new
    tensors go to another name."""
    from moefuse.converter import io

    monkeypatch.setattr(io, "_EXTERNAL_THRESHOLD", 1024)
    path = external_tiny(tmp_path / "a")
    out = tmp_path / "a" / "o.onnx"
    (tmp_path / "a" / "o.onnx.data").write_text("precious")
    code, text = invoke("convert", path, "-o", out, "--target", "ort", "-q")
    assert code == 0, text
    assert (tmp_path / "a" / "o.onnx.data").read_text() == "precious"
    assert runs(out)
    code, text = invoke("convert", path, "-o", out, "--target", "ort", "-q")  # again: its own data
    assert code == 0, text                                                     # file is replaced
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "model.onnx", "model.onnx.data", "o.onnx", "o.onnx.data", "o.onnx.moefuse.data"]


def test_the_report_may_not_replace_a_data_file(tmp_path, monkeypatch):
    from moefuse.converter import io

    monkeypatch.setattr(io, "_EXTERNAL_THRESHOLD", 1024)
    path = external_tiny(tmp_path)
    data = tmp_path / "model.onnx.data"
    before = data.read_bytes()
    link = tmp_path / "r.json"
    os.link(path, link)  # the model by another name
    for report in (data, link):
        code, text = invoke("convert", path, "-o", path, "--report", report, "-q")
        assert code == 2 and "give the report its own path" in text, text
    assert data.read_bytes() == before
    os.unlink(link)
    out = tmp_path / "o.onnx"  # the output's new data file, named as it is written
    code, text = invoke("convert", path, "-o", out, "--target", "ort", "--report",
                        tmp_path / "o.onnx.data", "-q")
    assert code == 1 and "not written" in text
    assert runs(out) and data.read_bytes() == before


def test_a_changed_data_file_is_copied_again(tmp_path):
    """The copy beside an earlier output is that output's: when the input's data file changes
    (a re-export), the next conversion replaces the copy rather than adding another."""
    path = external_tiny(tmp_path / "a")
    out = tmp_path / "b" / "fused.onnx"
    out.parent.mkdir()
    data = tmp_path / "a" / "model.onnx.data"
    for run in range(3):
        os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
        code, text = invoke("convert", path, "-o", out, "-q")
        assert code == 0, f"run {run}: {text}"
        assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "model.onnx.data"]
        assert (out.parent / "model.onnx.data").stat().st_mtime_ns == data.stat().st_mtime_ns


def test_a_pipe_as_the_model_is_refused(tmp_path):
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)
    for command in (["inspect", fifo], ["convert", fifo, "-o", tmp_path / "o.onnx"]):
        code, text = invoke(*command)
        assert code == 1 and "not a regular file" in text


# --- doctor ---

def test_doctor_runs_the_cpu_kernel_and_says_what_cuda_lacks():
    import onnxruntime as ort

    code, out = invoke("doctor", "-q")
    assert "ok       library" in out, out
    assert "ok       MoEFFN on CPU (float32)  moefuse's kernel ran (5 and 256 tokens); max relative error" in out, out
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert code == 0, out
        assert "skipped  CUDA provider" in out and "install onnxruntime-gpu" in out, out
        # asked for the GPU, the same finding fails
        code, out = invoke("doctor", "-q", "--provider", "cuda")
        assert code == 1 and "failed   CUDA provider" in out, out


@pytest.mark.parametrize("isa,packing", [("generic", "float16 / bfloat16 weights packed 16-bit"),
                                          ("blas", "weights packed as float32")])
def test_doctor_names_the_cpu_kernels(monkeypatch, isa, packing):
    """The CPU kernel's inner loops as the library picks them (here forced), and how it packs
    16-bit weights; the node check runs on them."""
    monkeypatch.setenv("MOEFUSE_CPU_ISA", isa)
    code, out = invoke("doctor", "-q")
    assert f"info     CPU kernels              {isa} (MOEFUSE_CPU_ISA): " in out, out
    assert packing in out and "ok       MoEFFN on CPU (float32)" in out, out
    monkeypatch.setenv("MOEFUSE_CPU_WEIGHTS", "float32")
    code, out = invoke("doctor", "-q")
    assert "weights packed as float32" in out, out


def test_doctor_json():
    code, out = invoke("doctor", "-q", "--json")
    report = json.loads(out)
    assert report["ok"] is (code == 0)
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["MoEFFN on CPU (float32)"]["status"] == "ok", report


def test_doctor_without_the_library(monkeypatch):
    monkeypatch.setenv("MOEFUSE_LIBRARY", "/nonexistent/libmoefuse_ops.so")
    code, out = invoke("doctor", "-q")
    assert code == 1, out
    assert "failed   library" in out and "/nonexistent/libmoefuse_ops.so" in out, out
    assert "MoEFFN on CPU" not in out  # nothing runs without it


@pytest.mark.parametrize("build,check", [
    (None, "CUDA kernels"),  # a library built without nvcc
    ({"archs": ["80", "90a"], "device": None}, "GPU"),  # onnxruntime-gpu on a machine without a GPU
    ({"archs": ["80", "90a"], "device": {"capability": "7.5", "runs": False, "wgmma": False,
                                         "fused_decode": False, "pdl": False}},
     "CUDA kernels"),  # a GPU older than the kernels
])
def test_doctor_says_what_the_gpu_lacks(monkeypatch, build, check):
    """With onnxruntime's CUDA provider installed, a missing piece is skipped (the CPU is fine),
    or fails the run when the GPU is asked for; the node is not run on the CPU in its place."""
    import onnxruntime as ort

    import moefuse.runtime

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(moefuse.runtime, "cuda_build", lambda: build)
    code, out = invoke("doctor", "-q")
    assert code == 0 and f"skipped  {check}" in out, out
    assert "MoEFFN on CUDA" not in out, out
    code, out = invoke("doctor", "-q", "--provider", "cuda")
    assert code == 1 and f"failed   {check}" in out, out


def test_doctor_tells_the_fallback_function_from_the_kernel(monkeypatch):
    """A session without the library runs the node's embedded function: the check must fail."""
    import onnxruntime as ort

    import moefuse.runtime

    def plain_options(**options):
        so = ort.SessionOptions()
        for key, value in options.items():
            setattr(so, key, value)
        return so

    monkeypatch.setattr(moefuse.runtime, "session_options", plain_options)
    code, out = invoke("doctor", "-q")
    assert code == 1, out
    assert "failed   MoEFFN on CPU (float32)  no MoEFFN kernel ran" in out, out


def _gpt_oss_block_file(tmp_path, data_file):
    """An exported GPT-OSS block (expert weights in_out) saved as src.onnx, its weights in the
    external file ``data_file``, or in src.onnx itself for None."""
    from exports import export_family_block

    model = export_family_block("gpt_oss", "torchscript", tmp_path / "block.onnx")
    src = tmp_path / "src.onnx"
    if data_file:
        onnx.save(model, src, save_as_external_data=True, location=data_file, size_threshold=256)
    else:
        onnx.save(model, src)
    return src


@pytest.mark.parametrize("external", [False, True])
def test_convert_weight_layout_out_in(tmp_path, external):
    """A GPT-OSS block (expert weights read in_out): as found, the output says what the CUDA
    kernel will copy and how to avoid it; with --weight-layout out_in, the node holds out_in
    weights, the check passes and no note is printed, from a model held in one file or with its
    weights in an external data file."""
    from moefuse.builder import attrs_of

    src = _gpt_oss_block_file(tmp_path, "src.onnx.data" if external else None)
    code, text = invoke("convert", src, "-o", tmp_path / "found.onnx", "-q")
    assert code == 0, text
    assert "note: 1 MoEFFN node(s) hold in_out weights" in text and "--weight-layout out_in" in text
    out, report = tmp_path / "out_in.onnx", tmp_path / "r.json"
    code, text = invoke("convert", src, "-o", out, "--weight-layout", "out_in", "--check", "-q",
                        "--report", report)
    assert code == 0, text
    assert "in_out" not in text and "check: max relative error" in text
    (block,) = json.loads(report.read_text())["blocks"]
    assert block["attrs"]["weight_layout"] == "out_in" and block["layout_note"] == ""
    assert json.loads(report.read_text())["check_max_relative_error"] < 1e-5
    converted = onnx.load(out)
    (node,) = [n for n in converted.graph.node if n.op_type == "MoEFFN"]
    assert attrs_of(node).weight_layout == "out_in"
    code, text = invoke("convert", src, "-o", tmp_path / "x.onnx", "--weight-layout", "transposed")
    assert code != 0 and "transposed" in text


@pytest.mark.parametrize("data_file", ["src.onnx.data", "moefuse-spill"])
def test_new_tensors_spilled_to_the_data_file(tmp_path, monkeypatch, data_file):
    """With its weights in external data (in a file of any name, the spill's placeholder
    included), the rewrite's new tensors (here every one: the size above which they leave the
    model is set to 0) are written to a temporary file beside the output as they are made, which
    becomes the output's data file: the model refers to it, runs and matches the original, and no
    temporary file is left."""
    import moefuse.converter.io as io

    monkeypatch.setattr(io, "_EXTERNAL_THRESHOLD", 0)
    src = _gpt_oss_block_file(tmp_path, data_file)
    out = tmp_path / "out.onnx"
    code, text = invoke("convert", src, "-o", out, "--weight-layout", "out_in", "--check", "-q")
    assert code == 0, text
    assert float(text.split("max relative error")[1].split()[0]) < 1e-5
    converted = onnx.load(out, load_external_data=False)
    (node,) = [n for n in converted.graph.node if n.op_type == "MoEFFN"]
    new = [t for t in converted.graph.initializer if t.name.startswith(node.name + ".")]
    assert len(new) == 2  # w1 and w2, transposed
    for t in new:
        assert t.data_location == onnx.TensorProto.EXTERNAL
        assert {e.key: e.value for e in t.external_data}["location"] == "out.onnx.data"
    # the new data file holds those tensors end to end (and any other the model no longer holds)
    places = [{e.key: e.value for e in t.external_data} for t in converted.graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL]
    places = sorted((int(p["offset"]), int(p["length"])) for p in places if p["location"] == "out.onnx.data")
    assert [sum(n for _, n in places[:i]) for i in range(len(places))] == [o for o, _ in places]
    assert os.path.getsize(tmp_path / "out.onnx.data") == sum(n for _, n in places)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".moefuse-")]


def test_a_model_in_one_file_stays_one_file(tmp_path, monkeypatch):
    """A model held in one file is converted in memory: its output is one file too (below the
    size at which save moves tensors out), whatever the size of its new tensors."""
    import moefuse.converter.io as io

    monkeypatch.setattr(io, "_EXTERNAL_THRESHOLD", 0)
    src = _gpt_oss_block_file(tmp_path, None)
    out = tmp_path / "out.onnx"
    code, text = invoke("convert", src, "-o", out, "--weight-layout", "out_in", "--check", "-q")
    assert code == 0, text
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(out, load_external_data=False).graph.initializer)
    assert sorted(os.listdir(tmp_path)) == ["block.onnx", "out.onnx", "src.onnx"]


def test_spill_write_failure_is_an_error_not_a_traceback(tmp_path, monkeypatch):
    """A disk that fills while the rewrite writes its new tensors: a clear error naming the file,
    exit 1, the report written (not converted), no output and no temporary file left."""
    import errno

    import moefuse.converter.io as io

    monkeypatch.setattr(io, "_EXTERNAL_THRESHOLD", 0)

    class Full:
        closed = False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            self.closed = True

    real_init = io.Spill.__init__

    def init(self, out_path):
        real_init(self, out_path)
        self._file.close()
        self._file = Full()

    monkeypatch.setattr(io.Spill, "__init__", init)
    src = _gpt_oss_block_file(tmp_path, "src.onnx.data")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, text = invoke("convert", src, "-o", out, "--weight-layout", "out_in", "--report", report)
    assert code == 1 and "cannot write" in text and "No space left on device" in text, text
    assert "Traceback" not in text
    data = json.loads(report.read_text())
    assert not out.exists() and data["written"] is False and "No space left on device" in data["error"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".moefuse-")]


def test_sigterm_during_convert_exits_through_the_cleanup():
    """During a conversion SIGTERM raises SystemExit (143), so the finally blocks that remove
    temporary files run; the previous handler is back afterwards."""
    import signal
    import time

    from moefuse.cli import _sigterm_as_exit

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        with _sigterm_as_exit():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at once, not after the sleep
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
