"""The one list of refimpl's operators and the checks run on each of them.

Every consumer iterates over this registry: ``refimpl verify`` (the CLI),
the test suite (``tests/test_registry.py`` runs every case on every
backend), the golden-vector exporter and ``validate``.  This module holds
the machinery; each operator's entries (cases, oracle, tolerances, its own
checks) live in ``refimpl/registry/<operator>.py``.  A new operator is added
in one place: write such a module with a ``BUILDERS`` tuple of functions
returning :class:`OpSpec` objects, and list it in ``_OPERATOR_MODULES``.

An :class:`OpSpec` says how to call the operator (forward, VJP, JVP), how its
inputs batch, where its independent forward oracle is, which directions are
feasible, how to canonicalise a gradient before comparing it (gauges), and
its tolerances per dtype.  A :class:`Case` is a named, seeded input
generator with flags describing the edge it exercises.

:func:`verify_case` runs, for one case on one backend and dtype:

``forward``     the primary output against the oracle (computed on the host
                in float64 from the same, dtype-rounded, inputs);
``converged``   the result's own convergence flags (every member's), when it has them;
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
import importlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from .. import backend as _backend
from ..backend import Backend, get_backend, to_host
from ..check import CheckResult, DEFAULT_FD_STEP, adjoint_test, compare, fd_jacobian_check

__all__ = [
    "Case",
    "CaseRun",
    "NamedGradient",
    "OpSpec",
    "Tolerance",
    "all_specs",
    "draw_directions",
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
    ``for_candidates=False`` keeps ``refimpl validate`` from comparing foreign
    implementations with this case: set it where a function following the
    candidate calling convention cannot reproduce the reference -- an
    approximant forward (MPA, MTP) or its own derivative, or a variant
    selected by a parameter candidates do not receive (unbalanced Sinkhorn's
    ``rho_a``/``rho_b``).  The case is still verified and exported, and
    validate lists it as skipped.
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
    for_candidates: bool = True


@dataclass(frozen=True)
class NamedGradient:
    """A gradient of an operator other than its default ``vjp`` (a phantom
    gradient of a DEQ, say), which ``validate --gradient NAME[:k=v,...]`` can
    take as the reference.

    Attributes
    ----------
    vjp : ``vjp(result, out_bar, **options) -> tuple of input cotangents``.
    options : ``{key: type}`` of the options ``NAME:key=value`` may set
        (``int`` or ``float``); an option left out takes ``vjp``'s default.
    description : one line for messages and docs.
    check : ``check(**options)`` raising ValueError for values out of range
        (default: none).
    """

    vjp: Callable
    options: Mapping[str, type] = field(default_factory=dict)
    description: str = ""
    check: Callable | None = None


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
        ``validate`` (the calling convention of docs/design.md, e.g. ``("eps",)``).
    conventions : ``{topic: one-sentence statement}``, JSON-able text written
        into the golden-vector manifest so a consumer in any language knows
        the conventions behind the numbers (which gauge ``canonicalize``
        fixes, which value of an operator is returned, how broadcast inputs'
        cotangents are reduced), e.g. ``{"gauge": "a_bar - mean(a_bar), ..."}``.
    gradient_scale : ``gradient_scale(inputs, output, out_bar, params) -> tuple``
        of arrays, one per input (broadcastable to it): the operator's own
        natural size of each input's gradient entries, for ``validate``'s
        round-off floor (host float64 arguments: the inputs keyed by name, the
        primary output, its cotangent, the forward's parameters).  Declare it
        where the generic size ``|out_bar| |out| / max(|x|, 1)`` misses the
        operator's sensitivity, e.g. a temperature-scaled, translation
        invariant map (SOFT top-k: ``max|A_bar| / t``).  Default: none.
    surrogate : True when the "VJP" is a surrogate gradient (identity,
        phantom): no adjoint or finite-difference check, its extra_checks
        compare against the defining formula instead.
    extra_checks : callables ``check(run: CaseRun) -> list[CheckResult]``.
    gradients : ``{name: NamedGradient}``, the gradients ``validate``
        accepts as ``gradient=NAME[:options]`` instead of ``vjp`` (default:
        none; the default gradient is then ``vjp`` alone).
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
    conventions: Mapping[str, str] = field(default_factory=dict)
    gradient_scale: Callable | None = None
    gradients: Mapping[str, NamedGradient] = field(default_factory=dict)

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


def draw_directions(spec: OpSpec, rng: np.random.Generator, host: dict,
                    out: np.ndarray) -> tuple[tuple, np.ndarray]:
    """The tangents (one per input, host) and the cotangent (host) of a case.

    Drawn from ``rng`` right after the inputs, tangents first: the spec's
    feasible-direction sampler or :func:`scaled_normal`, then the spec's
    cotangent sampler or a standard normal.  ``verify_case`` and the golden
    vectors both call this, so they check the very same numbers.
    """
    u = (spec.tangents(rng, host) if spec.tangents is not None
         else tuple(scaled_normal(rng, host[k], c) for k, c in zip(spec.inputs, spec.core_ndim)))
    v = (np.asarray(spec.cotangent(rng, out, host)) if spec.cotangent is not None
         else rng.standard_normal(out.shape))
    return u, v


def _canon(spec: OpSpec, bars) -> tuple:
    bars = tuple(bars)
    return tuple(spec.canonicalize(bars)) if spec.canonicalize else bars


def _batch_shape(spec: OpSpec, host: dict) -> tuple[int, ...]:
    shapes = [host[k].shape[: host[k].ndim - c] for k, c in zip(spec.inputs, spec.core_ndim)]
    return tuple(np.broadcast_shapes(*shapes))


def sum_to_shape_host(a: np.ndarray, shape: tuple) -> np.ndarray:
    lead = a.ndim - len(shape)
    a = a.sum(axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return a.sum(axis=axes, keepdims=True) if axes else a


def _check_batch(spec: OpSpec, case: Case, be: Backend, dtype: str, host: dict,
                 res, v_host: np.ndarray, tol: float) -> CheckResult:
    """Batch == loop, for the forward output and every input's cotangent.

    Each member is run alone as a core-shaped array, except on a backend
    whose batched kernels differ from its unbatched ones
    (:attr:`~refimpl.backend.Backend.member_exact_batches` false: torch's
    ``bmm`` against ``mm``, batched cuBLAS): there a member runs as a batch
    of one, which goes through the batched kernels, so the check still
    isolates what it is for (members must not interact) instead of the
    library's kernel choice."""
    bshape = _batch_shape(spec, host)
    lift = () if be.member_exact_batches else (None,)
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
            member.append(be.asarray(np.ascontiguousarray(full[idx][lift]), dtype))
        r = spec.forward(*member, **case.params)
        loop_out[idx] = to_host(getattr(r, spec.output)).reshape(loop_out[idx].shape)
        mb = _canon(spec, spec.vjp(r, be.asarray(v_host[idx][lift], dtype), **case.vjp_params))
        for i, b in enumerate(mb):
            if b is not None:
                loop_bars[i][idx] = to_host(b).reshape(loop_bars[i][idx].shape)
    errs = [compare(out, loop_out, rtol=tol)]
    for i, (k, b) in enumerate(zip(spec.inputs, bars_h)):
        if b is not None:
            errs.append(compare(b, sum_to_shape_host(loop_bars[i], host[k].shape), rtol=tol))
    worst = max(errs, key=lambda r: r.error)
    return CheckResult("batch", worst.error, tol, all(e.passed for e in errs),
                       f"{int(np.prod(bshape))} members")


