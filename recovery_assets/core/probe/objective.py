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
    _choice_gradient,
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
# A fit whose symmetric phase reaches ADAPT_AFTER (after at least ADAPT_MIN_ITER iterations) with
# a positive curvature a_e in every coordinate leaves it there for the adapted phase
# (docs/exact-fit.md, "Adapted phase"): a symmetric phase preconditioned elementwise by that
# curvature, run to SYMMETRIC_PHASE_TOL (paper rule; the column phase follows) or to the optimum
# rule's own test, which ends the fit (``_column_phase`` runs only if that test did not end it).
# Every other fit runs its symmetric phase on, unchanged, to SYMMETRIC_PHASE_TOL. ADAPT_AFTER
# None: no adapted phase.
ADAPT_AFTER: float | None = 1e-4
ADAPT_MIN_ITER = 10
# The ray step (docs/exact-fit.md, "Ray step"): after every accepted L-BFGS step, the exact
# minimum along the ray through the new point (all of W scaled by c), found from its logits by at
# most RAY_STEPS Newton steps in t = c^2 within [1 / RAY_BOUND, RAY_BOUND]. False: none.
RAY_STEP = True
RAY_STEPS = 6
RAY_BOUND = 4.0


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
    start: Callable  # () -> (logits at x0 (B, N, 3), penalty at x0 (B,), w)
    # the same objective over symmetric A (reduced rotation-invariant fits only, else None), and
    # the maps between its coordinates and x: (split, (y[, idx]) -> x, x -> y)
    symmetric: tuple[optim.Split, Callable, Callable] | None = None
    # (x rows, idx, iterations) -> (ok (k,), the adapted scale of the ok rows): which fits suit
    # the adapted phase at x; (scale, fits) -> that phase over ``fits`` as ``symmetric``
    adapted_scale: Callable | None = None
    adapted: Callable | None = None
    # (x rows, idx) -> (k, q): diag of the data term's gradient with respect to M = A^T A
    metric_gradient: Callable | None = None


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
    # block-diagonal per set of active fits; S sampled at it, the gradient sparse or dense
    n_c = Xg.shape[1]
    patterns, sparse_gradient = _sparse_patterns(ctx.trip, n_c, dev)
    pidx_t = None if sparse_gradient else transposed_index(ctx.pidx, n_c)  # dense: G + G^T
    blocks: dict[tuple, _BlockPattern] = {}

    def block(idx) -> _BlockPattern | None:
        if patterns is None:
            return None
        key = tuple(gidx[idx].tolist())
        if key not in blocks:
            blocks.clear()  # the active set only shrinks: older blocks are not needed again
            blocks[key] = _BlockPattern.of([patterns[g] for g in key], n_c)
        return blocks[key]

    def backward(U, gl, idx):
        """(G + G^T) U for the logits' gradient gl of fits idx: sparse or dense."""
        sparse = block(idx) if sparse_gradient else None
        dense_t = None if pidx_t is None else sel(pidx_t, idx)
        return _data_backward(U, gl, sel(ctx.pidx, idx), sparse, dense_t)

    # The objective split at its linear image Z = model(x), for L-BFGS (optim.Split): the line
    # search's trial points need only the data term's value at Z (no matmul); the gradient's
    # matmul is taken at the accepted point only. A value's aux is its float64 logits and
    # lambda R (``_pack``): the gradient needs the logits, the ray step both ("Ray step": logits
    # scale by c^2 along the ray, the penalty by c^degree). ``smooth``: the objective in one call.
    def value(Z, x, idx):
        loss, logits = _data_value(Z, sel(ctx.pidx, idx), sel(ctx.w, idx), block(idx))
        pen_v = torch.zeros_like(loss)
        if penalised:
            v, _ = pen(x, idx, grad=False)
            pen_v = (lam[idx] * v).to(torch.float64)
        return loss + pen_v, _pack(logits, pen_v)

    def logit_gradient(aux, idx):
        """The data term's gradient with respect to the logits packed in ``aux``."""
        return _choice_gradient(_unpack(aux)[0], sel(ctx.w, idx), dt)[1]

    def gradient(Z, x, aux, idx):
        g = back(backward(Z, logit_gradient(aux, idx), idx), x, idx)
        if penalised:
            _, gp = pen(x, idx)
            g = g.addcmul_(lam[idx, None], gp)
        return g

    power = P.degree(family) / 2  # the penalty's degree in t = c^2

    def ray(aux, idx):
        L, pen_v = _unpack(aux)
        w = sel(ctx.w, idx)
        t = _ray_search(L, w, pen_v, power)
        Lt, pen_t = L * t[:, None, None], pen_v * t**power
        f = _choice_gradient(Lt, w, dt, gradient=False)[0] + pen_t
        return t, f, _pack(Lt, pen_t)

    split = optim.Split(model, value, gradient, ray if RAY_STEP else None)

    def smooth(x, idx):
        Z = split.image(x, idx)
        loss, aux = value(Z, x, idx)
        return loss, gradient(Z, x, aux, idx)

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
        return L0, v0, sel(ctx.w, every)

    obj = _Objective(smooth, split, x0, lam, unpack, shape, start)
    if family in ("full", "pca") and ctx.V[0] is not None and penalised and P.rotation_invariant:
        obj.symmetric = _symmetric(split, Dinv[:, :, None], D[:, :, None], q)

        def metric_gradient(x, idx):
            """(k, q): the diagonal of the data term's gradient with respect to M = A^T A at x
            (rows of fits idx), U^T G U with dL/dS = G at the pairs (dL/dZ = (G + G^T) Z, here
            with Z -> U)."""
            Z = model(x, idx)
            _, aux = value(Z, x, idx)
            U = sel(Xg, idx).expand(idx.numel(), -1, -1)
            GU = backward(U, logit_gradient(aux, idx), idx)
            return 0.5 * (U * GU).sum(1)

        def adapted_scale(x, idx, iterations):
            """Fits that suit the adapted phase: a penalty (lambda > 0), at least ADAPT_MIN_ITER
            iterations behind them (a shorter phase has not met the curvature it would adapt
            to) and a_e = g_e + lambda > 0 in every coordinate (near separability the data
            term's gradient can be negative: its curvature is then no guide)."""
            g_m = metric_gradient(x, idx)
            a = g_m.to(torch.float64) + lam[idx].to(torch.float64)[:, None]
            ok = (lam[idx] > 0) & (iterations >= ADAPT_MIN_ITER)
            ok &= (a > 0).all(-1) & torch.isfinite(a).all(-1)
            return ok, _adapted_scale(a[ok], lam[idx][ok], D[idx][ok])

        def adapted(scale, fits):
            return _symmetric(split, scale, 1.0 / scale, q, fits)

        obj.metric_gradient = metric_gradient
        obj.adapted_scale, obj.adapted = adapted_scale, adapted
    return obj


