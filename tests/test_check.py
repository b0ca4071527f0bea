"""refimpl.check on functions whose Jacobians are known in closed form,
and on planted wrong derivatives that it must reject."""

import numpy as np
import pytest

from refimpl import backend as B
from refimpl.check import (DEFAULT_RTOL, adjoint_test, compare, fd_directional, fd_jacobian,
                           fd_jacobian_check)


# f(A, X) = (A @ X, <A, A>) with
#   JVP:  (dA X + A dX, 2 <A, dA>)
#   VJP:  (Y_bar X^T + 2 s_bar A, A^T Y_bar)
def _f(A, X):
    xp = B.namespace(A=A, X=X)
    return A @ X, xp.sum(A * A)


def _jvp(A, X):
    def jvp(dA, dX):
        xp = B.namespace(A=A)
        return dA @ X + A @ dX, 2.0 * xp.sum(A * dA)
    return jvp


def _vjp(A, X):
    def vjp(Y_bar, s_bar):
        return Y_bar @ B.mT(X) + 2.0 * s_bar * A, B.mT(A) @ Y_bar
    return vjp


def _wrong_vjps(A, X):
    return {
        "missing_transpose": lambda Y, s: (Y @ X + 2.0 * s * A, B.mT(A) @ Y),
        "wrong_sign": lambda Y, s: (-(Y @ B.mT(X)) - 2.0 * s * A, B.mT(A) @ Y),
        "missing_factor_2": lambda Y, s: (Y @ B.mT(X) + s * A, B.mT(A) @ Y),
        "dropped_input": lambda Y, s: (Y @ B.mT(X) + 2.0 * s * A, None),
    }


def _point(backend, dtype, rng):
    A = backend.asarray(rng.standard_normal((3, 3)), dtype)
    X = backend.asarray(rng.standard_normal((3, 3)), dtype)
    u = (backend.asarray(rng.standard_normal((3, 3)), dtype),
         backend.asarray(rng.standard_normal((3, 3)), dtype))
    v = (backend.asarray(rng.standard_normal((3, 3)), dtype),
         backend.asarray(np.array(rng.standard_normal()), dtype))
    return A, X, u, v


def test_correct_pair_passes(backend, dtype, rng):
    A, X, u, v = _point(backend, dtype, rng)
    r = adjoint_test(_jvp(A, X), _vjp(A, X), u, v)
    assert r.passed and r.tol == DEFAULT_RTOL[dtype], r
    assert r.error < (1e-14 if dtype == "float64" else 1e-6)
    A64, X64 = (backend.asarray(B.to_host(t), "float64") for t in (A, X))
    for r in fd_jacobian_check(_f, (A64, X64), u, cotangents=v, vjp=_vjp(A, X), jvp=_jvp(A, X)):
        assert r.passed, r


@pytest.mark.parametrize("bug", list(_wrong_vjps(None, None)))
def test_planted_wrong_vjp_is_caught(bug, backend, rng):
    A, X, u, v = _point(backend, "float64", rng)
    wrong = _wrong_vjps(A, X)[bug]
    assert not adjoint_test(_jvp(A, X), wrong, u, v).passed
    (fd,) = fd_jacobian_check(_f, (A, X), u, cotangents=v, vjp=wrong)
    assert not fd.passed and fd.error > 1e-3, fd


def test_planted_wrong_jvp_is_caught(backend, rng):
    A, X, u, v = _point(backend, "float64", rng)

    def wrong_jvp(dA, dX):                       # forgets the dA X term
        xp = B.namespace(A=A)
        return A @ dX, 2.0 * xp.sum(A * dA)

    assert not adjoint_test(wrong_jvp, _vjp(A, X), u, v).passed
    (fd,) = fd_jacobian_check(_f, (A, X), u, jvp=wrong_jvp)
    assert not fd.passed


def test_richardson_reaches_round_off(backend):
    # d/dt exp(x + t u) = exp(x) u, known exactly.
    xh = np.linspace(-1.0, 2.0, 7)
    x, u = backend.asarray(xh), backend.asarray(np.ones(7))
    xp = backend.xp
    exact = np.exp(xh)
    (d1,), _ = fd_directional(xp.exp, x, u, levels=1)
    (d3,), est = fd_directional(xp.exp, x, u, levels=3)
    err1 = np.max(np.abs(B.to_host(d1) - exact) / exact)
    err3 = np.max(np.abs(B.to_host(d3) - exact) / exact)
    assert err1 > 1e-8          # plain central differences: O(h^2) ~ 1e-7 at h ~ 2e-3
    assert err3 < 1e-11         # two Richardson levels: O(h^6) + round-off
    assert est < 1e-9


