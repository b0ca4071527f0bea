"""Sinkhorn values as validate operators: ``sinkhorn_linear``, ``sinkhorn_entropic``,
``sinkhorn_kl`` (calling convention ``fn(C, a, b, *, eps) -> value``).

The candidate here is written independently of refimpl: its own log-domain
Sinkhorn iterations (SciPy's ``logsumexp``), the values by their primal
formulas, the envelope gradients ``(P, f, g)`` of the entropic and KL
values, and for ``<C, P>`` a dense implicit differentiation of the dual
stationarity conditions (gauge ``g_m = 0``).  It must pass every case of
each operator; candidates with one planted mistake must fail where the
mistake shows, and nowhere else.
"""

import numpy as np
import pytest
from scipy.special import logsumexp, xlogy

from refimpl import cli, registry
from refimpl.validate import validate

VALUE_OPS = ("sinkhorn_linear", "sinkhorn_entropic", "sinkhorn_kl")


# --------------------------------------------------------------------------
# An independent NumPy candidate (one problem at a time: unbatched=True)
# --------------------------------------------------------------------------

def _solve(C, a, b, eps, iters=20000):
    """Potentials of the balanced problem by log-domain Sinkhorn, stopped when every
    row marginal entry is right relative to its own size (to 1e-15, or once the
    error stops decreasing below 1e-13: round-off)."""
    g = np.zeros(len(b))
    prev = np.inf
    for _ in range(iters):
        f = eps * (np.log(a) - logsumexp((g[None, :] - C) / eps, axis=1))
        g = eps * (np.log(b) - logsumexp((f[:, None] - C) / eps, axis=0))
        P = np.exp((f[:, None] + g[None, :] - C) / eps)
        err = np.max(np.abs(P.sum(1) - a) / a)
        if err < 1e-15 or (err < 1e-13 and err >= prev):
            break
        prev = err
    return f, g, P


def _linear_grad(C, P, eps):
    """d<C, P>/d(C, a, b) by implicit differentiation of P 1 = a, (P^T 1)_{<m} = b_{<m}
    in z = (f, g_{<m}) (g_m = 0): with H = dR/dz (symmetric, solved scaled to unit
    diagonal) and the adjoint lam = H^{-1} s, s = d<C,P>/dz,
    C_bar = P - C * P / eps + P * (lam_f 1^T + 1 lam_g^T) / eps, a_bar = lam_f, b_bar = (lam_g, 0)."""
    n, m = P.shape
    H = np.block([[np.diag(P.sum(1)), P[:, :-1]], [P[:, :-1].T, np.diag(P.sum(0)[:-1])]]) / eps
    CP = C * P
    s = np.concatenate([CP.sum(1), CP.sum(0)[:-1]]) / eps
    d = 1.0 / np.sqrt(np.diag(H))             # unit diagonal: marginal entries of 1e-12
    lam = d * np.linalg.solve(H * d[:, None] * d[None, :], d * s)
    lf, lg = lam[:n], np.append(lam[n:], 0.0)
    C_bar = P - CP / eps + P * (lf[:, None] + lg[None, :]) / eps
    return C_bar, lf, lg


def make_candidate(kind, bug=None):
    """``(fn, vjp)`` of the value ``kind`` ('linear', 'entropic', 'kl') with an
    optional planted ``bug``."""

    def parts(C, a, b, eps):
        f, g, P = _solve(C, a, b, eps)
        ab = np.outer(a, b)
        linear = np.sum(C * P)
        entropic = linear + eps * np.sum(xlogy(P, P) - P)
        kl = linear + eps * np.sum(xlogy(P, P / ab) - P + ab)
        if kind == "linear":
            value, grad = linear, _linear_grad(C, P, eps)
            if bug == "envelope_for_linear":      # dP/dC ignored: C_bar = P
                grad = (P, *grad[1:])
        elif kind == "entropic":
            value, grad = entropic, (P, f, g)
            if bug == "no_entropy":
                value = linear
            if bug == "grad_over_eps":
                grad = (P, f / eps, g / eps)
        else:
            Ma, Mb = a.sum(), b.sum()
            grad = (P, f - eps * np.log(a) - eps + eps * Mb, g - eps * np.log(b) - eps + eps * Ma)
            value = kl
            if bug == "unit_mass":                # + eps instead of + eps sum(a) sum(b)
                value = kl - eps * Ma * Mb + eps
                grad = (P, grad[1] - eps * Mb, grad[2] - eps * Ma)
        if bug == "gauge_shift":                  # (c, -c): must be forgiven
            grad = (grad[0], grad[1] + 7.0, grad[2] - 7.0)
        return value, grad, P

    def fn(C, a, b, *, eps):
        value, _, P = parts(C, a, b, eps)
        return P if bug == "plan_output" else np.asarray(value)

    def vjp(C, a, b, value_bar, *, eps):
        _, grad, _ = parts(C, a, b, eps)
        return tuple(value_bar * x for x in grad)

    return fn, vjp


