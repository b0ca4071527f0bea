"""Registry entries for SOFT top-k and sorted SOFT top-k (refimpl.topk): cases, oracle, tolerances and
operator-specific checks.  Listed in ``refimpl.registry``."""

from __future__ import annotations

import math

import numpy as np

from .. import topk
from ..backend import to_host
from ..check import CheckResult, compare
from . import Case, CaseRun, OpSpec, Tolerance
from .sinkhorn import sinkhorn_dual_newton


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
    sum(A) = k (host, float64, scores centred at their median), row by row.

    Independent of the code under test in its algorithm (bracketing root finder
    on the host, not the safeguarded Newton), but it assumes the same
    derivation, the sigmoid form with t = eps/2.  That form is checked against
    optimal transport itself by the Sinkhorn-path cases (whose output this
    oracle also judges) and by :func:`_tk_ot_plan` (a dual-Newton plan)."""
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


def _anchor_plans_host(x: np.ndarray, y: np.ndarray, nu: np.ndarray, eps: float,
                       largest: bool) -> np.ndarray:
    """Entropic plans (..., n, m) of the scores (negated for largest=False,
    centred per row) onto the anchors ``y`` with ``mu = 1/n`` and ``nu``, by
    damped Newton on the dual (:func:`sinkhorn_dual_newton`), row by row on the
    host: an OT route independent of refimpl.sinkhorn and of the sigmoid form."""
    n = x.shape[-1]
    xs = x if largest else -x
    P = np.empty(x.shape + (len(y),))
    for idx in np.ndindex(*x.shape[:-1]):
        xc = xs[idx] - xs[idx].mean()
        P[idx] = sinkhorn_dual_newton((xc[:, None] - y[None, :]) ** 2, np.full(n, 1.0 / n), nu,
                                      eps, None, None)
    return P


def _sorted_topk_oracle(x, *, k, eps, largest=True, **_):
    """Sorted SOFT top-k from the dual-Newton plan (:func:`_anchor_plans_host`):
    anchors 0..k (1..n when k = n), nu = ((n-k)/n, 1/n, ...),
    A[:, r] = n Gamma[:, k - r]."""
    n = x.shape[-1]
    if k == n:
        y, nu = np.arange(1.0, n + 1.0), np.full(n, 1.0 / n)
    else:
        y = np.arange(0.0, k + 1.0)
        nu = np.concatenate([[(n - k) / n], np.full(k, 1.0 / n)])
    return n * _anchor_plans_host(x, y, nu, eps, largest)[..., ::-1][..., :k]


def _topk_tangents(rng, host):
    """Directions scaled per row by the spread max(x) - min(x) (1 for a constant
    row): the operator is translation invariant, so an offset such as 1e3 must
    not set the finite-difference step."""
    x = host["x"]
    spread = x.max(-1, keepdims=True) - x.min(-1, keepdims=True)
    return (rng.standard_normal(x.shape) * np.where(spread > 0, spread, 1.0),)


def _topk_gradient_scale(inputs, output, out_bar, params):
    """Natural size of ``x_bar`` per row: ``max|A_bar| / t``, ``t = eps / 2``.

    ``x_bar = +-s (A_bar - <s, A_bar>/S) / t`` with ``s = A (1 - A)``,
    ``S = sum(s)``, and ``theta`` the root of ``F(theta) = sum(A) - k``.  No
    floating-point algorithm knows that root better than to a residual
    ``|F| ~ u k`` (the rounding of ``sum(A)``): a residual ``F`` moves
    ``theta`` by ``t F / S`` and hence ``x_bar_i`` by up to
    ``|F| max|A_bar| (s_i / S) / t <= |F| max|A_bar| / t``, whatever ``S``
    is.  Near the hard limit (``S -> 0``) the gradient itself is only about
    ``S max|A_bar| / t``, so its attainable relative accuracy is ``u k / S``:
    round-off must be measured against ``max|A_bar| / t`` (the scale of the
    Jacobian ``s / t`` at a tie), not against ``max|A_bar| max|A| / max|x|``.
    """
    t = float(params["eps"]) / 2.0                       # anchors (0, 1)
    return (np.max(np.abs(out_bar), axis=-1, keepdims=True) / t,)


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


def _tk_ot_plan(run: CaseRun) -> list[CheckResult]:
    """A equals n Gamma[:, upper] of the entropic OT plan onto (0, 1) computed by
    dual Newton (:func:`_anchor_plans_host`; not near-hard cases, whose dual
    Newton needs a long continuation; not k = 0, n, where nu has a zero entry)."""
    k, eps, largest, _ = _tk_params(run)
    x = run.host["x"]
    n = x.shape[-1]
    if "near_hard" in run.case.flags or k in (0, n):
        return []
    P = _anchor_plans_host(x, np.array([0.0, 1.0]), np.array([(n - k) / n, k / n]), eps, largest)
    return [compare(to_host(run.output).astype(np.float64), n * P[..., 1], rtol=run.tol.forward,
                    atol=run.tol.forward, name="A_vs_dual_newton_plan")]


def _tk_closed_forms(run: CaseRun) -> list[CheckResult]:
    """Closed-form instances: n = 2, k = 1 gives A_1 = sigmoid(+-(x_1 - x_2)/eps)
    and dA_1/dx_1 = s_1/eps; all-equal scores give A = k/n and
    J = (s/t)(I - 1 1^T/n) with s = (k/n)(1 - k/n)."""
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


def _make_normal_scores(n, scale=1.0, batch=()):
    """A case maker: ``x`` of ``batch + (n,)`` standard normal scores times ``scale``."""
    return lambda rng: {"x": scale * rng.standard_normal(batch + (n,))}


def _make_ties_boundary(rng):
    # Three equal scores share the one slot left after the top score (k = 2).
    return {"x": np.array([2.0, 0.5, 0.5, 0.5, -0.25, -1.5])}


def _make_tiny_eps(rng):
    # Distinct scores at least 0.1 apart; eps = 1e-6: A is the hard indicator.
    x = np.sort(rng.choice(np.arange(-10, 11), size=8, replace=False)) / 10.0
    return {"x": rng.permutation(x)}


def _make_batch_scales(rng):
    # Rows of scale 1e-2, 1 and 10 with offsets 0, 1e3, -50 (the offsets leave A
    # unchanged; rows never interact: no normalisation over the batch).
    scale = np.array([1e-2, 1.0, 10.0])[:, None]
    offset = np.array([0.0, 1e3, -50.0])[:, None]
    return {"x": scale * rng.standard_normal((3, 8)) + offset}


def _make_batch_scales_sinkhorn(rng):
    scale = np.array([0.1, 1.0, 2.0])[:, None]
    offset = np.array([0.0, 100.0, -5.0])[:, None]
    return {"x": scale * rng.standard_normal((3, 6)) + offset}


def _soft_topk_cases() -> tuple[Case, ...]:
    """The curated cases of soft_topk: closed form and Sinkhorn path, ties, edges, batches."""
    sk_tight = {"method": "sinkhorn", "tol": 1e-13, "max_iter": 200_000}
    sk32 = {"float32": {"forward": 2e-3, "fd": 5e-3, "batch": 1e-4}}
    return (
        Case("closed_largest", "n = 8 normal scores, k = 3, eps = 0.2, closed form", 501,
             _make_normal_scores(8), params={"k": 3, "eps": 0.2, "largest": True}),
        Case("closed_smallest", "n = 7, k = 2 smallest, eps = 0.3, closed form", 502,
             _make_normal_scores(7), params={"k": 2, "eps": 0.3, "largest": False}),
        Case("sinkhorn_largest", "n = 8, k = 3, eps = 0.5, Sinkhorn path + KKT/Schur backward", 503,
             _make_normal_scores(8), params={"k": 3, "eps": 0.5, "largest": True, **sk_tight},
             flags=("sinkhorn",), tol=sk32),
        Case("sinkhorn_smallest", "n = 7, k = 4 smallest, eps = 0.4, Sinkhorn path", 504,
             _make_normal_scores(7), params={"k": 4, "eps": 0.4, "largest": False, **sk_tight},
             flags=("sinkhorn",), tol=sk32),
        Case("sinkhorn_cg", "Sinkhorn path, backward by matrix-free CG", 505,
             _make_normal_scores(9),
             params={"k": 2, "eps": 0.5, "largest": True, **sk_tight},
             vjp_params={"method": "cg"}, flags=("sinkhorn", "method"), tol=sk32),
        Case("ties_boundary", "three equal scores share the last slot (k = 2): A = 1/3 each at "
             "eps -> 0; eps = 0.1", 506, _make_ties_boundary,
             params={"k": 2, "eps": 0.1, "largest": True}, flags=("ties",)),
        Case("ties_boundary_sinkhorn", "the tie case on the Sinkhorn path (eps = 0.3)", 507,
             _make_ties_boundary, params={"k": 2, "eps": 0.3, "largest": True, **sk_tight},
             flags=("ties", "sinkhorn"), tol=sk32),
        Case("tiny_eps", "eps = 1e-6 << gap 0.1: A is the hard top-k, s underflows to 0, "
             "gradient 0, no NaN", 508, _make_tiny_eps,
             params={"k": 3, "eps": 1e-6, "largest": True},
             flags=("tiny_eps", "near_hard")),
        Case("k_zero", "k = 0: A = 0 identically, gradient 0", 509, _make_normal_scores(5),
             params={"k": 0, "eps": 0.1}, flags=("edge",)),
        Case("k_n", "k = n: A = 1 identically, gradient 0", 510, _make_normal_scores(5),
             params={"k": 5, "eps": 0.1, "largest": False}, flags=("edge",)),
        Case("pair", "n = 2, k = 1: A_1 = sigmoid((x_1 - x_2)/eps) (closed form)", 511,
             _make_normal_scores(2), params={"k": 1, "eps": 0.7}, flags=("pair", "closed_form")),
        Case("all_equal", "equal scores: A = k/n, J = (s/t)(I - 11^T/n) (closed form)", 512,
             lambda rng: {"x": np.full(6, 0.3)}, params={"k": 2, "eps": 0.2},
             flags=("all_equal", "closed_form", "ties")),
        Case("batch_scales", "batch of 3 rows of scale 1e-2, 1, 10 and offsets 0, 1e3, -50", 513,
             _make_batch_scales, params={"k": 3, "eps": 0.1},
             flags=("batched", "scales", "near_hard"),
             fd_step=1e-5, tol={"float32": {"forward": 2e-3, "fd": 5e-3}}),
        Case("batch_scales_sinkhorn", "batch of 3 rows (scales 0.1, 1, 2; offsets 0, 100, -5), "
             "Sinkhorn path", 514, _make_batch_scales_sinkhorn,
             params={"k": 2, "eps": 0.5, "largest": True, **sk_tight},
             flags=("batched", "scales", "sinkhorn"), tol=sk32),
    )


def _soft_topk_spec() -> OpSpec:
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
        cases=_soft_topk_cases(),
        tangents=_topk_tangents,
        tol={
            "float64": Tolerance(forward=1e-10, adjoint=1e-11, fd=1e-7, batch=1e-11),
            "float32": Tolerance(forward=2e-4, adjoint=1e-5, fd=2e-3, batch=1e-5),
        },
        candidate_params=("k", "eps", "largest"),
        gradient_scale=_topk_gradient_scale,
        extra_checks=(_tk_sum_is_k, _tk_error_bound, _tk_jacobian_structure, _tk_methods_agree,
                      _tk_ot_plan, _tk_closed_forms, _tk_ties_split),
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


#: The specs this module registers, in table order.
BUILDERS = (_soft_topk_spec, _soft_sorted_topk_spec)
