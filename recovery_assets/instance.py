"""The Dagster instance the ``recovery`` commands record their runs in.

``$DAGSTER_HOME`` when set; otherwise ``dagster_home/`` under the working directory. A home
without a ``dagster.yaml`` gets one with the project's settings (``SETTINGS``: the same as the
repository's ``dagster.yaml``), so a fresh install works from any directory. Before several
``dagster`` CLI runs start at once on a new home, prepare it once (``recovery instance`` or
``make instance``).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from recovery_assets.storage import atomic_write

HOME_ENV = "DAGSTER_HOME"
SETTINGS = {
    "telemetry": {"enabled": False},
    "nux": {"enabled": False},
    "run_monitoring": {"enabled": True, "poll_interval_seconds": 30},
    "concurrency": {"runs": {"max_concurrent_runs": 4}, "pools": {"default_limit": 1}},
}


def ensure_home(home: str | os.PathLike | None = None) -> Path:
    """Make sure the instance exists: the folder, its ``dagster.yaml`` and its storage, created
    and migrated once, under a file lock, so that several commands started at the same moment on
    a new home do not race to create the same SQLite tables. Sets $DAGSTER_HOME."""
    import fcntl

    import dagster as dg

    path = Path(home or os.environ.get(HOME_ENV) or "dagster_home").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[HOME_ENV] = str(path)
    with open(path / ".recovery.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            config = path / "dagster.yaml"
            if not config.exists():
                text = "# Written by recovery-assets: the project's instance settings.\n"
                text += yaml.safe_dump(SETTINGS, sort_keys=False)
                atomic_write(config, lambda tmp: Path(tmp).write_text(text))
            with dg.DagsterInstance.from_config(str(path)):
                pass  # opening it creates (or migrates) the run, event and schedule storage
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
