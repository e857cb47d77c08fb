"""The linear probe of docs/method.md §4: fitting a transform W to odd-one-out choices.

Features X (n x p) are mapped to Z = X W^T; the similarity of concepts a and b is
s_ab = z_a . z_b. For a triplet (i, j, k) the logits are [s_jk, s_ik, s_ij] / T, so position 0
("i is the odd one out") is scored by the similarity of the other pair. The objective is the mean
cross-entropy over the training triplets plus lambda * R(W), R not divided by the triplet count:

- shrinkage:  R = ||W - (tr W / p) I||_F^2   (towards any scaled identity)
- frobenius:  R = ||W||_F^2
- l1:         R = sum |W_ij|

Families: ``full`` (W is p x p), ``diagonal`` (W = diag(w)), ``rank:k`` (W is k x p, initialised
to eye(k, p); shrinkage acts on W^T W), ``zero_shot`` (W = I, nothing fitted) and ``pca:k`` (the
features are replaced by their centred scores on the k leading principal axes, (X - mean) P, as
``sklearn.decomposition.PCA.transform`` gives, the mean and axes taken over all n concepts; then a
full k x k W is fitted, so Z = (X - mean) P W_k^T).

Every fit starts from the identity; the optimiser's first move is an exact 1-D search along the
scaled identities c I (``_scale_search``), then L-BFGS (FISTA for L1). Fitting is batched: many
problems (candidate models x lambdas x folds) advance together in one optimiser (see ``optim``), on
any torch device.

The exact reduction for ``full`` with shrinkage or Frobenius penalties (docs/method.md §4,
docs/exact-fit.md): let V (p x r) be an orthonormal basis of the row space of the training
concepts' features. Gradient steps from W = I keep W = V A V^T + d (I - V V^T), and the loss
depends on A alone through the training coordinates U = X_train V. The scalar d enters only the
penalty, so it is profiled out in closed form:

- shrinkage: ||W - alpha I||^2 = ||A||^2 + (p - r) d^2 - (tr A + (p - r) d)^2 / p is minimised
  at d = tr A / r, where it equals ||A - (tr A / r) I_r||^2: the r x r problem's shrinkage penalty.
- frobenius: ||A||^2 + (p - r) d^2 is minimised at d = 0.

So the fit is an r x r problem with the same penalty form, and its optimum is the optimum of the
p x p problem. Held-out concepts are scored with the full W: their part outside V is scaled by d,
so s_ab = (A c_a) . (A c_b) + d^2 (x_a . x_b - c_a . c_b) with c = V^T x.
The L1 penalty and the diagonal family are not rotation invariant; they are fitted in their own
coordinates (L1 with an accelerated proximal-gradient method, being non-smooth).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import torch

from recovery_assets.core import optim
from recovery_assets.core.progress import Progress

CPU_BATCH_FLOPS = 4e8  # target work of one stacked evaluation on the CPU
# Reduced problems of r >= PAD_MIN coordinates are padded with zero columns to a multiple of
# PAD_TO (exact: masked as in ``_merge``, the padding's block of A stays zero). BLAS runs odd sizes
# far below peak: on the 2-core CPU the two r x r products of an iteration take 8-34% less time at
# r = 304, 512, 704, 880, 1008, 1216 than at 301, 509, 700, 865, 1001, 1201.
PAD_TO = 16
PAD_MIN = 256
# Reduced CPU problems of r >= TRI_MIN take a basis in which the training features C are dense in
# their leading columns (the directions of above-average variance) and lower-trapezoidal in the
# rest (``_triangular_tail``). The basis change is orthogonal and the fit is exactly the same; the
# two feature products of an iteration then skip the zero blocks (``_image``, ``_back``), in
# about TRI_ROWS concepts per block.
TRI_MIN = 256
TRI_ROWS = 96
# The flat part of the column preconditioner of a reduced problem: D_e^2 = sigma_e^2 / mean + FLAT
# (``_objective``). Measured on the benchmark's recovery job (4 candidates x 11 lambdas x 3 folds):
# 5 takes 6% fewer L-BFGS iterations than 3 on its r = 865 problems (3,480 against 3,700) and 1%
# more at r = 512; 1 and 0.3 take 13-49% more, 10 and 30 more at small lambda (fewer at large).
PRECOND_FLAT = 5.0
FAMILIES = ("full", "diagonal", "rank", "zero_shot", "pca")
PENALTIES = ("shrinkage", "frobenius", "l1")


@dataclass(frozen=True)
class ProbeSpec:
    """A probe family (with its k for ``rank:k`` / ``pca:k``) and a penalty."""

    family: str = "full"
    penalty: str = "shrinkage"
    k: int | None = None

    @classmethod
    def parse(cls, family: str, penalty: str = "shrinkage") -> ProbeSpec:
        name, _, arg = family.partition(":")
        if name not in FAMILIES:
            raise ValueError(
                f"unknown probe family {family!r}: expected one of full, diagonal, rank:k, "
                "zero_shot, pca:k"
            )
        if penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {penalty!r}: expected one of {', '.join(PENALTIES)}")
        k = None
        if name in ("rank", "pca"):
            if not arg.isdigit() or int(arg) < 1:
                raise ValueError(f"probe family {family!r} needs a positive integer k: {name}:k")
            k = int(arg)
        elif arg:
            raise ValueError(f"probe family {name!r} takes no argument (got {family!r})")
        return cls(name, penalty, k)

    @property
    def name(self) -> str:
        return f"{self.family}:{self.k}" if self.k is not None else self.family

    @property
    def fitted(self) -> bool:
        return self.family != "zero_shot"


# ----------------------------------------------------------------------------------------------
# triplet logits from a similarity matrix


def pair_index(triplets: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices into an n x n similarity matrix of the pairs [jk, ik, ij] of each triplet."""
    i, j, k = triplets.unbind(-1)
    return torch.stack([j * n + k, i * n + k, i * n + j], dim=-1)


