"""Each asset's code version hashes the code it runs and the settings it reads
(``recovery_assets.defs.versions``): a change marks exactly those assets stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from recovery_assets.defs import build_definitions, versions
from recovery_assets.study import load_study

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "studies" / "tiny.yaml"
INPUTS = ("stimuli", "embeddings", "human_judgements")


def _variant(tmp_path: Path, old: str, new: str) -> Path:
    """The tiny study with one setting changed (same name: the same assets)."""
    text = TINY.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / f"tiny_{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(text.replace(old, new))
    return path


def _asset_versions(defs: dg.Definitions) -> dict[str, str]:
    graph = defs.resolve_asset_graph()
    return {k.path[-1]: graph.get(k).code_version for k in graph.get_all_asset_keys()}


@pytest.fixture(scope="module")
def tiny():
    return load_study(TINY)


def test_every_asset_has_its_own_version_and_dagster_gets_it(tiny):
    ours = versions.code_versions(tiny)
    assert set(ours) == set(versions.VERSIONS)
    assert all(len(v) == 16 and int(v, 16) >= 0 for v in ours.values())
    assert len(set(ours.values())) == len(ours)  # not one fixed string for everything
    assert _asset_versions(build_definitions(tiny)) == ours


def test_versions_are_the_same_in_two_builds_and_two_processes(tiny):
    first = _asset_versions(build_definitions(tiny))
    assert _asset_versions(build_definitions(load_study(TINY))) == first
    code = (
        "import json; from recovery_assets.defs.versions import code_versions; "
        "from recovery_assets.study import load_study; "
        f"print(json.dumps(code_versions(load_study({str(TINY)!r}))))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == first


def test_a_probe_setting_changes_the_fitting_assets_only(tmp_path, tiny):
    before = versions.code_versions(tiny)
    after = versions.code_versions(load_study(_variant(tmp_path, "max_iter: 500", "max_iter: 400")))
    changed = {a for a in before if before[a] != after[a]}
    assert changed == {"generator_probes", "candidate_scores"}
    # the probe family also decides the features the synthetic data and properties use
    family = load_study(_variant(tmp_path, "family: full", "family: diagonal"))
    after = versions.code_versions(family)
    changed = {a for a in before if before[a] != after[a]}
    assert changed == {"generator_probes", "synthetic_datasets", "candidate_scores"} | {
        "model_properties",
        "open_set_recovery",
    }
    assert not changed & set(INPUTS)


def test_input_settings_change_their_own_assets(tmp_path, tiny):
    before = versions.code_versions(tiny)
    cases = {
        ("seed: 0}\nmodels:", "seed: 1}\nmodels:"): {"stimuli"},
        ("weights: random, seed: 1}", "weights: random, seed: 2}"): {"embeddings"},
        ("repeats: 10", "repeats: 5"): {"human_judgements"},
        ("simulations: 2", "simulations: 3"): {
            "synthetic_datasets",
            "candidate_scores",
            "recovery_matrix",
        },
        ("n_boot: 200", "n_boot: 100"): {"misidentification_regression"},
        # the per-size assets only gain a partition; the summaries read every size
        ("sizes: [50, 100]", "sizes: [50, 100, 200]"): {
            "recovery_curve",
            "misidentification_regression",  # at the largest size
            "identifiability",
            "open_set_recovery",
        },
    }
    for (old, new), expected in cases.items():
        after = versions.code_versions(load_study(_variant(tmp_path, old, new)))
        assert {a for a in before if before[a] != after[a]} == expected, old


def test_a_module_change_reaches_the_assets_that_import_it(monkeypatch, tiny):
    """core.optim (the probe fitter) is imported by the fitting steps' modules, not by the
    stimuli's or the regression's: a change to its source changes only their versions."""
    before = versions.code_versions(tiny)
    real = versions._source

    def edited(name, path):
        source = real(name, path)
        if name == "recovery_assets.core.optim":
            return versions._Source("edited", source.ours, source.others)
        return source

    monkeypatch.setattr(versions, "_source", edited)
    after = versions.code_versions(tiny)
    changed = {a for a in before if before[a] != after[a]}
    assert {"generator_probes", "candidate_scores", "model_properties"} <= changed
    assert not changed & {"stimuli", "embeddings", "misidentification_regression"}


def test_the_table_resolves_for_every_kind_of_study(tiny):
    """Every module of the table exists (a renamed module fails here, not at load time)."""
    things = load_study(ROOT / "studies" / "things.yaml")
    for study in (tiny, things):
        for asset, entry in versions.VERSIONS.items():
            files = versions._closure(versions._expand(entry.modules, study))
            assert files, asset
    assert versions.code_versions(things) != versions.code_versions(tiny)
    demo_stimuli = versions._closure(versions._expand(versions.VERSIONS["stimuli"].modules, tiny))
    assert "recovery_assets.core.probe" not in demo_stimuli
    fitting = versions._closure(versions.VERSIONS["generator_probes"].modules)
    assert {"recovery_assets.core.optim", "recovery_assets.core.calibration"} <= set(fitting)
