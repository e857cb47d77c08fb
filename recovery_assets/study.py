"""The study file: the single source of models, sizes, simulations, grids and probe settings.

A study is a YAML file: one of the studies shipped with the package (``recovery list``), named
by its name (``demo``, ``things`` ...) or given by path. The environment variable
``RECOVERY_STUDY`` selects it; the default is the shipped ``demo``. Every setting is validated on
load by the pydantic models below (unknown keys are refused at every level), and a bad file gives
one error naming the file, the offending key path and the reason. The models also give the JSON
schema that editors complete study files with (``studies/study.schema.json``, written by
``python -m recovery_assets.study --schema``; docs/studies.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WrapValidator,
    field_validator,
    model_validator,
)

from recovery_assets import shipped
from recovery_assets.core.optim import STOP_RULES
from recovery_assets.core.probe import PENALTIES, ProbeSpec

STUDY_ENV = "RECOVERY_STUDY"
DEFAULT_STUDY = "demo"
# Kinds of study: the offline demo universe, or the THINGS data on disk (docs/method.md §2).
KINDS = ("demo", "things")
# Where a model's features come from: a timm network run on the stimuli, or a precomputed file.
MODEL_SOURCES = ("timm", "features")
WEIGHTS = ("random", "checkpoint", "hf_cache")
THINGS_ENV = "RECOVERY_THINGS_DIR"
# A running Dask scheduler for every study of the instance (overrides execution.dask.scheduler).
DASK_ENV = "RECOVERY_DASK_SCHEDULER"
EXECUTORS = ("in_process", "dask")
# dagster-dask's cluster kinds that make sense here (a local cluster, or a batch scheduler's).
DASK_CLUSTERS = ("local", "slurm", "pbs", "sge", "lsf")
FEATURES_ENV = "RECOVERY_FEATURES_DIR"
WEIGHTS_ENV = "RECOVERY_WEIGHTS_DIR"
IMAGE_LAYOUTS = ("auto", "things", "flat")
# The human judgement sets a generator may be fitted on (the non-test sets; docs/method.md §5).
FIT_SETS = ("trainset", "validationset")
# How a thingsvision feature file with several images per concept becomes one row per concept.
CONCEPT_IMAGES = ("task", "mean")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# The published schema (next to the shipped studies) and the keys handled before validation.
SCHEMA_FILE = "study.schema.json"
FILE_KEYS = ("base", "extra_models")


class StudyError(ValueError):
    """A study file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ModelEntry:
    """One candidate model (docs/method.md §3).

    ``source: timm``: a timm architecture (``arch``, optionally with a pretrained tag such as
    ``resnet50.tv_in1k``) with ``weights`` ``random`` (seeded init), ``checkpoint`` (a local file)
    or ``hf_cache`` (the offline Hugging Face cache, repository ``hf_repo`` or timm's default),
    and optionally a ``layer``. ``source: features``: a precomputed (n x p) feature ``file``
    (``.npy``, ``.npz``, ``.pt``, ``.parquet``) with the parameter count given as ``n_params`` or
    counted from a timm architecture of the same image tower (``n_params_like``). A thingsvision
    output (``.hdf5`` / ``.h5``, or a ``.npy`` with a ``file_names.txt`` beside it or named by
    ``file_names``) is mapped to concepts through its image file names; ``concept_image`` says
    which row stands for a concept with several images (``task``: its ``_b`` image; ``mean``).
    """

    name: str
    source: str  # "timm" or "features"
    arch: str | None = None
    weights: str = "random"  # "random", "checkpoint" or "hf_cache"
    checkpoint: str | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)
    hf_repo: str | None = None
    layer: str | None = None
    file: str | None = None
    key: str | None = None
    n_params: int | None = None
    n_params_like: str | None = None
    file_names: str | None = None
    concept_image: str = "task"


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    kind: str  # "demo" or "things"
    models: tuple[ModelEntry, ...]
    sizes: tuple[int, ...]
    simulations: int
    spec: ProbeSpec
    candidate_lambdas: tuple[float, ...]
    generator_lambdas: tuple[float, ...]
    generator_cv_folds: int
    generator_cv_seed: int
    generator_fit_on: tuple[str, ...]
    calibration_target: str | float  # "noise_ceiling" or a number
    stimuli: dict
    human: dict
    convention_reference: str
    regression: dict
    probe_dtype: str = "float32"
    max_iter: int = 1000
    probe_stop: str = "optimum"  # the fitter's stopping rule: optimum | paper (docs/method.md §4)
    device: str = "auto"
    data_dir: str | None = None
    things: dict = field(default_factory=dict)
    features_dir: str | None = None
    weights_dir: str | None = None
    allow_random_weights: bool = False
    execution: dict = field(default_factory=lambda: {"executor": "in_process"})

    def dask_config(self) -> dict | None:
        """dagster-dask's executor config for this study's runs, or None (in-process runs).

        ``$RECOVERY_DASK_SCHEDULER`` (an address) puts every study on that cluster; otherwise
        ``execution: {executor: dask, dask: {scheduler: ADDRESS}}`` or ``{cluster: {local: {...}}}``
        (or ``slurm``, ... : dask-jobqueue's cluster arguments) in the study file.
        """
        address = os.environ.get(DASK_ENV)
        if address:
            return {"cluster": {"existing": {"address": address}}}
        if self.execution["executor"] != "dask":
            return None
        dask = self.execution.get("dask") or {}
        if dask.get("scheduler"):
            return {"cluster": {"existing": {"address": dask["scheduler"]}}}
        return {"cluster": dict(dask.get("cluster") or {"local": {"n_workers": 2}})}

    @property
    def gpu_resource(self) -> bool:
        """Whether fitting steps ask a Dask worker for one ``GPU`` resource (so each GPU runs one
        fitting step at a time). Default: when the study's device is CUDA."""
        dask = self.execution.get("dask") or {}
        default = self.device.startswith("cuda")
        return bool(dask.get("gpu_resource", default))

    def _folder(self, env: str, value: str | None, what: str, key: str) -> Path:
        raw = os.environ.get(env) or value
        if not raw:
            raise StudyError(f"{self.path}: {what} is not set: give {key!r} or set ${env}")
        p = Path(os.path.expanduser(str(raw)))
        return (p if p.is_absolute() else self.path.parent / p).resolve()

    def things_root(self) -> Path:
        """The THINGS folder: ``$RECOVERY_THINGS_DIR``, else ``things.root`` (file-relative)."""
        return self._folder(THINGS_ENV, self.things.get("root"), "the THINGS folder", "things.root")

    def feature_file(self, entry: ModelEntry) -> Path:
        """A features model's file: absolute, or under ``$RECOVERY_FEATURES_DIR`` / features_dir."""
        name = Path(os.path.expanduser(entry.file or f"{entry.name}.npy"))
        if name.is_absolute():
            return name
        return (
            self._folder(FEATURES_ENV, self.features_dir, "the features folder", "features_dir")
            / name
        )

    def checkpoint_file(self, entry: ModelEntry) -> Path | None:
        """A timm model's local checkpoint: absolute, or under ``$RECOVERY_WEIGHTS_DIR`` /
        weights_dir (else next to the study file); None for random or cached weights."""
        if entry.weights != "checkpoint":
            return None
        path = Path(os.path.expanduser(str(entry.checkpoint)))
        if path.is_absolute():
            return path
        if os.environ.get(WEIGHTS_ENV) or self.weights_dir:
            return self._folder(WEIGHTS_ENV, self.weights_dir, "weights_dir", "weights_dir") / path
        return (self.path.parent / path).resolve()

    def file_names_file(self, entry: ModelEntry) -> Path | None:
        """The image list of a thingsvision feature file: ``file_names`` (relative to the feature
        file's folder), else ``file_names.txt`` beside it when there is one, else None."""
        features = self.feature_file(entry)
        if entry.file_names:
            path = Path(os.path.expanduser(entry.file_names))
            return path if path.is_absolute() else features.parent / path
        beside = features.parent / "file_names.txt"
        if features.suffix.lower() in (".hdf5", ".h5") or beside.is_file():
            return beside
        return None

    @property
    def key_prefix(self) -> str:
        """The first part of every asset key of this study (several studies share an instance)."""
        return self.name

    @property
    def slug(self) -> str:
        """The name as Dagster accepts it in job, group and schedule names."""
        return re.sub(r"[^A-Za-z0-9_]", "_", self.name)

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


