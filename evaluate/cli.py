"""`mil evaluate …` commands. Thin: parse options, call the stage's functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

app = typer.Typer(
    help="Stage 3: run directories → metrics, plots, comparisons, heatmaps, O2I studies.", no_args_is_help=True, rich_markup_mode="rich"
)


@app.command()
def run(
    run_dir: Annotated[Path, typer.Argument(help="Run directory from `mil train features`.")],
    features: Annotated[Optional[Path], typer.Option(help="Folder of feature files (default: the run's feature_dir).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="Manifest giving the labels (default: the run's slides.csv).")] = None,
    split: Annotated[
        Literal["test", "val", "train"],
        typer.Option(help="Which set of splits.csv to score: test (each fold's held-out slides), val or train."),
    ] = "test",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the confidence intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N: where the heads run.")] = "auto",
) -> None:
    """Score a run's held-out slides: AUC with a bootstrap CI, thresholded metrics, ROC/PR plots (multi-class: per-class
    and macro one-vs-rest AUC, accuracy, balanced accuracy, confusion matrix)."""
    from mil.evaluate.run import evaluate_run, load_run
    from mil.labels import read_label_table

    labels = None
    if manifest is not None:  # read as training read its labels: the run's label column and class map
        run = load_run(run_dir)
        rec = run.config.get("labels") or {}
        binary = {"0": 0, "1": 1, "0.0": 0, "1.0": 1} if run.n_classes == 2 else None  # a binary run without a map: 0/1 only
        label_map = rec.get("label_map") or binary
        labels = read_label_table(
            manifest, label_column=rec.get("label_column", "label"), label_map=label_map, n_classes=run.n_classes
        ).slides
    doc, out = evaluate_run(run_dir, features=features, labels=labels, split=split, n_boot=n_boot, seed=seed, device=device)
    if "auc_macro" in doc:
        _echo_multiclass(doc, split)
        typer.echo(f"wrote {out}")
        return
    a = doc["auc"]
    typer.echo(f"{split}: {doc['n_slides']} slides ({doc['n_positive']} positive), folds {', '.join(doc['folds'])}")
    typer.echo(
        f"  AUC {a['auc']:.3f}  95% CI [{a['ci_low']:.3f}, {a['ci_high']:.3f}]  ({a['n_boot']} stratified bootstrap resamples, seed {a['seed']})"
    )
    typer.echo(
        f"  at the validation thresholds: balanced accuracy {doc['balanced_accuracy']:.3f}  sensitivity {doc['sensitivity']:.3f}  "
        f"specificity {doc['specificity']:.3f}  F1 {doc['f1']:.3f}"
    )
    if "fold_mean_sd" in doc:
        m = doc["fold_mean_sd"]
        typer.echo(
            f"  over {len(doc['per_fold'])} folds: AUC {m['auc'][0]:.3f} ± {m['auc'][1]:.3f}  balanced accuracy "
            f"{m['balanced_accuracy'][0]:.3f} ± {m['balanced_accuracy'][1]:.3f}  (mean ± sd)"
        )
    typer.echo(f"wrote {out}")


def _echo_multiclass(doc: dict, split: str) -> None:
    """The summary lines of a multi-class `mil evaluate run`."""
    counts = ", ".join(f"{k} {v}" for k, v in doc["n_per_class"].items())
    typer.echo(f"{split}: {doc['n_slides']} slides ({counts}), folds {', '.join(doc['folds'])}")
    m = doc["auc_macro"]
    typer.echo(
        f"  macro one-vs-rest AUC {m['auc']:.3f}  95% CI [{m['ci_low']:.3f}, {m['ci_high']:.3f}]  "
        f"({m['n_boot']} class-stratified bootstrap resamples, seed {m['seed']})"
    )
    for a in doc["auc_per_class"]:
        typer.echo(f"    {a['class']}: AUC {a['auc']:.3f}  [{a['ci_low']:.3f}, {a['ci_high']:.3f}]")
    typer.echo(
        f"  argmax: accuracy {doc['accuracy']:.3f}  balanced accuracy {doc['balanced_accuracy']:.3f}  (confusion matrix in metrics.json)"
    )
    if "fold_mean_sd" in doc:
        f = doc["fold_mean_sd"]
        typer.echo(f"  over {len(doc['per_fold'])} folds: macro AUC {f['auc_macro'][0]:.3f} ± {f['auc_macro'][1]:.3f}  (mean ± sd)")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="Run directory from `mil train features`.")],
    source: Annotated[
        Path, typer.Argument(help="A folder of feature files (every *.h5 in it, unlabelled), or a manifest CSV (slide_id [, label]).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder: predictions.csv, config.json, tiles/, metrics.json when labelled.")],
    features: Annotated[Optional[Path], typer.Option(help="Folder of the manifest's feature files (needed with a manifest).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N: where the heads run.")] = "auto",
    tiles: Annotated[Literal["h5", "csv", "both", "none"], typer.Option(help="Per-tile scores in tiles/.")] = "h5",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the AUC interval (labelled slides).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
) -> None:
    """Score a new cohort (labels optional) with the ensemble of a run's folds; per-tile scores; metrics when labelled."""
    from mil.evaluate.predict import predict_cohort

    pred, doc, path = predict_cohort(
        run_dir,
        source,
        out,
        features=features,
        device=device,
        tiles=tiles,
        overwrite=overwrite,
        n_boot=n_boot,
        seed=seed,
        progress=progress,
    )
    folds = [c[len("predicted_") :] for c in pred.columns if c.startswith("predicted_")]
    scored = pred[pred["n_tiles"] > 0]
    without = f"; {len(pred) - len(scored)} without tiles" if len(scored) < len(pred) else ""
    head = f"{len(pred)} slides scored by {len(folds)} fold(s) ({', '.join(folds)})"
    if "threshold" not in pred.columns:  # multi-class: the argmax of the folds' mean softmax
        classes = json.loads((path / "config.json").read_text())["classes"]
        counts = scored["predicted"].value_counts()
        typer.echo(f"{head}; ensemble argmax: " + ", ".join(f"{name} {int(counts.get(k, 0))}" for k, name in enumerate(classes)) + without)
        if doc is not None:
            a, e = doc["auc_macro"], doc["ensemble"]
            typer.echo(
                f"  {doc['n_labelled']} labelled slides: macro one-vs-rest AUC {a['auc']:.3f}  95% CI [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
            )
            typer.echo(f"  ensemble argmax: accuracy {e['accuracy']:.3f}  balanced accuracy {e['balanced_accuracy']:.3f}")
        typer.echo(f"wrote {path}")
        return
    typer.echo(
        f"{head}; ensemble threshold {pred['threshold'].iloc[0]:.3f}: {int(scored['predicted'].sum())} of {len(scored)} predicted positive"
        + without
    )
    if doc is not None:
        a, e = doc["auc"], doc["ensemble"]
        typer.echo(
            f"  {doc['n_labelled']} labelled slides ({doc['n_positive']} positive): AUC {a['auc']:.3f}  95% CI [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
        )
        typer.echo(
            f"  ensemble at {e['threshold']:.3f}: balanced accuracy {e['balanced_accuracy']:.3f}  sensitivity {e['sensitivity']:.3f}  "
            f"specificity {e['specificity']:.3f}"
        )
    typer.echo(f"wrote {path}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more evaluated run directories; the first is the reference.")],
    split: Annotated[str, typer.Option(help="Which evaluation to compare (eval/<split>).")] = "test",
    n_boot: Annotated[int, typer.Option(help="Paired bootstrap resamples.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
) -> None:
    """AUCs with CIs, and each run's AUC difference from the first with a paired-bootstrap CI and p-value."""
    from mil.evaluate.compare import compare_runs

    table = compare_runs(run_dirs, split=split, n_boot=n_boot, seed=seed)
    for _, r in table.iterrows():
        line = f"{r['run']}: AUC {r['auc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        if "diff" in r and r["diff"] == r["diff"]:
            line += f"   vs first: ΔAUC {r['diff']:+.3f} [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]  p = {r['p_value']:.3g}"
        typer.echo(line)
    typer.echo(f"{int(table['n_slides'][0])} slides, paired stratified bootstrap, {n_boot} resamples, seed {seed}")


@app.command()
def heatmap(
    run_dir: Annotated[Path, typer.Argument(help="Run directory from `mil train features`.")],
    slide: Annotated[
        Optional[str], typer.Option("--slide", help="One slide_id: its figure at --out (default RUN_DIR/heatmaps/<slide>.png).")
    ] = None,
    slides: Annotated[
        Optional[list[str]],
        typer.Option(
            "--slides",
            help="test (each fold's test slides) | all (every feature file) | slide ids, comma-separated or repeated: "
            "all drawn in one process into the --out folder, with index.html. A CSV here is the old name of --manifest.",
        ),
    ] = None,
    manifest: Annotated[
        Optional[Path], typer.Option("--manifest", help="Manifest CSV giving slide paths (default: the paths the feature files record).")
    ] = None,
    slides_root: Annotated[
        Optional[Path],
        typer.Option(help="Folder that relative slide paths start from; moved slides are looked for here by file name."),
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="PNG to write with --slide; folder with --slides (default RUN_DIR/heatmaps).")] = None,
    features: Annotated[Optional[Path], typer.Option(help="Folder of feature files (default: the run's feature_dir).")] = None,
    fold: Annotated[
        Optional[str], typer.Option(help="Checkpoint to use (default: the fold that held the slide out, else the first).")
    ] = None,
    score: Annotated[
        Literal["attention", "instance"],
        typer.Option(help="What to paint (attention falls back to instance scores for heads without it)."),
    ] = "attention",
    top_k: Annotated[int, typer.Option(help="Tiles in the montage of the highest-scoring tiles.")] = 8,
    thumbnail_size: Annotated[int, typer.Option(help="Longest side of the thumbnail in pixels.")] = 1024,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="With --slides: draw slides whose outputs exist again.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr (with --slides).")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N: where the head runs.")] = "auto",
) -> None:
    """Paint each tile's attention (or instance score) over the slide thumbnail, with the top-k tiles; tile scores as CSV and GeoJSON."""
    from mil.errors import OptionError

    old = [v for v in slides or [] if v.lower().endswith(".csv") or "/" in v]  # --slides CSV: the old name of --manifest
    if old:
        if len(old) > 1 or (manifest is not None and manifest.resolve() != Path(old[0]).resolve()):
            raise OptionError(
                f"expected one manifest, got --manifest {manifest} and --slides {', '.join(old)}; give it once, as --manifest."
            )
        manifest, slides = Path(old[0]), [v for v in slides if v not in old] or None
    if (slide is None) == (slides is None):
        raise OptionError(
            "expected --slide ID (one slide) or --slides test|all|IDS (many), got " + ("both." if slide is not None else "neither.")
        )
    opts = dict(
        features=features, fold=fold, score=score, top_k=top_k, thumbnail_size=thumbnail_size, slides_root=slides_root, device=device
    )
    if slide is not None:
        from mil.evaluate.heatmap import render_heatmap
        from mil.evaluate.heatmap_cohort import output_paths

        path = render_heatmap(run_dir, slide, manifest, out=out, **opts)
        files = output_paths(path)
        typer.echo(f"wrote {path} (tile scores: {files['csv']}, {files['geojson']})")
        return
    from mil.evaluate.heatmap_cohort import render_cohort

    report, index = render_cohort(run_dir, slides, out=out, manifest=manifest, overwrite=overwrite, progress=progress, **opts)
    counts = report["status"].value_counts()
    typer.echo(
        f"{len(report)} slides: {counts.get('written', 0)} drawn, {counts.get('skipped', 0)} skipped (outputs exist), "
        f"{counts.get('error', 0)} failed"
    )
    typer.echo(f"wrote {index}")
    if counts.get("error", 0):
        raise typer.Exit(1)