def logits_from_similarity(S: torch.Tensor, pidx: torch.Tensor) -> torch.Tensor:
    """Gather the (B, N, 3) logits [s_jk, s_ik, s_ij] from similarities S (B, n, n)."""
    B, n, _ = S.shape
    flat = pidx.reshape(pidx.shape[0], -1).expand(B, -1)
    return S.reshape(B, n * n).gather(1, flat).reshape(B, -1, 3)


# Sparse path: the loss needs S = Z Z^T only at the triplets' pairs, and the gradient's G only has
# those entries. When the pairs are a small part of the n^2 (synthetic jobs: N = 6,400 triplets over
# 865 concepts touch 5% of them) S is sampled at each pair once (SDDMM: S is symmetric, so q
# multiply-adds per unordered pair instead of n^2 q) and dL/dZ = (G + G^T) Z is a sparse-dense
# product over both orientations. The pattern is fixed for a fit, so its CSR structure is built
# once. Dense data (millions of human triplets) keeps the Gram matrix.
SPARSE_RATIO = 8  # sparse when nnz * SPARSE_RATIO < n^2 (both orientations of each pair count)
# Device types on which the sparse path is used. CUDA joins once `bench/gpu_check.py` has shown
# that its sparse fits agree with the dense ones there and are faster.
SPARSE_DEVICES = ("cpu",)


@dataclass
class _PairPattern:
    """One problem's pairs in CSR (row-major) order: each pair once (for sampling S, which is
    symmetric) and in both orientations (for the gradient's G + G^T)."""

    rows: torch.Tensor  # (nnz,) both orientations of every pair
    cols: torch.Tensor  # (nnz,)
    fwd: torch.Tensor  # (3N,) position of (a, b) for the pairs [jk, ik, ij] of each triplet
    rev: torch.Tensor  # (3N,) position of (b, a)
    half_rows: torch.Tensor  # (nnz / 2,) every unordered pair once, as (min, max)
    half_cols: torch.Tensor
    pos: torch.Tensor  # (3N,) position of the pairs [jk, ik, ij] of each triplet in the half


def _pair_pattern(trip: torch.Tensor, n: int) -> _PairPattern:
    i, j, k = trip.unbind(-1)
    first = torch.stack([j, i, i], dim=-1).reshape(-1)
    second = torch.stack([k, k, j], dim=-1).reshape(-1)
    keys = torch.cat([first * n + second, second * n + first])
    uniq, inv = torch.unique(keys, return_inverse=True)  # sorted: CSR order
    half, pos = torch.unique(
        torch.minimum(first, second) * n + torch.maximum(first, second), return_inverse=True
    )
    m = first.shape[0]
    return _PairPattern(
        rows=uniq // n,
        cols=uniq % n,
        fwd=inv[:m],
        rev=inv[m:],
        half_rows=half // n,
        half_cols=half % n,
        pos=pos,
    )


def _csr_index(rows: list[torch.Tensor], size: int) -> torch.Tensor:
    row = torch.cat(rows)
    crow = torch.zeros(size + 1, dtype=torch.long, device=row.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=size), 0)
    return crow


@dataclass
class _BlockPattern:
    """Block-diagonal pattern of a batch of problems over the stacked (B n) x (B n) concepts:
    symmetric (the gradient's G + G^T) and each pair once (where S is sampled)."""

    crow: torch.Tensor
    col: torch.Tensor
    fwd: torch.Tensor  # (B, 3N) positions in the batch's values
    rev: torch.Tensor
    half_crow: torch.Tensor
    half_col: torch.Tensor
    pos: torch.Tensor  # (B, 3N) positions in the batch's sampled similarities
    size: int

    @classmethod
    def of(cls, patterns: list[_PairPattern], n: int) -> _BlockPattern:
        rows, cols, fwd, rev, offset = [], [], [], [], 0
        hrows, hcols, pos, hoffset = [], [], [], 0
        for b, pat in enumerate(patterns):
            rows.append(pat.rows + b * n)
            cols.append(pat.cols + b * n)
            fwd.append(pat.fwd + offset)
            rev.append(pat.rev + offset)
            offset += pat.rows.shape[0]
            hrows.append(pat.half_rows + b * n)
            hcols.append(pat.half_cols + b * n)
            pos.append(pat.pos + hoffset)
            hoffset += pat.half_rows.shape[0]
        size = len(patterns) * n
        return cls(
            crow=_csr_index(rows, size),
            col=torch.cat(cols),
            fwd=torch.stack(fwd),
            rev=torch.stack(rev),
            half_crow=_csr_index(hrows, size),
            half_col=torch.cat(hcols),
            pos=torch.stack(pos),
            size=size,
        )

    def matrix(self, values: torch.Tensor, half: bool = False) -> torch.Tensor:
        crow, col = (self.half_crow, self.half_col) if half else (self.crow, self.col)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": SDDMM/SpMM are stable
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                crow, col, values, (self.size, self.size), check_invariants=False
            )


