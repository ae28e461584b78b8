"""Parquet tables in a Store, written atomically (temp + rename locally, one PUT on S3)."""

from __future__ import annotations

import io

import pandas as pd

from cvops_pipelines.core.base.store import Store


def table_key(asset: str, partition: str | None = None) -> str:
    """Where an asset's table lives (one file per partition; `all` when unpartitioned)."""
    return f"tables/{asset}/{partition or 'all'}.parquet"


def record_key(asset: str, partition: str | None = None) -> str:
    """Where an asset's small record (a dict: a model's run, a summary) lives, as JSON."""
    return f"artifacts/{asset}/{partition or 'all'}.json"


def write_table(store: Store, key: str, df: pd.DataFrame) -> str:
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    store.write_bytes(key, buffer.getvalue())
    return store.uri(key)


def read_table(store: Store, key: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(store.read_bytes(key)))


def markdown_table(df: pd.DataFrame, max_rows: int = 10) -> str:
    """A small Markdown table for Dagster metadata (no tabulate dependency)."""
    if df.empty:
        return "_none_"
    shown = df.head(max_rows).astype(object).where(df.head(max_rows).notna(), "")
    escape = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [
        "| " + " | ".join(map(escape, shown.columns)) + " |",
        "|" + "---|" * len(shown.columns),
    ]
    lines += [
        "| " + " | ".join(escape(v) for v in row) + " |" for row in shown.itertuples(index=False)
    ]
    if len(df) > max_rows:
        lines.append(f"\n… {len(df) - max_rows} more rows")
    return "\n".join(lines)
