"""One simulation of one recovery job at full THINGS scale, on the CPU, to the end.

    .venv/bin/python bench/full_scale.py [--n-train 4200000] [--max-iter K] [--threads T]
        [--memory-budget GB]

n = 1,854 concepts; a THINGS-sized human set to exclude (4.2M training + 453k validation + three
test sets of 1,000 triplets x 30 answers, drawn like ``bench/things_files.py``); two candidates
(p = 1,024 and 2,048) and a generator (p = 1,024) with realistic features: power-law spectra
(singular values ~ k^-0.75), rectified, mean squared norm 4, the generator sharing most of its
variance with candidate A (p = 1,024) and less with B. The generator's W is given (a dense
perturbation of the identity) and its T calibrated to 0.673 (``calibrate_temperature``). Then the
project's own code path: ``GeneratorLogits`` and ``iter_synthetic_job`` draw and answer the three
folds (N training, N/8 validation and N/8 test triplets each; checksummed like the recipe), and
``score_candidates`` fits 2 candidates x 2 lambdas x 3 folds with the study's fitter (full W,
shrinkage, float32, within half of the available memory like ``build_scores``) and scores them.

Printed per stage: wall time and peak RSS of the process during the stage (VmHWM, reset at the
start of each stage through /proc/self/clear_refs; sampled VmRSS where that is refused). Targets:
sampling and answering all three folds within 60 s; peak RSS within 8 GB (8e9 bytes) throughout.
``--max-iter`` caps the L-BFGS iterations (a shorter run while developing, or on 2 cores where the
full fit takes long): the seconds per iteration are timed from the fitter's per-iteration reports.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))

from things_files import REPEATS, SIZES, TEST_TRIPLETS, _triplets  # noqa: E402

from recovery_assets.core.calibration import calibrate_temperature  # noqa: E402
from recovery_assets.core.generator import triplet_logits  # noqa: E402
from recovery_assets.core.probe import ProbeSpec  # noqa: E402
from recovery_assets.core.progress import Progress  # noqa: E402
from recovery_assets.core.scoring import score_candidates  # noqa: E402
from recovery_assets.core.simulation import (  # noqa: E402
    GeneratorLogits,
    array_sha256,
    iter_synthetic_job,
)
from recovery_assets.core.triplets import triplet_keys  # noqa: E402
from recovery_assets.pipeline import _memory_budget, synthetic_bytes  # noqa: E402

N_CONCEPTS = 1854
SPEC = ProbeSpec.parse("full", "shrinkage")
LAMS = [1e-4, 1e-2]
TARGET_SAMPLE_S = 60.0
TARGET_RSS = 8e9
CALIBRATION_TARGET = 0.673  # about the THINGS noise ceiling


# ---------------------------------------------------------------------------- memory per stage
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Stages:
    """Wall time and peak RSS per named stage (a stage may be entered several times: times add,
    peaks take the maximum)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, int] = {}
        self.current: str | None = None
        self.t0 = 0.0
        self.sampled = 0
        self.resettable = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:  # fallback where VmHWM cannot be reset
        while not self._stop.wait(0.05):
            self.sampled = max(self.sampled, _status_kib("VmRSS") * 1024)

    def _peak(self) -> int:
        hwm = _status_kib("VmHWM") * 1024
        return hwm if self.resettable else max(hwm if self.current is None else 0, self.sampled)

    def enter(self, name: str | None) -> None:
        now = time.perf_counter()
        if self.current is not None:
            c = self.current
            self.seconds[c] = self.seconds.get(c, 0.0) + now - self.t0
            self.peak[c] = max(self.peak.get(c, 0), self._peak())
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.resettable = False
        self.sampled = _status_kib("VmRSS") * 1024
        self.current, self.t0 = name, time.perf_counter()

    def close(self) -> None:
        self.enter(None)
        self._stop.set()
        self._thread.join()


