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
from recovery_assets.sources.demo import (
    DemoObserver,
    demo_stimuli,
    human_like_files,
    write_things_folder,
)

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
) -> dict[str, Any]:
    """Build a small THINGS-shaped folder at ``root`` from the demo machinery.

    Steps: :func:`~recovery_assets.sources.demo.demo_stimuli` (64 px crops, ``n_families x
    crops`` concepts, seeded) -> :class:`~recovery_assets.sources.demo.DemoObserver` ->
    :func:`~recovery_assets.sources.demo.human_like_files` ->
    :func:`~recovery_assets.sources.demo.write_things_folder`; then ``things_concepts.tsv`` is
    rewritten with 25 THINGS-like columns (:func:`things_table`), the judgement files are
    rewritten in ``convention`` and ``file_format`` and, for ``layout="flat"``, every image is
    moved to ``images/<id>.jpg``. The default (36 concepts, 3,000 training triplets) is decided
    unambiguously as ``pair_pair_odd`` by the pixel reference; the generation is cached per
    parameter set, so building many folders is cheap (writing 36 JPEGs).

    Parameters
    ----------
    convention : ``"pair_pair_odd"`` (THINGS: odd one last) or ``"odd_pair_pair"`` (odd first).
    shuffled : permute the rows of the concept table (images stay with their ids) but leave the
        judgement indices as they were, so they refer to the wrong concepts (the convention is
        then ambiguous).
    layout : ``"things"`` (``images/<id>/<id>_01b.jpg``) or ``"flat"`` (``images/<id>.jpg``).
    file_format : ``"txt"`` (``triplets/<name>.txt``) or ``"npy"`` (``triplets/<name>.npy``).

    Returns
    -------
    dict with ``root``; ``ids`` (uniqueIDs in table order); ``images`` ((n, 64, 64, 3) uint8 demo
    images in table order); ``rows`` (name -> canonical ``[pair, pair, odd]`` rows, with the
    indices as written in the files); ``order`` (table row ``r`` holds demo concept
    ``order[r]``; the identity unless ``shuffled``); ``convention``; ``table`` (the 25-column
    table as written); ``concepts``, ``image_dir``, ``files`` (name -> path).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if file_format not in FORMATS:
        raise ValueError(f"file_format must be one of {FORMATS}, got {file_format!r}")
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
    }
