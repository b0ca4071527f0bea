"""refimpl.backend: namespaces, validation, transfers and the non-standard pieces."""

import math

import numpy as np
import pytest
import scipy.special

from refimpl import backend as B


def test_namespace_rejects_non_arrays_by_name(backend):
    x = backend.asarray(np.ones(3))
    with pytest.raises(TypeError, match="'C' must be an array.*list"):
        B.namespace(a=x, C=[1.0, 2.0])
    with pytest.raises(TypeError, match="'eps' must be an array.*float"):
        B.namespace(eps=0.1)
    with pytest.raises(TypeError, match="at least one array"):
        B.namespace(a=None)


def test_namespace_rejects_mixed_libraries():
    import array_api_strict as xs
    with pytest.raises(TypeError, match="different libraries"):
        B.namespace(a=np.ones(2), b=xs.ones(2))


def test_namespace_rejects_mixed_devices():
    import array_api_strict as xs
    a = xs.ones(2, device=xs.Device("device1"))
    b = xs.ones(2)  # default device
    with pytest.raises(ValueError, match="'b' is on device"):
        B.namespace(a=a, b=b)


def test_check_array_messages(backend):
    good = backend.asarray(np.ones((2, 3)))
    assert B.check_array(good, "C", ndim=2) is good
    with pytest.raises(TypeError, match="'C' has dtype int64"):
        B.check_array(backend.xp.asarray(np.ones(3, dtype=np.int64), device=backend.device), "C")
    with pytest.raises(ValueError, match="'C' must have 3 dimensions"):
        B.check_array(good, "C", ndim=3)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        B.check_array(good, "C", min_ndim=3)
    for bad in (np.nan, np.inf, -np.inf):
        h = np.ones((2, 3))
        h[1, 2] = bad
        with pytest.raises(ValueError, match="'C' contains NaN or Inf"):
            B.check_array(backend.asarray(h), "C")
    with pytest.raises(TypeError, match="got list"):
        B.check_array([1.0], "C")


def test_check_array_rejects_float16_and_complex():
    with pytest.raises(TypeError, match="float16"):
        B.check_array(np.ones(2, dtype=np.float16), "x")
    with pytest.raises(TypeError, match="complex128"):
        B.check_array(np.ones(2, dtype=np.complex128), "x")


def test_check_positive():
    assert B.check_positive(np.float64(0.5), "eps") == 0.5
    assert type(B.check_positive(np.float64(0.5), "eps")) is float
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="'eps' must be finite and > 0"):
            B.check_positive(bad, "eps")
    assert B.check_positive(0.0, "tol", allow_zero=True) == 0.0
    for not_a_number in ("a", "0.1", True, None, [0.1]):
        with pytest.raises(TypeError, match="'eps' must be a real number"):
            B.check_positive(not_a_number, "eps")
    assert B.check_positive(np.asarray(0.25), "eps") == 0.25
    assert B.check_positive(3, "max_iter") == 3.0


def test_unit_roundoff():
    assert B.unit_roundoff(np.float64) == np.finfo(np.float64).eps / 2
    assert B.unit_roundoff(np.dtype("float32")) == np.finfo(np.float32).eps / 2
    with pytest.raises(TypeError, match="float16"):
        B.unit_roundoff(np.float16)


def test_host_round_trip_copies(backend, dtype, rng):
    h = rng.standard_normal((3, 4))
    x = backend.asarray(h, dtype)
    assert B.dtype_name(x.dtype) == dtype
    assert B.device(x) == backend.device
    back = B.to_host(x)
    np.testing.assert_array_equal(back, h.astype(dtype))
    h[0, 0] = 99.0  # the device copy does not alias the host array
    assert B.to_host(x)[0, 0] != 99.0


def test_logsumexp_matches_scipy(backend, dtype, rng):
    h = rng.standard_normal((4, 5)) * 300.0  # exp overflows without the shift
    h[1] = -np.inf                            # an all -inf row gives -inf, no NaN
    h[2, :3] = -np.inf
    x = backend.asarray(h, dtype)
    for axis in (0, 1, -1):
        got = B.to_host(B.logsumexp(x, axis=axis))
        with np.errstate(divide="ignore"):
            want = scipy.special.logsumexp(h.astype(dtype).astype(np.float64), axis=axis)
        rtol = 1e-14 if dtype == "float64" else 1e-6
        np.testing.assert_allclose(got, want, rtol=rtol)
    assert B.logsumexp(x, axis=1, keepdims=True).shape == (4, 1)


