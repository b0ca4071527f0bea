"""Registry entries for the Sinkhorn operator (refimpl.sinkhorn): cases, oracle, tolerances and
operator-specific checks.  Listed in ``refimpl.registry``."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

from .. import backend as _backend
from .. import sinkhorn as sk
from ..backend import sum_to_shape, to_host
from ..check import CheckResult, compare, fd_directional
from . import Case, CaseRun, OpSpec, Tolerance, scaled_normal, sum_to_shape_host


def sinkhorn_dual_newton(C, a, b, eps, rho_a, rho_b, max_iter=200):
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
    """Plan by Newton on the dual, member by member (see sinkhorn_dual_newton)."""
    bshape = np.broadcast_shapes(C.shape[:-2], a.shape[:-1], b.shape[:-1])
    C = np.broadcast_to(C, bshape + C.shape[-2:])
    a = np.broadcast_to(a, bshape + a.shape[-1:])
    b = np.broadcast_to(b, bshape + b.shape[-1:])
    P = np.empty(C.shape)
    for idx in np.ndindex(*bshape):
        P[idx] = sinkhorn_dual_newton(C[idx], a[idx], b[idx], eps, rho_a, rho_b)
    return P


def _free_tangents(rng, host):
    """dC member-scaled normal; relative marginal perturbations ``da = a z``,
    ``db = b w`` (any direction: an unbalanced problem has no mass constraint,
    and a change of total mass is what its (c, -c) component measures)."""
    C, a, b = host["C"], host["a"], host["b"]
    return (scaled_normal(rng, C, 2), a * rng.standard_normal(a.shape),
            b * rng.standard_normal(b.shape))


def _sinkhorn_tangents(rng, host):
    """Feasible directions of a balanced problem: :func:`_free_tangents` with
    ``1^T da = 1^T db`` per member (the side with more batch members is
    adjusted)."""
    a, b = host["a"], host["b"]
    dC, da, db = _free_tangents(rng, host)
    sa, sb = da.sum(-1, keepdims=True), db.sum(-1, keepdims=True)
    if b.ndim >= a.ndim:
        db = db - b * (sb - sa) / b.sum(-1, keepdims=True)
    else:
        da = da - a * (sa - sb) / a.sum(-1, keepdims=True)
    return dC, da, db


def _sk_marginal_check(run: CaseRun) -> list[CheckResult]:
    """||P 1 - a||_1 and ||P^T 1 - b||_1 (relative) within the result's tol."""
    P = to_host(run.result.P).astype(np.float64)
    a = np.broadcast_to(run.host["a"], P.shape[:-1])
    b = np.broadcast_to(run.host["b"], P.shape[:-2] + P.shape[-1:])
    err = max(float(np.max(np.abs(P.sum(-1) - a).sum(-1) / a.sum(-1))),
              float(np.max(np.abs(P.sum(-2) - b).sum(-1) / b.sum(-1))))
    tol = 4.0 * float(np.max(to_host(run.result.tol)))
    return [CheckResult("marginals", err, tol, err <= tol, "relative L1 of both marginals")]


def _sk_vjp(run: CaseRun, G, method=None):

    params = dict(run.case.vjp_params)
    if method is not None:
        params["method"] = method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _backend.ConditioningWarning)
        return [to_host(x).astype(np.float64) for x in sk.sinkhorn_vjp(run.result, G, **params)]


def _sk_cotangent(run: CaseRun):
    return run.asarray(run.rng.standard_normal(tuple(run.result.P.shape)))


