"""The agent on video through the real decoder (PyAV/FFmpeg): a file the test encodes, a live
MPEG-TS stream over UDP on loopback sent in real time, a stream cut and resumed, corrupt packets,
the disk budget over a long stream, kill -9 mid-stream, and the upload's byte-rate cap."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from datetime import datetime

import numpy as np
import pytest

from cvops_pipelines.demo.digit_model import trained_model
from cvops_pipelines.edge.agent import EdgeAgent
from cvops_pipelines.edge.keep import KeepPolicy
from cvops_pipelines.edge.link import Link
from cvops_pipelines.edge.sources import Backoff, Source, ahead
from cvops_pipelines_tests.edge.fleet_kit import central
from cvops_pipelines_tests.edge.video_kit import (
    HEIGHT,
    WIDTH,
    LiveSender,
    frames,
    free_udp_port,
    write_video,
)

DIGITS = list(range(1000, 1040))  # held out from the model's training digits


@pytest.fixture(scope="module")
def model():
    return trained_model(quality="good")


@pytest.fixture
def fleet(tmp_path, model):
    c = central(tmp_path)
    release = c.release(model, "1")
    c.releases.point("stable", release.id, "first release", "test")
    return c


def device(tmp_path, c, name="cam-1") -> EdgeAgent:
    agent = EdgeAgent(tmp_path / name, c.remote, c.public_key, name, "site-a")
    assert agent.sync().status in ("updated", "up-to-date")
    return agent


def uploaded(c) -> tuple[list[dict], set[str]]:
    records, images = [], set()
    for path in sorted((c.root / "feedback" / "batches").glob("*.zip")):
        with zipfile.ZipFile(path) as archive:
            text = archive.read("records.jsonl").decode()
            records += [json.loads(line) for line in text.splitlines()]
            names = archive.namelist()
            images |= {n[len("images/") : -4] for n in names if n.startswith("images/")}
    return records, images


def test_a_video_file_is_predicted_at_fps_and_recorded_once_with_its_source_and_time(
    tmp_path, fleet
):
    video = tmp_path / "gate.mp4"
    truth = write_video(video, DIGITS, hold=5, fps=10)  # 200 frames, 20 s of video
    agent = device(tmp_path, fleet)
    result = agent.stream(Source(str(video), fps=4))
    stats = result.stats
    assert stats.decoded == len(truth) and result.failed == 0
    assert result.predicted == stats.handed and stats.skipped_fps == len(truth) - stats.handed
    assert 75 <= result.predicted <= 85  # 4 of every 10 frames of a 10 fps video
    again = agent.stream(Source(str(video), fps=4))  # the same file again: nothing twice
    assert again.predicted == 0 and again.already == result.predicted
    assert agent.upload().status == "ok"
    records, images = uploaded(fleet)
    assert len(records) == result.predicted
    times = sorted(r["frame_time"] for r in records)
    assert len(set(times)) == len(times)
    per_second = np.bincount(np.floor(np.asarray(times)).astype(int))
    assert per_second.max() <= 5 and np.mean(np.diff(times)) == pytest.approx(0.25, abs=0.02)
    assert {r["source"] for r in records} == {"gate.mp4"}
    kept = [r for r in records if "image_kept" not in r]
    assert {r["image_id"] for r in kept} == images and len(kept) == result.kept
    assert 0 < len(kept) < len(records)  # selective: some kept, not all
    hits = sum(r["predicted"] == truth[round(r["frame_time"] * 10)] for r in records)
    assert hits / len(records) > 0.6  # a real classifier on real digits, filmed


def test_frames_are_prepared_ahead_in_order_and_a_break_stops_the_thread():
    def work(i):
        if i == 3:
            raise ValueError("frame 3 does not decode")
        return i * 10

    got = list(ahead(iter(range(6)), work))
    assert [i for i, _ in got] == list(range(6))  # every item, in order
    assert [d for i, d in got if i != 3] == [0, 10, 20, 40, 50]
    assert isinstance(got[3][1], ValueError)  # the caller skips it and says why

    def broken():
        yield 1
        raise OSError("the disk went away")

    with pytest.raises(OSError, match="disk went away"):
        list(ahead(broken(), work))

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            closed.set()

    for i, _ in (stream := ahead(endless(), work, depth=2)):
        if i == 5:
            break
    stream.close()
    assert closed.wait(5)  # the producer let go of its source
    assert not any(t.name == "cvops-decode" and t.is_alive() for t in threading.enumerate())


def test_a_release_taken_mid_stream_is_served_with_its_own_preprocessing(tmp_path, fleet):
    """Frames prepared ahead for the old release are prepared again for the new one (another
    input size: the old batch would not even run)."""
    import torch

    from cvops_pipelines.core.build.models import Preprocess
    from cvops_pipelines.core.ship.export import export_onnx
    from cvops_pipelines.demo.digit_model import CLASSES

    torch.manual_seed(0)
    preprocess = Preprocess("linear", 16, (0.5,) * 3, (0.5,) * 3, tuple(CLASSES))

    class Linear(torch.nn.Module):  # a fixed input size: an 8 px batch would not run
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 16 * 16, len(CLASSES))

        def forward(self, x):
            return self.fc(x.flatten(1))

    bigger = export_onnx(Linear().eval(), preprocess)
    video = tmp_path / "gate.mp4"
    write_video(video, DIGITS[:10], hold=5, fps=10)
    agent = device(tmp_path, fleet)
    first = agent.sync().release
    served = []

    def on_frame(frame, prediction):
        served.append(prediction.release)
        if len(served) == 5:
            release = fleet.release(
                bigger, "2", parent=first, preprocess=json.loads(preprocess.to_json())
            )
            fleet.releases.point("stable", release.id, "mid-stream", "test")
            assert agent.sync().status == "updated"

    result = agent.stream(Source(str(video)), on_frame=on_frame)
    assert result.failed == 0 and result.predicted == 50, result.failures
    assert served[:5] == [first] * 5 and len(set(served)) == 2
    assert served[5:] == [served[-1]] * 45


def test_the_selector_keeps_what_can_teach_and_each_scene_once():
    from cvops_pipelines.edge.keep import Selector, margin_of

    still = next(frames([1000], 1))[0]
    other = next(frames([1001], 1))[0]
    judge = Selector(KeepPolicy(explore_share=0.0, flicker_frames=3)).judge
    assert not judge("cam", "a", "3", 0.9, still).keep  # sure, steady: the record only
    assert judge("cam", "b", "3", 0.05, still).reason == "uncertain"
    assert not judge("cam", "c", "3", 0.05, still).keep  # the same scene again: kept once
    for key in "def":
        judge("cam", key, "3", 0.9, other)
    nudged = np.clip(other.astype(int) + 2, 0, 255).astype(np.uint8)  # the same scene
    flicker = judge("cam", "g", "8", 0.9, nudged)  # ... and a new answer
    unsure = Selector(KeepPolicy()).judge("cam", "a", "8", 0.01, still)
    assert flicker.reason == "flicker" and flicker.value > unsure.value > 0
    for key in "hij":
        judge("cam", key, "3", 0.9, other)
    assert not judge("cam", "k", "5", 0.9, still).keep  # a new answer on a new scene: no flicker
    explore = Selector(KeepPolicy(explore_share=0.1, margin=0.0, duplicate_distance=0.0))
    share = np.mean([explore.judge("cam", str(i), "3", 1.0, None).keep for i in range(4000)])
    assert 0.08 < share < 0.12
    assert margin_of([("3", 0.6), ("8", 0.3)], None, 0.5) == pytest.approx(0.3)
    notes = []  # a release spec's policy with a wrong value: the defaults, said, never a crash
    for bad in ({"hold_frames": 2.5}, {"margin": float("nan")}, {"budget_bytes": -1},
                {"explore_share": 2}, {"seed": True}, {"colour": "blue"}):  # fmt: skip
        assert KeepPolicy.from_spec({"buffer": bad}, notes.append) == KeepPolicy()
    assert len(notes) == 6
    assert margin_of([], [{"score": 0.55}, {"score": 0.9}], 0.5) == pytest.approx(0.05)


def test_a_live_udp_stream_is_kept_up_with_and_what_it_skips_is_counted(tmp_path, fleet):
    agent = device(tmp_path, fleet)
    port = free_udp_port()
    sender = LiveSender(port, DIGITS[:12], hold=10, fps=25)  # 120 frames, 4.8 s, real time
    source = Source(f"udp://127.0.0.1:{port}", timeout=(10, 1.5), backoff=Backoff(0.2, 0.5))
    seen: list[float] = []

    def slow_model(frame, prediction):  # a model that needs 0.2 s a frame: 5 fps at most
        seen.append(time.monotonic())
        time.sleep(0.2)

    sender.start()
    ender = threading.Thread(target=lambda: (sender.join(), time.sleep(2.5), source.stop()))
    ender.start()
    result = agent.stream(source, on_frame=slow_model)
    ender.join()
    stats = result.stats
    assert sender.error is None and sender.sent == 120
    assert stats.decoded >= 0.9 * sender.sent  # the reader kept up with the stream
    assert stats.skipped_behind > 0 and result.predicted == stats.handed
    assert stats.handed + stats.skipped_behind <= stats.decoded
    assert result.predicted <= 4.8 / 0.2 + 3  # never more than the model could do
    # it never fell behind: the last frame predicted came well before the stream's last + 2.5 s
    assert seen and seen[-1] - seen[0] < 4.8 + 1.0


def test_a_live_stream_at_fps_skips_the_frames_between(tmp_path, fleet):
    agent = device(tmp_path, fleet)
    port = free_udp_port()
    sender = LiveSender(port, DIGITS[:10], hold=10, fps=25)  # 4 s
    source = Source(f"udp://127.0.0.1:{port}", fps=5, timeout=(10, 1.5))
    sender.start()
    threading.Thread(target=lambda: (sender.join(), time.sleep(2.5), source.stop())).start()
    result = agent.stream(source)
    assert result.predicted <= 5 * 4 + 3 and result.stats.skipped_fps >= 60
    assert result.predicted >= 10


def test_an_http_stream_is_read_through_ffmpeg_and_recorded_without_its_credentials(
    tmp_path, fleet
):
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    write_video(tmp_path / "clip.ts", DIGITS[:8], hold=5, fps=25)  # MPEG-TS, as cameras serve
    quiet = type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=tmp_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/clip.ts"
    try:
        agent = device(tmp_path, fleet)
        source = Source(url.replace("//", "//viewer:secret@"), backoff=Backoff(0.1, 0.2))
        result = agent.stream(source, max_frames=15)
    finally:
        server.shutdown()
    assert result.predicted == 15 and result.failed == 0, result.failures
    assert result.stats.decoded >= 15 and result.stats.corrupt == 0
    assert agent.upload().status == "ok"
    records, _ = uploaded(fleet)
    assert len(records) == 15 and {r["source"] for r in records} == {url}  # no password kept


def test_a_stream_cut_and_resumed_reconnects_and_predicts_both_halves(tmp_path, fleet):
    agent = device(tmp_path, fleet)
    port = free_udp_port()
    sender = LiveSender(port, DIGITS[:10], hold=10, fps=25, gap=3.0)  # 2 s, 3 s of nothing, 2 s
    source = Source(f"udp://127.0.0.1:{port}", fps=10, timeout=(10, 1.0), backoff=Backoff(0.2, 0.5))
    at: list[datetime] = []
    sender.start()
    threading.Thread(target=lambda: (sender.join(), time.sleep(2.5), source.stop())).start()
    result = agent.stream(
        source, on_frame=lambda frame, p: at.append(datetime.fromisoformat(frame.captured_at))
    )
    assert sender.error is None
    assert result.stats.reconnects >= 1 and result.stats.errors
    gaps = [(b - a).total_seconds() for a, b in zip(at, at[1:])]
    cut = int(np.argmax(gaps))
    assert gaps[cut] >= 2.0  # the cut
    assert cut >= 5 and len(at) - cut - 1 >= 5  # frames on both sides of it


def test_corrupt_packets_are_skipped_and_counted_never_fatal(tmp_path, fleet):
    import av

    clean = tmp_path / "clean.ts"
    with av.open(str(clean), "w", format="mpegts") as out:
        stream = out.add_stream("mpeg2video", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.bit_rate, stream.gop_size = 2_000_000, 25
        for image, _ in frames(DIGITS[:10], 10):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = bytearray(clean.read_bytes())
    packets = len(data) // 188  # MPEG-TS: 188-byte packets; the headers stay, payloads go bad
    rng = np.random.default_rng(0)
    for k in rng.choice(np.arange(packets // 3, packets // 2), 40, replace=False):
        data[k * 188 + 4 : (k + 1) * 188] = rng.bytes(184)
    damaged = tmp_path / "damaged.ts"
    damaged.write_bytes(bytes(data))
    agent = device(tmp_path, fleet)
    result = agent.stream(Source(str(damaged)))
    assert result.stats.corrupt > 0 and result.failed == 0
    assert result.predicted >= 80  # the frames after the damage are predicted too
    assert result.predicted == result.stats.handed


def test_the_disk_budget_holds_over_a_long_stream_and_corrections_survive(tmp_path, fleet):
    video = tmp_path / "long.mp4"
    write_video(video, DIGITS, hold=8, fps=10)  # 320 frames
    agent = device(tmp_path, fleet)
    keep_all = KeepPolicy(explore_share=1.0, duplicate_distance=0.0, budget_bytes=120_000)
    over, corrected = [], []

    def held(record_id: str) -> bool:
        return agent.buffer.db.execute(
            "SELECT 1 FROM records WHERE record_id = ? AND image IS NOT NULL", (record_id,)
        ).fetchone()

    def operator(frame, prediction):  # corrects a frame every 6 s of video while it is held
        if len(corrected) < int(frame.time / 6) + 1 and held(prediction.record_id):
            agent.correct(prediction.record_id, "7")
            corrected.append(prediction.record_id)
        over.append(agent.buffer.image_bytes() > keep_all.budget_bytes)

    result = agent.stream(Source(str(video)), on_frame=operator, policy=keep_all)
    assert result.predicted == 320 and result.evicted > 0 and not any(over)
    rows = agent.buffer.db.execute(
        "SELECT record_id, image IS NOT NULL FROM records ORDER BY seq"
    ).fetchall()
    assert len(rows) == 320  # records are never evicted
    kept = {rid for rid, has in rows if has}
    assert len(corrected) >= 3 and set(corrected) <= kept  # corrections go last
    assert len(kept) < 320
    assert agent.upload().status == "ok"
    records, images = uploaded(fleet)
    assert len(records) == 320 and len(images) == len(kept)
    first = json.loads(
        zipfile.ZipFile(sorted((fleet.root / "feedback" / "batches").glob("*.zip"))[0])
        .read("records.jsonl")
        .decode()
        .splitlines()[0]
    )
    assert first["record_id"] in corrected  # the most valuable leave first


def test_a_frame_corrected_while_the_agent_holds_it_keeps_its_image(tmp_path, fleet):
    video = tmp_path / "gate.mp4"
    write_video(video, DIGITS[:10], hold=5, fps=10)
    agent = device(tmp_path, fleet)
    nothing = KeepPolicy(margin=0.0, flicker_frames=0, explore_share=0.0, hold_frames=8)
    picked = []

    def operator(frame, prediction):
        if round(frame.time * 10) in (10, 30):
            picked.append(prediction.record_id)
        if round(frame.time * 10) == 30 + 5:  # frame 10 is out of the hold by now, 30 is not
            for record_id in picked:
                agent.correct(record_id, "7")

    result = agent.stream(Source(str(video)), on_frame=operator, policy=nothing)
    assert result.kept == 0 and agent.upload().status == "ok"
    records, images = uploaded(fleet)
    by_id = {r["record_id"]: r for r in records}
    assert len(records) == 50 and all(by_id[i]["corrected_label"] == "7" for i in picked)
    assert images == {by_id[picked[1]]["image_id"]}  # only the one still held
    assert by_id[picked[0]]["image_kept"] is False


def test_a_held_frame_corrected_under_a_full_budget_keeps_the_budget(tmp_path, fleet, capsys):
    video = tmp_path / "gate.mp4"
    write_video(video, DIGITS[:4], hold=5, fps=10)
    agent = device(tmp_path, fleet)
    tight = KeepPolicy(margin=0.0, flicker_frames=0, explore_share=0.0, budget_bytes=1)
    seen = []

    def operator(frame, prediction):
        seen.append(prediction.record_id)
        agent.correct(prediction.record_id, "7")  # every frame, while the agent holds it
        assert agent.buffer.image_bytes() <= tight.budget_bytes

    agent.stream(Source(str(video)), on_frame=operator, policy=tight)
    assert len(seen) == 20 and agent.buffer.counts()["evicted"] == 20
    agent.close()
    (tmp_path / "release.pub").write_bytes(fleet.public_key)
    from cvops_pipelines.edge.cli import main

    argv = ["--state", str(tmp_path / "cam-1"), "--store", str(fleet.root), "--public-key"]
    assert main([*argv, str(tmp_path / "release.pub"), "--device-id", "cam-1", "status"]) == 0
    status = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert status["buffer"]["evicted"] == 20 and status["buffer"]["image_bytes"] <= 1


def test_kill_9_mid_stream_then_a_restart_records_no_frame_twice(tmp_path, fleet):
    video = tmp_path / "gate.mp4"
    write_video(video, DIGITS, hold=5, fps=10)  # 200 frames
    (tmp_path / "release.pub").write_bytes(fleet.public_key)
    argv = [
        sys.executable,
        "-m",
        "cvops_pipelines.edge.cli",
        "--state",
        str(tmp_path / "cam-1"),
        "--store",
        str(fleet.root),
        "--public-key",
        str(tmp_path / "release.pub"),
        "--device-id",
        "cam-1",
        "run",
        "--once",
        "--source",
        str(video),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    lines = 0
    for _ in proc.stdout:
        lines += 1
        if lines == 60:
            os.kill(proc.pid, signal.SIGKILL)  # the power goes, mid-stream
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "done before" in done.stderr
    records, _ = uploaded(fleet)
    times = [r["frame_time"] for r in records]
    assert len(times) == len(set(times)) == 200  # every frame once, none twice


def test_uploads_hold_the_byte_rate_cap_and_respect_windows(tmp_path, fleet):
    from cvops_pipelines.edge.link import parse_windows

    clock = [0.0]
    link = Link(rate=1000.0, clock=lambda: clock[0])
    assert link.take(800) and not link.take(800)  # a full bucket: one second's worth
    clock[0] = 0.5
    assert not link.take(800)  # 200 + 500 bytes' worth: not yet
    clock[0] = 0.6
    assert link.take(800)
    assert Link(rate=10.0, clock=lambda: 0.0).take(5000)  # larger than the bucket: goes, in debt
    night = Link(windows=parse_windows("22:00-06:00"))
    assert night.open(datetime(2026, 1, 1, 23, 30)) and night.open(datetime(2026, 1, 1, 5, 59))
    assert not night.open(datetime(2026, 1, 1, 12, 0))
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        parse_windows("10pm-6am")

    video = tmp_path / "gate.mp4"
    write_video(video, DIGITS[:8], hold=5, fps=10)
    agent = device(tmp_path, fleet)
    agent.stream(Source(str(video)), policy=KeepPolicy(explore_share=1.0, duplicate_distance=0))
    minute = time.gmtime()
    later = (minute.tm_hour * 60 + minute.tm_min + 5) % 1440  # a window that opens later
    closed = agent.upload(link=Link(windows=((later, (later + 1) % 1440),)))
    assert closed.status == "window" and not closed.batches and agent.buffer.pending()
    rate = 200_000.0
    link, sent, started = Link(rate=rate), 0, time.monotonic()
    while agent.buffer.pending():
        result = agent.upload(max_records=4, link=link)
        for batch in result.batches:
            sent += (fleet.root / "feedback" / "batches" / f"{batch}.zip").stat().st_size
        elapsed = time.monotonic() - started
        assert sent <= rate * elapsed + 2 * rate  # the bucket, one payload of debt at most
        time.sleep(0.05)
    assert sent > 2 * rate  # long enough for the cap to matter


def test_the_cli_names_every_source_and_refuses_a_bad_one_clearly(tmp_path, capsys):
    from cvops_pipelines.edge.cli import build_parser, main

    run_parser = build_parser()._subparsers._group_actions[0].choices["run"]
    run_help = " ".join(run_parser.format_help().split())
    for form in ("rtsp://", "udp://", "http(s)://", "/dev/videoN", "camera:N", "video file"):
        assert form in run_help
    base = ["--state", str(tmp_path / "s"), "--store", str(tmp_path), "--public-key", "k"]
    base += ["--device-id", "cam-1", "run", "--once"]
    with pytest.raises(SystemExit, match="no such file or folder"):
        main([*base, "--source", str(tmp_path / "missing.mp4")])
    with pytest.raises(SystemExit, match="HH:MM-HH:MM"):
        main([*base, "--source", str(tmp_path), "--upload-window", "10pm-6am"])
    with pytest.raises(SystemExit, match="needs --max-frames or --seconds"):
        main([*base, "--source", "udp://127.0.0.1:9"])
    with pytest.raises(SystemExit, match="fps must be > 0"):
        main([*base, "--source", str(tmp_path), "--fps", "nan"])
    with pytest.raises(SystemExit, match="max-frames must be >= 1"):
        main([*base, "--source", str(tmp_path), "--max-frames", "0"])
