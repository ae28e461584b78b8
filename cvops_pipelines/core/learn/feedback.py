"""Feedback batches uploaded by edge agents: vetted, ingested and read back as one record table.

A batch is `feedback/batches/<batch_id>.zip` (records.jsonl, corrections.jsonl, images/), signed
by its device (`.zip.sig`), and is the unit of acceptance: a batch that no enrolled device signed,
that speaks for another device's records, that cannot be read, whose images do not match their
ids or do not decode, or that breaks the data contract is quarantined whole, with the reason, and
nothing of it reaches the pool. Accepted images go through the same content-addressed path as drops.

A correction sealed in a later batch than its record (the operator was late) travels as a row of
kind `correction`; the feedback query (feedback_query.py) applies them in time order.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import zipfile
import zlib
from dataclasses import dataclass, field

import pandas as pd

from cvops_pipelines.core.base.images import ImageInfo, ImageLimits, ImageRejected, inspect_image
from cvops_pipelines.core.base.ontology import MAX_BOXES_PER_IMAGE
from cvops_pipelines.core.base.store import StorageError, Store
from cvops_pipelines.core.ingest.intake import MANIFEST_COLUMNS, now_utc, store_original
from cvops_pipelines.core.learn.enrolment import (
    NotEnrolled,
    Register,
    batch_signature,
    foreign_rows,
)
from cvops_pipelines.edge.wire import (
    BATCH_ID,
    BATCH_PREFIX,
    FEEDBACK,
    OPERATOR_PREFIX,
    batch_key,
    box_problem,
    number_problem,
)

QUARANTINE_PREFIX = "quarantine/feedback"
RECORD_FIELDS = {
    "record_id": str,
    "device_id": str,
    "cohort": str,
    "release": str,
    "image_id": str,
    "predicted": str,
    "confidence": (int, float),
    "top_k": list,
    "captured_at": str,
}
FEEDBACK_COLUMNS = [
    "kind",
    "record_id",
    "device_id",
    "cohort",
    "release",
    "image_id",
    "predicted",
    "confidence",
    "top_k",
    "corrected_label",
    "corrected_at",
    "captured_at",
    "batch_id",
    "boxes",  # a detector's answer, JSON ({label, score, box}); null for a classifier
    "corrected_boxes",  # the operator's corrected box set, JSON ({label, box}); null if none
    "source",  # the camera, stream or file the frame came from (null: a single image)
    "frame_time",  # seconds into that source
    "image_kept",  # False: the device recorded the prediction and dropped the image (no key)
    "uri",
    "key",
    "format",
    "width",
    "height",
    "phash",
    "thumb",
    "ingested_at",
]
RECORD_COLUMNS = [c for c in FEEDBACK_COLUMNS if c != "kind"]


@dataclass(frozen=True)
class BatchBounds:
    """What one uploaded batch may hold; anything beyond is refused before it is read whole.
    A device seals at most 256 records a batch by default."""

    max_entries: int = 4100  # records.jsonl, corrections.jsonl and one image per record
    max_records: int = 2048
    max_text_bytes: int = 16 * 1024 * 1024  # each .jsonl file, uncompressed
    max_total_bytes: int = 512 * 1024 * 1024  # all entries, uncompressed
    max_upload_bytes: int = 513 * 1024 * 1024  # the zip itself, checked before it is read
    max_field_chars: int = 256  # any string field of a record or correction
    max_top_k: int = 20
    max_boxes: int = MAX_BOXES_PER_IMAGE  # a detector's answer or a corrected set, per record


_IMAGE_ENTRY = re.compile(r"^images/[0-9a-f]{64}\.bin\Z")


class BatchRejected(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(f"{code}: {message}")


@dataclass
class ParsedBatch:
    batch_id: str
    records: list[dict]
    corrections: list[dict]
    images: dict[str, bytes]
    infos: dict[str, ImageInfo] = field(default_factory=dict)
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # record, code, reason


def batch_ids(store: Store) -> list[str]:
    """Uploaded batch ids, in name order; names that cannot be partition keys are skipped here
    and reported by `invalid_batch_names`."""
    return [n for n in _names(store) if BATCH_ID.match(n)]


def invalid_batch_names(store: Store) -> list[str]:
    return [n for n in _names(store) if not BATCH_ID.match(n)]


def _names(store: Store) -> list[str]:
    return sorted(
        e.key[len(BATCH_PREFIX) : -4]
        for e in store.list(BATCH_PREFIX)
        if e.key.endswith(".zip") and "/" not in e.key[len(BATCH_PREFIX) :]
    )


def parse_batch(
    data: bytes,
    batch_id: str,
    limits: ImageLimits = ImageLimits(),
    bounds: BatchBounds = BatchBounds(),
) -> ParsedBatch:
    """Read and vet one batch; raise BatchRejected naming the first thing wrong. Entry names,
    counts and declared sizes are checked before anything is decompressed, and every read is
    capped, so a zip bomb costs its compressed size, not its claimed one."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = _vetted_entries(archive, limits, bounds)
            missing = {"records.jsonl", "corrections.jsonl"} - set(entries)
            if missing:
                raise BatchRejected("malformed_batch", f"the archive lacks {sorted(missing)}")
            records = _jsonl(_read(archive, entries["records.jsonl"]), "records.jsonl")
            corrections = _jsonl(_read(archive, entries["corrections.jsonl"]), "corrections.jsonl")
            if len(records) > bounds.max_records:
                raise BatchRejected(
                    "batch_too_large", f"{len(records)} records > {bounds.max_records}"
                )
            wanted = {str(r.get("image_id")) for r in records if r.get("image_kept") is not False}
            extra = sorted(
                n
                for n in entries
                if n.startswith("images/") and n[len("images/") : -len(".bin")] not in wanted
            )
            if extra:
                raise BatchRejected(
                    "unexpected_entry",
                    f"{extra[0]} is no record's image ({len(extra)} unreferenced entries)",
                )
            images = {
                n[len("images/") : -len(".bin")]: _read(archive, info)
                for n, info in entries.items()
                if n.startswith("images/")
            }
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
        # a corrupt archive fails in many places: the directory, a header, a compressed stream
        # that ends early, an unknown compression method, an encrypted entry
        raise BatchRejected(
            "malformed_batch", f"not a readable zip archive ({type(exc).__name__}: {exc})"
        ) from None
    for i, row in enumerate([*records, *corrections]):
        _check_field_sizes(row, i, bounds)
    for i, record in enumerate(records):
        for name, kind in RECORD_FIELDS.items():
            if not isinstance(record.get(name), kind):
                raise BatchRejected(
                    "malformed_record",
                    f"records.jsonl line {i + 1}: field "
                    f"{name!r} is missing or not {_kind_name(kind)}",
                )

    for i, fix in enumerate(corrections):
        if not all(
            isinstance(fix.get(k), str) for k in ("record_id", "corrected_label", "corrected_at")
        ):
            raise BatchRejected(
                "malformed_record",
                f"corrections.jsonl line {i + 1} needs "
                "record_id, corrected_label and corrected_at strings",
            )
    # The batch names itself inside what its device signed: the same bytes under another name
    # (a replay) are refused, so a signed batch counts once.
    for name, rows in (("records.jsonl", records), ("corrections.jsonl", corrections)):
        for i, row in enumerate(rows):
            if row.get("batch_id") != batch_id:
                raise BatchRejected(
                    "batch_id_mismatch",
                    f"{name} line {i + 1} belongs to batch {row.get('batch_id')!r}, the file "
                    f"is {batch_id!r} (a batch re-sent under another name is refused)",
                )
    for i, row in enumerate(records):
        _check_streamed(row, f"records.jsonl line {i + 1}")
        _check_boxes(row, "boxes", f"records.jsonl line {i + 1}", bounds)
        _check_boxes(row, "corrected_boxes", f"records.jsonl line {i + 1}", bounds)
    for i, fix in enumerate(corrections):
        _check_boxes(fix, "corrected_boxes", f"corrections.jsonl line {i + 1}", bounds)
    records, corrections, refused = _refuse_bad_values(records, corrections)
    infos = {}
    for image_id in {r["image_id"] for r in records if r.get("image_kept") is not False}:
        if image_id not in images:
            raise BatchRejected("missing_image", f"image {image_id} of a record is not in images/")
        if hashlib.sha256(images[image_id]).hexdigest() != image_id:
            raise BatchRejected(
                "image_hash_mismatch",
                f"images/{image_id}.bin does not hash "
                "to its name (altered in transit or on the device)",
            )
        try:
            infos[image_id] = inspect_image(images[image_id], limits)
        except ImageRejected as exc:
            raise BatchRejected("bad_image", f"images/{image_id}.bin: {exc.message}") from None
    inside = []
    for row in records:
        info = infos.get(row["image_id"])  # None: the device kept only the record
        outside = _box_outside(row, info) if info else ""
        if outside:
            refused.append((row["record_id"], "invalid_box", f"records.jsonl: {outside}"))
        else:
            inside.append(row)
    used = {r["image_id"] for r in inside}
    infos = {i: info for i, info in infos.items() if i in used}
    return ParsedBatch(batch_id, inside, corrections, images, infos, refused)


