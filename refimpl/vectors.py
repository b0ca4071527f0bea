"""Golden test vectors: every registered case written to disk, read back safely.

A golden vector is one registry case frozen as numbers: the inputs, the
reference output, a cotangent and the reference VJP for it, a tangent and
the reference JVP along it.  Anyone can check an implementation against
them without running refimpl: load the arrays (NumPy's ``.npz``, a zip of
``.npy`` files), call the implementation, compare.  ``docs/vectors.md``
specifies the format for readers in other languages.

Layout of an export directory::

    DIR/manifest.json                  schema, versions, conventions, cases
    DIR/<op>/<case>.<dtype>.npz        one file per case and dtype

Arrays in a case file (all float64, C order, little-endian)::

    input.<name>      each array input, in call order (OpSpec.inputs)
    output.<name>     the reference primary output (OpSpec.output)
    cotangent.<name>  the output cotangent ``out_bar``
    vjp.<name>        the reference ``J^T out_bar`` for each input, with the
                      operator's gauge/projection (OpSpec.canonicalize) applied
    tangent.<name>    a (feasible) input direction ``u``      } operators with
    jvp.<name>        the reference ``J u``                   } a JVP only
    param.<name>      an array-valued parameter (also vjp_param., jvp_param.),
                      referenced from the manifest as {"$array": "param.<name>"}

The numbers are those ``refimpl verify`` checks: inputs from the case's
seeded generator, tangents then cotangent drawn from the same generator in
the same order, the forward, VJP and JVP evaluated in float64 on NumPy.  For
a float32 export, inputs, tangents and cotangent are rounded to float32
(exactly representable, stored as float64) and the expected values are the
float64 reference for those rounded numbers: the target a float32
implementation is measured against, with the case's float32 tolerances.

Integrity: the manifest records each file's SHA-256, size and the shape of
every array; :func:`load` checks all of them, opens files with
``allow_pickle=False`` and never executes anything from disk.  A corrupted,
truncated, renamed or mismatched file raises :class:`VectorsError` naming
the file and what is wrong.

Examples
--------
>>> import tempfile
>>> from refimpl import vectors
>>> with tempfile.TemporaryDirectory() as d:
...     _ = vectors.export(d, ops=["linear_solve"])
...     gv = vectors.load(d)
...     c = gv.case("linear_solve", "well_conditioned")
...     bool(np.allclose(c.inputs["A"] @ c.output, c.inputs["b"]))
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import platform
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import backend as _backend
from . import registry
from .backend import get_backend, to_host

__all__ = [
    "GoldenCase",
    "GoldenVectors",
    "MANIFEST",
    "SCHEMA",
    "SCHEMA_VERSION",
    "VectorsError",
    "candidate_kwargs",
    "export",
    "load",
    "reference_case",
]

#: Name of the manifest inside an export directory.
MANIFEST = "manifest.json"
#: Identifies the format; ``load`` refuses any other.
SCHEMA = "refimpl-golden-vectors"
#: Bumped on any incompatible change of layout or meaning.
SCHEMA_VERSION = 2

#: Conventions common to every operator, written into every manifest.
GENERAL_CONVENTIONS = {
    "arrays": "float64, C order, little-endian, stored as .npy members of a .npz "
              "(zip) file; key 'input.A' is member 'input.A.npy'",
    "calling": "refimpl computed op(*inputs, **params) -> output (array inputs "
               "positionally in the order of 'inputs', the case's 'params' as keywords); "
               "a foreign implementation is called as fn(*inputs, **candidate_kwargs) -> "
               "output, with exactly the case's 'candidate_kwargs'",
    "batching": "leading dimensions beyond each array's 'core_ndim' are batch "
                "dimensions and broadcast; a batch equals a loop over its members",
    "vjp": "vjp.<input> = J^T out_bar (the gradient of <out_bar, output> with "
           "respect to that input), same shape as the input; an input the output "
           "does not depend on has an all-zero vjp",
    "jvp": "jvp.<output> = J u, the derivative of the output along "
           "tangent.<input> (all inputs moved together); an all-zero tangent holds "
           "that input fixed",
    "gauge": "vjp arrays are stored after the operator's canonicalisation "
             "(conventions.gauge): apply the same map to your gradients before comparing",
    "comparison": "normwise: max|actual - expected| / max|expected| per batch member, "
                  "each member against its own size (with a round-off floor, see "
                  "docs/vectors.md), against "
                  "tolerance.forward for outputs and tolerance.fd for gradients (the "
                  "accuracy to which refimpl verifies its own reference)",
    "surrogate": "when an operator has surrogate: true, vjp.* is the operator's "
                 "surrogate gradient (its defining formula), not a derivative of the "
                 "output: an implementation must implement that surrogate backward to "
                 "match it",
}

_ARRAY_KINDS = ("input", "output", "cotangent", "vjp", "tangent", "jvp")


def _param_kinds(gc: "GoldenCase"):
    """(npz key prefix, parameter dict) of a case: array parameters live in the npz."""
    return (("param", gc.params), ("vjp_param", gc.vjp_params), ("jvp_param", gc.jvp_params))


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

#: Limits :func:`load` enforces before reading anything large (a hostile or
#: broken export is refused, not allowed to exhaust memory or the stack).
MAX_MANIFEST_BYTES = 64 << 20
#: Deepest nesting of JSON objects/lists a manifest may have.
MAX_JSON_DEPTH = 32
#: Largest array (bytes of float64 data) and largest case file content.
MAX_ARRAY_BYTES = 1 << 30
MAX_CASE_BYTES = 2 << 30
#: Tolerances are relative errors: a manifest value above this is refused.
MAX_TOLERANCE = 1.0


class VectorsError(ValueError):
    """A golden-vector directory is missing, corrupted or inconsistent."""


# --------------------------------------------------------------------------
# One case as numbers
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class GoldenCase:
    """The reference numbers of one registry case (host float64 arrays).

    ``inputs``, ``vjp`` and ``tangents`` are keyed by input name in call
    order; ``tangents``/``jvp`` are None for an operator without a JVP.
    ``vjp`` is already canonicalised (gauge fixed).  ``tolerance`` holds the
    case's :class:`refimpl.registry.Tolerance` for ``dtype`` as a dict.
    ``candidate_kwargs`` are the keywords a foreign implementation receives
    (:func:`candidate_kwargs`).
    """

    op: str
    id: str
    description: str
    dtype: str
    seed: int
    flags: tuple[str, ...]
    params: Mapping[str, Any]
    vjp_params: Mapping[str, Any]
    jvp_params: Mapping[str, Any]
    tolerance: Mapping[str, float]
    inputs: Mapping[str, np.ndarray]
    output: np.ndarray
    cotangent: np.ndarray
    vjp: Mapping[str, np.ndarray]
    tangents: Mapping[str, np.ndarray] | None = None
    jvp: np.ndarray | None = None
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    for_candidates: bool = True
    candidate_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def arrays(self, spec_output: str) -> dict[str, np.ndarray]:
        """The case as the flat ``{key: array}`` mapping of its ``.npz`` file."""
        out = {f"input.{k}": v for k, v in self.inputs.items()}
        for kind, params in _param_kinds(self):
            out.update({f"{kind}.{k}": np.asarray(v, dtype=np.float64)
                        for k, v in params.items() if isinstance(v, np.ndarray)})
        out[f"output.{spec_output}"] = self.output
        out[f"cotangent.{spec_output}"] = self.cotangent
        out.update({f"vjp.{k}": v for k, v in self.vjp.items()})
        if self.tangents is not None:
            out.update({f"tangent.{k}": v for k, v in self.tangents.items()})
        if self.jvp is not None:
            out[f"jvp.{spec_output}"] = self.jvp
        return out


def _round(a: np.ndarray, dtype: str) -> np.ndarray:
    """Round to ``dtype`` and back: numbers exactly representable in it."""
    return np.asarray(a, dtype=np.float64).astype(dtype).astype(np.float64)


def _zeros_for_none(bars: Sequence, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.zeros(x.shape) if b is None else to_host(b).astype(np.float64)
            for b, x in zip(bars, like)]


def _diagnostics(res) -> dict:
    """Scalar convergence diagnostics of a forward result, as JSON values."""
    out: dict[str, bool | int | float] = {}
    for name in ("converged", "n_iter", "error", "residual"):
        raw = getattr(res, name, None)
        if raw is None:
            continue
        try:
            value = np.asarray(to_host(raw))
            if value.size == 0 or value.dtype.kind not in "biuf":
                continue
            if name == "converged":
                out[name] = bool(np.all(value))
            elif value.dtype.kind in "iu":
                out[name] = int(np.max(value))
            else:
                v = float(np.max(value))
                if math.isfinite(v):
                    out[name] = v
        except Exception:   # a diagnostic the host cannot read is simply not recorded
            continue
    return out


def candidate_kwargs(spec: registry.OpSpec, params: Mapping[str, Any],
                     vjp_params: Mapping[str, Any],
                     jvp_params: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords a foreign implementation receives for one case.

    The calling convention (docs/design.md) passes the operator's parameters named in
    ``spec.candidate_params``; each takes its value from the case's forward
    ``params``, else its ``vjp_params`` (a backward hyperparameter such as
    blackbox backprop's ``lam``, which a framework's layer takes at call
    time), else its ``jvp_params``, else the default of ``spec.forward``.  A
    name found nowhere is not passed (the candidate's own default applies).
    The golden-vector manifest records the result per case, so a consumer in
    another language never has to know refimpl's defaults.
    """
    try:
        defaults = {k: p.default for k, p in inspect.signature(spec.forward).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    except (TypeError, ValueError):
        defaults = {}
    out = {}
    for k in spec.candidate_params:
        for source in (params, vjp_params, jvp_params, defaults):
            if k in source:
                out[k] = source[k]
                break
    return out


def reference_case(spec: registry.OpSpec, case: registry.Case,
                   dtype: str = "float64") -> GoldenCase:
    """Compute the golden numbers of ``case`` (NumPy, float64 arithmetic).

    Inputs come from the case's seeded generator rounded to ``dtype``;
    tangents and then the cotangent are drawn from the same generator in the
    order :func:`refimpl.registry.verify_case` draws them, so the vectors are
    the very numbers ``refimpl verify`` checks.  The VJP is canonicalised
    with ``spec.canonicalize``.

    Raises
    ------
    ValueError : ``dtype`` unsupported or not among the case's dtypes.
    RuntimeError : the reference itself failed on this case (a bug).
    """
    if dtype not in case.dtypes:
        raise ValueError(f"case {case.id!r} of {spec.name!r} is not defined for dtype "
                         f"{dtype!r} (its dtypes: {', '.join(case.dtypes)})")
    be = get_backend("numpy")
    rng = np.random.default_rng(case.seed)
    host = registry._make_host(spec, case, dtype, rng)
    try:
        res = spec.forward(*(be.asarray(host[k], "float64") for k in spec.inputs),
                           **case.params)
        out = to_host(getattr(res, spec.output)).astype(np.float64)

        u, v = registry.draw_directions(spec, rng, host, out)   # the numbers verify_case uses
        u = tuple(None if t is None else _round(t, dtype) for t in u)
        v = _round(v, dtype)

        bars = registry._canon(spec, spec.vjp(res, be.asarray(v, "float64"), **case.vjp_params))
        vjp = dict(zip(spec.inputs, _zeros_for_none(bars, [host[k] for k in spec.inputs])))

        tangents = jvp = None
        if spec.jvp is not None:
            du = spec.jvp(res, *(None if t is None else be.asarray(t, "float64") for t in u),
                          **case.jvp_params)
            jvp = to_host(du).astype(np.float64)
            tangents = {k: np.zeros(host[k].shape) if t is None else t
                        for k, t in zip(spec.inputs, u)}
    except Exception as exc:
        raise RuntimeError(f"the reference failed on {spec.name}/{case.id} ({dtype}): "
                           f"{type(exc).__name__}: {exc}") from exc
    for name, a in [("output", out), ("jvp", jvp), *vjp.items()]:
        if a is not None and not np.all(np.isfinite(a)):
            raise RuntimeError(f"the reference {name} of {spec.name}/{case.id} is not finite")
    return GoldenCase(
        op=spec.name, id=case.id, description=case.description, dtype=dtype,
        seed=case.seed, flags=tuple(case.flags), params=dict(case.params),
        vjp_params=dict(case.vjp_params), jvp_params=dict(case.jvp_params),
        tolerance=dataclasses.asdict(spec.tolerance(case, dtype)),
        inputs={k: host[k] for k in spec.inputs}, output=out, cotangent=v, vjp=vjp,
        tangents=tangents, jvp=jvp, diagnostics=_diagnostics(res),
        for_candidates=bool(case.for_candidates),
        candidate_kwargs=candidate_kwargs(spec, case.params, case.vjp_params, case.jvp_params),
    )


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------

def _params_json(params: Mapping[str, Any], kind: str, where: str,
                 sources: Sequence[tuple[str, Mapping]] = ()) -> dict:
    """Parameters as JSON; a NumPy array parameter becomes ``{"$array": "<kind>.<name>"}``,
    a reference to the float64 array of that key in the case's .npz (for
    ``candidate_kwargs``, the key of the parameter dict in ``sources`` it came from)."""
    out = {}
    for k, v in params.items():
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in "biuf":
                raise TypeError(f"{where}.{k} is an array of dtype {v.dtype}; golden "
                                "vectors store real arrays only")
            if sources:
                found = [sk for sk, sp in sources if sp.get(k) is v]
                if not found:
                    raise TypeError(f"{where}.{k} is an array that is not one of the case's "
                                    "parameters; golden vectors cannot store it")
                kind = found[0]
            out[str(k)] = {"$array": f"{kind}.{k}"}
        else:
            out[str(k)] = _jsonable(v, f"{where}.{k}")
    return out


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON data (finite numbers, str, bool, None, lists, dicts)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            raise TypeError(f"{where} is {value!r}; golden vectors need finite numbers")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where} has type {type(value).__name__}, which has no JSON form; "
                    "golden-vector parameters must be numbers, strings, booleans or lists")


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """A deterministic .npz: uncompressed zip, fixed timestamps, .npy format 1.0.

    Byte-identical numbers give byte-identical files, so exports can be
    diffed and their hashes compared across runs.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, a in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            # asarray(order="C"), not ascontiguousarray: that one makes a 0-d
            # array (a scalar value per case) 1-d
            np.lib.format.write_array(member, np.asarray(a, dtype="<f8", order="C"),
                                      version=(1, 0), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import scipy

    from . import __version__
    return {"refimpl": __version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "python": platform.python_version()}


def _gauge_text(spec: registry.OpSpec) -> str:
    """The gauge convention in words: the spec's own, else canonicalize's docstring."""
    if "gauge" in spec.conventions:
        return str(spec.conventions["gauge"])
    if spec.canonicalize is None:
        return "none (gradients are compared as computed)"
    doc = (spec.canonicalize.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else (
        "an operator-specific canonicalisation (see refimpl.registry); no description given")


def _op_entry(spec: registry.OpSpec) -> dict:
    conventions = {str(k): str(v) for k, v in spec.conventions.items()}
    conventions["gauge"] = _gauge_text(spec)
    params = ", *, " + ", ".join(spec.candidate_params) if spec.candidate_params else ""
    return {
        "description": spec.description,
        "inputs": [{"name": n, "core_ndim": c} for n, c in zip(spec.inputs, spec.core_ndim)],
        "output": {"name": spec.output, "core_ndim": spec.output_core_ndim},
        "candidate_params": list(spec.candidate_params),
        "signature": f"{spec.name}({', '.join(spec.inputs)}{params}) -> {spec.output}",
        "surrogate": bool(spec.surrogate),
        "has_jvp": spec.jvp is not None,
        "conventions": conventions,
        "cases": [],
    }


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name) or ".." in name:
        raise VectorsError(f"{what} {name!r} is not a safe file name "
                           "(letters, digits, '_', '.', '-'; no '..')")
    return name


def _export_selection(ops: Iterable[str | registry.OpSpec] | None, dtypes: tuple[str, ...],
                      cases: Iterable[str] | None) -> tuple[list[registry.OpSpec],
                                                            set[str] | None]:
    """The operators to export and the case ids wanted (None: all), checked."""
    specs = ([n if isinstance(n, registry.OpSpec) else registry.get_spec(n) for n in ops]
             if ops is not None else registry.all_specs())
    for dt in dtypes:
        if dt not in _backend.SUPPORTED_DTYPES:
            raise ValueError(f"argument 'dtypes' has {dt!r}; choose from "
                             f"{', '.join(_backend.SUPPORTED_DTYPES)}")
    wanted = set(cases) if cases is not None else None
    if wanted is not None:
        known = {c.id for s in specs for c in s.cases}
        if wanted - known:
            raise ValueError(f"argument 'cases' names unknown case(s) "
                             f"{sorted(wanted - known)}; known: {', '.join(sorted(known))}")
    return specs, wanted


def _export_case(root: Path, spec: registry.OpSpec, case: registry.Case, dt: str) -> dict:
    """Write ``case``'s numbers in dtype ``dt`` to ``root/<op>/<case>.<dt>.npz``
    and return its manifest entry."""
    gc = reference_case(spec, case, dt)
    rel = (f"{_check_name(spec.name, 'operator name')}/"
           f"{_check_name(case.id, 'case id')}.{dt}.npz")
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    arrays = gc.arrays(spec.output)
    _write_npz(target, arrays)
    where = f"{spec.name}/{case.id}"
    return {
        "id": case.id,
        "description": case.description,
        "dtype": dt,
        "seed": int(case.seed),
        "flags": list(case.flags),
        "for_candidates": bool(case.for_candidates),
        "params": _params_json(case.params, "param", f"{where} params"),
        "vjp_params": _params_json(case.vjp_params, "vjp_param",
                                   f"{where} vjp_params"),
        "jvp_params": _params_json(case.jvp_params, "jvp_param",
                                   f"{where} jvp_params"),
        "candidate_kwargs": _params_json(
            gc.candidate_kwargs, "", f"{where} candidate_kwargs",
            sources=[(k, p) for k, p in _param_kinds(gc)]),
        "tolerance": _jsonable(gc.tolerance, f"{where} tolerance"),
        "reference": _jsonable(gc.diagnostics, f"{where} diagnostics"),
        "file": rel,
        "sha256": _sha256(target),
        "size": target.stat().st_size,
        "arrays": {k: list(a.shape) for k, a in arrays.items()},
    }


def _write_manifest(manifest_path: Path, operators: dict[str, dict]) -> None:
    """Write the manifest (through a temporary file, so it appears complete or not at all)."""
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "versions": _versions(),
        "conventions": dict(GENERAL_CONVENTIONS),
        "operators": operators,
    }
    text = json.dumps(manifest, indent=1, allow_nan=False) + "\n"
    tmp = manifest_path.with_name(MANIFEST + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, manifest_path)


def export(path: str | os.PathLike, *, ops: Iterable[str | registry.OpSpec] | None = None,
           dtypes: Sequence[str] = ("float64",),
           cases: Iterable[str] | None = None) -> Path:
    """Write golden vectors for registered operators into directory ``path``.

    Parameters
    ----------
    path : directory (created if needed); an existing manifest there is
        replaced, other files are left alone.
    ops : operator names or :class:`~refimpl.registry.OpSpec` objects
        (default: every registered operator).
    dtypes : "float64" (the reference) and/or "float32"; a case is exported
        for each dtype it supports.
    cases : restrict to these case ids (default: all).

    Returns
    -------
    Path of the written ``manifest.json``.

    Raises
    ------
    ValueError : unknown operator, case or dtype, or nothing to export.
    RuntimeError : the reference failed on a case.
    """
    dtypes = tuple(dtypes)
    specs, wanted = _export_selection(ops, dtypes, cases)

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST
    if manifest_path.exists():
        manifest_path.unlink()   # a half-written export must not look complete

    operators: dict[str, dict] = {}
    n_written = 0
    for spec in specs:
        entry = _op_entry(spec)
        for case in spec.cases:
            if wanted is not None and case.id not in wanted:
                continue
            for dt in dtypes:
                if dt not in case.dtypes:
                    continue
                entry["cases"].append(_export_case(root, spec, case, dt))
                n_written += 1
        if entry["cases"]:
            operators[spec.name] = entry
    if n_written == 0:
        raise ValueError("nothing to export: no case matches the requested operators, "
                         "cases and dtypes")
    _write_manifest(manifest_path, operators)
    return manifest_path


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class GoldenVectors:
    """A loaded, verified export: the manifest and every case's numbers."""

    path: Path
    manifest: Mapping[str, Any]
    cases: tuple[GoldenCase, ...]

    @property
    def ops(self) -> list[str]:
        return list(self.manifest["operators"])

    def operator(self, op: str) -> Mapping[str, Any]:
        """The manifest entry of ``op`` (inputs, output, conventions, cases)."""
        try:
            return self.manifest["operators"][op]
        except KeyError:
            raise KeyError(f"no operator {op!r} in {self.path}; it has: "
                           f"{', '.join(self.ops)}") from None

    def cases_of(self, op: str, dtype: str | None = None) -> list[GoldenCase]:
        self.operator(op)
        return [c for c in self.cases if c.op == op and (dtype is None or c.dtype == dtype)]

    def case(self, op: str, case_id: str, dtype: str = "float64") -> GoldenCase:
        for c in self.cases:
            if c.op == op and c.id == case_id and c.dtype == dtype:
                return c
        raise KeyError(f"no case {op}/{case_id} ({dtype}) in {self.path}")

    def __iter__(self) -> Iterator[GoldenCase]:
        return iter(self.cases)

    def __len__(self) -> int:
        return len(self.cases)


