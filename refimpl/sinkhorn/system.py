"""The backward linear system ``M [x; y] = [t_a; t_b]`` and its solvers
(``schur``, ``cg``, ``reduced``, ``kkt``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .. import backend
from ..iteration import Diagnostics, Schedule, iterate
from ..backend import matvec, mT, rmatvec
from .results import SinkhornResult

METHODS = ("schur", "cg", "reduced", "kkt")

#: Largest KKT system (``nm + n + m`` unknowns) ``method="kkt"`` will form.
KKT_MAX_UNKNOWNS = 2500


def _cond_threshold(dtype) -> float:
    """``1 / sqrt(u)``: the condition number of ``S^`` above which a dense solve
    falls back to the eigendecomposition (and a warning is considered)."""
    return 1.0 / math.sqrt(backend.unit_roundoff(dtype))


# --------------------------------------------------------------------------
# The backward linear system  M [x; y] = [t_a; t_b]
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SolveInfo:
    """What one solve of the backward system reports.

    Attributes
    ----------
    side : ``"cols"`` or ``"rows"``, the side kept after eliminating the
        other (``None``: ``reduced``/``kkt``, which eliminate nothing).
    gap, lambda_max, cond : per member, the smallest nonzero and the largest
        eigenvalue of the scaled Schur complement ``S^`` and their ratio
        (``None`` where the method does not compute them).
    n_dropped : per member, near-null directions truncated by the
        eigendecomposition fallback of ``schur`` (``None`` for other methods).
    cg : the CG iterations' :class:`refimpl.iteration.Diagnostics` (per
        member ``n_iter``, ``error`` = relative residual in the ``D_c^{-1}``
        norm, ``converged``); ``None`` for direct methods.
    cg_tol : the CG tolerance used (``None`` for direct methods).
    """

    side: str | None = None
    gap: Any = None
    lambda_max: Any = None
    cond: Any = None
    n_dropped: Any = None
    cg: Diagnostics | None = None
    cg_tol: float | None = None


@dataclass(frozen=True)
class _System:
    """``M = [[D_r (1 + alpha), P], [P^T, D_c (1 + beta)]]`` of one result.

    ``r``, ``c`` are ``P``'s marginals with exact zeros (a row or column of
    ``P`` underflowed before convergence) replaced by 1; ``iso_r``/``iso_c``
    flag those isolated nodes (``None``: there are none).  An isolated node's
    equation reads ``0 = 0``; the unit diagonal decouples it with solution 0,
    and :func:`_isolated_vjp` / :func:`_isolated_jvp` supply its limit.
    """

    P: Any
    r: Any
    c: Any
    alpha: float
    beta: float
    balanced: bool
    iso_r: Any = None
    iso_c: Any = None

    @property
    def n(self) -> int:
        return self.P.shape[-2]

    @property
    def m(self) -> int:
        return self.P.shape[-1]

    @property
    def c_mass(self):
        """The true column marginal ``P^T 1`` (zeros kept)."""
        if self.iso_c is None:
            return self.c
        xp = backend.namespace(c=self.c)
        return xp.where(self.iso_c, xp.zeros_like(self.c), self.c)

    def transposed(self) -> "_System":
        return _System(mT(self.P), self.c, self.r, self.beta, self.alpha, self.balanced,
                       self.iso_c, self.iso_r)


def _isolated(xp, mass):
    """``(mass with zeros replaced by 1, zero-mass mask or None)``."""
    iso = mass == 0
    if not backend.any_true(iso):
        return mass, None
    return xp.where(iso, xp.ones_like(mass), mass), iso


def _indicator(xp, iso, like):
    """``iso`` as 0/1 in ``like``'s dtype (zeros when ``iso`` is None)."""
    return xp.zeros_like(like) if iso is None else xp.astype(iso, like.dtype)


