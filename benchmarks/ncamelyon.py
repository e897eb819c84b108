"""nCAMELYON end to end on synthetic slides: BagNet accuracy, AUC and localisation against the O2I ratio.

    python benchmarks/ncamelyon.py [--config cpu|gpu|quick] [--seeds N] [--jobs J] [--threads 1]
        [--device cpu|cuda] [--out bench_out/ncamelyon]

The 3-channel O2I path of Pawlowski et al., *Needles in Haystacks* (nCAMELYON, methods.md §5.2–5.4),
on slides made here, through the stages' own functions (what the `mil` commands call):

1. `mil extract synthetic` (`make_cohort`, with a validation split carved per label from the
   training slides as `benchmarks/finetune_study.py` does): two cohorts of the same slides, one with
   small lesions (``--lesion-fraction`` 0.002 of the tissue) and one with large ones (0.05);
2. `mil extract crops` (`run_crops`) per cohort × O2I band (10–50 %, 1–10 %, 0.1–1 %, the paper's
   bands that the lesions can fill) at 4 µm per crop px (16 level-0 px: the masks' own scale); an
   image set without positives in train, val or test is reported and not trained;
3. `mil train bagnet` (`run_bagnet`) per usable image set × seed: the paper's nCAMELYON choices
   (rf 9 and max pooling, its best on nCAMELYON; affine InstanceNorm; RMSprop lr 5e-5 with the
   milestones scaled to the run; batch 8 × 4 accumulated), a reduced width, training subset and
   length on CPU. ``--jobs J`` trains J runs side by side, each process with ``--threads`` torch threads;
4. `mil evaluate o2i` (`evaluate_o2i`) on the test split of every run.

Writes ``OUT/ncamelyon.csv`` (one row per cohort × band: image counts, the test positives' median
O2I, test accuracy, AUC and localisation AP as mean ± sd over seeds, the runs that never reached
training accuracy 0.99, each run's best training accuracy) and ``OUT/ncamelyon.png`` (the stage's
`plot_o2i`, one line per cohort); `evaluate_o2i`'s own figure and points (one line for all runs) are
``OUT/eval_o2i.png`` / ``.csv``. Finished cohorts, image sets and runs are skipped on a rerun.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
BANDS = ((0.1, 0.5), (0.01, 0.1), (0.001, 0.01))  # the paper's 50–10 %, 10–1 %, 1–0.1 %
LESIONS = {"small": 0.002, "large": 0.05}  # lesion area / tissue area of the positive slides
CONFIGS = {
    # ≤ 20 min on the 2-core machine (measured: docs/o2i.md). 4096² slides; 64² crops at 16 level-0 px per px.
    "cpu": dict(
        n_slides=32, size=4096, crop=64, per_lesion=50, per_slide=100, width=0.125, epochs=8, max_train=512, seeds=2, jobs=2, device="cpu"
    ),
    # A CUDA machine (untested): 8192² slides, the paper's 128² crops (the same lesion-to-crop geometry),
    # full width, its 50 epochs on every training image, 3 seeds.
    "gpu": dict(
        n_slides=64, size=8192, crop=128, per_lesion=50, per_slide=100, width=1.0, epochs=50, max_train=None, seeds=3, jobs=1, device="cuda"
    ),
    # The smoke test's: seconds.
    "quick": dict(
        n_slides=8, size=2048, crop=32, per_lesion=4, per_slide=8, width=0.0625, epochs=1, max_train=None, seeds=2, jobs=1, device="cpu"
    ),
}
LEVEL_MPP = 4.0  # µm per crop px: 16 level-0 px at the cohorts' 0.25 µm/px, one lesion-mask px per crop px
BAGNET = dict(rf=9, pooling="max", norm="in_aff", batch_size=8, accumulate=4, lr=5e-5)  # the paper's nCAMELYON settings


def band_name(band: tuple[float, float]) -> str:
    return f"{band[0]:g}-{band[1]:g}"


def make_cohorts(out: Path, c: dict) -> dict[str, Path]:
    """Both cohorts (seed 0: the same slides, tissue and lesion sites; only the lesions' size differs)."""
    spec = importlib.util.spec_from_file_location("finetune_study_benchmark", HERE / "finetune_study.py")
    finetune_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune_study)
    return {
        name: finetune_study.make_cohort(out / name, dict(n_slides=c["n_slides"], size=c["size"], lesion=lf, mimic=0.0))
        for name, lf in LESIONS.items()
    }


def make_image_sets(out: Path, manifests: dict[str, Path], c: dict) -> dict[tuple[str, str], dict]:
    """One image set per cohort × band; returns each set's imageset.json content."""
    from mil.extract.generate.crops import CropConfig, run_crops, summary

    metas = {}
    for cohort, manifest in manifests.items():
        for band in BANDS:
            cfg = CropConfig(size=c["crop"], o2i=band, level_mpp=LEVEL_MPP, per_lesion=c["per_lesion"], per_slide=c["per_slide"])
            result = run_crops(manifest, manifest.parent / "masks", out / f"{cohort}_{band_name(band)}", cfg, progress=False)
            print(" ", summary(result), flush=True)
            metas[(cohort, band_name(band))] = result["meta"]
    return metas


