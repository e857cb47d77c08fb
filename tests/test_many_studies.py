"""Several studies in one Dagster instance and one $RECOVERY_DATA: the two tiny studies below share
their model names and sizes, yet each keeps its own asset keys, partitions, runs and tables."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from recovery_assets.defs import build_definitions
from recovery_assets.defs.resources import StorageResource
from recovery_assets.storage import DATA_ENV, Store, data_root
from recovery_assets.study import STUDY_ENV, StudyError, load_study, study_paths

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "studies" / "tiny.yaml"


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory):
    base = tmp_path_factory.mktemp("many")
    other = base / "tiny_b.yaml"
    # the same models and sizes; other stimuli (seed 1), so the two tables differ
    other.write_text(yaml.safe_dump({"base": str(TINY), "name": "tiny_b", "stimuli": {"seed": 1}}))
    return load_study(TINY), load_study(other), base


def _materialize(defs, instance, keys, parent, partition=None):
    dg.materialize(
        list(defs.assets),
        selection=keys,
        partition_key=partition,
        instance=instance,
        resources={**defs.resources, "storage": StorageResource(root=str(parent))},
        tags={"purpose": "test"},
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
    )


def test_two_studies_keep_their_own_state(two_studies, single_thread):
    a, b, base = two_studies
    parent = base / "data"
    defs = build_definitions([a, b])
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"tiny/stimuli", "tiny_b/stimuli", "tiny/candidate_scores"} <= keys
    jobs = {j.name for j in defs.jobs}
    assert {"tiny__recovery_jobs_job", "tiny_b__recovery_jobs_job"} <= jobs

    model = a.model_names[0]
    with dg.instance_for_test() as instance:
        # study a: stimuli and one model's embeddings; study b: stimuli only
        _materialize(defs, instance, [dg.AssetKey(["tiny", "stimuli"])], parent)
        _materialize(defs, instance, [dg.AssetKey(["tiny", "embeddings"])], parent, model)
        _materialize(defs, instance, [dg.AssetKey(["tiny_b", "stimuli"])], parent)

        emb_a = instance.get_materialized_partitions(dg.AssetKey(["tiny", "embeddings"]))
        emb_b = instance.get_materialized_partitions(dg.AssetKey(["tiny_b", "embeddings"]))
        assert emb_a == {model} and emb_b == set()
        # the old unprefixed key was never written: the two studies cannot be confused
        assert instance.get_latest_materialization_event(dg.AssetKey("stimuli")) is None
        runs = {
            name: instance.get_latest_materialization_event(dg.AssetKey([name, "stimuli"])).run_id
            for name in ("tiny", "tiny_b")
        }
        assert runs["tiny"] != runs["tiny_b"]  # two runs, one per study

    # each study's files sit in its own folder under the one parent
    store_a, store_b = Store(data_root(a, parent)), Store(data_root(b, parent))
    assert store_a.root == parent / "tiny" and store_b.root == parent / "tiny_b"
    stim_a, stim_b = store_a.read_table("stimuli"), store_b.read_table("stimuli")
    assert len(stim_a) == len(stim_b)
    assert not stim_a.equals(stim_b)  # other crops: the tables are the studies' own
    assert store_a.embedding_path(model).is_file()
    assert not store_b.embedding_path(model).exists()
    assert "embeddings" in store_a.tables() and "embeddings" not in store_b.tables()


def test_the_environment_can_list_several_studies(two_studies, monkeypatch):
    a, b, _ = two_studies
    monkeypatch.setenv(STUDY_ENV, f"{a.path}:{b.path}")
    assert study_paths() == [a.path, b.path]
    defs = build_definitions()
    prefixes = {k.path[0] for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert prefixes == {"tiny", "tiny_b"}
    # shipped studies can be named instead of given by path
    monkeypatch.setenv(STUDY_ENV, "tiny:demo")
    assert [p.name for p in study_paths()] == ["tiny.yaml", "demo.yaml"]
    monkeypatch.setenv(STUDY_ENV, f"{a.path}:{a.path}")
    with pytest.raises(StudyError, match="distinct names"):
        build_definitions()
    monkeypatch.setenv(STUDY_ENV, "no_such_study")
    with pytest.raises(StudyError, match="no shipped study is called 'no_such_study'"):
        study_paths()


def test_runs_of_a_study_job_carry_the_study_tag(two_studies):
    a, b, _ = two_studies
    defs = build_definitions([a, b])
    for study in (a, b):
        job = defs.resolve_job_def(f"{study.slug}__stimuli_job")
        assert job.tags.get("study") == study.name


def test_data_env_is_a_parent(two_studies, monkeypatch, tmp_path):
    a, b, _ = two_studies
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root(a) == tmp_path / "tiny" and data_root(b) == tmp_path / "tiny_b"
