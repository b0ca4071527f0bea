"""Property-based tests (hypothesis) for every operator family.

Each test draws *valid* inputs inside the ranges the operators document
(sizes, scales, temperatures, ``k``, conditioning; float64 and float32) and
asserts an invariant that holds for every such input, computed by a route
independent of the code under test:

* Sinkhorn: marginals of ``P`` to the solver's tolerance, ``P >= 0`` and of
  Gibbs form, the dot-product (adjoint) identity between ``sinkhorn_jvp`` and
  ``sinkhorn_vjp`` with the gauge ``sum(a_bar) = 0``, batch == loop.
* SOFT top-k: ``sum A = k``, ``0 <= A <= 1``, monotone in the scores, the
  adjoint identity, closed form == Sinkhorn path; the sorted variant's
  structure (columns sum to 1, rows to at most 1).
* Combinatorial solvers: feasibility, optimality against brute force over
  ``itertools`` enumerations, identity-with-projection VJPs against their
  defining formulas.
* Matrix square root: ``S S = A`` to the method's documented accuracy,
  symmetry, ``S_inv A S_inv = I``, the adjoint identity of the exact
  derivatives, ``lyapunov`` solving ``B X + X B^T = C``.
* DEQ: fixed-point residual for ``||W||_2 <= 0.9``, both solvers find the
  same point, exact VJP against the JVP, JVP against central differences,
  Neumann phantom gradients converging to the exact one.
* Non-convergence (too few iterations) is flagged and warned about.
* Linear solve: ``A x = b`` and the adjoint identity.

Invalid inputs (NaN/Inf, wrong shapes, ``eps <= 0``, negative marginals,
``k`` out of range, non-SPD matrices, integer arrays) must raise the
documented error naming the offending argument.

Inputs are generated from a drawn seed and drawn sizes/scales, so hypothesis
explores (and shrinks) the documented parameter ranges while the arrays come
from a NumPy generator.  ``derandomize=True`` and ``database=None`` make every
run draw the same examples: the suite is deterministic.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from refimpl import combinatorial as comb
from refimpl import deq, linsolve, matsqrt, topk
from refimpl import sinkhorn as sk
from refimpl.backend import ConvergenceWarning

#: Deterministic, bounded example counts (the whole module runs in well under a minute).
FAST = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=20)
INVALID = settings(FAST, max_examples=25)

DTYPES = st.sampled_from(["float64", "float32"])
SEEDS = st.integers(0, 2**32 - 1)

#: Unit round-off per dtype.
U = {"float64": 2.0 ** -53, "float32": 2.0 ** -24}
#: Adjoint-identity tolerance per dtype (the registry's ``adjoint`` tolerances,
#: relative to ``sum |Ju * v| + sum |u * J^T v|``).
ADJ = {"float64": 1e-11, "float32": 1e-5}


def adjoint_error(Ju, v, u, JTv) -> float:
    """``|<J u, v> - <u, J^T v>|`` relative to the magnitudes of both sums.

    ``Ju``/``v`` and ``u``/``JTv`` are sequences of paired arrays; sums are
    taken in float64 on the host.
    """
    lhs = mag = rhs = 0.0
    for p, q in zip(Ju, v):
        p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
        lhs += float(np.sum(p * q))
        mag += float(np.sum(np.abs(p * q)))
    for p, q in zip(u, JTv):
        p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
        rhs += float(np.sum(p * q))
        mag += float(np.sum(np.abs(p * q)))
    return abs(lhs - rhs) / mag if mag > 0 else 0.0


def rel_err(actual, expected) -> float:
    """Normwise ``max|actual - expected| / max|expected|`` (0 when both vanish)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    diff = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    return diff / scale if scale > 0 else diff


def poison(rng, x, value):
    """A copy of ``x`` with one entry replaced by ``value`` (NaN, +-Inf)."""
    y = np.array(x, copy=True)
    y.reshape(-1)[rng.integers(y.size)] = value
    return y


BAD_VALUES = st.sampled_from([math.nan, math.inf, -math.inf])
BAD_SCALARS = st.sampled_from([0.0, -1e-3, -1.0, math.nan, math.inf, -math.inf])
INT_DTYPES = st.sampled_from([np.int64, np.int32])


# ==========================================================================
# Sinkhorn
# ==========================================================================

@st.composite
def ot_problems(draw, *, batch: int = 0, balanced: bool = True):
    """A Sinkhorn problem in the documented range.

    Cost ``C = offset + scale * U(0, 1)`` with ``scale`` in [1e-2, 1e2], an
    offset up to 10 scales either way, ``eps`` in [0.2, 2] scales (the
    relative temperature sets Sinkhorn's rate: at eps = 0.05 scale some 4 x 4
    costs need more than the default max_iter = 10000 sweeps for tol =
    1e-10, which the solver reports), positive marginals with
    entries spanning up to three decades, total mass in [1e-2, 1e2] (equal
    for a balanced problem).  Returns host float64 arrays plus the dtype.
    """
    dtype = draw(DTYPES)
    n = draw(st.integers(1, 6))
    m = draw(st.integers(1, 6))
    scale = 10.0 ** draw(st.floats(-2, 2))
    offset = draw(st.floats(-10, 10)) * scale
    eps = draw(st.floats(0.2, 2.0)) * scale
    mass = 10.0 ** draw(st.floats(-2, 2))
    spread = draw(st.floats(0, 3))
    rng = np.random.default_rng(draw(SEEDS))
    bshape = (batch,) if batch else ()
    C = offset + scale * rng.random(bshape + (n, m))
    a = 10.0 ** (-spread * rng.random(bshape + (n,)))
    b = 10.0 ** (-spread * rng.random(bshape + (m,)))
    a = mass * a / a.sum(-1, keepdims=True)
    b_mass = mass if balanced else mass * 10.0 ** draw(st.floats(-0.5, 0.5))
    b = b_mass * b / b.sum(-1, keepdims=True)
    return dtype, C, a, b, eps


def plan_adjoint_tol(plan, dtype) -> float:
    """Adjoint-identity bound for derivatives through a Sinkhorn plan.

    The plan's entries carry relative rounding errors of ``u (1 + max|C| /
    eps)`` (log domain, see ``sinkhorn``'s tolerance floor) and the backward
    solve amplifies them by ``cond(S^)``: the bound is the registry's
    tolerance or ``64 u cond (1 + max|C| / eps)``, whichever is larger.
    """
    cond = float(np.max(plan.conditioning.cond))
    ratio = float(np.max(np.abs(plan.C))) / plan.eps
    return max(ADJ[dtype], 64.0 * U[dtype] * cond * (1.0 + ratio))


def _cast(dtype, *arrays):
    return tuple(np.asarray(x, dtype=dtype) for x in arrays)


def _ot_directions(seed, dtype, C, a, b, eps):
    """Tangents ``(dC, da, db)`` and a cotangent ``P_bar`` at the problem's
    own scales: ``dC ~ eps N(0, 1)``, ``da ~ a N(0, 1)``, ``db ~ b N(0, 1)``,
    ``P_bar ~ N(0, 1) / mass``.  The identity holds for any directions; at
    these scales the terms ``P * dC / eps`` and ``eps da`` of the solve are
    of the size of ``dP`` itself, so rounding is not amplified by a
    cancellation the scaling introduced (``dC ~ N(0, 1)`` with ``eps =
    0.02`` and ``P ~ 30`` gives terms 1e3 times ``dP``)."""
    rng = np.random.default_rng(seed)
    mass = float(np.max(np.sum(a, axis=-1)))
    return _cast(dtype, eps * rng.standard_normal(C.shape), a * rng.standard_normal(a.shape),
                 b * rng.standard_normal(b.shape), rng.standard_normal(C.shape) / mass)


def _marginal_error(P, a, b):
    """Relative L1 errors of the row and column sums of ``P`` (float64, per member)."""
    P = np.asarray(P, np.float64)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    row = np.abs(P.sum(-1) - a).sum(-1) / np.abs(b).sum(-1)
    col = np.abs(P.sum(-2) - b).sum(-1) / np.abs(b).sum(-1)
    return row, col