def _adapted_scale(a: torch.Tensor, lam: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The adapted phase's coordinates (docs/exact-fit.md, "Adapted phase"): A = Omega * y
    elementwise for symmetric y, Omega_ij = (a_i + a_j)^-1/2 with a (k, q) float64,
    a_e = g_e + lambda, the part of
    the objective's diagonal curvature over symmetric A that the data term's gradient g_M with
    respect to M = A^T A and the penalty give (the Gauss-Newton part is left out: with it the
    realistic fits take 1.3-2.8x the iterations), floored at lambda / 10 and at 1e-6 of the
    largest (a fit takes the phase only if every a_e > 0 before the floor). Returns the
    (k, q, q) scale of ``_symmetric``: x = A D = y * Omega * D."""
    floor = torch.maximum(0.1 * lam.to(torch.float64), 1e-6 * a.abs().amax(-1))
    a = torch.maximum(a, floor.clamp_min(1e-30)[:, None])
    omega = torch.rsqrt(a[:, :, None] + a[:, None, :])
    return (omega * D.to(torch.float64)[:, None, :]).to(D.dtype)


def _symmetric(
    split: optim.Split,
    scale: torch.Tensor,
    inverse: torch.Tensor,
    q: int,
    fits: torch.Tensor | None = None,
):
    """The reduced objective over symmetric A (docs/exact-fit.md, "Symmetric phase"), for the
    batch's fits ``fits`` (the phase's problem i is fit fits[i]; None: all), in coordinates y with
    x = A D = y * scale elementwise, for symmetric y: the symmetric phase's scale is D^-1 down
    the rows (``Dinv[:, :, None]``: A = D^-1 y D^-1, preconditioned on both sides), the adapted
    phase's a full (k, q, q) Omega D (``_adapted_scale``); ``inverse`` is 1 / scale. Returns the
    split objective in y and the maps y -> x (all rows, or the rows of ``idx``) and x -> y (for
    symmetric A).

    The gradient in y is projected onto the symmetric matrices, sym(scale * g_x) with
    sym(a) = (a + a^T) / 2, so every L-BFGS iterate (a symmetric start plus combinations of
    symmetric gradients and steps) stays symmetric and ``to_x`` need not symmetrise it again:
    one transpose per iteration instead of four.
    """

    def times(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return a.reshape(-1, q, q) * s

    def sym(a: torch.Tensor) -> torch.Tensor:
        return (a + a.transpose(1, 2)).mul_(0.5)

    every = torch.arange(scale.shape[0], device=scale.device)

    def rows(idx):
        """scale's rows for ``idx``, without a copy when they are all of them in order (the
        adapted phase's scale is k x q x q: copied three times an iteration it cost several
        percent of a p = 1,024 fit's time)."""
        whole = idx is None or (idx.numel() == every.numel() and bool((idx == every).all()))
        return scale if whole else scale[idx]

    def to_x(y, idx=None):
        return times(y, rows(idx)).reshape(y.shape[0], -1)

    def adjoint(g, idx):  # the gradient in y of f(x(y)), projected onto symmetric y
        return sym(times(g, rows(idx))).reshape(g.shape[0], -1)

    def from_x(x):
        return times(x, inverse).reshape(x.shape[0], -1)

    base = split if fits is None else _subset(split, fits)
    split_y = optim.Split(
        lambda y, idx: base.image(to_x(y, idx), idx),
        lambda Z, y, idx: base.value(Z, to_x(y, idx), idx),
        lambda Z, y, aux, idx: adjoint(base.gradient(Z, to_x(y, idx), aux, idx), idx),
        base.ray,
    )
    return split_y, to_x, from_x


