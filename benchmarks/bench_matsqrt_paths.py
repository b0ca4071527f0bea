"""Benchmark: the host-NumPy kernels of refimpl.matsqrt against the plain
array-API path, on NumPy.

``refimpl.matsqrt`` is written once against the array API; on NumPy some of
its steps run instead as kernels of ``refimpl/matsqrt/_kernels.py`` (work
arrays and ``out=``, cache-sized batch blocks, per-member LAPACK Cholesky).
This script times both paths side by side, in one process, on the inputs of
``bench_matsqrt.py`` (covariances ``X X^T / (2n) + 1e-3 I``, float64): the
MPA [5/5] forward, and the ``lyapunov_sign`` VJP after it (adaptive, the
default).  The plain path is forced by making ``_kernels.applies`` say no, as
the bit-for-bit tests do.  Medians of ``--repeat`` runs, the two paths
interleaved within each repeat; the ratio is plain / kernel (> 1: the kernel
is faster).  The gradients of the two paths are checked to be equal bit for
bit (the forwards differ by round-off: Cholesky against LU).

Run: ``refimpl bench matsqrt_paths`` (or ``python benchmarks/bench_matsqrt_paths.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from refimpl import matsqrt
from refimpl.matsqrt import _kernels

DEFAULT_SIZES = "64x32,64x64,16x256,1024x4,256x8"


def covariances(b: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((b, n, 2 * n))
    A = X @ np.swapaxes(X, -1, -2) / (2 * n) + 1e-3 * np.eye(n)
    return A, rng.standard_normal((b, n, n))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(b: int, n: int, repeat: int) -> dict:
    """Median forward and backward times (ms) of both paths, and whether the
    two backwards, from one forward, are equal bit for bit."""
    A, G = covariances(b, n)
    applies = _kernels.applies
    res = matsqrt.sqrtm(A, method="mpa")              # the backward's input, for both paths
    times: dict = {(part, path): [] for part in ("fwd", "bwd") for path in ("kernel", "plain")}
    grads = {}
    try:
        for _ in range(repeat + 1):                    # the first round is a warm-up
            for path in ("kernel", "plain"):
                _kernels.applies = applies if path == "kernel" else (lambda x: False)
                t_f, _ = timed(lambda: matsqrt.sqrtm(A, method="mpa"))
                t_b, grads[path] = timed(lambda: matsqrt.sqrtm_vjp(res, G, method="lyapunov_sign"))
                times["fwd", path].append(t_f)
                times["bwd", path].append(t_b)
    finally:
        _kernels.applies = applies
    med = {k: 1e3 * statistics.median(v[1:]) for k, v in times.items()}
    return {"b": b, "n": n, "ms": med,
            "same_bits": bool(np.array_equal(grads["kernel"], grads["plain"]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_matsqrt_paths", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"bxn list (default {DEFAULT_SIZES})")
    p.add_argument("--repeat", type=int, default=7, help="timed repeats (median)")
    p.add_argument("--threads", type=int, default=None,
                   help="limit BLAS/LAPACK threads (needs threadpoolctl)")
    args = p.parse_args(argv)
    if args.threads is not None:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    print(f"{'b':>5} {'n':>4}  {'fwd kernel':>10} {'fwd plain':>10} {'ratio':>6}  "
          f"{'bwd kernel':>10} {'bwd plain':>10} {'ratio':>6}  same bits (bwd)")
    for size in args.sizes.split(","):
        b, n = (int(v) for v in size.split("x"))
        r = run(b, n, args.repeat)
        ms = r["ms"]
        print(f"{b:>5} {n:>4}  {ms['fwd', 'kernel']:10.2f} {ms['fwd', 'plain']:10.2f} "
              f"{ms['fwd', 'plain'] / ms['fwd', 'kernel']:6.2f}  {ms['bwd', 'kernel']:10.2f} "
              f"{ms['bwd', 'plain']:10.2f} {ms['bwd', 'plain'] / ms['bwd', 'kernel']:6.2f}  "
              f"{r['same_bits']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
