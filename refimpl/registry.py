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
# Operators: matrix square root and inverse square root (refimpl.matsqrt)
# --------------------------------------------------------------------------

def _spd(rng, eigenvalues) -> np.ndarray:
    """U diag(eigenvalues) U^T with a random orthogonal U (exactly symmetric)."""
    lam = np.asarray(eigenvalues, dtype=float)
    U, _ = np.linalg.qr(rng.standard_normal((lam.size, lam.size)))
    A = (U * lam) @ U.T
    return 0.5 * (A + A.T)


def _spd_cond(rng, n: int, cond: float) -> np.ndarray:
    """Random n x n SPD matrix with eigenvalues log-spaced in [1/cond, 1]."""
    return _spd(rng, np.logspace(-math.log10(cond), 0.0, n))


def _host_sym(X: np.ndarray) -> np.ndarray:
    return 0.5 * (X + np.swapaxes(X, -1, -2))


def _matsqrt_tangents(rng, host):
    """Feasible directions: symmetric, scaled like each member, and confined to
    the range of A where A is singular (so A +- h dA stays PSD)."""
    A = host["A"]
    dA = _host_sym(scaled_normal(rng, A, 2))
    lam, V = np.linalg.eigh(A)
    keep = lam > 1e-10 * np.max(np.abs(lam), axis=-1, keepdims=True)
    if not np.all(keep):
        P = (V * keep[..., None, :]) @ np.swapaxes(V, -1, -2)
        dA = _host_sym(P @ dA @ P)
    return (dA,)


def _matsqrt_canonicalize(bars):
    """Perturbations of a symmetric input are symmetric: compare sym(A_bar)."""
    (A_bar,) = bars
    return (None if A_bar is None else 0.5 * (A_bar + _backend.mT(A_bar)),)


def _is_exact_forward(params) -> bool:
    """eig, and ns iterated to its tolerance, compute the true root."""
    return params.get("method", "mpa") == "eig" or (
        params.get("method") == "ns" and params.get("iters") is None)


def _matsqrt_oracle(inverse: bool):
    """Independent forward: scipy.linalg.sqrtm per member for the exact
    methods; for the approximants (mpa, mtp, ns with fixed iters) the method's
    scalar map (closed forms, see matsqrt.scalar_map) applied in the
    eigenbasis of scipy.linalg.eigh."""
    def oracle(A, **params):
        import scipy.linalg

        from . import matsqrt

        out = np.empty_like(A)
        for idx in np.ndindex(*A.shape[:-2]):
            a = _host_sym(A[idx])
            if _is_exact_forward(params):
                s = scipy.linalg.sqrtm(a)
                if np.iscomplexobj(s):
                    if np.max(np.abs(s.imag)) > 1e-8 * np.max(np.abs(s.real)):
                        raise ValueError("scipy.linalg.sqrtm returned a complex root")
                    s = s.real
                out[idx] = scipy.linalg.inv(s) if inverse else s
                continue
            lam, U = scipy.linalg.eigh(a)
            lam = np.maximum(lam, 0.0)
            method = params["method"]
            if method == "ns":
                c, kw = lam.sum(), {"iters": params["iters"]}
            else:
                c = math.sqrt(float(np.sum(lam * lam)))
                kw = {k: params[k] for k in ("order", "degree") if k in params}
            phi = matsqrt.scalar_map(lam / c, method=method, inverse=inverse, **kw)
            out[idx] = (U * (c ** (-0.5 if inverse else 0.5) * phi)) @ U.T
        return out
    return oracle


