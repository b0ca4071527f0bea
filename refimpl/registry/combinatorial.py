"""Registry entries for combinatorial solvers and identity with projection
(refimpl.combinatorial): cases, oracle, tolerances and operator-specific
checks.  Listed in ``refimpl.registry``."""

from __future__ import annotations

from typing import Callable
import functools
import itertools
import math

import numpy as np

from .. import combinatorial as comb
from ..backend import to_host
from ..check import CheckResult, compare
from . import Case, CaseRun, OpSpec, Tolerance


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


def _host_identity_pipeline(w, core, params):
    """(u, w_lin): the cost the solver sees and the point where P' is taken,
    for the identity layer's keywords in ``params`` (projection, alpha,
    noise_order, seed; the layer's defaults where absent)."""
    alpha, before = params.get("alpha", 0.0), params.get("noise_order", "after") == "before"
    xi = _host_noise(w.shape, alpha, params.get("seed")) if alpha > 0 else np.zeros_like(w)
    lin = w + xi if before else w
    u = _host_project(_flat_core(lin, core), params.get("projection")).reshape(w.shape)
    return (u if before else u + xi), lin


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
    stack: list[tuple[int, tuple[int, ...]]] = [(0, (0,))]
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


def _core_of(kind: str) -> int:
    """Core dimensions of solver ``kind``, as the solver declares them."""
    return comb.solver_spec(getattr(comb, kind)).core_ndim


def _brute(kind: str, w: np.ndarray, **params) -> np.ndarray:
    """argmin_{y in Y} <w, y> per batch member by enumeration, with exact
    rational arithmetic (fractions.Fraction of the float64 entries), keeping
    the first minimiser in enumeration order: lowest index (argmin), the
    lexicographically smallest index set (top_k), the lexicographically
    smallest rank vector, i.e. lower index -> lower rank among ties (ranking).
    Assignment and shortest path are meant for inputs with a unique optimum."""
    from fractions import Fraction

    core = _core_of(kind)
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
        assert best is not None                     # Y is never empty
        y = np.zeros(flat.size)
        y[list(best[0])] = 1.0 if best[1] is None else np.asarray(best[1], dtype=np.float64)
        out[idx] = y.reshape(w[idx].shape)
    return out


# -- checks shared by the combinatorial specs --------------------------------

def _projection_of(case: Case) -> str:
    p = case.params.get("projection")
    return "none" if p is None else p


def _check_identity_formula(run: CaseRun) -> list[CheckResult]:
    """w_bar = -P'(w_lin)^T g per member, with dense closed-form Jacobians
    (every identity_* solver is min-form: the brute-force oracle minimises)."""
    (name,), core = run.spec.inputs, run.spec.core_ndim[0]
    g = run.rng.standard_normal(run.host[name].shape)
    got = run.spec.vjp(run.result, run.asarray(g), **run.case.vjp_params)[0]
    _, lin = _host_identity_pipeline(run.host[name], core, run.case.params)
    lin_f, g_f = _flat_core(lin, core), _flat_core(g, core)
    want = np.empty_like(g_f)
    for idx in np.ndindex(*lin_f.shape[:-1]):
        want[idx] = -_host_projection_jacobian(lin_f[idx], _projection_of(run.case)).T @ g_f[idx]
    return [compare(to_host(got), want.reshape(g.shape), rtol=run.tol.adjoint, name="identity_formula")]


def _orthogonality(w_bar: np.ndarray, ref: np.ndarray, core: int) -> float:
    """max over members of |<ref, w_bar>| / (||ref|| ||w_bar||)."""
    wb, rf = _flat_core(w_bar, core), _flat_core(ref, core)
    num = np.abs(np.sum(wb * rf, axis=-1))
    den = np.linalg.norm(wb, axis=-1) * np.linalg.norm(rf, axis=-1)
    return float(np.max(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)))


