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

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cvops_pipelines.core.base.ledger import MemoryLedger, VersionLedger, next_version
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.learn.enrolment import enrol_device, read_register
from cvops_pipelines.core.ship.release import ReleaseStore, generate_keypair, load_private_key
from cvops_pipelines.edge.agent import read_delegation
from cvops_pipelines.edge.bundle import load_public_key
from cvops_pipelines.edge.wire import CHANNELS, KEYS, KEYS_SIGNATURE, RELEASES

DELEGATION_TTL = timedelta(days=365)  # re-delegate (`cvops keys delegate`) within a year


def pem(key) -> bytes:
    """PEM of a public key, or of a private key's public half."""
    from cryptography.hazmat.primitives import serialization

    public = key.public_key() if hasattr(key, "private_bytes") else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def root_public_key(path: Path):
    """The root public key at `path`, or None when there is no file (no root in use)."""
    if not path.exists():
        return None
    key = load_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an ed25519 public key")
    return key


class DelegationRefused(ValueError):
    """A delegation `cvops keys` will not write: devices would refuse it, or it would brick them."""


def delegation(store: Store, root_public=None, ledger: VersionLedger | None = None) -> dict | None:
    """The current `releases/keys.json`, only as the root signed it: None when there is none,
    when no root public key is known (`root_public` None) or when the store's copy is unsigned,
    forged or older than the ledger's record (a replay), since a store writer could have put it
    there. A verified one raises the ledger's record."""
    if root_public is None or not store.exists(KEYS) or not store.exists(KEYS_SIGNATURE):
        return None
    try:
        version, _ = read_delegation(
            store.read_bytes(KEYS), store.read_bytes(KEYS_SIGNATURE), root_public, fresh=False
        )
    except ValueError:
        return None
    if ledger is not None:
        if version < ledger.highest("keys"):
            return None
        ledger.raise_to("keys", version)
    return json.loads(store.read_bytes(KEYS))


def delegate(
    store: Store,
    root_key,
    release_pems: list[bytes],
    ttl=DELEGATION_TTL,
    ledger: VersionLedger | None = None,
) -> dict:
    """Sign a new delegation naming exactly `release_pems`, numbered above both the ledger's
    record and any delegation the root verifiably signed (never an unsigned copy)."""
    if ttl <= timedelta(0):
        raise DelegationRefused(f"a delegation must last a while (got {ttl}): devices refuse it")
    for i, key_pem in enumerate(release_pems):
        try:
            key = load_public_key(key_pem)
        except (ValueError, TypeError) as exc:
            raise DelegationRefused(
                f"release key {i + 1} is not a PEM public key ({exc})"
            ) from None
        if not isinstance(key, Ed25519PublicKey):
            raise DelegationRefused(
                f"release key {i + 1} is not an ed25519 key: devices would refuse every "
                "release it signs (make one with `cvops keygen`)"
            )
    ledger = ledger if ledger is not None else MemoryLedger()
    signed = delegation(store, root_key.public_key(), ledger) or {}
    now = datetime.now(UTC)
    doc = {
        "release_keys": [p.decode() for p in release_pems],
        "version": next_version(ledger, "keys", int(signed.get("version", 0))),
        "signed_at": now.isoformat(timespec="seconds"),
        "expires": (now + ttl).isoformat(timespec="seconds"),
    }
    body = json.dumps(doc, indent=2).encode()
    store.write_bytes(KEYS_SIGNATURE, root_key.sign(body))  # signature first, as for channels
    store.write_bytes(KEYS, body)
    return doc


def delegated(store: Store, key, root_public=None, ledger: VersionLedger | None = None) -> bool:
    """Whether devices that follow the root would trust `key` (True when no root is in use, or
    none the pipeline can verify)."""
    doc = delegation(store, root_public, ledger)
    return doc is None or pem(key).decode() in doc["release_keys"]


class KeyNotDelegated(ValueError):
    """The pipeline's release key is not one the root vouches for."""


def signing_key(store: Store, path: Path, root_public=None, ledger: VersionLedger | None = None):
    """The release key at `path`, refused (before anything is signed) when the root's verified
    delegation does not name it: devices would reject everything it signs. An unsigned or
    replayed `keys.json` is never read: a store writer cannot stop releases with one."""
    key = load_private_key(path)
    if not delegated(store, key, root_public, ledger):
        version = delegation(store, root_public)["version"]
        raise KeyNotDelegated(
            f"the release key {path} is not among the keys {KEYS} (version "
            f"{version}) delegates to: devices would refuse what it signs. "
            "Delegate it with `cvops keys delegate --root-key ...` (or finish `cvops keys rotate`)."
        )
    return key


def signing_releases(
    store: Store, key_path: Path, root_public_path: Path, ledger: VersionLedger
) -> ReleaseStore:
    """The pipeline's view of the releases when it moves pointers: its release key (refused when
    the root's delegation leaves it out), channels read only as it signed them, numbered on from
    `ledger`, the operator's own record."""
    key = signing_key(store, key_path, root_public_key(root_public_path), ledger)
    return ReleaseStore(store, key, ledger)


@dataclass
class Rotation:
    new_key: Path
    retired_key: Path
    delegation_version: int
    manifests: int
    channels: list[str]
    enrolments: int
    refused_channels: list[str]  # channel documents not re-signed, and why


def rotate(
    store: Store,
    root_key,
    key_path: Path,
    actor: str,
    revoke_old: bool,
    ledger: VersionLedger | None = None,
) -> Rotation:
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
    ledger = ledger if ledger is not None else MemoryLedger()
    doc = delegate(store, root_key, [pem(new), *keep], ledger=ledger)
    # channels read as the old or the new key signed them, numbered on from the ledger
    releases = ReleaseStore(store, new, ledger, trusted=[old.public_key(), new.public_key()])
    manifests = 0
    for release in releases.ids():
        body = store.read_bytes(f"{RELEASES}/{release}/manifest.json")
        store.write_bytes(f"{RELEASES}/{release}/manifest.sig", new.sign(body))
        manifests += 1
    channels, refused = [], []
    for name in CHANNELS:
        current, problem, _ = releases.checked_channel(name)
        if problem:  # not re-signed: the operator decides again (a leaked key's move, say)
            refused.append(problem)
        elif current is not None:
            releases.point(
                name,
                current["release"],
                "re-signed by a new release key",
                actor,
                current.get("share", 1.0),
                tuple(current.get("cohorts", [])),
            )
            channels.append(name)
    register = read_register(store, [old.public_key(), new.public_key()], ledger)
    for device, key in register.keys.items():
        enrol_device(store, new, device, pem(key), f"{actor} (re-signed)", ledger=ledger)
    for device in register.revoked:
        enrol_device(store, new, device, b"", f"{actor} (re-signed)", True, ledger)
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
        refused,
    )
