"""The README's first command and what comes after it: `cvops demo` runs two turns of the loop
(its output checked here), then the Dagster UI is opened on the instance it left behind, in a real
browser (Debian's chromium driven by Playwright): what an operator sees after `./dev demo` and
`./dev ui`. Screenshots land in $CVOPS_TEST_ARTIFACTS (default: test-artifacts/ui/).
One module, so pytest-xdist runs both on the worker that ran the demo (`--dist loadscope`)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from cvops_pipelines_tests.conftest import free_port, wait_for_port

CVOPS = str(Path(sys.executable).parent / "cvops")
GROUPS = ("ingest", "curate", "build", "measure", "ship", "learn")
# Offline and quiet: no first-run UI, no update checks, no background connections to the internet
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def test_demo_runs_two_turns_of_the_loop_in_a_persistent_instance(demo_run):
    tmp_path, env, proc, timings = (demo_run[k] for k in ("root", "env", "proc", "timings"))
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "ingest drop initial: OK" in out and "raw_images_contract passed" in out
    assert "== curate: OK" in out and "dataset_version_leakage passed" in out
    assert "Traceback" not in out + proc.stderr
    versions = {p.name for p in (tmp_path / "home/datasets").iterdir()}
    assert len(versions) == 2 and all(f"dataset: {v}" in out for v in versions)
    # turn 1: first model, released, fleet feedback, SLA and drift fire, queue answered
    assert out.count("== train + evaluate + export: OK") == 2
    assert "retraining_sensor -> train_job (first model)" in out
    assert "feedback_sensor -> feedback_job" in out and "0 batches quarantined" in out
    assert "check  : accuracy_sla FAILED" in out and "check  : no_output_drift FAILED" in out
    assert "new_drop_sensor -> ingest_job" in out
    # turn 2: the alerts + the new labels retrain; the canary is promoted and beats turn 1
    assert "retraining_sensor -> train_job (accuracy_sla and no_output_drift failed" in out
    assert "verdict: promote: canary is not worse than stable" in out
    assert "turn-2 champion beats turn 1 on the production stream" in out
    stable = json.loads((tmp_path / "home/releases/channels/stable.json").read_text())
    assert stable["release"].startswith("rel-2-")
    assert oct((tmp_path / "home/keys/release_signing.key").stat().st_mode & 0o777) == "0o600"
    (annotated,) = [p for p in (tmp_path / "home/tables/annotations").iterdir()
                    if p.name.startswith("annotated-")]
    labels = pd.read_parquet(annotated)
    assert len(labels) > 50 and set(labels["origin"]) == {"annotation_queue"}
    pool = pd.read_parquet(tmp_path / "home/tables/labeled_pool/all.parquet")
    assert {"drop", "feedback", "annotation_queue"} <= set(pool["origin"])
    assert (tmp_path / "dagster/dagster.yaml").exists()  # runs land in a real instance
    assert "telemetry" in (tmp_path / "dagster/dagster.yaml").read_text()
    report = json.loads(timings.read_text())
    assert report["dagster_runs"] >= 12 and 0 < report["orchestration_share"] < 1

    status = subprocess.run([CVOPS, "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"stable    : {stable['release']}" in status.stdout and "canary    : none" in status.stdout
    assert "champion  : cvops-classifier v2" in status.stdout
    assert "SLA " in status.stdout and "queued images still to annotate" in status.stdout

    drops = subprocess.run([CVOPS, "drops"], env=env, capture_output=True, text=True, check=True)
    assert "initial\tcomplete" in drops.stdout


def chromium() -> str:
    path = os.environ.get("CVOPS_CHROMIUM") or shutil.which("chromium") or \
        shutil.which("chromium-browser")
    if not path:
        pytest.fail("no chromium: `apt-get install chromium` (./dev test does this as root) or "
                    "set CVOPS_CHROMIUM to a Chromium/Chrome binary")
    return path


@pytest.fixture
def shots(repo_root):
    folder = Path(os.environ.get("CVOPS_TEST_ARTIFACTS") or repo_root / "test-artifacts") / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def dagster_ui(demo_run, repo_root):
    """`dagster dev` (webserver + daemon) on loopback over the demo's instance and store."""
    assert demo_run["proc"].returncode == 0, demo_run["proc"].stdout[-2000:]
    port = free_port()
    log = demo_run["root"] / "dagster_dev.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "dev", "-w",
                             "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                            cwd=repo_root, env=demo_run["env"], start_new_session=True,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=120, proc=proc, log=log)
        base = f"http://127.0.0.1:{port}"
        urllib.request.urlopen(f"{base}/server_info", timeout=30).read()
        yield base
    finally:
        # a graceful stop first; what still runs then (a webserver slow to close, runs the daemon
        # started after ours: curate, retraining) is killed with the process group. How fast
        # dagster dev shuts down is not what this module tests.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture
def page(dagster_ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        context.set_default_timeout(60_000)
        # the first-visit "join the community" dialog, dismissed as a returning visitor would
        context.add_init_script("window.localStorage.setItem('communityNux', '1')")
        yield context.new_page()
        browser.close()


def wait_for_ui_run(instance: DagsterInstance, partition: str, after: float, timeout: float = 300):
    """The run the UI launched (tagged from_ui), once it has finished."""
    from datetime import datetime, timezone

    runs_filter = RunsFilter(tags={"dagster/from_ui": "true", "dagster/partition": partition},
                             created_after=datetime.fromtimestamp(after, timezone.utc))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs(runs_filter, limit=1)
        if runs and runs[0].is_finished:
            return runs[0]
        time.sleep(2)
    raise TimeoutError(f"the run launched from the UI did not finish in {timeout}s")


def test_operator_sees_the_loop_and_launches_ingest_from_the_ui(demo_run, dagster_ui, page,
                                                                  shots, monkeypatch):
    from playwright.sync_api import expect

    # the asset graph: every stage of the loop is a group, and the graph renders them all
    page.goto(f"{dagster_ui}/asset-groups")
    for group in GROUPS:
        expect(page.locator(f'[data-tooltip="{group}"]')).to_be_visible()
    page.screenshot(path=shots / "asset_graph.png")

    # a metadata plot: the evaluation's confusion matrix, rendered as an image the browser decoded
    page.goto(f"{dagster_ui}/assets/model_evaluation")
    page.locator("tr", has_text="confusion_matrix").get_by_text("[Show Markdown]").click()
    image = page.get_by_role("dialog").locator("img[alt='confusion matrix']")
    expect(image).to_be_visible()
    assert image.evaluate("img => img.naturalWidth") > 200
    page.screenshot(path=shots / "confusion_matrix.png")

    # a check result: the gate's blocking check passed for the promoted challenger
    page.goto(f"{dagster_ui}/assets/model_evaluation?view=checks")
    expect(page.get_by_text("This is a blocking asset check.")).to_be_visible()
    expect(page.get_by_text("Passed", exact=True).first).to_be_visible()
    expect(page.get_by_text("challenger is not worse than champion")).to_be_visible()
    page.screenshot(path=shots / "gate_check.png")

    # launch the ingest stage from the UI for the demo's initial drop, and watch it succeed
    page.goto(f"{dagster_ui}/locations/cvops/asset-groups/ingest")
    started = time.time()
    page.get_by_role("button", name="Materialize all").click()
    dialog = page.get_by_role("dialog").first
    dialog.get_by_text("Select a partition or create one").click()
    page.locator("[role=dialog]").last.get_by_text("initial", exact=True).first.click()
    page.keyboard.press("Escape")  # closes the partition picker, not the launch dialog
    page.screenshot(path=shots / "launch_ingest.png")
    dialog.get_by_role("button", name="Launch 1 run").click()

    monkeypatch.setenv("DAGSTER_HOME", demo_run["env"]["DAGSTER_HOME"])  # its yaml reads it
    instance = DagsterInstance.get()
    run = wait_for_ui_run(instance, "initial", started - 1)
    assert run.status == DagsterRunStatus.SUCCESS
    assert run.tags["dagster/partition"] == "initial"
    assert {k.to_user_string() for k in run.asset_selection} == {"raw_images", "annotations"}
    page.goto(f"{dagster_ui}/runs/{run.run_id}")
    expect(page.get_by_text("Success", exact=True).first).to_be_visible()
    expect(page.get_by_text("raw_images_contract").first).to_be_visible()
    page.screenshot(path=shots / "ingest_run.png")