def _scale_search(
    L0: torch.Tensor,
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
    pen = lam.to(torch.float64) * v0.to(torch.float64)
    slope = _ray_slope(L0, w, pen.reshape(L0.shape[0]), 1.0)
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


def _ray_slope(L: torch.Tensor, w: torch.Tensor, pen: torch.Tensor, power):
    """phi'(t) (and phi''(t) with ``curvature``) of phi(t) = CE(t L) + pen t^power per fit: the
    objective along the ray through logits L (B, N, 3) float64, the chosen odd one's first
    (``data_term.answer_first``), with penalty term pen (B,).

    With delta the two other logits less the answer's, CE(t L) = log(1 + sum exp(t delta)) per
    triplet: its slope is E_P[delta] (= E_P[L] - L[answer]), its curvature Var_P[delta] >= 0
    (weighted sums over the triplets). Written out over the two deltas: torch's softmax and
    sums over a last dimension of 3 or 2 take several times as long, and this runs a few times
    per iteration."""
    B = L.shape[0]
    d1 = L[..., 1] - L[..., 0]  # (B, N) each
    d2 = L[..., 2] - L[..., 0]
    ww = w.expand(B, -1).to(torch.float64)

    def slope(t: torch.Tensor, curvature: bool = False):
        u1, u2 = t[:, None] * d1, t[:, None] * d2
        m = torch.maximum(u1, u2).clamp_min_(0)  # the answer's own term is exp(0)
        e1, e2 = (u1 - m).exp_(), (u2 - m).exp_()
        z = m.neg_().exp_().add_(e1).add_(e2)
        pd1, pd2 = e1.div_(z).mul_(d1), e2.div_(z).mul_(d2)  # p_j delta_j
        m1 = pd1 + pd2
        g = torch.linalg.vecdot(ww, m1) + pen * power * t ** (power - 1)
        if not curvature:
            return g
        var = pd1.mul_(d1).add_(pd2.mul_(d2)).sub_(m1.mul_(m1))
        h = torch.linalg.vecdot(ww, var)
        return g, h + pen * power * (power - 1) * t ** (power - 2)

    return slope


def _ray_search(
    L: torch.Tensor,
    w: torch.Tensor,
    pen: torch.Tensor,
    power: float,
    steps: int = RAY_STEPS,
    bound: float = RAY_BOUND,
    rel_tol: float = 1e-7,
) -> torch.Tensor:
    """The ray step's t (docs/exact-fit.md, "Ray step"): argmin over t in [1 / bound, bound] of
    phi(t) = CE(t L) + pen t^power per fit, from t = 1 (the current point). phi is convex in t
    (a cross-entropy of logits linear in t, pen >= 0, power >= 1): Newton steps on phi', kept
    inside the bracket that the signs of phi' have narrowed (a step past a side that is still the
    bound goes to the bound, where a slope pointing outwards ends the search; else the bracket is
    bisected), at most ``steps`` of them, until a step is below ``rel_tol`` (Newton's error is
    then of its square); near the optimum the ray's best t is close to 1 and 2-3 steps settle
    it.
    The caller keeps t only where it lowers the objective."""
    slope = _ray_slope(L, w, pen, power)
    t = torch.ones_like(pen)
    lo, hi = torch.full_like(pen, 1.0 / bound), torch.full_like(pen, bound)
    done = torch.zeros_like(pen, dtype=torch.bool)
    for _ in range(steps):
        g, h = slope(t, curvature=True)
        pinned = ((t >= bound) & (g <= 0)) | ((t <= 1.0 / bound) & (g >= 0))  # a bound's best
        lo, hi = torch.where(g <= 0, t, lo), torch.where(g > 0, t, hi)
        newton = t - g / h
        settled = (newton - t).abs() <= rel_tol * t  # at the root (False for a NaN step)
        inside = (newton > lo) & (newton < hi)
        # past a side of the bracket that is still the bound: to the bound (else bisect)
        past = ((newton >= hi) & (hi >= bound)) | ((newton <= lo) & (lo <= 1.0 / bound))
        nxt = torch.where(past, newton.clamp(1.0 / bound, bound), (lo + hi) / 2)
        nxt = torch.where(inside | settled, newton, nxt)
        t = torch.where(done | pinned, t, nxt)
        done = done | settled | pinned
        if bool(done.all()):
            break
    return t


def _pack(logits: torch.Tensor, pen: torch.Tensor) -> torch.Tensor:
    """A value's aux: the (B, N, 3) float64 logits and lambda R (B,) as one (B, 3N + 1) row each
    (the optimiser indexes and stores aux as one tensor)."""
    return torch.cat([logits.reshape(logits.shape[0], -1), pen[:, None]], 1)


def _unpack(aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, N, 3), lambda R (B,)) of ``_pack``."""
    return aux[:, :-1].reshape(aux.shape[0], -1, 3), aux[:, -1]


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
            L0, v0, w = obj.start()
            t = _scale_search(L0, w, lam, v0)
            x0 = x0 * torch.sqrt(t).to(x0.dtype)[:, None]
        first = None
        if obj.symmetric is not None and _symmetric_phase(paper, rel_tol):
            x0, first, progress, ended = _symmetric_phases(
                obj, x0, max_iter, rel_tol, history, progress, paper, len(lams)
            )
        kw = dict(max_iter=max_iter, history=history, rel_tol=rel_tol, paper=paper)
        if first is None:
            res = optim.lbfgs(obj.split, x0, progress=progress, **kw)
        else:  # one fit, several phases: count them all
            res = _column_phase(obj.split, x0, first, ended, progress, **kw)

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


def _symmetric_phase(paper: optim.PaperStop | None, rel_tol: float) -> bool:
    """Whether a reduced fit starts with the symmetric phase: under the paper rule, and under the
    optimum rule when its own test is tighter than the phase's."""
    tol = SYMMETRIC_PHASE_TOL
    return tol is not None and (paper is not None or rel_tol < tol)