def _sk_adjoint_invariants(run: CaseRun) -> list[CheckResult]:
    """sum(a_bar) == 0 and C_bar has zero row and column sums (normalised by
    the sizes of the gradients)."""
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

    if run.dtype != "float64":
        return []
    G = _sk_cotangent(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _backend.ConditioningWarning)
        e_bar = np.asarray(to_host(sk.sinkhorn_vjp_eps(run.result, G)), dtype=np.float64)
        C_bar = to_host(sk.sinkhorn_vjp(run.result, G)[0])
    params = dict(run.case.params)
    eps = params.pop("eps")
    arrays = tuple(run.asarray(run.host[k], "float64") for k in ("C", "a", "b"))
    xp = run.backend.xp
    e0 = run.backend.asarray(np.array(eps), "float64")

    def P_of(e):
        return sk.sinkhorn(*arrays, eps=float(e), **params).P

    (D,), _ = fd_directional(P_of, (e0,), (xp.ones_like(e0),), rel_step=run.case.fd_step)
    fd = np.sum(to_host(D) * to_host(G), axis=(-2, -1))
    # Scale: |fd| or, where dP/deps vanishes (n = 1, additive costs), the size
    # |P| |G| |log P| / eps of the terms that cancel in <C_bar, log P>.
    logP = to_host(run.result.log_P)
    natural = (float(np.max(to_host(run.result.P))) * float(np.max(np.abs(to_host(G))))
               * max(float(np.max(np.abs(logP))), 1.0) / eps)
    scale = max(float(np.max(np.abs(fd))), natural)
    err = float(np.max(np.abs(e_bar - fd))) / scale
    out = [CheckResult("eps_fd", err, run.tol.fd, err <= run.tol.fd, "dL/deps vs Richardson in eps")]
    if run.result.balanced:
        ident = -np.sum(C_bar * np.broadcast_to(run.host["C"], C_bar.shape), axis=(-2, -1)) / eps
        e2 = float(np.max(np.abs(e_bar - ident))) / max(scale, 1e-300)
        out.append(CheckResult("eps_identity", e2, 1e-10, e2 <= 1e-10, "<C_bar, log P> == -<C_bar, C>/eps"))
    return out


def _sk_shift_invariance(run: CaseRun) -> list[CheckResult]:
    """P(C + u 1^T + 1 v^T) == P(C); for the flagged additive case
    C = u 1^T + 1 v^T the closed form P = a b^T / sum(a)."""
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


def _sk_unbalanced_identity(run: CaseRun) -> list[CheckResult]:
    """``C_bar 1 == -(a / rho_a) * a_bar`` and ``C_bar^T 1 == -(b / rho_b) * b_bar``
    (zero on a hard side).  Adding ``t`` to row i of C changes the objective
    like scaling ``a_i`` by ``exp(-t / rho_a)`` (``rho_a r_i log(r_i / a_i) + t r_i``),
    so ``d/dt = -(a_i / rho_a) a_bar_i``: this ties the marginal gradients,
    including their (c, -c) component, to C_bar."""
    G = _sk_cotangent(run)
    C_bar, a_bar, b_bar = _sk_vjp(run, G)
    sums, expected = [], []
    for axis, x, x_bar, rho in ((-1, "a", a_bar, run.result.rho_a), (-2, "b", b_bar, run.result.rho_b)):
        sums.append(C_bar.sum(axis))
        w = np.broadcast_to(run.host[x], x_bar.shape)
        expected.append(np.zeros_like(x_bar) if rho is None else -(w / rho) * x_bar)
    # absolute floor: round-off of sums of terms of size |P| |G| / eps
    natural = float(np.max(to_host(run.result.P))) * float(np.max(np.abs(to_host(G)))) / run.result.eps
    rtol = 1e-10 if run.dtype == "float64" else 1e-4
    return [compare(tuple(sums), tuple(expected), rtol=rtol, atol=rtol * natural,
                    name="C_bar_sums_vs_marginal_gradients")]


def _dirichlet(rng, k, conc=1.0, bits=20):
    """Dirichlet(conc) weights of ``k`` entries, rounded to multiples of 2^-bits."""
    # Dyadic weights j / 2^bits (exact in float32 and summing to exactly 1 in
    # both dtypes), so float32 rounding cannot create a mass mismatch.
    w = np.floor(rng.dirichlet(np.full(k, conc)) * 2 ** bits) + 1.0
    w[np.argmax(w)] += 2 ** bits - w.sum()
    return w / 2 ** bits


def _sqdist(rng, n, m, d=2, scale=1.0):
    """``scale`` times the squared distances between ``n`` and ``m`` uniform random
    points of [0, 1]^d."""
    x, y = rng.random((n, d)), rng.random((m, d))
    return scale * ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def _make_uniform_4x2(rng):
    return {"C": rng.random((4, 2)), "a": np.full(4, 0.25), "b": np.full(2, 0.5)}


def _make_nonuniform_6x5(rng):
    return {"C": _sqdist(rng, 6, 5), "a": _dirichlet(rng, 6), "b": _dirichlet(rng, 5)}


def _make_wide_3x7(rng):
    return {"C": rng.random((3, 7)), "a": _dirichlet(rng, 3), "b": _dirichlet(rng, 7)}


def _make_tall_skinny(rng):
    # SOFT top-k shape: n scores against the anchors {0, 1}, masses k/n and (n-k)/n.
    n, k = 16, 4
    x = rng.random(n)
    C = (x[:, None] - np.array([1.0, 0.0])[None, :]) ** 2
    return {"C": C, "a": np.full(n, 1.0 / n), "b": np.array([k / n, (n - k) / n])}


