"""`mil train bagnet`: end-to-end BagNet training on an image set (the O2I path).

Training follows Pawlowski et al., *Needles in Haystacks* (``train.py``): RMSprop (lr 5e-5, eps 1e-5,
weight decay 0), MultiStepLR ×0.1 at epochs 80, 120, 160 of 200 scaled to the run's length
(`scaled_milestones`: 20 epochs → 8, 12, 16), effective batch 32 = ``batch_size × accumulate``,
model selection on the best validation accuracy. The network returns one logit per image and
the loss is ``BCEWithLogits`` (the authors use ``Linear(C, 2)`` and softmax cross-entropy, the same
family of classifiers). An unbalanced training split is drawn with a `WeightedRandomSampler`
(each class half of each epoch in expectation); ``max_train = N`` trains on a seeded, balanced
subset of N training images (the authors' ``num_examples``). Run directory::

    RUN_DIR/config.json      every resolved option, the network's config, the image set's imageset.json
    RUN_DIR/metrics.csv      epoch, lr, train_loss, train_acc, val_loss, val_acc, val_auc, train_images_per_s, seconds
    RUN_DIR/last.pt          resume state, rewritten atomically after every epoch, removed when the run is done
    RUN_DIR/checkpoint.pt    the selected model: {"kind": "bagnet", "bagnet", "state_dict", "best_epoch", "threshold", ...}
    RUN_DIR/predictions.csv  index, label, probability, o2i of the validation images under the selected model
    RUN_DIR/summary.csv      best_epoch, val_acc, val_loss, val_auc, epochs, train_images_per_s; written last

Only ``train.h5`` and ``val.h5`` are read; ``test.h5`` is left to `mil evaluate o2i`. A rerun with
the same settings skips a finished run and resumes an unfinished one from ``last.pt``; each epoch's
shuffling and dropout are seeded from ``(seed, epoch)``, so on CPU a resumed run ends bit-identical
to an uninterrupted one. Other settings raise `SettingsMismatchError` unless ``overwrite``, which
trains the new run in a hidden sibling folder that replaces RUN_DIR only when finished
(`mil.rundir.replacing`): a replacement that fails or is killed keeps the old run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, RandomSampler, Subset, WeightedRandomSampler

import mil
from mil.atomic import atomic_path, remove_stale_temporaries, write_csv, write_text
from mil.bagnet import MIN_SIZE, BagNet, create_bagnet
from mil.device import resolve_device
from mil.errors import OptionError
from mil.imagesets import ImageSetDataset, ImageSetError, read_meta
from mil.predict import predict_images
from mil.rundir import read_settings, refuse_other_settings, replacing

PAPER_EPOCHS = 200
PAPER_MILESTONES = (80, 120, 160)
GAMMA = 0.1
RMSPROP_EPS = 1e-5
THRESHOLD = 0.5
RUNTIME_KEYS = ("device", "workers")  # recorded in config.json, free to change between reruns


@dataclass(frozen=True)
class BagNetTrainConfig:
    """Every option that defines a BagNet run (written to config.json under ``"train"``)."""

    rf: int = 33
    pooling: str = "max"
    width: float = 1.0
    norm: str = "in_aff"  # the paper's affine InstanceNorm; "bn" (BatchNorm) trains much faster on small sets
    epochs: int = 200
    batch_size: int = 32  # images per forward pass
    accumulate: int = 1  # forward passes per optimizer step (effective batch = batch_size · accumulate)
    lr: float = 5e-5
    max_train: int | None = None  # seeded balanced subset of the training split
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "accumulate"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise OptionError(f"expected --{name.replace('_', '-')} >= 1, got {value!r} instead.")
        if not (self.lr > 0):
            raise OptionError(f"expected --lr > 0, got {self.lr!r} instead.")
        if self.max_train is not None and self.max_train < 2:
            raise OptionError(f"expected --max-train >= 2 (one image per class at least), got {self.max_train!r} instead.")

    @property
    def milestones(self) -> list[int]:
        return scaled_milestones(self.epochs)


def scaled_milestones(epochs: int) -> list[int]:
    """The paper's LR milestones [80, 120, 160] of 200 epochs scaled to `epochs`, rounded half up, ≥ 1.

    The LR is multiplied by 0.1 after that many epochs: with 20 epochs, epochs 9–12 (1-based) run at
    0.1·lr, 13–16 at 0.01·lr, 17–20 at 0.001·lr.
    """
    return [max(1, (m * epochs + PAPER_EPOCHS // 2) // PAPER_EPOCHS) for m in PAPER_MILESTONES]


def build_optimizer(net: torch.nn.Module, config: BagNetTrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR]:
    """RMSprop(lr, eps 1e-5, weight decay 0) and MultiStepLR(×0.1 at `scaled_milestones`), stepped once per epoch."""
    opt = torch.optim.RMSprop(net.parameters(), lr=config.lr, eps=RMSPROP_EPS, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=config.milestones, gamma=GAMMA)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch `epoch`'s shuffling and dropout (0-based), derived from ``(seed, epoch)`` only."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` images of ``labels (N,)``: ``n // 2`` negatives and ``n − n // 2`` positives, seeded.

    Raises:
        OptionError: a class has fewer images than its half of `n`.
    """
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)  # (n1,), (n0,)
    n_neg, n_pos = n // 2, n - n // 2
    if n_pos > len(pos) or n_neg > len(neg):
        raise OptionError(
            f"expected --max-train <= {2 * min(len(pos), len(neg))} for a balanced subset of this training split "
            f"({len(pos)} positives, {len(neg)} negatives), got {n} instead."
        )
    return np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)]))  # (n,)