def _require(mapping: Any, key: str, kind, where: str):
    if not isinstance(mapping, Mapping):
        raise VectorsError(f"{where} must be a JSON object, got {type(mapping).__name__}")
    if key not in mapping:
        raise VectorsError(f"{where} is missing the key {key!r}")
    value = mapping[key]
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise VectorsError(f"{where}[{key!r}] must be {names}, got {type(value).__name__}")
    return value


def _inside(root: Path, path: Path, label: str) -> Path:
    """``path`` resolved (symlinks followed); a VectorsError if that leaves ``root``."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise VectorsError(f"{label}: {path} resolves to {resolved}, outside the export "
                           f"directory {root.resolve()} (a symlink?); refused")
    return resolved


def _json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar 0, ``[]`` 1), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
            deepest = max(deepest, d + 1)
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
            deepest = max(deepest, d + 1)
        if deepest > MAX_JSON_DEPTH:
            break
    return deepest


def _manifest_file(root: Path) -> Path:
    """``root``'s manifest path: present, inside ``root``, within the size cap."""
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise VectorsError(f"{root} has no {MANIFEST}; is it a directory written by "
                           "'refimpl export'?")
    _inside(root, mpath, MANIFEST)
    size = mpath.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise VectorsError(f"{mpath} has {size} bytes, more than a manifest may have "
                           f"({MAX_MANIFEST_BYTES}); refused")
    return mpath


