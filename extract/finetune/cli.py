"""`mil extract finetune`: the Typer command (thin; the work is in `mil.extract.finetune`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from mil.extract.options import Input, Manifest, Progress_, SlidesRoot, load_slides


def finetune(
    out: Annotated[Path, typer.Option("--out", help="Output folder (one round: encoder.pt …; with --train-config: round_<r>/ …).")],
    run: Annotated[
        list[Path],
        typer.Option(
            metavar="RUN", help="A finished one-fold `mil train features` run on the round-0 features; repeat it for earlier rounds' runs."
        ),
    ],
    input_path: Input = None,
    manifest: Manifest = None,
    encoder: Annotated[str, typer.Option(help="The encoder of the run's features (resnet18, resnet50_trunc, …).")] = "resnet50_trunc",
    weights: Annotated[str, typer.Option(help="Starting weights: 'imagenet', a local file (a MoCo encoder.pt …) or 'none'.")] = "imagenet",
    train_config: Annotated[
        Optional[Path],
        typer.Option(
            help="YAML with a 'train:' section of `mil train features` options: run every round (fine-tune, re-extract, retrain)."
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Rounds of the loop (the epochs of all rounds form one schedule).")] = 2,
    round_: Annotated[int, typer.Option("--round", help="Without --train-config: which round of --rounds this fine-tuning is.")] = 1,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs per round (the seed: 100 in all, a MIL round every 5).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Tiles per SupCon step (the seed: 512).")] = 64,
    lr: Annotated[float, typer.Option(help="SGD learning rate (no momentum, weight decay 1e-4, cosine from 10 % of the epochs).")] = 0.01,
    temperature: Annotated[float, typer.Option(help="SupCon temperature τ.")] = 0.07,
    negatives: Annotated[
        Literal["hard", "random"], typer.Option(help="hard: top --neg-ratio of negative-slide tiles by score; random: as many at random.")
    ] = "hard",
    neg_ratio: Annotated[float, typer.Option(help="Fraction of the negative slides' tiles used as negatives.")] = 0.2,
    steps_per_epoch: Annotated[
        Optional[int], typer.Option(help="At most this many negative steps per epoch; default: a pass over the negatives.")
    ] = None,
    warmup: Annotated[Optional[int], typer.Option(help="Epochs (over all rounds) before the positive step; default 5 % of them.")] = None,
    batchnorm: Annotated[
        Literal["frozen", "train"],
        typer.Option(
            help="frozen: BatchNorm layers keep the statistics the features were extracted with; train: updated by the fine-tuning batches."
        ),
    ] = "frozen",
    seed: Annotated[int, typer.Option(help="Seed of the projection head, the batches and the augmentations.")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes reading tiles.")] = 2,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    precision: Annotated[Literal["auto", "fp32", "bf16"], typer.Option(help="auto: bf16 autocast where the hardware has it.")] = "auto",
    slides_root: SlidesRoot = None,
    progress: Progress_ = True,
) -> None:
    """Fine-tune the tile encoder on a run's pseudo-labelled training tiles with mined hard negatives (HNM-WSI).

    The fine-tuning never reads a validation or test slide. With --train-config, run the whole loop:
    fine-tune, re-extract every slide (features for evaluation), retrain, --rounds times (resumable).
    """
    from mil.device import resolve_device
    from mil.extract.finetune.pseudo import pick_source, read_run, score_training_tiles
    from mil.extract.finetune.train import FinetuneConfig, run_finetune
    from mil.extract.wsi.encoders import resolve_precision

    dev = str(resolve_device(device))
    precision = resolve_precision(precision, dev)
    config = FinetuneConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        temperature=temperature,
        neg_ratio=neg_ratio,
        negatives=negatives,
        warmup=warmup,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        batchnorm=batchnorm,
        round=round_,
        rounds=rounds,
    )
    slides = load_slides(input_path, slides_root, manifest)
    if train_config is not None:
        from mil.extract.finetune.rounds import run_rounds

        labels = Path(manifest or input_path)
        if labels.is_dir():
            raise typer.BadParameter(f"expected a manifest CSV with labels to retrain on, got the folder {labels}.", param_hint="MANIFEST")
        if len(run) != 1:
            raise typer.BadParameter("expected one --run (round 0's) with --train-config, got several.", param_hint="--run")
        table = run_rounds(
            slides,
            Path(manifest or input_path),
            run[0],
            out,
            encoder,
            weights,
            config,
            train_config,
            device=dev,
            precision=precision,
            workers=workers,
            progress=progress,
        )
        for r in table.itertuples():
            typer.echo(
                f"round {r.round}: pseudo-labels from {r.source_run} (val AUC {r.source_val_auc:.3f}) → {r.run} (val AUC {r.val_auc:.3f})"
            )
        typer.echo(f"wrote {out / 'rounds.csv'}")
        return
    source = pick_source([read_run(r) for r in run])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = run_finetune(
            slides,
            source,
            score_training_tiles(source),
            out,
            encoder,
            weights,
            config,
            device=dev,
            precision=precision,
            workers=workers,
            progress=progress,
        )
    typer.echo(f"wrote {path}; use it with `mil extract features --encoder {encoder} --weights {path}`")
