"""`moefuse bench`: the original model, its MoEFFN version and its com.microsoft.MoE version,
timed side by side in one process on the same inputs."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import onnx
import onnxruntime as ort

from .compare import max_relative_error, random_feeds
from .runtime import PROVIDERS, run



@dataclass
class Variant:
    name: str
    model: onnx.ModelProto
    options: Optional[ort.SessionOptions] = None
    note: str = ""
    ms: dict = field(default_factory=dict)     # tokens -> median ms per call
    error: dict = field(default_factory=dict)  # tokens -> max relative error vs original


def fused_variants(model: onnx.ModelProto, count: int, log: Callable[[str], None]) -> list[Variant]:
    """A model that already has MoEFFN nodes: what stock onnxruntime runs (their embedded
    function, the baseline) against the moefuse library's kernel."""
    from .spec import DOMAIN, OP_TYPE

    log(f"the model already has {count} MoEFFN node(s): timing them with the moefuse library "
        "against their embedded function")
    out = []
    if any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions):
        out.append(Variant("MoEFFN, embedded function", model))
    else:
        log("no embedded MoEFFN function: stock onnxruntime cannot run this model (moefuse "
            "convert embeds one)")
    try:
        from .runtime import session_options

        out.append(Variant("MoEFFN + moefuse library", model, session_options()))
    except Exception as exc:  # noqa: BLE001 - the library is optional
        log(f"moefuse library not available ({exc})")
    if not out:
        raise RuntimeError("its MoEFFN nodes have no embedded function and the moefuse library "
                           "is not available: nothing can run them")
    return out


def variants(model: onnx.ModelProto, base_dir: str, log: Callable[[str], None]) -> list[Variant]:
    from .builder import iter_moeffn_nodes
    from .converter import convert_model

    already = sum(1 for _ in iter_moeffn_nodes(model.graph))
    if already:
        return fused_variants(model, already, log)
    out = [Variant("original", model)]
    fused = convert_model(model, base_dir=base_dir)
    if fused.model is None:
        reasons = "; ".join(f"{b.name}: {b.reason}" for b in fused.near_misses) or "no MoE blocks"
        log(f"no MoEFFN version: {reasons}")
        return out
    try:
        from .runtime import session_options

        out.append(Variant("MoEFFN + moefuse library", fused.model, session_options()))
    except Exception as exc:  # noqa: BLE001 - the library is optional
        log(f"moefuse library not available ({exc}); timing the embedded function only")
    out.append(Variant("MoEFFN, embedded function", fused.model))
    ort_version = convert_model(model, base_dir=base_dir, target="ort")
    n_ort = sum(b.emitted.startswith("com.microsoft") for b in ort_version.blocks)
    if ort_version.model is not None and n_ort:
        notes = [f"{b.name}: {b.target_note}" for b in ort_version.blocks if b.target_note]
        out.append(Variant("com.microsoft.MoE", ort_version.model, note="; ".join(notes)))
    else:
        notes = {b.target_note for b in ort_version.blocks if b.target_note}
        log(f"no com.microsoft.MoE version: {'; '.join(sorted(notes)) or 'no block fits'}")
    return out


def feeds_for(model: onnx.ModelProto, tokens: int, batch: int, seed: int = 0) -> dict:
    """Random inputs: with two symbolic dims the first is the batch, the other the tokens."""
    feeds = random_feeds(model, dynamic=tokens, seed=seed)
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        symbolic = [i for i, d in enumerate(dims) if not (d.HasField("dim_value") and d.dim_value > 0)]
        if len(symbolic) >= 2:
            arr = feeds[vi.name]
            index = [slice(None)] * arr.ndim
            index[symbolic[0]] = slice(0, batch)
            feeds[vi.name] = np.ascontiguousarray(arr[tuple(index)]) if batch <= tokens else \
                np.repeat(arr[tuple(slice(0, 1) if i == symbolic[0] else slice(None)
                                    for i in range(arr.ndim))], batch, axis=symbolic[0])
    return feeds


def time_call(sess, feeds, min_seconds: float = 0.3, min_runs: int = 3) -> float:
    run(sess, feeds)  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        run(sess, feeds)
        times.append(time.perf_counter() - t)
        if len(times) >= 200:
            break
    return statistics.median(times) * 1e3


def bench(model: onnx.ModelProto, base_dir: str, tokens: list[int], batch: int = 1,
          provider: str = "cpu", threads: int = 0,
          log: Callable[[str], None] = lambda m: None) -> list[Variant]:
    vs = variants(model, base_dir, log)
    if provider == "cuda":
        from .runtime import cuda_build, describe_cuda_build

        log(describe_cuda_build(cuda_build()) or "MoEFFN's library has no CUDA kernels, or no GPU is usable")
    for v in vs:
        so = v.options or ort.SessionOptions()
        so.log_severity_level = 3
        # (the model goes in as bytes: its external data is found beside the file it came from)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dir)
        if threads:
            so.intra_op_num_threads = threads
        log(f"session: {v.name}")
        v.session = ort.InferenceSession(v.model.SerializeToString(), so,
                                         providers=PROVIDERS[provider])
        if PROVIDERS[provider][0] not in v.session.get_providers():  # fell back to the CPU
            raise RuntimeError(f"onnxruntime could not use {PROVIDERS[provider][0]} (no usable "
                               f"GPU?); the session runs on {v.session.get_providers()}")
    for t in tokens:
        feeds = feeds_for(model, t, batch)
        ref = None
        for v in vs:
            log(f"tokens={t}: {v.name}")
            out = run(v.session, feeds)
            ref = out if ref is None else ref
            v.error[t] = max(max_relative_error(a, b) for a, b in zip(ref, out))
            v.ms[t] = time_call(v.session, feeds)
    for v in vs:
        del v.session
    return vs


def table(vs: list[Variant], tokens: list[int]) -> str:
    head = f"{'variant':30s}" + "".join(f"{f'T={t} ms':>12s}{'speedup':>9s}" for t in tokens) \
        + f"{'max error':>11s}"
    lines = [head, "-" * len(head)]
    base = vs[0].ms
    for v in vs:
        row = f"{v.name:30s}"
        for t in tokens:
            row += f"{v.ms[t]:12.3f}{base[t] / v.ms[t]:8.2f}x"
        row += f"{max(v.error.values()):11.1e}"
        lines.append(row)
        if v.note:
            lines.append(f"  ({v.note})")
    return "\n".join(lines)


def to_json(vs: list[Variant]) -> list[dict]:
    return [{"variant": v.name, "ms_per_call": v.ms, "max_relative_error": v.error,
             "note": v.note} for v in vs]
