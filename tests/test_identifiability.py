"""Tests of recovery_assets.core.identifiability (docs/analyses.md §1): P(true model | winner)."""

from __future__ import annotations

from fractions import Fraction as F

import numpy as np
import pandas as pd
import pytest

from recovery_assets.core.identifiability import (
    human_winner_posterior,
    identifiability_table,
    never_won,
    never_won_table,
    posterior_given_winner,
)
from recovery_assets.core.recovery import recovery_metrics, select_and_score


def _post(res: pd.DataFrame) -> dict[tuple[str, str], float]:
    return {(r.winner, r.generator): r.posterior for r in res.itertuples()}


def _bayes(counts, prior) -> dict[tuple[int, int], F]:
    """Exact P(g | m) with fractions: P(m | g) P(g) / sum_g' P(m | g') P(g')."""
    lik = [[F(c, sum(row)) for c in row] for row in counts]
    k = len(counts)
    out = {}
    for m in range(k):
        evidence = sum(lik[g][m] * prior[g] for g in range(k))
        if evidence:
            for g in range(k):
                out[(g, m)] = lik[g][m] * prior[g] / evidence
    return out


def test_two_by_two_by_hand():
    counts = [[8, 2], [3, 7]]
    res = posterior_given_winner(counts, ["A", "B"])
    p = _post(res)
    # P(A won | A generated) = 0.8, P(A won | B generated) = 0.3, uniform prior
    assert p[("A", "A")] == pytest.approx(0.8 / (0.8 + 0.3))
    assert p[("A", "B")] == pytest.approx(0.3 / (0.8 + 0.3))
    assert p[("B", "A")] == pytest.approx(0.2 / (0.2 + 0.7))
    assert p[("B", "B")] == pytest.approx(0.7 / (0.2 + 0.7))
    assert list(res.columns) == ["winner", "generator", "n_wins", "posterior", "ci_low", "ci_high"]
    assert list(res["winner"]) == ["A", "A", "B", "B"]
    assert list(res["n_wins"]) == [11, 11, 9, 9]
    assert res.attrs["never_won"] == []


def test_three_by_three_by_hand_and_dataframe_input():
    counts = [[6, 3, 1], [2, 5, 3], [0, 4, 6]]
    models = ["A", "B", "C"]
    exact = _bayes(counts, [F(1, 3)] * 3)
    # the confusion as RecoveryMetrics gives it, rows and columns shuffled: reordered by name
    frame = pd.DataFrame(counts, index=models, columns=models).loc[["C", "A", "B"], ["B", "C", "A"]]
    for given in (counts, np.array(counts), frame):
        p = _post(posterior_given_winner(given, models))
        for (g, m), value in exact.items():
            assert p[(models[m], models[g])] == pytest.approx(float(value), abs=1e-15)
    # e.g. P(C | C won) = 0.6 / (0.1 + 0.3 + 0.6)
    assert float(exact[(2, 2)]) == pytest.approx(0.6)


def test_non_uniform_prior():
    counts = [[8, 2], [3, 7]]
    prior = [0.2, 0.8]
    p = _post(posterior_given_winner(counts, ["A", "B"], prior=prior))
    exact = _bayes(counts, [F(1, 5), F(4, 5)])
    assert p[("A", "A")] == pytest.approx(float(exact[(0, 0)]))
    assert p[("A", "A")] == pytest.approx(0.8 * 0.2 / (0.8 * 0.2 + 0.3 * 0.8))  # 0.4
    assert p[("B", "B")] == pytest.approx(0.7 * 0.8 / (0.2 * 0.2 + 0.7 * 0.8))
    # a mapping in any order is the same prior
    q = _post(posterior_given_winner(counts, ["A", "B"], prior={"B": 0.8, "A": 0.2}))
    assert q == pytest.approx(p)


def test_posteriors_sum_to_one_per_winner():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 20, size=(5, 5))
    counts[:, 2] = 0  # one winner never won
    counts[:, 0] += 1
    models = list("ABCDE")
    prior = rng.dirichlet(np.ones(5))
    res = posterior_given_winner(counts, models, prior=prior, n_draws=500)
    sums = res.groupby("winner")["posterior"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0, atol=1e-12)
    assert set(sums.index) == {"A", "B", "D", "E"}


def test_never_won_winner_has_no_rows():
    counts = [[5, 0, 5], [2, 0, 8], [1, 0, 9]]
    models = ["A", "B", "C"]
    res = posterior_given_winner(counts, models)
    assert "B" not in set(res["winner"])
    assert set(res["generator"]) == {"A", "B", "C"}  # B is still a possible generator
    assert len(res) == 6
    assert res.attrs["never_won"] == ["B"]
    assert res.attrs["no_posterior"] == ["B"]
    assert never_won(counts, models) == ["B"]
    assert not res["posterior"].isna().any()


