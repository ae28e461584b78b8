"""Edge release: a signed bundle on the canary channel, promoted or rolled back on field feedback."""

import json
from pathlib import Path

import pandas as pd
from dagster import (AssetExecutionContext, AutomationCondition, Config, Failure, MetadataValue,
                     Output, asset)
from pydantic import Field

from cvops_pipelines import settings
from cvops_pipelines.core.canary import decide_canary, next_look
from cvops_pipelines.core.feedback import resolve_records
from cvops_pipelines.core.release import (ReleaseStore, SigningKeyMissing, apply_verdict,
                                          build_release, load_private_key, release_id)
from cvops_pipelines.core.replay import NonInferiority
from cvops_pipelines.core.tables import markdown_table
from cvops_pipelines.defs.operator import OperatorConfig
from cvops_pipelines.defs.resources import CvopsStorage, MlflowTracking
from cvops_pipelines.edge.bundle import sha256


class EdgeReleaseConfig(Config):
    target: str = Field("edge", description="Target profile of onnx_model whose choice ships.")
    canary_share: float = Field(0.34, description="Share of devices (by hashed id) on canary.")
    canary_cohorts: list[str] = Field(default_factory=list,
                                      description="Cohorts that always follow canary.")
    signing_key: str = Field("", description="Private key path; default CVOPS_SIGNING_KEY or "
                                             "$CVOPS_HOME/keys/release_signing.key.")


def _history(releases: ReleaseStore) -> MetadataValue:
    return MetadataValue.md(markdown_table(releases.history().iloc[::-1], 20))


@asset(group_name="ship", io_manager_key="tables", kinds={"onnx"},
       automation_condition=AutomationCondition.eager(),
       description="The chosen ONNX artifact as a signed release bundle (with a bsdiff delta "
                   "from the stable release), published and put on the canary channel.")
def edge_release(context: AssetExecutionContext, config: EdgeReleaseConfig, onnx_model: dict,
                 storage: CvopsStorage):
    artifact = onnx_model["choices"].get(config.target)
    if not artifact:
        raise Failure(f"no artifact qualifies for target {config.target!r}: see onnx_model's "
                      "choices table for why each was refused")
    store = storage.store()
    entry = onnx_model["artifacts"][artifact]
    model = store.read_bytes(entry["key"])
    if sha256(model) != entry["sha256"]:
        raise Failure(f"{entry['uri']} changed since onnx_model wrote it (sha256 mismatch)")
    try:
        key = load_private_key(Path(config.signing_key) if config.signing_key
                               else settings.signing_key_path())
    except SigningKeyMissing as exc:
        raise Failure(str(exc)) from None
    releases = ReleaseStore(store)
    stable = releases.channel("stable")
    parent_id = stable["release"] if stable and stable.get("release") else None
    meta = {"model_name": onnx_model["model_name"], "model_version": onnx_model["source_model_version"],
            "dataset_version": onnx_model["dataset_version"], "artifact": artifact,
            "target": config.target}
    actor = f"dagster run {context.run.run_id}"
    same = release_id(model, str(meta["model_version"]))
    if releases.published(same):  # a re-run: the bundle exists; channels stay as they are
        context.log.info(f"{same} is already published; nothing to do")
        manifest = releases.manifest(same)
        delta = manifest.get("delta")
        return Output({"release": same, "parent": manifest["parent"], **meta,
                       "uri": releases.store.uri(f"releases/{same}"), "model_bytes": len(model),
                       "delta_bytes": delta["size"] if delta else None,
                       "canary": releases.channel("canary")},
                      metadata={"release": same, "republished": False,
                                "history": _history(releases)})
    release = build_release(model, onnx_model["preprocess"], meta, key,
                            releases.manifest(parent_id) if parent_id else None,
                            releases.model(parent_id) if parent_id else None)
    uri = releases.publish(release)
    if parent_id is None:
        canary = releases.point("canary", release.id, "first release: every device runs it on "
                                "canary until field feedback promotes it", actor, share=1.0)
    else:
        canary = releases.point("canary", release.id, f"new model v{meta['model_version']} "
                                f"({artifact}) against stable {parent_id}", actor,
                                share=config.canary_share, cohorts=tuple(config.canary_cohorts))
    delta = release.manifest.get("delta")
    record = {"release": release.id, "parent": parent_id, "uri": uri, **meta,
              "model_bytes": len(model), "delta_bytes": delta["size"] if delta else None,
              "canary": canary}
    return Output(record, metadata={
        "release": release.id, "artifact": artifact, "parent": parent_id or "none",
        "model_bytes": len(model),
        "delta_bytes": delta["size"] if delta else
        release.manifest.get("delta_note", "no parent: devices download the full model"),
        "canary": MetadataValue.json(canary), "bundle": MetadataValue.url(uri),
        "history": _history(releases)})


