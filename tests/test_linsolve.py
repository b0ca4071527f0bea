"""refimpl.linsolve: closed forms and bad input (the registry covers the
oracle, adjoint, finite-difference and batch checks on every backend)."""

import numpy as np
import pytest

from refimpl import backend as B
from refimpl.linsolve import solve, solve_jvp, solve_vjp


def test_two_by_two_closed_form(backend, dtype):
    # Cramer: A^{-1} = [[d, -b], [-c, a]] / (ad - bc).  For L = x_1:
    # b_bar = A^{-T} e_1 = (d, -b)/det and A_bar = -b_bar x^T.
    a, b, c, d = 3.0, 1.0, -2.0, 4.0
    det = a * d - b * c
    rhs = np.array([1.0, 2.0])
    x = np.array([d * rhs[0] - b * rhs[1], a * rhs[1] - c * rhs[0]]) / det
    b_bar = np.array([d, -b]) / det
    res = solve(backend.asarray(np.array([[a, b], [c, d]]), dtype), backend.asarray(rhs, dtype))
    A_bar, got_b_bar = solve_vjp(res, backend.asarray(np.array([1.0, 0.0]), dtype))
    rtol = 1e-15 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(B.to_host(res.x), x, rtol=rtol)
    np.testing.assert_allclose(B.to_host(got_b_bar), b_bar, rtol=rtol)
    np.testing.assert_allclose(B.to_host(A_bar), -np.outer(b_bar, x), rtol=rtol)
    assert res.residual < (1e-15 if dtype == "float64" else 1e-6)


def test_jvp_of_scaling_is_closed_form(backend):
    # d/dt (A + t A)^{-1} b = -x at t = 0, since (1 + t)^{-1} x.
    A = backend.asarray(np.array([[2.0, 1.0], [0.5, 3.0]]))
    res = solve(A, backend.asarray(np.array([1.0, -1.0])))
    np.testing.assert_allclose(B.to_host(solve_jvp(res, A, None)), -B.to_host(res.x), rtol=1e-15)
    np.testing.assert_allclose(B.to_host(solve_jvp(res, None, res.b)), B.to_host(res.x), rtol=1e-15)


def test_broadcast_matrix_gets_summed_gradient(backend, rng):
    A = backend.asarray(rng.standard_normal((3, 3)) + 3 * np.eye(3))
    b = backend.asarray(rng.standard_normal((4, 3)))
    res = solve(A, b)
    assert tuple(res.x.shape) == (4, 3)
    x_bar = backend.asarray(rng.standard_normal((4, 3)))
    A_bar, b_bar = solve_vjp(res, x_bar)
    assert tuple(A_bar.shape) == (3, 3) and tuple(b_bar.shape) == (4, 3)
    total = sum(B.to_host(solve_vjp(solve(A, b[i, ...]), x_bar[i, ...])[0]) for i in range(4))
    np.testing.assert_allclose(B.to_host(A_bar), total, rtol=1e-13)


def test_bad_input(backend):
    A = backend.asarray(np.eye(3))
    b = backend.asarray(np.ones(3))
    with pytest.raises(ValueError, match="'A' must be square"):
        solve(backend.asarray(np.ones((3, 2))), b)
    with pytest.raises(ValueError, match="'b' has length 2"):
        solve(A, backend.asarray(np.ones(2)))
    with pytest.raises(ValueError, match="batch shapes of 'A' \\(2,\\) and 'b' \\(3,\\)"):
        solve(backend.asarray(np.ones((2, 3, 3))), backend.asarray(np.ones((3, 3))))
    with pytest.raises(ValueError, match="'A' is singular"):
        solve(backend.asarray(np.ones((3, 3))), b)
    with pytest.raises(TypeError, match="'A' must be an array.*list"):
        solve([[1.0]], b)
    with pytest.raises(ValueError, match="'b' contains NaN or Inf"):
        solve(A, backend.asarray(np.array([1.0, np.nan, 0.0])))
    with pytest.raises(TypeError, match="'A' has dtype int64"):
        solve(backend.xp.asarray(np.eye(3, dtype=np.int64), device=backend.device), b)
    with pytest.raises(ValueError, match="'x_bar' has shape \\(2,\\), expected \\(3,\\)"):
        solve_vjp(solve(A, b), backend.asarray(np.ones(2)))
