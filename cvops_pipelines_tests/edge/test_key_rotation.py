"""Key rotation through a root key: devices pin the root, the root delegates release keys in
`releases/keys.json`; a rotation keeps the fleet updating without touching a device, and a
revoked release key (a leak) can sign nothing the fleet will run, not even a replayed past."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from cvops_pipelines.core.base.ledger import MemoryLedger
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.ship import keys
from cvops_pipelines.core.ship.release import (
    ChannelTampered,
    ReleaseStore,
    generate_keypair,
    load_private_key,
)
from cvops_pipelines.demo.digit_model import trained_model
from cvops_pipelines.edge.agent import EdgeAgent
from cvops_pipelines_tests.edge.fleet_kit import central


@pytest.fixture(scope="module")
def models():
    return [trained_model(n=n, quality="good") for n in (300, 400, 500)]


def test_rotation_keeps_the_fleet_updating_and_revocation_locks_the_old_key_out(tmp_path, models):
    c = central(tmp_path)
    store = LocalStore(c.root)
    root_path, _ = generate_keypair(tmp_path / "offline", "root")
    root = load_private_key(root_path)
    key_path = c.key_dir / "release_signing.key"
    keys.delegate(store, root, [keys.pem(load_private_key(key_path))])
    r1 = c.release(models[0], "1")
    c.releases.point("stable", r1.id, "first", "test")
    pinned_root = (tmp_path / "offline" / "root.pub").read_bytes()
    device = EdgeAgent(tmp_path / "dev", c.remote, pinned_root, "dev-1")
    assert device.sync().status == "updated" and device.release == r1.id
    pinned_release_key = EdgeAgent(tmp_path / "old", c.remote, c.public_key, "dev-2")
    assert pinned_release_key.sync().status == "updated"  # a device set up before the root
    assert "not signed by the pinned key: ignored" in pinned_release_key.events[-1]

    # a planned rotation: a new key, the old one still trusted; nothing to do on the device
    first = keys.rotate(store, root, key_path, "test", revoke_old=False)
    assert first.channels == ["stable"] and first.manifests == 1
    assert device.sync().status == "up-to-date"
    r2 = c.release(models[1], "2", parent=r1.id)  # signed by the new key
    new_releases = ReleaseStore(store, load_private_key(key_path))
    new_releases.point("stable", r2.id, "better", "test")
    assert device.sync().status == "updated" and device.release == r2.id
    before = (
        (c.root / "releases/keys.json").read_bytes(),
        (c.root / "releases/keys.json.sig").read_bytes(),
    )

    # the new key leaks: rotate again and revoke it
    leaked = load_private_key(key_path)
    second = keys.rotate(store, root, key_path, "test", revoke_old=True)
    assert second.delegation_version > first.delegation_version
    result = device.sync()  # r2 was re-signed by the newest key: re-activated from held files
    assert result.status == "updated" and result.downloaded_bytes == 0
    assert device.release == r2.id

    # what the leaked key signs is refused, however new it claims to be
    c.write_channel("stable", c.channel_doc(r1.id), signed=False)
    (c.root / "releases/channels/stable.json.sig").write_bytes(
        leaked.sign((c.root / "releases/channels/stable.json").read_bytes())
    )
    result = device.sync()
    assert result.status == "rejected" and "not signed by a trusted key" in result.detail
    assert device.release == r2.id
    # nor can the attacker bring back the delegation that still named the leaked key
    (c.root / "releases/keys.json").write_bytes(before[0])
    (c.root / "releases/keys.json.sig").write_bytes(before[1])
    result = device.sync()
    assert result.status == "rejected" and "older than" in result.detail
    # deleting the delegation does not help either: the device holds the last one it accepted
    (c.root / "releases/keys.json").unlink()
    device.close()
    rebooted = EdgeAgent(tmp_path / "dev", c.remote, pinned_root, "dev-1")
    assert rebooted.release == r2.id
    assert rebooted.sync().status == "rejected"  # the leaked key's channel is still there

    # a new signed decision by the current key moves the fleet again
    current = ReleaseStore(store, load_private_key(key_path))
    r3 = c.release(models[2], "3", parent=r2.id)
    current.point("stable", r3.id, "after the leak", "test")
    assert rebooted.sync().status == "updated" and rebooted.release == r3.id


def test_the_pipeline_refuses_to_sign_with_a_key_the_root_does_not_vouch_for(tmp_path):
    c = central(tmp_path)
    store = LocalStore(c.root)
    key_path = c.key_dir / "release_signing.key"
    assert keys.signing_key(store, key_path)  # no root in use: the release key is the anchor
    root_path, root_pub = generate_keypair(tmp_path / "offline", "root")
    root_public = keys.root_public_key(root_pub)
    stranger, _ = generate_keypair(tmp_path / "other")
    keys.delegate(store, load_private_key(root_path), [keys.pem(load_private_key(stranger))])
    with pytest.raises(keys.KeyNotDelegated, match="cvops keys delegate"):
        keys.signing_key(store, key_path, root_public)


def _unsigned_delegation(store, release_pems: list[bytes], version: int) -> None:
    """What anyone who can write the store can put there: a keys.json the root never signed."""
    doc = {
        "release_keys": [p.decode() for p in release_pems],
        "version": version,
        "expires": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
    }
    store.write_bytes("releases/keys.json", json.dumps(doc).encode())
    store.write_bytes("releases/keys.json.sig", b"\0" * 64)


def test_a_store_writer_cannot_stop_releases_or_steer_the_numbering_of_delegations(tmp_path):
    """Items 1 and 2 of the third trust round: the pipeline reads only the delegation the root
    signed, and a new delegation is numbered from the operator's own record."""
    c = central(tmp_path)
    store = LocalStore(c.root)
    key_path = c.key_dir / "release_signing.key"
    root_path, root_pub = generate_keypair(tmp_path / "offline", "root")
    root, root_public = load_private_key(root_path), keys.root_public_key(root_pub)
    ledger = MemoryLedger()
    stranger, _ = generate_keypair(tmp_path / "other")
    old_signed = keys.delegate(store, root, [keys.pem(load_private_key(stranger))])
    older = (store.read_bytes("releases/keys.json"), store.read_bytes("releases/keys.json.sig"))
    first = keys.delegate(store, root, [keys.pem(load_private_key(key_path))], ledger=ledger)
    _unsigned_delegation(store, [keys.pem(load_private_key(stranger))], version=-1_000_000)
    # the real key still signs: an unsigned keys.json is never read
    assert keys.signing_key(store, key_path, root_public, ledger)
    releases = keys.signing_releases(store, key_path, root_pub, ledger)
    r1 = c.release(trained_model(n=300, quality="good"), "1")
    assert releases.point("stable", r1.id, "ships", "test")["release"] == r1.id
    # the next delegation follows the operator's record, not the store's -1000000
    second = keys.delegate(store, root, [keys.pem(load_private_key(key_path))], ledger=ledger)
    assert second["version"] > first["version"] > 0
    assert ledger.highest("keys") == second["version"]
    # a replayed older root-signed delegation naming another key does not stop releases either
    store.write_bytes("releases/keys.json", older[0])
    store.write_bytes("releases/keys.json.sig", older[1])
    assert keys.delegation(store, root_public, ledger) is None  # older than the record
    assert keys.signing_key(store, key_path, root_public, ledger)
    assert old_signed["version"] < ledger.highest("keys")


