"""Tests of recovery_assets.core.probe (docs/method.md §4: the linear probe and its fitter).

The reference here is deliberately plain and independent of the module: W is a torch parameter,
Z = X W^T, S = Z Z^T, the logits of triplet (i, j, k) are [S_jk, S_ik, S_ij], the objective is the
mean cross-entropy plus lambda * R(W), and it is minimised from the identity with
torch.optim.LBFGS (strong Wolfe) in float64 until the objective stops changing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recovery_assets.core import probe
from recovery_assets.core.probe import FitProblem, ProbeSpec, fit_probes, probe_objective

F64 = torch.float64
TIGHT = dict(dtype=F64, rel_tol=1e-13, max_iter=5000, history=20)
# the keyword capping how many fits advance together (renamed while the module evolves)


# These problems are tiny: intra-op threading only adds overhead (on a loaded 2-core machine it
# made one float64 backward pass ~300x slower).
pytestmark = pytest.mark.usefixtures("single_thread")


def one(v):
    """A single-problem context's per-group entry (the context stores per-group lists)."""
    return v[0] if isinstance(v, list) else v


# ----------------------------------------------------------------------------------------------
# synthetic problems


def make_problem(
    seed: int,
    *,
    p: int = 20,
    n_train: int = 12,
    n_held: int = 12,
    n_trip: int = 300,
    n_held_trip: int = 200,
    train_rank: int | None = None,
):
    """Features of n_train + n_held concepts, training triplets among the first n_train only and
    held-out triplets among the rest; answers sampled from a planted transform."""
    g = torch.Generator().manual_seed(seed)
    scale = math.sqrt(2.0 / p)
    if train_rank is None:
        Xt = torch.randn(n_train, p, generator=g, dtype=F64)
    else:  # training features spanning only train_rank directions
        B = torch.randn(n_train, train_rank, generator=g, dtype=F64)
        Xt = B @ torch.randn(train_rank, p, generator=g, dtype=F64) / math.sqrt(train_rank)
    Xh = torch.randn(n_held, p, generator=g, dtype=F64)
    X = torch.cat([Xt, Xh]) * scale
    W_true = torch.eye(p, dtype=F64) + 0.6 * torch.randn(p, p, generator=g, dtype=F64) / p**0.5

    def triplets(lo, hi, m):
        return lo + torch.rand(m, hi - lo, generator=g).argsort(1)[:, :3]

    def answers(trip):
        logits = 3.0 * naive_logits(X @ W_true.T, trip)
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(-1)

    trip = triplets(0, n_train, n_trip)
    held = triplets(n_train, n_train + n_held, n_held_trip)
    assert len(torch.unique(trip)) == n_train  # every training concept is used
    return dict(X=X, trip=trip, ans=answers(trip), held=held, held_ans=answers(held))


def problem_of(d, lams) -> FitProblem:
    return FitProblem(d["X"].numpy(), d["trip"].numpy(), d["ans"].numpy(), lams)


# ----------------------------------------------------------------------------------------------
# the plain reference


def naive_logits(Z: torch.Tensor, trip: torch.Tensor) -> torch.Tensor:
    S = Z @ Z.T
    i, j, k = trip.unbind(-1)
    return torch.stack([S[j, k], S[i, k], S[i, j]], dim=-1)


def naive_penalty(W: torch.Tensor, family: str, penalty: str, P=None) -> torch.Tensor:
    """R(W) of docs/method.md §4. W is the full transform (rows x p); for pca the penalty acts on
    the k x k transform of the principal components, W P."""
    if family == "pca":
        W = W @ P
    if family == "diagonal":
        W = torch.diag(torch.diagonal(W))
    if penalty == "l1":
        return W.abs().sum()
    if penalty == "frobenius":
        return (W * W).sum()
    M = W.T @ W if family == "rank" else W  # rank:k shrinks W^T W
    q = M.shape[0]
    E = M - torch.trace(M) / q * torch.eye(q, dtype=M.dtype)
    return (E * E).sum()


def naive_objective(W, d, lam, family="full", penalty="shrinkage", P=None, smooth_only=False):
    X = d["X"]
    if family == "pca":  # pca:k: centred principal-component scores, as sklearn's PCA gives
        X = X - X.mean(0, keepdim=True)
    ce = torch.nn.functional.cross_entropy(naive_logits(X @ W.T, d["trip"]), d["ans"])
    if smooth_only:
        return ce
    return ce + lam * naive_penalty(W, family, penalty, P)


def family_start(family: str, p: int, k: int | None):
    """The identity of the family, as the free parameter theta, and theta -> W."""
    if family == "diagonal":
        return torch.ones(p, dtype=F64), torch.diag
    if family == "rank":
        return torch.eye(k, p, dtype=F64), lambda t: t
    if family == "pca":
        return torch.eye(k, dtype=F64), None  # W = theta P^T, P supplied by the caller
    return torch.eye(p, dtype=F64), lambda t: t


