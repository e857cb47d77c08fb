"""Progress lines on long work and bounded memory of the candidate fits (docs/method.md §7):
the time-based reporter, its use by fit_probes / score_candidates, the memory plan, and
build_scores in groups of simulations giving the same tables as all at once."""

from __future__ import annotations

import re
import shutil
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from recovery_assets import pipeline
from recovery_assets.core.probe import FitProblem, ProbeSpec, fit_probes
from recovery_assets.core.progress import Progress, format_seconds
from recovery_assets.core.scoring import fit_plan, fitter_bytes, score_candidates
from recovery_assets.core.triplets import concept_folds, sample_unique_triplets
from recovery_assets.storage import Store
from recovery_assets.study import load_study

pytestmark = pytest.mark.usefixtures("single_thread")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_reports_at_the_interval_with_done_rate_and_eta():
    clock, lines = Clock(), []
    p = Progress(10, lines.append, every_s=30, label="fitting", clock=clock)
    clock.t += 10
    p.advance(1, steps=50)  # 10 s: not due yet
    assert lines == []
    clock.t += 20
    p.advance(1, steps=100)  # 30 s: due
    assert len(lines) == 1
    # 2 of 10 done in 30 s -> 8 more take 120 s; 150 iterations in 30 s
    assert lines[0] == ("fitting: 2/10 fits done, 5 iterations/s, 30s elapsed, ETA 2m 00s"), lines[
        0
    ]
    clock.t += 29
    p.advance(steps=10)
    assert len(lines) == 1  # 29 s after the last line
    clock.t += 1
    p.advance(steps=10)
    assert len(lines) == 2 and "2/10 fits done" in lines[1] and "1m 00s elapsed" in lines[1]
    # a running piece counts with its share: 2 done + 3 of a running batch -> 5 of 10 in 60 s
    clock.t += 30
    p.running("batch", 3.0, steps=30)
    assert lines[2].endswith("1m 30s elapsed, ETA 1m 30s"), lines[2]
    clock.t += 30
    p.advance(4, running="batch")  # the batch finished: its share is replaced by its fits
    assert "6/10 fits done" in lines[3] and lines[3].endswith("ETA 1m 20s"), lines[3]
    clock.t += 30
    p.advance(4)
    assert "10/10 fits done" in lines[4] and lines[4].endswith("ETA 0s")


def test_finished_units_of_a_running_piece_count_as_done():
    clock, lines = Clock(), []
    p = Progress(10, lines.append, every_s=0, label="fitting", clock=clock)
    clock.t += 10
    p.running("batch", 7.5, steps=5, finished=7)  # 7 of its 10 fits stopped, 3 still running
    assert lines[-1].startswith("fitting: 7/10 fits done"), lines[-1]
    p.advance(10, running="batch")  # the batch returned: its finished fits are not counted twice
    assert lines[-1].startswith("fitting: 10/10 fits done"), lines[-1]


def test_fit_probes_counts_fits_done_in_a_running_batch_and_never_goes_back():
    """One batch of both problems' 4 fits: the line counts the fits that have stopped while
    the batch runs, and the count never falls (a fit ending its symmetric phase is not done)."""
    lines = []
    fits = fit_probes(_problems(2), ProbeSpec(), log=lines.append, progress_every=0)
    done = [int(m.split(": ")[1].split("/")[0]) for m in lines if "fits done" in m]
    assert done == sorted(done), done
    iterations = sorted(f.iterations for fl in fits for f in fl)
    assert iterations[0] < iterations[-1]  # the fits stop at different iterations ...
    assert any(0 < d < 4 for d in done), done  # ... and the line shows those that did


def test_no_work_yet_means_unknown_eta_and_every_zero_reports_every_update():
    clock, lines = Clock(), []
    p = Progress(3, lines.append, every_s=0, label="regenerating", unit="simulations", clock=clock)
    p.advance()
    clock.t += 5
    p.advance()
    assert len(lines) == 2
    assert lines[1] == (
        "regenerating: 0/3 simulations done, 0 iterations/s, 5s elapsed, ETA unknown"
    )
    with pytest.raises(ValueError):
        Progress(1, None, every_s=-1)


