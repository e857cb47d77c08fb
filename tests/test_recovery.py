"""Tests of recovery_assets.core.recovery (docs/method.md §7): selection, ranks, recovery
metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recovery_assets.core.recovery import lambda_table, recovery_metrics, select_and_score

MODELS = ["A", "B", "C"]
LAMS = [0.1, 1.0, 10.0]


def _rows(sim, gen, cand, lam, val_acc, test_acc, val_nll=None, test_nll=None):
    """3 fold rows whose val/test accuracies average to the given values (spread +-0.05)."""
    out = []
    for fold, offset in enumerate((-0.05, 0.0, 0.05)):
        out.append(
            {
                "simulation": sim,
                "generator": gen,
                "candidate": cand,
                "lam": lam,
                "fold": fold,
                "val_acc": val_acc + offset,
                "test_acc": test_acc - offset,
                "val_nll": (1 - val_acc if val_nll is None else val_nll) + offset,
                "test_nll": (1 - test_acc if test_nll is None else test_nll) - offset,
            }
        )
    return out


def _job(sim, gen, table):
    """table: candidate -> list of (val_acc, test_acc) per lambda in LAMS."""
    rows = []
    for cand, values in table.items():
        for lam, (val, test) in zip(LAMS, values, strict=True):
            rows += _rows(sim, gen, cand, lam, val, test)
    return rows


def _fits() -> pd.DataFrame:
    rows = []
    # Job (0, A). Mean validation accuracy per lambda (0.1, 1, 10):
    #   A: 0.60, 0.70, 0.70 -> tie between 1 and 10 -> lambda* = 1 (smallest); test at 1: 0.70
    #   B: 0.65, 0.60, 0.55 -> lambda* = 0.1; test 0.70 -> ties with A; A is first -> A wins
    #   C: 0.50, 0.50, 0.50 -> lambda* = 0.1; test 0.50
    #   ranks: A 1.5, B 1.5, C 3
    rows += _job(
        0,
        "A",
        {
            "A": [(0.60, 0.10), (0.70, 0.70), (0.70, 0.90)],
            "B": [(0.65, 0.70), (0.60, 0.95), (0.55, 0.95)],
            "C": [(0.50, 0.50), (0.50, 0.60), (0.50, 0.40)],
        },
    )
    # Job (0, B): same, so A wins (score tie, first in model order); B's true rank is 1.5
    rows += _job(
        0,
        "B",
        {
            "A": [(0.60, 0.10), (0.70, 0.70), (0.70, 0.90)],
            "B": [(0.65, 0.70), (0.60, 0.95), (0.55, 0.95)],
            "C": [(0.50, 0.50), (0.50, 0.60), (0.50, 0.40)],
        },
    )
    # Job (0, C): C has the best test accuracy at its lambda* (10): C wins, ranks C 1, B 2, A 3
    rows += _job(
        0,
        "C",
        {
            "A": [(0.60, 0.30), (0.50, 0.90), (0.40, 0.90)],
            "B": [(0.60, 0.50), (0.50, 0.90), (0.40, 0.90)],
            "C": [(0.60, 0.10), (0.60, 0.20), (0.70, 0.80)],
        },
    )
    return pd.DataFrame(rows)


def test_select_and_score_hand_made_table():
    cands, winners = select_and_score(_fits(), MODELS)
    c = cands.set_index(["generator", "candidate"])
    assert c.loc[("A", "A"), "lam_star"] == 1.0  # lambda tie -> smallest
    assert c.loc[("A", "B"), "lam_star"] == 0.1
    assert c.loc[("C", "C"), "lam_star"] == 10.0
    assert c.loc[("A", "A"), "score"] == pytest.approx(0.70)
    assert c.loc[("A", "A"), "test_nll"] == pytest.approx(0.30)  # NLL recorded at lambda*
    assert list(c.loc["A", "rank"]) == [1.5, 1.5, 3.0]  # average ranks for the A/B tie
    assert list(c.loc["C", "rank"]) == [3.0, 2.0, 1.0]
    assert list(c.loc["A", "is_winner"]) == [True, False, False]
    assert cands["is_winner"].sum() == 3

    w = winners.set_index("generator")
    assert list(w["winner"]) == ["A", "A", "C"]  # B's job: score tie -> first in model order
    assert list(w["true_rank"]) == [1.5, 1.5, 1.0]
    assert list(w["recovered"]) == [True, False, True]

    # row order of the input does not matter
    shuffled = _fits().sample(frac=1.0, random_state=0)
    cands2, winners2 = select_and_score(shuffled, MODELS)
    pd.testing.assert_frame_equal(cands, cands2)
    pd.testing.assert_frame_equal(winners, winners2)


def test_float_summation_ties_are_ties():
    # fold accuracies (390, 816, 570) / 997 and the reverse order have the same mean, but the
    # float means differ in the last bit (summation order), which must still count as a tie
    accs = (390 / 997, 816 / 997, 570 / 997)
    means = pd.DataFrame({"c": list("AAABBB"), "v": [*accs, *accs[::-1]]}).groupby("c").v.mean()
    assert means["A"] != means["B"]
    rows = []
    for cand, fold_accs in (("A", accs), ("B", accs[::-1])):
        for fold, acc in enumerate(fold_accs):
            rows.append(
                dict(
                    simulation=0,
                    generator="B",
                    candidate=cand,
                    lam=1.0,
                    fold=fold,
                    val_acc=0.5,
                    test_acc=acc,
                    val_nll=1.0,
                    test_nll=1.0,
                )
            )
    cands, winners = select_and_score(pd.DataFrame(rows), ["A", "B"])
    assert list(cands["rank"]) == [1.5, 1.5]
    assert winners.loc[0, "winner"] == "A" and winners.loc[0, "true_rank"] == 1.5


def test_nll_criterion():
    fits = _fits()
    # make NLLs decide differently from accuracy in job (0, C): A has the lowest test NLL
    sel = (fits["generator"] == "C") & (fits["candidate"] == "A")
    fits.loc[sel, "test_nll"] = 0.01
    # lambda choice by validation NLL: for A in job (0, C) val NLLs are 0.4, 0.5, 0.6 (means of
    # 1 - val_acc) -> lowest at lambda 0.1
    cands, winners = select_and_score(fits, MODELS, criterion="nll")
    c = cands.set_index(["generator", "candidate"])
    assert c.loc[("C", "A"), "lam_star"] == 0.1
    assert c.loc[("C", "A"), "score"] == pytest.approx(0.01)
    assert winners.set_index("generator").loc["C", "winner"] == "A"
    # test NLLs at lambda*: A 0.01 (lambda 0.1), C 1 - 0.8 = 0.2 (lambda 10), B 1 - 0.5 = 0.5
    assert list(c.loc["C", "rank"]) == [1.0, 3.0, 2.0]
    assert winners.set_index("generator").loc["C", "true_rank"] == 2.0
    with pytest.raises(ValueError, match="criterion"):
        select_and_score(fits, MODELS, criterion="auc")


def test_lambda_table_means():
    fits = _fits()
    table = lambda_table(fits, MODELS)
    assert len(table) == 3 * 3 * 3
    assert (table["n_folds"] == 3).all()
    # every row is the mean over its folds, recomputed by hand
    for row in table.itertuples():
        sel = fits[
            (fits.simulation == row.simulation)
            & (fits.generator == row.generator)
            & (fits.candidate == row.candidate)
            & (fits.lam == row.lam)
        ]
        assert len(sel) == 3
        for col in ("val_acc", "test_acc", "val_nll", "test_nll"):
            assert getattr(row, col) == pytest.approx(sel[col].sum() / 3, abs=1e-12), col
    row = table[(table.generator == "A") & (table.candidate == "B") & (table.lam == 0.1)]
    assert row["val_acc"].item() == pytest.approx(0.65)


def test_select_and_score_validation_errors():
    fits = _fits()
    with pytest.raises(ValueError, match="missing columns"):
        select_and_score(fits.drop(columns="val_nll"), MODELS)
    bad = fits.copy()
    bad.loc[3, "test_acc"] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        select_and_score(bad, MODELS)
    with pytest.raises(ValueError, match="not in model_order"):
        select_and_score(fits, ["A", "B"])
    with pytest.raises(ValueError, match="inconsistent fold"):
        select_and_score(fits.drop(index=5), MODELS)
    with pytest.raises(ValueError, match="duplicated"):
        select_and_score(pd.concat([fits, fits.iloc[[0]]]), MODELS)
    missing_cand = fits[~((fits.generator == "C") & (fits.candidate == "B"))]
    with pytest.raises(ValueError, match="candidate sets"):
        select_and_score(missing_cand, MODELS)


def test_recovery_metrics_from_selection():
    _, winners = select_and_score(_fits(), MODELS)
    m = recovery_metrics(winners, MODELS, n_total=3)
    # winners: A -> A, B -> A, C -> C
    expected = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    assert np.array_equal(m.confusion.to_numpy(), expected)
    assert list(m.confusion.index) == MODELS and list(m.confusion.columns) == MODELS
    assert (m.n_total, m.n_correct) == (3, 2)
    assert m.accuracy == pytest.approx(2 / 3)
    assert m.chance == pytest.approx(1 / 3)
    assert m.mean_true_rank == pytest.approx((1.5 + 1.5 + 1.0) / 3)
    assert m.mrr == pytest.approx((1 / 1.5 + 1 / 1.5 + 1.0) / 3)
    pm = m.per_model
    assert pm.loc["A", "precision"] == pytest.approx(0.5)  # A won twice, once correctly
    assert np.isnan(pm.loc["B", "precision"])  # B never won: undefined
    assert pm.loc["C", "precision"] == 1.0
    assert list(pm["recall"]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="expected 4 jobs"):
        recovery_metrics(winners, MODELS, n_total=4)


def test_recovery_metrics_clopper_pearson():
    # 10 jobs, 7 recovered: exact 95 % CI (0.3475, 0.9333)
    gens = ["A", "B", "C", "A", "B", "C", "A", "B", "C", "A"]
    wins = gens[:7] + ["C", "A", "B"]
    winners = pd.DataFrame({"generator": gens, "winner": wins, "true_rank": [1.0] * 7 + [2.0] * 3})
    m = recovery_metrics(winners, MODELS)
    assert m.accuracy == pytest.approx(0.7)
    assert m.ci_low == pytest.approx(0.3475, abs=1e-4)
    assert m.ci_high == pytest.approx(0.9333, abs=1e-4)
    assert m.mean_true_rank == pytest.approx(1.3)
    assert m.mrr == pytest.approx(0.85)
    # 0 of 20: lower bound 0, upper 1 - 0.025 ** (1 / 20)
    none = pd.DataFrame({"generator": ["A"] * 20, "winner": ["B"] * 20, "true_rank": [2.0] * 20})
    m0 = recovery_metrics(none, MODELS)
    assert m0.ci_low == 0.0
    assert m0.ci_high == pytest.approx(1 - 0.025 ** (1 / 20), rel=1e-9)
    assert np.isnan(m0.per_model.loc["C", "recall"])  # C never generated data: undefined
    with pytest.raises(ValueError, match="not in model_order"):
        recovery_metrics(winners.assign(winner="Z"), MODELS)
    with pytest.raises(ValueError, match="missing columns"):
        recovery_metrics(winners.drop(columns="true_rank"), MODELS)
