"""A read-only index over an ONNX graph: producers, consumers, constants, shapes.

The converter works on the protobuf directly: weights in external data stay where they are and
are read only for the blocks being verified (see docs/converter.md for why not a full IR).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops that move or reinterpret data without computing on it.
SHAPE_ONLY_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Transpose",
                  "Expand"}


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """The names a node's subgraphs (If, Loop, Scan bodies) read from the enclosing graph: its
    inputs no less than ``node.input``."""
    reads: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sg in graphs:
            local = ({v.name for v in sg.input} | {t.name for t in sg.initializer}
                     | {o for n in sg.node for o in n.output})
            inner = {i for n in sg.node for i in n.input if i}
            for n in sg.node:
                inner |= outer_reads(n)
            reads |= inner - local
    return reads


class GraphIndex:
    def __init__(self, model: onnx.ModelProto, base_dir: str = ""):
        self.model = model
        self.graph = model.graph
        self.base_dir = base_dir
        self.nodes = list(self.graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        # what each node reads: its inputs, then what its subgraphs read from this graph
        self.reads: list[list[str]] = []
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            self.reads.append([t for t in dict.fromkeys([*node.input, *sorted(outer_reads(node))]) if t])
            for inp in self.reads[i]:
                self.consumers[inp].append(i)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = {v.name for v in self.graph.input} - set(self.initializers)
        self.graph_outputs = {v.name for v in self.graph.output}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, int] = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            t = vi.type.tensor_type
            if t.elem_type:
                self.dtypes[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[vi.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in t.shape.dim)
        for name, init in self.initializers.items():
            self.shapes[name] = tuple(init.dims)
            self.dtypes[name] = init.data_type
        self._const_cache: dict[str, Optional[np.ndarray]] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._is_const: dict[str, bool] = {}

    # ---- structure ----
    def node_of(self, tensor: str) -> Optional[onnx.NodeProto]:
        i = self.producer.get(tensor)
        return None if i is None else self.nodes[i]

    def users(self, tensor: str) -> list[onnx.NodeProto]:
        return [self.nodes[i] for i in self.consumers.get(tensor, [])]

    def is_constant(self, tensor: str) -> bool:
        """True for initializers, Constant outputs and anything computed from constants only."""
        if not tensor:
            return True
        if tensor in self._is_const:
            return self._is_const[tensor]
        self._is_const[tensor] = False  # guards cycles
        if tensor in self.initializers:
            result = tensor not in self.graph_inputs
        elif tensor in self.graph_inputs:
            result = False
        else:
            node = self.node_of(tensor)
            result = node is not None and all(self.is_constant(i)
                                              for i in self.reads[self.producer[tensor]])
            if node is not None and node.op_type in ("RandomNormal", "RandomUniform",
                                                     "RandomNormalLike", "RandomUniformLike"):
                result = False
        self._is_const[tensor] = result
        return result

    def ancestors(self, tensors: Iterable[str], stop: Iterable[str] = ()) -> set[int]:
        """Indices of nodes that the tensors depend on, not walking past ``stop`` tensors."""
        stop = set(stop)
        seen: set[int] = set()
        stack = [t for t in tensors if t not in stop]
        while stack:
            t = stack.pop()
            i = self.producer.get(t)
            if i is None or i in seen:
                continue
            seen.add(i)
            stack.extend(x for x in self.reads[i] if x not in stop)
        return seen

    def descendants(self, tensors: Iterable[str]) -> set[int]:
        seen: set[int] = set()
        stack = list(tensors)
        while stack:
            t = stack.pop()
            for i in self.consumers.get(t, []):
                if i not in seen:
                    seen.add(i)
                    stack.extend(o for o in self.nodes[i].output if o)
        return seen

    def sources(self, tensor: str, stop: Iterable[str]) -> set[str]:
        """Non-constant tensors with no producer (graph inputs) that ``tensor`` depends on,
        walking no further than the ``stop`` tensors."""
        stop = set(stop)
        found: set[str] = set()
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            t = stack.pop()
            if not t or t in seen:
                continue
            seen.add(t)
            if t in stop:
                found.add(t)
                continue
            if self.is_constant(t):
                continue
            i = self.producer.get(t)
            if i is None:
                found.add(t)
                continue
            stack.extend(self.reads[i])
        return found

    # ---- values ----
    def constant_value(self, tensor: str, max_elems: int = 1 << 16) -> Optional[np.ndarray]:
        """The value of a small constant tensor (initializer or Constant node), else None."""
        if tensor in self._const_cache:
            return self._const_cache[tensor]
        value = None
        if tensor in self.initializers and tensor not in self.graph_inputs:
            init = self.initializers[tensor]
            if int(np.prod(init.dims, dtype=np.int64)) <= max_elems:
                value = self.read_initializer(tensor)
        else:
            node = self.node_of(tensor)
            if node is not None and node.op_type == "Constant":
                value = _constant_node_value(node)
        self._const_cache[tensor] = value
        return value

    def read_initializer(self, name: str) -> np.ndarray:
        """An initializer's data, reading external data from disk when needed. Arrays are
        cached until :meth:`release_arrays`, so verifying a block reads its weights once."""
        if name not in self._arrays:
            init = self.initializers[name]
            if init.data_location == onnx.TensorProto.EXTERNAL:
                init = _load_external(init, self.base_dir)
            self._arrays[name] = to_array(init)
        return self._arrays[name]

    def release_arrays(self) -> None:
        self._arrays.clear()
        self._const_cache.clear()

    def rank(self, tensor: str) -> Optional[int]:
        s = self.shapes.get(tensor)
        return None if s is None else len(s)

    def topo_order(self) -> dict[int, int]:
        return {i: i for i in range(len(self.nodes))}  # ONNX graphs are stored sorted


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    if tensor.data_type == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        raw = numpy_helper.to_array(tensor)  # onnx returns bfloat16 data widened or as uint16
        if raw.dtype == np.uint16:
            return raw.view(ml_dtypes.bfloat16)
        return raw.astype(ml_dtypes.bfloat16)
    return numpy_helper.to_array(tensor)


def _constant_node_value(node: onnx.NodeProto) -> Optional[np.ndarray]:
    for a in node.attribute:
        if a.name == "value":
            return to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def _load_external(tensor: onnx.TensorProto, base_dir: str) -> onnx.TensorProto:
    """A copy of ``tensor`` with its external data read in (only this tensor's bytes)."""
    info = {e.key: e.value for e in tensor.external_data}
    path = os.path.join(base_dir, info["location"])
    offset = int(info.get("offset", 0))
    length = info.get("length")
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(int(length)) if length is not None else f.read()
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    del out.external_data[:]
    out.data_location = onnx.TensorProto.DEFAULT
    out.raw_data = data
    return out


def swapped_last_axes(a: np.ndarray, block: int = 256) -> np.ndarray:
    """A contiguous copy of ``a`` with its last two axes swapped (a stack of matrices transposed).

    Large stacks are copied in block x block tiles, whose reads and writes stay in cache: about
    2x (16-bit) to 7x (float32) faster than numpy's copy of the whole swapped view, on stacks of
    300 MB and 150 MB (this project's 2-core CPU)."""
    if a.ndim < 2 or a.size < (1 << 20):
        return np.ascontiguousarray(np.swapaxes(a, -1, -2))
    rows, cols = a.shape[-2:]
    stack = a.reshape((-1, rows, cols))
    out = np.empty((stack.shape[0], cols, rows), a.dtype)
    for m, o in zip(stack, out):
        for i in range(0, rows, block):
            for j in range(0, cols, block):
                o[j:j + block, i:i + block] = m[i:i + block, j:j + block].T
    return out.reshape(a.shape[:-2] + (cols, rows))


def np_dtype(elem_type: int):
    if elem_type == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return helper.tensor_dtype_to_np_dtype(elem_type)
