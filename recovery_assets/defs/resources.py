"""Resources: the study, the torch device and the storage location."""

from __future__ import annotations

from functools import cached_property

import dagster as dg
import torch

from recovery_assets.core.probe import resolve_device
from recovery_assets.storage import Store, data_root
from recovery_assets.study import Study, load_study


class StudyResource(dg.ConfigurableResource):
    """The study file (default: $RECOVERY_STUDY, else studies/demo.yaml)."""

    path: str | None = None

    @cached_property
    def study(self) -> Study:
        return load_study(self.path)


class DeviceResource(dg.ConfigurableResource):
    """The torch device for feature extraction and probe fitting: auto = CUDA when available."""

    device: str = "auto"

    @cached_property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @cached_property
    def dtype(self) -> torch.dtype:
        return torch.float32


class StorageResource(dg.ConfigurableResource):
    """Where arrays, tables and the DuckDB views go (default: $RECOVERY_DATA or data/<study>)."""

    root: str | None = None

    def store(self, study: Study) -> Store:
        return Store(self.root or data_root(study))
