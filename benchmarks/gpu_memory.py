"""GPU memory of a CUDA session of one MoEFFN layer, by how its weights are stored.

Weights stored in_out (GPT-OSS and Llama-4 exports hold theirs [E, in, out]) are constants that
the CUDA kernel transposes once, into a device copy of its own beside onnxruntime's; out_in
weights are read where onnxruntime put them. `moefuse convert --weight-layout out_in` stores an
export's in_out weights transposed. This script saves the same layer both ways (external data)
and measures, each in a fresh process, how much the GPU's free memory falls (cudaMemGetInfo)
once the session is made and once it has run a call. onnxruntime's arena grows as requested
(arena_extend_strategy kSameAsRequested), so the figures are what the session asked for.

    python benchmarks/gpu_memory.py                    # the GPT-OSS-20B layer, bfloat16
    python benchmarks/gpu_memory.py --experts 8 --hidden 1024 --inter 1024

Needs onnxruntime-gpu and a CUDA build of the library (MOEFUSE_LIBRARY picks one).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = ("out_in", "in_out")


def free_mib(cudart) -> float:
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        raise RuntimeError("cudaMemGetInfo failed")
    return free.value / 2**20


def cuda_runtime():
    """The CUDA runtime that onnxruntime's CUDA libraries use (loaded by preload_dlls)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("no CUDA runtime library found")


def measure(path: str, tokens: int) -> dict:
    """In this process: the session's and its first call's fall of the GPU's free memory."""
    import numpy as np
    import onnxruntime as ort

    from moefuse.runtime import run, session_options

    cudart = cuda_runtime()
    cudart.cudaFree(None)  # the context first, so that it is not counted
    f0 = free_mib(cudart)
    cuda = ("CUDAExecutionProvider", {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"})
    sess = ort.InferenceSession(path, session_options(log_severity_level=3),
                                providers=[cuda, "CPUExecutionProvider"])
    if "CUDAExecutionProvider" not in sess.get_providers():
        raise RuntimeError("the session has no CUDA execution provider")
    f1 = free_mib(cudart)
    import ml_dtypes

    dtype = np.float16 if os.path.basename(path).startswith("float16") else ml_dtypes.bfloat16
    feeds = {n: a.view(dtype) for n, a in np.load(path + ".feeds.npz").items()}  # stored as uint16
    run(sess, feeds, {"Y": feeds["X"].shape})
    f2 = free_mib(cudart)
    return {"session_mib": round(f0 - f1, 1), "after_call_mib": round(f0 - f2, 1)}


def write_models(tmp: str, args) -> tuple[dict, float]:
    """The layer with each weight layout (the same matrices, transposed) and its feeds."""
    import ml_dtypes
    import numpy as np
    import onnx

    from moefuse import MoEFFNAttrs, make_moeffn_model
    from moefuse.synthetic import random_inputs

    dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[args.dtype]
    paths = {}
    weights = 0.0
    base = None
    for layout in LAYOUTS:
        attrs = MoEFFNAttrs(k=args.k, weight_layout=layout)
        if base is None:  # out_in first
            base = random_inputs(attrs, args.tokens, args.hidden, args.inter, args.experts,
                                 dtype=dtype, seed=0)
            inputs = base
            weights = sum(base[n].nbytes for n in ("w1", "w2")) / 2**20
        else:
            inputs = dict(base, w1=np.ascontiguousarray(base["w1"].transpose(0, 2, 1)),
                          w2=np.ascontiguousarray(base["w2"].transpose(0, 2, 1)))
        path = os.path.join(tmp, f"{args.dtype}_{layout}.onnx")
        onnx.save_model(make_moeffn_model(attrs, inputs), path, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=os.path.basename(path) + ".data",
                        size_threshold=1024)
        np.savez(path + ".feeds.npz", X=inputs["X"].view(np.uint16),
                 router_logits=inputs["router_logits"].view(np.uint16))
        paths[layout] = path
    return paths, weights


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--inter", type=int, default=2880)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1, help="T of the measured call")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this model here
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokens)))
        return None
    with tempfile.TemporaryDirectory(prefix="moefuse_gpumem_") as tmp:
        paths, weights = write_models(tmp, args)
        print(f"{args.dtype} weights: {weights:.0f} MiB (E = {args.experts}, D = {args.hidden}, "
              f"I = {args.inter}), call of T = {args.tokens}")
        results = {}
        for layout, path in paths.items():
            out = subprocess.run([sys.executable, __file__, "--measure", path, "--tokens", str(args.tokens)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"measuring {layout} failed:\n{out.stderr[-2000:]}")
            r = results[layout] = json.loads(out.stdout.splitlines()[-1])
            print(f"  weights {layout}: session +{r['session_mib']:.0f} MiB of GPU memory "
                  f"({r['session_mib'] / weights:.2f}x the weights), after a call "
                  f"+{r['after_call_mib']:.0f} MiB")
    return {"weights_mib": weights, "layouts": results}


if __name__ == "__main__":
    main()