def _box_outside(row: dict, info: ImageInfo) -> str:
    for field_name in ("boxes", "corrected_boxes"):
        for item in row.get(field_name) or []:
            x0, y0, x1, y1 = item["box"]
            if x0 < -0.5 or y0 < -0.5 or x1 > info.width + 0.5 or y1 > info.height + 0.5:
                return (
                    f"record {row['record_id']}: {field_name} box {item['box']} lies outside "
                    f"the {info.width}x{info.height} image"
                )
    return ""


def _check_streamed(row: dict, where: str) -> None:
    """A streamed frame's optional fields: its source, its time in it, whether its image came."""
    if "image_kept" in row and not isinstance(row["image_kept"], bool):
        raise BatchRejected("malformed_record", f"{where}: image_kept must be true or false")
    if row.get("source") is not None and not isinstance(row["source"], str):
        raise BatchRejected("malformed_record", f"{where}: source must be a string")
    frame_time = row.get("frame_time")
    if frame_time is not None and (
        isinstance(frame_time, bool) or not isinstance(frame_time, int | float) or frame_time < 0
    ):
        raise BatchRejected("malformed_record", f"{where}: frame_time must be a number >= 0")


def _check_boxes(row: dict, name: str, where: str, bounds: BatchBounds) -> None:
    """Optional; when present a bounded list (its boxes are judged one record at a time)."""
    if name not in row or row[name] is None:
        return
    if not isinstance(row[name], list) or len(row[name]) > bounds.max_boxes:
        raise BatchRejected(
            "malformed_record", f"{where}: {name} must be a list of at most {bounds.max_boxes}"
        )


