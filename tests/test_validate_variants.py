"""refimpl.validate variants: unbatched candidates (``unbatched=True``)."""

import importlib.util
import textwrap

import numpy as np
import pytest

from refimpl import cli, registry
from refimpl.validate import validate

LINEAR_SOLVE = registry.get_spec("linear_solve")
BATCHED = [c.id for c in LINEAR_SOLVE.cases if "batched" in c.flags]
HAS_TORCH = importlib.util.find_spec("torch") is not None

# --------------------------------------------------------------------------
# --unbatched: a candidate written for one problem at a time
# --------------------------------------------------------------------------

ONE_AT_A_TIME = textwrap.dedent('''
    import numpy as np

    def _check(A, b):
        if A.ndim != 2 or b.ndim != 1:
            raise ValueError(f"one system at a time: got A {A.shape}, b {b.shape}")

    def solve(A, b):
        _check(A, b)
        return np.linalg.solve(A, b)

    def solve_vjp(A, b, x_bar):
        # x = A^{-1} b:  b_bar = A^{-T} x_bar,  A_bar = -b_bar x^T
        _check(A, b)
        if x_bar.ndim != 1:
            raise ValueError("one cotangent at a time")
        x = np.linalg.solve(A, b)
        b_bar = np.linalg.solve(A.T, x_bar)
        return -np.outer(b_bar, x), b_bar
''')


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory):
    path = tmp_path_factory.mktemp("unbatched") / "one_at_a_time.py"
    path.write_text(ONE_AT_A_TIME)
    namespace: dict = {}
    exec(compile(ONE_AT_A_TIME, str(path), "exec"), namespace)
    return path, namespace["solve"], namespace["solve_vjp"]


def test_batched_cases_exist_with_broadcasting():
    # the tests below would prove nothing without batched (and broadcast) cases
    assert "shared_matrix" in BATCHED and "batched_scales" in BATCHED
    assert "broadcast" in LINEAR_SOLVE.case("shared_matrix").flags


def test_unbatched_candidate_fails_without_flag(one_at_a_time):
    _, solve, solve_vjp = one_at_a_time
    report = validate("linear_solve", solve, framework="numpy", vjp=solve_vjp)
    status = {c.case: c.status for c in report.cases}
    assert all(status[c] == "ERROR" for c in BATCHED)
    assert "one system at a time" in next(c for c in report.cases
                                          if c.case == "shared_matrix").message
    assert all(s == "pass" for c, s in status.items() if c not in BATCHED)


def test_unbatched_candidate_passes_with_flag(one_at_a_time):
    _, solve, solve_vjp = one_at_a_time
    report = validate("linear_solve", solve, framework="numpy", vjp=solve_vjp,
                      unbatched=True)
    assert report.passed, report.table()
    assert {c.case for c in report.cases} >= set(BATCHED)
    assert "once per batch member" in report.gradient_source


def test_unbatched_broadcast_cotangent_is_summed(one_at_a_time):
    # Independent route: A_bar of the shared matrix is sum_m -b_bar_m x_m^T,
    # computed here member by member from the case's own numbers.
    _, solve, solve_vjp = one_at_a_time
    from refimpl import vectors
    gc = vectors.reference_case(LINEAR_SOLVE, LINEAR_SOLVE.case("shared_matrix"), "float64")
    A, b, xb = gc.inputs["A"], gc.inputs["b"], gc.cotangent
    expected = np.zeros_like(A)
    for m in np.ndindex(*b.shape[:-1]):
        expected += solve_vjp(A, b[m], xb[m])[0]
    np.testing.assert_allclose(gc.vjp["A"], expected, rtol=1e-10, atol=1e-12)
    # a VJP that forgets all but the first member's share fails
    calls = []

    def first_member_only(A, b, x_bar):
        calls.append(1)
        a_bar, b_bar = solve_vjp(A, b, x_bar)
        return (a_bar if len(calls) % 6 == 1 else 0 * a_bar), b_bar

    report = validate("linear_solve", solve, framework="numpy", vjp=first_member_only,
                      cases=["shared_matrix"], unbatched=True)
    assert report.cases[0].status == "FAIL"
    assert report.cases[0].gradient_errors["A"] > report.cases[0].gradient_tol


def test_unbatched_wrong_member_order_fails(one_at_a_time):
    # slicing must pair input members with output members: a candidate
    # that sees members but answers with a fixed one fails the forward
    _, solve, solve_vjp = one_at_a_time
    first = {}

    def sticky(A, b):
        first.setdefault("b", b.copy())
        return solve(A, first["b"])

    report = validate("linear_solve", sticky, framework="numpy", vjp=solve_vjp,
                      cases=["shared_matrix"], unbatched=True)
    assert report.cases[0].status == "FAIL"


