"""Registry entries for the matrix square root and inverse square root (refimpl.matsqrt): cases, oracle, tolerances and
operator-specific checks.  Listed in ``refimpl.registry``."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import numpy as np

from .. import backend as _backend
from .. import matsqrt
from ..backend import to_host
from ..check import CheckResult, compare
from . import Case, OpSpec, Tolerance, scaled_normal


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


def _out(run, inverse: bool):
    """The forward's output on the host: ``S`` (or ``S_inv``)."""
    return to_host(getattr(run.result, "S_inv" if inverse else "S"))


def _vjp_fn(inverse: bool):
    return matsqrt.inv_sqrtm_vjp if inverse else matsqrt.sqrtm_vjp


def _true_root(a):
    """The root of the symmetric part of ``a`` and its eigenvalues (NumPy ``eigh``)."""
    lam, U = np.linalg.eigh(_host_sym(a))
    s = np.sqrt(np.maximum(lam, 0.0))
    return (U * s) @ U.T, lam


def _root_identity(inverse: bool, run):
    """S symmetric PSD, S S = A (or S_inv A S_inv = I) to the reported residual."""
    S, A = _out(run, inverse), run.host["A"]
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


def _error_bound_checks(inverse: bool, run):
    """The bound beta = error_bound(spectrum): ||S - R||_2 <= beta ||R||_2 with R the
    true root, and it is attained: S commutes with R, so the eigenvalues of
    R^{-1/2} S R^{-1/2} - I are exactly the scalar relative errors and
    ||R^{-1/2} S R^{-1/2} - I||_2 = beta (up to round-off; checked where the
    round-off allowance is below beta / 10, i.e. not for float32 MPA, whose
    basis-Z round-off is comparable to beta at moderate conditioning)."""
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
    S = _out(run, inverse)
    eps = float(np.finfo(run.dtype).eps)
    # round-off allowance: the forward's own relative error, growth * n * eps,
    # amplified by sqrt(kappa) (root) or kappa (inverse root) in the direction of
    # the smallest eigenvalue (derivation below).
    # MPA in the paper's basis Z: the cancellation factor of P (and Q) at
    # z = 1, sum_k |p_k| / |P(1)| = ((1 + sqrt 2)^N + (1 - sqrt 2)^N) / 2,
    # N = 2m + 1 (8119 at m = 5); basis X: the growth of O(X)'s condition,
    # 4^m; otherwise 100.
    m = kw.get("order", matsqrt.DEFAULT_MPA_ORDER)
    if method != "mpa":
        growth = 100.0
    elif p.get("basis") == "x":
        growth = 4.0 ** m
    else:
        N = 2 * m + 1
        growth = ((1.0 + math.sqrt(2.0)) ** N + (1.0 - math.sqrt(2.0)) ** N) / 2.0
    floor = growth * A.shape[-1] * eps
    # first-order perturbation of R = A^{+-1/2}: a relative change eps of A moves
    # R by up to max|f'(w_min)| eps w_max / ||R||, i.e. eps sqrt(kappa) / 2 for the
    # root and eps kappa / 2 for the inverse root (divided differences of f(x) =
    # x^{+-1/2} are largest at the smallest eigenvalue)
    power = 1.0 if inverse else 0.5
    over, gap, meaningful = [], [], True
    for idx in np.ndindex(*A.shape[:-2]):
        w, U = np.linalg.eigh(A[idx])
        r = np.sqrt(w) ** (-1.0 if inverse else 1.0)          # eigenvalues of R
        R = (U * r) @ U.T
        b = float(beta[idx])
        slack = floor * float(np.max(w) / np.min(w)) ** power
        over.append(np.linalg.norm(S[idx] - R, 2) / np.max(np.abs(r)) - b - slack)
        Rm = (U / np.sqrt(r)) @ U.T                               # R^{-1/2}
        gap.append(abs(np.linalg.norm(Rm @ S[idx] @ Rm - np.eye(len(r)), 2) - b) - slack)
        # "attained" is asserted only where the allowance cannot hide the bound
        meaningful &= b == 0.0 or slack <= 0.1 * b
    out = [CheckResult("error_bound", max(over), 0.0, max(over) <= 0.0,
                       f"max bound {float(np.max(beta)):.2e}")]
    if meaningful:
        out.append(CheckResult("error_bound_attained", max(gap), 0.0, max(gap) <= 0.0,
                               "| ||R^-1/2 S R^-1/2 - I||_2 - bound | - round-off allowance"))
    return out