def _parse_manifest(mpath: Path) -> Any:
    """The manifest's JSON: strict (finite numbers only), not nested too deeply."""
    def no_constants(name):   # JSON has no NaN/Infinity; Python's parser would accept them
        raise VectorsError(f"{mpath} contains {name}, which is not JSON; every number in "
                           "a manifest is finite")

    def finite_float(text):   # 1e400 would parse to inf
        value = float(text)
        if not math.isfinite(value):
            raise VectorsError(f"{mpath} contains the number {text[:40]}, which overflows "
                               "float64; every number in a manifest is finite")
        return value

    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"), parse_constant=no_constants,
                              parse_float=finite_float)
    except VectorsError:
        raise
    except RecursionError:
        raise VectorsError(f"{mpath} nests JSON objects/lists too deeply (more than "
                           f"{MAX_JSON_DEPTH} levels); refused") from None
    except (UnicodeDecodeError, ValueError) as exc:   # JSONDecodeError, huge integers
        raise VectorsError(f"{mpath} is not valid JSON ({exc}); the file is corrupted") from None
    if _json_depth(manifest) > MAX_JSON_DEPTH:
        raise VectorsError(f"{mpath} nests JSON objects/lists more than {MAX_JSON_DEPTH} "
                           "levels deep; refused")
    return manifest