def test_small_linear_algebra_helpers(backend, rng):
    A = backend.asarray(rng.standard_normal((2, 3, 3)) + 3 * np.eye(3))
    v = backend.asarray(rng.standard_normal((2, 3)))
    Ah, vh = B.to_host(A), B.to_host(v)
    np.testing.assert_allclose(B.to_host(B.matvec(A, v)), np.einsum("bij,bj->bi", Ah, vh))
    np.testing.assert_allclose(B.to_host(B.solve_vec(A, v)),
                               np.stack([np.linalg.solve(Ah[i], vh[i]) for i in range(2)]))
    np.testing.assert_array_equal(B.to_host(B.mT(A)), np.swapaxes(Ah, -1, -2))
    np.testing.assert_array_equal(B.to_host(B.diagonal(A)), np.diagonal(Ah, axis1=-2, axis2=-1))
    D = B.to_host(B.diag_embed(v))
    for i in range(2):
        np.testing.assert_array_equal(D[i], np.diag(vh[i]))
    assert float(B.inner(A, A)) == pytest.approx(np.sum(Ah * Ah))


def test_check_reads_and_reductions_match_numpy(backend, dtype, rng):
    """any_true/all_true/count_true/reduce_min/reduce_sum against NumPy's
    own functions on the host copy: arrays of several shapes, 0-d arrays and
    the NumPy scalars NumPy's reductions return; NaN propagates through
    reduce_min."""
    h = rng.standard_normal((3, 5)).astype(dtype)
    h[1, 2] = np.nan
    x = backend.asarray(h, dtype)
    xp = B.namespace(x=x)
    for mask_h in (h > 0.3, np.zeros((2, 3), bool), np.ones((4,), bool), np.array(True),
                   np.array(False)):
        mask = backend.asarray(mask_h)
        assert B.any_true(mask) is bool(np.any(mask_h))
        assert B.all_true(mask) is bool(np.all(mask_h))
        assert B.count_true(mask) == int(np.count_nonzero(mask_h))
    for scalar in (np.bool_(True), np.bool_(False)):        # NumPy's 0-d reductions
        assert B.any_true(scalar) is B.all_true(scalar) is bool(scalar)
        assert B.count_true(scalar) == int(scalar)
    for axis in (0, -1):
        got_min = B.to_host(B.reduce_min(x, axis=axis))
        np.testing.assert_array_equal(got_min, np.min(h, axis=axis))
        got_sum = B.to_host(B.reduce_sum(x, axis=axis))
        rtol = 0 if backend.name == "numpy" else (1e-15 if dtype == "float64" else 1e-6)
        np.testing.assert_allclose(got_sum, np.sum(h, axis=axis), rtol=rtol)
    assert math.isnan(float(B.reduce_min(x[1, ...])))
    assert B.reduce_min(x).dtype == x.dtype and B.reduce_sum(xp.abs(x)).shape == (3,)


