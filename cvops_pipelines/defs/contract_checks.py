"""Asset checks: GX suites from data_contracts/gx/ surfaced as blocking checks, and the shape
every other check result takes."""

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetKey, MetadataValue

from cvops_pipelines.core.base.contracts import ContractResult


def check_name(asset: str, suite: str) -> str:
    return f"{asset}_contract" if suite == asset else suite


def contract_spec(asset: str, suite: str | None = None, what: str = "") -> AssetCheckSpec:
    suite = suite or asset
    return AssetCheckSpec(
        name=check_name(asset, suite),
        asset=AssetKey(asset),
        blocking=True,
        description=f"{what + ' ' if what else ''}Great Expectations suite "
        f"data_contracts/gx/{suite}.json; a failure stops every downstream asset "
        "in the run.",
    )


def contract_check_result(asset: str, result: ContractResult) -> AssetCheckResult:
    failures = result.failures
    metadata = {
        "rows_validated": result.rows,
        "expectations": len(result.outcomes),
        "failed_expectations": len(failures),
        "unexpected_rows": sum(o.unexpected_count or 0 for o in failures),
        "results": MetadataValue.md(result.markdown()),
    }
    if result.docs_uri:
        metadata["data_docs"] = MetadataValue.url(result.docs_uri)
    if failures:
        metadata["first_failure"] = (
            f"{failures[0].expectation} ({failures[0].kwargs}): examples {failures[0].examples[:5]}"
        )
    return AssetCheckResult(
        check_name=check_name(asset, result.suite),
        passed=result.success,
        severity=AssetCheckSeverity.ERROR,
        metadata=metadata,
    )


def check_result(
    name: str, failure: str | None, severity: AssetCheckSeverity, **metadata
) -> AssetCheckResult:
    """A check that passed when there is no `failure`; the failure, when there is one, is its
    `first_failure` metadata (what the UI and the demo show first)."""
    extra = {"first_failure": failure} if failure else {}
    return AssetCheckResult(
        check_name=name, passed=failure is None, severity=severity, metadata={**metadata, **extra}
    )
