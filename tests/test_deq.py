"""Tests of refimpl.deq: fixed-point solvers, exact implicit gradients, phantom
gradients (UPG, NPG, JFB), their counts and the theory around them.

Expected values come from independent routes: dense NumPy linear algebra on
the host (explicit Jacobians, ``numpy.linalg.solve``, matrix powers), finite
differences of the forward, closed forms of linear fixed points, and
instrumented counters.  Every test that takes ``backend``/``dtype`` runs on
NumPy and array_api_strict (and on CuPy, marked ``gpu``, where available).
"""

import dataclasses
import doctest
import math
import warnings

import numpy as np
import pytest

from refimpl import backend as B
from refimpl import check, deq, registry
from refimpl.backend import ConditioningWarning, ConvergenceWarning

#: Relative tolerance of identities that hold exactly up to round-off.
RTOL = {"float64": 1e-10, "float32": 2e-4}


# --------------------------------------------------------------------------
# Host helpers (float64 NumPy, independent of refimpl.deq)
# --------------------------------------------------------------------------

def _layer(rng, d=6, p=4, batch=(), norm=0.7):
    W = rng.standard_normal((d, d))
    W *= norm / np.linalg.norm(W, 2)
    return {"x": rng.standard_normal(batch + (p,)), "W": W,
            "U": rng.standard_normal((d, p)) / math.sqrt(p), "b": 0.3 * rng.standard_normal(d)}


def _symmetric(rng, eigs):
    Q, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    return (Q * np.asarray(eigs)) @ Q.T


def _host_fixed_point(x, W, U, b, iters=5000):
    """Damped Picard in float64 on the host, then Newton polishing."""
    z = np.zeros(W.shape[0])
    c = U @ x + b
    for _ in range(iters):
        z = 0.5 * z + 0.5 * np.tanh(W @ z + c)
    for _ in range(5):
        fz = np.tanh(W @ z + c)
        z = z - np.linalg.solve(np.eye(len(z)) - (1 - fz ** 2)[:, None] * W, z - fz)
    return z


def _host_jacobians(x, W, U, b, z):
    """J = D W and F = D [U | I(x)z^T | I(x)x^T | I] for one member (float64)."""
    d = len(z)
    D = 1.0 - np.tanh(W @ z + U @ x + b) ** 2
    F = D[:, None] * np.concatenate(
        [U, np.kron(np.eye(d), z[None, :]), np.kron(np.eye(d), x[None, :]), np.eye(d)], axis=1)
    return D[:, None] * W, F


def _flat(bars):
    return np.concatenate([B.to_host(b).astype(np.float64).ravel() for b in bars])


def _arrays(backend, h, dtype):
    return [backend.asarray(h[k], dtype) for k in ("x", "W", "U", "b")]


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_forward_residual_and_host_fixed_point(backend, dtype, rng, method):
    h = _layer(rng)
    res = deq.tanh_deq(*_arrays(backend, h, dtype), method=method)
    z = B.to_host(res.z).astype(np.float64)
    assert res.converged and res.n_iter > 0                # one member: 0-d diagnostics
    assert tuple(res.n_iter.shape) == () and res.size == 1
    hz = {k: v.astype(dtype).astype(np.float64) for k, v in h.items()}
    fz = np.tanh(hz["W"] @ z + hz["U"] @ hz["x"] + hz["b"])
    tol = deq.DEFAULT_TOL[dtype]
    # the stopping rule ||f(z) - z|| <= tol ||f(z)||, recomputed on the host in float64
    assert np.linalg.norm(fz - z) <= 10 * tol * np.linalg.norm(fz)
    assert float(res.residual) <= tol * np.linalg.norm(fz) * 1.001
    # error is the relative residual ||f(z) - z|| / ||f(z)|| of the same iterate
    fz_res = B.to_host(res.solve.fz).astype(np.float64)
    assert float(res.error) == pytest.approx(float(res.residual) / np.linalg.norm(fz_res), rel=1e-5)
    zh = _host_fixed_point(hz["x"], hz["W"], hz["U"], hz["b"])
    assert np.max(np.abs(z - zh)) <= {"float64": 1e-11, "float32": 1e-5}[dtype]


def test_linear_fixed_point_closed_form(backend, dtype, rng):
    """fixed_point on z = A z + c (||A|| < 1) gives (I - A)^{-1} c."""
    n = 7
    A = rng.standard_normal((n, n))
    A *= 0.8 / np.linalg.norm(A, 2)
    c = rng.standard_normal((3, n))
    expected = np.linalg.solve(np.eye(n) - A, c.T).T
    Ab, cb = backend.asarray(A, dtype), backend.asarray(c, dtype)
    for method in ("picard", "anderson"):
        res = deq.fixed_point(lambda z: z @ B.mT(Ab) + cb, backend.xp.zeros_like(cb),
                              method=method)
        assert res.all_converged
        assert check.compare(res.z, backend.asarray(expected, dtype),
                             rtol={"float64": 1e-11, "float32": 1e-4}[dtype]).passed
        # the convergence test is read every sync_cadence(8) calls: 1 on the host
        extra = backend.policy.sync_cadence(8) - 1
        assert res.max_n_iter + 1 <= res.n_f_evals <= res.max_n_iter + 1 + extra


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_batch_equals_loop(backend, dtype, rng, method):
    h = _layer(rng, batch=(5,))
    h["x"] *= np.array([1e-6, 1e-2, 1.0, 3.0, 10.0])[:, None]
    x, W, U, b = _arrays(backend, h, dtype)
    res = deq.tanh_deq(x, W, U, b, method=method)
    zb = B.to_host(res.z)
    iters = B.to_host(res.n_iter)
    assert iters.shape == (5,) and B.to_host(res.converged).shape == (5,)
    for i in range(5):
        ri = deq.tanh_deq(backend.asarray(h["x"][i], dtype), W, U, b, method=method)
        # members are frozen when they converge, so the trajectories coincide
        assert int(ri.n_iter) == iters[i]
        np.testing.assert_allclose(zb[i], B.to_host(ri.z), rtol=0,
                                   atol={"float64": 1e-15, "float32": 1e-6}[dtype])
    assert res.max_n_iter == iters.max() and len(set(iters.tolist())) > 1


def test_check_every_changes_only_the_evaluation_count(rng):
    h = _layer(rng, batch=(4,))
    a = [np.asarray(h[k]) for k in ("x", "W", "U", "b")]
    r1 = deq.tanh_deq(*a, check_every=1)
    r8 = deq.tanh_deq(*a, check_every=8)
    np.testing.assert_array_equal(r1.z, r8.z)
    for name in ("n_iter", "error", "converged", "residual"):
        np.testing.assert_array_equal(getattr(r1, name), getattr(r8, name))
    assert r1.n_f_evals == r1.max_n_iter + 1
    # f(z0), then one evaluation per update; the host reads after every 8th update
    assert (r8.n_f_evals - 1) % 8 == 0 and r1.n_f_evals <= r8.n_f_evals < r1.n_f_evals + 8


def test_float32_anderson_with_one_state_dimension():
    """d = 1: the Gram matrix of the differences has rank 1; its shift must
    exceed float32's round-off or the batched solve is singular."""
    x = np.array([[0.6315567], [-1.4793808], [-1.3048428]], np.float32)
    W, U = np.array([[-0.8208158]], np.float32), np.array([[-1.3432862]], np.float32)
    b = np.array([-0.18154433], np.float32)
    res = deq.tanh_deq(x, W, U, b)
    assert res.all_converged
    # Independent route: Picard in float64 (a contraction, |W| < 1).
    z = np.zeros((3, 1))
    for _ in range(2000):
        z = np.tanh(z @ W.T.astype(np.float64) + x.astype(np.float64) @ U.T.astype(np.float64) + b)
    np.testing.assert_allclose(np.asarray(res.z, np.float64), z, rtol=0, atol=1e-4)


