"""One call of MoEFFN (or com.microsoft.MoE) on the CUDA EP in an NVTX range, for Nsight Compute.

The benchmark's wall and profiled times move with the GPU's clocks, which an H200 at its power
limit changes from run to run (docs/performance.md). Nsight Compute runs each kernel at locked
clocks, so its per-kernel durations compare two builds, or our kernels and com.microsoft.MoE's,
within about 1% across machines and days. This script builds one benchmark layer (gpu_moe.SHAPES,
by name prefix), makes WARMUP calls (sessions, autotuning), then one call inside the NVTX range
"last", which Nsight Compute can select:

    ncu --nvtx --nvtx-include "last/" --kernel-name regex:Wg \\
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \\
        python benchmarks/gpu_one_call.py Qwen 4096 bfloat16 2 [ours|ms] [--save y.npy]

com.microsoft.MoE's GEMMs are matched by `--kernel-name regex:"^(device_kernel|Kernel)$"`.
`benchmarks/ncu_kernels.py` puts the printed metrics of several such runs side by side. Needs
what gpu_moe.py needs (onnxruntime-gpu, torch with CUDA; MOEFUSE_LIBRARY picks the build).
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_moe as g  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """The layer and the call, checked before anything touches the GPU."""
    names = [s[0] for s in g.SHAPES]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", help="a prefix of one of " + ", ".join(names))
    ap.add_argument("tokens", type=int, help="T, the tokens of the call")
    ap.add_argument("dtype", choices=["float16", "bfloat16"])
    ap.add_argument("warmup", type=int, help="calls before the one in the NVTX range")
    ap.add_argument("op", nargs="?", default="ours", choices=["ours", "ms"],
                    help="MoEFFN (ours) or com.microsoft.MoE (ms)")
    ap.add_argument("--save", default="", metavar="NPY",
                    help="write the last call's output there, its 16-bit values as stored (uint16), "
                         "to compare two builds bit for bit")
    args = ap.parse_args(argv)
    matches = [s for s in g.SHAPES if s[0].startswith(args.shape)]
    if len(matches) != 1:
        ap.error(f"shape {args.shape!r} names {len(matches)} of the layers {', '.join(names)}; "
                 "give a prefix of exactly one")
    if args.tokens < 1 or args.warmup < 0:
        ap.error(f"tokens must be >= 1 and warmup >= 0 (got {args.tokens} and {args.warmup})")
    args.layer = matches[0]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort
    import torch

    from moefuse.runtime import session_options

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    _, H, I, E, k = args.layer
    T, dtype = args.tokens, args.dtype
    # the weights file (2.8 GB for Mixtral) goes when the call is done, as in gpu_moe.py
    with tempfile.TemporaryDirectory() as wdir:
        off = g.write_weights(torch, wdir + "/weights.bin", H, I, E, dtype, 1)
        ours, ms = g.models(dtype, H, I, E, k, wdir, off)
        stream = torch.cuda.Stream()
        runner = g.Runner(ort, torch, ours if args.op == "ours" else ms,
                          session_options(log_severity_level=3), stream, dtype)
        tdt = torch.float16 if dtype == "float16" else torch.bfloat16
        gen = torch.Generator(device="cuda").manual_seed(2)
        x = torch.randn(T, H, generator=gen, device="cuda").to(tdt)
        logits = (torch.randn(T, E, generator=gen, device="cuda") * 2).to(tdt)
        y = torch.empty(T, H, device="cuda", dtype=tdt)
        runner.bind(x, logits, y)
        for _ in range(args.warmup):
            runner.call()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("last")
        runner.call()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print("done", float(y.float().abs().mean()))
        if args.save:
            import numpy as np

            np.save(args.save, y.view(torch.int16).cpu().numpy().view(np.uint16))
    return 0


if __name__ == "__main__":
    sys.exit(main())