# ----------------------------------------------------------------------------------------------
# The schema: one pydantic model per map of the file. They validate the document (after `base:`
# and `extra_models:` are merged) and give the JSON schema; load_study turns the validated
# document into the frozen Study and ModelEntry above, which the rest of the package reads.


class _Rule(ValueError):
    """A broken rule, raised inside validation; it becomes the StudyError's reason.

    ``text`` may name where it was raised with ``{path}`` (the key path), ``{parent}`` and
    ``{key}``; otherwise the key path is put in front. ``at`` extends the key path (a rule of a
    map about one of its keys); ``values`` are shown with repr (``{got}``: the value given).
    """

    def __init__(self, text: str, *at: str | int, **values: Any):
        super().__init__(text)
        self.text, self.at, self.values = text, at, values

    def say(self, loc: tuple) -> str:
        *parent, key = loc or ("",)
        shown = {k: _show(v) for k, v in self.values.items()}
        text = self.text.format(path=_keypath(loc), parent=_keypath(parent), key=key, **shown)
        if not loc or "{path}" in self.text or "{parent}" in self.text:
            return text
        return f"{_keypath(loc)}: {text}"


class _Text(str):
    """A value put in a rule's text as it is (not its repr, never shortened)."""

    def __repr__(self) -> str:
        return str(self)


