"""Label Studio as the annotation backend, through a real Label Studio 1.23 server: queues pushed
with the model's answers as predictions and images Label Studio serves from the cvops store,
annotators (signed up as people do) answering through its API, and the answers back as drops
that the real ingest reads: exactly once, edits as newer labels, deletions reported, the server
down and back."""

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer

import pandas as pd
import pytest
from dagster import DagsterInstance, build_sensor_context
from PIL import Image

from cvops_pipelines.core.base.ontology import load_ontology
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.ingest.annotations import import_annotations
from cvops_pipelines.core.ingest.intake import MARKER, IngestConfig, ingest_drop
from cvops_pipelines.core.learn.active import QUEUE_COLUMNS, publish_queue
from cvops_pipelines.core.learn.detection_active import publish_detection_queue
from cvops_pipelines.core.learn.labelstudio import collect_answers, push_or_defer, push_queue
from cvops_pipelines.core.learn.labelstudio_client import LabelStudio, LabelStudioError
from cvops_pipelines.demo import digit_model
from cvops_pipelines.demo.labelstudio import ADMIN, ADMIN_TOKEN, LabelStudioServer
from cvops_pipelines.demo.scenes import scenes
from cvops_pipelines_tests import corpus

CLASSES = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One Label Studio for the module; its document root holds every test's tmp_path, so each
    test's cvops store is servable, as on one machine."""
    root = tmp_path_factory.mktemp("labelstudio")
    with LabelStudioServer.start(root, files_root=tmp_path_factory.getbasetemp()) as running:
        yield running


@pytest.fixture
def places(server, tmp_path):
    return LocalStore(tmp_path / "cvops"), LocalStore(tmp_path / "drops")


def _ingested(store, tmp_path, images: dict[str, bytes]) -> pd.DataFrame:
    drop = tmp_path / "incoming"
    for name, data in images.items():
        (drop / name).parent.mkdir(parents=True, exist_ok=True)
        (drop / name).write_bytes(data)
    return ingest_drop(LocalStore(drop), store, "incoming", IngestConfig(workers=1)).manifest


def _digit_queue(store, tmp_path, n=3) -> tuple[str, pd.DataFrame]:
    images = {f"d{i}.png": corpus.encode(digit_model.digit(i, side=32), "PNG") for i in range(n)}
    manifest = _ingested(store, tmp_path, images).sort_values("original_name")
    queue = pd.DataFrame(
        {
            "rank": range(1, n + 1),
            "image_id": manifest["image_id"].to_numpy(),
            "reason": "uncertain",
            "score": 0.61,
            "predicted": "7",
            "second": "1",
            "confidence": 0.4,
            "margin": 0.1,
            "corrected_label": None,
            "record_id": [f"r{i}" for i in range(n)],
            "release": "release-7",
            "device_id": "dev-1",
            "uri": "",
            "key": manifest["key"].to_numpy(),
        }
    )[QUEUE_COLUMNS]
    queue_id, prefix = publish_queue(store, queue, CLASSES)
    return prefix, manifest


def _choice(label: str) -> list[dict]:
    return [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}
    ]


def _ls(server, places) -> LabelStudio:
    return LabelStudio(server.url, ADMIN_TOKEN, str(server.files_root))


def test_a_classification_queue_arrives_with_its_predictions_and_images(server, places, tmp_path):
    store, _ = places
    prefix, manifest = _digit_queue(store, tmp_path)
    ls = _ls(server, places)
    pushed = push_queue(ls, store, prefix, f"cvops {tmp_path.name} · queue")
    assert len(pushed.task_ids) == 3 and not pushed.already
    for task_id in pushed.task_ids:
        task = server.api(ADMIN_TOKEN, "GET", f"/api/tasks/{task_id}").json()
        (prediction,) = server.api(ADMIN_TOKEN, "GET", f"/api/predictions?task={task_id}").json()
        assert prediction["model_version"] == "release-7" and prediction["score"] == 0.61
        assert prediction["result"][0]["value"] == {"choices": ["7"]}
        # the image Label Studio serves is the stored original, byte for byte
        served = server.api(ADMIN_TOKEN, "GET", task["data"]["image"]).content
        key = manifest.set_index("image_id").loc[task["data"]["image_id"], "key"]
        assert served == store.read_bytes(key)
    again = push_queue(ls, store, prefix, f"cvops {tmp_path.name} · queue")
    assert again.already and again.task_ids == pushed.task_ids
    project = server.api(ADMIN_TOKEN, "GET", f"/api/projects/{pushed.project}").json()
    assert project["task_number"] == 3  # pushing again imported nothing
    assert '<Choice value="9"/>' in project["label_config"]  # the ontology's classes


