"""Start and stop a throwaway Label Studio for tests: the real server from its own virtualenv
(`./dev test` installs it), a free loopback port, local-files serving on a document root, an
admin with a legacy API token, and annotators who sign up through its web form as people do."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from cvops_pipelines_tests.helpers import free_port

ADMIN, ADMIN_TOKEN = "admin@cvops.test", "cvops-admin-token-1234"


def labelstudio_venv() -> Path:
    """Where `./dev test` installs Label Studio (CVOPS_LABELSTUDIO_VENV)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cvops/ls-venv"
    return Path(os.environ.get("CVOPS_LABELSTUDIO_VENV") or default)


@dataclass
class LabelStudioServer:
    url: str
    files_root: Path
    proc: subprocess.Popen
    log: Path

    @classmethod
    @contextmanager
    def start(cls, root: Path, port: int | None = None):
        """Serves local files under `root/files`; its database lives in `root/data` (so a
        restart on the same root and port is the same server)."""
        binary = labelstudio_venv() / "bin/label-studio"
        if not binary.exists():
            raise RuntimeError(
                f"{binary} is missing: `./dev test` installs Label Studio into its own virtualenv "
                "(or set CVOPS_LABELSTUDIO_VENV to one with label-studio 1.23)"
            )
        server = cls._spawn(binary, root, port or free_port())
        try:
            yield server
        finally:
            server.stop()

    @classmethod
    def _spawn(cls, binary: Path, root: Path, port: int) -> LabelStudioServer:
        (root / "files").mkdir(parents=True, exist_ok=True)
        log = root / f"labelstudio-{time.monotonic_ns()}.log"
        env = {
            **os.environ,
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root / "files"),
            "COLLECT_ANALYTICS": "false",  # no telemetry
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
        server = cls(f"http://127.0.0.1:{port}", root / "files", proc, log)
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
        root = self.files_root.parent
        fresh = self._spawn(labelstudio_venv() / "bin/label-studio", root, port)
        self.proc, self.log = fresh.proc, fresh.log

    def signup(self, email: str, password: str = "annotator-pass-1") -> str:
        """A new annotator through the sign-up form, as a person joins; their API token."""
        session = requests.Session()
        session.get(f"{self.url}/user/signup/", timeout=30)
        answer = session.post(
            f"{self.url}/user/signup/",
            data={
                "email": email,
                "password": password,
                "csrfmiddlewaretoken": session.cookies.get("csrftoken", ""),
            },
            headers={"Referer": f"{self.url}/user/signup/"},
            timeout=30,
        )
        answer.raise_for_status()
        return session.get(f"{self.url}/api/current-user/token", timeout=30).json()["token"]

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
