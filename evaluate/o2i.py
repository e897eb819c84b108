"""`mil evaluate o2i`: score BagNet runs on their image sets and plot accuracy / AUC against the O2I ratio.

For each run directory of `mil train bagnet`::

    RUN_DIR/eval/<split>/predictions.csv   index, label, probability, o2i (one row per image of the split)
    RUN_DIR/eval/<split>/metrics.json      n, n_positive, accuracy (at the checkpoint's threshold 0.5), auc (with a
                                           stratified bootstrap CI, `mil.evaluate.metrics.auc_ci`), loc_ap (mean
                                           localisation AP over positives), o2i (median O2I of the positives), run settings

and for all runs together a PNG with three panels, accuracy, AUC and localisation AP against the image
set's O2I ratio (log axis, in %), one line per group (pooling, norm, rf or width, or several of them),
mean ± sd error bars over the runs that share group and image set (seeds), every run as a dot — a
cross for a run that never fitted its training set — a dashed chance line at 0.5, and beside it a CSV
of the plotted points: group, o2i, n_runs, n_failed, acc_mean, acc_sd, auc_mean, auc_sd, loc_ap_mean,
loc_ap_sd (sd with ddof = 1, 0 for one run).

Failed optimisations (the paper's Fig. 8–9): a run *fitted* its training set when its best training
accuracy over the epochs (``metrics.csv``'s ``train_acc``, measured while training) reached
``fit_threshold`` — 0.99, the paper's "successful optimisation". The means include failed runs as
measured (the paper instead plots them at chance); ``n_failed`` counts them.

Localisation AP (after the paper's appendix C.4, with the target's box as ground truth): for a
positive image of ``H × W`` pixels with box ``x0, y0, x1, y1`` (end exclusive), the saliency map
``S = net.saliency(x)`` ``(h, w)`` — the classifier applied to every position's embedding — is
painted onto pixels: position ``(i, j)`` is centred on pixel ``(stride·i + offset, stride·j + offset)``
(8i + 1) and owns the ``stride × stride`` cell of rows ``[8i − 3, 8i + 5)`` and columns alike; the
first cell extends to pixel 0 and the last to the image edge, so the cells tile the image. Every pixel
gets its cell's score; the AP is scikit-learn's ``average_precision_score`` of those pixel scores
against the box mask (1 inside the box). Pixels of one cell tie, so it is computed exactly from one
score per cell weighted by its in-box and out-of-box pixel counts. It is 1 when every cell that
touches the box lies inside it and outscores every other cell, and about the box's share of the image
(its O2I) for an uninformative map. The reported ``loc_ap`` is the mean over positive images with a
box. (For crops whose lesion is not a rectangle the box over-covers the lesion.)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

import mil
from mil.atomic import atomic_folder, remove_stale_temporaries
from mil.checkpoint import load_bagnet
from mil.device import resolve_device
from mil.errors import OptionError, RunError
from mil.evaluate.metrics import auc_ci
from mil.imagesets import SPLITS, ImageSetDataset
from mil.predict import predict_images

GROUP_KEYS = ("pooling", "norm", "rf", "width")
POINT_COLUMNS = ["group", "o2i", "n_runs", "n_failed", "acc_mean", "acc_sd", "auc_mean", "auc_sd", "loc_ap_mean", "loc_ap_sd", "data"]
FIT_THRESHOLD = 0.99  # training accuracy of a successful optimisation (the paper's footnote 8)


def cell_extents(n: int, size: int, stride: int = 8, offset: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pixel rows (or columns) ``[start_i, end_i)`` owned by each of `n` positions along an axis of `size` px.

    Position ``i`` is centred on pixel ``stride·i + offset`` and owns ``[stride·i + offset − stride//2,
    stride·i + offset − stride//2 + stride)``, clipped; the first starts at 0, the last ends at `size`.
    Returns ``starts (n,), ends (n,)``.
    """
    starts = np.arange(n) * stride + offset - stride // 2  # (n,)
    ends = starts + stride  # (n,)
    starts[0], ends[-1] = 0, size
    return np.clip(starts, 0, size), np.clip(ends, 0, size)


