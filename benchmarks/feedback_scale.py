"""Feedback at fleet scale: 1,000,000 records in 1,000 signed batches from 200 devices, ingested
ten batches per run (feedback_sensor makes one run of whatever arrived since its last tick; ten
stands for one tick's arrivals), with production_metrics run on top.

Batches are built in the edge buffer's wire format (records.jsonl, corrections.jsonl, images/),
signed by each device's enrolled ed25519 key and put where devices upload them; images are 20
real digit renders shared by every record (records are the load, not pixels). 30% of records
carry an operator label; each batch also carries 50 late corrections of the same device's earlier
records. The released model is the demo's logistic-regression digit classifier
(cvops_pipelines.demo.digit_model), live on `stable`, so drift runs on real outputs.

Each ingest run is what the feedback asset does: vet_batches (signatures, parsing, the GX
contract, images stored) and one Parquet table per batch. Each production_metrics run is what
that asset does: catch up the state on unseen batches, then the report (SLA, drift on the window,
plot, CSV). The reference outputs are filled into their cache before the first timed run, as the
release's first run fills them, so both timed runs find them cached.

Figures: seconds per batch of each ingest run as the backlog grows, peak RSS of this process
(sampled every 50 ms), the production_metrics run after the first 10 batches (10k records) and
after 10 new batches on a 990k backlog (1M records), their ratio, and the counts: unique records
generated vs counted in the state, rows generated vs rows in the tables.

Then, on the full backlog, each other consumer's read of the feedback (core.learn.feedback_query:
DuckDB over the partition files, only the rows and columns it uses), each in a fresh process,
beside the read they all made before (every partition concatenated in pandas, then
resolve_records): seconds, rows returned and the process's peak RSS (imports included).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import time
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

DEVICES, BATCHES, PER_BATCH, FIXES, PER_RUN = 200, 1000, 1000, 50, 10
QUICK = (20, 60, 250, 10, 10)
REVIEW_SHARE = 0.3
ZIP_TIME = (2026, 1, 1, 0, 0, 0)


class PeakRss:
    """Peak RSS of this process, sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def mib(self) -> float:
        self.peak = max(self.peak, self.process.memory_info().rss)
        return round(self.peak / 2**20, 1)

    def stop(self) -> None:
        self._stop.set()


class Fleet:
    """Devices that write signed batches straight into the store, in the buffer's format."""

    def __init__(self, store, release: str, devices: int, per_batch: int, fixes: int) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from cvops_pipelines.demo.digit_model import digit_label, png

        self.store, self.release = store, release
        self.per_batch, self.fixes = per_batch, fixes
        self.keys = {f"cam-{d:03d}": Ed25519PrivateKey.generate() for d in range(devices)}
        self.images = [png(i) for i in range(20)]
        self.image_ids = [hashlib.sha256(b).hexdigest() for b in self.images]
        self.truth = [digit_label(i) for i in range(20)]
        self.seq = dict.fromkeys(self.keys, 0)
        self.sent = dict.fromkeys(self.keys, 0)
        self.last_ids: dict[str, list[str]] = {d: [] for d in self.keys}
        self.records = self.rows = 0
        self.reviewed: set[str] = set()
        self.clock = datetime(2026, 1, 1, tzinfo=UTC)
        self.rng = np.random.default_rng(0)

    def enrol(self, signing_key) -> None:
        from cryptography.hazmat.primitives import serialization

        from cvops_pipelines.core.learn.enrolment import enrol_device

        for device, key in self.keys.items():
            pem = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            enrol_device(self.store, signing_key, device, pem, "feedback_scale")

    def batch(self, k: int) -> str:
        """Batch k of the round-robin over devices: sealed, signed, uploaded."""
        from cvops_pipelines.edge import wire

        device = list(self.keys)[k % len(self.keys)]
        self.sent[device] += 1
        batch = wire.batch_id(device, self.sent[device])
        cohort = f"site-{int(device[-3:]) % 5}"
        lines, ids = [], []
        picks = self.rng.integers(0, len(self.images), self.per_batch)
        for j, pick in enumerate(picks):
            self.seq[device] += 1
            rid = wire.record_id(device, self.seq[device])
            ids.append(rid)
            truth = self.truth[pick]
            predicted = truth if self.rng.random() < 0.9 else str((int(truth) + 1) % 10)
            reviewed = self.rng.random() < REVIEW_SHARE
            if reviewed:
                self.reviewed.add(rid)
            at = self.clock + timedelta(seconds=8.64 * (k * self.per_batch + j))
            lines.append(
                json.dumps(
                    {
                        "record_id": rid,
                        "device_id": device,
                        "cohort": cohort,
                        "release": self.release,
                        "image_id": self.image_ids[pick],
                        "predicted": predicted,
                        "confidence": 0.9,
                        "top_k": [[predicted, 0.9], [truth, 0.05]],
                        "corrected_label": truth if reviewed else None,
                        "captured_at": at.isoformat(),
                        "batch_id": batch,
                    },
                    sort_keys=True,
                )
            )
        earlier = self.last_ids[device]
        fixes = []
        for rid in earlier[: self.fixes]:  # the operator was late on the previous batch
            self.reviewed.add(rid)
            fixes.append(
                json.dumps(
                    {
                        "record_id": rid,
                        "corrected_label": str(self.rng.integers(10)),
                        "corrected_at": (self.clock + timedelta(days=400)).isoformat(),
                        "batch_id": batch,
                    },
                    sort_keys=True,
                )
            )
        self.last_ids[device] = ids
        self.records += len(lines)
        self.rows += len(lines) + len(fixes)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(zipfile.ZipInfo("records.jsonl", ZIP_TIME), "\n".join(lines))
            archive.writestr(zipfile.ZipInfo("corrections.jsonl", ZIP_TIME), "\n".join(fixes))
            for image_id, data in zip(self.image_ids, self.images):
                archive.writestr(zipfile.ZipInfo(f"images/{image_id}.bin", ZIP_TIME), data)
        payload = out.getvalue()
        self.store.write_bytes(wire.batch_key(batch), payload)
        self.store.write_bytes(wire.batch_signature_key(batch), self.keys[device].sign(payload))
        return batch


