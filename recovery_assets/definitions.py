"""The code location: every study of $RECOVERY_STUDY (one, or several separated by ':'; default:
the shipped demo).

One entry point for every loader: ``dg dev`` / ``dg check defs`` / ``dg list defs`` (``[tool.dg]``
in pyproject.toml names this module), ``dagster dev -m recovery_assets.definitions`` and
workspace.yaml. Dagster calls the ``@dg.definitions`` function when it loads the code location, so
importing this module builds nothing (a module-level ``Definitions`` beside it would be ignored by
the loaders and only build the studies twice).
"""

import dagster as dg

from recovery_assets.defs import build_definitions


@dg.definitions
def defs() -> dg.Definitions:
    """The definitions of every study of $RECOVERY_STUDY."""
    return build_definitions()
