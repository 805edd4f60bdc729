"""Running models in onnxruntime: sessions, and feeding/fetching types numpy lacks (bfloat16).

``session_options()`` gives onnxruntime session options with moefuse's custom-op library
registered, so that MoEFFN nodes run on its kernels instead of their embedded fallback function;
``library_path()`` is where that library is (for onnxruntime's other APIs).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import onnxruntime as ort
from onnx import TensorProto


LIBRARY_ENV = "MOEFUSE_LIBRARY"
# onnxruntime providers of a session by moefuse's name for it (the first is the one asked for)
PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def _library_name() -> str:
    if sys.platform == "win32":
        return "moefuse_ops.dll"
    if sys.platform == "darwin":
        return "libmoefuse_ops.dylib"
    return "libmoefuse_ops.so"


def library_path() -> str:
    """Absolute path of moefuse's onnxruntime custom-op library (``libmoefuse_ops.so``).

    ``$MOEFUSE_LIBRARY`` wins when set (e.g. a sanitizer build). Otherwise the library installed
    in the package (``moefuse/_lib/``) by ``pip install .`` or ``pip install -e .`` is used; an
    editable install keeps it in site-packages while the Python sources stay in the checkout, so
    every directory of the package's ``__path__`` is searched, then the installed file list.
    Raises FileNotFoundError, saying how to build it, when there is none.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"${LIBRARY_ENV} points to {override!r}, which is not a file")
        return str(path.resolve())
    name = _library_name()
    import moefuse

    for root in list(getattr(moefuse, "__path__", [])):
        candidate = Path(root) / "_lib" / name
        if candidate.is_file():
            return str(candidate.resolve())
    try:
        from importlib import metadata

        dist = metadata.distribution("moefuse")
        for f in dist.files or []:
            if f.name == name:
                candidate = Path(dist.locate_file(f))
                if candidate.is_file():
                    return str(candidate.resolve())
    except Exception:  # no installed distribution metadata: fall through
        pass
    raise FileNotFoundError(
        f"moefuse's custom-op library ({name}) is not built. Build and install it from the "
        f"repository root with `pip install .` (or `pip install -e .`, which `make test` runs); "
        f"it needs CMake >= 3.18, a C++17 compiler and scipy-openblas32. Or point "
        f"${LIBRARY_ENV} at a built copy.")


def _load_blas() -> None:
    """Load scipy-openblas32's shared library into the process (the library links to it)."""
    try:
        import scipy_openblas32  # noqa: F401  (its import loads libscipy_openblas globally)
    except ImportError:
        pass  # the library's RUNPATH may still find it


def load_library():
    """The library loaded into this process through ctypes (after its BLAS), to ask it what it was
    built with."""
    _load_blas()
    return ctypes.CDLL(library_path())


def session_options(**options) -> ort.SessionOptions:
    """``onnxruntime.SessionOptions`` with the moefuse library registered.

    Keyword arguments set SessionOptions attributes, e.g.
    ``session_options(intra_op_num_threads=2, log_severity_level=3)``.
    """
    so = ort.SessionOptions()
    for key, value in options.items():
        if not hasattr(so, key):
            raise TypeError(f"onnxruntime.SessionOptions has no attribute '{key}'")
        setattr(so, key, value)
    _load_blas()
    so.register_custom_ops_library(library_path())
    return so


def cuda_build() -> Optional[dict]:
    """What the library's CUDA kernels were compiled for, and what of them this process's current
    GPU runs; None for a library built without them (no nvcc at build time).

    ``{"archs": ["80", "90a"], "device": None}`` where no GPU is usable, else ``"device"`` is
    ``{"capability": "9.0", "runs": ..., "wgmma": ..., "fused_decode": ..., "pdl": ...}``: the
    GPU's compute capability, whether it runs the library's CUDA code at all (not below 8.0, nor
    where the build has no code for it), the grouped GEMM's and the one-kernel decode's sm_90a
    code, and kernels compiled for sm_90+ (so launched with programmatic dependent launch). A
    Hopper GPU runs none of the sm_90a code with a build without sm_90a, and a GPU newer than the
    build runs the compute_80 PTX, compiled for it by the driver.
    """
    lib = load_library()
    if not hasattr(lib, "MoefuseCudaBuilt"):
        return None
    lib.MoefuseCudaArchs.restype = ctypes.c_char_p
    code = lib.MoefuseCudaDeviceCode()
    device = None
    if code >= 0:
        if hasattr(lib, "MoefuseCudaDeviceCapability"):
            cc = lib.MoefuseCudaDeviceCapability()
            device = {"capability": f"{cc // 10}.{cc % 10}" if cc >= 0 else None, "runs": bool(code & 8)}
        else:  # a library built before these were reported (e.g. an older MOEFUSE_LIBRARY)
            device = {"capability": None, "runs": True}
        device.update({name: bool(code & bit) for name, bit in
                       (("wgmma", 1), ("fused_decode", 2), ("pdl", 4))})
    return {"archs": lib.MoefuseCudaArchs().decode().split(","), "device": device}


