"""Golden vectors: export -> load round trip, meaning of the numbers, integrity checks."""

import dataclasses
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from refimpl import check, cli, registry, vectors
from refimpl.vectors import VectorsError

LINEAR_SOLVE = registry.get_spec("linear_solve")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export of linear_solve in both dtypes, shared read-only by the tests."""
    d = tmp_path_factory.mktemp("golden")
    vectors.export(d, ops=["linear_solve"], dtypes=("float64", "float32"))
    return d


@pytest.fixture
def export_copy(exported, tmp_path):
    """A private copy of the export that a test may corrupt."""
    d = tmp_path / "copy"
    shutil.copytree(exported, d)
    return d


def _manifest(d):
    return json.loads((d / vectors.MANIFEST).read_text())


def _write_manifest(d, m):
    (d / vectors.MANIFEST).write_text(json.dumps(m))


def _entry(m, case_id="well_conditioned", dtype="float64"):
    return next(c for c in m["operators"]["linear_solve"]["cases"]
                if c["id"] == case_id and c["dtype"] == dtype)


# --------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------

def test_round_trip_is_bit_identical(exported):
    gv = vectors.load(exported)
    expected_ids = {(c.id, dt) for c in LINEAR_SOLVE.cases for dt in c.dtypes}
    assert {(c.id, c.dtype) for c in gv} == expected_ids
    for case in LINEAR_SOLVE.cases:
        for dt in case.dtypes:
            fresh = vectors.reference_case(LINEAR_SOLVE, case, dt)
            got = gv.case("linear_solve", case.id, dt)
            want_arrays = fresh.arrays("x")
            got_arrays = got.arrays("x")
            assert want_arrays.keys() == got_arrays.keys()
            for k in want_arrays:
                assert got_arrays[k].dtype == np.float64
                assert got_arrays[k].shape == want_arrays[k].shape, k
                # bit-identical: compare the bytes, not values within a tolerance
                assert got_arrays[k].tobytes() == want_arrays[k].tobytes(), k
            assert got.params == fresh.params and got.flags == fresh.flags
            assert got.tolerance == fresh.tolerance
            assert got.seed == case.seed and got.description == case.description


def test_manifest_content(exported):
    m = _manifest(exported)
    assert m["schema"] == vectors.SCHEMA and m["schema_version"] == vectors.SCHEMA_VERSION
    import scipy
    import refimpl
    assert m["versions"]["refimpl"] == refimpl.__version__
    assert m["versions"]["numpy"] == np.__version__
    assert m["versions"]["scipy"] == scipy.__version__
    op = m["operators"]["linear_solve"]
    assert [i["name"] for i in op["inputs"]] == ["A", "b"]
    assert [i["core_ndim"] for i in op["inputs"]] == [2, 1]
    assert op["output"] == {"name": "x", "core_ndim": 1}
    assert op["signature"] == "linear_solve(A, b) -> x"
    assert op["has_jvp"] is True and op["surrogate"] is False
    assert "gauge" in op["conventions"] and "broadcasting" in op["conventions"]
    e = _entry(m, "batched_scales")
    assert e["flags"] == ["batched", "scales"]
    assert e["tolerance"] == dataclasses.asdict(LINEAR_SOLVE.tolerance(LINEAR_SOLVE.case("batched_scales"), "float64"))
    assert e["file"] == "linear_solve/batched_scales.float64.npz"
    digest = hashlib.sha256((exported / e["file"]).read_bytes()).hexdigest()
    assert e["sha256"] == digest
    # ill_conditioned is float64-only: no float32 file
    assert not (exported / "linear_solve" / "ill_conditioned.float32.npz").exists()


def test_files_are_plain_npz_readable_without_refimpl(exported):
    """What docs/vectors.md promises a reader in another language: a zip of .npy."""
    import zipfile
    path = exported / "linear_solve" / "shared_matrix.float64.npz"
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
        assert names == sorted(f"{k}.npy" for k in
                               ["input.A", "input.b", "output.x", "cotangent.x", "vjp.A",
                                "vjp.b", "tangent.A", "tangent.b", "jvp.x"])
        raw = zf.read("input.A.npy")
    assert raw[:6] == b"\x93NUMPY" and raw[6:8] == b"\x01\x00"   # .npy format 1.0
    header_len = int.from_bytes(raw[8:10], "little")
    header = raw[10:10 + header_len].decode("latin1")
    assert "'descr': '<f8'" in header and "'fortran_order': False" in header
    assert "'shape': (3, 3)" in header
    data = np.frombuffer(raw[10 + header_len:], dtype="<f8").reshape(3, 3)
    gv = vectors.load(exported)
    assert np.array_equal(data, gv.case("linear_solve", "shared_matrix").inputs["A"])


def test_numbers_mean_what_the_format_says(exported):
    """Independent checks of each stored array against its definition."""
    gv = vectors.load(exported)
    for c in gv.cases_of("linear_solve", "float64"):
        A, b, x = c.inputs["A"], c.inputs["b"], c.output
        v = c.cotangent
        Ab, xb = np.broadcast_arrays(A, b[..., None])[0], x
        # output: SciPy's solve, member by member
        bshape = xb.shape[:-1]
        for idx in np.ndindex(*bshape):
            xs = scipy.linalg.solve(Ab[idx], np.broadcast_to(b, x.shape)[idx])
            assert np.allclose(xb[idx], xs, rtol=1e-8, atol=0), c.id
        # vjp: A^T b_bar = out_bar and A_bar = -b_bar x^T (summed where A is broadcast)
        b_bar = c.vjp["b"]
        assert np.allclose(np.einsum("...ji,...j->...i", Ab, np.broadcast_to(b_bar, x.shape)),
                           v, rtol=1e-8, atol=1e-12 * np.abs(v).max())
        A_bar = -(b_bar[..., :, None] * x[..., None, :])
        A_bar = A_bar.reshape((-1,) + A.shape).sum(axis=0) if A_bar.ndim > A.ndim else A_bar
        assert np.allclose(c.vjp["A"], A_bar, rtol=1e-12, atol=0)
        # jvp vs vjp: the dot-product identity <J u, v> = <u, J^T v>
        lhs = np.sum(c.jvp * v)
        rhs = sum(np.sum(c.tangents[k] * c.vjp[k]) for k in ("A", "b"))
        assert abs(lhs - rhs) <= 1e-9 * (abs(lhs) + abs(rhs))
        # jvp vs a central difference of SciPy's solve along the tangent
        if c.id == "well_conditioned":
            h = 1e-6
            xp = scipy.linalg.solve(A + h * c.tangents["A"], b + h * c.tangents["b"])
            xm = scipy.linalg.solve(A - h * c.tangents["A"], b - h * c.tangents["b"])
            assert np.allclose(c.jvp, (xp - xm) / (2 * h), rtol=1e-6)


def test_float32_vectors_are_float32_representable(exported):
    gv = vectors.load(exported)
    c32 = gv.case("linear_solve", "well_conditioned", "float32")
    c64 = gv.case("linear_solve", "well_conditioned", "float64")
    for a in [*c32.inputs.values(), c32.cotangent, *c32.tangents.values()]:
        assert np.array_equal(a.astype(np.float32).astype(np.float64), a)
    assert not np.array_equal(c32.inputs["A"], c64.inputs["A"])   # really rounded
    assert c32.tolerance["forward"] == LINEAR_SOLVE.tol["float32"].forward
    # the expected output is the float64 answer for the rounded inputs
    assert np.allclose(c32.inputs["A"] @ c32.output, c32.inputs["b"], rtol=1e-13, atol=1e-13)


def test_export_is_deterministic(exported, tmp_path):
    vectors.export(tmp_path, ops=["linear_solve"], dtypes=("float64", "float32"))
    assert (tmp_path / vectors.MANIFEST).read_bytes() == (exported / vectors.MANIFEST).read_bytes()


def test_export_selection_and_errors(tmp_path):
    vectors.export(tmp_path, ops=["linear_solve"], cases=["scalar"])
    gv = vectors.load(tmp_path)
    assert [(c.id, c.dtype) for c in gv] == [("scalar", "float64")]
    with pytest.raises(ValueError, match="unknown operator 'nope'"):
        vectors.export(tmp_path, ops=["nope"])
    with pytest.raises(ValueError, match="unknown case"):
        vectors.export(tmp_path, ops=["linear_solve"], cases=["nope"])
    with pytest.raises(ValueError, match="float16"):
        vectors.export(tmp_path, ops=["linear_solve"], dtypes=("float16",))
    with pytest.raises(ValueError, match="nothing to export"):
        vectors.export(tmp_path, ops=["linear_solve"], cases=["ill_conditioned"],
                       dtypes=("float32",))


# --------------------------------------------------------------------------
# Conventions from the spec (operators added later are covered the same way)
# --------------------------------------------------------------------------

def _gauge(bars):
    """b_bar - mean(b_bar): b's gradient is defined up to a constant (toy gauge)."""
    A_bar, b_bar = bars
    return A_bar, b_bar - np.mean(b_bar, axis=-1, keepdims=True)


