"""Controlled study: does hard-negative mining + ranking loss help ABMIL find rare witnesses?

    python benchmarks/needle_bags.py [--witness 0.1,0.01,0.001] [--seeds 3] [--bags 120] [--bag-size 1000]

Synthetic feature bags written as real feature files and trained through `run_train`:
instances ~ N(0, I_32); a positive bag holds ceil(witness × N) instances shifted by `--shift`
along one direction; negative bags hold the same number of "mimics" shifted half as far along it
(what hard-negative mining is for). Per witness rate and seed, the same bags train two runs:
`abmil` (BCE) and `abmil` + hard negatives + ranking loss. Reported on a held-out test split
(never used for selection): bag AUC, and instance AUC of the instance scores against the known
witness labels, mean ± sd over seeds.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from mil.manifest import read_manifest
from mil.train.loop import TrainConfig
from mil.train.run import load_checkpoint, run_train

D = 32


def make_cohort(root: Path, n_bags: int, bag_size: int, witness: float, shift: float, seed: int) -> dict:
    """Write bags + manifest (split train/test); return the witness labels of the test bags."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    rows, truth = [], {}
    for i in range(n_bags):
        y = i % 2
        X = rng.normal(size=(bag_size, D)).astype(np.float32)  # (N, D)
        k = max(1, math.ceil(witness * bag_size))
        idx = rng.choice(bag_size, size=k, replace=False)
        X[idx] += (shift if y else shift / 2) * direction  # witnesses, or mimics in negative bags
        inst = np.zeros(bag_size, int)
        inst[idx] = y
        sid = f"b{i:04d}"
        with h5py.File(root / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=X)
            f.create_dataset("coords", data=np.zeros((bag_size, 2), np.int64))
            f.attrs.update(slide_id=sid, encoder="synthetic", encoder_weights_sha256="none", feature_dim=D, mil_version="bench")
        split = "test" if (i // 2) % 4 == 0 else "train"  # a quarter of each class
        rows.append({"slide_id": sid, "path": f"{sid}.h5", "label": y, "split": split})
        if split == "test":
            truth[sid] = (X, y, inst)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return truth


@torch.inference_mode()
def test_scores(ckpt: Path, truth: dict) -> tuple[float, float]:
    """Bag AUC and instance AUC on the test bags."""
    model, _ = load_checkpoint(ckpt)
    bag_y, bag_p, inst_y, inst_s = [], [], [], []
    for X, y, inst in truth.values():
        out = model(torch.from_numpy(X)[None])
        bag_y.append(y)
        bag_p.append(torch.sigmoid(out.logits)[0].item())
        inst_y.append(inst)
        inst_s.append(out.instance_scores[0].numpy())
    return roc_auc_score(bag_y, bag_p), roc_auc_score(np.concatenate(inst_y), np.concatenate(inst_s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--witness", default="0.1,0.01,0.001")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bags", type=int, default=120)
    ap.add_argument("--bag-size", type=int, default=1000)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    methods = {
        "abmil": dict(),
        "abmil + HNM + ranking": dict(batch_size=4, ranking_weight=0.5, hard_negatives=True, neg_ratio=0.01, hnm_warmup=3, hnm_every=3),
    }
    rows = []
    for witness in [float(w) for w in args.witness.split(",")]:
        for seed in range(args.seeds):
            root = Path(tempfile.mkdtemp(prefix="needle_bags_"))
            truth = make_cohort(root, args.bags, args.bag_size, witness, args.shift, seed)
            slides = read_manifest(root / "manifest.csv")
            for name, kw in methods.items():
                cfg = TrainConfig(epochs=args.epochs, patience=10, lr=1e-3, seed=seed, **{"batch_size": 4, **kw})
                run_train(root, slides, root / name.replace(" ", ""), cfg)
                bag_auc, inst_auc = test_scores(root / name.replace(" ", "") / "checkpoints" / "split.pt", truth)
                rows.append({"witness rate": witness, "method": name, "seed": seed, "bag AUC": bag_auc, "instance AUC": inst_auc})
                print(rows[-1], flush=True)
            shutil.rmtree(root)
    df = pd.DataFrame(rows)
    summary = df.groupby(["witness rate", "method"], sort=False)[["bag AUC", "instance AUC"]].agg(["mean", "std"])
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 160):
        print(summary.to_string())


if __name__ == "__main__":
    main()
