"""Options shared by every test module."""

import os

import pytest

SHARD_ENV = "MOEFUSE_TEST_SHARD"


def pytest_collection_modifyitems(config, items):
    """MOEFUSE_TEST_SHARD=i/n keeps every n-th collected test from the i-th: a run too long for one
    go (the CUDA tests under compute-sanitizer: `make gpu-memcheck MEMCHECK_SHARD=i/n`) split into
    n parts that together run every test once. Every n-th rather than a contiguous n-th, so that
    the slow tests, which sit together, spread over the parts."""
    value = os.environ.get(SHARD_ENV, "")
    if not value:
        return
    try:
        i, n = (int(part) for part in value.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise pytest.UsageError(f"{SHARD_ENV}={value!r}: expected i/n with 1 <= i <= n, e.g. 1/2")
    config.hook.pytest_deselected(items=[t for j, t in enumerate(items) if j % n != i - 1])
    items[:] = items[i - 1::n]
