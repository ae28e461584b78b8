"""Label Studio as the annotation backend: a published queue folder (tasks.json with the model's
answers as predictions, the labeling config the ontology made, images/) becomes tasks in a
Label Studio project, and the tasks annotators complete come back as drops, exactly once.

Plain HTTP against Label Studio's REST API (`requests`), so the pipeline carries no SDK (the SDK
pins its own httpx and pydantic). The token travels only in the Authorization header: no message
here contains it.

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
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import requests

from cvops_pipelines.core.base.store import LocalStore, Store
from cvops_pipelines.core.ingest.intake import MARKER

LOCAL_FILES = "/data/local-files/?d="
STATE = "annotation/labelstudio"  # what was pushed, what came back, what went missing


class LabelStudioError(RuntimeError):
    """Label Studio cannot be used now; the message says what to fix. Nothing was written."""


@dataclass(frozen=True)
class LabelStudio:
    """A Label Studio server as one user (legacy API token: `Authorization: Token ...`).
    `files_root`: Label Studio's local-files document root as this process sees it (empty: the
    store's own root, Label Studio started beside the pipeline)."""

    url: str
    token: str = field(repr=False)
    files_root: str = ""
    timeout: float = 30.0

    def call(self, method: str, path: str, **kwargs) -> object:
        where = f"{method} {self.url.rstrip('/')}{path.split('?')[0]}"
        try:
            response = requests.request(
                method,
                self.url.rstrip("/") + path,
                headers={"Authorization": f"Token {self.token}"},
                timeout=self.timeout,
                **kwargs,
            )
        except requests.RequestException as e:
            raise LabelStudioError(
                f"Label Studio at {self.url} is not answering ({type(e).__name__}): start it or "
                "fix CVOPS_LABELSTUDIO_URL; nothing was lost, the next poll retries"
            ) from None
        if response.status_code in (401, 403):
            raise LabelStudioError(
                f"{where}: Label Studio refused the token (HTTP {response.status_code}): set "
                "CVOPS_LABELSTUDIO_TOKEN to the API token of a user of the project's organization "
                "(Label Studio 1.23 needs legacy tokens enabled for the organization)"
            )
        if response.status_code >= 400:
            raise LabelStudioError(f"{where}: HTTP {response.status_code}: {response.text[:300]}")
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type", "?")
            raise LabelStudioError(
                f"{where} answered {kind}, not JSON ({response.text[:80]!r}): is "
                f"{self.url} a Label Studio server?"
            ) from None

    def health(self) -> None:
        answer = self.call("GET", "/health")
        if not isinstance(answer, dict) or answer.get("status") != "UP":
            raise LabelStudioError(f"Label Studio at {self.url} is not healthy: {answer!r}")

    def project(self, title: str, label_config: str) -> int:
        """The project of that title (made with the labeling config when there is none)."""
        listing = self.call("GET", "/api/projects?page_size=1000")
        projects = listing.get("results", []) if isinstance(listing, dict) else listing
        for project in projects:
            if project.get("title") == title:
                return int(project["id"])
        made = self.call(
            "POST", "/api/projects", json={"title": title, "label_config": label_config}
        )
        return int(made["id"])

    def serve_folder(self, project: int, path: Path) -> None:
        """A local-files storage on `path` for the project, so Label Studio may serve the files
        under it (no sync: tasks are imported with their predictions, not made from files)."""
        storages = self.call("GET", f"/api/storages/localfiles?project={project}")
        if any(Path(s.get("path", "")) == path for s in storages):
            return
        self.call(
            "POST",
            "/api/storages/localfiles",
            json={"project": project, "path": str(path), "title": "cvops", "use_blob_urls": True},
        )

    def import_tasks(self, project: int, tasks: list[dict]) -> list[int]:
        answer = self.call(
            "POST", f"/api/projects/{project}/import?return_task_ids=true", json=tasks
        )
        ids = answer.get("task_ids") if isinstance(answer, dict) else None
        if not isinstance(ids, list) or len(ids) != len(tasks):
            raise LabelStudioError(
                f"project {project}: importing {len(tasks)} tasks answered {answer!r}"
            )
        return [int(i) for i in ids]

    def export(self, project: int) -> list[dict]:
        """Every task of the project (annotated or not), in Label Studio's JSON export."""
        tasks = self.call(
            "GET", f"/api/projects/{project}/export?exportType=JSON&download_all_tasks=true"
        )
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise LabelStudioError(
                f"project {project}: the JSON export is not a list of tasks: {str(tasks)[:120]}"
            )
        return tasks

    def emails(self) -> dict[int, str]:
        """User id -> email, so labels name people; {} when the token may not list users (the
        drop then names annotators by Label Studio's numeric id)."""
        try:
            users = self.call("GET", "/api/users")
        except LabelStudioError:
            return {}
        return {int(u["id"]): u["email"] for u in users if isinstance(u, dict) and u.get("email")}

    def project_url(self, project: int) -> str:
        return f"{self.url.rstrip('/')}/projects/{project}/data"


@dataclass(frozen=True)
class Pushed:
    project: int
    task_ids: list[int]
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