def _value_problem(row: dict) -> tuple[str, str] | None:
    """(code, why) a record or correction carries a value no device sends, or None: the same
    box rule as the device's (`wire.box_problem`), probabilities in [0, 1]."""
    if "confidence" in row:
        problem = number_problem(row["confidence"], 0.0, 1.0)
        if problem:
            return "invalid_value", f"confidence {problem}"
    for pair in row.get("top_k") or []:
        problem = number_problem(pair[1], 0.0, 1.0)
        if problem:
            return "invalid_value", f"top_k probability {problem}"
    for name in ("boxes", "corrected_boxes"):
        for item in row.get(name) or []:
            problem = box_problem(item)
            if problem:
                return "invalid_box", f"{name}: {problem}"
    return None


def _refuse_bad_values(records: list[dict], corrections: list[dict]):
    """Turn away each record (and correction) with a bad value alone, with its reason; the
    batch's other records go on."""
    refused, kept_records, kept_fixes = [], [], []
    for name, rows, kept in (
        ("records.jsonl", records, kept_records),
        ("corrections.jsonl", corrections, kept_fixes),
    ):
        for i, row in enumerate(rows):
            bad = _value_problem(row)
            if bad is None:
                kept.append(row)
            else:
                refused.append((row["record_id"], bad[0], f"{name} line {i + 1}: {bad[1]}"))
    return kept_records, kept_fixes, refused


