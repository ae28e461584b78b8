"""The edge agent against a real release store on disk: every fault leaves the device serving
the release it had, and no feedback record is lost."""

import collections
import json
import subprocess
import sys
import zipfile

import pytest

from cvops_pipelines.core.ship.release import generate_keypair, load_private_key
from cvops_pipelines.demo.digit_model import png, trained_model
from cvops_pipelines.edge import agent as agent_module
from cvops_pipelines.edge.agent import EdgeAgent
from cvops_pipelines.edge.remote import DirRemote
from cvops_pipelines.edge.simulator import Crash
from cvops_pipelines_tests.corpus import digit_label
from cvops_pipelines_tests.edge.fleet_kit import central


@pytest.fixture(scope="module")
def models():
    return trained_model(quality="good"), trained_model(n=300, quality="good")


@pytest.fixture
def fleet(tmp_path, models):
    c = central(tmp_path)
    r1 = c.release(models[0], "1")
    c.releases.point("stable", r1.id, "first release", "test")
    return c, r1


def new_agent(tmp_path, c, remote=None, device="dev-1"):
    return EdgeAgent(tmp_path / device, remote or c.remote, c.public_key, device, "site-a")


def central_records(c) -> list[dict]:
    out = []
    for path in sorted((c.root / "feedback" / "batches").glob("*.zip")):
        with zipfile.ZipFile(path) as archive:
            out += [
                json.loads(line) for line in archive.read("records.jsonl").decode().splitlines()
            ]
    return out


def test_sync_predict_upload(tmp_path, fleet):
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    assert device.sync().status == "updated" and device.release == r1.id
    correct = sum(device.predict(png(i)).label == digit_label(i) for i in range(1000, 1040))
    assert correct / 40 > 0.7  # a real classifier on real digits, never trained on these
    prediction = device.predict(png(1041))
    device.correct(prediction.record_id, "1")
    assert len(prediction.top_k) == 3 and 0 < prediction.confidence <= 1
    sent = device.upload()
    assert sent.records == 41 and device.buffer.pending() == 0
    records = central_records(c)
    assert len(records) == 41 and records[-1]["corrected_label"] == "1"
    assert {r["release"] for r in records} == {r1.id}


def test_every_batch_leaves_signed_by_the_device_s_own_key(tmp_path, fleet):
    from cvops_pipelines.edge.bundle import load_public_key
    from cvops_pipelines.edge.wire import batch_signature_key

    c, _ = fleet
    device = new_agent(tmp_path, c)
    device.sync()
    device.predict(png(1))
    pem = device.public_key_pem()
    (batch,) = device.upload().batches
    payload = (c.root / "feedback" / "batches" / f"{batch}.zip").read_bytes()
    signature = (c.root / batch_signature_key(batch)).read_bytes()
    load_public_key(pem).verify(signature, payload)  # raises if not the device's signature
    assert (tmp_path / "dev-1" / "device.key").stat().st_mode & 0o777 == 0o600
    device.close()
    assert new_agent(tmp_path, c).public_key_pem() == pem  # the identity survives a restart
    assert new_agent(tmp_path, c, device="dev-2").public_key_pem() != pem
    with pytest.raises(ValueError, match="device id"):
        new_agent(tmp_path, c, device="../dev-3")


def test_delta_update_ships_a_fraction_of_the_model(tmp_path, fleet, models):
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    device.sync()
    r2 = c.release(models[1], "2", parent=r1.id)
    c.releases.point("stable", r2.id, "better", "test")
    result = device.sync()
    assert result.status == "updated" and result.used_delta and device.release == r2.id
    assert result.downloaded_bytes == r2.manifest["delta"]["size"]
    assert json.loads((tmp_path / "dev-1" / "current.json").read_text())["previous"] == r1.id


