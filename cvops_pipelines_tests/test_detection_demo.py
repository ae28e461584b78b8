"""`cvops-demo --task detection --annotator labelstudio`: two turns of the loop on boxes,
hands-off, with the queue answered in a real Label Studio (the classification demo keeps the
file path), checked from its output and its report (invariants: every stage ran, each decision
agrees with the figures it printed; never which model wins); then the Dagster webserver is
opened on the instance it left behind, in a real browser, and the evaluation's detection
metadata is what an operator sees (the mAP table, the precision-recall plot, example boxes).
Screenshots land in $CVOPS_TEST_ARTIFACTS."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cvops_pipelines_tests.helpers import dagster_server, shows_markdown_image
from cvops_pipelines_tests.test_demo import CHROMIUM_ARGS, chromium

SIZES = ["--scenes", "240", "--frames", "90", "--epochs", "2"]  # small: the loop, not the mAP

# end to end: two turns of the demo, then the checks; a slow CI machine gets 30 minutes
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def detection_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("detection_demo")
    env = {**os.environ, "CVOPS_HOME": str(root / "home"), "DAGSTER_HOME": str(root / "dagster")}
    env.pop("CVOPS_ONTOLOGY", None)  # the demo picks the scenes ontology itself
    report = root / "report.json"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "cvops-demo"), "--task", "detection", *SIZES]
        + ["--annotator", "labelstudio", "--report", str(report)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    return {"root": root, "env": env, "proc": proc, "report": report}


def test_two_hands_off_turns_on_boxes(detection_demo):
    proc = detection_demo["proc"]
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    report = json.loads(detection_demo["report"].read_text())
    assert report["ok"] and all(report["steps"].values()), report["steps"]
    for stage in ("ingest scenes-initial", "curate", "train 1", "feedback 1", "learn 1"):
        assert report["steps"][stage], stage
    for stage in ("curate again", "train 2", "feedback 2", "learn 2"):
        assert report["steps"][stage], stage
    assert "without objects (kept as negatives)" in out
    assert "dataset_version_boxes ok" in out
    assert "0 batches quarantined" in out
    first, second = report["turns"]
    turn1 = out.split("######## turn 1")[1].split("######## turn 2")[0]
    turn2 = out.split("######## turn 2")[1].split("######## summary")[0]

    # coverage per device: every frame the fleet answered, each with its image (image by image)
    for turn in (turn1, turn2):
        learned = re.search(r"== learn: (\d+) of (\d+) frames reviewed", turn)
        table = turn.split("images kept, reviewed):\n")[1].split("\n   annotation queue")[0]
        rows = [line.strip("| ").split(" | ") for line in table.splitlines()[2:]]
        assert rows and all(int(frames) == int(kept) for _, frames, kept, _ in rows), table
        assert sum(int(r[1]) for r in rows) == int(learned[2])
        assert sum(int(r[3]) for r in rows) == int(learned[1])

    # turn 1: the first model passes the gate (no champion to lose to) and goes on canary
    assert "cvops-detector v1" in turn1 and "challenger_not_worse_than_champion: passed" in turn1
    assert first["release"] and not first["gate"]["refused"]
    reviewed = first["fleet"]["reviewed"]
    canary = turn1.split("== canary: ")[1].split("\n")[0]
    assert canary.startswith(first["decision"]["action"])
    # the first canary has no stable to pair with: promote once enough reviewed records arrived
    assert first["decision"]["action"] == ("promote" if reviewed >= 50 else "wait"), canary

    # the oracle's answers and the reviewed frames are back in the pool as box labels
    # through Label Studio: pushed in sub-batches of 25, each answered sub-batch back as one
    # drop with its findings before the next went out
    pushed = re.search(r"(\d+) tasks in sub-batches of (\d+)", out)
    tasks, size = int(pushed[1]), int(pushed[2])
    assert tasks == first["queued"] and size == 25
    batches = re.findall(r"sub-batch (\d+): (\d+) answered, (\d+) skipped.* -> drop (\S+)", out)
    assert [int(b[0]) for b in batches] == list(range(1, math.ceil(tasks / size) + 1))
    assert [int(b[1]) + int(b[2]) for b in batches] == [
        min(size, tasks - size * k) for k in range(len(batches))
    ]
    assert len({b[3] for b in batches}) == len(batches)  # one drop per sub-batch
    answered = sum(int(b[1]) for b in batches)
    assert 0 < answered <= first["queued"]
    assert "0 quarantined" in out.split("== annotate")[1]
    pools = [int(p.split()[0]) for p in out.split("== curate: ")[1:]]
    assert pools[0] < pools[1] <= pools[0] + 90  # at most every turn-1 frame (--frames 90)
    # a frame the oracle answered counts as the oracle's; the rest as the operator's review
    operator = int(out.split("== curate: ")[-1].split("(")[1].split()[0])
    assert 0 <= operator <= reviewed

    # box QA: no reviewer before the first detector; then the champion reviews, and flags
    # only when it agrees with the given boxes well enough (F1 >= 0.6) to judge them
    qa = [line for line in out.splitlines() if line.startswith("   box QA : ")]
    assert len(qa) == 2 and "none yet (model-free checks only)" in qa[0]
    if "too weak to judge" in qa[1]:
        assert float(qa[1].split("at F1 ")[1].split()[0]) < 0.6
        found = qa[1].split("; reviewer ")[0]  # the issues by type: none of the model's kinds
        assert not any(k in found for k in ("overlooked", "badly_located", "swapped_class"))
    else:
        assert float(qa[1].split("at F1 ")[1].split()[0]) >= 0.6

    # turn 2: retrained on the grown pool; the gate's verdict decides whether it ships
    gate = second["gate"]
    assert gate["trained"], turn2
    assert ("challenger_not_worse_than_champion: passed" in turn2) == (not gate["refused"])
    assert bool(second["release"]) == (not gate["refused"])
    if second["release"]:
        assert "on canary for cohorts line-1" in turn2
        assert turn2.split("== canary: ")[1].startswith(second["decision"]["action"])
        promoted = second["decision"]["action"] == "promote"
        assert (second["after"]["stable"] == second["release"]) == promoted
    else:  # a refusal changes nothing that ships
        assert second["after"]["stable"] == second["before"]["stable"]

    # the audit: every turn-2 frame, each model at its operating point, figures consistent
    audit = report["audit"]
    assert len(audit) == 2
    summary = out.split("######## summary")[1]
    for version, scores in audit.items():
        p, r, f1 = scores["precision"], scores["recall"], scores["f1"]
        assert f1 == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
        assert f"model v{version}: precision {p:.4f}, recall {r:.4f}, F1 {f1:.4f}" in summary
        assert scores["frames"] == 90  # --frames: every turn-2 frame
    shipped = [line for line in summary.splitlines() if "<- shipped (stable)" in line]
    assert len(shipped) == 1 and f"v{report['champion']}:" in shipped[0]


@pytest.fixture
def webserver(detection_demo, repo_root):
    assert detection_demo["proc"].returncode == 0
    # workspace.yaml as it is: the detection loop is its own code location beside the default
    log = detection_demo["root"] / "webserver.log"
    with dagster_server("dagster-webserver", repo_root, detection_demo["env"], log) as base:
        yield base


def test_the_ui_shows_the_detector_s_evaluation_and_the_annotation_progress(webserver, repo_root):
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
        # Label Studio's progress, as labelstudio_answers recorded it on annotation_queue: the
        # newest observation comes right after the turn-2 queue's materialization
        page.goto(f"{webserver}/assets/detection/annotation_queue?view=events")
        page.locator("text=/\\d{1,2}:\\d{2} [AP]M$/").nth(1).click()
        expect(page.get_by_text("Observed").first).to_be_visible()
        for shown in ("annotation_progress", "sub_batches_done", "answers_per_hour"):
            expect(page.get_by_text(shown).first).to_be_visible()
        page.screenshot(path=shots / "detection_annotation_progress.png")
        browser.close()