def localisation_ap(saliency: np.ndarray, bbox, image_size: tuple[int, int], stride: int = 8, offset: int = 1) -> float:
    """AP of saliency ``(h, w)`` painted onto an ``H × W`` image against the box ``x0, y0, x1, y1``; NaN if the box is empty.

    See the module docstring; equals ``average_precision_score(mask.ravel(), pixel_scores.ravel())``
    with every pixel given the score of the cell that owns it.
    """
    S = np.asarray(saliency, dtype=np.float64)  # (h, w)
    H, W = image_size
    x0, y0, x1, y1 = (int(v) for v in bbox)
    rs, re = cell_extents(S.shape[0], H, stride, offset)  # (h,), (h,)
    cs, ce = cell_extents(S.shape[1], W, stride, offset)  # (w,), (w,)
    rin = np.clip(np.minimum(re, y1) - np.maximum(rs, y0), 0, None)  # (h,) box rows in each cell row
    cin = np.clip(np.minimum(ce, x1) - np.maximum(cs, x0), 0, None)  # (w,)
    inside = np.outer(rin, cin).ravel()  # (h·w,) box pixels per cell
    total = np.outer(re - rs, ce - cs).ravel()  # (h·w,) pixels per cell
    if inside.sum() == 0:
        return float("nan")
    scores = np.concatenate([S.ravel(), S.ravel()])  # (2·h·w,)
    y = np.concatenate([np.ones_like(inside), np.zeros_like(inside)])  # (2·h·w,)
    weight = np.concatenate([inside, total - inside]).astype(np.float64)  # (2·h·w,)
    keep = weight > 0
    return float(average_precision_score(y[keep], scores[keep], sample_weight=weight[keep]))


def load_bagnet_run(run_dir: str | Path) -> tuple[dict, Path]:
    """``(config.json, checkpoint path)`` of a finished `mil train bagnet` run; `RunError` otherwise."""
    path = Path(run_dir)

    def require(name: str) -> None:
        if not (path / name).is_file():
            raise RunError(
                f"{path / name}: expected a finished run directory of `mil train bagnet`, got no {name}; check the path or finish training."
            )

    require("config.json")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path / 'config.json'}: expected JSON, could not read it ({e}).") from None
    if config.get("stage") != "train_bagnet":
        raise RunError(
            f"{path}: expected a run of `mil train bagnet`, got a {config.get('stage', 'unknown')!r} run instead; use `mil evaluate run` for it."
        )
    require("checkpoint.pt")
    require("summary.csv")  # written last: the run is finished
    return config, path / "checkpoint.pt"


def training_fit(run_dir: str | Path, fit_threshold: float = FIT_THRESHOLD) -> dict:
    """From RUN_DIR/metrics.csv: ``train_acc`` (best training accuracy over the epochs), ``train_acc_last``,
    ``epochs``, ``fitted`` (train_acc >= `fit_threshold`) and ``epochs_to_fit`` (the first epoch that
    reached it, 1-based; None if none did — the paper's Fig. 9a "time to fit")."""
    path = Path(run_dir) / "metrics.csv"
    try:
        acc = pd.read_csv(path)["train_acc"].astype(float)  # (epochs,)
    except (OSError, ValueError, KeyError) as e:
        raise RunError(
            f"{path}: expected the training log of `mil train bagnet` with a train_acc column, could not read it ({e})."
        ) from None
    reached = np.flatnonzero(acc.to_numpy() >= fit_threshold)  # (k,)
    return {
        "train_acc": float(acc.max()),
        "train_acc_last": float(acc.iloc[-1]),
        "epochs": len(acc),
        "fitted": bool(len(reached)),
        "epochs_to_fit": int(reached[0]) + 1 if len(reached) else None,
    }


def _check_options(split: str, batch_size: int, n_boot: int, fit_threshold: float = FIT_THRESHOLD) -> None:
    if split not in SPLITS:
        raise OptionError(f"expected --split to be one of {', '.join(SPLITS)}, got {split!r} instead.")
    if not 0 < fit_threshold <= 1:
        raise OptionError(f"expected --fit-threshold in (0, 1], got {fit_threshold!r} instead.")
    for name, value in (("batch-size", batch_size), ("n-boot", n_boot)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"expected --{name} >= 1, got {value!r} instead.")


def _load_run(
    run_dir: str | Path, data: str | Path | None, split: str, dev, read_data: bool = True
) -> tuple[dict, Path, object, dict, ImageSetDataset | None]:
    """What scoring a run needs, each part checked: ``(config, image-set folder, net, checkpoint, dataset or None)``."""
    config, ckpt_path = load_bagnet_run(run_dir)
    folder = Path(data) if data is not None else Path(config["data"])
    net, ckpt = load_bagnet(ckpt_path, dev)
    return config, folder, net, ckpt, ImageSetDataset(folder, split) if read_data else None


