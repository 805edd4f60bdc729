"""Running models in onnxruntime: sessions, and feeding/fetching types numpy lacks (bfloat16)."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import onnxruntime as ort
from onnx import TensorProto


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
