"""The `refimpl` command line."""

import dataclasses
import json
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
    for sub in ("verify", "list", "export", "validate", "bench"):
        assert sub in out
    with pytest.raises(SystemExit):
        cli.main(["verify", "--help"])
    out = capsys.readouterr().out
    for flag in ("--op", "--case", "--backend", "--dtype", "--verbose", "--failures-only",
                 "--quiet"):
        assert flag in out
    with pytest.raises(SystemExit):
        cli.main(["list", "--help"])
    assert "--json" in capsys.readouterr().out


def test_verify_prints_table_and_passes(capsys):
    assert cli.main(["verify", "--op", "linear_solve", "--backend", "all", "-v"]) == 0
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
    assert cli.main(["verify", "-q"]) == 1       # default output: no --verbose
    out = capsys.readouterr().out
    lines = out.splitlines()
    rows = [line.split() for line in lines]
    failing = {(r[0], r[4]) for r in rows if r and r[-1] == "FAIL"}
    assert ("planted", "adjoint") in failing and ("planted", "fd_vjp") in failing
    assert not any(name == "linear_solve" for name, _ in failing)
    # each failing check comes with its detail line (the adjoint test's two products)
    i = next(i for i, r in enumerate(rows) if r[:1] == ["planted"] and r[4] == "adjoint")
    assert "<Ju,v>=" in lines[i + 1] and "<u,J^Tv>=" in lines[i + 1]
    # passing checks get no row without --verbose
    assert not [r for r in rows if len(r) == 8 and r[-1] == "pass"]
    summary = {r[0]: r for r in rows if len(r) == 6 and r[-1] in ("pass", "FAIL")}
    assert summary["planted"][-1] == "FAIL" and summary["linear_solve"][-1] == "pass"
    assert "FAILED" in out
    # --failures-only prints the same rows (it is the default, kept for scripts)
    assert cli.main(["verify", "-q", "--failures-only"]) == 1
    again = capsys.readouterr().out.splitlines()
    def failing_rows(text_lines):      # the verdict line ("... FAILED (0.2s)") carries a timing
        return [r for r in text_lines if ("FAIL" in r and "FAILED" not in r) or "<Ju,v>" in r]
    assert failing_rows(again) == failing_rows(lines) and failing_rows(lines)


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
    assert "all checks passed" in proc.stdout


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


# --------------------------------------------------------------------------
# verify: what is printed by default and with --verbose
# --------------------------------------------------------------------------

def _check_names(op: str, case_id: str, dtype: str) -> set[str]:
    spec = registry.get_spec(op)
    return {r.check for r in registry.verify_case(spec, spec.case(case_id), dtype=dtype)}


