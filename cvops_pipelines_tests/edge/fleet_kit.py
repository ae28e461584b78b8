"""Small real pieces for edge tests: the demo's digit classifier (cvops_pipelines.demo.digit_model),
signing keys, a release store on disk."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.ship.release import (
    ReleaseStore,
    build_release,
    generate_keypair,
    load_private_key,
)
from cvops_pipelines.demo.digit_model import (
    PREPROCESS,
)
from cvops_pipelines.edge.remote import DirRemote


@dataclass
class Central:
    root: Path
    releases: ReleaseStore
    key_dir: Path

    @property
    def remote(self) -> DirRemote:
        return DirRemote(self.root)

    @property
    def public_key(self) -> bytes:
        return (self.key_dir / "release_signing.pub").read_bytes()

    def release(
        self, model: bytes, version: str, parent: str | None = None, key=None, preprocess=None
    ):
        key = key or load_private_key(self.key_dir / "release_signing.key")
        parent_manifest = self.releases.manifest(parent) if parent else None
        parent_model = self.releases.model(parent) if parent else None
        release = build_release(
            model,
            preprocess or PREPROCESS,
            {
                "model_name": "digits",
                "model_version": version,
                "dataset_version": "ds-test",
                "artifact": "onnx_fp32",
            },
            key,
            parent_manifest,
            parent_model,
            min_shared=0.0,
        )  # always a delta
        self.releases.publish(release)
        return release

    def write_channel(self, channel: str, body: bytes, signed: bool = True) -> None:
        """Raw channel bytes, signed by the release key (what a key holder could publish) or
        not (what anyone with store write access could)."""
        from cvops_pipelines.edge.wire import channel_key, channel_signature_key

        if signed:
            key = load_private_key(self.key_dir / "release_signing.key")
            self.releases.store.write_bytes(channel_signature_key(channel), key.sign(body))
        self.releases.store.write_bytes(channel_key(channel), body)

    def channel_doc(self, release: str | None, version: int | None = None, **extra) -> bytes:
        """A well-formed channel document naming `release` (by default numbered by the clock, as
        the pipeline numbers them: newer than any before it)."""
        import json
        from datetime import UTC, datetime, timedelta

        from cvops_pipelines.core.base.ledger import clock_version

        version = clock_version() if version is None else version

        expires = (datetime.now(UTC) + timedelta(days=1)).isoformat(timespec="seconds")
        doc = {
            "release": release,
            "share": 1.0,
            "cohorts": [],
            "version": version,
            "expires": expires,
            **extra,
        }
        return json.dumps(doc).encode()


def field_records(store):
    """Every uploaded record, corrections applied, images stored: what the feedback asset makes
    of the store."""
    import pandas as pd

    from cvops_pipelines.core.learn.feedback import (
        batch_frame,
        batch_ids,
        batch_key,
        parse_batch,
        store_images,
    )
    from cvops_pipelines_tests.reference import resolve_records

    frames = []
    for batch_id in batch_ids(store):
        batch = parse_batch(store.read_bytes(batch_key(batch_id)), batch_id)
        frames.append(batch_frame(batch))
        store_images(store, batch, frames[-1])
    return resolve_records(pd.concat(frames, ignore_index=True))


def central(tmp: Path) -> Central:
    root = tmp / "central"
    root.mkdir(parents=True, exist_ok=True)
    key_dir = tmp / "keys"
    generate_keypair(key_dir)
    key = load_private_key(key_dir / "release_signing.key")  # channels are signed too
    return Central(root, ReleaseStore(LocalStore(root), key), key_dir)


def image_of(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))
