"""`cvops-demo --task detection`: one turn of the loop on boxes, hands-off, checked from its
output and its report; then the Dagster webserver is opened on the instance it left behind, in a
real browser, and the evaluation's detection metadata is what an operator sees (the mAP table,
the precision-recall plot, example boxes). Screenshots land in $CVOPS_TEST_ARTIFACTS."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvops_pipelines_tests.helpers import dagster_server, shows_markdown_image
from cvops_pipelines_tests.test_demo import CHROMIUM_ARGS, chromium

SIZES = ["--scenes", "240", "--frames", "90", "--epochs", "2"]  # small: the loop, not the mAP

# end to end: the demo itself, then the checks; a slow CI machine gets 20 minutes, not 10
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def detection_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("detection_demo")
    env = {**os.environ, "CVOPS_HOME": str(root / "home"), "DAGSTER_HOME": str(root / "dagster")}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("CVOPS_ONTOLOGY", None)  # the demo picks the scenes ontology itself
    report = root / "report.json"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "cvops-demo"), "--task", "detection", *SIZES]
        + ["--report", str(report)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return {"root": root, "env": env, "proc": proc, "report": report}


def test_one_hands_off_turn_on_boxes(detection_demo):
    proc = detection_demo["proc"]
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    report = json.loads(detection_demo["report"].read_text())
    assert report["ok"] and all(report["steps"].values()), report["steps"]
    for stage in ("ingest", "curate", "train", "release", "feedback", "canary", "learn"):
        assert report["steps"][stage], stage
    assert "without objects (kept as negatives)" in out
    assert "dataset_version_boxes ok" in out
    assert "cvops-detector v1" in out and "challenger_not_worse_than_champion: passed" in out
    assert "0 batches quarantined" in out
    # the reviewed frames are back in the pool as box labels: the loop closed
    reviewed = int(out.split(" reviewed, ")[0].rsplit(", ", 1)[1].split()[0])
    grown = out.split("== curate again: the pool now holds ")[1]
    assert f"({reviewed} reviewed field frames as box labels)" in grown
    # the canary decided as its own rule says: promote once enough reviewed records arrived
    canary = out.split("== canary: ")[1].split("\n")[0]
    assert canary.startswith("promote" if reviewed >= 50 else "wait"), canary


@pytest.fixture
def webserver(detection_demo, repo_root):
    assert detection_demo["proc"].returncode == 0
    # workspace.yaml as it is: the detection loop is its own code location beside the default
    log = detection_demo["root"] / "webserver.log"
    with dagster_server("dagster-webserver", repo_root, detection_demo["env"], log) as base:
        yield base


def test_the_ui_shows_the_detector_s_evaluation(webserver, repo_root):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("CVOPS_TEST_ARTIFACTS") or repo_root / "test-artifacts") / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        context.set_default_timeout(60_000)
        context.add_init_script("window.localStorage.setItem('communityNux', '1')")
        page = context.new_page()
        page.goto(f"{webserver}/assets/detection/model_evaluation")
        expect(page.locator("tr", has_text="map_50").first).to_be_visible()
        for label, alt in (
            ("precision_recall", "precision-recall at IoU 0.5"),
            ("examples", "true boxes (green) and predicted (red)"),
        ):
            shows_markdown_image(page, label, alt, shots / f"detection_{label}.png")
        per_class = page.locator("tr", has_text="per_class").first
        per_class.scroll_into_view_if_needed()
        expect(per_class.get_by_text("test_objects").first).to_be_visible()
        page.screenshot(path=shots / "detection_per_class.png")
        browser.close()