class CanaryDecisionConfig(OperatorConfig):
    min_records: int = Field(50, description="Paired reviewed records needed before deciding.")
    margin: float = Field(0.02, description="Non-inferiority margin: the canary may be this "
                                            "much less accurate than stable.")
    alpha: float = Field(0.05, description="One-sided error rate of the exact paired tests, "
                                           "over all looks at one canary.")
    max_looks: int = Field(4, description="Decisions a canary may take (the schedule looks "
                                          "again while it keeps collecting): each look tests "
                                          "at alpha / max_looks (Bonferroni).")


@asset(group_name="ship", io_manager_key="tables", kinds={"python", "onnx"},
       description="Promote the canary to stable (and MLflow alias `champion`) when a shadow "
                   "replay of canary and stable on the same reviewed field images shows it is "
                   "not worse; roll it back when it shows it is worse; else keep collecting.")
def canary_decision(context: AssetExecutionContext, config: CanaryDecisionConfig,
                    edge_release: dict, feedback: pd.DataFrame, storage: CvopsStorage,
                    mlflow: MlflowTracking):
    releases = ReleaseStore(storage.store())
    canary, stable = releases.channel("canary") or {}, releases.channel("stable") or {}
    release = edge_release["release"]
    if canary.get("release") != release:
        return Output({"release": release, "action": "none",
                       "reasons": [f"{release} is no longer on canary (decided earlier)"]},
                      metadata={"action": "none", "history": _history(releases)})
    manifest = releases.manifest(release)
    look = next_look(releases, release)
    if look > config.max_looks:  # the error-rate budget is spent: people decide now
        why = (f"{release} was looked at {config.max_looks} times without a decision (the "
               f"budget of alpha {config.alpha}); promote or roll it back by hand")
        context.log.warning(why)
        return Output({"release": release, "action": "undecided", "reasons": [why]},
                      metadata={"action": "undecided", "why": why, "look": look,
                                "history": _history(releases)})
    verdict, comparison = decide_canary(
        releases, resolve_records(feedback), release, stable.get("release"),
        canary.get("updated_at"),
        NonInferiority(config.margin, config.alpha / config.max_looks, config.min_records),
        config.operator())
    actor, why = f"dagster run {context.run.run_id}", "\n".join(verdict.reasons)
    tracking = mlflow.tracking()
    apply_verdict(releases, release, verdict, actor,
                  on_promote=lambda m: tracking.set_alias("champion", m["model_version"]))
    log = context.log.warning if verdict.action == "rollback" else context.log.info
    log(f"canary {release}: {verdict.action} ({why})")
    if verdict.action in ("promote", "rollback"):
        tracking.client().set_model_version_tag(tracking.model_name, manifest["model_version"],
                                                "canary", verdict.action)
    extra = {}
    if comparison is not None:
        run_id = tracking.client().get_model_version(tracking.model_name,
                                                     str(manifest["model_version"])).run_id
        tracking.log_files(run_id, f"canary/{release}/look-{look}", {
            "paired.csv": comparison.table().to_csv(index=False).encode(),
            "per_class.csv": comparison.per_class.to_csv(index=False).encode(),
            "per_cohort.csv": comparison.per_cohort.to_csv(index=False).encode(),
            "decision.json": json.dumps({"action": verdict.action,
                                         "reasons": verdict.reasons}).encode()})
        extra = {"paired_records": comparison.records,
                 "paired": MetadataValue.json(json.loads(
                     comparison.table().to_json(orient="records"))),
                 "per_class": MetadataValue.md(markdown_table(comparison.per_class, 100)),
                 "per_cohort": MetadataValue.md(markdown_table(comparison.per_cohort, 50)),
                 "mlflow_run": MetadataValue.url(tracking.run_url(run_id))}
    return Output({"release": release, "stable": stable.get("release"),
                   "action": verdict.action, "reasons": verdict.reasons,
                   "table": verdict.table.to_dict(orient="records")},
                  metadata={"action": verdict.action, "why": why, "look": look,
                            "canary_vs_stable": MetadataValue.md(markdown_table(verdict.table)),
                            **extra, "history": _history(releases)})