def test_unbatched_isolated_and_cli(one_at_a_time, capsys):
    path = one_at_a_time[0]
    target, vjp = f"{path}:solve", f"{path}:solve_vjp"
    report = validate("linear_solve", target, framework="numpy", vjp=vjp, unbatched=True,
                      cases=BATCHED)
    assert report.passed, report.table()
    assert "--unbatched" in report.command
    without = validate("linear_solve", target, framework="numpy", vjp=vjp, cases=BATCHED)
    assert {c.status for c in without.cases} == {"ERROR"}
    argv = ["validate", "linear_solve", target, "--framework", "numpy", "--vjp", vjp]
    assert cli.main(argv + ["--unbatched"]) == 0
    assert cli.main(argv) != 0
    capsys.readouterr()


def test_unbatched_argument_checked(one_at_a_time):
    _, solve, solve_vjp = one_at_a_time
    with pytest.raises(TypeError, match="unbatched"):
        validate("linear_solve", solve, framework="numpy", vjp=solve_vjp, unbatched="yes")


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_unbatched_torch_autodiff():
    import torch

    def solve(A, b):
        if A.ndim != 2 or b.ndim != 1:
            raise ValueError("one system at a time")
        return torch.linalg.solve(A, b)

    assert validate("linear_solve", solve, framework="torch", unbatched=True).passed
    report = validate("linear_solve", solve, framework="torch", cases=BATCHED)
    assert {c.status for c in report.cases} == {"ERROR"}


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_unbatched_single_input_operator():
    import torch

    def sqrtm(A):
        if A.ndim != 2:
            raise ValueError("one matrix at a time")
        w, V = torch.linalg.eigh((A + A.T) / 2)
        return (V * w.sqrt()) @ V.T

    spec = registry.get_spec("sqrtm")
    batched = [c.id for c in spec.cases if "batched" in c.flags and c.for_candidates
               and "float64" in c.dtypes]
    if not batched:
        pytest.skip("sqrtm has no batched case for candidates")
    report = validate("sqrtm", sqrtm, framework="torch", unbatched=True, cases=batched)
    assert report.passed, report.table()


# --------------------------------------------------------------------------
# --gradient NAME[:options]: a named (phantom) gradient as the reference
# --------------------------------------------------------------------------

def _deq_fixed_point(x, W, U, b):
    """z = tanh(W z + U x + b) for one member: damped Picard, then Newton."""
    z = np.zeros(W.shape[0])
    for _ in range(300):
        z = 0.5 * z + 0.5 * np.tanh(W @ z + U @ x + b)
    for _ in range(50):
        fz = np.tanh(W @ z + U @ x + b)
        step = np.linalg.solve(np.eye(len(z)) - (1 - fz ** 2)[:, None] * W, z - fz)
        z = z - step
        if np.max(np.abs(step)) <= 1e-16 * max(1.0, np.max(np.abs(z))):
            break
    return z


def _deq_bars(x, W, U, b, u):
    """(x_bar, W_bar, U_bar, b_bar) from u: with v = D u, D = 1 - z^2,
    x_bar = U^T v, W_bar = v z^T, U_bar = v x^T, b_bar = v."""
    z = _deq_fixed_point(x, W, U, b)
    v = (1.0 - z ** 2) * u
    return U.T @ v, np.outer(v, z), np.outer(v, x), v


def _deq_one(x, W, U, b):
    if x.ndim != 1 or W.ndim != 2:
        raise ValueError("one member at a time")
    return _deq_fixed_point(x, W, U, b)


def _jfb_vjp(x, W, U, b, z_bar):
    return _deq_bars(x, W, U, b, z_bar)          # JFB: u = z_bar


def _neumann_vjp(k, lam=0.5):
    def vjp(x, W, U, b, z_bar):
        # NPG: u = lam sum_{i<k} (B^T)^i z_bar, B = lam D W + (1 - lam) I
        z = _deq_fixed_point(x, W, U, b)
        Bt = (lam * (1.0 - z ** 2)[:, None] * W + (1.0 - lam) * np.eye(len(z))).T
        term, u = z_bar.copy(), np.zeros_like(z_bar)
        for _ in range(k):
            u += lam * term
            term = Bt @ term
        return _deq_bars(x, W, U, b, u)
    return vjp


def _passed(gradient, vjp, **kw):
    return validate("tanh_deq", _deq_one, framework="numpy", vjp=vjp, unbatched=True,
                    gradient=gradient, **kw)


