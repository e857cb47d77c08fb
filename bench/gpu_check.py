"""The GPU check: one command, ~5 minutes, for a machine with a CUDA device.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_check.py --device cuda --out "$OUT"

It needs only the science core's packages (torch, numpy, scipy, scikit-learn, statsmodels,
pandas), which the device image has; nothing is installed. Three parts, one JSON summary (printed
and written to OUT/gpu_check.json):

1. correctness: the same problems (every fitted family, shrinkage/Frobenius/L1) fitted on the CPU
   and on the device, with the device's dense data term and with the sparse one (SDDMM + SpMM over
   the pair pattern, used on the CPU only until this check passes), and by an independent plain
   reference (``reference_fit``: the unreduced float64 objective of docs/method.md §4 written out
   here, minimised from the family's identity by torch's L-BFGS, or by a plain FISTA for L1, on
   ``--reference-device``). Every objective is re-evaluated in float64 by the plain formula written
   here (``plain_objective``), which must agree with the library's ``probe_objective``; the
   device's must be within 1e-4 of the CPU fitter's and of the reference's (the benchmark's
   tolerance; a fit may be better than the reference, not worse), and sparse within 1e-4 of dense.
   With ``--device cpu`` the device and the CPU fitter are the same code, so the reference is then
   what can fail.
2. the data term's speed on the device: the job's fold-0 problem at p = 1,024 (11 lambdas in one
   batch) fitted with the dense and with the sparse data term, side by side.
3. the issue's benchmark on the device: ``bench/probe_speed.py --device DEV --reference-folds 1``,
   its lines copied into the summary (skipped with ``--skip-bench``).

``--small`` shrinks every problem so that the script itself can be tested on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_speed import _sync  # noqa: E402
from problems import choices, features, latent_codes, training_set  # noqa: E402

from recovery_assets.core import probe  # noqa: E402
from recovery_assets.core.probe import (  # noqa: E402
    FitProblem,
    ProbeSpec,
    fit_probes,
    pca_axes,
    probe_objective,
)

TOL = 1e-4
EVAL_TOL = 1e-9  # the library's float64 objective against the plain one written here
SPECS = [
    ("full", "shrinkage", "big"),
    ("full", "frobenius", "big"),
    ("pca:8", "shrinkage", "big"),
    ("diagonal", "shrinkage", "small"),
    ("rank:4", "shrinkage", "small"),
    ("full", "l1", "small"),
]


def _probe_modules() -> list:
    """Where the fitter's modules live: the probe module itself or, once it is a package, its
    submodules (the sparse path's settings are read, and must be set, where they are defined)."""
    if not hasattr(probe, "__path__"):
        return [probe]
    return [
        importlib.import_module(f"{probe.__name__}.{info.name}")
        for info in pkgutil.iter_modules(probe.__path__)
    ]


def _fit(problems, spec, device, sparse: bool):
    """fit_probes with the sparse data term on ``device`` forced on or off.

    Returns (fits, seconds, whether the sparse data term was used)."""
    mods = _probe_modules()
    saved = [
        (m, m.SPARSE_DEVICES, m.SPARSE_RATIO, m.SAMPLE_RATIO)
        for m in mods
        if "SPARSE_DEVICES" in vars(m)
    ]
    block = next(vars(m)["_BlockPattern"] for m in mods if "_BlockPattern" in vars(m))
    of = block.__dict__["of"]  # the classmethod object, restored as it was
    kind = torch.device(device).type
    used = []

    def counted(cls, *a, **k):
        used.append(1)
        return of.__func__(cls, *a, **k)

    for m, devices, _, _ in saved:
        m.SPARSE_DEVICES = tuple({*devices, kind}) if sparse else tuple(set(devices) - {kind})
        m.SPARSE_RATIO = m.SAMPLE_RATIO = 0 if sparse else 10**6  # always / never sparse
    block.of = classmethod(counted)
    try:
        _sync(device)
        t0 = time.perf_counter()
        fits = fit_probes(problems, spec, device=device)
        _sync(device)
        return fits, time.perf_counter() - t0, bool(used)
    finally:
        for m, devices, ratio, sample in saved:
            m.SPARSE_DEVICES, m.SPARSE_RATIO, m.SAMPLE_RATIO = devices, ratio, sample
        block.of = of


def plain_axes(X: np.ndarray, k: int) -> np.ndarray:
    """The k leading principal axes (p x k) of the centred features by numpy's SVD, with the
    library's column signs (a convention: the penalty of pca:k depends on it; the axes do not)."""
    X64 = np.asarray(X, dtype=np.float64)
    P = np.linalg.svd(X64 - X64.mean(0), full_matrices=False)[2][:k].T
    dots = (P * pca_axes(torch.as_tensor(X64), k).numpy()).sum(0)
    if not np.allclose(np.abs(dots), 1.0, atol=1e-8):
        raise AssertionError(f"pca_axes are not the principal axes: |cosines| {np.abs(dots)}")
    return P * np.sign(dots)


def plain_objective(W, X, trip, ans, lam: float, spec: ProbeSpec, P=None) -> float:
    """docs/method.md §4's objective of a full transform W (Z = X W^T; pca:k: of the centred X,
    penalty on W P), written out in float64 numpy: mean cross-entropy + lambda R."""
    X = np.asarray(X, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    if spec.family == "pca":
        X = X - X.mean(0, keepdims=True)
    Z = X @ W.T
    i, j, k = np.asarray(trip).T
    L = np.stack([(Z[j] * Z[k]).sum(1), (Z[i] * Z[k]).sum(1), (Z[i] * Z[j]).sum(1)], 1)
    top = L.max(1)
    lse = top + np.log(np.exp(L - top[:, None]).sum(1))
    ce = float(np.mean(lse - L[np.arange(len(L)), np.asarray(ans)]))
    if spec.family == "diagonal":
        M = np.diag(W)
        dev = M - M.mean()
    elif spec.family == "rank":
        M, G = W, W.T @ W
        dev = G - np.trace(G) / G.shape[0] * np.eye(G.shape[0])
    else:
        M = W @ P if spec.family == "pca" else W
        dev = M - np.trace(M) / M.shape[0] * np.eye(M.shape[0])
    R = {"l1": np.abs(M).sum(), "frobenius": (M * M).sum(), "shrinkage": (dev * dev).sum()}
    return ce + lam * float(R[spec.penalty])


def _fista_l1(data, theta0: torch.Tensor, lam: float, max_iter: int = 50_000) -> torch.Tensor:
    """min data(theta) + lam |theta|_1: plain FISTA, backtracking step, restart on an increase."""
    x, y, tk, step = theta0.clone(), theta0.clone(), 1.0, 1.0
    fx = float(data(x)) + lam * float(x.abs().sum())
    for it in range(max_iter):
        yy = y.clone().requires_grad_(True)
        f = data(yy)
        (g,) = torch.autograd.grad(f, yy)
        f = float(f.detach())
        while True:
            z = y - step * g
            z = torch.sign(z) * torch.clamp(z.abs() - step * lam, min=0.0)
            d = z - y
            fz = float(data(z))
            if fz <= f + float((g * d).sum()) + float((d * d).sum()) / (2 * step) + 1e-15:
                break
            step /= 2
        Fz = fz + lam * float(z.abs().sum())
        if Fz > fx:  # momentum overshot: restart from x
            y, tk = x.clone(), 1.0
            continue
        tn = (1 + math.sqrt(1 + 4 * tk * tk)) / 2
        y = z + (tk - 1) / tn * (z - x)
        x, tk = z, tn
        done = it > 10 and abs(fx - Fz) <= 1e-14 * max(1.0, abs(Fz))
        fx, step = Fz, step * 1.2
        if done:
            break
    return x


def reference_fit(X, trip, ans, lam: float, spec: ProbeSpec, P=None, device="cpu") -> np.ndarray:
    """The plain reference fit of docs/method.md §4: the unreduced float64 objective, from the
    family's identity (full I, diagonal 1, rank:k eye(k, p), pca:k I on the scores (X - mean) P),
    minimised by torch's strong-Wolfe L-BFGS (smooth penalties) or by plain FISTA (L1); no
    reduction, no preconditioning, no scale search. Returns the full transform W (float64)."""
    dt = torch.float64
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64), device=device)
    if spec.family == "pca":
        Xt = (Xt - Xt.mean(0, keepdim=True)) @ torch.as_tensor(P, dtype=dt, device=device)
    T = torch.as_tensor(np.asarray(trip), dtype=torch.long, device=device)
    a = torch.as_tensor(np.asarray(ans), dtype=torch.long, device=device)
    used, local = torch.unique(T.reshape(-1), return_inverse=True)  # unused concepts add nothing
    Xt = Xt[used]
    i, j, k = local.reshape(-1, 3).unbind(1)
    q = Xt.shape[1]
    if spec.family == "diagonal":
        theta0 = torch.ones(q, dtype=dt, device=device)
    elif spec.family == "rank":
        theta0 = torch.eye(spec.k, q, dtype=dt, device=device)
    else:
        theta0 = torch.eye(q, dtype=dt, device=device)

    def data(theta):
        Z = Xt * theta if spec.family == "diagonal" else Xt @ theta.T
        S = Z @ Z.T
        logits = torch.stack([S[j, k], S[i, k], S[i, j]], 1)
        return torch.nn.functional.cross_entropy(logits, a)

    def penalty(theta):
        if spec.penalty == "frobenius":
            return (theta * theta).sum()
        if spec.family == "diagonal":
            return ((theta - theta.mean()) ** 2).sum()
        M = theta.T @ theta if spec.family == "rank" else theta
        E = M - torch.trace(M) / M.shape[0] * torch.eye(M.shape[0], dtype=dt, device=device)
        return (E * E).sum()

    if spec.penalty == "l1":
        theta = _fista_l1(data, theta0, lam)
    else:
        theta = theta0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [theta],
            lr=1,
            max_iter=500,
            max_eval=1250,
            tolerance_grad=1e-12,
            tolerance_change=1e-13,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            f = data(theta) + lam * penalty(theta)
            f.backward()
            return f

        prev = math.inf
        for _ in range(40):
            opt.step(closure)
            with torch.no_grad():
                cur = float(data(theta) + lam * penalty(theta))
            if abs(prev - cur) <= 1e-11 * max(1.0, abs(cur)):
                break
            prev = cur
        theta = theta.detach()
    if spec.family == "diagonal":
        W = torch.diag(theta)
    elif spec.family == "pca":
        W = theta @ torch.as_tensor(P, dtype=dt, device=device).T
    else:
        W = theta
    return W.cpu().numpy()


