"""Every registered operator, every case, every backend, every dtype.

An operator is covered here by being registered in refimpl/registry/ (one module per operator); the
checks themselves (oracle, adjoint test, finite differences, batch == loop,
no mutation, closed forms) are those of ``registry.verify_case``.
"""

import dataclasses

import numpy as np
import pytest

from refimpl import linsolve, registry
from refimpl.backend import SUPPORTED_DTYPES

SPECS = registry.all_specs()
CASES = [pytest.param(spec, case, id=f"{spec.name}-{case.id}")
         for spec in SPECS for case in spec.cases]


@pytest.mark.parametrize("spec, case", CASES)
def test_case_passes_every_check(spec, case, backend, dtype):
    if dtype not in case.dtypes:
        pytest.skip(f"case {case.id} is {'/'.join(case.dtypes)} only")
    results = registry.verify_case(spec, case, backend=backend, dtype=dtype)
    failed = [str(r) for r in results if not r.passed]
    assert not failed, "\n".join(failed)
    checks = {r.check for r in results}
    assert "no_mutation" in checks
    if not spec.surrogate:
        assert {"fd_vjp"} <= checks, f"no finite-difference check ran: {checks}"
        if spec.jvp is not None:
            assert {"adjoint", "fd_jvp"} <= checks


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_spec_is_well_formed(spec):
    assert len(spec.inputs) == len(spec.core_ndim)
    assert set(spec.tol) == set(SUPPORTED_DTYPES)
    ids = [c.id for c in spec.cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len({c.seed for c in spec.cases}) == len(ids), "each case has its own seed"
    assert spec.cases and all(c.description for c in spec.cases)
    if spec.surrogate:
        assert spec.extra_checks, "a surrogate gradient needs checks against its defining formula"
    for c in spec.cases:
        for dt in c.dtypes:
            assert dt in SUPPORTED_DTYPES
            spec.tolerance(c, dt)  # overrides name real fields


def test_registry_lookup_errors():
    with pytest.raises(ValueError, match="unknown operator 'nope'"):
        registry.get_spec("nope")
    with pytest.raises(KeyError, match="no case 'nope'"):
        registry.get_spec("linear_solve").case("nope")


# --------------------------------------------------------------------------
# Planted bugs: the checks must catch each of them.
# --------------------------------------------------------------------------

def _vjp_missing_transpose(res, x_bar):
    g = linsolve.solve_vec(res.A, x_bar)                  # A^{-1} instead of A^{-T}
    return -(g[..., :, None] * res.x[..., None, :]), g


def _vjp_wrong_sign(res, x_bar):
    A_bar, b_bar = linsolve.solve_vjp(res, x_bar)
    return -A_bar, b_bar


def _vjp_coupled_batch(res, x_bar):
    # Each member's gradient leaks into the others (mean over the batch).
    A_bar, b_bar = linsolve.solve_vjp(res, x_bar)
    xp = registry._backend.namespace(b_bar=b_bar)
    return A_bar, b_bar + 0.1 * xp.mean(b_bar, axis=0, keepdims=True)


def _vjp_wrong_small_member(res, x_bar):
    # 1% error confined to the batch member of scale 1e-6 (batched_scales case).
    A_bar, b_bar = linsolve.solve_vjp(res, x_bar)
    if b_bar.ndim == 1:  # a single member, as the batch == loop check calls it
        return A_bar, b_bar
    xp = registry._backend.namespace(b_bar=b_bar)
    w = xp.asarray([1.01, 1.0, 1.0, 1.0], dtype=b_bar.dtype, device=registry._backend.device(b_bar))
    return A_bar, b_bar * w[:, None]


def _forward_wrong(A, b):
    res = linsolve.solve(A, b)
    return dataclasses.replace(res, x=res.x * 1.01)


PLANTED = {
    "missing_transpose": (dict(vjp=_vjp_missing_transpose), "well_conditioned", {"adjoint", "fd_vjp"}),
    "wrong_sign": (dict(vjp=_vjp_wrong_sign), "well_conditioned", {"adjoint", "fd_vjp"}),
    "coupled_batch": (dict(vjp=_vjp_coupled_batch), "batched_scales", {"adjoint", "fd_vjp", "batch"}),
    "wrong_forward": (dict(forward=_forward_wrong), "well_conditioned", {"forward", "fd_jvp"}),
    # float64 is the detector for formula bugs: in float32 a 1% error in one
    # small member moves the normalised adjoint error by only ~3e-6.
    "wrong_small_member": (dict(vjp=_vjp_wrong_small_member), "batched_scales",
                           {"adjoint", "fd_vjp", "batch"}),
}
FLOAT64_ONLY = {"wrong_small_member"}


@pytest.mark.parametrize("bug", PLANTED)
def test_planted_bug_is_caught(bug, backend, dtype):
    if dtype == "float32" and bug in FLOAT64_ONLY:
        pytest.skip("float64 is the detector for this bug")
    changes, case_id, must_fail = PLANTED[bug]
    spec = dataclasses.replace(registry.get_spec("linear_solve"), name=f"planted_{bug}", **changes)
    results = {r.check: r for r in registry.verify_case(spec, spec.case(case_id), backend=backend,
                                                        dtype=dtype)}
    failed = {name for name, r in results.items() if not r.passed}
    assert must_fail <= failed, f"{bug}: expected {must_fail} to fail, failed: {failed}"


def test_mutation_is_caught():
    def mutating_forward(A, b):
        res = linsolve.solve(A, b)
        b[...] = 0.0  # planted: writes into the caller's array
        return res

    spec = dataclasses.replace(registry.get_spec("linear_solve"), forward=mutating_forward)
    results = {r.check: r for r in registry.verify_case(spec, spec.case("well_conditioned"))}
    assert not results["no_mutation"].passed
    assert "b" in results["no_mutation"].detail


def test_exception_is_reported_not_raised():
    def broken(A, b):
        raise RuntimeError("boom")

    spec = dataclasses.replace(registry.get_spec("linear_solve"), forward=broken)
    (result,) = registry.verify_case(spec, spec.case("well_conditioned"))
    assert not result.passed and "boom" in result.detail


def test_scaled_normal_scales_each_member():
    x = np.stack([np.full((2, 2), 1e-6), np.full((2, 2), 1e3)])
    u = registry.scaled_normal(np.random.default_rng(0), x, core_ndim=2)
    ratio = np.abs(u).max(axis=(1, 2)) / np.abs(x).max(axis=(1, 2))
    assert np.all((ratio > 0.05) & (ratio < 20))
