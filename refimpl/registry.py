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
    conventions : ``{topic: one-sentence statement}``, JSON-able text written
        into the golden-vector manifest so a consumer in any language knows
        the conventions behind the numbers (which gauge ``canonicalize``
        fixes, which value of an operator is returned, how broadcast inputs'
        cotangents are reduced), e.g. ``{"gauge": "a_bar - mean(a_bar), ..."}``.
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
    conventions: Mapping[str, str] = field(default_factory=dict)

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
                 tol={"float64": {"forward": 1e-8, "adjoint": 1e-9, "fd": 1e-6}}),
            Case("scalar", "1x1 system", 5, scalar, flags=("edge",)),
        ),
        tol={
            "float64": Tolerance(forward=1e-11, adjoint=1e-11, fd=1e-8, batch=1e-12),
            "float32": Tolerance(forward=1e-4, adjoint=1e-6, fd=1e-3, batch=1e-5),
        },
        conventions={
            "output": "x solves A x = b (the unique solution; A is non-singular)",
            "broadcasting": "batch dimensions of A (..., n, n) and b (..., n) broadcast; "
                            "the cotangent of a broadcast input is summed over the "
                            "dimensions it was broadcast along, so it has that input's shape",
            "gauge": "none (the gradient is unique)",
        },
    )


# --------------------------------------------------------------------------
# Operator: combinatorial solvers, identity with projection (refimpl.combinatorial)
# --------------------------------------------------------------------------
#
# The projections P_mean, P_norm, P_std are smooth maps and get the full
# treatment (oracle, adjoint test, finite differences, dense closed-form
# Jacobian).  The gradients through the solvers (identity with projection,
# blackbox, perturbed, straight-through) are surrogates: the solvers are
# piecewise constant, so finite differences say 0.  Those specs are
# ``surrogate=True``; their checks recompute the defining formula on the host
# from independent pieces (brute-force solvers in exact arithmetic, dense
# closed-form projection Jacobians, the exact smoothed Jacobian of the
# perturbed argmin) and check the stated properties.  For surrogate specs the
# Tolerance fields mean: ``forward`` the oracle comparison, ``adjoint`` the
# defining-formula and property checks, ``fd`` the Monte-Carlo comparison of
# the perturbed estimator with the exact smoothed Jacobian.

def _host_project(w: np.ndarray, projection: str) -> np.ndarray:
    """P(w) over the last axis on the host, by routes independent of
    refimpl.combinatorial: scipy.signal.detrend (mean), np.linalg.norm (norm),
    scipy.stats.zscore / sqrt(n) (std: zscore divides by the ddof=0 standard
    deviation ||w - mean|| / sqrt(n))."""
    import scipy.signal
    import scipy.stats

    if projection in (None, "none"):
        return w.copy()
    if projection == "mean":
        return scipy.signal.detrend(w, axis=-1, type="constant")
    if projection == "norm":
        return w / np.linalg.norm(w, axis=-1, keepdims=True)
    if projection == "std":
        return scipy.stats.zscore(w, axis=-1) / math.sqrt(w.shape[-1])
    raise ValueError(projection)


def _host_projection_jacobian(w: np.ndarray, projection: str) -> np.ndarray:
    """Dense P'(w) of one flattened instance, from the closed forms
    I, I - 1 1^T / n, (I - u u^T) / ||w||, (I - u u^T)(I - 1 1^T / n) / ||v||."""
    n = w.size
    eye = np.eye(n)
    centring = eye - np.full((n, n), 1.0 / n)
    if projection in (None, "none"):
        return eye
    if projection == "mean":
        return centring
    v = w if projection == "norm" else centring @ w
    r = np.linalg.norm(v)
    u = v / r
    tangent = (eye - np.outer(u, u)) / r
    return tangent if projection == "norm" else tangent @ centring


def _flat_core(a: np.ndarray, core: int) -> np.ndarray:
    return a.reshape(a.shape[: a.ndim - core] + (-1,))


def _host_noise(shape, alpha: float, seed) -> np.ndarray:
    """The noise margin's definition: Uniform{-alpha/2, +alpha/2} from the seed."""
    signs = 2.0 * np.random.default_rng(seed).integers(0, 2, size=shape) - 1.0
    return 0.5 * alpha * signs


def _host_identity_pipeline(w, core, projection=None, alpha=0.0, noise_order="after", seed=None):
    """(u, w_lin): the cost the solver sees and the point where P' is taken."""
    xi = _host_noise(w.shape, alpha, seed) if alpha > 0 else np.zeros_like(w)
    lin = w + xi if noise_order == "before" else w
    u = _host_project(_flat_core(lin, core), projection).reshape(w.shape)
    return (u if noise_order == "before" else u + xi), lin


# -- brute-force solvers: enumerate Y, minimise <w, y> in exact arithmetic ----

