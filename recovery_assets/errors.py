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
