"""Tests of refimpl.matsqrt: matrix square root / inverse square root, their
three gradients, the Lyapunov solver, the matrix sign function and the error bounds.

Expected values come from independent routes: scipy.linalg (sqrtm,
solve_sylvester, solve_continuous_lyapunov, signm, eigh), mpmath (Padé
coefficients, the approximants' scalar maps in high precision and their
divided differences), closed forms, and finite differences.  The registry
(tests/test_registry.py) adds the adjoint/FD/batch/no-mutation checks of the
curated cases on every backend.
"""

import math
import warnings
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import scipy.linalg

from refimpl import check, matsqrt
from refimpl.matsqrt import _kernels
from refimpl.matsqrt import adjoint as msq_adjoint
from refimpl.matsqrt import forward as msq_forward
from refimpl.matsqrt import sign as msq_sign
from refimpl.backend import ConditioningWarning, ConvergenceWarning, to_host

TOL = {"float64": 1e-12, "float32": 2e-5}


# --------------------------------------------------------------------------
# Helpers (host side)
# --------------------------------------------------------------------------

def spd(rng, eigenvalues):
    lam = np.asarray(eigenvalues, dtype=float)
    U, _ = np.linalg.qr(rng.standard_normal((lam.size, lam.size)))
    A = (U * lam) @ U.T
    return 0.5 * (A + A.T)


def spd_cond(rng, n, cond):
    return spd(rng, np.logspace(-math.log10(cond), 0.0, n))


def positive_stable(rng, n, batch=()):
    """Non-normal real matrices V diag(d) V^{-1} with eigenvalues d in [1, 5]."""
    V = rng.standard_normal(batch + (n, n)) + 3.0 * np.eye(n)
    d = rng.uniform(1.0, 5.0, batch + (n,))
    return (V * d[..., None, :]) @ np.linalg.inv(V)


def sym(X):
    return 0.5 * (X + np.swapaxes(X, -1, -2))


def true_root(A, inverse=False):
    lam, U = np.linalg.eigh(A)
    f = np.sqrt(np.maximum(lam, 0.0)) ** (-1.0 if inverse else 1.0)
    return (U * f[..., None, :]) @ np.swapaxes(U, -1, -2)


def rel(a, e):
    return float(np.max(np.abs(np.asarray(a, float) - e)) / np.max(np.abs(e)))


def out_of(res):
    return res.S_inv if isinstance(res, matsqrt.InvSqrtmResult) else res.S


def forward(inverse):
    return matsqrt.inv_sqrtm if inverse else matsqrt.sqrtm


def vjp(inverse):
    return matsqrt.inv_sqrtm_vjp if inverse else matsqrt.sqrtm_vjp


def jvp(inverse):
    return matsqrt.inv_sqrtm_jvp if inverse else matsqrt.sqrtm_jvp


def scipy_root(a, inverse=False):
    s = scipy.linalg.sqrtm(a)
    s = np.real_if_close(s, tol=1e6)
    assert not np.iscomplexobj(s)
    return scipy.linalg.inv(s) if inverse else s


# --------------------------------------------------------------------------
# Forward: exact methods against scipy, S S = A, S SPD
# --------------------------------------------------------------------------

@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
@pytest.mark.parametrize("method", ["eig", "ns"])
def test_exact_methods_match_scipy(backend, dtype, rng, method, inverse):
    A = np.stack([spd_cond(rng, 5, c) for c in (2.0, 10.0, 100.0)])
    A = A.astype(dtype).astype(float)
    res = forward(inverse)(backend.asarray(A, dtype), method=method)
    S = to_host(out_of(res)).astype(float)
    expect = np.stack([scipy_root(a, inverse) for a in A])
    assert rel(S, expect) < 100 * TOL[dtype]
    assert np.array_equal(S, np.swapaxes(S, -1, -2)), "S must be exactly symmetric"
    assert np.all(np.linalg.eigvalsh(S) > 0)
    if inverse:
        resid = np.linalg.norm(S @ A @ S - np.eye(5), axis=(-2, -1)) / math.sqrt(5)
    else:
        resid = np.linalg.norm(S @ S - A, axis=(-2, -1)) / np.linalg.norm(A, axis=(-2, -1))
    assert np.max(resid) < 1e3 * TOL[dtype]
    assert np.all(to_host(res.converged))
    assert to_host(res.residual).shape == (3,)
    assert str(res.S_inv.dtype if inverse else res.S.dtype).endswith(dtype)


def test_diagnostics_report_the_normalisation(rng):
    A = np.stack([spd_cond(rng, 4, 10.0), 1e3 * spd_cond(rng, 4, 3.0)])
    r = matsqrt.sqrtm(A, method="mpa")
    assert r.normalization == "frobenius" and r.order == 5
    assert np.allclose(r.scale, np.linalg.norm(A, axis=(-2, -1)), rtol=1e-14)
    r = matsqrt.sqrtm(A, method="mtp", degree=7)
    assert r.normalization == "frobenius" and r.order == 7
    r = matsqrt.sqrtm(A, method="ns")
    assert r.normalization == "trace" and np.allclose(r.scale, np.trace(A, axis1=-2, axis2=-1))
    assert r.options["tol"] == pytest.approx(math.sqrt(np.finfo(float).eps))
    assert np.all(r.n_iter > 3) and np.all(r.error <= r.options["tol"])
    r = matsqrt.sqrtm(A, method="eig")
    assert r.normalization == "none" and np.all(r.scale == 1.0)
    for method in ("mpa", "mtp", "eig", "ns"):
        r = matsqrt.sqrtm(A, method=method)
        S = r.S
        expect = np.linalg.norm(S @ S - A, axis=(-2, -1)) / np.linalg.norm(A, axis=(-2, -1))
        assert np.allclose(r.residual, expect, rtol=1e-6, atol=1e-15)


def test_scalar_and_two_by_two_closed_forms(backend, dtype):
    # 1x1: every method is exact (x = 1 is the expansion point of MTP/MPA, NS hits w = 1)
    for method in matsqrt.SQRT_METHODS:
        r = matsqrt.sqrtm(backend.asarray(np.array([[2.7]]), dtype), method=method)
        assert abs(float(to_host(r.S)[0, 0]) - math.sqrt(2.7)) < 10 * TOL[dtype]
    # 2x2: S = (A + sqrt(det A) I) / sqrt(tr A + 2 sqrt(det A))
    A = np.array([[3.0, 1.0], [1.0, 2.0]])
    d = math.sqrt(np.linalg.det(A))
    expect = (A + d * np.eye(2)) / math.sqrt(np.trace(A) + 2 * d)
    for method in ("eig", "ns"):
        S = to_host(matsqrt.sqrtm(backend.asarray(A, dtype), method=method).S)
        assert rel(S, expect) < 10 * TOL[dtype]


