"""The offline demo's judgements as THINGS human files, written as a THINGS-shaped folder.

Files (:func:`human_like_files`, :func:`write_things_folder`)
    Judgement rows of the simulated observer (:mod:`recovery_assets.sources.demo_observer`) in
    the THINGS human-file convention ``[pair, pair, odd]`` (columns 0 and 1 the pair judged most
    similar, column 2 the odd one out): unique random training and validation triplets answered
    once, and three test sets of repeated triplets (each unique test triplet answered ``repeats``
    times by independent draws), written with the stimuli
    (:mod:`recovery_assets.sources.demo_stimuli`) as a THINGS-shaped folder (docs/method.md §2)
    that the THINGS loader reads back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd

from recovery_assets.core.triplets import positions_to_human_rows, sample_unique_triplets
from recovery_assets.sources.demo_observer import DEMO_REPEATS, DemoObserver
from recovery_assets.sources.demo_stimuli import _check_images, _check_int

__all__ = [
    "DEMO_N_TEST_TRIPLETS",
    "DEMO_N_TRAIN",
    "DEMO_N_VAL",
    "FILE_KEYS",
    "human_like_files",
    "write_things_folder",
]

# Recommended demo sizes (with the 300 stimuli of demo_stimuli's defaults).
DEMO_N_TRAIN = 20_000
DEMO_N_VAL = 2_000
DEMO_N_TEST_TRIPLETS = 1_000

# The THINGS judgement files, in the order of docs/method.md §2.
FILE_KEYS = ("trainset", "validationset", "testset1", "testset2", "testset3")


# --------------------------------------------------------------------------------------------
# THINGS-convention judgement files
# --------------------------------------------------------------------------------------------


def human_like_files(
    observer: DemoObserver,
    n_train: int = DEMO_N_TRAIN,
    n_val: int = DEMO_N_VAL,
    n_test_triplets: int = DEMO_N_TEST_TRIPLETS,
    repeats: int = DEMO_REPEATS,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The observer's judgements as THINGS human files (rows ``[pair, pair, odd]``).

    ``n_train + n_val + 3 * n_test_triplets`` distinct unique random triplets are drawn over all
    stimuli (uniform, :func:`~recovery_assets.core.triplets.sample_unique_triplets`), so no
    triplet is shared between sets. Training and validation triplets are answered once. Each of
    the three test sets holds its own ``n_test_triplets`` unique triplets, each answered
    ``repeats`` times by independent draws, with the rows shuffled (like THINGS test sets, whose
    repeated triplets are interleaved). Every draw is seeded: the same observer and seed give
    identical files.

    Returns
    -------
    dict with keys ``trainset, validationset, testset1, testset2, testset3`` of (m, 3) int64
    arrays; column 2 is the odd one out.
    """
    if not isinstance(observer, DemoObserver):
        raise ValueError(f"observer must be a DemoObserver, got {type(observer).__name__}")
    n_train = _check_int(n_train, "n_train", minimum=0)
    n_val = _check_int(n_val, "n_val", minimum=0)
    n_test = _check_int(n_test_triplets, "n_test_triplets", minimum=1)
    repeats = _check_int(repeats, "repeats", minimum=2)
    seed = _check_int(seed, "seed", minimum=0)
    total = n_train + n_val + 3 * n_test
    capacity = comb(observer.n, 3)
    if total > capacity:
        raise ValueError(
            f"{observer.n} stimuli hold only {capacity} unique triplets, but n_train + n_val + "
            f"3 * n_test_triplets = {total} are needed"
        )
    root = np.random.SeedSequence([seed, 2])
    triplet_stream, *set_streams = root.spawn(1 + len(FILE_KEYS))
    triplets = sample_unique_triplets(
        np.arange(observer.n), total, np.random.default_rng(triplet_stream)
    )
    bounds = np.cumsum([0, n_train, n_val, n_test, n_test, n_test])
    files: dict[str, np.ndarray] = {}
    for s, key in enumerate(FILE_KEYS):
        rng = np.random.default_rng(set_streams[s])
        t = triplets[bounds[s] : bounds[s + 1]]
        if key.startswith("testset"):
            t = np.repeat(t, repeats, axis=0)
            t = t[rng.permutation(t.shape[0])]
        answers = observer.answer(t, rng)
        files[key] = positions_to_human_rows(t, answers).astype(np.int64)
    return files