def _run(op, bug=None, **kw):
    fn, vjp = make_candidate(op.removeprefix("sinkhorn_"), bug)
    return validate(op, fn, framework="numpy", vjp=vjp, unbatched=True, **kw)


def _status(report):
    return {c.case: c.status for c in report.cases}


@pytest.mark.parametrize("op", VALUE_OPS)
def test_correct_candidate_passes_every_case(op):
    report = _run(op)
    assert len(report.cases) == len(registry.get_spec(op).cases)
    assert report.passed, report.table()
    # both sides are well inside the tolerances, not at their edge
    for c in report.cases:
        assert c.forward_error <= 1e-11 and c.gradient_error <= 1e-8, report.table()


@pytest.mark.parametrize("op", ("sinkhorn_entropic", "sinkhorn_kl"))
def test_gauge_shift_is_forgiven(op):
    assert _run(op, "gauge_shift", cases=["uniform_4x2", "shared_marginals"]).passed


def test_entropic_without_entropy_term_fails_forward():
    report = _run("sinkhorn_entropic", "no_entropy", cases=["uniform_4x2", "additive_cost"])
    assert set(_status(report).values()) == {"FAIL"}, report.table()
    assert all(c.verdict.startswith("forward off") for c in report.cases), report.table()


def test_gradient_off_by_eps_fails():
    report = _run("sinkhorn_entropic", "grad_over_eps", cases=["uniform_4x2", "batch_scales"])
    assert set(_status(report).values()) == {"FAIL"}, report.table()
    assert all(c.verdict == "gradient off" for c in report.cases), report.table()
    assert all(c.gradient_errors["a"] > 1.0 for c in report.cases), report.table()


def test_plan_instead_of_value_is_an_error():
    report = _run("sinkhorn_linear", "plan_output", cases=["uniform_4x2"])
    (c,) = report.cases
    assert c.status == "ERROR" and "shape" in c.message, report.table()


def test_envelope_gradient_for_the_linear_value_fails_where_the_plan_moves():
    """<C, P> is not a minimum value: C_bar = P misses <C, dP>.  That term
    vanishes only where P does not depend on C along the case's data (one row)
    or where C is additive (dP has zero row and column sums), so exactly those
    cases pass."""
    report = _run("sinkhorn_linear", "envelope_for_linear")
    status = _status(report)
    assert {k for k, v in status.items() if v == "pass"} == {"single_row", "additive_cost"}, \
        report.table()
    failed = [c for c in report.cases if c.status == "FAIL"]
    assert all(c.gradient_errors["C"] > 100 * c.gradient_tol for c in failed), report.table()


def test_kl_value_with_unit_mass_offset():
    """``+ eps`` instead of ``+ eps sum(a) sum(b)``: the value is right for unit
    masses, but its gradient lacks ``(eps sum(b), eps sum(a))``, a (c, c) shift
    the gauge does not forgive; with masses 1e-4 .. 1e4 the value is off too."""
    report = _run("sinkhorn_kl", "unit_mass", cases=["uniform_4x2", "batch_scales"])
    got = {c.case: c for c in report.cases}
    assert got["uniform_4x2"].status == "FAIL" and got["uniform_4x2"].verdict == "gradient off"
    assert got["uniform_4x2"].forward_error <= 1e-12
    assert got["batch_scales"].status == "FAIL"
    assert got["batch_scales"].verdict.startswith("forward and gradient off"), report.table()


