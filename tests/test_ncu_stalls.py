"""benchmarks/ncu_stalls.py: Nsight Compute's per-instruction warp-state samples, read from the
source-page CSVs kept in benchmarks/results (no GPU needed)."""

import os
import subprocess
import sys

import pytest

from benchmark_scripts import BENCHMARKS, load, script

SCRIPT = script("ncu_stalls")
RESULTS = os.path.join(BENCHMARKS, "results", "h200-2026-12-04-lookahead")
NARROW = os.path.join(RESULTS, "stalls_qwen_t32_proj2_main.csv.xz")


@pytest.fixture(scope="module")
def ns():
    return load("ncu_stalls")


@pytest.fixture(scope="module")
def narrow(ns):
    return ns.read(NARROW)


def test_reads_the_kernel_and_every_instruction(narrow):
    assert "WgNarrowKernel<__nv_bfloat16, (int)32>" in narrow.kernel
    assert len(narrow.instructions) == 10888
    assert narrow.total == 9084
    assert narrow.instructions[0].source == "LDC R1, c[0x0][0x28]"


def test_the_reasons_account_for_every_sample(ns, narrow):
    """ncu charges each sample to one reason; those without a column in the CSV are "other"."""
    for ins in narrow.instructions:
        assert sum(ins.reasons.values()) == pytest.approx(ins.samples)
    wgmma = narrow.instructions[210]
    assert wgmma.source.startswith("HGMMA.64x32x16") and wgmma.samples == 86
    assert wgmma.reasons == {"not_selected": 1, "selected": 5, ns.OTHER: 80}
    shares = ns.reason_shares(narrow)
    assert sum(shares.values()) == pytest.approx(100.0)
    assert list(shares)[:3] == ["long_sb", "wait", "selected"]
    assert shares["long_sb"] == pytest.approx(41.0, abs=0.05)


def test_the_top_instruction_is_the_consumers_wait_for_a_full_stage(ns, narrow):
    first = ns.top(narrow, 1)[0]
    assert (first.index, first.source.split()[-2]) == (185, "BRA")
    assert first.executed == 172032  # 1792 tiles x 12 k-blocks x 8 consumer warps
    assert max(first.reasons, key=first.reasons.get) == "long_sb"
    assert 100 * first.samples / narrow.total == pytest.approx(28.4, abs=0.05)


def test_regions_split_at_unsampled_runs(ns, narrow):
    spans = ns.regions(narrow, gap=30)
    assert sum(share for _, _, share, _ in spans) == pytest.approx(100.0)
    main_loop = [s for s in spans if s[0] == 132]
    assert main_loop and main_loop[0][1] == 234 and main_loop[0][2] == pytest.approx(51.6, abs=0.05)
    # a larger gap joins regions, never splits them
    assert len(ns.regions(narrow, gap=1000)) < len(spans)


def test_executed_counts_give_a_loops_instructions_per_trip(ns):
    """The producer's k-block loop of projection 2 at Qwen3 T = 32 (1792 tiles x 12 k-blocks x 4
    warps = 86016 trips): main ran 76 instructions a warp per k-block, the first lookahead build
    137 (docs/performance.md, 2026-12-04 late)."""
    per_trip = {}
    for build in ("main", "look1"):
        listing = ns.read(os.path.join(RESULTS, f"stalls_qwen_t32_proj2_{build}.csv.xz"))
        # the producer's code: the regions from its k-block loop on, past the consumers' epilogue
        # (the consumers' barrier-retry stubs after it drew no samples, so no region holds them)
        producer = [s for s in ns.regions(listing, gap=30) if s[0] >= 10209]
        per_trip[build] = sum(s[3] for s in producer) / 86016
    assert per_trip["main"] == pytest.approx(76, abs=2)
    assert per_trip["look1"] == pytest.approx(137, abs=3)


def test_cli_prints_markdown_and_refuses_other_csvs(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, NARROW, "--top", "3"], capture_output=True,
                         text=True, check=True).stdout
    assert "| long_sb | 41.0% |" in out
    assert "| 185 | 28.4% | 172032 |" in out
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    bad = subprocess.run([sys.executable, SCRIPT, str(other)], capture_output=True, text=True)
    assert bad.returncode == 1 and "ncu --page source --csv" in bad.stderr
