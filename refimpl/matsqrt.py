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
+ (2R + I) C) / 2`` (:func:`_lyapunov_sign_symmetric`).  On an eigenvalue ``b`` of ``B_0`` the
iteration applies ``b -> b (3 - b^2)/2``, which tends to 1 on ``(0, sqrt
3)`` but grows a small ``b`` only 1.5x a step.  Two variants:

* ``iters=T`` (the paper's fixed ``T``): ``T`` such plain steps from
  ``sigma = sqrt(||A||_F)`` (sqrtm) or ``||T||_F`` (inv_sqrtm), both upper
  bounds of the spectrum of ``B``.
* default, to ``tol``: ``sigma`` and a lower end ``l_0`` of the spectrum of
  ``B_0`` are taken from what the forward knows (:func:`_sign_interval`:
  the eigenvalues for eig; for MPA/MTP the scalar map on ``[0, x_max]``,
  ``x_max >= l_max/c`` from ``||(A/c)^5||_F``, so ``[1/(2m+1), r_m(x_max)]``
  up to ``sqrt(c)`` for the MPA root whatever ``A``'s conditioning), and each step is
  the plain one applied to ``(a_k B_k, a_k C_k)`` with the scaling of Chen &
  Chow, ``a_k^2 = 3 / (1 + l_k + l_k^2)``, ``l_{k+1} = a_k l_k (3 - a_k^2
  l_k^2)/2``, which grows small eigenvalues up to 2.6x a step
  (:func:`_lyapunov_sign_core`).  The iterate is still an odd polynomial of
  the block matrix that tends to (3); ``l_0`` only sets the speed.  Measured
  (float64): 11 -> 7 steps after an MPA forward on 64x64 covariances,
  23 -> 12 (cond 1e6) and 34 -> 17 (cond 1e10) after eig, with the same
  accuracy against scipy.  Every iterate keeps the solution, ``B_k X + X
  B_k = C_k``; once the spectrum of ``B_k`` is in a narrow interval around 1
  the default finishes with a (shifted) Neumann series of that equation
  (:func:`_finish`), a product a term against five a step: 4 steps and 4
  terms instead of 7 steps on the 64x64 covariances.

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

import functools
import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

import array_api_compat

from . import backend
from .backend import ConditioningWarning, ConvergenceWarning, eye_like, mT

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

SQRT_METHODS = ("mpa", "mtp", "ns", "eig")
VJP_METHODS = ("exact", "lyapunov_sign", "approximant")
DEFAULT_MPA_ORDER = 5          # [5/5]: 4 matmuls + 1 solve, ~10.7 n^3 flops
DEFAULT_MTP_DEGREE = 10        # 9 matmuls, ~18 n^3 flops
DEFAULT_MAX_ITER = 100
#: Where host syncs are deferred (a GPU; :class:`refimpl.backend.DevicePolicy`),
#: iterations between convergence tests of the Newton–Schulz loops while the
#: residual is still >= 1 (each test is a device sync; members are frozen
#: individually in between).  Below 1 the quadratic model predicts the next
#: test (see :func:`_steps_to_tol`).  On the host (NumPy) a test costs nothing
#: and is made after every step.
CHECK_EVERY = 2


# --------------------------------------------------------------------------
# Small pieces: symmetric part, per-member reductions
# --------------------------------------------------------------------------

def _sym(X):
    """Symmetric part (X + X^T) / 2 (exactly symmetric in floating point)."""
    S = X + mT(X)
    S *= 0.5
    return S


_fro = backend.frobenius          # per-member ||X||_F, shape X.shape[:-2]


def _dot(X, Y):
    """Per-member Frobenius inner product <X, Y>, shape X.shape[:-2]."""
    xp = array_api_compat.array_namespace(X, Y)
    return xp.sum(X * Y, axis=(-2, -1))


def _mm(v):
    """A per-member scalar (batch shape) lifted to broadcast against matrices."""
    return v[..., None, None]


def _eps(A) -> float:
    return float(array_api_compat.array_namespace(A).finfo(A.dtype).eps)


# --------------------------------------------------------------------------
# Exact coefficients (rationals)
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def taylor_coefficients(degree: int, *, inverse: bool = False) -> tuple[Fraction, ...]:
    """Exact Taylor coefficients of ``(1 - z)^{1/2}`` (or ``^{-1/2}``) at 0.

    ``(1 - z)^a = sum_k binom(a, k) (-z)^k``, so ``t_0 = 1`` and
    ``t_k = t_{k-1} (k - 1 - a) / k``.

    >>> taylor_coefficients(3)
    (Fraction(1, 1), Fraction(-1, 2), Fraction(-1, 8), Fraction(-1, 16))
    >>> taylor_coefficients(2, inverse=True)
    (Fraction(1, 1), Fraction(1, 2), Fraction(3, 8))
    """
    degree = _check_int(degree, "degree", minimum=0)
    a = Fraction(-1, 2) if inverse else Fraction(1, 2)
    t = [Fraction(1)]
    for k in range(1, degree + 1):
        t.append(t[-1] * (k - 1 - a) / k)
    return tuple(t)


@functools.lru_cache(maxsize=None)
def pade_coefficients(order: int, basis: str = "z") -> tuple[tuple[Fraction, ...], tuple[Fraction, ...]]:
    """Exact coefficients ``(p, q)`` of the [m/m] Padé approximant of sqrt(1 - z).

    ``basis="x"`` returns instead ``(e, o)`` with ``sqrt(x) ~ E(x)/O(x)``, the
    same rational function in ``x = 1 - z``: ``e_j = binom(2m+1, 2j) / 4^m``,
    ``o_j = binom(2m+1, 2j+1) / 4^m`` (positive; ``E(1) = O(1) = 1``).

    ``P(z) = sum_k p_k z^k``, ``Q(z) = sum_k q_k z^k`` with ``q_0 = 1`` and
    ``Q(z) f(z) - P(z) = O(z^{2m+1})`` for ``f(z) = (1 - z)^{1/2}``: the
    coefficients of ``z^{m+1} .. z^{2m}`` of ``Q f`` vanish (an m x m linear
    system for ``q_1..q_m``, solved in rationals), then
    ``p_k = sum_{j<=k} q_j c_{k-j}``.

    >>> p, q = pade_coefficients(1)          # (1 - 3z/4) / (1 - z/4)
    >>> p, q
    ((Fraction(1, 1), Fraction(-3, 4)), (Fraction(1, 1), Fraction(-1, 4)))
    """
    m = _check_int(order, "order", minimum=1)
    if basis == "x":
        N, scale = 2 * m + 1, Fraction(1, 4 ** m)
        return (tuple(math.comb(N, 2 * j) * scale for j in range(m + 1)),
                tuple(math.comb(N, 2 * j + 1) * scale for j in range(m + 1)))
    if basis != "z":
        raise ValueError(f"argument 'basis' must be 'z' or 'x', got {basis!r}")
    c = taylor_coefficients(2 * m)
    # Row r (k = m+1+r): sum_{j=1..m} q_j c_{k-j} = -c_k.
    rows = [[c[m + 1 + r - j] for j in range(1, m + 1)] + [-c[m + 1 + r]] for r in range(m)]
    for col in range(m):                          # Gauss-Jordan in exact arithmetic
        piv = next(r for r in range(col, m) if rows[r][col] != 0)
        rows[col], rows[piv] = rows[piv], rows[col]
        pv = rows[col][col]
        rows[col] = [v / pv for v in rows[col]]
        for r in range(m):
            if r != col and rows[r][col] != 0:
                f = rows[r][col]
                rows[r] = [a - f * b for a, b in zip(rows[r], rows[col])]
    q = (Fraction(1),) + tuple(rows[r][m] for r in range(m))
    p = tuple(sum((q[j] * c[k - j] for j in range(k + 1)), Fraction(0)) for k in range(m + 1))
    return p, q


def _check_int(value, name: str, *, minimum: int) -> int:
    return backend.check_int(value, name, min=minimum)


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------

def _member(idx, batch_shape) -> str:
    return f" (batch member {tuple(int(i) for i in idx)})" if batch_shape else ""


def _worst(v, batch_shape):
    """(value, index) of the largest entry of a per-member host (NumPy) array."""
    import numpy as np  # host-side bookkeeping on the error path only
    v = np.asarray(v, dtype=float).reshape(batch_shape)
    idx = np.unravel_index(int(np.argmax(v)), batch_shape) if batch_shape else ()
    return float(v[idx]) if batch_shape else float(v), idx


def _check_square(A, name: str):
    backend.check_array(A, name, min_ndim=2)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"argument {name!r} must be square in its last two axes, "
                         f"got shape {tuple(A.shape)}")
    if A.shape[-1] == 0:
        raise ValueError(f"argument {name!r} is empty (shape {tuple(A.shape)})")


def _symmetric_part(A, name: str, sym_tol: float | None):
    """Validate symmetry up to ``sym_tol`` (relative, Frobenius) and return
    ``(sym(A), ||A||_F)``; zero members are rejected."""
    xp = array_api_compat.array_namespace(A)
    bshape = tuple(A.shape[:-2])
    tol = math.sqrt(_eps(A)) if sym_tol is None else backend.check_positive(sym_tol, "sym_tol")
    norm = _fro(A)
    if not bool(xp.all(norm > 0)):
        _, idx = _worst(backend.to_host(norm == 0), bshape)
        raise ValueError(f"argument {name!r} is the zero matrix{_member(idx, bshape)}: "
                         "no normalisation exists and its root is not differentiable")
    As = _sym(A)
    asym = 2.0 * _fro(A - As) / norm                   # A - A^T = 2 (A - sym(A))
    if not bool(xp.all(asym <= tol)):
        val, idx = _worst(backend.to_host(asym), bshape)
        raise ValueError(f"argument {name!r} is not symmetric: ||A - A^T||_F / ||A||_F = "
                         f"{val:.2e} > sym_tol = {tol:.1e}{_member(idx, bshape)}")
    return As, _fro(As)


def _psd_tol(A, psd_tol) -> float:
    """Accepted negative eigenvalue relative to ||A||_F (default 10 n eps)."""
    if psd_tol is None:
        return 10.0 * A.shape[-1] * _eps(A)
    return backend.check_positive(psd_tol, "psd_tol", allow_zero=True)


def _check_psd(As, norm, name: str, *, definite: bool, psd_tol: float | None):
    """Raise ValueError unless every member is PSD (``definite``: PD)."""
    xp = array_api_compat.array_namespace(As)
    # a shift below the factorisation's own rounding (~n eps ||A||) decides
    # nothing: a singular PSD member would pass or fail by the rounding luck of
    # the LAPACK at hand
    tau = max(_psd_tol(As, psd_tol), As.shape[-1] * _eps(As))
    shifted = As if definite else backend.add_to_diagonal(xp.asarray(As, copy=True), tau * norm)
    if backend.is_positive_definite(shifted):
        return
    _raise_not_psd(As, norm, name, definite=definite)


def _raise_not_psd(As, norm, name, *, definite, eigenvalues=None):
    """ValueError naming the member with the most negative relative eigenvalue."""
    xp = array_api_compat.array_namespace(As)
    bshape = tuple(As.shape[:-2])
    lam = backend.to_host(xp.linalg.eigvalsh(As) if eigenvalues is None else eigenvalues)
    lmin = lam[..., 0].reshape(bshape)
    rel = lmin / backend.to_host(norm).reshape(bshape)
    _, idx = _worst(-rel, bshape)
    kind = "positive definite" if definite else "positive semidefinite"
    raise ValueError(
        f"argument {name!r} is not symmetric {kind}: smallest eigenvalue "
        f"{float(lmin[idx]):.3e} (relative to ||A||_F: {float(rel[idx]):.2e})"
        f"{_member(idx, bshape)}")


# --------------------------------------------------------------------------
# Newton–Schulz driver shared by matrix_sign, lyapunov and the NS root
# --------------------------------------------------------------------------

def _steps_to_tol(err: float, tol: float) -> int:
    """Steps the Newton–Schulz error model ``d' = d^2 (3 + d) / 4`` needs to
    take a residual ``err < 1`` to ``<= tol`` (at least 1): when to test next.

    Every iteration here (sign, coupled root) obeys this recursion on each
    eigenvalue's ``d = 1 - lambda^2`` (resp. ``1 - w``); the Frobenius residual
    bounds the largest ``|d|``, so the prediction is never late by more than the
    model's slack, and a late member is simply tested again.
    """
    k, d = 0, err
    while d > tol and k < 64:
        d = d * d * (3.0 + d) / 4.0
        k += 1
    return max(k, 1)


def _newton_schulz(state: tuple, step: Callable, *, iters: int | None, tol: float,
                   max_iter: int, record: bool = False, frozen: tuple | None = None):
    """Run ``state <- step(state)`` per member until its residual is <= tol.

    ``step(state) -> (new_state, err, aux)`` where ``err`` (batch shape) is
    the residual of the *incoming* state, a by-product of the step.  Unless
    ``record``, the driver keeps no reference to a state once the next one is
    made, so a step may write its new state into the arrays of the state
    before its incoming one.  With
    ``iters`` given every member takes exactly ``iters`` steps (the papers'
    fixed ``T``); otherwise a member is frozen after the first step whose
    incoming residual is <= tol, so its result does not depend on its
    batch-mates, and the loop ends when all are frozen or after ``max_iter``
    steps.  Whether all are frozen is tested after every step on the host;
    where host syncs are deferred (a GPU: a device sync each time;
    :func:`refimpl.backend.device_policy`) every :data:`CHECK_EVERY` steps
    while the largest residual is >= 1, then when the quadratic model
    predicts convergence.  The schedule only decides when the loop stops,
    never what a member computes; so a step may be called after every member
    has stopped (its results for stopped members are discarded) and must
    accept that.

    ``frozen`` says which state components are held once a member stops
    (default: all); a component that only drives the others (the sign
    iteration's ``B``, which stays at its fixed point) may run on.

    A step may return a fourth item, a per-member mask of the members it
    finished itself (the symmetric sign iteration's finish); those stop
    instead of the ones with ``err <= tol``, and ``converged`` is then
    "stopped" (``tol`` only schedules the device-sync checks).

    Returns ``(state, n_iter, error, converged, history)``; ``error`` is the
    residual measured at the start of each member's last step, ``history``
    (if ``record``) the list of ``(incoming state, aux, active mask)``.
    """
    xp = array_api_compat.array_namespace(state[0])
    bshape = tuple(state[0].shape[:-2])
    dev = backend.device(state[0])
    done = xp.zeros(bshape, dtype=xp.bool, device=dev)
    n_iter = xp.zeros(bshape, dtype=xp.int64, device=dev)
    err = xp.full(bshape, math.inf, dtype=state[0].dtype, device=dev)
    history = []
    n_steps = iters if iters is not None else max_iter
    device_sync = backend.device_policy(xp, dev).deferred_sync
    none_stopped = not device_sync     # known on the host (no sync): holding is a no-op
    next_check = 1
    stops_itself = False
    for k in range(n_steps):
        new, e, aux, *stop = step(state)
        stops_itself = bool(stop)
        active = ~done
        if record:
            history.append((state, aux, active))
        if iters is None and not none_stopped:   # hold the members that have stopped
            keep = frozen or (True,) * len(state)
            state = tuple(xp.where(_mm(active), a, b) if f else a
                          for a, b, f in zip(new, state, keep))
        else:
            state = new
        err = xp.where(active, e, err)
        n_iter = n_iter + xp.astype(active, xp.int64)
        if iters is None:
            done = done | (stop[0] if stops_itself else (e <= tol))
            if k + 1 >= next_check:
                if bool(xp.all(done)):
                    break
                if not device_sync:
                    none_stopped = not bool(xp.any(done))
                    next_check = k + 2
                    continue
                # the largest residual of a running member, one step ago
                worst = float(xp.max(xp.where(done, xp.zeros_like(e), e)))
                # a member whose residual entering step k is e stops after step
                # k + _steps_to_tol(e): test right after that step
                ahead = _steps_to_tol(worst, tol) if worst < 1.0 else CHECK_EVERY
                next_check = k + 1 + ahead
    converged = done if stops_itself and iters is None else err <= tol
    return state, n_iter, err, converged, history


def _iteration_options(iters, tol, max_iter, dtype_eps: float):
    if iters is not None:
        iters = _check_int(iters, "iters", minimum=1)
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    tol = math.sqrt(dtype_eps) if tol is None else backend.check_positive(tol, "tol")
    return iters, tol, max_iter


def _warn_unconverged(what: str, converged, error, tol: float, stacklevel: int = 3):
    xp = array_api_compat.array_namespace(converged)
    if bool(xp.all(converged)):
        return
    worst = float(xp.max(xp.where(converged, xp.zeros_like(error), error)))
    warnings.warn(f"{what} did not converge: residual {worst:.2e} > tol {tol:.1e} "
                  "(increase max_iter/iters, or the input is too ill-conditioned)",
                  ConvergenceWarning, stacklevel=stacklevel)


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
    xp = backend.namespace(M=M)
    _check_square(M, "M")
    iters, tol, max_iter = _iteration_options(iters, tol, max_iter, _eps(M))
    norm = _fro(M)
    if not bool(xp.all(norm > 0)):
        raise ValueError("argument 'M' has a zero member: its sign is undefined")
    eye = eye_like(M)

    def step(state):
        (X,) = state
        X2 = X @ X                                     # X_k^2
        e = _fro(X2 - eye)
        return (1.5 * X - 0.5 * (X @ X2),), e, None    # X (3I - X^2) / 2

    (X,), n_iter, err, conv, _ = _newton_schulz((M / _mm(norm),), step, iters=iters,
                                                tol=tol, max_iter=max_iter)
    _warn_unconverged("matrix_sign", conv, err, tol)
    return SignResult(sign=X, n_iter=n_iter, error=err, converged=conv)


def _lyapunov_sign_core(B0, C0, *, iters, tol, max_iter, symmetric: bool = False, l0=None):
    """Structured Newton–Schulz on sign([[B0, C0], [0, -B0^T]]) (identity (3)).

    ``B0`` must already be scaled (spectrum in the right half-plane, inside
    the unit disc).  Returns ``(X, n_iter, error, converged)`` with ``X =
    C_T / 2`` solving ``B0 X + X B0^T = C0``; a member stops after the first
    step whose incoming ``||I - B_k^2||_F`` is ``<= tol``.  General ``B, C``:
    6 matmuls a step,

        B_{k+1} = (3B - B B^2) / 2,  C_{k+1} = (3C - B^2 C + B C B^T - C (B^T)^2) / 2.

    ``symmetric`` (``B0`` and ``C0`` symmetric): :func:`_lyapunov_sign_symmetric`.
    """
    if symmetric:
        return _lyapunov_sign_symmetric(B0, C0, iters=iters, tol=tol, max_iter=max_iter,
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
        if not bool(xp.any(active)):
            break
    return 0.5 * C, n_iter, err, conv


def _finish_terms(a, b, target):
    """Per member, the least ``j >= 0`` with ``q^{j+1} b / a <= target``, ``q =
    (b - a) / (b + a)``: the terms after which :func:`_finish` on the interval
    ``[a, b]`` has a relative error bound ``<= target``; ``inf`` where ``a <=
    0`` (no bound)."""
    xp = array_api_compat.array_namespace(a, b)
    ok = a > 0.0
    a1 = xp.where(ok, a, xp.ones_like(a))
    q = (b - a1) / (b + a1)
    pos = q > 0.0
    qs = xp.where(pos, q, xp.full_like(q, 0.5))
    j = xp.ceil(xp.log(target * a1 / b) / xp.log(qs)) - 1.0
    j = xp.where(pos, xp.maximum(j, xp.zeros_like(j)), xp.zeros_like(j))
    return xp.where(ok, j, xp.full_like(j, math.inf))


def _finish(B, C, a, b, j, work, out):
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
    :func:`_finish_terms`, per member: ``j = 0`` for a member not finished
    here, whose result is unused).  Every term is exactly symmetric, and the
    map ``C -> Z`` is a polynomial in ``L``: linear and self-adjoint.
    """
    xp = array_api_compat.array_namespace(B, C)
    j_max = int(xp.max(j))
    same = bool(xp.all(j == j_max))
    w = _mm(1.0 / (a + b))
    Dw = backend.add_to_diagonal(backend.multiply(B, -w, out=work[0]), 0.5)   # I/2 - w B
    term = backend.multiply(C, 2.0 * w, out=work[1])     # T^0(2 w C)
    Z = backend.multiply(term, 1.0, out=out)             # a copy
    for t in range(1, j_max + 1):
        M = backend.matmul(Dw, term, out=work[2])
        term = backend.add(M, mT(M), out=work[1])        # T^t(2 w C)
        if same:
            Z = backend.add(Z, term, out=Z)
        else:                                            # only members with t <= j
            Z = backend.add(Z, backend.multiply(term, _mm(xp.astype(j >= t, term.dtype)),
                                                out=work[2]), out=Z)
    return Z


def _lyapunov_sign_symmetric(B, C, *, iters, tol, max_iter, l0=None, scale=None,
                             l0_is_bound=False):
    """:func:`_lyapunov_sign_block` over blocks of batch members whose work
    arrays fit in cache (:func:`refimpl.backend.batch_blocks`; one block off
    NumPy).  The members are independent, so the blocking changes no result;
    ``l0`` and ``scale`` are per member (broadcast to the batch shape)."""
    xp = array_api_compat.array_namespace(B, C)
    n, bshape = B.shape[-1], tuple(B.shape[:-2])
    count = math.prod(bshape)
    member_bytes = _SIGN_WORK_ARRAYS * n * n * (xp.finfo(B.dtype).bits // 8)
    blocks = backend.batch_blocks(count, member_bytes, B)
    if len(blocks) == 1 or tuple(C.shape) != tuple(B.shape):
        return _lyapunov_sign_block(B, C, iters=iters, tol=tol, max_iter=max_iter,
                                    l0=l0, scale=scale, l0_is_bound=l0_is_bound)

    def flat(a):
        return None if a is None else xp.reshape(xp.broadcast_to(a, bshape), (count,))

    Bf, Cf = xp.reshape(B, (count, n, n)), xp.reshape(C, (count, n, n))
    l0f, sf = flat(l0), flat(scale)
    parts = [_lyapunov_sign_block(Bf[s, ...], Cf[s, ...], iters=iters, tol=tol, max_iter=max_iter,
                                  l0=None if l0f is None else l0f[s],
                                  scale=None if sf is None else sf[s],
                                  l0_is_bound=l0_is_bound) for s in blocks]
    shapes = (tuple(B.shape), bshape, bshape, bshape, bshape)
    return tuple(xp.reshape(xp.concat([p[i] for p in parts], axis=0), shape)
                 for i, shape in enumerate(shapes))


#: Arrays of size n^2 per member that :func:`_lyapunov_sign_block` works in.
_SIGN_WORK_ARRAYS = 7


def _lyapunov_sign_block(B, C, *, iters, tol, max_iter, l0=None, scale=None,
                         l0_is_bound=False):
    """The sign iteration (3) for ``B0 = B / scale`` (symmetric, spectrum in
    ``(0, 1]``) and ``C0 = C / scale`` (symmetric; ``scale`` per member,
    default 1); returns ``(X, n_iter, error, converged, n_terms)``, ``X``
    solving ``B X + X B = C`` and the rest as :class:`LyapunovResult`.

    Every ``B_k`` is then a polynomial in ``B0`` and every ``C_k`` symmetric.
    A step applies the odd polynomial ``p_k(x) = c1 x + c2 x (1 - x^2)``
    (plain Newton–Schulz: ``c1 = 1, c2 = 1/2``) to the block matrix.  With
    ``R = I - B^2`` and ``g = c1 / c2``, in 5 matmuls:

        B_{k+1} = c2 B P,  P = R + g I,
        C_{k+1} = c2 sym(M),  M = B C B + (2R + (g - 1) I) C,

    equal to the block update ``c1 C + c2 (C - B^2 C - C B^2 + B C B)`` when
    ``C`` is symmetric (``sym(2 R C) = R C + C R``; checked with sympy in
    derivations/matsqrt.py).  The ``sym`` is part of the formula (``M`` itself
    is not symmetric), and it makes every ``C_k`` exactly symmetric in
    floating point.

    Scaling (``iters`` None; ``l0`` per member, in ``(0, 1]``: a lower bound,
    or an estimate, of the smallest eigenvalue of ``B0``): the step for the
    interval ``[l_k, u]`` of Chen & Chow (2014),

        p_k(x) = a_k x (3 - a_k^2 x^2) / 2,  a_k^2 = 3 / (u^2 + u l_k + l_k^2),
        l_{k+1} = p_k(l_k),

    i.e. ``c1 = a (3 - a^2) / 2``, ``c2 = a^3 / 2``: it maps ``l_k`` and ``u``
    to the same value and the whole interval into ``[l_{k+1}, 1]`` (``p_k <=
    1``, maximal at ``1/a_k``), and is still odd, so the iterate still tends
    to the sign (3).  Small eigenvalues grow by up to ``1.5 sqrt(3) = 2.6`` a
    step instead of 1.5.  ``u = 1 + sqrt(eps)`` leaves room for rounding
    above the bound 1: every eigenvalue below ``sqrt(u^2 + u l + l^2) >= u``
    is mapped into ``(0, 1]``.  ``l_k`` is raised to ``sqrt(1 - ||I -
    B_k^2||_F)`` when that is larger (every eigenvalue ``b`` of ``B_k`` has
    ``|1 - b^2| <= ||I - B_k^2||_F``), so ``a_k -> 1`` as the residual
    vanishes.  An ``l0`` that overestimates the smallest eigenvalue costs
    speed, never correctness: ``a_k >= 1`` (up to the headroom), so a small
    eigenvalue still grows at least 1.5x a step until the steps become plain
    ones, which converge on ``(0, sqrt 3)``.

    Finish (``iters`` None): every iterate keeps the solution, ``B_k X + X
    B_k = C_k`` (``sign(M_{k+1}) = sign(p_k(M_k)) = sign(M_k)``), and once
    the spectrum of ``B_k`` lies in a narrow interval ``[a, b]`` around 1 that
    equation is solved by a Neumann series (:func:`_finish`, one product a
    term, against five a sign step) to the relative accuracy ``tol^2`` that
    one more sign step from residual ``tol`` would give.  The interval: every
    eigenvalue has ``|1 - b^2| <= e_k = ||I - B_k^2||_F``, so ``[sqrt(1 -
    e_k), sqrt(1 + e_k)]``; with ``l0_is_bound`` (``l0`` a lower bound of the
    spectrum, not an estimate: the eig, MPA and MTP forwards) also ``[l_k,
    u]``, which the scaled steps keep (widened by ``sqrt(eps)`` for rounding)
    and which is much narrower (``e_k`` sums over all ``n`` eigenvalues).  A
    member hands over at the first step where finishing now takes fewer
    products than one more step and the finish after it (``j_k < 5 +
    j_{k+1}``, :func:`_finish_terms`; ``j_{k+1}`` from ``l_{k+1}``, or from
    the plain step's ``e' = e^2 (3 + e) / 4``); with ``l0_is_bound`` that is
    decided before ``B_k^2`` is formed, which the finish then does without
    (the reported error is then the bound ``1 - l_k^2`` on ``||I -
    B_k^2||_2``).  On 64x64 covariances after an MPA forward: 4 steps and 4
    terms (24 products) instead of 5 steps and 2 terms of the Frobenius-based
    finish (28) or 7 steps (35).  ``n_iter`` counts the finish as a step,
    ``n_terms`` its terms.  ``iters`` given: exactly that many plain steps,
    the paper's setting.

    Memory: the scaled inputs, two sets of iterates used in turn (a step
    writes over the set of the step before last, which the driver no longer
    holds) and three work arrays are cut from one block
    (:func:`refimpl.backend.work_arrays`); on NumPy and CuPy every product is
    written into them, so the loop allocates nothing of size n^2 (but for
    the finish of some members while others step).
    """
    xp = array_api_compat.array_namespace(B, C)
    pad = math.sqrt(_eps(B))
    u = 1.0 + pad
    finish = iters is None
    target = tol * tol
    B0, C0, B1, C1, *work = backend.work_arrays(B, _SIGN_WORK_ARRAYS)
    inv = 1.0 if scale is None else _mm(1.0 / scale)
    B0, C0 = backend.multiply(B, inv, out=B0), backend.multiply(C, inv, out=C0)
    sets = [(B0, C0), (B1, C1)]
    calls = [0]
    bshape = tuple(B.shape[:-2])
    n_terms = xp.zeros(bshape, dtype=xp.int64, device=backend.device(B))
    finished = [xp.zeros(bshape, dtype=xp.bool, device=backend.device(B))]

    def raised(l, e):
        """``l_k <- max(l_k, sqrt(1 - e))`` (a bound whenever ``l_k`` is)."""
        r = 1.0 - e
        return xp.maximum(l, xp.sqrt(xp.where(r > 0.0, r, xp.zeros_like(r))))

    def scaling(l):
        """``(c2, g, l_{k+1})`` of the scaled step for the interval ``[l, u]``."""
        a2 = 3.0 / (u * u + u * l + l * l)               # a^2 = 3 / (u^2 + u l + l^2)
        a = xp.sqrt(a2)
        return 0.5 * a * a2, (3.0 - a2) / a2, 0.5 * a * l * (3.0 - a2 * l * l)

    def interval(e, l):
        """Per member ``[a, b]`` holding the spectrum of ``B_k`` (``a <= 0``:
        none): from ``e`` (None: not computed) and, if a bound, ``l``."""
        lo = hi = None
        if e is not None:
            lo = xp.sqrt(xp.maximum(1.0 - e, xp.zeros_like(e)))
            hi = xp.sqrt(1.0 + e)
        if l0_is_bound and l is not None:
            lo = l - pad if lo is None else xp.maximum(lo, l - pad)
            hi = xp.full_like(l, u) if hi is None else xp.minimum(hi, xp.full_like(hi, u))
        return lo, hi

    def hand_over(e, l):
        """Per member: finish now (strictly fewer products than one more step,
        5, and the finish after it)?, and the finish's terms."""
        j_now = _finish_terms(*interval(e, l), target)
        if l0_is_bound and l is not None:
            l_next = scaling(l)[2]
            j_next = _finish_terms(l_next - pad, xp.full_like(l_next, u), target)
        else:                                            # the plain step's model
            e_next = xp.where(e < 1.0, e * e * (3.0 + e) / 4.0, e)
            j_next = _finish_terms(*interval(e_next, None), target)
        return j_now < 5.0 + j_next, j_now

    def full_step(B, C, R2, l, out):
        """The sign step from ``R2 = 2 (I - B^2)`` (a work array, overwritten)
        into ``out``; ``l`` already raised.  Returns ``(B_{k+1}, C_{k+1}, l_{k+1})``."""
        if l is None:                                  # plain Newton–Schulz
            c2, g, l_next = 0.5, 2.0, None
        else:
            c2, g, l_next = scaling(l)
            c2 = _mm(c2)                                 # c2 = a^3/2, g = c1/c2
        P2 = backend.add_to_diagonal(R2, 2.0 * g)        # 2P = 2R + 2g I
        Bn = backend.matmul(B, P2, out=out[0])
        Bn *= 0.5 * c2                                   # B_{k+1} = c2 B P
        E = backend.matmul(B, C, out=work[1])
        M = backend.matmul(E, B, out=work[2])            # B C B
        P2 = backend.add_to_diagonal(P2, -(g + 1.0))     # 2R + (g - 1) I
        M += backend.matmul(P2, C, out=work[1])
        Cn = backend.add(M, mT(M), out=out[1])
        Cn *= 0.5 * c2                                   # C_{k+1} = c2 sym(M)
        return Bn, Cn, l_next

    def finish_members(B, C, e, l, j, new, out):
        """The finish of the members in ``new`` (their ``j`` terms), into
        ``out`` (None: a fresh array); the other members' entries are unused.
        No member in ``new``: ``C`` itself.  That happens where host syncs are
        deferred (:attr:`refimpl.backend.DevicePolicy.deferred_sync`): the
        driver tests "all stopped" every :data:`CHECK_EVERY` steps, so a step
        may run after the last member finished, and gathering no member would
        leave nothing to reduce."""
        if not bool(xp.any(new)):
            return C
        lo, hi = interval(e, l)
        j = xp.where(new, j, xp.zeros_like(j))            # others may be inf (no interval)
        n_terms[...] = xp.where(new, xp.astype(j, n_terms.dtype), n_terms)
        if bool(xp.all(new)):
            return _finish(B, C, lo, hi, j, work, out)
        # only the members that finish here, gathered: with many members
        # finishing at different steps (small n, large batches) a finish over
        # the whole block each time cost more than it saved
        B_new = B[new]
        Z = _finish(B_new, C[new], lo[new], hi[new], j[new], backend.work_arrays(B_new, 3), None)
        out = xp.empty_like(C) if out is None else out
        out[new] = Z
        return out

    def step(state):
        B, C = state[0], state[1]
        l = state[2] if len(state) > 2 else None
        calls[0] += 1
        out = sets[calls[0] % 2]                         # the set of the step before last
        by_bound = finish and l0_is_bound and l is not None
        if by_bound:
            # decided on the tracked interval alone, before B^2 is formed: a
            # member's choice never depends on whether its batch-mates step on
            ready, j = hand_over(None, l)
            new = ready & ~finished[0]                   # finish here (once a member)
            done = finished[0] = finished[0] | new
            bound = 1.0 - (l - pad) ** 2                 # >= ||I - B_k^2||_2, reported
            if bool(xp.all(done)):
                return (B, finish_members(B, C, None, l, j, new, out[1]), l), bound, None, done
        R2 = backend.matmul(B, B, out=work[0])
        R2 *= -2.0
        R2 = backend.add_to_diagonal(R2, 2.0)            # 2 (I - B_k^2)
        e = 0.5 * backend.frobenius(R2)
        l_k = l
        if l is not None:
            l = raised(l, e)
        if not finish:
            Bn, Cn, l_next = full_step(B, C, R2, l, out)
            return (Bn, Cn) + (() if l is None else (l_next,)), e, None
        if by_bound:
            e = xp.where(new, bound, e)
        else:
            ready, j = hand_over(e, l)
            new = ready & ~finished[0]
            done = finished[0] = finished[0] | new
        tail = () if l is None else (l,)
        if bool(xp.all(done)):                           # the rest all finish here
            return (B, finish_members(B, C, e, l, j, new, out[1])) + tail, e, None, done
        Bn, Cn, l_next = full_step(B, C, R2, l, out)
        if bool(xp.any(new)):                            # some finish, the others step
            # work is free again; the finish goes to a fresh array
            Z = finish_members(B, C, None if by_bound else e, l_k if by_bound else l, j, new,
                               xp.empty_like(Cn))
            Cn = xp.where(_mm(new), Z, Cn)
        return (Bn, Cn) + (() if l is None else (l_next,)), e, None, done

    state = (B0, C0) if l0 is None else (B0, C0, l0)
    frozen = (False, True, False)[: len(state)]
    state, n_iter, err, conv, _ = _newton_schulz(state, step, iters=iters, tol=tol,
                                                 max_iter=max_iter, frozen=frozen)
    return 0.5 * state[1], n_iter, err, conv, n_terms


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
        :func:`_lyapunov_sign_block`; ``n_iter`` counts it as a step),
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
    return _fro(R) / (2.0 * _fro(B) * _fro(X) + _fro(C))


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
    xp = backend.namespace(B=B, C=C)
    _check_square(B, "B")
    backend.check_array(C, "C", min_ndim=2)
    if tuple(C.shape[-2:]) != tuple(B.shape[-2:]):
        raise ValueError(f"argument 'C' has shape {tuple(C.shape)} but 'B' is "
                         f"{B.shape[-1]}x{B.shape[-1]}")
    if backend.dtype_name(B.dtype) != backend.dtype_name(C.dtype):
        raise TypeError(f"arguments 'B' ({backend.dtype_name(B.dtype)}) and 'C' "
                        f"({backend.dtype_name(C.dtype)}) must have the same dtype")
    try:
        B_b, C_b = xp.broadcast_arrays(B, C)
    except ValueError:
        raise ValueError(f"batch shapes of 'B' {tuple(B.shape[:-2])} and 'C' "
                         f"{tuple(C.shape[:-2])} do not broadcast") from None
    if method == "sign":
        iters, tol, max_iter = _iteration_options(iters, tol, max_iter, _eps(B))
        sigma = _fro(B_b)
        if not bool(xp.all(sigma > 0)):
            raise ValueError("argument 'B' has a zero member: B X + X B^T = C is singular")
        B0, C0 = B_b / _mm(sigma), C_b / _mm(sigma)
        with warnings.catch_warnings():
            # A diverging member overflows (it is redone below, or reported).
            warnings.simplefilter("ignore", RuntimeWarning)
            X, n_iter, err, conv = _lyapunov_sign_core(B0, C0, iters=iters, tol=tol,
                                                       max_iter=max_iter)
        if iters is None and not bool(xp.all(conv)):
            # Newton-Schulz converges only for spectra near the real axis; the
            # scaled Newton iteration solves the members it left unconverged.
            Xn, n_n, err_n, conv_n = _lyapunov_newton_sign(B0, C0, tol=tol, max_iter=max_iter)
            redo = ~conv
            X = xp.where(redo[..., None, None], Xn, X)
            n_iter = xp.where(redo, n_n, n_iter)
            err = xp.where(redo, err_n, err)
            conv = xp.where(redo, conv_n, conv)
        residual = _lyapunov_residual(B_b, C_b, X)
        # A converged sign iteration with a large residual means B was not
        # positive stable (the iteration found the sign of another matrix).
        conv = conv & (residual <= math.sqrt(_eps(B)))
        _warn_unconverged("lyapunov(method='sign')", conv, xp.maximum(err, residual), tol)
    elif method == "eig":
        Bs, norm = _symmetric_part(B_b, "B", sym_tol)
        lam, U = xp.linalg.eigh(Bs)
        pair = lam[..., :, None] + lam[..., None, :]
        small = xp.min(xp.abs(pair), axis=(-2, -1)) <= 10.0 * B.shape[-1] * _eps(B) * norm
        if bool(xp.any(small)):
            raise ValueError("argument 'B' has eigenvalues b_i + b_j = 0 to working "
                             "precision: B X + X B^T = C is singular")
        X = _symmetric_eig_solve(U, lam, C_b, lambda a, b: 1.0 / (a + b))
        residual = _lyapunov_residual(B_b, C_b, X)
        bshape = tuple(B_b.shape[:-2])
        dev = backend.device(B)
        n_iter = xp.zeros(bshape, dtype=xp.int64, device=dev)
        err = xp.zeros(bshape, dtype=B.dtype, device=dev)
        conv = xp.ones(bshape, dtype=xp.bool, device=dev)
    else:
        raise ValueError(f"argument 'method' must be 'sign' or 'eig', got {method!r}")
    return LyapunovResult(X=X, B=B, C=C, method=method, residual=residual,
                          n_iter=n_iter, error=err, converged=conv)


