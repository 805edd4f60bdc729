"""Public builder: put MoEFFN nodes into models, with their fallback functions.

``add_moeffn`` adds one node to a model (validated against the shapes the model declares) and
``attach_functions`` (called by it) keeps the model-local functions in step with the MoEFFN
nodes: one function per node configuration, distinguished by overload when a model mixes them.
``make_moeffn_model`` builds a self-contained one-node model from numpy arrays (tests, benchmarks,
examples).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import spec
from .function import MIN_OPSET, build_function, config_key, opset_of
from .spec import ACTIVATION_INPUTS, DOMAIN, INPUT_INDEX, INPUT_NAMES, OP_TYPE, MoEFFNAttrs, MoEFFNError



def node_inputs(inputs: Mapping[str, str]) -> list[str]:
    """Positional input list for a node from ``{input name: tensor name}``; absent ones are ''."""
    for name in inputs:
        if name not in INPUT_INDEX:
            raise MoEFFNError(f"MoEFFN: unknown input '{name}' (inputs: {', '.join(INPUT_NAMES)})")
    last = max((INPUT_INDEX[n] for n, v in inputs.items() if v), default=0)
    return [inputs.get(n) or "" for n in INPUT_NAMES[: last + 1]]


def make_node(inputs: Mapping[str, str], output: str, attrs: MoEFFNAttrs,
              name: str = "") -> onnx.NodeProto:
    attrs.check(name)
    return helper.make_node(OP_TYPE, node_inputs(inputs), [output], name=name or None,
                            domain=DOMAIN, **attrs.to_onnx())


def attrs_of(node: onnx.NodeProto) -> MoEFFNAttrs:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return MoEFFNAttrs.from_onnx(values, node.name)


def present_inputs(node: onnx.NodeProto) -> list[str]:
    return [INPUT_NAMES[i] for i, v in enumerate(node.input) if v]


def iter_moeffn_nodes(graph: onnx.GraphProto):
    """The graph's MoEFFN nodes, those of its subgraphs included."""
    for node in graph.node:
        if node.op_type == OP_TYPE and node.domain == DOMAIN:
            yield node
        for attr in node.attribute:  # nodes inside If/Loop/Scan bodies
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_moeffn_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_moeffn_nodes(g)


def attach_functions(model: onnx.ModelProto) -> None:
    """Rebuild the model-local MoEFFN functions so that each node has the body it needs.

    Also makes sure the model imports the moefuse domain and a default opset the body can use.
    """
    opset = opset_of(model)
    if opset is None or opset < MIN_OPSET:
        raise MoEFFNError(f"the model imports opset {opset}; MoEFFN's fallback function needs "
                          f"opset >= {MIN_OPSET} (upgrade the model with "
                          f"onnx.version_converter first)")
    nodes = list(iter_moeffn_nodes(model.graph))
    configs: dict[str, tuple[MoEFFNAttrs, list[str]]] = {}
    node_keys = []
    for node in nodes:
        attrs, present = attrs_of(node), present_inputs(node)
        key = config_key(attrs, present)
        configs.setdefault(key, (attrs, present))
        node_keys.append(key)
    overloaded = len(configs) > 1
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name == OP_TYPE)]
    del model.functions[:]
    model.functions.extend(keep)
    for key, (attrs, present) in configs.items():
        model.functions.append(build_function(attrs, present, opset,
                                              overload=f"c{key}" if overloaded else ""))
    for node, key in zip(nodes, node_keys):
        node.overload = f"c{key}" if overloaded else ""
    if nodes and not any(i.domain == DOMAIN for i in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, spec.VERSION))
    if overloaded and model.ir_version < 10:
        model.ir_version = 10  # function overloads arrived with IR version 10


# onnxruntime runs a node's function overload from this version; before it, every node of a
# function's name and domain runs one of the overloads (measured: 1.20 to 1.26 do, 1.27 does not).
ORT_OVERLOADS_FROM = "1.27"


def overload_note(model: onnx.ModelProto) -> str:
    """A warning for models whose MoEFFN nodes need more than one fallback function ("" if not):
    without moefuse's library, only onnxruntime >= ORT_OVERLOADS_FROM runs them right."""
    count = sum(1 for f in model.functions if f.domain == DOMAIN and f.name == OP_TYPE and f.overload)
    if count < 2:
        return ""
    return (f"{count} MoEFFN configurations: their fallback functions are overloads, which "
            f"onnxruntime honors from {ORT_OVERLOADS_FROM}; an older onnxruntime without moefuse's "
            f"library would run one configuration's function for every node (wrong results)")


