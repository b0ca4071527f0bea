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
# Operator: implicit tanh layer z = tanh(W z + U x + b) (refimpl.deq)
# --------------------------------------------------------------------------

def _scaled_to_norm(M: np.ndarray, norm2: float) -> np.ndarray:
    """``M`` rescaled to spectral norm ``norm2``."""
    return M * (norm2 / np.linalg.norm(M, 2))


def _symmetric_with_spectrum(rng, eigenvalues) -> np.ndarray:
    """A random symmetric matrix with the given eigenvalues."""
    Q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (Q * np.asarray(eigenvalues, dtype=float)) @ Q.T


def _tanh_deq_oracle(x, W, U, b, **params):
    """Fixed point by MINPACK's hybrid Powell root finder (scipy.optimize.root,
    method "hybr") on ``z - tanh(W z + U x + b) = 0``, member by member,
    independent of refimpl's Picard/Anderson solvers; ``params`` (the
    refimpl solver's settings) are not used."""
    import scipy.optimize

    d = W.shape[-1]
    bshape = np.broadcast_shapes(x.shape[:-1], W.shape[:-2], U.shape[:-2], b.shape[:-1])
    x, W = np.broadcast_to(x, bshape + x.shape[-1:]), np.broadcast_to(W, bshape + (d, d))
    U, b = np.broadcast_to(U, bshape + U.shape[-2:]), np.broadcast_to(b, bshape + (d,))
    z = np.empty(bshape + (d,))
    for idx in np.ndindex(*bshape):
        Wi, ci = W[idx], U[idx] @ x[idx] + b[idx]

        def F(v):
            return v - np.tanh(Wi @ v + ci)

        def jac(v):
            return np.eye(d) - (1.0 - np.tanh(Wi @ v + ci) ** 2)[:, None] * Wi

        sol = scipy.optimize.root(F, np.zeros(d), jac=jac, method="hybr", options={"xtol": 1e-15})
        if not sol.success and np.max(np.abs(F(sol.x))) > 1e-13:
            raise RuntimeError(f"oracle root finder failed: {sol.message}")
        z[idx] = sol.x
    return z


def _deq_host_members(run: "CaseRun"):
    """Per-member float64 host quantities of a tanh_deq case at the computed z:
    ``(bshape, [(x, W, U, D, z) per member])`` with ``D = 1 - f(z)^2``."""
    h = run.host
    z = to_host(run.result.z).astype(np.float64)
    d = h["W"].shape[-1]
    bshape = z.shape[:-1]
    full = {k: np.broadcast_to(h[k], bshape + h[k].shape[h[k].ndim - c:])
            for k, c in zip(("x", "W", "U", "b"), (1, 2, 2, 1))}
    members = []
    for idx in np.ndindex(*bshape):
        x, W, U, b = (full[k][idx] for k in ("x", "W", "U", "b"))
        D = 1.0 - np.tanh(W @ z[idx] + U @ x + b) ** 2
        members.append((idx, x, W, U, D, z[idx].reshape(d)))
    return bshape, members


def _deq_host_bars(run: "CaseRun", bshape, members, us: list) -> tuple:
    """Closed form ``x_bar = U^T s, W_bar = s z^T, U_bar = s x^T, b_bar = s``
    with ``s = D u`` per member, summed to each input's shape."""
    h = run.host
    out = {k: np.zeros(bshape + h[k].shape[h[k].ndim - c:])
           for k, c in zip(("x", "W", "U", "b"), (1, 2, 2, 1))}
    for (idx, x, W, U, D, z), u in zip(members, us):
        s = D * u
        out["x"][idx], out["W"][idx] = U.T @ s, np.outer(s, z)
        out["U"][idx], out["b"][idx] = np.outer(s, x), s
    return tuple(_sum_to_shape_host(out[k], h[k].shape) for k in ("x", "W", "U", "b"))


def _deq_closed_form_tol(dtype: str, cond: float = 1.0) -> float:
    return {"float64": 1e-9, "float32": 2e-4}[dtype] * max(1.0, cond)