def _choice_gradient(logits: torch.Tensor, ans: torch.Tensor, w: torch.Tensor, dtype):
    """Weighted cross-entropy of (B, N, 3) float64 logits and its gradient w.r.t. the logits.

    The loss is accumulated in float64 from the (cheap, N x 3) logits: near a flat start (tiny
    features, logits ~1e-8) its changes are far below float32 resolution, and the optimiser's
    convergence test must still see them. The matmuls stay in the working dtype.
    """
    B = logits.shape[0]
    logp = torch.log_softmax(logits, dim=-1)
    a = ans.expand(B, -1).unsqueeze(-1)
    ww = w.expand(B, -1).to(torch.float64)
    loss = -(ww * logp.gather(-1, a).squeeze(-1)).sum(-1)
    gl = logp.exp()
    gl.scatter_add_(-1, a, -torch.ones_like(gl[..., :1]))
    return loss, (gl * ww.unsqueeze(-1)).to(dtype)


def _triplet_logits(Z: torch.Tensor, pidx: torch.Tensor, sparse: _BlockPattern | None):
    """The (B, N, 3) float64 logits [s_jk, s_ik, s_ij] of Z (B, n, q): from S sampled once per
    unordered pair at the sparse pattern, or from the dense Gram matrix S = Z Z^T."""
    B, n, q = Z.shape
    if sparse is not None:
        Zf = Z.reshape(B * n, q)
        ones = torch.ones(sparse.half_col.shape[0], dtype=Z.dtype, device=Z.device)
        S = torch.sparse.sampled_addmm(sparse.matrix(ones, half=True), Zf, Zf.T, beta=0.0)
        return S.values()[sparse.pos].reshape(B, -1, 3).to(torch.float64)
    return logits_from_similarity(Z @ Z.transpose(1, 2), pidx).to(torch.float64)


