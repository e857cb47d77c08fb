"""The study's steps as plain functions over a Study and a Store (no Dagster here).

Each step reads what it needs from the store, calls the core, writes its arrays and tables, and
returns a small summary (metadata for the orchestration layer, values for its checks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from recovery_assets.core import geometry, regression
from recovery_assets.core.generator import fit_generator_probe, triplet_logits
from recovery_assets.core.identifiability import (
    human_winner_posterior,
    identifiability_table,
    never_won_table,
)
from recovery_assets.core.open_set import (
    nearest_neighbours,
    open_set_summary,
    open_set_winners,
    rsa_matrix,
)
from recovery_assets.core.probe import features_for
from recovery_assets.core.progress import Progress
from recovery_assets.core.recovery import recovery_metrics, select_and_score
from recovery_assets.core.scoring import score_candidates
from recovery_assets.core.simulation import (
    AnswerStats,
    GeneratorLogits,
    array_sha256,
    iter_synthetic_job,
)
from recovery_assets.core.triplets import human_rows_to_positions, triplet_keys
from recovery_assets.results import human_winner
from recovery_assets.storage import Store
from recovery_assets.study import Study, StudyError

Log = Callable[[str], None]
CRITERIA = ("accuracy", "nll")


def _dtype(study: Study) -> torch.dtype:
    return torch.float64 if study.probe_dtype == "float64" else torch.float32


# ----------------------------------------------------------------------------- stimuli
def build_stimuli(study: Study, store: Store, log: Log = print) -> dict:
    """The stimulus table (concept index order) and the stimulus images.

    Demo: seeded photo crops. THINGS: ``things_concepts.tsv`` (row order kept) and one image per
    concept; 64 px thumbnails are stored for the pixel reference and the UI, while timm networks
    later read the image files at their own resolution.
    """
    if study.kind == "things":
        return _build_things_stimuli(study, store, log)
    from recovery_assets.sources.demo_stimuli import demo_stimuli

    s = study.stimuli
    table, images = demo_stimuli(
        int(s.get("n_families", 16)),
        int(s.get("crops_per_family", 15)),
        size=int(s.get("size", 64)),
        seed=int(s.get("seed", 0)),
    )
    table = table.reset_index(drop=True)
    table.insert(0, "concept", np.arange(len(table)))
    store.save_npy(store.path("stimuli", "images.npy"), images)
    store.write_table("stimuli", table)
    return {"n_stimuli": len(table), "n_families": int(table["family"].nunique())}


def _needs_images(study: Study) -> bool:
    return study.convention_reference == "pixels" or any(m.source == "timm" for m in study.models)


def _build_things_stimuli(study: Study, store: Store, log: Log) -> dict:
    from recovery_assets.sources.things import (
        ThingsDataError,
        find_images,
        load_thumbnails,
        read_concepts,
        require_images,
    )

    root = study.things_root()
    concepts = read_concepts(root / "things_concepts.tsv", n_concepts=study.things["n_concepts"])
    ids = concepts["uniqueID"].astype(str).tolist()
    needed = _needs_images(study)
    try:
        paths, info = find_images(
            root, ids, images=study.things["images"], layout=study.things["image_layout"]
        )
    except ThingsDataError:
        if needed:
            raise
        # every model has precomputed features and a model decides the convention: nothing
        # reads an image, so a folder without them (licensed images kept elsewhere) is fine
        paths, info = [None] * len(ids), {"layout": None}
    table = pd.DataFrame({"concept": np.arange(len(ids)), "uniqueID": ids})
    if "Word" in concepts.columns:
        table["word"] = concepts["Word"].astype(str).to_numpy()
    table["image"] = [str(p) if p is not None else "" for p in paths]
    summary = {"n_stimuli": len(ids), "things_root": str(root), "image_layout": info["layout"]}
    if needed:
        files = require_images(paths, ids, info["dir"])
        log(f"reading {len(files)} THINGS images from {info['dir']} ({info['layout']} layout)")
        store.save_npy(store.path("stimuli", "images.npy"), load_thumbnails(files, size=64))
    else:
        summary["images"] = "not needed (every model has precomputed features)"
    store.write_table("stimuli", table)
    return summary


def load_stimuli(store: Store) -> tuple[pd.DataFrame, np.ndarray]:
    path = store.path("stimuli", "images.npy")
    if not path.is_file():
        raise FileNotFoundError(f"stimuli: {path} does not exist; materialize stimuli first")
    return store.read_table("stimuli"), np.load(path)


# ----------------------------------------------------------------------------- embeddings
def build_embeddings(study: Study, store: Store, model: str, device, log: Log) -> dict:
    """One model's (n x p) features: a timm network on the stimuli, or a precomputed file."""
    from recovery_assets.sources import timm_features

    entry = study.model(model)
    table = store.read_table("stimuli")
    n_params: int
    if entry.source == "features":
        from recovery_assets.sources.features import load_feature_file

        path = study.feature_file(entry)
        ids = table["uniqueID"].astype(str).tolist()
        names = study.file_names_file(entry)
        if names is not None:  # a thingsvision output: rows mapped by their image file names
            from recovery_assets.sources.thingsvision import load_thingsvision_features

            log(f"{model}: reading thingsvision features {path} (images listed in {names})")
            X, info = load_thingsvision_features(
                path, ids, file_names=names, concept_image=entry.concept_image
            )
        else:
            log(f"{model}: reading precomputed features {path}")
            X, info = load_feature_file(path, ids, key=entry.key)
        if entry.n_params is not None:
            n_params = entry.n_params
        else:
            n_params = timm_features.count_parameters(str(entry.n_params_like))
        info = {**info, "n_params": n_params}
    else:
        checkpoint = study.checkpoint_file(entry)  # a StudyError names the study file itself
        try:
            if entry.weights == "hf_cache":
                checkpoint = timm_features.hf_cache_checkpoint(str(entry.arch), entry.hf_repo)
            common = dict(
                seed=entry.seed,
                weights=entry.weights,
                checkpoint=checkpoint,
                layer=entry.layer,
                device=str(device),
                log=log,
            )
            if study.kind == "things":
                X, info = timm_features.extract_image_files(entry.arch, table["image"], **common)
            else:
                _, images = load_stimuli(store)
                X, info = timm_features.extract_features(entry.arch, images, **common)
        except ValueError as exc:  # unknown architecture/layer, weights missing or not fitting
            raise StudyError(f"{study.path}: model {model!r}: {exc}") from exc
        n_params = int(info["n_params"])
    if not np.isfinite(X).all():
        raise ValueError(f"embeddings[{model}]: the features hold NaN or inf")
    meta = {"model": model, **{k: v for k, v in info.items() if k not in ("mean", "std")}}
    store.save_arrays(store.embedding_path(model), {"features": X}, meta)
    row = {
        "model": model,
        "source": entry.source,
        "arch": entry.arch or entry.n_params_like,
        "weights": entry.weights if entry.source == "timm" else "precomputed",
        "seed": entry.seed,
        "n_params": int(n_params),
        "embedding_dim": int(X.shape[1]),
        "n_stimuli": int(X.shape[0]),
    }
    store.write_table("embeddings", pd.DataFrame([row]), {"model": model})
    return row


