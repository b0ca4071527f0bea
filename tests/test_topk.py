"""SOFT top-k (refimpl.topk): the note's list of properties, each against an
independent route (hard top-k by sorting, scipy/mpmath roots, finite
differences, the other path, closed-form instances).

The registry (tests/test_registry.py) additionally runs every curated case
through the oracle, adjoint, finite-difference, batch and no-mutation checks.
"""

import math
import warnings

import numpy as np
import pytest

from refimpl import topk
from refimpl.backend import ConvergenceWarning, to_host
from refimpl.check import fd_jacobian

#: Normwise relative tolerances per dtype (float32: documented, looser).
TOL = {"float64": 1e-11, "float32": 2e-5}


def host(a):
    return to_host(a).astype(np.float64)


def distinct_scores(rng, shape, min_gap=0.05):
    """Scores whose sorted neighbours are at least ``min_gap`` apart (per row)."""
    n = shape[-1]
    base = np.arange(n) * min_gap + np.cumsum(rng.random(shape), axis=-1) * 0.1
    return np.take_along_axis(base, np.argsort(rng.random(shape), axis=-1), axis=-1)


def hard_by_sort(x, k, largest=True):
    """1 on the k best scores (no ties) by an argsort, independent of topk."""
    order = np.argsort(-x if largest else x, axis=-1, kind="stable")
    out = np.zeros_like(x)
    np.put_along_axis(out, order[..., :k], 1.0, axis=-1)
    return out


def dense_jacobian(res, n):
    """J[i, j] = dA_i/dx_j from n JVPs with unit vectors (host, float64)."""
    x = res.x
    cols = []
    for j in range(n):
        e = np.zeros(n)
        e[j] = 1.0
        ej = topk.backend.from_host(e, topk.backend.namespace(x=x), device=topk.backend.device(x),
                                    dtype=x.dtype)
        cols.append(host(topk.soft_topk_jvp(res, ej)))
    return np.stack(cols, axis=1)


# --------------------------------------------------------------------------
# Forward: definition, sum, limits, bound
# --------------------------------------------------------------------------

@pytest.mark.parametrize("largest", [True, False])
def test_sum_is_k_and_matches_brentq_sigmoid(backend, dtype, rng, largest):
    from scipy.optimize import brentq
    from scipy.special import expit

    x_h = rng.standard_normal((4, 11)) * np.array([[0.1], [1.0], [3.0], [30.0]])
    x = backend.asarray(x_h, dtype)
    x_h = host(x)
    for k in (1, 4, 10):
        for eps in (0.03, 0.3, 3.0):
            res = topk.soft_topk(x, k, eps=eps, largest=largest)
            A = host(res.A)
            assert res.all_converged
            assert np.max(np.abs(A.sum(-1) - k)) <= TOL[dtype] * k * 10
            t = eps / 2
            sgn = 1.0 if largest else -1.0
            for r in range(4):
                th = brentq(lambda th: expit(sgn * (x_h[r] - th) / t).sum() - k,
                            x_h[r].min() - 60 * t - 1, x_h[r].max() + 60 * t + 1,
                            xtol=1e-300, rtol=8.9e-16, maxiter=1000)
                expected = expit(sgn * (x_h[r] - th) / t)
                assert np.max(np.abs(A[r] - expected)) <= TOL[dtype] * 10, (k, eps, r)
                # The reported threshold reproduces A through the closed form.
                again = expit(sgn * (x_h[r] - float(host(res.theta)[r])) / t)
                assert np.max(np.abs(again - expected)) <= TOL[dtype] * 10 * max(1.0, 1 / eps)


