"""Sinkhorn operator: forward, implicit VJP/JVP, values, unrolled baseline, bounds.

Expected values come from independent routes: POT's ``ot.sinkhorn_log`` and
``ot.sinkhorn2``, SciPy's ``linprog`` / ``linear_sum_assignment`` (eps -> 0),
closed forms (2 x 2 quadratic solved with sympy, additive costs, n = 1,
one unrolled iteration = a row softmax), Richardson finite differences along
feasible directions, and NumPy's SVD for spectra and ``kappa``.  Everything
runs on NumPy and array_api_strict (and CuPy when present); float32 runs use
the looser tolerances stated next to each check.
"""

import math
import tracemalloc
import warnings

import numpy as np
import pytest

from refimpl import backend, check
from refimpl import sinkhorn as sk
from refimpl.sinkhorn import forward as sk_forward
from refimpl.sinkhorn import iterations as sk_iterations
from refimpl.sinkhorn import system as sk_system
from refimpl.backend import ConditioningWarning, ConvergenceWarning, get_backend, to_host

F64 = "float64"
RTOL = {"float64": 1e-9, "float32": 2e-3}       # gradients vs references (normwise)


# --------------------------------------------------------------------------
# Helpers (host side)
# --------------------------------------------------------------------------

def problem(rng, n, m, *, eps_cost="random", conc=1.0):
    if eps_cost == "sqdist":
        x, y = rng.random((n, 2)), rng.random((m, 2))
        C = ((x[:, None] - y[None]) ** 2).sum(-1)
    else:
        C = rng.random((n, m))
    return C, rng.dirichlet(np.full(n, conc)), rng.dirichlet(np.full(m, conc))


def feasible(rng, C, a, b):
    """(dC, da, db) with 1^T da = 1^T db per member; marginal steps relative."""
    dC = rng.standard_normal(C.shape)
    da = a * rng.standard_normal(a.shape)
    db = b * rng.standard_normal(b.shape)
    db = db - b * (db.sum(-1, keepdims=True) - da.sum(-1, keepdims=True)) / b.sum(-1, keepdims=True)
    return dC, da, db


def put(backend, dtype, *arrays):
    return tuple(backend.asarray(np.asarray(x, dtype=np.float64).astype(dtype), dtype) for x in arrays)


def host(*arrays):
    return tuple(to_host(x).astype(np.float64) for x in arrays)


def fd_plan(backend, C, a, b, dirs, **params):
    """Richardson derivative of the float64 plan along dirs (host result)."""
    arrays = put(backend, F64, C, a, b)
    tangents = put(backend, F64, *dirs)

    def P(*xs):
        return sk.sinkhorn(*xs, warn=False, **params).P

    (D,), _ = check.fd_directional(P, arrays, tangents, rel_step=1e-4)
    return to_host(D)


def pairing(bars, dirs):
    return sum(float(np.sum(x * d)) for x, d in zip(bars, dirs))


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


TIGHT = dict(tol=1e-13, max_iter=100_000)


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------

def test_forward_matches_pot_and_marginals(backend, dtype, rng):
    ot = pytest.importorskip("ot")
    C, a, b = problem(rng, 7, 5, eps_cost="sqdist")
    eps = 0.05
    res = sk.sinkhorn(*put(backend, dtype, C, a, b), eps=eps, **TIGHT)
    assert res.all_converged
    P = host(res.P)[0]
    ref = ot.bregman.sinkhorn_log(a, b, C, eps, numItermax=100_000, stopThr=1e-15)
    assert rel(P, ref) <= (1e-10 if dtype == F64 else 1e-4)
    tol = float(to_host(res.tol))
    assert np.abs(P.sum(1) - a).sum() <= 4 * tol + 1e-6 * (dtype != F64)
    assert np.abs(P.sum(0) - b).sum() <= 4 * tol + 1e-6 * (dtype != F64)
    f, g = host(res.f, res.g)
    assert rel(P, np.exp((f[:, None] + g[None, :] - C) / eps)) <= (1e-12 if dtype == F64 else 1e-4)


@pytest.mark.parametrize("shape", [(3, 9, 2), (3, 2, 9), (2, 2), (4, 7, 5)])
def test_row_and_column_log_sum_exps_match_logaddexp(backend, dtype, rng, shape):
    # Two entries are combined elementwise (the top-k anchors), more are reduced;
    # reference: NumPy's logaddexp folded over the axis in float64.  Offsets of
    # +-700 and spreads of 1e3 would overflow a naive exp.
    K = rng.standard_normal(shape) * 1e3 - 700.0
    phi = rng.standard_normal(shape[:-1]) * 50.0
    psi = rng.standard_normal(shape[:-2] + shape[-1:]) * 50.0
    Kx, phix, psix = put(backend, dtype, K, phi, psi)
    xp = backend.xp
    rows = host(sk_iterations._lse_rows(xp, Kx, psix))[0]
    cols = host(sk_iterations._lse_cols(xp, Kx, phix))[0]
    Kh, phih, psih = host(Kx, phix, psix)
    ref_rows = np.logaddexp.reduce(Kh + psih[..., None, :], axis=-1)
    ref_cols = np.logaddexp.reduce(Kh + phih[..., :, None], axis=-2)
    tol = 1e-13 if dtype == F64 else 1e-6
    assert np.max(np.abs(rows - ref_rows) / (1.0 + np.abs(ref_rows))) <= tol
    assert np.max(np.abs(cols - ref_cols) / (1.0 + np.abs(ref_cols))) <= tol


def test_stopping_rule_checks_every_few_iterations(rng):
    C, a, b = problem(rng, 6, 6)
    res = sk.sinkhorn(C, a, b, eps=0.1, tol=1e-12, check_every=7)
    assert int(res.n_iter) % 7 == 0 and res.converged
    # the reported error is the plan's own relative L1 column error, to the
    # round-off of summing a column of P (the two are rounded differently)
    assert math.isclose(float(res.error), np.abs(res.P.sum(0) - b).sum() / b.sum(), rel_tol=1e-6,
                        abs_tol=16 * 6 * 2.0 ** -53)


def test_batch_equals_loop_with_members_of_different_scales(backend, rng):
    C = rng.random((3, 5, 4)) * np.array([0.5, 1.0, 4.0])[:, None, None]
    a = np.stack([rng.dirichlet(np.ones(5)) for _ in range(3)]) * np.array([[1e-3], [1.0], [1e3]])
    b = np.stack([rng.dirichlet(np.ones(4)) for _ in range(3)]) * np.array([[1e-3], [1.0], [1e3]])
    G = rng.standard_normal(C.shape)
    res = sk.sinkhorn(*put(backend, F64, C, a, b), eps=0.1, **TIGHT)
    for method in ("schur", "cg"):
        bars = host(*sk.sinkhorn_vjp(res, put(backend, F64, G)[0], method=method))
        for k in range(3):
            rk = sk.sinkhorn(*put(backend, F64, C[k], a[k], b[k]), eps=0.1, **TIGHT)
            assert int(to_host(rk.n_iter)) == int(to_host(res.n_iter)[k])   # frozen members
            assert rel(host(res.P)[0][k], host(rk.P)[0]) <= 1e-13
            for x, y in zip(bars, host(*sk.sinkhorn_vjp(rk, put(backend, F64, G[k])[0], method=method))):
                assert rel(x[k], y) <= 1e-11


def test_stable_at_small_eps_and_tiny_marginals(backend):
    # eps = 1e-3, O(1) costs, marginal entries of 1e-12: finite everywhere, no
    # RuntimeWarning (the test config turns them into errors), non-convergence
    # reported rather than hidden.
    rng = np.random.default_rng(7)
    C = rng.random((6, 5))
    a = np.array([1e-12, 0.3, 0.2, 1e-12, 0.25, 0.25 - 2e-12])
    b = np.array([0.2, 1e-12, 0.4, 0.2, 0.2 - 1e-12])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sk.sinkhorn(*put(backend, F64, C, a, b), eps=1e-3, max_iter=2000)
        bars = sk.sinkhorn_vjp(res, put(backend, F64, rng.standard_normal((6, 5)))[0])
    assert all(np.all(np.isfinite(x)) for x in host(res.P, res.f, res.g, *bars))
    P = host(res.P)[0]
    # the row step holds to the floor 32 u (1 + max|C| / eps) ~ 7e-12, entry by entry
    assert np.all(P >= 0) and np.all(np.abs(P.sum(1) - a) <= 1e-11 * a)
    kinds = {type(w.message) for w in caught}
    assert kinds <= {ConvergenceWarning, ConditioningWarning}
    if not res.all_converged:
        assert ConvergenceWarning in kinds