def _check_manifest_header(manifest: Any, mpath: Path) -> dict:
    """The manifest's schema and version, and its top-level keys; its operators."""
    where = MANIFEST
    schema = _require(manifest, "schema", str, where)
    if schema != SCHEMA:
        raise VectorsError(f"{mpath} has schema {schema!r}, expected {SCHEMA!r}")
    version = _require(manifest, "schema_version", int, where)
    if version != SCHEMA_VERSION:
        newer = "a newer" if version > SCHEMA_VERSION else "an older"
        raise VectorsError(f"{mpath} has schema_version {version}, written by {newer} "
                           f"refimpl; this refimpl reads schema_version {SCHEMA_VERSION}")
    _require(manifest, "versions", dict, where)
    _require(manifest, "conventions", dict, where)
    return _require(manifest, "operators", dict, where)


def _check_operator_entry(entry: Any, w: str) -> None:
    """An operator's entry apart from its cases: inputs, output, candidate
    parameters, flags and conventions."""
    inputs = _require(entry, "inputs", list, w)
    names = []
    for i, inp in enumerate(inputs):
        names.append(_safe_key(_require(inp, "name", str, f"{w} inputs[{i}]"),
                               f"{w} inputs[{i}]['name']"))
        _natural(_require(inp, "core_ndim", int, f"{w} inputs[{i}]"),
                 f"{w} inputs[{i}]['core_ndim']")
    if len(set(names)) != len(names):
        raise VectorsError(f"{w} inputs has repeated names {names}")
    out = _require(entry, "output", dict, w)
    _safe_key(_require(out, "name", str, f"{w} output"), f"{w} output['name']")
    _natural(_require(out, "core_ndim", int, f"{w} output"), f"{w} output['core_ndim']")
    for i, name in enumerate(_require(entry, "candidate_params", list, w)):
        if not isinstance(name, str):
            raise VectorsError(f"{w} candidate_params[{i}] must be str, got "
                               f"{type(name).__name__}")
    _require(entry, "surrogate", bool, w)
    _require(entry, "has_jvp", bool, w)
    _require(entry, "conventions", dict, w)


