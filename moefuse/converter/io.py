"""Loading and writing model files safely.

- Loading never reads external data: weights stay on disk and the converter reads only the
  tensors of the block it verifies.
- Bad input gets a :class:`ModelFileError` naming the file and what is wrong.
- Writing goes to a temporary file in the destination folder, renamed over the destination only
  once complete, so a failure leaves no partial file and an output equal to the input is safe.
- External data stays external: the written model points at the original data files (by a path
  relative to the output folder); new tensors made by re-layouts go to ``<output>.data``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import onnx
from google.protobuf.message import DecodeError

from ..function import MIN_OPSET, opset_of

# Protobuf caps a message at 2 GiB; new tensors above this size go to external data.
_EXTERNAL_THRESHOLD = 1 << 20


class ModelFileError(Exception):
    """A model file that cannot be read or written; the message says which and why."""


def load(path: str) -> onnx.ModelProto:
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelFileError(f"{path}: is a folder, expected an .onnx file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise ModelFileError(f"{path}: empty file, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelFileError(f"{path}: not an ONNX model, or a truncated one "
                             f"(protobuf could not parse it: {exc})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise ModelFileError(f"{path}: not an ONNX model (no graph or no opset import)")
    check_external_data(model, os.path.dirname(os.path.abspath(path)), path)
    return model


def check_opset(model: onnx.ModelProto, path: str) -> None:
    opset = opset_of(model)
    if opset is None or opset < MIN_OPSET:
        raise ModelFileError(
            f"{path}: imports ONNX opset {opset}, older than the {MIN_OPSET} moefuse supports "
            f"(the embedded MoEFFN function needs it). Upgrade first, e.g. "
            f"onnx.version_converter.convert_version(model, {MIN_OPSET}).")


def external_tensors(model: onnx.ModelProto):
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t


def check_external_data(model: onnx.ModelProto, base_dir: str, path: str) -> None:
    sizes: dict[str, int] = {}
    for t in external_tensors(model):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        full = os.path.join(base_dir, loc)
        if loc not in sizes:
            if not os.path.isfile(full):
                raise ModelFileError(f"{path}: initializer '{t.name}' keeps its data in "
                                     f"'{loc}', which does not exist (looked in {base_dir})")
            sizes[loc] = os.path.getsize(full)
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > sizes[loc]:
            raise ModelFileError(f"{path}: initializer '{t.name}' needs bytes up to {end} of "
                                 f"'{loc}', which has only {sizes[loc]} (truncated data file)")


def save(model: onnx.ModelProto, out_path: str, in_path: str) -> None:
    """Write ``model`` to ``out_path`` atomically, keeping external data where it is."""
    out_dir = os.path.dirname(os.path.abspath(out_path))
    in_dir = os.path.dirname(os.path.abspath(in_path))
    if not os.path.isdir(out_dir):
        raise ModelFileError(f"{out_path}: the folder {out_dir} does not exist")
    if in_dir != out_dir:
        for t in external_tensors(model):
            for e in t.external_data:
                if e.key == "location":
                    e.value = os.path.relpath(os.path.join(in_dir, e.value), out_dir)
    has_external = any(True for _ in external_tensors(model))
    big_new = [t for t in model.graph.initializer
               if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > _EXTERNAL_THRESHOLD]
    data_name = os.path.basename(out_path) + ".data"
    tmp_data = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".moefuse-", suffix=".onnx", dir=out_dir)
        os.close(fd)
    except OSError as exc:
        raise ModelFileError(f"{out_path}: cannot write in {out_dir} ({exc.strerror})") from None
    try:
        if big_new and (has_external or model.ByteSize() > (3 << 29)):
            tmp_data = tmp + ".data"
            offset = 0
            with open(tmp_data, "wb") as f:
                for t in big_new:
                    raw = t.raw_data
                    f.write(raw)
                    del t.external_data[:]
                    for key, value in (("location", data_name), ("offset", str(offset)),
                                       ("length", str(len(raw)))):
                        entry = t.external_data.add()
                        entry.key, entry.value = key, value
                    t.data_location = onnx.TensorProto.EXTERNAL
                    t.ClearField("raw_data")
                    offset += len(raw)
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
        if tmp_data:
            os.replace(tmp_data, os.path.join(out_dir, data_name))
        os.replace(tmp, out_path)
    except OSError as exc:
        raise ModelFileError(f"{out_path}: cannot write ({exc.strerror})") from None
    finally:
        for leftover in (tmp, tmp_data):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)


def copy_unchanged(in_path: str, out_path: str) -> None:
    """The output of a model with nothing to convert: the input's bytes."""
    if os.path.abspath(in_path) == os.path.abspath(out_path):
        return
    out_dir = os.path.dirname(os.path.abspath(out_path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".moefuse-", suffix=".onnx", dir=out_dir)
        os.close(fd)
        shutil.copyfile(in_path, tmp)
        os.replace(tmp, out_path)
    except OSError as exc:
        raise ModelFileError(f"{out_path}: cannot write ({exc.strerror})") from None
