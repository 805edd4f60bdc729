"""MoEFFN (moefuse's CUDA kernels) vs onnxruntime's com.microsoft.MoE on the CUDA EP.

Both ops get the same weights (one external-data file read by both models: SwiGLU experts with
gate and up interleaved, stored [E, 2I, H] / [E, H, I], the layout com.microsoft.MoE takes) and
the same inputs, bound on the GPU. For each layer shape, dtype and token count T:

- ``gpu_us``: GPU time per call: the time the GPU is busy with the call's kernels (and device
  copies or memsets), the union of their intervals as the CUDA profiling interface reports them
  (torch.profiler / CUPTI) over 10 back-to-back calls, the median of three such rounds
  (``--rounds``; more steady the median where long calls' rounds spread), taken
  in turn with the other variants' rounds of the same point (``gpu_us_rounds``: each round's
  value; the report names points whose rounds differ by more
  than 10%);
- ``wall_us``: time per call of back-to-back runs (IO binding, no synchronization between runs)
  measured with CUDA events on onnxruntime's compute stream: includes launch gaps and host
  overhead when the host is the bottleneck;
- the roofline: ``mem_us`` = bytes of the experts the routing activates / HBM bandwidth, and
  ``flop_us`` = 2 * T * k * 3 * H * I / dense tensor-core rate; fractions are those over
  ``gpu_us``;
- with ``--timeline``, ``timeline``: where a call's time goes, each kernel's start and end from
  the start of the call's first kernel (medians over synchronized calls); the report gives their
  union (busy) beside the call's span, the difference being time the GPU waited for the host.

Writes benchmarks/results/gpu_moe.{json,md,png}. Needs a CUDA GPU, onnxruntime-gpu, torch (for
events, the profiler and random weights), matplotlib for the plot, and the moefuse library built
with CUDA (MOEFUSE_LIBRARY or an installed build).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SHAPES = [  # name, H, I, E, k
    ("Qwen3-30B-A3B", 2048, 768, 128, 8),
    ("GPT-OSS-20B", 2880, 2880, 32, 4),
    ("Mixtral-8x7B", 4096, 14336, 8, 2),
]
TOKENS = [1, 32, 512, 4096]
DTYPES = ["float16", "bfloat16"]
# Roofline of the GPUs we measure on (vendor figures): HBM bytes/s, dense fp16/bf16 tensor-core
# FLOP/s. The first whose key is in the device name applies; --hbm-tbps / --tc-tflops override.
ROOFLINES = [
    ("H200", 4.8e12, 989e12),   # H200 SXM: HBM3e; the same SMs as the H100 SXM
    ("H100", 3.35e12, 989e12),  # H100 SXM: HBM3
]


def roofline(gpu: str, hbm_tbps: float = 0.0, tc_tflops: float = 0.0) -> tuple[float, float]:
    hbm, tc = next(((h, t) for key, h, t in ROOFLINES if key in gpu), ROOFLINES[-1][1:])
    return (hbm_tbps * 1e12 if hbm_tbps else hbm), (tc_tflops * 1e12 if tc_tflops else tc)


def onnx_type(dtype: str) -> int:
    return TensorProto.FLOAT16 if dtype == "float16" else TensorProto.BFLOAT16


def external(name, shape, dtype, location, offset, length):
    t = onnx.TensorProto()
    t.name = name
    t.dims.extend(shape)
    t.data_type = onnx_type(dtype)
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def write_weights(torch, path, H, I, E, dtype, seed):
    """Random expert weights written once: w1 [E, 2I, H] (gate/up interleaved), w2 [E, H, I]."""
    tdt = torch.float16 if dtype == "float16" else torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(seed)
    offsets = {}
    with open(path, "wb") as f:
        for name, shape, fan_in in (("w1", (E, 2 * I, H), H), ("w2", (E, H, I), I)):
            offsets[name] = (f.tell(), int(np.prod(shape)) * 2, shape)
            for e in range(E):  # one expert at a time: bounded host memory
                w = torch.randn(shape[1:], generator=gen, device="cuda", dtype=torch.float32)
                w = (w / fan_in ** 0.5).to(tdt).view(torch.int16).cpu().numpy()
                f.write(w.tobytes())
    return offsets


def models(dtype, H, I, E, k, wdir, offsets):
    """(MoEFFN model, com.microsoft.MoE model) sharing the weight file."""
    from moefuse import MoEFFNAttrs
    from moefuse.builder import make_node

    et = onnx_type(dtype)
    inputs = [helper.make_tensor_value_info("X", et, ["T", H]),
              helper.make_tensor_value_info("router_logits", et, ["T", E])]
    out = [helper.make_tensor_value_info("Y", et, ["T", H])]

    def inits():
        return [external(n, shape, dtype, "weights.bin", off, length)
                for n, (off, length, shape) in offsets.items()]

    attrs = MoEFFNAttrs(k=k, routing="softmax_topk", normalize_topk=1, activation="silu",
                        gated=1, gate_up_layout="interleaved", weight_layout="out_in")
    node = make_node({"X": "X", "router_logits": "router_logits", "w1": "w1", "w2": "w2"}, "Y",
                     attrs, name="moe")
    ours = helper.make_model(helper.make_graph([node], "moeffn", inputs, out, initializer=inits()),
                             opset_imports=[helper.make_opsetid("", 18),
                                            helper.make_opsetid("moefuse", 1)], ir_version=10)
    ms_node = helper.make_node("MoE", ["X", "router_logits", "w1", "", "w2"], ["Y"], name="moe",
                               domain="com.microsoft", k=k, normalize_routing_weights=1,
                               activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                               activation_beta=0.0)
    theirs = helper.make_model(helper.make_graph([ms_node], "ms_moe", inputs, out, initializer=inits()),
                               opset_imports=[helper.make_opsetid("", 18),
                                              helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    paths = []
    for name, m in (("moeffn.onnx", ours), ("ms_moe.onnx", theirs)):
        p = os.path.join(wdir, name)
        onnx.save(m, p)
        paths.append(p)
    return paths


class Runner:
    """One session; its inputs and output bound to device buffers; timed on a torch stream that
    onnxruntime uses as its compute stream."""

    def __init__(self, ort, torch, path, so, stream, dtype, graph=False):
        self.ort, self.torch, self.stream, self.dtype = ort, torch, stream, dtype
        opts = {"device_id": 0, "user_compute_stream": str(stream.cuda_stream)}
        if graph:  # onnxruntime captures the call as a CUDA graph and replays it: no host launches
            opts["enable_cuda_graph"] = "1"
        self.sess = ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", opts)])
        self.ro = ort.RunOptions()
        self.ro.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def bind(self, x, logits, y):
        et = np.float16 if self.dtype == "float16" else TensorProto.BFLOAT16
        b = self.sess.io_binding()
        for name, t in (("X", x), ("router_logits", logits)):
            b.bind_input(name, "cuda", 0, et, list(t.shape), t.data_ptr())
        b.bind_output("Y", "cuda", 0, et, list(y.shape), y.data_ptr())
        self.binding = b

    def call(self):
        self.sess.run_with_iobinding(self.binding, self.ro)

    def wall_us(self, min_seconds=0.25):
        torch = self.torch
        for _ in range(3):
            self.call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.call()
        torch.cuda.synchronize()
        one = time.perf_counter() - t0
        n = int(min(500, max(5, min_seconds / max(one, 1e-6))))
        samples = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            for _ in range(n):
                self.call()
            end.record(self.stream)
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / n)
        return statistics.median(samples)

    def profiled(self, calls, wait_each):
        """(start, end, name) in µs of the GPU activity of `calls` calls (after one unprofiled
        call), each waited for when wait_each, else back to back."""
        torch = self.torch
        from torch.profiler import ProfilerActivity, profile

        self.call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                self.call()
                if wait_each:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
        return [(ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                if ev.device_type == torch.autograd.DeviceType.CUDA]

    def gpu_round(self, calls=10):
        """One profiled round of `calls` back-to-back calls: GPU busy time per call, and each
        kernel name's summed time."""
        spans, names = [], {}
        for a, b, name in self.profiled(calls, wait_each=False):
            spans.append((a, b))
            names[name] = names.get(name, 0.0) + (b - a)
        return busy_time(spans) / calls, names

    def timeline(self, calls=30):
        """call_timeline over `calls` calls, each waited for (so that they do not overlap)."""
        kernels, span, used = call_timeline(self.profiled(calls, wait_each=True), calls)
        return {"calls": used, "span_us": round(span, 1),
                "kernels": [{"name": n[:80], "start_us": round(a, 1), "end_us": round(b, 1)}
                            for n, a, b in kernels]}


