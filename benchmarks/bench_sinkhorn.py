"""Sinkhorn: implicit vs unrolled backward, and the forward against POT and OTT-JAX.

Run as ``refimpl bench sinkhorn`` (or ``python benchmarks/bench_sinkhorn.py``).

Part 1 - backward (float64, CPU, n = m = 500 by default).  For each
``tau in {10, 100, 1000}`` the forward runs exactly ``tau`` iterations
(``tol=0``; it stops earlier only if it reaches round-off).  Compared, side
by side in one run:

* implicit ``sinkhorn_vjp`` (methods ``schur`` and ``cg``) at ``P(tau)``;
* unrolled: ``sinkhorn_unrolled`` (forward recording the tape) +
  ``sinkhorn_unrolled_vjp`` (hand-written reverse pass), i.e. what reverse-mode
  autodiff through the iterations does.

Reported per row: the backward time (implicit: the VJP; unrolled: the reverse
pass) and the forward time (implicit: plain ``sinkhorn``; unrolled: the
forward with its tape), best of ``--repeat`` runs; the peak memory of
differentiation measured with ``tracemalloc`` (which sees NumPy's
allocations) in a separate run: for the implicit VJP the peak above the
memory held before the call, for unrolled the peak of forward-with-tape plus
reverse pass (the tape is the memory differentiation costs); the normwise
relative error of ``C_bar`` and of the gauge-fixed ``(a_bar, b_bar)`` against
the implicit gradient of the converged plan (tol 1e-13).

Part 2 - forward: ``refimpl.sinkhorn`` against POT's ``ot.bregman.sinkhorn_log``
at equal tolerance ``--tol``.  Ours stops on the relative L1 marginal error,
POT on the 2-norm of the column marginal error (<= the L1 norm for probability
marginals, so POT's rule is the weaker one); both check every 10 iterations.
The final L1 marginal error of both plans is recomputed identically.

Part 3 - forward against POT and OTT-JAX (``--peer-n``, ``--peer-eps``;
``--only-peers`` runs just this part): float64, n in {200, 500, 2000}, eps in
{0.05, 0.01}, every solver's stopping rule at least as strict as refimpl's on
the L1 column error (see :func:`bench_peers`), the achieved L1 marginal error
of every plan recomputed identically, OTT compiled before timing, refimpl,
OTT and the floors timed alike, in interleaved rounds (best of at least 10
rounds after a warm-up round, :func:`interleaved_best`).  Each
row prints the time ratios from that one run and each solver's per-iteration
cost against the measured floor of the work its method must do: two
matrix-vector products with an n x n matrix (refimpl's scaling domain) or two
elementwise exponentials of an n x n array (log domain: POT, OTT); for
refimpl also the loop alone, ``(t - t_1) / (iterations - 1)`` with ``t_1``
the time of a call with ``max_iter=1`` (setup, one iteration, one check),
and that setup time.  Then the
forward + gradient of ``<P, G>`` at n = 500 against ``jax.grad`` through
OTT's solver (implicit differentiation), with each gradient's error against
refimpl's at tol 1e-13 (``--grad-n``).  OTT-JAX is optional (``pip install
ott-jax``): without it those columns are left out.

Part 4 (``--backend cupy``) - forward and implicit backward on the GPU, the
device synchronised before every clock reading; errors against the NumPy
gradient.  ``--backend cupy_semantics`` runs the same on the CPU double of
CuPy (a test of the path; its timings mean nothing).

Results are printed as tables and written to ``bench-results/sinkhorn.json``.
Timings depend on the machine; ratios are measured side by side in one run.
On a shared machine, multi-threaded BLAS (the dense eigen/LU steps of
``schur``) can be slowed by orders of magnitude by oversubscription: run with
``OPENBLAS_NUM_THREADS=1`` (the header prints the setting) for stable ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

from refimpl import backend
from refimpl import sinkhorn as sk
from refimpl.backend import (ConditioningWarning, ConvergenceWarning, backend_status, get_backend,
                             to_host)


def problem(n: int, seed: int = 0):
    """Squared distances between two clouds of n uniform points in the unit
    square; uniform marginals."""
    rng = np.random.default_rng(seed)
    x, y = rng.random((n, 2)), rng.random((n, 2))
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    a = np.full(n, 1.0 / n)
    G = rng.standard_normal((n, n))
    return C, a, a.copy(), G


def best_time(fn, repeat: int, sync=lambda: None):
    """Best wall time of ``repeat`` calls of ``fn`` and its last result; ``sync``
    (a device synchronisation) runs before each clock reading, so queued
    device work is inside the timed region and nothing earlier is."""
    best, out = math.inf, None
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_device(be, n: int, eps: float, taus, repeat: int, methods=("schur", "cg")) -> list[dict]:
    """Forward (``tau`` iterations) and implicit backward on a device backend
    (``be``: CuPy, or its CPU double), every timed region between device
    syncs; errors against the NumPy gradient of the converged plan.  A method
    that fails gives a row with its error, the others are kept."""
    C, a, b, G = problem(n)
    ref = sk.sinkhorn_vjp(sk.sinkhorn(C, a, b, eps=eps, tol=1e-13, max_iter=100_000), G)
    Cd, ad, bd, Gd = (be.asarray(x, "float64") for x in (C, a, b, G))
    best_time(lambda: sk.sinkhorn(Cd, ad, bd, eps=eps, tol=0.0, max_iter=2, warn=False),
              1, be.synchronize)                                           # warm-up (kernels)
    rows = []
    for tau in taus:
        try:
            t_fwd, res = best_time(lambda: sk.sinkhorn(Cd, ad, bd, eps=eps, tol=0.0, max_iter=tau,
                                                       check_every=min(10, tau), warn=False),
                                   repeat, be.synchronize)
        except Exception as exc:
            rows.append(dict(tau=tau, method="forward", skipped=f"failed: {type(exc).__name__}: {exc}"))
            continue
        for method in methods:
            try:
                t_bwd, bars = best_time(lambda: sk.sinkhorn_vjp(res, Gd, method=method, warn=False),
                                        repeat, be.synchronize)
                e_c, e_ab = grad_errors(tuple(to_host(x) for x in bars), ref)
            except Exception as exc:
                rows.append(dict(tau=tau, method=f"implicit-{method}",
                                 skipped=f"failed: {type(exc).__name__}: {exc}"))
                continue
            rows.append(dict(tau=tau, method=f"implicit-{method}", fwd_s=t_fwd, bwd_s=t_bwd,
                             total_s=t_fwd + t_bwd, err_C=e_c, err_ab=e_ab,
                             forward_error=float(res.error), n_iter=int(res.n_iter)))
    return rows


def traced_peak(fn):
    """Peak bytes allocated during ``fn()`` above what was held before it."""
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base, out


def available_bytes() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return math.inf


def rel_err(x, ref) -> float:
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def grad_errors(bars, ref) -> tuple[float, float]:
    a_bar, b_bar = sk.gauge_fix(bars[1], bars[2])
    ab = np.concatenate([a_bar, b_bar])
    ab_ref = np.concatenate([ref[1], ref[2]])
    return rel_err(bars[0], ref[0]), rel_err(ab, ab_ref)


def bench_backward(n: int, eps: float, taus, repeat: int, methods=("schur", "cg")) -> list[dict]:
    C, a, b, G = problem(n)
    ref_res = sk.sinkhorn(C, a, b, eps=eps, tol=1e-13, max_iter=100_000)
    ref = sk.sinkhorn_vjp(ref_res, G)
    rows = []
    for tau in taus:
        t_fwd, res = best_time(lambda: sk.sinkhorn(C, a, b, eps=eps, tol=0.0, max_iter=tau,
                                                   check_every=min(10, tau), warn=False), repeat)
        fwd_err = float(res.error)
        for method in methods:
            call = lambda: sk.sinkhorn_vjp(res, G, method=method, warn=False)  # noqa: E731
            t_bwd, bars = best_time(call, repeat)
            mem, _ = traced_peak(call)
            e_c, e_ab = grad_errors(bars, ref)
            rows.append(dict(tau=tau, method=f"implicit-{method}", fwd_s=t_fwd, bwd_s=t_bwd,
                             total_s=t_fwd + t_bwd, peak_mb=mem / 2 ** 20, err_C=e_c, err_ab=e_ab,
                             forward_error=fwd_err, n_iter=int(res.n_iter)))
        need = (2 * tau - 1) * n * n * 8
        if need * 1.5 > available_bytes():
            rows.append(dict(tau=tau, method="unrolled", skipped=f"needs ~{need / 2 ** 30:.1f} GiB for the tape, "
                                                                 f"{available_bytes() / 2 ** 30:.1f} GiB available"))
            continue
        t_uf, t_ub = math.inf, math.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            un = sk.sinkhorn_unrolled(C, a, b, eps=eps, n_iter=tau)
            t1 = time.perf_counter()
            bars = sk.sinkhorn_unrolled_vjp(un, G)
            t2 = time.perf_counter()
            t_uf, t_ub = min(t_uf, t1 - t0), min(t_ub, t2 - t1)
            tape = un.tape_nbytes
            del un
        mem, bars = traced_peak(lambda: sk.sinkhorn_unrolled_vjp(sk.sinkhorn_unrolled(C, a, b, eps=eps, n_iter=tau), G))
        e_c, e_ab = grad_errors(bars, ref)
        rows.append(dict(tau=tau, method="unrolled", fwd_s=t_uf, bwd_s=t_ub, total_s=t_uf + t_ub,
                         peak_mb=mem / 2 ** 20, tape_mb=tape / 2 ** 20, err_C=e_c, err_ab=e_ab,
                         forward_error=fwd_err, n_iter=tau))
    return rows


def bench_forward(n: int, eps_list, tol: float, repeat: int) -> list[dict]:
    try:
        import ot
    except ImportError:
        return [dict(skipped="POT not installed (pip install pot)")]
    C, a, b, _ = problem(n, seed=1)
    rows = []
    for eps in eps_list:
        t_ours, res = best_time(lambda: sk.sinkhorn(C, a, b, eps=eps, tol=tol, max_iter=100_000), repeat)
        t_pot, (P_pot, log) = best_time(lambda: ot.bregman.sinkhorn_log(
            a, b, C, eps, numItermax=100_000, stopThr=tol, log=True, warn=False), repeat)
        err = lambda P: float((np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum()) / b.sum())  # noqa: E731
        rows.append(dict(eps=eps, tol=tol, ours_s=t_ours, pot_s=t_pot, ratio_pot_over_ours=t_pot / t_ours,
                         ours_iter=int(res.n_iter), pot_iter=int(log["niter"]) + 1,
                         ours_l1_error=err(res.P), pot_l1_error=err(P_pot),
                         max_plan_diff=float(np.abs(res.P - P_pot).max())))
    return rows


# --------------------------------------------------------------------------
# Part 3 - forward against POT and OTT-JAX, per-iteration cost against a floor
# --------------------------------------------------------------------------

def l1_marginal_error(P, a, b) -> float:
    """``(||P 1 - a||_1 + ||P^T 1 - b||_1) / ||b||_1``, computed the same way for every solver."""
    P = np.asarray(P)
    return float((np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum()) / b.sum())


def interleaved_best(fns, repeat: int, round_s: float = 0.01) -> list[tuple[float, object]]:
    """``(best mean time of a call, last result)`` of each function in
    ``fns``, timed in interleaved rounds.

    A round makes as many calls of a function as take about ``round_s``
    seconds (at least one): a kernel of a few microseconds timed a few times
    otherwise measures the machine's state (clock, caches, other processes)
    more than its own cost.  After a warm-up round, ``max(repeat, 10)`` rounds
    run the functions one after the other, and each keeps its best round.
    Interleaving puts every function through the same slow and fast spells
    of a shared machine, so the ratios of the bests do not depend on which
    function happened to run during a slow one.
    """
    inner, outs = [], []
    for fn in fns:
        t0 = time.perf_counter()
        outs.append(fn())
        inner.append(max(1, min(10_000, int(round_s / max(time.perf_counter() - t0, 1e-7)))))
    for fn, k in zip(fns, inner):                        # warm-up round
        for _ in range(k):
            fn()
    best = [math.inf] * len(fns)
    for _ in range(max(repeat, 10)):
        for i, (fn, k) in enumerate(zip(fns, inner)):
            t0 = time.perf_counter()
            for _ in range(k):
                outs[i] = fn()
            best[i] = min(best[i], (time.perf_counter() - t0) / k)
    return list(zip(best, outs))


def iteration_floors(C, eps: float):
    """The floors of one Sinkhorn iteration on an n x m float64 array, as
    callables: ``(exp2, matvec2, serial)``.

    ``exp2``: two elementwise exponentials written into a preallocated
    array, the least a log-domain iteration (two full-size log-sum-exps)
    does; ``matvec2``: ``K v`` and ``K^T u``, the least a scaling-domain
    iteration does, ``K`` starting on a cache line
    (:func:`refimpl.backend.cache_aligned`: the fastest layout, which the
    forward's kernel has too) and the products written into preallocated
    arrays by the bound methods ``K.dot`` and ``K.T.dot`` (the cheapest NumPy
    form of them: a few tenths of a microsecond per product below ``K @ v``
    and ``np.dot`` at n = 200).  ``serial``: whether refimpl's forward runs
    BLAS on one thread at this size (:func:`refimpl.backend.single_threaded_blas`);
    time ``matvec2`` under the same setting.
    """
    from refimpl import backend

    X = -C / eps
    out = np.empty_like(X)
    K = backend.cache_aligned(np.exp(X))
    u, v = np.ones(C.shape[0]), np.ones(C.shape[1])
    Kv, Ktu = np.empty_like(u), np.empty_like(v)
    mv, rmv = K.dot, K.T.dot

    def exp2():
        np.exp(X, out=out)
        np.exp(X, out=out)

    def matvec2():
        mv(v, out=Kv)
        rmv(u, out=Ktu)
    return exp2, matvec2, K.size <= backend.SERIAL_MATVEC_ENTRIES


def ott_solver(eps: float, tol: float, max_iter: int):
    """A jitted OTT-JAX Sinkhorn (float64, log domain, L1 column-error rule
    checked every 10 iterations, as refimpl's), or None when not installed."""
    try:
        with warnings.catch_warnings():               # OTT's dependencies announce deprecations
            warnings.simplefilter("ignore", DeprecationWarning)
            import jax
            jax.config.update("jax_enable_x64", True)
            from ott.geometry import geometry
            from ott.problems.linear import linear_problem
            from ott.solvers.linear import sinkhorn as ott_sinkhorn
    except ImportError:
        return None
    solver = ott_sinkhorn.Sinkhorn(threshold=tol, norm_error=1, inner_iterations=10,
                                   max_iterations=max_iter)

    @jax.jit
    def solve(C, a, b):
        out = solver(linear_problem.LinearProblem(geometry.Geometry(cost_matrix=C, epsilon=eps), a=a, b=b))
        return out.matrix, out.n_iters

    def run(C, a, b):
        P, it = jax.block_until_ready(solve(C, a, b))
        return np.asarray(P), int(it)
    return run


def bench_peers(ns, eps_list, tol: float, repeat: int, pot_max_n: int) -> list[dict]:
    """refimpl, POT's ``sinkhorn_log`` and OTT-JAX side by side in one run.

    Every solver stops on its own rule made at least as strict as refimpl's
    ``tol`` on the relative L1 column error: OTT with the L1 norm and ``tol``;
    POT (2-norm of the column error) with ``tol / sqrt(m)``, since
    ``||x||_1 <= sqrt(m) ||x||_2``.  The achieved L1 marginal error of every
    plan is recomputed identically and reported next to its time; the
    per-iteration cost is compared with the floors of :func:`iteration_floors`
    (refimpl, scaling domain: two matrix-vector products; POT and OTT, log
    domain: two exponentials).  OTT is compiled before timing.  refimpl, OTT
    and the floors are timed alike, in interleaved rounds
    (:func:`interleaved_best`: at least 10 rounds after a warm-up); POT, much slower, by the best of ``repeat - 1``
    calls, and only up to ``n = pot_max_n`` (above it its log-domain
    iterations take minutes).
    """
    try:
        import ot
    except ImportError:
        ot = None
    rows = []
    for n in ns:
        C, a, b, _ = problem(n, seed=1)
        for eps in eps_list:
            exp2, matvec2, serial = iteration_floors(C, eps)

            def full():
                return sk.sinkhorn(C, a, b, eps=eps, tol=tol, max_iter=100_000, warn=False)

            def setup():
                # Setup (input checks, the first absorbed row update, the final
                # plan) plus one iteration and its check; the rest is the loop.
                return sk.sinkhorn(C, a, b, eps=eps, tol=tol, max_iter=1, warn=False)
            with backend.single_threaded_blas(C, serial):
                (t_exp2, _), (t_mv2, _), (t, res), (t1, _) = interleaved_best([exp2, matvec2, full, setup],
                                                                              repeat)
            it = int(res.n_iter)
            loop = max(t - t1, 0.0) / max(it - 1, 1)
            row = dict(n=n, eps=eps, tol=tol, exp2_s=t_exp2, matvec2_s=t_mv2,
                       refimpl_s=t, refimpl_iter=it, refimpl_l1=l1_marginal_error(res.P, a, b),
                       refimpl_floor_ratio=t / it / t_mv2, refimpl_setup_s=t1,
                       refimpl_loop_floor_ratio=loop / t_mv2)
            # OTT is timed on its own: JAX's worker threads stay busy for a
            # while after a call returns and would slow whatever runs next.
            ott = ott_solver(eps, tol, 100_000)
            if ott is not None:
                import jax.numpy as jnp
                args = tuple(jnp.asarray(x) for x in (C, a, b))
                ott(*args)                                           # compile
                ((t_o, (P_o, it_o)),) = interleaved_best([lambda: ott(*args)], repeat)
                row.update(ott_s=t_o, ott_iter=it_o, ott_l1=l1_marginal_error(P_o, a, b),
                           ott_floor_ratio=t_o / it_o / t_exp2, refimpl_over_ott=t / t_o,
                           refimpl_over_ott_per_iter=(t / it) / (t_o / it_o))
            if ot is not None and n <= pot_max_n:
                t_p, (P_p, log) = best_time(lambda: ot.bregman.sinkhorn_log(
                    a, b, C, eps, numItermax=100_000, stopThr=tol / math.sqrt(n), log=True, warn=False),
                    max(1, repeat - 1))
                it_p = int(log["niter"]) + 1
                row.update(pot_s=t_p, pot_iter=it_p, pot_l1=l1_marginal_error(P_p, a, b),
                           pot_floor_ratio=t_p / it_p / t_exp2, pot_over_refimpl=t_p / t)
            rows.append(row)
            print(fmt_peer_row(row), flush=True)
    return rows


def fmt_peer_row(r: dict) -> str:
    out = (f"n={r['n']:5d} eps={r['eps']:<5g} floors: 2 exp {r['exp2_s'] * 1e3:7.2f} ms, 2 matvec "
           f"{r['matvec2_s'] * 1e3:7.2f} ms | refimpl {r['refimpl_s']:7.3f} s {r['refimpl_iter']:5d} it "
           f"L1 {r['refimpl_l1']:.1e} ({r['refimpl_floor_ratio']:.2f}x floor/it; loop "
           f"{r['refimpl_loop_floor_ratio']:.2f}x, setup {r['refimpl_setup_s'] * 1e3:.2f} ms)")
    if "ott_s" in r:
        out += (f" | OTT {r['ott_s']:7.3f} s {r['ott_iter']:5d} it L1 {r['ott_l1']:.1e} "
                f"({r['ott_floor_ratio']:.2f}x floor/it) | refimpl/OTT time x{r['refimpl_over_ott']:.2f} "
                f"(per it x{r['refimpl_over_ott_per_iter']:.2f})")
    if "pot_s" in r:
        out += (f" | POT {r['pot_s']:7.3f} s {r['pot_iter']:5d} it L1 {r['pot_l1']:.1e} "
                f"({r['pot_floor_ratio']:.2f}x floor/it) | POT/refimpl x{r['pot_over_refimpl']:.2f}")
    return out


def bench_gradient_vs_ott(n: int, eps: float, tol: float, repeat: int) -> dict:
    """Forward + gradient of ``L = <P, G>`` w.r.t. ``C``: refimpl's
    ``sinkhorn`` + ``sinkhorn_vjp`` (schur) against ``jax.grad`` through
    OTT-JAX's solver (its default implicit differentiation), both at ``tol``;
    each gradient's normwise error against refimpl's at tol 1e-13."""
    try:
        import jax
        import jax.numpy as jnp
        jax.config.update("jax_enable_x64", True)
        from ott.geometry import geometry
        from ott.problems.linear import linear_problem
        from ott.solvers.linear import sinkhorn as ott_sinkhorn
    except ImportError:
        return dict(skipped="OTT-JAX not installed (pip install ott-jax)")
    C, a, b, G = problem(n, seed=2)
    ref = sk.sinkhorn_vjp(sk.sinkhorn(C, a, b, eps=eps, tol=1e-13, max_iter=100_000), G)[0]

    def ours():
        return sk.sinkhorn_vjp(sk.sinkhorn(C, a, b, eps=eps, tol=tol, max_iter=100_000, warn=False), G,
                               warn=False)[0]

    solver = ott_sinkhorn.Sinkhorn(threshold=tol, norm_error=1, inner_iterations=10, max_iterations=100_000)
    aj, bj, Gj = (jnp.asarray(x) for x in (a, b, G))

    def loss(Cj):
        out = solver(linear_problem.LinearProblem(geometry.Geometry(cost_matrix=Cj, epsilon=eps), a=aj, b=bj))
        return jnp.sum(out.matrix * Gj)

    grad = jax.jit(jax.grad(loss))
    Cj = jnp.asarray(C)
    jax.block_until_ready(grad(Cj))                                  # compile
    t_r, g_r = best_time(ours, repeat)
    t_o, g_o = best_time(lambda: np.asarray(jax.block_until_ready(grad(Cj))), repeat)
    return dict(n=n, eps=eps, tol=tol, refimpl_s=t_r, ott_s=t_o, refimpl_over_ott=t_r / t_o,
                refimpl_err=rel_err(g_r, ref), ott_err=rel_err(g_o, ref))


def fmt_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = [c[1] for c in cols]
    body = []
    for r in rows:
        if "skipped" in r:
            body.append([str(r.get(cols[0][0], "")), str(r.get(cols[1][0], "")), "skipped: " + r["skipped"]]
                        + [""] * (len(cols) - 3))
            continue
        body.append([format(r[k], f) if k in r else "" for k, _, f in cols])
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def summarize(back: list[dict], fwd: list[dict]) -> list[str]:
    out = []
    by = {(r["tau"], r["method"]): r for r in back if "skipped" not in r}
    taus = sorted({r["tau"] for r in back})
    for tau in taus:
        u = by.get((tau, "unrolled"))
        for method in ("implicit-schur", "implicit-cg"):
            i = by.get((tau, method))
            if u and i:
                out.append(f"tau={tau}: unrolled/{method}: backward time x{u['bwd_s'] / i['bwd_s']:.1f}, "
                           f"total time x{u['total_s'] / i['total_s']:.1f}, "
                           f"peak memory x{u['peak_mb'] / max(i['peak_mb'], 1e-9):.0f}")
    mems = {m: [by[(t, m)]["peak_mb"] for t in taus if (t, m) in by] for m in ("implicit-schur", "implicit-cg")}
    for m, v in mems.items():
        if v:
            out.append(f"{m} peak memory over tau: {min(v):.1f} .. {max(v):.1f} MB (independent of tau)")
    for r in fwd:
        if "skipped" not in r:
            out.append(f"forward eps={r['eps']}: POT sinkhorn_log / refimpl time x{r['ratio_pot_over_ours']:.2f} "
                       f"({r['pot_iter']} vs {r['ours_iter']} iterations)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_sinkhorn", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=500, help="n = m (default 500)")
    p.add_argument("--eps", type=float, default=0.02, help="temperature of the backward benchmark")
    p.add_argument("--taus", type=str, default="10,100,1000", help="iteration counts")
    p.add_argument("--forward-eps", type=str, default="0.05,0.02", help="temperatures of the POT comparison")
    p.add_argument("--tol", type=float, default=1e-9, help="forward tolerance of the POT comparison")
    p.add_argument("--repeat", type=int, default=3, help="timing repeats (best is kept)")
    p.add_argument("--peer-n", type=str, default="200,500,2000",
                   help="sizes of the forward comparison with POT and OTT-JAX ('' = skip it)")
    p.add_argument("--peer-eps", type=str, default="0.05,0.01", help="temperatures of that comparison")
    p.add_argument("--pot-max-n", type=int, default=2000, help="largest n POT is timed at")
    p.add_argument("--grad-n", type=int, default=500,
                   help="n of the gradient comparison with OTT-JAX (0 = skip it)")
    p.add_argument("--only-peers", action="store_true", help="run only the comparisons with POT and OTT-JAX")
    p.add_argument("--quick", action="store_true", help="smoke run: n=60, taus 5,20,50, one repeat")
    p.add_argument("--out", type=str, default="bench-results/sinkhorn.json", help="JSON output path ('' = none)")
    p.add_argument("--backend", choices=("numpy", "cupy", "cupy_semantics"), default="numpy",
                   help="numpy: the tables above; cupy: forward and implicit backward on the GPU "
                        "(cupy_semantics: the same on the CPU double of CuPy, to test the path)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.taus, args.repeat, args.forward_eps = 60, "5,20,50", 1, "0.1"
        args.peer_n, args.peer_eps, args.grad_n = "60", "0.1", 0
    taus = [int(t) for t in args.taus.split(",")]
    feps = [float(e) for e in args.forward_eps.split(",")]
    if args.backend != "numpy":
        return main_device(args, taus)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", ConditioningWarning)
        threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, BLAS threads: {threads}"
        back, fwd, peers, grad = [], [], [], {}
        if not args.only_peers:
            print(f"Sinkhorn backward: n = m = {args.n}, eps = {args.eps}, float64, NumPy on CPU ({machine})",
                  flush=True)
            back, fwd = run_backward_and_pot(args, taus, feps)
        else:
            print(f"NumPy on CPU ({machine})", flush=True)
        if args.peer_n:
            print(f"\nSinkhorn forward against POT and OTT-JAX (float64, tol = {args.tol}; refimpl, OTT "
                  f"and floors: best of {max(args.repeat, 10)} rounds after a warm-up, POT: best of "
                  f"{max(1, args.repeat - 1)}); floors: two exponentials / two matrix-vector products of "
                  f"one n x n array", flush=True)
            peers = bench_peers([int(x) for x in args.peer_n.split(",")],
                                [float(x) for x in args.peer_eps.split(",")], args.tol, args.repeat, args.pot_max_n)
        if args.grad_n:
            grad = bench_gradient_vs_ott(args.grad_n, 0.05, args.tol, args.repeat)
            print("\nforward + gradient of <P, G> against OTT-JAX (jax.grad, implicit diff): "
                  + json.dumps(grad), flush=True)

    lines = summarize(back, fwd)
    print("\n" + "\n".join(lines))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(n=args.n, eps=args.eps, backward=back, forward=fwd, peers=peers,
                                        gradient_vs_ott=grad, summary=lines, numpy=np.__version__,
                                        python=sys.version.split()[0]), indent=2))
        print(f"wrote {path}")
    return 0


def main_device(args, taus) -> int:
    ok, reason = backend_status(args.backend)
    if not ok:
        print(f"bench_sinkhorn: backend {args.backend} is not usable: {reason}", file=sys.stderr)
        return 2
    be = get_backend(args.backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", ConditioningWarning)
        print(f"Sinkhorn on {be.name} ({be.device!r}): n = m = {args.n}, eps = {args.eps}, float64, "
              f"best of {args.repeat}, device synchronised around every timed region", flush=True)
        rows = bench_device(be, args.n, args.eps, taus, args.repeat)
    print(fmt_table(rows, [("tau", "tau", "d"), ("method", "method", "s"), ("bwd_s", "backward s", ".4f"),
                           ("fwd_s", "forward s", ".4f"), ("err_C", "err C_bar", ".1e"),
                           ("err_ab", "err (a,b)_bar", ".1e"), ("forward_error", "fwd L1 err", ".1e")]))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(n=args.n, eps=args.eps, backend=be.name, device=repr(be.device),
                                        rows=rows, numpy=np.__version__), indent=2))
        print(f"wrote {path}")
    return 0 if all("skipped" not in r for r in rows) else 1


