import os

import boto3
import pytest
from botocore.stub import Stubber

from cvops_pipelines.core.base.store import LocalStore, S3Store, StorageError, store_from_uri


def test_local_writes_are_atomic_and_listing_is_sorted_without_following_links(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.write_bytes("b/2.bin", b"two")
    store.write_bytes("a.bin", b"one")
    store.write_bytes("a.bin", b"uno")  # overwrite replaces whole
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "root" / "link_dir")
    entries = list(store.list())
    assert [e.key for e in entries] == ["a.bin", "b/2.bin", "link_dir"]
    assert entries[2].is_symlink and not entries[0].is_symlink
    assert store.read_bytes("a.bin") == b"uno"
    assert not list((tmp_path / "root").rglob("*.tmp"))  # no temp files left behind
    assert store.list_dirs() == ["b"]  # symlinked folders are not drops


def test_local_refuses_keys_that_escape_the_root(tmp_path):
    with pytest.raises(StorageError, match="escapes"):
        LocalStore(tmp_path).read_bytes("../etc/passwd")


def test_failed_local_write_leaves_old_content(tmp_path, monkeypatch):
    root = tmp_path / "root"
    store = LocalStore(root)
    store.write_bytes("t.bin", b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        store.write_bytes("t.bin", b"new")
    assert store.read_bytes("t.bin") == b"old"
    assert sorted(p.name for p in root.iterdir()) == ["t.bin"]


def test_store_from_uri():
    assert isinstance(store_from_uri("/tmp/x"), LocalStore)
    s3 = store_from_uri("s3://bucket/some/prefix", endpoint_url="http://127.0.0.1:1")
    assert (s3.bucket, s3.prefix, s3.uri("k")) == (
        "bucket",
        "some/prefix",
        "s3://bucket/some/prefix/k",
    )
    with pytest.raises(StorageError, match="no bucket"):
        store_from_uri("s3:///nobucket")


@pytest.mark.s3
def test_s3_roundtrip_on_a_real_endpoint(s3_env, s3_bucket):
    store = S3Store(s3_bucket, "cvops/root", "us-east-1", s3_env)
    store.check()
    store.write_bytes("drops/d1/_SUCCESS", b"")
    store.write_bytes("drops/d1/a.png", b"png")
    store.write_bytes("drops/d2/b.png", b"png2")
    assert store.read_bytes("drops/d1/a.png") == b"png"
    assert store.exists("drops/d1/a.png") and not store.exists("drops/d1/zzz.png")
    assert [e.key for e in store.list("drops")] == [
        "drops/d1/_SUCCESS",
        "drops/d1/a.png",
        "drops/d2/b.png",
    ]
    assert store.child("drops").list_dirs() == ["d1", "d2"]
    with pytest.raises(FileNotFoundError, match="s3://"):
        store.read_bytes("missing.png")


@pytest.mark.s3
def test_large_tables_travel_as_files_on_a_real_endpoint(s3_env, s3_bucket, tmp_path):
    """A table written a row group at a time goes up and comes back as a file, never as one
    bytes object: what raw_images does with a drop's manifest on S3."""
    from cvops_pipelines.core.base.tables import table_file

    store = S3Store(s3_bucket, "cvops/root", "us-east-1", s3_env)
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(9 * 2**20))  # above boto3's multipart threshold (8 MiB)
    store.put_file("tables/big.bin", local)
    assert store.size("tables/big.bin") == local.stat().st_size
    store.get_file("tables/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()

    written = _table(tmp_path / "t.parquet", 25, group_rows=10)
    store.put_file("tables/t.parquet", written.path)
    fetched = table_file(store, "tables/t.parquet")
    assert fetched.rows == 25 and fetched.path != written.path
    assert fetched.read().equals(written.read())
    folder = fetched.path.parent
    del fetched
    assert not folder.exists()  # the downloaded copy goes with its handle


def _table(path, rows: int, group_rows: int):
    import pyarrow as pa

    from cvops_pipelines.core.base.tables import TableWriter

    writer = TableWriter(path, pa.schema([("n", pa.int64()), ("name", pa.string())]), group_rows)
    for n in range(rows):
        writer.add({"n": n, "name": f"image-{n}"})
    return writer.close()


def test_a_table_is_written_and_read_one_row_group_at_a_time(tmp_path):
    import pyarrow.parquet as pq

    written = _table(tmp_path / "t.parquet", 25, group_rows=10)
    assert written.rows == 25 and pq.ParquetFile(written.path).num_row_groups == 3
    chunks = list(written.chunks(rows=4))
    assert max(len(c) for c in chunks) == 4
    assert [n for c in chunks for n in c["n"]] == list(range(25))
    empty = _table(tmp_path / "e.parquet", 0, group_rows=10)
    assert empty.rows == 0 and list(empty.read().columns) == ["n", "name"]

    local = LocalStore(tmp_path / "store")
    local.put_file("tables/t.parquet", written.path)
    assert local.read_bytes("tables/t.parquet") == written.path.read_bytes()
    assert not list((tmp_path / "store").rglob("*.tmp"))


@pytest.mark.s3
def test_s3_missing_bucket_names_bucket_and_endpoint(s3_env):
    store = S3Store("no-such-bucket", "", "us-east-1", s3_env)
    with pytest.raises(StorageError) as err:
        store.check()
    assert "no-such-bucket" in str(err.value) and s3_env in str(err.value)
    with pytest.raises(StorageError, match="does not exist"):
        store.write_bytes("k", b"x")


def test_s3_unreachable_endpoint_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    from cvops_pipelines_tests.helpers import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store("bucket", "", "us-east-1", endpoint)
    with pytest.raises(StorageError, match="cannot reach S3 endpoint"):
        store.read_bytes("k")


@pytest.mark.s3
def test_s3_access_denied_on_a_real_endpoint_names_bucket_and_endpoint(monkeypatch):
    """moto with IAM auth on: after the bucket is created, unknown keys are refused (403)."""
    import subprocess
    import sys

    from cvops_pipelines_tests.helpers import free_port, wait_for_port

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="locked"
        )
        store = S3Store("locked", "", "us-east-1", endpoint)
        for action in (
            store.check,
            lambda: store.write_bytes("k", b"x"),
            lambda: list(store.list()),
        ):
            with pytest.raises(StorageError) as err:
                action()
            assert f"bucket 'locked' at endpoint {endpoint}" in str(err.value)
            assert "denied access" in str(err.value)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_s3_access_denied_message(monkeypatch):
    client = boto3.client(
        "s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    store = S3Store("locked", "", "us-east-1", "http://minio.internal:9000")
    monkeypatch.setattr(S3Store, "client", property(lambda self: client))
    with Stubber(client) as stub:
        stub.add_client_error("put_object", "AccessDenied", "Access Denied", 403)
        with pytest.raises(StorageError) as err:
            store.write_bytes("k", b"x")
    assert "bucket 'locked' at endpoint http://minio.internal:9000 denied access" in str(err.value)


def test_a_writer_killed_mid_write_leaves_no_temp_file_for_good(tmp_path):
    """Item 16 of the third trust round: a kill -9 between the temp file and its rename leaves
    the temp file; the store counts it, and the next write to its folder removes it."""
    import signal
    import subprocess
    import sys
    import time

    from cvops_pipelines.core.base import store as store_module

    root = tmp_path / "store"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from cvops_pipelines.core.base.store import LocalStore\n"
            "def stall(f):\n"
            "    f.write(b'half'); f.flush(); print('writing', flush=True); time.sleep(600)\n"
            f"LocalStore({str(root)!r})._atomic('images/ab/x.png', stall, True)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    time.sleep(0.1)
    store = LocalStore(root)
    (orphan,) = store.orphans()
    assert orphan.parent == root / "images" / "ab" and orphan.read_bytes() == b"half"
    assert list(store.list()) == []  # hidden from listings, but counted above
    store_module._MADE_DIRS.discard(orphan.parent)  # as in a fresh process (the rerun)
    store.write_bytes("images/ab/y.png", b"whole")
    assert store.orphans() == [] and not orphan.exists()
    assert [e.key for e in store.list()] == ["images/ab/y.png"]
    live = root / "images" / "ab" / f".z.png.{os.getpid()}.0.tmp"  # a live writer's: kept
    live.write_bytes(b"in progress")
    store_module._MADE_DIRS.discard(live.parent)
    store.write_bytes("images/ab/w.png", b"whole")
    assert live.exists() and store.orphans() == []


def test_id_patterns_match_the_whole_string():
    """Item 17: `$` matches before a trailing newline; every id pattern refuses one."""
    from cvops_pipelines.core.ingest.drops import VALID_DROP_NAME
    from cvops_pipelines.edge import wire

    assert wire.RELEASE_ID.match("rel-1") and not wire.RELEASE_ID.match("rel-1\n")
    for pattern, good in [
        (wire.BATCH_ID, "cam-1-b000001"),
        (wire.DEVICE_ID, "cam-1"),
        (VALID_DROP_NAME, "drop-1"),
    ]:
        assert pattern.match(good) and not pattern.match(good + "\n")
    assert wire.device_of_batch("cam-1-b000001") == "cam-1"
    assert wire.device_of_batch("cam-1-b000001\n") is None
    assert wire.device_of_record("cam-1-00000001\n") is None