def test_fd_jacobian_matches_closed_form(backend):
    # F(x) = sin(x) * reverse(x): J = diag(cos(x) * rev(x)) + diag(sin(x)) P, P the reversal.
    xh = np.array([0.3, -1.2, 0.8])
    xp = backend.xp
    J = np.diag(np.cos(xh) * xh[::-1]) + np.diag(np.sin(xh)) @ np.eye(3)[::-1]
    got = fd_jacobian(lambda x: xp.sin(x) * xp.flip(x), backend.asarray(xh))
    np.testing.assert_allclose(got, J, atol=1e-11)


def test_tangent_none_holds_input_fixed(backend, rng):
    A, X, u, v = _point(backend, "float64", rng)
    rs = fd_jacobian_check(_f, (A, X), (u[0], None), cotangents=v, vjp=_vjp(A, X),
                           jvp=lambda dA, dX: _jvp(A, X)(dA, backend.xp.zeros_like(X)))
    assert all(r.passed for r in rs), rs


def test_compare_semantics(backend):
    e = backend.asarray(np.array([1.0, -2.0, 0.0]))
    assert compare(backend.asarray(np.array([1.0, -2.0, 1e-12])), e).passed
    r = compare(backend.asarray(np.array([1.0, -2.1, 0.0])), e)
    assert not r.passed and r.error == pytest.approx(0.05)
    # normwise: a 1e-12 error on a zero entry is judged against max |e| = 2.
    z = backend.asarray(np.zeros(3))
    assert not compare(backend.asarray(np.array([0.0, 1e-12, 0.0])), z).passed
    assert compare(backend.asarray(np.array([0.0, 1e-12, 0.0])), z, atol=1e-11).passed
    nan = compare(backend.asarray(np.array([1.0, np.nan, 0.0])), e)
    assert not nan.passed and "NaN" in nan.detail
    assert compare((e, e), (e, e)).passed


def test_compare_errors():
    with pytest.raises(ValueError, match="'actual' has shape \\(2,\\) but 'expected' has shape \\(3,\\)"):
        compare(np.ones(2), np.ones(3))
    with pytest.raises(TypeError, match="'actual' must be an array"):
        compare([1.0, 2.0], np.ones(2))
    with pytest.raises(ValueError, match="'expected' contains NaN"):
        compare(np.ones(2), np.array([1.0, np.nan]))


def test_harness_rejects_bad_input(rng):
    M = rng.standard_normal((3, 3))
    jvp, vjp = (lambda u: M @ u), (lambda v: M.T @ v)
    u, v = rng.standard_normal(3), rng.standard_normal(3)
    with pytest.raises(TypeError, match="'tangents' must be an array or a tuple of arrays, got list"):
        adjoint_test(jvp, vjp, [1.0, 2.0, 3.0], v)
    with pytest.raises(ValueError, match="'cotangents' contains NaN or Inf"):
        adjoint_test(jvp, vjp, u, np.array([1.0, np.nan, 0.0]))
    with pytest.raises(TypeError, match="'tangents' has dtype int64"):
        adjoint_test(jvp, vjp, np.arange(3), v)
    with pytest.raises(ValueError, match="'jvp output' has shape \\(3,\\), expected \\(2,\\)"):
        adjoint_test(jvp, vjp, u, rng.standard_normal(2))
    with pytest.raises(ValueError, match="'tangents' has shape \\(2,\\), expected \\(3,\\)"):
        fd_jacobian_check(lambda x: M @ x, u, rng.standard_normal(2), jvp=jvp)
    with pytest.raises(ValueError, match="needs 'cotangents'"):
        fd_jacobian_check(lambda x: M @ x, u, u, vjp=vjp)
    with pytest.raises(ValueError, match="needs 'vjp' or 'jvp'"):
        fd_jacobian_check(lambda x: M @ x, u, u)
    with pytest.raises(ValueError, match="'inputs' contains NaN"):
        fd_jacobian_check(lambda x: M @ x, np.array([np.inf, 0, 0]), u, jvp=jvp)
