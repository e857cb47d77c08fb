"""The ``recovery`` command line."""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path

import click
import numpy as np

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input: reported as one line on stderr with exit code 2, nothing written."""


def _fail(command: str, message: str) -> None:
    click.echo(f"recovery {command}: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


class ChoiceOf(click.Choice):
    """``click.Choice`` over a tuple constant of the package, looked up when the option is parsed
    or its help shown: the fitter's modules import torch, which ``recovery list``, ``sql`` and the
    other light commands should not wait for."""

    def __init__(self, module: str, name: str) -> None:
        self._constant = (module, name)
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        module, name = self._constant
        return tuple(getattr(importlib.import_module(module), name))


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses nan and inf (nan passes every bound check)."""

    def convert(self, value, param, ctx) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return number


#: An input file: click checks that it exists, is a file and is readable (exit 2 otherwise).
INPUT_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def load_npy(path: str | Path, option: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the same user error
        raise InputError(f"{option} {path}: not a readable .npy array ({exc})") from None


def validate_probe_inputs(X, T, A, paths: dict[str, str]) -> None:
    """Shapes, dtypes, ranges and finiteness of a probe problem, the messages naming the options
    and files (``check_probe_inputs``)."""
    from recovery_assets.core.probe.inputs import ProbeInputError, check_probe_inputs

    names = tuple(f"--{k} {paths[k]}" for k in ("features", "triplets", "answers"))
    try:
        check_probe_inputs(X, T, A, names)
    except ProbeInputError as exc:
        raise InputError(str(exc)) from None


def save_npy_atomic(path: str, array: np.ndarray) -> None:
    """Write an .npy file so that it either appears whole or not at all."""
    from recovery_assets.atomic import atomic_write  # not storage: no DuckDB/pandas import

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_write(path, write)


@click.group()
def main() -> None:
    """recovery-assets: model-recovery studies of representational alignment."""


@main.command("fit-probe")
@click.option(
    "--features", "features", type=INPUT_FILE, required=True, help="X.npy: float array (n, p)"
)
@click.option(
    "--triplets", "triplets", type=INPUT_FILE, required=True, help="T.npy: int array (m, 3)"
)
@click.option(
    "--answers",
    "answers",
    type=INPUT_FILE,
    required=True,
    help="A.npy: int array (m,) in {0,1,2}",
)
@click.option("--family", default="full", show_default=True, help="full|diagonal|rank:k|...")
@click.option(
    "--penalty",
    type=ChoiceOf("recovery_assets.core.probe", "PENALTIES"),
    default="shrinkage",
    show_default=True,
)
@click.option(
    "--lam",
    type=FiniteFloatRange(min=0.0),
    default=1e-4,
    show_default=True,
    help="lambda, a finite number >= 0",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto")
@click.option(
    "--stop",
    type=ChoiceOf("recovery_assets.core.optim", "STOP_RULES"),
    default="optimum",
    show_default=True,
    help="stopping rule: run to the optimum, or stop where the published fits' L-BFGS settings do",
)
@click.option(
    "--max-iter", type=click.IntRange(min=1), default=1000, show_default=True,
    help="at most this many iterations",
)  # fmt: skip
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="where to write W.npy (float32)",
)
def fit_probe(
    features, triplets, answers, family, penalty, lam, device, stop, max_iter, out
) -> None:
    """Fit one probe (docs/method.md §4) from the identity and write the full transform W.

    Prints one JSON line: objective, train_accuracy, iterations, converged, seconds.
    """
    import torch

    from recovery_assets.core.probe import (
        FitProblem,
        ProbeSpec,
        fit_probes,
        probe_metrics,
        resolve_device,
    )

    try:
        spec = ProbeSpec.parse(family, penalty)
        try:
            dev = resolve_device(device)
            torch.empty(0, device=dev)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"--device {device}: not usable here ({exc})") from None
        paths = {"features": features, "triplets": triplets, "answers": answers}
        X = load_npy(features, "--features")
        T = load_npy(triplets, "--triplets")
        A = load_npy(answers, "--answers")
        validate_probe_inputs(X, T, A, paths)
        if spec.family == "pca" and spec.k > min(X.shape):
            raise InputError(f"--family {family}: k exceeds the rank bound {min(X.shape)}")
        if spec.family == "rank" and spec.k > X.shape[1]:
            raise InputError(f"--family {family}: k exceeds the embedding dimension {X.shape[1]}")
    except (InputError, ValueError) as exc:
        _fail("fit-probe", str(exc))

    t0 = time.perf_counter()
    try:
        problem = FitProblem(X, T, A, [lam])
        fit = fit_probes([problem], spec, device=dev, stop=stop, max_iter=max_iter)[0][0]
    except ValueError as exc:  # e.g. all-zero training features
        _fail("fit-probe", f"--features {features}: {exc}")
    W = fit.matrix()
    seconds = time.perf_counter() - t0
    metrics = probe_metrics(W, X, T, A, lam, spec)
    if not math.isfinite(metrics["objective"]):
        _fail(
            "fit-probe",
            f"--features {features}: the objective is not finite at the fitted W (features too "
            "large for float32 similarities?); nothing written",
        )
    try:
        save_npy_atomic(out, W)
    except OSError as exc:
        _fail("fit-probe", f"--out {out}: cannot write ({exc})")
    record = {
        "objective": metrics["objective"],
        "train_accuracy": metrics["accuracy"],
        "iterations": fit.iterations,
        "seconds": round(seconds, 4),
        "converged": fit.converged,
        "stop": stop,
        "family": spec.name,
        "penalty": spec.penalty,
        "lam": lam,
        "device": str(dev),
        "shape": list(W.shape),
    }
    click.echo(json.dumps(record))
    # Everything is written. Leave the objects of this one-shot process (torch's thousands of
    # module objects above all) out of the interpreter's last garbage collections: the process
    # then ends about 0.25 s after its JSON line instead of 0.6-0.8 s (docs/performance.md).
    gc.freeze()