def _gradient_oracle(inverse: bool, run):
    """A_bar against scipy.linalg.solve_sylvester: with the true root for
    "exact", with the forward's own S (or S_inv) for "lyapunov_sign"."""
    import scipy.linalg

    vmethod = run.case.vjp_params.get("method", "exact")
    if vmethod == "approximant":
        return []            # checked by the adjoint test, FD and tests/test_matsqrt.py
    A = run.host["A"]
    G = run.rng.standard_normal(A.shape)
    A_bar = to_host(_vjp_fn(inverse)(run.result, run.asarray(G), **run.case.vjp_params))
    S_res = _out(run, inverse)
    expect = np.empty_like(A)
    for idx in np.ndindex(*A.shape[:-2]):
        if vmethod == "exact":
            S, _ = _true_root(A[idx])
            rhs = -np.linalg.solve(S, np.linalg.solve(S, G[idx].T).T) if inverse else G[idx]
            # S X + X S = G   (inverse: with G replaced by -T G T, T = S^{-1})
            expect[idx] = scipy.linalg.solve_sylvester(S, S, rhs)
        else:
            T = S_res[idx]
            rhs = -(T @ T) @ G[idx] @ (T @ T) if inverse else G[idx]
            expect[idx] = scipy.linalg.solve_sylvester(T, T, rhs)
    return [compare(_host_sym(A_bar), _host_sym(expect), rtol=run.tol.adjoint * 100,
                    name="gradient_vs_solve_sylvester")]


def _closed_forms(inverse: bool, run):
    """A = cI: S = sqrt(c) I, A_bar = sym(G)/(2 sqrt c) (inverse: -sym(G)/(2 c^{3/2}));
    diagonal A; the 2x2 formula S = (A + sqrt(det A) I)/sqrt(tr A + 2 sqrt(det A))."""
    flags = set(run.case.flags)
    A = run.host["A"]
    S = _out(run, inverse)
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
            A_bar = to_host(_vjp_fn(inverse)(run.result, run.asarray(G), **run.case.vjp_params))
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
            A_bar = to_host(_vjp_fn(inverse)(run.result, run.asarray(G), **run.case.vjp_params))
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
        A_bar = to_host(_vjp_fn(inverse)(run.result, run.asarray(G), **run.case.vjp_params))
        deriv = np.asarray(-0.5 * a ** -1.5 if inverse else 0.5 * a ** -0.5)  # d a^{+-1/2}/da
        out.append(compare(np.asarray(A_bar[..., 0, 0]), deriv, rtol=run.tol.adjoint * 100,
                           name="closed_form_scalar_derivative"))
    return out


def _matsqrt_extra_checks(inverse: bool):
    """Closed forms, the error bound, and gradient oracles (scipy.linalg.solve_sylvester)."""
    return tuple(functools.update_wrapper(functools.partial(check, inverse), check)
                 for check in (_root_identity, _error_bound_checks, _gradient_oracle, _closed_forms))


# Inputs of the cases (shared by the root and the inverse root).

def _input_well(rng):
    return {"A": _spd_cond(rng, 5, 10.0)}

def _input_small_well(rng):
    return {"A": _spd_cond(rng, 4, 2.0)}

def _input_identity(rng):
    return {"A": 2.5 * np.eye(4)}

def _input_repeated(rng):
    return {"A": _spd(rng, [1.0, 1.0, 1.0, 4.0, 4.0, 9.0])}

def _input_ill(rng):
    return {"A": _spd_cond(rng, 6, 1e6)}

def _input_moderately_ill(rng):
    return {"A": _spd_cond(rng, 5, 1e4)}