def test_ticking_reports_during_a_call_that_cannot():
    lines = []
    p = Progress(1, lines.append, every_s=0.05, label="long call")
    with p.ticking(period_s=0.01):
        time.sleep(0.4)
    assert len(lines) >= 3, lines
    n = len(lines)
    time.sleep(0.1)
    assert len(lines) == n  # the thread stopped with the block
    assert not any(t.name == "progress" and t.is_alive() for t in threading.enumerate())


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 42.4, 187, 7500)] == ["0s", "42s", "3m 07s", "2h 05m"]


def _problems(k: int, n_trip: int = 400):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 8)).astype(np.float32)
    out = []
    for seed in range(k):
        fold = concept_folds(60, seed)[0]
        trip = sample_unique_triplets(fold.train, n_trip, seed)
        ans = rng.integers(0, 3, len(trip))
        out.append(FitProblem(X, trip, ans, [0.01, 1.0]))
    return out


def test_fit_probes_logs_progress_lines_with_every_zero():
    lines = []
    problems = _problems(2)
    fits = fit_probes(problems, ProbeSpec(), max_batch=1, log=lines.append, progress_every=0)
    progress = [m for m in lines if "fits done" in m]
    batches = [m for m in lines if m.startswith("fitted ")]
    assert len(batches) == 4  # the per-batch lines are still there
    iterations = sum(f.iterations for fl in fits for f in fl)
    assert len(progress) >= iterations  # one per L-BFGS iteration of every batch (+ prepares)
    pattern = re.compile(
        r"^fitting full/shrinkage: (\d)/4 fits done, [0-9.e+]+ iterations/s, \S+( \S+)? "
        r"elapsed, ETA (\S+( \S+)?)$"
    )
    assert all(pattern.match(m) for m in progress), progress[:3]
    assert pattern.match(progress[-1]).group(1) == "4"
    assert pattern.match(progress[-1]).group(3) == "0s"
    # default interval (30 s): no progress lines in a short fit, only the batch lines
    quiet = []
    fit_probes(problems, ProbeSpec(), max_batch=1, log=quiet.append)
    assert quiet and not any("fits done" in m for m in quiet)


def test_fit_plan_bounds_the_fitter_memory():
    cpu = torch.device("cpu")
    N = 4_200_000
    # no budget, or everything fits: one call, fit_probes' own choice of workers
    assert fit_plan(60, N, None, cpu) == (60, None)
    assert fit_plan(60, 1000, 1e9, cpu) == (60, None)
    budget = 4 * 2**30
    chunk, workers = fit_plan(60, N, budget, cpu)
    assert 1 <= chunk < 60 and workers == 1  # single_thread: one worker
    assert fitter_bytes(N, chunk, workers) <= budget < fitter_bytes(N, chunk + 1, workers)
    # a budget below one problem still fits one at a time
    assert fit_plan(60, N, 1, cpu) == (1, 1)
    # whatever N, a problem holds its basis, features and one r x r transform per lambda:
    # p = 2,048 features on all 1,854 concepts with 11 lambdas take ~190 MB, so at small N the
    # problems of a THINGS job (20 candidates x 3 folds x 30 simulations) need chunks too
    shape = dict(p=2048, n=1854, lams=11)
    assert 150e6 < fitter_bytes(1600, 1, 0, **shape) < 250e6
    chunk, _ = fit_plan(1800, 1600, 10 * 2**30, cpu, **shape)
    assert 40 < chunk < 60


