"""The study file: the single source of models, sizes, simulations, grids and probe settings.

A study is a YAML file (``studies/*.yaml``). The environment variable ``RECOVERY_STUDY`` selects
it; the default is ``studies/demo.yaml``. Every setting is validated on load, and a bad file gives
one error naming the file and the offending key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recovery_assets.core.probe import ProbeSpec

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STUDY = PACKAGE_ROOT / "studies" / "demo.yaml"
STUDY_ENV = "RECOVERY_STUDY"
# Kinds of study this version can run: the demo universe. (A THINGS study, kind "things", needs the
# THINGS folder and precomputed-feature sources, which are not part of this version.)
KINDS = ("demo",)
MODEL_SOURCES = ("timm",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class StudyError(ValueError):
    """A study file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ModelEntry:
    """One candidate model: a timm architecture with random weights or a local checkpoint."""

    name: str
    source: str  # "timm"
    arch: str | None = None
    weights: str = "random"  # "random" or "checkpoint"
    checkpoint: str | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    kind: str  # "demo"
    models: tuple[ModelEntry, ...]
    sizes: tuple[int, ...]
    simulations: int
    spec: ProbeSpec
    candidate_lambdas: tuple[float, ...]
    generator_lambdas: tuple[float, ...]
    generator_cv_folds: int
    generator_cv_seed: int
    calibration_target: str | float  # "noise_ceiling" or a number
    stimuli: dict
    human: dict
    convention_reference: str
    regression: dict
    probe_dtype: str = "float32"
    max_iter: int = 1000
    device: str = "auto"
    data_dir: str | None = None

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def model(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise StudyError(f"{self.path}: unknown model {name!r}; the study has {self.model_names}")

    @property
    def largest_size(self) -> int:
        return max(self.sizes)


def _get(doc: dict, key: str, path: Path, kind=None, default: Any = ...):
    if key not in doc:
        if default is ...:
            raise StudyError(f"{path}: missing required key {key!r}")
        return default
    value = doc[key]
    if kind is not None and not isinstance(value, kind):
        raise StudyError(f"{path}: {key!r} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a map"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _int(doc: dict, key: str, path: Path, default: Any = ..., minimum: int | None = None) -> int:
    """An integer setting (YAML booleans are not integers here)."""
    value = _get(doc, key, path, None, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StudyError(f"{path}: {key!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise StudyError(f"{path}: {key!r} must be >= {minimum}, got {value}")
    return value


def _map(doc: dict, key: str, path: Path, default: Any = ...) -> dict:
    value = _get(doc, key, path, None, default)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise StudyError(f"{path}: {key!r} must be a map, got {value!r}")
    return value


def _lambdas(doc: dict, key: str, path: Path) -> tuple[float, ...]:
    values = _get(doc, key, path, list)
    out = []
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise StudyError(f"{path}: {key!r} holds a non-number {v!r}") from None
        if not x >= 0 or x != x or x == float("inf"):
            raise StudyError(f"{path}: {key!r} must hold finite numbers >= 0, got {v!r}")
        out.append(x)
    if not out:
        raise StudyError(f"{path}: {key!r} is empty")
    if sorted(out) != out or len(set(out)) != len(out):
        raise StudyError(f"{path}: {key!r} must be strictly increasing, got {values}")
    return tuple(out)


def _model(entry: Any, i: int, path: Path, kind: str) -> ModelEntry:
    if not isinstance(entry, dict):
        raise StudyError(f"{path}: models[{i}] must be a map, got {entry!r}")
    name = _get(entry, "name", path, str)
    if not _NAME.match(name):
        raise StudyError(f"{path}: models[{i}].name {name!r}: use letters, digits, _ . -")
    source = _get(entry, "source", path, str, "timm")
    if source == "timm":
        arch = _get(entry, "arch", path, str)
        if "weights" not in entry:
            raise StudyError(
                f"{path}: model {name!r} must say its weights: 'weights: random' or "
                "'weights: checkpoint' with 'checkpoint: <file>'"
            )
        weights = _get(entry, "weights", path, str)
        checkpoint = entry.get("checkpoint")
        if weights not in ("random", "checkpoint"):
            raise StudyError(f"{path}: model {name!r}: weights must be random or checkpoint")
        if weights == "checkpoint" and not checkpoint:
            raise StudyError(f"{path}: model {name!r}: weights: checkpoint needs 'checkpoint:'")
        return ModelEntry(
            name=name,
            source="timm",
            arch=arch,
            weights=weights,
            checkpoint=checkpoint,
            seed=_int(entry, "seed", path, 0, minimum=0),
            options=dict(entry.get("options") or {}),
        )
    raise StudyError(
        f"{path}: model {name!r}: source must be one of {list(MODEL_SOURCES)}, got {source!r}"
    )


def load_study(path: str | os.PathLike | None = None) -> Study:
    """Load and validate a study file (default: ``$RECOVERY_STUDY`` or studies/demo.yaml)."""
    path = Path(path or os.environ.get(STUDY_ENV) or DEFAULT_STUDY).resolve()
    if not path.is_file():
        raise StudyError(f"{path}: study file not found (set {STUDY_ENV} to a studies/*.yaml)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise StudyError(f"{path}: expected a map at the top level")
    name = _get(doc, "name", path, str)
    if not _NAME.match(name):
        raise StudyError(f"{path}: name {name!r}: use letters, digits, _ . -")
    kind = _get(doc, "kind", path, str)
    if kind not in KINDS:
        raise StudyError(f"{path}: kind must be one of {list(KINDS)}, got {kind!r}")
    raw_models = _get(doc, "models", path, list)
    models = tuple(_model(m, i, path, kind) for i, m in enumerate(raw_models))
    if len(models) < 2:
        raise StudyError(f"{path}: a recovery study needs at least 2 models")
    names = [m.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyError(f"{path}: duplicate model names {dup}")
    sizes = _get(doc, "sizes", path, list)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise StudyError(f"{path}: sizes must be a non-empty list of positive integers")
    if len(set(sizes)) != len(sizes):
        raise StudyError(f"{path}: sizes has duplicates: {sizes}")
    sims = _int(doc, "simulations", path, minimum=1)
    probe = _map(doc, "probe", path, {})
    try:
        spec = ProbeSpec.parse(probe.get("family", "full"), probe.get("penalty", "shrinkage"))
    except ValueError as exc:
        raise StudyError(f"{path}: probe: {exc}") from None
    dtype = probe.get("dtype", "float32")
    if dtype not in ("float32", "float64"):
        raise StudyError(f"{path}: probe.dtype must be float32 or float64")
    gen = _map(doc, "generator", path)
    target = gen.get("calibration_target", "noise_ceiling")
    if not (target == "noise_ceiling" or (isinstance(target, float) and 1 / 3 < target < 1)):
        raise StudyError(
            f"{path}: generator.calibration_target must be noise_ceiling or a number in (1/3, 1)"
        )
    cand = _map(doc, "candidates", path)
    human = _map(doc, "human", path)
    stimuli = _map(doc, "stimuli", path, {})
    regression = _map(doc, "regression", path, {})
    reg = {
        "n_boot": _int(regression, "n_boot", path, 10_000, minimum=1),
        "seed": _int(regression, "seed", path, 0, minimum=0),
    }
    reference = str(human.get("convention_reference", "pixels"))
    if reference != "pixels" and reference not in names:
        raise StudyError(
            f"{path}: human.convention_reference must be 'pixels' or one of the models {names}"
        )
    return Study(
        path=path,
        name=name,
        kind=kind,
        models=models,
        sizes=tuple(sorted(sizes)),
        simulations=sims,
        spec=spec,
        candidate_lambdas=_lambdas(cand, "lambdas", path),
        generator_lambdas=_lambdas(gen, "lambdas", path),
        generator_cv_folds=_int(gen, "cv_folds", path, 5, minimum=2),
        generator_cv_seed=_int(gen, "cv_seed", path, 42, minimum=0),
        calibration_target=target,
        stimuli=dict(stimuli),
        human=dict(human),
        convention_reference=reference,
        regression=reg,
        probe_dtype=dtype,
        max_iter=_int(probe, "max_iter", path, 1000, minimum=1),
        device=str(doc.get("device", "auto")),
        data_dir=doc.get("data_dir"),
    )
