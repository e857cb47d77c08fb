"""The errors that mean bad input (or a full disk), not a bug: a malformed or inconsistent file,
a study setting, data that no longer match their recipe. Each names the file and the problem.

Such an error fails its step at once, without the retries meant for transient failures, and
`recovery study` reports it in one line with exit code 2.
"""

from __future__ import annotations


def input_errors() -> tuple[type[BaseException], ...]:
    from recovery_assets.pipeline import SyntheticDataMismatch
    from recovery_assets.sources.features import FeatureFileError
    from recovery_assets.sources.human import HumanDataError
    from recovery_assets.sources.things import ThingsDataError
    from recovery_assets.storage import DiskFullError
    from recovery_assets.study import StudyError

    return (
        StudyError,
        ThingsDataError,
        FeatureFileError,
        HumanDataError,
        SyntheticDataMismatch,
        DiskFullError,
    )


class StopSignal(BaseException):
    """SIGTERM or SIGINT reached a `recovery` process: it stops now.

    Neither an ``Exception`` nor a ``KeyboardInterrupt``: Dagster's step boundary turns both into
    a retry when the step has a retry policy (the fitting steps do), so a stop would become a
    retry 10 s later and the run would go on. This passes through the step untouched; the command
    that installed the handler marks its runs failed and exits."""


_STOPPED: list[str] = []


def note_stop(why: str = "SIGTERM or SIGINT") -> None:
    """Record that this process was told to stop (a step that met the stop failed for it)."""
    _STOPPED.append(why)


def stop_requested() -> str | None:
    """Why this process was told to stop, if it was (``note_stop``)."""
    return _STOPPED[0] if _STOPPED else None


def stop_on_signals() -> None:
    """From now on, SIGTERM (SLURM, kill) and SIGINT (Ctrl-C) raise ``StopSignal`` in the main
    thread, wherever it is."""
    import signal

    def stop(signum, frame):
        note_stop(signal.Signals(signum).name)
        raise StopSignal(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
