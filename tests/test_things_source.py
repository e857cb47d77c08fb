"""Tests of recovery_assets.sources.things: concept table, images, thumbnails, folder check."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from things_folders import THINGS_COLUMNS, make_things_folder

from recovery_assets.core.generator import triplet_logits
from recovery_assets.core.pixels import pixel_features, pixel_reference
from recovery_assets.core.triplets import noise_ceiling
from recovery_assets.sources.things import (
    ThingsDataError,
    find_images,
    load_thumbnails,
    read_concepts,
    require_images,
)
from recovery_assets.sources.validate_things import validate_things

# Ids whose sorted order differs from the file order (docs/method.md §2).
IDS = ["camera_lens", "camera1", "camera2", "aardvark", "zebra"]


# --------------------------------------------------------------------------------------------
# read_concepts
# --------------------------------------------------------------------------------------------


def _table_text(ids: list[str], *, sep: str = "\t") -> str:
    header = sep.join(THINGS_COLUMNS)
    lines = [header]
    for i, uid in enumerate(ids):
        values = [f"{c.split()[0].lower()}_{i}" for c in THINGS_COLUMNS]
        values[THINGS_COLUMNS.index("uniqueID")] = uid
        values[THINGS_COLUMNS.index("Bigram")] = "NA"
        values[THINGS_COLUMNS.index("Wordnet ID3")] = ""
        values[THINGS_COLUMNS.index("SUBTLEX freq")] = "007"
        lines.append(sep.join(values))
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_concepts_keeps_file_order_and_every_column_as_text(tmp_path):
    path = _write(tmp_path / "things_concepts.tsv", _table_text(IDS) + "\n\n")
    table = read_concepts(path, n_concepts=len(IDS))
    assert list(table.columns) == ["concept", *THINGS_COLUMNS]
    assert len(THINGS_COLUMNS) == 25
    assert table["uniqueID"].tolist() == IDS  # file order, not sorted
    assert sorted(IDS) != IDS
    assert table["concept"].tolist() == list(range(len(IDS)))
    assert table["concept"].dtype == np.int64
    assert (table["Bigram"] == "NA").all()  # no NA conversion
    assert (table["Wordnet ID3"] == "").all()
    assert (table["SUBTLEX freq"] == "007").all()  # strings, not numbers
    # a folder is accepted in place of the file
    assert read_concepts(tmp_path)["uniqueID"].tolist() == IDS


def test_read_concepts_handles_quotes_bom_and_trailing_tabs(tmp_path):
    header = "Word\tuniqueID\tDefinition"
    rows = ['"a ""b"" c"\tcamera_lens\tlens, for a camera\t', "cam\tcamera1\tx"]
    path = tmp_path / "t.tsv"
    path.write_bytes(("\ufeff" + "\n".join([header, *rows]) + "\n").encode("utf-8"))
    table = read_concepts(path)
    assert table["uniqueID"].tolist() == ["camera_lens", "camera1"]
    assert table["Word"].tolist() == ['a "b" c', "cam"]
    assert list(table.columns) == ["concept", "Word", "uniqueID", "Definition"]


def _edit_lines(text: str, line: int, new: str | None) -> str:
    lines = text.splitlines()
    if new is None:
        del lines[line - 1]
    else:
        lines[line - 1] = new
    return "\n".join(lines) + "\n"


def _bad_field_count(text: str) -> str:
    lines = text.splitlines()
    lines[3] = lines[3].rsplit("\t", 2)[0]  # line 4 loses two fields
    return "\n".join(lines) + "\n"


def _duplicate(text: str) -> str:
    lines = text.splitlines()
    lines[4] = lines[4].replace("aardvark", "camera1")  # line 5 repeats line 3's id
    return "\n".join(lines) + "\n"


def _empty_id(text: str) -> str:
    lines = text.splitlines()
    fields = lines[2].split("\t")
    fields[THINGS_COLUMNS.index("uniqueID")] = " "
    lines[2] = "\t".join(fields)
    return "\n".join(lines) + "\n"


def _no_unique_id(text: str) -> str:
    return text.replace("uniqueID", "ID", 1)


BAD_TABLES = {
    "field_count": (_bad_field_count, {}, ["line 4", "wrong number of fields", "has 23"]),
    "duplicate": (_duplicate, {}, ["duplicate uniqueID", "'camera1' (lines 3, 5)"]),
    "empty_id": (_empty_id, {}, ["line 3", "empty uniqueID"]),
    "row_count": (lambda t: t, {"n_concepts": 1854}, ["has 5 concepts, the study expects 1854"]),
    "no_unique_id": (_no_unique_id, {}, ["no 'uniqueID' column", "'Word'", "'ID'", "25 column"]),
    "comma": (
        lambda t: _table_text(IDS, sep=","),
        {},
        ["no 'uniqueID' column", "not tab-separated"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_read_concepts_rejects_bad_tables(tmp_path, case):
    edit, kwargs, fragments = BAD_TABLES[case]
    path = _write(tmp_path / "things_concepts.tsv", edit(_table_text(IDS)))
    with pytest.raises(ThingsDataError) as info:
        read_concepts(path, **kwargs)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


def test_read_concepts_missing_file(tmp_path):
    with pytest.raises(ThingsDataError, match="no such file") as info:
        read_concepts(tmp_path / "things_concepts.tsv")
    assert str(info.value).startswith(str(tmp_path / "things_concepts.tsv"))


# --------------------------------------------------------------------------------------------
# find_images, require_images, load_thumbnails
# --------------------------------------------------------------------------------------------


def _image(path: Path, size=(40, 30), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_find_images_things_layout_picks_the_b_image(tmp_path):
    d = tmp_path / "object_images"  # found without being named
    _image(d / "camera_lens" / "camera_lens_01n.jpg")
    _image(d / "camera_lens" / "camera_lens_03b.jpg")
    want_lens = _image(d / "camera_lens" / "camera_lens_02b.jpg")
    want_1 = _image(d / "camera1" / "camera1_01b.png")
    _image(d / "camera1" / "camera1_00.jpg")
    want_2 = _image(d / "camera2" / "camera2_05b.JPEG")
    paths, info = find_images(tmp_path, ["camera_lens", "camera1", "camera2", "zebra"])
    assert paths == [want_lens, want_1, want_2, None]
    assert info["layout"] == "things"
    assert info["dir"] == str(d)
    assert (info["n_found"], info["n_missing"], info["missing"]) == (3, 1, ["zebra"])


def test_find_images_flat_layout(tmp_path):
    d = tmp_path / "images"
    a = _image(d / "camera_lens.jpg")
    b = _image(d / "camera1" / "whatever.png")  # a folder holding exactly one image
    _image(d / "camera2" / "one.jpg")
    _image(d / "camera2" / "two.jpg")  # two images: ambiguous, counts as missing
    _image(d / "zebra.png")
    z = _image(d / "zebra.jpg")  # .jpg wins over .png
    ids = ["camera_lens", "camera1", "camera2", "zebra"]
    paths, info = find_images(tmp_path, ids)
    assert info["layout"] == "flat"
    assert paths == [a, b, None, z]
    assert info["missing"] == ["camera2"] and info["ambiguous"] == ["camera2"]
    forced, _ = find_images(tmp_path, ids, layout="things")
    assert forced == [None, None, None, None]


def test_find_images_auto_detection_and_explicit_folder(tmp_path):
    things = _image(tmp_path / "pics" / "zebra" / "zebra_01b.jpg")
    paths, info = find_images(tmp_path, ["zebra"], images="pics")
    assert (paths, info["layout"]) == ([things], "things")
    flat = _image(tmp_path / "flat" / "zebra.jpg")
    paths, info = find_images(tmp_path, ["zebra"], images="flat")
    assert (paths, info["layout"]) == ([flat], "flat")
    with pytest.raises(ThingsDataError, match="no such image folder"):
        find_images(tmp_path, ["zebra"], images="nowhere")
    with pytest.raises(ThingsDataError, match="no image folder") as err:
        find_images(tmp_path, ["zebra"])
    assert str(err.value).startswith(str(tmp_path))
    with pytest.raises(ValueError, match="layout"):
        find_images(tmp_path, ["zebra"], images="flat", layout="nested")


def test_require_images_names_the_missing_ids(tmp_path):
    ok = _image(tmp_path / "images" / "camera1.jpg")
    ids = ["camera1", "camera_lens"] + [f"c{i}" for i in range(12)]
    paths, info = find_images(tmp_path, ids)
    assert require_images(paths[:1], ids[:1], info["dir"]) == [ok]
    with pytest.raises(ThingsDataError) as err:
        require_images(paths, ids, info["dir"])
    message = str(err.value)
    assert message.startswith(info["dir"])
    assert "13 of 14 concepts" in message and "camera_lens" in message
    assert "(and 3 more)" in message and "camera1," not in message


def test_load_thumbnails_shape_dtype_and_centre_crop(tmp_path):
    wide = Image.new("RGB", (300, 100), (0, 255, 0))
    wide.paste((255, 0, 0), (100, 0, 200, 100))  # the centre square is red
    wide.save(tmp_path / "wide.jpg", quality=95)
    Image.new("L", (50, 90), 128).save(tmp_path / "grey.png")
    thumbs = load_thumbnails([tmp_path / "wide.jpg", tmp_path / "grey.png"], size=32)
    assert thumbs.shape == (2, 32, 32, 3) and thumbs.dtype == np.uint8
    red = thumbs[0].astype(int)
    assert red[..., 0].min() > 200 and red[..., 1].max() < 60  # no green border left
    assert np.all(thumbs[1] == 128)
    assert load_thumbnails([tmp_path / "wide.jpg"]).shape == (1, 64, 64, 3)


def test_load_thumbnails_unreadable_image_names_the_file(tmp_path):
    good = _image(tmp_path / "good.jpg")
    bad = tmp_path / "camera1" / "camera1_01b.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a JPEG" * 10)
    with pytest.raises(ThingsDataError) as err:
        load_thumbnails([good, bad])
    assert str(err.value).startswith(str(bad)) and "cannot read image" in str(err.value)


def test_pixel_reference_is_the_demo_formula():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    small = images.reshape(10, 8, 8, 8, 8, 3).mean((2, 4)).reshape(10, -1)
    small = (small - small.mean(0)) / (small.std(0) + 1e-9)
    t = np.array([[0, 1, 2], [3, 4, 5], [9, 8, 7]])
    np.testing.assert_allclose(pixel_reference(images)(t), triplet_logits(small, t))
    assert pixel_features(rng.integers(0, 256, (4, 37, 45, 3), dtype=np.uint8)).shape == (4, 192)


# --------------------------------------------------------------------------------------------
# validate_things
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, dict]:
    """The THINGS-shaped test folders (built once; tests that edit one copy it first)."""
    base = tmp_path_factory.mktemp("things")
    return {
        "default": make_things_folder(base / "default"),
        "odd": make_things_folder(base / "odd", convention="odd_pair_pair"),
        "shuffled": make_things_folder(base / "shuffled", shuffled=True),
        "flat_npy": make_things_folder(base / "flat_npy", layout="flat", file_format="npy"),
    }


@pytest.fixture
def copy(folders, tmp_path):
    """A fresh copy of the default folder (root, ids, images)."""
    root = tmp_path / "things"
    shutil.copytree(folders["default"]["root"], root)
    return root, folders["default"]


def test_validate_correct_folder(folders):
    f = folders["default"]
    report = validate_things(f["root"], n_concepts=36)
    assert report["problems"] == [] and report["usable"] is True
    assert report["convention"] == "pair_pair_odd" and report["reference"] == "pixels"
    assert report["n_concepts"] == 36
    assert report["images"]["layout"] == "things" and report["images"]["n_found"] == 36
    for name in ("testset1", "testset2", "testset3"):
        assert 1 / 3 < report["noise_ceiling"][name] < 1
    assert report["noise_ceiling"]["testset2"] == pytest.approx(
        noise_ceiling(f["rows"]["testset2"]).ceiling
    )
    files = report["files"]
    assert set(files) == {"trainset", "validationset", "testset1", "testset2", "testset3"}
    assert files["trainset"]["rows"] == 3000 and files["testset2"]["rows"] == 2400
    digest = hashlib.sha256(Path(files["trainset"]["path"]).read_bytes()).hexdigest()
    assert files["trainset"]["sha256"] == digest
    assert files["trainset"]["convention"] == "pair_pair_odd"
    assert files["trainset"]["detection"]["unambiguous"] is True
    json.dumps(report, allow_nan=False)  # JSON-serialisable


def test_validate_odd_first_folder_same_judgements(folders):
    report = validate_things(folders["odd"]["root"])
    assert report["usable"] is True, report["problems"]
    assert report["convention"] == "odd_pair_pair"
    assert {f["convention"] for f in report["files"].values()} == {"odd_pair_pair"}
    reference = validate_things(folders["default"]["root"])
    assert report["noise_ceiling"] == reference["noise_ceiling"]
    first = np.loadtxt(folders["odd"]["files"]["trainset"], dtype=int, max_rows=1)
    assert first[0] == folders["odd"]["rows"]["trainset"][0, 2]  # the odd one is written first


def test_validate_shuffled_concept_order(folders):
    report = validate_things(folders["shuffled"]["root"])
    assert report["usable"] is False and report["convention"] is None
    assert report["files"]["trainset"]["convention"] == "ambiguous"
    assert report["noise_ceiling"]["testset2"] is None
    (problem,) = report["problems"]
    assert problem.startswith(str(folders["shuffled"]["files"]["trainset"]))
    assert "concept order" in problem
    # the same judgements with the table in the order they refer to are fine
    order = folders["shuffled"]["order"]
    assert not np.array_equal(order, np.arange(order.size))
    restored = validate_things(
        folders["shuffled"]["root"], reference=pixel_features(folders["default"]["images"])
    )
    assert restored["convention"] == "pair_pair_odd"


def test_validate_npy_files_and_flat_layout(folders):
    report = validate_things(folders["flat_npy"]["root"])
    assert report["usable"] is True, report["problems"]
    assert report["images"]["layout"] == "flat"
    assert all(f["path"].endswith(".npy") for f in report["files"].values())
    assert report["convention"] == "pair_pair_odd"
    assert report["noise_ceiling"] == validate_things(folders["default"]["root"])["noise_ceiling"]


def test_validate_missing_image(copy):
    root, f = copy
    gone = f["ids"][7]
    shutil.rmtree(root / "images" / gone)
    report = validate_things(root)
    assert report["usable"] is False
    assert report["images"]["n_missing"] == 1 and report["images"]["missing"] == [gone]
    assert any(p.startswith(str(root / "images")) and gone in p for p in report["problems"])
    assert any(p.startswith("convention not checked") for p in report["problems"])
    assert report["convention"] is None and report["reference"] is None
    # model features still decide the convention; the missing image keeps it unusable
    with_features = validate_things(root, reference=pixel_features(f["images"]))
    assert with_features["convention"] == "pair_pair_odd"
    assert with_features["reference"] == "features"
    assert with_features["usable"] is False and len(with_features["problems"]) == 1


def test_validate_unreadable_image(copy):
    root, f = copy
    bad = root / "images" / f["ids"][3] / f"{f['ids'][3]}_01b.jpg"
    bad.write_bytes(b"garbage" * 20)
    report = validate_things(root)
    assert report["usable"] is False and report["convention"] is None
    assert any(p.startswith(str(bad)) for p in report["problems"])


BAD_ROWS = {
    "non_integer": ("3 x 5", "non-integer token 'x'"),
    "columns": ("3 4 5 6", "expected 3 integers per row, found 4"),
    "out_of_range": ("3 36 5", "concept index 36 out of range [0, 36)"),
    "repeated": ("3 4 3", "repeats a concept"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_validate_malformed_triplet_file(copy, case):
    root, _ = copy
    row, fragment = BAD_ROWS[case]
    path = root / "triplets" / "validationset.txt"
    path.write_text(_edit_lines(path.read_text(), 5, row))
    report = validate_things(root)
    assert report["usable"] is False
    (problem,) = report["problems"]
    assert problem.startswith(f"{path}, line 5") and fragment in problem
    assert report["files"]["validationset"]["rows"] is None
    assert report["convention"] == "pair_pair_odd"  # the other files are still checked


def test_validate_missing_testset2(copy):
    root, _ = copy
    (root / "triplets" / "testset2.txt").unlink()
    report = validate_things(root)
    assert report["usable"] is False
    (problem,) = report["problems"]
    assert "testset2" in problem and "required" in problem and problem.startswith(str(root))
    assert report["noise_ceiling"]["testset2"] is None
    assert report["noise_ceiling"]["testset1"] is not None
    assert "testset2" not in report["files"]


def test_validate_testset2_without_repeats(copy):
    root, _ = copy
    train = root / "triplets" / "trainset.txt"
    shutil.copy(train, root / "triplets" / "testset2.txt")
    report = validate_things(root)
    (problem,) = report["problems"]
    assert problem.startswith(str(root / "triplets" / "testset2.txt")) and "repeated" in problem


def test_validate_mixed_conventions(copy, folders):
    root, _ = copy
    shutil.copy(folders["odd"]["files"]["testset1"], root / "triplets" / "testset1.txt")
    report = validate_things(root)
    assert report["convention"] == "pair_pair_odd" and report["usable"] is False
    (problem,) = report["problems"]
    assert problem.startswith(str(root / "triplets" / "testset1.txt"))
    assert "mix conventions" in problem


def test_validate_features_reference(folders):
    f = folders["default"]
    features = pixel_features(f["images"])
    report = validate_things(f["root"], reference=features)
    assert report["usable"] is True and report["reference"] == "features"
    assert report["convention"] == "pair_pair_odd"
    wrong = validate_things(f["root"], reference=features[:10])
    assert wrong["usable"] is False and wrong["convention"] is None
    assert any(p.startswith("reference:") and "10 rows" in p for p in wrong["problems"])


def test_validate_concept_table_problems(copy):
    root, f = copy
    expected = validate_things(root, n_concepts=1854)
    assert expected["usable"] is False
    (problem,) = expected["problems"]
    assert problem == f"{root / 'things_concepts.tsv'}: has 36 concepts, the study expects 1854"
    assert expected["convention"] == "pair_pair_odd"  # the rest is still checked
    table = pd.read_csv(root / "things_concepts.tsv", sep="\t", dtype=str, keep_default_na=False)
    table.loc[5, "uniqueID"] = table.loc[4, "uniqueID"]
    table.to_csv(root / "things_concepts.tsv", sep="\t", index=False)
    broken = validate_things(root, n_concepts=36)
    assert broken["usable"] is False and broken["n_concepts"] is None
    assert any("duplicate uniqueID" in p and "lines 6, 7" in p for p in broken["problems"])
    assert any(p.startswith("convention not checked") for p in broken["problems"])
    assert broken["files"]["trainset"]["rows"] == 3000  # checked against n_concepts
    assert validate_things(root / "nowhere")["problems"] == [f"{root / 'nowhere'}: no such folder"]
