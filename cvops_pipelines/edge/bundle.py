"""Release bundles as a device sees them: a signed manifest, files named by sha256, bsdiff deltas.

Layout of a release `<id>` in the release store:
    releases/<id>/model.onnx, preprocess.json, classes.json   the files
    releases/<id>/model.onnx.from-<parent>.bsdiff             delta from the parent (optional)
    releases/<id>/manifest.json                               what each file must hash to
    releases/<id>/manifest.sig                                ed25519 over manifest.json's bytes
Nothing in a bundle is trusted before the signature (pinned public key) and the hashes check out.
"""

from __future__ import annotations

import hashlib
import json

from cvops_pipelines.edge.wire import BUNDLE_FILES

FORMAT = 1


class BundleError(Exception):
    """A bundle that must not be activated; `reason` is a stable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def delta_name(parent: str) -> str:
    return f"model.onnx.from-{parent}.bsdiff"


def load_public_key(pem: bytes):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return load_pem_public_key(pem)


def verify_signature(data: bytes, signature: bytes, keys):
    """The key of `keys` (a public key or a list of them: the pinned key and the release keys it
    delegates to) whose ed25519 signature of `data` `signature` is; BundleError if none."""
    from cryptography.exceptions import InvalidSignature

    for key in keys if isinstance(keys, list | tuple) else [keys]:
        try:
            key.verify(signature, data)
            return key
        except InvalidSignature:
            continue
    raise BundleError("signature", "not signed by a trusted release key") from None


def verify_manifest(manifest: bytes, signature: bytes, keys) -> dict:
    """The manifest's content, only if `signature` is a trusted key's signature of it."""
    try:
        verify_signature(manifest, signature, keys)
    except BundleError:
        raise BundleError(
            "signature",
            "manifest.sig is not a signature of manifest.json by a trusted release key",
        ) from None
    try:
        doc = json.loads(manifest)
    except ValueError as exc:
        raise BundleError("manifest", f"manifest.json is not JSON: {exc}") from None
    if doc.get("format") != FORMAT or set(doc.get("files", {})) != set(BUNDLE_FILES):
        raise BundleError(
            "manifest",
            f"unsupported manifest (format {doc.get('format')!r}, "
            f"files {sorted(doc.get('files', {}))})",
        )
    return doc


def verify_file(manifest: dict, name: str, data: bytes) -> bytes:
    expected = manifest["files"][name]
    if len(data) != expected["size"]:
        raise BundleError(
            "size",
            f"{name} is {len(data)} bytes, manifest says {expected['size']} "
            "(truncated or padded download)",
        )
    if sha256(data) != expected["sha256"]:
        raise BundleError(
            "sha256", f"{name} does not match its sha256 in the manifest (tampered or corrupted)"
        )
    return data


def apply_delta(manifest: dict, base: bytes, delta: bytes) -> bytes:
    """The new model.onnx from the held parent's model and the signed delta."""
    import bsdiff4

    entry = manifest.get("delta")
    if not entry:
        raise BundleError("delta", "this release carries no delta")
    if sha256(base) != entry["base_sha256"]:
        raise BundleError(
            "delta", f"the delta applies to {entry['from']}'s model, not the one held"
        )
    if sha256(delta) != entry["sha256"]:
        raise BundleError("sha256", "the delta does not match its sha256 in the manifest")
    try:
        patched = bsdiff4.patch(base, delta)
    except Exception as exc:  # bsdiff4 raises bare ValueError/RuntimeError on bad patches
        raise BundleError("delta", f"the delta does not apply: {exc}") from None
    return verify_file(manifest, "model.onnx", patched)


def fingerprint(key) -> str:
    """A public key's short name: what a device files the versions it accepted from it under."""
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]
