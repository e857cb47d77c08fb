"""Whole-or-nothing file writes (stdlib only, so that light processes such as ``recovery
fit-probe`` can use them without importing the storage layer's DuckDB and pandas).

``atomic_write`` fills a temporary file beside its target and renames it into place; a full disk
is one ``DiskFullError`` and leaves the previous file intact; the temporaries a killed writer left
behind are removed by the next write of the same target (``remove_dead_writers_files``).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
from pathlib import Path


class DiskFullError(OSError):
    """A write ran out of space; the file it was replacing is untouched."""

    def __str__(self) -> str:
        return str(self.strerror)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_dead_writers_files(target: Path) -> list[Path]:
    """Remove the temporary files that killed writers of ``target`` left beside it: those named
    for this host and a process that no longer exists (a SIGKILL between writing and renaming
    leaves one). Another host's files, or a live writer's, are left alone."""
    mine = re.compile(rf"\.{re.escape(target.name)}\.(?P<host>.+)-(?P<pid>\d+)\.[^.]+\.tmp")
    host = socket.gethostname()
    removed = []
    for tmp in target.parent.glob(".*.tmp"):
        m = mine.fullmatch(tmp.name)
        if m and m["host"] == host and not pid_alive(int(m["pid"])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write(target: str | os.PathLike, write) -> Path:
    """Write ``target`` whole or not at all: ``write(tmp)`` fills a temporary file beside it,
    which is then renamed into place. The file gets the usual permissions (0666 less the umask;
    a temporary file alone would be private to its owner), so a group can share a data folder.
    The temporary name carries the writer's host and process id, so the next write of ``target``
    removes what a killed writer left behind (``remove_dead_writers_files``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_files(target)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{owner}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                exc.errno,
                f"{target}: the disk is full (no space left while writing it); nothing was "
                f"replaced: the previous version, if any, is intact. Free space in "
                f"{target.parent} and materialize again",
            ) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
