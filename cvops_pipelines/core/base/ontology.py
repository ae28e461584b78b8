"""The versioned class list every label is checked against (data_contracts/ontology.yaml)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

# What a label is, for each built-in task (the registry, core/tasks/, passes its own): one
# class per image, or a set of boxes (an empty set: an image looked at and holding no objects).
TASK_LABELS = {"classification": "class", "detection": "boxes"}
# The label of "this image was looked at and holds no objects": a detection negative. No class
# can be named "" (names must be non-empty), and a classification dataset has no such label.
NO_OBJECTS = ""
# Boxes one image may hold (the box contract's default bound, and what ingest admits): every
# step that compares an image's boxes pairwise stays bounded by it.
MAX_BOXES_PER_IMAGE = 100


class OntologyError(ValueError):
    """The ontology file itself is malformed."""


@dataclass(frozen=True)
class OntologyClass:
    id: int
    name: str
    description: str = ""
    parent: str | None = None
    event: bool = False  # an event the business counts (missed events, false alarms)


@dataclass(frozen=True)
class Ontology:
    name: str
    version: int
    classes: tuple[OntologyClass, ...]
    path: str = "data_contracts/ontology.yaml"
    changes: tuple[dict, ...] = field(default_factory=tuple)
    task: str = "classification"
    labels: str = "class"  # what a label is (its task's): "class" per image, or "boxes"

    @property
    def boxes(self) -> bool:
        """A label is a set of boxes, and an image may be a negative (NO_OBJECTS)."""
        return self.labels == "boxes"

    @property
    def image_labels(self) -> list[str]:
        """What one image's label may be: a class or, for boxes, also NO_OBJECTS."""
        return [*self.names, *([NO_OBJECTS] if self.boxes else [])]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def event_classes(self) -> list[str]:
        return [c.name for c in self.classes if c.event]

    def __contains__(self, label: object) -> bool:
        return label in self._name_set

    @property
    def _name_set(self) -> frozenset[str]:
        return frozenset(self.names)

    def unknown_class_message(self, label: str) -> str:
        known = ", ".join(self.names[:30]) + (" …" if len(self.names) > 30 else "")
        return (
            f"class {label!r} is not in {self.path} (version {self.version}); "
            f"known classes: {known}"
        )


_STR, _INT = ("tag:yaml.org,2002:str", "tag:yaml.org,2002:int")
_BAD_NAME = re.compile(r"[/\\\x00-\x1f]")


def has_boxes(labels) -> bool:
    """Whether a table of labels (a pool, a dataset version) holds box sets: its schema says
    what a label is, so curation reads it there rather than asking which task it serves."""
    return "boxes" in labels


def load_ontology(path: str | Path, tasks: dict[str, str] = TASK_LABELS) -> Ontology:
    """Load and validate the ontology; every error names the file and, where there is one, the
    line. YAML's traps are refused, not converted: an unquoted `on`, `no` or `null` as a class
    name would otherwise become True, False or None. `tasks`: the task names it may name, with
    what each one's label is (the registry's, core/tasks/, where one is registered beyond the
    built-in ones)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OntologyError(f"ontology file {path} not found; set CVOPS_CONTRACTS_DIR") from None
    except UnicodeDecodeError as exc:
        raise OntologyError(f"{path} is not valid YAML: {exc}") from None
    return _parse(path, text, tuple(tasks.items()))


@lru_cache(maxsize=32)
def _parse(path: Path, text: str, task_items: tuple[tuple[str, str], ...]) -> Ontology:
    """The file's text parsed once per process: every run and sensor tick reads the ontology, and
    pure-Python YAML took 10-30 ms each time. Keyed by the text, so an edit is read at once."""
    tasks = dict(task_items)
    try:
        root = yaml.compose(text)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise OntologyError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list) or not doc["classes"]:
        raise OntologyError(f"{path}: expected a mapping with a non-empty 'classes' list")
    nodes = dict((k.value, v) for k, v in root.value)
    version = doc.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        line = nodes["version"].start_mark.line + 1 if "version" in nodes else 1
        raise OntologyError(f"{path}:{line}: version must be a whole number >= 1, got {version!r}")
    task = doc.get("task", "classification")
    if task not in tasks:
        line = nodes["task"].start_mark.line + 1
        raise OntologyError(f"{path}:{line}: task must be one of {', '.join(tasks)}, got {task!r}")
    classes = [
        _class(path, i, item, node)
        for i, (item, node) in enumerate(zip(doc["classes"], nodes["classes"].value))
    ]
    for attr in ("id", "name"):
        values = [getattr(c, attr) for c in classes]
        dupes = sorted({str(v) for v in values if values.count(v) > 1})
        if dupes:
            raise OntologyError(f"{path}: duplicate class {attr}s: {', '.join(dupes)}")
    seen: dict[str, str] = {}
    for c in classes:
        if c.name.casefold() in seen:
            raise OntologyError(
                f"{path}: class names {seen[c.name.casefold()]!r} and {c.name!r} differ only in "
                "case: one class, or two names people will confuse"
            )
        seen[c.name.casefold()] = c.name
    names = {c.name for c in classes}
    for c in classes:
        if c.parent is not None and c.parent not in names:
            raise OntologyError(
                f"{path}: class {c.name!r} names parent {c.parent!r}, which is not a class"
            )
    return Ontology(
        str(doc.get("name", path.stem)),
        version,
        tuple(classes),
        str(path),
        tuple(doc.get("changes") or ()),  # shared by every caller of the cache: read, never edit
        task,
        tasks[task],
    )


def _class(path: Path, i: int, item, node) -> OntologyClass:
    where = f"{path}:{node.start_mark.line + 1}: classes[{i}]"
    if not isinstance(item, dict) or "name" not in item or "id" not in item:
        raise OntologyError(f"{where} needs 'id' and 'name'")
    fields = {k.value: v for k, v in node.value}
    name_node, name = fields["name"], item["name"]
    if name_node.tag != _STR:
        raise OntologyError(
            f"{where}: name {name_node.value!r} loads as {name!r}, not text: "
            f'quote it (name: "{name_node.value}")'
        )
    if not name.strip() or name != name.strip() or _BAD_NAME.search(name):
        raise OntologyError(
            f"{where}: name {name!r} must be non-empty text without leading or "
            "trailing spaces, slashes or control characters"
        )
    if fields["id"].tag != _INT:
        raise OntologyError(f"{where}: id {item['id']!r} must be a whole number")
    parent = item.get("parent")
    if parent is not None and ("parent" not in fields or fields["parent"].tag != _STR):
        raise OntologyError(f"{where}: parent {parent!r} must be a quoted class name")
    event = item.get("event", False)
    if not isinstance(event, bool):
        raise OntologyError(f"{where}: event must be true or false, got {event!r}")
    return OntologyClass(int(item["id"]), name, str(item.get("description", "")), parent, event)


def class_indices(labels, classes) -> np.ndarray:
    """Labels as indices into `classes` (a model's output order): the one class<->index
    mapping. A label the list lacks is an error, not a silent NaN."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(label) for label in labels if label not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {list(classes)}")
    return np.array([index[label] for label in labels], dtype=int)
