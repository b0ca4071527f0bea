"""Combinatorial solvers and the surrogate gradients through them.

Independent routes used here: brute-force enumeration of the feasible set in
exact arithmetic (``refimpl.registry.combinatorial._brute``), the dense closed-form projection
Jacobians (``..._host_projection_jacobian``), Richardson-extrapolated
finite differences (``refimpl.check``), the exact smoothed Jacobian of the
perturbed argmin (softmax / normal cdf), and the defining formulas of
blackbox and perturbed gradients evaluated on the host.
"""

import functools
import itertools
import math

import numpy as np
import pytest

from refimpl import check, combinatorial as comb
from refimpl.registry import combinatorial as reg_comb
from refimpl.backend import ConditioningWarning, get_backend, to_host

PROJ = ("none", "mean", "norm", "std")


def host(a):
    return np.asarray(to_host(a), dtype=np.float64)


def top2(w):
    return comb.top_k(w, 2)


top2.spec = comb.top_k.spec  # a declared solver with its parameter bound


# --------------------------------------------------------------------------
# Solvers against brute force
# --------------------------------------------------------------------------

def _solver_cases(rng):
    """(kind, solver, params, host cost) tiny instances; integer costs make ties."""
    out = []
    for n in (1, 2, 5):
        out.append(("argmin_onehot", comb.argmin_onehot, {}, rng.standard_normal(n)))
    out.append(("argmin_onehot", comb.argmin_onehot, {}, rng.integers(0, 3, 6).astype(float)))
    for k in (1, 2, 4, 5):
        out.append(("top_k", comb.top_k, {"k": k}, rng.standard_normal(5)))
        out.append(("top_k", comb.top_k, {"k": k}, rng.integers(0, 3, 5).astype(float)))
    for n in (1, 3, 6):
        out.append(("ranking", comb.ranking, {}, rng.standard_normal(n)))
    out.append(("ranking", comb.ranking, {}, rng.integers(0, 3, 6).astype(float)))
    for shape in ((1, 1), (3, 3), (4, 4), (2, 4), (4, 3)):
        out.append(("assignment", comb.assignment, {}, rng.standard_normal(shape)))
    for shape, nb in (((1, 1), 8), ((2, 2), 8), ((3, 3), 8), ((3, 4), 8), ((2, 5), 8),
                      ((4, 4), 4), ((3, 3), 4)):
        out.append(("shortest_path", comb.shortest_path, {"neighbourhood": nb},
                    rng.uniform(0.0, 2.0, shape)))
    return out


def test_solvers_match_brute_force_including_tie_rule(backend, dtype, rng):
    for kind, solver, params, w in _solver_cases(rng):
        w = w.astype(dtype).astype(np.float64)
        y = solver(backend.asarray(w, dtype), **params)
        assert y.dtype == backend.asarray(w, dtype).dtype
        assert host(y).shape == w.shape
        # the brute force keeps the first minimiser in the order that encodes
        # the documented tie rule (lowest index first)
        np.testing.assert_array_equal(host(y), reg_comb._brute(kind, w, **params),
                                      err_msg=f"{kind} {params} {w}")


