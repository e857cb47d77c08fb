"""The Dagster UI on the tiny study: a real webserver, its GraphQL API and a headless browser.

The webserver loads the code location `recovery_assets.definitions` on the instance that the
`tiny_run` fixture recorded, exactly as `make ui` does for the demo study. The screenshot of the
global asset lineage is kept as a CI artifact in build/ui-asset-graph.png.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import spawn

from recovery_assets.study import load_study

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = ROOT / "build" / "ui-asset-graph.png"
GRAPH_PATH = "/asset-groups"  # "Global asset lineage" in dagster-webserver 1.13

STARTUP_TIMEOUT_S = 120
POLL_INTERVAL_S = 0.5
BROWSER_TIMEOUT_S = 120

UNPARTITIONED = [
    "stimuli",
    "human_judgements",
    "model_properties",
    "recovery_curve",
    "misidentification_regression",
    "identifiability",
    "open_set_recovery",
]
BY_MODEL = ["embeddings", "generator_probes"]
BY_JOB = ["synthetic_datasets", "candidate_scores"]  # MultiPartitions model x n_train
BY_SIZE = ["recovery_matrix"]
ALL_ASSETS = UNPARTITIONED + BY_MODEL + BY_JOB + BY_SIZE

WORKSPACE_QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
    ... on PythonError { message }
  }
}
"""

ASSETS_QUERY = """
{
  assetNodes {
    assetKey { path }
    groupName
    isPartitioned
    partitionKeysByDimension { name partitionKeys }
    partitionStats { numMaterialized numPartitions numFailed }
    assetMaterializations(limit: 1) { runId timestamp partition }
  }
}
"""

LATEST_BY_PARTITION_QUERY = """
query ($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $key) {
    __typename
    ... on AssetNode {
      latestMaterializationByPartition(partitions: $partitions) { runId partition timestamp }
    }
  }
}
"""

RUN_STATUS_QUERY = """
query ($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } }
}
"""