def _check_identity_properties(run: CaseRun) -> list[CheckResult]:
    """r _|_ 1 (mean, std), r _|_ w (norm, std), r(w + t 1) = r(w) (mean, std),
    r(c w) = r(w) / c (norm, std), for r = identity_vjp at the linearisation point."""

    (name,), core = run.spec.inputs, run.spec.core_ndim[0]
    projection = _projection_of(run.case)
    if projection == "none":
        return []
    _, lin = _host_identity_pipeline(run.host[name], core, run.case.params)
    g = run.rng.standard_normal(lin.shape)

    def r_at(x):
        return to_host(comb.identity_vjp(run.asarray(x), run.asarray(g), projection=projection,
                                         core_ndim=core))

    r0, tol, out = r_at(lin), run.tol.adjoint, []
    if projection in ("mean", "std"):
        out.append(CheckResult.judge("orthogonal_to_ones", _orthogonality(r0, np.ones_like(lin), core), tol))
        t = 3.0 * np.max(np.abs(lin), axis=tuple(range(-core, 0)), keepdims=True)  # per member
        out.append(compare(r_at(lin + t), r0, rtol=tol, name="translation_invariance"))
    if projection in ("norm", "std"):
        out.append(CheckResult.judge("orthogonal_to_w", _orthogonality(r0, lin, core), tol))
        out.append(compare(5.0 * r_at(5.0 * lin), r0, rtol=tol, name="scale_covariance"))
    return out


def _check_forward_invariance(kind: str):
    def forward_invariance(run: CaseRun) -> list[CheckResult]:
        """y(P(w)) == y(w) exactly, for a noise-free case with a projection."""
        if _projection_of(run.case) == "none" or run.case.params.get("alpha", 0.0) > 0:
            return []
        y_raw = to_host(_solver_with(kind, run.case.params)(run.arrays[0]))
        n_diff = int(np.sum(y_raw != to_host(run.output)))
        return [CheckResult.judge("forward_invariance", n_diff, 0.0, f"{n_diff} entries differ")]
    return forward_invariance


def _solver_with(kind: str, params) -> Callable:

    keep = {k: v for k, v in params.items() if k in ("k", "neighbourhood", "negative")}
    solver = getattr(comb, kind)
    return functools.partial(solver, **keep) if keep else solver


_IDENTITY_KW = ("projection", "alpha", "noise_order", "seed")


def _surrogate_spec(name: str, description: str, core: int, *, inputs=None, **fields) -> OpSpec:
    """The spec of a surrogate gradient through a solver: one input (``w``
    for vectors, ``W`` for matrices and grids), the solution ``y`` of the
    same core shape as output, no JVP."""
    return OpSpec(name=name, description=description,
                  inputs=inputs or (("w",) if core == 1 else ("W",)), core_ndim=(core,),
                  output="y", output_core_ndim=core, jvp=None, surrogate=True, **fields)


def _identity_spec(kind: str) -> OpSpec:

    core = _core_of(kind)
    extra = (_check_refuses_mean,) if kind == "shortest_path" else ()
    cases = _identity_cases(kind)

    def forward(w, **params):
        kw = {k: params[k] for k in _IDENTITY_KW if k in params}
        rng = kw.pop("seed", None)
        return comb.identity_layer(_solver_with(kind, params), w, rng=rng, **kw)

    def oracle(w, **params):
        u, _ = _host_identity_pipeline(w, core, params)
        return _brute(kind, u, **{k: v for k, v in params.items() if k not in _IDENTITY_KW})

    solver_params = {"top_k": ("k",), "shortest_path": ("neighbourhood",)}.get(kind, ())
    return _surrogate_spec(
        f"identity_{kind}", f"{kind} solver, identity-with-projection backward (surrogate)", core,
        forward=forward,
        vjp=lambda res, y_bar: (comb.identity_layer_vjp(res, y_bar),),
        oracle=oracle,
        cases=cases,
        tol={"float64": Tolerance(forward=0.0, adjoint=1e-12, fd=0.0, batch=1e-13),
             "float32": Tolerance(forward=0.0, adjoint=2e-5, fd=0.0, batch=1e-6)},
        extra_checks=(_check_identity_formula, _check_identity_properties,
                      _check_forward_invariance(kind)) + extra,
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
        # Noise-margin cases are not for candidates: they receive neither alpha
        # nor the seed (refimpl's host draws), so they cannot reproduce u.  They
        # stay unbatched: the draws are made per batch, and the batch == loop
        # check re-seeds every member (batch == loop needs the sliced xi).
        Case("noise_after", "noise margin alpha=0.3 after P_std", 17, generic,
             params=dict(sp, projection="std", alpha=0.3, noise_order="after", seed=5),
             flags=("noise",), for_candidates=False),
        Case("noise_before", "noise margin alpha=0.3 before P_norm", 18, generic,
             params=dict(sp, projection="norm", alpha=0.3, noise_order="before", seed=6),
             flags=("noise",), for_candidates=False),
    )