def _system(res: SinkhornResult) -> _System:
    xp = backend.namespace(P=res.P)
    P = res.P
    r, iso_r = _isolated(xp, xp.sum(P, axis=-1))
    c, iso_c = _isolated(xp, xp.sum(P, axis=-2))
    return _System(P=P, r=r, c=c,
                   alpha=0.0 if res.rho_a is None else res.eps / res.rho_a,
                   beta=0.0 if res.rho_b is None else res.eps / res.rho_b,
                   balanced=res.balanced, iso_r=iso_r, iso_c=iso_c)


def _schur_operator(sys: _System):
    """Scaled Schur complement ``S^`` of the column block (rows eliminated), dense.

    ``W = P^T D_r^{-1} P``; ``S = D_c (1 + beta) - W / (1 + alpha)
    = L / (1 + alpha) + D_c (beta + alpha / (1 + alpha))`` with the Laplacian
    ``L = diag(W_off 1) - W_off``; ``S^ = D_c^{-1/2} S D_c^{-1/2}``.  An
    isolated column (``c_j = 0``) gets ``S^_jj = 1 + beta``, the limit of a
    column whose mass tends to 0.
    """
    xp = backend.namespace(P=sys.P)
    P = sys.P
    W = mT(P / sys.r[..., :, None]) @ P                       # P^T D_r^{-1} P   (k x k)
    eye = backend.eye_like(W)
    W_off = W * (1.0 - eye)
    L = backend.diag_embed(xp.sum(W_off, axis=-1)) - W_off     # exact Laplacian, L 1 = 0
    if sys.iso_c is not None:
        L = L + backend.diag_embed(_indicator(xp, sys.iso_c, sys.c))
    s = 1.0 / xp.sqrt(sys.c)
    S_hat = (s[..., :, None] * L * s[..., None, :]) / (1.0 + sys.alpha)
    shift = sys.beta + sys.alpha / (1.0 + sys.alpha)
    if shift != 0.0:
        S_hat = S_hat + shift * eye
    return S_hat


def _eig_solve(sys: _System, S_hat, rhs_hat):
    """Pseudo-inverse solve ``y^ = S^+ rhs^`` through ``eigh``.

    Balanced: the null eigenvector (``~ sqrt(c)``, the smallest) is dropped.
    Any eigenvalue ``<= k u lambda_max`` is dropped too (least squares on the
    consistent singular system).  Returns ``(y^, n_dropped)``.
    """
    xp = backend.namespace(S=S_hat)
    k = S_hat.shape[-1]
    lam, Q = xp.linalg.eigh(S_hat)
    lam_max = lam[..., -1]
    thresh = (k * backend.unit_roundoff(S_hat.dtype)) * xp.maximum(lam_max, xp.ones_like(lam_max))
    keep = lam > thresh[..., None]
    if sys.balanced:
        keep = keep & (xp.arange(k, device=backend.device(S_hat)) > 0)
    inv = xp.where(keep, 1.0 / xp.where(keep, lam, xp.ones_like(lam)), xp.zeros_like(lam))
    y_hat = matvec(Q, rmatvec(Q, rhs_hat) * inv)             # Q diag(1/lambda) Q^T rhs
    # Directions dropped beyond the exact null vector of the balanced problem.
    n_dropped = xp.sum(xp.astype(~keep, xp.int64), axis=-1) - (1 if sys.balanced else 0)
    return y_hat, n_dropped


def _cond_from(xp, gap, lam_max):
    positive = gap > 0
    return xp.where(positive, lam_max / xp.where(positive, gap, xp.ones_like(gap)),
                    xp.full_like(gap, math.inf))