def make_loader(ds: ImageSetDataset, indices: np.ndarray, batch_size: int, seed: int, workers: int = 0) -> DataLoader:
    """Training batches of ``ds[indices]`` for one epoch, drawn with a generator seeded by `seed`.

    Balanced classes: a random permutation. Unbalanced: `WeightedRandomSampler` with weights
    ``1 / count(class)`` (with replacement, ``len(indices)`` draws), so each class is half an epoch
    in expectation. Batches are ``(images (B, C, H, W) float in [0, 1], labels (B,) float, rows (B,))``.
    """
    labels = ds.split.labels[indices]  # (n,)
    counts = np.bincount(labels, minlength=2)  # (2,)
    g = torch.Generator().manual_seed(seed)
    sub = Subset(ds, indices.tolist())
    if counts[0] == counts[1]:
        sampler = RandomSampler(sub, generator=g)
    else:
        weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.double)  # (n,)
        sampler = WeightedRandomSampler(weights, num_samples=len(indices), replacement=True, generator=g)
    return DataLoader(sub, batch_size=batch_size, sampler=sampler, num_workers=workers, generator=g)


def train_epoch(
    net: torch.nn.Module,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    accumulate: int,
    device: torch.device,
    on_batch: Callable[[int, int, float], None] | None = None,
) -> dict:
    """One epoch with gradient accumulation; returns ``{"loss", "acc", "n", "seconds"}``.

    The micro-batches are cut into groups of `accumulate` (the last group may be shorter); each
    group is one optimizer step whose gradient is that of the group's mean loss: every
    micro-batch contributes ``sum of its BCE terms / images in the group``. With full
    micro-batches that is ``mean loss / accumulate``; a short last group is weighted correctly.
    `on_batch(done, total, running_loss)` is called after each micro-batch.
    """
    net.train()
    sizes = _batch_sizes(len(loader.sampler), loader.batch_size)  # images per micro-batch
    group = [sum(sizes[i - i % accumulate : i - i % accumulate + accumulate]) for i in range(len(sizes))]
    total_loss, correct, n = 0.0, 0, 0
    opt.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for k, (x, y, _) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device=device, dtype=torch.float32)  # (B, C, H, W), (B,)
        logits = net(x)  # (B,)
        loss_sum = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")  # ()
        (loss_sum / group[k]).backward()
        if (k + 1) % accumulate == 0 or k + 1 == len(sizes):
            opt.step()
            opt.zero_grad(set_to_none=True)
        total_loss += loss_sum.item()
        correct += int(((logits >= 0).float() == y).sum().item())
        n += len(y)
        if on_batch is not None:
            on_batch(k + 1, len(sizes), total_loss / n)
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(n, 1), "acc": correct / max(n, 1), "n": n, "seconds": seconds}


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - i) for i in range(0, n, batch_size)]


def validate(net: BagNet, ds: ImageSetDataset, batch_size: int, device: torch.device) -> tuple[dict, np.ndarray]:
    """``{"loss", "acc", "auc"}`` on `ds` (AUC NaN with one class) and the probabilities ``(n,)``."""
    logits, _ = predict_images(net, ds, batch_size, device)  # (n,)
    y = ds.split.labels.astype(np.float32)  # (n,)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(y)).item()
    prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))  # (n,)
    auc = float(roc_auc_score(y, prob)) if len(np.unique(y)) == 2 else math.nan
    return {"loss": float(loss), "acc": float(((prob >= THRESHOLD) == (y == 1)).mean()), "auc": auc}, prob


