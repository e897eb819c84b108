"""`mil extract moco`: MoCo v2 self-supervised pretraining of a tile encoder.

The method is `mil.extract.moco.builder.MoCo`; this module is the training script around it
(`run_moco`): tiles straight from the slides (`mil.extract.moco.data`, views made by
`mil.extract.moco.augment`), SGD with a cosine schedule, one process or several with
DDP (``torchrun``), a checkpoint every epoch, resume, and the exported backbone.

Output folder, ``ENCODER_DIR``::

    encoder.pt      backbone state dict only (no projection head): `--weights` of `mil extract features`
    checkpoint.pt   {"epoch", "arch", "state_dict": {"module.encoder_q.…", "module.encoder_k.…",
                     "module.queue", "module.queue_ptr"}, "optimizer", "settings", "mil_version"}
                    (facebookresearch/moco's layout; `--weights` loads it too)
    metrics.csv     epoch, loss, pretext_acc, lr, images_per_s, seconds
    config.json     every resolved option ("settings" decide reruns, among them the manifest
                    splits trained on; "runtime" does not) and the slide ids used
    tiles/          coords of every slide from the tiles stage (unless --coords-dir)

``encoder.pt`` is written last: it exists only when every epoch has run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mil
from mil.atomic import atomic_path, remove_stale_temporaries
from mil.errors import MilError, OptionError
from mil.extract.moco.builder import MoCo
from mil.extract.wsi.tiles import TilingConfig
from mil.manifest import SPLITS
from mil.rundir import read_settings, refuse_other_settings


@dataclass(frozen=True)
class MocoConfig:
    """Every option that decides the result of a MoCo run (compared on reruns).

    ``batch_size`` is the global batch (all processes together); ``lr`` is used as given
    (MoCo's 0.03 is for batch 256). ``bn_splits=0`` means: 1 with several processes, else
    ``min(8, batch // 32)`` (32 tiles per BatchNorm group, as on each of MoCo's 8 GPUs).
    """

    arch: str = "resnet50"
    epochs: int = 200
    batch_size: int = 256
    queue: int = 65536
    momentum: float = 0.999  # of the key encoder
    temperature: float = 0.2
    lr: float = 0.03
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9
    dim: int = 128
    tiles_per_slide: int | None = None  # None: every tile of every slide
    steps_per_epoch: int | None = None  # None: one pass over the sampled tiles
    bn_splits: int = 0  # 0: auto
    seed: int = 0
    tiling: TilingConfig = field(default_factory=TilingConfig)
    splits: tuple[str, ...] | str | None = None  # manifest splits trained on ("train,val" too); None: every split but test

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "queue", "dim"):
            if getattr(self, name) < 1:
                raise OptionError(f"expected --{name.replace('_', '-')} >= 1, got {getattr(self, name)!r} instead.")
        for name in ("tiles_per_slide", "steps_per_epoch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise OptionError(f"expected --{name.replace('_', '-')} >= 1 (or unset), got {getattr(self, name)!r} instead.")
        if self.queue < self.batch_size:
            raise OptionError(f"expected --queue >= --batch-size ({self.batch_size}), got {self.queue!r} instead.")
        if not (0 <= self.momentum < 1):
            raise OptionError(f"expected --momentum in [0, 1) (MoCo: 0.999), got {self.momentum!r} instead.")
        if not (self.temperature > 0):
            raise OptionError(f"expected --temperature > 0 (MoCo v2: 0.2), got {self.temperature!r} instead.")
        if not (self.lr > 0) or self.weight_decay < 0 or not (0 <= self.sgd_momentum < 1):
            raise OptionError(
                f"expected --lr > 0, weight decay >= 0 and SGD momentum in [0, 1), got {self.lr!r}, "
                f"{self.weight_decay!r}, {self.sgd_momentum!r} instead."
            )
        if self.bn_splits < 0:
            raise OptionError(f"expected --bn-splits >= 1 (or 0 for auto), got {self.bn_splits!r} instead.")
        if self.splits is not None:  # "train,val" or ("train", "val") → ("train", "val")
            given = [s.strip() for s in (self.splits.split(",") if isinstance(self.splits, str) else self.splits)]
            if not given or any(s not in SPLITS for s in given):
                raise OptionError(
                    f"expected --splits to be a comma-separated list of {', '.join(SPLITS)}, got {','.join(given)!r} instead."
                )
            object.__setattr__(self, "splits", tuple(s for s in SPLITS if s in given))  # canonical order, no repeats

    def settings(self, slide_ids) -> dict:
        """JSON-ready settings of a run on these slides (as they read back from config.json)."""
        from mil.extract.moco.augment import Augment

        d = asdict(self) | {
            "tiling": self.tiling.as_dict(),
            "augmentation": Augment().as_dict(),
            "splits": list(self.splits) if self.splits is not None else "all but test",
            "slides_sha256": hashlib.sha256("\n".join(map(str, slide_ids)).encode()).hexdigest(),
        }
        return json.loads(json.dumps(d))

    def resolve_bn_splits(self, world: int) -> int:
        """The number of BatchNorm groups per process; refuses groups of fewer than 2 tiles."""
        local = self.batch_size // world
        splits = self.bn_splits or (1 if world > 1 else min(8, max(1, local // 32)))
        if local < 2 * splits:
            raise OptionError(
                f"expected --bn-splits <= {local // 2} (at least 2 tiles per BatchNorm group of a {local}-tile batch "
                f"per process), got {splits} instead."
            )
        return splits


@dataclass
class MocoResult:
    """What `run_moco` did: status 'trained' | 'resumed' | 'skipped', and the trained model."""

    status: str
    epochs_run: int
    metrics: pd.DataFrame
    model: MoCo | None = None
    encoder_path: Path | None = None


def build_moco(config: MocoConfig, bn_splits: int = 1) -> tuple[MoCo, dict]:
    """A seeded `MoCo` around ``config.arch`` and the backbone's preprocessing (mean, std).

    The backbone comes from the encoder registry (`create_encoder(arch, weights="none")`), the same
    code that loads the result in `mil extract features`, so names, layers and normalisation agree.
    """
    from mil.extract.wsi.encoders import create_encoder

    with warnings.catch_warnings():  # "random weights": expected, they are trained here
        warnings.simplefilter("ignore")
        enc = create_encoder(config.arch, weights="none", precision="fp32", device="cpu", seed=config.seed)
    backbone = enc.model.train().to(memory_format=torch.contiguous_format)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)  # head and queue
        model = MoCo(backbone, dim=config.dim, K=config.queue, m=config.momentum, T=config.temperature, bn_splits=bn_splits)
    return model, {"mean": list(enc.mean), "std": list(enc.std), "feature_dim": enc.feature_dim}


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """MoCo v2's cosine schedule, per step: base_lr · ½(1 + cos(π · step / total))."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _init_distributed(device: torch.device) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, this process's device, whether we created the process group).

    Uses a process group that already exists, or creates one from torchrun's environment
    (WORLD_SIZE > 1): NCCL on GPUs (one per process, cuda:LOCAL_RANK), gloo on CPUs.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        created = False
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        created = True
    else:
        return 0, 1, device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
        torch.cuda.set_device(device)
    return rank, world, device, created


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _plan(out: Path, settings: dict, epochs: int, resume: bool, overwrite: bool) -> tuple[str, int]:
    """('fresh' | 'resume' | 'done', epochs already done) for ``out``; refuses other settings.

    Raises:
        SettingsMismatchError: ``out`` holds a run with other settings (without ``overwrite``).
        OptionError: ``out`` holds an unfinished run and neither ``resume`` nor ``overwrite`` is set.
    """
    cfg, ckpt = out / "config.json", out / "checkpoint.pt"
    if overwrite or not cfg.exists():
        return "fresh", 0
    refuse_other_settings(out, read_settings(cfg, "`mil extract moco`", key="settings"), settings, what="MoCo run", redo="start again")
    done = int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"]) if ckpt.exists() else 0
    if done >= epochs and (out / "encoder.pt").exists():
        return "done", done
    if done > 0 and not resume:
        raise OptionError(
            f"expected --resume (continue) or --overwrite (start again) for {out}, which holds an unfinished run "
            f"({done} of {epochs} epochs), got neither."
        )
    return ("resume" if done > 0 else "fresh"), done


def run_moco(
    slides: pd.DataFrame,
    out_dir: str | Path,
    config: MocoConfig,
    *,
    coords_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    workers: int = 2,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> MocoResult:
    """Pretrain ``config.arch`` with MoCo v2 on tiles of `slides`; write ENCODER_DIR (module docstring).

    One process, or one of several started by ``torchrun`` (or with a process group already
    initialised): each process trains on its share of every global batch, DDP averages the
    gradients, keys are shuffled across processes for BatchNorm and gathered into the queue.
    Only rank 0 writes files and shows progress.

    Args:
        slides: a validated slide table (`read_manifest` or `slides_from_folder`); only the rows of
            ``config.splits`` are used (default: every split but test; see `mil.extract.moco.data.select_splits`).
        out_dir: ENCODER_DIR.
        coords_dir: the tiles stage's output to reuse (default ``out_dir/tiles``); slides without
            coords there are tiled with ``config.tiling`` first.
        device: 'cpu', 'cuda' or 'cuda:N' (several processes: each takes cuda:LOCAL_RANK).
        precision: 'auto', 'fp32' or 'bf16' autocast ('auto': bf16 where the device has it natively).
        workers: DataLoader worker processes reading tiles (per process).
        resume: continue an unfinished run from ``checkpoint.pt``.
        overwrite: discard what ``out_dir`` holds and start again.

    Raises:
        SettingsMismatchError, OptionError: before any work (see `_plan`, `MocoConfig`).
        MilError: no slide gave tiles, or fewer tiles than one batch.
    """
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from mil.extract.moco.augment import Augment
    from mil.extract.moco.data import MocoTiles, collate_tiles, plan_tiling, sample_tiles, select_splits, tile_missing
    from mil.extract.wsi.encoders import resolve_precision

    if precision not in ("auto", "fp32", "bf16"):
        raise OptionError(f"expected --precision auto, fp32 or bf16, got {precision!r} instead.")
    if workers < 0:
        raise OptionError(f"expected --workers >= 0, got {workers!r} instead.")
    slides = select_splits(slides, config.splits)  # never the test split unless asked for
    rank, world, device, created = _init_distributed(torch.device(device))
    try:
        if config.batch_size % world:
            raise OptionError(f"expected --batch-size divisible by the {world} processes, got {config.batch_size} instead.")
        bn_splits = config.resolve_bn_splits(world)
        precision = resolve_precision(precision, device)
        out = Path(out_dir)
        coords_dir = Path(coords_dir) if coords_dir is not None else out / "tiles"
        slides = slides.sort_values("slide_id", kind="stable").reset_index(drop=True)  # the manifest's row order does not matter
        settings = config.settings(slides["slide_id"])
        state, done = _plan(out, settings, config.epochs, resume, overwrite)
        if state == "done":
            return MocoResult("skipped", 0, pd.read_csv(out / "metrics.csv"), None, out / "encoder.pt")
        model, prep = build_moco(config, bn_splits)  # unknown --arch fails here, before any file is written

        # Coords: every process checks (same errors everywhere), rank 0 tiles what is missing, then
        # every process draws the same seeded sample.
        todo = plan_tiling(slides, coords_dir, config.tiling, overwrite)
        failures: dict[str, str] = {}
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out)
            if overwrite:
                for name in ("encoder.pt", "checkpoint.pt", "metrics.csv", "config.json"):
                    (out / name).unlink(missing_ok=True)
            coords_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(coords_dir)
            failures = tile_missing(slides, todo, coords_dir, config.tiling, progress)
        _barrier(world)
        sources = sample_tiles(slides, coords_dir, config.tiles_per_slide, config.seed)
        dataset = MocoTiles(sources)
        if len(dataset) < config.batch_size:
            raise MilError(
                f"expected at least --batch-size={config.batch_size} tiles, got {len(dataset)} from {len(slides)} slides; "
                "lower --batch-size, or add slides / tiles (--tiles-per-slide, --tissue-threshold)."
            )
        if config.queue > len(dataset) and rank == 0:
            warnings.warn(
                f"--queue {config.queue} is larger than the {len(dataset)} tiles: a tile's own older keys "
                "will be among its negatives; a queue smaller than the number of tiles is advised.",
                stacklevel=2,
            )

        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]  # the query encoder and its head
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.sgd_momentum, weight_decay=config.weight_decay)
        history: list[dict] = []
        if state == "resume":
            ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
            model.load_state_dict({k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()})
            optimizer.load_state_dict(ckpt["optimizer"])
            if (out / "metrics.csv").exists():
                history = [r for r in pd.read_csv(out / "metrics.csv").to_dict("records") if r["epoch"] <= done]
        runtime = {
            "device": str(device),
            "world_size": world,
            "precision": precision,
            "workers": workers,
            "bn_splits": bn_splits,
            "per_process_batch": config.batch_size // world,
        }
        if rank == 0:
            doc = {
                "stage": "moco",
                "mil_version": mil.__version__,
                "settings": settings,
                "runtime": runtime,
                "preprocessing": prep,
                "coords_dir": str(coords_dir),
                "n_slides": len(slides),
                "slide_ids": slides["slide_id"].astype(str).tolist(),
                "n_tiles": len(dataset),
                "failed_slides": failures,
            }
            with atomic_path(out / "config.json") as tmp:
                tmp.write_text(json.dumps(doc, indent=2) + "\n")

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
        augment = Augment()
        mean = torch.tensor(prep["mean"], device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        std = torch.tensor(prep["std"], device=device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed, drop_last=True)
        local_batch = config.batch_size // world
        steps = min(len(sampler) // local_batch, config.steps_per_epoch or len(sampler))  # per epoch
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        with _progress(progress and rank == 0) as bar:
            task = bar.add_task("moco", total=steps * (config.epochs - done), loss=float("nan"), rate=0.0)
            for epoch in range(done, config.epochs):
                torch.manual_seed(_seed(config.seed, epoch, rank))  # augmentations, key shuffles: the same on a resumed run
                sampler.set_epoch(epoch)
                loader = DataLoader(
                    dataset,
                    batch_size=local_batch,
                    sampler=sampler,
                    num_workers=workers,
                    drop_last=True,
                    collate_fn=collate_tiles,
                    pin_memory=device.type == "cuda",
                    generator=torch.Generator().manual_seed(_seed(config.seed, epoch)),
                    prefetch_factor=4 if workers else None,
                )
                bar.update(task, description=f"epoch {epoch + 1}/{config.epochs}")
                sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss · n, correct, n
                t0 = time.perf_counter()
                for i, tiles in enumerate(loader):  # (n, T, T, 3) uint8, read in the workers
                    if i >= steps:
                        break
                    lr = cosine_lr(config.lr, epoch * steps + i, config.epochs * steps)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    x = tiles.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255  # (n, 3, T, T) in [0, 1]
                    im_q = (augment(x) - mean) / std  # (n, 3, T, T) first view, normalised
                    im_k = (augment(x) - mean) / std  # (n, 3, T, T) second view
                    with autocast:
                        logits, labels = net(im_q, im_k)  # (n, 1 + K), (n,)
                    loss = F.cross_entropy(logits.float(), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    n = labels.shape[0]
                    sums[0] += loss.detach().double() * n
                    sums[1] += (logits.detach().argmax(1) == 0).sum()  # pretext task: the positive ranks first
                    sums[2] += n
                    rate = (i + 1) * config.batch_size / (time.perf_counter() - t0)
                    bar.update(task, advance=1, loss=float(sums[0] / sums[2]), rate=rate)
                seconds = time.perf_counter() - t0
                if world > 1:
                    dist.all_reduce(sums)
                loss_, acc, n_all = (float(v) for v in sums)
                history.append(
                    {
                        "epoch": epoch + 1,
                        "loss": loss_ / n_all,
                        "pretext_acc": acc / n_all,
                        "lr": lr,
                        "images_per_s": n_all / seconds,
                        "seconds": seconds,
                    }
                )
                if rank == 0:
                    with atomic_path(out / "metrics.csv") as tmp:
                        pd.DataFrame(history).to_csv(tmp, index=False)
                    save_checkpoint(out / "checkpoint.pt", model, optimizer, epoch + 1, config.arch, settings)
        if rank == 0:
            with atomic_path(out / "encoder.pt") as tmp:  # last: marks the run finished
                torch.save(model.backbone_state_dict(), tmp)
        _barrier(world)
        return MocoResult(
            "resumed" if state == "resume" else "trained", config.epochs - done, pd.DataFrame(history), model, out / "encoder.pt"
        )
    finally:
        if created:
            dist.destroy_process_group()


def save_checkpoint(path: Path, model: MoCo, optimizer: torch.optim.Optimizer, epoch: int, arch: str, settings: dict) -> None:
    """facebookresearch/moco's checkpoint layout (DDP's 'module.' prefix), tensors and plain types only."""
    ckpt = {
        "epoch": epoch,  # epochs completed
        "arch": arch,
        "state_dict": {f"module.{k}": v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "settings": settings,
        "mil_version": mil.__version__,
    }
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def _progress(enabled: bool):
    """A rich progress bar on stderr: steps, loss, images/s."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TextColumn("{task.fields[rate]:,.1f} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=Console(stderr=True), disable=not enabled)
