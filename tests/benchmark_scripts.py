"""The benchmark scripts under benchmarks/ (not a package), for the tests that exercise them."""

import importlib
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def script(name: str) -> str:
    """Path of benchmarks/<name>.py."""
    return os.path.join(BENCHMARKS, name + ".py")


def load(name: str):
    """benchmarks/<name>.py imported as a module."""
    sys.path.insert(0, BENCHMARKS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)