#: The keys of a case entry and their JSON types.
_CASE_KEYS = (("id", str), ("description", str), ("dtype", str),
              ("seed", int), ("flags", list), ("for_candidates", bool),
              ("params", dict), ("vjp_params", dict),
              ("jvp_params", dict), ("candidate_kwargs", dict),
              ("tolerance", dict), ("file", str), ("sha256", str),
              ("size", int), ("arrays", dict))


def _check_case_tolerance(c: Mapping, wc: str) -> None:
    """Each check's tolerance: a relative error in ``[0, MAX_TOLERANCE]``."""
    for key in ("forward", "adjoint", "fd", "batch"):
        t = _require(c["tolerance"], key, float, f"{wc} tolerance")
        if t < 0:
            raise VectorsError(f"{wc} tolerance[{key!r}] is negative")
        if t > MAX_TOLERANCE:
            raise VectorsError(f"{wc} tolerance[{key!r}] is {t!r}; a tolerance is a "
                               f"relative error, at most {MAX_TOLERANCE:g}")


def _check_case_entry(entry: Mapping, c: Any, wc: str) -> None:
    """One case's entry: its keys and their types, tolerances, flags, file size
    and digest, array-parameter references and declared shapes."""
    for key, kind in _CASE_KEYS:
        _require(c, key, kind, wc)
    _check_case_tolerance(c, wc)
    for i, flag in enumerate(c["flags"]):
        if not isinstance(flag, str):
            raise VectorsError(f"{wc} flags[{i}] must be str, got "
                               f"{type(flag).__name__}")
    _natural(c["size"], f"{wc} size")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", c["sha256"]):
        raise VectorsError(f"{wc} sha256 must be 64 hex digits")
    for fld in _PARAM_FIELDS:
        for k, v in c[fld].items():
            if isinstance(v, dict) and "$array" in v and not (
                    set(v) == {"$array"} and isinstance(v["$array"], str)):
                raise VectorsError(f"{wc} {fld}[{k!r}] must be {{\"$array\": "
                                   f"\"<key>\"}}, got {v!r}"[:300])
    _check_case_shapes(entry, c, wc)