def input_error(exc: BaseException) -> str | None:
    """The message of the bad-input error (a malformed file, a study setting, data that do not
    match) or full disk behind a failed step, or None when the failure is something else."""
    from recovery_assets.errors import input_errors

    kinds = input_errors()
    seen = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, kinds):
            return str(error).strip()
        error = getattr(error, "user_exception", None) or error.__cause__
    return None


def _open_study(study_path: str | None):
    from recovery_assets.study import StudyError, load_study

    try:
        return load_study(study_path)
    except StudyError as exc:
        _fail("study", str(exc))


STUDY_HELP = "a study file, or the name of a shipped study (default: $RECOVERY_STUDY, else demo)"


@main.command("study")
@click.option("--study", "study_path", default=None, help=STUDY_HELP)
@click.option(
    "--dask-scheduler",
    default=None,
    metavar="ADDRESS",
    help="run the steps on this Dask cluster's workers (tcp://host:8786)",
)
@click.option(
    "--dask-workers",
    type=click.IntRange(min=1),
    default=None,
    metavar="K",
    help="start a local Dask cluster of K worker processes for the steps",
)
@click.option(
    "--max-concurrent-runs",
    type=click.IntRange(min=1),
    default=None,
    help="run up to this many partitions of a stage at once, each in its own process "
    "(default with Dask: 4)",
)
@click.option(
    "--force", is_flag=True, help="materialize every partition again, even those up to date"
)
def study_cmd(
    study_path: str | None,
    dask_scheduler: str | None,
    dask_workers: int | None,
    max_concurrent_runs: int | None,
    force: bool,
) -> None:
    """Materialize the whole study into the Dagster instance and DuckDB.

    The instance is $DAGSTER_HOME (default: ./dagster_home, created with the project's settings);
    the results go to $RECOVERY_DATA/<study> (default: ./data/<study>). Without options every
    step runs in this one process, one partition after another; with them, each stage's
    partitions run as concurrent runs, their steps on Dask when asked.

    It resumes: runs of this machine whose process died are marked failed (their pool slots
    freed), and partitions already materialized and up to date are skipped (--force redoes
    them). SIGTERM or SIGINT stops it within seconds, the current run marked failed.
    """
    import logging

    import dagster as dg
    from dagster._core.errors import DagsterExecutionInterruptedError

    from recovery_assets.defs.assets import TERMINAL_ENV
    from recovery_assets.errors import StopSignal, stop_on_signals, stop_requested
    from recovery_assets.instance import ensure_home
    from recovery_assets.liveness import free_dead_runs, stop_own_runs
    from recovery_assets.run import RunFailed, materialize_study, run_study

    study = _open_study(study_path)
    if dask_scheduler and dask_workers:
        _fail("study", "give --dask-scheduler or --dask-workers, not both")
    if dask_scheduler is not None and "://" not in dask_scheduler:
        _fail(
            "study", f"--dask-scheduler {dask_scheduler}: expected an address like tcp://host:8786"
        )
    from recovery_assets.storage import DiskFullError

    try:  # the instance's dagster.yaml is written like any other file: a full disk is one line
        ensure_home()
    except DiskFullError as exc:
        _fail("study", str(exc))
    # the terminal gets one line per step; the runs' full logs are in the instance (make ui), and
    # a failure is reported below in one line
    logging.getLogger("dagster").setLevel(logging.CRITICAL)
    with dg.DagsterInstance.get() as instance:
        free_dead_runs(instance, echo=click.echo)
    os.environ[TERMINAL_ENV] = "1"  # the steps' progress lines reach this terminal too

    stop_on_signals()
    cluster = None
    try:
        if dask_scheduler or dask_workers or max_concurrent_runs:
            dask = None
            if dask_scheduler:
                dask = {"cluster": {"existing": {"address": dask_scheduler}}}
            elif dask_workers:
                from distributed import LocalCluster

                resources = {"GPU": 1} if study.gpu_resource else None
                cluster = LocalCluster(
                    n_workers=dask_workers,
                    threads_per_worker=1,
                    processes=True,
                    resources=resources,
                    dashboard_address=None,
                )
                dask = {"cluster": {"existing": {"address": cluster.scheduler_address}}}
                click.echo(
                    f"local Dask cluster: {dask_workers} workers at {cluster.scheduler_address}"
                )
            store = run_study(
                study,
                echo=click.echo,
                dask=dask,
                max_concurrent_runs=max_concurrent_runs or 4,
                log_level="CRITICAL",
                force=force,
            )
        else:
            with dg.DagsterInstance.get() as instance:
                store = materialize_study(
                    study, instance, echo=click.echo, log_level="CRITICAL", force=force
                )
    except (StopSignal, KeyboardInterrupt, DagsterExecutionInterruptedError, Exception) as exc:
        signalled = (StopSignal, KeyboardInterrupt, DagsterExecutionInterruptedError)
        why = stop_requested() or (
            str(exc) or "SIGTERM or SIGINT" if isinstance(exc, signalled) else None
        )
        if why is not None:  # a stop (also one that failed the step it met, not retried)
            with dg.DagsterInstance.get() as instance:
                stop_own_runs(instance, f"stopped by {why}")
                free_dead_runs(instance, echo=lambda s: None)  # the run processes it stopped
            click.echo(
                f"recovery study: stopped by {why}; the current run is marked failed; run it "
                "again to resume",
                err=True,
            )
            sys.exit(130)
        if isinstance(exc, RunFailed):
            _fail("study", str(exc))
        problem = input_error(exc) if isinstance(exc, Exception) else None
        if problem is None:
            raise  # a bug
        _fail("study", problem)
    finally:
        if cluster is not None:
            cluster.close()
    click.echo(f"\nrecovery curve ({store.db_path}):")
    _print_sql(store.db_path, _recipe("recovery_curve"))
    click.echo(f"\nplots: {store.path('plots')}/")
    for png in sorted(store.path("plots").glob("*.png")):
        click.echo(f"  {png.name}")


