"""Loading and writing model files safely.

- Loading never reads external data: weights stay on disk and the converter reads only the
  tensors of the block it verifies.
- Bad input gets a :class:`ModelFileError` naming the file and what is wrong.
- Writing goes to temporary files in the destination folder, renamed over the destination only
  once complete, so a failure leaves no partial file and an output equal to the input is safe. An
  output path that is a symlink writes its target; one that exists and is not a regular file (a
  device, a FIFO) is refused. Files written get the usual permissions (0666 less the umask).
- External data stays external and where onnxruntime looks for it, inside the model's folder: an
  output in another folder gets copies of the input's data files at the same relative paths
  there (not hard links: onnx's loader refuses data files with several links); an existing file
  of that name is reused only if it is such a copy, never overwritten. New tensors made by
  re-layouts go to ``<output>.data``, or to another name where that one is taken: by the model's
  own data (an in-place conversion of a model whose weights are in ``model.onnx.data``, as
  torch's exporter names them) or by a file on disk that the output being replaced does not use.
  A :class:`Spill` writes them there as the rewrite makes them, so that they are never all in
  memory at once.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Optional

import numpy as np
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
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: is not a regular file (a device or pipe), expected an .onnx file")
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


def output_file(out_path: str) -> str:
    """The regular file to (re)place for ``out_path``: a symlink's target; refuses the rest."""
    real = os.path.realpath(out_path)
    if os.path.exists(real) and not os.path.isfile(real):
        raise ModelFileError(f"{out_path}: exists and is not a regular file (a folder, device or "
                             f"pipe); give the path of an .onnx file")
    out_dir = os.path.dirname(real)
    if not os.path.isdir(out_dir):
        raise ModelFileError(f"{out_path}: the folder {out_dir} does not exist")
    return real