def _symmetric_phases(obj, x0, max_iter, rel_tol, history, progress, paper, n):
    """The symmetric phase from x0, and the adapted phase for the fits that leave it at
    ADAPT_AFTER (docs/exact-fit.md, "Adapted phase"). Returns the column coordinates x at their
    end, the phases' result (iterations and evaluations summed over both, f where each fit's
    last phase ended), ``progress`` shifted past them, and which fits they ended (B,): under the
    optimum rule, those whose adapted phase its own test ended."""
    split_y, to_x, from_x = obj.symmetric
    # Under the optimum rule the adapted phase runs to the rule's own test: ended earlier (1e-6),
    # float32 fits could be left where the column coordinates' first steps gain less than the
    # objective's rounding, and the column phase then stops at once, short of the optimum.
    end = SYMMETRIC_PHASE_TOL if paper is not None else rel_tol
    adapt = ADAPT_AFTER is not None and ADAPT_AFTER > SYMMETRIC_PHASE_TOL
    scales: dict[int, torch.Tensor] = {}

    def decide(y, idx, iterations):
        ok, scale = obj.adapted_scale(to_x(y, idx), idx, iterations)
        scales.update(zip(idx[ok].tolist(), scale, strict=True))
        return ok

    base = progress
    first = optim.lbfgs(
        split_y, from_x(x0), max_iter=max_iter, history=history, rel_tol=SYMMETRIC_PHASE_TOL,
        progress=None if base is None else _all_active(base, n),
        release=(ADAPT_AFTER, decide) if adapt else None,
    )  # fmt: skip
    x = to_x(first.x)
    ended = torch.zeros_like(first.converged)
    if scales:  # the adapted phase, for the fits that left the symmetric phase for it
        order = sorted(scales)
        fits = torch.tensor(order, device=x.device)
        # (stacked once the symmetric phase's curvature pairs are freed)
        scale = torch.stack([scales[b] for b in order])
        scales.clear()
        split_a, to_xa, from_xa = obj.adapted(scale, fits)
        offset = int(first.iterations.max())
        part = optim.lbfgs(
            split_a, from_xa(x[fits]), max_iter=max_iter, history=history, rel_tol=end,
            progress=None if base is None else _all_active(_shifted(base, offset), n),
            caps=max_iter - first.iterations[fits],
        )  # fmt: skip
        x[fits] = to_xa(part.x)
        first.iterations[fits] += part.iterations
        first.evaluations[fits] += part.evaluations
        first.f[fits] = part.f
        # under the optimum rule the rule's own test ended these fits, at an optimum over
        # symmetric A, which is an optimum of the whole problem: they need no column phase
        if paper is None:
            ended[fits] = part.converged
    if base is not None:
        progress = _shifted(base, int(first.iterations.max()))
    return x, first, progress, ended


