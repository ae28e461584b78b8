"""End-to-end demo wall time, and the share of it spent outside stage compute.

Runs `cvops-demo` (both turns of the loop) in a fresh CVOPS_HOME and DAGSTER_HOME. Stage compute =
the Dagster step durations of every run (asset bodies, their IO and checks) + the stage work done
outside Dagster (demo data rendering, fleet simulation, the oracle, the replay). Orchestration
overhead = wall time - stage compute: run setup, event log writes, sensor ticks, process start-up.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="cvops-demo-bench-") as tmp:
        env = {**os.environ, "CVOPS_HOME": f"{tmp}/cvops", "DAGSTER_HOME": f"{tmp}/dagster"}
        env.pop("CVOPS_DROPS", None)
        timings = Path(tmp) / "timings.json"
        proc = subprocess.run(
            [sys.executable, "-m", "cvops_pipelines.demo", "--timings", str(timings)],
            env=env,
            capture_output=True,
            text=True,
        )
        summary = [
            line
            for line in proc.stdout.splitlines()
            if line.startswith(("   replay", "            rel-", "   result", "   time"))
        ]
        result = json.loads(timings.read_text()) if timings.exists() else {}
    return {
        "exit_code": proc.returncode,
        **result,
        "target_orchestration_share": 0.10,
        "summary": summary,
    }