def _input_batched_scales(rng):
    scales = np.array([1e-6, 1e-2, 1.0, 1e3])[:, None, None]
    return {"A": np.stack([_spd_cond(rng, 4, 20.0) for _ in range(4)]) * scales}

def _input_rank_deficient(rng):
    # small integers: A = X X^T is exactly representable in float32, so
    # its rank (3 of 5) survives the rounding to the working dtype; two zero
    # rows and columns make its zero eigenvalues exact zeros in every
    # eigensolver's arithmetic (for a full X their computed sign is the
    # rounding luck of the LAPACK at hand)
    X = rng.integers(-3, 4, size=(5, 3)).astype(float)
    X[[1, 3]] = 0.0
    return {"A": X @ X.T}

def _input_diagonal(rng):
    return {"A": np.diag([0.5, 2.0, 2.0, 7.0])}

def _input_two_by_two(rng):
    return {"A": np.array([[[3.0, 1.0], [1.0, 2.0]], [[0.2, -0.1], [-0.1, 5.0]]])}

def _input_scalar(rng):
    return {"A": np.array([[2.7]])}


def _direct_and_pade_cases(base: int) -> list[Case]:
    """Cases 1-8: eigendecomposition forwards (exact VJP, Lyapunov VJP) and
    the Padé/Taylor approximants."""
    mpa, mtp, eig = {"method": "mpa"}, {"method": "mtp"}, {"method": "eig"}
    exact, lyap, appr = {"method": "exact"}, {"method": "lyapunov_sign"}, {"method": "approximant"}
    return [
        Case("eig_exact", "random 5x5 SPD, cond 10: eig forward, exact eigenbasis VJP",
             base + 1, _input_well, params=eig, vjp_params=exact, jvp_params=exact),
        Case("scaled_identity", "A = 2.5 I: every eigenvalue repeated (closed form G/(2 sqrt c))",
             base + 2, _input_identity, params=eig, vjp_params=exact, jvp_params=exact,
             flags=("repeated_eigenvalues", "identity")),
        Case("repeated_eigenvalues", "spectrum {1,1,1,4,4,9}: exact VJP stays finite and exact",
             base + 3, _input_repeated, params=eig, vjp_params=exact, jvp_params=exact,
             flags=("repeated_eigenvalues",)),
        Case("repeated_lyapunov_sign", "spectrum {1,1,1,4,4,9}, Lyapunov VJP via the sign function",
             base + 4, _input_repeated, params=eig, vjp_params=lyap, jvp_params=lyap,
             flags=("repeated_eigenvalues",)),
        Case("mpa_approximant", "MPA [5/5] forward and its own exact derivative",
             base + 5, _input_well, params=mpa, vjp_params=appr, jvp_params=appr),
        Case("mpa_x_basis_ill_conditioned",
             "MPA [8/8] in the stable basis X = A/c on a cond-1e4 matrix, its own derivative "
             "(float64 only: the round-off floor of an order-8 Padé is ~1e-12 here)",
             base + 6, _input_moderately_ill, params={"method": "mpa", "order": 8, "basis": "x"},
             vjp_params=appr, jvp_params=appr, flags=("ill_conditioned",), dtypes=("float64",),
             fd_step=1e-6, tol={"float64": {"forward": 1e-10, "adjoint": 1e-10, "fd": 1e-6}}),
        Case("mpa_lyapunov_sign",
             "the paper's pair: MPA [5/5] forward, Lyapunov-sign backward. FD differentiates the "
             "MPA forward, the Lyapunov VJP the true root: they differ by the MPA's derivative "
             "error (~1e-6 here, cond 2), hence fd tol 1e-4; gradient_vs_solve_sylvester checks the "
             "Lyapunov solve itself tightly",
             base + 7, _input_small_well, params=mpa, vjp_params=lyap, jvp_params=lyap,
             tol={"float64": {"fd": 1e-4}}),
        Case("mtp_approximant", "MTP degree 10 forward and its own exact derivative",
             base + 8, _input_well, params=mtp, vjp_params=appr, jvp_params=appr),
    ]