def test_values_are_related_as_documented():
    """entropic = linear + eps sum P (log P - 1), KL = linear + eps KL(P | a b^T):
    the three reference outputs of one case against the candidate's own plan."""
    for case in ("uniform_4x2", "batch_scales"):
        outs = {}
        for op in VALUE_OPS:
            spec = registry.get_spec(op)
            host = registry._make_host(spec, spec.case(case), "float64",
                                       np.random.default_rng(spec.case(case).seed))
            res = spec.forward(*(host[k] for k in spec.inputs), **spec.case(case).params)
            outs[op] = np.asarray(res.value)
        C, a, b = host["C"], host["a"], host["b"]
        eps = spec.case(case).params["eps"]
        for m in np.ndindex(*np.shape(outs["sinkhorn_linear"])):
            Cm = np.broadcast_to(C, outs["sinkhorn_linear"].shape + C.shape[-2:])[m]
            am = np.broadcast_to(a, outs["sinkhorn_linear"].shape + a.shape[-1:])[m]
            bm = np.broadcast_to(b, outs["sinkhorn_linear"].shape + b.shape[-1:])[m]
            _, _, P = _solve(Cm, am, bm, eps)
            ab = np.outer(am, bm)
            lin = outs["sinkhorn_linear"][m]
            np.testing.assert_allclose(outs["sinkhorn_entropic"][m],
                                       lin + eps * np.sum(xlogy(P, P) - P), rtol=1e-10)
            np.testing.assert_allclose(outs["sinkhorn_kl"][m],
                                       lin + eps * np.sum(xlogy(P, P / ab) - P + ab), rtol=1e-10)


# --------------------------------------------------------------------------
# The registry checks catch planted mistakes in the reference's own VJP
# --------------------------------------------------------------------------

def _failed_checks(spec, case_id):
    return {r.check for r in registry.verify_case(spec, spec.case(case_id)) if not r.passed}


def test_verify_catches_a_reference_gradient_off_by_eps():
    spec = registry.get_spec("sinkhorn_entropic")
    good = spec.vjp

    def vjp(res, w, **kw):
        C_bar, a_bar, b_bar = good(res, w, **kw)
        return C_bar, a_bar / res.plan.eps, b_bar / res.plan.eps

    import dataclasses
    bad = dataclasses.replace(spec, vjp=vjp)
    assert {"fd_vjp", "adjoint", "gradient_closed_form"} <= _failed_checks(bad, "additive_cost")
    assert "envelope_vs_oracle_plan" in _failed_checks(bad, "uniform_4x2")


def test_verify_catches_a_value_missing_its_entropy_term():
    import dataclasses
    spec = registry.get_spec("sinkhorn_entropic")
    linear = registry.get_spec("sinkhorn_linear")
    bad = dataclasses.replace(spec, forward=linear.forward)
    failed = _failed_checks(bad, "additive_cost")
    assert {"forward", "value_closed_form"} <= failed


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

@pytest.mark.parametrize("op", VALUE_OPS)
def test_cli_verify_passes(op, capsys):
    assert cli.main(["verify", "--op", op, "--dtype", "all", "-q"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out


def test_cli_list_value_operator(capsys):
    assert cli.main(["list", "sinkhorn_entropic"]) == 0
    out = capsys.readouterr().out
    assert "fn(C, a, b, *, eps) -> value" in out
    assert "additive_cost" in out and "batch_scales" in out


def test_golden_vectors_round_trip_scalar_outputs(tmp_path):
    """Exported value vectors keep their 0-d outputs and cotangents (a value per
    unbatched case), load back, and validate against them as against a recomputation."""
    from refimpl import vectors
    vectors.export(tmp_path, ops=["sinkhorn_entropic"])
    gv = vectors.load(tmp_path)
    case = gv.case("sinkhorn_entropic", "uniform_4x2")
    assert case.output.shape == () and case.cotangent.shape == ()
    report = _run("sinkhorn_entropic", vectors_dir=tmp_path)
    assert report.passed, report.table()
