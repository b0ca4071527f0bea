"""refimpl.validate's comparison maths: the operator's natural round-off floor
(no false alarm on backward-stable code near the hard limit, known bugs still
caught) and ``against="self"`` (a VJP judged against finite differences of the
candidate's own forward), with the per-case verdict of the normal report.

The candidates live in tests/validate_candidates.py, written from the
operators' definitions, not from refimpl's code.
"""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from refimpl import cli, registry, vectors
from refimpl.validate import FLOOR, self_consistency, validate

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import validate_candidates as vc  # noqa: E402  (a helper module beside this file)

SOFT_TOPK = registry.get_spec("soft_topk")
SQRTM = registry.get_spec("sqrtm")
NEAR_HARD = [c.id for c in SOFT_TOPK.cases if "near_hard" in c.flags]


def _statuses(report):
    return {c.case: c.status for c in report.cases}


# --------------------------------------------------------------------------
# The natural round-off floor (SOFT top-k: max|A_bar| / t)
# --------------------------------------------------------------------------

def test_backward_stable_soft_topk_passes_every_case():
    """Bisection for theta plus one Newton step for the graph: its gradient is the
    implicit one up to a term |F| max|A_bar| (s_i/S) / t, F the rounding residual of
    sum(A) = k; every case passes, the near-hard ones included."""
    assert NEAR_HARD, "the registry has near-hard SOFT top-k cases"
    report = validate(SOFT_TOPK, vc.soft_topk, framework="numpy", vjp=vc.soft_topk_vjp)
    assert report.passed, report.table()
    assert set(NEAR_HARD) <= {c.case for c in report.cases}


def test_generic_floor_alone_raises_a_false_alarm_near_the_hard_limit():
    """Without the declared scale (the generic |out_bar| |out| / max(|x|, 1)), the same
    candidate fails tiny_eps: its gradient, zero in exact arithmetic, comes out as
    ~1e-10, round-off of 1/t = 2e6 but far above round-off of |A_bar| |A| / |x|."""
    generic = dataclasses.replace(SOFT_TOPK, gradient_scale=None)
    report = validate(generic, vc.soft_topk, framework="numpy", vjp=vc.soft_topk_vjp,
                      cases=NEAR_HARD)
    assert _statuses(report)["tiny_eps"] == "FAIL", report.table()
    # and the error really is round-off of the natural size max|A_bar| / t
    gc = vectors.reference_case(SOFT_TOPK, SOFT_TOPK.case("tiny_eps"))
    (xb,) = vc.soft_topk_vjp(gc.inputs["x"], gc.cotangent, **gc.candidate_kwargs)
    natural = np.max(np.abs(gc.cotangent)) / (gc.params["eps"] / 2.0)
    assert 0.0 < np.max(np.abs(xb - gc.vjp["x"])) <= FLOOR * natural


