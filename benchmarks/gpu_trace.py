"""Where a one-token MoEFFN call's time goes, block by block, on the CUDA EP.

Needs the library built with the CMake option MOEFUSE_CUDA_TRACE (``make gpu-trace``): the
one-token kernels then stamp each block (custom_ops/cuda/trace.cuh) and keep the stamps of the
last call. This runs one of gpu_moe.py's layer shapes at T = 1 with random weights, warms it up,
then takes calls waited for one by one (``single``) and the last of back-to-back runs (``b2b``),
and prints for each kernel and wave of blocks (``first``: the blocks that started within 1 µs of
the first; ``later``: the others) the median of each segment of a block's time, in µs at the
clock the block ran at, then histograms per µs of block starts and ends and how many blocks were
past their routing and not yet done.

The stamps of a trace build time a trace build: compare the segments of one build with another's,
not with an untraced build's call time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# trace.cuh's slots (tests/test_gpu_trace.py checks them against the header)
SLOTS = {"kSm": 0, "kStartNs": 1, "kStart": 2, "kToken": 3, "kKeys": 4, "kRanked": 5, "kWaited": 6,
         "kRouting": 7, "kRouted": 8, "kMultiplied": 9, "kEnd": 10, "kEndNs": 11}
NUM_SLOTS, NUM_KERNELS, NUM_BLOCKS = 12, 2, 1024
KERNELS = ("projection 1", "projection 2")
# A block's time from its first instruction to its end, in order.
SEGMENTS = [
    ("griddepcontrol", "kStart", "kWaited"),
    ("until routing", "kWaited", "kRouting"),
    ("softmax statistics", "kRouting", "kToken"),
    ("keys", "kToken", "kKeys"),
    ("ranking", "kKeys", "kRanked"),
    ("after ranking", "kRanked", "kRouted"),
    ("weights", "kRouted", "kMultiplied"),
    ("tail", "kMultiplied", "kEnd"),
]


def summarize(stamps: np.ndarray, horizon_us: int = 40) -> dict:
    """One call's stamps [kernel, block, slot] -> per kernel: waves with their segments' medians
    (µs), and histograms per µs from projection 1's first block's start."""
    s = SLOTS
    kernels = [stamps[k][stamps[k][:, s["kStartNs"]] > 0].astype(np.float64) for k in range(NUM_KERNELS)]
    both = np.concatenate(kernels)
    # cycles per ns, from each block's two clocks over its whole time
    span_ns = np.maximum(both[:, s["kEndNs"]] - both[:, s["kStartNs"]], 1)
    clock = float(np.median((both[:, s["kEnd"]] - both[:, s["kStart"]]) / span_ns))
    t0 = kernels[0][:, s["kStartNs"]].min() if len(kernels[0]) else both[:, s["kStartNs"]].min()
    bins = np.arange(0, horizon_us + 1, 1.0)
    out = {"clock_ghz": round(clock, 3), "kernels": {}}
    for name, blocks in zip(KERNELS, kernels):
        if not len(blocks):
            continue
        start = (blocks[:, s["kStartNs"]] - t0) / 1e3
        end = (blocks[:, s["kEndNs"]] - t0) / 1e3
        first = start < start.min() + 1.0
        waves = {}
        for wave, sel in (("first", first), ("later", ~first)):
            if not sel.any():
                continue
            seg = {label: round(float(np.median(blocks[sel, s[b]] - blocks[sel, s[a]])) / clock / 1e3, 2)
                   for label, a, b in SEGMENTS}
            waves[wave] = {"blocks": int(sel.sum()),
                           "start_us": [round(float(start[sel].min()), 2), round(float(start[sel].max()), 2)],
                           "end_us": [round(float(end[sel].min()), 2), round(float(end[sel].max()), 2)],
                           "segments_us": seg}
        routed = start + (blocks[:, s["kRouted"]] - blocks[:, s["kStart"]]) / clock / 1e3
        out["kernels"][name] = {
            "waves": waves,
            "starts_per_us": np.histogram(start, bins=bins)[0].tolist(),
            "ends_per_us": np.histogram(end, bins=bins)[0].tolist(),
            "loading_at_us": [int(np.sum((routed <= t) & (end > t))) for t in bins[:-1]],
        }
    return out


def report(mode: str, summary: dict) -> str:
    lines = [f"{mode}: clock {summary['clock_ghz']} GHz"]
    for name, k in summary["kernels"].items():
        for wave, w in k["waves"].items():
            segs = ", ".join(f"{label} {v:.2f}" for label, v in w["segments_us"].items())
            lines.append(f"  {name}, {wave} ({w['blocks']} blocks, start {w['start_us'][0]}-{w['start_us'][1]}, "
                         f"end {w['end_us'][0]}-{w['end_us'][1]} µs): {segs}")
        lines.append(f"    starts per µs:  {' '.join(map(str, k['starts_per_us']))}")
        lines.append(f"    ends per µs:    {' '.join(map(str, k['ends_per_us']))}")
        lines.append(f"    loading at µs:  {' '.join(map(str, k['loading_at_us']))}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import gpu_moe

    names = [s[0] for s in gpu_moe.SHAPES]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default=names[0], choices=names)
    ap.add_argument("--dtype", default="bfloat16", choices=gpu_moe.DTYPES)
    ap.add_argument("--single", type=int, default=6, help="calls waited for one by one")
    ap.add_argument("--b2b", type=int, default=4, help="rounds of 20 back-to-back calls (the last one's stamps)")
    ap.add_argument("--out", default="", help="write the summaries as JSON here")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    from moefuse.runtime import load_library, session_options

    lib = load_library()
    if not hasattr(lib, "moefuse_trace_read"):
        ap.error("the library has no stamps: build it with -DMOEFUSE_CUDA_TRACE=ON (make gpu-trace) "
                 "and point MOEFUSE_LIBRARY at it")
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    _, H, I, E, k = next(s for s in gpu_moe.SHAPES if s[0] == args.shape)
    tdt = torch.float16 if args.dtype == "float16" else torch.bfloat16
    buf = np.zeros((NUM_KERNELS, NUM_BLOCKS, NUM_SLOTS), dtype=np.uint64)
    results = []
    with tempfile.TemporaryDirectory() as wdir:
        offsets = gpu_moe.write_weights(torch, os.path.join(wdir, "weights.bin"), H, I, E, args.dtype, 1)
        ours, _ = gpu_moe.models(args.dtype, H, I, E, k, wdir, offsets)
        stream = torch.cuda.Stream()
        runner = gpu_moe.Runner(ort, torch, ours, session_options(log_severity_level=3), stream, args.dtype)
        gen = torch.Generator(device="cuda").manual_seed(2)
        x = torch.randn(1, H, generator=gen, device="cuda").to(tdt)
        logits = (torch.randn(1, E, generator=gen, device="cuda") * 2).to(tdt)
        y = torch.empty(1, H, device="cuda", dtype=tdt)
        runner.bind(x, logits, y)
        for _ in range(30):
            runner.call()
        torch.cuda.synchronize()
        for mode in ["single"] * args.single + ["b2b"] * args.b2b:
            buf[:] = 0
            for _ in range(20 if mode == "b2b" else 1):
                runner.call()
            torch.cuda.synchronize()
            if lib.moefuse_trace_read(buf.ctypes.data) != 0:
                raise RuntimeError("moefuse_trace_read failed")
            summary = summarize(buf)
            if not summary["kernels"]:
                ap.error(f"no stamps: the call at {args.shape} T = 1 did not run the one-token kernels")
            print(report(mode, summary))
            results.append({"mode": mode, **summary})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": args.shape, "dtype": args.dtype, "gpu": torch.cuda.get_device_name(0),
                       "calls": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