@pytest.mark.parametrize("fault", ["tampered_file", "wrong_key", "truncated", "missing_release"])
def test_bad_releases_are_rejected_and_the_device_keeps_serving(tmp_path, fleet, models, fault):
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    device.sync()
    key = None
    if fault == "wrong_key":
        other, _ = generate_keypair(tmp_path / "attacker")
        key = load_private_key(other)
    r2 = c.release(models[1], "2", key=key)
    model = c.root / "releases" / r2.id / "model.onnx"
    if fault == "tampered_file":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    elif fault == "truncated":
        model.write_bytes(model.read_bytes()[:-100])
    elif fault == "missing_release":
        (c.root / "releases" / r2.id / "manifest.sig").unlink()
    c.write_channel("stable", c.channel_doc(r2.id))  # signed: the fault is in the bundle
    result = device.sync()
    assert result.status == "rejected" and device.release == r1.id
    expected = {
        "tampered_file": "sha256",
        "wrong_key": "signature",
        "truncated": "size",
        "missing_release": "not in the store",
    }[fault]
    assert expected in result.detail
    assert device.predict(png(5)).release == r1.id  # still serving


def test_a_delta_that_does_not_apply_falls_back_to_the_full_model(tmp_path, fleet, models):
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    device.sync()
    r2 = c.release(models[1], "2", parent=r1.id)
    delta = c.root / "releases" / r2.id / r2.manifest["delta"]["file"]
    delta.write_bytes(delta.read_bytes()[::-1])
    c.releases.point("stable", r2.id, "better", "test")
    result = device.sync()
    assert result.status == "updated" and not result.used_delta and device.release == r2.id
    assert any("delta rejected" in e for e in device.events)


def test_store_unreachable_during_sync_and_upload(tmp_path, fleet):
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    device.sync()
    device.predict(png(3))
    device.remote = DirRemote(tmp_path / "not-mounted")
    assert device.sync().status == "offline" and device.release == r1.id
    assert device.upload().status == "offline" and device.buffer.pending() == 1
    device.remote = c.remote
    assert device.upload().records == 1 and len(central_records(c)) == 1


def test_crash_between_download_and_activation(tmp_path, fleet, models, monkeypatch):
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    device.sync()
    r2 = c.release(models[1], "2")
    c.releases.point("stable", r2.id, "better", "test")

    def power_cut(self, release, staging):
        raise Crash()

    monkeypatch.setattr(EdgeAgent, "_activate", power_cut)
    with pytest.raises(Crash):
        device.sync()
    monkeypatch.undo()
    rebooted = new_agent(tmp_path, c)
    assert rebooted.release == r1.id and rebooted.predict(png(4)).release == r1.id
    result = rebooted.sync()  # the verified staged files are reused, not downloaded again
    assert result.status == "updated" and result.downloaded_bytes == 0


def test_interrupted_download_resumes_where_it_stopped(tmp_path, fleet, monkeypatch):
    c, r1 = fleet
    monkeypatch.setattr(agent_module, "CHUNK", 512)
    fetched = collections.Counter()  # model bytes the store actually sent

    class Crashing(DirRemote):  # the device dies on the 3rd and the 9th model chunk it asks for
        asked = 0

        def get(self, key, offset=0, length=None):
            if key.endswith("model.onnx"):
                Crashing.asked += 1
                if Crashing.asked in (3, 9):
                    raise Crash()
            data = super().get(key, offset, length)
            if key.endswith("model.onnx"):
                fetched["model"] += len(data)
            return data

    link = Crashing(c.root)
    size, crashed_at = r1.manifest["files"]["model.onnx"]["size"], []
    while True:
        try:
            if new_agent(tmp_path, c, link).sync().status == "updated":
                break
        except Crash:
            crashed_at.append(fetched["model"])
    assert any(0 < at < size for at in crashed_at)  # a crash landed mid-model-download
    # resumed, never restarted: every model byte crossed the link exactly once
    assert fetched["model"] == size


