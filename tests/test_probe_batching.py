"""Batched probe fitting (recovery_assets.core.probe.fit_probes): problems of different reduced
dimension r, concept count n and triplet count N fitted together in ONE batch (``_merge`` pads n,
N and the coordinates q, the padded coordinates masked) give the fits each problem gets alone."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from recovery_assets.core import probe
from recovery_assets.core.probe import (
    FitProblem,
    ProbeSpec,
    batching,
    data_term,
    fit_probes,
    kernels,
    objective,
    probe_objective,
    reduction,
)

F64 = torch.float64
TIGHT = dict(dtype=F64, rel_tol=1e-13, max_iter=5000, history=20)


pytestmark = pytest.mark.usefixtures("single_thread")


def make_problem(seed: int, p: int, n_train: int, n_trip: int, n_held: int = 5) -> dict:
    """n_train training concepts (all used by the triplets) + n_held concepts in no triplet;
    answers drawn from a planted transform."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_train + n_held, p, generator=g, dtype=F64) * math.sqrt(2.0 / p)
    W_true = torch.eye(p, dtype=F64) + 0.6 * torch.randn(p, p, generator=g, dtype=F64) / p**0.5
    trip = torch.rand(n_trip, n_train, generator=g).argsort(1)[:, :3]
    assert len(torch.unique(trip)) == n_train
    Z = X @ W_true.T
    S = Z @ Z.T
    i, j, k = trip.unbind(-1)
    logits = 3.0 * torch.stack([S[j, k], S[i, k], S[i, j]], -1)
    ans = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(-1)
    return dict(X=X.numpy(), trip=trip.numpy(), ans=ans.numpy(), p=p, n_train=n_train)


def as_problem(d: dict, lams) -> FitProblem:
    return FitProblem(d["X"], d["trip"], d["ans"], list(lams))


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1.0)