def _grid_neighbours(H: int, Wd: int, neighbourhood: int) -> dict:
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if neighbourhood == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    return {i * Wd + j: [(i + a) * Wd + j + b for a, b in steps
                         if 0 <= i + a < H and 0 <= j + b < Wd]
            for i in range(H) for j in range(Wd)}


def _grid_paths(H: int, Wd: int, neighbourhood: int):
    """Every simple path from vertex 0 to vertex H*Wd - 1 (as vertex tuples)."""
    adj, target = _grid_neighbours(H, Wd, neighbourhood), H * Wd - 1
    stack = [(0, (0,))]
    while stack:
        v, path = stack.pop()
        if v == target:
            yield path
            continue
        for nxt in adj[v]:
            if nxt not in path:
                stack.append((nxt, path + (nxt,)))


def _feasible_set(kind: str, shape: tuple, **params):
    """Y as a list of supports (tuples of flat indices, ranks for 'ranking'),
    in the enumeration order that encodes the documented tie rule."""
    if kind == "argmin_onehot":
        return [((i,), None) for i in range(shape[-1])]
    if kind == "top_k":
        return [(c, None) for c in itertools.combinations(range(shape[-1]), params["k"])]
    if kind == "ranking":
        n = shape[-1]
        return [(tuple(range(n)), p) for p in itertools.permutations(range(1, n + 1))]
    if kind == "assignment":
        n, m = shape[-2:]
        if n <= m:
            return [(tuple(i * m + c for i, c in enumerate(cols)), None)
                    for cols in itertools.permutations(range(m), n)]
        return [(tuple(r * m + j for j, r in enumerate(rows)), None)
                for rows in itertools.permutations(range(n), m)]
    if kind == "shortest_path":
        H, Wd = shape[-2:]
        return [(p, None) for p in _grid_paths(H, Wd, params.get("neighbourhood", 8))]
    raise ValueError(kind)


def _brute(kind: str, w: np.ndarray, **params) -> np.ndarray:
    """argmin_{y in Y} <w, y> per batch member by enumeration, with exact
    rational arithmetic (fractions.Fraction of the float64 entries), keeping
    the first minimiser in enumeration order: lowest index (argmin), the
    lexicographically smallest index set (top_k), the lexicographically
    smallest rank vector, i.e. lower index -> lower rank among ties (ranking).
    Assignment and shortest path are meant for inputs with a unique optimum."""
    from fractions import Fraction

    core = 1 if kind in ("argmin_onehot", "top_k", "ranking") else 2
    w = np.asarray(w, dtype=np.float64)
    Y = _feasible_set(kind, w.shape, **{k: v for k, v in params.items() if k != "negative"})
    out = np.zeros(w.shape)
    for idx in np.ndindex(*w.shape[: w.ndim - core]):
        flat = w[idx].reshape(-1)
        if params.get("negative") == "clip":
            flat = np.maximum(flat, 0.0)
        q = [Fraction(float(v)) for v in flat]
        best, best_val = None, None
        for support, values in Y:
            val = (sum(q[i] for i in support) if values is None
                   else sum(q[i] * v for i, v in zip(support, values)))
            if best_val is None or val < best_val:
                best, best_val = (support, values), val
        y = np.zeros(flat.size)
        y[list(best[0])] = 1.0 if best[1] is None else np.asarray(best[1], dtype=float)
        out[idx] = y.reshape(w[idx].shape)
    return out


# -- checks shared by the combinatorial specs --------------------------------

def _projection_of(case: Case) -> str:
    p = case.params.get("projection")
    return "none" if p is None else p


def _identity_expected(host_w: np.ndarray, g: np.ndarray, core: int, sense: str, params) -> np.ndarray:
    """s P'(w_lin)^T g per member with dense closed-form Jacobians."""
    _, lin = _host_identity_pipeline(host_w, core, params.get("projection"), params.get("alpha", 0.0),
                                     params.get("noise_order", "after"), params.get("seed"))
    s = -1.0 if sense == "min" else 1.0
    lin_f, g_f = _flat_core(lin, core), _flat_core(g, core)
    out = np.empty_like(g_f)
    for idx in np.ndindex(*lin_f.shape[:-1]):
        out[idx] = s * _host_projection_jacobian(lin_f[idx], params.get("projection")).T @ g_f[idx]
    return out.reshape(g.shape)


def _check_identity_formula(sense: str):
    def identity_formula(run: CaseRun) -> list[CheckResult]:
        (name,), core = run.spec.inputs, run.spec.core_ndim[0]
        g = run.rng.standard_normal(run.host[name].shape)
        got = run.spec.vjp(run.result, run.asarray(g), **run.case.vjp_params)[0]
        want = _identity_expected(run.host[name], g, core, sense, run.case.params)
        return [compare(to_host(got), want, rtol=run.tol.adjoint, name="identity_formula")]
    return identity_formula


