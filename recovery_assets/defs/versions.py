"""Each asset's ``code_version``: a hash of the code its computation runs and of the study settings
it reads, so Dagster marks exactly the assets whose code or settings changed as stale (and
everything downstream of them, through their inputs).

An asset's version hashes

* the source files of its modules (``VERSIONS[asset].modules``) and of every ``recovery_assets``
  module they import, at any depth (read from their source: a function-level import counts too),
  plus ``COMMON`` (the step functions and the store, which every asset runs). A package named in
  the table counts with all its ``.py`` files; a package imported by one of the modules counts
  with its ``__init__.py``. Files are hashed by their bytes under their module name, so a source
  tree and an installed copy give the same versions;
* the versions of the third-party distributions those modules import (timm, torch,
  scikit-learn ...: a library's new release may change what a step computes);
* the study settings the asset reads (``VERSIONS[asset].settings``), never where files live or how
  runs execute (data folders, devices, executors).

Three markers stand for modules that depend on the study: ``STIMULI_SOURCE`` (the demo's
generated stimuli or the THINGS reader, by ``kind``), ``HUMAN_SOURCE`` (the demo's simulated
observer and the folder it writes; nothing more for THINGS, whose folder is read by
``sources.human``) and ``MODEL_SOURCES`` (the feature sources of the study's models: timm
networks, precomputed files).

A code version belongs to an asset definition, not to one partition: the partitioned assets
hash the settings of all their partitions (``embeddings``: every model entry), so changing one
model's entry marks every model's embeddings stale. Settings that only add or remove partitions
(``sizes`` for the per-size assets) are not hashed: a partition is its own key.

The Dagster layer itself (``recovery_assets.defs``: metadata, checks) is left out, except what the
summary assets compute there (their plots: ``recovery_assets.plots``).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import Any

from recovery_assets.study import Study

PACKAGE = "recovery_assets"
# Run by every asset (each step is a function of the pipeline writing through the store); their
# own imports are not followed (the pipeline imports every step's code): each asset lists its own.
COMMON = ("recovery_assets.pipeline", "recovery_assets.storage")
STIMULI_SOURCE = "<the kind's stimuli>"
HUMAN_SOURCE = "<the kind's human judgements>"
MODEL_SOURCES = "<the models' sources>"
_KIND_SOURCES = {
    STIMULI_SOURCE: {
        "demo": ("recovery_assets.sources.demo_stimuli",),
        "things": ("recovery_assets.sources.things",),
    },
    HUMAN_SOURCE: {"demo": ("recovery_assets.sources.demo_folder",), "things": ()},
}
_MODEL_SOURCES = {
    "timm": ("recovery_assets.sources.timm_features",),
    # a thingsvision output or another feature file; n_params_like counts a timm architecture
    "features": (
        "recovery_assets.sources.features",
        "recovery_assets.sources.thingsvision",
        "recovery_assets.sources.timm_features",
    ),
}


@dataclasses.dataclass(frozen=True)
class AssetVersion:
    """What an asset's code version hashes: its modules (with their imports) and its settings."""

    modules: tuple[str, ...]
    settings: Callable[[Study], Any]


def _probe(s: Study) -> dict:
    """How every probe is fitted (docs/method.md §4)."""
    return {"spec": s.spec, "dtype": s.probe_dtype, "max_iter": s.max_iter, "stop": s.probe_stop}


def _stimuli(s: Study) -> dict:
    things = {k: s.things.get(k) for k in ("n_concepts", "image_layout")}
    return {"kind": s.kind, "stimuli": s.stimuli, "things": things}


def _embeddings(s: Study) -> dict:
    # the images are read at the network's own resolution from files (things) or taken from the
    # stimulus array (demo)
    return {"kind": s.kind, "models": s.models}


def _human(s: Study) -> dict:
    return {"kind": s.kind, "human": s.human, "convention_reference": s.convention_reference}


def _generator(s: Study) -> dict:
    return {
        **_probe(s),
        "lambdas": s.generator_lambdas,
        "cv_folds": s.generator_cv_folds,
        "cv_seed": s.generator_cv_seed,
        "fit_on": s.generator_fit_on,
        "calibration_target": s.calibration_target,
    }