def _job(sims: int = 2, n_trip: int = 300):
    rng = np.random.default_rng(3)
    feats = {
        "a": rng.standard_normal((50, 6)).astype(np.float32),
        "b": rng.standard_normal((50, 9)).astype(np.float32),
    }
    by_sim = {}
    for s in range(sims):
        folds = []
        for f, fold in enumerate(concept_folds(50, s)):
            split = {}
            for name, concepts in (
                ("train", fold.train),
                ("val", fold.val),
                ("test", fold.test),
            ):
                t = sample_unique_triplets(concepts, n_trip if name == "train" else 40, 10 * s + f)
                split[name] = {"triplets": t, "answers": rng.integers(0, 3, len(t))}
            folds.append({"fold": f, **split})
        by_sim[s] = folds
    return feats, by_sim


def test_score_candidates_in_memory_chunks_equals_one_call():
    feats, by_sim = _job()
    spec = ProbeSpec()
    # float64: the batches of one call stack problems of other sizes (padding), which moves
    # float32 fits by their convergence tolerance
    one = score_candidates(feats, by_sim, [0.01, 1.0], spec, max_iter=200, dtype=torch.float64)
    phases, lines = [], []
    chunked = score_candidates(
        feats,
        by_sim,
        [0.01, 1.0],
        spec,
        max_iter=200,
        dtype=torch.float64,
        memory_budget=1,  # below one problem: one at a time
        on_phase=phases.append,
        log=lines.append,
    )
    assert phases == ["fit", "score"] * 12  # 2 simulations x 3 folds x 2 candidates
    assert any("in chunks of 1" in m for m in lines)
    key = ["simulation", "candidate", "lam", "fold"]
    a = one.sort_values(key).reset_index(drop=True)
    b = chunked.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key], b[key])
    pd.testing.assert_frame_equal(a[["val_acc", "test_acc"]], b[["val_acc", "test_acc"]])
    for col in ("objective", "val_nll", "test_nll"):
        np.testing.assert_allclose(a[col], b[col], rtol=1e-7, atol=1e-9)


def test_score_groups_bound_the_regenerated_rows():
    N = 4_200_000
    per_sim = pipeline.synthetic_bytes(N)
    assert 390e6 < per_sim < 400e6  # ~94 bytes per training triplet over 3 folds
    groups = pipeline.score_groups(30, N, 10 * 2**30)
    assert [s for g in groups for s in g] == list(range(30))
    assert max(len(g) for g in groups) * per_sim <= 5 * 2**30
    assert len(groups[0]) == 13
    assert pipeline.score_groups(30, N, 1) == [[s] for s in range(30)]
    assert pipeline.score_groups(30, 100, None) == [list(range(30))]
    assert pipeline.score_groups(30, 100, 10 * 2**30) == [list(range(30))]


def test_build_scores_in_groups_of_one_simulation_equals_all_at_once(tiny_run, tmp_path):
    """The tiny study's candidate fits with one simulation per group equal those of the whole
    job in one group (the default at small N: what the study materialized)."""
    study = load_study(tiny_run.study_path)
    data = tmp_path / "tiny"
    shutil.copytree(tiny_run.data, data)
    store = Store(data)
    model, n = study.model_names[0], study.sizes[-1]
    part = {"model": model, "n_train": n}
    materialized = store.read_table("candidate_fits", part)
    lines = []
    pipeline.build_scores(study, store, model, n, "cpu", lines.append)
    whole = store.read_table("candidate_fits", part)
    pd.testing.assert_frame_equal(whole, materialized)
    assert "in 1 group(s)" in lines[0]

    lines = []
    pipeline.build_scores(
        study, store, model, n, "cpu", lines.append, group_size=1, progress_every=0
    )
    grouped = store.read_table("candidate_fits", part)
    assert f"in {study.simulations} group(s) of at most 1 simulation(s)" in lines[0]
    assert any("regenerating synthetic data: 1/2 simulations done" in m for m in lines)
    assert any("fitting candidates (full/shrinkage):" in m and "ETA" in m for m in lines)
    pd.testing.assert_frame_equal(grouped, whole)
