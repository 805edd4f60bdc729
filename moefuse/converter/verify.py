"""Running a candidate block on its own: extract it with its weights, feed random inputs.

One extraction and one onnxruntime session per block serve every candidate output: all of them
are graph outputs of the extracted model. Weights are handed to onnxruntime as external
initializers backed by the arrays the lifter reads, so each weight is in memory once.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..runtime import run
from .graph import GraphIndex, np_dtype
from .lift import Probe, probe_shapes
from .region import Candidate

# Initializers above this many bytes are passed to onnxruntime as arrays, not in the proto.
_SHARE_BYTES = 1 << 16


def extract_block(g: GraphIndex, cand: Candidate, ends: list[str]):
    """(model, {name: array}) computing ends + logits from the block input."""
    nodes = sorted(g.ancestors(list(ends) + [cand.logits], stop=[cand.x]))
    needed = {i for n in nodes for i in g.nodes[n].input if i in g.initializers}
    inits, shared = [], {}
    for name in sorted(needed):
        init = g.initializers[name]
        size = int(np.prod(init.dims, dtype=np.int64))
        if init.data_location == onnx.TensorProto.EXTERNAL or size * 4 > _SHARE_BYTES:
            stub = onnx.TensorProto(name=name, data_type=init.data_type, dims=init.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            entry = stub.external_data.add()
            entry.key, entry.value = "location", "moefuse-shared-array"
            inits.append(stub)
            shared[name] = g.read_initializer(name)
        else:
            inits.append(init)
    x_type = g.dtypes.get(cand.x, onnx.TensorProto.FLOAT)
    outputs = [helper.make_tensor_value_info(t, g.dtypes.get(t, 0), None)
               for t in list(ends) + [cand.logits]]
    graph = helper.make_graph([g.nodes[i] for i in nodes], "moe_block",
                              [helper.make_tensor_value_info(cand.x, x_type, g.shapes.get(cand.x))],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=list(g.model.opset_import),
                              ir_version=g.model.ir_version)
    model.functions.extend(g.model.functions)
    return model, shared


def probe_block(g: GraphIndex, cand: Candidate, ends: list[str], seed: int = 0):
    """Run the block on random inputs of several token counts: {end: [Probe, ...]}."""
    model, shared = extract_block(g, cand, ends)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False  # give probe intermediates back between runs
    names = list(shared)
    so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(
        np.ascontiguousarray(shared[n])) for n in names])
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    x_shape = g.shapes.get(cand.x) or ("T", cand.hidden)
    dtype = np_dtype(g.dtypes.get(cand.x, onnx.TensorProto.FLOAT))
    out = {end: [] for end in ends}
    for shape in probe_shapes(x_shape, cand.experts, cand.hidden):
        x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        *ys, logits = run(sess, {cand.x: x})
        for end, y in zip(ends, ys):
            out[end].append(Probe(x=x, logits=logits, y=y))
    return out
