"""Stage two as the HNM-WSI / DSMIL / ECE authors run it (methods.md §1.3, §1.5, §2, §8).

Each test guards one defect of the earlier loop: an instance BCE on mined negatives the seed does not
have; a ranking loss whose negative side was the mined subset only; a ranking loss that never ran at
batch size 1; DSMIL trained on its averaged logit; an ECE whose background terms never came in.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mil.data import BagDataset
from mil.errors import OptionError
from mil.heads import create_head
from mil.manifest import read_manifest
from mil.train.loop import TrainConfig, fit_fold
from mil.train.mining import MinedSet
from mil.train.objective import Objective
from mil.train.run import run_train
from mil.train.sampling import BalancedBatchSampler
from tests.conftest import invoke_mil
from tests.train.test_instances import annotate, cohort
from tests.train.test_run import D, needle_cohort


def datasets(root, n=24, seed=0):
    m = needle_cohort(root, n=n, seed=seed)
    slides = read_manifest(m)
    tr, va = slides.iloc[: n * 3 // 4], slides.iloc[n * 3 // 4 :]

    def ds(part):
        return BagDataset([root / f"{s}.h5" for s in part["slide_id"]], part["label"].tolist(), slide_ids=part["slide_id"].tolist())

    return ds(tr), ds(va)


def states_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------- recipes
def test_recipes_fill_unset_options_and_flags_override_them():
    c = TrainConfig(recipe="hnm-wsi")
    assert (c.bag_weight, c.max_instance_weight, c.ranking_weight, c.rank_k, c.rank_margin) == (0.5, 0.5, 0.1, 10, 1.0)
    assert c.hard_negatives is True and c.neg_ratio == 0.2
    assert TrainConfig(recipe="hnm-wsi", ranking_weight=0.3, hard_negatives=False).ranking_weight == 0.3
    plain = TrainConfig()
    assert (plain.bag_weight, plain.max_instance_weight, plain.ranking_weight, plain.hard_negatives) == (1.0, 0.0, 0.0, False)
    dsmil = TrainConfig(head="dsmil")  # DSMIL's own two losses under the default recipe too
    assert (dsmil.bag_weight, dsmil.max_instance_weight) == (0.5, 0.5)
    with pytest.raises(OptionError, match="--recipe"):
        TrainConfig(recipe="hnm")
    with pytest.raises(OptionError, match="loss weights"):
        TrainConfig(bag_weight=0.0)
    with pytest.raises(OptionError, match="--hard-negatives"):
        TrainConfig(hnm_instance_weight=1.0)


# ---------------------------------------------------------------------------------------------- defect 1
def test_mining_alone_adds_no_loss(tmp_path):
    """Mined negatives feed the ranking loss and the export, not an instance BCE: without ranking, mining changes nothing."""
    tr, va = datasets(tmp_path)
    base = dict(epochs=4, lr=1e-3, batch_size=2, seed=0, hnm_warmup=1, hnm_every=1)
    plain = fit_fold(tr, va, D, TrainConfig(**base))
    mined = fit_fold(tr, va, D, TrainConfig(**base, hard_negatives=True, neg_ratio=0.2))
    assert mined.history[0]["n_hard_negatives"] == 0 and all(r["n_hard_negatives"] > 0 for r in mined.history[1:])
    assert states_equal(plain.state_dict, mined.state_dict)
    assert [r["train_loss"] for r in plain.history] == [r["train_loss"] for r in mined.history]
    # the opt-in two-sided instance BCE does change training
    opt_in = fit_fold(tr, va, D, TrainConfig(**base, hard_negatives=True, hnm_instance_weight=1.0))
    assert not states_equal(plain.state_dict, opt_in.state_dict)
    assert all(r["loss_hnm_instance"] > 0 for r in opt_in.history[1:])


# ---------------------------------------------------------------------------------------------- defect 2
def test_ranking_negative_side_is_the_top_k_of_every_real_instance():
    """The negative bag's top-k is taken over all its real instances, not over a mined subset of them."""
    cfg = TrainConfig(ranking_weight=1.0, bag_weight=0.0, rank_k=2, hnm_bank=0)
    obj = Objective(cfg, pos_weight=1.0, annotations=None, seed=0)
    s = torch.tensor([[3.0, 2.0, 0.0, -1.0], [2.5, 2.0, -4.0, 9.0]])  # (B, N) bag 1's last slot is padding
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])  # (B, N)
    out = type("Out", (), {"instance_scores": s, "logits": s.amax(1)})()
    mined = MinedSet(negatives={"n": torch.tensor([2])}, scores={"n": torch.tensor([-4.0])})  # mined: the easiest one only
    loss, parts = obj(None, out, mask, torch.tensor([1.0, 0.0]), ["p", "n"], mined)
    expected = max(0.0, 1 - (3 + 2) / 2 + (2.5 + 2) / 2)  # top-2 of the real negatives: 2.5, 2.0 (never the padded 9)
    assert parts["ranking"] == pytest.approx(expected) and float(loss) == pytest.approx(expected)


