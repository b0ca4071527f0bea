"""The seam of refimpl.matsqrt: the code written once against the array API
against the host-NumPy kernels of refimpl.matsqrt._kernels.

The kernels re-schedule the same operations (work arrays, ``out=``, cache
blocks), so on the same inputs both paths give the same bits
(``np.array_equal``); the plain path is forced on NumPy by making
``_kernels.applies`` say no.  The one LAPACK-level kernel (the
positive-definiteness test) is a different algorithm for a yes/no answer and
is compared with the plain test's verdict.
"""

import math

import numpy as np
import pytest
import scipy.linalg

from refimpl import backend as B
from refimpl import matsqrt
from refimpl.matsqrt import _common, _kernels
from refimpl.matsqrt import forward as msq_forward
from refimpl.matsqrt import sign as msq_sign


def spd_batch(rng, n, bshape, dtype, cond=1e3):
    """SPD members with eigenvalues spread over ``cond`` (geometric)."""
    Q, _ = np.linalg.qr(rng.standard_normal(bshape + (n, n)))
    A = (Q * np.geomspace(1.0, cond, n)) @ np.swapaxes(Q, -1, -2)
    return ((A + np.swapaxes(A, -1, -2)) / 2).astype(dtype)


def plain(monkeypatch):
    """Make every dispatch site take the array-API path on NumPy."""
    monkeypatch.setattr(_kernels, "applies", lambda x: False)


def assert_same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(got, want, equal_nan=True), float(np.max(np.abs(got - want)))


# --------------------------------------------------------------------------
# The symmetric sign iteration: kernel == plain, bit for bit
# --------------------------------------------------------------------------

GRID = [(2, ()), (5, (3,)), (8, (2, 3)), (16, (4,)), (33, (2,)), (4, (40,))]
# the paper's fixed T = 8 (6) leaves ill-conditioned members unconverged, and says so
unconverged_ok = pytest.mark.filterwarnings("ignore::refimpl.backend.ConvergenceWarning")


@unconverged_ok
@pytest.mark.parametrize("n, bshape", GRID, ids=[f"n{n}-b{b}" for n, b in GRID])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", ["eig", "mpa", "mtp", "ns"])
@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
def test_sign_kernel_equals_plain(rng, monkeypatch, n, bshape, dtype, method, inverse):
    """The lyapunov_sign VJP and JVP (adaptive, with the finish, and the paper's
    fixed T = 8) from one forward: the host kernel and the plain path give the
    same gradient, step counts, terms and errors bit for bit; and the gradient
    solves the Lyapunov equation (scipy) on the forward's root."""
    A = spd_batch(rng, n, bshape, dtype)
    G = rng.standard_normal(A.shape).astype(dtype)
    fwd = matsqrt.inv_sqrtm if inverse else matsqrt.sqrtm
    vjp = matsqrt.inv_sqrtm_vjp if inverse else matsqrt.sqrtm_vjp
    jvp = matsqrt.inv_sqrtm_jvp if inverse else matsqrt.sqrtm_jvp
    res = fwd(A, method=method)
    runs = {}
    for path in ("kernel", "plain"):
        if path == "plain":
            plain(monkeypatch)
        for iters in (None, 8):
            g, info = vjp(res, G, method="lyapunov_sign", iters=iters, full_output=True)
            runs[path, iters] = (g, info, jvp(res, G, method="lyapunov_sign", iters=iters))
    for iters in (None, 8):
        (gk, ik, tk), (gp, ip, tp) = runs["kernel", iters], runs["plain", iters]
        assert_same_bits(gk, gp)
        assert_same_bits(tk, tp)
        for field in ("n_iter", "n_terms", "error", "converged", "residual"):
            assert_same_bits(getattr(ik, field), getattr(ip, field))
    # an independent check of what both computed: T X + X T = C (scipy, float64)
    g, info, _ = runs["kernel", None]
    Bh = np.asarray(info.B, dtype=np.float64).reshape((-1, n, n))
    Ch = np.asarray(info.C, dtype=np.float64).reshape((-1, n, n))
    want = np.stack([scipy.linalg.solve_sylvester(b, b, c) for b, c in zip(Bh, Ch)])
    scale = np.max(np.abs(want))
    tol = 1e-8 if dtype == "float64" else 2e-2
    np.testing.assert_allclose(np.asarray(g, dtype=np.float64).reshape(want.shape), want,
                               atol=tol * scale)