def test_anderson_step_falls_back_to_picard_where_its_system_fails():
    z, g = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[0.5, -0.5], [0.25, 0.25]])
    dZ = np.ones((2, 1, 2))
    dG = np.array([[[np.inf, 1.0]], [[1.0, 2.0]]])            # member 0 cannot be solved
    out = deq._anderson_step(z, g, dZ, dG, 0.5, 1e-10)
    np.testing.assert_array_equal(out[0], z[0] + 0.5 * g[0])
    assert np.all(np.isfinite(out[1]))


@pytest.mark.parametrize("lam, m", [(1.0, 5), (0.5, 3), (0.8, 1)])
def test_anderson_iterates_follow_their_definition(backend, rng, lam, m):
    """The first iterates equal a host transcription of type-II Anderson
    (Walker & Ni 2011): z_{k+1} = z_k + lam g_k - (dZ + lam dG) gamma,
    gamma = argmin ||g_k - dG gamma|| over the last m differences."""
    h = _layer(rng, d=6, p=3, norm=0.9)
    c = h["U"] @ h["x"] + h["b"]
    f = lambda z: np.tanh(h["W"] @ z + c)  # noqa: E731
    zs, gs = [np.zeros(6)], []
    for it in range(6):
        gs.append(f(zs[-1]) - zs[-1])
        if it == 0:
            zs.append(zs[0] + lam * gs[0])
            continue
        dZ = np.diff(np.array(zs), axis=0)[-m:]
        dG = np.diff(np.array(gs), axis=0)[-m:]
        gamma = np.linalg.lstsq(dG.T, gs[-1], rcond=None)[0]
        zs.append(zs[-1] + lam * gs[-1] - (dZ + lam * dG).T @ gamma)
    arrays = _arrays(backend, h, "float64")
    for n in range(1, 7):
        res = deq.tanh_deq(*arrays, lam=lam, m=m, max_iter=n, warn=False)
        np.testing.assert_allclose(B.to_host(res.z), zs[n], rtol=0, atol=1e-7)


def test_anderson_beats_picard_near_non_contractive(rng):
    d, p = 8, 3
    W = _symmetric(rng, np.linspace(-0.5, 0.99, d))
    x, U, b = rng.standard_normal(p), 0.05 * rng.standard_normal((d, p)), np.zeros(d)
    ra = deq.tanh_deq(x, W, U, b, method="anderson")
    rp = deq.tanh_deq(x, W, U, b, method="picard", max_iter=5000)
    assert ra.converged and rp.converged
    assert int(ra.n_iter) < int(rp.n_iter) / 5
    np.testing.assert_allclose(ra.z, rp.z, atol=1e-9)


# --------------------------------------------------------------------------
# Exact gradient: finite differences and a dense closed form
# --------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["dense", "anderson", "picard"])
def test_exact_vjp_against_finite_differences(backend, rng, solver):
    h = _layer(rng, batch=(3,))
    arrays = _arrays(backend, h, "float64")
    res = deq.tanh_deq(*arrays)
    g = backend.asarray(rng.standard_normal((3, 6)), "float64")
    tangents = check.random_like(rng, arrays)

    def f(*xs):
        return deq.tanh_deq(*xs, tol=1e-14).z

    kw = {} if solver == "dense" else {"tol": 1e-13}
    (r,) = check.fd_jacobian_check(f, tuple(arrays), tangents, cotangents=g,
                                   vjp=lambda v: deq.deq_vjp(res, v, solver=solver, **kw),
                                   tol=1e-9)
    assert r.passed, str(r)


def test_exact_dz_db_is_dense_implicit_jacobian(rng):
    """dz/db from finite differences equals (I - D W)^{-1} D, column by column,
    and the VJP gives its transpose."""
    h = _layer(rng, d=5, p=3)
    res = deq.tanh_deq(h["x"], h["W"], h["U"], h["b"])
    fd = check.fd_jacobian(lambda b: deq.tanh_deq(h["x"], h["W"], h["U"], b, tol=1e-14).z, h["b"])
    J, F = _host_jacobians(h["x"], h["W"], h["U"], h["b"], res.z)
    D = np.diag(F[:, -5:])
    expected = np.linalg.solve(np.eye(5) - J, np.diag(D))
    np.testing.assert_allclose(fd, expected, rtol=0, atol=1e-9)
    rows = [deq.deq_vjp(res, e)[3] for e in np.eye(5)]
    np.testing.assert_allclose(np.stack(rows), expected, atol=1e-13)


def test_scalar_closed_form():
    """d = p = 1: z_bar D (z, x, 1) / (1 - w D) and u D/(1 - w D) for x."""
    w, u_, b_, x_ = 0.6, 1.3, -0.2, 0.8
    res = deq.tanh_deq(np.array([x_]), np.array([[w]]), np.array([[u_]]), np.array([b_]))
    z = res.z[0]
    D = 1 - np.tanh(w * z + u_ * x_ + b_) ** 2
    s = 2.0 * D / (1 - w * D)                    # z_bar = 2
    x_bar, W_bar, U_bar, b_bar = deq.deq_vjp(res, np.array([2.0]))
    np.testing.assert_allclose([x_bar[0], W_bar[0, 0], U_bar[0, 0], b_bar[0]],
                               [s * u_, s * z, s * x_, s], rtol=1e-13)
    dz = deq.deq_jvp(res, db=np.array([1.0]))
    np.testing.assert_allclose(dz[0], D / (1 - w * D), rtol=1e-13)


def test_exact_iterative_matches_dense_for_large_d(rng):
    h = _layer(rng, d=160, p=8, batch=(2,), norm=0.9)
    res = deq.tanh_deq(*[h[k] for k in ("x", "W", "U", "b")])
    g = rng.standard_normal((2, 160))
    auto = deq.deq_backward(res, g)                    # d > DENSE_MAX_D: Anderson
    dense = deq.deq_backward(res, g, solver="dense")
    assert auto.solver == "anderson" and dense.solver == "dense"
    assert auto.all_converged and auto.n_vjp_z == auto.max_n_iter + 1
    assert deq.gradient_agreement(auto.theta_bar, dense.theta_bar).rel_error < 1e-10


# --------------------------------------------------------------------------
# Phantom gradients: defining formulas and stated properties
# --------------------------------------------------------------------------

@pytest.fixture
def instance(rng):
    """A batch of 2 on a contractive layer with its host Jacobians."""
    h = _layer(rng, batch=(2,))
    res = deq.tanh_deq(h["x"], h["W"], h["U"], h["b"], tol=1e-14)
    g = rng.standard_normal((2, 6))
    jac = [_host_jacobians(h["x"][i], h["W"], h["U"], h["b"], res.z[i]) for i in range(2)]
    return h, g, jac


def _host_bars(h, u_list, jac):
    """theta_bar = sum_i F_i^T u_i, split back into (x_bar, W_bar, U_bar, b_bar)."""
    p, d = h["U"].shape[1], h["W"].shape[0]
    flat = [F.T @ u for (J, F), u in zip(jac, u_list)]
    x_bar = np.stack([f[:p] for f in flat])
    rest = sum(f[p:] for f in flat)
    return (x_bar, rest[:d * d].reshape(d, d), rest[d * d:d * d + d * p].reshape(d, p),
            rest[d * d + d * p:])