def declared_shapes(model: onnx.ModelProto):
    """``{tensor name: (shape or None, numpy dtype)}`` for what the model declares."""
    out = {}
    for init in model.graph.initializer:
        out[init.name] = (tuple(init.dims), helper.tensor_dtype_to_np_dtype(init.data_type))
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if not t.elem_type:
            continue
        shape = None
        if t.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        out.setdefault(vi.name, (shape, helper.tensor_dtype_to_np_dtype(t.elem_type)))
    return out


def validate_node(model: onnx.ModelProto, node: onnx.NodeProto, known=None) -> spec.MoEFFNShape:
    """Validate one MoEFFN node against the shapes and types the model declares."""
    known = declared_shapes(model) if known is None else known
    shapes, dtypes = {}, {}
    for name, tensor in zip(INPUT_NAMES, node.input):
        if not tensor:
            continue
        if tensor not in known:
            raise MoEFFNError(f"MoEFFN node '{node.name}': input '{name}' refers to tensor "
                              f"'{tensor}' whose shape and type the model does not declare "
                              f"(run onnx.shape_inference first)")
        shapes[name], dtypes[name] = known[tensor]
        if shapes[name] is None:
            raise MoEFFNError(f"MoEFFN node '{node.name}': input '{name}' ('{tensor}') has no "
                              f"declared rank")
    return spec.validate(attrs_of(node), shapes, dtypes, node.name)


def add_moeffn(model: onnx.ModelProto, inputs: Mapping[str, str], output: str,
               attrs: MoEFFNAttrs, name: str = "") -> onnx.NodeProto:
    """Append a validated MoEFFN node to ``model.graph`` and attach its fallback function."""
    node = make_node(inputs, output, attrs, name)
    validate_node(model, node)
    model.graph.node.append(node)
    attach_functions(model)
    return node


_NP_TO_ONNX = {
    np.dtype("float32"): TensorProto.FLOAT,
    np.dtype("float16"): TensorProto.FLOAT16,
    np.dtype("int64"): TensorProto.INT64,
    np.dtype("int32"): TensorProto.INT32,
}


def onnx_type(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16":
        return TensorProto.BFLOAT16
    return _NP_TO_ONNX[dtype]


def tensor_from_array(array: np.ndarray, name: str) -> onnx.TensorProto:
    if array.dtype.name == "bfloat16":  # numpy_helper does not know ml_dtypes' bfloat16
        t = helper.make_tensor(name, TensorProto.BFLOAT16, array.shape,
                               array.view(np.uint16).tobytes(), raw=True)
        return t
    return numpy_helper.from_array(array, name)


def make_moeffn_model(attrs: MoEFFNAttrs, arrays: Mapping[str, Optional[np.ndarray]],
                      opset: int = MIN_OPSET, name: str = "moeffn",
                      symbolic_tokens: bool = True, ir_version: int = 10) -> onnx.ModelProto:
    """A one-node model: per-call inputs as graph inputs, the rest as initializers.

    The token dims of X (and of router_logits / topk_*) are symbolic unless
    ``symbolic_tokens=False``, so one model serves every T.
    """
    arrays = {n: a for n, a in arrays.items() if a is not None}
    graph_inputs, initializers = [], []
    for n, a in arrays.items():
        if n in ACTIVATION_INPUTS:
            shape = list(a.shape)
            if symbolic_tokens:
                lead = ["B", "S"] if len(shape) == 3 else ["T"]
                shape = lead[: len(shape) - 1] + shape[-1:]
            graph_inputs.append(helper.make_tensor_value_info(n, onnx_type(a.dtype), shape))
        else:
            initializers.append(tensor_from_array(a, n))
    x = arrays["X"]
    y_shape = (["B", "S"] if x.ndim == 3 else ["T"]) + [x.shape[-1]] if symbolic_tokens else list(x.shape)
    graph = helper.make_graph([], name, graph_inputs,
                              [helper.make_tensor_value_info("Y", onnx_type(x.dtype), y_shape)],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=ir_version, producer_name="moefuse")
    add_moeffn(model, {n: n for n in arrays}, "Y", attrs, name=name)
    return model
