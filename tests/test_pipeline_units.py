"""Direct tests of the steps between the probe and the recovery tables, each against an
independent computation on a small hand-made case:

- ``fit_generator_probe`` (docs/method.md §5): the K-fold split (shuffled, ``cv_seed``), the
  cross-validated accuracies, the tie rule (smallest lambda), the refit on all training triplets at
  the chosen lambda and the temperature, recomputed here with scikit-learn's ``KFold``, the public
  ``fit_probes`` and plain numpy (the calibration root solved again with ``brentq``);
- ``evaluate_fits``: accuracy and NLL of every fit recomputed with numpy from its full W;
- ``score_candidates`` (§7): every row recomputed from a one-by-one fit of its problem;
- ``build_synthetic`` (§6): the recipe's concept folds, sizes and checksums recomputed by hand,
  every answer re-drawn by hand from its documented seed, and the answers' empirical frequencies
  tested against the generator's softmax probabilities.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import brentq
from sklearn.model_selection import KFold, train_test_split

from recovery_assets import pipeline
from recovery_assets.core.generator import fit_generator_probe
from recovery_assets.core.probe import FitProblem, ProbeSpec, features_for, fit_probes
from recovery_assets.core.scoring import evaluate_fits, score_candidates
from recovery_assets.storage import Store
from recovery_assets.study import load_study

ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------
# plain references


def plain_logits(Z: np.ndarray, trip: np.ndarray) -> np.ndarray:
    """[s_jk, s_ik, s_ij] of transformed features Z (docs/method.md §4), float64."""
    Z = np.asarray(Z, dtype=np.float64)
    i, j, k = np.asarray(trip).T
    return np.stack([(Z[j] * Z[k]).sum(1), (Z[i] * Z[k]).sum(1), (Z[i] * Z[j]).sum(1)], 1)


def plain_softmax(logits: np.ndarray, T: float = 1.0) -> np.ndarray:
    z = logits / T
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def plain_acc_nll(logits: np.ndarray, ans: np.ndarray, T: float = 1.0) -> tuple[float, float]:
    ans = np.asarray(ans, dtype=np.int64)
    acc = float((logits.argmax(1) == ans).mean())
    z = logits / T
    top = z.max(1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(1))
    return acc, float((lse - z[np.arange(len(ans)), ans]).mean())


def plain_shrinkage_objective(W, X, trip, ans, lam) -> float:
    """§4 for full W with the shrinkage penalty: mean CE + lam ||W - (tr W / p) I||^2."""
    W = np.asarray(W, dtype=np.float64)
    _, nll = plain_acc_nll(plain_logits(np.asarray(X, np.float64) @ W.T, trip), ans)
    dev = W - np.trace(W) / W.shape[0] * np.eye(W.shape[0])
    return nll + lam * float((dev * dev).sum())


def W64(fit) -> np.ndarray:
    return fit.matrix_tensor().to(F64).cpu().numpy()


def distinct_triplets(rng: np.random.Generator, concepts: np.ndarray, m: int) -> np.ndarray:
    return np.stack([rng.choice(concepts, 3, replace=False) for _ in range(m)])


def planted(seed: int, n: int = 24, p: int = 6):
    """Features and a planted transform whose choices are sampled from softmax(3 logits)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * np.sqrt(2.0 / p)
    W = np.eye(p) + 0.6 * rng.standard_normal((p, p)) / np.sqrt(p)

    def answers(trip):
        P = plain_softmax(3.0 * plain_logits(X @ W.T, trip))
        return (rng.random(len(P))[:, None] > P.cumsum(1)[:, :2]).sum(1)

    return X, rng, answers


# ----------------------------------------------------------------------------------------------
# fit_generator_probe


def _cv_by_hand(X, trip, ans, lams, spec, folds, seed):
    """The cross-validated accuracies by hand: sklearn's KFold, the public fit, numpy scoring."""
    splits = list(KFold(n_splits=folds, shuffle=True, random_state=seed).split(trip))
    problems = [FitProblem(X, trip[tr], ans[tr], lams) for tr, _ in splits]
    fits = fit_probes(problems, spec, dtype=F64)
    rows = []
    for f, ((_, va), fl) in enumerate(zip(splits, fits, strict=True)):
        for fit, lam in zip(fl, lams, strict=True):
            Z = features_for(spec, X) @ W64(fit).T
            acc, nll = plain_acc_nll(plain_logits(Z, trip[va]), ans[va])
            rows.append(dict(lam=float(lam), fold=f, val_acc=acc, val_nll=nll))
    return pd.DataFrame(rows)