def load_features(store: Store, model: str) -> np.ndarray:
    arrays, _ = store.load_arrays(store.embedding_path(model), f"embeddings[{model}]")
    return arrays["features"]


# ----------------------------------------------------------------------------- human data
def build_human(study: Study, store: Store, log: Log) -> dict:
    """The human judgements, validated, convention-detected and canonicalised (docs/method.md §2).

    Demo: a simulated observer answers, its answers are written as a THINGS-shaped folder. THINGS:
    the user's folder. Both are read by the same loader.
    """
    from recovery_assets.core.pixels import pixel_reference
    from recovery_assets.sources.human import load_human_judgements

    table = store.read_table("stimuli")
    summary: dict = {}
    if study.kind == "things":
        folder = study.things_root()
    else:
        folder = store.path("human", "files")
        summary["observer_temperature"] = _write_demo_observer(study, store, folder, log)
    if study.convention_reference == "pixels":
        reference = pixel_reference(load_stimuli(store)[1])
    else:
        X = load_features(store, study.convention_reference)
        reference = lambda trip: triplet_logits(X, trip)  # noqa: E731
    log(f"reading the judgements in {folder} (convention reference: {study.convention_reference})")
    data = load_human_judgements(folder, len(table), reference)
    log(
        f"read {sum(data.n_rows.values())} judgements from the {data.source.replace('_', ' ')}: "
        + ", ".join(f"{k} {v}" for k, v in data.n_rows.items())
    )
    arrays = dict(data.rows)
    for name, ids in data.subjects.items():  # kept beside the rows ("<set>.subject_id")
        arrays[f"{name}{SUBJECT_SUFFIX}"] = _plain_ids(ids)
    store.save_arrays(store.path("human", "judgements.npz"), arrays, meta=data.metadata())
    rows = []
    for name, r in data.rows.items():
        det = data.detection.get(name)
        rows.append(
            {
                "file": name,
                "path": str(data.paths.get(name, "")),
                "source": data.source,
                "rows": int(len(r)),
                "sha256": data.sha256[name],
                "convention": data.convention,
                "choice_encoding": data.choice_encoding,
                "detected": getattr(det, "decision", None),
                "n_subjects": int(len(np.unique(data.subjects[name])))
                if name in data.subjects
                else None,
                "noise_ceiling": _ceiling(data.noise_ceiling.get(name)),
            }
        )
    store.write_table("human_judgements", pd.DataFrame(rows))
    store.write_table("human_triplets", _canonical_table(data))
    train_det = data.detection["trainset"]
    return {
        "source": data.source,
        "choice_encoding": data.choice_encoding,
        "convention": data.convention,
        "unambiguous": bool(train_det.unambiguous),
        "detection": train_det.to_dict(),
        "noise_ceiling": _ceiling(data.noise_ceiling["testset2"]),
        "rows": {k: int(len(v)) for k, v in data.rows.items()},
        **summary,
    }