def _says(text: str, *types: str) -> WrapValidator:
    """A field's own constraints failing with one of ``types`` (any, when none are given) are
    reported as the rule ``text`` instead (with ``{got}``, the value given)."""

    def wrap(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            if not types or exc.errors()[0]["type"] in types:
                raise _Rule(text, got=value) from None
            raise

    return WrapValidator(wrap)


class _OrNull:
    """JSON schema of a map that may be left empty: ``human:`` (null) reads as ``{}``."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict:
        return {"anyOf": [handler(core_schema), {"type": "null"}]}


def _int(minimum: int, description: str = "", **bounds: Any) -> Any:
    return Field(ge=minimum, description=description or None, **bounds)


def _name_field(description: str) -> Any:
    return Field(pattern=_NAME.pattern, description=description)


class _Map(BaseModel):
    """A map of the study file: strict types (YAML's true is not 1, "10" is not 10), no unknown
    keys (the error lists the allowed ones), and an empty value (``key:``) reads as ``{}``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if data is None:
            return {}
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                allowed = sorted([*cls.model_fields, *cls._also_allowed()])
                raise _Rule(
                    "{what}unknown keys {unknown}; allowed: {allowed}",
                    what=_Text(cls._what(data)),
                    unknown=sorted(unknown, key=str),
                    allowed=_Text(allowed),
                )
            cls._before(data)
        return data

    @classmethod
    def _what(cls, data: dict) -> str:
        return ""

    @classmethod
    def _also_allowed(cls) -> tuple[str, ...]:
        return ()

    @classmethod
    def _before(cls, data: dict) -> None:
        """Rules on the raw map, checked before its values."""


def _model_text(data: dict) -> str:
    name = data.get("name")
    return f"model {name!r}" if isinstance(name, str) else "a model"


class _Entry(_Map):
    kind: ClassVar[str]

    @classmethod
    def _what(cls, data: dict) -> str:
        return f"{_model_text(data)} (source {cls.kind}): "

    def label(self) -> str:
        return f"model {self.name!r}"


class TimmModel(_Entry):
    """A timm network run on the stimuli (``source: timm``, the default)."""

    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"weights": {"const": "checkpoint"}}, "required": ["weights"]},
            "then": {"required": ["checkpoint"]},
        }
    )

    kind: ClassVar[str] = "timm"
    source: Literal["timm"] = Field("timm", description="timm: a timm network (the default)")
    name: str = _name_field("the model's name: letters, digits, _ . -")
    arch: str = Field(
        description="a timm architecture, optionally with a pretrained tag (resnet50.tv_in1k)"
    )
    weights: Literal[WEIGHTS] = Field(
        description="random (seeded init), checkpoint (a local file: 'checkpoint:') or hf_cache "
        "(the offline Hugging Face cache)"
    )
    checkpoint: str | None = Field(
        None,
        description="the checkpoint file of 'weights: checkpoint': absolute, or under "
        "$RECOVERY_WEIGHTS_DIR / weights_dir, else next to the study file",
    )
    hf_repo: str | None = Field(None, description="hf_cache: the repository (default: timm's)")
    layer: str | None = Field(None, description="the module whose output is the embedding")
    seed: int = _int(0, "the seed of the random initialisation", default=0)
    options: dict[str, Any] | None = Field(
        None, description="free-form settings kept with the model (part of its code version)"
    )

    @classmethod
    def _before(cls, data: dict) -> None:
        if "weights" not in data:
            raise _Rule(
                "{model} must say its weights: 'weights: random', 'weights: checkpoint' with "
                "'checkpoint: <file>', or 'weights: hf_cache'",
                model=_Text(_model_text(data)),
            )

    @model_validator(mode="after")
    def _checkpoint(self) -> TimmModel:
        if self.weights == "checkpoint" and not self.checkpoint:
            raise _Rule(
                "{model}: weights: checkpoint needs 'checkpoint:'", model=_Text(self.label())
            )
        if self.weights != "checkpoint" and self.checkpoint:
            raise _Rule(
                "{model}: 'checkpoint:' needs 'weights: checkpoint'", model=_Text(self.label())
            )
        return self

    def entry(self) -> ModelEntry:
        return ModelEntry(
            name=self.name,
            source="timm",
            arch=self.arch,
            weights=self.weights,
            checkpoint=self.checkpoint,
            seed=self.seed,
            options=dict(self.options or {}),
            hf_repo=self.hf_repo,
            layer=self.layer,
        )