def _check_refuses_mean(run: CaseRun) -> list[CheckResult]:
    """shortest_path + P_mean must be refused (paths differ in length)."""

    try:
        comb.identity_layer(comb.shortest_path, run.arrays[0], projection="mean")
    except ValueError as exc:
        ok = "projection" in str(exc)
        return [CheckResult.judge("refuses_mean", 0.0 if ok else 1.0, 0.0, str(exc)[:80])]
    return [CheckResult.judge("refuses_mean", 1.0, 0.0, "no error raised")]


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
                 flags=("noise",), for_candidates=False),
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
             flags=("noise",), for_candidates=False),
    )


# -- projections as smooth forward maps ---------------------------------------

def _check_projection_closed_form(projection: str):
    def projection_jacobian(run: CaseRun) -> list[CheckResult]:
        """VJP and JVP against the dense closed-form Jacobian, member by member."""

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

        (name,) = run.spec.inputs
        w, p = run.host[name], dict(run.case.vjp_params)
        lam = p.pop("lam")
        g = run.spec.cotangent(run.rng, None, run.host) if run.spec.cotangent else run.rng.standard_normal(w.shape)
        counted = comb.CountingSolver(_solver_with(kind, p))
        got = comb.blackbox_vjp(counted, run.arrays[0], run.asarray(g), lam=lam, y=run.output)
        want = (_brute(kind, w + lam * g, **p) - _brute(kind, w, **p)) / lam
        return [compare(to_host(got), want, rtol=run.tol.adjoint, atol=run.tol.adjoint, name="blackbox_formula"),
                CheckResult.judge("backward_solver_calls", abs(counted.calls - 1), 0.0, f"{counted.calls} calls")]
    return blackbox_formula


def _check_blackbox_neighbour(run: CaseRun) -> list[CheckResult]:
    """When -y_bar points at a neighbouring solution (swap the k-th and the
    (k+1)-th smallest of a top-k), blackbox is 0 just below the smallest lam
    that moves the solution and exactly identity / lam just above it."""

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
    return [CheckResult.judge("blackbox_below_threshold", float(np.max(np.abs(below))), 0.0),
            compare(to_host(above) * lam_above, to_host(ident), rtol=run.tol.adjoint,
                    name="blackbox_equals_identity")]


_LAM_PATH = 1.5


def _path_cotangent(rng, out, host):
    """A cotangent keeping W + lam y_bar >= 0.1 W: Dijkstra's input stays
    non-negative and no ties are created by clipping."""
    W = host["W"]
    return np.maximum(rng.standard_normal(W.shape), -0.9 * W / _LAM_PATH)


def _blackbox_case(case_id: str, description: str, seed: int, make, *, flags=(), **params) -> Case:
    """A blackbox case: ``lam`` and the solver's parameters go both to the
    forward (``params``: what a foreign candidate receives in ``validate``,
    whose VJP gets the same keywords) and to the reference VJP."""
    return Case(case_id, description, seed, make, params=params, vjp_params=params, flags=flags)


