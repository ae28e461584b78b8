"""Learn-stage core: feedback batches vetted whole, late corrections, field accuracy with coverage,
business metrics, the annotation queue's order and diversity, and the ontology report."""

import json

import pandas as pd
import pytest

from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.learn.active import QueuePolicy, annotation_queue, labelstudio_queue_tasks
from cvops_pipelines.core.learn.feedback import (
    BatchRejected,
    batch_frame,
    feedback_labels,
    feedback_manifest,
    parse_batch,
    store_images,
)
from cvops_pipelines.core.learn.ontology_report import ontology_report
from cvops_pipelines.core.learn.production import accuracy_table, business_metrics, wilson_interval
from cvops_pipelines.core.learn.production_state import ProductionState
from cvops_pipelines.demo.digit_model import png
from cvops_pipelines.edge.buffer import FeedbackBuffer
from cvops_pipelines_tests.helpers import Fleet, rezip
from cvops_pipelines_tests.reference import resolve_records


def device_batch(tmp_path, n=4, late_fix=None, device="dev-001"):
    """A real batch from the device buffer: n records, the first two corrected."""
    buffer = FeedbackBuffer(tmp_path / f"{device}.db", device, "site-a")
    ids = []
    for i in range(n):
        image = png(i)
        ids.append(
            buffer.record(
                "rel-1-abc",
                __import__("hashlib").sha256(image).hexdigest(),
                image,
                "1",
                0.9,
                [("1", 0.9), ("7", 0.05)],
            )
        )
    buffer.correct(ids[0], "1")
    buffer.correct(ids[1], "7")
    batch = buffer.seal()
    payload = buffer.payload(batch)
    second = None
    if late_fix:
        buffer.correct(ids[2], late_fix)  # after sealing: travels in the next batch
        second = buffer.seal()
        second = (second, buffer.payload(second))
    buffer.close()
    return batch, payload, ids, second


def test_batch_becomes_records_images_and_feedback_labels(tmp_path):
    batch, payload, ids, late = device_batch(tmp_path, late_fix="4")
    first = batch_frame(parse_batch(payload, batch))
    parsed = parse_batch(payload, batch)
    store = LocalStore(tmp_path / "store")
    assert store_images(store, parsed, first) == 4
    assert store_images(store, parsed, first) == 0  # content-addressed: nothing twice
    second = batch_frame(parse_batch(late[1], late[0]))
    records = resolve_records(pd.concat([first, second], ignore_index=True))
    assert list(records["record_id"]) == ids
    assert list(records["corrected_label"].fillna("-")) == ["1", "7", "4", "-"]  # late one applied
    labels = feedback_labels(records)
    assert set(labels["origin"]) == {"feedback"} and len(labels) == 3
    assert set(labels["annotator"]) == {"operator@dev-001"}
    manifest = feedback_manifest(records)
    assert all(store.exists(k) for k in manifest["key"])


@pytest.mark.parametrize(
    "change, code",
    [
        (lambda f: f.pop("records.jsonl"), "malformed_batch"),
        (lambda f: f.update({"records.jsonl": b"{not json"}), "malformed_record"),
        (
            lambda f: f.update(
                {
                    "records.jsonl": f["records.jsonl"].replace(
                        b'"confidence": 0.9', b'"confidence": "high"'
                    )
                }
            ),
            "malformed_record",
        ),
        (lambda f: [f.pop(n) for n in list(f) if n.startswith("images/")][:1], "missing_image"),
        (
            lambda f: f.update({n: f[n][:-20] + b"0" * 20 for n in f if n.startswith("images/")}),
            "image_hash_mismatch",
        ),
    ],
)
def test_bad_batches_are_rejected_whole_with_the_reason(tmp_path, change, code):
    batch, payload, _, _ = device_batch(tmp_path)
    with pytest.raises(BatchRejected) as raised:
        parse_batch(rezip(payload, change), batch)
    assert raised.value.code == code and raised.value.message


def test_not_a_zip_and_a_renamed_batch_are_rejected(tmp_path):
    batch, payload, _, _ = device_batch(tmp_path)
    with pytest.raises(BatchRejected, match="not a readable zip"):
        parse_batch(b"garbage", batch)
    with pytest.raises(BatchRejected) as raised:
        parse_batch(payload, "dev-999-b000001")
    assert raised.value.code == "batch_id_mismatch"


def field(rows):
    cols = ["record_id", "release", "cohort", "predicted", "corrected_label", "captured_at"]
    return pd.DataFrame(rows, columns=cols)


