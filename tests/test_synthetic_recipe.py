"""The synthetic data of a job are stored as a recipe and regenerated, bit for bit, where used.

Small random problems check the reproducibility machinery (fast and reference logits, chunking,
thread counts); the tiny study's stored recipes check the stored files, the regeneration and its
verification.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recovery_assets import pipeline
from recovery_assets.core.generator import triplet_logits
from recovery_assets.core.probe import features_for
from recovery_assets.core.simulation import (
    GeneratorLogits,
    _reference_answers,
    _reference_exp,
    array_sha256,
    draw_answers,
    iter_synthetic_job,
    job_seed,
    sample_answers,
    synthetic_job,
)
from recovery_assets.core.triplets import triplet_keys
from recovery_assets.storage import Store
from recovery_assets.study import load_study

ROOT = Path(__file__).resolve().parent.parent


def _problem(n: int = 120, p: int = 48, q: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)).astype(np.float32).astype(np.float64)
    W = (rng.normal(size=(q or p, p)) / np.sqrt(p)).astype(np.float32)
    return X, W


def _triplets(n: int, m: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, n, size=(4 * m, 3))
    t = t[(t[:, 0] != t[:, 1]) & (t[:, 1] != t[:, 2]) & (t[:, 0] != t[:, 2])]
    return t[:m]


def _job_checksums(job: list[dict]) -> list[tuple[str, str]]:
    return [
        (array_sha256(f[s]["triplets"], "<i8"), array_sha256(f[s]["answers"], "i1"))
        for f in job
        for s in ("train", "val", "test")
    ]


# --------------------------------------------------------------------------------------------
# Reproducible answers
# --------------------------------------------------------------------------------------------


def test_fast_logits_are_within_the_bound_of_the_reference():
    X, W = _problem()
    g = GeneratorLogits(X, W)
    t = _triplets(X.shape[0], 5000)
    fast, ref = g(t), g.reference(t)
    assert np.all(np.abs(fast - ref).max(axis=1) <= g.tolerance(t))
    # the reference really is the fixed-order sum: one entry by hand, in Python floats
    i, j = int(t[0, 1]), int(t[0, 2])
    Wd = W.astype(np.float64)
    zi = [sum_(X[i, d] * Wd[r, d] for d in range(X.shape[1])) for r in range(W.shape[0])]
    zj = [sum_(X[j, d] * Wd[r, d] for d in range(X.shape[1])) for r in range(W.shape[0])]
    assert ref[0, 0] == sum_(a * b for a, b in zip(zi, zj, strict=True))
    # the old logits (BLAS Z, einsum rows) agree with the reference to the bound as well
    old = triplet_logits(X @ Wd.T, t)
    assert np.all(np.abs(old - ref).max(axis=1) <= g.tolerance(t))


def sum_(values) -> float:
    """Sequential float64 sum from 0 in the given order (Python floats are IEEE doubles)."""
    acc = 0.0
    for v in values:
        acc = acc + float(v)
    return acc


def test_answers_do_not_depend_on_how_z_was_computed():
    X, W = _problem(n=150, p=64, q=40)
    Wd = W.astype(np.float64)
    orders = {
        "X @ W.T": X @ Wd.T,
        "(W @ X.T).T": (Wd @ X.T).T,
        "row chunks": np.concatenate([X[i : i + 7] @ Wd.T for i in range(0, X.shape[0], 7)]),
        "einsum": np.einsum("np,qp->nq", X, Wd, optimize=False),
        "reversed p": X[:, ::-1] @ Wd[:, ::-1].T,
        "float64 reference": None,
    }
    t = _triplets(X.shape[0], 20_000)
    T = float(np.std(GeneratorLogits(X, W)(t)))
    answers = {}
    for name, Z in orders.items():
        g = GeneratorLogits(X, W, Z=Z)
        answers[name] = draw_answers(t, g, T, seed=3, chunk=4096)[0]
    first = answers["X @ W.T"]
    for name, a in answers.items():
        assert np.array_equal(a, first), name
    # ... and they are the answers of the old code (BLAS Z, einsum rows, sample_answers)
    assert np.array_equal(first, sample_answers(triplet_logits(X @ Wd.T, t), T, 3))


class _Noisy(GeneratorLogits):
    """Fast logits off by up to 0.1 from the reference, with a tolerance that says so."""

    def __call__(self, triplets):
        ref = self.reference(triplets)
        noise = np.random.default_rng(len(triplets)).uniform(-0.1, 0.1, size=ref.shape)
        return ref + noise

    def tolerance(self, triplets):
        return np.full(len(triplets), 0.1)


def test_rows_near_a_boundary_are_decided_by_the_reference():
    X, W = _problem(n=80, p=16)
    t = _triplets(X.shape[0], 4000)
    g = _Noisy(X, W)
    ref = g.reference(t)
    T = float(np.std(ref))
    u = np.random.default_rng(11).random(len(t))
    want = _reference_answers(ref, T, u)
    got, stats = draw_answers(t, g, T, seed=11, chunk=500)
    assert np.array_equal(got, want)
    assert 0 < stats.n_exact < len(t)
    # without the certification the noisy logits would have changed answers
    plain = draw_answers(t, lambda rows: g(rows), T, seed=11, chunk=500)[0]
    assert not np.array_equal(plain, want)
    # the reference answers equal numpy's softmax sampling on the same logits
    assert np.array_equal(want, sample_answers(ref, T, 11))


def test_reference_exp_is_accurate():
    x = np.concatenate([-np.logspace(-12, np.log10(700), 50_000), [0.0, -745.5, -1000.0, -1e9]])
    e = _reference_exp(x)
    ok = x > -700
    assert np.max(np.abs(e[ok] / np.exp(x[ok]) - 1)) < 1e-15
    assert e[x == 0.0][0] == 1.0 and e[-1] == 0.0 and e[-2] == 0.0


def test_chunked_answers_equal_unchunked():
    X, W = _problem()
    g = GeneratorLogits(X, W)
    t = _triplets(X.shape[0], 30_000)
    whole = g(t)
    assert np.array_equal(np.concatenate([g(t[i : i + 999]) for i in range(0, len(t), 999)]), whole)
    T = float(np.std(whole))
    runs = [draw_answers(t, g, T, seed=5, chunk=c) for c in (1, 7, 4096, 1 << 18)]
    for a, stats in runs[1:]:
        assert np.array_equal(a, runs[0][0])
        assert stats.hits == runs[0][1].hits and stats.n == len(t)
        assert stats.expected == pytest.approx(runs[0][1].expected, rel=1e-12)
    # a plain logits function: chunked draw_answers = one sample_answers call on all rows
    plain = draw_answers(t, lambda rows: triplet_logits(X, rows), 2.0, seed=9, chunk=1000)[0]
    assert np.array_equal(plain, sample_answers(triplet_logits(X, t), 2.0, 9))
    # and the job's folds come out the same whatever the chunk
    a = synthetic_job(X.shape[0], 3000, 0, g, T, generator="g", chunk=128)
    b = synthetic_job(X.shape[0], 3000, 0, g, T, generator="g")
    assert _job_checksums(a) == _job_checksums(b)


_THREADS_SCRIPT = """
import json, sys
import numpy as np
from recovery_assets.core.simulation import GeneratorLogits, array_sha256, iter_synthetic_job
rng = np.random.default_rng(0)
X = rng.normal(size=(400, 256))
W = (rng.normal(size=(256, 256)) / 16).astype(np.float32)
g = GeneratorLogits(X, W)
human = rng.integers(0, 400, size=(20_000, 3))
human = human[(human[:, 0] != human[:, 1]) & (human[:, 1] != human[:, 2])
              & (human[:, 0] != human[:, 2])]
