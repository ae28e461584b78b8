"""A fleet of edge agents in one process: cohorts, offline periods, crashes (mid-download and
mid-upload included), a production stream with a configurable shift, and a human corrector.

Not device code (it uses albumentations to shift the stream); the agents it drives are.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvops_pipelines.edge.agent import EdgeAgent
from cvops_pipelines.edge.remote import Offline, Remote


class Crash(Exception):
    """The device lost power: the agent object is gone; its state directory is not."""


class FaultyRemote:
    """Wraps a remote with a device's bad days: offline periods and crashes inside calls."""

    def __init__(self, inner: Remote, rng: random.Random, p_crash: float):
        self.inner, self.rng, self.p_crash = inner, rng, p_crash
        self.online = True

    def _maybe_crash(self) -> None:
        if self.rng.random() < self.p_crash:
            raise Crash()

    def get(self, key, offset=0, length=None):
        if not self.online:
            raise Offline("simulated: no connectivity")
        self._maybe_crash()  # mid-download: earlier chunks are already on disk
        return self.inner.get(key, offset, length)

    def put(self, key, data):
        if not self.online:
            raise Offline("simulated: no connectivity")
        self._maybe_crash()  # before the store has it
        self.inner.put(key, data)
        self._maybe_crash()  # after the store has it, before the device knows

    def size(self, key):
        if not self.online:
            raise Offline("simulated: no connectivity")
        return self.inner.size(key)


@dataclass(frozen=True)
class Shift:
    """Production conditions the training data did not have (albumentations)."""

    brightness: float = 0.0  # +/- limit
    blur: int = 0  # max Gaussian kernel (odd, >= 3), 0 = none
    rotate: float = 0.0  # +/- degrees

    def transform(self, seed: int):
        import albumentations as A

        steps = []
        if self.brightness:
            steps.append(A.RandomBrightnessContrast((-self.brightness, self.brightness), 0, p=1))
        if self.blur >= 3:
            steps.append(A.GaussianBlur(blur_limit=(3, self.blur), p=1))
        if self.rotate:
            steps.append(A.Affine(rotate=(-self.rotate, self.rotate), fill=255, p=1))
        return A.Compose(steps, seed=seed) if steps else None


@dataclass(frozen=True)
class FleetConfig:
    devices: int = 6
    cohorts: tuple[str, ...] = ("site-a", "site-b")
    steps: int = 30
    images_per_step: int = 4
    p_offline: float = 0.25  # chance a device is offline during a step
    p_crash: float = 0.03  # chance per remote call that the device crashes inside it
    review_share: float = 0.6  # share of predictions a human looks at (partial correction)
    operator_top_k: int = 2  # the operator picks among the model's top k ...
    p_pick_right: float = 0.95  # ... the right class with this probability when it is there
    upload_every: int = 3
    shift: Shift = Shift()
    seed: int = 0
    # 0: each device predicts its images one by one (`predict`, every image kept); N: each step's
    # images are filmed N frames each into a 640x480 clip the device streams (`stream`, its
    # release's buffer policy deciding which images to keep)
    video_hold: int = 0


@dataclass
class FleetResult:
    predictions: dict[str, str] = field(default_factory=dict)  # record_id -> device
    truth: dict[str, str] = field(default_factory=dict)  # record_id -> true label
    reviewed: int = 0
    crashes: int = 0
    offline_steps: int = 0
    syncs: dict[str, int] = field(default_factory=dict)  # sync status -> count
    releases: dict[str, str | None] = field(default_factory=dict)  # device -> release at the end
    events: list[str] = field(default_factory=list)
    stream_used: int = 0  # images taken from the stream (each one predicted and recorded)
    image_truth: dict[str, str] = field(default_factory=dict)  # image_id (as shot) -> true label
    shots: list[tuple[bytes, str]] = field(default_factory=list)  # (image as shot, true label)

    def accuracy(self, labels: dict[str, str]) -> float:
        hits = [labels[r] == self.truth[r] for r in self.truth if r in labels]
        return float(np.mean(hits)) if hits else float("nan")


def shifted(image: bytes, transform) -> bytes:
    from PIL import Image

    if transform is None:
        return image
    rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    out = io.BytesIO()
    Image.fromarray(transform(image=rgb)["image"]).save(out, "PNG")
    return out.getvalue()


CLIP_FPS = 10