def _make_single_row(rng):
    b = _dirichlet(rng, 4)
    return {"C": rng.random((1, 4)), "a": np.array([b.sum()]), "b": b}


def _make_single_col(rng):
    a = _dirichlet(rng, 5)
    return {"C": rng.random((5, 1)), "a": a, "b": np.array([a.sum()])}


def _make_tiny_marginals(rng):
    # Two entries of 2^-40 ~ 9.1e-13 on each side (exact in float32).
    # Both masses become 1 + 2^-39 exactly.
    a, b = _dirichlet(rng, 5), _dirichlet(rng, 4)
    for w, tiny_idx, keep in ((a, [1, 3], 0), (b, [1, 2], 3)):
        w[keep] += w[tiny_idx].sum()
        w[tiny_idx] = 2.0 ** -40
    return {"C": rng.random((5, 4)), "a": a, "b": b}


def _make_tiny_eps_monotone(rng):
    # 1-D sorted points, squared distances, non-uniform masses: the eps -> 0
    # limit is a monotone "staircase" plan whose support is a spanning tree,
    # so the backward stays well conditioned even at eps = 1e-3.
    x = np.sort(rng.random(5))
    y = np.sort(rng.random(4))
    a = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    b = np.array([0.35, 0.15, 0.3, 0.2])
    return {"C": (x[:, None] - y[None, :]) ** 2, "a": a, "b": b}


def _make_batch_scales(rng):
    # Members whose masses differ by 1e-4 .. 1e4 and whose costs are shifted
    # by large constants (the plan is invariant to both shifts; eps fixed).
    mass = np.array([2.0 ** -13, 1.0, 2.0 ** 13])[:, None]   # ~1.2e-4, 1, 8.2e3
    C = rng.random((3, 4, 3)) + np.array([0.0, 50.0, -20.0])[:, None, None]
    a = np.stack([_dirichlet(rng, 4) for _ in range(3)]) * mass
    b = np.stack([_dirichlet(rng, 3) for _ in range(3)]) * mass
    return {"C": C, "a": a, "b": b}


def _make_shared_marginals(rng):
    return {"C": rng.random((2, 4, 3)), "a": _dirichlet(rng, 4), "b": _dirichlet(rng, 3)}


def _make_additive(rng):
    u, v = rng.standard_normal(4), rng.standard_normal(5)
    return {"C": u[:, None] + v[None, :], "a": _dirichlet(rng, 4), "b": _dirichlet(rng, 5)}


def _make_unbalanced(rng):
    return {"C": rng.random((5, 4)), "a": 1.3 * _dirichlet(rng, 5),
            "b": 0.7 * _dirichlet(rng, 4)}


def _make_vjp_case(rng):
    return {"C": _sqdist(rng, 7, 6), "a": _dirichlet(rng, 7, 2.0),
            "b": _dirichlet(rng, 6, 2.0)}


def _make_vjp_batch(rng):
    return {"C": rng.random((2, 6, 5)), "a": np.stack([_dirichlet(rng, 6) for _ in range(2)]),
            "b": np.stack([_dirichlet(rng, 5) for _ in range(2)])}


def _make_semi_unbalanced(rng):
    return {"C": rng.random((4, 5)), "a": _dirichlet(rng, 4),
            "b": 1.5 * _dirichlet(rng, 5)}


#: Sinkhorn settings of the registry cases: iterate to round-off.
_TIGHT = {"tol": 1e-13, "max_iter": 50_000}