def _vetted_entries(archive, limits: ImageLimits, bounds: BatchBounds) -> dict:
    infos = archive.infolist()
    if len(infos) > bounds.max_entries:
        raise BatchRejected("batch_too_large", f"{len(infos)} entries > {bounds.max_entries}")
    if sum(i.file_size for i in infos) > bounds.max_total_bytes:
        raise BatchRejected(
            "batch_too_large",
            f"entries claim more than {bounds.max_total_bytes} bytes uncompressed",
        )
    entries = {}
    for info in infos:
        name = info.filename
        if (
            name.startswith("/")
            or "\\" in name
            or any(p in ("", ".", "..") for p in name.split("/"))
        ):
            raise BatchRejected("unsafe_entry", f"entry name {name!r} is absolute or has '..'")
        text = name in ("records.jsonl", "corrections.jsonl")
        if not text and not _IMAGE_ENTRY.match(name):
            raise BatchRejected("unexpected_entry", f"{name!r} is not part of a batch")
        cap = bounds.max_text_bytes if text else limits.max_bytes
        if info.file_size > cap:
            raise BatchRejected("batch_too_large", f"{name} claims {info.file_size} bytes > {cap}")
        if name in entries:
            raise BatchRejected("malformed_batch", f"{name} appears twice")
        entries[name] = info
    return entries


def _read(archive, info) -> bytes:
    """At most the declared size (already bounded); a header that understates is caught."""
    with archive.open(info) as handle:
        data = handle.read(info.file_size + 1)
    if len(data) > info.file_size:
        raise BatchRejected("batch_too_large", f"{info.filename} holds more than it declares")
    return data


def _check_field_sizes(row: dict, i: int, bounds: BatchBounds) -> None:
    for key, value in row.items():
        if isinstance(value, str) and len(value) > bounds.max_field_chars:
            raise BatchRejected(
                "malformed_record",
                f"line {i + 1}: field {key!r} is "
                f"{len(value)} characters > {bounds.max_field_chars}",
            )
    top_k = row.get("top_k")
    if isinstance(top_k, list) and (
        len(top_k) > bounds.max_top_k
        or not all(
            isinstance(t, list)
            and len(t) == 2
            and isinstance(t[0], str)
            and len(t[0]) <= bounds.max_field_chars
            for t in top_k
        )
    ):
        raise BatchRejected(
            "malformed_record",
            f"line {i + 1}: top_k must be at most {bounds.max_top_k} [label, probability] pairs",
        )


def _jsonl(data: bytes, name: str) -> list[dict]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BatchRejected("malformed_record", f"{name} is not UTF-8 text ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(
                line, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant
            )
        except json.JSONDecodeError as exc:
            raise BatchRejected("malformed_record", f"{name} line {number}: {exc.msg}") from None
        except (ValueError, RecursionError) as exc:  # a number out of bounds, nesting too deep
            raise BatchRejected("malformed_record", f"{name} line {number}: {exc}") from None
        if not isinstance(row, dict):
            raise BatchRejected("malformed_record", f"{name} line {number}: not an object")
        rows.append(row)
    return rows


def _bounded_int(text: str) -> int:
    """JSON integers, bounded before Python converts them (a 5000-digit one stops at 4300)."""
    if len(text.lstrip("-")) > 18:
        raise ValueError(f"an integer of {len(text)} digits is not a value a device sends")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:30]} is not a finite number")
    return value


def _no_constant(text: str):
    raise ValueError(f"{text} is not a number a batch may hold")


