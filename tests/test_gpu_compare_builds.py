"""benchmarks/gpu_compare_builds.sh refuses a bad command line before it touches the GPU."""

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_compare_builds.sh"


def run(*args):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_usage_without_its_arguments():
    done = run("a.so")
    assert done.returncode == 2
    assert "gpu_compare_builds.sh BASE.so NEW.so OUTDIR" in done.stdout


def test_a_missing_library_is_named(tmp_path):
    base = tmp_path / "base.so"
    base.write_bytes(b"")
    done = run(base, tmp_path / "new.so", tmp_path / "out")
    assert done.returncode == 2
    assert f"no such library: {tmp_path / 'new.so'}" in done.stderr
    assert not (tmp_path / "out").exists()
