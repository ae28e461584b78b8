"""The wire format devices and the pipeline share: where releases, channel pointers and feedback
batches live in the store, and what release ids, batch ids and operator labels look like.

Owned by the device side (this package imports neither torch nor Dagster); the pipeline's core
imports these names, so both ends always agree.
"""

from __future__ import annotations

import hashlib
import math
import re

# Every id pattern ends in \Z, not $: `$` also matches before a trailing newline ("rel-1\n").
MAX_VERSION = (1 << 63) - 1  # signed documents are numbered in an int64: any reader holds it

RELEASES = "releases"  # releases/<id>/..., releases/channels/<name>.json, releases/history/
CHANNELS = ("stable", "canary")
RELEASE_ID = re.compile(r"^rel-[A-Za-z0-9._-]{1,100}\Z")
# a release's files: the model, its spec (the device's preprocessing, classes, task, answer
# threshold), the class list, and the signed manifest over them
MODEL_FILE, SPEC_FILE, CLASSES_FILE = "model.onnx", "preprocess.json", "classes.json"
BUNDLE_FILES = (MODEL_FILE, SPEC_FILE, CLASSES_FILE)
MANIFEST_FILE, MANIFEST_SIGNATURE = "manifest.json", "manifest.sig"

FEEDBACK = "feedback/"  # the `source` of every field image: feedback/<batch id>
BATCH_PREFIX = "feedback/batches/"  # feedback/batches/<batch id>.zip, uploaded by devices
BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # also a Dagster partition key
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_DEVICE_BATCH = re.compile(r"^(?P<device>[A-Za-z0-9][A-Za-z0-9._-]{0,63})-b[0-9]{6}\Z")
_DEVICE_RECORD = re.compile(r"^(?P<device>[A-Za-z0-9][A-Za-z0-9._-]{0,63})-[0-9]{8}\Z")
ENROLMENTS = "enrolments/"  # enrolments/<device id>.json (+ .sig by the release key)

OPERATOR_PREFIX = "operator@"  # a device operator's labels: annotator operator@<device id>


def release_id(model: bytes, model_version: str) -> str:
    """Same model bytes and version -> same release: publishing twice changes nothing."""
    return f"rel-{model_version}-{hashlib.sha256(model).hexdigest()[:10]}"


def release_key(release: str, name: str = "") -> str:
    return f"{RELEASES}/{release}/{name}" if name else f"{RELEASES}/{release}"


KEYS = f"{RELEASES}/keys.json"  # the release keys the pinned (root) key delegates to
KEYS_SIGNATURE = f"{RELEASES}/keys.json.sig"


def channel_key(channel: str) -> str:
    return f"{RELEASES}/channels/{channel}.json"


def channel_signature_key(channel: str) -> str:
    """ed25519 signature of the channel document's bytes by the release key."""
    return f"{RELEASES}/channels/{channel}.json.sig"


def batch_id(device_id: str, number: int) -> str:
    return f"{device_id}-b{number:06d}"


def batch_key(batch: str) -> str:
    return f"{BATCH_PREFIX}{batch}.zip"


def batch_signature_key(batch: str) -> str:
    """ed25519 signature of the batch's bytes by the device's enrolment key."""
    return f"{BATCH_PREFIX}{batch}.zip.sig"


def device_of_batch(batch: str) -> str | None:
    """The device a batch id claims (`<device>-b<6 digits>`), or None."""
    match = _DEVICE_BATCH.match(batch)
    return match["device"] if match else None


def device_of_record(record_id: str) -> str | None:
    """The device a record id belongs to (`<device>-<8 digits>`), or None. Exact, not a prefix:
    `cam-1-00000001` is cam-1's, never cam's."""
    match = _DEVICE_RECORD.match(record_id)
    return match["device"] if match else None


def record_id(device_id: str, seq: int) -> str:
    return f"{device_id}-{seq:08d}"


def enrolment_key(device_id: str) -> str:
    return f"{ENROLMENTS}{device_id}.json"


def enrolment_signature_key(device_id: str) -> str:
    return f"{ENROLMENTS}{device_id}.json.sig"


def feedback_source(batch: str) -> str:
    return f"{FEEDBACK}{batch}"


def operator(device_id: str) -> str:
    return f"{OPERATOR_PREFIX}{device_id}"


MAX_COORDINATE = 1_000_000  # pixels: far beyond any image the decoders accept
MAX_LABEL_CHARS = 256


def number_problem(value, low: float, high: float) -> str | None:
    """Why `value` is not a finite number in [low, high] (ints of any size included, bools
    excluded), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{value!r} is not a number"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value!r} is not finite"
    if not low <= value <= high:  # int vs float compares exactly, without float(10**400)
        text = repr(value) if len(repr(value)) < 30 else f"a number of {len(repr(value))} digits"
        return f"{text} is outside [{low:g}, {high:g}]"
    return None


def box_problem(item) -> str | None:
    """Why `item` is not a box on the wire ({label, box: [x0, y0, x1, y1][, score]}), or None.
    One rule wherever a box is made or read: the device's own detections, an operator's
    correction, a feedback batch at ingest."""
    if not isinstance(item, dict):
        return f"{item!r} is not a {{label, box}} object"
    label = item.get("label")
    if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL_CHARS:
        return f"label {label!r} is not a class name"
    box = item.get("box")
    if not isinstance(box, list | tuple) or len(box) != 4:
        return f"box {box!r} is not [x_min, y_min, x_max, y_max]"
    for value in box:
        problem = number_problem(value, -MAX_COORDINATE, MAX_COORDINATE)
        if problem:
            return f"box coordinate {problem}"
    if not (box[0] < box[2] and box[1] < box[3]):
        return f"box {list(box)} is empty or inverted"
    if "score" in item:
        problem = number_problem(item["score"], 0.0, 1.0)
        if problem:
            return f"score {problem}"
    return None
