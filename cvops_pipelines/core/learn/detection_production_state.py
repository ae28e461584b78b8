"""What a detector fleet's production metrics remember between runs: each feedback batch is
absorbed once, as the classifier's are (production_state.py), so a run costs the new batches only.

One row per detector record (a frame the device answered with boxes), holding what its
contribution depends on: release, cohort, capture time, its answer, the figures that answer gives
at its release's operating point (boxes answered, top score) and, once reviewed, its matches
against the reviewed box set (true positives, boxes answered, boxes true). A re-delivered record
replaces its row; a late correction (the latest by time wins; a tie, the later batch) replaces
its matches; one for a record not seen yet waits in `pending_fixes`. Every figure of the report
is a sum over these rows, kept per release and cohort in `cohort_sums` by triggers (a row's
contribution added when it comes in, taken out when it changes or goes), so the report reads a
few rows, not every record; drift reads each release's first and latest frames by capture time
through an index. Stored beside the classifier's state (`state/detection_metrics.sqlite`); a
change of policy, window or schema starts it over from every batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from cvops_pipelines.core.base.box_metrics import matches, parse_boxes
from cvops_pipelines.core.learn.detection_production import (
    DetectionPolicy,
    DetectionProduction,
    drift_rows,
    per_release_columns,
)
from cvops_pipelines.core.learn.production_state import AbsorbedState, _nullable

DETECTION_STATE_KEY = "state/detection_metrics.sqlite"
SCHEMA_VERSION = "3"  # 3: records name their device and whether their image came
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, rows INTEGER, absorbed_at TEXT);
CREATE TABLE IF NOT EXISTS records (
    record_id TEXT PRIMARY KEY, release TEXT, cohort TEXT, captured_at TEXT, seq INTEGER,
    boxes TEXT, answered INTEGER, answered_any INTEGER, top REAL,
    own_fix TEXT, fix TEXT, fix_at TEXT, tp INTEGER, n_answered INTEGER, n_true INTEGER,
    device_id TEXT, kept INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_release ON records (release, captured_at, seq);
CREATE TABLE IF NOT EXISTS pending_fixes (
    record_id TEXT PRIMARY KEY, boxes TEXT, fixed_at TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cohort_sums (
    release TEXT, cohort TEXT, frames INTEGER, reviewed INTEGER, tp INTEGER,
    n_answered INTEGER, n_true INTEGER, answered INTEGER, PRIMARY KEY (release, cohort)
) WITHOUT ROWID;
"""


def _count(row: str, sign: str) -> str:
    """Add (+) or take out (-) one records row's contribution (`NEW` or `OLD`) to its sums."""
    fields = {
        "frames": "1",
        "reviewed": f"({row}.tp IS NOT NULL)",
        "tp": f"COALESCE({row}.tp, 0)",
        "n_answered": f"COALESCE({row}.n_answered, 0)",
        "n_true": f"COALESCE({row}.n_true, 0)",
        "answered": f"{row}.answered",
    }
    change = ", ".join(f"{name} = {name} {sign} {value}" for name, value in fields.items())
    where = f"release = {row}.release AND cohort = {row}.cohort"
    ensure = (  # a new release or cohort starts at zero
        f"INSERT INTO cohort_sums VALUES ({row}.release, {row}.cohort, 0, 0, 0, 0, 0, 0) "
        "ON CONFLICT (release, cohort) DO NOTHING; "
        if sign == "+"
        else ""
    )
    return f"{ensure}UPDATE cohort_sums SET {change} WHERE {where};"


SCHEMA += f"""
CREATE TRIGGER IF NOT EXISTS record_in AFTER INSERT ON records BEGIN {_count("NEW", "+")} END;
CREATE TRIGGER IF NOT EXISTS record_out AFTER DELETE ON records BEGIN {_count("OLD", "-")} END;
CREATE TRIGGER IF NOT EXISTS record_change AFTER UPDATE ON records BEGIN
    {_count("OLD", "-")} {_count("NEW", "+")}
END;
"""

ABSORBED = [
    "kind",
    "record_id",
    "release",
    "cohort",
    "boxes",
    "corrected_boxes",
    "corrected_at",
    "captured_at",
    "key",
    "device_id",
]


