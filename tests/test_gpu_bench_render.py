"""gpu_moe.py --render: a results JSON re-scored with its GPU's roofline (no GPU needed)."""

import json
import os
import subprocess
import sys

import pytest

from benchmark_scripts import load, script

SCRIPT = script("gpu_moe")


def _gpu_moe():
    return load("gpu_moe")


def _record(variant, gpu_us, wall_us=None):
    return {"shape": "Mixtral-8x7B", "H": 4096, "I": 14336, "E": 8, "k": 2, "dtype": "bfloat16",
            "T": 32, "variant": variant, "active_experts": 8, "gpu_us": gpu_us,
            "wall_us": gpu_us if wall_us is None else wall_us,
            "mem_us": 1.0, "flop_us": 1.0}  # stale roofline fields, to be rewritten


@pytest.mark.parametrize("gpu,flags,tbps", [("NVIDIA H200", [], 4.8),
                                            ("NVIDIA H100 80GB HBM3", [], 3.35),
                                            ("NVIDIA H200", ["--hbm-tbps", "2.0"], 2.0)])
def test_render_rescores_roofline(tmp_path, gpu, flags, tbps):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"meta": {"gpu": gpu, "onnxruntime": "1.31.1"},
                               "records": [_record("MoEFFN", 800.0, 760.0),
                                           _record("com.microsoft.MoE", 700.0, 722.0)]}))
    out = tmp_path / "out"
    subprocess.run([sys.executable, SCRIPT, "--render", str(src), "--out", str(out), *flags],
                   check=True, capture_output=True, text=True)
    data = json.loads((out / "gpu_moe.json").read_text())
    assert data["meta"]["hbm_bytes_per_s"] == pytest.approx(tbps * 1e12)
    mem_us = 8 * 3 * 4096 * 14336 * 2 / (tbps * 1e12) * 1e6
    flop_us = 2 * 32 * 2 * 3 * 4096 * 14336 / 989e12 * 1e6
    ours = data["records"][0]
    assert ours["mem_us"] == pytest.approx(mem_us, abs=0.01)
    assert ours["flop_us"] == pytest.approx(flop_us, abs=0.01)
    assert ours["mem_fraction"] == pytest.approx(mem_us / 800.0, abs=1e-3)
    table = (out / "gpu_moe.md").read_text()
    assert f"{tbps:.2f} TB/s" in table
    assert "| 0.88x | 0.95x |" in table  # 700 / 800 by GPU time, 722 / 760 by wall time


def test_render_variant_table(tmp_path):
    """A forced variant is listed with its speed relative to the default and its difference from
    com.microsoft.MoE."""
    variant = dict(_record("MoEFFN[narrow0]", 1000.0), max_rel_diff_vs_ms=0.0078)
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"meta": {"gpu": "NVIDIA H200", "onnxruntime": "1.31.1"},
                               "records": [_record("MoEFFN", 800.0),
                                           _record("com.microsoft.MoE", 700.0), variant]}))
    out = tmp_path / "out"
    subprocess.run([sys.executable, SCRIPT, "--render", str(src), "--out", str(out)],
                   check=True, capture_output=True, text=True)
    table = (out / "gpu_moe.md").read_text()
    assert "| MoEFFN[narrow0] | 1000.0 / 1000.0 | 0.80x | 0.80x | 0.0078 |" in table


def test_render_names_what_failed(tmp_path):
    """A variant whose session failed reads 'error' in the tables, and the report says why in a
    few words: onnxruntime's allocation failure as the GPU memory it lacked."""
    oom = {k: v for k, v in _record("MoEFFN[nooverlap]", 0.0).items() if k not in ("gpu_us", "wall_us")}
    oom["error"] = ("Fail: [ONNXRuntimeError] : 1 : FAIL : Exception during initialization: bfc_arena.cc:360 "
                    "Failed to allocate memory for requested buffer of size 1879048192\n")
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"meta": {"gpu": "NVIDIA H100 80GB HBM3", "onnxruntime": "1.31.1"},
                               "records": [_record("MoEFFN", 800.0), _record("com.microsoft.MoE", 900.0), oom]}))
    out = tmp_path / "out"
    subprocess.run([sys.executable, SCRIPT, "--render", str(src), "--out", str(out)],
                   check=True, capture_output=True, text=True)
    table = (out / "gpu_moe.md").read_text()
    assert "| MoEFFN[nooverlap] | error | — | — | — |" in table
    assert ("Mixtral-8x7B bfloat16 T = 32 MoEFFN[nooverlap]: out of GPU memory (a buffer of 1.75 GiB)"
            in table), table
    assert _gpu_moe().short_failure("RuntimeError: launch failed\nmore") == "RuntimeError: launch failed"


