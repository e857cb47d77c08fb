"""Pretrained weights from local files only: checkpoints (.pth, .safetensors), the offline Hugging
Face cache, a chosen layer, image files through timm's own evaluation transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from recovery_assets.sources.demo import demo_stimuli
from recovery_assets.sources.timm_features import (
    count_parameters,
    create_model,
    extract_features,
    extract_image_files,
    hf_cache_checkpoint,
)


@pytest.fixture(scope="module")
def images(single_thread):
    return demo_stimuli(2, 3, size=32, seed=0)[1]  # 6 images


@pytest.fixture(scope="module")
def state(single_thread):
    return create_model("resnet18", seed=11).state_dict()


def _fake_hf_cache(root, repo: str, state) -> None:
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")


def test_hf_cache_weights_equal_the_same_checkpoint_file(tmp_path, monkeypatch, images, state):
    _fake_hf_cache(tmp_path / "hub", "timm/resnet18.a1_in1k", state)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    found = hf_cache_checkpoint("resnet18.a1_in1k")  # repository from timm's pretrained config
    assert found.name == "model.safetensors" and "models--timm--resnet18.a1_in1k" in str(found)
    pth = tmp_path / "same.pth"
    torch.save(state, pth)
    a, info = extract_features("resnet18", images, seed=0, checkpoint=found, weights="hf_cache")
    b, _ = extract_features("resnet18", images, seed=0, checkpoint=pth)
    c, _ = extract_features("resnet18", images, seed=0)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)  # the weights were really loaded
    assert info["weights"] == "hf_cache" and len(info["checkpoint_sha256"]) == 64


def test_missing_hf_cache_entry_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"'timm/vgg19.tv_in1k' in the offline Hugging Face cache"):
        hf_cache_checkpoint("vgg19.tv_in1k")
    with pytest.raises(ValueError, match="unknown timm architecture"):
        hf_cache_checkpoint("not_a_network")


def test_a_named_layer_is_pooled(images):
    x, info = extract_features("resnet18", images, seed=0, layer="layer3")
    assert x.shape == (6, 256) and info["layer"] == "layer3"  # 4-D output averaged over space
    y, _ = extract_features("vit_tiny_patch16_224", images, seed=0, layer="blocks.2")
    assert y.shape == (6, 192)  # tokens averaged
    with pytest.raises(ValueError, match="resnet18 has no layer 'layer9'"):
        extract_features("resnet18", images, seed=0, layer="layer9")


def test_image_files_use_the_models_evaluation_transform(tmp_path, images):
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"c{i}.png")
        Image.fromarray(image).save(paths[-1])
    logs: list[str] = []
    x, info = extract_image_files("resnet18", paths, seed=0, batch_size=4, log=logs.append)
    assert x.shape == (6, 512) and x.dtype == np.float32 and np.isfinite(x).all()
    assert info["image_size"] == (224, 224) and info["crop_pct"] == pytest.approx(0.95)
    assert len(logs) == 2  # progress per batch
    again, _ = extract_image_files("resnet18", paths[::-1], seed=0)
    np.testing.assert_allclose(again[::-1], x, rtol=1e-4, atol=1e-5)  # batch-independent
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg: cannot read the image"):
        extract_image_files("resnet18", [*paths, tmp_path / "broken.jpg"], seed=0)


def test_parameter_count_without_building_the_weights():
    assert count_parameters("resnet18") == 11_176_512  # torchvision's 11,689,512 minus fc
    assert count_parameters("vit_large_patch16_224") == 303_301_632