def _gauss_seidel_sweep(sys: _System, t_a, t_b, x, y, mask=None):
    """One block Gauss-Seidel sweep ``y <- D_c'^{-1}(t_b - P^T x)``,
    ``x <- D_r'^{-1}(t_a - P y)``: a no-op on an exact solution, it recovers
    full relative accuracy on nodes of tiny mass (where ``y = y^ / sqrt(c)``
    amplifies the error of the scaled solve), since each entry becomes a
    ``P``-weighted average.  Skipped (``mask`` False) for members whose solve
    was truncated, where the residual is deliberately non-zero."""
    xp = backend.namespace(P=sys.P)
    P = sys.P
    y_new = (t_b - rmatvec(P, x)) / (sys.c * (1.0 + sys.beta))
    x_new = (t_a - matvec(P, y_new)) / (sys.r * (1.0 + sys.alpha))
    if mask is None:
        return x_new, y_new
    return xp.where(mask[..., None], x_new, x), xp.where(mask[..., None], y_new, y)


def _spectrum(sys: _System, S_hat):
    """``(gap, lambda_max)`` of ``S^`` by ``eigvalsh``: the second smallest
    eigenvalue when balanced (the smallest is the null one; ``k = 1`` has no
    gap and gets 1), else the smallest."""
    xp = backend.namespace(S=S_hat)
    lam = xp.linalg.eigvalsh(S_hat)
    k = lam.shape[-1]
    lam_max = lam[..., -1]
    if not sys.balanced:
        return lam[..., 0], lam_max
    if k == 1:
        return xp.ones_like(lam_max), xp.ones_like(lam_max)
    return lam[..., 1], lam_max


def _solve_schur(sys: _System, t_a, t_b):
    """Dense Schur-complement solve on the smaller side (see module docstring).

    ``eigvalsh`` of ``S^`` gives the conditioning.  When every member has
    ``cond <= 1/sqrt(u)`` the system is solved by LU, the balanced null
    direction ``q = sqrt(c) / ||sqrt(c)||`` deflated (``S^ + q q^T`` is
    non-singular and has the same solution on ``q^perp``); otherwise by the
    truncated eigendecomposition (:func:`_eig_solve`), the robust fallback.
    """
    if sys.n < sys.m:
        (y, x), info = _solve_schur(sys.transposed(), t_b, t_a)
        return (x, y), dataclasses.replace(info, side="rows")
    xp = backend.namespace(P=sys.P)
    P = sys.P
    ra = sys.r * (1.0 + sys.alpha)
    # S y = t_b - P^T D_r'^{-1} t_a,  D_r' = D_r (1 + alpha); scaled y = y^ / sqrt(c).
    rhs = t_b - rmatvec(P, t_a / ra)
    s = 1.0 / xp.sqrt(sys.c)
    S_hat = _schur_operator(sys)
    gap, lam_max = _spectrum(sys, S_hat)
    cond = _cond_from(xp, gap, lam_max)
    if backend.all_true(cond <= _cond_threshold(P.dtype)):
        if sys.balanced:
            q = xp.sqrt(sys.c_mass / xp.sum(sys.c_mass, axis=-1, keepdims=True))
            S_hat = S_hat + q[..., :, None] * q[..., None, :]
        y_hat = backend.solve_vec(S_hat, rhs * s)
        n_dropped = xp.zeros(tuple(rhs.shape[:-1]), dtype=xp.int64, device=backend.device(P))
    else:
        y_hat, n_dropped = _eig_solve(sys, S_hat, rhs * s)
    y = y_hat * s
    x = (t_a - matvec(P, y)) / ra                            # x = D_r'^{-1}(t_a - P y)
    x, y = _gauss_seidel_sweep(sys, t_a, t_b, x, y, mask=n_dropped == 0)
    return (x, y), SolveInfo(side="cols", gap=gap, lambda_max=lam_max, cond=cond, n_dropped=n_dropped)


def _default_cg_tol(dtype) -> float:
    return 1e-12 if backend.dtype_name(dtype) == "float64" else 1e-5


@dataclass(frozen=True)
class _CGState:
    """Conjugate-gradient iterates: solution ``y``, residual ``res``, search
    direction ``p``, ``rz = res^T D_c^{-1} res``, the members whose last step
    was taken (``ok``) and the Lanczos history (step sizes, ratios, ``ok``)."""

    y: Any
    res: Any
    p: Any
    rz: Any
    ok: Any
    alphas: tuple = ()
    betas: tuple = ()
    actives: tuple = ()


