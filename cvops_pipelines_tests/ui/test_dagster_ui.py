"""The Dagster UI in a real browser (Debian's chromium, driven by Playwright), on the instance the
README's demo leaves behind: what an operator sees after `./dev demo` and `./dev ui`.
Screenshots land in $CVOPS_TEST_ARTIFACTS (default: test-artifacts/ui/ in the repository)."""

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from cvops_pipelines_tests.conftest import free_port, wait_for_port

GROUPS = ("ingest", "curate", "build", "measure", "ship", "learn")
# Offline and quiet: no first-run UI, no update checks, no background connections to the internet
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


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
        os.killpg(proc.pid, signal.SIGINT)  # dagster dev stops its webserver and daemon
        try:
            proc.wait(timeout=60)
        finally:  # and runs the daemon started after ours (curate, retraining) stop with it
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


@pytest.mark.xdist_group("demo")
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