def _balanced_problem_cases() -> tuple[Case, ...]:
    """Balanced cases: shapes, marginals, scales, batches, closed forms."""
    return (
        Case("uniform_4x2", "uniform marginals, random costs, eps 0.2", 301, _make_uniform_4x2,
             params={"eps": 0.2, **_TIGHT}),
        Case("nonuniform_6x5", "Dirichlet marginals, squared-distance costs, eps 0.05", 302,
             _make_nonuniform_6x5, params={"eps": 0.05, **_TIGHT}, flags=("nonuniform",)),
        Case("wide_3x7", "n < m: the backward eliminates the column side", 303, _make_wide_3x7,
             params={"eps": 0.1, **_TIGHT}, flags=("nonuniform",)),
        Case("tall_skinny_16x2", "SOFT top-k shape (n=16 scores, 2 anchors, k=4): 2 x 2 Schur system",
             304, _make_tall_skinny, params={"eps": 0.05, **_TIGHT}, flags=("tall_skinny",)),
        Case("single_row", "n = 1: P = b^T whatever C; C_bar = 0", 305, _make_single_row,
             params={"eps": 0.1, **_TIGHT}, flags=("edge",)),
        Case("single_col", "m = 1: P = a whatever C; C_bar = 0", 306, _make_single_col,
             params={"eps": 0.1, **_TIGHT}, flags=("edge",)),
        Case("tiny_marginals", "marginal entries of ~1e-12 (no NaN/Inf, scaled backward)", 307,
             _make_tiny_marginals, params={"eps": 0.1, **_TIGHT}, flags=("edge", "nonuniform"),
             tol={"float32": {"forward": 2e-3}}),
        Case("tiny_eps_monotone", "eps = 1e-3, 1-D monotone costs: near-sparse but well-conditioned"
             " (float64 only: float32 cannot resolve C/eps ~ 1e3)", 308, _make_tiny_eps_monotone,
             params={"eps": 1e-3, "tol": 1e-12, "max_iter": 200_000}, flags=("tiny_eps",),
             dtypes=("float64",), fd_step=1e-7,
             tol={"float64": {"forward": 1e-8, "fd": 1e-6, "adjoint": 1e-10}}),
        Case("batch_scales", "batch of 3: masses ~1e-4, 1, ~1e4 and cost offsets 0, 50, -20", 309,
             _make_batch_scales, params={"eps": 0.1, **_TIGHT}, flags=("batched", "scales"),
             tol={"float32": {"forward": 5e-3, "fd": 5e-3}}),
        Case("shared_marginals", "batch of costs against one (a, b) (broadcast marginals)", 310,
             _make_shared_marginals, params={"eps": 0.1, **_TIGHT}, flags=("batched", "broadcast")),
        Case("additive_cost", "C = u 1^T + 1 v^T: closed form P = a b^T", 311, _make_additive,
             params={"eps": 0.3, **_TIGHT}, flags=("additive", "closed_form")),
    )


def _balanced_method_cases() -> tuple[Case, ...]:
    """Balanced cases of the backward's other linear-solve methods."""
    return (
        Case("vjp_cg", "method='cg' (matrix-free conjugate gradients)", 314, _make_vjp_case,
             params={"eps": 0.05, **_TIGHT}, vjp_params={"method": "cg"},
             jvp_params={"method": "cg"},
             flags=("method",)),
        Case("vjp_reduced", "method='reduced' (the paper's (n+m-1) system)", 315, _make_vjp_case,
             params={"eps": 0.05, **_TIGHT}, vjp_params={"method": "reduced"},
             jvp_params={"method": "reduced"}, flags=("method",)),
        Case("vjp_kkt", "method='kkt' (full KKT system, oracle)", 316, _make_vjp_case,
             params={"eps": 0.05, **_TIGHT}, vjp_params={"method": "kkt"},
             jvp_params={"method": "kkt"},
             flags=("method",)),
    )


def _unbalanced_cases() -> tuple[Case, ...]:
    """KL-relaxed marginals on one or both sides."""
    return (
        Case("unbalanced", "KL-relaxed marginals rho_a = rho_b = 0.5, masses 1.3 vs 0.7", 312,
             _make_unbalanced, params={"eps": 0.1, "rho_a": 0.5, "rho_b": 0.5, **_TIGHT},
             flags=("unbalanced",)),
        Case("semi_unbalanced", "hard row constraint, relaxed columns (rho_b = 0.2)", 313,
             _make_semi_unbalanced,
             params={"eps": 0.1, "rho_b": 0.2, **_TIGHT}, flags=("unbalanced",)),
        Case("vjp_cg_batch_unbalanced", "method='cg' on a batch of unbalanced problems", 317,
             _make_vjp_batch,
             params={"eps": 0.1, "rho_a": 1.0, "rho_b": 2.0, **_TIGHT}, vjp_params={"method": "cg"},
             jvp_params={"method": "cg"}, flags=("method", "batched", "unbalanced")),
    )


def _sinkhorn_cases() -> tuple[tuple[Case, ...], tuple[Case, ...]]:
    """The curated cases: ``(balanced, unbalanced)``."""
    return _balanced_problem_cases() + _balanced_method_cases(), _unbalanced_cases()


_TOL = {
    "float64": Tolerance(forward=1e-10, adjoint=1e-11, fd=1e-7, batch=1e-11),
    "float32": Tolerance(forward=5e-4, adjoint=1e-5, fd=2e-3, batch=1e-5),
}


#: The balanced operators' gauge, as written into exported vectors.
_GAUGE_CONVENTION = ("(a_bar, b_bar) are defined up to (c, -c) (only 1^T da = 1^T db is feasible); "
                     "both sides are compared after a_bar -= mean(a_bar), b_bar += mean(a_bar)")


