"""SOFT top-k: closed form versus the Sinkhorn path, forward + backward.

Run ``refimpl bench topk`` (or ``python benchmarks/bench_topk.py``) from a
source checkout.  Two tables, both measured side by side in one run:

1. Closed form (sigmoid + Newton threshold, O(n) VJP) against the Sinkhorn
   path (log-domain Sinkhorn from refimpl.sinkhorn + the KKT/Schur VJP) for
   n in {1e3, 1e4, 1e5} and eps in {1e-1, 1e-2}; scores uniform on [0, 1]
   (the scale of the anchors {0, 1}), k = n/10, Sinkhorn tolerance 1e-10.
   Each row gives the best-of-r time of forward + VJP for both, their ratio
   (target: >= 100x at n = 1e5, eps = 1e-2), the iteration counts and the
   largest difference between the two A's (they must agree).
2. Closed-form forward + VJP for n up to 1e6 and the least-squares slope of
   log(time) against log(n) (target: 1, linear time), over n >= 1e4 (smaller
   sizes measure fixed overheads) and over the whole range.

Timings on a shared machine are noisy; ratios taken in one run are what the
targets refer to.  ``--quick`` runs a small smoke version.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from refimpl import topk
from refimpl.backend import get_backend, to_host


def _sync(be):
    """Wait for the device before a clock reading (a no-op on the host)."""
    be.synchronize()


def _best_time(fn, be, repeats: int) -> tuple[float, object]:
    out = None
    best = math.inf
    for _ in range(repeats):
        _sync(be)
        start = time.perf_counter()
        out = fn()
        _sync(be)
        best = min(best, time.perf_counter() - start)
    return best, out


def _forward_backward(x, v, k, eps, method, tol):
    kw = {"tol": tol} if method == "sinkhorn" else {}
    res = topk.soft_topk(x, k, eps=eps, method=method, **kw)
    return res, topk.soft_topk_vjp(res, v)


def _table(rows, headers):
    widths = [max(len(h), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def compare_paths(be, sizes, epsilons, repeats, sk_repeats, tol, rng):
    rows, records = [], []
    for n in sizes:
        x_h, v_h = rng.random(n), rng.standard_normal(n)
        x, v = be.asarray(x_h, "float64"), be.asarray(v_h, "float64")
        k = n // 10
        for eps in epsilons:
            _forward_backward(x, v, k, eps, "closed_form", tol)            # warm-up
            t_cf, (rc, gc) = _best_time(lambda: _forward_backward(x, v, k, eps, "closed_form", tol),
                                        be, repeats)
            t_sk, (rs, gs) = _best_time(lambda: _forward_backward(x, v, k, eps, "sinkhorn", tol),
                                        be, sk_repeats)
            dA = float(np.max(np.abs(to_host(rc.A) - to_host(rs.A))))
            g_c, g_s = to_host(gc), to_host(gs)
            dg = float(np.max(np.abs(g_c - g_s)) / max(np.max(np.abs(g_c)), 1e-300))
            rec = dict(n=n, k=k, eps=eps, closed_form_s=t_cf, sinkhorn_s=t_sk, ratio=t_sk / t_cf,
                       newton_iter=rc.max_n_iter, sinkhorn_iter=rs.max_n_iter,
                       sinkhorn_converged=rs.all_converged, max_abs_dA=dA, rel_dx_bar=dg)
            records.append(rec)
            rows.append((f"{n:.0e}", f"{eps:g}", f"{t_cf * 1e3:.2f}", f"{t_sk * 1e3:.1f}",
                         f"{t_sk / t_cf:.0f}x", rc.max_n_iter, rs.max_n_iter,
                         "yes" if rs.all_converged else "NO", f"{dA:.1e}", f"{dg:.1e}"))
    headers = ("n", "eps", "closed ms", "sinkhorn ms", "ratio", "newton it", "sinkhorn it",
               "sk conv", "max|dA|", "rel|d x_bar|")
    return _table(rows, headers), records


def scaling(be, sizes, epsilons, repeats, rng):
    rows, records = [], []
    for eps in epsilons:
        times = []
        for n in sizes:
            x = be.asarray(rng.random(n), "float64")
            v = be.asarray(rng.standard_normal(n), "float64")
            k = n // 10
            _forward_backward(x, v, k, eps, "closed_form", None)
            t, (res, _) = _best_time(lambda: _forward_backward(x, v, k, eps, "closed_form", None),
                                     be, repeats)
            times.append(t)
            records.append(dict(n=n, eps=eps, closed_form_s=t, newton_iter=res.max_n_iter))
            rows.append((f"{n:.0e}", f"{eps:g}", f"{t * 1e3:.2f}", f"{t / n * 1e9:.1f}",
                         res.max_n_iter))
        logn, logt = np.log(np.array(sizes, float)), np.log(np.array(times))
        big = np.array(sizes) >= 1e4
        slope_all = float(np.polyfit(logn, logt, 1)[0])
        slope_big = float(np.polyfit(logn[big], logt[big], 1)[0]) if big.sum() >= 2 else math.nan
        records.append(dict(eps=eps, slope_all=slope_all, slope_n_ge_1e4=slope_big))
        rows.append(("slope", f"{eps:g}", f"n>=1e4: {slope_big:.2f}", f"all: {slope_all:.2f}", ""))
    return _table(rows, ("n", "eps", "fwd+vjp ms", "ns / score", "newton it")), records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_topk", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (n <= 1e4, 1 repeat)")
    p.add_argument("--backend", default="numpy", choices=("numpy", "cupy", "cupy_semantics"))
    p.add_argument("--repeats", type=int, default=5, help="closed-form repeats (best of)")
    p.add_argument("--sinkhorn-repeats", type=int, default=2, help="Sinkhorn repeats (best of)")
    p.add_argument("--tol", type=float, default=1e-10, help="Sinkhorn tolerance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench-results/topk.json", help="where to write the records")
    args = p.parse_args(argv)

    be = get_backend(args.backend)
    rng = np.random.default_rng(args.seed)
    epsilons = (1e-1, 1e-2)
    if args.quick:
        sizes, scale_sizes, reps, sk_reps = (1000, 10000), (1000, 10000, 100000), 1, 1
    else:
        sizes = (1000, 10000, 100000)
        scale_sizes = (1000, 10000, 100000, 300000, 1000000)
        reps, sk_reps = args.repeats, args.sinkhorn_repeats

    print(f"SOFT top-k, backend {be.name}, float64, scores ~ U[0, 1], k = n/10, "
          f"Sinkhorn tol {args.tol:g}")
    print("\nforward + VJP, closed form vs Sinkhorn path (best of "
          f"{reps} / {sk_reps}):")
    table1, rec1 = compare_paths(be, sizes, epsilons, reps, sk_reps, args.tol, rng)
    print(table1)
    target = [r for r in rec1 if r["n"] == 100000 and r["eps"] == 1e-2]
    if target:
        r = target[0]
        verdict = "met" if r["ratio"] >= 100 else "MISSED"
        print(f"target closed form >= 100x faster at n=1e5, eps=1e-2: {r['ratio']:.0f}x ({verdict})")

    print(f"\nclosed form forward + VJP, scaling in n (best of {reps}):")
    table2, rec2 = scaling(be, scale_sizes, epsilons, reps, rng)
    print(table2)
    print("target: slope 1 (linear time); see the slope rows")

    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"backend": be.name, "compare": rec1, "scaling": rec2}, indent=2))
        print(f"\nrecords written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
