"""GPU availability reporting, the test grid's require switches, the CLI's
backend listing, the benchmarks' device synchronisation and the GPU check
script, all testable without a GPU (the CuPy import and probes are faked)."""

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from refimpl import backend as B
from refimpl import cli

ROOT = Path(__file__).resolve().parent.parent


def fake_cupy(*, driver=None, count=None):
    """A stand-in ``cupy`` module whose runtime probes return or raise."""
    def probe(value):
        def f():
            if isinstance(value, Exception):
                raise value
            return value
        return f
    runtime = types.SimpleNamespace(driverGetVersion=probe(driver), getDeviceCount=probe(count))
    return types.SimpleNamespace(__version__="13.9", cuda=types.SimpleNamespace(runtime=runtime))


# --------------------------------------------------------------------------
# gpu_status names the real cause
# --------------------------------------------------------------------------

def test_gpu_status_cupy_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)        # import raises ImportError
    ok, reason = B.gpu_status()
    assert not ok and "not installed" in reason


def test_gpu_status_cupy_without_driver(monkeypatch):
    err = RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(driver=err, count=err))
    ok, reason = B.gpu_status()
    assert not ok and "installed but no CUDA driver" in reason and "Insufficient" in reason


def test_gpu_status_driver_but_no_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(driver=12040, count=0))
    ok, reason = B.gpu_status()
    assert not ok and "driver 12040 found but no CUDA device" in reason
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(
        driver=12040, count=RuntimeError("cudaErrorNoDevice")))
    ok, reason = B.gpu_status()
    assert not ok and "no CUDA device" in reason and "cudaErrorNoDevice" in reason


def test_gpu_status_ok_and_get_backend_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(driver=12040, count=2))
    assert B.gpu_status() == (True, "CuPy 13.9, CUDA driver 12040, 2 device(s)")
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(driver=12040, count=0))
    with pytest.raises(ValueError, match="backend 'cupy' is not available: .*no CUDA device"):
        B.get_backend("cupy")
    assert "cupy" not in B.available_backends()
    assert ("cupy", B.gpu_status()[1]) in B.skipped_backends()


def test_required_backends_parses_and_rejects_unknown_names():
    assert B.required_backends(" torch, array_api_strict ,") == {"torch", "array_api_strict"}
    assert B.required_backends(None) == set()
    with pytest.raises(ValueError, match="unknown backend.*'jax'"):
        B.required_backends("torch,jax")


def test_torch_dtype_names():
    torch = pytest.importorskip("torch")
    assert B.dtype_name(torch.float64) == "float64"
    assert B.dtype_name(torch.float32) == "float32"
    assert B.dtype_name(torch.int64) == "int64"
    assert B.unit_roundoff(torch.float32) == 2.0 ** -24


# --------------------------------------------------------------------------
# The grid: skip with the reason, or fail when required (inner pytest runs)
# --------------------------------------------------------------------------

INNER_TESTS = """
import pytest

@pytest.mark.gpu
def test_marked_gpu():
    pass

def test_grid(backend):
    pass
"""


@pytest.fixture
def inner(pytester, monkeypatch):
    """An inner pytest session using this suite's conftest, with the CuPy probe
    saying "no device" and torch reported missing."""
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    pytester.makepyfile(test_inner=INNER_TESTS)
    real_status = B.backend_status
    monkeypatch.setattr(B, "gpu_status", lambda: (False, "driver present but no CUDA device (faked)"))
    monkeypatch.setattr(B, "backend_status", lambda name: (
        (False, "PyTorch is not installed (faked)") if name == "torch"
        else B.gpu_status() if name == "cupy" else real_status(name)))
    for var in ("REFIMPL_REQUIRE_GPU", "REFIMPL_REQUIRE_BACKENDS"):
        monkeypatch.delenv(var, raising=False)
    return pytester


def test_gpu_tests_skip_with_the_reason_by_default(inner):
    result = inner.runpytest_inprocess("-m", "gpu", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2)          # the marked test and the cupy grid param
    result.stdout.fnmatch_lines(["*no CUDA device (faked)*"])
    assert result.ret == 0


