"""Run a Great Expectations (GX Core 1.x) suite stored as JSON in data_contracts/ on a DataFrame.

The suites live as files so they are reviewed like code and shared by every stage; run-time
values (ontology classes, size limits) are filled through GX `$PARAMETER`s. Data Docs are built
in a scratch directory and copied into the store under `reports/gx/`, so they land next to the
data whether the store is local or S3.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tables import TableFile

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

DOCS_PREFIX = "reports/gx"


@dataclass(frozen=True)
class Outcome:
    expectation: str
    kwargs: str  # the columns / bounds, for humans
    success: bool
    unexpected_count: int | None
    examples: list = field(default_factory=list)


@dataclass
class ContractResult:
    suite: str
    success: bool
    outcomes: list[Outcome]
    rows: int
    docs_uri: str | None = None

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.success]

    def markdown(self) -> str:
        lines = ["| expectation | on | ok | unexpected | examples |", "|---|---|---|---|---|"]
        for o in sorted(self.outcomes, key=lambda o: o.success):
            examples = ", ".join(map(str, o.examples[:5])).replace("|", "\\|")
            lines.append(
                f"| {o.expectation} | {o.kwargs} | {'✅' if o.success else '❌'} | "
                f"{'' if o.unexpected_count is None else o.unexpected_count} | {examples} |"
            )
        return "\n".join(lines)


class ContractError(ValueError):
    """The suite file is missing or invalid."""


def load_suite(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ContractError(f"GX suite {path} not found; set CVOPS_CONTRACTS_DIR") from None
    except json.JSONDecodeError as exc:
        raise ContractError(f"GX suite {path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "expectations" not in doc:
        raise ContractError(f"GX suite {path} needs 'name' and 'expectations'")
    return doc


def _describe(kwargs: dict) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("batch_id", "result_format")}
    return ", ".join(f"{k}={v}" for k, v in shown.items())[:160]


def _plain(value):
    """numpy scalars (and tuples of them) as plain Python values, for readable metadata."""
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value.item() if hasattr(value, "item") else value


def _frame_for_gx(df: pd.DataFrame) -> pd.DataFrame:
    """List-valued columns (e.g. aliases) become JSON text: kept for column-set checks, and
    no metric chokes on unhashable cells."""
    out = df.copy()
    for col in out.columns:
        if (
            out[col].dtype == object
            and out[col]
            .map(lambda v: hasattr(v, "__len__") and not isinstance(v, (str, bytes)))
            .any()
        ):
            out[col] = out[col].map(lambda v: json.dumps(list(v), default=str))
    return out


def validate(
    df: pd.DataFrame,
    suite_path: Path,
    parameters: dict | None = None,
    docs_store: Store | None = None,
    run_name: str = "cvops",
) -> ContractResult:
    import great_expectations as gx

    doc = load_suite(suite_path)
    name = doc.get("name", Path(suite_path).stem)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    scratch = tempfile.TemporaryDirectory(prefix="cvops-gx-")
    actions = []
    if docs_store is not None:
        context.add_data_docs_site(
            site_name="cvops",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": scratch.name,
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["cvops"]))
    batch = (
        context.data_sources.add_pandas("cvops")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("batch")
    )
    suite = context.suites.add(
        gx.ExpectationSuite(name=name, expectations=doc["expectations"], meta=doc.get("meta"))
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=name,
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 10},
        )
    )
    result = checkpoint.run(
        batch_parameters={"dataframe": _frame_for_gx(df)},
        expectation_parameters=parameters or {},
        run_id=gx.core.run_identifier.RunIdentifier(run_name=run_name),
    )
    outcomes = []
    for validation in result.run_results.values():
        for r in validation.results:
            cfg = r.expectation_config
            outcomes.append(
                Outcome(
                    cfg.type,
                    _describe(cfg.kwargs),
                    bool(r.success),
                    r.result.get("unexpected_count"),
                    [_plain(v) for v in r.result.get("partial_unexpected_list") or []],
                )
            )
            if r.exception_info and r.exception_info.get("raised_exception"):
                raise ContractError(
                    f"suite {name}: {cfg.type} could not run: "
                    f"{r.exception_info.get('exception_message')}"
                )
    docs_uri = _publish_docs(Path(scratch.name), docs_store) if docs_store is not None else None
    scratch.cleanup()
    return ContractResult(name, bool(result.success), outcomes, len(df), docs_uri)


UNIQUE = "expect_column_values_to_be_unique"


def validate_table(
    table: TableFile,
    suite_path: Path,
    parameters: dict | None = None,
    docs_store: Store | None = None,
    run_name: str = "cvops",
    chunk_rows: int = 10_000,
) -> ContractResult:
    """A table too large for memory, validated a chunk at a time: every expectation runs on
    every chunk and the outcomes add up. Uniqueness spans chunks, so it is counted on 64-bit
    hashes of the column over the whole table (8 bytes a row), as GX counts it: every row
    whose value occurs more than once. Data docs are built for the first chunk."""
    doc = load_suite(suite_path)
    unique = [e["kwargs"]["column"] for e in doc["expectations"] if e["type"] == UNIQUE]
    hashes: dict[str, list[np.ndarray]] = {c: [] for c in unique}
    merged: dict[tuple[str, str], Outcome] = {}
    rows, docs_uri, success, name = 0, None, True, doc.get("name", Path(suite_path).stem)
    if table.rows == 0:  # no chunks: the empty table (its columns) is what gets checked
        return validate(table.read(), suite_path, parameters, docs_store, run_name)
    for i, chunk in enumerate(table.chunks(chunk_rows)):
        result = validate(
            chunk, suite_path, parameters, docs_store if i == 0 else None, f"{run_name}-{i}"
        )
        # a GX context is a web of reference cycles holding its chunk: freed only by a full
        # collection, which Python runs rarely in a big heap; without this the chunks pile up
        # (13 MiB a chunk of 10k rows, measured) and memory grows with the table
        gc.collect()
        rows, docs_uri, success = (
            rows + result.rows,
            docs_uri or result.docs_uri,
            success and result.success,
        )
        for column in unique:
            hashes[column].append(pd.util.hash_pandas_object(chunk[column], index=False).to_numpy())
        for o in result.outcomes:
            seen = merged.get((o.expectation, o.kwargs))
            merged[(o.expectation, o.kwargs)] = (
                o
                if seen is None
                else Outcome(
                    o.expectation,
                    o.kwargs,
                    seen.success and o.success,
                    None
                    if seen.unexpected_count is None
                    else seen.unexpected_count + (o.unexpected_count or 0),
                    (seen.examples + o.examples)[:10],
                )
            )
    for (expectation, kwargs), o in list(merged.items()):
        column = next(
            (c for c in unique if expectation == UNIQUE and f"column={c}" in kwargs), None
        )
        if column is None or not hashes[column]:
            continue
        _, counts = np.unique(np.concatenate(hashes[column]), return_counts=True)
        repeated = int(counts[counts > 1].sum())
        merged[(expectation, kwargs)] = Outcome(
            expectation, kwargs, repeated == 0, repeated, o.examples
        )
        success = success and repeated == 0
    return ContractResult(name, success, list(merged.values()), rows, docs_uri)


def _publish_docs(site: Path, store: Store) -> str | None:
    """Copy the freshly built site into the store; return the URI of this run's page."""
    page = None
    for path in sorted(site.rglob("*")):
        if path.is_file():
            rel = path.relative_to(site).as_posix()
            store.write_bytes(f"{DOCS_PREFIX}/{rel}", path.read_bytes())
            if rel.startswith("validations/") and rel.endswith(".html"):
                page = rel
    return store.uri(f"{DOCS_PREFIX}/{page or 'index.html'}")