def ingest(store, batches: list[str], contracts: Path, key) -> float:
    """What one feedback asset run over these batches does; returns its seconds."""
    from cvops_pipelines.core.base.contracts import validate
    from cvops_pipelines.core.base.ontology import load_ontology
    from cvops_pipelines.core.base.tables import table_key, write_table
    from cvops_pipelines.core.learn.enrolment import read_register
    from cvops_pipelines.core.learn.feedback import vet_batches
    from cvops_pipelines.core.ship.release import ReleaseStore

    started = time.perf_counter()
    register = read_register(store, [key.public_key()])
    classes = load_ontology(contracts / "ontology.yaml").image_labels
    params = {"known_releases": ReleaseStore(store).ids(), "classes": classes}
    vetted = vet_batches(
        store,
        batches,
        classes,
        lambda records, label: validate(records, contracts / "gx" / "feedback.json", params),
        register,
    )
    if len(vetted.quarantined):
        raise RuntimeError(f"batches quarantined: {vetted.quarantined.to_dict('records')}")
    for batch, frame in vetted.frames.items():
        write_table(store, table_key("feedback", batch), frame)
    return time.perf_counter() - started


def production_run(store, batches: list[str]) -> dict:
    """What one production_metrics run does (classification): catch up, report, save."""
    from cvops_pipelines.core.base.tables import PartitionedTable, table_key
    from cvops_pipelines.core.learn.production import ProductionPolicy, production_report
    from cvops_pipelines.core.learn.production_state import catch_up, stored_state
    from cvops_pipelines.core.ship.release import ReleaseStore

    started = time.perf_counter()
    policy = ProductionPolicy()
    with stored_state(store, policy.period, policy.drift_window) as state:
        absorbed = catch_up(
            state, PartitionedTable(store, {b: table_key("feedback", b) for b in sorted(batches)})
        )
        report = production_report(store, state, policy, ReleaseStore(store))
    report.save(store)
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "records": report.records,
        "reviewed": report.reviewed,
        **absorbed,
    }