def test_memory_warning_before_sessions_fail():
    """Thirteen more sessions of 6 GiB do not fit 60 GiB free: a warning that names the numbers;
    nine do, and nothing is said."""
    gib = 2**30
    warning = _gpu_moe().memory_warning("Mixtral-8x7B", "bfloat16", 13, 6 * gib, 60 * gib)
    assert "13 more sessions of 6.0 GiB each (78.0 GiB) exceed the GPU's 60.0 GiB free" in warning
    assert _gpu_moe().memory_warning("Mixtral-8x7B", "bfloat16", 9, 6 * gib, 60 * gib) == ""


def test_render_timeline_table(tmp_path):
    """A record's kernel timeline is listed under it, kernel names shortened, with the union of
    the kernels' intervals (busy) beside the call's span."""
    ours = dict(_record("MoEFFN", 800.0), timeline={"calls": 29, "span_us": 286.8, "kernels": [
        {"name": "void moefuse::cuda::(anonymous namespace)::FusedKernel<__nv_bfloat16, 0, 1024>(m",
         "start_us": 0.0, "end_us": 10.6},
        {"name": "Memset (Device)", "start_us": 11.0, "end_us": 11.9}]})
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"meta": {"gpu": "NVIDIA H200", "onnxruntime": "1.31.1"},
                               "records": [ours, _record("com.microsoft.MoE", 700.0)]}))
    out = tmp_path / "out"
    subprocess.run([sys.executable, SCRIPT, "--render", str(src), "--out", str(out)],
                   check=True, capture_output=True, text=True)
    table = (out / "gpu_moe.md").read_text()
    assert "Mixtral-8x7B, bfloat16, T = 32, MoEFFN: 286.8 µs, busy 11.5 (29 calls)" in table
    assert "| FusedKernel<__nv_bfloat16, 0, 1024> | 0.0 | 10.6 |" in table
    assert "| Memset | 11.0 | 11.9 |" in table


def test_short_kernel_names():
    gpu_moe = _gpu_moe()
    assert gpu_moe.short_kernel_name("void a::b::K<c::d<int>, 3>(a::P)") == "K<c::d<int>, 3>"
    assert gpu_moe.short_kernel_name("moefuse::cuda::(anonymous namespace)::GroupKernel(x)") == "GroupKernel"
    assert gpu_moe.short_kernel_name("_ZN7cutlass6KernelINS_4gemm") == "_ZN7cutlass6KernelINS_4gemm"


def test_variant_environments():
    """--paths names map to the environment the kernel reads; lib= loads another library build."""
    gpu_moe = _gpu_moe()
    assert gpu_moe.variant_env("lib=/tmp/other.so") == {"MOEFUSE_LIBRARY": "/tmp/other.so"}
    assert gpu_moe.variant_env("pingpong+bn128") == {"MOEFUSE_CUDA_SCHEDULE": "pingpong",
                                                     "MOEFUSE_CUDA_BN": "128"}
    assert gpu_moe.variant_env("decode") == {"MOEFUSE_CUDA_PATH": "decode"}
    assert gpu_moe.variant_env("split") == {"MOEFUSE_CUDA_DECODE": "split"}
    assert gpu_moe.variant_env("passes") == {"MOEFUSE_CUDA_RANK_ROUTE": "0"}
    assert gpu_moe.variant_env("onetoken0") == {"MOEFUSE_CUDA_ONE_TOKEN": "0"}
    assert gpu_moe.variant_env("ctapairs0") == {"MOEFUSE_CUDA_CTA_PAIRS": "0"}
    assert gpu_moe.variant_env("ctapairs+nooverlap") == {"MOEFUSE_CUDA_CTA_PAIRS": "1",
                                                         "MOEFUSE_CUDA_OVERLAP": "0"}
    assert gpu_moe.variant_env("graph+tmarows0") == {"MOEFUSE_CUDA_TMA_ROWS": "0"}
    assert gpu_moe.uses_graph("graph+tmarows0") and not gpu_moe.uses_graph("tmarows0")
    assert gpu_moe.variant_env("lib=/x.so+nooverlap") == {"MOEFUSE_LIBRARY": "/x.so",
                                                          "MOEFUSE_CUDA_OVERLAP": "0"}


