"""A local Label Studio for the demo (`--annotator labelstudio`) and the tests: the real server
from its own virtualenv (`./dev demo --annotator labelstudio` and `./dev test` install it), a
free loopback port, local-files serving on a document root, an admin with a legacy API token,
annotators who sign up through its web form as people do, and the demo's oracle answering
queues through its API as an annotator would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

ADMIN, ADMIN_TOKEN = "admin@cvops.test", "cvops-admin-token-1234"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def labelstudio_venv() -> Path:
    """Where `./dev` installs Label Studio (CVOPS_LABELSTUDIO_VENV)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cvops/ls-venv"
    return Path(os.environ.get("CVOPS_LABELSTUDIO_VENV") or default)


@dataclass
class LabelStudioServer:
    url: str
    files_root: Path
    root: Path
    proc: subprocess.Popen
    log: Path

    @classmethod
    @contextmanager
    def start(cls, root: Path, port: int | None = None, files_root: Path | None = None):
        """Serves local files under `files_root` (default `root/files`); its database lives in
        `root/data` (so a restart on the same root and port is the same server)."""
        binary = labelstudio_venv() / "bin/label-studio"
        if not binary.exists():
            raise RuntimeError(
                f"{binary} is missing: `./dev demo --annotator labelstudio` and `./dev test` "
                "install Label Studio into its own virtualenv (or set CVOPS_LABELSTUDIO_VENV to "
                "one with label-studio 1.23)"
            )
        server = cls._spawn(binary, root, port or free_port(), files_root or root / "files")
        try:
            yield server
        finally:
            server.stop()

    @classmethod
    def _spawn(cls, binary: Path, root: Path, port: int, files: Path) -> LabelStudioServer:
        files.mkdir(parents=True, exist_ok=True)
        log = root / f"labelstudio-{time.monotonic_ns()}.log"
        env = {
            **os.environ,
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files),
            "COLLECT_ANALYTICS": "false",  # no telemetry, no version check against PyPI
            "LATEST_VERSION_CHECK": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
        }
        proc = subprocess.Popen(
            [
                str(binary), "start", "--no-browser", "--host", "127.0.0.1",
                "--port", str(port), "--data-dir", str(root / "data"),
                "--username", ADMIN, "--password", "cvops-admin-pass",
                "--user-token", ADMIN_TOKEN, "--enable-legacy-api-token",
            ],
            env=env,
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        server = cls(f"http://127.0.0.1:{port}", files, root, proc, log)
        server.wait_healthy()
        return server

    def wait_healthy(self, timeout: float = 300.0) -> None:
        """About a minute on an idle 2-core machine; a busy one takes longer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"label-studio exited with {self.proc.returncode}:\n{tail}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).json().get("status") == "UP":
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"Label Studio at {self.url} not healthy after {timeout}s")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        """The same server back (same database, port and files)."""
        port = int(self.url.rsplit(":", 1)[1])
        fresh = self._spawn(
            labelstudio_venv() / "bin/label-studio", self.root, port, self.files_root
        )
        self.proc, self.log = fresh.proc, fresh.log

    def signup(self, email: str, password: str = "annotator-pass-1") -> str:
        """An annotator through the sign-up form, as a person joins (or, already a member from
        an earlier run on this server, through the log-in form); their API token."""
        session = requests.Session()
        for form in ("signup", "login"):
            session.get(f"{self.url}/user/{form}/", timeout=30)
            session.post(
                f"{self.url}/user/{form}/",
                data={
                    "email": email,
                    "password": password,
                    "csrfmiddlewaretoken": session.cookies.get("csrftoken", ""),
                },
                headers={"Referer": f"{self.url}/user/{form}/"},
                timeout=30,
            ).raise_for_status()
            token = session.get(f"{self.url}/api/current-user/token", timeout=30)
            if token.ok and token.headers.get("content-type", "").startswith("application/json"):
                return token.json()["token"]
        raise RuntimeError(f"Label Studio at {self.url}: {email} can neither sign up nor log in")

    def api(self, token: str, method: str, path: str, **kwargs) -> requests.Response:
        answer = requests.request(
            method,
            f"{self.url}{path}",
            headers={"Authorization": f"Token {token}"},
            timeout=60,
            **kwargs,
        )
        answer.raise_for_status()
        return answer


class FileAnnotator:
    """Today's default: the oracle answers the queue's files and writes one drop, as a team
    copies a Label Studio export back by hand."""

    name = "files"

    def answer(self, runner, queue_id: str, truth: dict, result) -> list[str]:
        from cvops_pipelines import settings
        from cvops_pipelines.demo.data import complete_queue

        drop = Path(settings.drops_uri()) / f"annotated-{queue_id}"
        answered = complete_queue(
            settings.cvops_home() / "annotation" / "queues" / queue_id, truth, drop, result=result
        )
        print(
            f"\n== annotate: the oracle answered {answered} queued images -> drop {drop.name} "
            "(Label Studio JSON export + images, marked complete)"
        )
        return [drop.name]


class LabelStudioAnnotator:
    """The oracle as a Label Studio annotator: it signs up, answers each sub-batch the
    pipeline pushed with the truth through the API (and presses Skip where it knows none), and
    the `labelstudio_answers` sensor brings each sub-batch back as a drop, with its findings,
    before the next goes out."""

    name = "labelstudio"

    def __init__(self, server: LabelStudioServer, email: str = "oracle@demo.test") -> None:
        self.server, self.email = server, email
        self.token = server.signup(email)

    def answer(self, runner, queue_id: str, truth: dict, result) -> list[str]:
        import json

        from cvops_pipelines import settings

        store = settings.cvops_store()
        key = f"annotation/labelstudio/queues/{queue_id}.json"
        if not store.exists(key):
            raise RuntimeError(f"queue {queue_id} was not pushed to Label Studio ({key} missing)")
        record = json.loads(store.read_bytes(key))
        print(
            f"\n== annotate in Label Studio ({self.server.url}, project {record['project']}): "
            f"{record['tasks']} tasks in sub-batches of {record['sub_batch']}, as {self.email}"
        )
        shown: set[int] = set()
        for _ in range(2 * record["tasks"] + 4):  # each sub-batch takes two polls at most
            batch = record["batches"][-1]
            if batch["done_at"] is None:
                self._answer(batch["task_ids"], truth, result)
            elif sum(len(b["task_ids"]) for b in record["batches"]) >= record["tasks"]:
                break
            runner.tick("labelstudio_answers")  # the sub-batch's drop, or the next sub-batch
            record = json.loads(store.read_bytes(key))
            for number, done in enumerate(record["batches"], 1):
                if done["done_at"] and number not in shown:
                    shown.add(number)
                    _print_findings(number, done)
        else:
            raise RuntimeError(f"queue {queue_id}: its answers did not come back from Label Studio")
        return [b["drop"] for b in record["batches"] if b["drop"]]

    def _answer(self, task_ids: list[int], truth: dict, result) -> None:
        for task_id in task_ids:
            task = self.server.api(self.token, "GET", f"/api/tasks/{task_id}").json()
            if task.get("total_annotations") or task.get("cancelled_annotations"):
                continue
            known = truth.get(task["data"].get("image_id"))
            answer = (
                {"result": [], "was_cancelled": True}  # Skip: the oracle does not know it
                if known is None
                else {"result": result(known)}
            )
            self.server.api(self.token, "POST", f"/api/tasks/{task_id}/annotations", json=answer)


def _print_findings(number: int, batch: dict) -> None:
    found = batch["findings"]
    confused = ", ".join(
        f"{c['model']}→{c['annotator']} ×{c['count']}" for c in found["confusion"][:3]
    )
    overruled = found["overruled_model"]
    print(
        f"   sub-batch {number}: {found['answered']} answered, {found['skipped']} skipped"
        + (f"; {overruled:.0%} overrule the model's answer" if overruled is not None else "")
        + (f" ({confused})" if confused else "")
        + f" -> drop {batch['drop']}"
    )
