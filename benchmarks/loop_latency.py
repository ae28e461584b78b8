"""How short is a turn: from the oracle's answers landing to the gated challenger's signed
release, with retrains that fine-tune the champion (the default, `init_from: auto`) against the
same loop retraining from scratch every turn, side by side.

Runs `cvops-demo --turns T --seed S` per seed in fresh homes, once as shipped and once with
`--init-from none`, one at a time on every core (latency is wall time). Each turn after the
first reports its loop latency (the answers land as a drop -> new_drop_sensor -> ingest ->
curate -> retraining_sensor -> train, evaluate, gate, export -> release, signed), and the audit
scores each turn's trained model on the same held-back images.

Targets: latency <= 60 s on 2 cores at demo scale; no loss of audit accuracy against training from
scratch; orchestration <= 3 % of the loop's wall time.
"""

from benchmarks.loop_convergence import side_by_side

ARMS = {"fine_tune": [], "scratch": ["--init-from", "none"]}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def run(quick: bool = False) -> dict:
    seeds, turns = ([0], 2) if quick else ([0, 1, 2], 3)
    # one demo at a time on every core: latency is wall time, which a neighbour would inflate
    jobs = [(s, turns, arm, flags) for s in seeds for arm, flags in ARMS.items()]
    rows = side_by_side(jobs, workers=1)
    done = {(r["seed"], r["arm"]): r for r in rows if "error" not in r}
    summary = {}
    for arm in ARMS:
        runs = [done[s, arm] for s in seeds if (s, arm) in done]
        latencies = [t["latency_s"] for r in runs for t in r["turns"][1:]]
        summary[arm] = {
            "latency_s": latencies,
            "mean_latency_s": _mean(latencies),
            "max_latency_s": max((v for v in latencies if v is not None), default=None),
            "orchestration_share": [r["orchestration_share"] for r in runs],
            "trained_audit_accuracy": {r["seed"]: r["trained_accuracy"] for r in runs},
            "mean_trained_audit_accuracy_after_turn_1": _mean(
                [a for r in runs for a in r["trained_accuracy"][1:]]
            ),
        }
    paired = [
        round(a - b, 4)
        for s in seeds
        if (s, "fine_tune") in done and (s, "scratch") in done
        for a, b in zip(
            done[s, "fine_tune"]["trained_accuracy"][1:], done[s, "scratch"]["trained_accuracy"][1:]
        )
        if a is not None and b is not None
    ]
    return {
        "seeds": seeds,
        "turns": turns,
        "per_run": [{k: v for k, v in r.items() if k != "turns"} for r in rows],
        "arms": summary,
        "fine_tune_minus_scratch_audit": paired,
        "mean_fine_tune_minus_scratch_audit": _mean(paired),
        "failed": [r for r in rows if "error" in r],
        "targets": {
            "max_latency_s (fine_tune)": "<= 60",
            "mean_fine_tune_minus_scratch_audit": ">= 0 (no loss)",
            "orchestration_share": "<= 0.03",
        },
    }