def _on_host(v):
    """A diagnostic (array of any backend, or a Python scalar) as a NumPy array;
    None stays None."""
    if v is None:
        return None
    return np.asarray(v) if isinstance(v, (bool, int, float)) else np.asarray(to_host(v))


def _forward_checks(spec: OpSpec, case: Case, host: dict, res, out_h: np.ndarray,
                    tol: Tolerance) -> list[CheckResult]:
    """The output against the oracle (or, without one, finite), and the result's
    own convergence flags when it has them."""
    results: list[CheckResult] = []
    if spec.oracle is not None:
        try:
            expected = spec.oracle(*(host[k] for k in spec.inputs), **case.params)
            results.append(compare(out_h, np.asarray(expected), rtol=tol.forward, name="forward"))
        except Exception as exc:
            results.append(_failed("forward", exc))
    elif not np.all(np.isfinite(out_h)):
        results.append(CheckResult("forward", math.inf, 0.0, False, "output not finite"))
    if hasattr(res, "converged"):
        # Per-member flags (refimpl.iteration's convention): every member must converge.
        conv = _on_host(res.converged)
        iters = _on_host(getattr(res, "n_iter", None))
        ok = bool(np.all(conv))
        detail = (f"{int(conv.sum())} of {conv.size} converged, n_iter <= {int(iters.max())}"
                  if iters is not None and iters.size else "")
        results.append(CheckResult("converged", 0.0 if ok else 1.0, 0.0, ok, detail))
    return results


