"""The iteration driver (refimpl.iteration): schedules, masks, diagnostics.

Expected counts come from the closed form of the toy iterations used here
(a halving error reaches ``tol`` after ``ceil(log2(e0 / tol))`` steps), not
from the driver.
"""

import math

import numpy as np
import pytest

from refimpl import backend
from refimpl.iteration import Diagnostics, Schedule, iterate


def _halving(e0):
    """Members whose error halves each iteration: ``e_k = e0 2^-k``."""
    calls = []

    def advance(e, active, k):
        calls.append((k, active.copy()))
        for _ in range(k):
            e = np.where(active, 0.5 * e, e)
        return e

    return advance, calls


def _steps_to(e0, tol):
    return max(0, math.ceil(math.log2(e0 / tol)))


@pytest.mark.parametrize("check_every", [1, 3, 10])
def test_each_member_stops_at_its_first_passing_check(check_every):
    e0 = np.array([1.0, 2.0 ** 10, 3.0, 2.0 ** -3])
    tol = 2.0 ** -20
    advance, _ = _halving(e0)
    state, diag = iterate(advance, lambda e: (e, e <= tol), e0.copy(), batch=(4,), like=e0,
                          schedule=Schedule(max_iter=100, check_every=check_every))
    exact = np.array([_steps_to(x, tol) for x in e0])
    # The first check at or after the exact count.
    expected = check_every * np.ceil(exact / check_every).astype(int)
    np.testing.assert_array_equal(diag.n_iter, expected)
    np.testing.assert_array_equal(state, e0 * 2.0 ** -expected)          # frozen when done
    np.testing.assert_array_equal(diag.error, state)
    assert diag.all_converged and diag.n_converged == 4 and diag.max_n_iter == expected.max()


def test_batch_equals_loop():
    e0 = np.array([[5.0, 0.1], [7.0, 1e3]])
    tol = 1e-6
    sched = Schedule(max_iter=60, check_every=4)
    advance, _ = _halving(e0)
    state, diag = iterate(advance, lambda e: (e, e <= tol), e0, batch=(2, 2), like=e0,
                          schedule=sched)
    for idx in np.ndindex(2, 2):
        one = e0[idx][None]
        adv1, _ = _halving(one)
        s1, d1 = iterate(adv1, lambda e: (e, e <= tol), one, batch=(1,), like=one, schedule=sched)
        assert s1[0] == state[idx] and d1.n_iter[0] == diag.n_iter[idx]
        assert d1.error[0] == diag.error[idx]


def test_max_iter_reports_unconverged_and_measures_the_last_iterate():
    e0 = np.array([1.0, 1e-9])
    advance, calls = _halving(e0)
    state, diag = iterate(advance, lambda e: (e, e <= 1e-8), e0, batch=(2,), like=e0,
                          schedule=Schedule(max_iter=7, check_every=3))
    assert [k for k, _ in calls] == [3, 3, 1]            # the last block is cut at max_iter
    np.testing.assert_array_equal(diag.n_iter, [7, 3])
    np.testing.assert_array_equal(diag.converged, [False, True])
    assert diag.error[0] == 2.0 ** -7 and not diag.all_converged
    assert diag.summary() == {"size": 2, "n_converged": 1, "all_converged": False,
                              "max_error": 2.0 ** -7, "max_n_iter": 7}


def test_failed_members_stop_without_converging():
    e0 = np.array([1.0, 4.0])

    def measure(e):
        failed = np.array([False, True])
        return e, e <= 0.25, failed

    advance, _ = _halving(e0)
    _, diag = iterate(advance, measure, e0, batch=(2,), like=e0, schedule=Schedule(max_iter=50))
    np.testing.assert_array_equal(diag.n_iter, [2, 1])
    np.testing.assert_array_equal(diag.converged, [True, False])


def test_deferred_sync_reads_the_host_every_few_checks():
    """A policy that defers syncs reads "any active" every on_device-th check;
    the extra advances see an all-false mask and leave the state alone."""
    e0 = np.array([1.0])
    sched = Schedule.for_policy(backend.DevicePolicy(deferred_sync=True), max_iter=50,
                                on_device=4)
    assert sched.sync_every == 4
    assert Schedule.for_policy(backend.DevicePolicy(), max_iter=50, on_device=4).sync_every == 1
    advance, calls = _halving(e0)
    state, diag = iterate(advance, lambda e: (e, e <= 0.25), e0, batch=(1,), like=e0,
                          schedule=sched)
    assert len(calls) == 4 and not any(c[1].any() for c in calls[2:])
    assert diag.n_iter[0] == 2 and state[0] == 0.25


def test_unbatched_diagnostics_are_0d_and_empty_summary():
    x = np.array(3.0)
    advance, _ = _halving(x)
    _, diag = iterate(advance, lambda e: (e, e <= 1.0), x, batch=(), like=x,
                      schedule=Schedule(max_iter=10))
    assert diag.n_iter.shape == () and int(diag.n_iter) == 2 and diag.size == 1
    empty = Diagnostics(n_iter=np.zeros(0, np.int64), error=np.zeros(0), converged=np.zeros(0, bool))
    assert empty.summary() == {"size": 0, "n_converged": 0, "all_converged": True,
                               "max_error": 0.0, "max_n_iter": 0}


def test_measure_initial_stops_members_done_at_the_start():
    e0 = np.array([0.5, 8.0])
    advance, calls = _halving(e0)
    state, diag = iterate(advance, lambda e: (e, e <= 1.0), e0, batch=(2,), like=e0,
                          schedule=Schedule(max_iter=20, measure_initial=True))
    np.testing.assert_array_equal(diag.n_iter, [0, 3])
    np.testing.assert_array_equal(state, [0.5, 1.0])
    assert not calls[0][1][0]                      # the first member never advanced
    calls.clear()
    _, diag = iterate(advance, lambda e: (e, e <= 10.0), e0, batch=(2,), like=e0,
                      schedule=Schedule(max_iter=20, measure_initial=True))
    assert calls == [] and diag.all_converged and diag.max_n_iter == 0
    _, diag = iterate(advance, lambda e: (e, e <= 1.0), e0, batch=(2,), like=e0,
                      schedule=Schedule(max_iter=0, measure_initial=True))
    np.testing.assert_array_equal(diag.converged, [True, False])
