"""The batched objective and one batch's fit (docs/exact-fit.md, "The optimiser").

``_objective`` builds the objective of B fits in the optimiser's coordinates: the family's
parameters (diagonal w, the full or reduced A, the rank-k M) column-preconditioned by
D_e^2 = sigma_e^2 / mean + PRECOND_FLAT ("Preconditioning"), the data term (``data_term``, dense
or sparse) plus lambda times the penalty (``penalties``, dispatched through its object), split at
its linear image Z for the line search ("Split line search"). ``_scale_search`` is the first
move, the exact 1-D search along the scaled identities ("Start"). ``_fit_context`` runs the
optimiser (``optim.lbfgs``, or ``optim.proximal_gradient`` for a non-smooth penalty; docs/method.md
§4, "Fitting" and "Stopping rules") and returns the fits as ``FittedProbe``.

PRECOND_FLAT is read at call time from this module: change it here (``objective.PRECOND_FLAT``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from recovery_assets.core import optim
from recovery_assets.core.probe.data_term import (
    _BlockPattern,
    _data_backward,
    _data_value,
    _sparse_patterns,
    _triplet_logits,
    transposed_index,
)
from recovery_assets.core.probe.fitted import FittedProbe
from recovery_assets.core.probe.kernels import _back, _image
from recovery_assets.core.probe.penalties import PENALTY
from recovery_assets.core.probe.spec import ProbeSpec

if TYPE_CHECKING:
    from recovery_assets.core.probe.batching import _Context

# The flat part of the column preconditioner of a reduced problem: D_e^2 = sigma_e^2 / mean +
# precond_flat(lambda) (``_objective``), PRECOND_FLAT times max(1, sqrt(lambda / PRECOND_LAMBDA)).
PRECOND_FLAT = 2.0
PRECOND_LAMBDA = 1e-4
# The proximal-gradient method (a non-smooth penalty) may take this many times ``max_iter``.
PROX_ITER_FACTOR = 5
# ... and its optimum-rule change test is rel_tol times this: a first-order method gains far less
# per iteration near the optimum than L-BFGS, so two changes below 1e-7 can come well before it
# (bench/gpu_check.py's L1 problem in float32: 1.1e-4 above the plain reference fit at 1e-7,
# 2e-5 at 1e-8 and 1e-9).
PROX_TOL_FACTOR = 0.01
# The symmetric phase of a reduced fit (docs/exact-fit.md, "Symmetric phase") runs until this
# relative change on two consecutive iterations, under either stopping rule; the fit then goes on
# in the full r x r coordinates to the rule's own stopping test. None: no symmetric phase.
SYMMETRIC_PHASE_TOL: float | None = 1e-5


def precond_flat(lam: float) -> float:
    """The flat part of the column preconditioner for a fit at ``lam`` (docs/exact-fit.md,
    "Preconditioning"): PRECOND_FLAT up to PRECOND_LAMBDA, growing as sqrt(lambda) above it."""
    return PRECOND_FLAT * max(1.0, (lam / PRECOND_LAMBDA) ** 0.5)


@dataclass
class _Objective:
    """The batched objective of B fits, in the optimiser's coordinates x."""

    smooth: Callable  # (x, idx) -> (f, g): data term (+ smooth penalty)
    split: optim.Split  # the same objective split at its linear image Z = model(x)
    x0: torch.Tensor  # (B, P) the identity in the optimiser's coordinates
    lam: torch.Tensor  # (B,)
    unpack: Callable  # (x row, b) -> the family's parameter (w, A or M) in problem coordinates
    shape: tuple
    start: Callable  # () -> (logits at x0 (B, N, 3), penalty at x0 (B,), ans, w)
    # the same objective over symmetric A (reduced rotation-invariant fits only, else None), and
    # the maps between its coordinates and x: (split, x -> its coordinates, back to x)
    symmetric: tuple[optim.Split, Callable, Callable] | None = None