def _derivative_checks(spec: OpSpec, case: Case, be: Backend, host: dict, res,
                       u: tuple, v, tol: Tolerance) -> list[CheckResult]:
    """The adjoint test of JVP against VJP, and both against finite differences
    of the float64 forward along ``u`` (cotangent ``v``)."""
    results: list[CheckResult] = []

    def vjp(vv):
        return tuple(spec.vjp(res, vv, **case.vjp_params))

    spec_jvp = spec.jvp
    jvp = None if spec_jvp is None else (lambda *uu: spec_jvp(res, *uu, **case.jvp_params))

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
    return results


def _extra_check_results(spec: OpSpec, run: CaseRun) -> list[CheckResult]:
    """The operator's own checks; one that raises is a failed check named after it."""
    results: list[CheckResult] = []
    for extra in spec.extra_checks:
        try:
            results.extend(extra(run))
        except Exception as exc:
            results.append(_failed(getattr(extra, "__name__", "extra"), exc))
    return results


def _mutation_check(spec: OpSpec, arrays: tuple, host: dict, v, v_host: np.ndarray,
                    dtype: str) -> CheckResult:
    """No input array and not the cotangent was modified."""
    touched = [k for k, a in zip(spec.inputs, arrays) if not np.array_equal(to_host(a), host[k])]
    if not np.array_equal(to_host(v), v_host.astype(dtype)):
        touched.append("cotangent")
    return CheckResult("no_mutation", float(len(touched)), 0.0, not touched,
                       ("modified: " + ", ".join(touched)) if touched else "")


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

    try:
        res = spec.forward(*arrays, **case.params)
        out = getattr(res, spec.output)
    except Exception as exc:  # reported, not raised
        return [_failed("forward", exc)]
    out_h = to_host(out)
    results = _forward_checks(spec, case, host, res, out_h, tol)

    u_host, v_host = draw_directions(spec, rng, host, out_h)
    u = tuple(None if t is None else be.asarray(t, dtype) for t in u_host)
    v = be.asarray(v_host, dtype)
    if not spec.surrogate:
        results.extend(_derivative_checks(spec, case, be, host, res, u, v, tol))
    if _batch_shape(spec, host):
        try:
            results.append(_check_batch(spec, case, be, dtype, host, res, v_host, tol.batch))
        except Exception as exc:
            results.append(_failed("batch", exc))
    run = CaseRun(spec, case, be, dtype, host, arrays, res, rng, tol)
    results.extend(_extra_check_results(spec, run))
    results.append(_mutation_check(spec, arrays, host, v, v_host, dtype))
    return results


# --------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------

#: The registry modules ``refimpl/registry/<name>.py``, in the order tables
#: list their operators.  Each defines ``BUILDERS``, a tuple of functions
#: returning an :class:`OpSpec`; they are imported on first use.
_OPERATOR_MODULES = ("linsolve", "sinkhorn", "topk", "combinatorial", "matsqrt", "deq")


@functools.cache
def _built() -> dict[str, OpSpec]:
    specs = [build() for name in _OPERATOR_MODULES
             for build in importlib.import_module(f"{__name__}.{name}").BUILDERS]
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