def _gauge_fix(bars):
    """a_bar - mean(a_bar), b_bar + mean(a_bar): the (c, -c) gauge (sum(a_bar) = 0)."""
    return (bars[0], *sk.gauge_fix(bars[1], bars[2]))


def _sinkhorn_spec() -> OpSpec:
    return OpSpec(
        name="sinkhorn",
        description="entropic OT plan P(C, a, b), balanced, implicit differentiation",
        inputs=("C", "a", "b"),
        core_ndim=(2, 1, 1),
        output="P",
        output_core_ndim=2,
        forward=sk.sinkhorn,
        vjp=lambda res, P_bar, **kw: sk.sinkhorn_vjp(res, P_bar, **kw),
        jvp=lambda res, dC, da, db, **kw: sk.sinkhorn_jvp(res, dC, da, db, **kw),
        oracle=_sinkhorn_oracle,
        cases=_sinkhorn_cases()[0],
        tol=_TOL,
        tangents=_sinkhorn_tangents,
        canonicalize=_gauge_fix,
        candidate_params=("eps",),
        conventions={
            "gauge": _GAUGE_CONVENTION,
            "output": "P, the entropic plan exp((f 1^T + 1 g^T - C) / eps); not a value",
            "candidates": "fn(C, a, b, *, eps) -> P",
        },
        extra_checks=(_sk_marginal_check, _sk_adjoint_invariants, _sk_methods_agree,
                      _sk_eps_derivative, _sk_shift_invariance),
    )


def _sinkhorn_unbalanced_spec() -> OpSpec:
    """KL-relaxed marginals (``rho_a``/``rho_b``; ``None`` keeps a side hard).
    A spec of its own because its gradients have no gauge: nothing is
    canonicalised, and finite differences run along any direction, so the
    (c, -c) component of ``(a_bar, b_bar)`` is checked too.  Everything else
    is the balanced spec's."""
    return dataclasses.replace(
        _sinkhorn_spec(),
        name="sinkhorn_unbalanced",
        description="entropic OT plan P(C, a, b) with KL-relaxed marginals, implicit differentiation",
        cases=_sinkhorn_cases()[1],
        tangents=_free_tangents,
        canonicalize=None,
        conventions={
            "gauge": "none: with a relaxed marginal (a_bar, b_bar) are unique and compared as they are",
            "output": "P, the entropic plan exp((f 1^T + 1 g^T - C) / eps) of the problem "
                      "<C,P> - eps h(P) + rho_a KL(P1|a) + rho_b KL(P^T1|b); not a value",
            "candidates": "fn(C, a, b, *, eps, rho_a, rho_b) -> P; rho_a/rho_b None keeps "
                          "that marginal hard; no gauge (a_bar, b_bar compared as they are)",
        },
        candidate_params=("eps", "rho_a", "rho_b"),
        extra_checks=(_sk_unbalanced_identity, _sk_methods_agree, _sk_eps_derivative),
    )


# --------------------------------------------------------------------------
# Values: <C, P>, the entropic value and the KL value as operators
# --------------------------------------------------------------------------

#: The value operators ``sinkhorn_<kind>``: (value of a SinkhornResult, its
#: gradient ``(C_bar, a_bar, b_bar, eps_bar)``, one-line description).
_VALUES = {
    "linear": (sk.linear_value, sk.linear_value_grad,
               "<C, P> at the balanced entropic plan P (implicit differentiation through P)"),
    "entropic": (sk.entropic_value, sk.entropic_value_grad,
                 "entropic OT value <C, P> + eps sum P (log P - 1) (envelope gradient: P, f, g)"),
    "kl": (sk.kl_value, sk.kl_value_grad,
           "KL-regularised OT value <C, P> + eps KL(P | a b^T) (envelope gradient)"),
}

#: The balanced Sinkhorn cases the value operators reuse (same seeds and inputs).
_VALUE_CASES = ("uniform_4x2", "nonuniform_6x5", "single_row", "tiny_marginals", "batch_scales",
                "shared_marginals", "additive_cost")

#: Descriptions of the reused cases where the plan's wording does not fit a value.
_VALUE_CASE_TEXT = {
    "single_row": "n = 1: P = b^T whatever C; closed-form value and gradient (dC = b^T)",
    "additive_cost": "C = u 1^T + 1 v^T: P = a b^T, closed-form value and gradient",
}


