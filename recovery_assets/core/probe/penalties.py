"""The penalties R(W) of docs/method.md §4 ("Penalties"), one object per penalty.

Each penalty is one ``Penalty`` object holding its value and gradient in every family's
parameter (batched over the leading dimension, in the fitter's problem coordinates), its plain
reference formula (``reference``, used by ``fitted.probe_metrics``) and how the fit treats it:

- ``smooth``: part of the L-BFGS objective; a non-smooth penalty (L1) is the proximal-gradient
  method's own term (``optim.proximal_gradient``: its value and soft-threshold step live there);
- ``rotation_invariant``: R(Q W Q^T) = R(W) for orthogonal Q, so the ``full`` and ``pca`` families
  are fitted through the exact r x r reduction (docs/exact-fit.md, "The reduction to an r x r
  problem"), with ``scale`` the profiled d of W = V A V^T + d (I - V V^T).

Adding a penalty is one subclass and its entry in ``PENALTY``: ``ProbeSpec`` accepts its name
(``spec.PENALTIES``), the objective (``objective._objective``) and the fitted result dispatch
through it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from recovery_assets.core.probe.kernels import _vecdot


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


def _gram_shrinkage(M: torch.Tensor, p: int):
    """||M^T M - (tr M^T M / p) I_p||^2 for a k x p M, computed through the k x k Gram M M^T."""
    K = M @ M.transpose(1, 2)
    tr = torch.diagonal(K, dim1=1, dim2=2).sum(-1)
    val = (K * K).sum((1, 2)) - tr * tr / p
    grad = 4 * (K @ M) - 4 * (tr / p)[:, None, None] * M
    return val, grad


class Penalty:
    """One penalty R: its value and gradient in each family's parameter, its plain formula."""

    name = ""
    smooth = True  # part of the L-BFGS objective (else: the proximal method's own term)
    rotation_invariant = True  # the exact r x r reduction applies to full and pca:k

    def diagonal(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """R(diag(w)) (B,) and its gradient (B, q) for the ``diagonal`` family's w (B, q)."""
        raise NotImplementedError(f"the {self.name} penalty has no smooth part")

    def matrix(
        self, family: str, p: int, dim: Callable, diag_mask: Callable
    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The penalty of matrix parameters, as ``term(M, idx) -> (R (B,), C)`` with gradient 2 C.

        M (B, m, q) are the fits ``idx``'s parameters in problem coordinates, a fresh tensor
        that ``term`` may overwrite (C may be M itself). ``family`` is ``rank`` (M is k x p, the
        raw dimension ``p``) or a square family (M is q x q, possibly reduced and padded);
        ``dim(idx)`` (B,) and ``diag_mask(idx)`` (B, q) give the true dimension and the mask of
        its diagonal, and are called only by the penalties that use them.
        """
        raise NotImplementedError(f"the {self.name} penalty has no smooth part")

    def degree(self, family: str) -> int:
        """k with R(c W) = c^k R(W) in the family's parameter (the ray step's closed form: a
        wrong k would make the ray step's objective wrong, so each penalty states its own)."""
        raise NotImplementedError(f"the {self.name} penalty does not state its degree")

    def scale(self, A: torch.Tensor) -> float:
        """The profiled d of a reduced fit W = V A V^T + d (I - V V^T) (docs/exact-fit.md)."""
        raise NotImplementedError(f"the {self.name} penalty is not rotation invariant")

    def reference(self, M: torch.Tensor, family: str) -> torch.Tensor:
        """The plain formula of R at the family's parameter: w for ``diagonal``, else W (pca:k:
        the k x k transform of the principal components), in float64."""
        raise NotImplementedError(f"the {self.name} penalty does not state its formula")


class Shrinkage(Penalty):
    """R = ||W - (tr W / p) I||^2: the distance to the nearest scaled identity (free scale).

    ``diagonal``: sum_i (w_i - mean w)^2; ``rank:k``: acts on W^T W. Reduced, the profiled
    d = tr A / r leaves the r x r problem's own shrinkage penalty."""

    name = "shrinkage"

    def diagonal(self, w):
        c = w - w.mean(-1, keepdim=True)
        return (c * c).sum(-1), 2 * c

    def matrix(self, family, p, dim, diag_mask):
        if family == "rank":

            def term(M, idx):
                v, g = _gram_shrinkage(M, p)
                return v, g / 2

        else:  # r when reduced (padding excluded), else p (or k)

            def term(M, idx):
                return _square_shrinkage(M, dim(idx), diag_mask(idx))

        return term

    def degree(self, family):
        return 4 if family == "rank" else 2  # rank:k: acts on W^T W

    def scale(self, A):
        return float(torch.trace(A) / A.shape[0])

    def reference(self, M, family):
        if family == "diagonal":
            return ((M - M.mean()) ** 2).sum()
        if family == "rank":
            M = M.T @ M
        D = M.clone()  # M - (tr M / q) I, without forming I (p x p at p = 4,096: 128 MiB)
        D.diagonal().sub_(torch.trace(M) / M.shape[0])
        return D.square_().sum()


class Frobenius(Penalty):
    """R = ||W||^2 (``diagonal``: ||w||^2). Reduced, the profiled d is 0."""

    name = "frobenius"

    def diagonal(self, w):
        return (w * w).sum(-1), 2 * w

    def matrix(self, family, p, dim, diag_mask):
        def term(M, idx):
            return _vecdot(M, M), M

        return term

    def degree(self, family):
        return 2

    def scale(self, A):
        return 0.0

    def reference(self, M, family):
        return (M * M).sum()


class L1(Penalty):
    """R = sum |W_ij|: not smooth and not rotation invariant, so it is fitted in its own
    coordinates by the accelerated proximal-gradient method, whose composite objective adds
    lambda * sum |x| and whose step soft-thresholds (``optim.proximal_gradient``)."""

    name = "l1"
    smooth = False
    rotation_invariant = False

    def degree(self, family):
        return 1

    def reference(self, M, family):
        return M.abs().sum()


# The penalties by name, in the order ProbeSpec lists them.
PENALTY: dict[str, Penalty] = {pen.name: pen for pen in (Shrinkage(), Frobenius(), L1())}
