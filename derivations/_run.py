"""Shared command-line runner for the derivation modules.

``python derivations/<operator>.py`` runs every top-level ``check_*``
function of that module (the same functions tests/test_derivations.py runs)
and prints, for each one, a line saying what it established -- the first
paragraph of its docstring -- with its name and timing::

    PASS  sinkhorn: <G, dP> = <C_bar, dC> + ... (adjoint identity, ...).  [check_adjoint_identity, 0.4 s]

It exits 1 if any identity fails.  ``python derivations/_run.py`` runs every
module in this folder.
"""

import importlib.util
import sys
import time
from pathlib import Path


def established(fn) -> str:
    """The first paragraph of ``fn``'s docstring on one line: what the check establishes."""
    doc = (fn.__doc__ or "").strip()
    if not doc:
        return "(no docstring)"
    return " ".join(doc.split("\n\n")[0].split())


def run_checks(namespace: dict) -> int:
    """Run the ``check_*`` callables in ``namespace`` in name order; 0 if all pass."""
    operator = Path(namespace.get("__file__", "?")).stem
    failed = 0
    for name, fn in sorted((n, f) for n, f in namespace.items()
                           if n.startswith("check_") and callable(f)):
        start = time.perf_counter()
        try:
            fn()
        except AssertionError as exc:
            failed += 1
            print(f"FAIL  {operator}: {established(fn)}  [{name}: {exc!r}]", flush=True)
            continue
        print(f"PASS  {operator}: {established(fn)}  [{name}, {time.perf_counter() - start:.1f} s]",
              flush=True)
    return 1 if failed else 0


def run_all(folder: Path) -> int:
    """Run every derivation module in ``folder`` (files not starting with ``_``)."""
    status = 0
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"derivations_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        status |= run_checks(vars(module))
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_all(Path(__file__).resolve().parent))