@dataclass(frozen=True)
class SinkhornValue:
    """Result of a value operator: the batch-shaped ``value`` and the plan it is taken at.

    ``plan`` is :func:`refimpl.sinkhorn.sinkhorn` of the inputs broadcast to
    their common batch shape, so the value gradients come out per batch
    member and the VJP weights each member by its own cotangent; ``shapes``
    are the shapes of ``(C, a, b)`` as given, to which the cotangents are
    summed back.
    """

    value: Any
    plan: sk.SinkhornResult
    kind: str
    shapes: tuple

    @property
    def converged(self):
        """The plan's per-member convergence flags."""
        return self.plan.converged

    @property
    def n_iter(self):
        """The plan's iteration counts."""
        return self.plan.n_iter

    @property
    def error(self):
        """The plan's final marginal errors."""
        return self.plan.error


def _broadcast_problem(C, a, b):
    """``(C, a, b)`` broadcast to their common batch shape (views).  Inputs whose
    shapes do not fit are passed on unchanged, for :func:`refimpl.sinkhorn.sinkhorn`
    to reject with the argument named."""
    xp = _backend.namespace(C=C, a=a, b=b)
    if C.ndim < 2 or a.ndim < 1 or b.ndim < 1:
        return C, a, b
    try:
        batch = _backend.broadcast_shapes(C.shape[:-2], a.shape[:-1], b.shape[:-1])
    except ValueError:
        return C, a, b
    return (xp.broadcast_to(C, batch + tuple(C.shape[-2:])),
            xp.broadcast_to(a, batch + tuple(a.shape[-1:])),
            xp.broadcast_to(b, batch + tuple(b.shape[-1:])))


def _value_forward(kind: str):
    value_of = _VALUES[kind][0]

    def forward(C, a, b, *, eps, **params) -> SinkhornValue:
        """``value = refimpl.sinkhorn.<kind>_value(sinkhorn(C, a, b, eps=eps, **params))``,
        one value per batch member."""
        shapes = tuple(tuple(x.shape) for x in (C, a, b))
        plan = sk.sinkhorn(*_broadcast_problem(C, a, b), eps=eps, **params)
        return SinkhornValue(value_of(plan), plan, kind, shapes)

    forward.__name__ = f"sinkhorn_{kind}_value"
    return forward


def _value_vjp(kind: str):
    grad_of = _VALUES[kind][1]

    def vjp(vr: SinkhornValue, value_bar, **params):
        """``x_bar = sum_members value_bar_m dvalue_m/dx`` for x = C, a, b: the
        per-member gradient of ``refimpl.sinkhorn.<kind>_value_grad`` scaled by
        the member's cotangent and summed back to the input's shape."""
        xp = _backend.namespace(value_bar=value_bar, P=vr.plan.P)
        C_bar, a_bar, b_bar, _ = grad_of(vr.plan, **params)
        w = xp.reshape(value_bar, tuple(value_bar.shape) + (1,))
        return (sum_to_shape(w[..., None] * C_bar, vr.shapes[0]),
                sum_to_shape(w * a_bar, vr.shapes[1]), sum_to_shape(w * b_bar, vr.shapes[2]))

    return vjp


def _value_jvp(kind: str):
    grad_of = _VALUES[kind][1]

    def jvp(vr: SinkhornValue, dC, da, db, **params):
        """``d value`` along ``(dC, da, db)`` (None = 0).  Linear:
        ``<dC, P> + <C, dP>`` with ``dP`` from :func:`refimpl.sinkhorn.sinkhorn_jvp`
        (forward mode, a route independent of the VJP's ``linear_value_grad``);
        entropic and KL: ``<C_bar, dC> + <a_bar, da> + <b_bar, db>`` with the
        envelope gradient (gauge fixed, so an infeasible tangent acts as its
        projection ``(da + 1 (1^T db - 1^T da) / n, db)``, as for ``sinkhorn_jvp``)."""
        plan = vr.plan
        xp = _backend.namespace(P=plan.P)
        if kind == "linear":
            full = tuple(None if t is None else xp.broadcast_to(t, tuple(x.shape))
                         for t, x in zip((dC, da, db), (plan.C, plan.a, plan.b)))
            dC, da, db = full
            dP = sk.sinkhorn_jvp(plan, dC, da, db, **params)
            out = xp.sum(plan.C * dP, axis=(-2, -1))
            return out if dC is None else out + xp.sum(plan.P * dC, axis=(-2, -1))
        out = xp.zeros(tuple(plan.P.shape[:-2]), dtype=plan.P.dtype,
                       device=_backend.device(plan.P))
        for bar, t, axes in zip(grad_of(plan, **params)[:3], (dC, da, db), ((-2, -1), -1, -1)):
            if t is not None:
                out = out + xp.sum(bar * t, axis=axes)
        return out

    return jvp