def cells(rows):
    """Feedback records absorbed into a fresh production state: its counts."""
    state = ProductionState(":memory:", "1D", 48)
    state.absorb("b1", field(rows).assign(kind="record", key="k"))
    return state.cells()


def test_accuracy_is_on_reviewed_records_with_coverage():
    rows = [
        (
            f"r{i}",
            "rel-1",
            "a",
            "1",
            ("1" if i < 8 else "7") if i < 10 else None,
            "2026-11-22T10:00:00+00:00",
        )
        for i in range(40)
    ]
    table = accuracy_table(cells(rows))
    (row,) = table.to_dict(orient="records")
    assert (row["records"], row["reviewed"], row["coverage"], row["accuracy"]) == (
        40,
        10,
        0.25,
        0.8,
    )
    low, high = wilson_interval(8, 10)
    assert row["ci95_low"] == round(low, 4) and low < 0.8 < high


def test_business_metrics_say_what_cannot_be_measured():
    at = "2026-11-22T10:00:00+00:00"
    rows = [
        ("a", "r", "c", "1", "1", at),
        ("b", "r", "c", "2", "1", at),
        ("c", "r", "c", "1", "2", at),
        ("d", "r", "c", "3", None, at),
    ]
    out = business_metrics(cells(rows), ["1"])
    assert out["events_reviewed"] == 2 and out["missed_event_share"] == 0.5
    assert (
        out["caught_by_model_not_humans_share"] is None
        and "blind" in out["caught_by_model_not_humans_note"]
    )


def queue_records(n_uncertain=60):
    rows = []
    for i in range(n_uncertain):  # 60 hesitations, all between 3 and 8, plus a few others
        pair = ("3", "8") if i < 50 else ("4", "9")
        p1 = 0.5 + i / 1000
        rows.append(
            (
                f"u{i}",
                f"{i:064x}",
                pair[0],
                p1,
                None,
                [[pair[0], p1], [pair[1], 1 - p1 - 0.01]],
                f"{i * 2654435761 % 2**64:016x}",
            )
        )
    rows.append(("w0", "f" * 64, "1", 0.99, "7", [["1", 0.99], ["7", 0.005]], "0" * 16))
    rows.append(("ok", "e" * 64, "2", 0.55, "2", [["2", 0.55], ["3", 0.4]], "1" * 16))
    frame = pd.DataFrame(
        rows,
        columns=[
            "record_id",
            "image_id",
            "predicted",
            "confidence",
            "corrected_label",
            "top_k",
            "phash",
        ],
    )
    frame["top_k"] = frame["top_k"].map(json.dumps)
    return frame.assign(
        release="rel-1", device_id="d", uri="u", key="images/ab/" + frame["image_id"] + ".png"
    )


def test_queue_puts_errors_first_then_uncertain_and_stays_diverse():
    records = queue_records()
    queue = annotation_queue(records, set(), QueuePolicy(size=10, decay=0.5))
    assert queue.iloc[0]["record_id"] == "w0" and queue.iloc[0]["reason"] == "wrong"
    assert "ok" not in set(queue["record_id"])  # reviewed and right: nothing to learn
    pairs = queue.iloc[1:].groupby(["predicted", "second"]).size()
    assert pairs.get(("4", "9"), 0) >= 3  # without diversity all 9 would be 3-vs-8
    undiverse = annotation_queue(records, set(), QueuePolicy(size=10, decay=1.0))
    assert undiverse.iloc[1:].groupby(["predicted", "second"]).size().get(("4", "9"), 0) == 0
    # an image an expert already labeled is not queued again
    again = annotation_queue(records, {"f" * 64}, QueuePolicy(size=10))
    assert "w0" not in set(again["record_id"])
    tasks = labelstudio_queue_tasks(queue, "q-1")
    assert tasks[0]["data"]["image"] == f"/data/local-files/?d=images/{'f' * 64}.png"
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == ["7"]


def test_queue_skips_near_duplicates():
    records = queue_records()
    records["phash"] = "0" * 16  # every image looks the same
    queue = annotation_queue(records, set(), QueuePolicy(size=10, max_hamming=4))
    assert len(queue) == 1


