"""Converting a large model with external data: wall time and peak memory.

Builds a synthetic 48-layer model (a residual stack of transformers Mixtral MoE blocks exported
with torch's dynamo exporter, each layer with its own random weights, 128 experts per layer),
more than 4 GB of weights in one external data file, then runs `moefuse convert` on it in a
child process and prints the time and the child's peak resident memory.

    python benchmarks/convert_large.py [--dir /tmp/moefuse-large] [--layers 48]

`--family gpt_oss` stacks GPT-OSS blocks instead (expert weights stored in_out); with
`--weight-layout out_in` the conversion writes every expert matrix anew, transposed, which
measures how the rewrite holds the new tensors.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
from onnx import helper


def template_block(family: str, experts: int, hidden: int, inter: int, k: int):
    """The torch module one layer exports: the block's first output only."""
    import torch

    if family == "gpt_oss":
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP as Block

        cfg = GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                           num_experts_per_tok=k, experts_implementation="batched_mm")
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                            num_experts_per_tok=k, experts_implementation="batched_mm")

    class First(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block(cfg)

        def forward(self, x):
            y = self.block(x)
            return y[0] if isinstance(y, tuple) else y

    return First().eval()


def export_template(family: str, experts: int, hidden: int, inter: int, k: int) -> onnx.ModelProto:
    import torch

    block = template_block(family, experts, hidden, inter, k)
    path = tempfile.mktemp(suffix=".onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
        torch.onnx.export(block, (torch.randn(1, 4, hidden),), path, dynamo=True,
                          input_names=["x"], output_names=["y"], dynamic_shapes=dims,
                          external_data=False)
    model = onnx.load(path)
    os.remove(path)
    return model


def build(out_dir: str, layers: int, experts: int, hidden: int, inter: int, k: int,
          family: str = "mixtral") -> str:
    """Write the stacked model and its data file; weights are generated layer by layer."""
    template = export_template(family, experts, hidden, inter, k)
    g = template.graph
    big = {t.name for t in g.initializer if np.prod(t.dims) >= experts * hidden}
    data_name = "large.onnx.data"
    nodes, inits = [], []
    rng = np.random.default_rng(0)
    offset = 0
    with open(os.path.join(out_dir, data_name), "wb") as data:
        h = "hidden_0"
        for layer in range(layers):
            rename = {"x": h, "y": f"l{layer}/moe_out"}

            def name(t, layer=layer, rename=rename):
                return rename.get(t, f"l{layer}/{t}") if t else t

            for node in g.node:
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.name = f"l{layer}/{node.name}"
                copy.input[:] = [name(t) for t in node.input]
                copy.output[:] = [name(t) for t in node.output]
                nodes.append(copy)
            for t in g.initializer:
                if t.name in big:
                    arr = (rng.standard_normal(tuple(t.dims), dtype=np.float32)
                           / np.sqrt(t.dims[-1])).astype(np.float32)
                    raw = arr.tobytes()
                    data.write(raw)
                    ext = onnx.TensorProto(name=name(t.name), data_type=t.data_type,
                                           dims=t.dims)
                    ext.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", data_name), ("offset", str(offset)),
                                       ("length", str(len(raw)))):
                        e = ext.external_data.add()
                        e.key, e.value = key, value
                    offset += len(raw)
                    inits.append(ext)
                else:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(t)
                    copy.name = name(t.name)
                    inits.append(copy)
            nxt = f"hidden_{layer + 1}"
            nodes.append(helper.make_node("Add", [h, f"l{layer}/moe_out"], [nxt],
                                          name=f"l{layer}/residual"))
            h = nxt
    graph = helper.make_graph(
        nodes, "large_moe_stack",
        [helper.make_tensor_value_info("hidden_0", onnx.TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info(h, onnx.TensorProto.FLOAT, ["batch", "seq", hidden])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=template.opset_import,
                              ir_version=min(template.ir_version, 10))
    path = os.path.join(out_dir, "large.onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to build the model (default: a temp dir)")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--family", choices=["mixtral", "gpt_oss"], default="mixtral")
    ap.add_argument("--weight-layout", choices=["as-found", "out_in"], default="as-found",
                    help="passed to moefuse convert")
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = ap.parse_args()
    out_dir = args.dir or tempfile.mkdtemp(prefix="moefuse-large-")
    os.makedirs(out_dir, exist_ok=True)
    t = time.time()
    path = build(out_dir, args.layers, args.experts, args.hidden, args.inter, args.k, args.family)
    size = os.path.getsize(os.path.join(out_dir, "large.onnx.data"))
    print(f"built {path}: {args.layers} {args.family} layers x {args.experts} experts, "
          f"{size / 1e9:.2f} GB external data ({time.time() - t:.0f} s)")
    out = os.path.join(out_dir, "large.moefuse.onnx")
    t = time.time()
    # The convert's own peak: its VmHWM, read as it exits. The kernel's maximum RSS of a child
    # (wait4, RUSAGE_CHILDREN) also counts the forked copy of this process before exec, which
    # holds torch and the built model (3.1 GB against the convert's 2.4 GB, measured).
    peak_probe = ("import sys\nfrom moefuse.cli import main\ntry:\n    main()\nfinally:\n"
                  "    print('VmHWM', *[l.split()[1] for l in open('/proc/self/status') "
                  "if l.startswith('VmHWM')], file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", peak_probe, "convert", path, "-o", out, "-q",
                           "--weight-layout", args.weight_layout], capture_output=True, text=True)
    wall = time.time() - t
    hwm = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VmHWM ")]
    peak_mb = int(hwm[-1]) / 1024 if hwm else float("nan")
    print(proc.stdout[-1500:])
    if proc.returncode:
        print(proc.stderr[-3000:])
        sys.exit(proc.returncode)
    n = sum(1 for node in onnx.load(out, load_external_data=False).graph.node
            if node.op_type == "MoEFFN")
    new_data = [f for f in os.listdir(out_dir) if f.startswith("large.moefuse.onnx") and f.endswith(".data")]
    new_size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in new_data)
    print(f"convert: {wall:.1f} s wall, peak resident memory {peak_mb:.0f} MB, "
          f"{n} MoEFFN nodes; data file size {size / 1e9:.2f} GB left in place, "
          f"{new_size / 1e9:.2f} GB of new tensors written")
    if not args.keep and args.dir is None:
        import shutil

        shutil.rmtree(out_dir)


if __name__ == "__main__":
    main()