def test_variant_environment_restored(monkeypatch):
    """A variant's environment holds while its session is made, then the default's is back."""
    gpu_moe = _gpu_moe()
    monkeypatch.setenv("MOEFUSE_LIBRARY", "/tmp/default.so")
    monkeypatch.delenv("MOEFUSE_CUDA_BN", raising=False)
    with gpu_moe.variant_environment(gpu_moe.variant_env("lib=/tmp/other.so+bn128")):
        assert os.environ["MOEFUSE_LIBRARY"] == "/tmp/other.so"
        assert os.environ["MOEFUSE_CUDA_BN"] == "128"
    assert os.environ["MOEFUSE_LIBRARY"] == "/tmp/default.so"
    assert "MOEFUSE_CUDA_BN" not in os.environ


def test_busy_time_counts_overlaps_once_and_gaps_not_at_all():
    """Kernels launched early (programmatic dependent launch) overlap their predecessor: the
    overlap counts once; idle time between kernels (waiting for the host) not at all."""
    gpu_moe = _gpu_moe()
    assert gpu_moe.busy_time([(25.0, 30.0), (0.0, 5.0), (4.0, 20.0), (6.0, 10.0)]) == 25.0
    assert gpu_moe.busy_time([]) == 0.0


def test_call_timeline_medians_per_kernel():
    """Calls split at idle gaps; each kernel's start and end are medians from its call's start;
    a call with a kernel too few is left out."""
    gpu_moe = _gpu_moe()
    events = []
    for c, (t0, shift) in enumerate([(0.0, 0.0), (100.0, 1.0), (200.0, 2.0), (300.0, 0.0)]):
        events += [(t0, t0 + 5 + shift, "route"), (t0 + 5, t0 + 20, "proj1"),
                   (t0 + 15, t0 + 30 + shift, "proj2")]
        if c == 3:  # the fourth call lacks its last kernel
            events.pop()
    kernels, span, used = gpu_moe.call_timeline(events)
    assert used == 3
    assert [n for n, _, _ in kernels] == ["route", "proj1", "proj2"]
    assert kernels[0] == ("route", 0.0, 6.0)
    assert kernels[2] == ("proj2", 15.0, 31.0)
    assert span == 31.0
    assert gpu_moe.call_timeline(events, calls=4)[2] == 3
    assert gpu_moe.call_timeline([]) == ([], 0.0, 0)


def test_call_timeline_splits_at_the_longest_gaps_given_the_call_count():
    """A call that waits on the host mid-way (an idle gap of 25 µs) is one call when the number of
    calls is known; split at every gap over 20 µs it would be two."""
    gpu_moe = _gpu_moe()
    events = []
    for t0 in (0.0, 200.0, 400.0):
        events += [(t0, t0 + 4, "route"), (t0 + 29, t0 + 60, "gemm1"), (t0 + 62, t0 + 90, "gemm2")]
    kernels, span, used = gpu_moe.call_timeline(events, calls=3)
    assert used == 3
    assert kernels == [("route", 0.0, 4.0), ("gemm1", 29.0, 60.0), ("gemm2", 62.0, 90.0)]
    assert span == 90.0
    assert len(gpu_moe.call_timeline(events)[0]) < 3  # each call in two pieces


def test_gpu_time_is_the_union_of_kernel_intervals():
    """Overlapping kernels (programmatic dependent launch) count once; idle gaps not at all; the
    median of the profiled rounds is the GPU time, and every round's value is kept."""
    gpu_moe = _gpu_moe()

    class Profiled:
        shift = iter([0.0, 0.0, 30.0])  # the third round's second call is 30 µs longer
        gpu_round = gpu_moe.Runner.gpu_round

        def profiled(self, calls, wait_each):
            assert not wait_each
            d = next(self.shift)
            return [(0.0, 10.0, "a"), (8.0, 15.0, "b"), (40.0, 45.0 + d, "a"), (41.0, 44.0, "c")]

    busy, rounds, top = gpu_moe.interleaved_gpu_us({"one": Profiled()}, calls=2, rounds=3)["one"]
    assert rounds == [10.0, 10.0, 25.0] and busy == 10.0
    assert top[0] == ("a", 12.5) and ("b", 3.5) in top and ("c", 1.5) in top


