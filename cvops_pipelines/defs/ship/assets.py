"""Ship stage: ONNX artifacts proven against the trained model and chosen per target, a signed
release on the canary channel, and the canary's promotion or rollback on field feedback."""

import json
from dataclasses import asdict, fields
from pathlib import Path

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetSelection,
    AutomationCondition,
    Config,
    DataVersion,
    Failure,
    MetadataValue,
    Output,
)
from pydantic import Field

from cvops_pipelines import settings
from cvops_pipelines.core.base.handoffs import (
    EvaluationRecord,
    ExportRecord,
    ReleaseRecord,
    TrainedModelRecord,
)
from cvops_pipelines.core.base.ledger import instance_ledger
from cvops_pipelines.core.base.tables import PartitionedTable, markdown_table
from cvops_pipelines.core.build.registry import load_version
from cvops_pipelines.core.learn.feedback_query import reviewed_records
from cvops_pipelines.core.measure.replay import NonInferiority
from cvops_pipelines.core.ship.artifact_choice import TargetProfile
from cvops_pipelines.core.ship.canary import log_canary, look_at_canary
from cvops_pipelines.core.ship.export import ExportError
from cvops_pipelines.core.ship.keys import KeyNotDelegated, signing_releases
from cvops_pipelines.core.ship.onnx_model import ExportPolicy
from cvops_pipelines.core.ship.release import (
    ChannelTampered,
    ReleaseRefused,
    ReleaseStore,
    SigningKeyMissing,
    chosen_artifact,
    publish_release,
    release_meta,
)
from cvops_pipelines.defs.loop import PerLoop, loop_asset
from cvops_pipelines.defs.operator import OperatorConfig
from cvops_pipelines.defs.resources import (
    CvopsStorage,
    DataContracts,
    MlflowTracking,
    stage_context,
)
from cvops_pipelines.edge.keep import KeepPolicy


class TargetConfig(Config):
    name: str
    max_p95_ms_batch1: float = Field(50.0, description="Latency budget, batch 1, p95.")
    max_accuracy_drop_points: float = Field(
        1.0, description="vs torch eager fp32 on the test split."
    )
    max_size_mb: float = 100.0
    prefer: str = Field("latency", description="Among qualifying artifacts: latency or size.")


class OnnxModelConfig(Config):
    parity_tolerance: float = Field(1e-3, description="fp32 ONNX vs torch: max |logit diff|.")
    calibration_images: int = Field(256, description="Real training images for int8 calibration.")
    latency_repeats: int = Field(50, description="Timed calls per artifact and batch size.")
    targets: list[TargetConfig] = Field(
        default_factory=lambda: [
            TargetConfig(name="edge"),
            TargetConfig(name="edge-small", max_size_mb=16.0, prefer="size"),
        ],
        description="Target profiles; each gets the artifact its budgets allow.",
    )

    def policy(self) -> ExportPolicy:
        return ExportPolicy(
            tuple(TargetProfile(**t.model_dump()) for t in self.targets),
            self.parity_tolerance,
            self.calibration_images,
            self.latency_repeats,
        )


@loop_asset(
    group_name="ship",
    io_manager_key="tables",
    kinds={"onnx", "mlflow"},
    # after a new model only (a new dataset version alone waits for retraining_sensor), and
    # only once the gate passed: a refused challenger is not exported
    automation_condition=PerLoop(
        lambda loop: (
            AutomationCondition.eager().ignore(AssetSelection.assets(loop.key("dataset_version")))
            & ~AutomationCondition.any_deps_match(
                AutomationCondition.any_checks_match(
                    AutomationCondition.check_failed(), blocking_only=True
                )
            )
        )
    ),
    description="The gated challenger exported to ONNX fp32 and calibrated int8, each proven on "
    "real test images, measured on this machine, and chosen per target profile.",
)
def onnx_model(
    context: AssetExecutionContext,
    config: OnnxModelConfig,
    trained_model: TrainedModelRecord,
    model_evaluation: EvaluationRecord,
    dataset_version: pd.DataFrame,
    storage: CvopsStorage,
    tracking: MlflowTracking,
    contracts: DataContracts,
) -> Output[ExportRecord]:
    if not model_evaluation.gate_passed:
        raise Failure(f"model v{model_evaluation.challenger_version} did not pass the gate")
    ctx = stage_context(context, storage, tracking, contracts, "onnx_model")
    loaded = load_version(ctx.tracking, trained_model.model_version)
    try:
        exported = contracts.task().export(ctx, loaded, dataset_version, config.policy())
    except ExportError as exc:
        raise Failure(str(exc)) from None
    record = exported.record
    version = f"{loaded.version}:{record.artifacts['onnx_fp32']['sha256'][:16]}"
    return Output(record, metadata=_export_metadata(exported), data_version=DataVersion(version))


