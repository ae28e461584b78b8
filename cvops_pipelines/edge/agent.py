"""The edge agent: follow a channel, verify, activate atomically, predict, buffer, upload.

State directory of a device:
    current.json            {"release": ..., "previous": ...}, swapped atomically
    releases/<id>/          verified, activated bundles (the current and the previous one)
    staging/<id>/           downloads in progress (`*.part` resume where they stopped)
    buffer.db               predictions + corrections until the store confirms them
    device.key              the device's identity: it signs every feedback batch
Whatever fails (network, signature, hash, delta, health check, a crash at any point), the device
keeps serving the release it had, and no feedback record is lost.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvops_pipelines.edge import identity, wire
from cvops_pipelines.edge.buffer import FeedbackBuffer
from cvops_pipelines.edge.bundle import (
    BUNDLE_FILES,
    BundleError,
    apply_delta,
    delta_name,
    fingerprint,
    load_public_key,
    verify_file,
    verify_manifest,
    verify_signature,
)
from cvops_pipelines.edge.detect import summary_label
from cvops_pipelines.edge.keep import KeepPolicy
from cvops_pipelines.edge.link import Link
from cvops_pipelines.edge.preprocess import load_rgb
from cvops_pipelines.edge.remote import Offline, Remote, write_atomic
from cvops_pipelines.edge.runtime import Runtime
from cvops_pipelines.edge.sources import SourceStats, ahead
from cvops_pipelines.edge.wire import MAX_VERSION

CHUNK = 1 << 20
# Every small document is read with a cap, before it is parsed or its signature checked.
MAX_CHANNEL, MAX_MANIFEST, MAX_SIGNATURE = 64 << 10, 1 << 20, 4 << 10


@dataclass(frozen=True)
class Prediction:
    record_id: str
    label: str
    confidence: float
    top_k: list[tuple[str, float]]
    release: str
    boxes: list[dict] | None = None  # a detector's answer (label, score, box); None: a classifier


@dataclass
class SyncResult:
    status: str  # up-to-date | updated | offline | rejected | no-release
    release: str | None
    detail: str = ""
    downloaded_bytes: int = 0
    used_delta: bool = False


@dataclass
class StreamResult:
    source: str
    predicted: int = 0  # frames predicted and recorded
    kept: int = 0  # of which the selector kept the image
    evicted: int = 0  # images dropped to stay within the disk budget
    failed: int = 0  # frames that did not decode or predict (skipped, with the reason)
    already: int = 0  # frames recorded before a restart: not predicted twice
    failures: list[tuple[str, str]] = field(default_factory=list)  # the last 100: frame, why
    stats: SourceStats | None = None  # what the source counted (skips, corrupt, reconnects)


def encode_jpeg(rgb, quality: int = 90) -> bytes:
    """A video frame as the bytes a record carries (about a tenth of PNG's size at 640x480)."""
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=quality)
    return out.getvalue()


@dataclass
class UploadResult:
    batches: list[str] = field(default_factory=list)
    records: int = 0
    status: str = "ok"  # ok | offline | window (outside the upload windows) | capped (byte rate)


def _signed_doc(raw: bytes, signature: bytes, keys, what: str, seen: int, fresh: bool) -> dict:
    """A signed, numbered, expiring JSON document, or ValueError naming what is wrong: signed by
    one of `keys`, numbered at least `seen` (the highest this device accepted: an older signed
    document replayed is a rollback) and, when `fresh`, unexpired (a store that stops updating
    cannot freeze the fleet forever)."""
    from datetime import UTC, datetime

    try:
        verify_signature(raw, signature, keys)
    except BundleError:
        raise ValueError(f"{what} is not signed by a trusted key") from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} is a {type(doc).__name__}, not an object")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise ValueError(f"{what}: version {version!r} is not an int64 version number")
    if version < seen:
        raise ValueError(
            f"{what}: version {version!r} is older than {seen}, the last "
            "this device accepted (a replayed document: refused)"
        )
    try:
        expires = datetime.fromisoformat(str(doc.get("expires")))
    except ValueError:
        raise ValueError(f"{what}: no valid expiry") from None
    if expires.tzinfo is None or (fresh and expires <= datetime.now(UTC)):
        raise ValueError(
            f"{what} expired at {doc.get('expires')}: the store stopped "
            "being updated, or someone holds it back"
        )
    return doc


