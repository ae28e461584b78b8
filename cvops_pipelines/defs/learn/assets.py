"""Learn stage: field feedback in, production metrics and drift, what to annotate next, and
whether the ontology still fits."""

import hashlib
import json

import pandas as pd
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec,
                     AssetExecutionContext, BackfillPolicy, Config, MetadataValue, Output, asset)
from pydantic import Field

from cvops_pipelines.core.active import (QueuePolicy, annotation_queue as build_queue,
                                         labelstudio_queue_config, labelstudio_queue_tasks)
from cvops_pipelines.core.contracts import validate
from cvops_pipelines.core.dataset import load_snapshot
from cvops_pipelines.core.drift import output_drift
from cvops_pipelines.core.feedback import (FEEDBACK_COLUMNS, OPERATOR_PREFIX, BatchRejected,
                                           batch_frame, batch_key, parse_batch,
                                           quarantine_batch, resolve_records, store_images)
from cvops_pipelines.core.images import ImageLimits
from cvops_pipelines.core.label_qa import export_json
from cvops_pipelines.core.ontology_report import OntologyPolicy, ontology_report as build_report
from cvops_pipelines.core.plots import md_image, ontology_png, production_png
from cvops_pipelines.core.production import (accuracy_table, business_metrics, latest_window,
                                             model_outputs)
from cvops_pipelines.core.release import ReleaseStore
from cvops_pipelines.core.tables import markdown_table
from cvops_pipelines.defs.contract_checks import contract_check_result, contract_spec
from cvops_pipelines.defs.partitions import feedback_partitions
from cvops_pipelines.defs.resources import CvopsStorage, DataContracts

FEEDBACK_CONTRACT = contract_spec("feedback", what="Schema, published release, known classes, "
                                                   "confidence in [0, 1]; a failing batch is "
                                                   "quarantined whole.")


def _rejection(contract) -> tuple[str, str]:
    first = contract.failures[0]
    return ("contract_failed", f"{first.expectation} ({first.kwargs}) failed: "
                               f"{first.unexpected_count} unexpected, e.g. {first.examples[:3]}")


@asset(group_name="learn", partitions_def=feedback_partitions, io_manager_key="tables",
       backfill_policy=BackfillPolicy.single_run(),
       check_specs=[FEEDBACK_CONTRACT, AssetCheckSpec(
           "no_quarantined_batches", asset="feedback",
           description="Warns with the reason when a batch of the run was quarantined whole "
                       "(the accepted ones go on).")],
       kinds={"python", "parquet"},
       description="One uploaded feedback batch: records (prediction, confidence, top-k, the "
                   "operator's correction) with their images stored content-addressed. A run "
                   "may cover many batches; a bad batch is quarantined whole, with the reason.")
def feedback(context: AssetExecutionContext, storage: CvopsStorage, contracts: DataContracts):
    store = storage.store()
    known, classes = ReleaseStore(store).ids(), contracts.ontology().names
    params = {"known_releases": known, "classes": classes}
    parsed, frames, payloads, rejected = {}, {}, {}, {}
    for batch in context.partition_keys:
        try:
            payloads[batch] = store.read_bytes(batch_key(batch))
            parsed[batch] = parse_batch(payloads[batch], batch, ImageLimits())
            frames[batch] = batch_frame(parsed[batch])
            fixes = frames[batch][frames[batch]["kind"] == "correction"]
            unknown = sorted(set(fixes["corrected_label"]) - set(classes))
            if unknown:
                raise BatchRejected("unknown_class", f"corrections name classes not in the "
                                    f"ontology: {unknown}")
        except FileNotFoundError:
            rejected[batch] = ("missing_batch", f"{batch_key(batch)} is not in the store")
        except BatchRejected as exc:
            rejected[batch] = (exc.code, exc.message)

    def records_of(keys):
        parts = [frames[k][frames[k]["kind"] == "record"] for k in keys]
        return pd.concat(parts, ignore_index=True) if parts else _no_records()

    docs = store if contracts.build_docs else None
    good = [b for b in context.partition_keys if b not in rejected]
    contract = validate(records_of(good).drop(columns=["thumb"]), contracts.suite("feedback"),
                        params, docs, run_name=f"feedback-{context.run.run_id[:8]}")
    if not contract.success:  # find the culprits batch by batch; the rest goes on
        for batch in good:
            alone = validate(records_of([batch]).drop(columns=["thumb"]),
                             contracts.suite("feedback"), params)
            if not alone.success:
                rejected[batch] = _rejection(alone)
        good = [b for b in good if b not in rejected]
        contract = validate(records_of(good).drop(columns=["thumb"]), contracts.suite("feedback"),
                            params, docs, run_name=f"feedback-{context.run.run_id[:8]}-accepted")
    quarantined = []
    for batch, (code, reason) in rejected.items():
        uri = quarantine_batch(store, batch, payloads.get(batch, b""), code, reason)
        context.log.error(f"feedback batch {batch} quarantined whole: {code}: {reason}")
        quarantined.append({"batch_id": batch, "reason_code": code, "reason": reason,
                            "quarantine": uri})
        frames[batch] = _no_records()
    new_objects = sum(store_images(store, parsed[b], frames[b]) for b in good)
    accepted = records_of(good)
    out = {b: frames[b] for b in context.partition_keys}
    yield Output(out if len(out) > 1 else out[context.partition_keys[0]], metadata={
        "batches": len(context.partition_keys), "accepted_batches": len(good),
        "quarantined_batches": len(quarantined), "records": len(accepted),
        "reviewed": int(accepted["corrected_label"].notna().sum()),
        "late_corrections": int(sum((frames[b]["kind"] == "correction").sum() for b in good)),
        "devices": int(accepted["device_id"].nunique()), "new_images_stored": new_objects,
        "quarantine": MetadataValue.md(markdown_table(pd.DataFrame(
            quarantined, columns=["batch_id", "reason_code", "reason", "quarantine"]), 20)),
    })
    yield contract_check_result("feedback", contract)  # on what was accepted: it gates the pool
    first = quarantined[0] if quarantined else None
    yield AssetCheckResult(
        check_name="no_quarantined_batches", passed=not quarantined,
        severity=AssetCheckSeverity.WARN, metadata={
            "quarantined_batches": len(quarantined),
            **({"first_failure": f"batch {first['batch_id']}: {first['reason_code']}: "
                                 f"{first['reason']}"} if first else {})})