def test_scaled_identity_and_diagonal(backend, dtype, rng):
    G = rng.standard_normal((4, 4))
    for c in (1e-4, 2.5, 1e5):
        A = c * np.eye(4)
        r = matsqrt.sqrtm(backend.asarray(A, dtype), method="eig")
        assert rel(to_host(r.S), math.sqrt(c) * np.eye(4)) < TOL[dtype]
        for vm in ("exact", "lyapunov_sign"):
            A_bar = to_host(matsqrt.sqrtm_vjp(r, backend.asarray(G, dtype), method=vm))
            assert rel(A_bar, sym(G) / (2 * math.sqrt(c))) < 100 * TOL[dtype]
        ri = matsqrt.inv_sqrtm(backend.asarray(A, dtype), method="eig")
        A_bar = to_host(matsqrt.inv_sqrtm_vjp(ri, backend.asarray(G, dtype)))
        assert rel(A_bar, -sym(G) / (2 * c ** 1.5)) < 100 * TOL[dtype]
    d = np.array([0.5, 2.0, 2.0, 7.0])
    r = matsqrt.sqrtm(backend.asarray(np.diag(d), dtype), method="eig")
    A_bar = to_host(matsqrt.sqrtm_vjp(r, backend.asarray(G, dtype)))
    s = np.sqrt(d)
    assert rel(A_bar, sym(G) / (s[:, None] + s[None, :])) < 100 * TOL[dtype]


# --------------------------------------------------------------------------
# Approximants: the method oracle (scalar maps) and the error bounds
# --------------------------------------------------------------------------

APPROX = [
    pytest.param({"method": "mpa"}, id="mpa5"),
    pytest.param({"method": "mpa", "order": 2}, id="mpa2"),
    pytest.param({"method": "mpa", "order": 8, "basis": "x"}, id="mpa8x"),
    pytest.param({"method": "mtp"}, id="mtp10"),
    pytest.param({"method": "mtp", "degree": 25}, id="mtp25"),
    pytest.param({"method": "ns", "iters": 4}, id="ns4"),
]


def _oracle(A, params, inverse, n_iter=None):
    """U diag(c^{+-1/2} phi(l/c)) U^T from scipy.linalg.eigh and the scalar map."""
    lam, U = scipy.linalg.eigh(A)
    lam = np.maximum(lam, 0.0)
    method = params["method"]
    if method == "ns":
        c, kw = lam.sum(), {"iters": params.get("iters", n_iter)}
    else:
        c, kw = math.sqrt(float(np.sum(lam ** 2))), {
            k: params[k] for k in ("order", "degree") if k in params}
    phi = matsqrt.scalar_map(lam / c, method=method, inverse=inverse, **kw)
    return (U * (c ** (-0.5 if inverse else 0.5) * phi)) @ U.T


@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
@pytest.mark.parametrize("params", APPROX)
def test_approximant_matches_its_scalar_map(backend, dtype, rng, params, inverse):
    """Implementation bugs and approximation error are separated: the matrix
    result equals the method's scalar map in the eigenbasis to round-off."""
    A = np.stack([spd_cond(rng, 5, 30.0), 7.0 * spd_cond(rng, 5, 3.0)]).astype(dtype).astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)     # ns with 4 steps only
        res = forward(inverse)(backend.asarray(A, dtype), **params)
    S = to_host(out_of(res)).astype(float)
    expect = np.stack([_oracle(a, params, inverse) for a in A])
    # float32 carries the basis' round-off (Padé in Z: ~0.3 (1 + sqrt 2)^{2m} eps, see sqrtm)
    tol = 1e-12 if dtype == "float64" else (2e-3 if params.get("order", 0) == 8 else 1e-4)
    assert rel(S, expect) < tol


@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
@pytest.mark.parametrize("params", APPROX)
@pytest.mark.parametrize("cond", [3.0, 1e2, 1e4])
def test_matrix_error_obeys_the_bound(rng, params, inverse, cond):
    """||S - A^{1/2}||_2 <= beta ||A^{1/2}||_2 with beta = error_bound(spectrum),
    and beta is attained: ||R^{-1/2} S R^{-1/2} - I||_2 = beta (S and R commute)."""
    A = spd_cond(rng, 6, cond)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = forward(inverse)(A, **params)
    S = out_of(res)
    kw = {k: v for k, v in params.items() if k in ("order", "degree", "iters")}
    beta = float(matsqrt.error_bound(np.linalg.eigvalsh(A), method=params["method"],
                                     inverse=inverse, **kw))
    R = true_root(A, inverse)
    roundoff = 1e-9 * math.sqrt(cond)
    assert np.linalg.norm(S - R, 2) <= (beta + roundoff) * np.linalg.norm(R, 2)
    Rm = true_root(R)                                 # R^{1/2}; its inverse below
    Rmi = np.linalg.inv(Rm)
    assert abs(np.linalg.norm(Rmi @ S @ Rmi - np.eye(6), 2) - beta) <= roundoff + 1e-6 * beta


def test_error_bound_behaviour():
    """The bound falls with the order and rises with the condition number; MPA's
    closed form 2 rho^N / (1 - rho^N) matches mpmath's coth form."""
    lam = lambda cond: np.logspace(-math.log10(cond), 0, 8)  # noqa: E731
    mpa = [float(matsqrt.error_bound(lam(1e3), method="mpa", order=m)) for m in range(1, 9)]
    assert all(a > b for a, b in zip(mpa, mpa[1:]))
    mtp = [float(matsqrt.error_bound(lam(1e3), method="mtp", degree=k)) for k in (5, 10, 20, 40)]
    assert all(a > b for a, b in zip(mtp, mtp[1:]))
    conds = [float(matsqrt.error_bound(lam(c), method="mpa")) for c in (1e1, 1e2, 1e3, 1e4)]
    assert all(a < b for a, b in zip(conds, conds[1:]))
    ns = [float(matsqrt.error_bound(lam(1e3), method="ns", iters=t)) for t in (5, 10, 15, 20)]
    assert ns[0] > ns[1] > ns[2] and ns[3] < 1e-15
    mpmath.mp.dps = 30
    for x in (1e-4, 0.01, 0.3, 0.9):
        for m in (1, 5):
            r = mpmath.sqrt(x) * mpmath.coth((2 * m + 1) * mpmath.atanh(mpmath.sqrt(x)))
            expect = float(r / mpmath.sqrt(x) - 1)
            got = float(matsqrt.relative_error(np.array([x]), method="mpa", order=m)[0])
            assert got == pytest.approx(expect, rel=1e-9)
    # a zero eigenvalue: infinite relative error for MPA/MTP, r_m(0) = 1/(2m+1)
    assert math.isinf(float(matsqrt.relative_error(np.array([0.0]), method="mpa")[0]))
    assert float(matsqrt.scalar_map(np.array([0.0]), method="mpa", order=4)[0]) == pytest.approx(1 / 9)


@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
@pytest.mark.parametrize("method, params", [("mpa", {"order": 3}), ("mpa", {}), ("mtp", {"degree": 7}),
                                            ("ns", {"iters": 5})], ids=["mpa3", "mpa5", "mtp7", "ns5"])
def test_relative_error_and_scalar_map_signed_against_mpmath(method, params, inverse):
    """relative_error (closed forms) and scalar_map, signs included, against the
    method's scalar map evaluated in 40-digit arithmetic (written independently
    below): MPA and MTP over-estimate the root and under-estimate its inverse."""
    mpmath.mp.dps = 40
    phi = _phi_mp(method, params, inverse, params.get("iters"))
    x = np.array([1e-4, 0.01, 0.3, 0.9, 1.0])
    kw = dict(params, method=method, inverse=inverse)
    got_rel = matsqrt.relative_error(x, **kw)
    got_phi = matsqrt.scalar_map(x, **kw)
    for xi, r, f in zip(x, got_rel, got_phi):
        xm = mpmath.mpf(float(xi))
        expect_phi = phi(xm)
        expect_rel = expect_phi * (mpmath.sqrt(xm) if inverse else 1 / mpmath.sqrt(xm)) - 1
        assert float(f) == pytest.approx(float(expect_phi), rel=1e-12)
        assert float(r) == pytest.approx(float(expect_rel), rel=1e-9, abs=1e-15)
        if method in ("mpa", "mtp") and xi < 1.0:
            assert (r < 0) if inverse else (r > 0)


