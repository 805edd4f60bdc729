"""benchmarks/cpu_memory.py on a small layer: onnxruntime maps the external data file, and the
kernel's packed copy of bfloat16 weights takes half the anonymous memory of float32 packing."""

import importlib.util
import os
from pathlib import Path

import pytest

from moefuse.runtime import cpu_kernels, library_path

try:
    library_path()
except FileNotFoundError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"moefuse custom-op library not built: {exc}", allow_module_level=True)


def _cpu_memory():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_memory.py"
    spec = importlib.util.spec_from_file_location("cpu_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc")
def test_packed_copy_and_mapped_data(monkeypatch):
    monkeypatch.delenv("MOEFUSE_CPU_WEIGHTS", raising=False)
    if not cpu_kernels()["half_weights"]:
        pytest.skip("this CPU's kernels pack float32 only (blas)")
    out = _cpu_memory().main(["--experts", "16", "--hidden", "1024", "--inter", "512"])
    assert out["weights_mib"] == 48
    half, full = out["packings"]["16-bit where the values allow"], out["packings"]["float32"]
    # 48 MiB of bfloat16 weights: about 48 MiB packed as stored, 96 MiB as float32
    assert full["anonymous_mib"] - half["anonymous_mib"] > 0.7 * 48, out
    assert half["mapped_data_mib"] > 0.7 * 48 and full["mapped_data_mib"] > 0.7 * 48, out