def _matsqrt_extra_checks(inverse: bool):
    """Closed forms, the error bound, and gradient oracles (scipy.linalg.solve_sylvester)."""
    import scipy.linalg

    from . import matsqrt

    out_name = "S_inv" if inverse else "S"
    vjp_fn = matsqrt.inv_sqrtm_vjp if inverse else matsqrt.sqrtm_vjp

    def host_out(run):
        return to_host(getattr(run.result, out_name))

    def true_root(a):
        lam, U = np.linalg.eigh(_host_sym(a))
        s = np.sqrt(np.maximum(lam, 0.0))
        return (U * s) @ U.T, lam

    def root_identity(run):
        """S symmetric PSD, S S = A (or S_inv A S_inv = I) to the reported residual."""
        S, A = host_out(run), run.host["A"]
        n = A.shape[-1]
        asym = float(np.max(np.abs(S - np.swapaxes(S, -1, -2))))
        eig_min = float(np.min(np.linalg.eigvalsh(S) / np.linalg.norm(S, 2, axis=(-2, -1))[..., None]))
        if inverse:
            res = np.linalg.norm(S @ A @ S - np.eye(n), axis=(-2, -1)) / math.sqrt(n)
        else:
            res = np.linalg.norm(S @ S - A, axis=(-2, -1)) / np.linalg.norm(A, axis=(-2, -1))
        reported = to_host(run.result.residual)
        eps = float(np.finfo(run.dtype).eps)
        # the reported residual is computed in the working dtype: it agrees with
        # the float64 recomputation to 10% or to round-off
        gap = float(np.max(np.abs(res - reported) / (0.1 * res + 100 * n * eps)))
        ok = asym == 0.0 and eig_min > -1e-6 and gap <= 1.0
        out = [CheckResult("root_identity", gap, 1.0, ok,
                           f"asymmetry {asym:.1e}, min eig/||S|| {eig_min:.1e}, "
                           f"residual {np.max(res):.1e} (reported {np.max(reported):.1e})")]
        if _is_exact_forward(run.case.params):
            # an exact root's residual is round-off: n eps kappa(A) (inverse) or
            # n eps sqrt(kappa(A)) (sqrtm), with a factor 100 of slack
            kappa = float(np.max(np.linalg.cond(A)))
            lim = 100 * n * eps * (kappa if inverse else math.sqrt(kappa))
            out.append(compare(np.array([np.max(res)]), np.zeros(1), rtol=0.0, atol=lim,
                               name="residual_small"))
        return out

    def bound(run):
        """The bound beta = error_bound(spectrum): ||S - R||_2 <= beta ||R||_2 with R the
        true root, and it is attained: S commutes with R, so the eigenvalues of
        R^{-1/2} S R^{-1/2} - I are exactly the scalar relative errors and
        ||R^{-1/2} S R^{-1/2} - I||_2 = beta (up to round-off)."""
        p = run.case.params
        method = p.get("method", "mpa")
        A = run.host["A"]
        lam = np.linalg.eigvalsh(A)
        if np.min(lam) <= 1e-10 * np.max(lam):
            return []            # the relative bound is infinite at a singular A
        iters = to_host(run.result.n_iter) if method == "ns" else None
        kw = {k: p[k] for k in ("order", "degree") if k in p}
        beta = np.asarray(matsqrt.error_bound(lam, method=method, inverse=inverse,
                                              iters=iters, **kw))
        S = host_out(run)
        eps = float(np.finfo(run.dtype).eps)
        over, gap = [], []
        for idx in np.ndindex(*A.shape[:-2]):
            w, U = np.linalg.eigh(A[idx])
            r = np.sqrt(w) ** (-1.0 if inverse else 1.0)          # eigenvalues of R
            R = (U * r) @ U.T
            # round-off allowance: the forward's own (Padé in Z: ~16^m eps) relative
            # error, amplified by sqrt(kappa) in the direction of the smallest eigenvalue
            m = kw.get("order", matsqrt.DEFAULT_MPA_ORDER)
            growth = (4.0 if p.get("basis") == "x" else 16.0) ** m if method == "mpa" else 100.0
            floor = growth * A.shape[-1] * eps
            slack = floor * math.sqrt(float(np.max(w) / np.min(w)))
            over.append(np.linalg.norm(S[idx] - R, 2) / np.max(np.abs(r)) - float(beta[idx]) - slack)
            Rm = (U / np.sqrt(r)) @ U.T                               # R^{-1/2}
            gap.append(abs(np.linalg.norm(Rm @ S[idx] @ Rm - np.eye(len(r)), 2) - float(beta[idx]))
                       - slack)
        return [CheckResult("error_bound", max(over), 0.0, max(over) <= 0.0,
                            f"max bound {float(np.max(beta)):.2e}"),
                CheckResult("error_bound_attained", max(gap), 0.0, max(gap) <= 0.0,
                            "| ||R^-1/2 S R^-1/2 - I||_2 - bound | - round-off allowance")]

    def gradient_oracle(run):
        """A_bar against scipy.linalg.solve_sylvester: with the true root for
        "exact", with the forward's own S (or S_inv) for "lyapunov_sign"."""
        vmethod = run.case.vjp_params.get("method", "exact")
        if vmethod == "approximant":
            return []            # checked by the adjoint test, FD and tests/test_matsqrt.py
        A = run.host["A"]
        G = run.rng.standard_normal(A.shape)
        A_bar = to_host(vjp_fn(run.result, run.asarray(G), **run.case.vjp_params))
        S_res = host_out(run)
        expect = np.empty_like(A)
        for idx in np.ndindex(*A.shape[:-2]):
            if vmethod == "exact":
                S, _ = true_root(A[idx])
                rhs = -np.linalg.solve(S, np.linalg.solve(S, G[idx].T).T) if inverse else G[idx]
                # S X + X S = G   (inverse: with G replaced by -T G T, T = S^{-1})
                expect[idx] = scipy.linalg.solve_sylvester(S, S, rhs)
            else:
                T = S_res[idx]
                rhs = -(T @ T) @ G[idx] @ (T @ T) if inverse else G[idx]
                expect[idx] = scipy.linalg.solve_sylvester(T, T, rhs)
        return [compare(_host_sym(A_bar), _host_sym(expect), rtol=run.tol.adjoint * 100,
                        name="gradient_vs_solve_sylvester")]

    def closed_forms(run):
        """A = cI: S = sqrt(c) I, A_bar = sym(G)/(2 sqrt c) (inverse: -sym(G)/(2 c^{3/2}));
        diagonal A; the 2x2 formula S = (A + sqrt(det A) I)/sqrt(tr A + 2 sqrt(det A))."""
        flags = set(run.case.flags)
        A = run.host["A"]
        S = host_out(run)
        rt = run.tol.forward
        out = []
        exact_vjp = run.case.vjp_params.get("method", "exact") in ("exact", "lyapunov_sign")
        if "identity" in flags:
            c = float(A[..., 0, 0].reshape(-1)[0])
            n = A.shape[-1]
            expect = (c ** -0.5 if inverse else c ** 0.5) * np.eye(n)
            if _is_exact_forward(run.case.params):
                out.append(compare(S, np.broadcast_to(expect, S.shape), rtol=rt, name="closed_form_S"))
            if exact_vjp:
                G = run.rng.standard_normal(A.shape)
                A_bar = to_host(vjp_fn(run.result, run.asarray(G), **run.case.vjp_params))
                k = -1.0 / (2.0 * c ** 1.5) if inverse else 1.0 / (2.0 * math.sqrt(c))
                out.append(compare(A_bar, k * _host_sym(G), rtol=run.tol.adjoint * 100,
                                   name="closed_form_A_bar"))
        if "diagonal" in flags:
            d = np.diagonal(A, axis1=-2, axis2=-1)
            s = np.sqrt(d)
            if _is_exact_forward(run.case.params):
                expect = np.zeros_like(A)
                np.einsum("...ii->...i", expect)[...] = 1.0 / s if inverse else s
                out.append(compare(S, expect, rtol=rt, name="closed_form_S"))
            if exact_vjp:
                G = run.rng.standard_normal(A.shape)
                A_bar = to_host(vjp_fn(run.result, run.asarray(G), **run.case.vjp_params))
                si, sj = s[..., :, None], s[..., None, :]
                K = -1.0 / (si * sj * (si + sj)) if inverse else 1.0 / (si + sj)
                out.append(compare(A_bar, _host_sym(G) * K, rtol=run.tol.adjoint * 100,
                                   name="closed_form_A_bar"))
        if "two_by_two" in flags and _is_exact_forward(run.case.params):
            det = A[..., 0, 0] * A[..., 1, 1] - A[..., 0, 1] * A[..., 1, 0]
            tr = A[..., 0, 0] + A[..., 1, 1]
            sd = np.sqrt(det)[..., None, None]
            R = (A + sd * np.eye(2)) / np.sqrt(tr[..., None, None] + 2.0 * sd)
            out.append(compare(S, np.linalg.inv(R) if inverse else R, rtol=rt,
                               name="closed_form_2x2"))
        if "scalar" in flags:
            a = np.asarray(A[..., 0, 0])
            out.append(compare(np.asarray(S[..., 0, 0]), np.asarray(a ** (-0.5 if inverse else 0.5)),
                               rtol=rt, name="closed_form_scalar"))
            G = np.ones(A.shape)
            A_bar = to_host(vjp_fn(run.result, run.asarray(G), **run.case.vjp_params))
            deriv = np.asarray(-0.5 * a ** -1.5 if inverse else 0.5 * a ** -0.5)  # d a^{+-1/2}/da
            out.append(compare(np.asarray(A_bar[..., 0, 0]), deriv, rtol=run.tol.adjoint * 100,
                               name="closed_form_scalar_derivative"))
        return out

    return (root_identity, bound, gradient_oracle, closed_forms)


