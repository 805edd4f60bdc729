"""benchmarks/ncu_kernels.py: per-kernel Nsight Compute metrics side by side, read from the text
outputs kept in benchmarks/results (no GPU needed)."""

import os
import subprocess
import sys

import pytest

from benchmark_scripts import BENCHMARKS, load, script

SCRIPT = script("ncu_kernels")
RESULTS = os.path.join(BENCHMARKS, "results", "h200-2026-12-04-kernels")
SECTIONS = os.path.join(BENCHMARKS, "results", "h200-2026-12-04-tile-decode")


def _module():
    return load("ncu_kernels")


def _read(name, folder=RESULTS):
    with open(os.path.join(folder, name)) as f:
        return f.read()


def test_parses_our_launches_in_order_with_units():
    nk = _module()
    launches = nk.parse(_read("ncu_t4096_gptoss_ours.txt"))
    assert [x["kernel"] for x in launches] == ["WgKernel<__nv_bfloat16, 256, 0>"] * 2
    assert [x[nk.DURATION] for x in launches] == pytest.approx([1020.0, 567.62])  # 1.02 ms, 567.62 us
    assert [x["dram__bytes_read.sum"] for x in launches] == pytest.approx([1270.0, 670.21])  # MB
    assert launches[0]["launch__registers_per_thread"] == 168
    assert launches[0]["sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"] is None  # n/a


def test_cutlass_names_keep_their_gemm_config_only():
    nk = _module()
    launches = nk.parse(_read("ncu_t4096_gptoss_ms.txt"))
    assert [x["kernel"] for x in launches] == ["device_kernel (256x128x64, 4 stages)",
                                               "device_kernel (128x128x64, 6 stages, 2x1x1 cluster)"]
    assert [x["launch__cluster_dim_x"] for x in launches] == [0, 2]
    assert [x[nk.DURATION] for x in launches] == pytest.approx([1080.0, 614.59])


def test_section_tables_names_of_words_and_their_duration():
    """`ncu --section ...`: rows named in words, cut at the unit column; "Duration" is the time."""
    nk = _module()
    ours = nk.parse(_read("ncu_sections_Qwen_32_previous.txt", SECTIONS))
    ms = nk.parse(_read("ncu_sections_Qwen_32_ms.txt", SECTIONS))
    assert [x["kernel"] for x in ours] == ["WgNarrowKernel<__nv_bfloat16, 32>"] * 2
    assert [x["kernel"] for x in ms] == ["device_kernel (256x128x64, 4 stages, 2x1x1 cluster)",
                                         "device_kernel (256x128x64, 4 stages)"]
    assert [x[nk.DURATION] for x in ours] == pytest.approx([198.98, 127.20])
    assert [x["DRAM Throughput"] for x in ms] == pytest.approx([69.11, 62.30])
    assert ours[0]["Elapsed Cycles"] == 269507  # thousands separators
    assert ours[0]["Dynamic Shared Memory Per Block"] == pytest.approx(0.22258)  # Kbyte/block in MB
    assert ours[0]["Memory Throughput"] == pytest.approx(3.56e6)  # Tbyte/s in MB/s (the SOL row
    # of the same name, 74.04 %, comes first and is overwritten by the later table's)


def test_gemm_configs_of_hopper_and_ampere_kernels():
    """com.microsoft.MoE picks its GEMMs per process: two profiles of Qwen3 T = 32 (a third is in
    the section test), one with an Ampere kernel (its stage count follows the MMA policy)."""
    nk = _module()
    picks = [[x["kernel"] for x in nk.parse(_read(name, folder))] for name, folder in
             [("ncu_t32_qwen_ms.txt", RESULTS), ("ncu_one_call_Qwen_32_ms.txt", SECTIONS)]]
    assert picks == [["device_kernel (128x16x64, 12 stages)", "device_kernel (128x32x64, 10 stages, 2x1x1 cluster)"],
                     ["Kernel (SM80 64x128x64, 4 stages)", "device_kernel (128x64x64, 8 stages)"]]
    assert nk.gemm_config("Kernel<MoeFCGemm<threadblock::MmaMultistage<GemmShape<64, 128, 64>, A>>") == "SM80 64x128x64"
    assert nk.gemm_config("WgKernel<__nv_bfloat16, 256, 0>") is None


@pytest.mark.parametrize("unit,text,want", [("nsecond", "1,020,485", 1020.485), ("second", "0.5", 5e5),
                                            ("Kbyte/block", "197.50", 0.1975), ("%", "59.96", 59.96)])
def test_units(unit, text, want):
    assert _module()._value(unit, text) == pytest.approx(want)


def test_table_gives_each_run_against_the_first():
    nk = _module()
    runs = [("ours", nk.parse(_read("ncu_t32_qwen_ours.txt"))), ("ms", nk.parse(_read("ncu_t32_qwen_ms.txt")))]
    lines = nk.table(runs, ["dram__throughput.avg.pct_of_peak_sustained_elapsed"]).splitlines()
    assert lines[0].split(" | ")[-1] == "ms vs ours |"
    assert len(lines) == 2 + 2  # header, rule, two launches
    row = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row[:3] == ["2", "WgNarrowKernel<__nv_bfloat16, 32> / device_kernel (128x32x64, 10 stages, 2x1x1 cluster)",
                       "127.4"]
    assert row[3:6] == ["58.11", "92.83", "79.73"]  # 4 significant digits
    assert row[-1] == f"{127.39 / 92.83:.2f}x"  # the first run's time over the second's


def test_cli_table_and_refusals(tmp_path):
    ok = subprocess.run([sys.executable, SCRIPT, "a=" + os.path.join(RESULTS, "ncu_skip_loop_GPT_4096_committed.txt"),
                         "b=" + os.path.join(RESULTS, "ncu_skip_loop_GPT_4096_build.txt")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "| 2 | WgKernel<__nv_bfloat16, 256, 0> | 561.8 | 564.2 | 1.00x |" in ok.stdout
    empty = tmp_path / "empty.txt"
    empty.write_text("==PROF== Disconnected\n")
    bad = subprocess.run([sys.executable, SCRIPT, f"a={empty}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no kernel launches" in bad.stderr and str(empty) in bad.stderr
    nolabel = subprocess.run([sys.executable, SCRIPT, str(empty)], capture_output=True, text=True)
    assert nolabel.returncode == 2 and "expected LABEL=FILE" in nolabel.stderr