def _tiny_marginal_problem(rng, n, m):
    """Random O(1) costs; a few marginal entries of 1e-12 on both sides."""
    C = rng.random((n, m))
    a, b = rng.dirichlet(np.ones(n)), rng.dirichlet(np.ones(m))
    a[::7] = 1e-12
    b[::5] = 1e-12
    return C, a / a.sum(), b / b.sum()


@pytest.mark.parametrize("case", ["tiny_eps", "sqdist", "unbalanced"])
def test_scaling_domain_gives_the_log_domain_plan(backend, dtype, rng, monkeypatch, case):
    # Reference: the log-domain iteration (two full log-sum-exps per step),
    # an independent evaluation of the same fixed-point map.  Same stopping
    # rule, so the same iteration count, and the same plan to round-off.
    if case == "tiny_eps":
        C, a, b = _tiny_marginal_problem(rng, 40, 30)
        params = dict(eps=1e-3 if dtype == F64 else 0.05, tol=1e-9, max_iter=20_000)
    elif case == "sqdist":
        C, a, b = problem(rng, 60, 50, eps_cost="sqdist")
        params = dict(eps=0.01, tol=1e-11, max_iter=20_000)
    else:
        C, a, b = problem(rng, 30, 45)
        a = 2.0 * a
        params = dict(eps=0.02, tol=1e-11, max_iter=20_000, rho_a=0.5, rho_b=5.0)
    args = put(backend, dtype, C, a, b)
    res = sk.sinkhorn(*args, warn=False, **params)
    monkeypatch.setattr(sk_forward, "_use_scaling", lambda n, m, policy: False)
    ref = sk.sinkhorn(*args, warn=False, **params)
    assert bool(to_host(ref.converged)) and bool(to_host(res.converged))
    assert int(to_host(res.n_iter)) == int(to_host(ref.n_iter))
    P, f, g = host(res.P, res.f, res.g)
    P0, f0, g0 = host(ref.P, ref.f, ref.g)
    # log P = (f + g - C) / eps carries absolute errors ~ u max|C| / eps.
    u = 2.0 ** -53 if dtype == F64 else 2.0 ** -24
    tol = 64 * u * (1.0 + np.abs(C).max() / params["eps"]) * math.sqrt(float(to_host(ref.n_iter)))
    assert np.max(np.abs(P - P0) / np.maximum(P0, 1e-300)) <= tol
    assert np.max(np.abs(f - f0)) / params["eps"] <= tol
    assert np.max(np.abs(g - g0)) / params["eps"] <= tol
    # the measured error itself carries the rounding floor the tolerance is raised to
    slack = 1e-3 if dtype == F64 else 0.5
    assert abs(float(to_host(res.error)) - float(to_host(ref.error))) <= slack * float(to_host(ref.tol))


def test_scaling_domain_absorbs_per_member(backend, rng):
    # eps = 1e-3 with tiny marginals: the column potentials reach |g| / eps far
    # beyond the scalings' range exp(+-lim), so they were absorbed (K~ rebuilt),
    # at different iterations for members of different scales; a batch still
    # gives what a loop gives.
    probs = [_tiny_marginal_problem(rng, 20, 15) for _ in range(3)]
    scale = np.array([1.0, 3.0, 1.5])
    C = np.stack([p[0] for p in probs]) * scale[:, None, None]
    a = np.stack([p[1] for p in probs])
    b = np.stack([p[2] for p in probs])
    params = dict(eps=1e-3, tol=1e-9, max_iter=20_000, warn=False)
    res = sk.sinkhorn(*put(backend, F64, C, a, b), **params)
    lim = math.log(np.finfo(np.float64).max) / 4.0
    assert np.all(np.max(np.abs(host(res.g)[0]), axis=-1) / params["eps"] > lim)
    # torch/CuPy pick other matrix-vector kernels for a stack than for one
    # member: round-off u amplified by |C|/eps ~ 1e3 (backend.member_exact_batches)
    tol = 1e-13 if backend.member_exact_batches else 1e-12
    for k in range(3):
        rk = sk.sinkhorn(*put(backend, F64, C[k], a[k], b[k]), **params)
        assert int(to_host(rk.n_iter)) == int(to_host(res.n_iter)[k])
        assert rel(host(res.P)[0][k], host(rk.P)[0]) <= tol
        assert rel(host(res.f)[0][k], host(rk.f)[0]) <= tol


def test_unchecked_blocks_are_redone_per_member(rng, monkeypatch):
    """The scaling domain runs each block of check_every iterations without
    range tests and reruns, with tests after every half-step, only the members
    whose end state is out of range.  A member that needs that (tiny marginals
    at eps = 1e-3: scalings far beyond exp(+-lim)) and one that never does
    (eps = 0.5) give in a batch exactly what they give alone."""
    redone, offsets = [], set()
    careful, fast = sk_iterations._careful_block, sk_iterations._fast_block

    def spy(xp, pb, st, m, k):
        redone.append(np.asarray(m).copy())
        return careful(xp, pb, st, m, k)

    def spy_fast(xp, pb, st, k):
        offsets.add(st.Kt.ctypes.data % 64)
        return fast(xp, pb, st, k)

    monkeypatch.setattr(sk_iterations, "_careful_block", spy)
    monkeypatch.setattr(sk_iterations, "_fast_block", spy_fast)
    C0, a0, b0 = _tiny_marginal_problem(rng, 20, 15)
    C = np.stack([C0, C0 * 1e-3 * 0.5])          # the second: C / eps = C0 / 2, well scaled
    params = dict(eps=1e-3, tol=1e-10, max_iter=20_000, warn=False)
    res = sk.sinkhorn(C, a0, b0, **params)
    assert res.all_converged and redone
    assert offsets == {0}      # K~ starts on a cache line, also after the reruns' absorptions
    assert all(m[0] and not m[1] for m in redone)       # only the hard member was rerun
    for k in range(2):
        redone.clear()
        alone = sk.sinkhorn(C[k], a0, b0, **params)
        assert bool(redone) == (k == 0)
        assert int(alone.n_iter) == int(res.n_iter[k])
        assert np.array_equal(alone.P, res.P[k]) and np.array_equal(alone.f, res.f[k])
        assert np.array_equal(alone.g, res.g[k]) and alone.error == res.error[k]


def test_non_convergence_is_reported_and_warned(backend, rng):
    C, a, b = problem(rng, 5, 5)
    arrays = put(backend, F64, np.stack([C, C[::-1]]), a, b)       # a batch: both members stopped
    with pytest.warns(ConvergenceWarning, match="2 of 2 problem.*did not converge in max_iter=20"):
        res = sk.sinkhorn(*arrays, eps=0.01, tol=1e-14, max_iter=20)
    assert not np.any(to_host(res.converged)) and np.all(to_host(res.error) > to_host(res.tol))
    assert np.all(to_host(res.n_iter) == 20)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        sk.sinkhorn_vjp(res, put(backend, F64, np.ones((2, 5, 5)))[0])


def test_tolerance_floor_is_recorded(rng):
    C, a, b = problem(rng, 4, 3)
    C32, a32 = C.astype(np.float32), a.astype(np.float32)
    b32 = (b * (a32.astype(np.float64).sum() / b.sum())).astype(np.float32)
    res = sk.sinkhorn(C32, a32, b32, eps=0.1, tol=0.0)
    assert res.converged and 1e-6 < float(res.tol) < 1e-3          # float32 floor, not 0
    # the documented floor: max(32 u (1 + max|C| / eps + log(nm + 1)), 2 |mass mismatch|)
    floor = 32 * 2.0 ** -24 * (1 + np.abs(C32).max() / 0.1 + math.log(4 * 3 + 1))
    mismatch = 2 * abs(float(a32.sum()) - float(b32.sum())) / float(b32.sum())
    assert math.isclose(float(res.tol), max(floor, mismatch), rel_tol=1e-5)
    # a member stopped by max_iter says which tolerance it was held to
    with pytest.warns(ConvergenceWarning, match="raised to the dtype's floor"):
        sk.sinkhorn(C32, a32, b32, eps=0.1, tol=0.0, max_iter=1)


