"""Entry point for `dagster dev -m recovery_assets.definitions` and workspace.yaml: every study of
$RECOVERY_STUDY (one, or several separated by ':'; default: the shipped demo)."""

from recovery_assets.defs import build_definitions

defs = build_definitions()