def cpu_kernels() -> Optional[dict]:
    """The CPU kernel's inner loops in this process: ``{"isa": "avx512" | "avx2" | "generic" |
    "blas", "half_weights": ...}`` (the best the CPU runs, or ``$MOEFUSE_CPU_ISA``'s choice), and
    whether a kernel made now keeps weights of 16-bit values 16-bit in its packed copy: float16
    and bfloat16 weights, and float32 ones whose values are all bfloat16 (or float16) values
    (not with ``blas``, nor with ``MOEFUSE_CPU_WEIGHTS=float32``). None for a library from
    before these were reported."""
    lib = load_library()
    if not hasattr(lib, "MoefuseCpuKernels"):
        return None
    lib.MoefuseCpuKernels.restype = ctypes.c_char_p
    return {"isa": lib.MoefuseCpuKernels().decode(), "half_weights": bool(lib.MoefuseCpuPacksHalfWeights())}


def describe_cuda_build(build: Optional[dict]) -> str:
    """One sentence on a ``cuda_build()`` result: the architectures, and what of the sm_90a code
    the GPU runs ("" without a GPU or CUDA kernels)."""
    if not build or not build.get("device"):
        return ""
    archs = ", ".join(build["archs"])
    if not build["device"].get("runs", True):  # (results from before it was reported ran)
        cc = build["device"].get("capability")
        need = ("its kernels need compute capability 8.0 or newer" if cc and float(cc) < 8.0
                else "rebuild it with MOEFUSE_CUDA_ARCHS naming this GPU's")
        return (f"MoEFFN's library: CUDA code for {archs}; this GPU (compute capability {cc}) "
                f"runs none of it: {need}.")
    ran = [name for key, name in (("wgmma", "the grouped GEMM's sm_90a code"),
                                  ("fused_decode", "the one-kernel decode's sm_90a code"),
                                  ("pdl", "programmatic dependent launch")) if build["device"][key]]
    ran = " and ".join([", ".join(ran[:-1]), ran[-1]] if len(ran) > 1 else ran)
    return (f"MoEFFN's library: CUDA code for {archs}; this GPU runs "
            f"{ran or 'none of its sm_90a code (the mma grouped GEMM, skinny and SIMT paths)'}.")


def _is_bf16(array: np.ndarray) -> bool:
    return array.dtype.name == "bfloat16"


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray],
        output_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> list[np.ndarray]:
    """``session.run`` that also accepts and returns ml_dtypes.bfloat16 arrays.

    onnxruntime's Python layer has no numpy type for bfloat16, so bfloat16 inputs go in as
    OrtValues and bfloat16 outputs are bound to caller-sized buffers: their shapes must be given
    in ``output_shapes``.
    """
    bf16_out = [o for o in session.get_outputs() if o.type == "tensor(bfloat16)"]
    if not bf16_out and not any(_is_bf16(a) for a in feeds.values()):
        return session.run(None, dict(feeds))
    import ml_dtypes

    binding = session.io_binding()
    for name, array in feeds.items():
        if _is_bf16(array):
            value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(array).view(np.uint16), TensorProto.BFLOAT16)
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
    buffers = {}
    for out in session.get_outputs():
        if out.type == "tensor(bfloat16)":
            if not output_shapes or out.name not in output_shapes:
                raise ValueError(f"output '{out.name}' is bfloat16: pass its shape in output_shapes")
            buf = np.empty(tuple(output_shapes[out.name]), dtype=np.uint16)
            binding.bind_output(out.name, "cpu", 0, TensorProto.BFLOAT16, buf.shape,
                                buf.ctypes.data)
            buffers[out.name] = buf
        else:
            binding.bind_output(out.name, "cpu")
    session.run_with_iobinding(binding)
    out = []
    for meta, value in zip(session.get_outputs(), binding.get_outputs()):
        if meta.name in buffers:
            out.append(buffers[meta.name].view(ml_dtypes.bfloat16))
        else:
            out.append(value.numpy())
    return out


def node_providers(session: ort.InferenceSession) -> dict[str, set[str]]:
    """{op type: the execution providers that ran a kernel of it} from a session created with
    ``enable_profiling``: ends its profiling and removes the trace. An op whose node was inlined
    (a MoEFFN node's fallback function) does not appear; the kernel's own event carries its
    provider (older onnxruntime adds fence events without one)."""
    import json

    trace = session.end_profiling()
    try:
        with open(trace) as f:
            events = json.load(f)
    finally:
        os.remove(trace)
    placed: dict[str, set[str]] = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in args and "op_name" in args:
            placed.setdefault(args["op_name"], set()).add(args["provider"])
    return placed