# --------------------------------------------------------------------------
# Closed forms and limits
# --------------------------------------------------------------------------

def _closed_form_2x2():
    """P11 and its gradient from the quadratic (sympy), as numeric functions."""
    sp = pytest.importorskip("sympy")
    p, k, a1, a2, b1 = sp.symbols("p kappa a1 a2 b1", positive=True)
    C = sp.Matrix(2, 2, sp.symbols("c11 c12 c21 c22", real=True))
    eps = sp.Symbol("eps", positive=True)
    # P = [[p, a1 - p], [b1 - p, a2 - b1 + p]],  p (a2 - b1 + p) = kappa (a1 - p)(b1 - p)
    roots = sp.solve(sp.Eq(p * (a2 - b1 + p), k * (a1 - p) * (b1 - p)), p)
    kappa = sp.exp(-(C[0, 0] + C[1, 1] - C[0, 1] - C[1, 0]) / eps)
    args = (C[0, 0], C[0, 1], C[1, 0], C[1, 1], a1, a2, b1, eps)
    funcs = []
    for root in roots:
        expr = root.subs(k, kappa)
        grads = [sp.diff(expr, v) for v in args]
        funcs.append((sp.lambdify(args, expr), [sp.lambdify(args, g) for g in grads]))
    return funcs


def test_2x2_closed_form_forward_and_gradient(backend, dtype):
    C = np.array([[0.3, 1.1], [0.7, 0.2]])
    a = np.array([0.35, 0.65])
    b = np.array([0.55, 0.45])
    eps = 0.4
    vals = (*C.ravel(), a[0], a[1], b[0], eps)
    for fun, grads in _closed_form_2x2():
        p = float(fun(*vals))
        if max(0.0, b[0] - a[1]) < p < min(a[0], b[0]):
            break
    else:
        raise AssertionError("no admissible root")
    P_closed = np.array([[p, a[0] - p], [b[0] - p, a[1] - b[0] + p]])
    res = sk.sinkhorn(*put(backend, dtype, C, a, b), eps=eps, **TIGHT)
    assert rel(host(res.P)[0], P_closed) <= (1e-12 if dtype == F64 else 1e-5)
    # L = P11: dL/dC_ij from the closed form; marginal derivatives along the
    # feasible direction (da1, da2, db1, db2) = (1, 0, 1, 0) (b2 = a1 + a2 - b1).
    dp = [float(g(*vals)) for g in grads]
    G = np.array([[1.0, 0.0], [0.0, 0.0]])
    C_bar, a_bar, b_bar = host(*sk.sinkhorn_vjp(res, put(backend, dtype, G)[0]))
    tol = RTOL[dtype]
    assert rel(C_bar.ravel(), np.array(dp[:4])) <= tol
    closed_dir = dp[4] + dp[6]                   # d/dt P11(a1 + t, a2, b1 + t)
    assert abs(a_bar[0] + b_bar[0] - closed_dir) <= tol * max(1.0, abs(closed_dir))
    closed_eps = dp[7]
    got_eps = float(to_host(sk.sinkhorn_vjp_eps(res, put(backend, dtype, G)[0])))
    assert abs(got_eps - closed_eps) <= tol * max(1.0, abs(closed_eps))


def test_additive_cost_gives_independent_plan(backend, dtype, rng):
    u, v = rng.standard_normal(5), rng.standard_normal(4)
    C = u[:, None] + v[None, :]
    a, b = rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(4))
    res = sk.sinkhorn(*put(backend, dtype, C, a, b), eps=0.2, **TIGHT)
    assert rel(host(res.P)[0], np.outer(a, b) / a.sum()) <= (1e-12 if dtype == F64 else 1e-5)


def test_single_row_and_single_column(backend, rng):
    b = rng.dirichlet(np.ones(4))
    G = rng.standard_normal((1, 4))
    for C, a, bb, Gm in ((rng.random((1, 4)), np.array([1.0]), b, G),
                         (rng.random((4, 1)), b, np.array([1.0]), G.T)):
        res = sk.sinkhorn(*put(backend, F64, C, a, bb), eps=0.1, **TIGHT)
        P = host(res.P)[0]
        assert rel(P, np.outer(a, bb)) <= 1e-13
        C_bar, a_bar, b_bar = host(*sk.sinkhorn_vjp(res, put(backend, F64, Gm)[0]))
        assert np.abs(C_bar).max() <= 1e-13                      # P does not depend on C
        # dP = da (as the row) when n = 1: <G, dP> = <G, db> along feasible moves
        dirs = feasible(rng, C, a, bb)
        fd = float(np.sum(Gm * fd_plan(backend, C, a, bb, dirs, eps=0.1, **TIGHT)))
        assert abs(pairing((C_bar, a_bar, b_bar), dirs) - fd) <= 1e-9


