"""Entry point for `dagster dev -m recovery_assets.definitions` and workspace.yaml."""

from recovery_assets.defs import build_definitions

defs = build_definitions()