def test_documented_tie_breaks():
    w = np.array([1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(comb.argmin_onehot(w), [0, 1, 0, 0])       # lowest index
    np.testing.assert_array_equal(comb.top_k(w, 2), [0, 1, 1, 0])            # lower indices first
    np.testing.assert_array_equal(comb.ranking(w), [1, 2, 3, 4])             # lower index, lower rank
    np.testing.assert_array_equal(comb.hard_threshold(np.array([0.0, -0.0, 1e-300])), [0, 0, 1])


def _path_cost(W, y):
    return float(np.sum(W * y))


def _is_path(y, neighbourhood):
    """The 1-entries of y form a simple path from the top-left to the bottom-right."""
    H, Wd = y.shape
    on = {(i, j) for i in range(H) for j in range(Wd) if y[i, j] == 1.0}
    adj = reg_comb._grid_neighbours(H, Wd, neighbourhood)
    idx = {(i, j): i * Wd + j for i in range(H) for j in range(Wd)}
    if (0, 0) not in on or (H - 1, Wd - 1) not in on:
        return False
    degree = {v: sum(1 for u in on if idx[u] in adj[idx[v]]) for v in on}
    ends = [v for v, d in degree.items() if d == 1]
    # a shortest path visits no vertex twice; its inner vertices may touch
    # others diagonally, so check connectivity rather than degrees alone
    seen, stack = {(0, 0)}, [(0, 0)]
    while stack:
        v = stack.pop()
        for u in on:
            if u not in seen and idx[u] in adj[idx[v]]:
                seen.add(u)
                stack.append(u)
    return seen == on and (len(on) == 1 or len(ends) >= 2)


@pytest.mark.parametrize("neighbourhood", [4, 8])
def test_shortest_path_with_ties_and_zeros_is_optimal(neighbourhood, backend, rng):
    for _ in range(5):
        W = rng.integers(0, 3, (3, 4)).astype(float)        # many ties, explicit zeros
        y = host(comb.shortest_path(backend.asarray(W, "float64"), neighbourhood=neighbourhood))
        best = reg_comb._brute("shortest_path", W, neighbourhood=neighbourhood)
        assert _path_cost(W, y) == _path_cost(W, best)
        assert _is_path(y, neighbourhood)


def test_assignment_with_ties_is_optimal(backend, rng):
    for shape in ((4, 4), (3, 5), (5, 3)):
        W = rng.integers(0, 2, shape).astype(float)
        y = host(comb.assignment(backend.asarray(W, "float64")))
        assert float(np.sum(W * y)) == float(np.sum(W * reg_comb._brute("assignment", W)))
        assert y.sum() == min(shape) and y.sum(0).max() == 1 and y.sum(1).max() == 1


def test_shortest_path_30x30_against_scipy_route_cost(rng):
    # A second route on a bigger grid: Dijkstra's distance equals the cost of the path we return.
    from scipy.sparse.csgraph import dijkstra
    from scipy.sparse import csr_array

    W = rng.uniform(0.0, 1.0, (30, 30))
    y = comb.shortest_path(W)
    indptr, indices = comb._grid_graph_structure(30, 30, 8)
    flat = W.reshape(-1)
    dist = dijkstra(csr_array((flat[indices], indices, indptr)), indices=0)
    assert math.isclose(_path_cost(W, y), W[0, 0] + dist[-1], rel_tol=1e-12)
    assert _is_path(y, 8)


# --------------------------------------------------------------------------
# Batch == loop, outputs on the input's namespace, no mutation
# --------------------------------------------------------------------------

SOLVERS = {
    "argmin_onehot": (comb.argmin_onehot, (6,), lambda r, s: r.standard_normal(s)),
    "top_k": (functools.partial(comb.top_k, k=3), (6,), lambda r, s: r.standard_normal(s)),
    "ranking": (comb.ranking, (6,), lambda r, s: r.standard_normal(s)),
    "assignment": (comb.assignment, (4, 4), lambda r, s: r.standard_normal(s)),
    "shortest_path": (comb.shortest_path, (4, 5), lambda r, s: r.uniform(0.0, 2.0, s)),
}


@pytest.mark.parametrize("kind", SOLVERS)
def test_batch_equals_loop_and_no_mutation(kind, backend, dtype, rng):
    solver, core, make = SOLVERS[kind]
    w = make(rng, (2, 3) + core)
    wa = backend.asarray(w, dtype)
    y = solver(wa)
    assert comb.solver_spec(solver).core_ndim == len(core)
    for idx in np.ndindex(2, 3):
        np.testing.assert_array_equal(host(y)[idx], host(solver(backend.asarray(w[idx], dtype))))
    np.testing.assert_array_equal(host(wa), w.astype(dtype))


def test_outputs_live_on_the_input_device():
    be = get_backend("array_api_strict")   # its inputs live on a non-default device
    w = be.asarray(np.array([[0.3, 1.0], [2.0, 0.1]]), "float32")
    for solver in (comb.argmin_onehot, comb.ranking, comb.assignment, comb.shortest_path, top2):
        y = solver(w)
        assert y.device == be.device and y.dtype == w.dtype
        (y + w)   # mixing devices would raise


# --------------------------------------------------------------------------
# Identity: exactness, projection VJPs, properties
# --------------------------------------------------------------------------

def test_plain_identity_is_exactly_minus_or_plus_y_bar(backend, dtype, rng):
    w = backend.asarray(rng.standard_normal((3, 5)), dtype)
    g = backend.asarray(rng.standard_normal((3, 5)), dtype)
    np.testing.assert_array_equal(host(comb.identity_vjp(w, g)), -host(g))
    np.testing.assert_array_equal(host(comb.identity_vjp(w, g, sense="max")), host(g))
    res = comb.identity_layer(top2, w)
    np.testing.assert_array_equal(host(comb.identity_layer_vjp(res, g)), -host(g))
    st = comb.straight_through(w)
    np.testing.assert_array_equal(host(comb.straight_through_vjp(st, g)), host(g))


@pytest.mark.parametrize("projection", ["mean", "norm", "std"])
@pytest.mark.parametrize("core_ndim", [1, 2])
def test_projection_vjp_jvp_against_finite_differences(projection, core_ndim, backend, rng):
    shape = (2, 4) if core_ndim == 1 else (2, 3, 4)
    w = backend.asarray(rng.standard_normal(shape), "float64")
    u, v = (backend.asarray(rng.standard_normal(shape), "float64") for _ in range(2))
    res = comb.project(w, projection=projection, core_ndim=core_ndim)

    def f(x):
        return comb.project(x, projection=projection, core_ndim=core_ndim).u

    results = check.fd_jacobian_check(f, w, u, cotangents=v,
                                      vjp=lambda g: comb.project_vjp(res, g),
                                      jvp=lambda t: comb.project_jvp(res, t))
    results.append(check.adjoint_test(lambda t: comb.project_jvp(res, t),
                                      lambda g: comb.project_vjp(res, g), u, v, tol=1e-13))
    assert all(r.passed for r in results), [str(r) for r in results]


@pytest.mark.parametrize("projection", PROJ)
def test_projection_dense_jacobian_matches_closed_form(projection, rng):
    w = rng.standard_normal(5)
    res = comb.project(w, projection=projection)
    J_fd = check.fd_jacobian(lambda x: comb.project(x, projection=projection).u, w)
    J = reg_comb._host_projection_jacobian(w, projection)
    np.testing.assert_allclose(J_fd, J, atol=1e-9)
    J_vjp = np.stack([comb.project_vjp(res, e) for e in np.eye(5)])   # rows: J^T e_i
    np.testing.assert_allclose(J_vjp, J.T, atol=1e-15)
    np.testing.assert_allclose(J, J.T, atol=1e-15)                    # symmetric Jacobians


@pytest.mark.parametrize("projection", ["norm", "std"])
def test_projection_at_extreme_scales_neither_overflows_nor_underflows(projection, backend, dtype, rng):
    # P(c w) = P(w) and P'(c w) = P'(w) / c for c > 0, also where ||c w||^2 is
    # not representable (float32 squares overflow above ~1.8e19 and underflow
    # below ~1e-19): ||w|| is computed as max|w| ||w / max|w|||.
    w_h, g_h = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    ref = comb.project(w_h, projection=projection)
    ref_vjp = comb.project_vjp(ref, g_h)
    tol = 1e-13 if dtype == "float64" else 1e-5
    for c in ((1e25, 1e-25) if dtype == "float32" else (1e200, 1e-200)):
        res = comb.project(backend.asarray(c * w_h, dtype), projection=projection)
        assert check.compare(host(res.u), ref.u, rtol=tol).passed, c
        vjp = host(comb.project_vjp(res, backend.asarray(g_h, dtype)))
        assert check.compare(c * vjp, ref_vjp, rtol=tol).passed, c


def test_projection_float32_within_documented_tolerance(rng):
    w = rng.standard_normal(6)
    g = rng.standard_normal(6)
    for p in ("mean", "norm", "std"):
        r64 = comb.project_vjp(comb.project(w, projection=p), g)
        r32 = comb.project_vjp(comb.project(w.astype(np.float32), projection=p), g.astype(np.float32))
        assert r32.dtype == np.float32
        assert check.compare(r32, r64, rtol=1e-5).passed


@pytest.mark.parametrize("projection", ["mean", "norm", "std"])
def test_identity_direction_properties(projection, backend, dtype, rng):
    tol = 1e-12 if dtype == "float64" else 2e-5
    w_h = rng.standard_normal((3, 6)) * np.array([[1e-3], [1.0], [1e3]])
    g_h = rng.standard_normal((3, 6))
    w, g = backend.asarray(w_h, dtype), backend.asarray(g_h, dtype)
    w_h = host(w)
    r = host(comb.identity_vjp(w, g, projection=projection))
    norms = np.linalg.norm(r, axis=-1)
    if projection in ("mean", "std"):                                 # r _|_ 1, r(w + t 1) = r(w)
        assert np.all(np.abs(r.sum(-1)) <= tol * norms * math.sqrt(6))
        shifted = backend.asarray(w_h + 2.0 * np.abs(w_h).max(-1, keepdims=True), dtype)
        assert check.compare(comb.identity_vjp(shifted, g, projection=projection), r,
                             rtol=50 * tol).passed
    if projection in ("norm", "std"):                                 # r _|_ w, r(c w) = r(w) / c
        assert np.all(np.abs(np.sum(r * w_h, -1)) <= tol * norms * np.linalg.norm(w_h, axis=-1) * 4)
        np.testing.assert_allclose(4.0 * host(comb.identity_vjp(w * 4.0, g, projection=projection)),
                                   r, rtol=10 * tol, atol=10 * tol * np.abs(r).max())
        # no cost collapse: a plain step never shrinks ||w|| (r _|_ w), any step size
        for eta in (1e-3, 1.0, 1e3):
            assert np.all(np.linalg.norm(w_h - eta * r, axis=-1)
                          >= np.linalg.norm(w_h, axis=-1) * (1 - 4 * tol))


def test_plain_identity_step_shrinks_costs_for_a_hamming_loss(rng):
    # The mechanism behind cost collapse: for min-form y and Hamming loss,
    # y_bar = y - y*, and <w, y_bar> = <w, y> - <w, y*> <= 0, so the plain
    # identity step w - eta w_bar = w + eta y_bar shrinks ||w|| to first order.
    for _ in range(20):
        w = rng.standard_normal(8)
        y = comb.top_k(w, 3)
        y_star = np.zeros(8)
        y_star[rng.choice(8, 3, replace=False)] = 1.0
        y_bar = y - y_star
        assert w @ y_bar <= 0.0
        w_bar = comb.identity_vjp(w, y_bar)
        assert np.linalg.norm(w - 1e-3 * w_bar) <= np.linalg.norm(w) + 1e-9
        w_bar_std = comb.identity_vjp(w, y_bar, projection="std")
        assert np.linalg.norm(w - 1e-3 * w_bar_std) >= np.linalg.norm(w)


# --------------------------------------------------------------------------
# Forward invariance and refusal
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SOLVERS)
def test_forward_invariance_where_valid(kind, backend, rng):
    solver, core, make = SOLVERS[kind]
    spec = comb.solver_spec(solver)
    w_h = make(rng, (4,) + core)
    w = backend.asarray(w_h, "float64")
    y = host(solver(w))
    for p in spec.projections:
        res = comb.identity_layer(solver, w, projection=p)
        np.testing.assert_array_equal(host(res.y), y, err_msg=p)
        # and the invariance behind each projection: shifts (mean), scalings (norm)
        if p == "mean":
            np.testing.assert_array_equal(host(solver(w + 3.7)), y)
        if p == "norm":
            np.testing.assert_array_equal(host(solver(w * 0.05)), y)


def test_invalid_projection_is_refused(rng):
    W = rng.uniform(0.1, 1.0, (3, 3))
    for p in ("mean", "std"):
        with pytest.raises(ValueError, match="'projection'.*not valid for solver 'shortest_path'"):
            comb.identity_layer(comb.shortest_path, W, projection=p)
        with pytest.raises(ValueError, match="'projection'.*hard_threshold"):
            comb.identity_layer(comb.hard_threshold, W[0], projection=p)
    assert comb.check_projection(comb.shortest_path, "norm") == "norm"
    # the refusal is right: a constant shift does change the shortest path
    W = np.array([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    assert not np.array_equal(comb.shortest_path(W), comb.shortest_path(W + 10.0))
    with pytest.raises(ValueError, match="'projection'"):
        comb.identity_layer(comb.ranking, W[0], projection="zscore")


# --------------------------------------------------------------------------
# Descent property for a linear loss <c, y>
# --------------------------------------------------------------------------

DESCENT = [("argmin_onehot", p) for p in ("none", "mean")] + \
          [("top_k", p) for p in ("none", "mean")] + \
          [("ranking", p) for p in ("none", "mean")] + \
          [("assignment", p) for p in ("none", "mean")] + [("shortest_path", "none")]


@pytest.mark.parametrize("kind, projection", DESCENT)
def test_linear_loss_never_increases_along_the_identity_direction(kind, projection, rng):
    # L(y) = <c, y>, so y_bar = c.  Along w(t) = w - t w_bar the solver solves
    # min <w + t c, y> (the projection's invariance removes the rest), whose
    # optimal value is concave in t with slope <c, y(t)>: the linearised loss
    # never increases, and strictly decreases when the solution changes.
    solver, core, make = SOLVERS[kind]
    spec = comb.solver_spec(solver)
    n_changes = 0
    for trial in range(4):
        w = make(rng, core)
        c = rng.uniform(0.0, 2.0, core) if kind == "shortest_path" else rng.standard_normal(core)
        w_bar = comb.identity_vjp(w, c, projection=projection, core_ndim=spec.core_ndim)
        t = np.linspace(0.0, 6.0, 300).reshape((-1,) + (1,) * len(core))
        ys = solver(w - t * w_bar)                              # one batched call
        loss = np.sum(ys * c, axis=tuple(range(1, ys.ndim)))
        changes = np.any(ys[1:] != ys[:-1], axis=tuple(range(1, ys.ndim)))
        n_changes += int(changes.sum())
        steps = np.diff(loss)
        assert np.all(steps[changes] < 0.0) and np.all(steps[~changes] == 0.0)
    assert n_changes >= 3, "vacuous: the solution hardly moved"


@pytest.mark.parametrize("projection", PROJ)
def test_small_step_from_a_tie_moves_to_the_better_solution(projection, rng):
    # At a tie between two neighbouring k-hot solutions, any small step along
    # -w_bar picks the one with lower linearised loss <c, y>: for every projection.
    n, k = 7, 3
    for _ in range(10):
        w = rng.standard_normal(n)
        order = np.argsort(w)
        w[order[k]] = w[order[k - 1]]                          # boundary tie
        y0 = comb.top_k(w, k)
        y1 = y0.copy()
        y1[order[k - 1]], y1[order[k]] = y0[order[k]], y0[order[k - 1]]
        c = rng.standard_normal(n)
        w_bar = comb.identity_vjp(w, c, projection=projection)
        y_t = comb.top_k(w - 1e-6 * w_bar / np.abs(w_bar).max(), k)
        best = min((y0, y1), key=lambda y: c @ y)
        np.testing.assert_array_equal(y_t, best)


# --------------------------------------------------------------------------
# Relaxation view (numeric companion of derivations/identity.py)
# --------------------------------------------------------------------------

def test_identity_std_is_the_jacobian_of_the_relaxed_top_k(rng):
    # Relax k-hot vectors to the sphere of radius R = sqrt(k (n - k) / n)
    # around (k / n) 1 intersected with <1, y> = k; it contains every k-hot
    # vector.  Its exact argmin is y_R(w) = (k / n) 1 - R P_std(w), and
    # its Jacobian (finite differences) equals R times identity + P_std.
    n, k = 6, 2
    R = math.sqrt(k * (n - k) / n)
    centre = np.full(n, k / n)
    for y in itertools.combinations(range(n), k):
        v = np.zeros(n)
        v[list(y)] = 1.0
        assert math.isclose(np.linalg.norm(v - centre), R, rel_tol=1e-14)
    w = rng.standard_normal(n)

    def y_relaxed(x):
        return centre - R * comb.project(x, projection="std").u

    y_star = y_relaxed(w)
    # minimality over random feasible points of the relaxed set
    d = rng.standard_normal((2000, n))
    d -= d.mean(1, keepdims=True)
    feasible = centre + R * d / np.linalg.norm(d, axis=1, keepdims=True)
    assert np.all(feasible @ w >= y_star @ w - 1e-12)
    J = check.fd_jacobian(y_relaxed, w)
    g = rng.standard_normal(n)
    np.testing.assert_allclose(J.T @ g, R * comb.identity_vjp(w, g, projection="std"), atol=1e-9)


# --------------------------------------------------------------------------
# Noise margin
# --------------------------------------------------------------------------

def test_noise_margin_is_seeded_two_valued_and_ordered(backend, rng):
    w = backend.asarray(rng.standard_normal((2, 6)), "float64")
    xi = host(comb.noise_margin(w, alpha=0.4, rng=3))
    assert set(np.unique(xi)) == {-0.2, 0.2}
    np.testing.assert_array_equal(xi, host(comb.noise_margin(w, alpha=0.4, rng=3)))
    np.testing.assert_array_equal(xi, host(comb.noise_margin(w, alpha=0.4, rng=np.random.default_rng(3))))
    assert not np.array_equal(xi, host(comb.noise_margin(w, alpha=0.4, rng=4)))
    g = backend.asarray(rng.standard_normal((2, 6)), "float64")
    after = comb.identity_layer(top2, w, projection="std", alpha=0.4, rng=3, noise_order="after")
    before = comb.identity_layer(top2, w, projection="std", alpha=0.4, rng=3, noise_order="before")
    np.testing.assert_array_equal(host(after.xi), xi)
    np.testing.assert_allclose(host(after.u), host(comb.project(w, projection="std").u) + xi, atol=1e-15)
    np.testing.assert_allclose(host(before.u), host(comb.project(w + after.xi, projection="std").u),
                               atol=1e-15)
    np.testing.assert_array_equal(host(after.y), host(comb.top_k(after.u, 2)))
    # backward: P' at w (after) or at w + xi (before); the noise passes gradients through
    np.testing.assert_array_equal(host(comb.identity_layer_vjp(after, g)),
                                  host(comb.identity_vjp(w, g, projection="std")))
    np.testing.assert_allclose(host(comb.identity_layer_vjp(before, g)),
                               host(comb.identity_vjp(w + after.xi, g, projection="std")), atol=1e-15)
    rerun = comb.identity_layer(top2, w, projection="std", alpha=0.4, rng=3)
    np.testing.assert_array_equal(host(rerun.y), host(after.y))


def test_noise_margin_batch_equals_loop_given_the_draws(backend, rng):
    w = backend.asarray(rng.standard_normal((3, 6)), "float64")
    g = backend.asarray(rng.standard_normal((3, 6)), "float64")
    for order in ("after", "before"):
        res = comb.identity_layer(top2, w, projection="std", alpha=0.5, rng=2, noise_order=order)
        w_bar = host(comb.identity_layer_vjp(res, g))
        for b in range(3):
            member = comb.identity_layer(top2, w[b, ...], projection="std", alpha=0.5,
                                         xi=res.xi[b, ...], noise_order=order)
            np.testing.assert_array_equal(host(member.y), host(res.y)[b])
            np.testing.assert_allclose(host(comb.identity_layer_vjp(member, g[b, ...])), w_bar[b],
                                       rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="'xi'"):
        comb.identity_layer(top2, w, alpha=0.5, xi=res.xi[0, ...])
    # The documented catch: the draws are made for the whole batch, so a loop
    # passing the batch's seed to every member draws other numbers (only the
    # first member's coincide: C order).
    seeded = [host(comb.noise_margin(w[b, ...], alpha=0.5, rng=2)) for b in range(3)]
    np.testing.assert_array_equal(seeded[0], host(res.xi)[0])
    assert not np.array_equal(seeded[1], host(res.xi)[1])


def test_noise_margin_breaks_cost_collapse_ties():
    # all-equal costs: without noise the tie-break always picks the same
    # solution; with noise the solutions vary with the seed
    w = np.zeros(6)
    ys = {tuple(comb.identity_layer(top2, w, alpha=1.0, rng=s).y) for s in range(20)}
    assert len(ys) > 3
    assert tuple(comb.identity_layer(top2, w).y) == (1, 1, 0, 0, 0, 0)


# --------------------------------------------------------------------------
# Blackbox
# --------------------------------------------------------------------------

def test_blackbox_small_lam_regime_equals_scaled_identity(rng):
    for solver, k in ((comb.argmin_onehot, 1), (functools.partial(comb.top_k, k=3), 3)):
        for _ in range(10):
            w = rng.standard_normal(6)
            order = np.argsort(w)
            y0 = solver(w)
            y1 = y0.copy()
            y1[order[k - 1]], y1[order[k]] = 0.0, 1.0            # neighbouring solution
            y_bar = y0 - y1                                      # -y_bar points at y1
            lam_star = (w[order[k]] - w[order[k - 1]]) / 2.0     # smallest lam that moves y
            for lam in (lam_star * 1e-3, lam_star * (1 - 1e-9)):
                np.testing.assert_array_equal(comb.blackbox_vjp(solver, w, y_bar, lam=lam), 0.0)
            lam = lam_star * (1 + 1e-9)
            np.testing.assert_allclose(lam * comb.blackbox_vjp(solver, w, y_bar, lam=lam),
                                       comb.identity_vjp(w, y_bar), rtol=0, atol=1e-15)


def test_blackbox_formula_and_calls(backend, dtype, rng):
    for kind, solver, params, w in _solver_cases(rng):
        if kind == "shortest_path":
            continue
        w = w.astype(dtype).astype(np.float64)
        g = rng.standard_normal(w.shape).astype(dtype).astype(np.float64)
        bound = functools.partial(solver, **params) if params else solver
        counted = comb.CountingSolver(bound)
        got = comb.blackbox_vjp(counted, backend.asarray(w, dtype), backend.asarray(g, dtype), lam=0.8)
        assert counted.calls == 2                       # y(w) recomputed, plus y(w')
        want = (reg_comb._brute(kind, w + 0.8 * g, **params) - reg_comb._brute(kind, w, **params)) / 0.8
        np.testing.assert_allclose(host(got), want, rtol=1e-6, atol=1e-6)


def test_blackbox_shortest_path_with_clipping(rng):
    W = rng.uniform(0.0, 1.0, (4, 4))
    g = rng.standard_normal((4, 4))
    clipped = functools.partial(comb.shortest_path, negative="clip")
    with pytest.raises(ValueError, match="'W' has negative"):
        comb.blackbox_vjp(comb.shortest_path, W, g, lam=5.0)
    got = comb.blackbox_vjp(clipped, W, g, lam=5.0)
    want = (comb.shortest_path(np.maximum(W + 5.0 * g, 0.0)) - comb.shortest_path(W)) / 5.0
    np.testing.assert_array_equal(got, want)


def _argmax_onehot(w):
    return comb.argmin_onehot(-w)


argmax_onehot = comb.declare(core_ndim=1, sense="max", projections=PROJ, name="argmax_onehot")(_argmax_onehot)


def test_max_form_sign_conventions(rng):
    # y_max(w) = y_min(-w): every rule must satisfy w_bar_max(w) = -w_bar_min(-w).
    w, g = rng.standard_normal(5), rng.standard_normal(5)
    np.testing.assert_array_equal(comb.blackbox_vjp(argmax_onehot, w, g, lam=0.9),
                                  -comb.blackbox_vjp(comb.argmin_onehot, -w, g, lam=0.9))
    res_max = comb.identity_layer(argmax_onehot, w, projection="std")
    res_min = comb.identity_layer(comb.argmin_onehot, -w, projection="std")
    np.testing.assert_array_equal(res_max.y, res_min.y)
    np.testing.assert_allclose(comb.identity_layer_vjp(res_max, g), -comb.identity_layer_vjp(res_min, g),
                               atol=1e-15)
    Z = np.random.default_rng(0).gumbel(size=(50, 5))
    pmax = comb.perturbed(argmax_onehot, w, sigma=0.7, n_samples=50, Z=Z, noise="gumbel")
    pmin = comb.perturbed(comb.argmin_onehot, -w, sigma=0.7, n_samples=50, Z=Z, noise="gumbel")
    np.testing.assert_array_equal(pmax.samples, pmin.samples)
    np.testing.assert_allclose(comb.perturbed_vjp(pmax, g), -comb.perturbed_vjp(pmin, g), atol=1e-15)


# --------------------------------------------------------------------------
# Perturbed optimizer
# --------------------------------------------------------------------------

@pytest.mark.parametrize("noise", ["gaussian", "gumbel"])
def test_perturbed_formula_on_host(noise, backend, dtype, rng):
    for solver, kind, params, w in ((comb.ranking, "ranking", {}, rng.standard_normal(4)),
                                    (top2, "top_k", {"k": 2}, rng.standard_normal(5)),
                                    (comb.assignment, "assignment", {}, rng.standard_normal((3, 3)))):
        w = w.astype(dtype).astype(np.float64)
        g = rng.standard_normal(w.shape)
        res = comb.perturbed(solver, backend.asarray(w, dtype), sigma=0.6, n_samples=30, rng=9, noise=noise)
        Z = host(res.Z)
        ref_Z = np.random.default_rng(9)
        ref_Z = ref_Z.standard_normal((30,) + w.shape) if noise == "gaussian" else ref_Z.gumbel(size=(30,) + w.shape)
        np.testing.assert_allclose(Z, ref_Z, rtol=1e-7)              # seeded draws
        u = w - 0.6 * Z                                              # min-form: w + s sigma Z, s = -1
        y_m = np.stack([reg_comb._brute(kind, u[m], **params) for m in range(30)])
        np.testing.assert_array_equal(host(res.samples), y_m)
        np.testing.assert_allclose(host(res.y), y_m.mean(0), atol=1e-6)
        grad_nu = Z if noise == "gaussian" else 1.0 - np.exp(-Z)
        inner = np.sum(y_m * g, axis=tuple(range(1, y_m.ndim)))
        want = -np.tensordot(inner, grad_nu, axes=1) / (0.6 * 30)
        got = host(comb.perturbed_vjp(res, backend.asarray(g, dtype)))
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == "float32" else 1e-12,
                                   atol=1e-5 * np.abs(want).max())


def test_perturbed_has_the_one_over_sigma_factor(rng):
    # Same standardised noise, sigma doubled: for argmin of w/sigma scale the
    # samples are identical when w is doubled too, and the VJP halves.
    w, g = rng.standard_normal(5), rng.standard_normal(5)
    Z = rng.standard_normal((100, 5))
    a = comb.perturbed(comb.argmin_onehot, w, sigma=0.5, n_samples=100, Z=Z)
    b = comb.perturbed(comb.argmin_onehot, 2.0 * w, sigma=1.0, n_samples=100, Z=Z)
    np.testing.assert_array_equal(a.samples, b.samples)
    np.testing.assert_allclose(comb.perturbed_vjp(b, g), 0.5 * comb.perturbed_vjp(a, g), rtol=1e-14)


def test_perturbed_gumbel_large_sigma_limit_is_identity_with_mean(rng):
    # sigma * J(sigma) -> -(I - 1 1^T / n) / n: the identity with P_mean, scaled by 1/n.
    n = 4
    w, g = rng.standard_normal(n) * 0.1, rng.standard_normal(n)
    sigma = 1e3
    _, J = reg_comb._perturbed_exact(w, sigma, "gumbel")
    limit = comb.identity_vjp(w, g, projection="mean") / n
    np.testing.assert_allclose(sigma * J.T @ g, limit, atol=1e-4)
    res = comb.perturbed(comb.argmin_onehot, w, sigma=sigma, n_samples=200_000, rng=1, noise="gumbel")
    assert check.compare(sigma * comb.perturbed_vjp(res, g), limit, rtol=0.05).passed


def test_perturbed_batch_equals_loop_and_reproducible(backend, rng):
    w_h = rng.standard_normal((3, 5))
    w = backend.asarray(w_h, "float64")
    g = backend.asarray(rng.standard_normal((3, 5)), "float64")
    res = comb.perturbed(top2, w, sigma=0.3, n_samples=20, rng=4, noise="gumbel")
    again = comb.perturbed(top2, w, sigma=0.3, n_samples=20, rng=4, noise="gumbel")
    np.testing.assert_array_equal(host(res.y), host(again.y))
    other = comb.perturbed(top2, w, sigma=0.3, n_samples=20, rng=5, noise="gumbel")
    assert not np.array_equal(host(res.Z), host(other.Z))
    vjp = host(comb.perturbed_vjp(res, g))
    for b in range(3):
        member = comb.perturbed(top2, w[b, ...], sigma=0.3, n_samples=20, Z=res.Z[:, b, ...], noise="gumbel")
        np.testing.assert_array_equal(host(member.y), host(res.y)[b])
        np.testing.assert_allclose(host(comb.perturbed_vjp(member, g[b, ...])), vjp[b], rtol=1e-14)
    # the same seed per member draws other numbers: batch != loop unless Z is sliced
    seeded = comb.perturbed(top2, w[1, ...], sigma=0.3, n_samples=20, rng=4, noise="gumbel")
    assert not np.array_equal(host(seeded.Z), host(res.Z)[:, 1])


# --------------------------------------------------------------------------
# Solver-call counts
# --------------------------------------------------------------------------

def test_solver_call_counts_per_forward_and_backward(rng):
    w, g = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    counted = comb.CountingSolver(top2)
    res = comb.identity_layer(counted, w, projection="std")
    assert (counted.calls, counted.instances, res.n_solves) == (1, 4, 4)
    counted.reset()
    comb.identity_layer_vjp(res, g)
    assert counted.calls == 0
    comb.blackbox_vjp(counted, w, g, lam=1.0, y=res.y)
    assert (counted.calls, counted.instances) == (1, 4)
    counted.reset()
    pres = comb.perturbed(counted, w, sigma=0.5, n_samples=7, rng=0)
    assert (counted.calls, counted.instances, pres.n_solves) == (1, 28, 28)
    counted.reset()
    comb.perturbed_vjp(pres, g)
    assert counted.calls == 0
    assert "calls=0" in repr(counted)


# --------------------------------------------------------------------------
# Straight-through
# --------------------------------------------------------------------------

def test_straight_through(backend, rng):
    x_h = 2.0 * rng.standard_normal((2, 5))
    x, g = backend.asarray(x_h, "float64"), backend.asarray(rng.standard_normal((2, 5)), "float64")
    res = comb.straight_through(x)
    np.testing.assert_array_equal(host(res.y), (x_h > 0).astype(float))
    np.testing.assert_array_equal(host(comb.straight_through_vjp(res, g, clip=1.0)),
                                  host(g) * (np.abs(x_h) <= 1.0))
    with pytest.raises(ValueError, match="'res'"):
        comb.straight_through_vjp(comb.identity_layer(comb.ranking, x), g)
    with pytest.raises(ValueError, match="'clip'"):
        comb.straight_through_vjp(res, g, clip=0.0)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_costs_are_refused(bad):
    w = np.array([0.5, bad, 1.0])
    for solver in (comb.argmin_onehot, comb.ranking, top2, comb.hard_threshold):
        with pytest.raises(ValueError, match="'(w|x)' contains NaN or Inf"):
            solver(w)
    W = np.ones((3, 3))
    W[1, 1] = bad
    for solver in (comb.assignment, comb.shortest_path):
        with pytest.raises(ValueError, match="'W' contains NaN or Inf"):
            solver(W)
    with pytest.raises(ValueError, match="'w' contains NaN"):
        comb.project(w, projection="mean")
    with pytest.raises(ValueError, match="'y_bar' contains NaN"):
        comb.identity_vjp(np.ones(3), w)


def test_bad_arguments_are_refused_naming_them():
    w = np.array([0.3, -1.0, 2.0])
    W = np.ones((3, 3))
    cases = [
        (lambda: comb.shortest_path(-W), ValueError, "'W' has negative"),
        (lambda: comb.top_k(w, 0), ValueError, "'k'"),
        (lambda: comb.top_k(w, 4), ValueError, "'k'"),
        (lambda: comb.top_k(w, -1), ValueError, "'k'"),
        (lambda: comb.top_k(w, 1.0), TypeError, "'k'"),
        (lambda: comb.top_k(w, True), TypeError, "'k'"),
        (lambda: comb.argmin_onehot(np.array(1.0)), ValueError, "'w'"),
        (lambda: comb.ranking(np.zeros((2, 0))), ValueError, "'w'"),
        (lambda: comb.assignment(w), ValueError, "'W'"),
        (lambda: comb.shortest_path(w), ValueError, "'W'"),
        (lambda: comb.shortest_path(W, neighbourhood=6), ValueError, "'neighbourhood'"),
        (lambda: comb.shortest_path(W, negative="ignore"), ValueError, "'negative'"),
        (lambda: comb.argmin_onehot([0.3, 1.0]), TypeError, "'w'"),
        (lambda: comb.argmin_onehot(np.array([1, 2])), TypeError, "'w'"),
        (lambda: comb.identity_vjp(w, np.ones(4)), ValueError, "'y_bar'"),
        (lambda: comb.identity_vjp(w, np.ones(3), sense="minimise"), ValueError, "'sense'"),
        (lambda: comb.identity_vjp(w, np.ones(3), projection="l2"), ValueError, "'projection'"),
        (lambda: comb.project(np.zeros(3), projection="norm"), ValueError, "'w'"),
        (lambda: comb.project(np.ones(3), projection="std"), ValueError, "'w'"),
        (lambda: comb.project(w, projection="mean", core_ndim=0), ValueError, "'core_ndim'"),
        (lambda: comb.identity_vjp(w, np.ones(3), projection="std", core_ndim=0), ValueError,
         "'core_ndim'"),
        (lambda: comb.identity_vjp(w, np.ones(3, np.float32)), TypeError, "'y_bar'.*'w'"),
        (lambda: comb.identity_layer(top2, w, alpha=0.1), ValueError, "'rng'"),
        (lambda: comb.identity_layer(top2, w, alpha=-0.1, rng=0), ValueError, "'alpha'"),
        (lambda: comb.identity_layer(top2, w, alpha=0.1, rng=0, noise_order="during"),
         ValueError, "'noise_order'"),
        (lambda: comb.identity_layer(top2, w, alpha=0.1, rng="seed"), TypeError, "'rng'"),
        (lambda: comb.identity_layer(lambda v: v, w), TypeError, "'solver'"),
        (lambda: comb.blackbox_vjp(top2, w, np.ones(3), lam=0.0), ValueError, "'lam'"),
        (lambda: comb.blackbox_vjp(top2, w, np.ones(3), lam=1.0, y=np.ones(2)), ValueError, "'y'"),
        (lambda: comb.perturbed(top2, w, sigma=0.0, n_samples=3, rng=0), ValueError, "'sigma'"),
        (lambda: comb.perturbed(top2, w, sigma=1.0, n_samples=0, rng=0), ValueError, "'n_samples'"),
        (lambda: comb.perturbed(top2, w, sigma=1.0, n_samples=3, rng=0, noise="cauchy"),
         ValueError, "'noise'"),
        (lambda: comb.perturbed(top2, w, sigma=1.0, n_samples=3), ValueError, "'rng'"),
        (lambda: comb.perturbed(top2, w, sigma=1.0, n_samples=3, Z=np.ones((2, 3))), ValueError, "'Z'"),
        (lambda: comb.identity_layer(comb.shortest_path, W * 0.5, alpha=3.0, rng=0), ValueError,
         "'W' has negative"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_nearly_constant_costs_warn_for_std():
    w = 1e9 + np.array([0.0, 1e-3, -1e-3, 2e-3])
    with pytest.warns(ConditioningWarning, match="std projection"):
        comb.identity_vjp(w, np.ones(4), projection="std")



@pytest.mark.parametrize("w", [np.full(3, 0.1), np.full(7, 0.1, np.float32),
                               np.stack([np.arange(5.0), np.full(5, 1.0 / 3.0)])])
def test_constant_costs_whose_mean_rounds_are_refused_for_std(w):
    # mean(w) need not round to the constant (0.1: ||w - mean 1|| = 2.4e-17);
    # a constant core is still degenerate for the std projection.
    with pytest.raises(ValueError, match="'w'"):
        comb.project(w, projection="std")
    # A spread well above round-off is accepted, even where it is tiny.
    ok = np.array([1.0, 1.0 + 1e-12, 1.0], w.dtype) if w.dtype == np.float64 else \
        np.array([1.0, 1.0 + 1e-4, 1.0], w.dtype)
    with pytest.warns(ConditioningWarning):
        u = comb.project(ok, projection="std").u
    assert abs(float(np.linalg.norm(u)) - 1.0) < 1e-3

def test_shortest_path_clip_mode(rng):
    W = rng.standard_normal((4, 4))
    np.testing.assert_array_equal(comb.shortest_path(W, negative="clip"),
                                  comb.shortest_path(np.maximum(W, 0.0)))


def test_nothing_mutates_its_inputs(rng):
    w, g = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    w0, g0 = w.copy(), g.copy()
    res = comb.identity_layer(top2, w, projection="std", alpha=0.2, rng=1, noise_order="before")
    comb.identity_layer_vjp(res, g)
    comb.blackbox_vjp(top2, w, g, lam=1.0)
    comb.perturbed_vjp(comb.perturbed(top2, w, sigma=1.0, n_samples=4, rng=0), g)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(g, g0)


# --------------------------------------------------------------------------
# Foreign implementations through refimpl.validate (the candidate convention)
# --------------------------------------------------------------------------

def _np_top_k(w, *, k, projection=None, **_):
    """An independent NumPy top-k with identity-with-projection backward."""
    u = w - w.mean(-1, keepdims=True) if projection in ("mean", "std") else w
    u = u / np.linalg.norm(u, axis=-1, keepdims=True) if projection in ("norm", "std") else u
    return (np.argsort(np.argsort(u, -1, kind="stable"), -1) < k).astype(float)


def _np_top_k_vjp(w, y_bar, *, k, projection=None):
    if projection in (None, "none", "mean"):
        return (-(y_bar - y_bar.mean(-1, keepdims=True)) if projection == "mean" else -y_bar,)
    v = w - w.mean(-1, keepdims=True) if projection == "std" else w
    r = np.linalg.norm(v, axis=-1, keepdims=True)
    Mg = y_bar - y_bar.mean(-1, keepdims=True) if projection == "std" else y_bar
    return (-(Mg - v / r * np.sum(v / r * y_bar, -1, keepdims=True)) / r,)


def _np_blackbox_vjp(w, y_bar, *, k, lam):
    return ((_np_top_k(w + lam * y_bar, k=k) - _np_top_k(w, k=k)) / lam,)


def _np_perturbed(w, *, sigma, n_samples, noise, vjp_of=None):
    """Own noise stream (seed 123), so only the Monte-Carlo tolerances can make it pass."""
    gen = np.random.default_rng(123)
    Z = gen.gumbel(size=(n_samples,) + w.shape) if noise == "gumbel" else gen.standard_normal((n_samples,) + w.shape)
    y = (np.arange(w.shape[-1]) == np.argmin(w - sigma * Z, -1)[..., None]).astype(float)
    if vjp_of is None:
        return y.mean(0)
    grad_nu = Z if noise == "gaussian" else -np.expm1(-Z)
    return (-np.mean((y @ vjp_of)[:, None] * grad_nu, 0) / sigma,)


def test_independent_numpy_candidates_pass_validate():
    # Every case a candidate is offered must be reproducible from the keywords it
    # receives: k and lam for blackbox; the noise-margin cases (alpha, seed) are skipped.
    from refimpl.validate import validate

    rep = validate("identity_top_k", _np_top_k, framework="numpy", vjp=_np_top_k_vjp)
    assert rep.passed, rep.table()
    assert {c.case for c in rep.cases}.isdisjoint({"noise_after", "noise_before"})
    rep = validate("blackbox_top_k", lambda w, *, k, lam: _np_top_k(w, k=k), framework="numpy",
                   vjp=_np_blackbox_vjp)
    assert rep.passed, rep.table()
    rep = validate("perturbed_argmin_onehot", _np_perturbed, framework="numpy",
                   vjp=lambda w, g, **kw: _np_perturbed(w, vjp_of=g, **kw))
    assert rep.passed, rep.table()


def test_benchmark_quick_smoke(capsys, load_benchmark):
    module = load_benchmark("combinatorial")
    assert module.main(["--quick", "--repeats", "1", "--json", "-"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("assignment", "shortest path"))]
    assert len(rows) == 10                    # 6 assignment methods, 4 shortest-path methods
    blackbox = [line.split() for line in rows if "blackbox" in line]
    assert all(r[r.index("blackbox") + 2: r.index("blackbox") + 4] == ["1", "1"] for r in blackbox)