def _synthetic(s: Study) -> dict:
    # the generator's logits use the probe family's features (pca:k centres them)
    return {"simulations": s.simulations, "spec": s.spec}


def _candidates(s: Study) -> dict:
    # every model of the study is a candidate, in study order
    return {
        **_probe(s),
        "models": s.model_names,
        "lambdas": s.candidate_lambdas,
        "simulations": s.simulations,
    }


def _recovery(s: Study) -> dict:
    return {"models": s.model_names, "simulations": s.simulations}


def _properties(s: Study) -> dict:
    return {"models": s.model_names, "spec": s.spec}


def _curve(s: Study) -> dict:
    # one point per training size; the human-vs-recovery scatter is at the largest
    return {"sizes": s.sizes}


def _identifiability(s: Study) -> dict:
    # the model order (ties, the table's order) and the sizes read (every size's matrix)
    return {"models": s.model_names, "sizes": s.sizes}


def _open_set(s: Study) -> dict:
    # the candidate selections of every size; the human-fitted representations use the probe
    # family's features (pca:k centres them)
    return {"models": s.model_names, "sizes": s.sizes, "spec": s.spec}


def _regression(s: Study) -> dict:
    return {"models": s.model_names, "largest_size": s.largest_size, "regression": s.regression}


C = "recovery_assets.core"
# asset -> (modules its computation runs, the settings it reads)
VERSIONS: dict[str, AssetVersion] = {
    "stimuli": AssetVersion((STIMULI_SOURCE,), _stimuli),
    "embeddings": AssetVersion((MODEL_SOURCES,), _embeddings),
    "human_judgements": AssetVersion(
        (
            HUMAN_SOURCE,  # the demo's simulated observer writes a THINGS-shaped folder
            "recovery_assets.sources.human",
            "recovery_assets.sources.things",  # the pixel reference
            f"{C}.generator",  # a model's features as the reference
            f"{C}.triplets",
        ),
        _human,
    ),
    "generator_probes": AssetVersion(
        (f"{C}.generator", f"{C}.probe", f"{C}.optim", f"{C}.calibration", f"{C}.triplets"),
        _generator,
    ),
    "synthetic_datasets": AssetVersion(
        (f"{C}.simulation", f"{C}.triplets", f"{C}.probe"), _synthetic
    ),
    "candidate_scores": AssetVersion(
        (
            f"{C}.scoring",
            f"{C}.probe",
            f"{C}.optim",
            f"{C}.recovery",
            f"{C}.simulation",  # the synthetic data are regenerated from their recipe
            f"{C}.triplets",
        ),
        _candidates,
    ),
    "recovery_matrix": AssetVersion((f"{C}.recovery", "recovery_assets.plots"), _recovery),
    "model_properties": AssetVersion((f"{C}.geometry", f"{C}.probe"), _properties),
    "recovery_curve": AssetVersion(("recovery_assets.plots",), _curve),
    "misidentification_regression": AssetVersion((f"{C}.regression",), _regression),
    # recovery_assets.results names the winner on the human data
    "identifiability": AssetVersion(
        (f"{C}.identifiability", "recovery_assets.results", "recovery_assets.plots"),
        _identifiability,
    ),
    "open_set_recovery": AssetVersion(
        (f"{C}.open_set", f"{C}.geometry", f"{C}.probe", "recovery_assets.plots"), _open_set
    ),
}


def code_version(study: Study, asset: str) -> str:
    """The code version of one of the study's assets (16 hex digits)."""
    entry = VERSIONS[asset]
    modules = _closure(_expand(entry.modules, study))
    common = {name: _source(name, path) for m in COMMON for name, path in _files(m, False).items()}
    h = hashlib.sha256()
    for name, source in sorted({**common, **modules}.items()):
        h.update(f"module {name} {source.digest}\n".encode())
    for dist, ver in _libraries(modules.values()):
        h.update(f"library {dist}=={ver}\n".encode())
    settings = json.dumps(_canonical(entry.settings(study)), sort_keys=True)
    h.update(f"settings {settings}\n".encode())
    return h.hexdigest()[:16]


def code_versions(study: Study) -> dict[str, str]:
    """Every asset's code version, by asset name."""
    return {asset: code_version(study, asset) for asset in VERSIONS}


