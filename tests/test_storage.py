"""Tests of recovery_assets.storage: partitioned Parquet tables, array files, DuckDB views,
atomic writes and the data folder's location."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from conftest import query as conftest_query

from recovery_assets import storage
from recovery_assets.storage import DATA_ENV, Store, data_root
from recovery_assets.study import load_study

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "studies" / "tiny.yaml"


def frame(model: str, n: int, rows: int = 3, offset: float = 0.0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": [model] * rows,
            "n_train": [n] * rows,
            "sim": list(range(rows)),
            "score": [offset + i / 10 for i in range(rows)],
        }
    )


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


# ----------------------------------------------------------------------------------------------
# tables


def test_write_table_replaces_a_partition(tmp_path):
    store = Store(tmp_path)
    part = {"model": "a", "n_train": 10}
    first = store.write_table("fits", frame("a", 10, rows=3), part)
    second = store.write_table("fits", frame("a", 10, rows=2, offset=5.0), part)
    assert (
        first
        == second
        == tmp_path / "tables" / "fits" / "model=a" / "n_train=10" / ("part.parquet")
    )
    df = store.read_table("fits", part)
    assert len(df) == 2  # replaced, not appended
    assert df["score"].tolist() == [5.0, 5.1]
    assert len(store.read_table("fits")) == 2
    assert leftovers(tmp_path) == []


def test_table_without_partition_goes_to_all(tmp_path):
    store = Store(tmp_path)
    path = store.write_table("summary", frame("a", 1))
    assert path == tmp_path / "tables" / "summary" / "all" / "part.parquet"
    pd.testing.assert_frame_equal(store.read_table("summary"), frame("a", 1))


def test_read_table_concatenates_partitions(tmp_path):
    store = Store(tmp_path)
    parts = [("a", 10), ("a", 20), ("b", 10)]
    for i, (m, n) in enumerate(parts):
        store.write_table("fits", frame(m, n, rows=2 + i), {"model": m, "n_train": n})
    df = store.read_table("fits")
    assert len(df) == 2 + 3 + 4
    assert list(df.index) == list(range(len(df)))  # a fresh index
    counts = df.groupby(["model", "n_train"]).size().to_dict()
    assert counts == {("a", 10): 2, ("a", 20): 3, ("b", 10): 4}
    one = store.read_table("fits", {"model": "a", "n_train": 20})
    pd.testing.assert_frame_equal(one, frame("a", 20, rows=3))
    assert store.tables() == ["fits"]


def test_missing_table_or_partition_raises_naming_it(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(FileNotFoundError, match="table nothing_here"):
        store.read_table("nothing_here")
    store.write_table("fits", frame("a", 10), {"model": "a", "n_train": 10})
    with pytest.raises(FileNotFoundError) as info:
        store.read_table("fits", {"model": "zz", "n_train": 10})
    text = str(info.value)
    assert "table fits" in text and "'zz'" in text
    assert str(store.table_path("fits", {"model": "zz", "n_train": 10})) in text
    with pytest.raises(FileNotFoundError, match="table other"):
        store.read_table("other", {"model": "a", "n_train": 10})


def test_tables_lists_only_materialized_tables(tmp_path):
    store = Store(tmp_path)
    assert store.tables() == []
    (tmp_path / "tables" / "empty" / "model=a").mkdir(parents=True)
    store.write_table("zeta", frame("a", 1))
    store.write_table("alpha", frame("a", 1), {"model": "a"})
    assert store.tables() == ["alpha", "zeta"]


# ----------------------------------------------------------------------------------------------
# arrays


def test_save_and_load_arrays_round_trip(tmp_path):
    store = Store(tmp_path)
    target = store.synthetic_path("resnet18", 100)
    arrays = {
        "W": np.arange(12, dtype=np.float32).reshape(3, 4),
        "T": np.array([[0, 1, 2], [3, 4, 5]], dtype=np.int64),
        "lam": np.float64(0.25),
    }
    meta = {"model": "resnet18", "n": np.int64(100), "lams": np.array([0.1, 1.0]), "p": Path("x")}
    assert store.save_arrays(target, arrays, meta) == target
    assert target.is_file()
    got, got_meta = store.load_arrays(target, "synthetic resnet18")
    assert set(got) == {"W", "T", "lam"}
    for k, v in arrays.items():
        assert got[k].dtype == np.asarray(v).dtype
        np.testing.assert_array_equal(got[k], v)
    assert got_meta == {"model": "resnet18", "n": 100, "lams": [0.1, 1.0], "p": "x"}
    assert leftovers(tmp_path) == []


def test_load_arrays_without_meta_and_missing_file(tmp_path):
    store = Store(tmp_path)
    target = store.embedding_path("m")
    store.save_arrays(target, {"X": np.ones((2, 2))})
    got, meta = store.load_arrays(target, "embeddings m")
    assert meta == {} and got["X"].shape == (2, 2)
    missing = store.generator_path("nobody")
    with pytest.raises(FileNotFoundError, match="generator nobody") as info:
        store.load_arrays(missing, "generator nobody")
    assert str(missing) in str(info.value) and "materialize" in str(info.value)


def test_save_arrays_rejects_unserialisable_meta_and_keeps_old_file(tmp_path):
    store = Store(tmp_path)
    target = store.embedding_path("m")
    store.save_arrays(target, {"X": np.zeros(3)}, {"v": 1})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        store.save_arrays(target, {"X": np.ones(3)}, {"v": object()})
    got, meta = store.load_arrays(target, "m")
    np.testing.assert_array_equal(got["X"], np.zeros(3))
    assert meta == {"v": 1}


def test_save_npy(tmp_path):
    store = Store(tmp_path)
    target = store.path("stimuli", "images.npy")
    a = np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3)
    store.save_npy(target, a)
    np.testing.assert_array_equal(np.load(target), a)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# DuckDB views


def query(db: Path, sql: str):
    """The rows of one read-only query (conftest's helper, as tuples)."""
    return conftest_query(db, sql, rows=True)


def test_rebuild_views_sees_every_partition(tmp_path):
    store = Store(tmp_path)
    for m, n in [("a", 10), ("a", 20), ("b", 10)]:
        store.write_table("fits", frame(m, n), {"model": m, "n_train": n})
    store.write_table("summary", frame("all", 0, rows=1))
    db = store.rebuild_views()
    assert db == store.db_path == tmp_path / "recovery.duckdb" and db.is_file()
    assert query(db, "SELECT count(*) FROM fits") == [(9,)]
    rows = query(db, "SELECT model, n_train, count(*) FROM fits GROUP BY ALL ORDER BY ALL")
    assert rows == [("a", 10, 3), ("a", 20, 3), ("b", 10, 3)]
    assert query(db, "SELECT count(*) FROM summary") == [(1,)]
    views = query(db, "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY 1")
    assert views == [("fits",), ("summary",)]
    # the DuckDB file holds only views: no base tables
    assert query(db, "SELECT count(*) FROM duckdb_tables()") == [(0,)]
    assert leftovers(tmp_path) == []


def test_views_are_globs_read_at_query_time(tmp_path):
    """A partition written after the rebuild is visible at once (the view is a glob), as is a
    replaced partition's new content; a new *table* needs the next rebuild."""
    store = Store(tmp_path)
    store.write_table("fits", frame("a", 10), {"model": "a", "n_train": 10})
    db = store.rebuild_views()
    assert query(db, "SELECT count(*) FROM fits") == [(3,)]
    store.write_table("fits", frame("b", 10, rows=4), {"model": "b", "n_train": 10})
    assert query(db, "SELECT count(*) FROM fits") == [(7,)]
    store.write_table("fits", frame("a", 10, rows=1), {"model": "a", "n_train": 10})
    assert query(db, "SELECT count(*) FROM fits") == [(5,)]
    store.write_table("late", frame("a", 1))
    with pytest.raises(duckdb.CatalogException):
        query(db, "SELECT count(*) FROM late")
    store.rebuild_views()
    assert query(db, "SELECT count(*) FROM late") == [(3,)]
    assert query(db, "SELECT count(*) FROM fits") == [(5,)]


def test_rebuild_views_unions_columns_by_name(tmp_path):
    store = Store(tmp_path)
    store.write_table("t", pd.DataFrame({"x": [1], "y": ["u"]}), {"k": 1})
    store.write_table("t", pd.DataFrame({"y": ["v"], "x": [2], "z": [0.5]}), {"k": 2})
    db = store.rebuild_views()
    rows = query(db, "SELECT x, y, z FROM t ORDER BY x")
    assert rows == [(1, "u", None), (2, "v", 0.5)]


def test_rebuild_views_replaces_an_open_reader_safely(tmp_path):
    """The rebuild renames a fresh file into place; a reader of the old file keeps working."""
    store = Store(tmp_path)
    store.write_table("fits", frame("a", 10), {"model": "a", "n_train": 10})
    db = store.rebuild_views()
    con = duckdb.connect(str(db), read_only=True)
    try:
        store.write_table("extra", frame("a", 1))
        store.rebuild_views()
        assert con.execute("SELECT count(*) FROM fits").fetchall() == [(3,)]
    finally:
        con.close()
    assert query(db, "SELECT count(*) FROM extra") == [(3,)]


def test_rebuild_views_with_no_tables(tmp_path):
    db = Store(tmp_path).rebuild_views()
    assert db.is_file()
    assert query(db, "SELECT count(*) FROM duckdb_views() WHERE NOT internal") == [(0,)]


# ----------------------------------------------------------------------------------------------
# atomic writes


def test_failed_table_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    store = Store(tmp_path)
    part = {"model": "a", "n_train": 10}
    path = store.write_table("fits", frame("a", 10), part)
    before = path.read_bytes()

    def broken(self, target, *args, **kwargs):
        Path(target).write_bytes(b"PAR1 half a file")  # a partial write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        store.write_table("fits", frame("a", 10, rows=7), part)
    monkeypatch.undo()
    assert path.read_bytes() == before
    pd.testing.assert_frame_equal(store.read_table("fits", part), frame("a", 10))
    assert sorted(p.name for p in path.parent.iterdir()) == ["part.parquet"]
    assert leftovers(tmp_path) == []


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    store = Store(tmp_path)

    def broken(self, target, *args, **kwargs):
        raise KeyboardInterrupt  # even an interrupt cleans up

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(KeyboardInterrupt):
        store.write_table("fits", frame("a", 10), {"model": "a"})
    monkeypatch.undo()
    assert not store.table_path("fits", {"model": "a"}).exists()
    assert list((tmp_path / "tables" / "fits" / "model=a").iterdir()) == []
    assert store.tables() == []
    with pytest.raises(FileNotFoundError):
        store.read_table("fits")


def test_failed_array_write_keeps_previous_file(tmp_path, monkeypatch):
    store = Store(tmp_path)
    target = store.embedding_path("m")
    store.save_arrays(target, {"X": np.zeros(4)}, {"v": 1})

    def broken(fh, **arrays):
        fh.write(b"garbage")
        raise RuntimeError("boom")

    monkeypatch.setattr(storage.np, "savez", broken)
    with pytest.raises(RuntimeError, match="boom"):
        store.save_arrays(target, {"X": np.ones(4)}, {"v": 2})
    monkeypatch.undo()
    got, meta = store.load_arrays(target, "m")
    np.testing.assert_array_equal(got["X"], np.zeros(4))
    assert meta == {"v": 1}
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# where the data lives


def test_data_env_is_the_parent_of_one_folder_per_study(tmp_path, monkeypatch):
    study = load_study(TINY)
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "elsewhere"))
    assert data_root(study) == (tmp_path / "elsewhere" / "tiny").resolve()
    demo = load_study("demo")
    assert data_root(demo) == (tmp_path / "elsewhere" / "demo").resolve()
    monkeypatch.setenv(DATA_ENV, "relative/dir")
    monkeypatch.chdir(tmp_path)
    assert data_root(study) == (tmp_path / "relative" / "dir" / "tiny").resolve()
    assert data_root(study).is_absolute()
    # an explicit parent (the storage resource's root) comes before the environment
    assert data_root(study, tmp_path / "p") == (tmp_path / "p" / "tiny").resolve()


