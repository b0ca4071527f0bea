r"""Entropic optimal transport (the Sinkhorn operator) with implicit differentiation.

The module is callable: ``refimpl.sinkhorn(C, a, b, eps=...)`` is
:func:`sinkhorn` (docs/design.md's name for the forward; see the end of the file).

Definition
----------
For a cost ``C`` (..., n, m), marginals ``a`` (..., n), ``b`` (..., m) (all
entries > 0) and a temperature ``eps > 0``, the Sinkhorn operator returns the
plan

    P* = argmin_{P in Pi(a, b)}  <P, C> - eps h(P),
    h(P) = -sum_ij P_ij (log P_ij - 1),
    Pi(a, b) = {P >= 0 : P 1 = a, P^T 1 = b}            (balanced, sum a = sum b).

Unbalanced (KL-relaxed) marginals replace the constraints by penalties
``rho_a KL(P 1 | a) + rho_b KL(P^T 1 | b)`` with the generalised KL divergence
``KL(p | q) = sum p log(p / q) - p + q``; ``rho = None`` keeps that side a hard
constraint (``rho -> inf``).  Batch dimensions broadcast.

Symbols: ``f`` (..., n), ``g`` (..., m) the dual potentials; ``r = P 1`` and
``c = P^T 1`` the plan's own marginals; ``G = P_bar = dL/dP`` the incoming
cotangent; ``T = P * G`` (elementwise); ``t_a = T 1``, ``t_b = T^T 1``;
``D_x = diag(x)``; ``C_bar, a_bar, b_bar`` the outgoing cotangents;
``alpha = eps / rho_a``, ``beta = eps / rho_b`` (0 on a balanced side).

Forward (log-domain Sinkhorn)
-----------------------------
At the optimum ``P = exp((f 1^T + 1 g^T - C) / eps)``.  With ``K = -C / eps``,
``phi = f / eps``, ``psi = g / eps`` and row/column log-sum-exps, one
iteration is

    phi = tau_a (log a - LSE_j(K_ij + psi_j)),   tau_a = rho_a / (rho_a + eps),
    psi = tau_b (log b - LSE_i(K_ij + phi_i)),   tau_b = rho_b / (rho_b + eps),

(``tau = 1`` on a balanced side; the unbalanced form is the stationarity
condition ``f = -rho_a log(r / a)`` solved for ``f``).  Every ``check_every``
iterations, right after a ``phi`` update (so the row condition holds to
round-off), the relative L1 marginal error

    error = || c - b exp(-g / rho_b) ||_1 / ||b||_1     (= ||P^T 1 - b||_1 / ||b||_1 balanced)

is measured from the column log-sum-exp the next ``psi`` update needs anyway.
A batch member stops (and is frozen, so a batch gives what a loop gives) once
``error <= tol``; the returned ``P`` is the plan at that check.

The iterations run in the stabilised scaling domain (Schmitzer 2019): with
``phi = phi~ + log u`` and ``K~ = exp(K + phi~ 1^T + 1 psi~^T)`` the
log-sum-exps become matrix-vector products ``K~ v``, ``K~^T u``, and the
scalings are absorbed into ``phi~, psi~`` before they leave a safe range
(see :func:`_iterate_scaling`).  In exact arithmetic the iterates are those
above, so the stopping rule and the plan are the log domain's.

Adjoint (balanced, Eisenberger et al. 2022, Thm. 3 / Alg. 1)
-----------------------------------------------------------
Any ``P`` of the Gibbs form above is the *exact* optimum of the problem with
its own marginals ``(C, r, c)``; the backward differentiates that problem, so
before convergence it is the exact gradient of a nearby problem (this is
markedly more accurate than using the inputs ``a, b``).  Linearising
``P 1 = r``, ``P^T 1 = c`` with ``dP = P * (df 1^T + 1 dg^T - dC) / eps``:

    M [df; dg] = [(P * dC) 1 + eps da; (P * dC)^T 1 + eps db],
    M = [[D_r, P], [P^T, D_c]].

``M`` is symmetric positive semidefinite (``[x; y]^T M [x; y] = sum_ij P_ij
(x_i + y_j)^2``) with null vector ``[1; -1]``; the right-hand side is
consistent exactly when ``1^T da = 1^T db`` (feasible directions).  Solving
``M [u; v] = [t_a; t_b]`` gives, from ``<G, dP>``,

    C_bar = -(1 / eps) P * (G - u 1^T - 1 v^T),   a_bar = u,   b_bar = v,

so ``C_bar 1 = 0`` and ``C_bar^T 1 = 0``.  Gauge: ``(u + k 1, v - k 1)``
changes nothing along feasible directions; it is fixed as
``(u - mean(u), v + mean(u))`` (so ``sum(a_bar) == 0``; ``u`` and ``v`` are
never centred separately, which would break ``u_i + v_j``).

Solvers of ``M [u; v] = [t_a; t_b]`` (``method=``):

``"schur"``  eliminate the larger side.  With rows eliminated (``n >= m``):
    ``S v = t_b - P^T D_r^{-1} t_a``, ``u = D_r^{-1} (t_a - P v)``,
    ``S = D_c - P^T D_r^{-1} P``: the Laplacian of the weighted graph
    ``W = P^T D_r^{-1} P`` on the m target nodes (``S 1 = 0``).  It is formed
    as ``diag(W_off 1) - W_off`` (``W_off`` = ``W`` without its diagonal, no
    cancellation), scaled symmetrically ``S^ = D_c^{-1/2} S D_c^{-1/2}``
    (eigenvalues in [0, 1]: ``1 - sigma_k^2``, ``sigma_k`` the singular values
    of ``D_r^{-1/2} P D_c^{-1/2}``).  ``eigvalsh`` gives its conditioning;
    when ``cond <= 1/sqrt(u)`` it is solved by LU with the null vector
    ``sqrt(c)`` deflated, otherwise (warning) through its eigendecomposition
    with the null eigenvector and every eigenvalue below ``k u lambda_max``
    dropped (least squares on the consistent singular system: the robust
    fallback).  A final block Gauss-Seidel sweep restores relative accuracy on
    nodes of tiny mass.  ``O(n m k + k^3)``, ``k = min(n, m)``: a tall-skinny
    problem (top-k: m = 2) solves a 2 x 2 system.
``"cg"``  the same Schur system by preconditioned conjugate gradients
    (preconditioner ``D_c``), matrix-free: two products with ``P`` per
    iteration, never an n x n or m x m matrix.  Converges on the consistent
    singular system (the residual is kept orthogonal to ``1``).  The CG
    coefficients give Lanczos estimates of the spectrum of ``S^`` (the same
    conditioning diagnostic as the dense path).
``"reduced"``  the paper's Algorithm 1: drop one redundant column constraint
    and solve the dense (n + m - 1) system.  The paper drops the last one;
    here it is the heaviest column's (``v_j = 0``), since a column of tiny
    mass ``c_m`` would cost ``log10(1 / c_m)`` digits of ``b_bar``.
``"kkt"``  the full KKT system in ``(dP, df, dg)`` of size ``nm + n + m - 1``
    (same constraint dropped), an oracle for tiny sizes.  All four agree to
    round-off.

A row or column of ``P`` that underflowed to exact zeros (small ``eps``,
stopped before convergence) is an isolated node of ``M``: its equation reads
``0 = 0``.  It is taken as the limit of a node whose mass tends to 0: for a
column ``j``, ``v_j = sum_i w_ij (G_ij - u_i)`` with the column's relative
weights ``w_ij = P_ij / c_j`` computed from ``log P`` (and, forward, a
tangent mass ``db_j`` enters the plan along ``w``); rows likewise.

Unbalanced adjoint
------------------
The stationarity conditions ``log r - log a + f / rho_a = 0`` (and likewise
for columns) linearise to the non-singular system

    [[D_r (1 + alpha), P], [P^T, D_c (1 + beta)]] [x; y] = [t_a; t_b],
    C_bar = -(1 / eps)(T - P * (x 1^T + 1 y^T)),
    a_bar = x * r / a = x * exp(-f / rho_a),   b_bar = y * exp(-g / rho_b),

(``r / a = exp(-f / rho_a)`` holds exactly for the problem ``P`` solves; no
gauge).  ``alpha = 0`` or ``beta = 0`` recovers a balanced side.

Forward mode (JVP)
------------------
``dP = P * (df 1^T + 1 dg^T - dC) / eps`` with ``M [df; dg]`` the right-hand
side above (``eps da`` becomes ``eps exp(-f / rho_a) da`` when unbalanced).
For balanced problems a tangent with ``1^T da != 1^T db`` (no such
perturbation of the problem exists) is first projected to
``(da + 1 (1^T db - 1^T da) / n, db)``: the projection whose adjoint is the
gauge fixing above, so ``<J u, w> = <u, J^T w>`` holds for every ``u``.

Temperature derivative
----------------------
``log P = (f 1^T + 1 g^T - C) / eps`` and the marginal conditions do not
contain ``eps``, so ``dP/deps`` is the JVP along ``dC = log P`` and
``dL/deps = <C_bar, log P>``; for balanced problems (zero row and column sums
of ``C_bar``) this is ``-<C_bar, C> / eps`` (``P`` depends on ``C / eps``
only).  See :func:`sinkhorn_vjp_eps`.

Values and their envelope gradients
-----------------------------------
``entropic_value``: ``W = <C, P> - eps h(P)`` (``+`` the rho-KL terms),
    ``dW/dC = P``, ``dW/da = f``, ``dW/db = g``, ``dW/deps = -h(P)``.
``kl_value`` (balanced): ``<C, P> + eps KL(P | a b^T)``,
    ``dW/da = f - eps log a - eps + eps sum(b)``.
``linear_value``: ``<C, P>``; its gradient needs the implicit solve.

Unrolled baseline
-----------------
:func:`sinkhorn_unrolled` runs exactly ``n_iter`` iterations recording the
row and column softmax matrices (what reverse-mode autodiff stores: memory
``O(n_iter n m)``); :func:`sinkhorn_unrolled_vjp` is the hand-written reverse
pass through them.  The implicit backward needs ``O(n m)`` memory whatever
the iteration count.

Error bound and conditioning
----------------------------
:func:`sinkhorn_error_bound` evaluates Theorem 5 of Eisenberger et al. for an
unconverged plan; :func:`sinkhorn_conditioning` reports the spectral gap of
``S^``.  The gap also sets Sinkhorn's own linear rate (``~ 1 - gap`` per
iteration), so a forward that converged in ``N`` iterations has a backward of
condition number ``~ N / log(1 / tol)``: ill-conditioned backward solves come
with slow or unconverged forwards (assignment-type costs at small ``eps``), or
with plans that underflow to exact zeros in disconnected blocks.

References
----------
M. Eisenberger, A. Toker, L. Leal-Taixe, F. Bernard, D. Cremers, "A Unified
Framework for Implicit Sinkhorn Differentiation", CVPR 2022, arXiv:2205.06688.
G. Peyre, M. Cuturi, "Computational Optimal Transport", 2019, ch. 4 and 9.
L. Chizat, G. Peyre, B. Schmitzer, F.-X. Vialard, "Scaling algorithms for
unbalanced optimal transport problems", Math. Comp. 2018.
P. A. Knight, "The Sinkhorn-Knopp algorithm: convergence and applications",
SIAM J. Matrix Anal. Appl. 2008 (rate = second singular value squared).

Examples
--------
>>> import numpy as np
>>> C = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0]])
>>> a = np.array([0.4, 0.6]); b = np.array([0.2, 0.5, 0.3])
>>> res = sinkhorn(C, a, b, eps=0.5, tol=1e-12)
>>> bool(res.converged)
True
>>> bool(np.allclose(res.P.sum(1), a) and np.allclose(res.P.sum(0), b))
True
>>> bool(np.allclose(res.P, np.exp((res.f[:, None] + res.g[None, :] - C) / 0.5)))
True
>>> C_bar, a_bar, b_bar = sinkhorn_vjp(res, C)      # P_bar = dL/dP for L = <C, P>
>>> bool(np.allclose(C_bar.sum(1), 0) and np.allclose(C_bar.sum(0), 0))
True
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import types
import warnings
from dataclasses import dataclass
from typing import Any

from . import backend
from .backend import ConditioningWarning, ConvergenceWarning, logsumexp, matvec, mT, sum_to_shape
from .iteration import Converging, Schedule, iterate

__all__ = [
    "Conditioning",
    "ErrorBound",
    "SinkhornResult",
    "UnrolledResult",
    "entropic_value",
    "entropic_value_grad",
    "gauge_fix",
    "kl_value",
    "kl_value_grad",
    "linear_value",
    "linear_value_grad",
    "sinkhorn",
    "sinkhorn_conditioning",
    "sinkhorn_error_bound",
    "sinkhorn_jvp",
    "sinkhorn_unrolled",
    "sinkhorn_unrolled_vjp",
    "sinkhorn_vjp",
    "sinkhorn_vjp_eps",
]

METHODS = ("schur", "cg", "reduced", "kkt")

#: Largest KKT system (``nm + n + m`` unknowns) ``method="kkt"`` will form.
KKT_MAX_UNKNOWNS = 2500


# --------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SinkhornResult(Converging):
    """Result of :func:`sinkhorn` (whole-batch summary: :class:`refimpl.iteration.Converging`).

    Attributes
    ----------
    P : the plan (..., n, m), ``exp((f 1^T + 1 g^T - C) / eps)``.
    f, g : dual potentials (..., n), (..., m).
    C, a, b : the inputs (references, never modified).
    eps, rho_a, rho_b : the parameters (``rho = None``: balanced side).
    tol : array (batch shape), the tolerance each member was held to:
        ``max(tol, floor)`` where ``floor`` is what its dtype can resolve
        (see :func:`sinkhorn`).
    max_iter, check_every : iteration limits used.
    n_iter : int array (batch shape), iterations run per member.
    error : array (batch shape), the relative L1 marginal error of ``P``.
    converged : bool array (batch shape), ``error <= tol``.
    """

    P: Any
    f: Any
    g: Any
    C: Any
    a: Any
    b: Any
    eps: float
    rho_a: float | None
    rho_b: float | None
    tol: Any
    max_iter: int
    check_every: int
    n_iter: Any
    error: Any
    converged: Any

    @property
    def balanced(self) -> bool:
        """Both marginals are hard constraints."""
        return self.rho_a is None and self.rho_b is None

    @functools.cached_property
    def log_P(self):
        """``log P = (f 1^T + 1 g^T - C) / eps``, finite even where ``P`` underflows."""
        return (self.f[..., :, None] + self.g[..., None, :] - self.C) / self.eps

    @functools.cached_property
    def conditioning(self) -> "Conditioning":
        """Spectral diagnostics of the backward system (see :func:`sinkhorn_conditioning`)."""
        return sinkhorn_conditioning(self)


@dataclass(frozen=True)
class Conditioning:
    """Conditioning of the (scaled) Schur complement ``S^`` of the backward system.

    Attributes
    ----------
    spectral_gap : smallest relevant eigenvalue of ``S^ = D_c^{-1/2} S D_c^{-1/2}``
        (balanced: the second smallest, ``1 - sigma_2^2``; unbalanced: the
        smallest).  Batch-shaped array.
    lambda_max : largest eigenvalue of ``S^`` (<= 1 + beta).
    cond : ``lambda_max / spectral_gap`` (``inf`` where the gap is not
        resolved); the backward loses about ``log10(cond)`` digits.
    side : ``"cols"`` (m x m system, rows eliminated) or ``"rows"``.
    threshold : the ``cond`` above which a ConditioningWarning is issued,
        ``1 / sqrt(unit round-off)`` (more than half the digits at risk).
    """

    spectral_gap: Any
    lambda_max: Any
    cond: Any
    side: str
    threshold: float

    @property
    def reliable(self):
        """``cond <= threshold`` per member (bool array)."""
        return self.cond <= self.threshold


@dataclass(frozen=True)
class ErrorBound:
    """Theorem 5 of Eisenberger et al. (2022) evaluated for one result.

    Attributes
    ----------
    C : bound on ``||C_bar* - C_bar(tau)||_F``.
    ab : bound on ``||[a_bar; b_bar]* - [a_bar; b_bar](tau)||_2`` in the
        paper's gauge (last entry of ``b_bar`` zero).
    P_err : ``||P* - P(tau)||_F`` used.
    sigma_minus, sigma_plus : entry bounds of the plans used.
    kappa : ``||E~^+||_2``.
    """

    C: Any
    ab: Any
    P_err: Any
    sigma_minus: Any
    sigma_plus: Any
    kappa: float


@dataclass(frozen=True)
class UnrolledResult:
    """Result of :func:`sinkhorn_unrolled`: the plan after exactly ``n_iter``
    iterations and the tape the reverse pass needs.

    ``row_softmax[k]`` and ``col_softmax[k]`` (each (..., n, m)) are the
    Jacobians of the k-th row and column log-sum-exp: ``2 n_iter - 1``
    matrices, the ``O(n_iter n m)`` memory of reverse-mode autodiff.
    """

    P: Any
    f: Any
    g: Any
    C: Any
    a: Any
    b: Any
    eps: float
    rho_a: float | None
    rho_b: float | None
    n_iter: int
    row_softmax: tuple
    col_softmax: tuple

    @property
    def tape_nbytes(self) -> int:
        """Bytes held by the recorded softmax matrices."""
        total = 0
        for s in self.row_softmax + self.col_softmax:
            total += math.prod(s.shape) * (8 if backend.dtype_name(s.dtype) == "float64" else 4)
        return total


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------

def _check_rho(rho, name: str) -> float | None:
    """``None`` (or ``+inf``): a hard constraint; otherwise a finite ``rho > 0``."""
    if rho is None or (isinstance(rho, (int, float)) and rho == math.inf):
        return None
    return backend.check_positive(rho, name)


def _damping(rho: float | None, eps: float) -> float:
    """``tau = rho / (rho + eps)`` of the unbalanced update (1 on a hard side)."""
    return 1.0 if rho is None else rho / (rho + eps)


def _mass_tolerance(dtype) -> float:
    """Relative mass mismatch accepted for a balanced problem: 1e-9, or a few
    float32 ulps (rounding each entry to float32 moves the mass by <= u)."""
    return 1e-9 if backend.dtype_name(dtype) == "float64" else 8.0 * 2.0 ** -24


def _check_inputs(C, a, b, eps, rho_a, rho_b):
    xp = backend.namespace(C=C, a=a, b=b)
    backend.check_array(C, "C", min_ndim=2)
    backend.check_array(a, "a", min_ndim=1)
    backend.check_array(b, "b", min_ndim=1)
    for name, x in (("a", a), ("b", b)):
        if x.dtype != C.dtype:
            raise TypeError(f"argument {name!r} has dtype {backend.dtype_name(x.dtype)} but 'C' "
                            f"has {backend.dtype_name(C.dtype)}; pass one dtype")
    n, m = C.shape[-2], C.shape[-1]
    if n == 0 or m == 0:
        raise ValueError(f"argument 'C' must have n >= 1 rows and m >= 1 columns, got shape {tuple(C.shape)}")
    if a.shape[-1] != n:
        raise ValueError(f"argument 'a' has length {a.shape[-1]} but 'C' has {n} rows (shape {tuple(C.shape)})")
    if b.shape[-1] != m:
        raise ValueError(f"argument 'b' has length {b.shape[-1]} but 'C' has {m} columns (shape {tuple(C.shape)})")
    try:
        batch = tuple(xp.broadcast_shapes(tuple(C.shape[:-2]), tuple(a.shape[:-1]), tuple(b.shape[:-1])))
    except ValueError:
        raise ValueError(f"batch shapes of 'C' {tuple(C.shape[:-2])}, 'a' {tuple(a.shape[:-1])} and "
                         f"'b' {tuple(b.shape[:-1])} do not broadcast") from None
    eps = backend.check_positive(eps, "eps")
    cmax = _check_kernel_range(xp, C, eps)
    rho_a = _check_rho(rho_a, "rho_a")
    rho_b = _check_rho(rho_b, "rho_b")
    for name, x in (("a", a), ("b", b)):
        if bool(xp.any(x < 0)):
            raise ValueError(f"argument {name!r} has negative entries; marginals must be positive")
        if bool(xp.any(x == 0)):
            raise ValueError(f"argument {name!r} has zero entries; marginals must be positive "
                             f"(drop zero-mass points, or use a tiny positive mass)")
    if rho_a is None and rho_b is None:
        f64 = xp.float64
        mass_a = xp.sum(xp.astype(a, f64), axis=-1)
        mass_b = xp.sum(xp.astype(b, f64), axis=-1)
        rel = xp.abs(mass_a - mass_b) / xp.maximum(mass_a, mass_b)
        worst = float(xp.max(rel))
        if worst > _mass_tolerance(C.dtype):
            raise ValueError(
                f"argument 'b' has total mass different from 'a' (relative mismatch {worst:.2e} > "
                f"{_mass_tolerance(C.dtype):.0e}); the balanced problem needs sum(a) == sum(b) "
                f"(or pass rho_a/rho_b for unbalanced transport)")
    return xp, batch, n, m, eps, rho_a, rho_b, cmax


def _check_kernel_range(xp, C, eps: float):
    """Refuse a log kernel ``-C / eps`` that overflows the dtype of ``C``
    (``max|C| / eps`` above its largest finite number): every entry of the
    plan would then be NaN or 0, with no digit to report.  Returns
    ``max|C|`` per member of ``C``'s batch."""
    cmax = xp.max(xp.abs(C), axis=(-2, -1))
    worst = float(xp.max(cmax))
    big = float(xp.finfo(C.dtype).max)
    if worst / eps > big:
        raise ValueError(f"arguments 'C' and 'eps': max|C| / eps = {worst:.3e} / {eps:.3e} overflows "
                         f"{backend.dtype_name(C.dtype)} (largest {big:.2e}); rescale C or raise eps")
    return cmax