def test_gauge_and_params_reach_the_manifest(tmp_path):
    spec = dataclasses.replace(
        LINEAR_SOLVE, name="toy_gauge", canonicalize=_gauge, conventions={},
        candidate_params=("alpha",),
        cases=(dataclasses.replace(LINEAR_SOLVE.case("well_conditioned"),
                                   params={}, vjp_params={}),))
    vectors.export(tmp_path, ops=[spec])
    op = _manifest(tmp_path)["operators"]["toy_gauge"]
    # no explicit convention: the canonicalize docstring's first line is used
    assert op["conventions"]["gauge"] == _gauge.__doc__.splitlines()[0]
    assert op["signature"] == "toy_gauge(A, b, *, alpha) -> x"
    c = vectors.load(tmp_path).case("toy_gauge", "well_conditioned")
    assert abs(c.vjp["b"].sum()) < 1e-12 * np.abs(c.vjp["b"]).max()   # stored canonicalised


def test_unjsonable_param_is_a_clear_error(tmp_path):
    case = dataclasses.replace(LINEAR_SOLVE.case("scalar"), params={"weights": object()})
    spec = dataclasses.replace(LINEAR_SOLVE, name="toy_params", cases=(case,),
                               forward=lambda A, b, weights: LINEAR_SOLVE.forward(A, b))
    with pytest.raises(TypeError, match="toy_params/scalar params.weights has type object"):
        vectors.export(tmp_path, ops=[spec])