def test_ontology_report_flags_rare_classes_and_symmetric_confusions():
    rows = []
    for i in range(30):
        rows.append((f"a{i}", "r", "c", "1" if i % 5 else "7", "1", "t"))  # 1 -> 7 20%
        rows.append((f"b{i}", "r", "c", "7" if i % 4 else "1", "7", "t"))  # 7 -> 1 25%
        rows.append((f"c{i}", "r", "c", "2", "3" if i < 10 else "2", "t"))  # 3 never predicted
    per_class, pairs, suggestions = ontology_report(field(rows), ["1", "2", "3", "7", "9"])
    kinds = set(zip(suggestions["kind"], suggestions["classes"]))
    assert ("merge", "1+7") in kinds and ("never_predicted", "3") in kinds
    assert ("never_seen", "9") in kinds
    assert pairs.iloc[0]["true"] == "3" and pairs.iloc[0]["predicted"] == "2"


def test_vetting_quarantines_bad_batches_whole_and_narrows_a_failed_contract(tmp_path):
    from types import SimpleNamespace

    from cvops_pipelines.core.learn.feedback import vet_batches

    store = LocalStore(tmp_path / "store")
    fleet = Fleet(store, "dev-001", "dev-002", "dev-003")
    good, good_payload, _, _ = device_batch(tmp_path, device="dev-001")
    bad, bad_payload, _, _ = device_batch(tmp_path, device="dev-002")
    for batch, payload in ((good, good_payload), (bad, bad_payload)):
        fleet.upload(batch, payload)
    calls = []

    def validate(records, label):  # the contract: dev-002's records break it
        devices = sorted(set(records["device_id"]))
        calls.append((devices, label))
        failure = SimpleNamespace(
            expectation="expect_column_values_to_be_in_set",
            kwargs={"column": "device_id"},
            unexpected_count=4,
            examples=["dev-002"],
        )
        return SimpleNamespace(success="dev-002" not in devices, failures=[failure])

    batches = [good, bad, "dev-003-b000001"]
    vetted = vet_batches(store, batches, ["1", "7"], validate, fleet.register())
    assert vetted.accepted == [good]
    reasons = dict(zip(vetted.quarantined["batch_id"], vetted.quarantined["reason_code"]))
    assert reasons == {bad: "contract_failed", "dev-003-b000001": "missing_batch"}
    # all at once first; one by one only after that failed; the accepted rest checked again
    assert calls == [
        (["dev-001", "dev-002"], ""),
        (["dev-001"], None),
        (["dev-002"], None),
        (["dev-001"], "-accepted"),
    ]
    assert vetted.contract.success and len(vetted.records()) == 4
    assert vetted.frames[bad].empty and store.exists(f"quarantine/feedback/{bad}.zip")
    assert vetted.summary()["quarantined_batches"] == 2 and vetted.new_images == 4


def test_a_batch_that_collides_with_another_is_quarantined_and_the_rest_go_on(tmp_path, repo_root):
    """Each passes the real feedback contract alone; together two claim the same record ids (a
    device that lost its batch counter re-sends its records under a new batch id)."""
    from cvops_pipelines.core.base.contracts import validate
    from cvops_pipelines.core.learn.feedback import vet_batches

    store = LocalStore(tmp_path / "store")
    fleet = Fleet(store, "dev-001", "dev-002")
    good, payload, _, _ = device_batch(tmp_path, device="dev-001")
    other, other_payload, _, _ = device_batch(tmp_path, device="dev-002")
    thief = "dev-001-b000009"  # dev-001's records again, as another batch of dev-001

    def rename(files):
        lines = files["records.jsonl"].decode().splitlines()
        records = [json.loads(line) | {"batch_id": thief} for line in lines]
        files["records.jsonl"] = "\n".join(json.dumps(r) for r in records).encode()

    for name, data in ((good, payload), (thief, rezip(payload, rename)), (other, other_payload)):
        fleet.upload(name, data)
    suite, params = (
        repo_root / "data_contracts/gx/feedback.json",
        {"known_releases": ["rel-1-abc"], "classes": [str(d) for d in range(10)]},
    )

    def check(records, label):
        return validate(records, suite, params)

    assert check(batch_frame(parse_batch(rezip(payload, rename), thief)), None).success
    classes = [str(d) for d in range(10)]
    vetted = vet_batches(store, [good, thief, other], classes, check, fleet.register())
    assert vetted.accepted == [good, other] and vetted.contract.success
    (row,) = vetted.quarantined.itertuples()
    assert row.batch_id == thief and row.reason_code == "contract_failed"
    assert (
        "together with the batches accepted before it" in row.reason and "record_id" in row.reason
    )


