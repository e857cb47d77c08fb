"""Resources shared by every study of a code location: the torch device and the data folder."""

from __future__ import annotations

import dagster as dg
import torch

from recovery_assets.core.probe import resolve_device
from recovery_assets.storage import Store, data_root
from recovery_assets.study import Study


class DeviceResource(dg.ConfigurableResource):
    """The torch device for feature extraction and probe fitting. Unset: each study's own
    ``device`` setting; ``auto`` = CUDA when available."""

    device: str | None = None

    def torch_device(self, study: Study) -> torch.device:
        return resolve_device(self.device or study.device)


class StorageResource(dg.ConfigurableResource):
    """The parent of the studies' data folders (default: $RECOVERY_DATA, else ./data); each study
    writes to ``<root>/<study name>`` (or its own ``data_dir``)."""

    root: str | None = None

    def store(self, study: Study) -> Store:
        return Store(data_root(study, self.root))
