"""Tests of the offline demo sources: stimuli, simulated observer, THINGS files, timm features."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from recovery_assets.core.ceiling import calibrate_observer_temperature, expected_noise_ceiling
from recovery_assets.core.triplets import noise_ceiling, sample_unique_triplets
from recovery_assets.sources.demo_folder import FILE_KEYS, human_like_files, write_things_folder
from recovery_assets.sources.demo_observer import DemoObserver
from recovery_assets.sources.demo_stimuli import (
    DEMO_CROPS_PER_FAMILY,
    DEMO_IMAGE_SIZE,
    DEMO_N_FAMILIES,
    PHOTO_FAMILIES,
    demo_stimuli,
)
from recovery_assets.sources.timm_features import DEMO_MODELS, extract_features

# --------------------------------------------------------------------------------------------
# fixtures: the default demo (300 stimuli at 64 px) and its files, built once
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stimuli():
    return demo_stimuli(DEMO_N_FAMILIES, DEMO_CROPS_PER_FAMILY, DEMO_IMAGE_SIZE, seed=0)


@pytest.fixture(scope="module")
def observer(stimuli):
    table, images = stimuli
    return DemoObserver(images, table["family"].to_numpy(), seed=0)


@pytest.fixture(scope="module")
def files(observer):
    return human_like_files(observer, n_train=5_000, n_val=500, seed=0)


# --------------------------------------------------------------------------------------------
# stimuli
# --------------------------------------------------------------------------------------------


def test_stimuli_shape_dtype_and_balanced_families(stimuli):
    table, images = stimuli
    n = DEMO_N_FAMILIES * DEMO_CROPS_PER_FAMILY
    assert images.shape == (n, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE, 3)
    assert images.dtype == np.uint8
    assert list(table.columns) == ["uniqueID", "family", "source", "crop_box"]
    assert len(table) == n and table["uniqueID"].is_unique
    counts = table["family"].value_counts()
    assert counts.size == DEMO_N_FAMILIES
    assert (counts == DEMO_CROPS_PER_FAMILY).all()
    assert table["uniqueID"].iloc[0] == f"{PHOTO_FAMILIES[0].family}_01"
    assert table["source"].iloc[0] == PHOTO_FAMILIES[0].source
    # real, varied photographs: no blank crops, crops of one photo differ from each other
    assert (images.reshape(n, -1).std(axis=1) > 1.0).all()
    assert not np.array_equal(images[0], images[1])


def test_stimuli_deterministic_per_seed_and_differ_across_seeds():
    t1, a = demo_stimuli(3, 4, size=32, seed=5)
    t2, b = demo_stimuli(3, 4, size=32, seed=5)
    t3, c = demo_stimuli(3, 4, size=32, seed=6)
    assert np.array_equal(a, b) and t1.equals(t2)
    assert not np.array_equal(a, c)
    assert not t1["crop_box"].equals(t3["crop_box"])
    # family k's crops do not depend on how many families are requested
    _, d = demo_stimuli(5, 4, size=32, seed=5)
    assert np.array_equal(a, d[:12])


def test_stimuli_use_every_bundled_photograph_offline():
    table, images = demo_stimuli(len(PHOTO_FAMILIES), 1, size=16, seed=0)
    assert table["family"].nunique() == len(PHOTO_FAMILIES)
    assert images.shape == (len(PHOTO_FAMILIES), 16, 16, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_families": len(PHOTO_FAMILIES) + 1, "crops_per_family": 2}, "bundled photographs"),
        ({"n_families": 0, "crops_per_family": 2}, "n_families"),
        ({"n_families": 2, "crops_per_family": 0}, "crops_per_family"),
        ({"n_families": 2, "crops_per_family": 2, "size": 4}, "size"),
        ({"n_families": 2.5, "crops_per_family": 2}, "integer"),
    ],
)
def test_stimuli_validate_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        demo_stimuli(**kwargs)


# --------------------------------------------------------------------------------------------
# observer
# --------------------------------------------------------------------------------------------


def test_observer_probabilities_are_a_softmax_of_the_hidden_similarity(observer):
    t = np.array([[0, 1, 2], [5, 40, 200], [299, 3, 150]])
    p = observer.choice_probabilities(t)
    assert p.shape == (3, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    h = observer.similarity
    i, j, k = t.T
    logits = np.column_stack([h[j, k], h[i, k], h[i, j]]) / observer.temperature
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    np.testing.assert_allclose(h, h.T)


def test_observer_prefers_same_family_pairs(stimuli, observer):
    table, _ = stimuli
    fam = table["family"].to_numpy()
    t = sample_unique_triplets(np.arange(len(fam)), 20_000, 1)
    same = np.column_stack([fam[t[:, 1]] == fam[t[:, 2]], fam[t[:, 0]] == fam[t[:, 2]]])
    same = np.column_stack([same, fam[t[:, 0]] == fam[t[:, 1]]])  # same[:, c]: odd one = c
    one_pair = same.sum(axis=1) == 1
    assert one_pair.sum() > 500
    answers = observer.answer(t[one_pair], seed=3)
    # the odd one out is the concept outside the same-family pair
    hit = same[one_pair][np.arange(one_pair.sum()), answers]
    assert hit.mean() > 0.8  # chance 1/3


def test_observer_answers_are_seeded(observer):
    t = sample_unique_triplets(np.arange(observer.n), 2_000, 0)
    a = observer.answer(t, seed=1)
    assert np.array_equal(a, observer.answer(t, seed=1))
    assert not np.array_equal(a, observer.answer(t, seed=2))
    assert set(np.unique(a)) == {0, 1, 2}
    # empirical answer frequencies follow the probabilities
    p = observer.choice_probabilities(t)
    freq = np.bincount(a, minlength=3) / a.size
    np.testing.assert_allclose(freq, p.mean(axis=0), atol=0.03)


def test_expected_ceiling_matches_simulation_and_extremes():
    rng = np.random.default_rng(0)
    m, repeats = 400, 6
    p = rng.dirichlet([1.0, 1.0, 1.0], size=m)
    expected = expected_noise_ceiling(p, repeats)
    triplets = np.repeat(3 * np.arange(m)[:, None] + np.arange(3), repeats, axis=0)
    probs = np.repeat(p, repeats, axis=0)
    others = np.array([[1, 2], [0, 2], [0, 1]])
    simulated = []
    for s in range(30):
        u = np.random.default_rng(s).random(probs.shape[0])
        answer = np.minimum((u[:, None] >= np.cumsum(probs, axis=1)[:, :2]).sum(axis=1), 2)
        pair = np.take_along_axis(triplets, others[answer], axis=1)
        odd = triplets[np.arange(triplets.shape[0]), answer]
        simulated.append(noise_ceiling(np.column_stack([pair, odd])).ceiling)
    assert abs(np.mean(simulated) - expected) < 0.01
    assert expected_noise_ceiling(np.array([[1.0, 0.0, 0.0]]), 10) == pytest.approx(1.0)
    # two answers from a uniform distribution agree with probability 1/3
    assert expected_noise_ceiling(np.full((1, 3), 1 / 3), 2) == pytest.approx(1 / 3)


def test_temperature_is_found_by_root_finding(observer):
    t = sample_unique_triplets(np.arange(observer.n), 3_000, 4)
    temp = calibrate_observer_temperature(observer.similarity, t, repeats=10, target=0.678)
    logits = observer.logits(t) * observer.temperature / temp
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    assert expected_noise_ceiling(p, 10) == pytest.approx(0.678, abs=1e-6)
    assert temp == pytest.approx(observer.temperature, rel=0.1)
    # a higher target needs a lower temperature; an unreachable one is an error
    assert calibrate_observer_temperature(observer.similarity, t, 10, target=0.8) < temp
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_observer_temperature(observer.similarity, t, 10, target=0.2)


# --------------------------------------------------------------------------------------------
# THINGS-convention files
# --------------------------------------------------------------------------------------------


def test_files_follow_the_pair_pair_odd_convention(files, observer):
    assert tuple(files) == FILE_KEYS
    for key in FILE_KEYS:
        rows = files[key]
        assert rows.ndim == 2 and rows.shape[1] == 3 and rows.dtype == np.int64
        assert rows.min() >= 0 and rows.max() < observer.n
        assert (np.sort(rows, axis=1)[:, :2] != np.sort(rows, axis=1)[:, 1:]).all()
    p = observer.choice_probabilities(files["trainset"])
    predicted = p.argmax(axis=1)
    assert (predicted == 2).mean() > 0.6  # column 2 is the odd one out (chance 1/3)
    assert (predicted == 0).mean() < 0.25 and (predicted == 1).mean() < 0.25


def test_train_and_validation_are_unique_and_test_sets_repeated(files, observer):
    n = observer.n

    def keys(rows):
        s = np.sort(rows, axis=1)
        return (s[:, 0] * n + s[:, 1]) * n + s[:, 2]

    assert files["trainset"].shape == (5_000, 3) and files["validationset"].shape == (500, 3)
    for key in ("trainset", "validationset"):
        assert np.unique(keys(files[key])).size == files[key].shape[0]
    seen = [set(keys(files[k]).tolist()) for k in FILE_KEYS]
    for a in range(len(FILE_KEYS)):
        for b in range(a + 1, len(FILE_KEYS)):
            assert not seen[a] & seen[b]
    for key in ("testset1", "testset2", "testset3"):
        _, counts = np.unique(keys(files[key]), return_counts=True)
        assert counts.size == 1_000 and (counts == 10).all()
        # repeated triplets get different answers sometimes (independent draws)
        odd_per_triplet = pd.Series(files[key][:, 2]).groupby(keys(files[key])).nunique()
        assert (odd_per_triplet > 1).mean() > 0.3


def test_testset2_noise_ceiling_is_close_to_things(files):
    result = noise_ceiling(files["testset2"])
    assert result.n_triplets == 1_000
    assert abs(result.ceiling - 0.678) < 0.03


def test_files_are_seeded(observer):
    a = human_like_files(observer, 200, 20, n_test_triplets=30, repeats=3, seed=1)
    b = human_like_files(observer, 200, 20, n_test_triplets=30, repeats=3, seed=1)
    c = human_like_files(observer, 200, 20, n_test_triplets=30, repeats=3, seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in FILE_KEYS)
    assert not np.array_equal(a["trainset"], c["trainset"])
    with pytest.raises(ValueError, match="unique triplets"):
        human_like_files(observer, 10**9, 0)
    with pytest.raises(ValueError, match="repeats"):
        human_like_files(observer, 10, 10, repeats=1)


def test_write_things_folder_round_trips(tmp_path, stimuli, files):
    table, images = stimuli
    paths = write_things_folder(tmp_path / "demo", table, images, files)
    back = pd.read_csv(paths["concepts"], sep="\t")
    pd.testing.assert_frame_equal(back, table)
    assert back.columns[0] == "uniqueID"
    for key in FILE_KEYS:
        assert paths[key] == tmp_path / "demo" / "triplets" / f"{key}.txt"
        loaded = np.loadtxt(paths[key], dtype=np.int64)
        assert np.array_equal(loaded, files[key])
    uid = table["uniqueID"].iloc[7]
    image_file = paths["images"] / uid / f"{uid}_01b.jpg"
    assert image_file.is_file()
    from PIL import Image

    img = np.asarray(Image.open(image_file).convert("RGB"))
    assert img.shape == images[7].shape
    assert np.abs(img.astype(float) - images[7]).mean() < 6.0  # JPEG, quality 95
    with pytest.raises(ValueError, match="outside"):
        write_things_folder(tmp_path / "bad", table, images, {"trainset": np.array([[0, 1, 999]])})


# --------------------------------------------------------------------------------------------
# timm features
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_images(stimuli):
    return stimuli[1][::25]  # 12 images, 64 px


def test_features_deterministic_per_seed_and_differ_across_seeds(small_images):
    logs: list[str] = []
    a, info = extract_features("resnet18", small_images, seed=0, batch_size=5, log=logs.append)
    b, _ = extract_features("resnet18", small_images, seed=0)
    c, _ = extract_features("resnet18", small_images, seed=1)
    assert a.dtype == np.float32 and a.shape == (small_images.shape[0], 512)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.isfinite(a).all() and a.std(axis=0).max() > 0
    assert len(logs) == 3 and "3/3" in logs[-1]
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    assert info["embedding_dim"] == model.num_features == 512
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
    assert info["weights"] == "random"


def test_vit_features_at_small_image_size(small_images):
    feats, info = extract_features("vit_tiny_patch16_224", small_images, seed=0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64)
    assert feats.shape == (small_images.shape[0], model.num_features)
    assert info["embedding_dim"] == info["timm_embedding_dim"] == 192
    assert np.isfinite(feats).all()
    # rows differ between images (the features depend on the image)
    assert np.abs(feats - feats[:1]).max() > 1e-4


def test_demo_models_are_distinct_valid_timm_architectures():
    assert len(DEMO_MODELS) >= 6
    assert len({m.name for m in DEMO_MODELS}) == len(DEMO_MODELS)
    assert len({m.arch for m in DEMO_MODELS}) >= 6
    assert all(timm.is_model(m.arch) for m in DEMO_MODELS)


def test_unknown_architecture_raises_a_clear_error(small_images):
    with pytest.raises(ValueError, match=r"no_such_net.*timm\.list_models"):
        extract_features("no_such_net", small_images, seed=0)


def test_checkpoint_loads_and_a_bad_one_is_rejected(tmp_path, small_images):
    # a resnet18 state dict with its 1000-class classifier: the classifier is dropped and the
    # features are those of the saved network
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        full = timm.create_model("resnet18", pretrained=False).eval()
    good = tmp_path / "resnet18_full.pth"
    torch.save(full.state_dict(), good)
    loaded, info = extract_features(
        "resnet18", small_images, seed=0, checkpoint=good, weights="my_weights"
    )
    mean = torch.tensor(full.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(full.pretrained_cfg["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(small_images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    with torch.inference_mode():
        expected = full.forward_head(full.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(loaded, expected, rtol=1e-5, atol=1e-6)
    random0, _ = extract_features("resnet18", small_images, seed=0)
    assert not np.allclose(loaded, random0)
    assert info["weights"] == "my_weights" and len(info["checkpoint_sha256"]) == 64

    # wrong architecture: regnet weights for a resnet
    bad = tmp_path / "regnet.pth"
    torch.save(timm.create_model("regnetx_002", pretrained=False).state_dict(), bad)
    with pytest.raises(ValueError, match=r"regnet\.pth.*does not fit.*resnet18.*missing keys"):
        extract_features("resnet18", small_images, seed=0, checkpoint=bad)

    # right keys, wrong shape
    state = full.state_dict()
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    shaped = tmp_path / "shape.pth"
    torch.save(state, shaped)
    with pytest.raises(ValueError, match=r"shape\.pth.*shape mismatches.*conv1\.weight"):
        extract_features("resnet18", small_images, seed=0, checkpoint=shaped)

    with pytest.raises(ValueError, match="needs a local checkpoint"):
        extract_features("resnet18", small_images, seed=0, weights="imagenet")
