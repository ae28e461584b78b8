"""The operator's own record of signed versions, in a real Dagster instance (SQLite)."""

from dagster import DagsterInstance

from cvops_pipelines.core.base.ledger import (
    MAX_VERSION,
    MemoryLedger,
    clock_version,
    instance_ledger,
    next_version,
    valid_version,
)
from cvops_pipelines.core.base.store import LocalStore


def test_the_record_survives_the_process_and_is_kept_per_store(tmp_path):
    home = tmp_path / "dagster"
    home.mkdir()
    one, two = LocalStore(tmp_path / "loop-a"), LocalStore(tmp_path / "loop-b")
    with DagsterInstance.local_temp(str(home)) as instance:
        first = next_version(instance_ledger(instance, one), "channel:stable")
        assert first >= clock_version() - 60_000_000
    with DagsterInstance.local_temp(str(home)) as instance:  # a new process, the same instance
        ledger = instance_ledger(instance, one)
        assert ledger.highest("channel:stable") == first
        assert next_version(ledger, "channel:stable") > first
        assert instance_ledger(instance, two).highest("channel:stable") == 0  # another loop
        ledger.raise_to("channel:stable", 5)  # never lowered
        assert ledger.highest("channel:stable") > first


def test_new_numbers_follow_signed_versions_and_refuse_ones_beyond_the_clock():
    ledger = MemoryLedger()
    far = clock_version() + 10**12
    assert next_version(ledger, "x", far) == far + 1  # a verified document the key signed
    assert not valid_version(clock_version() + 10**12)  # beyond a day ahead: not ours
    assert not valid_version(True) and not valid_version(-1) and not valid_version(MAX_VERSION + 1)
    assert valid_version(7) and valid_version(clock_version())
