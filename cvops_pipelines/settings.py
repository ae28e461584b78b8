"""Environment variables cvops reads, with the embedded local defaults.

One place, so the README, the resources and the CLI agree on names and defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Nothing phones home: set before GX / MLflow / albumentations are imported anywhere.
for _name, _value in (
    ("GX_ANALYTICS_ENABLED", "False"),
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("NO_ALBUMENTATIONS_UPDATE", "1"),
    ("DAGSTER_DISABLE_TELEMETRY", "1"),
    ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
):
    os.environ.setdefault(_name, _value)


def cvops_home() -> Path:
    """Local root for everything cvops writes (CVOPS_HOME, default ./.cvops)."""
    return Path(os.environ.get("CVOPS_HOME", ".cvops")).expanduser().absolute()


def drops_uri() -> str:
    """The watched drop source: a local folder or s3://bucket/prefix (CVOPS_DROPS)."""
    return os.environ.get("CVOPS_DROPS") or str(cvops_home() / "drops")


def contracts_dir() -> Path:
    return Path(os.environ.get("CVOPS_CONTRACTS_DIR") or REPO_ROOT / "data_contracts").absolute()


def ontology_path() -> Path:
    """The dataset's ontology, which also names its task (CVOPS_ONTOLOGY, default
    $CVOPS_CONTRACTS_DIR/ontology.yaml)."""
    return Path(os.environ.get("CVOPS_ONTOLOGY") or contracts_dir() / "ontology.yaml").absolute()


def model_name() -> str:
    """The registered model (CVOPS_MODEL_NAME): by default `cvops-detector` for a detection
    ontology and `cvops-classifier` otherwise, so a detector never competes with a classifier
    for the same `champion` alias."""
    if os.environ.get("CVOPS_MODEL_NAME"):
        return os.environ["CVOPS_MODEL_NAME"]
    from cvops_pipelines.core.base.ontology import OntologyError, load_ontology

    try:
        detection = load_ontology(ontology_path()).detection
    except OntologyError:
        detection = False  # the ontology's own error surfaces where the ontology is read
    return "cvops-detector" if detection else "cvops-classifier"


def s3_settings() -> dict:
    return {
        "bucket": os.environ.get("CVOPS_S3_BUCKET", ""),
        "prefix": os.environ.get("CVOPS_S3_PREFIX", ""),
        "region": os.environ.get("CVOPS_S3_REGION")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        "endpoint_url": os.environ.get("CVOPS_S3_ENDPOINT_URL") or None,
    }


def mlflow_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store under CVOPS_HOME (MLflow's file store is
    refused)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cvops_home() / 'mlflow.db'}"


def mlflow_ui_url() -> str:
    """Where people open the MLflow UI (CVOPS_MLFLOW_UI_URL, e.g. behind an ingress); empty: the
    tracking server itself, or `mlflow ui`'s http://127.0.0.1:5000 for the local store."""
    return os.environ.get("CVOPS_MLFLOW_UI_URL", "")


def mlflow_artifact_root() -> str:
    """Where a new MLflow experiment keeps artifacts: next to the cvops data (the S3 bucket
    when one is configured, else $CVOPS_HOME/mlartifacts)."""
    s3 = s3_settings()
    if s3["bucket"]:
        if s3["endpoint_url"]:
            os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", s3["endpoint_url"])
        prefix = "/".join(p for p in (s3["prefix"].strip("/"), "mlartifacts") if p)
        return f"s3://{s3['bucket']}/{prefix}"
    return str(cvops_home() / "mlartifacts")


def signing_key_path() -> Path:
    """The ed25519 private key that signs releases (CVOPS_SIGNING_KEY); never commit it."""
    return (
        Path(os.environ.get("CVOPS_SIGNING_KEY") or cvops_home() / "keys" / "release_signing.key")
        .expanduser()
        .absolute()
    )


def root_public_key_path() -> Path:
    """The root's public key (CVOPS_ROOT_PUBLIC_KEY, default root.pub beside the release key,
    where `cvops keygen --root` writes it): with it the pipeline reads only the key delegation
    the root signed; without it, none."""
    return (
        Path(os.environ.get("CVOPS_ROOT_PUBLIC_KEY") or signing_key_path().parent / "root.pub")
        .expanduser()
        .absolute()
    )


def cvops_store():
    """The cvops store the environment names: the S3 bucket when set, else CVOPS_HOME."""
    from cvops_pipelines.core.base.store import LocalStore, S3Store

    s3 = s3_settings()
    if s3["bucket"]:
        return S3Store(s3["bucket"], s3["prefix"], s3["region"], s3["endpoint_url"])
    return LocalStore(cvops_home())


# What --help of every command says about the environment it reads.
ENVIRONMENT_HELP = """environment:
  CVOPS_HOME             local root for images, tables, quarantine, reports (default ./.cvops)
  CVOPS_DROPS            watched drop source: folder or s3://bucket/prefix
                         (default $CVOPS_HOME/drops)
  CVOPS_S3_BUCKET        store artifacts in this S3 bucket instead of CVOPS_HOME
  CVOPS_S3_PREFIX        key prefix inside that bucket
  CVOPS_S3_REGION        region (default AWS_REGION or us-east-1)
  CVOPS_S3_ENDPOINT_URL  S3-compatible endpoint (MinIO, moto, ...)
  CVOPS_CONTRACTS_DIR    ontology + GX suites (default ./data_contracts)
  CVOPS_ONTOLOGY         the ontology file, whose `task` is classification or detection
                         (default $CVOPS_CONTRACTS_DIR/ontology.yaml)
  CVOPS_MODEL_NAME       registered model name (default cvops-classifier, or cvops-detector
                         for a detection ontology)
  CVOPS_SIGNING_KEY      release signing key (default $CVOPS_HOME/keys/release_signing.key)
  CVOPS_ROOT_PUBLIC_KEY  root public key: only the delegation it signed is read (default
                         root.pub beside the release key, when it exists)
  MLFLOW_TRACKING_URI    MLflow server (default sqlite:///$CVOPS_HOME/mlflow.db)
  TORCH_HOME             torch cache holding pretrained weights (hub/checkpoints/)
  DAGSTER_HOME           Dagster instance (default ./.dagster_home)
"""
