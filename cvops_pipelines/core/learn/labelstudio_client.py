"""Label Studio's REST API, the few calls the annotation backend makes, over plain HTTP
(`requests`): the pipeline carries no SDK (the SDK pins its own httpx and pydantic). The token
travels only in the Authorization header: no message here contains it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import requests


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
