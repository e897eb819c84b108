"""One round of the HNM-WSI encoder fine-tuning: SupCon on pseudo-labelled tiles with mined negatives.

The seed's loop (winston52/HNM-WSI ``train/trainer.py``, an ItS2CLR fork; methods.md §1.1, §1.4)
fine-tunes the tile encoder with two SupCon steps per iteration over the mined negatives:

* **(a) negative step** (``pair_mode`` neg-neg, uncertain tiles masked): ``(1 - posi_batch_ratio)·B``
  mined negatives, pseudo-label 0, plus ``posi_batch_ratio·B`` tiles of positive slides with
  p > θ, label 1, which only sit in the denominators: negatives are pulled together, away from
  tumour-like tiles.
* **(b) positive step**, after the warm-up (``pair_mode`` pos-pos): ``posi_query_ratio·B``
  self-paced positives (the top r(t) of the confident tiles, r growing from ``ro`` to ``rT``)
  plus negatives (the mined ones and, after the first pseudo-label update, the lowest r_neg(t)
  of the positive slides' p ≤ θ tiles).

Each step is its own SGD step (lr 0.01, no momentum, weight decay 1e-4, cosine annealing that
starts at 10 % of the epochs). Tiles are read from the slides as in `mil extract moco` (the same
`MocoTiles` reader) and get the same batched H&E augmentations (`Augment`); the backbone is the
feature stage's encoder, with the seed's projection head ``Linear(F, F)-ReLU-Linear(F, 256)``.

BatchNorm is frozen by default (``--batchnorm frozen``: its layers normalise with the running
statistics the features were extracted with, and keep them): the seed's ResNet-18 uses
InstanceNorm, whose training and extraction behaviour are the same; BatchNorm statistics updated by
a few fine-tuning batches of augmented tiles would change every feature whether or not the
weights learned anything (docs/finetune.md, "Study").

The epochs of all rounds form one schedule, as the seed's encoder trains continuously across
MIL rounds: round r (1-based) of R runs global epochs ``(r-1)·E … r·E - 1``.

Output folder::

    encoder.pt      backbone state dict: `--weights` of `mil extract features --encoder NAME`
    checkpoint.pt   {"epoch", "state_dict" (backbone + projection), "optimizer", "settings"} each epoch
    metrics.csv     epoch, loss_neg, loss_pos, lr, positive_ratio, tiles_per_s, seconds
    pseudo_labels.csv  slide_id, tile_index, x, y, bag_label, prob, pool of every training tile
    config.json     settings (compared on reruns), the source run and the pool sizes

``encoder.pt`` is written last: a killed round resumes from ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import mil
from mil.atomic import atomic_path, remove_stale_temporaries, write_csv
from mil.errors import MilError, OptionError
from mil.extract.finetune.pseudo import (
    RunInfo,
    make_pools,
    read_encoder_config,
    self_paced_positives,
    self_paced_ratio,
    uncertain_negatives,
)
from mil.extract.finetune.supcon import SupConLoss
from mil.rundir import read_settings, refuse_other_settings
from mil.selection import PSEUDO_LABEL_THRESHOLD, check_ratio


@dataclass(frozen=True)
class FinetuneConfig:
    """Every option that decides a round's result (compared on reruns). Defaults: the seed's
    (methods.md §1.7), but for the batch (seed 512) and epochs (seed 100 in all) sized for a CPU."""

    epochs: int = 5  # per round
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 1e-4
    temperature: float = 0.07
    neg_ratio: float = 0.2
    negatives: str = "hard"  # or "random" (the seed's ablation)
    posi_batch_ratio: float = 0.2
    posi_query_ratio: float = 0.05
    ro: float = 0.2
    rT: float = 0.8
    ro_neg: float = 0.2
    warmup: int | None = None  # global epochs before the positive step; None: 5 % of all (the seed's 5 of 100)
    steps_per_epoch: int | None = None  # None: one pass over the mined negatives
    proj_dim: int = 256
    batchnorm: str = "frozen"  # or "train": BatchNorm statistics updated by the fine-tuning batches
    seed: int = 0
    round: int = 1
    rounds: int = 1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "proj_dim", "round", "rounds"):
            if getattr(self, name) < 1:
                raise OptionError(f"expected --{name.replace('_', '-')} >= 1, got {getattr(self, name)!r} instead.")
        if self.round > self.rounds:
            raise OptionError(f"expected --round <= --rounds ({self.rounds}), got {self.round} instead.")
        for name in ("neg_ratio", "posi_batch_ratio", "posi_query_ratio", "ro", "rT", "ro_neg"):
            check_ratio(getattr(self, name), f"--{name.replace('_', '-')}")
        if self.batchnorm not in ("frozen", "train"):
            raise OptionError(f"expected --batchnorm frozen or train, got {self.batchnorm!r} instead.")
        if self.negatives not in ("hard", "random"):
            raise OptionError(f"expected --negatives hard or random, got {self.negatives!r} instead.")
        if not (self.lr > 0 and self.temperature > 0 and self.weight_decay >= 0):
            raise OptionError(f"expected --lr > 0 and --temperature > 0, got {self.lr!r} and {self.temperature!r} instead.")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise OptionError(f"expected --steps-per-epoch >= 1 (or unset), got {self.steps_per_epoch!r} instead.")

    @property
    def total_epochs(self) -> int:
        return self.epochs * self.rounds

    @property
    def warmup_epochs(self) -> int:
        return self.warmup if self.warmup is not None else max(1, round(0.05 * self.total_epochs))

    def lr_at(self, t: int) -> float:
        """The seed's schedule: cosine annealing with T_max = all epochs, stepped after each epoch from 10 % of them on
        (epoch t trains at count ``max(0, t - start)``; the last epoch's rate stays above 0)."""
        start = round(0.1 * self.total_epochs)
        return self.lr * 0.5 * (1 + math.cos(math.pi * max(0, t - start) / self.total_epochs))


class Projected(nn.Module):
    """Backbone → the seed's projection MLP → L2-normalised ``(B, proj_dim)``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)  # (B, 3, S, S) -> (B, proj_dim)


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def plan_epoch(config: FinetuneConfig, t: int, table: pd.DataFrame, pools, uncertain: bool) -> list[tuple[str, np.ndarray]]:
    """The steps of global epoch `t`: ``[("neg" | "pos", rows (B,)), …]``, seeded by (seed, t)."""
    rng = np.random.default_rng([config.seed, t])
    B = config.batch_size
    n_neg, n_tum = B - int(B * config.posi_batch_ratio), int(B * config.posi_batch_ratio)
    n_q = max(1, int(B * config.posi_query_ratio))
    extra = uncertain_negatives(table, self_paced_ratio(t, config.total_epochs, config.warmup_epochs, config.ro_neg, config.rT))
    negatives = np.concatenate([pools.negatives, extra]) if uncertain else pools.negatives  # (M,)
    positives = self_paced_positives(table, self_paced_ratio(t, config.total_epochs, config.warmup_epochs, config.ro, config.rT))
    order = rng.permutation(negatives)
    steps = max(1, len(order) // n_neg)
    if config.steps_per_epoch is not None:
        steps = min(steps, config.steps_per_epoch)
    plan = []
    for i in range(steps):
        chunk = order[(i * n_neg) % len(order) :][:n_neg]
        tum = rng.choice(pools.tumour, size=n_tum, replace=len(pools.tumour) < n_tum) if len(pools.tumour) and n_tum else []
        plan.append(("neg", np.concatenate([chunk, tum]).astype(np.int64)))
        if t >= config.warmup_epochs and len(positives):
            q = rng.choice(positives, size=n_q, replace=len(positives) < n_q)
            rest = rng.choice(negatives, size=B - n_q, replace=len(negatives) < B - n_q)
            plan.append(("pos", np.concatenate([q, rest]).astype(np.int64)))
    return plan


def run_finetune(
    slides: pd.DataFrame,
    source: RunInfo,
    table: pd.DataFrame,
    out_dir: str | Path,
    encoder_name: str,
    weights: str,
    config: FinetuneConfig,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Fine-tune `encoder_name` (from `weights`) on the pseudo-labelled training tiles of `table`.

    Args:
        slides: the validated manifest table (slide paths).
        source: the run the pseudo-labels come from (`pseudo.pick_source`).
        table: its training tiles' scores (`pseudo.score_training_tiles`).
        out_dir: the round's folder (module docstring); a finished one with the same settings is kept.
        weights: the round's starting weights (the previous round's ``encoder.pt``, or the original).

    Returns:
        The path of ``encoder.pt``.
    """
    from torch.utils.data import DataLoader

    from mil.extract.moco.augment import Augment
    from mil.extract.moco.data import collate_tiles
    from mil.extract.moco.train import _progress
    from mil.extract.wsi.encoders import create_encoder

    out = Path(out_dir)
    prep = read_encoder_config(source)  # the views are preprocessed as the features' tiles
    with warnings.catch_warnings():  # random weights are a test's choice
        warnings.simplefilter("ignore")
        enc = create_encoder(
            encoder_name,
            weights=weights,
            precision="fp32",
            device="cpu",
            input_size=prep["input_size"],
            mean=tuple(prep["mean"]),
            std=tuple(prep["std"]),
            seed=prep["seed"],
        )
    pools = make_pools(table, config.neg_ratio, config.negatives, config.seed)
    settings = json.loads(
        json.dumps(
            asdict(config)
            | {
                "encoder": encoder_name,
                "weights_sha256": enc.weights_sha256,
                "source_run": str(source.path),
                "source_fold": source.fold,
                "train_slides": list(source.train_ids),
                "augmentation": Augment().as_dict(),
                "input_size": enc.input_size,
            }
        )
    )
    ckpt_path = out / "checkpoint.pt"
    if (out / "config.json").exists():
        refuse_other_settings(
            out, read_settings(out / "config.json", "`mil extract finetune`", key="settings"), settings, what="fine-tuning round"
        )
        if (out / "encoder.pt").exists():
            return out / "encoder.pt"
    if len(pools.negatives) == 0:
        raise MilError(f"{source.path}: expected negative training slides with tiles to mine, got none.")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    pool = np.full(len(table), "", dtype=object)
    pool[pools.tumour], pool[pools.negatives] = "tumour", f"{config.negatives}_negative"
    write_csv(out / "pseudo_labels.csv", table.assign(pool=pool))
    doc = {
        "stage": "finetune",
        "mil_version": mil.__version__,
        "settings": settings,
        "runtime": {"device": device, "precision": precision, "workers": workers},
        "preprocessing": {"mean": list(enc.mean), "std": list(enc.std), "input_size": enc.input_size},
        "pools": {"negatives": len(pools.negatives), "tumour": len(pools.tumour), "hard_threshold": pools.threshold},
    }
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")

    model = Projected(enc.model.train().to(memory_format=torch.contiguous_format), enc.feature_dim, config.proj_dim)
    if config.batchnorm == "frozen":  # normalise as at extraction: the running statistics stay (the seed has no BN)
        for m in model.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    torch.manual_seed(_seed(config.seed, 1))  # the projection head
    for m in model.head:
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    first = (config.round - 1) * config.epochs
    done, history = first, []
    if ckpt_path.exists():  # a killed round: continue after its last finished epoch
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        done = int(ckpt["epoch"])
        if (out / "metrics.csv").exists():
            history = [r for r in pd.read_csv(out / "metrics.csv").to_dict("records") if r["epoch"] <= done]
    model.to(device)

    dataset, offsets = _tiles(slides, source, table)
    labels = torch.from_numpy(
        ((table["bag_label"].to_numpy() == 1) & (table["prob"].to_numpy() > PSEUDO_LABEL_THRESHOLD)).astype(np.int64)
    )  # (M,) pseudo-labels
    bags = torch.from_numpy(table["bag_label"].to_numpy().astype(np.int64))  # (M,)
    augment = Augment()
    mean = torch.tensor(enc.mean, device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    std = torch.tensor(enc.std, device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    losses = {
        "neg": SupConLoss(config.temperature, pair_mode="neg-neg", mask_uncertain_neg=True),
        "pos": SupConLoss(config.temperature, pair_mode="pos-pos"),
    }
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    uncertain = config.round > 1  # after the first pseudo-label update

    def views(tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.to(device).permute(0, 3, 1, 2).float() / 255  # (n, 3, T, T)
        out_views = []
        for _ in range(2):
            v = augment(x)  # (n, 3, T, T)
            if v.shape[-1] != enc.input_size:
                v = F.interpolate(v, size=(enc.input_size, enc.input_size), mode="bilinear", antialias=True, align_corners=False)
            out_views.append((v - mean) / std)
        return torch.cat(out_views)  # (2n, 3, S, S) view-major

    last = first + config.epochs
    with _progress(progress) as bar:
        task = bar.add_task("finetune", total=None, loss=float("nan"), rate=0.0)
        for t in range(done, last):
            torch.manual_seed(_seed(config.seed, t, 2))  # augmentations: the same on a resumed round
            plan = plan_epoch(config, t, table, pools, uncertain)
            bar.update(task, description=f"round {config.round} epoch {t - first + 1}/{config.epochs}", total=len(plan), completed=0)
            loader = DataLoader(
                dataset,
                batch_sampler=[offsets[rows].tolist() for _, rows in plan],
                num_workers=workers,
                collate_fn=collate_tiles,
                prefetch_factor=4 if workers else None,
            )
            lr = config.lr_at(t)
            for g in opt.param_groups:
                g["lr"] = lr
            sums = {"neg": [0.0, 0], "pos": [0.0, 0]}
            t0, n_tiles = time.perf_counter(), 0
            for (kind, rows), tiles in zip(plan, loader):  # (n, T, T, 3) uint8
                idx = torch.from_numpy(rows)
                with autocast:
                    z = model(views(tiles)).float()  # (2n, d)
                z = torch.stack(z.chunk(2), dim=1)  # (n, 2, d)
                loss = losses[kind](z, labels[idx].to(device), bags[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums[kind][0] += loss.item()
                sums[kind][1] += 1
                n_tiles += len(rows)
                bar.update(task, advance=1, loss=float(loss), rate=n_tiles / (time.perf_counter() - t0))
            seconds = time.perf_counter() - t0
            history.append(
                {
                    "epoch": t + 1,
                    "loss_neg": sums["neg"][0] / max(sums["neg"][1], 1),
                    "loss_pos": sums["pos"][0] / sums["pos"][1] if sums["pos"][1] else float("nan"),
                    "lr": lr,
                    "positive_ratio": self_paced_ratio(t, config.total_epochs, config.warmup_epochs, config.ro, config.rT),
                    "tiles_per_s": n_tiles / seconds,
                    "seconds": seconds,
                }
            )
            write_csv(out / "metrics.csv", pd.DataFrame(history))
            with atomic_path(ckpt_path) as tmp:
                torch.save({"epoch": t + 1, "state_dict": model.state_dict(), "optimizer": opt.state_dict(), "settings": settings}, tmp)
    with atomic_path(out / "encoder.pt") as tmp:  # last: marks the round finished
        torch.save({k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}, tmp)
    return out / "encoder.pt"


def _tiles(slides: pd.DataFrame, source: RunInfo, table: pd.DataFrame):
    """The score table's tiles as one `MocoTiles` read from the slides, and each table row's index in it."""
    from mil.extract.moco.data import MocoTiles
    from mil.extract.wsi.reader import TileDataset

    geometry = _tile_geometry(source)
    paths = dict(zip(slides["slide_id"].astype(str), slides["path"]))
    sources, offsets, start = [], np.zeros(len(table), dtype=np.int64), 0  # offsets: table row -> dataset index
    for sid, rows in table.groupby("slide_id", sort=False).indices.items():
        if sid not in paths:
            raise OptionError(f"expected the manifest to list the training slide {sid} of {source.path}, got no row for it.")
        sources.append(TileDataset(paths[sid], table[["x", "y"]].to_numpy()[rows], *geometry[sid]))
        offsets[rows] = start + np.arange(len(rows))
        start += len(rows)
    return MocoTiles(sources), offsets


def _tile_geometry(source: RunInfo) -> dict[str, tuple[int, int, float]]:
    """``{slide_id: (level-0 tile side, tile side, level-0 mpp)}`` of the training slides, from their
    feature files' coords attrs (fine-tuning reads the same tiles again from the slides)."""
    from mil.features import read_bag_attrs

    out = {}
    for sid, path in source.files.items():
        attrs = read_bag_attrs(path)
        try:
            out[sid] = (int(attrs["patch_size_level0"]), int(attrs["patch_size"]), float(attrs["level0_mpp"]))
        except KeyError as e:
            raise MilError(
                f"{path}: expected the tile geometry that `mil extract features` stores (coords attrs), got no {e.args[0]!r}; "
                "fine-tuning reads the tiles again from the slides."
            ) from None
    return out