def test_reference_failure_names_the_case(tmp_path):
    def broken(A, b):
        raise RuntimeError("boom")
    spec = dataclasses.replace(LINEAR_SOLVE, name="toy_broken", forward=broken)
    with pytest.raises(RuntimeError, match="toy_broken/well_conditioned.*boom"):
        vectors.export(tmp_path, ops=[spec])


# --------------------------------------------------------------------------
# Integrity: corrupted or mismatched files give a clear error
# --------------------------------------------------------------------------

def test_flipped_byte_is_detected(export_copy):
    path = export_copy / "linear_solve" / "well_conditioned.float64.npz"
    data = bytearray(path.read_bytes())
    first = data.index(b"\x93NUMPY")          # input.A.npy: 128-byte header, then data
    data[first + 128 + 8 * 7 + 3] ^= 0x01      # a bit in the mantissa of A[1, 2]
    path.write_bytes(bytes(data))
    with pytest.raises(VectorsError, match="well_conditioned.*SHA-256.*corrupted"):
        vectors.load(export_copy)


def test_modified_but_valid_file_is_detected(export_copy):
    """A rewritten, perfectly valid .npz with one number changed: only the hash knows."""
    path = export_copy / "linear_solve" / "well_conditioned.float64.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["vjp.A"] = arrays["vjp.A"].copy()
    arrays["vjp.A"][1, 2] *= 1.0 + 1e-12
    vectors._write_npz(path, arrays)
    with np.load(path) as z:                   # NumPy reads it without complaint
        assert np.array_equal(z["vjp.A"], arrays["vjp.A"])
    with pytest.raises(VectorsError, match="well_conditioned.*SHA-256.*corrupted"):
        vectors.load(export_copy)


def test_truncated_and_missing_files_are_detected(export_copy):
    path = export_copy / "linear_solve" / "scalar.float64.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(VectorsError, match="scalar.*bytes.*truncated"):
        vectors.load(export_copy)
    path.unlink()
    with pytest.raises(VectorsError, match="scalar.*missing"):
        vectors.load(export_copy)