@FAST
@given(ot_problems())
def test_sinkhorn_plan_marginals_and_gibbs_form(problem):
    dtype, C, a, b, eps = problem
    C, a, b = _cast(dtype, C, a, b)
    copies = [x.copy() for x in (C, a, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)      # converges in this range
        res = sk.sinkhorn(C, a, b, eps=eps, tol=1e-10)
    assert bool(np.all(res.converged))
    np.testing.assert_array_equal(res.error <= res.tol, True)
    P = np.asarray(res.P)
    assert P.dtype == np.dtype(dtype) and np.all(np.isfinite(P)) and np.all(P >= 0)
    # Both marginals to the tolerance the solver held the plan to.
    row, col = _marginal_error(P, a, b)
    tol = np.asarray(res.tol, np.float64)
    assert np.all(col <= 2.0 * tol), (col, tol)
    assert np.all(row <= 2.0 * tol), (row, tol)
    # Gibbs form P = exp((f 1^T + 1 g^T - C) / eps), recomputed in float64.
    f, g = np.asarray(res.f, np.float64), np.asarray(res.g, np.float64)
    expo = (f[..., :, None] + g[..., None, :] - C.astype(np.float64)) / eps
    mag = (np.abs(f).max() + np.abs(g).max() + np.abs(C).max()) / eps
    assert rel_err(P, np.exp(expo)) <= 16.0 * U[dtype] * (1.0 + mag)
    # Inputs untouched.
    for x, x0 in zip((C, a, b), copies):
        np.testing.assert_array_equal(x, x0)


@INVALID
@given(DTYPES, st.integers(2, 6), st.integers(2, 6), st.floats(1e-3, 1e3), st.integers(1, 3), SEEDS)
def test_sinkhorn_reports_non_convergence(dtype, n, m, eps, max_iter, seed):
    """Stopped after 1-3 sweeps at tol = 0 (raised to the dtype's floor) on
    costs spread over 10 eps: not converged, flagged and warned about."""
    rng = np.random.default_rng(seed)
    C = eps * 10.0 * rng.random((n, m))
    a, b = rng.random(n) + 0.1, rng.random(m) + 0.1
    a, b = a / a.sum(), b / b.sum()
    C, a, b = _cast(dtype, C, a, b)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        res = sk.sinkhorn(C, a, b, eps=eps, tol=0.0, max_iter=max_iter)
    assert not res.all_converged
    np.testing.assert_array_equal(res.converged, res.error <= res.tol)


@FAST
@given(ot_problems(), st.sampled_from(sk.METHODS), SEEDS)
def test_sinkhorn_adjoint_identity_and_gauge(problem, method, seed):
    dtype, C, a, b, eps = problem
    C, a, b = _cast(dtype, C, a, b)
    res = sk.sinkhorn(C, a, b, eps=eps)
    dC, da, db, P_bar = _ot_directions(seed, dtype, C, a, b, eps)
    # Arbitrary (also infeasible, 1^T da != 1^T db) tangents: the JVP projects
    # them, and that projection is the adjoint of the VJP's gauge fixing.
    dP = sk.sinkhorn_jvp(res, dC, da, db, method=method)
    C_bar, a_bar, b_bar = sk.sinkhorn_vjp(res, P_bar, method=method)
    err = adjoint_error([dP], [P_bar], [dC, da, db], [C_bar, a_bar, b_bar])
    assert err <= plan_adjoint_tol(res, dtype), (err, res.conditioning.cond)
    # Gauge: sum(a_bar) = 0; C_bar has zero row and column sums.
    scale = float(np.abs(a_bar).max() + np.abs(b_bar).max()) * a.shape[-1]
    assert abs(float(np.sum(a_bar, dtype=np.float64))) <= 8.0 * U[dtype] * max(scale, 1e-300)
    # C_bar = -(1/eps) P * (G - u 1^T - 1 v^T): its entries' rounding scale.
    cb = np.asarray(C_bar, np.float64)
    terms = float(np.abs(res.P).max()) * (float(np.abs(P_bar).max()) + scale) / eps
    lim = 8.0 * U[dtype] * max(C.shape[-2:]) * terms
    assert np.abs(cb.sum(-1)).max() <= lim and np.abs(cb.sum(-2)).max() <= lim


@SLOW
@given(ot_problems(batch=3), SEEDS)
def test_sinkhorn_batch_equals_loop(problem, seed):
    dtype, C, a, b, eps = problem
    C, a, b = _cast(dtype, C, a, b)
    P_bar = np.asarray(np.random.default_rng(seed).standard_normal(C.shape), dtype)
    res = sk.sinkhorn(C, a, b, eps=eps)
    bars = sk.sinkhorn_vjp(res, P_bar)
    tol = {"float64": 1e-11, "float32": 1e-5}[dtype]           # the registry's batch tolerance
    for i in range(C.shape[0]):
        one = sk.sinkhorn(C[i], a[i], b[i], eps=eps)
        assert rel_err(res.P[i], one.P) <= tol
        for got, want in zip(bars, sk.sinkhorn_vjp(one, P_bar[i])):
            assert rel_err(got[i], want) <= tol


@FAST
@given(ot_problems(balanced=False), st.floats(-1, 1), st.floats(-1, 1), st.booleans(), SEEDS)
def test_sinkhorn_unbalanced_stationarity_and_adjoint(problem, la, lb, hard_rows, seed):
    dtype, C, a, b, eps = problem
    # Negative costs inflate the plan's mass far above sum(b) (1e6 times for
    # C ~ -4.5, eps = 0.032, rho ~ 0.1-0.2); the error is measured relative
    # to the relaxed target's own mass, so its rounding floor is unchanged.
    C, a, b = _cast(dtype, C, a, b)
    # rho / eps in [0.1, 100]: the relaxed iteration contracts by ~tau =
    # rho / (rho + eps) per step, so rho / eps = 1000 needs ~2e4 iterations
    # (over max_iter; reported as non-convergence, which is correct).
    rho_a = None if hard_rows else 10.0 ** (1.5 * la + 0.5) * eps
    rho_b = 10.0 ** (1.5 * lb + 0.5) * eps
    # float32 runs at the default tol, raised to the dtype's floor; the floor
    # includes the rounding of the relaxed target b exp(-g / rho_b) (without
    # it C = [[0.637]], a = b = [0.01], eps = 1, rho_a = rho_b = 0.1 stalled
    # at 8.9e-6 > 4.4e-6 until max_iter).
    tol = 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = sk.sinkhorn(C, a, b, eps=eps, rho_a=rho_a, rho_b=rho_b, tol=tol)
    P = np.asarray(res.P, np.float64)
    assert np.all(P >= 0)
    # Stationarity of the KL-relaxed sides: P 1 = a exp(-f / rho_a), P^T 1 = b exp(-g / rho_b).
    f, g = np.asarray(res.f, np.float64), np.asarray(res.g, np.float64)
    a_eff = a if rho_a is None else a * np.exp(-f / rho_a)
    b_eff = b * np.exp(-g / rho_b)
    row, col = _marginal_error(P, a_eff, b_eff)
    tol = float(np.max(res.tol))
    assert float(np.max(col)) <= 2.0 * tol and float(np.max(row)) <= 2.0 * tol, (row, col, tol)
    dC, da, db, P_bar = _ot_directions(seed, dtype, C, a, b, eps)
    dP = sk.sinkhorn_jvp(res, dC, da, db)
    bars = sk.sinkhorn_vjp(res, P_bar)
    err = adjoint_error([dP], [P_bar], [dC, da, db], bars)
    assert err <= plan_adjoint_tol(res, dtype), (err, res.conditioning.cond)


@INVALID
@given(ot_problems(), st.sampled_from(["C", "a", "b"]), BAD_VALUES, SEEDS)
def test_sinkhorn_rejects_non_finite(problem, name, value, seed):
    dtype, C, a, b, eps = problem
    args = dict(zip("Cab", _cast(dtype, C, a, b)))
    args[name] = poison(np.random.default_rng(seed), args[name], value)
    with pytest.raises(ValueError, match=f"'{name}'"):
        sk.sinkhorn(args["C"], args["a"], args["b"], eps=eps)


@INVALID
@given(ot_problems(), BAD_SCALARS)
def test_sinkhorn_rejects_bad_eps(problem, eps):
    dtype, C, a, b, _ = problem
    with pytest.raises(ValueError, match="'eps'"):
        sk.sinkhorn(*_cast(dtype, C, a, b), eps=eps)


@INVALID
@given(ot_problems(), st.sampled_from(["a", "b"]), st.sampled_from([-1.0, 0.0]), SEEDS)
def test_sinkhorn_rejects_non_positive_marginals(problem, name, sign, seed):
    dtype, C, a, b, eps = problem
    args = dict(zip("Cab", _cast(dtype, C, a, b)))
    x = args[name]
    x.reshape(-1)[np.random.default_rng(seed).integers(x.size)] *= sign
    with pytest.raises(ValueError, match=f"'{name}'"):
        sk.sinkhorn(args["C"], args["a"], args["b"], eps=eps)


@INVALID
@given(ot_problems(), st.sampled_from(["a", "b", "C"]))
def test_sinkhorn_rejects_wrong_shapes(problem, name):
    dtype, C, a, b, eps = problem
    args = dict(zip("Cab", _cast(dtype, C, a, b)))
    if name == "C":
        args["C"] = args["C"].reshape(-1)                       # 1-D cost
    else:                                                       # one entry too many
        args[name] = np.concatenate([args[name], args[name][..., :1]], axis=-1)
    with pytest.raises(ValueError, match=f"'{name}'"):
        sk.sinkhorn(args["C"], args["a"], args["b"], eps=eps)


@INVALID
@given(ot_problems(), st.sampled_from(["C", "a", "b"]), INT_DTYPES)
def test_sinkhorn_rejects_integer_arrays(problem, name, int_dtype):
    dtype, C, a, b, eps = problem
    args = dict(zip("Cab", _cast(dtype, C, a, b)))
    args[name] = np.ones(args[name].shape, dtype=int_dtype)
    with pytest.raises(TypeError, match=f"'{name}'"):
        sk.sinkhorn(args["C"], args["a"], args["b"], eps=eps)


@INVALID
@given(ot_problems(), st.floats(1e-6, 0.5))
def test_sinkhorn_rejects_unequal_masses(problem, excess):
    dtype, C, a, b, eps = problem
    C, a, b = _cast(dtype, C, a, b)
    with pytest.raises(ValueError, match="'b'"):
        sk.sinkhorn(C, a, np.asarray(b * (1.0 + excess), dtype), eps=eps)


@INVALID
@given(ot_problems(), st.sampled_from(["shape", "nan"]))
def test_sinkhorn_derivatives_reject_bad_cotangents(problem, defect):
    dtype, C, a, b, eps = problem
    C, a, b = _cast(dtype, C, a, b)
    res = sk.sinkhorn(C, a, b, eps=eps)
    bad = np.ones(C.shape + (1,), dtype) if defect == "shape" else np.full(C.shape, np.nan, dtype)
    with pytest.raises(ValueError, match="'P_bar'"):
        sk.sinkhorn_vjp(res, bad)
    bad = bad[..., 0] if defect == "shape" else bad
    bad = np.ones((C.shape[-2] + 1, C.shape[-1]), dtype) if defect == "shape" else bad
    with pytest.raises(ValueError, match="'dC'"):
        sk.sinkhorn_jvp(res, dC=bad)


# ==========================================================================
# SOFT top-k
# ==========================================================================

@st.composite
def topk_problems(draw, *, batch: int = 0, min_n: int = 1):
    """Scores, ``k`` in [0, n], ``eps`` and ``largest`` in the documented range.

    Scores are ``scale * N(0, 1) + offset`` or, half of the time, small
    integers times ``scale`` (ties, including across the top-k boundary).
    ``eps`` is drawn relative to the score scale in [1e-3, 10] (tests of the
    Sinkhorn path raise it to ``SINKHORN_PATH_EPS`` times the spread).
    """
    dtype = draw(DTYPES)
    n = draw(st.integers(min_n, 8))
    k = draw(st.integers(0, n))
    scale = 10.0 ** draw(st.floats(-2, 2))
    offset = draw(st.floats(-5, 5)) * scale
    eps = 10.0 ** draw(st.floats(-3, 1)) * scale
    rng = np.random.default_rng(draw(SEEDS))
    shape = ((batch,) if batch else ()) + (n,)
    if draw(st.booleans()):
        x = scale * rng.standard_normal(shape) + offset
    else:
        x = scale * rng.integers(-2, 3, shape) + offset
    return np.asarray(x, dtype), k, eps, draw(st.booleans())


#: The Sinkhorn path is run with eps >= this times the score spread: two
#: anchors 1 apart see cost gaps up to 2 ptp(x), and Sinkhorn's rate degrades
#: like exp(-gap / (2 eps)) (x = [103.39, 57.91], k = 1, eps = 3.73 is not
#: converged after 100000 sweeps; it is reported as such).
SINKHORN_PATH_EPS = 0.2


def _sum_tol(res, dtype, n) -> float:
    """How far ``sum(A)`` may be from ``k``: the closed form's stopping test
    ``|F| <= tol S`` with ``S <= n / 4`` plus rounding; the Sinkhorn path's
    column marginal error (relative L1, total mass 1) times ``n``."""
    if res.plan is None:
        return 64.0 * U[dtype] * (2.0 + math.log2(n)) * n
    return 2.0 * n * float(np.max(res.plan.tol)) + 8.0 * n * U[dtype]


@FAST
@given(topk_problems(), st.sampled_from(topk.METHODS))
def test_soft_topk_sum_bounds_and_monotonicity(problem, method):
    x, k, eps, largest = problem
    dtype, n = x.dtype.name, x.shape[-1]
    if method == "sinkhorn":
        eps = max(eps, SINKHORN_PATH_EPS * float(np.ptp(x)))               # the Sinkhorn path's range
    x0 = x.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = topk.soft_topk(x, k, eps=eps, largest=largest, method=method)
    A = np.asarray(res.A, np.float64)
    tol = _sum_tol(res, dtype, n)
    assert abs(A.sum() - k) <= tol, (A.sum(), k, tol)
    assert np.all(A >= 0.0) and np.all(A <= 1.0 + tol)
    # Monotone: x_i > x_j implies A_i >= A_j (largest) / A_i <= A_j (smallest);
    # equal scores get equal values.  Slack: rounding of the sigmoid (closed
    # form) or of the plan's entries (Sinkhorn).
    slack = 4.0 * U[dtype] if res.plan is None else tol
    sgn = 1.0 if largest else -1.0
    xi, xj = x[:, None].astype(np.float64), x[None, :].astype(np.float64)
    dA = sgn * (A[:, None] - A[None, :])
    assert np.all(dA[xi > xj] >= -slack)
    assert np.all(np.abs(dA[xi == xj]) <= slack)
    np.testing.assert_array_equal(x, x0)


@FAST
@given(topk_problems(min_n=2))
def test_soft_topk_closed_form_agrees_with_sinkhorn_path(problem):
    x, k, eps, largest = problem
    eps = max(eps, SINKHORN_PATH_EPS * float(np.ptp(x)))
    cf = topk.soft_topk(x, k, eps=eps, largest=largest)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        sk_res = topk.soft_topk(x, k, eps=eps, largest=largest, method="sinkhorn")
    n = x.shape[-1]
    tol = _sum_tol(sk_res, x.dtype.name, n) + 64.0 * U[x.dtype.name] * n
    assert float(np.max(np.abs(np.asarray(cf.A, np.float64) - sk_res.A))) <= tol


@FAST
@given(topk_problems(), st.sampled_from(topk.METHODS), SEEDS)
def test_soft_topk_adjoint_identity(problem, method, seed):
    x, k, eps, largest = problem
    if method == "sinkhorn":
        eps = max(eps, SINKHORN_PATH_EPS * float(np.ptp(x)))
    dtype = x.dtype.name
    res = topk.soft_topk(x, k, eps=eps, largest=largest, method=method)
    rng = np.random.default_rng(seed)
    dx, A_bar = (np.asarray(rng.standard_normal(x.shape), dtype) for _ in range(2))
    dA = topk.soft_topk_jvp(res, dx)
    x_bar = topk.soft_topk_vjp(res, A_bar)
    # The Sinkhorn path differentiates in float64 (the plan cast back): the
    # registry's adjoint tolerance holds without a conditioning allowance.
    assert adjoint_error([dA], [A_bar], [dx], [x_bar]) <= ADJ[dtype]
    # Translation invariance: J 1 = 0 (relative to the Jacobian's scale 1 / t).
    ones = topk.soft_topk_jvp(res, np.ones_like(x))
    assert float(np.max(np.abs(ones))) <= 64.0 * U[dtype] * x.shape[-1] / res.t


@st.composite
def sorted_topk_problems(draw):
    """Scores and parameters of the sorted variant: its anchors are spaced by 1,
    which sets the scale of the costs, so ``eps`` is drawn in [0.3, 2] (and
    raised to ``SINKHORN_PATH_EPS`` times the spread) and the score spread in
    [0.3, 3] (offsets up to 20 are absorbed by the centring)."""
    dtype = draw(DTYPES)
    n = draw(st.integers(2, 7))
    k = draw(st.integers(1, min(n, 4)))
    rng = np.random.default_rng(draw(SEEDS))
    x = 10.0 ** draw(st.floats(-0.5, 0.5)) * rng.standard_normal(n) + draw(st.floats(-20, 20))
    eps = max(draw(st.floats(0.3, 2.0)), SINKHORN_PATH_EPS * float(np.ptp(x)))
    return np.asarray(x, dtype), k, eps, draw(st.booleans())


@SLOW
@given(sorted_topk_problems(), SEEDS)
def test_soft_sorted_topk_structure_and_adjoint(problem, seed):
    x, k, eps, largest = problem
    dtype, n = x.dtype.name, x.shape[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = topk.soft_sorted_topk(x, k, eps=eps, largest=largest)
    A = np.asarray(res.A, np.float64)
    assert A.shape == (n, k)
    tol = _sum_tol(res, dtype, n)
    # Column r is a soft one-hot of the (r+1)-th ranked score: columns sum to
    # 1, rows to at most 1, all entries in [0, 1].
    assert np.all(A >= 0.0)
    assert np.max(np.abs(A.sum(0) - 1.0)) <= tol
    assert np.all(A.sum(1) <= 1.0 + tol)
    assert abs(float(np.asarray(res.indicator, np.float64).sum()) - k) <= tol
    rng = np.random.default_rng(seed)
    dx = np.asarray(rng.standard_normal(x.shape), dtype)
    A_bar = np.asarray(rng.standard_normal(A.shape), dtype)
    dA = topk.soft_sorted_topk_jvp(res, dx)
    x_bar = topk.soft_sorted_topk_vjp(res, A_bar)
    # Differentiated in float64 as soft_topk's Sinkhorn path: the registry's
    # adjoint tolerance (float32, x = [9.627369, 8.035555, 11.15187,
    # 11.149981, 11.410876], k = 1, eps = 0.3, largest=False gave 2.7e-5 with
    # a float32 backward solve).
    assert adjoint_error([dA], [A_bar], [dx], [x_bar]) <= ADJ[dtype]


@SLOW
@given(topk_problems(batch=3))
def test_soft_topk_batch_equals_loop(problem):
    x, k, eps, largest = problem
    res = topk.soft_topk(x, k, eps=eps, largest=largest)
    tol = {"float64": 1e-11, "float32": 1e-5}[x.dtype.name]
    for i in range(x.shape[0]):
        one = topk.soft_topk(x[i], k, eps=eps, largest=largest)
        assert rel_err(res.A[i], one.A) <= tol


@INVALID
@given(topk_problems(), BAD_VALUES, SEEDS)
def test_soft_topk_rejects_non_finite_scores(problem, value, seed):
    x, k, eps, largest = problem
    with pytest.raises(ValueError, match="'x'"):
        topk.soft_topk(poison(np.random.default_rng(seed), x, value), k, eps=eps)


@INVALID
@given(topk_problems(), st.sampled_from(["negative", "above_n", "float", "bool"]))
def test_soft_topk_rejects_bad_k(problem, kind):
    x, k, eps, largest = problem
    n = x.shape[-1]
    bad = {"negative": -1 - k, "above_n": n + 1 + k, "float": float(k), "bool": True}[kind]
    # a value out of range is a ValueError, a non-integer a TypeError (backend.check_int)
    error = ValueError if kind in ("negative", "above_n") else TypeError
    for fn in (topk.soft_topk, topk.soft_sorted_topk):
        with pytest.raises(error, match="'k'"):
            fn(x, bad, eps=eps)


@INVALID
@given(topk_problems(), BAD_SCALARS)
def test_soft_topk_rejects_bad_eps(problem, eps):
    x, k, _, largest = problem
    for fn in (topk.soft_topk, topk.soft_sorted_topk):
        with pytest.raises(ValueError, match="'eps'"):
            fn(x, k, eps=eps)


@INVALID
@given(topk_problems(), INT_DTYPES)
def test_soft_topk_rejects_integer_scores(problem, int_dtype):
    x, k, eps, largest = problem
    with pytest.raises(TypeError, match="'x'"):
        topk.soft_topk(np.round(x).astype(int_dtype), k, eps=eps)


@INVALID
@given(topk_problems(), st.sampled_from(["shape", "nan"]))
def test_soft_topk_derivatives_reject_bad_cotangents(problem, defect):
    x, k, eps, largest = problem
    res = topk.soft_topk(x, k, eps=eps, largest=largest)
    bad = np.ones(x.shape + (1,), x.dtype) if defect == "shape" else np.full(x.shape, np.nan, x.dtype)
    with pytest.raises(ValueError, match="'A_bar'"):
        topk.soft_topk_vjp(res, bad)
    with pytest.raises(ValueError, match="'dx'"):
        topk.soft_topk_jvp(res, bad)


# ==========================================================================
# Combinatorial solvers and identity with projection
# ==========================================================================

@st.composite
def cost_vectors(draw, *, max_n: int = 6, batch: int = 0):
    """Finite costs ``w`` (..., n): Gaussian, or small integers (ties), at a
    drawn scale and offset, float64 or float32."""
    dtype = draw(DTYPES)
    n = draw(st.integers(1, max_n))
    scale = 10.0 ** draw(st.floats(-3, 3))
    rng = np.random.default_rng(draw(SEEDS))
    shape = ((batch,) if batch else ()) + (n,)
    base = rng.standard_normal(shape) if draw(st.booleans()) else rng.integers(-2, 3, shape) * 1.0
    return np.asarray(scale * base + draw(st.floats(-3, 3)) * scale, dtype)


def _objective(w, y) -> float:
    return float(np.sum(np.asarray(w, np.float64) * np.asarray(y, np.float64)))


def _close(value, best, w) -> bool:
    """Equal up to the summation order of float64 sums of the same costs."""
    return abs(value - best) <= 8.0 * 2.0 ** -53 * float(np.sum(np.abs(w), dtype=np.float64)) * w.size


@FAST
@given(cost_vectors())
def test_argmin_onehot_feasible_optimal_first_tie(w):
    y = np.asarray(comb.argmin_onehot(w))
    assert y.dtype == w.dtype and set(np.unique(y)) <= {0.0, 1.0} and y.sum() == 1.0
    # Brute force over Y = {e_i}; ties go to the lowest index.
    assert int(np.flatnonzero(y)[0]) == min(range(w.size), key=lambda i: (w[i], i))


@FAST
@given(cost_vectors(), st.data())
def test_top_k_feasible_optimal_stable_ties(w, data):
    n = w.shape[-1]
    k = data.draw(st.integers(1, n))
    y = np.asarray(comb.top_k(w, k))
    assert set(np.unique(y)) <= {0.0, 1.0} and y.sum() == k
    best = min(_objective(w, np.isin(np.arange(n), c)) for c in itertools.combinations(range(n), k))
    assert _close(_objective(w, y), best, w)
    # Ties: among equal costs the lower index is taken first.
    chosen = sorted(range(n), key=lambda i: (float(w[i]), i))[:k]
    assert sorted(np.flatnonzero(y).tolist()) == sorted(chosen)


@FAST
@given(cost_vectors())
def test_ranking_is_optimal_permutation(w):
    n = w.shape[-1]
    y = np.asarray(comb.ranking(w))
    assert sorted(y.tolist()) == list(range(1, n + 1))
    best = min(_objective(w, np.array(p)) for p in itertools.permutations(range(1, n + 1)))
    assert _close(_objective(w, y), best, w)
    # Ties: the lower index gets the lower rank.
    order = sorted(range(n), key=lambda i: (-float(w[i]), i))
    assert [int(y[i]) for i in order] == list(range(1, n + 1))


@FAST
@given(cost_vectors(max_n=8))
def test_hard_threshold_is_optimal_max_form(x):
    y = np.asarray(comb.hard_threshold(x))
    best = max(_objective(x, np.array(c)) for c in itertools.product((0.0, 1.0), repeat=x.size))
    assert _close(_objective(x, y), best, x)
    np.testing.assert_array_equal(y, (x > 0).astype(x.dtype))     # ties (x = 0) give 0


@FAST
@given(DTYPES, st.integers(1, 5), st.integers(1, 5), st.floats(-3, 3), st.booleans(), SEEDS)
def test_assignment_is_optimal_partial_permutation(dtype, n, m, lscale, ties, seed):
    rng = np.random.default_rng(seed)
    W = rng.integers(0, 3, (n, m)) * 1.0 if ties else rng.standard_normal((n, m))
    W = np.asarray(10.0 ** lscale * W, dtype)
    y = np.asarray(comb.assignment(W))
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert y.sum() == min(n, m) and y.sum(0).max() <= 1 and y.sum(1).max() <= 1
    if n <= m:
        cands = (np.eye(m)[list(p)] for p in itertools.permutations(range(m), n))
    else:
        cands = (np.eye(n)[list(p)].T for p in itertools.permutations(range(n), m))
    best = min(_objective(W, c) for c in cands)
    assert _close(_objective(W, y), best, W)


def _grid_distance(W, neighbourhood: int) -> float:
    """Cheapest top-left -> bottom-right vertex-cost path by Bellman-Ford
    relaxation on the grid graph (an independent route to the optimum)."""
    H, Wd = W.shape
    steps = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]
    if neighbourhood == 4:
        steps = [s for s in steps if 0 in s]
    dist = np.full((H, Wd), np.inf)
    dist[0, 0] = W[0, 0]
    for _ in range(H * Wd):
        for i, j in itertools.product(range(H), range(Wd)):
            for di, dj in steps:
                a, b = i + di, j + dj
                if 0 <= a < H and 0 <= b < Wd:
                    dist[a, b] = min(dist[a, b], dist[i, j] + W[a, b])
    return float(dist[-1, -1])


def _connected(y, neighbourhood: int) -> bool:
    """The marked vertices connect the two corners (flood fill from (0, 0))."""
    H, Wd = y.shape
    seen, todo = {(0, 0)}, [(0, 0)]
    while todo:
        i, j = todo.pop()
        for di, dj in itertools.product((-1, 0, 1), repeat=2):
            if (neighbourhood == 4 and di and dj) or (0 <= i + di < H and 0 <= j + dj < Wd) is False:
                continue
            v = (i + di, j + dj)
            if v not in seen and y[v] == 1.0:
                seen.add(v)
                todo.append(v)
    return y[0, 0] == 1.0 and (H - 1, Wd - 1) in seen


@FAST
@given(DTYPES, st.integers(1, 4), st.integers(1, 4), st.sampled_from([4, 8]), st.booleans(), SEEDS)
def test_shortest_path_is_a_cheapest_path(dtype, H, Wd, nb, ties, seed):
    rng = np.random.default_rng(seed)
    W = np.asarray(rng.integers(0, 3, (H, Wd)) * 1.0 if ties else rng.random((H, Wd)) * 10, dtype)
    y = np.asarray(comb.shortest_path(W, neighbourhood=nb))
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert _connected(y, nb)
    assert _close(_objective(W, y), _grid_distance(np.asarray(W, np.float64), nb), W)


@SLOW
@given(cost_vectors(batch=3), st.data())
def test_vector_solvers_batch_equals_loop(w, data):
    k = data.draw(st.integers(1, w.shape[-1]))
    for solve in (comb.argmin_onehot, comb.ranking, comb.hard_threshold,
                  lambda v: comb.top_k(v, k)):
        y = np.asarray(solve(w))
        for i in range(w.shape[0]):
            np.testing.assert_array_equal(y[i], solve(w[i]))


def _projection_formula(w, g, projection, core_ndim):
    """``P'(w)^T g`` written out from the definitions (float64, host):
    mean ``g - mean(g)``; norm ``(g - u <u, g>) / ||w||``, ``u = w / ||w||``;
    std ``(g - mean(g) - u <u, g>) / ||v||``, ``v = w - mean(w)``, ``u = v / ||v||``."""
    axes = tuple(range(-core_ndim, 0))
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    if projection == "none":
        return g
    gm = g - g.mean(axis=axes, keepdims=True)
    if projection == "mean":
        return gm
    v = w if projection == "norm" else w - w.mean(axis=axes, keepdims=True)
    r = np.sqrt(np.sum(v * v, axis=axes, keepdims=True))
    u = v / r
    base = g if projection == "norm" else gm
    return (base - u * np.sum(u * g, axis=axes, keepdims=True)) / r


def _projection_radius(w, projection, core_ndim) -> float:
    """The smallest ``r`` over the batch (``||w||`` or ``||w - mean(w)||``; 1 for none/mean)."""
    if projection in ("none", "mean"):
        return 1.0
    axes = tuple(range(-core_ndim, 0))
    v = np.asarray(w, np.float64)
    if projection == "std":
        v = v - v.mean(axis=axes, keepdims=True)
    return float(np.min(np.sqrt(np.sum(v * v, axis=axes))))


def _projection_kappa(w, projection, core_ndim) -> float:
    """``1 + ||w|| / ||w - mean(w) 1||`` for std (the cancellation in
    ``v = w - mean(w) 1`` costs ``log10`` of it in digits; the library warns
    past ``1 / sqrt(eps)``), 1 otherwise."""
    if projection != "std":
        return 1.0
    axes = tuple(range(-core_ndim, 0))
    w64 = np.asarray(w, np.float64)
    v = w64 - w64.mean(axis=axes, keepdims=True)
    return 1.0 + float(np.max(np.sqrt(np.sum(w64 * w64, axis=axes)) / np.sqrt(np.sum(v * v, axis=axes))))


@st.composite
def projection_problems(draw):
    """``(w, g, projection, core_ndim)`` with ``w`` away from the projection's
    singular set (``||w|| > 0`` for norm, non-constant ``w`` for std)."""
    dtype = draw(DTYPES)
    core_ndim = draw(st.integers(1, 2))
    core = tuple(draw(st.integers(2, 4)) for _ in range(core_ndim))
    batch = (draw(st.integers(1, 3)),) if draw(st.booleans()) else ()
    scale = 10.0 ** draw(st.floats(-3, 3))
    rng = np.random.default_rng(draw(SEEDS))
    w = scale * (rng.standard_normal(batch + core) + draw(st.floats(-1, 1)))
    g = rng.standard_normal(batch + core)
    return (np.asarray(w, dtype), np.asarray(g, dtype),
            draw(st.sampled_from(comb.PROJECTIONS)), core_ndim)


@FAST
@given(projection_problems(), st.sampled_from(["min", "max"]))
def test_identity_vjp_equals_defining_formula(problem, sense):
    w, g, projection, core_ndim = problem
    dtype = w.dtype.name
    got = comb.identity_vjp(w, g, projection=projection, sense=sense, core_ndim=core_ndim)
    s = -1.0 if sense == "min" else 1.0
    want = s * _projection_formula(w, g, projection, core_ndim)
    # Absolute scale max|g| / r: the result may vanish by cancellation (std
    # with two entries has a zero Jacobian).
    scale = (float(np.max(np.abs(g))) / _projection_radius(w, projection, core_ndim)
             * _projection_kappa(w, projection, core_ndim))
    assert float(np.max(np.abs(np.asarray(got, np.float64) - want))) <= 64.0 * U[dtype] * scale
    # The surrogate is orthogonal to 1 (mean, std) and to w (norm, std).
    axes = tuple(range(-core_ndim, 0))
    got64 = np.asarray(got, np.float64)
    size = math.prod(w.shape[-core_ndim:])
    lim = 64.0 * U[dtype] * size * scale
    if projection in ("mean", "std"):
        assert np.max(np.abs(got64.sum(axis=axes))) <= lim
    if projection in ("norm", "std"):
        w_unit = np.asarray(w, np.float64) / np.max(np.abs(w), axis=axes, keepdims=True)
        assert np.max(np.abs(np.sum(got64 * w_unit, axis=axes))) <= lim


@FAST
@given(projection_problems(), st.floats(0.01, 100.0), st.floats(-10, 10))
def test_identity_vjp_invariances(problem, c, shift):
    """r(c w) = r(w) / c for norm/std; r(w + t 1) = r(w) for mean/std."""
    w, g, projection, core_ndim = problem
    dtype = w.dtype.name
    base = np.asarray(comb.identity_vjp(w, g, projection=projection, core_ndim=core_ndim), np.float64)
    scaled = comb.identity_vjp(np.asarray(c * w, dtype), g, projection=projection, core_ndim=core_ndim)
    factor = 1.0 / c if projection in ("norm", "std") else 1.0
    # Absolute scale max|g| / r (the result may vanish by cancellation).
    scale = (float(np.max(np.abs(g))) / _projection_radius(w, projection, core_ndim)
             * _projection_kappa(w, projection, core_ndim))
    diff = np.abs(np.asarray(scaled, np.float64) - factor * base)
    assert float(np.max(diff)) <= 256.0 * U[dtype] * factor * scale
    if projection in ("mean", "std", "none"):
        spread = float(np.std(np.asarray(w, np.float64)))
        t = shift * spread
        shifted = comb.identity_vjp(np.asarray(w + t, dtype), g, projection=projection,
                                    core_ndim=core_ndim)
        # Shifting w moves it by |t|: the rounding of w + t is relative to that.
        rel = (1.0 + abs(t) / spread) * 256.0 * U[dtype] * scale
        assert float(np.max(np.abs(np.asarray(shifted, np.float64) - base))) <= rel


@FAST
@given(projection_problems(), SEEDS)
def test_projection_adjoint_identity(problem, seed):
    w, g, projection, core_ndim = problem
    res = comb.project(w, projection=projection, core_ndim=core_ndim)
    dw = np.asarray(np.random.default_rng(seed).standard_normal(w.shape), w.dtype)
    du = comb.project_jvp(res, dw)
    w_bar = comb.project_vjp(res, g)
    lhs = float(np.sum(np.asarray(du, np.float64) * g))
    rhs = float(np.sum(np.asarray(w_bar, np.float64) * dw))
    # Relative to ||dw|| ||g|| ||P'(w)|| (||P'|| = 1 / r): the pairing may
    # vanish by cancellation.
    scale = (float(np.linalg.norm(np.asarray(dw, np.float64))) * float(np.linalg.norm(np.asarray(g, np.float64)))
             / _projection_radius(w, projection, core_ndim) * _projection_kappa(w, projection, core_ndim))
    assert abs(lhs - rhs) <= 64.0 * U[w.dtype.name] * scale


@INVALID
@given(cost_vectors(), BAD_VALUES, SEEDS,
       st.sampled_from(["argmin_onehot", "top_k", "ranking", "hard_threshold"]))
def test_solvers_reject_non_finite_costs(w, value, seed, name):
    solver = getattr(comb, name)
    args = (1,) if name == "top_k" else ()
    arg = "x" if name == "hard_threshold" else "w"
    with pytest.raises(ValueError, match=f"'{arg}'"):
        solver(poison(np.random.default_rng(seed), w, value), *args)


@INVALID
@given(cost_vectors(), INT_DTYPES, st.sampled_from(["argmin_onehot", "ranking", "assignment",
                                                    "shortest_path"]))
def test_solvers_reject_integer_costs(w, int_dtype, name):
    W = np.round(w).astype(int_dtype)
    if name in ("assignment", "shortest_path"):
        W = np.abs(np.stack([W, W]))
    with pytest.raises(TypeError, match="'W'" if name in ("assignment", "shortest_path") else "'w'"):
        getattr(comb, name)(W)


@INVALID
@given(cost_vectors(), st.sampled_from(["zero", "above_n", "negative"]))
def test_top_k_rejects_k_out_of_range(w, kind):
    n = w.shape[-1]
    with pytest.raises(ValueError, match="'k'"):
        comb.top_k(w, {"zero": 0, "above_n": n + 1, "negative": -n}[kind])


@INVALID
@given(cost_vectors(), st.sampled_from([1.0, "2", None]))
def test_top_k_rejects_non_integer_k(w, k):
    with pytest.raises(TypeError, match="'k'"):
        comb.top_k(w, k)


@INVALID
@given(st.integers(1, 4), st.integers(2, 4), st.floats(1e-3, 10.0), SEEDS)
def test_shortest_path_rejects_negative_costs(H, Wd, depth, seed):
    rng = np.random.default_rng(seed)
    W = poison(rng, rng.random((H, Wd)), -depth)
    with pytest.raises(ValueError, match="'W'"):
        comb.shortest_path(W)


@INVALID
@given(projection_problems(), st.sampled_from(["shape", "nan"]))
def test_identity_vjp_rejects_bad_cotangent(problem, defect):
    w, g, projection, core_ndim = problem
    bad = np.ones(w.shape + (1,), w.dtype) if defect == "shape" else np.full(w.shape, np.nan, w.dtype)
    with pytest.raises(ValueError, match="'y_bar'"):
        comb.identity_vjp(w, bad, projection=projection, core_ndim=core_ndim)


@INVALID
@given(projection_problems(), st.sampled_from(["norm", "std"]))
def test_projection_rejects_degenerate_costs(problem, projection):
    """norm at w = 0 and std at a constant w are undefined: ValueError naming 'w'."""
    w, g, _, core_ndim = problem
    # Any constant, also one whose mean rounds away from it (np.full(3, 0.1):
    # ||w - mean(w) 1|| = 2.4e-17, below the round-off of a constant core).
    const = float(w.flat[0])
    degenerate = np.zeros_like(w) if projection == "norm" else np.full_like(w, const)
    with pytest.raises(ValueError, match="'w'"):
        comb.identity_vjp(degenerate, g, projection=projection, core_ndim=core_ndim)


@INVALID
@given(st.sampled_from(["mean", "std"]))
def test_shortest_path_refuses_mean_projections(projection):
    with pytest.raises(ValueError, match="'projection'"):
        comb.check_projection(comb.shortest_path, projection)


# ==========================================================================
# Matrix square root, inverse square root, Lyapunov
# ==========================================================================

@st.composite
def spd_problems(draw, *, max_log_cond: float = 4.0, batch: int = 0):
    """SPD ``A = Q diag(lam) Q^T`` with a Haar-like orthogonal ``Q``,
    eigenvalues log-uniform in ``scale * [1, cond]`` (``cond`` up to
    ``10^max_log_cond``; both extremes always present for n >= 2) and
    ``scale`` in [1e-3, 1e3].  Returns ``(dtype, A, lam, Q)`` in float64 on
    the host (``A`` symmetric to the last bit)."""
    dtype = draw(DTYPES)
    n = draw(st.integers(1, 6))
    cond = 10.0 ** draw(st.floats(0, max_log_cond))
    scale = 10.0 ** draw(st.floats(-3, 3))
    rng = np.random.default_rng(draw(SEEDS))
    bshape = (batch,) if batch else ()
    Q, R = np.linalg.qr(rng.standard_normal(bshape + (n, n)))
    Q = Q * np.sign(np.diagonal(R, axis1=-2, axis2=-1))[..., None, :]
    t = rng.random(bshape + (n,))
    if n >= 2:
        t[..., 0], t[..., 1] = 0.0, 1.0
    lam = scale * cond ** t
    A = (Q * lam[..., None, :]) @ np.swapaxes(Q, -1, -2)
    A = 0.5 * (A + np.swapaxes(A, -1, -2))
    return dtype, A, lam, Q


def _true_root(lam, Q, power):
    """``Q diag(lam^power) Q^T`` from the construction (float64)."""
    return (Q * (lam ** power)[..., None, :]) @ np.swapaxes(Q, -1, -2)


def _mpa_bound(lam, A, inverse: bool, order: int = 5) -> float:
    """The documented MPA error bound: with ``x = lam / ||A||_F``,
    ``rho = (1 - sqrt x) / (1 + sqrt x)``, ``N = 2 order + 1``, the relative
    error on an eigenvalue is ``2 rho^N / (1 - rho^N)`` (inverse:
    ``2 rho^N / (1 + rho^N)``); its maximum bounds the spectral-norm error."""
    x = lam / np.linalg.norm(A, axis=(-2, -1))[..., None]
    rho = (1.0 - np.sqrt(x)) / (1.0 + np.sqrt(x))
    rN = rho ** (2 * order + 1)
    return float(np.max(2.0 * rN / ((1.0 + rN) if inverse else (1.0 - rN))))


#: Rounding level of the MPA [5/5] forward (module docs: measured 4e-14 / 3e-5
#: relative, the inverse ~10x more), with a safety factor of 25.
MPA_ROUNDING = {"float64": 1e-12, "float32": 1e-3}


def _spectral(X) -> float:
    return float(np.max(np.linalg.norm(np.asarray(X, np.float64), ord=2, axis=(-2, -1))))


@FAST
@given(spd_problems(), st.sampled_from(["eig", "mpa"]))
def test_sqrtm_squares_to_A(problem, method):
    dtype, A64, lam, Q = problem
    A = np.asarray(A64, dtype)
    A0 = A.copy()
    res = matsqrt.sqrtm(A, method=method)
    S = np.asarray(res.S)
    assert S.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(S, np.swapaxes(S, -1, -2))   # symmetrised output
    S_true = _true_root(lam, Q, 0.5)
    n = A.shape[-1]
    if method == "eig":
        # Backward stable: ||S S - A|| ~ u ||A||, whatever the conditioning.
        SS = np.asarray(S, np.float64) @ np.asarray(S, np.float64)
        assert rel_err(SS, A.astype(np.float64)) <= 64.0 * n * U[dtype]
    else:
        bound = _mpa_bound(lam, A64, inverse=False) + MPA_ROUNDING[dtype]
        assert _spectral(S - S_true) <= bound * _spectral(S_true), (bound,)
    np.testing.assert_array_equal(A, A0)


@FAST
@given(spd_problems(), st.sampled_from(["eig", "mpa"]))
def test_inv_sqrtm_inverts_the_root(problem, method):
    dtype, A64, lam, Q = problem
    A = np.asarray(A64, dtype)
    T = np.asarray(matsqrt.inv_sqrtm(A, method=method).S_inv, np.float64)
    np.testing.assert_array_equal(T, np.swapaxes(T, -1, -2))
    T_true = _true_root(lam, Q, -0.5)
    n, cond = A.shape[-1], float(lam.max() / lam.min())
    if method == "eig":
        # S_inv S = I with S the true root; T A T = I; errors grow like u cond.
        S_true = _true_root(lam, Q, 0.5)
        eye = np.eye(n)
        assert np.max(np.abs(T @ S_true - eye)) <= 64.0 * n * U[dtype] * cond
        assert np.max(np.abs(T @ A.astype(np.float64) @ T - eye)) <= 64.0 * n * U[dtype] * cond
    else:
        bound = _mpa_bound(lam, A64, inverse=True) + MPA_ROUNDING[dtype] * cond
        assert _spectral(T - T_true) <= bound * _spectral(T_true), (bound,)


@FAST
@given(spd_problems(max_log_cond=3.0), st.sampled_from(matsqrt.SQRT_METHODS),
       st.sampled_from(matsqrt.VJP_METHODS), st.booleans(), SEEDS)
def test_sqrtm_derivatives_adjoint_identity(problem, forward, method, inverse, seed):
    dtype, A64, lam, Q = problem
    A = np.asarray(A64, dtype)
    rng = np.random.default_rng(seed)
    # Non-symmetric tangent and cotangent: both maps act through sym().
    dA, G = (np.asarray(rng.standard_normal(A.shape), dtype) for _ in range(2))
    if inverse:
        res = matsqrt.inv_sqrtm(A, method=forward)
        dS = matsqrt.inv_sqrtm_jvp(res, dA, method=method)
        A_bar = matsqrt.inv_sqrtm_vjp(res, G, method=method)
    else:
        res = matsqrt.sqrtm(A, method=forward)
        dS = matsqrt.sqrtm_jvp(res, dA, method=method)
        A_bar = matsqrt.sqrtm_vjp(res, G, method=method)
    np.testing.assert_array_equal(A_bar, np.swapaxes(A_bar, -1, -2))
    cond = float(lam.max() / lam.min())
    tol = max(ADJ[dtype], 64.0 * U[dtype] * cond)
    assert adjoint_error([dS], [G], [dA], [A_bar]) <= tol


@FAST
@given(spd_problems(max_log_cond=3.0), SEEDS)
def test_sqrtm_exact_jvp_solves_the_sylvester_equation(problem, seed):
    """dS from the exact JVP satisfies S dS + dS S = sym(dA) (S the true root)."""
    dtype, A64, lam, Q = problem
    dA = np.random.default_rng(seed).standard_normal(A64.shape)
    res = matsqrt.sqrtm(np.asarray(A64, dtype), method="eig")
    dS = np.asarray(matsqrt.sqrtm_jvp(res, np.asarray(dA, dtype)), np.float64)
    S = _true_root(lam, Q, 0.5)
    sym = 0.5 * (dA + dA.T)
    cond = float(lam.max() / lam.min())
    assert rel_err(S @ dS + dS @ S, sym) <= 64.0 * A64.shape[-1] * U[dtype] * cond


@st.composite
def lyapunov_problems(draw):
    """``(dtype, B, C, method)``: for the sign method ``B = SPD + skew`` (its
    spectrum lies in the open right half-plane) with ``||skew||_2 <= lam_min /
    2``, so every eigenvalue has ``|Im b| <= Re b / 2``; symmetric ``B`` for
    the eig method.  ``||skew||_2`` reaches ``4 lam_min``: eigenvalues up to
    four times as far from the real axis as from the imaginary one, where
    Newton-Schulz diverges and the scaled Newton iteration takes over
    (``B = [[1, 1.5], [-1.5, 1]]`` overflowed to NaN before it did)."""
    dtype, B, lam, _ = draw(spd_problems(max_log_cond=3.0))
    method = draw(st.sampled_from(["sign", "eig"]))
    rng = np.random.default_rng(draw(SEEDS))
    n = B.shape[-1]
    if method == "sign" and n >= 2:
        K = rng.standard_normal((n, n))
        K = K - K.T
        B = B + draw(st.floats(0, 4.0)) * float(lam.min()) * K / np.linalg.norm(K, 2)
    C = rng.standard_normal((n, n)) * 10.0 ** draw(st.floats(-3, 3))
    return dtype, np.asarray(B, dtype), np.asarray(C, dtype), method


@FAST
@given(lyapunov_problems())
def test_lyapunov_solves_the_equation(problem):
    dtype, B, C, method = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        X = np.asarray(matsqrt.lyapunov(B, C, method=method).X, np.float64)
    B64, C64 = B.astype(np.float64), C.astype(np.float64)
    resid = np.linalg.norm(B64 @ X + X @ B64.T - C64)
    scale = 2.0 * np.linalg.norm(B64) * np.linalg.norm(X) + np.linalg.norm(C64)
    # The sign iteration stops at ||B_k^2 - I|| <= sqrt(eps) and returns one
    # step on (error ~ eps): a few hundred u in all.
    assert resid <= 512.0 * B.shape[-1] * U[dtype] * scale


@SLOW
@given(spd_problems(batch=3, max_log_cond=2.0), st.sampled_from(["eig", "mpa"]))
def test_sqrtm_batch_equals_loop(problem, method):
    dtype, A64, lam, Q = problem
    A = np.asarray(A64, dtype)
    S = np.asarray(matsqrt.sqrtm(A, method=method).S)
    tol = {"float64": 1e-12, "float32": 1e-5}[dtype]           # the registry's batch tolerance
    for i in range(A.shape[0]):
        assert rel_err(S[i], matsqrt.sqrtm(A[i], method=method).S) <= tol


@INVALID
@given(spd_problems(), st.floats(-3, 0), SEEDS, st.booleans())
def test_sqrtm_rejects_indefinite_matrices(problem, lneg, seed, inverse):
    """A negative eigenvalue of relative size >= 1e-3 (far above psd_tol)."""
    dtype, A64, lam, Q = problem
    lam = lam.copy()
    lam[np.random.default_rng(seed).integers(lam.size)] = -(10.0 ** lneg) * float(lam.max())
    A = np.asarray(_true_root(lam, Q, 1.0), dtype)
    A = 0.5 * (A + A.T)
    fn = matsqrt.inv_sqrtm if inverse else matsqrt.sqrtm
    with pytest.raises(ValueError, match="'A'.*positive"):
        fn(A)


@INVALID
@given(spd_problems(), SEEDS)
def test_inv_sqrtm_rejects_singular_psd(problem, seed):
    """A zero row and column: exactly singular (a rotated zero eigenvalue would
    round to a tiny non-zero one, i.e. a definite matrix in floating point)."""
    dtype, A64, lam, Q = problem
    A = np.asarray(A64, dtype)
    i = np.random.default_rng(seed).integers(A.shape[-1])
    A[i, :] = 0.0
    A[:, i] = 0.0
    with pytest.raises(ValueError, match="'A'"):
        matsqrt.inv_sqrtm(A)


@INVALID
@given(spd_problems(), st.sampled_from(["nan", "asymmetric", "non_square", "integer"]), SEEDS)
def test_sqrtm_rejects_malformed_input(problem, defect, seed):
    dtype, A64, lam, Q = problem
    rng = np.random.default_rng(seed)
    A = np.asarray(A64, dtype)
    error = ValueError
    if defect == "nan":
        A = poison(rng, A, math.nan)
    elif defect == "asymmetric":
        n = A.shape[-1]
        if n == 1:
            A = np.concatenate([A, A], axis=-1)                    # not square either
        else:
            E = np.zeros((n, n))
            E[0, n - 1] = 0.1 * np.linalg.norm(A64)                # far above sym_tol
            A = np.asarray(A64 + E, dtype)
    elif defect == "non_square":
        A = np.concatenate([A, A[..., :1]], axis=-1)
    else:
        A, error = np.round(A).astype(np.int64), TypeError
    for fn in (matsqrt.sqrtm, matsqrt.inv_sqrtm):
        with pytest.raises(error, match="'A'"):
            fn(A)


@INVALID
@given(lyapunov_problems(), st.sampled_from(["shape", "nan"]))
def test_lyapunov_rejects_bad_right_hand_side(problem, defect):
    dtype, B, C, method = problem
    bad = np.concatenate([C, C[..., :1]], axis=-1) if defect == "shape" else poison(
        np.random.default_rng(0), C, math.nan)
    with pytest.raises(ValueError, match="'C'"):
        matsqrt.lyapunov(B, bad, method=method)


# ==========================================================================
# DEQ: the tanh fixed-point layer
# ==========================================================================

@st.composite
def deq_problems(draw, *, batch: int = 0):
    """``(x, W, U, b)`` with ``||W||_2 = L`` drawn in [0, 0.9] (a contraction:
    unique fixed point, Picard converges at rate L), ``U``, ``b``, ``x`` at
    drawn scales, float64 or float32."""
    dtype = draw(DTYPES)
    # d = 1 in float32 included: Anderson's least-squares shift scales with
    # the round-off of its rank-1 Gram matrix (a 1e-10 shift left it singular,
    # LinAlgError for x = [[0.6315567], [-1.4793808], [-1.3048428]],
    # W = [[-0.8208158]], U = [[-1.3432862]], b = [-0.18154433]).
    d = draw(st.integers(1, 6))
    p = draw(st.integers(1, 4))
    L = draw(st.floats(0.0, 0.9))
    rng = np.random.default_rng(draw(SEEDS))
    W = rng.standard_normal((d, d))
    W = W * (L / np.linalg.norm(W, 2))
    U_ = rng.standard_normal((d, p)) * 10.0 ** draw(st.floats(-1, 1))
    b = rng.standard_normal(d) * 10.0 ** draw(st.floats(-1, 1))
    x = rng.standard_normal(((batch,) if batch else ()) + (p,)) * 10.0 ** draw(st.floats(-1, 1))
    return tuple(np.asarray(v, dtype) for v in (x, W, U_, b)) + (L,)


def _layer(z, x, W, U_, b):
    """``tanh(W z + U x + b)`` in float64, row by row."""
    z, x, W, U_, b = (np.asarray(v, np.float64) for v in (z, x, W, U_, b))
    return np.tanh(z @ W.T + x @ U_.T + b)


@FAST
@given(deq_problems(batch=0) | deq_problems(batch=3), st.sampled_from(deq.SOLVERS))
def test_tanh_deq_fixed_point_residual(problem, method):
    x, W, U_, b, L = problem
    dtype = x.dtype.name
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = deq.tanh_deq(x, W, U_, b, method=method)
    z = np.asarray(res.z, np.float64)
    resid = np.linalg.norm(z - _layer(z, x, W, U_, b), axis=-1)
    # The stopping test ||f(z) - z|| <= tol ||f(z)||, plus the rounding of
    # evaluating f in the working dtype (|tanh| <= 1, so ||f(z)|| <= sqrt(d)).
    d = z.shape[-1]
    bound = deq.DEFAULT_TOL[dtype] * math.sqrt(d) + 16.0 * d * U[dtype] * (1.0 + math.sqrt(d))
    assert np.all(resid <= bound), (resid, bound)
    # Uniqueness (contraction with constant L): the other solver finds the same
    # point, ||z1 - z2|| <= (r1 + r2) / (1 - L).
    other = "picard" if method == "anderson" else "anderson"
    z2 = np.asarray(deq.tanh_deq(x, W, U_, b, method=other).z, np.float64)
    assert np.all(np.linalg.norm(z - z2, axis=-1) <= 2.0 * bound / (1.0 - L))


@FAST
@given(deq_problems(batch=0) | deq_problems(batch=3), SEEDS)
def test_deq_exact_vjp_adjoint_identity(problem, seed):
    x, W, U_, b, L = problem
    dtype = x.dtype.name
    res = deq.tanh_deq(x, W, U_, b)
    rng = np.random.default_rng(seed)
    tangents = [np.asarray(rng.standard_normal(v.shape), dtype) for v in (x, W, U_, b)]
    z_bar = np.asarray(rng.standard_normal(res.z.shape), dtype)
    dz = deq.deq_jvp(res, *tangents)
    bars = deq.deq_vjp(res, z_bar, method="exact")
    # cond(I - J) <= (1 + L) / (1 - L) <= 19.
    assert adjoint_error([dz], [z_bar], tangents, bars) <= ADJ[dtype] * 10.0


@SLOW
@given(deq_problems(), SEEDS)
def test_deq_jvp_matches_central_differences(problem, seed):
    """float64: ``dz`` against ``(z(theta + h v) - z(theta - h v)) / 2h`` with
    tightly converged forwards (truncation O(h^2), rounding O(u / h))."""
    x, W, U_, b, L = (np.asarray(v, np.float64) if isinstance(v, np.ndarray) else v
                      for v in problem)
    rng = np.random.default_rng(seed)
    t = [rng.standard_normal(v.shape) for v in (x, W, U_, b)]
    t[1] = t[1] * (0.05 / np.linalg.norm(t[1], 2))           # keep ||W + h dW|| < 1
    res = deq.tanh_deq(x, W, U_, b, tol=1e-15, atol=1e-15)
    dz = np.asarray(deq.deq_jvp(res, *t))
    h = 1e-5
    plus = deq.tanh_deq(*(v + h * dv for v, dv in zip((x, W, U_, b), t)), tol=1e-15, atol=1e-15).z
    minus = deq.tanh_deq(*(v - h * dv for v, dv in zip((x, W, U_, b), t)), tol=1e-15, atol=1e-15).z
    fd = (np.asarray(plus) - np.asarray(minus)) / (2.0 * h)
    assert float(np.max(np.abs(dz - fd))) <= 1e-7 * max(1.0, float(np.max(np.abs(fd))))


@FAST
@given(deq_problems(), SEEDS)
def test_deq_neumann_phantom_converges_to_exact(problem, seed):
    """NPG with lam = 1 truncates (I - J^T)^{-1} = sum_i (J^T)^i; with
    ||J|| <= L the error after k terms is at most L^k / (1 - L) ||z_bar||."""
    x, W, U_, b, L = problem
    dtype = x.dtype.name
    res = deq.tanh_deq(x, W, U_, b)
    z_bar = np.asarray(np.random.default_rng(seed).standard_normal(res.z.shape), dtype)
    k = 60
    npg = deq.deq_vjp(res, z_bar, method="neumann", k=k, lam=1.0)
    exact = deq.deq_vjp(res, z_bar, method="exact")
    # theta_bar = F^T u with ||F^T||_2 <= max(||U||, ||z||, ||x||, 1) (|D| <= 1).
    F_norm = max(np.linalg.norm(U_, 2), np.linalg.norm(res.z) + np.linalg.norm(x) + 1.0)
    u_err = (L ** k / (1.0 - L) + 64.0 * U[dtype] / (1.0 - L) ** 2) * np.linalg.norm(z_bar)
    for p, e in zip(npg, exact):
        assert np.linalg.norm(np.asarray(p, np.float64) - e) <= 2.0 * F_norm * u_err


@INVALID
@given(deq_problems(), st.sampled_from(deq.SOLVERS))
def test_tanh_deq_reports_non_convergence(problem, method):
    """One update at tol = 1e-15 from z0 = 0 reaches z1 = f(0) = tanh(b); with
    x = 0 and b = 1/2 (tanh far from saturation) the residual
    f(z1) - z1 ~ D W z1 is not 0 for a generic W != 0: flagged and warned
    about.  (W = 0 makes f constant, and then z1 is exact.)"""
    x, W, U_, b, L = problem
    assume(L >= 0.05)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        res = deq.tanh_deq(np.zeros_like(x), W, U_, np.full_like(b, 0.5), method=method,
                           max_iter=1, tol=1e-15, atol=0.0)
    assert not res.all_converged and res.max_error > 1e-15


@SLOW
@given(deq_problems(batch=3))
def test_tanh_deq_batch_equals_loop(problem):
    x, W, U_, b, L = problem
    z = np.asarray(deq.tanh_deq(x, W, U_, b).z)
    tol = {"float64": 1e-10, "float32": 1e-4}[x.dtype.name]   # the registry's batch tolerance
    for i in range(x.shape[0]):
        assert rel_err(z[i], deq.tanh_deq(x[i], W, U_, b).z) <= tol


@INVALID
@given(deq_problems(), st.sampled_from(["x", "W", "U", "b"]), BAD_VALUES, SEEDS)
def test_tanh_deq_rejects_non_finite(problem, name, value, seed):
    args = dict(zip(("x", "W", "U", "b"), problem[:4]))
    args[name] = poison(np.random.default_rng(seed), args[name], value)
    with pytest.raises(ValueError, match=f"'{name}'"):
        deq.tanh_deq(args["x"], args["W"], args["U"], args["b"])


@INVALID
@given(deq_problems(), st.sampled_from(["x", "W", "U", "b"]))
def test_tanh_deq_rejects_wrong_shapes(problem, name):
    args = dict(zip(("x", "W", "U", "b"), problem[:4]))
    v = args[name]
    args[name] = np.concatenate([v, v[..., :1]], axis=-1) if name != "U" else np.concatenate(
        [v, v[:1]], axis=0)
    with pytest.raises(ValueError, match=f"'{name}'"):
        deq.tanh_deq(args["x"], args["W"], args["U"], args["b"])


@INVALID
@given(deq_problems(), st.sampled_from(["x", "W", "U", "b"]), INT_DTYPES)
def test_tanh_deq_rejects_integer_arrays(problem, name, int_dtype):
    args = dict(zip(("x", "W", "U", "b"), problem[:4]))
    args[name] = np.round(args[name]).astype(int_dtype)
    with pytest.raises(TypeError, match=f"'{name}'"):
        deq.tanh_deq(args["x"], args["W"], args["U"], args["b"])


@INVALID
@given(deq_problems(), st.sampled_from([0.0, -0.5, 1.5, math.nan]))
def test_deq_vjp_rejects_bad_damping_and_cotangent(problem, lam):
    x, W, U_, b, L = problem
    res = deq.tanh_deq(x, W, U_, b)
    z_bar = np.ones_like(res.z)
    with pytest.raises(ValueError, match="'lam'"):
        deq.deq_vjp(res, z_bar, method="neumann", k=3, lam=lam)
    with pytest.raises(ValueError, match="'z_bar'"):
        deq.deq_vjp(res, np.ones(res.z.shape + (1,), x.dtype))


# ==========================================================================
# Linear solve
# ==========================================================================

@st.composite
def linsolve_problems(draw):
    """``A = Q1 diag(s) Q2^T`` with singular values log-uniform in
    ``scale * [1, cond]``, ``cond`` up to 1e4; ``b`` (..., n); batch
    dimensions of ``A`` and ``b`` broadcast (either may be shared)."""
    dtype = draw(DTYPES)
    n = draw(st.integers(1, 6))
    cond = 10.0 ** draw(st.floats(0, 4))
    rng = np.random.default_rng(draw(SEEDS))
    a_batch = draw(st.sampled_from([(), (3,)]))
    b_batch = draw(st.sampled_from([(), (3,)]))
    Q1, _ = np.linalg.qr(rng.standard_normal(a_batch + (n, n)))
    Q2, _ = np.linalg.qr(rng.standard_normal(a_batch + (n, n)))
    s = 10.0 ** draw(st.floats(-3, 3)) * cond ** rng.random(a_batch + (n,))
    A = (Q1 * s[..., None, :]) @ np.swapaxes(Q2, -1, -2)
    b = rng.standard_normal(b_batch + (n,)) * 10.0 ** draw(st.floats(-3, 3))
    return np.asarray(A, dtype), np.asarray(b, dtype), cond


@FAST
@given(linsolve_problems())
def test_solve_backward_error(problem):
    A, b, cond = problem
    dtype = A.dtype.name
    A0, b0 = A.copy(), b.copy()
    x = np.asarray(linsolve.solve(A, b).x, np.float64)
    A64, b64 = A.astype(np.float64), b.astype(np.float64)
    r = np.linalg.norm(np.einsum("...ij,...j->...i", A64, x) - b64, axis=-1)
    # Normwise backward stability of LU with partial pivoting.
    scale = (np.linalg.norm(A64, axis=(-2, -1)) * np.linalg.norm(x, axis=-1)
             + np.linalg.norm(b64, axis=-1))
    assert np.all(r <= 32.0 * A.shape[-1] * U[dtype] * scale)
    np.testing.assert_array_equal(A, A0)
    np.testing.assert_array_equal(b, b0)


@FAST
@given(linsolve_problems(), SEEDS)
def test_solve_adjoint_identity(problem, seed):
    A, b, cond = problem
    dtype = A.dtype.name
    res = linsolve.solve(A, b)
    rng = np.random.default_rng(seed)
    dA, db = (np.asarray(rng.standard_normal(v.shape), dtype) for v in (A, b))
    x_bar = np.asarray(rng.standard_normal(res.x.shape), dtype)
    dx = linsolve.solve_jvp(res, dA, db)
    A_bar, b_bar = linsolve.solve_vjp(res, x_bar)
    assert A_bar.shape == A.shape and b_bar.shape == b.shape      # broadcast summed back
    assert adjoint_error([dx], [x_bar], [dA, db], [A_bar, b_bar]) <= max(
        ADJ[dtype], 16.0 * U[dtype] * cond)


@INVALID
@given(linsolve_problems(), st.sampled_from(["A", "b"]), BAD_VALUES, SEEDS)
def test_solve_rejects_non_finite(problem, name, value, seed):
    args = dict(zip("Ab", problem[:2]))
    args[name] = poison(np.random.default_rng(seed), args[name], value)
    with pytest.raises(ValueError, match=f"'{name}'"):
        linsolve.solve(args["A"], args["b"])


@INVALID
@given(linsolve_problems(), st.sampled_from(["A", "b"]))
def test_solve_rejects_wrong_shapes(problem, name):
    args = dict(zip("Ab", problem[:2]))
    v = args[name]
    args[name] = np.concatenate([v, v[..., :1]], axis=-1)
    with pytest.raises(ValueError, match=f"'{name}'"):
        linsolve.solve(args["A"], args["b"])


@INVALID
@given(linsolve_problems(), st.sampled_from(["A", "b"]), INT_DTYPES)
def test_solve_rejects_integer_arrays(problem, name, int_dtype):
    args = dict(zip("Ab", problem[:2]))
    args[name] = np.round(args[name]).astype(int_dtype)
    with pytest.raises(TypeError, match=f"'{name}'"):
        linsolve.solve(args["A"], args["b"])


@INVALID
@given(linsolve_problems(), SEEDS)
def test_solve_rejects_singular_matrix(problem, seed):
    A, b, _ = problem
    A = A.copy()
    A[..., np.random.default_rng(seed).integers(A.shape[-1]), :] = 0.0     # a zero row
    with pytest.raises(ValueError, match="'A'"):
        linsolve.solve(A, b)


@INVALID
@given(linsolve_problems())
def test_solve_vjp_rejects_bad_cotangent(problem):
    A, b, _ = problem
    res = linsolve.solve(A, b)
    with pytest.raises(ValueError, match="'x_bar'"):
        linsolve.solve_vjp(res, np.ones(res.x.shape + (1,), A.dtype))
    with pytest.raises(ValueError, match="'x_bar'"):
        linsolve.solve_vjp(res, np.full(res.x.shape, np.nan, A.dtype))