def _objective(
    ctx: _Context, spec: ProbeSpec, lams: list[float], gid: list[int] | None = None
) -> _Objective:
    """Fit b uses group gid[b] of the context (default: all use group 0)."""
    Xg = ctx.X
    G, _, q = Xg.shape
    dev, dt = Xg.device, Xg.dtype
    B = len(lams)
    lam = torch.tensor(lams, dtype=dt, device=dev)
    gidx = torch.tensor(gid if gid is not None else [0] * B, dtype=torch.long, device=dev)
    family = spec.family
    P = PENALTY[spec.penalty]
    penalised = P.smooth  # the penalty is part of the smooth objective (not the proximal step's)

    def sel(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Per-fit rows of a per-group tensor; broadcast (no copy) when there is one group."""
        return a if G == 1 else a[gidx[idx]]

    if family == "diagonal":
        shape = (q,)
        x0 = torch.ones(B, q, dtype=dt, device=dev)
        D = None

        def model(x, idx):
            return sel(Xg, idx) * x[:, None, :]

        def back(dZ, x, idx):
            return (dZ * sel(Xg, idx)).sum(1)

        def pen(x, idx, grad=True):
            return P.diagonal(x)

    else:
        rows = spec.k if family == "rank" else q
        shape = (rows, q)
        # Column preconditioning of the reduced problem: A' = A D with D_e^2 = sigma_e^2 /
        # mean(sigma^2) + flat(lambda) (``precond_flat``), sigma_e the norm of the e-th training
        # coordinate. The data term's curvature grows with sigma_e^2 and the penalty's is flat;
        # this change of variables balances them (an exact reparametrisation: same objective,
        # same optimum, far fewer L-BFGS iterations). The penalty's share grows with lambda, so
        # the flat part does too: D is per fit, applied to the parameters (x D^-1) so that the
        # fits of one problem share its features. Own-coordinate fits keep D = 1.
        # Padded coordinates (merged problems of smaller r) have mask 0: they start at 0, get
        # zero gradient from the data and are excluded from the penalty's identity and trace.
        r = torch.tensor(ctx.r, dtype=dt, device=dev)  # (G,) true fitting dimension
        mask = (torch.arange(q, device=dev)[None, :] < r[:, None]).to(dt)  # (G, q)
        if ctx.V[0] is not None:
            sig2 = (Xg.to(torch.float64) ** 2).sum(1)[gidx]  # (B, q)
            mean = sig2.sum(-1, keepdim=True) / r[gidx, None].to(torch.float64)
            flat = torch.tensor([precond_flat(v) for v in lams], dtype=torch.float64, device=dev)
            D = torch.sqrt(sig2 + flat[:, None] * mean).clamp_min(1e-30).to(dt)  # (B, q)
            Dinv = 1.0 / D  # products, not quotients, in the iteration (division is slow)
        else:
            D = Dinv = None
        eye_kq = torch.eye(rows, q, dtype=dt, device=dev)  # eye(k, p) for rank:k, any k
        x0 = eye_kq.unsqueeze(0) * mask[gidx][:, None, :]  # (B, rows, q)
        if D is not None:
            x0.mul_(D[:, None, :])
        x0 = x0.reshape(B, -1)
        p_raw = ctx.p[0]

        lead = ctx.lead if G == 1 else None

        def params(x, idx):
            """The parameters x D^-1 (a fresh tensor) in problem coordinates."""
            M = x.reshape(-1, *shape)
            return M.clone() if D is None else M * Dinv[idx][:, None, :]

        def model(x, idx):
            M = x.reshape(-1, *shape) if D is None else params(x, idx)
            return _image(sel(Xg, idx), M, lead)

        def back(dZ, x, idx):
            g = _back(dZ, sel(Xg, idx), lead)
            if D is not None:
                g.mul_(Dinv[idx][:, None, :])
            return g.reshape(x.shape[0], -1)

        if penalised:  # its true dimension: r when reduced (padding excluded), else p (or k)
            term = P.matrix(family, p_raw, lambda idx: sel(r, idx), lambda idx: sel(mask, idx))

        def pen(x, idx, grad=True):
            """R at x and its gradient with respect to x (None unless ``grad``)."""
            v, g = term(params(x, idx), idx)
            if not grad:
                return v, None
            g = g.mul_(2) if D is None else g.mul_(2 * Dinv[idx][:, None, :])
            return v, g.reshape(x.shape[0], -1)

    # the sparse data term: one pair pattern per group (None: dense; data_term._sparse_patterns),
    # block-diagonal per set of active fits
    n_c = Xg.shape[1]
    patterns = _sparse_patterns(ctx.trip, n_c, dev)
    pidx_t = transposed_index(ctx.pidx, n_c) if patterns is None else None  # dense: G + G^T
    blocks: dict[tuple, _BlockPattern] = {}

    def block(idx) -> _BlockPattern | None:
        if patterns is None:
            return None
        key = tuple(gidx[idx].tolist())
        if key not in blocks:
            blocks.clear()  # the active set only shrinks: older blocks are not needed again
            blocks[key] = _BlockPattern.of([patterns[g] for g in key], n_c)
        return blocks[key]

    # The objective split at its linear image Z = model(x), for L-BFGS (optim.Split): the line
    # search's trial points need only the data term's value at Z (no matmul); the gradient's
    # matmul is taken at the accepted point only. ``smooth`` is the same objective in one call.
    def value(Z, x, idx):
        pidx, ans, w = sel(ctx.pidx, idx), sel(ctx.ans, idx), sel(ctx.w, idx)
        loss, gl = _data_value(Z, pidx, ans, w, block(idx))
        if penalised:
            v, _ = pen(x, idx, grad=False)
            loss = loss + (lam[idx] * v).to(torch.float64)
        return loss, gl

    def gradient(Z, x, gl, idx):
        dense_t = None if pidx_t is None else sel(pidx_t, idx)
        dZ = _data_backward(Z, gl, sel(ctx.pidx, idx), block(idx), dense_t)
        g = back(dZ, x, idx)
        if penalised:
            _, gp = pen(x, idx)
            g = g.addcmul_(lam[idx, None], gp)
        return g

    split = optim.Split(model, value, gradient)

    def smooth(x, idx):
        Z = split.image(x, idx)
        loss, gl = value(Z, x, idx)
        return loss, gradient(Z, x, gl, idx)

    def unpack(xb, b=0):
        if family == "diagonal":
            return xb.clone()
        g = int(gidx[b])
        out = xb.reshape(shape) if D is None else xb.reshape(shape) / D[b]
        if ctx.V[g] is not None:  # reduced: drop the padding coordinates
            out = out[: ctx.r[g], : ctx.r[g]]
        return out.clone()

    def start():
        every = torch.arange(B, device=dev)
        Z = model(x0, every)
        L0 = _triplet_logits(Z, sel(ctx.pidx, every), block(every))
        v0 = pen(x0, every)[0]
        return L0, v0, sel(ctx.ans, every), sel(ctx.w, every)

    symmetric = None
    if family in ("full", "pca") and ctx.V[0] is not None and penalised and P.rotation_invariant:
        symmetric = _symmetric(split, D, Dinv, q, B)
    return _Objective(smooth, split, x0, lam, unpack, shape, start, symmetric)


def _symmetric(split: optim.Split, D, Dinv, q: int, B: int):
    """The reduced objective over symmetric A, preconditioned on both sides (docs/exact-fit.md,
    "Symmetric phase"): A = D^-1 y D^-1 for symmetric y, i.e. the column coordinates
    x = A D = D^-1 y. Returns the split objective in y and the maps y -> x and x -> y (the
    latter for symmetric A: y = D x).

    The gradient in y is projected onto the symmetric matrices, sym(D^-1 g_x) with
    sym(a) = (a + a^T) / 2, so every L-BFGS iterate (a symmetric start plus combinations of
    symmetric gradients and steps) stays symmetric and ``to_x`` need not symmetrise it again:
    one transpose per iteration instead of four.
    """

    def rows(a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return a.reshape(-1, q, q) * scale[:, :, None]

    def sym(a: torch.Tensor) -> torch.Tensor:
        return (a + a.transpose(1, 2)).mul_(0.5)

    def to_x(y, idx):
        return rows(y, Dinv[idx]).reshape(y.shape[0], -1)

    def adjoint(g, idx):  # the gradient in y of f(x(y)), projected onto symmetric y
        return sym(rows(g, Dinv[idx])).reshape(g.shape[0], -1)

    def from_x(x):
        return rows(x, D).reshape(B, -1)

    split_y = optim.Split(
        lambda y, idx: split.image(to_x(y, idx), idx),
        lambda Z, y, idx: split.value(Z, to_x(y, idx), idx),
        lambda Z, y, gl, idx: adjoint(split.gradient(Z, to_x(y, idx), gl, idx), idx),
    )
    return split_y, lambda y: to_x(y, torch.arange(B, device=y.device)), from_x


def _scale_search(
    L0: torch.Tensor,
    ans: torch.Tensor,
    w: torch.Tensor,
    lam: torch.Tensor,
    v0: torch.Tensor,
    bounds: tuple[float, float] = (1e-2, 1e6),
    steps: int = 60,
    rel_tol: float = 1e-13,
) -> torch.Tensor:
    """The best scale t of the start: argmin over t of mean CE(t L0) + lam t v0, per fit.

    From the identity, the transform c I (t = c^2) has logits t L0 (L0: the logits at the
    identity) and penalty t v0 (shrinkage: 0, since a scaled identity is not penalised;
    Frobenius: t ||I||^2). This is convex in t: its derivative, the slope E_P[L0] - L0[answer]
    (weighted, + lam v0), is increasing, with derivative the weighted variance Var_P[L0] >= 0.
    The root is bracketed by quadrupling, then found by Newton steps on the slope, vectorised
    over the fits; a step that leaves the bracket bisects it instead, and a fit stops when its
    step or its bracket is below ``rel_tol`` relative (about 8 evaluations instead of
    bisection's 60), or when its bracket lies outside ``bounds``, to which the result is
    clipped. Moving the start along the one direction the shrinkage penalty leaves free is the
    optimiser's first step: without it, at large lambda the stiff penalty makes L-BFGS steps
    tiny along the free scale and it stops far from the optimum.
    """
    B = L0.shape[0]
    a = ans.expand(B, -1).unsqueeze(-1)
    La = L0.gather(-1, a).squeeze(-1)
    ww = w.expand(B, -1).to(torch.float64)
    pen = (lam.to(torch.float64) * v0.to(torch.float64)).reshape(B)

    def slope(t: torch.Tensor, curvature: bool = False):
        P = torch.softmax(t[:, None, None] * L0, dim=-1)
        PL = P * L0
        m1 = PL.sum(-1)
        g = (ww * (m1 - La)).sum(-1) + pen
        return (g, (ww * ((PL * L0).sum(-1) - m1 * m1)).sum(-1)) if curvature else g

    lo, hi = torch.zeros_like(pen), torch.ones_like(pen)
    while True:
        grow = (slope(hi) < 0) & (hi < bounds[1])
        if not bool(grow.any()):
            break
        lo, hi = torch.where(grow, hi, lo), torch.where(grow, hi * 4, hi)
    # a bracket outside the bounds is settled: the result is clipped to them
    done = (hi <= bounds[0]) | (lo >= bounds[1])
    t = (lo + hi) / 2
    for _ in range(steps):
        if bool(done.all()):
            break
        g, h = slope(t, curvature=True)
        lo, hi = torch.where(g <= 0, t, lo), torch.where(g > 0, t, hi)
        newton = t - g / h
        small = (newton - t).abs() <= rel_tol * t  # at the root to rounding (False for NaN)
        inside = (newton > lo) & (newton < hi)  # False for a NaN step (h = 0)
        nxt = torch.where(inside | small, newton, (lo + hi) / 2)
        settled = small | (hi - lo <= rel_tol * hi) | (hi <= bounds[0]) | (lo >= bounds[1])
        t = torch.where(done, t, nxt)
        done = done | settled
    return t.clamp(*bounds)


def _fit_context(
    ctx: _Context,
    spec: ProbeSpec,
    lams: list[float],
    max_iter: int,
    rel_tol: float,
    history: int,
    gid: list[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    paper: optim.PaperStop | None = None,
) -> list[FittedProbe]:
    """Fit the batch; ``progress(iteration, active fits)`` is called after every iteration;
    ``paper``: stop by the paper rule instead of ``rel_tol``."""
    gid = gid if gid is not None else [0] * len(lams)
    obj = _objective(ctx, spec, lams, gid)
    smooth, x0, lam = obj.smooth, obj.x0, obj.lam
    family, penalty = spec.family, PENALTY[spec.penalty]
    if not penalty.smooth:  # L1: the proximal-gradient method's own term
        res = optim.proximal_gradient(
            smooth, x0, lam, max_iter=_iteration_cap(spec, max_iter),
            rel_tol=rel_tol * PROX_TOL_FACTOR,
            progress=progress, paper=paper,
        )  # fmt: skip
    else:
        if family != "rank":  # W = c I (diagonal: w = c 1) is free under shrinkage: find c
            L0, v0, ans, w = obj.start()
            t = _scale_search(L0, ans, w, lam, v0)
            x0 = x0 * torch.sqrt(t).to(x0.dtype)[:, None]
        first = None
        tol = SYMMETRIC_PHASE_TOL
        if obj.symmetric is not None and tol is not None and (paper is not None or rel_tol < tol):
            split_y, to_x, from_x = obj.symmetric
            first = optim.lbfgs(
                split_y, from_x(x0), max_iter=max_iter, history=history, rel_tol=tol,
                progress=None if progress is None else _all_active(progress, len(lams)),
            )  # fmt: skip
            x0 = to_x(first.x)
            done = int(first.iterations.max())
            if progress is not None:
                progress = _shifted(progress, done)
        res = optim.lbfgs(
            obj.split, x0, max_iter=max_iter, history=history, rel_tol=rel_tol,
            progress=progress, paper=paper,
            caps=None if first is None else max_iter - first.iterations,
        )  # fmt: skip
        if first is not None:  # one fit, two phases: count both
            res.iterations += first.iterations
            res.evaluations += first.evaluations

    fits = []
    for b, lam_b in enumerate(lams):
        g = gid[b]
        param = obj.unpack(res.x[b], b)
        common = dict(
            objective=float(res.f[b]),
            iterations=int(res.iterations[b]),
            evaluations=int(res.evaluations[b]),
            converged=bool(res.converged[b]),
        )
        p, V, P, mu = ctx.p[g], ctx.V[g], ctx.P[g], ctx.mu[g]
        if family == "diagonal":
            fits.append(FittedProbe(spec, lam_b, "diagonal", p, w=param, **common))
        elif V is not None:
            d = penalty.scale(param)  # the profiled d (docs/exact-fit.md)
            fits.append(
                FittedProbe(spec, lam_b, "reduced", p, A=param, V=V, d=d, P=P, mu=mu, **common)
            )
        else:
            fits.append(FittedProbe(spec, lam_b, "matrix", p, M=param, P=P, mu=mu, **common))
    return fits


def _all_active(progress: Callable[[int, int], None], n: int) -> Callable[[int, int], None]:
    """``progress`` with every fit counted as active (the first phase of a fit: a fit that ends
    it has not finished)."""
    return lambda iteration, active: progress(iteration, n)


def _shifted(progress: Callable[[int, int], None], offset: int) -> Callable[[int, int], None]:
    """``progress`` with its iteration counted on from ``offset`` (the second phase of a fit)."""
    return lambda iteration, active: progress(iteration + offset, active)


def _iteration_cap(spec: ProbeSpec, max_iter: int) -> int:
    """The optimiser's own iteration cap: ``max_iter``, or PROX_ITER_FACTOR times it for the
    proximal-gradient method of a non-smooth penalty."""
    return max_iter if PENALTY[spec.penalty].smooth else max_iter * PROX_ITER_FACTOR
