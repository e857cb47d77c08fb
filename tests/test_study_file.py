"""Tests of the study file (recovery_assets.study): the bundled studies load with the expected
settings, every kind of bad file is refused with one StudyError naming the file, the key path and
the problem, and the published JSON schema (studies/study.schema.json) is the generated one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from recovery_assets.defs.versions import code_versions
from recovery_assets.study import (
    DEFAULT_STUDY,
    STUDY_ENV,
    StudyError,
    load_study,
    study_json_schema,
)
from recovery_assets.study import main as study_main

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "studies" / "demo.yaml"
TINY = ROOT / "studies" / "tiny.yaml"

# a valid study, as a document to mutate
BASE = {
    "name": "unit",
    "kind": "demo",
    "stimuli": {"n_families": 3, "crops_per_family": 3, "size": 16, "seed": 0},
    "models": [
        {"name": "a", "source": "timm", "arch": "resnet18", "weights": "random", "seed": 0},
        {"name": "b", "source": "timm", "arch": "resnet18", "weights": "random", "seed": 1},
    ],
    "human": {"source": "demo_observer", "convention_reference": "pixels"},
    "probe": {"family": "full", "penalty": "shrinkage", "dtype": "float64", "max_iter": 50},
    "generator": {"lambdas": [0.001, 0.1], "cv_folds": 3, "calibration_target": "noise_ceiling"},
    "candidates": {"lambdas": [0.001, 0.1]},
    "sizes": [20, 10],
    "simulations": 2,
}


def write(tmp_path: Path, doc, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def mutated(fn) -> dict:
    doc = copy.deepcopy(BASE)
    fn(doc)
    return doc


# ----------------------------------------------------------------------------------------------
# the bundled studies


def test_demo_study():
    s = load_study(DEMO)
    assert s.path == DEMO.resolve()
    assert s.name == "demo" and s.kind == "demo"
    assert s.model_names == [
        "resnet18",
        "resnet18_seed1",
        "ghostnet",
        "convnext_atto",
        "vit_tiny",
        "mixer_s16",
    ]
    assert s.model("resnet18_seed1").seed == 1
    assert s.model("ghostnet").arch == "ghostnet_100"
    assert all(m.source == "timm" and m.weights == "random" for m in s.models)
    assert s.sizes == (50, 200, 800, 3200)
    assert s.largest_size == 3200
    assert s.simulations == 5
    assert (s.spec.family, s.spec.penalty, s.spec.k) == ("full", "shrinkage", None)
    assert s.probe_dtype == "float32" and s.max_iter == 500
    assert s.generator_lambdas == (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    assert s.candidate_lambdas == (1e-4, 1e-2, 1.0)
    assert s.generator_cv_folds == 5 and s.generator_cv_seed == 42
    assert s.calibration_target == "noise_ceiling"
    assert s.convention_reference == "pixels"
    assert s.human["n_train"] == 4000 and s.human["repeats"] == 10
    assert s.stimuli == {"n_families": 8, "crops_per_family": 15, "size": 64, "seed": 0}
    assert s.regression == {"n_boot": 2000, "seed": 0}
    assert s.device == "auto"
    with pytest.raises(StudyError, match="unknown model 'nope'"):
        s.model("nope")


def test_tiny_study():
    s = load_study(TINY)
    assert s.name == "tiny" and s.kind == "demo"
    assert s.model_names == ["resnet18", "resnet18_seed1", "mobilenetv3_small"]
    assert s.model("mobilenetv3_small").arch == "mobilenetv3_small_100"
    assert s.sizes == (50, 100)
    assert s.simulations == 2
    assert s.generator_lambdas == (1e-3, 1e-1)
    assert s.candidate_lambdas == (1e-3, 1e-1)
    assert s.generator_cv_folds == 3
    assert s.max_iter == 500 and s.probe_dtype == "float32"
    assert s.device == "cpu"
    assert s.regression == {"n_boot": 200, "seed": 0}


def test_base_document_is_valid_and_sizes_are_sorted(tmp_path):
    s = load_study(write(tmp_path, BASE))
    assert s.model_names == ["a", "b"]
    assert s.sizes == (10, 20)
    assert s.probe_dtype == "float64" and s.max_iter == 50
    assert s.probe_stop == "optimum"  # the default


def test_things_kind_refuses_random_weights_unless_told(tmp_path):
    doc = mutated(lambda d: d.update(kind="things"))
    with pytest.raises(StudyError, match="model 'a' has random weights; a THINGS study"):
        load_study(write(tmp_path, doc))
    doc["allow_random_weights"] = True
    s = load_study(write(tmp_path, doc))
    assert s.kind == "things" and s.allow_random_weights


def test_checkpoint_weights_are_recorded(tmp_path):
    def fn(d):
        d["models"] = [
            {"name": "a", "arch": "resnet18", "weights": "checkpoint", "checkpoint": "a.pth"},
            {"name": "b", "arch": "resnet18", "weights": "random", "seed": 1},
        ]

    s = load_study(write(tmp_path, mutated(fn)))
    assert s.model("a").checkpoint == "a.pth" and s.model("a").source == "timm"
    assert s.model("b").seed == 1 and s.model("b").checkpoint is None


def test_convention_reference_may_name_a_model(tmp_path):
    doc = mutated(lambda d: d["human"].update(convention_reference="b"))
    assert load_study(write(tmp_path, doc)).convention_reference == "b"


# ----------------------------------------------------------------------------------------------
# bad files


def _del(key):
    return lambda d: d.pop(key)


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _models(*names_or_entries):
    def fn(d):
        d["models"] = [
            e if isinstance(e, dict) else {"name": e, "arch": "resnet18", "weights": "random"}
            for e in names_or_entries
        ]

    return fn


BAD = {
    "missing_name": (_del("name"), "missing required key 'name'"),
    "missing_models": (_del("models"), "missing required key 'models'"),
    "missing_generator": (_del("generator"), "missing required key 'generator'"),
    "missing_candidates": (_del("candidates"), "missing required key 'candidates'"),
    "missing_sizes": (_del("sizes"), "missing required key 'sizes'"),
    "missing_simulations": (_del("simulations"), "missing required key 'simulations'"),
    "missing_candidate_lambdas": (
        lambda d: d["candidates"].pop("lambdas"),
        "missing required key 'lambdas'",
    ),
    "unknown_family": (
        lambda d: d["probe"].update(family="banana"),
        "unknown probe family 'banana'",
    ),
    "unknown_penalty": (lambda d: d["probe"].update(penalty="l7"), "unknown penalty 'l7'"),
    "rank_without_k": (lambda d: d["probe"].update(family="rank"), "needs a positive integer k"),
    "bad_dtype": (lambda d: d["probe"].update(dtype="float16"), "probe.dtype"),
    "bad_stop": (lambda d: d["probe"].update(stop="best"), "probe.stop must be one of"),
    "unknown_kind": (_set("kind", "cifar"), "kind must be one of"),
    "duplicate_models": (_models("a", "b", "a"), r"duplicate model names \['a'\]"),
    "timm_without_weights": (
        _models({"name": "a", "arch": "resnet18"}, "b"),
        "model 'a' must say its weights",
    ),
    "checkpoint_without_file": (
        _models({"name": "a", "arch": "resnet18", "weights": "checkpoint"}, "b"),
        "weights: checkpoint needs 'checkpoint:'",
    ),
    "unknown_weights": (
        _models({"name": "a", "arch": "resnet18", "weights": "imagenet"}, "b"),
        "weights must be one of",
    ),
    "unknown_source": (
        _models({"name": "a", "source": "hub"}, "b"),
        "source must be one of",
    ),
    "bad_model_name": (_models("a b", "c"), "models\\[0\\].name 'a b'"),
    "one_model": (_models("a"), "at least 2 models"),
    "no_models": (_models(), "at least 2 models"),
    "decreasing_lambdas": (
        lambda d: d["generator"].update(lambdas=[0.1, 0.001]),
        "'lambdas' must be strictly increasing",
    ),
    "repeated_lambdas": (
        lambda d: d["candidates"].update(lambdas=[0.1, 0.1]),
        "'lambdas' must be strictly increasing",
    ),
    "negative_lambda": (
        lambda d: d["candidates"].update(lambdas=[-0.1, 0.1]),
        "'lambdas' must hold finite numbers >= 0",
    ),
    "nan_lambda": (
        lambda d: d["candidates"].update(lambdas=[float("nan"), 0.1]),
        "'lambdas' must hold finite numbers >= 0",
    ),
    "text_lambda": (
        lambda d: d["candidates"].update(lambdas=["small", 0.1]),
        "'lambdas' holds a non-number 'small'",
    ),
    "empty_lambdas": (lambda d: d["generator"].update(lambdas=[]), "'lambdas' is empty"),
    "zero_size": (_set("sizes", [0, 10]), "sizes must be a non-empty list of positive integers"),
    "negative_size": (_set("sizes", [-5, 10]), "sizes must be a non-empty list of positive"),
    "fractional_size": (_set("sizes", [2.5, 10]), "sizes must be a non-empty list of positive"),
    "text_size": (_set("sizes", ["10", 20]), "sizes must be a non-empty list of positive"),
    "empty_sizes": (_set("sizes", []), "sizes must be a non-empty list of positive"),
    "sizes_not_a_list": (_set("sizes", 100), "'sizes' must be a list"),
    "duplicate_sizes": (_set("sizes", [10, 10]), "sizes has duplicates"),
    "zero_simulations": (_set("simulations", 0), "simulations' must be >= 1"),
    "unknown_convention_reference": (
        lambda d: d["human"].update(convention_reference="alexnet"),
        "convention_reference must be 'pixels' or one of the models",
    ),
    "bad_calibration_target": (
        lambda d: d["generator"].update(calibration_target=0.2),
        "calibration_target",
    ),
    "top_level_list": (lambda d: None, "expected a map at the top level"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_study_names_file_and_problem(tmp_path, case):
    fn, message = BAD[case]
    doc = [BASE] if case == "top_level_list" else mutated(fn)
    path = write(tmp_path, doc, f"{case}.yaml")
    with pytest.raises(StudyError, match=message) as info:
        load_study(path)
    text = str(info.value)
    assert text.startswith(str(path.resolve())), text
    assert "\n" not in text  # one line


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "name: x\nmodels: [a, b\n  sizes: {", "broken.yaml")
    with pytest.raises(StudyError, match="not valid YAML") as info:
        load_study(path)
    assert str(path.resolve()) in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(StudyError, match="study file not found") as info:
        load_study(path)
    assert str(path.resolve()) in str(info.value)
    assert STUDY_ENV in str(info.value)


def test_study_error_is_a_value_error():
    assert issubclass(StudyError, ValueError)


# ----------------------------------------------------------------------------------------------
# RECOVERY_STUDY


def test_env_var_selects_the_study(tmp_path, monkeypatch):
    path = write(tmp_path, BASE, "chosen.yaml")
    monkeypatch.setenv(STUDY_ENV, str(path))
    s = load_study()
    assert s.name == "unit" and s.path == path.resolve()
    # an explicit path wins over the environment
    assert load_study(TINY).name == "tiny"


def test_env_var_pointing_nowhere_fails(tmp_path, monkeypatch):
    monkeypatch.setenv(STUDY_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(StudyError, match="missing.yaml: study file not found"):
        load_study()


def test_default_is_demo_without_env(monkeypatch):
    monkeypatch.delenv(STUDY_ENV, raising=False)
    assert DEFAULT_STUDY == "demo"
    s = load_study()
    assert s.name == "demo" and s.path == DEMO.resolve()


# ----------------------------------------------------------------------------------------------
# values of the wrong type deeper in the file are StudyErrors too (not bare ValueError/TypeError)


TYPE_CASES = {
    # YAML `true` is a bool, which Python counts as an int: it is not a training size
    "bool_size": (_set("sizes", [True, 10]), "sizes must be a non-empty list of positive"),
    "bool_simulations": (_set("simulations", True), "simulations"),
    "text_max_iter": (lambda d: d["probe"].update(max_iter="many"), "max_iter"),
    "text_cv_folds": (lambda d: d["generator"].update(cv_folds="five"), "cv_folds"),
    "regression_not_a_map": (_set("regression", [1, 2]), "regression"),
}


@pytest.mark.parametrize("case", list(TYPE_CASES))
def test_bad_value_types_are_study_errors(tmp_path, case):
    fn, message = TYPE_CASES[case]
    path = write(tmp_path, mutated(fn), f"{case}.yaml")
    with pytest.raises(StudyError, match=message) as info:
        load_study(path)
    assert str(info.value).startswith(str(path.resolve()))


def test_stopping_rule_is_a_study_setting_in_the_code_versions(tmp_path):
    doc = copy.deepcopy(BASE)
    doc["probe"]["stop"] = "paper"
    paper = load_study(write(tmp_path, doc, "paper.yaml"))
    optimum = load_study(write(tmp_path, BASE))
    assert paper.probe_stop == "paper" and optimum.probe_stop == "optimum"
    # its fitted assets are stale under the other rule
    fitted = {"generator_probes", "candidate_scores"}
    before, after = code_versions(optimum), code_versions(paper)
    assert {a for a in before if before[a] != after[a]} >= fitted
    assert before["stimuli"] == after["stimuli"]


# ----------------------------------------------------------------------------------------------
# the schema: unknown keys, the models' sources and bounds name the file and the key path


def _entry(i, **change):
    return lambda d: d["models"][i].update(change)


KEY_PATHS = {
    "unknown_top_level_key": (
        _set("colour", "red"),
        "unknown keys ['colour']; allowed: ['allow_random_weights', 'base', 'candidates', "
        "'data_dir', 'device', 'execution', 'extra_models', 'features_dir', 'generator', 'human', "
        "'kind', 'models', 'name', 'probe', 'regression', 'simulations', 'sizes', 'stimuli', "
        "'things', 'weights_dir']",
    ),
    "unknown_key_in_a_model": (
        _entry(1, colour="red"),
        "models[1]: model 'b' (source timm): unknown keys ['colour']; allowed: ['arch', "
        "'checkpoint', 'hf_repo', 'layer', 'name', 'options', 'seed', 'source', 'weights']",
    ),
    "unknown_key_in_a_map": (
        lambda d: d["probe"].update(famly="diagonal"),
        "probe: unknown keys ['famly']; allowed: ['dtype', 'family', 'max_iter', 'penalty', "
        "'stop']",
    ),
    "unknown_source": (
        _entry(1, source="hub"),
        "models[1].source must be one of ['timm', 'features'], got 'hub'",
    ),
    "bound_of_a_model_key": (_entry(1, seed=-1), "models[1]: 'seed' must be >= 0, got -1"),
    "bound_of_a_nested_key": (
        lambda d: d["generator"].update(cv_folds=1),
        "generator: 'cv_folds' must be >= 2, got 1",
    ),
    "bound_of_a_demo_setting": (
        lambda d: d["stimuli"].update(size=4),
        "stimuli: 'size' must be >= 8, got 4",
    ),
    "type_of_a_model_key": (
        _entry(0, arch=18),
        "models[0]: 'arch' must be a string, got 18",
    ),
    "model_not_a_map": (
        lambda d: d["models"].append("c"),
        "models[2] must be a map, got 'c'",
    ),
    "missing_model_key": (
        lambda d: d["models"][0].pop("arch"),
        "models[0]: missing required key 'arch'",
    ),
    "choice_of_a_deep_key": (
        _set("execution", {"executor": "ray"}),
        "execution.executor must be one of ['in_process', 'dask'], got 'ray'",
    ),
}


@pytest.mark.parametrize("case", list(KEY_PATHS))
def test_schema_errors_name_the_file_and_the_key_path(tmp_path, case):
    fn, reason = KEY_PATHS[case]
    path = write(tmp_path, mutated(fn), f"{case}.yaml")
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert str(info.value) == f"{path.resolve()}: {reason}"


def test_an_empty_map_reads_as_empty(tmp_path):
    doc = mutated(lambda d: d.update(human=None, probe=None, regression=None))
    s = load_study(write(tmp_path, doc))
    assert s.human == {} and s.convention_reference == "pixels"
    assert (s.spec.family, s.max_iter, s.regression) == (
        "full",
        1000,
        {"n_boot": 10_000, "seed": 0},
    )


SCHEMA = ROOT / "studies" / "study.schema.json"
SHIPPED = sorted((ROOT / "studies").glob("*.yaml"))


def test_the_published_schema_is_the_generated_one(capsys):
    """studies/study.schema.json is what `python -m recovery_assets.study --schema` writes: after
    a change to the models, run it again (> studies/study.schema.json)."""
    assert json.loads(SCHEMA.read_text()) == study_json_schema()
    assert study_main(["--schema"]) == 0
    assert capsys.readouterr().out == SCHEMA.read_text()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_study_validates(path):
    study = load_study(path)
    assert study.name == path.stem
    lines = path.read_text().splitlines()
    assert lines[0] == "# yaml-language-server: $schema=study.schema.json"  # editors find it


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_study_file_passes_the_json_schema(path):
    """What an editor checks: the file as written (a `base:` file gives only what it changes)."""
    doc = yaml.safe_load(path.read_text())
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(doc)


def test_the_json_schema_refuses_what_the_loader_refuses():
    validator = jsonschema.Draft202012Validator(study_json_schema())
    assert validator.is_valid(BASE)
    for fn in (_set("colour", 1), _entry(0, colour=1), _entry(0, source="hub"), _del("kind")):
        assert not validator.is_valid(mutated(fn))
    assert validator.is_valid({"base": "demo.yaml", "name": "child", "probe": {"stop": "paper"}})
