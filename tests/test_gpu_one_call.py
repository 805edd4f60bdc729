"""benchmarks/gpu_one_call.py refuses a bad command line before it touches the GPU."""

import subprocess
import sys

import pytest

from benchmark_scripts import load, script

SCRIPT = script("gpu_one_call")


def test_arguments_pick_one_layer():
    args = load("gpu_one_call").parse_args(["GPT", "32", "bfloat16", "2"])
    assert args.layer == ("GPT-OSS-20B", 2880, 2880, 32, 4)
    assert (args.tokens, args.dtype, args.warmup, args.op, args.save) == (32, "bfloat16", 2, "ours", "")
    args = load("gpu_one_call").parse_args(["Qwen", "4096", "float16", "1", "ms", "--save", "y.npy"])
    assert (args.layer[0], args.op, args.save) == ("Qwen3-30B-A3B", "ms", "y.npy")


@pytest.mark.parametrize("argv,message", [
    (["Llama", "32", "bfloat16", "1"], "shape 'Llama' names 0 of the layers"),
    (["", "32", "bfloat16", "1"], "shape '' names 3 of the layers"),
    (["Qwen", "0", "bfloat16", "1"], "tokens must be >= 1"),
    (["Qwen", "32", "float32", "1"], "invalid choice: 'float32'"),
    (["Qwen", "32", "bfloat16", "1", "cutlass"], "invalid choice: 'cutlass'"),
])
def test_refusals_name_the_argument(argv, message):
    done = subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
