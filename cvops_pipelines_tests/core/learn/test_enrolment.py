"""Feedback is bound to the device that sent it: enrolments signed by the release key, batches
signed by the device, record ids namespaced by device, corrections only of one's own records.
Each attack below was accepted before devices had identities, and overwrote dev-001's labels."""

import json
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cvops_pipelines.core.base.contracts import validate
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.learn.enrolment import enrol_device, read_register
from cvops_pipelines.core.learn.feedback import BatchBounds, vet_batches
from cvops_pipelines.edge.identity import public_pem
from cvops_pipelines.edge.wire import batch_key, enrolment_key, enrolment_signature_key
from cvops_pipelines_tests.core.learn.test_learn import device_batch
from cvops_pipelines_tests.helpers import Fleet, rezip
from cvops_pipelines_tests.reference import resolve_records

CLASSES = [str(d) for d in range(10)]


def _records_as(batch: str, device: str | None = None):
    """Rewrite records.jsonl as if it belonged to `batch` (and claimed `device`)."""

    def change(files):
        rows = [json.loads(line) for line in files["records.jsonl"].decode().splitlines()]
        for row in rows:
            row["batch_id"] = batch
            row["device_id"] = device or row["device_id"]
        files["records.jsonl"] = "\n".join(json.dumps(r) for r in rows).encode()

    return change


def _only_corrections(batch: str, record_ids: list[str], label: str):
    def change(files):
        fixes = [
            {
                "record_id": r,
                "corrected_label": label,
                "corrected_at": "2030-01-01T00:00:00+00:00",
                "batch_id": batch,
            }
            for r in record_ids
        ]
        files["records.jsonl"] = b""
        files["corrections.jsonl"] = "\n".join(json.dumps(f) for f in fixes).encode()
        for name in [n for n in files if n.startswith("images/")]:
            del files[name]

    return change


@pytest.fixture
def field(tmp_path, repo_root):
    store = LocalStore(tmp_path / "store")
    fleet = Fleet(store, "dev-001", "dev-002", "dev-003")
    victim, payload, ids, _ = device_batch(tmp_path, device="dev-001")
    fleet.upload(victim, payload)
    suite = repo_root / "data_contracts/gx/feedback.json"
    params = {"known_releases": ["rel-1-abc"], "classes": CLASSES}

    def vet(batches):
        return vet_batches(
            store,
            [victim, *batches],
            CLASSES,
            lambda records, label: validate(records, suite, params),
            fleet.register(),
        )

    return store, fleet, victim, payload, ids, vet


def test_an_enrolled_device_s_signed_batch_is_accepted(field):
    store, fleet, victim, payload, ids, vet = field
    vetted = vet([])
    assert vetted.accepted == [victim] and vetted.quarantined.empty
    labels = dict(
        zip(*resolve_records(vetted.records())[["record_id", "corrected_label"]].T.values)
    )
    assert labels[ids[0]] == "1" and labels[ids[1]] == "7"