def _orthogonality(w_bar: np.ndarray, ref: np.ndarray, core: int) -> float:
    """max over members of |<ref, w_bar>| / (||ref|| ||w_bar||)."""
    wb, rf = _flat_core(w_bar, core), _flat_core(ref, core)
    num = np.abs(np.sum(wb * rf, axis=-1))
    den = np.linalg.norm(wb, axis=-1) * np.linalg.norm(rf, axis=-1)
    return float(np.max(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)))


def _check_identity_properties(run: CaseRun) -> list[CheckResult]:
    """r _|_ 1 (mean, std), r _|_ w (norm, std), r(w + t 1) = r(w) (mean, std),
    r(c w) = r(w) / c (norm, std), for r = identity_vjp at the linearisation point."""
    from . import combinatorial as comb

    (name,), core = run.spec.inputs, run.spec.core_ndim[0]
    projection = _projection_of(run.case)
    if projection == "none":
        return []
    _, lin = _host_identity_pipeline(run.host[name], core, projection, run.case.params.get("alpha", 0.0),
                                     run.case.params.get("noise_order", "after"), run.case.params.get("seed"))
    g = run.rng.standard_normal(lin.shape)

    def r_at(x):
        return to_host(comb.identity_vjp(run.asarray(x), run.asarray(g), projection=projection,
                                         core_ndim=core))

    r0, tol, out = r_at(lin), run.tol.adjoint, []
    if projection in ("mean", "std"):
        out.append(_result_of("orthogonal_to_ones", _orthogonality(r0, np.ones_like(lin), core), tol))
        t = 3.0 * np.max(np.abs(lin), axis=tuple(range(-core, 0)), keepdims=True)  # per member
        out.append(compare(r_at(lin + t), r0, rtol=tol, name="translation_invariance"))
    if projection in ("norm", "std"):
        out.append(_result_of("orthogonal_to_w", _orthogonality(r0, lin, core), tol))
        out.append(compare(5.0 * r_at(5.0 * lin), r0, rtol=tol, name="scale_covariance"))
    return out


def _result_of(check: str, error: float, tol: float, detail: str = "") -> CheckResult:
    return CheckResult(check, float(error), float(tol), bool(math.isfinite(error) and error <= tol), detail)


def _check_forward_invariance(solver_of):
    def forward_invariance(run: CaseRun) -> list[CheckResult]:
        """y(P(w)) == y(w) exactly, for a noise-free case with a projection."""
        if _projection_of(run.case) == "none" or run.case.params.get("alpha", 0.0) > 0:
            return []
        y_raw = to_host(solver_of(run.case.params)(run.arrays[0]))
        n_diff = int(np.sum(y_raw != to_host(run.output)))
        return [_result_of("forward_invariance", n_diff, 0.0, f"{n_diff} entries differ")]
    return forward_invariance


def _solver_with(kind: str, params) -> Callable:
    from . import combinatorial as comb

    keep = {k: v for k, v in params.items() if k in ("k", "neighbourhood", "negative")}
    solver = getattr(comb, kind)
    return functools.partial(solver, **keep) if keep else solver


_IDENTITY_KW = ("projection", "alpha", "noise_order", "seed")


def _identity_spec(kind: str) -> OpSpec:
    from . import combinatorial as comb

    core = 1 if kind in ("argmin_onehot", "top_k", "ranking") else 2
    extra = (_check_refuses_mean,) if kind == "shortest_path" else ()
    cases = _identity_cases(kind)

    def forward(w, **params):
        kw = {k: params[k] for k in _IDENTITY_KW if k in params}
        rng = kw.pop("seed", None)
        return comb.identity_layer(_solver_with(kind, params), w, rng=rng, **kw)

    def oracle(w, **params):
        u, _ = _host_identity_pipeline(w, core, params.get("projection"), params.get("alpha", 0.0),
                                       params.get("noise_order", "after"), params.get("seed"))
        return _brute(kind, u, **{k: v for k, v in params.items() if k not in _IDENTITY_KW})

    solver_params = {"top_k": ("k",), "shortest_path": ("neighbourhood",)}.get(kind, ())
    return OpSpec(
        name=f"identity_{kind}",
        description=f"{kind} solver, identity-with-projection backward (surrogate)",
        inputs=("w",) if core == 1 else ("W",),
        core_ndim=(core,),
        output="y",
        output_core_ndim=core,
        forward=forward,
        vjp=lambda res, y_bar: (comb.identity_layer_vjp(res, y_bar),),
        jvp=None,
        oracle=oracle,
        cases=cases,
        tol={"float64": Tolerance(forward=0.0, adjoint=1e-12, fd=0.0, batch=1e-13),
             "float32": Tolerance(forward=0.0, adjoint=2e-5, fd=0.0, batch=1e-6)},
        surrogate=True,
        extra_checks=(_check_identity_formula("min"), _check_identity_properties,
                      _check_forward_invariance(lambda p: _solver_with(kind, p))) + extra,
        candidate_params=solver_params + ("projection",),
    )


def _scaled_batch(rng, shape, scales=(1e-6, 1e-2, 1.0, 1e3)) -> np.ndarray:
    s = np.asarray(scales).reshape((-1,) + (1,) * (len(shape) - 1))
    return rng.standard_normal(shape) * s