def test_variants_take_their_profiled_rounds_in_turn():
    """Round r of every variant before round r + 1 of any: a clock drift during the point's
    measurement then reaches all variants alike. Each keeps its own rounds and kernels."""
    gpu_moe = _gpu_moe()
    order = []

    class Fake:
        def __init__(self, name, busy):
            self.name, self.busy = name, iter(busy)

        def gpu_round(self, calls):
            order.append(self.name)
            v = next(self.busy)
            return v, {self.name + "_kernel": v * calls}

    got = gpu_moe.interleaved_gpu_us({"ours": Fake("ours", [10.0, 12.0, 11.0]),
                                      "theirs": Fake("theirs", [20.0, 26.0, 22.0])}, calls=4, rounds=3)
    assert order == ["ours", "theirs"] * 3
    assert got["ours"][:2] == (11.0, [10.0, 12.0, 11.0])
    assert got["theirs"][:2] == (22.0, [20.0, 26.0, 22.0])
    assert got["ours"][2] == [("ours_kernel", 11.0)] and got["theirs"][2] == [("theirs_kernel", 22.7)]

    class Failing:
        def gpu_round(self, calls):
            raise RuntimeError("profiler stopped")

    order.clear()
    errors = {}
    got = gpu_moe.interleaved_gpu_us({"ours": Fake("ours", [10.0, 12.0, 11.0]), "bad": Failing()},
                                     calls=4, rounds=3, errors=errors)
    assert list(got) == ["ours"] and got["ours"][:2] == (11.0, [10.0, 12.0, 11.0])  # the others go on
    assert errors == {"bad": "RuntimeError: profiler stopped"}


def test_report_names_points_whose_rounds_differ():
    """A point whose profiled rounds differ by more than 10% is named under the table with its
    rounds; one within 10%, or without rounds (older results), is not."""
    gpu_moe = _gpu_moe()
    wide = dict(_record("MoEFFN", 5000.0, 4850.0), T=4096, gpu_us_rounds=[4285.3, 5000.0, 5981.0])
    narrow = dict(_record("com.microsoft.MoE", 5200.0), T=4096, gpu_us_rounds=[5100.0, 5200.0, 5300.0])
    old = _record("MoEFFN", 300.0)
    meta = {"gpu": "NVIDIA H200", "onnxruntime": "1.31.1", "hbm_bytes_per_s": 4.8e12,
            "tensor_flops": 989e12}
    text = gpu_moe.table([wide, narrow, old], meta)
    note = [line for line in text.splitlines() if line.startswith("Profiled GPU time differed")]
    assert note == ["Profiled GPU time differed by more than 10% between the rounds of these points "
                    "(µs per call, each round's value): Mixtral-8x7B bfloat16 T = 4096 MoEFFN: "
                    "4285.3, 5000.0, 5981.0."]
    assert gpu_moe.table([narrow, old], meta).count("Profiled GPU time differed") == 0


def test_targets_table():
    """The issue's targets from the default records: a point slower by GPU time only, decode
    fractions, the Qwen3 speedups, the FLOP-bound prefill fraction by GPU and wall time."""
    gpu_moe = _gpu_moe()

    def rec(shape, T, variant, gpu_us, wall_us, mem_us=0.0, flop_us=0.0):
        return {"shape": shape, "dtype": "bfloat16", "T": T, "variant": variant, "gpu_us": gpu_us,
                "wall_us": wall_us, "mem_us": mem_us, "flop_us": flop_us}

    q, m = "Qwen3-30B-A3B", "Mixtral-8x7B"
    records = [rec(q, 1, "MoEFFN", 35.0, 90.0, mem_us=14.0), rec(q, 1, "com.microsoft.MoE", 70.0, 200.0),
               rec(m, 1, "MoEFFN", 180.0, 180.0, mem_us=144.0), rec(m, 1, "com.microsoft.MoE", 200.0, 210.0),
               rec(q, 4096, "MoEFFN", 800.0, 800.0, mem_us=250.0, flop_us=300.0),
               rec(q, 4096, "com.microsoft.MoE", 1000.0, 1000.0),
               rec(m, 4096, "MoEFFN", 5000.0, 4000.0, mem_us=600.0, flop_us=2900.0),
               rec(m, 4096, "com.microsoft.MoE", 4900.0, 4400.0),
               rec(m, 32, "MoEFFN[bn128]", 1.0, 1.0)]
    table = "\n".join(gpu_moe.targets(records))
    assert ("| never slower than com.microsoft.MoE (GPU time) | not met | "
            "Mixtral T=4096 0.98x (5000.0 µs; com.microsoft.MoE 4900.0) |") in table
    assert "| never slower than com.microsoft.MoE (wall time) | met | 4 points |" in table
    assert "| not met | Qwen3 T=1 40%, Mixtral T=1 80% |" in table
    assert "| T = 1 on Qwen3-30B-A3B >= 3x faster | not met | 2.00x (2.22x) |" in table
    assert "| T = 4096 on Qwen3-30B-A3B >= 1.5x faster | not met | 1.25x (1.25x) |" in table
    assert "| not met | Qwen3 38% (38%), Mixtral 58% (72%) |" in table
    assert gpu_moe.targets(records[-1:]) == []
    decode_only = "\n".join(gpu_moe.targets(records[:4]))  # no T = 4096 point ran
    assert "dense peak" not in decode_only and "| decode (T = 1, 32)" in decode_only



