"""benchmarks/gpu_trace.py's reading of the one-token kernels' stamps (no GPU needed): its slot
numbers are trace.cuh's, and its segments are the differences of the stamps it is given."""

import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_trace  # noqa: E402


def test_slots_are_the_headers():
    text = open(os.path.join(ROOT, "custom_ops", "cuda", "trace.cuh")).read()
    enum = dict((name, int(value)) for name, value in re.findall(r"^\s*(k\w+) = (\d+),?", text, re.M))
    assert enum.pop("kSlots") == gpu_trace.NUM_SLOTS
    assert enum == gpu_trace.SLOTS
    assert int(re.search(r"kKernels = (\d+);", text).group(1)) == gpu_trace.NUM_KERNELS
    assert int(re.search(r"kBlocks = (\d+);", text).group(1)) == gpu_trace.NUM_BLOCKS


def test_segments_from_stamps():
    """Two blocks of projection 1 that start together and one that starts 5 µs later, one of
    projection 2; the clock at 2 cycles a ns. Each segment's median is what the stamps say."""
    s = gpu_trace.SLOTS
    buf = np.zeros((gpu_trace.NUM_KERNELS, gpu_trace.NUM_BLOCKS, gpu_trace.NUM_SLOTS), dtype=np.uint64)
    # µs from the block's start at which each clock slot is stamped, in SEGMENTS' order
    marks = {"kStart": 0.0, "kWaited": 0.1, "kRouting": 0.4, "kToken": 1.4, "kKeys": 1.6, "kRanked": 2.8,
             "kRouted": 2.9, "kMultiplied": 10.9, "kEnd": 11.9}

    def block(kernel, index, start_us, stretch=1.0):
        row = buf[kernel, index]
        row[s["kSm"]] = index
        row[s["kStartNs"]] = int(1_000_000 + start_us * 1000)
        row[s["kEndNs"]] = int(1_000_000 + (start_us + marks["kEnd"] * stretch) * 1000)
        for name, at in marks.items():
            row[s[name]] = int(50_000 + 2000 * at * stretch)  # 2 cycles a ns

    block(0, 0, 0.0)
    block(0, 1, 0.0)
    block(0, 2, 5.0)
    block(1, 0, 12.0, stretch=2.0)
    out = gpu_trace.summarize(buf, horizon_us=30)
    assert out["clock_ghz"] == 2.0
    p1 = out["kernels"]["projection 1"]
    assert p1["waves"]["first"]["blocks"] == 2 and p1["waves"]["later"]["blocks"] == 1
    assert p1["waves"]["later"]["start_us"] == [5.0, 5.0]
    want = {"griddepcontrol": 0.1, "until routing": 0.3, "softmax statistics": 1.0, "keys": 0.2,
            "ranking": 1.2, "after ranking": 0.1, "weights": 8.0, "tail": 1.0}
    assert p1["waves"]["first"]["segments_us"] == want
    p2 = out["kernels"]["projection 2"]["waves"]["first"]
    assert p2["segments_us"] == {k: round(2 * v, 2) for k, v in want.items()}
    assert p2["start_us"] == [12.0, 12.0] and p2["end_us"] == [35.8, 35.8]
    assert p1["starts_per_us"][0] == 2 and p1["starts_per_us"][5] == 1
    # past routing (2.9 µs in) and not ended (11.9 µs): the first two from 2.9 to 11.9, the third
    # from 7.9 to 16.9
    assert p1["loading_at_us"][:18] == [0, 0, 0, 2, 2, 2, 2, 2, 3, 3, 3, 3, 1, 1, 1, 1, 1, 0]
    assert "projection 1, first (2 blocks" in gpu_trace.report("single", out)