def _selection_key(row: dict) -> tuple[float, float, int]:
    """Smaller is better: highest val accuracy, then lowest val loss (NaN worst), then earliest epoch."""
    loss = row["val_loss"] if math.isfinite(row["val_loss"]) else math.inf
    return (-row["val_acc"], loss, row["epoch"])


def run_bagnet(
    data: str | Path,
    out_dir: str | Path,
    config: BagNetTrainConfig,
    *,
    device: str = "auto",
    workers: int = 0,
    overwrite: bool = False,
    resume: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    on_batch: Callable[[int, int, int, float], None] | None = None,
) -> pd.DataFrame:
    """Train a BagNet on image set `data` and write the run directory; return the one-row summary.

    Args:
        data: image-set folder (``imageset.json``, ``train.h5``, ``val.h5``).
        out_dir: run directory.
        config: what defines the run; `device` and `workers` do not (a rerun may change them).
        resume: continue an unfinished run with the same settings from its ``last.pt`` (else start over).
        on_epoch: called with each metrics.csv row (and ``"epochs"``, ``"resumed_from"``).
        on_batch: ``(epoch, done, total, running_loss)`` after each micro-batch.

    Raises (before anything is written):
        ImageSetError: not an image set, a missing or unreadable train/val split, images smaller
            than 11 px, a training split without both classes.
        OptionError: bad options (see `BagNetTrainConfig`, `create_bagnet`, `balanced_subset`).
        SettingsMismatchError: `out_dir` holds a run with other settings and `overwrite` is False.

    ``summary.attrs["skipped"]`` is True when a finished run with the same settings was found.
    """
    out, data = Path(out_dir), Path(data)
    meta = read_meta(data)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise OptionError(f"expected --workers >= 0, got {workers!r} instead.")
    dev = resolve_device(device)
    train_ds, val_ds = ImageSetDataset(data, "train"), ImageSetDataset(data, "val")
    _check_splits(data, train_ds, val_ds)
    labels = train_ds.split.labels  # (N,)
    if config.max_train is not None:
        indices = balanced_subset(labels, config.max_train, config.seed)  # (n,)
    else:
        indices = np.arange(len(labels))  # (N,)
    torch.manual_seed(config.seed)
    net = create_bagnet(
        rf=config.rf, pooling=config.pooling, width=config.width, norm=config.norm, in_chans=int(train_ds.split.images.shape[1])
    )

    doc = {
        "stage": "train_bagnet",
        "mil_version": mil.__version__,
        "data": str(data.resolve()),
        "imageset": meta,
        "train": asdict(config),
        "milestones": config.milestones,
        "bagnet": net.config,
        "n_train": int(len(indices)),
        "n_train_positive": int(labels[indices].sum()),
        "n_val": len(val_ds),
        "loss": "BCEWithLogits on one logit",
        "optimizer": {"name": "RMSprop", "lr": config.lr, "eps": RMSPROP_EPS, "weight_decay": 0.0},
        "runtime": {"device": str(dev), "workers": workers},
    }
    doc = json.loads(json.dumps(doc, default=str))  # as it reads back from config.json
    if overwrite and out.exists():  # trained beside the old run, which it replaces only when finished
        with replacing(out) as tmp:
            write_text(tmp / "config.json", json.dumps(doc, indent=2) + "\n")
            return _train(tmp, net, None, train_ds, val_ds, indices, doc, config, dev, workers, on_epoch, on_batch)
    state = _prepare_out(out, doc, resume)
    if isinstance(state, pd.DataFrame):
        return state
    return _train(out, net, state, train_ds, val_ds, indices, doc, config, dev, workers, on_epoch, on_batch)


def _train(out, net, state, train_ds, val_ds, indices, doc, config, dev, workers, on_epoch, on_batch) -> pd.DataFrame:
    """The epochs of `run_bagnet` into the prepared run directory `out` (from a resume `state`, or None)."""
    net.to(dev)
    opt, sched = build_optimizer(net, config)
    history, best_state, start_epoch = [], None, 0
    if state is not None:  # resume
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict({**sched.state_dict(), **state["scheduler"]})
        torch.set_rng_state(state["rng"])
        history, best_state, start_epoch = list(state["history"]), state["best_state"], int(state["epoch"])
    for epoch in range(start_epoch, config.epochs):
        s = epoch_seed(config.seed, epoch)
        torch.manual_seed(s)  # dropout of this epoch
        loader = make_loader(train_ds, indices, config.batch_size, s, workers)
        lr = opt.param_groups[0]["lr"]
        batch_cb = (lambda done, total, loss, e=epoch + 1: on_batch(e, done, total, loss)) if on_batch else None
        tr = train_epoch(net, loader, opt, config.accumulate, dev, batch_cb)
        sched.step()
        val, _ = validate(net, val_ds, config.batch_size, dev)
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "val_auc": val["auc"],
            "train_images_per_s": tr["n"] / max(tr["seconds"], 1e-9),
            "seconds": tr["seconds"],
        }
        history.append(row)
        if _best_epoch(history) == row["epoch"]:  # strictly better than every earlier epoch
            best_state = _cpu_state(net)
        write_csv(out / "metrics.csv", pd.DataFrame(history))
        _save(
            out / "last.pt",
            {
                "epoch": epoch + 1,
                "model": _cpu_state(net),
                "optimizer": opt.state_dict(),
                "scheduler": {k: v for k, v in sched.state_dict().items() if k != "milestones"},
                "rng": torch.get_rng_state(),
                "history": history,
                "best_epoch": _best_epoch(history),
                "best_state": best_state,
            },
        )
        if on_epoch is not None:
            on_epoch({**row, "epochs": config.epochs, "resumed_from": start_epoch})
    return _finish(out, net, best_state, history, doc, val_ds, config, dev)


