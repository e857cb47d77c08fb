"""The study files and SQL recipes that ship with the package.

A wheel installs them as package data (``recovery_assets/studies/*.yaml`` and
``recovery_assets/sql/*.sql``); in a source checkout they are the top-level ``studies/`` and
``sql/`` folders. Either way they are found here, never relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _folder(name: str) -> Path:
    installed = PACKAGE_DIR / name  # a wheel: package data inside the package
    if installed.is_dir():
        return installed
    return PACKAGE_DIR.parent / name  # a source checkout (also an editable install)


def studies_dir() -> Path:
    return _folder("studies")


def sql_dir() -> Path:
    return _folder("sql")


def _names(folder: Path, suffix: str) -> list[str]:
    return sorted(p.stem for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []


def study_names() -> list[str]:
    """The shipped studies, by name (``demo``, ``things``, ``tiny`` ...)."""
    return _names(studies_dir(), ".yaml")


def recipe_names() -> list[str]:
    """The shipped SQL recipes, by name (``recovery_curve``, ``confusion`` ...)."""
    return _names(sql_dir(), ".sql")


def find_study(name: str) -> Path | None:
    """The shipped study file called ``name`` (with or without ``.yaml``), or None."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    path = studies_dir() / f"{stem}.yaml"
    return path if "/" not in stem and path.is_file() else None


def find_recipe(name: str) -> Path | None:
    """The shipped SQL recipe called ``name`` (with or without ``.sql``), or None."""
    stem = name[: -len(".sql")] if name.endswith(".sql") else name
    path = sql_dir() / f"{stem}.sql"
    return path if "/" not in stem and path.is_file() else None


def first_line(path: Path) -> str:
    """The first comment line of a shipped file (its one-line description); an editor's
    schema directive (``# yaml-language-server: ...``) is not a description."""
    for line in path.read_text().splitlines():
        text = line.strip().lstrip("#-").strip()
        if text and not text.startswith("yaml-language-server:"):
            return text
    return ""