def _cg_advance(xp, apply_S, project, c, st: _CGState, active, k: int) -> _CGState:
    """``k`` preconditioned CG steps (preconditioner ``D_c``) of the active members."""
    y, res_, p, rz = st.y, st.res, st.p, st.rz
    alphas, betas, actives = list(st.alphas), list(st.betas), list(st.actives)
    ok = st.ok
    for _ in range(k):
        Ap = apply_S(p)
        pAp = xp.sum(p * Ap, axis=-1)
        ok = active & (pAp > 0)                       # a step exists (no breakdown)
        step = xp.where(ok, rz / xp.where(ok, pAp, xp.ones_like(pAp)), xp.zeros_like(pAp))
        y = y + step[..., None] * p
        res_ = project(res_ - step[..., None] * Ap)
        z = res_ / c
        rz_new = xp.sum(res_ * z, axis=-1)
        okb = ok & (rz > 0)
        beta_k = xp.where(okb, rz_new / xp.where(okb, rz, xp.ones_like(rz)), xp.zeros_like(rz))
        p = xp.where(ok[..., None], z + beta_k[..., None] * p, p)
        rz = xp.where(ok, rz_new, rz)
        alphas.append(step)
        betas.append(beta_k)
        actives.append(ok)
        active = ok & active
    return _CGState(y, res_, p, rz, ok, tuple(alphas), tuple(betas), tuple(actives))


def _cg_measure(xp, tol: float, rhs_norm, st: _CGState):
    """``(||res||_* / ||rhs||_*, done)``: a member is done when its residual
    reached ``tol`` relative to the right-hand side or its step broke down."""
    resid = xp.sqrt(st.rz)
    safe = xp.where(rhs_norm > 0, rhs_norm, xp.ones_like(rhs_norm))
    return resid / safe, ~(st.ok & (resid > tol * rhs_norm))