def test_pade_coefficients_match_mpmath():
    """Exact rationals from refimpl against mpmath.pade of the Taylor series."""
    mpmath.mp.dps = 50
    for m in range(1, 11):
        taylor = [mpmath.binomial(mpmath.mpf(1) / 2, k) * (-1) ** k for k in range(2 * m + 1)]
        p_ref, q_ref = mpmath.pade(taylor, m, m)
        p, q = matsqrt.pade_coefficients(m)
        assert all(isinstance(v, Fraction) for v in p + q)
        scale = q_ref[0]
        for got, ref in zip(p + q, list(p_ref) + list(q_ref)):
            assert abs(mpmath.mpf(got.numerator) / got.denominator - ref / scale) < mpmath.mpf(10) ** -40
    assert matsqrt.taylor_coefficients(4) == (1, Fraction(-1, 2), Fraction(-1, 8), Fraction(-1, 16),
                                              Fraction(-5, 128))
    # the cancellation of the paper's basis at z = 1 (a zero eigenvalue), which sets
    # its round-off (sqrtm docstring, registry allowance): sum_k |p_k| / |P(1)| =
    # E(2) = sum_j binom(N, 2j) 2^j = ((1 + sqrt 2)^N + (1 - sqrt 2)^N) / 2, N = 2m + 1
    for m in range(1, 13):
        p, q = matsqrt.pade_coefficients(m)
        N = 2 * m + 1
        factor = sum(abs(v) for v in p) / abs(sum(p))
        assert factor == sum(math.comb(N, 2 * j) * 2 ** j for j in range(m + 1))
        assert float(factor) == pytest.approx(((1 + math.sqrt(2)) ** N + (1 - math.sqrt(2)) ** N) / 2,
                                              rel=1e-12)


@pytest.mark.parametrize("bshape", [(), (3,), (2, 3)])
def test_combine_is_tensordot(backend, rng, bshape):
    """The forward's member-by-member contraction of the power block equals
    numpy.tensordot, for any batch shape, and comes back contiguous on NumPy."""
    coef = rng.standard_normal((3, 5))
    block = rng.standard_normal((5,) + bshape + (4, 4))
    got = msq_forward._combine(backend.asarray(coef), backend.asarray(block))
    np.testing.assert_allclose(to_host(got), np.tensordot(coef, block, axes=1),
                               rtol=1e-13, atol=1e-14)
    if backend.name == "numpy":
        assert got.flags.c_contiguous


def test_pade_polynomials_positive_on_unit_interval():
    """The forward solves D R = N by Cholesky (D SPD): every Padé numerator and
    denominator, either basis, has no real zero in [0, 1] (exact root count,
    sympy) and is positive there; at m = 5 the smallest values are q(1) and p(1)
    of the z basis, as the _forward_rational docstring states."""
    sympy = pytest.importorskip("sympy")
    w = sympy.Symbol("w")
    for basis in ("z", "x"):
        for m in range(1, 13):
            for coeffs in matsqrt.pade_coefficients(m, basis):
                poly = sympy.Poly(sum(sympy.Rational(c.numerator, c.denominator) * w ** k
                                      for k, c in enumerate(coeffs)), w)
                assert poly.count_roots(0, 1) == 0, (basis, m)
                assert poly.eval(sympy.Rational(1, 2)) > 0, (basis, m)
    p, q = matsqrt.pade_coefficients(5, "z")
    assert float(sum(q)) == pytest.approx(0.0107, rel=0.01)
    assert float(sum(p)) == pytest.approx(0.000977, rel=0.01)


# --------------------------------------------------------------------------
# Gradients: exact vs scipy, the Lyapunov solve, the approximant oracle
# --------------------------------------------------------------------------

@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
@pytest.mark.parametrize("vmethod", ["exact", "lyapunov_sign"])
def test_gradient_matches_solve_sylvester(backend, dtype, rng, vmethod, inverse):
    """Non-symmetric cotangent; A_bar = L_S^{-1}(sym G) (inverse: -T sym(G) T on the
    right-hand side) from scipy.linalg.solve_sylvester with the true root."""
    A = np.stack([spd_cond(rng, 6, 50.0), 1e-3 * spd_cond(rng, 6, 5.0)]).astype(dtype).astype(float)
    G = rng.standard_normal(A.shape)
    res = forward(inverse)(backend.asarray(A, dtype), method="eig")
    A_bar = to_host(vjp(inverse)(res, backend.asarray(G, dtype), method=vmethod)).astype(float)
    for a, g, ab in zip(A, G, A_bar):
        S = true_root(a)
        rhs = -np.linalg.inv(S) @ g @ np.linalg.inv(S) if inverse else g
        X = scipy.linalg.solve_sylvester(S, S, rhs)          # Fréchet adjoint, non-symmetric
        assert rel(ab, sym(X)) < 1e3 * TOL[dtype]
        assert np.array_equal(ab, ab.T)
        assert rel(sym(X), X) > 1e-3                         # the cotangent was non-symmetric


def test_lyapunov_sign_fixed_iterations_are_wrong_at_high_condition(rng):
    """The paper's fixed T = 8 is accurate at small condition numbers and badly
    wrong at large ones; the tolerance-driven default converges."""
    G = rng.standard_normal((6, 6))
    for cond, wrong in ((4.0, False), (1e3, True), (1e6, True)):
        A = spd_cond(rng, 6, cond)
        r = matsqrt.sqrtm(A, method="eig")
        exact = matsqrt.sqrtm_vjp(r, G, method="exact")
        default, info = matsqrt.sqrtm_vjp(r, G, method="lyapunov_sign", full_output=True)
        assert np.all(info.converged) and np.max(info.residual) < 1e-13
        assert rel(default, exact) < 1e-9 * math.sqrt(cond)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fixed, info8 = matsqrt.sqrtm_vjp(r, G, method="lyapunov_sign", iters=8,
                                             full_output=True)
        err = rel(fixed, exact)
        if wrong:
            assert err > 0.05 and not np.all(info8.converged)
            assert any(issubclass(w.category, ConvergenceWarning) for w in caught)
        else:
            assert err < 1e-6


@pytest.mark.parametrize("l0", [1.0, 1e-3, 1e-12], ids=["over", "exact", "under"])
def test_scaled_sign_iteration_any_lower_estimate(rng, l0):
    """The scaled iteration converges to the solution whatever the estimate l0 of
    the smallest eigenvalue (1e-3 here): an overestimate or a gross underestimate
    costs steps, not accuracy.  The top eigenvalue sits at 1 + 1e-9, above the
    bound 1 (rounding of a computed root): the headroom u = 1 + sqrt(eps) keeps
    it from being mapped across zero even with l0 = 1e-12."""
    U, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    B = sym((U * np.array([1e-3, 0.02, 0.3, 0.7, 1.0 + 1e-9])) @ U.T)
    C = sym(rng.standard_normal((5, 5)))
    X, n_iter, err, conv = msq_sign._lyapunov_sign_core(
        B, C, iters=None, tol=1.5e-8, max_iter=100, symmetric=True, l0=np.asarray(l0))
    assert bool(conv) and rel(X, scipy.linalg.solve_continuous_lyapunov(B, C)) < 1e-11
    # from 1e-3, at most 2.6x a step: >= 8 steps; 1.5x a step (plain): 17 + the finish
    _, n_plain, _, _ = msq_sign._lyapunov_sign_core(B, C, iters=None, tol=1.5e-8, max_iter=100,
                                                   symmetric=True)
    assert 8 <= int(n_iter) and int(n_plain) >= 18
    if l0 == 1e-3:
        assert int(n_iter) <= 13


