"""Bad input across every public operator: one vocabulary, one kind of error.

The table below holds, for every public function of the operator modules, at
least one call with a bad argument, the exception type it must raise and the
argument its message must name.  The rules it checks (refimpl.backend):

* counts (``k``, ``max_iter``, ``cg_max_iter``, ``order``, ...): Python or
  NumPy integers; bool, float and str are a TypeError, out of range a
  ValueError (:func:`refimpl.backend.check_int`);
* modes: one of a listed set, else ValueError (``check_choice``); switches:
  bool only, else TypeError (``check_flag``); positive scalars: real numbers
  (a string is a TypeError) > 0 (``check_positive``);
* a result object of the wrong type: TypeError naming ``res``, never an
  AttributeError (``check_result``);
* an empty array, a batch of size 0 included: ValueError naming it;
* float32 beside float64: TypeError naming both arguments.

Then one regression test per finding that needs more than a table row.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest

from refimpl import backend as B
from refimpl import combinatorial as comb
from refimpl import deq, linsolve, matsqrt, sinkhorn, topk
from refimpl.backend import ConditioningWarning


class _NotAResult:
    """Stands for a result object of the wrong type (it has none of the fields)."""


@functools.lru_cache(maxsize=1)
def _ctx():
    """Small valid inputs and forward results, built once (float64)."""
    rng = np.random.default_rng(0)
    c = {}
    A = rng.standard_normal((3, 3)) + 3.0 * np.eye(3)
    c["A"], c["b"] = A, rng.standard_normal(3)
    c["solve"] = linsolve.solve(A, c["b"])
    C = rng.random((3, 4))
    c["C"], c["a"], c["bm"] = C, np.full(3, 1 / 3), np.full(4, 0.25)
    c["sk"] = sinkhorn.sinkhorn(C, c["a"], c["bm"], eps=0.5, tol=1e-12)
    c["sku"] = sinkhorn.sinkhorn_unrolled(C, c["a"], c["bm"], eps=0.5, n_iter=3)
    c["P_bar"] = rng.standard_normal((3, 4))
    c["x"] = rng.standard_normal(6)
    c["tk"] = topk.soft_topk(c["x"], 2, eps=0.5)
    c["tks"] = topk.soft_sorted_topk(c["x"], 2, eps=0.5)
    c["w"] = rng.standard_normal(5)
    c["W"] = rng.random((3, 4))
    c["ident"] = comb.identity_layer(comb.argmin_onehot, c["w"])
    c["pert"] = comb.perturbed(comb.argmin_onehot, c["w"], sigma=0.5, n_samples=3, rng=0)
    c["proj"] = comb.project(c["w"], projection="mean")
    c["st"] = comb.straight_through(c["w"])
    M = rng.standard_normal((3, 3))
    c["S"] = M @ M.T + np.eye(3)
    c["sq"] = matsqrt.sqrtm(c["S"])
    c["isq"] = matsqrt.inv_sqrtm(c["S"])
    d, p = 3, 2
    c["dx"], c["dW"] = rng.standard_normal(p), 0.3 * rng.standard_normal((d, d))
    c["dU"], c["db"] = rng.standard_normal((d, p)), rng.standard_normal(d)
    c["deq"] = deq.tanh_deq(c["dx"], c["dW"], c["dU"], c["db"])
    c["J"], c["F"] = deq.tanh_deq_jacobians(c["deq"])
    return c


NAN3 = np.array([1.0, np.nan, 2.0])
CPLX3 = np.array([1.0 + 1j, 2.0, 3.0])
NOT = _NotAResult()


def _vjp_ident(c):
    return comb.identity_layer_vjp(NOT, c["w"])


# (id, call(c), expected exception, argument named in the message)
CASES = [
    # ---- linsolve
    ("solve/b-list", lambda c: linsolve.solve(c["A"], [1.0, 2.0, 3.0]), TypeError, "b"),
    ("solve_jvp/res", lambda c: linsolve.solve_jvp(NOT, None, c["b"]), TypeError, "res"),
    ("solve_jvp/dA-nan", lambda c: linsolve.solve_jvp(c["solve"], c["A"] * np.nan, None), ValueError, "dA"),
    ("solve_jvp/db-complex", lambda c: linsolve.solve_jvp(c["solve"], None, CPLX3), TypeError, "db"),
    ("solve_jvp/db-shape", lambda c: linsolve.solve_jvp(c["solve"], None, np.ones(4)), ValueError, "db"),
    ("solve_jvp/dA-shape", lambda c: linsolve.solve_jvp(c["solve"], np.ones((2, 2)), None), ValueError, "dA"),
    ("solve_vjp/res", lambda c: linsolve.solve_vjp(NOT, c["b"]), TypeError, "res"),
    # ---- sinkhorn
    ("sinkhorn/eps-str", lambda c: sinkhorn.sinkhorn(c["C"], c["a"], c["bm"], eps="0.5"), TypeError, "eps"),
    ("sinkhorn/max_iter-float",
     lambda c: sinkhorn.sinkhorn(c["C"], c["a"], c["bm"], eps=0.5, max_iter=2.5), TypeError, "max_iter"),
    ("sinkhorn/check_every-0",
     lambda c: sinkhorn.sinkhorn(c["C"], c["a"], c["bm"], eps=0.5, check_every=0), ValueError, "check_every"),
    ("sinkhorn/warn-str",
     lambda c: sinkhorn.sinkhorn(c["C"], c["a"], c["bm"], eps=0.5, warn="no"), TypeError, "warn"),
    ("sinkhorn/overflow",
     lambda c: sinkhorn.sinkhorn(c["C"] * 1e300, c["a"], c["bm"], eps=1e-10), ValueError, "eps"),
    ("sinkhorn_vjp/cg_max_iter-neg",
     lambda c: sinkhorn.sinkhorn_vjp(c["sk"], c["P_bar"], method="cg", cg_max_iter=-1), ValueError, "cg_max_iter"),
    ("sinkhorn_vjp/cg_max_iter-float",
     lambda c: sinkhorn.sinkhorn_vjp(c["sk"], c["P_bar"], method="cg", cg_max_iter=2.5), TypeError, "cg_max_iter"),
    ("sinkhorn_vjp/cg_max_iter-str",
     lambda c: sinkhorn.sinkhorn_vjp(c["sk"], c["P_bar"], method="cg", cg_max_iter="3"), TypeError, "cg_max_iter"),
    ("sinkhorn_vjp/cg_max_iter-bool",
     lambda c: sinkhorn.sinkhorn_vjp(c["sk"], c["P_bar"], method="cg", cg_max_iter=True), TypeError, "cg_max_iter"),
    ("sinkhorn_vjp/method", lambda c: sinkhorn.sinkhorn_vjp(c["sk"], c["P_bar"], method="lu"), ValueError, "method"),
    ("sinkhorn_vjp/res", lambda c: sinkhorn.sinkhorn_vjp(NOT, c["P_bar"]), TypeError, "res"),
    ("sinkhorn_vjp_eps/res", lambda c: sinkhorn.sinkhorn_vjp_eps(NOT, c["P_bar"]), TypeError, "res"),
    ("sinkhorn_jvp/dC-shape", lambda c: sinkhorn.sinkhorn_jvp(c["sk"], dC=np.ones((4, 3))), ValueError, "dC"),
    ("sinkhorn_jvp/warn", lambda c: sinkhorn.sinkhorn_jvp(c["sk"], dC=c["P_bar"], warn=1), TypeError, "warn"),
    ("gauge_fix/nan", lambda c: sinkhorn.gauge_fix(NAN3, np.ones(4)), ValueError, "a_bar"),
    ("gauge_fix/list", lambda c: sinkhorn.gauge_fix(np.ones(3), [1.0, 2.0]), TypeError, "b_bar"),
    ("gauge_fix/batch",
     lambda c: sinkhorn.gauge_fix(np.ones((2, 3)), np.ones((3, 4))), ValueError, "b_bar"),
    ("entropic_value/res", lambda c: sinkhorn.entropic_value(NOT), TypeError, "res"),
    ("entropic_value_grad/res", lambda c: sinkhorn.entropic_value_grad(NOT), TypeError, "res"),
    ("kl_value/res", lambda c: sinkhorn.kl_value(NOT), TypeError, "res"),
    ("kl_value_grad/res", lambda c: sinkhorn.kl_value_grad(NOT), TypeError, "res"),
    ("linear_value/res", lambda c: sinkhorn.linear_value(NOT), TypeError, "res"),
    ("linear_value_grad/res", lambda c: sinkhorn.linear_value_grad(NOT), TypeError, "res"),
    ("sinkhorn_conditioning/res", lambda c: sinkhorn.sinkhorn_conditioning(NOT), TypeError, "res"),
    ("sinkhorn_error_bound/C1-str",
     lambda c: sinkhorn.sinkhorn_error_bound(c["sk"], C1="1", C2=0.0, P_err=0.1), TypeError, "C1"),
    ("sinkhorn_unrolled/n_iter-bool",
     lambda c: sinkhorn.sinkhorn_unrolled(c["C"], c["a"], c["bm"], eps=0.5, n_iter=True), TypeError, "n_iter"),
    ("sinkhorn_unrolled_vjp/res", lambda c: sinkhorn.sinkhorn_unrolled_vjp(NOT, c["P_bar"]), TypeError, "res"),
    # ---- topk
    ("soft_topk/k-float", lambda c: topk.soft_topk(c["x"], 2.5, eps=0.5), TypeError, "k"),
    ("soft_topk/k-range", lambda c: topk.soft_topk(c["x"], 7, eps=0.5), ValueError, "k"),
    ("soft_topk/method", lambda c: topk.soft_topk(c["x"], 2, eps=0.5, method="lp"), ValueError, "method"),
    ("soft_topk/largest", lambda c: topk.soft_topk(c["x"], 2, eps=0.5, largest="no"), TypeError, "largest"),
    ("soft_topk/max_iter", lambda c: topk.soft_topk(c["x"], 2, eps=0.5, max_iter=0), ValueError, "max_iter"),
    ("soft_topk/sinkhorn-huge-x",
     lambda c: topk.soft_topk(np.array([1e200, 0.0, 1.0]), 1, eps=0.1, method="sinkhorn"), ValueError, "x"),
    ("soft_topk_vjp/res", lambda c: topk.soft_topk_vjp(NOT, c["x"]), TypeError, "res"),
    ("soft_topk_vjp/method", lambda c: topk.soft_topk_vjp(c["tk"], c["x"], method="lu"), ValueError, "method"),
    ("soft_sorted_topk_vjp/method",
     lambda c: topk.soft_sorted_topk_vjp(c["tks"], np.ones((6, 2)), method="lu"), ValueError, "method"),
    ("soft_topk_jvp/res", lambda c: topk.soft_topk_jvp(NOT, c["x"]), TypeError, "res"),
    ("soft_sorted_topk/k", lambda c: topk.soft_sorted_topk(c["x"], -1, eps=0.5), ValueError, "k"),
    ("soft_sorted_topk_vjp/res", lambda c: topk.soft_sorted_topk_vjp(NOT, c["x"]), TypeError, "res"),
    ("soft_sorted_topk_jvp/res", lambda c: topk.soft_sorted_topk_jvp(NOT, c["x"]), TypeError, "res"),
    ("hard_topk/k-str", lambda c: topk.hard_topk(c["x"], "2"), TypeError, "k"),
    ("boundary_gap/largest", lambda c: topk.boundary_gap(c["x"], 2, largest=1), TypeError, "largest"),
    ("soft_topk_error_bound/delta-str", lambda c: topk.soft_topk_error_bound(0.1, "0.3", 2, 5), TypeError, "delta"),
    ("soft_topk_error_bound/eps-str", lambda c: topk.soft_topk_error_bound("0.3", 0.1, 2, 5), TypeError, "eps"),
    # ---- combinatorial
    ("argmin_onehot/list", lambda c: comb.argmin_onehot([1.0, 2.0]), TypeError, "w"),
    ("assignment/nan", lambda c: comb.assignment(c["W"] * np.nan), ValueError, "W"),
    ("ranking/int", lambda c: comb.ranking(np.arange(4)), TypeError, "w"),
    ("top_k/k-float", lambda c: comb.top_k(c["w"], 2.0), TypeError, "k"),
    ("hard_threshold/list", lambda c: comb.hard_threshold([1.0]), TypeError, "x"),
    ("shortest_path/negative", lambda c: comb.shortest_path(c["W"], negative="zero"), ValueError, "negative"),
    ("blackbox_vjp/lam", lambda c: comb.blackbox_vjp(comb.argmin_onehot, c["w"], c["w"], lam=0.0), ValueError, "lam"),
    ("check_projection/name", lambda c: comb.check_projection(comb.argmin_onehot, "l2"), ValueError, "projection"),
    ("declare/core_ndim", lambda c: comb.declare(core_ndim=1.5, sense="min", projections=()), TypeError, "core_ndim"),
    ("declare/sense", lambda c: comb.declare(core_ndim=1, sense="up", projections=()), ValueError, "sense"),
    ("identity_layer/noise_order",
     lambda c: comb.identity_layer(comb.argmin_onehot, c["w"], noise_order="mid"), ValueError, "noise_order"),
    ("identity_layer_vjp/res", _vjp_ident, TypeError, "res"),
    ("identity_vjp/y_bar", lambda c: comb.identity_vjp(c["w"], np.ones(4)), ValueError, "y_bar"),
    ("identity_vjp/core_ndim", lambda c: comb.identity_vjp(c["w"], c["w"], core_ndim="1"), TypeError, "core_ndim"),
    ("noise_margin/int-w", lambda c: comb.noise_margin(np.arange(5), alpha=1.0, rng=0), TypeError, "w"),
    ("perturbed/n_samples",
     lambda c: comb.perturbed(comb.argmin_onehot, c["w"], sigma=0.5, n_samples=2.0, rng=0), TypeError, "n_samples"),
    ("perturbed_vjp/res", lambda c: comb.perturbed_vjp(NOT, c["w"]), TypeError, "res"),
    ("project/projection", lambda c: comb.project(c["w"], projection="l2"), ValueError, "projection"),
    ("project_jvp/res", lambda c: comb.project_jvp(NOT, c["w"]), TypeError, "res"),
    ("project_vjp/res", lambda c: comb.project_vjp(NOT, c["w"]), TypeError, "res"),
    ("solver_spec/undeclared", lambda c: comb.solver_spec(np.sum), TypeError, "solver"),
    ("straight_through/list", lambda c: comb.straight_through([1.0, -1.0]), TypeError, "x"),
    ("straight_through_vjp/res", lambda c: comb.straight_through_vjp(NOT, c["w"]), TypeError, "res"),
    # ---- matsqrt
    ("sqrtm/method", lambda c: matsqrt.sqrtm(c["S"], method="svd"), ValueError, "method"),
    ("sqrtm/order-float", lambda c: matsqrt.sqrtm(c["S"], order=2.0), TypeError, "order"),
    ("inv_sqrtm/basis", lambda c: matsqrt.inv_sqrtm(c["S"], basis="y"), ValueError, "basis"),
    ("sqrtm_vjp/res", lambda c: matsqrt.sqrtm_vjp(NOT, c["S"]), TypeError, "res"),
    ("sqrtm_vjp/full_output", lambda c: matsqrt.sqrtm_vjp(c["sq"], c["S"], full_output=1), TypeError, "full_output"),
    ("inv_sqrtm_vjp/res", lambda c: matsqrt.inv_sqrtm_vjp(c["sq"], c["S"]), TypeError, "res"),
    ("sqrtm_jvp/dA-nan", lambda c: matsqrt.sqrtm_jvp(c["sq"], c["S"] * np.nan), ValueError, "dA"),
    ("inv_sqrtm_jvp/method", lambda c: matsqrt.inv_sqrtm_jvp(c["isq"], c["S"], method="x"), ValueError, "method"),
    ("lyapunov/iters", lambda c: matsqrt.lyapunov(c["S"], c["S"], iters=1.5), TypeError, "iters"),
    ("matrix_sign/iters", lambda c: matsqrt.matrix_sign(c["S"], iters="3"), TypeError, "iters"),
    ("pade_coefficients/order", lambda c: matsqrt.pade_coefficients(2.0), TypeError, "order"),
    ("pade_coefficients/basis", lambda c: matsqrt.pade_coefficients(2, basis="y"), ValueError, "basis"),
    ("taylor_coefficients/degree", lambda c: matsqrt.taylor_coefficients(-1), ValueError, "degree"),
    ("scalar_map/nan", lambda c: matsqrt.scalar_map(NAN3, method="mpa"), ValueError, "x"),
    ("scalar_map/iters", lambda c: matsqrt.scalar_map(np.ones(2), method="ns", iters=2.5), TypeError, "iters"),
    ("relative_error/complex", lambda c: matsqrt.relative_error(CPLX3, method="mpa"), TypeError, "x"),
    ("error_bound/nan-eig", lambda c: matsqrt.error_bound(NAN3, method="eig"), ValueError, "l"),
    ("error_bound/complex", lambda c: matsqrt.error_bound(CPLX3, method="mpa"), TypeError, "l"),
    # ---- deq
    ("fixed_point/reg-0", lambda c: deq.fixed_point(np.cos, np.zeros(2), reg=0.0), ValueError, "reg"),
    ("fixed_point/method", lambda c: deq.fixed_point(np.cos, np.zeros(2), method="newton"), ValueError, "method"),
    ("fixed_point/max_iter", lambda c: deq.fixed_point(np.cos, np.zeros(2), max_iter=1.5), TypeError, "max_iter"),
    ("fixed_point/record_history",
     lambda c: deq.fixed_point(np.cos, np.zeros(2), record_history="yes"), TypeError, "record_history"),
    ("tanh_deq/lam-str", lambda c: deq.tanh_deq(c["dx"], c["dW"], c["dU"], c["db"], lam="0.5"), TypeError, "lam"),
    ("deq_vjp/k-float", lambda c: deq.deq_vjp(c["deq"], c["db"], method="unroll", k=2.5), TypeError, "k"),
    ("deq_backward/res", lambda c: deq.deq_backward(NOT, c["db"]), TypeError, "res"),
    ("deq_backward/warn", lambda c: deq.deq_backward(c["deq"], c["db"], warn="no"), TypeError, "warn"),
    ("deq_jvp/solver", lambda c: deq.deq_jvp(c["deq"], db=c["db"], solver="lu"), ValueError, "solver"),
    ("implicit_vjp/f_vjp", lambda c: deq.implicit_vjp(None, c["db"], c["db"]), TypeError, "f_vjp"),
    ("phantom_matrix/J-nan", lambda c: deq.phantom_matrix(c["J"] * np.nan, c["F"], method="exact"), ValueError, "J"),
    ("phantom_matrix/J-complex",
     lambda c: deq.phantom_matrix(c["J"] + 0j, c["F"], method="exact"), TypeError, "J"),
    ("phantom_matrix/F-rows", lambda c: deq.phantom_matrix(c["J"], c["F"][:2], method="jfb"), ValueError, "F"),
    ("phantom_matrix/singular",
     lambda c: deq.phantom_matrix(np.eye(3), c["F"], method="exact"), ValueError, "J"),
    ("gradient_agreement/zero-exact",
     lambda c: deq.gradient_agreement(np.ones(3), np.zeros(3)), ValueError, "exact"),
    ("gradient_agreement/nan", lambda c: deq.gradient_agreement(NAN3, np.ones(3)), ValueError, "phantom[0]"),
    ("neumann_rate/lam", lambda c: deq.neumann_rate(c["J"], lam=2.0), ValueError, "lam"),
    ("damping_threshold/list", lambda c: deq.damping_threshold([[0.5]]), TypeError, "J"),
    ("cosine_lower_bound/str", lambda c: deq.cosine_lower_bound("1", 1.0), TypeError, "E_norm"),
    ("theorem1_check/ndim", lambda c: deq.theorem1_check(c["J"], c["J"], c["F"][None]), ValueError, "F"),
    ("tanh_deq_jacobians/res", lambda c: deq.tanh_deq_jacobians(NOT), TypeError, "res"),
]


@pytest.mark.parametrize("call, exc, name", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_argument_table(call, exc, name):
    c = _ctx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # a rejected call must raise, warnings aside
        with pytest.raises(exc) as info:
            call(c)
    assert f"'{name}'" in str(info.value), str(info.value)


def test_table_covers_every_public_function():
    modules = (linsolve, sinkhorn, topk, comb, matsqrt, deq)
    covered = {case[0].split("/")[0] for case in CASES}
    public = {n for m in modules for n in m.__all__
              if callable(getattr(m, n)) and not isinstance(getattr(m, n), type)}
    assert public - covered == set()


# --------------------------------------------------------------------------
# Empty arrays (a batch of size 0 included): one rule, ValueError naming it
# --------------------------------------------------------------------------

EMPTY = [
    ("solve", lambda: linsolve.solve(np.zeros((0, 2, 2)), np.zeros((0, 2))), "A"),
    ("sinkhorn", lambda: sinkhorn.sinkhorn(np.zeros((0, 2, 3)), np.full(2, 0.5), np.full(3, 1 / 3), eps=0.1), "C"),
    ("sinkhorn_unrolled",
     lambda: sinkhorn.sinkhorn_unrolled(np.zeros((0, 2, 3)), np.full(2, 0.5), np.full(3, 1 / 3), eps=0.1,
                                        n_iter=2), "C"),
    ("soft_topk", lambda: topk.soft_topk(np.zeros((0, 5)), 2, eps=0.1), "x"),
    ("soft_topk-sinkhorn", lambda: topk.soft_topk(np.zeros((0, 5)), 2, eps=0.1, method="sinkhorn"), "x"),
    ("soft_sorted_topk", lambda: topk.soft_sorted_topk(np.zeros((0, 5)), 2, eps=0.1), "x"),
    ("hard_topk", lambda: topk.hard_topk(np.zeros((0, 5)), 2), "x"),
    ("tanh_deq", lambda: deq.tanh_deq(np.zeros((0, 2)), 0.1 * np.eye(3), np.ones((3, 2)), np.ones(3)), "x"),
    ("fixed_point", lambda: deq.fixed_point(np.cos, np.zeros((0, 3))), "z0"),
    ("sqrtm", lambda: matsqrt.sqrtm(np.zeros((0, 3, 3))), "A"),
    ("inv_sqrtm", lambda: matsqrt.inv_sqrtm(np.zeros((0, 3, 3)), method="eig"), "A"),
    ("lyapunov", lambda: matsqrt.lyapunov(np.zeros((0, 2, 2)), np.zeros((0, 2, 2))), "B"),
    ("matrix_sign", lambda: matsqrt.matrix_sign(np.zeros((0, 2, 2))), "M"),
    ("argmin_onehot", lambda: comb.argmin_onehot(np.zeros((0, 3))), "w"),
    ("perturbed", lambda: comb.perturbed(comb.argmin_onehot, np.zeros((0, 3)), sigma=1.0, n_samples=2, rng=0),
     "w"),
    ("project", lambda: comb.project(np.zeros((0, 3)), projection="mean"), "w"),
]


@pytest.mark.parametrize("call, name", [e[1:] for e in EMPTY], ids=[e[0] for e in EMPTY])
def test_empty_batch_is_refused(call, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=f"'{name}' is empty"):
            call()


# --------------------------------------------------------------------------
# Mixed float32 / float64: TypeError naming both arguments
# --------------------------------------------------------------------------

def _f32(a):
    return np.asarray(a, dtype=np.float32)


MIXED = [
    ("solve", lambda c: linsolve.solve(c["A"], _f32(c["b"])), ("b", "A")),
    ("solve_vjp", lambda c: linsolve.solve_vjp(c["solve"], _f32(c["b"])), ("x_bar", "x")),
    ("solve_jvp", lambda c: linsolve.solve_jvp(c["solve"], None, _f32(c["b"])), ("db", "x")),
    ("sinkhorn", lambda c: sinkhorn.sinkhorn(c["C"], _f32(c["a"]), c["bm"], eps=0.5), ("a", "C")),
    ("sinkhorn_vjp", lambda c: sinkhorn.sinkhorn_vjp(c["sk"], _f32(c["P_bar"])), ("P_bar", "P")),
    ("gauge_fix", lambda c: sinkhorn.gauge_fix(c["a"], _f32(c["bm"])), ("b_bar", "a_bar")),
    ("soft_topk_vjp", lambda c: topk.soft_topk_vjp(c["tk"], _f32(c["x"])), ("A_bar", "A")),
    ("soft_topk_jvp", lambda c: topk.soft_topk_jvp(c["tk"], _f32(c["x"])), ("dx", "x")),
    ("sqrtm_vjp", lambda c: matsqrt.sqrtm_vjp(c["sq"], _f32(c["S"])), ("S_bar", "res.S")),
    ("lyapunov", lambda c: matsqrt.lyapunov(c["S"], _f32(c["S"])), ("C", "B")),
    ("tanh_deq", lambda c: deq.tanh_deq(_f32(c["dx"]), c["dW"], c["dU"], c["db"]), ("W", "x")),
    ("deq_vjp", lambda c: deq.deq_vjp(c["deq"], _f32(c["db"])), ("z_bar", "z")),
    ("phantom_matrix", lambda c: deq.phantom_matrix(c["J"], _f32(c["F"]), method="jfb"), ("F", "J")),
    ("blackbox_vjp",
     lambda c: comb.blackbox_vjp(comb.argmin_onehot, c["w"], _f32(c["w"]), lam=1.0), ("y_bar", "w")),
    ("identity_layer_vjp", lambda c: comb.identity_layer_vjp(c["ident"], _f32(c["w"])), ("y_bar", "w")),
    ("perturbed-Z",
     lambda c: comb.perturbed(comb.argmin_onehot, c["w"], sigma=0.5, n_samples=2, Z=_f32(np.ones((2, 5)))),
     ("Z", "w")),
]


@pytest.mark.parametrize("call, names", [m[1:] for m in MIXED], ids=[m[0] for m in MIXED])
def test_mixed_precision_is_refused(call, names):
    with pytest.raises(TypeError) as info:
        call(_ctx())
    msg = str(info.value)
    assert all(f"'{n}'" in msg for n in names) and "float32" in msg and "float64" in msg, msg


# --------------------------------------------------------------------------
# The vocabulary itself
# --------------------------------------------------------------------------

@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3)])
def test_check_int_accepts_python_and_numpy_integers(value):
    out = B.check_int(value, "n", min=0, max=5)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 3.0, np.float64(3.0), "3", None, [3]])
def test_check_int_refuses_non_integers(value):
    with pytest.raises(TypeError, match="'n'"):
        B.check_int(value, "n")


@pytest.mark.parametrize("value, lo, hi", [(-1, 0, None), (6, None, 5), (0, 1, 5)])
def test_check_int_range(value, lo, hi):
    with pytest.raises(ValueError, match="'n'"):
        B.check_int(value, "n", min=lo, max=hi)


def test_check_choice_flag_result():
    assert B.check_choice("a", "mode", ("a", "b")) == "a"
    for bad in ("c", None, 1, ("a",)):
        with pytest.raises(ValueError, match="'mode'.*'a', 'b'"):
            B.check_choice(bad, "mode", ("a", "b"))
    assert B.check_flag(np.bool_(False), "on") is False
    for bad in (0, 1, "False", None, np.array([True])):
        with pytest.raises(TypeError, match="'on'"):
            B.check_flag(bad, "on")
    res = linsolve.solve(np.eye(2), np.ones(2))
    assert B.check_result(res, "res", linsolve.SolveResult) is res
    with pytest.raises(TypeError, match="'res' must be a SolveResult.*got dict"):
        B.check_result({}, "res", linsolve.SolveResult)


def test_check_same_dtype_skips_none_and_non_float():
    B.check_same_dtype(a=np.ones(2), b=None, i=np.arange(2), c=np.ones(2))
    with pytest.raises(TypeError, match="'c' has dtype float32 but 'a' has float64"):
        B.check_same_dtype(a=np.ones(2), c=np.ones(2, np.float32))


# --------------------------------------------------------------------------
# Regressions, one per finding
# --------------------------------------------------------------------------

def _rel(a, b):
    return float(np.linalg.norm(np.ravel(a - b)) / np.linalg.norm(np.ravel(b)))


@pytest.mark.parametrize("n, k, eps", [(50, 5, 0.05), (200, 20, 0.01)])
def test_float32_sinkhorn_topk_matches_float64(n, k, eps):
    # Before: float32 reported converged=True with x_bar off by O(1) relative.
    # Now the plan and its backward are solved in float64 and rounded, so the
    # float32 answer is the float64 one to float32 accuracy.
    rng = np.random.default_rng(n)
    x, A_bar = rng.standard_normal(n), rng.standard_normal(n)
    r64 = topk.soft_topk(x, k, eps=eps, method="sinkhorn")
    r32 = topk.soft_topk(x.astype(np.float32), k, eps=eps, method="sinkhorn")
    assert r32.converged and r32.A.dtype == np.float32
    g64 = topk.soft_topk_vjp(r64, A_bar)
    g32 = topk.soft_topk_vjp(r32, A_bar.astype(np.float32))
    assert g32.dtype == np.float32
    assert np.max(np.abs(r32.A - r64.A)) < 1e-5
    assert _rel(g32, g64) < 1e-4
    dA32 = topk.soft_topk_jvp(r32, A_bar.astype(np.float32))
    assert _rel(dA32, topk.soft_topk_jvp(r64, A_bar)) < 1e-4


def test_float32_sinkhorn_backward_warns_when_the_plan_is_too_coarse():
    # Before: no warning while the float32 gradient was off by ~1e-2.
    rng = np.random.default_rng(0)
    C, a, b = rng.random((20, 30)), np.full(20, 1 / 20), np.full(30, 1 / 30)
    G = rng.standard_normal((20, 30))
    r32 = sinkhorn.sinkhorn(C.astype(np.float32), a.astype(np.float32), b.astype(np.float32), eps=0.005)
    assert r32.all_converged
    with pytest.warns(ConditioningWarning, match=r"eps=0\.005 in float32"):
        _, _, b32 = sinkhorn.sinkhorn_vjp(r32, G.astype(np.float32))
    r64 = sinkhorn.sinkhorn(C, a, b, eps=0.005, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # float64: resolved, silent
        _, _, b64 = sinkhorn.sinkhorn_vjp(r64, G)
    assert _rel(b32, b64) > 1e-3                         # the warning is not a false alarm


def test_sinkhorn_kernel_overflow_is_refused():
    rng = np.random.default_rng(1)
    C = rng.random((3, 4)) * 1e300
    with pytest.raises(ValueError, match="'C' and 'eps'.*overflows float64"):
        sinkhorn.sinkhorn(C, np.full(3, 1 / 3), np.full(4, 0.25), eps=1e-10)
    C32 = (rng.random((3, 4)) * 1e30).astype(np.float32)
    with pytest.raises(ValueError, match="overflows float32"):
        sinkhorn.sinkhorn(C32, np.full(3, 1 / 3, np.float32), np.full(4, 0.25, np.float32), eps=1e-10)


@pytest.mark.parametrize("method", ["cg", "schur"])
def test_huge_cotangent_is_scaled_not_overflowed(method):
    # Before: cg returned NaN with a "cond = inf" warning for a 1e300 cotangent.
    # The VJP is linear in P_bar: VJP(s G) = s VJP(G), s a power of two.
    c = _ctx()
    s = 2.0 ** 996                                       # ~6.7e299
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = sinkhorn.sinkhorn_vjp(c["sk"], s * c["P_bar"], method=method)
    unit = sinkhorn.sinkhorn_vjp(c["sk"], c["P_bar"], method="schur")
    for got, ref in zip(big, unit):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got / s, ref, rtol=1e-8, atol=1e-12)


def test_messages_name_the_callers_arguments():
    with pytest.raises(TypeError) as info:
        comb.straight_through([1.0, -1.0])
    assert "'x'" in str(info.value) and "'w'" not in str(info.value)
    with pytest.raises(ValueError) as info:
        topk.soft_topk(np.array([1e200, 0.0, 1.0]), 1, eps=0.1, method="sinkhorn")
    assert "'x'" in str(info.value) and "'C'" not in str(info.value)
    # shortest_path refuses the shifted (negative) costs; blackbox_vjp has no 'negative='.
    W = np.ones((3, 3))
    with pytest.raises(ValueError) as info:
        comb.blackbox_vjp(comb.shortest_path, W, np.full((3, 3), -5.0), lam=1.0)
    msg = str(info.value)
    assert "'lam'" in msg and "'y_bar'" in msg
    assert "pass negative=" not in msg.split("(the solver said")[0]
    # The eig forward at a singular A: 'approximant' is what was asked for.
    res = matsqrt.sqrtm(np.diag([1.0, 0.0]), method="eig")
    with pytest.raises(ValueError) as info:
        matsqrt.sqrtm_vjp(res, np.eye(2), method="approximant")
    assert "use method='approximant'" not in str(info.value)
    res_mpa = matsqrt.sqrtm(np.diag([1.0, 0.0]), method="mpa")
    with pytest.raises(ValueError, match="use method='approximant'"):
        matsqrt.sqrtm_vjp(res_mpa, np.eye(2), method="exact")


def test_error_bound_refuses_nan_instead_of_returning_zero():
    # Before: max(|NaN|, ...) gave 0.0 for method "eig", a false guarantee.
    with pytest.raises(ValueError, match="'l'"):
        matsqrt.error_bound(np.array([[1.0, np.nan]]), method="eig")
    np.testing.assert_array_equal(matsqrt.error_bound(np.array([[1.0, 4.0]]), method="eig"), [0.0])


def test_noise_margin_refuses_integer_costs():
    # Before: the +-alpha/2 draws were cast to w's integer dtype: all zeros.
    with pytest.raises(TypeError, match="'w' has dtype int"):
        comb.noise_margin(np.arange(4), alpha=1.0, rng=0)
    xi = comb.noise_margin(np.zeros(4), alpha=1.0, rng=0)
    assert np.all(np.abs(xi) == 0.5)


def test_fixed_point_reg_zero_is_a_value_error():
    # Before: reg=0.0 reached the least-squares solve and raised LinAlgError.
    with pytest.raises(ValueError, match="'reg'"):
        deq.fixed_point(lambda z: 0.5 * z + 1.0, np.zeros(3), reg=0.0)
    res = deq.fixed_point(lambda z: 0.5 * z + 1.0, np.zeros(3), reg=1e-12)
    np.testing.assert_allclose(res.z, 2.0, rtol=1e-10)


def test_solve_vjp_extreme_matrix_is_a_value_error():
    # The forward's LU of A succeeds, LAPACK's LU of A^T meets an exact zero
    # pivot (1e-300 * 1e-300 underflows): before, a raw LinAlgError.
    A = np.array([[1e-300, 1e300], [0.0, 1e300]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = linsolve.solve(A, np.ones(2))
        with pytest.raises(ValueError, match="'res.A'"):
            linsolve.solve_vjp(res, np.ones(2))


def test_solve_vjp_singular_adjoint_is_a_value_error(monkeypatch):
    # A library that raises LinAlgError on the adjoint solve (as NumPy does for
    # an exactly singular A^T) surfaces as a ValueError naming 'res.A'.
    res = linsolve.solve(np.array([[2.0, 1.0], [1.0, 3.0]]), np.ones(2))

    def failing(A, b):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(linsolve, "solve_vec", failing)
    with pytest.raises(ValueError, match="'res.A'"):
        linsolve.solve_vjp(res, np.ones(2))


def test_gradient_agreement_zero_exact_is_refused():
    with pytest.raises(ValueError, match="'exact' is zero"):
        deq.gradient_agreement((np.ones(2), None), (np.zeros(2), None))
    ag = deq.gradient_agreement(np.array([1.0, 0.0]), np.array([1.0, 1.0]))
    assert math.isclose(ag.cosine, 1 / math.sqrt(2)) and math.isclose(ag.rel_error, 1 / math.sqrt(2))
