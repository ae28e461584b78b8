"""How the review tables show Grad-CAM overlays in the UI (label QA, the annotation queue)."""

from dagster import MetadataValue

from cvops_pipelines.core.base.plots import md_image
from cvops_pipelines.core.measure.saliency import grid_png

SHOWN = 12  # overlays in the metadata grid; every one is in the files and the Label Studio tasks


def saliency_metadata(explained: list[tuple], model, what: str) -> dict:
    if model is None:
        return {"saliency": f"no champion classifier yet: no Grad-CAM overlays for the {what}"}
    if not explained:
        return {"saliency": f"no {what}"}
    return {  # the picture first: the UI lists metadata in this order
        "saliency": MetadataValue.md(
            md_image(grid_png(explained[:SHOWN]), f"Grad-CAM of the {what}")
        ),
        "saliency_by": f"champion v{model.version}: where it looked for the class it answers",
    }
