"""Controlled study: do the seed's ranking loss and hard-negative mining help a MIL head find rare witnesses?

    python benchmarks/needle_bags.py [--witness 0.1,0.01,0.001] [--seeds 5] [--bags 120] [--bag-size 1000]
                                     [--epochs 30] [--no-standardize] [--jobs 2] [--out DIR] [--quick]

Synthetic feature bags (D = 32, instances ~ N(0, I)) written as real feature files and trained through
`run_train`. Built so that **hard negatives are separable at instance level but confusable at bag level**:

    witness  x = ε + shift·u                       positive bags only, at the witness rate
    mimic    x = ε + shift·(0.8·u + 0.6·v)         every bag, 2 % of its instances (u ⊥ v, unit vectors)

A scorer along ``u`` rates mimics at 0.8 of a witness, so negative bags look positive; the direction
``u − (4/3)·v`` scores mimics at 0 and witnesses at ``shift``: the difference exists and is linear.
Mimics are in both classes, so their presence carries no label.

Arms (same bags, same splits, same seed): ``abmil`` (bag BCE); ``abmil --recipe hnm-wsi``; ``dsmil``
(its two losses); ``dsmil`` + ranking (the recipe without mining); ``dsmil --recipe hnm-wsi`` (ranking
+ mining). Epoch and threshold are chosen on a validation set carved from the training bags; the test
quarter is scored once: bag AUC, instance AUC (witnesses against every other test instance) and
witness-vs-mimic AUC. Paired differences are taken per seed, with a bootstrap 95 % CI over seeds.
For mining arms the make-up of the exported mined set is printed: the share of mimics (their base
rate among negative-bag instances is 2 %).

Writes ``OUT/results.csv`` (one row per run), ``OUT/metrics.csv`` (training curves), ``OUT/pairs.csv``
and ``OUT/needle_bags.png``. Reruns skip runs whose row is already in ``results.csv``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

D, MIMIC_RATE = 32, 0.02
ARMS = {  # name -> TrainConfig options
    "abmil": dict(head="abmil"),
    "abmil hnm-wsi": dict(head="abmil", recipe="hnm-wsi"),
    "dsmil": dict(head="dsmil"),
    "dsmil + ranking": dict(head="dsmil", recipe="hnm-wsi", hard_negatives=False),
    "dsmil hnm-wsi": dict(head="dsmil", recipe="hnm-wsi"),
    # not run by default: which part of the recipe breaks abmil at 1 % (--arms "abmil + max-instance,abmil + ranking")
    "abmil + max-instance": dict(head="abmil", bag_weight=0.5, max_instance_weight=0.5),
    "abmil + ranking": dict(head="abmil", ranking_weight=0.1),
}
DEFAULT_ARMS = ["abmil", "abmil hnm-wsi", "dsmil", "dsmil + ranking", "dsmil hnm-wsi"]
PAIRS = [("abmil hnm-wsi", "abmil"), ("dsmil + ranking", "dsmil"), ("dsmil hnm-wsi", "dsmil + ranking"), ("dsmil hnm-wsi", "dsmil")]


def make_cohort(root: Path, n_bags: int, bag_size: int, witness: float, shift: float, seed: int) -> dict:
    """Write bags + manifest (a quarter of each class is test); return per-bag instance kinds (0 other, 1 witness, 2 mimic)."""
    rng = np.random.default_rng(seed)
    u, v = np.linalg.qr(rng.normal(size=(D, 2)))[0].T  # two orthonormal directions
    rows, kinds = [], {}
    for i in range(n_bags):
        y = i % 2
        X = rng.normal(size=(bag_size, D)).astype(np.float32)  # (N, D)
        kind = np.zeros(bag_size, np.int8)
        n_mimic, n_wit = max(1, round(MIMIC_RATE * bag_size)), max(1, math.ceil(witness * bag_size)) * y
        idx = rng.permutation(bag_size)
        kind[idx[:n_mimic]], kind[idx[n_mimic : n_mimic + n_wit]] = 2, 1
        X[kind == 2] += shift * (0.8 * u + 0.6 * v)
        X[kind == 1] += shift * u
        sid = f"b{i:04d}"
        with h5py.File(root / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=X)
            f.create_dataset("coords", data=np.stack([np.arange(bag_size), np.zeros(bag_size)], 1).astype(np.int64))
            f.attrs.update(slide_id=sid, encoder="synthetic", encoder_weights_sha256="none", feature_dim=D, mil_version="bench")
        rows.append({"slide_id": sid, "path": f"{sid}.h5", "label": y, "split": "test" if (i // 2) % 4 == 0 else "train"})
        kinds[sid] = kind
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return kinds


def test_scores(run: Path, root: Path, kinds: dict) -> dict:
    """Bag AUC, instance AUC and witness-vs-mimic AUC of a run's checkpoint on the test bags (scored once)."""
    import torch
    from sklearn.metrics import roc_auc_score

    from mil.checkpoint import load_head
    from mil.features import read_bag

    slides = pd.read_csv(root / "manifest.csv")
    model, _ = load_head(run / "checkpoints" / "split.pt")
    bag_y, bag_p, kind, score = [], [], [], []
    with torch.inference_mode():
        for sid, y in slides.loc[slides["split"] == "test", ["slide_id", "label"]].itertuples(index=False):
            out = model(torch.from_numpy(read_bag(root / f"{sid}.h5").features)[None])
            bag_y.append(y)
            bag_p.append(torch.sigmoid(out.logits)[0].item())
            kind.append(kinds[sid])
            score.append(out.instance_scores[0].numpy())
    kind, score = np.concatenate(kind), np.concatenate(score)
    wm = kind > 0  # witnesses and mimics
    return {
        "bag_auc": roc_auc_score(bag_y, bag_p),
        "instance_auc": roc_auc_score(kind == 1, score),
        "witness_vs_mimic_auc": roc_auc_score(kind[wm] == 1, score[wm]),
    }


