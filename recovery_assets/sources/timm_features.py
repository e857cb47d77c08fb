"""Feature extraction from timm networks (docs/method.md §3), offline.

A model is a timm architecture plus weights. :func:`extract_features` builds the architecture with
``timm.create_model(arch, pretrained=False, num_classes=0)`` under a fixed torch seed (random
initialisation; nothing is ever downloaded), optionally loads a *local* state dict, and returns the
pooled pre-logits embedding ``model.forward_head(model.forward_features(x), pre_logits=True)`` of
every image, as float32, unscaled.

:data:`DEMO_MODELS` lists the networks of the offline demo study: small, architecturally diverse
timm architectures that run in seconds on 2 CPU cores at 64 px.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEMO_MODELS",
    "DemoModel",
    "count_parameters",
    "create_model",
    "extract_features",
    "extract_image_files",
    "hf_cache_checkpoint",
    "hf_offline",
    "load_checkpoint",
]

HF_OFFLINE_ENV = "HF_HUB_OFFLINE"


@contextmanager
def hf_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode (``HF_HUB_OFFLINE=1``) for the calls inside, restored after.

    Every function here that builds a network or finds or loads weights runs under it (it is also
    a decorator), so timm and huggingface_hub never reach the network, while importing this module
    leaves the environment alone. huggingface_hub reads the variable once, when it is first
    imported, so its module-level switch is set (and restored) as well.
    """
    from huggingface_hub import constants

    before_env = os.environ.get(HF_OFFLINE_ENV)
    before_hub = constants.HF_HUB_OFFLINE
    os.environ[HF_OFFLINE_ENV] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before_hub
        if before_env is None:
            os.environ.pop(HF_OFFLINE_ENV, None)
        else:
            os.environ[HF_OFFLINE_ENV] = before_env


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DemoModel:
    """One demo candidate: a study-level name, the timm architecture and its init seed."""

    name: str
    arch: str
    seed: int
    family: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


# Measured on the 2-core development machine (torch 2.14.1 CPU, timm 1.0.31) while other jobs
# kept its load average at ~4: 300 images of 64 x 64 px, batch size 32, random init, seconds for
# model creation + all forward passes (best of 3) with ``num_threads=1``; p = embedding dimension,
# n_params without classifier. With torch's default 2 threads on the loaded machine the same runs
# took 2-10x longer (OpenMP oversubscription); on an idle machine 2 threads are the faster choice.
# Re-measure with ``python -m recovery_assets.sources.timm_features [num_threads]``.
#
#   name               arch                     p   n_params   seconds
#   resnet18           resnet18               512    11.18 M      2.0
#   resnet18_seed1     resnet18               512    11.18 M      2.7   (near-twin: other init)
#   mobilenetv3_small  mobilenetv3_small_100 1024     1.52 M      0.3
#   efficientnet_b0    efficientnet_b0       1280     4.01 M      0.9
#   convnext_atto      convnext_atto          320     3.37 M      0.7
#   regnetx_002        regnetx_002            368     2.32 M      0.4
#   vit_tiny           vit_tiny_patch16_224   192     5.49 M      1.2   (img_size=64: 4x4 tokens)
#   deit_tiny          deit_tiny_patch16_224  192     5.49 M      1.3   (img_size=64)
DEMO_MODELS: tuple[DemoModel, ...] = (
    DemoModel("resnet18", "resnet18", 0, "CNN (residual)"),
    DemoModel("resnet18_seed1", "resnet18", 1, "CNN (residual), near-twin of resnet18"),
    DemoModel("mobilenetv3_small", "mobilenetv3_small_100", 0, "CNN (mobile, squeeze-excite)"),
    DemoModel("efficientnet_b0", "efficientnet_b0", 0, "CNN (compound-scaled MBConv)"),
    DemoModel("convnext_atto", "convnext_atto", 0, "CNN (ConvNeXt, LayerNorm)"),
    DemoModel("regnetx_002", "regnetx_002", 0, "CNN (RegNet, grouped conv)"),
    DemoModel("vit_tiny", "vit_tiny_patch16_224", 0, "Vision Transformer (class token)"),
    DemoModel("deit_tiny", "deit_tiny_patch16_224", 0, "Vision Transformer (DeiT)"),
)


