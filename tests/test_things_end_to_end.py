"""The real-data path end to end on a small THINGS-shaped folder the test builds itself: features
from files (Parquet keyed by uniqueID in another order, .npy in concept order) and from a timm
network with a local checkpoint the test saves; and bad folders that stop the graph before
anything downstream is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from things_folders import make_things_folder

from recovery_assets.run import materialize_study
from recovery_assets.sources.features import write_feature_file
from recovery_assets.sources.timm_features import create_model, extract_features
from recovery_assets.storage import Store
from recovery_assets.study import load_study

ROOT = Path(__file__).resolve().parent.parent


def _study_doc(folder: Path, features: Path, checkpoint: Path) -> dict:
    return {
        "name": "things_e2e",
        "kind": "things",
        "things": {"root": str(folder), "n_concepts": 36, "image_layout": "things"},
        "features_dir": str(features),
        "models": [
            {"name": "net_a", "source": "features", "file": "net_a.parquet", "n_params": 1000},
            {
                "name": "net_b",
                "source": "features",
                "file": "net_b.npy",
                "n_params_like": "resnet18",
            },
            {
                "name": "net_c",
                "arch": "resnet18",
                "weights": "checkpoint",
                "checkpoint": str(checkpoint),
            },
        ],
        "human": {"convention_reference": "pixels"},
        "probe": {"family": "full", "penalty": "shrinkage", "dtype": "float32", "max_iter": 300},
        "generator": {"lambdas": [1e-3, 1e-1], "cv_folds": 3, "cv_seed": 42},
        "candidates": {"lambdas": [1e-3, 1e-1]},
        "sizes": [50, 100],
        "simulations": 2,
        "regression": {"n_boot": 100, "seed": 0},
        "device": "cpu",
    }


@pytest.fixture(scope="module")
def things_inputs(tmp_path_factory, single_thread):
    base = tmp_path_factory.mktemp("things_e2e")
    made = make_things_folder(base / "THINGS")
    ids, images = made["ids"], made["images"]
    features = base / "features"
    features.mkdir()
    a, _ = extract_features("resnet18", images, seed=5)
    b, _ = extract_features("mobilenetv3_small_100", images, seed=0)
    order = np.random.default_rng(1).permutation(len(ids))  # not the concept order
    write_feature_file(features / "net_a.parquet", a[order], [ids[i] for i in order])
    write_feature_file(features / "net_b.npy", b)
    checkpoint = base / "weights" / "net_c.pth"
    checkpoint.parent.mkdir()
    torch.save(create_model("resnet18", seed=7).state_dict(), checkpoint)
    study_path = base / "things_e2e.yaml"
    study_path.write_text(yaml.safe_dump(_study_doc(made["root"], features, checkpoint)))
    return {"base": base, "made": made, "a": a, "b": b, "study": study_path, "ckpt": checkpoint}


@pytest.fixture(scope="module")
def things_run(things_inputs):
    study = load_study(things_inputs["study"])
    data = things_inputs["base"] / "data"
    with dg.DagsterInstance.ephemeral() as instance:
        store = materialize_study(
            study, instance, echo=lambda s: None, storage_root=str(data), log_level="WARNING"
        )
    return study, store


def _sql(store: Store, query: str):
    con = duckdb.connect(str(store.db_path), read_only=True)
    try:
        return con.execute(query).fetchdf()
    finally:
        con.close()


def test_the_whole_graph_runs_on_things_files(things_run):
    study, store = things_run
    stimuli = _sql(store, "SELECT * FROM stimuli ORDER BY concept")
    assert len(stimuli) == 36
    assert stimuli["uniqueID"].tolist() == [
        line.split("\t")[5] for line in (study.things_root() / "things_concepts.tsv").read_text()
        .splitlines()[1:]
    ]  # fmt: skip
    emb = _sql(store, "SELECT * FROM embeddings ORDER BY model").set_index("model")
    assert emb.loc["net_a", "source"] == "features" and emb.loc["net_a", "n_params"] == 1000
    assert emb.loc["net_b", "n_params"] == 11_176_512  # counted from timm's resnet18
    assert emb.loc["net_c", "source"] == "timm" and emb.loc["net_c", "weights"] == "checkpoint"
    assert emb.loc["net_c", "embedding_dim"] == 512
    human = _sql(store, "SELECT * FROM human_judgements").set_index("file")
    assert set(human["convention"]) == {"pair_pair_odd"}
    assert 1 / 3 < human.loc["testset2", "noise_ceiling"] < 1
    curve = _sql(store, (ROOT / "sql" / "recovery_curve.sql").read_text())
    assert curve["n_train"].tolist() == [50, 100]
    assert (curve["n_total"] == len(study.models) * study.simulations).all()
    regression = _sql(store, "SELECT count(*) AS n FROM misidentification_regression")
    assert regression["n"][0] > 0


def test_features_from_files_are_in_concept_order(things_inputs, things_run):
    _, store = things_run
    for name in ("a", "b"):
        arrays, meta = store.load_arrays(store.embedding_path(f"net_{name}"), name)
        np.testing.assert_array_equal(arrays["features"], things_inputs[name])
    _, meta = store.load_arrays(store.embedding_path("net_a"), "a")
    assert meta["order"] == "reordered by uniqueID"


def test_timm_model_uses_the_local_checkpoint(things_inputs, things_run):
    _, store = things_run
    _, meta = store.load_arrays(store.embedding_path("net_c"), "c")
    import hashlib

    digest = hashlib.sha256(things_inputs["ckpt"].read_bytes()).hexdigest()
    assert meta["checkpoint_sha256"] == digest
    assert meta["image_size"] == [224, 224]  # timm's own evaluation transform, not 64 px


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recovery_assets.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def test_validate_things_cli_on_good_wrong_convention_and_shuffled(tmp_path, things_inputs):
    good = _run_cli("validate-things", str(things_inputs["made"]["root"]), "--n-concepts", "36")
    assert good.returncode == 0, good.stdout + good.stderr
    report = json.loads(good.stdout)
    assert report["usable"] and report["convention"] == "pair_pair_odd"
    assert report["n_concepts"] == 36 and report["files"]["trainset"]["rows"] == 3000
    assert 1 / 3 < report["noise_ceiling"]["testset2"] < 1

    odd = make_things_folder(tmp_path / "odd", convention="odd_pair_pair")
    res = _run_cli("validate-things", str(odd["root"]))
    assert res.returncode == 0 and json.loads(res.stdout)["convention"] == "odd_pair_pair"
    assert json.loads(res.stdout)["noise_ceiling"] == report["noise_ceiling"]

    shuffled = make_things_folder(tmp_path / "shuffled", shuffled=True)
    res = _run_cli("validate-things", str(shuffled["root"]))
    assert res.returncode == 2
    bad = json.loads(res.stdout)
    assert not bad["usable"] and bad["convention"] is None
    assert any("concept order" in p for p in bad["problems"]), bad["problems"]

    wrong_n = _run_cli(
        "validate-things", str(things_inputs["made"]["root"]), "--n-concepts", "1854"
    )
    assert wrong_n.returncode == 2 and "1854" in " ".join(json.loads(wrong_n.stdout)["problems"])


def test_validate_things_with_a_features_reference(things_inputs):
    features = things_inputs["base"] / "features" / "net_a.parquet"
    res = _run_cli(
        "validate-things", str(things_inputs["made"]["root"]), "--features", str(features)
    )
    report = json.loads(res.stdout)
    assert report["reference"] == "features" and report["reference_file"] == str(features)


def _bad_study(things_inputs, tmp_path, edit) -> tuple[Path, Path]:
    """A copy of the good study over a copy of the folder, broken by ``edit(folder, doc)``."""
    import shutil

    folder = tmp_path / "THINGS"
    shutil.copytree(things_inputs["made"]["root"], folder)
    doc = yaml.safe_load(things_inputs["study"].read_text())
    doc["things"]["root"] = str(folder)
    edit(folder, doc)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, tmp_path / "data"


def _drop_image(folder, doc):
    uid = (folder / "things_concepts.tsv").read_text().splitlines()[3].split("\t")[5]
    for f in (folder / "images" / uid).iterdir():
        f.unlink()


def _nan_features(folder, doc):
    bad = Path(doc["features_dir"]).parent / "bad_features"
    bad.mkdir(exist_ok=True)
    x = np.load(Path(doc["features_dir"]) / "net_b.npy")
    x[4, 2] = np.nan
    np.save(bad / "net_b.npy", x)
    doc["models"][1]["file"] = str(bad / "net_b.npy")


def _shuffle_concepts(folder, doc):
    lines = (folder / "things_concepts.tsv").read_text().splitlines()
    body = lines[1:]
    np.random.default_rng(3).shuffle(body)
    (folder / "things_concepts.tsv").write_text("\n".join([lines[0], *body]) + "\n")


def _bad_checkpoint(folder, doc):
    wrong = Path(doc["models"][2]["checkpoint"]).parent / "wrong.pth"
    torch.save(create_model("resnet34", seed=0).state_dict(), wrong)
    doc["models"][2]["checkpoint"] = str(wrong)


def _unknown_arch(folder, doc):
    doc["models"][2]["arch"] = "resnet_nonexistent"


def _bad_token(folder, doc):
    path = folder / "triplets" / "trainset.txt"
    lines = path.read_text().splitlines()
    lines[6] = lines[6].split()[0] + " 2.5 7"
    path.write_text("\n".join(lines) + "\n")


def _duplicate_id(folder, doc):
    path = folder / "things_concepts.tsv"
    lines = path.read_text().splitlines()
    second = lines[2].split("\t")
    second[5] = lines[1].split("\t")[5]
    lines[2] = "\t".join(second)
    path.write_text("\n".join(lines) + "\n")


def _wrong_row_count(folder, doc):
    doc["things"]["n_concepts"] = 1854


def _ids_do_not_match(folder, doc):
    feats = Path(doc["features_dir"])
    table = pd.read_parquet(feats / "net_a.parquet")
    table.loc[3, "uniqueID"] = "not_a_concept"
    table.to_parquet(feats.parent / "renamed.parquet")
    doc["models"][0]["file"] = str(feats.parent / "renamed.parquet")


BROKEN = {
    "non_integer_token": (_bad_token, "human_judgements", "line 7"),
    "duplicate_concept_id": (_duplicate_id, "stimuli", "duplicate"),
    "wrong_number_of_concepts": (_wrong_row_count, "stimuli", "1854"),
    "feature_ids_do_not_match": (_ids_do_not_match, "embeddings", "not_a_concept"),
    "missing_image": (_drop_image, "stimuli", "no image"),
    "nan_features": (_nan_features, "embeddings", "NaN"),
    "shuffled_concepts": (_shuffle_concepts, "human_judgements", "concept order"),
    "checkpoint_does_not_fit": (_bad_checkpoint, "embeddings", "does not fit timm architecture"),
    "unknown_arch": (_unknown_arch, "embeddings", "model 'net_c': unknown timm architecture"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bad_input_stops_the_graph_and_writes_nothing_downstream(things_inputs, tmp_path, case):
    edit, failing_asset, message = BROKEN[case]
    path, data = _bad_study(things_inputs, tmp_path, edit)
    study = load_study(path)
    with dg.DagsterInstance.ephemeral() as instance:
        with pytest.raises(Exception) as info:
            materialize_study(
                study, instance, echo=lambda s: None, storage_root=str(data), log_level="CRITICAL"
            )
        failed = [
            event.step_key
            for run in instance.get_runs()
            for event in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        ]
        retried = [
            event.step_key
            for run in instance.get_runs()
            for kind in (dg.DagsterEventType.STEP_UP_FOR_RETRY, dg.DagsterEventType.STEP_RESTARTED)
            for event in instance.all_logs(run.run_id, of_type=kind)
        ]
    assert retried == []  # bad input is no transient failure: the retry policy does not apply
    error = f"{info.value} {info.value.__cause__}"
    assert message.lower() in error.lower(), error
    # one step failed: the asset that reads the input (step keys carry the study's key prefix)
    assert failed == [f"{study.name}__{failing_asset}"]
    store = Store(data / study.name)
    assert not store.path("generator_probes").exists()  # nothing downstream was written
    assert not (store.path("tables") / "generator_probes").exists()


# ----------------------------------------------------------------------------------------------
# the two published forms of the release, and a folder without images


def _materialize(study_path: Path, data: Path):
    study = load_study(study_path)
    with dg.DagsterInstance.ephemeral() as instance:
        store = materialize_study(
            study, instance, echo=lambda s: None, storage_root=str(data), log_level="WARNING"
        )
    return study, store


@pytest.fixture(scope="module")
def release_run(things_inputs, tmp_path_factory):
    """The same study on a folder holding only the raw release table (choice as concept index)."""
    base = tmp_path_factory.mktemp("release")
    made = make_things_folder(
        base / "THINGS", triplet_form="release_table", choice_encoding="concept"
    )
    doc = yaml.safe_load(things_inputs["study"].read_text())
    doc["things"]["root"] = str(made["root"])
    path = base / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return (made, *_materialize(path, base / "data"))


def test_the_release_table_runs_the_graph_with_the_same_judgements(things_run, release_run):
    made, study, store = release_run
    assert not (made["root"] / "triplets").exists()  # nothing but the table
    human = _sql(store, "SELECT * FROM human_judgements").set_index("file")
    files = _sql(things_run[1], "SELECT * FROM human_judgements").set_index("file")
    assert set(human["source"]) == {"release_table"}
    assert set(human["choice_encoding"]) == {"concept"}
    # group 0 is the training and validation files together; the test sets are the same
    assert human.loc["trainset", "rows"] == files.loc[["trainset", "validationset"], "rows"].sum()
    for name in ("testset1", "testset2", "testset3"):
        assert human.loc[name, "rows"] == files.loc[name, "rows"]
    assert human.loc["testset2", "noise_ceiling"] == files.loc["testset2", "noise_ceiling"]
    triplets = _sql(store, "SELECT set, count(*) AS n, count(subject_id) AS s FROM human_triplets "
                    "GROUP BY set").set_index("set")  # fmt: skip
    assert (triplets["n"] == triplets["s"]).all()  # every judgement keeps its subject id
    assert triplets.loc["trainset", "n"] == human.loc["trainset", "rows"]
    # generators are fitted on every non-test judgement, in both forms: the same count
    gen = _sql(store, "SELECT * FROM generator_probes").set_index("model")
    gen_files = _sql(things_run[1], "SELECT * FROM generator_probes").set_index("model")
    assert (gen["n_human_train"] == human.loc["trainset", "rows"]).all()
    assert (gen_files["n_human_train"] == gen["n_human_train"]).all()
    assert set(gen_files["fit_on"]) == {"trainset+validationset"} and set(gen["fit_on"]) == {
        "trainset"
    }
    curve = _sql(store, (ROOT / "sql" / "recovery_curve.sql").read_text())
    assert (curve["n_total"] == len(study.models) * study.simulations).all()


def test_generator_reports_test_set_2_and_cross_validated_accuracy(things_run):
    study, store = things_run
    gen = _sql(store, "SELECT * FROM generator_probes").set_index("model")
    cv = _sql(store, "SELECT * FROM generator_cv")
    for model, row in gen.iterrows():
        mine = cv[(cv["model"] == model) & (cv["lam"] == row["lam"])]
        assert len(mine) == study.generator_cv_folds
        assert row["human_val_accuracy"] == pytest.approx(mine["val_acc"].mean(), abs=1e-12)
        _, meta = store.load_arrays(store.generator_path(model), model)
        assert row["human_test_accuracy"] == meta["testset2_accuracy"]
        assert row["human_test_nll"] == meta["testset2_nll"]
        assert "validationset_accuracy" not in meta  # fitted on it, so not reported as held out


@pytest.fixture(scope="module")
def features_only_run(things_inputs, tmp_path_factory):
    """triplet_dataset/ form, no images at all, every model from features (one a thingsvision
    output with three images per concept), a model as the convention reference."""
    import shutil

    from recovery_assets.sources.thingsvision import write_thingsvision_features

    base = tmp_path_factory.mktemp("features_only")
    made = make_things_folder(base / "THINGS", triplet_form="triplet_dataset")
    shutil.rmtree(made["image_dir"])
    ids, b = made["ids"], things_inputs["b"]
    rng = np.random.default_rng(0)
    names, rows = [], []
    for i in rng.permutation(len(ids)):  # thingsvision's order is not the concept order
        uid = ids[i]
        for suffix, row in (("02s", rng.normal(size=b.shape[1])), ("01b", b[i])):
            names.append(f"images/{uid}/{uid}_{suffix}.jpg")
            rows.append(row)
    tv = base / "thingsvision" / "net_b"
    write_thingsvision_features(tv, np.asarray(rows, dtype=np.float32), names)
    doc = yaml.safe_load(things_inputs["study"].read_text())
    doc["name"] = "things_features"
    doc["things"]["root"] = str(made["root"])
    noisy = things_inputs["a"] + rng.normal(scale=0.5, size=things_inputs["a"].shape)
    np.save(base / "net_d.npy", noisy.astype(np.float32))
    doc["models"] = [
        doc["models"][0],
        {"name": "net_b", "source": "features", "file": str(tv / "features.npy"), "n_params": 7},
        {"name": "net_d", "source": "features", "file": str(base / "net_d.npy"), "n_params": 9},
    ]
    doc["human"]["convention_reference"] = "net_a"
    path = base / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return (made, *_materialize(path, base / "data"))


def test_a_folder_without_images_runs_a_features_only_study(things_inputs, features_only_run):
    made, study, store = features_only_run
    assert not (made["root"] / "images").exists()
    assert (made["root"] / "triplet_dataset" / "trainset.txt").is_file()
    stimuli = _sql(store, "SELECT * FROM stimuli ORDER BY concept")
    assert stimuli["uniqueID"].tolist() == made["ids"] and set(stimuli["image"]) == {""}
    assert not store.path("stimuli", "images.npy").exists()
    # the thingsvision rows were mapped to concepts by file name, the task ('b') image taken
    arrays, meta = store.load_arrays(store.embedding_path("net_b"), "net_b")
    np.testing.assert_array_equal(arrays["features"], things_inputs["b"])
    assert meta["format"] == "thingsvision-npy" and meta["n_images"] == 2 * len(made["ids"])
    human = _sql(store, "SELECT * FROM human_judgements").set_index("file")
    assert human.loc["trainset", "path"].endswith("triplet_dataset/trainset.txt")
    curve = _sql(store, "SELECT * FROM recovery_summary WHERE criterion = 'accuracy'")
    assert sorted(curve["n_train"]) == list(study.sizes)
    # validate-things agrees: usable without images when features decide the convention
    res = _run_cli(
        "validate-things",
        str(made["root"]),
        "--features",
        str(things_inputs["base"] / "features" / "net_a.parquet"),
    )
    report = json.loads(res.stdout)
    assert res.returncode == 0 and report["usable"], report["problems"]
    assert report["images"] is None and any("no image folder" in n for n in report["notes"])
    # without features the pixel reference needs the images: not usable, and it says why
    res = _run_cli("validate-things", str(made["root"]))
    assert res.returncode == 2
    assert any("no image folder" in p for p in json.loads(res.stdout)["problems"])


def _corrupt_release_row(made: dict) -> str:
    """Set image1 of the 10th data row to 0 (indices are 1-based); returns the expected place."""
    path = made["root"] / "triplets_large_final_correctednc_correctedorder.csv"
    lines = path.read_text().splitlines()
    fields = lines[10].split("\t")
    header = lines[0].split("\t")
    fields[header.index("image1")] = "0"
    lines[10] = "\t".join(fields)
    path.write_text("\n".join(lines) + "\n")
    return "line 11"


def _orphan_image_line(made: dict, features: Path) -> str:
    names = features.parent / "file_names.txt"
    lines = names.read_text().splitlines()
    lines[4] = "images/not_a_concept/not_a_concept_01b.jpg"
    names.write_text("\n".join(lines) + "\n")
    return "line 5"


@pytest.mark.parametrize("case", ["release_table_bad_index", "thingsvision_unknown_image"])
def test_recovery_study_reports_bad_input_in_one_line(things_inputs, tmp_path, case):
    """`recovery study` on a bad release table or thingsvision list: exit code 2, one line on
    stderr naming the file and the line, no traceback, nothing written past the failed step."""
    from recovery_assets.sources.thingsvision import write_thingsvision_features

    made = make_things_folder(tmp_path / "THINGS", triplet_form="release_table")
    ids, b = made["ids"], things_inputs["b"]
    tv = tmp_path / "tv"
    names = [f"images/{u}/{u}_01b.jpg" for u in ids]
    write_thingsvision_features(tv, b, names)
    if case == "release_table_bad_index":
        where, bad_file = _corrupt_release_row(made), "triplets_large_final_correctednc"
    else:
        where, bad_file = _orphan_image_line(made, tv / "features.npy"), "file_names.txt"
    doc = yaml.safe_load(things_inputs["study"].read_text())
    doc["things"]["root"] = str(made["root"])
    doc["models"] = [
        doc["models"][0],
        {"name": "net_b", "source": "features", "file": str(tv / "features.npy"), "n_params": 7},
        {"name": "net_d", "source": "features", "file": "net_b.npy", "n_params": 9},
    ]
    study = tmp_path / "bad.yaml"
    study.write_text(yaml.safe_dump(doc))
    env = {
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "DAGSTER_HOME": str(tmp_path / "home"),
        "RECOVERY_DATA": str(tmp_path / "data"),
    }
    res = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "recovery"), "study", "--study", str(study)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert err[0].startswith("recovery study: error: ") and bad_file in err[0] and where in err[0]
    data = tmp_path / "data" / "things_e2e"
    assert not (data / "generator_probes").exists()  # nothing past the failed step
    assert not (data / "tables" / "generator_probes").exists()
