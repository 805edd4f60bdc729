"""MOEFUSE_TEST_SHARD (tests/conftest.py) splits a run into parts that together run each test once."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = "tests/test_spec_validation.py"  # many tests, collected fast


def collect(shard=None):
    env = dict(os.environ)
    env.pop("MOEFUSE_TEST_SHARD", None)
    if shard is not None:
        env["MOEFUSE_TEST_SHARD"] = shard
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           TARGET], cwd=ROOT, env=env, capture_output=True, text=True)
    return done, [line for line in done.stdout.splitlines() if "::" in line]


def test_parts_cover_the_run_once():
    _, whole = collect()
    assert len(whole) > 10
    parts = [collect(f"{i}/3")[1] for i in (1, 2, 3)]
    assert sorted(t for part in parts for t in part) == sorted(whole)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts[0] == whole[0::3]  # every third, in collection order


def test_bad_value_is_refused_by_name():
    for value in ("3/2", "0/2", "half", "1/"):
        done, _ = collect(value)
        assert done.returncode == 4  # pytest's usage error: nothing runs
        assert f"MOEFUSE_TEST_SHARD='{value}': expected i/n" in done.stderr + done.stdout
