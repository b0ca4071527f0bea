"""Values of the transport problem (entropic, KL, linear) and their
gradients."""

from __future__ import annotations

import warnings

from .. import backend
from ..backend import ConvergenceWarning, sum_to_shape
from .adjoint import _reverse, gauge_fix
from .forward import _check_result
from .results import SinkhornResult

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

    Peers: OTT-JAX's ``ent_reg_cost`` (0.6.0) is ``W + eps sum(a) sum(b)``
    (the mapping table of docs/validate.md); POT's ``ot.sinkhorn2`` returns
    the linear part instead
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