class IterationClock(Progress):
    """The study's progress reporter, also keeping the time of every L-BFGS iteration of every
    batch (``fit_probes`` reports each iteration through ``running``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ticks: dict = {}

    def running(self, key, units, steps=0, **kwargs):
        self.ticks.setdefault(key, []).append(time.perf_counter())
        super().running(key, units, steps, **kwargs)

    def per_iteration(self) -> list[float]:
        """Seconds between consecutive iterations of a batch, over all batches."""
        return [b - a for t in self.ticks.values() for a, b in zip(t[:-1], t[1:], strict=True)]


# ---------------------------------------------------------------------------- features
def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def _rectified(latent: np.ndarray) -> np.ndarray:
    """ReLU features with a positive offset, scaled to mean squared norm 4 (float32)."""
    X = np.maximum(latent / latent.std() + 0.5, 0.0)
    X *= 2.0 / np.sqrt((X * X).sum(1).mean())
    return X.astype(np.float32)


def make_features(seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Generator (p = 1,024) and candidates A (p = 1,024) and B (p = 2,048).

    A concept code is U diag(k^-0.75) (U: n x r orthonormal). The generator's code is 85 % of
    A's code (rotated: the same similarity geometry) and 15 % its own; B's is 50 % A's (padded to
    rank 1,854) and 50 % its own. Each code is read out by a random map with orthonormal rows to
    p features, then rectified (``_rectified``)."""
    rng = np.random.default_rng(seed)
    n = N_CONCEPTS

    def code(r: int) -> np.ndarray:
        return _orthonormal(rng, n, r) * np.arange(1, r + 1) ** -0.75

    def readout(latent: np.ndarray, p: int) -> np.ndarray:
        return latent @ _orthonormal(rng, p, latent.shape[1]).T

    shared = code(1024)
    gen = np.sqrt(0.85) * shared @ _orthonormal(rng, 1024, 1024) + np.sqrt(0.15) * code(1024)
    b = np.sqrt(0.5) * np.pad(shared, ((0, 0), (0, n - 1024))) + np.sqrt(0.5) * code(n)
    return _rectified(readout(gen, 1024)), {
        "A": _rectified(readout(shared, 1024)),
        "B": _rectified(readout(b, 2048)),
    }


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=4_200_000)
    ap.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iteration cap per fit")
    ap.add_argument("--threads", type=int, default=None, help="torch and BLAS threads")
    ap.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        help="GB for rows + fitter (default: half of the available memory, like build_scores)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    N = args.n_train
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"  [{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    with threadpool_limits(threads):
        budget = args.memory_budget * 1e9 if args.memory_budget else _memory_budget(0.5)
        print(
            f"n = {N_CONCEPTS}, N = {N:,}, 2 candidates (p = 1024, 2048) x {len(LAMS)} lambdas x 3 "
            f"folds, max_iter {args.max_iter}, {threads} threads, memory budget "
            f"{budget / 1e9:.1f} GB",
            flush=True,
        )
        stages = Stages()

        stages.enter("setup")
        gen_X, features = make_features()
        rng = np.random.default_rng(1)
        W = (np.eye(1024) + 0.5 * rng.standard_normal((1024, 1024)) / np.sqrt(1024)).astype(
            np.float32
        )
        Z = gen_X.astype(np.float64) @ W.T.astype(np.float64)
        calib = _triplets(np.random.default_rng(2), 30_000)
        T = calibrate_temperature(triplet_logits(Z, calib), CALIBRATION_TARGET)
        logits = GeneratorLogits(gen_X.astype(np.float64), W)
        log(f"features, generator W and T = {T:.4g} (calibrated to {CALIBRATION_TARGET}) ready")

        stages.enter("human exclusion")
        hrng = np.random.default_rng(0)
        sets = [_triplets(hrng, m) for m in SIZES.values()]
        sets += [np.repeat(_triplets(hrng, TEST_TRIPLETS), REPEATS, 0) for _ in range(3)]
        keys = np.sort(np.concatenate([triplet_keys(t, N_CONCEPTS) for t in sets]))
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]]
        n_human = sum(len(t) for t in sets)
        del sets
        log(f"human exclusion: {n_human:,} judgements, {keys.size:,} distinct triplets")

        stages.enter("sample + answer")
        folds = []
        n_exact = 0
        for fold in iter_synthetic_job(N_CONCEPTS, N, 0, logits, T, keys, generator="G"):
            for split in ("train", "val", "test"):
                n_exact += fold[split].pop("stats").n_exact
            folds.append(fold)
            log(f"fold {fold['fold']}: sampled and answered")
        stages.enter("checksums")
        for fold in folds:
            for split in ("train", "val", "test"):
                array_sha256(fold[split]["triplets"], "<i8")
                array_sha256(fold[split]["answers"], "i1")
        rows = sum(
            f[s]["triplets"].nbytes + f[s]["answers"].nbytes
            for f in folds
            for s in ("train", "val", "test")
        )
        log(
            f"{rows / 1e9:.2f} GB of rows ({synthetic_bytes(N) / 1e9:.2f} GB estimated), "
            f"{n_exact} answers decided by the reference logits"
        )

        lines: list[str] = []

        def fit_log(msg: str) -> None:
            lines.append(msg)
            log(msg)

        clock = IterationClock(
            3 * len(features) * len(LAMS), fit_log, label="fitting candidates (full/shrinkage)"
        )
        stages.enter(None)
        table = score_candidates(
            features,
            {0: folds},
            LAMS,
            SPEC,
            generator="G",
            device="cpu",
            max_iter=args.max_iter,
            log=fit_log,
            memory_budget=None if budget is None else budget - synthetic_bytes(N),
            on_phase=stages.enter,
            progress=clock,
        )
        stages.close()

    total = time.perf_counter() - t_start
    print("\nstage                     wall (s)   peak RSS (GB)", flush=True)
    for name in ("setup", "human exclusion", "sample + answer", "checksums", "fit", "score"):
        if name in stages.seconds:
            print(f"{name:<24} {stages.seconds[name]:9.1f}   {stages.peak[name] / 1e9:10.2f}")
    print(f"{'total':<24} {total:9.1f}   {max(stages.peak.values()) / 1e9:10.2f}")
    if not stages.resettable:
        print("(VmHWM could not be reset: peaks per stage are sampled every 50 ms)")

    pattern = r"iterations \d+-\d+, ([0-9.]+) s\)"
    batch_s = [float(x) for x in re.findall(pattern, "\n".join(lines))]
    per_it = clock.per_iteration()
    its = table["iterations"]
    capped = int((~table["converged"]).sum())
    print(
        f"\nfits: {len(table)}, iterations {its.min()}-{its.max()} (mean {its.mean():.0f}), "
        f"{capped} stopped at max_iter {args.max_iter}; {len(batch_s)} batches, up to "
        f"{threads} at a time"
    )
    if per_it:
        its_total = int(its.sum())
        start = (sum(batch_s) - sum(per_it)) / max(len(batch_s), 1)
        print(
            f"fit: seconds per L-BFGS iteration of a batch ({threads} batches at once): median "
            f"{np.median(per_it):.2f}, range {min(per_it):.2f}-{max(per_it):.2f}; up to the end "
            f"of the first iteration (scale search included) {start:.1f} s per batch; "
            f"{its_total} iterations in all"
        )
        for k in (100, 300, 1000):
            est = (len(batch_s) * (start + k * np.median(per_it))) / threads
            n_b = len(batch_s)
            print(f"  at {k} iterations per fit the {n_b} batches would take ~{est / 60:.0f} min")
    mean = table.groupby(["candidate", "lam"])[["val_acc", "test_acc"]].mean()
    print(f"mean accuracy over the folds:\n{mean.round(4).to_string()}")
    score = {  # lambda* by mean validation accuracy (ties: smallest), its mean test accuracy
        c: g.loc[g["val_acc"].idxmax(), "test_acc"]
        for c, g in mean.reset_index().sort_values("lam").groupby("candidate")
    }
    print(f"winner: {max(score, key=score.get)} (the generator shares most variance with A)")

    sample_s = stages.seconds["sample + answer"]
    peak = max(stages.peak.values())
    ok_s = "met" if sample_s <= TARGET_SAMPLE_S else "NOT met"
    ok_m = "met" if peak <= TARGET_RSS else "NOT met"
    print(f"\ntarget: sample + answer 3 folds <= 60 s: {sample_s:.1f} s, {ok_s}")
    print(f"target: peak RSS <= 8 GB: {peak / 1e9:.2f} GB, {ok_m}")


if __name__ == "__main__":
    main()
