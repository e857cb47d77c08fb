"""Batched fitting: ``fit_probes``, the public entry point (docs/exact-fit.md, "The optimiser",
"Batches"; docs/method.md §4, "Fitting").

Every problem (``FitProblem``: features, training triplets, lambdas) is prepared once
(``_prepare``: PCA scores, the reduction of ``reduction._reduce``), then problems x lambdas are
packed into batches that advance together in one optimiser (``objective._fit_context``): problems
of different size are stacked with padding and masking (``_merge``), a batch that runs out of
device memory is fitted again in halves (``_halves``), and on the CPU the batches run concurrently
on worker threads (``_run_batches``; docs/exact-fit.md, "CPU specifics", "Concurrent batches"),
as many as ``_available_memory`` allows.

CPU_BATCH_FLOPS is read at call time from this module; ``_fit_context`` and
``_available_memory`` are looked up here at call time too (tests replace them on
``batching``, not on the package).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import torch

from recovery_assets.core import optim
from recovery_assets.core.probe.data_term import answer_first, pair_index
from recovery_assets.core.probe.fitted import FittedProbe
from recovery_assets.core.probe.objective import _fit_context, _iteration_cap
from recovery_assets.core.probe.reduction import _reduce, _uses_reduction, pca_axes
from recovery_assets.core.probe.spec import ProbeSpec, _as_tensor, resolve_device
from recovery_assets.core.progress import Progress

CPU_BATCH_FLOPS = 4e8  # target work of one stacked evaluation on the CPU


@dataclass
class FitProblem:
    """One fitting context: a model's features (all n concepts) and a set of training triplets,
    to be fitted at every lambda of ``lams``."""

    features: np.ndarray | torch.Tensor
    triplets: np.ndarray | torch.Tensor  # (N, 3) global concept indices
    answers: np.ndarray | torch.Tensor  # (N,) position of the odd one out
    lams: Sequence[float]


@dataclass
class _Context:
    """Problems prepared for the optimiser: features restricted to the training concepts.

    A context holds G groups stacked along a leading dimension (G = 1 for one problem): each group
    is one problem's training features in its fitting coordinates (zero rows pad the concept count
    to a common n) and its triplets (zero-weight rows pad the triplet count to a common N).
    """

    X: torch.Tensor  # (G, n, q) training concepts' features in the fitting coordinates
    trip: torch.Tensor  # (G, N, 3) triplets in local concept indices, the chosen odd one first
    pidx: torch.Tensor  # (G, N, 3) pair indices into n x n
    w: torch.Tensor  # (G, N) triplet weights: 1/N_g for real triplets, 0 for padding
    V: list  # per group: reduced basis (p x r), or None when fitted in own coordinates
    P: list  # per group: PCA axes or None
    mu: list  # per group: the features' mean (1 x p) that pca:k subtracts, or None
    p: list  # per group: the raw embedding dimension
    r: list  # per group: the fitting dimension before padding (= X.shape[2] unless merged)
    lead: int | None = None  # one group only: X is lower-trapezoidal after this many columns


def _prepare(problem: FitProblem, spec: ProbeSpec, device, dtype, reduce: bool) -> _Context:
    X = _as_tensor(problem.features, torch.float64, device)
    trip = torch.as_tensor(np.asarray(problem.triplets), dtype=torch.long, device=device)
    ans = torch.as_tensor(np.asarray(problem.answers), dtype=torch.long, device=device)
    p = X.shape[1]
    P = mu = None
    if spec.family == "pca":  # centred principal-component scores, over all n concepts
        mu = X.mean(0, keepdim=True)
        P = pca_axes(X, spec.k)
        X = (X - mu) @ P
    concepts, local = torch.unique(trip.reshape(-1), return_inverse=True)
    local = answer_first(local.reshape(-1, 3), ans)  # the answer's logit is the first
    Xt = X[concepts]
    V = None
    lead = None
    r = Xt.shape[1]
    if reduce:  # the reduced coordinates, tail-triangular and padded where that pays
        V, Xt, lead, r = _reduce(Xt, device)
    n_t = Xt.shape[0]
    N = ans.shape[0]
    return _Context(
        X=Xt.to(dtype).unsqueeze(0),
        trip=local.unsqueeze(0),
        pidx=pair_index(local, n_t).unsqueeze(0),
        w=torch.full((1, N), 1.0 / N, dtype=dtype, device=device),
        V=[V],
        P=[P],
        mu=[mu],
        p=[p],
        r=[r],
        lead=lead,
    )


def _merge(contexts: list[_Context]) -> _Context:
    """Stack single-problem contexts into one, padding n (zero rows: concepts in no triplet), N
    (zero-weight triplets) and, for reduced problems, the coordinates q (zero columns: the
    objective masks them so their block of A stays exactly zero)."""
    if len(contexts) == 1:
        return contexts[0]
    n = max(c.X.shape[1] for c in contexts)
    N = max(c.w.shape[1] for c in contexts)
    q = max(c.X.shape[2] for c in contexts)
    if any(c.X.shape[2] != q for c in contexts) and contexts[0].V[0] is None:
        raise ValueError("only reduced problems can be padded to a common dimension")
    Xs, trips, ws = [], [], []
    for c in contexts:
        nc, Nc, qc = c.X.shape[1], c.w.shape[1], c.X.shape[2]
        Xs.append(torch.nn.functional.pad(c.X[0], (0, q - qc, 0, n - nc)))
        trip = torch.nn.functional.pad(c.trip[0], (0, 0, 0, N - Nc))
        trip[Nc:] = torch.tensor([0, 1, 2], device=trip.device)  # weight-0 padding rows
        trips.append(trip)
        ws.append(torch.nn.functional.pad(c.w[0], (0, N - Nc)))
    trip = torch.stack(trips)
    return _Context(
        X=torch.stack(Xs),
        trip=trip,
        pidx=pair_index(trip, n),
        w=torch.stack(ws),
        V=[v for c in contexts for v in c.V],
        P=[q for c in contexts for q in c.P],
        mu=[m for c in contexts for m in c.mu],
        p=[q for c in contexts for q in c.p],
        r=[r for c in contexts for r in c.r],
    )


def fit_probes(
    problems: Sequence[FitProblem],
    spec: ProbeSpec,
    *,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    max_iter: int = 1000,
    rel_tol: float = 1e-7,
    history: int = optim.HISTORY,
    stop: str = "optimum",
    max_batch: int | None = None,
    memory_budget: float = 0.5,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
    progress_every: float = 30.0,
    progress: Progress | None = None,
) -> list[list[FittedProbe]]:
    """Fit every problem at every one of its lambdas, from the identity; returns fits[problem][lam].

    Problems x lambdas advance together in batches: one optimiser, one batched objective, no
    per-problem Python loop inside an iteration. All lambdas of one problem share its features and
    triplets (broadcast, not copied). Problems whose fitting dimension agrees (after the reduction,
    every candidate with p >= r has the same r x r shape) are stacked into the same batch, up to
    ``max_batch`` fits (default: unlimited on a GPU within ``memory_budget`` of its free memory;
    on the CPU, small problems until one evaluation is about ``CPU_BATCH_FLOPS``). Batches run
    concurrently on ``workers`` threads (``_run_batches``; default on the CPU: one per torch
    intra-op thread, no more than fit in ``memory_budget`` of the available memory; on a GPU:
    1, one batch after another). A batch that runs out of device memory
    (``torch.OutOfMemoryError``) is fitted again as two halves, and the later batches are cut to
    that size before they start; one fit that does not fit raises.

    ``stop``: the stopping rule, ``optimum`` (the relative change ``rel_tol``) or ``paper`` (the
    published fits' L-BFGS settings; :mod:`~recovery_assets.core.optim`, docs/method.md §4).

    ``log`` gets one line per finished batch and, at most every ``progress_every`` seconds while
    batches run, a progress line (fits done of all, iterations per second, estimated time left;
    :class:`~recovery_assets.core.progress.Progress`). A caller fitting in several calls passes
    its own ``progress`` (whose total covers them all): the fits are counted into it instead.
    """
    device = resolve_device(device)
    reduce = _uses_reduction(spec)
    paper = optim.stop_rule(stop)
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    for problem in problems:
        lams = [float(x) for x in problem.lams]
        if not lams or any(not math.isfinite(x) or x < 0 for x in lams):
            raise ValueError(f"lambdas must be finite and >= 0 (and at least one), got {lams}")
    out: list[list[FittedProbe] | None] = [None] * len(problems)
    if not spec.fitted:
        for i, problem in enumerate(problems):
            p = np.asarray(problem.features).shape[1]
            out[i] = [FittedProbe(spec, float(lam), "identity", p) for lam in problem.lams]
        return out
    n_total = sum(len(pr.lams) for pr in problems)
    if progress is None:
        progress = Progress(
            n_total, log, progress_every, label=f"fitting {spec.name}/{spec.penalty}"
        )
    contexts = []
    for pr in problems:  # a large problem takes seconds to prepare: keep reporting
        contexts.append(_prepare(pr, spec, device, dtype, reduce))
        progress.advance()

    # Work units (problem, lambda positions) are packed into batches of at most `limit` fits.
    # Reduced problems of similar size are stacked with padding (sorted by size, so padding is
    # small); own-coordinate problems stack only with equal dimension. A problem's lambdas are
    # split across batches when they exceed the limit.
    def dims(i):
        c = contexts[i]
        return c.X.shape[2], c.X.shape[1], c.w.shape[1]

    def stackable(a, b):
        return reduce or dims(a)[0] == dims(b)[0]

    def padded(members):
        """(q, n, N) of these problems stacked in one batch."""
        return tuple(max(dims(i)[k] for i in members) for k in range(3))

    def fit_bytes(members):
        """Memory of one fit of a batch of these problems: history, iterates, the adapted
        phase's scale, Gram, logits (float64, 3 per triplet, kept as the current point's, the
        accepted step's and a trial's aux, and the gradient's)."""
        q, n, N = padded(members)
        size = contexts[members[0]].X.element_size()
        return ((2 * history + 9) * q * q + 4 * n * n) * size + 4 * 3 * 8 * N

    def limit_for(members):
        q, n, N = padded(members)
        if max_batch is not None:
            return max(1, int(max_batch))
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return max(1, int(memory_budget * free // fit_bytes(members)))
        # CPU: stack small problems until one evaluation is ~CPU_BATCH_FLOPS, so the Python
        # overhead of an iteration is shared; large problems go one fit at a time. S is needed
        # at most at the 6 N (ordered) pairs of the triplets when that is below n^2 (sparse).
        pairs = min(n * n, 6 * N)
        return max(1, int(CPU_BATCH_FLOPS // (2 * (n * q * q + pairs * q) + 30 * N)))

    order = sorted(range(len(problems)), key=lambda i: dims(i))
    # even out the batches of each stackable run (no small straggler batch that would iterate
    # alone with the whole per-iteration overhead)
    even: dict[int, int] = {}
    runs: list[list[int]] = []
    for i in order:
        if runs and stackable(runs[-1][0], i):
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        total = sum(len(problems[i].lams) for i in run)
        n_batches = math.ceil(total / limit_for(run))
        for i in run:
            even[i] = math.ceil(total / n_batches)
    batches: list[list[tuple[int, list[int]]]] = []
    cur: list[tuple[int, list[int]]] = []
    size = 0
    for i in order:
        pos = list(range(len(problems[i].lams)))
        limit = min(limit_for([u for u, _ in cur] + [i]), even[i])
        if cur and (not stackable(cur[0][0], i) or size + len(pos) > limit):
            batches.append(cur)
            cur, size = [], 0
            limit = min(limit_for([i]), even[i])
        while pos:
            if size >= limit and cur:
                batches.append(cur)
                cur, size = [], 0
            take = pos[: max(1, limit - size)]
            pos = pos[len(take) :]
            cur.append((i, take))
            size += len(take)
    if cur:
        batches.append(cur)
    results: list[list[FittedProbe | None]] = [[None] * len(pr.lams) for pr in problems]

    iter_cap = _iteration_cap(spec, max_iter)  # the optimiser's own cap

    oom_cap: list[int] = []  # after running out of device memory: the most fits per batch

    def attempt(units, key, offset: int = 0) -> list[FittedProbe]:
        """Fit one batch; out of device memory, fit it again as two halves (down to one fit)."""
        lams = [float(problems[i].lams[b]) for i, pos in units for b in pos]
        if oom_cap and len(lams) > oom_cap[0]:
            first, second = _halves(units)
            return attempt(first, key, offset) + attempt(second, key, offset + _n_fits(first))
        ctx = _merge([contexts[i] for i, _ in units])
        gid = [g for g, (_, pos) in enumerate(units) for _ in pos]

        def tick(it: int, active: int) -> None:
            # running fits count as done up to it / cap (a lower bound: most stop earlier)
            finished = offset + len(lams) - active
            part = finished + active * min(it / max(iter_cap, 1), 1.0)
            progress.running(key, part, steps=1, finished=finished)

        try:
            return _fit_context(
                ctx, spec, lams, max_iter, rel_tol, history, gid=gid, progress=tick, paper=paper
            )
        except torch.OutOfMemoryError:
            if len(lams) == 1:
                raise
        del ctx  # the failed batch's tensors go before the halves are allocated
        if device.type == "cuda":
            torch.cuda.empty_cache()
        half = (len(lams) + 1) // 2
        if not oom_cap or half < oom_cap[0]:
            oom_cap[:] = [half]
        if log is not None:
            log(f"out of {device.type} memory with {len(lams)} fits in one batch: refitting "
                f"them in batches of at most {oom_cap[0]}")  # fmt: skip
        first, second = _halves(units)
        return attempt(first, key, offset) + attempt(second, key, offset + _n_fits(first))

    def run(units):
        t0 = time.perf_counter()
        with progress.ticking():  # lines also while a batch starts (scale search: ~1 min at 4M)
            fits = attempt(units, id(units))
        return units, fits, time.perf_counter() - t0

    done = 0
    if workers is None:  # CPU: one per torch thread, as many as fit in memory_budget
        workers = torch.get_num_threads() if device.type == "cpu" else 1
        free = _available_memory() if workers > 1 and batches else None
        if free is not None:
            need = max(fit_bytes([i for i, _ in u]) * sum(len(p) for _, p in u) for u in batches)
            workers = max(1, min(workers, int(memory_budget * free // need)))
    for units, fits, secs in _run_batches(run, batches, workers):
        it = iter(fits)
        for i, pos in units:
            for b in pos:
                fit = next(it)
                fit.seconds = secs / len(fits)
                results[i][b] = fit
        done += len(fits)
        progress.advance(len(fits), running=id(units))
        if log is not None:
            its = [f.iterations for f in fits]
            log(
                f"fitted {done}/{n_total} probes ({spec.name}/{spec.penalty}; this batch: "
                f"{len(units)} problems, {len(fits)} fits, iterations {min(its)}-{max(its)}, "
                f"{secs:.1f} s)"
            )
    return results


def _n_fits(units: list[tuple[int, list[int]]]) -> int:
    return sum(len(pos) for _, pos in units)


def _halves(units: list[tuple[int, list[int]]]) -> tuple[list, list]:
    """A batch's work units (problem, lambda positions) split into two batches of (about) half
    the fits each, in the same order."""
    flat = [(i, b) for i, pos in units for b in pos]
    cut = (len(flat) + 1) // 2

    def grouped(pairs):
        out: list[tuple[int, list[int]]] = []
        for i, b in pairs:
            if out and out[-1][0] == i:
                out[-1][1].append(b)
            else:
                out.append((i, [b]))
        return out

    return grouped(flat[:cut]), grouped(flat[cut:])


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _run_batches(run: Callable, batches: list, workers: int):
    """Yield ``run(batch)`` for every batch, in order of completion.

    With ``workers`` > 1 (at most one per batch) they run concurrently on that many threads, each
    with an equal share of torch's intra-op threads for its own operations. On the CPU one fit
    per thread beats one fit on all threads: an iteration is many small and memory-bound
    operations whose parallel split costs more than it gains (the benchmark's recovery job on 2
    cores: 118.4 and 120.3 s on 2 workers against 137.1 and 155.0 s on 1). The batches of the
    largest problems go first, so that the last ones to finish are short.
    """
    threads = torch.get_num_threads()
    workers = min(workers, len(batches))
    if workers <= 1:
        for units in batches:
            yield run(units)
        return
    share = max(1, threads // workers)
    try:
        with ThreadPoolExecutor(
            workers, initializer=torch.set_num_threads, initargs=(share,)
        ) as pool:
            futures = [pool.submit(run, units) for units in reversed(batches)]
            try:
                for fut in as_completed(futures):
                    yield fut.result()
            except BaseException as exc:
                if not isinstance(exc, GeneratorExit):  # a failure or an interrupt: the running
                    optim.STOP.set()  # batches stop at their next iteration
                raise
            finally:  # an error (or the caller stopping early): start no further batch
                for fut in futures:
                    fut.cancel()
    finally:
        optim.STOP.clear()
        torch.set_num_threads(threads)  # the workers' setting is process-wide: undo it