# --------------------------------------------------------------------------
# Forward: sqrtm and inv_sqrtm
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Rational:
    """Residuals of ``out = c^gamma sym(D(W)^{-1} N(W))``, ``W = a I + b A/c``
    (``(a, b) = (1, -1)``: W = Z, the paper's basis; ``(0, 1)``: W = X = A/c).
    MTP has D = I."""

    b: float              # coefficient of A/c in W (the I coefficient drops out of dW)
    num: tuple            # float coefficients of N
    den: tuple            # float coefficients of D ((1.0,) for MTP)
    gamma: float          # +1/2 (sqrtm) or -1/2 (inv_sqrtm)
    powers: tuple         # W^0 = I, W^1, ..., W^d
    D: Any                # D(Z) (None for MTP)
    R: Any                # D^{-1} N
    x_max: Any = None     # per member, an upper bound of l_max / c (see _forward_rational)


@dataclass(frozen=True)
class _NewtonSchulz:
    """Residuals of the coupled NS iteration: final Y_T, Z_T and the steps taken."""

    Y: Any
    Z: Any
    history: tuple        # (incoming (Y_k, Z_k), M_k, active mask) per step


@dataclass(frozen=True)
class _Eig:
    """Eigendecomposition A = U diag(l) U^T (l clamped at 0) and s = sqrt(l)."""

    l: Any
    U: Any
    s: Any


