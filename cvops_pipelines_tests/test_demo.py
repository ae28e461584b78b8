"""The README's first command and what comes after it: `cvops-demo --turns 5` runs the README's
two turns and three more (its output checked here), then the Dagster UI is opened on the
instance it left behind, in a real browser (Debian's chromium driven by Playwright): what an
operator sees after `./dev demo` and `./dev ui`. Screenshots land in $CVOPS_TEST_ARTIFACTS
(default: test-artifacts/ui/). One module, so pytest-xdist runs both on the worker that ran
the demo (`--dist loadscope`)."""

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from cvops_pipelines.core.measure.replay import NonInferiority, Operator, paired_test
from cvops_pipelines_tests.helpers import dagster_server, shows_markdown_image

CVOPS = str(Path(sys.executable).parent / "cvops")
GROUPS = ("ingest", "curate", "build", "measure", "ship", "learn")
# Offline and quiet: no first-run UI, no update checks, no background connections to the internet
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# end to end: the demo itself (five turns), then the checks; a slow CI machine gets 45 minutes
pytestmark = pytest.mark.timeout(2700)


# the defaults the demo runs with: the gate's, and the canary's (alpha spread over 4 looks)
GATE_RULE = NonInferiority(min_records=30)
CANARY_RULE = NonInferiority(alpha=0.05 / 4, min_records=50)


def verdict_from_counts(row: dict, rule: NonInferiority) -> str:
    """Recompute a printed paired verdict from its printed counts alone."""
    n, new_only, old_only = row["records"], row["only_new_right"], row["only_old_right"]
    scale = 1.0 if row["metric"].startswith("automatic") else Operator().p_pick_right
    new = np.array([True] * new_only + [False] * old_only + [True] * (n - new_only - old_only))
    old = np.array([False] * new_only + [True] * old_only + [True] * (n - new_only - old_only))
    return paired_test(new, old, row["metric"], rule, scale).verdict


TURNS = 5  # the fixture's `cvops-demo --turns 5`: turns 1 and 2 are the README's two turns


def check_later_turn(turn: dict, number: int, models: int, releases: int, out: str) -> None:
    """A turn after the first: the replay gate judged its challenger on the holdout, and the
    paired canary's action (and the channels after it) agree with the figures printed."""
    gate = turn["gate"]
    if not gate["trained"]:  # the sensor found nothing worth a run: nothing else changes
        assert turn["release"] is None and turn["after"] == turn["before"]
        return
    assert gate["model_version"] == f"v{models}"
    outcomes = gate["replay_outcomes"]
    assert outcomes and outcomes[0]["records"] >= 1
    for row in outcomes:
        recomputed = verdict_from_counts(row, GATE_RULE)
        if recomputed == "worse" and row["verdict"] == "inconclusive":
            # worse on all records, but operator labels favour the champion and the expert-
            # labelled records alone did not confirm it: the replay says so
            assert "only with operator labels" in gate["replay"], gate["replay"]
        else:
            assert recomputed == row["verdict"], row
    replay_refused = any(row["verdict"] == "worse" for row in outcomes)
    assert gate["refused"] == (not gate["checks"]["challenger_not_worse_than_champion"])
    if replay_refused:  # a replay that shows the challenger worse always refuses it
        assert gate["refused"]
    if gate["refused"]:  # a refusal changes nothing: no release, same champion, same stable
        assert turn["release"] is None and "refused: the gate kept the champion" in out
        assert turn["after"]["champion"] == turn["before"]["champion"]
        assert turn["after"]["stable"] == turn["before"]["stable"]
        assert turn["canary"]["action"] is None
        return
    assert turn["release"].startswith(f"rel-{releases}-")
    action, paired = turn["canary"]["action"], turn["canary"]["paired"]
    verdicts = [verdict_from_counts(row, CANARY_RULE) for row in paired]
    assert verdicts == [row["verdict"] for row in paired]
    assert paired[0]["records"] % 2 == 0  # as many records from each side
    expected = (
        "rollback"
        if "worse" in verdicts
        else "promote"
        if set(verdicts) == {"non_inferior"}
        else "wait"
    )
    assert action == expected, (action, paired)
    after = turn["after"]
    if action == "promote":
        assert after["stable"] == turn["release"] and after["champion"] == str(models)
    else:
        assert after["stable"] == turn["before"]["stable"]
        assert after["champion"] == turn["before"]["champion"]
        # a canary still collecting when the turn ends stays on canary
        assert after["canary"] == (turn["release"] if action == "wait" else None)