class Copies(Runner):
    """Sessions of one model (each holding its own copy of the weights on the GPU), called in turn:
    a call finds its weights out of L2, as a layer of a model does after the layers between, rather
    than left there by the previous call (``--copies``)."""

    def __init__(self, runners):
        first = runners[0]
        self.ort, self.torch, self.stream, self.dtype = first.ort, first.torch, first.stream, first.dtype
        self.runners, self.turn = runners, 0

    def bind(self, x, logits, y):
        for r in self.runners:
            r.bind(x, logits, y)

    def call(self):
        self.runners[self.turn].call()
        self.turn = (self.turn + 1) % len(self.runners)


def failure(exc: Exception) -> str:
    """How a failed session, call or measurement is recorded."""
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def short_failure(msg: str) -> str:
    """A recorded failure in a few words for the report (the JSON keeps the message)."""
    alloc = re.search(r"Failed to allocate memory for requested buffer of size (\d+)", msg)
    if alloc:
        return f"out of GPU memory (a buffer of {int(alloc.group(1)) / 2**30:.2f} GiB)"
    return msg.splitlines()[0][:120] if msg else "failed"


def memory_warning(name: str, dtype: str, sessions: int, per_session: int, free: int) -> str:
    """A line for the console where `sessions` more sessions, each taking what the first took of
    the GPU's memory (its weights, in onnxruntime's arena: more than their bytes), would not fit
    the memory still free (those past it fail, and their rows read 'error'), or ''."""
    need = sessions * per_session
    if need <= free:
        return ""
    return (f"{name} {dtype}: {sessions} more sessions of {per_session / 2**30:.1f} GiB each "
            f"({need / 2**30:.1f} GiB) exceed the GPU's {free / 2**30:.1f} GiB free: the last ones will "
            "fail; time fewer --paths (or --copies) at this shape")