def _kind_name(kind) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def batch_frame(batch: ParsedBatch) -> pd.DataFrame:
    """The batch as FEEDBACK_COLUMNS rows; image locations are filled by `store_images`."""
    rows = []
    for r in batch.records:
        info = batch.infos.get(r["image_id"]) if r.get("image_kept") is not False else None
        rows.append(
            {
                "kind": "record",
                **{k: r.get(k) for k in RECORD_FIELDS},
                "top_k": json.dumps(r["top_k"]),
                "corrected_label": r.get("corrected_label"),
                "corrected_at": r["captured_at"] if r.get("corrected_label") is not None else None,
                "batch_id": batch.batch_id,
                "boxes": _json_or_none(r.get("boxes")),
                "corrected_boxes": _json_or_none(r.get("corrected_boxes")),
                "source": r.get("source"),
                "frame_time": r.get("frame_time"),
                "image_kept": info is not None,
                **(
                    {
                        "format": info.format,
                        "width": info.width,
                        "height": info.height,
                        "phash": info.phash,
                        "thumb": info.thumb,
                    }
                    if info
                    else {}
                ),
            }
        )
    for fix in batch.corrections:
        rows.append(
            {
                "kind": "correction",
                "record_id": fix["record_id"],
                "corrected_label": fix["corrected_label"],
                "corrected_at": fix["corrected_at"],
                "batch_id": batch.batch_id,
                "corrected_boxes": _json_or_none(fix.get("corrected_boxes")),
            }
        )
    frame = pd.DataFrame(rows, columns=FEEDBACK_COLUMNS)
    for column in (
        "uri",
        "key",
        "ingested_at",
        "corrected_label",
        "corrected_at",
        "boxes",
        "corrected_boxes",
        "source",
        "image_kept",
    ):
        frame[column] = frame[column].astype(object)
    frame["confidence"] = frame["confidence"].astype("float64")
    frame["frame_time"] = frame["frame_time"].astype("float64")
    return frame


def _json_or_none(value) -> str | None:
    return None if value is None else json.dumps(value)


def store_images(store: Store, batch: ParsedBatch, frame: pd.DataFrame) -> int:
    """Write the batch's images content-addressed (after the batch was accepted); fill uri/key."""
    written, keys = 0, {}
    for image_id, info in batch.infos.items():
        keys[image_id], new = store_original(store, info, batch.images[image_id])
        written += new
    store.sync()
    is_record = (frame["kind"] == "record") & frame["image_id"].isin(keys)
    frame.loc[is_record, "key"] = frame.loc[is_record, "image_id"].map(keys)
    frame.loc[is_record, "uri"] = frame.loc[is_record, "key"].map(store.uri)
    frame.loc[is_record, "ingested_at"] = now_utc()
    return written


def quarantine_batch(store: Store, batch_id: str, data: bytes, code: str, reason: str) -> str:
    """Keep the rejected batch beside a JSON note saying why; the upload itself stays too."""
    store.write_bytes(f"{QUARANTINE_PREFIX}/{batch_id}.zip", data)
    note = {
        "batch_id": batch_id,
        "reason_code": code,
        "reason": reason,
        "source": batch_key(batch_id),
        "detected_at": now_utc().isoformat(),
    }
    key = f"{QUARANTINE_PREFIX}/{batch_id}.json"
    store.write_bytes(key, json.dumps(note, indent=2).encode())
    return store.uri(key)


def feedback_manifest(records: pd.DataFrame) -> pd.DataFrame:
    """Feedback images as image-manifest rows (source `feedback/<batch>`), for the pool."""
    images = records.drop_duplicates("image_id")
    return pd.DataFrame(
        {
            "image_id": images["image_id"],
            "uri": images["uri"],
            "key": images["key"],
            "source": FEEDBACK + images["batch_id"],
            "original_name": images["record_id"],
            "aliases": [[] for _ in range(len(images))],
            "format": images["format"],
            "mode": "",
            "width": images["width"],
            "height": images["height"],
            "channels": 3,
            "bytes": None,
            "phash": images["phash"],
            "thumb": images["thumb"],
            "ingested_at": pd.to_datetime(images["ingested_at"], utc=True),
        }
    )[MANIFEST_COLUMNS]


def feedback_labels(records: pd.DataFrame) -> pd.DataFrame:
    """Reviewed records as image-level labels with origin `feedback`, one vote per device
    operator (a later review of the same image by that operator replaces the earlier one); a
    reviewed detector record as its corrected boxes (or a negative when the set is empty)."""
    from cvops_pipelines.core.ingest.annotations import LABEL_COLUMNS

    done = records[records["corrected_label"].notna()]
    if "corrected_boxes" in done:
        boxed = done["corrected_boxes"].notna()
        if boxed.any():
            return pd.concat(
                [_image_labels(done[~boxed], LABEL_COLUMNS), _box_labels(done[boxed])],
                ignore_index=True,
            )[LABEL_COLUMNS]
    return _image_labels(done, LABEL_COLUMNS)


