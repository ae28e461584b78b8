"""The device's detector postprocess and input preparation are fast and exact: the vectorised
postprocess keeps the very boxes one plain greedy pass keeps (ties included), and the in-place
normalisation gives the same bits as the textbook formula."""

import numpy as np
import pytest

from cvops_pipelines.edge.detect import box_iou, detections
from cvops_pipelines.edge.preprocess import normalize
from cvops_pipelines_tests.reference import detections_reference


def _outputs(rng, anchors: int, classes: int, ties: bool):
    corner = rng.random((anchors, 2)) * 0.8
    boxes = np.concatenate([corner, corner + rng.random((anchors, 2)) * 0.3 + 0.01], 1)
    logits = rng.normal(0, 2, (anchors, classes + 1))
    scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if ties:  # many equal scores: the order of ties decides which boxes survive
        scores = np.round(scores, 2)
    return boxes.astype(np.float32), scores.astype(np.float32)


@pytest.mark.parametrize("seed", range(12))
def test_the_vectorised_postprocess_keeps_what_one_greedy_pass_keeps(seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        classes = int(rng.integers(1, 5))
        boxes, scores = _outputs(rng, int(rng.integers(1, 120)), classes, ties=seed % 2 == 0)
        settings = (
            160,
            120,
            [f"c{i}" for i in range(classes)],
            float(rng.choice([0.0, 0.05, 0.3])),
            float(rng.choice([0.3, 0.55])),
            int(rng.choice([1, 7, 100])),
            int(rng.choice([1, 5, 50])),
        )
        mine = [(d.label, d.score, d.box) for d in detections(boxes, scores, *settings)]
        assert mine == detections_reference(boxes, scores, *settings)


def test_iou_of_known_boxes():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    assert np.allclose(box_iou(a, b), [[1.0, 50 / 150, 0.0]] * 2)


def test_normalising_in_place_gives_the_textbook_bits():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (33, 33, 3), dtype=np.uint8) for _ in range(3)]
    for mean, std in (((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        plain = (np.stack(images).astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
        fast = normalize(images, mean, std)
        assert fast.flags.c_contiguous and fast.dtype == np.float32
        assert np.array_equal(fast, plain.transpose(0, 3, 1, 2))