def _read_manifest(root: Path) -> dict:
    """``root``'s manifest, parsed and checked entry by entry (:class:`VectorsError`
    naming the first problem)."""
    mpath = _manifest_file(root)
    manifest = _parse_manifest(mpath)
    operators = _check_manifest_header(manifest, mpath)
    for op, entry in operators.items():
        w = f"{MANIFEST} operators[{op!r}]"
        _check_operator_entry(entry, w)
        for j, c in enumerate(_require(entry, "cases", list, w)):
            _check_case_entry(entry, c, f"{w} cases[{j}]")
    return manifest


def _natural(value: int, where: str) -> int:
    if value < 0:
        raise VectorsError(f"{where} is {value}; it must be >= 0")
    return value


def _safe_key(name: str, where: str) -> str:
    if not _NAME.match(name):
        raise VectorsError(f"{where} {name!r} is not a valid name (letters, digits, "
                           "'_', '.', '-')")
    return name


def _check_case_shapes(entry: Mapping, c: Mapping, wc: str) -> None:
    """The declared shapes of one case: valid, within the size caps, consistent.

    Cotangent and JVP shaped like the output, each VJP and tangent like its
    input, every array at least its core dimensions, and the output's batch
    dimensions those of the inputs broadcast together.
    """
    declared = c["arrays"]
    total = 0
    for k, shape in declared.items():
        if not (isinstance(shape, list) and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise VectorsError(f"{wc} arrays[{k!r}] must be a list of non-negative "
                               f"integers (a shape), got {shape!r}"[:300])
        if len(shape) > 32:
            raise VectorsError(f"{wc} arrays[{k!r}] has {len(shape)} dimensions; refused")
        nbytes = 8 * math.prod(shape)
        if nbytes > MAX_ARRAY_BYTES:
            raise VectorsError(f"{wc} arrays[{k!r}] has shape {shape}, {nbytes} bytes, more "
                               f"than the limit of {MAX_ARRAY_BYTES}; refused")
        total += nbytes
    if total > MAX_CASE_BYTES:
        raise VectorsError(f"{wc} arrays hold {total} bytes in all, more than the limit of "
                           f"{MAX_CASE_BYTES}; refused")
    names = [i["name"] for i in entry["inputs"]]
    cores = [i["core_ndim"] for i in entry["inputs"]]
    out, out_core = entry["output"]["name"], entry["output"]["core_ndim"]
    pairs = [(f"cotangent.{out}", f"output.{out}")]
    pairs += [(f"vjp.{n}", f"input.{n}") for n in names]
    if entry["has_jvp"]:
        pairs += [(f"jvp.{out}", f"output.{out}")]
        pairs += [(f"tangent.{n}", f"input.{n}") for n in names]
    for a, b in pairs:
        if a in declared and b in declared and declared[a] != declared[b]:
            raise VectorsError(f"{wc}: {a} has shape {declared[a]} but {b} has "
                               f"{declared[b]}; they must be equal")
    batches = []
    for n, core in zip(names, cores):
        shape = declared.get(f"input.{n}")
        if shape is None:
            continue
        if len(shape) < core:
            raise VectorsError(f"{wc}: input.{n} has shape {shape}, fewer than its "
                               f"core_ndim {core} dimensions")
        batches.append(tuple(shape[:len(shape) - core]))
    shape = declared.get(f"output.{out}")
    if shape is not None and len(batches) == len(names):
        if len(shape) < out_core:
            raise VectorsError(f"{wc}: output.{out} has shape {shape}, fewer than its "
                               f"core_ndim {out_core} dimensions")
        try:
            batch = tuple(np.broadcast_shapes(*batches)) if batches else ()
        except ValueError:
            raise VectorsError(f"{wc}: the inputs' batch shapes {batches} do not "
                               "broadcast together") from None
        if tuple(shape[:len(shape) - out_core]) != batch:
            raise VectorsError(f"{wc}: output.{out} has batch shape "
                               f"{list(shape[:len(shape) - out_core])}, the inputs' batch "
                               f"shapes broadcast to {list(batch)}")


_PARAM_FIELDS = ("params", "vjp_params", "jvp_params", "candidate_kwargs")


def _param_refs(c: Mapping) -> dict[tuple[str, str], str]:
    """``{(params field, name): npz key}`` for the array parameters of a case entry."""
    refs = {}
    for fld in _PARAM_FIELDS:
        for k, v in c[fld].items():
            if isinstance(v, dict) and set(v) == {"$array"}:
                refs[(fld, k)] = v["$array"]
    return refs


def _expected_keys(entry: Mapping, c: Mapping) -> set[str]:
    names = [i["name"] for i in entry["inputs"]]
    out = entry["output"]["name"]
    keys = {f"input.{n}" for n in names} | {f"vjp.{n}" for n in names}
    keys |= {f"output.{out}", f"cotangent.{out}"}
    if entry["has_jvp"]:
        keys |= {f"tangent.{n}" for n in names} | {f"jvp.{out}"}
    return keys | set(_param_refs(c).values())


def _read_case_file(root: Path, op: str, entry: Mapping, c: Mapping) -> dict[str, np.ndarray]:
    rel = c["file"]
    label = f"{op}/{c['id']} ({rel})"
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or not parts:
        raise VectorsError(f"{label}: file path must be relative to the export directory")
    fpath = root / rel
    if not fpath.is_file():
        raise VectorsError(f"{label}: file is missing")
    _inside(root, fpath, label)
    size = fpath.stat().st_size
    if size != c["size"]:
        raise VectorsError(f"{label}: file has {size} bytes, the manifest says {c['size']} "
                           "(truncated or replaced)")
    digest = _sha256(fpath)
    if digest != c["sha256"].lower():
        raise VectorsError(f"{label}: SHA-256 {digest} does not match the manifest's "
                           f"{c['sha256']}; the file is corrupted or was modified")
    declared = c["arrays"]
    expected = _expected_keys(entry, c)
    if set(declared) != expected:
        raise VectorsError(f"{label}: manifest lists arrays {sorted(declared)}, the operator "
                           f"needs {sorted(expected)}")
    _check_members(fpath, declared, expected, label)
    try:
        with np.load(fpath, allow_pickle=False) as npz:
            found = set(npz.files)
            if found != expected:
                raise VectorsError(f"{label}: file holds arrays {sorted(found)}, expected "
                                   f"{sorted(expected)}")
            arrays = {k: npz[k] for k in sorted(expected)}
    except VectorsError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled objects), ...
        raise VectorsError(f"{label}: cannot be read as a .npz of float arrays "
                           f"({type(exc).__name__}: {exc})") from None
    for k, a in arrays.items():
        if a.dtype != np.float64:
            raise VectorsError(f"{label}: array {k!r} has dtype {a.dtype}, expected float64")
        if list(a.shape) != list(declared[k]):
            raise VectorsError(f"{label}: array {k!r} has shape {list(a.shape)}, the manifest "
                               f"says {declared[k]}")
        if not np.all(np.isfinite(a)):
            raise VectorsError(f"{label}: array {k!r} contains NaN or Inf")
    return arrays


