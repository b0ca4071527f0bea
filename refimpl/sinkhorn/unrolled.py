"""The unrolled baseline: exactly ``n_iter`` iterations and the reverse pass
through their tape (what autodiff through the loop does)."""

from __future__ import annotations

from typing import Any

from .. import backend
from ..backend import logsumexp, matvec, rmatvec, sum_to_shape
from .forward import _check_inputs, _damping
from .results import UnrolledResult

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
        psi_bar = psi_bar + rmatvec(S_row, w)
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
