"""Benchmark: forward + backward of the batched matrix square root.

Side by side, in one process, on the same batch of SPD matrices (float64):

=====================  ==================================================
mpa+lyapunov_sign      MPA [5/5] forward, Lyapunov backward via the sign
                       function (the paper's pair)
mtp+lyapunov_sign      MTP degree 10 forward, same backward
ns                     coupled Newton-Schulz to tolerance, backward through
                       its iterations ("approximant", i.e. what autodiff of
                       iSQRT-COV computes)
eig+exact              eigh forward, exact eigenbasis backward
mpa+approximant        MPA forward and its own exact derivative (extra row)
mpa+lyapunov_sign(T=8) the paper's 8 plain sign steps instead of the scaled
                       iteration to tolerance (extra row; see its grad err)
scipy loop             scipy.linalg.sqrtm + scipy.linalg.solve_sylvester
                       per member (the baseline)
=====================  ==================================================

Columns: forward / backward / total time (median of ``--repeat`` runs after
a warm-up, the methods interleaved within each repeat), the speed-up of the
scipy loop's total over each method's total, nominal GFLOP/s (flop model
below), the Lyapunov sign iteration's steps (largest over the batch; "4+4":
four sign steps, then a finish of four Neumann terms) and two accuracy
columns: the forward's and the gradient's relative
error (Frobenius, worst batch member) against the float64 eigenbasis
reference ``S = U diag(sqrt l) U^T``, ``A_bar = U [(U^T G U)/(s_i + s_j)]
U^T`` computed here with NumPy.  The gradient error of an approximate
forward includes its approximation error: that is the point of the column.

Sizes: the default set (64, 32), (64, 64), (16, 256), plus (1024, 4) and (256, 8)
where the CPU crossover between eigh and the matmul-only methods shows.

Inputs: covariance matrices ``A = X X^T / (2n) + 1e-3 I`` of ``2n``
standard normal samples (condition number ~ 30-40, printed), cotangent ``G``
standard normal (non-symmetric).

Flop model (per matrix, n^3 units): matmul 2, Cholesky 1/3, the MPA's SPD
solve with n right-hand sides 14/3 (Cholesky, triangular inverse 1/3, two
products), eigh with vectors 9 (LAPACK syevd, approx.), Lyapunov-sign step
10 (5 matmuls, symmetric), its finish 2 per term (after an MPA/MTP forward
the hand-over is decided on the tracked spectrum bound, without a last
``B^2``), NS forward step 6, NS backward step 12.

The timed calls are the plain API calls (``sqrtm(A, method=...)``,
``sqrtm_vjp(res, G, method=...)``); the step counts come from one more,
untimed, ``full_output`` call, which also computes a residual.

With CuPy and a CUDA device present (``--cupy auto``, the default) the same
table is measured on the GPU against a measured batched matmul throughput,
the device synchronised before and after every timed region; otherwise that
part is skipped with the reason (``--cupy on`` makes that an error,
``--cupy semantics`` runs it on the CPU double of CuPy, ``--cpu off`` leaves
the CPU table out).  A method that fails is reported under its table; the
other rows are kept.

Run: ``refimpl bench matsqrt`` (or ``python benchmarks/bench_matsqrt.py``);
``--quick`` for a seconds-long smoke run.  Results also go to
``bench-results/matsqrt.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg

import refimpl
from refimpl import backend, matsqrt

#: The main (batch, n) sizes: batches of mid-size covariance-like matrices.
MAIN_SIZES = ((64, 32), (64, 64), (16, 256))
#: Small matrices in large batches, where per-call LAPACK overhead makes eigh
#: lose to the matmul-only methods on a CPU: they show the crossover.
CROSSOVER_SIZES = ((1024, 4), (256, 8))
SIZES = MAIN_SIZES + CROSSOVER_SIZES
GPU_SIZES = MAIN_SIZES + ((256, 256),)
QUICK_SIZES = ((8, 8), (4, 32))
METHODS = ("mpa+lyapunov_sign", "mtp+lyapunov_sign", "ns", "eig+exact", "mpa+approximant",
           "mpa+lyapunov_sign(T=8)", "scipy loop")


# --------------------------------------------------------------------------
# Inputs and the float64 reference
# --------------------------------------------------------------------------

def make_inputs(b: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed + 1000 * n + b)
    X = rng.standard_normal((b, n, 2 * n))
    A = X @ np.swapaxes(X, -1, -2) / (2 * n) + 1e-3 * np.eye(n)
    A = 0.5 * (A + np.swapaxes(A, -1, -2))
    G = rng.standard_normal((b, n, n))
    return A, G


def reference(A, G):
    """S and the exact A_bar in the eigenbasis (NumPy, float64)."""
    lam, U = np.linalg.eigh(A)
    s = np.sqrt(lam)
    S = (U * s[..., None, :]) @ np.swapaxes(U, -1, -2)
    Ut = np.swapaxes(U, -1, -2)
    K = 1.0 / (s[..., :, None] + s[..., None, :])
    A_bar = U @ ((Ut @ G @ U) * K) @ Ut
    return S, A_bar, lam[..., -1] / lam[..., 0]


def rel_err(X, R):
    """Worst per-member relative Frobenius error."""
    num = np.linalg.norm(X - R, axis=(-2, -1))
    return float(np.max(num / np.linalg.norm(R, axis=(-2, -1))))


def sym(X):
    return 0.5 * (X + np.swapaxes(X, -1, -2))


# --------------------------------------------------------------------------
# The methods: (forward, backward) pairs on namespace arrays
# --------------------------------------------------------------------------

def _refimpl_pair(fwd_kw, vjp_method, **vjp_kw):
    """(forward, backward, sign_steps): the timed calls are the plain API calls;
    ``sign_steps(res, G)`` asks the Lyapunov solve for its step counts
    (``full_output``, which also computes a residual) outside the timing."""
    def forward(A):
        return matsqrt.sqrtm(A, **fwd_kw)

    def backward(res, G):
        return matsqrt.sqrtm_vjp(res, G, method=vjp_method, **vjp_kw)

    def sign_steps(res, G):
        """(sign steps, finishing terms), largest over the batch, or None."""
        if vjp_method != "lyapunov_sign":
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", backend.ConvergenceWarning)
            _, info = matsqrt.sqrtm_vjp(res, G, method=vjp_method, full_output=True, **vjp_kw)
        terms = int(backend.to_host(info.n_terms).max())
        return int(backend.to_host(info.n_iter).max()) - (1 if terms else 0), terms
    return forward, backward, sign_steps


PAIRS = {
    "mpa+lyapunov_sign": _refimpl_pair({"method": "mpa"}, "lyapunov_sign"),
    "mtp+lyapunov_sign": _refimpl_pair({"method": "mtp"}, "lyapunov_sign"),
    "ns": _refimpl_pair({"method": "ns"}, "approximant"),
    "eig+exact": _refimpl_pair({"method": "eig"}, "exact"),
    "mpa+approximant": _refimpl_pair({"method": "mpa"}, "approximant"),
    "mpa+lyapunov_sign(T=8)": _refimpl_pair({"method": "mpa"}, "lyapunov_sign", iters=8),
}


def scipy_forward(A):
    return np.stack([scipy.linalg.sqrtm(a).real for a in A])


def scipy_backward(S, G):
    return np.stack([scipy.linalg.solve_sylvester(s, s, g) for s, g in zip(S, G)])


def flops(method: str, n: int, res, sign_steps) -> float | None:
    """Nominal flops per matrix for one forward + backward (see module docstring)."""
    n3 = float(n) ** 3
    if method == "scipy loop":
        return None
    chol_resid = (1.0 / 3.0 + 2.0) * n3                      # PSD check + residual matmul
    if method.startswith("mpa"):
        fwd = chol_resid + 2.0 * (matsqrt.DEFAULT_MPA_ORDER - 1) * n3 + 14.0 / 3.0 * n3
    elif method.startswith("mtp"):
        fwd = chol_resid + 2.0 * (matsqrt.DEFAULT_MTP_DEGREE - 1) * n3
    elif method == "ns":
        fwd = chol_resid + 6.0 * float(backend.to_host(res.n_iter).max()) * n3
    else:
        fwd = 2.0 * n3 + 9.0 * n3 + 2.0 * n3                  # eigh + reconstruction + residual
    if "lyapunov_sign" in method:
        steps, terms = sign_steps                             # 5 matmuls a step (symmetric),
        bwd = (10.0 * steps + 2.0 * terms) * n3                # 1 a finishing term
    elif method == "ns":
        bwd = 12.0 * float(backend.to_host(res.n_iter).max()) * n3
    elif method == "eig+exact":
        bwd = 8.0 * n3                                         # 4 matmuls
    else:                                                      # mpa approximant
        bwd = 8.0 / 3.0 * n3 + 2.0 * (2 * (matsqrt.DEFAULT_MPA_ORDER - 1) + 1) * n3
    return fwd + bwd


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

def _timer(sync):
    def timed(fn, *args):
        sync()
        t0 = time.perf_counter()
        out = fn(*args)
        sync()
        return out, time.perf_counter() - t0
    return timed


def run_size(b, n, methods, repeat, be, sync, with_scipy=True):
    """Time every method on one (b, n) batch; returns one row dict per method."""
    A_h, G_h = make_inputs(b, n)
    S_ref, Abar_ref, cond = reference(A_h, G_h)
    A, G = be.asarray(A_h, "float64"), be.asarray(G_h, "float64")
    timed = _timer(sync)
    times = {m: ([], []) for m in methods}
    last = {}
    failed = {}                                                # method -> error message
    for rep in range(repeat + 1):                              # repeat 0 is the warm-up
        for m in methods:
            if m in failed:
                continue
            try:
                _run_method(m, A, G, A_h, G_h, timed, with_scipy, rep, times, last)
            except Exception as exc:                           # one method must not lose the table
                failed[m] = f"{type(exc).__name__}: {exc}"
    rows = []
    for m in methods:
        if m in failed:
            rows.append({"b": b, "n": n, "method": m, "error": failed[m]})
            continue
        if m not in last:
            continue
        S, A_bar, res = last[m]
        steps = None if m == "scipy loop" else PAIRS[m][2](res, G)
        tf, tb = statistics.median(times[m][0]), statistics.median(times[m][1])
        fl = flops(m, n, res, steps)
        rows.append({
            "b": b, "n": n, "method": m, "fwd_ms": 1e3 * tf, "bwd_ms": 1e3 * tb,
            "total_ms": 1e3 * (tf + tb),
            "gflops": (b * fl / (tf + tb) / 1e9) if fl is not None else None,
            "sign_steps": steps,
            "fwd_err": rel_err(backend.to_host(S), S_ref),
            "grad_err": rel_err(sym(backend.to_host(A_bar)), sym(Abar_ref)),
            "cond_median": float(np.median(cond)),
        })
    base = next((r["total_ms"] for r in rows if r["method"] == "scipy loop"), None)
    for r in rows:
        if "error" not in r:
            r["speedup_vs_scipy"] = (base / r["total_ms"]) if base else None
    return rows


def _run_method(m, A, G, A_h, G_h, timed, with_scipy, rep, times, last):
    """One timed forward + backward of method ``m`` (repeat ``rep``; 0 = warm-up)."""
    if m == "scipy loop":
        if not with_scipy:
            return
        S, tf = timed(scipy_forward, A_h)
        A_bar, tb = timed(scipy_backward, S, G_h)
        res = None
    else:
        forward, backward, _ = PAIRS[m]
        with warnings.catch_warnings():
            # the fixed-T row is expected not to reach the tolerance
            warnings.simplefilter("ignore" if "T=" in m else "error",
                                  backend.ConvergenceWarning)
            res, tf = timed(forward, A)
            A_bar, tb = timed(backward, res, G)
        S = res.S
    if rep > 0:
        times[m][0].append(tf)
        times[m][1].append(tb)
    last[m] = (S, A_bar, res)


def batched_matmul_gflops(b, n, be, sync, repeat):
    """Measured throughput of a (b, n, n) @ (b, n, n) matmul."""
    X = be.asarray(np.random.default_rng(0).standard_normal((b, n, n)), "float64")
    timed = _timer(sync)
    timed(lambda: X @ X)
    ts = [timed(lambda: X @ X)[1] for _ in range(max(3, repeat))]
    return 2.0 * b * n ** 3 / statistics.median(ts) / 1e9


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def format_table(rows, matmul_rate):
    head = ("b", "n", "method", "fwd ms", "bwd ms", "total ms", "x scipy", "GFLOP/s",
            "sign steps", "fwd err", "grad err")
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    lines = []
    for r in rows:
        lines.append((
            str(r["b"]), str(r["n"]), r["method"], f"{r['fwd_ms']:.2f}", f"{r['bwd_ms']:.2f}",
            f"{r['total_ms']:.2f}",
            f"{r['speedup_vs_scipy']:.1f}" if r["speedup_vs_scipy"] else "-",
            f"{r['gflops']:.1f}" if r["gflops"] else "-",
            "-" if r["sign_steps"] is None else
            "{}+{}".format(*r["sign_steps"]) if r["sign_steps"][1] else str(r["sign_steps"][0]),
            f"{r['fwd_err']:.1e}", f"{r['grad_err']:.1e}"))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" if i not in (2,) else f"{{:<{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    prev = None
    for r, line in zip(rows, lines):
        if prev is not None and (r["b"], r["n"]) != prev:
            out.append("")
        prev = (r["b"], r["n"])
        out.append(fmt.format(*line))
    out.append("")
    for r in failed:
        out.append(f"FAILED ({r['b']}x{r['n']}) {r['method']}: {r['error']}")
    for (b, n), rate in matmul_rate.items():
        out.append(f"measured batched matmul ({b}x{n}x{n}): {rate:.1f} GFLOP/s")
    return "\n".join(out)


def verdicts(rows):
    """Where eig wins, where the iterative methods win, and the 5x target."""
    out = []
    rows = [r for r in rows if "error" not in r]
    sizes = sorted({(r["b"], r["n"]) for r in rows}, key=lambda s: (s[1], s[0]))
    for b, n in sizes:
        rs = {r["method"]: r for r in rows if (r["b"], r["n"]) == (b, n)}
        ranked = sorted((r for m, r in rs.items() if m != "scipy loop"),
                        key=lambda r: r["total_ms"])
        best = ranked[0]
        line = f"(b={b}, n={n}), cond ~{best['cond_median']:.0f}: fastest {best['method']}"
        if "eig+exact" in rs and "mpa+lyapunov_sign" in rs:
            e, m = rs["eig+exact"]["total_ms"], rs["mpa+lyapunov_sign"]["total_ms"]
            who = "eig+exact" if e < m else "mpa+lyapunov_sign"
            line += f"; eig+exact vs mpa+lyapunov_sign: {who} wins by {max(e, m) / min(e, m):.1f}x"
        if "mpa+lyapunov_sign" in rs and rs["mpa+lyapunov_sign"]["speedup_vs_scipy"]:
            sp = rs["mpa+lyapunov_sign"]["speedup_vs_scipy"]
            line += f"; mpa+lyapunov_sign is {sp:.1f}x faster than the scipy loop"
            if (b, n) == (64, 64):
                line += f" (target >= 5x: {'met' if sp >= 5 else 'NOT met'}"
                fixed = rs.get("mpa+lyapunov_sign(T=8)")
                if fixed and fixed["speedup_vs_scipy"]:
                    line += (f"; with the paper's fixed T=8: {fixed['speedup_vs_scipy']:.1f}x, "
                             f"gradient error {fixed['grad_err']:.0e}")
                line += ")"
        out.append(line)
    return "\n".join(out)


def environment():
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "refimpl": refimpl.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        cfg = np.show_config(mode="dicts")
        info["blas"] = cfg["Build Dependencies"]["blas"]["name"]
    except Exception:
        pass
    return info


def device_name(be) -> str:
    """What the device table runs on, for its header."""
    if be.name == "cupy":
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(be.device.id)["name"]
        return f"CuPy {cupy.__version__} on {name.decode() if isinstance(name, bytes) else name}"
    return f"{be.name} (a CPU double of CuPy: exercises the device path, timings mean nothing)"


def device_table(be, sizes, methods, repeat, cpu_rows):
    """The table on a device backend, every timed region between device syncs
    (:meth:`refimpl.backend.Backend.synchronize`); returns the JSON part."""
    gmethods = tuple(m for m in methods if m != "scipy loop")
    print(f"\n{device_name(be)} (x scipy: against the CPU scipy loop, where measured)\n")
    grows, grates = [], {}
    for b, n in sizes:
        rows = run_size(b, n, gmethods, repeat, be, be.synchronize, with_scipy=False)
        cpu_base = next((r["total_ms"] for r in cpu_rows
                         if (r["b"], r["n"]) == (b, n) and r["method"] == "scipy loop"), None)
        for r in rows:
            if "error" not in r:
                r["speedup_vs_scipy"] = (cpu_base / r["total_ms"]) if cpu_base else None
        grows += rows
        grates[(b, n)] = batched_matmul_gflops(b, n, be, be.synchronize, repeat)
        for r in rows:
            if r.get("gflops"):
                r["fraction_of_matmul"] = r["gflops"] / grates[(b, n)]
    print(format_table(grows, grates))
    return {"backend": be.name, "device": device_name(be), "rows": grows,
            "matmul_gflops": {f"{b}x{n}": r for (b, n), r in grates.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_matsqrt", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke run)")
    p.add_argument("--repeat", type=int, default=5, help="timed repeats per method (median)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated bxn list, e.g. 64x32,64x64 (default: 64x32,64x64,16x256,1024x4,256x8)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--cupy", choices=("auto", "off", "on", "semantics"), default="auto",
                   help="the device table: auto = on CuPy when a CUDA device is usable "
                        "(else skipped, with the reason), on = on CuPy or exit 2 with the "
                        "reason, semantics = on the CPU double of CuPy (tests the device "
                        "path; its timings mean nothing), off = none")
    p.add_argument("--cpu", choices=("on", "off"), default="on",
                   help="the CPU (NumPy) table (off: only the device table)")
    p.add_argument("--json", default="bench-results/matsqrt.json",
                   help="where to write the results ('' to skip)")
    p.add_argument("--threads", type=int, default=None,
                   help="limit BLAS/LAPACK threads (needs threadpoolctl; default: library default)")
    args = p.parse_args(argv)
    if args.threads is not None:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            p.error("--threads needs threadpoolctl (pip install threadpoolctl)")
        with threadpool_limits(limits=args.threads):
            return _run(args, p)
    return _run(args, p)


def _run(args, p) -> int:
    methods = tuple(m.strip() for m in args.methods.split(","))
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods: {sorted(unknown)}")
    if args.sizes:
        sizes = tuple(tuple(int(v) for v in s.split("x")) for s in args.sizes.split(","))
    else:
        sizes = QUICK_SIZES if args.quick else SIZES
    repeat = 1 if args.quick else max(1, args.repeat)

    results = {"environment": environment(), "cpu": [], "gpu": None}
    device_be = None
    if args.cupy in ("auto", "on"):
        ok, reason = backend.gpu_status()
        if ok:
            device_be = backend.get_backend("cupy")
        elif args.cupy == "on":
            print(f"bench_matsqrt: --cupy on, but {reason}", file=sys.stderr)
            return 2
        else:
            print(f"CuPy mode skipped: {reason}\n")
    elif args.cupy == "semantics":
        device_be = backend.get_backend("cupy_semantics")

    cpu = backend.get_backend("numpy")
    if args.cpu == "on":
        threads = f", BLAS threads limited to {args.threads}" if args.threads else ""
        print(f"refimpl matsqrt benchmark, float64, CPU (numpy {np.__version__}, "
              f"{os.cpu_count()} cpus{threads}), median of {repeat} repeat(s)\n")
        rates = {}
        for b, n in sizes:
            results["cpu"] += run_size(b, n, methods, repeat, cpu, cpu.synchronize)
            rates[(b, n)] = batched_matmul_gflops(b, n, cpu, cpu.synchronize, repeat)
        print(format_table(results["cpu"], rates))
        print()
        print(verdicts(results["cpu"]))
        results["cpu_matmul_gflops"] = {f"{b}x{n}": r for (b, n), r in rates.items()}

    if device_be is not None:
        results["gpu"] = device_table(device_be, sizes if args.sizes else
                                      (QUICK_SIZES if args.quick else GPU_SIZES),
                                      methods, repeat, results["cpu"])

    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=str))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