def test_jfb_candidate_passes_only_against_jfb():
    report = _passed("jfb", _jfb_vjp)
    assert report.passed, report.table()
    assert "jfb" in report.gradient_source
    isolated = validate("tanh_deq", f"{__file__}:_deq_one", framework="numpy",
                        vjp=f"{__file__}:_jfb_vjp", unbatched=True, gradient="jfb")
    assert isolated.passed, isolated.table()
    assert "--gradient jfb" in isolated.command
    default = validate("tanh_deq", _deq_one, framework="numpy", vjp=_jfb_vjp, unbatched=True)
    assert not default.passed
    assert {c.status for c in default.cases} <= {"pass", "FAIL"}
    assert not _passed("exact", _jfb_vjp).passed


def test_neumann_candidate_passes_only_with_its_k():
    assert _passed("neumann:k=5", _neumann_vjp(5)).passed
    assert _passed("neumann:k=5,lam=0.5", _neumann_vjp(5)).passed
    assert not _passed("neumann:k=3", _neumann_vjp(5)).passed
    assert not _passed("neumann:k=5,lam=0.3", _neumann_vjp(5)).passed
    assert _passed("neumann:k=3,lam=0.3", _neumann_vjp(3, 0.3)).passed


def test_exact_gradient_is_the_default():
    # the exact implicit VJP u = (I - D W)^{-T} z_bar, by a dense solve here
    def exact_vjp(x, W, U, b, z_bar):
        z = _deq_fixed_point(x, W, U, b)
        J = (1.0 - z ** 2)[:, None] * W
        return _deq_bars(x, W, U, b, np.linalg.solve((np.eye(len(z)) - J).T, z_bar))

    assert _passed("exact", exact_vjp).passed
    assert validate("tanh_deq", _deq_one, framework="numpy", vjp=exact_vjp,
                    unbatched=True).passed


@pytest.mark.parametrize("text, match", [
    ("nope", "valid: exact .*jfb .*unroll .*neumann"),
    ("neumann:q=2", "valid keys: k=<int>, lam=<float>"),
    ("neumann:k=2.5", "option k of neumann must be an int"),
    ("neumann:k=0", "'k'"),
    ("neumann:lam=1.5", "'lam'"),
    ("neumann:k=2,k=3", "each at most once"),
    ("jfb:k=2", "jfb takes no options"),
])
def test_gradient_spec_errors(text, match):
    with pytest.raises(ValueError, match=match):
        _passed(text, _jfb_vjp)


def test_gradient_needs_named_gradients(one_at_a_time):
    _, solve, solve_vjp = one_at_a_time
    with pytest.raises(ValueError, match="no named gradients.*tanh_deq"):
        validate("linear_solve", solve, framework="numpy", vjp=solve_vjp, gradient="jfb")