def interleaved_gpu_us(runners: dict, calls=10, rounds=3, errors=None) -> dict:
    """GPU busy time per call of each runner: the median over `rounds` profiled rounds
    (Runner.gpu_round) of `calls` calls, the rounds' values, and the kernels with the most time
    per call. The runners take their rounds in turn (round 1 of each, then round 2 of each, ...),
    so that a drift of the GPU's clocks during the measurement reaches every variant alike rather
    than the one measured last. {key: (median, rounds, top kernels)}; with `errors` (a dict), a
    runner whose round raises is left out, its message in errors[key]."""
    per_round = {key: [] for key in runners}
    names = {key: {} for key in runners}
    for _ in range(rounds):
        for key, runner in runners.items():
            if errors is not None and key in errors:
                continue
            try:
                busy, seen = runner.gpu_round(calls)
            except Exception as exc:  # noqa: BLE001 - the caller records it
                if errors is None:
                    raise
                errors[key] = failure(exc)
                continue
            per_round[key].append(busy)
            for name, v in seen.items():
                names[key][name] = names[key].get(name, 0.0) + v
    out = {}
    for key in runners:
        if errors is not None and key in errors:
            continue
        top = sorted(names[key].items(), key=lambda kv: -kv[1])[:6]
        out[key] = (statistics.median(per_round[key]), per_round[key],
                    [(n[:60], round(v / (calls * rounds), 1)) for n, v in top])
    return out


def busy_time(spans) -> float:
    """The union of (start, end) intervals: kernels launched with programmatic dependent launch
    start before their predecessor ends, so their durations overlap; idle gaps count not at all."""
    busy, end = 0.0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy


def call_timeline(events, calls: int = 0, gap_us: float = 20.0):
    """Medians of the kernels' intervals within a call, from (start, end, name) intervals in µs.
    With the number of calls, they are split at the calls - 1 longest idle gaps (a call that waits
    on the host, as com.microsoft.MoE's do, has idle gaps of its own, shorter than the host's time
    between synchronized calls); else at every gap longer than gap_us. Calls whose kernel count is
    not the most common one are left out; returns ([(name, start, end), ...], median span, calls
    used)."""
    events = sorted(events)
    gaps, last_end = [], None  # (idle time before event i, i)
    for i, (a, b, _) in enumerate(events):
        if last_end is not None:
            gaps.append((a - last_end, i))
        last_end = b if last_end is None else max(last_end, b)
    if calls > 1:
        cuts = {i for _, i in sorted(gaps, reverse=True)[:calls - 1]}
    else:
        cuts = {i for g, i in gaps if g > gap_us}
    groups, cur = [], []
    for i, ev in enumerate(events):
        if i in cuts:
            groups.append(cur)
            cur = []
        cur.append(ev)
    if cur:
        groups.append(cur)
    if not groups:
        return [], 0.0, 0
    n = statistics.mode(len(c) for c in groups)
    groups = [c for c in groups if len(c) == n]
    kernels = []
    for i in range(n):
        kernels.append((groups[0][i][2], statistics.median(c[i][0] - c[0][0] for c in groups),
                        statistics.median(c[i][1] - c[0][0] for c in groups)))
    span = statistics.median(max(b for _, b, _ in c) - c[0][0] for c in groups)
    return kernels, span, len(groups)