def test_prior_excluding_every_source_of_a_win_gives_no_posterior():
    # C won only on C's data, and the prior says C never generates: P(. | C won) is undefined
    counts = [[9, 1, 0], [2, 8, 0], [0, 0, 10]]
    res = posterior_given_winner(counts, list("ABC"), prior=[0.5, 0.5, 0.0])
    assert set(res["winner"]) == {"A", "B"}
    assert res.attrs["never_won"] == []
    assert res.attrs["no_posterior"] == ["C"]
    assert res.loc[res["generator"] == "C", "posterior"].eq(0).all()


def test_interval_contains_estimate_and_narrows_with_counts():
    counts = np.array([[8, 2], [3, 7]])
    small = posterior_given_winner(counts, ["A", "B"])
    large = posterior_given_winner(counts * 10, ["A", "B"])
    for res in (small, large):
        assert (res["ci_low"] <= res["posterior"]).all()
        assert (res["posterior"] <= res["ci_high"]).all()
        assert ((res["ci_low"] >= 0) & (res["ci_high"] <= 1)).all()
    pd.testing.assert_series_equal(small["posterior"], large["posterior"])  # same proportions
    width_small = small["ci_high"] - small["ci_low"]
    width_large = large["ci_high"] - large["ci_low"]
    assert (width_large < 0.6 * width_small).all()  # roughly 1 / sqrt(10)


def test_interval_on_a_boundary_is_extended_to_the_estimate():
    # a perfectly diagonal matrix: P(A | A won) = 1 exactly, every Dirichlet draw is below 1
    res = posterior_given_winner([[10, 0], [0, 10]], ["A", "B"])
    row = res[(res["winner"] == "A") & (res["generator"] == "A")].iloc[0]
    assert row["posterior"] == 1.0
    assert row["ci_high"] == 1.0
    assert 0.5 < row["ci_low"] < 1.0


def test_deterministic_under_the_seed():
    counts = [[6, 3, 1], [2, 5, 3], [0, 4, 6]]
    a = posterior_given_winner(counts, list("ABC"), seed=7, n_draws=1000)
    b = posterior_given_winner(counts, list("ABC"), seed=7, n_draws=1000)
    c = posterior_given_winner(counts, list("ABC"), seed=8, n_draws=1000)
    pd.testing.assert_frame_equal(a, b)
    assert not np.array_equal(a["ci_low"].to_numpy(), c["ci_low"].to_numpy())
    pd.testing.assert_series_equal(a["posterior"], c["posterior"])


def test_exact_duplicate_models():
    # B is an exact copy of A: every A/B tie goes to A (listed first), so B never wins
    counts = [[10, 0, 0], [10, 0, 0], [1, 0, 9]]
    res = posterior_given_winner(counts, ["A", "B", "C"])
    p = _post(res)
    assert "B" not in set(res["winner"])
    assert res.attrs["never_won"] == ["B"]
    assert p[("A", "A")] == pytest.approx(p[("A", "B")])
    assert p[("A", "A")] == pytest.approx(1.0 / 2.1)
    # with only the duplicates: exactly one half each
    two = _post(posterior_given_winner([[7, 0], [7, 0]], ["A", "B"]))
    assert two == {("A", "A"): 0.5, ("A", "B"): 0.5}


def _duplicate_fits(n_sims: int = 4) -> pd.DataFrame:
    """Fits where candidate B always scores exactly as A does; C is recovered on its own data."""
    rows = []
    for sim in range(n_sims):
        for gen in "ABC":
            for cand in "ABC":
                if gen == "C":
                    acc = 0.9 if cand == "C" else 0.6
                else:
                    acc = 0.5 if cand == "C" else 0.7 + 0.01 * sim
                for fold in range(3):
                    rows.append(
                        dict(
                            simulation=sim,
                            generator=gen,
                            candidate=cand,
                            lam=1.0,
                            fold=fold,
                            val_acc=acc,
                            test_acc=acc,
                            val_nll=1 - acc,
                            test_nll=1 - acc,
                        )
                    )
    return pd.DataFrame(rows)


def test_exact_duplicates_through_selection():
    models = ["A", "B", "C"]
    cands, winners = select_and_score(_duplicate_fits(), models)
    true = cands[cands["is_generator"]][["simulation", "generator", "rank"]]
    winners = winners.drop(columns="true_rank").merge(
        true.rename(columns={"rank": "true_rank"}), on=["simulation", "generator"]
    )
    confusion = recovery_metrics(winners, models).confusion
    assert confusion["B"].sum() == 0
    res = posterior_given_winner(confusion, models)
    p = _post(res)
    assert res.attrs["never_won"] == ["B"]
    assert p[("A", "A")] == pytest.approx(0.5)
    assert p[("A", "B")] == pytest.approx(0.5)
    assert p[("A", "C")] == 0.0
    assert p[("C", "C")] == 1.0


