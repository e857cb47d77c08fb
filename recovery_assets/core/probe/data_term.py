"""The data term of docs/method.md §4 ("Logits", "Objective"): the weighted cross-entropy of the
odd-one-out choices and its gradient with respect to Z = X W^T.

For a triplet (i, j, k) the logits are [s_jk, s_ik, s_ij] with s_ab = z_a . z_b (``pair_index``,
``logits_from_similarity``); the fitter stores each triplet with its chosen odd one first
(``answer_first``), so that the answer's logit is the first. The loss is accumulated in float64
from the N x 3 logits (``_choice_gradient``); the gradient is dL/dZ = (G + G^T) Z. Dense data
form the Gram matrix S = Z Z^T; when the triplets' pairs are a small part of the n^2 the sparse
path samples S at the fixed pair pattern (``_PairPattern``, block-diagonal over a batch:
``_BlockPattern``) and takes a sparse-dense product, and between the two S is sampled while the
gradient stays dense (docs/exact-fit.md, "The data term: dense or sparse"). ``choice_metrics``:
accuracy and NLL of given logits.

SAMPLE_RATIO, SPARSE_RATIO and SPARSE_DEVICES are read at call time from this module
(``_sparse_patterns``): change them here (``data_term.SPARSE_RATIO``), not on the package.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from recovery_assets.core.probe import kernels
from recovery_assets.core.probe.kernels import _bmm, _gram_lower


def pair_index(triplets: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices into an n x n similarity matrix of the pairs [jk, ik, ij] of each triplet.

    Each pair (a, b) is indexed in the lower triangle, max(a, b) * n + min(a, b): similarities are
    symmetric, so the dense data term forms only the Gram matrix's lower blocks
    (``kernels._gram_lower``)."""
    i, j, k = triplets.unbind(-1)

    def lower(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.maximum(a, b) * n + torch.minimum(a, b)

    return torch.stack([lower(j, k), lower(i, k), lower(i, j)], dim=-1)


def transposed_index(pidx: torch.Tensor, n: int) -> torch.Tensor:
    """The flat indices of the transposed pairs: b * n + a for a * n + b."""
    return (pidx % n) * n + pidx // n


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
# Between the two, for problems whose Gram matrix is formed in row blocks (n >= 2 GRAM_ROWS), the
# data term is mixed: S is sampled at the pairs (the logits, at every trial point of the line
# search) while the gradient keeps the dense product (G + G^T) Z. Sampling pays from a larger share
# of pairs than the sparse gradient: the SDDMM takes nnz / 2 dot products where the lower Gram
# blocks take about 0.57 n^2 at several times its speed per product, while the sparse-dense product
# takes nnz rows against the dense product's n^2 at about a fifth of its speed. The single fits'
# 25,600 triplets over 865 concepts (nnz / n^2 = 0.19, q = 880, the 2-core CPU): logits 2.9 ms
# sampled against 4.7 ms from the Gram blocks, gradient 8.9 ms sparse against 8.5 ms dense
# (docs/performance.md, "Sampled logits").
SAMPLE_RATIO = 4  # S sampled at the pairs when nnz * SAMPLE_RATIO < n^2 (and n >= 2 GRAM_ROWS)
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


def _sparse_patterns(trip: torch.Tensor, n: int, device: torch.device):
    """(patterns, gradient): the groups' pair patterns when S is sampled at them, else None
    (dense), and whether the gradient's (G + G^T) Z is the sparse product too.

    ``trip`` (G, N, 3): each group's triplets over n local concepts; nnz: the largest group's
    pairs, both orientations. The gradient is sparse (and S sampled) when nnz * SPARSE_RATIO <
    n^2; S alone is sampled when nnz * SAMPLE_RATIO < n^2 and the Gram matrix would be formed in
    row blocks (n >= 2 ``kernels.GRAM_ROWS``: below that it is cheap). Only on SPARSE_DEVICES: on
    a GPU the dense matmuls are cheap, and the CUDA SDDMM path is not verified yet
    (bench/gpu_check.py does that). With 6N >= n^2 pair slots the pattern cannot be sparse unless
    triplets repeat heavily, so dense data (millions of human triplets) skips building it.
    """
    if not (device.type in SPARSE_DEVICES and 6 * trip.shape[1] < n**2):
        return None, False
    patterns = [_pair_pattern(trip[g], n) for g in range(trip.shape[0])]
    nnz = max(p.rows.shape[0] for p in patterns)
    gradient = nnz * SPARSE_RATIO < n**2
    sampled = gradient or (nnz * SAMPLE_RATIO < n**2 and n >= 2 * kernels.GRAM_ROWS)
    return (patterns if sampled else None), gradient


def answer_first(x: torch.Tensor, ans: torch.Tensor) -> torch.Tensor:
    """Each triplet (or its logits) rotated so that the chosen odd one comes first: x (..., N, 3),
    ans (N,) or broadcastable to x's leading dimensions, in {0, 1, 2}.

    Rotating a triplet (i, j, k) to (t_a, t_a+1, t_a+2) rotates its logits [s_jk, s_ik, s_ij]
    the same way, and the answer becomes 0: the fitter stores its triplets so
    (``batching._prepare``), and the data term reads the answer's logit as the first."""
    idx = (ans.unsqueeze(-1) + torch.arange(3, device=ans.device)) % 3
    return x.gather(-1, idx.expand(*x.shape[:-1], 3))


def _choice_gradient(logits: torch.Tensor, w: torch.Tensor, dtype, gradient: bool = True):
    """Weighted cross-entropy of (B, N, 3) float64 logits, the chosen odd one's first
    (``answer_first``), and its gradient w.r.t. the logits (None unless ``gradient``).

    The loss is accumulated in float64 from the (cheap, N x 3) logits: near a flat start (tiny
    features, logits ~1e-8) its changes are far below float32 resolution, and the optimiser's
    convergence test must still see them. The matmuls stay in the working dtype. Written over the
    two logit differences delta_j = L_j - L_0: CE = log(1 + exp(delta_1) + exp(delta_2)), shifted
    by max(0, delta_1, delta_2); its gradient is the softmax less the answer's indicator, p_j for
    j = 1, 2 and -(p_1 + p_2) for the answer (torch's softmax and reductions over a last
    dimension of 3 take several times as long).
    """
    B = logits.shape[0]
    ww = w.expand(B, -1).to(torch.float64)
    d1 = logits[..., 1] - logits[..., 0]
    d2 = logits[..., 2] - logits[..., 0]
    m = torch.maximum(d1, d2).clamp_min_(0)
    e1, e2 = d1.sub_(m).exp_(), d2.sub_(m).exp_()
    z = m.neg().exp_().add_(e1).add_(e2)
    loss = torch.linalg.vecdot(ww, z.log().add_(m))
    if not gradient:
        return loss, None
    wz = ww / z  # (not in place: ww may be the caller's w itself)
    p1, p2 = e1.mul_(wz), e2.mul_(wz)  # weighted p_1, p_2
    return loss, torch.stack([-(p1 + p2), p1, p2], -1).to(dtype)


def _triplet_logits(Z: torch.Tensor, pidx: torch.Tensor, sparse: _BlockPattern | None):
    """The (B, N, 3) float64 logits [s_jk, s_ik, s_ij] of Z (B, n, q): from S sampled once per
    unordered pair at the sparse pattern, or from the dense Gram matrix S = Z Z^T."""
    B, n, q = Z.shape
    if sparse is not None:
        Zf = Z.reshape(B * n, q)
        ones = torch.ones(sparse.half_col.shape[0], dtype=Z.dtype, device=Z.device)
        S = torch.sparse.sampled_addmm(sparse.matrix(ones, half=True), Zf, Zf.T, beta=0.0)
        return S.values()[sparse.pos].reshape(B, -1, 3).to(torch.float64)
    return logits_from_similarity(_gram_lower(Z), pidx).to(torch.float64)


def _data_term(
    Z: torch.Tensor,
    pidx: torch.Tensor,
    w: torch.Tensor,
    sparse: _BlockPattern | None = None,
):
    """Weighted cross-entropy of the choices and its gradient with respect to Z.

    Z (B, n, q); pidx (B or 1, N, 3) flat pair indices of the triplets, each with its chosen odd
    one first (``answer_first``); w (B or 1, N) weights summing to one per problem (1/N: the
    mean). Dense: S = Z Z^T is formed once; the gradient with respect to S is a scatter-add over
    the triplets; dL/dZ = (G + G^T) Z. With ``sparse`` (the batch's pair pattern) S is sampled at
    the pairs and G + G^T is a sparse matrix: the same values for a fraction of the work.
    """
    loss, gl = _choice_gradient(_triplet_logits(Z, pidx, sparse), w, Z.dtype)
    return loss, _data_backward(Z, gl, pidx, sparse)


def _data_value(Z, pidx, w, sparse: _BlockPattern | None = None):
    """The weighted cross-entropy and the (B, N, 3) float64 logits it was taken from."""
    logits = _triplet_logits(Z, pidx, sparse)
    return _choice_gradient(logits, w, Z.dtype, gradient=False)[0], logits


def _data_backward(Z, gl, pidx, sparse: _BlockPattern | None = None, pidx_t=None):
    """dL/dZ = (G + G^T) Z from the logits' gradient gl (B, N, 3).

    Dense: G + G^T is formed by scattering gl at the pairs and at their transposes
    (``pidx_t``, ``transposed_index(pidx, n)``; pass it when calling repeatedly)."""
    B, n, q = Z.shape
    if sparse is not None:
        values = torch.zeros(sparse.col.shape[0], dtype=Z.dtype, device=Z.device)
        values.index_add_(0, sparse.fwd.reshape(-1), gl.reshape(-1))
        values.index_add_(0, sparse.rev.reshape(-1), gl.reshape(-1))
        return (sparse.matrix(values) @ Z.reshape(B * n, q)).reshape(B, n, q)
    if pidx_t is None:
        pidx_t = transposed_index(pidx, n)
    values = gl.reshape(B, -1)
    G = torch.zeros(B, n * n, dtype=Z.dtype, device=Z.device)
    G.scatter_add_(1, pidx.reshape(pidx.shape[0], -1).expand(B, -1), values)
    G.scatter_add_(1, pidx_t.reshape(pidx_t.shape[0], -1).expand(B, -1), values)
    return _bmm(G.reshape(B, n, n), Z)


def choice_metrics(logits: torch.Tensor, ans: torch.Tensor, temperature: float = 1.0):
    """Accuracy (argmax == answer) and mean NLL of (B, N, 3) logits at temperature T."""
    a = ans.expand(logits.shape[0], -1).unsqueeze(-1)
    acc = (logits.argmax(-1, keepdim=True) == a).to(torch.float64).mean((-1, -2))
    logp = torch.log_softmax(logits.to(torch.float64) / temperature, dim=-1)
    nll = -logp.gather(-1, a).squeeze(-1).mean(-1)
    return acc, nll
