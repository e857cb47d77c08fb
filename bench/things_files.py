"""THINGS-sized human files: how long reading, checking and canonicalising them takes.

Writes a THINGS-shaped folder with the real row counts (1,854 concepts; 4.2M training, 453k
validation triplets; three test sets of 1,000 triplets x 30 answers) in the THINGS convention,
answered from a hidden latent similarity, then times, side by side in one run:

- ``numpy.loadtxt`` of every file (the plain baseline: parsing only, no checks);
- ``load_human_judgements`` (parse + validate every row + sha256 + convention detection on every
  file + canonical rows + noise ceilings), and the peak memory it added;
- ``validate_things`` (the same checks as a report, what ``recovery validate-things`` runs).

Run: ``.venv/bin/python bench/things_files.py [folder]`` (default: a temporary folder).
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from problems import choices, features, latent_codes  # noqa: E402

from recovery_assets.core.generator import triplet_logits  # noqa: E402
from recovery_assets.core.triplets import positions_to_human_rows  # noqa: E402
from recovery_assets.sources.features import write_feature_file  # noqa: E402
from recovery_assets.sources.human import load_human_judgements  # noqa: E402
from recovery_assets.sources.validate_things import validate_things  # noqa: E402

N_CONCEPTS = 1854
SIZES = {"trainset": 4_200_000, "validationset": 453_000}
TEST_TRIPLETS, REPEATS = 1_000, 30


def _triplets(rng: np.random.Generator, m: int) -> np.ndarray:
    t = rng.integers(0, N_CONCEPTS, size=(m * 2, 3))
    t = t[(t[:, 0] != t[:, 1]) & (t[:, 1] != t[:, 2]) & (t[:, 0] != t[:, 2])]
    return t[:m]


def write_folder(root: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    latent = latent_codes(N_CONCEPTS)
    ids = [f"concept{i:04d}" for i in range(N_CONCEPTS)]
    root.mkdir(parents=True, exist_ok=True)
    (root / "things_concepts.tsv").write_text(
        "Word\tuniqueID\n" + "".join(f"w{i}\t{u}\n" for i, u in enumerate(ids))
    )
    sets = {name: _triplets(rng, m) for name, m in SIZES.items()}
    for t in (1, 2, 3):
        base = _triplets(rng, TEST_TRIPLETS)
        sets[f"testset{t}"] = np.repeat(base, REPEATS, axis=0)
    for s, (name, trip) in enumerate(sets.items()):
        rows = positions_to_human_rows(trip, choices(latent, trip, s), "pair_pair_odd")
        np.savetxt(root / f"{name}.txt", rows, fmt="%d")
    X = features(latent, 256, 0)
    write_feature_file(root / "reference.npy", X)
    return X


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp) / "THINGS"
        t = time.perf_counter()
        X = write_folder(root)
        rows = sum(SIZES.values()) + 3 * TEST_TRIPLETS * REPEATS
        print(f"wrote {rows:,} rows in {time.perf_counter() - t:.1f} s under {root}", flush=True)
        names = [*SIZES, "testset1", "testset2", "testset3"]

        t = time.perf_counter()
        for name in names:
            np.loadtxt(root / f"{name}.txt", dtype=np.int64)
        t_plain = time.perf_counter() - t

        tracemalloc.start()  # numpy reports its buffers to tracemalloc
        t = time.perf_counter()
        data = load_human_judgements(root, N_CONCEPTS, lambda trip: triplet_logits(X, trip))
        t_ours = time.perf_counter() - t
        added = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        kept = sum(r.nbytes for r in data.rows.values()) / 2**20
        print(
            f"numpy.loadtxt (parse only): {t_plain:6.1f} s | load_human_judgements (parse, "
            f"validate, sha256, convention, ceilings): {t_ours:6.1f} s | ratio "
            f"{t_ours / t_plain:4.2f} | convention {data.convention}, ceiling(testset2) "
            f"{data.noise_ceiling['testset2'].ceiling:.3f} | peak allocation {added:.0f} MB for "
            f"{kept:.0f} MB of canonical rows kept",
            flush=True,
        )
        t = time.perf_counter()
        report = validate_things(root, n_concepts=N_CONCEPTS, reference=X)
        t_val = time.perf_counter() - t
        print(
            f"validate_things (no images): {t_val:6.1f} s | ratio to loadtxt "
            f"{t_val / t_plain:4.2f} | problems: {report['problems']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