def _long(tables: dict[tuple[int, str], list[list[int]]], models) -> pd.DataFrame:
    rows = []
    for (n, crit), counts in tables.items():
        for i, g in enumerate(models):
            for j, m in enumerate(models):
                rows.append(
                    dict(n_train=n, criterion=crit, generator=g, winner=m, count=counts[i][j])
                )
    return pd.DataFrame(rows)


def test_identifiability_table_and_human_winner():
    models = ["A", "B"]
    tables = {
        (100, "accuracy"): [[6, 4], [5, 5]],
        (100, "nll"): [[10, 0], [10, 0]],
        (1000, "accuracy"): [[8, 2], [3, 7]],
        (10000, "accuracy"): [[10, 0], [6, 0]],
    }
    long = _long(tables, models)
    table = identifiability_table(long.sample(frac=1.0, random_state=1), models, n_draws=500)
    assert list(table.columns) == [
        "n_train",
        "criterion",
        "winner",
        "generator",
        "n_wins",
        "posterior",
        "ci_low",
        "ci_high",
    ]
    # every group is the single-matrix result with the same seed
    for (n, crit), counts in tables.items():
        one = posterior_given_winner(counts, models, n_draws=500)
        got = table[(table["n_train"] == n) & (table["criterion"] == crit)]
        pd.testing.assert_frame_equal(
            got.drop(columns=["n_train", "criterion"]).reset_index(drop=True), one
        )
    assert list(table["n_train"].drop_duplicates()) == [100, 1000, 10000]
    # missing cells (sql/confusion.sql keeps only count > 0) count as zero
    sparse = identifiability_table(long[long["count"] > 0], models, n_draws=500)
    pd.testing.assert_frame_equal(sparse, table)

    nw = never_won_table(long, models)
    assert nw.to_dict("records") == [
        dict(n_train=100, criterion="nll", winner="B"),
        dict(n_train=10000, criterion="accuracy", winner="B"),
    ]

    hw = human_winner_posterior(table, "B")
    assert hw.largest_n == 10000
    assert hw.never_won_at == [10000]
    assert hw.at_largest.empty
    assert list(hw.per_n["n_train"]) == [100, 100, 1000, 1000]
    assert (hw.per_n["criterion"] == "accuracy").all()
    own = hw.true_model_posterior()
    assert own["posterior"].tolist() == pytest.approx([0.5 / 0.9, 0.7 / 0.9])

    hw_a = human_winner_posterior(table, "A")
    assert hw_a.never_won_at == []
    assert list(hw_a.at_largest["generator"]) == ["A", "B"]
    assert hw_a.at_largest["posterior"].tolist() == pytest.approx([0.5, 0.5])  # B: 6 of 6 to A


def test_invalid_inputs():
    models = ["A", "B"]
    with pytest.raises(ValueError, match="row total 0"):
        posterior_given_winner([[3, 1], [0, 0]], models)
    with pytest.raises(ValueError, match="negative"):
        posterior_given_winner([[3, -1], [1, 1]], models)
    with pytest.raises(ValueError, match="whole numbers"):
        posterior_given_winner([[3, 0.5], [1, 1]], models)
    with pytest.raises(ValueError, match="2 x 2"):
        posterior_given_winner([[3, 1, 0], [1, 1, 0]], models)
    with pytest.raises(ValueError, match="sum to 1"):
        posterior_given_winner([[3, 1], [1, 1]], models, prior=[0.5, 0.6])
    with pytest.raises(ValueError, match="non-negative"):
        posterior_given_winner([[3, 1], [1, 1]], models, prior=[1.5, -0.5])
    with pytest.raises(ValueError, match="one entry per model"):
        posterior_given_winner([[3, 1], [1, 1]], models, prior=[1.0])
    with pytest.raises(ValueError, match="level"):
        posterior_given_winner([[3, 1], [1, 1]], models, level=1.0)
    with pytest.raises(ValueError, match="more than once"):
        posterior_given_winner([[3, 1], [1, 1]], ["A", "A"])
    bad = _long({(10, "accuracy"): [[3, 1], [1, 1]]}, models)
    with pytest.raises(ValueError, match="missing columns"):
        identifiability_table(bad.drop(columns="count"), models)
    with pytest.raises(ValueError, match="duplicated"):
        identifiability_table(pd.concat([bad, bad.iloc[:1]]), models)
    with pytest.raises(ValueError, match="n_train=10.*row total 0"):
        identifiability_table(bad[bad["generator"] == "A"], models)
    with pytest.raises(ValueError, match="not in model_order"):
        identifiability_table(bad, ["A", "C"])
    table = identifiability_table(bad, models, n_draws=100)
    with pytest.raises(ValueError, match="none of the table's models"):
        human_winner_posterior(table, "Z")
