"""Where a device's frames come from: a folder of images, a video file, a network stream or a
camera, decoded by PyAV (FFmpeg's own decoders, BSD-licensed bindings, FFmpeg in the wheels).

A file is read at its own pace: every frame is decoded and, with `fps`, one every 1/fps seconds of
the video is handed on. A live source (a stream, a camera) is decoded by a reader thread that
keeps only the newest frame: whatever the agent has not taken when the next arrives is skipped and
counted, so prediction never falls behind the stream. A live source that drops, stalls or never
answers is reopened with exponential backoff; a packet that does not decode is skipped and
counted. Every frame carries a key no other frame of the source has (a file's: its time in the
video; a live frame's: the wall clock it arrived at), which the buffer records with the
prediction, so a restart never records a frame twice.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

STREAM = re.compile(r"^(rtsp|rtsps|rtmp|udp|rtp|srt|tcp|http|https)://", re.IGNORECASE)
CAMERA = re.compile(r"^(/dev/video\d+|camera:(\d+))$")
FORMS = (
    "a folder of images, a video file, a stream URL (rtsp://, udp://, http(s)://, rtmp://, "
    "srt://, tcp://) or a camera (/dev/videoN or camera:N)"
)


@dataclass(frozen=True)
class Frame:
    source: str  # the source as records name it
    key: str  # unique within the source: what makes a restart skip frames already recorded
    time: float  # seconds into the source (the frame's presentation time)
    captured_at: str  # when the device decoded it (UTC, ISO 8601)
    image: np.ndarray | None = None  # RGB, HxWx3 uint8 (a video's frame)
    data: bytes | None = None  # the file's own bytes (a folder's image, decoded by the agent)


@dataclass
class SourceStats:
    decoded: int = 0  # frames the decoder produced
    handed: int = 0  # frames the agent took
    skipped_fps: int = 0  # decoded, but within 1/fps of the last handed frame
    skipped_behind: int = 0  # live frames replaced by a newer one before the agent took them
    corrupt: int = 0  # packets or frames the decoder could not (or only partly) decode
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)  # the last few reasons a live source dropped

    def note(self, reason: str) -> None:
        self.errors = [*self.errors[-4:], reason]


@dataclass(frozen=True)
class Backoff:
    """Seconds to wait before the n-th reopening in a row: first, doubling, up to at most."""

    first: float = 0.5
    most: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.most, self.first * 2 ** max(0, attempt - 1))


def kind_of(spec: str) -> str:
    """folder | file | stream | camera, or ValueError naming the forms a source may take."""
    if STREAM.match(spec):
        return "stream"
    if CAMERA.match(spec):
        return "camera"
    path = Path(spec)
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    raise ValueError(f"source {spec!r} is not {FORMS} (no such file or folder)")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Source:
    """Iterate `frames()`; `stats` counts what happened; `stop()` ends a live source."""

    def __init__(
        self,
        spec: str,
        fps: float | None = None,
        backoff: Backoff = Backoff(),
        timeout: tuple[float, float] = (10.0, 5.0),
        options: dict | None = None,
    ):
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.spec, self.kind, self.fps = spec, kind_of(spec), fps
        self.backoff, self.timeout, self.options = backoff, timeout, options or {}
        self.stats = SourceStats()
        self._stopped = threading.Event()
        self.name = self._name()

    @property
    def live(self) -> bool:
        return self.kind in ("stream", "camera")

    def _name(self) -> str:
        if self.kind in ("folder", "file"):
            return Path(self.spec).name or self.spec
        return re.sub(r"//[^/@]*@", "//", self.spec)  # never record a stream's credentials

    def stop(self) -> None:
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def frames(self) -> Iterator[Frame]:
        if self.kind == "folder":
            return self._folder()
        if self.kind == "file":
            return self._file()
        return self._live()

    # -- a folder: each file once, its name and content hash are its key ---------------------
    def _folder(self) -> Iterator[Frame]:
        for path in sorted(p for p in Path(self.spec).iterdir() if p.is_file()):
            if self.stopped:
                return
            data = path.read_bytes()
            self.stats.decoded += 1
            self.stats.handed += 1
            key = f"{path.name}@{hashlib.sha256(data).hexdigest()}"
            yield Frame(self.name, key, 0.0, now(), data=data)

    # -- a file: decoded in order, every 1/fps seconds of video handed on ---------------------
    def _file(self) -> Iterator[Frame]:
        import av

        try:
            container = av.open(self.spec, options=self.options)
        except av.error.FFmpegError as exc:
            raise ValueError(f"video {self.spec!r} does not open: {exc}") from None
        with container:
            if not container.streams.video:
                raise ValueError(f"{self.spec!r} has no video stream")
            due = None
            for frame in self._decoded(container, threads=1):
                if self.stopped:
                    return
                due, wanted = self._sample(frame.time, due)
                if wanted:
                    yield self._frame(frame, f"{self.name}@{frame.time:.3f}")

    def _sample(self, at: float, due: float | None) -> tuple[float | None, bool]:
        """(the next time due, whether this frame is handed on) under the fps cap: on the
        1/fps cadence, which restarts after a gap instead of bursting to catch up."""
        if self.fps is None:
            return due, True
        if due is not None and at < due - 1e-6:
            self.stats.skipped_fps += 1
            return due, False
        step = 1 / self.fps
        return (at + step if due is None or at - due >= step else due + step), True

    def _decoded(self, container, threads: int = 0) -> Iterator:
        """The container's video frames; a packet that does not decode is counted, not fatal.
        `threads`: FFmpeg's decoding threads, 0 for as many as it likes (a live source must
        keep up with the camera); a file's one thread leaves the other cores to the model."""
        import av

        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        for packet in container.demux(stream):
            if packet.is_corrupt:
                self.stats.corrupt += 1
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                self.stats.corrupt += 1
                continue
            for frame in frames:
                if frame.time is None:
                    continue
                self.stats.decoded += 1
                if frame.is_corrupt:
                    self.stats.corrupt += 1
                yield frame

    def _frame(self, frame, key: str) -> Frame:
        self.stats.handed += 1
        return Frame(self.name, key, float(frame.time), now(), frame.to_ndarray(format="rgb24"))

    # -- live: a reader thread keeps the newest frame; reconnects with backoff -----------------
    def _live(self) -> Iterator[Frame]:
        slot: list[Frame] = []
        ready = threading.Condition()
        done = threading.Event()

        def put(frame: Frame) -> None:
            with ready:
                if slot:
                    self.stats.skipped_behind += 1
                    slot.clear()
                slot.append(frame)
                ready.notify()

        reader = threading.Thread(target=self._read_live, args=(put, done), daemon=True)
        reader.start()
        try:
            while True:
                with ready:
                    while not slot and not done.is_set():
                        ready.wait(0.1)
                    if not slot:
                        return
                    frame = slot.pop()
                self.stats.handed += 1
                yield frame
        finally:
            self.stop()
            reader.join(timeout=max(self.timeout) + 1)

    def _open_live(self):
        import av

        if self.kind == "camera":
            match = CAMERA.match(self.spec)
            device = f"/dev/video{match.group(2)}" if match.group(2) else self.spec
            return av.open(device, format="v4l2", options=self.options, timeout=self.timeout)
        options = dict(self.options)
        if self.spec.lower().startswith("rtsp"):
            options.setdefault("rtsp_transport", "tcp")
        return av.open(self.spec, options=options, timeout=self.timeout)

    def _read_live(self, put: Callable[[Frame], None], done: threading.Event) -> None:
        import av

        failures = 0
        try:
            while not self.stopped:
                due, got = None, False
                try:
                    with self._open_live() as container:
                        for frame in self._decoded(container):
                            if self.stopped:
                                return
                            got, failures = True, 0
                            due, wanted = self._sample(time.monotonic(), due)
                            if wanted:
                                at = now()
                                put(
                                    Frame(
                                        self.name,
                                        f"{self.name}@{at}",
                                        float(frame.time),
                                        at,
                                        frame.to_ndarray(format="rgb24"),
                                    )
                                )
                        reason = "the stream ended"
                except (av.error.FFmpegError, OSError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                if self.stopped:
                    return
                failures = 0 if got else failures + 1
                self.stats.reconnects += 1
                self.stats.note(reason)
                self._stopped.wait(self.backoff.delay(max(1, failures)))
        finally:
            done.set()


def ahead(items: Iterator, work: Callable, depth: int = 2) -> Iterator[tuple]:
    """(item, work(item)) for each item, with the iterating and the work done by a thread up to
    `depth` items ahead of the caller: decoding and preparing the next frame overlap predicting
    this one (FFmpeg, Pillow's resize and onnxruntime all release the GIL). `work` raising gives
    (item, the exception), for the caller to skip; the iteration raising ends the stream with
    that exception. Closing the generator (a `break`) stops the thread."""
    import queue

    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                try:
                    done = work(item)
                except Exception as exc:  # noqa: BLE001  (the caller skips the item, says why)
                    done = exc
                if not put((item, done)):
                    return
            put((end, None))
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            put((end, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="cvops-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, done = slots.get()
            if item is end:
                if done is not None:
                    raise done
                return
            yield item, done
    finally:
        stop.set()
        thread.join(timeout=30)