def _solve_cg(sys: _System, t_a, t_b, *, cg_tol=None, cg_max_iter=None):
    """Preconditioned CG on the Schur complement of the smaller side, matrix-free.

    ``S y = D_c (1 + beta) y - P^T ((P y) / (r (1 + alpha)))``, preconditioner
    ``D_c``; for a balanced problem the right-hand side and every residual are
    projected onto ``1^perp`` (the range of ``S``) along ``c``.  The CG coefficients give
    the Lanczos matrix whose extreme eigenvalues estimate those of ``S^``.
    The stopping test is relative to the right-hand side in that norm, so a
    right-hand side dominated by a nearly isolated node (a JVP putting mass
    on a column that holds < ~1e-30 of it, before convergence) stops before
    the rest is resolved: use ``"schur"`` there.  The iterations run on
    :func:`refimpl.iteration.iterate` (per-member counts in ``SolveInfo.cg``).
    """
    if sys.n < sys.m:
        (y, x), info = _solve_cg(sys.transposed(), t_b, t_a, cg_tol=cg_tol, cg_max_iter=cg_max_iter)
        return (x, y), dataclasses.replace(info, side="rows")
    xp = backend.namespace(P=sys.P)
    P = sys.P
    tol = _default_cg_tol(P.dtype) if cg_tol is None else backend.check_positive(cg_tol, "cg_tol")
    max_it = max(1000, 10 * sys.m) if cg_max_iter is None else backend.check_int(cg_max_iter, "cg_max_iter", min=1)
    ra = sys.r * (1.0 + sys.alpha)
    cb = sys.c * (1.0 + sys.beta)

    def apply_S(y):
        return cb * y - rmatvec(P, matvec(P, y) / ra)

    c_total = xp.sum(sys.c_mass, axis=-1, keepdims=True)

    def project(v):
        # Onto 1^perp along c (the null vector of S^ is sqrt(c)): entries on
        # nodes of tiny mass stay tiny, as a Euclidean projection would not.
        return v - sys.c_mass * (xp.sum(v, axis=-1, keepdims=True) / c_total) if sys.balanced else v

    rhs = project(t_b - rmatvec(P, t_a / ra))
    # Residuals are measured in the D_c^{-1} norm, ||r||_* = sqrt(r^T D_c^{-1} r)
    # = ||D_c^{-1/2} r||: the norm of the scaled system S^ (the dense path's).
    rhs_norm = xp.asarray(xp.sqrt(xp.sum(rhs * (rhs / sys.c), axis=-1)))   # 0-d array unbatched
    st0 = _CGState(xp.zeros_like(rhs), rhs, rhs / sys.c, xp.sum(rhs * (rhs / sys.c), axis=-1),
                   rhs_norm > 0)
    st, diag = iterate(lambda s, act, k: _cg_advance(xp, apply_S, project, sys.c, s, act & (rhs_norm > 0), k),
                       lambda s: _cg_measure(xp, tol, rhs_norm, s), st0,
                       batch=tuple(rhs_norm.shape), like=rhs_norm,
                       schedule=Schedule.for_policy(backend.policy_of(P), max_iter=max_it, on_device=10))
    y = st.y
    x = (t_a - matvec(P, y)) / ra
    x, y = _gauss_seidel_sweep(sys, t_a, t_b, x, y)
    gap, lam_max = _lanczos_extremes(xp, list(st.alphas), list(st.betas), list(st.actives), rhs_norm)
    r_true = rhs - apply_S(y)
    true_res = xp.sqrt(xp.sum(r_true * (r_true / sys.c), axis=-1))
    rel_res = xp.where(rhs_norm > 0, true_res / xp.where(rhs_norm > 0, rhs_norm, xp.ones_like(rhs_norm)),
                       xp.zeros_like(rhs_norm))
    cg = Diagnostics(n_iter=diag.n_iter, error=rel_res, converged=diag.converged)
    return (x, y), SolveInfo(side="cols", gap=gap, lambda_max=lam_max, cond=_cond_from(xp, gap, lam_max),
                             cg=cg, cg_tol=tol)


def _lanczos_extremes(xp, alphas, betas, actives, like):
    """Extreme Ritz values of the preconditioned Schur complement from CG.

    CG's step sizes ``alpha_j`` and ratios ``beta_j`` define the Lanczos
    tridiagonal ``T`` (diagonal ``1/alpha_j + beta_{j-1}/alpha_{j-1}``,
    off-diagonal ``sqrt(beta_j)/alpha_j``); its eigenvalues approximate those
    of ``D_c^{-1/2} S D_c^{-1/2}`` on the Krylov space (which excludes the null
    vector).  Host-side (SciPy), one small tridiagonal per batch member.
    """
    import scipy.linalg

    batch = tuple(like.shape)
    if not alphas:
        one = xp.ones(batch, dtype=like.dtype, device=backend.device(like))
        return one, one
    A = backend.to_host(xp.stack(alphas, axis=-1))
    B = backend.to_host(xp.stack(betas, axis=-1))
    OK = backend.to_host(xp.stack(actives, axis=-1))
    flatA = A.reshape(-1, A.shape[-1])
    flatB = B.reshape(-1, B.shape[-1])
    flatOK = OK.reshape(-1, OK.shape[-1])
    lo, hi = [], []
    for al, be, ok in zip(flatA, flatB, flatOK):
        j = int(ok.sum())
        if j == 0:
            lo.append(1.0)
            hi.append(1.0)
            continue
        al, be = al[:j], be[:j]
        diag = 1.0 / al
        diag[1:] += be[:-1] / al[:-1]
        off = (be[:-1] ** 0.5) / al[:-1]
        ev = scipy.linalg.eigvalsh_tridiagonal(diag, off) if j > 1 else diag
        lo.append(float(ev.min()))
        hi.append(float(ev.max()))
    dev = backend.device(like)
    return tuple(xp.reshape(backend.from_host(v, xp, device=dev, dtype=like.dtype), batch)
                 for v in (lo, hi))


