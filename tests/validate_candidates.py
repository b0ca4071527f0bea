"""Foreign-style NumPy candidates for tests/test_validate.py (not refimpl code).

Written from the operators' definitions only, as an outside user would:

* SOFT top-k, backward stable: the threshold ``theta`` of
  ``A = sigmoid((x - theta)/t)``, ``t = eps/2``, by plain bisection on
  ``F(theta) = sum(A) - k``, then one Newton step ``theta = theta_0 + t F / S``
  (``S = sum A (1 - A)``) "for the graph": the VJP is the exact derivative of
  that last step with ``theta_0`` held fixed, which is the implicit gradient up
  to a term proportional to the rounding residual ``F``.  Variants with planted
  bugs: a forgotten factor ``1/t``, ``t = eps`` instead of ``eps/2``, the
  threshold term dropped (``theta`` treated as a constant), the sign of
  ``largest=False`` forgotten.
* Matrix square root by a fixed number of coupled Newton-Schulz steps on
  ``A / ||A||_F`` (an approximation by design), with its exact unrolled VJP
  (reverse mode through every step and the normalisation); a VJP with the
  normalisation's term dropped; and the exact root's gradient (eigenbasis
  Lyapunov solve), which is the derivative of the true root, not of this
  forward.
"""

import numpy as np
from scipy.special import expit

# --------------------------------------------------------------------------
# SOFT top-k
# --------------------------------------------------------------------------


def _bisect_theta(xs, k, t, steps=200):
    """Root of sum(sigmoid((xs - theta)/t)) = k per row, by bisection."""
    lo = xs.min(-1) - 50.0 * t - 1.0
    hi = xs.max(-1) + 50.0 * t + 1.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        F = expit((xs - mid[..., None]) / t).sum(-1) - k
        lo = np.where(F > 0, mid, lo)
        hi = np.where(F > 0, hi, mid)
    return 0.5 * (lo + hi)


def _newton_graph(xs, k, t):
    """theta_0 (bisection), sigmoid parts at theta_0, F, S, and z = (xs - theta)/t
    after one Newton step theta = theta_0 + t F / S."""
    th0 = _bisect_theta(xs, k, t)[..., None]
    z0 = (xs - th0) / t
    a0 = expit(z0)
    s0 = a0 * expit(-z0)
    F = a0.sum(-1, keepdims=True) - k
    S = s0.sum(-1, keepdims=True)
    ok = S > 0
    theta = th0 + np.where(ok, t * F / np.where(ok, S, 1.0), 0.0)
    return a0, s0, F, S, (xs - theta) / t


def soft_topk(x, *, k, eps, largest=True):
    n = x.shape[-1]
    if k in (0, n):
        return np.full(x.shape, float(k == n))
    xs = x if largest else -x
    return expit(_newton_graph(xs, k, eps / 2.0)[-1])


def _soft_topk_vjp(x, A_bar, k, eps, largest, *, inv_t=True, t_is_eps=False,
                   theta_term=True, sign=True):
    n = x.shape[-1]
    if k in (0, n):
        return (np.zeros(x.shape),)
    t = eps / 2.0
    sg = 1.0 if largest else -1.0
    a0, s0, F, S, z = _newton_graph(sg * x, k, t)
    tb = eps if t_is_eps else t                 # the t the backward divides by
    scale = 1.0 / tb if inv_t else 1.0
    s = expit(z) * expit(-z)
    z_bar = s * A_bar                            # A = sigmoid(z)
    xs_bar = z_bar * scale                       # z = (xs - theta)/t
    if theta_term:
        th_bar = -z_bar.sum(-1, keepdims=True) * scale
        ok = S > 0
        Sd = np.where(ok, S, 1.0)
        F_bar = np.where(ok, th_bar * t / Sd, 0.0)          # theta = theta_0 + t F / S
        S_bar = np.where(ok, -th_bar * t * F / Sd ** 2, 0.0)
        z0_bar = F_bar * s0 + S_bar * s0 * (1.0 - 2.0 * a0)  # F = sum a0, S = sum s0
        xs_bar = xs_bar + z0_bar * scale
    return ((sg if sign else 1.0) * xs_bar,)


def soft_topk_vjp(x, A_bar, *, k, eps, largest=True):
    return _soft_topk_vjp(x, A_bar, k, eps, largest)


def soft_topk_vjp_no_inv_t(x, A_bar, *, k, eps, largest=True):
    """Bug: the factor 1/t of dz/dx forgotten."""
    return _soft_topk_vjp(x, A_bar, k, eps, largest, inv_t=False)