def test_a_detection_queue_carries_the_devices_boxes_as_predictions(server, places, tmp_path):
    store, _ = places
    frames = scenes(2, seed=3)
    manifest = _ingested(
        store,
        tmp_path,
        {f"f{i}.png": corpus.encode(Image.fromarray(s.image), "PNG") for i, s in enumerate(frames)},
    ).sort_values("original_name")
    boxes = [
        json.dumps(
            [
                {"box": [float(v) for v in b], "label": c, "score": 0.9}
                for b, c in zip(s.boxes, s.labels)
            ]
            + [{"box": [1, 1, 5, 5], "label": s.labels[0], "score": 0.1}]  # below 0.3: not shown
        )
        for s in frames
    ]
    queue = manifest.assign(
        boxes=boxes, release="release-3", score=0.5, reason="uncertain", why="", record_id="r"
    )
    _, prefix = publish_detection_queue(store, queue, sorted({c for s in frames for c in s.labels}))
    pushed = push_queue(_ls(server, places), store, prefix, f"cvops {tmp_path.name} · boxes")
    for task_id, frame in zip(pushed.task_ids, frames):
        (prediction,) = server.api(ADMIN_TOKEN, "GET", f"/api/predictions?task={task_id}").json()
        assert prediction["model_version"] == "release-3"
        assert len(prediction["result"]) == len(frame.boxes)
        assert {r["type"] for r in prediction["result"]} == {"rectanglelabels"}


def test_a_box_review_goes_out_with_the_current_boxes_to_edit_not_as_an_answer(
    server, places, tmp_path
):
    """label_issues' review names the store's originals by URI and pre-fills the given boxes;
    pushed, the originals are served from images/ and the given boxes are a prediction (as an
    imported annotation they would read as the reviewer's answer)."""
    from cvops_pipelines.core.curate.detection_label_qa import (
        labelstudio_box_config,
        labelstudio_rect,
    )

    store, drops = places
    frame = scenes(1, seed=5)[0]
    png = corpus.encode(Image.fromarray(frame.image), "PNG")
    (row,) = _ingested(store, tmp_path, {"f.png": png}).itertuples()
    size = (int(row.width), int(row.height))
    given = [
        labelstudio_rect(row.image_id, size, b, c, i)
        for i, (b, c) in enumerate(zip([[float(v) for v in b] for b in frame.boxes], frame.labels))
    ]
    fix = labelstudio_rect(row.image_id, size, [1.0, 1.0, 9.0, 9.0], frame.labels[0], "fix0")
    prefix = "reports/label_issues/run-1"
    task = {
        "data": {"image": store.uri(row.key), "image_id": row.image_id},
        "annotations": [{"result": given}],
        "predictions": [{"model_version": "cvops-box-qa", "score": 0.8, "result": [fix]}],
    }
    store.write_bytes(f"{prefix}/labelstudio_tasks.json", json.dumps([task]).encode())
    store.write_bytes(
        f"{prefix}/labelstudio_config.xml",
        labelstudio_box_config(sorted(set(frame.labels))).encode(),
    )
    ls = _ls(server, places)
    pushed = push_queue(
        ls, store, prefix, f"cvops {tmp_path.name} · review", tasks_file="labelstudio_tasks.json"
    )
    (task_id,) = pushed.task_ids
    shown = server.api(ADMIN_TOKEN, "GET", f"/api/tasks/{task_id}").json()
    assert server.api(ADMIN_TOKEN, "GET", shown["data"]["image"]).content == png
    assert shown.get("total_annotations", 0) == 0  # nothing answered yet
    predictions = server.api(ADMIN_TOKEN, "GET", f"/api/predictions?task={task_id}").json()
    assert {p["model_version"]: len(p["result"]) for p in predictions} == {
        "current labels": len(frame.boxes),
        "cvops-box-qa": 1,
    }
    assert collect_answers(ls, store, drops).pending == 1
    # what Label Studio may serve is named, never the whole store (release keys live there)
    storages = server.api(ADMIN_TOKEN, "GET", f"/api/storages/localfiles?project={pushed.project}")
    assert [s["path"] for s in storages.json()] == [str(store.local_path("images").resolve())]