def test_the_table_says_what_of_the_library_the_gpu_ran():
    """The report names the library's architectures and the sm_90a code the GPU ran, or says it
    ran none (a build without sm_90a on a Hopper GPU would otherwise read as our Hopper figures);
    results from before the library reported it say nothing."""
    gpu_moe = _gpu_moe()
    meta = {"gpu": "NVIDIA H200", "onnxruntime": "1.31.1", "hbm_bytes_per_s": 4.8e12,
            "tensor_flops": 989e12}
    records = [_record("MoEFFN", 300.0)]
    hopper = dict(meta, moefuse_cuda={"archs": ["80", "90a"], "device": {
        "wgmma": True, "fused_decode": True, "pdl": True}})
    assert ("MoEFFN's library: CUDA code for 80, 90a; this GPU runs the grouped GEMM's sm_90a code, "
            "the one-kernel decode's sm_90a code and programmatic dependent launch."
            ) in gpu_moe.table(records, hopper)
    ptx = dict(meta, moefuse_cuda={"archs": ["80"], "device": {
        "wgmma": False, "fused_decode": False, "pdl": False}})
    assert ("MoEFFN's library: CUDA code for 80; this GPU runs none of its sm_90a code (the mma "
            "grouped GEMM, skinny and SIMT paths).") in gpu_moe.table(records, ptx)
    assert "MoEFFN's library" not in gpu_moe.table(records, meta)
    turing = dict(meta, moefuse_cuda={"archs": ["80", "90a"], "device": {
        "capability": "7.5", "runs": False, "wgmma": False, "fused_decode": False, "pdl": False}})
    assert ("MoEFFN's library: CUDA code for 80, 90a; this GPU (compute capability 7.5) runs none "
            "of it: its kernels need compute capability 8.0 or newer.") in gpu_moe.table(records, turing)
    no_gpu = dict(meta, moefuse_cuda={"archs": ["80", "90a"], "device": None})
    assert "MoEFFN's library" not in gpu_moe.table(records, no_gpu)


def test_rounds_below_one_are_refused_before_the_gpu():
    done = subprocess.run([sys.executable, SCRIPT, "--rounds", "0"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--rounds must be at least 1 (got 0)" in done.stderr
    done = subprocess.run([sys.executable, SCRIPT, "--copies", "0"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--copies must be at least 1 (got 0)" in done.stderr


def test_copies_take_the_calls_in_turn():
    """--copies: each call goes to the next session (its own weights), every session bound alike;
    the report says how the variants ran."""
    gpu_moe = _gpu_moe()
    calls = []

    class Session:
        ort = torch = stream = dtype = None

        def __init__(self, name):
            self.name, self.bound = name, None

        def bind(self, x, logits, y):
            self.bound = (x, logits, y)

        def call(self):
            calls.append(self.name)

    sessions = [Session("a"), Session("b"), Session("c")]
    cycle = gpu_moe.Copies(sessions)
    cycle.bind("x", "l", "y")
    for _ in range(5):
        cycle.call()
    assert calls == ["a", "b", "c", "a", "b"]
    assert all(s.bound == ("x", "l", "y") for s in sessions)
    meta = {"gpu": "NVIDIA H100", "onnxruntime": "1.31.1", "hbm_bytes_per_s": 3.35e12,
            "tensor_flops": 989e12}
    records = [_record("MoEFFN", 30.0)]
    assert "ran as 4 sessions" in gpu_moe.table(records, dict(meta, copies=4))
    assert "sessions" not in gpu_moe.table(records, dict(meta, copies=1))