def _matsqrt_cases(inverse: bool) -> tuple[Case, ...]:
    base = 420 if inverse else 400

    def well(rng):
        return {"A": _spd_cond(rng, 5, 10.0)}

    def small_well(rng):
        return {"A": _spd_cond(rng, 4, 2.0)}

    def identity(rng):
        return {"A": 2.5 * np.eye(4)}

    def repeated(rng):
        return {"A": _spd(rng, [1.0, 1.0, 1.0, 4.0, 4.0, 9.0])}

    def ill(rng):
        return {"A": _spd_cond(rng, 6, 1e6)}

    def moderately_ill(rng):
        return {"A": _spd_cond(rng, 5, 1e4)}

    def batched_scales(rng):
        scales = np.array([1e-6, 1e-2, 1.0, 1e3])[:, None, None]
        return {"A": np.stack([_spd_cond(rng, 4, 20.0) for _ in range(4)]) * scales}

    def rank_deficient(rng):
        # small integers: A = X X^T is exactly representable in float32, so
        # its rank (3 of 5) survives the rounding to the working dtype
        X = rng.integers(-3, 4, size=(5, 3)).astype(float)
        return {"A": X @ X.T}

    def diagonal(rng):
        return {"A": np.diag([0.5, 2.0, 2.0, 7.0])}

    def two_by_two(rng):
        return {"A": np.array([[[3.0, 1.0], [1.0, 2.0]], [[0.2, -0.1], [-0.1, 5.0]]])}

    def scalar(rng):
        return {"A": np.array([[2.7]])}

    mpa, mtp = {"method": "mpa"}, {"method": "mtp"}
    eig, ns = {"method": "eig"}, {"method": "ns"}
    exact, lyap, appr = {"method": "exact"}, {"method": "lyapunov_sign"}, {"method": "approximant"}
    ill_tol = {"float64": {"forward": 1e-9, "fd": 1e-6, "adjoint": 1e-10}}

    cases = [
        Case("eig_exact", "random 5x5 SPD, cond 10: eig forward, exact eigenbasis VJP",
             base + 1, well, params=eig, vjp_params=exact, jvp_params=exact),
        Case("scaled_identity", "A = 2.5 I: every eigenvalue repeated (closed form G/(2 sqrt c))",
             base + 2, identity, params=eig, vjp_params=exact, jvp_params=exact,
             flags=("repeated_eigenvalues", "identity")),
        Case("repeated_eigenvalues", "spectrum {1,1,1,4,4,9}: exact VJP stays finite and exact",
             base + 3, repeated, params=eig, vjp_params=exact, jvp_params=exact,
             flags=("repeated_eigenvalues",)),
        Case("repeated_lyapunov_sign", "spectrum {1,1,1,4,4,9}, Lyapunov VJP via the sign function",
             base + 4, repeated, params=eig, vjp_params=lyap, jvp_params=lyap,
             flags=("repeated_eigenvalues",)),
        Case("mpa_approximant", "MPA [5/5] forward and its own exact derivative",
             base + 5, well, params=mpa, vjp_params=appr, jvp_params=appr),
        Case("mpa_x_basis_ill_conditioned",
             "MPA [8/8] in the stable basis X = A/c on a cond-1e4 matrix, its own derivative "
             "(float64 only: the round-off floor of an order-8 Padé is ~1e-12 here)",
             base + 6, moderately_ill, params={"method": "mpa", "order": 8, "basis": "x"},
             vjp_params=appr, jvp_params=appr, flags=("ill_conditioned",), dtypes=("float64",),
             fd_step=1e-6, tol={"float64": {"forward": 1e-10, "adjoint": 1e-10, "fd": 1e-6}}),
        Case("mpa_lyapunov_sign",
             "the paper's pair: MPA [5/5] forward, Lyapunov-sign backward. FD differentiates the "
             "MPA forward, the Lyapunov VJP the true root: they differ by the MPA's derivative "
             "error (~1e-6 here, cond 2), hence fd tol 1e-4; gradient_vs_solve_sylvester checks the "
             "Lyapunov solve itself tightly",
             base + 7, small_well, params=mpa, vjp_params=lyap, jvp_params=lyap,
             tol={"float64": {"fd": 1e-4}}),
        Case("mtp_approximant", "MTP degree 10 forward and its own exact derivative",
             base + 8, well, params=mtp, vjp_params=appr, jvp_params=appr),
        Case("ns_approximant", "coupled Newton-Schulz (to tolerance), derivative through its steps",
             base + 9, well, params=ns, vjp_params=appr, jvp_params=appr),
        Case("ill_conditioned", "6x6 with cond 1e6: eig forward, exact VJP (float64 only)",
             base + 10, ill, params=eig, vjp_params=exact, jvp_params=exact,
             flags=("ill_conditioned",), dtypes=("float64",), fd_step=1e-9, tol=ill_tol),
        Case("ill_conditioned_lyapunov_sign",
             "5x5 with cond 1e4: the sign iteration needs ~20 steps; NS forward (float64 only)",
             base + 11, moderately_ill, params=ns, vjp_params=lyap, jvp_params=lyap,
             flags=("ill_conditioned",), dtypes=("float64",), fd_step=1e-6, tol=ill_tol),
        Case("batched_scales_mpa",
             "batch of 4 whose members differ in scale 1e-6..1e3: per-member normalisation, MPA",
             base + 12, batched_scales, params=mpa, vjp_params=appr, jvp_params=appr,
             flags=("batched", "scales")),
        Case("batched_scales_lyapunov_sign",
             "batch of 4 with scales 1e-6..1e3: NS forward, Lyapunov-sign VJP, per-member scaling",
             base + 13, batched_scales, params=ns, vjp_params=lyap, jvp_params=lyap,
             flags=("batched", "scales")),
        Case("diagonal", "diagonal A with a repeated entry: closed forms for S and A_bar",
             base + 14, diagonal, params=eig, vjp_params=exact, jvp_params=exact,
             flags=("diagonal", "repeated_eigenvalues")),
        Case("two_by_two", "batch of 2x2: S = (A + sqrt(det A) I)/sqrt(tr A + 2 sqrt(det A))",
             base + 15, two_by_two, params=ns, vjp_params=exact, jvp_params=exact,
             flags=("two_by_two", "batched")),
        Case("scalar_mpa", "1x1: every method is exact, d a^{1/2}/da closed form",
             base + 16, scalar, params=mpa, vjp_params=appr, jvp_params=appr,
             flags=("scalar", "edge")),
    ]
    if not inverse:
        cases.append(Case(
            "rank_deficient_mpa",
            "rank 3 of 5 (PSD, singular): the MPA maps 0 to sqrt(||A||_F)/11; the true root is "
            "not differentiable there but the MPA is, so its own derivative is checked along "
            "directions in the range of A (psd_tol 1e-8: a direction rounded to float32 leaves "
            "the range by ~1e-7 relative, so A + h dA has eigenvalues ~ -1e-11 ||A||)",
            base + 17, rank_deficient, params={"method": "mpa", "psd_tol": 1e-8},
            vjp_params=appr, jvp_params=appr, flags=("rank_deficient",)))
    # An MPA/MTP forward is an approximation of the root (its error is
    # error_bound(spectrum)): such a case checks refimpl's approximant, and a
    # foreign candidate computing the true root (the fn(A) -> S convention)
    # should be compared only on the other cases.  1x1 inputs are exact.
    return tuple(
        dataclasses.replace(c, flags=c.flags + ("approximate_forward",))
        if c.params.get("method", "mpa") in ("mpa", "mtp") and "scalar" not in c.flags else c
        for c in cases)