@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
@pytest.mark.parametrize("method", ["mpa", "mtp"])
def test_lyapunov_sign_steps_after_an_approximant(rng, method, inverse):
    """After an MPA/MTP forward the spectrum of the root lies in c^{+-1/2} [phi(0), 1]
    (or [1, phi(0)]) whatever the conditioning of A (phi(0) = 1/(2m+1) for MPA):
    the scaled sign iteration then needs a bounded number of steps, 7 here at
    cond 1e2 and 1e10 alike."""
    G = rng.standard_normal((6, 6))
    for cond in (1e2, 1e10):
        res = forward(inverse)(spd_cond(rng, 6, cond), method=method)
        A_bar, info = vjp(inverse)(res, G, method="lyapunov_sign", full_output=True)
        assert np.all(info.converged) and int(info.n_iter) <= 7
        T = out_of(res)
        rhs = -(T @ T) @ sym(G) @ (T @ T) if inverse else sym(G)
        assert rel(A_bar, scipy.linalg.solve_sylvester(T, T, rhs)) < 1e-12


def test_finish_terms_is_the_smallest_sufficient_count():
    """j is the least integer >= 0 with q^{j+1} b/a <= target, q = (b - a)/(b + a);
    no term when a == b (exact); inf without a lower end (a <= 0)."""
    a = np.array([1.0, 0.999, 0.9641, 0.7, 0.2, 1e-4, 0.0, -0.5])
    b = np.ones_like(a)
    for target in (2.2e-16, 1e-10, 1e-3):
        j = to_host(msq_sign.finish_terms(a, b, target))
        for ai, ji in zip(a, j):
            if ai <= 0.0:
                assert ji == np.inf
                continue
            q = (1.0 - ai) / (1.0 + ai)
            if q == 0.0:
                assert ji == 0
                continue
            bound = lambda k: q ** (k + 1) / ai       # noqa: E731
            assert bound(ji) <= target * (1 + 1e-12)
            assert ji == 0 or bound(ji - 1) > target


@pytest.mark.parametrize("lo, target", [(0.9641, 2.2e-16), (0.5, 1e-12), (0.999, 1e-8)])
def test_finish_solves_within_its_bound(rng, lo, target):
    """B X + X B = C for symmetric B with spectrum filling [lo, 1] (ends included) by
    the shifted Neumann series: the error against scipy is within the bound
    q^{j+1} b/a (relative, plus rounding), the result is exactly symmetric; in a
    batch whose members take different j (one takes none) each finished member gets
    its result alone."""
    n = 6
    Bs, Cs = [], []
    for spread in (lo, 0.5 * (1 + lo), 1.0):     # spectra [lo, 1], [(1+lo)/2, 1], {1}
        U, _ = np.linalg.qr(rng.standard_normal((n, n)))
        Bs.append(sym((U * np.linspace(spread, 1.0, n)) @ U.T))
        Cs.append(sym(rng.standard_normal((n, n))))
    B, C = np.stack(Bs), np.stack(Cs)
    a, b = np.array([lo, 0.5 * (1 + lo), 1.0]), np.ones(3)
    j = to_host(msq_sign.finish_terms(a, b, target))
    assert j[0] >= j[1] > j[2] == 0
    X = 0.5 * msq_sign.neumann_finish(B, C, a, b, j)
    assert np.array_equal(X, np.swapaxes(X, -1, -2))
    for i in range(3):
        want = scipy.linalg.solve_continuous_lyapunov(B[i], C[i])
        q = (b[i] - a[i]) / (b[i] + a[i])
        assert rel(X[i], want) <= 1.1 * q ** (j[i] + 1) * b[i] / a[i] + 1e-14
        alone = 0.5 * msq_sign.neumann_finish(B[i], C[i], a[i], b[i], j[i])
        assert rel(X[i], alone) <= 1e-15
    # a member with j = 0 and (unused) interval [1, 1] does not change the others
    a1, j1 = a.copy(), j.copy()
    a1[1], j1[1] = 1.0, 0
    X1 = 0.5 * msq_sign.neumann_finish(B, C, a1, b, j1)
    assert np.array_equal(X1[0], X[0])


def test_sign_iteration_members_finish_on_their_own(rng):
    """Members that reach the finish at different steps (conditioning
    1e1 .. 1e8, eig forward: the interval is the true spectrum) get the result
    they get alone, agree with solve_sylvester on the forward's root, and the
    gradient is exactly symmetric."""
    As = np.stack([spd_cond(rng, 6, c) for c in (1e1, 1e4, 1e8)])
    Gs = rng.standard_normal((3, 6, 6))
    res = matsqrt.sqrtm(As, method="eig")
    A_bar, info = matsqrt.sqrtm_vjp(res, Gs, method="lyapunov_sign", full_output=True)
    n_iter = to_host(info.n_iter)
    assert len(set(n_iter.tolist())) > 1 and np.all(to_host(info.n_terms) >= 1)
    assert np.all(info.converged) and np.max(info.residual) < 1e-12   # ~1e-13 at cond 1e8
    assert np.array_equal(A_bar, np.swapaxes(A_bar, -1, -2))
    for i in range(3):
        alone, info_i = matsqrt.sqrtm_vjp(matsqrt.sqrtm(As[i], method="eig"), Gs[i],
                                          method="lyapunov_sign", full_output=True)
        assert int(info_i.n_iter) == n_iter[i]
        assert rel(A_bar[i], alone) <= 1e-15
        S = to_host(res.S)[i]
        assert rel(A_bar[i], scipy.linalg.solve_sylvester(S, S, sym(Gs[i]))) < 1e-11


@pytest.mark.parametrize("iters", [None, 30])
def test_sign_iteration_in_cache_blocks_equals_one_block(rng, monkeypatch, iters):
    """On NumPy the sign iteration runs over blocks of members sized to the cache
    (_kernels.batch_blocks).  With a budget of one byte every member of a (2, 3)
    batch is its own block: the gradient and every diagnostic equal the
    one-block run bit for bit (each member's products are the same), and each
    member matches solve_sylvester on the forward's root."""
    conds = (3.0, 1e2, 1e4, 1e6, 10.0, 1e3)
    As = np.stack([spd_cond(rng, 5, c) for c in conds]).reshape(2, 3, 5, 5)
    Gs = rng.standard_normal((2, 3, 5, 5))
    res = matsqrt.sqrtm(As, method="eig")       # the true interval: step counts differ
    assert len(_kernels.batch_blocks(6, 7 * 5 * 5 * 8)) == 1
    whole, info = matsqrt.sqrtm_vjp(res, Gs, method="lyapunov_sign", iters=iters, full_output=True)
    monkeypatch.setattr(_kernels, "CACHE_BLOCK_BYTES", 1)
    assert len(_kernels.batch_blocks(6, 7 * 5 * 5 * 8)) == 6
    blocked, info_b = matsqrt.sqrtm_vjp(res, Gs, method="lyapunov_sign", iters=iters,
                                        full_output=True)
    assert blocked.shape == whole.shape and np.array_equal(blocked, whole)
    for field in ("n_iter", "n_terms", "error", "converged", "residual"):
        assert np.array_equal(getattr(info_b, field), getattr(info, field)), field
    if iters is None:
        assert len(set(info.n_iter.ravel().tolist())) > 1     # members stop at different steps
        S = to_host(res.S)
        for idx in np.ndindex(2, 3):
            want = scipy.linalg.solve_sylvester(S[idx], S[idx], sym(Gs[idx]))
            assert rel(blocked[idx], want) < 1e-11


