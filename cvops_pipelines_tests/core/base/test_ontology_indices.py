"""The one class<->index mapping: a model's output order, and no silent NaN."""

import pytest

from cvops_pipelines.core.base.ontology import class_indices


def test_labels_map_to_the_models_order_and_an_unknown_label_is_an_error():
    assert class_indices(["b", "a", "b"], ["a", "b"]).tolist() == [1, 0, 1]
    assert class_indices([], ["a"]).tolist() == []
    with pytest.raises(ValueError, match=r"labels \['z'\] are not among the classes"):
        class_indices(["a", "z"], ["a", "b"])