def test_data_root_default_and_study_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    study = load_study(TINY)
    # the working directory's data/ folder, not the source tree's
    assert data_root(study) == (tmp_path / "data" / "tiny").resolve()
    text = TINY.read_text() + "\ndata_dir: results/here\n"
    (tmp_path / "s.yaml").write_text(text)
    local = load_study(tmp_path / "s.yaml")
    assert data_root(local) == (tmp_path / "results" / "here").resolve()
    (tmp_path / "t.yaml").write_text(TINY.read_text() + f"\ndata_dir: {tmp_path / 'abs'}\n")
    assert data_root(load_study(tmp_path / "t.yaml")) == (tmp_path / "abs").resolve()
    # a study that names its own folder keeps it whatever the parent
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert data_root(local) == (tmp_path / "results" / "here").resolve()


def test_rebuild_views_under_a_folder_with_a_quote_in_its_name(tmp_path):
    """$RECOVERY_DATA is the user's choice; a path like /home/o'brien/data must work."""
    store = Store(tmp_path / "o'brien")
    store.write_table("fits", frame("a", 10), {"model": "a", "n_train": 10})
    db = store.rebuild_views()
    assert query(db, "SELECT count(*) FROM fits") == [(3,)]


def test_files_get_the_usual_permissions(tmp_path):
    """Files take 0666 less the umask (a temporary file alone is private to its owner), so a
    lab's group can share a data folder."""
    old = os.umask(0o022)
    try:
        store = Store(tmp_path / "d")
        table = store.write_table("fits", frame("a", 10), {"model": "a"})
        arrays = store.save_arrays(store.path("x.npz"), {"a": np.zeros(3)})
        db = store.rebuild_views()
        os.umask(0o002)
        shared = store.save_npy(store.path("y.npy"), np.zeros(2))
    finally:
        os.umask(old)
    for path in (table, arrays, db):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664


