"""Sinkhorn iterations: the log-domain reference and the stabilised scaling
domain, both run by :func:`refimpl.iteration.iterate`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .. import backend
from ..backend import logsumexp, matvec, rmatvec
from ..iteration import Schedule, iterate


def _lse_pair(xp, p, q):
    """``log(exp(p) + exp(q))`` elementwise for finite ``p``, ``q``:
    ``max(p, q) + log1p(exp(-|p - q|))`` (the argument of ``exp`` is <= 0)."""
    return xp.maximum(p, q) + xp.log1p(xp.exp(-xp.abs(p - q)))


def _lse_rows(xp, K, psi):
    """``LSE_j(K_ij + psi_j)`` (..., n).  Two columns (the top-k anchors) are
    combined elementwise by :func:`_lse_pair` instead of reduced over a
    length-2 axis."""
    if K.shape[-1] == 2:
        return _lse_pair(xp, K[..., 0] + psi[..., 0:1], K[..., 1] + psi[..., 1:2])
    return logsumexp(K + psi[..., None, :], -1)


def _lse_cols(xp, K, phi):
    """``LSE_i(K_ij + phi_i)`` (..., m); two rows combined by :func:`_lse_pair`."""
    if K.shape[-2] == 2:
        return _lse_pair(xp, K[..., 0, :] + phi[..., 0:1], K[..., 1, :] + phi[..., 1:2])
    if K.shape[-1] == 2:
        # One contiguous reduction per column (a reduction over axis -2 of an
        # (n, 2) array strides through memory).
        return xp.stack([logsumexp(K[..., :, j] + phi, -1) for j in range(2)], axis=-1)
    return logsumexp(K + phi[..., :, None], -2)


@dataclass(frozen=True)
class _Problem:
    """The constants of one forward solve (the whole batch).

    ``K = -C / eps`` is the log Gibbs kernel; ``a``, ``b`` and their logs are
    broadcast to the batch; ``beta = eps / rho_b`` (0 balanced) enters the
    column target ``b exp(-beta psi)``; ``lim``, ``row_lo``, ``col_lo`` are
    the scaling domain's limits (:func:`_scaling_limits`), and ``range_w``,
    ``range_c`` the same limits as one test on the end state of a block
    (:func:`_range_test`).
    """

    K: Any
    a: Any
    b: Any
    log_a: Any
    log_b: Any
    mass_b: Any
    tol: Any
    tau_a: float
    tau_b: float
    beta: float
    lim: float
    row_lo: Any
    col_lo: Any
    range_w: Any
    range_c: Any


def _marginal_error(xp, pb: _Problem, c, psi):
    """``(error, done, failed)`` of one convergence check: the relative L1
    column error ``||c - t||_1 / ||t||_1`` of the plan with column marginal
    ``c`` against its target ``t = b exp(-beta psi)`` (``t = b``
    balanced); a member stops at ``error <= tol`` and fails on a NaN error.
    Relative to the target's own mass, the error has the same rounding floor
    however far a relaxed side moves the mass from ``sum(b)``."""
    if pb.beta == 0.0:
        target, mass = pb.b, pb.mass_b
    else:
        target = pb.b * xp.exp(-pb.beta * psi)
        mass = xp.sum(target, axis=-1)
    err = backend.reduce_sum(xp.abs(c - target)) / mass
    return err, err <= pb.tol, err != err                     # (NaN)


# -- log domain ---------------------------------------------------------------

# The states are NamedTuples: immutable like a frozen dataclass and a few
# times cheaper to build, which counts when one is made per block of a few
# microseconds.

class _LogState(NamedTuple):
    """``phi = f / eps``, ``psi = g / eps`` and ``lse_col = LSE_i(K_ij + phi_i)``
    of the last row update (None before the first: no column update pending)."""

    phi: Any
    psi: Any
    lse_col: Any


def _log_advance(xp, pb: _Problem, st: _LogState, active, k: int) -> _LogState:
    """``k`` log-domain iterations (module docstring) of the active members: two
    log-sum-exps over the full ``n x m`` array each."""
    keep = active[..., None]
    phi, psi, lse_col = st.phi, st.psi, st.lse_col
    for _ in range(k):
        if lse_col is not None:
            # Column update: psi = tau_b (log b - LSE_i(K_ij + phi_i)).
            psi = xp.where(keep, pb.tau_b * (pb.log_b - lse_col), psi)
        # Row update: phi = tau_a (log a - LSE_j(K_ij + psi_j)); afterwards P 1 = a
        # (balanced) or P 1 = a exp(-f / rho_a) (unbalanced), to round-off.
        phi = xp.where(keep, pb.tau_a * (pb.log_a - _lse_rows(xp, pb.K, psi)), phi)
        lse_col = _lse_cols(xp, pb.K, phi)                       # log(P^T 1) - psi
    return _LogState(phi, psi, lse_col)


def _log_measure(xp, pb: _Problem, st: _LogState):
    """The check after a row update: ``c = P^T 1 = exp(psi + LSE_i(K_ij + phi_i))``."""
    return _marginal_error(xp, pb, xp.exp(st.psi + st.lse_col), st.psi)


# -- stabilised scaling domain ------------------------------------------------

class _ScalingState(NamedTuple):
    """Iterates of the scaling domain (:func:`_scaling_advance`).

    ``phi~ = phi_t``, ``psi~ = psi_t`` the absorbed potentials, ``Kt = K~``,
    ``u``, ``v`` the scalings (within ``exp(+-lim)``); ``sc = K~^T u`` the
    column sums of the last row update (None before the first); ``lsc`` their
    logs where the careful path computed them (None after a fast block): a
    column sum redone in the log domain may underflow as a number, not as a
    log; ``col_bad`` marks members whose last column sums left the accurate
    range (their next column update is absorbed).
    """

    phi_t: Any
    psi_t: Any
    Kt: Any
    u: Any
    v: Any
    sc: Any
    lsc: Any
    col_bad: Any


def _log_scaling(log_target, log_sum, tau: float, absorbed):
    """``log u = tau (log target - log sum) + (tau - 1) absorbed`` (balanced: tau = 1)."""
    if tau == 1.0:
        return log_target - log_sum
    return tau * (log_target - log_sum) + (tau - 1.0) * absorbed


def _scaling_map(xp, target, log_target, tau: float, absorbed):
    """The map ``(sums, out) -> scaling`` of one side, made once per block:
    ``target / sums`` balanced (written into the work array ``out`` where
    the library allows, :func:`refimpl.backend.divide_map`), else ``exp`` of
    :func:`_log_scaling`.  A zero or infinite sum gives a scaling out of
    range (the block's end test catches it)."""
    if tau == 1.0:
        return backend.divide_map(target)
    return lambda sums, out: xp.exp(_log_scaling(log_target, xp.log(sums), tau, absorbed))


def _fast_block(xp, pb: _Problem, st: _ScalingState, k: int):
    """``k`` iterations ``u = a / (K~ v)``, ``v = b / (K~^T u)`` of every
    member with no range test in between: two matrix-vector products and two
    divisions each (floating-point exceptions give inf/NaN silently and fail
    the end test), written into work arrays of the block where the library
    allows.  The caller keeps the state of the members that have stopped.

    Returns the new state and, per member, whether it is valid: no absorption
    pending at the start (``col_bad``), the last sums at or above their
    floors and ``u``, ``v`` within ``exp(+-lim)``.  A valid end state is an
    accurate iterate whatever happened inside the block (the limit is unique;
    only the final sums enter the check).
    """
    mv, rmv = backend.matvec_maps(st.Kt, st.v)                  # v -> K~ v, u -> K~^T u
    row = _scaling_map(xp, pb.a, pb.log_a, pb.tau_a, st.phi_t)
    col = _scaling_map(xp, pb.b, pb.log_b, pb.tau_b, st.psi_t)
    # Work arrays, new for each block: the state the block started from stays
    # intact (the careful path and the stopped members go back to it).
    s, u, sc, v_work = (backend.work_like(x) for x in (st.u, st.u, st.v, st.v))
    v = st.v if st.sc is None else col(st.sc, v_work)          # the pending column update
    for j in range(k):
        s = mv(v, s)
        u = row(s, u)
        sc = rmv(u, sc)
        if j < k - 1:
            v = col(sc, v_work)
    # One reduction for the whole test (:func:`_range_test`): every margin
    # (sums above their floors, scalings within exp(+-lim)) >= 0.
    x = xp.concat([s, sc, u, v, u, v], axis=-1)
    ok = (backend.reduce_min(x * pb.range_w - pb.range_c) >= 0.0) & ~st.col_bad
    return _ScalingState(st.phi_t, st.psi_t, st.Kt, u, v, sc, None, st.col_bad), ok


# The careful path works on the logs ``lu = log u``, ``lv = log v`` and
# updates every member; ``m`` marks those whose tests count (the caller keeps
# the others' results from elsewhere, :func:`_select`).

def _absorb(xp, pb: _Problem, phi_t, psi_t, Kt, lu, lv, need):
    """Fold the scalings of the members ``need`` into ``phi~, psi~`` and
    recompute their ``K~ = exp(K + phi~ 1^T + 1 psi~^T)`` (one exponential
    pass); returns ``(phi~, psi~, K~, log u, log v)``."""
    nd = need[..., None]
    phi_t = xp.where(nd, phi_t + lu, phi_t)
    psi_t = xp.where(nd, psi_t + lv, psi_t)
    Kt = xp.where(nd[..., None], xp.exp(pb.K + phi_t[..., :, None] + psi_t[..., None, :]), Kt)
    return phi_t, psi_t, Kt, xp.where(nd, xp.zeros_like(lu), lu), xp.where(nd, xp.zeros_like(lv), lv)


def _careful_row(xp, pb: _Problem, phi_t, psi_t, Kt, lv, m):
    """Row update ``log u`` with range tests: sums below the floor or
    non-finite scalings are redone in the log domain, ``phi = tau_a (log a -
    LSE_j(K_ij + psi_j))``, and absorbed; so are scalings beyond ``lim``.
    Returns ``(phi~, psi~, K~, log u, log v)``."""
    s = matvec(Kt, xp.exp(lv))
    lu = _log_scaling(pb.log_a, xp.log(xp.maximum(s, pb.row_lo)), pb.tau_a, phi_t)
    bad = m & ((xp.min(s, axis=-1) < pb.row_lo) | ~xp.all(xp.isfinite(lu), axis=-1))
    if backend.any_true(bad):
        phi_log = pb.tau_a * (pb.log_a - _lse_rows(xp, pb.K, psi_t + lv))
        lu = xp.where(bad[..., None], phi_log - phi_t, lu)
    need = bad | (m & (xp.max(xp.abs(lu), axis=-1) > pb.lim))
    if backend.any_true(need):
        return _absorb(xp, pb, phi_t, psi_t, Kt, lu, lv, need)
    return phi_t, psi_t, Kt, lu, lv


def _careful_col_sums(xp, pb: _Problem, phi_t, psi_t, Kt, lu, m):
    """Column sums ``log(K~^T u)``; where they leave the accurate range they
    are redone in the log domain, ``psi~ + LSE_i(K_ij + phi_i)``, and the
    member's next column update is absorbed.  Returns ``(lsc, col_bad)``."""
    sc = rmatvec(Kt, xp.exp(lu))
    lsc = xp.log(xp.maximum(sc, pb.col_lo))
    bad = m & ((xp.min(sc, axis=-1) < pb.col_lo) | ~xp.all(xp.isfinite(sc), axis=-1))
    if backend.any_true(bad):
        lsc = xp.where(bad[..., None], psi_t + _lse_cols(xp, pb.K, phi_t + lu), lsc)
    return lsc, bad


def _careful_block(xp, pb: _Problem, st: _ScalingState, m, k: int) -> _ScalingState:
    """``k`` iterations with the range tests after every half-step (the
    members ``m``)."""
    phi_t, psi_t, Kt, col_bad = st.phi_t, st.psi_t, st.Kt, st.col_bad
    lu, lv, lsc = xp.log(st.u), xp.log(st.v), _log_col_sums(xp, st)
    for j in range(k):
        if j or lsc is not None:
            # Column update log v = tau_b (log b - log(K~^T u)) + (tau_b - 1) psi~,
            # absorbed beyond lim or after inaccurate sums.
            lv = _log_scaling(pb.log_b, lsc, pb.tau_b, psi_t)
            need = m & (col_bad | (xp.max(xp.abs(lv), axis=-1) > pb.lim))
            if backend.any_true(need):
                phi_t, psi_t, Kt, lu, lv = _absorb(xp, pb, phi_t, psi_t, Kt, lu, lv, need)
        phi_t, psi_t, Kt, lu, lv = _careful_row(xp, pb, phi_t, psi_t, Kt, lv, m)
        lsc, col_bad = _careful_col_sums(xp, pb, phi_t, psi_t, Kt, lu, m)
    return _ScalingState(phi_t, psi_t, Kt, xp.exp(lu), xp.exp(lv), xp.exp(lsc), lsc, col_bad)


def _log_col_sums(xp, st: _ScalingState):
    """``log(K~^T u)`` of the state (None before the first row update)."""
    return st.lsc if st.lsc is not None or st.sc is None else xp.log(st.sc)


def _select(xp, m, new: _ScalingState, old: _ScalingState) -> _ScalingState:
    """``new`` for the members ``m``, ``old`` for the others (a new ``K~``
    cache-aligned, as :func:`_scaling_init` makes it)."""
    vec = m[..., None]

    def pick(x, y):
        return x if x is y else xp.where(vec, x, y)       # (a fast block shares phi~, psi~)

    Kt = old.Kt if new.Kt is old.Kt else backend.cache_aligned(xp.where(vec[..., None], new.Kt, old.Kt))
    lsc = None if new.lsc is None and old.lsc is None else pick(_log_col_sums(xp, new), _log_col_sums(xp, old))
    return _ScalingState(pick(new.phi_t, old.phi_t), pick(new.psi_t, old.psi_t), Kt,
                         pick(new.u, old.u), pick(new.v, old.v), pick(new.sc, old.sc), lsc,
                         old.col_bad if new.col_bad is old.col_bad else xp.where(m, new.col_bad, old.col_bad))


def _scaling_advance(xp, pb: _Problem, st: _ScalingState, active, k: int) -> _ScalingState:
    r"""``k`` iterations of the stabilised scaling domain (Schmitzer 2019).

    The potentials are split as ``phi = phi~ + log u``, ``psi = psi~ + log v``
    with the absorbed parts ``phi~, psi~`` folded into the kernel

        K~_ij = exp(K_ij + phi~_i + psi~_j),

    so that ``LSE_j(K_ij + psi_j) = log((K~ v)_i) - phi~_i`` and
    ``LSE_i(K_ij + phi_i) = log((K~^T u)_j) - psi~_j``.  An iteration of the
    module docstring's log-domain scheme then reads

        log u = tau_a (log a - log(K~ v)) + (tau_a - 1) phi~,
        log v = tau_b (log b - log(K~^T u)) + (tau_b - 1) psi~,

    two matrix-vector products (balanced: ``u = a / (K~ v)``,
    ``v = b / (K~^T u)``); the marginal ``c = P^T 1 = v * (K~^T u)`` for the
    stopping rule comes from the product the column update needs.  Exact
    arithmetic gives the log-domain iterates, hence the same stopping rule
    and plan.

    The block runs without tests (:func:`_fast_block`).  A member whose end
    state is out of range (scalings beyond ``exp(+-lim)``, sums below the
    floors of :func:`_scaling_limits`, e.g. rows that underflowed at a small
    ``eps``) is rerun from the block's start with the tests after every
    half-step (:func:`_careful_block`): out-of-range scalings are absorbed
    into ``phi~, psi~`` (``K~`` recomputed) and inaccurate sums redone in the
    log domain.  Each member's path depends on its own data only, so a batch
    gives what a loop gives.
    """
    new, ok = _fast_block(xp, pb, st, k)
    if not backend.all_true(active):
        new = _select(xp, active, new, st)               # the stopped members keep their state
    if backend.all_true(ok):
        return new
    redo = active & ~ok
    if backend.any_true(redo):
        new = _select(xp, redo, _careful_block(xp, pb, st, redo, k), new)
    return new


def _scaling_measure(xp, pb: _Problem, st: _ScalingState):
    """The check after a row update: ``c = P^T 1 = v * (K~^T u)``."""
    return _marginal_error(xp, pb, st.v * st.sc,
                           None if pb.beta == 0.0 else st.psi_t + xp.log(st.v))


def _scaling_init(xp, pb: _Problem, batch) -> _ScalingState:
    """The first row update in the log domain, absorbed: ``K~ = exp(K + phi~)``
    with ``phi~ = tau_a (log a - LSE_j K_ij)``, whose rows hold the row
    marginals (no row has underflowed whatever ``eps`` is).

    With ``mu_i = max_j K_ij``, ``E = exp(K - mu 1^T)`` and ``sigma = E 1``:
    ``LSE_j K_ij = mu_i + log sigma_i``, and on a balanced side
    ``K~ = exp(K + phi~) = D(a / sigma) E`` (one exponential pass).
    ``K~`` is cache-aligned (:func:`refimpl.backend.cache_aligned`): the
    iterations read it twice each.
    """
    n, m = pb.K.shape[-2], pb.K.shape[-1]
    dt, dev = pb.K.dtype, backend.device(pb.K)
    mu = xp.max(pb.K, axis=-1)
    E = xp.exp(pb.K - mu[..., None])
    sigma = xp.sum(E, axis=-1)
    phi_t = pb.tau_a * (pb.log_a - (mu + xp.log(sigma)))
    if pb.tau_a == 1.0:
        Kt = E * (pb.a / sigma)[..., None]
    else:
        Kt = xp.exp(pb.K + phi_t[..., :, None])
    Kt = xp.broadcast_to(backend.cache_aligned(Kt), batch + (n, m))
    ones = xp.ones(batch + (m,), dtype=dt, device=dev)
    return _ScalingState(xp.broadcast_to(phi_t, batch + (n,)), xp.zeros_like(ones), Kt,
                         xp.ones(batch + (n,), dtype=dt, device=dev), ones, None, None,
                         xp.zeros(batch, dtype=xp.bool, device=dev))


def _use_scaling(n: int, m: int, policy: backend.DevicePolicy) -> bool:
    """Whether the forward iterates in the scaling domain
    (:func:`_scaling_advance`) rather than the log domain
    (:func:`_log_advance`, kept as the reference it is tested against).

    On the host it does for every size: its two matrix-vector products cost
    less than the log domain's two full-size log-sum-exps even at
    n = m = 10.  Where reading a value on the host waits for the device
    (``policy.deferred_sync``: CuPy, torch on CUDA) it does not: the scaling
    domain reads the device once more per block (the range test), which has
    not been measured against the log domain's cost there."""
    return not policy.deferred_sync


def _scaling_limits(xp, dtype, n: int, m: int):
    """``(lim, row_floor, col_floor)`` of the scaling domain.

    ``lim = log(max finite) / 4``: scalings stay within ``exp(+-lim)``, so
    ``K~ v`` cannot overflow.  An entry of ``K~`` that underflowed when it was
    formed (below the smallest normal ``t``) is lost; weighted by a scaling
    ``<= exp(lim)`` it is below ``t exp(lim)``, so a row sum of ``m`` such
    terms is accurate to the unit round-off ``u`` when it is at least
    ``row_floor = m t exp(lim) / u`` (``col_floor`` likewise with ``n``).
    """
    fi = xp.finfo(dtype)
    lim = math.log(float(fi.max)) / 4.0
    base = float(fi.smallest_normal) * math.exp(lim) / backend.unit_roundoff(dtype)
    return lim, m * base, n * base


def _range_test(xp, lim: float, row_floor: float, col_floor: float, n: int, m: int, dtype, device):
    """``(w, c)``, each of length ``3 (n + m)``: the end state of a block is in
    range when every margin ``x w - c >= 0`` for ``x = (K~ v, K~^T u, u, v, u,
    v)``, i.e. the sums are at or above their floors (``K~ v / row_floor >=
    1``), ``u exp(lim) >= 1`` and ``1 - u exp(-lim) >= 0`` (likewise ``v``):
    one minimum over all of them, which a NaN anywhere fails."""
    def full(k, value):
        return xp.full((k,), value, dtype=dtype, device=device)

    w = xp.concat([full(n, 1.0 / row_floor), full(m, 1.0 / col_floor), full(n + m, math.exp(lim)),
                   full(n + m, -math.exp(-lim))])
    c = xp.concat([full(2 * (n + m), 1.0), full(n + m, -1.0)])
    return w, c


def _solve_potentials(xp, pb: _Problem, batch, *, max_iter: int, check_every: int, use_scaling: bool):
    """Run the iterations (:func:`refimpl.iteration.iterate`); returns
    ``(phi, psi, Diagnostics)``."""
    schedule = Schedule(max_iter=max_iter, check_every=check_every)
    like = pb.K
    if use_scaling:
        # The unchecked blocks may overflow or divide by zero; their end test
        # catches it (the careful path never computes an inf or NaN it keeps).
        with backend.ignoring_floating_errors():
            st, diag = iterate(lambda s, act, k: _scaling_advance(xp, pb, s, act, k),
                               lambda s: _scaling_measure(xp, pb, s), _scaling_init(xp, pb, batch),
                               batch=batch, like=like, schedule=schedule)
        return st.phi_t + xp.log(st.u), st.psi_t + xp.log(st.v), diag
    n, m = pb.K.shape[-2], pb.K.shape[-1]
    dt, dev = pb.K.dtype, backend.device(pb.K)
    init = _LogState(xp.zeros(batch + (n,), dtype=dt, device=dev),
                     xp.zeros(batch + (m,), dtype=dt, device=dev), None)
    st, diag = iterate(lambda s, act, k: _log_advance(xp, pb, s, act, k),
                       lambda s: _log_measure(xp, pb, s), init,
                       batch=batch, like=like, schedule=schedule)
    return st.phi, st.psi, diag
