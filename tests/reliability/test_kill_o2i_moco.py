"""`kill -9` of `mil train bagnet` and `mil extract moco` between two of their per-epoch checkpoints,
then the rerun: it resumes from the checkpoint the killed process left (``last.pt``, ``checkpoint.pt``)
and ends bit-identical to an uninterrupted run.

tests/train/test_bagnet_train.py and tests/extract/test_moco.py resume after an exception raised in
the process at an epoch's end; here the real executable is sent SIGKILL at a seeded moment after its
first checkpoint appeared and before its last epoch finished (`cases.kill_inside`), so it may die
anywhere: inside an epoch, while writing metrics.csv or the checkpoint (its temporary). Tiny nets on
the CPU, a few seconds each.
"""

from __future__ import annotations

import random
import time
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.extract.test_moco import CLI_FAST
from tests.reliability.cases import WorkState, invoke, kill_inside, leftovers
from tests.train.test_bagnet_train import toy_imageset

SHARE = (0.1, 0.6)  # a kill lands this share of the reference's remaining epochs after the first checkpoint

# tests/train/test_bagnet_train.py's TINY net (rf 9, width 1/16: 93k parameters) on 32 images of its toy image set.
BAGNET_EPOCHS = 4
BAGNET = [
    "--rf",
    "9",
    "--width",
    "0.0625",
    "--batch-size",
    "16",
    "--lr",
    "1e-3",
    "--seed",
    "0",
    "--max-train",
    "32",
    "--epochs",
    str(BAGNET_EPOCHS),
    "--device",
    "cpu",
    "--no-progress",
]
# tests/extract/test_moco.py's CLI_FAST (timm's test_resnet on 32-px tiles, 3 steps of 16 per epoch), more epochs.
MOCO_EPOCHS = 4
MOCO = [
    *CLI_FAST,
    "--epochs",
    str(MOCO_EPOCHS),
    "--seed",
    "3",
]
TIMING = ["train_images_per_s", "seconds", "images_per_s"]  # metrics.csv columns that measure time, not the run


def _epoch(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"]) if path.exists() else 0


def bagnet_state(out: Path, epochs: int) -> WorkState:
    """Epochs saved in ``last.pt``; complete once every epoch is saved or ``checkpoint.pt`` (the selected model) exists."""
    done, final = _epoch(out / "last.pt"), (out / "checkpoint.pt").exists()
    ckpt = "checkpoint.pt" if final else "no checkpoint.pt"
    text = f"last.pt after epoch {done}/{epochs}, {ckpt}, {len(leftovers(out))} temporaries"
    return WorkState(done, final or done == epochs, text)


def moco_state(out: Path, epochs: int) -> WorkState:
    """Epochs saved in ``checkpoint.pt``; complete once every epoch is saved or ``encoder.pt`` exists."""
    done, final = _epoch(out / "checkpoint.pt"), (out / "encoder.pt").exists()
    enc = "encoder.pt" if final else "no encoder.pt"
    text = f"checkpoint.pt after epoch {done}/{epochs}, {enc}, {len(leftovers(out))} temporaries"
    return WorkState(done, final or done == epochs, text)


def strip(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in TIMING if c in df.columns])


def kill_and_resume(args: list, out: Path, marker: str, state, window: float, seed: int, rerun_args: list):
    """SIGKILL `args` between its first checkpoint and its last epoch; return (the kill, metrics.csv it left,
    the rerun's result)."""
    kill = kill_inside(args, out, started=lambda o: (o / marker).exists(), state=state, extra=random.Random(seed).uniform(*SHARE) * window)
    assert kill.signalled, kill.describe()
    assert kill.state.parts > 0 and not kill.state.complete, kill.describe()
    left = pd.read_csv(out / "metrics.csv")
    r = invoke(*args, *rerun_args)
    assert r.returncode == 0, (kill.describe(), r.stderr)
    assert not leftovers(out), (kill.describe(), leftovers(out))
    return kill, left, r


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return toy_imageset(tmp_path_factory.mktemp("toy") / "set")


def test_bagnet_killed_between_checkpoints_resumes_to_a_bit_identical_run(toy, tmp_path):
    """The rerun continues from the killed run's last.pt (its epochs' metrics rows kept, timings included)
    and ends with the straight run's metrics, selected weights and predictions, bit for bit."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    t0 = time.monotonic()
    r = invoke("train", "bagnet", toy, "--out", straight, *BAGNET)
    assert r.returncode == 0, r.stderr
    per_epoch = (time.monotonic() - t0) / BAGNET_EPOCHS  # validation and writing included
    kill, left, _ = kill_and_resume(
        ["train", "bagnet", toy, "--out", cut, *BAGNET],
        cut,
        "last.pt",
        partial(bagnet_state, epochs=BAGNET_EPOCHS),
        per_epoch * (BAGNET_EPOCHS - 1),
        0,
        [],
    )
    done = kill.state.parts
    resumed = pd.read_csv(cut / "metrics.csv")
    assert len(resumed) == BAGNET_EPOCHS and len(left) >= done
    pd.testing.assert_frame_equal(resumed.iloc[:done], left.iloc[:done])  # kept from last.pt, not trained again
    pd.testing.assert_frame_equal(strip(resumed), strip(pd.read_csv(straight / "metrics.csv")))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, cut))
    assert a["best_epoch"] == b["best_epoch"] and a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert (straight / "predictions.csv").read_bytes() == (cut / "predictions.csv").read_bytes()
    assert not (cut / "last.pt").exists()


def test_moco_killed_between_checkpoints_resumes_to_a_bit_identical_run(tmp_path_factory, tmp_path):
    """`--resume` continues from the killed run's checkpoint.pt and ends with the straight run's
    checkpoint (both encoders, queue, optimizer), encoder.pt and metrics, bit for bit."""
    from mil.extract.generate.synthetic import make_cohort

    cohort = make_cohort(tmp_path_factory.mktemp("moco_cohort"), n_slides=2, size=2048, seed=0)
    coords = ["--coords-dir", tmp_path / "tiles"]  # tiled once, by the straight run
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    r = invoke("extract", "moco", cohort, "--out", straight, *MOCO, *coords)
    assert r.returncode == 0, r.stderr
    per_epoch = float(pd.read_csv(straight / "metrics.csv")["seconds"].mean())  # the training steps of one epoch
    kill, left, _ = kill_and_resume(
        ["extract", "moco", cohort, "--out", cut, *MOCO, *coords],
        cut,
        "checkpoint.pt",
        partial(moco_state, epochs=MOCO_EPOCHS),
        per_epoch * (MOCO_EPOCHS - 1),
        1,
        ["--resume"],
    )
    done = kill.state.parts
    resumed = pd.read_csv(cut / "metrics.csv")
    pd.testing.assert_frame_equal(resumed.iloc[:done], left.iloc[:done])  # kept, not trained again
    pd.testing.assert_frame_equal(strip(resumed), strip(pd.read_csv(straight / "metrics.csv")))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, cut))
    assert a["epoch"] == b["epoch"] == MOCO_EPOCHS and a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert repr(a["optimizer"]["param_groups"]) == repr(b["optimizer"]["param_groups"])
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"]), k
    ea, eb = (torch.load(d / "encoder.pt", weights_only=True) for d in (straight, cut))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