def test_channel_numbers_follow_the_operator_s_record_not_the_store_s_copy(tmp_path, models):
    """Item 2: a replayed older signed channel document does not make the pipeline's next
    pointer a lower version than devices have accepted."""
    c = central(tmp_path)
    store = LocalStore(c.root)
    ledger = MemoryLedger()
    releases = ReleaseStore(store, load_private_key(c.key_dir / "release_signing.key"), ledger)
    r1, r2 = c.release(models[0], "1"), c.release(models[1], "2")
    releases.point("stable", r1.id, "first", "test")
    old = (
        store.read_bytes("releases/channels/stable.json"),
        store.read_bytes("releases/channels/stable.json.sig"),
    )
    for _ in range(3):
        newest = releases.point("stable", r2.id, "again", "test")
    device = EdgeAgent(tmp_path / "dev", c.remote, c.public_key, "dev-1")
    assert device.sync().status == "updated" and device.release == r2.id
    store.write_bytes("releases/channels/stable.json", old[0])  # the replay
    store.write_bytes("releases/channels/stable.json.sig", old[1])
    with pytest.raises(ChannelTampered, match="replayed"):
        releases.channel("stable")  # the pipeline decides nothing on it
    after = releases.point("stable", r1.id, "a new decision", "test")
    assert after["version"] > newest["version"]
    assert device.sync().status == "updated" and device.release == r1.id