@unconverged_ok
@pytest.mark.parametrize("iters", [None, 6])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sign_kernel_in_cache_blocks_equals_plain(rng, monkeypatch, iters, dtype):
    """With a cache budget that puts each member in its own block, the blocked
    kernel still equals the plain single pass bit for bit (members of
    different conditioning stop at different steps)."""
    conds = (3.0, 1e2, 1e4, 10.0, 1e3, 30.0)
    A = np.stack([spd_batch(rng, 6, (), dtype, c) for c in conds]).reshape(2, 3, 6, 6)
    G = rng.standard_normal(A.shape).astype(dtype)
    res = matsqrt.sqrtm(A, method="eig")
    monkeypatch.setattr(_kernels, "CACHE_BLOCK_BYTES", 1)
    assert len(_kernels.batch_blocks(6, 7 * 6 * 6 * 8)) == 6
    blocked, ib = matsqrt.sqrtm_vjp(res, G, method="lyapunov_sign", iters=iters, full_output=True)
    plain(monkeypatch)
    whole, iw = matsqrt.sqrtm_vjp(res, G, method="lyapunov_sign", iters=iters, full_output=True)
    assert_same_bits(blocked, whole)
    for field in ("n_iter", "n_terms", "error", "converged"):
        assert_same_bits(getattr(ib, field), getattr(iw, field))
    if iters is None:
        assert len(set(np.asarray(iw.n_iter).ravel().tolist())) > 1


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_neumann_finish_kernel_equals_plain(rng, dtype):
    """The finish into work arrays equals the plain finish, for one j and for
    members with different j (the masked sum)."""
    n = 7
    B = spd_batch(rng, n, (3,), dtype, 1.5)
    B = (B / np.linalg.norm(B, 2, axis=(-2, -1))[:, None, None]).astype(dtype)
    C = _common.sym(rng.standard_normal((3, n, n))).astype(dtype)
    a, b = np.full(3, 0.6, dtype=dtype), np.full(3, 1.0, dtype=dtype)
    for j in (np.full(3, 4.0, dtype=dtype), np.array([0.0, 3.0, 6.0], dtype=dtype)):
        got = _kernels._finish(B, C, a, b, j, _kernels.work_arrays(B, 3), None)
        assert_same_bits(got, msq_sign.neumann_finish(B, C, a, b, j))


