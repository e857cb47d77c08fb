"""The ``recovery`` command line: ``fit-probe`` end to end and its input checks, and ``sql``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from recovery_assets.cli import main
from recovery_assets.core.probe import ProbeSpec, probe_objective
from recovery_assets.storage import DATA_ENV, Store

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "studies" / "tiny.yaml"
N, P, M = 12, 5, 80


pytestmark = pytest.mark.usefixtures("single_thread")


def make_inputs(folder: Path, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, P)).astype(np.float32) / np.sqrt(P)
    T = np.stack([rng.choice(N, 3, replace=False) for _ in range(M)]).astype(np.int64)
    A = rng.integers(0, 3, M).astype(np.int64)
    paths = {}
    for name, arr in (("X", X), ("T", T), ("A", A)):
        paths[name] = folder / f"{name}.npy"
        np.save(paths[name], arr)
    return paths


def args_for(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "fit-probe",
        "--features",
        str(paths["X"]),
        "--triplets",
        str(paths["T"]),
        "--answers",
        str(paths["A"]),
        "--out",
        str(out),
        *extra,
    ]


def invoke(args, **kwargs):
    return CliRunner().invoke(main, args, catch_exceptions=False, **kwargs)


# ----------------------------------------------------------------------------------------------
# fit-probe, good input


@pytest.mark.parametrize(
    "family,penalty,shape",
    [("full", "shrinkage", (P, P)), ("diagonal", "frobenius", (P, P)), ("rank:2", "l1", (2, P))],
)
def test_fit_probe_writes_W_and_prints_one_json_line(tmp_path, family, penalty, shape):
    paths = make_inputs(tmp_path)
    out = tmp_path / "sub" / "W.npy"
    lam = 0.05
    res = invoke(args_for(paths, out, "--family", family, "--penalty", penalty, "--lam", str(lam)))
    assert res.exit_code == 0, res.stderr
    assert res.stderr == ""
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert {"objective", "train_accuracy", "iterations", "seconds"} <= set(record)
    assert record["family"] == family and record["penalty"] == penalty and record["lam"] == lam
    assert isinstance(record["iterations"], int) and record["iterations"] >= 1
    assert record["seconds"] >= 0 and 0.0 <= record["train_accuracy"] <= 1.0
    W = np.load(out)
    assert W.dtype == np.float32 and W.shape == shape
    assert record["shape"] == list(shape)
    assert np.isfinite(W).all()
    X, T, A = (np.load(paths[k]) for k in "XTA")
    spec = ProbeSpec.parse(family, penalty)
    f = probe_objective(W, X, T, A, lam, spec)
    assert abs(f - record["objective"]) <= 1e-9 * max(1.0, abs(f))
    # the fit improved on the identity start
    W0 = np.eye(*shape, dtype=np.float32)
    assert record["objective"] < probe_objective(W0, X, T, A, lam, spec)
    assert sorted(p.name for p in out.parent.iterdir()) == ["W.npy"]  # no temp files left


def test_fit_probe_zero_shot_writes_identity(tmp_path):
    paths = make_inputs(tmp_path)
    out = tmp_path / "W.npy"
    res = invoke(args_for(paths, out, "--family", "zero_shot"))
    assert res.exit_code == 0, res.stderr
    np.testing.assert_array_equal(np.load(out), np.eye(P, dtype=np.float32))
    assert json.loads(res.stdout)["iterations"] == 0


def test_fit_probe_as_a_program(tmp_path):
    """The installed entry point: exit code, stdout and stderr of a real process."""
    exe = Path(sys.executable).parent / "recovery"
    assert exe.is_file()
    paths = make_inputs(tmp_path)
    out = tmp_path / "W.npy"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ok = subprocess.run(
        [str(exe), *args_for(paths, out)], capture_output=True, text=True, env=env, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip())["shape"] == [P, P]
    assert np.load(out).shape == (P, P)
    np.save(paths["X"], np.full((N, P), np.nan, dtype=np.float32))
    out2 = tmp_path / "W2.npy"
    bad = subprocess.run(
        [str(exe), *args_for(paths, out2)], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert str(paths["X"]) in bad.stderr and "NaN" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not out2.exists()


# ----------------------------------------------------------------------------------------------
# fit-probe, bad input: exit 2, one error on stderr naming the file and the problem, no output


def _save(name, arr):
    def fn(paths, folder):
        np.save(paths[name], arr)
        return paths[name]

    return fn


def _text(name):
    def fn(paths, folder):
        p = folder / f"{name}.txt"
        p.write_text("0 1 2\n3 4 5\n")
        paths[name] = p
        return p

    return fn


def _missing(name):
    def fn(paths, folder):
        paths[name] = folder / "nope" / f"{name}.npy"
        return paths[name]

    return fn


def _edit(name, change):
    def fn(paths, folder):
        arr = np.load(paths[name])
        np.save(paths[name], change(arr))
        return paths[name]

    return fn


def _nan(x):
    x = x.copy()
    x[3, 2] = np.nan
    return x


def _inf(x):
    x = x.copy()
    x[4, 1] = -np.inf
    return x


def _out_of_range(t):
    t = t.copy()
    t[5, 1] = N
    return t


def _negative_index(t):
    t = t.copy()
    t[6, 0] = -1
    return t


def _repeat(t):
    t = t.copy()
    t[7] = [2, 9, 2]
    return t


def _answer3(a):
    a = a.copy()
    a[10] = 3
    return a


BAD_FILES = {
    # case: (how to break the inputs, the option named, words of the problem); a missing file is
    # refused by click (test_click_refuses_bad_values)
    "features_not_npy": (_text("X"), "--features", "not a readable .npy"),
    "triplets_not_npy": (_text("T"), "--triplets", "not a readable .npy"),
    "features_1d": (_save("X", np.ones(N, dtype=np.float32)), "--features", "2-D"),
    "features_3d": (_save("X", np.ones((N, P, 2), dtype=np.float32)), "--features", "2-D"),
    "features_int": (_edit("X", lambda x: (x * 10).astype(np.int32)), "--features", "float"),
    "features_nan": (_edit("X", _nan), "--features", "NaN"),
    "features_inf": (_edit("X", _inf), "--features", "inf"),
    "features_object": (
        _save("X", np.array([[1.0, "a"]] * N, dtype=object)),
        "--features",
        "not a readable .npy",
    ),
    "triplets_shape": (_edit("T", lambda t: t[:, :2]), "--triplets", "shape (m, 3)"),
    "triplets_1d": (_edit("T", lambda t: t[:, 0]), "--triplets", "shape (m, 3)"),
    "triplets_float": (_edit("T", lambda t: t.astype(np.float64)), "--triplets", "integer"),
    "triplets_out_of_range": (_edit("T", _out_of_range), "--triplets", "out of range"),
    "triplets_negative": (_edit("T", _negative_index), "--triplets", "out of range"),
    "triplets_repeat": (_edit("T", _repeat), "--triplets", "repeats a concept"),
    "answers_length": (_edit("A", lambda a: a[:-1]), "--answers", "one answer per triplet"),
    "answers_2d": (_edit("A", lambda a: a[:, None]), "--answers", "1-D"),
    "answers_3": (_edit("A", _answer3), "--answers", "0, 1 or 2"),
    "answers_negative": (_edit("A", lambda a: a - 1), "--answers", "0, 1 or 2"),
    "answers_float": (_edit("A", lambda a: a.astype(np.float32)), "--answers", "integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_fit_probe_bad_file(tmp_path, case):
    paths = make_inputs(tmp_path)
    breaker, option, problem = BAD_FILES[case]
    broken = breaker(paths, tmp_path)
    out = tmp_path / "out" / "W.npy"
    res = invoke(args_for(paths, out))
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert res.stdout == ""
    err = res.stderr.strip()
    assert err.startswith("recovery fit-probe: error:"), err
    assert len(err.splitlines()) == 1, err
    assert f"{option} {broken}" in err, err
    assert problem in err, err
    assert not out.exists() and not out.parent.exists()


def test_bad_file_errors_locate_the_problem(tmp_path):
    paths = make_inputs(tmp_path)
    _edit("T", _out_of_range)(paths, tmp_path)
    res = invoke(args_for(paths, tmp_path / "W.npy"))
    assert "row 5" in res.stderr and f"[0, {N})" in res.stderr
    paths = make_inputs(tmp_path)
    _edit("X", _nan)(paths, tmp_path)
    res = invoke(args_for(paths, tmp_path / "W.npy"))
    assert "row 3" in res.stderr and "column 2" in res.stderr
    paths = make_inputs(tmp_path)
    _edit("A", _answer3)(paths, tmp_path)
    res = invoke(args_for(paths, tmp_path / "W.npy"))
    assert "row 10 is 3" in res.stderr


def test_fit_probe_all_zero_features_is_an_input_error(tmp_path):
    """Features that are zero on every training concept leave nothing to fit: that is bad input
    (exit 2, one line naming the file), not a traceback."""
    paths = make_inputs(tmp_path)
    np.save(paths["X"], np.zeros((N, P), dtype=np.float32))
    out = tmp_path / "W.npy"
    res = CliRunner().invoke(main, args_for(paths, out))
    assert res.exit_code == 2, (res.exit_code, repr(res.exception))
    assert f"--features {paths['X']}" in res.stderr and "zero" in res.stderr
    assert not out.exists()


def test_fit_probe_out_is_a_directory_is_an_input_error(tmp_path):
    paths = make_inputs(tmp_path)
    out = tmp_path / "results"
    out.mkdir()
    res = CliRunner().invoke(main, args_for(paths, out))
    assert res.exit_code == 2, (res.exit_code, repr(res.exception))
    assert "'--out'" in res.stderr and f"'{out}' is a directory" in res.stderr
    assert list(out.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fit_probe_stopping_rules(tmp_path, monkeypatch):
    """--stop paper ends no lower than the optimum and, on the same path (both rules take the
    same symmetric phase, or neither does), no later; the paper rule takes the phase too;
    --max-iter caps the iterations; an unknown rule is refused by the option itself."""
    from recovery_assets.core.probe import objective

    paths = make_inputs(tmp_path, seed=1)

    def fits() -> dict:
        records = {}
        for rule in ("optimum", "paper"):
            out = tmp_path / f"{rule}.npy"
            res = invoke(args_for(paths, out, "--stop", rule, "--lam", "1e-3"))
            assert res.exit_code == 0, res.stderr
            records[rule] = json.loads(res.stdout)
            assert records[rule]["stop"] == rule and records[rule]["converged"]
        return records

    records = fits()
    monkeypatch.setattr(objective, "SYMMETRIC_PHASE_TOL", None)
    one_phase = fits()
    for runs in (records, one_phase):
        assert runs["paper"]["iterations"] <= runs["optimum"]["iterations"]
        assert runs["paper"]["objective"] >= runs["optimum"]["objective"] - 1e-9
    # the phase changes the paper rule's path as well
    assert records["paper"]["iterations"] != one_phase["paper"]["iterations"]
    res = invoke(args_for(paths, tmp_path / "capped.npy", "--max-iter", "2"))
    capped = json.loads(res.stdout)
    assert capped["iterations"] == 2 and not capped["converged"]
    for bad in (["--stop", "best"], ["--max-iter", "0"]):
        res = invoke(args_for(paths, tmp_path / "bad.npy", *bad))
        assert res.exit_code == 2 and bad[0] in res.stderr
    assert not (tmp_path / "bad.npy").exists()


def test_fit_probe_imports_neither_scikit_learn_nor_the_storage_layer(tmp_path):
    """A whole fit-probe process validates, fits and writes without scikit-learn (its import
    alone takes about a second of every process; the estimator keeps the same checks) and
    without the storage layer's DuckDB and pandas (another 1.2 s: W is written by
    ``recovery_assets.atomic``)."""
    paths = make_inputs(tmp_path, seed=2)
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from recovery_assets.cli import main\n"
        f"res = CliRunner().invoke(main, {args_for(paths, tmp_path / 'W.npy')!r})\n"
        "assert res.exit_code == 0, res.output\n"
        "heavy = ('sklearn', 'duckdb', 'pandas', 'recovery_assets.storage')\n"
        "print(sorted(m for m in sys.modules if m in heavy or m.split('.')[0] in heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "W.npy").exists()


BAD_OPTIONS = {
    # values click cannot judge (a family takes a parameter, a device must be usable here); the
    # penalty and lambda are refused by click (test_click_refuses_bad_values)
    "unknown_family": (["--family", "banana"], "unknown probe family 'banana'"),
    "rank_without_k": (["--family", "rank"], "needs a positive integer k"),
    "rank_too_large": (["--family", f"rank:{P + 1}"], "exceeds the embedding dimension"),
    "bad_device": (["--device", "tpu:7"], "--device tpu:7"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_fit_probe_bad_option(tmp_path, case):
    paths = make_inputs(tmp_path)
    extra, problem = BAD_OPTIONS[case]
    out = tmp_path / "W.npy"
    res = invoke(args_for(paths, out, *extra))
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert res.stdout == ""
    err = res.stderr.strip()
    assert err.startswith("recovery fit-probe: error:") and problem in err, err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def _fit_probe_with(*extra: str, breaker=None):
    """fit-probe arguments: good inputs (broken by ``breaker`` when given) and ``extra``."""

    def build(folder: Path) -> list[str]:
        paths = make_inputs(folder)
        if breaker is not None:
            breaker(paths, folder)
        return args_for(paths, folder / "out" / "W.npy", *extra)

    return build


def _folder_with(*extra: str, folder: str | None = None):
    """validate-things arguments: ``folder`` under the test folder (default: the test folder)."""

    def build(tmp: Path) -> list[str]:
        return ["validate-things", str(tmp / folder) if folder else str(tmp), *extra]

    return build


CLICK_REFUSALS = {
    # case: (arguments built in the test folder, the option named, words of click's message)
    "features_missing": (
        _fit_probe_with(breaker=_missing("X")),
        "'--features'",
        "does not exist",
    ),
    "answers_missing": (_fit_probe_with(breaker=_missing("A")), "'--answers'", "does not exist"),
    "triplets_a_directory": (
        _fit_probe_with(breaker=lambda paths, folder: paths.update(T=folder)),
        "'--triplets'",
        "is a directory",
    ),
    "unknown_penalty": (
        _fit_probe_with("--penalty", "l7"),
        "'--penalty'",
        "'l7' is not one of 'shrinkage', 'frobenius', 'l1'",
    ),
    "unknown_stop_rule": (
        _fit_probe_with("--stop", "best"),
        "'--stop'",
        "'best' is not one of 'optimum', 'paper'",
    ),
    "negative_lambda": (
        _fit_probe_with("--lam", "-0.5"),
        "'--lam'",
        "not in the range x>=0",
    ),
    "nan_lambda": (
        _fit_probe_with("--lam", "nan"),
        "'--lam'",
        "not a finite number",
    ),
    "inf_lambda": (
        _fit_probe_with("--lam", "inf"),
        "'--lam'",
        "not a finite number",
    ),
    "zero_max_iter": (
        _fit_probe_with("--max-iter", "0"),
        "'--max-iter'",
        "not in the range x>=1",
    ),
    "things_folder_missing": (_folder_with(folder="nope"), "'FOLDER'", "does not exist"),
    "things_n_concepts_2": (
        _folder_with("--n-concepts", "2"),
        "'--n-concepts'",
        "not in the range x>=3",
    ),
    "things_unknown_layout": (
        _folder_with("--layout", "nested"),
        "'--layout'",
        "'nested' is not one of 'auto', 'things', 'flat'",
    ),
    "things_features_missing": (
        _folder_with("--features", "nope.npy"),
        "'--features'",
        "does not exist",
    ),
}


@pytest.mark.parametrize("case", sorted(CLICK_REFUSALS))
def test_click_refuses_bad_values(tmp_path, case):
    """Values click checks itself (files that must exist, fixed choices from the package's
    constants, bounds) are a usage error: exit 2, the option and the problem named, nothing run
    or written."""
    build, option, problem = CLICK_REFUSALS[case]
    args = build(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    res = invoke(args)
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert res.stdout == ""
    assert f"Invalid value for {option}" in res.stderr and problem in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_choices_are_the_package_constants():
    """The fixed choices come from the package, looked up only when used (no torch at import)."""
    from recovery_assets.core.optim import STOP_RULES
    from recovery_assets.core.probe import PENALTIES
    from recovery_assets.sources.things import IMAGE_LAYOUTS

    def choices(command: str, option: str) -> tuple:
        (param,) = [p for p in main.commands[command].params if p.name == option]
        return tuple(param.type.choices)

    assert choices("fit-probe", "penalty") == PENALTIES
    assert choices("fit-probe", "stop") == STOP_RULES
    assert choices("validate-things", "layout") == IMAGE_LAYOUTS
    code = "import sys, recovery_assets.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_fit_probe_missing_required_option(tmp_path):
    paths = make_inputs(tmp_path)  # --features must exist: click checks it before the others
    before = sorted(tmp_path.iterdir())
    res = invoke(["fit-probe", "--features", str(paths["X"])])
    assert res.exit_code == 2
    assert "--triplets" in res.stderr
    assert sorted(tmp_path.iterdir()) == before


# ----------------------------------------------------------------------------------------------
# sql


def test_sql_prints_rows(tmp_path):
    data = tmp_path / "data"  # $RECOVERY_DATA: the parent of the study folders
    store = Store(data / "tiny")
    store.write_table(
        "scores", pd.DataFrame({"model": ["a", "a"], "acc": [0.5, 0.75]}), {"model": "a"}
    )
    store.write_table("scores", pd.DataFrame({"model": ["zeta"], "acc": [0.625]}), {"model": "z"})
    store.rebuild_views()
    sql = tmp_path / "q.sql"
    sql.write_text(
        "SELECT model, count(*) AS n, max(acc) AS best FROM scores GROUP BY model ORDER BY model;"
    )
    res = invoke(["sql", str(sql), "--study", str(TINY)], env={DATA_ENV: str(data)})
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].split() == ["model", "n", "best"]
    assert lines[1].split() == ["a", "2", "0.750"]
    assert lines[2].split() == ["zeta", "1", "0.625"]
    assert len(lines) == 3
    # a query with no rows says so
    sql.write_text("SELECT * FROM scores WHERE acc > 1")
    res = invoke(["sql", str(sql), "--study", str(TINY)], env={DATA_ENV: str(data)})
    assert res.exit_code == 0 and res.stdout.strip() == "(no rows)"


def test_sql_without_database_says_to_materialize(tmp_path):
    sql = tmp_path / "q.sql"
    sql.write_text("SELECT 1")
    data = tmp_path / "empty"
    res = invoke(["sql", str(sql), "--study", str(TINY)], env={DATA_ENV: str(data)})
    assert res.exit_code == 2
    assert res.stdout == ""
    assert "recovery sql: error:" in res.stderr
    assert str(data / "tiny" / "recovery.duckdb") in res.stderr
    assert "materialize the study first" in res.stderr
    assert not data.exists()


def test_sql_bad_query_and_missing_sql_file(tmp_path):
    data = tmp_path / "data"  # $RECOVERY_DATA: the parent of the study folders
    store = Store(data / "tiny")
    store.write_table("scores", pd.DataFrame({"x": [1]}))
    store.rebuild_views()
    sql = tmp_path / "bad.sql"
    sql.write_text("SELECT * FROM no_such_table")
    res = invoke(["sql", str(sql), "--study", str(TINY)], env={DATA_ENV: str(data)})
    assert res.exit_code == 2 and str(sql) in res.stderr and "no_such_table" in res.stderr
    res = invoke(
        ["sql", str(tmp_path / "none.sql"), "--study", str(TINY)], env={DATA_ENV: str(data)}
    )
    assert res.exit_code == 2 and "none.sql: no such SQL file" in res.stderr


def test_sql_bad_study(tmp_path):
    sql = tmp_path / "q.sql"
    sql.write_text("SELECT 1")
    res = invoke(["sql", str(sql), "--study", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2
    assert "nope.yaml: study file not found" in res.stderr
