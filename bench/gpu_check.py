"""The GPU check: one command, ~5 minutes, for a machine with a CUDA device.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_check.py --device cuda --out "$OUT"

It needs only the science core's packages (torch, numpy, scipy, scikit-learn, statsmodels,
pandas), which the device image has; nothing is installed. Three parts, one JSON summary (printed
and written to OUT/gpu_check.json):

1. correctness: the same problems (every fitted family, shrinkage/Frobenius/L1) fitted on the CPU
   and on the device, with the device's dense data term and with the sparse one (SDDMM + SpMM over
   the pair pattern, used on the CPU only until this check passes). Every objective is
   re-evaluated in float64 on the CPU by ``probe_objective``; the device's must be within 1e-4 of
   the CPU's (the benchmark's tolerance), and sparse within 1e-4 of dense.
2. the data term's speed on the device: the job's fold-0 problem at p = 1,024 (11 lambdas in one
   batch) fitted with the dense and with the sparse data term, side by side.
3. the issue's benchmark on the device: ``bench/probe_speed.py --device DEV --reference-folds 1``,
   its lines copied into the summary (skipped with ``--skip-bench``).

``--small`` shrinks every problem so that the script itself can be tested on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_speed import _sync  # noqa: E402
from problems import choices, features, latent_codes, training_set  # noqa: E402

from recovery_assets.core import probe  # noqa: E402
from recovery_assets.core.probe import (  # noqa: E402
    FitProblem,
    ProbeSpec,
    fit_probes,
    probe_objective,
)

TOL = 1e-4
SPECS = [
    ("full", "shrinkage", "big"),
    ("full", "frobenius", "big"),
    ("pca:8", "shrinkage", "big"),
    ("diagonal", "shrinkage", "small"),
    ("rank:4", "shrinkage", "small"),
    ("full", "l1", "small"),
]


def _fit(problems, spec, device, sparse: bool):
    """fit_probes with the sparse data term on ``device`` forced on or off.

    Returns (fits, seconds, whether the sparse data term was used)."""
    saved = probe.SPARSE_DEVICES, probe.SPARSE_RATIO, probe._BlockPattern.of
    kind = torch.device(device).type
    used = []

    def counted(*a, **k):
        used.append(1)
        return saved[2](*a, **k)

    probe.SPARSE_DEVICES = tuple({*saved[0], kind}) if sparse else tuple(set(saved[0]) - {kind})
    probe.SPARSE_RATIO = 0 if sparse else 10**6  # nnz * ratio < n^2: always / never
    probe._BlockPattern.of = counted
    try:
        _sync(device)
        t0 = time.perf_counter()
        fits = fit_probes(problems, spec, device=device)
        _sync(device)
        return fits, time.perf_counter() - t0, bool(used)
    finally:
        probe.SPARSE_DEVICES, probe.SPARSE_RATIO, probe._BlockPattern.of = saved


def correctness(device: str, small: bool) -> list[dict]:
    n = 120 if small else 600
    sizes = {"small": 12 if small else 48, "big": 80 if small else 512}
    latent = latent_codes(n)
    # few enough triplets that the pairs are sparse (6 N < n_train^2), as in the job
    _, trip = training_set(n, 200 if small else 4000, 0)
    ans = choices(latent, trip, 0)
    lams = [1e-4, 1e-2, 1.0]
    rows = []
    for family, penalty, size in SPECS:
        spec = ProbeSpec.parse(family, penalty)
        X = features(latent, sizes[size], 7)
        problem = FitProblem(X, trip, ans, lams)
        runs = {
            "cpu": _fit([problem], spec, "cpu", sparse=False),
            "dense": _fit([problem], spec, device, sparse=False),
            "sparse": _fit([problem], spec, device, sparse=True),
        }
        obj = {
            k: [
                probe_objective(f.matrix(), X, trip, ans, lam, spec)
                for f, lam in zip(v[0][0], lams, strict=True)
            ]
            for k, v in runs.items()
        }
        dense_gap = max(d - c for d, c in zip(obj["dense"], obj["cpu"], strict=True))
        sparse_gap = max(abs(s - d) for s, d in zip(obj["sparse"], obj["dense"], strict=True))
        paths = [runs["dense"][2], runs["sparse"][2]]
        rows.append(
            dict(
                spec=f"{family}/{penalty}",
                p=sizes[size],
                device_minus_cpu=dense_gap,
                sparse_vs_dense=sparse_gap,
                sparse_used=paths,  # must be [False, True]
                ok=bool(dense_gap <= TOL and sparse_gap <= TOL and paths == [False, True]),
                seconds={k: round(v[1], 2) for k, v in runs.items()},
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def data_term_speed(device: str, small: bool) -> dict:
    n = 200 if small else 1854
    latent = latent_codes(n)
    _, trip = training_set(n, 800 if small else 6400, 1)
    X = features(latent, 64 if small else 1024, 1024)
    problem = FitProblem(X, trip, choices(latent, trip, 1), [10.0**e for e in range(-6, 5)])
    spec = ProbeSpec.parse("full", "shrinkage")
    out = {}
    for name, sparse in (("dense", False), ("sparse", True), ("dense_again", False)):
        fits, secs, used = _fit([problem], spec, device, sparse)
        its = sum(f.iterations for f in fits[0])
        out[name] = dict(seconds=round(secs, 2), iterations=its, sparse_used=used)
    print(json.dumps({"data_term_speed": out}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="folder for gpu_check.json")
    ap.add_argument("--small", action="store_true", help="tiny problems (to test the script)")
    ap.add_argument("--skip-bench", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    summary: dict = {"device": args.device, "torch": torch.__version__}
    if torch.device(args.device).type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(0)
    summary["correctness"] = correctness(args.device, args.small)
    summary["all_correct"] = all(r["ok"] for r in summary["correctness"])
    summary["data_term_speed"] = data_term_speed(args.device, args.small)
    if not args.skip_bench:
        cmd = [sys.executable, str(Path(__file__).with_name("probe_speed.py"))]
        cmd += ["--device", args.device, "--reference-folds", "1"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        summary["bench"] = dict(returncode=res.returncode, lines=res.stdout.splitlines())
        summary["bench_stderr_tail"] = res.stderr[-2000:]
        print(res.stdout, flush=True)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gpu_check.json").write_text(text)
    sys.exit(0 if summary["all_correct"] else 1)


if __name__ == "__main__":
    main()