def test_manifest_problems_are_detected(export_copy):
    good = _manifest(export_copy)

    (export_copy / vectors.MANIFEST).write_text(json.dumps(good)[:-10])
    with pytest.raises(VectorsError, match="not valid JSON"):
        vectors.load(export_copy)

    m = json.loads(json.dumps(good))

    m["schema_version"] = 99
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match="schema_version 99.*newer"):
        vectors.load(export_copy)

    m = json.loads(json.dumps(good))

    m["schema"] = "something-else"
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match="schema 'something-else'"):
        vectors.load(export_copy)

    m = json.loads(json.dumps(good))

    del _entry(m)["sha256"]
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match="missing the key 'sha256'"):
        vectors.load(export_copy)

    m = json.loads(json.dumps(good))

    _entry(m)["tolerance"]["fd"] = "small"
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match=r"tolerance\['fd'\] must be float"):
        vectors.load(export_copy)

    for bad in ("NaN", "Infinity", "-Infinity"):     # Python's json would accept these
        text = json.dumps(good).replace('"fd": 1e-08', f'"fd": {bad}', 1)
        assert bad in text
        (export_copy / vectors.MANIFEST).write_text(text)
        with pytest.raises(VectorsError, match=f"contains {bad}, which is not JSON"):
            vectors.load(export_copy)

    m = json.loads(json.dumps(good))

    _entry(m)["tolerance"]["fd"] = -1e-8
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match=r"tolerance\['fd'\] is negative"):
        vectors.load(export_copy)

    m = json.loads(json.dumps(good))

    m["schema_version"] = 1
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match="schema_version 1.*older"):
        vectors.load(export_copy)

    m = json.loads(json.dumps(good))

    del _entry(m)["candidate_kwargs"]
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match="missing the key 'candidate_kwargs'"):
        vectors.load(export_copy)

    m = json.loads(json.dumps(good))

    _entry(m)["file"] = "../outside.npz"
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match="must be relative"):
        vectors.load(export_copy)

    # a declared shape that disagrees with the other arrays of the case
    m = json.loads(json.dumps(good))
    _entry(m)["arrays"]["input.A"] = [4, 4]
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match=r"vjp.A has shape \[5, 5\] but input.A has \[4, 4\]"):
        vectors.load(export_copy)
    # consistent declared shapes that disagree with the file's .npy headers
    m = json.loads(json.dumps(good))
    for k in ("input.A", "vjp.A", "tangent.A"):
        _entry(m)["arrays"][k] = [4, 4]
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match=r"'input.A' has shape \[5, 5\].*says \[4, 4\]"):
        vectors.load(export_copy)

    m = json.loads(json.dumps(good))

    m["operators"]["linear_solve"]["has_jvp"] = False
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match="manifest lists arrays"):
        vectors.load(export_copy)

    _write_manifest(export_copy, good)
    assert len(vectors.load(export_copy / vectors.MANIFEST)) == len(vectors.load(export_copy))


def test_no_manifest_or_no_directory(tmp_path):
    with pytest.raises(VectorsError, match="does not exist"):
        vectors.load(tmp_path / "nope")
    with pytest.raises(VectorsError, match="no manifest.json"):
        vectors.load(tmp_path)


def _rehash(d, entry, path):
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    entry["size"] = path.stat().st_size


def test_swapped_file_with_matching_hash_but_wrong_arrays(export_copy):
    """A file replaced by another case's (hash updated): shapes/keys still checked."""
    m = _manifest(export_copy)
    e = _entry(m)
    src = export_copy / "linear_solve" / "scalar.float64.npz"
    dst = export_copy / e["file"]
    shutil.copy(src, dst)
    _rehash(export_copy, e, dst)
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match="well_conditioned.*shape"):
        vectors.load(export_copy)


def test_load_never_unpickles(export_copy):
    """An object array (a pickle) in a case file is refused without being executed."""
    marker = export_copy / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    m = _manifest(export_copy)
    e = _entry(m)
    path = export_copy / e["file"]
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["input.A"] = np.array([Payload()], dtype=object)
    with open(path, "wb") as f:
        np.savez(f, **arrays)     # allow_pickle defaults to True on save
    _rehash(export_copy, e, path)
    _write_manifest(export_copy, m)
    # refused from the member's .npy header (dtype object), before np.load reads it
    with pytest.raises(VectorsError, match=r"'input.A' is declared \|O; expected '<f8'"):
        vectors.load(export_copy)
    assert not marker.exists()


# --------------------------------------------------------------------------
# Hostile or broken exports: refused before anything large is read
# --------------------------------------------------------------------------

def test_symlinked_case_file_outside_the_directory_is_refused(export_copy, tmp_path):
    """Same bytes, same hash: refused only because it lives outside DIR."""
    path = export_copy / "linear_solve" / "well_conditioned.float64.npz"
    outside = tmp_path / "elsewhere.npz"
    outside.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(VectorsError, match="well_conditioned.*outside the export directory"):
        vectors.load(export_copy)


