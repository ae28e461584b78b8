"""The shapes every task shows the same way: the gate's check, the field checks (SLA and
output drift), the annotation queue's summary."""

from __future__ import annotations

from cvops_pipelines.core.base.report import Check, Json, Link, Table
from cvops_pipelines.core.learn.production_state import catch_up
from cvops_pipelines.core.measure.gate import GateDecision

GATE_CHECK = "challenger_not_worse_than_champion"


def gate_check(gate: GateDecision, thresholds: dict, extra: dict | None = None) -> Check:
    """The gate's decision, the numbers it read side by side, its thresholds: one shape for
    every task."""
    return Check(
        GATE_CHECK,
        gate.passed,
        {
            "first_model": gate.first_model,
            "decision": "; ".join(gate.reasons),
            "notes": "; ".join(gate.notes) or "none",
            **({} if gate.passed else {"first_failure": gate.reasons[0]}),
            **(extra or {}),
            "side_by_side": Table(gate.table, 100),
            "thresholds": Json(thresholds),
        },
    )


def field_checks(report, policy, sla_table, sla_limits: dict, drift_limits: dict) -> list[Check]:
    """The SLA (blocking) and output drift (a warning) checks."""
    return [
        Check(
            "accuracy_sla",
            report.sla_failure(policy) is None,
            {
                **sla_limits,
                "releases": Table(sla_table, 10),
                **_failure(report.sla_failure(policy)),
            },
        ),
        Check(
            "no_output_drift",
            report.drift_failure() is None,
            {
                **drift_limits,
                "releases": Table(report.drift, 10),
                **_failure(report.drift_failure()),
            },
            blocking=False,
        ),
    ]


def _failure(why: str | None) -> dict:
    return {"first_failure": why} if why else {}  # what the UI and the demo show first


def queue_metadata(queue, queue_id: str, prefix: str, store, experts, columns) -> dict:
    """What either task's queue shows: its size and reasons, the top of it, where it lives."""
    return {
        "queue_id": queue_id,
        "queued": len(queue),
        "by_reason": Json(queue["reason"].value_counts().to_dict()),
        "candidates_already_expert_labeled": len(experts),
        "top": Table(queue[columns], 15),
        "labelstudio_import": Link(store.uri(f"{prefix}/tasks.json")),
        "labelstudio_config": Link(store.uri(f"{prefix}/labelstudio_config.xml")),
        "csv": Link(store.uri(f"{prefix}/queue.csv")),
        "folder": Link(store.uri(prefix)),
    }


def absorb_new(ctx, state, feedback, rebuild: bool = False) -> dict:
    """The feedback batches a production state has not seen, absorbed (every batch again when
    `rebuild`); a batch without a table is left for a later run, with a warning."""
    if rebuild:
        state.reset()
    absorbed = catch_up(
        state,
        feedback,
        lambda batch: ctx.warn(
            f"feedback batch {batch} has no table (its run failed?): left for a later run"
        ),
    )
    ctx.log(
        f"absorbed {absorbed['batches_absorbed']} new feedback batches "
        f"({absorbed['rows_absorbed']} rows) into the production state"
    )
    return absorbed
