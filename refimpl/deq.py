r"""Implicit (deep equilibrium) layers: fixed points, exact implicit gradients,
phantom gradients.

Definition
----------
An implicit layer outputs the fixed point ``z* = f(z*; theta)`` of a map
``f``.  The reference layer of this module is

    f(z) = tanh(W z + U x + b),      z* = f(z*),

with ``W`` (d, d), ``U`` (d, p), ``b`` (d,) and an input ``x`` (p,) or
batched ``x`` (..., p); parameter batch dimensions broadcast too.  It has a
unique fixed point whenever ``||W||_2 < 1`` (``|tanh'| <= 1``, so ``f`` is a
contraction), and often beyond.

Symbols (numerator layout)
--------------------------
``z`` the fixed point, ``g = z_bar = dL/dz`` the incoming cotangent,
``J = df/dz`` (d, d) and ``F = df/dtheta`` (d, P) at ``z``,
``D = diag(1 - f(z)^2)`` so that ``J = D W`` for the tanh layer,
``u`` the adjoint vector, ``lam`` the damping (weight on ``f``), ``k`` the
number of phantom steps, ``B = lam J + (1 - lam) I`` the damped Jacobian.

Forward
-------
:func:`fixed_point` solves ``z = f(z)`` by damped Picard iteration
``z <- lam f(z) + (1 - lam) z`` or by Anderson acceleration (type II, memory
``m``, same damping), per batch member, and stops a member when

    ||f(z) - z||_2 <= atol + tol * ||f(z)||_2      (norms over the last axis).

Converged members are frozen, so a batch gives exactly what a loop gives
(the iteration is run by :func:`refimpl.iteration.iterate`).  The result
reports per member ``n_iter``, ``error`` (the relative residual
``||f(z) - z|| / ||f(z)||``), ``converged`` and ``residual`` (the absolute
one); a member that does not converge has ``converged=False``, keeps the
residual reached and raises a :class:`~refimpl.backend.ConvergenceWarning`
naming how many members failed; a member whose map value becomes non-finite
is stopped and reported the same way.

Exact gradient (implicit function theorem)
------------------------------------------
Differentiating ``z = f(z; theta)`` gives ``dz = (I - J)^{-1} F dtheta``
(forward mode), hence in reverse mode

    (I - J^T) u = g,        theta_bar = F^T u.

For the tanh layer, with ``s = D u``:

    x_bar = U^T s,   W_bar = s z^T,   U_bar = s x^T,   b_bar = s,

summed over batch dimensions that a parameter was broadcast along, and

    dz = (I - J)^{-1} D (dW z + dU x + db + U dx).

``u`` comes from a dense solve (small ``d``) or from the linear fixed point
``u = J^T u + g`` solved with the same :func:`fixed_point` machinery (one
VJP ``v -> J^T v`` per iteration), with its tolerance exposed; the JVP uses
the same two solves with ``J`` for ``J^T``.  The dense solve also returns
``(I - J)^{-1}`` from its one factorisation and so reports the exact
``cond_1(I - J)``: ConditioningWarning above ``1 / sqrt(eps)``, ValueError
when singular to working precision.

Phantom gradients (Geng et al., 2021)
-------------------------------------
Replace ``u`` by a cheap estimate:

* NPG, truncated Neumann series:  ``u_k = lam sum_{i<k} (B^T)^i g``.
  Since ``I - J = (I - B) / lam``, ``(I - J)^{-1} = lam sum_i B^i`` and the
  error is exactly ``theta_bar - theta_bar_k = F^T (B^T)^k u``.  It tends to
  the exact gradient as ``k -> inf`` iff ``rho(B) < 1``, i.e. every
  eigenvalue ``mu`` of ``J`` has ``|1 - lam (1 - mu)| < 1``.
* UPG, damped unrolling: from ``h_0 = z`` (no gradient into it) take
  ``h_{t+1} = lam f(h_t) + (1 - lam) h_t`` for ``t < k`` and backpropagate
  from ``h_k``.  At an exact fixed point every ``h_t = z`` and UPG equals NPG.
* JFB (Jacobian-free backprop): ``u = g``; UPG and NPG with ``k = 1`` are
  ``lam`` times JFB.

Damping convention
------------------
Here ``lam`` is always the weight on ``f``: ``h <- lam f(h) + (1 - lam) h``,
``lam`` in (0, 1], ``lam = 1`` undamped.  Mapping to other names:

* Geng et al. (2021), "On Training Implicit Models": their ``lambda`` is our
  ``lam`` (damped unrolling ``h_{t+1} = lambda F(h_t) + (1 - lambda) h_t``);
  their ``k`` is our ``k``.
* TorchDEQ: ``tau`` (phantom-gradient damping, ``tau * f(z) + (1 - tau) * z``,
  and the Anderson solver's mixing) is our ``lam``; ``grad=k`` is our ``k``.
  Beware that TorchDEQ's Anderson argument called ``lam`` is its Tikhonov
  regularisation (our ``reg``), not a damping.
* optimistix: ``FixedPointIteration`` has no damping.  An
  ``AndersonAcceleration(mixing=beta)`` solver appears only in recent
  optimistix sources (not in every release: check yours); as read there it
  forms the next iterate as ``sum_i alpha_i (f_i + beta (y_i - f_i))``, so
  ``beta`` weights the *previous iterate*: ``beta = 1 - lam``.
* SciPy's ``scipy.optimize.fixed_point`` has no damping parameter.

Counting
--------
Every backward returns explicit counts in its result
(:class:`ImplicitVJPResult`): ``n_f_evals`` (evaluations of ``f``),
``n_vjp_z`` (products ``v -> J^T v``), ``n_vjp_theta`` (products
``v -> F^T v``) and ``n_stored_linearizations`` (how many linearisations of
``f`` are alive at once: ``k`` for UPG, 1 otherwise).  For ``k`` steps:

=========  =========  =============  ===============  =========
method     f evals    J^T products   F^T products     stored
=========  =========  =============  ===============  =========
exact      1          n_iter + 1     1                1
unroll     k          k - 1          k                k
neumann    1          k - 1          1                1
jfb        1          0              1                1
=========  =========  =============  ===============  =========

The dense exact solve forms ``J`` once instead (in closed form when the
linearisation provides it, else from ``n`` basis VJPs).  UPG's ``k``
products ``F(h_t)^T v_t`` are counted as ``k`` even where they are formed
as one product over the stacked steps (``implicit_vjp(stackable=True)``,
used by the tanh layer with a shared ``W``).  The f evaluation
at ``z`` itself is saved when ``f(z)`` is already known: :func:`deq_backward`
reuses the forward solver's last evaluation, so there the f-evaluation
counts are 0, ``k - 1``, 0 and 0.

Diagnostics
-----------
:func:`gradient_agreement` (cosine and norm ratio between a phantom and the
exact gradient), :func:`theorem1_check` (Theorem 1 of Geng et al.: with
``A`` the matrix of a phantom gradient ``p = A g`` and
``E = A (I - J^T) - F^T``, ``||E||_2 <= sigma_min^2 / sigma_max`` of ``F``
implies ``<p, theta_bar> >= 0``; the sharper ``||E||_2 <= sigma_min`` does
too, and then ``cos(p, theta_bar) >= (sigma_min - ||E||)/(sigma_min +
||E||)``), :func:`cosine_lower_bound`, :func:`phantom_matrix`,
:func:`neumann_rate` (``rho(B)``) and :func:`damping_threshold` (the
largest ``lam`` with ``rho(B) < 1``).

Broyden's method is not offered: Anderson acceleration (on the linear
backward problem, a restarted GMRES) already serves the forward and the
backward solves, and a limited-memory Broyden would add code without
changing any reference number.

References
----------
* Z. Geng, X.-Y. Zhang, S. Bai, Y. Wang, Z. Lin, "On Training Implicit
  Models", NeurIPS 2021 (phantom gradients, Theorem 1).
* S. Bai, J. Z. Kolter, V. Koltun, "Deep Equilibrium Models", NeurIPS 2019.
* S. W. Fung et al., "JFB: Jacobian-Free Backpropagation for Implicit
  Networks", AAAI 2022.
* H. F. Walker, P. Ni, "Anderson Acceleration for Fixed-Point Iterations",
  SIAM J. Numer. Anal. 49 (2011).

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> W = 0.5 * np.linalg.qr(rng.standard_normal((4, 4)))[0]   # ||W||_2 = 0.5
>>> U, b, x = rng.standard_normal((4, 3)), rng.standard_normal(4), rng.standard_normal(3)
>>> res = tanh_deq(x, W, U, b)
>>> bool(np.allclose(res.z, np.tanh(W @ res.z + U @ x + b), atol=1e-12))
True
>>> x_bar, W_bar, U_bar, b_bar = deq_vjp(res, np.ones(4))
>>> D = 1 - np.tanh(W @ res.z + U @ x + b) ** 2
>>> u = np.linalg.solve(np.eye(4) - (D[:, None] * W).T, np.ones(4))
>>> bool(np.allclose(b_bar, D * u))
True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import array_api_compat
import numpy as np

from . import backend
from .backend import ConditioningWarning, ConvergenceWarning, matvec, mT, solve_vec, sum_to_shape
from .iteration import Converging, Schedule, iterate

__all__ = [
    "DEFAULT_TOL",
    "FixedPointResult",
    "GradientAgreement",
    "ImplicitVJPResult",
    "Linearization",
    "TanhDEQResult",
    "Theorem1Result",
    "cosine_lower_bound",
    "damping_threshold",
    "deq_backward",
    "deq_jvp",
    "deq_vjp",
    "fixed_point",
    "gradient_agreement",
    "implicit_vjp",
    "neumann_rate",
    "phantom_matrix",
    "tanh_deq",
    "tanh_deq_jacobians",
    "theorem1_check",
]

#: Default relative tolerance of the forward and backward solvers per dtype
#: (reachable: about 4500 and 80 units of round-off respectively).
DEFAULT_TOL = {"float64": 1e-12, "float32": 1e-5}

#: Largest ``d`` for which ``solver="auto"`` solves the exact backward densely.
DENSE_MAX_D = 128

METHODS = ("exact", "unroll", "neumann", "jfb")
SOLVERS = ("anderson", "picard")


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def _finfo(dtype):
    return np.finfo(backend.dtype_name(dtype))


def _default_tol(dtype) -> float:
    return DEFAULT_TOL[backend.dtype_name(dtype)]


def _cond_limit(dtype) -> float:
    """Condition number of ``I - J`` above which a dense solve warns: beyond
    ``1 / sqrt(eps)`` more than half of the working digits are lost."""
    return 1.0 / math.sqrt(_finfo(dtype).eps)


def _check_lam(lam) -> float:
    """Damping in (0, 1] as a Python float (:func:`refimpl.backend.check_positive`,
    then the upper bound), naming 'lam'."""
    try:
        v = backend.check_positive(lam, "lam")
    except ValueError:
        v = math.nan
    if not v <= 1.0:
        raise ValueError(f"argument 'lam' (damping, weight on f) must lie in (0, 1], got {lam!r}")
    return v


def _rows_matvec(W, z):
    """``W z`` for every row of ``z`` (..., n); one GEMM ``z W^T`` when W is 2-D."""
    return z @ mT(W) if W.ndim == 2 else matvec(W, z)


def _rows_rmatvec(W, v):
    """``W^T v`` for every row of ``v`` (..., n); one GEMM ``v W`` when W is 2-D."""
    return v @ W if W.ndim == 2 else matvec(mT(W), v)


def _outer_to_shape(s, h, shape):
    """``sum over batch of s h^T`` reduced to ``shape`` (the adjoint of
    broadcasting a parameter of that shape).

    For an unbatched 2-D parameter this is one GEMM ``S^T H`` over the
    flattened batch, so the (batch, n, q) outer products are never formed.
    """
    xp = array_api_compat.array_namespace(s, h)
    bshape = tuple(np.broadcast_shapes(tuple(s.shape[:-1]), tuple(h.shape[:-1])))
    if len(shape) == 2:
        n, q = s.shape[-1], h.shape[-1]
        S = xp.reshape(xp.broadcast_to(s, bshape + (n,)), (-1, n))
        H = xp.reshape(xp.broadcast_to(h, bshape + (q,)), (-1, q))
        return mT(S) @ H
    return sum_to_shape(s[..., :, None] * h[..., None, :], tuple(shape))


def _norm_rows(v):
    xp = array_api_compat.array_namespace(v)
    return xp.linalg.vector_norm(v, axis=-1)


def _as_float(x) -> float:
    """Python float of a 0-d array (one device sync)."""
    return float(x)


# --------------------------------------------------------------------------
# Forward: fixed-point solvers
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class FixedPointResult(Converging):
    """Result of :func:`fixed_point`.

    Attributes
    ----------
    z : the final iterate (..., n); converged members are frozen at the first
        iterate that met the tolerance.
    fz : ``f(z)`` at that iterate (the backward linearises ``f`` there).
    n_iter : int64 array (batch shape ``z.shape[:-1]``, 0-d for one member),
        updates each member took (0 for a member that starts at its fixed
        point).
    error : array (batch shape), each member's relative residual
        ``||f(z) - z||_2 / ||f(z)||_2`` (0 where both vanish, inf where only
        ``f(z)`` does, inf for a member stopped by a non-finite f value).
    converged : bool array (batch shape), the member met
        ``||f(z) - z|| <= atol + tol ||f(z)||``.
    residual : array (batch shape), the absolute residual ``||f(z) - z||_2``
        (inf for a member stopped by a non-finite f value).
    n_f_evals : int, calls of ``f`` on the whole batch (``max n_iter + 1``
        plus up to ``check_every`` calls made after the last member finished).
    method, lam, tol, atol, m : the settings used.
    history : tuple of floats (max residual after each evaluation) when
        ``record_history=True``, else None.

    The whole-batch summary (``all_converged``, ``n_converged``,
    ``max_error``, ``max_n_iter``, ``summary()``) comes from
    :class:`refimpl.iteration.Converging`.
    """

    z: Any
    fz: Any
    n_iter: Any
    error: Any
    converged: Any
    residual: Any
    n_f_evals: int
    method: str
    lam: float
    tol: float
    atol: float
    m: int
    history: tuple | None = None


class _FixedPointState(NamedTuple):
    """State of :func:`fixed_point` (batch shape, or batch + ``(n,)``).

    ``dZ``, ``dG`` hold the last ``m`` differences of iterates and residuals
    (..., n_hist, n), one history length for the whole batch (a member's rows
    are its own differences; a frozen member's new ones are zero); ``dZ``,
    ``dG``, ``z_prev``, ``g_prev`` are None until Anderson needs them.
    """

    z: Any              # the iterate
    fz: Any             # f(z), replaced by z where it is not finite
    g: Any              # the residual f(z) - z
    r: Any              # ||g||
    nf: Any             # ||f(z)||
    converged: Any      # ||g|| <= atol + tol ||f(z)|| held (frozen from then on)
    failed: Any         # f(z) was not finite (frozen from then on)
    dZ: Any = None
    dG: Any = None
    z_prev: Any = None
    g_prev: Any = None


def _anderson_step(z, g, dZ, dG, lam: float, reg: float):
    """One type-II Anderson step from the differences of the last iterates.

    Solves ``min_gamma ||g - dG^T gamma||^2 + delta ||gamma||^2`` through
    the normal equations ``(dG dG^T + delta I) gamma = dG g`` with

        delta = max(reg, 4 n u) trace(dG dG^T) / n + smallest_normal

    (``n`` the history length, ``u`` the unit round-off).  The entries of the
    Gram matrix ``dG dG^T`` carry rounding errors up to about
    ``n u trace(dG dG^T) / n``; a shift below that (``reg = 1e-10`` in
    float32) leaves a rank-deficient Gram matrix singular in floating point.
    The floor keeps a frozen member, whose differences are exactly zero,
    finite.  Then

        z_new = z + lam g - (dZ + lam dG)^T gamma.

    A member whose system still fails (a LinAlgError, or a non-finite
    ``gamma``) takes the Picard step ``gamma = 0``.
    """
    xp = array_api_compat.array_namespace(z, dG)
    n = dG.shape[-2]
    M = dG @ mT(dG)                                            # (..., n, n)
    rhs = matvec(dG, g)                                        # (..., n)
    fi = _finfo(z.dtype)
    tiny = float(fi.smallest_normal)
    shift = max(reg, 4.0 * n * float(fi.eps) / 2.0)
    delta = shift * xp.sum(dG * dG, axis=(-2, -1)) / float(n) + tiny
    eye = xp.eye(n, dtype=z.dtype, device=backend.device(z))
    gamma = _solve_members(xp, M + delta[..., None, None] * eye, rhs)
    picard = z + lam * g
    z_new = picard - matvec(mT(dZ + lam * dG), gamma)
    ok = xp.all(xp.isfinite(z_new), axis=-1)[..., None]
    return xp.where(ok, z_new, picard)                         # Picard step where it failed


def _solve_members(xp, A, rhs):
    """``A^{-1} rhs`` (..., n); where the library raises a LinAlgError for the
    batch, member by member, with NaN for a member that fails on its own."""
    try:
        return solve_vec(A, rhs)
    except Exception as exc:  # numpy/strict/torch raise a LinAlgError; CuPy returns non-finite values
        if "LinAlgError" not in type(exc).__name__:          # torch's is _LinAlgError
            raise
    n = A.shape[-1]
    flat_A = xp.reshape(A, (-1, n, n))
    flat_b = xp.reshape(rhs, (-1, n))
    rows = []
    for k in range(flat_A.shape[0]):
        try:
            rows.append(solve_vec(flat_A[k, ...], flat_b[k, ...]))
        except Exception as exc:
            if "LinAlgError" not in type(exc).__name__:
                raise
            rows.append(xp.full_like(flat_b[k, ...], math.nan))
    return xp.reshape(xp.stack(rows, axis=0), tuple(rhs.shape))


def fixed_point(f: Callable, z0, *, method: str = "anderson", tol: float | None = None,
                atol: float = 0.0, max_iter: int = 500, lam: float = 1.0, m: int | None = None,
                reg: float | None = None, check_every: int | None = None, warn: bool = True,
                record_history: bool = False) -> FixedPointResult:
    """Solve ``z = f(z)`` for every batch member of ``z0`` (..., n).

    Parameters
    ----------
    f : callable mapping an array shaped like ``z0`` to one of the same
        shape, row by row (member ``i`` of ``f(z)`` depends only on member
        ``i`` of ``z``).
    z0 : starting point (..., n), float32 or float64.
    method : ``"anderson"`` (type-II Anderson acceleration with memory ``m``)
        or ``"picard"`` (``z <- lam f(z) + (1 - lam) z``).
    tol, atol : stop a member when ``||f(z) - z|| <= atol + tol ||f(z)||``;
        ``tol`` defaults to :data:`DEFAULT_TOL` of the dtype.
    max_iter : maximum number of updates.
    lam : damping in (0, 1], the weight on ``f`` (also Anderson's mixing).
    m : Anderson memory (default 5).
    reg : relative Tikhonov regularisation of Anderson's least squares
        (default 1e-10).  ``m`` and ``reg`` are Anderson's only: passing them
        with ``method="picard"`` is an error rather than silently ignored.
    check_every : read on the host whether any member is still iterating
        every this many iterations (default: the device policy's cadence,
        :meth:`refimpl.backend.DevicePolicy.sync_cadence` with 8 on a device
        where each read waits for queued work, else 1); each member's test
        and its freezing happen on the device at every iteration, so only
        ``n_f_evals`` depends on it.
    warn : raise a ConvergenceWarning when some member did not converge.
    record_history : keep the max residual after every evaluation (one sync
        per iteration).

    Returns
    -------
    FixedPointResult
        with per-member ``n_iter``, ``error`` (the relative residual
        ``||f(z) - z|| / ||f(z)||``), ``converged`` and ``residual`` (the
        absolute one).  Members that did not converge raise one
        ConvergenceWarning naming how many they are (when ``warn``).

    Raises
    ------
    TypeError, ValueError : bad ``z0``, ``method``, tolerances, ``lam``,
        ``m`` or ``max_iter``, or ``f`` returning an array of another shape.

    Notes
    -----
    Iteration 0 evaluates ``f(z0)``; each further iteration updates the
    active members and evaluates ``f`` again (one call on the whole batch),
    run by :func:`refimpl.iteration.iterate`.  A member stops at the first
    evaluation that passes its test or is not finite, so a batch gives what
    a loop over its members gives.

    Examples
    --------
    >>> import numpy as np
    >>> res = fixed_point(np.cos, np.zeros(1))
    >>> bool(abs(np.cos(res.z[0]) - res.z[0]) < 1e-11), bool(res.converged)
    (True, True)
    >>> two = fixed_point(np.cos, np.array([[0.0], [0.7390851332151607]]))
    >>> two.n_iter.tolist(), two.summary()["all_converged"]      # the second starts at the root
    ([10, 0], True)
    """
    backend.check_array(z0, "z0", min_ndim=1)
    xp = array_api_compat.array_namespace(z0)
    backend.check_choice(method, "method", SOLVERS)
    warn = backend.check_flag(warn, "warn")
    record_history = backend.check_flag(record_history, "record_history")
    tol = _default_tol(z0.dtype) if tol is None else backend.check_positive(tol, "tol", allow_zero=True)
    atol = backend.check_positive(atol, "atol", allow_zero=True)
    if tol == 0.0 and atol == 0.0:
        raise ValueError("arguments 'tol' and 'atol' are both 0: the solver could never stop")
    max_iter = backend.check_int(max_iter, "max_iter", min=0)
    lam = _check_lam(lam)
    if method == "picard" and (m is not None or reg is not None):
        raise ValueError("arguments 'm' and 'reg' apply only to method='anderson'")
    m = 5 if m is None else backend.check_int(m, "m", min=1)
    reg = 1e-10 if reg is None else backend.check_positive(reg, "reg")
    sync_every = (backend.policy_of(z0).sync_cadence(8) if check_every is None
                  else backend.check_int(check_every, "check_every", min=1))
    st, diag, n_f_evals, history = _solve_fixed_point(f, z0, method=method, tol=tol, atol=atol,
                                                max_iter=max_iter, lam=lam, m=m, reg=reg,
                                                sync_every=sync_every,
                                                record_history=record_history)
    # The final state holds each member's values at its last evaluation (0-d
    # NumPy operations return scalars: asarray keeps the arrays of the convention).
    res = FixedPointResult(
        z=st.z, fz=st.fz, n_iter=diag.n_iter, error=diag.error, converged=diag.converged,
        residual=xp.asarray(xp.where(st.failed, math.inf, st.r)), n_f_evals=n_f_evals,
        method=method, lam=lam, tol=tol, atol=atol, m=m, history=history)
    if warn and not res.all_converged:
        n_fail = int(xp.sum(xp.astype(st.failed, xp.int64)))
        why = f" ({n_fail} with a non-finite f value)" if n_fail else ""
        warnings.warn(
            f"fixed_point ({method}, lam={lam}) did not converge for "
            f"{res.size - res.n_converged} of {res.size} member(s){why} after at most "
            f"{res.max_n_iter} iterations: largest relative residual {res.max_error:.3e} > "
            f"tol {tol:.1e} (atol {atol:.1e})", ConvergenceWarning, stacklevel=2)
    return res


def _evaluate(f, st: _FixedPointState, live, tol: float, atol: float) -> _FixedPointState:
    """``f`` at ``st.z`` and the stopping test of the members ``live``.

    A member whose f value is not finite stops as failed; its ``f`` is
    replaced by ``z`` so that nothing downstream sees NaN/Inf.  Members not
    ``live`` keep their values (``f`` is evaluated on the whole batch).
    """
    z = st.z
    xp = array_api_compat.array_namespace(z)
    fz_raw = f(z)
    if not array_api_compat.is_array_api_obj(fz_raw) or tuple(fz_raw.shape) != tuple(z.shape):
        shape = getattr(fz_raw, "shape", None)
        raise ValueError(f"argument 'f' returned shape {shape}, expected {tuple(z.shape)} like 'z0'")
    if fz_raw.dtype != z.dtype:
        raise TypeError(f"argument 'f' returned dtype {backend.dtype_name(fz_raw.dtype)} for "
                        f"a {backend.dtype_name(z.dtype)} 'z0' (no silent up- or down-cast)")
    finite = xp.all(xp.isfinite(fz_raw), axis=-1)
    fz = xp.where(finite[..., None], fz_raw, z)
    g = fz - z                                                 # residual f(z) - z
    r, nf = _norm_rows(g), _norm_rows(fz)
    lv = live[..., None]
    return st._replace(
        fz=xp.where(lv, fz, st.fz), g=xp.where(lv, g, st.g), r=xp.where(live, r, st.r),
        nf=xp.where(live, nf, st.nf),
        converged=st.converged | (live & finite & (r <= atol + tol * nf)),
        failed=st.failed | (live & ~finite))


def _update(st: _FixedPointState, live, method: str, lam: float, m: int,
            reg: float) -> _FixedPointState:
    """One damped Picard (``z <- z + lam g``) or Anderson update of the
    members ``live``; the Anderson history is appended for every member."""
    xp = array_api_compat.array_namespace(st.z)
    z, g, dZ, dG = st.z, st.g, st.dZ, st.dG
    if method == "picard":
        z_new = z + lam * g                                    # lam f(z) + (1 - lam) z
    else:
        if st.z_prev is not None:
            # Append the newest differences, keep the last m (oldest first).
            new_dz, new_dg = (z - st.z_prev)[..., None, :], (g - st.g_prev)[..., None, :]
            if dZ is None:
                dZ, dG = new_dz, new_dg
            else:
                start = 1 if dZ.shape[-2] == m else 0
                dZ = xp.concat([dZ[..., start:, :], new_dz], axis=-2)
                dG = xp.concat([dG[..., start:, :], new_dg], axis=-2)
        z_new = z + lam * g if dG is None else _anderson_step(z, g, dZ, dG, lam, reg)
    return st._replace(z=xp.where(live[..., None], z_new, z),
                       dZ=dZ, dG=dG,
                       z_prev=None if method == "picard" else z,
                       g_prev=None if method == "picard" else g)


def _fixed_point_error(xp, st: _FixedPointState):
    """``(error, converged, failed)`` per member: the relative residual
    ``||f(z) - z|| / ||f(z)||`` (0 where both vanish, inf where only ``f(z)``
    does or ``f`` failed) and the two stopping flags."""
    res = xp.where(st.failed, math.inf, st.r)
    safe_nf = xp.where(st.nf > 0, st.nf, 1.0)
    rel = xp.where(st.nf > 0, res / safe_nf,
                   xp.where(res > 0, xp.full_like(st.nf, math.inf), 0.0))
    return rel, st.converged, st.failed


def _solve_fixed_point(f, z0, *, method, tol, atol, max_iter, lam, m, reg, sync_every,
                       record_history):
    """Run :func:`fixed_point`'s iteration: evaluation 0 at ``z0``, then up to
    ``max_iter`` (update, evaluation) steps under :func:`refimpl.iteration.iterate`.

    Returns ``(state, Diagnostics, n_f_evals, history)``; the diagnostics
    count each member's updates (0 for a member that passes at ``z0``).
    """
    xp = array_api_compat.array_namespace(z0)
    dev = backend.device(z0)
    bshape = tuple(z0.shape[:-1])
    no = xp.zeros(bshape, dtype=xp.bool, device=dev)
    zero = xp.zeros(bshape, dtype=z0.dtype, device=dev)
    history: list[float] = []                                  # filled when record_history
    n_f_evals = 0

    def evaluate(st, live):
        nonlocal n_f_evals
        st = _evaluate(f, st, live, tol, atol)
        n_f_evals += 1
        if record_history:
            history.append(_as_float(xp.max(xp.where(st.failed, math.inf, st.r))))
        return st

    def advance(st, active, k):
        for _ in range(k):
            st = evaluate(_update(st, active, method, lam, m, reg), active)
        return st

    st = _FixedPointState(z=z0, fz=z0, g=xp.zeros_like(z0), r=zero, nf=zero, converged=no,
                          failed=no)
    st = evaluate(st, ~no)                                     # iteration 0: f(z0)
    # Check 0 measures evaluation 0: members that pass at z0 stop with n_iter = 0.
    st, diag = iterate(advance, lambda s: _fixed_point_error(xp, s), st, batch=bshape, like=z0,
                    schedule=Schedule(max_iter=max_iter, sync_every=sync_every, measure_initial=True))
    return st, diag, n_f_evals, tuple(history) if record_history else None


# --------------------------------------------------------------------------
# Generic implicit VJP for a user-supplied f
# --------------------------------------------------------------------------

class Linearization(NamedTuple):
    """``f`` evaluated and linearised at a point ``h``.

    ``fz = f(h)``; ``vjp_z(v) = J(h)^T v``; ``vjp_theta(v) = F(h)^T v`` as a
    tuple of parameter cotangents (already summed over batch dimensions a
    parameter was broadcast along); ``jacobian()`` (optional) the dense
    ``J(h)`` (..., n, n).
    """

    fz: Any
    vjp_z: Callable
    vjp_theta: Callable
    jacobian: Callable | None = None


@dataclass(frozen=True)
class ImplicitVJPResult(Converging):
    """Result of :func:`implicit_vjp` / :func:`deq_backward`.

    Attributes
    ----------
    theta_bar : tuple of parameter cotangents (for the tanh layer
        ``(x_bar, W_bar, U_bar, b_bar)``).
    u : the adjoint vector used, ``theta_bar = F^T u`` (exact: the solution of
        ``(I - J^T) u = g``; neumann: ``u_k``; jfb: ``g``; unroll: None, since
        UPG linearises at ``k`` different points).
    method, k, lam, solver : what was computed (k, lam None where unused).
    n_f_evals, n_vjp_z, n_vjp_theta, n_stored_linearizations : the counts of
        the module docstring's table.
    n_iter, error, converged, residual : per member (arrays of the batch
        shape ``z.shape[:-1]``), those of the iterative exact backward's
        linear fixed point ``u = J^T u + g`` (:class:`FixedPointResult`:
        ``error`` the relative residual, ``residual`` the absolute one);
        ``0, 0, True, 0`` for the other methods and the dense solve.  The
        whole-batch summary comes from :class:`refimpl.iteration.Converging`.
    condition : 1-norm condition number ``||I - J||_1 ||(I - J)^{-1}||_1``
        (max over members) for the dense exact solve, else None; within a
        factor ``n`` of the 2-norm one either way.
    """

    theta_bar: tuple
    u: Any
    method: str
    k: int | None
    lam: float | None
    solver: str | None
    n_f_evals: int
    n_vjp_z: int
    n_vjp_theta: int
    n_stored_linearizations: int
    n_iter: Any
    error: Any
    converged: Any
    residual: Any
    condition: float | None = None

    @property
    def n_vjp(self) -> int:
        """Total VJP products, ``n_vjp_z + n_vjp_theta``."""
        return self.n_vjp_z + self.n_vjp_theta


def _no_solve(g) -> dict:
    """The diagnostics of a backward without an iterative solve, per member of
    ``g`` (..., n): ``n_iter = 0``, ``error = residual = 0``, ``converged``."""
    xp = array_api_compat.array_namespace(g)
    batch, dev = tuple(g.shape[:-1]), backend.device(g)
    zero = xp.zeros(batch, dtype=g.dtype, device=dev)
    return {"n_iter": xp.zeros(batch, dtype=xp.int64, device=dev), "error": zero,
            "converged": xp.ones(batch, dtype=xp.bool, device=dev), "residual": zero}


def _as_linearization(out) -> Linearization:
    if isinstance(out, Linearization):
        return out
    if isinstance(out, tuple) and len(out) in (3, 4):
        return Linearization(*out)
    raise TypeError("argument 'f_vjp' must return a Linearization or a tuple "
                    "(f(h), vjp_z, vjp_theta[, jacobian])")


def _add_bars(a: tuple | None, b: tuple) -> tuple:
    if a is None:
        return tuple(b)
    return tuple(x if y is None else (y if x is None else x + y) for x, y in zip(a, b))


def _resolve_method_args(method, k, lam, solver, solver_opts: dict):
    """Validate the backward's options; reject options the method ignores
    (an option that is silently ignored is a bug report waiting to happen)."""
    backend.check_choice(method, "method", METHODS)
    if method != "exact":
        for name, val in dict(solver_opts, solver=solver).items():
            if val is not None:
                raise ValueError(f"argument {name!r} applies only to method='exact', "
                                 f"not to method={method!r}")
    if method in ("unroll", "neumann"):
        k = 5 if k is None else backend.check_int(k, "k", min=1)
        lam = 0.5 if lam is None else _check_lam(lam)
        return k, lam, None
    for name, val in (("k", k), ("lam", lam)):
        if val is not None:
            raise ValueError(f"argument {name!r} applies only to method='unroll' or "
                             f"'neumann', not to method={method!r}")
    if method == "jfb":
        return None, None, None
    return None, None, _check_solver("auto" if solver is None else solver)


def _check_solver(solver: str) -> str:
    return backend.check_choice(solver, "solver", ("auto", "dense") + SOLVERS)


# --- the linear system (I - K) v = r of the exact VJP (K = J^T) and the JVP (K = J)

def _linear_solver(solver: str, n: int, dense_available: bool, tol, atol, max_iter, m) -> str:
    """Resolve ``solver="auto"``: dense when ``K`` is available densely, ``n <=
    DENSE_MAX_D`` and no iterative option was given, else Anderson; reject
    iterative options for ``"dense"``."""
    opts = {"tol": tol, "atol": atol, "max_iter": max_iter, "m": m}
    if solver == "auto":
        iterative = any(v is not None for v in opts.values())
        solver = "dense" if (dense_available and n <= DENSE_MAX_D and not iterative) else "anderson"
    if solver == "dense":
        for name, val in opts.items():
            if val is not None:
                raise ValueError(f"argument {name!r} applies to the iterative solvers, "
                                 f"not to solver='dense'")
    return solver


def _dense_solve(A, r, *, transpose: bool):
    """Solve ``A^T v = r`` (``transpose``) or ``A v = r`` with ``A = I - J``
    (..., n, n); return ``(v, cond)``, ``cond = max over members of
    cond_1(A) = ||A||_1 ||A^{-1}||_1`` (LAPACK's and SciPy's norm for rcond).

    One factorisation serves both: the right-hand side is ``[r | I]``, so the
    solve returns the inverse alongside ``v`` and the exact condition number
    costs about one inversion (2-3x less than the singular values would).
    ``cond_2 / n <= cond_1 <= n cond_2``.  ValueError when ``A`` is singular
    to working precision (``cond_1 eps >= 1``), ConditioningWarning when
    ``cond_1 > 1 / sqrt(eps)``.
    """
    xp = array_api_compat.array_namespace(A, r)
    n = A.shape[-1]
    bshape = tuple(np.broadcast_shapes(tuple(A.shape[:-2]), tuple(r.shape[:-1])))
    M = xp.broadcast_to(mT(A) if transpose else A, bshape + (n, n))
    rhs = xp.concat([xp.broadcast_to(r, bshape + (n,))[..., None],
                     xp.broadcast_to(backend.eye_like(A, n), bshape + (n, n))], axis=-1)
    try:
        X = xp.linalg.solve(M, rhs)                            # [v | M^{-1}]
    except np.linalg.LinAlgError:
        raise ValueError("I - J is singular (exactly zero pivot): the exact implicit "
                         "derivative is undefined at this point") from None
    # ||A^{-1}||_1 is the largest column sum of |A^{-1}|, i.e. the largest row sum of |A^{-T}|.
    inv_norm = xp.max(xp.sum(xp.abs(X[..., 1:]), axis=-1 if transpose else -2), axis=-1)
    cond = _as_float(xp.max(xp.max(xp.sum(xp.abs(A), axis=-2), axis=-1) * inv_norm))
    if not (math.isfinite(cond) and cond * float(_finfo(A.dtype).eps) < 1.0):
        raise ValueError(f"I - J is singular to working precision (cond_1 {cond:.2e}): the "
                         f"exact implicit derivative is undefined at this point")
    if cond > _cond_limit(A.dtype):
        warnings.warn(f"I - J is ill-conditioned (cond_1 = {cond:.2e}); the implicit "
                      f"derivative may be inaccurate", ConditioningWarning, stacklevel=3)
    return X[..., 0], cond


def _iterative_solve(apply, r, *, solver, tol, atol, max_iter, m, warn, who) -> FixedPointResult:
    """The linear fixed point ``v = K v + r`` (``apply(v) = K v``) from ``v_0 =
    r`` by :func:`fixed_point`; warns when it does not converge."""
    sol = fixed_point(lambda v: apply(v) + r, r, method=solver, tol=tol,
                      atol=0.0 if atol is None else atol,
                      max_iter=1000 if max_iter is None else max_iter, m=m, warn=False)
    if warn and not sol.all_converged:
        warnings.warn(
            f"{who} ({solver}) did not converge for {sol.size - sol.n_converged} of "
            f"{sol.size} member(s) after at most {sol.max_n_iter} iterations (largest relative "
            f"residual {sol.max_error:.3e}); the returned derivative is inaccurate there. If J "
            f"has an eigenvalue near or beyond 1, use solver='anderson' or 'dense'",
            ConvergenceWarning, stacklevel=3)
    return sol


def implicit_vjp(f_vjp: Callable, z, z_bar, *, method: str = "exact", k: int | None = None,
                 lam: float | None = None, solver: str | None = None, tol: float | None = None,
                 atol: float | None = None, max_iter: int | None = None, m: int | None = None,
                 fz=None, stackable: bool = False, warn: bool = True) -> ImplicitVJPResult:
    """Exact or phantom VJP of the fixed point ``z = f(z; theta)`` of any ``f``.

    ``theta_bar = F^T u`` with ``(I - J^T) u = z_bar`` ("exact"), or the
    phantom estimates of the module docstring, where ``J = df/dz`` and
    ``F = df/dtheta`` are only ever applied through the user's VJPs.

    Parameters
    ----------
    f_vjp : callable ``f_vjp(h)``, and ``f_vjp(h, fh)`` when ``fz`` or
        ``stackable`` is used, returning a :class:`Linearization` (or the
        plain tuple ``(fh, vjp_z, vjp_theta[, jacobian])``) of ``f`` at
        ``h`` (..., n):

        * ``fh = f(h)`` (when ``fh`` is passed in, return it unchanged);
        * ``vjp_z(v) = J(h)^T v``, shaped like ``h``;
        * ``vjp_theta(v) = F(h)^T v`` as a tuple with one cotangent per
          parameter (or None for none), each shaped like its parameter, i.e.
          summed over the batch axes that parameter was broadcast along;
        * ``jacobian()`` (optional): the dense ``J(h)`` (..., n, n), used by
          the dense exact solve (else ``J`` is built from ``n`` calls of
          ``vjp_z``).

        ``f_vjp`` is called at ``z`` (every method) and, for "unroll", at the
        ``k - 1`` further unrolled points.
    z : the fixed point (..., n), or a :class:`FixedPointResult` (then a VJP of
        an unconverged forward warns; its ``fz`` is *not* used unless passed
        as ``fz``).
    z_bar : cotangent ``g = dL/dz``, shaped like ``z``.
    method : ``"exact"``, ``"unroll"`` (UPG), ``"neumann"`` (NPG) or ``"jfb"``.
    k, lam : phantom steps (default 5) and damping in (0, 1] (default 0.5,
        the paper's setting); only for ``"unroll"``/``"neumann"`` (passing them
        to another method is an error, not silently ignored).
    solver : exact only: ``"auto"`` (dense if a ``jacobian`` is available and
        ``n <= DENSE_MAX_D`` and no iterative option is given, else Anderson),
        ``"dense"``, ``"anderson"`` or ``"picard"`` for the linear fixed point
        ``u = J^T u + g``.
    tol, atol, max_iter, m : exact iterative only: tolerances of that linear
        fixed point (``tol`` defaults to :data:`DEFAULT_TOL`, ``max_iter`` to 1000).
    fz : ``f(z)`` when already known (the forward solver's last evaluation);
        ``f_vjp`` is then called as ``f_vjp(z, fz)`` at ``z`` and must use it
        instead of evaluating ``f`` (one evaluation fewer, counted as such).
    stackable : declares that ``f_vjp`` also accepts ``k`` points stacked on a
        new leading axis, ``f_vjp(H, f(H))`` with ``H`` of shape
        ``(k,) + z.shape``, and that its ``vjp_theta`` then sums over that
        axis too.  "unroll" then forms ``sum_t F(h_t)^T v_t`` in one call
        (for the tanh layer one matrix product of inner dimension
        ``k * batch`` instead of ``k`` products and ``k - 1`` additions);
        the result is the same up to round-off and the counts are unchanged
        (``n_vjp_theta`` counts products ``F(h_t)^T v_t``, not calls).  The
        other methods apply ``F^T`` at ``z`` only and do not use it.
    warn : warn (ConvergenceWarning) about an unconverged forward or backward
        solve; ``ConditioningWarning`` and errors are always raised.

    Returns
    -------
    ImplicitVJPResult
        with ``theta_bar`` and the counts.  A backward solve that does not
        converge warns (ConvergenceWarning) and reports ``converged=False``;
        the dense solve warns (ConditioningWarning) when ``I - J`` is
        ill-conditioned and raises ValueError when it is singular.

    Examples
    --------
    A linear map ``f(h) = A h + c`` with ``theta = (c,)``: ``c_bar = u``.

    >>> import numpy as np
    >>> A, c = np.array([[0.5, 0.2], [-0.1, 0.3]]), np.array([1.0, -2.0])
    >>> def f_vjp(h, fh=None):
    ...     fh = A @ h + c if fh is None else fh
    ...     return Linearization(fh, lambda v: A.T @ v, lambda v: (v,), lambda: A)
    >>> z, g = np.linalg.solve(np.eye(2) - A, c), np.array([1.0, 1.0])
    >>> (c_bar,) = implicit_vjp(f_vjp, z, g).theta_bar
    >>> bool(np.allclose((np.eye(2) - A.T) @ c_bar, g))
    True
    """
    if not callable(f_vjp):
        raise TypeError(f"argument 'f_vjp' must be callable, got {type(f_vjp).__name__}")
    warn = backend.check_flag(warn, "warn")
    stackable = backend.check_flag(stackable, "stackable")
    forward = None
    if isinstance(z, FixedPointResult):
        forward, z = z, z.z
    backend.namespace(z=z, z_bar=z_bar)
    backend.check_array(z, "z", min_ndim=1)
    backend.check_array(z_bar, "z_bar")
    if tuple(z_bar.shape) != tuple(z.shape):
        raise ValueError(f"argument 'z_bar' has shape {tuple(z_bar.shape)}, expected {tuple(z.shape)} like 'z'")
    k, lam, solver = _resolve_method_args(method, k, lam, solver,
                                          dict(tol=tol, atol=atol, max_iter=max_iter, m=m))
    if forward is not None and not forward.all_converged and warn:
        warnings.warn(
            f"VJP of a fixed point unconverged for {forward.size - forward.n_converged} of "
            f"{forward.size} member(s) (largest relative residual {forward.max_error:.3e}): the "
            f"{method} gradient assumes z = f(z) and is unreliable there",
            ConvergenceWarning, stacklevel=2)
    if fz is not None:
        backend.namespace(z=z, fz=fz)
        if tuple(fz.shape) != tuple(z.shape):
            raise ValueError(f"argument 'fz' has shape {tuple(fz.shape)}, expected {tuple(z.shape)}")
    return _implicit_vjp(f_vjp, z, z_bar, method=method, k=k, lam=lam, solver=solver,
                         tol=tol, atol=atol, max_iter=max_iter, m=m, fz=fz, warn=warn,
                         stackable=bool(stackable))


def _implicit_vjp(f_vjp, z, g, *, method, k, lam, solver, tol, atol, max_iter, m, fz, warn,
                  stackable=False):
    # The linearisation at z reuses a known f(z) (no evaluation) when given.
    lin_z = _as_linearization(f_vjp(z) if fz is None else f_vjp(z, fz))
    n_f0 = 1 if fz is None else 0
    if method == "unroll":
        # Forward: h_0 = z (no gradient into it), h_{t+1} = lam f(h_t) + (1 - lam) h_t,
        # keeping the linearisations at h_0 .. h_{k-1} (the "stored graph").
        hs, lins = [z], [lin_z]
        for _ in range(k - 1):
            hs.append(lam * lins[-1].fz + (1.0 - lam) * hs[-1])
            lins.append(_as_linearization(f_vjp(hs[-1])))
        # Backward from h_k: a_k = g, a_t = lam J(h_t)^T a_{t+1} + (1 - lam) a_{t+1};
        # step t contributes F(h_t)^T v_t with v_t = lam a_{t+1}.
        vs, a = [None] * k, g
        for t in range(k - 1, -1, -1):
            vs[t] = lam * a
            if t > 0:
                a = lam * lins[t].vjp_z(a) + (1.0 - lam) * a
        if stackable and k > 1:
            # sum_t F(h_t)^T v_t as one VJP at the k points stacked on a new axis.
            xp = array_api_compat.array_namespace(z)
            lin_all = _as_linearization(f_vjp(xp.stack(hs), xp.stack([lin.fz for lin in lins])))
            theta_bar = tuple(lin_all.vjp_theta(xp.stack(vs)))
        else:
            theta_bar = None
            for t in range(k - 1, -1, -1):
                theta_bar = _add_bars(theta_bar, lins[t].vjp_theta(vs[t]))
        return ImplicitVJPResult(theta_bar, None, method, k, lam, None,
                                 n_f_evals=k - 1 + n_f0, n_vjp_z=k - 1, n_vjp_theta=k,
                                 n_stored_linearizations=k, **_no_solve(g))

    lin = lin_z
    if method == "jfb":
        return ImplicitVJPResult(tuple(lin.vjp_theta(g)), g, method, None, None, None,
                                 n_f_evals=n_f0, n_vjp_z=0, n_vjp_theta=1,
                                 n_stored_linearizations=1, **_no_solve(g))
    if method == "neumann":
        # u_k = lam sum_{i<k} (B^T)^i g,  B^T v = lam J^T v + (1 - lam) v.
        v, s = g, g
        for _ in range(k - 1):
            v = lam * lin.vjp_z(v) + (1.0 - lam) * v
            s = s + v
        u = lam * s
        return ImplicitVJPResult(tuple(lin.vjp_theta(u)), u, method, k, lam, None,
                                 n_f_evals=n_f0, n_vjp_z=k - 1, n_vjp_theta=1,
                                 n_stored_linearizations=1, **_no_solve(g))

    # -- exact: (I - J^T) u = g -------------------------------------------------
    n = z.shape[-1]
    solver = _linear_solver(solver, n, lin.jacobian is not None, tol, atol, max_iter, m)
    if solver == "dense":
        if lin.jacobian is not None:
            J, n_vjp_z = lin.jacobian(), 0
        else:
            # J[..., i, :] = (J^T e_i)^T: one VJP per basis vector.
            xp = array_api_compat.array_namespace(g)
            eye = backend.eye_like(g, n)
            J = xp.stack([lin.vjp_z(xp.broadcast_to(eye[i, :], tuple(g.shape)))
                          for i in range(n)], axis=-2)
            n_vjp_z = n
        u, cond = _dense_solve(backend.eye_like(g, n) - J, g, transpose=True)
        return ImplicitVJPResult(tuple(lin.vjp_theta(u)), u, method, None, None, "dense",
                                 n_f_evals=n_f0, n_vjp_z=n_vjp_z, n_vjp_theta=1,
                                 n_stored_linearizations=1, condition=cond, **_no_solve(g))
    # Linear fixed point u = J^T u + g, started from u_0 = g.
    sol = _iterative_solve(lin.vjp_z, g, solver=solver, tol=tol, atol=atol, max_iter=max_iter,
                           m=m, warn=warn, who="exact backward")
    return ImplicitVJPResult(tuple(lin.vjp_theta(sol.z)), sol.z, method, None, None, solver,
                             n_f_evals=n_f0, n_vjp_z=sol.n_f_evals, n_vjp_theta=1,
                             n_stored_linearizations=1, n_iter=sol.n_iter, error=sol.error,
                             converged=sol.converged, residual=sol.residual)


# --------------------------------------------------------------------------
# The reference layer z = tanh(W z + U x + b)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class TanhDEQResult(Converging):
    """Result of :func:`tanh_deq`.

    Attributes
    ----------
    z : the fixed point (..., d).
    x, W, U, b : the inputs (references, never modified).
    solve : the :class:`FixedPointResult` (``fz``, per-member diagnostics).

    The per-member ``n_iter``, ``error`` (relative residual), ``converged``
    and ``residual`` (absolute), and ``n_f_evals``, read through to
    ``solve``; the whole-batch summary comes from
    :class:`refimpl.iteration.Converging`.
    """

    z: Any
    x: Any
    W: Any
    U: Any
    b: Any
    solve: FixedPointResult

    @property
    def n_iter(self):
        return self.solve.n_iter

    @property
    def error(self):
        return self.solve.error

    @property
    def converged(self):
        return self.solve.converged

    @property
    def residual(self):
        return self.solve.residual

    @property
    def n_f_evals(self) -> int:
        return self.solve.n_f_evals


def _check_layer(x, W, U, b):
    """Validate the layer's inputs; return (xp, batch shape, d)."""
    xp = backend.namespace(x=x, W=W, U=U, b=b)
    backend.check_array(x, "x", min_ndim=1)
    backend.check_array(W, "W", min_ndim=2)
    backend.check_array(U, "U", min_ndim=2)
    backend.check_array(b, "b", min_ndim=1)
    dts = {name: backend.dtype_name(a.dtype) for name, a in (("x", x), ("W", W), ("U", U), ("b", b))}
    if len(set(dts.values())) != 1:
        raise TypeError(f"arguments must share one dtype, got {dts}")
    d = W.shape[-1]
    if W.shape[-2] != d:
        raise ValueError(f"argument 'W' must be square (..., d, d), got shape {tuple(W.shape)}")
    if U.shape[-2] != d:
        raise ValueError(f"argument 'U' must have {d} rows like 'W' (shape (..., {d}, p)), "
                         f"got shape {tuple(U.shape)}")
    if x.shape[-1] != U.shape[-1]:
        raise ValueError(f"argument 'x' has length {x.shape[-1]} in its last axis but 'U' "
                         f"has {U.shape[-1]} columns")
    if b.shape[-1] != d:
        raise ValueError(f"argument 'b' must have length {d} like 'W', got shape {tuple(b.shape)}")
    shapes = {"x": tuple(x.shape[:-1]), "W": tuple(W.shape[:-2]), "U": tuple(U.shape[:-2]),
              "b": tuple(b.shape[:-1])}
    try:
        bshape = tuple(np.broadcast_shapes(*shapes.values()))
    except ValueError:
        raise ValueError(f"batch shapes do not broadcast: {shapes}") from None
    return xp, bshape, d


def _tanh_linearization(x, W, U, b) -> Callable:
    """``f_vjp`` of ``f(h) = tanh(W h + U x + b)`` (see :class:`Linearization`);
    ``f_vjp(h, fh)`` linearises at ``h`` with a known ``fh = f(h)``.  ``h`` may
    carry extra leading axes (e.g. stacked unrolled points), over which
    ``vjp_theta`` sums like over any broadcast batch axis (``stackable``)."""
    c = _rows_matvec(U, x) + b                                 # U x + b, computed once

    def f_vjp(h, fh=None) -> Linearization:
        if fh is None:
            fh = backend.namespace(h=h).tanh(_rows_matvec(W, h) + c)
        D = 1.0 - fh * fh                                      # tanh' at W h + U x + b

        def vjp_z(v):                                          # J^T v = W^T (D v)
            return _rows_rmatvec(W, D * v)

        def vjp_theta(v):                                      # s = D v
            s = D * v
            return (sum_to_shape(_rows_rmatvec(U, s), tuple(x.shape)),     # U^T s
                    _outer_to_shape(s, h, tuple(W.shape)),                 # s h^T
                    _outer_to_shape(s, x, tuple(U.shape)),                 # s x^T
                    sum_to_shape(s, tuple(b.shape)))                       # s

        def jacobian():                                        # J = D W
            return D[..., :, None] * W

        return Linearization(fh, vjp_z, vjp_theta, jacobian)

    return f_vjp


def tanh_deq(x, W, U, b, *, method: str = "anderson", tol: float | None = None,
             atol: float = 0.0, max_iter: int = 500, lam: float = 1.0, m: int | None = None,
             z0=None, check_every: int | None = None, warn: bool = True,
             record_history: bool = False) -> TanhDEQResult:
    """Fixed point of the reference implicit layer ``z = tanh(W z + U x + b)``.

    Parameters
    ----------
    x : (..., p) input(s).
    W : (..., d, d); ``||W||_2 < 1`` guarantees a unique fixed point.
    U : (..., d, p).
    b : (..., d).
        Batch dimensions of all four broadcast.
    method, tol, atol, max_iter, lam, m, check_every, warn, record_history :
        passed to :func:`fixed_point` (Anderson by default).
    z0 : starting point, default zeros (broadcast batch shape + (d,)).

    Returns
    -------
    TanhDEQResult
        ``converged=False`` for the members the solver stopped at
        ``max_iter``, plus a ConvergenceWarning naming how many they are.

    Raises
    ------
    TypeError : non-array or non-float inputs, mixed dtypes.
    ValueError : NaN/Inf, mismatched shapes, bad solver settings.
    """
    xp, bshape, d = _check_layer(x, W, U, b)
    if z0 is None:
        z0 = xp.zeros(bshape + (d,), dtype=W.dtype, device=backend.device(W))
    else:
        backend.namespace(z0=z0, W=W)
        backend.check_array(z0, "z0")
        if tuple(z0.shape) != bshape + (d,):
            raise ValueError(f"argument 'z0' has shape {tuple(z0.shape)}, expected {bshape + (d,)}")
    c = _rows_matvec(U, x) + b                                 # U x + b, computed once

    def f(z):
        return xp.tanh(_rows_matvec(W, z) + c)

    sol = fixed_point(f, z0, method=method, tol=tol, atol=atol, max_iter=max_iter, lam=lam,
                      m=m, check_every=check_every, warn=False, record_history=record_history)
    if warn and not sol.all_converged:
        warnings.warn(
            f"tanh_deq: the {method} solver did not converge for {sol.size - sol.n_converged} "
            f"of {sol.size} member(s) after at most {sol.max_n_iter} iterations (largest "
            f"relative residual {sol.max_error:.3e} > tol {sol.tol:.1e}); "
            f"||W||_2 >= 1 may allow no or several fixed points. Try method='anderson', "
            f"damping lam < 1 or a larger max_iter", ConvergenceWarning, stacklevel=2)
    return TanhDEQResult(z=sol.z, x=x, W=W, U=U, b=b, solve=sol)


def deq_backward(res: TanhDEQResult, z_bar, *, method: str = "exact", k: int | None = None,
                 lam: float | None = None, solver: str | None = None, tol: float | None = None,
                 atol: float | None = None, max_iter: int | None = None, m: int | None = None,
                 warn: bool = True) -> ImplicitVJPResult:
    """VJP of :func:`tanh_deq` with its counts and diagnostics.

    Same arguments as :func:`deq_vjp`; returns the full
    :class:`ImplicitVJPResult` (``theta_bar = (x_bar, W_bar, U_bar, b_bar)``).
    The layer is linearised at ``res.z``; a VJP of an unconverged forward
    warns (ConvergenceWarning).
    """
    backend.check_result(res, "res", TanhDEQResult, producer="tanh_deq()")
    f_vjp = _tanh_linearization(res.x, res.W, res.U, res.b)
    # The forward's last evaluation f(z) linearises the layer at z: no new f evaluation.
    # With a shared (2-D) W, UPG's k products s_t h_t^T for W_bar are one GEMM over the
    # stacked steps; a batched W would need a (k, ..., d, d) temporary, so it is not stacked.
    return implicit_vjp(f_vjp, res.solve, z_bar, method=method, k=k, lam=lam, solver=solver,
                        tol=tol, atol=atol, max_iter=max_iter, m=m, fz=res.solve.fz,
                        stackable=res.W.ndim == 2, warn=warn)


def deq_vjp(res: TanhDEQResult, z_bar, *, method: str = "exact", k: int | None = None,
            lam: float | None = None, solver: str | None = None, tol: float | None = None,
            atol: float | None = None, max_iter: int | None = None, m: int | None = None,
            warn: bool = True):
    """Reverse mode of :func:`tanh_deq`: ``(x_bar, W_bar, U_bar, b_bar)``.

    Parameters
    ----------
    res : the forward's result.
    z_bar : cotangent ``dL/dz`` shaped like ``res.z``.
    method :
        ``"exact"``: ``(I - J^T) u = z_bar``, dense for ``d <= DENSE_MAX_D``
        (``solver="auto"``) else Anderson on ``u = J^T u + z_bar``;
        ``"unroll"``: UPG with ``k`` damped steps; ``"neumann"``: NPG
        ``u_k = lam sum_{i<k} (B^T)^i z_bar``; ``"jfb"``: ``u = z_bar``.
    k, lam : phantom steps (default 5) and damping (default 0.5); rejected
        for "exact" and "jfb".
    solver, tol, atol, max_iter, m : the exact backward's solver and its
        tolerance (rejected for phantom methods).

    Returns
    -------
    tuple ``(x_bar, W_bar, U_bar, b_bar)`` shaped like ``(x, W, U, b)``;
    parameter gradients are summed over the batch.  Use :func:`deq_backward`
    for the counts of f evaluations and VJPs.
    """
    return deq_backward(res, z_bar, method=method, k=k, lam=lam, solver=solver, tol=tol,
                        atol=atol, max_iter=max_iter, m=m, warn=warn).theta_bar


def deq_jvp(res: TanhDEQResult, dx=None, dW=None, dU=None, db=None, *, solver: str = "auto",
            tol: float | None = None, atol: float | None = None, max_iter: int | None = None,
            m: int | None = None):
    """Forward mode of :func:`tanh_deq`: ``dz = (I - J)^{-1} D (dW z + dU x + db + U dx)``.

    Tangents may be None (zero).  ``solver``: ``"auto"`` (dense for
    ``d <= DENSE_MAX_D``), ``"dense"``, ``"anderson"`` or ``"picard"`` (the
    linear fixed point ``v = J v + r``; ``tol``/``atol``/``max_iter``/``m``
    apply).  The same solves as the exact VJP: the dense one warns
    (ConditioningWarning) when ``I - J`` is ill-conditioned and raises
    ValueError when it is singular; an iterative one that does not converge
    warns (ConvergenceWarning).
    """
    backend.check_result(res, "res", TanhDEQResult, producer="tanh_deq()")
    xp = backend.namespace(z=res.z, dx=dx, dW=dW, dU=dU, db=db)
    for name, t, ref in (("dx", dx, res.x), ("dW", dW, res.W), ("dU", dU, res.U), ("db", db, res.b)):
        if t is not None:
            backend.check_array(t, name)
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"argument {name!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
    _check_solver(solver)
    if not res.all_converged:
        warnings.warn(f"JVP of a fixed point unconverged for {res.size - res.n_converged} of "
                      f"{res.size} member(s) (largest relative residual {res.max_error:.3e}): "
                      f"the implicit derivative is unreliable there", ConvergenceWarning,
                      stacklevel=2)
    z, fz = res.z, res.solve.fz
    D = 1.0 - fz * fz
    r = xp.zeros_like(z)                                       # dW z + dU x + db + U dx
    if dW is not None:
        r = r + matvec(dW, z)
    if dU is not None:
        r = r + matvec(dU, res.x)
    if db is not None:
        r = r + db
    if dx is not None:
        r = r + _rows_matvec(res.U, dx)
    r = D * r
    d = z.shape[-1]
    solver = _linear_solver(solver, d, True, tol, atol, max_iter, m)
    if solver == "dense":                                      # (I - J) dz = r, J = D W
        return _dense_solve(backend.eye_like(z, d) - D[..., :, None] * res.W, r, transpose=False)[0]
    # Linear fixed point dz = J dz + r.
    return _iterative_solve(lambda v: D * _rows_matvec(res.W, v), r, solver=solver, tol=tol,
                            atol=atol, max_iter=max_iter, m=m, warn=True, who="deq_jvp").z


# --------------------------------------------------------------------------
# Dense Jacobians and phantom matrices (diagnostics, small d)
# --------------------------------------------------------------------------

def tanh_deq_jacobians(res: TanhDEQResult):
    """Dense ``J = df/dz`` (..., d, d) and ``F = df/dtheta`` (..., d, P) at ``res.z``.

    ``theta`` is ``(x, W, U, b)`` flattened in that order (row-major), so
    ``P = p + d^2 + d p + d``:

        F = D [ U | I (x) z^T | I (x) x^T | I ].

    Per member: with shared parameters the layer's parameter gradient is the
    sum over members of ``F_i^T u_i``.
    """
    backend.check_result(res, "res", TanhDEQResult, producer="tanh_deq()")
    xp = array_api_compat.array_namespace(res.z)
    z, x, W, U = res.z, res.x, res.W, res.U
    D = 1.0 - res.solve.fz * res.solve.fz
    d, p = W.shape[-1], U.shape[-1]
    bshape = tuple(z.shape[:-1])
    eye = backend.eye_like(z, d)
    xb = xp.broadcast_to(x, bshape + (p,))
    Ub = xp.broadcast_to(U, bshape + (d, p))
    blocks = [
        Ub,                                                                         # d pre / dx
        xp.reshape(eye[:, :, None] * z[..., None, None, :], bshape + (d, d * d)),  # d pre / dW
        xp.reshape(eye[:, :, None] * xb[..., None, None, :], bshape + (d, d * p)),  # d pre / dU
        xp.broadcast_to(eye, bshape + (d, d)),                                     # d pre / db
    ]
    F = D[..., :, None] * xp.concat(blocks, axis=-1)
    J = D[..., :, None] * xp.broadcast_to(W, bshape + (d, d))
    return J, F


def phantom_matrix(J, F, *, method: str, k: int | None = None, lam: float | None = None):
    """The matrix ``A`` (..., P, d) with ``theta_bar = A g`` for a method.

    exact: ``F^T (I - J^T)^{-1}``; neumann and unroll at an exact fixed point:
    ``F^T lam sum_{i<k} (B^T)^i``; jfb: ``F^T``.
    """
    xp = backend.namespace(J=J, F=F)
    backend.check_array(J, "J", min_ndim=2)
    backend.check_array(F, "F", min_ndim=2)
    n = J.shape[-1]
    if J.shape[-2] != n:
        raise ValueError(f"argument 'J' must be square (..., d, d), got shape {tuple(J.shape)}")
    if F.shape[-2] != n:
        raise ValueError(f"argument 'F' must have d = {n} rows like 'J' (shape (..., d, P)), "
                         f"got shape {tuple(F.shape)}")
    try:
        backend.broadcast_shapes(tuple(J.shape[:-2]), tuple(F.shape[:-2]))
    except ValueError:
        raise ValueError(f"batch shapes of 'J' {tuple(J.shape[:-2])} and 'F' "
                         f"{tuple(F.shape[:-2])} do not broadcast") from None
    k, lam, _ = _resolve_method_args(method, k, lam, None, {})
    eye = backend.eye_like(J, n)
    Ft = mT(F)
    if method == "exact":
        try:
            A = mT(backend.solve(eye - J, F))                 # ((I - J)^{-1} F)^T
        except Exception as exc:                              # a library's LinAlgError
            if "LinAlgError" not in type(exc).__name__:
                raise
            A = None
        if A is None or not backend.all_true(xp.isfinite(A)):
            raise ValueError("argument 'J': I - J is singular to working precision, the exact "
                             "implicit gradient does not exist")
        return A
    if method == "jfb":
        return Ft
    Bt = mT(lam * J + (1.0 - lam) * eye)
    S, P = eye, eye
    for _ in range(k - 1):
        P = P @ Bt
        S = S + P
    return Ft @ (lam * S)


@dataclass(frozen=True)
class GradientAgreement:
    """``cosine = <p, e> / (||p|| ||e||)``, ``norm_ratio = ||p|| / ||e||``,
    ``rel_error = ||p - e|| / ||e||`` over all arrays concatenated."""

    cosine: float
    norm_ratio: float
    rel_error: float


def gradient_agreement(phantom, exact) -> GradientAgreement:
    """Cosine, norm ratio and relative error of ``phantom`` against ``exact``.

    Both are arrays or tuples of arrays (None = zero), e.g. the outputs of
    :func:`deq_vjp`; they are compared as one long vector.

    Raises
    ------
    TypeError : an entry is not a float32/float64 array (or None), or the
        two mix dtypes.
    ValueError : the tuples differ in length or shapes, an entry holds NaN
        or Inf, or ``exact`` is zero (every measure is relative to it).
        A zero ``phantom`` has cosine 0 (no alignment), ratio 0, error 1.
    """
    ps = phantom if isinstance(phantom, tuple) else (phantom,)
    es = exact if isinstance(exact, tuple) else (exact,)
    if len(ps) != len(es):
        raise ValueError(f"'phantom' has {len(ps)} arrays but 'exact' has {len(es)}")
    for i, (p, e) in enumerate(zip(ps, es)):
        named = {f"phantom[{i}]": p, f"exact[{i}]": e}
        if p is not None or e is not None:
            backend.namespace(**named)                   # one library, one device, one dtype
        for name, a in named.items():
            if a is not None:
                backend.check_array(a, name, allow_empty=True)
    pp = ee = pe = dd = 0.0
    for i, (p, e) in enumerate(zip(ps, es)):
        if p is None and e is None:
            continue
        ref = p if p is not None else e
        xp = array_api_compat.array_namespace(ref)
        p = xp.zeros_like(e) if p is None else p
        e = xp.zeros_like(p) if e is None else e
        if tuple(p.shape) != tuple(e.shape):
            raise ValueError(f"phantom[{i}] has shape {tuple(p.shape)} but exact[{i}] has {tuple(e.shape)}")
        pp += _as_float(xp.sum(p * p))
        ee += _as_float(xp.sum(e * e))
        pe += _as_float(xp.sum(p * e))
        dd += _as_float(xp.sum((p - e) * (p - e)))
    npn, nen = math.sqrt(pp), math.sqrt(ee)
    if not nen > 0:
        raise ValueError("argument 'exact' is zero: cosine, norm ratio and relative error "
                         "against it are undefined")
    cos = pe / (npn * nen) if npn > 0 else 0.0
    return GradientAgreement(cos, npn / nen, math.sqrt(dd) / nen)


# --------------------------------------------------------------------------
# Theory: Theorem 1, the cosine bound, convergence of the Neumann series
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Theorem1Result:
    """Theorem 1 of Geng et al. (2021) evaluated on one instance.

    ``E = A (I - J^T) - F^T`` (P, d); ``E_norm = ||E||_2``; ``sigma_min``,
    ``sigma_max`` the extreme singular values of ``F`` (d, P), ``sigma_min =
    0`` when ``P < d``.  ``paper_condition``: ``E_norm <= sigma_min^2 /
    sigma_max`` (the theorem's hypothesis); ``sharp_condition``: ``E_norm <=
    sigma_min``; either implies ``<A g, exact> >= 0`` for every ``g``.
    ``cosine_bound``: the guaranteed cosine (``-1`` when vacuous).
    """

    E_norm: float
    sigma_min: float
    sigma_max: float
    paper_bound: float
    paper_condition: bool
    sharp_condition: bool
    cosine_bound: float


def cosine_lower_bound(E_norm: float, sigma_min: float) -> float:
    """``(sigma_min - ||E||) / (sigma_min + ||E||)`` when ``||E|| < sigma_min``, else -1.

    Derivation (``w = (I - J^T)^{-1} g``, exact ``e = F^T w``, phantom
    ``p = e + E w``): ``<p, e> >= ||e||^2 - ||E|| ||w|| ||e||`` and
    ``||p|| <= ||e|| + ||E|| ||w||``, so with ``r = ||e|| / ||w|| >= sigma_min``,
    ``cos >= (r - ||E||) / (r + ||E||)``, increasing in ``r``.

    This is the note's bound; it is valid but not tight.  ``p`` lies in the
    ball of radius ``||E|| ||w||`` around ``e``, so the worst case is the
    tangent direction, ``cos >= sqrt(1 - (||E|| / sigma_min)^2)``, which is
    larger and is attained (tests build the instance).
    """
    E_norm = backend.check_positive(E_norm, "E_norm", allow_zero=True)
    sigma_min = backend.check_positive(sigma_min, "sigma_min", allow_zero=True)
    if E_norm >= sigma_min:
        return -1.0
    return (sigma_min - E_norm) / (sigma_min + E_norm)


def theorem1_check(A, J, F) -> Theorem1Result:
    """Evaluate Theorem 1's condition and the cosine bound for one instance.

    Parameters
    ----------
    A : (P, d) the phantom gradient's matrix, ``phantom = A g``
        (e.g. :func:`phantom_matrix`).
    J : (d, d) ``df/dz`` at the fixed point.
    F : (d, P) ``df/dtheta`` at the fixed point.

    In the paper's notation ``A (I - dF/dh) - dF/dtheta``; here in numerator
    layout that is ``A (I - J^T) - F^T``.
    """
    xp = backend.namespace(A=A, J=J, F=F)
    for name, a in (("A", A), ("J", J), ("F", F)):
        backend.check_array(a, name, ndim=2)
    d, P = J.shape[-1], F.shape[-1]
    if tuple(J.shape) != (d, d) or tuple(F.shape) != (d, P) or tuple(A.shape) != (P, d):
        raise ValueError(f"expected J (d, d), F (d, P), A (P, d); got J {tuple(J.shape)}, "
                         f"F {tuple(F.shape)}, A {tuple(A.shape)}")
    E = A @ (backend.eye_like(J, d) - mT(J)) - mT(F)
    E_norm = _as_float(xp.linalg.svdvals(E)[0])
    s = xp.linalg.svdvals(F)
    s_max = _as_float(s[0])
    s_min = _as_float(s[d - 1]) if P >= d else 0.0
    paper_bound = s_min * s_min / s_max if s_max > 0 else 0.0
    return Theorem1Result(E_norm, s_min, s_max, paper_bound, E_norm <= paper_bound,
                          E_norm <= s_min, cosine_lower_bound(E_norm, s_min))


def _eigvals_host(J):
    backend.check_array(J, "J", min_ndim=2)
    if J.shape[-1] != J.shape[-2]:
        raise ValueError(f"argument 'J' must be square, got shape {tuple(J.shape)}")
    return np.linalg.eigvals(backend.to_host(J).astype(np.float64))


def neumann_rate(J, lam: float) -> float:
    """Spectral radius of ``B = lam J + (1 - lam) I`` (max over members).

    The Neumann series / damped unrolling converges to the exact gradient as
    ``k -> inf`` iff this is < 1; its error decays like ``rate^k``.
    Eigenvalues are computed on the host (NumPy), as the standard has no
    non-symmetric eigensolver.
    """
    lam = _check_lam(lam)
    mu = _eigvals_host(J)
    return float(np.max(np.abs(1.0 - lam * (1.0 - mu))))


def damping_threshold(J) -> float:
    """Supremum of the ``lam > 0`` with ``rho(lam J + (1 - lam) I) < 1``.

    With ``w = 1 - mu`` for each eigenvalue ``mu`` of ``J``,
    ``|1 - lam w| < 1  <=>  lam < 2 Re(w) / |w|^2`` (needs ``Re(w) > 0``), so
    the threshold is ``min_mu 2 Re(1 - mu) / |1 - mu|^2`` (0 when some
    ``Re(mu) >= 1``: no damping helps).  Every ``lam`` in ``(0, min(1,
    threshold))`` makes the phantom gradients converge; undamped (``lam = 1``)
    works iff the threshold exceeds 1, i.e. (for real spectra) no eigenvalue
    is ``<= -1``.  Max over members is not meaningful, so ``J`` is one
    matrix or the minimum over a batch is returned.
    """
    w = 1.0 - _eigvals_host(J)
    if np.any(w.real <= 0):
        return 0.0
    return float(np.min(2.0 * w.real / np.abs(w) ** 2))
