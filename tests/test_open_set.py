"""Tests of recovery_assets.core.open_set (docs/analyses.md §2): open-set recovery."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recovery_assets.core.geometry import compare_rdms, euclidean_rdm
from recovery_assets.core.open_set import (
    nearest_neighbours,
    open_set_summary,
    open_set_winners,
    rsa_matrix,
)
from recovery_assets.core.recovery import select_and_score

MODELS = ["A", "B", "C", "D"]


def _scores() -> pd.DataFrame:
    """Candidate scores of 4 jobs (simulation 0), test accuracy, higher is better.

    job A: A .9, B .7, C .8, D .1 -> closed A; open (A removed): C
    job B: A .6, B .9, C .6, D .6 -> closed B; open: A/C/D tie at .6 -> A (first listed)
    job C: A .5, B .7, C .6, D .7 -> closed B/D tie -> B; open: B/D tie -> B
    job D: A .2, B .3, C .4, D .5 -> closed D; open: C
    """
    table = {
        "A": [0.9, 0.7, 0.8, 0.1],
        "B": [0.6, 0.9, 0.6, 0.6],
        "C": [0.5, 0.7, 0.6, 0.7],
        "D": [0.2, 0.3, 0.4, 0.5],
    }
    rows = [
        dict(simulation=0, generator=g, candidate=c, score=s)
        for g, values in table.items()
        for c, s in zip(MODELS, values, strict=True)
    ]
    return pd.DataFrame(rows)


def test_open_set_winners_hand_made():
    res = open_set_winners(_scores().sample(frac=1.0, random_state=0), MODELS)
    assert list(res.columns) == [
        "simulation",
        "generator",
        "open_winner",
        "open_score",
        "closed_winner",
        "n_open_candidates",
    ]
    assert list(res["generator"]) == MODELS
    assert list(res["open_winner"]) == ["C", "A", "B", "C"]
    assert list(res["closed_winner"]) == ["A", "B", "B", "D"]
    assert list(res["open_score"]) == [0.8, 0.6, 0.7, 0.4]
    assert (res["n_open_candidates"] == 3).all()


def test_tie_rule_follows_model_order_and_tolerance():
    # job B's three-way tie goes to whoever is listed first
    res = open_set_winners(_scores(), ["D", "C", "B", "A"])
    assert res.set_index("generator").loc["B", "open_winner"] == "D"
    # differences below DEFAULT_TOL (1e-12) are ties, larger ones are not
    scores = _scores()
    scores.loc[(scores.generator == "B") & (scores.candidate == "C"), "score"] += 1e-14
    assert open_set_winners(scores, MODELS).set_index("generator").loc["B", "open_winner"] == "A"
    scores.loc[(scores.generator == "B") & (scores.candidate == "C"), "score"] += 1e-9
    assert open_set_winners(scores, MODELS).set_index("generator").loc["B", "open_winner"] == "C"


def test_nll_criterion_lower_is_better_and_groups():
    acc = _scores().assign(criterion="accuracy", n_train=100)
    nll = _scores().assign(criterion="nll", n_train=100)
    nll["score"] = 1.0 - nll["score"]  # same order of merit, lower is better
    both = pd.concat([nll, acc, acc.assign(n_train=10)], ignore_index=True)
    res = open_set_winners(both, MODELS)
    assert list(res.columns[:2]) == ["n_train", "criterion"]
    assert list(res["n_train"]) == [10] * 4 + [100] * 8
    assert list(res["criterion"]) == ["accuracy"] * 8 + ["nll"] * 4
    for _, part in res.groupby(["n_train", "criterion"]):
        assert list(part["open_winner"]) == ["C", "A", "B", "C"]
    only = open_set_winners(both, MODELS, criterion="nll")
    assert list(only["criterion"].unique()) == ["nll"]
    # without a criterion column the argument gives the direction
    flipped = open_set_winners(nll.drop(columns="criterion"), MODELS, criterion="nll")
    assert list(flipped["open_winner"]) == ["C", "A", "B", "C"]


def test_closed_winner_matches_select_and_score():
    rng = np.random.default_rng(0)
    rows = []
    for sim in range(3):
        for gen in "ABC":
            for cand in "ABC":
                accs = np.round(rng.uniform(0.4, 0.9, size=2), 1)  # rounding makes ties
                for lam, acc in zip((0.1, 1.0), accs, strict=True):
                    for fold in range(3):
                        rows.append(
                            dict(
                                simulation=sim,
                                generator=gen,
                                candidate=cand,
                                lam=lam,
                                fold=fold,
                                val_acc=acc,
                                test_acc=acc,
                                val_nll=1 - acc,
                                test_nll=1 - acc,
                            )
                        )
    fits = pd.DataFrame(rows)
    for crit in ("accuracy", "nll"):
        cands, winners = select_and_score(fits, list("ABC"), criterion=crit)
        res = open_set_winners(cands.assign(criterion=crit), list("ABC"))
        merged = res.merge(winners, on=["simulation", "generator"])
        assert (merged["closed_winner"] == merged["winner"]).all()
        assert (res["open_winner"] != res["generator"]).all()
        # open winner = best of the others
        for r in res.itertuples():
            job = cands[(cands.simulation == r.simulation) & (cands.generator == r.generator)]
            others = job[job.candidate != r.generator]
            best = others["score"].max() if crit == "accuracy" else others["score"].min()
            assert r.open_score == pytest.approx(best)


def _universe(seed: int = 0) -> dict[str, np.ndarray]:
    """B = A + small noise; C independent of both."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((40, 10))
    return {
        "A": a,
        "B": a + 0.05 * rng.standard_normal((40, 10)),
        "C": rng.standard_normal((40, 12)),
    }