class Spy:
    """Records every batch handed to the optimiser."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = batching._fit_context

        def spy(ctx, spec, lams, *args, **kwargs):
            self.calls.append(
                dict(
                    lams=list(lams),
                    G=ctx.X.shape[0],
                    n=ctx.X.shape[1],
                    q=ctx.X.shape[2],
                    N=ctx.w.shape[1],
                    r=list(ctx.r),
                    w=ctx.w.clone(),
                    gid=list(kwargs.get("gid") or []),
                    thread=threading.current_thread(),
                    threads=torch.get_num_threads(),
                )
            )
            return real(ctx, spec, lams, *args, **kwargs)

        monkeypatch.setattr(batching, "_fit_context", spy)


def check_same(together, alone, datas, spec, mat_tol=1e-6):
    for fits_t, fits_a, d in zip(together, alone, datas, strict=True):
        assert len(fits_t) == len(fits_a)
        for a, b in zip(fits_t, fits_a, strict=True):
            assert a.lam == b.lam
            assert a.p == b.p == d["p"]
            assert a.converged and b.converged
            assert rel(a.objective, b.objective) < 1e-9, (d["p"], a.lam, a.objective, b.objective)
            Wa, Wb = a.matrix_tensor().to(F64), b.matrix_tensor().to(F64)
            assert Wa.shape == (d["p"], d["p"])
            torch.testing.assert_close(Wa, Wb, atol=mat_tol, rtol=mat_tol)
            # the reported objective is the plain objective of the problem the fit belongs to
            f_pub = probe_objective(Wa, d["X"], d["trip"], d["ans"], a.lam, spec)
            assert rel(f_pub, a.objective) < 1e-8, (f_pub, a.objective)


@pytest.mark.parametrize("penalty", ["shrinkage", "frobenius"])
def test_different_r_n_and_N_in_one_batch_equal_each_alone(monkeypatch, penalty):
    # p = 6, 12, 40 on 20, 18, 22 training concepts: r = 6, 12, 22 -> one batch padded to q = 22
    datas = [
        make_problem(1, p=6, n_train=20, n_trip=150),
        make_problem(2, p=12, n_train=18, n_trip=220),
        make_problem(3, p=40, n_train=22, n_trip=180),
    ]
    lams = [[0.01, 0.1], [0.03], [0.005, 0.05]]
    spec = ProbeSpec.parse("full", penalty)
    problems = [as_problem(d, lam) for d, lam in zip(datas, lams, strict=True)]
    alone = [fit_probes([pr], spec, max_batch=100, **TIGHT)[0] for pr in problems]

    spy = Spy(monkeypatch)
    messages = []
    together = fit_probes(problems, spec, max_batch=100, log=messages.append, **TIGHT)
    assert len(spy.calls) == 1, [c["G"] for c in spy.calls]  # ONE batch
    call = spy.calls[0]
    assert call["G"] == 3 and len(call["lams"]) == 5
    assert sorted(call["r"]) == [6, 12, 22]
    assert call["q"] == 22 and call["n"] == 22 and call["N"] == 220
    # padded triplets carry weight 0, the real ones 1/N of their problem
    for g, r in enumerate(call["r"]):
        N_g = {6: 150, 12: 220, 22: 180}[r]
        w = call["w"][g]
        torch.testing.assert_close(w[:N_g], torch.full((N_g,), 1.0 / N_g, dtype=F64))
        assert torch.all(w[N_g:] == 0)
        torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=F64))
    # the fits come back in the caller's order, each at its own lambdas and dimension
    assert [[f.lam for f in row] for row in together] == lams
    for row, d in zip(together, datas, strict=True):
        r = min(d["p"], d["n_train"])
        for f in row:
            assert f.kind == "reduced" and tuple(f.A.shape) == (r, r)
    check_same(together, alone, datas, spec)
    # the fits differ between problems and lambdas (not collapsed onto one)
    objs = [f.objective for row in together for f in row]
    assert len({round(o, 6) for o in objs}) == len(objs)
    # the log reports the batch
    assert len(messages) == 1
    assert "fits" in messages[0] and "5 fits" in messages[0] and "3 problems" in messages[0]
    assert "fitted 5/5 probes" in messages[0]


def test_different_numbers_of_triplets_same_r(monkeypatch):
    """Same p and n (so the same r): only the triplet count N is padded."""
    datas = [
        make_problem(11, p=16, n_train=12, n_trip=60),
        make_problem(12, p=16, n_train=12, n_trip=300),
        make_problem(13, p=16, n_train=12, n_trip=140),
    ]
    spec = ProbeSpec.parse("full", "shrinkage")
    problems = [as_problem(d, [0.02]) for d in datas]
    alone = [fit_probes([pr], spec, **TIGHT)[0] for pr in problems]
    spy = Spy(monkeypatch)
    together = fit_probes(problems, spec, max_batch=100, **TIGHT)
    assert len(spy.calls) == 1
    assert spy.calls[0]["G"] == 3 and spy.calls[0]["N"] == 300 and spy.calls[0]["r"] == [12] * 3
    check_same(together, alone, datas, spec)


def test_own_coordinate_family_pads_n_and_N(monkeypatch):
    """The diagonal family is fitted in its own coordinates: problems of equal p stack in one
    batch with n and N padded (no coordinate padding)."""
    datas = [
        make_problem(21, p=10, n_train=9, n_trip=80),
        make_problem(22, p=10, n_train=15, n_trip=200),
    ]
    spec = ProbeSpec.parse("diagonal", "shrinkage")
    problems = [as_problem(d, [0.01, 0.1]) for d in datas]
    alone = [fit_probes([pr], spec, **TIGHT)[0] for pr in problems]
    spy = Spy(monkeypatch)
    together = fit_probes(problems, spec, max_batch=100, **TIGHT)
    assert len(spy.calls) == 1
    assert spy.calls[0]["G"] == 2 and spy.calls[0]["n"] == 15 and spy.calls[0]["N"] == 200
    check_same(together, alone, datas, spec)


def test_own_coordinate_problems_of_different_p_are_not_stacked(monkeypatch):
    datas = [
        make_problem(31, p=8, n_train=10, n_trip=80),
        make_problem(32, p=9, n_train=10, n_trip=80),
    ]
    spec = ProbeSpec.parse("diagonal", "frobenius")
    spy = Spy(monkeypatch)
    fits = fit_probes([as_problem(d, [0.1]) for d in datas], spec, max_batch=100, **TIGHT)
    assert len(spy.calls) == 2 and all(c["G"] == 1 for c in spy.calls)
    assert [f[0].p for f in fits] == [8, 9]


def two_problems_in_one_batch(seed: int):
    """Two small problems x 3 lambdas, and their fits in one batch (the reference)."""
    datas = [
        make_problem(seed, p=6, n_train=20, n_trip=100),
        make_problem(seed + 1, p=12, n_train=18, n_trip=120),
    ]
    spec = ProbeSpec.parse("full", "shrinkage")
    problems = [as_problem(d, [0.01, 0.1, 1.0]) for d in datas]
    return datas, spec, problems, fit_probes(problems, spec, max_batch=100, **TIGHT)


def test_max_batch_splits_and_log_reports_every_batch(monkeypatch):
    datas, spec, problems, one_batch = two_problems_in_one_batch(41)
    spy = Spy(monkeypatch)
    messages = []
    split = fit_probes(problems, spec, max_batch=2, log=messages.append, **TIGHT)
    sizes = [len(c["lams"]) for c in spy.calls]
    assert sum(sizes) == 6 and max(sizes) <= 2 and len(sizes) >= 3, sizes
    # one log line per batch, with the running count of fits
    assert len(messages) == len(sizes) and all("fits" in m for m in messages)
    done = np.cumsum(sizes)
    assert [m.split()[1] for m in messages] == [f"{k}/6" for k in done]
    assert all(f"{k} fits" in m for k, m in zip(sizes, messages, strict=True))
    check_same(split, one_batch, datas, spec)


def test_out_of_device_memory_refits_the_batch_in_halves(monkeypatch):
    """A batch that runs out of device memory (torch.OutOfMemoryError, as CUDA raises it) is
    fitted again as two halves, and later batches take the smaller size at once; the fits equal
    those of one batch. One fit that does not fit is the caller's error."""
    datas, spec, problems, one_batch = two_problems_in_one_batch(43)

    tried = []
    real = batching._fit_context

    def small_device(ctx, spec, lams, *args, **kwargs):
        tried.append(len(lams))
        if len(lams) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(ctx, spec, lams, *args, **kwargs)

    monkeypatch.setattr(batching, "_fit_context", small_device)
    messages = []
    fits = fit_probes(problems, spec, max_batch=3, log=messages.append, **TIGHT)
    # batches of 3: the first fails and is refitted as 2 + 1; the second is split before trying
    assert tried == [3, 2, 1, 2, 1], tried
    assert sum("out of cpu memory with 3 fits" in m for m in messages) == 1, messages
    assert "in batches of at most 2" in messages[0]
    check_same(fits, one_batch, datas, spec)

    monkeypatch.setattr(batching, "_fit_context", lambda *a, **k: small_device(a[0], a[1], [0] * 3))
    with pytest.raises(torch.OutOfMemoryError):
        fit_probes(problems[:1], spec, max_batch=1, **TIGHT)


