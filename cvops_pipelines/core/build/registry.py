"""Registered models back as torch modules: the spec's `task` names which builder reads the
state dict (always with weights_only=True), so the tracking module stays free of model code."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from cvops_pipelines.core.base.tracking import ModelFiles, Tracking
from cvops_pipelines.core.build.detection_training import DetectorSpec, load_detector
from cvops_pipelines.core.build.models import Preprocess, load_model
from cvops_pipelines.core.build.ssl import TASK as SSL_TASK
from cvops_pipelines.core.build.ssl import EncoderSpec, load_encoder


@dataclass(frozen=True)
class LoadedModel:
    model: object
    preprocess: Preprocess | DetectorSpec | EncoderSpec  # the spec it was trained with
    version: str
    run_id: str


# spec task -> (spec reader, model builder); a classifier's spec may leave `task` out
BUILDERS: dict[str, tuple[Callable, Callable]] = {
    "classification": (Preprocess.from_json, load_model),
    "detection": (DetectorSpec.from_json, load_detector),
    SSL_TASK: (EncoderSpec.from_json, load_encoder),
}


def build(files: ModelFiles) -> LoadedModel:
    kind = json.loads(files.spec).get("task", "classification")
    if kind not in BUILDERS:
        raise ValueError(
            f"model version {files.version} was trained for task {kind!r}, which this cvops "
            f"cannot build (known: {', '.join(sorted(BUILDERS))})"
        )
    read_spec, make = BUILDERS[kind]
    spec = read_spec(files.spec)
    return LoadedModel(make(files.state, spec), spec, files.version, files.run_id)


def load(tracking: Tracking, alias: str | None = None, version: str | None = None):
    """A registered version by alias or number as a LoadedModel; None when the alias is not set."""
    files = tracking.files(alias=alias, version=version)
    return None if files is None else build(files)


def load_version(tracking: Tracking, version: str) -> LoadedModel:
    """A version that must exist (the one this run trained)."""
    loaded = load(tracking, version=version)
    if loaded is None:
        raise RuntimeError(
            f"model version {version} of {tracking.model_name} is not in the "
            f"registry at {tracking.tracking_uri}"
        )
    return loaded