@dataclass(frozen=True)
class SqrtmResult:
    """Result of :func:`sqrtm`.

    Attributes
    ----------
    S : the square root (..., n, n), symmetric.
    A : the symmetric part of the input (the matrix actually used).
    method : "mpa" | "mtp" | "ns" | "eig"; ``order`` its [m/m], degree K or
        None; ``options`` the iteration settings (ns).
    normalization : "frobenius" (mpa, mtp), "trace" (ns) or "none" (eig);
        ``scale`` the per-member constant ``c`` used (``||A||_F``, ``tr A`` or 1).
    residual : per member ``||S S - A||_F / ||A||_F``.
    n_iter, error, converged : per member; ns: steps taken and
        ``||I - Z_k Y_k||_F`` at the start of the last one; direct methods:
        0, None and True.
    state : residuals for the backward (private).
    """

    S: Any
    A: Any
    method: str
    order: int | None
    normalization: str
    scale: Any
    residual: Any
    n_iter: Any
    error: Any
    converged: Any
    options: dict = field(default_factory=dict)
    state: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class InvSqrtmResult:
    """Result of :func:`inv_sqrtm`: as :class:`SqrtmResult` with ``S_inv``
    (the inverse root) in place of ``S`` and ``residual = ||S_inv A S_inv -
    I||_F / sqrt(n)``."""

    S_inv: Any
    A: Any
    method: str
    order: int | None
    normalization: str
    scale: Any
    residual: Any
    n_iter: Any
    error: Any
    converged: Any
    options: dict = field(default_factory=dict)
    state: Any = field(default=None, repr=False)


