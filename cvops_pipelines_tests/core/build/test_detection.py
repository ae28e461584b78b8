"""The detection path's model pieces on the project's own scenes: built without a download,
trained with boxes that follow the pixels, exported up to the raw heads, and finished on the
device in numpy to the same boxes torchvision's own postprocess finds."""

import numpy as np
import pytest

from cvops_pipelines.core.build.detection_training import (
    DetectorConfig,
    augmentation,
    build_detector,
    train_detector,
)
from cvops_pipelines.demo.scenes import CLASSES, SceneConfig, scenes
from cvops_pipelines.edge.detect import box_iou, detections
from cvops_pipelines.edge.detect import box_iou as iou

FAST = DetectorConfig(epochs=2, batch_size=4, augment=True)


def _training_set(count=16, seed=0):
    made = scenes(count, seed)
    labels = [[CLASSES.index(label) + 1 for label in s.labels] for s in made]
    return made, [s.image for s in made], [s.boxes for s in made], labels


def test_scenes_are_seeded_with_boxes_on_the_ink_and_some_empty():
    config = SceneConfig()
    first, again = scenes(40, seed=3), scenes(40, seed=3)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert any(len(s.labels) == 0 for s in first)  # negatives are part of the set
    for s in first:
        assert s.image.shape == (config.side, config.side, 3) and len(s.boxes) == len(s.labels)
        if len(s.boxes):
            assert (s.boxes[:, :2] >= 0).all() and (s.boxes[:, 2:] <= config.side).all()
            assert ((s.boxes[:, 2:] - s.boxes[:, :2]) > 0).all()
            pairwise = iou(s.boxes, s.boxes) - np.eye(len(s.boxes))
            assert pairwise.max() <= config.max_overlap + 1e-6


def test_building_never_downloads(monkeypatch):
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError("a detector builder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    model = build_detector(len(CLASSES))
    assert model.head.classification_head.num_columns == len(CLASSES) + 1
    with pytest.raises(ValueError, match="available"):
        build_detector(3, DetectorConfig(architecture="yolo"))


def test_a_local_checkpoint_is_loaded_as_tensors_only(tmp_path):
    import torch

    source = build_detector(len(CLASSES))
    path = tmp_path / "detector.pt"
    torch.save(source.state_dict(), path)
    loaded = build_detector(len(CLASSES), DetectorConfig(checkpoint=str(path)))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    path.write_bytes(b"not a state dict")
    with pytest.raises(Exception):  # noqa: B017  (torch's own error for a bad file)
        build_detector(len(CLASSES), DetectorConfig(checkpoint=str(path)))


def test_augmentation_moves_boxes_with_the_pixels():
    made, images, boxes, labels = _training_set(8)
    transform = augmentation(DetectorConfig(image_size=320))
    for image, box, label in zip(images, boxes, labels):
        out = transform(image=image, bboxes=box, labels=label)
        assert out["image"].shape == (320, 320, 3)
        assert len(out["bboxes"]) == len(out["labels"]) <= len(label)
        for b in np.asarray(out["bboxes"]).reshape(-1, 4):
            assert 0 <= b[0] < b[2] <= 320 and 0 <= b[1] < b[3] <= 320


def test_nms_keeps_the_best_of_overlapping_boxes_of_one_class_only():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], float) / 100
    assert box_iou(boxes[:1], boxes[:1])[0, 0] == pytest.approx(1.0)

    def found(class_scores, cap=50, k=100):
        scores = np.hstack([np.zeros((3, 1)), np.asarray(class_scores, float)])
        out = detections(boxes, scores, 100, 100, ["a", "b"], 0.05, 0.5, k, cap)
        return [(d.label, round(d.score, 2)) for d in out]

    assert found([[0.9, 0], [0.8, 0], [0.7, 0]]) == [("a", 0.9), ("a", 0.7)]
    assert found([[0.7, 0], [0.8, 0], [0.9, 0]]) == [("a", 0.9), ("a", 0.8)]
    # another class on the same object is not suppressed (class-wise NMS)
    assert found([[0.9, 0], [0, 0.8], [0, 0]]) == [("a", 0.9), ("b", 0.8)]
    # the cap keeps the best boxes; the per-class top-k comes before NMS
    assert found([[0.9, 0.6], [0, 0.8], [0.7, 0]], cap=2) == [("a", 0.9), ("b", 0.8)]
    assert found([[0.9, 0], [0.8, 0], [0.7, 0]], k=1) == [("a", 0.9)]
    assert found([[0.01, 0.02], [0, 0], [0, 0]]) == []  # nothing above the threshold


@pytest.fixture(scope="module")
def trained():
    made, images, boxes, labels = _training_set()
    losses = []
    model = train_detector(
        images, boxes, labels, len(CLASSES), FAST, lambda e, loss: losses.append(loss)
    )
    return model, losses


