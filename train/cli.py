"""`mil train …` commands. Thin: parse options, build the stage's config, call the stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

app = typer.Typer(help="Stage 2: feature files → trained MIL heads; image sets → BagNets.", no_args_is_help=True, rich_markup_mode="rich")


@app.command()
def features(
    feature_dir: Annotated[Path, typer.Argument(help="Folder of <slide_id>.h5 feature files (from `mil extract features`).")],
    manifest: Annotated[
        Path,
        typer.Option(
            help="Label table: our manifest (slide_id, label, [split, patient_id]), CLAM's case_id,slide_id,label CSV, or STAMP's clinical table (with --slide-table)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Run directory to create.")],
    head: Annotated[str, typer.Option(help="Head name: abmil, gated_abmil, maxpool, meanpool, lse, chowder, dsmil.")] = "abmil",
    n_classes: Annotated[
        int,
        typer.Option(
            help="Number of slide classes: 2 (binary, one logit) or C > 2 (labels 0..C-1, or C string classes mapped in sorted order; "
            "softmax cross-entropy weighted by inverse class frequency; heads abmil, gated_abmil, maxpool, meanpool, lse)."
        ),
    ] = 2,
    folds: Annotated[
        Optional[int], typer.Option(help="K for patient-level stratified K-fold CV (default: the manifest's split column).")
    ] = None,
    repeats: Annotated[int, typer.Option(help="Repeats of K-fold CV.")] = 1,
    val_fraction: Annotated[float, typer.Option(help="Share of training patients carved out for validation.")] = 0.2,
    epochs: Annotated[int, typer.Option(help="Maximum epochs.")] = 50,
    patience: Annotated[int, typer.Option(help="Early stopping: epochs without a better validation AUC.")] = 10,
    lr: Annotated[float, typer.Option(help="Adam learning rate (default chosen by benchmarks/defaults.py).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="Adam weight decay.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Bags per step (padded with a mask).")] = 1,
    recipe: Annotated[
        Literal["bce", "hnm-wsi"],
        typer.Option(
            help="Loss recipe: bce (bag BCE), or hnm-wsi (the HNM-WSI authors' MIL loss: 0.5 bag + 0.5 max-instance BCE + 0.1 ranking, hard negatives). Options below override its parts."
        ),
    ] = "bce",
    bag_weight: Annotated[
        Optional[float], typer.Option(help="Weight of the bag BCE (DSMIL: its bag branch). Default: the recipe's.")
    ] = None,
    max_instance_weight: Annotated[
        Optional[float], typer.Option(help="Weight of the BCE on the largest instance score. Default: the recipe's (DSMIL 0.5).")
    ] = None,
    ranking_weight: Annotated[
        Optional[float],
        typer.Option(help="Weight of the MI ranking loss (0 = off); on, every batch holds both classes. Default: the recipe's."),
    ] = None,
    rank_k: Annotated[Optional[int], typer.Option(help="Top-k instances per bag in the ranking loss (default 10).")] = None,
    rank_margin: Annotated[Optional[float], typer.Option(help="Margin of the ranking loss (default 1).")] = None,
    hard_negatives: Annotated[
        Optional[bool],
        typer.Option(
            "--hard-negatives/--no-hard-negatives",
            help="Mine hard negative instances after a warm-up and refresh them (default: the recipe's).",
            show_default=False,
        ),
    ] = None,
    neg_ratio: Annotated[
        Optional[float], typer.Option(help="Fraction of all negative-bag instances kept as hard negatives (default 0.2).")
    ] = None,
    hnm_warmup: Annotated[int, typer.Option(help="Epochs before the first mining.")] = 5,
    hnm_every: Annotated[int, typer.Option(help="Epochs between refreshes of the mined set.")] = 5,
    hnm_bank: Annotated[
        Optional[int],
        typer.Option(help="Mined negatives of the whole training set added to each ranking step's negative top-k pool (default 10)."),
    ] = None,
    hnm_instance_weight: Annotated[
        float, typer.Option(help="Opt-in: instance BCE on mined negatives (target 0) and pseudo-positives (1).")
    ] = 0.0,
    pos_ratio: Annotated[
        float, typer.Option(help="Pseudo-positives for --hnm-instance-weight: top fraction of confident positive-bag tiles.")
    ] = 0.2,
    instance_labels: Annotated[
        Optional[Path], typer.Option(help="CSV of annotated tiles (slide_id, x, y, label) for an instance loss beside the bag loss.")
    ] = None,
    instance_loss: Annotated[
        Literal["ece", "bce"], typer.Option(help="Instance loss for --instance-labels: ece (exclusive cross-entropy) or bce.")
    ] = "ece",
    instance_weight: Annotated[float, typer.Option(help="Weight of the instance loss.")] = 1.0,
    ece_schedule_epochs: Annotated[
        Optional[int],
        typer.Option(help="ECE's annealing (the reference's 200-epoch schedule) stretched to this many epochs; default --epochs."),
    ] = None,
    standardize: Annotated[
        bool,
        typer.Option(
            "--standardize/--no-standardize",
            help="Standardise features with the training bags' per-feature mean and sd (kept in the checkpoint); default on, chosen by benchmarks/defaults.py.",
        ),
    ] = True,
    cache: Annotated[
        Literal["auto", "ram", "stream"], typer.Option(help="Keep bags in RAM as float16 (ram), or read them per step (stream).")
    ] = "auto",
    label_column: Annotated[str, typer.Option(help="Column of the label table holding the target.")] = "label",
    label_map: Annotated[
        Optional[str],
        typer.Option(
            help="Classes to 0/1, e.g. tumor=1,normal=0 (default: 0/1 as they are, or two classes in sorted order); with --n-classes C, to 0..C-1."
        ),
    ] = None,
    patient_column: Annotated[
        Optional[str], typer.Option(help="Column of the patient (default: patient_id, case_id or PATIENT, whichever is there).")
    ] = None,
    slide_table: Annotated[
        Optional[Path], typer.Option(help="STAMP's slide table (PATIENT, FILENAME) beside its clinical --manifest.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (auto: a CUDA GPU when one is visible).")] = "auto",
    precision: Annotated[
        Literal["auto", "fp32", "bf16"], typer.Option(help="auto: bf16 autocast on a GPU that has it, else fp32.")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of splits, initialisation and shuffling.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with the running loss and validation AUC.")] = True,
) -> None:
    """Train a MIL head on slide features; select epochs and thresholds on validation data only."""
    from mil.labels import parse_label_map, read_label_table
    from mil.train.loop import TrainConfig
    from mil.train.run import run_train

    config = TrainConfig(
        head=head,
        head_kwargs={"n_classes": n_classes} if n_classes != 2 else {},
        epochs=epochs,
        patience=patience,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        recipe=recipe,
        bag_weight=bag_weight,
        max_instance_weight=max_instance_weight,
        ranking_weight=ranking_weight,
        rank_k=rank_k,
        rank_margin=rank_margin,
        hard_negatives=hard_negatives,
        neg_ratio=neg_ratio,
        hnm_warmup=hnm_warmup,
        hnm_every=hnm_every,
        hnm_bank=hnm_bank,
        hnm_instance_weight=hnm_instance_weight,
        pos_ratio=pos_ratio,
        instance_loss=instance_loss,
        instance_weight=instance_weight,
        ece_schedule_epochs=ece_schedule_epochs,
        standardize=standardize,
    )
    table = read_label_table(
        manifest,
        label_column=label_column,
        label_map=parse_label_map(label_map),
        patient_column=patient_column,
        slide_table=slide_table,
        n_classes=n_classes,
    )
    if table.ignored:
        typer.echo(f"warning: {manifest}: ignoring column(s) {', '.join(map(repr, table.ignored))}", err=True)
    if table.label_map:
        typer.echo(f"labels: {', '.join(f'{k}={v}' for k, v in table.label_map.items())} (recorded in config.json)", err=True)
    with _EpochProgress(epochs, enabled=progress, mined=config.hard_negatives) as on_epoch:
        summary = run_train(
            feature_dir,
            table.slides,
            out,
            config,
            folds=folds,
            repeats=repeats,
            val_fraction=val_fraction,
            cache=cache,
            overwrite=overwrite,
            on_epoch=on_epoch,
            instance_labels=instance_labels,
            device=device,
            precision=precision,
            labels=table.describe(),
        )
    if summary.attrs.get("skipped"):
        typer.echo(f"{out}: already trained with these settings; nothing to do (pass --overwrite to train again)")
    typer.echo(summary.to_string(index=False, float_format="{:.3f}".format))
    typer.echo(f"run directory: {out}")


class _EpochProgress:
    """A rich progress bar per fold: epochs done, running train loss, validation AUC (on stderr)."""

    def __init__(self, epochs: int, enabled: bool, mined: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.epochs, self.tasks, self.done = epochs, {}, {}  # fold -> task id, fold -> last epoch
        stats = "loss {task.fields[loss]}  val AUC {task.fields[auc]}" + ("  hard negatives {task.fields[hard]}" if mined else "")
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(stats),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )

    def __enter__(self):
        self.progress.start()
        return self.update

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, fold: str, row: dict) -> None:
        if fold not in self.tasks:
            for f, t in self.tasks.items():  # earlier folds may have stopped early: show them as finished
                self.progress.update(t, total=self.done[f])
            self.tasks[fold] = self.progress.add_task(f"fold {fold}", total=self.epochs, loss="-", auc="-", hard=0)
        self.done[fold] = row["epoch"]
        self.progress.update(
            self.tasks[fold],
            completed=row["epoch"],
            loss=f"{row['train_loss']:.4f}",
            auc=f"{row['val_auc']:.3f}",
            hard=row["n_hard_negatives"],
        )


@app.command()
def bagnet(
    data: Annotated[
        Path, typer.Argument(help="Image-set folder (imageset.json, train.h5, val.h5) from `mil extract needles` or `mil extract crops`.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Run directory to create.")],
    rf: Annotated[int, typer.Option(help="Receptive field: 9, 33 or 177.")] = 33,
    pooling: Annotated[str, typer.Option(help="Pooling over positions: max, mean, logsumexp, attention, gated_attention.")] = "max",
    width: Annotated[float, typer.Option(help="Channel multiplier (embedding 2048·width).")] = 1.0,
    norm: Annotated[
        Literal["in_aff", "in", "bn"],
        typer.Option(help="Normalisation layers: in_aff (the paper's affine InstanceNorm), in, or bn (BatchNorm)."),
    ] = "in_aff",
    epochs: Annotated[int, typer.Option(help="Epochs (LR ×0.1 at 80, 120, 160 of 200, scaled).")] = 200,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    accumulate: Annotated[int, typer.Option(help="Forward passes per optimizer step (effective batch = batch size × accumulate).")] = 1,
    lr: Annotated[float, typer.Option(help="RMSprop learning rate.")] = 5e-5,
    max_train: Annotated[Optional[int], typer.Option(help="Train on a seeded balanced subset of N training images.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, subset, shuffling and dropout.")] = 0,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto.")] = "auto",
    workers: Annotated[
        int, typer.Option(help="DataLoader worker processes; 0 (unlike the slide readers' 2): the image set is in memory.")
    ] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an unfinished run with the same settings from its last.pt.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with the running loss and validation accuracy.")] = True,
) -> None:
    """Train a BagNet end to end on an image set; select the epoch on validation accuracy (test split unread)."""
    from mil.train.bagnet import BagNetTrainConfig, run_bagnet

    config = BagNetTrainConfig(
        rf=rf,
        pooling=pooling,
        width=width,
        norm=norm,
        epochs=epochs,
        batch_size=batch_size,
        accumulate=accumulate,
        lr=lr,
        max_train=max_train,
        seed=seed,
    )
    with _BagNetProgress(epochs, enabled=progress) as bar:
        summary = run_bagnet(
            data, out, config, device=device, workers=workers, overwrite=overwrite, resume=resume, on_epoch=bar.epoch, on_batch=bar.batch
        )
    if summary.attrs.get("skipped"):
        typer.echo(f"{out}: already trained with these settings; nothing to do (pass --overwrite to train again)")
    typer.echo(summary.to_string(index=False, float_format="{:.3f}".format))
    typer.echo(f"training throughput: {summary['train_images_per_s'][0]:.1f} images/s (mean over epochs)")
    typer.echo(f"run directory: {out}")


class _BagNetProgress:
    """One rich progress bar over epochs: running train loss, last validation accuracy, images/s (on stderr)."""

    def __init__(self, epochs: int, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        stats = "loss {task.fields[loss]}  val acc {task.fields[acc]}  {task.fields[speed]} img/s"
        self.progress = Progress(
            TextColumn("epoch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(stats),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.task = self.progress.add_task("epochs", total=epochs, loss="-", acc="-", speed="-")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def batch(self, epoch: int, done: int, total: int, loss: float) -> None:
        self.progress.update(self.task, completed=epoch - 1 + done / total, loss=f"{loss:.4f}")

    def epoch(self, row: dict) -> None:
        self.progress.update(
            self.task,
            completed=row["epoch"],
            loss=f"{row['train_loss']:.4f}",
            acc=f"{row['val_acc']:.3f}",
            speed=f"{row['train_images_per_s']:.1f}",
        )
