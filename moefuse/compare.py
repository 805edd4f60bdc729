"""Running two models on the same random inputs and measuring how far their outputs differ."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .converter.graph import np_dtype
from .runtime import run


def random_feeds(model: onnx.ModelProto, dynamic: int = 3, seed: int = 0,
                 int_high: int = 16) -> dict:
    """Random inputs for a model's graph inputs; every symbolic dim takes the value ``dynamic``.

    Integer inputs (token ids, positions) get values in [0, int_high)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else dynamic
                 for d in t.shape.dim]
        dtype = np_dtype(t.elem_type)
        if np.issubdtype(dtype, np.integer):
            feeds[vi.name] = rng.integers(0, int_high, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = np.ones(shape, dtype=bool)
        else:
            feeds[vi.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return feeds


def session(model_or_path, sess_options: Optional[ort.SessionOptions] = None,
            providers: Sequence[str] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    so = sess_options or ort.SessionOptions()
    so.log_severity_level = 3
    if isinstance(model_or_path, onnx.ModelProto):
        model_or_path = model_or_path.SerializeToString()
    return ort.InferenceSession(model_or_path, so, providers=list(providers))


def max_relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |a| (0 for empty outputs)."""
    a32, b32 = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    if a32.size == 0:
        return 0.0
    return float(np.max(np.abs(a32 - b32)) / (np.max(np.abs(a32)) + 1e-30))


def compare_sessions(sess_a, sess_b, model: onnx.ModelProto, dynamic_sizes=(1, 5),
                     seed: int = 0) -> float:
    """Worst relative error over all outputs and input sizes."""
    worst = 0.0
    for n, size in enumerate(dynamic_sizes):
        feeds = random_feeds(model, size, seed + n)
        out_a = run(sess_a, feeds)
        out_b = run(sess_b, feeds)
        for x, y in zip(out_a, out_b):
            if np.asarray(x).dtype.kind in "fc" or np.asarray(x).dtype.name == "bfloat16":
                worst = max(worst, max_relative_error(x, y))
            elif not np.array_equal(x, y):
                worst = float("inf")
    return worst