def test_verify_default_prints_summary_and_verdict_but_no_check_rows(capsys):
    assert cli.main(["verify", "--op", "linear_solve", "--case", "scalar"]) == 0
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines()]
    assert "worst error/tol" in captured.out
    (summary,) = [r for r in rows if r and r[0] == "linear_solve"]
    n_checks = len(_check_names("linear_solve", "scalar", "float64")) + len(
        _check_names("linear_solve", "scalar", "float32"))
    # case runs: scalar in float64 and float32; checks: what verify_case returns for both
    assert summary == ["linear_solve", "2", str(n_checks), "0", summary[4], "pass"]
    checks = _check_names("linear_solve", "scalar", "float64")
    assert {"forward", "adjoint", "fd_vjp"} <= checks
    assert not any(set(r) & checks for r in rows)     # no per-check row
    assert captured.out.rstrip().splitlines()[-1].startswith(
        f"2 case runs, {n_checks} checks, all checks passed")
    assert "[1/2] linear_solve / scalar" in captured.err   # progress on stderr
    assert cli.main(["verify", "--op", "linear_solve", "--case", "scalar", "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_verify_verbose_prints_one_row_per_check(capsys):
    # an --op given twice runs once
    argv = ["verify", "--op", "linear_solve", "--op", "linear_solve", "--case", "scalar", "-q"]
    for flag in ("-v", "--verbose"):
        assert cli.main(argv + [flag]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        per_check = [r for r in rows if len(r) == 8 and r[0] == "linear_solve"]
        for dtype in ("float64", "float32"):
            got = [r[4] for r in per_check if r[1] == "scalar" and r[3] == dtype]
            assert sorted(got) == sorted(_check_names("linear_solve", "scalar", dtype))
            assert all(r[-1] == "pass" for r in per_check)
        (summary,) = [r for r in rows if len(r) == 6 and r[0] == "linear_solve"]
        assert summary[1] == "2" and summary[2] == str(len(per_check))


def test_verify_case_applies_to_every_operator_that_has_it(capsys):
    owners = [s.name for s in registry.all_specs() if any(c.id == "scalar" for c in s.cases)]
    assert len(owners) >= 2            # a shared id, else this test tests nothing
    assert cli.main(["verify", "--case", "scalar", "--dtype", "float64", "-q"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    summary = [r[0] for r in rows if len(r) == 6 and r[-1] == "pass"]
    assert summary == owners
    assert all(r[1] == "1" for r in rows if len(r) == 6 and r[0] in owners)


# --------------------------------------------------------------------------
# unknown operators and case ids: one line on stderr, exit status 2
# --------------------------------------------------------------------------

def _usage_error(capsys, argv, *names) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"refimpl {argv[0]}: ")
    for name in names:
        assert repr(name) in err
    assert "Traceback" not in err and captured.out == ""
    return err


def test_unknown_case_is_a_usage_error_naming_it(capsys, tmp_path):
    ids = [c.id for c in registry.get_spec("linear_solve").cases]
    err = _usage_error(capsys, ["verify", "--op", "linear_solve", "--case", "nosuch"], "nosuch")
    assert all(i in err for i in ids)            # lists the operator's cases
    err = _usage_error(capsys, ["verify", "--case", "nosuch"], "nosuch")
    assert "refimpl list" in err                 # points to where the ids are
    # an id of another operator is unknown for this one
    _usage_error(capsys, ["verify", "--op", "linear_solve", "--case", "uniform_4x2"],
                 "uniform_4x2")
    err = _usage_error(capsys, ["verify", "--op", "linear_solve", "--op", "tanh_deq",
                                "--case", "uniform_4x2"], "uniform_4x2")
    assert "linear_solve, tanh_deq" in err       # names the operators searched
    err = _usage_error(capsys, ["verify", "--case", "scalr"], "scalr")
    assert "did you mean 'scalar'" in err
    out = tmp_path / "vectors"
    # a good id next to a bad one is still refused, before anything is written
    _usage_error(capsys, ["export", str(out), "--op", "linear_solve", "--case", "scalar",
                          "--case", "nosuch"], "nosuch")
    assert not out.exists()
    err = _usage_error(capsys, ["validate", "linear_solve", "no_such_module:fn",
                                "--framework", "numpy", "--case", "nosuch"], "nosuch")
    assert all(i in err for i in ids)


def test_unknown_operator_is_a_usage_error_naming_it(capsys, tmp_path):
    names = [s.name for s in registry.all_specs()]
    for argv in (["verify", "--op", "nope"], ["verify", "--op", "linear_solve", "--op", "nope"],
                 ["export", str(tmp_path / "v"), "--op", "nope"],
                 ["validate", "nope", "no_such_module:fn", "--framework", "numpy"],
                 ["list", "nope"]):
        err = _usage_error(capsys, argv, "nope")
        assert all(n in err for n in names)       # lists the registered operators


def test_nothing_to_run_is_a_usage_error(capsys):
    float64_only = [c.id for c in registry.get_spec("linear_solve").cases
                    if c.dtypes == ("float64",)]
    assert float64_only
    _usage_error(capsys, ["verify", "--op", "linear_solve", "--case", float64_only[0],
                          "--dtype", "float32"], "float32")


def test_usage_errors_exit_2_without_traceback_from_the_shell():
    proc = subprocess.run([sys.executable, "-m", "refimpl.cli", "verify", "--case", "nosuch"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "'nosuch'" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_verbose_and_failures_only_exclude_each_other():
    with pytest.raises(SystemExit) as exc:
        cli.main(["verify", "-v", "--failures-only"])
    assert exc.value.code == 2


# --------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------

def test_list_shows_every_registered_operator(capsys):
    assert cli.main(["list"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip()}
    for spec in registry.all_specs():
        row = rows[spec.name]
        assert row[1] == str(len(spec.cases))
        assert row[2] == str(sum(c.for_candidates for c in spec.cases))
        assert row[4] == ("surrogate" if spec.surrogate else "exact")
        assert row[5] == ("yes" if spec.jvp is not None else "-")
    # the calling conventions DESIGN.md states for validate's candidates
    assert rows["linear_solve"][-4:] == ["fn(A,", "b)", "->", "x"]
    assert " ".join(rows["sinkhorn"][6:]) == "fn(C, a, b, *, eps) -> P"
    assert " ".join(rows["soft_topk"][6:]) == "fn(x, *, k, eps, largest) -> A"
    assert " ".join(rows["tanh_deq"][6:]) == "fn(x, W, U, b) -> z"


def test_list_op_shows_every_case(capsys):
    for spec in registry.all_specs():
        assert cli.main(["list", spec.name]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"{spec.name}: ")
        first = [line.split()[0] for line in lines if line.strip()]
        ids = [c.id for c in spec.cases]
        assert [f for f in first if f in ids] == ids, spec.name
    assert cli.main(["list", "sinkhorn"]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("vjp_cg ")]
    assert "eps=0.05" in row and "method=cg" in row and "float64,float32" in row
    assert "vjp(C, a, b, P_bar, *, eps) -> (C_bar, a_bar, b_bar)" in out
    assert cli.main(["list", "sinkhorn_unbalanced"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    # unbalanced cases are offered to candidates, which receive rho_a/rho_b
    assert [r[3] for r in rows if r and r[0] == "unbalanced"] == ["yes"]
    assert "fn(C, a, b, *, eps, rho_a, rho_b)" in out


def test_list_json(capsys):
    assert cli.main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in data["operators"]] == [s.name for s in registry.all_specs()]
    for o, spec in zip(data["operators"], registry.all_specs()):
        assert [c["id"] for c in o["cases"]] == [c.id for c in spec.cases]
    assert cli.main(["list", "sinkhorn", "--json"]) == 0
    op = json.loads(capsys.readouterr().out)
    assert op["validate_signature"] == "fn(C, a, b, *, eps) -> P"
    assert [i["name"] for i in op["inputs"]] == ["C", "a", "b"]
    (case,) = [c for c in op["cases"] if c["id"] == "uniform_4x2"]
    assert case["params"]["eps"] == 0.2 and case["candidate_kwargs"] == {"eps": 0.2}
    assert case["dtypes"] == ["float64", "float32"] and case["for_validate"] is True


def test_list_shows_named_gradients(capsys):
    """``refimpl list OP`` tells which ``--gradient NAME[:key=<type>,...]`` OP
    accepts: every entry of OpSpec.gradients, its options with their types and
    its description; the JSON form carries the same; an operator without named
    gradients has no such section."""
    spec = registry.get_spec("tanh_deq")
    assert cli.main(["list", "tanh_deq"]) == 0
    out = capsys.readouterr().out
    assert "--gradient" in out
    for name, ng in spec.gradients.items():
        form = ",".join(f"{k}=<{t.__name__}>" for k, t in ng.options.items())
        usage = f"{name}[:{form}]" if form else name
        (row,) = [line for line in out.splitlines() if line.split()[:1] == [usage]]
        assert ng.description in row
    assert "neumann[:k=<int>,lam=<float>]" in out and "unroll[:k=<int>,lam=<float>]" in out
    assert cli.main(["list", "tanh_deq", "--json"]) == 0
    grads = json.loads(capsys.readouterr().out)["gradients"]
    assert [g["name"] for g in grads] == list(spec.gradients)
    (neumann,) = [g for g in grads if g["name"] == "neumann"]
    assert neumann["options"] == {"k": "int", "lam": "float"}
    assert neumann["usage"] == "neumann[:k=<int>,lam=<float>]"
    # every advertised usage is accepted by validate's parser
    from refimpl.validate import parse_gradient
    assert parse_gradient(spec, "neumann:k=3,lam=0.25") == ("neumann", {"k": 3, "lam": 0.25})
    assert cli.main(["list", "sinkhorn"]) == 0
    assert "--gradient" not in capsys.readouterr().out
    assert cli.main(["list", "sinkhorn", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gradients"] == []


def test_list_value_operator(capsys):
    """The Sinkhorn values: a scalar per batch member, candidates fn(C, a, b, *, eps)."""
    for name in ("sinkhorn_linear", "sinkhorn_entropic", "sinkhorn_kl"):
        assert cli.main(["list", name]) == 0
        out = capsys.readouterr().out
        assert "fn(C, a, b, *, eps) -> value" in out and "(0-d core)" in out
        assert "vjp(C, a, b, value_bar, *, eps) -> (C_bar, a_bar, b_bar)" in out
        assert "additive_cost" in out


def test_verify_exclude_case(capsys):
    ids = [c.id for c in registry.get_spec("linear_solve").cases]
    assert cli.main(["verify", "--op", "linear_solve", "--dtype", "float64", "-q",
                     *[w for cid in ids if cid != "scalar" for w in ("--exclude-case", cid)]]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    (summary,) = [r for r in rows if len(r) == 6 and r[0] == "linear_solve"]
    assert summary[1] == "1"           # one case run: scalar
    _usage_error(capsys, ["verify", "--op", "linear_solve", "--exclude-case", "nope"], "nope")