def run_backward_and_pot(args, taus, feps):
    """Parts 1 and 2 (printed); returns their rows."""
    back = bench_backward(args.n, args.eps, taus, args.repeat)
    print(fmt_table(back, [("tau", "tau", "d"), ("method", "method", "s"), ("bwd_s", "backward s", ".4f"),
                           ("fwd_s", "forward s", ".4f"), ("peak_mb", "peak MB", ".1f"),
                           ("err_C", "err C_bar", ".1e"), ("err_ab", "err (a,b)_bar", ".1e"),
                           ("forward_error", "fwd L1 err", ".1e")]))
    print(f"\nSinkhorn forward vs POT ot.bregman.sinkhorn_log: n = m = {args.n}, tol = {args.tol}", flush=True)
    fwd = bench_forward(args.n, feps, args.tol, max(1, args.repeat - 1))
    print(fmt_table(fwd, [("eps", "eps", "g"), ("ours_s", "refimpl s", ".3f"), ("pot_s", "POT s", ".3f"),
                          ("ratio_pot_over_ours", "POT/refimpl", ".2f"), ("ours_iter", "iters", "d"),
                          ("pot_iter", "POT iters", "d"), ("ours_l1_error", "L1 err", ".1e"),
                          ("pot_l1_error", "POT L1 err", ".1e")]))
    return back, fwd


if __name__ == "__main__":
    sys.exit(main())
