"""The matrix sign function and the Lyapunov equation ``B X + X B^T = C``.

Identity (3) of :mod:`refimpl.matsqrt`: for ``B`` with spectrum in the open
right half-plane,

    sign([[B, C], [0, -B^T]]) = [[I, 2X], [0, -I]],   B X + X B^T = C,

computed by Newton–Schulz iterations on the block matrix.  This module holds
the iteration driver (:func:`_newton_schulz`), :func:`matrix_sign`,
:func:`lyapunov`, and the pieces of the symmetric sign iteration used by the
``"lyapunov_sign"`` derivatives: the scaled step of Chen & Chow
(:func:`chen_chow_step`), the spectrum interval it tracks
(:func:`spectrum_interval`), the Neumann-series finish (:func:`neumann_finish`,
:func:`finish_terms`) and the hand-over between them (:func:`hand_over`), put
together in :func:`lyapunov_sign_symmetric`.  Everything here is written once
against the array API; :mod:`refimpl.matsqrt._kernels` re-schedules the
symmetric iteration for host NumPy (work arrays, cache blocks) with the same
operations, so both give the same bits.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import array_api_compat

from .. import backend
from ..backend import eye_like, mT
from ..iteration import Schedule, iterate
from ._common import (DEFAULT_MAX_ITER, add_to_diagonal, check_square, eps, fro, iteration_options,
                      mm, symmetric_part, warn_unconverged)

#: Where host syncs are deferred (a GPU; :class:`refimpl.backend.DevicePolicy`),
#: steps between host reads of "every member stopped" in the Newton–Schulz
#: loops (members are frozen individually in between).  On the host a read
#: costs nothing and is made after every step.
CHECK_EVERY = 2


# --------------------------------------------------------------------------
# Newton–Schulz loops on the iteration driver
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class _NSState:
    """The iterate, the residual of the incoming state of the last step
    (a by-product of the step) and the members the step finished itself
    (None: the step does not finish members)."""

    state: tuple
    err: Any
    stop: Any = None


def _ns_advance(xp, step: Callable, ns: _NSState, active, k: int, *, hold: bool, keep: tuple,
                history: list | None) -> _NSState:
    """``k`` steps ``state <- step(state)``; members not ``active`` keep the
    components marked in ``keep`` when ``hold`` (no mask while every member
    runs, or with a fixed step count)."""
    state, err, stop = ns.state, ns.err, ns.stop
    for _ in range(k):
        new, err, aux, *finished = step(state)
        if history is not None:
            history.append((state, aux, active))
        state = (tuple(xp.where(mm(active), a, b) if f else a for a, b, f in zip(new, state, keep))
                 if hold else new)
        stop = finished[0] if finished else None
    return _NSState(state, err, stop)


def _newton_schulz(state: tuple, step: Callable, *, iters: int | None, tol: float,
                   max_iter: int, record: bool = False, frozen: tuple | None = None):
    """Run ``state <- step(state)`` per member until its residual is <= tol,
    on :func:`refimpl.iteration.iterate`.

    ``step(state) -> (new_state, err, aux)`` where ``err`` (batch shape) is
    the residual of the *incoming* state, a by-product of the step.  Unless
    ``record``, no reference to a state is kept once the next one is made, so
    a step may write its new state into the arrays of the state before its
    incoming one.  With ``iters`` given every member takes exactly ``iters``
    steps (the papers' fixed ``T``); otherwise a member is frozen after the
    first step whose incoming residual is <= tol, so its result does not
    depend on its batch-mates, and the loop ends when all are frozen or after
    ``max_iter`` steps.  The host reads "all stopped" after every step, or
    every :data:`CHECK_EVERY` steps where host syncs are deferred; a step may
    then run after every member has stopped (its results for stopped members
    are discarded) and must accept that.

    ``frozen`` says which state components are held once a member stops
    (default: all); a component that only drives the others (the sign
    iteration's ``B``, which stays at its fixed point) may run on.

    A step may return a fourth item, a per-member mask of the members it
    finished itself (the symmetric sign iteration's finish); those stop
    instead of the ones with ``err <= tol``, and ``converged`` is then
    "stopped" (``tol`` is not used).

    Returns ``(state, n_iter, error, converged, history)``; ``error`` is the
    residual measured at the start of each member's last step, ``history``
    (if ``record``) the list of ``(incoming state, aux, active mask)``.
    """
    xp = array_api_compat.array_namespace(state[0])
    bshape = tuple(state[0].shape[:-2])
    policy = backend.policy_of(state[0])
    history: list | None = [] if record else None
    keep = frozen or (True,) * len(state)

    def advance(ns, active, k):
        # On the host, no mask is needed while every member runs.
        hold = iters is None and (policy.deferred_sync or not backend.all_true(active))
        return _ns_advance(xp, step, ns, active, k, hold=hold, keep=keep, history=history)

    def measure(ns):
        if iters is not None:                                   # a fixed step count
            return ns.err, xp.zeros(bshape, dtype=xp.bool, device=backend.device(ns.err))
        return ns.err, ns.stop if ns.stop is not None else ns.err <= tol

    start = _NSState(state, xp.full(bshape, math.inf, dtype=state[0].dtype,
                                    device=backend.device(state[0])))
    ns, diag = iterate(advance, measure, start, batch=bshape, like=start.err,
                       schedule=Schedule.for_policy(policy, max_iter=iters if iters is not None
                                                    else max_iter, on_device=CHECK_EVERY))
    converged = diag.converged if iters is None else diag.error <= tol
    return ns.state, diag.n_iter, diag.error, converged, history or []


# --------------------------------------------------------------------------
# Matrix sign function and the Lyapunov equation B X + X B^T = C
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SignResult:
    """Result of :func:`matrix_sign`.

    Attributes
    ----------
    sign : the iterate ``X_T`` (..., n, n), ``X_T^2 ~ I``.
    n_iter, error, converged : per member; ``error = ||X_k^2 - I||_F`` at the
        start of the last step (the returned iterate is one step further).
    """

    sign: Any
    n_iter: Any
    error: Any
    converged: Any


def matrix_sign(M, *, iters: int | None = None, tol: float | None = None,
                max_iter: int = DEFAULT_MAX_ITER) -> SignResult:
    """Matrix sign function by the Newton–Schulz iteration.

    ``X_0 = M / ||M||_F`` (per member; ``sign(aM) = sign(M)`` for a > 0),
    ``X_{k+1} = X_k (3I - X_k^2) / 2`` — a polynomial in ``M``, acting on each
    eigenvalue ``lambda`` of ``X_0`` by the scalar map.  That map converges
    quadratically to ``sign(Re lambda)`` when ``|1 - lambda^2| < 1``, which
    holds for every real spectrum without zeros (``|lambda| <= 1`` after the
    scaling) and for complex eigenvalues within 45 degrees of the real axis.
    Outside that region the iteration may not converge (reported and warned
    about) or, in principle, converge to another involution commuting with
    ``M``, which the residual ``||X^2 - I||`` cannot tell apart: check the
    spectrum of such an ``M`` first.  (:func:`lyapunov` guards against this
    with the residual of its own equation.)

    Parameters
    ----------
    M : (..., n, n) float array.
    iters : run exactly this many steps (default: until ``error <= tol``).
    tol : residual tolerance on ``||X_k^2 - I||_F`` (default sqrt(eps)).
    max_iter : step limit of the adaptive mode.

    Examples
    --------
    >>> import numpy as np
    >>> r = matrix_sign(np.array([[2.0, 1.0], [0.0, -3.0]]))
    >>> bool(np.allclose(r.sign @ r.sign, np.eye(2)))
    True
    """
    backend.namespace(M=M)
    check_square(M, "M")
    iters, tol, max_iter = iteration_options(iters, tol, max_iter, eps(M))
    norm = fro(M)
    if not backend.all_true(norm > 0):
        raise ValueError("argument 'M' has a zero member: its sign is undefined")
    eye = eye_like(M)

    def step(state):
        (X,) = state
        X2 = X @ X                                     # X_k^2
        e = fro(X2 - eye)
        return (1.5 * X - 0.5 * (X @ X2),), e, None    # X (3I - X^2) / 2

    (X,), n_iter, err, conv, _ = _newton_schulz((M / mm(norm),), step, iters=iters,
                                                tol=tol, max_iter=max_iter)
    warn_unconverged("matrix_sign", conv, err, tol)
    return SignResult(sign=X, n_iter=n_iter, error=err, converged=conv)


def _lyapunov_sign_core(B0, C0, *, iters, tol, max_iter, symmetric: bool = False, l0=None):
    """Structured Newton–Schulz on sign([[B0, C0], [0, -B0^T]]) (identity (3)).

    ``B0`` must already be scaled (spectrum in the right half-plane, inside
    the unit disc).  Returns ``(X, n_iter, error, converged)`` with ``X =
    C_T / 2`` solving ``B0 X + X B0^T = C0``; a member stops after the first
    step whose incoming ``||I - B_k^2||_F`` is ``<= tol``.  General ``B, C``:
    6 matmuls a step,

        B_{k+1} = (3B - B B^2) / 2,  C_{k+1} = (3C - B^2 C + B C B^T - C (B^T)^2) / 2.

    ``symmetric`` (``B0`` and ``C0`` symmetric): :func:`lyapunov_sign_symmetric`.
    """
    if symmetric:
        return lyapunov_sign_symmetric(B0, C0, iters=iters, tol=tol, max_iter=max_iter,
                                        l0=l0)[:4]

    def step(state):
        B, C = state
        B2 = B @ B
        e = backend.frobenius(eye_like(B) - B2)        # ||I - B_k^2||_F
        C_next = 1.5 * C - 0.5 * (B2 @ C - (B @ C) @ mT(B) + C @ mT(B2))
        return (1.5 * B - 0.5 * (B @ B2), C_next), e, None

    state, n_iter, err, conv, _ = _newton_schulz((B0, C0), step, iters=iters, tol=tol,
                                                 max_iter=max_iter, frozen=(False, True))
    return 0.5 * state[1], n_iter, err, conv


def _lyapunov_newton_sign(B0, C0, *, tol, max_iter):
    """Scaled Newton iteration on sign([[B0, C0], [0, -B0^T]]) (identity (3)).

    The block matrix's inverse is ``[[B^{-1}, B^{-1} C B^{-T}], [0, -B^{-T}]]``,
    so ``Z <- (mu Z + Z^{-1} / mu) / 2`` keeps the structure:

        B_{k+1} = (mu B + B^{-1} / mu) / 2,
        C_{k+1} = (mu C + B^{-1} C B^{-T} / mu) / 2,

    with the determinantal scaling ``mu = |det B|^{-1/n}`` while
    ``||B^{-1} - B||_F > 1e-2`` (then ``mu = 1``, quadratic convergence).  It
    converges for every ``B`` without eigenvalues on the imaginary axis,
    complex spectra far from the real axis included (where the Newton-Schulz
    step of :func:`_lyapunov_sign_core` diverges).  A member stops after the
    first step whose incoming ``||B_k^{-1} - B_k||_F = ||B_k^{-1}(I - B_k^2)||_F``
    is ``<= tol``.  Returns ``(X, n_iter, error, converged)``, ``X = C_T / 2``.
    """
    xp = array_api_compat.array_namespace(B0, C0)
    n = B0.shape[-1]
    batch = tuple(B0.shape[:-2])
    dev = backend.device(B0)
    B, C = B0, C0
    active = xp.ones(batch, dtype=xp.bool, device=dev)
    conv = xp.zeros(batch, dtype=xp.bool, device=dev)
    err = xp.full(batch, math.inf, dtype=B0.dtype, device=dev)
    n_iter = xp.zeros(batch, dtype=xp.int64, device=dev)
    for k in range(1, max_iter + 1):
        Bi = xp.linalg.inv(B)
        e = backend.frobenius(Bi - B)
        _, logdet = xp.linalg.slogdet(B)
        mu = xp.where(e > 1e-2, xp.exp(-logdet / n), xp.ones_like(e))[..., None, None]
        upd = active[..., None, None]
        C = xp.where(upd, 0.5 * (mu * C + (Bi @ C @ mT(Bi)) / mu), C)
        B = xp.where(upd, 0.5 * (mu * B + Bi / mu), B)
        err = xp.where(active, e, err)
        n_iter = xp.where(active, xp.full_like(n_iter, k), n_iter)
        done = e <= tol
        conv = conv | (active & done)
        active = active & ~done & xp.isfinite(e)
        if not backend.any_true(active):
            break
    return 0.5 * C, n_iter, err, conv


# --------------------------------------------------------------------------
# The symmetric sign iteration of the "lyapunov_sign" derivatives
# --------------------------------------------------------------------------
#
# For symmetric B0 (spectrum in (0, 1]) and symmetric C0 every B_k is a
# polynomial in B0 and every C_k symmetric.  A step applies the odd
# polynomial p_k(x) = c1 x + c2 x (1 - x^2) to the block matrix (3); with
# R = I - B^2 and g = c1 / c2, in 5 matmuls,
#
#     B_{k+1} = c2 B P,  P = R + g I,
#     C_{k+1} = c2 sym(M),  M = B C B + (2R + (g - 1) I) C,
#
# equal to the block update c1 C + c2 (C - B^2 C - C B^2 + B C B) when C is
# symmetric (sym(2 R C) = R C + C R; checked with sympy in
# derivations/matsqrt.py).  Plain Newton–Schulz is c1 = 1, c2 = 1/2.

@dataclass(frozen=True)
class SignSettings:
    """What the symmetric sign iteration decides with, fixed for a solve.

    Attributes
    ----------
    finish : hand members over to the Neumann finish (the adaptive mode,
        ``iters`` None); False: the paper's ``iters`` plain steps.
    l0_is_bound : the lower end ``l_k`` is a bound of the spectrum of ``B_k``
        (eig, MPA and MTP forwards), not an estimate (NS forward).
    pad : ``sqrt(eps)``, the rounding allowance of the tracked interval.
    u : ``1 + pad``, the upper end of the interval the scaled steps use.
    target : ``tol^2``, the relative accuracy the finish aims at.
    """

    finish: bool
    l0_is_bound: bool
    pad: float
    u: float
    target: float

    @classmethod
    def make(cls, dtype_eps: float, *, iters, tol: float, l0_is_bound: bool) -> SignSettings:
        pad = math.sqrt(dtype_eps)
        return cls(finish=iters is None, l0_is_bound=l0_is_bound, pad=pad, u=1.0 + pad,
                   target=tol * tol)


def chen_chow_step(l, u: float):
    """``(c2, g, l_next)`` of the scaled step for the interval ``[l, u]`` (per member).

    Chen & Chow (2014): ``p(x) = a x (3 - a^2 x^2) / 2`` with ``a^2 = 3 /
    (u^2 + u l + l^2)``, i.e. ``c1 = a (3 - a^2) / 2``, ``c2 = a^3 / 2``,
    ``g = c1 / c2 = (3 - a^2) / a^2``.  It maps ``l`` and ``u`` to the same
    value and the whole interval into ``[l_next, 1]`` (``p <= 1``, maximal at
    ``1/a``), ``l_next = p(l)``, and is still odd, so the iterate still tends
    to the sign (3).  Small eigenvalues grow by up to ``1.5 sqrt(3) = 2.6`` a
    step instead of 1.5.
    """
    xp = array_api_compat.array_namespace(l)
    a2 = 3.0 / (u * u + u * l + l * l)                   # a^2 = 3 / (u^2 + u l + l^2)
    a = xp.sqrt(a2)
    return 0.5 * a * a2, (3.0 - a2) / a2, 0.5 * a * l * (3.0 - a2 * l * l)


def raise_lower_end(l, e):
    """``l_k <- max(l_k, sqrt(1 - e))``: every eigenvalue ``b`` of ``B_k`` has
    ``|1 - b^2| <= e = ||I - B_k^2||_F`` (a bound whenever ``l_k`` is)."""
    xp = array_api_compat.array_namespace(l, e)
    r = 1.0 - e
    return xp.maximum(l, xp.sqrt(xp.where(r > 0.0, r, xp.zeros_like(r))))


def spectrum_interval(e, l, s: SignSettings):
    """Per member ``[lo, hi]`` holding the spectrum of ``B_k`` (``lo <= 0``:
    none): ``[sqrt(1 - e), sqrt(1 + e)]`` from ``e = ||I - B_k^2||_F`` (None:
    not computed) and, with ``s.l0_is_bound``, ``[l - pad, u]``, which the
    scaled steps keep (widened by ``pad`` for rounding)."""
    lo = hi = None
    if e is not None:
        xp = array_api_compat.array_namespace(e)
        lo = xp.sqrt(xp.maximum(1.0 - e, xp.zeros_like(e)))
        hi = xp.sqrt(1.0 + e)
    if s.l0_is_bound and l is not None:
        xp = array_api_compat.array_namespace(l)
        lo = l - s.pad if lo is None else xp.maximum(lo, l - s.pad)
        hi = xp.full_like(l, s.u) if hi is None else xp.minimum(hi, xp.full_like(hi, s.u))
    return lo, hi


def finish_terms(a, b, target):
    """Per member, the least ``j >= 0`` with ``q^{j+1} b / a <= target``, ``q =
    (b - a) / (b + a)``: the terms after which :func:`neumann_finish` on the
    interval ``[a, b]`` has a relative error bound ``<= target``; ``inf`` where
    ``a <= 0`` (no bound)."""
    xp = array_api_compat.array_namespace(a, b)
    ok = a > 0.0
    a1 = xp.where(ok, a, xp.ones_like(a))
    q = (b - a1) / (b + a1)
    pos = q > 0.0
    qs = xp.where(pos, q, xp.full_like(q, 0.5))
    j = xp.ceil(xp.log(target * a1 / b) / xp.log(qs)) - 1.0
    j = xp.where(pos, xp.maximum(j, xp.zeros_like(j)), xp.zeros_like(j))
    return xp.where(ok, j, xp.full_like(j, math.inf))


def hand_over(e, l, s: SignSettings):
    """Per member: finish now?, and the finish's terms ``j_k``.

    A member hands over when finishing now takes fewer products than one more
    step (5 products) and the finish after it: ``j_k < 5 + j_{k+1}``, with
    ``j_{k+1}`` from ``l_{k+1}`` (``s.l0_is_bound``) or from the plain step's
    error model ``e' = e^2 (3 + e) / 4``.
    """
    lo, hi = spectrum_interval(e, l, s)
    j_now = finish_terms(lo, hi, s.target)
    if s.l0_is_bound and l is not None:
        xp = array_api_compat.array_namespace(l)
        l_next = chen_chow_step(l, s.u)[2]
        j_next = finish_terms(l_next - s.pad, xp.full_like(l_next, s.u), s.target)
    else:                                                # the plain step's model
        xp = array_api_compat.array_namespace(e)
        e_next = xp.where(e < 1.0, e * e * (3.0 + e) / 4.0, e)
        lo, hi = spectrum_interval(e_next, None, s)
        j_next = finish_terms(lo, hi, s.target)
    return j_now < 5.0 + j_next, j_now


def neumann_finish(B, C, a, b, j):
    """``Z = 2X`` with ``B X + X B = C`` for symmetric ``B`` with spectrum in
    ``[a, b]`` (``0 < a <= b``, per member) and symmetric ``C``.

    The operator ``L(Y) = B Y + Y B`` is symmetric positive definite on
    symmetric matrices (Frobenius inner product), with spectrum ``{b_i +
    b_j}`` in ``[2a, 2b]``, and ``L(Z) = 2C``.  With ``w = 1 / (a + b)``,
    ``I - w L`` has norm ``q = (b - a) / (b + a) < 1`` there, so (Richardson
    iteration, a Neumann series)

        Z = sum_t T^t(2 w C),  T(Y) = Y - w L(Y) = M + M^T,  M = (I/2 - w B) Y

    for symmetric ``Y``: one product a term.  Stopping after ``t = j`` leaves
    ``w q^{j+1} / (1 - q) ||2C||`` against ``||Z|| >= ||2C|| / (2b)``: a
    relative error ``<= q^{j+1} b / a`` (plus rounding; ``j`` from
    :func:`finish_terms`, per member: ``j = 0`` for a member not finished
    here, whose result is unused).  Every term is exactly symmetric, and the
    map ``C -> Z`` is a polynomial in ``L``: linear and self-adjoint.
    """
    xp = array_api_compat.array_namespace(B, C)
    j_max = int(xp.max(j))
    same = backend.all_true(j == j_max)
    w = mm(1.0 / (a + b))
    Dw = add_to_diagonal(B * -w, 0.5)                    # I/2 - w B
    term = C * (2.0 * w)                                 # T^0(2 w C)
    Z = term * 1.0
    for t in range(1, j_max + 1):
        M = Dw @ term
        term = M + mT(M)                                 # T^t(2 w C)
        if same:
            Z = Z + term
        else:                                            # only members with t <= j
            Z = Z + term * mm(xp.astype(j >= t, term.dtype))
    return Z


def finish_members(B, C, lo, hi, j, new):
    """:func:`neumann_finish` of the members in ``new`` (their ``j`` terms, on
    their interval ``[lo, hi]``); the other members' entries are unspecified.
    Returns ``(Z, j)`` with ``j`` zero outside ``new``; no member in ``new``:
    ``(C, j)``.  That happens where host syncs are deferred
    (:attr:`refimpl.backend.DevicePolicy.deferred_sync`): the driver tests
    "all stopped" every :data:`CHECK_EVERY` steps, so a step may run after the
    last member finished, and gathering no member would leave nothing to reduce.
    """
    xp = array_api_compat.array_namespace(B, C)
    if not backend.any_true(new):
        return C, j
    j = xp.where(new, j, xp.zeros_like(j))               # others may be inf (no interval)
    if backend.all_true(new):
        return neumann_finish(B, C, lo, hi, j), j
    # only the members that finish here, gathered: with many members finishing
    # at different steps (small n, large batches) a finish over the whole batch
    # each time costs more than it saves
    out = xp.empty_like(C)
    out[new] = neumann_finish(B[new], C[new], lo[new], hi[new], j[new])
    return out, j


def sign_step(B, C, R2, l, s: SignSettings):
    """One (scaled) sign step from ``R2 = 2 (I - B^2)``, ``l`` already raised
    (None: plain Newton–Schulz).  Returns ``(B_{k+1}, C_{k+1}, l_{k+1})``."""
    if l is None:                                        # plain Newton–Schulz
        c2, g, l_next = 0.5, 2.0, None
    else:
        c2, g, l_next = chen_chow_step(l, s.u)
        c2 = mm(c2)                                      # c2 = a^3/2, g = c1/c2
    P2 = add_to_diagonal(R2, 2.0 * g)                    # 2P = 2R + 2g I
    Bn = B @ P2
    Bn = Bn * (0.5 * c2)                                 # B_{k+1} = c2 B P
    M = (B @ C) @ B                                      # B C B
    P2 = add_to_diagonal(P2, -(g + 1.0))                 # 2R + (g - 1) I
    M = M + P2 @ C
    Cn = M + mT(M)
    Cn = Cn * (0.5 * c2)                                 # C_{k+1} = c2 sym(M)
    return Bn, Cn, l_next


def doubled_residual(B):
    """``(R2, e)``: ``R2 = 2 (I - B^2)`` and ``e = ||I - B^2||_F`` per member."""
    R2 = (B @ B) * -2.0
    R2 = add_to_diagonal(R2, 2.0)                        # 2 (I - B_k^2)
    return R2, 0.5 * fro(R2)


#: Which components of the state tuple the driver holds once a member stops:
#: only ``C`` (``B`` stays at its fixed point; the rest are per-member records
#: the step keeps itself).
SYMMETRIC_FROZEN = (False, True, False, False, False)


def symmetric_sign_step(state: tuple, s: SignSettings):
    """One step of :func:`lyapunov_sign_symmetric` for :func:`_newton_schulz`:
    ``state = (B, C, l, finished, n_terms)`` -> ``(new state, error, None[, done])``."""
    B, C, l, finished, n_terms = state
    xp = array_api_compat.array_namespace(B, C)
    by_bound = s.finish and s.l0_is_bound and l is not None
    if by_bound:
        # decided on the tracked interval alone, before B^2 is formed: a
        # member's choice never depends on whether its batch-mates step on
        ready, j = hand_over(None, l, s)
        new = ready & ~finished                          # finish here (once a member)
        finished = finished | new
        bound = 1.0 - (l - s.pad) ** 2                   # >= ||I - B_k^2||_2, reported
        if backend.all_true(finished):
            Z, n_terms = _finished_c(B, C, None, l, j, new, n_terms, s)
            return (B, Z, l, finished, n_terms), bound, None, finished
    R2, e = doubled_residual(B)
    l_k = l
    if l is not None:
        l = raise_lower_end(l, e)
    if not s.finish:
        Bn, Cn, l_next = sign_step(B, C, R2, l, s)
        return (Bn, Cn, l_next, finished, n_terms), e, None
    if by_bound:
        e = xp.where(new, bound, e)
    else:
        ready, j = hand_over(e, l, s)
        new = ready & ~finished
        finished = finished | new
    if backend.all_true(finished):                           # the rest all finish here
        Z, n_terms = _finished_c(B, C, e, l, j, new, n_terms, s)
        return (B, Z, l, finished, n_terms), e, None, finished
    Bn, Cn, l_next = sign_step(B, C, R2, l, s)
    if backend.any_true(new):                                # some finish, the others step
        Z, n_terms = _finished_c(B, C, None if by_bound else e, l_k if by_bound else l, j, new,
                                 n_terms, s)
        Cn = xp.where(mm(new), Z, Cn)
    return (Bn, Cn, l_next, finished, n_terms), e, None, finished


def _finished_c(B, C, e, l, j, new, n_terms, s: SignSettings):
    """The finish of the members in ``new`` on their interval (from ``e``,
    ``l``) and the term counts with theirs recorded."""
    xp = array_api_compat.array_namespace(B, C)
    if not backend.any_true(new):
        return C, n_terms
    lo, hi = spectrum_interval(e, l, s)
    Z, j = finish_members(B, C, lo, hi, j, new)
    return Z, xp.where(new, xp.astype(j, n_terms.dtype), n_terms)


def lyapunov_sign_symmetric(B, C, *, iters, tol, max_iter, l0=None, scale=None,
                            l0_is_bound=False):
    """The sign iteration (3) for ``B0 = B / scale`` (symmetric, spectrum in
    ``(0, 1]``) and ``C0 = C / scale`` (symmetric; ``scale`` per member,
    default 1); returns ``(X, n_iter, error, converged, n_terms)``, ``X``
    solving ``B X + X B = C`` and the rest as :class:`LyapunovResult`.

    Steps: the 5-matmul symmetric form above (:func:`sign_step`).

    Scaling (``iters`` None; ``l0`` per member, in ``(0, 1]``: a lower bound,
    or an estimate, of the smallest eigenvalue of ``B0``): the step for the
    interval ``[l_k, u]`` of Chen & Chow (:func:`chen_chow_step`), ``l_{k+1} =
    p_k(l_k)``.  ``u = 1 + sqrt(eps)`` leaves room for rounding above the
    bound 1: every eigenvalue below ``sqrt(u^2 + u l + l^2) >= u`` is mapped
    into ``(0, 1]``.  ``l_k`` is raised to ``sqrt(1 - ||I - B_k^2||_F)`` when
    that is larger (:func:`raise_lower_end`), so ``a_k -> 1`` as the residual
    vanishes.  An ``l0`` that overestimates the smallest eigenvalue costs
    speed, never correctness: ``a_k >= 1`` (up to the headroom), so a small
    eigenvalue still grows at least 1.5x a step until the steps become plain
    ones, which converge on ``(0, sqrt 3)``.

    Finish (``iters`` None): every iterate keeps the solution, ``B_k X + X
    B_k = C_k`` (``sign(M_{k+1}) = sign(p_k(M_k)) = sign(M_k)``), and once
    the spectrum of ``B_k`` lies in a narrow interval ``[a, b]`` around 1
    (:func:`spectrum_interval`; with ``l0_is_bound`` also the tracked ``[l_k,
    u]``, much narrower since ``e_k`` sums over all ``n`` eigenvalues) that
    equation is solved by a Neumann series (:func:`neumann_finish`, one
    product a term, against five a sign step) to the relative accuracy
    ``tol^2`` that one more sign step from residual ``tol`` would give.  A
    member hands over at the first step where that takes fewer products
    (:func:`hand_over`); with ``l0_is_bound`` that is decided before ``B_k^2``
    is formed, which the finish then does without (the reported error is then
    the bound ``1 - l_k^2`` on ``||I - B_k^2||_2``).  ``n_iter`` counts the
    finish as a step, ``n_terms`` its terms.  ``iters`` given: exactly that
    many plain steps, the paper's setting.

    Written once against the array API; on host NumPy
    :func:`refimpl.matsqrt._kernels.lyapunov_sign_symmetric` runs the same
    operations in work arrays and cache-sized blocks, with the same result bit
    for bit.
    """
    xp = array_api_compat.array_namespace(B, C)
    s = SignSettings.make(eps(B), iters=iters, tol=tol, l0_is_bound=l0_is_bound)
    inv = 1.0 if scale is None else mm(1.0 / scale)
    bshape, dev = tuple(B.shape[:-2]), backend.device(B)
    state = (B * inv, C * inv, l0, xp.zeros(bshape, dtype=xp.bool, device=dev),
             xp.zeros(bshape, dtype=xp.int64, device=dev))
    state, n_iter, err, conv, _ = _newton_schulz(
        state, lambda st: symmetric_sign_step(st, s), iters=iters, tol=tol, max_iter=max_iter,
        frozen=SYMMETRIC_FROZEN)
    return 0.5 * state[1], n_iter, err, conv, state[4]

@dataclass(frozen=True)
class LyapunovResult:
    """Result of :func:`lyapunov`.

    Attributes
    ----------
    X : the solution of ``B X + X B^T = C`` (..., n, n).
    B, C : the inputs (references).
    method : "sign" or "eig".
    residual : per member ``||B X + X B^T - C||_F / (2 ||B||_F ||X||_F + ||C||_F)``
        (a normwise backward error; ~eps for an accurate solve).
    n_iter, error, converged : per member (sign method: the sign iteration's
        ``||B_k^2 - I||_F`` at its last step, or, where a VJP's iteration
        finished on its tracked spectrum bound ``l_k``, the bound ``1 - l_k^2``
        on ``||B_k^2 - I||_2``; eig: 0 steps, error 0).
    n_terms : per member, the Neumann terms of the finish that ended the
        iteration (the scaled iteration of a VJP, see
        :func:`lyapunov_sign_symmetric`; ``n_iter`` counts it as a step),
        else 0.
    """

    X: Any
    B: Any
    C: Any
    method: str
    residual: Any
    n_iter: Any
    error: Any
    converged: Any
    n_terms: Any = 0


def _lyapunov_residual(B, C, X):
    R = B @ X + X @ mT(B) - C
    return fro(R) / (2.0 * fro(B) * fro(X) + fro(C))


def _symmetric_eig_solve(U, lam, C, denom_fn):
    """``U [(U^T C U) o K] U^T`` with ``K_ij = denom_fn(lam_i, lam_j)`` (a
    Loewner / divided-difference matrix in the eigenbasis of a symmetric matrix)."""
    K = denom_fn(lam[..., :, None], lam[..., None, :])
    return U @ (((mT(U) @ C) @ U) * K) @ mT(U)


def lyapunov(B, C, *, method: str = "sign", iters: int | None = None,
             tol: float | None = None, max_iter: int = DEFAULT_MAX_ITER,
             sym_tol: float | None = None) -> LyapunovResult:
    """Solve the continuous Lyapunov equation ``B X + X B^T = C`` (batched).

    Parameters
    ----------
    B, C : (..., n, n) float arrays (batch dimensions broadcast).
    method : ``"sign"`` — Newton–Schulz on the block sign function (3) after
        scaling by ``||B||_F``; members it leaves unconverged (a spectrum far
        from the real axis, e.g. eigenvalues ``1 +- 1.5i``) are solved by the
        scaled Newton iteration on the same block matrix.  Needs the spectrum
        of ``B`` in the open right half-plane (e.g. B SPD); non-convergence is
        reported and warned about.
        ``"eig"`` — ``B`` symmetric (up to ``sym_tol``): ``X = U [(U^T C U) /
        (b_i + b_j)] U^T`` from ``eigh(B)``; ValueError when some
        ``b_i + b_j`` is zero to working precision.
    iters, tol, max_iter : the sign iteration's fixed step count, tolerance on
        ``||B_k^2 - I||_F`` (default sqrt(eps)) and step limit.

    Examples
    --------
    >>> import numpy as np
    >>> B = np.array([[3.0, 1.0], [0.5, 2.0]]); C = np.array([[1.0, 0.0], [2.0, 1.0]])
    >>> X = lyapunov(B, C).X
    >>> bool(np.allclose(B @ X + X @ B.T, C))
    True
    """
    backend.check_choice(method, "method", ("sign", "eig"))
    B_b, C_b = _lyapunov_inputs(B, C)
    if method == "sign":
        X, residual, n_iter, err, conv = _lyapunov_by_sign(B_b, C_b, iters, tol, max_iter)
    else:
        X, residual, n_iter, err, conv = _lyapunov_by_eig(B_b, C_b, sym_tol)
    return LyapunovResult(X=X, B=B, C=C, method=method, residual=residual,
                          n_iter=n_iter, error=err, converged=conv)


def _lyapunov_inputs(B, C):
    """``B, C`` validated (square, same dtype) and broadcast to one batch shape."""
    xp = backend.namespace(B=B, C=C)
    check_square(B, "B")
    backend.check_array(C, "C", min_ndim=2)
    if tuple(C.shape[-2:]) != tuple(B.shape[-2:]):
        raise ValueError(f"argument 'C' has shape {tuple(C.shape)} but 'B' is "
                         f"{B.shape[-1]}x{B.shape[-1]}")
    if backend.dtype_name(B.dtype) != backend.dtype_name(C.dtype):
        raise TypeError(f"arguments 'B' ({backend.dtype_name(B.dtype)}) and 'C' "
                        f"({backend.dtype_name(C.dtype)}) must have the same dtype")
    try:
        return xp.broadcast_arrays(B, C)
    except ValueError:
        raise ValueError(f"batch shapes of 'B' {tuple(B.shape[:-2])} and 'C' "
                         f"{tuple(C.shape[:-2])} do not broadcast") from None


def _lyapunov_by_sign(B, C, iters, tol, max_iter):
    """:func:`lyapunov`, method "sign": ``(X, residual, n_iter, error, converged)``."""
    xp = array_api_compat.array_namespace(B, C)
    iters, tol, max_iter = iteration_options(iters, tol, max_iter, eps(B))
    sigma = fro(B)
    if not backend.all_true(sigma > 0):
        raise ValueError("argument 'B' has a zero member: B X + X B^T = C is singular")
    B0, C0 = B / mm(sigma), C / mm(sigma)
    with warnings.catch_warnings():
        # A diverging member overflows (it is redone below, or reported).
        warnings.simplefilter("ignore", RuntimeWarning)
        X, n_iter, err, conv = _lyapunov_sign_core(B0, C0, iters=iters, tol=tol,
                                                   max_iter=max_iter)
    if iters is None and not backend.all_true(conv):
        # Newton-Schulz converges only for spectra near the real axis; the
        # scaled Newton iteration solves the members it left unconverged.
        Xn, n_n, err_n, conv_n = _lyapunov_newton_sign(B0, C0, tol=tol, max_iter=max_iter)
        redo = ~conv
        X = xp.where(mm(redo), Xn, X)
        n_iter = xp.where(redo, n_n, n_iter)
        err = xp.where(redo, err_n, err)
        conv = xp.where(redo, conv_n, conv)
    residual = _lyapunov_residual(B, C, X)
    # A converged sign iteration with a large residual means B was not
    # positive stable (the iteration found the sign of another matrix).
    conv = conv & (residual <= math.sqrt(eps(B)))
    warn_unconverged("lyapunov(method='sign')", conv, xp.maximum(err, residual), tol,
                     stacklevel=4)
    return X, residual, n_iter, err, conv


def _lyapunov_by_eig(B, C, sym_tol):
    """:func:`lyapunov`, method "eig" (``B`` symmetric): ``(X, residual, n_iter,
    error, converged)`` with no steps and error 0."""
    xp = array_api_compat.array_namespace(B, C)
    Bs, norm = symmetric_part(B, "B", sym_tol)
    lam, U = xp.linalg.eigh(Bs)
    pair = lam[..., :, None] + lam[..., None, :]
    small = xp.min(xp.abs(pair), axis=(-2, -1)) <= 10.0 * B.shape[-1] * eps(B) * norm
    if backend.any_true(small):
        raise ValueError("argument 'B' has eigenvalues b_i + b_j = 0 to working "
                         "precision: B X + X B^T = C is singular")
    X = _symmetric_eig_solve(U, lam, C, lambda a, b: 1.0 / (a + b))
    bshape, dev = tuple(B.shape[:-2]), backend.device(B)
    return (X, _lyapunov_residual(B, C, X), xp.zeros(bshape, dtype=xp.int64, device=dev),
            xp.zeros(bshape, dtype=B.dtype, device=dev), xp.ones(bshape, dtype=xp.bool, device=dev))