def _log(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


def _check_arch(arch: str) -> None:
    import timm

    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ValueError(
            f"unknown timm architecture {arch!r}; list the available ones with "
            f"timm.list_models('*{arch if isinstance(arch, str) else ''}*') or timm.list_models()"
        )


@hf_offline()
def create_model(arch: str, *, seed: int, image_size: tuple[int, int] | None = None, **kwargs):
    """``timm.create_model(arch, pretrained=False, num_classes=0)`` under ``torch.manual_seed``.

    The global torch RNG is left untouched (the seed is applied inside ``torch.random.fork_rng``).
    When ``image_size`` is given and the architecture's constructor accepts ``img_size`` (ViT-like
    models with a fixed patch grid), it is built for that size; CNNs, which take any size, are
    built unchanged. Returns the model in eval mode.
    """
    import timm
    import torch

    _check_arch(arch)
    kw = dict(kwargs)
    for forbidden in ("pretrained", "pretrained_cfg_overlay", "checkpoint_path"):
        if forbidden in kw:
            raise ValueError(f"{forbidden} is not allowed: weights come from a local checkpoint")
    attempts = [kw]
    if image_size is not None and "img_size" not in kw:
        h, w = int(image_size[0]), int(image_size[1])
        attempts = [{**kw, "img_size": h if h == w else (h, w)}, kw]
    error: TypeError | None = None
    for attempt in attempts:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            try:
                model = timm.create_model(arch, pretrained=False, num_classes=0, **attempt)
            except TypeError as exc:
                # A constructor without an img_size argument (a CNN): retry without it.
                if "img_size" in attempt and "img_size" in str(exc):
                    error = exc
                    continue
                raise
        return model.eval()
    raise RuntimeError(f"could not build {arch}") from error  # pragma: no cover


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    import torch

    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} does not hold a state dict of tensors")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _classifier_prefixes(model) -> tuple[str, ...]:
    name = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if name is None:
        return ()
    names = (name,) if isinstance(name, str) else tuple(name)
    return tuple(f"{n}." for n in names)


@hf_offline()
def load_checkpoint(model, arch: str, checkpoint: str | os.PathLike[str]) -> str:
    """Load a local state dict into ``model`` with strict key and shape checks.

    The file is read with ``torch.load(weights_only=True)`` (``.safetensors`` files with
    safetensors); a ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper and a ``module.`` prefix are accepted. Classifier weights (the
    architecture's ``pretrained_cfg["classifier"]``) are dropped, since the model is built without
    a classifier (``num_classes=0``). Every other key must match the model exactly, in name and
    shape.

    Returns
    -------
    The sha256 of the checkpoint file.

    Raises
    ------
    ValueError
        Naming the file, when it is missing, unreadable, or does not fit ``arch`` (missing,
        unexpected or wrongly shaped keys, with examples).
    """
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} does not exist")
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path} as a torch state dict: {exc}") from exc
    state = _unwrap_state_dict(obj, path)
    own = model.state_dict()
    prefixes = _classifier_prefixes(model)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(prefixes)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong_shape),
        ):
            if items:
                shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
                parts.append(f"{len(items)} {label} ({shown})")
        raise ValueError(
            f"checkpoint {path} does not fit timm architecture {arch!r}: " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=True)
    return digest


def _embedding_dim(model) -> int:
    dim = getattr(model, "head_hidden_size", None)
    return int(dim if dim is not None else model.num_features)


