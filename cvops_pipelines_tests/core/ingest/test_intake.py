import hashlib
import sys
from pathlib import Path

import pytest

from cvops_pipelines.core.base.images import ImageLimits
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.ingest import intake as ingest_mod
from cvops_pipelines.core.ingest.intake import IngestConfig, image_key, ingest_drop
from cvops_pipelines.demo import digit_model
from cvops_pipelines_tests import corpus


def outcomes(result) -> dict[str, str]:
    out = {row.original_name: "accepted" for row in result.manifest.itertuples()}
    for row in result.manifest.itertuples():
        out.update({alias: "duplicate" for alias in row.aliases})
    out.update({row.original_name: row.reason_code for row in result.quarantine.itertuples()})
    return out


@pytest.fixture
def corpus_drop(tmp_path) -> tuple[LocalStore, dict]:
    drop = tmp_path / "drops" / "corpus"
    expected = corpus.write_corpus(drop, tmp_path / "outside")
    (drop / "_SUCCESS").write_text("")
    (drop / "labels.csv").write_text("filename,label\n")  # annotation files are not images
    return LocalStore(drop), expected


@pytest.mark.parametrize("workers", [1, 2])
def test_every_file_is_accounted_for(corpus_drop, tmp_path, workers):
    source, expected = corpus_drop
    store = LocalStore(tmp_path / "store")
    result = ingest_drop(source, store, "corpus", IngestConfig(workers=workers))
    assert result.files_seen == len(expected)
    assert len(result.manifest) + result.duplicates + len(result.quarantine) == result.files_seen
    assert outcomes(result) == expected
    # the symlink target outside the drop was never read or copied
    assert not any("secret" in str(p) for p in (tmp_path / "store").rglob("*"))


def test_originals_are_content_addressed_and_rejects_kept(corpus_drop, tmp_path):
    source, _ = corpus_drop
    store = LocalStore(tmp_path / "store")
    result = ingest_drop(source, store, "corpus", IngestConfig(workers=1))
    for row in result.manifest.itertuples():
        data = store.read_bytes(row.key)
        assert hashlib.sha256(data).hexdigest() == row.image_id
        assert row.key == image_key(row.image_id, row.format)
        assert data == source.read_bytes(row.original_name)
    truncated = result.quarantine.set_index("original_name").loc["bad/truncated.jpg"]
    assert truncated.quarantine_uri.endswith("quarantine/corpus/files/bad/truncated.jpg")
    assert store.exists("quarantine/corpus/files/bad/truncated.jpg")


def test_rerun_is_idempotent(corpus_drop, tmp_path):
    source, _ = corpus_drop
    store = LocalStore(tmp_path / "store")
    first = ingest_drop(source, store, "corpus", IngestConfig(workers=1))
    images_before = sorted(e.key for e in store.list("images"))
    second = ingest_drop(source, store, "corpus", IngestConfig(workers=2))
    assert first.new_objects == len(first.manifest) and second.new_objects == 0
    assert sorted(e.key for e in store.list("images")) == images_before
    assert list(second.manifest["image_id"]) == list(first.manifest["image_id"])
    assert outcomes(second) == outcomes(first)


