"""The Postgres variant of the instance (dagster.postgres.yaml) against a real PostgreSQL server.

The module fixture starts a throwaway server (initdb in a temporary folder, listening on
127.0.0.1 and a unix socket in that folder only), creates a database and a password-protected
user, and always stops the server at teardown. The test materializes one asset with the
`dagster` CLI into an instance configured by dagster.postgres.yaml, then checks the run and its
events are in Postgres (not in SQLite files) and that a second process sees the same run.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psycopg2
import pytest
from conftest import spawn

ROOT = Path(__file__).resolve().parent.parent
DAGSTER = ROOT / ".venv" / "bin" / "dagster"
CONFIG = ROOT / "dagster.postgres.yaml"
TINY = ROOT / "studies" / "tiny.yaml"
PG_USER = "postgres"  # the unprivileged system user that runs the server when the tests run as root
SUPERUSER = "postgres"  # the cluster's superuser role (trusted on the unix socket only)
DB, USER, PASSWORD = "dagster_test", "dagster_test", "s3cret-test"
START_TIMEOUT_S = 60
MATERIALIZE_TIMEOUT_S = 300
INSTALL_HINT = (
    "install PostgreSQL's server binaries (Debian/Ubuntu: `apt-get install -y postgresql`; "
    "they land in /usr/lib/postgresql/<version>/bin), or put `initdb` and `postgres` on PATH"
)


@dataclass
class PgServer:
    host: str  # 127.0.0.1
    port: int
    socket_dir: str  # unix socket folder for the superuser's connections

    def env(self) -> dict[str, str]:
        """The DAGSTER_PG_* variables that dagster.postgres.yaml reads."""
        return {
            "DAGSTER_PG_USERNAME": USER,
            "DAGSTER_PG_PASSWORD": PASSWORD,
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_DB": DB,
            "DAGSTER_PG_PORT": str(self.port),
        }

    def connect(self, superuser: bool = False, dbname: str = DB):
        """A psycopg2 connection: the superuser over the unix socket, else the test user on TCP."""
        if superuser:
            return psycopg2.connect(
                host=self.socket_dir, port=self.port, user=SUPERUSER, dbname=dbname
            )
        return psycopg2.connect(
            host=self.host, port=self.port, user=USER, password=PASSWORD, dbname=dbname
        )


def _pg_bindir() -> Path:
    """The folder holding `initdb` and `postgres`: PATH first, then Debian's newest version."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).parent] if on_path else []
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    debian.sort(key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else -1)
    candidates += [Path(p) for p in reversed(debian)]
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    pytest.fail(f"PostgreSQL server binaries not found: {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:  # the postmaster's children too, should any outlive it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    bindir = _pg_bindir()
    # initdb and postgres refuse to run as root: run them as the `postgres` system user then.
    as_user: dict = {}
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(PG_USER)
        except KeyError:
            pytest.fail(
                f"running as root, but there is no `{PG_USER}` system user to run the PostgreSQL "
                f"server as: {INSTALL_HINT} (the package creates that user)"
            )
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    # a short path under /tmp (unix socket paths are limited to ~107 bytes), not pytest's tmp_path
    # (root's, mode 0700: the server user could not enter it)
    base = Path(tempfile.mkdtemp(prefix="pgtest-"))
    proc = None
    try:
        if as_user:
            os.chown(base, as_user["user"], as_user["group"])
        data, sock, log = base / "data", base / "sock", base / "postgres.log"
        pwfile = base / "pwfile"
        pwfile.write_text("unused\n")  # initdb wants a superuser password for scram on TCP
        if as_user:
            os.chown(pwfile, as_user["user"], as_user["group"])
        initdb = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--pwfile",
                str(pwfile),
                "--auth-local=trust",  # the unix socket, in a folder only the server user owns
                "--auth-host=scram-sha-256",  # TCP: the Dagster user's password is checked
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            cwd=base,
            capture_output=True,
            text=True,
            timeout=120,
            **as_user,
        )
        assert initdb.returncode == 0, f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}"
        sock.mkdir()
        if as_user:
            os.chown(sock, as_user["user"], as_user["group"])

        port = _free_port()
        cmd = [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-k",
            str(sock),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-c",
            "fsync=off",  # a throwaway server: speed over durability
            "-c",
            "full_page_writes=off",
            "-c",
            "synchronous_commit=off",
        ]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                cmd,
                cwd=base,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, killed whole at teardown
                **as_user,
            )
        server = PgServer(host="127.0.0.1", port=port, socket_dir=str(sock))

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"postgres exited with {proc.returncode} on start:\n{_tail(log)}")
            try:
                conn = server.connect(superuser=True, dbname="postgres")
                break
            except psycopg2.OperationalError as exc:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"postgres did not accept connections within {START_TIMEOUT_S} s "
                        f"({exc}):\n{_tail(log)}"
                    )
                time.sleep(0.2)
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(f"CREATE ROLE {USER} LOGIN PASSWORD %s", (PASSWORD,))
                cur.execute(f"CREATE DATABASE {DB} OWNER {USER}")
        finally:
            conn.close()
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def _materialize(select: str, env: dict[str, str], log: Path) -> None:
    cmd = [str(DAGSTER), "asset", "materialize", "-m", "recovery_assets.definitions"]
    cmd += ["--select", select]
    proc = spawn(cmd, env, log)
    try:
        rc = proc.wait(timeout=MATERIALIZE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(cmd)}` ran past {MATERIALIZE_TIMEOUT_S} s:\n{_tail(log)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert rc == 0, f"`{' '.join(cmd)}` exited with {rc}:\n{_tail(log)}"


# The second client: a separate process that opens the same instance and reports what it sees.
READER = textwrap.dedent(
    """
    import json, sys
    import dagster as dg
    with dg.DagsterInstance.from_config(sys.argv[1]) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(["tiny", "stimuli"]))
        print(json.dumps({
            "storage": type(instance.run_storage).__name__,
            "runs": {r.run_id: r.status.value for r in instance.get_runs()},
            "materialized_by": event.run_id if event else None,
        }))
    """
)


def test_postgres_instance_materialize(pg_server, tmp_path, monkeypatch):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    assert DAGSTER.is_file(), f"{DAGSTER} is missing: install the project with its dev extras"
    assert CONFIG.is_file(), f"{CONFIG} is missing"
    home, data = tmp_path / "dagster_home", tmp_path / "data"
    home.mkdir()
    shutil.copy(CONFIG, home / "dagster.yaml")
    for name, value in pg_server.env().items():  # this process opens the instance too
        monkeypatch.setenv(name, value)
    env = dict(
        os.environ,
        **pg_server.env(),
        DAGSTER_HOME=str(home),
        RECOVERY_STUDY=str(TINY),
        RECOVERY_DATA=str(data),
        HF_HUB_OFFLINE="1",
    )

    _materialize("tiny/stimuli", env, tmp_path / "materialize.log")

    key = dg.AssetKey(["tiny", "stimuli"])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage), type(instance.run_storage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage), type(
            instance.event_log_storage
        )
        runs = instance.get_runs()
        assert len(runs) == 1, [r.run_id for r in runs]
        run = runs[0]
        assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
        event = instance.get_latest_materialization_event(key)
        assert event is not None, f"no materialization of {key.to_user_string()} recorded"
        assert event.run_id == run.run_id

    # the rows are in Postgres, read with a plain client; no SQLite storage under the home
    with pg_server.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id, status FROM runs")
        assert cur.fetchall() == [(run.run_id, "SUCCESS")]
        cur.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = %s AND asset_key = %s",
            (run.run_id, key.to_string()),
        )
        assert cur.fetchone()[0] >= 1, "no event of the asset in Postgres' event_logs"
    conn.close()
    assert not (home / "history" / "runs.db").exists()
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))

    # a second client, in its own process, sees the same run through the same storage
    reader = subprocess.run(
        [sys.executable, "-c", READER, str(home)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert reader.returncode == 0, reader.stderr[-4000:]
    seen = json.loads(reader.stdout.strip().splitlines()[-1])
    assert seen == {
        "storage": "PostgresRunStorage",
        "runs": {run.run_id: "SUCCESS"},
        "materialized_by": run.run_id,
    }
