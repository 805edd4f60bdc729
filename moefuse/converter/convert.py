"""Convert a model: find candidates, lift and verify each, rewrite the ones that verified."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import helper

from ..builder import attach_functions, make_node
from ..function import MIN_OPSET, opset_of
from ..spec import MoEFFNAttrs, validate_arrays
from . import ort_ingest, ort_target
from .graph import GraphIndex, outer_reads
from .io import Spill
from .lift import (Hypothesis, Refusal, _scalars, block_constants, check, hypotheses, matches,
                   precheck, region_nodes)
from .region import Candidate, NearMiss, find_candidates
from .relayout import out_in_reading
from .verify import cover_experts, probe_block

MAX_HYPOTHESES = 4000


@dataclass
class Block:
    """One MoE block found in a model: lifted and verified, or refused (a near miss)."""

    name: str
    converted: bool
    reason: str = ""
    attrs: Optional[MoEFFNAttrs] = None
    experts: int = 0
    hidden: int = 0
    inter: int = 0
    x: str = ""
    logits: str = ""
    output: str = ""
    nodes_removed: int = 0
    weights_reused: int = 0
    weights_relaid: int = 0
    max_error: Optional[float] = None
    experts_unreached: list = field(default_factory=list)  # no probe token was routed to them
    traits: list = field(default_factory=list)
    dtype: str = "float32"
    emitted: str = ""       # the op written for the block: moefuse.MoEFFN or com.microsoft.MoE
    target_note: str = ""   # with --target ort: why the block stayed MoEFFN
    layout_note: str = ""   # with weight_layout="out_in": why the block's weights stayed in_out
    # private to the rewrite
    _hypothesis: Optional[Hypothesis] = field(default=None, repr=False)
    _region: list = field(default_factory=list, repr=False)
    _flatten_output: bool = field(default=False, repr=False)

    def count_weights(self, h: Hypothesis) -> None:
        """Weights of reading ``h`` reused as stored, and re-laid out into new tensors."""
        self.weights_reused = sum(1 for op in h.operands.values() if op.reused)
        self.weights_relaid = len(h.operands) - self.weights_reused

    def to_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}
        out["attrs"] = None if self.attrs is None else dataclasses.asdict(self.attrs)
        return out


def traits_of(attrs: MoEFFNAttrs, operands) -> list[str]:
    t = [attrs.routing + ("" if attrs.routing in ("topk_softmax", "precomputed", "sparsemixer")
                          else ("+norm" if attrs.normalize_topk else ""))]
    t.append(f"k={attrs.k}")
    if attrs.routing == "sparsemixer":
        t.append(f"eps {attrs.jitter_eps:g}")
    if attrs.n_group > 1:
        t.append(f"groups {attrs.topk_group}/{attrs.n_group} by {attrs.group_score}")
    if "selection_bias" in operands:
        t.append("selection bias")
    if attrs.zero_experts:
        t.append(f"{attrs.zero_experts} zero experts")
    if attrs.routed_scaling_factor != 1.0:
        t.append(f"scale {attrs.routed_scaling_factor:g}")
    act = attrs.activation + ("" if attrs.activation_alpha == 1.0 else f"(α={attrs.activation_alpha:g})")
    t.append(f"{'gated ' + act + ' ' + attrs.gate_up_layout if attrs.gated else act}")
    if attrs.clamp_limit:
        t.append(f"clamp {attrs.clamp_limit:g}")
    if attrs.up_offset:
        t.append(f"up+{attrs.up_offset:g}")
    if "b1" in operands or "b2" in operands:
        t.append("expert biases")
    if "shared_w1" in operands:
        t.append("shared expert" + (" (gated)" if "shared_gate" in operands else ""))
    if attrs.weight_on_input:
        t.append("weight on input")
    return t


def lift_candidate(g: GraphIndex, cand: Candidate) -> Block:
    """Try the candidate's possible outputs, latest first; return the first that verifies."""
    reasons = []
    refusal = precheck(g, cand)  # e.g. a traced expert loop, which may not even run
    if refusal:
        return Block(name=cand.name, converted=False, reason=refusal, x=cand.x,
                     logits=cand.logits, experts=cand.experts, hidden=cand.hidden or 0)
    try:
        all_probes, runner = probe_block(g, cand, cand.ends)
    except Exception as exc:  # noqa: BLE001 - a block that does not run on its own
        return Block(name=cand.name, converted=False, x=cand.x, logits=cand.logits,
                     experts=cand.experts, hidden=cand.hidden or 0,
                     reason=f"the block does not run on its own ({_short(exc)})")
    for end in cand.ends:
        nodes = region_nodes(g, cand, end)
        probes = all_probes[end]
        if probes[0].y.size != probes[0].x.size:
            reasons.append((end, "output size differs from the block input's"))
            continue
        scales = [s for s in _scalars(block_constants(g, nodes)) if s > 0]
        best = None
        tried = 0
        try:
            for h in hypotheses(g, cand, nodes):
                tried += 1
                if tried > MAX_HYPOTHESES:
                    break
                ok, detail, h2 = check(h, probes, scales)
                if ok:
                    # Probes reach the experts the router favours; steer more tokens to the
                    # others, which this reading must match too.
                    extra, unreached = cover_experts(h2, probes, runner, end, cand.experts)
                    probes = probes + extra
                    if extra and not matches(h2, extra)[0]:
                        continue
                    best = (h2, detail, unreached)
                    break
        except Refusal as exc:
            reasons.append(("", str(exc)))  # about the block, whatever the end
            continue
        if best is None:
            reasons.append((end, f"none of {tried} readings of the block matches its output "
                                 f"when run"))
            continue
        h, detail, unreached = best
        arrays = {n: op.array() for n, op in h.operands.items()}
        size = validate_arrays(h.attrs, {"X": probes[0].x, "router_logits": probes[0].logits,
                                         **arrays})
        err = max(_rel_err(h, p, arrays) for p in probes)
        block = Block(name=cand.name, converted=True, attrs=h.attrs, experts=size.experts,
                      hidden=size.hidden, inter=size.inter, x=cand.x, logits=cand.logits,
                      output=end, max_error=err, traits=traits_of(h.attrs, h.operands),
                      experts_unreached=unreached, _hypothesis=h, _region=nodes)
        block.count_weights(h)
        block._flatten_output = probes[0].y.ndim != probes[0].x.ndim
        block.dtype = np.dtype(probes[0].x.dtype).name
        for op in h.operands.values():
            op.ref.release()  # the rewrite re-reads only what it re-lays out
        return block
    return Block(name=cand.name, converted=False, reason=_near_miss_reason(reasons),
                 x=cand.x, logits=cand.logits, experts=cand.experts, hidden=cand.hidden or 0)


