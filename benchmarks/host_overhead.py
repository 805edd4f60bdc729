"""Host time per call of MoEFFN on the CUDA EP, beside a one-Add graph and com.microsoft.MoE.

For one benchmark shape (gpu_moe.SHAPES, by name prefix; Qwen3 by default) and T (1 by default),
bfloat16: 200 back-to-back ``run_with_iobinding`` calls timed on the host without synchronizing
(median of 5 rounds, µs per call), the wall time per call measured on the GPU stream
(gpu_moe.Runner.wall_us), and, from a second session with onnxruntime's profiler on, the medians of
its model runs and of the node's Compute. Needs what gpu_moe.py needs.

    python benchmarks/host_overhead.py [SHAPE] [T]
"""

import json
import os
import statistics
import sys
import tempfile
import time

import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_moe as g  # noqa: E402
from moefuse.runtime import session_options  # noqa: E402

if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
name = sys.argv[1] if len(sys.argv) > 1 else "Qwen"
T = int(sys.argv[2]) if len(sys.argv) > 2 else 1
dtype = "bfloat16"
_, H, I, E, k = [s for s in g.SHAPES if s[0].startswith(name)][0]
wdir = tempfile.mkdtemp()
off = g.write_weights(torch, wdir + "/weights.bin", H, I, E, dtype, 1)
ours, ms = g.models(dtype, H, I, E, k, wdir, off)
et = TensorProto.BFLOAT16
add = helper.make_model(helper.make_graph(
    [helper.make_node("Add", ["X", "X"], ["Y"])], "add",
    [helper.make_tensor_value_info("X", et, ["T", H]), helper.make_tensor_value_info("router_logits", et, ["T", E])],
    [helper.make_tensor_value_info("Y", et, ["T", H])]), opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
addp = wdir + "/add.onnx"
onnx.save(add, addp)
stream = torch.cuda.Stream()
tdt = torch.bfloat16
x = torch.randn(T, H, device="cuda").to(tdt)
lg = (torch.randn(T, E, device="cuda") * 2).to(tdt)
y = torch.empty(T, H, device="cuda", dtype=tdt)


def host_us(path, env=None, prof=False):
    env = env or {}
    old = {kk: os.environ.get(kk) for kk in env}
    os.environ.update(env)
    so = session_options(log_severity_level=3)
    if prof:
        so.enable_profiling = True
        so.profile_file_prefix = wdir + "/prof"
    r = g.Runner(ort, torch, path, so, stream, dtype)
    for kk, v in old.items():
        if v is None:
            os.environ.pop(kk, None)
        else:
            os.environ[kk] = v
    r.bind(x, lg, y)
    for _ in range(50):
        r.call()
    torch.cuda.synchronize()
    res = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(200):
            r.call()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        res.append((t1 - t0) / 200 * 1e6)
    out = {"host_us": round(statistics.median(res), 1), "wall_us": round(r.wall_us(), 1)}
    if prof:
        f = r.sess.end_profiling()
        ev = json.load(open(f))
        node = [e["dur"] for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        runs = [e["dur"] for e in ev if e.get("cat") == "Session" and e["name"] == "model_run"]
        out["node_us"] = statistics.median(node) if node else None
        out["model_run_us"] = statistics.median(runs) if runs else None
    return out


print("add      ", host_us(addp), host_us(addp, prof=True))
print("moeffn   ", host_us(ours), host_us(ours, prof=True))
print("nopdl    ", host_us(ours, {"MOEFUSE_CUDA_PDL": "0"}))
print("ms_moe   ", host_us(ms))
