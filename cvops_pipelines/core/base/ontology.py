"""The versioned class list every label is checked against (data_contracts/ontology.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml


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


def load_ontology(path: str | Path) -> Ontology:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OntologyError(f"ontology file {path} not found; set CVOPS_CONTRACTS_DIR") from None
    except yaml.YAMLError as exc:
        raise OntologyError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list) or not doc["classes"]:
        raise OntologyError(f"{path}: expected a mapping with a non-empty 'classes' list")
    classes = []
    for i, item in enumerate(doc["classes"]):
        if not isinstance(item, dict) or "name" not in item or "id" not in item:
            raise OntologyError(f"{path}: classes[{i}] needs 'id' and 'name'")
        classes.append(
            OntologyClass(
                int(item["id"]),
                str(item["name"]),
                str(item.get("description", "")),
                item.get("parent"),
                bool(item.get("event", False)),
            )
        )
    for attr in ("id", "name"):
        values = [getattr(c, attr) for c in classes]
        dupes = sorted({str(v) for v in values if values.count(v) > 1})
        if dupes:
            raise OntologyError(f"{path}: duplicate class {attr}s: {', '.join(dupes)}")
    return Ontology(
        str(doc.get("name", path.stem)),
        int(doc.get("version", 1)),
        tuple(classes),
        str(path),
        tuple(doc.get("changes") or ()),
    )


def class_indices(labels, classes) -> np.ndarray:
    """Labels as indices into `classes` (a model's output order): the one class<->index
    mapping. A label the list lacks is an error, not a silent NaN."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(label) for label in labels if label not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {list(classes)}")
    return np.array([index[label] for label in labels], dtype=int)