def run_job(job: dict) -> list[dict]:
    """All arms on one (witness rate, seed) cohort; one process, one thread."""
    import torch

    from mil.manifest import read_manifest
    from mil.train.loop import TrainConfig
    from mil.train.run import run_train

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="needle_bags_"))
    try:
        kinds = make_cohort(root, job["bags"], job["bag_size"], job["witness"], job["shift"], job["seed"])
        slides = read_manifest(root / "manifest.csv")
        rows, curves = [], []
        for arm in job["arms"]:
            t0 = time.perf_counter()
            cfg = TrainConfig(
                epochs=job["epochs"],
                patience=job["patience"],
                lr=job["lr"],
                batch_size=1,
                seed=job["seed"],
                standardize=job["standardize"],
                hnm_warmup=job["hnm_warmup"],
                hnm_every=job["hnm_every"],
                **job["arms"][arm],
            )
            run = root / arm.replace(" ", "_")
            run_train(root, slides, run, cfg)
            row = {"witness": job["witness"], "seed": job["seed"], "arm": arm, **test_scores(run, root, kinds)}
            row["best_epoch"] = int(pd.read_csv(run / "summary.csv")["best_epoch"][0])
            if (run / "hard_negatives" / "split.csv").exists():  # make-up of the selected model's mined set
                hard = pd.read_csv(run / "hard_negatives" / "split.csv")
                row["mined"] = len(hard)
                is_mimic = [kinds[s][i] == 2 for s, i in zip(hard["slide_id"], hard["tile_index"])]
                sp = pd.read_csv(run / "splits.csv")
                train_neg = [s for s in sp.loc[sp["set"] == "train", "slide_id"] if int(s[1:]) % 2 == 0]  # even ids: label 0
                row["mined_mimic_share"] = float(np.mean(is_mimic))
                row["mimic_recall"] = float(sum(is_mimic)) / sum(int((kinds[s] == 2).sum()) for s in train_neg)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            curves.append(pd.read_csv(run / "metrics.csv").assign(witness=job["witness"], seed=job["seed"], arm=arm))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        return rows, pd.concat(curves, ignore_index=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def paired(results: pd.DataFrame, n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Per witness rate and pair (A, B): mean paired difference A − B over seeds, bootstrap 95 % CI over seeds, wins."""
    rng = np.random.default_rng(seed)
    out = []
    for w, g in results.groupby("witness", sort=False):
        t = g.pivot(index="seed", columns="arm")
        for a, b in PAIRS:
            if a not in g["arm"].values or b not in g["arm"].values:
                continue
            for metric in ("bag_auc", "instance_auc"):
                d = (t[(metric, a)] - t[(metric, b)]).to_numpy()  # (seeds,)
                boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)  # (n_boot,)
                lo, hi = np.percentile(boot, [2.5, 97.5])
                out.append(
                    {
                        "witness": w,
                        "pair": f"{a} − {b}",
                        "metric": metric,
                        "mean_diff": d.mean(),
                        "ci_low": lo,
                        "ci_high": hi,
                        "wins": f"{int((d > 0).sum())}/{len(d)}",
                    }
                )
    return pd.DataFrame(out)


def plot(results: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    arms = [a for a in ARMS if a in set(results["arm"])]
    rates = sorted(results["witness"].unique(), reverse=True)
    for ax, metric in zip(axes, ("bag_auc", "instance_auc", "witness_vs_mimic_auc")):
        for j, arm in enumerate(arms):
            g = results[results["arm"] == arm].groupby("witness")[metric]
            m, sd = g.mean().reindex(rates), g.std().reindex(rates).fillna(0)
            x = np.arange(len(rates)) + (j - (len(arms) - 1) / 2) * 0.12
            ax.errorbar(x, m, yerr=sd, fmt="o", capsize=3, label=arm)
        ax.set_xticks(range(len(rates)), [f"{100 * r:g} %" for r in rates])
        ax.set_xlabel("witness rate")
        ax.set_ylabel(metric.replace("_", " ").replace("auc", "AUC").replace("vs", "vs.") + " (test)")
        ax.axhline(0.5, color="grey", lw=0.5)
    axes[0].legend(fontsize=7)
    fig.suptitle("needle bags: mean ± sd over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--witness", default="0.1,0.01,0.001")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--bags", type=int, default=120)
    ap.add_argument("--bag-size", type=int, default=1000)
    ap.add_argument("--shift", type=float, default=4.0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS))
    ap.add_argument("--no-standardize", action="store_true", help="train on the raw features (use another --out)")
    ap.add_argument("--jobs", type=int, default=2, help="processes (one thread each)")
    ap.add_argument("--out", type=Path, default=Path("needle_bags_out"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 % witnesses, 1 seed, 24 bags of 100, 3 epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.witness, args.seeds, args.bags, args.bag_size, args.epochs = "0.1", 1, 24, 100, 3
    arms = [a.strip() for a in args.arms.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"expected --arms among {', '.join(ARMS)}, got {', '.join(unknown)} instead")
    args.out.mkdir(parents=True, exist_ok=True)
    res_path, curve_path = args.out / "results.csv", args.out / "metrics.csv"
    done = pd.read_csv(res_path) if res_path.exists() else pd.DataFrame(columns=["witness", "seed", "arm"])
    have = set(zip(done["witness"].round(6), done["seed"], done["arm"]))
    warm, every = (1, 1) if args.quick else (3, 3)  # mining from epoch 4, every 3 epochs (of 30)
    jobs = []
    for w in (float(x) for x in args.witness.split(",")):
        for seed in range(args.seeds):
            todo = [a for a in arms if (round(w, 6), seed, a) not in have]
            if todo:
                jobs.append(
                    dict(
                        witness=w,
                        seed=seed,
                        arms={a: ARMS[a] for a in todo},
                        bags=args.bags,
                        bag_size=args.bag_size,
                        shift=args.shift,
                        epochs=args.epochs,
                        patience=args.patience,
                        lr=args.lr,
                        hnm_warmup=warm,
                        hnm_every=every,
                        standardize=not args.no_standardize,
                    )
                )
    t0 = time.perf_counter()
    if args.jobs > 1 and len(jobs) > 1:  # worker processes import this file as a module: run it as a script
        pool = mp.get_context("spawn").Pool(min(args.jobs, len(jobs)))
        finished = pool.imap_unordered(run_job, jobs)
    else:
        pool, finished = None, map(run_job, jobs)
    for rows, curves in finished:
        done = pd.concat([done, pd.DataFrame(rows)], ignore_index=True)
        done.to_csv(res_path, index=False)  # after every job: a killed study resumes where it stopped
        curves.to_csv(curve_path, mode="a", header=not curve_path.exists(), index=False)
    if pool is not None:
        pool.close()
    results = done[done["arm"].isin(arms)]
    summary = results.groupby(["witness", "arm"], sort=False)[["bag_auc", "instance_auc", "witness_vs_mimic_auc"]].agg(["mean", "std"])
    pairs = paired(results)
    pairs.to_csv(args.out / "pairs.csv", index=False)
    plot(results, args.out / "needle_bags.png")
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
        print(f"\ntest metrics, mean and sd over {args.seeds} seeds ({args.bags} bags of {args.bag_size}, shift {args.shift})")
        print(summary.to_string())
        if "mined_mimic_share" in results:
            mined = results.dropna(subset=["mined_mimic_share"]).groupby(["witness", "arm"], sort=False)
            print(
                f"\nmined set (selected model): size, share of mimics (base rate {MIMIC_RATE:.0%} of negative instances) and "
                "share of the training negatives' mimics that were mined"
            )
            print(mined[["mined", "mined_mimic_share", "mimic_recall"]].mean().to_string())
        print("\npaired differences over seeds (bootstrap 95 % CI over seeds)")
        print(pairs.to_string(index=False))
    print(f"wall time of this invocation: {time.perf_counter() - t0:.0f} s ({len(jobs)} cohorts trained)")
    return results


if __name__ == "__main__":
    main()