# --paths names: exact names, then prefixes whose rest is the value ("" for the knob's default)
VARIANTS = {
    "nopdl": {"MOEFUSE_CUDA_PDL": "0"},
    "order_n": {"MOEFUSE_CUDA_ORDER": "n"},
    "pingpong": {"MOEFUSE_CUDA_SCHEDULE": "pingpong"},
    "cooperative": {"MOEFUSE_CUDA_SCHEDULE": "cooperative"},
    "split": {"MOEFUSE_CUDA_DECODE": "split"},
    "fused": {"MOEFUSE_CUDA_DECODE": "fused"},
    "nooverlap": {"MOEFUSE_CUDA_OVERLAP": "0"},
    "passes": {"MOEFUSE_CUDA_RANK_ROUTE": "0"},
    "graph": {},  # a session option (uses_graph), not a kernel knob
}
VARIANT_PREFIXES = [
    ("lib=", "MOEFUSE_LIBRARY", None),  # another build of the library, side by side in one run
    ("narrow", "MOEFUSE_CUDA_NARROW", "auto"),
    ("splitk", "MOEFUSE_CUDA_SPLITK", "auto"),
    ("bn", "MOEFUSE_CUDA_BN", None),
    ("tmarows", "MOEFUSE_CUDA_TMA_ROWS", None),
    ("onetoken", "MOEFUSE_CUDA_ONE_TOKEN", None),
    ("ctapairs", "MOEFUSE_CUDA_CTA_PAIRS", "1"),
    ("p1counter", "MOEFUSE_CUDA_P1_COUNTER", "1"),
]


def variant_env(name: str) -> dict:
    """Environment of a MoEFFN variant (see --paths; "a+b" combines two); the kernel reads it at
    session creation. Other names force a path (MOEFUSE_CUDA_PATH)."""
    if "+" in name:
        env = {}
        for part in name.split("+"):
            env.update(variant_env(part))
        return env
    if name in VARIANTS:
        return dict(VARIANTS[name])
    for prefix, key, default in VARIANT_PREFIXES:
        if name.startswith(prefix):
            return {key: name[len(prefix):] or default or ""}
    return {"MOEFUSE_CUDA_PATH": name}


def uses_graph(name: str) -> bool:
    """Whether a variant runs as a CUDA graph that onnxruntime captures (one session per T: a
    captured graph holds its shapes and buffers)."""
    return "graph" in name.split("+")


