"""What flows from training to the fleet, typed: `trained_model`, `model_evaluation`,
`onnx_model` and `edge_release` each pass one of these records to the next asset. Each names its
task and its fields, so the UI (the asset's output type), the IO manager (JSON, never a pickle)
and a reader agree on what arrives; a stored record missing a field fails with the record's name
and the field, not with a KeyError three stages later."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar


class HandoffError(ValueError):
    """A stored hand-off record that is not the record its reader expects."""


@dataclass(frozen=True)
class Handoff:
    asset: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise HandoffError(f"{cls.asset}: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        missing = [
            name
            for name, f in known.items()
            if name not in data and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            raise HandoffError(
                f"{cls.asset}: the stored record lacks {', '.join(missing)}; materialize "
                f"{cls.asset} again so it is written by this version"
            )
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class TrainedModelRecord(Handoff):
    """A registered challenger (alias `challenger`): what evaluation and export load."""

    asset: ClassVar[str] = "trained_model"
    task: str
    model_name: str
    model_version: str
    run_id: str
    dataset_version: str
    dataset_images: int
    architecture: str
    image_size: int
    classes: list[str]
    best_epoch: int
    stopped_early: bool
    train_images_per_second: float
    validation: dict[str, float]  # named for what they are: accuracy, or map, map_50, ...
    answer_threshold: float | None = None  # a detector's operating point
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationRecord(Handoff):
    """The gate's decision on the challenger, with the headline figures it decided on."""

    asset: ClassVar[str] = "model_evaluation"
    task: str
    model_name: str
    challenger_version: str
    champion_version: str | None
    run_id: str
    dataset_version: str
    test_images: int
    challenger: dict[str, float]  # accuracy, macro_f1, ece; or map, map_50
    champion: dict[str, float] | None
    gate_passed: bool
    gate_reasons: list[str]
    gate_notes: list[str] = field(default_factory=list)
    replay: list[dict] | None = None


@dataclass(frozen=True)
class ExportRecord(Handoff):
    """The proven ONNX artifacts of one model version, and the one chosen per target."""

    asset: ClassVar[str] = "onnx_model"
    task: str
    source_model_version: str
    model_name: str
    dataset_version: str
    run_id: str
    preprocess: dict  # the release's spec
    artifacts: dict[str, dict]  # name -> key, uri, sha256, bytes
    choices: dict[str, str]  # target profile -> artifact
    registered: dict = field(default_factory=dict)
    parity: list | dict = field(default_factory=dict)
    measurements: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class ReleaseRecord(Handoff):
    """A signed release on the canary channel: what the canary decision judges."""

    asset: ClassVar[str] = "edge_release"
    release: str
    parent: str | None
    uri: str
    model_name: str
    model_version: str
    dataset_version: str
    artifact: str
    target: str
    model_bytes: int
    delta_bytes: int | None
    canary: dict | None