def test_symlink_inside_the_directory_is_followed(export_copy):
    """A link to a file within DIR (deduplicated exports) is fine."""
    path = export_copy / "linear_solve" / "well_conditioned.float64.npz"
    kept = export_copy / "linear_solve" / "kept.bin"
    kept.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(kept)
    gv = vectors.load(export_copy)
    assert gv.case("linear_solve", "well_conditioned").output.shape == (5,)


def test_symlinked_operator_folder_outside_is_refused(export_copy, tmp_path):
    folder = export_copy / "linear_solve"
    outside = tmp_path / "ops_elsewhere"
    shutil.move(str(folder), str(outside))
    folder.symlink_to(outside, target_is_directory=True)
    with pytest.raises(VectorsError, match="outside the export directory"):
        vectors.load(export_copy)


def test_symlinked_manifest_outside_is_refused(export_copy, tmp_path):
    manifest = export_copy / vectors.MANIFEST
    outside = tmp_path / "manifest_elsewhere.json"
    shutil.move(str(manifest), str(outside))
    manifest.symlink_to(outside)
    with pytest.raises(VectorsError, match="manifest.json.*outside the export directory"):
        vectors.load(export_copy)


def _manifest_text_with(d, old, new):
    text = (d / vectors.MANIFEST).read_text()
    assert old in text
    (d / vectors.MANIFEST).write_text(text.replace(old, new, 1))


def test_overflowing_or_absurd_tolerance_is_refused(export_copy):
    good = _manifest(export_copy)
    fd = _entry(good)["tolerance"]["fd"]
    # 1e400 parses to inf in Python's json: a wrong candidate would pass any comparison
    _manifest_text_with(export_copy, f'"fd": {json.dumps(fd)}', '"fd": 1e400')
    with pytest.raises(VectorsError, match="1e400.*overflows float64"):
        vectors.load(export_copy)
    for bad in (2.0, 1e300):
        m = json.loads(json.dumps(good))
        _entry(m)["tolerance"]["fd"] = bad
        _write_manifest(export_copy, m)
        with pytest.raises(VectorsError, match=r"tolerance\['fd'\] is .*at most 1"):
            vectors.load(export_copy)


def test_validate_refuses_vectors_with_an_absurd_tolerance(export_copy, capsys):
    """The CLI: one line, exit 2, no traceback; nothing is run against the vectors."""
    m = _manifest(export_copy)
    _entry(m)["tolerance"]["fd"] = 10.0
    _write_manifest(export_copy, m)
    ex = ROOT / "examples" / "numpy_linear_solve.py"
    rc = cli.main(["validate", "linear_solve", f"{ex}:linear_solve", "--framework", "numpy",
                   "--vjp", f"{ex}:linear_solve_vjp", "--vectors", str(export_copy)])
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert "tolerance['fd'] is 10.0" in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""


def _npy_header(shape, descr="<f8"):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _replace_member(path, key, write, arrays=None):
    """Rewrite the .npz at ``path`` (of ``arrays``, default its current ones) with
    member ``key``.npy produced by ``write(zipfile, name)``."""
    if arrays is None:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    with zipfile.ZipFile(path, "w") as zf:
        for k, a in arrays.items():
            if k == key:
                write(zf, f"{k}.npy")
            else:
                with zf.open(f"{k}.npy", "w") as f:
                    np.lib.format.write_array(f, a)


def test_decompression_bomb_is_refused_before_decompressing(export_copy, monkeypatch):
    """A deflated member declaring shape (5, 5) but holding 64 MiB: the header and the
    zip directory disagree, so the data is never decompressed (np.load never runs)."""
    m = _manifest(export_copy)
    e = _entry(m)
    path = export_copy / e["file"]

    def bomb(zf, name):
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as f:
            f.write(_npy_header((5, 5)))
            zeros = bytes(1 << 20)
            for _ in range(64):
                f.write(zeros)

    _replace_member(path, "input.A", bomb)
    assert path.stat().st_size < (1 << 20)           # small on disk
    _rehash(export_copy, e, path)
    _write_manifest(export_copy, m)

    def no_load(*args, **kwargs):
        raise AssertionError("np.load reached")

    monkeypatch.setattr(np, "load", no_load)
    with pytest.raises(VectorsError, match=r"member 'input.A.npy' holds 67108992 bytes, its "
                                           r"header declares 328"):
        vectors.load(export_copy)