def score_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    split: str = "test",
    device: str = "cpu",
    batch_size: int = 32,
    n_boot: int = 1000,
    seed: int = 0,
    fit_threshold: float = FIT_THRESHOLD,
) -> dict:
    """Score `split` of a run's image set (or of `data`) and write ``RUN_DIR/eval/<split>/``; return metrics.json's content."""
    _check_options(split, batch_size, n_boot, fit_threshold)
    dev = resolve_device(device)
    config, folder, net, ckpt, ds = _load_run(run_dir, data, split, dev)
    fit = training_fit(run_dir, fit_threshold)
    s = ds.split
    positives = np.flatnonzero((s.labels == 1) & (s.bbox[:, 0] >= 0))  # (P,)
    logits, maps = predict_images(net, ds, batch_size, dev, saliency_for=positives)  # (n,), {row: (h, w)}
    prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))  # (n,)
    H, W = s.images.shape[-2:]
    aps = [localisation_ap(maps[i], s.bbox[i], (H, W), net.stride, net.offset) for i in positives]
    aps = [a for a in aps if a == a]
    threshold = float(ckpt.get("threshold", 0.5))
    both = len(np.unique(s.labels)) == 2
    pos_o2i = s.o2i[s.labels == 1]
    doc = {
        "run": str(Path(run_dir)),
        "split": split,
        "data": str(folder.resolve()),
        "n": len(s),
        "n_positive": int(s.labels.sum()),
        "threshold": threshold,
        "accuracy": float(((prob >= threshold) == (s.labels == 1)).mean()),
        "auc": auc_ci(s.labels, prob, n_boot=n_boot, seed=seed) if both else None,
        "loc_ap": float(np.mean(aps)) if aps else None,
        "loc_ap_n": len(aps),
        "o2i": float(np.median(pos_o2i)) if len(pos_o2i) else None,
        "rf": net.rf,
        "pooling": config["train"]["pooling"],
        "width": config["train"]["width"],
        "norm": config["train"]["norm"],
        "seed": config["train"]["seed"],
        "best_epoch": ckpt["best_epoch"],
        **fit,
        "fit_threshold": fit_threshold,
        "mil_version": mil.__version__,
    }
    pred = pd.DataFrame({"index": np.arange(len(s)), "label": s.labels.astype(int), "probability": prob, "o2i": s.o2i})
    _write_eval(Path(run_dir) / "eval" / split, doc, pred)
    return doc


def _write_eval(final: Path, doc: dict, pred: pd.DataFrame) -> None:
    """metrics.json and predictions.csv, written into a temporary folder renamed into place when whole."""
    if final.parent.is_dir():
        remove_stale_temporaries(final.parent)  # left by a killed evaluation
    with atomic_folder(final) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
        pred.to_csv(tmp / "predictions.csv", index=False)


def resolve_group_by(docs: list[dict], group_by: str) -> list[str]:
    """The settings that name a line: `group_by` (one of `GROUP_KEYS` or several, comma-separated), or for
    ``auto`` those of them that vary (pooling if none)."""
    keys = [k.strip() for k in str(group_by).split(",")]
    if all(k in GROUP_KEYS for k in keys):
        return keys
    if group_by != "auto":
        raise OptionError(f"expected --group-by to be auto or some of {', '.join(GROUP_KEYS)} (comma-separated), got {group_by!r} instead.")
    varying = [k for k in GROUP_KEYS if len({d.get(k) for d in docs}) > 1]
    return varying or ["pooling"]