def test_log_is_optional_and_called_with_strings():
    d = make_problem(51, p=6, n_train=10, n_trip=50)
    calls = []
    fit_probes([as_problem(d, [0.1])], ProbeSpec(), log=calls.append, **TIGHT)
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert "1 fits" in calls[0] and "full/shrinkage" in calls[0]
    (f,) = fit_probes([as_problem(d, [0.1])], ProbeSpec(), **TIGHT)[0]  # no log: no error
    assert np.isfinite(f.objective)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
def test_sparse_data_term_equals_the_gram_path(shared, dtype):
    """Sparse triplets sample S at their pairs and multiply by a sparse G + G^T; loss and
    gradient are those of the dense S = Z Z^T path, for a batch sharing its triplets and for
    merged problems with triplets of their own (a block-diagonal pattern)."""
    g = torch.Generator().manual_seed(0)
    B, n, q, N = 3, 40, 7, 50
    Z = torch.randn(B, n, q, dtype=torch.float64, generator=g).to(dtype)
    trips = [torch.randperm(n, generator=g)[:3] for _ in range(N * (1 if shared else B))]
    trip = torch.stack(trips).reshape(1 if shared else B, N, 3)
    ans = torch.randint(0, 3, (trip.shape[0], N), generator=g)
    trip = data_term.answer_first(trip, ans)
    w = torch.full((trip.shape[0], N), 1.0 / N, dtype=dtype)
    pidx = probe.pair_index(trip, n)
    dense = data_term._data_term(Z, pidx, w)
    patterns = [data_term._pair_pattern(trip[0 if shared else b], n) for b in range(B)]
    assert all(p.rows.shape[0] < n * n // 4 for p in patterns)  # really sparse
    # S is sampled once per unordered pair; the gradient's pattern holds both orientations
    assert all(2 * p.half_rows.shape[0] == p.rows.shape[0] for p in patterns)
    assert all(bool((p.half_rows < p.half_cols).all()) for p in patterns)
    sparse = data_term._data_term(Z, pidx, w, data_term._BlockPattern.of(patterns, n))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse[0], dense[0], **tol)
    torch.testing.assert_close(sparse[1], dense[1], **tol)
    assert dense[1].abs().max() > 1e-3