def test_a_full_disk_keeps_the_previous_version(tmp_path, monkeypatch):
    """A write that runs out of space (ENOSPC, injected after half the bytes were written) is one
    clear error naming the file; the partition's previous version stays whole and queryable, and
    no temporary file is left behind."""
    import errno

    store = Store(tmp_path / "d")
    part = {"model": "a", "n_train": 10}
    store.write_table("fits", frame("a", 10), part)
    store.rebuild_views()
    before = store.table_path("fits", part).read_bytes()

    real = pd.DataFrame.to_parquet

    def full_disk(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])  # the disk filled up half way
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_disk)
    with pytest.raises(storage.DiskFullError) as info:
        store.write_table("fits", frame("a", 99), part)
    message = str(info.value)
    assert message.startswith(str(store.table_path("fits", part)))
    assert "disk is full" in message and "previous version" in message
    assert store.table_path("fits", part).read_bytes() == before
    assert not list(store.path("tables").rglob("*.tmp"))
    assert query(store.db_path, "SELECT count(*) FROM fits") == [(3,)]  # still answers


@pytest.mark.parametrize("met_by", ["a step", "the instance's dagster.yaml"])
def test_a_full_disk_is_one_line_from_recovery_study(tmp_path, monkeypatch, met_by):
    """The CLI reports a full disk as one line (exit 2), no traceback: met by a step (the instance
    exists already) or by the instance's own dagster.yaml (a new home)."""
    from click.testing import CliRunner

    from recovery_assets import cli, instance

    def full(target, write):
        raise storage.DiskFullError(28, f"{target}: the disk is full (injected)")

    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    if met_by == "a step":
        instance.ensure_home()
    monkeypatch.setattr(storage, "atomic_write", full)
    monkeypatch.setattr(instance, "atomic_write", full)
    env = {"DAGSTER_HOME": str(home), "RECOVERY_DATA": str(tmp_path / "data")}
    res = CliRunner().invoke(cli.main, ["study", "--study", "tiny"], env=env)
    assert res.exit_code == 2, res.output
    assert "the disk is full (injected)" in res.stderr and "Traceback" not in res.stderr
    assert ("dagster.yaml" in res.stderr) == (met_by != "a step")


