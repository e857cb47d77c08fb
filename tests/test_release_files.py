"""Reading the THINGS-data release as published: ``triplet_dataset/`` and the raw release table.

The release keeps its five text files in ``triplet_dataset/`` and publishes the raw table
``triplets_large_final_correctednc_correctedorder.csv`` (tab-separated, 1-based indices,
``choice`` either a position or a concept index, ``noise_ceiling`` 0 training / 1-3 test sets).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from things_folders import make_things_folder

from recovery_assets.core.pixels import pixel_reference
from recovery_assets.core.triplets import noise_ceiling
from recovery_assets.sources.human import (
    RELEASE_TABLE,
    HumanDataError,
    detect_choice_encoding,
    find_judgement_file,
    find_release_table,
    load_human_judgements,
    read_release_table,
)
from recovery_assets.sources.validate_things import validate_things

N = 36  # concepts of the default test folder
TESTSETS = ("testset1", "testset2", "testset3")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, dict]:
    """The folders (built once; tests that edit one copy it first)."""
    base = tmp_path_factory.mktemp("release")
    return {
        "dataset": make_things_folder(base / "dataset", triplet_form="triplet_dataset"),
        "position": make_things_folder(base / "position", triplet_form="release_table"),
        "concept": make_things_folder(
            base / "concept",
            triplet_form="release_table",
            choice_encoding="concept",
            subject_format="str",
        ),
        "shuffled": make_things_folder(
            base / "shuffled", triplet_form="release_table", shuffled=True
        ),
    }


@pytest.fixture(scope="module")
def similarity(folders):
    return pixel_reference(folders["dataset"]["images"])


@pytest.fixture(scope="module")
def loaded(folders, similarity) -> dict[str, object]:
    return {
        key: load_human_judgements(folders[key]["root"], N, similarity)
        for key in ("dataset", "position", "concept")
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Both forms, both encodings
# --------------------------------------------------------------------------------------------


def test_the_folders_are_shaped_like_the_release(folders):
    dataset = folders["dataset"]["root"]
    assert sorted(p.name for p in (dataset / "triplet_dataset").iterdir()) == [
        "testset1.txt",
        "testset2.txt",
        "testset3.txt",
        "trainset.txt",
        "validationset.txt",
    ]
    assert not (dataset / "triplets").exists()
    table = folders["position"]["root"]
    assert not (table / "triplets").exists() and not (table / "triplet_dataset").exists()
    frame = folders["position"]["release_frame"]
    # groups interleaved, every position used, training and validation rows both group 0
    assert not frame["noise_ceiling"].is_monotonic_increasing
    assert set(frame["choice"]) == {1, 2, 3}
    assert (frame["noise_ceiling"] == 0).sum() == 3000 + 300
    assert frame[["image1", "image2", "image3"]].to_numpy().min() == 1


def test_both_forms_give_the_same_canonical_rows(folders, loaded):
    files, table = loaded["dataset"], loaded["position"]
    assert files.source == "files" and files.choice_encoding is None and files.subjects == {}
    assert table.source == "release_table" and table.convention == "pair_pair_odd"
    assert files.paths["trainset"] == folders["dataset"]["root"] / "triplet_dataset" / (
        "trainset.txt"
    )
    assert set(table.rows) == {"trainset", *TESTSETS}
    train = np.concatenate([files.rows["trainset"], files.rows["validationset"]])
    np.testing.assert_array_equal(table.rows["trainset"], train)  # file order kept
    for name in TESTSETS:
        np.testing.assert_array_equal(table.rows[name], files.rows[name])
        assert table.rows[name].dtype == np.int64
    assert table.noise_ceiling == files.noise_ceiling


def test_both_choice_encodings_are_detected_and_agree(folders, loaded):
    position, concept = loaded["position"], loaded["concept"]
    assert position.choice_encoding == "position" and concept.choice_encoding == "concept"
    assert position.choice.fits == ("position",) and concept.choice.fits == ("concept",)
    for data, enc in ((position, "position"), (concept, "concept")):
        assert data.choice.detection[enc].decision == "pair_pair_odd"
        assert data.detection["trainset"] == data.choice.detection[enc]
        assert enc in data.choice.diagnosis
    for name in position.rows:
        np.testing.assert_array_equal(position.rows[name], concept.rows[name])
        np.testing.assert_array_equal(
            position.rows[name], folders["position"]["release_rows"][name]
        )
    # the two tables differ only in the choice column
    a, b = folders["position"]["release_frame"], folders["concept"]["release_frame"]
    assert not a["choice"].equals(b["choice"])
    assert a.drop(columns=["choice", "subject_id"]).equals(b.drop(columns=["choice", "subject_id"]))


def test_row_counts_and_noise_ceilings_per_group(folders, loaded):
    f, data = folders["position"], loaded["position"]
    assert f["group_rows"] == {
        "trainset": 3300,
        "testset1": 2400,
        "testset2": 2400,
        "testset3": 2400,
    }
    assert data.n_rows == f["group_rows"] == data.group_rows
    for name in TESTSETS:
        expected = noise_ceiling(f["release_rows"][name])
        assert data.noise_ceiling[name] == expected
        assert expected.n_triplets == 300 and 1 / 3 < expected.ceiling < 1
    meta = json.loads(json.dumps(data.metadata(), allow_nan=False))
    digest = _sha(f["release_table"])
    assert meta["source"] == "release_table" and meta["choice_encoding"] == "position"
    assert meta["convention"] == "pair_pair_odd"
    assert meta["release_table"]["read"] is True
    assert meta["release_table"]["sha256"] == digest
    assert meta["release_table"]["n_rows"] == 3300 + 3 * 2400
    assert meta["release_table"]["group_rows"] == f["group_rows"]
    assert meta["release_table"]["choice"]["encoding"] == "position"
    assert meta["release_table"]["choice"]["fits"] == ["position"]
    for name, entry in meta["files"].items():
        assert entry["sha256"] == digest and entry["path"] == str(f["release_table"])
        assert entry["n_rows"] == f["group_rows"][name]
    ceiling = data.noise_ceiling["testset2"]
    assert meta["noise_ceiling"]["testset2"] == {"ceiling": ceiling.ceiling, "n_triplets": 300}
    assert meta["unread"] == []


def test_subject_ids_are_kept(folders, loaded):
    for key, dtype in (("position", np.int64), ("concept", object)):
        data, f = loaded[key], folders[key]
        assert set(data.subjects) == set(data.rows)
        for name, ids in f["subjects"].items():
            assert data.subjects[name].dtype == dtype
            np.testing.assert_array_equal(data.subjects[name], ids)
            assert data.subjects[name].shape == (data.n_rows[name],)
    assert loaded["concept"].subjects["trainset"][0].startswith("S")
    meta = loaded["position"].metadata()
    assert (
        meta["files"]["trainset"]["n_subjects"]
        == np.unique(folders["position"]["subjects"]["trainset"]).size
    )


def test_any_column_order_extra_columns_and_padded_names(folders, similarity, tmp_path):
    frame = folders["position"]["release_frame"]
    reordered = frame[["noise_ceiling", "RT", "choice", "image3", "subject_id", "image1", "image2"]]
    reordered = reordered.assign(extra="x")
    reordered.columns = [f" {c} " if c == "image3" else c for c in reordered.columns]
    root = tmp_path / "things"
    root.mkdir()
    reordered.to_csv(root / RELEASE_TABLE, sep="\t", index=False)
    data = load_human_judgements(root, N, similarity)
    for name, rows in folders["position"]["release_rows"].items():
        np.testing.assert_array_equal(data.rows[name], rows)


def test_files_option_limits_the_sets(folders, similarity):
    data = load_human_judgements(
        folders["concept"]["root"], N, similarity, files=("trainset", "testset2")
    )
    assert set(data.rows) == set(data.subjects) == {"trainset", "testset2"}
    assert data.group_rows["testset1"] == 2400  # counted, not loaded


# --------------------------------------------------------------------------------------------
# Where the judgements are looked for
# --------------------------------------------------------------------------------------------


def test_lookup_order(tmp_path):
    rows = np.array([[0, 1, 2]])
    for sub in ("triplet_dataset", "triplets", ""):
        folder = tmp_path / sub if sub else tmp_path
        folder.mkdir(exist_ok=True)
        np.savetxt(folder / "testset1.txt", rows, fmt="%d")
        assert find_judgement_file(tmp_path, "testset1") == folder / "testset1.txt"
    for sub in ("triplets", "triplet_dataset", ""):
        folder = tmp_path / sub if sub else tmp_path
        (folder / RELEASE_TABLE).write_text("image1\n")
        assert find_release_table(tmp_path) == folder / RELEASE_TABLE
    assert find_release_table(tmp_path / "triplets") == tmp_path / "triplets" / RELEASE_TABLE
    assert find_release_table(tmp_path / "nowhere") is None


def test_table_in_triplet_dataset_is_read(folders, similarity, tmp_path):
    root = tmp_path / "things"
    (root / "triplet_dataset").mkdir(parents=True)
    shutil.copy(folders["position"]["release_table"], root / "triplet_dataset")
    data = load_human_judgements(root, N, similarity)
    assert data.paths["testset2"] == root / "triplet_dataset" / RELEASE_TABLE
    assert data.n_rows["trainset"] == 3300


def _places_named(message: str, root: Path) -> None:
    for place in (f"{root}, ", str(root / "triplets"), str(root / "triplet_dataset")):
        assert place in message
    assert RELEASE_TABLE in message


def test_not_found_names_every_place(folders, similarity, tmp_path):
    root = tmp_path / "things"
    shutil.copytree(folders["dataset"]["root"], root)
    (root / "triplet_dataset" / "testset2.txt").unlink()
    with pytest.raises(HumanDataError) as info:
        load_human_judgements(root, N, similarity)
    message = str(info.value)
    assert message.startswith(str(root)) and "testset2.txt or testset2.npy" in message
    assert "trainset" not in message
    _places_named(message, root)

    shutil.rmtree(root / "triplet_dataset")
    with pytest.raises(HumanDataError) as info:
        load_human_judgements(root, N, similarity)
    assert "trainset.txt" in str(info.value) and "testset2.txt" in str(info.value)
    _places_named(str(info.value), root)

    report = validate_things(root, n_concepts=N)
    assert report["usable"] is False and report["files"] == {}
    assert len(report["problems"]) == 2
    for problem, name in zip(report["problems"], ("trainset", "testset2"), strict=True):
        assert problem.startswith(str(root)) and f"required file {name}.txt" in problem
        _places_named(problem, root)


def test_both_forms_present_reads_the_files(folders, similarity, tmp_path):
    root = tmp_path / "things"
    shutil.copytree(folders["dataset"]["root"], root)
    table = shutil.copy(folders["position"]["release_table"], root / RELEASE_TABLE)
    data = load_human_judgements(root, N, similarity)
    assert data.source == "files" and data.unread == [Path(table)]
    assert data.release_table == Path(table)
    assert data.paths["trainset"].parent.name == "triplet_dataset"
    meta = data.metadata()
    assert meta["release_table"] == {
        "path": str(table),
        "read": False,
        "reason": "the text / .npy judgement files were read instead",
    }
    assert meta["unread"] == [str(table)] and meta["source"] == "files"
    report = validate_things(root, n_concepts=N)
    assert report["usable"] is True and report["source"] == "files"
    assert report["release_table"]["read"] is False and report["unread"] == [str(table)]

    # without the required text files, the table is read and the partial files are recorded
    (root / "triplet_dataset" / "testset2.txt").unlink()
    data = load_human_judgements(root, N, similarity)
    assert data.source == "release_table" and data.n_rows["trainset"] == 3300
    assert root / "triplet_dataset" / "trainset.txt" in data.unread
    assert len(data.unread) == 4


# --------------------------------------------------------------------------------------------
# validate_things
# --------------------------------------------------------------------------------------------


def test_validate_triplet_dataset_folder(folders):
    f = folders["dataset"]
    report = validate_things(f["root"], n_concepts=N)
    assert report["problems"] == [] and report["usable"] is True
    assert report["source"] == "files" and report["release_table"] is None
    assert report["convention"] == "pair_pair_odd"
    files = report["files"]
    assert {name: e["rows"] for name, e in files.items()} == f["set_rows"]
    assert files["trainset"]["rows"] == 3000 and files["validationset"]["rows"] == 300
    assert all(Path(e["path"]).parent == f["root"] / "triplet_dataset" for e in files.values())
    for name in TESTSETS:
        assert report["noise_ceiling"][name] == pytest.approx(
            noise_ceiling(f["rows"][name]).ceiling
        )


@pytest.mark.parametrize("key", ["position", "concept"])
def test_validate_release_table_folder(folders, key):
    f = folders[key]
    report = validate_things(f["root"], n_concepts=N)
    assert report["problems"] == [] and report["usable"] is True
    assert report["source"] == "release_table"
    assert report["choice_encoding"] == f["choice_encoding"] == key
    assert list(report["choice_detection"]) == [key]
    assert report["choice_detection"][key]["decision"] == "pair_pair_odd"
    assert report["convention"] == "pair_pair_odd"
    digest = _sha(f["release_table"])
    assert set(report["files"]) == set(f["group_rows"])
    for name, entry in report["files"].items():
        assert entry["rows"] == f["group_rows"][name]
        assert entry["sha256"] == digest and entry["path"] == str(f["release_table"])
        assert entry["choice_encoding"] == key and entry["convention"] == "pair_pair_odd"
        assert entry["detection"]["n_rows"] == f["group_rows"][name]
    table = report["release_table"]
    assert table["read"] is True and table["sha256"] == digest
    assert table["rows"] == 3300 + 3 * 2400 and table["group_rows"] == f["group_rows"]
    assert table["choice_fits"] == [key] and table["choice"]["encoding"] == key
    for name in TESTSETS:
        assert report["noise_ceiling"][name] == pytest.approx(
            noise_ceiling(f["release_rows"][name]).ceiling
        )
    json.dumps(report, allow_nan=False)


def test_validate_release_table_with_wrong_concept_order(folders):
    f = folders["shuffled"]
    report = validate_things(f["root"], n_concepts=N)
    assert report["usable"] is False and report["convention"] is None
    assert report["choice_encoding"] is None
    assert report["choice_detection"]["position"]["decision"] == "ambiguous"
    assert report["noise_ceiling"] == {name: None for name in TESTSETS}
    (problem,) = report["problems"]
    assert problem.startswith(str(f["release_table"])) and "concept order may be wrong" in problem
    assert report["files"]["trainset"]["rows"] == 3300  # counts are still reported


def test_validate_bad_release_table(folders, tmp_path):
    root = tmp_path / "things"
    shutil.copytree(folders["position"]["root"], root)
    path = root / RELEASE_TABLE
    lines = path.read_text().splitlines()
    lines[4] = _edit(lines, 5, "noise_ceiling", "4")[4]
    path.write_text("\n".join(lines) + "\n")
    report = validate_things(root, n_concepts=N)
    (problem,) = report["problems"]
    assert problem.startswith(f"{path}, line 5, column 'noise_ceiling'")
    assert report["source"] == "release_table" and report["files"] == {}
    assert report["release_table"]["sha256"] == _sha(path)


# --------------------------------------------------------------------------------------------
# Bad tables: one HumanDataError naming the file and the line (and column)
# --------------------------------------------------------------------------------------------


def _edit(lines: list[str], line: int, column: str, value: str) -> list[str]:
    """``lines`` with the cell (1-based ``line``, ``column``) set to ``value``."""
    header = lines[0].split("\t")
    out = list(lines)
    fields = out[line - 1].split("\t")
    fields[header.index(column)] = value
    out[line - 1] = "\t".join(fields)
    return out


def _cell(lines: list[str], line: int, column: str) -> str:
    return lines[line - 1].split("\t")[lines[0].split("\t").index(column)]


def _outsider(lines: list[str], line: int) -> str:
    """A value in [4, N] that is none of the row's concepts."""
    row = {int(_cell(lines, line, c)) for c in ("image1", "image2", "image3")}
    return str(next(v for v in range(4, N + 1) if v not in row))