# ----------------------------------------------------------------------------- modules
@dataclasses.dataclass(frozen=True)
class _Source:
    """A module's source file: the SHA-256 of its bytes, what it imports from the package (module
    names) and from elsewhere (top-level names)."""

    digest: str
    ours: frozenset[str]
    others: frozenset[str]


def _expand(modules: Iterable[str], study: Study) -> tuple[str, ...]:
    out: list[str] = []
    for name in modules:
        if name in _KIND_SOURCES:
            out += _KIND_SOURCES[name][study.kind]
        elif name == MODEL_SOURCES:
            for source in sorted({m.source for m in study.models}):
                out += _MODEL_SOURCES[source]
        else:
            out.append(name)
    return tuple(dict.fromkeys(out))


def _spec(name: str):
    spec = importlib.util.find_spec(name)  # imports the parent packages, not the module
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"code versions: no module {name!r} (see VERSIONS)")
    return spec


def _files(name: str, whole_package: bool) -> dict[str, Path]:
    """The source files of a module (a package: all its .py files, or only its __init__.py), by
    dotted name."""
    spec = _spec(name)
    if whole_package and spec.submodule_search_locations:
        root = Path(spec.origin).parent
        return {
            ".".join((name, *p.relative_to(root).with_suffix("").parts)).removesuffix(
                ".__init__"
            ): p
            for p in sorted(root.rglob("*.py"))
        }
    return {name: Path(spec.origin)}


def _source(name: str, path: Path) -> _Source:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if path.suffix != ".py":  # compiled only (no source installed): its bytes, no imports
        return _Source(digest, frozenset(), frozenset())
    return _parsed(name, path.name == "__init__.py", digest, data)


@lru_cache(maxsize=512)
def _parsed(name: str, is_package: bool, digest: str, data: bytes) -> _Source:
    """What a source file imports (cached by its content: parsed once per process)."""
    tree = ast.parse(data, filename=name)
    package = name if is_package else name.rpartition(".")[0]
    ours, others = set(), set()
    for node in ast.walk(tree):  # function-level imports too
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            if base == PACKAGE or base.startswith(PACKAGE + "."):
                # `from recovery_assets.core import optim`: the submodule when there is one
                targets = [_submodule(base, alias.name) for alias in node.names]
            else:
                targets = [base]
        for target in targets:
            top = target.partition(".")[0]
            if top == PACKAGE:
                ours.add(target)
            elif top:
                others.add(top)
    return _Source(digest, frozenset(ours), frozenset(others))


def _submodule(package: str, name: str) -> str:
    """``package.name`` when that is a module, else ``package`` (a name defined in it), found
    without importing either."""
    for loc in _spec(package).submodule_search_locations or ():
        if (Path(loc) / f"{name}.py").is_file() or (Path(loc) / name / "__init__.py").is_file():
            return f"{package}.{name}"
    return package


def _closure(modules: Iterable[str]) -> dict[str, _Source]:
    """``modules`` and the ``recovery_assets`` modules they import, recursively, by name."""
    found: dict[str, _Source] = {}
    todo = [(m, True) for m in modules]
    while todo:
        name, whole = todo.pop()
        for sub, path in _files(name, whole).items():
            if sub not in found:
                found[sub] = _source(sub, path)
                todo += [(m, False) for m in sorted(found[sub].ours) if m not in found]
    return found


def _libraries(sources: Iterable[_Source]) -> list[tuple[str, str]]:
    """The installed versions of the third-party distributions that ``sources`` import."""
    tops = set().union(*(s.others for s in sources)) - set(sys.stdlib_module_names)
    dists = sorted({d for top in tops for d in _distributions().get(top, ())})
    return [(d, v) for d in dists if (v := _version(d)) is not None]


@lru_cache(maxsize=1)
def _distributions() -> dict[str, tuple[str, ...]]:
    return {k: tuple(sorted(set(v))) for k, v in packages_distributions().items()}


@lru_cache(maxsize=256)
def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:  # pragma: no cover - a distribution without metadata
        return None


# ----------------------------------------------------------------------------- settings
def _canonical(value: Any) -> Any:
    """Settings as plain JSON values (dataclasses and models as maps, tuples as lists, paths as
    text), the same on every machine and run."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):  # a pydantic model
        return _canonical(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