def _no_records() -> pd.DataFrame:
    return pd.DataFrame(columns=FEEDBACK_COLUMNS).astype({"confidence": "float64"})


class ProductionMetricsConfig(Config):
    period: str = Field("1D", description="Reporting period (pandas frequency: 1h, 1D, 7D, ...).")
    min_accuracy: float = Field(0.97, description="SLA: accuracy on reviewed field records.")
    min_reviewed: int = Field(30, description="Reviewed records a live release needs before "
                                              "the SLA judges it.")
    drift_window: int = Field(48, description="Latest records per live release tested for drift.")
    drift_alpha: float = Field(0.05, description="Family-wise false-alarm rate per window.")
    reference_images: int = Field(300, description="Held-out images of the release's dataset "
                                                   "version used as the drift reference.")
    event_classes: list[str] = Field(default_factory=list,
                                     description="Classes that are 'events' for the business "
                                                 "metrics; empty = every class.")


def _live_releases(releases: ReleaseStore) -> dict[str, str]:
    live = {}
    for channel in ("stable", "canary"):
        pointer = releases.channel(channel) or {}
        if pointer.get("release"):
            live.setdefault(pointer["release"], channel)
    return live


def _drift(store, releases: ReleaseStore, release: str, window: pd.DataFrame,
           config: ProductionMetricsConfig):
    manifest = releases.manifest(release)
    preprocess = json.loads(releases.store.read_bytes(f"releases/{release}/preprocess.json"))
    model = releases.model(release)
    reference = load_snapshot(store, manifest["dataset_version"])
    reference = reference[reference["split"] != "train"].sort_values("image_id")
    reference = reference.head(config.reference_images)
    ref = model_outputs(model, preprocess, [store.read_bytes(k) for k in reference["key"]])
    prod = model_outputs(model, preprocess, [store.read_bytes(k) for k in window["key"]])
    return output_drift(ref, prod, list(preprocess["classes"]), config.drift_alpha), ref, prod


@asset(group_name="learn", io_manager_key="tables", kinds={"python"},
       check_specs=[
           AssetCheckSpec("accuracy_sla", asset="production_metrics",
                          description="Every live release meets the accuracy SLA on reviewed "
                                      "field records (once it has min_reviewed of them)."),
           AssetCheckSpec("no_output_drift", asset="production_metrics",
                          description="The latest window of each live release's predictions "
                                      "matches the training reference (BBSD two-sample tests).")],
       description="Accuracy from corrective feedback per release x cohort x period (with "
                   "coverage), business metrics, and drift of the model's outputs against its "
                   "training reference.")