def _scale_search(
    L0: torch.Tensor,
    ans: torch.Tensor,
    w: torch.Tensor,
    lam: torch.Tensor,
    v0: torch.Tensor,
    bounds: tuple[float, float] = (1e-2, 1e6),
    steps: int = 60,
) -> torch.Tensor:
    """The best scale t of the start: argmin over t of mean CE(t L0) + lam t v0, per fit.

    From the identity, the transform c I (t = c^2) has logits t L0 (L0: the logits at the
    identity) and penalty t v0 (shrinkage: 0, since a scaled identity is not penalised;
    Frobenius: t ||I||^2). This is convex in t, so its derivative is increasing: the root is
    bracketed by quadrupling and found by bisection, vectorised over the fits, then clipped to
    ``bounds``. Moving the start along the one direction the shrinkage penalty leaves free is the
    optimiser's first step: without it, at large lambda the stiff penalty makes L-BFGS steps tiny
    along the free scale and it stops far from the optimum.
    """
    B = L0.shape[0]
    a = ans.expand(B, -1).unsqueeze(-1)
    La = L0.gather(-1, a).squeeze(-1)
    ww = w.expand(B, -1).to(torch.float64)
    pen = (lam.to(torch.float64) * v0.to(torch.float64)).reshape(B)

    def slope(t: torch.Tensor) -> torch.Tensor:
        P = torch.softmax(t[:, None, None] * L0, dim=-1)
        return (ww * ((P * L0).sum(-1) - La)).sum(-1) + pen

    lo, hi = torch.zeros_like(pen), torch.ones_like(pen)
    while True:
        grow = (slope(hi) < 0) & (hi < bounds[1])
        if not bool(grow.any()):
            break
        lo, hi = torch.where(grow, hi, lo), torch.where(grow, hi * 4, hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        up = slope(mid) > 0
        lo, hi = torch.where(up, lo, mid), torch.where(up, mid, hi)
    return ((lo + hi) / 2).clamp(*bounds)


def _data_term(
    Z: torch.Tensor,
    pidx: torch.Tensor,
    ans: torch.Tensor,
    w: torch.Tensor,
    sparse: _BlockPattern | None = None,
):
    """Weighted cross-entropy of the choices and its gradient with respect to Z.

    Z (B, n, q); pidx (B or 1, N, 3) flat pair indices; ans (B or 1, N); w (B or 1, N) weights
    summing to one per problem (1/N: the mean). Dense: S = Z Z^T is formed once; the gradient with
    respect to S is a scatter-add over the triplets; dL/dZ = (G + G^T) Z. With ``sparse`` (the
    batch's pair pattern) S is sampled at the pairs and G + G^T is a sparse matrix: the same values
    for a fraction of the work.
    """
    loss, gl = _data_value(Z, pidx, ans, w, sparse)
    return loss, _data_backward(Z, gl, pidx, sparse)


def _data_value(Z, pidx, ans, w, sparse: _BlockPattern | None = None):
    """The weighted cross-entropy and its gradient with respect to the (B, N, 3) logits."""
    return _choice_gradient(_triplet_logits(Z, pidx, sparse), ans, w, Z.dtype)


def _data_backward(Z, gl, pidx, sparse: _BlockPattern | None = None):
    """dL/dZ = (G + G^T) Z from the logits' gradient gl (B, N, 3)."""
    B, n, q = Z.shape
    if sparse is not None:
        values = torch.zeros(sparse.col.shape[0], dtype=Z.dtype, device=Z.device)
        values.index_add_(0, sparse.fwd.reshape(-1), gl.reshape(-1))
        values.index_add_(0, sparse.rev.reshape(-1), gl.reshape(-1))
        return (sparse.matrix(values) @ Z.reshape(B * n, q)).reshape(B, n, q)
    flat = pidx.reshape(pidx.shape[0], -1).expand(B, -1)
    G = torch.zeros(B, n * n, dtype=Z.dtype, device=Z.device)
    G.scatter_add_(1, flat, gl.reshape(B, -1))
    G = G.reshape(B, n, n)
    return (G + G.transpose(1, 2)) @ Z


def choice_metrics(logits: torch.Tensor, ans: torch.Tensor, temperature: float = 1.0):
    """Accuracy (argmax == answer) and mean NLL of (B, N, 3) logits at temperature T."""
    a = ans.expand(logits.shape[0], -1).unsqueeze(-1)
    acc = (logits.argmax(-1, keepdim=True) == a).to(torch.float64).mean((-1, -2))
    logp = torch.log_softmax(logits.to(torch.float64) / temperature, dim=-1)
    nll = -logp.gather(-1, a).squeeze(-1).mean(-1)
    return acc, nll


# ----------------------------------------------------------------------------------------------
# penalties (value and gradient), batched over the leading dimension


def _square_shrinkage(M: torch.Tensor, dim: torch.Tensor, diag_mask: torch.Tensor):
    """||M - (tr M / dim) I||^2 and the deviation C = M - (tr M / dim) I (the gradient is 2 C).

    Formed from the deviation itself, not as ||M||^2 - (tr M)^2 / dim: near a scaled identity
    (large lambda) that difference cancels catastrophically in float32 (an error of ~1e-5 times
    lambda in the objective, which the optimiser would exploit). The gradient is 2 C because
    tr C = 0 (``diag_mask`` (B, q) marks the problem's true dimension on the diagonal). M is
    overwritten by C: the caller passes a fresh tensor.
    """
    diag = torch.diagonal(M, dim1=1, dim2=2)
    tr = diag.sum(-1)
    diag.sub_((tr / dim)[:, None] * diag_mask)
    return _vecdot(M, M), M


LOOP_MM_MIN = 2**21  # multiply-adds per problem from which the CPU loops over problems


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b of (B or 1, m, k) and (B or 1, k, n) tensors.

    On the CPU, large products take one BLAS call per problem: MKL's batched path runs them
    slower than a loop of plain ones. Small ones (many tiny problems in one batch) and other
    devices take one batched call.
    """
    if a.device.type != "cpu" or a.shape[1] * a.shape[2] * b.shape[2] < LOOP_MM_MIN:
        return a @ b
    B = max(a.shape[0], b.shape[0])
    out = torch.empty(B, a.shape[1], b.shape[2], dtype=a.dtype, device=a.device)
    for i in range(B):
        torch.mm(a[i if a.shape[0] > 1 else 0], b[i if b.shape[0] > 1 else 0], out=out[i])
    return out


def _row_blocks(n: int) -> list[int]:
    """Split points 0 = a_0 < ... < a_b = n of the concepts into about TRI_ROWS each."""
    parts = max(1, round(n / TRI_ROWS))
    return [round(n * t / parts) for t in range(parts + 1)]


def _image(Xs: torch.Tensor, M: torch.Tensor, lead: int | None) -> torch.Tensor:
    """Z = Xs @ M^T for features Xs (1 or B, n, q) and parameters M (B, m, q).

    With ``lead`` (one group whose features are lower-trapezoidal after their first ``lead``
    columns: column lead + j is zero on concepts i < j), each block of concepts multiplies only
    the columns it has; otherwise one plain product.
    """
    if lead is None:
        return _bmm(Xs, M.transpose(1, 2))
    n, q = Xs.shape[1:]
    out = torch.empty(M.shape[0], n, M.shape[1], dtype=M.dtype, device=M.device)
    cuts = _row_blocks(n)
    for b in range(M.shape[0]):
        for a0, a1 in zip(cuts[:-1], cuts[1:], strict=True):
            c = min(q, lead + a1)
            torch.mm(Xs[0, a0:a1, :c], M[b, :, :c].T, out=out[b, a0:a1])
    return out


def _back(dZ: torch.Tensor, Xs: torch.Tensor, lead: int | None) -> torch.Tensor:
    """dZ^T @ Xs (B, m, q) for dZ (B, n, m), the adjoint of ``_image``, skipping the same zeros."""
    if lead is None:
        return _bmm(dZ.transpose(1, 2), Xs)
    n, q = Xs.shape[1:]
    out = torch.empty(dZ.shape[0], dZ.shape[2], q, dtype=dZ.dtype, device=dZ.device)
    cuts = _row_blocks(n)
    cols = [min(q, lead + a) for a in cuts[:-1]] + [q]
    for b in range(dZ.shape[0]):
        torch.mm(dZ[b].T, Xs[0, :, : cols[0]], out=out[b, :, : cols[0]])
        for a0, j0, j1 in zip(cuts[:-1], cols[:-1], cols[1:], strict=True):
            if j1 > j0:  # concepts before a0 have no entries in these columns
                torch.mm(dZ[b, a0:].T, Xs[0, a0:, j0:j1], out=out[b, :, j0:j1])
    return out


def _vecdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner products of two (B, ...) tensors."""
    return optim._rowdot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def _gram_shrinkage(M: torch.Tensor, p: int):
    """||M^T M - (tr M^T M / p) I_p||^2 for a k x p M, computed through the k x k Gram M M^T."""
    K = M @ M.transpose(1, 2)
    tr = torch.diagonal(K, dim1=1, dim2=2).sum(-1)
    val = (K * K).sum((1, 2)) - tr * tr / p
    grad = 4 * (K @ M) - 4 * (tr / p)[:, None, None] * M
    return val, grad


# ----------------------------------------------------------------------------------------------
# fitted probes


@dataclass
class FittedProbe:
    """One fitted transform in compact form, with what the fit reports.

    ``kind`` is ``reduced`` (W = V A V^T + d (I - V V^T), optionally after a PCA projection P),
    ``matrix`` (W stored whole, k x p or p x p), ``diagonal`` (W = diag(w)) or ``identity``.
    For ``pca:k`` the features are centred first: Z = (X - mu) W^T with ``mu`` the features' mean
    over all concepts (``centre``).
    """

    spec: ProbeSpec
    lam: float
    kind: str
    p: int
    A: torch.Tensor | None = None
    V: torch.Tensor | None = None
    d: float = 0.0
    P: torch.Tensor | None = None  # PCA axes (p x k) for pca:k
    mu: torch.Tensor | None = None  # pca:k: the features' mean (1 x p), subtracted first
    M: torch.Tensor | None = None
    w: torch.Tensor | None = None
    objective: float = float("nan")
    iterations: int = 0
    evaluations: int = 0
    converged: bool = True
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def matrix(self) -> np.ndarray:
        """The full transform W as float32 numpy, with Z = X @ W.T (pca:k: Z = (X - mu) @ W.T,
        see ``centre``)."""
        return self.matrix_tensor().to(torch.float32).cpu().numpy()

    def matrix_tensor(self) -> torch.Tensor:
        if self.kind == "identity":
            return torch.eye(self.p, dtype=torch.float64)
        if self.kind == "diagonal":
            return torch.diag(self.w)
        if self.kind == "matrix":
            W = self.M
        else:  # reduced: W = d I + V (A - d I) V^T in the (possibly PCA-projected) space
            V, A = self.V, self.A.to(self.V.dtype)
            q = V.shape[0]
            r = A.shape[0]
            inner = A - self.d * torch.eye(r, dtype=A.dtype, device=A.device)
            W = self.d * torch.eye(q, dtype=A.dtype, device=A.device) + (V @ inner) @ V.T
        if self.P is not None:
            W = W @ self.P.T.to(W.dtype)
        return W

    def centre(self, X: torch.Tensor) -> torch.Tensor:
        """The features as the transform sees them: X - mu for pca:k, else X itself."""
        return X if self.mu is None else X - self.mu.to(X.dtype)

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        """Z = X W^T (pca:k: (X - mu) W^T) for features X (n x p) in the fit's dtype and device."""
        if self.kind == "identity":
            return X
        if self.kind == "diagonal":
            return X * self.w.to(X.dtype)
        if self.P is not None:
            X = self.centre(X) @ self.P.to(X.dtype)
        if self.kind == "matrix":
            return X @ self.M.to(X.dtype).T
        V, A = self.V.to(X.dtype), self.A.to(X.dtype)
        C = X @ V
        return (C @ A.T) @ V.T + self.d * (X - C @ V.T)

    def similarity(self, X: torch.Tensor) -> torch.Tensor:
        """The n x n similarities s_ab = z_a . z_b of the given concepts' features."""
        if self.kind == "reduced":
            Xp = self.centre(X) @ self.P.to(X.dtype) if self.P is not None else X
            C = Xp @ self.V.to(X.dtype)
            Y = C @ self.A.to(X.dtype).T
            S = Y @ Y.T
            if self.d != 0.0:
                S = S + self.d**2 * (Xp @ Xp.T - C @ C.T)
            return S
        Z = self.transform(X)
        return Z @ Z.T


def _as_tensor(a, dtype, device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) is CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def row_space_basis(Xt: torch.Tensor):
    """Orthonormal basis V (p x r) of the row space of Xt (m x p), and the coordinates U = Xt V.

    Computed in float64 from the eigendecomposition of the smaller Gram matrix, then made exactly
    orthonormal by a QR step. r counts the singular values above sqrt(max(m, p) * eps) * s_max:
    directions below that carry under 1e-12 of the training similarities' scale.
    """
    X64 = Xt.to(torch.float64)
    m, p = X64.shape
    small_side = m <= p
    K = X64 @ X64.T if small_side else X64.T @ X64
    lam, vec = torch.linalg.eigh(K)
    lam, vec = lam.flip(0), vec.flip(1)
    if lam.numel() == 0 or float(lam[0]) <= 0.0:
        raise ValueError("the training concepts' features are all zero: nothing to fit")
    s = lam.clamp_min(0).sqrt()
    r = int((s > math.sqrt(max(m, p) * torch.finfo(torch.float64).eps) * s[0]).sum())
    V = X64.T @ (vec[:, :r] / s[:r]) if small_side else vec[:, :r]
    V, _ = torch.linalg.qr(V)
    return V.contiguous(), X64 @ V


def _triangular_tail(V: torch.Tensor, C: torch.Tensor):
    """Rotate the basis so that the coordinates C = Xt V are lower-trapezoidal after their leading
    columns; returns (V, C, lead).

    The leading ``lead`` columns (the directions whose variance is above the mean) stay as they
    are. The rest, C_t, is replaced by C_t Q = R^T from the QR decomposition C_t^T = Q R, so its
    column j is exactly zero on the first j concepts. Q is orthogonal, so this is the same fit in
    other coordinates; the column preconditioner of ``_objective`` is then nearly constant on the
    rotated block (its scale is sqrt(sigma^2 / mean + PRECOND_FLAT) with sigma^2 <= mean), which
    is why the iterations stay the same (a fully triangular basis costs about 38% more of them).
    """
    s2 = (C * C).sum(0)
    lead = int((s2 > s2.mean()).sum())
    if lead >= C.shape[1] - 1:
        return V, C, None
    Q, R = torch.linalg.qr(C[:, lead:].T)
    V = torch.cat([V[:, :lead], V[:, lead:] @ Q], 1).contiguous()
    C = torch.cat([C[:, :lead], R.T], 1)
    return V, C, lead


def features_for(spec: ProbeSpec, X):
    """The features a full transform W of ``spec`` acts on: X centred over its rows (all
    concepts) for ``pca:k``, X itself otherwise; numpy in, float64 numpy out, torch stays torch."""
    if spec.family != "pca":
        return X
    if isinstance(X, torch.Tensor):
        return X - X.mean(0, keepdim=True)
    X = np.asarray(X, dtype=np.float64)
    return X - X.mean(0, keepdims=True)


def pca_axes(X: torch.Tensor, k: int) -> torch.Tensor:
    """The k leading principal axes (p x k) of the centred features (float64)."""
    X64 = X.to(torch.float64)
    Xc = X64 - X64.mean(0, keepdim=True)
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    if k > Vh.shape[0]:
        raise ValueError(
            f"pca:{k} asks for {k} components but the features have at most {Vh.shape[0]}"
        )
    return Vh[:k].T.contiguous()


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
    trip: torch.Tensor  # (G, N, 3) triplets in local concept indices
    pidx: torch.Tensor  # (G, N, 3) pair indices into n x n
    ans: torch.Tensor  # (G, N)
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
    local = local.reshape(-1, 3)
    Xt = X[concepts]
    V = None
    lead = None
    if reduce:
        V, Xt = row_space_basis(Xt)
        if Xt.shape[1] >= TRI_MIN and torch.device(device).type == "cpu":
            V, Xt, lead = _triangular_tail(V, Xt)
    n_t = Xt.shape[0]
    N = ans.shape[0]
    r = Xt.shape[1]
    if reduce and r >= PAD_MIN:
        Xt = torch.nn.functional.pad(Xt, (0, -r % PAD_TO))
    return _Context(
        X=Xt.to(dtype).unsqueeze(0),
        trip=local.unsqueeze(0),
        pidx=pair_index(local, n_t).unsqueeze(0),
        ans=ans.unsqueeze(0),
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
    N = max(c.ans.shape[1] for c in contexts)
    q = max(c.X.shape[2] for c in contexts)
    if any(c.X.shape[2] != q for c in contexts) and contexts[0].V[0] is None:
        raise ValueError("only reduced problems can be padded to a common dimension")
    Xs, trips, ans, ws = [], [], [], []
    for c in contexts:
        nc, Nc, qc = c.X.shape[1], c.ans.shape[1], c.X.shape[2]
        Xs.append(torch.nn.functional.pad(c.X[0], (0, q - qc, 0, n - nc)))
        trip = torch.nn.functional.pad(c.trip[0], (0, 0, 0, N - Nc))
        trip[Nc:] = torch.tensor([0, 1, 2], device=trip.device)  # weight-0 padding rows
        trips.append(trip)
        ans.append(torch.nn.functional.pad(c.ans[0], (0, N - Nc)))
        ws.append(torch.nn.functional.pad(c.w[0], (0, N - Nc)))
    trip = torch.stack(trips)
    return _Context(
        X=torch.stack(Xs),
        trip=trip,
        pidx=pair_index(trip, n),
        ans=torch.stack(ans),
        w=torch.stack(ws),
        V=[v for c in contexts for v in c.V],
        P=[q for c in contexts for q in c.P],
        mu=[m for c in contexts for m in c.mu],
        p=[q for c in contexts for q in c.p],
        r=[r for c in contexts for r in c.r],
    )


def _uses_reduction(spec: ProbeSpec) -> bool:
    return spec.family in ("full", "pca") and spec.penalty in ("shrinkage", "frobenius")


def fit_probes(
    problems: Sequence[FitProblem],
    spec: ProbeSpec,
    *,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    max_iter: int = 1000,
    rel_tol: float = 1e-7,
    history: int = 10,
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
        return c.X.shape[2], c.X.shape[1], c.ans.shape[1]

    def stackable(a, b):
        return reduce or dims(a)[0] == dims(b)[0]

    def padded(members):
        """(q, n, N) of these problems stacked in one batch."""
        return tuple(max(dims(i)[k] for i in members) for k in range(3))

    def fit_bytes(members):
        """Memory of one fit of a batch of these problems: history, iterates, Gram, logits."""
        q, n, N = padded(members)
        size = contexts[members[0]].X.element_size()
        return ((2 * history + 8) * q * q + 4 * n * n + 8 * N) * size

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

    iter_cap = max_iter * 5 if spec.penalty == "l1" else max_iter  # the optimiser's own cap

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
            part = offset + len(lams) - active + active * min(it / max(iter_cap, 1), 1.0)
            progress.running(key, part, steps=1)

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
    family, penalty = spec.family, spec.penalty

    def sel(a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Per-fit rows of a per-group tensor; broadcast (no copy) when there is one group."""
        return a if G == 1 else a[gidx[idx]]

    if family == "diagonal":
        shape = (q,)
        x0 = torch.ones(B, q, dtype=dt, device=dev)
        Dg = torch.ones(G, q, dtype=dt, device=dev)

        def model(x, Xs):
            return Xs * x[:, None, :]

        def back(dZ, x, Xs):
            return (dZ * Xs).sum(1)

        def pen(x, idx, grad=True):
            if penalty == "shrinkage":
                c = x - x.mean(-1, keepdim=True)
                return (c * c).sum(-1), 2 * c
            return (x * x).sum(-1), 2 * x

    else:
        rows = spec.k if family == "rank" else q
        shape = (rows, q)
        # Column preconditioning of the reduced problem: A' = A D with D_e^2 = sigma_e^2 /
        # mean(sigma^2) + PRECOND_FLAT, sigma_e the norm of the e-th training coordinate. The data
        # term's curvature grows with sigma_e^2 and the penalty's is flat; this change of
        # variables balances them (an exact reparametrisation: same objective, same optimum, far
        # fewer L-BFGS iterations). Own-coordinate fits keep D = 1.
        # Padded coordinates (merged problems of smaller r) have mask 0: they start at 0, get
        # zero gradient from the data and are excluded from the penalty's identity and trace.
        r = torch.tensor(ctx.r, dtype=dt, device=dev)  # (G,) true fitting dimension
        mask = (torch.arange(q, device=dev)[None, :] < r[:, None]).to(dt)  # (G, q)
        if ctx.V[0] is not None:
            sig2 = (Xg.to(torch.float64) ** 2).sum(1)
            mean = sig2.sum(-1, keepdim=True) / r[:, None].to(torch.float64)
            Dg = torch.sqrt(sig2 + PRECOND_FLAT * mean).clamp_min(1e-30).to(dt)
        else:
            Dg = torch.ones(G, q, dtype=dt, device=dev)
        Xg = Xg / Dg[:, None, :]
        Dinv = 1.0 / Dg  # products, not quotients, in the iteration (division is slow)
        eye_kq = torch.eye(rows, q, dtype=dt, device=dev)  # eye(k, p) for rank:k, any k
        x0 = (eye_kq.unsqueeze(0) * (Dg * mask)[:, None, :]).reshape(G, -1)[gidx].clone()
        p_raw = ctx.p[0]

        lead = ctx.lead if G == 1 else None

        def model(x, Xs):
            return _image(Xs, x.reshape(-1, *shape), lead)

        def back(dZ, x, Xs):
            return _back(dZ, Xs, lead).reshape(x.shape[0], -1)

        def pen(x, idx, grad=True):
            """R at x and its gradient with respect to x (None unless ``grad``)."""
            Di = sel(Dinv, idx)[:, None, :]
            M = x.reshape(-1, *shape) * Di  # a fresh tensor
            if penalty == "frobenius":
                v, g = _vecdot(M, M), M
            elif family == "rank":
                v, g = _gram_shrinkage(M, p_raw)
                g = g / 2
            else:  # r when reduced (padding excluded), else p (or k)
                v, g = _square_shrinkage(M, sel(r, idx), sel(mask, idx))
            if not grad:
                return v, None
            return v, g.mul_(2 * Di).reshape(x.shape[0], -1)

    # the sparse data term: one pair pattern per group, block-diagonal per set of active fits
    # (on SPARSE_DEVICES only: on a GPU the dense matmuls are cheap, and the CUDA SDDMM path is
    # not verified yet; bench/gpu_check.py does that.) With 6N >= n^2 pair slots the pattern
    # cannot be sparse unless triplets repeat heavily, so dense data (millions of human
    # triplets) skips building it.
    n_c = Xg.shape[1]
    maybe = dev.type in SPARSE_DEVICES and 6 * ctx.trip.shape[1] < n_c**2
    patterns = [_pair_pattern(ctx.trip[g], n_c) for g in range(G)] if maybe else []
    sparse = maybe and max(p.rows.shape[0] for p in patterns) * SPARSE_RATIO < n_c**2
    blocks: dict[tuple, _BlockPattern] = {}

    def block(idx) -> _BlockPattern | None:
        if not sparse:
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
        if penalty != "l1":
            v, _ = pen(x, idx, grad=False)
            loss = loss + (lam[idx] * v).to(torch.float64)
        return loss, gl

    def gradient(Z, x, gl, idx):
        dZ = _data_backward(Z, gl, sel(ctx.pidx, idx), block(idx))
        g = back(dZ, x, sel(Xg, idx))
        if penalty != "l1":
            _, gp = pen(x, idx)
            g = g.addcmul_(lam[idx, None], gp)
        return g

    split = optim.Split(lambda x, idx: model(x, sel(Xg, idx)), value, gradient)

    def smooth(x, idx):
        Z = split.image(x, idx)
        loss, gl = value(Z, x, idx)
        return loss, gradient(Z, x, gl, idx)

    def unpack(xb, b=0):
        if family == "diagonal":
            return xb.clone()
        g = int(gidx[b])
        out = xb.reshape(shape) / Dg[g]
        if ctx.V[g] is not None:  # reduced: drop the padding coordinates
            out = out[: ctx.r[g], : ctx.r[g]]
        return out.clone()

    def start():
        every = torch.arange(B, device=dev)
        Z = model(x0, sel(Xg, every))
        L0 = _triplet_logits(Z, sel(ctx.pidx, every), block(every))
        v0 = pen(x0, every)[0]
        return L0, v0, sel(ctx.ans, every), sel(ctx.w, every)

    return _Objective(smooth, split, x0, lam, unpack, shape, start)


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
    family, penalty = spec.family, spec.penalty
    if penalty == "l1":
        res = optim.proximal_gradient(
            smooth, x0, lam, max_iter=max_iter * 5, rel_tol=rel_tol, progress=progress,
            paper=paper,
        )  # fmt: skip
    else:
        if family != "rank":  # W = c I (diagonal: w = c 1) is free under shrinkage: find c
            L0, v0, ans, w = obj.start()
            t = _scale_search(L0, ans, w, lam, v0)
            x0 = x0 * torch.sqrt(t).to(x0.dtype)[:, None]
        res = optim.lbfgs(
            obj.split, x0, max_iter=max_iter, history=history, rel_tol=rel_tol,
            progress=progress, paper=paper,
        )  # fmt: skip

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
            d = float(torch.trace(param) / param.shape[0]) if penalty == "shrinkage" else 0.0
            fits.append(
                FittedProbe(spec, lam_b, "reduced", p, A=param, V=V, d=d, P=P, mu=mu, **common)
            )
        else:
            fits.append(FittedProbe(spec, lam_b, "matrix", p, M=param, P=P, mu=mu, **common))
    return fits


def probe_objective(W, features, triplets, answers, lam: float, spec: ProbeSpec) -> float:
    """§4's objective at a given full transform W (Z = X W^T), in float64: see ``probe_metrics``."""
    return probe_metrics(W, features, triplets, answers, lam, spec)["objective"]


def probe_metrics(
    W: np.ndarray | torch.Tensor,
    features: np.ndarray | torch.Tensor,
    triplets: np.ndarray | torch.Tensor,
    answers: np.ndarray | torch.Tensor,
    lam: float,
    spec: ProbeSpec,
) -> dict[str, float]:
    """Objective, accuracy and NLL (T = 1) of a full transform W on a triplet set, in float64.

    The objective is computed by the plain formula of §4: mean cross-entropy over the triplets +
    lambda * R(W). For ``pca:k`` W acts on the centred features (``features_for``) and the penalty
    applies to the k x k transform of the principal components, W P with P the PCA axes."""
    X = features_for(spec, _as_tensor(features, torch.float64, "cpu"))
    W = _as_tensor(W, torch.float64, "cpu")
    trip = torch.as_tensor(np.asarray(triplets), dtype=torch.long)
    ans = torch.as_tensor(np.asarray(answers), dtype=torch.long)
    concepts, local = torch.unique(trip.reshape(-1), return_inverse=True)
    Z = X[concepts] @ W.T
    n = Z.shape[0]
    pidx = pair_index(local.reshape(-1, 3), n).unsqueeze(0)
    logits = logits_from_similarity((Z @ Z.T).unsqueeze(0), pidx)
    ce = float(torch.nn.functional.cross_entropy(logits[0], ans))
    accuracy = float((logits[0].argmax(-1) == ans).to(torch.float64).mean())
    if spec.family == "pca":
        W = W @ pca_axes(X, spec.k)
    if spec.family == "diagonal":
        w = torch.diagonal(W)
        M = w
    else:
        M = W
    if spec.penalty == "l1":
        reg = M.abs().sum()
    elif spec.penalty == "frobenius":
        reg = (M * M).sum()
    elif spec.family == "diagonal":
        reg = ((w - w.mean()) ** 2).sum()
    elif spec.family == "rank":
        G = W.T @ W
        reg = ((G - torch.trace(G) / G.shape[0] * torch.eye(G.shape[0], dtype=G.dtype)) ** 2).sum()
    else:
        q = M.shape[0]
        reg = ((M - torch.trace(M) / q * torch.eye(q, dtype=M.dtype)) ** 2).sum()
    return {"objective": ce + lam * float(reg), "accuracy": accuracy, "nll": ce}