def _print_sql(db: Path, sql_file: Path) -> None:
    import duckdb

    if not db.is_file():
        _fail("sql", f"{db}: no DuckDB database yet; materialize the study first (make demo)")
    if not sql_file.is_file():
        _fail("sql", f"{sql_file}: no such file")
    con = duckdb.connect(str(db), read_only=True)
    try:
        df = con.execute(sql_file.read_text()).fetchdf()
    except duckdb.Error as exc:
        _fail("sql", f"{sql_file}: {exc}")
    finally:
        con.close()
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50):
        click.echo(df.to_string(index=False) if len(df) else "(no rows)")


def _recipe(name_or_path: str) -> Path:
    """A SQL file by path, else a shipped recipe by name."""
    from recovery_assets import shipped

    path = Path(os.path.expanduser(name_or_path))
    if path.is_file():
        return path
    found = shipped.find_recipe(name_or_path)
    if found is None:
        _fail(
            "sql",
            f"{name_or_path}: no such SQL file and no shipped recipe of that name (recipes: "
            f"{', '.join(shipped.recipe_names())}; see `recovery list`)",
        )
    return found


@main.command("sql")
@click.argument("recipe")
@click.option("--study", "study_path", default=None, help=STUDY_HELP)
def sql_cmd(recipe: str, study_path: str | None) -> None:
    """Run a shipped SQL recipe (by name: recovery_curve, confusion ...) or a .sql file against
    the study's DuckDB views and print the result as a table."""
    from recovery_assets.storage import Store, data_root

    study = _open_study(study_path)
    _print_sql(Store(data_root(study)).db_path, _recipe(recipe))