def _layer_arrays(backend, h, dtype):
    return [backend.asarray(h[k], dtype) for k in ("x", "W", "U", "b")]


@pytest.mark.parametrize("k, lam", [(1, 1.0), (2, 0.5), (5, 0.7), (9, 1.0)])
def test_npg_closed_form(backend, dtype, instance, k, lam):
    h, g, jac = instance
    res = deq.tanh_deq(*_layer_arrays(backend, h, dtype))
    bars = deq.deq_vjp(res, backend.asarray(g, dtype), method="neumann", k=k, lam=lam)
    uk = []
    for (J, F), gi in zip(jac, g):
        Bt = (lam * J + (1 - lam) * np.eye(6)).T
        uk.append(lam * sum(np.linalg.matrix_power(Bt, i) @ gi for i in range(k)))
    assert check.compare(tuple(bars), _host_bars(h, uk, jac), rtol=RTOL[dtype]).passed


@pytest.mark.parametrize("k, lam", [(1, 0.4), (3, 0.5), (6, 1.0)])
def test_upg_equals_npg_at_the_fixed_point(backend, dtype, instance, k, lam):
    h, g, _ = instance
    res = deq.tanh_deq(*_layer_arrays(backend, h, dtype))
    gb = backend.asarray(g, dtype)
    upg = deq.deq_vjp(res, gb, method="unroll", k=k, lam=lam)
    npg = deq.deq_vjp(res, gb, method="neumann", k=k, lam=lam)
    assert check.compare(upg, npg, rtol={"float64": 1e-10, "float32": 2e-3}[dtype]).passed


def test_upg_differs_from_npg_linearly_in_the_start_error(rng):
    """Started at z* + delta, UPG - NPG = O(||delta||): halving delta halves it."""
    h = _layer(rng)
    res = deq.tanh_deq(h["x"], h["W"], h["U"], h["b"], tol=1e-14)
    f_vjp = deq._tanh_linearization(h["x"], h["W"], h["U"], h["b"])
    g, e = rng.standard_normal(6), rng.standard_normal(6)
    npg = deq.implicit_vjp(f_vjp, res.z, g, method="neumann", k=4, lam=0.6).theta_bar
    gaps = []
    for delta in (1e-3, 5e-4, 2.5e-4):
        upg = deq.implicit_vjp(f_vjp, res.z + delta * e, g, method="unroll", k=4, lam=0.6)
        gaps.append(np.linalg.norm(_flat(upg.theta_bar) - _flat(npg)))
    assert gaps[0] > 1e-6                                # not equal away from z*
    np.testing.assert_allclose(gaps[0] / gaps[1], 2.0, rtol=2e-2)
    np.testing.assert_allclose(gaps[1] / gaps[2], 2.0, rtol=2e-2)


@pytest.mark.parametrize("per_member_W", [False, True])
@pytest.mark.parametrize("stackable", [False, True])
def test_upg_is_the_vjp_of_the_unrolled_map(rng, per_member_W, stackable):
    """Away from the fixed point UPG is still exactly the VJP of
    theta -> h_k(theta), k damped steps from a fixed h_0 (finite differences),
    whether the k parameter products are summed step by step or stacked."""
    h = _layer(rng, d=5, p=3, batch=(3,))
    if per_member_W:
        h["W"] = np.stack([h["W"], 0.5 * h["W"].T, -h["W"]])
    k, lam = 4, 0.6
    h0 = rng.standard_normal((3, 5))                     # far from z*

    def unrolled(x, W, U, b):
        hh = h0
        for _ in range(k):
            pre = np.einsum("...ij,...j->...i", W, hh) + np.einsum("...ij,...j->...i", U, x) + b
            hh = lam * np.tanh(pre) + (1.0 - lam) * hh
        return hh

    arrays = tuple(h[key] for key in ("x", "W", "U", "b"))
    f_vjp = deq._tanh_linearization(*arrays)

    def vjp(v):
        return deq.implicit_vjp(f_vjp, h0, v, method="unroll", k=k, lam=lam,
                                stackable=stackable).theta_bar

    (r,) = check.fd_jacobian_check(unrolled, arrays, check.random_like(rng, arrays),
                                   cotangents=rng.standard_normal((3, 5)), vjp=vjp, tol=1e-9)
    assert r.passed, str(r)


@pytest.mark.parametrize("k", [2, 5])
def test_layer_upg_stacks_its_parameter_products(backend, dtype, instance, k):
    """deq_backward forms UPG's sum_t F(h_t)^T v_t as one stacked product (shared W):
    same numbers and counts as the step-by-step sum of the generic path."""
    h, g, _ = instance
    arrays = _layer_arrays(backend, h, dtype)
    res = deq.tanh_deq(*arrays)
    gb = backend.asarray(g, dtype)
    stacked = deq.deq_backward(res, gb, method="unroll", k=k, lam=0.7)
    f_vjp = deq._tanh_linearization(*arrays)
    steps = deq.implicit_vjp(f_vjp, res.z, gb, method="unroll", k=k, lam=0.7, fz=res.solve.fz)
    assert check.compare(stacked.theta_bar, steps.theta_bar,
                         rtol={"float64": 1e-13, "float32": 1e-5}[dtype]).passed
    counts = ("n_f_evals", "n_vjp_z", "n_vjp_theta", "n_stored_linearizations")
    assert [getattr(stacked, c) for c in counts] == [getattr(steps, c) for c in counts] \
        == [k - 1, k - 1, k, k]


@pytest.mark.parametrize("lam", [0.25, 0.5, 1.0])
def test_k1_is_lam_times_jfb(backend, dtype, instance, lam):
    h, g, jac = instance
    res = deq.tanh_deq(*_layer_arrays(backend, h, dtype))
    gb = backend.asarray(g, dtype)
    jfb = deq.deq_vjp(res, gb, method="jfb")
    assert check.compare(jfb, _host_bars(h, list(g), jac), rtol=RTOL[dtype]).passed
    scaled = tuple(lam * j for j in jfb)
    for method in ("unroll", "neumann"):
        bars = deq.deq_vjp(res, gb, method=method, k=1, lam=lam)
        assert check.compare(bars, scaled, rtol=RTOL[dtype]).passed


@pytest.mark.parametrize("k, lam", [(1, 1.0), (3, 0.5), (8, 0.8)])
def test_error_identity(backend, dtype, instance, k, lam):
    """exact - NPG_k == F^T (B^T)^k u exactly."""
    h, g, jac = instance
    res = deq.tanh_deq(*_layer_arrays(backend, h, dtype))
    gb = backend.asarray(g, dtype)
    exact = deq.deq_vjp(res, gb)
    npg = deq.deq_vjp(res, gb, method="neumann", k=k, lam=lam)
    err = tuple(B.to_host(e) - B.to_host(p) for e, p in zip(exact, npg))
    v = []
    for (J, F), gi in zip(jac, g):
        u = np.linalg.solve((np.eye(6) - J).T, gi)
        v.append(np.linalg.matrix_power((lam * J + (1 - lam) * np.eye(6)).T, k) @ u)
    scale = np.max(np.abs(_flat(exact)))
    assert check.compare(err, _host_bars(h, v, jac), rtol=RTOL[dtype],
                         atol=RTOL[dtype] * scale).passed


