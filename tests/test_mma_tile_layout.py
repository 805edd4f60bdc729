"""The tile layout of the mma grouped GEMM (custom_ops/cuda/mma_tile.h), checked on the CPU.

The GPUs that do not run the Hopper kernels (Ampere, Ada, newer GPUs through the PTX) take their
prefill through mma_grouped.cu, whose correctness rests on index arithmetic: which thread copies
which chunk where in the swizzled shared-memory ring, which rows each lane hands to ldmatrix, which
tile element each mma.sync accumulator is, and how gated tiles pair gate and up rows. The check
program (tests/cuda/mma_tile_check.cc) includes the kernel's own layout header, replays the
copies, ldmatrix reads and MMAs of whole tiles with PTX's definitions of the instructions, and
compares every accumulator with the product element the epilogue stores it as. It also checks that
no ldmatrix phase or round of copies has a bank conflict. The GPU tests (test_kernel_cuda.py) check
the kernels themselves against the reference.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mma_tile_layout(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "mma_tile_check"
    subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Werror", "-I", str(ROOT / "custom_ops"),
                    str(ROOT / "tests" / "cuda" / "mma_tile_check.cc"), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
