"""Key rotation through a root key: devices pin the root, the root delegates release keys in
`releases/keys.json`; a rotation keeps the fleet updating without touching a device, and a
revoked release key (a leak) can sign nothing the fleet will run, not even a replayed past."""

import pytest

from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.ship import keys
from cvops_pipelines.core.ship.release import ReleaseStore, generate_keypair, load_private_key
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
    assert second.delegation_version == first.delegation_version + 1
    result = device.sync()  # r2 was re-signed by the newest key: re-activated from held files
    assert result.status == "updated" and result.downloaded_bytes == 0
    assert device.release == r2.id

    # what the leaked key signs is refused, however new it claims to be
    c.write_channel("stable", c.channel_doc(r1.id, version=10_000), signed=False)
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
    root_path, _ = generate_keypair(tmp_path / "offline", "root")
    stranger, _ = generate_keypair(tmp_path / "other")
    keys.delegate(store, load_private_key(root_path), [keys.pem(load_private_key(stranger))])
    with pytest.raises(keys.KeyNotDelegated, match="cvops keys delegate"):
        keys.signing_key(store, key_path)
