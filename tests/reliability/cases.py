"""Builders shared by the reliability tests and `benchmarks/reliability.py`.

Everything here is small on purpose (slides of 2,048² px, bags of 10–40 × 16 features) so the
suite runs on a 2-core machine: bad slide batches, slide and feature-bag cohorts, a runner of
the real `mil` executable that can be killed with SIGKILL at a chosen moment, and helpers that
say what a folder holds (leftover temporaries, a snapshot to compare before/after a command).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from mil.atomic import TMP_MARKER
from tests.conftest import invoke_mil

SLIDE_SIZE = 2048
D = 16  # feature dim of the synthetic bags

# Small and fast extraction: 64-px tiles at 0.5 µm/px (read from level 0 of a 0.25 µm/px slide,
# so a slide with corrupt level-0 tiles fails while being embedded), resnet18 with random weights.
FAST_TILES = ["--target-mpp", "0.5", "--tile-size", "64", "--no-progress"]
FAST_FEATURES = ["--encoder", "resnet18", "--weights", "none", "--precision", "fp32", "--device", "cpu",
                 "--batch-size", "32", "--input-size", "64", *FAST_TILES]  # fmt: skip


def mil_executable() -> str:
    """The `mil` console script of the interpreter running this code (the project's venv)."""
    exe = Path(sys.executable).parent / "mil"
    return str(exe) if exe.exists() else ""


def mil_command(*args) -> list[str]:
    """argv running the real `mil` command: the console script, else ``python -m mil.cli``."""
    exe = mil_executable()
    return [exe, *map(str, args)] if exe else [sys.executable, "-m", "mil.cli", *map(str, args)]


def cli_env() -> dict:
    """Environment for `mil` subprocesses: wide, colourless output (torch's thread count is left as
    in this process, so a subprocess computes exactly what an in-process run does)."""
    return dict(os.environ, COLUMNS="200", NO_COLOR="1")


invoke = invoke_mil  # `mil` in this process: exit code, stdout, stderr (tests/conftest.py)


def run(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `mil` executable in a subprocess."""
    return subprocess.run(mil_command(*args), capture_output=True, text=True, timeout=timeout, env=cli_env())


def run_and_kill(args: list, delay: float, *, timeout: float = 600) -> tuple[bool, float]:
    """Start `mil ARGS`, SIGKILL it after `delay` seconds (if still running); return (killed, seconds run).

    The process runs in a session of its own; after the SIGKILL of the main process, any worker
    processes it had started (DataLoader readers) are killed too, by its process group.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(mil_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env(),
                            start_new_session=True)  # fmt: skip
    try:
        proc.wait(timeout=delay)
        return False, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # orphaned workers of the killed process (its own group)
        return True, time.monotonic() - t0


def kill_during(args: list, delay: float, out: str | Path, *, retries: int = 3) -> tuple[bool, float]:
    """`run_and_kill`, retried with half the delay (after removing `out`) when the command finished
    before the signal (machine load varies): return (killed, the delay that was used)."""
    import shutil

    for _ in range(retries + 1):
        killed, _ = run_and_kill(args, delay)
        if killed:
            return True, delay
        shutil.rmtree(out, ignore_errors=True)
        delay /= 2
    return False, delay


# ----------------------------------------------------------------------------------------------
# folders


def leftovers(folder: str | Path) -> list[Path]:
    """Temporary files or folders (``.<name>.tmp-<pid>``) anywhere under `folder`."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob(f".*{TMP_MARKER}*")) if folder.exists() else []


def snapshot(folder: str | Path) -> dict[str, tuple[int, int]] | None:
    """``{relative path: (size, mtime_ns)}`` of every file under `folder`, or None if it does not exist."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# slides


def ellipse(n: int) -> np.ndarray:
    """A centred ellipse of tissue on an (n, n) mask."""
    yy, xx = np.mgrid[:n, :n]
    return ((yy + 0.5 - n / 2) / (n * 0.3)) ** 2 + ((xx + 0.5 - n / 2) / (n * 0.4)) ** 2 <= 1.0


def good_slide(path: str | Path, *, seed: int = 1, size: int = SLIDE_SIZE, mpp: float | None = 0.25, fmt: str = "tiff",
               tissue: np.ndarray | None = None) -> Path:  # fmt: skip
    """A small pyramidal JPEG-tiled slide with one ellipse of tissue."""
    from mil.extract.synthetic import MASK_DOWNSAMPLE, write_slide

    n = size // MASK_DOWNSAMPLE
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_slide(path, ellipse(n) if tissue is None else tissue, None, width=size, height=size, mpp=mpp, fmt=fmt, seed=seed)


def corrupt_level0(src: Path, dst: Path, seed: int = 0) -> Path:
    """Copy `src` with every level-0 tile replaced by random bytes: it opens, its low-resolution
    level reads (so tiling works), but every tile read at full resolution fails."""
    import tifffile

    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as t:
        page = t.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    rng = np.random.default_rng(seed)
    for o, c in zip(offsets, counts):
        data[o : o + c] = rng.integers(0, 256, c, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


# What `bad_slide_batch` writes, and the report status each stage must give it.
BAD_SLIDES = {
    # slide_id: (what it is, status after `extract tiles`, status after `extract features`, words of the reason)
    "good0": ("a good slide (generic TIFF)", "ok", "ok", ""),
    "good1": ("a good slide (Aperio SVS)", "ok", "ok", ""),
    "truncated": ("the first half of a good slide", "error", "error", "not a slide format"),
    "notslide": ("a text file named .tiff", "error", "error", "not a slide format"),
    "blank": ("a slide with no tissue", "empty", "empty", ""),
    "nompp": ("a slide without mpp", "error", "error", "no microns per pixel"),
    "zero": ("a zero-byte file", "error", "error", "empty (0 bytes)"),
    "corrupt": ("level-0 tiles replaced by noise", "ok", "error", "could not read the tile"),
}


def bad_slide_batch(root: str | Path) -> Path:
    """Write the slides of `BAD_SLIDES` into `root` and a manifest listing them; return the manifest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = SLIDE_SIZE // 16
    files = {
        "good0": good_slide(root / "good0.tiff", seed=1),
        "good1": good_slide(root / "good1.svs", seed=2, fmt="svs"),
        "blank": good_slide(root / "blank.tiff", seed=3, tissue=np.zeros((n, n), bool)),
        "nompp": good_slide(root / "nompp.tiff", seed=4, mpp=None),
    }
    data = files["good0"].read_bytes()
    (root / "truncated.tiff").write_bytes(data[: len(data) // 2])
    (root / "notslide.tiff").write_text("this is not a slide\n")
    (root / "zero.tiff").write_bytes(b"")
    corrupt_level0(files["good0"], root / "corrupt.tiff")
    names = {"truncated": "truncated.tiff", "notslide": "notslide.tiff", "zero": "zero.tiff", "corrupt": "corrupt.tiff"}
    rows = [{"slide_id": sid, "path": files[sid].name if sid in files else names[sid]} for sid in BAD_SLIDES]
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def slide_cohort(root: str | Path, n: int = 2, size: int = SLIDE_SIZE) -> Path:
    """`n` good slides (different textures) and a manifest; return the manifest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"slide_id": f"s{i}", "path": good_slide(root / f"s{i}.tiff", seed=10 + i, size=size).name} for i in range(n)]
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


# ----------------------------------------------------------------------------------------------
# feature bags


def write_bag(path: str | Path, feats: np.ndarray, sid: str, *, encoder: str = "toy", coords: np.ndarray | None = None) -> Path:
    """A feature file in the project's layout (features (N, D), coords (N, 2) with tiling attrs)."""
    feats = np.asarray(feats)
    n = len(feats)
    if coords is None:
        coords = np.stack([np.arange(n) % 8 * 128, np.arange(n) // 8 * 128], axis=1)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        c = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        c.attrs.update(patch_size=64, patch_size_level0=128, target_mpp=0.5, level0_mpp=0.25, level0_width=SLIDE_SIZE,
                       level0_height=SLIDE_SIZE)  # fmt: skip
        f.attrs.update(slide_id=sid, encoder=encoder, encoder_weights_sha256="none",
                       feature_dim=int(feats.shape[1]) if feats.ndim == 2 else 0, mil_version="test")  # fmt: skip
    return Path(path)


def bag_cohort(root: str | Path, n: int = 24, *, seed: int = 0, split: bool = True, d: int = D) -> Path:
    """Bags of N(0, 1) instances (10–40 each); positive bags hold a few instances shifted along one
    feature. A manifest with a train/test split (or none); return the manifest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = i % 2
        X = rng.normal(size=(int(rng.integers(10, 40)), d)).astype(np.float32)
        if y:
            X[: max(1, len(X) // 10), 0] += 4.0
        write_bag(root / f"b{i}.h5", X, f"b{i}")
        rows.append({"slide_id": f"b{i}", "path": f"b{i}.h5", "label": y, "patient_id": f"p{i}",
                     "split": ("test" if (i // 2) % 3 == 0 else "train") if split else ""})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def checkpoint_states(run_dir: str | Path) -> dict:
    """``{fold: {name: tensor}}`` of every checkpoint of a run (loaded with weights_only=True)."""
    import torch

    out = {}
    for p in sorted((Path(run_dir) / "checkpoints").glob("*.pt")):
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        out[p.stem] = {"state_dict": ckpt["state_dict"], "threshold": ckpt["threshold"], "best_epoch": ckpt["best_epoch"]}
    return out


def same_states(a: dict, b: dict) -> bool:
    """True if two `checkpoint_states` are identical (every tensor equal, bit for bit)."""
    import torch

    if a.keys() != b.keys():
        return False
    for fold in a:
        sa, sb = a[fold]["state_dict"], b[fold]["state_dict"]
        if sa.keys() != sb.keys() or a[fold]["threshold"] != b[fold]["threshold"] or a[fold]["best_epoch"] != b[fold]["best_epoch"]:
            return False
        if not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def same_run_outputs(a: str | Path, b: str | Path) -> tuple[bool, str]:
    """Compare two run directories: metrics, predictions, summary, splits and checkpoint states."""
    a, b = Path(a), Path(b)
    for name in ("metrics.csv", "predictions.csv", "summary.csv", "splits.csv"):
        if not (a / name).is_file() or not (b / name).is_file():
            return False, f"{name} missing"
        if (a / name).read_bytes() != (b / name).read_bytes():
            return False, f"{name} differs"
    if not same_states(checkpoint_states(a), checkpoint_states(b)):
        return False, "checkpoint state differs"
    return True, "identical"


def same_features(a: str | Path, b: str | Path, ids) -> tuple[bool, str]:
    """Compare the feature files of `ids` in two folders: features and coords arrays, bit for bit."""
    from mil.features import read_bag

    for sid in ids:
        pa, pb = Path(a) / f"{sid}.h5", Path(b) / f"{sid}.h5"
        if not pb.is_file():
            return False, f"{sid}.h5 missing"
        x, y = read_bag(pa), read_bag(pb)
        if not (np.array_equal(x.features, y.features) and np.array_equal(x.coords, y.coords)):
            return False, f"{sid}: arrays differ"
    return True, "identical"