@pytest.fixture
def small_filesystem(tmp_path):
    """A real filesystem of a few MiB mounted for the test (tmpfs; needs the right to mount, as
    root on the test machines): writes past its size fail with the kernel's own ENOSPC."""
    import subprocess

    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            message = f"this machine does not allow mounting a filesystem: {res.stderr}"
            if os.environ.get("CI"):  # the CI machines allow it: there the test must run
                pytest.fail(message)
            pytest.skip(message)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_small_filesystem_filling_up_keeps_the_previous_version(small_filesystem):
    store = Store(small_filesystem("1m"))
    part = {"model": "a", "n_train": 10}
    store.write_table("fits", frame("a", 10), part)
    store.rebuild_views()
    before = store.table_path("fits", part).read_bytes()
    rng = np.random.default_rng(0)
    big = pd.DataFrame({"model": "a", "n_train": 10, "score": rng.random(400_000)})  # 3 MB
    with pytest.raises(storage.DiskFullError) as info:
        store.write_table("fits", big, part)
    assert str(info.value).startswith(str(store.table_path("fits", part)))
    assert "disk is full" in str(info.value)
    assert store.table_path("fits", part).read_bytes() == before
    assert leftovers(store.root) == []
    assert query(store.db_path, "SELECT count(*) FROM fits") == [(3,)]


def test_recovery_study_on_a_filesystem_that_fills_up(small_filesystem, tmp_path):
    """The tiny study's data folder on a 4 MiB filesystem: the third generator probe (4 MB) does
    not fit. One line, exit 2; the partitions written before stay whole and queryable."""
    import subprocess

    parent = small_filesystem("4m")
    env = dict(
        os.environ,
        DAGSTER_HOME=str(tmp_path / "home"),
        RECOVERY_DATA=str(parent),
        HF_HUB_OFFLINE="1",
    )
    res = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "recovery"), "study", "--study", "tiny"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "the disk is full" in errors[0], res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    data = parent / "tiny"
    assert "generator_probes" in errors[0] and "mobilenetv3_small.npz" in errors[0], errors[0]
    assert sorted(p.name for p in (data / "generator_probes").iterdir()) == [
        "resnet18.npz",
        "resnet18_seed1.npz",
    ]
    assert leftovers(data) == []
    got = query(data / "recovery.duckdb", "SELECT model FROM generator_probes ORDER BY model")
    assert got == [("resnet18",), ("resnet18_seed1",)]
