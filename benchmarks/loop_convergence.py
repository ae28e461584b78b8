"""Does the loop keep getting better, turn after turn, and does its queue buy that with fewer
labels than a random sample would?

Runs `cvops-demo --turns T --seed S` twice per seed in fresh homes: once as shipped (the
annotation queue ranks the field's records), once with `--explore-share 1.0` (each queue a random
sample of the same size). Every turn buys the same number of labels in both arms; the demo's
audit scores every turn's shipped model (the champion when the turn ended) on the same held-back
images, shot as the field shoots, against the oracle's truth. Runs go side by side, one process
and one torch thread each.

Targets: labels to reach the SLA accuracy on the audit (or, where an arm never does, the accuracy
both arms reached: the plateau) at most 0.6x random's; the shipped model's audit accuracy never
falls by more than the gate's margin from one turn to the next; and how often the gate's replay
verdict was conclusive, per turn (the holdout grows turn by turn).
"""

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

MARGIN = 0.02  # the replay gate's and the canary's non-inferiority margin
SLA = 0.97  # production_metrics' default accuracy SLA
CONCLUSIVE = ("non_inferior", "worse")
ARMS = {"queue": [], "random": ["--explore-share", "1.0"]}
LOGS = Path(__file__).parent / "results" / "logs"


def demo_run(
    seed: int, turns: int, arm: str, extra: list[str] | None = None, one_thread: bool = True
) -> dict:
    """One `cvops-demo` in a fresh home; its report (per_turn rows, audit), or its error."""
    with tempfile.TemporaryDirectory(prefix=f"cvops-{arm}-{seed}-") as tmp:
        env = {**os.environ, "CVOPS_HOME": f"{tmp}/cvops", "DAGSTER_HOME": f"{tmp}/dagster"}
        if one_thread:
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for name in ("CVOPS_DROPS", "MLFLOW_TRACKING_URI", "CVOPS_S3_BUCKET"):
            env.pop(name, None)
        report_path = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "cvops_pipelines.demo", "--seed", str(seed)]
        command += ["--turns", str(turns), "--report", str(report_path), *(extra or [])]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        log = LOGS / f"{arm}-{seed}.log"  # the whole output, for whoever reads a figure
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0 or not report_path.exists():
            return {
                "seed": seed,
                "arm": arm,
                "exit_code": proc.returncode,
                "error": proc.stdout[-2000:] + proc.stderr[-2000:],
                "log": str(log),
            }
        report = json.loads(report_path.read_text())
    return {
        "seed": seed,
        "arm": arm,
        "per_turn": report["per_turn"],
        "audit_images": report["audit_images"],
        # each turn's trained model on the audit, shipped or not (None: that turn trained none)
        "trained_accuracy": [
            report["audit"].get((t["gate"]["model_version"] or "").lstrip("v"))
            for t in report["turns"]
        ],
        "turns": report["turns"],
        "wall_s": report["timings"]["wall_s"],
        "orchestration_share": report["timings"]["orchestration_share"],
        "runs": report["timings"]["runs"],  # every Dagster run: job, wall_s, steps_s
        "log": str(log),
    }


def side_by_side(jobs: list[tuple], workers: int | None = None) -> list[dict]:
    """Each job a demo process of its own, one torch thread each, as many at once as there are
    cores (workers=1: one at a time, on every core)."""
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    rows = []
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(demo_run, *job, workers > 1) for job in jobs]
        for done in as_completed(futures):
            rows.append(done.result())
            brief = {k: v for k, v in rows[-1].items() if k not in ("turns",)}
            print(json.dumps(brief), flush=True)
    return rows


def labels_to_reach(per_turn: list[dict], target: float) -> int | None:
    """Labels bought before the first turn whose shipped model reached `target` (None: never)."""
    for row in per_turn:
        if row["audit_accuracy"] is not None and row["audit_accuracy"] >= target - 1e-9:
            return row["labels"]
    return None


def largest_drop(per_turn: list[dict]) -> float:
    """The shipped model's largest fall in audit accuracy from one turn to the next."""
    shipped = [r["audit_accuracy"] for r in per_turn if r["audit_accuracy"] is not None]
    return max([0.0] + [a - b for a, b in zip(shipped, shipped[1:])])


def compare(queue: dict, random: dict) -> dict:
    """One seed: labels each arm needed to reach the SLA, or the accuracy both reached."""
    best = [max(r["audit_accuracy"] or 0 for r in arm["per_turn"]) for arm in (queue, random)]
    target = SLA if min(best) >= SLA else min(best)
    needed = [labels_to_reach(arm["per_turn"], target) for arm in (queue, random)]
    return {
        "seed": queue["seed"],
        "target": round(target, 4),
        "target_is": "sla" if target == SLA else "plateau (the accuracy both arms reached)",
        "queue_labels": needed[0],
        "random_labels": needed[1],
        "ratio": round(needed[0] / needed[1], 3) if needed[1] else None,
        "queue_accuracy": [r["audit_accuracy"] for r in queue["per_turn"]],
        "random_accuracy": [r["audit_accuracy"] for r in random["per_turn"]],
    }