@hf_offline()
def extract_features(
    arch: str,
    images: np.ndarray,
    *,
    seed: int,
    weights: str = "random",
    checkpoint: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    log: Callable[[str], None] | None = None,
    num_threads: int | None = None,
    layer: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Pooled pre-logits embeddings of ``images`` from a timm network (docs/method.md §3).

    The model is ``timm.create_model(arch, pretrained=False, num_classes=0)`` built under
    ``torch.manual_seed(seed)`` (ViT-like constructors get ``img_size`` = the image size), with a
    local ``checkpoint`` loaded on top when given. Images are scaled to [0, 1] and normalised with
    the model's ``pretrained_cfg`` mean and std (ImageNet's when absent); the model runs in eval
    mode under ``torch.inference_mode()`` and the features are
    ``model.forward_head(model.forward_features(x), pre_logits=True)``. The same arguments always
    give identical features.

    Parameters
    ----------
    arch : a timm architecture name (``timm.list_models()``).
    images : (n, H, W, 3) uint8 RGB images.
    seed : torch seed of the random initialisation.
    weights : a label recorded in ``info``. ``"random"`` (no checkpoint) or, with ``checkpoint``,
        any name of the weights (``"random"`` with a checkpoint is recorded as ``"checkpoint"``).
    checkpoint : optional path of a local state dict (see :func:`load_checkpoint`).
    device : torch device, e.g. ``"cpu"`` or ``"cuda"``.
    batch_size : images per forward pass.
    log : optional callable receiving one progress line per batch.
    num_threads : optional torch intra-op CPU threads for this call (restored afterwards). On a
        small machine shared with other busy processes, 1 thread can be 10-100x faster than
        oversubscribed OpenMP threads; ``None`` keeps torch's setting.
    layer : optional module name (``model.named_modules()``) whose pooled output replaces the
        pre-logits embedding (4-D outputs averaged over space, 3-D over tokens).

    Returns
    -------
    features : (n, p) float32 array.
    info : dict with ``arch``, ``weights``, ``seed``, ``n_params`` (parameters of the model without
        classifier), ``embedding_dim`` (p), ``image_size``, ``mean``, ``std`` and, with a
        checkpoint, ``checkpoint`` and ``checkpoint_sha256``.

    Raises
    ------
    ValueError
        Unknown architecture, malformed images, weights other than ``"random"`` without a
        checkpoint, or a checkpoint that does not fit the architecture.
    """
    import torch

    _check_arch(arch)
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[3] != 3 or arr.dtype != np.uint8 or arr.shape[0] == 0:
        raise ValueError(
            f"images must be a non-empty (n, H, W, 3) uint8 array, got shape {arr.shape} "
            f"dtype {arr.dtype}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if checkpoint is None and weights != "random":
        raise ValueError(
            f"weights={weights!r} needs a local checkpoint file (nothing is downloaded); "
            "use weights='random' or pass checkpoint=<path>"
        )
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _extract(arch, arr, seed, weights, checkpoint, device, batch_size, log, layer)
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous_threads)


def _build(
    arch: str,
    seed: int,
    weights: str,
    checkpoint: str | os.PathLike[str] | None,
    device: str,
    image_size: tuple[int, int] | None,
) -> tuple[Any, dict[str, Any]]:
    """The network in eval mode on ``device`` (checkpoint loaded) and its provenance."""
    model = create_model(arch, seed=seed, image_size=image_size)
    info: dict[str, Any] = {"arch": arch, "weights": weights, "seed": int(seed)}
    if checkpoint is not None:
        info["checkpoint_sha256"] = load_checkpoint(model, arch, checkpoint)
        info["checkpoint"] = str(checkpoint)
        if weights == "random":
            info["weights"] = "checkpoint"
    info["n_params"] = int(sum(p.numel() for p in model.parameters()))
    info["timm_embedding_dim"] = _embedding_dim(model)
    return model.to(device).eval(), info


class _Embedder:
    """``x -> features``: the pooled pre-logits embedding, or the pooled output of ``layer``.

    With a ``layer`` (a module name of ``model.named_modules()``), a forward hook captures that
    module's output during ``forward_features``; 4-D outputs (N, C, H, W) are averaged over space,
    3-D outputs (N, tokens, C) over tokens, 2-D outputs are used as they are.
    """

    def __init__(self, model, arch: str, layer: str | None):
        self.model, self.layer, self.captured = model, layer, None
        if layer is not None:
            modules = dict(model.named_modules())
            if layer not in modules or layer == "":
                names = [n for n in modules if n and n.count(".") <= 1]
                raise ValueError(
                    f"{arch} has no layer {layer!r}; top-level modules include "
                    f"{names[:12]}{' ...' if len(names) > 12 else ''}"
                )
            modules[layer].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.captured = output[0] if isinstance(output, tuple | list) else output

    def __call__(self, x):
        if self.layer is None:
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        self.captured = None
        self.model.forward_features(x)
        out = self.captured
        if out is None:  # pragma: no cover - a module that forward_features never calls
            raise ValueError(f"layer {self.layer!r} is not used by forward_features")
        if out.ndim == 4:
            return out.mean(dim=(2, 3))
        if out.ndim == 3:
            return out.mean(dim=1)
        return out


def _normaliser(model, device):
    import torch

    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(float(v) for v in cfg.get("std") or IMAGENET_STD)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std, mean_t, std_t


def _extract(
    arch: str,
    arr: np.ndarray,
    seed: int,
    weights: str,
    checkpoint: str | os.PathLike[str] | None,
    device: str,
    batch_size: int,
    log: Callable[[str], None] | None,
    layer: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    import torch

    n, height, width = arr.shape[:3]
    model, info = _build(arch, seed, weights, checkpoint, device, (height, width))
    embed = _Embedder(model, arch, layer)
    mean, std, mean_t, std_t = _normaliser(model, device)

    n_batches = (n + batch_size - 1) // batch_size
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for b in range(n_batches):
            chunk = arr[b * batch_size : (b + 1) * batch_size]
            x = torch.from_numpy(np.ascontiguousarray(chunk)).to(device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - mean_t) / std_t
            try:
                feats = embed(x)
            except RuntimeError as exc:
                raise RuntimeError(f"{arch} failed on {height}x{width} images: {exc}") from exc
            out.append(feats.reshape(feats.shape[0], -1).float().cpu().numpy())
            _log(log, f"{arch} (seed {seed}): batch {b + 1}/{n_batches}, {chunk.shape[0]} images")
    features = np.ascontiguousarray(np.concatenate(out, axis=0), dtype=np.float32)
    info.update(
        embedding_dim=int(features.shape[1]),
        image_size=(int(height), int(width)),
        mean=mean,
        std=std,
        layer=layer or "pre_logits",
    )
    return features, info


@hf_offline()
def extract_image_files(
    arch: str,
    paths: Sequence[str | os.PathLike[str]],
    *,
    seed: int = 0,
    weights: str = "random",
    checkpoint: str | os.PathLike[str] | None = None,
    layer: str | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Embeddings of image files (THINGS) with the network's own evaluation preprocessing.

    Each image is opened with PIL, converted to RGB and passed through timm's evaluation
    transform for the architecture (``resolve_data_config`` + ``create_transform``: resize,
    centre crop at the model's ``crop_pct``, normalise with its mean and std), so a pretrained
    network sees its images as in its own evaluation. Then as :func:`extract_features`. Progress
    is logged every batch.

    Raises
    ------
    ValueError
        Unknown architecture or layer, a checkpoint that does not fit, ``weights`` other than
        ``"random"`` without a checkpoint, no paths, or an unreadable image (named).
    """
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    _check_arch(arch)
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("no image files given")
    if checkpoint is None and weights != "random":
        raise ValueError(
            f"weights={weights!r} needs a local checkpoint file (nothing is downloaded); "
            "use weights='random' or pass checkpoint=<path>"
        )
    model, info = _build(arch, seed, weights, checkpoint, device, None)
    embed = _Embedder(model, arch, layer)
    config = resolve_data_config({}, model=model)
    transform = create_transform(**config, is_training=False)
    n_batches = (len(files) + batch_size - 1) // batch_size
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for b in range(n_batches):
            tensors = []
            for path in files[b * batch_size : (b + 1) * batch_size]:
                try:
                    with Image.open(path) as image:
                        tensors.append(transform(image.convert("RGB")))
                except (OSError, ValueError) as exc:
                    raise ValueError(f"{path}: cannot read the image ({exc})") from exc
            x = torch.stack(tensors).to(device)
            feats = embed(x)
            out.append(feats.reshape(feats.shape[0], -1).float().cpu().numpy())
            _log(log, f"{arch}: batch {b + 1}/{n_batches} ({len(tensors)} images)")
    features = np.ascontiguousarray(np.concatenate(out, axis=0), dtype=np.float32)
    info.update(
        embedding_dim=int(features.shape[1]),
        image_size=tuple(int(v) for v in config["input_size"][1:]),
        mean=tuple(float(v) for v in config["mean"]),
        std=tuple(float(v) for v in config["std"]),
        crop_pct=float(config.get("crop_pct") or 1.0),
        layer=layer or "pre_logits",
    )
    return features, info