def test_crash_during_upload_loses_nothing_and_duplicates_nothing(tmp_path, fleet, monkeypatch):
    c, _ = fleet
    device = new_agent(tmp_path, c)
    device.sync()
    ids = [device.predict(png(i)).record_id for i in range(10)]
    forget = device.buffer.forget
    monkeypatch.setattr(device.buffer, "forget", lambda batch: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        device.upload()  # the store has the batch; the device does not know
    monkeypatch.setattr(device.buffer, "forget", forget)
    device.close()
    rebooted = new_agent(tmp_path, c)
    rebooted.upload()
    assert sorted(r["record_id"] for r in central_records(c)) == sorted(ids)
    assert rebooted.buffer.pending() == 0


def test_a_release_that_fails_its_startup_check_is_rolled_back_locally(tmp_path, fleet, models):
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    device.sync()
    r2 = c.release(models[1], "2")
    c.releases.point("stable", r2.id, "better", "test")
    device.sync()
    device.close()
    (tmp_path / "dev-1" / "releases" / r2.id / "model.onnx").write_bytes(b"not a model")
    rebooted = new_agent(tmp_path, c)
    assert rebooted.release == r1.id
    assert any("rolled back locally" in e for e in rebooted.events)


def test_the_agent_imports_no_training_stack():
    code = (
        "import sys, cvops_pipelines.edge.agent, cvops_pipelines.edge.cli; "
        "heavy = [m for m in ('torch', 'dagster', 'mlflow', 'albumentations', 'pandas') "
        "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("release", ["../../outside", "rel-1/../../x"])
def test_a_channel_cannot_point_outside_the_release_store(tmp_path, fleet, release):
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    device.sync()
    c.write_channel("stable", c.channel_doc(release))  # signed: even a key holder cannot
    result = device.sync()
    assert result.status == "rejected" and "invalid release id" in result.detail
    assert device.release == r1.id and not (tmp_path / "outside").exists()


def test_a_manifest_for_another_release_is_refused(tmp_path, fleet, models):
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    r2 = c.release(models[1], "2")
    alias = c.root / "releases" / "rel-alias"
    alias.mkdir()
    for name in ("manifest.json", "manifest.sig"):  # a genuine, signed manifest of r2 ...
        (alias / name).write_bytes((c.root / "releases" / r2.id / name).read_bytes())
    c.write_channel("stable", c.channel_doc("rel-alias"))
    result = device.sync()  # ... served under another name
    assert result.status == "rejected" and "describes" in result.detail


@pytest.mark.parametrize(
    "channel, body",
    [
        ("stable", b'"rel-1-abc"'),  # a bare string
        ("canary", b'{"release": "rel-1-abc", "share": null, "cohorts": null}'),
        ("canary", b'{"release": "rel-1-abc", "share": "all"}'),
        ("canary", b'{"release": "rel-1-abc", "cohorts": "site-a"}'),
        ("stable", b'{"release": 7}'),
        ("stable", b"\xff\xfe not json"),
    ],
)
def test_a_malformed_channel_is_refused_and_the_device_keeps_serving(
    tmp_path, fleet, channel, body
):
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    assert device.sync().status == "updated"
    c.write_channel(channel, body)  # signed, so what refuses it is the document itself
    result = device.sync()
    assert result.status == "rejected" and result.release == r1.id
    assert f"channel {channel}" in result.detail
    assert device.predict(png(1000)).label  # still serving the release it had


def test_a_bad_frame_is_skipped_and_a_restart_never_records_a_frame_twice(tmp_path, fleet, capsys):
    from cvops_pipelines.edge.cli import main

    c, _ = fleet
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "a.png").write_bytes(png(1000))
    (incoming / "b.png").write_bytes(b"not an image at all")  # a text file named .png
    (incoming / "c.png").write_bytes(png(1001))
    (tmp_path / "release.pub").write_bytes(c.public_key)
    argv = [
        "--state",
        str(tmp_path / "dev-1"),
        "--store",
        str(c.root),
        "--public-key",
        str(tmp_path / "release.pub"),
        "--device-id",
        "dev-1",
        "run",
        "--once",
        "--watch",
        str(incoming),
    ]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert first.out.count('"label"') == 2 and "skipped" in first.err and "b.png" in first.err
    assert "1 bad frames skipped so far" in first.err
    (incoming / "d.png").write_bytes(png(1002))
    assert main(argv) == 0  # a restart: only the new frame is predicted
    second = capsys.readouterr()
    assert second.out.count('"label"') == 1 and "d.png" in second.out
    records = central_records(c)
    assert len(records) == 3 and len({r["image_id"] for r in records}) == 3


def test_an_oversized_manifest_is_refused_without_reading_it_whole(tmp_path, fleet, models):
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    device.sync()
    r2 = c.release(models[1], "2")
    (c.root / "releases" / r2.id / "manifest.json").write_bytes(b" " * (3 << 20))  # 3 MiB
    c.releases.point("stable", r2.id, "bloated", "test")
    result = device.sync()
    assert result.status == "rejected" and "larger than" in result.detail
    assert device.release == r1.id


def test_a_delta_whose_file_name_escapes_is_refused_before_any_path(tmp_path, fleet, models):
    """A signed manifest (the key may be stolen, the code must not trust it) naming a delta
    outside the staging folder: refused before a .part file is opened anywhere."""
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    device.sync()
    key = load_private_key(c.key_dir / "release_signing.key")
    r2 = c.release(models[1], "2", parent=r1.id)
    manifest = dict(r2.manifest, delta={**r2.manifest["delta"], "file": "../../../escape"})
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (c.root / "releases" / r2.id / "manifest.json").write_bytes(body)
    (c.root / "releases" / r2.id / "manifest.sig").write_bytes(key.sign(body))
    c.releases.point("stable", r2.id, "sneaky", "test")
    result = device.sync()
    assert result.status == "rejected" and "delta file" in result.detail
    assert not list(tmp_path.rglob("escape*"))


def test_a_store_that_ignores_range_is_read_in_bounded_slices(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from cvops_pipelines.edge.remote import HttpRemote

    body = bytes(range(256)) * 4096  # 1 MiB

    class IgnoresRange(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), IgnoresRange)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = HttpRemote(f"http://127.0.0.1:{server.server_address[1]}")
        assert remote.get("blob", 1000, 10) == body[1000:1010]
        assert remote.get("blob", 0, 17) == body[:17]
    finally:
        server.shutdown()


def test_channel_documents_must_be_signed_current_and_unexpired(tmp_path, fleet, models):
    """Rollback, freeze and takeover through the store: an unsigned pointer, a replay of an
    older signed one, and an expired one are refused; the device keeps what it runs."""
    c, r1 = fleet
    device = new_agent(tmp_path, c)
    assert device.sync().status == "updated"
    old_stable = (c.root / "releases/channels/stable.json").read_bytes()
    old_sig = (c.root / "releases/channels/stable.json.sig").read_bytes()
    r2 = c.release(models[1], "2", parent=r1.id)
    c.releases.point("stable", r2.id, "better", "test")
    assert device.sync().status == "updated" and device.release == r2.id

    c.write_channel("stable", c.channel_doc(r1.id), signed=False)  # anyone with write access
    result = device.sync()
    assert result.status == "rejected" and "not signed" in result.detail
    (c.root / "releases/channels/stable.json").write_bytes(old_stable)  # a replayed old pointer
    (c.root / "releases/channels/stable.json.sig").write_bytes(old_sig)
    result = device.sync()
    assert result.status == "rejected" and "older than" in result.detail
    c.write_channel("stable", c.channel_doc(r1.id, expires="2020-01-01T00:00:00+00:00"))
    result = device.sync()
    assert result.status == "rejected" and "expired" in result.detail
    canary = c.channel_doc(r1.id, share=1.0)
    c.write_channel("canary", canary, signed=False)  # a canary takeover, unsigned
    assert device.sync().status == "rejected" and device.release == r2.id
    # a new signed decision is how the fleet moves back
    c.releases.point("canary", None, "retired", "test")
    c.releases.point("stable", r1.id, "rolled back by a signed decision", "test")
    assert device.sync().status == "updated" and device.release == r1.id