def _best_epoch(history: list[dict]) -> int:
    return min(history, key=_selection_key)["epoch"]


def _finish(
    out: Path,
    net: BagNet,
    best_state: dict,
    history: list[dict],
    doc: dict,
    val_ds: ImageSetDataset,
    config: BagNetTrainConfig,
    dev: torch.device,
) -> pd.DataFrame:
    """Write checkpoint.pt, predictions.csv and, last, summary.csv; remove last.pt."""
    best_epoch = _best_epoch(history)
    _save(
        out / "checkpoint.pt",
        {
            "kind": "bagnet",
            "bagnet": dict(net.config),
            "state_dict": best_state,
            "best_epoch": best_epoch,
            "threshold": THRESHOLD,
            "imageset": doc["imageset"],
            "data": doc["data"],
            "mil_version": mil.__version__,
        },
    )
    net.load_state_dict(best_state)
    _, prob = validate(net, val_ds, config.batch_size, dev)
    s = val_ds.split
    write_csv(
        out / "predictions.csv",
        pd.DataFrame({"index": np.arange(len(s)), "label": s.labels.astype(int), "probability": prob, "o2i": s.o2i}),
    )
    best = history[best_epoch - 1]
    summary = pd.DataFrame(
        [
            {
                "best_epoch": best_epoch,
                "val_acc": best["val_acc"],
                "val_loss": best["val_loss"],
                "val_auc": best["val_auc"],
                "epochs": len(history),
                "train_images_per_s": float(np.mean([r["train_images_per_s"] for r in history])),
            }
        ]
    )
    write_csv(out / "summary.csv", summary)  # written last: marks the run finished
    (out / "last.pt").unlink(missing_ok=True)
    return summary


def _prepare_out(out: Path, doc: dict, resume: bool) -> pd.DataFrame | dict | None:
    """Skip (the stored summary), resume (the last.pt state) or start (None, run directory ready)."""
    if (out / "config.json").exists():
        refuse_other_settings(out, read_settings(out / "config.json", "`mil train bagnet`"), doc)
        if (out / "summary.csv").exists():
            summary = pd.read_csv(out / "summary.csv")
            summary.attrs["skipped"] = True
            return summary
        if resume and (out / "last.pt").exists():
            remove_stale_temporaries(out)
            write_text(out / "config.json", json.dumps(doc, indent=2) + "\n")  # the runtime of this attempt
            return torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    if out.exists() and (out / "config.json").exists():
        shutil.rmtree(out)  # an unfinished run started over
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.json", json.dumps(doc, indent=2) + "\n")
    return None


def _check_splits(data: Path, train_ds: ImageSetDataset, val_ds: ImageSetDataset) -> None:
    for ds in (train_ds, val_ds):
        shape = ds.split.images.shape
        if len(ds) == 0 or min(shape[-2:]) < MIN_SIZE:
            raise ImageSetError(
                f"{data / (ds.name + '.h5')}: expected at least one image of at least {MIN_SIZE}×{MIN_SIZE} px, got shape {shape} instead."
            )
    if val_ds.split.images.shape[1:] != train_ds.split.images.shape[1:]:
        raise ImageSetError(
            f"{data}: expected val images shaped like train images {train_ds.split.images.shape[1:]}, got {val_ds.split.images.shape[1:]} instead."
        )
    counts = np.bincount(train_ds.split.labels, minlength=2)
    if counts.min() == 0:
        raise ImageSetError(
            f"{data / 'train.h5'}: expected both classes in the training split, got {counts[1]} positives and {counts[0]} negatives instead."
        )


def _cpu_state(net: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


def _save(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