def _poly(coeffs, pows):
    """sum_k coeffs[k] Z^k from precomputed powers."""
    out = coeffs[0] * pows[0]
    for a, P in zip(coeffs[1:], pows[1:]):
        out = out + a * P
    return out


def _combine(coef, block):
    """``out[r] = sum_k coef[r, k] block[k]`` for ``block`` (d, ..., n, n):
    ``tensordot(coef, block, axes=1)``, computed member by member.

    One (r x d) @ (d x n^2) product per member (on NumPy written straight
    into the (r, ..., n, n) result).  A single ``tensordot`` is one large
    product, which OpenBLAS runs on several threads; its idle threads then
    spin for a while and, on a 2-core machine, slowed the forward's next
    LAPACK calls about 2x (measured: the Cholesky solve 9 ms instead of 4.6).  Per member the products are small
    enough to stay on one thread, and faster besides (0.4 ms against 1.0 ms
    at batch 64, n = 64).
    """
    xp = array_api_compat.array_namespace(coef, block)
    d, shape = block.shape[0], tuple(block.shape[1:])
    count, nn = math.prod(shape[:-2]), shape[-2] * shape[-1]
    per_member = xp.permute_dims(xp.reshape(block, (d, count, nn)), (1, 0, 2))
    out = None
    if backend.policy_of(block).host_numpy:            # a view of a (r, count, nn) block
        out = xp.permute_dims(xp.empty((coef.shape[0], count, nn), dtype=block.dtype), (1, 0, 2))
    got = backend.matmul(coef, per_member, out=out)    # (count, r, nn)
    return xp.reshape(xp.permute_dims(got, (1, 0, 2)), (coef.shape[0],) + shape)