def _temp_beside(path: str, shown: str, suffix: str = "") -> str:
    """An empty temporary file in ``path``'s folder, with the permissions a new file gets."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".moefuse-", suffix=suffix, dir=os.path.dirname(path))
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except OSError as exc:
        raise ModelFileError(f"{shown}: cannot write in {os.path.dirname(path)} ({exc.strerror})") from None
    return tmp


class _Staged:
    """Files written under temporary names, renamed into place together by ``commit``, removed
    by ``discard`` if anything fails first."""

    def __init__(self, shown: str):
        self.shown = shown
        self.moves: list[tuple[str, str]] = []

    def new(self, final: str, suffix: str = "") -> str:
        return self.adopt(_temp_beside(final, self.shown, suffix), final)

    def adopt(self, tmp: str, final: str) -> str:
        """A temporary file written elsewhere (a spill's), renamed to ``final`` with the rest."""
        self.moves.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self.moves:  # the model file last: it is what refers to the others
            os.replace(tmp, final)
        self.moves = []

    def discard(self) -> None:
        for tmp, _ in self.moves:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.moves = []


def _set_location(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")


class Spill:
    """The new tensors of a rewrite, written as they are made to a temporary file beside the
    output, which :func:`save` then places as the output's new data file (its name is known only
    then); re-laid weights of a large model are thus never all in memory. Tensors of at most
    _EXTERNAL_THRESHOLD bytes stay in the model. Call it on each new tensor, or ``array`` on
    each new array; ``discard`` removes the file where the output is not written."""

    LOCATION = "moefuse-spill"  # a placeholder until save names the data file

    def __init__(self, out_path: str):
        self.path = _temp_beside(output_file(out_path), out_path, ".data")
        try:
            self._file = open(self.path, "wb")
        except OSError as exc:
            os.unlink(self.path)
            raise ModelFileError(f"{out_path}: cannot write in its folder ({exc.strerror})") from None
        self.size = 0
        self.names: set[str] = set()  # the tensors whose data it holds

    def __call__(self, t: onnx.TensorProto) -> onnx.TensorProto:
        raw = t.raw_data
        if len(raw) <= _EXTERNAL_THRESHOLD:
            return t
        # a new message: clearing the field of ``t`` would not give its bytes back (protobuf
        # frees a message's memory with the message)
        return self._append(raw, len(raw), t.name, t.data_type, t.dims)

    def array(self, a: np.ndarray, name: str) -> onnx.TensorProto:
        """A new tensor from an array: its bytes go straight to the file (no serialized copy)."""
        from ..builder import onnx_type, tensor_from_array

        if a.nbytes <= _EXTERNAL_THRESHOLD or sys.byteorder != "little":
            return self(tensor_from_array(a, name))
        a = np.ascontiguousarray(a)
        return self._append(a.reshape(-1).view(np.uint8).data, a.nbytes, name, onnx_type(a.dtype), a.shape)

    def _append(self, data, length: int, name: str, data_type: int, dims) -> onnx.TensorProto:
        """Writes a tensor's bytes at the end of the file; the tensor that refers to them."""
        try:
            self._file.write(data)
        except OSError as exc:
            raise ModelFileError(f"{self.path}: cannot write ({exc.strerror})") from None
        out = onnx.TensorProto(name=name, data_type=data_type, dims=dims)
        _set_location(out, self.LOCATION, self.size, length)
        self.size += length
        self.names.add(name)
        return out

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def discard(self) -> None:
        self.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def _place_external_data(model: onnx.ModelProto, in_dir: str, out_file: str, staged: _Staged,
                         new: frozenset = frozenset()) -> bool:
    """Makes the data files of ``model`` (read from ``in_dir``) available beside ``out_file``,
    rewriting a tensor's location where it cannot keep its relative path; whether it rewrote one.
    The tensors named in ``new`` (a spill's) are left to the caller."""
    out_dir = os.path.dirname(out_file)
    if os.path.realpath(in_dir) == out_dir:
        return False
    replaceable = _data_of_replaced_output(out_file)
    placed: dict[str, str] = {}
    for t in external_tensors(model):
        if t.name in new:
            continue
        for e in t.external_data:
            if e.key != "location":
                continue
            loc = e.value
            if loc not in placed:
                placed[loc] = _place_one(os.path.join(in_dir, loc), loc, out_file, staged, replaceable)
            e.value = placed[loc]
    return any(new != old for old, new in placed.items())


def _same_data(src: str, dst: str) -> bool:
    """``dst`` is ``src`` or a copy made by an earlier run (its size and time kept)."""
    if os.path.samefile(src, dst):
        return True
    a, b = os.stat(src), os.stat(dst)
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns


def _place_one(src: str, loc: str, out_file: str, staged: _Staged, replaceable: set) -> str:
    """A copy of ``src`` beside ``out_file``; its location relative to it."""
    out_dir = os.path.dirname(out_file)
    parts = os.path.normpath(loc).split(os.sep)
    rel = loc if not os.path.isabs(loc) and ".." not in parts else os.path.basename(loc)
    for candidate in (rel, f"{os.path.basename(out_file)}.{os.path.basename(loc)}"):
        dst = os.path.join(out_dir, candidate)
        if os.path.exists(dst) and _same_data(src, dst):
            return candidate
        if os.path.isdir(os.path.dirname(dst)) and (not os.path.exists(dst) or candidate in replaceable):
            break
    else:
        raise ModelFileError(f"{staged.shown}: cannot place the data file '{loc}' beside it: "
                             f"{os.path.join(out_dir, rel)} exists and is another file")
    tmp = staged.new(dst)
    mode = os.stat(tmp).st_mode & 0o777
    shutil.copy2(src, tmp)  # its time kept, so that a later run sees the copy as one
    os.chmod(tmp, mode)
    return candidate


def data_locations(model: onnx.ModelProto) -> set:
    return {e.value for t in external_tensors(model) for e in t.external_data if e.key == "location"}


def _data_of_replaced_output(out_file: str) -> set:
    """The data files of the model at ``out_file`` that the new output replaces (none if it is
    not a model): files the new output may overwrite."""
    if not os.path.isfile(out_file):
        return set()
    try:
        return data_locations(onnx.load(out_file, load_external_data=False))
    except Exception:  # noqa: BLE001 - not a model: its neighbours are not its data
        return set()


def _new_data_name(model: onnx.ModelProto, out_file: str) -> str:
    """A data file name beside ``out_file`` that the model does not use and that holds nothing
    but, at most, the data of the output being replaced."""
    used = data_locations(model)
    replaceable = _data_of_replaced_output(out_file) - used
    out_dir, base = os.path.dirname(out_file), os.path.basename(out_file)
    names = [f"{base}.data"] + [f"{base}.moefuse{n if n > 1 else ''}.data" for n in range(1, 100)]
    for name in names:
        if name not in used and (name in replaceable or not os.path.exists(os.path.join(out_dir, name))):
            return name
    raise ModelFileError(f"{out_file}: no free name for its new data file ({names[0]} and "
                         f"{len(names) - 1} others exist)")


def save(model: onnx.ModelProto, out_path: str, in_path: str, spill: Optional[Spill] = None) -> None:
    """Write ``model`` to ``out_path`` atomically, keeping external data external; the tensors
    ``spill`` holds go to the output's new data file."""
    out_file = output_file(out_path)
    in_dir = os.path.dirname(os.path.abspath(in_path))
    staged = _Staged(out_path)
    spilled = spill is not None and spill.size > 0
    try:
        spill_names = frozenset(spill.names) if spilled else frozenset()
        _place_external_data(model, in_dir, out_file, staged, spill_names)
        has_external = any(True for _ in external_tensors(model))
        big_new = [t for t in model.graph.initializer
                   if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > _EXTERNAL_THRESHOLD]
        if spilled or (big_new and (has_external or model.ByteSize() > (3 << 29))):
            data_name = _new_data_name(model, out_file)
            data_file = os.path.join(os.path.dirname(out_file), data_name)
            offset = 0
            if spilled:  # the spill's file becomes the data file; the rest follows it
                spill.close()
                staged.adopt(spill.path, data_file)
                for t in external_tensors(model):
                    if t.name in spill_names:
                        for e in t.external_data:
                            if e.key == "location":
                                e.value = data_name
                offset = spill.size
            with open(spill.path if spilled else staged.new(data_file, ".data"), "ab") as f:
                for t in big_new:
                    raw = t.raw_data
                    f.write(raw)
                    _set_location(t, data_name, offset, len(raw))
                    offset += len(raw)
        with open(staged.new(out_file, ".onnx"), "wb") as f:
            f.write(model.SerializeToString())
        staged.commit()
    except OSError as exc:
        raise ModelFileError(f"{out_path}: cannot write ({exc.strerror})") from None
    finally:
        staged.discard()


def copy_unchanged(model: onnx.ModelProto, in_path: str, out_path: str) -> None:
    """The output of a model with nothing to convert: the input's bytes, and its data files
    beside the output. (Where a data file cannot keep its relative path, ``model``, the input
    loaded, is written with the new one.)"""
    out_file = output_file(out_path)
    if os.path.realpath(in_path) == out_file:
        return
    staged = _Staged(out_path)
    try:
        relocated = _place_external_data(model, os.path.dirname(os.path.abspath(in_path)), out_file, staged)
        tmp = staged.new(out_file, ".onnx")
        if relocated:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        else:
            shutil.copyfile(in_path, tmp)
        staged.commit()
    except OSError as exc:
        raise ModelFileError(f"{out_path}: cannot write ({exc.strerror})") from None
    finally:
        staged.discard()