def _matsqrt_spec(inverse: bool) -> OpSpec:
    from . import matsqrt

    if inverse:
        forward, vjp, jvp = matsqrt.inv_sqrtm, matsqrt.inv_sqrtm_vjp, matsqrt.inv_sqrtm_jvp
    else:
        forward, vjp, jvp = matsqrt.sqrtm, matsqrt.sqrtm_vjp, matsqrt.sqrtm_jvp
    return OpSpec(
        name="inv_sqrtm" if inverse else "sqrtm",
        description=("A^{-1/2} of SPD matrices" if inverse else "A^{1/2} of SPD matrices")
        + " (MPA/MTP/NS/eig), exact / Lyapunov-sign / approximant VJPs",
        inputs=("A",),
        core_ndim=(2,),
        output="S_inv" if inverse else "S",
        output_core_ndim=2,
        forward=forward,
        vjp=lambda res, G, **kw: (vjp(res, G, **kw),),
        jvp=lambda res, dA, **kw: jvp(res, dA, **kw),
        oracle=_matsqrt_oracle(inverse),
        cases=_matsqrt_cases(inverse),
        tol={
            "float64": Tolerance(forward=1e-12, adjoint=1e-12, fd=1e-8, batch=1e-12),
            "float32": Tolerance(forward=2e-5, adjoint=1e-5, fd=1e-3, batch=1e-5),
        },
        tangents=_matsqrt_tangents,
        canonicalize=_matsqrt_canonicalize,
        extra_checks=_matsqrt_extra_checks(inverse),
        candidate_params=(),
    )


def _sqrtm_spec() -> OpSpec:
    return _matsqrt_spec(inverse=False)


def _inv_sqrtm_spec() -> OpSpec:
    return _matsqrt_spec(inverse=True)


# --------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------

#: One builder per operator, in the order tables list them.
_BUILDERS: tuple[Callable[[], OpSpec], ...] = (
    _linear_solve_spec,
    _sqrtm_spec,
    _inv_sqrtm_spec,
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
