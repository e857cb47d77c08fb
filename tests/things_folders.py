"""Small THINGS-shaped folders for tests (a helper module, not a test file).

``tests/`` has no ``__init__.py``: pytest's default ``prepend`` import mode puts the test file's
folder on ``sys.path``, so tests import this module as ``from things_folders import ...`` (as
``test_ui.py`` imports ``conftest``).

:func:`make_things_folder` builds a folder from the demo machinery (real photographs bundled with
scikit-image / scikit-learn, a simulated observer), shaped like the real THINGS download:
``things_concepts.tsv`` with 25 columns (``uniqueID`` is not the first one), one image per
concept, and the five judgement files in a chosen convention and format.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recovery_assets.core.triplets import human_rows_to_positions, positions_to_human_rows
from recovery_assets.sources.demo_folder import human_like_files, write_things_folder
from recovery_assets.sources.demo_observer import DemoObserver
from recovery_assets.sources.demo_stimuli import demo_stimuli

#: The columns of a THINGS-like concept table (25, like the real ``things_concepts.tsv``).
THINGS_COLUMNS = (
    "Word",
    "Wordnet ID",
    "Wordnet ID2",
    "Wordnet ID3",
    "Wordnet ID4",
    "uniqueID",
    "Definition (from WordNet, Google, or Wikipedia)",
    "WordNet Synonyms",
    "Example image",
    "Dominant Part of Speech",
    "Bing ID",
    "Bigram",
    "SUBTLEX freq",
    "Word freq",
    "Word freq (COCA)",
    "Concreteness (M)",
    "Concreteness (SD)",
    "Percent_known",
    "Top-down Category (WordNet)",
    "Top-down Category (manual selection)",
    "Bottom-up Category (Human Raters)",
    "WordNet Synset ID",
    "Image source",
    "Family",
    "Crop box",
)
assert len(THINGS_COLUMNS) == 25

CONVENTIONS = ("pair_pair_odd", "odd_pair_pair")
LAYOUTS = ("things", "flat")
FORMATS = ("txt", "npy")
TRIPLET_FORMS = ("triplets", "triplet_dataset", "release_table")
CHOICE_ENCODINGS = ("position", "concept")
SUBJECT_FORMATS = ("int", "str")
#: The release table's name and its columns as written (an extra ``RT`` column included).
RELEASE_TABLE = "triplets_large_final_correctednc_correctedorder.csv"
RELEASE_WRITTEN_COLUMNS = (
    "image1",
    "image2",
    "image3",
    "choice",
    "RT",
    "subject_id",
    "noise_ceiling",
)


@functools.lru_cache(maxsize=8)
def _demo_data(
    n_families: int,
    crops: int,
    seed: int,
    n_train: int,
    n_val: int,
    test_triplets: int,
    repeats: int,
) -> tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray]]:
    """Stimuli and canonical ``[pair, pair, odd]`` judgements (cached; treat as read-only)."""
    table, images = demo_stimuli(n_families, crops, size=64, seed=seed)
    observer = DemoObserver(images, table["family"].to_numpy(), seed=seed)
    files = human_like_files(
        observer,
        n_train=n_train,
        n_val=n_val,
        n_test_triplets=test_triplets,
        repeats=repeats,
        seed=seed,
    )
    images.setflags(write=False)
    for rows in files.values():
        rows.setflags(write=False)
    return table, images, files


def things_table(demo: pd.DataFrame) -> pd.DataFrame:
    """A 25-column THINGS-like concept table for the demo stimuli (rows in the same order).

    Values are plausible strings, including an empty cell and the literal ``"NA"`` (which a
    reader must keep as text), a comma and a quote inside a definition.
    """
    n = len(demo)
    ids = demo["uniqueID"].astype(str).tolist()
    family = demo["family"].astype(str).tolist()
    word = [u.replace("_", " ") for u in ids]
    values: dict[str, list[str]] = {
        "Word": word,
        "Wordnet ID": [f"{f}.n.01" for f in family],
        "Wordnet ID2": [f"{f}.n.01" for f in family],
        "Wordnet ID3": ["" if i % 3 == 0 else f"{f}.n.02" for i, f in enumerate(family)],
        "Wordnet ID4": [f"{f}.n.01" for f in family],
        "uniqueID": ids,
        "Definition (from WordNet, Google, or Wikipedia)": [
            f'a crop of the "{f}" photograph, cut at random' for f in family
        ],
        "WordNet Synonyms": [f"{f}, {w}" for f, w in zip(family, word, strict=True)],
        "Example image": [f"{u}_01b.jpg" for u in ids],
        "Dominant Part of Speech": ["Noun"] * n,
        "Bing ID": [str(1000 + i) for i in range(n)],
        "Bigram": ["NA"] * n,
        "SUBTLEX freq": [str(10 * (i + 1)) for i in range(n)],
        "Word freq": [f"{0.5 + i / 100:.2f}" for i in range(n)],
        "Word freq (COCA)": [str(100 + 7 * i) for i in range(n)],
        "Concreteness (M)": [f"{4.5 + (i % 5) / 10:.2f}" for i in range(n)],
        "Concreteness (SD)": [f"{0.5 + (i % 7) / 20:.2f}" for i in range(n)],
        "Percent_known": ["1"] * n,
        "Top-down Category (WordNet)": ["photograph"] * n,
        "Top-down Category (manual selection)": [""] * n,
        "Bottom-up Category (Human Raters)": family,
        "WordNet Synset ID": [f"n{i:08d}" for i in range(n)],
        "Image source": demo["source"].astype(str).tolist(),
        "Family": family,
        "Crop box": demo["crop_box"].astype(str).tolist(),
    }
    return pd.DataFrame({c: values[c] for c in THINGS_COLUMNS}, dtype=str)


def make_things_folder(
    root: Path,
    *,
    n_families: int = 4,
    crops: int = 9,
    convention: str = "pair_pair_odd",
    shuffled: bool = False,
    layout: str = "things",
    file_format: str = "txt",
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 300,
    test_triplets: int = 300,
    repeats: int = 8,
    triplet_form: str = "triplets",
    choice_encoding: str = "position",
    subject_format: str = "int",
) -> dict[str, Any]:
    """Build a small THINGS-shaped folder at ``root`` from the demo machinery.

    Steps: :func:`~recovery_assets.sources.demo_stimuli.demo_stimuli` (64 px crops, ``n_families x
    crops`` concepts, seeded) -> :class:`~recovery_assets.sources.demo_observer.DemoObserver` ->
    :func:`~recovery_assets.sources.demo_folder.human_like_files` ->
    :func:`~recovery_assets.sources.demo_folder.write_things_folder`; then
    ``things_concepts.tsv`` is rewritten with 25 THINGS-like columns (:func:`things_table`), the
    judgement files are rewritten in ``convention`` and ``file_format`` and, for
    ``layout="flat"``, every image is moved to ``images/<id>.jpg``. The default (36 concepts, 3,000
    training triplets) is decided unambiguously as ``pair_pair_odd`` by the pixel reference; the
    generation is cached per parameter set, so building many folders is cheap (writing 36 JPEGs).

    Parameters
    ----------
    convention : ``"pair_pair_odd"`` (THINGS: odd one last) or ``"odd_pair_pair"`` (odd first).
    shuffled : permute the rows of the concept table (images stay with their ids) but leave the
        judgement indices as they were, so they refer to the wrong concepts (the convention is
        then ambiguous).
    layout : ``"things"`` (``images/<id>/<id>_01b.jpg``) or ``"flat"`` (``images/<id>.jpg``).
    file_format : ``"txt"`` (``triplets/<name>.txt``) or ``"npy"`` (``triplets/<name>.npy``).
    triplet_form : where and how the judgements are written: ``"triplets"`` (the files in
        ``triplets/``), ``"triplet_dataset"`` (the files in ``triplet_dataset/``, as in the
        THINGS-data release) or ``"release_table"`` (only the raw release table
        ``triplets_large_final_correctednc_correctedorder.csv`` in the root: tab-separated,
        columns :data:`RELEASE_WRITTEN_COLUMNS`, 1-based indices, in each row the odd one at a
        random position and the pair in its canonical order around it; the training and
        validation rows with ``noise_ceiling`` 0, test sets 1-3 with 1-3; the groups are
        interleaved at random, each in its set order, the training rows before the validation
        rows; ``convention`` and ``file_format`` are ignored).
    choice_encoding : for the table: ``"position"`` (``choice`` is the 1-based position of the
        odd one in the row) or ``"concept"`` (its 1-based concept index).
    subject_format : for the table: ``"int"`` (ids like ``1042``) or ``"str"`` (``"S1042"``).

    Returns
    -------
    dict with ``root``; ``ids`` (uniqueIDs in table order); ``images`` ((n, 64, 64, 3) uint8 demo
    images in table order); ``rows`` (name -> canonical ``[pair, pair, odd]`` rows, with the
    indices as written in the files); ``order`` (table row ``r`` holds demo concept
    ``order[r]``; the identity unless ``shuffled``); ``convention``; ``table`` (the 25-column
    table as written); ``concepts``, ``image_dir``, ``files`` (name -> path; for the table
    every set maps to the table); ``triplet_form``; ``set_rows`` (name -> rows of each set);
    for ``"release_table"`` also ``release_table`` (its path), ``choice_encoding``,
    ``group_rows`` (``trainset`` / ``testset1-3`` -> rows with noise_ceiling 0 / 1-3),
    ``release_rows`` (the same names -> expected canonical rows, file order: the training
    group is ``trainset`` then ``validationset``), ``subjects`` (the same names -> expected
    subject ids), ``release_frame`` (the table as written, a DataFrame).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if file_format not in FORMATS:
        raise ValueError(f"file_format must be one of {FORMATS}, got {file_format!r}")
    if triplet_form not in TRIPLET_FORMS:
        raise ValueError(f"triplet_form must be one of {TRIPLET_FORMS}, got {triplet_form!r}")
    if choice_encoding not in CHOICE_ENCODINGS:
        raise ValueError(f"choice_encoding must be one of {CHOICE_ENCODINGS}")
    if subject_format not in SUBJECT_FORMATS:
        raise ValueError(f"subject_format must be one of {SUBJECT_FORMATS}")
    root = Path(root)
    demo, images, canonical = _demo_data(
        n_families, crops, seed, n_train, n_val, test_triplets, repeats
    )
    paths = write_things_folder(root, demo[["uniqueID", "family", "source"]], images, canonical)

    table = things_table(demo)
    order = np.arange(len(table))
    if shuffled:
        order = np.random.default_rng([seed, 99]).permutation(len(table))
        table = table.iloc[order].reset_index(drop=True)
    table.to_csv(paths["concepts"], sep="\t", index=False)

    files: dict[str, Path] = {}
    for name, rows in canonical.items():
        stored = positions_to_human_rows(*human_rows_to_positions(rows), convention)
        txt = paths["triplets"] / f"{name}.txt"
        if file_format == "npy":
            txt.unlink()
            files[name] = paths["triplets"] / f"{name}.npy"
            np.save(files[name], stored)
        else:
            np.savetxt(txt, stored, fmt="%d", delimiter=" ")
            files[name] = txt

    release: dict[str, Any] = {}
    if triplet_form == "triplet_dataset":
        target = root / "triplet_dataset"
        paths["triplets"].rename(target)
        files = {name: target / path.name for name, path in files.items()}
    elif triplet_form == "release_table":
        shutil.rmtree(paths["triplets"])
        release = _write_release_table(
            root / RELEASE_TABLE, canonical, choice_encoding, subject_format, seed
        )
        files = {name: root / RELEASE_TABLE for name in canonical}

    ids = table["uniqueID"].tolist()
    image_dir = paths["images"]
    if layout == "flat":
        for uid in ids:
            folder = image_dir / uid
            (folder / f"{uid}_01b.jpg").rename(image_dir / f"{uid}.jpg")
            shutil.rmtree(folder)

    return {
        "root": root,
        "ids": ids,
        "images": np.ascontiguousarray(images[order]),
        "rows": {name: np.array(rows) for name, rows in canonical.items()},
        "order": order,
        "convention": convention,
        "table": table,
        "concepts": paths["concepts"],
        "image_dir": image_dir,
        "files": files,
        "triplet_form": triplet_form,
        "set_rows": {name: int(rows.shape[0]) for name, rows in canonical.items()},
        **release,
    }


