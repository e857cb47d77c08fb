"""The CPU matmul helpers of the probe's iteration (docs/exact-fit.md, "CPU specifics").

``_bmm``: a batched product that takes one BLAS call per problem on the CPU from LOOP_MM_MIN
multiply-adds on ("One BLAS call per problem"). ``_image`` and ``_back``: the two feature products
of an iteration, Z = X M^T and its adjoint, which skip the zero blocks of a tail-triangular basis
(``reduction._triangular_tail``) in blocks of about TRI_ROWS concepts ("Tail-triangular basis").
``_gram_lower``: the Gram matrix Z Z^T of the dense data term, its lower blocks only on the CPU.
``_vecdot``: per-row dot products, one BLAS dot per row ("Row dots").

The constants are read at call time from this module: change them here (``kernels.TRI_ROWS``),
not on the package.
"""

from __future__ import annotations

import torch

from recovery_assets.core import optim

# Blocks of about TRI_ROWS concepts in the products of a tail-triangular basis (``_image``,
# ``_back``; the basis is taken from reduction.TRI_MIN coordinates on).
TRI_ROWS = 96
LOOP_MM_MIN = 2**21  # multiply-adds per problem from which the CPU loops over problems
# Row blocks of about GRAM_ROWS concepts in ``_gram_lower``.
GRAM_ROWS = 128


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


def _row_blocks(n: int, rows: int | None = None) -> list[int]:
    """Split points 0 = a_0 < ... < a_b = n of the concepts into about ``rows`` (default
    TRI_ROWS) each."""
    parts = max(1, round(n / (TRI_ROWS if rows is None else rows)))
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


def _gram_lower(Z: torch.Tensor) -> torch.Tensor:
    """S = Z Z^T (B, n, n) for Z (B, n, q), exact on and below the diagonal blocks only.

    The data term reads S at lower-triangle indices (``data_term.pair_index``). On the CPU, from
    LOOP_MM_MIN multiply-adds per problem, each block of about GRAM_ROWS concepts multiplies only
    the concepts up to its own: about 57% of the full product's work at n = 865 (7 blocks),
    whose time falls from about 7 ms to 5 at q = 880 on the 2-core machine. The entries above
    the diagonal blocks are left unset. Other devices and small products: the full product.
    """
    B, n, q = Z.shape
    if Z.device.type != "cpu" or n * n * q < LOOP_MM_MIN or n < 2 * GRAM_ROWS:
        return Z @ Z.transpose(1, 2)
    S = torch.empty(B, n, n, dtype=Z.dtype, device=Z.device)
    cuts = _row_blocks(n, GRAM_ROWS)
    for b in range(B):
        for a0, a1 in zip(cuts[:-1], cuts[1:], strict=True):
            torch.mm(Z[b, a0:a1], Z[b, :a1].T, out=S[b, a0:a1, :a1])
    return S


def _vecdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row inner products of two (B, ...) tensors."""
    return optim._rowdot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