def _export_metadata(exported) -> dict:
    record, choices = exported.record, exported.choices
    table = pd.DataFrame(
        [
            {"target": c.profile.name, "chosen": c.artifact or "none qualifies", **c.verdicts}
            for c in choices
        ]
    )
    return {
        "source_model": f"{record.model_name} v{record.source_model_version}",
        "task": record.task,
        "fp32_parity": MetadataValue.json(exported.parities["onnx_fp32"]),
        "int8_parity": MetadataValue.json(exported.parities["onnx_int8"]),
        "measurements": MetadataValue.md(markdown_table(exported.measurements, 10)),
        "choices": MetadataValue.md(markdown_table(table, 20)),
        "chosen": ", ".join(f"{c.profile.name} -> {c.artifact or 'none'}" for c in choices),
        "mlflow_run_id": record.run_id,
        "mlflow_run": MetadataValue.url(exported.run_url),
        "artifacts": MetadataValue.json({n: f["uri"] for n, f in record.artifacts.items()}),
    }


class EdgeBufferConfig(Config):
    """What devices keep of the frames they predict (edge/keep.py), shipped in the release's
    spec: a change reaches the fleet with the next release, no new agent needed."""

    margin: float = Field(
        KeepPolicy.margin,
        ge=0,
        description="Keep a frame's image when the top-1 minus top-2 probability is below this "
        "(a detector: a box scored this near its operating point).",
    )
    flicker_frames: int = Field(
        KeepPolicy.flicker_frames,
        ge=0,
        description="Keep a frame whose answer differs from the majority of the last this many "
        "answers on the same scene (0: off).",
    )
    scene_distance: float = Field(
        KeepPolicy.scene_distance,
        ge=0,
        description="A frame this far from the one before it (mean grey difference, 0-255, at "
        "16x16) starts a new scene: a new answer there is no flicker.",
    )
    explore_share: float = Field(
        KeepPolicy.explore_share,
        ge=0,
        le=1,
        description="A seeded random share of frames kept whatever the model said (1.0: keep "
        "every image).",
    )
    duplicate_distance: float = Field(
        KeepPolicy.duplicate_distance,
        ge=0,
        description="A frame this near the source's last kept one (mean grey difference, "
        "0-255, at 16x16) is not kept again.",
    )
    budget_bytes: int = Field(
        KeepPolicy.budget_bytes,
        ge=0,
        description="Disk the kept images may use on a device; beyond it the least valuable "
        "go first, a corrected one last (records are never evicted).",
    )
    hold_frames: int = Field(
        KeepPolicy.hold_frames,
        ge=0,
        description="Recent frames not kept that an agent holds in memory: an operator who "
        "corrects one of them keeps its image.",
    )
    seed: int = Field(KeepPolicy.seed, description="Seeds the exploration share.")

    def policy(self) -> KeepPolicy:
        return KeepPolicy(**{f.name: getattr(self, f.name) for f in fields(KeepPolicy)})


class EdgeReleaseConfig(Config):
    target: str = Field("edge", description="Target profile of onnx_model whose choice ships.")
    canary_share: float = Field(0.34, description="Share of devices (by hashed id) on canary.")
    canary_cohorts: list[str] = Field(
        default_factory=list, description="Cohorts that always follow canary."
    )
    signing_key: str = Field(
        "",
        description="Private key path; default CVOPS_SIGNING_KEY or "
        "$CVOPS_HOME/keys/release_signing.key.",
    )
    buffer: EdgeBufferConfig = Field(
        default_factory=EdgeBufferConfig,
        description="Selective buffering on the devices (the release's spec carries it).",
    )


def _signing_releases(context: AssetExecutionContext, store, signing_key: str) -> ReleaseStore:
    """The releases as this pipeline signs them, numbered from the instance's ledger."""
    return signing_releases(
        store,
        Path(signing_key or settings.signing_key_path()),
        settings.root_public_key_path(),
        instance_ledger(context.instance, store),
    )


def _history(releases: ReleaseStore) -> MetadataValue:
    return MetadataValue.md(markdown_table(releases.history().iloc[::-1], 20))