def _vector_cases(extra_params=None, n=6) -> tuple:
    """The identity cases shared by the vector solvers (argmin, top-k, ranking)."""
    sp = dict(extra_params or {})

    def generic(rng):
        return {"w": rng.standard_normal(n)}

    def ties(rng):
        return {"w": np.array([0.5, -1.0, 0.5, 2.0, -1.0, 0.5])[:n]}

    def scales(rng):
        return {"w": _scaled_batch(rng, (4, n))}

    return (
        Case("plain", "no projection: w_bar = -y_bar exactly", 11, generic, params=dict(sp)),
        Case("mean", "P_mean", 12, generic, params=dict(sp, projection="mean")),
        Case("norm", "P_norm", 13, generic, params=dict(sp, projection="norm")),
        Case("std", "P_std", 14, generic, params=dict(sp, projection="std")),
        Case("ties", "repeated costs (documented tie-break), P_std", 15, ties,
             params=dict(sp, projection="std"), flags=("ties",)),
        Case("batched_scales", "batch of 4 with scales 1e-6..1e3, P_std", 16, scales,
             params=dict(sp, projection="std"), flags=("batched", "scales")),
        Case("noise_after", "noise margin alpha=0.3 after P_std", 17, generic,
             params=dict(sp, projection="std", alpha=0.3, noise_order="after", seed=5),
             flags=("noise",)),
        Case("noise_before", "noise margin alpha=0.3 before P_norm", 18, generic,
             params=dict(sp, projection="norm", alpha=0.3, noise_order="before", seed=6),
             flags=("noise",)),
    )


def _check_refuses_mean(run: CaseRun) -> list[CheckResult]:
    """shortest_path + P_mean must be refused (paths differ in length)."""
    from . import combinatorial as comb

    try:
        comb.identity_layer(comb.shortest_path, run.arrays[0], projection="mean")
    except ValueError as exc:
        ok = "projection" in str(exc)
        return [_result_of("refuses_mean", 0.0 if ok else 1.0, 0.0, str(exc)[:80])]
    return [_result_of("refuses_mean", 1.0, 0.0, "no error raised")]


def _identity_cases(kind: str) -> tuple:
    """Curated cases of the identity specs, per solver."""
    if kind == "argmin_onehot":
        return _vector_cases()
    if kind == "ranking":
        return _vector_cases(n=5)
    if kind == "top_k":
        return _vector_cases({"k": 3}) + (
            Case("k_equals_n", "k = n (all selected), P_std", 19,
                 lambda rng: {"w": rng.standard_normal(5)}, params={"k": 5, "projection": "std"},
                 flags=("edge",)),
        )
    if kind == "assignment":
        def square(rng):
            return {"W": rng.standard_normal((4, 4))}

        return (
            Case("plain", "4x4 costs, no projection", 21, square),
            Case("std", "4x4 costs, P_std over the whole matrix", 22, square, params={"projection": "std"}),
            Case("rectangular", "3x5 costs (partial assignment), P_mean", 23,
                 lambda rng: {"W": rng.standard_normal((3, 5))}, params={"projection": "mean"},
                 flags=("rectangular",)),
            Case("batched_scales", "batch of 4 (4x4) with scales 1e-6..1e3, P_std", 24,
                 lambda rng: {"W": _scaled_batch(rng, (4, 4, 4))}, params={"projection": "std"},
                 flags=("batched", "scales")),
            Case("noise_after", "noise margin alpha=0.2 after P_norm", 25, square,
                 params={"projection": "norm", "alpha": 0.2, "noise_order": "after", "seed": 7},
                 flags=("noise",)),
        )

    def grid(H, Wd):
        return lambda rng: {"W": rng.uniform(0.1, 2.0, (H, Wd))}

    def zero_diagonal(rng):
        W = rng.uniform(0.5, 2.0, (3, 3))
        np.fill_diagonal(W, 0.0)           # zero-cost vertices on the unique optimum
        return {"W": W}

    return (
        Case("plain", "3x4 grid, 8-neighbourhood, no projection", 31, grid(3, 4)),
        Case("norm", "3x3 grid, P_norm", 32, grid(3, 3), params={"projection": "norm"}),
        Case("four_neighbourhood", "4x4 grid, 4-neighbourhood, P_norm", 33, grid(4, 4),
             params={"projection": "norm", "neighbourhood": 4}),
        Case("zero_costs", "zero-cost vertices (explicit zeros in the CSR graph)", 34, zero_diagonal,
             flags=("zeros",)),
        Case("batched_scales", "batch of 3 (3x3) with scales 1e-3, 1, 1e3, P_norm", 35,
             lambda rng: {"W": rng.uniform(0.1, 2.0, (3, 3, 3)) * np.array([1e-3, 1.0, 1e3])[:, None, None]},
             params={"projection": "norm"}, flags=("batched", "scales")),
        Case("noise_after", "noise margin alpha=0.05 after P_norm", 36, grid(3, 3),
             params={"projection": "norm", "alpha": 0.05, "noise_order": "after", "seed": 8},
             flags=("noise",)),
    )


