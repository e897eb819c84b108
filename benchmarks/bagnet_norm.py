"""BatchNorm against the paper's affine InstanceNorm on a small budget: BagNet validation accuracy per epoch.

    python benchmarks/bagnet_norm.py [--work-dir bench_out/bagnet_norm] [--canvas 64] [--target 1]
        [--max-train 2048] [--epochs 6] [--lr 1e-3] [--width 0.125] [--pooling max] [--norms in_aff,bn]

One Fashion-MNIST needle set (`mil extract needles`, the Debian package `dataset-fashion-mnist`;
`--source sklearn-digits` offline; without either, one `error:` line, exit 2), the same seeded balanced training subset, initialisation seed
and batch order for every norm; RMSprop (eps 1e-5) at a constant learning rate, so that the
comparison is not shaped by the LR schedule. Prints one row per epoch and norm: training loss and
accuracy, validation accuracy and AUC, training images/s. One torch thread per run (`--threads`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from mil.errors import OptionError
from mil.extract.generate.idx import FASHION_MNIST as FASHION
from mil.extract.generate.idx import require_fashion_mnist


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("bench_out/bagnet_norm"))
    p.add_argument("--canvas", type=int, default=64)
    p.add_argument("--target", type=int, default=1)
    p.add_argument("--max-train", type=int, default=2048)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--pooling", default="max")
    p.add_argument("--norms", default="in_aff,bn")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--source", default=None, help="'sklearn-digits' for a fully offline run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny set, 1 epoch")
    a = p.parse_args(argv)
    if a.quick:
        a.canvas, a.max_train, a.n_val, a.epochs, a.width = 32, 32, 16, 1, 0.0625
    return a


def main(argv: list[str] | None = None) -> pd.DataFrame:
    a = parse(argv)
    if a.source is None:
        try:
            require_fashion_mnist(FASHION)
        except OptionError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return compare(a)
    finally:
        torch.set_num_threads(threads)


def compare(a: argparse.Namespace) -> pd.DataFrame:
    """Train one BagNet per norm on the same data and batches; return the per-epoch table."""
    from mil import create_bagnet
    from mil.extract.generate.needles import run_needles
    from mil.imagesets import ImageSetDataset
    from mil.train.bagnet import RMSPROP_EPS, balanced_subset, epoch_seed, make_loader, train_epoch, validate

    idx_dir, source = (FASHION, "idx") if a.source is None else (None, a.source)
    run_needles(
        a.work_dir / "data",
        target=a.target,
        canvases=[a.canvas],
        idx_dir=idx_dir,
        source=source,
        seed=1234,
        max_per_split=(a.max_train, a.n_val, 2),
        progress=False,
    )
    data = a.work_dir / "data" / f"canvas_{a.canvas}"
    train_ds, val_ds = ImageSetDataset(data, "train"), ImageSetDataset(data, "val")
    indices = balanced_subset(train_ds.split.labels, a.max_train, 0)  # (n,)
    device, rows = torch.device("cpu"), []
    print(
        f"{source}, target {a.target}, canvas {a.canvas}², {len(indices)} training / {len(val_ds)} validation images, "
        f"rf 33, {a.pooling} pooling, width {a.width}, RMSprop lr {a.lr} (constant)"
    )
    for norm in a.norms.split(","):
        torch.manual_seed(0)
        net = create_bagnet(rf=33, pooling=a.pooling, width=a.width, norm=norm)
        opt = torch.optim.RMSprop(net.parameters(), lr=a.lr, eps=RMSPROP_EPS, weight_decay=0.0)
        for epoch in range(a.epochs):
            loader = make_loader(train_ds, indices, a.batch_size, epoch_seed(0, epoch))
            t = time.perf_counter()
            tr = train_epoch(net, loader, opt, 1, device)
            val, _ = validate(net, val_ds, a.batch_size, device)
            rows.append(
                {
                    "norm": norm,
                    "epoch": epoch + 1,
                    "train_loss": tr["loss"],
                    "train_acc": tr["acc"],
                    "val_acc": val["acc"],
                    "val_auc": val["auc"],
                    "train_images_per_s": tr["n"] / max(tr["seconds"], 1e-9),
                }
            )
            print(
                f"  {norm:>6} epoch {epoch + 1}: train loss {tr['loss']:.3f} acc {tr['acc']:.3f} · val acc {val['acc']:.3f} "
                f"AUC {val['auc']:.3f} · {rows[-1]['train_images_per_s']:.0f} images/s ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    table = pd.DataFrame(rows)
    best = table.groupby("norm", sort=False)["val_acc"].max()
    print("\nbest validation accuracy per norm: " + ", ".join(f"{k} {v:.3f}" for k, v in best.items()))
    return table


if __name__ == "__main__":
    main()