def naive_fit(d, lam, family="full", penalty="shrinkage", k=None, P=None):
    """Minimise the plain objective from the identity with torch's strong-Wolfe L-BFGS."""
    p = d["X"].shape[1]
    theta0, to_W = family_start(family, p, k)
    if family == "pca":

        def to_W(t):
            return t @ P.T

    theta = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=1000,
        max_eval=2500,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def f():
        return naive_objective(to_W(theta), d, lam, family, penalty, P)

    def closure():
        opt.zero_grad()
        loss = f()
        loss.backward()
        return loss

    prev = math.inf
    for _ in range(100):
        opt.step(closure)
        with torch.no_grad():
            cur = float(f())
        if abs(prev - cur) <= 1e-15 * max(1.0, abs(cur)):
            break
        prev = cur
    W = to_W(theta).detach()
    return W, float(naive_objective(W, d, lam, family, penalty, P))


def held_probs_from_W(W, d):
    return torch.softmax(naive_logits(d["X"] @ W.T, d["held"]), -1)


def held_probs_from_fit(fit, d):
    """Held-out choice probabilities through FittedProbe.similarity (local indices)."""
    held = d["held"]
    concepts, local = torch.unique(held.reshape(-1), return_inverse=True)
    S = fit.similarity(d["X"][concepts]).to(F64)
    i, j, k = local.reshape(-1, 3).unbind(-1)
    return torch.softmax(torch.stack([S[j, k], S[i, k], S[i, j]], -1), -1)


def pca_axes_plain(X: torch.Tensor, k: int) -> torch.Tensor:
    Xc = X - X.mean(0, keepdim=True)
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    return Vh[:k].T


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ----------------------------------------------------------------------------------------------
# 1. the exact reduction equals the naive p x p fit


REDUCTION_CASES = [
    dict(seed=1, p=20, n_train=12),  # p > r = 12
    dict(seed=2, p=24, n_train=14),
    dict(seed=3, p=20, n_train=12, train_rank=6),  # rank-deficient X_train: r = 6
    dict(seed=4, p=8, n_train=12),  # p < n_train: nothing to reduce, r = p
]


