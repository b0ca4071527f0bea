"""Derivatives of ``sqrtm`` / ``inv_sqrtm``: the adjoint equations of
:mod:`refimpl.matsqrt`, by three methods.

* ``"exact"``: the Loewner (divided-difference) matrix in the eigenbasis,
  ``A_bar = U [(U^T sym(G) U) o K] U^T``.
* ``"lyapunov_sign"``: ``B X + X B = C`` (equations (1)/(2)) by the symmetric
  sign iteration (3) of :mod:`refimpl.matsqrt.sign`, started from what the
  forward knows about the spectrum of its root (:func:`_sign_interval`).
* ``"approximant"``: the chain rule through the forward actually computed
  (rational evaluation or the recorded Newton–Schulz steps).

The same self-adjoint maps give the JVPs (``E = dA``) and the VJPs (``E = G``).
"""

from __future__ import annotations

import math
import warnings

import array_api_compat

from .. import backend
from ..backend import ConditioningWarning, ConvergenceWarning, eye_like, mT
from . import _kernels
from ._common import (DEFAULT_MAX_ITER, VJP_METHODS, dot, eps, fro, iteration_options, mm, sym,
                      warn_unconverged)
from .coefficients import scalar_map, taylor_coefficients
from .forward import InvSqrtmResult, SqrtmResult, _Eig, _NewtonSchulz, _poly, _Rational
from .sign import LyapunovResult, _lyapunov_residual, _symmetric_eig_solve, lyapunov_sign_symmetric


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
    if not backend.all_true(s_min > 0):
        hint = ("the 'eig' forward computes the true root, so its 'approximant' derivative is "
                "this one; compute the forward with method='mpa', 'mtp' or 'ns' to get the "
                "derivative of an approximant, defined there" if via_approximant else
                "use method='approximant' with an MPA/MTP/NS forward for the derivative of "
                "the approximant, defined there")
        raise ValueError("the matrix square root is not differentiable at a singular A "
                         f"(a zero eigenvalue); {hint}")
    if not backend.all_true(s_min >= math.sqrt(eps(res.A)) * s_max):
        warnings.warn("A is ill-conditioned: the Lyapunov operator S X + X S has condition "
                      f"number {float(xp.max(s_max / s_min)):.1e}; the gradient is large "
                      "and sensitive", ConditioningWarning, stacklevel=4)
    if inverse:
        def K(a, b):
            return -1.0 / (a * b * (a + b))
    else:
        def K(a, b):
            return 1.0 / (a + b)
    return _symmetric_eig_solve(eig.U, s, sym(E), K)


# --------------------------------------------------------------------------
# Derivatives, method "lyapunov_sign": (1)/(2) solved through identity (3)
# --------------------------------------------------------------------------

def _lyapunov_operand(res, E, inverse: bool):
    """(B, C) such that the derivative is the solution of B X + X B = C."""
    if inverse:
        T = res.S_inv
        T2 = T @ T
        return T, -sym(T2 @ E @ T2)                    # L_T(X) = -T^2 E T^2
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
        return 1.0 / (xp.sqrt(c) * fro(st.Y)), fro(res.S_inv)
    return xp.sqrt(c) / fro(st.Z), xp.sqrt(fro(res.A))