@pytest.mark.parametrize("method, kw", [("mpa", {}), ("mpa", {"order": 2}), ("mtp", {}),
                                        ("mpa", {"basis": "x"})])
@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
def test_forward_bounds_enclose_the_spectrum(rng, method, kw, inverse):
    """x_max >= l_max / ||A||_F (and <= 1), and the sign iteration's interval
    contains the spectrum of the computed root, for well- to ill-conditioned
    and rank-deficient inputs."""
    rank3 = (lambda X: X @ X.T)(rng.standard_normal((8, 3)))
    for A in (spd_cond(rng, 8, 3.0), spd_cond(rng, 8, 1e8)) + (() if inverse else (rank3,)):
        res = forward(inverse)(A, method=method, **kw)
        lam = np.linalg.eigvalsh(A)
        x_max = float(res.state.x_max)
        assert lam[-1] / np.linalg.norm(A) <= x_max <= 1.0
        lo, hi = (float(v) for v in msq_adjoint._sign_interval(res, inverse))
        ev = np.linalg.eigvalsh(out_of(res))
        assert lo <= ev[0] * (1 + 1e-12) and ev[-1] <= hi * (1 + 1e-12)


@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
def test_lyapunov_sign_uses_the_forward_root(rng, inverse):
    """With an MPA forward, "lyapunov_sign" solves with the MPA's own S (the
    paper's backward): it equals solve_sylvester on that S, not the exact gradient."""
    A = spd_cond(rng, 5, 50.0)
    G = rng.standard_normal((5, 5))
    res = forward(inverse)(A, method="mpa")
    A_bar = vjp(inverse)(res, G, method="lyapunov_sign")
    T = out_of(res)
    rhs = -(T @ T) @ sym(G) @ (T @ T) if inverse else sym(G)
    assert rel(A_bar, scipy.linalg.solve_sylvester(T, T, rhs)) < 1e-11
    exact = vjp(inverse)(res, G, method="exact")
    assert rel(A_bar, exact) > 1e-4


# mpmath versions of the scalar maps, written independently of refimpl
def _phi_mp(method, params, inverse, n_iter):
    if method == "mpa":
        N = 2 * params.get("order", 5) + 1

        def phi(x):
            r = mpmath.sqrt(x) * mpmath.coth(N * mpmath.atanh(mpmath.sqrt(x)))
            return 1 / r if inverse else r
    elif method == "mtp":
        K = params.get("degree", 10)
        a = -mpmath.mpf(1) / 2 if inverse else mpmath.mpf(1) / 2
        t = [mpmath.binomial(a, k) * (-1) ** k for k in range(K + 1)]

        def phi(x):
            return sum(tk * (1 - x) ** k for k, tk in enumerate(t))
    else:
        def phi(x):
            w = x
            for _ in range(n_iter):
                w = w * (3 - w) ** 2 / 4
            return mpmath.sqrt(w / x) if inverse else mpmath.sqrt(x * w)
    return phi


def _approximant_vjp_oracle(A, G, method, params, inverse, n_iter):
    """Chain rule in the eigenbasis: F(A) = c^g phi_mat(A/c),
    A_bar = c^{g-1} L(X, Gs) + kappa dc/dA,
    kappa = g c^{g-1} <Gs, phi_mat(X)> - c^{g-2} <L(X, Gs), A>,
    L(X, E) = U [(U^T E U) o D] U^T with D the divided differences of phi (mpmath)."""
    mpmath.mp.dps = 40
    g = -0.5 if inverse else 0.5
    lam, U = scipy.linalg.eigh(A)
    trace = method == "ns"
    c = lam.sum() if trace else math.sqrt(float(np.sum(lam ** 2)))
    x = [mpmath.mpf(float(v)) / mpmath.mpf(float(c)) for v in lam]
    phi = _phi_mp(method, params, inverse, n_iter)
    n = len(lam)
    D = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            if abs(x[i] - x[j]) > mpmath.mpf(10) ** -30:
                D[i, j] = float((phi(x[i]) - phi(x[j])) / (x[i] - x[j]))
            else:
                D[i, j] = float(mpmath.diff(phi, x[i]))
    Gs = sym(G)
    L = U @ ((U.T @ Gs @ U) * D) @ U.T
    phi_mat = (U * np.array([float(phi(v)) for v in x])) @ U.T
    kappa = g * c ** (g - 1) * np.sum(Gs * phi_mat) - c ** (g - 2) * np.sum(L * A)
    dc = np.eye(n) if trace else A / c
    return c ** (g - 1) * L + kappa * dc