@pytest.mark.parametrize("penalty", ["shrinkage", "frobenius"])
@pytest.mark.parametrize("case", REDUCTION_CASES, ids=lambda c: f"seed{c['seed']}")
def test_reduced_fit_equals_naive_full_fit(case, penalty):
    d = make_problem(**case)
    lams = [1e-2, 1e-1]
    spec = ProbeSpec.parse("full", penalty)
    fits = fit_probes([problem_of(d, lams)], spec, **TIGHT)[0]
    ctx = probe.batching._prepare(problem_of(d, lams), spec, "cpu", F64, True)
    expected_r = case.get("train_rank") or min(case["p"], case["n_train"])
    assert one(ctx.V).shape == (case["p"], expected_r)
    for fit, lam in zip(fits, lams, strict=True):
        assert fit.kind == "reduced" and fit.converged
        W_ref, f_ref = naive_fit(d, lam, "full", penalty)
        W = fit.matrix_tensor().to(F64)
        assert W.shape == (case["p"], case["p"])
        f_pub = probe_objective(W, d["X"], d["trip"], d["ans"], lam, spec)
        f_mine = float(naive_objective(W, d, lam, "full", penalty))
        assert rel(fit.objective, f_ref) < 1e-5, (fit.objective, f_ref)
        assert rel(f_pub, f_ref) < 1e-5, (f_pub, f_ref)
        assert rel(f_mine, fit.objective) < 1e-8, (f_mine, fit.objective)
        # held-out concepts: their components outside V are scaled by d
        p_ref = held_probs_from_W(W_ref, d)
        torch.testing.assert_close(held_probs_from_fit(fit, d), p_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(held_probs_from_W(W, d), p_ref, atol=1e-5, rtol=0)
        # transform() and matrix_tensor() agree
        torch.testing.assert_close(fit.transform(d["X"]), d["X"] @ W.T, atol=1e-10, rtol=1e-10)
        # matrix() forms W in float32: within a few float32 roundings of the float64 W
        W32 = torch.as_tensor(fit.matrix())
        assert W32.dtype == torch.float32 and W32.shape == W.shape
        err = float((W32.to(F64) - W).abs().max() / W.abs().max())
        assert err < 8 * torch.finfo(torch.float32).eps, err
        # the fit moved away from the identity and improved on it
        f_id = float(naive_objective(torch.eye(case["p"], dtype=F64), d, lam, "full", penalty))
        assert fit.objective < f_id - 1e-4


# ----------------------------------------------------------------------------------------------
# 2. the optimiser-coordinate objective and its gradient against autograd of the plain formula


GRAD_SPECS = [
    ("full", "shrinkage", True),
    ("full", "frobenius", True),
    ("full", "l1", False),
    ("diagonal", "shrinkage", False),
    ("diagonal", "frobenius", False),
    ("diagonal", "l1", False),
    ("rank:5", "shrinkage", False),
    ("rank:5", "frobenius", False),
    ("rank:5", "l1", False),
    ("pca:16", "shrinkage", True),
    ("pca:16", "frobenius", True),
    ("pca:6", "shrinkage", True),
    ("pca:16", "l1", False),
]


def W_of_x(x: torch.Tensor, x0: torch.Tensor, spec: ProbeSpec, ctx, p: int) -> torch.Tensor:
    """The full transform (rows x p) at optimiser coordinates x, re-derived from the documented
    parametrisation: reduced fits use A' = A D (column scaling; D read off x0 = diag(D)) and
    W = V A V^T + d (I - V V^T) with d profiled (tr A / r for shrinkage, 0 for Frobenius)."""
    if spec.family == "diagonal":
        return torch.diag(x)
    if spec.family == "rank":
        return x.reshape(spec.k, p)
    q = ctx.X.shape[-1]
    X0 = x0.reshape(q, q)
    D = torch.diagonal(X0)
    assert torch.equal(X0, torch.diag(D))  # the start is the identity in scaled coordinates
    A = x.reshape(q, q) / D
    V, P = one(ctx.V), one(ctx.P)
    if V is None:
        Wq = A
    else:
        r = V.shape[1]
        dd = torch.trace(A) / r if spec.penalty == "shrinkage" else torch.zeros((), dtype=F64)
        Wq = V @ A @ V.T + dd * (torch.eye(V.shape[0], dtype=F64) - V @ V.T)
    return Wq @ P.T if spec.family == "pca" else Wq


@pytest.mark.parametrize("family,penalty,reduced", GRAD_SPECS)
def test_objective_and_gradient_match_autograd(family, penalty, reduced):
    d = make_problem(11, p=20, n_train=12)
    p = 20
    spec = ProbeSpec.parse(family, penalty)
    assert probe.reduction._uses_reduction(spec) == reduced
    lams = [0.05, 0.3]
    ctx = probe.batching._prepare(problem_of(d, lams), spec, "cpu", F64, reduced)
    obj = probe.objective._objective(ctx, spec, lams)
    P = None
    if spec.family == "pca":
        P = one(ctx.P)
        # the module's axes are the plain PCA axes up to column signs
        P_plain = pca_axes_plain(d["X"], spec.k)
        torch.testing.assert_close((P * P_plain).sum(0).abs(), torch.ones(spec.k, dtype=F64))
    g = torch.Generator().manual_seed(5)
    x = obj.x0 + 0.1 * torch.randn(obj.x0.shape, generator=g, dtype=F64)
    f, grad = obj.smooth(x, torch.arange(len(lams)))
    smooth_only = penalty == "l1"
    # the start is the family's identity; a reduced Frobenius fit profiles d out, so it starts
    # from the identity on the training row space and 0 outside it (R lower by q - r)
    W0 = W_of_x(obj.x0[0], obj.x0[0], spec, ctx, p)
    I0 = torch.eye(spec.k, p, dtype=F64) if spec.family == "rank" else torch.eye(p, dtype=F64)
    if spec.family == "pca":
        I0 = P.T
    V = one(ctx.V)
    I_full = I0
    if reduced and penalty == "frobenius":
        I0 = V @ V.T @ I0
    torch.testing.assert_close(W0, I0, atol=1e-12, rtol=0)
    f0, _ = obj.smooth(obj.x0, torch.arange(len(lams)))
    for b, lam in enumerate(lams):
        f_id = naive_objective(I0, d, lam, spec.family, penalty, P, smooth_only=smooth_only)
        assert rel(float(f0[b]), float(f_id)) < 1e-12
        if reduced and penalty == "frobenius":
            f_eye = naive_objective(I_full, d, lam, spec.family, penalty, P)
            drop = V.shape[0] - V.shape[1]  # q - r
            assert drop > 0
            assert rel(float(f0[b]) + lam * drop, float(f_eye)) < 1e-12
    for b, lam in enumerate(lams):
        xb = x[b].clone().requires_grad_(True)
        W = W_of_x(xb, obj.x0[b], spec, ctx, p)
        val = naive_objective(W, d, lam, spec.family, penalty, P, smooth_only=smooth_only)
        (auto,) = torch.autograd.grad(val, xb)
        val = val.detach()
        assert rel(float(f[b]), float(val)) < 1e-11, (float(f[b]), float(val))
        torch.testing.assert_close(grad[b], auto, atol=1e-10, rtol=1e-8)
        # unpack gives the family's parameter, consistent with W(x)
        par = obj.unpack(x[b], b)
        if spec.family == "diagonal":
            torch.testing.assert_close(torch.diag(par), W.detach())
        elif spec.family == "rank":
            torch.testing.assert_close(par, W.detach())
        elif one(ctx.V) is None:  # full / pca in their own coordinates
            torch.testing.assert_close(par @ P.T if P is not None else par, W.detach())
        else:  # reduced: A = x / D column-wise, D = diag(x0) (the fit's own)
            q = ctx.X.shape[-1]
            D = torch.diagonal(obj.x0[b].reshape(q, q))
            torch.testing.assert_close(par, x[b].reshape(q, q) / D)
        # the public plain objective agrees at the same W
        lam_pub = 0.0 if smooth_only else lam
        f_pub = probe_objective(W.detach(), d["X"], d["trip"], d["ans"], lam_pub, spec)
        assert rel(f_pub, float(val)) < 1e-11, (f_pub, float(val))


# ----------------------------------------------------------------------------------------------
# 3. batched fits equal one-by-one fits


def test_batched_lambdas_equal_single_fits():
    d = make_problem(21, p=16, n_train=12)
    lams = [1e-3, 1e-2, 1e-1]
    spec = ProbeSpec.parse("full", "shrinkage")
    together = fit_probes([problem_of(d, lams)], spec, **TIGHT)[0]
    chunked = fit_probes([problem_of(d, lams)], spec, max_batch=2, **TIGHT)[0]
    for lam, fb, fc in zip(lams, together, chunked, strict=True):
        (fs,) = fit_probes([problem_of(d, [lam])], spec, **TIGHT)[0]
        assert fb.lam == fs.lam == lam
        for other in (fb, fc):
            assert rel(other.objective, fs.objective) < 1e-10
            torch.testing.assert_close(
                other.matrix_tensor(), fs.matrix_tensor(), atol=1e-7, rtol=1e-7
            )
    # different lambdas give different fits (the batch is not collapsed to one lambda)
    assert together[0].objective < together[1].objective < together[2].objective


def test_batch_cap_bounds_the_fits_advancing_together(monkeypatch):
    """The batch-size keyword caps how many fits one optimiser run holds ("up to max_batch
    fits"): a problem with more lambdas than the cap must be split, or the memory bound of a
    GPU batch does not hold."""
    sizes = []
    real = probe.batching._fit_context

    def spy(ctx, spec, lams, *args, **kwargs):
        sizes.append(len(lams))
        return real(ctx, spec, lams, *args, **kwargs)

    monkeypatch.setattr(probe.batching, "_fit_context", spy)
    d1 = make_problem(22, p=16, n_train=12)
    d2 = make_problem(23, p=12, n_train=14)  # same r = 12: stackable with d1
    lams = [1e-3, 1e-2, 1e-1]
    spec = ProbeSpec.parse("full", "shrinkage")
    fits = fit_probes([problem_of(d1, lams), problem_of(d2, lams)], spec, max_batch=2)
    assert [[f.lam for f in row] for row in fits] == [lams, lams]
    assert sum(sizes) == 6
    assert max(sizes) <= 2, sizes


@pytest.mark.parametrize(
    "family,penalty,p2",
    [
        # both problems reduce to r = 12 (p = 16 with 12 training concepts; p = 12 with 14):
        # one r x r batch with padded concepts and triplets when stacking is allowed
        ("full", "frobenius", 12),
        ("full", "shrinkage", 12),
        ("pca:10", "shrinkage", 12),
        ("diagonal", "l1", 16),  # own coordinates, same p: stackable too
        ("rank:4", "shrinkage", 16),
        ("full", "shrinkage", 20),  # r = 14 vs 12: different fitting dimensions
    ],
)
def test_two_problems_in_one_call_equal_each_alone(family, penalty, p2):
    d1 = make_problem(31, p=16, n_train=12, n_trip=300)
    d2 = make_problem(32, p=p2, n_train=14, n_trip=250)
    spec = ProbeSpec.parse(family, penalty)
    probs = [problem_of(d1, [0.02, 0.2]), problem_of(d2, [0.05])]
    alone = fit_probes(probs[:1], spec, **TIGHT)[0] + fit_probes(probs[1:], spec, **TIGHT)[0]
    for kw in ({}, {"max_batch": 100}):
        both = fit_probes(probs, spec, **kw, **TIGHT)
        assert [len(x) for x in both] == [2, 1]
        assert [f.lam for f in both[0] + both[1]] == [0.02, 0.2, 0.05]
        for a, b, d in zip(both[0] + both[1], alone, [d1, d1, d2], strict=True):
            assert a.p == b.p == d["X"].shape[1]
            assert rel(a.objective, b.objective) < 1e-9, (kw, a.objective, b.objective)
            torch.testing.assert_close(a.matrix_tensor(), b.matrix_tensor(), atol=1e-6, rtol=1e-6)
            # and the reported objective is the plain objective of the problem it belongs to
            W = a.matrix_tensor().to(F64)
            f_pub = probe_objective(W, d["X"], d["trip"], d["ans"], a.lam, spec)
            assert rel(f_pub, a.objective) < 1e-8, (kw, f_pub, a.objective)
    assert rel(alone[0].objective, alone[2].objective) > 1e-3  # the problems differ


def test_fit_does_not_depend_on_triplet_order():
    d = make_problem(41, p=16, n_train=12)
    perm = torch.randperm(len(d["trip"]), generator=torch.Generator().manual_seed(0))
    d_perm = dict(d, trip=d["trip"][perm], ans=d["ans"][perm])
    for fam, pen in [("full", "shrinkage"), ("diagonal", "frobenius")]:
        spec = ProbeSpec.parse(fam, pen)
        (a,) = fit_probes([problem_of(d, [0.05])], spec, **TIGHT)[0]
        (b,) = fit_probes([problem_of(d_perm, [0.05])], spec, **TIGHT)[0]
        assert rel(a.objective, b.objective) < 1e-8
        torch.testing.assert_close(a.matrix_tensor(), b.matrix_tensor(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# 4. the other smooth families reach the plain L-BFGS optimum


@pytest.mark.parametrize("penalty", ["shrinkage", "frobenius"])
@pytest.mark.parametrize("family", ["diagonal", "rank:5", "pca:16", "pca:6"])
def test_other_families_reach_reference_optimum(family, penalty):
    d = make_problem(51, p=20, n_train=12)
    p = 20
    spec = ProbeSpec.parse(family, penalty)
    lams = [1e-2, 1e-1]
    fits = fit_probes([problem_of(d, lams)], spec, **TIGHT)[0]
    P = probe.pca_axes(d["X"], spec.k) if spec.family == "pca" else None
    if P is not None:  # the axes are PCA axes (up to sign)
        P_plain = pca_axes_plain(d["X"], spec.k)
        torch.testing.assert_close((P * P_plain).sum(0).abs(), torch.ones(spec.k, dtype=F64))
    theta0, to_W = family_start(spec.family, p, spec.k)
    W_id = theta0 @ P.T if spec.family == "pca" else to_W(theta0)
    for fit, lam in zip(fits, lams, strict=True):
        W = fit.matrix_tensor().to(F64)
        rows = spec.k if spec.family in ("rank", "pca") else p
        assert W.shape == (rows, p)
        f_fit = float(naive_objective(W, d, lam, spec.family, penalty, P))
        _, f_ref = naive_fit(d, lam, spec.family, penalty, spec.k, P)
        f_id = float(naive_objective(W_id, d, lam, spec.family, penalty, P))
        assert rel(f_fit, fit.objective) < 1e-8, (f_fit, fit.objective)
        assert f_fit <= f_ref + 1e-6, (f_fit, f_ref)
        assert f_fit < f_id - 1e-4, (f_fit, f_id)
        if spec.family == "diagonal":  # the diagonal family stays diagonal
            assert torch.count_nonzero(W - torch.diag(torch.diagonal(W))) == 0
        Xw = d["X"] - d["X"].mean(0) if spec.family == "pca" else d["X"]  # W acts on centred X
        torch.testing.assert_close(fit.transform(d["X"]).to(F64), Xw @ W.T)
        if spec.family == "pca":  # the scores are sklearn's PCA.transform (up to column signs)
            from sklearn.decomposition import PCA

            scores = PCA(spec.k, svd_solver="full").fit(d["X"].numpy()).transform(d["X"].numpy())
            ours = ((d["X"] - fit.mu) @ fit.P).numpy()
            np.testing.assert_allclose(np.abs(ours), np.abs(scores), atol=1e-8)


# ----------------------------------------------------------------------------------------------
# 5. the L1 penalty


def soft(u: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(u) * torch.clamp(u.abs() - t, min=0.0)


@pytest.mark.parametrize("family", ["full", "diagonal"])
def test_l1_fit_is_a_proximal_fixed_point_and_sparsifies(family):
    d = make_problem(61, p=12, n_train=12, n_trip=300)
    p = 12
    spec = ProbeSpec.parse(family, "l1")
    lams = [2e-3, 5e-2, 1.0]
    fits = fit_probes([problem_of(d, lams)], spec, **TIGHT)[0]
    eye = torch.eye(p, dtype=F64)
    nnz = []
    for fit, lam in zip(fits, lams, strict=True):
        assert fit.kind == ("diagonal" if family == "diagonal" else "matrix")
        W = fit.matrix_tensor().to(F64)
        f_fit = float(naive_objective(W, d, lam, family, "l1"))
        f_id = float(naive_objective(eye, d, lam, family, "l1"))
        assert rel(f_fit, fit.objective) < 1e-10
        assert f_fit < f_id - 1e-4, (f_fit, f_id)
        # optimality: W is a fixed point of the proximal-gradient map of the plain objective,
        # || soft(W - t grad, t lam) - W || / t ~ 0 (the gradient mapping; ~1e-7 measured)
        theta = (torch.diagonal(W) if family == "diagonal" else W).clone().requires_grad_(True)
        Wt = torch.diag(theta) if family == "diagonal" else theta
        (grad,) = torch.autograd.grad(naive_objective(Wt, d, lam, smooth_only=True), theta)
        theta = theta.detach()
        t = 1e-2
        step = soft(theta - t * grad, t * lam) - theta
        scale = max(float(theta.norm()), 1.0)
        assert float(step.norm()) / t <= 1e-5 * scale, (lam, float(step.norm()) / t)
        nnz.append(int(torch.count_nonzero(W)))
    # small lambda: a real transform; larger lambdas: sparser than the identity's p nonzeros
    # (a moderate one zeroes part of W; a large one all of it: W = 0 is stationary, S = 0)
    assert nnz[0] > nnz[1] > nnz[2]
    assert 0 < nnz[1] < p, nnz
    assert nnz[2] == 0, nnz
    assert rel(fits[2].objective, math.log(3.0)) < 1e-12


# ----------------------------------------------------------------------------------------------
# 6. zero-shot


def test_zero_shot_is_the_identity_and_the_raw_dot_product():
    d = make_problem(71, p=10, n_train=12)
    (fits,) = fit_probes([problem_of(d, [0.0, 1.0])], ProbeSpec.parse("zero_shot"), dtype=F64)
    assert len(fits) == 2
    X = d["X"]
    for fit in fits:
        assert fit.kind == "identity"
        torch.testing.assert_close(fit.matrix_tensor(), torch.eye(10, dtype=F64))
        np.testing.assert_array_equal(fit.matrix(), np.eye(10, dtype=np.float32))
        torch.testing.assert_close(fit.transform(X), X)
        torch.testing.assert_close(fit.similarity(X), X @ X.T)
        raw = naive_logits(X, d["held"])
        concepts, local = torch.unique(d["held"].reshape(-1), return_inverse=True)
        S = fit.similarity(X[concepts])
        i, j, k = local.reshape(-1, 3).unbind(-1)
        mine = torch.stack([S[j, k], S[i, k], S[i, j]], -1)
        assert torch.equal(mine.argmax(-1), raw.argmax(-1))
        torch.testing.assert_close(mine, raw)


# ----------------------------------------------------------------------------------------------
# 7. argument validation


@pytest.mark.parametrize(
    "family,penalty",
    [
        ("fulll", "shrinkage"),
        ("lowrank:3", "shrinkage"),
        ("full", "l2"),
        ("full", "ridge"),
        ("rank", "shrinkage"),
        ("rank:", "shrinkage"),
        ("rank:0", "shrinkage"),
        ("rank:-2", "shrinkage"),
        ("rank:2.5", "shrinkage"),
        ("pca:x", "frobenius"),
        ("pca", "frobenius"),
        ("full:3", "shrinkage"),
        ("diagonal:2", "shrinkage"),
        ("zero_shot:1", "shrinkage"),
    ],
)
def test_parse_rejects_bad_specs(family, penalty):
    with pytest.raises(ValueError):
        ProbeSpec.parse(family, penalty)


def test_parse_accepts_good_specs():
    assert ProbeSpec.parse("rank:7", "frobenius") == ProbeSpec("rank", "frobenius", 7)
    assert ProbeSpec.parse("pca:3").name == "pca:3"
    assert ProbeSpec.parse("diagonal", "l1") == ProbeSpec("diagonal", "l1", None)
    assert not ProbeSpec.parse("zero_shot").fitted and ProbeSpec.parse("full").fitted


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("family", ["full", "zero_shot", "diagonal"])
def test_bad_lambda_raises(bad, family):
    d = make_problem(81, p=6, n_train=8, n_trip=40)
    with pytest.raises(ValueError):
        fit_probes([problem_of(d, [0.1, bad])], ProbeSpec.parse(family), dtype=F64)
    with pytest.raises(ValueError):  # a bad lambda in a later problem is caught too
        fit_probes([problem_of(d, [0.1]), problem_of(d, [bad])], ProbeSpec.parse(family))


def test_empty_lambda_list_raises():
    d = make_problem(82, p=6, n_train=8, n_trip=40)
    with pytest.raises(ValueError):
        fit_probes([problem_of(d, [])], ProbeSpec.parse("full"), dtype=F64)


# ----------------------------------------------------------------------------------------------
# 8. rotation invariance of the full shrinkage fit


def test_rotation_invariance_full_shrinkage():
    d = make_problem(91, p=20, n_train=12)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(3)).double())
    dQ = dict(d, X=d["X"] @ Q)
    spec = ProbeSpec.parse("full", "shrinkage")
    lams = [1e-2, 1e-1]
    fits = fit_probes([problem_of(d, lams)], spec, **TIGHT)[0]
    fitsQ = fit_probes([problem_of(dQ, lams)], spec, **TIGHT)[0]
    for a, b in zip(fits, fitsQ, strict=True):
        assert rel(b.objective, a.objective) < 1e-7, (b.objective, a.objective)
        torch.testing.assert_close(
            held_probs_from_fit(b, dQ), held_probs_from_fit(a, d), atol=1e-5, rtol=0
        )
        # the transforms are conjugate: W_Q = Q^T W Q
        torch.testing.assert_close(
            b.matrix_tensor(), Q.T @ a.matrix_tensor() @ Q, atol=1e-4, rtol=1e-4
        )


# ----------------------------------------------------------------------------------------------
# building blocks and edge cases


@pytest.mark.parametrize(
    "m,p,svals",
    [
        (12, 20, [1.0, 0.3, 0.1, 1e-2, 1e-3, 1e-4, 1e-5, 3e-6]),
        (30, 10, [5.0, 1.0, 0.5, 1e-3, 1e-5, 2e-6]),
    ],
)
def test_row_space_basis_keeps_every_real_direction(m, p, svals):
    """The reduction's basis must span the whole row space, weak directions included (dropping a
    direction the training features use would make the reduced fit inexact)."""
    g = torch.Generator().manual_seed(7)
    r = len(svals)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))
    Vt, _ = torch.linalg.qr(torch.randn(p, r, generator=g, dtype=F64))
    Xt = (U * torch.tensor(svals, dtype=F64)) @ Vt.T  # rank r < min(m, p)
    V, C = probe.row_space_basis(Xt)
    assert V.shape == (p, r)
    torch.testing.assert_close(V.T @ V, torch.eye(r, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(C, Xt @ V, atol=1e-12, rtol=0)
    # nothing lost (to the Gram eigendecomposition's accuracy: ~eps * s_max^2 / s_min)
    torch.testing.assert_close(C @ V.T, Xt, atol=1e-9 * svals[0], rtol=0)
    with pytest.raises(ValueError):
        probe.row_space_basis(torch.zeros(5, 4, dtype=F64))


@pytest.mark.parametrize("dependent", [False, True])
def test_orthonormal_step_of_the_basis(dependent):
    """The basis's orthonormalising step spans the given columns and is orthonormal to rounding:
    by Cholesky QR for a nearly orthonormal V, by Householder QR for one far from it (here two
    equal columns, whose V^T V is singular)."""
    from recovery_assets.core.probe import reduction

    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(60, 8, dtype=F64, generator=g))
    V = Q + 1e-3 * torch.randn(60, 8, dtype=F64, generator=g)
    if dependent:
        V[:, 7] = V[:, 6]
    off = float(torch.linalg.matrix_norm(V.T @ V - torch.eye(8, dtype=F64)))
    assert (off >= 0.5) == dependent  # which path the step takes
    B = reduction._orthonormal(V)
    torch.testing.assert_close(B.T @ B, torch.eye(8, dtype=F64), atol=1e-13, rtol=0)
    torch.testing.assert_close(B @ (B.T @ V), V, atol=1e-13, rtol=0)  # the same span


def test_rank_k_larger_than_p():
    """rank:k with k > p is a valid family (docs/method.md §4: W is k x p, initialised to
    eye(k, p); nothing bounds k): it fits, without an error, to the plain reference's optimum.
    pca:k with more components than the features have is the case that is refused, with its own
    message."""
    d = make_problem(111, p=8, n_train=12, n_trip=200)
    spec = ProbeSpec.parse("rank:10", "shrinkage")
    (fit,) = fit_probes([problem_of(d, [0.05])], spec, **TIGHT)[0]  # no ValueError
    W = fit.matrix_tensor().to(F64)
    assert W.shape == (10, 8) and fit.converged
    f_fit = float(naive_objective(W, d, 0.05, "rank", "shrinkage"))
    W_ref, f_ref = naive_fit(d, 0.05, "rank", "shrinkage", k=10)
    assert rel(f_fit, f_ref) < 1e-7, (f_fit, f_ref)
    assert rel(fit.objective, f_fit) < 1e-8, (fit.objective, f_fit)
    # the similarities depend on W^T W only, which the optimum determines
    torch.testing.assert_close(W.T @ W, W_ref.T @ W_ref, atol=1e-6, rtol=0)
    f_start = float(naive_objective(torch.eye(10, 8, dtype=F64), d, 0.05, "rank", "shrinkage"))
    assert f_fit < f_start - 1e-2
    with pytest.raises(
        ValueError, match=r"^pca:10 asks for 10 components but the features have at most 8$"
    ):
        fit_probes([problem_of(d, [0.05])], ProbeSpec.parse("pca:10", "shrinkage"), **TIGHT)


@pytest.mark.parametrize("family", ["full", "diagonal", "rank:5"])
def test_default_float32_fit_reaches_the_float64_optimum(family):
    d = make_problem(121, p=20, n_train=12)
    spec = ProbeSpec.parse(family, "shrinkage")
    (f32,) = fit_probes([problem_of(d, [0.01])], spec)[0]  # defaults: float32, rel_tol 1e-7
    (f64,) = fit_probes([problem_of(d, [0.01])], spec, **TIGHT)[0]
    W = f32.matrix_tensor().to(F64)
    f_plain = probe_objective(W, d["X"], d["trip"], d["ans"], 0.01, spec)
    assert f32.converged
    assert rel(f_plain, f64.objective) < 1e-5, (f_plain, f64.objective)
    assert rel(f32.objective, f_plain) < 1e-5, (f32.objective, f_plain)


# ----------------------------------------------------------------------------------------------
# 9. device argument


def test_device_argument():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert probe.resolve_device("auto").type == expected
    assert probe.resolve_device(None).type == expected
    assert probe.resolve_device("cpu") == torch.device("cpu")
    d = make_problem(101, p=10, n_train=10, n_trip=150)
    spec = ProbeSpec.parse("full", "shrinkage")
    (cpu,) = fit_probes([problem_of(d, [0.05])], spec, device="cpu", **TIGHT)[0]
    f32 = {**TIGHT, "dtype": torch.float32}
    (auto,) = fit_probes([problem_of(d, [0.05])], spec, device="auto", **f32)[0]
    assert cpu.A.device.type == "cpu"
    assert auto.A.device.type == expected
    # both reach the plain float64 fit of the unreduced problem (an independent computation)
    _, f_ref = naive_fit(d, 0.05, "full", "shrinkage")
    assert rel(cpu.objective, f_ref) < 1e-7
    assert rel(auto.objective, f_ref) < 1e-5


def test_the_column_preconditioner_grows_with_lambda_per_fit():
    """D_e^2 = sigma_e^2 + precond_flat(lambda) mean(sigma^2), for each fit of a batch: the flat
    part is PRECOND_FLAT up to PRECOND_LAMBDA and grows as sqrt(lambda) above it."""
    om = probe.objective
    assert om.precond_flat(om.PRECOND_LAMBDA / 100) == om.PRECOND_FLAT
    assert om.precond_flat(om.PRECOND_LAMBDA * 100) == pytest.approx(10 * om.PRECOND_FLAT)
    d = make_problem(12, p=20, n_train=12)
    spec = ProbeSpec.parse("full", "shrinkage")
    lams = [1e-6, 1e-2, 1.0]
    ctx = probe.batching._prepare(problem_of(d, lams), spec, "cpu", F64, True)
    obj = om._objective(ctx, spec, lams)
    q, r = ctx.X.shape[-1], ctx.r[0]
    sig2 = (ctx.X[0] ** 2).sum(0)[:r]
    mean = sig2.sum() / r
    flats = []
    for b, lam in enumerate(lams):
        D2 = torch.diagonal(obj.x0[b].reshape(q, q))[:r] ** 2
        flat = (D2 - sig2) / mean
        torch.testing.assert_close(flat, torch.full_like(flat, om.precond_flat(lam)))
        flats.append(float(flat[0]))
    assert flats[0] < flats[1] < flats[2]


def test_scale_search_finds_the_exact_one_dimensional_optimum(monkeypatch):
    """The start's scale search (Newton steps on the convex problem's slope, bracketed) against
    an independent root finder on the same slope, in the three regimes: a root inside the
    bounds (with and without a Frobenius-like linear term), a slope negative everywhere (the
    upper bound), and one positive from t = 0 on (the lower bound)."""
    from scipy.optimize import brentq

    from recovery_assets.core.probe.data_term import answer_first
    from recovery_assets.core.probe.objective import _scale_search

    om = probe.objective
    gen = torch.Generator().manual_seed(3)
    N = 400
    L0 = torch.randn(1, N, 3, generator=gen, dtype=F64).expand(5, -1, -1).clone()
    ans = torch.randint(0, 3, (N,), generator=gen)
    # fits 0-2: answers the logits favour in 60% of triplets (a finite root)
    favoured = L0[0].argmax(-1)
    ans = torch.where(torch.rand(N, generator=gen) < 0.6, favoured, ans)
    # fit 3: always the largest logit, logits small enough that the softmax does not saturate
    # below t = 1e6 (separable: the slope stays negative, t -> the upper bound)
    # fit 4: always the smallest logit (the slope is positive at t = 0: the lower bound)
    answers = torch.stack([ans, ans, ans, favoured, L0[0].argmin(-1)])
    w = torch.full((N,), 1.0 / N, dtype=F64)
    lam = torch.tensor([0.0, 1e-3, 1e-2, 0.0, 0.0], dtype=F64)
    v0 = torch.full((5,), 3.0, dtype=F64)
    L0[3] *= 1e-5
    got = torch.cat(
        [
            _scale_search(answer_first(L0[b : b + 1], answers[b]), w, lam[b : b + 1], v0[b : b + 1])
            for b in range(5)
        ]
    )

    def slope(t, b):  # the derivative of the 1-D objective, written out afresh
        P = torch.softmax(t * L0[b], -1)
        chosen = L0[b].gather(-1, answers[b, :, None])[:, 0]
        return float((w * ((P * L0[b]).sum(-1) - chosen)).sum() + lam[b] * v0[b])

    for b in range(3):
        want = brentq(slope, 1e-3, 1e3, args=(b,), xtol=1e-14)
        assert 1e-2 < want < 1e6
        assert abs(float(got[b]) - want) <= 1e-9 * want, (b, float(got[b]), want)
    assert float(got[0]) > float(got[1]) > float(got[2])  # the linear term pulls t down
    assert float(got[3]) == 1e6 and float(got[4]) == 1e-2
    # batched over fits: the same results, in a few evaluations of the slope (bisection to
    # float64 precision took 60 after the bracket)
    calls = []
    original = om._ray_slope

    def counting(*a, **k):  # count the slope's evaluations
        slope = original(*a, **k)
        return lambda *x, **y: calls.append(1) or slope(*x, **y)

    monkeypatch.setattr(om, "_ray_slope", counting)
    batched = _scale_search(answer_first(L0[:3], ans), w, lam[:3], v0[:3])
    assert torch.allclose(batched, got[:3], rtol=1e-12, atol=0)
    assert 0 < len(calls) <= 20, len(calls)
