"""Tests of recovery_assets.sources.thingsvision: thingsvision feature files in concept order."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from recovery_assets.sources.features import FeatureFileError
from recovery_assets.sources.thingsvision import (
    load_thingsvision_features,
    write_thingsvision_features,
)

# Concept order as in things_concepts.tsv (not sorted). Ids share prefixes, contain underscores
# and digits: a naive split at "_" or a prefix match maps images to the wrong concept.
CONCEPTS = [
    "aardvark",
    "camera_lens",
    "camera1",
    "camera10",
    "camera",
    "tie_rack",
    "tie",
    "zebra",
]
N, P = len(CONCEPTS), 4


@pytest.fixture
def x() -> np.ndarray:
    """A distinct value in every cell, so any row permutation is detected."""
    return np.random.default_rng(7).standard_normal((N, P)).astype(np.float32)


def _perm(n: int, seed: int = 0) -> np.ndarray:
    perm = np.random.default_rng(seed).permutation(n)
    assert not np.array_equal(perm, np.arange(n))
    return perm


def _things_name(uid: str, suffix: str = "01b") -> str:
    return f"images/{uid}/{uid}_{suffix}.jpg"


def _fails(path: Path, pattern: str, features: Path | None = None, **kw) -> str:
    """Loading must raise a FeatureFileError whose message starts with ``path`` and whose text
    after the path matches ``pattern``; ``features`` is the file to load (default ``path``)."""
    anchored = rf"(?s)^{re.escape(str(path))}(?::|, line \d+:) .*(?:{pattern})"
    with pytest.raises(FeatureFileError, match=anchored) as info:
        load_thingsvision_features(features or path, CONCEPTS, **kw)
    return str(info.value)


def _write_list(folder: Path, lines: list[str]) -> Path:
    path = folder / "file_names.txt"
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_format", ["npy", "hdf5"])
def test_round_trip_shuffled_rows_map_to_concept_order(tmp_path, x, file_format):
    perm = _perm(N)
    names = [_things_name(CONCEPTS[i]) for i in perm]
    path = write_thingsvision_features(tmp_path / "out", x[perm], names, file_format)
    assert path.name == f"features.{file_format}"
    features, info = load_thingsvision_features(path, CONCEPTS)
    assert features.dtype == np.float32
    assert features.flags.c_contiguous
    np.testing.assert_array_equal(features, x)
    list_path = tmp_path / "out" / "file_names.txt"
    assert info == {
        "path": str(path),
        "sha256": _sha(path),
        "format": f"thingsvision-{file_format}",
        "order": "mapped by image file name",
        "file_names": str(list_path),
        "file_names_sha256": _sha(list_path),
        "concept_image": "task",
        "n": N,
        "p": P,
        "n_images": N,
    }


def test_writer_layout_matches_thingsvision(tmp_path, x):
    names = [_things_name(c) for c in CONCEPTS]
    path = write_thingsvision_features(tmp_path, x, names, "hdf5")
    with h5py.File(path, "r") as handle:
        assert list(handle) == ["features"]
        np.testing.assert_array_equal(handle["features"][()], x)
    assert (tmp_path / "file_names.txt").read_text().splitlines() == names
    npy = write_thingsvision_features(tmp_path / "npy", x, names)
    np.testing.assert_array_equal(np.load(npy), x)


def test_h5_suffix_and_single_other_dataset(tmp_path, x):
    perm = _perm(N, 1)
    _write_list(tmp_path, [_things_name(CONCEPTS[i]) for i in perm])
    path = tmp_path / "vit.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("layer/penultimate", data=x[perm])
        handle.create_dataset("norms", data=np.ones(N))  # 1-D: not a candidate
    features, info = load_thingsvision_features(path, CONCEPTS)
    np.testing.assert_array_equal(features, x)
    assert info["format"] == "thingsvision-hdf5"


def test_explicit_file_names_path(tmp_path, x):
    perm = _perm(N, 2)
    names = [_things_name(CONCEPTS[i]) for i in perm]
    list_path = _write_list(tmp_path, names)
    path = tmp_path / "model" / "features.npy"  # extract_features(output_dir=...) layout
    path.parent.mkdir()
    np.save(path, x[perm])
    features, info = load_thingsvision_features(path, CONCEPTS, file_names=list_path)
    np.testing.assert_array_equal(features, x)
    assert info["file_names"] == str(list_path)


def test_float64_and_integer_features_are_cast(tmp_path, x):
    names = [_things_name(c) for c in CONCEPTS]
    x64 = x.astype(np.float64) * 1.1
    path = write_thingsvision_features(tmp_path / "f64", x64, names)
    features, _ = load_thingsvision_features(path, CONCEPTS)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, x64.astype(np.float32))
    xi = np.arange(N * P, dtype=np.int64).reshape(N, P)
    path = write_thingsvision_features(tmp_path / "int", xi, names, "hdf5")
    features, _ = load_thingsvision_features(path, CONCEPTS)
    np.testing.assert_array_equal(features, xi.astype(np.float32))


# --------------------------------------------------------------------------------------------
# Several images per concept
# --------------------------------------------------------------------------------------------


def _several_images(tmp_path: Path, file_format: str = "npy"):
    """Every concept with images _01b, _02s, _03n (rows shuffled); returns path, data, names."""
    suffixes = ["01b", "02s", "03n"]
    names = [_things_name(c, s) for c in CONCEPTS for s in suffixes]
    data = np.random.default_rng(5).standard_normal((len(names), P)).astype(np.float32)
    perm = _perm(len(names), 3)
    path = write_thingsvision_features(tmp_path, data[perm], [names[i] for i in perm], file_format)
    return path, data.reshape(N, len(suffixes), P)


@pytest.mark.parametrize("file_format", ["npy", "hdf5"])
def test_task_image_is_the_b_image(tmp_path, file_format):
    path, data = _several_images(tmp_path, file_format)
    features, info = load_thingsvision_features(path, CONCEPTS)
    np.testing.assert_array_equal(features, data[:, 0])
    assert info["n_images"] == 3 * N
    assert (info["n"], info["p"], info["concept_image"]) == (N, P, "task")


def test_mean_averages_all_images_in_float64(tmp_path):
    path, data = _several_images(tmp_path)
    features, info = load_thingsvision_features(path, CONCEPTS, concept_image="mean")
    expected = data.astype(np.float64).mean(axis=1).astype(np.float32)
    np.testing.assert_array_equal(features, expected)
    assert not np.allclose(features, data[:, 0])
    assert features.flags.c_contiguous and features.dtype == np.float32
    assert info["concept_image"] == "mean"


def test_several_b_images_take_the_lowest_number_and_single_image_any_name(tmp_path):
    names, rows = [], []
    for i, c in enumerate(CONCEPTS):
        if c == "camera":  # two task images: _02b wins over _10b, listed first
            names += [_things_name(c, "10b"), _things_name(c, "02b"), _things_name(c, "01s")]
            rows += [[100.0 + i] * P, [float(i)] * P, [200.0 + i] * P]
        elif c == "zebra":  # a single image, not a b image
            names.append(_things_name(c, "07n"))
            rows.append([float(i)] * P)
        else:
            names += [_things_name(c, "03s"), _things_name(c, "01b")]
            rows += [[300.0 + i] * P, [float(i)] * P]
    path = write_thingsvision_features(tmp_path, np.array(rows), names)
    features, _ = load_thingsvision_features(path, CONCEPTS)
    np.testing.assert_array_equal(features[:, 0], np.arange(N, dtype=np.float32))


# --------------------------------------------------------------------------------------------
# Layouts and ids
# --------------------------------------------------------------------------------------------


def test_flat_layout_absolute_and_windows_paths(tmp_path, x):
    perm = _perm(N, 4)
    names = []
    for k, i in enumerate(perm):
        uid = CONCEPTS[i]
        if k % 3 == 0:
            names.append(f"{uid}.jpg")  # instance dataset: bare file names
        elif k % 3 == 1:
            names.append(f"/data/things/flat/{uid}.PNG")
        else:
            names.append(f"C:\\things\\images\\{uid}\\{uid}_01b.jpg")
    path = write_thingsvision_features(tmp_path, x[perm], names)
    features, _ = load_thingsvision_features(path, CONCEPTS)
    np.testing.assert_array_equal(features, x)


@pytest.mark.parametrize(
    "layout",
    [
        "things",  # images/camera10/camera10_01b.jpg
        "flat",  # camera10.jpg
        "flat_things_names",  # images/camera10_01b.jpg: no concept folder
    ],
)
def test_ids_with_underscores_and_digits(tmp_path, x, layout):
    perm = _perm(N, 5)
    if layout == "things":
        names = [_things_name(CONCEPTS[i]) for i in perm]
    elif layout == "flat":
        names = [f"images/{CONCEPTS[i]}.jpg" for i in perm]
    else:
        names = [f"images/{CONCEPTS[i]}_01b.jpg" for i in perm]
    path = write_thingsvision_features(tmp_path, x[perm], names)
    features, _ = load_thingsvision_features(path, CONCEPTS)
    np.testing.assert_array_equal(features, x)


def test_camera_prefixes_are_not_confused_with_several_images(tmp_path):
    # camera1 / camera10 / camera_lens images must not count as images of "camera"
    concepts = ["camera", "camera1", "camera10", "camera_lens"]
    names = [
        "camera10_01b.jpg",
        "camera_lens_02s.jpg",
        "camera1_01b.jpg",
        "camera_01b.jpg",
        "camera_lens_01b.jpg",
    ]
    data = np.arange(len(names) * 2, dtype=np.float32).reshape(-1, 2)
    path = write_thingsvision_features(tmp_path, data, names)
    features, _ = load_thingsvision_features(path, concepts)
    np.testing.assert_array_equal(features, data[[3, 2, 0, 4]])
    features, _ = load_thingsvision_features(path, concepts, concept_image="mean")
    np.testing.assert_array_equal(features[3], data[[1, 4]].mean(axis=0))


def test_trailing_blank_lines_and_whitespace_are_ignored(tmp_path, x):
    path = write_thingsvision_features(tmp_path, x, [_things_name(c) for c in CONCEPTS])
    list_path = tmp_path / "file_names.txt"
    list_path.write_text(list_path.read_text().replace("\n", " \r\n") + "\n\n  \n")
    features, _ = load_thingsvision_features(path, CONCEPTS)
    np.testing.assert_array_equal(features, x)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _valid(tmp_path: Path, x: np.ndarray, file_format: str = "npy") -> Path:
    return write_thingsvision_features(
        tmp_path, x, [_things_name(c) for c in CONCEPTS], file_format
    )


def test_missing_file_names_names_both_paths(tmp_path, x):
    path = _valid(tmp_path, x)
    list_path = tmp_path / "file_names.txt"
    list_path.unlink()
    message = _fails(list_path, "no such file", features=path)
    assert str(path) in message
    other = tmp_path / "elsewhere.txt"
    message = _fails(other, "no such file", features=path, file_names=other)
    assert str(path) in message


def test_unmapped_image_names_file_and_line(tmp_path, x):
    names = [_things_name(c) for c in CONCEPTS]
    names[5] = "images/giraffe/giraffe_01b.jpg"
    names[6] = "images/cameras.jpg"
    path = write_thingsvision_features(tmp_path, x, names)
    list_path = tmp_path / "file_names.txt"
    message = _fails(list_path, r"maps to no concept", features=path)
    assert message.startswith(f"{list_path}, line 6: image 'images/giraffe/giraffe_01b.jpg'")
    assert "2 of 8 lines map to no concept" in message


def test_duplicate_lines_name_both_lines(tmp_path, x):
    names = [_things_name(c) for c in CONCEPTS]
    names[6] = names[2]
    path = write_thingsvision_features(tmp_path, x, names)
    list_path = tmp_path / "file_names.txt"
    message = _fails(list_path, r"repeats line 3", features=path)
    assert message.startswith(f"{list_path}, line 7:")
    assert repr(names[2]) in message


def test_blank_line_inside_the_list(tmp_path, x):
    path = _valid(tmp_path, x)
    list_path = tmp_path / "file_names.txt"
    lines = list_path.read_text().splitlines()
    list_path.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
    message = _fails(list_path, "is empty", features=path)
    assert message.startswith(f"{list_path}, line 4:")


def test_empty_and_non_utf8_lists(tmp_path, x):
    path = _valid(tmp_path, x)
    list_path = tmp_path / "file_names.txt"
    list_path.write_text("\n\n")
    _fails(list_path, "lists no images", features=path)
    list_path.write_bytes(b"images/aardvark/aardvark_01b.jpg\nimages/\xff.jpg\n")
    message = _fails(list_path, "not UTF-8", features=path)
    assert message.startswith(f"{list_path}, line 2:")


def test_concepts_without_image(tmp_path, x):
    keep = [0, 1, 4, 7]
    names = [_things_name(CONCEPTS[i]) for i in keep]
    path = write_thingsvision_features(tmp_path, x[keep], names)
    message = _fails(tmp_path / "file_names.txt", r"4 of the 8 concepts", features=path)
    assert "have no image: ['camera1', 'camera10', 'tie_rack', 'tie']" in message


def test_several_images_without_task_image_suggests_mean(tmp_path, x):
    names = [_things_name(c) for c in CONCEPTS]
    names[3] = _things_name("camera10", "02s")
    names.append(_things_name("camera10", "05n"))
    data = np.vstack([x, x[:1]])
    path = write_thingsvision_features(tmp_path, data, names)
    message = _fails(tmp_path / "file_names.txt", r"concept_image: mean", features=path)
    assert "concept 'camera10' has 2 images (lines 4, 9)" in message
    # averaging works for the same files
    features, _ = load_thingsvision_features(path, CONCEPTS, concept_image="mean")
    np.testing.assert_array_equal(features[3], (x[3] + x[0]) / 2)


def test_row_count_differs_from_list(tmp_path, x):
    path = _valid(tmp_path, x)
    list_path = tmp_path / "file_names.txt"
    with open(list_path, "a") as handle:
        handle.write("images/zebra/zebra_02s.jpg\n")
    message = _fails(path, r"has 8 rows but .* lists 9 images")
    assert str(list_path) in message


@pytest.mark.parametrize("file_format", ["npy", "hdf5"])
@pytest.mark.parametrize("value,kind", [(np.nan, "NaN"), (np.inf, "inf")])
def test_non_finite_row_names_row_and_image(tmp_path, x, file_format, value, kind):
    bad = x.copy()
    bad[5, 2] = value
    bad[6, 0] = value
    path = _valid(tmp_path, bad, file_format)
    message = _fails(
        path,
        rf"row 5 \(image 'images/tie_rack/tie_rack_01b.jpg', line 6 of "
        rf"file_names.txt\) contains {kind}",
    )
    assert "2 of 8 rows contain NaN or inf" in message


def test_unused_non_finite_row_is_still_an_error(tmp_path):
    path, _ = _several_images(tmp_path)
    data = np.load(path)
    lines = (tmp_path / "file_names.txt").read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.endswith("_03n.jpg"))
    data[row, 0] = np.nan
    np.save(path, data)
    _fails(path, rf"row {row} \(image {re.escape(repr(lines[row]))}")


def test_float32_overflow(tmp_path, x):
    big = x.astype(np.float64)
    big[3, 1] = 1e39
    path = _valid(tmp_path, big, "hdf5")
    _fails(path, r"row 3 \(image 'images/camera10/camera10_01b.jpg'.*beyond the float32 range")


def test_not_2d_and_non_numeric(tmp_path, x):
    names = [_things_name(c) for c in CONCEPTS]
    _write_list(tmp_path, names)
    path = tmp_path / "features.npy"
    np.save(path, np.zeros((N, 2, 3, 3), dtype=np.float32))
    _fails(path, r"not 2-D \(shape \(8, 2, 3, 3\)\).*flatten_acts=True")
    h5 = tmp_path / "features.hdf5"
    with h5py.File(h5, "w") as handle:
        handle.create_dataset("features", data=np.array([b"a"] * N))
    _fails(h5, r"dataset 'features' has non-numeric dtype")
    with h5py.File(h5, "w") as handle:
        handle.create_dataset("features", data=np.zeros(N))
    _fails(h5, r"dataset 'features' is not 2-D")


def test_hdf5_without_features_dataset_lists_datasets(tmp_path, x):
    _write_list(tmp_path, [_things_name(c) for c in CONCEPTS])
    path = tmp_path / "features.hdf5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("a", data=x)
        handle.create_dataset("b", data=x)
    message = _fails(path, r"no 'features' dataset and not exactly one 2-D numeric dataset")
    assert "several: ['a', 'b']" in message and "a (8, 4) float32" in message
    with h5py.File(path, "w") as handle:
        handle.create_dataset("labels", data=np.zeros(N))
    message = _fails(path, r"\(none\); datasets: \[labels \(8,\) float64\]")
    with h5py.File(path, "w") as handle:  # thingsvision's split_features output
        handle.create_dataset("features_01", data=x[:4])
        handle.create_dataset("features_02", data=x[4:])
    _fails(path, r"thingsvision split the matrix into features_01")


def test_corrupt_and_unsupported_files(tmp_path, x):
    _write_list(tmp_path, [_things_name(c) for c in CONCEPTS])
    path = tmp_path / "features.hdf5"
    path.write_bytes(b"not an hdf5 file")
    _fails(path, "corrupt or not an HDF5 file")
    pt = tmp_path / "features.pt"
    pt.write_bytes(b"")
    _fails(pt, r"unsupported file type '\.pt'.*file_format=\"npy\" or \"hdf5\"")
    _fails(tmp_path / "missing.npy", "no such file")


def test_bad_arguments(tmp_path, x):
    path = _valid(tmp_path, x)
    with pytest.raises(ValueError, match="concept_image must be one of"):
        load_thingsvision_features(path, CONCEPTS, concept_image="first")
    with pytest.raises(ValueError, match="duplicated"):
        load_thingsvision_features(path, CONCEPTS + ["tie"])
    with pytest.raises(ValueError, match="2 file names for 8 rows"):
        write_thingsvision_features(tmp_path / "w", x, ["a.jpg", "b.jpg"])
    with pytest.raises(ValueError, match="file_format"):
        write_thingsvision_features(tmp_path / "w", x, [f"{c}.jpg" for c in CONCEPTS], "pt")
    with pytest.raises(ValueError, match="one-line"):
        write_thingsvision_features(tmp_path / "w", x[:1], ["a\nb.jpg"])