class FeaturesModel(_Entry):
    """Precomputed (n x p) features of a THINGS study (``source: features``): a .npy, .npz, .pt or
    .parquet file, or a thingsvision output mapped to concepts through its image file names."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["n_params"]}, {"required": ["n_params_like"]}]}
    )

    kind: ClassVar[str] = "features"
    source: Literal["features"] = Field(description="features: a precomputed feature file")
    name: str = _name_field("the model's name: letters, digits, _ . -")
    file: str | None = Field(
        None,
        description="the feature file (default <name>.npy): absolute, or under "
        "$RECOVERY_FEATURES_DIR / features_dir",
    )
    key: Annotated[str | int | None, _says("{path} must be a string or an integer, got {got}")] = (
        Field(None, description="the features' array in an .npz or .pt file (default: features)")
    )
    n_params: int | None = _int(1, "the model's parameter count", default=None)
    n_params_like: str | None = Field(
        None, description="a timm architecture of the same image tower, whose parameters count"
    )
    file_names: str | None = Field(
        None,
        description="a thingsvision output's image list (default: file_names.txt beside it)",
    )
    concept_image: Literal[CONCEPT_IMAGES] = Field(
        "task",
        description="which row stands for a concept with several images: task (its _b "
        "image) or mean",
    )

    @model_validator(mode="after")
    def _count(self) -> FeaturesModel:
        if (self.n_params is None) == (self.n_params_like is None):
            raise _Rule(
                "{model}: give its parameter count as 'n_params: <int>' or 'n_params_like: "
                "<timm architecture of the same image tower>' (one of them)",
                model=_Text(self.label()),
            )
        return self

    def entry(self) -> ModelEntry:
        return ModelEntry(
            name=self.name,
            source="features",
            file=self.file,
            key=None if self.key is None else str(self.key),
            n_params=self.n_params,
            n_params_like=self.n_params_like,
            file_names=self.file_names,
            concept_image=self.concept_image,
        )


def _source(entry: Any) -> Any:
    return entry.get("source", "timm") if isinstance(entry, dict) else "timm"


# the models: a union on `source` (absent: timm)
ModelItem = Annotated[
    Annotated[TimmModel, Tag("timm")] | Annotated[FeaturesModel, Tag("features")],
    Discriminator(_source),
]


def _lambdas(value: Any) -> Any:
    """A lambda grid: numbers (numeric text too: YAML 1.1 reads 1e-3 as text), finite, >= 0,
    strictly increasing."""
    if not isinstance(value, list):
        return value  # the list type says so
    out = []
    for v in value:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise _Rule("{parent}: '{key}' holds a non-number {got}", got=v) from None
        if not x >= 0 or x != x or x == float("inf"):
            raise _Rule("{parent}: '{key}' must hold finite numbers >= 0, got {got}", got=v)
        out.append(x)
    if not out:
        raise _Rule("{parent}: '{key}' is empty")
    if sorted(out) != out or len(set(out)) != len(out):
        raise _Rule("{parent}: '{key}' must be strictly increasing, got {got}", got=value)
    return out


Lambdas = Annotated[
    list[Annotated[float, Field(ge=0, allow_inf_nan=False)]],
    Field(min_length=1, description="a lambda grid: strictly increasing numbers >= 0"),
    BeforeValidator(_lambdas),
]


class Probe(_Map):
    """The probe fitted by every generator and candidate (docs/method.md §4)."""

    family: str = Field(
        "full",
        description="full, diagonal, rank:k, zero_shot or pca:k",
        json_schema_extra={"pattern": "^(full|diagonal|zero_shot|(rank|pca):0*[1-9][0-9]*)$"},
    )
    penalty: str = Field(
        "shrinkage", description="the penalty", json_schema_extra={"enum": list(PENALTIES)}
    )
    dtype: Literal["float32", "float64"] = Field("float32", description="the fits' float type")
    max_iter: int = _int(1, "iteration cap per fit", default=1000)
    stop: Literal[STOP_RULES] = Field(
        "optimum",
        description="optimum (every fit to its optimum) or paper (stop where the published "
        "fits' L-BFGS settings stop)",
    )

    @model_validator(mode="after")
    def _spec(self) -> Probe:
        try:
            self.spec()
        except ValueError as exc:
            text = str(exc).replace("{", "{{").replace("}", "}}")
            raise _Rule(
                text, "penalty" if text.startswith("unknown penalty") else "family"
            ) from None
        return self

    def spec(self) -> ProbeSpec:
        return ProbeSpec.parse(self.family, self.penalty)


class Generator(_Map):
    """The generators: probes fitted on the human judgements (docs/method.md §5)."""

    lambdas: Lambdas
    cv_folds: int = _int(2, "cross-validation folds of the generators", default=5)
    cv_seed: int = _int(0, "the seed of the folds", default=42)
    fit_on: list[Literal[FIT_SETS]] = Field(
        default_factory=lambda: list(FIT_SETS),
        description="the human sets the generators are fitted on: trainset, optionally "
        "validationset",
        json_schema_extra={"uniqueItems": True, "contains": {"const": "trainset"}},
    )
    calibration_target: Literal["noise_ceiling"] | Annotated[float, Field(gt=1 / 3, lt=1)] = Field(
        "noise_ceiling", description="noise_ceiling or a number in (1/3, 1)"
    )

    @field_validator("fit_on", mode="before")
    @classmethod
    def _fit_on(cls, value: Any) -> Any:
        if (
            not isinstance(value, list)
            or any(s not in FIT_SETS for s in value)
            or "trainset" not in value
            or len(set(value)) != len(value)
        ):
            raise _Rule(
                "{path} must list the human sets the generators are fitted on: trainset, "
                "optionally validationset (got {got})",
                got=value,
            )
        return value

    @field_validator("calibration_target", mode="before")
    @classmethod
    def _target(cls, value: Any) -> Any:
        if not (value == "noise_ceiling" or (isinstance(value, float) and 1 / 3 < value < 1)):
            raise _Rule(
                "{path} must be noise_ceiling or a number in (1/3, 1), got {got}", got=value
            )
        return value


class Candidates(_Map):
    """The candidates: probes fitted on each simulated dataset."""

    lambdas: Lambdas


class Human(_Map):
    """The human judgements (THINGS), or the demo's simulated observer and its triplet counts."""

    source: str | None = Field(None, description="where the judgements come from (demo_observer)")
    n_train: int = _int(0, "demo: unique training triplets, answered once", default=10_000)
    n_val: int = _int(0, "demo: validation triplets", default=1_000)
    test_triplets: int = _int(1, "demo: unique triplets per test set", default=1_000)
    repeats: int = _int(2, "demo: answers per test triplet", default=10)
    seed: int = _int(0, "demo: the observer's seed", default=0)
    convention_reference: str = Field(
        "pixels", description="pixels or a model's name: whose similarities decide the convention"
    )