# ---------------------------------------------------------------------------- process helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session), then SIGKILL."""
    # SIGKILL always follows: the leader may be gone while children (the code server,
    # renderers) linger in the group.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if sig == signal.SIGTERM and proc.poll() is not None:
            continue
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def _run_bounded(cmd: list[str], timeout_s: float, log: Path, stdout: Path | None = None) -> int:
    """Run `cmd` in its own process group, stderr (and stdout unless `stdout` is given) to `log`;
    fail the test, killing the whole group, when it runs past `timeout_s`."""
    with open(log, "wb") as err, open(stdout or os.devnull, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out if stdout else err,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{Path(cmd[0]).name} ran past {timeout_s} s; log tail:\n{_tail(log)}")
        finally:
            _stop_group(proc, grace_s=5.0)


# ---------------------------------------------------------------------------- the webserver
@dataclass
class Webserver:
    url: str
    log: Path

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        r = requests.post(
            f"{self.url}/graphql",
            json={"query": query, "variables": variables or {}},
            timeout=timeout,
        )
        assert r.status_code == 200, f"GraphQL HTTP {r.status_code}: {r.text[:2000]}"
        body = r.json()
        assert not body.get("errors"), f"GraphQL errors: {body['errors']}"
        return body["data"]


def _location_loaded(url: str) -> tuple[bool, str]:
    """(loaded, why not). Raises AssertionError when the code location failed to load."""
    r = requests.post(f"{url}/graphql", json={"query": WORKSPACE_QUERY}, timeout=10)
    if r.status_code != 200:
        return False, f"HTTP {r.status_code}"
    ws = (r.json().get("data") or {}).get("workspaceOrError") or {}
    if ws.get("__typename") != "Workspace":
        return False, str(ws)
    entries = ws.get("locationEntries") or []
    if not entries:
        return False, "no code location yet"
    for e in entries:
        err = e.get("locationOrLoadError") or {}
        if err.get("__typename") == "PythonError":
            raise AssertionError(f"code location {e['name']} failed to load: {err['message']}")
        if e.get("loadStatus") != "LOADED" or err.get("__typename") != "RepositoryLocation":
            return False, f"{e['name']}: {e.get('loadStatus')}"
    return True, ""


@pytest.fixture(scope="module")
def webserver(tiny_run, tmp_path_factory) -> Iterator[Webserver]:
    exe = VENV_BIN / "dagster-webserver"
    assert exe.is_file(), f"{exe} is missing: install the project with its dev extras"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("webserver") / "webserver.log"
    env = tiny_run.env()
    cmd = [str(exe), "-h", "127.0.0.1", "-p", str(port), "-m", "recovery_assets.definitions"]
    proc = spawn(cmd, env, log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        why = "not started"
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dagster-webserver exited with {proc.returncode}:\n{_tail(log)}")
            try:
                ok, why = _location_loaded(url)
                if ok:
                    break
            except requests.RequestException as e:
                why = f"{type(e).__name__}"
            if time.monotonic() > deadline:
                pytest.fail(
                    f"dagster-webserver not ready after {STARTUP_TIMEOUT_S} s ({why}):\n"
                    f"{_tail(log)}"
                )
            time.sleep(POLL_INTERVAL_S)
        info = requests.get(f"{url}/server_info", timeout=10)
        assert info.status_code == 200, info.text
        yield Webserver(url=url, log=log)
    finally:
        _stop_group(proc)


# ---------------------------------------------------------------------------- GraphQL
def test_graphql_assets_partitions_and_materializations(webserver, tiny_run):
    study = load_study(tiny_run.study_path)
    models = list(study.model_names)
    sizes = [str(n) for n in study.sizes]

    # every key carries the study's name as its prefix (several studies share an instance)
    nodes = {}
    for n in webserver.graphql(ASSETS_QUERY)["assetNodes"]:
        prefix, *rest = n["assetKey"]["path"]
        assert prefix == study.name, n["assetKey"]
        nodes["/".join(rest)] = n
    missing = sorted(set(ALL_ASSETS) - set(nodes))
    assert not missing, f"assets missing from the code location: {missing}; have {sorted(nodes)}"

    expected_dims = {
        **{k: {} for k in UNPARTITIONED},
        **{k: {"default": models} for k in BY_MODEL},
        **{k: {"model": models, "n_train": sizes} for k in BY_JOB},
        **{k: {"default": sizes} for k in BY_SIZE},
    }
    for key, dims in expected_dims.items():
        node = nodes[key]
        got = {d["name"]: d["partitionKeys"] for d in node["partitionKeysByDimension"]}
        assert got == dims, f"{key}: partition keys {got}, expected {dims}"
        assert node["isPartitioned"] == bool(dims), key
        # tiny_run materialized every asset and every partition
        assert node["assetMaterializations"], f"{key}: no materialization recorded"
        if dims:
            stats = node["partitionStats"]
            n_parts = 1
            for keys in dims.values():
                n_parts *= len(keys)
            assert stats["numPartitions"] == n_parts, (key, stats)
            assert stats["numMaterialized"] == n_parts, (key, stats)
            assert stats["numFailed"] == 0, (key, stats)

    # the latest materialization of every recovery_matrix partition, from a successful run
    data = webserver.graphql(
        LATEST_BY_PARTITION_QUERY,
        {"key": {"path": [study.name, "recovery_matrix"]}, "partitions": sizes},
    )["assetNodeOrError"]
    assert data["__typename"] == "AssetNode", data
    latest = data["latestMaterializationByPartition"]
    assert len(latest) == len(sizes)
    for size, event in zip(sizes, latest, strict=True):
        assert event is not None, f"recovery_matrix[{size}]: no materialization"
        assert event["partition"] == size, event
        run = webserver.graphql(RUN_STATUS_QUERY, {"runId": event["runId"]})["runOrError"]
        assert run == {"__typename": "Run", "status": "SUCCESS"}, (size, run)


# ---------------------------------------------------------------------------- the browser
def _chromium(url: str, profile: Path, *output: str) -> list[str]:
    return [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--virtual-time-budget=20000",
        f"--user-data-dir={profile}",
        "--window-size=1600,1000",
        *output,
        url,
    ]


def test_asset_graph_screenshot(webserver, tmp_path):
    from PIL import Image

    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: the UI test needs Debian's chromium; "
            "run `apt-get install -y chromium`"
        )
    url = f"{webserver.url}{GRAPH_PATH}"

    # the rendered page is the asset graph (not an error page or a spinner): its groups show up
    groups = sorted({n["groupName"] for n in webserver.graphql(ASSETS_QUERY)["assetNodes"]})
    dom_log, dom = tmp_path / "dom.log", tmp_path / "dom.html"
    rc = _run_bounded(
        _chromium(url, tmp_path / "profile-dom", "--dump-dom"), BROWSER_TIMEOUT_S, dom_log, dom
    )
    assert rc == 0, f"chromium --dump-dom exited with {rc}:\n{_tail(dom_log)}"
    html = dom.read_text(errors="replace")
    assert "Global asset lineage" in html, f"not the asset lineage page:\n{html[:2000]}"
    absent = [g for g in groups if f">{g}<" not in html]
    assert not absent, f"asset groups not rendered in the graph: {absent}"

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    log = tmp_path / "screenshot.log"
    rc = _run_bounded(
        _chromium(url, tmp_path / "profile-shot", f"--screenshot={SCREENSHOT}"),
        BROWSER_TIMEOUT_S,
        log,
    )
    assert rc == 0, f"chromium --screenshot exited with {rc}:\n{_tail(log)}"
    assert SCREENSHOT.is_file(), f"no screenshot written:\n{_tail(log)}"

    raw = SCREENSHOT.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "the screenshot is not a PNG"
    assert len(raw) > 20_000, f"screenshot suspiciously small ({len(raw)} bytes)"
    with Image.open(SCREENSHOT) as img:
        img.load()
        assert img.size == (1600, 1000), img.size
        rgb = img.convert("RGB")
    colours = rgb.getcolors(maxcolors=100_000)  # None: more than that many colours
    assert colours is None or len(colours) > 16, f"screenshot nearly blank: {len(colours)} colours"
    lo, hi = rgb.convert("L").getextrema()
    assert hi - lo > 64, f"screenshot has no contrast (grey levels {lo}..{hi})"
