"""Real video for edge tests: scikit-learn's digits filmed as 640x480 frames (each digit held for a
few frames, as a camera watching a slow scene would), encoded by PyAV into a file, or sent live as
MPEG-TS over UDP on loopback, in real time, by a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from cvops_pipelines.demo.digit_model import digit, digit_label

WIDTH, HEIGHT = 640, 480


def scene(i: int) -> np.ndarray:
    """Digit `i` filling the frame, as a camera framed on the digit would film it."""
    return np.asarray(digit(i, 64).convert("RGB").resize((WIDTH, HEIGHT), Image.BILINEAR))


def frames(digits: list[int], hold: int) -> Iterator[tuple[np.ndarray, str]]:
    for i in digits:
        image = scene(i)
        for _ in range(hold):
            yield image, digit_label(i)


def write_video(path: Path, digits: list[int], hold: int = 5, fps: int = 10) -> list[str]:
    """An MPEG-4 file of the digits; returns each frame's true label, in order."""
    import av

    labels = []
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.bit_rate = 2_000_000
        for image, label in frames(digits, hold):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
            labels.append(label)
        for packet in stream.encode():
            out.mux(packet)
    return labels


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveSender(threading.Thread):
    """Sends the digits as a live MPEG-TS stream to udp://127.0.0.1:port at `fps` in real time;
    `gap` (seconds) cuts the stream after the first half and resumes it from a new sender, as
    a camera that reboots would; `garbage` datagrams of random bytes go out mid-stream."""

    def __init__(
        self,
        port: int,
        digits: list[int],
        hold: int,
        fps: int = 25,
        gap: float = 0.0,
        garbage: int = 0,
    ):
        super().__init__(daemon=True)
        self.port, self.digits, self.hold, self.fps = port, digits, hold, fps
        self.gap, self.garbage = gap, garbage
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            everything = list(frames(self.digits, self.hold))
            half = len(everything) // 2 if self.gap else len(everything)
            self._send(everything[:half], garbage_at=half // 2)
            if self.gap:
                time.sleep(self.gap)
                self._send(everything[half:], garbage_at=None)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            self.error = exc

    def _send(self, chunk, garbage_at: int | None) -> None:
        import av

        url = f"udp://127.0.0.1:{self.port}?pkt_size=1316"
        with av.open(url, "w", format="mpegts") as out:
            stream = out.add_stream("mpeg2video", rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            stream.bit_rate, stream.gop_size = 2_000_000, self.fps
            start = time.perf_counter()
            rng = np.random.default_rng(0)
            for n, (image, _) in enumerate(chunk):
                if n == garbage_at and self.garbage:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                        for _ in range(self.garbage):
                            raw.sendto(rng.bytes(1316), ("127.0.0.1", self.port))
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
                self.sent += 1
                delay = start + (n + 1) / self.fps - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            for packet in stream.encode():
                out.mux(packet)