def run(quick: bool = False) -> dict:
    from cvops_pipelines.core.base.store import LocalStore
    from cvops_pipelines.core.learn.production import ProductionPolicy, reference_outputs
    from cvops_pipelines.core.learn.production_state import STATE_KEY
    from cvops_pipelines.core.ship.release import ReleaseStore, generate_keypair, load_private_key
    from cvops_pipelines.demo.digit_model import publish_live_release
    from cvops_pipelines.edge.wire import release_key

    devices, n_batches, per_batch, fixes, per_run = (
        QUICK if quick else (DEVICES, BATCHES, PER_BATCH, FIXES, PER_RUN)
    )
    contracts = Path(__file__).parents[1] / "data_contracts"
    rss = PeakRss()
    with tempfile.TemporaryDirectory(prefix="cvops-feedback-scale-") as tmp:
        home = Path(tmp)
        os.environ["CVOPS_HOME"] = str(home)
        store = LocalStore(home)
        generate_keypair(home / "keys")
        key = load_private_key(home / "keys" / "release_signing.key")
        release = publish_live_release(store, key, "ds-bench")
        releases = ReleaseStore(store)
        preprocess = json.loads(store.read_bytes(release_key(release, "preprocess.json")))
        reference_outputs(
            store,
            releases,
            release,
            releases.model(release),
            preprocess,
            ProductionPolicy().reference_images,
        )  # the release's first run fills this cache; both timed runs below find it
        production_run(LocalStore(home / "warm-up"), [])  # imports, first plot: not the backlog
        fleet = Fleet(store, release, devices, per_batch, fixes)
        fleet.enrol(key)
        ingested: list[str] = []
        ingest_runs, catch_ups, timed = [], [], {}
        checkpoints = {per_run, n_batches - per_run}
        while len(ingested) < n_batches:
            batches = [fleet.batch(len(ingested) + i) for i in range(per_run)]
            seconds = ingest(store, batches, contracts, key)
            ingested += batches
            ingest_runs.append(
                {
                    "backlog_records": len(ingested) * per_batch,
                    "seconds_per_batch": round(seconds / len(batches), 3),
                    "peak_rss_mib": rss.mib(),
                }
            )
            if len(ingested) == per_run or len(ingested) == n_batches:
                timed[len(ingested) * per_batch] = production_run(store, ingested)
                print({"production_metrics": timed[len(ingested) * per_batch]}, flush=True)
            elif len(ingested) in checkpoints or len(ingested) % (n_batches // 10) == 0:
                catch_ups.append(production_run(store, ingested))  # the schedule's runs
            if len(ingest_runs) % 10 == 0:
                print(ingest_runs[-1], flush=True)
        rows_in_tables = _table_rows(home)
        reads = {name: consumer_read(name, home, ingested) for name in READS}
        state_bytes = (home / STATE_KEY).stat().st_size
        final = timed[n_batches * per_batch]
    rss.stop()
    first, last = timed[per_run * per_batch], final
    ratio = last["seconds"] / first["seconds"]
    per_batch_s = [r["seconds_per_batch"] for r in ingest_runs]
    counts = {
        "records_generated": fleet.records,
        "records_counted": last["records"],
        "reviewed_generated": len(fleet.reviewed),
        "reviewed_counted": last["reviewed"],
        "rows_generated": fleet.rows,
        "rows_in_tables": rows_in_tables,
    }
    exact = (
        counts["records_generated"] == counts["records_counted"]
        and counts["reviewed_generated"] == counts["reviewed_counted"]
        and counts["rows_generated"] == counts["rows_in_tables"]
    )
    peak = rss.mib()
    return {
        "benchmark": "feedback_scale",
        "devices": devices,
        "batches": n_batches,
        "records_per_batch": per_batch,
        "batches_per_ingest_run": per_run,
        "ingest": {
            "seconds_per_batch_first_10_runs": round(float(np.mean(per_batch_s[:10])), 3),
            "seconds_per_batch_last_10_runs": round(float(np.mean(per_batch_s[-10:])), 3),
            "runs": ingest_runs,
        },
        "production_metrics": {
            "after_first_10_batches": first,
            "after_10_new_batches_on_full_backlog": last,
            "ratio_full_vs_first": round(ratio, 3),
            "catch_up_runs": catch_ups,
        },
        "peak_rss_mib": peak,
        "learn_reads_on_full_backlog": reads,
        "state_file_mib": round(state_bytes / 2**20, 1),
        "state_bytes_per_record": round(state_bytes / fleet.records, 1),
        "counts": counts,
        "target": "production_metrics ratio <= 2, peak RSS < 2048 MiB, no record lost or doubled",
        "met": ratio <= 2 and peak < 2048 and exact,
    }


READS = [
    "before: concatenate, resolve_records",
    "labeled_pool",
    "replay_set",
    "canary_decision",
    "annotation_queue",
    "ontology_report",
    "ssl_encoder",
]


def consumer_read(name: str, home: Path, batches: list[str]) -> dict:
    """One consumer's read of every batch, in a fresh process (its peak RSS is its own)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        result = pool.apply(_read, (name, str(home), batches))
    print({name: result}, flush=True)
    return result


def _read(name: str, home: str, batches: list[str]) -> dict:
    import duckdb  # noqa: F401  (imported before the baseline, as pandas and pyarrow are)

    from cvops_pipelines.core.base.store import LocalStore
    from cvops_pipelines.core.base.tables import PartitionedTable, table_key
    from cvops_pipelines.core.learn import feedback_query as q
    from cvops_pipelines_tests.reference import resolve_records

    table = PartitionedTable(LocalStore(Path(home)), {b: table_key("feedback", b) for b in batches})
    reads = {
        READS[0]: lambda: resolve_records(table.read_all()),
        "labeled_pool": lambda: q.pool_feedback(table, [], []).reviewed,
        "replay_set": lambda: q.reviewed_or_expert(table, []),
        "canary_decision": lambda: q.reviewed_records(table),
        "annotation_queue": lambda: q.queue_candidates(table, []),
        "ontology_report": lambda: q.predictions(table),
        "ssl_encoder": lambda: q.field_images(table),
    }
    rss = PeakRss()  # ru_maxrss would carry the forking parent's peak over the exec
    baseline = rss.mib()
    started = time.perf_counter()
    rows = len(reads[name]())
    seconds = time.perf_counter() - started
    rss.stop()
    return {
        "seconds": round(seconds, 2),
        "rows": rows,
        "rss_before_mib": baseline,
        "peak_rss_mib": rss.mib(),
    }


def _table_rows(home: Path) -> int:
    import pyarrow.parquet as pq

    return sum(
        pq.ParquetFile(p).metadata.num_rows
        for p in (home / "tables" / "feedback").glob("*.parquet")
    )