def test_versions_accepted_from_a_revoked_key_are_forgotten(tmp_path, models):
    """Item 3: a leaked key signs a channel at version 2**62; after a rotation that revokes it,
    the next decision moves the device again (no visit needed)."""
    c = central(tmp_path)
    store = LocalStore(c.root)
    root_path, root_pub = generate_keypair(tmp_path / "offline", "root")
    root = load_private_key(root_path)
    key_path = c.key_dir / "release_signing.key"
    ledger = MemoryLedger()
    keys.delegate(store, root, [keys.pem(load_private_key(key_path))], ledger=ledger)
    r1, r2 = c.release(models[0], "1"), c.release(models[1], "2")
    ReleaseStore(store, load_private_key(key_path), ledger).point("stable", r1.id, "1", "test")
    device = EdgeAgent(tmp_path / "dev", c.remote, root_pub.read_bytes(), "dev-1")
    assert device.sync().status == "updated"
    leaked = load_private_key(key_path)
    body = c.channel_doc(r2.id, version=2**62)
    store.write_bytes("releases/channels/stable.json.sig", leaked.sign(body))
    store.write_bytes("releases/channels/stable.json", body)
    assert device.sync().status == "updated" and device.release == r2.id  # the attacker's move
    keys.rotate(store, root, key_path, "test", revoke_old=True, ledger=ledger)
    current = ReleaseStore(store, load_private_key(key_path), ledger)
    current.point("stable", r1.id, "back after the leak", "test")
    result = device.sync()
    assert result.status == "updated" and device.release == r1.id, result.detail
    # what the device keeps for the channel is the current key's number alone
    device.close()
    rebooted = EdgeAgent(tmp_path / "dev", c.remote, root_pub.read_bytes(), "dev-1")
    assert rebooted.sync().status == "up-to-date" and rebooted.release == r1.id
    assert max(rebooted._channel_versions().values()) < 2**62
    # and no version beyond an int64 is ever accepted
    body = c.channel_doc(r2.id, version=2**64)
    c.write_channel("stable", body, signed=False)
    store.write_bytes("releases/channels/stable.json.sig", load_private_key(key_path).sign(body))
    result = rebooted.sync()
    assert result.status == "rejected" and "int64" in result.detail


def test_the_cli_refuses_delegations_that_would_brick_the_fleet(tmp_path, monkeypatch, capsys):
    """Item 4: an expired delegation, or a release key devices cannot verify, is refused before
    anything is written."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from cvops_pipelines.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("CVOPS_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.delenv("CVOPS_SIGNING_KEY", raising=False)
    monkeypatch.delenv("CVOPS_S3_BUCKET", raising=False)
    assert main(["keygen"]) == 0 and main(["keygen", "--root"]) == 0
    root_key = str(home / "keys" / "root.key")
    with pytest.raises(SystemExit) as exc:
        main(["keys", "delegate", "--root-key", root_key, "--days", "-1"])
    assert exc.value.code == 2 and "at least a day" in capsys.readouterr().err
    assert not (home / "releases" / "keys.json").exists()
    ecdsa = tmp_path / "ecdsa.key"
    ecdsa.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    monkeypatch.setenv("CVOPS_SIGNING_KEY", str(ecdsa))
    assert main(["keys", "delegate", "--root-key", root_key]) == 2
    assert "not an ed25519 key" in capsys.readouterr().err
    assert not (home / "releases" / "keys.json").exists()
    root = load_private_key(home / "keys" / "root.key")
    with pytest.raises(keys.DelegationRefused, match="ed25519"):
        keys.delegate(LocalStore(home), root, [keys.pem(ecdsa_public(ecdsa))])
    with pytest.raises(keys.DelegationRefused, match="last"):
        keys.delegate(LocalStore(home), root, [keys.pem(root)], timedelta(days=-1))
    monkeypatch.delenv("CVOPS_SIGNING_KEY")
    assert main(["keys", "delegate", "--root-key", root_key]) == 0
    assert main(["keys", "show"]) == 0
    assert "delegation version" in capsys.readouterr().out


def ecdsa_public(path):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(path.read_bytes(), None).public_key()


def test_deleting_a_channel_moves_no_device(tmp_path, models):
    """Item 5: canary devices stay on canary when canary.json is deleted; only a signed
    document naming no release retires the channel."""
    c = central(tmp_path)
    r1, r2 = c.release(models[0], "1"), c.release(models[1], "2")
    c.releases.point("stable", r1.id, "stable", "test")
    c.releases.point("canary", r2.id, "try", "test", share=0.0, cohorts=("pilot",))
    device = EdgeAgent(tmp_path / "dev", c.remote, c.public_key, "dev-1", cohort="pilot")
    assert device.sync().status == "updated" and device.release == r2.id
    (c.root / "releases/channels/canary.json").unlink()
    (c.root / "releases/channels/canary.json.sig").unlink()
    assert device.sync().status == "up-to-date" and device.release == r2.id
    assert "missing from the store" in device.events[-1]
    device.close()
    rebooted = EdgeAgent(tmp_path / "dev", c.remote, c.public_key, "dev-1", cohort="pilot")
    assert rebooted.sync().status == "up-to-date" and rebooted.release == r2.id
    fresh = EdgeAgent(tmp_path / "new", c.remote, c.public_key, "dev-2", cohort="pilot")
    assert fresh.sync().status == "updated" and fresh.release == r1.id  # it never saw canary
    c.releases.point("canary", None, "rolled back", "test")  # the signed retirement
    assert rebooted.sync().status == "updated" and rebooted.release == r1.id