def _column_phase(split, x0, first, ended, progress, *, max_iter, **kw):
    """The column phase (docs/exact-fit.md, "Symmetric phase") from x0 for the fits the symmetric
    phases did not end (``ended``), with the phases' iterations and evaluations (``first``)
    counted in."""
    res = optim.OptimResult(
        x0.clone(), first.f.clone(), first.iterations.clone(), first.evaluations.clone(),
        ended.clone(),
    )  # fmt: skip
    rest = (~ended).nonzero().squeeze(-1)
    if rest.numel() == 0:
        if progress is not None:
            progress(0, 0)
        return res
    part = optim.lbfgs(
        split if rest.numel() == ended.numel() else _subset(split, rest), x0[rest],
        max_iter=max_iter, progress=progress, caps=max_iter - first.iterations[rest], **kw,
    )  # fmt: skip
    res.x[rest], res.f[rest], res.converged[rest] = part.x, part.f, part.converged
    res.iterations[rest] += part.iterations
    res.evaluations[rest] += part.evaluations
    return res


def _subset(split: optim.Split, fits: torch.Tensor) -> optim.Split:
    """``split`` over the batch's fits ``fits`` (its problem i is fit fits[i])."""
    return optim.Split(
        lambda x, idx: split.image(x, fits[idx]),
        lambda z, x, idx: split.value(z, x, fits[idx]),
        lambda z, x, aux, idx: split.gradient(z, x, aux, fits[idx]),
        None if split.ray is None else lambda aux, idx: split.ray(aux, fits[idx]),
    )


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