@contextlib.contextmanager
def variant_environment(env: dict):
    """The process environment with `env` applied, then as it was (a variant's MOEFUSE_LIBRARY
    must not outlive its session, nor remove the default's)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def active_experts(logits: np.ndarray, k: int) -> int:
    ids = np.argsort(-logits.astype(np.float32), axis=1, kind="stable")[:, :k]
    return len(np.unique(ids))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="all", help="comma-separated shape names or 'all'")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--paths", default="", help="also time MoEFFN variants (comma-separated): "
                    "decode, prefill, mma (MOEFUSE_CUDA_PATH forced), nopdl (MOEFUSE_CUDA_PDL=0), bn128, bn256 "
                    "(MOEFUSE_CUDA_BN), order_n (MOEFUSE_CUDA_ORDER=n), pingpong, cooperative "
                    "(MOEFUSE_CUDA_SCHEDULE), splitk, splitk2..4 (MOEFUSE_CUDA_SPLITK auto or 2..4), "
                    "narrow0, narrow32, narrow64 (MOEFUSE_CUDA_NARROW), nooverlap (MOEFUSE_CUDA_OVERLAP=0), tmarows0..3 (MOEFUSE_CUDA_TMA_ROWS), "
                    "ctapairs, ctapairs0, ctapairscounter (MOEFUSE_CUDA_CTA_PAIRS=1, 0 or counter: 128-row tiles on CTA pairs sharing the weight tile, "
                    "never, or paired with projection 1's tiles still from its counter; default automatic), "
                    "passes (MOEFUSE_CUDA_RANK_ROUTE=0: one-token calls routed by the selection passes), "
                    "onetoken0 (MOEFUSE_CUDA_ONE_TOKEN=0: one-token calls by the routing, skinny and combine kernels), "
                    "p1counter0 (MOEFUSE_CUDA_P1_COUNTER=0: projection 1's 128-row tiles assigned statically, "
                    "not taken from a counter), "
                    "graph (the call captured and replayed as a CUDA graph: "
                    "onnxruntime's enable_cuda_graph, a session per T), fused / split (MOEFUSE_CUDA_DECODE: decode "
                    "projections in one kernel on Hopper wherever it serves / never; default from 512 MiB of "
                    "routed weights), lib=PATH (another build of the "
                    "library, MOEFUSE_LIBRARY); "
                    "a+b combines two, e.g. pingpong+bn128")
    ap.add_argument("--timeline", action="store_true",
                    help="also record each point's kernel timeline (start and end of every kernel "
                    "of a call, medians over 30 synchronized calls)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--workdir", default="", help="where the temporary models go")
    ap.add_argument("--hbm-tbps", type=float, default=0.0,
                    help="memory roofline in TB/s (default: the GPU's from ROOFLINES)")
    ap.add_argument("--tc-tflops", type=float, default=0.0,
                    help="dense fp16/bf16 tensor-core peak in TFLOP/s (default: the GPU's)")
    ap.add_argument("--render", default="", metavar="JSON",
                    help="measure nothing: rewrite a results JSON's roofline fields (for its GPU, "
                    "or --hbm-tbps / --tc-tflops) and write its JSON, table and chart to --out")
    ap.add_argument("--copies", type=int, default=1,
                    help="sessions per variant, each with its own copy of the weights, called in "
                    "turn, so that a call's weights are not in L2 from the call before (a layer of a "
                    "model reads its weights after the other layers'); costs this many times the "
                    "weights' GPU memory")
    ap.add_argument("--rounds", type=int, default=3,
                    help="profiled rounds of GPU time per point and variant, their median reported")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1 (got {args.rounds})")
    if args.copies < 1:
        ap.error(f"--copies must be at least 1 (got {args.copies})")
    if args.render:
        return render(args)

    import onnxruntime as ort
    import torch

    from moefuse.runtime import cuda_build, session_options

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("onnxruntime has no CUDA execution provider")
    shapes = SHAPES if args.shapes == "all" else [s for s in SHAPES if s[0] in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    dtypes = args.dtypes.split(",")
    forced = [p for p in args.paths.split(",") if p]
    gpu = torch.cuda.get_device_name(0)
    hbm_bytes_per_s, tc_flops = roofline(gpu, args.hbm_tbps, args.tc_tflops)
    print(f"GPU: {gpu}; onnxruntime {ort.__version__}; torch {torch.__version__}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    stream = torch.cuda.Stream()
    records = []
    for name, H, I, E, k in shapes:
        for dtype in dtypes:
            tdt = torch.float16 if dtype == "float16" else torch.bfloat16
            with tempfile.TemporaryDirectory(dir=args.workdir or None) as wdir:
                t0 = time.time()
                offsets = write_weights(torch, os.path.join(wdir, "weights.bin"), H, I, E, dtype, 1)
                ours_path, ms_path = models(dtype, H, I, E, k, wdir, offsets)
                print(f"{name} {dtype}: weights written in {time.time() - t0:.1f}s", flush=True)
                variants = [("MoEFFN", ours_path, {}), ("com.microsoft.MoE", ms_path, None)]
                variants += [(f"MoEFFN[{p}]", ours_path, variant_env(p)) for p in forced]
                graphs = {f"MoEFFN[{p}]" for p in forced if uses_graph(p)}
                gen = torch.Generator(device="cuda").manual_seed(2)
                tmax = max(tokens)
                x_all = torch.randn(tmax, H, generator=gen, device="cuda").to(tdt)
                l_all = (torch.randn(tmax, E, generator=gen, device="cuda") * 2).to(tdt)
                runners, bound, r = {}, None, None  # the last shape's sessions go before this one's are made
                gc.collect()
                for vname, path, env in variants:
                    with variant_environment(env or {}):  # read by the kernel at session creation
                        if env is not None:
                            so = session_options(log_severity_level=3)
                        else:
                            so = ort.SessionOptions()
                            so.log_severity_level = 3
                        def make(path=path, so=so, graph=vname in graphs):
                            made = [Runner(ort, torch, path, so, stream, dtype, graph=graph)
                                    for _ in range(args.copies)]
                            return made[0] if len(made) == 1 else Copies(made)
                        free = torch.cuda.mem_get_info()[0]
                        try:
                            # graph variants: a fresh session per T (made with the variant's environment)
                            runners[vname] = ((make, env) if vname in graphs else make())
                        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
                            runners[vname] = failure(exc)
                    if vname == "MoEFFN":  # what one session takes, so as to warn before the rest fail
                        left = torch.cuda.mem_get_info()[0]
                        warning = memory_warning(name, dtype, (len(variants) - 1) * args.copies,
                                                 (free - left) // args.copies, left)
                        if warning:
                            print(warning, flush=True)
                print(f"{name} {dtype}: sessions ready after {time.time() - t0:.1f}s", flush=True)
                for T in tokens:
                    x, logits = x_all[:T].contiguous(), l_all[:T].contiguous()
                    act = active_experts(logits.float().cpu().numpy(), k)
                    outs, recs, bound = {}, {}, {}
                    for vname, r in runners.items():  # outputs and wall times, variant by variant
                        rec = recs[vname] = {"shape": name, "H": H, "I": I, "E": E, "k": k,
                                             "dtype": dtype, "T": T, "variant": vname,
                                             "active_experts": act}
                        if isinstance(r, str):
                            rec["error"] = r
                            continue
                        try:
                            if isinstance(r, tuple):  # a graph variant's session for this T
                                with variant_environment(r[1] or {}):
                                    r = r[0]()
                            y = torch.empty(T, H, device="cuda", dtype=tdt)
                            r.bind(x, logits, y)
                            r.call()
                            torch.cuda.synchronize()
                            outs[vname] = y.float().cpu().numpy()
                            rec["wall_us"] = round(r.wall_us(), 2)
                            bound[vname] = r
                        except Exception as exc:  # noqa: BLE001 - recorded, not hidden
                            rec["error"] = failure(exc)
                    failed = {}  # GPU times, the variants' rounds in turn
                    for vname, (gpu_us, rounds, top) in interleaved_gpu_us(bound, rounds=args.rounds, errors=failed).items():
                        recs[vname].update(gpu_us=round(gpu_us, 2), top_kernels=top,
                                           gpu_us_rounds=[round(v, 2) for v in rounds])
                        if args.timeline:
                            try:
                                recs[vname]["timeline"] = bound[vname].timeline()
                            except Exception as exc:  # noqa: BLE001 - recorded; the times stand
                                recs[vname]["timeline_error"] = failure(exc)
                    for vname, message in failed.items():
                        recs[vname]["error"] = message
                    ref = outs.get("com.microsoft.MoE")
                    for vname, rec in recs.items():  # every variant checked, not only the default
                        if ref is not None and vname in outs:
                            diff = np.abs(outs[vname] - ref).max()
                            rec["max_rel_diff_vs_ms"] = round(float(diff / max(np.abs(ref).max(), 1e-30)), 5)
                        roofline_fields(rec, hbm_bytes_per_s, tc_flops)
                        records.append(rec)
                        print(json.dumps(rec), flush=True)
                os.environ.pop("MOEFUSE_CUDA_PATH", None)
                del runners
                torch.cuda.empty_cache()
    meta = {"gpu": gpu, "onnxruntime": ort.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "rounds": args.rounds, "copies": args.copies,
            "hbm_bytes_per_s": hbm_bytes_per_s,
            "tensor_flops": tc_flops, "moefuse_cuda": cuda_build()}
    write_results(records, meta, args.out)


def roofline_fields(rec: dict, hbm_bytes_per_s: float, tc_flops: float) -> None:
    """(Re)computes a record's roofline times and its fractions of them."""
    H, I, k, T = rec["H"], rec["I"], rec["k"], rec["T"]
    rec["mem_us"] = round(rec["active_experts"] * 3 * H * I * 2 / hbm_bytes_per_s * 1e6, 2)
    rec["flop_us"] = round(2 * T * k * 3 * H * I / tc_flops * 1e6, 2)
    if "gpu_us" in rec:
        rec["mem_fraction"] = round(rec["mem_us"] / rec["gpu_us"], 3)
        rec["flop_fraction"] = round(rec["flop_us"] / rec["gpu_us"], 3)