def test_training_runs_every_epoch_with_a_finite_loss(trained):
    _, losses = trained
    assert len(losses) == FAST.epochs and all(np.isfinite(losses))


def test_the_edge_path_finds_the_boxes_torchvision_finds(trained):
    """Exported raw heads in onnxruntime + numpy postprocess vs torchvision's own inference on
    unseen scenes: every box matched with IoU >= 0.99 and scores within 1e-3, both ways."""
    from cvops_pipelines.core.ship.detection_export import (
        DetectorSpec,
        detection_parity,
        export_detector,
    )
    from cvops_pipelines.core.ship.export import preprocess_of, session

    model, _ = trained
    spec = DetectorSpec.of(FAST, CLASSES)
    onnx_bytes = export_detector(model, spec)
    result = detection_parity(model, session(onnx_bytes), [s.image for s in scenes(6, 99)], spec)
    assert result.ok, result
    assert result.boxes_compared >= 20  # not vacuous: scores spread above the threshold
    with pytest.raises(ValueError, match="detection"):  # never read as a classifier's spec
        preprocess_of(onnx_bytes)


def test_a_broken_postprocess_is_caught_by_the_parity_proof(trained, monkeypatch):
    from cvops_pipelines.core.ship import detection_export
    from cvops_pipelines.core.ship.detection_export import DetectorSpec, detection_parity
    from cvops_pipelines.core.ship.export import session
    from cvops_pipelines.edge import runtime

    model, _ = trained
    spec = DetectorSpec.of(FAST, CLASSES)
    sess = session(detection_export.export_detector(model, spec))
    real = runtime.detections

    def shifted(boxes, *args):  # a device that forgot to clip, or scaled by the wrong side
        return real(boxes * 1.05, *args)

    monkeypatch.setattr(runtime, "detections", shifted)  # the device runtime's postprocess
    result = detection_parity(model, sess, [s.image for s in scenes(3, 99)], spec)
    assert not result.ok and result.unmatched > 0


def test_an_encoder_starts_every_backbone_tensor_that_fits_and_nothing_else():
    """A mobilenet_v3_large encoder into ssdlite's backbone: the stem to the C4 tap and every
    layer of the same shape start from the encoder; the reduced last stage, the extra layers
    and the heads stay as built. Another architecture is refused."""
    import torch

    from cvops_pipelines.core.build.detection_training import state_from_encoder
    from cvops_pipelines.core.build.ssl import backbone

    torch.manual_seed(1)
    encoder, detector = backbone("mobilenet_v3_large"), build_detector(len(CLASSES))
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    state, started, total = state_from_encoder(encoder, detector)
    assert total / 2 < started < total
    mine = list(encoder.state_dict().values())
    keys = [k for k in state if k.startswith("backbone.features.")]
    same = 0
    for tensor, key in zip(mine, keys):
        if tensor.shape == state[key].shape:
            assert torch.equal(state[key], tensor), key
            same += tensor.dtype.is_floating_point and not torch.equal(tensor, before[key])
        else:
            assert torch.equal(state[key], before[key]), key
    assert same > 0  # the encoder's tensors differ from a fresh build's: it really copied
    for key in state:
        if not key.startswith("backbone.features."):
            assert torch.equal(state[key], before[key]), key
    detector.load_state_dict(state)  # a state the detector takes as it is
    with pytest.raises(ValueError, match="do not pair"):
        state_from_encoder(backbone("resnet18"), detector)


@pytest.mark.parametrize(("count", "world"), [(10, 1), (10, 2), (11, 2), (7, 3)])
def test_every_rank_takes_as_many_steps_and_together_they_see_every_image(count, world):
    from cvops_pipelines.core.build.detection_training import shard

    order = np.random.default_rng(0).permutation(count)
    shares = [shard(order, rank, world) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1
    assert set(np.concatenate(shares)) == set(order)


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"epochs": 0}, "epochs 0"),
        ({"batch_size": 1}, "batch_size 1"),
        ({"learning_rate": float("nan")}, "learning_rate nan"),
        ({"learning_rate": 1e9}, "learning_rate"),
        ({"score_threshold": -0.1}, "score_threshold"),
        ({"nms_iou": 0.0}, "nms_iou"),
        ({"detections_per_image": 0}, "detections_per_image"),
    ],
)
def test_a_setting_a_detector_cannot_train_with_is_refused_by_name(setting, named):
    with pytest.raises(ValueError, match=f"detector settings: .*{named}"):
        DetectorConfig(**setting)


def test_a_search_without_epochs_is_refused():
    from cvops_pipelines.core.build.run import RunPlan

    with pytest.raises(ValueError, match="search_epochs >= 1"):
        RunPlan("cpu", search_trials=2, search_epochs=0)
    with pytest.raises(ValueError, match="search_trials must be >= 0"):
        RunPlan("cpu", search_trials=-1)