@app.command()
def o2i(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories from `mil train bagnet` (seeds, poolings, RFs, image sets).")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write; the plotted points go to a CSV beside it.")],
    data: Annotated[Optional[Path], typer.Option(help="Image-set folder to score (default: each run's own, from its config.json).")] = None,
    split: Annotated[Literal["test", "val", "train"], typer.Option(help="Split of the image set to score.")] = "test",
    group_by: Annotated[
        str, typer.Option(help="One line per pooling | norm | rf | width (or several, e.g. pooling,norm), or auto (whichever vary).")
    ] = "auto",
    device: Annotated[str, typer.Option(help="cpu | cuda | auto.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for each run's AUC interval.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    fit_threshold: Annotated[float, typer.Option(help="Best training accuracy below which a run counts as a failed optimisation.")] = 0.99,
) -> None:
    """Accuracy, AUC and localisation AP of BagNet runs, plotted against the O2I ratio of their image sets."""
    from mil.evaluate.o2i import evaluate_o2i

    points, docs = evaluate_o2i(
        run_dirs,
        out,
        data=data,
        split=split,
        group_by=group_by,
        device=device,
        batch_size=batch_size,
        n_boot=n_boot,
        seed=seed,
        fit_threshold=fit_threshold,
    )
    for d in docs:
        auc = f"{d['auc']['auc']:.3f}" if d["auc"] else "-"
        ap = f"{d['loc_ap']:.3f}" if d["loc_ap"] is not None else "-"
        typer.echo(
            f"{d['run']}: {split} n={d['n']}  O2I {100 * (d['o2i'] or 0):.3g}%  accuracy {d['accuracy']:.3f}  AUC {auc}  loc AP {ap}  "
            f"training accuracy {d['train_acc']:.3f}{'' if d['fitted'] else ' (never fitted)'}"
        )
    table = points.drop(columns=["data"]).assign(o2i=lambda t: (100 * t["o2i"]).map("{:.3g}%".format))
    typer.echo(table.to_string(index=False, float_format="{:.3f}".format))
    typer.echo(f"wrote {out} and {out.with_suffix('.csv')}")