def test_rsa_matrix_and_nearest_by_construction():
    reps = _universe()
    sim = rsa_matrix(reps)
    assert list(sim.index) == ["A", "B", "C"] and list(sim.columns) == ["A", "B", "C"]
    np.testing.assert_allclose(np.diag(sim.to_numpy()), 1.0)
    np.testing.assert_allclose(sim.to_numpy(), sim.to_numpy().T)
    assert sim.loc["A", "B"] == pytest.approx(
        compare_rdms(euclidean_rdm(reps["A"]), euclidean_rdm(reps["B"]))
    )
    assert sim.loc["A", "B"] > 0.9 > sim.loc["A", "C"]
    nn = nearest_neighbours(sim, ["A", "B", "C"])
    assert list(nn.columns) == ["model", "nearest", "similarity"]
    assert nn.set_index("model").loc["A", "nearest"] == "B"
    assert nn.set_index("model").loc["B", "nearest"] == "A"
    # order of the output follows `models`
    assert list(rsa_matrix(reps, models=["C", "A", "B"]).index) == ["C", "A", "B"]


def test_nearest_ties_go_to_first_listed():
    sim = np.array(
        [
            [1.0, 0.5, 0.5],
            [0.2, 1.0, 0.3],
            [0.7, 0.7 + 1e-14, 1.0],
        ]
    )
    nn = nearest_neighbours(sim, ["A", "B", "C"])
    assert list(nn["nearest"]) == ["B", "C", "A"]
    frame = pd.DataFrame(sim, index=list("ABC"), columns=list("ABC"))
    nn2 = nearest_neighbours(frame.loc[list("CBA"), list("BAC")], ["C", "B", "A"])
    # A's tie between B and C now goes to C (listed first)
    assert nn2.set_index("model").loc["A", "nearest"] == "C"
    assert nn2.set_index("model").loc["C", "nearest"] == "B"


def test_open_set_summary_by_hand():
    winners = pd.DataFrame(
        {
            "n_train": [10] * 6 + [20] * 3,
            "generator": ["A", "A", "B", "B", "C", "C", "A", "B", "C"],
            "open_winner": ["B", "C", "A", "A", "B", "B", "B", "C", "A"],
        }
    )
    nearest = pd.DataFrame({"model": ["A", "B", "C"], "nearest": ["B", "A", "A"]})
    res = open_set_summary(winners, nearest)
    assert list(res.columns) == [
        "n_train",
        "model",
        "nearest",
        "n_jobs",
        "n_to_nearest",
        "frac_to_nearest",
        "attracts",
        "attracts_generators",
    ]
    at10 = res[res.n_train == 10].set_index("model")
    # A -> B, C (nearest B: 1 of 2); B -> A, A (nearest A: 2 of 2); C -> B, B (nearest A: 0)
    assert list(at10["n_jobs"]) == [2, 2, 2]
    assert list(at10["n_to_nearest"]) == [1, 2, 0]
    assert list(at10["frac_to_nearest"]) == [0.5, 1.0, 0.0]
    # A wins 2 (both B's), B wins 3 (one of A's, both of C's), C wins 1 (one of A's)
    assert list(at10["attracts"]) == [2, 3, 1]
    assert list(at10["attracts_generators"]) == [1, 2, 1]
    at20 = res[res.n_train == 20].set_index("model")
    assert list(at20["n_to_nearest"]) == [1, 0, 1]
    assert list(at20["attracts"]) == [1, 1, 1]
    # no grouping column: one row per model over all jobs
    flat = open_set_summary(winners.drop(columns="n_train"), nearest).set_index("model")
    assert list(flat["n_jobs"]) == [3, 3, 3]
    assert list(flat["attracts"]) == [3, 4, 2]
    assert flat["frac_to_nearest"].tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 3])


def test_summary_of_a_model_without_jobs_is_nan():
    winners = pd.DataFrame({"generator": ["A"], "open_winner": ["B"]})
    nearest = pd.DataFrame({"model": ["A", "B"], "nearest": ["B", "A"]})
    res = open_set_summary(winners, nearest).set_index("model")
    assert res.loc["B", "n_jobs"] == 0 and np.isnan(res.loc["B", "frac_to_nearest"])
    assert res.loc["B", "attracts"] == 1


def test_invalid_inputs():
    with pytest.raises(ValueError, match="missing columns"):
        open_set_winners(_scores().drop(columns="score"), MODELS)
    with pytest.raises(ValueError, match="not in model_order"):
        open_set_winners(_scores(), ["A", "B", "C"])
    with pytest.raises(ValueError, match="duplicated"):
        open_set_winners(pd.concat([_scores(), _scores().iloc[:1]]), MODELS)
    with pytest.raises(ValueError, match="unknown criterion"):
        open_set_winners(_scores(), MODELS, criterion="auc")
    with pytest.raises(ValueError, match="no candidate other than its generator"):
        open_set_winners(_scores()[lambda d: d.candidate == d.generator], MODELS)
    bad = _scores()
    bad.loc[0, "score"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        open_set_winners(bad, MODELS)
    reps = _universe()
    with pytest.raises(ValueError, match="different numbers of concepts"):
        rsa_matrix({**reps, "C": reps["C"][:30]})
    with pytest.raises(ValueError, match="at least two"):
        rsa_matrix({"A": reps["A"]})
    with pytest.raises(ValueError, match="no variance"):
        rsa_matrix({**reps, "C": np.ones((40, 3))})
    with pytest.raises(ValueError, match="3 x 3"):
        nearest_neighbours(np.eye(2), ["A", "B", "C"])
    with pytest.raises(ValueError, match="non-finite"):
        nearest_neighbours([[1, np.nan], [0, 1]], ["A", "B"])
