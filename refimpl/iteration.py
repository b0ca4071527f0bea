r"""One driver for the batched fixed-point iterations of every operator.

Sinkhorn's scaling updates, the Newton iteration for the SOFT top-k
threshold, the DEQ fixed-point solvers and the Newton–Schulz iterations of
the matrix square root all have the same shape: a batch of independent
problems, each advanced by the same map until its own stopping test holds.
They are written here as three explicit pieces,

.. code-block:: text

    state            = init(...)                       the operator builds it
    state            = advance(state, active, k)       k iterations of the active members
    (error, done)    = measure(state)                  per member, on the device

and :func:`iterate` runs them:

.. code-block:: text

    it = 0, active = all members
    repeat
        k      = min(check_every, max_iter - it)
        state  = advance(state, active, k);  it += k
        error, done = measure(state)                   (recorded for the active members)
        n_iter = it for the active members;  active = active and not done
    until it = max_iter or (a host read is due and no member is active)

A member stops at the first check at which its test holds, and from then on
``advance`` must leave it unchanged (mask it with ``active``), so the state a
member ends in, its iteration count and its error are those it gets when
solved alone: a batch equals a loop.

How often the host reads "is any member still active" is the device policy's
decision (:meth:`refimpl.backend.DevicePolicy.sync_cadence`): on the host a
read is free and happens at every check; where a read waits for queued device
work (CuPy, torch on CUDA), every ``sync_every``-th check.  ``advance`` then
may be called for a batch in which every member has stopped and must tolerate
that (the masks make it a no-op).

Diagnostics
-----------
Every iterative operator reports the same three per-member arrays, of the
batch shape (0-d for an unbatched input):

``n_iter``     iterations run until the member stopped,
``error``      its error measure at the last check (the operator documents which),
``converged``  whether its stopping test held,

and the whole-batch summary of :class:`Diagnostics`: ``all_converged``,
``max_error``, ``max_n_iter``, ``n_converged``, ``size``.  Result objects
of the operators carry the three arrays as fields and inherit the summary
from :class:`Converging`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from . import backend

__all__ = ["Converging", "Diagnostics", "Schedule", "iterate"]


class Converging:
    """Whole-batch summary of the per-member fields ``n_iter``, ``error``,
    ``converged`` (arrays of the batch shape) of a result object.

    Each property reads the device once (a host sync on a GPU).
    """

    n_iter: Any
    error: Any
    converged: Any

    @property
    def all_converged(self) -> bool:
        """Every member met its stopping test."""
        return backend.all_true(self.converged)

    @property
    def n_converged(self) -> int:
        """How many members met their stopping test."""
        return backend.count_true(self.converged)

    @property
    def size(self) -> int:
        """The number of batch members."""
        return math.prod(tuple(self.converged.shape))

    @property
    def max_error(self) -> float:
        """The largest member error (NaN if any member's error is NaN)."""
        xp = backend.namespace(error=self.error)
        return backend.to_float(xp.max(self.error)) if self.size else 0.0

    @property
    def max_n_iter(self) -> int:
        """The most iterations any member ran."""
        xp = backend.namespace(n_iter=self.n_iter)
        return int(xp.max(self.n_iter)) if self.size else 0

    def summary(self) -> dict:
        """``{size, n_converged, all_converged, max_error, max_n_iter}`` as
        Python scalars."""
        return {"size": self.size, "n_converged": self.n_converged,
                "all_converged": self.all_converged, "max_error": self.max_error,
                "max_n_iter": self.max_n_iter}


@dataclass(frozen=True)
class Diagnostics(Converging):
    """Per-member diagnostics of one :func:`iterate` run.

    Attributes
    ----------
    n_iter : int64 array (batch shape), iterations run until the member stopped.
    error : array (batch shape), the member's error at its last check.
    converged : bool array (batch shape), whether its stopping test held.
    """

    n_iter: Any
    error: Any
    converged: Any


@dataclass(frozen=True)
class Schedule:
    """When :func:`iterate` measures and when it reads the host.

    Attributes
    ----------
    max_iter : the iteration limit; the state at ``max_iter`` is always
        measured.
    check_every : iterations between measurements (device work only).
    sync_every : measurements between host reads of "any member active".
    measure_initial : also measure the initial state (check 0): members
        whose test holds there stop with ``n_iter = 0``.
    """

    max_iter: int
    check_every: int = 1
    sync_every: int = 1
    measure_initial: bool = False

    @staticmethod
    def for_policy(policy: backend.DevicePolicy, *, max_iter: int, check_every: int = 1,
                   on_device: int = 1) -> "Schedule":
        """The schedule of ``policy``: a host read at every check on the host,
        every ``on_device``-th check where reads wait for the device."""
        return Schedule(max_iter=max_iter, check_every=check_every,
                        sync_every=policy.sync_cadence(on_device))


def iterate(advance: Callable[[Any, Any, int], Any],
            measure: Callable[[Any], tuple],
            state: Any, *, batch: tuple[int, ...], like, schedule: Schedule,
            error_dtype=None) -> tuple[Any, Diagnostics]:
    """Run ``advance`` on the active members until each one's test holds.

    Parameters
    ----------
    advance : ``advance(state, active, k) -> state``: ``k`` iterations of the
        members where the bool array ``active`` (batch shape) is true; the
        others must come back unchanged.
    measure : ``measure(state)`` returns ``(error, done)`` or
        ``(error, done, failed)``, arrays of the batch shape: each member's
        error, whether its test holds, and (optionally) whether it must stop
        without converging (a non-finite value, say).
    state : the initial state (built by the operator).
    batch : the batch shape.
    like : an array whose namespace and device the diagnostics use.
    schedule : :class:`Schedule`.
    error_dtype : dtype of ``error`` (default ``like.dtype``).

    Returns
    -------
    (state, Diagnostics) with ``converged = done and not failed`` at each
    member's last check.

    Examples
    --------
    Heron's iteration ``x <- (x + c / x) / 2`` for two square roots at once;
    the member with ``c = 1`` starts at its root and stops at the first check:

    >>> import numpy as np
    >>> c = np.array([1.0, 2.0])
    >>> def advance(x, active, k):
    ...     for _ in range(k):
    ...         x = np.where(active, 0.5 * (x + c / x), x)
    ...     return x
    >>> def measure(x):
    ...     err = np.abs(x * x - c) / c
    ...     return err, err <= 1e-15
    >>> x, diag = iterate(advance, measure, np.ones(2), batch=(2,), like=c,
    ...                   schedule=Schedule(max_iter=50))
    >>> bool(np.all(np.abs(x * x - c) <= 1e-15 * c)), diag.n_iter.tolist()
    (True, [1, 5])
    """
    xp = backend.namespace(like=like)
    dev = backend.device(like)
    dt = like.dtype if error_dtype is None else error_dtype
    rec = _Record(xp.ones(batch, dtype=xp.bool, device=dev),
                  xp.full(batch, math.inf, dtype=dt, device=dev),
                  xp.zeros(batch, dtype=xp.int64, device=dev),
                  xp.zeros(batch, dtype=xp.bool, device=dev))
    size = math.prod(batch)
    it = checks = 0
    running = size                 # members known (on the host) to be running; -1: not read
    if schedule.measure_initial:
        rec = _check(xp, rec, measure(state), 0, 0, every=True)
        running = backend.count_true(rec.active)
        if schedule.max_iter == 0 or running == 0:
            return state, rec.diagnostics(xp, dt)
    while it < schedule.max_iter:
        k = min(schedule.check_every, schedule.max_iter - it)
        state = advance(state, rec.active, k)
        it += k
        checks += 1
        rec = _check(xp, rec, measure(state), it, k, every=running == size)
        running = -1
        if it < schedule.max_iter and checks % schedule.sync_every == 0:
            running = backend.count_true(rec.active)
            if running == 0:
                break
    return state, rec.diagnostics(xp, dt)


class _Record(NamedTuple):
    """The driver's per-member bookkeeping: who is still running, and the
    error, iteration count and verdict at each member's last check (arrays of
    the batch shape, or NumPy scalars for an unbatched NumPy problem: what
    NumPy's reductions to 0-d give).  A NamedTuple: one is made per check,
    and it builds a few times faster than a frozen dataclass."""

    active: Any
    error: Any
    n_iter: Any
    converged: Any

    def diagnostics(self, xp, error_dtype) -> Diagnostics:
        return Diagnostics(n_iter=xp.asarray(self.n_iter), error=xp.asarray(self.error, dtype=error_dtype),
                           converged=xp.asarray(self.converged))


def _check(xp, rec: _Record, measured, it: int, k: int, *, every: bool) -> _Record:
    """Record the members still running at check ``it`` (``k`` iterations
    after the last), then retire those whose test holds or that failed.
    ``every``: the host knows that every member is running, so the record is
    the check itself, without masks (each member's count was ``it - k``)."""
    measured = tuple(measured)
    err, done = measured[0], measured[1]
    failed = measured[2] if len(measured) > 2 else None
    stop = done if failed is None else done | failed
    verdict = done if failed is None else done & ~failed
    if every:
        return _Record(active=~stop, error=err, n_iter=rec.n_iter + k, converged=verdict)
    a = rec.active
    return _Record(active=a & ~stop,
                   error=xp.where(a, err, rec.error),
                   n_iter=xp.where(a, xp.full_like(rec.n_iter, it), rec.n_iter),
                   converged=xp.where(a, verdict, rec.converged))