def _repeat(lines: list[str]) -> list[str]:
    return _edit(lines, 6, "image2", _cell(lines, 6, "image1"))


def _drop_choice(lines: list[str]) -> list[str]:
    col = lines[0].split("\t").index("choice")
    return ["\t".join(f for i, f in enumerate(line.split("\t")) if i != col) for line in lines]


def _split_misfit(lines: list[str]) -> list[str]:
    """Line 9's choice becomes one of its concepts (> 3): position fails there, concept on
    every other row."""
    value = max(int(_cell(lines, 9, c)) for c in ("image1", "image2", "image3"))
    assert value > 3
    return _edit(lines, 9, "choice", str(value))


def _blank_lines(lines: list[str]) -> list[str]:
    """Two blank lines (one of spaces) before line 4, then a bad value on old line 10."""
    bad = _edit(lines, 10, "image1", "x")
    return bad[:3] + ["", "   "] + bad[3:]


BAD = {
    "missing_column": (_drop_choice, 1, None, ["missing required column(s) 'choice'"]),
    "non_integer": (lambda x: _edit(x, 7, "image2", "2.5"), 7, "image2", ["non-integer value"]),
    "text_cell": (lambda x: _edit(x, 8, "choice", "two"), 8, "choice", ["non-integer value 'two'"]),
    "empty_cell": (
        lambda x: _edit(x, 9, "noise_ceiling", ""),
        9,
        "noise_ceiling",
        ["missing value (empty cell)"],
    ),
    "nan_cell": (lambda x: _edit(x, 3, "image3", "NaN"), 3, "image3", ["missing value 'NaN'"]),
    "short_row": (lambda x: x[:5] + ["1\t2"] + x[5:], 6, "image3", ["missing value"]),
    "index_0": (
        lambda x: _edit(x, 4, "image1", "0"),
        4,
        "image1",
        ["concept index 0 out of range [1, 36]"],
    ),
    "index_n_plus_1": (
        lambda x: _edit(x, 11, "image3", str(N + 1)),
        11,
        "image3",
        [f"concept index {N + 1} out of range [1, 36]"],
    ),
    "huge_index": (
        lambda x: _edit(x, 5, "image2", "9" * 25),
        5,
        "image2",
        ["out of range"],
    ),
    "repeated_concept": (_repeat, 6, None, ["row repeats a concept"]),
    "noise_ceiling_4": (
        lambda x: _edit(x, 10, "noise_ceiling", "4"),
        10,
        "noise_ceiling",
        ["value 4 is not 0 (training) or 1, 2, 3"],
    ),
    "choice_fits_neither": (
        lambda x: _edit(x, 12, "choice", _outsider(x, 12)),
        12,
        "choice",
        ["neither a position in the row (1, 2, 3) nor one of the row's concepts"],
    ),
    "choice_fits_no_encoding_everywhere": (
        _split_misfit,
        None,
        "choice",
        ["no encoding of choice fits every row", "fails on line 9"],
    ),
    "missing_subject": (lambda x: _edit(x, 13, "subject_id", ""), 13, "subject_id", ["missing"]),
    "blank_lines_counted": (_blank_lines, 12, "image1", ["non-integer value 'x'"]),
    "header_only": (lambda x: x[:1], 1, None, ["no judgement rows below the header"]),
    "comma_separated": (
        lambda x: [line.replace("\t", ",") for line in x],
        1,
        None,
        ["not tab-separated", "missing required column(s) 'image1'"],
    ),
    "no_testset2": (
        lambda x: [x[0]] + [line for line in x[1:] if not line.endswith("\t2")],
        None,
        None,
        ["no rows with noise_ceiling 2 (testset2)"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_table_is_refused_with_file_line_and_column(folders, similarity, tmp_path, case):
    edit, line, column, fragments = BAD[case]
    lines = folders["position"]["release_table"].read_text().splitlines()
    root = tmp_path / "things"
    root.mkdir()
    path = root / RELEASE_TABLE
    path.write_text("\n".join(edit(lines)) + "\n")
    with pytest.raises(HumanDataError) as info:
        load_human_judgements(root, N, similarity)
    message = str(info.value)
    assert message.startswith(str(path))
    if line is not None:
        assert message.startswith(f"{path}, line {line}")
    if column is not None:
        assert f"column {column!r}" in message
    for fragment in fragments:
        assert fragment in message
    if case != "no_testset2":  # a structural problem: the reader alone refuses the same way
        with pytest.raises(HumanDataError) as again:
            read_release_table(path, N)
        assert str(again.value) == message


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / RELEASE_TABLE
    path.write_text("")
    with pytest.raises(HumanDataError, match="empty file") as info:
        read_release_table(path, N)
    assert str(info.value).startswith(str(path))
    with pytest.raises(HumanDataError, match="no such file"):
        read_release_table(tmp_path / "absent.csv", N)


def test_wrong_concept_order_is_refused(folders):
    f = folders["shuffled"]
    with pytest.raises(HumanDataError) as info:
        load_human_judgements(f["root"], N, pixel_reference(f["images"]))
    message = str(info.value)
    assert message.startswith(f"{f['release_table']}: cannot tell how 'choice'")
    assert "concept order may be wrong" in message
    # the same judgements with the reference in the order they refer to load fine
    order = np.argsort(f["order"])
    data = load_human_judgements(f["root"], N, pixel_reference(f["images"][order]))
    assert data.choice_encoding == "position"


# --------------------------------------------------------------------------------------------
# When both encodings fit structurally, the reference decides
# --------------------------------------------------------------------------------------------


def _tiny_table(path: Path, images: np.ndarray, choice: np.ndarray) -> Path:
    m = images.shape[0]
    train = pd.DataFrame(
        {
            "image1": images[:, 0],
            "image2": images[:, 1],
            "image3": images[:, 2],
            "choice": choice,
            "subject_id": np.arange(m),
            "noise_ceiling": np.where(np.arange(m) % 4 == 0, 2, 0),
        }
    )
    train.to_csv(path, sep="\t", index=False)
    return path


def _concept_3_is_odd(t: np.ndarray) -> np.ndarray:
    """Concepts 0 and 1 (1-based 1, 2) are alike, so 0-based concept 2 is always the odd one."""
    sim = np.zeros((3, 3))
    sim[0, 1] = sim[1, 0] = 1.0
    i, j, k = t[:, 0], t[:, 1], t[:, 2]
    return np.stack([sim[j, k], sim[i, k], sim[i, j]], axis=1)


def test_both_encodings_fit_and_the_reference_picks_one(tmp_path):
    # every row holds concepts 1, 2, 3 in some order and choice 3: both encodings fit, but only
    # "concept" makes 3 the odd one out on every row
    perms = np.array([[1, 2, 3], [1, 3, 2], [2, 1, 3], [2, 3, 1], [3, 1, 2], [3, 2, 1]])
    images = np.tile(perms, (100, 1))
    path = _tiny_table(tmp_path / RELEASE_TABLE, images, np.full(600, 3))
    table = read_release_table(path, 3)
    assert table.fits == ("position", "concept")
    result = detect_choice_encoding(table, _concept_3_is_odd)
    assert result.encoding == "concept"
    assert result.detection["concept"].decision == "pair_pair_odd"
    assert result.detection["position"].decision != "pair_pair_odd"
    data = load_human_judgements(tmp_path, 3, _concept_3_is_odd)
    assert data.choice_encoding == "concept"
    assert np.all(data.rows["trainset"][:, 2] == 2)


def test_both_encodings_fit_and_agree_is_refused(tmp_path):
    # 3 always last and choice 3: position 3 and concept 3 name the same odd one -> cannot tell
    images = np.tile(np.array([[1, 2, 3], [2, 1, 3]]), (300, 1))
    path = _tiny_table(tmp_path / RELEASE_TABLE, images, np.full(600, 3))
    result = detect_choice_encoding(read_release_table(path, 3), _concept_3_is_odd)
    assert result.encoding is None and set(result.detection) == {"position", "concept"}
    with pytest.raises(HumanDataError, match="cannot tell which is meant") as info:
        load_human_judgements(tmp_path, 3, _concept_3_is_odd)
    assert str(info.value).startswith(str(path))


# --------------------------------------------------------------------------------------------
# A large table is read with vectorised checks
# --------------------------------------------------------------------------------------------


def test_a_200k_row_table_is_read(tmp_path):
    rng = np.random.default_rng(5)
    n, m = 1854, 200_000
    first = rng.integers(0, n, m)
    second = (first + rng.integers(1, n // 2, m)) % n
    third = (first + rng.integers(n // 2, n, m)) % n  # distinct from first and second
    canonical = np.stack([first, second, third], axis=1)
    odd = rng.integers(0, 3, m)
    others = np.array([[1, 2], [0, 2], [0, 1]])[odd]
    images = np.empty_like(canonical)
    images[np.arange(m), odd] = canonical[:, 2]
    images[np.arange(m), others[:, 0]] = canonical[:, 0]
    images[np.arange(m), others[:, 1]] = canonical[:, 1]
    group = rng.choice(4, m, p=[0.9, 0.03, 0.04, 0.03])
    frame = pd.DataFrame(
        {
            "subject_id": rng.integers(0, 5000, m),
            "image1": images[:, 0] + 1,
            "image2": images[:, 1] + 1,
            "image3": images[:, 2] + 1,
            "choice": odd + 1,
            "noise_ceiling": group,
        }
    )
    path = tmp_path / RELEASE_TABLE
    frame.to_csv(path, sep="\t", index=False)
    table = read_release_table(path, n)
    assert table.fits == ("position",) and table.n_rows == m
    np.testing.assert_array_equal(table.canonical("position"), canonical)
    np.testing.assert_array_equal(table.subjects, frame["subject_id"].to_numpy())
    counts = np.bincount(group, minlength=4)
    assert table.group_rows() == dict(zip(("trainset", *TESTSETS), counts.tolist(), strict=True))
    rows = table.set_rows()
    np.testing.assert_array_equal(rows["testset2"], np.flatnonzero(group == 2))
    # a problem in the last row is found, and its line named (header = line 1)
    with open(path, "a") as handle:
        handle.write("5\t1\t2\tx\t1\t0\n")
    with pytest.raises(HumanDataError) as info:
        read_release_table(path, n)
    assert str(info.value).startswith(f"{path}, line {m + 2}, column 'image3'")
