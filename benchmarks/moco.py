"""MoCo v2 at CPU scale: does a short in-domain MoCo run beat random init of the same network?

    python benchmarks/moco.py [--quick] [--out bench_out/moco] [--seeds 3]

1. A synthetic cohort (`mil.extract.generate.synthetic.make_cohort`: H&E-like tissue, planted lesions on
   half of the slides, lesion masks on disk).
2. Throughput: the real command (`python -m mil.extract.moco.cli`, i.e. `mil extract moco`) for a
   few steps with one process (1 and 2 threads) and with two processes (`torchrun
   --nproc_per_node 2`, 1 thread each), same global batch; images/s from the second epoch's row
   of metrics.csv. The first of these tiles the slides (coords shared by every later step).
3. MoCo v2 pretraining of a ResNet-18 on 112 px tiles at 1 µm/px of every slide, launched the
   fastest of those three ways.
4. Features of every tile with `run_features` twice: the MoCo encoder (`--weights encoder.pt`)
   and the same architecture with random weights from the same seed (MoCo's own starting point).
5. (a) Linear probe: tile label = lesion fraction of the tile > 0.5 (from the masks); standardised
   features, logistic regression (balanced class weights), 5-fold cross-validation grouped by
   slide; pooled AUC, balanced accuracy and accuracy of the out-of-fold predictions; and a
   20-nearest-neighbour (cosine) classifier on the raw features, same folds. The same probes on
   grayscale tiles (all lesion tiles and 8 times as many others): the synthetic lesion differs
   from normal tissue in colour as well as in texture, and colour alone is linearly separable
   from any features; without it only texture (nuclei size and density) is left.
   (b) Slide level: `abmil` with `run_train` (5-fold CV) and `evaluate_run` (every slide scored once,
   by the fold that held it out), for each seed; AUC mean ± sd over seeds; for both encoders twice:
   on the raw features and with `--standardize` (per-feature z-scores from the training bags), so
   that random init is compared with MoCo on equal terms in the table itself (random-init features
   have a tiny, uneven scale that raw-feature training handles poorly).

MoCo never sees a label, but it does see every slide's tiles, including those later held out
(self-supervised pretraining on the unlabelled cohort).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

MODES = {
    # slides, side (px), lesion fraction, MoCo epochs, batch, queue, throughput steps, abmil epochs
    "default": dict(n_slides=40, size=4096, lesion=0.05, epochs=6, batch=64, queue=1024, tput_steps=5, mil_epochs=10),
    "quick": dict(n_slides=12, size=2048, lesion=0.1, epochs=1, batch=16, queue=64, tput_steps=1, mil_epochs=2, moco_steps=3),
}
LAUNCH = {  # (processes, threads each) -> command prefix
    (1, 1): [sys.executable, "-m", "mil.extract.moco.cli"],
    (1, 2): [sys.executable, "-m", "mil.extract.moco.cli"],
    (2, 1): [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "-m",
        "mil.extract.moco.cli",
    ],
}
ARCH, TILE, MPP = "resnet18", 112, 1.0


def moco_command(manifest: Path, out: Path, p: dict, nproc: int, *extra: str) -> list[str]:
    """The `mil extract moco` arguments; BatchNorm groups of half the global batch either way
    (one process: 2 groups, keys shuffled between them; two processes: shuffled across them)."""
    return [
        str(manifest),
        "--out",
        str(out),
        "--arch",
        ARCH,
        "--tile-size",
        str(TILE),
        "--target-mpp",
        str(MPP),
        "--bn-splits",
        str(2 // nproc),
        "--batch-size",
        str(p["batch"]),
        "--queue",
        str(p["queue"]),
        "--momentum",
        "0.99",
        "--lr",
        "0.03",
        "--temperature",
        "0.2",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--no-progress",
        *extra,
    ]


def run(cmd: list[str], env: dict | None = None) -> float:
    """Run a command, fail loudly, return its wall time."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0