def production_metrics(context: AssetExecutionContext, config: ProductionMetricsConfig,
                       feedback: pd.DataFrame, storage: CvopsStorage):
    store = storage.store()
    releases = ReleaseStore(store)
    records = resolve_records(feedback)
    live = _live_releases(releases)
    table = accuracy_table(records, config.period)
    per_release = accuracy_table(records, config.period, by=("release",))
    classes = sorted(set(records["predicted"].dropna())) if len(records) else []
    business = business_metrics(records, config.event_classes or classes)
    sla, drift_rows, plots_input = [], [], {}
    for release, channel in live.items():
        mine = per_release[per_release["release"] == release]
        reviewed = int(mine["reviewed"].sum()) if len(mine) else 0
        accuracy = mine["accuracy"].iloc[0] if reviewed else None
        judged = reviewed >= config.min_reviewed
        sla.append({"release": release, "channel": channel, "reviewed": reviewed,
                    "accuracy": accuracy, "judged": judged,
                    "ok": (not judged) or accuracy >= config.min_accuracy})
        window = latest_window(records, release, config.drift_window)
        if len(window):
            result, ref, prod = _drift(store, releases, release, window, config)
            plots_input[release] = (ref, prod)
            drift_rows.append({"release": release, "channel": channel, "window": len(window),
                               "assessed": result.assessed, "flagged": result.flagged,
                               "min_p": round(result.min_p, 6),
                               **{f"{k}_flagged": v for k, v in result.families.items()},
                               "note": result.reason})
    sla_frame, drift_frame = pd.DataFrame(sla), pd.DataFrame(drift_rows)
    png = production_png(table, plots_input, config.min_accuracy)
    prefix = "reports/production_metrics"
    store.write_bytes(f"{prefix}/latest.png", png)
    store.write_bytes(f"{prefix}/accuracy.csv", table.to_csv(index=False).encode())
    sla_ok = bool(sla_frame["ok"].all()) if len(sla_frame) else True
    drifting = bool(drift_frame["flagged"].any()) if len(drift_frame) else False
    summary = {"records": len(records), "reviewed": int(records["corrected_label"].notna().sum()),
               "live": live, "sla": sla, "sla_ok": sla_ok, "drift": drift_rows,
               "drift_flagged": drifting, "business": business,
               "per_release": per_release.to_dict(orient="records")}
    yield Output(summary, metadata={
        "records": summary["records"], "reviewed": summary["reviewed"],
        "coverage": round(summary["reviewed"] / max(1, len(records)), 4),
        "sla_ok": sla_ok, "drift_flagged": drifting,
        "missed_event_share": business["missed_event_share"],
        "accuracy_by_release_cohort_period": MetadataValue.md(markdown_table(table, 50)),
        "per_release": MetadataValue.md(markdown_table(per_release, 20)),
        "accuracy_by_release": MetadataValue.json(
            {r["release"]: {k: r[k] for k in ("records", "reviewed", "coverage", "accuracy")}
             for r in summary["per_release"]}),
        "business": MetadataValue.json(business),
        "plot": MetadataValue.md(md_image(png, "field accuracy and output drift")),
        "accuracy_csv": MetadataValue.url(store.uri(f"{prefix}/accuracy.csv")),
    })
    failing = [s for s in sla if not s["ok"]]
    yield AssetCheckResult(
        check_name="accuracy_sla", passed=not failing, severity=AssetCheckSeverity.ERROR,
        metadata={"min_accuracy": config.min_accuracy, "min_reviewed": config.min_reviewed,
                  "releases": MetadataValue.md(markdown_table(sla_frame, 10)),
                  **({"first_failure": f"{failing[0]['release']} ({failing[0]['channel']}): "
                                       f"accuracy {failing[0]['accuracy']} on "
                                       f"{failing[0]['reviewed']} reviewed < "
                                       f"{config.min_accuracy}"} if failing else {})})
    flagged = drift_frame[drift_frame["flagged"]] if len(drift_frame) else drift_frame
    yield AssetCheckResult(
        check_name="no_output_drift", passed=flagged.empty, severity=AssetCheckSeverity.WARN,
        metadata={"alpha": config.drift_alpha, "window": config.drift_window,
                  "releases": MetadataValue.md(markdown_table(drift_frame, 10)),
                  **({"first_failure": f"{flagged.iloc[0]['release']}: outputs shifted "
                                       f"(min p {max(flagged.iloc[0]['min_p'], 1e-6):.2g} on "
                                       f"{flagged.iloc[0]['window']} records)"}
                     if len(flagged) else {})})


