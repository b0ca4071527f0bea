"""Shared fixtures: the backend grid, the dtype grid and deterministic inputs.

* ``backend``: a :class:`refimpl.backend.Backend` for NumPy, array_api_strict
  (on its non-default device, so a missing ``device=`` fails loudly), torch
  (CUDA tensors when available), ``cupy_semantics`` (the CPU double of CuPy:
  CuPy's branches and semantics without a GPU) and CuPy (marked ``gpu``).
  A backend that is not usable here is skipped with the reason
  (:func:`refimpl.backend.backend_status`), unless it is required:
  ``REFIMPL_REQUIRE_BACKENDS=torch,array_api_strict`` (comma-separated
  names) makes a missing one an error, and ``REFIMPL_REQUIRE_GPU=1`` makes
  every ``gpu``-marked test fail instead of skip when CuPy cannot reach a
  device (so ``pytest -m gpu`` on a machine without one cannot pass green).
* ``dtype``: "float64" (the reference) and "float32".
* ``rng``: a NumPy generator seeded from the test's id, so every backend and
  every run sees the same numbers.  Inputs are made on the host with it and
  moved with ``backend.asarray(host_array, dtype)``.
"""

import importlib.util
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from refimpl import backend as _backend

pytest_plugins = ["pytester"]

BACKENDS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("array_api_strict", id="strict"),
    pytest.param("torch", id="torch"),
    pytest.param("cupy_semantics", id="cupy_semantics"),
    pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
]
DTYPES = ["float64", "float32"]


def _require_gpu() -> bool:
    return os.environ.get("REFIMPL_REQUIRE_GPU", "").strip() not in ("", "0")


def _required() -> set[str]:
    names = _backend.required_backends(os.environ.get("REFIMPL_REQUIRE_BACKENDS"))
    return names | ({"cupy"} if _require_gpu() else set())


def pytest_configure(config):
    try:
        _required()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_runtest_setup(item):
    """A ``gpu``-marked test without a usable device: skipped with the real
    cause, or failed under ``REFIMPL_REQUIRE_GPU=1``."""
    if "gpu" not in item.keywords:
        return
    ok, reason = _backend.gpu_status()
    if ok:
        return
    if "cupy" in _required():
        pytest.fail(f"a GPU is required (REFIMPL_REQUIRE_GPU/REFIMPL_REQUIRE_BACKENDS) "
                    f"but not usable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The array backend under test (NumPy, array_api_strict, torch,
    cupy_semantics, CuPy); skipped (or, when required, failed) where not usable."""
    name = request.param
    ok, reason = _backend.backend_status(name)
    if not ok:
        if name in _required():
            pytest.fail(f"backend {name!r} is required (REFIMPL_REQUIRE_BACKENDS/"
                        f"REFIMPL_REQUIRE_GPU) but not usable: {reason}", pytrace=False)
        pytest.skip(f"backend {name!r} not usable: {reason}")
    return _backend.get_backend(name)


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
