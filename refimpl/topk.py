r"""SOFT top-k: the top-k indicator relaxed by entropic optimal transport.

Definition
----------
Scores ``x`` in R^n are transported onto anchors ``y_1 < ... < y_m`` with
cost ``C_ij = (x_i - y_j)^2``, row marginal ``mu_i = 1/n`` and column
marginal ``nu``.  The entropic plan

    Gamma = argmin_{Gamma 1 = mu, Gamma^T 1 = nu}  <C, Gamma> - eps H(Gamma),
    H(Gamma) = -sum_ij Gamma_ij (log Gamma_ij - 1),

is smooth in ``x``.  refimpl's convention (part of the API contract):

* SOFT top-k (:func:`soft_topk`): anchors ``y = (0, 1)``,
  ``nu = ((n-k)/n, k/n)`` for ``largest=True`` (mass k/n on the upper
  anchor) and ``nu = (k/n, (n-k)/n)`` for ``largest=False``; the output is
  ``A = n * Gamma[:, selected anchor]``, so ``0 <= A <= 1`` and
  ``sum(A) = k``.
* Sorted SOFT top-k (:func:`soft_sorted_topk`, the beam-search variant):
  ``m = k + 1`` anchors ``y = (0, 1, ..., k)``, ``nu = ((n-k)/n, 1/n, ...,
  1/n)``; ``A[:, r] = n * Gamma[:, k - r]`` is a soft one-hot of the
  (r+1)-th ranked score (column 0 the best).  For ``k = n`` the zero-mass
  anchor is dropped (a soft sort onto ``y = (1, ..., n)``).

No cost normalisation is applied (dividing ``C`` by its maximum would break
translation invariance and couple the rows of a batch).  Every array is
batched over leading dimensions; the rows of a batch never interact.

Symbols: ``x`` scores, ``k`` how many to select, ``eps`` the entropic
regularisation, ``y`` anchors, ``C`` cost, ``mu, nu`` marginals, ``Gamma``
the plan, ``f, g`` the dual potentials, ``A`` the soft indicator,
``t = eps / (2 (y_2 - y_1))`` the temperature, ``theta`` the threshold,
``s = A (1 - A)``, ``S = sum(s)``, ``A_bar = dL/dA``, ``x_bar = dL/dx``.

Which end is "top"
------------------
``C_i2 - C_i1 = (y_2 - y_1)(y_1 + y_2 - 2 x_i)`` decreases in ``x_i``, so the
unregularised plan sends the k largest scores to the upper anchor, for any
``y_1 < y_2``.  ``largest=False`` is computed as ``largest=True`` on ``-x``
(the cost depends on ``x`` only through ``-2 x_i y_j`` up to terms absorbed
by the potentials, so negating ``x`` is the same as reversing the anchors).

Forward equations
-----------------
Closed form (two anchors).  The optimal plan is
``Gamma_ij = exp((f_i + g_j - C_ij)/eps)``.  In row ``i`` the two entries
sum to ``1/n`` and their ratio is
``exp((g_2 - g_1 + C_i1 - C_i2)/eps) = exp((x_i - theta)/t)`` with
``theta = (y_1 + y_2)/2 - (g_2 - g_1)/(2 (y_2 - y_1))``.  Hence

    A_i = sigmoid((x_i - theta) / t),      t = eps / (2 (y_2 - y_1)),

and ``theta`` is the unique root of the decreasing function
``F(theta) = sum_i A_i(theta) - k`` (``F' = -S/t``).  It is found by
safeguarded Newton (``theta <- theta + t F / S``, bisection inside a
bracket whenever the step leaves it) from ``theta_0 = (x_(k) + x_(k+1))/2``,
``x_(j)`` the j-th largest score (found by ``partition``, O(n) in NumPy,
where the namespace has it; by a sort otherwise).  Since ``A`` is
monotone in ``theta``, ``|F(theta)| = ||A(theta) - A(theta*)||_1``.  ``F`` is
summed as an exact integer count plus terms bounded by ``2 s_i``, so the
Newton correction ``F / S`` is resolved to ``O(u log n)`` whatever ``k`` is,
and the iteration stops when it bounds the relative error of every ``A_i``
(see :func:`_solve_threshold`).  The iteration is run on ``theta - theta_0``
against the shifted scores ``x - theta_0`` so that ``theta`` is resolved to
the precision of the scores near the boundary.  ``sigmoid`` and ``s`` are
evaluated as ``e = exp(-|z|)``, ``s = e / (1 + e)^2``: no overflow, and ``s``
underflows to 0 (not NaN) when ``eps`` is far below the boundary gap.

Sinkhorn path (any number of anchors): ``Gamma`` from
:func:`refimpl.sinkhorn.sinkhorn` (log domain, with a tolerance), run on the
centred scores ``x - mean(x)``: a shift of the scores is absorbed by the
potentials, so the plan and ``A`` are those of ``x`` while the log-domain
costs stay set by the spread of the scores rather than their offset.  Both
paths give the same ``A`` to the Sinkhorn tolerance.

Adjoint equations
-----------------
Two anchors (closed form).  Differentiating ``sum A = k``:
``dtheta = <s, dx> / S``, so

    dA_i/dx_j = (s_i / t)(delta_ij - s_j / S),
    x_bar     = s * (A_bar - <s, A_bar> / S) / t,          O(n),

with the sign flipped for ``largest=False``.  ``J`` is symmetric, negative
semi-definite for ``largest=False`` and positive semi-definite for
``largest=True``, and ``J 1 = 0`` (translation invariance).  When ``S = 0``
(``k = 0``, ``k = n``, or every ``s_i`` underflowed) the Jacobian is 0, its
limit (``s_i s_j / S <= min(s_i, s_j)``).

General m anchors (the Sinkhorn path, the sorted variant): the KKT
conditions of the dual, with the gauge fixed by dropping the last column
potential, have Jacobian
``H = [[diag(mu), Gbar], [Gbar^T, diag(nubar)]] / eps``; only the
``(m-1) x (m-1)`` Schur complement ``K = diag(nubar) - Gbar^T diag(mu)^{-1}
Gbar`` is inverted, ``O(n m^2 + m^3)``.  That is
:func:`refimpl.sinkhorn.sinkhorn_vjp` (``method="schur"``), which returns
``C_bar``; the chain rule through ``dC_ij/dx_i = 2 (x_i - y_j)`` gives

    x_bar_i = 2 sum_j C_bar_ij (x_i - y_j)

(``mu`` and ``nu`` depend on ``n`` and ``k`` only, not on ``x``).  For two
anchors ``K = S/n`` and the two routes coincide (``derivations/topk.py``).

Error against the hard top-k
----------------------------
For distinct scores with boundary gap ``delta = x_(k) - x_(k+1)``,

    ||A_eps - A_hard||_1 <= 2 max(k, n-k) exp(-(y_2 - y_1) delta / eps)

(:func:`soft_topk_error_bound`): the excess mass below the threshold equals
the deficit above it, and ``sigmoid(-z) <= exp(-z)``.

References
----------
Y. Xie, H. Dai, M. Chen, B. Dai, T. Zhao, H. Zha, W. Wei, T. Pfister,
"Differentiable Top-k Operator with Optimal Transport", NeurIPS 2020.
B. Amos, V. Koltun, J. Z. Kolter, "The Limited Multi-Label Projection
Layer", arXiv:1906.08707 (2019) -- the same two-anchor operator.
M. Cuturi, "Sinkhorn Distances", NeurIPS 2013.

Examples
--------
>>> import numpy as np
>>> x = np.array([0.1, 2.0, -1.0, 0.7, 1.5])
>>> res = soft_topk(x, 2, eps=0.1)
>>> bool(abs(res.A.sum() - 2.0) < 1e-12)                  # sum(A) = k
True
>>> t = 0.1 / 2.0
>>> bool(np.allclose(res.A, 1 / (1 + np.exp(-(x - res.theta) / t))))
True
>>> x_bar = soft_topk_vjp(res, np.array([1.0, 0.0, 0.0, 0.0, 0.0]))
>>> bool(abs(x_bar.sum()) < 1e-12)                         # J 1 = 0
True
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import backend
from .backend import ConvergenceWarning
from .iteration import Converging, Schedule, iterate

__all__ = [
    "SoftTopkResult",
    "SortedTopkResult",
    "boundary_gap",
    "hard_topk",
    "soft_sorted_topk",
    "soft_sorted_topk_jvp",
    "soft_sorted_topk_vjp",
    "soft_topk",
    "soft_topk_error_bound",
    "soft_topk_jvp",
    "soft_topk_vjp",
]

#: Anchors of the two-anchor problem (lower, upper).
ANCHORS = (0.0, 1.0)

METHODS = ("closed_form", "sinkhorn")


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SoftTopkResult(Converging):
    """Result of :func:`soft_topk`.

    Attributes
    ----------
    A : (..., n) soft top-k indicator, ``0 <= A <= 1``, ``sum(A, -1) = k``.
    theta : (...) threshold, ``A = sigmoid(+-(x - theta)/t)``; ``+inf``/``-inf``
        (``largest=True``) for ``k = 0``/``k = n``.  On the Sinkhorn path it
        is read off the column potentials,
        ``theta = (y_1 + y_2)/2 - (g_2 - g_1)/(2 (y_2 - y_1))``.
    plan : the :class:`refimpl.sinkhorn` result (Sinkhorn path), else None.
    s : (..., n) ``A (1 - A)`` evaluated stably (closed form), else None.
    x : the scores (a reference; never modified).
    k, eps, largest, method : the parameters.
    t : the temperature ``eps / (2 (y_2 - y_1))``.
    n_iter : int64 array (batch shape ``x.shape[:-1]``, 0-d for one row),
        iterations each row took (Newton evaluations, or Sinkhorn sweeps);
        0 for ``k = 0`` or ``k = n``.
    error : array (batch shape) of ``x``'s dtype.  Closed form: each row's
        ``|sum(A) - k| / S``, the last Newton correction of ``theta`` in
        units of ``t`` (to first order a bound on the relative error of
        every ``A_i``); Sinkhorn: the solver's relative marginal error
        (:class:`refimpl.sinkhorn.SinkhornResult`); 0 for ``k = 0, n``.
    converged : bool array (batch shape), whether each row met its tolerance.

    The whole-batch summary (``all_converged``, ``n_converged``,
    ``max_error``, ``max_n_iter``, ``summary()``) comes from
    :class:`refimpl.iteration.Converging`.
    """

    A: Any
    theta: Any
    plan: Any
    s: Any
    x: Any
    k: int
    eps: float
    largest: bool
    method: str
    t: float
    n_iter: Any
    error: Any
    converged: Any


@dataclass(frozen=True)
class SortedTopkResult(Converging):
    """Result of :func:`soft_sorted_topk`.

    Attributes
    ----------
    A : (..., n, k) ``A[..., i, r]`` is the soft indicator that score ``i``
        is ranked ``r + 1`` (``r = 0`` the largest for ``largest=True``).
        Each column sums to 1, each row to at most 1.
    plan : the :class:`refimpl.sinkhorn` result (None for ``k = 0``).
    y : the anchors used, as a tuple of Python floats.
    x, k, eps, largest : the inputs and parameters.
    n_iter, error, converged : the Sinkhorn diagnostics per row (arrays of
        the batch shape ``x.shape[:-1]``; 0, 0 and True for ``k = 0``), with
        the whole-batch summary of :class:`refimpl.iteration.Converging`.
    """

    A: Any
    plan: Any
    y: tuple
    x: Any
    k: int
    eps: float
    largest: bool
    n_iter: Any
    error: Any
    converged: Any

    @property
    def indicator(self):
        """Soft top-k indicator ``sum_r A[..., :, r]`` (sums to ``k``)."""
        xp = backend.namespace(A=self.A)
        return xp.sum(self.A, axis=-1)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------

def _check_k(k: Any, n: int) -> int:
    """``k`` as a Python int in ``[0, n]`` (:func:`refimpl.backend.check_int`:
    ``TypeError`` for a non-integer, ``ValueError`` outside the range)."""
    return backend.check_int(k, "k", min=0, max=n)


def _check_anchor_range(xp, xs, y, eps: float) -> None:
    """Refuse scores whose anchor costs ``(x_i - mean x - y_j)^2`` overflow,
    or overflow once divided by ``eps``, in float64 (the Sinkhorn path's
    working dtype): the error names the caller's ``x`` and ``eps``."""
    xc = _centred(xp, xs)
    spread = float(xp.max(xp.abs(xc))) + max(abs(v) for v in y)
    cmax = spread * spread if spread < 1e154 else math.inf
    if not cmax / eps < float(xp.finfo(xp.float64).max):
        raise ValueError(f"arguments 'x' and 'eps': the anchor costs (x - mean x - y)^2 / eps reach "
                         f"{cmax:.3e} / {eps:.3e}, beyond float64; rescale x or raise eps")


