"""The analyses of docs/analyses.md wired into the platform, on the tiny study: the assets
`identifiability` and `open_set_recovery` (their tables equal the core functions recomputed from
the stored tables), the SQL recipes, and the commands `recovery advise` and `recovery compare`."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import assert_same_rows, query

from recovery_assets import pipeline
from recovery_assets.cli import main
from recovery_assets.core.identifiability import identifiability_table, never_won_table
from recovery_assets.core.open_set import (
    nearest_neighbours,
    open_set_summary,
    open_set_winners,
    rsa_matrix,
)
from recovery_assets.storage import DATA_ENV, Store

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _sql(data: Path, sql: str) -> pd.DataFrame:
    return query(data / "recovery.duckdb", sql)


def _metadata(tiny_run, asset: str) -> dict:
    with dg.DagsterInstance.from_config(str(tiny_run.home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(["tiny", asset]))
    assert event is not None and event.asset_materialization is not None, asset
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _human_winner(data: Path, order: list[str]) -> str:
    """By hand: the best human test accuracy, ties to the model listed first."""
    acc = _sql(data, "SELECT model, human_test_accuracy FROM generator_probes")
    acc = acc.set_index("model")["human_test_accuracy"].reindex(order)
    return next(m for m in order if acc[m] >= acc.max() - 1e-12)


def invoke(args: list[str], env: dict[str, str]):
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


def _one_error_line(res, command: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    assert res.stdout == "" and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"recovery {command}: error: "), res.stderr
    return lines[0]


# ----------------------------------------------------------------------------- identifiability
def test_identifiability_table_is_the_core_function_of_the_stored_confusion(tiny_run, study):
    order = study.model_names
    confusion = _sql(tiny_run.data, "SELECT * FROM recovery_confusion")
    stored = _sql(tiny_run.data, "SELECT * FROM identifiability")
    assert_same_rows("identifiability", stored, identifiability_table(confusion, order))
    assert set(stored["n_train"]) == set(study.sizes)
    assert set(stored["criterion"]) == {"accuracy", "nll"}
    sums = stored.groupby(["n_train", "criterion", "winner"])["posterior"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, rtol=0, atol=1e-12)
    assert (
        (stored["ci_low"] <= stored["posterior"]) & (stored["posterior"] <= stored["ci_high"])
    ).all()
    # every winner has all generators' rows, and n_wins is its column total of the matrix
    assert (stored.groupby(["n_train", "criterion", "winner"]).size() == len(order)).all()
    wins = confusion.groupby(["n_train", "criterion", "winner"])["count"].sum()
    for (n, crit, winner), got in stored.groupby(["n_train", "criterion", "winner"])["n_wins"]:
        assert (got == wins[(n, crit, winner)]).all() and wins[(n, crit, winner)] > 0


def test_never_won_winners_are_listed_not_zero_filled(tiny_run, study):
    order = study.model_names
    confusion = _sql(tiny_run.data, "SELECT * FROM recovery_confusion")
    never = _sql(tiny_run.data, "SELECT * FROM never_won")
    assert list(never.columns) == ["n_train", "criterion", "winner"]
    assert_same_rows("never_won", never, never_won_table(confusion, order))
    posterior = _sql(
        tiny_run.data, "SELECT DISTINCT n_train, criterion, winner FROM identifiability"
    )
    # each (N, criterion, model) is either a winner with a posterior or listed as never won
    have = {tuple(r) for r in posterior.itertuples(index=False)}
    missing = {tuple(r) for r in never.itertuples(index=False)}
    assert not have & missing
    expected = {(n, c, m) for n in study.sizes for c in ("accuracy", "nll") for m in order}
    assert have | missing == expected
    stated = _metadata(tiny_run, "identifiability")["never_won"]  # "N/criterion" -> models
    listed = set()
    if stated != "none":
        listed = {
            (int(k.split("/")[0]), k.split("/")[1], m) for k, ms in stated.items() for m in ms
        }
    assert listed == missing


def test_the_human_winners_posterior(tiny_run, study):
    order = study.model_names
    winner = _human_winner(tiny_run.data, order)
    table = _sql(tiny_run.data, "SELECT * FROM identifiability")
    human = _sql(tiny_run.data, "SELECT * FROM human_winner_posterior")
    want = table[(table["winner"] == winner) & (table["criterion"] == "accuracy")]
    assert_same_rows("human_winner_posterior", human.drop(columns="human_test_accuracy"), want)
    acc = _sql(
        tiny_run.data, f"SELECT human_test_accuracy FROM generator_probes WHERE model = '{winner}'"
    )
    assert (human["human_test_accuracy"] == acc.iloc[0, 0]).all()
    meta = _metadata(tiny_run, "identifiability")
    assert meta["human_winner"] == winner and meta["largest_n"] == study.largest_size
    assert meta["human_winner_test_accuracy"] == acc.iloc[0, 0]
    true = want[(want["generator"] == winner) & (want["n_train"] == study.largest_size)]
    if true.empty:
        assert (
            meta["p_true_given_human_win"] is None
            and study.largest_size in meta["human_winner_never_won_at"]
        )
    else:
        assert meta["p_true_given_human_win"] == true["posterior"].item()
        assert meta["ci_95"] == [true["ci_low"].item(), true["ci_high"].item()]
    won_at = set(want["n_train"])
    assert set(meta["human_winner_never_won_at"]) == set(study.sizes) - won_at
    assert "data:image/png;base64," in meta["heatmap"]
    assert (tiny_run.data / "plots" / "identifiability.png").read_bytes()[:8] == PNG
    rows = int(_sql(tiny_run.data, "SELECT count(*) AS n FROM identifiability")["n"][0])
    assert meta["dagster/row_count"] == rows


# ----------------------------------------------------------------------------- open-set recovery
def test_open_set_winners_are_the_core_function_and_never_the_generator(tiny_run, study):
    order = study.model_names
    selection = _sql(tiny_run.data, "SELECT * FROM candidate_selection")
    stored = _sql(tiny_run.data, "SELECT * FROM open_set_recovery")
    assert_same_rows("open_set_recovery", stored, open_set_winners(selection, order))
    assert len(stored) == len(study.sizes) * 2 * len(order) * study.simulations
    assert (stored["open_winner"] != stored["generator"]).all()
    assert (stored["n_open_candidates"] == len(order) - 1).all()
    # the closed-set winner is the stored selection's winner of the job
    won = selection[selection["is_winner"]].rename(columns={"candidate": "winner"})
    keys = ["n_train", "criterion", "simulation", "generator"]
    both = stored.merge(won[[*keys, "winner"]], on=keys, validate="one_to_one")
    assert len(both) == len(stored) and (both["closed_winner"] == both["winner"]).all()
    # the open-set winner has the best score among the other candidates
    others = selection[selection["candidate"] != selection["generator"]]
    best = others.groupby(keys)["score"].agg(["max", "min"]).reset_index().merge(stored, on=keys)
    want = np.where(best["criterion"] == "accuracy", best["max"], best["min"])
    np.testing.assert_allclose(best["open_score"], want, rtol=0, atol=1e-12)


def test_rsa_of_the_human_fitted_representations_and_the_summary(tiny_run, study):
    """The similarities are those of Z = X W^T (features and generator probe read back from the
    store; the tiny study's probes are `full`, which act on X itself)."""
    order = study.model_names
    store = Store(tiny_run.data)
    reps = {}
    for m in order:
        W, _ = pipeline.load_generator(store, m)
        reps[m] = pipeline.load_features(store, m).astype(np.float64) @ W.astype(np.float64).T
    sim = rsa_matrix(reps, order)
    stored = _sql(tiny_run.data, "SELECT * FROM rsa_similarity")
    assert len(stored) == len(order) ** 2
    got = stored.pivot(index="model", columns="other", values="similarity").loc[order, order]
    np.testing.assert_allclose(got.to_numpy(), sim.to_numpy(), rtol=1e-9, atol=1e-12)
    nearest = nearest_neighbours(sim, order)
    summary = _sql(tiny_run.data, "SELECT * FROM open_set_summary")
    winners = _sql(tiny_run.data, "SELECT * FROM open_set_recovery")
    assert_same_rows("open_set_summary", summary, open_set_summary(winners, nearest))
    assert (summary["n_jobs"] == study.simulations).all()
    meta = _metadata(tiny_run, "open_set_recovery")
    at = summary[(summary["n_train"] == study.largest_size) & (summary["criterion"] == "accuracy")]
    frac = at["n_to_nearest"].sum() / at["n_jobs"].sum()
    assert meta["frac_to_nearest_at_largest_n"] == pytest.approx(frac, abs=1e-15)
    assert meta["dagster/row_count"] == len(winners)
    assert "data:image/png;base64," in meta["heatmap"]
    assert (tiny_run.data / "plots" / "open_set.png").read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------- SQL recipes
@pytest.mark.parametrize(
    "recipe, table, first",
    [
        ("identifiability", "identifiability", "n_train"),
        ("open_set", "open_set_summary", "n_train"),
    ],
)
def test_sql_recipes_return_rows(tiny_run, recipe, table, first):
    env = tiny_run.env()
    res = invoke(["sql", recipe, "--study", str(tiny_run.study_path)], env)
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    n = _sql(tiny_run.data, f"SELECT count(*) AS n FROM {table} WHERE criterion = 'accuracy'")
    assert lines[0].split()[0] == first and len(lines) == 1 + int(n["n"][0]) > 1


# ----------------------------------------------------------------------------- recovery advise
def test_advise_on_the_tiny_study_says_it_needs_three_sizes(tiny_run):
    res = invoke(["advise", "--study", str(tiny_run.study_path), "--target", "0.6"], tiny_run.env())
    line = _one_error_line(res, "advise")
    assert "at 2 size(s) [50, 100]" in line and "needs at least 3 sizes" in line


def test_advise_without_results_is_one_line(tiny_run, tmp_path):
    env = tiny_run.env(parent=tmp_path / "empty")
    res = invoke(["advise", "--study", str(tiny_run.study_path), "--target", "0.6"], env)
    line = _one_error_line(res, "advise")
    assert "no results yet" in line and str(tmp_path / "empty" / "tiny" / "recovery.duckdb") in line
    # a database without the recovery matrices' table
    store = Store(tmp_path / "early" / "tiny")
    store.write_table("stimuli", pd.DataFrame({"concept": [0, 1, 2]}))
    store.rebuild_views()
    env = tiny_run.env(parent=tmp_path / "early")
    res = invoke(["advise", "--study", str(tiny_run.study_path), "--target", "0.6", "--json"], env)
    assert "has no recovery_summary table" in _one_error_line(res, "advise")


# the worked example of docs/analyses.md §3: six models, 600 jobs per size
EXAMPLE_N = [100, 400, 1600, 6400, 25600]
EXAMPLE_K = [180, 290, 390, 440, 452]


@pytest.fixture(scope="module")
def example_study(tmp_path_factory) -> tuple[Path, Path]:
    """A six-model study whose DuckDB holds the recovery summary of the worked example, written
    through the store as `recovery_matrix` writes it (one partition per size)."""
    base = tmp_path_factory.mktemp("advise")
    text = (ROOT / "studies" / "demo.yaml").read_text()
    assert text.count("name: demo\n") == 1 and text.count("sizes: [50, 200, 800, 3200]") == 1
    text = text.replace("name: demo\n", "name: advise_example\n")
    path = base / "advise_example.yaml"
    path.write_text(text.replace("sizes: [50, 200, 800, 3200]", f"sizes: {EXAMPLE_N}"))
    store = Store(base / "data" / "advise_example")
    for n, k in zip(EXAMPLE_N, EXAMPLE_K, strict=True):
        rows = [
            dict(n_train=n, criterion=c, accuracy=k / 600, n_correct=k, n_total=600, chance=1 / 6)
            for c in ("accuracy", "nll")
        ]
        store.write_table("recovery_summary", pd.DataFrame(rows), {"n_train": n})
    store.rebuild_views()
    return path, base / "data"


def test_advise_answers_from_the_summary_table(example_study):
    path, data = example_study
    env = {DATA_ENV: str(data)}
    res = invoke(["advise", "--study", str(path), "--target", "0.7", "--json"], env)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    keys = {"target", "n_needed", "reachable", "plateau", "plateau_ci_low", "plateau_ci_high"}
    assert keys | {"a", "b", "c", "chance", "n_mid", "message", "study", "criterion"} <= set(out)
    assert out["study"] == "advise_example" and out["criterion"] == "accuracy"
    assert (out["n_min"], out["n_max_studied"]) == (min(EXAMPLE_N), max(EXAMPLE_N))
    assert out["chance"] == pytest.approx(1 / 6, abs=1e-12)
    assert out["reachable"] is True and out["n_needed"] == 5093  # docs/analyses.md §3
    assert out["plateau_ci_low"] < out["plateau"] < out["plateau_ci_high"]
    assert out["target"] == 0.7 and "N = 5,093 training triplets" in out["message"]
    # out of reach: no N, the plateau's interval below the target; the text form says so
    res = invoke(["advise", "--study", str(path), "--target", "0.85"], env)
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("study advise_example, selected by accuracy, N = 100, 400")
    assert "plateau 0.764" in lines[1] and "out of reach" in lines[2]
    # a target at or below chance is refused by the core: one line
    res = invoke(["advise", "--study", str(path), "--target", "0.1"], env)
    assert "target must be in (chance, 1)" in _one_error_line(res, "advise")


def test_advise_refuses_bad_options(example_study):
    path, data = example_study
    for args, problem in (
        (["--target", "1.5"], "Invalid value for '--target'"),
        (["--target", "nan"], "Invalid value for '--target'"),
        (["--target", "0.7", "--criterion", "rank"], "Invalid value for '--criterion'"),
        ([], "Missing option '--target'"),
    ):
        res = invoke(["advise", "--study", str(path), *args], {DATA_ENV: str(data)})
        assert res.exit_code == 2 and problem in res.stderr, (args, res.stderr)


# ----------------------------------------------------------------------------- recovery compare
def _twin(tiny_run, tmp_path: Path) -> Path:
    """The tiny study under another name, reading the tiny run's data folder."""
    text = tiny_run.study_path.read_text()
    assert text.count("name: tiny\n") == 1
    twin = tmp_path / "tiny_twin.yaml"
    twin.write_text(text.replace("name: tiny\n", f"name: tiny_twin\ndata_dir: {tiny_run.data}\n"))
    return twin


def test_compare_reads_each_studys_database(tiny_run, study, tmp_path):
    twin = _twin(tiny_run, tmp_path)
    out = tmp_path / "plots" / "tradeoff.png"
    args = ["compare", "--study", str(tiny_run.study_path), "--study", str(twin)]
    res = invoke([*args, "--out", str(out), "--json"], tiny_run.env())
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["plot"] == str(out) and out.read_bytes()[:8] == PNG
    assert [p["study"] for p in got["studies"]] == ["tiny", "tiny_twin"]
    winner = _human_winner(tiny_run.data, study.model_names)
    gen = _sql(tiny_run.data, "SELECT max(human_test_accuracy) AS a FROM generator_probes")
    curve = _sql(
        tiny_run.data,
        "SELECT * FROM recovery_summary WHERE criterion = 'accuracy' "
        f"AND n_train = {study.largest_size}",
    )
    for point in got["studies"]:
        assert (point["family"], point["penalty"]) == ("full", "shrinkage")
        assert point["human_winner"] == winner and point["n_train"] == study.largest_size
        assert point["human_test_accuracy"] == gen["a"][0]
        for key in ("ci_low", "ci_high", "chance"):
            assert point[key] == curve[key][0], key
        assert point["recovery_accuracy"] == curve["accuracy"][0]
    res = invoke(args, tiny_run.env())  # the text form: a header and one row per study
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["study", "family", "penalty", "human_winner"]
    assert [line.split()[0] for line in lines[1:]] == ["tiny", "tiny_twin"]


def test_compare_without_results_or_twice_is_one_line(tiny_run, tmp_path):
    env = tiny_run.env(parent=tmp_path / "empty")
    res = invoke(["compare", "--study", str(tiny_run.study_path)], env)
    line = _one_error_line(res, "compare")
    assert line.startswith("recovery compare: error: study tiny: no results yet")
    study = str(tiny_run.study_path)
    res = invoke(["compare", "--study", study, "--study", study], tiny_run.env())
    assert "study tiny is given twice" in _one_error_line(res, "compare")
    out = tmp_path / "plot.pdf"
    res = invoke(["compare", "--study", study, "--out", str(out)], tiny_run.env())
    assert res.exit_code == 2 and "Invalid value for '--out'" in res.stderr
    assert not out.exists()