class DetectionState(AbsorbedState):
    """The absorbed detector feedback of one store, for one policy. `threshold(release)`: the
    release's operating point (what its devices answer with)."""

    schema = SCHEMA
    tables = ("records", "pending_fixes", "cohort_sums")  # records first: its triggers write sums

    def __init__(self, path: Path | str, policy: DetectionPolicy, threshold: Callable):
        self.policy, self.threshold = policy, threshold
        self._thresholds: dict[str, float] = {}
        super().__init__(path)

    def _wanted(self) -> dict:
        p = self.policy
        return {"schema": SCHEMA_VERSION, "policy": f"{p.min_score}:{p.match_iou}"}

    def frames(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def _point(self, release: str) -> float:
        if release not in self._thresholds:
            found = self.threshold(release)
            self._thresholds[release] = self.policy.min_score if found is None else found
        return self._thresholds[release]

    def _fold(self, frame: pd.DataFrame) -> None:
        frame = frame.reindex(columns=ABSORBED)
        records = frame[(frame["kind"] == "record") & frame["boxes"].notna()]
        records = records.drop_duplicates("record_id", keep="last")
        fixes = frame[frame["kind"] == "correction"].sort_values("corrected_at", kind="stable")
        self._put_records(records)
        self._put_fixes(fixes.drop_duplicates("record_id", keep="last"))

    def _put_records(self, records: pd.DataFrame) -> None:
        if records.empty:
            return
        (seq,) = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM records").fetchone()
        rows = []
        for i, r in enumerate(records.itertuples(index=False)):
            boxes, point = parse_boxes(r.boxes), self._point(r.release)
            rows.append(
                (
                    r.record_id,
                    r.release,
                    r.cohort,
                    r.captured_at,
                    seq + 1 + i,
                    r.boxes,
                    sum(b.get("score", 1.0) >= point for b in boxes),
                    sum(b.get("score", 0.0) >= point for b in boxes),
                    max((b.get("score", 0.0) for b in boxes), default=0.0),
                    _nullable(pd.Series([r.corrected_boxes]))[0],
                    _nullable(pd.Series([r.device_id]))[0],
                    int(not pd.isna(r.key)),  # an image-less record (selective buffering)
                )
            )
        # a re-delivered record replaces its own fields and keeps a later correction it has
        self.db.executemany(
            "INSERT INTO records (record_id, release, cohort, captured_at, seq, boxes, answered, "
            "answered_any, top, own_fix, device_id, kept) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (record_id) DO UPDATE SET release = excluded.release, "
            "cohort = excluded.cohort, captured_at = excluded.captured_at, seq = excluded.seq, "
            "boxes = excluded.boxes, answered = excluded.answered, "
            "answered_any = excluded.answered_any, top = excluded.top, own_fix = excluded.own_fix, "
            "device_id = excluded.device_id, kept = excluded.kept",
            rows,
        )
        ids = [row[0] for row in rows]
        early = self._select(ids, "record_id, boxes, fixed_at", "pending_fixes")
        self._fix(early)
        self.db.executemany(
            "DELETE FROM pending_fixes WHERE record_id = ?", ((r[0],) for r in early)
        )
        self._match(ids)

    def _put_fixes(self, fixes: pd.DataFrame) -> None:
        rows = list(
            zip(fixes["record_id"], _nullable(fixes["corrected_boxes"]), fixes["corrected_at"])
        )
        known = {r[0] for r in self._select([r[0] for r in rows], "record_id", "records")}
        self._fix([r for r in rows if r[0] in known])
        self.db.executemany(
            "INSERT INTO pending_fixes VALUES (?, ?, ?) ON CONFLICT (record_id) DO UPDATE SET "
            "boxes = excluded.boxes, fixed_at = excluded.fixed_at "
            "WHERE excluded.fixed_at >= pending_fixes.fixed_at",
            (r for r in rows if r[0] not in known),
        )
        self._match([r[0] for r in rows if r[0] in known])

    def _fix(self, rows) -> None:
        self.db.executemany(
            "UPDATE records SET fix = ?2, fix_at = ?3 "
            "WHERE record_id = ?1 AND (fix_at IS NULL OR ?3 >= fix_at)",
            rows,
        )

    def _match(self, ids: list[str]) -> None:
        """The reviewed records' matches at their release's operating point."""
        updates = []
        for record_id, release, boxes, own, fix, fix_at in self._select(
            ids, "record_id, release, boxes, own_fix, fix, fix_at", "records"
        ):
            truth_text = fix if fix_at is not None else own
            if truth_text is None:
                updates.append((None, None, None, record_id))
                continue
            truth = parse_boxes(truth_text)
            tp, answered = matches(
                parse_boxes(boxes), truth, self._point(release), self.policy.match_iou
            )
            updates.append((tp, answered, len(truth), record_id))
        self.db.executemany(
            "UPDATE records SET tp = ?, n_answered = ?, n_true = ? WHERE record_id = ?", updates
        )

    def report(self) -> DetectionProduction:
        """The same report `detection_production` gives on every record, from the state."""
        sums = "SUM(frames), SUM(reviewed), SUM(tp), SUM(n_answered), SUM(n_true), SUM(answered)"
        by_cohort = self.db.execute(
            f"SELECT release, cohort, {sums} FROM cohort_sums WHERE frames > 0 "
            "GROUP BY release, cohort ORDER BY release, cohort"
        ).fetchall()
        table = pd.DataFrame(
            [{"release": r, "cohort": c, **_rates(*figures)} for r, c, *figures in by_cohort]
        )
        by_release = self.db.execute(
            f"SELECT release, {sums} FROM cohort_sums WHERE frames > 0 GROUP BY release "
            "ORDER BY release"
        ).fetchall()
        per_release = pd.DataFrame(
            [
                {"release": r, "answer_threshold": self._point(r), **_rates(*figures)}
                for r, *figures in by_release
            ],
            columns=per_release_columns(),
        )
        frames = {r: n for r, n, *_ in by_release}
        return DetectionProduction(table, per_release, self._drift(frames), self.coverage())

    def coverage(self) -> pd.DataFrame:
        """Per device: frames answered (records), images kept (sent with them), reviewed."""
        return pd.read_sql_query(
            "SELECT COALESCE(device_id, '') AS device_id, COUNT(*) AS frames, "
            "COALESCE(SUM(kept), 0) AS images_kept, "
            "SUM(CASE WHEN tp IS NOT NULL THEN 1 ELSE 0 END) AS reviewed "
            "FROM records GROUP BY 1 ORDER BY 1",
            self.db,
        )

    def _drift(self, counts: dict[str, int]) -> pd.DataFrame:
        """`counts`: each release's frames."""
        window = self.policy.window

        def frames(release: str, order: str) -> pd.DataFrame:
            return pd.read_sql_query(
                f"SELECT top, answered_any FROM records WHERE release = ? ORDER BY {order} LIMIT ?",
                self.db,
                params=(release, window),
            )

        groups = {}
        for release, n in counts.items():
            first = frames(release, "captured_at, seq")
            last = frames(release, "captured_at DESC, seq DESC").iloc[::-1]
            groups[release] = (n, first, last)
        return drift_rows(groups, self.policy)


def _rates(frames, reviewed, tp, answered, true, answers) -> dict:
    return {
        "frames": frames,
        "reviewed": reviewed,
        "coverage": round(reviewed / max(1, frames), 4),
        "precision_50": round(tp / answered, 4) if answered else float("nan"),
        "recall_50": round(tp / true, 4) if true else float("nan"),
        "answers_per_frame": round(answers / frames, 3) if frames else 0.0,
    }


def detection_production(
    records: pd.DataFrame, policy: DetectionPolicy, thresholds: dict[str, float] | None = None
) -> DetectionProduction:
    """The report on resolved records held in memory, in one go: the state, absorbed once.
    `thresholds`: each release's operating point (else `policy.min_score`)."""
    state = DetectionState(":memory:", policy, (thresholds or {}).get)
    try:
        state.absorb("all", records.assign(kind="record"))
        return state.report()
    finally:
        state.close()


def stored_detection_state(store, policy: DetectionPolicy, threshold: Callable):
    """The store's detector state, open (see production_state.stored_state)."""
    from cvops_pipelines.core.learn.production_state import stored_file

    return stored_file(
        store, DETECTION_STATE_KEY, lambda path: DetectionState(path, policy, threshold)
    )