def test_member_header_disagreeing_with_the_manifest_is_refused(export_copy, monkeypatch):
    """The header's shape and dtype are checked against the manifest before np.load."""
    m = _manifest(export_copy)
    e = _entry(m)
    path = export_copy / e["file"]

    with np.load(path) as z:
        original = {k: z[k] for k in z.files}

    def big_header(zf, name):   # declares 1e5 x 1e5 (np.load would allocate 75 GiB)
        zf.writestr(name, _npy_header((100000, 100000)))

    _replace_member(path, "input.A", big_header)
    _rehash(export_copy, e, path)
    _write_manifest(export_copy, m)
    with monkeypatch.context() as mp:
        mp.setattr(np, "load", lambda *a, **k: pytest.fail("np.load reached"))
        with pytest.raises(VectorsError, match=r"'input.A' has shape \[100000, 100000\], "
                                               r"the manifest says \[5, 5\]"):
            vectors.load(export_copy)

    def float32(zf, name):
        with zf.open(name, "w") as f:
            np.lib.format.write_array(f, np.zeros((5, 5), dtype="<f4"))

    _replace_member(path, "input.A", float32, original)
    _rehash(export_copy, e, path)
    _write_manifest(export_copy, m)
    with monkeypatch.context() as mp:
        mp.setattr(np, "load", lambda *a, **k: pytest.fail("np.load reached"))
        with pytest.raises(VectorsError, match=r"'input.A' is declared <f4; expected '<f8'"):
            vectors.load(export_copy)


def test_declared_shapes_over_the_size_cap_are_refused(export_copy):
    m = _manifest(export_copy)
    for k in ("input.A", "vjp.A", "tangent.A"):
        _entry(m)["arrays"][k] = [5, 100000, 100000]      # 400 GB of float64
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match=r"arrays\['input.A'\] has shape .*more than the "
                                           r"limit"):
        vectors.load(export_copy)


def _rewrite_case(d, m, changes):
    """Rewrite well_conditioned's file with ``changes`` applied and the manifest
    (shapes, hash, size) updated to match: file and manifest agree."""
    e = _entry(m)
    path = d / e["file"]
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    vectors._write_npz(path, arrays)
    e["arrays"] = {k: list(a.shape) for k, a in arrays.items()}
    _rehash(d, e, path)
    _write_manifest(d, m)


@pytest.mark.parametrize("key, shape, message", [
    ("cotangent.x", (4,), r"cotangent.x has shape \[4\] but output.x has \[5\]"),
    ("vjp.A", (5, 4), r"vjp.A has shape \[5, 4\] but input.A has \[5, 5\]"),
    ("tangent.b", (3,), r"tangent.b has shape \[3\] but input.b has \[5\]"),
    ("jvp.x", (2, 5), r"jvp.x has shape \[2, 5\] but output.x has \[5\]"),
    ("input.b", (2, 3, 5), None),            # with matching vjp/tangent: batch mismatch
    ("input.A", (5,), r"input.A has shape \[5\], fewer than its core_ndim 2"),
])
def test_inconsistent_shapes_within_a_case_are_refused(export_copy, key, shape, message):
    """File and manifest agree, hashes match, but the case's arrays contradict each other."""
    m = _manifest(export_copy)
    changes = {key: np.ones(shape)}
    if key == "input.b":
        changes.update({"vjp.b": np.ones(shape), "tangent.b": np.ones(shape)})
        message = r"output.x has batch shape \[\], the inputs' batch shapes broadcast to \[2, 3\]"
    if key == "input.A":
        changes.update({"vjp.A": np.ones(shape), "tangent.A": np.ones(shape)})
    _rewrite_case(export_copy, m, changes)
    with pytest.raises(VectorsError, match=message):
        vectors.load(export_copy)


def test_deeply_nested_manifest_is_a_clear_error(export_copy):
    good = _manifest(export_copy)
    # deep enough for the parser's recursion limit: no RecursionError escapes
    _manifest_text_with(export_copy, '"params": {}', '"params": {"p": ' + "[" * 100000
                        + "]" * 100000 + "}")
    with pytest.raises(VectorsError, match="nests JSON objects/lists too deeply"):
        vectors.load(export_copy)
    # parseable but deeper than any manifest needs
    m = json.loads(json.dumps(good))
    nested = 1.0
    for _ in range(vectors.MAX_JSON_DEPTH + 5):
        nested = [nested]
    _entry(m)["params"]["p"] = nested
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match=f"more than {vectors.MAX_JSON_DEPTH} levels"):
        vectors.load(export_copy)