def correctness(
    device: str, small: bool, specs=SPECS, reference_device: str | None = None
) -> list[dict]:
    n = 120 if small else 600
    sizes = {"small": 12 if small else 48, "big": 80 if small else 512}
    latent = latent_codes(n)
    # few enough triplets that the pairs are sparse (6 N < n_train^2), as in the job
    _, trip = training_set(n, 200 if small else 4000, 0)
    ans = choices(latent, trip, 0)
    lams = [1e-4, 1e-2, 1.0]
    rows = []
    for family, penalty, size in specs:
        spec = ProbeSpec.parse(family, penalty)
        X = features(latent, sizes[size], 7)
        P = plain_axes(X, spec.k) if spec.family == "pca" else None
        problem = FitProblem(X, trip, ans, lams)
        runs = {
            "cpu": _fit([problem], spec, "cpu", sparse=False),
            "dense": _fit([problem], spec, device, sparse=False),
            "sparse": _fit([problem], spec, device, sparse=True),
        }
        Ws = {k: [f.matrix() for f in v[0][0]] for k, v in runs.items()}
        t0 = time.perf_counter()
        ref_dev = reference_device or device
        Ws["reference"] = [reference_fit(X, trip, ans, lam, spec, P, ref_dev) for lam in lams]
        ref_seconds = time.perf_counter() - t0
        obj = {
            k: [
                plain_objective(W, X, trip, ans, lam, spec, P)
                for W, lam in zip(v, lams, strict=True)
            ]
            for k, v in Ws.items()
        }
        eval_gap = max(
            abs(probe_objective(W, X, trip, ans, lam, spec) - f)
            for W, lam, f in zip(Ws["dense"], lams, obj["dense"], strict=True)
        )
        dense_gap = max(d - c for d, c in zip(obj["dense"], obj["cpu"], strict=True))
        ref_gap = max(d - r for d, r in zip(obj["dense"], obj["reference"], strict=True))
        sparse_gap = max(abs(s - d) for s, d in zip(obj["sparse"], obj["dense"], strict=True))
        paths = [runs["dense"][2], runs["sparse"][2]]
        ok = dense_gap <= TOL and ref_gap <= TOL and sparse_gap <= TOL and eval_gap <= EVAL_TOL
        rows.append(
            dict(
                spec=f"{family}/{penalty}",
                p=sizes[size],
                objectives={k: [round(f, 9) for f in v] for k, v in obj.items()},
                device_minus_cpu=dense_gap,
                device_minus_reference=ref_gap,
                sparse_vs_dense=sparse_gap,
                evaluator_gap=eval_gap,
                sparse_used=paths,  # must be [False, True]
                ok=bool(ok and paths == [False, True]),
                seconds={
                    **{k: round(v[1], 2) for k, v in runs.items()},
                    "reference": round(ref_seconds, 2),
                },
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
    ap.add_argument(
        "--reference-device",
        default=None,
        help="where the plain float64 reference fits run (default: --device)",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    summary: dict = {"device": args.device, "torch": torch.__version__}
    if torch.device(args.device).type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(0)
    summary["correctness"] = correctness(
        args.device, args.small, reference_device=args.reference_device
    )
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
