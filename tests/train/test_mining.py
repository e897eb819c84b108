"""Hard-negative mining keeps the globally top-scoring instances of negative bags."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from mil.bags import BagOutput
from mil.data import BagDataset
from mil.errors import OptionError
from mil.train.mining import mine_hard_negatives


class FirstFeature(torch.nn.Module):
    """Instance score = the first feature: mining should pick the largest first features."""

    def forward(self, X, mask=None):  # X (B, N, D)
        s = X[..., 0]  # (B, N)
        return BagOutput(logits=s.max(1).values, instance_scores=s)


def bags(tmp_path, values, labels):
    files = []
    for i, v in enumerate(values):
        p = tmp_path / f"b{i}.h5"
        with h5py.File(p, "w") as f:
            x = np.zeros((len(v), 3), np.float32)
            x[:, 0] = v
            f.create_dataset("features", data=x)
            f.create_dataset("coords", data=np.zeros((len(v), 2), np.int64))
        files.append(p)
    return BagDataset(files, labels, cache="stream", slide_ids=[f"b{i}" for i in range(len(values))])


def test_top_fraction_is_global_over_negative_bags(tmp_path):
    ds = bags(tmp_path, [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14], [100, 101, 102, 103, 104]], [0, 0, 1])
    mined = mine_hard_negatives(FirstFeature(), ds, neg_ratio=0.3, bank_max=2)
    # 10 negative instances, top 30 % = the three largest: all in bag b1; the positive bag is ignored
    assert set(mined.negatives) == {"b1"} and sorted(mined.negatives["b1"].tolist()) == [2, 3, 4]
    assert mined.scores["b1"].tolist() == [12, 13, 14] and len(mined) == 3
    assert mined.bank[:, 0].tolist() == [14, 13]  # the highest-scoring features, at most bank_max
    everything = mine_hard_negatives(FirstFeature(), ds, neg_ratio=1.0)
    assert len(everything) == 10 and everything.bank is None


def test_pseudo_positives_are_the_top_confident_tiles_of_positive_bags(tmp_path):
    # positive bag scores: sigmoid > 0.3 for scores > -0.85; of the confident 4, the top half
    ds = bags(tmp_path, [[-5, -1, 0, 1, 2, 3], [0, 1]], [1, 0])
    mined = mine_hard_negatives(FirstFeature(), ds, neg_ratio=0.5, pos_ratio=0.5)
    assert sorted(mined.positives["b0"].tolist()) == [4, 5] and "b1" not in mined.positives


def test_bad_ratio(tmp_path):
    ds = bags(tmp_path, [[0, 1]], [0])
    with pytest.raises(OptionError, match="--neg-ratio"):
        mine_hard_negatives(FirstFeature(), ds, neg_ratio=0.0)