def _set(path):
    def change(m):
        *head, last = path
        target = _entry(m)
        for k in head:
            target = target[k]
        return target, last
    return change


@pytest.mark.parametrize("where, value, message", [
    (("arrays", "input.A"), ["5", 5], r"arrays\['input.A'\] must be a list of non-negative"),
    (("arrays", "input.A"), [5, -5], r"arrays\['input.A'\] must be a list of non-negative"),
    (("arrays", "input.A"), 25, r"arrays\['input.A'\] must be a list of non-negative"),
    (("flags",), [1], r"flags\[0\] must be str"),
    (("size",), -1, r"size is -1; it must be >= 0"),
    (("sha256",), "xyz", "sha256 must be 64 hex digits"),
    (("seed",), "7", r"\['seed'\] must be int, got str"),
    (("tolerance",), [1e-8], r"\['tolerance'\] must be dict, got list"),
    (("candidate_kwargs", "k"), {"$array": 5}, r"candidate_kwargs\['k'\] must be"),
])
def test_malformed_case_entries_are_refused(export_copy, where, value, message):
    m = _manifest(export_copy)
    target, last = _set(where)(m)
    target[last] = value
    _write_manifest(export_copy, m)
    with pytest.raises(VectorsError, match=message):
        vectors.load(export_copy)


def test_malformed_operator_entries_are_refused(export_copy):
    good = _manifest(export_copy)
    for change, message in [
        (lambda op: op["inputs"][0].update(name="../A"), r"'../A' is not a valid name"),
        (lambda op: op["inputs"][1].update(name="A"), "repeated names"),
        (lambda op: op["inputs"][0].update(core_ndim=-1), "core_ndim'] is -1"),
        (lambda op: op.update(candidate_params=[3]), r"candidate_params\[0\] must be str"),
        (lambda op: op["output"].update(name=7), r"output\['name'\] must be str"),
    ]:
        m = json.loads(json.dumps(good))
        change(m["operators"]["linear_solve"])
        _write_manifest(export_copy, m)
        with pytest.raises(VectorsError, match=message):
            vectors.load(export_copy)
    # a 5000-digit integer: Python's int parser refuses it with a ValueError
    _write_manifest(export_copy, good)
    _manifest_text_with(export_copy, '"schema_version": 2', '"schema_version": ' + "9" * 5000)
    with pytest.raises(VectorsError, match="is not valid JSON"):
        vectors.load(export_copy)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def test_cli_export(tmp_path, capsys):
    rc = cli.main(["export", str(tmp_path), "--op", "linear_solve", "--dtype", "all"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "linear_solve: 9 case file(s) (float32, float64)" in out
    assert "read back and verified" in out
    assert len(vectors.load(tmp_path)) == 9


def test_cli_export_exclude_case(tmp_path, capsys):
    rc = cli.main(["export", str(tmp_path), "--op", "linear_solve",
                   "--exclude-case", "ill_conditioned", "--exclude-case", "batched_scales"])
    assert rc == 0, capsys.readouterr()
    ids = {c.id for c in vectors.load(tmp_path)}
    assert ids == {c.id for c in LINEAR_SOLVE.cases} - {"ill_conditioned", "batched_scales"}
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path), "--op", "linear_solve", "--case", "scalar",
                     "--exclude-case", "scalar"]) == 2
    assert "every selected case is excluded" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path), "--op", "linear_solve",
                     "--exclude-case", "nope"]) == 2
    assert "no case 'nope'" in capsys.readouterr().err