def test_relative_accuracy_of_every_entry_mpmath():
    """Entries far in the tails (1e-100) are accurate relative to themselves."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    rng = np.random.default_rng(7)
    x = rng.standard_normal(40)
    eps, k = 0.01, 5
    res = topk.soft_topk(x, k, eps=eps)
    t = mpmath.mpf(eps) / 2
    xm = [mpmath.mpf(float(v)) for v in x]
    th = mpmath.findroot(lambda th: sum(1 / (1 + mpmath.exp(-(v - th) / t)) for v in xm) - k,
                         mpmath.mpf(float(res.theta)))
    exact = np.array([float(1 / (1 + mpmath.exp(-(v - th) / t))) for v in xm])
    z = np.abs((x - float(th)) / float(t))
    # Relative error ~ u |z| (the conditioning of exp), not ~ u / A.
    rel = np.abs(res.A - exact) / exact
    assert np.all(rel <= 1e-15 * (10 + 4 * z)), rel.max()
    assert exact.min() < 1e-100


@pytest.mark.parametrize("largest", [True, False])
def test_eps_to_zero_recovers_hard_topk(backend, dtype, rng, largest):
    x_h = distinct_scores(rng, (3, 9), min_gap=0.05)
    x = backend.asarray(x_h, dtype)
    for k in (1, 3, 8):
        expected = hard_by_sort(host(x), k, largest)
        for eps in (1e-4, 1e-8, 1e-30):
            A = host(topk.soft_topk(x, k, eps=eps, largest=largest).A)
            assert np.all(np.isfinite(A))
            bound = topk.soft_topk_error_bound(eps, 0.05, k, 9)
            assert np.all(np.abs(A - expected).sum(-1) <= bound), (k, eps)
            if eps <= 1e-8:                     # exp(-0.025/t) underflows: exact 0/1
                assert np.array_equal(A, expected), (k, eps)
        hard = host(topk.hard_topk(x, k, largest=largest))
        assert np.array_equal(hard, expected)


@pytest.mark.parametrize("method", ["closed_form", "sinkhorn"])
def test_error_bound_holds(rng, method):
    """||A_eps - A_hard||_1 <= 2 max(k, n-k) exp(-delta/eps) over a sweep."""
    ratios = []
    for trial in range(30 if method == "closed_form" else 6):
        n = int(rng.integers(2, 40))
        k = int(rng.integers(1, n))
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-1, 1)
        delta = float(topk.boundary_gap(x, k))
        srt = np.sort(x)[::-1]
        assert delta == pytest.approx(srt[k - 1] - srt[k], abs=0)
        for eps in delta * np.array([0.05, 0.2, 1.0, 5.0]):
            if method == "sinkhorn" and eps < 0.3 * delta:
                continue   # Sinkhorn is slow when eps << gap
            A = topk.soft_topk(x, k, eps=eps, method=method, max_iter=200_000).A
            err = np.abs(A - hard_by_sort(x, k)).sum()
            bound = topk.soft_topk_error_bound(eps, delta, k, n)
            assert err <= bound * (1 + 1e-9) + 1e-12, (n, k, eps, err, bound)
            if err > 1e-300:
                ratios.append(err / bound)
    # ... and the bound is not vacuous: within a factor ~2 max(k, n-k) at worst.
    assert max(ratios) > 1e-3


def test_error_bound_function_edges():
    assert topk.soft_topk_error_bound(0.1, 0.5, 0, 5) == 0.0
    assert topk.soft_topk_error_bound(0.1, 0.5, 5, 5) == 0.0
    assert topk.soft_topk_error_bound(0.1, 0.0, 2, 5) == 6.0        # 2 max(k, n-k)
    assert topk.soft_topk_error_bound(0.5, 1.0, 1, 4, anchors=(0.0, 2.0)) == pytest.approx(
        6.0 * math.exp(-4.0))
    with pytest.raises(ValueError, match="'eps'"):
        topk.soft_topk_error_bound(0.0, 1.0, 1, 3)
    with pytest.raises(ValueError, match="'delta'"):
        topk.soft_topk_error_bound(0.1, -1.0, 1, 3)
    with pytest.raises(ValueError, match="'k'"):
        topk.soft_topk_error_bound(0.1, 1.0, 4, 3)
    with pytest.raises(ValueError, match="'anchors'"):
        topk.soft_topk_error_bound(0.1, 1.0, 1, 3, anchors=(1.0, 0.0))
    with pytest.raises(TypeError, match="'delta'"):
        topk.soft_topk_error_bound(0.1, None, 1, 3)
    with pytest.raises(ValueError, match="'delta'"):
        topk.soft_topk_error_bound(0.1, math.nan, 1, 3)
    for bad_n, exc in ((0, ValueError), (-3, ValueError), (4.0, TypeError), ("4", TypeError)):
        with pytest.raises(exc, match="'n'"):
            topk.soft_topk_error_bound(0.1, 1.0, 1, bad_n)


@pytest.mark.parametrize("method", ["closed_form", "sinkhorn"])
def test_ties_split_evenly(backend, dtype, method):
    # Tied group of 3 at the boundary with 1 slot left (k = 2), and of 2 with 1 slot (k = 3).
    x_h = np.array([[2.0, 0.5, 0.5, 0.5, -0.25, -1.5],
                    [1.0, 0.75, 0.25, 0.25, -3.0, -0.5]])
    x = backend.asarray(x_h, dtype)
    for eps in ((1e-6, 0.2) if method == "closed_form" else (0.3,)):
        for k, row, group, share in ((2, 0, [1, 2, 3], 1 / 3), (3, 1, [2, 3], 1 / 2)):
            A = host(topk.soft_topk(x, k, eps=eps, method=method).A)[row]
            assert np.ptp(A[group]) <= TOL[dtype] * 10
            if eps < 1e-3:
                assert np.allclose(A[group], share, atol=TOL[dtype] * 10)
    hard = host(topk.hard_topk(x, 2))
    assert np.allclose(hard[0], [1, 1 / 3, 1 / 3, 1 / 3, 0, 0])


def test_all_equal_scores_give_k_over_n(backend, dtype):
    x = backend.asarray(np.full((2, 7), -4.25), dtype)
    for k in range(8):
        for method in ("closed_form", "sinkhorn"):
            A = host(topk.soft_topk(x, k, eps=0.3, method=method).A)
            assert np.allclose(A, k / 7, atol=TOL[dtype] * 10), (k, method)


def test_translation_permutation_and_scale_equivariance(backend, dtype, rng):
    x_h = rng.standard_normal(12)
    x = backend.asarray(x_h, dtype)
    perm = rng.permutation(12)
    base = host(topk.soft_topk(x, 4, eps=0.2).A)
    shifted = host(topk.soft_topk(backend.asarray(host(x) + 37.5, dtype), 4, eps=0.2).A)
    permuted = host(topk.soft_topk(backend.asarray(host(x)[perm], dtype), 4, eps=0.2).A)
    # A depends on (x - theta)/t only: scaling x and eps together changes nothing.
    scaled = host(topk.soft_topk(backend.asarray(host(x) * 4.0, dtype), 4, eps=0.8).A)
    tol = TOL[dtype] * 100 if dtype == "float32" else 1e-12
    assert np.max(np.abs(shifted - base)) <= tol * 50   # 37.5 offset: rounding of x + c
    assert np.max(np.abs(permuted - base[perm])) <= tol
    assert np.max(np.abs(scaled - base)) <= tol


def test_monotonicity(rng):
    x = rng.standard_normal((3, 15))
    res = topk.soft_topk(x, 5, eps=0.3)
    A = res.A
    order = np.argsort(x, axis=-1)
    assert np.all(np.diff(np.take_along_axis(A, order, -1), axis=-1) >= 0)
    # Raising one score raises its A and lowers every other one.
    J = dense_jacobian(topk.soft_topk(x[0], 5, eps=0.3), 15)
    assert np.all(np.diag(J) > 0)
    assert np.all(J - np.diag(np.diag(J)) <= 0)
    # A grows with k, entry by entry; and smallest = 1 - largest of n - k.
    prev = np.zeros_like(x)
    for k in range(16):
        cur = topk.soft_topk(x, k, eps=0.3).A
        assert np.all(cur >= prev - 1e-15)
        prev = cur
        low = topk.soft_topk(x, 15 - k, eps=0.3, largest=False).A
        assert np.allclose(cur, 1.0 - low, atol=1e-14)


@pytest.mark.parametrize("largest", [True, False])
def test_jacobian_symmetric_rows_sum_zero_semidefinite(backend, dtype, rng, largest):
    x = backend.asarray(rng.standard_normal(9), dtype)
    res = topk.soft_topk(x, 3, eps=0.4, largest=largest)
    J = dense_jacobian(res, 9)
    scale = np.abs(J).max()
    assert np.max(np.abs(J - J.T)) <= TOL[dtype] * scale * 10
    assert np.max(np.abs(J.sum(1))) <= TOL[dtype] * scale * 10
    eig = np.linalg.eigvalsh(0.5 * (J + J.T)) * (1.0 if largest else -1.0)
    assert eig.min() >= -TOL[dtype] * scale * 10
    # Closed form of the same matrix from A alone: (s_i/t)(delta_ij - s_j/S).
    A = host(res.A)
    s = A * (1 - A)
    expected = (1.0 if largest else -1.0) * (np.diag(s) - np.outer(s, s) / s.sum()) / 0.2
    assert np.max(np.abs(J - expected)) <= TOL[dtype] * scale * 100


# --------------------------------------------------------------------------
# The two paths
# --------------------------------------------------------------------------

@pytest.mark.parametrize("largest", [True, False])
def test_closed_form_equals_converged_sinkhorn(rng, largest):
    x = rng.standard_normal((3, 10)) * np.array([[0.3], [1.0], [2.0]]) + np.array([[0.0], [50.0], [-3.0]])
    for k in (1, 4, 9):
        rc = topk.soft_topk(x, k, eps=0.5, largest=largest)
        rs = topk.soft_topk(x, k, eps=0.5, largest=largest, method="sinkhorn", tol=1e-14)
        assert rs.all_converged and rs.plan is not None and rc.plan is None
        assert np.max(np.abs(rc.A - rs.A)) <= 1e-11
        assert np.max(np.abs(rc.theta - rs.theta)) <= 1e-10
        v = rng.standard_normal(x.shape)
        gc, gs = topk.soft_topk_vjp(rc, v), topk.soft_topk_vjp(rs, v)
        assert np.max(np.abs(gc - gs)) <= 1e-9 * np.abs(gc).max()
        for method in ("cg", "kkt", "reduced"):
            assert np.allclose(topk.soft_topk_vjp(rs, v, method=method), gs, rtol=0,
                               atol=1e-9 * np.abs(gc).max())
        jc, js = topk.soft_topk_jvp(rc, v), topk.soft_topk_jvp(rs, v)
        assert np.max(np.abs(jc - js)) <= 1e-9 * np.abs(jc).max()


@pytest.mark.parametrize("method", ["closed_form", "sinkhorn"])
@pytest.mark.parametrize("largest", [True, False])
def test_vjp_and_jvp_against_finite_differences(rng, method, largest):
    x = rng.standard_normal(7)
    kw = dict(eps=0.35, largest=largest, method=method)
    if method == "sinkhorn":
        kw["tol"] = 1e-14
    res = topk.soft_topk(x, 3, **kw)
    J_fd = fd_jacobian(lambda z: topk.soft_topk(z, 3, **kw).A, x, rel_step=1e-3)
    for _ in range(3):
        v = rng.standard_normal(7)
        assert np.allclose(topk.soft_topk_vjp(res, v), J_fd.T @ v, rtol=0, atol=1e-8)
        assert np.allclose(topk.soft_topk_jvp(res, v), J_fd @ v, rtol=0, atol=1e-8)


def test_adjoint_dot_product(backend, dtype, rng):
    for method in ("closed_form", "sinkhorn"):
        x = backend.asarray(rng.standard_normal((2, 8)), dtype)
        res = topk.soft_topk(x, 3, eps=0.5, method=method)
        u = backend.asarray(rng.standard_normal((2, 8)), dtype)
        v = backend.asarray(rng.standard_normal((2, 8)), dtype)
        lhs = float(np.sum(host(topk.soft_topk_jvp(res, u)) * host(v)))
        rhs = float(np.sum(host(u) * host(topk.soft_topk_vjp(res, v))))
        assert abs(lhs - rhs) <= TOL[dtype] * 10 * (abs(lhs) + abs(rhs) + 1e-30)


# --------------------------------------------------------------------------
# Edge cases, batches, dtypes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["closed_form", "sinkhorn"])
@pytest.mark.parametrize("largest", [True, False])
def test_k_zero_and_k_n(backend, dtype, rng, method, largest):
    x = backend.asarray(rng.standard_normal((2, 5)), dtype)
    v = backend.asarray(rng.standard_normal((2, 5)), dtype)
    for k, fill in ((0, 0.0), (5, 1.0)):
        res = topk.soft_topk(x, k, eps=0.1, method=method, largest=largest)
        assert np.array_equal(host(res.A), np.full((2, 5), fill))
        # exact without iterating: per row n_iter = 0, error = 0, converged
        assert host(res.n_iter).tolist() == [0, 0] and host(res.error).tolist() == [0.0, 0.0]
        assert to_host(res.converged).tolist() == [True, True] and res.all_converged
        assert not np.any(host(topk.soft_topk_vjp(res, v)))
        assert not np.any(host(topk.soft_topk_jvp(res, v)))
        # theta = +-inf on the side that makes the closed form A = sigmoid(sgn (x - theta)/t)
        # constant: sgn * inf for A = 0, -sgn * inf for A = 1.
        sgn = 1.0 if largest else -1.0
        assert np.all(host(res.theta) == (sgn if fill == 0.0 else -sgn) * np.inf)
    x1 = backend.asarray(np.array([0.3]), dtype)
    assert host(topk.soft_topk(x1, 1, eps=1.0).A).tolist() == [1.0]


@pytest.mark.parametrize("dt", ["float64", "float32"])
def test_tiny_eps_no_nan_and_zero_gradient(dt, rng):
    x = distinct_scores(rng, (4, 50), min_gap=0.01).astype(dt)
    for eps in (1e-5, 1e-12, 1e-30):
        res = topk.soft_topk(x, 7, eps=eps)
        assert np.all(np.isfinite(res.A)) and res.all_converged
        assert np.array_equal(res.A, hard_by_sort(x.astype(np.float64), 7))
        xb = topk.soft_topk_vjp(res, rng.standard_normal(x.shape).astype(dt))
        assert np.all(np.isfinite(xb)) and not np.any(xb)      # s underflows: the limit 0


def test_batch_rows_are_independent(backend, dtype, rng):
    # Rows of scale 1e-3 .. 1e2 (closed form) or 0.1 .. 2 (Sinkhorn, which is slow
    # on near-hard rows), one row offset by 1e4 / 1e2.
    shapes = {"closed_form": ([1e-3, 1.0, 1e2], 1e4, 0.2), "sinkhorn": ([0.1, 1.0, 2.0], 1e2, 1.0)}
    v_h = rng.standard_normal((2, 3, 6))
    for method, (scales, offset, eps) in shapes.items():
        x_h = rng.standard_normal((2, 3, 6)) * np.array(scales)[None, :, None]
        x_h[1, 2] += offset
        x = backend.asarray(x_h, dtype)
        res = topk.soft_topk(x, 2, eps=eps, method=method)
        xb = host(topk.soft_topk_vjp(res, backend.asarray(v_h, dtype)))
        for i in range(2):
            for j in range(3):
                xm = backend.asarray(host(x)[i, j], dtype)
                rm = topk.soft_topk(xm, 2, eps=eps, method=method)
                assert np.max(np.abs(host(res.A)[i, j] - host(rm.A))) <= TOL[dtype] * 10
                gm = host(topk.soft_topk_vjp(rm, backend.asarray(v_h[i, j], dtype)))
                assert np.max(np.abs(xb[i, j] - gm)) <= TOL[dtype] * 10 * max(1.0, np.abs(gm).max())
        # Changing one row leaves the others bit-identical (closed form).
        if method == "closed_form":
            y_h = host(x).copy()
            y_h[0, 0] *= 7.0
            other = host(topk.soft_topk(backend.asarray(y_h, dtype), 2, eps=eps).A)
            assert np.array_equal(other[1], host(res.A)[1])



def test_float32_sorted_topk_derivatives_at_a_near_tie():
    """Scores 11.15187 and 11.149981 nearly tie: the JVP and VJP, formed in
    float64 from the cast-back plan, agree with the float64 derivatives and
    satisfy the adjoint identity to the registry's float32 tolerance."""
    x = np.array([9.627369, 8.035555, 11.15187, 11.149981, 11.410876], np.float32)
    res = topk.soft_sorted_topk(x, 1, eps=0.3, largest=False)
    ref = topk.soft_sorted_topk(x.astype(np.float64), 1, eps=0.3, largest=False)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(20):
        dx, A_bar = rng.standard_normal(5), rng.standard_normal((5, 1))
        dA = np.asarray(topk.soft_sorted_topk_jvp(res, dx.astype(np.float32)), np.float64)
        x_bar = np.asarray(topk.soft_sorted_topk_vjp(res, A_bar.astype(np.float32)), np.float64)
        A32 = A_bar.astype(np.float32).astype(np.float64)
        dx32 = dx.astype(np.float32).astype(np.float64)
        lhs, rhs = float(np.sum(dA * A32)), float(np.sum(dx32 * x_bar))
        worst = max(worst, abs(lhs - rhs) / (np.sum(np.abs(dA * A32)) + np.sum(np.abs(dx32 * x_bar))))
        dA64 = np.asarray(topk.soft_sorted_topk_jvp(ref, dx32), np.float64)
        assert np.max(np.abs(dA - dA64)) <= 1e-3 * np.max(np.abs(dA64))
    assert worst <= 1e-5