def _tie_rule(cv: pd.DataFrame) -> tuple[float, float]:
    """docs/method.md §5: the best mean validation accuracy, ties to the smallest lambda."""
    means = {lam: g["val_acc"].mean() for lam, g in cv.groupby("lam")}
    best = max(means.values())
    lam = min(lam for lam, v in means.items() if v >= best - 1e-12)
    return lam, means[lam]


def _same_cv(got: pd.DataFrame, mine: pd.DataFrame) -> None:
    key = ["lam", "fold"]
    got = got.sort_values(key).reset_index(drop=True)
    mine = mine.sort_values(key).reset_index(drop=True)
    assert got[key].astype(float).equals(mine[key].astype(float))
    np.testing.assert_allclose(got["val_acc"].astype(float), mine["val_acc"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["val_nll"].astype(float), mine["val_nll"], rtol=1e-9)


def test_fit_generator_probe_defaults_refit_and_calibration():
    """Default folds (5) and seed (42), the selected lambda, the refit on all training triplets,
    the temperature and the reported metrics, all recomputed independently."""
    X, rng, answers = planted(3)
    trip = distinct_triplets(rng, np.arange(24), 300)
    ans = answers(trip)
    calib = distinct_triplets(rng, np.arange(24), 150)
    held = distinct_triplets(rng, np.arange(24), 120)
    held_ans = answers(held)
    lams = [10.0, 1e-3, 0.1]  # not sorted
    spec = ProbeSpec.parse("full", "shrinkage")
    target = 0.62
    g = fit_generator_probe(
        X, (trip, ans), calib, target, lams, spec, evaluation={"held": (held, held_ans)}, dtype=F64
    )
    mine = _cv_by_hand(X, trip, ans, lams, spec, folds=5, seed=42)
    _same_cv(g.cv, mine)
    lam, cv_acc = _tie_rule(mine)
    assert g.lam == lam and g.metrics["cv_accuracy"] == pytest.approx(cv_acc, abs=1e-12)

    # refit on all training triplets at lambda*, from the identity
    (refit,) = fit_probes([FitProblem(X, trip, ans, [lam])], spec, dtype=F64)[0]
    np.testing.assert_allclose(g.W, W64(refit), rtol=0, atol=1e-5)
    f_plain = plain_shrinkage_objective(g.W, X, trip, ans, lam)
    assert f_plain == pytest.approx(g.metrics["train_objective"], rel=1e-6)
    assert f_plain == pytest.approx(plain_shrinkage_objective(W64(refit), X, trip, ans, lam), 1e-6)
    # ... and not on one fold's training part
    (tr, _), *_ = KFold(n_splits=5, shuffle=True, random_state=42).split(trip)
    (part,) = fit_probes([FitProblem(X, trip[tr], ans[tr], [lam])], spec, dtype=F64)[0]
    assert np.abs(g.W - W64(part)).max() > 1e-3
    assert g.metrics["n_train_triplets"] == len(trip)

    # the temperature: mean max softmax(l / T) over the calibration triplets equals the target
    L = plain_logits(X @ g.W.astype(np.float64).T, calib)
    assert plain_softmax(L, g.temperature).max(1).mean() == pytest.approx(target, abs=1e-9)
    u = brentq(lambda u: plain_softmax(L, np.exp(u)).max(1).mean() - target, -30, 30, xtol=1e-14)
    assert g.temperature == pytest.approx(np.exp(u), rel=1e-8)
    assert g.metrics["calibrated_mean_max_probability"] == pytest.approx(target, abs=1e-9)

    # held-out metrics at the calibrated T
    L_held = plain_logits(X @ g.W.astype(np.float64).T, held)
    acc, nll = plain_acc_nll(L_held, held_ans, T=1.0)
    _, nll_T = plain_acc_nll(L_held, held_ans, g.temperature)
    assert g.metrics["held_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert g.metrics["held_nll"] == pytest.approx(nll_T, rel=1e-6)
    assert nll_T != pytest.approx(nll, rel=1e-3)  # T really enters the NLL


def test_fit_generator_probe_uses_cv_seed_and_folds():
    X, rng, answers = planted(5)
    trip = distinct_triplets(rng, np.arange(24), 240)
    ans = answers(trip)
    calib = distinct_triplets(rng, np.arange(24), 100)
    lams = [1e-3, 0.3]
    spec = ProbeSpec.parse("full", "shrinkage")
    g = fit_generator_probe(
        X, (trip, ans), calib, 0.6, lams, spec, cv_folds=3, cv_seed=7, dtype=F64
    )
    assert sorted(set(g.cv["fold"])) == [0, 1, 2]
    _same_cv(g.cv, _cv_by_hand(X, trip, ans, lams, spec, folds=3, seed=7))
    # the seed matters: the default seed's folds give other accuracies
    other = _cv_by_hand(X, trip, ans, lams, spec, folds=3, seed=42).sort_values(["lam", "fold"])
    got = g.cv.sort_values(["lam", "fold"])
    assert not np.allclose(got["val_acc"].astype(float), other["val_acc"])


def test_fit_generator_probe_ties_go_to_the_smallest_lambda():
    """Under heavy shrinkage every lambda leaves W a scaled identity: the predictions, hence the
    validation accuracies, tie, and the smallest lambda is chosen (not the first listed)."""
    X, rng, answers = planted(8)
    trip = distinct_triplets(rng, np.arange(24), 200)
    ans = answers(trip)
    calib = distinct_triplets(rng, np.arange(24), 80)
    lams = [1e6, 1e5, 1e4]
    spec = ProbeSpec.parse("full", "shrinkage")
    g = fit_generator_probe(X, (trip, ans), calib, 0.55, lams, spec, cv_folds=3, dtype=F64)
    means = g.cv.groupby("lam")["val_acc"].mean()
    assert np.ptp(means.to_numpy()) <= 1e-12  # a genuine tie
    mine = _cv_by_hand(X, trip, ans, lams, spec, folds=3, seed=42)
    _same_cv(g.cv, mine)
    assert g.lam == 1e4 == _tie_rule(mine)[0]


# ----------------------------------------------------------------------------------------------
# evaluate_fits


EVAL_SPECS = [
    ("full", "shrinkage"),  # reduced fits: held-out concepts scaled by d outside the row space
    ("full", "frobenius"),
    ("full", "l1"),
    ("diagonal", "shrinkage"),
    ("rank:3", "shrinkage"),
    ("pca:4", "shrinkage"),  # centred features, PCA axes over all concepts
    ("zero_shot", "shrinkage"),
]


@pytest.mark.parametrize("family,penalty", EVAL_SPECS)
def test_evaluate_fits_matches_numpy_from_the_full_W(family, penalty):
    X, rng, answers = planted(11, n=30, p=8)
    train = distinct_triplets(rng, np.arange(14), 200)  # training concepts 0-13 only
    spec = ProbeSpec.parse(family, penalty)
    lams = [1e-3, 0.1]
    fits = fit_probes([FitProblem(X, train, answers(train), lams)], spec, dtype=F64)[0]
    sets = {
        "new": (distinct_triplets(rng, np.arange(14, 30), 90), None),  # unseen concepts
        "mixed": (distinct_triplets(rng, np.arange(30), 70), None),
    }
    sets = {k: (t, answers(t)) for k, (t, _) in sets.items()}
    T = 1.7
    got = evaluate_fits(fits, X, sets, temperature=T)
    assert set(got) == set(sets)
    for name, (t, a) in sets.items():
        acc, nll = got[name]
        assert acc.shape == nll.shape == (len(lams),)
        for b, fit in enumerate(fits):
            L = plain_logits(features_for(spec, X) @ W64(fit).T, t)
            want_acc, want_nll = plain_acc_nll(L, a, T)
            assert acc[b] == pytest.approx(want_acc, abs=1e-12), (name, b)
            assert nll[b] == pytest.approx(want_nll, rel=1e-9), (name, b)
    if spec.fitted:  # the lambdas gave different transforms (so each was scored on its own)
        assert np.abs(W64(fits[0]) - W64(fits[1])).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# score_candidates


def _fold(rng, n, answers_by_model, f):
    perm = rng.permutation(n)
    parts = {"train": perm[:16], "val": perm[16:23], "test": perm[23:]}
    sizes = {"train": 160, "val": 40, "test": 40}
    out = {"fold": f, "concepts": {k: np.sort(v) for k, v in parts.items()}}
    for split, concepts in parts.items():
        t = distinct_triplets(rng, concepts, sizes[split])
        out[split] = {"triplets": t, "answers": answers_by_model(t)}
    return out


def test_score_candidates_rows_recomputed_from_one_by_one_fits():
    X, rng, answers = planted(21, n=30, p=6)
    features = {"gen": X, "other": rng.standard_normal((30, 4)) * 0.6}
    by_sim = {0: [_fold(rng, 30, answers, f) for f in range(2)]}
    by_sim[3] = [_fold(rng, 30, answers, f) for f in range(2)]
    lams = [1e-3, 1.0]
    spec = ProbeSpec.parse("full", "shrinkage")
    df = score_candidates(features, by_sim, lams, spec, generator="gen", dtype=F64)
    assert len(df) == 2 * 2 * 2 * 2  # simulations x folds x candidates x lambdas
    assert set(df["generator"]) == {"gen"} and set(df["simulation"]) == {0, 3}
    keyed = df.set_index(["simulation", "candidate", "fold", "lam"])
    assert keyed.index.is_unique
    for s, folds in by_sim.items():
        for fold in folds:
            for m, Xm in features.items():
                tr = fold["train"]
                fl = fit_probes(
                    [FitProblem(Xm, tr["triplets"], tr["answers"], lams)], spec, dtype=F64
                )[0]
                for fit, lam in zip(fl, lams, strict=True):
                    row = keyed.loc[(s, m, fold["fold"], lam)]
                    W = W64(fit)
                    for split in ("val", "test"):
                        t, a = fold[split]["triplets"], fold[split]["answers"]
                        acc, nll = plain_acc_nll(plain_logits(Xm @ W.T, t), a)
                        assert row[f"{split}_acc"] == pytest.approx(acc, abs=1e-12), (s, m, lam)
                        assert row[f"{split}_nll"] == pytest.approx(nll, rel=1e-6), (s, m, lam)
                    f_plain = plain_shrinkage_objective(W, Xm, tr["triplets"], tr["answers"], lam)
                    assert row["objective"] == pytest.approx(f_plain, rel=1e-6)
                    assert bool(row["converged"]) and row["iterations"] > 0
    # every accuracy is a count over the split's triplets
    assert np.allclose(df["val_acc"] * 40, np.round(df["val_acc"] * 40))
    assert ((df[["val_acc", "test_acc"]] >= 0) & (df[["val_acc", "test_acc"]] <= 1)).all().all()


# ----------------------------------------------------------------------------------------------
# build_synthetic


def _job_seed(*parts) -> int:
    """docs/method.md §6: a seed per draw from SHA-256 of its parts, in ``job_seed``'s documented
    layout (str of each part joined by the unit separator; 8 bytes, little-endian, 63 bits)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sha256(a: np.ndarray, dtype: str) -> str:
    data = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
    head = f"{data.dtype.str}:{tuple(data.shape)}\0".encode()
    return hashlib.sha256(head + data.tobytes()).hexdigest()


def _synthetic_store(root: Path, family: str, n: int = 60, p: int = 5):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, p)).astype(np.float32)
    q = 3 if family.startswith("pca") else p
    W = (np.eye(q, p) + 0.4 * rng.standard_normal((q, p))).astype(np.float32)
    human = distinct_triplets(rng, np.arange(n), 400)
    store = Store(root)
    store.save_arrays(store.embedding_path("g"), {"features": X})
    store.save_arrays(store.generator_path("g"), {"W": W, "temperature": 0.8, "lam": 0.1})
    rows = {"trainset": human[:300], "testset2": human[300:]}
    store.save_arrays(store.path("human", "judgements.npz"), rows, meta={})
    return store, X, W, human


@pytest.mark.parametrize("family", ["full", "pca:3"])
def test_build_synthetic_recipe_answers_and_determinism(tmp_path, family):
    study = dataclasses.replace(
        load_study(ROOT / "studies" / "tiny.yaml"),
        simulations=2,
        spec=ProbeSpec.parse(family, "shrinkage"),
    )
    N, n, T = 600, 60, 0.8
    store, X, W, human = _synthetic_store(tmp_path / "a", family, n)
    summary = pipeline.build_synthetic(study, store, "g", N, log=lambda s: None)
    n_eval = round(N / 8)
    assert summary["n_answers"] == 2 * 3 * (N + 2 * n_eval)

    table = store.read_table("synthetic_datasets", {"model": "g", "n_train": N})
    recipe, meta = store.load_arrays(store.synthetic_path("g", N), "recipe")
    data = pipeline.load_synthetic(study, store, "g", N)  # regenerated and checked
    Xf = X.astype(np.float64)
    if family.startswith("pca"):
        Xf = Xf - Xf.mean(0)
    Z = Xf @ W.astype(np.float64).T
    human_keys = {tuple(sorted(t)) for t in human.tolist()}
    all_L, all_a = [], []
    for s in range(2):
        # concept folds by hand (§6): shuffled 3-fold KFold with seed s, the rest 70 / 30 by
        # train_test_split with seed s
        kf = KFold(n_splits=3, shuffle=True, random_state=s).split(np.arange(n))
        for f, (rest, test) in enumerate(kf):
            train, val = train_test_split(rest, test_size=0.3, random_state=s)
            concepts = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
            fold = data[s][f]
            assert fold["fold"] == f
            for split, c in concepts.items():
                assert np.array_equal(recipe[f"s{s}_f{f}_{split}_concepts"], c)
                t, a = fold[split]["triplets"], fold[split]["answers"]
                size = N if split == "train" else n_eval
                assert t.shape == (size, 3) and a.shape == (size,)
                assert np.isin(t, c).all()  # drawn inside the split's concepts
                keys = {tuple(sorted(r)) for r in t.tolist()}
                assert len(keys) == size and all(len(set(k)) == 3 for k in keys)  # unique, distinct
                assert not keys & human_keys  # no human triplet
                # every answer re-drawn by hand: inverse CDF of softmax(l / T) with the uniforms of
                # default_rng(the draw's seed)
                L = plain_logits(Z, t)
                u = np.random.default_rng(_job_seed("g", N, s, f, split, "answers")).random(size)
                cdf = plain_softmax(L, T).cumsum(1)[:, :2]
                assert np.array_equal(a, (cdf <= u[:, None]).sum(1))
                row = table[(table.simulation == s) & (table.fold == f) & (table.split == split)]
                assert row["n_triplets"].item() == size
                assert row["triplets_sha256"].item() == _sha256(t, "<i8")
                assert row["answers_sha256"].item() == _sha256(a, "i1")
                P = plain_softmax(L, T)
                assert row["self_agreement"].item() == pytest.approx((a == L.argmax(1)).mean())
                assert row["expected_agreement"].item() == pytest.approx(P.max(1).mean(), 1e-9)
                all_L.append(L)
                all_a.append(a)
    assert len(table) == 2 * 3 * 3

    # the answers follow the generator's softmax: per option, and per probability bin of it
    P = plain_softmax(np.concatenate(all_L), T)
    a = np.concatenate(all_a)
    for c in range(3):
        hit = (a == c).astype(float)
        for lo, hi in [(0, 1), (0, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 1)]:
            sel = (P[:, c] >= lo) & (P[:, c] < hi)
            if sel.sum() < 50:
                continue
            var = (P[sel, c] * (1 - P[sel, c])).sum()
            z = (hit[sel].sum() - P[sel, c].sum()) / np.sqrt(var)
            assert abs(z) < 5, (c, lo, hi, z)
    assert 0.2 < P.max(1).mean() - 1 / 3  # the generator is far from uniform: the test can see

    # the same recipe from a second, independent store; the simulation index changes the data
    store_b, *_ = _synthetic_store(tmp_path / "b", family, n)
    pipeline.build_synthetic(study, store_b, "g", N, log=lambda s: None)
    recipe_b, meta_b = store_b.load_arrays(store_b.synthetic_path("g", N), "recipe")
    assert recipe.keys() == recipe_b.keys() and meta == meta_b
    for k in recipe:
        assert np.array_equal(recipe[k], recipe_b[k]), k
    pd.testing.assert_frame_equal(
        table, store_b.read_table("synthetic_datasets", {"model": "g", "n_train": N})
    )
    assert not np.array_equal(data[0][0]["train"]["triplets"], data[1][0]["train"]["triplets"])
