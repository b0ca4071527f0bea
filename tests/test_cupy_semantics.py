"""The CuPy-semantics backend (refimpl._cupy_semantics), the device policy,
and regressions of the CuPy code paths it exercises on the CPU.

Expected values come from NumPy/SciPy on the host (an independent route:
not the backend under test).
"""

import numpy as np
import pytest
import scipy.linalg

from refimpl import _cupy_semantics as cs
from refimpl import backend as B
from refimpl import linsolve, matsqrt

SEM = "cupy_semantics"


@pytest.fixture
def sem():
    return B.get_backend(SEM)


# --------------------------------------------------------------------------
# The enforced rules, one test each
# --------------------------------------------------------------------------

def test_rule1_no_implicit_host_conversion(sem):
    x = sem.asarray(np.arange(4.0))
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(x)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array(x)
    with pytest.raises(BufferError, match="get()"):
        np.from_dlpack(x)
    host = B.to_host(x)                                   # the explicit transfer
    assert type(host) is np.ndarray
    np.testing.assert_array_equal(host, np.arange(4.0))
    assert float(sem.xp.sum(x)) == 6.0 and bool(x[1] == 1.0) and int(x[3]) == 3


def test_rule2_host_arrays_do_not_enter_device_arithmetic(sem):
    x = sem.asarray(np.ones(3))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        x + np.ones(3)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        sem.xp.multiply(x, np.ones(3))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        x[0:1] = np.zeros(1)
    # scalars, NumPy scalars and NumPy ufuncs are fine (CuPy: __array_ufunc__)
    y = np.float64(2.0) * x + 1
    assert isinstance(y, cs.ndarray)
    z = np.exp(x)
    assert isinstance(z, cs.ndarray)
    np.testing.assert_allclose(B.to_host(z), np.exp(np.ones(3)), rtol=1e-15)


def test_rule3_reductions_and_scalar_indexing_give_0d_arrays(sem):
    x = sem.asarray(np.arange(6.0).reshape(2, 3))
    for r in (sem.xp.sum(x), sem.xp.max(x), x[1, 2], sem.xp.linalg.vector_norm(x)):
        assert isinstance(r, cs.ndarray) and r.shape == ()
    assert float(sem.xp.max(x)) == 5.0


def test_rule4_solve_does_not_broadcast(sem):
    A, b = np.eye(3) * 2.0, np.ones((4, 3, 1))
    with pytest.raises(ValueError, match="same batch shape"):
        sem.xp.linalg.solve(sem.asarray(A), sem.asarray(b))
    with pytest.raises(ValueError, match="same batch shape"):
        sem.xp.linalg.solve(sem.asarray(np.broadcast_to(A, (4, 3, 3)).copy()),
                            sem.asarray(np.ones((1, 3, 1))))
    # equal batch shapes (and a single (M,) vector) are accepted
    x = sem.xp.linalg.solve(sem.asarray(np.broadcast_to(A, (4, 3, 3)).copy()), sem.asarray(b))
    np.testing.assert_allclose(B.to_host(x), np.full((4, 3, 1), 0.5), rtol=1e-15)
    np.testing.assert_allclose(B.to_host(sem.xp.linalg.solve(sem.asarray(A),
                                                             sem.asarray(np.ones(3)))),
                               np.full(3, 0.5), rtol=1e-15)


def test_rule5_linalg_failures_are_silent_unless_raise(sem):
    good, bad = np.eye(2), np.array([[1.0, 2.0], [2.0, 1.0]])      # bad: indefinite
    A = sem.asarray(np.stack([good, bad]))
    L = B.to_host(sem.xp.linalg.cholesky(A))
    np.testing.assert_allclose(L[0], np.eye(2))
    assert np.all(np.isnan(L[1]))
    singular = sem.asarray(np.stack([good, np.ones((2, 2))]))
    x = B.to_host(sem.xp.linalg.solve(singular, sem.asarray(np.ones((2, 2, 1)))))
    np.testing.assert_allclose(x[0], np.ones((2, 1)))
    assert not np.all(np.isfinite(x[1]))
    assert not np.all(np.isfinite(B.to_host(sem.xp.linalg.inv(singular))[1]))
    with cs.errstate(linalg="raise"):
        with pytest.raises(np.linalg.LinAlgError):
            sem.xp.linalg.cholesky(A)
    # matsqrt's PD test uses the policy's raising context
    from refimpl.matsqrt._common import is_positive_definite
    assert is_positive_definite(sem.asarray(good))
    assert not is_positive_definite(A)


def test_rule6_no_floating_point_warnings(sem, recwarn):
    x = sem.asarray(np.array([1.0, 0.0, -1.0]))
    r = B.to_host(x / sem.asarray(np.zeros(3)))
    assert np.isinf(r[0]) and np.isnan(r[1])
    assert B.to_host(sem.xp.log(x))[2] != B.to_host(sem.xp.log(x))[2]      # nan
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_rule7_arrays_live_on_the_emulated_device(sem):
    x = sem.asarray(np.ones(2))
    assert x.device == cs.DEVICE == sem.device
    assert sem.xp.zeros(2, device=cs.DEVICE).device == cs.DEVICE
    with pytest.raises(ValueError, match="device"):
        sem.xp.zeros(2, device="cpu")


