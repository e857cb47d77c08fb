"""Tests of recovery_assets.sources.human: reading, validation, convention detection, loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recovery_assets.core.convention import detect_convention
from recovery_assets.core.triplets import (
    noise_ceiling,
    positions_to_human_rows,
    sample_unique_triplets,
)
from recovery_assets.sources import human
from recovery_assets.sources.human import (
    HumanDataError,
    find_judgement_file,
    load_human_judgements,
    read_triplet_file,
)

N_CONCEPTS = 60  # with ~40 a wrong concept order can stay weakly informative by chance
N_TRAIN = 3000
N_VAL = 400
N_TEST = 40
REPEATS = 8
SETS = ("trainset", "validationset", "testset1", "testset2", "testset3")


# --------------------------------------------------------------------------------------------
# A synthetic observer: hidden similarity from random latent features
# --------------------------------------------------------------------------------------------


def _logits(sim: np.ndarray, t: np.ndarray) -> np.ndarray:
    i, j, k = t[:, 0], t[:, 1], t[:, 2]
    return np.stack([sim[j, k], sim[i, k], sim[i, j]], axis=1)


class World:
    """Latent features, their dot-product similarity, and answered triplets per set."""

    def __init__(self, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.features = rng.standard_normal((N_CONCEPTS, 6))
        self.sim = self.features @ self.features.T
        total = N_TRAIN + N_VAL + 3 * N_TEST
        triplets = sample_unique_triplets(np.arange(N_CONCEPTS), total, rng)
        bounds = np.cumsum([0, N_TRAIN, N_VAL, N_TEST, N_TEST, N_TEST])
        self.triplets: dict[str, np.ndarray] = {}
        self.answers: dict[str, np.ndarray] = {}
        for s, name in enumerate(SETS):
            t = triplets[bounds[s] : bounds[s + 1]]
            if name.startswith("testset"):
                t = np.repeat(t, REPEATS, axis=0)
                t = t[rng.permutation(t.shape[0])]
            logits = _logits(self.sim, t)
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            u = rng.random(t.shape[0])
            self.answers[name] = np.minimum((u[:, None] >= np.cumsum(p, axis=1)[:, :2]).sum(1), 2)
            self.triplets[name] = t
        self.permutation = rng.permutation(N_CONCEPTS)

    def similarity_fn(self, t: np.ndarray) -> np.ndarray:
        return _logits(self.sim, np.asarray(t))

    def rows(self, name: str, convention: str = "pair_pair_odd") -> np.ndarray:
        return positions_to_human_rows(self.triplets[name], self.answers[name], convention)

    def shuffled_rows(self, name: str) -> np.ndarray:
        """THINGS-convention rows written in a wrong concept order."""
        return self.permutation[self.rows(name)]


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def _write_txt(path: Path, rows: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, rows, fmt="%d", delimiter=" ")
    return path


def _folder(root: Path, sets: dict[str, np.ndarray], *, fmt: str = "txt", sub: bool = True) -> Path:
    where = root / "triplets" if sub else root
    where.mkdir(parents=True, exist_ok=True)
    for name, rows in sets.items():
        if fmt == "npy":
            np.save(where / f"{name}.npy", rows)
        else:
            _write_txt(where / f"{name}.txt", rows)
    return root


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# detect_convention
# --------------------------------------------------------------------------------------------


def test_detects_pair_pair_odd(world):
    result = detect_convention(world.rows("trainset"), world.similarity_fn)
    assert result.decision == "pair_pair_odd" == result.convention
    assert result.unambiguous
    assert result.best == 2
    assert result.fractions[2] > 0.5 > result.fractions[0]
    assert result.z[2] > 5 and result.z_margin > 5
    assert result.p_values[2] < 1e-6
    assert result.n + result.n_ties == N_TRAIN
    assert sum(result.fractions) == pytest.approx(1.0)


def test_detects_odd_pair_pair(world):
    result = detect_convention(world.rows("trainset", "odd_pair_pair"), world.similarity_fn)
    assert result.decision == "odd_pair_pair"
    assert result.unambiguous and result.best == 0
    assert result.fractions[0] > 0.5 > result.fractions[2]


def test_shuffled_concept_order_is_ambiguous(world):
    result = detect_convention(world.shuffled_rows("trainset"), world.similarity_fn)
    assert result.decision == "ambiguous"
    assert not result.unambiguous and result.convention is None
    assert "concept order wrong or reference uninformative" in result.diagnosis
    assert max(abs(f - 1 / 3) for f in result.fractions) < 0.05
    assert max(result.z) <= 5


def test_uninformative_reference_is_ambiguous(world):
    rows = world.rows("trainset")
    result = detect_convention(rows, lambda t: np.zeros((len(t), 3)))
    assert result.decision == "ambiguous"
    assert result.n == 0 and result.n_ties == rows.shape[0]
    assert "uninformative" in result.diagnosis
    json.dumps(result.to_dict(), allow_nan=False)  # NaN statistics become None


def test_odd_one_in_middle_column_is_not_a_convention(world):
    rows = world.rows("trainset")[:, [0, 2, 1]]  # odd one out now in column 1
    result = detect_convention(rows, world.similarity_fn)
    assert result.best == 1 and result.z[1] > 5
    assert result.decision == "ambiguous"
    assert "not a known convention" in result.diagnosis


def test_best_column_must_beat_the_second(world):
    rows = world.rows("trainset")

    def split(t: np.ndarray) -> np.ndarray:  # predicts column 0 for half the rows, 2 otherwise
        out = np.zeros((len(t), 3))
        out[np.arange(len(t)), np.where(np.arange(len(t)) % 2 == 0, 0, 2)] = 1.0
        return out

    result = detect_convention(rows, split)
    assert result.z[0] > 5 and result.z[2] > 5
    assert result.margin == pytest.approx(0.0, abs=1e-3)
    assert result.decision == "ambiguous"
    assert "not separated" in result.diagnosis


def test_detection_subsample_is_seeded(world):
    rows = world.rows("trainset")
    seen: list[int] = []

    def counting(t: np.ndarray) -> np.ndarray:
        seen.append(len(t))
        return world.similarity_fn(t)

    a = detect_convention(rows, counting, max_rows=1000, seed=3)
    b = detect_convention(rows, counting, max_rows=1000, seed=3)
    c = detect_convention(rows, counting, max_rows=1000, seed=4)
    assert seen == [1000, 1000, 1000]
    assert a.subsampled and a.n_rows == N_TRAIN and a.n + a.n_ties == 1000
    assert a == b
    assert a.fractions != c.fractions
    assert a.decision == "pair_pair_odd"


def test_detection_rejects_bad_logits(world):
    rows = world.rows("trainset")
    with pytest.raises(ValueError, match="shape"):
        detect_convention(rows, lambda t: np.zeros((len(t), 2)))
    with pytest.raises(ValueError, match="non-finite"):
        detect_convention(rows, lambda t: np.full((len(t), 3), np.nan))


# --------------------------------------------------------------------------------------------
# read_triplet_file: good input
# --------------------------------------------------------------------------------------------


def test_txt_and_npy_read_identically(world, tmp_path):
    rows = world.rows("trainset")
    txt = _write_txt(tmp_path / "trainset.txt", rows)
    npy = tmp_path / "trainset.npy"
    np.save(npy, rows.astype(np.int32))
    a = read_triplet_file(txt, N_CONCEPTS)
    b = read_triplet_file(npy, N_CONCEPTS)
    assert a.dtype == b.dtype == np.int64
    assert a.shape == (N_TRAIN, 3)
    np.testing.assert_array_equal(a, rows)
    np.testing.assert_array_equal(a, b)


def test_text_tolerates_tabs_blank_lines_and_no_final_newline(tmp_path):
    path = _write_text(tmp_path / "t.txt", "  0 1 2  \r\n\n3\t4 5\n   \n6 7 8")
    np.testing.assert_array_equal(
        read_triplet_file(path, 9), np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    )


def test_integral_float_npy_is_accepted(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]))
    out = read_triplet_file(path, 6)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [[0, 1, 2], [3, 4, 5]])


def test_one_million_row_text_file_loads(tmp_path):
    rng = np.random.default_rng(1)
    n, m = 1854, 1_000_000
    first = rng.integers(0, n, m)
    second = (first + rng.integers(1, n // 2, m)) % n
    third = (first + rng.integers(n // 2, n, m)) % n  # distinct from first and second
    rows = np.stack([first, second, third], axis=1)
    path = tmp_path / "trainset.txt"
    pd.DataFrame(rows).to_csv(path, sep=" ", header=False, index=False)
    out = read_triplet_file(path, n)
    assert out.shape == (m, 3) and out.dtype == np.int64
    np.testing.assert_array_equal(out, rows)


# --------------------------------------------------------------------------------------------
# read_triplet_file: every bad input names the file and the line
# --------------------------------------------------------------------------------------------

BAD_TEXT = [
    ("0 1 2\n3 4\n5 6 7\n", 2, "found 2"),
    ("0 1 2\n3 4 5 6\n", 2, "found 4"),
    ("0 1 2 3\n4 5 6 7\n", 1, "found 4"),
    ("0 1 2\n3 4 5\n6 7.5 8\n", 3, "non-integer token '7.5'"),
    ("0 1 2\n3 4 5\n6 7.0 8\n", 3, "non-integer token '7.0'"),
    ("0 1 2\nx 4 5\n", 2, "non-integer token 'x'"),
    ("0 1 2\nnan 4 5\n", 2, "NaN"),
    ("0 1 2\n3 NaN 5\n", 2, "NaN"),
    ("0 1 2\n3 4 5\n-1 4 5\n", 3, "negative concept index -1"),
    (f"0 1 2\n3 4 {N_CONCEPTS}\n", 2, f"concept index {N_CONCEPTS} out of range"),
    ("0 1 2\n3 4 99999999999999999999\n", 2, "out of range"),
    ("0 1 2\n3 4 3\n", 2, "repeats a concept"),
    ("0 1 2\n\n  \n3 3 5\n", 4, "repeats a concept"),  # blank lines still count as lines
    ("0 1 2\n\n3 4\n", 3, "found 2"),
]


@pytest.mark.parametrize(("text", "line", "match"), BAD_TEXT)
def test_bad_text_names_file_and_line(tmp_path, text, line, match):
    path = _write_text(tmp_path / "trainset.txt", text)
    with pytest.raises(HumanDataError) as info:
        read_triplet_file(path, N_CONCEPTS)
    message = str(info.value)
    assert str(path) in message
    assert f"line {line}:" in message
    assert match in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_empty_text_file(tmp_path, text):
    path = _write_text(tmp_path / "testset2.txt", text)
    with pytest.raises(HumanDataError, match="empty file") as info:
        read_triplet_file(path, N_CONCEPTS)
    assert str(path) in str(info.value)


def test_line_numbers_are_right_across_scan_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(human, "_SCAN_CHUNK", 16)  # many tiny chunks, lines split across reads
    good = "".join(f"{i % 30} {i % 30 + 1} {i % 30 + 2}\n" for i in range(50))
    for bad, line, match in [("7 8 7\n", 51, "repeats"), ("7 8\n", 51, "found 2")]:
        path = _write_text(tmp_path / "chunks.txt", good + "\n" + bad + good)
        with pytest.raises(HumanDataError, match=match) as info:
            read_triplet_file(path, N_CONCEPTS)
        assert f"line {line + 1}:" in str(info.value)


BAD_NPY = [
    (np.array([[0, 1, 2, 3]]), "shape"),
    (np.array([0, 1, 2]), "shape"),
    (np.zeros((0, 3), dtype=np.int64), "empty file"),
    (np.array([[0.0, 1.0, 2.0], [3.0, np.nan, 5.0]]), "row 2: missing value (NaN)"),
    (np.array([[0.0, 1.0, 2.0], [3.0, 4.5, 5.0]]), "row 2: non-integer value"),
    (np.array([[0, 1, 2], [3, 4, 5], [-2, 1, 2]]), "row 3: negative concept index -2"),
    (np.array([[0, 1, 2], [3, 4, 99]]), "row 2: concept index 99 out of range"),
    (np.array([[0, 1, 2], [3, 3, 5]]), "row 2: row [3, 3, 5] repeats a concept"),
    (np.array([["a", "b", "c"]]), "integer array"),
]


@pytest.mark.parametrize(("array", "match"), BAD_NPY)
def test_bad_npy_names_file_and_row(tmp_path, array, match):
    path = tmp_path / "testset1.npy"
    np.save(path, array)
    with pytest.raises(HumanDataError) as info:
        read_triplet_file(path, N_CONCEPTS)
    assert str(path) in str(info.value)
    assert match in str(info.value)


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(HumanDataError, match="no such file"):
        read_triplet_file(tmp_path / "nope.txt", N_CONCEPTS)
    corrupt = tmp_path / "bad.npy"
    corrupt.write_bytes(b"not a numpy file")
    with pytest.raises(HumanDataError, match="bad.npy"):
        read_triplet_file(corrupt, N_CONCEPTS)


# --------------------------------------------------------------------------------------------
# load_human_judgements
# --------------------------------------------------------------------------------------------


def test_load_pair_pair_odd_folder(world, tmp_path):
    root = _folder(tmp_path / "things", {name: world.rows(name) for name in SETS})
    data = load_human_judgements(root, N_CONCEPTS, world.similarity_fn)
    assert data.convention == "pair_pair_odd"
    assert set(data.rows) == set(SETS) == set(data.detection) == set(data.sha256)
    for name in SETS:
        path = root / "triplets" / f"{name}.txt"
        assert data.paths[name] == path
        np.testing.assert_array_equal(data.rows[name], world.rows(name))
        assert data.rows[name].dtype == np.int64
        assert data.n_rows[name] == len(world.triplets[name])
        assert data.sha256[name] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert data.detection[name].decision == "pair_pair_odd"
    triplets, answers = data.positions("trainset")
    np.testing.assert_array_equal(triplets, world.rows("trainset"))
    assert np.all(answers == 2)
    assert set(data.noise_ceiling) == {"testset1", "testset2", "testset3"}
    for name in ("testset1", "testset2", "testset3"):
        assert data.noise_ceiling[name] == noise_ceiling(data.rows[name])
        assert data.noise_ceiling[name].n_triplets == N_TEST
    assert 1 / 3 < data.noise_ceiling["testset2"].ceiling < 1


def test_metadata_is_json_serialisable(world, tmp_path):
    root = _folder(tmp_path / "things", {name: world.rows(name) for name in SETS})
    data = load_human_judgements(root, N_CONCEPTS, world.similarity_fn)
    meta = json.loads(json.dumps(data.metadata(), allow_nan=False))
    assert meta["convention"] == "pair_pair_odd"
    assert meta["n_concepts"] == N_CONCEPTS
    assert meta["files"]["trainset"]["sha256"] == data.sha256["trainset"]
    assert meta["files"]["testset2"]["n_rows"] == N_TEST * REPEATS
    assert meta["files"]["trainset"]["detection"]["decision"] == "pair_pair_odd"
    assert meta["files"]["trainset"]["detection"]["unambiguous"] is True
    nc = data.noise_ceiling["testset2"]
    assert meta["noise_ceiling"]["testset2"] == {"ceiling": nc.ceiling, "n_triplets": N_TEST}


def test_load_odd_pair_pair_npy_gives_the_same_canonical_data(world, tmp_path):
    ppo = _folder(tmp_path / "ppo", {name: world.rows(name) for name in SETS})
    opp = _folder(
        tmp_path / "opp",
        {name: world.rows(name, "odd_pair_pair") for name in SETS},
        fmt="npy",
        sub=False,
    )
    a = load_human_judgements(ppo, N_CONCEPTS, world.similarity_fn)
    b = load_human_judgements(opp, N_CONCEPTS, world.similarity_fn)
    assert b.convention == "odd_pair_pair"
    assert b.paths["trainset"] == opp / "trainset.npy"
    for name in SETS:
        np.testing.assert_array_equal(a.rows[name], b.rows[name])
    assert a.noise_ceiling == b.noise_ceiling
    # the ceiling is computed on canonical rows, not on the raw [odd, pair, pair] rows
    raw = world.rows("testset2", "odd_pair_pair")
    assert b.noise_ceiling["testset2"] == noise_ceiling(b.rows["testset2"])
    assert b.noise_ceiling["testset2"] != noise_ceiling(raw)


def test_npy_and_txt_folders_load_identically(world, tmp_path):
    sets = {name: world.rows(name) for name in SETS}
    a = load_human_judgements(_folder(tmp_path / "t", sets), N_CONCEPTS, world.similarity_fn)
    b = load_human_judgements(
        _folder(tmp_path / "n", sets, fmt="npy"), N_CONCEPTS, world.similarity_fn
    )
    assert a.convention == b.convention
    for name in SETS:
        np.testing.assert_array_equal(a.rows[name], b.rows[name])
        assert a.detection[name] == b.detection[name]
        assert b.sha256[name] == hashlib.sha256(b.paths[name].read_bytes()).hexdigest()
        assert a.sha256[name] != b.sha256[name]
    assert a.noise_ceiling == b.noise_ceiling


def test_shuffled_concept_order_fails_to_load(world, tmp_path):
    root = _folder(tmp_path / "old", {name: world.shuffled_rows(name) for name in SETS})
    with pytest.raises(HumanDataError, match="concept order may be wrong") as info:
        load_human_judgements(root, N_CONCEPTS, world.similarity_fn)
    assert "trainset.txt" in str(info.value)


def test_mixed_conventions_fail(world, tmp_path):
    sets = {name: world.rows(name) for name in SETS}
    sets["validationset"] = world.rows("validationset", "odd_pair_pair")
    with pytest.raises(HumanDataError, match="mix conventions") as info:
        load_human_judgements(_folder(tmp_path / "m", sets), N_CONCEPTS, world.similarity_fn)
    assert "validationset.txt" in str(info.value)


@pytest.mark.parametrize("missing", ["trainset", "testset2"])
def test_missing_required_file(world, tmp_path, missing):
    sets = {name: world.rows(name) for name in SETS if name != missing}
    root = _folder(tmp_path / "things", sets)
    with pytest.raises(HumanDataError) as info:
        load_human_judgements(root, N_CONCEPTS, world.similarity_fn)
    assert str(root) in str(info.value) and missing in str(info.value)


def test_optional_files_may_be_missing(world, tmp_path):
    sets = {name: world.rows(name) for name in ("trainset", "testset2")}
    data = load_human_judgements(_folder(tmp_path / "min", sets), N_CONCEPTS, world.similarity_fn)
    assert set(data.rows) == {"trainset", "testset2"}
    assert set(data.noise_ceiling) == {"testset2"}


def test_missing_folder(world, tmp_path):
    with pytest.raises(HumanDataError, match="no such folder"):
        load_human_judgements(tmp_path / "absent", N_CONCEPTS, world.similarity_fn)


def test_bad_file_in_folder_names_file_and_line(world, tmp_path):
    sets = {name: world.rows(name) for name in SETS}
    root = _folder(tmp_path / "things", sets)
    bad = root / "triplets" / "testset1.txt"
    lines = bad.read_text().splitlines()
    lines[9] = "1 2"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(HumanDataError) as info:
        load_human_judgements(root, N_CONCEPTS, world.similarity_fn)
    assert str(bad) in str(info.value) and "line 10:" in str(info.value)


def test_testset2_without_repeats_fails(world, tmp_path):
    sets = {name: world.rows(name) for name in ("trainset", "validationset")}
    sets["testset2"] = world.rows("validationset")  # every triplet answered once
    with pytest.raises(HumanDataError, match="repeated triplets"):
        load_human_judgements(_folder(tmp_path / "x", sets), N_CONCEPTS, world.similarity_fn)


def test_load_from_mapping_of_files(world, tmp_path):
    paths = {
        "trainset": _write_txt(tmp_path / "a" / "train.txt", world.rows("trainset")),
        "testset2": _write_txt(tmp_path / "b" / "t2.txt", world.rows("testset2")),
    }
    data = load_human_judgements(paths, N_CONCEPTS, world.similarity_fn)
    assert data.paths == paths
    np.testing.assert_array_equal(data.rows["testset2"], world.rows("testset2"))
    with pytest.raises(HumanDataError, match="testset2"):
        load_human_judgements({"trainset": paths["trainset"]}, N_CONCEPTS, world.similarity_fn)


def test_find_judgement_file_prefers_npy_then_root(world, tmp_path):
    rows = world.rows("testset1")
    _write_txt(tmp_path / "triplets" / "testset1.txt", rows)
    assert find_judgement_file(tmp_path, "testset1") == tmp_path / "triplets" / "testset1.txt"
    _write_txt(tmp_path / "testset1.txt", rows)
    assert find_judgement_file(tmp_path, "testset1") == tmp_path / "testset1.txt"
    np.save(tmp_path / "testset1.npy", rows)
    assert find_judgement_file(tmp_path, "testset1") == tmp_path / "testset1.npy"
    assert find_judgement_file(tmp_path, "testset3") is None