def test_answers_land_as_one_drop_exactly_once_and_edits_and_deletions_follow(
    server, places, tmp_path, repo_root
):
    store, drops = places
    prefix, manifest = _digit_queue(store, tmp_path)
    ls = _ls(server, places)
    pushed = push_queue(ls, store, prefix, f"cvops {tmp_path.name} · queue")
    annotator = server.signup(f"ann-{tmp_path.name}@cvops.test")
    first, second, third = pushed.task_ids
    ids = manifest["image_id"].tolist()
    answer = server.api(
        annotator, "POST", f"/api/tasks/{first}/annotations", json={"result": _choice("0")}
    ).json()
    server.api(annotator, "POST", f"/api/tasks/{second}/annotations", json={"result": _choice("1")})
    waiting = collect_answers(ls, store, drops)
    assert waiting.drops == [] and waiting.pending == 1  # the sub-batch is not done yet

    server.api(ADMIN_TOKEN, "DELETE", f"/api/tasks/{third}")  # done: answered or deleted
    poll = collect_answers(ls, store, drops)
    assert poll.deleted == [f"{pushed.project}/{third}"] and poll.pending == 0
    assert poll.answered == 2 and len(poll.drops) == 1
    (progress,) = poll.progress  # the deleted task is neither done nor pending
    assert (progress["tasks_done"], progress["tasks_pending"]) == (2, 0)
    (done,) = poll.completed
    assert (done["answered"], done["annotators"], done["overruled_model"]) == (2, 1, 1.0)
    assert {(c["model"], c["annotator"]) for c in done["confusion"]} == {("7", "0"), ("7", "1")}
    labels = _labels(drops, poll.drops[0], repo_root)
    assert dict(zip(labels["image_id"], labels["label"])) == {ids[0]: "0", ids[1]: "1"}
    assert set(labels["annotator"]) == {f"ann-{tmp_path.name}@cvops.test"}
    assert set(labels["origin"]) == {"annotation_queue"}
    again = collect_answers(ls, store, drops)  # re-polling adds nothing, reports nothing twice
    assert again.drops == [] and again.deleted == [] and again.completed == []

    # an answer edited later lands as a newer label for that image only
    edit = {"result": _choice("8")}
    server.api(annotator, "PATCH", f"/api/annotations/{answer['id']}", json=edit)
    (drop,) = collect_answers(ls, store, drops).drops
    edited = _labels(drops, drop, repo_root)
    assert edited[["image_id", "label"]].values.tolist() == [[ids[0], "8"]]
    assert edited["labeled_at"].iloc[0] > labels.set_index("image_id")["labeled_at"][ids[0]]
    assert collect_answers(ls, store, drops).drops == []
    assert len(_drop_names(drops)) == 2  # the sub-batch, then the edit
    assert all(drops.exists(f"{name}/{MARKER}") for name in _drop_names(drops))


def test_with_a_quick_retrain_the_next_sub_batch_waits_for_a_model_trained_after(
    server, places, tmp_path
):
    from cvops_pipelines.core.learn.retraining import (
        ModelFacts,
        SubBatchFacts,
        read_facts,
        write_facts,
    )

    store, drops = places
    prefix, _ = _digit_queue(store, tmp_path, n=4)
    ls = _ls(server, places)
    pushed = push_queue(ls, store, prefix, f"cvops {tmp_path.name} · quick", 2, retrain_epochs=1)
    for task in pushed.task_ids:
        server.api(
            ADMIN_TOKEN, "POST", f"/api/tasks/{task}/annotations", json={"result": _choice("1")}
        )
    done = collect_answers(ls, store, drops)
    asked = read_facts(store, SubBatchFacts)
    assert done.completed and asked == SubBatchFacts(prefix[-14:], 1, 1, at=asked.at)
    write_facts(store, ModelFacts("1", "ds-1", 10, at=asked.at - 60))  # an older model: no
    for _ in range(2):
        held = collect_answers(ls, store, drops)
        assert held.next_pushed == [] and held.retraining == [f"{prefix[-14:]} #2"]
    assert len(ls.export(pushed.project)) == 2
    write_facts(store, ModelFacts("2", "ds-2", 12, at=asked.at + 1))  # the quick retrain
    assert collect_answers(ls, store, drops).next_pushed == [f"{prefix[-14:]} #2"]
    assert len(ls.export(pushed.project)) == 4


