"""Pretrained weights from local files only: checkpoints (.pth, .safetensors), the offline Hugging
Face cache, a chosen layer, image files through timm's own evaluation transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from recovery_assets.sources.demo_stimuli import demo_stimuli
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


def test_importing_the_package_leaves_the_environment_alone(tmp_path):
    """No environment change at import (or when the definitions are built): offline mode is
    set only around the calls that build networks or find weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = (
        "import os\n"
        "import recovery_assets.definitions as d\n"
        "d.defs()\n"
        "import recovery_assets.pipeline, recovery_assets.sources.timm_features\n"
        "from huggingface_hub import constants\n"
        "print(os.environ.get('HF_HUB_OFFLINE'), constants.HF_HUB_OFFLINE)\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(RECOVERY_STUDY=str(root / "studies" / "tiny.yaml"), RECOVERY_DATA=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["None", "False"]


def test_hf_cache_weights_are_found_and_loaded_offline(tmp_path, monkeypatch, images, state):
    """With HF_HUB_OFFLINE unset, the cache lookup and the network are still offline (the
    variable and huggingface_hub's switch), and both are restored afterwards."""
    import os

    import huggingface_hub
    import timm
    from huggingface_hub import constants

    from recovery_assets.sources import timm_features

    _fake_hf_cache(tmp_path / "hub", "timm/resnet18.a1_in1k", state)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = []

    def recording(fn):
        def call(*args, **kwargs):
            seen.append(
                (fn.__name__, os.environ.get("HF_HUB_OFFLINE"), constants.is_offline_mode())
            )
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache", recording(huggingface_hub.try_to_load_from_cache)
    )
    monkeypatch.setattr(timm, "create_model", recording(timm.create_model))
    found = timm_features.hf_cache_checkpoint("resnet18.a1_in1k")
    x, info = timm_features.extract_features(
        "resnet18", images, seed=0, checkpoint=found, weights="hf_cache"
    )
    assert info["weights"] == "hf_cache" and np.isfinite(x).all()
    assert {name for name, _, _ in seen} == {"try_to_load_from_cache", "create_model"}
    assert all(env == "1" and offline for _, env, offline in seen), seen
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False
    with timm_features.hf_offline():  # nested and restored to a value that was set
        with timm_features.hf_offline():
            assert os.environ["HF_HUB_OFFLINE"] == "1"
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with timm_features.hf_offline():
        assert constants.is_offline_mode()
    assert os.environ["HF_HUB_OFFLINE"] == "0" and constants.HF_HUB_OFFLINE is False