def _check_backward_method(method: Any) -> str:
    """A method of :func:`refimpl.sinkhorn.sinkhorn_vjp`, checked whatever the
    forward (the closed form ignores it, but a typo is still a typo)."""
    from .sinkhorn import METHODS as BACKWARD_METHODS

    return backend.check_choice(method, "method", BACKWARD_METHODS)


def _wide(xp, v):
    """``v`` in float64, the working dtype of the Sinkhorn path (a no-op in float64)."""
    return v if backend.dtype_name(v.dtype) == "float64" else xp.astype(v, xp.float64)


def _narrow(xp, v, like):
    """``v`` rounded to ``like``'s dtype."""
    return v if v.dtype == like.dtype else xp.astype(v, like.dtype)


_PLAN_ARRAYS = ("P", "f", "g", "C", "a", "b", "tol", "error")


def _plan_as(xp, plan, dtype):
    """The Sinkhorn result ``plan`` with its float arrays cast to ``dtype``.

    The plan is solved in float64 and stored in the scores' dtype (a float32
    caller gets float32 arrays throughout); the derivatives cast it back to
    float64.  Rounding the converged float64 plan to float32 moves each
    entry by one float32 ulp, far below the float32 iteration's own floor.
    """
    if backend.dtype_name(plan.P.dtype) == backend.dtype_name(dtype):
        return plan
    return dataclasses.replace(plan, **{k: xp.astype(getattr(plan, k), dtype) for k in _PLAN_ARRAYS})


