"""Builders shared by the reliability tests and `benchmarks/reliability.py`.

Everything here is small on purpose (slides of 2,048² px, bags of 10–40 × 16 features) so the
suite runs on a 2-core machine: bad slide batches, slide and feature-bag cohorts, a runner of
the real `mil` executable that is killed with SIGKILL inside its work (after a marker of started
work appears in its output folder, before the work is complete), and helpers that say what a
folder holds (leftover temporaries, a snapshot to compare before/after a command).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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
FAST_FEATURES = [*"--encoder resnet18 --weights none --precision fp32 --device cpu --batch-size 32 --input-size 64".split(), *FAST_TILES]
# What the kill checks extract (tests/reliability/test_kill.py, benchmarks/reliability.py): 21 tiles per
# slide (64 px at 1 µm/px), one reading worker: a few seconds per slide.
KILL_FEATURES = (
    "--encoder resnet18 --weights none --precision fp32 --device cpu --target-mpp 1.0 --tile-size 64 --input-size 64 "
    "--batch-size 8 --workers 1 --no-progress"
).split()


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


POLL_S = 0.02  # how often a watched run's output folder is looked at


@dataclass(frozen=True)
class WorkState:
    """What a run left in its output folder: `parts` of the work written (whole files or temporaries),
    whether the work is `complete` (every output a finished run makes, so a kill then interrupted nothing)."""

    parts: int
    complete: bool
    text: str


@dataclass(frozen=True)
class Watched:
    """One watched run of `mil`: its exit status (``-9`` when killed), when the marker of started work
    appeared (seconds from the start; None if never seen) and when it ended or was killed."""

    returncode: int
    marker_s: float | None
    end_s: float
    stderr: str

    @property
    def window_s(self) -> float:
        """Seconds from the marker of started work to the end of the run."""
        return self.end_s - (self.marker_s if self.marker_s is not None else self.end_s)


@dataclass(frozen=True)
class Kill:
    """A SIGKILL aimed inside the work (`kill_inside`): the last attempt, and what it left."""

    signalled: bool  # the process was running when SIGKILL was sent and died of it
    state: WorkState
    at_s: float  # seconds from the start to the signal (or to the exit, when it finished first)
    after_marker_s: float | None  # of which after the marker of started work appeared
    attempts: int
    stderr: str

    @property
    def interrupted(self) -> bool:
        """The kill landed inside the work: the process was alive, some of its output existed, not all of it."""
        return self.signalled and self.state.parts > 0 and not self.state.complete

    def describe(self) -> str:
        after = "marker never seen" if self.after_marker_s is None else f"{self.after_marker_s:.2f} s after the marker"
        how = "killed" if self.signalled else "not killed (finished or crashed first)"
        tail = f"; stderr: {self.stderr[-300:]}" if not self.signalled and self.stderr.strip() else ""
        return f"{how} at {self.at_s:.1f} s ({after}, attempt {self.attempts}) → {self.state.text}{tail}"


def watch(
    args: list,
    out: str | Path,
    started: Callable[[Path], bool],
    *,
    kill_after: float | None = None,
    poll: float = POLL_S,
    timeout: float = 600,
) -> Watched:
    """Start `mil ARGS` in a session of its own and look at `out` every `poll` seconds until `started(out)`.

    With `kill_after`, SIGKILL the whole process group (the command and any DataLoader workers) that many
    seconds after the marker, if it is still running; without, let it finish. A run that ends before the
    marker appears is not killed (``marker_s`` None).
    """
    out = Path(out)
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(mil_command(*args), stdout=subprocess.DEVNULL, stderr=err, env=cli_env(), start_new_session=True)
        try:
            marker = None
            while proc.poll() is None and time.monotonic() - t0 < timeout:
                if started(out):
                    marker = time.monotonic() - t0
                    break
                time.sleep(poll)
            if marker is not None and kill_after is not None:
                deadline = t0 + marker + kill_after
                while proc.poll() is None and (left := deadline - time.monotonic()) > 0:
                    time.sleep(min(poll, left))
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
            end = time.monotonic() - t0
        finally:
            if proc.poll() is None:  # timed out, or this process was interrupted: leave nothing running
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # workers the dead command left behind (its own group)
        err.seek(0)
        return Watched(proc.returncode, marker, end, err.read())


def kill_inside(
    args: list, out: str | Path, *, started: Callable[[Path], bool], state: Callable[[Path], WorkState], extra: float, retries: int = 3
) -> Kill:
    """SIGKILL `mil ARGS` `extra` seconds after `started(out)` first holds, and say what it left (`state(out)`).

    A kill that did not interrupt work (the command finished first, or left its work complete) is
    retried after removing `out`, with half the extra delay each time; the last attempt is returned
    either way, so a caller asserting `Kill.interrupted` never passes on a kill that missed.
    """
    out = Path(out)
    for attempt in range(1, retries + 2):
        w = watch(args, out, started, kill_after=extra)
        after = None if w.marker_s is None else w.end_s - w.marker_s
        kill = Kill(w.returncode == -signal.SIGKILL, state(out), w.end_s, after, attempt, w.stderr)
        if kill.interrupted or attempt == retries + 1:
            return kill
        shutil.rmtree(out, ignore_errors=True)
        extra /= 2


def features_started(out: Path) -> bool:
    """Marker of started extraction: a slide's first file (coords, or the temporary of one) in `out`."""
    return any(out.glob("*.h5")) or any(out.glob(f".*.h5{TMP_MARKER}*"))