def test_host_transfer_never_aliases(sem):
    h = np.ones(3)
    x = sem.asarray(h)
    h[0] = 5.0
    assert float(x[0]) == 1.0
    back = B.to_host(x)
    back[1] = 7.0
    assert float(x[1]) == 1.0


# --------------------------------------------------------------------------
# The device policy
# --------------------------------------------------------------------------

def test_policy_of_cupy_semantics_equals_cupys():
    """The double must take exactly CuPy's branches: equal decisions."""
    cupy_like = B.DevicePolicy(deferred_sync=True, solve_broadcasts=False, linalg_raises=False,
                               library="cupy")
    assert B.device_policy(cs.xp) == cupy_like
    host = B.device_policy(B.get_backend("numpy").xp)
    assert host.sync_cadence(8) == 1 and B.device_policy(cs.xp).sync_cadence(8) == 8
    assert host.host_numpy and host.solve_broadcasts and host.linalg_raises


def test_policy_for_torch_depends_on_the_device():
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xt
    assert not B.device_policy(xt, torch.device("cpu")).deferred_sync
    assert B.device_policy(xt, torch.device("cuda")).deferred_sync
    assert B.device_policy(xt, torch.device("cpu")).solve_broadcasts


def test_no_library_tests_outside_backend():
    """Operator modules take per-library decisions from the policy only."""
    import pathlib
    import refimpl
    root = pathlib.Path(refimpl.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name not in ("backend.py", "_cupy_semantics.py")
                 and any(f"array_api_compat.is_{lib}_" in p.read_text()
                         for lib in ("cupy", "torch", "numpy", "jax", "dask"))]
    assert offenders == []


# --------------------------------------------------------------------------
# Regressions of the CuPy paths
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape_A, shape_b", [((3, 3), (4, 3)),          # shared matrix
                                              ((4, 3, 3), (3,)),         # shared rhs
                                              ((2, 1, 3, 3), (1, 5, 3))])
def test_solve_broadcasts_batches_on_cupy_semantics(shape_A, shape_b, dtype, rng):
    """CuPy's linalg.solve does not broadcast; refimpl's solve must (bug: it
    passed CuPy's function through and raised)."""
    sem = B.get_backend(SEM)
    n = shape_A[-1]
    Ah = rng.standard_normal(shape_A) + 3 * np.eye(n)
    bh = rng.standard_normal(shape_b)
    res = linsolve.solve(sem.asarray(Ah, dtype), sem.asarray(bh, dtype))
    batch = np.broadcast_shapes(shape_A[:-2], shape_b[:-1])
    A_full = np.broadcast_to(Ah, batch + (n, n))
    b_full = np.broadcast_to(bh, batch + (n,))
    want = np.linalg.solve(A_full, b_full[..., None])[..., 0]
    rtol = 1e-12 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(B.to_host(res.x), want, rtol=rtol, atol=rtol)
    # VJP: b_bar = A^{-T} x_bar, summed over broadcast dims (the adjoint of broadcasting)
    xb = rng.standard_normal(want.shape)
    A_bar, b_bar = linsolve.solve_vjp(res, sem.asarray(xb, dtype))
    g = np.linalg.solve(np.swapaxes(A_full, -1, -2), xb[..., None])[..., 0]
    np.testing.assert_allclose(B.to_host(b_bar), B.sum_to_shape(g, shape_b), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(B.to_host(A_bar),
                               B.sum_to_shape(-g[..., :, None] * want[..., None, :], shape_A),
                               rtol=rtol, atol=rtol)
    np.testing.assert_allclose(B.to_host(linsolve.solve_jvp(res, None, sem.asarray(bh, dtype))),
                               want, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("n", [2, 5, 12])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("cond", [1e1, 1e4])
def test_lyapunov_sign_backward_on_deferred_sync_path(n, batch, cond, rng):
    """sqrtm_vjp(method='lyapunov_sign') on the deferred-sync (CuPy) path
    agrees with the exact gradient from SciPy's Sylvester solver (bug: the
    driver, testing "all done" every CHECK_EVERY steps, ran a step with no
    member left, whose gathered finish reduced an empty array)."""
    sem = B.get_backend(SEM)
    Q = np.linalg.qr(rng.standard_normal((batch, n, n)))[0]
    lam = np.geomspace(1.0, 1.0 / cond, n) * rng.uniform(0.5, 2.0, (batch, 1))
    Ah = (Q * lam[:, None, :]) @ np.swapaxes(Q, -1, -2)
    Ah = 0.5 * (Ah + np.swapaxes(Ah, -1, -2))
    Gh = rng.standard_normal((batch, n, n))
    res = matsqrt.sqrtm(sem.asarray(Ah), method="eig")
    A_bar = B.to_host(matsqrt.sqrtm_vjp(res, sem.asarray(Gh), method="lyapunov_sign"))
    S = B.to_host(res.S)
    # S X + X S = sym(G): the derivative of A -> A^{1/2}, adjoint on symmetric matrices
    want = np.stack([scipy.linalg.solve_sylvester(S[i], S[i], 0.5 * (Gh[i] + Gh[i].T))
                     for i in range(batch)])
    np.testing.assert_allclose(A_bar, want, rtol=1e-7 * cond, atol=1e-9 * cond * np.abs(want).max())
