"""The device's feedback buffer: every prediction and every correction, in SQLite (WAL), until the
central store has confirmed the batch that carries it. A prediction's image is stored only when it
is worth sending (`keep.py`); under the disk budget the least valuable images go first (a
corrected one last). Records are never evicted: a record without its image still counts.

Durability: a frame's record commits without waiting for the disk (WAL, synchronous=NORMAL: it
survives a crash of the agent, and a power cut loses at most the last frames' records, which
are then predicted again, never twice); what the upload's exactly-once rests on (sealing a batch,
forgetting it once the store has it) and an operator's correction wait for the disk (FULL)."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import zipfile
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from cvops_pipelines.edge import wire
from cvops_pipelines.edge.keep import CORRECTED

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
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        for table, column, kind in (
            ("records", "boxes", "TEXT"),
            ("records", "corrected_boxes", "TEXT"),
            ("corrections", "corrected_boxes", "TEXT"),
            ("records", "source", "TEXT"),
            ("records", "frame_time", "REAL"),
            ("records", "keep", "INTEGER DEFAULT 1"),
            ("records", "reason", "TEXT"),
            ("records", "value", "REAL DEFAULT 0"),
            ("records", "image_bytes", "INTEGER DEFAULT 0"),
        ):  # a buffer written by an older agent: add the columns, keep every row
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _durable(self):
        """One transaction that is on disk when it commits (outside it: NORMAL)."""
        self.db.execute("PRAGMA synchronous=FULL")
        try:
            with self.db:
                yield
        finally:
            self.db.execute("PRAGMA synchronous=NORMAL")

    def record(
        self,
        release: str,
        image_id: str,
        image: bytes | None,
        predicted: str,
        confidence: float,
        top_k: list[tuple[str, float]],
        frame: str | None = None,
        boxes: list[dict] | None = None,
        source: str | None = None,
        frame_time: float | None = None,
        keep: bool = True,
        reason: str = "",
        value: float = 0.0,
        captured_at: str | None = None,
    ) -> str:
        """`frame`: the source frame's key (a watched file, a video's frame), marked seen in the
        same transaction, so a restart never records one frame twice. `boxes`: a detector's
        answer ({label, score, box} in the image's pixels). `image`: None when the frame's
        image is not worth sending (`keep` False); `reason` and `value` say why it is."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cursor = self.db.execute(
                "INSERT INTO records (release, image_id, image, predicted, confidence, top_k, "
                "captured_at, boxes, source, frame_time, keep, reason, value, image_bytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    release,
                    image_id,
                    image,
                    predicted,
                    confidence,
                    json.dumps(top_k),
                    captured_at or now(),
                    None if boxes is None else json.dumps(boxes),
                    source,
                    frame_time,
                    int(keep),
                    reason,
                    value,
                    len(image or b""),
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
        with self._durable():
            self.db.execute("BEGIN IMMEDIATE")
            updated = self.db.execute(
                "UPDATE records SET corrected_label = ?, corrected_boxes = ?, keep = 1, "
                "reason = 'corrected', value = ? WHERE record_id = ? AND batch_id IS NULL",
                (label, fixed, CORRECTED, record_id),
            ).rowcount
            if not updated:
                self.db.execute(
                    "INSERT INTO corrections (record_id, corrected_label, "
                    "corrected_at, corrected_boxes) VALUES (?, ?, ?, ?)",
                    (record_id, label, now(), fixed),
                )

    def attach(self, record_id: str, image: bytes) -> bool:
        """Give a waiting record the image it was recorded without (an operator corrected the
        frame while the agent still held it); False when the record has left or has one. The
        record's image id becomes the image's hash, which the pipeline checks."""
        with self.db:
            return bool(
                self.db.execute(
                    "UPDATE records SET image = ?, image_bytes = ?, image_id = ? WHERE "
                    "record_id = ? AND image IS NULL AND batch_id IS NULL",
                    (image, len(image), hashlib.sha256(image).hexdigest(), record_id),
                ).rowcount
            )

    def image_bytes(self) -> int:
        return self.db.execute("SELECT COALESCE(SUM(image_bytes), 0) FROM records").fetchone()[0]

    def evict(self, budget: int) -> int:
        """Drop images until those left fit in `budget` bytes, the least valuable first (the
        oldest of equal value first; a correction's last). Records stay. Returns how many
        images went (also added to the device's `evicted` count)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            total = self.db.execute("SELECT COALESCE(SUM(image_bytes), 0) FROM records").fetchone()[
                0
            ]
            if total <= budget:
                self.db.execute("ROLLBACK")
                return 0
            gone = []
            for seq, size in self.db.execute(
                "SELECT seq, image_bytes FROM records WHERE image IS NOT NULL ORDER BY value, seq"
            ):
                if total <= budget:
                    break
                gone.append((seq,))
                total -= size
            self.db.executemany(
                "UPDATE records SET image = NULL, image_bytes = 0 WHERE seq = ?", gone
            )
            self._count("evicted", len(gone))
        return len(gone)

    def _count(self, name: str, n: int) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )

    def counts(self) -> dict:
        """Device-lifetime counters (evicted images) and what waits now."""
        rows = dict(self.db.execute("SELECT key, value FROM meta WHERE key != 'batch'"))
        kept = self.db.execute(
            "SELECT COUNT(*) FROM records WHERE keep = 1 AND image IS NOT NULL"
        ).fetchone()[0]
        return {
            "evicted": rows.get("evicted", 0),
            "waiting_records": self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0],
            "waiting_images": kept,
            "image_bytes": self.image_bytes(),
        }

    def pending(self) -> int:
        return (
            self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            + self.db.execute("SELECT COUNT(*) FROM corrections").fetchone()[0]
        )

    def seal(self, max_records: int = 256) -> str | None:
        """Assign waiting rows to a new batch (atomically); None when nothing waits."""
        with self._durable():
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT value FROM meta WHERE key = 'batch'").fetchone()
            number = (row[0] if row else 0) + 1
            batch_id = wire.batch_id(self.device_id, number)
            moved = self.db.execute(  # the most valuable first: corrections, then kept images
                "UPDATE records SET batch_id = ? WHERE seq IN (SELECT seq FROM records WHERE "
                "batch_id IS NULL ORDER BY keep DESC, value DESC, seq LIMIT ?)",
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
            "corrected_label, captured_at, boxes, corrected_boxes, source, frame_time, keep "
            "FROM records WHERE batch_id = ? ORDER BY seq",
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
            source, frame_time, keep = row[11:14]
            sent = image is not None and keep != 0
            streamed = {} if source is None else {"source": source, "frame_time": frame_time}
            lines.append(
                json.dumps(
                    {
                        **detected,
                        **streamed,
                        **({} if sent else {"image_kept": False}),
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
            if sent:
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
        with self._durable():
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM records WHERE batch_id = ?", (batch_id,))
            self.db.execute("DELETE FROM corrections WHERE batch_id = ?", (batch_id,))