@pytest.mark.parametrize(
    "change, code",
    [
        (lambda f: f.update({"padding.bin": b"\0" * 1_000_000}), "unexpected_entry"),
        (lambda f: f.update({f"images/{'a' * 64}.bin": b"x"}), "unexpected_entry"),
        (lambda f: f.update({"images/../../etc/evil.bin": b"x"}), "unsafe_entry"),
        (lambda f: f.update({f"images/{'b' * 64}.bin": b"\0" * (65 * 2**20)}), "batch_too_large"),
        (lambda f: f.update({"corrections.jsonl": b"\xff\xfe{}"}), "malformed_record"),
    ],
)
def test_bounded_parsing_refuses_bombs_strays_and_bad_text(tmp_path, change, code):
    batch, payload, _, _ = device_batch(tmp_path)
    with pytest.raises(BatchRejected) as err:
        parse_batch(rezip(payload, change), batch)
    assert err.value.code == code


def test_a_huge_field_is_refused_not_stored(tmp_path):
    batch, payload, _, _ = device_batch(tmp_path)

    def bloat(files):
        lines = [json.loads(x) for x in files["records.jsonl"].decode().splitlines()]
        lines[0]["top_k"] = [["1", 0.9]] * 100_000  # a 1.3 MB list
        lines[1]["cohort"] = "x" * 5_000_000
        files["records.jsonl"] = "\n".join(json.dumps(x) for x in lines).encode()

    with pytest.raises(BatchRejected, match="top_k must be at most 20|5000000 characters"):
        parse_batch(rezip(payload, bloat), batch)


def streamed_batch(tmp_path, device="cam-7"):
    """A device buffer's batch from a stream: six frames, images kept for two of them, one of
    the dropped ones reviewed by the operator (a correction needs no image to count)."""
    import hashlib

    buffer = FeedbackBuffer(tmp_path / f"{device}.db", device, "site-a")
    ids = []
    for i in range(6):
        image = png(100 + i)
        ids.append(
            buffer.record(
                "rel-1-abc",
                hashlib.sha256(image).hexdigest(),
                image if i in (1, 4) else None,
                "1",
                0.9,
                [("1", 0.9), ("7", 0.05)],
                source="rtsp://cam-7/stream",
                frame_time=0.5 * i,
                keep=i in (1, 4),
                reason="uncertain" if i in (1, 4) else "",
                value=2.5 if i in (1, 4) else 0.0,
            )
        )
    assert buffer.attach(ids[2], png(102))  # corrected while the agent held the frame
    buffer.correct(ids[2], "7")
    buffer.correct(ids[5], "1")  # reviewed after the frame went: the review stands alone
    batch = buffer.seal()
    payload = buffer.payload(batch)
    buffer.close()
    return batch, payload, ids


def test_a_streamed_batch_carries_every_record_and_only_the_kept_images(tmp_path):
    batch, payload, ids = streamed_batch(tmp_path)
    parsed = parse_batch(payload, batch)
    frame = batch_frame(parsed)
    store = LocalStore(tmp_path / "store")
    assert store_images(store, parsed, frame) == 3  # ids[1], ids[4] and the corrected ids[2]
    records = frame.set_index("record_id")
    assert list(records["image_kept"]) == [False, True, True, False, True, False]
    assert records["key"].notna().tolist() == list(records["image_kept"])
    assert set(records["source"]) == {"rtsp://cam-7/stream"}
    assert list(records["frame_time"]) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    resolved = resolve_records(frame)
    with_image = resolved[resolved["key"].notna()]
    assert len(feedback_labels(with_image)) == 1 and len(feedback_manifest(with_image)) == 3

    state = ProductionState(":memory:", "1D", 48)
    state.absorb(batch, frame.assign(device_id="cam-7"))
    coverage = state.coverage().set_index("device_id").loc["cam-7"]
    assert (coverage["frames"], coverage["images_kept"], coverage["reviewed"]) == (6, 3, 2)
    assert len(state.latest("rel-1-abc")) == 3  # drift reruns the model: images only
    state.close()


def test_a_record_that_claims_its_image_came_still_needs_it(tmp_path):
    batch, payload, _ = streamed_batch(tmp_path)
    with pytest.raises(BatchRejected) as raised:
        parse_batch(rezip(payload, lambda f: f.update({
            "records.jsonl": f["records.jsonl"].replace(b', "image_kept": false', b"")
        })), batch)  # fmt: skip
    assert raised.value.code == "missing_image"
    for bad in (b'"image_kept": "no"', b'"frame_time": -1', b'"source": 7'):
        lines = lambda f, bad=bad: f.update(  # noqa: E731
            {"records.jsonl": f["records.jsonl"].replace(b'"image_kept": false', bad, 1)}
        )
        with pytest.raises(BatchRejected) as raised:
            parse_batch(rezip(payload, lines), batch)
        assert raised.value.code in ("malformed_record", "missing_image")
