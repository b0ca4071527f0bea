r"""Entropic optimal transport (the Sinkhorn operator) with implicit differentiation.

The package is callable: ``refimpl.sinkhorn(C, a, b, eps=...)`` is
:func:`sinkhorn` (docs/design.md's name for the forward; see the end of this
file).  Its modules follow the derivation below: ``forward`` (input checks,
tolerance floor, :func:`sinkhorn`), ``iterations`` (log and scaling domain),
``system`` (the backward linear system and its solvers), ``adjoint`` (VJP,
JVP, gauge), ``values``, ``unrolled`` and ``bounds``; ``results`` holds the
result types.

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

    error = || c - t ||_1 / ||t||_1,   t = b exp(-g / rho_b)     (= ||P^T 1 - b||_1 / ||b||_1 balanced)

is measured from the column log-sum-exp the next ``psi`` update needs anyway.
A batch member stops (and is frozen, so a batch gives what a loop gives) once
``error <= tol``; the returned ``P`` is the plan at that check.

The iterations run in the stabilised scaling domain (Schmitzer 2019): with
``phi = phi~ + log u`` and ``K~ = exp(K + phi~ 1^T + 1 psi~^T)`` the
log-sum-exps become matrix-vector products ``K~ v``, ``K~^T u``, and the
scalings are absorbed into ``phi~, psi~`` before they leave a safe range
(see :func:`refimpl.sinkhorn.iterations._scaling_advance`).  In exact arithmetic the iterates are those
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

import inspect
import sys
import types

from .adjoint import gauge_fix, sinkhorn_jvp, sinkhorn_vjp, sinkhorn_vjp_eps
from .bounds import constraint_pinv_norm as constraint_pinv_norm  # used by the derivations
from .bounds import sinkhorn_conditioning, sinkhorn_error_bound
from .forward import sinkhorn
from .results import Conditioning, ErrorBound, SinkhornResult, UnrolledResult
from .system import KKT_MAX_UNKNOWNS, METHODS
from .unrolled import sinkhorn_unrolled, sinkhorn_unrolled_vjp
from .values import (
    entropic_value,
    entropic_value_grad,
    kl_value,
    kl_value_grad,
    linear_value,
    linear_value_grad,
)

__all__ = [
    "KKT_MAX_UNKNOWNS",
    "METHODS",
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
