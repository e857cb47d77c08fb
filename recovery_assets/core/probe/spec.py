"""What a fit is asked for: the probe family and penalty (docs/method.md §4, "Families" and
"Penalties"), and where its tensors live.

``ProbeSpec`` parses ``full``, ``diagonal``, ``rank:k``, ``zero_shot`` and ``pca:k`` with a penalty
of ``penalties.PENALTY``. ``resolve_device`` picks the torch device (``auto``: CUDA when
available) and ``_as_tensor`` converts the caller's arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from recovery_assets.core.probe.penalties import PENALTY

FAMILIES = ("full", "diagonal", "rank", "zero_shot", "pca")
PENALTIES = tuple(PENALTY)


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


def _as_tensor(a, dtype, device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) is CUDA when available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