def _box_labels(done: pd.DataFrame) -> pd.DataFrame:
    from cvops_pipelines.core.base.ontology import NO_OBJECTS
    from cvops_pipelines.core.ingest.annotations import LABEL_COLUMNS

    rows = []
    for record in done.itertuples(index=False):
        base = {
            "image_id": record.image_id,
            "annotator": OPERATOR_PREFIX + record.device_id,
            "labeled_at": pd.Timestamp(record.corrected_at),
            "origin": "feedback",
            "source": FEEDBACK + record.batch_id,
            "original_name": record.record_id,
            "annotation_file": record.record_id,  # one review, one box set
            "position": "",
            "image_width": record.width,
            "image_height": record.height,
        }
        boxes = json.loads(record.corrected_boxes)
        for item in boxes:
            x0, y0, x1, y1 = item["box"]
            rows.append(
                {**base, "label": item["label"], "x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1}
            )
        if not boxes:
            rows.append({**base, "label": NO_OBJECTS})
    frame = pd.DataFrame(rows, columns=LABEL_COLUMNS)
    frame["labeled_at"] = pd.to_datetime(frame["labeled_at"], utc=True, format="ISO8601")
    return frame


def _image_labels(done: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": done["image_id"],
            "label": done["corrected_label"].astype(str),
            "x_min": float("nan"),
            "y_min": float("nan"),
            "x_max": float("nan"),
            "y_max": float("nan"),
            "annotator": OPERATOR_PREFIX + done["device_id"],
            "labeled_at": pd.to_datetime(done["corrected_at"], utc=True, format="ISO8601"),
            "origin": "feedback",
            "source": FEEDBACK + done["batch_id"],
            "original_name": done["record_id"],
            "annotation_file": "",
            "position": "",
            "image_width": done["width"],
            "image_height": done["height"],
        }
    )[columns]


def no_records() -> pd.DataFrame:
    return pd.DataFrame(columns=FEEDBACK_COLUMNS).astype({"confidence": "float64"})


@dataclass
class VettedBatches:
    """A run's feedback batches after vetting: every batch's rows (none for a quarantined one),
    which were accepted, why the others were quarantined, and the contract on what was kept."""

    frames: dict[str, pd.DataFrame]
    accepted: list[str]
    quarantined: pd.DataFrame  # batch_id, reason_code, reason, quarantine
    contract: object  # core.base.contracts.ContractResult on the accepted records
    new_images: int = 0
    refused_records: pd.DataFrame = field(default_factory=pd.DataFrame)  # turned away alone

    def records(self) -> pd.DataFrame:
        return _records_of(self.frames, self.accepted)

    def summary(self) -> dict:
        accepted = self.records()
        return {
            "batches": len(self.frames),
            "accepted_batches": len(self.accepted),
            "quarantined_batches": len(self.quarantined),
            "records": len(accepted),
            "reviewed": int(accepted["corrected_label"].notna().sum()),
            "late_corrections": int(
                sum((self.frames[b]["kind"] == "correction").sum() for b in self.accepted)
            ),
            "devices": int(accepted["device_id"].nunique()),
            "refused_records": len(self.refused_records),
            "new_images_stored": self.new_images,
        }


def _records_of(frames: dict[str, pd.DataFrame], batches: list[str]) -> pd.DataFrame:
    parts = [frames[b][frames[b]["kind"] == "record"] for b in batches]
    return pd.concat(parts, ignore_index=True) if parts else no_records()


def _first_failure(contract) -> str:
    first = contract.failures[0]
    return (
        f"{first.expectation} ({first.kwargs}) failed: {first.unexpected_count} unexpected, "
        f"e.g. {first.examples[:3]}"
    )


def _named_classes(frame: pd.DataFrame, fixes: pd.DataFrame) -> set[str]:
    """Every class a batch's corrections name: labels, and each corrected box's class. A
    detector's review of an empty image is summarised as NO_OBJECTS, which is not a class."""
    names = {label for label in fixes["corrected_label"] if label != ""}
    for text in frame["corrected_boxes"].dropna():
        names |= {item["label"] for item in json.loads(text)}
    return names


