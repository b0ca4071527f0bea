"""Registry entries for the implicit tanh layer and phantom gradients (refimpl.deq): cases, oracle, tolerances and
operator-specific checks.  Listed in ``refimpl.registry``."""

from __future__ import annotations

import numpy as np

from .. import deq
from ..backend import to_host
from ..check import CheckResult, compare
from . import Case, CaseRun, NamedGradient, OpSpec, Tolerance, sum_to_shape_host


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
    return tuple(sum_to_shape_host(out[k], h[k].shape) for k in ("x", "W", "U", "b"))


def _deq_closed_form_tol(dtype: str, cond: float = 1.0) -> float:
    return {"float64": 1e-9, "float32": 2e-4}[dtype] * max(1.0, cond)


def _deq_exact_closed_form(run: "CaseRun") -> list[CheckResult]:
    """Exact VJP (dense and iterative backward) against the host closed form
    ``(I - J^T) u = g`` solved by numpy.linalg.solve, ``J = D W``."""

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

    bshape, members = _deq_host_members(run)
    g = run.rng.standard_normal(to_host(run.result.z).shape)
    gb = run.asarray(g)
    conds = [np.linalg.cond(np.eye(len(z)) - D[:, None] * W) for (_, _, W, _, D, z) in members]
    tol = _deq_closed_form_tol(run.dtype, max(conds) / 10.0)
    # UPG differs from NPG by O(residual of the forward); k steps accumulate it (largest
    # seen over the cases: 1e-12 in float64, 3e-5 in float32).
    upg_tol = {"float64": 1e-10, "float32": 5e-4}[run.dtype]
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


def _check_phantom(k=None, lam=None) -> None:
    """The phantom gradients' options as :func:`refimpl.deq.deq_vjp` checks
    them: ``k >= 1`` steps, damping ``lam`` in ``(0, 1]``."""
    deq._resolve_method_args("neumann", k, lam, None, {})


def _make_contractive(rng):
    d, p = 5, 3
    return {"W": _scaled_to_norm(rng.standard_normal((d, d)), 0.7),
            "U": rng.standard_normal((d, p)), "b": 0.5 * rng.standard_normal(d),
            "x": rng.standard_normal(p)}


def _make_batched_scales(rng):
    d, p = 4, 3
    scales = np.array([1e-6, 1e-3, 1.0, 30.0])[:, None]
    return {"W": _scaled_to_norm(rng.standard_normal((d, d)), 0.8),
            "U": rng.standard_normal((d, p)), "b": np.zeros(d),
            "x": rng.standard_normal((4, p)) * scales}


def _make_scalar(rng):
    return {"W": np.array([[0.6]]), "U": np.array([[1.3]]), "b": np.array([-0.2]),
            "x": np.array([0.8])}


def _make_near_non_contractive(rng):
    d, p = 5, 2
    return {"W": _symmetric_with_spectrum(rng, [0.985, 0.6, 0.1, -0.2, -0.5]),
            "U": 0.05 * rng.standard_normal((d, p)), "b": 0.02 * rng.standard_normal(d),
            "x": rng.standard_normal(p)}


def _make_negative_eigenvalues(rng):
    d, p = 5, 3
    return {"W": _symmetric_with_spectrum(rng, [-1.8, -1.2, -0.4, 0.2, 0.5]),
            "U": 0.3 * rng.standard_normal((d, p)), "b": 0.1 * rng.standard_normal(d),
            "x": rng.standard_normal((2, p))}


def _make_per_member_weights(rng):
    d, p = 4, 3
    W = np.stack([_scaled_to_norm(rng.standard_normal((d, d)), s) for s in (0.3, 0.6, 0.9)])
    return {"W": W, "U": rng.standard_normal((d, p)), "b": 0.3 * rng.standard_normal(d),
            "x": rng.standard_normal(p)}


def _tanh_deq_cases() -> tuple[Case, ...]:
    """The curated cases of tanh_deq."""
    return (
        Case("contractive", "d=5, ||W||_2 = 0.7, one input", 71, _make_contractive),
        Case("batched_scales", "batch of 4 inputs scaled 1e-6..30 (last one saturates "
             "tanh), zero bias", 72, _make_batched_scales, flags=("batched", "scales")),
        Case("scalar", "d = p = 1", 73, _make_scalar, flags=("edge",)),
        Case("near_non_contractive", "symmetric W with eigenvalue 0.985: Picard rate "
             "~0.98, cond(I - J) ~ 60", 74, _make_near_non_contractive,
             flags=("ill_conditioned",),
             tol={"float64": {"fd": 1e-7, "batch": 1e-8},
                  "float32": {"fd": 5e-3, "forward": 5e-4}}),
        Case("negative_eigenvalues", "W eigenvalues down to -1.8 (||W||_2 > 1): undamped "
             "Picard oscillates, damped Picard (lam = 0.5) converges", 75,
             _make_negative_eigenvalues, params={"method": "picard", "lam": 0.5, "max_iter": 3000},
             flags=("batched", "non_contractive", "damping")),
        Case("per_member_weights", "W batched (3 members, ||W||_2 = 0.3, 0.6, 0.9), x, U, "
             "b shared (gradients summed)", 76, _make_per_member_weights,
             flags=("batched", "broadcast")),
    )


def _tanh_deq_gradients() -> dict[str, NamedGradient]:
    """The gradients ``validate --gradient`` takes for tanh_deq."""
    return {
        "exact": NamedGradient(
            lambda res, z_bar: deq.deq_vjp(res, z_bar, method="exact"),
            description="implicit: u = (I - J^T)^{-1} z_bar (the default)"),
        "jfb": NamedGradient(
            lambda res, z_bar: deq.deq_vjp(res, z_bar, method="jfb"),
            description="Jacobian-free backprop: u = z_bar"),
        "unroll": NamedGradient(
            lambda res, z_bar, **kw: deq.deq_vjp(res, z_bar, method="unroll", **kw),
            {"k": int, "lam": float},
            "UPG: k damped steps (lam) from the fixed point (defaults k=5, lam=0.5)",
            _check_phantom),
        "neumann": NamedGradient(
            lambda res, z_bar, **kw: deq.deq_vjp(res, z_bar, method="neumann", **kw),
            {"k": int, "lam": float},
            "NPG: u = lam sum_{i<k} (B^T)^i z_bar, B = lam J + (1 - lam) I "
            "(defaults k=5, lam=0.5)", _check_phantom),
    }


def _tanh_deq_spec() -> OpSpec:
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
        cases=_tanh_deq_cases(),
        tol={
            "float64": Tolerance(forward=1e-10, adjoint=1e-11, fd=1e-8, batch=1e-10),
            "float32": Tolerance(forward=5e-5, adjoint=1e-4, fd=5e-4, batch=1e-4),
        },
        extra_checks=(_deq_exact_closed_form, _deq_phantom_closed_forms),
        candidate_params=(),
        gradients=_tanh_deq_gradients(),
    )


#: The specs this module registers, in table order.
BUILDERS = (_tanh_deq_spec,)