# -- projections as smooth forward maps ---------------------------------------

def _check_projection_closed_form(projection: str):
    def projection_jacobian(run: CaseRun) -> list[CheckResult]:
        """VJP and JVP against the dense closed-form Jacobian, member by member."""
        from . import combinatorial as comb

        w = run.host["w"]
        g, t = run.rng.standard_normal(w.shape), run.rng.standard_normal(w.shape)
        vjp = to_host(comb.project_vjp(run.result, run.asarray(g)))
        jvp = to_host(comb.project_jvp(run.result, run.asarray(t)))
        want_v, want_j = np.empty_like(w), np.empty_like(w)
        for idx in np.ndindex(*w.shape[:-1]):
            J = _host_projection_jacobian(w[idx], projection)
            want_v[idx], want_j[idx] = J.T @ g[idx], J @ t[idx]
        return [compare(vjp, want_v, rtol=run.tol.adjoint, name="closed_form_vjp"),
                compare(jvp, want_j, rtol=run.tol.adjoint, name="closed_form_jvp")]
    return projection_jacobian


def _check_projection_invariants(projection: str):
    def projection_invariants(run: CaseRun) -> list[CheckResult]:
        """P(P(w)) = P(w); P(w + t 1) = P(w) (mean, std); P(c w) = P(w) (norm, std)."""
        from . import combinatorial as comb

        w, u = run.host["w"], to_host(run.output)

        def P(x):
            return to_host(comb.project(run.asarray(x), projection=projection).u)

        tol = run.tol.forward
        out = [compare(P(u), u, rtol=tol, atol=tol, name="idempotent")]
        if projection in ("mean", "std"):
            out.append(compare(P(w + 3.0 * np.max(np.abs(w), axis=-1, keepdims=True)), u,
                               rtol=10 * tol, atol=10 * tol, name="translation_invariance"))
        if projection in ("norm", "std"):
            out.append(compare(P(7.0 * w), u, rtol=tol, atol=tol, name="scale_invariance"))
        return out
    return projection_invariants


def _projection_spec(projection: str) -> OpSpec:
    from . import combinatorial as comb

    def generic(rng):
        return {"w": rng.standard_normal(6)}

    def scales(rng):
        return {"w": _scaled_batch(rng, (4, 5))}

    def ties(rng):
        return {"w": np.array([1.0, 1.0, -2.0, 1.0, 3.0, -2.0])}

    def offset(rng):
        return {"w": 50.0 + rng.standard_normal(5)}

    def small(rng):
        # n = 2 for mean/norm; n = 3 for std, whose n = 2 map is locally
        # constant (+-(1, -1)/sqrt 2): its Jacobian is 0 and only round-off
        # is left to compare.
        return {"w": np.array([0.3, -1.7, 0.8][: 3 if projection == "std" else 2])}

    def single(rng):
        return {"w": np.array([[-0.7], [2.5]])}

    seed0 = {"mean": 40, "norm": 50, "std": 60}[projection]
    cases = [
        Case("generic", "random vector, n = 6", seed0 + 1, generic),
        Case("batched_scales", "batch of 4 with scales 1e-6..1e3", seed0 + 2, scales,
             flags=("batched", "scales")),
        Case("ties", "repeated entries", seed0 + 3, ties, flags=("ties",)),
        Case("offset", "entries 50 + N(0, 1): the mean dominates", seed0 + 4, offset,
             flags=("offset",), tol={"float32": {"fd": 1e-2, "adjoint": 1e-4, "forward": 1e-4}}),
        Case("small", "n = 2 (n = 3 for std)", seed0 + 5, small, flags=("edge",)),
    ]
    if projection != "std":     # std is undefined for a single entry (w - mean = 0)
        cases.append(Case("single", "n = 1, a batch of two", seed0 + 6, single, flags=("edge", "batched")))
    formula = {"mean": "w - mean(w) 1", "norm": "w / ||w||",
               "std": "(w - mean(w) 1) / ||w - mean(w) 1||"}[projection]
    return OpSpec(
        name=f"projection_{projection}",
        description=f"P_{projection}(w) = {formula} (identity-with-projection forward map)",
        inputs=("w",),
        core_ndim=(1,),
        output="u",
        output_core_ndim=1,
        forward=lambda w: comb.project(w, projection=projection),
        vjp=lambda res, u_bar: (comb.project_vjp(res, u_bar),),
        jvp=lambda res, dw: comb.project_jvp(res, dw),
        oracle=lambda w: _host_project(w, projection),
        cases=tuple(cases),
        tol={"float64": Tolerance(forward=1e-13, adjoint=1e-12, fd=1e-8, batch=1e-13),
             "float32": Tolerance(forward=1e-6, adjoint=1e-5, fd=1e-3, batch=1e-6)},
        extra_checks=(_check_projection_closed_form(projection), _check_projection_invariants(projection)),
    )