def test_general_lyapunov_has_one_path(rng, monkeypatch):
    """The general (non-symmetric) sign iteration of lyapunov() and
    matrix_sign() are written once: forcing the plain path changes nothing,
    and the solution satisfies B X + X B^T = C (scipy)."""
    Bm = rng.standard_normal((3, 6, 6)) + 6.0 * np.eye(6)
    Cm = rng.standard_normal((3, 6, 6))
    X, S = matsqrt.lyapunov(Bm, Cm).X, matsqrt.matrix_sign(Bm).sign
    plain(monkeypatch)
    assert_same_bits(matsqrt.lyapunov(Bm, Cm).X, X)
    assert_same_bits(matsqrt.matrix_sign(Bm).sign, S)
    for i in range(3):
        want = scipy.linalg.solve_continuous_lyapunov(Bm[i], Cm[i])
        np.testing.assert_allclose(X[i], want, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------
# The forward: kernel == plain, bit for bit (but the SPD solve)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("n, bshape", GRID, ids=[f"n{n}-b{b}" for n, b in GRID])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_forward_pieces_kernel_equal_plain(rng, monkeypatch, n, bshape, dtype):
    """The power block, its contraction and the in-place diagonal shift give
    the plain results bit for bit; the block is
    W^1..W^d (numpy.linalg.matrix_power) and the contraction tensordot."""
    A = spd_batch(rng, n, bshape, dtype)
    s = (-1.0 / rng.uniform(1.0, 3.0, bshape)).astype(dtype)[..., None, None]
    coef = rng.standard_normal((3, 5)).astype(dtype)
    v = rng.standard_normal(bshape).astype(dtype)
    block_k = _kernels.power_block(A, s, 1.0, 5)
    comb_k = _kernels.combine(coef, block_k)
    diag_k = _kernels.add_to_diagonal(A.copy(), v)
    plain(monkeypatch)
    block_p = msq_forward._power_block(A, s, 1.0, 5)
    assert_same_bits(block_k, block_p)
    assert_same_bits(comb_k, msq_forward._combine(coef, block_p))
    assert_same_bits(diag_k, _common.add_to_diagonal(A, v))
    W = (A * s + np.eye(n, dtype=dtype)).astype(np.float64)
    tol = 1e-12 if dtype == "float64" else 1e-4
    for k in range(5):
        np.testing.assert_allclose(block_p[k], np.linalg.matrix_power(W, k + 1),
                                   rtol=tol, atol=tol * np.max(np.abs(W)) ** (k + 1))
    np.testing.assert_allclose(comb_k, np.tensordot(coef, block_p, axes=1), rtol=tol,
                               atol=tol * np.max(np.abs(block_p)))


@pytest.mark.parametrize("n", [5, 70])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", ["mpa", "mtp", "ns", "eig"])
@pytest.mark.parametrize("inverse", [False, True], ids=["sqrtm", "inv_sqrtm"])
def test_forward_kernel_equals_plain(rng, monkeypatch, n, dtype, method, inverse):
    """Whole forwards, bit for bit: the root and its residual.  Both paths
    agree with scipy's root within the method's bound."""
    A = spd_batch(rng, n, (3,), dtype, 30.0)
    fwd = matsqrt.inv_sqrtm if inverse else matsqrt.sqrtm
    k = fwd(A, method=method)
    plain(monkeypatch)
    p = fwd(A, method=method)
    out_k, out_p = (k.S_inv, p.S_inv) if inverse else (k.S, p.S)
    assert_same_bits(out_k, out_p)
    assert_same_bits(k.residual, p.residual)
    for i in range(3):
        root = scipy.linalg.sqrtm(A[i].astype(np.float64)).real
        want = np.linalg.inv(root) if inverse else root
        # the MPA/MTP defaults are approximants: their error bound, not round-off
        bound = float(matsqrt.error_bound(np.linalg.eigvalsh(A[i].astype(np.float64)),
                                          method=method, inverse=inverse,
                                          **({"iters": int(k.n_iter[i])} if method == "ns" else {})))
        tol = bound + (1e-10 if dtype == "float64" else 1e-3)
        assert np.linalg.norm(out_k[i] - want, 2) <= 1.01 * tol * np.linalg.norm(want, 2)


# --------------------------------------------------------------------------
# The LAPACK-level kernels and the work-array helpers
# --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [6, 65])
def test_solve_spd_right_matches_scipy(backend, dtype, rng, n):
    """N D^{-1} equals scipy's solve (float64) to round-off, for a rectangular
    N and a (2, 2) batch, on every backend, an indefinite member included.
    D is never written; float32 stays float32."""
    k = 4
    X = rng.standard_normal((4, n, 2 * n))
    Dh = X @ np.swapaxes(X, -1, -2) / (2 * n) + 0.5 * np.eye(n)
    Dh[2] = np.diag(np.linspace(-1.0, 2.0, n)) + 0.01 * (Dh[2] + Dh[2].T)   # indefinite
    Nh = rng.standard_normal((4, k, n))
    want = np.stack([scipy.linalg.solve(Dh[i], Nh[i].T).T for i in range(4)]).reshape(2, 2, k, n)
    Dh, Nh = Dh.reshape(2, 2, n, n).astype(dtype), Nh.reshape(2, 2, k, n).astype(dtype)
    D, N = backend.asarray(Dh), backend.asarray(Nh)
    got = msq_forward._solve_spd_right(N, D)
    assert B.dtype_name(got.dtype) == B.dtype_name(D.dtype) and tuple(got.shape) == (2, 2, k, n)
    tol = 1e-12 if dtype == "float64" else 2e-4
    if n > 6:
        tol *= 30                                      # condition ~ n / 0.5 (the indefinite member)
    np.testing.assert_allclose(B.to_host(got), want, rtol=tol, atol=tol)
    np.testing.assert_array_equal(B.to_host(D), Dh)


@pytest.mark.parametrize("n", [5, 40, _kernels.SMALL_LAPACK_N + 1],
                         ids=["small", "lapack_loop", "large"])
def test_positive_definite_per_member(backend, dtype, rng, n):
    """True for a batch of SPD members; False as soon as one member is indefinite
    or singular (a zero eigenvalue), whichever batch position it holds: the
    kernel (NumPy, PD_LOOP_MIN_N <= n <= SMALL_LAPACK_N) and the plain test alike."""
    assert _kernels.pd_loop_applies(np.ones((n, n))) == (n == 40)
    X = rng.standard_normal((3, n, 2 * n))
    Ah = (X @ np.swapaxes(X, -1, -2) / (2 * n) + 0.1 * np.eye(n)).astype(dtype)
    assert msq_forward._positive_definite(backend.asarray(Ah))
    assert msq_forward._positive_definite(backend.asarray(Ah[1]))          # no batch axis
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    for bad in (Q @ np.diag(np.linspace(-0.5, 2.0, n)) @ Q.T,           # indefinite
                np.diag(np.arange(n, dtype=float))):                     # singular, zero pivot
        for pos in range(3):
            Ch = Ah.copy()
            Ch[pos] = bad.astype(dtype)
            assert not msq_forward._positive_definite(backend.asarray(Ch)), pos


def test_kernels_apply_on_host_numpy_only(backend):
    """The seam's one decision: DevicePolicy.host_numpy."""
    x = backend.asarray(np.ones((2, 3, 3)))
    assert _kernels.applies(x) == (backend.name == "numpy") == B.policy_of(x).host_numpy


def test_add_to_diagonal_copies_a_non_contiguous_array(rng):
    """A transposed view is not written through: the result is fresh and correct."""
    Ah = rng.standard_normal((2, 3, 3))
    view = np.swapaxes(Ah, -1, -2)
    got = _kernels.add_to_diagonal(view, 1.0)
    np.testing.assert_array_equal(got, np.swapaxes(Ah, -1, -2) + np.eye(3))
    assert got is not view and np.shares_memory(view, Ah)
    np.testing.assert_array_equal(view, np.swapaxes(Ah, -1, -2))


def test_add_to_diagonal_in_place_on_a_work_array(rng):
    """Per member or a scalar, written into a contiguous X (and returned)."""
    Ah, vh = rng.standard_normal((3, 4, 4)), rng.standard_normal(3)
    for val, vv in ((vh, vh[:, None, None]), (2.5, 2.5)):
        X = Ah.copy()
        got = _kernels.add_to_diagonal(X, val)
        np.testing.assert_allclose(got, Ah + vv * np.eye(4), rtol=1e-14)
        assert got is X


def test_work_arrays_are_disjoint_slices():
    like = np.ones((2, 5, 5))
    arrs = _kernels.work_arrays(like, 3)
    assert len(arrs) == 3 and all(a.shape == (2, 5, 5) and a.dtype == like.dtype for a in arrs)
    for k, a in enumerate(arrs):
        np.multiply(like, float(k), out=a)
    for k, a in enumerate(arrs):
        assert float(np.max(np.abs(a - float(k)))) == 0.0


def test_batch_blocks_cover_the_batch_in_balanced_cache_sized_blocks():
    """Blocks are consecutive, cover every member once, differ in size by at most
    one member and stay within CACHE_BLOCK_BYTES (a member larger than that gets
    a block of its own), and are the fewest that do."""
    cap = _kernels.CACHE_BLOCK_BYTES
    for batch, per_member in ((64, cap // 18), (64, cap // 64), (16, 4 * cap), (1, 10), (0, 10),
                              (100, cap // 7)):
        blocks = _kernels.batch_blocks(batch, per_member)
        if batch <= 1:
            assert blocks == [slice(0, batch)]
            continue
        assert blocks[0].start == 0 and blocks[-1].stop == batch
        assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
        sizes = [s.stop - s.start for s in blocks]
        assert max(sizes) - min(sizes) <= 1
        assert all(size == 1 or size * per_member <= cap for size in sizes)
        assert len(blocks) == math.ceil(batch / max(1, cap // per_member))   # the fewest
    # the (64, 64) Lyapunov solve: 7 work arrays of 32 KiB per member
    assert [s.stop - s.start for s in _kernels.batch_blocks(64, 7 * 64 * 64 * 8)] == [16] * 4