@pytest.mark.parametrize(
    "attack, code",
    [
        ("unenrolled name", "unknown_device"),
        ("no device in the name", "unattributed_batch"),
        ("another device's records", "foreign_record"),
        ("claims to be the victim device in the records", "foreign_record"),
        ("corrections of another device's records", "foreign_record"),
        ("signed by a stranger", "bad_signature"),
        ("no signature", "unsigned_batch"),
        ("revoked device", "revoked_device"),
    ],
)
def test_a_batch_speaking_for_another_device_is_quarantined_and_changes_nothing(
    field, attack, code
):
    store, fleet, victim, payload, ids, vet = field
    stranger = Ed25519PrivateKey.generate()
    if attack == "unenrolled name":
        batch = "evil-b000001"
        fleet.upload(batch, rezip(payload, _records_as(batch)), signer=stranger)
    elif attack == "no device in the name":
        batch = "evil"
        fleet.upload(batch, rezip(payload, _records_as(batch)), signer=stranger)
    elif attack == "another device's records":
        batch = "dev-002-b000001"  # dev-002 is enrolled and signs: its key, dev-001's record ids
        fleet.upload(batch, rezip(payload, _records_as(batch)))
    elif attack == "claims to be the victim device in the records":
        batch = "dev-002-b000001"
        fleet.upload(batch, rezip(payload, _records_as(batch, device="dev-001")))
    elif attack == "corrections of another device's records":
        batch = "dev-002-b000001"
        fleet.upload(batch, rezip(payload, _only_corrections(batch, ids, "3")))
    elif attack == "signed by a stranger":
        batch = "dev-001-b000002"
        fleet.upload(batch, rezip(payload, _only_corrections(batch, ids, "3")), signer=stranger)
    elif attack == "no signature":
        batch = "dev-001-b000002"
        store.write_bytes(batch_key(batch), rezip(payload, _only_corrections(batch, ids, "3")))
    else:
        batch = "dev-003-b000001"
        enrol_device(store, fleet.release_key, "dev-003", b"", "test operator", revoked=True)
        fleet.upload(batch, rezip(payload, _only_corrections(batch, ["dev-003-00000001"], "3")))

    vetted = vet([batch])
    assert vetted.accepted == [victim]
    (row,) = vetted.quarantined.itertuples()
    assert row.batch_id == batch and row.reason_code == code, row.reason
    assert store.exists(f"quarantine/feedback/{batch}.zip")  # kept for the operator, not dropped
    labels = resolve_records(vetted.records()).set_index("record_id")["corrected_label"]
    assert labels[ids[0]] == "1" and labels[ids[1]] == "7"  # the victim's labels stand