def test_an_unknown_label_and_a_deleted_image_are_reported_by_the_ingest_not_lost(
    server, places, tmp_path, repo_root
):
    store, drops = places
    prefix, _ = _digit_queue(store, tmp_path, n=2)
    ls = _ls(server, places)
    pushed = push_queue(ls, store, prefix, f"cvops {tmp_path.name} · odd")
    record = json.loads(store.read_bytes(f"annotation/labelstudio/queues/{prefix[-14:]}.json"))
    first, second = pushed.task_ids
    store.local_path(record["batches"][0]["images"][str(second)]).unlink()  # retention, say
    for task, label in ((first, "cat"), (second, "4")):  # "cat": a config edited in Label Studio
        server.api(
            ADMIN_TOKEN, "POST", f"/api/tasks/{task}/annotations", json={"result": _choice(label)}
        )
    (name,) = collect_answers(ls, store, drops).drops
    source = drops.child(name)
    scratch = LocalStore(tmp_path / "ingested")
    manifest = ingest_drop(source, scratch, name, IngestConfig(workers=1)).manifest_file
    ontology = load_ontology(repo_root / "data_contracts" / "ontology.yaml")
    result = import_annotations(source, scratch, name, manifest, ontology)
    assert result.labels.empty
    assert sorted(result.quarantine["reason_code"]) == ["missing_image", "unknown_class"]
    assert json.loads(source.read_bytes("export.json"))[1]["annotations"]  # the answer is kept


def test_a_queue_goes_out_in_sub_batches_each_after_the_one_before_is_answered(
    server, places, tmp_path
):
    store, drops = places
    prefix, _ = _digit_queue(store, tmp_path, n=5)
    ls = _ls(server, places)
    pushed = push_queue(ls, store, prefix, f"cvops {tmp_path.name} · sub", sub_batch=2)
    assert pushed.batches == 3 and len(pushed.task_ids) == 2

    def project_tasks() -> list[int]:
        return sorted(t["id"] for t in ls.export(pushed.project))

    assert project_tasks() == sorted(pushed.task_ids)
    sent = list(pushed.task_ids)
    for n, labels in enumerate([["7", "3"], ["7", "7"], ["1"]], 1):
        for task, label in zip(sent[-len(labels) :], labels):
            server.api(
                ADMIN_TOKEN,
                "POST",
                f"/api/tasks/{task}/annotations",
                json={"result": _choice(label)},
            )
        poll = collect_answers(ls, store, drops)  # the sub-batch's drop and findings, alone
        (done,) = poll.completed
        assert (done["sub_batch"], done["answered"], len(poll.drops)) == (n, len(labels), 1)
        assert done["overruled_model"] == sum(x != "7" for x in labels) / len(labels)
        assert poll.next_pushed == [] and project_tasks() == sorted(sent)
        (progress,) = poll.progress
        assert progress["sub_batches_done"] == n and progress["tasks_done"] == len(sent)
        assert progress["tasks_pending"] == 5 - len(sent)
        nxt = collect_answers(ls, store, drops)  # the poll after: the next sub-batch goes out
        assert nxt.drops == [] and nxt.completed == []
        if n < 3:
            assert nxt.next_pushed == [f"{prefix.rsplit('/', 1)[1]} #{n + 1}"]
            sent = project_tasks()
            assert len(sent) == min(5, 2 * (n + 1))
        else:
            assert nxt.next_pushed == [] and len(project_tasks()) == 5
    assert len(_drop_names(drops)) == 3  # one drop per sub-batch


def _drop_names(drops) -> list[str]:
    return sorted({e.key.split("/")[0] for e in drops.list()})


def _labels(drops, name: str, repo_root) -> pd.DataFrame:
    """The drop through the real ingest, as the `annotations` asset reads it."""
    source, scratch = drops.child(name), LocalStore(drops.root.parent / f"ingested-{name}")
    manifest = ingest_drop(source, scratch, name, IngestConfig(workers=1)).manifest_file
    ontology = load_ontology(repo_root / "data_contracts" / "ontology.yaml")
    result = import_annotations(source, scratch, name, manifest, ontology)
    assert result.quarantine.empty, result.quarantine.to_dict("records")
    return result.labels  # the drop's images are the queue's bytes: the same image ids