def test_float32_agrees_with_float64(rng):
    x = rng.standard_normal((5, 30)) * 2.0
    for method, eps in (("closed_form", 0.05), ("closed_form", 1.0), ("sinkhorn", 0.5)):
        r64 = topk.soft_topk(x, 8, eps=eps, method=method)
        r32 = topk.soft_topk(x.astype(np.float32), 8, eps=eps, method=method)
        assert r32.A.dtype == np.float32 and r32.theta.dtype == np.float32
        # Sinkhorn's float32 floor is 32 u (1 + max C / eps + log 2n) in the
        # relative marginal error (~1e-4 here); the closed form is ~u |z|.
        assert np.max(np.abs(r32.A - r64.A)) <= (2e-3 if method == "sinkhorn" else 2e-5)
        v = rng.standard_normal(x.shape)
        g64 = topk.soft_topk_vjp(r64, v)
        g32 = topk.soft_topk_vjp(r32, v.astype(np.float32))
        assert g32.dtype == np.float32
        assert np.max(np.abs(g32 - g64)) <= 2e-3 * np.abs(g64).max()


def test_inputs_not_mutated(rng):
    x = rng.standard_normal((2, 6))
    v = rng.standard_normal((2, 6))
    x0, v0 = x.copy(), v.copy()
    for method in ("closed_form", "sinkhorn"):
        res = topk.soft_topk(x, 2, eps=0.5, method=method, largest=False)
        topk.soft_topk_vjp(res, v)
        topk.soft_topk_jvp(res, v)
    res = topk.soft_sorted_topk(x, 2, eps=0.7)
    topk.soft_sorted_topk_vjp(res, np.ones((2, 6, 2)))
    assert np.array_equal(x, x0) and np.array_equal(v, v0)