def _near_miss_reason(reasons: list[tuple[str, str]]) -> str:
    """Each distinct reason once (the candidate ends often fail alike), after the ends that
    gave it where it is about an end."""
    ends: dict[str, list[str]] = {}
    for end, reason in reasons:
        ends.setdefault(reason, []).append(end)
    return "; ".join(f"{', '.join(x for x in e if x)}: {reason}" if any(e) else reason
                     for reason, e in ends.items()) or "no candidate output"


def _rel_err(h, p, arrays) -> float:
    from ..reference import moeffn

    ref = moeffn(h.attrs, p.x, p.logits, **arrays).astype(np.float32)
    y = p.y.reshape(ref.shape).astype(np.float32)
    return float(np.max(np.abs(ref - y)) / (np.max(np.abs(y)) + 1e-30)) if y.size else 0.0


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:200]


def analyze(model: onnx.ModelProto, base_dir: str = "",
            progress: Optional[Callable[[str], None]] = None) -> tuple[GraphIndex, list[Block]]:
    """Find and verify every MoE block; the model is not changed."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - keep going with the declared shapes
        inferred = model
    g = GraphIndex(inferred, base_dir)
    blocks = []
    found = list(find_candidates(g))
    for n, cand in enumerate(found):
        if isinstance(cand, NearMiss):
            if cand.blocking:
                blocks.append(Block(name=cand.where, converted=False, reason=cand.reason))
            continue
        if progress:
            progress(f"block {n + 1}/{len(found)}: {cand.name}")
        blocks.append(lift_candidate(g, cand))
        g.release_arrays()  # keep one block's weights in memory at a time
    for i, node in ort_ingest.ort_moe_nodes(g):
        if progress:
            progress(f"com.microsoft.MoE node {node.name or i}")
        blocks.append(ingest_ort_node(g, i, node))
        g.release_arrays()
    for i, node, reason in ort_ingest.quantized_moe_nodes(g):
        blocks.append(Block(name=node.name or f"com.microsoft.QMoE#{i}", converted=False,
                            reason=reason, x=node.input[0], logits=node.input[1]))
    return g, blocks


def ingest_ort_node(g: GraphIndex, i: int, node: onnx.NodeProto) -> Block:
    """A com.microsoft.MoE node read as MoEFFN and verified by running it."""
    name = node.name or f"com.microsoft.MoE#{i}"
    try:
        h, probes, experts, hidden = ort_ingest.lift_node(g, i, node)
    except Refusal as exc:
        return Block(name=name, converted=False, reason=f"com.microsoft.MoE: {exc}",
                     x=node.input[0], logits=node.input[1])
    arrays = {n: op.array() for n, op in h.operands.items()}
    size = validate_arrays(h.attrs, {"X": probes[0].x, "router_logits": probes[0].logits,
                                     **arrays})
    block = Block(name=name, converted=True, attrs=h.attrs, experts=experts, hidden=hidden,
                  inter=size.inter, x=node.input[0], logits=node.input[1],
                  output=node.output[0], max_error=max(_rel_err(h, p, arrays) for p in probes),
                  traits=["from com.microsoft.MoE"] + traits_of(h.attrs, h.operands),
                  dtype=np.dtype(probes[0].x.dtype).name, _hypothesis=h, _region=[i])
    block.weights_reused = sum(1 for op in h.operands.values() if op.reused)
    for op in h.operands.values():
        op.ref.release()
    return block


def rewrite(model: onnx.ModelProto, g: GraphIndex, blocks: list[Block],
            target: str = "moefuse", weight_layout: str = "as-found",
            store: Optional[Spill] = None) -> onnx.ModelProto:
    """Replace every converted block by one MoEFFN node (``target="moefuse"``) or, where the
    block fits it, by onnxruntime's com.microsoft.MoE (``target="ort"``). Unrelated nodes are
    untouched. ``weight_layout="out_in"`` stores MoEFFN nodes' in_out weights transposed
    (relayout.py). ``store`` (io.Spill) takes each new tensor as it is made and writes it to
    disk: a TensorProto (``store(t)``), or a re-laid weight straight from its array
    (``store.array(a, name)``, no serialized copy); the block's arrays are released after its
    node, so only one block's are in memory."""
    from ..builder import tensor_from_array

    keep = store or (lambda t: t)
    new_tensor = store.array if store is not None else tensor_from_array
    opset = opset_of(model)
    if opset is None or opset < MIN_OPSET:
        raise Refusal(f"the model imports opset {opset}; converted models need opset >= "
                      f"{MIN_OPSET} for the embedded MoEFFN function")
    nodes = list(g.nodes)
    replace: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    used_names = set(g.producer) | set(g.initializers) | g.graph_inputs
    checked: dict = {}  # ort target: what this onnxruntime runs, by configuration
    for b in blocks:
        if not b.converted:
            continue
        h = b._hypothesis
        if target == "ort":
            b.target_note = ort_target.fit(h.attrs, h.operands, b.dtype) or ort_target.runs_here(
                h.attrs, frozenset(h.operands), b.dtype, checked)
            if not b.target_note:
                name = _unique(f"{b.name or 'moe'}/MoE", used_names)
                arrays = {n: op.array() for n, op in h.operands.items()}
                new_nodes, inits = ort_target.emit(name, h.attrs, b.x, b.logits, b.output,
                                                   arrays, lambda t: _unique(t, used_names))
                new_inits.extend(keep(t) for t in inits)
                b.emitted = f"{ort_target.ORT_DOMAIN}.{ort_target.ORT_OP}"
                b.weights_reused, b.weights_relaid = 0, len(inits)
                del arrays, inits  # this block's, before the next block's are made
                for op in h.operands.values():
                    op.ref.release()
                g.release_arrays()
                producer = g.producer[b.output]
                replace[producer] = new_nodes
                dead = _dead_after(g, set(b._region), producer, keep_inputs={b.x, b.logits})
                removed |= dead
                b.nodes_removed = len(dead)
                continue
        b.emitted = "moefuse.MoEFFN"
        if weight_layout == "out_in":
            relaid, b.layout_note = out_in_reading(g, h, b._region)
            if relaid is not None:
                h = b._hypothesis = relaid
                b.attrs = h.attrs
                b.count_weights(h)
        node_name = _unique(f"{b.name or 'moe'}/MoEFFN", used_names)
        inputs = {"X": b.x}
        if h.attrs.routing != "precomputed":
            inputs["router_logits"] = b.logits
        for name, op in h.operands.items():
            if op.reused:
                inputs[name] = op.ref.tensor
            else:
                tensor_name = _unique(f"{node_name}.{name}", used_names)
                new_inits.append(new_tensor(op.array(), tensor_name))
                op.ref.release()
                inputs[name] = tensor_name
        g.release_arrays()
        out = b.output
        new_nodes = []
        if b._flatten_output:
            tmp = _unique(f"{node_name}/Y", used_names)
            new_nodes.append(make_node(inputs, tmp, h.attrs, node_name))
            new_nodes.append(helper.make_node("Flatten", [tmp], [out], axis=-1,
                                              name=f"{node_name}/Flatten"))
        else:
            new_nodes.append(make_node(inputs, out, h.attrs, node_name))
        producer = g.producer[out]
        replace[producer] = new_nodes
        region = set(b._region)
        dead = _dead_after(g, region, producer, keep_inputs=set(inputs.values()))
        removed |= dead
        b.nodes_removed = len(dead)
    out_nodes = []
    for i, node in enumerate(nodes):
        if i in replace:
            out_nodes.extend(replace[i])
        elif i not in removed:
            out_nodes.append(node)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(out_nodes)
    consumed = {t for n in out_nodes for t in [*n.input, *outer_reads(n)]} | g.graph_outputs
    kept = [t for t in result.graph.initializer if t.name in consumed or t.name in g.graph_inputs]
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept)
    result.graph.initializer.extend(new_inits)
    produced = {o for n in out_nodes for o in n.output}
    kept_vi = [v for v in result.graph.value_info if v.name in produced]
    del result.graph.value_info[:]
    result.graph.value_info.extend(kept_vi)
    if any(b.emitted.startswith(ort_target.ORT_DOMAIN) for b in blocks) and not any(
            i.domain == ort_target.ORT_DOMAIN for i in result.opset_import):
        result.opset_import.append(helper.make_opsetid(ort_target.ORT_DOMAIN, 1))
    attach_functions(result)
    return result


def _dead_after(g: GraphIndex, region: set[int], producer: int, keep_inputs: set[str]) -> set[int]:
    """Region nodes left with no consumer once ``producer`` is replaced."""
    dead = {producer}
    changed = True
    while changed:
        changed = False
        for i in sorted(region, reverse=True):
            if i in dead:
                continue
            outs = [o for o in g.nodes[i].output if o]
            if any(o in g.graph_outputs or o in keep_inputs for o in outs):
                continue
            if all(c in dead for o in outs for c in g.consumers.get(o, [])):
                dead.add(i)
                changed = True
    return dead


def _unique(name: str, used: set) -> str:
    out, n = name, 1
    while out in used:
        n += 1
        out = f"{name}_{n}"
    used.add(out)
    return out