def test_mined_bank_joins_the_negative_pool():
    """With a bank, mined negatives of other bags are scored in the step and compete for the negative top-k."""
    head = create_head("maxpool", in_dim=3)
    torch.nn.init.zeros_(head.instance_mlp[1].weight)  # every tile scores the output bias
    cfg = TrainConfig(head="maxpool", ranking_weight=1.0, bag_weight=0.0, rank_k=1, rank_margin=0.0, hnm_bank=5)
    obj = Objective(cfg, pos_weight=1.0, annotations=None, seed=0)
    s = torch.tensor([[1.0, 0, 0, 0], [0.5, 0, 0, 0]])  # (B, N) positive bag's top 1.0, negative bag's top 0.5
    out = type("Out", (), {"instance_scores": s, "logits": torch.zeros(2)})()
    mask, y, bank = torch.ones(2, 4, dtype=torch.bool), torch.tensor([1.0, 0.0]), MinedSet(bank=torch.randn(7, 3))
    for bias, expected in ((0.0, 0.0), (2.0, 1.0)):  # banked tiles score 0 (below the bag's 0.5), then 2 (above 1.0)
        with torch.no_grad():
            head.instance_mlp[1].bias.fill_(bias)
        _, parts = obj(head, out, mask, y, ["p", "n"], bank)
        assert parts["ranking"] == pytest.approx(expected)  # relu(0 − 1 + max(0.5, bank))


# ---------------------------------------------------------------------------------------------- defect 3
@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_balanced_batches_always_hold_both_classes(batch_size):
    labels = [1] * 3 + [0] * 11
    sampler = BalancedBatchSampler(labels, batch_size, torch.Generator().manual_seed(0))
    epochs = [list(sampler) for _ in range(5)]
    for batches in epochs:
        assert len(batches) == len(sampler)
        assert all({labels[i] for i in b} == {0, 1} for b in batches)
        if batch_size == 1:  # the seed's pairs: one positive and one negative, min(#pos, #neg) per epoch
            assert all(len(b) == 2 for b in batches) and len(batches) == 3
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    again = BalancedBatchSampler(labels, batch_size, torch.Generator().manual_seed(0))
    assert [list(again) for _ in range(5)] == epochs


def test_ranking_runs_at_batch_size_one(tmp_path):
    tr, va = datasets(tmp_path)
    res = fit_fold(tr, va, D, TrainConfig(epochs=2, lr=1e-3, batch_size=1, seed=0, ranking_weight=0.1))
    assert all(r["ranking_steps"] == 1.0 for r in res.history)
    assert res.history[0]["loss_ranking"] > 0


# ---------------------------------------------------------------------------------------------- defect 4
def test_dsmil_trains_its_two_branches():
    torch.manual_seed(0)
    head = create_head("dsmil", in_dim=D)
    X, y = torch.randn(4, 9, D), torch.tensor([1.0, 0.0, 1.0, 0.0])  # (B, N, D), (B,)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 6:] = False
    out = head(X, mask)
    obj = Objective(TrainConfig(head="dsmil"), pos_weight=2.0, annotations=None, seed=0)
    loss, _ = obj(head, out, mask, y, list("abcd"), MinedSet())
    pw = torch.tensor(2.0)
    expected = 0.5 * F.binary_cross_entropy_with_logits(out.bag_branch_logits, y, pos_weight=pw) + 0.5 * F.binary_cross_entropy_with_logits(
        out.max_instance_logits, y, pos_weight=pw
    )
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, F.binary_cross_entropy_with_logits(out.logits, y, pos_weight=pw))