# -- blackbox backprop ---------------------------------------------------------

def _check_blackbox_formula(kind: str):
    def blackbox_formula(run: CaseRun) -> list[CheckResult]:
        """w_bar = (y(w + lam g) - y(w)) / lam with brute-force y, and exactly
        one solver call in the backward (the forward's y is passed)."""
        from . import combinatorial as comb

        (name,) = run.spec.inputs
        w, p = run.host[name], dict(run.case.vjp_params)
        lam = p.pop("lam")
        g = run.spec.cotangent(run.rng, None, run.host) if run.spec.cotangent else run.rng.standard_normal(w.shape)
        counted = comb.CountingSolver(_solver_with(kind, p))
        got = comb.blackbox_vjp(counted, run.arrays[0], run.asarray(g), lam=lam, y=run.output)
        want = (_brute(kind, w + lam * g, **p) - _brute(kind, w, **p)) / lam
        return [compare(to_host(got), want, rtol=run.tol.adjoint, atol=run.tol.adjoint, name="blackbox_formula"),
                _result_of("backward_solver_calls", abs(counted.calls - 1), 0.0, f"{counted.calls} calls")]
    return blackbox_formula


def _check_blackbox_neighbour(run: CaseRun) -> list[CheckResult]:
    """When -y_bar points at a neighbouring solution (swap the k-th and the
    (k+1)-th smallest of a top-k), blackbox is 0 just below the smallest lam
    that moves the solution and exactly identity / lam just above it."""
    from . import combinatorial as comb

    w, k = run.host["w"], run.case.vjp_params["k"]
    if w.ndim != 1 or k >= w.size:
        return []
    order = np.argsort(w, kind="stable")
    i_in, j_out = order[k - 1], order[k]
    y_bar = np.zeros_like(w)
    y_bar[i_in], y_bar[j_out] = 1.0, -1.0             # y_bar = y0 - y1
    lam_star = (w[j_out] - w[i_in]) / 2.0               # w_i + lam = w_j - lam
    solver = functools.partial(comb.top_k, k=k)
    wa, gb = run.arrays[0], run.asarray(y_bar)
    margin = 1e-3 if run.dtype == "float32" else 1e-8
    below = to_host(comb.blackbox_vjp(solver, wa, gb, lam=lam_star * (1 - margin)))
    above = comb.blackbox_vjp(solver, wa, gb, lam=lam_star * (1 + margin))
    ident = comb.identity_vjp(wa, gb)
    lam_above = lam_star * (1 + margin)
    return [_result_of("blackbox_below_threshold", float(np.max(np.abs(below))), 0.0),
            compare(to_host(above) * lam_above, to_host(ident), rtol=run.tol.adjoint,
                    name="blackbox_equals_identity")]


_LAM_PATH = 1.5


def _path_cotangent(rng, out, host):
    """A cotangent keeping W + lam y_bar >= 0.1 W: Dijkstra's input stays
    non-negative and no ties are created by clipping."""
    W = host["W"]
    return np.maximum(rng.standard_normal(W.shape), -0.9 * W / _LAM_PATH)


def _blackbox_spec(kind: str) -> OpSpec:
    from . import combinatorial as comb

    def vec(rng):
        return {"w": rng.standard_normal(6)}

    if kind == "top_k":
        core, cotangent, extra = 1, None, (_check_blackbox_neighbour,)
        cases = (
            Case("moderate_lam", "lam = 0.7 (solution usually moves)", 71, vec, params={"k": 3},
                 vjp_params={"lam": 0.7, "k": 3}),
            Case("tiny_lam", "lam = 1e-6: no move, w_bar = 0", 72, vec, params={"k": 2},
                 vjp_params={"lam": 1e-6, "k": 2}, flags=("small_lam",)),
            Case("batched", "batch of 3, lam = 2", 73, lambda rng: {"w": rng.standard_normal((3, 6))},
                 params={"k": 3}, vjp_params={"lam": 2.0, "k": 3}, flags=("batched",)),
        )
    else:
        core, cotangent, extra = 2, _path_cotangent, ()
        cases = (
            Case("grid_3x4", "3x4 grid, lam = 1.5", 81, lambda rng: {"W": rng.uniform(0.2, 2.0, (3, 4))},
                 vjp_params={"lam": _LAM_PATH}),
            Case("batched", "batch of 2 (3x3), lam = 1.5", 82,
                 lambda rng: {"W": rng.uniform(0.2, 2.0, (2, 3, 3))},
                 vjp_params={"lam": _LAM_PATH}, flags=("batched",)),
        )

    def forward(w, **params):
        return comb.identity_layer(_solver_with(kind, params), w)

    def vjp(res, y_bar, *, lam, **params):
        return (comb.blackbox_vjp(_solver_with(kind, params), res.w, y_bar, lam=lam, y=res.y),)

    return OpSpec(
        name=f"blackbox_{kind}",
        description=f"{kind} solver, blackbox-backprop backward (surrogate, one extra call)",
        inputs=("w",) if core == 1 else ("W",),
        core_ndim=(core,),
        output="y",
        output_core_ndim=core,
        forward=forward,
        vjp=vjp,
        jvp=None,
        oracle=lambda w, **params: _brute(kind, w, **params),
        cases=cases,
        tol={"float64": Tolerance(forward=0.0, adjoint=1e-12, fd=0.0, batch=1e-13),
             "float32": Tolerance(forward=0.0, adjoint=1e-5, fd=0.0, batch=1e-6)},
        cotangent=cotangent,
        surrogate=True,
        extra_checks=(_check_blackbox_formula(kind),) + extra,
        candidate_params=("lam",),
    )