def test_the_sensor_writes_the_drop_and_a_server_down_loses_nothing(
    server, places, tmp_path, repo_root
):
    from cvops_pipelines.defs.learn.sensors import labelstudio_answers
    from cvops_pipelines.defs.resources import AnnotationBackend

    store, drops = places
    prefix, _ = _digit_queue(store, tmp_path)
    resources = _sensor_resources(store, drops)
    backend = AnnotationBackend(
        labelstudio_url=server.url,
        labelstudio_token=ADMIN_TOKEN,
        labelstudio_files_root=str(server.files_root),
    )
    ls = backend.labelstudio()
    assert ADMIN_TOKEN not in repr(ls)
    server.stop()
    try:
        why = push_or_defer(ls, store, prefix, f"cvops {tmp_path.name} · late")
        assert isinstance(why, str) and server.url in why and "not answering" in why
        assert ADMIN_TOKEN not in why
        with _sensor(resources, backend) as context:
            skipped = labelstudio_answers(context)
        assert "retrying next tick" in skipped.skip_message and ADMIN_TOKEN not in str(skipped)
        assert _drop_names(drops) == []
    finally:
        server.restart()
    # back: the pending queue is pushed, then its answers come back through the sensor
    with _sensor(resources, backend) as context:
        result = labelstudio_answers(context)
        assert result.skip_reason.skip_message.startswith("pushed late: ")
        assert "3 pushed task(s) waiting" in result.skip_reason.skip_message
        (observed,) = result.asset_events  # the queue's progress, on annotation_queue
        assert observed.asset_key.path[-1] == "annotation_queue"
        context.update_cursor(result.cursor)
        quiet = labelstudio_answers(context)
        assert quiet.asset_events == []  # nothing changed: nothing to show
        record = json.loads(store.read_bytes(f"annotation/labelstudio/queues/{prefix[-14:]}.json"))
        for task in record["batches"][0]["task_ids"]:
            server.api(
                ADMIN_TOKEN, "POST", f"/api/tasks/{task}/annotations", json={"result": _choice("0")}
            )
        context.update_cursor(quiet.cursor)
        result = labelstudio_answers(context)
    (name,) = _drop_names(drops)
    assert f"wrote 3 answer(s) as drop(s) {name}" in result.skip_reason.skip_message
    (observed,) = result.asset_events
    (completed,) = observed.metadata["sub_batches_completed_now"].value
    assert completed["answered"] == 3 and completed["overruled_model"] == 1.0
    labels = _labels(drops, name, repo_root)
    assert set(labels["annotator"]) == {ADMIN} and set(labels["label"]) == {"0"}


@contextmanager
def _sensor(resources: dict, backend):
    """A sensor context on a throwaway instance, as the daemon would give one."""
    with (
        DagsterInstance.ephemeral() as instance,
        build_sensor_context(
            instance=instance, resources={**resources, "annotation": backend}
        ) as context,
    ):
        yield context


def _sensor_resources(store, drops) -> dict:
    from dagster_aws.s3 import S3Resource

    from cvops_pipelines.defs.loop import Loop
    from cvops_pipelines.defs.resources import CvopsStorage, DropSource

    s3 = S3Resource(region_name="us-east-1")
    return {
        "storage": CvopsStorage(local_root=str(store.local_path("")), s3=s3),
        "drop_source": DropSource(uri=str(drops.local_path("")), s3=s3),
        "loop": Loop(name=""),
    }


