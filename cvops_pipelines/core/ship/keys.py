"""Key rotation: a root key, kept offline, vouches for the release keys devices trust.

Devices pin one key. Pinning the release key itself works, but then replacing it means visiting
every device. Pinning a root key instead lets the root sign `releases/keys.json` (numbered,
expiring, like a channel document) naming the release keys; devices trust exactly those, so:
- rotation: a new release key is delegated, everything live is re-signed with it, and the old
  one stays trusted until the next delegation leaves it out;
- revocation after a leak (`revoke_old`): the new delegation leaves the old key out, and every
  device that reads it refuses whatever that key signed, including an older delegation replayed.
The root key signs only this document; keep it off the pipeline machine.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.learn.enrolment import enrol_device, read_register
from cvops_pipelines.core.ship.release import ReleaseStore, generate_keypair, load_private_key
from cvops_pipelines.edge.wire import CHANNELS, KEYS, KEYS_SIGNATURE, RELEASES

DELEGATION_TTL = timedelta(days=365)  # re-delegate (`cvops keys delegate`) within a year


def pem(key) -> bytes:
    """PEM of a public key, or of a private key's public half."""
    from cryptography.hazmat.primitives import serialization

    public = key.public_key() if hasattr(key, "private_bytes") else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def delegation(store: Store) -> dict | None:
    """The current `releases/keys.json` as written (devices check its signature, not us)."""
    return json.loads(store.read_bytes(KEYS)) if store.exists(KEYS) else None


def delegate(store: Store, root_key, release_pems: list[bytes], ttl=DELEGATION_TTL) -> dict:
    """Sign a new delegation naming exactly `release_pems`, numbered above the current one."""
    previous = delegation(store) or {}
    now = datetime.now(UTC)
    doc = {
        "release_keys": [p.decode() for p in release_pems],
        "version": int(previous.get("version", 0)) + 1,
        "signed_at": now.isoformat(timespec="seconds"),
        "expires": (now + ttl).isoformat(timespec="seconds"),
    }
    body = json.dumps(doc, indent=2).encode()
    store.write_bytes(KEYS_SIGNATURE, root_key.sign(body))  # signature first, as for channels
    store.write_bytes(KEYS, body)
    return doc


def delegated(store: Store, key) -> bool:
    """Whether devices that follow the root would trust `key` (True when no root is in use)."""
    doc = delegation(store)
    return doc is None or pem(key).decode() in doc["release_keys"]


class KeyNotDelegated(ValueError):
    """The pipeline's release key is not one the root vouches for."""


def signing_key(store: Store, path: Path):
    """The release key at `path`, refused (before anything is signed) when a root delegation is
    in use and does not name it: devices would reject everything it signs."""
    key = load_private_key(path)
    if not delegated(store, key):
        raise KeyNotDelegated(
            f"the release key {path} is not among the keys {KEYS} (version "
            f"{delegation(store)['version']}) delegates to: devices would refuse what it signs. "
            "Delegate it with `cvops keys delegate --root-key ...` (or finish `cvops keys rotate`)."
        )
    return key


@dataclass
class Rotation:
    new_key: Path
    retired_key: Path
    delegation_version: int
    manifests: int
    channels: list[str]
    enrolments: int


def rotate(store: Store, root_key, key_path: Path, actor: str, revoke_old: bool) -> Rotation:
    """Replace the release key at `key_path`: delegate the new key (and the old one too unless
    `revoke_old`), re-sign every published manifest, channel document and enrolment with it,
    then move the new key into place and keep the old one beside it as `*.retired-<time>`.
    Re-running after a crash picks up the half-made new key and finishes the job."""
    old = load_private_key(key_path)
    pending = key_path.parent / "release_signing.next.key"
    if not pending.exists():
        generate_keypair(key_path.parent, "release_signing.next")
    new = load_private_key(pending)
    keep = [] if revoke_old or pem(old) == pem(new) else [pem(old)]
    doc = delegate(store, root_key, [pem(new), *keep])
    releases = ReleaseStore(store, new)
    manifests = 0
    for release in releases.ids():
        body = store.read_bytes(f"{RELEASES}/{release}/manifest.json")
        store.write_bytes(f"{RELEASES}/{release}/manifest.sig", new.sign(body))
        manifests += 1
    channels = []
    for name in CHANNELS:
        current = releases.channel(name)
        if current is not None:
            releases.point(
                name,
                current["release"],
                "re-signed by a new release key",
                actor,
                current.get("share", 1.0),
                tuple(current.get("cohorts", [])),
            )
            channels.append(name)
    register = read_register(store, [old.public_key(), new.public_key()])
    for device, key in register.keys.items():
        enrol_device(store, new, device, pem(key), f"{actor} (re-signed)")
    for device in register.revoked:
        enrol_device(store, new, device, b"", f"{actor} (re-signed)", revoked=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    retired = key_path.with_name(f"{key_path.name}.retired-{stamp}")
    os.replace(key_path, retired)
    os.replace(pending, key_path)
    public = key_path.with_suffix(".pub")
    if public.exists():
        os.replace(public, retired.with_name(f"{public.name}.retired-{stamp}"))
    os.replace(pending.with_suffix(".pub"), public)
    return Rotation(
        key_path,
        retired,
        doc["version"],
        manifests,
        channels,
        len(register.keys) + len(register.revoked),
    )