@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
@pytest.mark.parametrize("params", [
    pytest.param({"method": "mpa"}, id="mpa"),
    pytest.param({"method": "mpa", "order": 3, "basis": "x"}, id="mpa3x"),
    pytest.param({"method": "mtp", "degree": 6}, id="mtp6"),
    pytest.param({"method": "ns"}, id="ns"),
    pytest.param({"method": "ns", "iters": 3}, id="ns3"),
])
@pytest.mark.parametrize("spectrum", ["random", "repeated", "identity"])
def test_approximant_gradient_matches_eigenbasis_chain_rule(rng, params, inverse, spectrum):
    """The "approximant" VJP (reverse mode through the matrix computation)
    against the chain rule of its scalar map in the eigenbasis, with divided
    differences in 40-digit arithmetic — two independent routes."""
    A = {"random": lambda: spd_cond(rng, 4, 20.0),
         "repeated": lambda: spd(rng, [0.3, 0.3, 2.0, 2.0]),
         "identity": lambda: 1.7 * np.eye(4)}[spectrum]()
    G = rng.standard_normal((4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = forward(inverse)(A, **params)
        A_bar = vjp(inverse)(res, G, method="approximant")
    n_iter = int(np.max(res.n_iter))
    expect = _approximant_vjp_oracle(A, G, params["method"], params, inverse, n_iter)
    assert rel(A_bar, expect) < 1e-10


def test_approximant_differs_from_exact(rng):
    """The three gradients are different quantities: MPA's own derivative differs
    from the true root's by its approximation error (percent level at cond 100);
    for the eig forward the approximant is the exact gradient."""
    A = spd_cond(rng, 6, 100.0)
    G = rng.standard_normal((6, 6))
    res = matsqrt.sqrtm(A, method="mpa")
    exact = matsqrt.sqrtm_vjp(res, G, method="exact")
    approx = matsqrt.sqrtm_vjp(res, G, method="approximant")
    assert 1e-3 < rel(approx, exact) < 1.0
    r = matsqrt.sqrtm(A, method="eig")
    assert rel(matsqrt.sqrtm_vjp(r, G, method="approximant"),
               matsqrt.sqrtm_vjp(r, G, method="exact")) < 1e-14


FD_PAIRS = [  # (forward params, derivative method): the derivative FD must reproduce
    ({"method": "eig"}, "exact"),
    ({"method": "eig"}, "lyapunov_sign"),
    ({"method": "ns"}, "lyapunov_sign"),
    ({"method": "ns"}, "approximant"),
    ({"method": "ns", "iters": 6}, "approximant"),
    ({"method": "mpa"}, "approximant"),
    ({"method": "mpa", "basis": "x", "order": 7}, "approximant"),
    ({"method": "mtp"}, "approximant"),
]


@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
@pytest.mark.parametrize("params, vmethod", FD_PAIRS,
                         ids=[f"{p['method']}{p.get('iters', '')}{p.get('basis', '')}-{v}"
                              for p, v in FD_PAIRS])
def test_adjoint_and_finite_differences(backend, rng, params, vmethod, inverse):
    """Adjoint test for each JVP/VJP pair (non-symmetric tangent and cotangent)
    and both against Richardson-extrapolated differences along a symmetric direction."""
    A = spd_cond(rng, 5, 20.0)
    U0 = rng.standard_normal((5, 5))
    V = rng.standard_normal((5, 5))
    be = backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)     # ns with 6 fixed steps
        res = forward(inverse)(be.asarray(A, "float64"), **params)

        def f(a):
            return out_of(forward(inverse)(a, **params))

        def jv(u):
            return jvp(inverse)(res, u, method=vmethod)

        def vj(v):
            return vjp(inverse)(res, v, method=vmethod)

        u, v = be.asarray(U0, "float64"), be.asarray(V, "float64")
        assert check.adjoint_test(jv, vj, u, v, tol=1e-13)
        us = be.asarray(sym(U0), "float64")
        for r in check.fd_jacobian_check(f, be.asarray(A, "float64"), us, cotangents=v,
                                         vjp=vj, jvp=jv, tol=1e-8):
            assert r, str(r)


# --------------------------------------------------------------------------
# Batch independence and scale covariance
# --------------------------------------------------------------------------

@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
@pytest.mark.parametrize("params, vmethod", [
    ({"method": "mpa"}, "lyapunov_sign"), ({"method": "mpa"}, "approximant"),
    ({"method": "mtp"}, "lyapunov_sign"), ({"method": "ns"}, "approximant"),
    ({"method": "ns"}, "lyapunov_sign"), ({"method": "eig"}, "exact"),
], ids=lambda v: v if isinstance(v, str) else v["method"])
def test_batch_independence(backend, dtype, rng, params, vmethod, inverse):
    """A member's result and gradient do not depend on its batch-mates
    (normalisation, stopping and sign scaling are per member), even when the
    mates differ in scale by 1e9 and in conditioning."""
    a = spd_cond(rng, 5, 10.0)
    mates = [1e-6 * spd_cond(rng, 5, 1e3), 1e3 * spd_cond(rng, 5, 2.0)]
    g = rng.standard_normal((5, 5))
    gm = [rng.standard_normal((5, 5)) for _ in mates]

    def run(As, Gs):
        res = forward(inverse)(backend.asarray(np.stack(As), dtype), **params)
        A_bar = vjp(inverse)(res, backend.asarray(np.stack(Gs), dtype), method=vmethod)
        return to_host(out_of(res))[0], to_host(A_bar)[0], to_host(res.n_iter)[0]

    S1, B1, n1 = run([a], [g])
    S3, B3, n3 = run([a] + mates, [g] + gm)
    S3b, B3b, _ = run(mates + [a], gm + [g])
    tol = 1e-14 if dtype == "float64" else 1e-6
    assert n1 == n3
    assert rel(S3, S1) <= tol and rel(B3, B1) <= tol
    # member order inside the batch does not matter either
    res = forward(inverse)(backend.asarray(np.stack(mates + [a]), dtype), **params)
    assert rel(to_host(out_of(res))[2], S1) <= tol


@pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eig"])
def test_scale_covariance(rng, method):
    """S(alpha A) = sqrt(alpha) S(A) and A_bar(alpha A) = A_bar(A) / sqrt(alpha):
    the per-member normalisation makes every method scale-invariant."""
    A = spd_cond(rng, 5, 30.0)
    G = rng.standard_normal((5, 5))
    r1 = matsqrt.sqrtm(A, method=method)
    b1 = matsqrt.sqrtm_vjp(r1, G, method="approximant")
    for alpha in (1e-8, 1e6):
        r = matsqrt.sqrtm(alpha * A, method=method)
        assert rel(r.S, math.sqrt(alpha) * r1.S) < 1e-13
        assert rel(matsqrt.sqrtm_vjp(r, G, method="approximant"), b1 / math.sqrt(alpha)) < 1e-12


# --------------------------------------------------------------------------
# Rank-deficient and ill-conditioned inputs
# --------------------------------------------------------------------------

def test_rank_deficient(backend, dtype, rng):
    X = rng.integers(-3, 4, size=(5, 3)).astype(float)
    X[[1, 3]] = 0.0
    # rank 3 with two zero rows and columns, whose zero eigenvalues come out
    # as exact zeros (the Householder reduction leaves a zero row and column
    # alone); for X X^T with no zero row their computed sign is the rounding
    # luck of the LAPACK at hand
    A = X @ X.T
    lam, V = np.linalg.eigh(A)
    null = V[:, 0]
    c = np.linalg.norm(A)
    Ab = backend.asarray(A, dtype)
    r = matsqrt.sqrtm(Ab, method="eig")
    S = to_host(r.S).astype(float)
    assert rel(S @ S, A) < 100 * TOL[dtype]
    # MPA maps the zero eigenvalue to sqrt(||A||_F) / (2m + 1), not to 0
    for m in (2, 5):
        S = to_host(matsqrt.sqrtm(Ab, method="mpa", order=m).S).astype(float)
        assert null @ S @ null == pytest.approx(math.sqrt(c) / (2 * m + 1), rel=1e3 * TOL[dtype])
    # NS maps it to 0; its coupled inverse diverges there, which is reported
    # (up to the square root of the rounding of A/tr A: in float32 that tiny
    # eigenvalue is reached within 40 steps, in float64 it is not, and the
    # coupled inverse's divergence there is reported)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = matsqrt.sqrtm(Ab, method="ns", max_iter=40)
    S = to_host(r.S).astype(float)
    eps = float(np.finfo(dtype).eps)
    assert abs(null @ S @ null) < 10 * math.sqrt(5 * eps) * math.sqrt(c)
    assert rel(S @ S, A) < 1e3 * TOL[dtype]
    if dtype == "float64":
        assert not bool(np.all(to_host(r.converged)))
        assert any(issubclass(w.category, ConvergenceWarning) for w in caught)
    # the true root is not differentiable at a singular A; the MPA is
    res = matsqrt.sqrtm(Ab, method="mpa")
    G = backend.asarray(rng.standard_normal((5, 5)), dtype)
    with pytest.raises(ValueError, match="not differentiable at a singular"):
        matsqrt.sqrtm_vjp(res, G, method="exact")
    assert np.all(np.isfinite(to_host(matsqrt.sqrtm_vjp(res, G, method="approximant"))))
    for method in matsqrt.SQRT_METHODS:
        with pytest.raises(ValueError, match="not symmetric positive definite"):
            matsqrt.inv_sqrtm(Ab, method=method)


def test_ill_conditioned(rng):
    A = spd_cond(rng, 8, 1e10)
    expect = scipy_root(A)
    for method in ("eig", "ns"):
        r = matsqrt.sqrtm(A, method=method)
        assert rel(r.S, expect) < 1e-9
    G = rng.standard_normal((8, 8))
    r = matsqrt.sqrtm(A, method="eig")
    exact = matsqrt.sqrtm_vjp(r, G)
    S = true_root(A)
    assert rel(exact, sym(scipy.linalg.solve_sylvester(S, S, G))) < 1e-8
    lyap, info = matsqrt.sqrtm_vjp(r, G, method="lyapunov_sign", full_output=True)
    # the scaled sign iteration starts from B_0 = S / s_max, smallest eigenvalue
    # 1e-5, which grows at most 1.5 sqrt(3) = 2.6x a step: >= 12 steps; the
    # paper's plain iteration (1.5x a step) is still far off after 25
    assert np.all(info.converged) and 12 <= int(info.n_iter) <= 20
    assert rel(lyap, exact) < 1e-7
    with pytest.warns(ConvergenceWarning, match="Lyapunov sign iteration"):
        plain = matsqrt.sqrtm_vjp(r, G, method="lyapunov_sign", iters=25)
    assert rel(plain, exact) > 1e-2
    # MPA's error at this conditioning is large, and error_bound says so
    rm = matsqrt.sqrtm(A, method="mpa")
    beta = float(matsqrt.error_bound(np.linalg.eigvalsh(A), method="mpa"))
    assert np.linalg.norm(rm.S - S, 2) <= beta * np.linalg.norm(S, 2) and beta > 0.5


def test_conditioning_warning():
    for dtype, small in (("float64", 1e-17), ("float32", 1e-8)):
        A = np.diag([1.0, small, 0.5]).astype(dtype)
        r = matsqrt.sqrtm(A, method="eig")
        with pytest.warns(ConditioningWarning, match="ill-conditioned"):
            matsqrt.sqrtm_vjp(r, np.ones_like(A))


# --------------------------------------------------------------------------
# Lyapunov equation and the matrix sign function
# --------------------------------------------------------------------------

def test_lyapunov_general_matches_scipy(backend, dtype, rng):
    """B X + X B^T = C for a non-symmetric, positive-stable B and non-symmetric C
    (scipy.linalg.solve_continuous_lyapunov solves a X + X a^H = q)."""
    B = positive_stable(rng, 5, (3,))
    C = rng.standard_normal((3, 5, 5))
    res = matsqrt.lyapunov(backend.asarray(B, dtype), backend.asarray(C, dtype), method="sign")
    X = to_host(res.X).astype(float)
    for b, c, x in zip(B, C, X):
        assert rel(x, scipy.linalg.solve_continuous_lyapunov(b, c)) < 1e3 * TOL[dtype]
        assert rel(x, scipy.linalg.solve_sylvester(b, b.T, c)) < 1e3 * TOL[dtype]
        # the untransposed equation B X + X B = C has a different solution
        assert rel(x, scipy.linalg.solve_sylvester(b, b, c)) > 1e-3
    assert np.all(to_host(res.converged)) and np.max(to_host(res.residual)) < 100 * TOL[dtype]


def test_lyapunov_eig_and_broadcasting(backend, dtype, rng):
    B = spd_cond(rng, 4, 10.0)
    C = rng.standard_normal((2, 4, 4))
    for method in ("eig", "sign"):
        res = matsqrt.lyapunov(backend.asarray(B, dtype), backend.asarray(C, dtype), method=method)
        X = to_host(res.X).astype(float)
        assert X.shape == (2, 4, 4)
        for c, x in zip(C, X):
            assert rel(x, scipy.linalg.solve_sylvester(B, B, c)) < 1e3 * TOL[dtype]
    with pytest.raises(ValueError, match="not symmetric"):
        matsqrt.lyapunov(backend.asarray(B + np.triu(B, 1), dtype),
                         backend.asarray(C, dtype), method="eig")
    Bs = np.diag([1.0, -1.0, 2.0, 3.0])                  # b_1 + b_2 = 0: singular
    with pytest.raises(ValueError, match="singular"):
        matsqrt.lyapunov(backend.asarray(Bs, dtype), backend.asarray(C, dtype), method="eig")


def test_lyapunov_sign_reports_a_wrong_equation(rng):
    """A B with eigenvalues in both half-planes: the sign iteration converges to
    the sign of another matrix; the residual exposes it and converged is False."""
    B = np.diag([2.0, -1.0, 3.0])
    C = rng.standard_normal((3, 3))
    with pytest.warns(ConvergenceWarning):
        res = matsqrt.lyapunov(B, C, method="sign")
    assert not bool(res.converged) and float(res.residual) > 1e-3



@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 1e-5)])
def test_lyapunov_sign_with_a_spectrum_far_from_the_real_axis(dtype, tol):
    """Eigenvalues 1 +- 1.5i (and a batch member with 1 +- 10i) lie in the
    right half-plane but outside Newton-Schulz's region of convergence."""
    B = np.array([[[1.0, 1.5], [-1.5, 1.0]], [[1.0, 10.0], [-10.0, 1.0]],
                  [[3.0, 1.0], [0.5, 2.0]]], dtype)
    C = np.stack([np.eye(2), [[1.0, 2.0], [0.0, -1.0]], [[1.0, 0.0], [2.0, 1.0]]]).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = matsqrt.lyapunov(B, C, method="sign")
    assert bool(np.all(res.converged))
    for i in range(3):
        want = scipy.linalg.solve_continuous_lyapunov(B[i].astype(np.float64), C[i].astype(np.float64))
        got = np.asarray(res.X[i], np.float64)
        assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want)