def feature_state(out: str | Path, n_slides: int) -> WorkState:
    """What a killed `mil extract features` left: feature files, coords-only files, temporaries; complete
    when every slide has its feature file."""
    out = Path(out)
    if not out.exists():
        return WorkState(0, False, "nothing yet")
    feats = coords = 0
    for p in out.glob("*.h5"):
        with h5py.File(p, "r") as f:
            feats, coords = feats + ("features" in f), coords + ("features" not in f)
    tmp = leftovers(out)
    parts = feats + coords + sum(".h5" + TMP_MARKER in p.name for p in tmp)
    text = f"{feats}/{n_slides} feature files, {coords} coords-only, {len(tmp)} temporaries"
    return WorkState(parts, feats == n_slides, text)


def training_started(out: Path) -> bool:
    """Marker of started training: `splits.csv`, the last file written before fold 0 trains."""
    return (out / "splits.csv").exists()


def run_state(out: str | Path, n_folds: int) -> WorkState:
    """What a killed `mil train features` left; complete when every fold's checkpoint exists."""
    out = Path(out)
    if not out.exists():
        return WorkState(0, False, "nothing yet")
    names = ("config.json", "slides.csv", "splits.csv", "metrics.csv", "predictions.csv")
    files = [n for n in names if (out / n).exists()]
    ckpts = list((out / "checkpoints").glob("*.pt")) if (out / "checkpoints").exists() else []
    rows = len(pd.read_csv(out / "metrics.csv")) if (out / "metrics.csv").exists() else 0
    summary = "summary.csv" if (out / "summary.csv").exists() else "no summary"
    text = f"{len(ckpts)}/{n_folds} fold checkpoints, {rows} metrics rows, {summary}, {len(leftovers(out))} temporaries"
    return WorkState(len(files) + len(ckpts), len(ckpts) == n_folds, text)


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


def good_slide(
    path: str | Path,
    *,
    seed: int = 1,
    size: int = SLIDE_SIZE,
    mpp: float | None = 0.25,
    fmt: str = "tiff",
    tissue: np.ndarray | None = None,
) -> Path:
    """A small pyramidal JPEG-tiled slide with one ellipse of tissue."""
    from mil.extract.generate.slide_writer import MASK_DOWNSAMPLE, write_slide

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
        c.attrs.update(
            patch_size=64, patch_size_level0=128, target_mpp=0.5, level0_mpp=0.25, level0_width=SLIDE_SIZE, level0_height=SLIDE_SIZE
        )
        f.attrs.update(
            slide_id=sid,
            encoder=encoder,
            encoder_weights_sha256="none",
            feature_dim=int(feats.shape[1]) if feats.ndim == 2 else 0,
            mil_version="test",
        )
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
        rows.append(
            {
                "slide_id": f"b{i}",
                "path": f"b{i}.h5",
                "label": y,
                "patient_id": f"p{i}",
                "split": ("test" if (i // 2) % 3 == 0 else "train") if split else "",
            }
        )
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
