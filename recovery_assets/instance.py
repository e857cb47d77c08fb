"""The Dagster instance the ``recovery`` commands record their runs in.

``$DAGSTER_HOME`` when set; otherwise ``dagster_home/`` under the working directory. A home
without a ``dagster.yaml`` gets one with the project's settings (``SETTINGS``: the same as the
repository's ``dagster.yaml``), so a fresh install works from any directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

HOME_ENV = "DAGSTER_HOME"
SETTINGS = {
    "telemetry": {"enabled": False},
    "nux": {"enabled": False},
    "run_monitoring": {"enabled": True, "poll_interval_seconds": 30},
    "concurrency": {"runs": {"max_concurrent_runs": 4}, "pools": {"default_limit": 1}},
}


def ensure_home(home: str | os.PathLike | None = None) -> Path:
    """Make sure the instance folder exists and has a ``dagster.yaml``; sets $DAGSTER_HOME."""
    path = Path(home or os.environ.get(HOME_ENV) or "dagster_home").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        tmp = path / ".dagster.yaml.tmp"
        tmp.write_text(
            "# Written by recovery-assets: the project's instance settings.\n"
            + yaml.safe_dump(SETTINGS, sort_keys=False)
        )
        os.replace(tmp, config)
    os.environ[HOME_ENV] = str(path)
    return path
