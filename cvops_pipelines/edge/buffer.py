"""The device's feedback buffer: every prediction (with its image) and every correction, in SQLite
(WAL), until the central store has confirmed the batch that carries it."""

from __future__ import annotations

import io
import json
import sqlite3
import zipfile
from datetime import UTC, datetime
from pathlib import Path

from cvops_pipelines.edge import wire

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, record_id TEXT UNIQUE, release TEXT, image_id TEXT,
    image BLOB, predicted TEXT, confidence REAL, top_k TEXT, corrected_label TEXT,
    captured_at TEXT, batch_id TEXT, boxes TEXT, corrected_boxes TEXT);
CREATE TABLE IF NOT EXISTS corrections (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, record_id TEXT, corrected_label TEXT,
    corrected_at TEXT, batch_id TEXT, corrected_boxes TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER);
CREATE TABLE IF NOT EXISTS frames (
    frame TEXT PRIMARY KEY, record_id TEXT, skipped TEXT, at TEXT);
"""
ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # fixed: a re-sent batch is byte-identical


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _boxes_fields(boxes: str | None, corrected: str | None) -> dict:
    """A detector's record carries its boxes and, once reviewed, the corrected set; a
    classifier's record carries neither key (the wire format it always had)."""
    out = {}
    if boxes is not None:
        out["boxes"] = json.loads(boxes)
    if corrected is not None:
        out["corrected_boxes"] = json.loads(corrected)
    return out