SUBJECT_SUFFIX = ".subject_id"


def _plain_ids(ids: np.ndarray) -> np.ndarray:
    """Subject ids as an array np.load reads without pickle: int64 or fixed-width unicode."""
    ids = np.asarray(ids)
    return ids.astype(str) if ids.dtype == object else ids


def _canonical_table(data) -> pd.DataFrame:
    """Every judgement in canonical form, one row each, queryable (``human_triplets``): the set,
    the row within it, the pair (``i``, ``j``), the odd one out (``k``) and the subject id (the
    release table's; null for the five-file form)."""
    parts = []
    for name, r in data.rows.items():
        part = pd.DataFrame(
            {
                "set": name,
                "row": np.arange(len(r), dtype=np.int64),
                "i": r[:, 0],
                "j": r[:, 1],
                "k": r[:, 2],
            }
        )
        subjects = data.subjects.get(name)
        part["subject_id"] = (
            pd.Series(_plain_ids(subjects)).astype(str) if subjects is not None else None
        )
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    out["subject_id"] = out["subject_id"].astype("string")
    return out


def _write_demo_observer(study: Study, store: Store, folder, log: Log) -> float:
    """The demo's simulated person answers; its files form a THINGS-shaped folder."""
    from recovery_assets.sources.demo_folder import human_like_files, write_things_folder
    from recovery_assets.sources.demo_observer import DemoObserver

    table, images = load_stimuli(store)
    h = study.human
    seed = int(h.get("seed", 0))
    observer = DemoObserver(images, table["family"].to_numpy(), seed=seed)
    log(f"simulated observer: temperature {observer.temperature:.4g}")
    files = human_like_files(
        observer,
        n_train=int(h.get("n_train", 10_000)),
        n_val=int(h.get("n_val", 1_000)),
        n_test_triplets=int(h.get("test_triplets", 1_000)),
        repeats=int(h.get("repeats", 10)),
        seed=seed,
    )
    write_things_folder(folder, table[["uniqueID", "family", "source"]], images, files)
    return float(observer.temperature)


def _ceiling(value) -> float | None:
    """A noise ceiling as a float (the loader may give a NoiseCeiling(ceiling, n_triplets))."""
    if value is None:
        return None
    if isinstance(value, dict):
        return float(value["ceiling"])
    return float(getattr(value, "ceiling", value))


def load_human(store: Store) -> tuple[dict[str, np.ndarray], dict]:
    """The canonical rows per set (subject ids left out) and the provenance metadata."""
    arrays, meta = store.load_arrays(store.path("human", "judgements.npz"), "human_judgements")
    return {k: v for k, v in arrays.items() if not k.endswith(SUBJECT_SUFFIX)}, meta


