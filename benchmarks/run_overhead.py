"""What a Dagster run costs beyond its steps on the local instance: Dagster's own `storage:
sqlite` against the storage infra/dagster/dagster.yaml configures (`defs/storage.py`: engines kept
open, new run shards copied from an empty one).

A job of two assets and an asset check, each step trivial, run in process against a
fresh instance of each kind, in its own subprocess; the arms alternate, so drift in the machine's
speed hits both. Reported: median run wall time per arm and round, and their ratio.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STOCK_YAML = (
    "telemetry:\n  enabled: false\nstorage:\n  sqlite:\n    base_dir:\n      env: DAGSTER_HOME\n"
)

ONE_ARM = """
import json, statistics, sys, time
import dagster as dg

@dg.asset
def numbers(context):
    context.log.info("counting")
    return 1

@dg.asset
def doubled(numbers):
    return 2 * numbers

@dg.asset_check(asset=doubled)
def doubled_is_even(doubled):
    return dg.AssetCheckResult(passed=doubled % 2 == 0)

job = dg.Definitions(assets=[numbers, doubled], asset_checks=[doubled_is_even])
job = job.resolve_implicit_global_asset_job_def()
instance = dg.DagsterInstance.get()
walls, events = [], 0
for i in range(int(sys.argv[1])):
    started = time.perf_counter()
    result = job.execute_in_process(instance=instance)
    walls.append(time.perf_counter() - started)
    assert result.success
events = len(instance.all_logs(result.run_id))
print(json.dumps({"median_s": statistics.median(walls[2:]), "events_per_run": events}))
"""


def _arm(stock: bool, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        yaml = STOCK_YAML if stock else (ROOT / "infra/dagster/dagster.yaml").read_text()
        Path(home, "dagster.yaml").write_text(yaml)
        env = {**os.environ, "DAGSTER_HOME": home, "DAGSTER_DISABLE_TELEMETRY": "1"}
        out = subprocess.run(
            [sys.executable, "-c", ONE_ARM, str(runs)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    rounds, runs = (1, 5) if quick else (3, 22)
    arms = {"dagster_sqlite": [], "pooled_sqlite": []}
    events = {}
    for _ in range(rounds):
        for name in arms:
            measured = _arm(name == "dagster_sqlite", runs)
            arms[name].append(round(measured["median_s"], 4))
            events[name] = measured["events_per_run"]
    stock, pooled = (statistics.median(arms[n]) for n in arms)
    return {
        "runs_per_round": runs,
        "median_run_wall_s": arms,
        "events_per_run": events,
        "pooled_over_dagster": round(pooled / stock, 3),
        "target": "none: the loop's orchestration share (loop_latency) is what this serves",
    }
