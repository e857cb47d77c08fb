"""Batched full-batch optimisers for many independent probe problems at once.

Every problem ``b`` of a batch has its own parameter vector ``x[b]``, its own objective and its own
optimiser state (L-BFGS history, step size, convergence flag). One iteration advances all problems
that have not converged with a handful of batched tensor operations: there is no Python loop over
problems in the inner iteration. Problems that converge are frozen and drop out of the evaluations.

``fg(x, idx)`` evaluates the objectives and gradients of the problems ``idx`` (a 1-D long tensor
into the batch) at parameters ``x`` (``len(idx)`` rows) and returns ``(f, g)``.

L-BFGS can also take the objective split at a linear image (``Split``): f(x) = h(K x, x) where the
costly part is the linear map K (for the probe: Z = X W^T, a matmul). The optimiser then keeps
K x for the current iterate and forms K d once per direction; every trial step of the line search
is K x + t K d (no product with K), and the gradient (the second product) is computed only at the
accepted step. One iteration then applies K twice however many trial steps the line search takes.
K x is recomputed from x every ``RESYNC`` iterations so that rounding cannot accumulate.

Stopping rules (docs/method.md §4):

- ``optimum`` (the default): the relative objective change between iterations falls below
  ``rel_tol`` on two consecutive iterations, or the gradient vanishes, or no descent step can be
  found at working precision (the objective is then at its floor), or ``max_iter`` is reached.
- ``paper`` (``PaperStop``): the published fits' L-BFGS settings (torch's L-BFGS with
  ``tolerance_change`` 1e-4 and ``tolerance_grad`` 1e-7). Iterations come in inner runs of at
  most 150 iterations and 450 evaluations; a run ends when the objective changes by less than
  1e-4 in one iteration, when the step's largest entry is at most 1e-4, or when the largest
  gradient entry is below 1e-7; runs follow one another (the curvature history carried over)
  until the objective at the end of a run differs from the end of the previous one by less than
  1e-7 relative. A quasi-Newton direction along which the objective falls by less than 1e-4 per
  unit step (g . d > -1e-4) ends the fit where it stands: torch ends the run there without a
  step, and every later run stops at the same test, at the same point. A steepest-descent step
  (the first of a fit or of a phase, or a restart) is not held to that test: its g . d says
  nothing of the curvature. ``max_iter`` still caps the iterations in all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Set while a batch's failure or an interrupt (SIGTERM/SIGINT) is propagating: batches running
# on other threads stop at their next iteration instead of running to their end.
STOP = threading.Event()


class Stopped(Exception):
    """A fit stopped early because STOP was set."""


Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
RESYNC = 25  # iterations between exact recomputations of the linear image K x
# L-BFGS curvature pairs kept. The two-loop recursion reads every pair twice per iteration and is
# memory-bound (at r = 880 a pair is 6 MB): 5 pairs instead of 10 cost 0-16% more iterations on
# the realistic benchmark problems and save about 10% per iteration on a single fit and 17% on
# the 132-fit job's batches (docs/performance.md, "L-BFGS history").
HISTORY = 5
# A ``Split`` with a ray takes its ray step once the problem's last relative change is below
# RAY_AFTER: while the steps are large, moving along the ray too disturbs the curvature pairs
# more than it gains (on the realistic p = 1,024 problems at exponent -1.0: 130 iterations with
# the step from the start, 109 with this gate; docs/performance.md, "The ray step").
RAY_AFTER = 1e-4
# On the CPU, rows of at least DOT_LOOP_MIN entries take one BLAS dot each: torch.linalg.vecdot
# forms the product first and takes about twice as long (117 against 65 us at 774,400 entries).
DOT_LOOP_MIN = 2**17


@dataclass
class Split:
    """An objective f(x) = h(K x, x) with K linear, as three batched callables.

    ``image(x, idx)`` -> K x (any leading-batch tensor); ``value(z, x, idx)`` -> (f, aux) at
    z = K x; ``gradient(z, x, aux, idx)`` -> the gradient at that point, given the ``aux`` that
    ``value`` returned there (a leading-batch tensor, e.g. the derivative with respect to z).
    """

    image: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    value: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]
    gradient: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # ``ray(aux, idx)`` -> (t, f, aux) (optional): the best point c x, c = sqrt(t), on the ray
    # through the points whose ``value`` gave ``aux``, its objective and its aux, from ``aux``
    # alone (no product with K); for objectives whose value along the ray is known in closed
    # form (the probe's: logits scale by c^2, its penalties are homogeneous). None: no ray step.
    ray: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None

    @classmethod
    def plain(cls, fg: Objective) -> Split:
        """A plain objective as a split with K = 0: each value also computes the gradient."""

        def image(x, idx):
            return x.new_zeros(x.shape[0], 1)

        return cls(image, lambda z, x, idx: fg(x, idx), lambda z, x, aux, idx: aux)


@dataclass(frozen=True)
class PaperStop:
    """The published fits' stopping rule (torch's L-BFGS settings, restarted until the objective
    settles): see the module docstring."""

    inner_iter: int = 150
    inner_evals: int = 450
    abs_tol: float = 1e-4  # an inner run ends when one iteration changes f by less than this
    step_tol: float = 1e-4  # ... or when the step's largest entry is at most this
    grad_tol: float = 1e-7  # ... or when the largest gradient entry is at most this
    dir_tol: float = 1e-4  # the fit ends at a quasi-Newton direction with g . d > -dir_tol
    rel_tol: float = 1e-7  # runs end when two consecutive runs' end points are this close


STOP_RULES = ("optimum", "paper")


def stop_rule(name: str) -> PaperStop | None:
    """The stopping rule called ``name``: None for ``optimum`` (``lbfgs``'s own ``rel_tol``)."""
    if name not in STOP_RULES:
        raise ValueError(f"unknown stopping rule {name!r}; expected one of {', '.join(STOP_RULES)}")
    return PaperStop() if name == "paper" else None


@dataclass
class OptimResult:
    x: torch.Tensor  # (B, P) final parameters
    f: torch.Tensor  # (B,) final objectives
    iterations: torch.Tensor  # (B,) iterations taken
    evaluations: torch.Tensor  # (B,) objective evaluations
    converged: torch.Tensor  # (B,) bool: a stopping rule other than max_iter fired
    released: torch.Tensor | None = None  # (B,) bool: ended early by ``release`` (or None)


def _rel_change(f_old: torch.Tensor, f_new: torch.Tensor) -> torch.Tensor:
    scale = torch.maximum(torch.maximum(f_old.abs(), f_new.abs()), torch.ones_like(f_new))
    return (f_old - f_new).abs() / scale


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner products of two (B, P) tensors."""
    if a.device.type != "cpu" or a.shape[-1] < DOT_LOOP_MIN or a.shape[0] == 0:
        return torch.linalg.vecdot(a, b)
    return torch.stack([torch.dot(u, v) for u, v in zip(a, b, strict=True)])


def _two_loop(g, s_hist, y_hist, rho, gamma, newest):
    """L-BFGS two-loop recursion, batched. Entries with rho == 0 are no-ops."""
    m = s_hist.shape[0]
    q = -g
    alphas = []
    order = [(newest - i) % m for i in range(m)]
    for i in order:
        a = rho[i] * _rowdot(s_hist[i], q)
        q.addcmul_(a[:, None], y_hist[i], value=-1.0)
        alphas.append(a)
    r = q.mul_(gamma[:, None])
    for i, a in zip(reversed(order), reversed(alphas), strict=True):
        beta = rho[i] * _rowdot(y_hist[i], r)
        r.addcmul_((a - beta)[:, None], s_hist[i])
    return r


def lbfgs(
    fg: Objective | Split,
    x0: torch.Tensor,
    *,
    max_iter: int = 1000,
    history: int = HISTORY,
    rel_tol: float = 1e-7,
    grad_tol: float = 0.0,
    c1: float = 1e-4,
    max_ls: int = 30,
    progress: Callable[[int, int], None] | None = None,
    paper: PaperStop | None = None,
    caps: torch.Tensor | None = None,
    release: tuple[float, Callable] | None = None,
) -> OptimResult:
    """Minimise B independent smooth objectives with L-BFGS and a backtracking Armijo line search.

    ``fg`` is a plain objective or a ``Split`` one. The optimiser state is kept for the active
    problems only and compacted when problems converge, so one iteration costs a fixed number of
    batched tensor operations on the active set. ``paper``: stop by the published fits' rule
    instead of ``rel_tol`` (see the module docstring). ``caps`` (B,): each problem's own
    iteration cap (at most ``max_iter``); a problem that reaches it is not converged.
    A ``Split`` with a ``ray`` takes a ray step after every accepted step once the problem's
    previous relative change is below ``RAY_AFTER``: the point moves along the ray through it to
    the best point there (when that is lower), before the gradient is taken; the curvature pair
    is the whole move's (docs/exact-fit.md, "Ray step").
    ``release`` (optimum rule only): ``(tol, decide)``. When a problem's relative change has been
    below ``tol`` (looser than ``rel_tol``) on two consecutive iterations, ``decide(x, idx,
    iterations)`` is asked once, for all problems reaching that point in one iteration at once
    (their rows of x, their batch indices, their iteration counts) and returns a bool per
    problem: those it accepts end there (converged, and marked in the result's ``released``);
    the others run on as without ``release`` (the same iterates, to the rounding of a smaller
    batch's products).
    """
    split = fg if isinstance(fg, Split) else Split.plain(fg)
    B, P = x0.shape
    dev, dt = x0.device, x0.dtype
    ids = torch.arange(B, device=dev)  # original index of each active problem
    x = x0.clone()
    z = split.image(x, ids)
    f, aux = split.value(z, x, ids)
    g = split.gradient(z, x, aux, ids)
    out_x, out_f = x.clone(), f.clone()
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    evals = torch.ones(B, dtype=torch.long, device=dev)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    s_hist = torch.zeros(history, B, P, device=dev, dtype=dt)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(history, B, device=dev, dtype=dt)
    gamma = torch.ones(B, device=dev, dtype=dt)
    small = torch.zeros(B, dtype=torch.long, device=dev)
    fresh = torch.ones(B, dtype=torch.bool, device=dev)  # next step is a steepest-descent step
    # ``release``: the looser test's counter, whether ``decide`` was asked, and its answers
    if release is not None and paper is not None:
        raise ValueError("release needs the optimum rule (paper is None)")
    small_r = torch.zeros_like(small)
    asked = torch.zeros_like(fresh, dtype=torch.bool)
    released = torch.zeros(B, dtype=torch.bool, device=dev) if release is not None else None

    # the paper rule's state: iterations and evaluations of the current inner run, and the
    # objective at the end of the previous run (NaN before the first ends)
    run_it = torch.zeros(B, dtype=torch.long, device=dev)
    run_ev = torch.zeros(B, dtype=torch.long, device=dev)
    run_end = torch.full((B,), float("nan"), device=dev, dtype=dt)

    last_rel = torch.full((B,), float("inf"), device=dev, dtype=f.dtype)
    bad_start = ~torch.isfinite(f)  # e.g. float32 overflow: nothing can be fitted from here
    done = (g.abs().amax(-1) <= (paper.grad_tol if paper else grad_tol)) | bad_start
    for it in range(max_iter + 1):
        leave = done if caps is None else done | (iters[ids] >= caps[ids])
        if leave.any():  # record finished problems and compact the state
            fin = ids[leave]
            out_x[fin], out_f[fin] = x[leave], f[leave]
            converged[ids[done]] = True
            keep = ~leave
            ids, x, f, g, z = ids[keep], x[keep], f[keep], g[keep], z[keep]
            last_rel = last_rel[keep]
            s_hist, y_hist, rho = s_hist[:, keep], y_hist[:, keep], rho[:, keep]
            gamma, small, fresh = gamma[keep], small[keep], fresh[keep]
            small_r, asked = small_r[keep], asked[keep]
            run_it, run_ev, run_end = run_it[keep], run_ev[keep], run_end[keep]
        if ids.numel() == 0 or it == max_iter:
            break
        if it and it % RESYNC == 0:  # K x afresh, not accumulated from the steps
            z = split.image(x, ids)
        slot = it % history
        d = _two_loop(g, s_hist, y_hist, rho, gamma, (it - 1) % history)
        gd = _rowdot(g, d)
        bad = ~(gd < 0) | ~torch.isfinite(gd)
        if bad.any():  # not a descent direction: restart from steepest descent
            d[bad] = -g[bad]
            gd[bad] = -(g[bad] * g[bad]).sum(-1)
            rho[:, bad] = 0
            gamma[bad] = 1
        restart = fresh | bad
        # the paper rule: a quasi-Newton direction that promises too little ends the fit here
        quiet = None if paper is None else (gd > -paper.dir_tol) & ~restart
        t = torch.ones(ids.numel(), device=dev, dtype=dt)
        if restart.any():  # a steepest-descent step is scaled to a unit L1 move at most
            t = torch.where(restart, torch.clamp(1.0 / g.abs().sum(-1), max=1.0), t)
        ev_before = evals[ids].clone()
        zd = split.image(d, ids)  # K d: every trial point's image is z + t K d
        x_new = z_new = f_new = aux_new = None
        pending = torch.ones(ids.numel(), dtype=torch.bool, device=dev)
        floor = torch.zeros_like(pending)
        for _ in range(max_ls):
            pi = pending.nonzero().squeeze(-1)
            whole = pi.numel() == ids.numel()
            if whole:
                xt = torch.addcmul(x, t[:, None], d)
                zt = torch.addcmul(z, _bcast(t, zd), zd)
                ft, at = split.value(zt, xt, ids)
            else:
                tp = t[pi]
                xt = torch.addcmul(x[pi], tp[:, None], d[pi])
                zt = torch.addcmul(z[pi], _bcast(tp, zd), zd[pi])
                ft, at = split.value(zt, xt, ids[pi])
            evals[ids[pi]] += 1
            ok = torch.isfinite(ft) & (ft <= f[pi] + c1 * t[pi] * gd[pi])
            if x_new is None:  # first trial covers every problem: take it whole, mend rows later
                x_new, z_new, f_new, aux_new = xt, zt, ft, at
            else:
                acc = pi[ok]
                x_new[acc], z_new[acc], f_new[acc], aux_new[acc] = xt[ok], zt[ok], ft[ok], at[ok]
            pending[pi[ok]] = False
            if quiet is not None:  # no step for those: the first trial is not taken
                pending &= ~quiet
            back = pending[pi]  # rejected, and backtracking
            rej = pi[back]
            if rej.numel() == 0:
                break
            # safeguarded quadratic interpolation of the step, else halve it
            tr, fr = t[rej], ft[back]
            denom = 2.0 * (fr - f[rej] - gd[rej] * tr)
            tq = -gd[rej] * tr * tr / denom
            tq = torch.where(torch.isfinite(tq) & (denom > 0), tq, 0.5 * tr)
            t[rej] = torch.minimum(torch.maximum(tq.to(dt), 0.1 * tr), 0.5 * tr)
            # A step whose predicted decrease is below the convergence tolerance cannot matter:
            # stop backtracking (the objective is at its working-precision floor). Not so for a
            # steepest-descent restart, whose first length (a unit L1 move) says nothing of the
            # curvature: it backtracks until accepted or max_ls.
            futile = -gd[rej] * t[rej] < 0.1 * rel_tol * f[rej].abs().clamp_min(1.0)
            futile &= ~restart[rej]
            pending[rej[futile]] = False
            floor[rej[futile]] = True
            if not pending.any():
                break
        stalled = pending | floor  # no sufficient decrease found: at the numerical floor
        if quiet is not None:
            stalled |= quiet
            evals[ids[quiet]] -= 1  # torch stops before its line search: nothing evaluated
        moved = ~stalled
        if split.ray is not None and moved.any():
            gate = moved & (last_rel < RAY_AFTER)
            if gate.any():
                _ray_step(split.ray, gate, ids, x_new, z_new, f_new, aux_new)
        if moved.all():  # the gradient only at the accepted points
            g_new = split.gradient(z_new, x_new, aux_new, ids)
        else:
            g_new = g.clone()
            if moved.any():
                mi = moved.nonzero().squeeze(-1)
                g_new[mi] = split.gradient(z_new[mi], x_new[mi], aux_new[mi], ids[mi])
        if stalled.any():  # those keep their current point
            x_new[stalled], z_new[stalled], f_new[stalled] = x[stalled], z[stalled], f[stalled]
        s = torch.sub(x_new, x, out=s_hist[slot])  # written straight into the history
        y = torch.sub(g_new, g, out=y_hist[slot])
        sy = _rowdot(s, y)
        yy = _rowdot(y, y)
        good = (sy > 1e-10 * yy.clamp_min(1e-30)) & (sy > 0) & moved
        if not bool(good.all()):  # a pair that would spoil the curvature model is not kept
            s[~good] = 0.0
            y[~good] = 0.0
        rho[slot] = torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0)
        gamma = torch.where(good, sy / yy.clamp_min(1e-30), gamma)
        if paper is None:
            rel = _rel_change(f, f_new)
            small = torch.where(rel < rel_tol, small + 1, torch.zeros_like(small))
            done = (small >= 2) | stalled
            if grad_tol > 0:
                done |= g_new.abs().amax(-1) <= grad_tol
            if release is not None:
                r_tol, decide = release
                small_r = torch.where(rel < r_tol, small_r + 1, torch.zeros_like(small_r))
                ask = (small_r >= 2) & ~asked & ~done
                if ask.any():
                    ai = ask.nonzero().squeeze(-1)
                    asked[ai] = True
                    go = ai[decide(x_new[ai], ids[ai], iters[ids[ai]] + 1)]
                    released[ids[go]] = True
                    done[go] = True
        else:
            step = t * d.abs().amax(-1)  # the step's largest entry (t > 0)
            done, run_it, run_ev, run_end = _paper_step(
                paper, f, f_new, g_new, evals[ids] - ev_before, run_it, run_ev, run_end, step
            )
            done |= stalled
        last_rel = _rel_change(f, f_new)
        x, z, f, g = x_new, z_new, f_new, g_new
        fresh = torch.zeros_like(fresh)
        iters[ids] += 1
        if progress is not None:
            progress(it + 1, int((~done).sum()))
        if STOP.is_set():
            raise Stopped("the fit was stopped (another batch failed, or the process is stopping)")
    if ids.numel():  # max_iter reached
        out_x[ids], out_f[ids] = x, f
    converged &= torch.isfinite(out_f)
    return OptimResult(out_x, out_f, iters, evals, converged, released)


def _ray_step(ray: Callable, moved, ids, x, z, f, aux) -> None:
    """Move the ``moved`` rows of (x, z, f, aux) in place to the best point on their rays, where
    that is lower than f (``Split.ray``)."""
    mi = moved.nonzero().squeeze(-1)
    t, f_r, aux_r = ray(aux[mi], ids[mi])
    take = torch.isfinite(f_r) & (f_r < f[mi]) & (t != 1)
    if not bool(take.any()):
        return
    if bool(take.all()) and mi.numel() == x.shape[0]:  # every row (one fit: no indexing)
        c = torch.sqrt(t).to(x.dtype)
        x.mul_(c[:, None])
        z.mul_(_bcast(c, z))
        f.copy_(f_r)
        aux.copy_(aux_r)
        return
    rows = mi[take]
    c = torch.sqrt(t[take]).to(x.dtype)
    x[rows] *= c[:, None]
    z[rows] *= _bcast(c, z)
    f[rows] = f_r[take]
    aux[rows] = aux_r[take]


def _paper_step(rule: PaperStop, f, f_new, g_new, evaluated, run_it, run_ev, run_end, step=None):
    """One iteration under the paper rule: advance the inner runs, end those whose run is over,
    and say which problems are done (a run ended within ``rule.rel_tol`` of the previous one's
    end, or the gradient vanished). ``step``: each problem's largest step entry (None: not
    tested). Returns (done, run_it, run_ev, run_end)."""
    run_it = run_it + 1
    run_ev = run_ev + evaluated  # trial points (torch counts its closure calls alike)
    flat = (
        g_new.abs().amax(-1) <= rule.grad_tol
        if g_new is not None
        else torch.zeros_like(run_it, dtype=torch.bool)
    )
    ended = (
        (run_it >= rule.inner_iter)
        | (run_ev >= rule.inner_evals)
        | ((f - f_new).abs() < rule.abs_tol)
        | flat
    )
    if step is not None:
        ended |= step <= rule.step_tol
    settled = (run_end - f_new).abs() / run_end.abs().clamp_min(1e-12) < rule.rel_tol
    done = flat | (ended & settled)  # (NaN before the first run ended: not settled)
    run_end = torch.where(ended, f_new, run_end)
    run_it = torch.where(ended, torch.zeros_like(run_it), run_it)
    run_ev = torch.where(ended, torch.zeros_like(run_ev), run_ev)
    return done, run_it, run_ev, run_end


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Step sizes (B,) shaped to multiply a (B, ...) tensor."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def proximal_gradient(
    fg: Objective,
    x0: torch.Tensor,
    weight: torch.Tensor,
    *,
    max_iter: int = 5000,
    rel_tol: float = 1e-7,
    max_ls: int = 40,
    progress: Callable[[int, int], None] | None = None,
    paper: PaperStop | None = None,
) -> OptimResult:
    """Minimise smooth(x) + sum_i weight[b] * |x_i| for B problems: accelerated proximal gradient.

    FISTA with backtracking on the local Lipschitz estimate and a monotone restart (the momentum is
    dropped whenever the composite objective would rise), so the objective never increases.
    ``fg`` evaluates the smooth part only; the returned ``f`` is the composite objective.
    ``paper``: the paper rule's runs and tolerances on the composite objective (no gradient
    criterion: the composite objective has none).
    """
    x = x0.clone()
    B, _ = x.shape
    dev, dt = x.device, x.dtype
    every = torch.arange(B, device=dev)

    def composite(fs, xs, ids):
        return fs + weight[ids] * xs.abs().sum(-1)

    fs, _ = fg(x, every)
    F = composite(fs, x, every)
    z = x.clone()  # extrapolated point
    theta = torch.ones(B, device=dev, dtype=dt)
    step = torch.ones(B, device=dev, dtype=dt)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    small = torch.zeros(B, dtype=torch.long, device=dev)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    evals = torch.ones(B, dtype=torch.long, device=dev)
    run_it = torch.zeros(B, dtype=torch.long, device=dev)
    run_ev = torch.zeros(B, dtype=torch.long, device=dev)
    run_end = torch.full((B,), float("nan"), device=dev, dtype=dt)
    for it in range(max_iter):
        idx = active.nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        zi = z[idx]
        ev_before = evals[idx].clone()
        fz, gz = fg(zi, idx)
        evals[idx] += 1
        L = 1.0 / step[idx]
        x_new = zi.clone()
        fx_new = fz.clone()
        pending = torch.ones(idx.numel(), dtype=torch.bool, device=dev)
        for _ in range(max_ls):
            pi = pending.nonzero().squeeze(-1)
            lr = 1.0 / L[pi]
            u = zi[pi] - lr[:, None] * gz[pi]
            thr = (weight[idx[pi]] * lr)[:, None]
            xt = torch.sign(u) * torch.clamp(u.abs() - thr, min=0.0)
            ft, _ = fg(xt, idx[pi])
            evals[idx[pi]] += 1
            diff = xt - zi[pi]
            bound = fz[pi] + (gz[pi] * diff).sum(-1) + 0.5 * L[pi] * (diff * diff).sum(-1)
            ok = torch.isfinite(ft) & (ft <= bound + 1e-12 * bound.abs())
            acc = pi[ok]
            x_new[acc], fx_new[acc] = xt[ok], ft[ok]
            pending[acc] = False
            if not pending.any():
                break
            L[pi[~ok]] *= 2.0
        F_new = composite(fx_new, x_new, idx)
        Fi = F[idx]
        worse = (F_new > Fi) | pending
        # monotone restart: keep the old iterate, drop the momentum, retry from it next time
        x_keep = torch.where(worse[:, None], x[idx], x_new)
        F_keep = torch.where(worse, Fi, F_new)
        th = theta[idx]
        th_new = 0.5 * (1 + torch.sqrt(1 + 4 * th * th))
        mom = torch.where(worse, torch.zeros_like(th), (th - 1) / th_new)
        z[idx] = x_keep + mom[:, None] * (x_keep - x[idx])
        theta[idx] = torch.where(worse, torch.ones_like(th), th_new)
        step[idx] = 1.0 / (L * 0.9)  # let the step grow again a little
        rel = _rel_change(Fi, F_keep)
        x[idx], F[idx] = x_keep, F_keep
        iters[idx] += 1
        tiny = (rel < rel_tol) & ~worse
        small[idx] = torch.where(tiny, small[idx] + 1, torch.where(worse, small[idx], 0))
        stuck = worse & (th <= 1.0)  # a plain proximal step from the iterate failed to improve
        if paper is None:
            done = (small[idx] >= 2) | stuck
        else:  # a momentum restart takes no step: it neither counts in a run nor ends one
            evaluated = evals[idx] - ev_before
            stop, r_it, r_ev, r_end = _paper_step(
                paper, Fi, F_keep, None, evaluated, run_it[idx], run_ev[idx], run_end[idx]
            )
            moved = ~worse
            done = (stop & moved) | stuck
            run_it[idx] = torch.where(moved, r_it, run_it[idx])
            run_ev[idx] = torch.where(moved, r_ev, run_ev[idx] + evaluated)
            run_end[idx] = torch.where(moved, r_end, run_end[idx])
        converged[idx] |= done
        active[idx] &= ~done
        if progress is not None:
            progress(it + 1, int(active.sum()))
        if STOP.is_set():
            raise Stopped("the fit was stopped (another batch failed, or the process is stopping)")
    return OptimResult(x=x, f=F, iterations=iters, evaluations=evals, converged=converged)