# ---------------------------------------------------------------------------------------------- defect 5
def test_ece_samples_the_unannotated_background_within_a_short_run(tmp_path):
    """ECE's schedule is stretched to the run: within 6 epochs its background terms are sampled, so it trains
    differently from the bce option (which sees only annotated tiles); with the reference's 200-epoch
    schedule the two are the same run."""
    m = cohort(tmp_path)
    slides = read_manifest(m)
    csv = annotate(tmp_path, [(s, y) for s, y in zip(slides["slide_id"], slides["label"])])

    def instance_loss(name, **kw):  # per epoch
        cfg = TrainConfig(epochs=6, patience=6, lr=1e-3, seed=0, instance_loss=name, **kw)
        run_train(tmp_path, slides, tmp_path / f"{name}{kw}", cfg, instance_labels=csv)
        return pd.read_csv(tmp_path / f"{name}{kw}" / "metrics.csv")["loss_instance"].to_numpy()

    bce, ece = instance_loss("bce"), instance_loss("ece")
    np.testing.assert_allclose(ece[:3], bce[:3], rtol=1e-4)  # background not yet phased in: the same training
    assert ece[-1] > bce[-1] * 1.05  # the last epoch adds sampled background terms
    np.testing.assert_allclose(instance_loss("ece", ece_schedule_epochs=200), bce, rtol=1e-4)  # the reference schedule


# ---------------------------------------------------------------------------------------------- the recipe end to end
def test_recipe_hnm_wsi_from_the_cli_exports_hard_negatives(tmp_path):
    m = needle_cohort(tmp_path, n=24)
    r = invoke_mil(
        "train",
        "features",
        tmp_path,
        "--manifest",
        m,
        "--out",
        tmp_path / "run",
        "--recipe",
        "hnm-wsi",
        "--epochs",
        "3",
        "--hnm-warmup",
        "1",
        "--hnm-every",
        "1",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert cfg["recipe"] == "hnm-wsi" and cfg["max_instance_weight"] == 0.5 and cfg["ranking_weight"] == 0.1
    hard = pd.read_csv(tmp_path / "run" / "hard_negatives" / "split.csv")
    assert list(hard.columns) == ["slide_id", "tile_index", "x", "y", "score"] and len(hard) > 0
    splits = pd.read_csv(tmp_path / "run" / "splits.csv")
    train = set(splits.loc[splits["set"] == "train", "slide_id"])
    labels = dict(zip(*pd.read_csv(m)[["slide_id", "label"]].T.values))
    assert set(hard["slide_id"]) <= train and all(labels[s] == 0 for s in hard["slide_id"])  # training negatives only
    assert hard["score"].is_monotonic_decreasing
    r = invoke_mil("train", "features", tmp_path, "--manifest", m, "--out", tmp_path / "bad", "--recipe", "hnm")
    assert r.returncode == 2 and "--recipe" in r.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("layout", ["clam", "trident"])
def test_recipe_on_clam_and_trident_feature_folders(tmp_path, layout):
    """`--recipe hnm-wsi` trains on CLAM's h5_files (no attrs, int32 coords) and TRIDENT's .hdf5 files; the
    exported hard negatives carry the files' own tile coordinates."""
    import h5py

    rng = np.random.default_rng(0)
    folder, rows, coords = tmp_path / ("h5_files" if layout == "clam" else "features_uni_v1"), [], {}
    folder.mkdir()
    for i in range(16):
        X = rng.normal(size=(30, 8)).astype(np.float32)
        X[:3, 0] += 4.0 * (i % 2)
        xy = np.stack([np.arange(30) * 256 + i, np.full(30, 512 * i)], 1)
        coords[f"s{i}"] = xy
        with h5py.File(folder / f"s{i}{'.h5' if layout == 'clam' else '.hdf5'}", "w") as f:
            f["features"] = X
            f["coords"] = xy.astype(np.int32 if layout == "clam" else np.int64)
            if layout == "trident":
                f["coords"].attrs.update(patch_size=256, patch_size_level0=512, level0_magnification=40, target_magnification=20)
        rows.append({"slide_id": f"s{i}", "path": f"slides/s{i}.svs", "label": i % 2, "split": "test" if i % 8 == 0 else "train"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    r = invoke_mil(
        "train",
        "features",
        folder,
        "--manifest",
        tmp_path / "labels.csv",
        "--out",
        tmp_path / "run",
        "--recipe",
        "hnm-wsi",
        "--epochs",
        "2",
        "--hnm-warmup",
        "0",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    hard = pd.read_csv(tmp_path / "run" / "hard_negatives" / "split.csv")
    assert len(hard) > 0
    for sid, i, x, y in hard[["slide_id", "tile_index", "x", "y"]].itertuples(index=False):
        assert (x, y) == tuple(coords[sid][i])
