"""Study: does the HNM-WSI encoder fine-tuning loop help, and do its hard negatives matter?

    python benchmarks/finetune_study.py [--config cpu|gpu|quick] [--seeds 3] [--rounds 2] [--out DIR]

A synthetic cohort (`mil extract synthetic`) with a low lesion fraction whose slides all carry a
**lesion-mimicking texture** (``--mimic-fraction``: lesion colours, another texture), so that the
mimics are the hard negatives. Everything runs through the `mil` commands:

1. round 0: `mil extract features` (random-weight encoder: nothing can be downloaded here) and, per
   seed, `mil train features` (abmil, ``--recipe hnm-wsi --max-instance-weight 0``) on the manifest's
   train/val split (a validation set carved per label from the training slides);
2. per seed and arm (``hard``: the seed's mined negatives; ``random``: as many negative tiles drawn
   at random, the seed's ablation), `mil extract finetune --rounds R --train-config …`: fine-tune
   the encoder on the run's pseudo-labelled training tiles, re-extract, retrain, R times.

Only then are the test slides scored, once, for every (seed, arm, round): slide AUC, tile AUC
(lesion tiles against every other test tile; a tile is a lesion tile when the generator's lesion
mask covers its centre) and lesion-vs-mimic tile AUC (lesion tiles against mimic tiles only: does
the model tell the lesion from its mimic?). Nothing is selected on the test slides.

Writes ``OUT/results.csv`` (one row per seed × arm × round) and prints the mean ± sd over seeds.
Reruns skip finished commands (every `mil` command does).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

CONFIGS = {
    # The CPU configuration: ≤ 45 min on the 2-core machine with --seeds 3 --rounds 2. At 0.5 µm/px: the
    # mimic's nuclei (radius 2.5–4.5 level-0 px against the lesion's 5–10) are still resolved.
    "cpu": dict(
        n_slides=32,
        size=4096,
        lesion=0.02,
        mimic=0.05,
        encoder="resnet18",
        tile=112,
        mpp=0.5,
        input_size=112,
        epochs=2,
        batch_size=32,
        steps=4,
        train_epochs=30,
        feat_batch=64,
    ),
    # A GPU machine: a larger cohort at 224 px, the seed's batch and a longer schedule.
    "gpu": dict(
        n_slides=120,
        size=16384,
        lesion=0.005,
        mimic=0.03,
        encoder="resnet18",
        tile=224,
        mpp=0.5,
        input_size=224,
        epochs=10,
        batch_size=512,
        steps=None,
        train_epochs=100,
        feat_batch=256,
        precision="auto",  # bf16 on the GPU
        workers=8,
    ),
    # The smoke test's: seconds.
    "quick": dict(
        n_slides=8,
        size=2048,
        lesion=0.05,
        mimic=0.05,
        encoder="test_resnet",
        tile=32,
        mpp=1.0,
        input_size=32,
        epochs=1,
        batch_size=16,
        steps=2,
        train_epochs=3,
        feat_batch=64,
    ),
}


ARMS = {  # name -> `mil extract finetune` options
    "hard": ["--negatives", "hard"],  # the seed's mined negatives
    "random": ["--negatives", "random"],  # the seed's ablation: as many negatives at random
    # controls: BatchNorm statistics updated by the fine-tuning batches, with SupCon learning and without (lr ≈ 0)
    "hard-bn-train": ["--negatives", "hard", "--batchnorm", "train"],
    "bn-stats-only": ["--negatives", "hard", "--batchnorm", "train", "--lr", "1e-12"],
}


def mil(*args, quiet: bool = True) -> None:
    """Run one `mil` command; stop the study with its last error line if it fails."""
    done = subprocess.run([sys.executable, "-m", "mil.cli", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mil {' '.join(map(str, args[:2]))} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


def make_cohort(out: Path, c: dict) -> Path:
    """The cohort, with a validation split carved per label from the generator's training slides."""
    from mil.extract.generate.synthetic import make_cohort as generate

    manifest = generate(out, n_slides=c["n_slides"], size=c["size"], seed=0, lesion_fraction=c["lesion"], mimic_fraction=c["mimic"])
    m = pd.read_csv(manifest)
    if "val" not in set(m["split"]):
        for label in (0, 1):
            train = m.index[(m["split"] == "train") & (m["label"] == label)]
            m.loc[train[: max(1, len(train) // 4)], "split"] = "val"
        m.to_csv(manifest, index=False)
    return manifest


def tile_truth(slides_dir: Path, slide_id: str, coords: np.ndarray, size0: int) -> tuple[np.ndarray, np.ndarray]:
    """(lesion, mimic) bool per tile: the generator's mask at the tile's centre."""
    from mil.extract.generate.synthetic import load_mask

    ds = json.loads((slides_dir / "synthetic.json").read_text())["mask_downsample"]
    out = []
    for kind in ("lesion", "mimic"):
        mask = load_mask(slides_dir / "masks", slide_id, kind)
        r = np.clip(((coords[:, 1] + size0 / 2) // ds).astype(int), 0, mask.shape[0] - 1)
        c = np.clip(((coords[:, 0] + size0 / 2) // ds).astype(int), 0, mask.shape[1] - 1)
        out.append(mask[r, c])
    return out[0], out[1]


def pool_makeup(encoder_dir: Path, slides_dir: Path) -> dict:
    """What the fine-tuning trained on (training slides only, from its pseudo_labels.csv): the share of
    mimic tiles among the mined negatives (their base rate among negative-slide tiles beside it) and
    the share of lesion tiles among the positive slides' p > θ tiles."""
    table = pd.read_csv(encoder_dir / "pseudo_labels.csv", dtype={"slide_id": str, "pool": str}, keep_default_na=False)
    size0 = _size0(slides_dir)
    lesion, mimic = np.zeros(len(table), bool), np.zeros(len(table), bool)
    for sid, rows in table.groupby("slide_id").indices.items():
        xy = table[["x", "y"]].to_numpy()[rows]
        lesion[rows], mimic[rows] = tile_truth(slides_dir, sid, xy, size0)
    neg = table["bag_label"].to_numpy() == 0
    mined, tumour = table["pool"].str.endswith("negative").to_numpy(), (table["pool"] == "tumour").to_numpy()
    return {
        "neg_mimic_share": mimic[mined].mean(),
        "neg_mimic_base_rate": mimic[neg].mean(),
        "pos_lesion_share": lesion[tumour].mean() if tumour.any() else np.nan,
        "pos_pool": int(tumour.sum()),
    }


def _size0(slides_dir: Path) -> int:
    """Level-0 side of the tiles, from any round-0 feature file next to the cohort."""
    import h5py

    f = next((slides_dir.parent / "features0").glob("*.h5"))
    with h5py.File(f) as h:
        return int(h["coords"].attrs["patch_size_level0"])


def score_test(run: Path, slides_dir: Path) -> dict:
    """Slide AUC, tile AUC and lesion-vs-mimic AUC of a run's fold model on the test slides."""
    import torch
    from sklearn.metrics import roc_auc_score

    from mil.checkpoint import load_head
    from mil.features import read_bag

    model, _ = load_head(run / "checkpoints" / "split.pt")
    feature_dir = Path(json.loads((run / "config.json").read_text())["feature_dir"])
    splits = pd.read_csv(run / "splits.csv")
    labels = pd.read_csv(run / "slides.csv").set_index("slide_id")["label"]
    y_slide, p_slide, y_tile, s_tile, mimic = [], [], [], [], []
    with torch.inference_mode():
        for sid in splits.query("set == 'test'")["slide_id"]:
            bag = read_bag(feature_dir / f"{sid}.h5", dtype=np.float32)
            out = model(torch.from_numpy(bag.features)[None])
            y_slide.append(int(labels[sid]))
            p_slide.append(float(torch.sigmoid(out.logits.flatten()[0])))
            les, mim = tile_truth(slides_dir, sid, bag.coords, int(bag.attrs["patch_size_level0"]))
            y_tile.append(les)
            mimic.append(mim & ~les)
            s_tile.append(out.instance_scores[0].float().numpy())
    y, s, m = np.concatenate(y_tile), np.concatenate(s_tile), np.concatenate(mimic)
    lm = y | m
    return {
        "slide_auc": roc_auc_score(y_slide, p_slide),
        "tile_auc": roc_auc_score(y, s) if 0 < y.sum() < len(y) else np.nan,
        "lesion_vs_mimic_auc": roc_auc_score(y[lm], s[lm]) if y[lm].any() and (~y[lm]).any() else np.nan,
        "val_auc": float(pd.read_csv(run / "summary.csv")["val_auc"].iloc[0]),
    }


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arms", default="hard,random", help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("finetune_study"))
    a = ap.parse_args(argv)
    c, out = CONFIGS[a.config], a.out
    t0 = time.perf_counter()
    slides_dir = out / "slides"
    manifest = make_cohort(slides_dir, c)
    common = ["--encoder", c["encoder"], "--weights", "none", "--device", a.device, "--workers", c.get("workers", 2), "--no-progress"]
    mil(
        "extract",
        "features",
        manifest,
        "--out",
        out / "features0",
        "--target-mpp",
        c["mpp"],
        "--tile-size",
        c["tile"],
        "--input-size",
        c["input_size"],
        "--batch-size",
        c["feat_batch"],
        "--precision",
        c.get("precision", "fp32"),
        *common,
    )
    print(f"round-0 features: {time.perf_counter() - t0:.0f} s", flush=True)
    finetune = ["--epochs", c["epochs"], "--batch-size", c["batch_size"], "--rounds", a.rounds, "--precision", c.get("precision", "fp32")]
    finetune += ["--steps-per-epoch", c["steps"]] if c["steps"] else []
    rows = []
    for seed in range(a.seeds):
        yaml = out / f"train_seed{seed}.yaml"
        yaml.write_text(
            f"train:\n  head: abmil\n  recipe: hnm-wsi\n  max_instance_weight: 0\n  epochs: {c['train_epochs']}\n  seed: {seed}\n  device: {a.device}\n"
        )
        run0 = out / f"seed{seed}" / "run0"
        mil("train", "--config", yaml, "features", out / "features0", "--manifest", manifest, "--out", run0, "--no-progress")
        runs = {("round0", 0): run0}
        for arm in a.arms.split(","):
            loop = out / f"seed{seed}" / arm
            mil(
                "extract",
                "finetune",
                manifest,
                "--run",
                run0,
                "--out",
                loop,
                "--train-config",
                yaml,
                *ARMS[arm],
                "--seed",
                seed,
                *finetune,
                *common,
            )
            for r in range(1, a.rounds + 1):
                runs[(arm, r)] = loop / f"round_{r}" / "run"
            print(f"seed {seed} {arm}: {time.perf_counter() - t0:.0f} s", flush=True)
        for (arm, r), run in runs.items():
            made = pool_makeup(run.parent / "encoder", slides_dir) if r else {}
            rows.append({"seed": seed, "arm": arm, "round": r} | score_test(run, slides_dir) | made)
    # The test slides are scored only here, after every run has finished.
    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    metrics = ["val_auc", "slide_auc", "tile_auc", "lesion_vs_mimic_auc", "neg_mimic_share", "neg_mimic_base_rate", "pos_lesion_share"]
    summary = results.groupby(["arm", "round"])[[m for m in metrics if m in results]].agg(["mean", "std"])
    print(summary.round(3).to_string())
    print(f"total {time.perf_counter() - t0:.0f} s ({a.config}, {a.seeds} seeds, {a.rounds} rounds)")
    return results


if __name__ == "__main__":
    main()
