"""Tests of recovery_assets.core.regression (docs/method.md §8: regression of misidentification)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from recovery_assets.core.regression import (
    PROPERTIES,
    _pair_design,
    _weighted_pair_fits,
    build_regression_frame,
    fit_misidentification_regression,
    regression_terms,
)

# planted coefficients on the z-scored predictors, in raw accuracy-difference units
PLANT_GEN = {
    "n_params": 0.0,
    "embedding_dim": 0.01,
    "alignment_shift": 0.08,
    "ed_before": 0.0,
    "ed_after": 0.04,
}
PLANT_CAND = {
    "n_params": 0.0,
    "embedding_dim": -0.01,
    "alignment_shift": -0.06,
    "ed_before": 0.0,
    "ed_after": -0.03,
}
PLANT_INTERCEPT = 0.05


def _properties(n_models: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = [f"model_{i:02d}" for i in range(n_models)]
    return pd.DataFrame(
        {
            "n_params": np.exp(rng.uniform(np.log(2e7), np.log(1e9), n_models)),
            "embedding_dim": rng.choice([512, 768, 1024, 1536, 2048], n_models).astype(float),
            "alignment_shift": rng.uniform(0.05, 0.6, n_models),
            "ed_before": rng.uniform(5.0, 60.0, n_models),
            "ed_after": rng.uniform(3.0, 40.0, n_models),
        },
        index=pd.Index(names, name="model"),
    )


def _zprops(props: pd.DataFrame) -> pd.DataFrame:
    return (props - props.mean()) / props.std(ddof=1)


def _planted_scores(
    props: pd.DataFrame, n_sims: int = 4, noise: float = 1e-4, seed: int = 1
) -> pd.DataFrame:
    """Scores whose accuracy differences follow the planted linear model plus small noise."""
    rng = np.random.default_rng(seed)
    z = _zprops(props)
    rows = []
    for s in range(n_sims):
        for g in props.index:
            own = 0.7 + 0.01 * rng.standard_normal()
            rows.append((s, g, g, own))
            for m in props.index:
                if m == g:
                    continue
                diff = PLANT_INTERCEPT + noise * rng.standard_normal()
                diff += sum(PLANT_GEN[p] * z.at[g, p] + PLANT_CAND[p] * z.at[m, p] for p in z)
                rows.append((s, g, m, own - diff))
    return pd.DataFrame(rows, columns=["simulation", "generator", "candidate", "score"])


@pytest.fixture(scope="module")
def planted():
    props = _properties(12)
    scores = _planted_scores(props)
    frame = build_regression_frame(scores, props)
    table, meta = fit_misidentification_regression(frame, n_boot=2000, seed=0)
    return props, scores, frame, table, meta


# --- the observation table ------------------------------------------------------------------


def test_frame_shape_and_standardisation(planted):
    props, scores, frame, _, _ = planted
    k = len(props)
    assert len(frame) == 4 * k * (k - 1)
    assert not (frame["generator"] == frame["candidate"]).any()
    assert frame["acc_diff"].mean() == pytest.approx(0.0, abs=1e-12)
    assert frame["acc_diff"].std(ddof=1) == pytest.approx(1.0, rel=1e-12)
    expected_cols = [f"gen_{p}" for p in PROPERTIES] + [f"cand_{p}" for p in PROPERTIES]
    assert all(c in frame.columns for c in expected_cols)
    # predictors are z-scored across models (each model once), not across rows
    z = _zprops(props)
    for p in PROPERTIES:
        per_model = frame.groupby("generator")[f"gen_{p}"].first()
        np.testing.assert_allclose(per_model.loc[z.index], z[p], rtol=1e-12, atol=1e-12)
        assert per_model.std(ddof=1) == pytest.approx(1.0, rel=1e-12)
    # acc_diff_raw = own score - candidate score on the generator's data
    row = frame.iloc[7]
    sel = (scores["simulation"] == row["simulation"]) & (scores["generator"] == row["generator"])
    own = scores.loc[sel & (scores["candidate"] == row["generator"]), "score"].item()
    cand = scores.loc[sel & (scores["candidate"] == row["candidate"]), "score"].item()
    assert row["acc_diff_raw"] == pytest.approx(own - cand, abs=1e-15)


def test_frame_ignores_extra_models_in_properties():
    props = _properties(6, seed=3)
    extra = pd.DataFrame({p: [1e12] for p in PROPERTIES}, index=["unused"])
    scores = _planted_scores(props, n_sims=1)
    a = build_regression_frame(scores, props)
    b = build_regression_frame(scores, pd.concat([props, extra]))
    pd.testing.assert_frame_equal(a, b)


# --- fitting --------------------------------------------------------------------------------


def test_regression_recovers_planted_coefficients(planted):
    _, _, frame, table, meta = planted
    sd = frame["acc_diff_raw"].std(ddof=1)
    mean = frame["acc_diff_raw"].mean()
    truth = {"intercept": (PLANT_INTERCEPT - mean) / sd}
    truth.update({f"gen_{p}": b / sd for p, b in PLANT_GEN.items()})
    truth.update({f"cand_{p}": b / sd for p, b in PLANT_CAND.items()})
    assert list(table["term"]) == regression_terms()
    for _, row in table.iterrows():
        t = truth[row["term"]]
        assert row["coef"] == pytest.approx(t, abs=5e-3), row["term"]
        assert row["ci_low"] - 5e-3 <= t <= row["ci_high"] + 5e-3, row["term"]
        assert row["ci_low"] <= row["coef"] + 1e-9 and row["coef"] - 1e-9 <= row["ci_high"]
    big = table["term"].isin(
        ["gen_alignment_shift", "cand_alignment_shift", "gen_ed_after", "cand_ed_after"]
    )
    assert table.loc[big, "significant"].all()
    assert meta["n_rows"] == len(frame)
    assert meta["n_models"] == 12
    assert meta["n_boot"] == 2000
    assert meta["n_boot_valid"] + meta["n_rank_deficient"] == 2000
    assert meta["r_squared"] > 0.99


def test_ols_coefficients_match_statsmodels(planted):
    _, _, frame, table, _ = planted
    cols = regression_terms()[1:]
    fit = sm.OLS(frame["acc_diff"].to_numpy(), sm.add_constant(frame[cols].to_numpy())).fit()
    np.testing.assert_allclose(table["coef"], fit.params, rtol=1e-10, atol=1e-12)


def test_pvalues_bonferroni_and_vif(planted):
    _, _, _, table, _ = planted
    assert (table["p_bonferroni"] >= table["p_boot"]).all()
    np.testing.assert_allclose(
        table["p_bonferroni"], np.minimum(1.0, len(table) * table["p_boot"]), rtol=1e-12
    )
    assert ((table["p_boot"] >= 1 / 2000) & (table["p_boot"] <= 1.0)).all()
    assert (table["significant"] == (table["p_bonferroni"] <= 0.05)).all()
    assert np.isnan(table.loc[table["term"] == "intercept", "vif"]).all()
    assert (table.loc[table["term"] != "intercept", "vif"] >= 1.0).all()


def test_weighted_pair_fit_equals_replicated_ols(planted):
    _, _, frame, table, _ = planted
    terms = regression_terms()
    x, n_p, ysum, g_idx, m_idx, models = _pair_design(frame, terms)
    # all counts one: the full-sample OLS
    ones, deficient = _weighted_pair_fits(x, n_p, ysum, g_idx, m_idx, np.ones((1, len(models))))
    assert not deficient[0]
    np.testing.assert_allclose(ones[0], table["coef"], rtol=1e-8, atol=1e-10)
    # one explicit resample: replicate each (g, m) row count(g) * count(m) times
    counts = np.zeros(len(models), dtype=int)
    for i in [0, 0, 1, 2, 3, 3, 3, 5, 6, 8, 9, 11]:
        counts[i] += 1
    count_of = dict(zip(models, counts, strict=True))
    reps = np.array(
        [
            count_of[g] * count_of[m]
            for g, m in zip(frame["generator"], frame["candidate"], strict=True)
        ]
    )
    replicated = frame.loc[frame.index.repeat(reps)]
    assert not (replicated["generator"] == replicated["candidate"]).any()
    fit = sm.OLS(
        replicated["acc_diff"].to_numpy(), sm.add_constant(replicated[terms[1:]].to_numpy())
    ).fit()
    coefs, deficient = _weighted_pair_fits(x, n_p, ysum, g_idx, m_idx, counts[None, :])
    assert not deficient[0]
    np.testing.assert_allclose(coefs[0], fit.params, rtol=1e-8, atol=1e-10)


def test_bootstrap_reproducible_with_seed(planted):
    _, _, frame, table, meta = planted
    again, meta_again = fit_misidentification_regression(frame, n_boot=2000, seed=0)
    pd.testing.assert_frame_equal(table, again)
    assert meta == meta_again
    other, _ = fit_misidentification_regression(frame, n_boot=2000, seed=1)
    np.testing.assert_array_equal(table["coef"], other["coef"])  # OLS does not depend on seed
    assert not np.allclose(table["ci_low"], other["ci_low"])


def test_rank_deficient_resamples_are_counted_and_excluded():
    props = _properties(4, seed=5)
    scores = _planted_scores(props, n_sims=2, noise=0.01)
    frame = build_regression_frame(scores, props, predictors=["alignment_shift"])
    assert list(frame.columns[-2:]) == ["gen_alignment_shift", "cand_alignment_shift"]
    table, meta = fit_misidentification_regression(frame, n_boot=500, seed=3)
    # with one predictor (3 terms) a resample identifies the coefficients iff it draws at least
    # 3 distinct models; replay the seeded draws to count the others
    counts = np.random.default_rng(3).multinomial(4, np.full(4, 0.25), size=500)
    expected = int(((counts > 0).sum(axis=1) < 3).sum())
    assert expected > 0
    assert meta["n_rank_deficient"] == expected
    assert meta["n_boot_valid"] == 500 - expected
    assert list(table["term"]) == ["intercept", "gen_alignment_shift", "cand_alignment_shift"]
    assert np.all(np.isfinite(table[["ci_low", "ci_high", "p_boot"]].to_numpy()))


# --- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    props = _properties(5, seed=7)
    return props, _planted_scores(props, n_sims=2)


def test_missing_columns(small):
    props, scores = small
    with pytest.raises(ValueError, match=r"scores is missing required column\(s\) \['score'\]"):
        build_regression_frame(scores.drop(columns="score"), props)
    with pytest.raises(ValueError, match=r"properties is missing .*\['ed_after'\]"):
        build_regression_frame(scores, props.drop(columns="ed_after"))
    frame = build_regression_frame(scores, props)
    with pytest.raises(ValueError, match="frame is missing"):
        fit_misidentification_regression(frame.drop(columns="acc_diff"), n_boot=10)
    with pytest.raises(ValueError, match="no predictor columns"):
        fit_misidentification_regression(frame[["generator", "candidate", "acc_diff"]], n_boot=10)


def test_model_missing_from_properties(small):
    props, scores = small
    with pytest.raises(ValueError, match=r"model\(s\) \['model_02'\] appear in scores"):
        build_regression_frame(scores, props.drop(index="model_02"))


def test_nan_values(small):
    props, scores = small
    bad = scores.copy()
    bad.loc[3, "score"] = np.nan
    with pytest.raises(ValueError, match="'score' contains 1 missing"):
        build_regression_frame(bad, props)
    bad_props = props.copy()
    bad_props.loc["model_01", "ed_before"] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite .*'model_01', 'ed_before'"):
        build_regression_frame(scores, bad_props)
    frame = build_regression_frame(scores, props)
    frame.loc[0, "gen_ed_after"] = np.nan
    with pytest.raises(
        ValueError, match=r"NaN or infinite values in column\(s\) \['gen_ed_after'\]"
    ):
        fit_misidentification_regression(frame, n_boot=10)


def test_fewer_than_three_models(small):
    props, scores = small
    two = scores[scores["generator"].isin(["model_00", "model_01"])]
    two = two[two["candidate"].isin(["model_00", "model_01"])]
    with pytest.raises(ValueError, match="at least 3 models"):
        build_regression_frame(two, props)


def test_structural_errors(small):
    props, scores = small
    no_self = scores[~((scores["generator"] == "model_03") & (scores["candidate"] == "model_03"))]
    with pytest.raises(ValueError, match="lacks the generator's own score"):
        build_regression_frame(no_self, props)
    with pytest.raises(ValueError, match="duplicate"):
        build_regression_frame(pd.concat([scores, scores.iloc[:1]]), props)
    constant = props.assign(embedding_dim=768.0)
    with pytest.raises(ValueError, match="'embedding_dim' across models has no variance"):
        build_regression_frame(scores, constant)
    # with 5 models, 5 properties give an unidentifiable (rank-deficient) design
    frame = build_regression_frame(scores, props)
    with pytest.raises(ValueError, match="rank-deficient"):
        fit_misidentification_regression(frame, n_boot=10)
    ok = build_regression_frame(scores, props, predictors=["alignment_shift", "ed_after"])
    for kwargs, match in [
        ({"n_boot": 0}, "n_boot"),
        ({"n_boot": 2.5}, "n_boot"),
        ({"alpha": 1.0}, "alpha"),
    ]:
        with pytest.raises(ValueError, match=match):
            fit_misidentification_regression(ok, **kwargs)