def _write_release_table(
    path: Path,
    canonical: dict[str, np.ndarray],
    choice_encoding: str,
    subject_format: str,
    seed: int,
) -> dict[str, Any]:
    """Write the judgements as the THINGS-data release table; return what a test checks."""
    rng = np.random.default_rng([seed, 7])
    groups = {
        "trainset": np.concatenate([canonical["trainset"], canonical["validationset"]]),
        "testset1": canonical["testset1"],
        "testset2": canonical["testset2"],
        "testset3": canonical["testset3"],
    }
    value = {"trainset": 0, "testset1": 1, "testset2": 2, "testset3": 3}
    subjects: dict[str, np.ndarray] = {}
    for name, rows in groups.items():
        ids = 1000 + rng.integers(0, 150, rows.shape[0])
        subjects[name] = ids if subject_format == "int" else np.array([f"S{i}" for i in ids])
    # Interleave the groups at random, each keeping its own order.
    labels = np.concatenate([np.full(rows.shape[0], value[n]) for n, rows in groups.items()])
    labels = labels[rng.permutation(labels.size)]
    m = labels.size
    canon = np.empty((m, 3), dtype=np.int64)
    subject = np.empty(m, dtype=object)
    for name, rows in groups.items():
        where = np.flatnonzero(labels == value[name])
        canon[where] = rows
        subject[where] = subjects[name]
    # The odd one at a random position of the row, the pair in its order in the other two.
    odd_position = rng.integers(0, 3, m)
    others = np.array([[1, 2], [0, 2], [0, 1]])[odd_position]
    images = np.empty((m, 3), dtype=np.int64)
    rows_index = np.arange(m)
    images[rows_index, odd_position] = canon[:, 2] + 1
    images[rows_index, others[:, 0]] = canon[:, 0] + 1
    images[rows_index, others[:, 1]] = canon[:, 1] + 1
    choice = odd_position + 1 if choice_encoding == "position" else canon[:, 2] + 1
    frame = pd.DataFrame(
        {
            "image1": images[:, 0],
            "image2": images[:, 1],
            "image3": images[:, 2],
            "choice": choice,
            "RT": np.round(rng.uniform(0.5, 6.0, m), 3),
            "subject_id": subject if subject_format == "str" else subject.astype(np.int64),
            "noise_ceiling": labels,
        },
        columns=list(RELEASE_WRITTEN_COLUMNS),
    )
    frame.to_csv(path, sep="\t", index=False)
    return {
        "release_table": path,
        "choice_encoding": choice_encoding,
        "group_rows": {name: int(rows.shape[0]) for name, rows in groups.items()},
        "release_rows": {name: np.array(rows) for name, rows in groups.items()},
        "subjects": subjects,
        "release_frame": frame,
    }