class AnnotationQueueConfig(Config):
    size: int = Field(100, description="Images per queue (the annotation budget of one turn).")
    diversity_decay: float = Field(0.5, description="Score factor per queued image with the "
                                                     "same top-2 class pair.")
    max_hamming: int = Field(4, description="pHash bits within which an image is a near-duplicate "
                                            "of one already queued.")
    explore_share: float = Field(0.2, description="Share of the queue filled with a seeded random "
                                                  "sample of the other candidates (exploration).")


@asset(group_name="learn", io_manager_key="tables", kinds={"python", "labelstudio"},
       description="What to label next: field errors first, then the most uncertain, kept "
                   "diverse, plus a random share; a Label Studio import (+ images) and a CSV. Drop the completed "
                   "export back as a marked drop and it flows through ingest into the pool.")
def annotation_queue(context: AssetExecutionContext, config: AnnotationQueueConfig,
                     feedback: pd.DataFrame, labeled_pool: pd.DataFrame,
                     storage: CvopsStorage, contracts: DataContracts):
    store = storage.store()
    records = resolve_records(feedback)
    experts = set()
    if len(labeled_pool):
        expert = labeled_pool["annotators"].map(
            lambda names: any(not str(n).startswith(OPERATOR_PREFIX) for n in names))
        experts = set(labeled_pool.loc[expert, "image_id"])
    queue = build_queue(records, experts, QueuePolicy(config.size, config.diversity_decay,
                                                      config.max_hamming, config.explore_share))
    queue_id = "q-" + hashlib.sha256("".join(queue["image_id"]).encode()).hexdigest()[:12]
    prefix = f"annotation/queues/{queue_id}"
    for key in queue["key"]:  # images/<aa>/<sha256>.<ext> -> <queue>/images/<sha256>.<ext>
        store.write_bytes(f"{prefix}/images/{key.rsplit('/', 1)[-1]}", store.read_bytes(key))
    store.write_bytes(f"{prefix}/tasks.json", export_json(labelstudio_queue_tasks(queue, queue_id)))
    store.write_bytes(f"{prefix}/labelstudio_config.xml",
                      labelstudio_queue_config(contracts.ontology().names).encode())
    store.write_bytes(f"{prefix}/queue.csv", queue.to_csv(index=False).encode())
    reasons = queue["reason"].value_counts().to_dict()
    pairs = queue.groupby(["predicted", "second"]).size().sort_values(ascending=False)
    return Output(queue.assign(queue_id=queue_id), metadata={
        "queue_id": queue_id, "queued": len(queue), "by_reason": MetadataValue.json(reasons),
        "candidates_already_expert_labeled": len(experts),
        "distinct_class_pairs": len(pairs),
        "largest_pair_share": round(float(pairs.iloc[0] / len(queue)), 3) if len(queue) else 0.0,
        "top": MetadataValue.md(markdown_table(queue[["rank", "reason", "score", "predicted",
                                                      "second", "corrected_label"]], 15)),
        "labelstudio_import": MetadataValue.url(store.uri(f"{prefix}/tasks.json")),
        "labelstudio_config": MetadataValue.url(store.uri(f"{prefix}/labelstudio_config.xml")),
        "csv": MetadataValue.url(store.uri(f"{prefix}/queue.csv")),
        "folder": MetadataValue.url(store.uri(prefix)),
    })


class OntologyReportConfig(Config):
    rare_share: float = Field(0.2, description="Rarely predicted: predicted share below this "
                                               "fraction of the class's reviewed share.")
    merge_rate: float = Field(0.15, description="Merge candidates: confused both ways this often.")


@asset(group_name="learn", io_manager_key="tables", kinds={"python"},
       description="Classes never or rarely predicted in the field, the most confused pairs, and "
                   "merge/split suggestions for the next ontology version.")
def ontology_report(context: AssetExecutionContext, config: OntologyReportConfig,
                    feedback: pd.DataFrame, contracts: DataContracts):
    records = resolve_records(feedback)
    ontology = contracts.ontology()
    per_class, pairs, suggestions = build_report(
        records, ontology.names, OntologyPolicy(config.rare_share, config.merge_rate))
    png = ontology_png(per_class)
    return Output({"ontology_version": ontology.version,
                   "per_class": per_class.to_dict(orient="records"),
                   "confused_pairs": pairs.head(20).to_dict(orient="records"),
                   "suggestions": suggestions.to_dict(orient="records")}, metadata={
        "ontology_version": ontology.version, "suggestions": len(suggestions),
        "suggestion_list": MetadataValue.md(markdown_table(suggestions, 20)),
        "most_confused_pairs": MetadataValue.md(markdown_table(pairs, 10)),
        "per_class": MetadataValue.md(markdown_table(per_class, 100)),
        "plot": MetadataValue.md(md_image(png, "predicted vs reviewed class shares")),
    })