def _check_members(fpath: Path, declared: Mapping, expected: set, label: str) -> None:
    """Each zip member's ``.npy`` header against the manifest, before any data is read.

    The header (magic, version, ``descr``/``fortran_order``/``shape``) is
    read from the member's stream, which decompresses only its first bytes;
    a member whose header disagrees with the manifest, or whose stored size
    exceeds header plus ``8 prod(shape)`` bytes, is refused, so a
    decompression bomb behind a small declared shape is never expanded.
    """
    fmt = np.lib.format
    try:
        with zipfile.ZipFile(fpath) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise VectorsError(f"{label}: the zip has repeated member names")
            for info in infos:
                key = info.filename[:-4] if info.filename.endswith(".npy") else None
                if key not in expected:
                    raise VectorsError(f"{label}: unexpected member {info.filename!r}; "
                                       f"expected {sorted(k + '.npy' for k in expected)}")
                with zf.open(info) as f:
                    version = fmt.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = fmt.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = fmt.read_array_header_2_0(f)
                    else:
                        raise VectorsError(f"{label}: member {info.filename!r} has .npy "
                                           f"version {version}; 1.0 or 2.0 expected")
                    header = f.tell()
                if dtype != np.dtype("<f8") or fortran:
                    raise VectorsError(f"{label}: array {key!r} is declared "
                                       f"{dtype.str}{' Fortran order' if fortran else ''}; "
                                       "expected '<f8' in C order")
                if list(shape) != list(declared[key]):
                    raise VectorsError(f"{label}: array {key!r} has shape {list(shape)}, the "
                                       f"manifest says {declared[key]}")
                if info.file_size != header + 8 * math.prod(shape):
                    raise VectorsError(f"{label}: member {info.filename!r} holds "
                                       f"{info.file_size} bytes, its header declares "
                                       f"{header + 8 * math.prod(shape)}; refused")
    except VectorsError:
        raise
    except Exception as exc:   # BadZipFile, a malformed .npy header, ...
        raise VectorsError(f"{label}: cannot be read as a .npz of float arrays "
                           f"({type(exc).__name__}: {exc})"[:500]) from None