def test_demo_runs_turns_of_the_loop_in_a_persistent_instance(demo_run):
    """Invariants only: which model wins is a training outcome and differs between machines;
    that every stage ran and every decision agrees with the figures it printed does not."""
    tmp_path, env, proc, timings = (demo_run[k] for k in ("root", "env", "proc", "timings"))
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "ingest drop initial: OK" in out and "raw_images_contract passed" in out
    assert "== curate: OK" in out and "dataset_version_leakage passed" in out
    assert "replay_set_contract passed" in out
    assert "Traceback" not in out + proc.stderr
    report = json.loads(demo_run["report"].read_text())
    assert report["ok"] is True and len(report["turns"]) == TURNS
    versions = {p.name for p in (tmp_path / "home/datasets").iterdir()}
    assert len(versions) == TURNS and all(f"dataset: {v}" in out for v in versions)

    # turn 1: the first model passes the gate by definition and is released to every device
    first, second = report["turns"][:2]
    assert "retraining_sensor -> train_job (first model)" in out
    logs = out + proc.stderr  # Dagster's log lines go to stderr
    assert "no champion yet: training from scratch" in logs
    assert first["gate"]["trained"] and not first["gate"]["refused"]
    assert first["release"].startswith("rel-1-") and first["gate"]["replay_outcomes"] is None
    assert "feedback_sensor -> feedback_job" in out and "0 batches quarantined" in out
    if first["canary"]["action"] == "promote":  # no stable yet: promoted on enough reviews
        assert first["after"]["stable"] == first["release"] and first["after"]["canary"] is None
    else:
        assert first["canary"]["action"] == "wait" and "keep collecting" in first["canary"]["why"]
    assert "new_drop_sensor -> ingest_job" in out and "annotate: the oracle answered" in out

    # turn 2: the operators' labels keep the SLA out of reach (they pick among the top two), so
    # the alert and the new labels ask for a retrain: a fine-tune of the champion (same classes)
    assert "retraining_sensor -> train_job (accuracy_sla" in out
    assert second["gate"]["trained"] and second["gate"]["model_version"] == "v2"
    if first["after"]["champion"]:
        assert f"fine-tuning champion v{first['after']['champion']}" in logs
    models, releases = 1, 1
    for number, turn in enumerate(report["turns"][1:], 2):
        models += bool(turn["gate"]["trained"])
        releases += bool(turn["release"])
        assert turn["before"] == report["turns"][number - 2]["after"]  # no change in between
        check_later_turn(turn, number, models, releases, out)
    # the audit names what shipped, and it is the champion
    assert report["champion"] in report["audit"] and f"v{report['champion']}" in out
    assert "<- shipped (stable)" in out

    # per turn: labels bought grow by each answered queue; each row agrees with the turn it sums
    rows = report["per_turn"]
    assert [r["turn"] for r in rows] == list(range(1, TURNS + 1)) and rows[0]["labels"] == 0
    assert all(b["labels"] > a["labels"] for a, b in zip(rows, rows[1:]))
    for row, turn in zip(rows, report["turns"]):
        shipped = turn["after"]["champion"]
        assert row["shipped"] == (f"v{shipped}" if shipped else None)
        assert row["audit_accuracy"] == (report["audit"][shipped] if shipped else None)
        gate = turn["gate"]
        assert row["gate"] == (
            "refused" if gate["refused"] else "passed" if gate["trained"] else "-"
        )
        assert row["canary"] == turn["canary"]["action"] and row["wall_s"] > 0
        # latency: the answers landed -> this turn's signed release, inside the turn's wall time
        if row["turn"] > 1 and turn["release"]:
            assert 0 < row["latency_s"] < row["wall_s"] + rows[row["turn"] - 2]["wall_s"]
        else:
            assert row["latency_s"] is None
        printed = f"{row['turn']:>4} | {row['labels']:>13} | {row['shipped'] or '-':>7} |"
        assert printed in out
    assert report["audit_images"] > 0 and set(report["audit"]) == set(report["turn_models"])

    assert oct((tmp_path / "home/keys/release_signing.key").stat().st_mode & 0o777) == "0o600"
    annotated = [
        p
        for p in (tmp_path / "home/tables/annotations").iterdir()
        if p.name.startswith("annotated-")
    ]
    assert len(annotated) == TURNS - 1  # every turn's queue but the last was answered
    for path in annotated:
        labels = pd.read_parquet(path)
        assert len(labels) > 50 and set(labels["origin"]) == {"annotation_queue"}
    pool = pd.read_parquet(tmp_path / "home/tables/labeled_pool/all.parquet")
    assert {"drop", "feedback", "annotation_queue"} <= set(pool["origin"])
    # the production holdout never reached a dataset version
    replay = pd.read_parquet(tmp_path / "home/tables/replay_set/all.parquet")
    holdout = set(replay.loc[replay["holdout"], "image_id"])
    assert holdout and {"expert", "operator"} <= set(replay["label_source"])
    for version in versions:
        rows = pd.read_parquet(tmp_path / f"home/datasets/{version}/dataset.parquet")
        assert not set(rows["image_id"]) & holdout
    assert (tmp_path / "dagster/dagster.yaml").exists()  # runs land in a real instance
    timing = json.loads(timings.read_text())
    assert timing["dagster_runs"] >= 11 and 0 < timing["orchestration_share"] < 1

    status = subprocess.run([CVOPS, "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"stable    : {report['stable']}" in status.stdout
    assert f"champion  : cvops-classifier v{report['champion']}" in status.stdout
    assert "SLA " in status.stdout and "queued images still to annotate" in status.stdout

    drops = subprocess.run([CVOPS, "drops"], env=env, capture_output=True, text=True, check=True)
    assert "initial\tcomplete" in drops.stdout


def chromium() -> str:
    path = (
        os.environ.get("CVOPS_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if not path:
        pytest.fail(
            "no chromium: `apt-get install chromium` (./dev test does this as root) or "
            "set CVOPS_CHROMIUM to a Chromium/Chrome binary"
        )
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
    log = demo_run["root"] / "dagster_dev.log"
    with dagster_server("dagster dev", repo_root, demo_run["env"], log) as base:
        yield base


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
    from datetime import datetime

    runs_filter = RunsFilter(
        tags={"dagster/from_ui": "true", "dagster/partition": partition},
        created_after=datetime.fromtimestamp(after, UTC),
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = instance.get_runs(runs_filter, limit=1)
        if runs and runs[0].is_finished:
            return runs[0]
        time.sleep(2)
    raise TimeoutError(f"the run launched from the UI did not finish in {timeout}s")


def test_operator_sees_the_loop_and_launches_ingest_from_the_ui(
    demo_run, dagster_ui, page, shots, monkeypatch
):
    from playwright.sync_api import expect

    # the asset graph: every stage of the loop is a group, and the graph renders them all
    page.goto(f"{dagster_ui}/asset-groups")
    for group in GROUPS:
        expect(page.locator(f'[data-tooltip="{group}"]')).to_be_visible()
    page.screenshot(path=shots / "asset_graph.png")

    # metadata plots, rendered as images the browser decoded: the evaluation's confusion matrix,
    # and Grad-CAM overlays (what the model looked at) beside the evaluation's wrong and unsure
    # answers, the label review's suspects and the annotation queue
    for asset, row, alt in (
        ("model_evaluation", "confusion_matrix", "confusion matrix"),
        ("model_evaluation", "saliency", "Grad-CAM of wrong and unsure test answers"),
        ("label_issues", "saliency", "Grad-CAM of the suspects"),
        ("annotation_queue", "saliency", "Grad-CAM of the queued images"),
    ):
        page.goto(f"{dagster_ui}/assets/{asset}")
        shows_markdown_image(page, row, alt, shots / f"{asset}_{row}.png")
    # which label QA scorer ran, and the rule that chose it
    page.goto(f"{dagster_ui}/assets/label_issues")
    expect(page.locator("tr", has_text="scorer_rule").first).to_be_visible()
    expect(page.locator("tr", has_text="scorer_candidates_oof_accuracy").first).to_be_visible()
    page.goto(f"{dagster_ui}/assets/model_evaluation")
    # the paired replay on the production holdout, a table in the same metadata (short enough
    # to be rendered inline)
    row = page.locator("tr", has_text="replay_paired").first
    row.scroll_into_view_if_needed()
    expect(row.get_by_text("only_old_right")).to_be_visible()
    expect(row.get_by_text("only_new_right")).to_be_visible()
    page.screenshot(path=shots / "replay_paired.png")

    # a check result: the gate's blocking check, as the demo's last evaluation left it
    refused = json.loads(demo_run["report"].read_text())["turns"][-1]["gate"]["refused"]
    page.goto(f"{dagster_ui}/assets/model_evaluation?view=checks")
    expect(page.get_by_text("This is a blocking asset check.")).to_be_visible()
    expect(page.get_by_text("Failed" if refused else "Passed", exact=True).first).to_be_visible()
    if not refused:
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