# -- perturbed optimizer -------------------------------------------------------

def _perturbed_exact(w: np.ndarray, sigma: float, noise: str):
    """Exact smoothed argmin and its Jacobian: Gumbel -> softmax(-w / sigma),
    J = -(diag p - p p^T) / sigma; Gaussian with n = 2 -> p_1 = Phi(d),
    d = (w_2 - w_1) / (sigma sqrt 2), dp_1/dw_1 = -phi(d) / (sigma sqrt 2)."""
    import scipy.special
    import scipy.stats

    if noise == "gumbel":
        p = scipy.special.softmax(-w / sigma)
        return p, -(np.diag(p) - np.outer(p, p)) / sigma
    if w.size != 2:
        raise ValueError("the Gaussian closed form is for n = 2")
    d = (w[1] - w[0]) / (sigma * math.sqrt(2.0))
    p1, dens = scipy.stats.norm.cdf(d), scipy.stats.norm.pdf(d) / (sigma * math.sqrt(2.0))
    return np.array([p1, 1.0 - p1]), np.array([[-dens, dens], [dens, -dens]])


def _check_perturbed(run: CaseRun) -> list[CheckResult]:
    """The estimator recomputed on the host from the stored noise (brute-force
    argmin of w - sigma Z_m), and against the exact smoothed Jacobian."""
    p = run.case.params
    w, sigma = run.host["w"], p["sigma"]
    Z = to_host(run.result.Z).astype(np.float64)
    g = run.rng.standard_normal(w.shape)
    got = to_host(run.spec.vjp(run.result, run.asarray(g))[0])
    u = w - sigma * Z                                        # min-form: s = -1
    y_m = (np.arange(w.size) == np.argmin(u, axis=-1)[:, None]).astype(float)
    grad_nu = Z if p["noise"] == "gaussian" else -np.expm1(-Z)
    want = -np.mean((y_m @ g)[:, None] * grad_nu, axis=0) / sigma
    _, J = _perturbed_exact(w, sigma, p["noise"])
    return [compare(got, want, rtol=run.tol.adjoint, name="perturbed_formula"),
            compare(got, J.T @ g, rtol=run.tol.fd, name="perturbed_vs_exact_jacobian"),
            _result_of("solves", abs(run.result.n_solves - p["n_samples"]), 0.0)]


def _perturbed_spec() -> OpSpec:
    from . import combinatorial as comb

    M = 40000
    cases = (
        Case("gumbel", "Gumbel noise, n = 5, sigma = 0.5, M = 40000 (E[y] = softmax(-w/sigma))", 91,
             lambda rng: {"w": rng.standard_normal(5) * 0.5},
             params={"sigma": 0.5, "n_samples": M, "seed": 1, "noise": "gumbel"}),
        Case("gaussian_pair", "Gaussian noise, n = 2, sigma = 0.8 (E[y_1] = Phi((w2-w1)/(sigma sqrt 2)))",
             92, lambda rng: {"w": np.array([0.1, 0.6])},
             params={"sigma": 0.8, "n_samples": M, "seed": 2, "noise": "gaussian"}),
        Case("gumbel_small_sigma", "Gumbel, sigma = 0.1 (nearly hard)", 93,
             lambda rng: {"w": np.array([0.0, 0.05, 0.3, -0.02])},
             params={"sigma": 0.1, "n_samples": M, "seed": 3, "noise": "gumbel"}),
    )
    return OpSpec(
        name="perturbed_argmin_onehot",
        description="perturbed argmin (Berthet et al.): Monte-Carlo mean forward, 1/sigma VJP (surrogate)",
        inputs=("w",),
        core_ndim=(1,),
        output="y",
        output_core_ndim=1,
        forward=lambda w, *, sigma, n_samples, seed, noise: comb.perturbed(
            comb.argmin_onehot, w, sigma=sigma, n_samples=n_samples, rng=seed, noise=noise),
        vjp=lambda res, y_bar: (comb.perturbed_vjp(res, y_bar),),
        jvp=None,
        oracle=lambda w, *, sigma, n_samples, seed, noise: _perturbed_exact(w, sigma, noise)[0],
        cases=cases,
        # forward and fd: Monte-Carlo error, about 5 standard errors at M = 40000.
        tol={"float64": Tolerance(forward=0.03, adjoint=1e-12, fd=0.06, batch=1e-13),
             "float32": Tolerance(forward=0.03, adjoint=1e-5, fd=0.06, batch=1e-6)},
        surrogate=True,
        extra_checks=(_check_perturbed,),
        candidate_params=("sigma", "n_samples", "noise"),
    )