def _lyap_sign(res, E, inverse: bool, iters, tol, max_iter, full_output):
    """Solve (1)/(2) by the sign iteration: with ``iters`` the paper's ``iters``
    plain steps from ``B_0 = B / sigma`` (``sigma = sqrt(||A||_F)``, inverse
    ``||S_inv||_F``); otherwise the scaled iteration from ``B_0 = B / hi`` and
    ``l0 = lo / hi`` (:func:`_sign_interval`) to ``tol``."""
    xp = array_api_compat.array_namespace(res.A)
    B, C = _lyapunov_operand(res, sym(E), inverse)
    iters, tol, max_iter = iteration_options(iters, tol, max_iter, eps(res.A))
    bound = False
    if iters is not None:
        sigma, l0 = (fro(B) if inverse else xp.sqrt(fro(res.A))), None
    else:
        lo, sigma = _sign_interval(res, inverse)
        # eps <= l0 <= 1 (a zero eigenvalue makes the operator singular: the
        # iteration then runs to max_iter and warns; an estimate may exceed hi)
        l0 = lo / sigma
        # a bound (not the ns forward's estimate) unless the clip below raises it
        bound = res.method != "ns" and backend.all_true(l0 >= eps(res.A))
        l0 = xp.clip(xp.where(l0 > 0.0, l0, xp.zeros_like(l0)), min=eps(res.A), max=1.0)
    # X is exactly symmetric: C_0 is, and so is every update (sym(M), the finish)
    solve = (_kernels.lyapunov_sign_symmetric if _kernels.applies(B)
             else lyapunov_sign_symmetric)              # the same bits, re-scheduled
    X, n_iter, err, conv, n_terms = solve(
        B, C, scale=sigma, iters=iters, tol=tol, max_iter=max_iter, l0=l0, l0_is_bound=bound)
    warn_unconverged("the Lyapunov sign iteration", conv, err, tol, stacklevel=5)
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
    dAs = sym(dA)
    dc = dot(As, dAs) / c
    Z = st.powers[1]
    dZ = st.b * (dAs / mm(c) - As * mm(dc / c ** 2))
    dpows = [None, dZ]
    for k in range(2, len(st.powers)):
        dpows.append(dpows[k - 1] @ Z + st.powers[k - 1] @ dZ)
    dN = _poly((0.0,) + st.num[1:], [xp.zeros_like(Z)] + dpows[1:])
    if st.D is not None:
        dD = _poly((0.0,) + st.den[1:], [xp.zeros_like(Z)] + dpows[1:])
        dR = xp.linalg.solve(st.D, dN - dD @ st.R)
    else:
        dR = dN
    return mm(g * c ** (g - 1.0) * dc) * sym(st.R) + mm(c ** g) * sym(dR)


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
    Gs = sym(G)
    R_bar = mm(c ** g) * Gs
    c_bar = g * c ** (g - 1.0) * dot(Gs, st.R)
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
    c_bar = c_bar - st.b * dot(Z_bar, As) / c ** 2
    A_bar = st.b * Z_bar / mm(c) + As * mm(c_bar / c)
    return sym(A_bar)


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
    dAs = sym(dA)
    dc = xp.linalg.trace(dAs)
    dY = dAs / mm(c) - As * mm(dc / c ** 2)
    dZ = xp.zeros_like(dY)
    for (Y, Z), M, active in st.history:
        dM = -(dZ @ Y + Z @ dY)
        dY_new = 0.5 * (dY @ M + Y @ dM)
        dZ_new = 0.5 * (dM @ Z + M @ dZ)
        dY = xp.where(mm(active), dY_new, dY)
        dZ = xp.where(mm(active), dZ_new, dZ)
    F, g = _ns_out_scale(res, inverse)
    dF = dZ if inverse else dY
    return mm(g * c ** (g - 1.0) * dc) * sym(F) + mm(c ** g) * sym(dF)


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
    Gs = sym(G)
    F_bar = mm(c ** g) * Gs
    c_bar = g * c ** (g - 1.0) * dot(Gs, F)
    zero = xp.zeros_like(Gs)
    Y_bar, Z_bar = (zero, F_bar) if inverse else (F_bar, zero)
    for (Y, Z), M, active in reversed(st.history):
        W_bar = -0.5 * (mT(Y) @ Y_bar + Z_bar @ mT(Z))
        Y_prev = 0.5 * (Y_bar @ mT(M)) + mT(Z) @ W_bar
        Z_prev = 0.5 * (mT(M) @ Z_bar) + W_bar @ mT(Y)
        Y_bar = xp.where(mm(active), Y_prev, Y_bar)
        Z_bar = xp.where(mm(active), Z_prev, Z_bar)
    c_bar = c_bar - dot(Y_bar, As) / c ** 2
    A_bar = Y_bar / mm(c) + mm(c_bar) * eye_like(As)
    return sym(A_bar)


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
    if not backend.all_true(res.converged):
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
        out = sym(out)               # symmetric in exact arithmetic; make it exactly so
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
