"""What every annotation importer yields: label records, or problems with their position."""

from __future__ import annotations

from dataclasses import dataclass

# Box units: "pixels" (x_min, y_min, x_max, y_max) or "fraction" of the image size, resolved to
# pixels once the image's size is known (YOLO and Label Studio store relative boxes).
PIXELS, FRACTION = "pixels", "fraction"

PROBLEMS = {
    "malformed_file": "the annotation file cannot be parsed",
    "malformed_record": "the record is missing fields or has wrong types",
    "unrecognized_file": "the file matches no supported annotation format",
    "unknown_class": "the class is not in the ontology",
    "missing_image": "the annotated image is not in the drop",
    "image_quarantined": "the annotated image was rejected by raw_images",
    "ambiguous_image": "the image reference matches several files in the drop",
    "invalid_box": "the box is empty, inverted or outside the image",
    "duplicate_id": "an id the file already used",
    "missing_box": "an object annotation without a box, under a detection ontology",
    "too_many_boxes": "more boxes on one image than the contract allows",
}


def box_numbers(values, what: str) -> tuple[float, ...] | str:
    """`values` as floats when each is a finite number of sane size (bools, text and numbers of
    any size refused without converting them), else why not."""
    from cvops_pipelines.edge.wire import MAX_COORDINATE, number_problem

    if not isinstance(values, list | tuple):
        return f"{what} must be a list of numbers, got {values!r:.80}"
    for value in values:
        problem = number_problem(value, -MAX_COORDINATE, MAX_COORDINATE)
        if problem:
            return f"{what}: {problem}"
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class LabelRecord:
    image_ref: str  # the image as the annotation file names it
    label: str
    annotation_file: str
    position: str  # "line 17", "annotations[3] (id=12)", ...
    annotator: str = ""
    box: tuple[float, float, float, float] | None = None
    box_units: str = PIXELS
    labeled_at: str | None = None  # ISO time when the tool recorded one
    origin: str = "drop"  # "annotation_queue" when the file answers a cvops queue
    object_annotation: bool = False  # one object of a box format: a detection dataset needs its box


@dataclass(frozen=True)
class LabelProblem:
    code: str
    detail: str
    annotation_file: str
    position: str = ""
    image_ref: str = ""

    @property
    def message(self) -> str:
        return (
            f"{self.annotation_file}{' ' + self.position if self.position else ''}: "
            f"{PROBLEMS[self.code]}: {self.detail}"
        )
