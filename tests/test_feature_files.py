"""Tests of recovery_assets.sources.features: precomputed feature files in concept order."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recovery_assets.sources.features import (
    FeatureFileError,
    load_feature_file,
    write_feature_file,
)

# Concept order as in things_concepts.tsv: not sorted (sorted order puts camera1 before
# camera_lens, as THINGS' own files do).
CONCEPTS = [
    "aardvark",
    "camera_lens",
    "camera1",
    "camera2",
    "bat1",
    "bat2",
    "zebra",
    "apple",
    "tie",
    "tie_rack",
    "mouse1",
    "mouse2",
]
N, P = len(CONCEPTS), 5
SUFFIXES = [".npy", ".npz", ".pt", ".pth", ".parquet"]
ID_SUFFIXES = [".npz", ".pt", ".pth", ".parquet"]
FORMAT = {".npy": "npy", ".npz": "npz", ".pt": "pt", ".pth": "pt", ".parquet": "parquet"}


@pytest.fixture
def x() -> np.ndarray:
    """A distinct value in every cell, so any row permutation is detected."""
    return np.random.default_rng(3).standard_normal((N, P)).astype(np.float32)


def _sorted_perm() -> np.ndarray:
    """Rows in sorted-uniqueID order: differs from the concept order (like THINGS)."""
    perm = np.argsort(np.array(CONCEPTS))
    assert not np.array_equal(perm, np.arange(N))
    return perm


def _shuffled_perm(seed: int = 0) -> np.ndarray:
    perm = np.random.default_rng(seed).permutation(N)
    assert not np.array_equal(perm, np.arange(N))
    return perm


def _fails(path: Path, pattern: str, concepts=CONCEPTS, **kw) -> str:
    """Load must fail with a FeatureFileError that starts with ``path`` and whose text after the
    path matches ``pattern`` (tmp_path holds the test name, so the path itself must not count)."""
    anchored = rf"(?s)^{re.escape(str(path))}: .*(?:{pattern})"
    with pytest.raises(FeatureFileError, match=anchored) as info:
        load_feature_file(path, concepts, **kw)
    return str(info.value)


def _check_result(features: np.ndarray, info: dict, x: np.ndarray, path: Path, order: str):
    assert features.dtype == np.float32
    assert features.flags.c_contiguous
    np.testing.assert_array_equal(features, x.astype(np.float32))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert info == {
        "path": str(path),
        "sha256": digest,
        "format": FORMAT[path.suffix],
        "order": order,
        "n": N,
        "p": P,
    }


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_concept_order(tmp_path, x, suffix):
    path = write_feature_file(tmp_path / f"model{suffix}", x)
    features, info = load_feature_file(path, CONCEPTS)
    _check_result(features, info, x, path, "concept order")


@pytest.mark.parametrize("suffix", ID_SUFFIXES)
@pytest.mark.parametrize("perm_kind", ["sorted", "shuffled"])
def test_round_trip_keyed_by_uniqueid(tmp_path, x, suffix, perm_kind):
    perm = _sorted_perm() if perm_kind == "sorted" else _shuffled_perm()
    ids = [CONCEPTS[i] for i in perm]
    path = write_feature_file(tmp_path / f"model{suffix}", x[perm], ids=ids)
    features, info = load_feature_file(path, CONCEPTS)
    _check_result(features, info, x, path, "reordered by uniqueID")


@pytest.mark.parametrize("suffix", ID_SUFFIXES)
def test_ids_in_concept_order_are_matched_by_id(tmp_path, x, suffix):
    path = write_feature_file(tmp_path / f"model{suffix}", x, ids=CONCEPTS)
    features, info = load_feature_file(path, CONCEPTS)
    _check_result(features, info, x, path, "reordered by uniqueID")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_float64_and_integer_inputs_are_cast_to_float32(tmp_path, x, suffix):
    x64 = x.astype(np.float64) * 1.1
    path = write_feature_file(tmp_path / f"f64{suffix}", x64)
    features, _ = load_feature_file(path, CONCEPTS)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, x64.astype(np.float32))

    xi = np.arange(N * P, dtype=np.int64).reshape(N, P)
    path = write_feature_file(tmp_path / f"int{suffix}", xi)
    features, _ = load_feature_file(path, CONCEPTS)
    assert features.dtype == np.float32
    np.testing.assert_array_equal(features, xi.astype(np.float32))


def test_npy_is_read_without_pickle(tmp_path, x):
    path = tmp_path / "model.npy"
    np.save(path, np.asfortranarray(x))  # column-major on disk: result still C-contiguous
    features, info = load_feature_file(path, CONCEPTS)
    _check_result(features, info, x, path, "concept order")


def test_npz_key_selects_the_array(tmp_path, x):
    perm = _shuffled_perm(1)
    path = tmp_path / "model.npz"
    np.savez(
        path,
        features=np.zeros((N, P)),
        layer4=x[perm],
        uniqueID=np.array([CONCEPTS[i] for i in perm]),
    )
    features, info = load_feature_file(path, CONCEPTS, key="layer4")
    np.testing.assert_array_equal(features, x)
    assert info["order"] == "reordered by uniqueID"
    # without key the "features" array wins
    features, _ = load_feature_file(path, CONCEPTS)
    np.testing.assert_array_equal(features, np.zeros((N, P), dtype=np.float32))


def test_npz_single_numeric_array_without_features_name(tmp_path, x):
    path = tmp_path / "model.npz"
    np.savez(path, embedding=x)
    features, info = load_feature_file(path, CONCEPTS)
    np.testing.assert_array_equal(features, x)
    assert info["order"] == "concept order"

    # the ids (1-D strings) and 1-D numeric arrays do not count as candidates
    perm = _sorted_perm()
    path = tmp_path / "with_ids.npz"
    np.savez(
        path,
        embedding=x[perm],
        ids=np.array([CONCEPTS[i] for i in perm]),
        norms=np.ones(N),
    )
    features, info = load_feature_file(path, CONCEPTS)
    np.testing.assert_array_equal(features, x)
    assert info["order"] == "reordered by uniqueID"


def test_npz_bytes_ids_are_decoded(tmp_path, x):
    perm = _shuffled_perm(2)
    path = tmp_path / "model.npz"
    np.savez(path, features=x[perm], uniqueID=np.array([CONCEPTS[i].encode() for i in perm]))
    features, _ = load_feature_file(path, CONCEPTS)
    np.testing.assert_array_equal(features, x)


def test_pt_dict_and_bare_tensor(tmp_path, x):
    bare = tmp_path / "bare.pt"
    torch.save(torch.from_numpy(x), bare)
    features, info = load_feature_file(bare, CONCEPTS)
    _check_result(features, info, x, bare, "concept order")

    plain = tmp_path / "plain.pt"
    torch.save({"features": torch.from_numpy(x).double()}, plain)
    features, info = load_feature_file(plain, CONCEPTS)
    _check_result(features, info, x, plain, "concept order")

    perm = _sorted_perm()
    keyed = tmp_path / "keyed.pth"
    torch.save(
        {
            "features": torch.zeros(N, P),
            "penultimate": torch.from_numpy(x[perm]),
            "ids": [CONCEPTS[i] for i in perm],
        },
        keyed,
    )
    features, info = load_feature_file(keyed, CONCEPTS, key="penultimate")
    _check_result(features, info, x, keyed, "reordered by uniqueID")

    single = tmp_path / "single.pt"
    torch.save({"emb": torch.from_numpy(x), "uniqueID": CONCEPTS}, single)
    features, info = load_feature_file(single, CONCEPTS)
    _check_result(features, info, x, single, "reordered by uniqueID")


def test_pt_bfloat16_and_transposed_tensor(tmp_path, x):
    path = tmp_path / "bf16.pt"
    t = torch.from_numpy(x).to(torch.bfloat16)
    torch.save(t, path)
    features, _ = load_feature_file(path, CONCEPTS)
    np.testing.assert_array_equal(features, t.float().numpy())

    path = tmp_path / "transposed.pt"
    torch.save(torch.from_numpy(np.ascontiguousarray(x.T)).T, path)
    features, _ = load_feature_file(path, CONCEPTS)
    assert features.flags.c_contiguous
    np.testing.assert_array_equal(features, x)


def test_parquet_uniqueid_index_and_any_column_names(tmp_path, x):
    perm = _sorted_perm()
    table = pd.DataFrame(x[perm], columns=[f"dim_{j}" for j in range(P)])
    table.index = pd.Index([CONCEPTS[i] for i in perm], name="uniqueID")
    path = tmp_path / "indexed.parquet"
    table.to_parquet(path)
    features, info = load_feature_file(path, CONCEPTS)
    _check_result(features, info, x, path, "reordered by uniqueID")


def test_write_parquet_layout(tmp_path, x):
    path = write_feature_file(tmp_path / "m.parquet", x, ids=CONCEPTS)
    table = pd.read_parquet(path)
    assert list(table.columns) == ["uniqueID"] + [f"f{j}" for j in range(P)]
    assert table["uniqueID"].tolist() == CONCEPTS


def test_write_rejects_bad_requests(tmp_path, x):
    with pytest.raises(ValueError, match="cannot hold ids"):
        write_feature_file(tmp_path / "m.npy", x, ids=CONCEPTS)
    with pytest.raises(ValueError, match="11 ids for 12 rows"):
        write_feature_file(tmp_path / "m.npz", x, ids=CONCEPTS[:-1])
    with pytest.raises(ValueError, match="2-D"):
        write_feature_file(tmp_path / "m.pt", x[0])
    with pytest.raises(ValueError, match="supported suffixes"):
        write_feature_file(tmp_path / "m.csv", x)


def test_things_sized_shuffled_npz(tmp_path):
    """1,854 concepts with THINGS-like ids, stored in sorted order, come back in table order."""
    rng = np.random.default_rng(0)
    concepts = [f"concept{i}" for i in rng.permutation(1854)]
    x = rng.standard_normal((1854, 64)).astype(np.float32)
    perm = np.argsort(np.array(concepts))
    path = write_feature_file(tmp_path / "big.npz", x[perm], ids=[concepts[i] for i in perm])
    features, info = load_feature_file(path, concepts)
    np.testing.assert_array_equal(features, x)
    assert (info["n"], info["p"], info["order"]) == (1854, 64, "reordered by uniqueID")


# --------------------------------------------------------------------------------------------
# Files that cannot be read
# --------------------------------------------------------------------------------------------


def test_unsupported_suffix_lists_supported(tmp_path, x):
    path = tmp_path / "model.csv"
    pd.DataFrame(x).to_csv(path)
    message = _fails(path, r"unsupported file type '\.csv'")
    for suffix in SUFFIXES:
        assert suffix in message


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_missing_file(tmp_path, suffix):
    _fails(tmp_path / f"absent{suffix}", "no such file")


def test_directory_is_not_a_file(tmp_path):
    folder = tmp_path / "dir.npy"
    folder.mkdir()
    _fails(folder, "not a regular file")


CORRUPT = {
    ".npy": r"corrupt or not a \.npy file \(no NumPy header\)",
    ".npz": r"corrupt or not an \.npz file \(not a zip archive\)",
    ".pt": r"cannot be read by torch\.load\(weights_only=True\)",
    ".pth": r"cannot be read by torch\.load\(weights_only=True\)",
    ".parquet": r"not a readable parquet file",
}
TRUNCATED = {
    ".npy": r"corrupt \.npy file \(.*could only read",
    ".npz": r"corrupt \.npz file \(",
    ".pt": r"cannot be read by torch\.load\(weights_only=True\)",
    ".pth": r"cannot be read by torch\.load\(weights_only=True\)",
    ".parquet": r"not a readable parquet file",
}


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a feature file\n" * 10)
    _fails(path, CORRUPT[suffix])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_file(tmp_path, x, suffix):
    full = write_feature_file(tmp_path / f"full{suffix}", x)
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _fails(path, TRUNCATED[suffix])


def test_npy_object_array(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([[1.0, "a"]] * N, dtype=object), allow_pickle=True)
    _fails(path, "object array")


def test_npz_renamed_npy_and_vice_versa(tmp_path, x):
    npz_as_npy = tmp_path / "archive.npy"
    with open(npz_as_npy, "wb") as handle:
        np.savez(handle, features=x)
    _fails(npz_as_npy, r"\.npz \(zip\) archive")
    npy_as_npz = tmp_path / "array.npz"
    with open(npy_as_npz, "wb") as handle:
        np.save(handle, x)
    _fails(npy_as_npz, r"single \.npy array")


def test_pt_with_arbitrary_pickle_is_refused(tmp_path, x):
    path = tmp_path / "pickled.pt"
    torch.save({"features": torch.from_numpy(x), "meta": pd.Timestamp("2020-01-01")}, path)
    _fails(path, r"torch\.load\(weights_only=True\) \(Unsupported global: .*pandas")


def test_key_for_formats_without_named_arrays(tmp_path, x):
    for suffix in (".npy", ".parquet", ".pt"):
        path = write_feature_file(tmp_path / f"m{suffix}", x)
        _fails(path, "key='layer4' was given", key="layer4")


def test_npz_and_pt_missing_key(tmp_path, x):
    npz = tmp_path / "m.npz"
    np.savez(npz, features=x, other=x)
    _fails(npz, r"has no array 'layer4' \(arrays: \['features', 'other'\]\)", key="layer4")
    pt = tmp_path / "m.pt"
    torch.save({"features": torch.from_numpy(x)}, pt)
    _fails(pt, r"has no entry 'layer4'", key="layer4")


def test_ambiguous_or_absent_feature_array(tmp_path, x):
    npz = tmp_path / "two.npz"
    np.savez(npz, a=x, b=x)
    _fails(npz, r"several: \['a', 'b'\].*pass key=")
    none = tmp_path / "none.npz"
    np.savez(none, uniqueID=np.array(CONCEPTS))
    _fails(none, r"no 'features' array.*none")
    pt = tmp_path / "two.pt"
    torch.save({"a": torch.from_numpy(x), "b": torch.from_numpy(x)}, pt)
    _fails(pt, r"several: \['a', 'b'\].*pass key=")
    listed = tmp_path / "list.pt"
    torch.save({"features": x.tolist()}, listed)
    _fails(listed, "entry 'features' is a list, not a tensor")
    wrong = tmp_path / "wrong.pt"
    torch.save([torch.from_numpy(x)], wrong)
    _fails(wrong, "holds a list; expected a 2-D tensor")


# --------------------------------------------------------------------------------------------
# Shape and dtype
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(N,), (N, P, 2), ()])
def test_not_2d(tmp_path, shape):
    path = tmp_path / "m.npy"
    np.save(path, np.ones(shape))
    _fails(path, re.escape(f"is not 2-D (shape {shape})"))
    pt = tmp_path / "m.pt"
    torch.save(torch.ones(shape), pt)
    _fails(pt, re.escape(f"is not 2-D (shape {shape})"))


def test_zero_columns(tmp_path):
    path = tmp_path / "m.npy"
    np.save(path, np.ones((N, 0)))
    _fails(path, r"zero columns \(shape \(12, 0\)\)")
    parquet = tmp_path / "m.parquet"
    pd.DataFrame({"uniqueID": CONCEPTS}).to_parquet(parquet, index=False)
    _fails(parquet, "zero feature columns")


@pytest.mark.parametrize(
    "array, dtype",
    [
        (np.full((N, P), "x"), "<U1"),
        (np.ones((N, P), dtype=bool), "bool"),
        (np.ones((N, P), dtype=np.complex64), "complex64"),
    ],
)
def test_non_numeric_dtype(tmp_path, array, dtype):
    path = tmp_path / "m.npy"
    np.save(path, array)
    _fails(path, f"non-numeric dtype {dtype}")
    npz = tmp_path / "m.npz"
    np.savez(npz, features=array)
    _fails(npz, f"array 'features' has non-numeric dtype {dtype}")


def test_pt_non_numeric_tensor(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(torch.ones(N, P, dtype=torch.bool), path)
    _fails(path, "non-numeric dtype bool")


def test_parquet_non_numeric_columns_are_named(tmp_path, x):
    table = pd.DataFrame(x, columns=[f"f{j}" for j in range(P)])
    table.insert(0, "ids", CONCEPTS)  # the id column must be called uniqueID
    table["source"] = "model_a"
    path = tmp_path / "m.parquet"
    table.to_parquet(path, index=False)
    message = _fails(path, r"2 non-numeric columns \['ids', 'source'\]")
    assert "uniqueID" in message


def test_parquet_string_index_is_not_ignored(tmp_path, x):
    table = pd.DataFrame(x, index=pd.Index(CONCEPTS, name="concept"))
    table.columns = [f"f{j}" for j in range(P)]
    path = tmp_path / "m.parquet"
    table.to_parquet(path)
    _fails(path, "non-integer index 'concept'")


# --------------------------------------------------------------------------------------------
# Rows and values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("n_rows", [N + 2, N - 1])
def test_wrong_row_count_without_ids(tmp_path, suffix, n_rows):
    x = np.ones((n_rows, P), dtype=np.float32)
    path = write_feature_file(tmp_path / f"m{suffix}", x)
    _fails(path, f"has {n_rows} rows but things_concepts.tsv has {N} concepts")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_nan_and_inf_rows_without_ids(tmp_path, x, suffix):
    bad = x.copy()
    bad[3, 1] = np.nan
    bad[7, 0] = np.inf
    bad[7, 2] = np.nan
    path = write_feature_file(tmp_path / f"m{suffix}", bad)
    message = _fails(path, r"row 3 contains NaN; 2 of 12 rows contain NaN or inf")
    assert "uniqueID" not in message

    bad = x.copy()
    bad[5, 4] = -np.inf
    path = write_feature_file(tmp_path / f"inf{suffix}", bad)
    _fails(path, r"row 5 contains inf; 1 of 12 rows")


@pytest.mark.parametrize("suffix", ID_SUFFIXES)
def test_nan_row_names_its_uniqueid(tmp_path, x, suffix):
    perm = _sorted_perm()
    stored = x[perm].copy()
    stored[2, 0] = np.nan  # the third row of the file
    ids = [CONCEPTS[i] for i in perm]
    path = write_feature_file(tmp_path / f"m{suffix}", stored, ids=ids)
    _fails(path, re.escape(f"row 2 (uniqueID {ids[2]!r}) contains NaN; 1 of 12 rows"))


def test_float64_overflowing_float32(tmp_path, x):
    big = x.astype(np.float64)
    big[4, 0] = 1e300
    path = write_feature_file(tmp_path / "m.npy", big)
    _fails(path, r"row 4 has values beyond the float32 range.*1 of 12 rows")


# --------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ID_SUFFIXES)
def test_duplicated_ids(tmp_path, x, suffix):
    ids = list(CONCEPTS)
    ids[5] = "camera1"  # camera1 twice, bat2 missing
    path = write_feature_file(tmp_path / f"m{suffix}", x, ids=ids)
    _fails(path, r"1 duplicated ids in (array|entry|column) 'uniqueID': \['camera1'\]")


@pytest.mark.parametrize("suffix", ID_SUFFIXES)
def test_ids_missing_from_the_file(tmp_path, x, suffix):
    keep = [i for i in range(N) if CONCEPTS[i] not in ("camera_lens", "tie", "mouse2")]
    path = write_feature_file(tmp_path / f"m{suffix}", x[keep], ids=[CONCEPTS[i] for i in keep])
    _fails(
        path,
        r"has 9 rows but things_concepts.tsv has 12 concepts; 3 of the 12 concept ids of "
        r"things_concepts.tsv are missing from .*: \['camera_lens', 'tie', 'mouse2'\]",
    )


def test_many_missing_ids_show_five_examples_and_the_count(tmp_path, x):
    path = write_feature_file(tmp_path / "m.npz", x[:4], ids=CONCEPTS[:4])
    message = _fails(path, r"8 of the 12 concept ids .* missing")
    assert re.search(r"\['bat1', 'bat2', 'zebra', 'apple', 'tie', \.\.\.\]", message), message
    assert "tie_rack" not in message


@pytest.mark.parametrize("suffix", ID_SUFFIXES)
def test_extra_ids_not_in_the_concept_table(tmp_path, x, suffix):
    ids = CONCEPTS + ["camera3", "unicorn"]
    stored = np.vstack([x, np.ones((2, P), dtype=np.float32)])
    path = write_feature_file(tmp_path / f"m{suffix}", stored, ids=ids)
    message = _fails(
        path, r"2 ids in the file are not in things_concepts.tsv: \['camera3', 'unicorn'\]"
    )
    assert "has 14 rows but things_concepts.tsv has 12 concepts" in message
    assert "missing" not in message


def test_renamed_id_reports_missing_and_extra(tmp_path, x):
    ids = list(CONCEPTS)
    ids[1] = "camera lens"
    path = write_feature_file(tmp_path / "m.parquet", x, ids=ids)
    message = _fails(path, r"1 of the 12 concept ids .* missing .*\['camera_lens'\]")
    assert "1 id in the file is not in things_concepts.tsv: ['camera lens']" in message
    assert "rows but" not in message  # row counts agree


def test_id_list_length_differs_from_rows(tmp_path, x):
    npz = tmp_path / "m.npz"
    np.savez(npz, features=x, uniqueID=np.array(CONCEPTS[:-1]))
    _fails(npz, r"id list in array 'uniqueID' has 11 entries but the feature matrix has 12 rows")
    pt = tmp_path / "m.pt"
    torch.save({"features": torch.from_numpy(x), "ids": CONCEPTS + ["extra"]}, pt)
    _fails(pt, r"id list in entry 'ids' has 13 entries but the feature matrix has 12 rows")


def test_ids_must_be_strings(tmp_path, x):
    npz = tmp_path / "int_ids.npz"
    np.savez(npz, features=x, uniqueID=np.arange(N))
    _fails(npz, r"ids in array 'uniqueID' must be strings, got dtype int64")
    two_d = tmp_path / "2d_ids.npz"
    np.savez(two_d, features=x, uniqueID=np.array(CONCEPTS).reshape(3, 4))
    _fails(two_d, r"ids in array 'uniqueID' must be 1-D, got shape \(3, 4\)")
    pt = tmp_path / "m.pt"
    torch.save({"features": torch.from_numpy(x), "uniqueID": list(range(N))}, pt)
    _fails(pt, r"ids in entry 'uniqueID' must all be str; found 12 other values")
    parquet = tmp_path / "m.parquet"
    table = pd.DataFrame(x, columns=[f"f{j}" for j in range(P)])
    table.insert(0, "uniqueID", [None] + CONCEPTS[1:])
    table.to_parquet(parquet, index=False)
    _fails(parquet, r"column 'uniqueID' has 1 missing values \(first at row 0\)")


def test_conflicting_id_keys(tmp_path, x):
    npz = tmp_path / "m.npz"
    np.savez(npz, features=x, uniqueID=np.array(CONCEPTS), ids=np.array(CONCEPTS[::-1]))
    _fails(npz, "holds both 'uniqueID' and 'ids' ids and they differ")
    same = tmp_path / "same.npz"
    np.savez(same, features=x, uniqueID=np.array(CONCEPTS), ids=np.array(CONCEPTS))
    features, _ = load_feature_file(same, CONCEPTS)
    np.testing.assert_array_equal(features, x)


def test_object_ids_in_npz(tmp_path, x):
    path = tmp_path / "m.npz"
    np.savez(path, features=x, uniqueID=np.array(CONCEPTS, dtype=object))
    _fails(path, "array 'uniqueID' is an object")


def test_bad_concept_ids_are_a_value_error(tmp_path, x):
    path = write_feature_file(tmp_path / "m.npy", x)
    with pytest.raises(ValueError, match=r"duplicated uniqueIDs: \['camera1'\]"):
        load_feature_file(path, CONCEPTS[:-1] + ["camera1"])
    with pytest.raises(ValueError, match="empty"):
        load_feature_file(path, [])
    with pytest.raises(ValueError, match="single string"):
        load_feature_file(path, "camera1")