def _check_result(res, name: str = "res"):
    backend.check_result(res, name, SinkhornResult, producer="sinkhorn()")


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------

def _tolerance_floor(xp, C, cmax, a, b, batch, eps: float, balanced: bool,
                     rho_b: float | None = None):
    """Per-member relative L1 error the dtype can resolve.

    Entries of ``log P = (f + g - C) / eps`` carry absolute rounding errors of
    about ``u (|C| + |f| + |g|) / eps``, i.e. relative errors of that size in
    ``P``: ``floor = 32 u (1 + max|C| / eps + log(n m))``.  A balanced problem
    whose masses differ by ``delta`` (accepted up to 1e-9 relative) cannot get
    below ``delta`` either.  ``cmax`` is ``max|C|`` per member of ``C``.

    A relaxed column side (``rho_b`` given) is measured against the target
    ``t = b exp(-g / rho_b)``.  At the fixed point
    ``g / rho_b = beta_b (log b - LSE_i(K_ij + phi_i))`` with
    ``beta_b = eps / (eps + rho_b) = 1 - tau_b``, so ``log t`` carries the
    absolute rounding ``u beta_b (|log b| + |LSE|)`` of that difference; the
    ``|LSE|`` part is covered above, the ``|log b|`` part adds
    ``32 u beta_b max_j |log b_j|`` to the floor.
    """
    u = backend.unit_roundoff(C.dtype)
    n, m = C.shape[-2], C.shape[-1]
    floor = 32.0 * u * (1.0 + cmax / eps + math.log(n * m + 1.0))
    if rho_b is not None:
        # Rounding of the relaxed target b exp(-g / rho_b): u beta_b |log b|.
        beta_b = eps / (eps + rho_b)
        log_b_max = xp.max(xp.abs(xp.log(b)), axis=-1)
        floor = floor + 32.0 * u * beta_b * log_b_max
    if balanced:
        mass_a = xp.sum(a, axis=-1)
        mass_b = xp.sum(b, axis=-1)
        floor = xp.maximum(xp.broadcast_to(floor, batch),
                           xp.broadcast_to(2.0 * xp.abs(mass_a - mass_b) / mass_b, batch))
    return xp.broadcast_to(floor, batch)


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
    the scaling domain's limits (:func:`_scaling_limits`) and ``tiny`` the
    smallest normal number.
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
    tiny: float