def human_sets(rows: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Canonical [pair, pair, odd] rows -> (triplets, answer positions) per file."""
    return {k: human_rows_to_positions(v, "pair_pair_odd") for k, v in rows.items()}


# ----------------------------------------------------------------------------- generators
def generator_training_sets(study: Study, sets: dict) -> list[str]:
    """The human sets a generator is fitted on: those of ``generator.fit_on`` that the data has
    (the release table has no separate validation set: its training group holds both)."""
    return [name for name in study.generator_fit_on if name in sets]


def build_generator(study: Study, store: Store, model: str, device, log: Log) -> dict:
    """One model's generator probe (docs/method.md §5): lambda by cross-validation over the human
    training judgements (``generator.fit_on``), refit on all of them, T calibrated on test set 2;
    human accuracy and NLL are reported on test set 2 (at the calibrated T)."""
    rows, meta = load_human(store)
    sets = human_sets(rows)
    X = load_features(store, model)
    ceiling = _ceiling(meta["noise_ceiling"]["testset2"])
    target = ceiling if study.calibration_target == "noise_ceiling" else study.calibration_target
    fit_on = generator_training_sets(study, sets)
    train = tuple(np.concatenate([sets[name][i] for name in fit_on]) for i in (0, 1))
    log(f"{model}: fitting on {', '.join(fit_on)}: {len(train[0])} human judgements")
    held_out = [k for k in ("validationset", "testset1", "testset2", "testset3") if k not in fit_on]
    evaluation = {k: sets[k] for k in held_out if k in sets}
    g = fit_generator_probe(
        X,
        train,
        sets["testset2"][0],
        target,
        study.generator_lambdas,
        study.spec,
        evaluation=evaluation,
        cv_folds=study.generator_cv_folds,
        cv_seed=study.generator_cv_seed,
        device=device,
        dtype=_dtype(study),
        max_iter=study.max_iter,
        stop=study.probe_stop,
        log=log,
    )
    store.save_arrays(
        store.generator_path(model),
        {"W": g.W, "temperature": g.temperature, "lam": g.lam},
        meta={"model": model, "target": target, **g.metrics},
    )
    row = {
        "model": model,
        "lam": g.lam,
        "temperature": g.temperature,
        "target": target,
        "calibrated_mean_max_probability": g.metrics["calibrated_mean_max_probability"],
        "human_test_accuracy": g.metrics["testset2_accuracy"],
        "human_test_nll": g.metrics["testset2_nll"],
        "human_val_accuracy": g.metrics["cv_accuracy"],
        "fit_on": "+".join(fit_on),
        "n_human_train": int(len(train[0])),
        "converged": bool(g.metrics["converged"]),
    }
    store.write_table("generator_probes", pd.DataFrame([row]), {"model": model})
    cv = g.cv.assign(model=model)
    store.write_table("generator_cv", cv, {"model": model})
    return row


def load_generator(store: Store, model: str) -> tuple[np.ndarray, float]:
    arrays, _ = store.load_arrays(store.generator_path(model), f"generator_probes[{model}]")
    return arrays["W"], float(arrays["temperature"])


# ----------------------------------------------------------------------------- synthetic data
SPLITS = ("train", "val", "test")
RECIPE_FORMAT = "synthetic-recipe/1"


class SyntheticDataMismatch(ValueError):
    """Regenerated synthetic data differ from what ``synthetic_datasets`` recorded."""


def _job_name(model: str, n_train: int) -> str:
    return f"synthetic_datasets[{model}|{n_train}]"


def _synthetic_generator(
    study: Study, store: Store, model: str
) -> tuple[GeneratorLogits, float, np.ndarray, dict]:
    """What a job's data are drawn from: the generator's logits and T, the sorted distinct keys of
    every human triplet (the exclusion set), and the identity (checksums) of those inputs."""
    X = load_features(store, model)
    W, T = load_generator(store, model)
    rows, _ = load_human(store)
    n = int(X.shape[0])
    parts = [np.empty(0, np.int64)] + [triplet_keys(r, n) for r in rows.values()]
    keys = np.sort(np.concatenate(parts))
    keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if keys.size else keys  # sorted, distinct
    identity = {
        "generator_W_sha256": array_sha256(W),
        "generator_temperature": float(T),
        "features_sha256": array_sha256(X),
        "features_centred": bool(study.spec.family == "pca"),
        "human_exclusion_sha256": array_sha256(keys, "<i8"),
        "n_human_exclusion": int(keys.size),
        "n_concepts": n,
    }
    logits = GeneratorLogits(features_for(study.spec, X.astype(np.float64)), W)
    return logits, float(T), keys, identity


def build_synthetic(study: Study, store: Store, model: str, n_train: int, log: Log) -> dict:
    """The recipe of one job's synthetic data (docs/method.md §6), not its rows.

    Every simulation x fold x split is drawn (``iter_synthetic_job``, one fold in memory at a
    time) and recorded by its size and checksums; ``synthetic/<model>/n<N>.npz`` keeps the recipe:
    the concept folds (``s<s>_f<f>_<split>_concepts``, int16), per (simulation, fold, split) the row
    count and the SHA-256 of the triplets (int64) and answers (int8) (``split_*`` arrays), and in
    its metadata the identity of the inputs (the generator's W, T and features, the human
    exclusion set). ``load_synthetic`` regenerates the rows from it and checks them. The table
    ``synthetic_datasets`` has one row per (simulation, fold, split) with the counts, the
    self-agreement with the generator's argmax, its expectation and the two checksums.
    """
    logits, T, exclude, identity = _synthetic_generator(study, store, model)
    n = identity["n_concepts"]
    ctype = np.int16 if n <= np.iinfo(np.int16).max + 1 else np.int32
    arrays: dict[str, np.ndarray] = {}
    table = []
    total = AnswerStats()
    for s in range(study.simulations):
        for fold in iter_synthetic_job(n, n_train, s, logits, T, exclude, generator=model):
            f = fold["fold"]
            for c in SPLITS:
                arrays[f"s{s}_f{f}_{c}_concepts"] = fold["concepts"][c].astype(ctype)
            for split in SPLITS:
                t, a, st = (fold[split][k] for k in ("triplets", "answers", "stats"))
                total = total.add(st)
                table.append(
                    dict(
                        model=model,
                        n_train=n_train,
                        simulation=s,
                        fold=f,
                        split=split,
                        n_triplets=len(t),
                        self_agreement=st.hits / st.n,
                        expected_agreement=st.expected / st.n,
                        triplets_sha256=array_sha256(t, "<i8"),
                        answers_sha256=array_sha256(a, "i1"),
                        n_exact=st.n_exact,
                    )
                )
        log(f"simulation {s + 1}/{study.simulations}: 3 folds drawn and checksummed")
    df = pd.DataFrame(table)
    arrays["split_simulation"] = df["simulation"].to_numpy(np.int32)
    arrays["split_fold"] = df["fold"].to_numpy(np.int32)
    arrays["split_name"] = df["split"].to_numpy().astype("U5")
    arrays["split_n_triplets"] = df["n_triplets"].to_numpy(np.int64)
    arrays["split_triplets_sha256"] = df["triplets_sha256"].to_numpy().astype("U64")
    arrays["split_answers_sha256"] = df["answers_sha256"].to_numpy().astype("U64")
    arrays["split_n_exact"] = df["n_exact"].to_numpy(np.int64)
    meta = {
        "format": RECIPE_FORMAT,
        "model": model,
        "n_train": n_train,
        "simulations": study.simulations,
        **identity,
    }
    path = store.save_arrays(store.synthetic_path(model, n_train), arrays, meta=meta)
    store.write_table(
        "synthetic_datasets", df.drop(columns="n_exact"), {"model": model, "n_train": n_train}
    )
    z = (total.hits - total.expected) / np.sqrt(max(total.variance, 1e-12))
    return {
        "self_agreement": total.hits / total.n,
        "expected_agreement": total.expected / total.n,
        "z": float(z),
        "n_answers": int(total.n),
        "n_answers_decided_exactly": int(total.n_exact),
        "recipe_bytes": int(path.stat().st_size),
    }


def load_synthetic(
    study: Study,
    store: Store,
    model: str,
    n_train: int,
    simulations: int | Sequence[int] | None = None,
) -> list[list[dict]]:
    """Regenerate a job's synthetic data from the recipe ``build_synthetic`` stored, and verify it.

    The inputs are checked first (the generator's W, T and features, the human exclusion set must
    have the recorded checksums), then every fold of the simulations (an int k: ``0 .. k - 1``; a
    sequence: those indices, e.g. a batch of them to bound memory at large N; default: all of the
    study's) is drawn again with the same seeded functions and each split's row count and triplet
    / answer checksums are compared with the recorded ones, before anything is fitted. Returns per
    requested simulation, in order, the list of fold dicts (``fold``, ``concepts``, and per split
    ``triplets`` (int64) and ``answers`` (int8)).

    Raises
    ------
    FileNotFoundError
        If the job's recipe was never materialized.
    SyntheticDataMismatch
        If an input changed since the recipe was written, or the regenerated data of a
        (simulation, fold, split) differ from the recorded checksums (the code or a library that
        draws them changed): re-materialize ``synthetic_datasets`` for the job.
    """
    name = _job_name(model, n_train)
    again = f"re-materialize synthetic_datasets for partition {model}|{n_train}"
    arrays, meta = store.load_arrays(store.synthetic_path(model, n_train), name)
    if meta.get("format") != RECIPE_FORMAT:
        raise SyntheticDataMismatch(
            f"{name}: {store.synthetic_path(model, n_train)} is not a synthetic-data recipe of "
            f"format {RECIPE_FORMAT!r} (written by another version of recovery_assets): {again}"
        )
    if simulations is None or isinstance(simulations, (int, np.integer)):
        sims = list(range(study.simulations if simulations is None else int(simulations)))
    else:
        sims = [int(s) for s in simulations]
    if any(not 0 <= s < int(meta["simulations"]) for s in sims):
        raise ValueError(
            f"{name} has simulations 0 .. {int(meta['simulations']) - 1}; asked for {sims}"
        )
    logits, T, exclude, identity = _synthetic_generator(study, store, model)
    changed = [k for k, v in identity.items() if meta.get(k) != v]
    if changed:
        detail = ", ".join(f"{k}: recorded {meta.get(k)!r}, now {identity[k]!r}" for k in changed)
        raise SyntheticDataMismatch(
            f"{name}: the generator probe or its inputs changed since the synthetic data were "
            f"recorded ({detail}); the data would not be the recorded ones: {again}"
        )
    recorded = {
        (int(s), int(f), str(c)): (int(m), str(ts), str(as_))
        for s, f, c, m, ts, as_ in zip(
            arrays["split_simulation"],
            arrays["split_fold"],
            arrays["split_name"],
            arrays["split_n_triplets"],
            arrays["split_triplets_sha256"],
            arrays["split_answers_sha256"],
            strict=True,
        )
    }
    n = identity["n_concepts"]
    out = []
    for s in sims:
        folds = []
        for fold in iter_synthetic_job(n, n_train, s, logits, T, exclude, generator=model):
            f = fold["fold"]
            where = f"{name}: simulation {s}, fold {f}"
            for c in SPLITS:
                stored = arrays.get(f"s{s}_f{f}_{c}_concepts")
                if stored is None or not np.array_equal(stored, fold["concepts"][c]):
                    raise SyntheticDataMismatch(
                        f"{where}: the {c} concepts differ from the recorded concept folds (the "
                        f"fold-splitting code or scikit-learn changed): {again}"
                    )
            for split in SPLITS:
                t, a = fold[split]["triplets"], fold[split]["answers"]
                got = (len(t), array_sha256(t, "<i8"), array_sha256(a, "i1"))
                want = recorded.get((s, f, split))
                if got != want:
                    what = (
                        "row count"
                        if want is None or got[0] != want[0]
                        else "triplets"
                        if got[1] != want[1]
                        else "answers"
                    )
                    raise SyntheticDataMismatch(
                        f"{where}, {split} split: the regenerated {what} differ from the recorded "
                        f"checksums (recorded {want}, regenerated {got}). The generator probe, "
                        f"its inputs or the code that draws the data changed since "
                        f"synthetic_datasets was materialized (rounding cannot cause this: the "
                        f"answers follow the generator's fixed-order float64 reference logits "
                        f"on every machine and thread count): {again}"
                    )
                fold[split] = {"triplets": t, "answers": a}
            folds.append(fold)
        out.append(folds)
    return out


# ----------------------------------------------------------------------------- candidates
def synthetic_bytes(n_train: int, n_folds: int = 3) -> int:
    """Memory of one simulation's regenerated rows: per fold N training and 2 x round(N/8)
    evaluation triplets, each 3 int64 concepts and an int8 answer (about 400 MB at N = 4.2M)."""
    per_row = 3 * 8 + 1
    return n_folds * per_row * (int(n_train) + 2 * round(int(n_train) / 8))


def score_groups(
    simulations: int, n_train: int, budget: float | None, n_folds: int = 3
) -> list[list[int]]:
    """The simulations of a job in groups whose regenerated rows take at most half of ``budget``
    bytes (the other half is the fitter's); all in one group without a budget."""
    sims = list(range(simulations))
    if budget is None or not sims:
        return [sims] if sims else []
    size = int(max(1, min(simulations, (budget / 2) // synthetic_bytes(n_train, n_folds))))
    return [sims[i : i + size] for i in range(0, simulations, size)]


def _memory_budget(fraction: float) -> float | None:
    """``fraction`` of the memory available now (Linux MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return fraction * int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def build_scores(
    study: Study,
    store: Store,
    model: str,
    n_train: int,
    device,
    log: Log,
    *,
    memory_budget: float | None = 0.5,
    group_size: int | None = None,
    progress_every: float = 30.0,
) -> dict:
    """The candidate fits and selections of one job (docs/method.md §7), in bounded memory.

    The simulations are regenerated (``load_synthetic``, verified against the recipe) and fitted
    in groups: a group's rows take at most half of the budget (``memory_budget`` of the
    available memory, like ``fit_probes``; None: no bound) and the fitter gets the rest
    (``score_candidates`` fits its problems in chunks when they would not fit in it). At small N
    the whole job is one group and one batched call, as before; at large N (about 400 MB of rows
    per simulation at N = 4.2M) the groups and chunks keep the memory bounded, and every fit is
    typically a batch of its own there on the CPU (then grouping changes nothing that is fitted).
    ``group_size`` fixes the simulations per group instead (tests: on the tiny study one
    simulation per group gives the same table as all at once). Progress lines (done / total,
    rate, time left) go to ``log`` at least every ``progress_every`` seconds while data are
    regenerated and probes fitted.
    """
    features = {m: load_features(store, m) for m in study.model_names}
    lam_grid = study.candidate_lambdas if study.spec.fitted else [0.0]
    n_sims = study.simulations
    budget = _memory_budget(memory_budget) if memory_budget is not None else None
    if group_size is not None:
        groups = [
            list(range(i, min(i + int(group_size), n_sims)))
            for i in range(0, n_sims, int(group_size))
        ]
    else:
        groups = score_groups(n_sims, n_train, budget)
    fit_budget = None
    if budget is not None:
        fit_budget = budget - max(len(g) for g in groups) * synthetic_bytes(n_train)
    job = f"{model}|{n_train}"
    log(
        f"fitting {len(features)} candidates x {len(lam_grid)} lambdas x 3 folds x {n_sims} "
        f"simulations, in {len(groups)} group(s) of at most {max(len(g) for g in groups)} "
        f"simulation(s)"
        + (f" (memory budget {budget / 2**30:.1f} GiB)" if budget is not None else "")
    )
    regen = Progress(
        n_sims,
        log,
        progress_every,
        label=f"{job}: regenerating synthetic data",
        unit="simulations",
        step_unit="simulations",
    )
    fitting = Progress(
        n_sims * 3 * len(features) * len(lam_grid),
        log,
        progress_every,
        label=f"{job}: fitting candidates ({study.spec.name}/{study.spec.penalty})",
    )
    parts = []
    for group in groups:
        sims = {}
        with regen.ticking():
            for s in group:  # one simulation at a time: a progress line between them
                sims[s] = load_synthetic(study, store, model, n_train, [s])[0]
                regen.advance(1, 1)
        parts.append(
            score_candidates(
                features,
                sims,
                study.candidate_lambdas,
                study.spec,
                generator=model,
                device=device,
                dtype=_dtype(study),
                max_iter=study.max_iter,
                stop=study.probe_stop,
                log=log,
                memory_budget=fit_budget,
                progress=fitting,
            )
        )
        del sims
    fits = pd.concat(parts, ignore_index=True).assign(n_train=n_train)
    selections = []
    winners = {}
    for crit in CRITERIA:
        cand, win = select_and_score(fits, study.model_names, criterion=crit)
        selections.append(cand.assign(criterion=crit, n_train=n_train))
        winners[crit] = win
    part = {"model": model, "n_train": n_train}
    store.write_table("candidate_fits", fits, part)
    store.write_table("candidate_selection", pd.concat(selections, ignore_index=True), part)
    win = winners["accuracy"]
    return {
        "n_fits": len(fits),
        "recovered": int(win["recovered"].sum()),
        "simulations": len(win),
        "winners": win["winner"].value_counts().to_dict(),
        "not_converged": int((~fits["converged"]).sum()),
    }


# ----------------------------------------------------------------------------- recovery
def load_selection(study: Study, store: Store, n_train: int) -> pd.DataFrame:
    """Every generator's candidate selection table at one training size."""
    return pd.concat(
        [
            store.read_table("candidate_selection", {"model": m, "n_train": n_train})
            for m in study.model_names
        ],
        ignore_index=True,
    )


def build_recovery(study: Study, store: Store, n_train: int) -> dict:
    order = study.model_names
    summary, confusion, per_model = [], [], []
    out = {}
    selection = load_selection(study, store, n_train)
    for crit in CRITERIA:
        sel = selection[selection["criterion"] == crit]
        winners = sel[sel["is_winner"]].rename(columns={"candidate": "winner"})
        true = sel[sel["candidate"] == sel["generator"]][["simulation", "generator", "rank"]]
        winners = winners[["simulation", "generator", "winner"]].merge(
            true.rename(columns={"rank": "true_rank"}), on=["simulation", "generator"]
        )
        m = recovery_metrics(winners, order, n_total=len(order) * study.simulations)
        summary.append(
            dict(
                n_train=n_train,
                criterion=crit,
                accuracy=m.accuracy,
                ci_low=m.ci_low,
                ci_high=m.ci_high,
                chance=m.chance,
                n_correct=m.n_correct,
                n_total=m.n_total,
                mean_true_rank=m.mean_true_rank,
                mrr=m.mrr,
            )
        )
        conf = m.confusion.stack().rename("count").reset_index()
        confusion.append(conf.assign(n_train=n_train, criterion=crit))
        per_model.append(
            m.per_model.reset_index()
            .rename(columns={"index": "model"})
            .assign(n_train=n_train, criterion=crit)
        )
        out[crit] = m
    part = {"n_train": n_train}
    store.write_table("recovery_summary", pd.DataFrame(summary), part)
    store.write_table("recovery_confusion", pd.concat(confusion, ignore_index=True), part)
    store.write_table("recovery_per_model", pd.concat(per_model, ignore_index=True), part)
    return out


# ----------------------------------------------------------------------------- properties
def probe_inputs(study: Study, store: Store, model: str) -> tuple[np.ndarray, np.ndarray]:
    """A model's features as its probes see them (``features_for``: ``pca:k`` centres them) and
    its human-fitted generator probe W, both float64: Z = X W^T is its human-fitted
    representation (docs/method.md §4)."""
    X = features_for(study.spec, load_features(store, model).astype(np.float64))
    W, _ = load_generator(store, model)
    return X, W.astype(np.float64)


def build_properties(study: Study, store: Store, log: Log) -> pd.DataFrame:
    rows = []
    emb = store.read_table("embeddings").set_index("model")
    for m in study.model_names:
        X, W = probe_inputs(study, store, m)
        props = geometry.geometry_properties(X, W)
        rows.append(
            dict(
                model=m,
                n_params=int(emb.loc[m, "n_params"]),
                embedding_dim=int(X.shape[1]),
                **props,
            )
        )
        log(
            f"{m}: shift {props['alignment_shift']:.3f}, ED {props['ed_before']:.1f} -> "
            f"{props['ed_after']:.1f}"
        )
    df = pd.DataFrame(rows)
    store.write_table("model_properties", df)
    return df


def build_regression(study: Study, store: Store) -> tuple[pd.DataFrame, dict]:
    N = study.largest_size
    sel = load_selection(study, store, N)
    sel = sel[sel["criterion"] == "accuracy"][["simulation", "generator", "candidate", "score"]]
    props = store.read_table("model_properties").set_index("model")
    # §8's predictors, in order of the paper's interest; with few models the design cannot hold
    # all ten (each side has at most n_models - 1 free directions), so trailing ones are dropped
    # until the design has full rank, and the dropped ones are reported.
    order = ["alignment_shift", "ed_after", "ed_before", "embedding_dim", "n_params"]
    predictors = [p for p in order if props[p].std() > 0]
    dropped = [p for p in order if p not in predictors]
    while True:
        frame = regression.build_regression_frame(sel, props, predictors=predictors)
        try:
            coefs, meta = regression.fit_misidentification_regression(
                frame,
                n_boot=int(study.regression.get("n_boot", 10_000)),
                seed=int(study.regression.get("seed", 0)),
            )
            break
        except ValueError as exc:
            if "rank-deficient" not in str(exc) or len(predictors) == 1:
                raise
            dropped.insert(0, predictors.pop())
    meta = {**meta, "predictors": predictors, "dropped_predictors": dropped}
    store.write_table("regression_frame", frame.assign(n_train=N))
    store.write_table("misidentification_regression", coefs.assign(n_train=N))
    return coefs, meta


# ----------------------------------------------------------------------------- analyses
# docs/analyses.md §1 and §2, on every size of the study; the intervals' Monte Carlo draws and
# seed are the documented defaults (the same seed at every size: a size's rows do not depend on
# the others)
POSTERIOR_DRAWS = 4000
POSTERIOR_SEED = 0


def _text(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Text columns as pandas strings: a table with no rows keeps its column types in Parquet."""
    return df.astype({c: "string" for c in columns})


def load_confusion(study: Study, store: Store) -> pd.DataFrame:
    """The recovery matrices (``recovery_confusion``) of every size of the study."""
    return pd.concat(
        [store.read_table("recovery_confusion", {"n_train": n}) for n in study.sizes],
        ignore_index=True,
    )


def build_identifiability(study: Study, store: Store) -> dict:
    """What a win means (docs/analyses.md §1): P(generator | winner) with Monte Carlo intervals
    at every size and criterion (table ``identifiability``), the winners without a posterior
    (``never_won``), and the posterior of the model that wins on the human data, per size
    (``human_winner_posterior``, criterion accuracy: the human winner is the generator probe with
    the highest human test accuracy)."""
    order = study.model_names
    confusion = load_confusion(study, store)
    table = identifiability_table(confusion, order, n_draws=POSTERIOR_DRAWS, seed=POSTERIOR_SEED)
    never = never_won_table(confusion, order)
    generators = store.read_table("generator_probes")
    winner = human_winner(generators, order)
    human = human_winner_posterior(table, winner, criterion="accuracy")
    accuracy = generators.set_index("model").loc[winner, "human_test_accuracy"]
    store.write_table("identifiability", _text(table, ("criterion", "winner", "generator")))
    store.write_table("never_won", _text(never, ("criterion", "winner")))
    per_n = human.per_n.assign(human_test_accuracy=float(accuracy))
    store.write_table("human_winner_posterior", _text(per_n, ("criterion", "winner", "generator")))
    n = study.largest_size
    true = human.true_model_posterior().set_index("n_train")
    # P(the human winner generated the data | it won) at the largest N; None: it never won there
    at = true.loc[n] if n in true.index else None
    never_won = never.groupby(["n_train", "criterion"])["winner"].agg(list)
    summary = {
        "human_winner": winner,
        "human_winner_test_accuracy": float(accuracy),
        "largest_n": n,
        "p_true_given_human_win": None if at is None else float(at["posterior"]),
        "ci_95": None if at is None else [float(at["ci_low"]), float(at["ci_high"])],
        "human_winner_never_won_at": human.never_won_at,
        "never_won": {f"{k[0]}/{k[1]}": v for k, v in never_won.items()} or "none",
    }
    return {"table": table, "never_won": never, "human": human, "summary": summary}


def build_open_set(study: Study, store: Store, log: Log) -> dict:
    """Open-set recovery (docs/analyses.md §2): every job's winner with its generator removed
    from the candidates (the stored candidate selections, no refit; table
    ``open_set_recovery``), the RSA similarity of the human-fitted representations Z = X W^T
    (``rsa_similarity``) and, per model, whether its data go to its nearest neighbour and whose
    data it attracts (``open_set_summary``)."""
    order = study.model_names
    selection = pd.concat([load_selection(study, store, n) for n in study.sizes])
    winners = open_set_winners(selection, order)
    representations = {
        m: geometry.transformed_features(*probe_inputs(study, store, m)) for m in order
    }
    similarity = rsa_matrix(representations, order)
    nearest = nearest_neighbours(similarity, order)
    summary = open_set_summary(winners, nearest)
    for row in nearest.itertuples():
        log(f"{row.model}: nearest neighbour {row.nearest} (RSA {row.similarity:.3f})")
    pairs = similarity.rename_axis(index="model", columns="other").stack()
    pairs = pairs.rename("similarity").reset_index()
    store.write_table(
        "open_set_recovery",
        _text(winners, ("criterion", "generator", "open_winner", "closed_winner")),
    )
    store.write_table("open_set_summary", _text(summary, ("criterion", "model", "nearest")))
    store.write_table("rsa_similarity", _text(pairs, ("model", "other")))
    return {"winners": winners, "nearest": nearest, "summary": summary}
