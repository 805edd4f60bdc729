"""CPU benchmark: the moefuse MoEFFN kernel against the other ways to run an MoE layer in
onnxruntime, side by side, with the same weights.

Columns (time per call of one MoE layer; the router projection is outside the MoE ops):
  kernel    moefuse.MoEFFN on the custom-op library (moefuse.session_options())
  kernel_f32w  the same, weights packed as float32 (MOEFUSE_CPU_WEIGHTS=float32, the layout
            before 16-bit packing); for half types, and for float32 with --bf16-valued-weights
  ort_moe   onnxruntime's com.microsoft.MoE (CPU kernel; interleaved SwiGLU, fc1 [E, 2I, H])
  fallback  the same MoEFFN model without the library: the embedded ONNX function (dense)
  unfused   a transformers Mixtral block (experts_implementation="batched_mm") exported with
            torch.onnx (tests/exports.py), router included; only where it fits in memory

plus a grouped-GEMM efficiency figure: the time of a dense sgemm pair of the same FLOPs
([T*k, H] x [H, 2I] and [T*k, I] x [I, H]) on the same BLAS (scipy-openblas32), divided by the
kernel's time, at 1 thread and at the session's thread count.

    python benchmarks/cpu_moe.py                     # everything (minutes)
    python benchmarks/cpu_moe.py --shapes 1024,512,32,4 --tokens 1,16 --columns kernel,ort_moe

Writes benchmarks/results/cpu_moe.json and cpu_moe.png (matplotlib, the `bench` extra).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moefuse  # noqa: E402
from moefuse import MoEFFNAttrs, make_moeffn_model  # noqa: E402
from moefuse.builder import onnx_type, tensor_from_array  # noqa: E402
from moefuse.reference import moeffn  # noqa: E402
from moefuse.runtime import run  # noqa: E402

COLUMNS = ("kernel", "kernel_f32w", "ort_moe", "fallback", "unfused")
DEFAULT_SHAPES = ((1024, 512, 32, 4), (2048, 768, 128, 8))
LARGE_MODEL = 1 << 30  # models above this are saved with external data


# --- measuring --------------------------------------------------------------------------------


def _busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def wait_idle(max_wait: float, threshold: float = 0.93) -> None:
    """Wait (up to max_wait s) until the machine is idle, so that timings are not shared."""
    if max_wait <= 0 or not os.path.exists("/proc/stat"):
        return
    t0 = time.time()
    while time.time() - t0 < max_wait:
        b0, s0 = _busy()
        time.sleep(2.0)
        b1, s1 = _busy()
        if 1.0 - (b1 - b0) / max(1, s1 - s0) > threshold:
            return


def timeit(fn: Callable[[], object], min_time: float, min_reps: int = 5) -> dict:
    """Median time per call (ms) after two warm-up calls; also the CPU share other processes
    took meanwhile (>0.1 means the numbers were measured on a busy machine)."""
    fn()
    t = time.perf_counter()
    fn()
    once = time.perf_counter() - t
    reps_min = 3 if once > 1.0 else min_reps
    times = []
    b0, _ = _busy() if os.path.exists("/proc/stat") else (0, 0)
    c0 = time.process_time()
    t0 = time.perf_counter()
    while len(times) < reps_min or time.perf_counter() - t0 < min_time:
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    other = None
    if os.path.exists("/proc/stat"):
        b1, _ = _busy()
        other = max(0.0, ((b1 - b0) / os.sysconf("SC_CLK_TCK") - (time.process_time() - c0)) / wall)
    return {"ms": float(np.median(times) * 1e3), "reps": len(times),
            "other_cpu": None if other is None else round(other, 3)}


# --- models -----------------------------------------------------------------------------------


def make_weights(H, I, E, seed=0):
    """fp32 weights in com.microsoft.MoE's layout: fc1 [E, 2I, H] (gate/up interleaved), fc2
    [E, H, I] (MoEFFN: weight_layout=out_in, gate_up_layout=interleaved)."""
    rng = np.random.default_rng(seed)
    w1 = np.empty((E, 2 * I, H), np.float32)
    w2 = np.empty((E, H, I), np.float32)
    for e in range(E):  # expert by expert: no float64 temporaries of the whole stack
        w1[e] = rng.standard_normal((2 * I, H), dtype=np.float32) / np.sqrt(H)
        w2[e] = rng.standard_normal((H, I), dtype=np.float32) / np.sqrt(I)
    router = rng.standard_normal((E, H), dtype=np.float32) / np.sqrt(H)
    return {"w1": w1, "w2": w2, "router": router}


def cast(a, dtype):
    return a if a.dtype == np.dtype(dtype) else a.astype(dtype)


_SAVED: dict = {}


def session(model: onnx.ModelProto, so: ort.SessionOptions, tmp: Path) -> ort.InferenceSession:
    """A CPU session; models over 1 GiB of weights go through a file with external data (the
    model object then refers to that file, so later sessions reuse it)."""
    if id(model) in _SAVED and _SAVED[id(model)][0] is model:
        return ort.InferenceSession(_SAVED[id(model)][1], so, providers=["CPUExecutionProvider"])
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights < LARGE_MODEL:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    path = tmp / f"model_{time.monotonic_ns()}.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    _SAVED[id(model)] = (model, str(path))  # holds the model: its id stays unique
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def moeffn_model(attrs, w, dtype, H, E):
    arrays = {"X": np.zeros((1, H), dtype), "router_logits": np.zeros((1, E), dtype),
              "w1": cast(w["w1"], dtype), "w2": cast(w["w2"], dtype)}
    return make_moeffn_model(attrs, arrays)


def ort_moe_model(w, dtype, H, E, k):
    t = onnx_type(np.dtype(dtype))
    node = helper.make_node("MoE", ["input", "router_probs", "fc1", "", "fc2"], ["out"],
                            domain="com.microsoft", k=k, activation_type="swiglu", swiglu_fusion=1,
                            normalize_routing_weights=1, activation_alpha=1.0, activation_beta=0.0)
    graph = helper.make_graph(
        [node], "ort_moe",
        [helper.make_tensor_value_info("input", t, ["T", H]),
         helper.make_tensor_value_info("router_probs", t, ["T", E])],
        [helper.make_tensor_value_info("out", t, ["T", H])],
        initializer=[tensor_from_array(cast(w["w1"], dtype), "fc1"),
                     tensor_from_array(cast(w["w2"], dtype), "fc2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def unfused_export(w, H, I, E, k, tmp: Path) -> Optional[onnx.ModelProto]:
    """A transformers Mixtral MoE block with our weights, exported by tests/exports.py.
    Returns None (and the reason printed) when that helper is not available."""
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        import torch
        # another part of the project; optional here
        from exports import export_module, first_output
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception as exc:  # pragma: no cover
        print(f"  unfused: export helper unavailable ({exc!r}); column left empty")
        return None
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                        num_experts_per_tok=k, experts_implementation="batched_mm")
    block = MixtralSparseMoeBlock(cfg).eval()
    # interleaved [g0, u0, g1, u1, ...] -> transformers' halves [g | u]
    gate_up = np.concatenate([w["w1"][:, 0::2], w["w1"][:, 1::2]], axis=1)
    with torch.no_grad():
        block.gate.weight.copy_(torch.from_numpy(w["router"]))
        block.experts.gate_up_proj.copy_(torch.from_numpy(gate_up))
        block.experts.down_proj.copy_(torch.from_numpy(w["w2"]))

    example = torch.randn(1, 3, H)
    t0 = time.time()
    for exporter in ("dynamo", "torchscript"):
        try:
            model = export_module(first_output(block), example, tmp / f"unfused_{exporter}.onnx",
                                  exporter)
            print(f"  unfused: exported with {exporter} in {time.time() - t0:.0f}s "
                  f"({len(model.graph.node)} nodes)")
            return model
        except Exception as exc:  # pragma: no cover
            print(f"  unfused: {exporter} export failed: {exc!r}")
    return None


# --- BLAS reference for the grouped-GEMM efficiency ---------------------------------------------


class Blas:
    def __init__(self):
        import scipy_openblas32 as sob

        self.lib = ctypes.CDLL(os.path.join(sob.get_lib_dir(), f"lib{sob.get_library()}.so"))
        self.lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
        self.sgemm = self.lib.scipy_cblas_sgemm
        self.corename = self.lib.scipy_openblas_get_corename().decode()

    def threads(self, n: int) -> None:
        self.lib.scipy_openblas_set_num_threads(int(n))

    def pair_time(self, M, H, I, threads, min_time) -> dict:
        """A dense [M, H] x [H, 2I] sgemm then [M, I] x [I, H]: one expert getting every pair."""
        P = ctypes.c_void_p
        rng = np.random.default_rng(0)
        a = rng.standard_normal((M, H), dtype=np.float32)
        b1 = rng.standard_normal((H, 2 * I), dtype=np.float32)
        h = np.empty((M, 2 * I), np.float32)
        b2 = rng.standard_normal((I, H), dtype=np.float32)
        y = np.empty((M, H), np.float32)
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)

        def go():
            self.sgemm(101, 111, 111, M, 2 * I, H, one, a.ctypes.data_as(P), H,
                       b1.ctypes.data_as(P), 2 * I, zero, h.ctypes.data_as(P), 2 * I)
            self.sgemm(101, 111, 111, M, H, I, one, h.ctypes.data_as(P), 2 * I,
                       b2.ctypes.data_as(P), H, zero, y.ctypes.data_as(P), H)

        self.threads(threads)
        try:
            return timeit(go, min_time)
        finally:
            self.threads(1)


# --- main -------------------------------------------------------------------------------------


def feeds_for(T, H, E, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H), dtype=np.float32)
    logits = rng.standard_normal((T, E), dtype=np.float32) * 2
    return cast(x, dtype), cast(logits, dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in DEFAULT_SHAPES),
                   help="H,I,E,k[;H,I,E,k...]")
    p.add_argument("--tokens", default="1,16,256")
    p.add_argument("--dtypes", default="float32,float16,bfloat16",
                   help="half types are measured on the first shape only")
    p.add_argument("--columns", default=",".join(COLUMNS))
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime default)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per cell")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before each cell, wait up to this many seconds for an idle machine")
    p.add_argument("--rotate", type=int, default=1,
                   help="cycle through this many inputs per cell (1: the same input every call)")
    p.add_argument("--skip-efficiency", action="store_true")
    p.add_argument("--bf16-valued-weights", action="store_true",
                   help="round the weights to bfloat16 values (a float32 export of a bfloat16 "
                        "checkpoint), which the kernel packs as bfloat16 in float32 and bfloat16")
    p.add_argument("--unfused-max-gb", type=float, default=12.0,
                   help="skip unfused cells whose gathered expert weights exceed this")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    tokens = [int(t) for t in args.tokens.split(",")]
    dtypes = args.dtypes.split(",")
    columns = args.columns.split(",")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = args.threads or None

    def so(library: bool) -> ort.SessionOptions:
        kw = {"log_severity_level": 3}
        if threads:
            kw["intra_op_num_threads"] = threads
        if library:
            return moefuse.session_options(**kw)
        o = ort.SessionOptions()
        for key, v in kw.items():
            setattr(o, key, v)
        return o

    blas = Blas()
    n_threads = threads or os.cpu_count()
    results = {
        "machine": {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "blas": f"scipy-openblas32 ({blas.corename})",
                    "intra_op_threads": threads or "onnxruntime default",
                    "cpu_isa": os.environ.get("MOEFUSE_CPU_ISA", "auto"),
                    "rotate_inputs": args.rotate,
                    "bf16_valued_weights": args.bf16_valued_weights},
        "rows": [], "efficiency": [], "notes": [],
    }
    tmp_root = tempfile.TemporaryDirectory(prefix="moefuse_bench_")
    tmp = Path(tmp_root.name)
    try:
        for si, (H, I, E, k) in enumerate(shapes):
            print(f"shape H={H} I={I} E={E} k={k}", flush=True)
            w = make_weights(H, I, E)
            if args.bf16_valued_weights:
                for name in ("w1", "w2"):
                    w[name] = w[name].astype(_bf16()).astype(np.float32)
            attrs = MoEFFNAttrs(k=k, routing="softmax_topk", normalize_topk=1,
                                gate_up_layout="interleaved", weight_layout="out_in")
            for dtype_name in dtypes:
                if dtype_name != "float32" and si > 0:
                    continue
                dtype = np.float32 if dtype_name == "float32" else (
                    np.float16 if dtype_name == "float16" else _bf16())
                rows = {T: {"shape": [H, I, E, k], "dtype": dtype_name, "tokens": T} for T in tokens}
                # kernel and com.microsoft.MoE are timed in alternating rounds, so that both see
                # the same machine state (memory bandwidth here varies from minute to minute)
                both = dtype_name != "float32" or args.bf16_valued_weights
                paired = ("kernel", "kernel_f32w", "ort_moe") if both else ("kernel", "ort_moe")
                groups = [[c for c in paired if c in columns],
                          [c for c in ("fallback",) if c in columns],
                          [c for c in ("unfused",) if c in columns and dtype_name == "float32"]]
                for group in groups:
                    if group:
                        _run_group(group, rows, attrs, w, dtype, H, I, E, k, tokens, so, tmp,
                                   args, results["notes"])
                    gc.collect()
                for T in tokens:
                    r = rows[T]
                    base = r.get("kernel", {}).get("ms")
                    for col in COLUMNS[1:]:
                        if base and r.get(col, {}).get("ms"):
                            r[f"{col}_over_kernel"] = round(r[col]["ms"] / base, 2)
                    results["rows"].append(r)
                    print("   ", _fmt_row(r), flush=True)
            if "kernel" in columns and not args.skip_efficiency:
                results["efficiency"] += _efficiency(blas, attrs, w, H, I, E, k, tokens, so, tmp,
                                                     args, n_threads)
            del w
            gc.collect()
    finally:
        tmp_root.cleanup()

    (out_dir / "cpu_moe.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out_dir / 'cpu_moe.json'}")
    try:
        _chart(results, out_dir / "cpu_moe.png")
        print(f"wrote {out_dir / 'cpu_moe.png'}")
    except ImportError:
        print("matplotlib not installed (pip install -e .[bench]): no chart")
    print(_table(results))
    return results


def _build(col, attrs, w, dtype, H, I, E, k, tokens, so, tmp, args, notes):
    """(session, note): the session for one column, or None and why not."""
    try:
        if col == "kernel":
            return session(moeffn_model(attrs, w, dtype, H, E), so(True), tmp), None
        if col == "kernel_f32w":  # read when the kernel packs its weights, at session creation
            before = os.environ.get("MOEFUSE_CPU_WEIGHTS")
            os.environ["MOEFUSE_CPU_WEIGHTS"] = "float32"
            try:
                return session(moeffn_model(attrs, w, dtype, H, E), so(True), tmp), None
            finally:
                if before is None:
                    del os.environ["MOEFUSE_CPU_WEIGHTS"]
                else:
                    os.environ["MOEFUSE_CPU_WEIGHTS"] = before
        if col == "fallback":
            return session(moeffn_model(attrs, w, dtype, H, E), so(False), tmp), None
        if col == "ort_moe":
            return session(ort_moe_model(w, dtype, H, E, k), so(False), tmp), None
        weights_gb = (w["w1"].nbytes + w["w2"].nbytes) / 2**30
        if weights_gb > 1.9:
            note = (f"not measured: {weights_gb:.1f} GiB of weights exceed the 2 GiB single-file "
                    f"export, and the batched_mm graph gathers "
                    f"{max(tokens) * k * 3 * H * I * 4 / 2**30:.0f} GiB at T={max(tokens)}")
            notes.append(f"unfused H={H}: {note}")
            return None, note
        model = unfused_export(w, H, I, E, k, tmp)
        if model is None:
            return None, "tests/exports.py (export helper) not available"
        return session(model, so(False), tmp), None
    except Exception as exc:
        msg = str(exc).splitlines()[0][:200]
        print(f"  {col}: cannot build/load ({msg})")
        notes.append(f"{col} {np.dtype(dtype).name} H={H}: {msg}")
        return None, msg


def _run_group(group, rows, attrs, w, dtype, H, I, E, k, tokens, so, tmp, args, notes):
    sessions = {}
    for col in group:
        t0 = time.time()
        sess, note = _build(col, attrs, w, dtype, H, I, E, k, tokens, so, tmp, args, notes)
        if sess is None:
            for T in tokens:
                rows[T][col] = {"ms": None, "note": note}
            continue
        sessions[col] = (sess, round(time.time() - t0, 2))
        if col == "kernel" and np.dtype(dtype) == np.float32:
            _check_against_reference(sess, attrs, w, H, E)
    rounds = 3 if len(sessions) > 1 else 1
    for T in tokens:
        # --rotate N cycles through N inputs, so that calls pick different experts (weights
        # come from DRAM, as in decoding) instead of re-reading the same ones from cache
        inputs = [feeds_for(T, H, E, dtype, seed=T + 7919 * i) for i in range(max(1, args.rotate))]
        x = inputs[0][0]
        fns = {}
        for col, (sess, _) in sessions.items():
            if col == "unfused":
                gathered = T * k * H * 3 * I * 4 / 2**30
                if gathered > args.unfused_max_gb:
                    rows[T][col] = {"ms": None, "note": f"needs ~{gathered:.0f} GiB of gathered weights"}
                    continue
                name = sess.get_inputs()[0].name
                fs = [{name: a.reshape(1, T, H)} for a, _ in inputs]
                fns[col] = _cycler(lambda f, s=sess: s.run(None, f), fs)
            elif col == "ort_moe":
                fs = [{"input": a, "router_probs": lg} for a, lg in inputs]
                fns[col] = _cycler(lambda f, s=sess: run(s, f, {"out": x.shape}), fs)
            else:
                fs = [{"X": a, "router_logits": lg} for a, lg in inputs]
                fns[col] = _cycler(lambda f, s=sess: run(s, f, {"Y": x.shape}), fs)
        wait_idle(args.wait_idle)
        samples = {col: [] for col in fns}
        failed = {}
        for _ in range(rounds):
            for col, fn in fns.items():
                if col in failed:
                    continue
                try:
                    samples[col].append(timeit(fn, args.min_time / rounds))
                except Exception as exc:
                    failed[col] = str(exc).splitlines()[0][:200]
                    print(f"  {col} T={T}: failed ({failed[col]})")
        for col in fns:
            if col in failed:
                rows[T][col] = {"ms": None, "note": failed[col]}
                continue
            ms = [t["ms"] for t in samples[col]]
            other = [t["other_cpu"] for t in samples[col] if t["other_cpu"] is not None]
            rows[T][col] = {"ms": float(np.median(ms)), "rounds_ms": [round(v, 4) for v in ms],
                            "reps": sum(t["reps"] for t in samples[col]),
                            "other_cpu": max(other) if other else None,
                            "session_s": sessions[col][1]}
    sessions.clear()


def _cycler(call, feeds):
    state = {"i": 0}

    def fn():
        f = feeds[state["i"] % len(feeds)]
        state["i"] += 1
        return call(f)

    return fn


def _check_against_reference(sess, attrs, w, H, E):
    x, logits = feeds_for(3, H, E, np.float32, seed=1234)
    got = sess.run(None, {"X": x, "router_logits": logits})[0]
    want = moeffn(attrs, x, logits, w["w1"], w["w2"])
    err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))
    print(f"  kernel vs reference: max error {err:.1e} (relative to max |y|)")
    assert err < 1e-4, err


def _efficiency(blas, attrs, w, H, I, E, k, tokens, so, tmp, args, n_threads):
    """Dense sgemm pair of equal FLOPs / kernel time, at 1 thread and at n_threads."""
    out = []
    rows = {}
    for nt in sorted({1, n_threads}):
        o = so(True)
        o.intra_op_num_threads = nt
        sess = session(moeffn_model(attrs, w, np.float32, H, E), o, tmp)
        for T in tokens:
            x, logits = feeds_for(T, H, E, np.float32, seed=T)
            wait_idle(args.wait_idle)
            kern = timeit(lambda: sess.run(None, {"X": x, "router_logits": logits}), args.min_time)
            wait_idle(args.wait_idle)
            dense = blas.pair_time(T * k, H, I, nt, args.min_time)
            flops = 2.0 * T * k * (H * 2 * I + I * H)
            rows[(T, nt)] = dict(shape=[H, I, E, k], tokens=T, threads=nt,
                                 kernel_ms=kern["ms"], dense_sgemm_ms=dense["ms"],
                                 efficiency=round(dense["ms"] / kern["ms"], 3),
                                 kernel_gflops=round(flops / kern["ms"] / 1e6, 1),
                                 dense_gflops=round(flops / dense["ms"] / 1e6, 1),
                                 other_cpu=max(kern["other_cpu"] or 0, dense["other_cpu"] or 0))
            print(f"  efficiency T={T} threads={nt}: kernel {kern['ms']:.3f} ms, dense sgemm "
                  f"{dense['ms']:.3f} ms -> {dense['ms'] / kern['ms']:.2f}", flush=True)
        del sess
        gc.collect()
    out += [rows[key] for key in sorted(rows)]
    return out


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = open("/proc/cpuinfo").read()
                isa = "avx512f" if " avx512f" in flags else ("avx2" if " avx2" in flags else "")
                return f"{name} ({isa})" if isa else name
    except OSError:
        pass
    return platform.processor()


def _fmt_row(r):
    parts = [f"{r['dtype']:>8} T={r['tokens']:<4}"]
    for col in COLUMNS:
        v = r.get(col)
        if v is None:
            continue
        parts.append(f"{col}={v['ms']:.3f}ms" if v.get("ms") else f"{col}=n/a")
    return "  ".join(parts)


def _table(results):
    lines = ["| shape (H, I, E, k) | dtype | T | kernel ms | kernel, float32-packed ms | "
             "com.microsoft.MoE ms | fallback ms | unfused ms | float32-packed / kernel | "
             "MoE / kernel | unfused / kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        def ms(c):
            v = r.get(c, {})
            return f"{v['ms']:.3g}" if v.get("ms") else "—"

        lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['tokens']} | {ms('kernel')} | "
                     f"{ms('kernel_f32w')} | {ms('ort_moe')} | {ms('fallback')} | {ms('unfused')} | "
                     f"{r.get('kernel_f32w_over_kernel', '—')} | {r.get('ort_moe_over_kernel', '—')} | "
                     f"{r.get('unfused_over_kernel', '—')} |")
    lines += ["", "| shape | T | threads | kernel ms | dense sgemm ms | efficiency |",
              "|---|---|---|---|---|---|"]
    for e in results["efficiency"]:
        lines.append(f"| {tuple(e['shape'])} | {e['tokens']} | {e['threads']} | {e['kernel_ms']:.3g} | "
                     f"{e['dense_sgemm_ms']:.3g} | {e['efficiency']:.2f} |")
    return "\n".join(lines)


def _chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = [f"{r['shape'][0]}x{r['shape'][1]}\nE={r['shape'][2]} k={r['shape'][3]}\n"
              f"{r['dtype']} T={r['tokens']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 5))
    width = 0.16
    names = {"kernel": "moefuse MoEFFN", "kernel_f32w": "MoEFFN, float32-packed weights",
             "ort_moe": "com.microsoft.MoE",
             "fallback": "embedded fallback", "unfused": "unfused export"}
    for i, col in enumerate(COLUMNS):
        vals = [r.get(col, {}).get("ms") or np.nan for r in rows]
        if all(np.isnan(v) for v in vals):
            continue
        ax.bar(np.arange(len(rows)) + (i - 2) * width, vals, width, label=names[col])
    ax.set_yscale("log")
    ax.set_ylabel("ms per call (log)")
    ax.set_xticks(np.arange(len(rows)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(f"MoE layer on CPU: {results['machine']['cpu']}, onnxruntime "
                 f"{results['machine']['onnxruntime']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
