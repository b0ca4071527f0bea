"""Sinkhorn: implicit vs unrolled backward, and the forward against POT.

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

Part 3 (``--backend cupy``) - forward and implicit backward on the GPU, the
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
    p.add_argument("--quick", action="store_true", help="smoke run: n=60, taus 5,20,50, one repeat")
    p.add_argument("--out", type=str, default="bench-results/sinkhorn.json", help="JSON output path ('' = none)")
    p.add_argument("--backend", choices=("numpy", "cupy", "cupy_semantics"), default="numpy",
                   help="numpy: the tables above; cupy: forward and implicit backward on the GPU "
                        "(cupy_semantics: the same on the CPU double of CuPy, to test the path)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.taus, args.repeat, args.forward_eps = 60, "5,20,50", 1, "0.1"
    taus = [int(t) for t in args.taus.split(",")]
    feps = [float(e) for e in args.forward_eps.split(",")]
    if args.backend != "numpy":
        return main_device(args, taus)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", ConditioningWarning)
        threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
        print(f"Sinkhorn backward: n = m = {args.n}, eps = {args.eps}, float64, NumPy on CPU "
              f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, BLAS threads: {threads})",
              flush=True)
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
    lines = summarize(back, fwd)
    print("\n" + "\n".join(lines))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(n=args.n, eps=args.eps, backward=back, forward=fwd, summary=lines,
                                        numpy=np.__version__, python=sys.version.split()[0]), indent=2))
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


if __name__ == "__main__":
    sys.exit(main())
