"""MLflow tracking and registry, the cvops way: state dict + JSON preprocessing, never a pickle.

Local default: `sqlite:///$CVOPS_HOME/mlflow.db` with artifacts under $CVOPS_HOME/mlartifacts;
or any tracking server from MLFLOW_TRACKING_URI. Aliases: `challenger` (set by training),
`champion` (set by promotion after the canary passes).
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

MODEL_DIR = "model"  # artifact folder of a run: state_dict.pt + preprocess.json


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached; the message says what to do."""


@dataclass(frozen=True)
class ModelFiles:
    """A registered version's files as stored: the state dict (read later with
    weights_only=True) and its JSON spec. Which model they build is the build stage's call
    (core/build/registry.py), so this module imports no model code."""

    state: bytes
    spec: str
    version: str
    run_id: str


@dataclass(frozen=True)
class Tracking:
    tracking_uri: str
    artifact_root: str = ""  # where a locally created experiment stores artifacts
    experiment: str = "cvops"
    model_name: str = "cvops-classifier"
    ui_url: str = ""  # where people open MLflow; default: the server, or `mlflow ui` locally

    @property
    def is_server(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    def check(self, timeout: float = 5.0) -> None:
        if not self.is_server:
            return
        try:
            with urllib.request.urlopen(f"{self.tracking_uri.rstrip('/')}/health", timeout=timeout):
                return
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingUnavailable(
                f"MLflow tracking server {self.tracking_uri} is unreachable ({exc}); start it, "
                "fix MLFLOW_TRACKING_URI, or unset it to track into the local sqlite store"
            ) from None

    def client(self):
        import mlflow
        from mlflow import MlflowClient

        self.check()
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        return MlflowClient(self.tracking_uri, self.tracking_uri)

    def experiment_id(self) -> str:
        client = self.client()
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = self.artifact_root or None
        if location and "://" not in location:
            # a local folder only makes sense for a local store; a server keeps its own
            location = None if self.is_server else Path(location).absolute().as_uri()
        return client.create_experiment(self.experiment, artifact_location=location)

    def _ui(self) -> str:
        return (
            self.ui_url or (self.tracking_uri if self.is_server else "http://127.0.0.1:5000")
        ).rstrip("/")

    def run_url(self, run_id: str) -> str:
        """A link for Dagster metadata: the run's page in the MLflow UI."""
        return f"{self._ui()}/#/experiments/{self.experiment_id()}/runs/{run_id}"

    def model_version_url(self, version: str, name: str | None = None) -> str:
        return f"{self._ui()}/#/models/{name or self.model_name}/versions/{version}"

    @contextmanager
    def start_run(self, name: str, tags: dict, nested: bool = False):
        """An MLflow run (fluent API, so nested trials attach to it) in the cvops experiment.
        A nested run names the experiment too: MLflow would put it in "Default", away from
        its parent."""
        import mlflow

        experiment = self.experiment_id()  # also checks the server
        with mlflow.start_run(
            experiment_id=experiment, run_name=name, tags=tags, nested=nested
        ) as run:
            yield run

    @staticmethod
    def log_params(params: dict) -> None:
        """Into the active run (inside `start_run`)."""
        import mlflow

        mlflow.log_params(params)

    @staticmethod
    def log_metrics(metrics: dict, step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    @staticmethod
    def log_dict(obj, name: str) -> None:
        import mlflow

        mlflow.log_dict(obj, name)

    def log_metric(self, run_id: str, name: str, value: float) -> None:
        """Into a finished run (evaluation adds to the training run)."""
        self.client().log_metric(run_id, name, value)

    def log_onnx(
        self, data: bytes, name: str, registered_name: str, requirements: list[str]
    ) -> str:
        """An ONNX model as a run artifact, registered as a new version of `registered_name`
        (which gets alias `challenger`); returns the version. Explicit requirements: MLflow's
        inference spawns a slow subprocess."""
        import mlflow
        import onnx

        info = mlflow.onnx.log_model(
            onnx.load_from_string(data),
            name=name,
            registered_model_name=registered_name,
            save_as_external_data=False,
            pip_requirements=requirements,
        )
        version = str(info.registered_model_version)
        self.client().set_registered_model_alias(registered_name, "challenger", version)
        return version

    def tag_version(self, version: str, key: str, value: str) -> None:
        self.client().set_model_version_tag(self.model_name, str(version), key, value)

    def version_run_id(self, version: str) -> str:
        return self.client().get_model_version(self.model_name, str(version)).run_id

    def run_params(self, run_id: str) -> dict[str, str]:
        """A run's logged parameters (as MLflow keeps them: text)."""
        return dict(self.client().get_run(run_id).data.params)

    @staticmethod
    def log_dataset(rows, version: str, source: str, context: str = "training") -> None:
        """The dataset version as the run's dataset input (name = version, digest = content)."""
        import mlflow

        dataset = mlflow.data.from_pandas(
            rows[["image_id", "label", "split"]],
            source=source,
            targets="label",
            name=version,
            digest=version.removeprefix("ds-"),
        )
        mlflow.log_input(dataset, context=context, tags={"dataset_version": version})

    def log_files(self, run_id: str, folder: str, files: dict[str, bytes]) -> None:
        """In-memory files as artifacts of a run, under `folder`."""
        client = self.client()
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                (Path(tmp) / name).write_bytes(content)
            client.log_artifacts(run_id, tmp, folder)

    def log_model_files(self, run_id: str, state: bytes, preprocess) -> None:
        """`preprocess`: any model spec with `to_json()`."""
        self.log_files(
            run_id,
            MODEL_DIR,
            {"state_dict.pt": state, "preprocess.json": preprocess.to_json().encode()},
        )

    def register(self, run_id: str, alias: str = "challenger", tags: dict | None = None) -> str:
        """Register the run's model folder as a new version and point `alias` at it."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            client.create_registered_model(self.model_name)
        except MlflowException:
            pass  # already registered
        source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_DIR}"
        version = client.create_model_version(self.model_name, source, run_id, tags=tags or {})
        client.set_registered_model_alias(self.model_name, alias, version.version)
        return str(version.version)

    def alias_version(self, alias: str) -> str | None:
        """The version an alias points at; None while it is not set."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client().get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException:
            return None

    def encoders(self) -> Tracking:
        """The same server, for the self-supervised encoders registered beside this model."""
        return replace(self, model_name=f"{self.model_name}-encoder")

    def set_alias(self, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(self.model_name, alias, version)

    def files(self, alias: str | None = None, version: str | None = None) -> ModelFiles | None:
        """A registered version's files by alias or number; None when the alias is not set."""
        import mlflow
        from mlflow.exceptions import MlflowException

        client = self.client()
        try:
            mv = (
                client.get_model_version_by_alias(self.model_name, alias)
                if alias
                else client.get_model_version(self.model_name, version)
            )
        except MlflowException:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp))
            spec = (local / "preprocess.json").read_text()
            state = (local / "state_dict.pt").read_bytes()
        return ModelFiles(state, spec, str(mv.version), mv.run_id)