class FeedbackBuffer:
    def __init__(self, path: Path, device_id: str, cohort: str):
        self.device_id, self.cohort = device_id, cohort
        self.db = sqlite3.connect(path, isolation_level=None)  # explicit transactions below
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        for table, column in (
            ("records", "boxes"),
            ("records", "corrected_boxes"),
            ("corrections", "corrected_boxes"),
        ):  # a buffer written before detection: add the box columns, keep every row
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")

    def close(self) -> None:
        self.db.close()

    def record(
        self,
        release: str,
        image_id: str,
        image: bytes,
        predicted: str,
        confidence: float,
        top_k: list[tuple[str, float]],
        frame: str | None = None,
        boxes: list[dict] | None = None,
    ) -> str:
        """`frame`: the source frame's key (a watched file), marked seen in the same
        transaction, so a restart never records one frame twice. `boxes`: a detector's answer
        ({label, score, box} in the image's pixels)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cursor = self.db.execute(
                "INSERT INTO records (release, image_id, image, predicted, confidence, top_k, "
                "captured_at, boxes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    release,
                    image_id,
                    image,
                    predicted,
                    confidence,
                    json.dumps(top_k),
                    now(),
                    None if boxes is None else json.dumps(boxes),
                ),
            )
            record_id = wire.record_id(self.device_id, cursor.lastrowid)
            self.db.execute(
                "UPDATE records SET record_id = ? WHERE seq = ?", (record_id, cursor.lastrowid)
            )
            if frame is not None:
                self.db.execute(
                    "INSERT INTO frames (frame, record_id, at) VALUES (?, ?, ?)",
                    (frame, record_id, now()),
                )
        return record_id

    def seen(self, frame: str) -> bool:
        return (
            self.db.execute("SELECT 1 FROM frames WHERE frame = ?", (frame,)).fetchone() is not None
        )

    def skip(self, frame: str, reason: str) -> None:
        """A frame that could not be predicted: remembered with why, never retried."""
        with self.db:
            self.db.execute(
                "INSERT OR IGNORE INTO frames (frame, skipped, at) VALUES (?, ?, ?)",
                (frame, reason, now()),
            )

    def skipped(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM frames WHERE skipped IS NOT NULL").fetchone()[
            0
        ]

    def correct(self, record_id: str, label: str, boxes: list[dict] | None = None) -> None:
        """In the record while it waits; as a separate correction once its batch is sealed.
        `boxes`: for a detector, the whole corrected box set ({label, box}); `label` is then
        its summary (the most frequent class, "" for an image with nothing in it)."""
        fixed = None if boxes is None else json.dumps(boxes)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            updated = self.db.execute(
                "UPDATE records SET corrected_label = ?, corrected_boxes = ? "
                "WHERE record_id = ? AND batch_id IS NULL",
                (label, fixed, record_id),
            ).rowcount
            if not updated:
                self.db.execute(
                    "INSERT INTO corrections (record_id, corrected_label, "
                    "corrected_at, corrected_boxes) VALUES (?, ?, ?, ?)",
                    (record_id, label, now(), fixed),
                )

    def pending(self) -> int:
        return (
            self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            + self.db.execute("SELECT COUNT(*) FROM corrections").fetchone()[0]
        )

    def seal(self, max_records: int = 256) -> str | None:
        """Assign waiting rows to a new batch (atomically); None when nothing waits."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT value FROM meta WHERE key = 'batch'").fetchone()
            number = (row[0] if row else 0) + 1
            batch_id = wire.batch_id(self.device_id, number)
            moved = self.db.execute(
                "UPDATE records SET batch_id = ? WHERE seq IN (SELECT seq FROM records WHERE "
                "batch_id IS NULL ORDER BY seq LIMIT ?)",
                (batch_id, max_records),
            ).rowcount
            moved += self.db.execute(
                "UPDATE corrections SET batch_id = ? WHERE batch_id IS NULL", (batch_id,)
            ).rowcount
            if not moved:
                self.db.execute("ROLLBACK")
                return None
            self.db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('batch', ?)", (number,)
            )
        return batch_id

    def sealed(self) -> list[str]:
        rows = self.db.execute(
            "SELECT batch_id FROM records WHERE batch_id IS NOT NULL UNION "
            "SELECT batch_id FROM corrections WHERE batch_id IS NOT NULL"
        )
        return sorted(r[0] for r in rows)

    def payload(self, batch_id: str) -> bytes:
        """The batch as a zip: records.jsonl, corrections.jsonl, images/<image_id>.bin."""
        records = self.db.execute(
            "SELECT record_id, release, image_id, image, predicted, confidence, top_k, "
            "corrected_label, captured_at, boxes, corrected_boxes FROM records "
            "WHERE batch_id = ? ORDER BY seq",
            (batch_id,),
        ).fetchall()
        corrections = self.db.execute(
            "SELECT record_id, corrected_label, corrected_at, corrected_boxes FROM corrections "
            "WHERE batch_id = ? ORDER BY seq",
            (batch_id,),
        ).fetchall()
        lines, images = [], {}
        for row in records:
            rid, release, image_id, image, predicted, confidence, top_k, label, at = row[:9]
            detected = _boxes_fields(row[9], row[10])
            lines.append(
                json.dumps(
                    {
                        **detected,
                        "record_id": rid,
                        "device_id": self.device_id,
                        "cohort": self.cohort,
                        "release": release,
                        "image_id": image_id,
                        "predicted": predicted,
                        "confidence": confidence,
                        "top_k": json.loads(top_k),
                        "corrected_label": label,
                        "captured_at": at,
                        "batch_id": batch_id,
                    },
                    sort_keys=True,
                )
            )
            images[image_id] = image
        fixes = [
            json.dumps(
                {
                    **_boxes_fields(None, boxes),
                    "record_id": r,
                    "corrected_label": label,
                    "corrected_at": at,
                    "batch_id": batch_id,
                },
                sort_keys=True,
            )
            for r, label, at, boxes in corrections
        ]
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
            for name, text in (("records.jsonl", lines), ("corrections.jsonl", fixes)):
                archive.writestr(zipfile.ZipInfo(name, ZIP_TIME), "\n".join(text))
            for image_id in sorted(images):
                archive.writestr(
                    zipfile.ZipInfo(f"images/{image_id}.bin", ZIP_TIME), images[image_id]
                )
        return out.getvalue()

    def records_in(self, batch_id: str) -> int:
        return self.db.execute(
            "SELECT COUNT(*) FROM records WHERE batch_id = ?", (batch_id,)
        ).fetchone()[0]

    def forget(self, batch_id: str) -> None:
        """Only after the central store confirmed the batch."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM records WHERE batch_id = ?", (batch_id,))
            self.db.execute("DELETE FROM corrections WHERE batch_id = ?", (batch_id,))
