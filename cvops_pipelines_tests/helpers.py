"""Helpers several test modules share: free ports and waiting for servers, a real `mlflow
server`, real digit images as arrays, rewriting a zip. Fixtures stay in conftest.py."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cvops_pipelines.demo import digit_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(
    port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Until something listens on the port; fails at once if `proc` (the server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(
                f"server exited with {proc.returncode} before listening on {port}:\n{tail}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@contextmanager
def dagster_server(command: str, repo_root: Path, env: dict, log: Path):
    """`dagster dev` or `dagster-webserver` over this repo's workspace on a free loopback port;
    yields its URL. Stopped gracefully first; what still runs then (runs a daemon started) goes
    with the process group. How fast Dagster shuts down is not what the tests test."""
    import signal
    import urllib.request

    port = free_port()
    args = [str(Path(sys.executable).parent / command.split()[0]), *command.split()[1:]]
    proc = subprocess.Popen(
        [*args, "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=repo_root,
        env=env,
        start_new_session=True,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=120, proc=proc, log=log)
        base = f"http://127.0.0.1:{port}"
        urllib.request.urlopen(f"{base}/server_info", timeout=30).read()
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@contextmanager
def mlflow_server_process(root: Path, backend_uri: str, artifacts: str, env: dict | None = None):
    """`mlflow server` on a free loopback port, proxying artifacts to `artifacts`; yields its
    URL."""
    port = free_port()
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            artifacts,
        ],
        env={
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **(env or {}),
        },  # no GenAI job workers
        stdout=open(root / "server.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=90, proc=proc, log=root / "server.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


CLASSES = [str(d) for d in range(10)]


def digits(indices) -> tuple[list[np.ndarray], np.ndarray]:
    images = [np.asarray(digit_model.digit(i).convert("RGB")) for i in indices]
    return images, np.array([int(digit_model.digit_label(i)) for i in indices])


def rezip(payload: bytes, change) -> bytes:
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    change(files)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


class Fleet:
    """Devices with their own keys, enrolled in `store` by a release key as `cvops enrol` does;
    `upload` puts a batch and its device's signature where a device would."""

    def __init__(self, store, *devices: str) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from cvops_pipelines.core.learn.enrolment import enrol_device
        from cvops_pipelines.edge.identity import public_pem

        self.store, self.release_key = store, Ed25519PrivateKey.generate()
        self.keys = {d: Ed25519PrivateKey.generate() for d in devices}
        for device, key in self.keys.items():
            enrol_device(store, self.release_key, device, public_pem(key), "test operator")

    def register(self):
        from cvops_pipelines.core.learn.enrolment import read_register

        return read_register(self.store, [self.release_key.public_key()])

    def upload(self, batch: str, payload: bytes, signer=None) -> None:
        """Signed by the batch's own device unless `signer` (a private key) says otherwise."""
        from cvops_pipelines.edge.wire import batch_key, batch_signature_key, device_of_batch

        key = signer or self.keys[device_of_batch(batch)]
        self.store.write_bytes(batch_key(batch), payload)
        self.store.write_bytes(batch_signature_key(batch), key.sign(payload))


def shows_markdown_image(page, row: str, alt: str, shot) -> None:
    """Open a metadata row's [Show Markdown] dialog in the Dagster UI, check that the browser
    decoded the image in it, screenshot, close."""
    from playwright.sync_api import expect

    page.locator("tr", has_text=row).first.get_by_text("[Show Markdown]").click()
    image = page.get_by_role("dialog").locator(f"img[alt='{alt}']")
    expect(image).to_be_visible()
    assert image.evaluate("img => img.naturalWidth") > 200
    page.screenshot(path=shot)
    page.get_by_role("dialog").get_by_role("button", name="Close").click()
    expect(page.get_by_role("dialog")).to_have_count(0)