@pytest.mark.parametrize("blocked", [True, False])
def test_dense_data_term_is_the_plain_formula_and_its_autograd(monkeypatch, blocked):
    """The dense data term (lower Gram blocks, G + G^T scattered at the pairs and their
    transposes, the written-out softmax) gives the plain formula's loss, mean cross-entropy of
    [s_jk, s_ik, s_ij] from the full S = Z Z^T, and its autograd gradient."""
    if blocked:  # force the CPU's blocked lower Gram on a small problem
        monkeypatch.setattr(kernels, "GRAM_ROWS", 7)
        monkeypatch.setattr(kernels, "LOOP_MM_MIN", 1)
    g = torch.Generator().manual_seed(1)
    B, n, q, N = 2, 40, 9, 300
    Z = torch.randn(B, n, q, dtype=torch.float64, generator=g)
    trip = torch.stack([torch.randperm(n, generator=g)[:3] for _ in range(N)]).unsqueeze(0)
    ans = torch.randint(0, 3, (1, N), generator=g)
    w = torch.full((1, N), 1.0 / N, dtype=torch.float64)
    # the fitter's triplets hold the chosen odd one first: the plain formula below takes the
    # triplets as drawn, with their answers
    pidx = probe.pair_index(data_term.answer_first(trip, ans), n)
    assert bool((pidx // n >= pidx % n).all())  # every pair in the lower triangle
    if blocked:
        S = kernels._gram_lower(Z)
        full = Z @ Z.transpose(1, 2)
        lower = torch.tril(torch.ones(n, n, dtype=torch.bool))
        torch.testing.assert_close(S[:, lower], full[:, lower], rtol=1e-12, atol=1e-12)
    loss, grad = data_term._data_term(Z, pidx, w)
    Zr = Z.clone().requires_grad_(True)
    S = Zr @ Zr.transpose(1, 2)
    i, j, k = trip[0].unbind(-1)
    logits = torch.stack([S[:, j, k], S[:, i, k], S[:, i, j]], -1)
    plain = torch.stack([torch.nn.functional.cross_entropy(lg, ans[0]) for lg in logits])
    plain.sum().backward()
    torch.testing.assert_close(loss, plain.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, Zr.grad, rtol=1e-10, atol=1e-12)
    assert grad.abs().max() > 1e-3


def test_sparse_and_dense_fits_agree(monkeypatch, single_thread):
    """A whole batched fit (lambdas x merged problems) gives the same objectives either way."""
    rng = np.random.default_rng(3)
    problems = []
    for p_dim in (30, 50):
        X = rng.normal(size=(60, p_dim))
        trip = np.stack([rng.choice(60, 3, replace=False) for _ in range(120)])
        problems.append(FitProblem(X, trip, rng.integers(0, 3, 120), [1e-3, 1e-1]))
    spec = ProbeSpec.parse("full", "shrinkage")
    kw = dict(device="cpu", dtype=torch.float64, max_iter=300)
    spy = _DataTermSpy(monkeypatch)
    # nnz * ratio < n^2 never holds: dense
    monkeypatch.setattr(data_term, "SAMPLE_RATIO", 10**6)
    monkeypatch.setattr(data_term, "SPARSE_RATIO", 10**6)
    dense = fit_probes(problems, spec, **kw)
    assert spy.paths() == {("gram", "dense")}
    # S sampled at the pairs, the gradient dense: the mixed path (n = 60 >= 2 GRAM_ROWS here)
    monkeypatch.setattr(data_term, "SAMPLE_RATIO", 0)
    monkeypatch.setattr(kernels, "GRAM_ROWS", 16)
    mixed = fit_probes(problems, spec, **kw)
    assert spy.paths() == {("sampled", "dense")}
    monkeypatch.setattr(data_term, "SPARSE_RATIO", 0)  # always holds: sparse (6 N < n^2 here)
    sparse = fit_probes(problems, spec, **kw)
    assert spy.paths() == {("sampled", "sparse")}
    for problem, fd, fm, fs in zip(problems, dense, mixed, sparse, strict=True):
        for lam, a, *others in zip(problem.lams, fd, fm, fs, strict=True):
            args = (problem.features, problem.triplets, problem.answers, lam, spec)
            for b in others:
                assert a.converged and b.converged
                # random answers at lambda = 1e-3 are near separable: the valley is flat and the
                # roundings stop the 1e-7 test a few 1e-6 apart (3e-6 seen); elsewhere they agree
                # to 1e-9
                assert probe_objective(b.matrix(), *args) == pytest.approx(
                    probe_objective(a.matrix(), *args), rel=1e-5 if lam < 1e-2 else 1e-8
                )


class _DataTermSpy:
    """Records which path the objective's data term takes: the logits from the Gram matrix or
    sampled at the pairs, the gradient dense or sparse (``paths`` returns and clears them)."""

    def __init__(self, monkeypatch):
        self.seen = set()
        self.logits = "gram"
        value, backward = objective._data_value, objective._data_backward

        def spy_value(Z, pidx, w, sparse=None):
            self.logits = "gram" if sparse is None else "sampled"
            return value(Z, pidx, w, sparse)

        def spy_backward(Z, gl, pidx, sparse=None, pidx_t=None):
            self.seen.add((self.logits, "dense" if sparse is None else "sparse"))
            return backward(Z, gl, pidx, sparse, pidx_t)

        monkeypatch.setattr(objective, "_data_value", spy_value)
        monkeypatch.setattr(objective, "_data_backward", spy_backward)

    def paths(self):
        seen, self.seen = self.seen, set()
        return seen


def test_the_data_term_path_follows_the_share_of_pairs(monkeypatch):
    """_sparse_patterns: dense from nnz * SAMPLE_RATIO >= n^2 or below 2 GRAM_ROWS concepts,
    sampled logits with a dense gradient in between, sparse below nnz * SPARSE_RATIO < n^2."""
    rng = np.random.default_rng(0)
    n, cpu = 400, torch.device("cpu")
    for N, ratios, expect in [
        (2_000, (4, 8), (True, True)),  # nnz <= 12,000: nnz * 8 < 160,000
        (5_000, (4, 8), (True, False)),  # nnz ~ 30,000: * 4 < 160,000 <= * 8
        (5_000, (4, 4), (True, True)),
        (5_000, (6, 8), (False, False)),  # nnz * 6 >= n^2
    ]:
        trip = torch.from_numpy(np.stack([rng.choice(n, 3, replace=False) for _ in range(N)]))
        monkeypatch.setattr(data_term, "SAMPLE_RATIO", ratios[0])
        monkeypatch.setattr(data_term, "SPARSE_RATIO", ratios[1])
        nnz = data_term._pair_pattern(trip, n).rows.numel()
        patterns, gradient = data_term._sparse_patterns(trip[None], n, cpu)
        assert (patterns is not None, gradient) == expect, (N, ratios, nnz)
        if expect == (True, False):  # fewer concepts than two Gram blocks: dense
            monkeypatch.setattr(kernels, "GRAM_ROWS", n // 2 + 1)
            assert data_term._sparse_patterns(trip[None], n, cpu) == (None, False)
            monkeypatch.setattr(kernels, "GRAM_ROWS", 128)
    assert data_term._sparse_patterns(trip[None], n, torch.device("meta")) == (None, False)


def assert_same_optimum(fit, plain, d, lam, spec, pub_tol):
    """Two converged fits of one problem by different internal routes: the same objective and W,
    and the fit's objective is the method's formula (docs/method.md §4) at its W."""
    assert fit.converged and plain.converged
    assert rel(fit.objective, plain.objective) < 1e-9
    torch.testing.assert_close(fit.matrix_tensor(), plain.matrix_tensor(), atol=1e-6, rtol=1e-6)
    f_pub = probe_objective(fit.matrix(), d["X"], d["trip"], d["ans"], lam, spec)
    assert rel(f_pub, fit.objective) < pub_tol


def test_large_reduced_problem_is_padded_to_a_blas_friendly_size(monkeypatch):
    """r >= PAD_MIN is padded with zero coordinates up to a multiple of PAD_TO; the fit is the
    unpadded fit (same objective, same W, an r x r A)."""
    d = make_problem(61, p=270, n_train=300, n_trip=800)  # r = 270 -> q = 272
    spec = ProbeSpec.parse("full", "shrinkage")
    kw = dict(dtype=F64, rel_tol=1e-12, max_iter=3000, history=20)
    monkeypatch.setattr(reduction, "PAD_MIN", 10**9)
    spy = Spy(monkeypatch)
    (plain,) = fit_probes([as_problem(d, [0.3])], spec, **kw)[0]
    assert spy.calls[-1]["q"] == 270
    monkeypatch.setattr(reduction, "PAD_MIN", 256)
    (padded,) = fit_probes([as_problem(d, [0.3])], spec, **kw)[0]
    assert spy.calls[-1]["q"] == 272 and spy.calls[-1]["r"] == [270]
    assert tuple(padded.A.shape) == (270, 270)
    assert_same_optimum(padded, plain, d, 0.3, spec, pub_tol=1e-6)


@pytest.mark.parametrize(
    "shapes", [((1, 4, 3), (5, 3, 2)), ((5, 4, 3), (1, 3, 2)), ((5, 4, 3), (5, 3, 2))]
)
def test_per_problem_matmul_equals_the_batched_one(monkeypatch, shapes):
    """On the CPU ``_bmm`` loops over problems (one BLAS call each), broadcasting a leading 1."""
    monkeypatch.setattr(kernels, "LOOP_MM_MIN", 0)  # loop even at these tiny sizes
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or real_mm(*a, **k))
    a_shape, b_shape = shapes
    g = torch.Generator().manual_seed(0)
    a = torch.randn(*a_shape, generator=g)
    b = torch.randn(*b_shape[:1], b_shape[2], b_shape[1], generator=g).transpose(1, 2)
    torch.testing.assert_close(kernels._bmm(a, b), a @ b)
    assert len(calls) == 5  # one per problem


def test_triangular_tail_is_an_orthogonal_change_of_basis():
    """The tail-triangular basis spans the same row space, C = Xt V still holds, the leading
    columns are the above-average-variance ones and the rest are exactly zero above the diagonal."""
    g = torch.Generator().manual_seed(5)
    m, p = 40, 60
    Xt = torch.randn(m, 12, generator=g, dtype=F64) @ torch.randn(12, p, generator=g, dtype=F64)
    Xt += 0.05 * torch.randn(m, p, generator=g, dtype=F64)  # a few strong directions + a floor
    V0, C0 = probe.row_space_basis(Xt)
    V, C, lead = reduction._triangular_tail(V0, C0)
    s2 = (C0 * C0).sum(0)
    assert lead == int((s2 > s2.mean()).sum()) and 0 < lead < C.shape[1]
    torch.testing.assert_close(V.T @ V, torch.eye(V.shape[1], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(Xt @ V, C, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(C[:, :lead], C0[:, :lead], atol=0, rtol=0)
    tail = C[:, lead:]
    assert torch.equal(torch.triu(tail, diagonal=1), torch.zeros_like(tail))
    assert float(torch.tril(tail).abs().min(0).values.max()) > 0  # not all zero below it
    torch.testing.assert_close(V @ V.T, V0 @ V0.T, atol=1e-12, rtol=0)  # same projector


@pytest.mark.parametrize("n, q, lead, rows", [(20, 24, 3, 4), (30, 16, 5, 7), (9, 9, 0, 2)])
def test_structured_products_equal_the_dense_ones(monkeypatch, n, q, lead, rows):
    """``_image`` and ``_back`` skip the zero blocks of a tail-triangular Xs and still give
    Xs @ M^T and dZ^T @ Xs exactly (every block boundary included)."""
    monkeypatch.setattr(kernels, "TRI_ROWS", rows)
    g = torch.Generator().manual_seed(n + q)
    Xs = torch.randn(1, n, q, generator=g, dtype=F64)
    Xs[0, :, lead:] = torch.tril(Xs[0, :, lead:])  # column lead + j is zero on concepts i < j
    M = torch.randn(3, q, q, generator=g, dtype=F64)
    dZ = torch.randn(3, n, q, generator=g, dtype=F64)
    assert len(kernels._row_blocks(n)) > 2
    torch.testing.assert_close(kernels._image(Xs, M, lead), Xs @ M.transpose(1, 2))
    torch.testing.assert_close(kernels._back(dZ, Xs, lead), dZ.transpose(1, 2) @ Xs)
    torch.testing.assert_close(kernels._image(Xs, M, None), Xs @ M.transpose(1, 2))


def test_fit_in_the_tail_triangular_basis_equals_the_plain_fit(monkeypatch):
    """The same problem fitted with and without the tail-triangular basis (and its blocked
    products) reaches the same optimum: the same objective and the same W."""
    d = make_problem(71, p=40, n_train=30, n_trip=150)
    spec = ProbeSpec.parse("full", "shrinkage")
    lams = [0.03, 0.3]
    monkeypatch.setattr(reduction, "TRI_MIN", 10**9)
    spy = Spy(monkeypatch)
    plain = fit_probes([as_problem(d, lams)], spec, **TIGHT)[0]
    assert spy.calls[-1]["q"] == 30
    monkeypatch.setattr(reduction, "TRI_MIN", 8)
    monkeypatch.setattr(kernels, "TRI_ROWS", 7)
    seen = []
    real = reduction._triangular_tail
    monkeypatch.setattr(reduction, "_triangular_tail", lambda V, C: seen.append(1) or real(V, C))
    tri = fit_probes([as_problem(d, lams)], spec, **TIGHT)[0]
    assert seen == [1]
    for a, b, lam in zip(plain, tri, lams, strict=True):
        assert_same_optimum(b, a, d, lam, spec, pub_tol=1e-9)


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_concurrent_batches_equal_sequential_ones(monkeypatch, four_threads):
    # 3 problems x 2 lambdas in batches of 1: 6 batches over 2 worker threads of 2 torch threads
    datas = [make_problem(61 + s, p=8, n_train=16, n_trip=90) for s in range(3)]
    spec = ProbeSpec.parse("full", "shrinkage")
    problems = [as_problem(d, [0.02, 0.2]) for d in datas]
    one_by_one = fit_probes(problems, spec, max_batch=1, workers=1, **TIGHT)
    spy = Spy(monkeypatch)
    messages, loggers = [], []

    def log(message):
        messages.append(message)
        loggers.append(threading.current_thread())

    together = fit_probes(problems, spec, max_batch=1, workers=2, log=log, **TIGHT)
    check_same(together, one_by_one, datas, spec, mat_tol=1e-9)
    seen = [(c["thread"], c["threads"]) for c in spy.calls]  # of every batch
    assert len(seen) == 6
    assert threading.main_thread() not in {t for t, _ in seen}  # every batch on a worker
    assert len({t for t, _ in seen}) == 2
    assert {k for _, k in seen} == {2}  # each worker: its share of the 4 threads
    assert torch.get_num_threads() == 4  # restored
    # the log still counts every batch, from the calling thread, in completion order
    assert [m.split()[1] for m in messages] == [f"{k}/6" for k in range(1, 7)]
    assert set(loggers) == {threading.main_thread()}


def test_default_workers_follow_torch_threads_on_the_cpu(monkeypatch, four_threads):
    problem = as_problem(make_problem(71, p=6, n_train=12, n_trip=60), [0.1, 1.0])
    main = threading.main_thread()

    def threads_of_batches(**kw):
        spy = Spy(monkeypatch)
        fit_probes([problem], ProbeSpec(), **kw, **TIGHT)
        return [c["thread"] for c in spy.calls]

    seen = threads_of_batches(max_batch=1)
    assert len(seen) == 2 and main not in seen  # 2 batches: 2 workers
    assert batching._available_memory() > 0  # known on Linux
    assert threads_of_batches() == [main]  # one batch: run in place, on all threads
    monkeypatch.setattr(batching, "_available_memory", lambda: 10_000)  # room for no second batch
    assert threads_of_batches(max_batch=1) == [main] * 2
    monkeypatch.setattr(batching, "_available_memory", lambda: None)  # unknown: no cap
    torch.set_num_threads(1)
    assert threads_of_batches(max_batch=1) == [main] * 2  # one thread: one after another


def test_an_error_in_a_concurrent_batch_reaches_the_caller(monkeypatch, four_threads):
    d = make_problem(81, p=6, n_train=12, n_trip=60)
    real = batching._fit_context

    def failing(ctx, spec, lams, *args, **kwargs):
        if lams == [1.0]:
            raise RuntimeError("batch failed")
        return real(ctx, spec, lams, *args, **kwargs)

    monkeypatch.setattr(batching, "_fit_context", failing)
    with pytest.raises(RuntimeError, match="batch failed"):
        fit_probes([as_problem(d, [0.01, 0.1, 1.0])], ProbeSpec(), max_batch=1, workers=2)
    assert torch.get_num_threads() == 4


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_worker_counts_are_refused(bad):
    d = make_problem(91, p=4, n_train=8, n_trip=20)
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        fit_probes([as_problem(d, [0.1])], ProbeSpec(), workers=bad)


def test_no_problems_no_fits():
    assert fit_probes([], ProbeSpec()) == []
    assert fit_probes([], ProbeSpec(), workers=2) == []


@pytest.mark.parametrize("penalty", ["shrinkage", "l1"])
def test_the_paper_rule_stops_no_later_and_no_lower_than_the_optimum(penalty):
    """Both rules reach objectives close to each other; the paper rule's is never below the
    optimum's (it stops earlier on the same path) and every fit of a batch stops where it would
    alone."""
    datas = [
        make_problem(51, p=10, n_train=20, n_trip=200),
        make_problem(52, p=14, n_train=18, n_trip=150),
    ]
    spec = ProbeSpec.parse("full", penalty)
    problems = [as_problem(d, [1e-3, 1e-1]) for d in datas]
    kw = dict(dtype=F64, max_iter=3000)
    optimum = fit_probes(problems, spec, stop="optimum", rel_tol=1e-12, **kw)
    paper = fit_probes(problems, spec, stop="paper", **kw)
    for row_o, row_p, pr in zip(optimum, paper, problems, strict=True):
        alone = fit_probes([pr], spec, stop="paper", **kw)[0]
        for o, p, a in zip(row_o, row_p, alone, strict=True):
            assert p.converged and p.iterations <= o.iterations
            assert o.objective - 1e-12 <= p.objective <= o.objective * (1 + 1e-2)
            # (padding changes the rounding, so a threshold may fall an iteration apart)
            assert rel(a.objective, p.objective) < 1e-4
    with pytest.raises(ValueError, match="unknown stopping rule"):
        fit_probes(problems, spec, stop="soon")