def _forward_rational(As, c, num, den, gamma, basis):
    """``out = c^gamma sym(D(W)^{-1} N(W))`` with ``W = Z = I - A/c`` (basis "z")
    or ``W = X = A/c`` (basis "x"); MTP has D = I.

    The powers ``W^1..W^d`` are written into one block (d, ..., n, n), and
    ``N``, ``D`` and ``(A/c)^p`` (``p = min(d, 5)``) are one contraction of it
    with their coefficients (:func:`_combine`, one pass over the powers).  The last gives
    ``x_max = ||(A/c)^p||_F^{1/p} >= l_max / c`` (``(sum_i x_i^{2p})^{1/(2p)}
    >= max_i x_i``, within ``n^{1/(2p)}`` of it), plus a rounding margin,
    capped at 1: the backward's bound on the spectrum of the root.

    ``D`` is symmetric positive definite: on ``[0, 1]``, which holds the
    spectrum of ``W`` in either basis, every Padé denominator (and numerator,
    the inverse root's denominator) is positive — its real zeros lie outside,
    down to ``q_m(1) = 0.011``, ``p_m(1) = 0.00098`` at ``m = 5`` (tested for
    m <= 12) — so ``D R = N`` is solved by Cholesky, as ``R = N D^{-1}``
    (:func:`refimpl.backend.solve_spd_right`)."""
    xp = array_api_compat.array_namespace(As)
    a, b = (1.0, -1.0) if basis == "z" else (0.0, 1.0)
    d = max(len(num), len(den)) - 1
    block = xp.empty((d,) + tuple(As.shape), dtype=As.dtype, device=backend.device(As))
    W = backend.add_to_diagonal(backend.multiply(As, _mm(b / c), out=block[0, ...]), a)
    pows = [eye_like(As), W]
    for k in range(1, d):
        pows.append(backend.matmul(pows[-1], W, out=block[k, ...]))      # W^{k+1}
    if not backend.writes_in_place(As):                # the products are fresh arrays
        block = xp.stack(pows[1:])
    rows = [r + (0.0,) * (d + 1 - len(r)) for r in ((num, den) if len(den) > 1 else (num,))]
    # (A/c)^p = ((W - a I) / b)^p = b^{-p} sum_k binom(p, k) (-a)^{p-k} W^k
    p = min(d, 5)
    rows.append(tuple(math.comb(p, k) * (-a) ** (p - k) / b ** p for k in range(p + 1))
                + (0.0,) * (d - p))
    coef = xp.asarray([r[1:] for r in rows], dtype=As.dtype, device=backend.device(As))
    ND = _combine(coef, block)                         # N, (D,) (A/c)^p, less their I terms
    N = backend.add_to_diagonal(ND[0, ...], rows[0][0])
    Ap = backend.add_to_diagonal(ND[-1, ...], rows[-1][0])
    n = As.shape[-1]
    margin = 2.0 ** p * p * n ** 1.5 * _eps(As)        # rounding of the combination
    x_max = xp.asarray(xp.minimum((_fro(Ap) + margin) ** (1.0 / p), xp.ones_like(c)))
    if len(den) > 1:
        D = backend.add_to_diagonal(ND[1, ...], rows[1][0])
        # D R = N, i.e. R = N D^{-1} (polynomials in W commute), D SPD (above);
        # N is this call's temporary: R is written over it
        R = backend.solve_spd_right(N, D, overwrite=True)
    else:
        D, R = None, N
    out = backend.add(R, mT(R), out=xp.empty_like(R))
    out *= _mm(0.5 * c ** gamma)                       # c^gamma sym(R)
    return out, _Rational(b=b, num=num, den=den, gamma=gamma, powers=tuple(pows), D=D, R=R,
                          x_max=x_max)


def _forward_ns(As, c, *, iters, tol, max_iter):
    """Coupled Newton–Schulz on Y_0 = A / c, Z_0 = I (c = tr A)."""
    eye = eye_like(As)

    def step(state):
        Y, Z = state
        W = Z @ Y                                      # Z_k Y_k -> I
        e = _fro(eye - W)
        M = 3.0 * eye - W
        return (0.5 * (Y @ M), 0.5 * (M @ Z)), e, M

    (Y, Z), n_iter, err, conv, hist = _newton_schulz(
        (As / _mm(c), eye + 0.0 * As), step, iters=iters, tol=tol, max_iter=max_iter,
        record=True)
    return Y, Z, n_iter, err, conv, _NewtonSchulz(Y=Y, Z=Z, history=tuple(hist))


def _method_options(method, order, degree, iters, tol, max_iter, basis):
    """The validated order (mpa) or degree (mtp) of a method; None otherwise."""
    backend.check_choice(method, "method", SQRT_METHODS)
    backend.check_choice(basis, "basis", ("z", "x"))
    if basis != "z" and method != "mpa":
        raise ValueError(f"argument 'basis' applies to method 'mpa' only (method={method!r})")
    if order is not None and method != "mpa":
        raise ValueError(f"argument 'order' applies to method 'mpa' only (method={method!r})")
    if degree is not None and method != "mtp":
        raise ValueError(f"argument 'degree' applies to method 'mtp' only (method={method!r})")
    if method != "ns" and (iters is not None or tol is not None):
        raise ValueError(f"arguments 'iters'/'tol' apply to method 'ns' only (method={method!r})")
    if method == "mpa":
        return _check_int(DEFAULT_MPA_ORDER if order is None else order, "order", minimum=1)
    if method == "mtp":
        return _check_int(DEFAULT_MTP_DEGREE if degree is None else degree, "degree", minimum=1)
    return None


def _root(A, *, inverse, method, order, degree, basis, iters, tol, max_iter, sym_tol, psd_tol):
    """Shared forward of sqrtm / inv_sqrtm."""
    xp = backend.namespace(A=A)
    _check_square(A, "A")
    k = _method_options(method, order, degree, iters, tol, max_iter, basis)
    As, norm = _symmetric_part(A, "A", sym_tol)
    bshape = tuple(A.shape[:-2])
    dev = backend.device(A)
    n = A.shape[-1]
    gamma = -0.5 if inverse else 0.5
    n_iter = xp.zeros(bshape, dtype=xp.int64, device=dev)
    err = None
    conv = xp.ones(bshape, dtype=xp.bool, device=dev)
    options: dict = {}

    if method == "eig":
        lam, U = xp.linalg.eigh(As)
        if inverse:   # definite: l_min > 0
            bad = lam[..., 0] <= 0.0
        else:         # semidefinite: l_min >= -psd_tol ||A||_F
            bad = lam[..., 0] < -_psd_tol(A, psd_tol) * norm
        if bool(xp.any(bad)):
            _raise_not_psd(As, norm, "A", definite=inverse, eigenvalues=lam)
        lam = xp.maximum(lam, xp.zeros_like(lam))
        s = xp.sqrt(lam)
        f = 1.0 / s if inverse else s
        out = _sym((U * f[..., None, :]) @ mT(U))
        state = _Eig(l=lam, U=U, s=s)
        c, normalization = xp.ones(bshape, dtype=A.dtype, device=dev), "none"
    else:
        _check_psd(As, norm, "A", definite=inverse, psd_tol=psd_tol)
        if method in ("mpa", "mtp"):
            if method == "mpa":
                p, q = pade_coefficients(k, basis)
                num, den = (q, p) if inverse else (p, q)
                options = {"basis": basis}
            else:
                num, den = taylor_coefficients(k, inverse=inverse), (Fraction(1),)
            c, normalization = norm, "frobenius"
            out, state = _forward_rational(As, c, tuple(float(v) for v in num),
                                           tuple(float(v) for v in den), gamma, basis)
        else:  # ns
            iters, tol, max_iter = _iteration_options(iters, tol, max_iter, _eps(A))
            options = {"iters": iters, "tol": tol, "max_iter": max_iter}
            c, normalization = xp.linalg.trace(As), "trace"
            Y, Z, n_iter, err, conv, state = _forward_ns(As, c, iters=iters, tol=tol,
                                                         max_iter=max_iter)
            out = _mm(c ** gamma) * _sym(Z if inverse else Y)
            _warn_unconverged(f"{'inv_sqrtm' if inverse else 'sqrtm'}(method='ns')",
                              conv, err, tol, stacklevel=4)

    if inverse:
        residual = _fro(out @ As @ out - eye_like(As)) / math.sqrt(n)
    else:
        SS = out @ out
        SS -= As
        residual = _fro(SS) / norm
    common = dict(A=As, method=method, order=k, normalization=normalization, scale=c,
                  residual=residual, n_iter=n_iter, error=err, converged=conv,
                  options=options, state=state)
    return InvSqrtmResult(S_inv=out, **common) if inverse else SqrtmResult(S=out, **common)