def tile_labels(feature_file: Path, masks: Path, mask_ds: int) -> np.ndarray:
    """Lesion fraction > 0.5 for every tile of a feature file, from make_cohort's lesion mask."""
    import h5py

    from mil.extract.generate.synthetic import load_masks

    with h5py.File(feature_file) as f:
        coords, size0 = f["coords"][:], int(f["coords"].attrs["patch_size_level0"])  # (N, 2)
        sid = f.attrs["slide_id"]
    _, lesion = load_masks(masks, sid)  # (h, w) bool at mask_ds level-0 px per pixel
    frac = [lesion[y // mask_ds : (y + size0) // mask_ds, x // mask_ds : (x + size0) // mask_ds].mean() for x, y in coords]
    return np.asarray(frac) > 0.5  # (N,)


def feature_set(feature_dir: Path, slides: pd.DataFrame, masks: Path, mask_ds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every tile's features `(N, D)`, lesion label `(N,)` and slide index `(N,)`."""
    from mil.features import read_bag

    X, y, g = [], [], []
    for i, sid in enumerate(slides["slide_id"]):
        f = feature_dir / f"{sid}.h5"
        X.append(read_bag(f, dtype=np.float32).features)
        y.append(tile_labels(f, masks, mask_ds))
        g.append(np.full(len(y[-1]), i))
    return np.concatenate(X), np.concatenate(y), np.concatenate(g)


def gray_sets(slides: pd.DataFrame, tiles: Path, masks: Path, mask_ds: int, encoders: dict, neg_per_pos: int = 8) -> dict:
    """Features of grayscale tiles (colour removed: texture only) for every lesion tile and
    `neg_per_pos` times as many other tiles drawn at random; one `(X, y, g)` per encoder."""
    import torch

    from mil.extract.wsi.reader import TileDataset

    rows = []  # (slide index, tile index, label)
    for i, sid in enumerate(slides["slide_id"]):
        lab = tile_labels(tiles / f"{sid}.h5", masks, mask_ds)
        rows += [(i, j, bool(v)) for j, v in enumerate(lab)]
    rows = np.asarray(rows, dtype=np.int64)  # (N, 3)
    pos, neg = rows[rows[:, 2] == 1], rows[rows[:, 2] == 0]
    rng = np.random.default_rng(0)
    keep = np.concatenate([pos, neg[rng.choice(len(neg), min(len(neg), neg_per_pos * len(pos)), replace=False)]])  # (M, 3)
    imgs = []
    for i in np.unique(keep[:, 0]):
        ds = TileDataset.from_coords_file(tiles / f"{slides['slide_id'][i]}.h5", slides["path"][i])
        imgs += [ds[int(j)] for j in keep[keep[:, 0] == i, 1]]
        ds.close()
    keep = np.concatenate([keep[keep[:, 0] == i] for i in np.unique(keep[:, 0])])  # same order as imgs
    rgb = torch.from_numpy(np.stack(imgs)).float()  # (M, T, T, 3)
    luma = (rgb @ torch.tensor([0.299, 0.587, 0.114])).round().clamp(0, 255).to(torch.uint8)  # (M, T, T)
    gray = luma[..., None].expand(-1, -1, -1, 3).contiguous()  # (M, T, T, 3)
    out = {}
    for name, enc in encoders.items():
        X = torch.cat([enc.encode(gray[k : k + 64]) for k in range(0, len(gray), 64)]).numpy()  # (M, D)
        out[name] = (X, keep[:, 2].astype(bool), keep[:, 0])
    return out


def probe(X: np.ndarray, y: np.ndarray, g: np.ndarray) -> dict:
    """5-fold (grouped by slide) probes of tile lesion labels: logistic regression and 20-NN."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    warnings.filterwarnings("ignore", message="The least populated class")  # few lesion tiles in quick mode
    prob, knn = np.zeros(len(y)), np.zeros(len(y))
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=0)
    fold_auc = []
    for tr, te in folds.split(X, y, g):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced"))
        clf.fit(X[tr], y[tr])
        prob[te] = clf.predict_proba(X[te])[:, 1]
        # k-NN on the raw features (cosine): sensitive to the geometry that MoCo shapes, unlike a re-weighting probe
        nn_ = KNeighborsClassifier(n_neighbors=20, metric="cosine").fit(X[tr], y[tr])
        knn[te] = nn_.predict_proba(X[te])[:, 1] if nn_.classes_.size == 2 else float(nn_.classes_[0])
        if y[te].any() and not y[te].all():
            fold_auc.append(roc_auc_score(y[te], prob[te]))
    pred = prob > 0.5
    knn_bal = balanced_accuracy_score(y, knn > y.mean())  # threshold at the prevalence (k-NN votes are imbalanced)
    return {
        "tiles": int(len(y)),
        "positive_tiles": int(y.sum()),
        "auc": roc_auc_score(y, prob),
        "auc_fold_sd": float(np.std(fold_auc, ddof=1)),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "accuracy": accuracy_score(y, pred),
        "majority_accuracy": float(max(y.mean(), 1 - y.mean())),
        "knn_auc": roc_auc_score(y, knn),
        "knn_balanced_accuracy": knn_bal,
    }


def slide_auc(feature_dir: Path, slides: pd.DataFrame, runs: Path, seeds: int, epochs: int, standardize: bool) -> list[float]:
    """abmil, 5-fold CV, one run per seed → test AUC over every slide (each scored once), raw or standardised."""
    from mil.evaluate.run import evaluate_run
    from mil.train.loop import TrainConfig
    from mil.train.run import run_train

    aucs = []
    for seed in range(seeds):
        config = TrainConfig(head="abmil", epochs=epochs, patience=5, lr=1e-3, seed=seed, standardize=standardize)
        run_train(feature_dir, slides, runs / f"seed{seed}", config, folds=5, overwrite=True)
        doc, _ = evaluate_run(runs / f"seed{seed}", n_boot=200, seed=seed)
        aucs.append(doc["auc"]["auc"])
    return aucs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny cohort, one short epoch, one seed")
    ap.add_argument("--out", type=Path, default=Path("bench_out/moco"))
    ap.add_argument("--seeds", type=int, default=None, help="abmil seeds (default 3, quick 1)")
    args = ap.parse_args(argv)
    p = MODES["quick" if args.quick else "default"]
    seeds = args.seeds or (1 if args.quick else 3)
    out = args.out / ("quick" if args.quick else "default")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    times: dict[str, float] = {}

    from mil.extract.generate.synthetic import make_cohort
    from mil.extract.wsi.encoders import create_encoder
    from mil.extract.wsi.features import FeatureConfig, run_features
    from mil.extract.wsi.grid import GridSpec
    from mil.extract.wsi.tiles import TilingConfig
    from mil.manifest import read_manifest

    # 1. cohort
    t0 = time.perf_counter()
    manifest = make_cohort(out / "slides", n_slides=p["n_slides"], size=p["size"], seed=0, lesion_fraction=p["lesion"], tissue_fraction=0.5)
    slides = read_manifest(manifest)
    mask_ds = json.loads((out / "slides" / "synthetic.json").read_text())["mask_downsample"]
    times["cohort"] = time.perf_counter() - t0

    # 2. throughput: 1 process × 1 or 2 threads, 2 processes × 1 thread; same global batch
    tiles = out / "tiles"
    tput = {}
    for nproc, threads in LAUNCH:
        d = out / f"throughput_{nproc}x{threads}"
        extra = ("--epochs", "2", "--steps-per-epoch", str(p["tput_steps"]), "--coords-dir", str(tiles), "--overwrite")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        times[f"throughput_{nproc}x{threads}"] = run([*LAUNCH[nproc, threads], *moco_command(manifest, d, p, nproc, *extra)], env=env)
        rate = float(pd.read_csv(d / "metrics.csv")["images_per_s"].iloc[-1])
        tput[f"{nproc}x{threads}"] = {"processes": nproc, "threads": threads, "images_per_s": rate, "per_process": rate / nproc}

    # 3. MoCo, launched the fastest way measured
    launch = max(LAUNCH, key=lambda k: tput[f"{k[0]}x{k[1]}"]["images_per_s"])
    enc = out / "moco"
    env = dict(os.environ, OMP_NUM_THREADS=str(launch[1]))
    steps = ("--steps-per-epoch", str(p["moco_steps"])) if p.get("moco_steps") else ()  # quick: a few steps only
    cmd = moco_command(manifest, enc, p, launch[0], "--epochs", str(p["epochs"]), *steps, "--coords-dir", str(tiles), "--resume")
    times["moco"] = run([*LAUNCH[launch], *cmd], env=env)
    history = pd.read_csv(enc / "metrics.csv")
    n_tiles = json.loads((enc / "config.json").read_text())["n_tiles"]

    # 4. features: MoCo weights vs the same architecture's random init (MoCo's starting point)
    tiling = TilingConfig(grid=GridSpec(target_mpp=MPP, tile_size=TILE))
    feats, encoders = {}, {}
    for name, weights in (("moco", str(enc / "encoder.pt")), ("random", "none")):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoders[name] = create_encoder(ARCH, weights=weights, precision="fp32", input_size=TILE, seed=0)
        feats[name] = out / f"features_{name}"
        report = run_features(
            slides, feats[name], encoders[name], FeatureConfig(tiling=tiling, batch_size=64, workers=1), coords_dir=tiles, progress=False
        )
        if (report["status"] == "error").any():
            sys.exit(f"feature extraction failed:\n{report}")
        times[f"features_{name}"] = time.perf_counter() - t0

    # 5. (a) probes on tile labels: colour tiles, and grayscale tiles (texture only); (b) abmil slide AUC over seeds
    results = {
        "mode": "quick" if args.quick else "default",
        "params": p,
        "n_slides": len(slides),
        "n_tiles": n_tiles,
        "moco_launch": {"processes": launch[0], "threads": launch[1]},
        "moco_history": history.to_dict("list"),
        "throughput": tput,
    }
    masks = out / "slides" / "masks"
    t0 = time.perf_counter()
    for name, (X, y, g) in gray_sets(slides, tiles, masks, mask_ds, encoders).items():
        results[f"gray_probe_{name}"] = probe(X, y, g)
    times["gray_probe"] = time.perf_counter() - t0
    for name, d in feats.items():
        t0 = time.perf_counter()
        results[f"probe_{name}"] = probe(*feature_set(d, slides, masks, mask_ds))
        for std in (False, True):
            key = f"slide_auc_{name}" + ("_std" if std else "")
            results[key] = slide_auc(d, slides, out / f"runs_{name}{'_std' if std else ''}", seeds, p["mil_epochs"], std)
        times[f"eval_{name}"] = time.perf_counter() - t0
    results["seconds"] = times | {"total": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")

    # report
    print(
        f"\ncohort: {len(slides)} slides of {p['size']}² px, {n_tiles:,} tiles of {TILE} px at {MPP} µm/px; "
        f"MoCo {ARCH}: {p['epochs']} epochs × batch {p['batch']}, queue {p['queue']}, m 0.99, T 0.2, lr 0.03 (fp32)"
    )
    print(f"\nMoCo training ({launch[0]} process(es) × {launch[1]} thread(s)):")
    print(history.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\nthroughput, global batch {p['batch']} (epoch 2 of 2, {p['tput_steps']} steps each):")
    print("| processes × threads | images/s (all) | images/s per process | ÷ 1 process × 1 thread | ÷ 1 process × 2 threads |")
    print("|---|---|---|---|---|")
    for r in tput.values():
        print(
            f"| {r['processes']} × {r['threads']} | {r['images_per_s']:.1f} | {r['per_process']:.1f} | "
            f"{r['images_per_s'] / tput['1x1']['images_per_s']:.2f} | {r['images_per_s'] / tput['1x2']['images_per_s']:.2f} |"
        )
    print("\n| features | tiles | linear probe AUC | balanced acc. | acc. (majority) | 20-NN AUC | 20-NN bal. acc. |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("probe", "gray_probe"):
        for name in feats:
            pr = results[f"{kind}_{name}"]
            print(
                f"| {name}{', grayscale tiles' if kind == 'gray_probe' else ''} | {pr['tiles']:,} ({pr['positive_tiles']} lesion) | "
                f"{pr['auc']:.3f} (fold sd {pr['auc_fold_sd']:.3f}) | {pr['balanced_accuracy']:.3f} | "
                f"{pr['accuracy']:.3f} ({pr['majority_accuracy']:.3f}) | {pr['knn_auc']:.3f} | {pr['knn_balanced_accuracy']:.3f} |"
            )
    print(f"\n| features | abmil input | abmil slide AUC, 5-fold CV, mean ± sd over {seeds} seeds | per seed |")
    print("|---|---|---|---|")
    for std in (False, True):
        for name in feats:
            a = results[f"slide_auc_{name}" + ("_std" if std else "")]
            sd = np.std(a, ddof=1) if len(a) > 1 else float("nan")
            print(f"| {name} | {'--standardize' if std else 'raw'} | {np.mean(a):.3f} ± {sd:.3f} | {', '.join(f'{v:.3f}' for v in a)} |")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()))
    return results


if __name__ == "__main__":
    main()
