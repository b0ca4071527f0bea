"""Shared command-line runner for the derivation modules.

``python derivations/<operator>.py`` runs every top-level ``check_*``
function of that module (the same functions tests/test_derivations.py runs),
prints PASS/FAIL with timings and the first docstring line, and exits 1 if
any identity fails.
"""

import sys
import time


def run_checks(namespace: dict) -> int:
    """Run the ``check_*`` callables in ``namespace`` in name order; 0 if all pass."""
    failed = 0
    for name, fn in sorted((n, f) for n, f in namespace.items()
                           if n.startswith("check_") and callable(f)):
        start = time.perf_counter()
        try:
            fn()
        except AssertionError as exc:
            failed += 1
            print(f"FAIL {name}: {exc!r}")
            continue
        doc = (fn.__doc__ or "").strip().splitlines()
        print(f"PASS {name:45s} ({time.perf_counter() - start:5.1f}s)  {doc[0] if doc else ''}")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run a derivation module, e.g. python derivations/sinkhorn.py")