@loop_asset(
    group_name="ship",
    io_manager_key="tables",
    kinds={"onnx"},
    automation_condition=AutomationCondition.eager(),
    description="The chosen ONNX artifact as a signed release bundle (with a bsdiff delta "
    "from the stable release), published and put on the canary channel.",
)
def edge_release(
    context: AssetExecutionContext,
    config: EdgeReleaseConfig,
    onnx_model: ExportRecord,
    storage: CvopsStorage,
) -> Output[ReleaseRecord]:
    store = storage.store()
    try:
        artifact, model = chosen_artifact(store, onnx_model, config.target)
        releases = _signing_releases(context, store, config.signing_key)
        actor, cohorts = f"dagster run {context.run.run_id}", tuple(config.canary_cohorts)
        meta = release_meta(onnx_model, artifact, config.target)
        spec = {**onnx_model.preprocess, "buffer": asdict(config.buffer.policy())}
        published = publish_release(
            releases, model, spec, meta, releases.key, actor, config.canary_share, cohorts,
        )  # fmt: skip
    except (ReleaseRefused, SigningKeyMissing, KeyNotDelegated, ChannelTampered) as exc:
        raise Failure(str(exc)) from None
    record, history = published.record, _history(releases)
    if not published.new:
        context.log.info(f"{record.release} is already published; nothing to do")
        metadata = {"release": record.release, "republished": False, "history": history}
        return Output(record, metadata=metadata)
    return Output(
        record,
        metadata={
            "release": record.release,
            "artifact": artifact,
            "parent": record.parent or "none",
            "model_bytes": len(model),
            "delta_bytes": record.delta_bytes or published.delta_note,
            "canary": MetadataValue.json(record.canary),
            "bundle": MetadataValue.url(record.uri),
            "history": history,
        },
    )


class CanaryDecisionConfig(OperatorConfig):
    min_records: int = Field(50, description="Paired reviewed records needed before deciding.")
    margin: float = Field(
        0.02,
        description="Non-inferiority margin: the canary may be this "
        "much less accurate than stable.",
    )
    alpha: float = Field(
        0.05,
        description="One-sided error rate of the exact paired tests, over all looks at one canary.",
    )
    max_looks: int = Field(
        4,
        description="Decisions a canary may take (the schedule looks "
        "again while it keeps collecting): each look tests "
        "at alpha / max_looks (Bonferroni).",
    )

    signing_key: str = Field(
        "",
        description="Private key that signs the channel documents; "
        "default CVOPS_SIGNING_KEY or $CVOPS_HOME/keys/release_signing.key.",
    )

    def rule(self) -> NonInferiority:
        return NonInferiority(self.margin, self.alpha, self.min_records)


@loop_asset(
    group_name="ship",
    io_manager_key="tables",
    kinds={"python", "onnx"},
    description="Promote the canary to stable (and MLflow alias `champion`) when a shadow "
    "replay of canary and stable on the same reviewed field images shows it is "
    "not worse; roll it back when it shows it is worse; else keep collecting.",
)
def canary_decision(
    context: AssetExecutionContext,
    config: CanaryDecisionConfig,
    edge_release: ReleaseRecord,
    feedback: PartitionedTable,
    storage: CvopsStorage,
    tracking: MlflowTracking,
    contracts: DataContracts,
):
    store, replay = storage.store(), contracts.task().canary_replay
    try:  # the decision moves channel pointers, which devices accept only signed
        releases = _signing_releases(context, store, config.signing_key)
        mlflow = tracking.open()
        rule, actor = config.rule(), f"dagster run {context.run.run_id}"
        records, release = reviewed_records(feedback), edge_release.release
        promote = lambda m: mlflow.set_alias("champion", m["model_version"])  # noqa: E731
        result = look_at_canary(
            releases, records, release, rule, config.max_looks, config.operator(), actor,
            promote, replay=replay,
        )  # fmt: skip
    except (SigningKeyMissing, KeyNotDelegated, ChannelTampered) as exc:
        raise Failure(str(exc)) from None
    why = "\n".join(result.reasons)
    meta = {"action": result.action, "why": why, "history": _history(releases)}
    if result.action == "none":
        return Output(result.record(), metadata={"action": "none", "history": meta["history"]})
    log = context.log.warning if result.action in ("rollback", "undecided") else context.log.info
    log(f"canary {result.release}: {result.action} ({why})")
    meta["look"] = result.look
    if result.action == "undecided":
        return Output(result.record(), metadata=meta)
    meta["canary_vs_stable"] = MetadataValue.md(markdown_table(result.table))
    run_id = log_canary(mlflow, edge_release.model_version, result)
    if run_id is not None:
        meta.update(_paired_metadata(result.comparison, mlflow.run_url(run_id)))
    return Output(result.record(), metadata=meta)


def _paired_metadata(comparison, run_url: str) -> dict:
    return {
        "paired_records": comparison.records,
        "paired": MetadataValue.json(json.loads(comparison.table().to_json(orient="records"))),
        "per_class": MetadataValue.md(markdown_table(comparison.per_class, 100)),
        "per_cohort": MetadataValue.md(markdown_table(comparison.per_cohort, 50)),
        "mlflow_run": MetadataValue.url(run_url),
    }