def load(path: str | os.PathLike) -> GoldenVectors:
    """Read and verify an export written by :func:`export`.

    ``path`` is the export directory or its ``manifest.json``.  Checks the
    schema and its version, every required manifest key and type, each
    file's size and SHA-256, the set of arrays in each file, their dtype
    (float64), shapes and finiteness.  Files are opened with
    ``allow_pickle=False``: nothing on disk is ever executed.

    Hostile or broken exports are refused before anything large is read:
    a manifest or case file whose path resolves outside ``path`` (symlinks
    included); a manifest over :data:`MAX_MANIFEST_BYTES`, nested deeper
    than :data:`MAX_JSON_DEPTH`, with a number that overflows float64 (e.g.
    ``1e400``), a key of the wrong type or missing, or a tolerance outside
    ``[0, MAX_TOLERANCE]``; arrays of a case whose declared shapes disagree
    (cotangent vs output, VJP/tangent vs input, batch dimensions) or exceed
    :data:`MAX_ARRAY_BYTES`; a zip member whose ``.npy`` header (read
    without decompressing the data) disagrees with the manifest or whose
    stored size does not match it.

    Raises
    ------
    VectorsError (a ValueError) naming the file and the problem.
    """
    root = Path(path)
    if root.is_file() and root.name == MANIFEST:
        root = root.parent
    if not root.exists():
        raise VectorsError(f"{root} does not exist")
    manifest = _read_manifest(root)
    cases = []
    for op, entry in manifest["operators"].items():
        names = [i["name"] for i in entry["inputs"]]
        out = entry["output"]["name"]
        for c in entry["cases"]:
            arrays = _read_case_file(root, op, entry, c)
            params = {fld: dict(c[fld]) for fld in _PARAM_FIELDS}
            for (fld, k), key in _param_refs(c).items():
                params[fld][k] = arrays[key]
            cases.append(GoldenCase(
                op=op, id=c["id"], description=c["description"], dtype=c["dtype"],
                seed=c["seed"], flags=tuple(c["flags"]), params=params["params"],
                vjp_params=params["vjp_params"], jvp_params=params["jvp_params"],
                tolerance=c["tolerance"],
                inputs={n: arrays[f"input.{n}"] for n in names},
                output=arrays[f"output.{out}"], cotangent=arrays[f"cotangent.{out}"],
                vjp={n: arrays[f"vjp.{n}"] for n in names},
                tangents=({n: arrays[f"tangent.{n}"] for n in names}
                          if entry["has_jvp"] else None),
                jvp=arrays[f"jvp.{out}"] if entry["has_jvp"] else None,
                diagnostics=c.get("reference", {}),
                for_candidates=c["for_candidates"],
                candidate_kwargs=params["candidate_kwargs"],
            ))
    return GoldenVectors(path=root, manifest=manifest, cases=tuple(cases))
