"""Behaviour that depends on the NumPy / SciPy release: run at the declared
dependency floors as well as at the newest releases (``.ci/run``).

* Every operator keeps the working dtype: a float32 call gives float32
  outputs, result fields and derivatives, never a silent float64.  Type
  promotion is where NumPy releases differ (NumPy 1.x value-based casting
  against NEP 50), and a float64 constant written into an operator breaks it
  on any release.
* ``scipy.sparse.csgraph`` is given int32 index arrays: releases before 1.15
  reject int64 indices.

This module needs only NumPy, SciPy, array-api-compat and pytest, so it runs
in the minimum-dependency environment too.
"""

import dataclasses
import warnings

import numpy as np
import pytest

from refimpl import combinatorial as comb
from refimpl import deq, matsqrt, registry, topk
from refimpl.backend import get_backend

SPECS = registry.all_specs()


def _float_arrays(obj, path: str, depth: int = 0):
    """``(path, dtype)`` of every floating NumPy array or scalar reachable from
    ``obj`` through dataclass fields, tuples and lists."""
    if depth > 6:
        return
    if isinstance(obj, (np.ndarray, np.generic)):
        if np.issubdtype(obj.dtype, np.floating):
            yield path, obj.dtype
        return
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _float_arrays(getattr(obj, f.name), f"{path}.{f.name}", depth + 1)
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            yield from _float_arrays(item, f"{path}[{i}]", depth + 1)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_float32_in_float32_out_for_every_case(spec):
    """Forward result (every field, nested), VJP and JVP of each float32 case
    of the registry, unbatched members included, are float32 throughout."""
    be = get_backend("numpy")
    cases = [c for c in spec.cases if "float32" in c.dtypes]
    assert cases, f"{spec.name} has no float32 case"
    leaks = []
    for case in cases:
        rng = np.random.default_rng(case.seed)
        host = registry._make_host(spec, case, "float32", rng)
        arrays = tuple(be.asarray(host[k], "float32") for k in spec.inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # convergence is verify's business, not this test's
            res = spec.forward(*arrays, **case.params)
            out = np.asarray(getattr(res, spec.output), dtype=np.float64)
            u, v = registry.draw_directions(spec, rng, host, out)
            found = list(_float_arrays(res, "result"))
            bars = spec.vjp(res, be.asarray(v, "float32"), **case.vjp_params)
            found += list(_float_arrays(tuple(bars), "vjp"))
            if spec.jvp is not None and not spec.surrogate:
                tangents = tuple(None if t is None else be.asarray(t, "float32") for t in u)
                found += list(_float_arrays((spec.jvp(res, *tangents, **case.jvp_params),), "jvp"))
        assert any(p == f"result.{spec.output}" for p, _ in found), "primary output not seen"
        leaks += [f"{case.id}: {p} is {dt}" for p, dt in found if dt != np.float32]
    assert not leaks, "\n".join(leaks)


# One unbatched float32 call per operator family whose per-row scalars
# (thresholds, norms, step sizes) are 0-d: the case NumPy 1.x promoted.

def test_soft_topk_single_row_float32():
    x = np.array([0.1, 2.0, -1.0, 0.7, 1.5], dtype=np.float32)
    for method in ("closed_form", "sinkhorn"):
        for largest in (True, False):
            res = topk.soft_topk(x, 2, eps=0.1, method=method, largest=largest)
            x_bar = topk.soft_topk_vjp(res, np.ones_like(x))
            assert res.A.dtype == res.theta.dtype == x_bar.dtype == np.float32, (method, largest)
            # A = sigmoid(+-(x - theta)/t), recomputed in float64 from the returned theta
            z = (x.astype(np.float64) - float(res.theta)) / 0.05
            ref = 1.0 / (1.0 + np.exp(-z if largest else z))
            np.testing.assert_allclose(res.A, ref, atol=1e-4 if method == "sinkhorn" else 1e-5)


def test_tanh_deq_single_member_float32():
    rng = np.random.default_rng(7)
    W = (0.3 * rng.standard_normal((3, 3))).astype(np.float32)
    U = rng.standard_normal((3, 2)).astype(np.float32)
    x, b = rng.standard_normal(2).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    res = deq.tanh_deq(x, W, U, b, method="anderson")
    assert res.z.dtype == np.float32
    for solver in ("dense", "anderson"):
        bars = deq.deq_vjp(res, np.ones(3, np.float32), method="exact", solver=solver)
        assert [b_.dtype for b_ in bars] == [np.float32] * 4, solver


@pytest.mark.parametrize("method", ["mpa", "mtp", "ns"])
def test_sqrtm_single_matrix_float32(method):
    """float32 results, equal to the float64 reference to float32 accuracy."""
    A = np.array([[2.0, 0.5, 0.0], [0.5, 1.5, 0.2], [0.0, 0.2, 1.0]])
    G = np.array([[1.0, 0.3, 0.0], [0.3, -0.5, 0.1], [0.0, 0.1, 2.0]])
    for fn, vjp, out in ((matsqrt.sqrtm, matsqrt.sqrtm_vjp, "S"),
                         (matsqrt.inv_sqrtm, matsqrt.inv_sqrtm_vjp, "S_inv")):
        got, ref = (fn(A.astype(dt), method=method) for dt in (np.float32, np.float64))
        got_bar = vjp(got, G.astype(np.float32), method="approximant")
        ref_bar = vjp(ref, G, method="approximant")
        assert getattr(got, out).dtype == got_bar.dtype == np.float32, fn.__name__
        np.testing.assert_allclose(getattr(got, out), getattr(ref, out), rtol=0, atol=2e-5)
        np.testing.assert_allclose(got_bar, ref_bar, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------
# scipy.sparse.csgraph index dtype
# --------------------------------------------------------------------------

def test_shortest_path_hands_csgraph_int32_indices(monkeypatch):
    import scipy.sparse.csgraph as csgraph

    real, seen = csgraph.dijkstra, []

    def spy(graph, *args, **kwargs):
        seen.append((graph.indices.dtype, graph.indptr.dtype))
        return real(graph, *args, **kwargs)

    monkeypatch.setattr(csgraph, "dijkstra", spy)
    W = np.array([[1.0, 9.0, 9.0], [9.0, 1.0, 9.0], [9.0, 9.0, 1.0]])
    # 8 neighbours: the diagonal (cost 3; any other path costs >= 11).
    y8 = comb.shortest_path(np.stack([W, W]), neighbourhood=8)
    np.testing.assert_array_equal(y8, np.stack([np.eye(3), np.eye(3)]))
    # 4 neighbours: 5 vertices through the three cheap ones (cost 21; else >= 29).
    y4 = comb.shortest_path(W, neighbourhood=4)
    assert y4.sum() == 5.0 and y4[0, 0] == y4[1, 1] == y4[2, 2] == 1.0
    assert seen and all(d == (np.int32, np.int32) for d in seen), seen


def test_csgraph_index_is_int32_and_refuses_to_wrap():
    got = comb._csgraph_index(np.array([0, 5, 2**31 - 1], dtype=np.int64))
    assert got.dtype == np.int32 and got.tolist() == [0, 5, 2**31 - 1]
    with pytest.raises(ValueError, match="'W'.*32-bit"):
        comb._csgraph_index(np.array([0, 2**31], dtype=np.int64))
