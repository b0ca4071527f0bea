r"""Differentiable matrix square root and inverse square root of SPD matrices.

Definition
----------
For a symmetric positive (semi)definite ``A = U diag(l) U^T`` (..., n, n),

    S     = A^{1/2}  = U diag(sqrt l) U^T        (sqrtm)
    S_inv = A^{-1/2} = U diag(1/sqrt l) U^T      (inv_sqrtm, A definite)

are the unique SPD roots.  Batches (leading dimensions) are independent:
every normalisation, stopping test and diagnostic is per member.

Symbols: ``A`` the input (its symmetric part, see *Input*), ``l``/``U`` its
eigenvalues/eigenvectors, ``S``/``S_inv`` the outputs, ``c`` the per-member
normalisation constant, ``Z = I - A/c`` the normalised argument, ``x = l/c``
the normalised eigenvalues (``z = 1 - x``), ``G = S_bar`` (or ``S_inv_bar``)
the incoming cotangent, ``A_bar`` the outgoing one, ``dA, dS`` tangents,
``L_B(X) = B X + X B^T`` the Lyapunov operator.

Input
-----
``A`` must be square, finite, symmetric up to a relative tolerance
(``||A - A^T||_F <= sym_tol ||A||_F``; its symmetric part is used) and
positive semidefinite (``A + psd_tol ||A||_F I`` has a Cholesky factor;
``inv_sqrtm`` needs ``A`` itself definite).  Anything else is a ValueError
naming the problem.  A zero matrix is rejected (no normalisation exists and
the root is not differentiable there).

Forward equations
-----------------
``"mtp"`` (matrix Taylor polynomial, degree ``K``), with ``c = ||A||_F``
(so that ``l_max <= c`` and ``x in (0, 1]``, ``z in [0, 1)``):

    S     = sqrt(c) * sum_{k=0..K} t_k Z^k,   (1 - z)^{1/2}  = sum_k t_k z^k,
    S_inv = c^{-1/2} * sum_{k=0..K} u_k Z^k,  (1 - z)^{-1/2} = sum_k u_k z^k,

``t_k = binom(1/2, k) (-1)^k`` (``t_0 = 1``, all others negative),
``u_k = binom(2k, k) / 4^k``.

``"mpa"`` (matrix Padé approximant [m/m]), same ``c`` and ``Z``:

    S     = sqrt(c) Q(Z)^{-1} P(Z),      S_inv = c^{-1/2} P(Z)^{-1} Q(Z),

where ``P/Q`` (``q_0 = 1``) is the [m/m] Padé approximant of ``sqrt(1 - z)``
at ``z = 0``: ``Q f - P = O(z^{2m+1})``.  Its coefficients are rationals,
computed exactly (:func:`pade_coefficients`).  In ``x = 1 - z`` it has the
closed form ``r_m(x) = sqrt(x) coth((2m+1) artanh sqrt x) = E(x) / O(x)``
with ``E(x) = sum_j binom(2m+1, 2j) x^j``, ``O(x) = sum_j binom(2m+1, 2j+1)
x^j``; its poles lie at ``x = -tan^2(pi k / (2m+1)) < 0``, so it is finite on
the PSD cone, and ``r_m(0) = 1/(2m+1)`` (a zero eigenvalue is *not* mapped
to zero).

``"ns"`` (coupled Newton–Schulz, iSQRT-COV), with ``c = tr A``:

    Y_0 = A / c,  Z_0 = I,  M_k = 3I - Z_k Y_k,
    Y_{k+1} = Y_k M_k / 2,  Z_{k+1} = M_k Z_k / 2,
    S = sqrt(c) Y_T,  S_inv = Z_T / sqrt(c).

On an eigenvalue, ``w_k = x z_k^2`` obeys ``1 - w_{k+1} = (1 - w_k)^2 (3 +
(1 - w_k)) / 4``, quadratic convergence to ``w = 1``, i.e. ``y = sqrt x``;
zero eigenvalues stay zero.  ``T`` is either fixed (``iters``, the paper's
setting) or chosen per member: a member stops after the first step whose
incoming residual ``||I - Z_k Y_k||_F`` is ``<= tol`` (default
``sqrt(eps)``; the returned iterate is one more step on, error ~ tol^2).

``"eig"``: ``S = U diag(sqrt max(l, 0)) U^T`` from ``xp.linalg.eigh``.

Every output is symmetrised, ``S <- (S + S^T)/2`` (exact in exact
arithmetic).  Diagnostics: ``residual = ||S S - A||_F / ||A||_F`` (sqrtm) or
``||S_inv A S_inv - I||_F / sqrt(n)`` (inv_sqrtm), per member.

Adjoint equations
-----------------
Differentiating ``S S = A``: ``S dS + dS S = dA``, i.e. ``dS = L_S^{-1}(dA)``.
``L_S`` is self-adjoint for symmetric ``S``, so

    A_bar = L_S^{-1}(G):  S A_bar + A_bar S = G                       (1)

(for a general, non-symmetric root the equation is ``S^T X + X S^T = G``;
dropping the transposes is only right for symmetric ``S``).  In the
eigenbasis ("exact"), with ``s = sqrt l``,

    A_bar = U [ (U^T G U) o K ] U^T,   K_ij = 1 / (s_i + s_j),

the divided difference ``(s_i - s_j)/(l_i - l_j)`` written without the
difference quotient, so it is exact at repeated eigenvalues (``A = cI`` gives
``G / (2 sqrt c)``).  Inverse root: ``dS_inv = -S_inv dS S_inv``, hence

    K_ij = -1 / (s_i s_j (s_i + s_j)),
    A_bar = L_T^{-1}(-T^2 G T^2)  with T = S_inv                      (2)

(conjugating (1) by ``T``: ``T L_S(X) T = L_T(X)``).  ``L_S`` commutes
with transposition, so ``L_S^{-1}(sym G) = sym(L_S^{-1}(G))``.

Convention: the forward only sees ``sym(A)``, so every VJP returns the
symmetric ``A_bar = L_S^{-1}(sym G)`` — the symmetric part of the Fréchet
adjoint ``L_S^{-1}(G)`` (non-symmetric for a non-symmetric ``G``), and the
exact gradient of the implemented forward even along non-symmetric
perturbations.  Every JVP likewise differentiates along ``sym(dA)``.

"lyapunov_sign" solves (1)/(2) by the matrix sign function: for ``B``
with spectrum in the open right half-plane and ``B X + X B^T = C``,

    sign([[B, C], [0, -B^T]]) = [[I, 2X], [0, -I]],                   (3)

computed by the structured Newton–Schulz iteration on the scaled
``B_0 = B / sigma``, ``C_0 = C / sigma`` (the sign is scale invariant):

    B_{k+1} = B_k (3I - B_k^2) / 2,
    C_{k+1} = (3 C_k - B_k^2 C_k + B_k C_k B_k^T - C_k (B_k^T)^2) / 2,
    X = C_T / 2.

For sqrtm ``B = S, C = sym(G)``; for inv_sqrtm ``B = T, C = -T^2 sym(G)
T^2``.  With ``B`` and ``C`` symmetric a step takes 5 matmuls instead of 6:
with ``R = I - B^2``, ``B_{k+1} = B (R + 2I) / 2`` and ``C_{k+1} = sym(B C B
+ (2R + I) C) / 2`` (:func:`refimpl.matsqrt.sign.sign_step`).  On an eigenvalue ``b`` of ``B_0`` the
iteration applies ``b -> b (3 - b^2)/2``, which tends to 1 on ``(0, sqrt
3)`` but grows a small ``b`` only 1.5x a step.  Two variants:

* ``iters=T`` (the paper's fixed ``T``): ``T`` such plain steps from
  ``sigma = sqrt(||A||_F)`` (sqrtm) or ``||T||_F`` (inv_sqrtm), both upper
  bounds of the spectrum of ``B``.
* default, to ``tol``: ``sigma`` and a lower end ``l_0`` of the spectrum of
  ``B_0`` are taken from what the forward knows (``adjoint._sign_interval``:
  the eigenvalues for eig; for MPA/MTP the scalar map on ``[0, x_max]``,
  ``x_max >= l_max/c`` from ``||(A/c)^5||_F``, so ``[1/(2m+1), r_m(x_max)]``
  up to ``sqrt(c)`` for the MPA root whatever ``A``'s conditioning), and each step is
  the plain one applied to ``(a_k B_k, a_k C_k)`` with the scaling of Chen &
  Chow, ``a_k^2 = 3 / (1 + l_k + l_k^2)``, ``l_{k+1} = a_k l_k (3 - a_k^2
  l_k^2)/2``, which grows small eigenvalues up to 2.6x a step
  (:func:`refimpl.matsqrt.sign.chen_chow_step`).  The iterate is still an odd polynomial of
  the block matrix that tends to (3); ``l_0`` only sets the speed (step
  counts in docs/performance.md).  Every iterate keeps the solution, ``B_k X
  + X B_k = C_k``; once the spectrum of ``B_k`` is in a narrow interval
  around 1 the default finishes with a (shifted) Neumann series of that
  equation (:func:`refimpl.matsqrt.sign.neumann_finish`), a product a term
  against five a step.

``iters=T`` stops after ``T`` steps; the default stops a member after the
first step whose incoming ``||I - B_k^2||_F`` is ``<= tol`` (default
``sqrt(eps)``; the returned ``C`` is one step on, error ~ tol^2), or, with
the finish, as soon as finishing takes fewer products than stepping on.
The map ``C_0 -> X`` is linear and, for symmetric ``B``, self-adjoint (the
``a_k``, the hand-over and the number of terms depend on ``B`` only, and the
finish is a polynomial in ``Y -> B Y + Y B``), so the JVP is the same solve
with ``sym(dA)``.  A member's ``C`` is frozen after its last step
(its ``B`` runs on at the fixed point), so batch-mates never change it.

"approximant" is the exact derivative of the forward actually computed
(normalisation, symmetrisations, polynomial/rational evaluation or the
``T`` Newton–Schulz steps), by the chain rule written out below.  It differs
from "exact" by the approximation error's derivative (0.4-7% for an MPA on
well-conditioned inputs, ~100% near singular ones).

Error bounds
------------
On an eigenvalue the approximants apply a scalar map ``phi`` to ``x``
(:func:`scalar_map`, the "method oracle").  Their relative errors have closed
forms (:func:`relative_error`), with ``rho = (1 - sqrt x)/(1 + sqrt x)``,
``N = 2m + 1``:

    mpa:  r_m(x)/sqrt x - 1 = 2 rho^N / (1 - rho^N)      (inverse: -2 rho^N / (1 + rho^N))
    mtp:  (sum_k t_k z^k - sqrt x) / sqrt x = -(tail of the series)/sqrt x
    ns:   sqrt(w_T) - 1, w_T from the scalar recursion above.

:func:`error_bound` returns, per member, ``max_i |relative_error(x_i)|``,
which bounds ``||S_method - A^{1/2}||_2 <= bound * ||A^{1/2}||_2`` (and the
same for ``S_inv``) in exact arithmetic.

References
----------
Y. Song, N. Sebe, W. Wang, "Fast Differentiable Matrix Square Root", ICLR
2022, and "Fast Differentiable Matrix Square Root and Inverse Square Root",
IEEE TPAMI 2022 (MTP/MPA forward, Lyapunov backward via the sign function).
P. Li, J. Xie, Q. Wang, Z. Gao, "Towards Faster Training of Global
Covariance Pooling Networks by Iterative Matrix Square Root Normalization",
CVPR 2018 (coupled Newton–Schulz).  N. J. Higham, *Functions of Matrices*,
SIAM 2008, ch. 3 (Fréchet derivatives, Daleckii–Krein), 5 (sign function,
Newton–Schulz), 6 (square root, Padé).  J. Chen, E. Chow, "A Newton–Schulz
variant for improving the initial convergence in matrix sign computation",
Argonne preprint, 2014 (the scaled step ``a^2 = 3/(1 + l + l^2)``; its
properties are re-derived in derivations/matsqrt.py).

Modules
-------
:mod:`~refimpl.matsqrt.coefficients` (Taylor/Padé coefficients, scalar maps,
error bounds), :mod:`~refimpl.matsqrt.sign` (matrix sign function, Lyapunov
solver, the symmetric sign iteration), :mod:`~refimpl.matsqrt.forward`
(``sqrtm``, ``inv_sqrtm``), :mod:`~refimpl.matsqrt.adjoint` (VJPs and JVPs).
Each is written once against the array API; the private
``refimpl.matsqrt._kernels`` re-schedules some of the same operations for
host NumPy (work arrays, cache blocks, per-member LAPACK calls) and is used
only there.

Examples
--------
>>> import numpy as np
>>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
>>> res = sqrtm(A, method="eig")
>>> bool(np.allclose(res.S @ res.S, A, rtol=0, atol=1e-14))
True
>>> G = np.array([[1.0, 2.0], [0.0, 1.0]])            # a non-symmetric cotangent
>>> A_bar = sqrtm_vjp(res, G, method="exact")
>>> Gs = (G + G.T) / 2                                  # only sym(G) reaches sym(A)
>>> bool(np.allclose(res.S @ A_bar + A_bar @ res.S, Gs))  # S A_bar + A_bar S = sym(G)
True
"""