def _blackbox_spec(kind: str) -> OpSpec:

    def vec(rng):
        return {"w": rng.standard_normal(6)}

    extra: tuple[Callable[[CaseRun], list[CheckResult]], ...]
    cases: tuple[Case, ...]
    if kind == "top_k":
        core, cotangent, extra = 1, None, (_check_blackbox_neighbour,)
        cases = (
            _blackbox_case("moderate_lam", "lam = 0.7 (solution usually moves)", 71, vec, k=3, lam=0.7),
            _blackbox_case("tiny_lam", "lam = 1e-6: no move, w_bar = 0", 72, vec, k=2, lam=1e-6,
                           flags=("small_lam",)),
            _blackbox_case("batched", "batch of 3, lam = 2", 73, lambda rng: {"w": rng.standard_normal((3, 6))},
                           k=3, lam=2.0, flags=("batched",)),
        )
    else:
        core, cotangent, extra = 2, _path_cotangent, ()
        cases = (
            _blackbox_case("grid_3x4", "3x4 grid, lam = 1.5", 81,
                           lambda rng: {"W": rng.uniform(0.2, 2.0, (3, 4))}, lam=_LAM_PATH),
            _blackbox_case("batched", "batch of 2 (3x3), lam = 1.5", 82,
                           lambda rng: {"W": rng.uniform(0.2, 2.0, (2, 3, 3))}, lam=_LAM_PATH,
                           flags=("batched",)),
        )

    def forward(w, **params):
        return comb.identity_layer(_solver_with(kind, params), w)

    def vjp(res, y_bar, *, lam, **params):
        return (comb.blackbox_vjp(_solver_with(kind, params), res.w, y_bar, lam=lam, y=res.y),)

    return _surrogate_spec(
        f"blackbox_{kind}", f"{kind} solver, blackbox-backprop backward (surrogate, one extra call)", core,
        forward=forward,
        vjp=vjp,
        oracle=lambda w, **params: _brute(kind, w, **params),
        cases=cases,
        tol={"float64": Tolerance(forward=0.0, adjoint=1e-12, fd=0.0, batch=1e-13),
             "float32": Tolerance(forward=0.0, adjoint=1e-5, fd=0.0, batch=1e-6)},
        cotangent=cotangent,
        extra_checks=(_check_blackbox_formula(kind),) + extra,
        candidate_params=("k", "lam") if kind == "top_k" else ("lam",),
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


def _centred_cotangent(rng, out, host):
    """A standard normal cotangent minus its mean.  Every y_m is one-hot, so
    the component of y_bar along 1 has exact gradient 0 (J^T 1 = 0) but
    enters each Monte-Carlo term <y_m, y_bar> grad nu(Z_m) with full
    variance; left in, it can make the Monte-Carlo error exceed the gradient
    itself (n = 2 with y_bar near (1, 1)), here and in ``validate``."""
    g = rng.standard_normal(out.shape)
    return g - np.mean(g, axis=-1, keepdims=True)


#: Monte-Carlo checks pass within this many standard errors (estimated from
#: the samples themselves), per entry.
_Z_MAX = 5.0


def _standard_errors(d: np.ndarray, terms: np.ndarray) -> float:
    """max_i |d_i| / (std_m terms_mi / sqrt(M)): a deviation in units of the
    standard error of the mean of ``terms`` (M, n)."""
    se = np.std(terms, axis=0, ddof=1) / math.sqrt(terms.shape[0])
    return float(np.max(np.abs(d) / np.maximum(se, np.finfo(np.float64).tiny)))


def _check_perturbed(run: CaseRun) -> list[CheckResult]:
    """The estimator recomputed on the host from the stored noise (brute-force
    argmin of w - sigma Z_m), and forward and VJP against the exact smoothed
    argmin and its Jacobian, both normwise (the tolerances ``validate`` also
    uses) and in units of the Monte-Carlo standard error estimated from the
    same samples (at most ``_Z_MAX``: what gives the check its power; a VJP
    off by a few per cent, e.g. a wrong factor, fails it)."""
    p = run.case.params
    w, sigma = run.host["w"], p["sigma"]
    Z = to_host(run.result.Z).astype(np.float64)
    g = _centred_cotangent(run.rng, w, run.host)
    got = to_host(run.spec.vjp(run.result, run.asarray(g))[0])
    u = w - sigma * Z                                        # min-form: s = -1
    y_m = (np.arange(w.size) == np.argmin(u, axis=-1)[:, None]).astype(float)
    grad_nu = Z if p["noise"] == "gaussian" else -np.expm1(-Z)
    terms = -(y_m @ g)[:, None] * grad_nu / sigma            # one estimate per sample
    p_exact, J = _perturbed_exact(w, sigma, p["noise"])
    # The rounding of a mean of M terms scales with mean |terms|, not with |mean|
    # (here the terms cancel to ~1/10 of their size): that is the atol.
    return [compare(got, terms.mean(axis=0), rtol=run.tol.adjoint,
                    atol=run.tol.adjoint * float(np.mean(np.abs(terms))), name="perturbed_formula"),
            compare(got, J.T @ g, rtol=run.tol.fd, name="perturbed_vs_exact_jacobian"),
            CheckResult.judge("forward_within_mc_error", _standard_errors(to_host(run.output) - p_exact, y_m),
                       _Z_MAX, "max |y - E y| in standard errors"),
            CheckResult.judge("vjp_within_mc_error", _standard_errors(got - J.T @ g, terms),
                       _Z_MAX, "max |w_bar - J^T y_bar| in standard errors"),
            CheckResult.judge("solves", abs(run.result.n_solves - p["n_samples"]), 0.0)]


def _perturbed_spec() -> OpSpec:

    # Unbatched cases: Z is drawn per batch, and the batch == loop check
    # re-seeds every member (test_combinatorial checks batch == loop with
    # sliced Z instead).
    M = 200_000
    cases = (
        Case("gumbel", f"Gumbel noise, n = 5, sigma = 0.5, M = {M} (E[y] = softmax(-w/sigma))", 91,
             lambda rng: {"w": rng.standard_normal(5) * 0.5},
             params={"sigma": 0.5, "n_samples": M, "seed": 1, "noise": "gumbel"}),
        Case("gaussian_pair", "Gaussian noise, n = 2, sigma = 0.8 (E[y_1] = Phi((w2-w1)/(sigma sqrt 2)))",
             92, lambda rng: {"w": np.array([0.1, 0.6])},
             params={"sigma": 0.8, "n_samples": M, "seed": 2, "noise": "gaussian"}),
        Case("gumbel_small_sigma", "Gumbel, sigma = 0.1 (nearly hard)", 93,
             lambda rng: {"w": np.array([0.0, 0.05, 0.3, -0.02])},
             params={"sigma": 0.1, "n_samples": M, "seed": 3, "noise": "gumbel"}),
    )
    return _surrogate_spec(
        "perturbed_argmin_onehot",
        "perturbed argmin (Berthet et al.): Monte-Carlo mean forward, 1/sigma VJP (surrogate)", 1,
        forward=lambda w, *, sigma, n_samples, seed, noise: comb.perturbed(
            comb.argmin_onehot, w, sigma=sigma, n_samples=n_samples, rng=seed, noise=noise),
        vjp=lambda res, y_bar: (comb.perturbed_vjp(res, y_bar),),
        oracle=lambda w, *, sigma, n_samples, seed, noise: _perturbed_exact(w, sigma, noise)[0],
        cases=cases,
        # forward and fd: normwise Monte-Carlo error against the exact smoothed
        # argmin.  At M = 200000 with a centred cotangent the relative standard
        # error of the VJP is at most ~1.3% over cotangents (forward ~0.5%), so
        # 6% (3%) is ~4.5 (~6) standard errors for the reference and still ~3
        # (~4) for the difference of two independent estimates in validate.
        tol={"float64": Tolerance(forward=0.03, adjoint=1e-12, fd=0.06, batch=1e-13),
             "float32": Tolerance(forward=0.03, adjoint=1e-5, fd=0.06, batch=1e-6)},
        cotangent=_centred_cotangent,
        extra_checks=(_check_perturbed,),
        candidate_params=("sigma", "n_samples", "noise"),
    )


# -- straight-through estimator --------------------------------------------------

def _check_straight_through(run: CaseRun) -> list[CheckResult]:
    """x_bar = y_bar (or y_bar 1[|x| <= clip]) = identity_vjp(sense="max")."""

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

    return _surrogate_spec(
        "straight_through",
        "hard threshold 1[x > 0] with the straight-through (identity) backward (surrogate)", 1,
        inputs=("x",),
        forward=lambda x: comb.straight_through(x),
        vjp=lambda res, y_bar, clip=None: (comb.straight_through_vjp(res, y_bar, clip=clip),),
        oracle=lambda x: (x > 0).astype(np.float64),
        cases=(
            Case("plain", "x_bar = y_bar", 101, lambda rng: {"x": rng.standard_normal(7)}),
            Case("zeros", "ties at x = 0 give y = 0", 102,
                 lambda rng: {"x": np.array([0.0, -0.0, 1.0, -1.0, 0.0])}, flags=("ties",)),
            Case("clipped_batch", "batch, saturating variant clip = 1", 103,
                 lambda rng: {"x": 2.0 * rng.standard_normal((3, 5))}, vjp_params={"clip": 1.0},
                 # the clipped estimator is a refimpl option a plain STE candidate lacks
                 for_candidates=False,
                 flags=("batched",)),
        ),
        tol={"float64": Tolerance(forward=0.0, adjoint=0.0, fd=0.0, batch=0.0),
             "float32": Tolerance(forward=0.0, adjoint=0.0, fd=0.0, batch=0.0)},
        extra_checks=(_check_straight_through,),
    )


#: The specs this module registers, in table order.
BUILDERS: tuple[Callable[[], OpSpec], ...] = (
    *(functools.partial(_projection_spec, p) for p in ("mean", "norm", "std")),
    *(functools.partial(_identity_spec, kind)
      for kind in ("argmin_onehot", "top_k", "ranking", "assignment", "shortest_path")),
    *(functools.partial(_blackbox_spec, kind) for kind in ("top_k", "shortest_path")),
    _perturbed_spec,
    _straight_through_spec,
)
