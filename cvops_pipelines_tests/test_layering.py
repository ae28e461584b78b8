"""The layering contracts (pyproject.toml, [tool.importlinter]) hold, and would catch a break."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(config: Path | None = None) -> subprocess.CompletedProcess:
    args = [str(LINT), "--no-cache", *(["--config", str(config)] if config else [])]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_layering_contracts_hold():
    proc = lint()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("KEPT") == 3 and "BROKEN" not in proc.stdout


def test_a_stage_importing_a_stage_above_it_breaks_the_contract(tmp_path):
    """The same checker on the stages in the opposite order: every real edge becomes a break."""
    config = (ROOT / "pyproject.toml").read_text()
    upside_down = '"base", "ingest", "curate", "build", "measure", "learn", "ship", "tasks"'
    config = config.replace(
        '"tasks", "ship", "learn", "measure", "build", "curate", "ingest", "base"', upside_down
    )
    assert upside_down in config
    (tmp_path / "pyproject.toml").write_text(config)
    proc = lint(tmp_path / "pyproject.toml")
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout
    assert "cvops_pipelines.core.ship is not allowed to import cvops_pipelines.core" in proc.stdout