from __future__ import annotations

# the defaults, re-exported (not in __all__)
from ._common import DEFAULT_MAX_ITER as DEFAULT_MAX_ITER
from ._common import DEFAULT_MPA_ORDER as DEFAULT_MPA_ORDER
from ._common import DEFAULT_MTP_DEGREE as DEFAULT_MTP_DEGREE
from ._common import SQRT_METHODS, VJP_METHODS
from .adjoint import inv_sqrtm_jvp, inv_sqrtm_vjp, sqrtm_jvp, sqrtm_vjp
from .coefficients import (error_bound, pade_coefficients, relative_error, scalar_map,
                           taylor_coefficients)
from .forward import InvSqrtmResult, SqrtmResult, inv_sqrtm, sqrtm
from .sign import CHECK_EVERY as CHECK_EVERY
from .sign import LyapunovResult, SignResult, lyapunov, matrix_sign

__all__ = [
    "SQRT_METHODS",
    "VJP_METHODS",
    "InvSqrtmResult",
    "LyapunovResult",
    "SignResult",
    "SqrtmResult",
    "error_bound",
    "inv_sqrtm",
    "inv_sqrtm_jvp",
    "inv_sqrtm_vjp",
    "lyapunov",
    "matrix_sign",
    "pade_coefficients",
    "relative_error",
    "scalar_map",
    "sqrtm",
    "sqrtm_jvp",
    "sqrtm_vjp",
    "taylor_coefficients",
]
