"""A stage's result (core/base/report.py) as Dagster outputs, metadata and check results."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    DataVersion,
    MetadataValue,
    Output,
)

from cvops_pipelines.core.base.plots import md_image
from cvops_pipelines.core.base.report import Check, Json, Link, Plot, StageResult, Table
from cvops_pipelines.core.base.tables import markdown_table


def metadata_value(value):
    if isinstance(value, Table):
        return MetadataValue.md(markdown_table(value.frame, value.max_rows))
    if isinstance(value, Plot):
        return MetadataValue.md(md_image(value.png, value.alt))
    if isinstance(value, Link):
        return MetadataValue.url(value.url)
    if isinstance(value, Json):
        return MetadataValue.json(value.value)
    return value


def metadata(values: dict) -> dict:
    return {k: metadata_value(v) for k, v in values.items()}


def check_result(check: Check) -> AssetCheckResult:
    return AssetCheckResult(
        check_name=check.name,
        passed=check.passed,
        severity=AssetCheckSeverity.ERROR if check.blocking else AssetCheckSeverity.WARN,
        metadata=metadata(check.metadata),
    )


def outputs(result: StageResult):
    """The asset's Output, then its check results (for a generator asset body)."""
    version = DataVersion(result.data_version) if result.data_version else None
    yield Output(result.value, metadata=metadata(result.metadata), data_version=version)
    for check in result.checks:
        yield check_result(check)


def output(result: StageResult) -> Output:
    """The Output of a piece that has no checks."""
    assert not result.checks, "a result with checks is yielded with outputs()"
    version = DataVersion(result.data_version) if result.data_version else None
    return Output(result.value, metadata=metadata(result.metadata), data_version=version)
