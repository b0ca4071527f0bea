"""The `refimpl` command line."""

import dataclasses
import subprocess
import sys

import pytest

from refimpl import cli, linsolve, registry
from refimpl.backend import available_backends


def test_help_documents_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for sub in ("verify", "bench"):
        assert sub in out
    with pytest.raises(SystemExit):
        cli.main(["verify", "--help"])
    out = capsys.readouterr().out
    for flag in ("--op", "--case", "--backend", "--dtype", "--failures-only"):
        assert flag in out


def test_verify_prints_table_and_passes(capsys):
    assert cli.main(["verify", "--op", "linear_solve", "--backend", "all"]) == 0
    captured = capsys.readouterr()
    assert "operator" in captured.out and "tol" in captured.out
    for token in ("linear_solve", "batched_scales", "array_api_strict", "float32",
                  "adjoint", "fd_vjp", "batch", "all checks passed"):
        assert token in captured.out
    assert "FAIL" not in captured.out
    assert "[1/" in captured.err  # progress on stderr
    # per-operator summary: 5 cases x 2 dtypes (one float64-only) x every usable backend
    summary = [line.split() for line in captured.out.split("worst error/tol")[1].splitlines()]
    (row,) = [r for r in summary if r and r[0] == "linear_solve"]
    n_backends = len(available_backends())
    assert row[1] == str(9 * n_backends) and row[3] == "0" and row[-1] == "pass"


def test_verify_reports_a_planted_wrong_vjp(monkeypatch, capsys):
    def vjp_missing_transpose(res, x_bar):
        g = linsolve.solve_vec(res.A, x_bar)  # A^{-1} x_bar instead of A^{-T} x_bar
        return -(g[..., :, None] * res.x[..., None, :]), g

    good = registry.get_spec("linear_solve")
    planted = dataclasses.replace(good, name="planted", vjp=vjp_missing_transpose)
    monkeypatch.setattr(registry, "_built", lambda: {"linear_solve": good, "planted": planted})
    assert cli.main(["verify", "-q"]) == 1
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    failing = {(r[0], r[4]) for r in rows if r and r[-1] == "FAIL"}
    assert ("planted", "adjoint") in failing and ("planted", "fd_vjp") in failing
    assert not any(name == "linear_solve" for name, _ in failing)
    summary = {r[0]: r for r in rows if len(r) == 6 and r[-1] in ("pass", "FAIL")}
    assert summary["planted"][-1] == "FAIL" and summary["linear_solve"][-1] == "pass"
    assert "FAILED" in out


def test_verify_failures_only_and_bad_arguments(capsys):
    assert cli.main(["verify", "--op", "linear_solve", "--failures-only", "-q"]) == 0
    assert "fd_vjp" not in capsys.readouterr().out
    assert cli.main(["verify", "--op", "nope", "-q"]) == 2
    assert "unknown operator 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["verify", "--dtype", "float16"])


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "refimpl.cli", "verify", "--op", "linear_solve",
                           "--case", "scalar", "-q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scalar" in proc.stdout


def test_bench_discovers_and_runs_scripts(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench_toy.py").write_text(
        "def main(argv=None):\n    print('toy ran with', argv)\n    return 3\n")
    monkeypatch.setenv("REFIMPL_BENCHMARKS", str(tmp_path))
    assert cli.main(["bench"]) == 0
    assert "toy" in capsys.readouterr().out
    assert cli.main(["bench", "toy", "--quick"]) == 3
    assert "toy ran with ['--quick']" in capsys.readouterr().out
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