def sqrtm(A, *, method: str = "mpa", order: int | None = None, degree: int | None = None,
          basis: str = "z", iters: int | None = None, tol: float | None = None,
          max_iter: int = DEFAULT_MAX_ITER, sym_tol: float | None = None,
          psd_tol: float | None = None) -> SqrtmResult:
    """Square root ``S = A^{1/2}`` of symmetric positive semidefinite matrices.

    Parameters
    ----------
    A : (..., n, n) float32/float64, symmetric PSD (see the module docstring).
    method : "mpa" (Padé [order/order], default order 5), "mtp" (Taylor,
        default degree 10), "ns" (coupled Newton–Schulz) or "eig".
    order, degree : the MPA order m / the MTP degree K.
    basis : MPA only.  "z" (default, the paper's): P, Q in ``Z = I - A/c``,
        whose alternating coefficients cancel near z = 1: ``sum_k |p_k| /
        |P(1)| = ((1 + sqrt 2)^N + (1 - sqrt 2)^N) / 2`` with ``N = 2m + 1``
        (8119 at m = 5, 1.6e6 at m = 8), so the loss grows like ``(1 +
        sqrt 2)^{2m} = 5.8^m``.  Measured relative error against the scalar
        map (spectral norm, 6x6, cond 1e2..1e8): float64 4e-14 at m = 5, 4e-12
        at m = 8, 3e-9 at m = 12; float32 3e-5 at m = 5, 2e-3 at m = 8; the
        inverse root ~10x more.  "x": the same rational function as
        ``E(X)/O(X)`` in ``X = A/c`` with positive binomial coefficients,
        10-100x less round-off (float64 4e-13 at m = 8, 5e-11 at m = 12;
        float32 3e-6 at m = 5; inverse ~10x more); the remaining loss comes
        from solving with ``O(X)``, whose condition number grows like 4^m.
        Same cost and same derivative.
    iters, tol, max_iter : NS only — fixed step count (the paper's T), or the
        per-member tolerance on ``||I - Z_k Y_k||_F`` (default sqrt(eps)) and
        step limit.
    sym_tol : accepted relative asymmetry (default sqrt(eps)).
    psd_tol : accepted negative eigenvalues, relative to ||A||_F (default
        10 n eps; the Cholesky test uses at least n eps, its own rounding
        level, below which it could not tell the sign).

    Returns
    -------
    SqrtmResult
        ``S`` plus diagnostics (normalisation, residual ``||SS - A||/||A||``,
        iteration counts) and the residuals the VJPs need.

    Raises
    ------
    TypeError : not a float32/float64 array.
    ValueError : non-square, NaN/Inf, non-symmetric, not PSD, zero matrix,
        or a bad option.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.array([[2.0, -1.0], [-1.0, 2.0]])
    >>> S = sqrtm(A, method="mpa", order=8).S
    >>> bool(np.allclose(S @ S, A))
    True
    """
    return _root(A, inverse=False, method=method, order=order, degree=degree, basis=basis,
                 iters=iters,
                 tol=tol, max_iter=max_iter, sym_tol=sym_tol, psd_tol=psd_tol)


def inv_sqrtm(A, *, method: str = "mpa", order: int | None = None, degree: int | None = None,
              basis: str = "z", iters: int | None = None, tol: float | None = None,
              max_iter: int = DEFAULT_MAX_ITER, sym_tol: float | None = None,
              psd_tol: float | None = None) -> InvSqrtmResult:
    """Inverse square root ``S_inv = A^{-1/2}`` of symmetric positive definite matrices.

    Same parameters as :func:`sqrtm` (``psd_tol`` is ignored: ``A`` must be
    definite, i.e. have a Cholesky factor).  MPA computes ``c^{-1/2}
    P(Z)^{-1} Q(Z)``, MTP the Taylor series of ``(1 - z)^{-1/2}``, NS returns
    ``Z_T / sqrt(tr A)``.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.array([[2.0, -1.0], [-1.0, 2.0]])
    >>> T = inv_sqrtm(A, method="eig").S_inv
    >>> bool(np.allclose(T @ A @ T, np.eye(2)))
    True
    """
    return _root(A, inverse=True, method=method, order=order, degree=degree, basis=basis,
                 iters=iters,
                 tol=tol, max_iter=max_iter, sym_tol=sym_tol, psd_tol=psd_tol)


# --------------------------------------------------------------------------
# Derivatives, method "exact": the Loewner matrix in the eigenbasis
# --------------------------------------------------------------------------

def _eig_of(res):
    """The eigendecomposition of res.A: stored by method "eig", else computed."""
    if isinstance(res.state, _Eig):
        return res.state
    xp = array_api_compat.array_namespace(res.A)
    lam, U = xp.linalg.eigh(res.A)
    lam = xp.maximum(lam, xp.zeros_like(lam))
    return _Eig(l=lam, U=U, s=xp.sqrt(lam))


def _exact(res, E, inverse: bool, *, via_approximant: bool = False):
    """``U [(U^T sym(E) U) o K] U^T`` with K the divided differences of sqrt
    (``1/(s_i + s_j)``) or of 1/sqrt (``-1/(s_i s_j (s_i + s_j))``).

    The same self-adjoint map is the JVP (E = dA) and the VJP (E = G).
    """
    xp = array_api_compat.array_namespace(res.A)
    eig = _eig_of(res)
    s = eig.s
    s_min, s_max = s[..., 0], s[..., -1]
    if not bool(xp.all(s_min > 0)):
        hint = ("the 'eig' forward computes the true root, so its 'approximant' derivative is "
                "this one; compute the forward with method='mpa', 'mtp' or 'ns' to get the "
                "derivative of an approximant, defined there" if via_approximant else
                "use method='approximant' with an MPA/MTP/NS forward for the derivative of "
                "the approximant, defined there")
        raise ValueError("the matrix square root is not differentiable at a singular A "
                         f"(a zero eigenvalue); {hint}")
    if not bool(xp.all(s_min >= math.sqrt(_eps(res.A)) * s_max)):
        warnings.warn("A is ill-conditioned: the Lyapunov operator S X + X S has condition "
                      f"number {float(xp.max(s_max / s_min)):.1e}; the gradient is large "
                      "and sensitive", ConditioningWarning, stacklevel=4)
    if inverse:
        def K(a, b):
            return -1.0 / (a * b * (a + b))
    else:
        def K(a, b):
            return 1.0 / (a + b)
    return _symmetric_eig_solve(eig.U, s, _sym(E), K)


# --------------------------------------------------------------------------
# Derivatives, method "lyapunov_sign": (1)/(2) solved through identity (3)
# --------------------------------------------------------------------------

def _lyapunov_operand(res, E, inverse: bool):
    """(B, C) such that the derivative is the solution of B X + X B = C."""
    if inverse:
        T = res.S_inv
        T2 = T @ T
        return T, -_sym(T2 @ E @ T2)                    # L_T(X) = -T^2 E T^2
    return res.S, E                                     # L_S(X) = E


def _sign_interval(res, inverse: bool):
    """Per member ``(lo, hi)`` with the spectrum of ``B`` (``res.S`` or
    ``res.S_inv``) in ``[lo, hi]``: ``hi`` a bound, ``lo`` a bound or an estimate.

    * eig: the stored eigenvalues, ``[s_1, s_n]`` (inverse ``[1/s_n, 1/s_1]``).
    * mpa, mtp: the scalar map ``phi`` is monotone on ``[0, 1]``, so the
      spectrum lies between ``c^g phi(0)`` and ``c^g phi(x_max)`` (``g =
      +-1/2``, ``c = ||A||_F``, ``x_max <= 1`` the forward's bound on
      ``l_max / c``), whatever ``A``'s conditioning: ``phi(0) = r_m(0) =
      1/(2m+1)`` for mpa (``2m+1`` for its inverse), ``sum_k t_k`` (``sum_k
      u_k``) for mtp.
    * ns: ``hi = sqrt(||A||_F)`` (``S``'s eigenvalues are ``sqrt(l w_T) <=
      sqrt(l)``) or ``||S_inv||_F``; ``lo = 1 / ||B^{-1}||_F`` with ``B^{-1}``
      taken from the coupled iterate (``Z_T / sqrt(c)`` or ``sqrt(c) Y_T``) —
      an estimate, exact only when the iteration has converged.
    """
    xp = array_api_compat.array_namespace(res.A)
    c = res.scale
    if res.method == "eig":
        s = res.state.s
        return (1.0 / s[..., -1], 1.0 / s[..., 0]) if inverse else (s[..., 0], s[..., -1])
    if res.method in ("mpa", "mtp"):
        if res.method == "mpa":
            phi0 = float(2 * res.order + 1) ** (1.0 if inverse else -1.0)
        else:
            phi0 = float(sum(taylor_coefficients(res.order, inverse=inverse)))
        cg = c ** (-0.5 if inverse else 0.5)
        x_max = res.state.x_max
        phi_top = scalar_map(x_max, method=res.method, inverse=inverse,
                             **({"order": res.order} if res.method == "mpa" else
                                {"degree": res.order}))
        return cg * xp.minimum(phi_top, phi0), cg * xp.maximum(phi_top, phi0)
    st: _NewtonSchulz = res.state
    if inverse:
        return 1.0 / (xp.sqrt(c) * _fro(st.Y)), _fro(res.S_inv)
    return xp.sqrt(c) / _fro(st.Z), xp.sqrt(_fro(res.A))


def _lyap_sign(res, E, inverse: bool, iters, tol, max_iter, full_output):
    """Solve (1)/(2) by the sign iteration: with ``iters`` the paper's ``iters``
    plain steps from ``B_0 = B / sigma`` (``sigma = sqrt(||A||_F)``, inverse
    ``||S_inv||_F``); otherwise the scaled iteration from ``B_0 = B / hi`` and
    ``l0 = lo / hi`` (:func:`_sign_interval`) to ``tol``."""
    xp = array_api_compat.array_namespace(res.A)
    B, C = _lyapunov_operand(res, _sym(E), inverse)
    iters, tol, max_iter = _iteration_options(iters, tol, max_iter, _eps(res.A))
    bound = False
    if iters is not None:
        sigma, l0 = (_fro(B) if inverse else xp.sqrt(_fro(res.A))), None
    else:
        lo, sigma = _sign_interval(res, inverse)
        # eps <= l0 <= 1 (a zero eigenvalue makes the operator singular: the
        # iteration then runs to max_iter and warns; an estimate may exceed hi)
        l0 = lo / sigma
        # a bound (not the ns forward's estimate) unless the clip below raises it
        bound = res.method != "ns" and bool(xp.all(l0 >= _eps(res.A)))
        l0 = xp.clip(xp.where(l0 > 0.0, l0, xp.zeros_like(l0)), min=_eps(res.A), max=1.0)
    # X is exactly symmetric: C_0 is, and so is every update (sym(M), the finish)
    X, n_iter, err, conv, n_terms = _lyapunov_sign_symmetric(
        B, C, scale=sigma, iters=iters, tol=tol, max_iter=max_iter, l0=l0, l0_is_bound=bound)
    _warn_unconverged("the Lyapunov sign iteration", conv, err, tol, stacklevel=5)
    if not full_output:
        return X, None
    info = LyapunovResult(X=X, B=B, C=C, method="sign", residual=_lyapunov_residual(B, C, X),
                          n_iter=n_iter, error=err, converged=conv, n_terms=n_terms)
    return X, info