def _deq_exact_closed_form(run: "CaseRun") -> list[CheckResult]:
    """Exact VJP (dense and iterative backward) against the host closed form
    ``(I - J^T) u = g`` solved by numpy.linalg.solve, ``J = D W``."""
    from . import deq

    bshape, members = _deq_host_members(run)
    g = run.rng.standard_normal(to_host(run.result.z).shape)
    us, cond = [], 1.0
    for (idx, x, W, U, D, z) in members:
        A = np.eye(len(z)) - D[:, None] * W
        cond = max(cond, np.linalg.cond(A))
        us.append(np.linalg.solve(A.T, g[idx]))
    expected = _deq_host_bars(run, bshape, members, us)
    tol = _deq_closed_form_tol(run.dtype, cond / 10.0)
    gb = run.asarray(g)
    results = []
    for solver in ("dense", "anderson"):
        bars = deq.deq_vjp(run.result, gb, method="exact", solver=solver)
        results.append(compare(tuple(to_host(b) for b in bars), expected, rtol=tol,
                               name=f"exact_{solver}_closed_form"))
    return results


def _deq_phantom_closed_forms(run: "CaseRun") -> list[CheckResult]:
    """Phantom gradients against their defining formulas (host, float64):

    * ``npg_closed_form``: NPG == F^T u_k, ``u_k = lam sum_{i<k} (B^T)^i g``
      with explicit matrix powers of ``B = lam J + (1 - lam) I``;
    * ``upg_equals_npg``: UPG == NPG started at the (computed) fixed point;
    * ``k1_lam_jfb``: UPG and NPG with k = 1 equal lam * JFB, JFB == F^T g;
    * ``error_identity``: exact - NPG == F^T (B^T)^k u.
    """
    from . import deq

    bshape, members = _deq_host_members(run)
    g = run.rng.standard_normal(to_host(run.result.z).shape)
    gb = run.asarray(g)
    conds = [np.linalg.cond(np.eye(len(z)) - D[:, None] * W) for (_, _, W, _, D, z) in members]
    tol = _deq_closed_form_tol(run.dtype, max(conds) / 10.0)
    # UPG differs from NPG by O(residual of the forward); k steps accumulate it.
    upg_tol = {"float64": 1e-8, "float32": 2e-3}[run.dtype]
    host = lambda bars: tuple(to_host(b) for b in bars)  # noqa: E731
    results = []
    exact = host(deq.deq_vjp(run.result, gb, method="exact", solver="dense"))
    for k, lam in ((1, 1.0), (1, 0.3), (4, 0.5), (7, 0.9)):
        tag = f"[k={k},lam={lam}]"
        npg = host(deq.deq_vjp(run.result, gb, method="neumann", k=k, lam=lam))
        upg = host(deq.deq_vjp(run.result, gb, method="unroll", k=k, lam=lam))
        uk, err_u = [], []
        for (idx, x, W, U, D, z) in members:
            n = len(z)
            Bt = (lam * D[:, None] * W + (1.0 - lam) * np.eye(n)).T
            uk.append(lam * sum(np.linalg.matrix_power(Bt, i) @ g[idx] for i in range(k)))
            u = np.linalg.solve((np.eye(n) - D[:, None] * W).T, g[idx])
            err_u.append(np.linalg.matrix_power(Bt, k) @ u)
        results.append(compare(npg, _deq_host_bars(run, bshape, members, uk), rtol=tol,
                               name=f"npg_closed_form{tag}"))
        results.append(compare(upg, npg, rtol=upg_tol, name=f"upg_equals_npg{tag}"))
        err = tuple(e - p for e, p in zip(exact, npg))
        expected_err = _deq_host_bars(run, bshape, members, err_u)
        scale = max(np.max(np.abs(e)) for e in exact)
        results.append(compare(err, expected_err, rtol=tol, atol=tol * scale,
                               name=f"error_identity{tag}"))
        if k == 1:
            jfb = host(deq.deq_vjp(run.result, gb, method="jfb"))
            results.append(compare(jfb, _deq_host_bars(run, bshape, members,
                                                       [g[m[0]] for m in members]),
                                   rtol=tol, name="jfb_closed_form"))
            results.append(compare(npg, tuple(lam * j for j in jfb), rtol=tol,
                                   name=f"k1_lam_jfb_npg{tag}"))
            results.append(compare(upg, tuple(lam * j for j in jfb), rtol=upg_tol,
                                   name=f"k1_lam_jfb_upg{tag}"))
    return results