def run_table(docs: list[dict], group_by: str = "auto") -> pd.DataFrame:
    """One row per run: its metrics.json with ``group`` (the line it belongs to) and ``auc_value`` added."""
    keys = resolve_group_by(docs, group_by)
    table = pd.DataFrame(docs)
    table["group"] = table.apply(lambda r: ", ".join(f"{k}={r[k]:g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys), axis=1)
    table["auc_value"] = [d["auc"]["auc"] if d["auc"] else np.nan for d in docs]
    table["loc_ap"] = pd.to_numeric(table["loc_ap"]).astype(float)
    table["o2i"] = pd.to_numeric(table["o2i"]).astype(float)
    table["fitted"] = table["fitted"].astype(bool) if "fitted" in table else True
    return table


def o2i_points(docs: list[dict], group_by: str = "auto") -> pd.DataFrame:
    """One row per (group, image set): the plotted points, `POINT_COLUMNS`, sorted by group and O2I.

    Runs in one point should differ only in their seed; a `UserWarning` names other differences.
    """
    keys = resolve_group_by(docs, group_by)
    table = run_table(docs, group_by)
    rows = []
    for (group, data), part in table.groupby(["group", "data"], sort=False):
        other = [k for k in GROUP_KEYS if k not in keys and part[k].nunique() > 1]
        if other:
            warnings.warn(
                f"runs of group {group!r} on {data} differ in {', '.join(other)}, not only in their seed; they are averaged together.",
                stacklevel=2,
            )
        sd = lambda v: float(v.std(ddof=1)) if v.notna().sum() > 1 else 0.0
        rows.append(
            {
                "group": group,
                "o2i": float(part["o2i"].iloc[0]),
                "n_runs": len(part),
                "n_failed": int((~part["fitted"]).sum()),
                "acc_mean": float(part["accuracy"].mean()),
                "acc_sd": sd(part["accuracy"]),
                "auc_mean": float(part["auc_value"].mean()),
                "auc_sd": sd(part["auc_value"]),
                "loc_ap_mean": float(part["loc_ap"].mean()),
                "loc_ap_sd": sd(part["loc_ap"]),
                "data": data,
            }
        )
    return pd.DataFrame(rows, columns=POINT_COLUMNS).sort_values(["group", "o2i"], ignore_index=True)


PANELS = (  # point mean, point sd, per-run column, axis label
    ("acc_mean", "acc_sd", "accuracy", "test accuracy"),
    ("auc_mean", "auc_sd", "auc_value", "test AUC"),
    ("loc_ap_mean", "loc_ap_sd", "loc_ap", "localisation AP"),
)


def plot_o2i(points: pd.DataFrame, out: Path, title: str = "", runs: pd.DataFrame | None = None) -> None:
    """Accuracy, AUC and localisation AP (three panels) against O2I in % (log axis), one line per group with
    ± sd bars, chance dashed; with `runs` (`run_table`) every run as a dot, failed optimisations as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.2), dpi=120, sharex=True)
    for ax, (mean, sd, per_run, label) in zip(axes, PANELS):
        for k, (group, part) in enumerate(points.groupby("group", sort=True)):
            colour = f"C{k % 10}"
            ax.errorbar(part["o2i"] * 100, part[mean], yerr=part[sd], marker="o", ms=4, capsize=3, lw=1.4, label=group, color=colour)
            if runs is not None:
                mine = runs[runs["group"] == group]
                for fitted, marker in ((True, "."), (False, "x")):
                    sel = mine[mine["fitted"] == fitted]
                    ax.scatter(sel["o2i"] * 100, sel[per_run], marker=marker, s=22 if fitted else 30, color=colour, alpha=0.6, lw=1)
        if per_run != "loc_ap":
            ax.axhline(0.5, ls="--", color="grey", lw=0.8, label="chance")
        ax.set_xscale("log")
        ax.set_xticks(sorted(points["o2i"].unique() * 100))  # a tick at every image set's O2I, none in between
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="object-to-image ratio (%)", ylabel=label, ylim=(0.0 if per_run == "loc_ap" else 0.4, 1.02))
        ax.grid(alpha=0.3, which="both", lw=0.5)
    if runs is not None and (~runs["fitted"]).any():
        axes[2].scatter([], [], marker="x", color="k", label="a run that never fitted its training set")
    axes[2].legend(fontsize=7, loc="upper left")  # the loc AP panel has room above its points
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def evaluate_o2i(
    run_dirs: list[str | Path],
    out: str | Path,
    data: str | Path | None = None,
    split: str = "test",
    group_by: str = "auto",
    device: str = "cpu",
    batch_size: int = 32,
    n_boot: int = 1000,
    seed: int = 0,
    fit_threshold: float = FIT_THRESHOLD,
) -> tuple[pd.DataFrame, list[dict]]:
    """Score every run (`score_run`), then write the PNG `out` and the CSV beside it; return (points, per-run metrics)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise OptionError(f"expected --out to end in .png, got {out.name!r} instead.")
    if not run_dirs:
        raise OptionError("expected at least one run directory, got none.")
    resolve_group_by([], group_by)  # a bad option fails before any scoring
    _check_options(split, batch_size, n_boot, fit_threshold)
    resolve_device(device)
    read = set()  # every run loaded (config, checkpoint, image set, each set once) and dropped before any is scored and written
    for r in run_dirs:
        folder = _load_run(r, data, split, "cpu", read_data=False)[1]
        if folder.resolve() not in read:
            ImageSetDataset(folder, split)
            read.add(folder.resolve())
    docs = [score_run(r, data, split, device, batch_size, n_boot, seed, fit_threshold) for r in run_dirs]
    points = o2i_points(docs, group_by)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = sum(not d["fitted"] for d in docs)
    title = f"{split} split, {len(docs)} runs ({failed} never reached training accuracy {fit_threshold:g})"
    plot_o2i(points, out, title=title, runs=run_table(docs, group_by))
    points.to_csv(out.with_suffix(".csv"), index=False)
    return points, docs
