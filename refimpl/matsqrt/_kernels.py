"""Host-NumPy fast paths of :mod:`refimpl.matsqrt`: the same operations as the
array-API code, re-scheduled for NumPy and OpenBLAS.

Each function here has a plain counterpart written once against the array API
(used on every backend) and is used instead of it only where the arrays are
NumPy arrays in host memory (:func:`applies`, i.e.
:attr:`refimpl.backend.DevicePolicy.host_numpy`).  What they change is where
results are written and in which grouping members are processed, never the
arithmetic:

* products and sums are written with ``out=`` into preallocated work arrays,
  cut from one block (:func:`work_arrays`), instead of fresh arrays: an
  iteration that allocates a fresh result for every product pays for the
  pages of each new array;
* batches are cut into blocks of members whose working set fits in cache
  (:func:`batch_blocks`); members are independent, so this changes no result;
* the sign iteration uses two sets of iterates in turn (a step writes over the
  set of the step before last, which the driver no longer holds).

So :func:`lyapunov_sign_symmetric`, :func:`power_block`, :func:`combine` and
:func:`add_to_diagonal` return the same bits as their plain counterparts
(``tests/test_matsqrt_kernels.py`` checks it, and the whole forwards and
derivatives with them).  One is a different algorithm for a yes/no answer:
:func:`is_positive_definite` (LAPACK ``potrf`` per member, for
:data:`PD_LOOP_MIN_N` ``<= n <=`` :data:`SMALL_LAPACK_N`), which gives the
plain test's verdict.  The measurements behind these choices are in
docs/performance.md (matrix square root).
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..backend import mT
from . import sign
from ._common import mm

#: Largest matrix order for which the per-member SciPy LAPACK test
#: (:func:`is_positive_definite`) replaces NumPy's batched ``cholesky``: up
#: to this size it stays on one thread; above it NumPy's own ``linalg`` (one
#: thread pool with its products) is used.
SMALL_LAPACK_N = 64

#: Smallest matrix order from which the per-member ``potrf`` loop of
#: :func:`is_positive_definite` beats NumPy's batched ``cholesky`` (below it
#: the Python loop over members costs more than it saves; docs/performance.md).
PD_LOOP_MIN_N = 33

#: The working set, in bytes, that a loop over a batch keeps per block of
#: members (:func:`batch_blocks`): a step of an iteration reads and writes all
#: of its work arrays, and when they exceed what the cache holds every product
#: waits on memory.
CACHE_BLOCK_BYTES = 4 * 2**20

#: Arrays of size n^2 per member that :func:`_sign_block` works in.
SIGN_WORK_ARRAYS = 7


def applies(x) -> bool:
    """Whether the host-NumPy paths apply to arrays like ``x``."""
    return backend.policy_of(x).host_numpy


def pd_loop_applies(A) -> bool:
    """Whether the per-member ``potrf`` test (:func:`is_positive_definite`)
    applies to ``A``: host NumPy, ``PD_LOOP_MIN_N <= n <= SMALL_LAPACK_N``."""
    return applies(A) and PD_LOOP_MIN_N <= A.shape[-1] <= SMALL_LAPACK_N


# --------------------------------------------------------------------------
# Work arrays and cache blocks
# --------------------------------------------------------------------------

def work_arrays(like, count: int) -> list:
    """``count`` uninitialised arrays shaped like ``like``, cut from one block.

    One block of several MB is mapped once; NumPy asks for transparent huge
    pages for blocks of 4 MiB and more (where the kernel offers them in
    ``madvise`` mode), so it is faulted in by one page fault per 2 MB rather
    than 512.
    """
    block = np.empty((count,) + tuple(like.shape), dtype=like.dtype)
    return [block[i, ...] for i in range(count)]


def batch_blocks(batch: int, bytes_per_member: int) -> list[slice]:
    """Slices cutting a flattened batch of ``batch`` members into the fewest
    consecutive blocks whose working set (``bytes_per_member`` each) is at most
    :data:`CACHE_BLOCK_BYTES` (at least one member a block), their sizes
    differing by at most one."""
    if batch <= 1:
        return [slice(0, batch)]
    per = max(1, CACHE_BLOCK_BYTES // max(1, int(bytes_per_member)))
    count = -(-batch // per)                           # ceil: the fewest blocks that fit
    base, extra = divmod(batch, count)                 # sizes base + 1 (extra of them) and base
    stops = [0]
    for i in range(count):
        stops.append(stops[-1] + base + (i < extra))
    return [slice(a, b) for a, b in zip(stops, stops[1:])]


def add_to_diagonal(X, v):
    """``X + v I`` (``v`` a scalar or per member), written into ``X`` itself
    (a work array of the caller's) when it is C-contiguous: the diagonal
    entries get ``x + v``, the others stay, as in the plain ``X + v I``."""
    n = X.shape[-1]
    if not X.flags.c_contiguous:
        return X + (v if isinstance(v, (int, float)) else mm(v)) * np.eye(n, dtype=X.dtype)
    flat = X.reshape(X.shape[:-2] + (n * n,))          # a view: X is contiguous
    flat[..., :: n + 1] += v if isinstance(v, (int, float)) else v[..., None]
    return X


# --------------------------------------------------------------------------
# Forward: the power block, its contraction, the SPD solve, the PD test
# --------------------------------------------------------------------------

def power_block(As, scale, shift: float, d: int):
    """``W = shift I + scale A`` and its powers ``W^1 .. W^d`` written into one
    block (d, ..., n, n); returns the block.  As
    :func:`refimpl.matsqrt.forward._power_block`."""
    block = np.empty((d,) + tuple(As.shape), dtype=As.dtype)
    W = add_to_diagonal(np.multiply(As, scale, out=block[0, ...]), shift)
    for k in range(1, d):
        np.matmul(block[k - 1, ...], W, out=block[k, ...])      # W^{k+1}
    return block


def combine(coef, block):
    """``out[r] = sum_k coef[r, k] block[k]``, as
    :func:`refimpl.matsqrt.forward._combine`, with the per-member products
    written straight into the (r, ..., n, n) result (a strided view)."""
    d, shape = block.shape[0], tuple(block.shape[1:])
    count, nn = math.prod(shape[:-2]), shape[-2] * shape[-1]
    per_member = np.transpose(np.reshape(block, (d, count, nn)), (1, 0, 2))
    out = np.transpose(np.empty((coef.shape[0], count, nn), dtype=block.dtype), (1, 0, 2))
    got = np.matmul(coef, per_member, out=out)         # (count, r, nn)
    return np.reshape(np.transpose(got, (1, 0, 2)), (coef.shape[0],) + shape)


def _cholesky_members(A):
    """LAPACK ``potrf`` per member of a C-order copy of ``A`` (..., n, n), in
    place through its Fortran-order views.  Returns ``(work, info)``:
    ``work`` reads in C order as ``L^T``, upper triangular, where
    ``A = L L^T`` (only one triangle of ``A`` is read); ``info`` (batch
    shape) is LAPACK's, > 0 where the Cholesky broke down (not positive
    definite to working precision).

    Plain per-member calls: up to n = :data:`SMALL_LAPACK_N` they stay on one
    thread.
    """
    from scipy.linalg import get_lapack_funcs

    (potrf,) = get_lapack_funcs(("potrf",), (A,))
    work = np.array(A, order="C", copy=True)
    flat = work.reshape((-1, *work.shape[-2:]))        # a view: work is contiguous
    info = np.zeros(flat.shape[0], dtype=np.int64)
    for i in range(flat.shape[0]):
        _, info[i] = potrf(flat[i].T, lower=1, clean=1, overwrite_a=1)
    return work, info.reshape(work.shape[:-2])


def is_positive_definite(A) -> bool:
    """True when every member of ``A`` (..., n, n; one triangle read) has a
    Cholesky factor with a finite, positive diagonal: LAPACK ``potrf`` per
    member (:func:`_cholesky_members`; no copies out of Fortran order, no
    factor returned)."""
    L_T, info = _cholesky_members(A)
    if bool(np.any(info != 0)):
        return False
    d = np.diagonal(L_T, axis1=-2, axis2=-1)
    return bool(np.all(np.isfinite(d)) and np.all(d > 0))


# --------------------------------------------------------------------------
# The symmetric sign iteration in work arrays and cache blocks
# --------------------------------------------------------------------------

def lyapunov_sign_symmetric(B, C, *, iters, tol, max_iter, l0=None, scale=None,
                            l0_is_bound=False):
    """:func:`refimpl.matsqrt.sign.lyapunov_sign_symmetric` over blocks of
    batch members whose work arrays fit in cache (:func:`batch_blocks`), each
    block run by :func:`_sign_block`.  The members are independent, so the
    blocking changes no result; ``l0`` and ``scale`` are per member
    (broadcast to the batch shape)."""
    n, bshape = B.shape[-1], tuple(B.shape[:-2])
    count = math.prod(bshape)
    blocks = batch_blocks(count, SIGN_WORK_ARRAYS * n * n * B.dtype.itemsize)
    if len(blocks) == 1 or tuple(C.shape) != tuple(B.shape):
        return _sign_block(B, C, iters=iters, tol=tol, max_iter=max_iter,
                           l0=l0, scale=scale, l0_is_bound=l0_is_bound)

    def flat(a):
        return None if a is None else np.reshape(np.broadcast_to(a, bshape), (count,))

    Bf, Cf = np.reshape(B, (count, n, n)), np.reshape(C, (count, n, n))
    l0f, sf = flat(l0), flat(scale)
    parts = [_sign_block(Bf[s, ...], Cf[s, ...], iters=iters, tol=tol, max_iter=max_iter,
                         l0=None if l0f is None else l0f[s],
                         scale=None if sf is None else sf[s],
                         l0_is_bound=l0_is_bound) for s in blocks]
    shapes = (tuple(B.shape), bshape, bshape, bshape, bshape)
    return tuple(np.reshape(np.concatenate([p[i] for p in parts], axis=0), shape)
                 for i, shape in enumerate(shapes))


def _finish(B, C, a, b, j, work, out):
    """:func:`refimpl.matsqrt.sign.neumann_finish` into three work arrays and
    ``out`` (None: a fresh array)."""
    j_max = int(np.max(j))
    same = bool(np.all(j == j_max))
    w = mm(1.0 / (a + b))
    Dw = add_to_diagonal(np.multiply(B, -w, out=work[0]), 0.5)     # I/2 - w B
    term = np.multiply(C, 2.0 * w, out=work[1])        # T^0(2 w C)
    Z = np.multiply(term, 1.0, out=out)                # a copy
    for t in range(1, j_max + 1):
        M = np.matmul(Dw, term, out=work[2])
        term = np.add(M, mT(M), out=work[1])           # T^t(2 w C)
        if same:
            Z = np.add(Z, term, out=Z)
        else:                                          # only members with t <= j
            Z = np.add(Z, np.multiply(term, mm((j >= t).astype(term.dtype)), out=work[2]),
                       out=Z)
    return Z


def _sign_block(B, C, *, iters, tol, max_iter, l0=None, scale=None, l0_is_bound=False):
    """:func:`refimpl.matsqrt.sign.lyapunov_sign_symmetric` for one block of
    members, every product written into work arrays.

    The operations and their order are those of
    :func:`refimpl.matsqrt.sign.symmetric_sign_step` (its per-member decisions
    are called as they are); only where each result is written differs.
    Memory: the scaled inputs, two sets of iterates used in turn (a step
    writes over the set of the step before last, which the driver no longer
    holds) and three work arrays are cut from one block (:func:`work_arrays`),
    so the loop allocates nothing of size n^2 (but for the finish of some
    members while others step).
    """
    s = sign.SignSettings.make(float(np.finfo(B.dtype).eps), iters=iters, tol=tol,
                               l0_is_bound=l0_is_bound)
    B0, C0, B1, C1, *work = work_arrays(B, SIGN_WORK_ARRAYS)
    inv = 1.0 if scale is None else mm(1.0 / scale)
    B0, C0 = np.multiply(B, inv, out=B0), np.multiply(C, inv, out=C0)
    sets = [(B0, C0), (B1, C1)]
    calls = [0]
    bshape = tuple(B.shape[:-2])
    n_terms = np.zeros(bshape, dtype=np.int64)
    finished = [np.zeros(bshape, dtype=bool)]

    def full_step(B, C, R2, l, out):
        """:func:`refimpl.matsqrt.sign.sign_step` from ``R2`` (a work array,
        overwritten) into ``out``."""
        if l is None:                                  # plain Newton–Schulz
            c2, g, l_next = 0.5, 2.0, None
        else:
            c2, g, l_next = sign.chen_chow_step(l, s.u)
            c2 = mm(c2)                                # c2 = a^3/2, g = c1/c2
        P2 = add_to_diagonal(R2, 2.0 * g)              # 2P = 2R + 2g I
        Bn = np.matmul(B, P2, out=out[0])
        Bn *= 0.5 * c2                                 # B_{k+1} = c2 B P
        E = np.matmul(B, C, out=work[1])
        M = np.matmul(E, B, out=work[2])               # B C B
        P2 = add_to_diagonal(P2, -(g + 1.0))           # 2R + (g - 1) I
        M += np.matmul(P2, C, out=work[1])
        Cn = np.add(M, mT(M), out=out[1])
        Cn *= 0.5 * c2                                 # C_{k+1} = c2 sym(M)
        return Bn, Cn, l_next

    def finish_members(B, C, e, l, j, new, out):
        """The finish of the members in ``new`` (their ``j`` terms), into
        ``out`` (None: a fresh array), as
        :func:`refimpl.matsqrt.sign.finish_members`; records their terms."""
        if not bool(np.any(new)):
            return C
        lo, hi = sign.spectrum_interval(e, l, s)
        j = np.where(new, j, np.zeros_like(j))          # others may be inf (no interval)
        n_terms[...] = np.where(new, j.astype(n_terms.dtype), n_terms)
        if bool(np.all(new)):
            return _finish(B, C, lo, hi, j, work, out)
        B_new = B[new]
        Z = _finish(B_new, C[new], lo[new], hi[new], j[new], work_arrays(B_new, 3), None)
        out = np.empty_like(C) if out is None else out
        out[new] = Z
        return out

    def step(state):
        B, C, l = state[0], state[1], (state[2] if len(state) > 2 else None)
        calls[0] += 1
        out = sets[calls[0] % 2]                       # the set of the step before last
        by_bound = s.finish and s.l0_is_bound and l is not None
        if by_bound:
            ready, j = sign.hand_over(None, l, s)
            new = ready & ~finished[0]                 # finish here (once a member)
            done = finished[0] = finished[0] | new
            bound = 1.0 - (l - s.pad) ** 2             # >= ||I - B_k^2||_2, reported
            if bool(np.all(done)):
                return (B, finish_members(B, C, None, l, j, new, out[1]), l), bound, None, done
        R2 = np.matmul(B, B, out=work[0])
        R2 *= -2.0
        R2 = add_to_diagonal(R2, 2.0)                  # 2 (I - B_k^2)
        e = 0.5 * backend.frobenius(R2)
        l_k = l
        if l is not None:
            l = sign.raise_lower_end(l, e)
        if not s.finish:
            Bn, Cn, l_next = full_step(B, C, R2, l, out)
            return (Bn, Cn) + (() if l is None else (l_next,)), e, None
        if by_bound:
            e = np.where(new, bound, e)
        else:
            ready, j = sign.hand_over(e, l, s)
            new = ready & ~finished[0]
            done = finished[0] = finished[0] | new
        tail = () if l is None else (l,)
        if bool(np.all(done)):                         # the rest all finish here
            return (B, finish_members(B, C, e, l, j, new, out[1])) + tail, e, None, done
        Bn, Cn, l_next = full_step(B, C, R2, l, out)
        if bool(np.any(new)):                          # some finish, the others step
            # work is free again; the finish goes to a fresh array
            Z = finish_members(B, C, None if by_bound else e, l_k if by_bound else l, j, new,
                               np.empty_like(Cn))
            Cn = np.where(mm(new), Z, Cn)
        return (Bn, Cn) + (() if l is None else (l_next,)), e, None, done

    state = (B0, C0) if l0 is None else (B0, C0, l0)
    frozen = (False, True, False)[: len(state)]
    state, n_iter, err, conv, _ = sign._newton_schulz(state, step, iters=iters, tol=tol,
                                                      max_iter=max_iter, frozen=frozen)
    return 0.5 * state[1], n_iter, err, conv, n_terms