def _value_oracle(kind: str):
    def oracle(C, a, b, *, eps, **_):
        """The value from the plan of :func:`_sinkhorn_oracle` (Newton on the dual),
        by the primal formulas: ``<C, P>``; ``+ eps sum P (log P - 1)``;
        ``+ eps sum (P log(P / (a b^T)) - P + a b^T)``."""
        P = _sinkhorn_oracle(C, a, b, eps=eps)
        C = np.broadcast_to(C, P.shape)
        ab = (np.broadcast_to(a, P.shape[:-1])[..., :, None]
              * np.broadcast_to(b, P.shape[:-2] + P.shape[-1:])[..., None, :])
        linear = np.sum(C * P, axis=(-2, -1))
        if kind == "linear":
            return linear
        if kind == "entropic":
            return linear + eps * np.sum(special.xlogy(P, P) - P, axis=(-2, -1))
        return linear + eps * np.sum(special.rel_entr(P, ab) - P + ab, axis=(-2, -1))

    return oracle


def _value_cotangent(rng, out, host):
    """One standard normal weight per batch member (a 0-d array when unbatched)."""
    return np.asarray(rng.standard_normal(np.shape(out)))


def _unit_vjp(run: CaseRun) -> tuple:
    """The case's VJP for the cotangent 1 on every member, canonicalised, on the host."""
    ones = run.asarray(np.ones(np.shape(to_host(run.output))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _backend.ConditioningWarning)
        bars = run.spec.vjp(run.result, ones, **run.case.vjp_params)
    return _gauge_fix(tuple(to_host(x).astype(np.float64) for x in bars))


def _additive_parts(C: np.ndarray, dtype: str):
    """``(u, v)`` with ``C = u 1^T + 1 v^T`` to round-off of ``dtype``, or None
    (a single row or column is always additive)."""
    u, v = C[:, 0], C[0, :] - C[0, 0]
    resid = float(np.max(np.abs(C - u[:, None] - v[None, :])))
    ulp = 2.0 ** -52 if dtype == "float64" else 2.0 ** -23
    return (u, v) if resid <= 64.0 * ulp * max(float(np.max(np.abs(C))), 1.0) else None


def _value_closed_form(run: CaseRun) -> list[CheckResult]:
    """Additive costs ``C = u 1^T + 1 v^T`` (flagged additive cases, and any single
    row or column) with unit masses: ``P = a b^T`` and

    linear, KL: ``value = <u, a> + <v, b>``, gradient ``(a b^T, u, v)``;
    entropic: ``value = <u, a> + <v, b> + eps (<a, log a> + <b, log b> - 1)``,
    gradient ``(a b^T, u + eps log a, v + eps log b)``

    (marginal gradients up to the (c, -c) gauge; KL(a b^T | a b^T) = 0, and
    ``J^T C = 0`` for the linear value since ``dP`` has zero row and column
    sums).  Unbatched cases only."""
    C, a, b = (run.host[k] for k in ("C", "a", "b"))
    parts = _additive_parts(C, run.dtype) if C.ndim == 2 else None
    if parts is None or abs(a.sum() - 1.0) > 1e-12 or abs(b.sum() - 1.0) > 1e-12:
        return []
    u, v = parts
    eps = run.case.params["eps"]
    kind = run.spec.name.removeprefix("sinkhorn_")
    value = u @ a + v @ b
    bars = (np.outer(a, b), u, v)
    if kind == "entropic":
        value = value + eps * (a @ np.log(a) + b @ np.log(b) - 1.0)
        bars = (np.outer(a, b), u + eps * np.log(a), v + eps * np.log(b))
    rtol = 1e-10 if run.dtype == "float64" else 1e-3
    scale = float(np.max(np.abs(C))) + eps * max(float(np.max(np.abs(np.log(a)))),
                                                float(np.max(np.abs(np.log(b)))), 1.0)
    out = to_host(run.output).astype(np.float64)
    return [compare(out, np.asarray(value), rtol=rtol, atol=rtol * scale,
                    name="value_closed_form"),
            compare(_unit_vjp(run), _gauge_fix(bars), rtol=rtol, atol=rtol * scale,
                    name="gradient_closed_form")]


def _potentials_from_plan(P: np.ndarray, C: np.ndarray, a: np.ndarray, b: np.ndarray,
                          eps: float, sweeps: int = 20):
    """``(f, g)`` of a near-optimal plan, per member: ``f_i + g_j = eps log P_ij + C_ij``
    in least squares, then ``sweeps`` exact alternating updates
    ``f = eps log a - eps logsumexp((g - C) / eps)`` (rows) and likewise ``g``
    (columns).  The sweeps make every marginal entry exact relative to its
    own size, which Newton's residual (measured against the total mass) does
    not for entries of 1e-12; from a start at the optimum they only remove
    that residual."""
    S = eps * np.log(P) + C
    f, g = S.mean(-1) - S.mean(axis=(-2, -1))[..., None], S.mean(-2)
    for _ in range(sweeps):
        f = eps * (np.log(a) - special.logsumexp((g[..., None, :] - C) / eps, axis=-1))
        g = eps * (np.log(b) - special.logsumexp((f[..., :, None] - C) / eps, axis=-2))
    return f, g


def _value_envelope(run: CaseRun) -> list[CheckResult]:
    """Envelope gradients against the Newton oracle's plan (unit cotangent):
    entropic ``(P, f, g)``; KL ``(P, f - eps log a - eps + eps sum(b),
    g - eps log b - eps + eps sum(a))``, with ``f, g`` read off the oracle plan
    (``log P = (f 1^T + 1 g^T - C) / eps``), summed over broadcast members and
    compared after the (c, -c) gauge fixing.  ``P`` is the oracle's plan, not
    the plan of the polished potentials: their difference is round-off."""
    C, a, b = (run.host[k] for k in ("C", "a", "b"))
    eps = run.case.params["eps"]
    P = _sinkhorn_oracle(C, a, b, eps=eps)
    af = np.broadcast_to(a, P.shape[:-1])
    bf = np.broadcast_to(b, P.shape[:-2] + P.shape[-1:])
    f, g = _potentials_from_plan(P, np.broadcast_to(C, P.shape), af, bf, eps)
    if run.spec.name.removeprefix("sinkhorn_") == "kl":
        f = f - eps * np.log(af) - eps + eps * bf.sum(-1, keepdims=True)
        g = g - eps * np.log(bf) - eps + eps * af.sum(-1, keepdims=True)
    expected = tuple(sum_to_shape_host(x, run.host[k].shape)
                     for x, k in zip((P, f, g), ("C", "a", "b")))
    rtol = 1e-9 if run.dtype == "float64" else 1e-3
    return [compare(_unit_vjp(run), _gauge_fix(expected), rtol=rtol, name="envelope_vs_oracle_plan")]


def _value_spec(kind: str) -> OpSpec:
    balanced = {c.id: c for c in _sinkhorn_cases()[0]}
    kl_note = ("; KL(P|Q) = sum P log(P/Q) - P + Q, so the value carries eps sum(a) sum(b) "
               "(= eps for unit masses)")
    return OpSpec(
        name=f"sinkhorn_{kind}",
        description=_VALUES[kind][2],
        inputs=("C", "a", "b"),
        core_ndim=(2, 1, 1),
        output="value",
        output_core_ndim=0,
        forward=_value_forward(kind),
        vjp=_value_vjp(kind),
        jvp=_value_jvp(kind),
        oracle=_value_oracle(kind),
        cases=tuple(dataclasses.replace(balanced[i], description=_VALUE_CASE_TEXT.get(
            i, balanced[i].description)) for i in _VALUE_CASES),
        tol=_TOL,
        tangents=_sinkhorn_tangents,
        cotangent=_value_cotangent,
        canonicalize=_gauge_fix,
        candidate_params=("eps",),
        conventions={
            "gauge": _GAUGE_CONVENTION,
            "output": {"linear": "value = <C, P>, P the balanced entropic plan; not the "
                                 "regularised objective",
                       "entropic": "value = <C, P> + eps sum P (log P - 1) = <f, a> + <g, b> "
                                   "- eps sum(P) at the balanced optimum",
                       "kl": "value = <C, P> + eps KL(P | a b^T)" + kl_note}[kind],
            "candidates": "fn(C, a, b, *, eps) -> value, one per batch member (shape: the "
                          "batch shape, () unbatched)",
        },
        extra_checks=(_value_closed_form,) if kind == "linear" else (_value_closed_form,
                                                                     _value_envelope),
    )


def _sinkhorn_linear_spec() -> OpSpec:
    return _value_spec("linear")


def _sinkhorn_entropic_spec() -> OpSpec:
    return _value_spec("entropic")


def _sinkhorn_kl_spec() -> OpSpec:
    return _value_spec("kl")


#: The specs this module registers, in table order.
BUILDERS = (_sinkhorn_spec, _sinkhorn_unbalanced_spec, _sinkhorn_linear_spec,
            _sinkhorn_entropic_spec, _sinkhorn_kl_spec)
