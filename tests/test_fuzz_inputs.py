"""Fuzzed input (hypothesis): study files, triplet files, release tables, concept tables and
feature files that are almost right. Every case ends either in a valid result or in one error of
the source's own kind whose message starts with the file's path; never another exception, and
nothing is written beside the input. The CLI turns them into one line and exit code 2.

Each property runs ``EXAMPLES`` cases (``--hypothesis-show-statistics`` prints what they tried)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recovery_assets import cli
from recovery_assets.sources.features import FeatureFileError, load_feature_file
from recovery_assets.sources.human import HumanDataError, read_release_table, read_triplet_file
from recovery_assets.sources.things import ThingsDataError, read_concepts
from recovery_assets.study import StudyError, load_study

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 150
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same cases on every run: a failure is reproducible
)
N_CONCEPTS = 12


def _folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-"))


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _only(folder: Path, names: set[str]) -> None:
    assert _listing(folder) == names, f"files written beside the input: {_listing(folder) - names}"


# ---------------------------------------------------------------------------- study files
TINY = yaml.safe_load((ROOT / "studies" / "tiny.yaml").read_text())
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
PATHS = [
    ("name",),
    ("kind",),
    ("sizes",),
    ("simulations",),
    ("probe", "family"),
    ("probe", "penalty"),
    ("probe", "max_iter"),
    ("generator", "lambdas"),
    ("generator", "cv_folds"),
    ("generator", "fit_on"),
    ("candidates", "lambdas"),
    ("models",),
    ("human", "convention_reference"),
    ("execution",),
    ("things",),
    ("unknown_key",),
]


@FUZZ
@given(
    edits=st.lists(st.tuples(st.sampled_from(PATHS), JUNK), min_size=1, max_size=3),
    base=st.sampled_from([None, "self", "missing", 7]),
)
def test_fuzzed_study_files(edits, base):
    folder = _folder()
    doc = yaml.safe_load(yaml.safe_dump(TINY))
    for path, value in edits:
        target = doc
        for part in path[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[path[-1]] = value
    study = folder / "study.yaml"
    if base == "self":
        doc["base"] = str(study)  # a cycle
    elif base == "missing":
        doc["base"] = str(folder / "nowhere.yaml")
    elif base is not None:
        doc["base"] = base
    study.write_text(yaml.safe_dump(doc))
    try:
        load_study(study)
    except StudyError as exc:
        assert str(exc).startswith(str(study.resolve())) or str(exc).startswith(
            str(folder / "nowhere.yaml")
        ), exc
    # through the CLI: one line, exit code 2 (a valid study has no database yet), no traceback
    env = {**os.environ, "RECOVERY_DATA": str(folder / "data")}
    res = CliRunner().invoke(cli.main, ["sql", "recovery_curve", "--study", str(study)], env=env)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert "Traceback" not in res.output
    _only(folder, {"study.yaml"})


# ---------------------------------------------------------------------------- triplet files
TOKENS = st.one_of(
    st.integers(-3, N_CONCEPTS + 3).map(str),
    st.sampled_from(["nan", "NA", "", "1.5", "2e3", "x", "99999999999999999999999", "-0", "+1"]),
)


@FUZZ
@given(
    rows=st.lists(st.lists(TOKENS, min_size=0, max_size=5), max_size=12),
    sep=st.sampled_from([" ", "\t", ",", "  "]),
    trailing=st.sampled_from(["\n", "", "\r\n", "\n\n"]),
)
def test_fuzzed_triplet_text_files(rows, sep, trailing):
    folder = _folder()
    path = folder / "trainset.txt"
    path.write_text("\n".join(sep.join(r) for r in rows) + trailing)
    try:
        out = read_triplet_file(path, N_CONCEPTS)
    except HumanDataError as exc:
        assert str(exc).startswith(str(path)), exc
    else:
        assert out.ndim == 2 and out.shape[1] == 3 and out.dtype == np.int64
        assert ((out >= 0) & (out < N_CONCEPTS)).all()
    _only(folder, {"trainset.txt"})


@FUZZ
@given(
    data=st.binary(max_size=200),
)
def test_fuzzed_binary_garbage_as_triplets_and_npy(data):
    folder = _folder()
    for name in ("trainset.txt", "trainset.npy"):
        path = folder / name
        path.write_bytes(data)
        try:
            read_triplet_file(path, N_CONCEPTS)
        except HumanDataError as exc:
            assert str(exc).startswith(str(path)), exc
    _only(folder, {"trainset.txt", "trainset.npy"})


@FUZZ
@given(
    shape=st.sampled_from([(0, 3), (4, 3), (4, 2), (3,), (2, 3, 1)]),
    dtype=st.sampled_from(["int64", "int8", "uint64", "float64", "float32", "bool", "U3"]),
    poison=st.sampled_from([None, "nan", "inf", "big", "negative", "repeat", "frac"]),
)
def test_fuzzed_npy_triplet_arrays(shape, dtype, poison):
    folder = _folder()
    rng = np.random.default_rng(sum(shape))
    arr = np.stack([rng.permutation(N_CONCEPTS)[:3] for _ in range(int(np.prod(shape)) // 3 + 1)])
    arr = arr.reshape(-1)[: int(np.prod(shape))].reshape(shape).astype(dtype)
    if arr.size and poison and arr.dtype.kind == "f":
        arr.flat[0] = {"nan": np.nan, "inf": np.inf, "big": 1e30, "frac": 0.5}.get(poison, -1)
    elif arr.size and poison in ("big", "negative", "repeat") and arr.dtype.kind in "iu":
        if poison == "repeat" and arr.ndim == 2 and arr.shape[1] == 3:
            arr[0, 1] = arr[0, 0]
        elif poison == "big":
            arr.flat[0] = np.iinfo(arr.dtype).max
    path = folder / "trainset.npy"
    np.save(path, arr)
    try:
        read_triplet_file(path, N_CONCEPTS)
    except HumanDataError as exc:
        assert str(exc).startswith(str(path)), exc
    _only(folder, {"trainset.npy"})


# ---------------------------------------------------------------------------- the release table
HEADER = ["image1", "image2", "image3", "choice", "subject_id", "noise_ceiling"]


@FUZZ
@given(
    columns=st.lists(st.sampled_from([*HEADER, "extra", "Image1"]), min_size=0, max_size=7),
    rows=st.lists(st.lists(TOKENS, min_size=0, max_size=7), max_size=10),
    sep=st.sampled_from(["\t", ","]),
)
def test_fuzzed_release_tables(columns, rows, sep):
    folder = _folder()
    path = folder / "triplets_large_final_correctednc_correctedorder.csv"
    path.write_text("\n".join(sep.join(r) for r in [columns, *rows]) + "\n")
    try:
        read_release_table(path, N_CONCEPTS)
    except HumanDataError as exc:
        assert str(exc).startswith(str(path)), exc
    _only(folder, {path.name})


# ---------------------------------------------------------------------------- concept tables
CELLS = st.one_of(st.text(max_size=6), st.sampled_from(["uniqueID", "a", "a", "NA", ""]))


@FUZZ
@given(
    header=st.lists(CELLS, min_size=0, max_size=5),
    rows=st.lists(st.lists(CELLS, min_size=0, max_size=6), max_size=8),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]),
)
def test_fuzzed_concept_tables(header, rows, encoding):
    folder = _folder()
    path = folder / "things_concepts.tsv"
    text = "\n".join("\t".join(r) for r in [header, *rows])
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        data = text.encode("utf-8")
    path.write_bytes(data)
    try:
        table = read_concepts(path)
    except ThingsDataError as exc:
        assert str(exc).startswith(str(path)), exc
    else:
        assert table["uniqueID"].is_unique and (table["uniqueID"].str.strip() != "").all()
    _only(folder, {path.name})


# ---------------------------------------------------------------------------- feature files
IDS = [f"c{i}" for i in range(6)]


@FUZZ
@given(
    rows=st.integers(0, 8),
    cols=st.integers(0, 3),
    dtype=st.sampled_from(["float32", "float64", "int16", "bool", "complex64", "U2", "O"]),
    poison=st.sampled_from([None, "nan", "inf", "huge"]),
    suffix=st.sampled_from([".npy", ".npz", ".parquet", ".pt", ".txt"]),
    ids=st.sampled_from([None, "ok", "dup", "missing", "extra"]),
)
def test_fuzzed_feature_files(rows, cols, dtype, poison, suffix, ids):
    import pandas as pd
    import torch

    folder = _folder()
    path = folder / f"features{suffix}"
    arr = np.arange(rows * cols, dtype=np.float64).reshape(rows, cols)
    if arr.size and poison:
        arr.flat[0] = {"nan": np.nan, "inf": np.inf, "huge": 1e300}[poison]
    try:
        arr = arr.astype(dtype)
    except (TypeError, ValueError):
        pass
    names = {"ok": IDS[:rows], "dup": ["c0"] * rows, "missing": IDS[: max(rows - 1, 0)]}
    names["extra"] = [*IDS[:rows], "zz"][:rows] if rows else []
    row_ids = names.get(ids) if ids else None
    try:
        if suffix == ".npy":
            np.save(path, arr, allow_pickle=True)
        elif suffix == ".npz":
            extra = {} if row_ids is None else {"uniqueID": np.array(row_ids, dtype=str)}
            with open(path, "wb") as fh:
                np.savez(fh, features=arr, **extra)
        elif suffix == ".parquet":
            frame = pd.DataFrame(arr, columns=[f"f{j}" for j in range(arr.shape[1])])
            if row_ids is not None and len(row_ids) == len(frame):
                frame.insert(0, "uniqueID", row_ids)
            frame.to_parquet(path)
        elif suffix == ".pt":
            torch.save(torch.as_tensor(arr) if arr.dtype.kind in "fiub" else arr.tolist(), path)
        else:
            path.write_text(str(arr))
    except Exception:  # noqa: BLE001 - some combinations cannot even be written; fine
        path.write_bytes(b"not a feature file")
    try:
        X, _ = load_feature_file(path, IDS)
    except FeatureFileError as exc:
        assert str(exc).startswith(str(path)), exc
    else:
        assert X.shape[0] == len(IDS) and X.dtype == np.float32 and np.isfinite(X).all()
    assert _listing(folder) == {path.name}


# ---------------------------------------------------------------------------- through the CLI
@settings(max_examples=25, deadline=None, derandomize=True)
@given(rows=st.lists(st.lists(TOKENS, min_size=0, max_size=4), min_size=1, max_size=6))
def test_fuzzed_fit_probe_inputs_through_the_cli(rows):
    """`recovery fit-probe` on fuzzed triplet arrays: exit 0 or 2 with one line, never a
    traceback, and no W written unless it succeeded."""
    folder = _folder()
    X = np.random.default_rng(0).normal(size=(N_CONCEPTS, 4)).astype(np.float32)
    np.save(folder / "X.npy", X)
    parsed = []
    for r in rows:
        try:
            parsed.append([int(float(t)) for t in r])
        except (ValueError, OverflowError):
            parsed.append([0])
    width = max(len(r) for r in parsed)
    T = np.array([r + [0] * (width - len(r)) for r in parsed], dtype=np.int64)
    np.save(folder / "T.npy", T)
    np.save(folder / "A.npy", np.full(len(T), 2, dtype=np.int64))
    out = folder / "W.npy"
    args = ["fit-probe", "--features", str(folder / "X.npy"), "--triplets", str(folder / "T.npy")]
    args += ["--answers", str(folder / "A.npy"), "--out", str(out), "--lam", "0.1"]
    res = CliRunner().invoke(cli.main, args, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.exit_code in (0, 2), res.output
    assert "Traceback" not in res.output
    if res.exit_code == 2:
        assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()
    else:
        assert out.is_file()