@main.command("advise")
@click.option("--study", "study_path", default=None, help=STUDY_HELP)
@click.option(
    "--target",
    type=FiniteFloatRange(min=0.0, max=1.0, min_open=True, max_open=True),
    required=True,
    help="the recovery accuracy wanted, above chance and below 1",
)
@click.option(
    "--criterion",
    type=ChoiceOf("recovery_assets.pipeline", "CRITERIA"),
    default="accuracy",
    show_default=True,
    help="the selection rule whose recovery accuracy is meant",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def advise_cmd(study_path: str | None, target: float, criterion: str, as_json: bool) -> None:
    """How many training triplets reach a target recovery accuracy (docs/analyses.md §3).

    Fits the saturating recovery curve to the study's recovery results (recovery_summary: every
    size materialized so far, at least 3) and prints the smallest N at which the lower 95% bound
    of the fitted curve reaches TARGET, or that the target is out of reach, with the plateau and
    its interval. Exit code 2 and one line when the study has no recovery results yet.
    """
    from recovery_assets.results import NoResults, study_advice
    from recovery_assets.storage import Store, data_root

    study = _open_study(study_path)
    db = Store(data_root(study)).db_path
    try:
        advice = study_advice(study, db, target, criterion)
    except (NoResults, ValueError) as exc:
        _fail("advise", f"study {study.name}: {exc}")
    if as_json:
        record = {"study": study.name, "criterion": criterion, "database": str(db)}
        click.echo(json.dumps({**record, **advice.as_dict()}))
        return
    p = advice.params
    sizes = ", ".join(f"{n:,}" for n in advice.curve.n_train)
    click.echo(f"study {study.name}, selected by {criterion}, N = {sizes} ({db})")
    click.echo(
        f"fitted curve: plateau {advice.plateau:.3f} ({100 * advice.level:g}% CI "
        f"[{advice.plateau_ci[0]:.3f}, {advice.plateau_ci[1]:.3f}]), half-way from chance "
        f"({p['chance']:.3f}) at N = {p['n_mid']:,.0f}, width {p['c']:.2f} in log N"
    )
    click.echo(advice.message)


def _png(ctx, param, value: Path | None) -> Path | None:
    if value is not None and value.suffix.lower() != ".png":
        raise click.BadParameter(f"{value}: the plot is a PNG file; name it *.png")
    return value


@main.command("compare")
@click.option(
    "--study",
    "study_paths",
    multiple=True,
    required=True,
    help="a study file or shipped study's name; give --study once per study",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    callback=_png,
    help="write the trade-off plot to this PNG file",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def compare_cmd(study_paths: tuple[str, ...], out: Path | None, as_json: bool) -> None:
    """Fit to people against recovery, one point per study (e.g. one probe family each).

    For each study: the human test accuracy of its winner on the human data (its best generator
    probe on test set 2) and its recovery accuracy (selected by accuracy) at its largest N, with
    the exact 95% interval, read from the study's DuckDB file. --out draws them as the trade-off
    plot. Exit code 2 and one line when a study has no results yet.
    """
    from recovery_assets.results import NoResults, tradeoff_point
    from recovery_assets.storage import Store, data_root

    points, seen = [], set()
    for path in study_paths:
        study = _open_study(path)
        if study.name in seen:
            _fail("compare", f"--study {path}: study {study.name} is given twice")
        seen.add(study.name)
        try:
            points.append(tradeoff_point(study, Store(data_root(study)).db_path))
        except (NoResults, ValueError) as exc:
            _fail("compare", f"study {study.name}: {exc}")
    import pandas as pd

    if out is not None:
        from recovery_assets import plots

        try:
            plots.accuracy_tradeoff(pd.DataFrame(points), out)
        except OSError as exc:
            _fail("compare", f"--out {out}: cannot write ({exc})")
    if as_json:
        click.echo(json.dumps({"studies": points, "plot": str(out) if out else None}))
        return
    columns = ["study", "family", "penalty", "human_winner", "human_test_accuracy", "n_train"]
    table = pd.DataFrame(points)[[*columns, "recovery_accuracy", "ci_low", "ci_high"]]
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        click.echo(table.to_string(index=False))
    if out is not None:
        click.echo(f"plot: {out}")


@main.command("list")
@click.argument("what", type=click.Choice(["all", "studies", "recipes"]), default="all")
def list_cmd(what: str) -> None:
    """List the shipped studies and SQL recipes (use their names with --study and `sql`)."""
    from recovery_assets import shipped

    sections = []
    if what in ("all", "studies"):
        sections.append(("studies", shipped.studies_dir(), shipped.study_names(), ".yaml"))
    if what in ("all", "recipes"):
        sections.append(("recipes", shipped.sql_dir(), shipped.recipe_names(), ".sql"))
    for title, folder, names, suffix in sections:
        click.echo(f"{title} ({folder}):")
        width = max((len(n) for n in names), default=0)
        for name in names:
            click.echo(f"  {name:<{width}}  {shipped.first_line(folder / (name + suffix))}")


@main.command("instance")
def instance_cmd() -> None:
    """Create (or migrate) the Dagster instance once: $DAGSTER_HOME, default ./dagster_home.

    Safe to run from several processes at once (a file lock); run it before starting several
    `dagster` commands on a new instance.
    """
    from recovery_assets.instance import ensure_home

    click.echo(str(ensure_home()))


@main.command("estimate")
@click.option("--study", "study_path", default=None, help=STUDY_HELP)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="the device to time the calibration fits on (cpu, cuda, cuda:N)",
)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def estimate_cmd(study_path: str | None, device: str, as_json: bool) -> None:
    """What the study will cost: partitions, fits, triplets, device-hours, peak memory, disk.

    Counts come from the study file; the time per fit is measured on a short calibration sample
    of real fits on the device (a minute or two).
    """
    import torch

    from recovery_assets.core.probe import resolve_device
    from recovery_assets.estimate import estimate_study, format_estimate

    study = _open_study(study_path)
    try:
        dev = resolve_device(device)
        torch.empty(0, device=dev)
    except Exception as exc:  # noqa: BLE001
        _fail("estimate", f"--device {device}: not usable here ({exc})")
    log = (lambda s: None) if as_json else (lambda s: click.echo(f"  {s}", err=True))
    est = estimate_study(study, dev, log=log)
    click.echo(json.dumps(est, indent=2) if as_json else format_estimate(est))


@main.command("validate-things")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--n-concepts",
    type=click.IntRange(min=3),  # a triplet needs 3 concepts
    default=None,
    help="expected concepts (THINGS: 1854)",
)
@click.option("--images", default=None, help="image folder under FOLDER (default: images/ ...)")
@click.option(
    "--layout",
    type=ChoiceOf("recovery_assets.sources.things", "IMAGE_LAYOUTS"),
    default="auto",
    show_default=True,
    help="things: <id>/<id>_NNb.jpg; flat: <id>.jpg",
)
@click.option(
    "--features",
    "features",
    type=INPUT_FILE,
    default=None,
    help="a precomputed feature file (or a thingsvision output with its file_names.txt) whose "
    "zero-shot similarity checks the convention (default: 8 x 8 pixel similarity of the images; "
    "with features, the images are optional)",
)
def validate_things_cmd(folder, n_concepts, images, layout, features) -> None:
    """Check a THINGS folder without running anything heavy; print one JSON object.

    Exit code 0 when the folder is usable, 2 otherwise (the problems are listed in the JSON).
    """
    from recovery_assets.sources.features import FeatureFileError, load_feature_file
    from recovery_assets.sources.things import CONCEPTS_FILE, ThingsDataError, read_concepts
    from recovery_assets.sources.validate_things import validate_things as validate

    reference, problems = None, []
    if features is not None:
        try:
            ids = read_concepts(folder / CONCEPTS_FILE)["uniqueID"].astype(str).tolist()
            names = features.parent / "file_names.txt"
            if features.suffix.lower() in (".hdf5", ".h5") or names.is_file():
                from recovery_assets.sources.thingsvision import load_thingsvision_features

                reference, _ = load_thingsvision_features(features, ids, file_names=names)
            else:
                reference, _ = load_feature_file(features, ids)
        except (ThingsDataError, FeatureFileError) as exc:
            problems.append(f"--features {features} not used: {exc}")
    report = validate(
        folder, n_concepts=n_concepts, images=images, layout=layout, reference=reference
    )
    if features is not None:
        report["reference_file"] = str(features)
    if problems:
        report["problems"] = problems + list(report["problems"])
        report["usable"] = False
    click.echo(json.dumps(report, indent=2))
    sys.exit(0 if report["usable"] else EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