def push_queue(ls: LabelStudio, store: Store, prefix: str, title: str) -> Pushed:
    """The queue folder `prefix` as tasks of the project `title` (made from the folder's
    labeling config when missing). Pushing the same queue again imports nothing."""
    queue_id = posixpath.basename(prefix)
    record_key = f"{STATE}/queues/{queue_id}.json"
    if store.exists(record_key):
        record = json.loads(store.read_bytes(record_key))
        return Pushed(record["project"], record["task_ids"], True)
    tasks = json.loads(store.read_bytes(f"{prefix}/tasks.json"))
    config = store.read_bytes(f"{prefix}/labelstudio_config.xml").decode()
    project = ls.project(title, config)
    if isinstance(store, LocalStore):
        ls.serve_folder(project, store.local_path(prefix).resolve().parent)
    images = {}
    for task in tasks:
        data = task["data"]
        for name, value in data.items():
            if isinstance(value, str) and value.startswith(LOCAL_FILES):
                key = f"{prefix}/{value.removeprefix(LOCAL_FILES)}"
                data[name] = _image_reference(ls, store, key)
                if name == "image":
                    images[data["image_id"]] = key
    ids = ls.import_tasks(project, tasks)
    record = {
        "project": project,
        "queue_id": queue_id,
        "url": ls.url,
        "task_ids": ids,
        "images": {str(i): images[t["data"]["image_id"]] for i, t in zip(ids, tasks)},
        "pushed_at": datetime.now(UTC).isoformat(),
    }
    store.write_bytes(record_key, json.dumps(record, indent=1).encode())
    return Pushed(project, ids, False)


def push_or_defer(ls: LabelStudio, store: Store, prefix: str, title: str) -> Pushed | str:
    """`push_queue`, or, when Label Studio cannot take it now, the reason, with the queue left
    pending for the next poll to push (the queue's files are there either way)."""
    try:
        return push_queue(ls, store, prefix, title)
    except LabelStudioError as e:
        pending = f"{STATE}/pending/{posixpath.basename(prefix)}.json"
        store.write_bytes(pending, json.dumps({"prefix": prefix, "title": title}).encode())
        return str(e)


@dataclass
class Poll:
    """What one poll of the pushed queues found."""

    pushed: list[str] = field(default_factory=list)  # queues pushed late (Label Studio was down)
    drops: list[str] = field(default_factory=list)  # drop names written
    answered: int = 0  # annotations in them
    deleted: list[str] = field(default_factory=list)  # "project/task": gone from Label Studio
    pending: int = 0  # pushed tasks without an answer yet


def _answers(tasks: list[dict], seen: dict[str, str]) -> list[dict]:
    """The tasks with an annotation that is new or edited since `seen` (annotation id -> last
    edit), each with only those annotations."""
    out = []
    for task in tasks:
        fresh = [
            a
            for a in task.get("annotations") or []
            if seen.get(str(a.get("id"))) != str(a.get("updated_at") or a.get("created_at"))
        ]
        if fresh:
            out.append(task | {"annotations": fresh})
    return out


def collect_answers(ls: LabelStudio, store: Store, drops: Store) -> Poll:
    """Every pushed queue's new and edited annotations as one drop per project (images/ and
    export.json, then the marker), and the pushed tasks Label Studio no longer has."""
    poll = Poll()
    for entry in list(store.list(f"{STATE}/pending/")):
        waiting = json.loads(store.read_bytes(entry.key))
        queue_id = posixpath.basename(waiting["prefix"])
        if not store.exists(f"{STATE}/queues/{queue_id}.json"):
            push_queue(ls, store, waiting["prefix"], waiting["title"])
            poll.pushed.append(queue_id)
    records = [
        json.loads(store.read_bytes(e.key))
        for e in store.list(f"{STATE}/queues/")
        if e.key.endswith(".json")
    ]
    by_project: dict[int, list[dict]] = {}
    for record in records:
        if record.get("url", ls.url).rstrip("/") == ls.url.rstrip("/"):
            by_project.setdefault(int(record["project"]), []).append(record)
    emails = ls.emails() if by_project else {}
    for project, pushed in sorted(by_project.items()):
        images = {int(t): key for r in pushed for t, key in r["images"].items()}
        tasks = [t for t in ls.export(project) if t.get("id") in images]
        present = {t["id"] for t in tasks}
        state_key = f"{STATE}/answers/{project}.json"
        state = json.loads(store.read_bytes(state_key)) if store.exists(state_key) else {}
        seen, gone = state.get("seen", {}), set(state.get("deleted", []))
        for task in sorted(set(images) - present):
            if str(task) not in gone:
                poll.deleted.append(f"{project}/{task}")
                gone.add(str(task))
        poll.pending += sum(1 for t in tasks if not t.get("annotations"))
        fresh = _answers(tasks, seen)
        if fresh:
            for task in fresh:
                for a in task["annotations"]:
                    if a.get("completed_by") in emails:
                        who = a["completed_by"]
                        a["completed_by"] = {"id": who, "email": emails[who]}
            name = _write_drop(project, fresh, images, store, drops)
            poll.drops.append(name)
            poll.answered += sum(len(t["annotations"]) for t in fresh)
            for task in fresh:
                for a in task["annotations"]:
                    seen[str(a.get("id"))] = str(a.get("updated_at") or a.get("created_at"))
        state = {"seen": seen, "deleted": sorted(gone)}
        store.write_bytes(state_key, json.dumps(state, indent=1).encode())
    return poll


def _write_drop(
    project: int, tasks: list[dict], images: dict[int, str], store: Store, drops: Store
) -> str:
    """A Label Studio export drop of `tasks`, named by what it carries; an existing complete
    drop of that name (a poll that stopped before saving its state) is left as it is."""
    carried = sorted(
        (t["id"], a.get("id"), str(a.get("updated_at"))) for t in tasks for a in t["annotations"]
    )
    digest = hashlib.sha256(json.dumps(carried).encode()).hexdigest()[:12]
    name = f"labelstudio-p{project}-{digest}"
    drop = drops.child(name)
    if drop.exists(MARKER):
        return name
    for task in tasks:
        key = images[task["id"]]
        drop.write_bytes(f"images/{posixpath.basename(key)}", store.read_bytes(key))
    drop.write_bytes("export.json", json.dumps(tasks, indent=1, ensure_ascii=False).encode())
    drop.write_bytes(MARKER, b"")
    return name