@hf_offline()
def count_parameters(arch: str) -> int:
    """Parameters of ``arch`` without its classifier, counted on the meta device (no memory).

    Used for precomputed-feature models whose image tower is a timm architecture
    (``n_params_like:`` in a study file).
    """
    import timm
    import torch

    _check_arch(arch)
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return int(sum(p.numel() for p in model.parameters()))


@hf_offline()
def hf_cache_checkpoint(arch: str, repo: str | None = None) -> Path:
    """The weights file of ``repo`` in the offline Hugging Face cache (nothing is downloaded).

    ``repo`` defaults to the ``hf_hub_id`` of the architecture's pretrained config (so
    ``resnet50.tv_in1k`` -> ``timm/resnet50.tv_in1k``). The cache is ``$HF_HUB_CACHE`` (default
    ``~/.cache/huggingface/hub``); ``model.safetensors`` is preferred over ``pytorch_model.bin``.

    Raises
    ------
    ValueError
        When the repository has no weights file in the cache (with the cache folder searched).
    """
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    _check_arch(arch)
    if repo is None:
        cfg = timm.models.get_pretrained_cfg(arch)
        repo = getattr(cfg, "hf_hub_id", None)
        if not repo:
            raise ValueError(f"{arch}: timm names no Hugging Face repository; give 'hf_repo:'")
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    raise ValueError(
        f"{arch}: no model.safetensors or pytorch_model.bin of {repo!r} in the offline "
        f"Hugging Face cache {cache} (nothing is downloaded; fetch it on a connected machine "
        f"with `huggingface-cli download {repo}` and copy the cache, or give a checkpoint file)"
    )


def _benchmark(n_images: int = 300, size: int = 64) -> None:  # pragma: no cover - manual tool
    import sys
    import time

    from recovery_assets.sources.demo_stimuli import demo_stimuli

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else None
    _, images = demo_stimuli(20, n_images // 20, size=size, seed=0)
    print(f"{images.shape[0]} images of {size} px, num_threads={threads}")
    extract_features("resnet18", images[:32], seed=0, num_threads=threads)  # warm-up
    for spec in DEMO_MODELS:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            feats, info = extract_features(spec.arch, images, seed=spec.seed, num_threads=threads)
            times.append(time.perf_counter() - start)
        rel = float(feats.std(axis=0).mean() / (np.abs(feats).mean() + 1e-12))
        print(
            f"{spec.name:18s} {spec.arch:24s} p={info['embedding_dim']:5d} "
            f"n_params={info['n_params'] / 1e6:6.2f}M best {min(times):6.2f}s "
            f"median {sorted(times)[1]:6.2f}s std/|mean|={rel:.3f} "
            f"finite={np.isfinite(feats).all()}"
        )


if __name__ == "__main__":  # pragma: no cover
    _benchmark()
