"""Label Studio as the annotation backend: a published folder (an annotation queue's tasks.json
with the model's answers as predictions, or a label review's tasks; the labeling config the
ontology made) becomes tasks in a Label Studio project, in sub-batches by rank, and each
answered sub-batch comes back as one drop with its findings, exactly once, before the next
goes out.

Images reach Label Studio through its local-files storage, the set-up of a team that runs Label
Studio on-premises beside its data: the server serves the queue's own files (no copy, no upload
that Label Studio would rename) from under its `LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`. On S3,
tasks name `s3://bucket/key` and the operator connects the bucket to the project as a source
storage with pre-signed URLs, so the images never pass through Label Studio either.

Exactly once: the drop's name is a hash of the annotations it carries (id and last edit), so a
poll that crashed after writing it writes nothing the next time; an annotation edited later
has a new edit time and lands in a newer drop, where the pool's latest-vote rule makes it win.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, unquote

from cvops_pipelines.core.base.store import LocalStore, Store
from cvops_pipelines.core.ingest.intake import MARKER
from cvops_pipelines.core.learn.answer_findings import findings
from cvops_pipelines.core.learn.labelstudio_client import LabelStudio, LabelStudioError
from cvops_pipelines.core.learn.retraining import ModelFacts, SubBatchFacts, read_facts, write_facts

LOCAL_FILES = "/data/local-files/?d="
STATE = "annotation/labelstudio"  # what was pushed, what came back, what went missing
EDITS_WATCHED = timedelta(days=14)  # a finished queue's answers edited later still come back


@dataclass(frozen=True)
class Pushed:
    project: int
    task_ids: list[int]  # the first sub-batch's
    batches: int  # the sub-batches the queue goes out in
    already: bool  # the queue had been pushed before: nothing new was imported


def _image_reference(ls: LabelStudio, store: Store, key: str) -> str:
    """How Label Studio reaches the stored file `key`."""
    if isinstance(store, LocalStore):
        root = Path(ls.files_root or store.local_path("")).resolve()
        path = store.local_path(key).resolve()
        if not path.is_relative_to(root):
            raise LabelStudioError(
                f"{path} is not under Label Studio's local-files document root {root}: start "
                "Label Studio with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT at or above the cvops "
                "store, and set CVOPS_LABELSTUDIO_FILES_ROOT to it"
            )
        return LOCAL_FILES + quote(path.relative_to(root).as_posix())
    return store.uri(key)  # s3://bucket/key: the project's S3 source storage presigns it


# What Label Studio may serve from the cvops store (never the whole store: keys live there)
SERVED = ("annotation/queues", "images", "reports/label_issues")


def _queue_tasks(
    ls: LabelStudio, store: Store, prefix: str, tasks_file: str
) -> tuple[list[dict], list[str]]:
    """The folder's tasks (rank order) with image URLs Label Studio can reach (a queue names
    its copies relative to the folder, a review the store's originals by URI), and the store
    key of each task's image. Annotations a file pre-fills (a review's current boxes) go first
    among the predictions: imported as annotations they would read as answers."""
    tasks, keys = json.loads(store.read_bytes(f"{prefix}/{tasks_file}")), []
    root = store.uri("").rstrip("/") + "/"
    for task in tasks:
        data = task["data"]
        for name, value in data.items():
            if not isinstance(value, str):
                continue
            if value.startswith(LOCAL_FILES):
                key = f"{prefix}/{value.removeprefix(LOCAL_FILES)}"
            elif value.startswith(root):
                key = unquote(value.removeprefix(root))
            else:
                continue
            data[name] = _image_reference(ls, store, key)
            if name == "image":
                keys.append(key)
        data["cvops_push"] = posixpath.basename(prefix)
        given = [
            {"model_version": "current labels", "result": a.get("result") or []}
            for a in task.pop("annotations", None) or []
        ]
        task["predictions"] = given + (task.get("predictions") or [])
    return tasks, keys


def _served(key: str) -> str:
    root = next((r for r in SERVED if key.startswith(f"{r}/")), None)
    if root is None:
        raise LabelStudioError(f"{key} is outside what Label Studio may serve ({SERVED})")
    return root


def _record_key(queue_id: str) -> str:
    return f"{STATE}/queues/{queue_id}.json"


def _save(store: Store, record: dict) -> None:
    store.write_bytes(_record_key(record["queue_id"]), json.dumps(record, indent=1).encode())


def push_queue(
    ls: LabelStudio,
    store: Store,
    prefix: str,
    title: str,
    sub_batch: int = 0,
    tasks_file: str = "tasks.json",
    retrain_epochs: int = 0,
) -> Pushed:
    """The folder `prefix` (an annotation queue, or a label review with `tasks_file`) as
    tasks of the project `title` (made from the folder's labeling config when missing), in
    sub-batches of `sub_batch` tasks by rank (0: all at once): the first now, each next one
    once the one before is answered (and, with `retrain_epochs`, once a quick retrain on it
    has trained). Pushing the same folder again imports nothing."""
    queue_id = posixpath.basename(prefix)
    if store.exists(_record_key(queue_id)):
        record = json.loads(store.read_bytes(_record_key(queue_id)))
        return Pushed(record["project"], record["batches"][0]["task_ids"], _count(record), True)
    tasks, keys = _queue_tasks(ls, store, prefix, tasks_file)
    project = ls.project(title, store.read_bytes(f"{prefix}/labelstudio_config.xml").decode())
    if isinstance(store, LocalStore):
        for root in sorted({_served(k) for k in keys}):
            ls.serve_folder(project, store.local_path(root).resolve())
    record = {
        "project": project,
        "queue_id": queue_id,
        "prefix": prefix,
        "tasks_file": tasks_file,
        "url": ls.url,
        "tasks": len(tasks),
        "sub_batch": sub_batch if 0 < sub_batch < len(tasks) else len(tasks),
        "retrain_epochs": retrain_epochs,
        "pushed_at": _now(),
        "batches": [],
        "seen": {},  # annotation id -> its last edit, of the answers already written as drops
        "deleted": [],
    }
    _push_next(ls, store, record, ls.export(project))
    _save(store, record)
    return Pushed(project, record["batches"][0]["task_ids"], _count(record), False)


def _count(record: dict) -> int:
    return -(-record["tasks"] // max(record["sub_batch"], 1))


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _push_next(ls: LabelStudio, store: Store, record: dict, existing: list[dict]) -> None:
    """The queue's next sub-batch. Tasks of it that Label Studio already holds (an import whose
    record was never saved) are adopted, not imported twice."""
    start = sum(len(b["task_ids"]) for b in record["batches"])
    tasks, keys = _queue_tasks(ls, store, record["prefix"], record["tasks_file"])
    chunk = slice(start, start + record["sub_batch"])
    tasks, keys = tasks[chunk], keys[chunk]
    held = {
        t["data"].get("image_id"): t["id"]
        for t in existing
        if t.get("data", {}).get("cvops_push") == record["queue_id"]
    }
    if all(t["data"]["image_id"] in held for t in tasks):
        ids = [held[t["data"]["image_id"]] for t in tasks]
    else:
        ids = ls.import_tasks(record["project"], tasks)
    record["batches"].append(
        {
            "task_ids": ids,
            "images": {str(i): key for i, key in zip(ids, keys)},
            "pushed_at": _now(),
            "done_at": None,
            "drop": None,
            "findings": None,
        }
    )


def push_or_defer(
    ls: LabelStudio,
    store: Store,
    prefix: str,
    title: str,
    sub_batch: int = 0,
    tasks_file: str = "tasks.json",
    retrain_epochs: int = 0,
) -> Pushed | str:
    """`push_queue`, or, when Label Studio cannot take it now, the reason, with the folder
    left pending for the next poll to push (its files are there either way)."""
    try:
        return push_queue(ls, store, prefix, title, sub_batch, tasks_file, retrain_epochs)
    except LabelStudioError as e:
        pending = f"{STATE}/pending/{posixpath.basename(prefix)}.json"
        waiting = {
            "prefix": prefix,
            "title": title,
            "sub_batch": sub_batch,
            "file": tasks_file,
            "retrain_epochs": retrain_epochs,
        }
        store.write_bytes(pending, json.dumps(waiting).encode())
        return str(e)


@dataclass
class Poll:
    """What one poll of the pushed queues found."""

    pushed: list[str] = field(default_factory=list)  # queues pushed late (Label Studio was down)
    drops: list[str] = field(default_factory=list)  # drop names written
    answered: int = 0  # annotations in them
    deleted: list[str] = field(default_factory=list)  # "project/task": gone from Label Studio
    pending: int = 0  # pushed tasks without an answer yet
    completed: list[dict] = field(default_factory=list)  # sub-batches done: their findings
    next_pushed: list[str] = field(default_factory=list)  # "queue #n": sub-batches sent now
    retraining: list[str] = field(default_factory=list)  # "queue #n": waits for a quick retrain
    progress: list[dict] = field(default_factory=list)  # per queue
    malformed: list[str] = field(default_factory=list)  # "project/task": answers not readable


def _edit_time(annotation: dict) -> str:
    return str(annotation.get("updated_at") or annotation.get("created_at"))


def collect_answers(ls: LabelStudio, store: Store, drops: Store) -> Poll:
    """One poll: queues Label Studio could not take before are pushed; a sub-batch whose every
    task is answered (or deleted) becomes one drop (images/ and export.json, then the marker)
    with its findings; the next sub-batch goes out on the poll after its findings are shown;
    answers given or edited after their sub-batch's drop land in a newer drop; pushed tasks
    Label Studio no longer has are reported once."""
    poll = Poll()
    for entry in list(store.list(f"{STATE}/pending/")):
        waiting = json.loads(store.read_bytes(entry.key))
        queue_id = posixpath.basename(waiting["prefix"])
        if not store.exists(_record_key(queue_id)):
            push_queue(
                ls,
                store,
                waiting["prefix"],
                waiting["title"],
                waiting["sub_batch"],
                waiting["file"],
                waiting["retrain_epochs"],
            )
            poll.pushed.append(queue_id)
    records = [
        json.loads(store.read_bytes(e.key))
        for e in store.list(f"{STATE}/queues/")
        if e.key.endswith(".json")
    ]
    mine = [r for r in records if r["url"].rstrip("/") == ls.url.rstrip("/") and _watched(r)]
    emails = ls.emails() if mine else {}
    exports: dict[int, list[dict]] = {}
    for record in sorted(mine, key=lambda r: r["pushed_at"]):
        if record["project"] not in exports:
            exports[record["project"]] = ls.export(record["project"])
        before = json.dumps(record, sort_keys=True)
        _poll_queue(ls, record, exports[record["project"]], emails, store, drops, poll)
        if json.dumps(record, sort_keys=True) != before:  # a quiet poll writes nothing
            _save(store, record)
    return poll


def _watched(record: dict, now: datetime | None = None) -> bool:
    """Still polled: until every task went out and was answered, then for EDITS_WATCHED more,
    for answers edited late (each poll exports the project: finished queues would cost
    every poll more, forever)."""
    batches = record["batches"]
    sent = sum(len(b["task_ids"]) for b in batches)
    if sent < record["tasks"] or not batches[-1]["done_at"]:
        return True
    done = datetime.fromisoformat(batches[-1]["done_at"])
    return (now or datetime.now(UTC)) - done <= EDITS_WATCHED


def _poll_queue(ls, record, export, emails, store, drops, poll: Poll) -> None:
    by_id = {t.get("id"): t for t in export}
    project, queue_id = record["project"], record["queue_id"]
    batches = record["batches"]
    answered_at = []
    for n, batch in enumerate(batches, 1):
        ids = batch["task_ids"]
        for task in ids:
            if task not in by_id and task not in record["deleted"]:
                record["deleted"].append(task)
                poll.deleted.append(f"{project}/{task}")
        tasks = []
        for i in (i for i in ids if i in by_id):
            if _well_formed(by_id[i]):
                tasks.append(_named(by_id[i], emails))
            else:  # turned away alone: its sub-batch waits, the rest of the poll goes on
                poll.malformed.append(f"{project}/{i}")
                tasks.append({"id": i, "annotations": []})
        answered_at += [a.get("created_at") for t in tasks for a in t.get("annotations") or []]
        if batch["done_at"] is None:
            waiting = sum(1 for t in tasks if not t.get("annotations"))
            poll.pending += waiting
            if waiting:
                continue
            batch["findings"] = findings(tasks, _model_answers(store, record))
            fresh = tasks
            batch["done_at"] = _now()
            poll.completed.append({"queue": queue_id, "sub_batch": n, **batch["findings"]})
            if record["retrain_epochs"] and n * record["sub_batch"] < record["tasks"]:
                asked = SubBatchFacts(queue_id, n, record["retrain_epochs"])
                write_facts(store, asked)
                batch["retrain_asked_at"] = asked.at
        else:
            fresh = _answers(tasks, record["seen"])
        fresh = [t for t in fresh if t.get("annotations")]
        if fresh:
            name = _write_drop(project, fresh, batch["images"], store, drops)
            batch["drop"] = batch["drop"] or name
            poll.drops.append(name)
            poll.answered += sum(len(t["annotations"]) for t in fresh)
            record["seen"].update(
                {str(a.get("id")): _edit_time(a) for t in fresh for a in t["annotations"]}
            )
    last = batches[-1]
    sent = sum(len(b["task_ids"]) for b in batches)
    if (
        last["done_at"]
        and sent < record["tasks"]
        and not any(c["queue"] == queue_id for c in poll.completed)
    ):
        if _retrained(store, last.get("retrain_asked_at")):
            _push_next(ls, store, record, export)
            poll.next_pushed.append(f"{queue_id} #{len(batches)}")
        else:
            poll.retraining.append(f"{queue_id} #{len(batches) + 1}")
    poll.progress.append(_progress(record, answered_at))


def _retrained(store: Store, asked_at: float | None) -> bool:
    """No quick retrain was asked for, or a model trained since it was."""
    if asked_at is None:
        return True
    model = read_facts(store, ModelFacts)
    return model is not None and model.at > asked_at


def _model_answers(store: Store, record: dict) -> dict[str, list[dict]]:
    """Image id -> what the folder pre-filled: the model's answer (a queue) or the current
    labels (a review)."""
    tasks = json.loads(store.read_bytes(f"{record['prefix']}/{record['tasks_file']}"))
    return {
        t["data"]["image_id"]: ((t.get("annotations") or t.get("predictions"))[0].get("result"))
        or []
        for t in tasks
        if t.get("annotations") or t.get("predictions")
    }


def _well_formed(task: dict) -> bool:
    """Annotations as Label Studio writes them: a list of objects, each result a list."""
    annotations = task.get("annotations") or []
    return isinstance(annotations, list) and all(
        isinstance(a, dict) and isinstance(a.get("result") or [], list) for a in annotations
    )


def _named(task: dict, emails: dict[int, str]) -> dict:
    """The task with each annotator named by email where Label Studio told us."""
    annotations = []
    for a in task.get("annotations") or []:
        who = a.get("completed_by")
        annotations.append(
            a | {"completed_by": {"id": who, "email": emails[who]}} if who in emails else a
        )
    return task | {"annotations": annotations}


def _progress(record: dict, answered_at: list) -> dict:
    """Done / pending of one queue and its pace: answers in the last hour, and per hour since
    the queue went out."""
    batches, deleted = record["batches"], set(record["deleted"])
    done = sum(1 for b in batches if b["done_at"] for t in b["task_ids"] if t not in deleted)
    now = datetime.now(UTC)
    times = [datetime.fromisoformat(str(t).replace("Z", "+00:00")) for t in answered_at if t]
    hours = max((now - datetime.fromisoformat(record["pushed_at"])).total_seconds() / 3600, 1e-9)
    return {
        "queue": record["queue_id"],
        "project": record["project"],
        "sub_batches_done": sum(1 for b in batches if b["done_at"]),
        "sub_batches": _count(record),
        "tasks_done": done,
        "tasks_pending": record["tasks"] - done - len(record["deleted"]),
        "answers": len(times),
        "answers_last_hour": sum(1 for t in times if (now - t).total_seconds() <= 3600),
        "answers_per_hour": round(len(times) / max(hours, 1 / 60), 1),
    }


def _answers(tasks: list[dict], seen: dict[str, str]) -> list[dict]:
    """The tasks with an annotation that is new or edited since `seen` (annotation id -> last
    edit), each with only those annotations."""
    out = []
    for task in tasks:
        fresh = [
            a for a in task.get("annotations") or [] if seen.get(str(a.get("id"))) != _edit_time(a)
        ]
        if fresh:
            out.append(task | {"annotations": fresh})
    return out


def _write_drop(
    project: int, tasks: list[dict], images: dict[str, str], store: Store, drops: Store
) -> str:
    """A Label Studio export drop of `tasks`, named by what it carries; an existing complete
    drop of that name (a poll that stopped before saving its state) is left as it is."""
    carried = sorted((t["id"], a.get("id"), _edit_time(a)) for t in tasks for a in t["annotations"])
    digest = hashlib.sha256(json.dumps(carried).encode()).hexdigest()[:12]
    name = f"labelstudio-p{project}-{digest}"
    drop = drops.child(name)
    if drop.exists(MARKER):
        return name
    for task in tasks:
        key = images[str(task["id"])]
        if store.exists(key):  # an image deleted since: its answer lands, ingest reports it
            drop.write_bytes(f"images/{posixpath.basename(key)}", store.read_bytes(key))
    drop.write_bytes("export.json", json.dumps(tasks, indent=1, ensure_ascii=False).encode())
    drop.write_bytes(MARKER, b"")
    return name
