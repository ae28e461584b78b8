"""The `cvops` console script, run as a user runs it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CVOPS = str(Path(sys.executable).parent / "cvops")


def test_help_lists_every_command_and_the_environment():
    out = subprocess.run([CVOPS, "--help"], capture_output=True, text=True, check=True).stdout
    for word in (
        "ingest",
        "drops",
        "status",
        "keygen",
        "enrol",
        "keys",
        "fleet",
        "CVOPS_HOME",
        "CVOPS_S3_ENDPOINT_URL",
        "MLFLOW_TRACKING_URI",
        "CVOPS_SIGNING_KEY",
    ):
        assert word in out
    assert " demo " not in out  # the demo is not an operator command
    demo = subprocess.run(
        [str(Path(CVOPS).parent / "cvops-demo"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for word in (
        "--seed",
        "--turns",
        "--explore-share",
        "--init-from",
        "--data-only",
        "CVOPS_HOME",
    ):
        assert word in demo
    edge = subprocess.run(
        [str(Path(CVOPS).parent / "cvops-edge"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for word in (
        "identity",
        "sync",
        "predict",
        "upload",
        "run",
        "--public-key",
        "CVOPS_EDGE_STORE",
    ):
        assert word in edge


def test_keygen_refuses_to_overwrite_a_key(tmp_path):
    env = {**os.environ, "CVOPS_HOME": str(tmp_path / "home")}
    first = subprocess.run([CVOPS, "keygen"], env=env, capture_output=True, text=True)
    assert first.returncode == 0 and "never commit" in first.stdout
    again = subprocess.run([CVOPS, "keygen"], env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def _in(home: Path):
    """`cvops ...` as a user runs it, with CVOPS_HOME at `home`."""
    env = {**os.environ, "CVOPS_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    return lambda *args: subprocess.run([CVOPS, *args], env=env, capture_output=True, text=True)


def test_a_device_prints_its_key_and_the_operator_enrols_and_revokes_it(tmp_path):
    from cvops_pipelines.core.base.store import LocalStore
    from cvops_pipelines.core.learn.enrolment import read_register
    from cvops_pipelines.core.ship.release import load_private_key

    home = tmp_path / "home"
    edge = str(Path(CVOPS).parent / "cvops-edge")
    state = ["--state", str(tmp_path / "cam-1"), "--device-id", "cam-1"]
    pem = subprocess.run([edge, *state, "identity"], capture_output=True, check=True).stdout
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    again = subprocess.run([edge, *state, "identity"], capture_output=True, check=True).stdout
    assert again == pem  # made once, then kept
    (tmp_path / "cam-1.pub").write_bytes(pem)
    cvops = _in(home)

    no_key = cvops("enrol", "cam-1", "--public-key", str(tmp_path / "cam-1.pub"))
    assert no_key.returncode == 2 and "cvops keygen" in no_key.stderr
    cvops("keygen")
    enrolled = cvops("enrol", "cam-1", "--public-key", str(tmp_path / "cam-1.pub"))
    assert enrolled.returncode == 0, enrolled.stderr
    trusted = [load_private_key(home / "keys" / "release_signing.key").public_key()]
    assert set(read_register(LocalStore(home), trusted).keys) == {"cam-1"}
    assert cvops("enrol", "cam-2").returncode == 2  # no key given
    assert cvops("enrol", "cam-1", "--revoke").returncode == 0
    register = read_register(LocalStore(home), trusted)
    assert register.revoked == {"cam-1"} and not register.keys


def test_root_key_delegation_and_rotation_from_the_command_line(tmp_path):
    home = tmp_path / "home"
    cvops = _in(home)
    assert cvops("keygen").returncode == 0
    root = cvops("keygen", "--root", "--out", str(tmp_path / "offline"))
    assert root.returncode == 0 and "OFF this machine" in root.stdout
    root_key = str(tmp_path / "offline" / "root.key")
    assert "no root delegation" in cvops("keys", "show").stdout
    assert cvops("keys", "delegate").returncode == 2  # the root key is required
    delegated = cvops("keys", "delegate", "--root-key", root_key)
    assert delegated.returncode == 0, delegated.stderr
    first = int(re.search(r"version (\d+)", delegated.stdout)[1])
    before = (home / "keys" / "release_signing.pub").read_bytes()
    rotated = cvops("keys", "rotate", "--root-key", root_key, "--revoke-old")
    assert rotated.returncode == 0, rotated.stderr
    second = int(re.search(r"delegation version (\d+)", rotated.stdout)[1])
    assert second > first and "revoked" in rotated.stdout
    assert (home / "keys" / "release_signing.pub").read_bytes() != before
    assert len(list((home / "keys").glob("release_signing.key.retired-*"))) == 1
    # the pipeline reads the delegation only as the root signed it: it needs the root's public key
    assert "no root delegation" in cvops("keys", "show").stdout
    (home / "keys" / "root.pub").write_bytes((tmp_path / "offline" / "root.pub").read_bytes())
    shown = cvops("keys", "show").stdout
    assert f"version {second}" in shown and "1 release key(s)" in shown


def test_ingest_of_a_missing_drop_fails_clearly(tmp_path):
    env = {
        **os.environ,
        "CVOPS_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(tmp_path / "dagster"),
    }
    proc = subprocess.run(
        [CVOPS, "ingest", "nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "drop 'nope'" in proc.stderr and "does not exist" in proc.stderr
    (tmp_path / "home/drops/half").mkdir(parents=True)
    proc = subprocess.run(
        [CVOPS, "ingest", "half"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "no _SUCCESS marker yet" in proc.stderr


def test_ingest_applies_the_drop_rules_of_the_sensor(tmp_path):
    """A symlinked folder, names `cvops drops` calls invalid, paths and the source root itself
    are refused with a message, before anything is read or stored."""
    home, outside = tmp_path / "home", tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    (outside / "secret" / "passwords.txt").write_text("hunter2")
    (outside / "secret" / "_SUCCESS").write_text("")
    drops = home / "drops"
    drops.mkdir(parents=True)
    (drops / "linked").symlink_to(outside / "secret", target_is_directory=True)
    (drops / "a b").mkdir()
    (drops / "a b" / "_SUCCESS").write_text("")
    (drops / "_SUCCESS").write_text("")  # a stray marker at the root
    env = {**os.environ, "CVOPS_HOME": str(home), "DAGSTER_HOME": str(tmp_path / "dagster")}
    for drop, why in (
        ("linked", "does not exist as a folder"),
        ("a b", "is not valid"),
        ("..", "is not valid"),
        ("sub/inner", "is not valid"),
        (".", "is not valid"),
    ):
        proc = subprocess.run(
            [CVOPS, "ingest", drop],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and why in proc.stderr, (drop, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr
    assert not (home / "quarantine").exists() and not (home / "images").exists()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--turns", "0"], "at least one turn"),
        (["--explore-share", "1.5"], "between 0 and 1"),
        (["--task", "detection", "--turns", "3"], "detection demo runs its two turns"),
    ],
)
def test_demo_refuses_turns_and_shares_it_cannot_run(argv, says, capsys):
    """Refused before anything runs: a usage error naming the option, exit code 2."""
    from cvops_pipelines.demo.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and says in capsys.readouterr().err