keys = np.sort((np.sort(human, 1) * [400 * 400, 400, 1]).sum(1))
out = []
for fold in iter_synthetic_job(400, 40_000, 1, g, 3.0, keys, generator="g", chunk=1 << 14):
    for s in ("train", "val", "test"):
        out.append([array_sha256(fold[s]["triplets"], "<i8"), array_sha256(fold[s]["answers"])])
if len(sys.argv) > 1:  # the tiny study's job, through the pipeline
    from recovery_assets import pipeline
    from recovery_assets.storage import Store
    from recovery_assets.study import load_study
    study = load_study(sys.argv[1])
    sims = pipeline.load_synthetic(study, Store(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    for fold in sims[1]:
        out.append([array_sha256(fold[s]["answers"]) for s in ("train", "val", "test")])
print(json.dumps(out))
"""


def _run_with_threads(threads: int, *args: str) -> list:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    out = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_answers_identical_with_1_and_2_threads(tiny_run):
    study = load_study(tiny_run.study_path)
    m, n = study.model_names[2], study.sizes[1]
    args = (str(tiny_run.study_path), str(tiny_run.data), m, str(n))
    one, two = _run_with_threads(1, *args), _run_with_threads(2, *args)
    assert one == two
    # the tiny job's answers also equal the recorded ones
    table = Store(tiny_run.data).read_table("synthetic_datasets", {"model": m, "n_train": n})
    recorded = table[table["simulation"] == 1].sort_values(["fold", "split"], key=_split_order)
    got = [sha for row in one[-3:] for sha in row]
    assert got == recorded["answers_sha256"].tolist()


def _split_order(col):
    return col.map({"train": 0, "val": 1, "test": 2}) if col.name == "split" else col


# --------------------------------------------------------------------------------------------
# The tiny study's recipes
# --------------------------------------------------------------------------------------------


def test_stored_recipe_is_small_and_holds_no_rows(tiny_run):
    study = load_study(tiny_run.study_path)
    store = Store(tiny_run.data)
    files = sorted((tiny_run.data / "synthetic").rglob("*.npz"))
    assert len(files) == len(study.models) * len(study.sizes)
    n_concepts = len(store.read_table("stimuli"))
    for path in files:
        assert path.stat().st_size < 64 * 1024, path
        arrays, meta = store.load_arrays(path, "recipe")
        assert meta["format"] == pipeline.RECIPE_FORMAT
        for key, a in arrays.items():
            assert not re.fullmatch(r"s\d+_f\d+_\w+_(triplets|answers)", key), key  # old rows
            assert a.ndim == 1 and a.size <= max(n_concepts, study.simulations * 9), key
    total = sum(p.stat().st_size for p in files)
    assert total < 1 << 20


def test_regeneration_gives_the_recorded_rows(tiny_run):
    study = load_study(tiny_run.study_path)
    store = Store(tiny_run.data)
    m, n = study.model_names[0], study.sizes[0]
    table = store.read_table("synthetic_datasets", {"model": m, "n_train": n})
    assert {"triplets_sha256", "answers_sha256", "self_agreement", "expected_agreement"} <= set(
        table.columns
    )
    assert len(table) == study.simulations * 3 * 3
    sims = pipeline.load_synthetic(study, store, m, n)
    assert len(sims) == study.simulations
    recorded = table.set_index(["simulation", "fold", "split"])
    # the old generation (BLAS Z, einsum logits, sample_answers) gives the same answers
    X = features_for(study.spec, pipeline.load_features(store, m).astype(np.float64))
    W, T = pipeline.load_generator(store, m)
    Z = X @ W.T.astype(np.float64)
    for s, folds in enumerate(sims):
        assert len(folds) == 3
        for fold in folds:
            for split in ("train", "val", "test"):
                t, a = fold[split]["triplets"], fold[split]["answers"]
                row = recorded.loc[(s, fold["fold"], split)]
                assert row["n_triplets"] == len(t)
                assert row["triplets_sha256"] == array_sha256(t, "<i8")
                assert row["answers_sha256"] == array_sha256(a, "i1")
                seed = job_seed(m, n, s, fold["fold"], split, "answers")
                assert np.array_equal(a, sample_answers(triplet_logits(Z, t), T, seed))
    # a batch of simulations regenerates the same rows
    (only,) = pipeline.load_synthetic(study, store, m, n, simulations=[1])
    assert _job_checksums(only) == _job_checksums(sims[1])
    # human triplets stay excluded
    rows, _ = pipeline.load_human(store)
    human = np.concatenate([triplet_keys(r, X.shape[0]) for r in rows.values()])
    drawn = np.concatenate([f[c]["triplets"] for f in sims[0] for c in ("train", "val", "test")])
    assert not np.isin(triplet_keys(drawn, X.shape[0]), human).any()


@pytest.fixture
def tiny_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny study's data folder (tests here tamper with it)."""
    target = tmp_path / "tiny"
    shutil.copytree(tiny_run.data, target)
    return target


def test_changed_generator_probe_fails_clearly(tiny_run, tiny_copy):
    study = load_study(tiny_run.study_path)
    store = Store(tiny_copy)
    m, n = study.model_names[1], study.sizes[0]
    arrays, meta = store.load_arrays(store.generator_path(m), "probe")
    arrays["W"] = arrays["W"].copy()
    arrays["W"][0, 0] += np.float32(1e-3)
    store.save_arrays(store.generator_path(m), arrays, meta)
    with pytest.raises(pipeline.SyntheticDataMismatch) as err:
        pipeline.load_synthetic(study, store, m, n)
    msg = str(err.value)
    assert f"synthetic_datasets[{m}|{n}]" in msg and "generator_W_sha256" in msg
    assert f"re-materialize synthetic_datasets for partition {m}|{n}" in msg
    # re-materializing the recipe (build_synthetic) makes it consistent again
    pipeline.build_synthetic(study, store, m, n, log=lambda s: None)
    assert len(pipeline.load_synthetic(study, store, m, n)) == study.simulations


def test_changed_rows_fail_naming_simulation_fold_and_split(tiny_run, tiny_copy):
    study = load_study(tiny_run.study_path)
    store = Store(tiny_copy)
    m, n = study.model_names[2], study.sizes[1]
    path = store.synthetic_path(m, n)
    arrays, meta = store.load_arrays(path, "recipe")
    hit = np.flatnonzero(
        (arrays["split_simulation"] == 1)
        & (arrays["split_fold"] == 2)
        & (arrays["split_name"] == "test")
    )
    arrays["split_answers_sha256"] = arrays["split_answers_sha256"].copy()
    arrays["split_answers_sha256"][hit] = "0" * 64
    store.save_arrays(path, arrays, meta)
    with pytest.raises(pipeline.SyntheticDataMismatch, match="simulation 1, fold 2, test split"):
        pipeline.load_synthetic(study, store, m, n)
    # an old-format file (whole arrays) is refused with the same advice
    store.save_arrays(path, {"s0_f0_train_triplets": np.zeros((n, 3), np.int64)}, {"model": m})
    with pytest.raises(pipeline.SyntheticDataMismatch, match="re-materialize synthetic_datasets"):
        pipeline.load_synthetic(study, store, m, n)


def test_iter_synthetic_job_is_synthetic_job():
    X, W = _problem(n=60, p=8)
    g = GeneratorLogits(X, W)
    a = list(iter_synthetic_job(60, 300, 2, g, 1.5, generator="x"))
    b = synthetic_job(60, 300, 2, g, 1.5, generator="x")
    assert _job_checksums(a) == _job_checksums(b)
    assert all(f["train"]["stats"].n == 300 for f in a)
