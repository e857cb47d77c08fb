"""The whole study graph on the tiny study: materialization, checks, tables, reproducibility,
re-materialization and concurrent runs (each test asserts something that can fail)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from conftest import query
from scipy.optimize import brentq
from scipy.stats import beta, rankdata

from recovery_assets import pipeline
from recovery_assets.defs import build_definitions
from recovery_assets.defs.partitions import job_key
from recovery_assets.defs.resources import StorageResource
from recovery_assets.storage import Store

ROOT = Path(__file__).resolve().parent.parent
ASSETS = [
    "stimuli",
    "embeddings",
    "human_judgements",
    "generator_probes",
    "synthetic_datasets",
    "candidate_scores",
    "recovery_matrix",
    "model_properties",
    "recovery_curve",
    "misidentification_regression",
]
CHECKS = {
    "human_judgements": ["convention_unambiguous"],
    "generator_probes": ["calibrated_to_noise_ceiling"],
    "synthetic_datasets": ["self_agreement_in_99_interval"],
    "recovery_matrix": ["rows_sum_to_simulations"],
}


def _sql(data: Path, sql: str) -> pd.DataFrame:
    return query(data / "recovery.duckdb", sql)


def test_every_asset_and_partition_materialized(tiny_run, study):
    expected = {
        "embeddings": set(study.model_names),
        "generator_probes": set(study.model_names),
        "recovery_matrix": {str(n) for n in study.sizes},
        "synthetic_datasets": {str(job_key(m, n)) for m in study.model_names for n in study.sizes},
    }
    expected["candidate_scores"] = expected["synthetic_datasets"]
    with dg.DagsterInstance.from_config(str(tiny_run.home)) as instance:
        for key in ASSETS:
            assert (
                instance.get_latest_materialization_event(dg.AssetKey(["tiny", key])) is not None
            ), key
            if key in expected:
                got = instance.get_materialized_partitions(dg.AssetKey(["tiny", key]))
                assert got == expected[key], key


def test_every_check_ran_and_passed(tiny_run):
    with dg.DagsterInstance.from_config(str(tiny_run.home)) as instance:
        records = instance.get_event_records(
            dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
        )
        seen: dict[tuple[str, str], list[bool]] = {}
        for rec in records:
            ev = rec.event_log_entry.dagster_event.event_specific_data
            seen.setdefault((ev.asset_key.path[-1], ev.check_name), []).append(bool(ev.passed))
    for asset, names in CHECKS.items():
        for name in names:
            assert (asset, name) in seen, (asset, name)
            assert all(seen[(asset, name)]), (asset, name, seen[(asset, name)])


def test_duckdb_tables_have_the_expected_rows(tiny_run, study):
    M, S, L = len(study.models), len(study.sizes), len(study.candidate_lambdas)
    sims = study.simulations
    counts = {
        "stimuli": 36,
        "embeddings": M,
        "generator_probes": M,
        "synthetic_datasets": M * S * sims * 3 * 3,
        "candidate_fits": M * S * sims * M * L * 3,
        "candidate_selection": M * S * sims * M * 2,
        "recovery_summary": S * 2,
        "recovery_confusion": S * 2 * M * M,
        "model_properties": M,
    }
    for table, n in counts.items():
        got = int(_sql(tiny_run.data, f"SELECT count(*) AS n FROM {table}")["n"][0])
        assert got == n, (table, got, n)


def test_table_values_are_in_range(tiny_run, study):
    """Beyond the row counts: every accuracy is a count over its split, every NLL positive, every
    self-agreement in [0, 1], every probability-like value where it belongs."""
    fits = _sql(tiny_run.data, "SELECT * FROM candidate_fits")
    n_eval = fits["n_train"].map(lambda n: round(n / 8))
    for col in ("val_acc", "test_acc"):
        assert fits[col].between(0, 1).all(), col
        assert np.allclose(fits[col] * n_eval, np.round(fits[col] * n_eval), atol=1e-9), col
    assert (np.isfinite(fits[["val_nll", "test_nll", "objective"]]).all().all()) and (
        fits[["val_nll", "test_nll"]] > 0
    ).all().all()
    assert set(fits["lam"]) == set(study.candidate_lambdas)
    assert set(fits["fold"]) == {0, 1, 2}
    synth = _sql(tiny_run.data, "SELECT * FROM synthetic_datasets")
    want = np.where(
        synth["split"] == "train", synth["n_train"], synth["n_train"].map(lambda n: round(n / 8))
    )
    assert (synth["n_triplets"] == want).all()
    agree = synth["self_agreement"] * synth["n_triplets"]
    assert (
        np.allclose(agree, np.round(agree), atol=1e-9)
        and synth["self_agreement"].between(0, 1).all()
    )
    assert synth["expected_agreement"].between(1 / 3, 1).all()
    gen = _sql(tiny_run.data, "SELECT * FROM generator_probes")
    assert (gen["temperature"] > 0).all() and gen["human_test_accuracy"].between(0, 1).all()
    assert gen["human_val_accuracy"].between(0, 1).all()


def _selection_by_hand(fits: pd.DataFrame, order: list[str], criterion: str) -> pd.DataFrame:
    """docs/method.md §7 by hand: lambda* = best fold-mean validation metric (ties: smallest
    lambda), score = fold-mean test metric at lambda*, average ranks, winner = best score (ties:
    first in the study's order); within 1e-12 counts as tied."""
    val, test, sign = (
        ("val_acc", "test_acc", 1) if criterion == "accuracy" else ("val_nll", "test_nll", -1)
    )
    means = fits.groupby(["n_train", "simulation", "generator", "candidate", "lam"])[
        [val, test]
    ].mean()
    out = []
    for (n, s, g), job in means.groupby(level=[0, 1, 2]):
        cands = []
        for m in order:
            per_lam = job.xs(m, level="candidate")[[val, test]].reset_index()
            good = sign * per_lam[val]
            lam = per_lam.loc[good >= good.max() - 1e-12, "lam"].min()
            score = per_lam.loc[per_lam["lam"] == lam, test].item()
            cands.append(
                dict(n_train=n, simulation=s, generator=g, candidate=m, lam_star=lam, score=score)
            )
        job_df = pd.DataFrame(cands)
        goodness = np.round(sign * job_df["score"].to_numpy(), 10)
        job_df["rank"] = rankdata(-goodness, method="average")
        best = np.flatnonzero(goodness == goodness.max())[0]  # candidates are in study order
        job_df["is_winner"] = np.arange(len(job_df)) == best
        out.append(job_df)
    return pd.concat(out, ignore_index=True)


def test_selection_confusion_and_summary_recomputed_from_the_fits(tiny_run, study):
    """The candidate selection, recovery matrix and summary of docs/method.md §7, recomputed by
    hand from the candidate_fits table (lambda*, scores, ranks, winners, counts, accuracy, the
    exact Clopper-Pearson interval from the beta quantiles, mean rank and MRR)."""
    order = study.model_names
    fits = _sql(tiny_run.data, "SELECT * FROM candidate_fits")
    sel = _sql(tiny_run.data, "SELECT * FROM candidate_selection")
    conf = _sql(tiny_run.data, "SELECT * FROM recovery_confusion")
    summary = _sql(tiny_run.data, "SELECT * FROM recovery_summary").set_index(
        ["n_train", "criterion"]
    )
    key = ["n_train", "simulation", "generator", "candidate"]
    M, S = len(order), study.simulations
    for crit in ("accuracy", "nll"):
        mine = _selection_by_hand(fits, order, crit).set_index(key).sort_index()
        got = sel[sel["criterion"] == crit].set_index(key).sort_index()
        assert got.index.equals(mine.index), crit
        assert np.array_equal(got["lam_star"], mine["lam_star"]), crit
        np.testing.assert_allclose(got["score"], mine["score"], rtol=0, atol=1e-12)
        assert np.array_equal(got["rank"], mine["rank"]), crit
        assert np.array_equal(got["is_winner"].astype(bool), mine["is_winner"]), crit
        mine = mine.reset_index()
        winners = mine[mine["is_winner"]].set_index(["n_train", "simulation", "generator"])
        true = mine[mine["candidate"] == mine["generator"]].set_index(winners.index.names)
        for n in study.sizes:
            w = winners.loc[n]
            counts = Counter(
                zip(w.index.get_level_values("generator"), w["candidate"], strict=True)
            )
            c = conf[(conf["n_train"] == n) & (conf["criterion"] == crit)]
            assert len(c) == M * M
            for g, m, count in zip(c["generator"], c["winner"], c["count"], strict=True):
                assert count == counts.get((g, m), 0), (crit, n, g, m)
            k = sum(counts.get((g, g), 0) for g in order)
            total = M * S
            row = summary.loc[(n, crit)]
            assert (row["n_correct"], row["n_total"]) == (k, total)
            assert row["accuracy"] == pytest.approx(k / total)
            assert row["chance"] == pytest.approx(1 / M)
            low = beta.ppf(0.025, k, total - k + 1) if k > 0 else 0.0
            high = beta.ppf(0.975, k + 1, total - k) if k < total else 1.0
            assert row["ci_low"] == pytest.approx(low, abs=1e-9)
            assert row["ci_high"] == pytest.approx(high, abs=1e-9)
            ranks = true.loc[n, "rank"].to_numpy()
            assert row["mean_true_rank"] == pytest.approx(ranks.mean())
            assert row["mrr"] == pytest.approx((1 / ranks).mean())


def test_confusion_rows_sum_to_simulations(tiny_run, study):
    df = _sql(
        tiny_run.data,
        "SELECT n_train, criterion, generator, sum(count) AS n FROM recovery_confusion "
        "GROUP BY ALL",
    )
    assert len(df) == len(study.sizes) * 2 * len(study.models)
    assert (df["n"] == study.simulations).all()


def _noise_ceiling_by_hand(rows: np.ndarray) -> float:
    """docs/method.md §2: per unique triplet answered T >= 2 times, sum_i (c_i / T) [answer i
    agrees with the majority of the other T - 1 answers] (a k-way tie counts 1/k); the mean over
    those triplets. Rows are [pair, pair, odd]: the answer is the odd concept."""
    counts: dict[tuple, Counter] = {}
    for a, b, odd in rows.tolist():
        counts.setdefault(tuple(sorted((a, b, odd))), Counter())[odd] += 1
    values = []
    for options, c in counts.items():
        total = sum(c.values())
        if total < 2:
            continue
        agree = 0.0
        for o in options:
            others = {x: c[x] - (x == o) for x in options}
            tied = [x for x in options if others[x] == max(others.values())]
            agree += c[o] / total * (1 / len(tied) if o in tied else 0.0)
        values.append(agree)
    return float(np.mean(values))


def _plain_logits(Z: np.ndarray, trip: np.ndarray) -> np.ndarray:
    i, j, k = trip.T
    return np.stack([(Z[j] * Z[k]).sum(1), (Z[i] * Z[k]).sum(1), (Z[i] * Z[j]).sum(1)], 1)


def _softmax(L: np.ndarray, T: float) -> np.ndarray:
    z = L / T
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_generators_are_calibrated_and_human_data_detected(tiny_run, study):
    """The calibration of docs/method.md §5 checked by hand: the noise ceiling of test set 2
    recomputed from its rows, each stored generator's mean max-probability on test set 2
    recomputed with numpy from its W and T, T solved again with brentq on the plain formula, and
    the reported human accuracy and NLL recomputed at that T."""
    gen = _sql(tiny_run.data, "SELECT * FROM generator_probes").set_index("model")
    assert sorted(gen.index) == sorted(study.model_names)
    store = Store(tiny_run.data)
    rows, _ = pipeline.load_human(store)
    test2 = rows["testset2"]
    ceiling = _noise_ceiling_by_hand(test2)
    assert 1 / 3 < ceiling < 1
    assert study.calibration_target == "noise_ceiling" and study.spec.family == "full"
    for model in study.model_names:
        arrays, _ = store.load_arrays(store.generator_path(model), model)
        W, T = arrays["W"].astype(np.float64), float(arrays["temperature"])
        X = pipeline.load_features(store, model).astype(np.float64)
        L = _plain_logits(X @ W.T, test2)
        row = gen.loc[model]
        assert row["target"] == pytest.approx(ceiling, abs=1e-12), model
        assert row["temperature"] == T
        assert _softmax(L, T).max(1).mean() == pytest.approx(ceiling, abs=1e-6), model
        u = brentq(
            lambda u, L=L: _softmax(L, np.exp(u)).max(1).mean() - ceiling, -40, 40, xtol=1e-13
        )
        assert T == pytest.approx(np.exp(u), rel=1e-5), model
        # the human metrics on test set 2 (its rows are [pair, pair, odd]: the answer is 2)
        assert row["human_test_accuracy"] == pytest.approx((L.argmax(1) == 2).mean(), abs=1e-12)
        nll = -np.log(_softmax(L, T)[:, 2]).mean()
        assert row["human_test_nll"] == pytest.approx(nll, rel=1e-6), model
        assert row["n_human_train"] == len(rows["trainset"]) + len(rows["validationset"])
        assert row["lam"] in study.generator_lambdas
    human = _sql(tiny_run.data, "SELECT * FROM human_judgements")
    assert set(human["file"]) == {"trainset", "validationset", "testset1", "testset2", "testset3"}
    assert (human["convention"] == "pair_pair_odd").all()
    assert human.loc[human["file"] == "trainset", "detected"].item() == "pair_pair_odd"


def test_sql_recipes_run(tiny_run):
    for sql in sorted((ROOT / "sql").glob("*.sql")):
        df = _sql(tiny_run.data, sql.read_text())
        assert len(df.columns) > 0, sql.name
    curve = _sql(tiny_run.data, (ROOT / "sql" / "recovery_curve.sql").read_text())
    assert curve["n_train"].tolist() == [50, 100]
    assert ((curve["ci_low"] <= curve["accuracy"]) & (curve["accuracy"] <= curve["ci_high"])).all()


def test_plots_written(tiny_run, study):
    plots = tiny_run.data / "plots"
    names = {p.name for p in plots.glob("*.png")}
    want = {"recovery_curve.png", "human_vs_recovery.png"}
    want |= {f"confusion_n{n}.png" for n in study.sizes}
    assert want <= names
    for name in want:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rematerialize(study, data: Path, selection: list[str], partition: str) -> None:
    defs = build_definitions(study)
    resources = {**defs.resources, "storage": StorageResource(root=str(data.parent))}
    with dg.instance_for_test() as instance:
        dg.materialize(
            list(defs.assets),
            selection=[dg.AssetKey([study.name, s]) for s in selection],
            partition_key=partition,
            instance=instance,
            resources=resources,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )


def test_rematerializing_reproduces_and_replaces(tiny_run, study):
    store = Store(tiny_run.data)
    m, n = study.model_names[1], study.sizes[0]
    before_arrays, _ = store.load_arrays(store.synthetic_path(m, n), "synthetic")
    part = {"model": m, "n_train": n}
    before_fits = store.read_table("candidate_fits", part)
    before_conf = store.read_table("recovery_confusion", {"n_train": n})
    total = int(_sql(tiny_run.data, "SELECT count(*) AS n FROM candidate_fits")["n"][0])

    _rematerialize(
        study, tiny_run.data, ["synthetic_datasets", "candidate_scores"], str(job_key(m, n))
    )
    _rematerialize(study, tiny_run.data, ["recovery_matrix"], str(n))

    after_arrays, _ = store.load_arrays(store.synthetic_path(m, n), "synthetic")
    assert before_arrays.keys() == after_arrays.keys()
    for k in before_arrays:
        assert np.array_equal(before_arrays[k], after_arrays[k]), k
    pd.testing.assert_frame_equal(before_fits, store.read_table("candidate_fits", part))
    pd.testing.assert_frame_equal(
        before_conf, store.read_table("recovery_confusion", {"n_train": n})
    )
    # the partition's rows were replaced, not appended
    assert int(_sql(tiny_run.data, "SELECT count(*) AS n FROM candidate_fits")["n"][0]) == total


def test_two_concurrent_partition_runs_both_land(tiny_run, study):
    """Two `dagster asset materialize` processes on different partitions at the same time."""
    keys = [
        str(job_key(study.model_names[0], study.sizes[1])),
        str(job_key(study.model_names[2], study.sizes[1])),
    ]
    env = tiny_run.env()
    total = int(_sql(tiny_run.data, "SELECT count(*) AS n FROM candidate_fits")["n"][0])
    dagster = Path(sys.executable).parent / "dagster"
    procs = [
        subprocess.Popen(
            [
                str(dagster),
                "asset",
                "materialize",
                "-m",
                "recovery_assets.definitions",
                "--select",
                "tiny/synthetic_datasets,tiny/candidate_scores",
                "--partition",
                key,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for key in keys
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    df = _sql(
        tiny_run.data,
        "SELECT generator, n_train, count(*) AS n FROM candidate_fits GROUP BY ALL",
    )
    per = len(study.models) * len(study.candidate_lambdas) * 3 * study.simulations
    assert (df["n"] == per).all()
    assert len(df) == len(study.models) * len(study.sizes)
    assert int(df["n"].sum()) == total
