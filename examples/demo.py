"""The README's first command (`make demo`): convert the bundled tiny model and compare.

Converts examples/tiny_mixtral.onnx (a 2-layer Mixtral-style decoder exported from transformers'
code, see make_tiny_model.py), runs original and converted in onnxruntime on the same random
tokens, and prints node counts, the max error and the time per call.
"""

import os
import subprocess
import sys
import time

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "tiny_mixtral.onnx")
OUT_DIR = os.path.join(HERE, "..", "out")


def per_call_ms(sess, feeds, repeat=20):
    sess.run(None, feeds)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeat):
            sess.run(None, feeds)
        best = min(best, (time.perf_counter() - t) / repeat)
    return best * 1e3


def main():
    from moefuse.compare import max_relative_error, session

    os.makedirs(OUT_DIR, exist_ok=True)
    fused = os.path.join(OUT_DIR, "tiny_mixtral.moefuse.onnx")
    cmd = [sys.executable, "-m", "moefuse.cli", "convert", MODEL, "-o", fused, "-q"]
    print("$ moefuse convert examples/tiny_mixtral.onnx -o out/tiny_mixtral.moefuse.onnx")
    subprocess.run(cmd, check=True)

    n_orig = len(onnx.load(MODEL).graph.node)
    n_fused = len(onnx.load(fused).graph.node)
    sessions = {"original (unfused export)": session(MODEL),
                "converted, stock onnxruntime": session(fused)}
    try:
        from moefuse import session_options

        sessions["converted + moefuse library"] = session(fused, session_options())
    except Exception as exc:  # noqa: BLE001 - the library is optional for the demo
        print(f"(moefuse library not available: {exc})")

    rng = np.random.default_rng(0)
    print(f"\nnodes: {n_orig} -> {n_fused}")
    print(f"{'':32s}{'max rel. error':>16s}{'ms/call':>10s}{'speedup':>9s}")
    for seq in (16, 256):
        feeds = {"input_ids": rng.integers(0, 256, (1, seq)).astype(np.int64)}
        ref = None
        base = None
        print(f"batch 1 x {seq} tokens")
        for name, sess in sessions.items():
            out = sess.run(None, feeds)[0]
            ms = per_call_ms(sess, feeds, repeat=5 if seq > 64 else 20)
            if ref is None:
                ref, base = out, ms
            err = max_relative_error(ref, out)
            print(f"  {name:30s}{err:16.1e}{ms:10.2f}{base / ms:8.1f}x")


if __name__ == "__main__":
    main()