def render(args):
    with open(args.render) as f:
        data = json.load(f)
    meta, records = data["meta"], data["records"]
    hbm, tc = roofline(meta["gpu"], args.hbm_tbps, args.tc_tflops)
    meta["hbm_bytes_per_s"], meta["tensor_flops"] = hbm, tc
    for rec in records:
        roofline_fields(rec, hbm, tc)
    os.makedirs(args.out, exist_ok=True)
    write_results(records, meta, args.out)


def write_results(records, meta, out):
    with open(os.path.join(out, "gpu_moe.json"), "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    md = table(records, meta)
    with open(os.path.join(out, "gpu_moe.md"), "w") as f:
        f.write(md)
    print(md)
    try:
        plot(records, meta, os.path.join(out, "gpu_moe.png"))
    except Exception as exc:  # noqa: BLE001
        print(f"no plot: {exc}")


def table(records, meta) -> str:
    from moefuse.runtime import describe_cuda_build

    device = describe_cuda_build(meta.get("moefuse_cuda"))  # (none in results from before it)
    by = {}
    for r in records:
        by[(r["shape"], r["dtype"], r["T"], r["variant"])] = r
    lines = [f"GPU: {meta['gpu']}, onnxruntime {meta['onnxruntime']}. Times in µs per call: "
             "GPU time (busy time of the call's kernels) / wall time of back-to-back runs. Roofline: "
             f"active expert bytes / {meta['hbm_bytes_per_s'] / 1e12:.2f} TB/s (mem), "
             f"FLOPs / {meta['tensor_flops'] / 1e12:.0f} TFLOP/s (flop).", "",
             "Speedup: com.microsoft.MoE's time over MoEFFN's, by GPU time and by wall time (the "
             "profiled GPU time of long calls can lie above or below their wall time and vary "
             "between rounds).", "", *([device, ""] if device else []),
             *([f"Each variant ran as {meta['copies']} sessions, each with its own copy of the weights, "
                "called in turn: a call's weights were not in L2 from the call before.", ""]
               if meta.get("copies", 1) > 1 else []),
             "| shape (H, I, E, k) | dtype | T | MoEFFN | com.microsoft.MoE | speedup (GPU) | "
             "speedup (wall) | mem roofline | flop roofline | MoEFFN % mem | MoEFFN % flop |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["shape"], r["H"], r["I"], r["E"], r["k"], r["dtype"], r["T"]) for r in records},
                  key=lambda k: ([s[0] for s in SHAPES].index(k[0]) if k[0] in [s[0] for s in SHAPES] else 9,
                                 k[5], k[6]))

    def cell(r):
        if r is None:
            return "—"
        if "error" in r:
            return "error"
        return f"{r['gpu_us']:.1f} / {r['wall_us']:.1f}"

    for name, H, I, E, k, dtype, T in keys:
        ours = by.get((name, dtype, T, "MoEFFN"))
        ms = by.get((name, dtype, T, "com.microsoft.MoE"))
        speed = {key: (f"{ms[key] / ours[key]:.2f}x" if ours and ms and key in ours and key in ms else "—")
                 for key in ("gpu_us", "wall_us")}
        ref = ours or ms
        memf = f"{100 * ours['mem_fraction']:.0f}%" if ours and "mem_fraction" in ours else "—"
        flopf = f"{100 * ours['flop_fraction']:.0f}%" if ours and "flop_fraction" in ours else "—"
        lines.append(f"| {name} ({H}, {I}, {E}, {k}) | {dtype} | {T} | {cell(ours)} | {cell(ms)} | "
                     f"{speed['gpu_us']} | {speed['wall_us']} | {ref['mem_us']:.1f} | {ref['flop_us']:.1f} | {memf} | {flopf} |")
    lines += spread_note(records)
    extra = [r for r in records if r["variant"].startswith("MoEFFN[")]
    if extra:
        lines += ["", "MoEFFN variants (GPU µs / wall µs; speed relative to the default MoEFFN, by "
                  "GPU time and by wall time; max relative difference from com.microsoft.MoE's "
                  "output):", "",
                  "| shape | dtype | T | variant | time | vs default (GPU) | vs default (wall) | max rel diff |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in extra:
            base = by.get((r["shape"], r["dtype"], r["T"], "MoEFFN"))
            rel = {key: (f"{base[key] / r[key]:.2f}x" if base and key in base and key in r else "—")
                   for key in ("gpu_us", "wall_us")}
            diff = f"{r['max_rel_diff_vs_ms']:.2g}" if "max_rel_diff_vs_ms" in r else "—"
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['T']} | {r['variant']} | {cell(r)} | "
                         f"{rel['gpu_us']} | {rel['wall_us']} | {diff} |")
    failed = [r for r in records if "error" in r]
    if failed:
        lines += ["", "Failed (the JSON has each message): " + "; ".join(
            f"{r['shape']} {r['dtype']} T = {r['T']} {r['variant']}: {short_failure(r['error'])}" for r in failed) + "."]
    lines += targets(records)
    timed = [r for r in records if r.get("timeline", {}).get("kernels")]
    if timed:
        lines += ["", "Kernel timelines (--timeline): each kernel's start and end in µs from the start "
                  "of the call's first kernel, medians over synchronized calls; busy: the union of "
                  "those intervals. Each such call starts on an idle GPU, so the span less the busy "
                  "time is time the GPU waited for the host (its launches, or a round trip to it), which "
                  "back-to-back calls (gpu_us, wall_us) mostly hide.", ""]
        for r in timed:
            tl = r["timeline"]
            busy = busy_time([(k["start_us"], k["end_us"]) for k in tl["kernels"]])
            lines += [f"{r['shape']}, {r['dtype']}, T = {r['T']}, {r['variant']}: {tl['span_us']:.1f} µs, "
                      f"busy {busy:.1f} ({tl['calls']} calls)", "", "| kernel | start | end |",
                      "| --- | --- | --- |"]
            lines += [f"| {short_kernel_name(k['name'])} | {k['start_us']:.1f} | {k['end_us']:.1f} |"
                      for k in tl["kernels"]]
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