def test_block_sign_identity(backend, dtype, rng):
    """sign([[B, C], [0, -B^T]]) = [[I, 2X], [0, -I]] with B X + X B^T = C:
    refimpl.matrix_sign on the block, the structured lyapunov(), and scipy."""
    n = 4
    B = positive_stable(rng, n)
    C = rng.standard_normal((n, n))
    M = np.block([[B, C], [np.zeros((n, n)), -B.T]])
    sgn = to_host(matsqrt.matrix_sign(backend.asarray(M, dtype)).sign).astype(float)
    X = scipy.linalg.solve_sylvester(B, B.T, C)
    expect = np.block([[np.eye(n), 2 * X], [np.zeros((n, n)), -np.eye(n)]])
    assert rel(sgn, expect) < 1e3 * TOL[dtype]
    Xl = to_host(matsqrt.lyapunov(backend.asarray(B, dtype), backend.asarray(C, dtype)).X)
    assert rel(Xl, X) < 1e3 * TOL[dtype]
    assert rel(sgn, scipy.linalg.signm(M)) < 1e3 * TOL[dtype]


def test_matrix_sign_convergence_reporting(rng):
    M = spd(rng, [1.0, 0.0, 2.0]) - np.diag([0.0, 0.0, 0.0])       # a zero eigenvalue
    with pytest.warns(ConvergenceWarning, match="matrix_sign did not converge"):
        r = matsqrt.matrix_sign(M, max_iter=30)
    assert not bool(r.converged) and int(r.n_iter) == 30
    r = matsqrt.matrix_sign(np.diag([3.0, -0.5]), iters=12)
    assert np.allclose(r.sign, np.diag([1.0, -1.0])) and int(r.n_iter) == 12