def soft_topk_vjp_t_is_eps(x, A_bar, *, k, eps, largest=True):
    """Bug: t = eps in the backward (the forward uses eps/2)."""
    return _soft_topk_vjp(x, A_bar, k, eps, largest, t_is_eps=True)


def soft_topk_vjp_no_theta(x, A_bar, *, k, eps, largest=True):
    """Bug: theta treated as a constant (the term <s, A_bar>/S dropped)."""
    return _soft_topk_vjp(x, A_bar, k, eps, largest, theta_term=False)


def soft_topk_vjp_no_sign(x, A_bar, *, k, eps, largest=True):
    """Bug: largest=False computed on -x but the chain rule's -1 forgotten."""
    return _soft_topk_vjp(x, A_bar, k, eps, largest, sign=False)


# --------------------------------------------------------------------------
# Matrix square root by a fixed number of Newton-Schulz steps
# --------------------------------------------------------------------------

#: Coupled Newton-Schulz steps: few enough that the forward is visibly approximate.
NS_STEPS = 6


def _mT(a):
    return np.swapaxes(a, -1, -2)


def _ns_trace(A, steps=NS_STEPS):
    """c = ||A||_F, Y_0 = A/c, Z_0 = I; T_j = (3 I - Z_j Y_j)/2, Y_{j+1} = Y_j T_j,
    Z_{j+1} = T_j Z_j; S = sqrt(c) Y_steps.  Returns c and the iterates."""
    c = np.sqrt(np.sum(A * A, axis=(-2, -1), keepdims=True))
    eye = np.broadcast_to(np.eye(A.shape[-1]), A.shape)
    Ys, Zs, Ts = [A / c], [eye], []
    for _ in range(steps):
        T = 1.5 * eye - 0.5 * (Zs[-1] @ Ys[-1])
        Ts.append(T)
        Ys.append(Ys[-1] @ T)
        Zs.append(T @ Zs[-1])
    return c, Ys, Zs, Ts


def sqrtm_ns(A):
    c, Ys, _, _ = _ns_trace(A)
    return np.sqrt(c) * Ys[-1]


def _sqrtm_ns_vjp(A, S_bar, norm_term=True):
    """Reverse mode through every step of :func:`_ns_trace`."""
    c, Ys, Zs, Ts = _ns_trace(A)
    c_bar = np.sum(S_bar * Ys[-1], axis=(-2, -1), keepdims=True) / (2.0 * np.sqrt(c))
    Y_bar = np.sqrt(c) * S_bar
    Z_bar = np.zeros_like(Y_bar)
    for j in reversed(range(len(Ts))):
        Y, Z, T = Ys[j], Zs[j], Ts[j]
        T_bar = _mT(Y) @ Y_bar + Z_bar @ _mT(Z)      # Y' = Y T, Z' = T Z
        Y_bar = Y_bar @ _mT(T)
        Z_bar = _mT(T) @ Z_bar
        M_bar = -0.5 * T_bar                          # T = 3/2 I - M/2, M = Z Y
        Z_bar = Z_bar + M_bar @ _mT(Y)
        Y_bar = Y_bar + _mT(Z) @ M_bar
    A_bar = Y_bar / c                                 # Y_0 = A / c
    if norm_term:
        c_bar = c_bar - np.sum(Y_bar * A, axis=(-2, -1), keepdims=True) / c ** 2
        A_bar = A_bar + c_bar * A / c                 # c = ||A||_F
    return (A_bar,)


def sqrtm_ns_vjp(A, S_bar):
    return _sqrtm_ns_vjp(A, S_bar)


def sqrtm_ns_vjp_no_norm_term(A, S_bar):
    """Bug: the dependence of c = ||A||_F on A dropped."""
    return _sqrtm_ns_vjp(A, S_bar, norm_term=False)


def sqrtm_exact_vjp(A, S_bar):
    """The true root's gradient: S X + X S = S_bar in the eigenbasis of A."""
    lam, V = np.linalg.eigh(0.5 * (A + _mT(A)))
    r = np.sqrt(np.maximum(lam, 0.0))
    G = _mT(V) @ S_bar @ V
    return (V @ (G / (r[..., :, None] + r[..., None, :])) @ _mT(V),)


def sqrtm_exact(A):
    """The true root (eigendecomposition), for the control."""
    lam, V = np.linalg.eigh(0.5 * (A + _mT(A)))
    return (V * np.sqrt(np.maximum(lam, 0.0))[..., None, :]) @ _mT(V)