def test_soft_topk_natural_scale_bounds_the_jacobian():
    """The declared size is the Jacobian's own scale: |x_bar_i| = s_i |A_bar_i - m| / t
    <= max|A_bar| / (2t) for every reference gradient (it never sits below the
    gradient's size), and a tie (all_equal, k/n = 1/2: s = 1/4) comes within a
    factor 8 of it."""
    for case in SOFT_TOPK.cases:
        gc = vectors.reference_case(SOFT_TOPK, case)
        (scale,) = SOFT_TOPK.gradient_scale(gc.inputs, gc.output, gc.cotangent, gc.params)
        bound = np.broadcast_to(scale, gc.vjp["x"].shape) / 2.0
        assert np.all(np.abs(gc.vjp["x"]) <= bound * (1 + 1e-6)), case.id
    x = np.full(6, 0.3)
    v = np.array([1.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    eps = 0.2
    res = SOFT_TOPK.forward(x, 3, eps=eps)
    xb = np.asarray(SOFT_TOPK.vjp(res, v)[0])
    assert np.max(np.abs(xb)) >= np.max(np.abs(v)) / (eps / 2.0) / 8.0


SOFT_TOPK_BUGS = {
    # name: (vjp, cases that must fail)
    "forgotten 1/t": (vc.soft_topk_vjp_no_inv_t, ["closed_largest", "batch_scales"]),
    "t = eps, not eps/2": (vc.soft_topk_vjp_t_is_eps, ["closed_largest", "batch_scales"]),
    "theta term dropped": (vc.soft_topk_vjp_no_theta, ["closed_largest", "batch_scales"]),
    "sign of largest=False": (vc.soft_topk_vjp_no_sign, ["closed_smallest"]),
}


@pytest.mark.parametrize("bug", SOFT_TOPK_BUGS)
@pytest.mark.parametrize("against", ["reference", "self"])
def test_soft_topk_bugs_still_fail(bug, against):
    """Known bugs fail with the natural floor, on the near-hard batch too (its rows of
    scale 1e-2 and 1 are not saturated), against the reference and against self."""
    vjp, must_fail = SOFT_TOPK_BUGS[bug]
    report = validate(SOFT_TOPK, vc.soft_topk, framework="numpy", vjp=vjp, cases=must_fail,
                      against=against)
    assert all(c.status == "FAIL" for c in report.cases), report.table()
    if against == "reference":
        assert all(c.verdict == "gradient off" for c in report.cases), report.table()


# --------------------------------------------------------------------------
# against="self"
# --------------------------------------------------------------------------

def test_approximate_forward_with_its_own_derivative_passes_against_self():
    """A fixed few Newton-Schulz steps: not the square root to 1e-12, but its VJP is the
    exact unrolled derivative of what it computes."""
    report = validate(SQRTM, vc.sqrtm_ns, framework="numpy", vjp=vc.sqrtm_ns_vjp,
                      against="self")
    assert report.passed, report.table()
    assert all(c.verdict == "gradient consistent with own forward" for c in report.cases)
    assert all(c.forward_error is None for c in report.cases)


def test_approximate_forward_fails_against_the_reference_with_a_verdict():
    """Against the reference the same candidate fails where its forward is off, and the
    report says the forward, not the gradient, is to blame."""
    report = validate(SQRTM, vc.sqrtm_ns, framework="numpy", vjp=vc.sqrtm_ns_vjp)
    failed = [c for c in report.cases if c.status == "FAIL"]
    assert {"eig_exact", "ill_conditioned", "batched_scales_lyapunov_sign"} <= {
        c.case for c in failed}, report.table()
    for c in failed:
        assert c.forward_error > c.forward_tol
        assert c.verdict.endswith("gradient consistent with own forward"), report.table()
        assert "the forward, not the backward, departs" in c.message
    assert "verdict" in report.table().splitlines()[2]


def test_vjp_that_is_not_the_derivative_of_its_forward_fails_against_self():
    """The true root's gradient under the Newton-Schulz forward, and the unrolled VJP
    with the normalisation's term dropped: both fail where the forward is not exact
    (Newton-Schulz is exact on a multiple of the identity and on 1x1)."""
    inexact = ["eig_exact", "repeated_eigenvalues", "ill_conditioned", "diagonal",
               "batched_scales_lyapunov_sign", "two_by_two"]
    for vjp in (vc.sqrtm_exact_vjp, vc.sqrtm_ns_vjp_no_norm_term):
        report = validate(SQRTM, vc.sqrtm_ns, framework="numpy", vjp=vjp, against="self",
                          cases=inexact + ["scaled_identity"])
        status = _statuses(report)
        assert all(status[c] == "FAIL" for c in inexact), report.table()
        assert status["scaled_identity"] == "pass", report.table()
        for c in report.cases:
            if c.status == "FAIL":
                assert c.verdict == "gradient not the derivative of own forward"
                assert "<out_bar, FD> = " in c.message and "<vjp, d> = " in c.message


def test_reference_verdict_separates_forward_and_gradient():
    """The exact root's gradient with the approximate forward: against the reference
    only the forward is off, and the gradient is not the derivative of that forward;
    a correct candidate has no verdict; the exact root with the unrolled (approximate)
    gradient is 'gradient off'."""
    report = validate(SQRTM, vc.sqrtm_ns, framework="numpy", vjp=vc.sqrtm_exact_vjp,
                      cases=["eig_exact"])
    (c,) = report.cases
    assert c.status == "FAIL" and c.gradient_error <= c.gradient_tol
    assert c.verdict == "forward off; gradient not the derivative of own forward"
    report = validate(SQRTM, vc.sqrtm_exact, framework="numpy", vjp=vc.sqrtm_exact_vjp)
    assert report.passed and all(c.verdict == "" for c in report.cases), report.table()
    assert "verdict" not in report.table()
    report = validate(SQRTM, vc.sqrtm_exact, framework="numpy", vjp=vc.sqrtm_ns_vjp,
                      cases=["eig_exact"])
    (c,) = report.cases
    assert c.status == "FAIL" and c.verdict == "gradient off"


def test_self_consistency_checks_each_batch_member():
    """A 1e-6 error in the gradient of the smallest member (scale 1e-6 of the largest)
    is caught by the per-member directions."""
    case = SQRTM.case("batched_scales_lyapunov_sign")
    gc = vectors.reference_case(SQRTM, case)
    A = gc.inputs["A"]
    out = vc.sqrtm_ns(A)
    (bar,) = vc.sqrtm_ns_vjp(A, gc.cotangent)
    checks = self_consistency(vc.sqrtm_ns, SQRTM, gc, out, [bar], 1e-8)
    assert all(c.passed for c in checks), checks
    bad = bar.copy()
    bad[0] *= 1.0 + 1e-6
    checks = self_consistency(vc.sqrtm_ns, SQRTM, gc, out, [bad], 1e-8)
    failed = [c for c in checks if not c.passed]
    assert failed and all(c.where.startswith("member [0]") for c in failed), checks


@pytest.mark.parametrize("spec", [s for s in registry.all_specs() if not s.surrogate],
                         ids=lambda s: s.name)
def test_reference_is_consistent_with_its_own_forward(spec):
    """Every non-surrogate reference, called as a candidate, passes against="self":
    the finite differences of the reference forwards (tolerance-based Sinkhorn and
    fixed-point solves included) resolve their derivatives within the tolerance."""
    for case in spec.cases:
        if "float64" not in case.dtypes or not case.for_candidates:
            continue

        def fn(*xs, case=case, **kw):
            return np.asarray(getattr(spec.forward(*xs, **case.params), spec.output))

        def vjp(*args, case=case, **kw):
            *xs, out_bar = args
            return tuple(spec.vjp(spec.forward(*xs, **case.params), out_bar, **case.vjp_params))

        one = dataclasses.replace(spec, cases=(case,))
        report = validate(one, fn, framework="numpy", vjp=vjp, against="self")
        assert report.passed, report.table()


def test_against_usage_errors():
    with pytest.raises(ValueError, match="'against'"):
        validate(SQRTM, vc.sqrtm_ns, framework="numpy", vjp=vc.sqrtm_ns_vjp, against="own")
    surrogate = next(s for s in registry.all_specs() if s.surrogate)
    with pytest.raises(ValueError, match="surrogate"):
        validate(surrogate, vc.sqrtm_ns, framework="numpy", vjp=vc.sqrtm_ns_vjp,
                 against="self")


def test_cli_against_self(capsys):
    target = f"{HERE / 'validate_candidates.py'}"
    args = ["validate", "sqrtm", f"{target}:sqrtm_ns", "--framework", "numpy",
            "--vjp", f"{target}:sqrtm_ns_vjp", "--case", "eig_exact"]
    assert cli.main(args + ["--against", "self"]) == 0
    out = capsys.readouterr().out
    assert "gradient consistent with own forward" in out and "PASS" in out
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "forward and gradient off; gradient consistent with own forward" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(args + ["--against", "nope"])
    assert exc.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_forward_that_is_not_smooth_is_inconclusive_not_passed():
    """A forward rounded to a grid of 1e-4 of its size (as a tolerance-based stopping
    rule makes it, at the scale of the difference steps): the differences do not
    settle, and the case is never reported as passing."""
    sys.path.insert(0, str(HERE.parent / "examples"))
    try:
        import numpy_linear_solve as ex
    finally:
        sys.path.remove(str(HERE.parent / "examples"))

    def rounded(A, b):
        x = ex.linear_solve(A, b)
        q = 1e-4 * np.abs(x).max()
        return np.round(x / q) * q

    report = validate("linear_solve", rounded, framework="numpy", vjp=ex.linear_solve_vjp,
                      against="self", cases=["well_conditioned", "shared_matrix"])
    assert not any(c.passed for c in report.cases), report.table()
    vague = [c for c in report.cases if c.status == "ERROR"]
    assert vague and all(c.verdict.startswith("inconclusive") for c in vague), report.table()
    assert all("is the forward smooth" in c.message for c in vague)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def test_torch_soft_topk_with_a_newton_step_for_the_graph(torch):
    """The common PyTorch pattern: theta by bisection without a graph, then one Newton
    step theta_0 + t F / S with autograd, A = sigmoid((x - theta)/t).  Its autodiff
    gradient is right to round-off of max|A_bar| / t: every case passes, near-hard
    ones included; with theta detached (no Newton step in the graph) it fails."""

    def make(detach):
        def soft_topk(x, *, k, eps, largest=True):
            n = x.shape[-1]
            if k in (0, n):
                return torch.full_like(x, float(k == n)) + 0.0 * x
            t = eps / 2.0
            xs = x if largest else -x
            with torch.no_grad():
                th0 = torch.as_tensor(vc._bisect_theta(xs.detach().numpy(), k, t))[..., None]
            z0 = (xs - th0) / t
            a0 = torch.sigmoid(z0)
            S = (a0 * torch.sigmoid(-z0)).sum(-1, keepdim=True)
            F = a0.sum(-1, keepdim=True) - k
            step = torch.where(S > 0, t * F / torch.where(S > 0, S, torch.ones_like(S)),
                               torch.zeros_like(S))
            theta = th0 + (step.detach() if detach else step)
            return torch.sigmoid((xs - theta) / t)
        return soft_topk

    report = validate(SOFT_TOPK, make(False), framework="torch")
    assert report.passed, report.table()
    generic = dataclasses.replace(SOFT_TOPK, gradient_scale=None)
    report = validate(generic, make(False), framework="torch", cases=NEAR_HARD)
    assert not report.passed, report.table()          # the false alarm of the generic floor
    report = validate(SOFT_TOPK, make(True), framework="torch",
                      cases=["closed_largest", "batch_scales"])
    assert all(c.status == "FAIL" and c.verdict == "gradient off" for c in report.cases), \
        report.table()


def test_against_self_reports_a_mutating_candidate():
    def ns_mutating(A):
        S = vc.sqrtm_ns(A)
        A[..., 0, 0] += 1e-3            # the caller's array
        return S

    report = validate(SQRTM, ns_mutating, framework="numpy", vjp=vc.sqrtm_ns_vjp,
                      against="self", cases=["eig_exact"])
    (c,) = report.cases
    assert c.status == "FAIL" and "modified its input(s) A in place" in c.message
