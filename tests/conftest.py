"""Shared fixtures: the backend grid, the dtype grid and deterministic inputs.

* ``backend``: a :class:`refimpl.backend.Backend` for NumPy, array_api_strict
  (on its non-default device, so a missing ``device=`` fails loudly) and CuPy
  (marked ``gpu``; skipped cleanly without CuPy and a CUDA device).
* ``dtype``: "float64" (the reference) and "float32".
* ``rng``: a NumPy generator seeded from the test's id, so every backend and
  every run sees the same numbers.  Inputs are made on the host with it and
  moved with ``backend.asarray(host_array, dtype)``.
"""

import importlib.util
import zlib
from pathlib import Path

import numpy as np
import pytest

from refimpl.backend import get_backend, gpu_available

BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("array_api_strict", id="strict"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
]
DTYPES = ["float64", "float32"]


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The array backend under test (NumPy, array_api_strict, CuPy)."""
    return get_backend(request.param)


@pytest.fixture(params=DTYPES)
def dtype(request):
    """The working dtype: float64 (reference) or float32."""
    return request.param


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's module and function name.

    The parametrisation is left out of the seed on purpose: every backend and
    dtype of one test draws the same numbers.
    """
    name = f"{request.node.module.__name__}::{request.node.originalname}"
    return np.random.default_rng(zlib.crc32(name.encode()))


@pytest.fixture
def load_benchmark():
    """``load_benchmark("sinkhorn")`` imports ``benchmarks/bench_sinkhorn.py``
    (benchmarks are scripts, not part of the package) for smoke tests."""
    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
