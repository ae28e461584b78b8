"""Releases on the server side: signing keys, bundles with deltas, channels, canary decisions.

Channels: `releases/channels/stable.json` and `canary.json` name a release; a device follows
canary when its cohort is listed or its id hashes into the canary share, stable otherwise. Every
pointer change is an event in `releases/history/` (who, what, when, why), never edited.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.handoffs import ExportRecord, ReleaseRecord
from cvops_pipelines.core.base.ledger import (
    MemoryLedger,
    VersionLedger,
    next_version,
    valid_version,
)
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.edge.bundle import FORMAT, BundleError, delta_name, sha256, verify_signature
from cvops_pipelines.edge.wire import (
    CHANNELS,
    CLASSES_FILE,
    MANIFEST_FILE,
    MANIFEST_SIGNATURE,
    MODEL_FILE,
    RELEASES,
    SPEC_FILE,
    channel_key,
    channel_signature_key,
    release_id,
    release_key,
)


class SigningKeyMissing(FileNotFoundError):
    """No private release key where the configuration says."""


def generate_keypair(folder: Path, name: str = "release_signing") -> tuple[Path, Path]:
    """An ed25519 key pair: `<name>.key` (PKCS8 PEM, mode 0600, never commit it) and
    `<name>.pub` (pin it on devices)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    if private.exists():
        raise FileExistsError(f"{private} exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def load_private_key(path: Path):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if not path.exists():
        raise SigningKeyMissing(
            f"no release signing key at {path}: create one with `cvops keygen "
            f"--out {path.parent}` (or set CVOPS_SIGNING_KEY)"
        )
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(
            f"{path} is a {type(key).__name__.lstrip('_')}, not an ed25519 key: devices verify "
            "ed25519 only (make one with `cvops keygen`)"
        )
    return key


def release_public_keys(path: Path) -> list:
    """The public release key(s) the pipeline checks its own signatures with (device
    enrolments); none when no key exists yet."""
    try:
        return [load_private_key(path).public_key()]
    except SigningKeyMissing:
        return []


@dataclass
class Release:
    id: str
    manifest: dict
    files: dict[str, bytes]  # everything to publish, manifest.json and manifest.sig included


def shared_byte_share(old: bytes, new: bytes) -> float:
    """Share of byte positions that are equal: a cheap predictor of what bsdiff can save (same
    architecture, same layout), computed in milliseconds where bsdiff takes ~40 s on a fully
    changed 11 MB model."""
    n = min(len(old), len(new))
    if n == 0:
        return 0.0
    same = np.frombuffer(old[:n], np.uint8) == np.frombuffer(new[:n], np.uint8)
    return float(same.sum()) / max(len(old), len(new))


def build_release(
    model: bytes,
    preprocess: dict,
    meta: dict,
    key,
    parent: dict | None = None,
    parent_model: bytes | None = None,
    min_shared: float = 0.5,
) -> Release:
    """A signed bundle; with the parent's model, also a bsdiff delta from it when at least
    `min_shared` of the bytes are unchanged (a head-only update); otherwise devices download
    the full model and the manifest says why."""
    import bsdiff4

    content = {
        MODEL_FILE: model,
        SPEC_FILE: json.dumps(preprocess, indent=2, sort_keys=True).encode(),
        CLASSES_FILE: json.dumps(list(preprocess["classes"])).encode(),
    }
    manifest = {
        "format": FORMAT,
        "release": release_id(model, str(meta["model_version"])),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **meta,
        "parent": parent["release"] if parent else None,
        "files": {n: {"sha256": sha256(d), "size": len(d)} for n, d in content.items()},
    }
    files = dict(content)
    shared = shared_byte_share(parent_model, model) if parent_model is not None else 0.0
    if parent is not None and parent_model is not None and shared < min_shared:
        manifest["delta_note"] = (
            f"no delta: only {shared:.0%} of the bytes are unchanged "
            f"(a delta pays off from {min_shared:.0%}; a full fine-tune "
            "changes nearly every weight)"
        )
    elif parent is not None and parent_model is not None:
        delta = bsdiff4.diff(parent_model, model)
        manifest["delta"] = {
            "from": parent["release"],
            "file": delta_name(parent["release"]),
            "base_sha256": sha256(parent_model),
            "sha256": sha256(delta),
            "size": len(delta),
        }
        files[delta_name(parent["release"])] = delta
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    files[MANIFEST_FILE], files[MANIFEST_SIGNATURE] = body, key.sign(body)
    return Release(manifest["release"], manifest, files)


@dataclass
class CanaryVerdict:
    action: str  # promote | rollback | wait
    reasons: list[str]
    table: pd.DataFrame = field(default_factory=pd.DataFrame)


CHANNEL_TTL = timedelta(days=30)  # a channel document older than this is refused by devices


class ChannelTampered(ValueError):
    """A channel document in the store that this pipeline did not sign, or an older one replayed,
    or one the pipeline signed that has gone: nothing is decided on it."""


class CheckedChannel(NamedTuple):
    doc: dict | None
    problem: str  # "" when the document can be used
    own: bool = False  # signed by the store's own key: its number may be followed


class ReleaseStore:
    """Publishing and channel pointers over any Store (local folder or S3 prefix). With the
    release key, every channel document it writes is signed, numbered and dated: devices refuse
    an unsigned, older-numbered or expired one (no rollback or freeze through the store). With
    the key it also reads channels only as signed (by `trusted`, default the key's public half)
    and numbered at least as high as the `ledger` records, so a store writer can neither steer
    the pipeline's decisions nor its numbering."""

    def __init__(self, store: Store, key=None, ledger: VersionLedger | None = None, trusted=None):
        self.store, self.key = store, key
        self.ledger = ledger if ledger is not None else MemoryLedger()
        self.trusted = trusted or ([key.public_key()] if key is not None else [])

    def publish(self, release: Release) -> str:
        """Files first, the signed manifest last: a release without manifest.sig is unfinished."""
        prefix = f"{RELEASES}/{release.id}"
        for name, data in release.files.items():
            if name not in (MANIFEST_FILE, MANIFEST_SIGNATURE):
                self.store.write_bytes(f"{prefix}/{name}", data)
        self.store.write_bytes(f"{prefix}/{MANIFEST_FILE}", release.files[MANIFEST_FILE])
        self.store.write_bytes(f"{prefix}/{MANIFEST_SIGNATURE}", release.files[MANIFEST_SIGNATURE])
        return self.store.uri(prefix)

    def published(self, release: str) -> bool:
        return self.store.exists(f"{RELEASES}/{release}/manifest.sig")

    def ids(self) -> list[str]:
        """Every finished (signed) release in the store."""
        return sorted(
            e.key.split("/")[-2]
            for e in self.store.list(f"{RELEASES}/")
            if e.key.endswith("/manifest.sig")
        )

    def manifest(self, release_id: str) -> dict:
        return json.loads(self.store.read_bytes(f"{RELEASES}/{release_id}/manifest.json"))

    def model(self, release_id: str) -> bytes:
        return self.store.read_bytes(release_key(release_id, MODEL_FILE))

    def spec(self, release_id: str) -> dict:
        """The spec a release shipped with (preprocessing, classes, task, operating point): the
        one place the pipeline reads it."""
        return json.loads(self.store.read_bytes(release_key(release_id, SPEC_FILE)))

    def live(self) -> dict[str, str]:
        """release -> channel for what devices run now (stable first when both name one)."""
        live = {}
        for channel in CHANNELS:
            pointer = self.channel(channel) or {}
            if pointer.get("release"):
                live.setdefault(pointer["release"], channel)
        return live

    def channel(self, name: str) -> dict | None:
        """The channel document; with the key, only as this pipeline signed it and numbered at
        least as high as the ledger's record of what it signed (ChannelTampered otherwise)."""
        doc, problem, _ = self.checked_channel(name)
        if problem:
            raise ChannelTampered(problem)
        return doc

    def checked_channel(self, name: str) -> CheckedChannel:
        """The channel document (or None), why it cannot be used (or ""), and whether this very
        key signed it."""
        key, record = channel_key(name), f"channel:{name}"
        if not self.store.exists(key):
            if self.key is not None and self.ledger.highest(record) > 0:
                return CheckedChannel(
                    None,
                    (
                        f"{key} is gone, but this pipeline signed version "
                        f"{self.ledger.highest(record)} of it: a store writer deleted it (devices "
                        "keep following their signed copy); restore it from a backup, or make a "
                        "new decision"
                    ),
                )
            return CheckedChannel(None, "")
        body = self.store.read_bytes(key)
        if self.key is None:
            return CheckedChannel(json.loads(body), "")
        try:
            signer = verify_signature(
                body, self.store.read_bytes(channel_signature_key(name)), self.trusted
            )
            doc = json.loads(body)
            version = doc["version"]
        except (BundleError, FileNotFoundError, ValueError, KeyError, TypeError):
            return CheckedChannel(
                None,
                (
                    f"{key} is not signed by the release key: someone else wrote it, and nothing "
                    "is decided on it (devices refuse it too); restore the signed copy from a "
                    "backup, or make a new decision"
                ),
            )
        if not valid_version(version):
            return CheckedChannel(
                None,
                (
                    f"{key} is version {version!r}, not a number this pipeline signs (beyond its "
                    "clock: signed with a leaked key?); rotate the key and make a new decision"
                ),
            )
        if version < self.ledger.highest(record):
            return CheckedChannel(
                None,
                (
                    f"{key} is version {version!r}, older than version "
                    f"{self.ledger.highest(record)} this pipeline signed: a replayed document"
                ),
            )
        return CheckedChannel(doc, "", signer == self.key.public_key())

    def point(
        self,
        channel: str,
        release: str | None,
        reason: str,
        actor: str,
        share: float = 1.0,
        cohorts: tuple[str, ...] = (),
    ) -> dict:
        """Move a channel pointer and record the event. `release=None` retires the channel."""
        if release is not None and not self.published(release):
            raise FileNotFoundError(f"release {release} is not published")
        previous, problem, own = self.checked_channel(channel)  # a new decision replaces it
        if problem:
            reason = f"{reason} (replacing what the store held: {problem.split(':')[0]})"
        # follow only this key's own numbers: a key being revoked (it leaked) may have signed
        # any number, up to one that leaves no room above it
        signed = [previous["version"]] if own else []
        version = next_version(self.ledger, f"channel:{channel}", *signed)
        now = datetime.now(UTC)
        doc = {
            "channel": channel,
            "release": release,
            "share": share,
            "cohorts": list(cohorts),
            "updated_at": now.isoformat(timespec="seconds"),
            "previous": previous["release"] if previous else None,
            "version": version,
            "expires": (now + CHANNEL_TTL).isoformat(timespec="seconds"),
        }
        body = json.dumps(doc).encode()
        if self.key is not None:  # signature first: a reader never sees a new doc unsigned
            self.store.write_bytes(channel_signature_key(channel), self.key.sign(body))
        self.store.write_bytes(channel_key(channel), body)
        event = {
            "at": now.isoformat(timespec="microseconds"),
            "actor": actor,
            "channel": channel,
            "from_release": doc["previous"],
            "to_release": release,
            "reason": reason,
        }
        stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
        self.store.write_bytes(
            f"{RELEASES}/history/{stamp}-{channel}.json", json.dumps(event).encode()
        )
        return doc

    def history(self) -> pd.DataFrame:
        rows = [
            json.loads(self.store.read_bytes(e.key))
            for e in self.store.list(f"{RELEASES}/history/")
            if e.key.endswith(".json")
        ]
        frame = pd.DataFrame(
            rows, columns=["at", "actor", "channel", "from_release", "to_release", "reason"]
        )
        frame = frame.sort_values("at", kind="stable").reset_index(drop=True)
        return frame.astype(object).where(frame.notna(), None)  # a retired channel: None


def apply_verdict(
    releases: ReleaseStore, release: str, verdict: CanaryVerdict, actor: str, on_promote=None
) -> None:
    """Move the pointers a verdict calls for: promote (stable -> release, canary retired, then
    `on_promote(manifest)`, e.g. the MLflow `champion` alias) or roll back (canary retired, so
    canary devices return to stable). `wait` changes nothing."""
    why = "; ".join(verdict.reasons)
    if verdict.action == "promote":
        releases.point("stable", release, why, actor)
        releases.point("canary", None, f"{release} promoted to stable", actor)
        if on_promote:
            on_promote(releases.manifest(release))
    elif verdict.action == "rollback":
        releases.point("canary", None, f"{release} rolled back: {why}", actor)


class ReleaseRefused(ValueError):
    """Nothing may ship for this target, or the artifact is not what export wrote."""


def chosen_artifact(store: Store, onnx_record: ExportRecord, target: str) -> tuple[str, bytes]:
    """(artifact name, its bytes) export chose for `target`, verified against its sha256."""
    artifact = onnx_record.choices.get(target)
    if not artifact:
        raise ReleaseRefused(
            f"no artifact qualifies for target {target!r}: see onnx_model's choices table for "
            "why each was refused"
        )
    entry = onnx_record.artifacts[artifact]
    model = store.read_bytes(entry["key"])
    if sha256(model) != entry["sha256"]:
        raise ReleaseRefused(f"{entry['uri']} changed since onnx_model wrote it (sha256 mismatch)")
    return artifact, model


def release_meta(onnx_record: ExportRecord, artifact: str, target: str) -> dict:
    """What a release's manifest says about where its model came from."""
    return {
        "model_name": onnx_record.model_name,
        "model_version": onnx_record.source_model_version,
        "dataset_version": onnx_record.dataset_version,
        "artifact": artifact,
        "target": target,
    }


@dataclass
class Published:
    record: ReleaseRecord  # the asset value: release, parent, meta, sizes, the canary pointer
    new: bool  # False: the bundle existed (a re-run) and no pointer moved
    delta_note: str = ""  # why no delta, when there is none


def publish_release(
    releases: ReleaseStore,
    model: bytes,
    preprocess: dict,
    meta: dict,
    key,
    actor: str,
    canary_share: float,
    canary_cohorts: tuple[str, ...] = (),
) -> Published:
    """Sign and publish a bundle (with a delta from stable) and point canary at it. Idempotent:
    the same model bytes and version are the same release, published once; a re-run moves no
    pointer. The first release goes to every device on canary until feedback promotes it."""
    stable = releases.channel("stable")
    parent_id = stable["release"] if stable and stable.get("release") else None
    same = release_id(model, str(meta["model_version"]))
    if releases.published(same):
        manifest = releases.manifest(same)
        delta = manifest.get("delta")
        return Published(
            ReleaseRecord(
                release=same,
                parent=manifest["parent"],
                uri=releases.store.uri(f"{RELEASES}/{same}"),
                model_bytes=len(model),
                delta_bytes=delta["size"] if delta else None,
                canary=releases.channel("canary"),
                **meta,
            ),
            new=False,
        )
    release = build_release(
        model,
        preprocess,
        meta,
        key,
        releases.manifest(parent_id) if parent_id else None,
        releases.model(parent_id) if parent_id else None,
    )
    uri = releases.publish(release)
    if parent_id is None:
        canary = releases.point(
            "canary",
            release.id,
            "first release: every device runs it on canary until field feedback promotes it",
            actor,
            share=1.0,
        )
    else:
        canary = releases.point(
            "canary",
            release.id,
            f"new model v{meta['model_version']} ({meta['artifact']}) against stable {parent_id}",
            actor,
            share=canary_share,
            cohorts=tuple(canary_cohorts),
        )
    delta = release.manifest.get("delta")
    return Published(
        ReleaseRecord(
            release=release.id,
            parent=parent_id,
            uri=uri,
            model_bytes=len(model),
            delta_bytes=delta["size"] if delta else None,
            canary=canary,
            **meta,
        ),
        new=True,
        delta_note=""
        if delta
        else release.manifest.get("delta_note", "no parent: devices download the full model"),
    )