def read_channel(raw: bytes, signature: bytes, name: str, keys, seen: int = 0) -> dict:
    """A channel document as the device may use it (see `_signed_doc`), well-formed."""
    doc = _signed_doc(raw, signature, keys, f"channel {name}", seen, fresh=True)
    release = doc.get("release")
    if release is not None and not isinstance(release, str):
        raise ValueError(f"channel {name}: release {release!r} is not a string")
    share = doc.get("share", 0.0)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise ValueError(f"channel {name}: share {share!r} is not a number in [0, 1]")
    cohorts = doc.get("cohorts", [])
    if not isinstance(cohorts, list) or not all(isinstance(c, str) for c in cohorts):
        raise ValueError(f"channel {name}: cohorts {cohorts!r} is not a list of names")
    return {**doc, "release": release, "share": float(share), "cohorts": cohorts}


def read_delegation(
    raw: bytes, signature: bytes, anchor, seen: int = 0, fresh: bool = True
) -> tuple[int, list]:
    """`releases/keys.json`: the release keys the pinned key (the root) vouches for, and its
    version. Only the anchor may sign it, so a stolen release key cannot add keys, and a newer
    document that leaves a key out revokes it on every device that reads it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    doc = _signed_doc(raw, signature, anchor, wire.KEYS, seen, fresh)
    pems = doc.get("release_keys")
    if not isinstance(pems, list) or not all(isinstance(k, str) for k in pems):
        raise ValueError(f"{wire.KEYS}: release_keys is not a list of PEM keys")
    try:
        keys = [load_public_key(k.encode()) for k in pems]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{wire.KEYS}: a release key does not load ({exc})") from None
    if not all(isinstance(k, Ed25519PublicKey) for k in keys):
        raise ValueError(f"{wire.KEYS}: every release key must be ed25519")
    return doc["version"], keys


def in_canary(device_id: str, cohort: str, canary: dict | None) -> bool:
    if not canary or not canary.get("release"):
        return False
    if cohort in canary.get("cohorts", []):
        return True
    bucket = int(hashlib.sha256(device_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < float(canary.get("share", 0.0))


class EdgeAgent:
    def __init__(
        self,
        state_dir: str | Path,
        remote: Remote,
        public_key_pem: bytes,
        device_id: str,
        cohort: str = "default",
        top_k: int = 3,
        threads: int = 1,
    ):
        if not wire.DEVICE_ID.match(device_id):
            raise ValueError(
                f"device id {device_id!r}: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        self.state = Path(state_dir)
        (self.state / "releases").mkdir(parents=True, exist_ok=True)
        (self.state / "staging").mkdir(exist_ok=True)
        (self.state / "channels").mkdir(exist_ok=True)
        self.remote, self.device_id, self.cohort = remote, device_id, cohort
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        self.anchor = load_public_key(public_key_pem)  # the root, or the release key itself
        if not isinstance(self.anchor, Ed25519PublicKey):
            raise ValueError("the pinned public key must be an ed25519 key (cvops keygen)")
        self.trusted = [self.anchor, *self._held_delegation()]
        self.top_k, self.threads = top_k, threads
        self.buffer = FeedbackBuffer(self.state / "buffer.db", device_id, cohort)
        self.identity = identity.load_or_create(self.state)
        self.events: list[str] = []
        self._runtime, self._preprocess = None, None
        self._loaded: str | None = None
        self._passed_over: deque = deque()  # recent frames not kept: (record_id, bytes, image)
        self._budget = KeepPolicy().budget_bytes  # the disk budget of the stream being served
        self.start()

    # -- the active release -------------------------------------------------------------------
    def _pointer(self) -> dict:
        path = self.state / "current.json"
        return (
            json.loads(path.read_text()) if path.exists() else {"release": None, "previous": None}
        )

    @property
    def release(self) -> str | None:
        return self._pointer()["release"]

    def _verified_dir(self, release: str) -> dict:
        """Re-verify an activated release on disk: signature, then every file's hash."""
        folder = self.state / "releases" / release
        manifest = verify_manifest(
            (folder / wire.MANIFEST_FILE).read_bytes(),
            (folder / wire.MANIFEST_SIGNATURE).read_bytes(),
            self.trusted,
        )
        for name in BUNDLE_FILES:
            verify_file(manifest, name, (folder / name).read_bytes())
        return manifest

    def _health_check(self, folder: Path) -> tuple[Runtime, dict]:
        """Load the model and run it once; a model that cannot answer is never served."""
        spec = json.loads((folder / wire.SPEC_FILE).read_text())
        try:
            runtime = Runtime(str(folder / wire.MODEL_FILE), spec, self.threads, self.top_k)
        except BundleError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError("health", f"model does not load or run: {exc}") from None
        runtime.health()
        return runtime, spec

    def start(self) -> None:
        """On (re)start: verify and health-check the active release; fall back to the previous
        one if it fails."""
        pointer = self._pointer()
        for candidate in (pointer["release"], pointer["previous"]):
            if not candidate:
                continue
            try:
                self._verified_dir(candidate)
                self._runtime, self._preprocess = self._health_check(
                    self.state / "releases" / candidate
                )
            except (BundleError, OSError) as exc:
                self.events.append(f"release {candidate} failed its startup check: {exc}")
                continue
            self._loaded = candidate
            if candidate != pointer["release"]:
                self.events.append(f"rolled back locally to {candidate}")
                write_atomic(
                    self.state / "current.json",
                    json.dumps({"release": candidate, "previous": None}).encode(),
                )
            return
        self._runtime, self._loaded = None, None

    # -- sync -----------------------------------------------------------------------------------
    def _held_delegation(self) -> list:
        """The release keys of the last delegation this device accepted (checked then), so a
        restart or a store that lost keys.json still verifies what the device runs."""
        raw, sig = self.state / "keys.json", self.state / "keys.json.sig"
        if not raw.exists():
            return []
        try:
            return read_delegation(raw.read_bytes(), sig.read_bytes(), self.anchor, fresh=False)[1]
        except (ValueError, OSError) as exc:
            self.events.append(f"held key delegation ignored: {exc}")
            return []

    def _refresh_keys(self, seen: dict) -> None:
        try:
            raw = self._small(wire.KEYS, MAX_CHANNEL)
            signature = self._small(wire.KEYS_SIGNATURE, MAX_SIGNATURE)
        except FileNotFoundError:
            return  # no root in use, or the store lost it: keep what was accepted
        try:
            verify_signature(raw, signature, self.anchor)
        except BundleError:  # it can add no trust; the held delegation still stands
            self.events.append(
                f"{wire.KEYS} is not signed by the pinned key: ignored (this device pins a "
                "release key itself, or the document is forged)"
            )
            return
        version, keys = read_delegation(raw, signature, self.anchor, seen.get("keys", 0))
        if version > seen.get("keys", 0) or not (self.state / "keys.json").exists():
            write_atomic(self.state / "keys.json.sig", signature)
            write_atomic(self.state / "keys.json", raw)
            self._remember_versions({"keys": version})
        self.trusted = [self.anchor, *keys]

    def target(self) -> str | None:
        self._refresh_keys(self._channel_versions())
        seen = self._channel_versions()  # pruned: a revoked key's numbers are forgotten
        channels, accepted = {}, {}
        for name in wire.CHANNELS:
            raw, signature = self._channel_document(name)
            if raw is None:
                channels[name] = None
                continue
            channels[name] = read_channel(raw, signature, name, self.trusted, seen.get(name, 0))
            signer = fingerprint(verify_signature(raw, signature, self.trusted))
            accepted[name] = {signer: channels[name]["version"]}
            held = self.state / "channels" / f"{name}.json"
            if not held.exists() or held.read_bytes() != raw:  # hold it: a deletion moves nothing
                write_atomic(held.with_name(f"{name}.json.sig"), signature)
                write_atomic(held, raw)
        self._remember_versions(accepted)
        if in_canary(self.device_id, self.cohort, channels["canary"]):
            release = channels["canary"]["release"]
        else:
            release = channels["stable"]["release"] if channels["stable"] else None
        if release is not None and not wire.RELEASE_ID.match(str(release)):
            raise ValueError(f"channel names an invalid release id {release!r}")
        return release

    def _channel_document(self, name: str) -> tuple[bytes | None, bytes | None]:
        """The store's channel document, or, when the store has none, the copy this device
        accepted last: a pointer is retired by a signed document naming no release, never by
        deleting it (which anyone who can write the store could do)."""
        try:
            return (
                self._small(wire.channel_key(name), MAX_CHANNEL),
                self._small(wire.channel_signature_key(name), MAX_SIGNATURE),
            )
        except FileNotFoundError:
            held = self.state / "channels" / f"{name}.json"
            if not held.exists():
                return None, None
            self.events.append(
                f"channel {name} is missing from the store: following the signed copy accepted "
                "last (only a signed document retires a channel)"
            )
            return held.read_bytes(), held.with_name(f"{name}.json.sig").read_bytes()

    def _channel_versions(self) -> dict:
        """The highest version accepted per channel, counting only keys still trusted (a
        revoked key's numbers are forgotten, so a leaked key cannot freeze the device), and of
        the key delegation (the pinned key's, never forgotten)."""
        path = self.state / "channels.json"
        held = json.loads(path.read_text()) if path.exists() else {}
        trusted = {fingerprint(k) for k in self.trusted}
        seen = {"keys": held.get("keys", 0)} if "keys" in held else {}
        for name, by_key in held.items():
            if name == "keys":
                continue
            if isinstance(by_key, int):  # written before versions were filed by signer
                by_key = {fingerprint(self.anchor): by_key}
            kept = [v for fp, v in by_key.items() if fp in trusted]
            if kept:
                seen[name] = max(kept)
        return seen

    def _remember_versions(self, versions: dict) -> None:
        """File the versions just accepted (per channel: {signer: version}; the delegation: an
        int) with those held, keeping the highest per signer and dropping untrusted signers."""
        path = self.state / "channels.json"
        held = json.loads(path.read_text()) if path.exists() else {}
        trusted = {fingerprint(k) for k in self.trusted}
        merged = {}
        for name in {*held, *versions}:
            old, new = held.get(name), versions.get(name)
            if name == "keys":
                merged[name] = max(old or 0, new or 0)
                continue
            if isinstance(old, int):
                old = {fingerprint(self.anchor): old}
            by_key = {fp: v for fp, v in (old or {}).items() if fp in trusted}
            for fp, v in (new or {}).items():
                by_key[fp] = max(v, by_key.get(fp, 0))
            merged[name] = by_key
        write_atomic(path, json.dumps(merged).encode())

    def _small(self, key: str, cap: int) -> bytes:
        data = self.remote.get(key, 0, cap + 1)
        if len(data) > cap:
            raise BundleError("too_large", f"{key} is larger than {cap} bytes: not read further")
        return data

    def _fetch(self, key: str, part: Path, expected: int) -> int:
        """Download to `part`, resuming from what is already there; returns new bytes."""
        have = part.stat().st_size if part.exists() else 0
        if have > expected:
            part.unlink()
            have = 0
        new = 0
        with open(part, "ab") as handle:
            while have < expected:
                chunk = self.remote.get(key, have, min(CHUNK, expected - have))
                if not chunk:
                    break  # the store has fewer bytes than the manifest promises
                handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
                have += len(chunk)
                new += len(chunk)
        return new

    def sync(self) -> SyncResult:
        try:
            target = self.target()
            if target is None:
                return SyncResult("no-release", self._loaded, "no channel names a release yet")
            if target == self._loaded and self._still_trusted(target):
                return SyncResult("up-to-date", target)
            return self._install(target)  # a re-signed release: files come from the held copy
        except Offline as exc:
            return SyncResult("offline", self._loaded, str(exc))
        except (BundleError, FileNotFoundError, ValueError) as exc:
            self.events.append(f"rejected {exc}")
            return SyncResult("rejected", self._loaded, str(exc))

    def _still_trusted(self, release: str) -> bool:
        """False when the key that signed the running release was revoked since. Only the
        signature: the files were hashed at activation and are hashed again at every start."""
        folder = self.state / "releases" / release
        try:
            manifest, signature = (
                (folder / wire.MANIFEST_FILE).read_bytes(),
                (folder / wire.MANIFEST_SIGNATURE).read_bytes(),
            )
            verify_manifest(manifest, signature, self.trusted)
            return True
        except (BundleError, OSError):
            return False

    def _install(self, release: str) -> SyncResult:
        prefix = wire.release_key(release)
        staging = self.state / "staging" / release
        staging.mkdir(parents=True, exist_ok=True)
        try:
            manifest_bytes = self._small(f"{prefix}/manifest.json", MAX_MANIFEST)
            signature = self._small(f"{prefix}/manifest.sig", MAX_SIGNATURE)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"channel names release {release}, which is not in the "
                "store (missing or unfinished)"
            ) from None
        manifest = verify_manifest(manifest_bytes, signature, self.trusted)
        if manifest.get("release") != release:
            raise BundleError(
                "manifest",
                f"{prefix}/manifest.json describes {manifest.get('release')!r}, not {release}",
            )
        downloaded, used_delta = 0, False
        delta = manifest.get("delta")
        for name in BUNDLE_FILES:
            final = staging / name
            if final.exists():
                try:
                    verify_file(manifest, name, final.read_bytes())
                    continue  # finished before a crash
                except BundleError:
                    final.unlink()
            data = self._held_copy(manifest, name)  # unchanged files never travel again
            if data is None and name == wire.MODEL_FILE and delta and delta["from"] == self._loaded:
                if delta.get("file") != delta_name(self._loaded):  # before it names any path
                    raise BundleError(
                        "manifest",
                        f"delta file {delta.get('file')!r} is not {delta_name(self._loaded)!r}",
                    )
                part = staging / f"{delta['file']}.part"
                downloaded += self._fetch(f"{prefix}/{delta['file']}", part, delta["size"])
                base = (self.state / "releases" / self._loaded / wire.MODEL_FILE).read_bytes()
                try:
                    data, used_delta = apply_delta(manifest, base, part.read_bytes()), True
                except BundleError as exc:
                    part.unlink(missing_ok=True)
                    self.events.append(f"delta rejected ({exc}); fetching the full model")
            if data is None:
                part = staging / f"{name}.part"
                downloaded += self._fetch(f"{prefix}/{name}", part, manifest["files"][name]["size"])
                try:
                    data = verify_file(manifest, name, part.read_bytes())
                except BundleError:
                    part.unlink(missing_ok=True)  # never resume from bytes that failed
                    raise
            write_atomic(final, data)
            for leftover in staging.glob(f"{name}*.part"):
                leftover.unlink()
        (staging / wire.MANIFEST_FILE).write_bytes(manifest_bytes)
        (staging / wire.MANIFEST_SIGNATURE).write_bytes(signature)
        for leftover in staging.glob("*.part"):
            leftover.unlink()
        session, preprocess = self._health_check(staging)
        self._activate(release, staging)
        self._runtime, self._preprocess, self._loaded = session, preprocess, release
        return SyncResult("updated", release, downloaded_bytes=downloaded, used_delta=used_delta)

    def _held_copy(self, manifest: dict, name: str) -> bytes | None:
        if not self._loaded:
            return None
        held = self.state / "releases" / self._loaded / name
        if held.exists():
            data = held.read_bytes()
            if (
                len(data) == manifest["files"][name]["size"]
                and hashlib.sha256(data).hexdigest() == manifest["files"][name]["sha256"]
            ):
                return data
        return None

    def _activate(self, release: str, staging: Path) -> None:
        """New directory in place, then the pointer swap; keep the previous release."""
        target = self.state / "releases" / release
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        previous = self._loaded if self._loaded != release else self._pointer()["previous"]
        write_atomic(
            self.state / "current.json",
            json.dumps({"release": release, "previous": previous}).encode(),
        )
        for old in (self.state / "releases").iterdir():
            if old.name not in (release, previous):
                shutil.rmtree(old, ignore_errors=True)

    # -- serving --------------------------------------------------------------------------------
    def predict(self, image: bytes, frame: str | None = None) -> Prediction:
        label, confidence, top, boxes = self._answer(load_rgb(image))
        record_id = self.buffer.record(
            self._loaded,
            hashlib.sha256(image).hexdigest(),
            image,
            label,
            confidence,
            top,
            frame,
            boxes,
        )
        return Prediction(record_id, label, confidence, top, self._loaded, boxes)

    def _answer(self, rgb, prepared=None) -> tuple[str, float, list, list[dict] | None]:
        """`prepared`: (the runtime that prepared it, its input batch and sizes), used while
        that runtime is still the one served."""
        if self._runtime is None:
            raise RuntimeError(f"device {self.device_id} has no verified release to serve yet")
        if prepared is not None and prepared[0] is self._runtime:
            answer = self._runtime.infer(*prepared[1])[0]
        else:
            answer = self._runtime.run([rgb])[0]
        label, confidence, top, boxes = answer.label, answer.confidence, answer.top, None
        if answer.boxes is not None:  # a detector's answer: its boxes are recorded too
            boxes = self._recordable(answer)
            shown = float(self._preprocess.get("answer_threshold", 0.5))
            top = [(b["label"], b["score"]) for b in boxes[: self.top_k] if b["score"] >= shown]
            label, confidence = top[0] if top else ("", 0.0)  # "": nothing at the operating point
        return label, confidence, top, boxes

    def stream(
        self,
        source,
        max_frames: int | None = None,
        on_frame=None,
        policy: KeepPolicy | None = None,
    ) -> StreamResult:
        """Predict a source's frames (`sources.Source`) until it ends, `max_frames` were
        predicted or `source.stop()`: every prediction recorded with the source and the frame's
        time; its image kept when the release's buffer policy (or `policy`) says it is worth
        sending, and the images on disk held under the policy's budget. A frame that does not
        decode or predict is skipped with its reason, never fatal."""
        from PIL import Image

        from cvops_pipelines.edge.keep import Selector

        policy = policy or KeepPolicy.from_spec(self._preprocess, self.events.append)
        selector, result = Selector(policy), StreamResult(source=source.name)
        self._passed_over = deque(maxlen=policy.hold_frames)
        self._budget = policy.budget_bytes
        threshold = float((self._preprocess or {}).get("answer_threshold", 0.5))

        def prepare(frame):  # on the decoding thread, while the previous frame is predicted
            rgb = load_rgb(frame.data) if frame.data is not None else Image.fromarray(frame.image)
            runtime = self._runtime
            return rgb, None if runtime is None else (runtime, runtime.prepare([rgb]))

        # a live source: one frame ahead at most, so what is predicted is never stale
        frames = ahead(source.frames(), prepare, depth=1 if source.live else 2)
        try:
            self._predict(source, frames, selector, threshold, result, max_frames, on_frame)
        finally:
            source.stop()  # first: a live source's reader may be waiting on the camera
            frames.close()
        result.stats = source.stats
        return result

    def _predict(self, source, frames, selector, threshold, result, max_frames, on_frame) -> None:
        from cvops_pipelines.edge.keep import margin_of

        policy = selector.policy
        for frame, prepared in frames:
            key = None if source.live else frame.key  # a live frame never comes again
            if key is not None and self.buffer.seen(key):
                result.already += 1
                continue
            try:
                if isinstance(prepared, Exception):
                    raise prepared
                rgb, ready = prepared
                label, confidence, top, boxes = self._answer(rgb, ready)
            except Exception as exc:  # noqa: BLE001  (a frame that fails: skip, keep serving)
                reason = f"{type(exc).__name__}: {exc}"
                if key is not None:
                    self.buffer.skip(key, reason)
                self.events.append(f"skipped frame {frame.key}: {reason}")
                result.failed += 1
                result.failures = [*result.failures[-99:], (frame.key, reason)]
                continue
            pixels = frame.image if frame.image is not None else np.asarray(rgb)
            verdict = selector.judge(
                source.name, frame.key, label, margin_of(top, boxes, threshold), pixels
            )
            image = None
            if verdict.keep:
                image = frame.data if frame.data is not None else encode_jpeg(rgb)
            # the frame's id: its bytes' hash; a video frame without its image, its own key's
            content = image or frame.data or f"{source.name}\0{frame.key}".encode()
            record_id = self.buffer.record(
                self._loaded,
                hashlib.sha256(content).hexdigest(),
                image,
                label,
                confidence,
                top,
                key,
                boxes,
                source=source.name,
                frame_time=frame.time,
                keep=verdict.keep,
                reason=verdict.reason,
                value=verdict.value,
                captured_at=frame.captured_at,
            )
            result.predicted += 1
            if verdict.keep:
                result.kept += 1
                result.evicted += self.buffer.evict(policy.budget_bytes)
            else:
                self._passed_over.append((record_id, frame.data, rgb))
            if on_frame is not None:
                on_frame(frame, Prediction(record_id, label, confidence, top, self._loaded, boxes))
            if max_frames is not None and result.predicted >= max_frames:
                return

    def _recordable(self, answer) -> list[dict]:
        """A detector's boxes as records carry them; a box the pipeline would refuse (NaN,
        zero area: `wire.box_problem`) is dropped here and said in the events."""
        answered = [
            {"label": d.label, "score": round(d.score, 6), "box": [round(v, 2) for v in d.box]}
            for d in answer.boxes
        ]
        boxes = [b for b in answered if wire.box_problem(b) is None]
        if len(boxes) < len(answered):
            self.events.append(
                f"{len(answered) - len(boxes)} detection(s) dropped: "
                f"{next(wire.box_problem(b) for b in answered if wire.box_problem(b))}"
            )
        return boxes

    @property
    def spec(self) -> dict | None:
        """The served release's preprocess.json (a detector's also names its answer_threshold)."""
        return self._preprocess

    def correct(self, record_id: str, label: str) -> None:
        self._keep_held(record_id)
        self.buffer.correct(record_id, label)

    def _keep_held(self, record_id: str) -> None:
        """A frame the selector passed over and the agent still holds: corrected, its image is
        worth sending after all."""
        for held, data, rgb in self._passed_over:
            if held == record_id:
                self.buffer.attach(record_id, data if data is not None else encode_jpeg(rgb))
                self.buffer.evict(self._budget)  # the budget holds with the corrected image too
                return

    def correct_boxes(self, record_id: str, boxes: list[dict]) -> None:
        """An operator's review of a detector's answer: the whole corrected set ({label, box}
        in the image's pixels), after adding, deleting, moving or relabelling boxes; an empty
        list says the image holds nothing. ValueError, before anything is recorded, for a box
        the pipeline would turn away (`wire.box_problem`: the same rule at both ends)."""
        if not isinstance(boxes, list):
            raise ValueError('expected a list of {"label": ..., "box": [x0, y0, x1, y1]}')
        for i, item in enumerate(boxes):
            problem = wire.box_problem(item)
            if problem:
                raise ValueError(f"box {i + 1}: {problem}")
        clean = [
            {"label": b["label"], "box": [round(float(v), 2) for v in b["box"]]} for b in boxes
        ]
        self._keep_held(record_id)
        self.buffer.correct(record_id, summary_label([b["label"] for b in clean]), clean)

    # -- feedback upload ------------------------------------------------------------------------
    def public_key_pem(self) -> bytes:
        """What the operator enrols (`cvops enrol`)."""
        return identity.public_pem(self.identity)

    def upload(self, max_records: int = 256, link: Link | None = None) -> UploadResult:
        """Seal what waits into batches, the most valuable records first (corrections, then
        kept images, `keep.py`), and send them in that order, each after its signature (so the
        pipeline never sees a batch without one), as far as `link` allows now: outside its
        windows nothing goes, and past its byte rate the rest waits for the next call. A batch
        leaves the device only after the store reports it whole; re-sending one is harmless
        (same id, bytes and signature)."""
        result, link = UploadResult(), link or Link()
        if not link.open():
            result.status = "window"
            return result
        while self.buffer.seal(max_records):
            pass
        for batch_id in self.buffer.sealed():
            payload = self.buffer.payload(batch_id)
            key = wire.batch_key(batch_id)
            if not link.take(len(payload)):
                result.status = "capped"
                return result
            try:
                self.remote.put(wire.batch_signature_key(batch_id), self.identity.sign(payload))
                self.remote.put(key, payload)
                if self.remote.size(key) != len(payload):
                    raise Offline(f"store did not confirm {key}")
            except Offline:
                result.status = "offline"
                return result
            records = self.buffer.records_in(batch_id)
            self.buffer.forget(batch_id)
            result.batches.append(batch_id)
            result.records += records
        return result

    def close(self) -> None:
        self.buffer.close()
