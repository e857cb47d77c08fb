"""The THINGS study files: the published experiments load with the paper's settings, every timm
name in them exists, and the things-specific keys (base files, folders, sources) are validated."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import yaml

from recovery_assets.study import (
    FEATURES_ENV,
    THINGS_ENV,
    WEIGHTS_ENV,
    StudyError,
    load_study,
)

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "studies"
PAPER_MODELS = [
    "ResNet50", "VGG19", "DenseNet201", "ConvNeXt-L", "EfficientNet-B7", "NASNet-L", "CORnet-S",
    "InceptionResNetV2", "Inception-v3", "ViT-L16", "DeiT3-H", "BEiTv2-L", "DINOv2-L",
    "SimCLR-ViT-L", "BarlowTwins-RN50", "SwAV-RN50", "VICReg-RN50", "CLIP-ViT-L-Meta",
    "SLIP-ViT-L", "OpenAI-CLIP-RN50",
]  # fmt: skip
PAPER_SIZES = tuple(50 * 2**k for k in range(17)) + (4_200_000,)
DECADES = lambda lo, hi: tuple(10.0**e for e in range(lo, hi + 1))  # noqa: E731


def test_main_experiment_is_the_papers():
    s = load_study(STUDIES / "things.yaml")
    assert s.kind == "things" and s.name == "things"
    assert s.model_names == PAPER_MODELS
    assert s.sizes == PAPER_SIZES and len(s.sizes) == 18 and s.largest_size == 4_200_000
    assert s.simulations == 30
    assert s.spec.family == "full" and s.spec.penalty == "shrinkage"
    assert s.generator_lambdas == pytest.approx(DECADES(-6, 2))
    assert s.candidate_lambdas == pytest.approx(DECADES(-6, 4))
    assert s.generator_cv_folds == 5 and s.generator_cv_seed == 42
    assert s.calibration_target == "noise_ceiling"
    assert s.things["n_concepts"] == 1854 and not s.allow_random_weights
    assert s.regression["n_boot"] == 10_000
    assert all(m.weights != "random" for m in s.models if m.source == "timm")


FOUR = (400, 25_600, 204_800, 1_638_400)
EXPERIMENTS = {
    "things_pca500.yaml": ("pca", "shrinkage", 500, PAPER_SIZES, 30, 20),
    "things_30models.yaml": ("full", "shrinkage", None, PAPER_SIZES, 30, 30),
    "things_l1.yaml": ("full", "l1", None, FOUR, 10, 20),
    "things_zero_shot.yaml": ("zero_shot", "shrinkage", None, FOUR, 10, 20),
    "things_diagonal.yaml": ("diagonal", "shrinkage", None, FOUR, 10, 20),
    "things_rank30.yaml": ("rank", "shrinkage", 30, FOUR, 10, 20),
}


@pytest.mark.parametrize("file", sorted(EXPERIMENTS))
def test_other_experiments_extend_the_main_one(file):
    family, penalty, k, sizes, sims, n_models = EXPERIMENTS[file]
    s = load_study(STUDIES / file)
    assert s.name == file.removesuffix(".yaml") and s.kind == "things"
    assert (s.spec.family, s.spec.penalty, s.spec.k) == (family, penalty, k)
    assert s.sizes == sizes and s.simulations == sims and len(s.models) == n_models
    assert s.model_names[:20] == PAPER_MODELS  # the base's models, in the paper's order
    # the L1 experiment has its own candidate grid (1e-5 ... 1e2, 8 values)
    grid = DECADES(-5, 2) if penalty == "l1" else DECADES(-6, 4)
    assert s.candidate_lambdas == pytest.approx(grid)
    assert len(s.candidate_lambdas) == (8 if penalty == "l1" else 11)
    assert s.generator_fit_on == ("trainset", "validationset")
    assert s.probe_stop == "optimum"


def test_the_paper_stopping_rule_study_differs_only_in_its_rule():
    main, paper = load_study(STUDIES / "things.yaml"), load_study(STUDIES / "things_paper.yaml")
    assert (main.probe_stop, paper.probe_stop) == ("optimum", "paper")
    assert paper.name == "things_paper" and paper.model_names == main.model_names
    assert (paper.sizes, paper.simulations, paper.spec) == (main.sizes, main.simulations, main.spec)
    assert paper.candidate_lambdas == main.candidate_lambdas


@pytest.mark.parametrize("file", ["things.yaml", "things_30models.yaml"])
def test_every_timm_name_exists(file):
    for m in load_study(STUDIES / file).models:
        if m.source == "timm":
            assert timm.is_model(m.arch), m.arch
            if "." in m.arch:  # a pretrained tag: its weights must be a real timm release
                assert m.arch in timm.list_pretrained(m.arch.split(".")[0] + "*"), m.arch
        else:
            assert (m.n_params is None) != (m.n_params_like is None), m.name
            if m.n_params_like:
                assert timm.is_model(m.n_params_like), m.n_params_like


# ----------------------------------------------------------------------------------------------
# a small things document to mutate

BASE = {
    "name": "unit_things",
    "kind": "things",
    "things": {"root": "data/things", "n_concepts": 36},
    "features_dir": "feats",
    "models": [
        {"name": "a", "source": "features", "file": "a.parquet", "n_params": 10},
        {"name": "b", "arch": "resnet18", "weights": "checkpoint", "checkpoint": "b.pth"},
    ],
    "human": {"convention_reference": "a"},
    "generator": {"lambdas": [0.01, 1.0]},
    "candidates": {"lambdas": [0.01, 1.0]},
    "sizes": [50],
    "simulations": 1,
}


def write(tmp_path: Path, doc, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_folders_resolve_relative_to_the_file_and_env_vars_win(tmp_path, monkeypatch):
    for env in (THINGS_ENV, FEATURES_ENV, WEIGHTS_ENV):
        monkeypatch.delenv(env, raising=False)
    s = load_study(write(tmp_path, BASE))
    assert s.things_root() == (tmp_path / "data" / "things").resolve()
    assert s.feature_file(s.model("a")) == (tmp_path / "feats" / "a.parquet").resolve()
    assert s.checkpoint_file(s.model("b")) == (tmp_path / "b.pth").resolve()
    monkeypatch.setenv(THINGS_ENV, str(tmp_path / "elsewhere"))
    monkeypatch.setenv(FEATURES_ENV, str(tmp_path / "f2"))
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "w"))
    assert s.things_root() == tmp_path / "elsewhere"
    assert s.feature_file(s.model("a")) == tmp_path / "f2" / "a.parquet"
    assert s.checkpoint_file(s.model("b")) == tmp_path / "w" / "b.pth"


def test_unset_things_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(THINGS_ENV, raising=False)
    doc = copy.deepcopy(BASE)
    doc["things"]["root"] = None
    s = load_study(write(tmp_path, doc))
    with pytest.raises(StudyError, match=f"THINGS folder is not set.*{THINGS_ENV}"):
        s.things_root()


def test_base_file_merges_maps_and_appends_models(tmp_path):
    write(tmp_path, BASE, "main.yaml")
    child = {
        "base": "main.yaml",
        "name": "child",
        "probe": {"family": "diagonal"},
        "sizes": [100, 200],
        "extra_models": [{"name": "c", "source": "features", "n_params_like": "resnet18"}],
    }
    s = load_study(write(tmp_path, child, "child.yaml"))
    assert s.name == "child" and s.model_names == ["a", "b", "c"]
    assert s.spec.family == "diagonal" and s.sizes == (100, 200)
    assert s.things["n_concepts"] == 36  # merged from the base
    assert s.feature_file(s.model("c")).name == "c.npy"  # default file name


BAD = {
    "random_weights": (
        lambda d: d["models"][1].update(weights="random", checkpoint=None),
        "model 'b' has random weights",
    ),
    "features_without_count": (
        lambda d: d["models"][0].pop("n_params"),
        "model 'a': give its parameter count",
    ),
    "features_with_both_counts": (
        lambda d: d["models"][0].update(n_params_like="resnet18"),
        "model 'a': give its parameter count",
    ),
    "unknown_model_key": (
        lambda d: d["models"][0].update(arch="resnet18"),
        r"model 'a' \(source features\): unknown keys \['arch'\]",
    ),
    "unknown_things_key": (lambda d: d["things"].update(folder="x"), "things: unknown keys"),
    "bad_layout": (lambda d: d["things"].update(image_layout="grid"), "image_layout"),
    "few_concepts": (lambda d: d["things"].update(n_concepts=2), "n_concepts"),
    "checkpoint_with_hf_cache": (
        lambda d: d["models"][1].update(weights="hf_cache"),
        "'checkpoint:' needs 'weights: checkpoint'",
    ),
    "features_in_demo": (
        lambda d: (d.update(kind="demo"), d.pop("things")),
        "precomputed features need a things study",
    ),
    "things_keys_in_demo": (lambda d: d.update(kind="demo"), "'things:' settings need"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_things_study(tmp_path, case):
    fn, message = BAD[case]
    doc = copy.deepcopy(BASE)
    fn(doc)
    path = write(tmp_path, doc, f"{case}.yaml")
    with pytest.raises(StudyError, match=message) as info:
        load_study(path)
    assert str(info.value).startswith(str(path.resolve()))


def test_base_cycle_and_missing_base(tmp_path):
    write(tmp_path, {"base": "b.yaml", "name": "a"}, "a.yaml")
    write(tmp_path, {"base": "a.yaml", "name": "b"}, "b.yaml")
    with pytest.raises(StudyError, match="form a cycle"):
        load_study(tmp_path / "a.yaml")
    write(tmp_path, {"base": "nowhere.yaml", "name": "c"}, "c.yaml")
    with pytest.raises(StudyError, match=r"nowhere.yaml: study file not found \(base of"):
        load_study(tmp_path / "c.yaml")
    write(tmp_path, {"base": "c.yaml"}, "d.yaml")
    with pytest.raises(StudyError, match="must give its own 'name'"):
        load_study(tmp_path / "d.yaml")


@pytest.mark.parametrize("file", sorted(p.name for p in STUDIES.glob("things*.yaml")))
def test_definitions_build_without_the_data(file, monkeypatch):
    """The Dagster definitions of every THINGS experiment load (UI, backfills) before any data
    folder is configured: the folders are only resolved when an asset runs."""
    from recovery_assets.defs import build_definitions

    for env in (THINGS_ENV, FEATURES_ENV, WEIGHTS_ENV):
        monkeypatch.delenv(env, raising=False)
    study = load_study(STUDIES / file)
    repo = build_definitions(study).get_repository_def()
    jobs = {job.name for job in repo.get_all_jobs()}
    prefix = f"{study.slug}__"
    assert {prefix + j for j in ("embeddings_job", "human_job", "recovery_jobs_job")} <= jobs
    keys = repo.get_job(prefix + "recovery_jobs_job").partitions_def.get_partition_keys()
    assert len(keys) == len(study.models) * len(study.sizes)
    assert f"{study.model_names[0]}|{study.sizes[0]}" in keys
