"""`moefuse doctor`: whether this installation can run MoEFFN nodes on its kernels, and where.

Each check says what it found; the ones that run a node run a small MoEFFN layer (8 experts,
top-2 SwiGLU) on one execution provider and compare it with ``reference.py``. onnxruntime's
profiler tells which provider ran the node and that it ran as one MoEFFN kernel (an inlined
fallback function would show as its primitive nodes instead).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import onnxruntime as ort

from . import __version__
from .compare import max_relative_error
from .reference import moeffn_from_inputs
from .spec import MoEFFNAttrs

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# The layer of the run checks: sizes multiples of 8, so that the GPU takes its tensor-core paths.
CHECK_SHAPE = dict(tokens=5, hidden=64, inter=32, experts=8)
# Largest relative error accepted against the reference, by input type.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


@dataclass
class Check:
    name: str
    status: str  # "ok", "failed", or "skipped" (not applicable, or not asked for)
    detail: str


def _library(checks: list[Check]) -> Optional[str]:
    from .runtime import library_path

    try:
        path = library_path()
    except FileNotFoundError as e:
        checks.append(Check("library", "failed", str(e)))
        return None
    checks.append(Check("library", "ok", path))
    return path


def _cuda_build(checks: list[Check]) -> Optional[dict]:
    from .runtime import cuda_build, describe_cuda_build

    try:
        build = cuda_build()
    except OSError as e:  # the library does not load on its own (a missing dependency)
        checks.append(Check("CUDA kernels", "failed", f"the library does not load: {e}"))
        return None
    if build is None:
        checks.append(Check("CUDA kernels", "skipped", "the library was built without them (no nvcc "
                                                        "at build time, or MOEFUSE_CUDA=OFF)"))
        return None
    detail = f"compiled for {', '.join(build['archs'])}"
    if build["device"] is not None:
        detail = describe_cuda_build(build)
    checks.append(Check("CUDA kernels", "ok", detail))
    return build


def _run_node(provider: str, dtype: str) -> tuple[float, list[str], list[str]]:
    """Runs the check layer on `provider`; (max relative error against the reference, the
    providers of the session, the providers that ran a MoEFFN kernel by the profile)."""
    from .builder import make_moeffn_model
    from .runtime import run, session_options
    from .synthetic import feeds, random_inputs

    attrs = MoEFFNAttrs(k=2, routing="softmax_topk", activation="silu", gate_up_layout="halves")
    inputs = random_inputs(attrs, dtype=np.float16 if dtype == "float16" else np.float32,
                           **CHECK_SHAPE)
    model = make_moeffn_model(attrs, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(log_severity_level=3, enable_profiling=True)
        so.profile_file_prefix = os.path.join(tmp, "profile")
        names = [PROVIDER_NAMES[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=names)
        y = run(sess, feeds(inputs))[0]
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    # (the kernel's own event carries its provider; older onnxruntime adds fence events without)
    ran = sorted({e["args"]["provider"] for e in events if e.get("cat") == "Node"
                  and e.get("args", {}).get("op_name") == "MoEFFN" and "provider" in e["args"]})
    want = moeffn_from_inputs(attrs, {n: a.astype(np.float32) for n, a in inputs.items()})
    return max_relative_error(want, np.asarray(y, dtype=np.float32)), sess.get_providers(), ran


def _node_check(checks: list[Check], provider: str, dtype: str) -> None:
    name = f"MoEFFN on {provider.upper()} ({dtype})"
    try:
        err, session_providers, ran = _run_node(provider, dtype)
    except Exception as e:  # onnxruntime's own message says what went wrong
        checks.append(Check(name, "failed", f"{type(e).__name__}: {e}"))
        return
    want = PROVIDER_NAMES[provider]
    if want not in session_providers:
        checks.append(Check(name, "failed", f"onnxruntime could not use {want}; the session runs "
                                            f"on {', '.join(session_providers)}"))
    elif not ran:
        checks.append(Check(name, "failed", "no MoEFFN kernel ran: the node's embedded fallback "
                                            "function did (the library is not registered)"))
    elif ran != [want]:
        checks.append(Check(name, "failed", f"the node ran on {', '.join(ran)}, not on {want}"))
    elif err > TOLERANCE[dtype]:
        checks.append(Check(name, "failed", f"max relative error {err:.1e} against the reference "
                                            f"(tolerance {TOLERANCE[dtype]:.0e})"))
    else:
        checks.append(Check(name, "ok", f"moefuse's kernel ran; max relative error {err:.1e} "
                                        f"against the reference"))


def run_checks(provider: str = "cpu", log: Callable[[str], None] = lambda m: None) -> list[Check]:
    """The checks, in order. The CPU kernel is always checked; the CUDA kernel where onnxruntime
    has its CUDA provider, or (failing when it has not) where `provider` is "cuda"."""
    checks = [Check("moefuse", "ok", f"{__version__} (Python {platform.python_version()}, "
                                     f"{platform.machine()})")]
    available = ort.get_available_providers()
    checks.append(Check("onnxruntime", "ok", f"{ort.__version__}; providers: {', '.join(available)}"))
    log("library")
    if _library(checks) is None:
        return checks
    log("MoEFFN on the CPU")
    _node_check(checks, "cpu", "float32")
    has_cuda_provider = PROVIDER_NAMES["cuda"] in available
    if has_cuda_provider and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # onnxruntime-gpu's CUDA libraries, from the nvidia-* wheels
    log("CUDA kernels")
    build = _cuda_build(checks)
    if not has_cuda_provider:
        status = "failed" if provider == "cuda" else "skipped"
        checks.append(Check("CUDA provider", status,
                            "onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu "
                            "built for CUDA 13 (with its nvidia-* CUDA wheels) instead of "
                            "onnxruntime"))
        return checks
    if build is None:
        status = "failed" if provider == "cuda" else "skipped"
        checks.append(Check("MoEFFN on CUDA", status, "the library has no CUDA kernels: rebuild it "
                                                      "where nvcc (CUDA 13) is installed"))
        return checks
    log("MoEFFN on CUDA")
    _node_check(checks, "cuda", "float16")
    return checks


def failed(checks: list[Check]) -> bool:
    return any(c.status == "failed" for c in checks)


def table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.status:8s} {c.name:{width}s}  {c.detail}" for c in checks)


def as_json(checks: list[Check]) -> str:
    return json.dumps({"ok": not failed(checks), "checks": [asdict(c) for c in checks]}, indent=2)