def _tanh_deq_spec() -> OpSpec:
    from . import deq

    def contractive(rng):
        d, p = 5, 3
        return {"W": _scaled_to_norm(rng.standard_normal((d, d)), 0.7),
                "U": rng.standard_normal((d, p)), "b": 0.5 * rng.standard_normal(d),
                "x": rng.standard_normal(p)}

    def batched_scales(rng):
        d, p = 4, 3
        scales = np.array([1e-6, 1e-3, 1.0, 30.0])[:, None]
        return {"W": _scaled_to_norm(rng.standard_normal((d, d)), 0.8),
                "U": rng.standard_normal((d, p)), "b": np.zeros(d),
                "x": rng.standard_normal((4, p)) * scales}

    def scalar(rng):
        return {"W": np.array([[0.6]]), "U": np.array([[1.3]]), "b": np.array([-0.2]),
                "x": np.array([0.8])}

    def near_non_contractive(rng):
        d, p = 5, 2
        return {"W": _symmetric_with_spectrum(rng, [0.985, 0.6, 0.1, -0.2, -0.5]),
                "U": 0.05 * rng.standard_normal((d, p)), "b": 0.02 * rng.standard_normal(d),
                "x": rng.standard_normal(p)}

    def negative_eigenvalues(rng):
        d, p = 5, 3
        return {"W": _symmetric_with_spectrum(rng, [-1.8, -1.2, -0.4, 0.2, 0.5]),
                "U": 0.3 * rng.standard_normal((d, p)), "b": 0.1 * rng.standard_normal(d),
                "x": rng.standard_normal((2, p))}

    def per_member_weights(rng):
        d, p = 4, 3
        W = np.stack([_scaled_to_norm(rng.standard_normal((d, d)), s) for s in (0.3, 0.6, 0.9)])
        return {"W": W, "U": rng.standard_normal((d, p)), "b": 0.3 * rng.standard_normal(d),
                "x": rng.standard_normal(p)}

    return OpSpec(
        name="tanh_deq",
        description="implicit layer z = tanh(W z + U x + b): exact implicit VJP/JVP, "
                    "phantom gradients (UPG, NPG, JFB) checked against closed forms",
        inputs=("x", "W", "U", "b"),
        core_ndim=(1, 2, 2, 1),
        output="z",
        output_core_ndim=1,
        forward=deq.tanh_deq,
        vjp=lambda res, z_bar: deq.deq_vjp(res, z_bar, method="exact"),
        jvp=lambda res, dx, dW, dU, db: deq.deq_jvp(res, dx, dW, dU, db),
        oracle=_tanh_deq_oracle,
        cases=(
            Case("contractive", "d=5, ||W||_2 = 0.7, one input", 71, contractive),
            Case("batched_scales", "batch of 4 inputs scaled 1e-6..30 (last one saturates "
                 "tanh), zero bias", 72, batched_scales, flags=("batched", "scales")),
            Case("scalar", "d = p = 1", 73, scalar, flags=("edge",)),
            Case("near_non_contractive", "symmetric W with eigenvalue 0.985: Picard rate "
                 "~0.98, cond(I - J) ~ 60", 74, near_non_contractive,
                 flags=("ill_conditioned",),
                 tol={"float64": {"fd": 1e-7, "batch": 1e-8},
                      "float32": {"fd": 5e-3, "forward": 5e-4}}),
            Case("negative_eigenvalues", "W eigenvalues down to -1.8 (||W||_2 > 1): undamped "
                 "Picard oscillates, damped Picard (lam = 0.5) converges", 75,
                 negative_eigenvalues, params={"method": "picard", "lam": 0.5, "max_iter": 3000},
                 flags=("batched", "non_contractive", "damping")),
            Case("per_member_weights", "W batched (3 members, ||W||_2 = 0.3, 0.6, 0.9), x, U, "
                 "b shared (gradients summed)", 76, per_member_weights,
                 flags=("batched", "broadcast")),
        ),
        tol={
            "float64": Tolerance(forward=1e-10, adjoint=1e-11, fd=1e-8, batch=1e-10),
            "float32": Tolerance(forward=5e-5, adjoint=1e-4, fd=5e-4, batch=1e-4),
        },
        extra_checks=(_deq_exact_closed_form, _deq_phantom_closed_forms),
        candidate_params=(),
    )


# --------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------

#: One builder per operator, in the order tables list them.
_BUILDERS: tuple[Callable[[], OpSpec], ...] = (
    _linear_solve_spec,
    _tanh_deq_spec,
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