def test_require_gpu_turns_skips_into_failures(inner, monkeypatch):
    monkeypatch.setenv("REFIMPL_REQUIRE_GPU", "1")
    result = inner.runpytest_inprocess("-m", "gpu", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)            # failed in setup: reported as errors
    result.stdout.fnmatch_lines(["*GPU is required*no CUDA device (faked)*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_missing_torch_skips_unless_required(inner, monkeypatch):
    result = inner.runpytest_inprocess("-k", "torch", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*backend 'torch' not usable: PyTorch is not installed (faked)*"])
    monkeypatch.setenv("REFIMPL_REQUIRE_BACKENDS", "torch")
    result = inner.runpytest_inprocess("-k", "torch", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*backend 'torch' is required*PyTorch is not installed*"])


def test_unknown_required_backend_is_a_usage_error(inner, monkeypatch):
    monkeypatch.setenv("REFIMPL_REQUIRE_BACKENDS", "numpy,tensorflow")
    result = inner.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


# --------------------------------------------------------------------------
# refimpl verify --backend all lists what it skipped
# --------------------------------------------------------------------------

def test_verify_all_names_skipped_backends(monkeypatch, capsys):
    real_status = B.backend_status
    monkeypatch.setattr(B, "backend_status", lambda name: (
        (False, "PyTorch is not installed (faked)") if name == "torch"
        else (False, "CuPy is not installed (faked)") if name == "cupy" else real_status(name)))
    rc = cli.main(["verify", "--op", "linear_solve", "--case", "scalar", "--backend", "all",
                   "-q", "--failures-only"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "skipping backend torch: PyTorch is not installed (faked)" in out
    assert "skipping backend cupy: CuPy is not installed (faked)" in out


# --------------------------------------------------------------------------
# Benchmarks: a device sync before every clock reading
# --------------------------------------------------------------------------

def test_backend_synchronize_is_callable_everywhere():
    for name in B.available_backends():
        B.get_backend(name).synchronize()


def _order_recorder():
    log = []
    return log, (lambda: log.append("sync")), (lambda: log.append("work") or 1)


def test_benchmark_timers_sync_around_the_timed_call(load_benchmark):
    sink, comb, msq = (load_benchmark(n) for n in ("sinkhorn", "combinatorial", "matsqrt"))
    log, sync, work = _order_recorder()
    sink.best_time(work, 2, sync)
    assert log == ["sync", "work", "sync"] * 2
    log, sync, work = _order_recorder()
    comb._timings(work, 2, sync)
    assert log == ["sync", "work", "sync"] * 2
    log, sync, work = _order_recorder()
    msq._timer(sync)(work)
    assert log == ["sync", "work", "sync"]


def test_matsqrt_bench_keeps_the_table_when_a_method_fails(load_benchmark, monkeypatch):
    msq = load_benchmark("matsqrt")

    def broken(A):
        raise RuntimeError("kernel launch failed (faked)")

    pair = msq.PAIRS["mtp+lyapunov_sign"]
    monkeypatch.setitem(msq.PAIRS, "mtp+lyapunov_sign", (broken,) + tuple(pair[1:]))
    be = B.get_backend("cupy_semantics")
    rows = msq.run_size(2, 4, ("mpa+lyapunov_sign", "mtp+lyapunov_sign", "eig+exact"), 1,
                        be, be.synchronize, with_scipy=False)
    assert [r["method"] for r in rows] == ["mpa+lyapunov_sign", "mtp+lyapunov_sign", "eig+exact"]
    assert "kernel launch failed" in rows[1]["error"]
    assert rows[2]["fwd_err"] < 1e-12                     # eig+exact against the reference
    table = msq.format_table(rows, {})
    assert "FAILED (2x4) mtp+lyapunov_sign: RuntimeError: kernel launch failed" in table
    assert "eig+exact" in table


def test_matsqrt_bench_cupy_on_without_gpu_is_an_error(load_benchmark, monkeypatch, capsys):
    msq = load_benchmark("matsqrt")
    monkeypatch.setattr(B, "gpu_status", lambda: (False, "CuPy is not installed (faked)"))
    assert msq.main(["--quick", "--cupy", "on", "--cpu", "off", "--json", ""]) == 2
    assert "CuPy is not installed (faked)" in capsys.readouterr().err


def test_sinkhorn_bench_device_path_on_cupy_semantics(load_benchmark):
    sink = load_benchmark("sinkhorn")
    rows = sink.bench_device(B.get_backend("cupy_semantics"), 12, 0.1, [30], 1)
    assert [r["method"] for r in rows] == ["implicit-schur", "implicit-cg"]
    # both backwards are the same gradient, so they agree with each other
    assert abs(rows[0]["err_C"] - rows[1]["err_C"]) < 1e-6
    assert all(np.isfinite(r["bwd_s"]) for r in rows)


# --------------------------------------------------------------------------
# The GPU check script
# --------------------------------------------------------------------------

@pytest.fixture
def gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)     # dataclasses look it up
    spec.loader.exec_module(module)
    return module


SMI_HEADER = """
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_gpu_check_reads_the_cuda_version_and_picks_the_wheel(gpu_check):
    assert gpu_check.cuda_major_from_smi(SMI_HEADER) == 12
    assert gpu_check.cuda_major_from_smi(SMI_HEADER.replace("12.4", "13.0")) == 13
    assert gpu_check.cuda_major_from_smi("NVIDIA-SMI has failed") is None
    assert gpu_check.cupy_wheel(12) == "cupy-cuda12x"
    assert gpu_check.cupy_wheel(13) == "cupy-cuda13x"
    with pytest.raises(ValueError, match="no CuPy wheel for CUDA 10"):
        gpu_check.cupy_wheel(10)


def test_gpu_check_dry_run_plans_every_step(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)
    assert gpu_check.main(["--dry-run", "--cuda-major", "13"]) == 0
    out = capsys.readouterr().out
    assert "cupy-cuda13x" in out
    for needle in ("-m venv", "verify --backend cupy", "REFIMPL_REQUIRE_GPU=1",
                   "-m pytest -m gpu", "bench_matsqrt.py --cupy on --cpu off",
                   "bench_sinkhorn.py --backend cupy"):
        assert needle in out
    # without nvidia-smi and without --cuda-major a real run refuses to guess
    assert gpu_check.main([]) == 2


def test_gpu_check_report_lists_failures(gpu_check, tmp_path):
    ok = gpu_check.Step("passes", [sys.executable, "-c", "print('table row')"], full_output=True)
    bad = gpu_check.Step("fails", [sys.executable, "-c", "raise SystemExit(3)"])
    for s in (ok, bad):
        s.run(tmp_path)
    text = gpu_check.report([ok, bad], ["- header"])
    assert "| passes | ok |" in text and "| fails | FAILED (3) |" in text
    assert "table row" in text
