"""The study file: the single source of models, sizes, simulations, grids and probe settings.

A study is a YAML file: one of the studies shipped with the package (``recovery list``), named
by its name (``demo``, ``things`` ...) or given by path. The environment variable
``RECOVERY_STUDY`` selects it; the default is the shipped ``demo``. Every setting is validated on
load, and a bad file gives one error naming the file and the offending key.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recovery_assets import shipped
from recovery_assets.core.optim import STOP_RULES
from recovery_assets.core.probe import ProbeSpec

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
    def code_version(self) -> str:
        """The assets' code version: changes with the package version and with any setting that
        changes results (not with where files live or how runs execute), so Dagster marks a
        study's materializations stale when either changes."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            package = version("recovery-assets")
        except PackageNotFoundError:  # pragma: no cover - a source tree without metadata
            package = "0"
        settings = (
            self.kind,
            self.models,
            self.sizes,
            self.simulations,
            self.spec,
            self.candidate_lambdas,
            self.generator_lambdas,
            self.generator_cv_folds,
            self.generator_cv_seed,
            self.generator_fit_on,
            self.calibration_target,
            sorted(self.stimuli.items()),
            sorted((k, str(v)) for k, v in self.human.items()),
            self.convention_reference,
            sorted(self.regression.items()),
            self.probe_dtype,
            self.max_iter,
            self.probe_stop,
            self.things.get("n_concepts"),
            self.things.get("image_layout"),
        )
        digest = hashlib.sha256(repr((package, settings)).encode()).hexdigest()
        return f"{package}-{digest[:12]}"

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


_MODEL_KEYS = {
    "timm": {
        "name",
        "source",
        "arch",
        "weights",
        "checkpoint",
        "hf_repo",
        "layer",
        "seed",
        "options",
    },
    "features": {
        "name",
        "source",
        "file",
        "key",
        "n_params",
        "n_params_like",
        "file_names",
        "concept_image",
    },
}


def _model(entry: Any, i: int, path: Path, kind: str, allow_random: bool) -> ModelEntry:
    if not isinstance(entry, dict):
        raise StudyError(f"{path}: models[{i}] must be a map, got {entry!r}")
    name = _get(entry, "name", path, str)
    if not _NAME.match(name):
        raise StudyError(f"{path}: models[{i}].name {name!r}: use letters, digits, _ . -")
    source = _get(entry, "source", path, str, "timm")
    if source not in MODEL_SOURCES:
        raise StudyError(
            f"{path}: model {name!r}: source must be one of {list(MODEL_SOURCES)}, got {source!r}"
        )
    unknown = sorted(set(entry) - _MODEL_KEYS[source])
    if unknown:
        raise StudyError(
            f"{path}: model {name!r} (source {source}): unknown keys {unknown}; "
            f"allowed: {sorted(_MODEL_KEYS[source])}"
        )
    if source == "features":
        if kind != "things":
            raise StudyError(f"{path}: model {name!r}: precomputed features need a things study")
        n_params = entry.get("n_params")
        like = entry.get("n_params_like")
        if (n_params is None) == (like is None):
            raise StudyError(
                f"{path}: model {name!r}: give its parameter count as 'n_params: <int>' or "
                "'n_params_like: <timm architecture of the same image tower>' (one of them)"
            )
        if n_params is not None:
            n_params = _int(entry, "n_params", path, minimum=1)
        if like is not None and not isinstance(like, str):
            raise StudyError(f"{path}: model {name!r}: n_params_like must be a timm name")
        file = entry.get("file")
        if file is not None and not isinstance(file, str):
            raise StudyError(f"{path}: model {name!r}: file must be a path")
        key = entry.get("key")
        file_names = entry.get("file_names")
        if file_names is not None and not isinstance(file_names, str):
            raise StudyError(f"{path}: model {name!r}: file_names must be a path")
        concept_image = entry.get("concept_image", "task")
        if concept_image not in CONCEPT_IMAGES:
            raise StudyError(
                f"{path}: model {name!r}: concept_image must be one of {list(CONCEPT_IMAGES)}, "
                f"got {concept_image!r}"
            )
        return ModelEntry(
            name=name,
            source="features",
            file=file,
            key=None if key is None else str(key),
            n_params=n_params,
            n_params_like=like,
            file_names=file_names,
            concept_image=concept_image,
        )
    arch = _get(entry, "arch", path, str)
    if "weights" not in entry:
        raise StudyError(
            f"{path}: model {name!r} must say its weights: 'weights: random', "
            "'weights: checkpoint' with 'checkpoint: <file>', or 'weights: hf_cache'"
        )
    weights = _get(entry, "weights", path, str)
    checkpoint = entry.get("checkpoint")
    if weights not in WEIGHTS:
        raise StudyError(f"{path}: model {name!r}: weights must be one of {list(WEIGHTS)}")
    if weights == "checkpoint" and not checkpoint:
        raise StudyError(f"{path}: model {name!r}: weights: checkpoint needs 'checkpoint:'")
    if weights != "checkpoint" and checkpoint:
        raise StudyError(f"{path}: model {name!r}: 'checkpoint:' needs 'weights: checkpoint'")
    if weights == "random" and kind == "things" and not allow_random:
        raise StudyError(
            f"{path}: model {name!r} has random weights; a THINGS study compares trained "
            "networks. Give a checkpoint or hf_cache weights, or set 'allow_random_weights: true'"
        )
    layer = entry.get("layer")
    if layer is not None and not isinstance(layer, str):
        raise StudyError(f"{path}: model {name!r}: layer must be a module name")
    return ModelEntry(
        name=name,
        source="timm",
        arch=arch,
        weights=weights,
        checkpoint=checkpoint,
        seed=_int(entry, "seed", path, 0, minimum=0),
        options=dict(entry.get("options") or {}),
        hf_repo=entry.get("hf_repo"),
        layer=layer,
    )


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