def _marginal_error(xp, pb: _Problem, log_c, psi):
    """``(error, done, failed)`` of one convergence check: the relative L1
    column error ``||c - b exp(-beta psi)||_1 / sum(b)`` of the plan with
    column marginal ``c = exp(log_c)``; a member stops at ``error <= tol``
    and fails on a NaN error."""
    target = pb.b if pb.beta == 0.0 else pb.b * xp.exp(-pb.beta * psi)
    err = xp.sum(xp.abs(xp.exp(log_c) - target), axis=-1) / pb.mass_b
    return err, err <= pb.tol, xp.isnan(err)


def _keep(xp, keep, new, old):
    """``new`` where the member is iterating (``keep`` (..., 1) mask or None: all)."""
    return new if keep is None else xp.where(keep, new, old)


# -- log domain ---------------------------------------------------------------

@dataclass(frozen=True)
class _LogState:
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
    return _marginal_error(xp, pb, st.psi + st.lse_col, st.psi)


# -- stabilised scaling domain ------------------------------------------------

@dataclass(frozen=True)
class _ScalingState:
    """Iterates of the scaling domain (:func:`_scaling_advance`).

    ``phi~ = phi_t``, ``psi~ = psi_t`` the absorbed potentials, ``Kt = K~``,
    ``lu = log u``, ``lv = log v``; ``lsc = log(K~^T u)`` the column sums of
    the last row update (None before the first); ``col_bad`` marks members
    whose last column sums left the accurate range (their next column update
    is absorbed).
    """

    phi_t: Any
    psi_t: Any
    Kt: Any
    lu: Any
    lv: Any
    lsc: Any
    col_bad: Any


def _log_scaling(log_target, log_sum, tau: float, absorbed):
    """``log u = tau (log target - log sum) + (tau - 1) absorbed`` (balanced: tau = 1)."""
    if tau == 1.0:
        return log_target - log_sum
    return tau * (log_target - log_sum) + (tau - 1.0) * absorbed


def _scaling(xp, target, log_target, sums, floor, tau: float, absorbed):
    """``u = target / sums`` (balanced) or ``exp(log u)`` of :func:`_log_scaling`;
    sums are clamped at their floor (no division by zero; such a member fails
    the range test after the block)."""
    sums = xp.maximum(sums, floor)
    if tau == 1.0:
        return target / sums
    return xp.exp(_log_scaling(log_target, xp.log(sums), tau, absorbed))


def _fast_block(xp, pb: _Problem, st: _ScalingState, keep, k: int):
    """``k`` iterations ``u = a / (K~ v)``, ``v = b / (K~^T u)`` with no range
    test in between: two matrix-vector products and two divisions each.

    Returns the new state and, per member, whether it is valid: the last sums
    at or above their floors and ``|log u|``, ``|log v| <= lim``.  A valid
    end state is an accurate iterate whatever happened inside the block (the
    limit is unique; only the final sums enter the check).
    """
    u, v = xp.exp(st.lu), xp.exp(st.lv)
    if st.lsc is not None:                   # the pending column update, from the log sums
        v = _keep(xp, keep, xp.exp(_log_scaling(pb.log_b, st.lsc, pb.tau_b, st.psi_t)), v)
    for j in range(k):
        s = matvec(st.Kt, v)                                       # K~ v
        u = _keep(xp, keep, _scaling(xp, pb.a, pb.log_a, s, pb.row_lo, pb.tau_a, st.phi_t), u)
        sc = _rmatvec(st.Kt, u)                                    # K~^T u
        if j < k - 1:
            v = _keep(xp, keep, _scaling(xp, pb.b, pb.log_b, sc, pb.col_lo, pb.tau_b, st.psi_t), v)
    lu = _keep(xp, keep, xp.log(xp.maximum(u, pb.tiny)), st.lu)
    lv = _keep(xp, keep, xp.log(xp.maximum(v, pb.tiny)), st.lv)
    lsc = xp.log(xp.maximum(sc, pb.col_lo))
    ok = ((xp.min(s, axis=-1) >= pb.row_lo) & (xp.min(sc, axis=-1) >= pb.col_lo)
          & (xp.max(xp.abs(lu), axis=-1) <= pb.lim) & (xp.max(xp.abs(lv), axis=-1) <= pb.lim))
    return _ScalingState(st.phi_t, st.psi_t, st.Kt, lu, lv, lsc, st.col_bad), ok


def _absorb(xp, pb: _Problem, st: _ScalingState, need) -> _ScalingState:
    """Fold the scalings of the members ``need`` into ``phi~, psi~`` and
    recompute their ``K~ = exp(K + phi~ 1^T + 1 psi~^T)`` (one exponential pass)."""
    nd = need[..., None]
    phi_t = xp.where(nd, st.phi_t + st.lu, st.phi_t)
    psi_t = xp.where(nd, st.psi_t + st.lv, st.psi_t)
    Kt = xp.where(nd[..., None], xp.exp(pb.K + phi_t[..., :, None] + psi_t[..., None, :]), st.Kt)
    zero = xp.zeros_like
    return _ScalingState(phi_t, psi_t, Kt, xp.where(nd, zero(st.lu), st.lu),
                         xp.where(nd, zero(st.lv), st.lv), st.lsc, st.col_bad)


def _careful_row(xp, pb: _Problem, st: _ScalingState, m) -> _ScalingState:
    """Row update of the members ``m`` with range tests: sums below the floor
    or non-finite scalings are redone in the log domain, ``phi = tau_a (log a
    - LSE_j(K_ij + psi_j))``, and absorbed; so are scalings beyond ``lim``."""
    s = matvec(st.Kt, xp.exp(st.lv))
    lu = _log_scaling(pb.log_a, xp.log(xp.maximum(s, pb.row_lo)), pb.tau_a, st.phi_t)
    bad = m & ((xp.min(s, axis=-1) < pb.row_lo) | ~xp.all(xp.isfinite(lu), axis=-1))
    if bool(xp.any(bad)):
        phi_log = pb.tau_a * (pb.log_a - _lse_rows(xp, pb.K, st.psi_t + st.lv))
        lu = xp.where(bad[..., None], phi_log - st.phi_t, lu)
    need = bad | (m & (xp.max(xp.abs(lu), axis=-1) > pb.lim))
    st = _ScalingState(st.phi_t, st.psi_t, st.Kt, lu, st.lv, st.lsc, st.col_bad)
    return _absorb(xp, pb, st, need) if bool(xp.any(need)) else st


def _careful_col_sums(xp, pb: _Problem, st: _ScalingState, m) -> _ScalingState:
    """Column sums ``log(K~^T u)``; where they leave the accurate range they
    are redone in the log domain, ``psi~ + LSE_i(K_ij + phi_i)``, and the
    member's next column update is absorbed."""
    sc = _rmatvec(st.Kt, xp.exp(st.lu))
    lsc = xp.log(xp.maximum(sc, pb.col_lo))
    bad = m & ((xp.min(sc, axis=-1) < pb.col_lo) | ~xp.all(xp.isfinite(sc), axis=-1))
    if bool(xp.any(bad)):
        lsc = xp.where(bad[..., None], st.psi_t + _lse_cols(xp, pb.K, st.phi_t + st.lu), lsc)
    return _ScalingState(st.phi_t, st.psi_t, st.Kt, st.lu, st.lv, lsc, bad)


def _careful_col_update(xp, pb: _Problem, st: _ScalingState, m) -> _ScalingState:
    """Column update ``log v = tau_b (log b - log(K~^T u)) + (tau_b - 1) psi~``
    of the members ``m``, absorbed beyond ``lim`` or after inaccurate sums."""
    lv = _log_scaling(pb.log_b, st.lsc, pb.tau_b, st.psi_t)
    need = m & (st.col_bad | (xp.max(xp.abs(lv), axis=-1) > pb.lim))
    st = _ScalingState(st.phi_t, st.psi_t, st.Kt, st.lu, lv, st.lsc, xp.zeros_like(st.col_bad))
    return _absorb(xp, pb, st, need) if bool(xp.any(need)) else st


def _careful_block(xp, pb: _Problem, st: _ScalingState, m, k: int) -> _ScalingState:
    """``k`` iterations with the range tests after every half-step (members ``m``)."""
    for j in range(k):
        if j or st.lsc is not None:
            st = _careful_col_update(xp, pb, st, m)
        st = _careful_row(xp, pb, st, m)
        st = _careful_col_sums(xp, pb, st, m)
    return st


def _select(xp, m, new: _ScalingState, old: _ScalingState) -> _ScalingState:
    """``new`` for the members ``m``, ``old`` for the others."""
    vec = m[..., None]

    def pick(x, y):
        return xp.where(vec, x, y)

    Kt = old.Kt if new.Kt is old.Kt else xp.where(vec[..., None], new.Kt, old.Kt)
    return _ScalingState(pick(new.phi_t, old.phi_t), pick(new.psi_t, old.psi_t), Kt,
                         pick(new.lu, old.lu), pick(new.lv, old.lv), pick(new.lsc, old.lsc),
                         xp.where(m, new.col_bad, old.col_bad))


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
    keep = None if bool(xp.all(active)) else active[..., None]
    new, ok = _fast_block(xp, pb, st, keep, k)
    redo = active & (~ok | st.col_bad)
    if bool(xp.any(redo)):
        new = _select(xp, redo, _careful_block(xp, pb, st, redo, k), new)
    return new


def _scaling_measure(xp, pb: _Problem, st: _ScalingState):
    """The check after a row update: ``c = P^T 1 = v * (K~^T u)``."""
    return _marginal_error(xp, pb, st.lv + st.lsc, st.psi_t + st.lv)


