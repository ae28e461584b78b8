"""Which devices may send feedback, and proof that a batch came from the device it names.

An enrolment is `enrolments/<device>.json` (the device's public key) signed by the release key;
the operator writes it with `cvops enrol`. Devices can write `feedback/batches/`, but not a
signature the release key made, so a device, or anyone who can write the store, cannot enrol
itself. A batch counts only when the enrolled key signed its bytes, every record in it is the
device's own (record ids are `<device>-<n>`), and every correction names one of the device's
records: one device can never overwrite another's records or labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cvops_pipelines.core.base.ledger import (
    MemoryLedger,
    VersionLedger,
    next_version,
    valid_version,
)
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.ingest.intake import now_utc
from cvops_pipelines.edge.bundle import BundleError, load_public_key, verify_signature
from cvops_pipelines.edge.wire import (
    DEVICE_ID,
    ENROLMENTS,
    batch_signature_key,
    device_of_batch,
    device_of_record,
    enrolment_key,
    enrolment_signature_key,
)

MAX_ENROLMENT, MAX_SIGNATURE = 16 << 10, 4 << 10


class NotEnrolled(Exception):
    """A batch the enrolment register does not vouch for; `code` is a stable reason code."""

    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(f"{code}: {message}")


def enrol_device(
    store: Store,
    signing_key,
    device_id: str,
    public_key_pem: bytes,
    by: str,
    revoked: bool = False,
    ledger: VersionLedger | None = None,
) -> dict:
    """Write (or revoke) a device's enrolment, signed by the release key and numbered above the
    ledger's record. Re-enrolling replaces the key: batches the device signed with the old one
    are refused from then on; a revocation outnumbers every enrolment before it, so restoring
    an older signed enrolment does not undo it."""
    if not DEVICE_ID.match(device_id):
        raise ValueError(f"device id {device_id!r} is not a valid device id")
    if not revoked:
        _ed25519(public_key_pem, f"the public key for {device_id}")
    ledger = ledger if ledger is not None else MemoryLedger()
    try:
        signed = [_enrolment(store, device_id, [signing_key.public_key()])["version"]]
    except ValueError:
        signed = []
    doc = {
        "version": next_version(ledger, f"enrolment:{device_id}", *signed),
        "device_id": device_id,
        "public_key": public_key_pem.decode() if not revoked else None,
        "revoked": revoked,
        "by": by,
        "at": now_utc().isoformat(),
    }
    body = json.dumps(doc, sort_keys=True, indent=2).encode()
    store.write_bytes(enrolment_key(device_id), body)
    store.write_bytes(enrolment_signature_key(device_id), signing_key.sign(body))
    return doc


def enroller(store: Store, signing_key, by: str, ledger: VersionLedger | None = None):
    """`enrol(device id, public key PEM)`, for tools that bring devices up (the simulator)."""
    return lambda device_id, pem: enrol_device(
        store, signing_key, device_id, pem, by, ledger=ledger
    )


def _ed25519(pem: bytes, what: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = load_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{what} is not an ed25519 key")
    return key


@dataclass
class Register:
    """The enrolled devices' keys; `problems` names every enrolment document that was refused
    (unsigned, forged, malformed), so an operator sees it instead of a silent gap."""

    keys: dict[str, object] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # device -> why its enrolment was

    def check(self, batch_id: str, payload: bytes, signature: bytes | None) -> str:
        """The device that signed this batch, or NotEnrolled with why."""
        device = device_of_batch(batch_id)
        if device is None:
            raise NotEnrolled(
                "unattributed_batch", f"batch id {batch_id!r} is not <device id>-b<6 digits>"
            )
        if device in self.revoked:
            raise NotEnrolled("revoked_device", f"device {device}'s enrolment was revoked")
        if device in self.refused:
            raise NotEnrolled(
                "refused_enrolment",
                f"device {device}'s enrolment was refused: {self.refused[device]}",
            )
        if device not in self.keys:
            raise NotEnrolled(
                "unknown_device",
                f"device {device} is not enrolled (enrol it with `cvops enrol {device} "
                "--public-key <its key>`)",
            )
        if signature is None:
            raise NotEnrolled("unsigned_batch", f"no {batch_id}.zip.sig next to the batch")
        try:
            verify_signature(payload, signature, self.keys[device])
        except BundleError:
            raise NotEnrolled(
                "bad_signature",
                f"{batch_id}.zip is not signed by device {device}'s enrolled key "
                "(altered, or sent by someone else)",
            ) from None
        return device


def batch_signature(store: Store, batch_id: str) -> bytes | None:
    """The device's signature uploaded beside the batch (None: there is none, or it is too
    large to be one)."""
    size = store.size(batch_signature_key(batch_id))
    if size is None or size > MAX_SIGNATURE:
        return None
    return store.read_bytes(batch_signature_key(batch_id))


def read_register(
    store: Store, release_keys: list, ledger: VersionLedger | None = None
) -> Register:
    """Every enrolment signed by one of `release_keys` (public keys) and numbered at least as
    high as the ledger's record for its device (an older one is a replay: refused); each
    accepted version raises the record."""
    register = Register()
    if not release_keys:
        register.problems.append("no release key is configured: no device can be enrolled")
        return register
    for entry in store.list(ENROLMENTS):
        name = entry.key[len(ENROLMENTS) :]
        if not name.endswith(".json"):
            continue
        device = name[: -len(".json")]
        try:
            doc = _enrolment(store, device, release_keys)
            if ledger is not None:
                if doc["version"] < ledger.highest(f"enrolment:{device}"):
                    raise ValueError(
                        f"version {doc['version']} is older than version "
                        f"{ledger.highest(f'enrolment:{device}')} accepted before: a replayed "
                        f"enrolment, refused (re-enrol with `cvops enrol {device}` if it is right)"
                    )
                ledger.raise_to(f"enrolment:{device}", doc["version"])
        except ValueError as exc:
            register.problems.append(f"{entry.key}: {exc}")
            register.refused[device] = str(exc)
            continue
        if doc["revoked"]:
            register.revoked.add(device)
        else:
            register.keys[device] = doc["key"]
    return register


def _enrolment(store: Store, device: str, release_keys: list) -> dict:
    if not DEVICE_ID.match(device):
        raise ValueError("not a valid device id")
    sizes = store.size(enrolment_key(device)), store.size(enrolment_signature_key(device))
    if sizes[1] is None:
        raise ValueError("no signature: refused (enrol devices with `cvops enrol`)")
    if (sizes[0] or 0) > MAX_ENROLMENT or sizes[1] > MAX_SIGNATURE:
        raise ValueError("larger than an enrolment can be: refused unread")
    body = store.read_bytes(enrolment_key(device))
    signature = store.read_bytes(enrolment_signature_key(device))
    for key in release_keys:
        try:
            verify_signature(body, signature, key)
            break
        except BundleError:
            continue
    else:
        raise ValueError("not signed by the release key: refused")
    try:
        doc = json.loads(body)
        if doc["device_id"] != device or not isinstance(doc["revoked"], bool):
            raise ValueError(f"names device {doc['device_id']!r}")
        doc.setdefault("version", 0)  # written before enrolments were numbered
        if not valid_version(doc["version"]):
            raise ValueError(f"version {doc['version']!r} is not an int64 version number")
        if not doc["revoked"]:
            if not isinstance(doc["public_key"], str):
                raise ValueError("has no public key")
            doc["key"] = _ed25519(doc["public_key"].encode(), "its public key")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed enrolment ({exc})") from None
    return doc


def foreign_rows(device: str, records: list[dict], corrections: list[dict]) -> str | None:
    """Why a batch of `device` speaks for another device, or None: every record must be the
    device's own (its id and its device_id), and so must every record a correction names."""
    for i, record in enumerate(records):
        if record.get("device_id") != device or device_of_record(record["record_id"]) != device:
            return (
                f"records.jsonl line {i + 1} ({record['record_id']!r}, device "
                f"{record.get('device_id')!r}) is not a record of device {device}"
            )
    for i, fix in enumerate(corrections):
        if device_of_record(fix["record_id"]) != device:
            return (
                f"corrections.jsonl line {i + 1} corrects {fix['record_id']!r}, which is not "
                f"a record of device {device} (a device corrects only its own records)"
            )
    return None