GPU_SPREAD = 1.10  # rounds' largest over smallest profiled GPU time that the report points out


def spread_note(records) -> list:
    """Report lines naming the records whose profiled rounds differed by more than GPU_SPREAD
    (their GPU-time ratios are then less certain than their wall-time ratios)."""
    wide = [r for r in records if len(r.get("gpu_us_rounds", [])) > 1
            and max(r["gpu_us_rounds"]) > GPU_SPREAD * min(r["gpu_us_rounds"])]
    if not wide:
        return []
    return ["", f"Profiled GPU time differed by more than {GPU_SPREAD - 1:.0%} between the rounds "
            "of these points (µs per call, each round's value): "
            + "; ".join(f"{r['shape']} {r['dtype']} T = {r['T']} {r['variant']}: "
                        + ", ".join(f"{v:.1f}" for v in r["gpu_us_rounds"]) for r in wide) + "."]


def targets(records) -> list:
    """The GPU issue's targets, per dtype, from the default MoEFFN and com.microsoft.MoE records
    (lines of a markdown table; none when a dtype lacks pairs of them)."""
    pairs = {}
    for r in records:
        if r["variant"] in ("MoEFFN", "com.microsoft.MoE") and "gpu_us" in r:
            pairs.setdefault((r["shape"], r["dtype"], r["T"]), {})[r["variant"]] = r
    pairs = {key: p for key, p in pairs.items() if len(p) == 2}
    if not pairs:
        return []
    names = [name for name, *_ in SHAPES]
    qwen = names[0]  # (2048, 768, 128, 8): the shape of the 3x and 1.5x targets

    def order(kv):
        (shape, _, T), _ = kv
        return T, names.index(shape) if shape in names else len(names), shape

    def pts(dtype, keep):
        return [(s.split("-")[0], T, p["MoEFFN"], p["com.microsoft.MoE"])
                for (s, d, T), p in sorted(pairs.items(), key=order)
                if d == dtype and keep(s, T, p["MoEFFN"])]

    def met(flags):
        return "met" if all(flags) else "not met"

    lines = ["", "Against the GPU issue's targets (default MoEFFN; GPU time, wall time in brackets):",
             "", "| dtype | target | status | points |", "| --- | --- | --- | --- |"]
    for dtype in sorted({d for _, d, _ in pairs}):
        every = pts(dtype, lambda s, T, o: True)
        for key, label in (("gpu_us", "GPU time"), ("wall_us", "wall time")):
            # with both times: a ratio just below 1 prints as 1.00x
            slow = [f"{n} T={T} {m[key] / o[key]:.2f}x ({o[key]:.1f} µs; com.microsoft.MoE {m[key]:.1f})"
                    for n, T, o, m in every if m[key] < o[key]]
            lines.append(f"| {dtype} | never slower than com.microsoft.MoE ({label}) | "
                         f"{met([not slow])} | {', '.join(slow) or f'{len(every)} points'} |")
        # (a target none of whose points ran is left out, not reported met)
        dec = pts(dtype, lambda s, T, o: T in (1, 32))
        if dec:
            lines.append(f"| {dtype} | decode (T = 1, 32) at >= 70% of the memory roofline | "
                         f"{met([o['mem_us'] >= 0.7 * o['gpu_us'] for _, _, o, _ in dec])} | "
                         + ", ".join(f"{n} T={T} {o['mem_us'] / o['gpu_us']:.0%}" for n, T, o, _ in dec) + " |")
        for T, goal, what in ((1, 3.0, "T = 1"), (4096, 1.5, "T = 4096")):
            one = pts(dtype, lambda s, t, o: s == qwen and t == T)
            for n, _, o, m in one:
                lines.append(f"| {dtype} | {what} on {qwen} >= {goal:g}x faster | "
                             f"{met([m['gpu_us'] >= goal * o['gpu_us']])} | "
                             f"{m['gpu_us'] / o['gpu_us']:.2f}x ({m['wall_us'] / o['wall_us']:.2f}x) |")
        pre = pts(dtype, lambda s, T, o: T == 4096 and o["flop_us"] > o["mem_us"])
        if pre:
            lines.append(f"| {dtype} | prefill (T = 4096, FLOP-bound shapes) at >= 60% of dense peak | "
                         f"{met([o['flop_us'] >= 0.6 * o['gpu_us'] for _, _, o, _ in pre])} | "
                         + ", ".join(f"{n} {o['flop_us'] / o['gpu_us']:.0%} ({o['flop_us'] / o['wall_us']:.0%})"
                                     for n, _, o, _ in pre) + " |")
    return lines