def test_unconverged_forward_is_reported_and_its_vjp_warns(rng):
    x = rng.standard_normal(50)
    with pytest.warns(ConvergenceWarning, match="threshold"):
        res = topk.soft_topk(x, 10, eps=5.0, max_iter=1)
    assert not res.converged and res.error > 0
    for max_iter in (1, 2):
        with pytest.warns(ConvergenceWarning, match="threshold"):
            res = topk.soft_topk(x, 10, eps=0.05, max_iter=max_iter)
        # A, theta and error describe one and the same iterate: the reported theta
        # reproduces A, and |sum(A) - k| / S is the reported error.
        again = 1.0 / (1.0 + np.exp(-(x - res.theta) / 0.025))
        assert np.max(np.abs(again - res.A)) <= 1e-14
        s = res.A * (1.0 - res.A)
        assert abs(res.A.sum() - 10) / s.sum() == pytest.approx(float(res.error), rel=1e-6)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        topk.soft_topk_vjp(res, np.ones(50))
    with pytest.warns(ConvergenceWarning):
        res = topk.soft_topk(x, 10, eps=0.05, method="sinkhorn", max_iter=3)
    assert not res.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = topk.soft_topk(x, 10, eps=0.05)
        topk.soft_topk_vjp(ok, np.ones(50))