def train_all(jobs: list[tuple[Path, Path, object]], n_jobs: int, threads: int, device: str) -> list[pd.DataFrame]:
    """`run_bagnet` for every (data, run, config): in this process, or `n_jobs` processes side by side."""
    from mil.train.bagnet import run_bagnet

    if n_jobs <= 1:
        return [run_bagnet(d, r, cfg, device=device) for d, r, cfg in jobs]
    with ProcessPoolExecutor(n_jobs, mp_context=get_context("spawn"), initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(run_bagnet, d, r, cfg, device=device) for d, r, cfg in jobs]
        return [f.result() for f in futures]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0 … N-1 per image set (default: the configuration's)")
    ap.add_argument("--jobs", type=int, default=None, help="training processes side by side (default: the configuration's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--device", default=None, help="cpu | cuda | auto (default: the configuration's)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/ncamelyon"))
    a = ap.parse_args(argv)
    c = CONFIGS[a.config]
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return study(a, c)
    finally:
        torch.set_num_threads(threads)  # a caller's (e.g. the test session's) thread count is left as it was


def study(a: argparse.Namespace, c: dict) -> pd.DataFrame:
    """Cohorts, image sets, runs, evaluation, table and figure (see the module docstring)."""
    from mil.evaluate.o2i import evaluate_o2i, plot_o2i, run_table
    from mil.train.bagnet import BagNetTrainConfig

    seeds, n_jobs, device = range(a.seeds or c["seeds"]), a.jobs or c["jobs"], a.device or c["device"]
    out, t0 = a.out, time.perf_counter()
    manifests = make_cohorts(out / "slides", c)
    print(f"cohorts ({c['n_slides']} slides of {c['size']}² px each): {time.perf_counter() - t0:.0f} s", flush=True)
    metas = make_image_sets(out / "sets", manifests, c)
    print(f"image sets: {time.perf_counter() - t0:.0f} s", flush=True)

    jobs, runs = [], {}
    for (cohort, band), meta in metas.items():
        if min(meta["n_positive"].values()) == 0:
            print(f"  {cohort}_{band}: no positives in some split ({meta['n_positive']}); not trained")
            continue
        max_train = None if c["max_train"] is None else min(c["max_train"], meta["n"]["train"])  # a balanced subset
        for seed in seeds:
            cfg = BagNetTrainConfig(width=c["width"], epochs=c["epochs"], max_train=max_train, seed=seed, **BAGNET)
            run = out / "runs" / f"{cohort}_{band}_seed{seed}"
            jobs.append((out / "sets" / f"{cohort}_{band}", run, cfg))
            runs.setdefault((cohort, band), []).append(run)
    if not jobs:
        raise SystemExit("no image set has positives in train, val and test: use more or larger slides (--config)")
    t = time.perf_counter()
    for (_, run, _), summary in zip(jobs, train_all(jobs, n_jobs, a.threads, device)):
        row = summary.iloc[0]
        done = "skipped (finished before)" if summary.attrs.get("skipped") else "trained"
        print(
            f"  {run.name}: best epoch {int(row['best_epoch'])}, val acc {row['val_acc']:.3f}, {row['train_images_per_s']:.1f} images/s, {done}"
        )
    print(f"training ({len(jobs)} runs, {n_jobs} processes × {a.threads} threads): {time.perf_counter() - t:.0f} s", flush=True)

    all_runs = [r for rs in runs.values() for r in rs]
    points, docs = evaluate_o2i(all_runs, out / "eval_o2i.png", split="test", group_by="pooling", device=device)
    per_run = run_table(docs, "pooling")  # the stage's per-run rows; train_acc = the run's best training accuracy
    cohort_of = {str((out / "sets" / f"{cb[0]}_{cb[1]}").resolve()): cb for cb in metas}
    rows = []
    for (cohort, band), meta in metas.items():
        row = {"cohort": cohort, "band": band, **{f"n_{s}": meta["n"][s] for s in ("train", "val", "test")}}
        point = points[points["data"].map(cohort_of) == (cohort, band)]
        row.update(point.drop(columns=["group", "data"]).iloc[0].to_dict() if len(point) else {"n_runs": 0})
        best = per_run.loc[per_run["data"].map(cohort_of) == (cohort, band), "train_acc"]
        row["best_train_acc"] = " / ".join(f"{v:.3f}" for v in best)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "ncamelyon.csv", index=False, float_format="%.4g")
    title = (
        f"synthetic nCAMELYON ({a.config}): {c['n_slides']} slides per cohort, {c['crop']}² crops; BagNet rf 9, max, in_aff, width "
        f"{c['width']:g}, {c['epochs']} epochs, lr 5e-5; test split, mean ± sd over {len(seeds)} seeds"
    )
    for frame in (points, per_run):  # one line per cohort (the stage's grouping puts every run on one: pooling=max)
        frame["group"] = [f"{cohort_of[d][0]} lesions" for d in frame["data"]]
    plot_o2i(points, out / "ncamelyon.png", title=title, runs=per_run)

    show = table[["cohort", "band", "n_train", "n_val", "n_test"]].copy()
    show["o2i"] = (100 * table["o2i"]).map(lambda v: f"{v:.2f} %" if v == v else "—")
    for name in ("acc", "auc", "loc_ap"):
        show[name] = [f"{m:.3f} ± {s:.3f}" if m == m else "—" for m, s in zip(table[f"{name}_mean"], table[f"{name}_sd"])]
    show["best train acc"] = table["best_train_acc"].replace("", "—")
    show["failed"] = table["n_failed"].map(lambda v: f"{v:.0f}" if v == v else "—")
    print(f"\n{title}:\n{show.to_string(index=False)}")
    print(f"\nwrote {out / 'ncamelyon.csv'} and {out / 'ncamelyon.png'}; total {time.perf_counter() - t0:.0f} s")
    return table


if __name__ == "__main__":
    main()
