"""Running a candidate block on its own: extract it with its weights, feed random inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..runtime import run
from .graph import GraphIndex, _load_external, np_dtype
from .lift import Probe, probe_shapes
from .region import Candidate


def extract_block(g: GraphIndex, cand: Candidate, end: str) -> onnx.ModelProto:
    """A model computing (end, logits) from the block input, with the weights it reads."""
    nodes = sorted(g.ancestors([end, cand.logits], stop=[cand.x]))
    needed = {i for n in nodes for i in g.nodes[n].input if i in g.initializers}
    inits = []
    for name in sorted(needed):
        init = g.initializers[name]
        inits.append(_load_external(init, g.base_dir)
                     if init.data_location == onnx.TensorProto.EXTERNAL else init)
    x_type = g.dtypes.get(cand.x, onnx.TensorProto.FLOAT)
    x_shape = g.shapes.get(cand.x)
    graph = helper.make_graph(
        [g.nodes[i] for i in nodes], "moe_block",
        [helper.make_tensor_value_info(cand.x, x_type, x_shape)],
        [helper.make_tensor_value_info(end, g.dtypes.get(end, 0), None),
         helper.make_tensor_value_info(cand.logits, g.dtypes.get(cand.logits, 0), None)],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=list(g.model.opset_import),
                              ir_version=g.model.ir_version)
    model.functions.extend(g.model.functions)
    return model


def probes(g: GraphIndex, cand: Candidate, end: str, seed: int = 0) -> list[Probe]:
    model = extract_block(g, cand, end)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    x_shape = g.shapes.get(cand.x) or ("T", cand.hidden)
    dtype = np_dtype(g.dtypes.get(cand.x, onnx.TensorProto.FLOAT))
    out = []
    for shape in probe_shapes(x_shape, cand.experts, cand.hidden):
        x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        y, logits = run(sess, {cand.x: x})
        out.append(Probe(x=x, logits=logits, y=y))
    return out