def test_eps_to_zero_against_linear_programming(rng):
    scipy_opt = pytest.importorskip("scipy.optimize")
    n, m = 5, 4
    C, a, b = problem(rng, n, m)
    A_eq = np.vstack([np.kron(np.eye(n), np.ones(m)), np.kron(np.ones(n), np.eye(m))])
    lp = scipy_opt.linprog(C.ravel(), A_eq=A_eq, b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs")
    for eps in (0.1, 0.03, 0.01):
        res = sk.sinkhorn(C, a, b, eps=eps, tol=1e-12, max_iter=200_000)
        gap = float(sk.linear_value(res)) - lp.fun
        assert -1e-9 <= gap <= eps * math.log(n * m)


def test_eps_to_zero_against_assignment(rng):
    scipy_opt = pytest.importorskip("scipy.optimize")
    n = 6
    C = rng.random((n, n))
    rows, cols = scipy_opt.linear_sum_assignment(C)
    ot_value = C[rows, cols].sum() / n
    a = np.full(n, 1.0 / n)
    for eps in (0.1, 0.03):
        res = sk.sinkhorn(C, a, a, eps=eps, tol=1e-10, max_iter=200_000)
        gap = float(sk.linear_value(res)) - ot_value
        assert -1e-9 <= gap <= eps * math.log(n * n)


def test_transpose_symmetry(backend, rng):
    C, a, b = problem(rng, 5, 3)
    G = rng.standard_normal((5, 3))
    r1 = sk.sinkhorn(*put(backend, F64, C, a, b), eps=0.1, **TIGHT)
    r2 = sk.sinkhorn(*put(backend, F64, C.T, b, a), eps=0.1, **TIGHT)
    assert rel(host(r1.P)[0], host(r2.P)[0].T) <= 1e-12
    C1, a1, b1 = host(*sk.sinkhorn_vjp(r1, put(backend, F64, G)[0]))
    C2, b2, a2 = host(*sk.sinkhorn_vjp(r2, put(backend, F64, G.T)[0]))
    assert rel(C1, C2.T) <= 1e-10
    a2, b2 = host(*sk.gauge_fix(*put(backend, F64, a2, b2)))      # same gauge before comparing
    assert rel(a1, a2) <= 1e-10 and rel(b1, b2) <= 1e-10


# --------------------------------------------------------------------------
# Implicit VJP / JVP
# --------------------------------------------------------------------------

@pytest.mark.parametrize("method", sk.METHODS)
def test_vjp_matches_finite_differences(backend, dtype, rng, method):
    C, a, b = problem(rng, 5, 4, eps_cost="sqdist")
    eps = 0.05
    G = rng.standard_normal((5, 4))
    dirs = feasible(rng, C, a, b)
    res = sk.sinkhorn(*put(backend, dtype, C, a, b), eps=eps, **TIGHT)
    bars = host(*sk.sinkhorn_vjp(res, put(backend, dtype, G)[0], method=method))
    D = fd_plan(backend, C, a, b, dirs, eps=eps, **TIGHT)
    lhs, rhs = float(np.sum(G * D)), pairing(bars, dirs)
    scale = np.linalg.norm(G) * np.linalg.norm(D) + sum(np.linalg.norm(x) * np.linalg.norm(d)
                                                        for x, d in zip(bars, dirs))
    assert abs(lhs - rhs) <= (1e-9 if dtype == F64 else 1e-4) * scale
    dP = host(sk.sinkhorn_jvp(res, *put(backend, dtype, *dirs), method=method))[0]
    assert rel(dP, D) <= (1e-8 if dtype == F64 else 2e-3)


@pytest.mark.parametrize("shape", [(6, 4), (3, 7), (40, 2)])
def test_all_backward_paths_agree(backend, dtype, rng, shape):
    n, m = shape
    C, a, b = problem(rng, n, m, conc=2.0)
    res = sk.sinkhorn(*put(backend, dtype, C, a, b), eps=0.1, **TIGHT)
    G = put(backend, dtype, rng.standard_normal(shape))[0]
    ref = host(*sk.sinkhorn_vjp(res, G, method="kkt"))
    dirs = put(backend, dtype, *feasible(rng, C, a, b))
    ref_jvp = host(sk.sinkhorn_jvp(res, *dirs, method="kkt"))[0]
    tol = 1e-10 if dtype == F64 else 2e-4
    for method in ("schur", "cg", "reduced"):
        got = host(*sk.sinkhorn_vjp(res, G, method=method))
        assert all(rel(x, y) <= tol for x, y in zip(got, ref)), method
        assert rel(host(sk.sinkhorn_jvp(res, *dirs, method=method))[0], ref_jvp) <= tol, method


def test_marginal_gradients_are_accurate_entrywise_with_tiny_marginals():
    # Reference: the backward system solved in 50-digit arithmetic (mpmath).  Each
    # path must give every entry of a_bar, b_bar to ~1e-12 relative, also those
    # of nodes of mass 1e-12 .. 1e-4 (without its final Gauss-Seidel sweep, CG
    # loses 4 digits there).
    mp = pytest.importorskip("mpmath")
    rng = np.random.default_rng(3)
    n, m = 30, 20
    C = rng.random((n, m))
    a, b = rng.dirichlet(np.ones(n)), rng.dirichlet(np.ones(m))
    a[:3], b[:3] = [1e-12, 1e-8, 1e-4], [1e-12, 1e-9, 1e-5]
    a, b = a / a.sum(), b / b.sum()
    res = sk.sinkhorn(C, a, b, eps=0.05, tol=1e-14, max_iter=200_000)
    G = rng.standard_normal((n, m))
    with mp.workdps(50):
        Pm, Gm = mp.matrix(res.P.tolist()), mp.matrix(G.tolist())
        keep = [j for j in range(m) if j != int(np.argmax(b))]          # v_j = 0 there (gauge)
        M, rhs = mp.zeros(n + m - 1, n + m - 1), mp.zeros(n + m - 1, 1)
        for i in range(n):
            M[i, i] = mp.fsum(Pm[i, j] for j in range(m))
            rhs[i] = mp.fsum(Pm[i, j] * Gm[i, j] for j in range(m))
            for q, j in enumerate(keep):
                M[i, n + q] = M[n + q, i] = Pm[i, j]
        for q, j in enumerate(keep):
            M[n + q, n + q] = mp.fsum(Pm[i, j] for i in range(n))
            rhs[n + q] = mp.fsum(Pm[i, j] * Gm[i, j] for i in range(n))
        z = mp.lu_solve(M, rhs)
        u = [z[i] for i in range(n)]
        v = [mp.mpf(0)] * m
        for q, j in enumerate(keep):
            v[j] = z[n + q]
        shift = mp.fsum(u) / n
        a_ref = np.array([float(x - shift) for x in u])
        b_ref = np.array([float(x + shift) for x in v])
    for method in sk.METHODS:
        _, a_bar, b_bar = sk.sinkhorn_vjp(res, G, method=method)
        assert np.max(np.abs(a_bar - a_ref) / np.abs(a_ref)) <= 1e-12, method
        assert np.max(np.abs(b_bar - b_ref) / np.abs(b_ref)) <= 1e-12, method


def test_dense_paths_stay_accurate_when_the_last_column_is_tiny(backend, rng):
    # The paper's reduced system drops the last column constraint; with a last
    # column of mass 1e-12 that cost ~8 digits of b_bar (1.6e-4 relative).
    # Dropping the heaviest column's constraint keeps every path at round-off.
    C, a, b = problem(rng, 5, 4)
    b[-1] = 1e-12
    b *= a.sum() / b.sum()
    res = sk.sinkhorn(*put(backend, F64, C, a, b), eps=0.1, **TIGHT)
    G = put(backend, F64, rng.standard_normal((5, 4)))[0]
    ref = host(*sk.sinkhorn_vjp(res, G, method="cg"))
    for method in ("schur", "reduced", "kkt"):
        got = host(*sk.sinkhorn_vjp(res, G, method=method))
        assert all(rel(x, y) <= 1e-10 for x, y in zip(got, ref)), method


def _with_column_mass(res, j, k):
    """The result with column j's potential lowered by k eps: the column's mass
    scales by exp(-k) (k = 800: exact zeros, an isolated node)."""
    import dataclasses

    xp = backend.namespace(g=res.g)
    m = res.g.shape[-1]
    g = res.g - (k * res.eps) * xp.astype(xp.arange(m, device=backend.device(res.g)) == j, res.g.dtype)
    P = xp.exp((res.f[..., :, None] + g[..., None, :] - res.C) / res.eps)
    return dataclasses.replace(res, P=P, g=g, converged=xp.asarray(False, device=backend.device(res.g)))


def test_zero_mass_column_is_the_limit_of_a_tiny_one(backend, rng):
    # A column of P that underflowed to exact zeros (small eps, stopped early)
    # makes the backward system's equation for it read 0 = 0.  Its gradients
    # are the limit of a column of tiny mass (exp(-600) ~ 1e-261, handled by
    # the regular path): no NaN, no division by zero, all paths agree, and
    # the JVP stays the adjoint of the VJP.
    C, a, b = problem(rng, 6, 5)
    res = sk.sinkhorn(*put(backend, F64, C, a, b), eps=0.1, **TIGHT)
    G = put(backend, F64, rng.standard_normal((6, 5)))[0]
    dirs = put(backend, F64, rng.standard_normal((6, 5)), a * rng.standard_normal(6), b * rng.standard_normal(5))
    for j in (1, 4):
        zero, tiny = _with_column_mass(res, j, 800.0), _with_column_mass(res, j, 600.0)
        assert float(to_host(zero.P)[:, j].max()) == 0.0 < float(to_host(tiny.P)[:, j].max())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            ref_vjp = host(*sk.sinkhorn_vjp(tiny, G))
            ref_jvp = host(sk.sinkhorn_jvp(tiny, *dirs))[0]
            for method in sk.METHODS:
                got = host(*sk.sinkhorn_vjp(zero, G, method=method))
                assert all(rel(x, y) <= 1e-12 for x, y in zip(got, ref_vjp)), (j, method)
                assert abs(float(ref_vjp[2][j])) > 1e-3          # a real, non-zero limit
                dP = host(sk.sinkhorn_jvp(zero, *dirs, method=method))[0]
                assert rel(dP, ref_jvp) <= 1e-12, (j, method)
                r = check.adjoint_test(lambda *t: sk.sinkhorn_jvp(zero, *t, method=method),
                                       lambda v: sk.sinkhorn_vjp(zero, v, method=method), dirs, G, tol=1e-12)
                assert r.passed, (j, method, r)


def test_vjp_of_an_early_stopped_forward_at_small_eps_is_finite(backend, rng):
    # One iteration at eps = 1e-3: whole columns of P underflow to 0.
    C = rng.random((5, 4))
    C[:, 2] += 2.0
    a, b = np.full(5, 0.2), np.full(4, 0.25)
    res = sk.sinkhorn(*put(backend, F64, C, a, b), eps=1e-3, max_iter=1, warn=False)
    assert float(to_host(res.P).sum(0).min()) == 0.0
    G = put(backend, F64, rng.standard_normal((5, 4)))[0]
    dirs = put(backend, F64, *feasible(rng, C, a, b))
    for method in ("schur", "cg", "kkt"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bars = host(*sk.sinkhorn_vjp(res, G, method=method))
            dP = host(sk.sinkhorn_jvp(res, *dirs, method=method))[0]
        assert all(np.all(np.isfinite(x)) for x in (*bars, dP)), method
        assert ConvergenceWarning in {type(w.message) for w in caught}


def test_adjoint_identity_holds_for_any_direction(backend, rng):
    # Infeasible tangents are projected by the JVP; the projection is the adjoint
    # of the gauge fixing, so <J u, w> = <u, J^T w> for every u.
    C, a, b = problem(rng, 5, 4)
    res = sk.sinkhorn(*put(backend, F64, C, a, b), eps=0.1, **TIGHT)
    u = put(backend, F64, rng.standard_normal((5, 4)), rng.standard_normal(5), rng.standard_normal(4))
    w = put(backend, F64, rng.standard_normal((5, 4)))[0]
    for method in sk.METHODS:
        r = check.adjoint_test(lambda *t: sk.sinkhorn_jvp(res, *t, method=method),
                               lambda v: sk.sinkhorn_vjp(res, v, method=method), u, w, tol=1e-12)
        assert r.passed, (method, r)


def test_gauge_and_zero_sums(backend, dtype, rng):
    C, a, b = problem(rng, 6, 5)
    res = sk.sinkhorn(*put(backend, dtype, C, a, b), eps=0.1, **TIGHT)
    G = rng.standard_normal((6, 5))
    C_bar, a_bar, b_bar = host(*sk.sinkhorn_vjp(res, put(backend, dtype, G)[0]))
    u = 1e-15 if dtype == F64 else 1e-6
    assert abs(a_bar.sum()) <= 10 * u * np.abs(a_bar).max()
    assert np.abs(C_bar.sum(0)).max() <= 100 * u * np.abs(C_bar).max()
    assert np.abs(C_bar.sum(1)).max() <= 100 * u * np.abs(C_bar).max()
    # gauge invariance: a shifted pair gives the same pairing with feasible moves,
    # and u_i + v_j (hence C_bar) is what the gauge fix preserves.
    dirs = feasible(rng, C, a, b)
    shifted = (C_bar, a_bar + 3.7, b_bar - 3.7)
    assert math.isclose(pairing(shifted, dirs), pairing((C_bar, a_bar, b_bar), dirs), rel_tol=1e-9, abs_tol=1e-12)
    P = host(res.P)[0]
    T = P * G
    eps = 0.1
    recon = -(T - P * (a_bar[:, None] + b_bar[None, :])) / eps
    assert rel(recon, C_bar) <= (1e-10 if dtype == F64 else 1e-3)


def test_eps_derivative(backend, rng):
    C, a, b = problem(rng, 5, 4)
    G = rng.standard_normal((5, 4))
    eps = 0.07
    res = sk.sinkhorn(*put(backend, F64, C, a, b), eps=eps, **TIGHT)
    e_bar = float(to_host(sk.sinkhorn_vjp_eps(res, put(backend, F64, G)[0])))
    C_bar = host(sk.sinkhorn_vjp(res, put(backend, F64, G)[0])[0])[0]
    assert math.isclose(e_bar, -np.sum(C_bar * C) / eps, rel_tol=1e-10)
    arrays = put(backend, F64, C, a, b)
    e0 = put(backend, F64, np.array(eps))[0]
    (D,), _ = check.fd_directional(lambda e: sk.sinkhorn(*arrays, eps=float(e), **TIGHT).P, (e0,),
                                   (put(backend, F64, np.array(1.0))[0],), rel_step=1e-3)
    assert math.isclose(e_bar, float(np.sum(G * to_host(D))), rel_tol=1e-8)


def test_tall_skinny_uses_the_small_side(rng, monkeypatch):
    # n = 3000 scores against 3 anchors: the Schur system is 3 x 3 and the
    # gradient is exact for any cotangent (checked against the reduced system).
    n, m = 3000, 3
    C = rng.random((n, m))
    a = np.full(n, 1.0 / n)
    b = np.array([0.2, 0.3, 0.5])
    res = sk.sinkhorn(C, a, b, eps=0.05, **TIGHT)
    sizes = []
    real = sk_system._schur_operator
    monkeypatch.setattr(sk_system, "_schur_operator", lambda sys: sizes.append(sys.m) or real(sys))
    G = rng.standard_normal((n, m))
    got = sk.sinkhorn_vjp(res, G)
    assert sizes == [3]
    ref = sk.sinkhorn_vjp(res, G, method="reduced")
    assert all(rel(x, y) <= 1e-9 for x, y in zip(got, ref))


def test_cg_is_matrix_free(rng, monkeypatch):
    n, m = 300, 200
    C, a, b = problem(rng, n, m)
    res = sk.sinkhorn(C, a, b, eps=0.1, **TIGHT)
    G = rng.standard_normal((n, m))

    def forbidden(*args, **kwargs):
        raise AssertionError("method='cg' formed a dense n x n or m x m matrix")

    for name in ("_schur_operator", "_spectrum", "_eig_solve", "_kkt_matrix"):
        monkeypatch.setattr(sk_system, name, forbidden)
    monkeypatch.setattr(backend, "solve_vec", forbidden)
    for name, real in (("matvec", sk_system.matvec), ("rmatvec", sk_system.rmatvec)):
        def spy(A, x, real=real):
            assert x.ndim == 1 and A.ndim == 2          # matrix times vector only
            return real(A, x)
        monkeypatch.setattr(sk_system, name, spy)
    tracemalloc.start()
    sk.sinkhorn_vjp(res, G, method="cg")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak <= 6 * n * m * 8                           # a few n x m temporaries


# --------------------------------------------------------------------------
# Unbalanced
# --------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [(0.5, 0.5), (None, 0.3), (2.0, None)])
def test_unbalanced_vjp_against_finite_differences(backend, rng, rho):
    rho_a, rho_b = rho
    C, a, b = problem(rng, 5, 4)
    a, b = 1.4 * a, 0.6 * b
    params = dict(eps=0.1, rho_a=rho_a, rho_b=rho_b, **TIGHT)
    G = rng.standard_normal((5, 4))
    res = sk.sinkhorn(*put(backend, F64, C, a, b), **params)
    r = host(res.P)[0].sum(1)
    if rho_a is not None:       # stationarity: r = a exp(-f / rho_a)
        assert rel(r, a * np.exp(-host(res.f)[0] / rho_a)) <= 1e-12
    # any direction (no mass constraint on a relaxed problem)
    dirs = (rng.standard_normal(C.shape), a * rng.standard_normal(5), b * rng.standard_normal(4))
    if rho_a is None or rho_b is None:
        dirs = feasible(rng, C, a, b) if rho_a is None and rho_b is None else dirs
    bars = host(*sk.sinkhorn_vjp(res, put(backend, F64, G)[0]))
    D = fd_plan(backend, C, a, b, dirs, **params)
    assert math.isclose(pairing(bars, dirs), float(np.sum(G * D)), rel_tol=1e-8, abs_tol=1e-11)
    e_bar = float(to_host(sk.sinkhorn_vjp_eps(res, put(backend, F64, G)[0])))
    arrays = put(backend, F64, C, a, b)
    e0 = put(backend, F64, np.array(0.1))[0]
    p2 = dict(params)
    p2.pop("eps")
    (De,), _ = check.fd_directional(lambda e: sk.sinkhorn(*arrays, eps=float(e), **p2).P, (e0,),
                                    (put(backend, F64, np.array(1.0))[0],), rel_step=1e-3)
    assert math.isclose(e_bar, float(np.sum(G * to_host(De))), rel_tol=1e-7, abs_tol=1e-10)


def test_unbalanced_tends_to_balanced_as_rho_grows(rng):
    C, a, b = problem(rng, 5, 4)
    G = rng.standard_normal((5, 4))
    bal = sk.sinkhorn(C, a, b, eps=0.1, **TIGHT)
    ref = sk.sinkhorn_vjp(bal, G)
    errs = []
    # The unbalanced iteration contracts at rate rho / (rho + eps) (its mass
    # mode), so large rho needs many iterations.
    for rho in (1.0, 1e1, 1e2):
        res = sk.sinkhorn(C, a, b, eps=0.1, rho_a=rho, rho_b=rho, tol=1e-13, max_iter=200_000)
        C_bar, a_bar, b_bar = sk.sinkhorn_vjp(res, G)
        a_bar, b_bar = sk.gauge_fix(a_bar, b_bar)       # the limit is only defined up to the gauge
        errs.append(max(rel(res.P, bal.P), rel(C_bar, ref[0]), rel(a_bar, ref[1]), rel(b_bar, ref[2])))
    assert errs[2] < 1e-2 and 5 < errs[0] / errs[1] < 20 and 5 < errs[1] / errs[2] < 20   # O(eps / rho)
    assert sk.sinkhorn(C, a, b, eps=0.1, rho_a=math.inf, rho_b=math.inf, **TIGHT).balanced


@pytest.mark.parametrize("C, a, b, params", [
    ([[0.63696169]], [0.01], [0.01], dict(eps=1.0, rho_a=0.1, rho_b=0.1)),
    ([[0.0], [0.14798256], [0.25033298]], [0.39414044, 0.19938655, 0.406473], [0.31622777],
     dict(eps=0.1298119586232298, rho_b=3.801014511373048)),
])
def test_float32_unbalanced_reaches_its_floor(C, a, b, params):
    # The relaxed target b exp(-g / rho_b) rounds with |log b|: the floor must
    # include it, or float32 stalls just above the floor until max_iter.
    C, a, b = (np.array(v, np.float32) for v in (C, a, b))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = sk.sinkhorn(C, a, b, **params)
    ref = sk.sinkhorn(*(v.astype(np.float64) for v in (C, a, b)), **params)
    assert bool(res.converged) and int(res.n_iter) < 1000
    assert rel(res.P, ref.P) <= 1e-4

# --------------------------------------------------------------------------
# Values and envelope gradients; peers
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["entropic", "kl", "linear", "entropic_unbalanced"])
def test_value_gradients_against_finite_differences(backend, rng, kind):
    C, a, b = problem(rng, 5, 4)
    params = dict(eps=0.08, **TIGHT)
    if kind == "entropic_unbalanced":
        params.update(rho_a=0.7, rho_b=0.4)
        kind = "entropic"
    value, grad = {"entropic": (sk.entropic_value, sk.entropic_value_grad),
                   "kl": (sk.kl_value, sk.kl_value_grad),
                   "linear": (sk.linear_value, sk.linear_value_grad)}[kind]
    res = sk.sinkhorn(*put(backend, F64, C, a, b), **params)
    C_bar, a_bar, b_bar, eps_bar = host(*grad(res))
    dC, da, db = feasible(rng, C, a, b)
    arrays = put(backend, F64, C, a, b, np.array(params["eps"]))
    tangents = put(backend, F64, dC, da, db, np.array(0.01))
    rest = {k: v for k, v in params.items() if k != "eps"}

    def W(C_, a_, b_, e_):
        return value(sk.sinkhorn(C_, a_, b_, eps=float(e_), **rest))

    (D,), _ = check.fd_directional(W, arrays, tangents, rel_step=1e-3)
    expected = float(to_host(D))
    got = pairing((C_bar, a_bar, b_bar), (dC, da, db)) + 0.01 * float(eps_bar)
    assert math.isclose(got, expected, rel_tol=1e-8, abs_tol=1e-12)


def test_values_against_definitions_and_peers(rng):
    ot = pytest.importorskip("ot")
    C, a, b = problem(rng, 6, 5)
    eps = 0.1
    res = sk.sinkhorn(C, a, b, eps=eps, **TIGHT)
    P, f, g = res.P, res.f, res.g
    h = -np.sum(P * (np.log(P) - 1.0))
    assert math.isclose(float(sk.entropic_value(res)), np.sum(C * P) - eps * h, rel_tol=1e-12)
    assert math.isclose(float(sk.entropic_value(res)), f @ a + g @ b - eps * P.sum(), rel_tol=1e-11)
    kl = np.sum(P * np.log(P / np.outer(a, b)) - P + np.outer(a, b))
    assert math.isclose(float(sk.kl_value(res)), np.sum(C * P) + eps * kl, rel_tol=1e-12)
    # KL convention: the dual value of the KL-regularised problem (probability marginals)
    assert math.isclose(float(sk.kl_value(res)), (f - eps * np.log(a)) @ a + (g - eps * np.log(b)) @ b,
                        rel_tol=1e-10)
    # POT's sinkhorn2 returns the linear part <C, P>
    assert math.isclose(float(sk.linear_value(res)),
                        float(ot.sinkhorn2(a, b, C, eps, method="sinkhorn_log", stopThr=1e-14,
                                           numItermax=100_000)), rel_tol=1e-10)


def test_kl_value_rejects_unbalanced(rng):
    C, a, b = problem(rng, 3, 3)
    res = sk.sinkhorn(C, a, b, eps=0.1, rho_a=1.0, rho_b=1.0)
    with pytest.raises(ValueError, match="balanced problems only"):
        sk.kl_value(res)


# --------------------------------------------------------------------------
# Unrolled baseline
# --------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [(None, None), (0.5, 2.0)])
def test_unrolled_vjp_is_the_gradient_of_the_iteration_map(backend, rng, rho):
    C, a, b = problem(rng, 4, 3)
    eps, tau = 0.1, 6
    kw = dict(rho_a=rho[0], rho_b=rho[1])
    G = rng.standard_normal((4, 3))
    arrays = put(backend, F64, C, a, b)
    res = sk.sinkhorn_unrolled(*arrays, eps=eps, n_iter=tau, **kw)
    assert len(res.row_softmax) == tau and len(res.col_softmax) == tau - 1
    assert res.tape_nbytes == (2 * tau - 1) * 4 * 3 * 8
    # same plan as sinkhorn stopped at the same iteration
    ref = sk.sinkhorn(*arrays, eps=eps, tol=0.0, max_iter=tau, check_every=tau, warn=False, **kw)
    assert rel(host(res.P)[0], host(ref.P)[0]) <= 1e-14
    # any direction when unbalanced (its damped updates weigh the (c, -c) mass direction)
    dirs = feasible(rng, C, a, b) if rho[0] is None else (rng.standard_normal(C.shape), a * rng.standard_normal(4),
                                                          b * rng.standard_normal(3))
    bars = sk.sinkhorn_unrolled_vjp(res, put(backend, F64, G)[0])
    out = check.fd_jacobian_check(lambda *x: sk.sinkhorn_unrolled(*x, eps=eps, n_iter=tau, **kw).P, arrays,
                                  put(backend, F64, *dirs), cotangents=put(backend, F64, G)[0],
                                  vjp=lambda v: sk.sinkhorn_unrolled_vjp(res, v), tol=1e-9)
    assert all(r.passed for r in out), out
    assert all(np.all(np.isfinite(x)) for x in host(*bars))


def test_unrolled_one_iteration_closed_form(rng):
    # tau = 1: P = diag(a) softmax_row(-C / eps), so
    # C_bar = -(1/eps) P * (G - rowsum(S * G)),  a_bar = rowsum(S * G),  b_bar = 0.
    C, a, b = problem(rng, 4, 5)
    eps = 0.3
    G = rng.standard_normal((4, 5))
    res = sk.sinkhorn_unrolled(C, a, b, eps=eps, n_iter=1)
    S = np.exp(-C / eps) / np.exp(-C / eps).sum(1, keepdims=True)
    avg = (S * G).sum(1, keepdims=True)
    C_bar, a_bar, b_bar = sk.sinkhorn_unrolled_vjp(res, G)
    assert rel(res.P, a[:, None] * S) <= 1e-14
    assert rel(C_bar, -(a[:, None] * S) * (G - avg) / eps) <= 1e-13
    assert rel(a_bar, avg[:, 0]) <= 1e-13 and np.abs(b_bar).max() == 0.0


def test_unrolled_tends_to_implicit(rng):
    C, a, b = problem(rng, 5, 5, eps_cost="sqdist")
    G = rng.standard_normal((5, 5))
    ref = sk.sinkhorn_vjp(sk.sinkhorn(C, a, b, eps=0.1, **TIGHT), G)
    errs = []
    for tau in (5, 50, 400):
        un = sk.sinkhorn_unrolled_vjp(sk.sinkhorn_unrolled(C, a, b, eps=0.1, n_iter=tau), G)
        un = (un[0], *sk.gauge_fix(un[1], un[2]))
        errs.append(max(rel(x, y) for x, y in zip(un, ref)))
    assert errs[2] < 1e-8 and errs[2] < errs[1] < errs[0]


# --------------------------------------------------------------------------
# Theorem 5 bound and the conditioning diagnostic
# --------------------------------------------------------------------------

def _constraint_matrix(n, m):
    """The paper's E~: the Jacobian of (P 1, (P^T 1) without its last entry)
    with respect to vec(P), shape (n m, n + m - 1)."""
    E = np.zeros((n * m, n + m - 1))
    for i in range(n):
        for j in range(m):
            E[i * m + j, i] = 1.0
            if j < m - 1:
                E[i * m + j, n + j] = 1.0
    return E


def test_kappa_closed_form_matches_svd():
    for n, m in [(1, 1), (1, 4), (4, 1), (2, 2), (3, 5), (6, 3), (7, 7)]:
        E = _constraint_matrix(n, m)
        expected = 1.0 / np.linalg.svd(E, compute_uv=False).min()
        assert math.isclose(sk.constraint_pinv_norm(n, m), expected, rel_tol=1e-12), (n, m)


def _paper_gauge(a_bar, b_bar):
    return a_bar + b_bar[-1], b_bar - b_bar[-1]


def test_theorem5_bound_is_the_stated_formula(rng):
    # The paper's constants recomputed from the plans on the host, kappa from an SVD.
    n, m, eps = 4, 3, 0.2
    C, a, b = problem(rng, n, m)
    exact = sk.sinkhorn(C, a, b, eps=eps, **TIGHT)
    approx = sk.sinkhorn(C, a, b, eps=eps, tol=0.0, max_iter=2, check_every=1, warn=False)
    C1, C2 = 1.7, 0.3
    bound = sk.sinkhorn_error_bound(approx, C1=C1, C2=C2, reference=exact)
    D = exact.P - approx.P
    s_minus = min(exact.P.min(), approx.P.min())
    s_plus = max(exact.P.max(), approx.P.max())
    E = _constraint_matrix(n, m)
    kappa = 1.0 / np.linalg.svd(E, compute_uv=False).min()
    factor = (C1 / s_minus + C2) * np.linalg.norm(D)
    assert math.isclose(float(bound.C), s_plus / eps * factor, rel_tol=1e-12)
    assert math.isclose(float(bound.ab), kappa * math.sqrt(s_plus / s_minus) * factor, rel_tol=1e-12)
    assert math.isclose(float(bound.P_err), np.linalg.norm(D), rel_tol=1e-12)
    with pytest.raises(ValueError, match="'reference' did not converge"):
        sk.sinkhorn_error_bound(approx, C1=C1, C2=C2, reference=approx)


def test_theorem5_bound_holds_on_unconverged_forwards():
    rng = np.random.default_rng(11)
    worst_C = worst_ab = 0.0
    for trial in range(40):
        n, m = rng.integers(2, 7, size=2)
        eps = float(rng.choice([0.05, 0.1, 0.3, 1.0]))
        C, a, b = problem(rng, n, m)
        exact = sk.sinkhorn(C, a, b, eps=eps, **TIGHT)
        approx = sk.sinkhorn(C, a, b, eps=eps, tol=0.0, max_iter=int(rng.integers(1, 8)), check_every=1, warn=False)
        if trial % 2:      # linear loss <G, P>: C1 = ||G||_F, C2 = 0
            G = rng.standard_normal((n, m))
            G_star = G_tau = G
            C1, C2 = np.linalg.norm(G), 0.0
        else:              # quadratic loss ||P - Q||^2 / 2: grad P - Q, Hessian I
            Q = rng.random((n, m)) / (n * m)
            G_star, G_tau = exact.P - Q, approx.P - Q
            C1, C2 = max(np.linalg.norm(G_star), np.linalg.norm(G_tau)), 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            bs = sk.sinkhorn_vjp(exact, G_star)
            bt = sk.sinkhorn_vjp(approx, G_tau)
        bound = sk.sinkhorn_error_bound(approx, C1=C1, C2=C2, reference=exact)
        err_C = np.linalg.norm(bs[0] - bt[0])
        ab_s, ab_t = np.concatenate(_paper_gauge(*bs[1:])), np.concatenate(_paper_gauge(*bt[1:]))
        err_ab = np.linalg.norm(ab_s - ab_t)
        assert err_C <= float(bound.C) and err_ab <= float(bound.ab), trial
        worst_C = max(worst_C, err_C / float(bound.C))
        worst_ab = max(worst_ab, err_ab / float(bound.ab))
        # the P_err form (no reference) is looser or vacuous, never smaller
        alt = sk.sinkhorn_error_bound(approx, C1=C1, C2=C2, P_err=float(bound.P_err))
        assert float(alt.C) >= float(bound.C) * (1 - 1e-12)
        assert float(alt.ab) >= float(bound.ab) * (1 - 1e-12)
    # not vacuous: the largest error / bound here is 0.017 (C) and 0.035 (a, b)
    assert worst_C > 3e-3 and worst_ab > 5e-3


def test_spectral_gap_is_one_minus_second_singular_value_squared(backend, rng):
    C, a, b = problem(rng, 6, 4)
    res = sk.sinkhorn(*put(backend, F64, C, a, b), eps=0.1, **TIGHT)
    cond = res.conditioning
    P = host(res.P)[0]
    B = P / np.sqrt(P.sum(1))[:, None] / np.sqrt(P.sum(0))[None, :]
    s = np.linalg.svd(B, compute_uv=False)
    assert math.isclose(float(to_host(cond.spectral_gap)), 1.0 - s[1] ** 2, rel_tol=1e-10)
    assert cond.side == "cols" and bool(to_host(cond.reliable))


def test_forward_rate_and_backward_condition_are_linked(rng):
    # Sinkhorn's linear rate is ~ (1 - gap) per iteration, so slow forwards and
    # ill-conditioned backwards come together.
    C, a, b = problem(rng, 8, 8)
    res = sk.sinkhorn(C, a, b, eps=0.05, tol=1e-12, max_iter=200_000, check_every=1)
    gap = float(res.conditioning.spectral_gap)
    e1 = float(sk.sinkhorn(C, a, b, eps=0.05, tol=0.0, max_iter=int(res.n_iter) // 2, warn=False).error)
    e2 = float(sk.sinkhorn(C, a, b, eps=0.05, tol=0.0, max_iter=int(res.n_iter) // 2 + 10, warn=False).error)
    rate = (e2 / e1) ** 0.1
    assert abs(rate - (1.0 - gap)) <= 0.1 * gap + 1e-3


def test_ill_conditioned_assignment_is_flagged_not_crashing(backend):
    rng = np.random.default_rng(3)
    n = 8
    C = rng.random((n, n))
    a = np.full(n, 1.0 / n)
    arrays = put(backend, F64, C, a, a)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sk.sinkhorn(*arrays, eps=0.005, max_iter=5000)
        bars = host(*sk.sinkhorn_vjp(res, put(backend, F64, rng.standard_normal((n, n)))[0]))
    kinds = [type(w.message) for w in caught]
    assert ConvergenceWarning in kinds and ConditioningWarning in kinds
    assert float(to_host(res.conditioning.cond)) > res.conditioning.threshold
    assert all(np.all(np.isfinite(x)) for x in bars)
    # float32 flags much earlier (threshold 1/sqrt(u) = 4096)
    res32 = sk.sinkhorn(*put(backend, "float32", C, a, a), eps=0.02, max_iter=50_000)
    assert res32.all_converged          # to the float32 floor (~1e-4): converged, yet cond ~ 2e4
    with pytest.warns(ConditioningWarning):
        sk.sinkhorn_vjp(res32, put(backend, "float32", np.ones((n, n)))[0], warn=True)


def test_disconnected_plan_falls_back_to_least_squares(backend, rng):
    # Exact zeros between two blocks (exp(-1000/eps) underflows): S has a second
    # null vector; the truncated solve is exact for C_bar and for marginal moves
    # that keep each block's mass, and agrees with CG on the consistent system.
    C = np.full((4, 4), 1e3)
    C[:2, :2], C[2:, 2:] = rng.random((2, 2)), rng.random((2, 2))
    a = np.array([0.1, 0.3, 0.4, 0.2])
    b = np.array([0.25, 0.15, 0.35, 0.25])
    res = sk.sinkhorn(*put(backend, F64, C, a, b), eps=0.5, tol=1e-14)
    assert res.all_converged
    G = rng.standard_normal((4, 4))
    with pytest.warns(ConditioningWarning, match="truncated"):
        bars = host(*sk.sinkhorn_vjp(res, put(backend, F64, G)[0]))
    cg = host(*sk.sinkhorn_vjp(res, put(backend, F64, G)[0], method="cg"))
    assert all(rel(x, y) <= 1e-10 for x, y in zip(bars, cg))
    dirs = (rng.standard_normal((4, 4)), np.array([1.0, -1.0, 2.0, -2.0]) * 0.01,
            np.array([0.5, -0.5, 1.0, -1.0]) * 0.01)
    D = fd_plan(backend, C, a, b, dirs, eps=0.5, tol=1e-15)
    assert math.isclose(pairing(bars, dirs), float(np.sum(G * D)), rel_tol=1e-8)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

def test_bad_input_names_the_argument(rng):
    C, a, b = problem(rng, 3, 4)
    ok = dict(eps=0.1)
    cases = [
        ((C, -a, b), ok, ValueError, "'a'.*negative"),
        ((C, a, np.where(np.arange(4) == 0, 0.0, b)), ok, ValueError, "'b'"),
        ((C, a, 2 * b), ok, ValueError, "'b'.*mass"),
        ((C, a, b), dict(eps=0.0), ValueError, "'eps'"),
        ((C, a, b), dict(eps=-1.0), ValueError, "'eps'"),
        ((np.where(np.eye(3, 4) > 0, np.nan, C), a, b), ok, ValueError, "'C'.*NaN"),
        ((np.where(np.eye(3, 4) > 0, np.inf, C), a, b), ok, ValueError, "'C'.*NaN or Inf"),
        ((C, a[:2], b), ok, ValueError, "'a'"),
        ((C, a, b[:3]), ok, ValueError, "'b'"),
        ((C[0], a, b), ok, ValueError, "'C'"),
        ((C.tolist(), a, b), ok, TypeError, "'C'"),
        ((C, a.astype(np.float32), b), ok, TypeError, "'a'"),
        ((C, a, b), dict(eps=0.1, rho_a=0.0), ValueError, "'rho_a'"),
        ((C, a, b), dict(eps=0.1, tol=-1.0), ValueError, "'tol'"),
        ((C, a, b), dict(eps=0.1, max_iter=0), ValueError, "'max_iter'"),
        ((np.stack([C, C]), np.stack([a, a, a]), b), ok, ValueError, "do not broadcast"),
    ]
    for args, params, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            sk.sinkhorn(*args, **params)
    res = sk.sinkhorn(C, a, b, eps=0.1)
    with pytest.raises(ValueError, match="'P_bar'"):
        sk.sinkhorn_vjp(res, np.ones((4, 3)))
    with pytest.raises(ValueError, match="'method'"):
        sk.sinkhorn_vjp(res, np.ones((3, 4)), method="lu")
    with pytest.raises(ValueError, match="'dC'"):
        sk.sinkhorn_jvp(res, np.ones((4, 3)), None, None)
    with pytest.raises(TypeError, match="'res'"):
        sk.sinkhorn_vjp(None, np.ones((3, 4)))
    with pytest.raises(ValueError, match="'n_iter'"):
        sk.sinkhorn_unrolled(C, a, b, eps=0.1, n_iter=0)


def test_tiny_mass_mismatch_is_accepted_and_floors_tol(rng):
    C, a, b = problem(rng, 3, 4)
    res = sk.sinkhorn(C, a, b * (1 + 5e-10), eps=0.1, tol=1e-13)
    assert res.converged and float(res.tol) >= 1e-9


def test_inputs_are_not_modified(backend, rng):
    C, a, b = problem(rng, 4, 3)
    G_host = rng.standard_normal((4, 3))
    arrays = put(backend, F64, C, a, b)
    G = put(backend, F64, G_host)[0]
    res = sk.sinkhorn(*arrays, eps=0.1)
    for method in sk.METHODS:
        sk.sinkhorn_vjp(res, G, method=method)
        sk.sinkhorn_vjp_eps(res, G, method=method)
        sk.sinkhorn_jvp(res, G, *arrays[1:], method=method)
    sk.sinkhorn_unrolled_vjp(sk.sinkhorn_unrolled(*arrays, eps=0.1, n_iter=3), G)
    for x, ref in zip(host(*arrays, G), (C, a, b, G_host)):
        assert np.array_equal(x, ref)


def test_module_is_callable_as_in_design():
    import importlib
    import inspect
    import pickle
    import types

    import refimpl
    import refimpl.sinkhorn as module

    C = np.array([[0.0, 1.0], [1.0, 0.0]])
    a = np.array([0.5, 0.5])
    res = refimpl.sinkhorn(C, a, a, eps=0.5)
    assert isinstance(res, sk.SinkhornResult) and res.converged
    # still a module, the same object under every import spelling
    assert module is refimpl.sinkhorn is sk and isinstance(module, types.ModuleType)
    assert importlib.import_module("refimpl.sinkhorn") is module and inspect.isfunction(module.sinkhorn)
    assert inspect.signature(refimpl.sinkhorn) == inspect.signature(sk.sinkhorn)
    # results (with a cached diagnostic) and the functions pickle by qualified name
    _ = res.conditioning
    back = pickle.loads(pickle.dumps(res))
    assert type(back) is sk.SinkhornResult and np.array_equal(back.P, res.P)
    assert float(back.conditioning.spectral_gap) == float(res.conditioning.spectral_gap)
    assert pickle.loads(pickle.dumps(sk.sinkhorn_vjp)) is sk.sinkhorn_vjp


def test_benchmark_quick_smoke_run(capsys, load_benchmark):
    module = load_benchmark("sinkhorn")
    assert module.main(["--quick", "--out", ""]) == 0
    out = capsys.readouterr().out
    assert "implicit-schur" in out and "unrolled" in out and "independent of tau" in out


def test_docstring_examples_hold():
    import doctest

    assert doctest.testmod(sk, raise_on_error=False).failed == 0


def test_eps_below_the_dtype_floor_is_never_converged():
    """When the rounding floor of the log-domain plan, 32 u (1 + max|C|/eps +
    log nm), reaches 1 the marginal error resolves nothing; such a member is
    reported unconverged with a warning naming eps, whatever error it shows."""
    C = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.2]])
    a, b = np.full(3, 1 / 3), np.array([0.5, 0.5])
    for dtype, eps in (("float64", 1e-30), ("float32", 1e-9)):
        with pytest.warns(ConvergenceWarning, match=f"too small for {dtype}"):
            res = sk.sinkhorn(C.astype(dtype), a.astype(dtype), b.astype(dtype), eps=eps,
                              max_iter=50)
        assert not res.all_converged and float(np.max(res.tol)) >= 1.0
    # Members that the dtype resolves are unaffected, in the same batch.
    Cb = np.stack([C, C])
    res = sk.sinkhorn(Cb, a, b, eps=0.1)
    assert res.all_converged and np.all(res.tol < 1e-6)


def test_forward_reads_the_device_only_at_checks_where_syncs_are_deferred():
    """Where a host read waits for the device (CuPy, torch on CUDA), the forward
    takes the log domain, which reads back only at the convergence checks; the
    scaling domain decides absorptions on the host twice per iteration."""
    host = get_backend("numpy")
    device_like = get_backend("cupy_semantics")
    assert sk_iterations._use_scaling(4, 4, backend.policy_of(host.asarray(np.zeros((4, 4)))))
    assert not sk_iterations._use_scaling(4, 4, backend.policy_of(device_like.asarray(np.zeros((4, 4)))))


def test_cg_reports_per_member_iterations(rng):
    """CG runs on the iteration driver: each member of a batch stops at its
    own count (the count it gets alone), and the typed SolveInfo carries the
    per-member diagnostics and the relative residual it reached."""
    probs = [problem(rng, 60, 40) for _ in range(2)]
    C = np.stack([probs[0][0], 10.0 * probs[1][0]])          # the second: a sharper plan
    a, b = probs[0][1], probs[0][2]
    res = sk.sinkhorn(C, a, b, eps=0.1, **TIGHT)
    G = rng.standard_normal((2, 60, 40))
    sys = sk_system._system(res)
    T = res.P * G
    (_, _), info = sk_system._solve_cg(sys, T.sum(-1), T.sum(-2))
    assert isinstance(info, sk_system.SolveInfo) and info.cg.n_iter.shape == (2,)
    assert info.cg.all_converged and np.all(info.cg.error <= 1e-10)
    for k in range(2):
        alone = sk.sinkhorn(C[k], a, b, eps=0.1, **TIGHT)
        sys1 = sk_system._system(alone)
        T1 = alone.P * G[k]
        (_, _), info1 = sk_system._solve_cg(sys1, T1.sum(-1), T1.sum(-2))
        assert int(info1.cg.n_iter) == int(info.cg.n_iter[k])
    assert info.cg.n_iter[0] != info.cg.n_iter[1]