class Stimuli(_Map):
    """The demo's stimuli: seeded crops of bundled photographs."""

    n_families: int = _int(1, "photographs (concept families)", default=16)
    crops_per_family: int = _int(1, "crops per photograph", default=15)
    size: int = _int(8, "side of the crops in pixels", default=64)
    seed: int = _int(0, "the crops' seed", default=0)


class Regression(_Map):
    """The regression of misidentification (docs/method.md §8)."""

    n_boot: int = _int(1, "bootstrap resamples", default=10_000)
    seed: int = _int(0, "the bootstrap's seed", default=0)


class Things(_Map):
    """The THINGS data (kind: things)."""

    root: str | None = Field(
        None, description="the THINGS folder, relative to this file ($RECOVERY_THINGS_DIR wins)"
    )
    images: str | None = Field(None, description="the image folder under root")
    image_layout: Literal[IMAGE_LAYOUTS] = Field(
        "auto", description="things: <id>/<id>_NNb.jpg, flat: <id>.jpg, or auto"
    )
    n_concepts: int | None = _int(3, "the expected number of concepts", default=None)


class Dask(_Map):
    """Where the Dask executor runs (docs/scale-out.md)."""

    scheduler: Annotated[
        str | None,
        Field(pattern="://", description="a running scheduler: tcp://host:8786"),
        _says("{path} must be an address like tcp://host:8786, got {got}"),
    ] = None
    cluster: Annotated[
        dict[Literal[DASK_CLUSTERS], dict[str, Any] | None] | None,
        Field(
            min_length=1,
            max_length=1,
            description="a cluster to start: local or a batch scheduler's, with its arguments",
        ),
        _says(
            "{path} must be one of " + repr(list(DASK_CLUSTERS)) + " with its arguments, e.g. "
            "{{local: {{n_workers: 4}}}}, got {got}"
        ),
    ] = None
    gpu_resource: bool = Field(
        default_factory=lambda: None,  # unset: the study's device decides (Study.gpu_resource)
        description="fitting steps ask a worker for one GPU (default: when device is CUDA)",
    )