def test_cli_export_errors(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--op", "nope"]) == 2
    assert "unknown operator 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["export", str(tmp_path), "--dtype", "float16"])


# --------------------------------------------------------------------------
# Array parameters, candidate flags, and every registered operator
# --------------------------------------------------------------------------

def test_array_params_and_for_candidates_round_trip(tmp_path):
    from refimpl import linsolve

    def forward(A, b, *, shift):     # an array parameter (unused by the maths here)
        assert shift.shape == (5,)
        return linsolve.solve(A, b)

    weights = np.array([0.5, -1.25, 2.0, 3.0, 1e-3])
    case = dataclasses.replace(LINEAR_SOLVE.case("well_conditioned"),
                               params={"shift": weights}, for_candidates=False)
    spec = dataclasses.replace(LINEAR_SOLVE, name="toy_array_param", forward=forward,
                               oracle=None, cases=(case,), candidate_params=("shift",))
    vectors.export(tmp_path, ops=[spec])
    e = _manifest(tmp_path)["operators"]["toy_array_param"]["cases"][0]
    assert e["params"] == {"shift": {"$array": "param.shift"}}
    assert e["candidate_kwargs"] == {"shift": {"$array": "param.shift"}}
    assert e["for_candidates"] is False
    c = vectors.load(tmp_path).case("toy_array_param", "well_conditioned")
    assert isinstance(c.params["shift"], np.ndarray)
    assert c.params["shift"].tobytes() == weights.tobytes()
    assert c.candidate_kwargs["shift"].tobytes() == weights.tobytes()
    assert c.for_candidates is False
    x0 = scipy.linalg.solve(c.inputs["A"], c.inputs["b"])
    assert np.allclose(c.output, x0, rtol=1e-12)


ALL_SPECS = registry.all_specs()


@pytest.fixture(scope="module")
def exported_all(tmp_path_factory):
    """Every registered operator in both dtypes (a few seconds), read-only."""
    d = tmp_path_factory.mktemp("golden_all")
    vectors.export(d, dtypes=("float64", "float32"))
    return vectors.load(d)


def test_every_registered_operator_exports_and_loads(exported_all):
    """Operators added to the registry are covered by export/load automatically."""
    gv = exported_all
    assert set(gv.ops) == {s.name for s in ALL_SPECS}
    for spec in ALL_SPECS:
        for dt in ("float64", "float32"):
            got = {c.id for c in gv.cases_of(spec.name, dt)}
            assert got == {c.id for c in spec.cases if dt in c.dtypes}, (spec.name, dt)
        op = gv.operator(spec.name)
        assert op["conventions"]["gauge"]
        assert op["candidate_params"] == list(spec.candidate_params)
        assert op["surrogate"] is spec.surrogate
        for c in gv.cases_of(spec.name):
            assert set(c.candidate_kwargs) <= set(spec.candidate_params), (spec.name, c.id)


def test_every_exported_case_means_what_the_format_says(exported_all):
    """The stored numbers of every operator, checked by routes other than the code that
    wrote them: the output against the registry's independent oracle (SciPy, POT, closed
    forms, brute force), and the stored JVP against the stored VJP by the dot-product
    identity <J u, v> = sum_k <u_k, J_k^T v> (two separate code paths; the gauge applied
    to the VJP is invisible to the feasible tangents)."""
    n_oracle = n_dot = 0
    for c in exported_all:
        spec = registry.get_spec(c.op)
        if spec.oracle is not None:
            want = np.asarray(spec.oracle(*(c.inputs[k] for k in spec.inputs), **c.params))
            r = check.compare(c.output, want, rtol=c.tolerance["forward"])
            assert r.passed, (c.op, c.id, c.dtype, r.error)
            n_oracle += 1
        if c.tangents is not None and not spec.surrogate:
            lhs = float(np.sum(c.jvp * c.cotangent))
            rhs = sum(float(np.sum(c.tangents[k] * c.vjp[k])) for k in spec.inputs)
            scale = (np.linalg.norm(c.jvp) * np.linalg.norm(c.cotangent)
                     + sum(np.linalg.norm(c.tangents[k]) * np.linalg.norm(c.vjp[k])
                           for k in spec.inputs))
            assert abs(lhs - rhs) <= c.tolerance["adjoint"] * scale, (c.op, c.id, c.dtype)
            n_dot += 1
    assert n_oracle > 200 and n_dot > 150          # nearly every case is covered


def test_candidate_kwargs_are_explicit_in_the_manifest(exported_all):
    """A consumer in another language gets the exact keywords, defaults included."""
    m = exported_all.manifest["operators"]
    pair = next(c for c in m["soft_topk"]["cases"] if c["id"] == "pair")
    assert "largest" not in pair["params"]                 # refimpl's forward default...
    assert pair["candidate_kwargs"] == {"k": 1, "eps": 0.7, "largest": True}   # ...written out
    lam = next(c for c in m["blackbox_shortest_path"]["cases"] if c["id"] == "grid_3x4")
    lam_value = {**lam["params"], **lam["vjp_params"]}["lam"]  # wherever the case keeps it
    assert lam["candidate_kwargs"] == {"lam": lam_value}
    sk = next(c for c in m["sinkhorn"]["cases"] if c["id"] == "nonuniform_6x5")
    assert set(sk["candidate_kwargs"]) == {"eps"} and "tol" in sk["params"]
