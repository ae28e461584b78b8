"""The task registry: which task an ontology names, and its pieces per stage.

A task is one module here (a `Task` subclass: each stage's piece, built from the stage modules
in core/<stage>/) and one entry in TASKS. Assets resolve the task once from the ontology and ask
it for the piece; nothing outside this package and the task's own modules tests which task it
is. `register` adds a task (a plugin's, or a test's) without editing any asset.
"""

from __future__ import annotations

from cvops_pipelines.core.base.ontology import Ontology
from cvops_pipelines.core.tasks.classification import CLASSIFICATION
from cvops_pipelines.core.tasks.detection import DETECTION
from cvops_pipelines.core.tasks.task import StageContext, Task, TaskRefused

TASKS: dict[str, Task] = {task.name: task for task in (CLASSIFICATION, DETECTION)}


def register(task: Task) -> Task:
    """Add (or replace) a task under its name; an ontology may then name it."""
    TASKS[task.name] = task
    return task


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise TaskRefused(f"no task {name!r} is registered (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]


def task_labels() -> dict[str, str]:
    """Each registered task's label kind: what an ontology naming it labels (`load_ontology`)."""
    return {name: task.labels for name, task in TASKS.items()}


def task_for(ontology: Ontology) -> Task:
    """The task the ontology names."""
    return task_named(ontology.task)


__all__ = [
    "TASKS",
    "StageContext",
    "Task",
    "TaskRefused",
    "register",
    "task_for",
    "task_labels",
    "task_named",
]