def test_check_every_gives_the_same_answer(rng):
    """check_every only spaces the host reads: every row stops at its own
    first passing step either way, with the same A, theta and diagnostics."""
    x = rng.standard_normal((3, 40)) * np.array([[0.1], [1.0], [10.0]])
    a = topk.soft_topk(x, 6, eps=0.5)
    b = topk.soft_topk(x, 6, eps=0.5, check_every=3)
    for name in ("A", "theta", "s", "n_iter", "error", "converged"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert len(set(a.n_iter.tolist())) > 1                  # the rows stop at different steps


# --------------------------------------------------------------------------
# Diagnostics: per-row arrays (refimpl.iteration's convention)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["closed_form", "sinkhorn"])
@pytest.mark.parametrize("bshape", [(), (3,), (2, 3)])
def test_diagnostics_are_per_row_arrays_of_the_batch_shape(backend, dtype, rng, method, bshape):
    x = backend.asarray(rng.standard_normal(bshape + (6,)), dtype)
    for k in (0, 2, 6):
        res = topk.soft_topk(x, k, eps=0.5, method=method)
        n_iter, err, conv = (to_host(getattr(res, f)) for f in ("n_iter", "error", "converged"))
        assert n_iter.shape == err.shape == conv.shape == bshape
        assert n_iter.dtype == np.int64 and conv.dtype == np.bool_ and err.dtype == np.dtype(dtype)
        size = int(np.prod(bshape))
        assert res.summary() == {"size": size, "n_converged": int(conv.sum()),
                                 "all_converged": bool(conv.all()), "max_error": float(err.max()),
                                 "max_n_iter": int(n_iter.max())}
        assert res.all_converged and (np.all(n_iter >= 1) if 0 < k < 6 else np.all(n_iter == 0))
        if method == "sinkhorn" and 0 < k < 6:              # the solver's own per-member arrays
            assert np.array_equal(n_iter, to_host(res.plan.n_iter))
            assert np.array_equal(conv, to_host(res.plan.converged))
    sorted_res = topk.soft_sorted_topk(x, 0, eps=0.5)
    assert to_host(sorted_res.n_iter).shape == bshape and sorted_res.all_converged


def test_batch_equals_loop_bitwise_with_diagnostics(rng):
    """Rows of very different scales stop at different Newton steps; each row
    of the batch is, bit for bit, the row solved alone (values and diagnostics)."""
    x = rng.standard_normal((4, 30)) * np.array([[1e-3], [0.1], [1.0], [30.0]])
    for largest in (True, False):
        res = topk.soft_topk(x, 7, eps=0.2, largest=largest)
        assert len(set(res.n_iter.tolist())) > 1
        for i in range(4):
            one = topk.soft_topk(x[i], 7, eps=0.2, largest=largest)
            for name in ("A", "theta", "s", "n_iter", "error", "converged"):
                assert np.array_equal(getattr(res, name)[i], getattr(one, name)), (i, name)


def test_one_row_not_converging_is_reported_per_row(rng):
    """Row 0, ``(-1, 1, -1, 1)`` with k = 2, has its root at the starting point
    theta_0 = 0 (by symmetry ``sum A = 2`` exactly there): it converges at the
    first evaluation, while the other rows need several and are cut off."""
    x = np.concatenate([[[-1.0, 1.0, -1.0, 1.0]], rng.standard_normal((2, 4)) * 0.1])
    with pytest.warns(ConvergenceWarning, match="did not converge for 2 of 3 row"):
        res = topk.soft_topk(x, 2, eps=0.1, max_iter=1)
    assert res.converged.tolist() == [True, False, False] and res.n_converged == 1
    assert res.n_iter.tolist() == [1, 1, 1] and res.error[0] == 0.0 and res.theta[0] == 0.0
    assert np.all(res.error[1:] > topk._default_tol(x.dtype, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = topk.soft_topk(x, 2, eps=0.1)
    assert full.all_converged and full.n_iter[0] == 1 and np.all(full.n_iter[1:] > 1)
    # the converged row is the same whether or not the others were cut off
    assert np.array_equal(res.A[0], full.A[0])
    # its A is sigmoid(x / t), theta = 0, from scipy
    from scipy.special import expit
    np.testing.assert_allclose(full.A[0], expit(x[0] / 0.05), rtol=1e-15)
    with pytest.warns(ConvergenceWarning, match="2 of 3 row"):
        topk.soft_topk_vjp(res, np.ones_like(x))


@pytest.mark.parametrize("bad_k, exc", [(-1, ValueError), (6, ValueError), (1.5, TypeError),
                                        (2.0, TypeError), (True, TypeError), ("2", TypeError),
                                        (None, TypeError)])
def test_bad_k(bad_k, exc):
    # backend.check_int: a non-integer is a TypeError, an integer out of [0, n] a ValueError
    with pytest.raises(exc, match="'k'"):
        topk.soft_topk(np.zeros(5), bad_k, eps=0.1)
    with pytest.raises(exc, match="'k'"):
        topk.soft_sorted_topk(np.zeros(5), bad_k, eps=0.1)


@pytest.mark.parametrize("bad", ["False", "True", 0, 1, None, np.array([True, False])])
def test_largest_must_be_a_bool(bad):
    # bool("False") is True: a silent conversion would select the wrong end.
    x = np.array([0.3, -1.0, 2.0, 0.9])
    for fn in (topk.soft_topk, topk.soft_sorted_topk):
        with pytest.raises(TypeError, match="'largest'"):
            fn(x, 2, eps=0.5, largest=bad)
    for fn in (topk.hard_topk, topk.boundary_gap):
        with pytest.raises(TypeError, match="'largest'"):
            fn(x, 2, largest=bad)
    # NumPy booleans (e.g. from a parameter array) are bools.
    assert np.array_equal(topk.soft_topk(x, 2, eps=0.5, largest=np.bool_(False)).A,
                          topk.soft_topk(x, 2, eps=0.5, largest=False).A)


@pytest.mark.parametrize("dt", ["float64", "float32"])
def test_eps_outside_the_dtype_range(dt):
    """t = eps/2 must be a normal number: a subnormal t resolved the tie below to
    0.32 instead of 1/3 and called it converged; t = 0 divided by zero.  At the
    other end 800 t overflowed float32 (eps = 1e37)."""
    x = np.array([2.0, 0.5, 0.5, 0.5, -0.25, -1.5], dtype=dt)
    tiny = float(np.finfo(dt).smallest_normal)
    for eps in (tiny, tiny / 1e3, 5e-324):
        for fn in (topk.soft_topk, topk.soft_sorted_topk):
            with pytest.raises(ValueError, match="'eps'.*too small"):
                fn(x, 2, eps=eps)
    # The smallest accepted eps still splits the boundary tie exactly.
    res = topk.soft_topk(x, 2, eps=2.0 * tiny)
    assert res.converged
    assert np.allclose(res.A, [1, 1 / 3, 1 / 3, 1 / 3, 0, 0], rtol=0, atol=TOL[dt] * 10)
    huge = float(np.finfo(dt).max) * 2.0 ** -32
    for method in ("closed_form", "sinkhorn"):
        with pytest.raises(ValueError, match="'eps'.*too large"):
            topk.soft_topk(x, 2, eps=4.0 * huge, method=method)
        # The largest accepted eps gives k/n (the scores are negligible against t).
        res = topk.soft_topk(x, 2, eps=2.0 * huge, method=method)
        assert res.converged and np.allclose(res.A, 2 / 6, rtol=0, atol=TOL[dt] * 10)
        assert np.all(np.isfinite(topk.soft_topk_vjp(res, np.ones(6, dt))))


@pytest.mark.filterwarnings("ignore::refimpl.backend.ConditioningWarning")
def test_sinkhorn_path_at_eps_below_its_rounding_floor_is_not_converged():
    """At eps = 1e-30 the log-domain plan has no resolved digit (A_0 = 2 > 1 here);
    the Sinkhorn solver reports it unconverged (its floor >= 1) and top-k passes
    that verdict on."""
    x = np.array([2.0, 0.5, 0.5, 0.5, -0.25, -1.5])
    with pytest.warns(ConvergenceWarning, match="too small for float64"):
        res = topk.soft_topk(x, 2, eps=1e-30, method="sinkhorn", max_iter=50)
    assert not res.converged
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        topk.soft_topk_vjp(res, np.ones(6))
    with pytest.warns(ConvergenceWarning, match="too small for float64"):
        assert not topk.soft_sorted_topk(x, 2, eps=1e-30, max_iter=50).converged


@pytest.mark.parametrize("bad_eps", [0.0, -1.0, math.nan, math.inf])
def test_bad_eps(bad_eps):
    with pytest.raises(ValueError, match="'eps'"):
        topk.soft_topk(np.zeros(5), 2, eps=bad_eps)
    with pytest.raises(ValueError, match="'eps'"):
        topk.soft_sorted_topk(np.zeros(5), 2, eps=bad_eps)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores(bad):
    x = np.array([0.0, 1.0, bad, 2.0])
    for fn in (topk.soft_topk, topk.soft_sorted_topk):
        with pytest.raises(ValueError, match="'x'.*NaN or Inf"):
            fn(x, 2, eps=0.1)


def test_bad_types_and_shapes():
    with pytest.raises(TypeError, match="'x'"):
        topk.soft_topk([0.0, 1.0, 2.0], 1, eps=0.1)
    with pytest.raises(TypeError, match="'x'"):
        topk.soft_topk(np.arange(4), 1, eps=0.1)            # integer scores
    with pytest.raises(ValueError, match="'x'"):
        topk.soft_topk(np.zeros((3, 0)), 0, eps=0.1)
    with pytest.raises(ValueError, match="'x'"):
        topk.soft_topk(np.ones(()), 0, eps=0.1)
    with pytest.raises(ValueError, match="'method'"):
        topk.soft_topk(np.zeros(3), 1, eps=0.1, method="sort")
    with pytest.raises(ValueError, match="'max_iter'"):
        topk.soft_topk(np.zeros(3), 1, eps=0.1, max_iter=0)
    res = topk.soft_topk(np.arange(4.0), 2, eps=0.1)
    with pytest.raises(ValueError, match="'A_bar'"):
        topk.soft_topk_vjp(res, np.ones(3))
    with pytest.raises(ValueError, match="'A_bar'"):
        topk.soft_topk_vjp(res, np.array([1.0, np.nan, 0.0, 0.0]))
    with pytest.raises(TypeError, match="'A_bar'"):
        topk.soft_topk_vjp(res, np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match="'dx'"):
        topk.soft_topk_jvp(res, np.ones((2, 4)))


def test_hard_topk_and_boundary_gap(backend, rng):
    x_h = np.round(rng.standard_normal((3, 10)), 1)
    x = backend.asarray(x_h, "float64")
    for k in range(11):
        for largest in (True, False):
            hard = host(topk.hard_topk(x, k, largest=largest))
            assert np.allclose(hard.sum(-1), k)
            # Against a brute-force count with ties shared.
            for r in range(3):
                row = x_h[r] if largest else -x_h[r]
                for i in range(10):
                    above = np.sum(row > row[i])
                    tied = np.sum(row == row[i])
                    assert hard[r, i] == pytest.approx(min(max(k - above, 0), tied) / tied)
            gap = host(topk.boundary_gap(x, k, largest=largest))
            srt = -np.sort(-(x_h if largest else -x_h), axis=-1)
            expected = np.inf if k in (0, 10) else srt[:, k - 1] - srt[:, k]
            assert np.array_equal(gap, np.broadcast_to(expected, (3,)))


# --------------------------------------------------------------------------
# Sorted SOFT top-k (beam search variant)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("largest", [True, False])
def test_sorted_topk_structure_and_hard_limit(backend, dtype, rng, largest):
    x_h = distinct_scores(rng, (2, 7), min_gap=0.4)
    x = backend.asarray(x_h, dtype)
    # eps = 0.15 against gaps >= 0.4: nearly hard, still quick for Sinkhorn (whose
    # rate degrades as eps / gap -> 0; the sorted variant has no closed form).
    res = topk.soft_sorted_topk(x, 3, eps=0.15, largest=largest)
    A = host(res.A)
    assert A.shape == (2, 7, 3) and res.all_converged and res.y == (0.0, 1.0, 2.0, 3.0)
    assert np.allclose(A.sum(-2), 1.0, atol=TOL[dtype] * 100)
    assert np.all(A.sum(-1) <= 1.0 + TOL[dtype] * 100)
    order = np.argsort(-host(x) if largest else host(x), axis=-1)[:, :3]
    assert np.array_equal(np.argmax(A, axis=-2), order)        # column r = rank r + 1
    assert np.all(np.max(A, axis=-2) >= 0.85)
    assert np.allclose(host(res.indicator), hard_by_sort(host(x), 3, largest), atol=0.15)
    # Sharper eps, sharper one-hots (column maxima grow towards 1).
    sharper = host(topk.soft_sorted_topk(x, 3, eps=0.1, largest=largest).A)
    assert np.all(np.max(sharper, axis=-2) >= np.max(A, axis=-2) - TOL[dtype] * 100)


def test_sorted_k1_is_the_two_anchor_problem(rng):
    x = rng.standard_normal((2, 9))
    for largest in (True, False):
        rs = topk.soft_sorted_topk(x, 1, eps=0.4, largest=largest, tol=1e-14)
        rc = topk.soft_topk(x, 1, eps=0.4, largest=largest)
        assert np.allclose(rs.A[..., 0], rc.A, rtol=0, atol=1e-11)
        v = rng.standard_normal((2, 9))
        assert np.allclose(topk.soft_sorted_topk_vjp(rs, v[..., None]), topk.soft_topk_vjp(rc, v),
                           rtol=0, atol=1e-9)


def test_sorted_topk_vjp_against_finite_differences(rng):
    x = rng.standard_normal(6)
    for k in (2, 6):
        kw = dict(eps=0.8, tol=1e-14)
        res = topk.soft_sorted_topk(x, k, **kw)
        J = fd_jacobian(lambda z: topk.soft_sorted_topk(z, k, **kw).A, x, rel_step=1e-3)
        v = rng.standard_normal(res.A.shape)
        assert np.allclose(topk.soft_sorted_topk_vjp(res, v), J.T @ v.ravel(), rtol=0, atol=1e-8)
        u = rng.standard_normal(6)
        assert np.allclose(topk.soft_sorted_topk_jvp(res, u).ravel(), J @ u, rtol=0, atol=1e-8)
        # Translation invariance: J 1 = 0.
        assert np.allclose(J.sum(1), 0.0, atol=1e-8)


def test_sorted_k0_and_k_n():
    x = np.array([0.3, -1.0, 2.0, 0.9])
    r0 = topk.soft_sorted_topk(x, 0, eps=0.5)
    assert r0.A.shape == (4, 0) and r0.plan is None
    assert not np.any(topk.soft_sorted_topk_vjp(r0, np.zeros((4, 0))))
    rn = topk.soft_sorted_topk(x, 4, eps=0.3)
    assert rn.y == (1.0, 2.0, 3.0, 4.0)                          # no zero-mass anchor
    assert np.array_equal(np.argmax(rn.A, axis=0), np.argsort(-x))  # a soft sort
    assert np.allclose(rn.A.sum(0), 1.0) and np.allclose(rn.A.sum(1), 1.0)


def test_sorted_ties_share_ranks():
    x = np.array([0.1, 1.4, -0.6, 1.4, 0.5])
    A = topk.soft_sorted_topk(x, 2, eps=0.2).A
    assert np.allclose(A[1], A[3], atol=1e-12)
    assert np.allclose(A[[1, 3]].sum(0), 1.0, atol=0.02)


def test_benchmark_quick_smoke(tmp_path, capsys, load_benchmark):
    bench = load_benchmark("topk")
    assert bench.main(["--quick", "--json", str(tmp_path / "topk.json")]) == 0
    out = capsys.readouterr().out
    assert "sinkhorn ms" in out and "slope" in out
    assert (tmp_path / "topk.json").exists()
