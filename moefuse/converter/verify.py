"""Running a candidate block on its own: extract it with its weights, feed random inputs.

One extraction and one onnxruntime session per block serve every candidate output: all of them
are graph outputs of the extracted model. Large weights are graph inputs of the extracted model,
fed on every run from the arrays the lifter reads, so each weight is in memory once: onnxruntime
copies initializers handed to it as external initializers (measured: onnxruntime 1.32 copied 864
MB of a block's weights at session creation), not the inputs it is fed. A weight the block
transposes stays an (external) initializer, so that onnxruntime folds the transpose once rather
than redoing it on every run.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..reference import route
from ..runtime import run
from .graph import GraphIndex, np_dtype
from .lift import Hypothesis, Probe, probe_shapes
from .region import Candidate

# Initializers above this many bytes are fed to onnxruntime as inputs, not held in the proto.
_SHARE_BYTES = 1 << 16
_EXTERNAL_INITIALIZER = "moefuse-shared-array"  # a stub's location: the array is handed over


def extract_block(g: GraphIndex, cand: Candidate, ends: list[str]):
    """(model, {name: array}) computing ends + logits from the block input; the arrays are graph
    inputs after the block input, or external initializers (their stubs' location is
    _EXTERNAL_INITIALIZER)."""
    nodes = sorted(g.ancestors(list(ends) + [cand.logits], stop=[cand.x]))
    needed = {i for n in nodes for i in g.reads[n] if i in g.initializers}
    inits, shared, weight_inputs = [], {}, []
    in_block = set(nodes)
    for name in sorted(needed):
        init = g.initializers[name]
        size = int(np.prod(init.dims, dtype=np.int64))
        transposed = any(g.nodes[i].op_type == "Transpose" for i in g.consumers.get(name, []) if i in in_block)
        if size * 4 > _SHARE_BYTES and not transposed:
            weight_inputs.append(helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
            shared[name] = g.read_initializer(name)
        elif size * 4 > _SHARE_BYTES or init.data_location == onnx.TensorProto.EXTERNAL:
            stub = onnx.TensorProto(name=name, data_type=init.data_type, dims=init.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            entry = stub.external_data.add()
            entry.key, entry.value = "location", _EXTERNAL_INITIALIZER
            inits.append(stub)
            shared[name] = g.read_initializer(name)
        else:
            inits.append(init)
    x_type = g.dtypes.get(cand.x, onnx.TensorProto.FLOAT)
    outputs = [helper.make_tensor_value_info(t, g.dtypes.get(t, 0), None)
               for t in list(ends) + [cand.logits]]
    graph = helper.make_graph([g.nodes[i] for i in nodes], "moe_block",
                              [helper.make_tensor_value_info(cand.x, x_type, g.shapes.get(cand.x))]
                              + weight_inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=list(g.model.opset_import),
                              ir_version=g.model.ir_version)
    model.functions.extend(g.model.functions)
    return model, shared


class BlockRunner:
    """The extracted block in one onnxruntime session: runs it on any tokens."""

    def __init__(self, g: GraphIndex, cand: Candidate, ends: list[str]):
        model, shared = extract_block(g, cand, ends)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = False  # give probe intermediates back between runs
        external = {t.name for t in model.graph.initializer if t.external_data
                    and t.external_data[0].value == _EXTERNAL_INITIALIZER}
        arrays = {n: np.ascontiguousarray(a) for n, a in shared.items()}
        so.add_external_initializers(sorted(external),
                                     [ort.OrtValue.ortvalue_from_numpy(arrays[n]) for n in sorted(external)])
        self.weights = {n: a for n, a in arrays.items() if n not in external}
        self.session = ort.InferenceSession(model.SerializeToString(), so,
                                            providers=["CPUExecutionProvider"])
        self.x, self.ends, self.hidden = cand.x, list(ends), cand.hidden
        self.x_shape = tuple(g.shapes.get(cand.x) or ("T", cand.hidden))[:-1] + (cand.hidden,)
        self.dtype = np_dtype(g.dtypes.get(cand.x, onnx.TensorProto.FLOAT))

    def run(self, x: np.ndarray) -> dict:
        """{end: Probe} for one input."""
        x = x.astype(self.dtype)
        *ys, logits = run(self.session, {self.x: x, **self.weights})
        return {end: Probe(x=x, logits=logits, y=y) for end, y in zip(self.ends, ys)}

    def run_rows(self, rows: np.ndarray, rng) -> dict:
        """{end: [Probe, ...]} for token rows [n, D], laid out in the block's input shape: one
        run along the last dynamic dim, or, with a static shape, runs of its token count with
        random rows after the last given one."""
        dynamic = [i for i, d in enumerate(self.x_shape[:-1]) if not isinstance(d, int) or d <= 0]
        out = {end: [] for end in self.ends}
        if dynamic:
            shape = [1 if i in dynamic else d for i, d in enumerate(self.x_shape)]
            shape[dynamic[-1]] = -1
            chunks = [rows.reshape(shape)]
        else:
            per = int(np.prod(self.x_shape[:-1], dtype=np.int64))
            pad = -len(rows) % per
            rows = np.concatenate([rows, rng.standard_normal((pad, self.hidden))])
            chunks = [c.reshape(self.x_shape) for c in np.split(rows, len(rows) // per)]
        for x in chunks:
            for end, p in self.run(x).items():
                out[end].append(p)
        return out


def probe_block(g: GraphIndex, cand: Candidate, ends: list[str], seed: int = 0):
    """Run the block on random inputs of several token counts: ({end: [Probe, ...]}, runner),
    the runner kept to probe more inputs (:func:`cover_experts`)."""
    runner = BlockRunner(g, cand, ends)
    rng = np.random.default_rng(seed)
    out = {end: [] for end in ends}
    for shape in probe_shapes(runner.x_shape, cand.experts, cand.hidden):
        x = rng.standard_normal(shape, dtype=np.float32)
        for end, p in runner.run(x).items():
            out[end].append(p)
    return out, runner


# ---------------------------------------------------------------------------------------------
# every expert exercised: random probes reach only the experts the router favours for random
# tokens, so a wrongly read weight of another expert would go unnoticed


COVER_ROUNDS = 3


def routed_experts(h: Hypothesis, probes: list[Probe], experts: int) -> np.ndarray:
    """[E] bool: the experts h routes some probe token to."""
    sel = h.operands.get("selection_bias")
    hit = np.zeros(experts, dtype=bool)
    for p in probes:
        ids, _ = route(h.attrs, p.logits, None if sel is None else sel.array())
        hit[ids.reshape(-1)] = True
    return hit


def cover_experts(h: Hypothesis, probes: list[Probe], runner: BlockRunner, end: str,
                  experts: int, seed: int = 1) -> tuple[list[Probe], list[int]]:
    """Probes of tokens steered to the experts that ``probes`` never reach under h's routing,
    and the experts still unreached after COVER_ROUNDS rounds (with more experts than hidden
    dims, some may be unreachable by any input)."""
    rng = np.random.default_rng(seed)
    hit = routed_experts(h, probes, experts)
    extra: list[Probe] = []
    if hit.all():
        return extra, []
    steer = Steering(probes, experts)
    for r in range(COVER_ROUNDS):
        missing = np.nonzero(~hit)[0]
        if not missing.size:
            break
        try:
            new = runner.run_rows(steer.rows(missing, 2.0 ** r, rng), rng)[end]
        except Exception:  # noqa: BLE001 - the graph fails on these tokens: report them unreached
            break
        extra += new
        hit |= routed_experts(h, new, experts)
    return extra, [int(e) for e in np.nonzero(~hit)[0]]


class Steering:
    """Token rows whose router logits favour chosen experts.

    The logits are an affine function of the block input (a projection, perhaps a bias, and
    views), so the probes' (x, logits) pairs give that function without reading the graph."""

    def __init__(self, probes: list[Probe], experts: int):
        self.xs = np.concatenate([p.x.reshape(-1, p.x.shape[-1])
                                  for p in probes]).astype(np.float64)
        self.ls = np.concatenate([p.logits.reshape(-1, experts) for p in probes]).astype(np.float64)
        self.experts = experts
        tokens, dims = self.xs.shape
        self.fit = None
        if tokens > dims:  # [D + 1, E]: projection and bias
            self.fit = np.linalg.pinv(np.hstack([self.xs, np.ones((tokens, 1))])) @ self.ls

    def rows(self, targets: np.ndarray, spread: float, rng) -> np.ndarray:
        """[len(targets), D]: row i with expert targets[i] above every other by more than
        ``spread`` times the spread of the probes' logits, as far as reachable."""
        mean = self.ls.mean(axis=0)
        reach = spread * (np.ptp(mean) + 4 * self.ls.std(axis=0).max() + 1.0)
        want = np.full((len(targets), self.experts), mean.min() - reach)
        want[np.arange(len(targets)), targets] = mean.max() + reach
        if self.fit is None:
            # Fewer probe tokens than hidden dims (so E < D): the combination of probe tokens
            # whose logits combine to the target.
            ones = np.ones((len(self.ls), 1))
            coef = np.linalg.pinv(np.hstack([self.ls, ones]).T) @ np.hstack(
                [want, np.ones((len(want), 1))]).T
            return (coef.T @ self.xs).astype(np.float32)
        proj, bias = self.fit[:-1], self.fit[-1]
        if self.experts <= proj.shape[0]:  # any logits are reachable: solve for the target
            return ((want - bias) @ np.linalg.pinv(proj)).astype(np.float32)
        # More experts than dims: not every pattern of logits is reachable; go along the
        # expert's own router direction (jittered in later rounds), far enough to outweigh
        # the bias.
        cols = proj[:, targets].T
        cols = cols + rng.standard_normal(cols.shape) * (spread - 1) * 0.3 * np.abs(cols).mean()
        norms = np.linalg.norm(cols, axis=1, keepdims=True) + 1e-30
        scale = (np.ptp(bias) + reach) / np.min(norms)
        return (cols / norms * scale).astype(np.float32)
