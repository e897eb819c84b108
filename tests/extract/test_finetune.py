"""`mil extract finetune`: the SupCon loss against hand-computed values, pseudo-labels that never
touch validation/test slides, the pools, resume after an interruption, the exported encoder, the
whole loop and its rerun, and one-line errors.

Small and fast: timm's `test_resnet` on 32-px tiles at 1 µm/px of eight 2048² synthetic slides.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mil.extract.finetune.pseudo import make_pools, pick_source, read_run, score_training_tiles, self_paced_positives
from mil.extract.finetune.supcon import SupConLoss
from mil.extract.finetune.train import FinetuneConfig, run_finetune
from mil.manifest import read_manifest
from tests.conftest import invoke_mil, run_mil

FAST = FinetuneConfig(epochs=2, rounds=2, batch_size=16, steps_per_epoch=2, seed=0)
CLI_FAST = "--encoder test_resnet --weights none --epochs 2 --batch-size 16 --steps-per-epoch 2 --workers 0 --device cpu --precision fp32 --no-progress".split()
TRAIN_YAML = "train:\n  head: abmil\n  epochs: 3\n  recipe: hnm-wsi\n  max_instance_weight: 0\n  seed: 0\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A cohort with train/val/test splits, its test_resnet features and a one-fold round-0 run."""
    from mil.extract.generate.synthetic import make_cohort
    from mil.extract.wsi.encoders import create_encoder
    from mil.extract.wsi.features import FeatureConfig, run_features
    from mil.extract.wsi.grid import GridSpec
    from mil.extract.wsi.tiles import TilingConfig

    root = tmp_path_factory.mktemp("finetune")
    manifest = make_cohort(root / "slides", n_slides=8, size=2048, seed=0, lesion_fraction=0.05)
    m = pd.read_csv(manifest)
    m.loc[m["slide_id"].isin(["synth_000", "synth_001"]), "split"] = "val"  # one val slide per label
    m.to_csv(manifest, index=False)
    enc = create_encoder("test_resnet", weights="none", precision="fp32", input_size=32)
    config = FeatureConfig(tiling=TilingConfig(grid=GridSpec(target_mpp=1.0, tile_size=32)), batch_size=64, workers=0)
    run_features(read_manifest(manifest), root / "features", enc, config, progress=False)
    (root / "train.yaml").write_text(TRAIN_YAML)
    r = run_mil(
        "train",
        "--config",
        root / "train.yaml",
        "features",
        root / "features",
        "--manifest",
        manifest,
        "--out",
        root / "run0",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    return root, manifest


# ---- SupCon: hand-computed values (τ = τ_base = 1; tile A's two views on e1, tile B's on e2) -----


def _toy():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    return torch.stack([torch.stack([e1, e1]), torch.stack([e2, e2])])  # (2 tiles, 2 views, 2)


@pytest.mark.parametrize(
    "labels, mode, expected",
    [
        # same label: each anchor's positives are its other view (logit 1) and B's views (logit 0), denominator e + 2
        ([0, 0], "all", math.log(math.e + 2) - 1 / 3),
        # different labels: only the other view is a positive
        ([0, 1], "all", math.log(math.e + 2) - 1),
        # pos-pos: A (label 0) anchors have no positive (0, still counted), B's two anchors as above
        ([0, 1], "pos-pos", (math.log(math.e + 2) - 1) / 2),
        # neg-neg with labels 1, 1: no anchor has a positive
        ([1, 1], "neg-neg", 0.0),
    ],
)
def test_supcon_matches_hand_computed_values(labels, mode, expected):
    loss = SupConLoss(temperature=1.0, base_temperature=1.0, pair_mode=mode)(_toy(), torch.tensor(labels))
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_supcon_masks_uncertain_negatives_out_of_every_contrast_set():
    # A is an uncertain tile (positive slide, pseudo-label 0): its views leave every denominator.
    # A's anchors: contrast {b1, b2} (logit 0), both positives → -log(1/2); B's anchors: only the other view → 0.
    loss = SupConLoss(1.0, 1.0, pair_mode="neg-neg", mask_uncertain_neg=True)(_toy(), torch.tensor([0, 0]), torch.tensor([1, 0]))
    assert float(loss) == pytest.approx(math.log(2) / 2, abs=1e-6)


def test_supcon_temperature_scales_as_the_seed():
    z = torch.nn.functional.normalize(torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    a = SupConLoss(0.5, 0.5)(z, y)
    b = SupConLoss(0.5, 0.25)(z, y)
    assert float(b) == pytest.approx(2 * float(a), rel=1e-6)


# ---- pseudo-labels and pools --------------------------------------------------------------------


def test_pseudo_labels_never_open_validation_or_test_slides(base, tmp_path):
    root, manifest = base
    run = tmp_path / "run0"
    shutil.copytree(root / "run0", run)
    features = tmp_path / "features"
    shutil.copytree(root / "features", features)
    slides_dir = tmp_path / "slides"
    shutil.copytree(root / "slides", slides_dir)
    cfg = (run / "config.json").read_text().replace(str(root / "features"), str(features))
    (run / "config.json").write_text(cfg)
    info = read_run(run)
    held_out = pd.read_csv(run / "splits.csv").query("set != 'train'")["slide_id"].tolist()
    assert len(held_out) == 4 and not set(held_out) & set(info.train_ids)
    for sid in held_out:  # what is never to be read is not there at all
        (features / f"{sid}.h5").unlink()
        (slides_dir / f"{sid}.tiff").unlink()
    table = score_training_tiles(info)
    assert set(table["slide_id"]) == set(info.train_ids)
    slides = _manifest_without(slides_dir, held_out)
    path = run_finetune(slides, info, table, tmp_path / "ft", "test_resnet", "none", replace(FAST, epochs=1), workers=0, progress=False)
    assert path.is_file()
    assert set(pd.read_csv(tmp_path / "ft" / "pseudo_labels.csv")["slide_id"]) == set(info.train_ids)


def _manifest_without(slides_dir: Path, drop: list[str]) -> pd.DataFrame:
    m = pd.read_csv(slides_dir / "manifest.csv")
    m = m[~m["slide_id"].isin(drop)]
    m.to_csv(slides_dir / "manifest_train.csv", index=False)
    return read_manifest(slides_dir / "manifest_train.csv")


def _table() -> pd.DataFrame:
    """Two negative slides of 5 tiles and one positive slide of 5, known probabilities."""
    return pd.DataFrame(
        {
            "slide_id": ["n0"] * 5 + ["n1"] * 5 + ["p0"] * 5,
            "tile_index": list(range(5)) * 3,
            "x": 0,
            "y": 0,
            "bag_label": [0] * 10 + [1] * 5,
            "prob": [0.1, 0.9, 0.2, 0.3, 0.05, 0.8, 0.15, 0.25, 0.35, 0.01, 0.9, 0.8, 0.5, 0.2, 0.1],
        }
    )


def test_hard_negatives_are_the_top_scored_tiles_of_negative_slides_and_random_ones_as_many():
    t = _table()
    hard = make_pools(t, neg_ratio=0.2, negatives="hard", seed=0)
    assert sorted(t["prob"].to_numpy()[hard.negatives]) == [0.8, 0.9]  # the top 2 of 10 negative tiles
    assert list(hard.tumour) == [10, 11, 12]  # positive-slide tiles with p > 0.3
    rand = [make_pools(t, neg_ratio=0.2, negatives="random", seed=s).negatives for s in range(5)]
    assert all(len(r) == 2 and (t["bag_label"].to_numpy()[r] == 0).all() for r in rand)
    assert len({tuple(r) for r in rand}) > 1  # drawn, not the top
    assert list(self_paced_positives(t, 1 / 3)) == [10]  # the top third of the three confident tiles


def test_pseudo_labels_come_from_the_latest_best_run():
    from mil.extract.finetune.pseudo import RunInfo

    runs = [RunInfo(Path(f"r{i}"), "split", (), {}, Path("."), auc) for i, auc in enumerate([0.7, 0.9, 0.8, 0.9])]
    assert pick_source(runs).path == Path("r3")  # ≥ the best so far replaces
    assert pick_source(runs[:3]).path == Path("r1")  # a worse round keeps the earlier pseudo-labels


# ---- training: resume, export, the loop ----------------------------------------------------------


def test_an_interrupted_round_resumes_to_the_same_encoder(base, tmp_path, monkeypatch):
    from mil.extract.finetune import train as ft

    root, manifest = base
    info = read_run(root / "run0")
    table, slides = score_training_tiles(info), read_manifest(manifest)
    config = replace(FAST, epochs=3, rounds=1)
    whole = run_finetune(slides, info, table, tmp_path / "whole", "test_resnet", "none", config, workers=0, progress=False)

    real = ft.plan_epoch

    def dies_in_epoch_2(config, t, *args):
        if t == 2:
            raise KeyboardInterrupt  # as a kill after two finished epochs
        return real(config, t, *args)

    monkeypatch.setattr(ft, "plan_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(slides, info, table, tmp_path / "killed", "test_resnet", "none", config, workers=0, progress=False)
    assert not (tmp_path / "killed" / "encoder.pt").exists()
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(ft, "plan_epoch", real)
    resumed = run_finetune(slides, info, table, tmp_path / "killed", "test_resnet", "none", config, workers=0, progress=False)
    a, b = torch.load(whole, weights_only=True), torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pd.read_csv(tmp_path / "killed" / "metrics.csv")["epoch"].tolist() == [1, 2, 3]


def test_the_loop_writes_rounds_whose_encoder_loads_and_changes_the_features(base, tmp_path):
    import h5py

    from mil.extract.wsi.encoders import create_encoder

    root, manifest = base
    args = ["extract", "finetune", manifest, "--run", root / "run0", "--out", tmp_path / "loop", "--rounds", "2"]
    r = invoke_mil(*args, "--train-config", root / "train.yaml", *CLI_FAST)
    assert r.returncode == 0, r.stderr
    rounds = pd.read_csv(tmp_path / "loop" / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2] and rounds["run"].map(lambda p: (Path(p) / "summary.csv").is_file()).all()
    enc1 = tmp_path / "loop" / "round_1" / "encoder" / "encoder.pt"
    enc = create_encoder("test_resnet", weights=str(enc1), precision="fp32", input_size=32)  # strict load: every key fits
    assert enc.weights_sha256 != create_encoder("test_resnet", weights="none", precision="fp32").weights_sha256
    with h5py.File(root / "features" / "synth_002.h5") as f0, h5py.File(tmp_path / "loop" / "round_1" / "features" / "synth_002.h5") as f1:
        assert np.array_equal(f0["coords"][:], f1["coords"][:])  # the same tiles …
        assert not np.allclose(f0["features"][:], f1["features"][:], atol=1e-3)  # … new features
    mtime = enc1.stat().st_mtime_ns
    again = invoke_mil(*args, "--train-config", root / "train.yaml", *CLI_FAST)
    assert again.returncode == 0, again.stderr
    assert enc1.stat().st_mtime_ns == mtime  # a finished round is not redone


def test_a_cross_validated_run_is_refused_in_one_line(base, tmp_path):
    root, manifest = base
    run = tmp_path / "cv"
    shutil.copytree(root / "run0", run)
    s = pd.read_csv(run / "splits.csv")
    pd.concat([s, s.assign(fold="r0f1")]).to_csv(run / "splits.csv", index=False)
    r = invoke_mil("extract", "finetune", manifest, "--run", run, "--out", tmp_path / "out", *CLI_FAST)
    assert r.returncode == 2 and "(one fold), got" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("batchnorm, kept", [("frozen", True), ("train", False)])
def test_frozen_batchnorm_keeps_the_statistics_the_features_were_extracted_with(base, tmp_path, batchnorm, kept):
    from mil.extract.wsi.encoders import create_encoder

    root, manifest = base
    info = read_run(root / "run0")
    config = replace(FAST, epochs=1, rounds=1, batchnorm=batchnorm)
    path = run_finetune(
        read_manifest(manifest), info, score_training_tiles(info), tmp_path, "test_resnet", "none", config, workers=0, progress=False
    )
    before = create_encoder("test_resnet", weights="none", precision="fp32").model.state_dict()
    after = torch.load(path, weights_only=True)
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in before if k.endswith(".weight")]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats) == kept
    assert not all(torch.equal(before[k], after[k]) for k in weights)  # the weights learn either way


def test_learning_rate_follows_the_seeds_cosine_schedule():
    c = FinetuneConfig(epochs=50, rounds=2)  # 100 epochs in all, as the seed
    assert c.lr_at(0) == c.lr_at(10) == pytest.approx(0.01)  # stepped only from epoch 10 on
    assert c.lr_at(11) == pytest.approx(0.005 * (1 + math.cos(math.pi / 100)))
    assert c.lr_at(99) == pytest.approx(0.005 * (1 + math.cos(math.pi * 89 / 100))) and c.lr_at(99) > 0
    assert c.warmup_epochs == 5  # the seed's 5 of 100


def test_a_round_killed_with_sigkill_resumes_to_the_encoder_of_an_uninterrupted_one(base, tmp_path):
    from tests.reliability.cases import WorkState, kill_inside

    root, manifest = base
    args = ["extract", "finetune", manifest, "--run", root / "run0", "--rounds", "1", *CLI_FAST, "--epochs", "8"]

    def state(out: Path) -> WorkState:
        ckpt = out / "checkpoint.pt"
        done = int(torch.load(ckpt, weights_only=True)["epoch"]) if ckpt.exists() else 0
        return WorkState(done, (out / "encoder.pt").exists(), f"{done} of 8 epochs checkpointed")

    ref = run_mil(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    kill = kill_inside([*args, "--out", out], out, started=lambda o: (o / "checkpoint.pt").exists(), state=state, extra=0.1)
    assert kill.interrupted, kill.describe()
    before = pd.read_csv(out / "metrics.csv").query(f"epoch <= {kill.state.parts}")  # timings of the epochs done
    again = run_mil(*args, "--out", out)  # the same command: it resumes after the last checkpointed epoch
    assert again.returncode == 0, again.stderr
    after = pd.read_csv(out / "metrics.csv")
    pd.testing.assert_frame_equal(after.iloc[: len(before)], before)  # those epochs were not trained again
    a, b = torch.load(tmp_path / "ref" / "encoder.pt", weights_only=True), torch.load(out / "encoder.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kill.describe()
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == list(range(1, 9))
