"""Memory of a CPU session of one MoEFFN layer saved with external data, by how the kernel packs
its weights: the growth of the process's anonymous memory (the packed copy, scratch) and of the
resident pages of the data file, which onnxruntime maps, and of those the private dirty ones
(copies the process holds, which the OS cannot drop and reread from the file).

Each packing is measured in a fresh process (freed memory is not reused across runs), on Linux
(/proc/self/smaps).

    python benchmarks/cpu_memory.py                       # bfloat16, 32 experts of 1024 x 1024
    python benchmarks/cpu_memory.py --dtype float32 --bf16-valued
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PACKINGS = {"16-bit where the values allow": "model", "float32": "float32"}


def resident_mib(data_file: str) -> tuple[float, float, float]:
    """(anonymous, data_file, data_file's private dirty) resident MiB of this process."""
    anon = mapped = dirty = 0
    name = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
                name = parts[5] if len(parts) >= 6 else ""
            elif parts and parts[0] == "Rss:":
                if name == data_file:
                    mapped += int(parts[1])
                elif not name.startswith("/"):
                    anon += int(parts[1])
            elif parts and parts[0] == "Private_Dirty:" and name == data_file:
                dirty += int(parts[1])
    return anon / 1024, mapped / 1024, dirty / 1024


def measure(path: str) -> dict:
    """In this process: the session's growth."""
    import onnxruntime as ort

    from moefuse.runtime import session_options

    data = os.path.realpath(path + ".data")
    a0, m0, d0 = resident_mib(data)
    sess = ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])
    a1, m1, d1 = resident_mib(data)
    del sess
    return {"anonymous_mib": round(a1 - a0, 1), "mapped_data_mib": round(m1 - m0, 1),
            "mapped_data_dirty_mib": round(d1 - d0, 1)}


def write_model(path: str, args) -> float:
    import ml_dtypes
    import numpy as np
    import onnx

    from moefuse import MoEFFNAttrs, make_moeffn_model
    from moefuse.synthetic import random_inputs

    dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[args.dtype]
    attrs = MoEFFNAttrs(k=2)
    inputs = random_inputs(attrs, 1, args.hidden, args.inter, args.experts, dtype=dtype, seed=0)
    if args.bf16_valued:
        for n in ("w1", "w2"):
            inputs[n] = inputs[n].astype(ml_dtypes.bfloat16).astype(dtype)
    weights = sum(inputs[n].nbytes for n in ("w1", "w2")) / 2**20
    onnx.save_model(make_moeffn_model(attrs, inputs), path, save_as_external_data=True,
                    all_tensors_to_one_file=True, location=os.path.basename(path) + ".data",
                    size_threshold=1024)
    return weights


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--bf16-valued", action="store_true",
                   help="round the weights to bfloat16 values (a float32 export of a bfloat16 checkpoint)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this model here
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return None
    with tempfile.TemporaryDirectory(prefix="moefuse_mem_") as tmp:
        path = os.path.join(tmp, "layer.onnx")
        weights = write_model(path, args)
        print(f"{args.dtype}{' (bfloat16 values)' if args.bf16_valued else ''} weights: "
              f"{weights:.0f} MiB in {os.path.basename(path)}.data")
        results = {}
        for label, env_value in PACKINGS.items():
            # blocks of 1 MiB and more mapped afresh and given back when freed (glibc): the
            # growth is then what the session holds, not what the heap happened to reuse
            env = dict(os.environ, MOEFUSE_CPU_WEIGHTS=env_value, MALLOC_MMAP_THRESHOLD_="1048576")
            out = subprocess.run([sys.executable, __file__, "--measure", path], env=env,
                                 capture_output=True, text=True, check=True)
            results[label] = json.loads(out.stdout.splitlines()[-1])
            r = results[label]
            print(f"  packing {label}: anonymous memory +{r['anonymous_mib']:.0f} MiB, mapped data "
                  f"file +{r['mapped_data_mib']:.0f} MiB (private dirty +{r['mapped_data_dirty_mib']:.0f} MiB)")
    return {"weights_mib": weights, "packings": results}


if __name__ == "__main__":
    main()