def test_k_to_infinity_limit(instance):
    """NPG -> exact geometrically at rate rho(B) when rho(B) < 1."""
    h, g, jac = instance
    res = deq.tanh_deq(h["x"], h["W"], h["U"], h["b"], tol=1e-14)
    exact = _flat(deq.deq_vjp(res, g))
    for lam in (0.5, 1.0):
        rate = max(deq.neumann_rate(J, lam) for J, _ in jac)
        assert rate < 1
        errs = {k: np.linalg.norm(_flat(deq.deq_vjp(res, g, method="neumann", k=k, lam=lam)) - exact)
                for k in (5, 10, 20, 40, 200)}
        for k1, k2 in ((5, 10), (10, 20), (20, 40)):
            if errs[k2] < 1e-13 * np.linalg.norm(exact):
                continue                                 # at the round-off floor
            assert errs[k2] < errs[k1]
            # observed decay no slower than the spectral rate (up to a constant)
            assert errs[k2] <= 50 * errs[k1] * rate ** (k2 - k1)
        assert errs[200] <= 1e-12 * np.linalg.norm(exact)


# --------------------------------------------------------------------------
# Why damping exists: Jacobian eigenvalues below -1
# --------------------------------------------------------------------------

def test_non_contractive_case_needs_damping(rng):
    d, p = 6, 3
    W = _symmetric(rng, [-2.2, -1.6, -0.8, 0.0, 0.3, 0.5])
    x, U, b = rng.standard_normal(p), 0.2 * rng.standard_normal((d, p)), 0.05 * rng.standard_normal(d)

    # Forward: undamped Picard oscillates and is flagged; damped Picard converges.
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        bad = deq.tanh_deq(x, W, U, b, method="picard", lam=1.0, max_iter=300)
    assert not bad.converged and bad.residual > 1e-3
    good = deq.tanh_deq(x, W, U, b, method="picard", lam=0.5, max_iter=3000)
    assert good.converged

    # At the fixed point J = D W has an eigenvalue below -1 ...
    J = (1 - good.solve.fz ** 2)[:, None] * W
    mu = np.linalg.eigvals(J).real
    assert mu.min() < -1
    lam_max = deq.damping_threshold(J)
    np.testing.assert_allclose(lam_max, np.min(2 / (1 - mu)), rtol=1e-12)
    assert 0 < lam_max < 1
    assert deq.neumann_rate(J, 1.0) > 1 > deq.neumann_rate(J, 0.5)
    assert deq.neumann_rate(J, 0.999 * lam_max) < 1 < deq.neumann_rate(J, 1.001 * lam_max)

    # ... so undamped phantom gradients diverge as k grows, damped ones converge.
    g = rng.standard_normal(d)
    exact = _flat(deq.deq_vjp(good, g))
    err = lambda k, lam: np.linalg.norm(  # noqa: E731
        _flat(deq.deq_vjp(good, g, method="neumann", k=k, lam=lam)) - exact)
    assert err(40, 1.0) > 10 * err(10, 1.0) > 10 * np.linalg.norm(exact)
    assert err(200, 0.5) < 1e-10 * np.linalg.norm(exact)
    upg = deq.deq_vjp(good, g, method="unroll", k=200, lam=0.5)
    assert np.linalg.norm(_flat(upg) - exact) < 1e-8 * np.linalg.norm(exact)


def test_damping_threshold_random_instances(rng):
    for trial in range(20):
        n = int(rng.integers(2, 7))
        J = rng.standard_normal((n, n)) * rng.uniform(0.2, 1.5)
        mu = np.linalg.eigvals(J)
        if np.any(mu.real >= 1):
            assert deq.damping_threshold(J) == 0.0
            continue
        t = deq.damping_threshold(J)
        rho = lambda lam: np.max(np.abs(1 - lam * (1 - mu)))  # noqa: E731
        assert rho(0.99 * t) < 1 < rho(1.01 * t)
        assert math.isclose(deq.neumann_rate(J, min(1.0, 0.5 * t)), rho(min(1.0, 0.5 * t)),
                            rel_tol=1e-12)


# --------------------------------------------------------------------------
# Diagnostics: cosine, norm ratio, Theorem 1, the cosine bound
# --------------------------------------------------------------------------

def test_gradient_agreement_against_numpy(backend, rng):
    a = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    e = [rng.standard_normal((3, 2)), rng.standard_normal(4)]
    ag = deq.gradient_agreement(tuple(backend.asarray(v, "float64") for v in a),
                                tuple(backend.asarray(v, "float64") for v in e))
    fa, fe = np.concatenate([v.ravel() for v in a]), np.concatenate([v.ravel() for v in e])
    np.testing.assert_allclose(ag.cosine, fa @ fe / np.linalg.norm(fa) / np.linalg.norm(fe), rtol=1e-13)
    np.testing.assert_allclose(ag.norm_ratio, np.linalg.norm(fa) / np.linalg.norm(fe), rtol=1e-13)
    np.testing.assert_allclose(ag.rel_error, np.linalg.norm(fa - fe) / np.linalg.norm(fe), rtol=1e-13)
    with pytest.raises(ValueError, match="'exact' is zero"):       # every measure is relative to it
        deq.gradient_agreement(np.zeros(3), np.zeros(3))
    zero = deq.gradient_agreement(np.zeros(3), np.ones(3))          # a zero phantom: no alignment
    assert (zero.cosine, zero.norm_ratio, zero.rel_error) == (0.0, 0.0, 1.0)


def test_cosine_lower_bound_values():
    assert deq.cosine_lower_bound(0.0, 2.0) == 1.0
    assert deq.cosine_lower_bound(1.0, 3.0) == 0.5
    assert deq.cosine_lower_bound(3.0, 3.0) == -1.0
    with pytest.raises(ValueError, match="'E_norm'"):
        deq.cosine_lower_bound(-1.0, 1.0)


def _random_instance(rng, d, P, contraction):
    J = rng.standard_normal((d, d))
    J *= contraction / np.linalg.norm(J, 2)
    F = rng.standard_normal((d, P)) * rng.uniform(0.3, 3.0)
    return J, F


def test_theorem1_and_cosine_bound_on_random_instances(rng):
    """Whenever ||E|| <= sigma_min (the paper's sigma_min^2/sigma_max a fortiori),
    <A g, exact> >= 0 and cos >= (sigma_min - ||E||)/(sigma_min + ||E||) for
    every g tried; the paper's condition implies the sharp one."""
    n_paper = n_sharp = 0
    for trial in range(60):
        d = int(rng.integers(2, 6))
        P = d + int(rng.integers(0, 6))
        J, F = _random_instance(rng, d, P, rng.uniform(0.1, 0.95))
        M = np.linalg.inv(np.eye(d) - J.T)                 # exact = F^T M g
        smin = np.linalg.svd(F, compute_uv=False)[d - 1]
        # A phantom matrix with a prescribed error E: A = (F^T + E) M.
        E = rng.standard_normal((P, d))
        E *= 10 ** rng.uniform(-3, 0.15) * smin / np.linalg.norm(E, 2)
        for A in ((F.T + E) @ M,
                  deq.phantom_matrix(J, F, method="neumann", k=int(rng.integers(1, 6)),
                                     lam=rng.uniform(0.2, 1.0))):
            t = deq.theorem1_check(A, J, F)
            np.testing.assert_allclose(t.E_norm, np.linalg.norm(A @ (np.eye(d) - J.T) - F.T, 2),
                                       rtol=1e-12)
            sv = np.linalg.svd(F, compute_uv=False)
            np.testing.assert_allclose([t.sigma_min, t.sigma_max], [sv[-1], sv[0]], rtol=1e-12)
            np.testing.assert_allclose(t.paper_bound, sv[-1] ** 2 / sv[0], rtol=1e-12)
            assert t.paper_bound <= t.sigma_min + 1e-15
            assert (not t.paper_condition) or t.sharp_condition
            n_paper += t.paper_condition
            n_sharp += t.sharp_condition
            G = rng.standard_normal((d, 200))
            p, e = A @ G, F.T @ M @ G
            cos = np.sum(p * e, 0) / np.linalg.norm(p, axis=0) / np.linalg.norm(e, axis=0)
            if t.sharp_condition:
                assert np.all(np.sum(p * e, 0) >= -1e-12)
                assert np.all(cos >= t.cosine_bound - 1e-12)
            else:
                assert t.cosine_bound == -1.0
    assert n_paper > 5 and n_sharp > n_paper          # both branches exercised