def conclusive_by_turn(runs: list[dict], turns: int) -> list[dict]:
    out = []
    for turn in range(2, turns + 1):  # turn 1's model passes the gate by definition
        verdicts = [r["per_turn"][turn - 1]["gate_replay"] for r in runs]
        judged = [v for v in verdicts if v is not None]
        out.append(
            {
                "turn": turn,
                "verdicts": verdicts,
                "conclusive_share": round(sum(v in CONCLUSIVE for v in judged) / len(judged), 3)
                if judged
                else None,
            }
        )
    return out


def mean_curve(runs: list[dict], turns: int) -> list[dict]:
    out = []
    for turn in range(turns):
        values = [r["per_turn"][turn]["audit_accuracy"] for r in runs]
        values = [v for v in values if v is not None]
        out.append(
            {
                "turn": turn + 1,
                "labels": runs[0]["per_turn"][turn]["labels"],
                "mean_audit_accuracy": round(sum(values) / len(values), 4) if values else None,
            }
        )
    return out


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, curve in curves.items():
        points = [
            (p["labels"], p["mean_audit_accuracy"]) for p in curve if p["mean_audit_accuracy"]
        ]
        ax.plot(
            *zip(*points), marker="o", label=f"{arm} queue" if arm == "random" else "cvops queue"
        )
    ax.axhline(SLA, color="grey", linestyle="--", linewidth=1, label=f"SLA {SLA}")
    ax.set_xlabel("labels bought (annotation queue answers)")
    ax.set_ylabel("shipped model's audit accuracy (mean over seeds)")
    ax.set_title("loop_convergence")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, seeds: list[int] | None = None, turns: int | None = None) -> dict:
    """`seeds`, `turns`: override the defaults (5 seeds, 5 turns; quick: 1 seed, 3 turns)."""
    default_seeds, default_turns = ([0], 3) if quick else ([0, 1, 2, 3, 4], 5)
    seeds, turns = seeds or default_seeds, turns or default_turns
    jobs = [(seed, turns, arm, flags) for seed in seeds for arm, flags in ARMS.items()]
    return summarize(side_by_side(jobs), seeds, turns)


def summarize(rows: list[dict], seeds: list[int], turns: int) -> dict:
    """The comparison over every run in `rows` (one `demo_run` each; runs made apart, e.g. a
    few seeds at a time, merge by concatenating their rows)."""
    failed = [
        {k: r[k] for k in ("seed", "arm", "exit_code", "error")} for r in rows if "error" in r
    ]
    done = {(r["seed"], r["arm"]): r for r in rows if "error" not in r}
    arms = {arm: [done[s, arm] for s in seeds if (s, arm) in done] for arm in ARMS}
    seeds_both = [s for s in seeds if (s, "queue") in done and (s, "random") in done]
    per_seed = [compare(done[s, "queue"], done[s, "random"]) for s in seeds_both]
    needed = [(c["queue_labels"], c["random_labels"]) for c in per_seed]
    summed = [sum(x for x, _ in needed if x is not None), sum(y for _, y in needed if y)]
    curves = {arm: mean_curve(runs, turns) for arm, runs in arms.items() if runs}
    figure = Path(__file__).parent / "results" / "loop_convergence.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    if curves:
        plot(curves, figure)
    drops = {arm: [largest_drop(r["per_turn"]) for r in runs] for arm, runs in arms.items()}
    return {
        "seeds": seeds,
        "turns": turns,
        "per_run": rows,
        "per_seed": per_seed,
        "labels_ratio_summed": round(summed[0] / summed[1], 3) if summed[1] else None,
        "seeds_never_reached": [c["seed"] for c in per_seed if c["queue_labels"] is None],
        "mean_curves": curves,
        "largest_turn_to_turn_drop": {k: [round(v, 4) for v in d] for k, d in drops.items()},
        "drops_beyond_margin": {k: sum(v > MARGIN for v in d) for k, d in drops.items()},
        "gate_replay_conclusive": {
            arm: conclusive_by_turn(runs, turns) for arm, runs in arms.items() if runs
        },
        "failed": failed,
        "plot": str(figure),
        "targets": {
            "labels_ratio_summed": "<= 0.6",
            "drops_beyond_margin": "0 (queue arm)",
        },
    }