# --------------------------------------------------------------------------
# Derivatives, method "approximant": the chain rule through the forward
# --------------------------------------------------------------------------

def _rational_jvp(res, dA):
    """Forward mode through ``out = c^g sym(D^{-1} N)``, ``W = a I + b A/c``, ``c = ||A||_F``:

    dc = <A, dA>/c,  dW = b (dA/c - A dc/c^2),  d(W^k) = d(W^{k-1}) W + W^{k-1} dW,
    dR = D^{-1} (dN - dD R),  d out = g c^{g-1} dc sym(R) + c^g sym(dR).
    """
    xp = array_api_compat.array_namespace(res.A)
    st: _Rational = res.state
    As, c, g = res.A, res.scale, st.gamma
    dAs = _sym(dA)
    dc = _dot(As, dAs) / c
    Z = st.powers[1]
    dZ = st.b * (dAs / _mm(c) - As * _mm(dc / c ** 2))
    dpows = [None, dZ]
    for k in range(2, len(st.powers)):
        dpows.append(dpows[k - 1] @ Z + st.powers[k - 1] @ dZ)
    dN = _poly((0.0,) + st.num[1:], [xp.zeros_like(Z)] + dpows[1:])
    if st.D is not None:
        dD = _poly((0.0,) + st.den[1:], [xp.zeros_like(Z)] + dpows[1:])
        dR = xp.linalg.solve(st.D, dN - dD @ st.R)
    else:
        dR = dN
    return _mm(g * c ** (g - 1.0) * dc) * _sym(st.R) + _mm(c ** g) * _sym(dR)


def _rational_vjp(res, G):
    """Reverse mode of :func:`_rational_jvp`:

    Gs = sym(G); R_bar = c^g Gs; c_bar = g c^{g-1} <Gs, R>;
    Y = D^{-T} R_bar;  (W^k)_bar = n_k Y - d_k Y R^T;
    reverse W^k = W^{k-1} W:  (W^{k-1})_bar += (W^k)_bar W^T,  W_bar += (W^{k-1})^T (W^k)_bar;
    A_bar = b W_bar / c + (c_bar - b <W_bar, A>/c^2) A / c, then sym.
    """
    xp = array_api_compat.array_namespace(res.A)
    st: _Rational = res.state
    As, c, g = res.A, res.scale, st.gamma
    Gs = _sym(G)
    R_bar = _mm(c ** g) * Gs
    c_bar = g * c ** (g - 1.0) * _dot(Gs, st.R)
    if st.D is not None:
        Y = xp.linalg.solve(mT(st.D), R_bar)          # D^T Y = R_bar
        W = Y @ mT(st.R)
    else:
        Y, W = R_bar, None
    d = len(st.powers) - 1

    def power_bar(k):
        out = st.num[k] * Y if k < len(st.num) else xp.zeros_like(Y)
        if W is not None and k < len(st.den):
            out = out - st.den[k] * W
        return out

    acc = power_bar(d)                                  # (Z^d)_bar
    Z_bar = xp.zeros_like(Y)
    Zt = mT(st.powers[1])
    for k in range(d, 1, -1):
        Z_bar = Z_bar + mT(st.powers[k - 1]) @ acc
        acc = power_bar(k - 1) + acc @ Zt
    Z_bar = Z_bar + acc                                 # Z^1 = Z
    c_bar = c_bar - st.b * _dot(Z_bar, As) / c ** 2
    A_bar = st.b * Z_bar / _mm(c) + As * _mm(c_bar / c)
    return _sym(A_bar)


def _ns_out_scale(res, inverse):
    """out = c^g sym(F), F = Z_T (inverse) or Y_T, c = tr A, g = -+1/2."""
    st: _NewtonSchulz = res.state
    return (st.Z if inverse else st.Y), (-0.5 if inverse else 0.5)


def _ns_jvp(res, dA, inverse: bool):
    """Forward mode through the NS steps actually taken (frozen members skip):

    dY_0 = dA/c - A dc/c^2 (dc = tr dA), dZ_0 = 0;  dW = dZ Y + Z dY, dM = -dW,
    dY' = (dY M + Y dM)/2,  dZ' = (dM Z + M dZ)/2;  d out = g c^{g-1} dc sym(F) + c^g sym(dF).
    """
    xp = array_api_compat.array_namespace(res.A)
    st: _NewtonSchulz = res.state
    As, c = res.A, res.scale
    dAs = _sym(dA)
    dc = xp.linalg.trace(dAs)
    dY = dAs / _mm(c) - As * _mm(dc / c ** 2)
    dZ = xp.zeros_like(dY)
    for (Y, Z), M, active in st.history:
        dM = -(dZ @ Y + Z @ dY)
        dY_new = 0.5 * (dY @ M + Y @ dM)
        dZ_new = 0.5 * (dM @ Z + M @ dZ)
        dY = xp.where(_mm(active), dY_new, dY)
        dZ = xp.where(_mm(active), dZ_new, dZ)
    F, g = _ns_out_scale(res, inverse)
    dF = dZ if inverse else dY
    return _mm(g * c ** (g - 1.0) * dc) * _sym(F) + _mm(c ** g) * _sym(dF)


def _ns_vjp(res, G, inverse: bool):
    """Reverse mode of :func:`_ns_jvp` through the recorded steps:

    Y_bar = Y'_bar M^T / 2 + Z^T W_bar,  Z_bar = M^T Z'_bar / 2 + W_bar Y^T,
    W_bar = -M_bar = -(Y^T Y'_bar + Z'_bar Z^T) / 2;
    A_bar = Y_0_bar / c + (c_bar - <Y_0_bar, A>/c^2) I, then sym.
    """
    xp = array_api_compat.array_namespace(res.A)
    st: _NewtonSchulz = res.state
    As, c = res.A, res.scale
    F, g = _ns_out_scale(res, inverse)
    Gs = _sym(G)
    F_bar = _mm(c ** g) * Gs
    c_bar = g * c ** (g - 1.0) * _dot(Gs, F)
    zero = xp.zeros_like(Gs)
    Y_bar, Z_bar = (zero, F_bar) if inverse else (F_bar, zero)
    for (Y, Z), M, active in reversed(st.history):
        W_bar = -0.5 * (mT(Y) @ Y_bar + Z_bar @ mT(Z))
        Y_prev = 0.5 * (Y_bar @ mT(M)) + mT(Z) @ W_bar
        Z_prev = 0.5 * (mT(M) @ Z_bar) + W_bar @ mT(Y)
        Y_bar = xp.where(_mm(active), Y_prev, Y_bar)
        Z_bar = xp.where(_mm(active), Z_prev, Z_bar)
    c_bar = c_bar - _dot(Y_bar, As) / c ** 2
    A_bar = Y_bar / _mm(c) + _mm(c_bar) * eye_like(As)
    return _sym(A_bar)


def _approximant(res, E, inverse: bool, mode: str):
    if res.method == "eig":
        return _exact(res, E, inverse, via_approximant=True)   # the eig forward is exact
    if res.method == "ns":
        return _ns_jvp(res, E, inverse) if mode == "jvp" else _ns_vjp(res, E, inverse)
    return _rational_jvp(res, E) if mode == "jvp" else _rational_vjp(res, E)


# --------------------------------------------------------------------------
# Public JVPs and VJPs
# --------------------------------------------------------------------------

def _check_derivative_args(res, E, inverse: bool, name: str, method: str, fn: str):
    cls = InvSqrtmResult if inverse else SqrtmResult
    backend.check_result(res, "res", cls, producer=f"{'inv_sqrtm' if inverse else 'sqrtm'}(), "
                                                   f"as {fn} needs")
    out = res.S_inv if isinstance(res, InvSqrtmResult) else res.S
    backend.namespace(**{"res.S_inv" if inverse else "res.S": out, name: E})
    backend.check_array(E, name)
    if tuple(E.shape) != tuple(out.shape):
        raise ValueError(f"argument {name!r} has shape {tuple(E.shape)}, expected "
                         f"{tuple(out.shape)}")
    backend.check_choice(method, "method", VJP_METHODS)
    xp = array_api_compat.array_namespace(E)
    if not bool(xp.all(res.converged)):
        warnings.warn(f"the {res.method!r} forward did not converge; its {method!r} "
                      "derivative is unreliable", ConvergenceWarning, stacklevel=4)


def _derivative(res, E, *, inverse, method, mode, iters, tol, max_iter, full_output):
    full_output = backend.check_flag(full_output, "full_output")
    if method != "lyapunov_sign" and (iters is not None or tol is not None):
        raise ValueError("arguments 'iters'/'tol' apply to method 'lyapunov_sign' only")
    if method == "exact":
        out, info = _exact(res, E, inverse), None
    elif method == "lyapunov_sign":
        out, info = _lyap_sign(res, E, inverse, iters, tol, max_iter, full_output)
    else:
        out, info = _approximant(res, E, inverse, mode), None
    if method != "lyapunov_sign":     # the sign iteration's X is exactly symmetric already
        out = _sym(out)               # symmetric in exact arithmetic; make it exactly so
    return (out, info) if full_output else out


def sqrtm_vjp(res: SqrtmResult, S_bar, *, method: str = "exact", iters: int | None = None,
              tol: float | None = None, max_iter: int = DEFAULT_MAX_ITER,
              full_output: bool = False):
    """Reverse mode of :func:`sqrtm`: ``A_bar`` from ``S_bar``.

    Parameters
    ----------
    res : the forward's result.
    S_bar : cotangent of ``S`` (..., n, n); need not be symmetric.
    method : "exact" — ``U [(U^T sym(G) U) / (s_i + s_j)] U^T`` (the derivative of
        the true root; uses the stored or a fresh ``eigh(A)``); "lyapunov_sign"
        — ``S X + X S = sym(G)`` by the Newton–Schulz sign iteration (the paper's
        backward, using the forward's ``S``); "approximant" — the exact
        derivative of the forward actually computed (MPA/MTP/NS; equals
        "exact" for the eig forward).
    iters, tol, max_iter : lyapunov_sign only (see :func:`lyapunov`).
    full_output : also return the Lyapunov solve's :class:`LyapunovResult`
        (or None for the other methods).

    Returns
    -------
    A_bar : (..., n, n), symmetric: the gradient with respect to (symmetric)
        perturbations of A, i.e. the symmetric part of the Fréchet adjoint
        ``L_S^{-1}(S_bar)`` (see the module docstring).
    """
    _check_derivative_args(res, S_bar, False, "S_bar", method, "sqrtm_vjp")
    return _derivative(res, S_bar, inverse=False, method=method, mode="vjp", iters=iters,
                       tol=tol, max_iter=max_iter, full_output=full_output)