def test_theorem1_bound_is_needed(rng):
    """Beyond ||E|| = sigma_min a phantom gradient can point against the exact one."""
    J, F = _random_instance(rng, 3, 5, 0.5)
    A = (F.T - 2.0 * F.T) @ np.linalg.inv(np.eye(3) - J.T)    # E = -2 F^T: p = -exact
    t = deq.theorem1_check(A, J, F)
    assert not t.sharp_condition and t.cosine_bound == -1.0
    g = rng.standard_normal(3)
    assert (A @ g) @ (F.T @ np.linalg.solve(np.eye(3) - J.T, g)) < 0


def test_theorem1_boundary_and_worst_case_cosine(rng):
    """Instances built on F's singular vectors, where the bounds are attained.

    With ``w`` the right singular vector of ``F^T`` for sigma_min (``e = F^T w
    = sigma_min u``) and ``g = (I - J^T) w``: ``E = -rho u w^T`` gives
    ``<p, e> = sigma_min (sigma_min - rho)``, which changes sign exactly at
    ``rho = sigma_min`` where ``sharp_condition`` flips; ``E w`` tangent to
    the ball of radius rho around ``e`` gives the smallest cosine any ``E`` of
    norm rho allows, ``sqrt(1 - (rho / sigma_min)^2)``, which
    ``cosine_bound`` must not exceed (it is lower: the bound is not tight).
    """
    for trial in range(20):
        d = int(rng.integers(2, 6))
        P = d + int(rng.integers(0, 5))
        J, F = _random_instance(rng, d, P, rng.uniform(0.1, 0.9))
        Uf, sv, Vt = np.linalg.svd(F.T)                # F^T = Uf diag(sv) Vt, sv descending
        smin, u, w = sv[-1], Uf[:, d - 1], Vt[d - 1]    # F^T w = smin u, ||w|| = 1
        M = np.linalg.inv(np.eye(d) - J.T)
        g = (np.eye(d) - J.T) @ w                       # exact adjoint (I - J^T)^{-1} g = w
        e = F.T @ w
        for factor in (0.999, 1.001):
            rho = factor * smin
            A = (F.T - rho * np.outer(u, w)) @ M
            t = deq.theorem1_check(A, J, F)
            np.testing.assert_allclose([t.E_norm, t.sigma_min], [rho, smin], rtol=1e-10)
            inner = (A @ g) @ e
            np.testing.assert_allclose(inner, smin * (smin - rho), rtol=1e-8)
            assert t.sharp_condition == (inner >= 0) == (factor < 1)
        q = rng.standard_normal(P)
        q -= (q @ u) * u
        q /= np.linalg.norm(q)
        for ratio in (0.1, 0.5, 0.9):
            rho = ratio * smin
            delta = rho * (-ratio * u + math.sqrt(1.0 - ratio ** 2) * q)   # ||delta|| = rho
            A = (F.T + np.outer(delta, w)) @ M
            p = A @ g
            cos = p @ e / (np.linalg.norm(p) * np.linalg.norm(e))
            np.testing.assert_allclose(cos, math.sqrt(1.0 - ratio ** 2), rtol=1e-9)
            t = deq.theorem1_check(A, J, F)
            np.testing.assert_allclose(t.cosine_bound, (1.0 - ratio) / (1.0 + ratio), rtol=1e-9)
            assert t.cosine_bound <= cos


def test_npg_theorem1_error_is_F_Bk(rng):
    """For NPG, E = -F^T (B^T)^k, so ||E|| <= ||F|| ||B^k|| -> 0 with k."""
    J, F = _random_instance(rng, 4, 7, 0.6)
    lam = 0.7
    Bt = (lam * J + (1 - lam) * np.eye(4)).T
    prev = math.inf
    for k in (1, 2, 4, 8, 16):
        A = deq.phantom_matrix(J, F, method="neumann", k=k, lam=lam)
        np.testing.assert_allclose(A @ (np.eye(4) - J.T) - F.T,
                                   -F.T @ np.linalg.matrix_power(Bt, k), atol=1e-12)
        t = deq.theorem1_check(A, J, F)
        assert t.E_norm < prev
        prev = t.E_norm
    assert t.paper_condition


def test_phantom_matrix_reproduces_the_vjps(instance):
    h, g, jac = instance
    res = deq.tanh_deq(h["x"], h["W"], h["U"], h["b"], tol=1e-14)
    Jd, Fd = deq.tanh_deq_jacobians(res)
    for i, (J, F) in enumerate(jac):
        np.testing.assert_allclose(Jd[i], J, atol=1e-14)
        np.testing.assert_allclose(Fd[i], F, atol=1e-14)
    member0 = dataclasses.replace(res, x=h["x"][0], z=res.z[0],
                                  solve=dataclasses.replace(res.solve, z=res.z[0], fz=res.solve.fz[0]))
    for method, kw in (("exact", {}), ("neumann", {"k": 3, "lam": 0.6}), ("jfb", {})):
        A = deq.phantom_matrix(Jd[0], Fd[0], method=method, **kw)
        bars = deq.deq_vjp(member0, g[0], method=method, **kw)
        np.testing.assert_allclose(_flat(bars), A @ g[0], atol=1e-12)


# --------------------------------------------------------------------------
# Counts of f evaluations, VJPs and stored linearisations
# --------------------------------------------------------------------------

class _Counted:
    """A user f (z = 0.5 tanh(M z) + c) with instrumented evaluation and VJP counters."""

    def __init__(self, M, c):
        self.M, self.c = M, c
        self.f = self.vz = self.vt = 0
        self.alive_max = 0
        self._alive = 0

    def __call__(self, h):
        self.f += 1
        fh = 0.5 * np.tanh(h @ self.M.T) + self.c
        D = 0.5 * (1 - np.tanh(h @ self.M.T) ** 2)

        def vjp_z(v):
            self.vz += 1
            return (D * v) @ self.M

        def vjp_theta(v):
            self.vt += 1
            return (v.sum(axis=tuple(range(v.ndim - 1))),)   # c_bar

        return deq.Linearization(fh, vjp_z, vjp_theta)


@pytest.mark.parametrize("method, kw", [("exact", {"solver": "anderson"}),
                                        ("exact", {"solver": "picard"}),
                                        ("exact", {"solver": "dense"}),
                                        ("unroll", {"k": 5, "lam": 0.5}),
                                        ("neumann", {"k": 5, "lam": 0.5}),
                                        ("jfb", {})])
