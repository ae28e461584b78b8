"""What a task is to the loop: the pieces each stage asks it for.

An asset resolves its task once from the ontology (`core.tasks.task_for`) and asks it for the
piece; it never tests which task it is. A task that does not supply a piece says so by name,
instead of the asset silently doing another task's work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from cvops_pipelines.core.base.handoffs import TrainedModelRecord
from cvops_pipelines.core.base.ontology import Ontology
from cvops_pipelines.core.base.report import StageResult
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.base.tracking import Tracking


class TaskRefused(ValueError):
    """A setting or a piece this task does not have; the message names the task."""


@dataclass(frozen=True)
class StageContext:
    """What every piece may use: the store, the tracking server (None: curation without it),
    the ontology, where to say progress and warnings, and the run's id (for report paths)."""

    store: Store
    tracking: Tracking | None
    ontology: Ontology
    log: Callable[[str], None]
    warn: Callable[[str], None]
    run_id: str
    tags: dict


class Task:
    """Each stage's piece for one task. Settings arrive as the asset's config (any object
    with the named fields); a piece refuses one it cannot honour (`refuse`)."""

    name = "task"
    labels = "class"  # what its ontology's label is: "class" per image, or "boxes"
    model_name = "cvops-model"  # the registered model's default name

    def refuse(self, what: str) -> TaskRefused:
        return TaskRefused(f"task {self.name!r}: {what}")

    def _missing(self, piece: str):
        raise self.refuse(f"has no {piece} piece (register one in core/tasks/)")

    # curate
    def pool(self, raw_images: pd.DataFrame, annotations: pd.DataFrame) -> StageResult:
        self._missing("labeled pool")

    def label_issues(self, ctx: StageContext, pool: pd.DataFrame, settings) -> StageResult:
        self._missing("label QA")

    # build
    hyperparameters: type | None = None  # the trainer's config dataclass (torchrun's options)

    def train(self, ctx: StageContext, dataset: pd.DataFrame, settings, trainer) -> StageResult:
        """`trainer`: (how to train, its params for the run) when not in this process."""
        self._missing("training")

    def quick(self, epochs: int) -> dict:
        """trained_model config for a quick retrain of `epochs` epochs (between sub-batches)."""
        self._missing("quick retrain")

    def classes(self, rows: pd.DataFrame) -> list[str]:
        """The model's classes, from the dataset version."""
        self._missing("classes")

    def fit(self, inputs):
        """Train in this process (under torchrun: this process's shard) -> FitResult."""
        self._missing("trainer")

    # measure
    def evaluate(
        self, ctx, challenger, champion, trained: TrainedModelRecord, dataset, replay, settings
    ) -> StageResult:
        self._missing("evaluation")

    # ship
    def export(self, ctx: StageContext, loaded, dataset: pd.DataFrame, policy):
        self._missing("export")

    def canary_replay(self, releases, paired: pd.DataFrame, canary: str, stable: str, rule, op):
        """Both releases answer the same reviewed field records (`core.ship.canary.PairedReplay`):
        (the comparison, the records replayed)."""
        self._missing("canary replay")

    # learn
    def production(self, ctx: StageContext, feedback, releases, settings) -> StageResult:
        self._missing("production metrics")

    def queue(self, ctx: StageContext, feedback, pool: pd.DataFrame, settings) -> StageResult:
        self._missing("annotation queue")
