"""A known-answer universe through the whole graph (docs/analyses.md): three models from feature
files on a small THINGS-shaped folder, zero-shot probes, where

- net_a and net_b have independent random features, so each one's data are best predicted by
  itself: under zero-shot probes both are recovered;
- net_c is an exact copy of net_a listed after it, so it ties with net_a on every dataset and the
  tie goes to the model listed first: net_c never wins, net_a wins its data and net_c's, and
  a win by net_a is split evenly between the two (uniform prior);
- recovery saturates at 2/3 (net_c's data always go to net_a), so a target of 0.9 is out of
  reach (``recovery advise``);
- with the generator removed (open set), net_a's data go to its copy net_c and net_c's to net_a,
  each the other's nearest neighbour in representational geometry (identical features: RSA 1).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import yaml
from conftest import query
from things_folders import make_things_folder

from recovery_assets.results import study_advice
from recovery_assets.run import materialize_study
from recovery_assets.study import load_study

SIZES = [50, 200, 1000]
SIMULATIONS = 6


def _sql(db: Path, sql: str):
    return query(db, sql)


@pytest.fixture(scope="module")
def universe(tmp_path_factory, single_thread):
    base = tmp_path_factory.mktemp("known_answers")
    made = make_things_folder(base / "THINGS", n_families=8)
    n = len(made["ids"])
    rng = np.random.default_rng(0)
    features = base / "features"
    features.mkdir()
    a = rng.standard_normal((n, 12)).astype(np.float32)
    b = rng.standard_normal((n, 12)).astype(np.float32)
    np.save(features / "net_a.npy", a)
    np.save(features / "net_b.npy", b)
    np.save(features / "net_c.npy", a.copy())  # an exact duplicate of net_a
    doc = {
        "name": "known_answers",
        "kind": "things",
        "things": {"root": str(made["root"]), "n_concepts": n, "image_layout": "things"},
        "features_dir": str(features),
        "models": [
            {"name": m, "source": "features", "file": f"{m}.npy", "n_params": 1000 + i}
            for i, m in enumerate(["net_a", "net_b", "net_c"])
        ],
        "human": {"convention_reference": "pixels"},
        "probe": {"family": "zero_shot", "penalty": "shrinkage", "dtype": "float32"},
        "generator": {"lambdas": [1e-3], "cv_folds": 3, "cv_seed": 42},
        "candidates": {"lambdas": [1e-3]},
        "sizes": SIZES,
        "simulations": SIMULATIONS,
        "regression": {"n_boot": 50, "seed": 0},
        "device": "cpu",
    }
    path = base / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    study = load_study(path)
    with dg.DagsterInstance.ephemeral() as instance:
        store = materialize_study(
            study, instance, echo=lambda s: None, storage_root=str(base / "data"),
            log_level="WARNING",
        )  # fmt: skip
    return study, store.db_path


def test_the_duplicate_never_wins_and_the_independent_models_are_recovered(universe):
    study, db = universe
    conf = _sql(db, "SELECT * FROM recovery_confusion WHERE criterion = 'accuracy'")
    wins = conf.groupby("winner")["count"].sum()
    assert wins.get("net_c", 0) == 0
    top = conf[conf["n_train"] == max(SIZES)].set_index(["generator", "winner"])["count"]
    assert top.get(("net_a", "net_a"), 0) == SIMULATIONS
    assert top.get(("net_c", "net_a"), 0) == SIMULATIONS
    assert top.get(("net_b", "net_b"), 0) == SIMULATIONS


def test_a_win_by_the_original_is_split_evenly_with_its_copy(universe):
    study, db = universe
    post = _sql(db, "SELECT * FROM identifiability WHERE criterion = 'accuracy'")
    top = post[post["n_train"] == max(SIZES)]
    by_a = top[top["winner"] == "net_a"].set_index("generator")
    assert by_a.loc["net_a", "posterior"] == pytest.approx(0.5, abs=1e-12)
    assert by_a.loc["net_c", "posterior"] == pytest.approx(0.5, abs=1e-12)
    assert by_a.loc["net_b", "posterior"] == pytest.approx(0.0, abs=1e-12)
    by_b = top[top["winner"] == "net_b"].set_index("generator")
    assert by_b.loc["net_b", "posterior"] == pytest.approx(1.0, abs=1e-12)
    assert (top["ci_low"] <= top["posterior"] + 1e-12).all()
    assert (top["posterior"] <= top["ci_high"] + 1e-12).all()
    # the copy never won: it has no posterior at all, and is listed as never won
    assert "net_c" not in set(post["winner"])
    never = _sql(db, "SELECT * FROM never_won WHERE criterion = 'accuracy'")
    assert set(never[never["winner"] == "net_c"]["n_train"]) == set(SIZES)


def test_open_set_sends_the_original_and_its_copy_to_each_other(universe):
    study, db = universe
    jobs = _sql(db, "SELECT * FROM open_set_recovery WHERE criterion = 'accuracy'")
    assert (jobs["open_winner"] != jobs["generator"]).all()
    top = jobs[jobs["n_train"] == max(SIZES)]
    pairs = set(zip(top["generator"], top["open_winner"], strict=True))
    assert ("net_a", "net_c") in pairs and ("net_c", "net_a") in pairs
    rsa = _sql(db, "SELECT * FROM rsa_similarity").set_index(["model", "other"])
    assert rsa.loc[("net_a", "net_c"), "similarity"] == pytest.approx(1.0, abs=1e-9)
    summary = _sql(db, "SELECT * FROM open_set_summary WHERE criterion = 'accuracy'")
    last = summary[summary["n_train"] == max(SIZES)].set_index("model")
    assert last.loc["net_a", "nearest"] == "net_c" and last.loc["net_c", "nearest"] == "net_a"
    assert last.loc["net_a", "frac_to_nearest"] == 1.0
    assert last.loc["net_c", "frac_to_nearest"] == 1.0


def test_advise_says_a_target_above_the_plateau_is_out_of_reach(universe):
    study, db = universe
    summary = _sql(db, "SELECT * FROM recovery_summary WHERE criterion = 'accuracy'")
    assert summary.set_index("n_train").loc[max(SIZES), "accuracy"] == pytest.approx(2 / 3)
    advice = study_advice(study, db, 0.9, "accuracy")
    assert not advice.reachable and advice.n_needed is None
    assert "out of reach" in advice.message