class Execution(_Map):
    """How the study's runs execute."""

    executor: Literal[EXECUTORS] = Field("in_process", description="in_process or dask")
    dask: Annotated[Dask, _OrNull()] = Field(default_factory=Dask)

    def settings(self) -> dict:
        dask = {}
        if self.dask.scheduler:
            dask["scheduler"] = self.dask.scheduler
        if self.dask.cluster:
            dask["cluster"] = {k: dict(v or {}) for k, v in self.dask.cluster.items()}
        if "gpu_resource" in self.dask.model_fields_set:
            dask["gpu_resource"] = self.dask.gpu_resource
        return {"executor": self.executor, "dask": dask}


Sizes = Annotated[
    list[Annotated[int, Field(ge=1)]],
    Field(
        min_length=1,
        description="the training sizes N: distinct positive integers",
        json_schema_extra={"uniqueItems": True},
    ),
    _says(
        "{path} must be a non-empty list of positive integers, got {got}",
        "too_short",
        "int_type",
        "greater_than_equal",
    ),
]


class StudyFile(_Map):
    """A study of recovery-assets (docs/studies.md). A study with `base:` extends another file:
    maps merge key by key, everything else is replaced, and `extra_models:` appends models."""

    model_config = ConfigDict(title="recovery-assets study")

    name: str = _name_field(
        "the study's name: letters, digits, _ . -; names its data folder, asset keys and jobs"
    )
    kind: Literal[KINDS] = Field(description="demo (the offline demo) or things (THINGS data)")
    models: Annotated[
        list[ModelItem],
        Field(min_length=2, description="the models; score ties go to the first listed"),
        _says("a recovery study needs at least 2 models", "too_short"),
    ]
    sizes: Sizes
    simulations: int = _int(1, "simulations per (generator, N)")
    probe: Annotated[Probe, _OrNull()] = Field(default_factory=Probe)
    generator: Annotated[Generator, _OrNull()]
    candidates: Annotated[Candidates, _OrNull()]
    human: Annotated[Human, _OrNull()]
    stimuli: Annotated[Stimuli, _OrNull()] = Field(default_factory=Stimuli)
    regression: Annotated[Regression, _OrNull()] = Field(default_factory=Regression)
    things: Annotated[Things, _OrNull()] = Field(default_factory=Things)
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda or cuda:N")
    data_dir: str | None = Field(
        None, description="the study's own data folder (relative to this file)"
    )
    features_dir: str | None = Field(
        None, description="the feature files' folder ($RECOVERY_FEATURES_DIR wins)"
    )
    weights_dir: str | None = Field(
        None, description="the checkpoints' folder ($RECOVERY_WEIGHTS_DIR wins)"
    )
    allow_random_weights: bool = Field(
        False, description="let a THINGS study use 'weights: random'"
    )
    execution: Annotated[Execution, _OrNull()] = Field(default_factory=Execution)

    @classmethod
    def _also_allowed(cls) -> tuple[str, ...]:
        return FILE_KEYS

    @field_validator("sizes", mode="after")
    @classmethod
    def _distinct(cls, sizes: list[int]) -> list[int]:
        if len(set(sizes)) != len(sizes):
            raise _Rule("{path} has duplicates: {got}", got=sizes)
        return sizes

    @model_validator(mode="after")
    def _across(self) -> StudyFile:
        """The rules that tie keys together."""
        if self.kind != "things" and self.things.model_fields_set:
            raise _Rule(
                "'things:' settings need 'kind: things' (not {kind})", "things", kind=self.kind
            )
        for i, m in enumerate(self.models):
            if m.source == "features" and self.kind != "things":
                raise _Rule(
                    "{model}: precomputed features need a things study",
                    "models",
                    i,
                    "source",
                    model=_Text(m.label()),
                )
            if (
                m.source == "timm"
                and m.weights == "random"
                and self.kind == "things"
                and not self.allow_random_weights
            ):
                raise _Rule(
                    "{model} has random weights; a THINGS study compares trained networks. Give "
                    "a checkpoint or hf_cache weights, or set 'allow_random_weights: true'",
                    "models",
                    i,
                    "weights",
                    model=_Text(m.label()),
                )
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise _Rule("duplicate model names {dup}", "models", dup=dup)
        reference = self.human.convention_reference
        if reference != "pixels" and reference not in names:
            raise _Rule(
                "{path} must be 'pixels' or one of the models {names}, got {got}",
                "human",
                "convention_reference",
                names=names,
                got=reference,
            )
        return self

    def study(self, path: Path) -> Study:
        """The runtime study of this validated document."""
        return Study(
            path=path,
            name=self.name,
            kind=self.kind,
            models=tuple(m.entry() for m in self.models),
            sizes=tuple(sorted(self.sizes)),
            simulations=self.simulations,
            spec=self.probe.spec(),
            candidate_lambdas=tuple(self.candidates.lambdas),
            generator_lambdas=tuple(self.generator.lambdas),
            generator_cv_folds=self.generator.cv_folds,
            generator_cv_seed=self.generator.cv_seed,
            generator_fit_on=tuple(self.generator.fit_on),
            calibration_target=self.generator.calibration_target,
            stimuli=self.stimuli.model_dump(exclude_unset=True),
            human=self.human.model_dump(exclude_unset=True),
            convention_reference=self.human.convention_reference,
            regression=self.regression.model_dump(),
            probe_dtype=self.probe.dtype,
            max_iter=self.probe.max_iter,
            probe_stop=self.probe.stop,
            device=self.device,
            data_dir=self.data_dir,
            things=self.things.model_dump() if self.kind == "things" else {},
            features_dir=self.features_dir,
            weights_dir=self.weights_dir,
            allow_random_weights=self.allow_random_weights,
            execution=self.execution.settings(),
        )