def _kept_constraints(sys: _System):
    """0/1 weights (..., n + m) of the marginal constraints a dense solve keeps.

    Balanced: the constraint of the heaviest column is dropped (its
    unknown ``y_j* = 0``): any one is redundant, and the paper's choice (the
    last column) loses ``log10(1 / c_m)`` digits of ``b_bar`` when ``c_m`` is
    tiny.  Isolated nodes are dropped too (their equation reads ``0 = 0``).
    ``None`` when every constraint is kept.
    """
    xp = backend.namespace(P=sys.P)
    drop_r = sys.iso_r
    drop_c = sys.iso_c
    if sys.balanced:
        heaviest = xp.arange(sys.m, device=backend.device(sys.P)) == xp.argmax(sys.c_mass, axis=-1)[..., None]
        drop_c = heaviest if drop_c is None else drop_c | heaviest
    if drop_r is None and drop_c is None:
        return None
    return 1.0 - xp.concat([_indicator(xp, drop_r, sys.r), _indicator(xp, drop_c, sys.c)], axis=-1)


def _decouple(A, rhs, keep, offset: int = 0):
    """``A' = K A K + (I - K)``, ``rhs' = K rhs`` on the trailing ``n + m``
    unknowns (``K = diag(keep)``): a dropped unknown becomes 0, the others
    solve the system without its equation."""
    if keep is None:
        return A, rhs
    xp = backend.namespace(A=A)
    if offset:
        keep = xp.concat([xp.ones(tuple(keep.shape[:-1]) + (offset,), dtype=keep.dtype,
                                  device=backend.device(keep)), keep], axis=-1)
    return (keep[..., :, None] * A * keep[..., None, :] + backend.diag_embed(1.0 - keep),
            keep * rhs)


def _solve_reduced(sys: _System, t_a, t_b):
    """The paper's Algorithm 1: one redundant column constraint dropped
    (``y_j = 0`` for the heaviest column ``j``, see :func:`_kept_constraints`)
    and the dense system solved, symmetrically scaled by
    ``diag(r, c)^{-1/2}``.  Unbalanced: the full non-singular (n + m) system."""
    xp = backend.namespace(P=sys.P)
    P = sys.P
    d_r = sys.r * (1.0 + sys.alpha)
    d_c = sys.c * (1.0 + sys.beta)
    M = xp.concat([xp.concat([backend.diag_embed(d_r), P], axis=-1),
                   xp.concat([mT(P), backend.diag_embed(d_c)], axis=-1)], axis=-2)
    s = 1.0 / xp.sqrt(xp.concat([d_r, d_c], axis=-1))
    M_hat, rhs = _decouple(s[..., :, None] * M * s[..., None, :],
                           xp.concat([t_a, t_b], axis=-1) * s, _kept_constraints(sys))
    z = backend.solve_vec(M_hat, rhs) * s
    return (z[..., :sys.n], z[..., sys.n:]), SolveInfo()