# --------------------------------------------------------------------------
# Bad input and warnings
# --------------------------------------------------------------------------

GOOD = np.array([[2.0, 0.5], [0.5, 1.0]])


@pytest.mark.parametrize("A, exc, match", [
    (np.ones((2, 3)), ValueError, "square"),
    (np.ones(3), ValueError, "at least 2 dimensions"),
    (np.zeros((0, 0)), ValueError, "empty"),
    (np.array([[2.0, 1.0], [0.0, 1.0]]), ValueError, "not symmetric"),
    (np.array([[1.0, 2.0], [2.0, 1.0]]), ValueError, "not symmetric positive"),
    (np.array([[np.nan, 0.0], [0.0, 1.0]]), ValueError, "NaN or Inf"),
    (np.array([[np.inf, 0.0], [0.0, 1.0]]), ValueError, "NaN or Inf"),
    (np.zeros((2, 2)), ValueError, "zero matrix"),
    ([[1.0, 0.0], [0.0, 1.0]], TypeError, "must be an array"),
    (np.eye(2, dtype=int), TypeError, "dtype"),
])
@pytest.mark.parametrize("fn", [matsqrt.sqrtm, matsqrt.inv_sqrtm], ids=["sqrtm", "inv_sqrtm"])
@pytest.mark.parametrize("method", matsqrt.SQRT_METHODS)
def test_bad_input(fn, method, A, exc, match):
    with pytest.raises(exc, match=match):
        fn(A, method=method)


def test_bad_input_names_the_batch_member(backend):
    A = np.stack([GOOD, GOOD, np.diag([1.0, -0.5])])
    for method in ("mpa", "eig"):
        with pytest.raises(ValueError, match=r"smallest eigenvalue -5\.000e-01.*member \(2,\)"):
            matsqrt.sqrtm(backend.asarray(A, "float64"), method=method)
    A = np.stack([GOOD, GOOD + np.array([[0.0, 1e-3], [0.0, 0.0]])])
    with pytest.raises(ValueError, match=r"not symmetric.*member \(1,\)"):
        matsqrt.sqrtm(backend.asarray(A, "float64"))
    # asymmetry within the tolerance is accepted (and its symmetric part used)
    r = matsqrt.sqrtm(backend.asarray(GOOD + np.array([[0.0, 1e-12], [0.0, 0.0]]), "float64"))
    assert np.array_equal(to_host(r.A), to_host(r.A).T)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"method": "svd"}, ValueError, "argument 'method'"),
    ({"method": "mtp", "order": 3}, ValueError, "'order' applies to method 'mpa'"),
    ({"method": "mpa", "degree": 3}, ValueError, "'degree' applies to method 'mtp'"),
    ({"method": "mpa", "order": 0}, ValueError, "'order' must be >= 1"),
    ({"method": "mpa", "order": 2.0}, TypeError, "'order' must be an int"),
    ({"method": "mpa", "basis": "y"}, ValueError, "'basis'"),
    ({"method": "eig", "basis": "x"}, ValueError, "'basis' applies"),
    ({"method": "mpa", "iters": 3}, ValueError, "apply to method 'ns'"),
    ({"method": "ns", "iters": 0}, ValueError, "'iters' must be >= 1"),
    ({"method": "ns", "tol": -1.0}, ValueError, "'tol'"),
    ({"method": "ns", "max_iter": 0}, ValueError, "'max_iter'"),
    ({"method": "mpa", "sym_tol": 0.0}, ValueError, "'sym_tol'"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        matsqrt.sqrtm(GOOD, **kwargs)


def test_bad_derivative_arguments():
    res = matsqrt.sqrtm(GOOD)
    ires = matsqrt.inv_sqrtm(GOOD)
    with pytest.raises(ValueError, match="'S_bar' has shape"):
        matsqrt.sqrtm_vjp(res, np.ones((3, 3)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        matsqrt.sqrtm_vjp(res, np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="argument 'method'"):
        matsqrt.sqrtm_vjp(res, np.ones((2, 2)), method="autograd")
    with pytest.raises(TypeError, match="must be a SqrtmResult"):
        matsqrt.sqrtm_vjp(ires, np.ones((2, 2)))
    with pytest.raises(TypeError, match="must be a InvSqrtmResult"):
        matsqrt.inv_sqrtm_jvp(res, np.ones((2, 2)))
    with pytest.raises(ValueError, match="apply to method 'lyapunov_sign'"):
        matsqrt.sqrtm_vjp(res, np.ones((2, 2)), method="exact", iters=3)
    with pytest.raises(TypeError, match="must be an array"):
        matsqrt.sqrtm_vjp(res, [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(TypeError, match="'S_bar' has dtype float32 but 'res.S' has float64"):
        matsqrt.sqrtm_vjp(res, np.ones((2, 2), np.float32))
    with pytest.raises(TypeError, match="'S_inv_bar' has dtype float32 but 'res.S_inv'"):
        matsqrt.inv_sqrtm_vjp(ires, np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="'C' has shape"):
        matsqrt.lyapunov(GOOD, np.ones((3, 3)))
    with pytest.raises(ValueError, match="'method'"):
        matsqrt.lyapunov(GOOD, GOOD, method="schur")
    with pytest.raises(ValueError, match="'M' must be square"):
        matsqrt.matrix_sign(np.ones((2, 3)))


def test_unconverged_forward_warns_and_its_vjp_warns(rng):
    A = spd_cond(rng, 5, 1e3)
    with pytest.warns(ConvergenceWarning, match="method='ns'"):
        res = matsqrt.sqrtm(A, method="ns", iters=3)
    assert not bool(res.converged) and float(res.error) > 1e-3
    with pytest.warns(ConvergenceWarning, match="forward did not converge"):
        matsqrt.sqrtm_vjp(res, np.ones((5, 5)), method="approximant")
    with pytest.warns(ConvergenceWarning, match="Lyapunov sign iteration did not converge"):
        matsqrt.sqrtm_vjp(matsqrt.sqrtm(A, method="eig"), np.ones((5, 5)),
                          method="lyapunov_sign", max_iter=4)


def test_inputs_are_not_modified(rng):
    A = spd_cond(rng, 4, 10.0)
    G = rng.standard_normal((4, 4))
    A0, G0 = A.copy(), G.copy()
    for method in matsqrt.SQRT_METHODS:
        for fn, vj in ((matsqrt.sqrtm, matsqrt.sqrtm_vjp),
                       (matsqrt.inv_sqrtm, matsqrt.inv_sqrtm_vjp)):
            res = fn(A, method=method)
            for vm in matsqrt.VJP_METHODS:
                vj(res, G, method=vm)
    assert np.array_equal(A, A0) and np.array_equal(G, G0)


# --------------------------------------------------------------------------
# The benchmark runs (smoke)
# --------------------------------------------------------------------------

def test_benchmark_quick_runs(capsys, load_benchmark):
    module = load_benchmark("matsqrt")
    assert module.main(["--quick", "--json", "", "--sizes", "4x8"]) == 0
    out = capsys.readouterr().out
    assert "mpa+lyapunov_sign" in out and "scipy loop" in out and "grad err" in out
