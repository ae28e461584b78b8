"""Environment variables cvops reads, with the embedded local defaults.

One place, so the README, the resources and the CLI agree on names and defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Nothing phones home: set before GX / MLflow / albumentations are imported anywhere.
for _name, _value in (("GX_ANALYTICS_ENABLED", "False"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                      ("NO_ALBUMENTATIONS_UPDATE", "1"), ("DAGSTER_DISABLE_TELEMETRY", "1")):
    os.environ.setdefault(_name, _value)


def cvops_home() -> Path:
    """Local root for everything cvops writes (CVOPS_HOME, default ./.cvops)."""
    return Path(os.environ.get("CVOPS_HOME", ".cvops")).expanduser().absolute()


def drops_uri() -> str:
    """The watched drop source: a local folder or s3://bucket/prefix (CVOPS_DROPS)."""
    return os.environ.get("CVOPS_DROPS") or str(cvops_home() / "drops")


def contracts_dir() -> Path:
    return Path(os.environ.get("CVOPS_CONTRACTS_DIR") or REPO_ROOT / "data_contracts").absolute()


def s3_settings() -> dict:
    return {
        "bucket": os.environ.get("CVOPS_S3_BUCKET", ""),
        "prefix": os.environ.get("CVOPS_S3_PREFIX", ""),
        "region": os.environ.get("CVOPS_S3_REGION") or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "endpoint_url": os.environ.get("CVOPS_S3_ENDPOINT_URL") or None,
    }