# ----------------------------------------------------------------------------------------------
# pydantic's first error as one line: the key path and a reason

_TYPES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a map",
    "model_type": "a map",
    "model_attributes_type": "a map",
}
_BOUNDS = {
    "greater_than_equal": ">= {ge}",
    "greater_than": "> {gt}",
    "less_than_equal": "<= {le}",
    "less_than": "< {lt}",
    "too_short": "at least {min_length} long",
    "too_long": "at most {max_length} long",
    "string_too_short": "at least {min_length} characters",
    "string_too_long": "at most {max_length} characters",
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 or isinstance(value, _Text) else text[:117] + "..."


def _keypath(loc: Any) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _without_tags(loc: tuple) -> tuple:
    """The loc without the union's member tag (``models, 2, timm, weights``)."""
    return tuple(
        part
        for i, part in enumerate(loc)
        if not (i and part in MODEL_SOURCES and isinstance(loc[i - 1], int))
    )


def _reason(exc: ValidationError) -> str:
    """The first error of a validation as ``<key path> <reason>`` (one line)."""
    error = exc.errors(include_url=False)[0]
    loc, kind, got = _without_tags(error["loc"]), error["type"], error.get("input")
    ctx = error.get("ctx") or {}
    if isinstance(ctx.get("error"), _Rule):
        rule = ctx["error"]
        return rule.say(loc + rule.at)
    path = _keypath(loc)
    *parent, key = loc or ("",)
    # a key of a map is named as <map>: 'key'; an item of a list by its path
    subject = path if isinstance(key, int) or not loc else repr(key)
    if parent and not isinstance(key, int):
        subject = f"{_keypath(parent)}: {subject}"
    if kind == "missing":
        return f"{_keypath(parent) + ': ' if parent else ''}missing required key {key!r}"
    if kind in ("literal_error", "union_tag_invalid"):
        expected = ctx.get("expected", ctx.get("expected_tags", ""))
        if kind == "union_tag_invalid":
            path += ".source"
            got = got.get("source") if isinstance(got, dict) else got
        return f"{path} must be one of [{expected.replace(' or ', ', ')}], got {_show(got)}"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == _NAME.pattern:
        return f"{path} {_show(got)}: use letters, digits, _ . -"
    if kind == "string_pattern_mismatch":
        return f"{subject} must match {ctx.get('pattern')!r}, got {_show(got)}"
    if kind in _TYPES:
        return f"{subject} must be {_TYPES[kind]}, got {_show(got)}"
    if kind in _BOUNDS:
        return f"{subject} must be {_BOUNDS[kind].format(**ctx)}, got {_show(got)}"
    reason = str(ctx["error"]) if "error" in ctx else error["msg"]
    return f"{path}: {reason}" if path else reason


def study_json_schema() -> dict:
    """The JSON schema of a study file (``studies/study.schema.json``), for editors: the
    validated document's schema, plus ``base:`` and ``extra_models:`` (a file with ``base:``
    needs only its ``name``). Cross-key rules (a THINGS study's weights, the reference model,
    unique names, ...) are checked on load only."""
    schema = StudyFile.model_json_schema()
    properties = schema["properties"]
    properties["base"] = {
        "type": "string",
        "description": "a study file this one extends (relative to this file)",
    }
    properties["extra_models"] = {
        "type": "array",
        "items": properties["models"]["items"],
        "description": "models appended to the base's",
    }
    required = schema.pop("required")
    schema.update(
        {
            "if": {"required": ["base"]},
            "then": {"required": ["name"]},
            "else": {"required": required},
        }
    )
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# ----------------------------------------------------------------------------------------------
# reading a study file


def _merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: maps merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_doc(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A study file's map, with ``base:`` (a study file it extends) and ``extra_models:``."""
    if not path.is_file():
        where = f" (base of {seen[-1]})" if seen else ""
        raise StudyError(
            f"{path}: study file not found{where} (set {STUDY_ENV} to a studies/*.yaml)"
        )
    if path in seen:
        raise StudyError(f"{path}: 'base:' files form a cycle: {[str(p) for p in seen]}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(doc, dict):
        raise StudyError(f"{path}: expected a map at the top level")
    base = doc.pop("base", None)
    extra = doc.pop("extra_models", None)
    if base is not None:
        if not isinstance(base, str):
            raise StudyError(f"{path}: 'base' must be the path of another study file")
        if "name" not in doc:
            raise StudyError(f"{path}: a study with 'base:' must give its own 'name'")
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        doc = _merge(_read_doc(base_path.resolve(), (*seen, path)), doc)
    if extra is not None:
        if not isinstance(extra, list):
            raise StudyError(f"{path}: 'extra_models' must be a list of model entries")
        doc["models"] = list(doc.get("models") or []) + extra
    return doc


def study_path(path: str | os.PathLike | None = None) -> Path:
    """The study file meant by ``path``: an existing file, else the name of a shipped study
    (``demo``, ``things`` ...); None: ``$RECOVERY_STUDY``, else the shipped demo."""
    given = str(path or os.environ.get(STUDY_ENV) or DEFAULT_STUDY)
    candidate = Path(os.path.expanduser(given))
    if candidate.is_file():
        return candidate.resolve()
    found = shipped.find_study(given)
    if found is not None:
        return found
    raise StudyError(
        f"{candidate}: study file not found, and no shipped study is called {given!r} "
        f"(shipped: {', '.join(shipped.study_names())}; set {STUDY_ENV} or pass --study)"
    )


def study_paths(value: str | None = None) -> list[Path]:
    """The study files of ``$RECOVERY_STUDY`` (several, separated by ``os.pathsep``), or of
    ``value``; the shipped demo when unset."""
    raw = value if value is not None else os.environ.get(STUDY_ENV)
    if not raw:
        return [study_path(DEFAULT_STUDY)]
    return [study_path(part) for part in raw.split(os.pathsep) if part.strip()]


def load_study(path: str | os.PathLike | None = None) -> Study:
    """Load and validate a study file (default: ``$RECOVERY_STUDY`` or the shipped demo); a
    shipped study can be named instead of given by path."""
    path = study_path(path)
    try:
        return _load(path)
    except StudyError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        # a value of an unexpected type deep in the file: still one error naming the file
        raise StudyError(f"{path}: malformed setting ({type(exc).__name__}: {exc})") from None


def _load(path: Path) -> Study:
    doc = _read_doc(path)
    try:
        validated = StudyFile.model_validate(doc)
    except ValidationError as exc:
        raise StudyError(f"{path}: {_reason(exc)}") from None
    return validated.study(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recovery_assets.study",
        description="The study file's JSON schema (studies/" + SCHEMA_FILE + ").",
    )
    parser.add_argument("--schema", action="store_true", help="print the JSON schema")
    args = parser.parse_args(argv)
    if not args.schema:
        parser.print_help()
        return 2
    sys.stdout.write(json.dumps(study_json_schema(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