# --------------------------------------------------------------------------------------------
# A THINGS-shaped folder
# --------------------------------------------------------------------------------------------

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")


def write_things_folder(
    directory: str | os.PathLike[str],
    table: pd.DataFrame,
    images: np.ndarray,
    files: Mapping[str, np.ndarray],
    *,
    jpeg_quality: int = 95,
) -> dict[str, Path]:
    """Write stimuli and judgements as a THINGS-shaped folder (docs/method.md §2).

    Layout::

        directory/things_concepts.tsv                  tab-separated, header, row = concept index
        directory/images/<uniqueID>/<uniqueID>_01b.jpg one image per concept
        directory/triplets/<key>.txt                   e.g. trainset.txt: 0-based ints, 3 per row

    The TSV holds all columns of ``table`` (``uniqueID`` first) in the table's row order (never
    sorted). Images are JPEG (quality ``jpeg_quality``, no chroma subsampling), so reading them
    back is close to, not bit-identical with, ``images``. Triplet files are whitespace-separated
    integers without a header, readable by ``numpy.loadtxt(path, dtype=int)``.

    Returns
    -------
    dict of paths: ``root``, ``concepts`` (the TSV), ``images`` (the image folder), ``triplets``
    (the triplet folder) and one entry per key of ``files`` (its ``.txt`` file).
    """
    from PIL import Image

    arr = _check_images(images)
    if "uniqueID" not in table.columns:
        raise ValueError("table must have a 'uniqueID' column")
    n = len(table)
    if arr.shape[0] != n:
        raise ValueError(f"table has {n} rows but images has {arr.shape[0]}")
    ids = [str(u) for u in table["uniqueID"]]
    if len(set(ids)) != n:
        raise ValueError("uniqueID values must be unique")
    bad = [u for u in ids if not _SAFE_ID.match(u)]
    if bad:
        raise ValueError(f"uniqueID values must be safe file names, got e.g. {bad[:3]}")
    checked: dict[str, np.ndarray] = {}
    for key, rows in files.items():
        if not _SAFE_KEY.match(str(key)):
            raise ValueError(f"file key {key!r} is not a safe file name")
        r = np.asarray(rows)
        if r.ndim != 2 or r.shape[1] != 3 or (r.size and not np.issubdtype(r.dtype, np.integer)):
            raise ValueError(f"{key} must be an (m, 3) integer array, got {r.shape} {r.dtype}")
        if r.size and (r.min() < 0 or r.max() >= n):
            raise ValueError(f"{key} has concept indices outside [0, {n})")
        checked[str(key)] = r.astype(np.int64)

    root = Path(directory)
    image_dir = root / "images"
    triplet_dir = root / "triplets"
    image_dir.mkdir(parents=True, exist_ok=True)
    triplet_dir.mkdir(parents=True, exist_ok=True)

    columns = ["uniqueID"] + [c for c in table.columns if c != "uniqueID"]
    concepts = root / "things_concepts.tsv"
    table[columns].to_csv(concepts, sep="\t", index=False)
    for uid, image in zip(ids, arr, strict=True):
        folder = image_dir / uid
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(
            folder / f"{uid}_01b.jpg", format="JPEG", quality=int(jpeg_quality), subsampling=0
        )
    paths: dict[str, Path] = {
        "root": root,
        "concepts": concepts,
        "images": image_dir,
        "triplets": triplet_dir,
    }
    for key, rows in checked.items():
        path = triplet_dir / f"{key}.txt"
        np.savetxt(path, rows, fmt="%d", delimiter=" ")
        paths[key] = path
    return paths