def _check_eps(xp, eps: Any, dtype) -> float:
    """``eps > 0`` (``backend.check_positive``) whose temperature ``t = eps / 2``
    lies in ``[smallest normal, largest / 2^32]`` of ``dtype``.

    Below, ``t`` carries no relative precision (a subnormal ``t`` gives a
    wrong threshold, ``t = 0`` a division by zero), and ``A`` is the hard
    top-k anyway (:func:`hard_topk`).  Above, ``t`` and the clipping bound
    ``800 t`` overflow the dtype (float32: ``eps > ~1.6e29``).
    """
    eps = backend.check_positive(eps, "eps")
    info = xp.finfo(dtype)
    tiny, huge = float(info.smallest_normal), float(info.max) * 2.0 ** -32
    t = eps / (2.0 * (ANCHORS[1] - ANCHORS[0]))
    if not tiny <= t <= huge:
        raise ValueError(f"argument 'eps' = {eps!r} is too {'small' if t < tiny else 'large'} for "
                         f"{backend.dtype_name(dtype)}: the temperature eps/2 must lie in "
                         f"[{tiny:.1e}, {huge:.1e}] (its smallest normal number, its largest / 2^32)"
                         + ("; at such eps the result is the hard top-k, see hard_topk"
                            if t < tiny else ""))
    return eps


