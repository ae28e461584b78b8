import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from cvops_pipelines.demo.data import SPLITS, split_indices, write_demo_data


def test_splits_are_stratified_disjoint_and_complete():
    target = load_digits().target
    splits = split_indices(target)
    everything = np.concatenate(list(splits.values()))
    assert sorted(everything) == list(range(len(target)))
    for name, share in SPLITS:
        per_class = np.bincount(target[splits[name]], minlength=10) / np.bincount(target)
        assert np.allclose(per_class, share, atol=0.02), name


def test_demo_drops_are_real_digits_with_marker_only_on_the_initial_drop(tmp_path):
    data = write_demo_data(tmp_path / "drops", tmp_path / "holdback")
    assert (tmp_path / "drops/initial/_SUCCESS").exists()
    assert not list((tmp_path / "holdback").rglob("_SUCCESS"))
    digits = load_digits()
    sample = sorted((tmp_path / "drops/initial/7").glob("*.png"))[0]
    index = int(sample.stem.split("_")[1])
    assert digits.target[index] == 7
    # the PNG is the scan itself: downsampled back to 8x8 it matches the source pixels
    small = np.asarray(Image.open(sample).resize((8, 8), Image.Resampling.BOX), dtype=float)
    source = 255 - digits.images[index] * (255 / 16)
    assert np.corrcoef(small.ravel(), source.ravel())[0, 1] > 0.9
    truth = (tmp_path / "holdback/production/ground_truth.csv").read_text().splitlines()
    assert len(truth) - 1 == data.counts["production"]