def _scaling_init(xp, pb: _Problem, batch) -> _ScalingState:
    """The first row update in the log domain, absorbed: ``K~ = exp(K + phi~)``
    with ``phi~ = tau_a (log a - LSE_j K_ij)``, whose rows hold the row
    marginals (no row has underflowed whatever ``eps`` is).

    With ``mu_i = max_j K_ij``, ``E = exp(K - mu 1^T)`` and ``sigma = E 1``:
    ``LSE_j K_ij = mu_i + log sigma_i``, and on a balanced side
    ``K~ = exp(K + phi~) = D(a / sigma) E`` (one exponential pass).
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
    Kt = xp.broadcast_to(Kt, batch + (n, m))
    zeros = xp.zeros(batch + (m,), dtype=dt, device=dev)
    return _ScalingState(xp.broadcast_to(phi_t, batch + (n,)), zeros, Kt,
                         xp.zeros(batch + (n,), dtype=dt, device=dev), xp.zeros_like(zeros), None,
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


def _solve_potentials(xp, pb: _Problem, batch, *, max_iter: int, check_every: int, use_scaling: bool):
    """Run the iterations (:func:`refimpl.iteration.iterate`); returns
    ``(phi, psi, Diagnostics)``."""
    schedule = Schedule(max_iter=max_iter, check_every=check_every)
    like = pb.K
    if use_scaling:
        st, diag = iterate(lambda s, act, k: _scaling_advance(xp, pb, s, act, k),
                           lambda s: _scaling_measure(xp, pb, s), _scaling_init(xp, pb, batch),
                           batch=batch, like=like, schedule=schedule)
        return st.phi_t + st.lu, st.psi_t + st.lv, diag
    n, m = pb.K.shape[-2], pb.K.shape[-1]
    dt, dev = pb.K.dtype, backend.device(pb.K)
    init = _LogState(xp.zeros(batch + (n,), dtype=dt, device=dev),
                     xp.zeros(batch + (m,), dtype=dt, device=dev), None)
    st, diag = iterate(lambda s, act, k: _log_advance(xp, pb, s, act, k),
                       lambda s: _log_measure(xp, pb, s), init,
                       batch=batch, like=like, schedule=schedule)
    return st.phi, st.psi, diag


def sinkhorn(C, a, b, *, eps, tol: float = 1e-10, max_iter: int = 10_000,
             rho_a: float | None = None, rho_b: float | None = None,
             check_every: int = 10, warn: bool = True) -> SinkhornResult:
    r"""Entropic OT plan by stabilised Sinkhorn iterations (batched).

    Parameters
    ----------
    C : (..., n, m) cost, finite.
    a, b : (..., n), (..., m) positive marginals; for a balanced problem
        ``sum(a) == sum(b)`` to a relative 1e-9 (float32: ~5e-7).
    eps : temperature > 0 (Python float, shared by the batch).
    tol : stopping tolerance on the relative L1 marginal error (see the
        module docstring).  It is raised, per member, to the floor its dtype
        can resolve, ``32 u (1 + max|C| / eps + log(nm))`` (u the unit
        round-off: ~1e-14 to 1e-12 in float64, ~1e-5 in float32), and for
        balanced problems to twice the relative mass mismatch; the value used
        is ``result.tol``.
    max_iter : iteration limit (one iteration = a row and a column update).
    rho_a, rho_b : KL relaxation strengths (``None``: hard constraint).
    check_every : the error is measured (a host sync) every this many
        iterations and at ``max_iter``.
    warn : issue a ConvergenceWarning when some member did not converge.

    Returns
    -------
    SinkhornResult

    Raises
    ------
    TypeError : non-array input, unsupported or mixed dtypes.
    ValueError : NaN/Inf, empty arrays, shape mismatch, ``eps <= 0``,
        ``max|C| / eps`` beyond the dtype's largest number, non-positive
        marginals, unequal masses (balanced), bad ``rho``/``tol``/``max_iter``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> C = rng.random((4, 3)); a = np.full(4, 0.25); b = np.array([0.5, 0.25, 0.25])
    >>> res = sinkhorn(C, a, b, eps=0.1, tol=1e-12)
    >>> bool(np.abs(res.P.sum(0) - b).sum() <= 1e-12 * b.sum())
    True
    """
    xp, batch, n, m, eps, rho_a, rho_b, cmax = _check_inputs(C, a, b, eps, rho_a, rho_b)
    tol = backend.check_positive(tol, "tol", allow_zero=True)
    max_iter = backend.check_int(max_iter, "max_iter", min=1)
    check_every = backend.check_int(check_every, "check_every", min=1)
    warn = backend.check_flag(warn, "warn")
    dev = backend.device(C)
    dt = C.dtype
    balanced = rho_a is None and rho_b is None
    tau_a, tau_b = _damping(rho_a, eps), _damping(rho_b, eps)

    K = -C / eps                                          # log Gibbs kernel
    lim, row_floor, col_floor = _scaling_limits(xp, dt, n, m)
    b_full = xp.broadcast_to(b, batch + (m,))
    pb = _Problem(K=K, a=xp.broadcast_to(a, batch + (n,)), b=b_full,
                  log_a=xp.broadcast_to(xp.log(a), batch + (n,)),
                  log_b=xp.broadcast_to(xp.log(b), batch + (m,)), mass_b=xp.sum(b_full, axis=-1),
                  tol=xp.maximum(_tolerance_floor(xp, C, cmax, a, b, batch, eps, balanced, rho_b),
                                 xp.full(batch, tol, dtype=dt, device=dev)),
                  tau_a=tau_a, tau_b=tau_b, beta=0.0 if rho_b is None else eps / rho_b, lim=lim,
                  row_lo=xp.asarray(row_floor, dtype=dt, device=dev),
                  col_lo=xp.asarray(col_floor, dtype=dt, device=dev),
                  tiny=float(xp.finfo(dt).smallest_normal))
    # Matrix-vector products of a matrix up to 32 MiB: memory-bound, one thread.
    with backend.single_threaded_blas(C, n * m <= backend.SERIAL_MATVEC_ENTRIES):
        phi, psi, diag = _solve_potentials(xp, pb, batch, max_iter=max_iter, check_every=check_every,
                                           use_scaling=_use_scaling(n, m, backend.policy_of(C)))

    P = xp.exp(K + phi[..., :, None] + psi[..., None, :])
    # Batch-shaped diagnostics as arrays (NumPy reductions to 0-d give scalars).
    error, tol_eff, n_iter = (xp.asarray(v) for v in (diag.error, pb.tol, diag.n_iter))
    # A member whose rounding floor reaches 1 has no resolved digit: its
    # relative L1 error (at most 2) says nothing, so it is never "converged".
    resolvable = tol_eff < 1.0
    converged = xp.asarray(diag.converged & resolvable)
    res = SinkhornResult(P=P, f=eps * phi, g=eps * psi, C=C, a=a, b=b, eps=eps, rho_a=rho_a,
                         rho_b=rho_b, tol=tol_eff, max_iter=max_iter, check_every=check_every,
                         n_iter=n_iter, error=error, converged=converged)
    if warn and not res.all_converged:
        n_bad = int(xp.sum(xp.astype(~converged, xp.int64)))
        total = math.prod(batch) if batch else 1
        worst = xp.argmax(xp.reshape(error / tol_eff, (-1,)))      # the member furthest from its tol
        err_w = float(xp.reshape(error, (-1,))[worst])
        tol_w = float(xp.reshape(tol_eff, (-1,))[worst])
        raised = f" (tol={tol:.1e} raised to the dtype's floor)" if tol_w > tol else ""
        if not bool(xp.all(resolvable)):
            why = (f"eps={eps:.1e} is too small for {backend.dtype_name(dt)}: the rounding floor "
                   f"of the log-domain plan, 32 u (1 + max|C|/eps + log nm), is {tol_w:.1e} >= 1, "
                   f"so the plan has no resolved digit; use a larger eps or float64")
        else:
            why = (f"did not converge in max_iter={max_iter} iterations: error {err_w:.2e} > tol "
                   f"{tol_w:.2e}{raised}; increase max_iter or eps")
        warnings.warn(
            f"sinkhorn: {n_bad} of {total} problem(s) {why}. "
            f"The result has converged=False (result.error, result.tol per member).",
            ConvergenceWarning, stacklevel=2)
    return res


# --------------------------------------------------------------------------
# The backward linear system  M [x; y] = [t_a; t_b]
# --------------------------------------------------------------------------

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
    if not bool(xp.any(iso)):
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


def _rmatvec(A, y):
    """``A^T y`` for a vector ``y`` (..., n): ``(y^T A)^T``."""
    return (y[..., None, :] @ A)[..., 0, :]


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
    y_hat = matvec(Q, _rmatvec(Q, rhs_hat) * inv)             # Q diag(1/lambda) Q^T rhs
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
    y_new = (t_b - _rmatvec(P, x)) / (sys.c * (1.0 + sys.beta))
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
        return (x, y), dict(info, side="rows")
    xp = backend.namespace(P=sys.P)
    P = sys.P
    ra = sys.r * (1.0 + sys.alpha)
    # S y = t_b - P^T D_r'^{-1} t_a,  D_r' = D_r (1 + alpha); scaled y = y^ / sqrt(c).
    rhs = t_b - _rmatvec(P, t_a / ra)
    s = 1.0 / xp.sqrt(sys.c)
    S_hat = _schur_operator(sys)
    gap, lam_max = _spectrum(sys, S_hat)
    cond = _cond_from(xp, gap, lam_max)
    if bool(xp.all(cond <= _cond_threshold(P.dtype))):
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
    return (x, y), dict(gap=gap, lambda_max=lam_max, cond=cond, n_dropped=n_dropped, side="cols")


def _default_cg_tol(dtype) -> float:
    return 1e-12 if backend.dtype_name(dtype) == "float64" else 1e-5


def _solve_cg(sys: _System, t_a, t_b, *, cg_tol=None, cg_max_iter=None, check_every: int = 10):
    """Preconditioned CG on the Schur complement of the smaller side, matrix-free.

    ``S y = D_c (1 + beta) y - P^T ((P y) / (r (1 + alpha)))``, preconditioner
    ``D_c``; for a balanced problem the right-hand side and every residual are
    projected onto ``1^perp`` (the range of ``S``) along ``c``.  The CG coefficients give
    the Lanczos matrix whose extreme eigenvalues estimate those of ``S^``.
    The stopping test is relative to the right-hand side in that norm, so a
    right-hand side dominated by a nearly isolated node (a JVP putting mass
    on a column that holds < ~1e-30 of it, before convergence) stops before
    the rest is resolved: use ``"schur"`` there.
    """
    if sys.n < sys.m:
        (y, x), info = _solve_cg(sys.transposed(), t_b, t_a, cg_tol=cg_tol,
                                 cg_max_iter=cg_max_iter, check_every=check_every)
        return (x, y), dict(info, side="rows")
    xp = backend.namespace(P=sys.P)
    P = sys.P
    k = sys.m
    tol = _default_cg_tol(P.dtype) if cg_tol is None else backend.check_positive(cg_tol, "cg_tol")
    max_it = max(1000, 10 * k) if cg_max_iter is None else backend.check_int(cg_max_iter, "cg_max_iter", min=1)
    ra = sys.r * (1.0 + sys.alpha)
    cb = sys.c * (1.0 + sys.beta)

    def apply_S(y):
        return cb * y - _rmatvec(P, matvec(P, y) / ra)

    c_true = sys.c_mass
    c_total = xp.sum(c_true, axis=-1, keepdims=True)

    def project(v):
        # Onto 1^perp along c (the null vector of S^ is sqrt(c)): entries on
        # nodes of tiny mass stay tiny, as a Euclidean projection would not.
        return v - c_true * (xp.sum(v, axis=-1, keepdims=True) / c_total) if sys.balanced else v

    def dot(u, v):
        return xp.sum(u * v, axis=-1)

    rhs = project(t_b - _rmatvec(P, t_a / ra))
    # Residuals are measured in the D_c^{-1} norm, ||r||_* = sqrt(r^T D_c^{-1} r)
    # = ||D_c^{-1/2} r||: the norm of the scaled system S^ (the dense path's).
    rhs_norm = xp.sqrt(dot(rhs, rhs / sys.c))
    y = xp.zeros_like(rhs)
    res_ = rhs
    z = res_ / sys.c
    p = z
    rz = dot(res_, z)
    active = rhs_norm > 0
    alphas, betas, actives = [], [], []
    it = 0
    for it in range(1, max_it + 1):
        Ap = apply_S(p)
        pAp = dot(p, Ap)
        ok = active & (pAp > 0)
        step = xp.where(ok, rz / xp.where(ok, pAp, xp.ones_like(pAp)), xp.zeros_like(pAp))
        y = y + step[..., None] * p
        res_ = project(res_ - step[..., None] * Ap)
        z = res_ / sys.c
        rz_new = dot(res_, z)
        okb = ok & (rz > 0)
        beta_k = xp.where(okb, rz_new / xp.where(okb, rz, xp.ones_like(rz)), xp.zeros_like(rz))
        p = xp.where(ok[..., None], z + beta_k[..., None] * p, p)
        rz = xp.where(ok, rz_new, rz)
        alphas.append(step)
        betas.append(beta_k)
        actives.append(ok)
        active = ok & (xp.sqrt(rz) > tol * rhs_norm)
        if it % check_every == 0 and not bool(xp.any(active)):
            break
    converged = ~active
    x = (t_a - matvec(P, y)) / ra
    x, y = _gauss_seidel_sweep(sys, t_a, t_b, x, y)
    gap, lam_max = _lanczos_extremes(xp, alphas, betas, actives, rhs_norm)
    cond = _cond_from(xp, gap, lam_max)
    r_true = rhs - apply_S(y)
    true_res = xp.sqrt(dot(r_true, r_true / sys.c))
    rel_res = xp.where(rhs_norm > 0, true_res / xp.where(rhs_norm > 0, rhs_norm, xp.ones_like(rhs_norm)),
                       xp.zeros_like(rhs_norm))
    return (x, y), dict(gap=gap, lambda_max=lam_max, cond=cond, n_dropped=None, side="cols",
                        cg_converged=converged, cg_iter=it, cg_rel_residual=rel_res, cg_tol=tol)


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
    return (z[..., :sys.n], z[..., sys.n:]), {}


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


# --------------------------------------------------------------------------
# Diagnostics and warnings of a backward solve
# --------------------------------------------------------------------------

def _cond_threshold(dtype) -> float:
    return 1.0 / math.sqrt(backend.unit_roundoff(dtype))


#: Relative gradient error, estimated as ``cond(S^) x error`` (the backward's
#: condition number times the forward's reached marginal error), above which
#: a derivative of a converged plan warns (:class:`ConditioningWarning`).
GRADIENT_RESOLUTION_WARN = 1e-3


def _warn_resolution(res: SinkhornResult, cond_max: float, what: str) -> None:
    """ConditioningWarning when the plan's resolution limits the gradient.

    A converged plan satisfies its marginals only to ``error`` (at least the
    dtype's floor ``32 u (1 + max|C|/eps + log nm)``); the implicit
    derivative amplifies that by up to ``cond(S^)``.  In float32 at
    ``eps <~ 0.01 max|C|`` the product reaches 1e-3 to 1e-1: warn, naming
    ``eps`` and the dtype, rather than return the gradient silently.
    """
    xp = backend.namespace(P=res.P)
    err = float(xp.max(res.error))
    est = cond_max * err
    if est > GRADIENT_RESOLUTION_WARN:
        warnings.warn(
            f"sinkhorn {what}: at eps={res.eps:.3g} in {backend.dtype_name(res.P.dtype)} the plan is "
            f"resolved to a relative marginal error {err:.1e} and the backward amplifies it by up to "
            f"cond(S^) = {cond_max:.1e}: the gradient may be off by ~{est:.1e} (relative); use "
            + ("float64 or a larger eps" if backend.dtype_name(res.P.dtype) == "float32"
               else "a larger eps or a smaller tol"),
            ConditioningWarning, stacklevel=3)


def _warn_backward(res: SinkhornResult, info: dict, method: str, what: str) -> None:
    """ConvergenceWarning for an unconverged forward, ConditioningWarning for an
    ill-conditioned (or truncated) solve, ConvergenceWarning for unconverged CG."""
    xp = backend.namespace(P=res.P)
    cond_max = None
    if info.get("cond") is not None:
        cond_max = float(xp.max(info["cond"]))
    if not res.all_converged:
        err = float(xp.max(res.error))
        est = "" if cond_max is None else (
            f"; the gradient error may reach ~cond x error = {cond_max:.1e} x {err:.1e} = "
            f"{min(cond_max * err, math.inf):.1e} (relative)")
        warnings.warn(
            f"sinkhorn {what}: the forward did not converge (error {err:.2e} > tol); the implicit "
            f"gradient is exact for the problem with P's own marginals, not for (C, a, b){est}",
            ConvergenceWarning, stacklevel=3)
    if cond_max is not None and res.all_converged and cond_max <= _cond_threshold(res.P.dtype):
        _warn_resolution(res, cond_max, what)     # beyond the threshold: the warning below
    if cond_max is not None:
        thr = _cond_threshold(res.P.dtype)
        dropped = info.get("n_dropped")
        n_drop = int(xp.max(dropped)) if dropped is not None else 0
        if cond_max > thr or n_drop > 0:
            extra = (f"; {n_drop} near-null direction(s) truncated: least-squares (minimum-norm) "
                     f"solution of the consistent singular system, exact for C_bar and for marginal "
                     f"perturbations that keep the mass of each nearly-disconnected block"
                     if n_drop > 0 else "")
            warnings.warn(
                f"sinkhorn {what} (method={method!r}): the backward system is ill-conditioned: "
                f"cond(S^) = {cond_max:.2e} > {thr:.1e} (spectral gap "
                f"{float(xp.min(info['gap'])):.2e}); about {math.log10(max(cond_max, 1.0)):.0f} "
                f"digits may be lost{extra}",
                ConditioningWarning, stacklevel=3)
    if method == "cg" and not bool(xp.all(info["cg_converged"])):
        warnings.warn(
            f"sinkhorn {what} (method='cg'): conjugate gradients stopped after {info['cg_iter']} "
            f"iterations at relative residual {float(xp.max(info['cg_rel_residual'])):.2e} > "
            f"cg_tol={info['cg_tol']:.0e}; raise cg_max_iter or use method='schur'",
            ConvergenceWarning, stacklevel=3)


# --------------------------------------------------------------------------
# Gauge
# --------------------------------------------------------------------------

def gauge_fix(a_bar, b_bar):
    """Canonical representative ``(a_bar - mean(a_bar), b_bar + mean(a_bar))``.

    For a balanced problem ``(a_bar + k 1, b_bar - k 1)`` acts identically on
    every feasible direction (``1^T da = 1^T db``); this picks the member with
    ``sum(a_bar) == 0`` per batch member.  When ``a`` was broadcast against a
    batch of ``b`` (or vice versa) the shift is summed/broadcast to ``b_bar``'s
    shape.  Used by :func:`sinkhorn_vjp` and by the registry's
    ``canonicalize``.
    """
    xp = backend.namespace(a_bar=a_bar, b_bar=b_bar)
    backend.check_array(a_bar, "a_bar", min_ndim=1)
    backend.check_array(b_bar, "b_bar", min_ndim=1)
    try:
        backend.broadcast_shapes(tuple(a_bar.shape[:-1]), tuple(b_bar.shape[:-1]))
    except ValueError:
        raise ValueError(f"batch shapes of 'a_bar' {tuple(a_bar.shape[:-1])} and 'b_bar' "
                         f"{tuple(b_bar.shape[:-1])} do not broadcast") from None
    shift = xp.mean(a_bar, axis=-1, keepdims=True)
    out_b = b_bar + shift
    if tuple(out_b.shape) != tuple(b_bar.shape):
        out_b = b_bar + sum_to_shape(shift, tuple(b_bar.shape[:-1]) + (1,))
    return a_bar - shift, out_b


# --------------------------------------------------------------------------
# Reverse mode (VJP)
# --------------------------------------------------------------------------

def _check_cotangent(res: SinkhornResult, X, name: str):
    backend.namespace(P=res.P, **{name: X})
    backend.check_array(X, name)
    if tuple(X.shape) != tuple(res.P.shape):
        raise ValueError(f"argument {name!r} has shape {tuple(X.shape)}, expected {tuple(res.P.shape)} like P")
    if X.dtype != res.P.dtype:
        raise TypeError(f"argument {name!r} has dtype {backend.dtype_name(X.dtype)}, expected "
                        f"{backend.dtype_name(res.P.dtype)} like P")


def _marginal_factors(res: SinkhornResult):
    """``r / a'`` and ``c / b'`` for the problem ``P`` solves exactly:
    1 on a balanced side, ``exp(-f / rho_a)`` / ``exp(-g / rho_b)`` otherwise."""
    xp = backend.namespace(f=res.f)
    fa = None if res.rho_a is None else xp.exp(-res.f / res.rho_a)
    fb = None if res.rho_b is None else xp.exp(-res.g / res.rho_b)
    return fa, fb


# An isolated node (a row or column of P that underflowed to exact zeros,
# small eps before convergence) is the limit of a node whose mass tends to 0.
# For a column, c_j -> 0 in the row j of M gives dg_j -> eps w_b,j / (c_j (1 + beta))
# with P_ij dg_j / eps -> w_ij w_b,j / (1 + beta), w_ij = P_ij / c_j the column's
# relative weights (finite, from log P): the tangent mass w_b,j enters column j
# along w and leaves the rows' right-hand side; transposed,
# v_j = sum_i w_ij (G_ij - u_i) / (1 + beta).  Rows likewise.

def _node_weights(res: SinkhornResult, axis: int):
    """``P_ij / c_j`` (``axis=-2``) or ``P_ij / r_i`` (``axis=-1``) from ``log P``."""
    xp = backend.namespace(P=res.P)
    log_P = res.log_P
    return xp.exp(log_P - logsumexp(log_P, axis=axis, keepdims=True))


def _isolated_vjp(res: SinkhornResult, sys: _System, G, u, v):
    """Marginal adjoints of isolated nodes (decoupled, 0, in the solve)."""
    xp = backend.namespace(P=res.P)
    if sys.iso_c is not None:
        v_iso = xp.sum(_node_weights(res, -2) * (G - u[..., :, None]), axis=-2) / (1.0 + sys.beta)
        v = xp.where(sys.iso_c, v_iso, v)
    if sys.iso_r is not None:
        u_iso = xp.sum(_node_weights(res, -1) * (G - v[..., None, :]), axis=-1) / (1.0 + sys.alpha)
        u = xp.where(sys.iso_r, u_iso, u)
    return u, v


def _isolated_jvp(res: SinkhornResult, sys: _System, wa, wb):
    """Route the marginal tangents of isolated nodes: ``(wa', wb', dP_iso or None)``."""
    xp = backend.namespace(P=res.P)
    dP_iso = None
    if sys.iso_c is not None:
        inflow = xp.where(sys.iso_c, wb, xp.zeros_like(wb)) / (1.0 + sys.beta)
        dP_iso = _node_weights(res, -2) * inflow[..., None, :]
        wa = wa - xp.sum(dP_iso, axis=-1)
        wb = wb - inflow * (1.0 + sys.beta)
    if sys.iso_r is not None:
        inflow = xp.where(sys.iso_r, wa, xp.zeros_like(wa)) / (1.0 + sys.alpha)
        routed = _node_weights(res, -1) * inflow[..., :, None]
        wb = wb - xp.sum(routed, axis=-2)
        wa = wa - inflow * (1.0 + sys.alpha)
        dP_iso = routed if dP_iso is None else dP_iso + routed
    return wa, wb, dP_iso


def _implicit_vjp(res: SinkhornResult, G, method: str, **cg_options):
    """Full-batch ``(C_bar, u, v, info)`` before gauge fixing and reduction.

    Every output is linear in ``G``: when ``max|G|`` lies outside
    ``[2^-100, 2^100]`` the solve runs on ``G / s``, ``s`` the power of two
    nearest ``max|G|`` (an exact scaling), and its outputs are multiplied by
    ``s``, so that a cotangent near the overflow (or underflow) threshold
    cannot overflow inside the solver (CG's inner products square it).
    """
    xp = backend.namespace(P=res.P)
    gmax = float(xp.max(xp.abs(G)))
    if 0.0 < gmax < math.inf and not 2.0 ** -100 <= gmax <= 2.0 ** 100:
        scale = 2.0 ** math.frexp(gmax)[1]
        C_bar, u, v, info = _implicit_vjp(res, G / scale, method, **cg_options)
        return C_bar * scale, u * scale, v * scale, info
    sys = _system(res)
    P = res.P
    T = P * G
    t_a = xp.sum(T, axis=-1)
    t_b = xp.sum(T, axis=-2)
    if method == "kkt":
        # K z = [G; 0; 0]:  C_bar = -z_p, (u, v) = (z_a, z_b).
        zp, u, v = _kkt_solve(sys, res.eps, G, xp.zeros_like(t_a), xp.zeros_like(t_b))
        info = {}
        C_bar = -zp
    else:
        (u, v), info = _solve(sys, t_a, t_b, method, **cg_options)
        # C_bar = -(1/eps)(T - P * (u 1^T + 1 v^T))
        C_bar = -(T - P * (u[..., :, None] + v[..., None, :])) / res.eps
    u, v = _isolated_vjp(res, sys, G, u, v)
    return C_bar, u, v, info


def _info_for_warning(res: SinkhornResult, info: dict, method: str) -> dict:
    """Dense methods without their own spectral information borrow the
    conditioning diagnostic (eigenvalues of the scaled Schur complement)."""
    if info.get("cond") is None and method in ("reduced", "kkt"):
        cnd = res.conditioning
        info = dict(info, cond=cnd.cond, gap=cnd.spectral_gap, n_dropped=None)
    return info


def _reverse(res: SinkhornResult, P_bar, method: str, cg_tol, cg_max_iter, warn: bool, what: str):
    """Checked inputs, one implicit solve and its warnings: full-batch
    ``(C_bar, a_bar, b_bar)``, marginal gradients gauge fixed (balanced)."""
    _check_result(res)
    _check_method(method)
    _check_cotangent(res, P_bar, "P_bar")
    cg_options = _check_cg_options(method, cg_tol, cg_max_iter)
    warn = backend.check_flag(warn, "warn")
    C_bar, u, v, info = _implicit_vjp(res, P_bar, method, **cg_options)
    if warn:
        _warn_backward(res, _info_for_warning(res, info, method), method, what)
    fa, fb = _marginal_factors(res)
    a_bar = u if fa is None else u * fa
    b_bar = v if fb is None else v * fb
    if res.balanced:
        a_bar, b_bar = gauge_fix(a_bar, b_bar)
    return C_bar, a_bar, b_bar


def sinkhorn_vjp(res: SinkhornResult, P_bar, *, method: str = "schur", cg_tol: float | None = None,
                 cg_max_iter: int | None = None, warn: bool = True):
    r"""Implicit reverse mode: ``(C_bar, a_bar, b_bar)`` from ``P_bar = dL/dP``.

    Parameters
    ----------
    res : result of :func:`sinkhorn`.
    P_bar : (..., n, m) cotangent, any values (not only symmetric, not only
        of a particular loss).
    method : ``"schur"`` (dense, smaller side; LU, or a truncated eigen
        solve when ill-conditioned; default),
        ``"cg"`` (matrix-free conjugate gradients for large problems),
        ``"reduced"`` (the paper's (n + m - 1) dense system), ``"kkt"`` (full
        KKT system, tiny sizes only).  All agree to round-off.
    cg_tol, cg_max_iter : CG tolerance on the residual in the D_c^{-1} norm
        relative to the right-hand side (default 1e-12 in
        float64, 1e-5 in float32) and iteration limit (default
        ``max(1000, 10 min(n, m))``).
    warn : issue ConvergenceWarning (unconverged forward or CG) and
        ConditioningWarning (cond(S^) > 1/sqrt(u), or truncated directions,
        or a converged plan too coarse for its gradient, below).

    Accuracy in float32
    -------------------
    The gradient inherits the plan's marginal error amplified by up to
    ``cond(S^)``.  A float32 plan is resolved only to its rounding floor
    ``32 u (1 + max|C|/eps + log nm)`` (``u = 6e-8``), so at ``eps`` of a
    few hundredths of ``max|C|`` and below the float32 gradient can be off
    by 1e-3 to 1e-1 relative.  Whenever ``cond(S^) x max(error)`` exceeds
    ``GRADIENT_RESOLUTION_WARN`` (1e-3) a ConditioningWarning naming ``eps``
    and the dtype is issued (when ``cond(S^) > 1/sqrt(u)`` the
    ill-conditioning warning above is issued instead); float64 or a larger
    ``eps`` avoids it.

    Returns
    -------
    (C_bar, a_bar, b_bar) shaped like ``(C, a, b)`` (broadcast inputs get the
    sum over the batch).  Balanced: gauge fixed, ``sum(a_bar) == 0`` per
    member, ``C_bar`` has zero row and column sums.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> C = rng.random((3, 4)); a = np.full(3, 1 / 3); b = np.full(4, 0.25)
    >>> res = sinkhorn(C, a, b, eps=0.2, tol=1e-13)
    >>> G = rng.standard_normal((3, 4))
    >>> C_bar, a_bar, b_bar = sinkhorn_vjp(res, G)
    >>> bool(abs(a_bar.sum()) < 1e-14)
    True
    >>> bars_kkt = sinkhorn_vjp(res, G, method="kkt")
    >>> all(np.allclose(x, y, atol=1e-12) for x, y in zip((C_bar, a_bar, b_bar), bars_kkt))
    True
    """
    C_bar, a_bar, b_bar = _reverse(res, P_bar, method, cg_tol, cg_max_iter, warn, "VJP")
    return (sum_to_shape(C_bar, tuple(res.C.shape)), sum_to_shape(a_bar, tuple(res.a.shape)),
            sum_to_shape(b_bar, tuple(res.b.shape)))


def sinkhorn_vjp_eps(res: SinkhornResult, P_bar, *, method: str = "schur", cg_tol: float | None = None,
                     cg_max_iter: int | None = None, warn: bool = True):
    r"""Derivative of ``L(P)`` with respect to the temperature: ``<C_bar, log P>``.

    ``log P = (f 1^T + 1 g^T - C) / eps`` and the marginal conditions do not
    involve ``eps``, so ``dP/deps`` equals the JVP along ``dC = log P``
    (balanced or not).  For balanced problems this is also
    ``-<C_bar, C> / eps``.

    Returns an array with the batch shape (one derivative per member; for the
    single ``eps`` shared by a batch, ``dL/deps`` is its sum).  Accuracy in
    float32 and its ConditioningWarning: as :func:`sinkhorn_vjp`.
    """
    C_bar, _, _ = _reverse(res, P_bar, method, cg_tol, cg_max_iter, warn, "eps-derivative")
    return backend.namespace(P=res.P).sum(C_bar * res.log_P, axis=(-2, -1))


# --------------------------------------------------------------------------
# Forward mode (JVP)
# --------------------------------------------------------------------------

def _full_tangent(res, x, name: str, core: tuple):
    """A tangent broadcast to the full batch (``None`` -> zeros)."""
    xp = backend.namespace(P=res.P)
    shape = tuple(res.P.shape[:-2]) + core
    if x is None:
        return xp.zeros(shape, dtype=res.P.dtype, device=backend.device(res.P))
    backend.namespace(P=res.P, **{name: x})
    backend.check_array(x, name)
    ref = {"dC": res.C, "da": res.a, "db": res.b}[name]
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"argument {name!r} has shape {tuple(x.shape)}, expected {tuple(ref.shape)}")
    return xp.broadcast_to(x, shape)


def sinkhorn_jvp(res: SinkhornResult, dC=None, da=None, db=None, *, method: str = "schur",
                 cg_tol: float | None = None, cg_max_iter: int | None = None, warn: bool = True):
    r"""Implicit forward mode: ``dP`` for tangents ``(dC, da, db)`` (None = 0).

    ``M [df; dg] = [(P * dC) 1 + eps (r/a') da; (P * dC)^T 1 + eps (c/b') db]``,
    ``dP = P * (df 1^T + 1 dg^T - dC) / eps``.  For balanced problems an
    infeasible tangent is first projected to
    ``(da + 1 (1^T db - 1^T da) / n, db)`` (adjoint of the VJP's gauge).
    Accuracy in float32 and its ConditioningWarning: as :func:`sinkhorn_vjp`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(2)
    >>> C = rng.random((3, 3)); a = np.full(3, 1 / 3)
    >>> res = sinkhorn(C, a, a, eps=0.3, tol=1e-13)
    >>> dP = sinkhorn_jvp(res, dC=rng.standard_normal((3, 3)))
    >>> bool(np.allclose(dP.sum(1), 0, atol=1e-14) and np.allclose(dP.sum(0), 0, atol=1e-14))
    True
    """
    _check_result(res)
    _check_method(method)
    opts = _check_cg_options(method, cg_tol, cg_max_iter)
    warn = backend.check_flag(warn, "warn")
    xp = backend.namespace(P=res.P)
    n, m = res.P.shape[-2], res.P.shape[-1]
    dC_ = _full_tangent(res, dC, "dC", (n, m))
    da_ = _full_tangent(res, da, "da", (n,))
    db_ = _full_tangent(res, db, "db", (m,))
    if res.balanced:
        # Projection onto 1^T da = 1^T db whose adjoint is gauge_fix.
        da_ = da_ + (xp.sum(db_, axis=-1, keepdims=True) - xp.sum(da_, axis=-1, keepdims=True)) / n
    sys = _system(res)
    P = res.P
    fa, fb = _marginal_factors(res)
    wa = da_ if fa is None else fa * da_
    wb = db_ if fb is None else fb * db_
    wa, wb, dP_iso = _isolated_jvp(res, sys, wa, wb)
    if method == "kkt":
        # K [dP; -df; -dg] = [-dC; (r/a') da; (c/b') db]
        dP, _, _ = _kkt_solve(sys, res.eps, -dC_, wa, wb)
        info = {}
    else:
        PdC = P * dC_
        # M [df; dg] = [(P * dC) 1 + eps (r/a') da; (P * dC)^T 1 + eps (c/b') db]
        rhs_a = xp.sum(PdC, axis=-1) + res.eps * wa
        rhs_b = xp.sum(PdC, axis=-2) + res.eps * wb
        (df, dg), info = _solve(sys, rhs_a, rhs_b, method, **opts)
        dP = P * (df[..., :, None] + dg[..., None, :] - dC_) / res.eps
    if dP_iso is not None:
        dP = dP + dP_iso
    if warn:
        _warn_backward(res, _info_for_warning(res, info, method), method, "JVP")
    return dP


# --------------------------------------------------------------------------
# Values and their envelope gradients
# --------------------------------------------------------------------------

def _sum_core(xp, x):
    return xp.sum(x, axis=(-2, -1))


def _kl_vec(xp, p, q):
    """Generalised KL divergence ``sum p log(p / q) - p + q`` over the last axis."""
    return xp.sum(p * (xp.log(p) - xp.log(q)) - p + q, axis=-1)


def _warn_envelope(res: SinkhornResult, what: str) -> None:
    if not res.all_converged:
        warnings.warn(f"sinkhorn {what}: the forward did not converge; envelope gradients hold at "
                      f"the optimum only", ConvergenceWarning, stacklevel=3)


def entropic_value(res: SinkhornResult):
    r"""Entropic value ``W = <C, P> - eps h(P)`` (``+ rho_a KL(P1|a) + rho_b KL(P^T1|b)``).

    With ``h(P) = -sum P (log P - 1)``.  For the Gibbs-form ``P`` this is
    ``<f, r> + <g, c> - eps sum(P)`` (+ the KL terms); at a balanced optimum it
    equals the dual value ``<f, a> + <g, b> - eps sum(P)``.  Batch-shaped.

    Peers: OTT-JAX's ``ent_reg_cost`` (recent versions) uses the Shannon
    entropy ``-sum P log P`` and so differs from ``W`` by the constant
    ``eps sum(P)``; POT's ``ot.sinkhorn2`` returns the linear part instead
    (:func:`linear_value`); GeomLoss uses the KL convention
    (:func:`kl_value`).
    """
    _check_result(res)
    xp = backend.namespace(P=res.P)
    P = res.P
    r = xp.sum(P, axis=-1)
    c = xp.sum(P, axis=-2)
    W = xp.sum(res.f * r, axis=-1) + xp.sum(res.g * c, axis=-1) - res.eps * _sum_core(xp, P)
    if res.rho_a is not None:
        W = W + res.rho_a * _kl_vec(xp, r, xp.broadcast_to(res.a, r.shape))
    if res.rho_b is not None:
        W = W + res.rho_b * _kl_vec(xp, c, xp.broadcast_to(res.b, c.shape))
    return W


def entropic_value_grad(res: SinkhornResult):
    r"""Envelope gradient of :func:`entropic_value`: ``(C_bar, a_bar, b_bar, eps_bar)``.

    ``dW/dC = P``; ``dW/da = f`` (balanced side) or ``rho_a (1 - exp(-f/rho_a))``
    (the derivative of ``rho_a KL(r | a)`` in ``a`` with ``r / a =
    exp(-f / rho_a)``); likewise for ``b``; ``dW/deps = -h(P) = sum P (log P -
    1)`` (batch-shaped).  Balanced: gauge fixed like :func:`sinkhorn_vjp`.
    Exact at the optimum (warns for an unconverged result).
    """
    _check_result(res)
    _warn_envelope(res, "entropic_value_grad")
    xp = backend.namespace(P=res.P)
    P = res.P
    a_bar = res.f if res.rho_a is None else res.rho_a * (1.0 - xp.exp(-res.f / res.rho_a))
    b_bar = res.g if res.rho_b is None else res.rho_b * (1.0 - xp.exp(-res.g / res.rho_b))
    if res.balanced:
        a_bar, b_bar = gauge_fix(a_bar, b_bar)
    eps_bar = _sum_core(xp, P * (res.log_P - 1.0))
    return (sum_to_shape(P, tuple(res.C.shape)), sum_to_shape(a_bar, tuple(res.a.shape)),
            sum_to_shape(b_bar, tuple(res.b.shape)), eps_bar)


def _require_balanced(res: SinkhornResult, what: str) -> None:
    if not res.balanced:
        raise ValueError(
            f"{what} is defined for balanced problems only: with relaxed marginals the KL reference "
            f"a b^T changes the optimal plan (use entropic_value, or the cost C - eps(log a 1^T + 1 log b^T))")


def kl_value(res: SinkhornResult):
    r"""KL-convention value ``W_KL = <C, P> + eps KL(P | a b^T)`` (balanced).

    ``KL(P | Q) = sum P log(P / Q) - P + Q``; equals
    ``entropic_value - eps (<r, log a> + <c, log b>) + eps sum(a) sum(b)``.
    For probability marginals at the optimum it is the dual value
    ``<f - eps log a, a> + <g - eps log b, b>`` of the KL-regularised problem.
    Peers: OTT-JAX's ``reg_ot_cost`` / ``kl_reg_cost`` (recent versions) and
    GeomLoss's ``SamplesLoss("sinkhorn", debias=False)`` follow this
    convention (GeomLoss with its own scaling: cost ``|x - y|^p / p`` and
    ``eps = blur^p``; its default ``debias=True`` returns the Sinkhorn
    divergence ``W_KL(a, b) - (W_KL(a, a) + W_KL(b, b)) / 2`` instead).  The
    minimiser is the same plan as for :func:`entropic_value`.  Batch-shaped.
    """
    _check_result(res)
    _require_balanced(res, "kl_value")
    xp = backend.namespace(P=res.P)
    P = res.P
    r = xp.sum(P, axis=-1)
    c = xp.sum(P, axis=-2)
    mass_a = xp.sum(xp.broadcast_to(res.a, r.shape), axis=-1)
    mass_b = xp.sum(xp.broadcast_to(res.b, c.shape), axis=-1)
    return (entropic_value(res) - res.eps * (xp.sum(r * xp.log(res.a), axis=-1)
                                             + xp.sum(c * xp.log(res.b), axis=-1))
            + res.eps * mass_a * mass_b)


def kl_value_grad(res: SinkhornResult):
    r"""Envelope gradient of :func:`kl_value`: ``(C_bar, a_bar, b_bar, eps_bar)``.

    ``dW/dC = P``, ``dW/da = f - eps log a - eps + eps sum(b)``,
    ``dW/db = g - eps log b - eps + eps sum(a)`` (gauge fixed),
    ``dW/deps = KL(P | a b^T)``.
    """
    _check_result(res)
    _require_balanced(res, "kl_value_grad")
    _warn_envelope(res, "kl_value_grad")
    xp = backend.namespace(P=res.P)
    P = res.P
    batch = tuple(P.shape[:-2])
    a = xp.broadcast_to(res.a, batch + (P.shape[-2],))
    b = xp.broadcast_to(res.b, batch + (P.shape[-1],))
    mass_a = xp.sum(a, axis=-1, keepdims=True)
    mass_b = xp.sum(b, axis=-1, keepdims=True)
    a_bar = res.f - res.eps * xp.log(a) - res.eps + res.eps * mass_b
    b_bar = res.g - res.eps * xp.log(b) - res.eps + res.eps * mass_a
    a_bar, b_bar = gauge_fix(a_bar, b_bar)
    log_ab = xp.log(a)[..., :, None] + xp.log(b)[..., None, :]
    eps_bar = (_sum_core(xp, P * (res.log_P - log_ab) - P)
               + mass_a[..., 0] * mass_b[..., 0])
    return (sum_to_shape(P, tuple(res.C.shape)), sum_to_shape(a_bar, tuple(res.a.shape)),
            sum_to_shape(b_bar, tuple(res.b.shape)), eps_bar)


def linear_value(res: SinkhornResult):
    r"""Linear part ``<C, P>`` (batch-shaped): what POT's ``ot.sinkhorn2`` returns
    as its loss.  Not a minimum value, so no envelope: see
    :func:`linear_value_grad`."""
    _check_result(res)
    xp = backend.namespace(P=res.P)
    return _sum_core(xp, res.C * res.P)


def linear_value_grad(res: SinkhornResult, *, method: str = "schur", cg_tol: float | None = None,
                      cg_max_iter: int | None = None, warn: bool = True):
    r"""Gradient of ``<C, P>``: ``(P + C_bar', a_bar', b_bar', eps_bar')`` where the
    primes are :func:`sinkhorn_vjp` / :func:`sinkhorn_vjp_eps` with
    ``P_bar = C`` (one implicit solve serves all four; the plan's dependence
    on C is not negligible)."""
    _check_result(res)
    xp = backend.namespace(P=res.P)
    G = xp.broadcast_to(res.C, tuple(res.P.shape))
    C_bar, a_bar, b_bar = _reverse(res, G, method, cg_tol, cg_max_iter, warn, "linear_value_grad")
    eps_bar = xp.sum(C_bar * res.log_P, axis=(-2, -1))
    return (sum_to_shape(C_bar + res.P, tuple(res.C.shape)), sum_to_shape(a_bar, tuple(res.a.shape)),
            sum_to_shape(b_bar, tuple(res.b.shape)), eps_bar)


# --------------------------------------------------------------------------
# Unrolled baseline (what reverse-mode autodiff through the iterations does)
# --------------------------------------------------------------------------

def sinkhorn_unrolled(C, a, b, *, eps, n_iter: int, rho_a: float | None = None,
                      rho_b: float | None = None) -> UnrolledResult:
    r"""Exactly ``n_iter`` log-domain iterations, recording the reverse-mode tape.

    Same updates and the same returned plan as :func:`sinkhorn` stopped at
    iteration ``n_iter`` (``n_iter`` row updates and ``n_iter - 1`` column
    updates: ``P = exp(K + phi_tau + psi_{tau-1})``).  Records the softmax
    matrices ``S_row_k = exp(K + psi_{k-1} - LSE_row)`` and
    ``S_col_k = exp(K + phi_k - LSE_col)``: ``(2 n_iter - 1) n m`` numbers.
    """
    xp, batch, n, m, eps, rho_a, rho_b, cmax = _check_inputs(C, a, b, eps, rho_a, rho_b)
    n_iter = backend.check_int(n_iter, "n_iter", min=1)
    tau_a, tau_b = _damping(rho_a, eps), _damping(rho_b, eps)
    K = -C / eps
    log_a = xp.log(a)
    log_b = xp.log(b)
    psi = xp.zeros(batch + (m,), dtype=C.dtype, device=backend.device(C))
    rows, cols = [], []
    phi: Any = None                     # set by the first row update (n_iter >= 1)
    for k in range(1, n_iter + 1):
        x = K + psi[..., None, :]
        lse = logsumexp(x, -1)
        rows.append(xp.exp(x - lse[..., :, None]))            # d LSE_row / d x
        phi = tau_a * (log_a - lse)
        if k == n_iter:
            break
        y = K + phi[..., :, None]
        lse_c = logsumexp(y, -2)
        cols.append(xp.exp(y - lse_c[..., None, :]))          # d LSE_col / d y
        psi = tau_b * (log_b - lse_c)
    P = xp.exp(K + phi[..., :, None] + psi[..., None, :])
    return UnrolledResult(P=P, f=eps * phi, g=eps * psi, C=C, a=a, b=b, eps=eps, rho_a=rho_a,
                          rho_b=rho_b, n_iter=n_iter, row_softmax=tuple(rows), col_softmax=tuple(cols))


def sinkhorn_unrolled_vjp(res: UnrolledResult, P_bar):
    r"""Hand-written reverse pass through the ``n_iter`` recorded iterations.

    With ``P = exp(K + phi + psi)``, ``K = -C / eps``: ``K_bar = T``,
    ``phi_bar = T 1``, ``psi_bar = T^T 1``; then, iteration by iteration
    backwards, through ``phi_k = tau_a (log a - LSE_row(K + psi_{k-1}))``:

        a_bar += tau_a phi_bar / a,   w = -tau_a phi_bar,
        K_bar += S_row_k * w 1^T,     psi_bar += S_row_k^T w,

    and through ``psi_{k-1} = tau_b (log b - LSE_col(K + phi_{k-1}))``
    symmetrically; finally ``C_bar = -K_bar / eps``.  This is the exact
    gradient of the ``n_iter``-step map; compare it with the implicit one
    after :func:`gauge_fix` (only feasible directions are meaningful for a
    balanced problem).

    Returns ``(C_bar, a_bar, b_bar)`` shaped like the inputs.
    """
    if not isinstance(res, UnrolledResult):
        raise TypeError(f"argument 'res' must be an UnrolledResult from sinkhorn_unrolled(), "
                        f"got {type(res).__name__}")
    backend.namespace(P=res.P, P_bar=P_bar)
    backend.check_array(P_bar, "P_bar")
    if tuple(P_bar.shape) != tuple(res.P.shape):
        raise ValueError(f"argument 'P_bar' has shape {tuple(P_bar.shape)}, expected {tuple(res.P.shape)}")
    xp = backend.namespace(P=res.P)
    eps = res.eps
    tau_a, tau_b = _damping(res.rho_a, eps), _damping(res.rho_b, eps)
    T = res.P * P_bar
    K_bar = T
    phi_bar = xp.sum(T, axis=-1)
    psi_bar = xp.sum(T, axis=-2)
    a_bar = xp.zeros_like(phi_bar)
    b_bar = xp.zeros_like(psi_bar)
    for k in range(res.n_iter, 0, -1):
        S_row = res.row_softmax[k - 1]
        a_bar = a_bar + tau_a * phi_bar / res.a
        w = -tau_a * phi_bar
        K_bar = K_bar + S_row * w[..., :, None]
        psi_bar = psi_bar + _rmatvec(S_row, w)
        if k == 1:
            break                                              # psi_0 = 0 is a constant
        S_col = res.col_softmax[k - 2]
        b_bar = b_bar + tau_b * psi_bar / res.b
        w2 = -tau_b * psi_bar
        K_bar = K_bar + S_col * w2[..., None, :]
        phi_bar = matvec(S_col, w2)
        psi_bar = xp.zeros_like(psi_bar)
    C_bar = -K_bar / eps
    return (sum_to_shape(C_bar, tuple(res.C.shape)), sum_to_shape(a_bar, tuple(res.a.shape)),
            sum_to_shape(b_bar, tuple(res.b.shape)))


# --------------------------------------------------------------------------
# Conditioning diagnostic and the paper's error bound
# --------------------------------------------------------------------------

def sinkhorn_conditioning(res: SinkhornResult) -> Conditioning:
    r"""Spectrum of the scaled Schur complement ``S^`` of the smaller side.

    ``S^ = D_c^{-1/2} (D_c - P^T D_r^{-1} P) D_c^{-1/2}`` (balanced;
    eigenvalues ``1 - sigma_k^2`` of the normalised plan
    ``D_r^{-1/2} P D_c^{-1/2}``, the smallest exactly 0) or its unbalanced
    analogue, by a dense ``eigvalsh`` (``O(min(n, m)^3)``).  The spectral gap
    collapses like ``exp(-Delta / eps)`` when the ``eps -> 0`` limit is a
    permutation (assignment-type costs), and is 0 when ``P`` splits into
    disconnected blocks.
    """
    _check_result(res)
    xp = backend.namespace(P=res.P)
    sys = _system(res)
    side = "cols"
    if sys.n < sys.m:
        sys = sys.transposed()
        side = "rows"
    with backend.serial_dense(sys.P, sys.m):
        gap, lam_max = _spectrum(sys, _schur_operator(sys))
    return Conditioning(spectral_gap=gap, lambda_max=lam_max, cond=_cond_from(xp, gap, lam_max),
                        side=side, threshold=_cond_threshold(res.P.dtype))


def constraint_pinv_norm(n: int, m: int) -> float:
    r"""``kappa = ||E~^+||_2`` for the marginal operator with the last column
    constraint dropped (Eisenberger et al., Thm. 5).

    ``E~^T E~ = [[m I_n, 1 1^T], [1 1^T, n I_{m-1}]]`` has eigenvalues ``m``
    (multiplicity n - 1), ``n`` (m - 2) and
    ``((n + m) +- sqrt((n + m)^2 - 4n)) / 2`` (for m >= 2; ``m`` alone when
    m = 1), so ``kappa = 1 / sqrt(lambda_min)``.
    """
    if n < 1 or m < 1:
        raise ValueError(f"n and m must be >= 1, got n={n}, m={m}")
    eigs = []
    if m == 1:
        eigs.append(float(m))
    else:
        s = n + m
        eigs.append(2.0 * n / (s + math.sqrt(s * s - 4.0 * n)))   # the smaller root, stably
        if n >= 2:
            eigs.append(float(m))
        if m >= 3:
            eigs.append(float(n))
    return 1.0 / math.sqrt(min(eigs))


def sinkhorn_error_bound(res: SinkhornResult, *, C1: float, C2: float, reference=None,
                         P_err=None) -> ErrorBound:
    r"""Theorem 5 of Eisenberger et al. (2022): gradient error of an unconverged plan.

    For ``P(tau)`` (this result) and the exact plan ``P*`` with
    ``||P* - P(tau)||_F = P_err``, a loss whose gradient and Hessian in P are
    bounded by ``||grad_P L||_F <= C1`` and ``||Hess_P L|| <= C2`` along the
    segment between the two plans, and entry bounds
    ``sigma_- <= P_ij <= sigma_+`` on that segment, the implicit gradients
    satisfy

        ||C_bar* - C_bar(tau)||_F    <= (sigma_+ / eps) (C1 / sigma_- + C2) P_err,
        ||[a;b]_bar* - [a;b]_bar(tau)||_2
                         <= kappa sqrt(sigma_+ / sigma_-) (C1 / sigma_- + C2) P_err,

    ``kappa = ||E~^+||_2`` (:func:`constraint_pinv_norm`).  The second bound
    is for the marginal gradients in the paper's gauge (last entry of
    ``b_bar`` zero): shift both to it before comparing, since the norm of
    the difference depends on the gauge (in the ``sum(a_bar) = 0`` gauge
    that :func:`sinkhorn_vjp` returns it can be larger).  The paper states
    ``C2`` for the Frobenius norm of the Hessian; ``C2`` here may be its
    operator norm (never larger), the Lipschitz constant of ``grad_P L``
    that a mean-value argument needs; the tests find the bound holding with
    it (error / bound <= 0.2 over 1500 random unconverged problems).

    Parameters
    ----------
    res : the (unconverged) result, balanced.
    C1, C2 : the loss bounds (for ``L = <G, P>``: ``C1 = ||G||_F``, ``C2 = 0``).
    reference : a converged result for the same inputs: then
        ``P_err = ||P_ref - P||_F`` and ``sigma_-/sigma_+`` are the min/max
        of both plans' entries (the segment's entries lie between them).
    P_err : alternatively a known bound on ``||P* - P||_F``: then
        ``sigma_- = min P - P_err`` and ``sigma_+ = max P + P_err`` (the
        Frobenius ball contains the segment); the bound is ``inf`` where
        ``sigma_- <= 0``.

    Returns
    -------
    ErrorBound (batch-shaped arrays).  Valid but loose, and vacuous at small
    eps where ``sigma_-`` collapses.
    """
    _check_result(res)
    if not res.balanced:
        raise ValueError("sinkhorn_error_bound: Theorem 5 is stated for the balanced problem")
    C1 = backend.check_positive(C1, "C1", allow_zero=True)
    C2 = backend.check_positive(C2, "C2", allow_zero=True)
    if (reference is None) == (P_err is None):
        raise ValueError("pass exactly one of 'reference' (a converged SinkhornResult) or 'P_err'")
    xp = backend.namespace(P=res.P)
    P = res.P
    core = (-2, -1)
    if reference is not None:
        _check_result(reference, "reference")
        if tuple(reference.P.shape) != tuple(P.shape):
            raise ValueError(f"argument 'reference' has plan shape {tuple(reference.P.shape)}, "
                             f"expected {tuple(P.shape)}")
        if not reference.all_converged:
            raise ValueError("argument 'reference' did not converge; it stands for the exact plan P*")
        D = reference.P - P
        err = xp.sqrt(xp.sum(D * D, axis=core))
        s_minus = xp.minimum(xp.min(P, axis=core), xp.min(reference.P, axis=core))
        s_plus = xp.maximum(xp.max(P, axis=core), xp.max(reference.P, axis=core))
    else:
        err = xp.full(tuple(P.shape[:-2]), backend.check_positive(P_err, "P_err", allow_zero=True),
                      dtype=P.dtype, device=backend.device(P))
        s_minus = xp.min(P, axis=core) - err
        s_plus = xp.max(P, axis=core) + err
    kappa = constraint_pinv_norm(P.shape[-2], P.shape[-1])
    ok = s_minus > 0
    sm = xp.where(ok, s_minus, xp.ones_like(s_minus))
    factor = C1 / sm + C2
    bound_C = xp.where(ok, s_plus / res.eps * factor * err, xp.full_like(err, math.inf))
    bound_ab = xp.where(ok, kappa * xp.sqrt(s_plus / sm) * factor * err, xp.full_like(err, math.inf))
    return ErrorBound(C=bound_C, ab=bound_ab, P_err=err, sigma_minus=s_minus, sigma_plus=s_plus,
                      kappa=kappa)


# --------------------------------------------------------------------------
# ``refimpl.sinkhorn(C, a, b, eps=...)``: docs/design.md names the forward after
# this module, so the module object is made callable (it forwards to
# :func:`sinkhorn`); ``refimpl.sinkhorn.sinkhorn_vjp`` etc. work as usual.
# The module stays a module (``import refimpl.sinkhorn as m``, pickling of
# results and functions by their qualified names are unaffected), and
# ``inspect.signature(refimpl.sinkhorn)`` is the forward's.
# --------------------------------------------------------------------------

class _CallableModule(types.ModuleType):
    """A module whose call is :func:`sinkhorn` (``refimpl.sinkhorn(C, a, b, eps=...)``)."""

    def __call__(self, *args, **kwargs):
        return sinkhorn(*args, **kwargs)


__signature__ = inspect.signature(sinkhorn)
sys.modules[__name__].__class__ = _CallableModule