def _check_scores(x):
    xp = backend.namespace(x=x)
    backend.check_array(x, "x", min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError("argument 'x' must have at least one score in its last axis")
    return xp


def _check_cotangent(xp, bar, like, name: str):
    backend.namespace(**{name: bar, "result": like})
    backend.check_array(bar, name, allow_empty=True)     # shaped like a result (k = 0: (..., n, 0))
    if tuple(bar.shape) != tuple(like.shape):
        raise ValueError(f"argument {name!r} has shape {tuple(bar.shape)}, expected {tuple(like.shape)}")
    if bar.dtype != like.dtype:
        raise TypeError(f"argument {name!r} has dtype {backend.dtype_name(bar.dtype)}, "
                        f"expected {backend.dtype_name(like.dtype)}")


def _warn_unconverged(res, what: str) -> None:
    if not res.all_converged:
        warnings.warn(f"{what}: the forward did not converge for {res.size - res.n_converged} "
                      f"of {res.size} row(s) (largest error {res.max_error:.2e}, at most "
                      f"{res.max_n_iter} iterations); the implicit gradient assumes the "
                      "optimality conditions hold and is unreliable there",
                      ConvergenceWarning, stacklevel=3)


# --------------------------------------------------------------------------
# Closed form (two anchors)
# --------------------------------------------------------------------------

def _sigmoid_parts(xp, z):
    """``A = sigmoid(z)``, ``s = A (1 - A)`` and ``h = A - [z >= 0]`` from
    ``e = exp(-|z|)``.

    With ``r = 1/(1 + e)`` and ``q = e r``: ``A = r`` for ``z >= 0``, else
    ``q``; ``1 - A`` is the other one; ``s = r q``; ``A - [z >= 0] = -q`` or
    ``q``.  Nothing overflows; ``q`` and ``s`` underflow to 0 for large ``|z|``.
    """
    e = xp.exp(-xp.abs(z))
    r = 1.0 / (1.0 + e)
    q = e * r
    pos = z >= 0
    return xp.where(pos, r, q), r * q, xp.where(pos, -q, q), pos


def _boundary_pair(xp, x, k: int):
    """The k-th and (k+1)-th largest entries of ``x`` along the last axis.

    ``partition`` where the namespace offers it (NumPy: O(n) introselect;
    CuPy: a sort on the device), ``sort`` otherwise (the array API standard
    has no selection function).
    """
    n = x.shape[-1]
    part = getattr(xp, "partition", None)
    xs = part(x, (n - k - 1, n - k), axis=-1) if part is not None else xp.sort(x, axis=-1)
    return xs[..., n - k], xs[..., n - k - 1]


def _default_tol(dtype, n: int) -> float:
    """``16 u (1 + log2 n)``: the rounding floor of ``F / S`` (see
    :func:`_solve_threshold`), i.e. of the relative error of every ``A_i``."""
    return 16.0 * backend.unit_roundoff(dtype) * (1.0 + math.ceil(math.log2(max(n, 2))))


class _Newton(NamedTuple):
    """State of the threshold iteration of :func:`_solve_threshold` (batch
    shape, ``A`` and ``s`` batch + ``(n,)``): the values at the last
    evaluated ``delta = theta - theta_0``, and the iterate proposed there."""

    delta: Any      # where F, A, s were last evaluated
    step: Any       # the next delta: the Newton step, or bisection of [lo, hi]
    lo: Any         # bracket: F(lo) >= 0 >= F(hi)
    hi: Any
    A: Any          # sigmoid(z), z = (d - delta) / t
    s: Any          # A (1 - A)
    F: Any          # sum(A) - k
    S: Any          # sum(s) = -t dF/dtheta
    done: Any       # the stopping test held at delta


def _newton_eval(xp, d, k: int, t: float, tol: float, state: _Newton, live) -> _Newton:
    """One step of the members ``live``: move to the proposed ``delta``, evaluate
    ``F``, ``S``, ``A``, ``s`` there, tighten the bracket, propose the next step.

    Members not ``live`` keep their ``delta``; everything else is recomputed
    from it, which gives the same values again (the bracket update is
    idempotent at a fixed ``delta``).
    """
    u = backend.unit_roundoff(d.dtype)
    tiny = float(xp.finfo(d.dtype).smallest_normal)
    zmax = 800.0                                         # exp(-800) underflows to 0
    delta = xp.where(live, state.step, state.delta)
    # z = (x - theta)/t, the numerator clipped to +-zmax t first so that no
    # eps (however small against the scores) overflows; sigmoid(+-zmax) is
    # exactly 0 or 1 in both dtypes.
    z = xp.clip(d - delta[..., None], -zmax * t, zmax * t) / t
    A, s, h, pos = _sigmoid_parts(xp, z)
    count = xp.astype(xp.sum(xp.astype(pos, xp.int64), axis=-1) - k, d.dtype)
    F = count + xp.sum(h, axis=-1)                       # sum(A) - k
    S = xp.sum(s, axis=-1)                               # -t dF/dtheta
    noise = 4.0 * u * xp.sum(s * xp.abs(z), axis=-1) + tiny   # rounding of z, subnormals
    lo = xp.where(F > 0, delta, state.lo)
    hi = xp.where(F < 0, delta, state.hi)
    newton = delta + t * F / xp.where(S > 0, S, xp.ones_like(S))
    inside = (S > 0) & (newton > lo) & (newton < hi)
    step = xp.where(inside, newton, 0.5 * lo + 0.5 * hi)
    floor = 2.0 * u * (xp.abs(delta) + t)
    done = state.done | (xp.abs(F) <= tol * S + noise) | (xp.abs(step - delta) <= floor)
    return _Newton(delta=delta, step=step, lo=lo, hi=hi, A=A, s=s, F=F, S=S, done=done)


def _newton_error(xp, state: _Newton):
    """``|F| / S``, the last Newton correction in units of ``t`` (0 where
    ``F = 0``, inf where ``S = 0 != F``), and whether the test held."""
    F, S = state.F, state.S
    ratio = xp.where(S > 0, xp.abs(F) / xp.where(S > 0, S, xp.ones_like(S)),
                     xp.where(F == 0, xp.zeros_like(F), xp.full_like(F, math.inf)))
    return ratio, state.done


def _solve_threshold(xp, x, k: int, t: float, tol: float, schedule: Schedule):
    """Root ``theta`` of ``F(theta) = sum_i sigmoid((x_i - theta)/t) - k`` for 0 < k < n.

    Safeguarded Newton, ``theta <- theta + t F / S``, on ``delta = theta -
    theta_0`` against the shifted scores ``d = x - theta_0``.

    * ``F`` is summed as ``(#{z_i >= 0} - k) + sum_i (A_i - [z_i >= 0])``: an
      exact integer count plus terms bounded by ``2 s_i``, so its rounding
      error is ``O(u log n) S`` whatever ``k`` is, and the Newton correction
      ``F / S`` (in units of ``t``) is known to ``O(u log n)``.  Stopping at
      ``|F| <= tol S`` therefore bounds the relative error of every ``A_i``
      by ``tol`` to first order (``dA_i / A_i = (1 - A_i) dtheta / t``).
      Below that, ``F`` is not resolved: the rounding of ``z_i`` moves it by
      up to ``~u sum_i s_i |z_i|`` (the conditioning of ``sigmoid``), and
      values below the smallest normal number carry no relative precision;
      both are added to the test.
    * The bracket ``[lo, hi]``, ``F(lo) >= 0 >= F(hi)``, starts from
      ``sum sigmoid(z) >= n sigmoid(min z)``: ``lo = min d - t max(0,
      log(k/(n-k)))``, ``hi = max d + t max(0, log((n-k)/k))``; every
      evaluation tightens it and a Newton step leaving it is replaced by
      bisection.
    * A row also stops when the correction falls below the resolution of
      ``delta`` (the round-off floor).

    Each iteration of :func:`refimpl.iteration.iterate` is one evaluation
    (the first at ``delta = 0``); a row stops at the first evaluation that
    passes its test, with ``theta``, ``A``, ``s`` of that evaluation.

    Returns ``(theta, A, s, diagnostics)``; the diagnostics' ``error`` is
    ``|F| / S`` per row (the last correction in units of ``t``).
    """
    n = x.shape[-1]
    hi_x, lo_x = _boundary_pair(xp, x, k)
    shift = 0.5 * hi_x + 0.5 * lo_x                      # theta_0 = (x_(k) + x_(k+1))/2
    d = x - shift[..., None]
    zero = xp.zeros_like(shift)
    state = _Newton(delta=zero, step=zero,
                    lo=xp.min(d, axis=-1) - t * max(0.0, math.log(k / (n - k))),
                    hi=xp.max(d, axis=-1) + t * max(0.0, math.log((n - k) / k)),
                    A=xp.zeros_like(d), s=xp.zeros_like(d), F=zero, S=zero,
                    done=xp.zeros(tuple(shift.shape), dtype=xp.bool, device=backend.device(x)))

    def advance(state: _Newton, active, steps: int) -> _Newton:
        for _ in range(steps):
            state = _newton_eval(xp, d, k, t, tol, state, active & ~state.done)
        return state

    state, diag = iterate(advance, lambda st: _newton_error(xp, st), state,
                          batch=tuple(shift.shape), like=x, schedule=schedule)
    return shift + state.delta, state.A, state.s, diag


def _constant_result(xp, x, k, eps, largest, method, t) -> SoftTopkResult:
    """k = 0 or k = n: A is 0 or 1 identically, theta = -+inf, the Jacobian is 0."""
    fill = 0.0 if k == 0 else 1.0
    A = xp.full(tuple(x.shape), fill, dtype=x.dtype, device=backend.device(x))
    inf = math.inf if (k == 0) == largest else -math.inf
    theta = xp.full(tuple(x.shape[:-1]), inf, dtype=x.dtype, device=backend.device(x))
    s = xp.zeros_like(x) if method == "closed_form" else None
    return SoftTopkResult(A=A, theta=theta, plan=None, s=s, x=x, k=k, eps=eps, largest=largest,
                          method=method, t=t, **_exact_diagnostics(xp, x))


def _exact_diagnostics(xp, x) -> dict:
    """``n_iter = 0``, ``error = 0``, ``converged = True`` for every row of
    ``x`` (..., n): a result known exactly, without iterating."""
    batch, dev = tuple(x.shape[:-1]), backend.device(x)
    return {"n_iter": xp.zeros(batch, dtype=xp.int64, device=dev),
            "error": xp.zeros(batch, dtype=x.dtype, device=dev),
            "converged": xp.ones(batch, dtype=xp.bool, device=dev)}


def soft_topk(x, k, *, eps, largest: bool = True, method: str = "closed_form",
              tol: float | None = None, max_iter: int | None = None,
              check_every: int | None = None) -> SoftTopkResult:
    """SOFT top-k indicator of the scores ``x`` (batched over leading axes).

    Parameters
    ----------
    x : (..., n) float32/float64 array of scores.
    k : int, ``0 <= k <= n``, how many to select.
    eps : float > 0, entropic regularisation (``t = eps/2`` for anchors (0, 1)).
    largest : select the k largest (default) or the k smallest scores.
    method : ``"closed_form"`` (sigmoid with a Newton-solved threshold, O(n)
        per step) or ``"sinkhorn"`` (the entropic plan from
        :func:`refimpl.sinkhorn.sinkhorn`).  The Sinkhorn path always
        solves its plan, and :func:`soft_topk_vjp` / :func:`soft_topk_jvp`
        their linear systems, in float64 and rounds ``A``, ``theta`` and the
        derivatives to ``x``'s dtype: a float32 plan is resolved only to
        ``~32 u max|C| / eps`` (``u = 6e-8``) and its gradient can then be
        off by more than 100% at ``eps = 0.01`` with ``converged=True``.
        ``result.plan`` is that plan, rounded to ``x``'s dtype.
    tol : closed form: stop when ``|sum(A) - k| <= tol S`` (``S = sum A(1-A)``),
        which bounds the relative error of every ``A_i`` by ``tol`` to first
        order (default ``16 u (1 + log2 n)``, ``u`` the unit round-off: the
        rounding floor of that test);
        Sinkhorn: passed to the solver (default 1e-12).
    max_iter : iteration cap (default 100 Newton steps; 100000 Sinkhorn sweeps).
    check_every : closed form: read on the host whether any row is still
        iterating every this many Newton steps (default: the device policy's
        cadence, :meth:`refimpl.backend.DevicePolicy.sync_cadence` with 3 on
        a device where each read waits for queued work, else 1).  Each row's
        test runs on the device at every step and a row stops at the first
        step that passes it, so the result does not depend on this setting.

    Returns
    -------
    SoftTopkResult
        ``A`` with ``sum(A, -1) == k``; ``theta``; per-row diagnostics
        ``n_iter``, ``error``, ``converged``.  Rows that did not converge
        raise one ConvergenceWarning naming how many they are.

    Raises
    ------
    TypeError : ``x`` not a float32/float64 array; ``largest`` not a bool.
    ValueError : NaN/Inf in ``x``; ``k`` not an integer in ``[0, n]``;
        ``eps <= 0``, or ``eps/2`` below the smallest normal number of
        ``x``'s dtype; unknown ``method``.

    Examples
    --------
    >>> import numpy as np
    >>> res = soft_topk(np.array([3.0, 1.0, 2.0]), 1, eps=1e-3)
    >>> res.A.round(6).tolist()                                # eps -> 0: hard top-1
    [1.0, 0.0, 0.0]
    >>> soft_topk(np.array([3.0, 1.0, 2.0]), 1, eps=1e-3, largest=False).A.round(6).tolist()
    [0.0, 1.0, 0.0]
    """
    xp = _check_scores(x)
    n = x.shape[-1]
    k = _check_k(k, n)
    eps = _check_eps(xp, eps, x.dtype)
    method = backend.check_choice(method, "method", METHODS)
    largest = backend.check_flag(largest, "largest")
    y1, y2 = ANCHORS
    t = eps / (2.0 * (y2 - y1))
    if k in (0, n):
        return _constant_result(xp, x, k, eps, largest, method, t)
    sign = 1.0 if largest else -1.0
    xs = x if largest else -x                            # largest=False is largest=True on -x
    if method == "closed_form":
        tol = _default_tol(x.dtype, n) if tol is None else backend.check_positive(tol, "tol")
        max_iter = 100 if max_iter is None else backend.check_int(max_iter, "max_iter", min=1)
        if check_every is None:                          # each host read waits for the device
            schedule = Schedule.for_policy(backend.policy_of(x), max_iter=max_iter, on_device=3)
        else:
            schedule = Schedule(max_iter=max_iter, sync_every=backend.check_int(check_every, "check_every", min=1))
        theta, A, s, diag = _solve_threshold(xp, xs, k, t, tol, schedule)
        if not diag.all_converged:
            warnings.warn(f"soft_topk: the threshold iteration did not converge for "
                          f"{diag.size - diag.n_converged} of {diag.size} row(s) in max_iter="
                          f"{max_iter} steps (largest relative error {diag.max_error:.2e} > tol "
                          f"{tol:.1e})", ConvergenceWarning, stacklevel=2)
        return SoftTopkResult(A=A, theta=sign * theta, plan=None, s=s, x=x, k=k, eps=eps,
                              largest=largest, method=method, t=t, n_iter=diag.n_iter,
                              error=diag.error, converged=diag.converged)
    y = (y1, y2)
    nu = ((n - k) / n, k / n)
    _check_anchor_range(xp, _wide(xp, xs), y, eps)
    plan = _anchor_transport(xp, _wide(xp, xs), y, nu, eps, tol, max_iter)   # float64, see docstring
    A = _narrow(xp, float(n) * plan.P[..., 1], x)
    theta = (xp.mean(xs, axis=-1) + 0.5 * (y1 + y2)
             - _narrow(xp, (plan.g[..., 1] - plan.g[..., 0]) / (2.0 * (y2 - y1)), x))
    plan = _plan_as(xp, plan, x.dtype)
    return SoftTopkResult(A=A, theta=sign * theta, plan=plan, s=None, x=x, k=k, eps=eps,
                          largest=largest, method=method, t=t, **_plan_diagnostics(plan))


def _closed_form_jvp(xp, res: SoftTopkResult, dxs):
    """``dA = s * (dx - <s, dx>/S) / t`` (largest=True orientation)."""
    s = res.s
    S = xp.sum(s, axis=-1, keepdims=True)
    proj = xp.sum(s * dxs, axis=-1, keepdims=True) / xp.where(S > 0, S, xp.ones_like(S))
    return s * (dxs - proj) / res.t


def soft_topk_jvp(res: SoftTopkResult, dx):
    """Forward mode: ``dA = J dx``.

    Closed form: ``dA = +-s (dx - <s, dx>/S) / t`` (O(n)).  Sinkhorn path:
    :func:`refimpl.sinkhorn.sinkhorn_jvp` with ``dC_ij = 2 (x_i - y_j) dx_i``.
    """
    backend.check_result(res, "res", SoftTopkResult, producer="soft_topk()")
    xp = backend.namespace(x=res.x, dx=dx)
    _check_cotangent(xp, dx, res.x, "dx")
    _warn_unconverged(res, "soft_topk_jvp")
    sign = 1.0 if res.largest else -1.0
    if res.k in (0, res.x.shape[-1]):
        return xp.zeros_like(res.A)
    dxs = sign * dx                                      # A is a function of sign * x
    if res.method == "closed_form":
        return _closed_form_jvp(xp, res, dxs)
    dP = _anchor_jvp(xp, _plan_as(xp, res.plan, xp.float64), _wide(xp, sign * res.x), ANCHORS,
                     _wide(xp, dxs))
    return _narrow(xp, float(res.x.shape[-1]) * dP[..., 1], res.x)


def soft_topk_vjp(res: SoftTopkResult, A_bar, *, method: str = "schur"):
    """Reverse mode: ``x_bar = J^T A_bar``.

    Closed form: ``x_bar = +-s (A_bar - <s, A_bar>/S) / t`` (O(n); ``J`` is
    symmetric).  Sinkhorn path: ``P_bar[:, upper] = n A_bar`` through
    :func:`refimpl.sinkhorn.sinkhorn_vjp` (``method`` is passed on, default
    the Schur complement on the anchor side), then
    ``x_bar_i = 2 sum_j C_bar_ij (x_i - y_j)``.

    Returns ``x_bar`` with the shape of ``x``; exactly 0 for ``k = 0, n``.
    """
    backend.check_result(res, "res", SoftTopkResult, producer="soft_topk()")
    _check_backward_method(method)
    xp = backend.namespace(A=res.A, A_bar=A_bar)
    _check_cotangent(xp, A_bar, res.A, "A_bar")
    _warn_unconverged(res, "soft_topk_vjp")
    sign = 1.0 if res.largest else -1.0
    if res.k in (0, res.x.shape[-1]):
        return xp.zeros_like(res.x)
    if res.method == "closed_form":
        return sign * _closed_form_jvp(xp, res, A_bar)   # J = J^T
    n = res.x.shape[-1]
    zero = xp.zeros_like(A_bar)
    P_bar = float(n) * xp.stack((zero, A_bar), axis=-1)
    x_bar = _anchor_vjp(xp, _plan_as(xp, res.plan, xp.float64), _wide(xp, sign * res.x), ANCHORS,
                        _wide(xp, P_bar), method)
    return sign * _narrow(xp, x_bar, res.x)


# --------------------------------------------------------------------------
# General anchors: the Sinkhorn plan and its KKT (Schur) backward
# --------------------------------------------------------------------------

def _centred(xp, x):
    """``x - mean(x)``: the plan, ``A`` and the Jacobian are unchanged (a shift
    of the scores is absorbed by the potentials), and the log-domain
    iterations see costs set by the spread of the scores, not their offset."""
    return x - xp.mean(x, axis=-1, keepdims=True)


def _anchor_cost(xp, xc, y):
    """``C_ij = (xc_i - y_j)^2`` for anchors ``y`` (Python floats), (..., n, m),
    and the differences ``xc_i - y_j`` (``dC_ij / dxc_i = 2 (xc_i - y_j)``)."""
    yy = xp.asarray(list(y), dtype=xc.dtype, device=backend.device(xc))
    diff = xc[..., :, None] - yy
    return diff * diff, diff


def _anchor_transport(xp, x, y, nu, eps, tol, max_iter):
    """Entropic plan between ``mu = 1/n`` and ``nu`` on anchors ``y`` for the
    centred scores (:func:`refimpl.sinkhorn.sinkhorn`, log domain)."""
    from .sinkhorn import sinkhorn

    n = x.shape[-1]
    C, _ = _anchor_cost(xp, _centred(xp, x), y)
    dev = backend.device(x)
    a = xp.full(tuple(x.shape), 1.0 / n, dtype=x.dtype, device=dev)
    b = xp.broadcast_to(xp.asarray(list(nu), dtype=x.dtype, device=dev),
                        tuple(x.shape[:-1]) + (len(nu),))
    if tol is None:
        tol = 1e-12 if backend.dtype_name(x.dtype) == "float64" else 1e-6
    max_iter = 100000 if max_iter is None else backend.check_int(max_iter, "max_iter", min=1)
    return sinkhorn(C, a, b, eps=eps, tol=backend.check_positive(tol, "tol"), max_iter=max_iter)


def _plan_diagnostics(plan) -> dict:
    """The per-row ``n_iter``, ``error``, ``converged`` of a batched Sinkhorn
    result (arrays of the batch shape).

    ``converged`` is the solver's own verdict, which is False for members the
    dtype cannot resolve at this ``eps`` (rounding floor >= 1; the solver warns).
    """
    return {"n_iter": plan.n_iter, "error": plan.error, "converged": plan.converged}


def _anchor_jvp(xp, plan, x, y, dx):
    """``dP`` from ``dC_ij = 2 (xc_i - y_j) dxc_i``, ``xc = x - mean(x)``
    (mu and nu do not depend on x)."""
    from .sinkhorn import sinkhorn_jvp

    _, diff = _anchor_cost(xp, _centred(xp, x), y)
    dC = 2.0 * diff * _centred(xp, dx)[..., :, None]
    return sinkhorn_jvp(plan, dC, None, None)


def _anchor_vjp(xp, plan, x, y, P_bar, method):
    """``xc_bar_i = 2 sum_j C_bar_ij (xc_i - y_j)`` with ``C_bar`` from the KKT
    (Schur-complement) VJP of the plan, then ``x_bar = xc_bar - mean(xc_bar)``
    (the adjoint of centring; ``sum(xc_bar) = 0`` already, since ``C_bar``
    has zero row and column sums, so this only removes round-off)."""
    from .sinkhorn import sinkhorn_vjp

    C_bar, _, _ = sinkhorn_vjp(plan, P_bar, method=method)
    _, diff = _anchor_cost(xp, _centred(xp, x), y)
    return _centred(xp, 2.0 * xp.sum(C_bar * diff, axis=-1))


# --------------------------------------------------------------------------
# Sorted top-k (beam search): m = k + 1 anchors
# --------------------------------------------------------------------------

def _sorted_anchors(n: int, k: int):
    """Anchors and column marginal of the sorted variant (largest=True)."""
    if k == n:                                           # no "rest" anchor of mass 0
        return tuple(float(j) for j in range(1, n + 1)), tuple(1.0 / n for _ in range(n))
    y = tuple(float(j) for j in range(k + 1))
    nu = ((n - k) / n,) + tuple(1.0 / n for _ in range(k))
    return y, nu


def soft_sorted_topk(x, k, *, eps, largest: bool = True, tol: float | None = None,
                     max_iter: int | None = None) -> SortedTopkResult:
    """Sorted SOFT top-k: soft one-hots of the k best scores, in rank order.

    Entropic OT of the scores onto ``m = k + 1`` anchors ``y = (0, 1, ...,
    k)`` with ``nu = ((n-k)/n, 1/n, ..., 1/n)``; ``A[..., :, r] =
    n Gamma[..., :, k - r]`` (column 0: the largest score for
    ``largest=True``, the smallest for ``largest=False``).

    Parameters
    ----------
    x : (..., n) scores.  k : int in ``[0, n]``.  eps : float > 0.
    largest : rank from the largest (default) or the smallest score.
    tol, max_iter : passed to :func:`refimpl.sinkhorn.sinkhorn` (defaults as
        in :func:`soft_topk`'s Sinkhorn path).

    Returns
    -------
    SortedTopkResult with ``A`` of shape (..., n, k).

    Examples
    --------
    >>> import numpy as np
    >>> res = soft_sorted_topk(np.array([0.3, 2.0, 1.1, -0.5]), 2, eps=0.2)
    >>> res.A.round(2).tolist()          # column r: soft one-hot of the (r+1)-th largest
    [[0.0, 0.02], [0.99, 0.01], [0.01, 0.97], [0.0, 0.0]]
    >>> bool(np.allclose(res.A.sum(0), 1.0))
    True
    """
    xp = _check_scores(x)
    n = x.shape[-1]
    k = _check_k(k, n)
    eps = _check_eps(xp, eps, x.dtype)
    largest = backend.check_flag(largest, "largest")
    y, nu = _sorted_anchors(n, k)
    if k == 0:
        A = xp.zeros(tuple(x.shape) + (0,), dtype=x.dtype, device=backend.device(x))
        return SortedTopkResult(A=A, plan=None, y=y, x=x, k=k, eps=eps, largest=largest,
                                **_exact_diagnostics(xp, x))
    xs = x if largest else -x
    _check_anchor_range(xp, _wide(xp, xs), y, eps)
    plan = _anchor_transport(xp, _wide(xp, xs), y, nu, eps, tol, max_iter)   # float64, as soft_topk
    A = _narrow(xp, float(n) * xp.flip(plan.P[..., len(y) - k:], axis=-1), x)
    plan = _plan_as(xp, plan, x.dtype)
    return SortedTopkResult(A=A, plan=plan, y=y, x=x, k=k, eps=eps, largest=largest,
                            **_plan_diagnostics(plan))


def _sorted_P_bar(xp, res: SortedTopkResult, A_bar):
    """Cotangent of the plan: ``P_bar[:, k - r] = n A_bar[:, r]``, 0 on the rest anchor."""
    n = res.x.shape[-1]
    cols = [xp.flip(A_bar, axis=-1)]
    if len(res.y) > res.k:
        cols.insert(0, xp.zeros_like(A_bar[..., :1]))
    return float(n) * xp.concat(cols, axis=-1)


def soft_sorted_topk_vjp(res: SortedTopkResult, A_bar, *, method: str = "schur"):
    """Reverse mode of :func:`soft_sorted_topk` through the KKT (Schur) route.

    Returns ``x_bar`` with the shape of ``x``.
    """
    backend.check_result(res, "res", SortedTopkResult, producer="soft_sorted_topk()")
    _check_backward_method(method)
    xp = backend.namespace(A=res.A, A_bar=A_bar)
    _check_cotangent(xp, A_bar, res.A, "A_bar")
    if res.k == 0:
        return xp.zeros_like(res.x)
    _warn_unconverged(res, "soft_sorted_topk_vjp")
    sign = 1.0 if res.largest else -1.0
    x_bar = _anchor_vjp(xp, _plan_as(xp, res.plan, xp.float64), _wide(xp, sign * res.x), res.y,
                        _wide(xp, _sorted_P_bar(xp, res, A_bar)), method)
    return sign * _narrow(xp, x_bar, res.x)


def soft_sorted_topk_jvp(res: SortedTopkResult, dx):
    """Forward mode of :func:`soft_sorted_topk`: ``dA`` of shape (..., n, k)."""
    backend.check_result(res, "res", SortedTopkResult, producer="soft_sorted_topk()")
    xp = backend.namespace(x=res.x, dx=dx)
    _check_cotangent(xp, dx, res.x, "dx")
    if res.k == 0:
        return xp.zeros_like(res.A)
    _warn_unconverged(res, "soft_sorted_topk_jvp")
    sign = 1.0 if res.largest else -1.0
    dP = _anchor_jvp(xp, _plan_as(xp, res.plan, xp.float64), _wide(xp, sign * res.x), res.y,
                     _wide(xp, sign * dx))
    return _narrow(xp, float(res.x.shape[-1]) * xp.flip(dP[..., len(res.y) - res.k:], axis=-1), res.x)


# --------------------------------------------------------------------------
# The eps -> 0 limit and the error bound
# --------------------------------------------------------------------------

def hard_topk(x, k, *, largest: bool = True):
    """The eps -> 0 limit of :func:`soft_topk`: 1 on the k best scores, 0
    elsewhere, and a tied group straddling the boundary shares its remaining
    slots evenly (``q`` slots among ``r`` equal scores: ``q / r`` each).

    Computed by counting, independently of the OT machinery:
    ``above_i = #{j : x_j > x_i}``, ``tied_i = #{j : x_j == x_i}``,
    ``A_i = clip(k - above_i, 0, tied_i) / tied_i``.  O(n^2) memory per row;
    meant for tests and small problems.
    """
    xp = _check_scores(x)
    k = _check_k(k, x.shape[-1])
    xs = x if backend.check_flag(largest, "largest") else -x
    xi, xj = xs[..., :, None], xs[..., None, :]
    above = xp.sum(xp.astype(xj > xi, x.dtype), axis=-1)
    tied = xp.sum(xp.astype(xj == xi, x.dtype), axis=-1)
    room = xp.clip(float(k) - above, 0.0, None)
    return xp.minimum(room, tied) / tied


def boundary_gap(x, k, *, largest: bool = True):
    """``delta = x_(k) - x_(k+1)`` per row (the gap at the top-k boundary;
    ``+inf`` for ``k = 0`` or ``k = n``), shape ``x.shape[:-1]``."""
    xp = _check_scores(x)
    n = x.shape[-1]
    k = _check_k(k, n)
    largest = backend.check_flag(largest, "largest")
    if k in (0, n):
        return xp.full(tuple(x.shape[:-1]), math.inf, dtype=x.dtype, device=backend.device(x))
    hi, lo = _boundary_pair(xp, x if largest else -x, k)
    return hi - lo


def soft_topk_error_bound(eps: float, delta: float, k: int, n: int, *,
                          anchors: tuple[float, float] = ANCHORS) -> float:
    """Upper bound on ``||A_eps - A_hard||_1`` for boundary gap ``delta``:

        2 max(k, n - k) exp(-(y_2 - y_1) delta / eps).

    Proof sketch: with ``a = theta - x_(k+1)``, ``b = x_(k) - theta``,
    ``a + b = delta``, the l1 error is ``2E`` where ``E`` is both the mass
    below the threshold, ``<= (n-k) exp(-a/t)``, and the deficit above it,
    ``<= k exp(-b/t)``; the smaller of the two is
    ``<= max(k, n-k) exp(-delta/(2t))`` and ``delta/(2t) = (y_2 - y_1) delta / eps``.
    Holds for ``delta = 0`` too (it then exceeds the trivial ``2 min(k, n-k)``).
    ``k = 0`` or ``k = n``: 0 (``A`` is exact).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([0.0, 0.3, 0.5, 1.0]); eps = 0.05
    >>> err = np.abs(soft_topk(x, 2, eps=eps).A - hard_topk(x, 2)).sum()
    >>> bool(err <= soft_topk_error_bound(eps, 0.2, 2, 4))
    True
    """
    eps = backend.check_positive(eps, "eps")
    n = backend.check_int(n, "n", min=1)
    k = _check_k(k, n)
    # +inf (the gap for k = 0 or n, from boundary_gap) is allowed
    try:
        is_inf = not isinstance(delta, (bool, str)) and float(delta) == math.inf
    except (TypeError, ValueError):
        is_inf = False
    delta = math.inf if is_inf else backend.check_positive(delta, "delta", allow_zero=True)
    y1, y2 = (float(a) for a in anchors)
    if not y2 > y1:
        raise ValueError(f"argument 'anchors' must be increasing, got {anchors!r}")
    if k in (0, n):
        return 0.0
    return 2.0 * max(k, n - k) * math.exp(-(y2 - y1) * delta / eps)