# -- straight-through estimator --------------------------------------------------

def _check_straight_through(run: CaseRun) -> list[CheckResult]:
    """x_bar = y_bar (or y_bar 1[|x| <= clip]) = identity_vjp(sense="max")."""
    from . import combinatorial as comb

    x = run.host["x"]
    g = run.rng.standard_normal(x.shape).astype(run.dtype).astype(np.float64)  # exact in dtype
    clip = run.case.vjp_params.get("clip")
    got = to_host(run.spec.vjp(run.result, run.asarray(g), **run.case.vjp_params)[0])
    want = g if clip is None else g * (np.abs(x) <= clip)
    ident = to_host(comb.identity_vjp(run.arrays[0], run.asarray(g), sense="max"))
    out = [compare(got, want, rtol=0.0, atol=0.0, name="straight_through_formula")]
    if clip is None:
        out.append(compare(got, ident, rtol=0.0, atol=0.0, name="equals_identity_max"))
    return out


def _straight_through_spec() -> OpSpec:
    from . import combinatorial as comb

    return OpSpec(
        name="straight_through",
        description="hard threshold 1[x > 0] with the straight-through (identity) backward (surrogate)",
        inputs=("x",),
        core_ndim=(1,),
        output="y",
        output_core_ndim=1,
        forward=lambda x: comb.straight_through(x),
        vjp=lambda res, y_bar, clip=None: (comb.straight_through_vjp(res, y_bar, clip=clip),),
        jvp=None,
        oracle=lambda x: (x > 0).astype(np.float64),
        cases=(
            Case("plain", "x_bar = y_bar", 101, lambda rng: {"x": rng.standard_normal(7)}),
            Case("zeros", "ties at x = 0 give y = 0", 102,
                 lambda rng: {"x": np.array([0.0, -0.0, 1.0, -1.0, 0.0])}, flags=("ties",)),
            Case("clipped_batch", "batch, saturating variant clip = 1", 103,
                 lambda rng: {"x": 2.0 * rng.standard_normal((3, 5))}, vjp_params={"clip": 1.0},
                 flags=("batched",)),
        ),
        tol={"float64": Tolerance(forward=0.0, adjoint=0.0, fd=0.0, batch=0.0),
             "float32": Tolerance(forward=0.0, adjoint=0.0, fd=0.0, batch=0.0)},
        surrogate=True,
        extra_checks=(_check_straight_through,),
    )


#: One builder per combinatorial spec (listed in _BUILDERS).
_COMBINATORIAL_BUILDERS: tuple[Callable[[], OpSpec], ...] = (
    *(functools.partial(_projection_spec, p) for p in ("mean", "norm", "std")),
    *(functools.partial(_identity_spec, kind)
      for kind in ("argmin_onehot", "top_k", "ranking", "assignment", "shortest_path")),
    *(functools.partial(_blackbox_spec, kind) for kind in ("top_k", "shortest_path")),
    _perturbed_spec,
    _straight_through_spec,
)



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
    # should be compared only on the other cases (for_candidates=False).
    # 1x1 inputs are exact.
    return tuple(
        dataclasses.replace(c, flags=c.flags + ("approximate_forward",), for_candidates=False)
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
             for_candidates=False, flags=("unbalanced",)),
        Case("semi_unbalanced", "hard row constraint, relaxed columns (rho_b = 0.2)", 313,
             lambda rng: {"C": rng.random((4, 5)), "a": dirichlet(rng, 4), "b": 1.5 * dirichlet(rng, 5)},
             params={"eps": 0.1, "rho_b": 0.2, **tight}, for_candidates=False, flags=("unbalanced",)),
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
             jvp_params={"method": "cg"}, for_candidates=False, flags=("method", "batched", "unbalanced")),
    )

    def canonicalize(bars):
        """a_bar - mean(a_bar), b_bar + mean(a_bar): the (c, -c) gauge (sum(a_bar) = 0)."""
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
        conventions={
            "gauge": "(a_bar, b_bar) are defined up to (c, -c) on balanced problems; both sides "
                     "are compared after a_bar -= mean(a_bar), b_bar += mean(a_bar)",
            "output": "P, the entropic plan exp((f 1^T + 1 g^T - C) / eps); not a value",
            "candidates": "fn(C, a, b, *, eps) -> P; unbalanced cases (rho_a/rho_b) are not "
                          "sent to candidates",
        },
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
    *_COMBINATORIAL_BUILDERS,
    _tanh_deq_spec,
    _sqrtm_spec,
    _inv_sqrtm_spec,
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
