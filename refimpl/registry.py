"""The one list of refimpl's operators and the checks run on each of them.

Every consumer iterates over this registry: ``refimpl verify`` (the CLI),
the test suite (``tests/test_registry.py`` runs every case on every
backend), the golden-vector exporter and ``validate``.  A new operator is
added in one place: write a ``_<name>_spec()`` builder below and list it in
``_BUILDERS``.

An :class:`OpSpec` says how to call the operator (forward, VJP, JVP), how its
inputs batch, where its independent forward oracle is, which directions are
feasible, how to canonicalise a gradient before comparing it (gauges), and
its tolerances per dtype.  A :class:`Case` is a named, seeded input
generator with flags describing the edge it exercises.

:func:`verify_case` runs, for one case on one backend and dtype:

``forward``     the primary output against the oracle (computed on the host
                in float64 from the same, dtype-rounded, inputs);
``converged``   the result's own convergence flag, when it has one;
``adjoint``     the dot-product test of JVP against VJP;
``fd_jvp``/``fd_vjp``  JVP/VJP against Richardson-extrapolated central
                differences of the float64 forward along a feasible direction
                (so a float32 gradient is measured against the true
                derivative, not against float32 differences);
``batch``       a batch gives what a loop over its members gives (forward
                and VJP; broadcast inputs get the sum of member gradients);
``no_mutation`` no input or cotangent was modified;
plus the operator's own ``extra_checks`` (closed forms, invariants, and the
defining formulas of surrogate gradients, for which finite differences do
not apply).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import backend as _backend
from .backend import Backend, get_backend, to_host
from .check import CheckResult, DEFAULT_FD_STEP, adjoint_test, compare, fd_jacobian_check

__all__ = [
    "Case",
    "CaseRun",
    "OpSpec",
    "Tolerance",
    "all_specs",
    "get_spec",
    "member_scale",
    "scaled_normal",
    "verify_case",
]


# --------------------------------------------------------------------------
# Specification objects
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    """Error bounds of each check for one dtype (normalised errors, see check.py)."""

    forward: float
    adjoint: float
    fd: float
    batch: float


@dataclass(frozen=True)
class Case:
    """A curated, seeded input.

    ``make(rng)`` returns the array inputs as float64 NumPy arrays keyed by
    the spec's input names; ``params`` are the forward's keyword arguments,
    ``vjp_params``/``jvp_params`` those of the derivatives.  ``tol`` holds
    partial per-dtype overrides, e.g. ``{"float64": {"fd": 1e-7}}``.
    """

    id: str
    description: str
    seed: int
    make: Callable[[np.random.Generator], dict]
    params: Mapping[str, Any] = field(default_factory=dict)
    vjp_params: Mapping[str, Any] = field(default_factory=dict)
    jvp_params: Mapping[str, Any] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    tol: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    dtypes: tuple[str, ...] = _backend.SUPPORTED_DTYPES
    fd_step: float = DEFAULT_FD_STEP


@dataclass(frozen=True)
class OpSpec:
    """One operator: how to call it, check it, and compare its gradients.

    Attributes
    ----------
    name, description : registry key and one line for tables.
    inputs : names of the array arguments, in call order.
    core_ndim : number of non-batch dimensions of each input.
    output : attribute of the forward's result holding the primary output.
    output_core_ndim : its number of non-batch dimensions.
    forward : ``forward(*arrays, **params) -> result``.
    vjp : ``vjp(result, out_bar, **vjp_params) -> tuple of input cotangents``.
    jvp : ``jvp(result, *tangents, **jvp_params) -> output tangent`` or None.
    oracle : ``oracle(*host_float64_arrays, **params) -> host output``, an
        independent route to the forward (SciPy, a closed form), or None.
    cases : the curated cases.
    tol : ``{"float64": Tolerance, "float32": Tolerance}``.
    tangents : ``tangents(rng, host_inputs) -> tuple of host directions`` along
        which finite differences are taken (default: standard normal).
    cotangent : ``cotangent(rng, host_output, host_inputs) -> host array``
        (default: standard normal).
    canonicalize : ``canonicalize(bars) -> bars``: gauge fixing (Sinkhorn's
        ``(c, -c)`` freedom) or projection onto the constraint set (symmetric
        parts for SPD inputs) applied before gradients are compared, here and
        in ``validate`` (default: identity).
    candidate_params : keyword parameters a foreign candidate receives in
        ``validate`` (DESIGN.md's calling convention, e.g. ``("eps",)``).
    surrogate : True when the "VJP" is a surrogate gradient (identity,
        phantom): no adjoint or finite-difference check, its extra_checks
        compare against the defining formula instead.
    extra_checks : callables ``check(run: CaseRun) -> list[CheckResult]``.
    """

    name: str
    description: str
    inputs: tuple[str, ...]
    core_ndim: tuple[int, ...]
    output: str
    output_core_ndim: int
    forward: Callable
    vjp: Callable
    jvp: Callable | None
    oracle: Callable | None
    cases: tuple[Case, ...]
    tol: Mapping[str, Tolerance]
    tangents: Callable | None = None
    cotangent: Callable | None = None
    canonicalize: Callable | None = None
    surrogate: bool = False
    extra_checks: tuple[Callable, ...] = ()
    candidate_params: tuple[str, ...] = ()

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise KeyError(f"operator {self.name!r} has no case {case_id!r}; "
                       f"cases: {', '.join(c.id for c in self.cases)}")

    def tolerance(self, case: Case, dtype: str) -> Tolerance:
        return dataclasses.replace(self.tol[dtype], **dict(case.tol.get(dtype, {})))


@dataclass
class CaseRun:
    """Everything an extra check needs about one executed case."""

    spec: OpSpec
    case: Case
    backend: Backend
    dtype: str
    host: dict          # float64 host inputs (already rounded to dtype)
    arrays: tuple       # backend inputs in dtype, call order
    result: Any         # the forward's result
    rng: np.random.Generator
    tol: Tolerance

    @property
    def output(self):
        return getattr(self.result, self.spec.output)

    def asarray(self, a, dtype: str | None = None):
        return self.backend.asarray(a, dtype or self.dtype)


# --------------------------------------------------------------------------
# Running the checks
# --------------------------------------------------------------------------

def _failed(check: str, exc: BaseException) -> CheckResult:
    return CheckResult(check, math.inf, 0.0, False, f"{type(exc).__name__}: {exc}")


def _make_host(spec: OpSpec, case: Case, dtype: str, rng) -> dict:
    raw = case.make(rng)
    missing = set(spec.inputs) - set(raw)
    if missing:
        raise KeyError(f"case {case.id!r} of {spec.name!r} makes no {sorted(missing)}")
    # Round once to the working dtype so oracle and operator see the same numbers.
    return {k: np.asarray(raw[k], dtype=np.float64).astype(dtype).astype(np.float64)
            for k in spec.inputs}


def member_scale(x: np.ndarray, core_ndim: int) -> np.ndarray:
    """max |x| over each batch member's core dimensions (1 where a member is 0),
    shaped to broadcast against ``x``."""
    axes = tuple(range(x.ndim - core_ndim, x.ndim))
    s = np.max(np.abs(x), axis=axes, keepdims=True) if x.size else np.ones((1,) * x.ndim)
    return np.where(s > 0, s, 1.0)


def scaled_normal(rng: np.random.Generator, x: np.ndarray, core_ndim: int) -> np.ndarray:
    """A random direction for ``x`` whose batch members are scaled like ``x``'s.

    Finite differences take one step along the whole direction; scaling each
    member by its own size makes that step relative for every member, so a
    batch mixing scales 1e-6 and 1e3 is differenced accurately throughout.
    """
    return rng.standard_normal(x.shape) * member_scale(x, core_ndim)


def _canon(spec: OpSpec, bars) -> tuple:
    bars = tuple(bars)
    return tuple(spec.canonicalize(bars)) if spec.canonicalize else bars


def _batch_shape(spec: OpSpec, host: dict) -> tuple[int, ...]:
    shapes = [host[k].shape[: host[k].ndim - c] for k, c in zip(spec.inputs, spec.core_ndim)]
    return tuple(np.broadcast_shapes(*shapes))


def _sum_to_shape_host(a: np.ndarray, shape: tuple) -> np.ndarray:
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True) if axes else a


def _check_batch(spec: OpSpec, case: Case, be: Backend, dtype: str, host: dict,
                 res, v_host: np.ndarray, tol: float) -> CheckResult:
    """Batch == loop, for the forward output and every input's cotangent."""
    bshape = _batch_shape(spec, host)
    bars = _canon(spec, spec.vjp(res, be.asarray(v_host, dtype), **case.vjp_params))
    out = to_host(getattr(res, spec.output))
    bars_h = [to_host(b) if b is not None else None for b in bars]
    loop_out = np.zeros_like(out)
    loop_bars = [np.zeros(bshape + host[k].shape[host[k].ndim - c:])
                 for k, c in zip(spec.inputs, spec.core_ndim)]
    for idx in itertools.product(*(range(n) for n in bshape)):
        member = []
        for k, c in zip(spec.inputs, spec.core_ndim):
            full = np.broadcast_to(host[k], bshape + host[k].shape[host[k].ndim - c:])
            member.append(be.asarray(np.ascontiguousarray(full[idx]), dtype))
        r = spec.forward(*member, **case.params)
        loop_out[idx] = to_host(getattr(r, spec.output))
        mb = _canon(spec, spec.vjp(r, be.asarray(v_host[idx], dtype), **case.vjp_params))
        for i, b in enumerate(mb):
            if b is not None:
                loop_bars[i][idx] = to_host(b)
    errs = [compare(out, loop_out, rtol=tol)]
    for i, (k, b) in enumerate(zip(spec.inputs, bars_h)):
        if b is not None:
            errs.append(compare(b, _sum_to_shape_host(loop_bars[i], host[k].shape), rtol=tol))
    worst = max(errs, key=lambda r: r.error)
    return CheckResult("batch", worst.error, tol, all(e.passed for e in errs),
                       f"{int(np.prod(bshape))} members")


def verify_case(spec: OpSpec, case: Case, *, backend: str | Backend = "numpy",
                dtype: str = "float64") -> list[CheckResult]:
    """Run every applicable check of ``case`` and return the results.

    Exceptions raised by the operator are reported as failed checks (with
    the exception text), never propagated, so one broken case does not hide
    the others.
    """
    be = get_backend(backend) if isinstance(backend, str) else backend
    if dtype not in _backend.SUPPORTED_DTYPES:
        raise ValueError(f"argument 'dtype' must be one of {_backend.SUPPORTED_DTYPES}, got {dtype!r}")
    tol = spec.tolerance(case, dtype)
    rng = np.random.default_rng(case.seed)
    host = _make_host(spec, case, dtype, rng)
    arrays = tuple(be.asarray(host[k], dtype) for k in spec.inputs)
    results: list[CheckResult] = []

    # -- forward ---------------------------------------------------------
    try:
        res = spec.forward(*arrays, **case.params)
        out = getattr(res, spec.output)
    except Exception as exc:  # reported, not raised
        return [_failed("forward", exc)]
    out_h = to_host(out)
    if spec.oracle is not None:
        try:
            expected = spec.oracle(*(host[k] for k in spec.inputs), **case.params)
            results.append(compare(out_h, np.asarray(expected), rtol=tol.forward, name="forward"))
        except Exception as exc:
            results.append(_failed("forward", exc))
    elif not np.all(np.isfinite(out_h)):
        results.append(CheckResult("forward", math.inf, 0.0, False, "output not finite"))
    if hasattr(res, "converged"):
        ok = bool(np.all(to_host(res.converged))) if not isinstance(res.converged, bool) else res.converged
        results.append(CheckResult("converged", 0.0 if ok else 1.0, 0.0, ok,
                                   f"n_iter={getattr(res, 'n_iter', '?')}"))

    # -- derivatives -----------------------------------------------------
    u_host = (spec.tangents(rng, host) if spec.tangents is not None
              else tuple(scaled_normal(rng, host[k], c) for k, c in zip(spec.inputs, spec.core_ndim)))
    v_host = (np.asarray(spec.cotangent(rng, out_h, host)) if spec.cotangent is not None
              else rng.standard_normal(out_h.shape))
    u = tuple(None if t is None else be.asarray(t, dtype) for t in u_host)
    v = be.asarray(v_host, dtype)

    def vjp(vv):
        return tuple(spec.vjp(res, vv, **case.vjp_params))

    jvp = None
    if spec.jvp is not None:
        def jvp(*uu):
            return spec.jvp(res, *uu, **case.jvp_params)

    if not spec.surrogate:
        if jvp is not None:
            try:
                results.append(adjoint_test(jvp, vjp, u, v, tol=tol.adjoint))
            except Exception as exc:
                results.append(_failed("adjoint", exc))
        try:
            arrays64 = tuple(be.asarray(host[k], "float64") for k in spec.inputs)

            def f64(*xs):
                return getattr(spec.forward(*xs, **case.params), spec.output)

            results.extend(fd_jacobian_check(f64, arrays64, u, cotangents=v, vjp=vjp, jvp=jvp,
                                             tol=tol.fd, rel_step=case.fd_step))
        except Exception as exc:
            results.append(_failed("fd", exc))

    # -- batch == loop -----------------------------------------------------
    if _batch_shape(spec, host):
        try:
            results.append(_check_batch(spec, case, be, dtype, host, res, v_host, tol.batch))
        except Exception as exc:
            results.append(_failed("batch", exc))

    # -- operator-specific checks ------------------------------------------
    run = CaseRun(spec, case, be, dtype, host, arrays, res, rng, tol)
    for extra in spec.extra_checks:
        try:
            results.extend(extra(run))
        except Exception as exc:
            results.append(_failed(getattr(extra, "__name__", "extra"), exc))

    # -- nothing was modified ----------------------------------------------
    touched = [k for k, a in zip(spec.inputs, arrays) if not np.array_equal(to_host(a), host[k])]
    if not np.array_equal(to_host(v), v_host.astype(dtype)):
        touched.append("cotangent")
    results.append(CheckResult("no_mutation", float(len(touched)), 0.0, not touched,
                               ("modified: " + ", ".join(touched)) if touched else ""))
    return results


# --------------------------------------------------------------------------
# Operator: dense linear solve (refimpl.linsolve)
# --------------------------------------------------------------------------

def _random_matrix(rng, n: int, cond: float) -> np.ndarray:
    """A non-symmetric n x n matrix with 2-norm condition number ``cond``."""
    U, _ = np.linalg.qr(rng.standard_normal((n, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.logspace(0.0, -math.log10(cond), n) if n > 1 else np.ones(1)
    return (U * s) @ V.T


def _linear_solve_oracle(A, b):
    """x = A^+ b by SVD least squares (scipy.linalg.lstsq), member by member."""
    import scipy.linalg

    bshape = np.broadcast_shapes(A.shape[:-2], b.shape[:-1])
    A = np.broadcast_to(A, bshape + A.shape[-2:])
    b = np.broadcast_to(b, bshape + b.shape[-1:])
    x = np.empty(bshape + b.shape[-1:])
    for idx in np.ndindex(*bshape):
        x[idx] = scipy.linalg.lstsq(A[idx], b[idx], lapack_driver="gelsd")[0]
    return x


def _linear_solve_spec() -> OpSpec:
    from . import linsolve

    def well_conditioned(rng):
        return {"A": _random_matrix(rng, 5, 10.0), "b": rng.standard_normal(5)}

    def batched_scales(rng):
        scales = np.array([1e-6, 1e-2, 1.0, 1e3])[:, None, None]
        A = np.stack([_random_matrix(rng, 4, 30.0) for _ in range(4)]) * scales
        return {"A": A, "b": rng.standard_normal((4, 4)) * scales[..., 0]}

    def shared_matrix(rng):
        return {"A": _random_matrix(rng, 3, 5.0), "b": rng.standard_normal((2, 3, 3))}

    def ill_conditioned(rng):
        return {"A": _random_matrix(rng, 6, 1e6), "b": rng.standard_normal(6)}

    def scalar(rng):
        return {"A": np.array([[-0.7]]), "b": np.array([2.0])}

    return OpSpec(
        name="linear_solve",
        description="x = A^{-1} b, batched (foundation building block)",
        inputs=("A", "b"),
        core_ndim=(2, 1),
        output="x",
        output_core_ndim=1,
        forward=linsolve.solve,
        vjp=lambda res, x_bar: linsolve.solve_vjp(res, x_bar),
        jvp=lambda res, dA, db: linsolve.solve_jvp(res, dA, db),
        oracle=_linear_solve_oracle,
        cases=(
            Case("well_conditioned", "random 5x5, cond 10", 1, well_conditioned),
            Case("batched_scales", "batch of 4 whose members differ in scale 1e-6..1e3",
                 2, batched_scales, flags=("batched", "scales")),
            Case("shared_matrix", "one A broadcast against a (2, 3) batch of b",
                 3, shared_matrix, flags=("batched", "broadcast")),
            Case("ill_conditioned", "6x6 with cond 1e6 (float64 only)", 4, ill_conditioned,
                 flags=("ill_conditioned",), dtypes=("float64",), fd_step=1e-9,
                 tol={"float64": {"forward": 1e-8, "fd": 1e-6}}),
            Case("scalar", "1x1 system", 5, scalar, flags=("edge",)),
        ),
        tol={
            "float64": Tolerance(forward=1e-11, adjoint=1e-11, fd=1e-8, batch=1e-12),
            "float32": Tolerance(forward=1e-4, adjoint=1e-5, fd=1e-3, batch=1e-5),
        },
    )


# --------------------------------------------------------------------------
# Operator: Sinkhorn with implicit differentiation (refimpl.sinkhorn)
# --------------------------------------------------------------------------

import warnings as _warnings  # noqa: E402  (kept inside this operator's section)

from .check import fd_directional as _fd_directional  # noqa: E402


def _sinkhorn_newton_member(C, a, b, eps, rho_a, rho_b, max_iter=200):
    """Entropic OT plan of one problem by damped Newton ascent on the dual.

    An independent route to the optimum (host, float64): maximise
    ``D(f, g) = Phi_a(f) + Phi_b(g) - e sum exp((f_i + g_j - C_ij) / e)``
    with ``Phi(f) = <a, f>`` on a balanced side and
    ``rho <a, 1 - exp(-f / rho)>`` on a relaxed one, whose stationarity
    conditions are the optimality conditions of the plan.  Newton steps on the
    diagonally scaled Hessian; a step is accepted when it increases ``D``
    (Armijo) or, near the optimum where ``D`` no longer resolves progress,
    when it decreases ``||grad D||_1``.  Balanced problems fix ``g_m = 0``
    (the gauge).  Continuation in the temperature (``e = eps 2^j`` down to
    ``eps``, each stage warm-started) keeps Newton in its region of fast
    convergence at small ``eps``; the answer is the Newton fixed point at
    ``eps`` whatever the path.
    """
    n, m = C.shape
    balanced = rho_a is None and rho_b is None

    def phi_terms(x, w, rho):
        if rho is None:
            return w @ x, w, np.zeros_like(x)
        e = np.exp(-x / rho)
        return rho * (w @ (1.0 - e)), w * e, -w * e / rho

    def evaluate(f, g, e):
        X = (f[:, None] + g[None, :] - C) / e
        if not np.all(np.isfinite(X)) or X.max() > 700.0:
            return -np.inf, None, None, None
        P = np.exp(X)
        va, ga, ha = phi_terms(f, a, rho_a)
        vb, gb, hb = phi_terms(g, b, rho_b)
        grad = np.concatenate([ga - P.sum(1), gb - P.sum(0)])
        return va + vb - e * P.sum(), (grad[:-1] if balanced else grad), P, (ha, hb)

    def newton(f, g, e):
        D0, grad, P, (ha, hb) = evaluate(f, g, e)
        for _ in range(max_iter):
            gnorm = np.abs(grad).sum()
            if gnorm <= 1e-16 * (a.sum() + b.sum()):
                break
            H = np.block([[np.diag(P.sum(1) / e - ha), P / e], [P.T / e, np.diag(P.sum(0) / e - hb)]])
            if balanced:
                H = H[:-1, :-1]
            s = 1.0 / np.sqrt(np.maximum(np.diag(H), 1e-300))
            try:
                step = s * np.linalg.solve(H * s[:, None] * s[None, :], s * grad)   # -Hess^{-1} grad
            except np.linalg.LinAlgError:
                break
            if balanced:
                step = np.append(step, 0.0)
            slope = grad @ (step[:-1] if balanced else step)
            t = 1.0
            while t > 1e-30:
                D1, g1, P1, h1 = evaluate(f + t * step[:n], g + t * step[n:], e)
                if g1 is not None and (D1 >= D0 + 1e-4 * t * slope or (
                        np.abs(g1).sum() < (1.0 - 1e-4 * t) * gnorm and D1 >= D0 - 1e-13 * abs(D0))):
                    break
                t *= 0.5
            if t <= 1e-30:
                break
            f, g = f + t * step[:n], g + t * step[n:]
            D0, grad, P, (ha, hb) = D1, g1, P1, h1
        return f, g

    spread = max(float(C.max() - C.min()), eps)
    stages = [eps * 2.0 ** j for j in range(int(math.ceil(math.log2(spread / eps))), 0, -1)] + [eps]
    f, g = np.zeros(n), np.zeros(m)
    e0 = stages[0]
    f = e0 * (np.log(a) - np.log(np.exp(-(C - C.min()) / e0).sum(1))) + C.min()
    with np.errstate(all="ignore"):
        for e in stages:
            f, g = newton(f, g, e)
    return np.exp((f[:, None] + g[None, :] - C) / eps)


def _sinkhorn_oracle(C, a, b, *, eps, rho_a=None, rho_b=None, **_):
    """Plan by Newton on the dual, member by member (see _sinkhorn_newton_member)."""
    bshape = np.broadcast_shapes(C.shape[:-2], a.shape[:-1], b.shape[:-1])
    C = np.broadcast_to(C, bshape + C.shape[-2:])
    a = np.broadcast_to(a, bshape + a.shape[-1:])
    b = np.broadcast_to(b, bshape + b.shape[-1:])
    P = np.empty(C.shape)
    for idx in np.ndindex(*bshape):
        P[idx] = _sinkhorn_newton_member(C[idx], a[idx], b[idx], eps, rho_a, rho_b)
    return P


def _sinkhorn_tangents(rng, host):
    """Feasible directions: dC member-scaled normal, relative marginal
    perturbations ``da = a z``, ``db = b w`` with ``1^T da = 1^T db`` per member
    (the side with more batch members is adjusted)."""
    C, a, b = host["C"], host["a"], host["b"]
    dC = scaled_normal(rng, C, 2)
    da = a * rng.standard_normal(a.shape)
    db = b * rng.standard_normal(b.shape)
    sa, sb = da.sum(-1, keepdims=True), db.sum(-1, keepdims=True)
    if b.ndim >= a.ndim:
        db = db - b * (sb - sa) / b.sum(-1, keepdims=True)
    else:
        da = da - a * (sa - sb) / a.sum(-1, keepdims=True)
    return dC, da, db


def _sk_marginal_check(run: CaseRun) -> list[CheckResult]:
    """Balanced: ||P 1 - a||_1 and ||P^T 1 - b||_1 (relative) within the result's tol."""
    if run.case.params.get("rho_a") is not None or run.case.params.get("rho_b") is not None:
        return []
    P = to_host(run.result.P).astype(np.float64)
    a = np.broadcast_to(run.host["a"], P.shape[:-1])
    b = np.broadcast_to(run.host["b"], P.shape[:-2] + P.shape[-1:])
    err = max(float(np.max(np.abs(P.sum(-1) - a).sum(-1) / a.sum(-1))),
              float(np.max(np.abs(P.sum(-2) - b).sum(-1) / b.sum(-1))))
    tol = 4.0 * float(np.max(to_host(run.result.tol)))
    return [CheckResult("marginals", err, tol, err <= tol, "relative L1 of both marginals")]


def _sk_vjp(run: CaseRun, G, method=None):
    from . import sinkhorn as sk

    params = dict(run.case.vjp_params)
    if method is not None:
        params["method"] = method
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", _backend.ConditioningWarning)
        return [to_host(x).astype(np.float64) for x in sk.sinkhorn_vjp(run.result, G, **params)]


def _sk_cotangent(run: CaseRun):
    return run.asarray(run.rng.standard_normal(tuple(run.result.P.shape)))


def _sk_adjoint_invariants(run: CaseRun) -> list[CheckResult]:
    """Balanced: sum(a_bar) == 0 and C_bar has zero row and column sums
    (normalised by the sizes of the gradients)."""
    if run.case.params.get("rho_a") is not None or run.case.params.get("rho_b") is not None:
        return []
    G = _sk_cotangent(run)
    C_bar, a_bar, b_bar = _sk_vjp(run, G)
    u = 2.0 ** -53 if run.dtype == "float64" else 2.0 ** -24
    n, m = C_bar.shape[-2:]
    # natural size |P| |G| / eps of the terms that cancel (C_bar = 0 when n = 1)
    natural = float(np.max(to_host(run.result.P))) * float(np.max(np.abs(to_host(G)))) / run.case.params["eps"]
    scale_c = max(np.abs(C_bar).max(), natural)
    sums = max(np.abs(C_bar.sum(-1)).max(), np.abs(C_bar.sum(-2)).max()) / scale_c
    gauge = np.abs(a_bar.sum(-1)).max() / max(np.abs(a_bar).max(), 1e-300)
    tol_s = 64.0 * u * (n + m)
    return [CheckResult("C_bar_zero_sums", sums, tol_s, sums <= tol_s, "max |C_bar 1|, |C_bar^T 1| / max|C_bar|"),
            CheckResult("gauge_sum_a_bar", gauge, 8.0 * u * n, gauge <= 8.0 * u * n, "|sum a_bar| / max|a_bar|")]


def _sk_methods_agree(run: CaseRun) -> list[CheckResult]:
    """Every backward path (schur, cg, reduced, and kkt when small) gives the
    case's VJP to round-off (cg to its tolerance)."""
    from . import sinkhorn as sk

    G = _sk_cotangent(run)
    ref = _sk_vjp(run, G)
    n, m = ref[0].shape[-2:]
    out = []
    for method in sk.METHODS:
        if method == run.case.vjp_params.get("method", "schur"):
            continue
        if method == "kkt" and n * m + n + m > 200:
            continue
        bars = _sk_vjp(run, G, method)
        tol = 1e-9 if run.dtype == "float64" else 2e-4
        res = compare(tuple(bars), tuple(ref), rtol=tol, name=f"agrees_{method}")
        out.append(res)
    return out


def _sk_eps_derivative(run: CaseRun) -> list[CheckResult]:
    """dL/deps from sinkhorn_vjp_eps against Richardson differences in eps
    (float64 forward), and the identity -<C_bar, C>/eps when balanced."""
    from . import sinkhorn as sk

    if run.dtype != "float64":
        return []
    G = _sk_cotangent(run)
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", _backend.ConditioningWarning)
        e_bar = np.asarray(to_host(sk.sinkhorn_vjp_eps(run.result, G)), dtype=np.float64)
        C_bar = to_host(sk.sinkhorn_vjp(run.result, G)[0])
    params = dict(run.case.params)
    eps = params.pop("eps")
    arrays = tuple(run.asarray(run.host[k], "float64") for k in ("C", "a", "b"))
    xp = run.backend.xp
    e0 = run.backend.asarray(np.array(eps), "float64")

    def P_of(e):
        return sk.sinkhorn(*arrays, eps=float(e), **params).P

    (D,), _ = _fd_directional(P_of, (e0,), (xp.ones_like(e0),), rel_step=run.case.fd_step)
    fd = np.sum(to_host(D) * to_host(G), axis=(-2, -1))
    # Scale: |fd| or, where dP/deps vanishes (n = 1, additive costs), the size
    # |P| |G| |log P| / eps of the terms that cancel in <C_bar, log P>.
    logP = to_host(run.result.log_P)
    natural = (float(np.max(to_host(run.result.P))) * float(np.max(np.abs(to_host(G))))
               * max(float(np.max(np.abs(logP))), 1.0) / eps)
    scale = max(float(np.max(np.abs(fd))), natural)
    err = float(np.max(np.abs(e_bar - fd))) / scale
    out = [CheckResult("eps_fd", err, run.tol.fd, err <= run.tol.fd, "dL/deps vs Richardson in eps")]
    if run.case.params.get("rho_a") is None and run.case.params.get("rho_b") is None:
        ident = -np.sum(C_bar * np.broadcast_to(run.host["C"], C_bar.shape), axis=(-2, -1)) / eps
        e2 = float(np.max(np.abs(e_bar - ident))) / max(scale, 1e-300)
        out.append(CheckResult("eps_identity", e2, 1e-10, e2 <= 1e-10, "<C_bar, log P> == -<C_bar, C>/eps"))
    return out


def _sk_shift_invariance(run: CaseRun) -> list[CheckResult]:
    """P(C + u 1^T + 1 v^T) == P(C) for a balanced problem; for the flagged
    additive case C = u 1^T + 1 v^T the closed form P = a b^T / sum(a)."""
    from . import sinkhorn as sk

    if run.case.params.get("rho_a") is not None or run.case.params.get("rho_b") is not None:
        return []
    C = run.host["C"]
    rtol = 1e-10 if run.dtype == "float64" else 1e-3
    P = to_host(run.result.P).astype(np.float64)
    out = []
    uu = run.rng.standard_normal(C.shape[:-1])[..., :, None]
    vv = run.rng.standard_normal(C.shape[:-2] + C.shape[-1:])[..., None, :]
    shifted = sk.sinkhorn(run.asarray(C + uu + vv), *run.arrays[1:], **run.case.params)
    out.append(compare(to_host(shifted.P), P, rtol=rtol, name="shift_invariance"))
    if "additive" in run.case.flags:
        a = np.broadcast_to(run.host["a"], P.shape[:-1])
        b = np.broadcast_to(run.host["b"], P.shape[:-2] + P.shape[-1:])
        closed = a[..., :, None] * b[..., None, :] / a.sum(-1)[..., None, None]
        out.append(compare(P, closed, rtol=rtol, name="additive_closed_form"))
    return out


def _sinkhorn_spec() -> OpSpec:
    from . import sinkhorn as sk

    def dirichlet(rng, k, conc=1.0, bits=20):
        # Dyadic weights j / 2^bits (exact in float32 and summing to exactly 1 in
        # both dtypes), so float32 rounding cannot create a mass mismatch.
        w = np.floor(rng.dirichlet(np.full(k, conc)) * 2 ** bits) + 1.0
        w[np.argmax(w)] += 2 ** bits - w.sum()
        return w / 2 ** bits

    def sqdist(rng, n, m, d=2, scale=1.0):
        x, y = rng.random((n, d)), rng.random((m, d))
        return scale * ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)

    def uniform_4x2(rng):
        return {"C": rng.random((4, 2)), "a": np.full(4, 0.25), "b": np.full(2, 0.5)}

    def nonuniform_6x5(rng):
        return {"C": sqdist(rng, 6, 5), "a": dirichlet(rng, 6), "b": dirichlet(rng, 5)}

    def wide_3x7(rng):
        return {"C": rng.random((3, 7)), "a": dirichlet(rng, 3), "b": dirichlet(rng, 7)}

    def tall_skinny(rng):
        # SOFT top-k shape: n scores against the anchors {0, 1}, masses k/n and (n-k)/n.
        n, k = 16, 4
        x = rng.random(n)
        C = (x[:, None] - np.array([1.0, 0.0])[None, :]) ** 2
        return {"C": C, "a": np.full(n, 1.0 / n), "b": np.array([k / n, (n - k) / n])}

    def single_row(rng):
        b = dirichlet(rng, 4)
        return {"C": rng.random((1, 4)), "a": np.array([b.sum()]), "b": b}

    def single_col(rng):
        a = dirichlet(rng, 5)
        return {"C": rng.random((5, 1)), "a": a, "b": np.array([a.sum()])}

    def tiny_marginals(rng):
        # Two entries of 2^-40 ~ 9.1e-13 on each side (exact in float32).
        # Both masses become 1 + 2^-39 exactly.
        a, b = dirichlet(rng, 5), dirichlet(rng, 4)
        for w, tiny_idx, keep in ((a, [1, 3], 0), (b, [1, 2], 3)):
            w[keep] += w[tiny_idx].sum()
            w[tiny_idx] = 2.0 ** -40
        return {"C": rng.random((5, 4)), "a": a, "b": b}

    def tiny_eps_monotone(rng):
        # 1-D sorted points, squared distances, non-uniform masses: the eps -> 0
        # limit is a monotone "staircase" plan whose support is a spanning tree,
        # so the backward stays well conditioned even at eps = 1e-3.
        x = np.sort(rng.random(5))
        y = np.sort(rng.random(4))
        a = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
        b = np.array([0.35, 0.15, 0.3, 0.2])
        return {"C": (x[:, None] - y[None, :]) ** 2, "a": a, "b": b}

    def batch_scales(rng):
        # Members whose masses differ by 1e-4 .. 1e4 and whose costs are shifted
        # by large constants (the plan is invariant to both shifts; eps fixed).
        mass = np.array([2.0 ** -13, 1.0, 2.0 ** 13])[:, None]   # ~1.2e-4, 1, 8.2e3
        C = rng.random((3, 4, 3)) + np.array([0.0, 50.0, -20.0])[:, None, None]
        a = np.stack([dirichlet(rng, 4) for _ in range(3)]) * mass
        b = np.stack([dirichlet(rng, 3) for _ in range(3)]) * mass
        return {"C": C, "a": a, "b": b}

    def shared_marginals(rng):
        return {"C": rng.random((2, 4, 3)), "a": dirichlet(rng, 4), "b": dirichlet(rng, 3)}

    def additive(rng):
        u, v = rng.standard_normal(4), rng.standard_normal(5)
        return {"C": u[:, None] + v[None, :], "a": dirichlet(rng, 4), "b": dirichlet(rng, 5)}

    def unbalanced(rng):
        return {"C": rng.random((5, 4)), "a": 1.3 * dirichlet(rng, 5), "b": 0.7 * dirichlet(rng, 4)}

    def vjp_case(rng):
        return {"C": sqdist(rng, 7, 6), "a": dirichlet(rng, 7, 2.0), "b": dirichlet(rng, 6, 2.0)}

    def vjp_batch(rng):
        return {"C": rng.random((2, 6, 5)), "a": np.stack([dirichlet(rng, 6) for _ in range(2)]),
                "b": np.stack([dirichlet(rng, 5) for _ in range(2)])}

    tight = {"tol": 1e-13, "max_iter": 50_000}
    cases = (
        Case("uniform_4x2", "uniform marginals, random costs, eps 0.2", 301, uniform_4x2,
             params={"eps": 0.2, **tight}),
        Case("nonuniform_6x5", "Dirichlet marginals, squared-distance costs, eps 0.05", 302,
             nonuniform_6x5, params={"eps": 0.05, **tight}, flags=("nonuniform",)),
        Case("wide_3x7", "n < m: the backward eliminates the column side", 303, wide_3x7,
             params={"eps": 0.1, **tight}, flags=("nonuniform",)),
        Case("tall_skinny_16x2", "SOFT top-k shape (n=16 scores, 2 anchors, k=4): 2 x 2 Schur system",
             304, tall_skinny, params={"eps": 0.05, **tight}, flags=("tall_skinny",)),
        Case("single_row", "n = 1: P = b^T whatever C; C_bar = 0", 305, single_row,
             params={"eps": 0.1, **tight}, flags=("edge",)),
        Case("single_col", "m = 1: P = a whatever C; C_bar = 0", 306, single_col,
             params={"eps": 0.1, **tight}, flags=("edge",)),
        Case("tiny_marginals", "marginal entries of ~1e-12 (no NaN/Inf, scaled backward)", 307,
             tiny_marginals, params={"eps": 0.1, **tight}, flags=("edge", "nonuniform"),
             tol={"float32": {"forward": 2e-3}}),
        Case("tiny_eps_monotone", "eps = 1e-3, 1-D monotone costs: near-sparse but well-conditioned"
             " (float64 only: float32 cannot resolve C/eps ~ 1e3)", 308, tiny_eps_monotone,
             params={"eps": 1e-3, "tol": 1e-12, "max_iter": 200_000}, flags=("tiny_eps",),
             dtypes=("float64",), fd_step=1e-7,
             tol={"float64": {"forward": 1e-8, "fd": 1e-6, "adjoint": 1e-10}}),
        Case("batch_scales", "batch of 3: masses ~1e-4, 1, ~1e4 and cost offsets 0, 50, -20", 309,
             batch_scales, params={"eps": 0.1, **tight}, flags=("batched", "scales"),
             tol={"float32": {"forward": 5e-3, "fd": 5e-3}}),
        Case("shared_marginals", "batch of costs against one (a, b) (broadcast marginals)", 310,
             shared_marginals, params={"eps": 0.1, **tight}, flags=("batched", "broadcast")),
        Case("additive_cost", "C = u 1^T + 1 v^T: closed form P = a b^T", 311, additive,
             params={"eps": 0.3, **tight}, flags=("additive", "closed_form")),
        Case("unbalanced", "KL-relaxed marginals rho_a = rho_b = 0.5, masses 1.3 vs 0.7", 312,
             unbalanced, params={"eps": 0.1, "rho_a": 0.5, "rho_b": 0.5, **tight},
             flags=("unbalanced",)),
        Case("semi_unbalanced", "hard row constraint, relaxed columns (rho_b = 0.2)", 313,
             lambda rng: {"C": rng.random((4, 5)), "a": dirichlet(rng, 4), "b": 1.5 * dirichlet(rng, 5)},
             params={"eps": 0.1, "rho_b": 0.2, **tight}, flags=("unbalanced",)),
        Case("vjp_cg", "method='cg' (matrix-free conjugate gradients)", 314, vjp_case,
             params={"eps": 0.05, **tight}, vjp_params={"method": "cg"}, jvp_params={"method": "cg"},
             flags=("method",)),
        Case("vjp_reduced", "method='reduced' (the paper's (n+m-1) system)", 315, vjp_case,
             params={"eps": 0.05, **tight}, vjp_params={"method": "reduced"},
             jvp_params={"method": "reduced"}, flags=("method",)),
        Case("vjp_kkt", "method='kkt' (full KKT system, oracle)", 316, vjp_case,
             params={"eps": 0.05, **tight}, vjp_params={"method": "kkt"}, jvp_params={"method": "kkt"},
             flags=("method",)),
        Case("vjp_cg_batch_unbalanced", "method='cg' on a batch of unbalanced problems", 317, vjp_batch,
             params={"eps": 0.1, "rho_a": 1.0, "rho_b": 2.0, **tight}, vjp_params={"method": "cg"},
             jvp_params={"method": "cg"}, flags=("method", "batched", "unbalanced")),
    )

    def canonicalize(bars):
        return (bars[0], *sk.gauge_fix(bars[1], bars[2]))

    return OpSpec(
        name="sinkhorn",
        description="entropic OT plan P(C, a, b), implicit differentiation (balanced and unbalanced)",
        inputs=("C", "a", "b"),
        core_ndim=(2, 1, 1),
        output="P",
        output_core_ndim=2,
        forward=sk.sinkhorn,
        vjp=lambda res, P_bar, **kw: sk.sinkhorn_vjp(res, P_bar, **kw),
        jvp=lambda res, dC, da, db, **kw: sk.sinkhorn_jvp(res, dC, da, db, **kw),
        oracle=_sinkhorn_oracle,
        cases=cases,
        tol={
            "float64": Tolerance(forward=1e-10, adjoint=1e-11, fd=1e-7, batch=1e-11),
            "float32": Tolerance(forward=5e-4, adjoint=1e-5, fd=2e-3, batch=1e-5),
        },
        tangents=_sinkhorn_tangents,
        canonicalize=canonicalize,
        candidate_params=("eps",),
        extra_checks=(_sk_marginal_check, _sk_adjoint_invariants, _sk_methods_agree,
                      _sk_eps_derivative, _sk_shift_invariance),
    )


# --------------------------------------------------------------------------
# Operator: SOFT top-k and sorted SOFT top-k (refimpl.topk)
# --------------------------------------------------------------------------

def _topk_hard_host(x: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Hard top-k indicator on the host, a tied group at the boundary sharing
    its slots evenly (the eps -> 0 limit), row by row from a stable sort."""
    xs = x if largest else -x
    out = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape[:-1]):
        row = xs[idx]
        if k == 0:
            continue
        kth = np.sort(row)[::-1][k - 1]
        above = row > kth
        tied = row == kth
        out[idx] = above + tied * (k - above.sum()) / tied.sum()
    return out


def _topk_gap_host(x: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """x_(k) - x_(k+1) per row (inf for k = 0 or n)."""
    n = x.shape[-1]
    if k in (0, n):
        return np.full(x.shape[:-1], np.inf)
    s = -np.sort(-(x if largest else -x), axis=-1)
    return s[..., k - 1] - s[..., k]


def _topk_oracle(x, *, k, eps, largest=True, **_):
    """A = sigmoid(+-(x - theta)/t), t = eps/2, theta by scipy.optimize.brentq on
    sum(A) = k (host, float64, scores centred at their median), row by row."""
    from scipy.optimize import brentq
    from scipy.special import expit

    n = x.shape[-1]
    if k in (0, n):
        return np.full(x.shape, float(k == n))
    t = eps / 2.0
    sgn = 1.0 if largest else -1.0
    A = np.empty(x.shape)
    for idx in np.ndindex(*x.shape[:-1]):
        xc = x[idx] - np.median(x[idx])
        pad = t * (abs(math.log(k / (n - k))) + 50.0) + 1.0
        F = lambda th: expit(sgn * (xc - th) / t).sum() - k  # noqa: E731
        th = brentq(F, xc.min() - pad, xc.max() + pad, xtol=1e-300, rtol=8.9e-16, maxiter=2000)
        A[idx] = expit(sgn * (xc - th) / t)
    return A


def _sorted_topk_oracle(x, *, k, eps, largest=True, **_):
    """Sorted SOFT top-k from the dual-Newton plan (:func:`_sinkhorn_newton_member`,
    independent of the Sinkhorn iterations): anchors 0..k (1..n when k = n),
    nu = ((n-k)/n, 1/n, ...), A[:, r] = n Gamma[:, k - r]."""
    n = x.shape[-1]
    xs = x if largest else -x
    if k == n:
        y, nu = np.arange(1.0, n + 1.0), np.full(n, 1.0 / n)
    else:
        y = np.arange(0.0, k + 1.0)
        nu = np.concatenate([[(n - k) / n], np.full(k, 1.0 / n)])
    A = np.empty(x.shape + (k,))
    for idx in np.ndindex(*x.shape[:-1]):
        xc = xs[idx] - xs[idx].mean()
        P = _sinkhorn_newton_member((xc[:, None] - y[None, :]) ** 2, np.full(n, 1.0 / n), nu,
                                    eps, None, None)
        A[idx] = n * P[:, ::-1][:, :k]
    return A


def _topk_tangents(rng, host):
    """Directions scaled per row by the spread max(x) - min(x) (1 for a constant
    row): the operator is translation invariant, so an offset such as 1e3 must
    not set the finite-difference step."""
    x = host["x"]
    spread = x.max(-1, keepdims=True) - x.min(-1, keepdims=True)
    return (rng.standard_normal(x.shape) * np.where(spread > 0, spread, 1.0),)


def _tk_params(run: CaseRun):
    p = run.case.params
    return p["k"], p["eps"], p.get("largest", True), p.get("method", "closed_form")


def _tk_sum_is_k(run: CaseRun) -> list[CheckResult]:
    """sum(A) = k in every row (closed form: to round-off; Sinkhorn: to its tol)."""
    k = _tk_params(run)[0]
    A = to_host(run.output).astype(np.float64)
    err = float(np.max(np.abs(A.sum(-1) - k))) / max(k, 1)
    return [CheckResult("sum_is_k", err, run.tol.forward, err <= run.tol.forward,
                        f"max |sum(A) - k| / max(k, 1), k = {k}")]


def _tk_error_bound(run: CaseRun) -> list[CheckResult]:
    """||A - A_hard||_1 <= 2 max(k, n-k) exp(-delta/eps) per row (A_hard from a
    host sort, ties split evenly)."""
    from . import topk

    k, eps, largest, _ = _tk_params(run)
    x = run.host["x"]
    n = x.shape[-1]
    A = to_host(run.output).astype(np.float64)
    l1 = np.abs(A - _topk_hard_host(x, k, largest)).sum(-1)
    gaps = np.broadcast_to(_topk_gap_host(x, k, largest), l1.shape)
    bound = np.array([topk.soft_topk_error_bound(eps, g if np.isfinite(g) else 0.0, k, n)
                      for g in gaps.ravel()]).reshape(l1.shape)
    slack = 10.0 * run.tol.forward * max(k, 1)
    worst = float(np.max(l1 - bound))
    return [CheckResult("error_bound", max(worst, 0.0), slack, worst <= slack,
                        f"max l1 {float(np.max(l1)):.2e}, smallest bound {float(np.min(bound)):.2e}")]


def _tk_jacobian_structure(run: CaseRun) -> list[CheckResult]:
    """J symmetric (<J u, v> = <J v, u>) and J 1 = 0 (sum(x_bar) = 0) per row."""
    from . import topk

    x = run.host["x"]
    u, v = run.rng.standard_normal(x.shape), run.rng.standard_normal(x.shape)
    Ju = to_host(topk.soft_topk_jvp(run.result, run.asarray(u))).astype(np.float64)
    Jv = to_host(topk.soft_topk_jvp(run.result, run.asarray(v))).astype(np.float64)
    scale = float(np.sum(np.abs(Ju * v)) + np.sum(np.abs(Jv * u))) or 1.0
    sym = abs(float(np.sum(Ju * v) - np.sum(Jv * u))) / scale
    xb = to_host(topk.soft_topk_vjp(run.result, run.asarray(v))).astype(np.float64)
    row = float(np.max(np.abs(xb.sum(-1)) / np.maximum(np.abs(xb).sum(-1), 1e-300)))
    row = 0.0 if not np.any(xb) else row
    t = run.tol.adjoint * 10.0
    return [CheckResult("J_symmetric", sym, t, sym <= t, "<Ju, v> vs <Jv, u>"),
            CheckResult("J_rows_sum_0", row, t, row <= t, "|sum x_bar| / sum |x_bar|")]


def _tk_methods_agree(run: CaseRun) -> list[CheckResult]:
    """The other path (closed form <-> converged Sinkhorn) gives the same A and VJP."""
    from . import topk

    if "near_hard" in run.case.flags:
        # Sinkhorn's linear rate degrades like the Schur complement S/n when eps is
        # far below the score gaps (that is why the closed form exists): no
        # converged Sinkhorn reference within a test's budget.
        return []
    k, eps, largest, method = _tk_params(run)
    other = "sinkhorn" if method == "closed_form" else "closed_form"
    res2 = topk.soft_topk(run.arrays[0], k, eps=eps, largest=largest, method=other)
    v = run.asarray(run.rng.standard_normal(tuple(run.output.shape)))
    out = [compare(run.output, res2.A, rtol=run.tol.forward, atol=run.tol.forward,
                   name=f"A_vs_{other}")]
    g1 = topk.soft_topk_vjp(run.result, v)
    g2 = topk.soft_topk_vjp(res2, v)
    out.append(compare(g1, g2, rtol=run.tol.fd, name=f"vjp_vs_{other}"))
    return out


def _tk_closed_forms(run: CaseRun) -> list[CheckResult]:
    """Closed-form instances: n = 2, k = 1 gives A_1 = sigmoid(+-(x_1 - x_2)/eps)
    and dA_1/dx_1 = s_1/eps; all-equal scores give A = k/n and
    J = (s/t)(I - 1 1^T/n) with s = (k/n)(1 - k/n)."""
    from . import topk
    from scipy.special import expit

    k, eps, largest, _ = _tk_params(run)
    x = run.host["x"]
    sgn = 1.0 if largest else -1.0
    A = to_host(run.output).astype(np.float64)
    v = run.rng.standard_normal(x.shape)
    xb = to_host(topk.soft_topk_vjp(run.result, run.asarray(v))).astype(np.float64)
    if "pair" in run.case.flags:
        A1 = expit(sgn * (x[..., 0] - x[..., 1]) / eps)
        s1 = A1 * (1.0 - A1)
        xb1 = sgn * s1 / eps * (v[..., 0] - v[..., 1])
        expected_A = np.stack([A1, 1.0 - A1], axis=-1)
        expected_xb = np.stack([xb1, -xb1], axis=-1)
    elif "all_equal" in run.case.flags:
        n = x.shape[-1]
        s = (k / n) * (1.0 - k / n)
        expected_A = np.full(x.shape, k / n)
        expected_xb = sgn * s / (eps / 2.0) * (v - v.mean(-1, keepdims=True))
    else:
        return []
    return [compare(A, expected_A, rtol=run.tol.forward, name="closed_form_A"),
            compare(xb, expected_xb, rtol=run.tol.fd, name="closed_form_vjp")]


def _tk_ties_split(run: CaseRun) -> list[CheckResult]:
    """Equal scores get equal A (a tie at the boundary splits evenly)."""
    if "ties" not in run.case.flags:
        return []
    x = run.host["x"]
    A = to_host(run.output).astype(np.float64)
    err = 0.0
    for idx in np.ndindex(*x.shape[:-1]):
        for val in np.unique(x[idx]):
            grp = A[idx][x[idx] == val]
            err = max(err, float(grp.max() - grp.min()))
    return [CheckResult("ties_split_evenly", err, run.tol.forward, err <= run.tol.forward,
                        "max spread of A within a group of equal scores")]


def _soft_topk_spec() -> OpSpec:
    from . import topk

    def normal(n, scale=1.0, batch=()):
        return lambda rng: {"x": scale * rng.standard_normal(batch + (n,))}

    def ties_boundary(rng):
        # Three equal scores share the one slot left after the top score (k = 2).
        return {"x": np.array([2.0, 0.5, 0.5, 0.5, -0.25, -1.5])}

    def tiny_eps(rng):
        # Distinct scores at least 0.1 apart; eps = 1e-6: A is the hard indicator.
        x = np.sort(rng.choice(np.arange(-10, 11), size=8, replace=False)) / 10.0
        return {"x": rng.permutation(x)}

    def batch_scales(rng):
        # Rows of scale 1e-2, 1 and 10 with offsets 0, 1e3, -50 (the offsets leave A
        # unchanged; rows never interact: no normalisation over the batch).
        scale = np.array([1e-2, 1.0, 10.0])[:, None]
        offset = np.array([0.0, 1e3, -50.0])[:, None]
        return {"x": scale * rng.standard_normal((3, 8)) + offset}

    def batch_scales_sinkhorn(rng):
        scale = np.array([0.1, 1.0, 2.0])[:, None]
        offset = np.array([0.0, 100.0, -5.0])[:, None]
        return {"x": scale * rng.standard_normal((3, 6)) + offset}

    sk_tight = {"method": "sinkhorn", "tol": 1e-13, "max_iter": 200_000}
    sk32 = {"float32": {"forward": 2e-3, "fd": 5e-3, "batch": 1e-4}}
    cases = (
        Case("closed_largest", "n = 8 normal scores, k = 3, eps = 0.2, closed form", 501,
             normal(8), params={"k": 3, "eps": 0.2, "largest": True}),
        Case("closed_smallest", "n = 7, k = 2 smallest, eps = 0.3, closed form", 502,
             normal(7), params={"k": 2, "eps": 0.3, "largest": False}),
        Case("sinkhorn_largest", "n = 8, k = 3, eps = 0.5, Sinkhorn path + KKT/Schur backward", 503,
             normal(8), params={"k": 3, "eps": 0.5, "largest": True, **sk_tight},
             flags=("sinkhorn",), tol=sk32),
        Case("sinkhorn_smallest", "n = 7, k = 4 smallest, eps = 0.4, Sinkhorn path", 504,
             normal(7), params={"k": 4, "eps": 0.4, "largest": False, **sk_tight},
             flags=("sinkhorn",), tol=sk32),
        Case("sinkhorn_cg", "Sinkhorn path, backward by matrix-free CG", 505, normal(9),
             params={"k": 2, "eps": 0.5, "largest": True, **sk_tight},
             vjp_params={"method": "cg"}, flags=("sinkhorn", "method"), tol=sk32),
        Case("ties_boundary", "three equal scores share the last slot (k = 2): A = 1/3 each at "
             "eps -> 0; eps = 0.1", 506, ties_boundary,
             params={"k": 2, "eps": 0.1, "largest": True}, flags=("ties",)),
        Case("ties_boundary_sinkhorn", "the tie case on the Sinkhorn path (eps = 0.3)", 507,
             ties_boundary, params={"k": 2, "eps": 0.3, "largest": True, **sk_tight},
             flags=("ties", "sinkhorn"), tol=sk32),
        Case("tiny_eps", "eps = 1e-6 << gap 0.1: A is the hard top-k, s underflows to 0, "
             "gradient 0, no NaN", 508, tiny_eps, params={"k": 3, "eps": 1e-6, "largest": True},
             flags=("tiny_eps", "near_hard")),
        Case("k_zero", "k = 0: A = 0 identically, gradient 0", 509, normal(5),
             params={"k": 0, "eps": 0.1}, flags=("edge",)),
        Case("k_n", "k = n: A = 1 identically, gradient 0", 510, normal(5),
             params={"k": 5, "eps": 0.1, "largest": False}, flags=("edge",)),
        Case("pair", "n = 2, k = 1: A_1 = sigmoid((x_1 - x_2)/eps) (closed form)", 511,
             normal(2), params={"k": 1, "eps": 0.7}, flags=("pair", "closed_form")),
        Case("all_equal", "equal scores: A = k/n, J = (s/t)(I - 11^T/n) (closed form)", 512,
             lambda rng: {"x": np.full(6, 0.3)}, params={"k": 2, "eps": 0.2},
             flags=("all_equal", "closed_form", "ties")),
        Case("batch_scales", "batch of 3 rows of scale 1e-2, 1, 10 and offsets 0, 1e3, -50", 513,
             batch_scales, params={"k": 3, "eps": 0.1}, flags=("batched", "scales", "near_hard"),
             fd_step=1e-5, tol={"float32": {"forward": 2e-3, "fd": 5e-3}}),
        Case("batch_scales_sinkhorn", "batch of 3 rows (scales 0.1, 1, 2; offsets 0, 100, -5), "
             "Sinkhorn path", 514, batch_scales_sinkhorn,
             params={"k": 2, "eps": 0.5, "largest": True, **sk_tight},
             flags=("batched", "scales", "sinkhorn"), tol=sk32),
    )
    return OpSpec(
        name="soft_topk",
        description="SOFT top-k indicator (entropic OT onto anchors {0, 1}): closed form and Sinkhorn",
        inputs=("x",),
        core_ndim=(1,),
        output="A",
        output_core_ndim=1,
        forward=topk.soft_topk,
        vjp=lambda res, A_bar, **kw: (topk.soft_topk_vjp(res, A_bar, **kw),),
        jvp=lambda res, dx: topk.soft_topk_jvp(res, dx),
        oracle=_topk_oracle,
        cases=cases,
        tangents=_topk_tangents,
        tol={
            "float64": Tolerance(forward=1e-10, adjoint=1e-11, fd=1e-7, batch=1e-11),
            "float32": Tolerance(forward=2e-4, adjoint=1e-5, fd=2e-3, batch=1e-5),
        },
        candidate_params=("k", "eps", "largest"),
        extra_checks=(_tk_sum_is_k, _tk_error_bound, _tk_jacobian_structure, _tk_methods_agree,
                      _tk_closed_forms, _tk_ties_split),
    )


def _st_structure(run: CaseRun) -> list[CheckResult]:
    """Columns of A sum to 1, rows to at most 1, and all rows together to k."""
    k = run.case.params["k"]
    A = to_host(run.output).astype(np.float64)
    col = float(np.max(np.abs(A.sum(-2) - 1.0)))
    row = float(np.max(A.sum(-1) - 1.0))
    tol = run.tol.forward
    return [CheckResult("columns_sum_1", col, tol, col <= tol, f"k = {k}"),
            CheckResult("rows_sum_le_1", max(row, 0.0), tol, row <= tol, "")]


def _st_k1_equals_topk(run: CaseRun) -> list[CheckResult]:
    """k = 1: the sorted variant is the two-anchor problem, A[:, 0] = soft_topk(x, 1).A
    (closed form), for the output and the VJP."""
    from . import topk

    p = run.case.params
    if p["k"] != 1:
        return []
    res2 = topk.soft_topk(run.arrays[0], 1, eps=p["eps"], largest=p.get("largest", True))
    out = [compare(run.output[..., 0], res2.A, rtol=run.tol.forward, name="k1_vs_closed_form")]
    v = run.rng.standard_normal(tuple(res2.A.shape))
    g1 = topk.soft_sorted_topk_vjp(run.result, run.asarray(v[..., None]))
    g2 = topk.soft_topk_vjp(res2, run.asarray(v))
    out.append(compare(g1, g2, rtol=run.tol.fd, name="k1_vjp_vs_closed_form"))
    return out


def _soft_sorted_topk_spec() -> OpSpec:
    from . import topk

    def normal(shape, scale=1.0):
        return lambda rng: {"x": scale * rng.standard_normal(shape)}

    def ties(rng):
        # Two equal scores at ranks 1-2: columns 0 and 1 split between them.
        return {"x": np.array([0.1, 1.4, -0.6, 1.4, 0.5, -1.2])}

    def batch_scales(rng):
        return {"x": np.array([0.2, 1.0, 2.0])[:, None] * rng.standard_normal((3, 5))
                + np.array([0.0, 20.0, -7.0])[:, None]}

    tight = {"tol": 1e-13, "max_iter": 200_000}
    f32 = {"float32": {"forward": 3e-3, "fd": 5e-3, "batch": 1e-4}}
    cases = (
        Case("sorted_k2", "n = 6, k = 2, eps = 0.5 (3 anchors)", 601, normal((6,), 2.0),
             params={"k": 2, "eps": 0.5, **tight}, tol=f32),
        Case("sorted_smallest_k3", "n = 6, k = 3 smallest, eps = 0.5", 602, normal((6,), 2.0),
             params={"k": 3, "eps": 0.5, "largest": False, **tight}, tol=f32),
        Case("sorted_k1", "k = 1: equals the two-anchor SOFT top-k", 603, normal((5,)),
             params={"k": 1, "eps": 0.3, **tight}, tol=f32),
        Case("sorted_k_n", "k = n = 4: a soft sort (the zero-mass anchor dropped)", 604,
             normal((4,), 1.5), params={"k": 4, "eps": 1.0, **tight}, flags=("edge",), tol=f32),
        Case("sorted_ties", "two equal best scores share ranks 1 and 2", 605, ties,
             params={"k": 2, "eps": 0.4, **tight}, flags=("ties",), tol=f32),
        Case("sorted_batch_scales", "batch of 3 rows, scales 0.2, 1, 2, offsets 0, 20, -7", 606,
             batch_scales, params={"k": 2, "eps": 1.0, **tight}, flags=("batched", "scales"),
             tol=f32),
    )
    return OpSpec(
        name="soft_sorted_topk",
        description="sorted SOFT top-k (k + 1 anchors, beam search): soft one-hots of the k best",
        inputs=("x",),
        core_ndim=(1,),
        output="A",
        output_core_ndim=2,
        forward=topk.soft_sorted_topk,
        vjp=lambda res, A_bar, **kw: (topk.soft_sorted_topk_vjp(res, A_bar, **kw),),
        jvp=lambda res, dx: topk.soft_sorted_topk_jvp(res, dx),
        oracle=_sorted_topk_oracle,
        cases=cases,
        tangents=_topk_tangents,
        tol={
            "float64": Tolerance(forward=1e-9, adjoint=1e-11, fd=1e-7, batch=1e-11),
            "float32": Tolerance(forward=1e-3, adjoint=1e-5, fd=2e-3, batch=1e-5),
        },
        candidate_params=("k", "eps", "largest"),
        extra_checks=(_st_structure, _st_k1_equals_topk),
    )


# --------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------

#: One builder per operator, in the order tables list them.
_BUILDERS: tuple[Callable[[], OpSpec], ...] = (
    _linear_solve_spec,
    _sinkhorn_spec,
    _soft_topk_spec,
    _soft_sorted_topk_spec,
)

@functools.cache
def _built() -> dict[str, OpSpec]:
    specs = [build() for build in _BUILDERS]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RuntimeError(f"duplicate operator names in the registry: {names}")
    return {s.name: s for s in specs}


def all_specs() -> list[OpSpec]:
    """Every registered operator, in table order (specs are built on first use)."""
    return list(_built().values())


def get_spec(name: str) -> OpSpec:
    """The operator called ``name`` (``ValueError`` listing the names if none)."""
    specs = _built()
    if name not in specs:
        raise ValueError(f"unknown operator {name!r}; registered: {', '.join(specs)}")
    return specs[name]