def test_an_upload_larger_than_a_batch_can_be_is_refused_unread(field, monkeypatch):
    store, fleet, victim, payload, ids, vet = field
    fleet.upload("dev-002-b000001", rezip(payload, _records_as("dev-002-b000001")))
    read, original = [], LocalStore.read_bytes
    monkeypatch.setattr(
        LocalStore, "read_bytes", lambda self, key: read.append(key) or original(self, key)
    )
    vetted = vet_batches(
        store,
        ["dev-002-b000001"],
        CLASSES,
        lambda records, label: SimpleNamespace(success=True, failures=[]),
        fleet.register(),
        bounds=BatchBounds(max_upload_bytes=len(payload) // 2),
    )
    (row,) = vetted.quarantined.itertuples()
    assert row.reason_code == "batch_too_large"
    assert "feedback/batches/dev-002-b000001.zip" not in read


def test_the_register_takes_only_enrolments_the_release_key_signed(tmp_path):
    store = LocalStore(tmp_path)
    release, forger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    device = Ed25519PrivateKey.generate()
    enrol_device(store, release, "cam-1", public_pem(device), "operator")
    enrol_device(store, forger, "cam-2", public_pem(device), "someone with store access")
    store.write_bytes(enrolment_key("cam-3"), b'{"device_id": "cam-3"}')  # no signature at all
    body = json.dumps({"device_id": "cam-1", "public_key": None, "revoked": False}).encode()
    store.write_bytes(enrolment_key("cam-4"), body)  # signed, but names another device
    store.write_bytes(enrolment_signature_key("cam-4"), release.sign(body))

    garbage = json.dumps(
        {"device_id": "cam-6", "public_key": "not a key", "revoked": False}
    ).encode()
    store.write_bytes(enrolment_key("cam-6"), garbage)  # signed, but its key does not load
    store.write_bytes(enrolment_signature_key("cam-6"), release.sign(garbage))

    register = read_register(store, [release.public_key()])
    assert set(register.keys) == {"cam-1"}
    problems = " | ".join(register.problems)
    assert "cam-2.json: not signed by the release key" in problems
    assert "cam-3.json: no signature" in problems and "cam-4.json: malformed" in problems
    assert "cam-6.json: malformed enrolment (its public key is not a PEM" in problems
    with pytest.raises(ValueError, match="not a PEM public key"):
        enrol_device(store, release, "cam-5", b"not a key", "operator")
    with pytest.raises(ValueError, match="not a valid device id"):
        enrol_device(store, release, "../cam", public_pem(device), "operator")
    assert read_register(store, []).problems == [
        "no release key is configured: no device can be enrolled"
    ]


def test_a_revocation_cannot_be_undone_by_restoring_the_old_enrolment(tmp_path):
    """Item 7 of the third trust round: enrolments are numbered, and the pipeline's own record
    (the ledger, outside the store) refuses an older one replayed; rotation keeps it revoked."""
    from cvops_pipelines.core.base.ledger import MemoryLedger
    from cvops_pipelines.core.ship import keys
    from cvops_pipelines.core.ship.release import generate_keypair, load_private_key

    store, ledger = LocalStore(tmp_path / "store"), MemoryLedger()
    key_path, _ = generate_keypair(tmp_path / "keys")
    release, device = load_private_key(key_path), Ed25519PrivateKey.generate()
    enrol_device(store, release, "cam-1", public_pem(device), "operator", ledger=ledger)
    old = (
        store.read_bytes(enrolment_key("cam-1")),
        store.read_bytes(enrolment_signature_key("cam-1")),
    )
    assert "cam-1" in read_register(store, [release.public_key()], ledger).keys
    enrol_device(store, release, "cam-1", b"", "operator", revoked=True, ledger=ledger)
    assert "cam-1" in read_register(store, [release.public_key()], ledger).revoked

    store.write_bytes(enrolment_key("cam-1"), old[0])  # the store writer's restore
    store.write_bytes(enrolment_signature_key("cam-1"), old[1])
    register = read_register(store, [release.public_key()], ledger)
    assert "cam-1" not in register.keys
    assert "replayed enrolment" in register.refused["cam-1"]
    with pytest.raises(Exception, match="refused_enrolment"):
        register.check("cam-1-b000001", b"batch", device.sign(b"batch"))

    root_path, _ = generate_keypair(tmp_path / "offline", "root")
    keys.delegate(store, load_private_key(root_path), [keys.pem(release)], ledger=ledger)
    keys.rotate(store, load_private_key(root_path), key_path, "test", False, ledger)
    rotated = read_register(store, [load_private_key(key_path).public_key()], ledger)
    assert "cam-1" not in rotated.keys  # the rotation did not re-sign the replay as active
    # the ledger's record of a revocation outlives the store's copy: a second pipeline process
    # with the same record (the Dagster instance) refuses the replay as well
    assert ledger.highest("enrolment:cam-1") > 0


def _rewrite_line(batch: str, line: int, text_of):
    """The records as `batch`'s device's own, with line `line` (0-based) replaced by
    `text_of(row)`: raw JSON text, so values json.dumps would never write (huge integers, NaN)
    are sent as a device could."""

    device = batch.rsplit("-b", 1)[0]

    def change(files):
        rows = [json.loads(x) for x in files["records.jsonl"].decode().splitlines()]
        rows = [
            {**r, "batch_id": batch, "device_id": device, "record_id": f"{device}-{i + 1:08d}"}
            for i, r in enumerate(rows)
        ]
        lines = [json.dumps(r) for r in rows]
        lines[line] = text_of(rows[line])
        files["records.jsonl"] = "\n".join(lines).encode()

    return change


def _with(field_name: str, raw: str):
    """A row's JSON with `field_name` set to the raw JSON text `raw`."""
    return lambda row: json.dumps({**row, field_name: "@@"}).replace('"@@"', raw)


@pytest.mark.parametrize(
    "raw_field, raw",
    [
        ("confidence", "1" * 5000),  # Python refuses to convert it: ValueError on main
        ("confidence", "1e400"),  # inf
        ("confidence", "NaN"),
        ("boxes", '[{"label": "1", "score": 0.5, "box": [0, 0, ' + "9" * 401 + ", 5]}]"),
        ("top_k", '[["1", 1e999]]'),
    ],
)
def test_one_unbounded_value_quarantines_its_batch_alone(field, raw_field, raw):
    """Item 6: a value of any size stops only its own batch; the batch beside it is ingested."""
    store, fleet, victim, payload, ids, vet = field
    batch = "dev-002-b000001"
    fleet.upload(batch, rezip(payload, _rewrite_line(batch, 0, _with(raw_field, raw))))
    vetted = vet([batch])
    assert vetted.accepted == [victim]
    (row,) = vetted.quarantined.itertuples()
    assert row.batch_id == batch and row.reason_code == "malformed_record", row.reason
    assert "line 1" in row.reason


@pytest.mark.parametrize(
    "raw_field, raw, code",
    [
        ("confidence", "10", "invalid_value"),
        ("confidence", str(10**400)[:18], "invalid_value"),  # large, still an int64
        ("top_k", '[["1", 7.5]]', "invalid_value"),
        ("boxes", '[{"label": "1", "score": 7.5, "box": [0, 0, 5, 5]}]', "invalid_box"),
        ("boxes", '[{"label": "", "score": 0.5, "box": [0, 0, 5, 5]}]', "invalid_box"),
        ("corrected_boxes", '[{"label": "1", "box": [5, 5, 0, 0]}]', "invalid_box"),
        ("corrected_boxes", '[{"label": "1", "box": [0, 0, 5000, 5]}]', "invalid_box"),
    ],
)
def test_a_record_with_a_bad_value_is_turned_away_alone(field, raw_field, raw, code):
    """Items 6 and 12: the record goes, with its reason and a quarantine note; the batch's other
    records (and the batch beside it) go on."""
    store, fleet, victim, payload, ids, vet = field
    batch = "dev-002-b000001"
    fleet.upload(batch, rezip(payload, _rewrite_line(batch, 0, _with(raw_field, raw))))
    vetted = vet([batch])
    assert vetted.accepted == [victim, batch] and vetted.quarantined.empty
    (row,) = vetted.refused_records.itertuples()
    assert row.record_id == "dev-002-00000001" and row.reason_code == code, row.reason
    kept = set(vetted.records()["record_id"])
    assert "dev-002-00000001" not in kept and "dev-002-00000002" in kept
    assert vetted.summary()["refused_records"] == 1
    note = json.loads(store.read_bytes(f"quarantine/feedback/{batch}.records.json"))
    assert note[0]["record_id"] == "dev-002-00000001"


def test_a_signed_batch_counts_once_whatever_its_name(field):
    """Item 8: the same bytes and signature re-sent under a new name are refused."""
    store, fleet, victim, payload, ids, vet = field
    first = "dev-001-b000002"
    fixes = rezip(payload, _only_corrections(first, ids[:1], "3"))
    fleet.upload(first, fixes)
    signature = store.read_bytes(f"feedback/batches/{first}.zip.sig")
    replay = "dev-001-b000003"
    store.write_bytes(batch_key(replay), fixes)
    store.write_bytes(f"feedback/batches/{replay}.zip.sig", signature)
    vetted = vet([first, replay])
    assert vetted.accepted == [victim, first]
    (row,) = vetted.quarantined.itertuples()
    assert row.batch_id == replay and row.reason_code == "batch_id_mismatch", row.reason


def test_a_store_that_is_down_fails_the_run_instead_of_blaming_a_batch(field, monkeypatch):
    """The catch-all quarantines a batch that breaks the parser; a store that refuses us is no
    batch's fault: the run fails with the store's message and nothing is quarantined."""
    from cvops_pipelines.core.base.store import StorageError

    store, fleet, victim, payload, ids, vet = field

    def down(self, key):
        raise StorageError(f"s3://bucket/{key}: endpoint unreachable")

    monkeypatch.setattr(LocalStore, "read_bytes", down)
    with pytest.raises(StorageError, match="unreachable"):
        vet([])
    monkeypatch.undo()
    assert not list(store.list("quarantine/"))