def inv_sqrtm_vjp(res: InvSqrtmResult, S_inv_bar, *, method: str = "exact",
                  iters: int | None = None, tol: float | None = None,
                  max_iter: int = DEFAULT_MAX_ITER, full_output: bool = False):
    """Reverse mode of :func:`inv_sqrtm`: ``A_bar`` from ``S_inv_bar``.

    "exact": ``-U [(U^T G U) / (s_i s_j (s_i + s_j))] U^T``; "lyapunov_sign":
    ``T X + X T = -T^2 G T^2`` with ``T = S_inv`` by the sign iteration;
    "approximant": the derivative of the computed forward.  See
    :func:`sqrtm_vjp`.
    """
    _check_derivative_args(res, S_inv_bar, True, "S_inv_bar", method, "inv_sqrtm_vjp")
    return _derivative(res, S_inv_bar, inverse=True, method=method, mode="vjp", iters=iters,
                       tol=tol, max_iter=max_iter, full_output=full_output)


def sqrtm_jvp(res: SqrtmResult, dA, *, method: str = "exact", iters: int | None = None,
              tol: float | None = None, max_iter: int = DEFAULT_MAX_ITER):
    """Forward mode of :func:`sqrtm`: ``dS`` from ``dA``, for each VJP method
    (the pair passes the adjoint test): "exact" ``U [(U^T dA U)/(s_i + s_j)]
    U^T``, "lyapunov_sign" ``S dS + dS S = dA`` by the sign iteration,
    "approximant" forward mode through the computed forward."""
    _check_derivative_args(res, dA, False, "dA", method, "sqrtm_jvp")
    return _derivative(res, dA, inverse=False, method=method, mode="jvp", iters=iters,
                       tol=tol, max_iter=max_iter, full_output=False)


def inv_sqrtm_jvp(res: InvSqrtmResult, dA, *, method: str = "exact",
                  iters: int | None = None, tol: float | None = None,
                  max_iter: int = DEFAULT_MAX_ITER):
    """Forward mode of :func:`inv_sqrtm`: ``dS_inv`` from ``dA`` (see
    :func:`sqrtm_jvp`; lyapunov_sign solves ``T X + X T = -T^2 dA T^2``)."""
    _check_derivative_args(res, dA, True, "dA", method, "inv_sqrtm_jvp")
    return _derivative(res, dA, inverse=True, method=method, mode="jvp", iters=iters,
                       tol=tol, max_iter=max_iter, full_output=False)


# --------------------------------------------------------------------------
# Scalar maps ("method oracles") and error bounds
# --------------------------------------------------------------------------

def _approx_params(method, order, degree, iters):
    backend.check_choice(method, "method", SQRT_METHODS)
    if method == "mpa":
        return _check_int(DEFAULT_MPA_ORDER if order is None else order, "order", minimum=1)
    if method == "mtp":
        return _check_int(DEFAULT_MTP_DEGREE if degree is None else degree, "degree", minimum=1)
    if method == "ns":
        if iters is None:
            raise ValueError("method 'ns' needs 'iters' (the number of steps taken, "
                             "e.g. res.n_iter)")
        if backend._is_array(iters):
            xp = array_api_compat.array_namespace(iters)
            if not xp.isdtype(iters.dtype, "integral") or bool(xp.any(iters < 0)):
                raise TypeError("argument 'iters' must be a non-negative integer or an integer "
                                f"array, got an array of dtype {backend.dtype_name(iters.dtype)}")
            return iters
        return _check_int(iters, "iters", minimum=0)
    return None


def _check_eigenvalues(x, name: str):
    """A finite float32/float64 array of (normalised) eigenvalues: NaN, Inf or
    complex values are refused (``max|.|`` would ignore a NaN)."""
    xp = backend.namespace(**{name: x})
    backend.check_array(x, name, min_ndim=1 if name == "l" else None)
    return xp


def _horner(coeffs, x):
    out = coeffs[-1] + 0.0 * x
    for a in reversed(coeffs[:-1]):
        out = out * x + a
    return out


def _mpa_even_odd(m: int, x):
    """E(x) = sum_j binom(N, 2j) x^j and O(x) = sum_j binom(N, 2j+1) x^j, N = 2m+1:
    sqrt(x) coth(N artanh sqrt x) = E(x) / O(x) (positive coefficients, stable on [0, 1])."""
    N = 2 * m + 1
    E = _horner([float(math.comb(N, 2 * j)) for j in range(m + 1)], x)
    O = _horner([float(math.comb(N, 2 * j + 1)) for j in range(m + 1)], x)
    return E, O


def _ns_w(x, iters):
    """w_T of the scalar NS recursion w_{k+1} = w_k (3 - w_k)^2 / 4, w_0 = x.
    ``iters`` may be an int or an integer array broadcasting against x."""
    xp = array_api_compat.array_namespace(x)
    if isinstance(iters, int):
        its = xp.full(x.shape, iters, dtype=xp.int64, device=backend.device(x))
    else:
        its = xp.broadcast_to(iters, x.shape)
    w = x
    for k in range(int(xp.max(its)) if its.size else 0):
        w = xp.where(its > k, w * (3.0 - w) ** 2 / 4.0, w)
    return w


def scalar_map(x, *, method: str, order: int | None = None, degree: int | None = None,
               iters=None, inverse: bool = False):
    """The scalar function each method applies to a normalised eigenvalue.

    For ``A = U diag(l) U^T`` and ``x = l / c`` (``c`` the method's
    normalisation), the forward is, in exact arithmetic,
    ``S = sqrt(c) U diag(phi(x)) U^T`` (``S_inv = c^{-1/2} U diag(phi(x)) U^T``):

    * eig: ``sqrt(x)`` (``1/sqrt(x)``);
    * mpa: ``E(x)/O(x) = sqrt(x) coth((2m+1) artanh sqrt x)`` (``O/E``) — the
      binomial closed form, independent of :func:`pade_coefficients`;
    * mtp: ``sum_k t_k (1 - x)^k`` (Taylor coefficients of ``(1 - z)^{±1/2}``);
    * ns: ``sqrt(x w_T)`` (``sqrt(w_T / x)``), ``w_T`` from the scalar recursion
      (``iters`` = the steps taken, e.g. ``res.n_iter[..., None]``).

    This is the "method oracle": the matrix result must agree with it to
    round-off, which separates implementation bugs from approximation error.

    ``x`` must be a finite float32/float64 array (``TypeError`` /
    ``ValueError`` naming it otherwise).
    """
    xp = _check_eigenvalues(x, "x")
    inverse = backend.check_flag(inverse, "inverse")
    k = _approx_params(method, order, degree, iters)
    if method == "eig":
        return 1.0 / xp.sqrt(x) if inverse else xp.sqrt(x)
    if method == "mpa":
        E, O = _mpa_even_odd(k, x)
        return O / E if inverse else E / O
    if method == "mtp":
        t = [float(v) for v in taylor_coefficients(k, inverse=inverse)]
        return _horner(t, 1.0 - x)
    w = _ns_w(x, k)
    return xp.sqrt(w / x) if inverse else xp.sqrt(x * w)


def relative_error(x, *, method: str, order: int | None = None, degree: int | None = None,
                   iters=None, inverse: bool = False):
    """Relative error ``phi(x) / x^{±1/2} - 1`` of a method at normalised eigenvalue(s) x.

    Closed forms, with ``s = sqrt x``, ``rho = (1 - s)/(1 + s)``, ``N = 2m + 1``:

    * mpa: ``2 rho^N / (1 - rho^N)`` (inverse: ``-2 rho^N / (1 + rho^N)``);
    * mtp: ``(sum_{k<=K} t_k z^k - x^{±1/2}) / x^{±1/2}``, ``z = 1 - x``
      (the negated series tail; for sqrtm ``<= 0``... i.e. the polynomial
      overestimates, the tail is ``sum_{k>K} |t_k| z^k``);
    * ns: ``sqrt(w_T) - 1`` (both roots);
    * eig: 0.

    ``x = 0`` gives ``inf`` for mpa/mtp (sqrtm) — a relative error at a zero
    eigenvalue is unbounded — and -1 for ns.
    """
    xp = _check_eigenvalues(x, "x")
    inverse = backend.check_flag(inverse, "inverse")
    k = _approx_params(method, order, degree, iters)
    if method == "eig":
        return xp.zeros_like(x)
    pos = x > 0
    x1 = xp.where(pos, x, xp.ones_like(x))          # keeps x = 0 out of divisions
    s = xp.sqrt(x1)
    if method == "mpa":
        rho_N = ((1.0 - s) / (1.0 + s)) ** (2 * k + 1)
        if inverse:
            return xp.where(pos, -2.0 * rho_N / (1.0 + rho_N), -xp.ones_like(x))
        return xp.where(pos, 2.0 * rho_N / (1.0 - rho_N), xp.full_like(x, math.inf))
    if method == "mtp":
        t = [float(v) for v in taylor_coefficients(k, inverse=inverse)]
        T = _horner(t, 1.0 - x1)
        rel = T * s - 1.0 if inverse else T / s - 1.0
        return xp.where(pos, rel, -xp.ones_like(x) if inverse else xp.full_like(x, math.inf))
    w = _ns_w(x, k)
    return xp.sqrt(w) - 1.0


def error_bound(l, *, method: str, order: int | None = None, degree: int | None = None,
                iters=None, inverse: bool = False):
    """Per-member bound on the relative error of a method, from the spectrum.

    Parameters
    ----------
    l : (..., n) eigenvalues of A (>= 0; clamped at 0).
    method, order, degree, iters, inverse : as in :func:`scalar_map`
        (``iters`` for ns: the steps taken, e.g. ``res.n_iter``).

    Returns
    -------
    (...,) ``beta = max_i |relative_error(l_i / c)|`` with the method's
    normalisation ``c`` (``||A||_F = ||l||_2`` for mpa/mtp, ``tr A`` for ns).
    In exact arithmetic the computed root then satisfies
    ``||S_method - A^{1/2}||_2 <= beta ||A^{1/2}||_2`` (likewise for
    ``A^{-1/2}``), and every eigenvalue is off by at most the factor beta.

    ``l`` must be a finite float32/float64 array of at least one dimension:
    a NaN would otherwise vanish in the max and give a bound of 0.
    """
    xp = _check_eigenvalues(l, "l")
    l = xp.maximum(l, xp.zeros_like(l))
    if method == "ns":
        c = xp.sum(l, axis=-1, keepdims=True)
        if iters is not None and backend._is_array(iters):
            iters = iters[..., None]
    else:
        c = xp.sqrt(xp.sum(l * l, axis=-1, keepdims=True))
    rel = relative_error(l / c, method=method, order=order, degree=degree, iters=iters,
                         inverse=inverse)
    return xp.max(xp.abs(rel), axis=-1)