def short_kernel_name(name: str) -> str:
    """A profiler's kernel name without return type, namespaces and parameter list, template
    arguments kept: "void ns::(anonymous namespace)::Kern<float, 2>(Args)" -> "Kern<float, 2>"."""
    n = name.replace("(anonymous namespace)::", "")
    if n.startswith("void "):
        n = n[5:]
    depth, start = 0, 0
    for i, ch in enumerate(n):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0 and ch == "(":
            n = n[:i]
            break
        elif depth == 0 and n.startswith("::", i):
            start = i + 2
    return n[start:].strip()


def plot(records, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES), figsize=(5 * len(SHAPES), 4), squeeze=False)
    for ax, (name, H, I, E, k) in zip(axes[0], SHAPES):
        for variant, style in (("MoEFFN", "-"), ("com.microsoft.MoE", "--")):
            for dtype, color in (("float16", "tab:blue"), ("bfloat16", "tab:orange")):
                pts = sorted((r["T"], r["gpu_us"]) for r in records
                             if r["shape"] == name and r["variant"] == variant and r["dtype"] == dtype
                             and "gpu_us" in r)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{variant} {dtype}")
        roof = sorted({(r["T"], max(r["mem_us"], r["flop_us"])) for r in records if r["shape"] == name})
        if roof:
            ax.plot(*zip(*roof), ":", color="gray", label="roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{name} (H={H}, I={I}, E={E}, k={k})", fontsize=9)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("GPU µs per call")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"MoE layer on {meta['gpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
