"""A device's identity: an ed25519 key pair made on the device at first start, never leaving it.

The operator enrols the public half (`cvops-edge identity` prints it, `cvops enrol` records it
signed by the release key); the pipeline then accepts a feedback batch only when the enrolled key
signed its bytes, so a store writer cannot speak for a device it does not hold the key of.
"""

from __future__ import annotations

import os
from pathlib import Path

KEY_FILE = "device.key"


def load_or_create(state: Path):
    """The device's private key from `state/device.key` (PKCS8 PEM, mode 0600), made on first
    use. Like an SSH host key: losing it means enrolling the device again."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(state) / KEY_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)  # a crash never leaves half a key
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an ed25519 private key")
    return key


def public_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