class _NotLabelStudio(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<html>a login page</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_answering_garbage_gets_a_message_that_names_it(tmp_path):
    """No Label Studio needed: any HTTP server that is not one."""
    http = HTTPServer(("127.0.0.1", 0), _NotLabelStudio)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{http.server_port}"
    store, drops = LocalStore(tmp_path / "cvops"), LocalStore(tmp_path / "drops")
    store.write_bytes(
        "annotation/labelstudio/queues/q-x.json",
        json.dumps(
            {
                "project": 1,
                "url": url,
                "queue_id": "q-x",
                "pushed_at": "2026-01-01T00:00:00+00:00",
                "tasks": 1,
                "batches": [{"task_ids": [1], "done_at": None}],
            }
        ).encode(),
    )
    try:
        with pytest.raises(LabelStudioError, match="text/html, not JSON.*a Label Studio server"):
            collect_answers(LabelStudio(url, "secret-token"), store, drops)
    finally:
        http.shutdown()
    assert not (tmp_path / "drops").exists()  # nothing written


def test_a_label_submitted_in_labelstudios_ui_reaches_the_labeled_pool(
    server, tmp_path, isolated_homes
):
    """Chromium opens the pushed task in Label Studio's own UI, picks a class over the model's
    pre-filled one and submits; the sensor's drop is ingested and curated by the real assets."""
    from playwright.sync_api import sync_playwright

    from cvops_pipelines import settings
    from cvops_pipelines_tests import stages
    from cvops_pipelines_tests.test_demo import CHROMIUM_ARGS, chromium

    store = settings.cvops_store()
    prefix, manifest = _digit_queue(store, tmp_path, n=1)
    ls = LabelStudio(server.url, ADMIN_TOKEN, str(server.files_root))
    pushed = push_queue(ls, store, prefix, f"cvops {tmp_path.name} · browser")
    (task,) = pushed.task_ids
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        page.set_default_timeout(120_000)
        try:
            page.goto(f"{server.url}/user/login/")
            page.fill("input[name=email]", ADMIN)
            page.fill("input[name=password]", "cvops-admin-pass")
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(lambda url: "/user/login" not in url)
            page.goto(f"{server.url}/projects/{pushed.project}/data?task={task}")
            # the config's choices in the ontology's order, each with its hotkey hint ("3[4]")
            page.locator(".lsf-choice__checkbox").nth(CLASSES.index("3")).click()
            page.get_by_role("button", name="Submit").click()
            deadline = 60
            while deadline and not server.api(ADMIN_TOKEN, "GET", f"/api/tasks/{task}").json().get(
                "total_annotations"
            ):
                page.wait_for_timeout(1000)
                deadline -= 1
        except Exception:
            page.screenshot(path=str(tmp_path / "labelstudio.png"))
            (tmp_path / "labelstudio.html").write_text(page.content())
            raise
        finally:
            browser.close()
    poll = collect_answers(ls, store, LocalStore(settings.drops_uri()))
    (drop,) = poll.drops
    instance = DagsterInstance.ephemeral()
    stages.ingest(instance, drop)
    curated = stages.curate(instance)
    pool = curated.output_for_node("labeled_pool").set_index("image_id")
    (image_id,) = manifest["image_id"]
    assert pool.loc[image_id, "label"] == "3"  # the annotator's class, not the model's 7
    assert list(pool.loc[image_id, "annotators"]) == [ADMIN]


def test_a_finished_queue_is_watched_for_late_edits_for_two_weeks_then_left_alone():
    from datetime import UTC, datetime, timedelta

    from cvops_pipelines.core.learn.labelstudio import EDITS_WATCHED, _watched

    done = datetime(2026, 1, 1, tzinfo=UTC)
    record = {"tasks": 4, "batches": [{"task_ids": [1, 2], "done_at": done.isoformat()}]}
    assert _watched(record, done + timedelta(days=365))  # half the queue still to go out
    record["batches"].append({"task_ids": [3, 4], "done_at": None})
    assert _watched(record, done + timedelta(days=365))  # its last sub-batch unanswered
    record["batches"][-1]["done_at"] = done.isoformat()
    assert _watched(record, done + EDITS_WATCHED)
    assert not _watched(record, done + EDITS_WATCHED + timedelta(seconds=1))


class _ExportOnly:
    """A Label Studio whose export is crafted (the shapes no real one writes)."""

    url = "http://labelstudio.test"

    def __init__(self, tasks):
        self.tasks = tasks

    def emails(self):
        return {}

    def export(self, project):
        return self.tasks


def test_a_task_with_unreadable_answers_is_turned_away_alone(tmp_path):
    store, drops = LocalStore(tmp_path / "cvops"), LocalStore(tmp_path / "drops")
    batch = {"task_ids": [1, 2], "images": {"1": "a.png", "2": "b.png"}, "done_at": None}
    record = {
        "project": 7,
        "queue_id": "q-x",
        "prefix": "annotation/queues/q-x",
        "tasks_file": "tasks.json",
        "url": _ExportOnly.url,
        "tasks": 2,
        "sub_batch": 2,
        "retrain_epochs": 0,
        "pushed_at": "2026-01-01T00:00:00+00:00",
        "batches": [batch],
        "seen": {},
        "deleted": [],
    }
    store.write_bytes("annotation/labelstudio/queues/q-x.json", json.dumps(record).encode())
    answer = {"id": 1, "result": _choice("3"), "updated_at": "2026-01-02T00:00:00Z"}
    for odd in ("garbage", [1, 2], [{"id": 2, "result": "3"}]):
        ls = _ExportOnly([{"id": 1, "annotations": [answer]}, {"id": 2, "annotations": odd}])
        poll = collect_answers(ls, store, drops)
        assert poll.malformed == ["7/2"] and poll.pending == 1 and poll.drops == []
    assert not (tmp_path / "drops").exists()  # the sub-batch waits; nothing half-written
