"""Environment variables cvops reads, with the embedded local defaults.

One place, so the README, the resources and the CLI agree on names and defaults.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
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
    """The registered model (CVOPS_MODEL_NAME): by default the ontology's task's
    (`cvops-classifier`, `cvops-detector`), so a detector never competes with a classifier for
    the same `champion` alias."""
    if os.environ.get("CVOPS_MODEL_NAME"):
        return os.environ["CVOPS_MODEL_NAME"]
    from cvops_pipelines.core.base.ontology import OntologyError, load_ontology
    from cvops_pipelines.core.tasks import TaskRefused, task_for, task_labels

    try:
        return task_for(load_ontology(ontology_path(), task_labels())).model_name
    except (OntologyError, TaskRefused):
        # the ontology's own error surfaces where the ontology is read
        return "cvops-classifier"


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


def labelstudio_settings() -> dict:
    """The annotation backend: a Label Studio URL (CVOPS_LABELSTUDIO_URL; empty: annotation
    tasks stay files), its local-files document root as this machine sees it
    (CVOPS_LABELSTUDIO_FILES_ROOT; empty: the cvops store's root). The token
    (CVOPS_LABELSTUDIO_TOKEN) is read by the resource, never here."""
    return {
        "url": os.environ.get("CVOPS_LABELSTUDIO_URL", ""),
        "files_root": os.environ.get("CVOPS_LABELSTUDIO_FILES_ROOT", ""),
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
    return _artifact_root(s3["bucket"], s3["prefix"], cvops_home())


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


LOOP_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")


@dataclass(frozen=True)
class Project:
    """One loop's own places: where its data, drops, ontology, experiment and registered model
    live. Several projects run side by side in one Dagster deployment (each its own code
    location, asset-key prefix and partitions) without sharing any history.

    The default project (name "") is what the environment names, with unprefixed asset keys.
    A named project's places default to its own (`Project.named`): `<CVOPS_HOME>-<name>` (S3:
    `<prefix>/<name>`), its drops under that home, the ontology `<contracts>/<name>.yaml`, the
    experiment and registered model `cvops-<name>`.
    """

    name: str
    home: Path
    drops: str
    contracts_dir: Path
    ontology: Path
    model_name: str
    experiment: str
    s3_bucket: str
    s3_prefix: str
    tracking_uri: str
    artifact_root: str

    @classmethod
    def from_env(cls) -> Project:
        """The project this process runs: the environment's places as they are, named by
        CVOPS_LOOP (empty: the default project)."""
        name = _loop_name(os.environ.get("CVOPS_LOOP", ""))
        return cls(
            name=name,
            home=cvops_home(),
            drops=drops_uri(),
            contracts_dir=contracts_dir(),
            ontology=ontology_path(),
            model_name=model_name(),
            experiment=f"cvops-{name}" if name else "cvops",
            s3_bucket=s3_settings()["bucket"],
            s3_prefix=s3_settings()["prefix"],
            tracking_uri=mlflow_tracking_uri(),
            artifact_root=mlflow_artifact_root(),
        )

    @classmethod
    def named(cls, name: str, **places) -> Project:
        """A named project beside the environment's default one, in places of its own unless
        given: `Project.named("scenes", ontology="data_contracts/scenes.yaml")`."""
        name = _loop_name(name)
        if not name:
            raise ValueError("a named project needs a name; Project.from_env() is the default")
        s3 = s3_settings()
        prefix = "/".join(p for p in (s3["prefix"].strip("/"), name) if p)
        home = Path(places.pop("home", None) or _beside(cvops_home(), name)).absolute()
        values = {
            "name": name,
            "home": home,
            "drops": str(home / "drops"),
            "contracts_dir": contracts_dir(),
            "ontology": contracts_dir() / f"{name}.yaml",
            "model_name": f"cvops-{name}",
            "experiment": f"cvops-{name}",
            "s3_bucket": s3["bucket"],
            "s3_prefix": prefix,
            "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{home / 'mlflow.db'}",
            "artifact_root": _artifact_root(s3["bucket"], prefix, home),
        }
        unknown = set(places) - set(values)
        if unknown:
            raise TypeError(f"unknown project places: {sorted(unknown)}")
        values.update({k: v for k, v in places.items() if v is not None})
        for path in ("contracts_dir", "ontology"):
            values[path] = Path(values[path]).absolute()
        return cls(**values)

    def environment(self) -> dict[str, str]:
        """The same places as environment variables, for a process the loop starts (a
        distributed training run) or a command run against this project."""
        return {
            "CVOPS_LOOP": self.name,
            "CVOPS_HOME": str(self.home),
            "CVOPS_DROPS": self.drops,
            "CVOPS_CONTRACTS_DIR": str(self.contracts_dir),
            "CVOPS_ONTOLOGY": str(self.ontology),
            "CVOPS_MODEL_NAME": self.model_name,
            "CVOPS_S3_PREFIX": self.s3_prefix,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
        }


def _loop_name(name: str) -> str:
    if name and not LOOP_NAME.match(name):
        raise ValueError(
            f"loop name {name!r}: use lowercase letters, digits and '_' (it prefixes the "
            "loop's asset keys and partitions)"
        )
    return name


def _beside(home: Path, name: str) -> Path:
    return home.with_name(f"{home.name}-{name}")


def _artifact_root(bucket: str, prefix: str, home: Path) -> str:
    if bucket:
        endpoint = s3_settings()["endpoint_url"]
        if endpoint:
            os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)
        return f"s3://{bucket}/" + "/".join(p for p in (prefix.strip("/"), "mlartifacts") if p)
    return str(home / "mlartifacts")


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
  TORCH_HOME             torch cache holding pretrained weights (hub/checkpoints/); weights
                         not there are downloaded once, hash-checked, unless CVOPS_OFFLINE=1
  CVOPS_LOOP             run a named loop of a deployment that holds several (its asset
                         keys, partitions, home, experiment and model carry the name)
  DAGSTER_HOME           Dagster instance (default ./.dagster_home)
"""