def test_gradient_cli(tmp_path, capsys):
    path = tmp_path / "jfb_deq.py"
    path.write_text(textwrap.dedent(f'''
        import numpy as np
        import sys
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
        from test_validate_variants import _deq_one as deq, _jfb_vjp as deq_vjp
    '''))
    argv = ["validate", "tanh_deq", f"{path}:deq", "--framework", "numpy",
            "--vjp", f"{path}:deq_vjp", "--unbatched"]
    assert cli.main(argv + ["--gradient", "jfb"]) == 0
    assert "compared with the 'jfb' gradient" in capsys.readouterr().out
    assert cli.main(argv) == 1
    assert cli.main(argv + ["--gradient", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "exact" in err and "neumann" in err and "jfb" in err


# --------------------------------------------------------------------------
# sinkhorn_unbalanced for candidates: fn(C, a, b, *, eps, rho_a, rho_b) -> P
# --------------------------------------------------------------------------

def _torch_unbalanced(torch, swap=False):
    """Log-domain Sinkhorn with KL-relaxed marginals, differentiated by
    autograd through the (converged) iterations:
    f = tau_a eps (log a - LSE_j((g_j - C_ij) / eps)), tau = rho / (rho + eps)
    on a relaxed side, 1 on a hard one (rho None); likewise g."""
    def sinkhorn_unbalanced(C, a, b, *, eps, rho_a, rho_b):
        if swap:
            rho_a, rho_b = rho_b, rho_a
        ta = 1.0 if rho_a is None else rho_a / (rho_a + eps)
        tb = 1.0 if rho_b is None else rho_b / (rho_b + eps)
        f = torch.zeros(C.shape[:-1], dtype=C.dtype)
        g = torch.zeros(C.shape[:-2] + C.shape[-1:], dtype=C.dtype)
        la, lb = torch.log(a), torch.log(b)
        for _ in range(3000):
            f = ta * eps * (la - torch.logsumexp((g[..., None, :] - C) / eps, dim=-1))
            g = tb * eps * (lb - torch.logsumexp((f[..., :, None] - C) / eps, dim=-2))
        return torch.exp((f[..., :, None] + g[..., None, :] - C) / eps)
    return sinkhorn_unbalanced


UNBALANCED = registry.get_spec("sinkhorn_unbalanced")


def test_unbalanced_cases_are_for_candidates():
    assert UNBALANCED.candidate_params == ("eps", "rho_a", "rho_b")
    assert [c.id for c in UNBALANCED.cases if c.for_candidates] == [c.id for c in
                                                                   UNBALANCED.cases]
    from refimpl import vectors
    kw = vectors.reference_case(UNBALANCED, UNBALANCED.case("semi_unbalanced")).candidate_kwargs
    assert kw["rho_a"] is None and kw["rho_b"] == 0.2     # a hard row marginal


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_unbalanced_candidate_passes_and_wrong_ones_fail():
    import torch
    report = validate("sinkhorn_unbalanced", _torch_unbalanced(torch), framework="torch")
    assert report.passed, report.table()
    assert [c.case for c in report.cases] == [c.id for c in UNBALANCED.cases]
    swapped = validate("sinkhorn_unbalanced", _torch_unbalanced(torch, swap=True),
                       framework="torch")
    # rho_a and rho_b reach the candidate as named: swapping them fails every
    # case where they differ, and only those
    status = {c.case: c.status for c in swapped.cases}
    assert status == {"unbalanced": "pass", "semi_unbalanced": "FAIL",
                      "vjp_cg_batch_unbalanced": "FAIL"}


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_unbalanced_gradients_have_no_gauge():
    # (a_bar + c, b_bar - c) is the balanced problem's gauge freedom; with a
    # relaxed marginal it is an error, and nothing canonicalises it away
    import torch
    fwd = _torch_unbalanced(torch)

    def fn(C, a, b, **kw):
        return fwd(*(torch.tensor(x) for x in (C, a, b)), **kw).numpy()

    def vjp(C, a, b, P_bar, *, shift=0.0, **kw):
        xs = [torch.tensor(x, requires_grad=True) for x in (C, a, b)]
        bars = torch.autograd.grad(fwd(*xs, **kw), xs, grad_outputs=torch.tensor(P_bar))
        C_bar, a_bar, b_bar = (t.numpy() for t in bars)
        c = shift * np.max(np.abs(a_bar))
        return C_bar, a_bar + c, b_bar - c

    ok = validate("sinkhorn_unbalanced", fn, framework="numpy", vjp=vjp,
                  cases=["unbalanced"])
    assert ok.passed, ok.table()
    shifted = validate("sinkhorn_unbalanced", fn, framework="numpy",
                       vjp=lambda *a, **k: vjp(*a, shift=1e-3, **k), cases=["unbalanced"])
    assert shifted.cases[0].status == "FAIL"


# --------------------------------------------------------------------------
# SOFT top-k conventions (docs/validate.md): the mappings, checked
# --------------------------------------------------------------------------

def _threshold_topk(x, k, tau):
    """sigma((x - theta) / tau) with sum = k, theta by bisection (host)."""
    lo, hi = x.min() - 50 * tau, x.max() + 50 * tau
    for _ in range(200):
        theta = 0.5 * (lo + hi)
        if np.sum(1.0 / (1.0 + np.exp(-(x - theta) / tau))) > k:
            lo = theta
        else:
            hi = theta
    return 1.0 / (1.0 + np.exp(-(x - 0.5 * (lo + hi)) / tau))


def test_sigmoid_threshold_convention_is_eps_twice_tau():
    from refimpl import topk
    x = np.random.default_rng(5).standard_normal(9)
    for tau in (0.05, 0.3):
        A = np.asarray(topk.soft_topk(x, 3, eps=2 * tau).A)
        np.testing.assert_allclose(A, _threshold_topk(x, 3, tau), rtol=0, atol=1e-9)
        A_small = np.asarray(topk.soft_topk(x, 3, eps=2 * tau, largest=False).A)
        np.testing.assert_allclose(A_small, _threshold_topk(-x, 3, tau), rtol=0, atol=1e-9)


def test_scaled_cost_and_anchors_map_onto_eps():
    # entropic OT onto anchors (y1, y2) with cost (x - y)^2 / c and eps' is
    # soft_topk with eps = c eps' / (y2 - y1), by refimpl's Sinkhorn
    from refimpl import sinkhorn as sk
    from refimpl import topk
    x = np.random.default_rng(6).standard_normal(7)
    n, k, y, c, eps_prime = 7, 2, np.array([-1.0, 2.0]), 4.0, 0.1
    plan = sk.sinkhorn((x[:, None] - y[None, :]) ** 2 / c, np.full(n, 1.0 / n),
                       np.array([(n - k) / n, k / n]), eps=eps_prime, tol=1e-13).P
    A = np.asarray(topk.soft_topk(x, k, eps=c * eps_prime / (y[1] - y[0])).A)
    np.testing.assert_allclose(n * np.asarray(plan)[:, 1], A, rtol=0, atol=1e-9)