def _kkt_matrix(sys: _System, eps: float):
    """Symmetrically scaled KKT matrix in ``(dP, -df, -dg)``.

    ``K = [[eps D_p^{-1}, E^T], [E, -D_rho]]`` with ``E`` the (n + m) x nm
    marginal operator and ``D_rho = diag(r / rho_a, c / rho_b)``; scaled by
    ``diag(D_p^{1/2}, I)`` to ``[[eps I, D_p^{1/2} E^T], [E D_p^{1/2}, -D_rho]]``
    (finite even where ``P`` underflows).  The redundant (balanced) and
    isolated constraints are decoupled as in :func:`_solve_reduced`.
    """
    xp = backend.namespace(P=sys.P)
    P = sys.P
    n, m = sys.n, sys.m
    if n * m + n + m > KKT_MAX_UNKNOWNS:
        raise ValueError(f"method='kkt' forms a dense ({n * m + n + m})^2 system; it is an oracle "
                         f"for tiny problems (nm + n + m <= {KKT_MAX_UNKNOWNS}). Use 'schur' or 'cg'.")
    dev = backend.device(P)
    dt = P.dtype
    batch = tuple(P.shape[:-2])
    sq = xp.reshape(xp.sqrt(P), batch + (1, n * m))
    E_rows = xp.reshape(xp.eye(n, dtype=dt, device=dev)[:, :, None] * xp.ones((1, 1, m), dtype=dt, device=dev),
                        (n, n * m))
    E_cols = xp.reshape(xp.eye(m, dtype=dt, device=dev)[:, None, :] * xp.ones((1, n, 1), dtype=dt, device=dev),
                        (m, n * m))
    Eh = xp.concat([E_rows, E_cols], axis=0) * sq              # E D_p^{1/2}   (n + m, nm)
    drho = xp.concat([sys.r * (sys.alpha / eps), sys.c * (sys.beta / eps)], axis=-1)
    top = xp.concat([eps * xp.broadcast_to(xp.eye(n * m, dtype=dt, device=dev), batch + (n * m, n * m)),
                     mT(Eh)], axis=-1)
    bottom = xp.concat([xp.broadcast_to(Eh, batch + (n + m, n * m)), -backend.diag_embed(drho)], axis=-1)
    return xp.concat([top, bottom], axis=-2)


def _kkt_solve(sys: _System, eps: float, rhs_p, rhs_a, rhs_b):
    """Solve ``K [zp; za; zb] = [rhs_p; rhs_a; rhs_b]`` (unscaled K) densely.

    Returns ``(zp (..., n, m), za (..., n), zb (..., m))``; a decoupled
    unknown (see :func:`_kept_constraints`) is 0.
    """
    xp = backend.namespace(P=sys.P)
    n, m = sys.n, sys.m
    batch = tuple(sys.P.shape[:-2])
    sq = xp.sqrt(sys.P)
    rhs = xp.concat([xp.reshape(sq * rhs_p, batch + (n * m,)), rhs_a, rhs_b], axis=-1)
    K_hat, rhs = _decouple(_kkt_matrix(sys, eps), rhs, _kept_constraints(sys), offset=n * m)
    z = backend.solve_vec(K_hat, rhs)
    zp = xp.reshape(z[..., :n * m], batch + (n, m)) * sq
    return zp, z[..., n * m:n * m + n], z[..., n * m + n:]


def _solve(sys: _System, t_a, t_b, method: str, **cg_options):
    if method == "schur":
        # Dense factorizations of order min(n, m): kept on one thread (small).
        with backend.serial_dense(sys.P, min(sys.n, sys.m)):
            return _solve_schur(sys, t_a, t_b)
    if method == "cg":
        return _solve_cg(sys, t_a, t_b, **cg_options)
    if method == "reduced":
        with backend.serial_dense(sys.P, sys.n + sys.m):
            return _solve_reduced(sys, t_a, t_b)
    raise ValueError(f"argument 'method' must be one of {METHODS}, got {method!r}")


def _check_method(method: str) -> str:
    return backend.check_choice(method, "method", METHODS)


def _check_cg_options(method: str, cg_tol, cg_max_iter) -> dict:
    """The CG options as keyword arguments of :func:`_solve_cg` (checked
    whatever the method, so a bad value is never silently ignored)."""
    if cg_tol is not None:
        cg_tol = backend.check_positive(cg_tol, "cg_tol")
    if cg_max_iter is not None:
        cg_max_iter = backend.check_int(cg_max_iter, "cg_max_iter", min=1)
    return {"cg_tol": cg_tol, "cg_max_iter": cg_max_iter} if method == "cg" else {}
