"""A wheel of the project, installed into a new virtual environment, runs from another directory:
the shipped studies and SQL recipes come with it, and the results land under the working
directory. The new environment reuses the dependencies already installed here (a .pth line to this
environment's site-packages), so nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 900


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    wheels = base / "dist"
    # build from a clean copy of the sources (an in-tree build/ could hold stale modules)
    src = base / "src"
    skip = shutil.ignore_patterns(
        ".*", "build", "data", "dagster_home", "*.egg-info", "__pycache__"
    )
    shutil.copytree(ROOT, src, ignore=skip)
    _ok(
        _run(
            [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
            + ["-q", "-w", str(wheels)],
            base,
            dict(os.environ),
        )
    )
    (wheel,) = wheels.glob("recovery_assets-*.whl")
    venv = base / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base, dict(os.environ)))
    python = venv / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_ok(_run([str(python), "-c", code], base, dict(os.environ))).strip())
    # the dependencies installed here, without this checkout's editable install (a .pth line
    # adds the folder but does not run the .pth files inside it)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _ok(
        _run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
            + ["--no-index", str(wheel)],
            base,
            dict(os.environ),
        )
    )
    work = base / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RECOVERY_STUDY", "RECOVERY_DATA")}
    env.pop("DAGSTER_HOME", None)
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH="")
    return {"venv": venv, "python": python, "work": work, "env": env, "site": site}


def test_the_wheel_is_imported_from_the_new_environment(installed):
    code = "import recovery_assets; print(recovery_assets.__file__)"
    out = _ok(_run([str(installed["python"]), "-c", code], installed["work"], installed["env"]))
    assert Path(out.strip()).is_relative_to(installed["site"]), out
    assert not Path(out.strip()).is_relative_to(ROOT)


def test_shipped_studies_and_recipes_are_listed(installed):
    recovery = str(installed["venv"] / "bin" / "recovery")
    out = _ok(_run([recovery, "list"], installed["work"], installed["env"]))
    for name in ("demo", "things", "things_l1", "tiny", "recovery_curve", "confusion"):
        assert f"  {name} " in out, out
    assert str(installed["site"]) in out  # listed from the installed package, not a checkout


def test_tiny_study_runs_from_another_directory(installed):
    recovery = str(installed["venv"] / "bin" / "recovery")
    work, env = installed["work"], installed["env"]
    out = _ok(_run([recovery, "study", "--study", "tiny"], work, env))
    assert "recovery curve" in out
    # one line per step, and (indented, as they run) the steps' own progress lines
    assert "  stimuli: " in out and "    fitting 3 candidates x 2 lambdas" in out, out[-3000:]
    assert "DEBUG" not in out and "STEP_SUCCESS" not in out  # not Dagster's event stream
    db = work / "data" / "tiny" / "recovery.duckdb"
    assert db.is_file(), out
    assert (work / "dagster_home" / "dagster.yaml").is_file()  # the instance, made on first use
    con = duckdb.connect(str(db), read_only=True)
    try:
        n = con.execute("SELECT count(*) FROM recovery_summary").fetchone()[0]
    finally:
        con.close()
    assert n == 2 * 2  # two sizes x two criteria
    # a shipped recipe by name, and a .sql file by path
    curve = _ok(_run([recovery, "sql", "recovery_curve", "--study", "tiny"], work, env))
    assert "n_train" in curve and "accuracy" in curve
    (work / "mine.sql").write_text("SELECT count(*) AS n FROM candidate_fits;\n")
    mine = _ok(_run([recovery, "sql", "mine.sql", "--study", "tiny"], work, env))
    assert mine.split()[0] == "n" and int(mine.split()[1]) > 0
    # an unknown recipe is one line on stderr and exit code 2
    bad = _run([recovery, "sql", "no_such_recipe", "--study", "tiny"], work, env)
    assert bad.returncode == 2 and "no_such_recipe" in bad.stderr and "Traceback" not in bad.stderr


def test_a_new_instance_gets_the_repository_settings(tmp_path, monkeypatch):
    import yaml

    from recovery_assets.instance import SETTINGS, ensure_home

    assert yaml.safe_load((ROOT / "dagster.yaml").read_text()) == SETTINGS
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    home = ensure_home()
    assert home == tmp_path / "dagster_home" and os.environ["DAGSTER_HOME"] == str(home)
    assert yaml.safe_load((home / "dagster.yaml").read_text()) == SETTINGS
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")  # the user's own
    ensure_home()
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"


def test_four_commands_at_once_create_a_new_instance_once(tmp_path):
    """Four `recovery instance` processes started together on a new DAGSTER_HOME all succeed
    (unlocked, each would create the SQLite storage at the same moment and some would fail)."""
    home = tmp_path / "home"
    env = dict(os.environ, DAGSTER_HOME=str(home), HF_HUB_OFFLINE="1")
    recovery = str(ROOT / ".venv" / "bin" / "recovery")
    procs = [
        subprocess.Popen([recovery, "instance"], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert all(out.strip() == str(home) for out in outs)
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_runs() == []
    assert (home / "history" / "runs.db").is_file()