def _things(doc: dict, path: Path, kind: str) -> dict:
    things = _map(doc, "things", path, {})
    if kind != "things":
        if things:
            raise StudyError(f"{path}: 'things:' settings need 'kind: things'")
        return {}
    unknown = sorted(set(things) - {"root", "images", "image_layout", "n_concepts"})
    if unknown:
        raise StudyError(f"{path}: things: unknown keys {unknown}")
    layout = things.get("image_layout", "auto")
    if layout not in IMAGE_LAYOUTS:
        raise StudyError(f"{path}: things.image_layout must be one of {list(IMAGE_LAYOUTS)}")
    n = things.get("n_concepts")
    if n is not None:
        n = _int(things, "n_concepts", path, minimum=3)
    return {
        "root": things.get("root"),
        "images": things.get("images"),
        "image_layout": layout,
        "n_concepts": n,
    }


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


def _execution(doc: dict, path: Path) -> dict:
    execution = _map(doc, "execution", path, {})
    unknown = sorted(set(execution) - {"executor", "dask"})
    if unknown:
        raise StudyError(f"{path}: execution: unknown keys {unknown}; allowed: executor, dask")
    executor = execution.get("executor", "in_process")
    if executor not in EXECUTORS:
        raise StudyError(
            f"{path}: execution.executor must be one of {list(EXECUTORS)}, got {executor!r}"
        )
    dask = _map(execution, "dask", path, {})
    unknown = sorted(set(dask) - {"scheduler", "cluster", "gpu_resource"})
    if unknown:
        raise StudyError(
            f"{path}: execution.dask: unknown keys {unknown}; allowed: scheduler, cluster, "
            "gpu_resource"
        )
    scheduler = dask.get("scheduler")
    if scheduler is not None and not (isinstance(scheduler, str) and "://" in scheduler):
        raise StudyError(
            f"{path}: execution.dask.scheduler must be an address like tcp://host:8786, "
            f"got {scheduler!r}"
        )
    cluster = dask.get("cluster")
    if cluster is not None:
        if (
            not isinstance(cluster, dict)
            or len(cluster) != 1
            or next(iter(cluster)) not in DASK_CLUSTERS
            or not isinstance(next(iter(cluster.values())) or {}, dict)
        ):
            raise StudyError(
                f"{path}: execution.dask.cluster must be one of {list(DASK_CLUSTERS)} with its "
                f"arguments, e.g. {{local: {{n_workers: 4}}}}, got {cluster!r}"
            )
        cluster = {k: dict(v or {}) for k, v in cluster.items()}
    if "gpu_resource" in dask and not isinstance(dask["gpu_resource"], bool):
        raise StudyError(f"{path}: execution.dask.gpu_resource must be true or false")
    out_dask = {k: v for k, v in (("scheduler", scheduler), ("cluster", cluster)) if v}
    if "gpu_resource" in dask:
        out_dask["gpu_resource"] = dask["gpu_resource"]
    return {"executor": executor, "dask": out_dask}


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
    name = _get(doc, "name", path, str)
    if not _NAME.match(name):
        raise StudyError(f"{path}: name {name!r}: use letters, digits, _ . -")
    kind = _get(doc, "kind", path, str)
    if kind not in KINDS:
        raise StudyError(f"{path}: kind must be one of {list(KINDS)}, got {kind!r}")
    allow_random = doc.get("allow_random_weights", False)
    if not isinstance(allow_random, bool):
        raise StudyError(f"{path}: allow_random_weights must be true or false")
    things = _things(doc, path, kind)
    raw_models = _get(doc, "models", path, list)
    models = tuple(_model(m, i, path, kind, allow_random) for i, m in enumerate(raw_models))
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
    for key in ("family", "penalty"):
        if key in probe and not isinstance(probe[key], str):
            raise StudyError(f"{path}: probe.{key} must be a string, got {probe[key]!r}")
    try:
        spec = ProbeSpec.parse(probe.get("family", "full"), probe.get("penalty", "shrinkage"))
    except ValueError as exc:
        raise StudyError(f"{path}: probe: {exc}") from None
    dtype = probe.get("dtype", "float32")
    if dtype not in ("float32", "float64"):
        raise StudyError(f"{path}: probe.dtype must be float32 or float64")
    stop = probe.get("stop", "optimum")
    if stop not in STOP_RULES:
        raise StudyError(f"{path}: probe.stop must be one of {', '.join(STOP_RULES)}, got {stop!r}")
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
    fit_on = gen.get("fit_on", list(FIT_SETS))
    if (
        not isinstance(fit_on, list)
        or any(s not in FIT_SETS for s in fit_on)
        or "trainset" not in fit_on
        or len(set(fit_on)) != len(fit_on)
    ):
        raise StudyError(
            f"{path}: generator.fit_on must list the human sets the generators are fitted on: "
            f"trainset, optionally validationset (got {fit_on!r})"
        )
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
        generator_fit_on=tuple(fit_on),
        calibration_target=target,
        stimuli=dict(stimuli),
        human=dict(human),
        convention_reference=reference,
        regression=reg,
        probe_dtype=dtype,
        max_iter=_int(probe, "max_iter", path, 1000, minimum=1),
        probe_stop=stop,
        device=str(doc.get("device", "auto")),
        data_dir=doc.get("data_dir"),
        things=things,
        features_dir=doc.get("features_dir"),
        weights_dir=doc.get("weights_dir"),
        allow_random_weights=allow_random,
        execution=_execution(doc, path),
    )
