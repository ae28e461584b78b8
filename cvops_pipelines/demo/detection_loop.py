"""The detection demo's loop as a code location beside the default one (workspace.yaml): the
same definitions, built for the project `detection`."""

from cvops_pipelines.definitions import build_defs
from cvops_pipelines.demo.detection import detection_project

defs = build_defs(detection_project())