def test_loop_maps_match_the_products(backend, dtype, rng):
    """matvec_maps and divide_map give what matvec, rmatvec and ``/`` give,
    bit for bit, for one matrix and one vector and for a batch; on NumPy the
    one-vector maps write into the work array of work_like and return it,
    elsewhere work_like is None and the maps return new arrays.  Inputs are
    left alone."""
    Ah = rng.standard_normal((2, 4, 3)).astype(dtype)
    xh, yh = rng.standard_normal((2, 3)).astype(dtype), rng.standard_normal((2, 4)).astype(dtype)
    for A_h, x_h, y_h in ((Ah[0], xh[0], yh[0]), (Ah, xh, yh)):     # one matrix; a batch
        A, x, y = (backend.asarray(h, dtype) for h in (A_h, x_h, y_h))
        mv, rmv = B.matvec_maps(A, x)
        wx, wy = B.work_like(y), B.work_like(x)             # K x has the shape of y
        assert (wx is None) == (backend.name != "numpy")
        got_x, got_y = mv(x, wx), rmv(y, wy)
        np.testing.assert_array_equal(B.to_host(got_x), B.to_host(B.matvec(A, x)))
        np.testing.assert_array_equal(B.to_host(got_y), B.to_host(B.rmatvec(A, y)))
        np.testing.assert_allclose(B.to_host(got_x), np.einsum("...ij,...j->...i", A_h, x_h),
                                   rtol=1e-12 if dtype == "float64" else 1e-5)
        if backend.name == "numpy" and A_h.ndim == 2:
            assert got_x is wx and got_y is wy              # written into the work arrays
        d = B.divide_map(y)
        w = B.work_like(y)
        got = d(backend.asarray(np.full(y_h.shape, 4.0, dtype=dtype), dtype), w)
        np.testing.assert_array_equal(B.to_host(got), y_h / np.dtype(dtype).type(4.0))
        if backend.name == "numpy":
            assert got is w
        for arr, h in ((A, A_h), (x, x_h), (y, y_h)):
            np.testing.assert_array_equal(B.to_host(arr), h)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cache_aligned(dtype, rng):
    """A NumPy array comes back starting on a 64-byte boundary, C-contiguous,
    equal to the input and not sharing its memory when copied; the input is
    left alone; an already aligned array and non-NumPy inputs come back as
    they are."""
    base = np.empty(12 * 7 + 16, dtype=dtype)
    for off in range(8):                        # every alignment a NumPy array can have
        x = base[off:off + 12 * 7].reshape(12, 7)
        x[...] = rng.standard_normal((12, 7))
        before = x.copy()
        y = B.cache_aligned(x)
        assert y.ctypes.data % B.CACHE_LINE == 0 and y.flags.c_contiguous
        np.testing.assert_array_equal(y, before)
        np.testing.assert_array_equal(x, before)
        if x.ctypes.data % B.CACHE_LINE:
            assert not np.shares_memory(x, y)
        else:
            assert y is x
    f = np.asfortranarray(rng.standard_normal((5, 6)).astype(dtype))
    y = B.cache_aligned(f)
    assert y.flags.c_contiguous and y.ctypes.data % B.CACHE_LINE == 0
    np.testing.assert_array_equal(y, f)
    b = np.broadcast_to(rng.standard_normal(6).astype(dtype), (3, 6))  # materialised
    np.testing.assert_array_equal(B.cache_aligned(b), b)
    strict = pytest.importorskip("array_api_strict")
    s = strict.asarray([1.0, 2.0])
    assert B.cache_aligned(s) is s


def test_sum_to_shape_is_adjoint_of_broadcast(backend, rng):
    # <broadcast_to(x, S), y> == <x, sum_to_shape(y, x.shape)> for every y.
    xp = backend.xp
    for shape, target in [((3,), (2, 4, 3)), ((1, 3), (5, 3)), ((4, 1, 3), (4, 2, 3)), ((2, 3), (2, 3))]:
        x = backend.asarray(rng.standard_normal(shape))
        y = backend.asarray(rng.standard_normal(target))
        lhs = float(B.inner(xp.broadcast_to(x, target), y))
        rhs = float(B.inner(x, B.sum_to_shape(y, shape)))
        assert lhs == pytest.approx(rhs, rel=1e-13)
        assert tuple(B.sum_to_shape(y, shape).shape) == shape
    with pytest.raises(ValueError, match="cannot reduce"):
        B.sum_to_shape(backend.asarray(np.ones((2, 3))), (4, 2, 3))


def test_get_backend():
    assert "numpy" in B.available_backends()
    assert "cupy_semantics" in B.available_backends()
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        B.get_backend("jax")
    ok, reason = B.gpu_status()
    if not ok:
        with pytest.raises(ValueError, match="backend 'cupy' is not available: " + reason[:20]):
            B.get_backend("cupy")


def test_frobenius_per_member(backend, rng):
    Ah = rng.standard_normal((3, 4, 4))
    A = backend.asarray(Ah)
    np.testing.assert_allclose(B.to_host(B.frobenius(A)), np.linalg.norm(Ah, axis=(-2, -1)),
                               rtol=1e-14)
    assert B.frobenius(A[0, ...]).shape == ()


def test_single_threaded_blas_limits_every_loaded_blas_and_restores_it():
    """NumPy's and SciPy's BLAS both run on one thread inside the context (read
    back through threadpoolctl's own inventory) and get their counts back after."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import scipy.linalg  # noqa: F401  (SciPy's BLAS loaded, as the operators do)
    from refimpl import backend as B

    def blas_threads():
        return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"}

    before = blas_threads()
    with B.single_threaded_blas(np.zeros(3)):
        inside = blas_threads()
    assert inside and set(inside.values()) == {1} and inside.keys() == before.keys()
    assert blas_threads() == before
    with B.single_threaded_blas(np.zeros(3), when=False):
        assert blas_threads() == before
