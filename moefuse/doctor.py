"""`moefuse doctor`: whether this installation runs MoEFFN nodes on its kernels, and where.

Each check says what it found. The ones that run a node run a small MoEFFN layer (8 experts,
top-2 SwiGLU) at 5 tokens and at 256 (on a GPU: the decode path, then a grouped GEMM) on one
execution provider and compare it with ``reference.py``; onnxruntime's profile tells which
provider ran the node's kernel (an inlined fallback function shows no MoEFFN kernel at all).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import onnxruntime as ort

from . import __version__
from .compare import max_relative_error
from .reference import moeffn_from_inputs
from .runtime import PROVIDERS
from .spec import MoEFFNAttrs

# The layer of the run checks (sizes multiples of 8, as the GPU's tensor-core paths want), and
# its token counts: 5 takes the GPU's decode path, 256 (64 rows an expert) a grouped GEMM.
CHECK_LAYER = dict(hidden=64, inter=32, experts=8)
CHECK_TOKENS = (5, 256)
# Largest relative error accepted against the reference, by input type.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
CUDA_NODE_CHECK = "MoEFFN on CUDA (float16)"
PROVIDER_NAME_CUDA = PROVIDERS["cuda"][0]


@dataclass
class Check:
    name: str
    status: str  # "ok", "failed", "skipped" (not applicable, or not asked for) or "info"
    detail: str


def _quiet(f, *args):
    """f(*args) with what it prints to stdout captured: onnxruntime's Python layer prints its
    provider fallbacks and library loading there, which would corrupt --json. (result, printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = f(*args)
    return result, " ".join(out.getvalue().split())


def _library(checks: list[Check]) -> Optional[str]:
    from .runtime import library_path

    try:
        path = library_path()
    except FileNotFoundError as e:
        checks.append(Check("library", "failed", str(e)))
        return None
    checks.append(Check("library", "ok", path))
    _cpu_kernels(checks)
    return path


CPU_ISA_TEXT = {"avx512": "AVX-512 micro-kernels", "avx2": "AVX2 + FMA + F16C micro-kernels",
                "generic": "portable micro-kernels", "blas": "an OpenBLAS sgemm per tile"}


def _cpu_kernels(checks: list[Check]) -> None:
    from .runtime import cpu_kernels

    k = cpu_kernels()
    if k is None:
        return
    forced = " (MOEFUSE_CPU_ISA)" if os.environ.get("MOEFUSE_CPU_ISA") == k["isa"] else ""
    packing = ("float16 / bfloat16 weights packed 16-bit" if k["half_weights"]
               else "weights packed as float32")
    checks.append(Check("CPU kernels", "info",
                        f"{k['isa']}{forced}: {CPU_ISA_TEXT.get(k['isa'], k['isa'])}; {packing}"))


def _run_node(provider: str, dtype: str) -> tuple[float, list[str], set[str], str]:
    """Runs the check layer on `provider` at CHECK_TOKENS; (the largest relative error against
    the reference, the session's providers, the providers that ran a MoEFFN kernel, what
    onnxruntime printed while making the session)."""
    from .builder import make_moeffn_model
    from .runtime import node_providers, run, session_options
    from .synthetic import feeds, random_inputs

    attrs = MoEFFNAttrs(k=2, routing="softmax_topk", activation="silu", gate_up_layout="halves")
    inputs = random_inputs(attrs, tokens=max(CHECK_TOKENS), **CHECK_LAYER,
                           dtype=np.float16 if dtype == "float16" else np.float32)
    model = make_moeffn_model(attrs, inputs)
    so = session_options(log_severity_level=3, enable_profiling=True)
    sess, printed = _quiet(ort.InferenceSession, model.SerializeToString(), so, PROVIDERS[provider])
    err, per_call = 0.0, feeds(inputs)
    for t in CHECK_TOKENS:
        part = {n: (a[:t] if n in per_call else a) for n, a in inputs.items()}
        y = run(sess, feeds(part))[0]
        want = moeffn_from_inputs(attrs, {n: a.astype(np.float32) for n, a in part.items()})
        err = max(err, max_relative_error(want, np.asarray(y, dtype=np.float32)))
    return err, sess.get_providers(), node_providers(sess).get("MoEFFN", set()), printed


def _node_check(checks: list[Check], provider: str, dtype: str, name: str) -> None:
    try:
        err, session_providers, ran, printed = _run_node(provider, dtype)
    except Exception as e:  # onnxruntime's own message says what went wrong
        checks.append(Check(name, "failed", f"{type(e).__name__}: {e}"))
        return
    want = PROVIDERS[provider][0]
    if want not in session_providers:
        checks.append(Check(name, "failed", f"onnxruntime could not use {want}; the session runs on "
                                            f"{', '.join(session_providers)}" + (f" ({printed})" if printed else "")))
    elif not ran:
        checks.append(Check(name, "failed", "no MoEFFN kernel ran: the node's embedded fallback "
                                            "function did (the library is not registered)"))
    elif ran != {want}:
        checks.append(Check(name, "failed", f"the node ran on {', '.join(sorted(ran))}, not on {want}"))
    elif err > TOLERANCE[dtype]:
        checks.append(Check(name, "failed", f"max relative error {err:.1e} against the reference "
                                            f"(tolerance {TOLERANCE[dtype]:.0e})"))
    else:
        tokens = " and ".join(map(str, CHECK_TOKENS))
        checks.append(Check(name, "ok", f"moefuse's kernel ran ({tokens} tokens); max relative "
                                        f"error {err:.1e} against the reference"))


def _cuda(checks: list[Check], required: bool) -> None:
    """The CUDA checks after the CPU's: each missing piece is `skipped`, or `failed` when the
    GPU is required; the node runs only where all are there."""
    from .runtime import cuda_build, describe_cuda_build

    missing = "failed" if required else "skipped"
    if PROVIDER_NAME_CUDA not in ort.get_available_providers():
        checks.append(Check("CUDA provider", missing,
                            "onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu "
                            "built for CUDA 13 (with its nvidia-* CUDA wheels) instead of onnxruntime"))
        return
    if hasattr(ort, "preload_dlls"):  # the CUDA libraries of the nvidia-* wheels
        try:
            _quiet(ort.preload_dlls)
        except Exception as e:  # (a bad directory raises)
            checks.append(Check("CUDA libraries", "failed", f"onnxruntime.preload_dlls(): {e}"))
            return
    try:
        build = cuda_build()
    except OSError as e:  # the library does not load on its own (a missing dependency)
        checks.append(Check("CUDA kernels", "failed", f"the library does not load: {e}"))
        return
    if build is None:
        checks.append(Check("CUDA kernels", missing, "the library was built without them: "
                                                     "rebuild it where nvcc (CUDA 13) is installed"))
        return
    if build["device"] is None:
        checks.append(Check("CUDA kernels", "info", f"compiled for {', '.join(build['archs'])}"))
        checks.append(Check("GPU", missing, "no usable CUDA device (the CUDA runtime found none)"))
        return
    if not build["device"]["runs"]:
        checks.append(Check("CUDA kernels", missing, describe_cuda_build(build)))
        return
    checks.append(Check("CUDA kernels", "ok", describe_cuda_build(build)))
    _node_check(checks, "cuda", "float16", CUDA_NODE_CHECK)


def run_checks(provider: str = "cpu", log: Callable[[str], None] = lambda m: None) -> list[Check]:
    """The checks, in order. The CPU kernel is always checked; the CUDA kernel where this
    installation has all it needs, and what is missing fails the run where `provider` is
    "cuda"."""
    checks = [Check("moefuse", "info", f"{__version__} (Python {platform.python_version()}, "
                                       f"{platform.machine()})"),
              Check("onnxruntime", "info", f"{ort.__version__}; providers: "
                                           f"{', '.join(ort.get_available_providers())}")]
    log("library")
    if _library(checks) is None:
        return checks
    log("MoEFFN on the CPU")
    _node_check(checks, "cpu", "float32", "MoEFFN on CPU (float32)")
    log("CUDA")
    _cuda(checks, required=provider == "cuda")
    return checks


def failed(checks: list[Check]) -> bool:
    return any(c.status == "failed" for c in checks)


def table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    return "\n".join(f"{c.status:8s} {c.name:{width}s}  {c.detail}" for c in checks)


def as_json(checks: list[Check]) -> str:
    return json.dumps({"ok": not failed(checks), "checks": [asdict(c) for c in checks]}, indent=2)