def test_counts_match_instrumented_calls(rng, method, kw):
    n = 5
    M = rng.standard_normal((n, n))
    M *= 1.2 / np.linalg.norm(M, 2)
    user = _Counted(M, rng.standard_normal(n))
    fp = deq.fixed_point(lambda z: user(z).fz, np.zeros((2, n)))
    assert user.f == fp.n_f_evals
    user.f = 0
    out = deq.implicit_vjp(user, fp, rng.standard_normal((2, n)), method=method, **kw)
    assert (out.n_f_evals, out.n_vjp_z, out.n_vjp_theta) == (user.f, user.vz, user.vt)
    expected = {"unroll": (5, 4, 5, 5), "neumann": (1, 4, 1, 1), "jfb": (1, 0, 1, 1)}
    if method in expected:
        assert (out.n_f_evals, out.n_vjp_z, out.n_vjp_theta, out.n_stored_linearizations) == expected[method]
    elif kw["solver"] == "dense":
        assert out.n_vjp_z == n                      # J built from n basis VJPs
    else:
        assert out.n_vjp_z == out.max_n_iter + 1 and out.max_n_iter > 3 and out.all_converged
    assert out.n_vjp == out.n_vjp_z + out.n_vjp_theta


def test_generic_implicit_vjp_against_finite_differences(rng):
    """The user f of _Counted: exact c_bar = (I - J^T)^{-1} g summed, checked by FD."""
    n = 4
    M = rng.standard_normal((n, n))
    M *= 1.5 / np.linalg.norm(M, 2)
    c = rng.standard_normal(n)
    g = rng.standard_normal(n)

    def solve(cc):
        return deq.fixed_point(lambda z: 0.5 * np.tanh(z @ M.T) + cc, np.zeros(n), tol=1e-14).z

    z = solve(c)
    (c_bar,) = deq.implicit_vjp(_Counted(M, c), z, g).theta_bar
    fd = check.fd_jacobian(solve, c)                 # dz/dc
    np.testing.assert_allclose(c_bar, fd.T @ g, rtol=1e-9)


def test_stored_linearizations_grow_with_k_only_for_unroll(instance):
    h, g, _ = instance
    res = deq.tanh_deq(h["x"], h["W"], h["U"], h["b"])
    for k in (1, 4, 9):
        up = deq.deq_backward(res, g, method="unroll", k=k, lam=0.5)
        ne = deq.deq_backward(res, g, method="neumann", k=k, lam=0.5)
        assert (up.n_stored_linearizations, ne.n_stored_linearizations) == (k, 1)
        # the forward's last evaluation f(z*) is reused: one evaluation fewer
        assert (up.n_f_evals, ne.n_f_evals) == (k - 1, 0)


def test_reusing_the_forward_evaluation_changes_nothing_but_the_count(instance):
    h, g, _ = instance
    res = deq.tanh_deq(h["x"], h["W"], h["U"], h["b"])
    f_vjp = deq._tanh_linearization(h["x"], h["W"], h["U"], h["b"])
    for method, kw in (("exact", {}), ("unroll", {"k": 4, "lam": 0.5}),
                       ("neumann", {"k": 4, "lam": 0.5}), ("jfb", {})):
        fresh = deq.implicit_vjp(f_vjp, res.z, g, method=method, **kw)
        reused = deq.deq_backward(res, g, method=method, **kw)
        assert reused.n_f_evals == fresh.n_f_evals - 1
        np.testing.assert_allclose(_flat(reused.theta_bar), _flat(fresh.theta_bar),
                                   rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="'fz' has shape"):
        deq.implicit_vjp(f_vjp, res.z, g, fz=res.solve.fz[0])


# --------------------------------------------------------------------------
# Bad input, non-convergence, warnings
# --------------------------------------------------------------------------

@pytest.fixture
def small(rng):
    return _layer(rng, d=3, p=2)


def test_non_finite_inputs(backend, small):
    for name in ("x", "W", "U", "b"):
        bad = dict(small)
        bad[name] = small[name].copy()
        bad[name].flat[0] = np.nan if name != "U" else np.inf
        with pytest.raises(ValueError, match=f"'{name}' contains NaN or Inf"):
            deq.tanh_deq(*_arrays(backend, bad, "float64"))


@pytest.mark.parametrize("changes, match", [
    ({"W": np.ones((3, 4))}, "'W' must be square"),
    ({"U": np.ones((4, 2))}, "'U' must have 3 rows"),
    ({"x": np.ones(5)}, "'x' has length 5"),
    ({"b": np.ones(4)}, "'b' must have length 3"),
    ({"x": np.ones(())}, "'x' must have at least 1"),
    ({"x": np.ones((2, 2)), "W": 0.1 * np.ones((3, 3, 3))}, "batch shapes do not broadcast"),
])
def test_mismatched_shapes(backend, small, changes, match):
    bad = dict(small, **changes)
    with pytest.raises(ValueError, match=match):
        deq.tanh_deq(*_arrays(backend, bad, "float64"))


def test_wrong_start_shape(backend, small):
    with pytest.raises(ValueError, match="'z0' has shape"):
        deq.tanh_deq(*_arrays(backend, small, "float64"), z0=backend.asarray(np.zeros(4), "float64"))


def test_type_errors(small):
    with pytest.raises(TypeError, match="'x' must be an array"):
        deq.tanh_deq(list(small["x"]), small["W"], small["U"], small["b"])
    with pytest.raises(TypeError, match="'W' has dtype float64 but 'x' has float32"):
        deq.tanh_deq(small["x"].astype(np.float32), small["W"], small["U"], small["b"])
    with pytest.raises(TypeError, match="'W' has dtype int64"):
        deq.tanh_deq(small["x"], np.ones((3, 3), dtype=np.int64), small["U"], small["b"])
    res = deq.tanh_deq(small["x"], small["W"], small["U"], small["b"])
    with pytest.raises(TypeError, match="'res' must be a TanhDEQResult"):
        deq.deq_vjp(res.solve, np.ones(3))


@pytest.mark.parametrize("lam", [0.0, -0.5, 1.5, math.nan, math.inf])
def test_lam_outside_unit_interval(small, lam):
    res = deq.tanh_deq(small["x"], small["W"], small["U"], small["b"])
    for method in ("unroll", "neumann"):
        with pytest.raises(ValueError, match="'lam'.*\\(0, 1\\]"):
            deq.deq_vjp(res, np.ones(3), method=method, k=2, lam=lam)
    with pytest.raises(ValueError, match="'lam'"):
        deq.tanh_deq(small["x"], small["W"], small["U"], small["b"], lam=lam)
    with pytest.raises(ValueError, match="'lam'"):
        deq.neumann_rate(np.eye(2) * 0.5, lam)


@pytest.mark.parametrize("k, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError),
                                    (True, TypeError), ("5", TypeError)])
def test_k_below_one_or_not_an_integer(small, k, exc):
    res = deq.tanh_deq(small["x"], small["W"], small["U"], small["b"])
    for method in ("unroll", "neumann"):
        with pytest.raises(exc, match="'k'"):
            deq.deq_vjp(res, np.ones(3), method=method, k=k, lam=0.5)


