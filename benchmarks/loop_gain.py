"""Does the loop learn from the field, and do its guards ship only what is not worse?

Runs `cvops-demo --seed S` (two turns: train, gate, release, fleet, feedback, annotation queue,
retrain, replay gate, paired canary) in a fresh CVOPS_HOME and DAGSTER_HOME for each seed; the
seed changes the demo data split, both trainings and both fleets. Per seed, the demo's audit
scores turn 1's model and turn 2's challenger on the held-back drops (shot as the field shoots;
until the many-turns change it was every turn-2 production image) against the oracle's true
labels, which the pipeline never sees; the benchmark records which model
ended up shipped (MLflow alias champion = the stable release) and what the gate and the canary said.

Targets: the shipped model beats turn 1's by >= 2 points on average over the seeds, and in no seed
was a model shipped that is worse than the one it replaced by more than the gate's margin.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MARGIN = 0.02  # the replay gate's and the canary's default non-inferiority margin


def one_seed(seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"cvops-loop-gain-{seed}-") as tmp:
        env = {**os.environ, "CVOPS_HOME": f"{tmp}/cvops", "DAGSTER_HOME": f"{tmp}/dagster"}
        env.pop("CVOPS_DROPS", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        report_path = Path(tmp) / "report.json"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "cvops_pipelines.demo",
                "--seed",
                str(seed),
                "--report",
                str(report_path),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not report_path.exists():
            return {
                "seed": seed,
                "exit_code": proc.returncode,
                "error": proc.stdout[-1500:] + proc.stderr[-1500:],
            }
        report = json.loads(report_path.read_text())
    audit, models = report["audit"], report["turn_models"]
    first = models[0]
    second = models[1] if len(models) > 1 else None
    shipped = report["champion"]
    gate, canary = report["turns"][1]["gate"], report["turns"][1]["canary"]
    return {
        "seed": seed,
        "exit_code": proc.returncode,
        "audit_images": report["audit_images"],
        "turn1_model": first,
        "turn1_accuracy": round(audit[first], 4),
        "turn2_model": second,
        "turn2_accuracy": round(audit[second], 4) if second else None,
        "turn2_minus_turn1": round(audit[second] - audit[first], 4) if second else None,
        "gate": "refused" if gate["refused"] else "passed" if gate["trained"] else "no model",
        "gate_replay": gate.get("replay_verdict"),
        "canary": canary.get("action"),
        "canary_why": canary.get("why"),
        "shipped_model": shipped,
        "shipped_gain": round(audit[shipped] - audit[first], 4),
        "worse_shipped": shipped != first and audit[shipped] < audit[first] - MARGIN,
        "wall_s": report["timings"]["wall_s"],
    }


def run(quick: bool = False) -> dict:
    seeds = [0, 1] if quick else [0, 1, 2, 3, 4]
    rows = []
    for seed in seeds:
        rows.append(one_seed(seed))
        print(json.dumps(rows[-1]), flush=True)
    done = [r for r in rows if "error" not in r]
    gains = [r["shipped_gain"] for r in done]
    return {
        "seeds": seeds,
        "per_seed": rows,
        "margin": MARGIN,
        "mean_shipped_gain": round(sum(gains) / len(gains), 4) if gains else None,
        "worse_shipped_seeds": [r["seed"] for r in done if r["worse_shipped"]],
        "failed_seeds": [r["seed"] for r in rows if "error" in r],
        "targets": {"mean_shipped_gain": ">= 0.02", "worse_shipped_seeds": "none"},
    }