def vet_batches(
    store: Store,
    batches: list[str],
    classes: list[str],
    validate,
    register: Register,
    limits: ImageLimits = ImageLimits(),
    bounds: BatchBounds = BatchBounds(),
) -> VettedBatches:
    """Check who sent each batch (`register`), parse, check and contract-validate a run's
    batches; quarantine the bad ones whole and store the good ones' images. `validate(records,
    label)` runs the feedback contract. The
    contract runs on all batches at once; only when it fails are they taken one by one, each
    alone and then beside those accepted so far, so a batch that breaks it alone, or only with
    another (two batches claiming the same record ids), is quarantined and the rest go on."""
    parsed, frames, payloads, rejected = {}, {}, {}, {}
    for batch in batches:
        try:
            size = store.size(batch_key(batch))
            if size is not None and size > bounds.max_upload_bytes:
                raise BatchRejected(
                    "batch_too_large", f"the upload is {size} bytes > {bounds.max_upload_bytes}"
                )
            payloads[batch] = store.read_bytes(batch_key(batch))
            device = register.check(batch, payloads[batch], batch_signature(store, batch))
            parsed[batch] = parse_batch(payloads[batch], batch, limits, bounds)
            foreign = foreign_rows(device, parsed[batch].records, parsed[batch].corrections)
            if foreign:
                raise BatchRejected("foreign_record", foreign)
            frames[batch] = batch_frame(parsed[batch])
            fixes = frames[batch][frames[batch]["kind"] == "correction"]
            unknown = sorted(_named_classes(frames[batch], fixes) - set(classes))
            if unknown:
                raise BatchRejected(
                    "unknown_class", f"corrections name classes not in the ontology: {unknown}"
                )
        except FileNotFoundError:
            rejected[batch] = ("missing_batch", f"{batch_key(batch)} is not in the store")
        except (BatchRejected, NotEnrolled) as exc:
            rejected[batch] = (exc.code, exc.message)
        except (StorageError, OSError):
            raise  # the store is down or refuses us: the run fails and says so, no batch is blamed
        except Exception as exc:  # noqa: BLE001 - whatever else breaks, one batch stops alone
            rejected[batch] = ("unreadable_batch", f"{type(exc).__name__}: {exc}"[:500])

    def check(keys: list[str], label: str | None):
        return validate(_records_of(frames, keys).drop(columns=["thumb"]), label)

    good = [b for b in batches if b not in rejected]
    contract = check(good, "")
    if not contract.success:  # accept batch by batch: alone, then beside those accepted so far
        accepted = []
        for batch in good:
            alone = check([batch], None)
            together = (
                alone if not accepted or not alone.success else check([*accepted, batch], None)
            )
            if together.success:
                accepted.append(batch)
                continue
            why = "" if not alone.success else "together with the batches accepted before it, "
            rejected[batch] = ("contract_failed", why + _first_failure(together))
        good = accepted
        contract = check(good, "-accepted")
    quarantined = []
    for batch, (code, reason) in rejected.items():
        uri = quarantine_batch(store, batch, payloads.get(batch, b""), code, reason)
        quarantined.append(
            {"batch_id": batch, "reason_code": code, "reason": reason, "quarantine": uri}
        )
        frames[batch] = no_records()
    new_images = sum(store_images(store, parsed[b], frames[b]) for b in good)
    refused = [
        {"batch_id": b, "record_id": record, "reason_code": code, "reason": reason}
        for b in good
        for record, code, reason in parsed[b].refused
    ]
    for batch in {r["batch_id"] for r in refused}:  # kept beside the upload, as for a batch
        note = [r for r in refused if r["batch_id"] == batch]
        store.write_bytes(f"{QUARANTINE_PREFIX}/{batch}.records.json", json.dumps(note).encode())
    return VettedBatches(
        frames,
        good,
        pd.DataFrame(quarantined, columns=["batch_id", "reason_code", "reason", "quarantine"]),
        contract,
        new_images,
        pd.DataFrame(refused, columns=["batch_id", "record_id", "reason_code", "reason"]),
    )