def test_options_a_method_does_not_use_are_rejected(small):
    res = deq.tanh_deq(small["x"], small["W"], small["U"], small["b"])
    g = np.ones(3)
    with pytest.raises(ValueError, match="'k' applies only to"):
        deq.deq_vjp(res, g, method="exact", k=3)
    with pytest.raises(ValueError, match="'lam' applies only to"):
        deq.deq_vjp(res, g, method="jfb", lam=0.5)
    with pytest.raises(ValueError, match="'tol' applies only to method='exact'"):
        deq.deq_vjp(res, g, method="neumann", tol=1e-3)
    with pytest.raises(ValueError, match="'solver' applies only to method='exact'"):
        deq.deq_vjp(res, g, method="unroll", solver="dense")
    with pytest.raises(ValueError, match="'tol' applies to the iterative"):
        deq.deq_vjp(res, g, solver="dense", tol=1e-8)
    with pytest.raises(ValueError, match="'m' and 'reg' apply only to method='anderson'"):
        deq.fixed_point(np.cos, np.zeros(1), method="picard", m=3)
    with pytest.raises(ValueError, match="'method'"):
        deq.deq_vjp(res, g, method="broyden")
    with pytest.raises(ValueError, match="'solver'"):
        deq.deq_vjp(res, g, solver="gmres")
    with pytest.raises(ValueError, match="'z_bar' has shape"):
        deq.deq_vjp(res, np.ones(4))
    with pytest.raises(ValueError, match="'z_bar' contains NaN"):
        deq.deq_vjp(res, np.array([1.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match="'dW' has shape"):
        deq.deq_jvp(res, dW=np.ones((2, 2)))
    with pytest.raises(ValueError, match="both 0"):
        deq.fixed_point(np.cos, np.zeros(1), tol=0.0)
    with pytest.raises(ValueError, match="'f' returned shape"):
        deq.fixed_point(lambda z: z[:1], np.zeros(2))
    with pytest.raises(TypeError, match="'f' returned dtype float64"):
        deq.fixed_point(lambda z: np.cos(z).astype(np.float64), np.zeros(2, dtype=np.float32))
    with pytest.raises(TypeError, match="'f_vjp' must be callable"):
        deq.implicit_vjp(None, np.zeros(2), np.ones(2))


def test_unconverged_forward_is_flagged_warned_and_its_vjp_warns(backend, rng):
    h = _layer(rng, d=5, p=3, norm=0.95)
    arrays = _arrays(backend, h, "float64")
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        res = deq.tanh_deq(*arrays, method="picard", max_iter=3)
    assert not res.converged and res.n_iter == 3 and res.residual > 1e-6
    assert not res.all_converged and res.n_converged == 0
    g = backend.asarray(rng.standard_normal(5), "float64")
    for method in ("exact", "neumann", "unroll", "jfb"):
        with pytest.warns(ConvergenceWarning, match="unconverged"):
            deq.deq_vjp(res, g, method=method)
    with pytest.warns(ConvergenceWarning, match="unconverged"):
        deq.deq_jvp(res, db=arrays[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq.deq_vjp(res, g, warn=False)                    # opt-out is explicit


def test_non_finite_map_stops_the_member_and_warns():
    def f(z):                                             # member 1 blows up to inf
        out = 2.0 * z + 1.0
        out[1] = np.where(np.abs(z[1]) > 1e3, np.inf, out[1])
        return out

    with pytest.warns(ConvergenceWarning, match="1 with a non-finite f value"):
        res = deq.fixed_point(f, np.zeros((2, 3)), method="picard", lam=0.25, max_iter=200)
    assert not res.all_converged
    assert B.to_host(res.converged).tolist() == [False, False]
    assert math.isinf(res.max_error) and np.all(np.isfinite(res.z))
    assert np.isinf(res.residual[1]) and np.isinf(res.error[1]) and np.isfinite(res.residual[0])


# --------------------------------------------------------------------------
# Diagnostics: per-member arrays (refimpl.iteration's convention)
# --------------------------------------------------------------------------

def _cos_map(c):
    """``f(z) = 0.5 cos(z) + c``, elementwise (a contraction, Lipschitz 1/2)."""
    xp = B.namespace(c=c)
    return lambda z: 0.5 * xp.cos(z) + c


@pytest.mark.parametrize("method", ["anderson", "picard"])
@pytest.mark.parametrize("bshape", [(), (3,), (2, 3)])
def test_fixed_point_diagnostics_are_per_member_arrays(backend, dtype, rng, method, bshape):
    c = backend.asarray(rng.standard_normal(bshape + (4,)), dtype)
    res = deq.fixed_point(_cos_map(c), backend.xp.zeros_like(c), method=method)
    fields = {f: B.to_host(getattr(res, f)) for f in ("n_iter", "error", "converged", "residual")}
    assert all(v.shape == bshape for v in fields.values())
    assert fields["n_iter"].dtype == np.int64 and fields["converged"].dtype == np.bool_
    assert fields["error"].dtype == np.dtype(dtype) == fields["residual"].dtype
    # error is the relative residual, residual the absolute one, both of the returned z
    z, fz = (B.to_host(a).astype(np.float64) for a in (res.z, res.fz))
    r, nf = np.linalg.norm(fz - z, axis=-1), np.linalg.norm(fz, axis=-1)
    rt = {"float64": 1e-6, "float32": 1e-2}[dtype]               # r is a difference of near-equals
    np.testing.assert_allclose(fields["residual"], r, rtol=rt, atol=1e-300)
    np.testing.assert_allclose(fields["error"], r / nf, rtol=rt, atol=1e-300)
    size = int(np.prod(bshape))
    assert res.summary() == {"size": size, "n_converged": int(fields["converged"].sum()),
                             "all_converged": bool(fields["converged"].all()),
                             "max_error": float(fields["error"].max()),
                             "max_n_iter": int(fields["n_iter"].max())}
    assert res.all_converged and res.n_f_evals >= res.max_n_iter + 1


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_fixed_point_batch_equals_loop_bitwise(rng, method):
    """f acts elementwise, so each member's arithmetic is the same alone or in
    a batch: the iterates, f values and diagnostics coincide bit for bit."""
    c = rng.standard_normal((5, 3)) * np.array([[1e-3], [0.1], [1.0], [3.0], [10.0]])
    res = deq.fixed_point(_cos_map(c), np.zeros_like(c), method=method)
    assert len(set(res.n_iter.tolist())) > 1
    for i in range(5):
        one = deq.fixed_point(_cos_map(c[i]), np.zeros(3), method=method)
        for name in ("z", "fz", "n_iter", "error", "converged", "residual"):
            assert np.array_equal(getattr(res, name)[i], getattr(one, name)), (i, name)


def test_member_at_its_fixed_point_takes_no_update(rng):
    """A member started from a converged iterate passes its test at iteration
    0 (the f evaluation of z0) and is reported with n_iter = 0."""
    c = rng.standard_normal((2, 3))
    first = deq.fixed_point(_cos_map(c), np.zeros_like(c))
    z0 = np.stack([first.z[0], np.zeros(3)])
    res = deq.fixed_point(_cos_map(c), z0)
    assert res.n_iter.tolist() == [0, first.n_iter[1]] and res.all_converged
    assert np.array_equal(res.z[0], first.z[0]) and np.array_equal(res.z[1], first.z[1])
    again = deq.fixed_point(_cos_map(c), first.z)              # the whole batch: no update
    assert again.n_iter.tolist() == [0, 0] and again.n_f_evals == 1
    assert deq.fixed_point(_cos_map(c), first.z, max_iter=0).all_converged


def test_one_member_not_converging_is_reported_per_member(rng):
    """Member 0 has ||W||_2 = 0.5 (a contraction); member 1 a W with
    eigenvalues below -1, on which undamped Picard oscillates.  Only member 1
    is reported unconverged; member 0 is the host's fixed point."""
    d, p = 6, 3
    W_good = 0.5 * np.linalg.qr(rng.standard_normal((d, d)))[0]
    W_bad = _symmetric(rng, [-2.2, -1.6, -0.8, 0.0, 0.3, 0.5])
    W = np.stack([W_good, W_bad])
    x, U, b = rng.standard_normal(p), 0.2 * rng.standard_normal((d, p)), 0.05 * rng.standard_normal(d)
    with pytest.warns(ConvergenceWarning, match="did not converge for 1 of 2 member"):
        res = deq.tanh_deq(x, W, U, b, method="picard", max_iter=300)
    assert res.converged.tolist() == [True, False] and res.n_converged == 1
    assert res.n_iter[0] < 300 and res.n_iter[1] == 300 and res.error[1] > 1e-3
    np.testing.assert_allclose(res.z[0], _host_fixed_point(x, W_good, U, b), atol=1e-11)
    assert res.residual[0] <= deq.DEFAULT_TOL["float64"] * np.linalg.norm(res.solve.fz[0])
    with pytest.warns(ConvergenceWarning, match="unconverged for 1 of 2 member"):
        deq.deq_vjp(res, np.ones((2, d)), method="jfb")


def test_backward_diagnostics_are_per_member(rng):
    h = _layer(rng, batch=(3,))
    res = deq.tanh_deq(h["x"], h["W"], h["U"], h["b"])
    g = rng.standard_normal((3, 6))
    it = deq.deq_backward(res, g, solver="picard")
    one = [deq.deq_backward(deq.tanh_deq(h["x"][i], h["W"], h["U"], h["b"]), g[i], solver="picard")
           for i in range(3)]
    assert it.n_iter.shape == (3,) and it.all_converged
    assert it.n_iter.tolist() == [int(o.n_iter) for o in one]       # batch == loop
    for method, kw in (("exact", {"solver": "dense"}), ("neumann", {}), ("unroll", {}), ("jfb", {})):
        out = deq.deq_backward(res, g, method=method, **kw)
        assert out.n_iter.tolist() == [0, 0, 0] and out.converged.tolist() == [True] * 3
        assert out.error.tolist() == [0.0] * 3 and out.summary()["max_error"] == 0.0


def test_unconverged_backward_warns(rng):
    h = _layer(rng, d=5, p=3, norm=0.95)
    res = deq.tanh_deq(h["x"], h["W"], h["U"], h["b"])
    with pytest.warns(ConvergenceWarning, match="exact backward \\(picard\\) did not converge"):
        out = deq.deq_backward(res, rng.standard_normal(5), solver="picard", max_iter=2)
    assert not out.all_converged and out.max_n_iter == 2


def test_ill_conditioned_and_singular_backward(rng):
    d = 4
    W = _symmetric(rng, [1.0 - 1e-9, 0.3, 0.0, -0.2])
    x, U, b = np.zeros(2), np.zeros((d, 2)), np.zeros(d)   # z* = 0, D = 1, J = W
    res = deq.tanh_deq(x, W, U, b)
    assert res.converged and np.all(res.z == 0)
    with pytest.warns(ConditioningWarning, match="ill-conditioned"):
        out = deq.deq_backward(res, np.ones(d))
    assert out.condition > 1e8
    np.testing.assert_allclose(out.condition, np.linalg.cond(np.eye(d) - W, 1), rtol=1e-5)
    with pytest.warns(ConditioningWarning, match="ill-conditioned"):      # the JVP shares the solve
        deq.deq_jvp(res, db=np.ones(d))
    W1 = np.diag([1.0, 0.3, 0.0, -0.2])                    # I - J exactly singular
    res1 = deq.tanh_deq(x, W1, U, b)
    with pytest.raises(ValueError, match="singular"):
        deq.deq_vjp(res1, np.ones(d))
    with pytest.raises(ValueError, match="singular"):
        deq.deq_jvp(res1, db=np.ones(d))
    W2 = _symmetric(rng, [1.0 - 1e-17, 0.3, 0.0, -0.2])    # singular to working precision
    res2 = deq.tanh_deq(x, W2, U, b)
    with pytest.raises(ValueError, match="singular"):
        deq.deq_vjp(res2, np.ones(d))


def test_dense_condition_number_is_cond_1(backend, rng):
    """The dense solve reports max over members of cond_1(I - J), as numpy.linalg.cond(., 1)
    computes it, for the VJP (which solves with the transpose) and a non-symmetric J."""
    h = _layer(rng, batch=(3,), norm=0.95)
    res = deq.tanh_deq(*_arrays(backend, h, "float64"))
    out = deq.deq_backward(res, backend.asarray(rng.standard_normal((3, 6)), "float64"))
    J = (1 - B.to_host(res.solve.fz) ** 2)[:, :, None] * h["W"]
    expected = max(np.linalg.cond(np.eye(6) - Ji, 1) for Ji in J)
    assert out.solver == "dense" and math.isclose(out.condition, expected, rel_tol=1e-10)
    assert not math.isclose(expected, max(np.linalg.cond(np.eye(6) - Ji, np.inf) for Ji in J),
                            rel_tol=1e-3)                  # the 1- and inf-norms differ here


def test_inputs_are_not_mutated(backend, rng):
    h = _layer(rng, batch=(2,))
    arrays = _arrays(backend, h, "float64")
    res = deq.tanh_deq(*arrays)
    g = backend.asarray(rng.standard_normal((2, 6)), "float64")
    for method in ("exact", "unroll", "neumann", "jfb"):
        deq.deq_vjp(res, g, method=method)
    deq.deq_jvp(res, *arrays)
    for a, k in zip(arrays, ("x", "W", "U", "b")):
        np.testing.assert_array_equal(B.to_host(a), h[k])
    assert float(B.to_host(g).sum()) != 0.0


# --------------------------------------------------------------------------
# Registry planted bugs and documentation examples
# --------------------------------------------------------------------------

def _vjp_transposed(res, z_bar):
    # Planted: solves (I - J) u = g instead of (I - J^T) u = g.
    J = (1 - res.solve.fz ** 2)[..., :, None] * res.W
    A = B.eye_like(res.z) - J
    u = B.solve_vec(A, z_bar)
    f_vjp = deq._tanh_linearization(res.x, res.W, res.U, res.b)
    return f_vjp(res.z).vjp_theta(u)


def test_registry_catches_a_wrong_adjoint():
    spec = dataclasses.replace(registry.get_spec("tanh_deq"), vjp=_vjp_transposed)
    results = {r.check: r for r in registry.verify_case(spec, spec.case("contractive"))}
    failed = {n for n, r in results.items() if not r.passed}
    assert {"adjoint", "fd_vjp"} <= failed


def test_registry_catches_a_wrong_phantom_gradient(monkeypatch):
    real = deq._implicit_vjp

    def off_by_one(f_vjp, z, g, *, method, k, lam, **kw):
        if method == "neumann":
            k = k + 1
        return real(f_vjp, z, g, method=method, k=k, lam=lam, **kw)

    monkeypatch.setattr(deq, "_implicit_vjp", off_by_one)
    spec = registry.get_spec("tanh_deq")
    results = registry.verify_case(spec, spec.case("contractive"))
    failed = {r.check.split("[")[0] for r in results if not r.passed}
    assert {"npg_closed_form", "upg_equals_npg", "error_identity", "k1_lam_jfb_npg"} <= failed
    assert "adjoint" not in failed and "fd_vjp" not in failed


def test_docstring_examples():
    assert doctest.testmod(deq, raise_on_error=False).failed == 0


def test_benchmark_quick_smoke(capsys, load_benchmark):
    module = load_benchmark("deq")
    assert module.main(["--quick", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "neumann" in out and "cosine" in out