def test_tables_written_a_row_group_at_a_time_hold_the_same_rows(corpus_drop, tmp_path):
    """Row groups of 2 rows (the parent holds one group of rows at a time): the same manifest,
    aliases and quarantine as with one group, and the duplicates' names survive the second
    pass that fills in the aliases."""
    import pyarrow.parquet as pq

    source, _ = corpus_drop
    whole = ingest_drop(source, LocalStore(tmp_path / "a"), "corpus", IngestConfig(workers=1))
    config = IngestConfig(workers=1, table_rows=2)
    small = ingest_drop(source, LocalStore(tmp_path / "b"), "corpus", config, workdir=tmp_path)
    assert small.duplicates > 0 and small.quarantined > 2
    assert pq.ParquetFile(small.manifest_file.path).num_row_groups == -(-small.accepted // 2)
    assert small.manifest_file.path.parent == tmp_path
    assert not (tmp_path / "manifest.partial.parquet").exists()
    for a, b in ((whole.manifest, small.manifest), (whole.quarantine, small.quarantine)):
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
        for column in a.columns:
            if column not in ("uri", "quarantine_uri", "ingested_at", "detected_at"):  # per run
                assert [_plain(v) for v in a[column]] == [_plain(v) for v in b[column]], column
    assert sum(len(a) for a in small.manifest["aliases"]) == small.duplicates
    assert small.quarantine_reasons == small.quarantine["reason_code"].value_counts().to_dict()
    assert list(small.preview["image_id"]) == list(small.manifest["image_id"][:10])


def _plain(value):
    return list(value) if hasattr(value, "tolist") else value


def test_streaming_keeps_a_bounded_number_of_files_in_flight(tmp_path, monkeypatch):
    """The listing is consumed lazily: never more than window x workers batches ahead."""
    drop = tmp_path / "drop"
    png = corpus.encode(digit_model.digit(0), "PNG")
    for i in range(300):
        (drop / f"{i:04d}.png").parent.mkdir(exist_ok=True)
        (drop / f"{i:04d}.png").write_bytes(png)
    source = LocalStore(drop)
    config = IngestConfig(workers=2, batch_size=4, window=2)
    pulled, ahead = [0], []
    original_list = source.list

    def counting_list(prefix=""):
        for entry in original_list(prefix):
            pulled[0] += 1
            yield entry

    monkeypatch.setattr(LocalStore, "list", lambda self, prefix="": counting_list(prefix))
    seen = 0
    for _ in ingest_mod._results(source.list(), source, LocalStore(tmp_path / "s"), "d", config):
        seen += 1
        ahead.append(pulled[0] - seen)
    assert seen == 300
    assert max(ahead) <= config.window * config.worker_count() * config.batch_size


def test_oversized_file_is_rejected_unread(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "big.png").write_bytes(corpus.encode(digit_model.digit(0), "PNG"))
    result = ingest_drop(
        LocalStore(drop),
        LocalStore(tmp_path / "s"),
        "d",
        IngestConfig(limits=ImageLimits(max_bytes=10), workers=1),
    )
    assert list(result.quarantine["reason_code"]) == ["file_too_large"]


def test_a_key_with_dot_dot_segments_is_turned_away_alone(tmp_path):
    """An object store may list any key; one that would escape a path is quarantined by name
    (never read, never copied) and the rest of the drop is ingested."""
    from cvops_pipelines.core.base.store import Entry

    class Listing:  # an object store's listing, as S3 may return it
        files = {
            "0/ok.png": corpus.encode(digit_model.digit(0), "PNG"),
            "sub/../escape.png": b"whatever",
            "/abs.png": b"x",
        }

        def list(self, prefix=""):
            return [Entry(k, len(v)) for k, v in self.files.items()]

        def read_bytes(self, key):
            assert ".." not in key and not key.startswith("/"), key  # never read
            return self.files[key]

    store = LocalStore(tmp_path / "store")
    result = ingest_mod.ingest_drop(Listing(), store, "d1", ingest_mod.IngestConfig(workers=1))
    assert len(result.manifest) == 1 and result.files_seen == 3
    codes = dict(zip(result.quarantine["original_name"], result.quarantine["reason_code"]))
    assert codes == {"sub/../escape.png": "unsafe_name", "/abs.png": "unsafe_name"}
    assert not (tmp_path / "store" / "quarantine").exists()


SLOW_INGEST = """
import sys, time
from pathlib import Path
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.ingest.intake import IngestConfig, ingest_drop

class SlowStore(LocalStore):  # a slow disk: each read takes 50 ms
    def read_bytes(self, key):
        time.sleep(0.05)
        return super().read_bytes(key)

if __name__ == "__main__":
    drop, out = Path(sys.argv[1]), Path(sys.argv[2])
    ingest_drop(SlowStore(drop), LocalStore(out), "d1", IngestConfig(workers=2, batch_size=1))
"""


def _children(pid: int) -> set[int]:
    from pathlib import Path

    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/<pid>/stat: the parent pid
            out.add(int(stat.parent.name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_decoder_workers_die_with_a_killed_ingest(tmp_path):
    import os
    import signal
    import subprocess
    import time

    drop = tmp_path / "drop"
    for i in range(200):
        (drop / "0").mkdir(parents=True, exist_ok=True)
        (drop / "0" / f"{i}.png").write_bytes(corpus.encode(digit_model.digit(i), "PNG"))
    script = tmp_path / "slow_ingest.py"
    script.write_text(SLOW_INGEST)
    proc = subprocess.Popen([sys.executable, str(script), str(drop), str(tmp_path / "out")])
    deadline, workers = time.monotonic() + 60, set()
    while time.monotonic() < deadline and len(workers) < 2:
        workers = {
            c
            for c in _children(proc.pid)
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
        }
        time.sleep(0.1)
    assert len(workers) >= 2, "the pool never started"
    everything = workers | set().union(*(_children(w) for w in workers)) | _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in everything):
        time.sleep(0.1)
    alive = [p for p in everything if Path(f"/proc/{p}").exists()]
    assert not alive, f"outlived the killed ingest: {alive}"