def film(images: list[np.ndarray], hold: int, path: Path) -> None:
    """Each image filling `hold` frames of a 640x480 MPEG-4 clip at CLIP_FPS, as a camera
    watching a slow scene would film it."""
    import av
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        stream.bit_rate = 2_000_000
        for image in images:
            frame = np.asarray(Image.fromarray(image).resize((640, 480), Image.BILINEAR))
            for _ in range(hold):
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def run_fleet(
    remote: Remote,
    state_root: Path,
    public_key: bytes,
    stream: list[tuple[bytes, str]],
    config: FleetConfig = FleetConfig(),
    progress: Callable[[int], None] | None = None,
    enrol: Callable[[str, bytes], None] | None = None,
) -> FleetResult:
    """Drive the fleet over `stream` (image bytes, true label), then let every device come back
    online, sync and upload until its buffer is empty. `enrol(device id, public key PEM)` is the
    operator enrolling each device the first time it boots (without it, the pipeline refuses
    the fleet's feedback)."""
    rng = random.Random(config.seed)
    transform = config.shift.transform(config.seed)
    result = FleetResult()
    devices = [f"dev-{i:03d}" for i in range(config.devices)]
    cohort = {d: config.cohorts[i % len(config.cohorts)] for i, d in enumerate(devices)}
    links = {d: FaultyRemote(remote, random.Random(rng.random()), config.p_crash) for d in devices}
    agents: dict[str, EdgeAgent | None] = dict.fromkeys(devices)
    enrolled: set[str] = set()

    def agent(device: str) -> EdgeAgent:
        if agents[device] is None:  # (re)boot from the state directory
            agents[device] = EdgeAgent(
                state_root / device, links[device], public_key, device, cohort[device]
            )
            if enrol is not None and device not in enrolled:
                enrol(device, agents[device].public_key_pem())
                enrolled.add(device)
        return agents[device]

    def crashed(device: str) -> None:
        result.crashes += 1
        agents[device].close()
        agents[device] = None

    def review(device_agent: EdgeAgent, prediction, label: str) -> None:
        """The operator looks at a share of predictions and picks among the top k."""
        if rng.random() >= config.review_share:
            return
        offered = [c for c, _ in prediction.top_k[: config.operator_top_k]]
        if label in offered and rng.random() < config.p_pick_right:
            choice = label
        else:  # the operator settles on a wrong offered class
            wrong = [c for c in offered if c != label] or offered
            choice = rng.choice(wrong)
        device_agent.correct(prediction.record_id, choice)
        result.reviewed += 1

    position = 0
    for step in range(config.steps):
        for device in devices:
            link = links[device]
            link.online = rng.random() >= config.p_offline
            result.offline_steps += not link.online
            try:
                outcome = agent(device).sync()
                result.syncs[outcome.status] = result.syncs.get(outcome.status, 0) + 1
                if agent(device).release is not None:
                    served = stream[position : position + config.images_per_step]
                    position += len(served)
                    if config.video_hold:
                        clip = state_root / "clips" / f"{device}-{step:05d}.mp4"
                        _stream_clip(agent(device), served, transform, clip, config, review, result)
                    else:
                        for image, label in served:
                            shot = shifted(image, transform)
                            prediction = agent(device).predict(shot)
                            result.image_truth[hashlib.sha256(shot).hexdigest()] = label
                            result.shots.append((shot, label))
                            result.predictions[prediction.record_id] = device
                            result.truth[prediction.record_id] = label
                            review(agent(device), prediction, label)
                if step % config.upload_every == config.upload_every - 1:
                    agent(device).upload()
            except Crash:
                crashed(device)
        if progress is not None:
            progress(1)
    result.stream_used = position
    for device in devices:  # the end of the day: back online, no more faults
        links[device].online, links[device].p_crash = True, 0.0
        current = agent(device)
        current.sync()
        current.upload()
        result.releases[device] = current.release
        result.events += [f"{device}: {e}" for e in current.events]
        current.close()
    return result


def _stream_clip(agent, batch, transform, clip: Path, config: FleetConfig, review, result) -> None:
    """Film this step's images, stream the clip through the agent; every frame's record and
    truth are noted, and each kept image's id (what the oracle answers for) with its label."""
    from cvops_pipelines.edge.preprocess import load_rgb
    from cvops_pipelines.edge.sources import Source

    shots = [shifted(image, transform) for image, _ in batch]
    film([np.asarray(load_rgb(s)) for s in shots], config.video_hold, clip)
    labels = [label for _, label in batch]

    def on_frame(frame, prediction) -> None:
        label = labels[min(len(labels) - 1, round(frame.time * CLIP_FPS) // config.video_hold)]
        result.predictions[prediction.record_id] = agent.device_id
        result.truth[prediction.record_id] = label
        review(agent, prediction, label)

    agent.stream(Source(str(clip)), on_frame=on_frame)
    for record_id, image_id, image in agent.buffer.db.execute(
        "SELECT record_id, image_id, image FROM records WHERE image IS NOT NULL AND source = ?",
        (clip.name,),
    ):
        if record_id in result.truth and image_id not in result.image_truth:
            result.image_truth[image_id] = result.truth[record_id]
            result.shots.append((image, result.truth[record_id]))
    clip.unlink()