def _iterative_and_structured_cases(base: int) -> list[Case]:
    """Cases 9-16: Newton–Schulz, ill-conditioned and batched inputs, and the
    closed-form structures (diagonal, 2x2, scalar)."""
    mpa, eig, ns = {"method": "mpa"}, {"method": "eig"}, {"method": "ns"}
    exact, lyap, appr = {"method": "exact"}, {"method": "lyapunov_sign"}, {"method": "approximant"}
    ill_tol = {"float64": {"forward": 1e-9, "fd": 1e-6, "adjoint": 1e-10}}
    return [
        Case("ns_approximant", "coupled Newton-Schulz (to tolerance), derivative through its steps",
             base + 9, _input_well, params=ns, vjp_params=appr, jvp_params=appr),
        # fd_step 1e-7 (the steps stay below l_min = 1e-6): at 1e-9 the differences
        # were dominated by the eigensolver's rounding (1e-7 to 1.5e-6 depending on the
        # LAPACK build; NumPy's and torch's differ 4x there); at 1e-7 they agree with
        # the exact JVP to ~1e-8 on both
        Case("ill_conditioned", "6x6 with cond 1e6: eig forward, exact VJP (float64 only)",
             base + 10, _input_ill, params=eig, vjp_params=exact, jvp_params=exact,
             flags=("ill_conditioned",), dtypes=("float64",), fd_step=1e-7, tol=ill_tol),
        Case("ill_conditioned_lyapunov_sign",
             "5x5 with cond 1e4: the sign iteration needs ~20 steps; NS forward (float64 only)",
             base + 11, _input_moderately_ill, params=ns, vjp_params=lyap, jvp_params=lyap,
             flags=("ill_conditioned",), dtypes=("float64",), fd_step=1e-6, tol=ill_tol),
        Case("batched_scales_mpa",
             "batch of 4 whose members differ in scale 1e-6..1e3: per-member normalisation, MPA",
             base + 12, _input_batched_scales, params=mpa, vjp_params=appr, jvp_params=appr,
             flags=("batched", "scales")),
        Case("batched_scales_lyapunov_sign",
             "batch of 4 with scales 1e-6..1e3: NS forward, Lyapunov-sign VJP, per-member scaling",
             base + 13, _input_batched_scales, params=ns, vjp_params=lyap, jvp_params=lyap,
             flags=("batched", "scales")),
        Case("diagonal", "diagonal A with a repeated entry: closed forms for S and A_bar",
             base + 14, _input_diagonal, params=eig, vjp_params=exact, jvp_params=exact,
             flags=("diagonal", "repeated_eigenvalues")),
        Case("two_by_two", "batch of 2x2: S = (A + sqrt(det A) I)/sqrt(tr A + 2 sqrt(det A))",
             base + 15, _input_two_by_two, params=ns, vjp_params=exact, jvp_params=exact,
             flags=("two_by_two", "batched")),
        Case("scalar_mpa", "1x1: every method is exact, d a^{1/2}/da closed form",
             base + 16, _input_scalar, params=mpa, vjp_params=appr, jvp_params=appr,
             flags=("scalar", "edge")),
    ]


def _matsqrt_cases(inverse: bool) -> tuple[Case, ...]:
    base = 420 if inverse else 400
    cases = _direct_and_pade_cases(base) + _iterative_and_structured_cases(base)
    appr = {"method": "approximant"}
    if not inverse:
        cases.append(Case(
            "rank_deficient_mpa",
            "rank 3 of 5 (PSD, singular): the MPA maps 0 to sqrt(||A||_F)/11; the true root is "
            "not differentiable there but the MPA is, so its own derivative is checked along "
            "directions in the range of A (psd_tol 1e-8: a direction rounded to float32 leaves "
            "the range by ~1e-7 relative, so A + h dA has eigenvalues ~ -1e-11 ||A||)",
            base + 17, _input_rank_deficient, params={"method": "mpa", "psd_tol": 1e-8},
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

    forward: Callable[..., Any]
    vjp: Callable[..., Any]
    jvp: Callable[..., Any]
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


#: The specs this module registers, in table order.
BUILDERS = (_sqrtm_spec, _inv_sqrtm_spec)
