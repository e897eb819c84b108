"""The bad-input matrix: for every command, bad manifests, bad feature files, broken run
directories and out-of-range options each give exit status 2 and one `error:` line naming the
culprit (file, line, slide or option), no traceback, and write nothing (the output folder is
absent, or unchanged when it existed before).

Each case is a function ``case(ctx, tmp) -> (argv, watched folder, culprit)``; `ctx` holds a small
slide cohort, a feature-bag cohort and a trained, evaluated run made once per module.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.reliability.cases import FAST_FEATURES, FAST_TILES, bag_cohort, invoke, slide_cohort, snapshot, write_bag


@dataclass
class Ctx:
    root: Path
    slides: Path  # manifest of 2 good slides (folder: slides/)
    bags: Path  # manifest of 24 feature bags with a train/test split (folder: bags/)
    run: Path  # a trained and evaluated run on `bags`


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    root = tmp_path_factory.mktemp("bad_inputs")
    slides = slide_cohort(root / "slides", n=2)
    bags = bag_cohort(root / "bags", n=24)
    r = invoke("train", "features", bags.parent, "--manifest", bags, "--out", root / "run", "--epochs", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = invoke("evaluate", "run", root / "run", "--n-boot", "10")
    assert r.returncode == 0, r.stderr
    return Ctx(root, slides, bags, root / "run")


# ----------------------------------------------------------------------------------------------
# builders


def bad_manifest(base: Path, kind: str, tmp: Path) -> tuple[Path, str]:
    """A copy of manifest `base` (written beside it, so relative paths resolve) with one defect;
    returns (path, the text the error must name)."""
    df = pd.read_csv(base, dtype=str, keep_default_na=False)
    culprit = ""
    if kind == "missing_column":
        df, culprit = df.drop(columns=["path"]), "missing path"
    elif kind == "duplicate_id":
        df.loc[1, "slide_id"], culprit = df.loc[0, "slide_id"], f"duplicate slide_id {df.loc[0, 'slide_id']!r}"
    elif kind == "bad_label":
        df["label"] = df.get("label", "0")
        df.loc[1, "label"], culprit = "yes", "'yes'"
    elif kind == "missing_file":
        df.loc[1, "path"], culprit = "nope.tiff", "nope.tiff"
    elif kind in ("id_dotdot", "id_absolute", "id_slash"):
        sid = {"id_dotdot": "../x", "id_absolute": "/tmp/x", "id_slash": "a/b"}[kind]
        df.loc[1, "slide_id"], culprit = sid, repr(sid)
    elif kind == "patient_two_splits":
        df["patient_id"] = df.get("patient_id", "")
        df["split"] = df.get("split", "")
        df.loc[0, ["patient_id", "split"]] = ["pX", "train"]
        df.loc[1, ["patient_id", "split"]] = ["pX", "test"]
        culprit = "patient 'pX'"
    elif kind == "not_csv":
        path = base.parent / f"bad_{kind}_{tmp.name}.csv"
        path.write_bytes(b"\xff\xfe\x00garbage\x00\xff")
        return path, path.name
    else:
        raise AssertionError(kind)
    path = base.parent / f"bad_{kind}_{tmp.name}.csv"
    df.to_csv(path, index=False)
    return path, culprit


MANIFEST_KINDS = [
    "missing_column",
    "duplicate_id",
    "bad_label",
    "missing_file",
    "id_dotdot",
    "id_absolute",
    "id_slash",
    "patient_two_splits",
    "not_csv",
]


def copy_bags(ctx: Ctx, tmp: Path) -> Path:
    d = tmp / "bags"
    shutil.copytree(ctx.bags.parent, d)
    return d


def bad_feature_file(folder: Path, sid: str, kind: str) -> str:
    """Replace `folder/<sid>.h5` by a defective file; return the culprit (its name)."""
    p = folder / f"{sid}.h5"
    if kind == "wrong_dims":
        write_bag(p, np.zeros((5, 8), np.float32), sid)
    elif kind in ("nan", "inf"):
        X = np.ones((5, 16), np.float32)
        X[2, 3] = np.nan if kind == "nan" else np.inf
        write_bag(p, X, sid)
    elif kind == "beyond_float16":
        write_bag(p, np.full((5, 16), 1e6, np.float32), sid)
    elif kind == "not_hdf5":
        p.write_text("slide_id,feature\nb3,1.0\n")
    elif kind == "empty_file":
        p.write_bytes(b"")
    elif kind == "truncated":
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "coords_only":
        import h5py

        with h5py.File(p, "w") as f:
            f.create_dataset("coords", data=np.zeros((5, 2), np.int64))
    elif kind == "features_3d":
        import h5py

        with h5py.File(p, "w") as f:
            f.create_dataset("features", data=np.zeros((2, 5, 16), np.float32))
    else:
        raise AssertionError(kind)
    return p.name


FEATURE_KINDS = ["wrong_dims", "nan", "inf", "beyond_float16", "not_hdf5", "empty_file", "truncated", "coords_only", "features_3d"]


class Evil:
    """Unpickling this runs a shell command (it must never happen)."""

    def __reduce__(self):
        return (os.system, (f"touch {EVIL_MARKER}",))


EVIL_MARKER = Path("/tmp") / f"mil_reliability_pwned_{os.getpid()}"


def copy_run(ctx: Ctx, tmp: Path, keep_eval: bool = False) -> Path:
    d = tmp / "run"
    shutil.copytree(ctx.run, d)
    if not keep_eval:
        shutil.rmtree(d / "eval")
    return d


def break_run(d: Path, kind: str) -> str:
    """Damage run directory `d`; return the culprit (a file name)."""
    ckpt = d / "checkpoints" / "split.pt"
    if kind == "missing_config":
        (d / "config.json").unlink()
        return "config.json"
    if kind == "config_not_json":
        (d / "config.json").write_text("{not json")
        return "config.json"
    if kind == "config_without_keys":
        (d / "config.json").write_text(json.dumps({"stage": "train"}))
        return "config.json"
    if kind == "missing_splits":
        (d / "splits.csv").unlink()
        return "splits.csv"
    if kind == "splits_wrong_columns":
        (d / "splits.csv").write_text("a,b\n1,2\n")
        return "splits.csv"
    if kind == "missing_checkpoint":
        ckpt.unlink()
        return "split.pt"
    if kind == "checkpoint_garbage":
        ckpt.write_bytes(b"garbage" * 20)
        return "split.pt"
    if kind == "checkpoint_empty":
        ckpt.write_bytes(b"")
        return "split.pt"
    if kind == "checkpoint_truncated":
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
        return "split.pt"
    if kind == "checkpoint_pickled_code":
        torch.save({"head": "abmil", "state_dict": Evil()}, ckpt)
        return "split.pt"
    if kind == "checkpoint_raw_pickle":
        ckpt.write_bytes(pickle.dumps(Evil()))
        return "split.pt"
    if kind == "checkpoint_missing_keys":
        torch.save({"head": "abmil"}, ckpt)
        return "split.pt"
    raise AssertionError(kind)


RUN_KINDS = [
    "missing_config",
    "config_not_json",
    "config_without_keys",
    "missing_splits",
    "splits_wrong_columns",
    "missing_checkpoint",
    "checkpoint_garbage",
    "checkpoint_empty",
    "checkpoint_truncated",
    "checkpoint_pickled_code",
    "checkpoint_raw_pickle",
    "checkpoint_missing_keys",
]


# ----------------------------------------------------------------------------------------------
# the matrix: (command, case) -> builder


def _tiles(ctx, tmp, manifest):
    return ["extract", "tiles", manifest, "--out", tmp / "out", *FAST_TILES], tmp / "out"


def _features(ctx, tmp, manifest):
    return ["extract", "features", manifest, "--out", tmp / "out", *FAST_FEATURES], tmp / "out"


def _train(ctx, tmp, manifest, features=None, *opts):
    return [
        "train",
        "features",
        features or ctx.bags.parent,
        "--manifest",
        manifest,
        "--out",
        tmp / "out",
        "--epochs",
        "1",
        "--no-progress",
        *opts,
    ], tmp / "out"


CASES: dict[str, callable] = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


for _kind in MANIFEST_KINDS:
    # extract tiles / features: every manifest defect
    case(f"tiles/manifest:{_kind}")(lambda ctx, tmp, k=_kind: (*_tiles(ctx, tmp, (m := bad_manifest(ctx.slides, k, tmp))[0]), m[1]))
    case(f"features/manifest:{_kind}")(lambda ctx, tmp, k=_kind: (*_features(ctx, tmp, (m := bad_manifest(ctx.slides, k, tmp))[0]), m[1]))
    # train opens no slide file and needs no path column (mil.labels): see train/manifest:no_feature_file
    if _kind not in ("missing_file", "missing_column"):
        case(f"train/manifest:{_kind}")(lambda ctx, tmp, k=_kind: (*_train(ctx, tmp, (m := bad_manifest(ctx.bags, k, tmp))[0]), m[1]))
for _kind in ("duplicate_id", "bad_label", "id_dotdot", "not_csv"):  # labels need no path column (mil.labels)
    case(f"evaluate run/manifest:{_kind}")(
        lambda ctx, tmp, k=_kind: (
            ["evaluate", "run", (d := copy_run(ctx, tmp)), "--manifest", (m := bad_manifest(ctx.bags, k, tmp))[0], "--n-boot", "10"],
            d,
            m[1],
        )
    )
    case(f"evaluate heatmap/manifest:{_kind}")(
        lambda ctx, tmp, k=_kind: (
            ["evaluate", "heatmap", (d := copy_run(ctx, tmp)), "--slide", "s0", "--slides", (m := bad_manifest(ctx.slides, k, tmp))[0]],
            d,
            m[1],
        )
    )


@case("train/manifest:no_feature_file")
def _(ctx, tmp):
    df = pd.read_csv(ctx.bags)
    df.loc[2, "slide_id"] = "ghost"
    m = ctx.bags.parent / f"ghost_{tmp.name}.csv"
    df.to_csv(m, index=False)
    return (*_train(ctx, tmp, m), "ghost")


@case("train/manifest:no_labels")
def _(ctx, tmp):
    m = ctx.bags.parent / f"nolabels_{tmp.name}.csv"
    pd.read_csv(ctx.bags).drop(columns=["label"]).to_csv(m, index=False)
    return (*_train(ctx, tmp, m), "'label'")


@case("train/manifest:one_class_only")
def _(ctx, tmp):
    m = ctx.bags.parent / f"oneclass_{tmp.name}.csv"
    pd.read_csv(ctx.bags).assign(label=0).to_csv(m, index=False)
    return (*_train(ctx, tmp, m), "label")


for _kind in FEATURE_KINDS:
    case(f"train/features:{_kind}")(
        lambda ctx, tmp, k=_kind: (*_train(ctx, tmp, (d := copy_bags(ctx, tmp)) / "manifest.csv", d), bad_feature_file(d, "b3", k))
    )
    case(f"train/features:{_kind} (--cache stream)")(
        lambda ctx, tmp, k=_kind: (
            *_train(ctx, tmp, (d := copy_bags(ctx, tmp)) / "manifest.csv", d, "--cache", "stream"),
            bad_feature_file(d, "b3", k),
        )
    ) if _kind != "beyond_float16" else None
    case(f"evaluate run/features:{_kind}")(
        lambda ctx, tmp, k=_kind: (
            ["evaluate", "run", (r := copy_run(ctx, tmp)), "--features", (d := copy_bags(ctx, tmp)), "--n-boot", "10"],
            r,
            bad_feature_file(d, "b1", k),
        )
    ) if _kind != "beyond_float16" else None  # evaluation streams float32: 1e6 is a valid feature there


@case("train/features:missing_folder")
def _(ctx, tmp):
    return (*_train(ctx, tmp, ctx.bags, tmp / "nowhere"), "nowhere")


for _kind in RUN_KINDS:
    case(f"evaluate run/run dir:{_kind}")(
        lambda ctx, tmp, k=_kind: (["evaluate", "run", (d := copy_run(ctx, tmp)), "--n-boot", "10"], d, break_run(d, k))
    )
    if _kind.startswith(("missing_config", "config_", "checkpoint_pickled")):
        case(f"evaluate heatmap/run dir:{_kind}")(
            lambda ctx, tmp, k=_kind: (
                ["evaluate", "heatmap", (d := copy_run(ctx, tmp)), "--slide", "s0", "--slides", ctx.slides],
                d,
                break_run(d, k),
            )
        )


@case("evaluate compare/run dir:not_evaluated")
def _(ctx, tmp):
    d = copy_run(ctx, tmp)
    return ["evaluate", "compare", ctx.run, d, "--n-boot", "10"], d, str(d / "eval" / "test" / "predictions.csv")


@case("evaluate compare/run dir:different_slides")
def _(ctx, tmp):
    d = copy_run(ctx, tmp, keep_eval=True)
    p = d / "eval" / "test" / "predictions.csv"
    pred = pd.read_csv(p)
    pred.loc[0, "slide_id"] = "zz"
    pred.to_csv(p, index=False)
    return ["evaluate", "compare", ctx.run, d, "--n-boot", "10"], d, "zz"


# Options out of range: (command builder, option, value, culprit)
OPTIONS = {
    "tiles": (
        lambda ctx, tmp: _tiles(ctx, tmp, ctx.slides),
        [
            ("--tissue-threshold", "1.5"),
            ("--tile-size", "0"),
            ("--target-mpp", "-1"),
            ("--overlap", "-5"),
            ("--overlap", "64"),
            ("--mpp", "0"),
            ("--mask-mpp", "0"),
            ("--saturation-threshold", "2"),
        ],
    ),
    "features": (
        lambda ctx, tmp: _features(ctx, tmp, ctx.slides),
        [
            ("--batch-size", "0"),
            ("--workers", "-1"),
            ("--dtype", "float64"),
            ("--precision", "fp8"),
            ("--encoder", "no_such_net"),
            ("--device", "tpu"),
            ("--weights", "/no/such/weights.pt"),
            ("--input-size", "0"),
            ("--tissue-threshold", "-0.1"),
        ],
    ),
    "train": (
        lambda ctx, tmp: _train(ctx, tmp, ctx.bags),
        [
            ("--epochs", "0"),
            ("--lr", "-1"),
            ("--lr", "nan"),
            ("--neg-ratio", "2"),
            ("--folds", "1"),
            ("--val-fraction", "1.5"),
            ("--cache", "bogus"),
            ("--head", "bogus"),
            ("--batch-size", "0"),
            ("--patience", "0"),
            ("--repeats", "0"),
            ("--instance-loss", "xx"),
            ("--weight-decay", "-1"),
            ("--rank-k", "0"),
            ("--hnm-every", "0"),
            ("--folds", "30"),
            ("--recipe", "bogus"),
            ("--ranking-weight", "-1"),
            ("--bag-weight", "-1"),
            ("--hnm-bank", "-1"),
            ("--pos-ratio", "0"),
            ("--ece-schedule-epochs", "0"),
        ],
    ),
    "evaluate run": (
        lambda ctx, tmp: ((["evaluate", "run", d := copy_run(ctx, tmp)]), d),
        [("--n-boot", "0"), ("--split", "bogus"), ("--features", "/no/such/folder")],
    ),
    "evaluate compare": (
        lambda ctx, tmp: ((["evaluate", "compare", ctx.run, d := copy_run(ctx, tmp, keep_eval=True)]), d),
        [("--n-boot", "0"), ("--split", "val")],
    ),
    "evaluate heatmap": (
        lambda ctx, tmp: ((["evaluate", "heatmap", d := copy_run(ctx, tmp), "--slide", "s0", "--slides", ctx.slides]), d),
        [("--top-k", "100"), ("--score", "bogus"), ("--fold", "zz"), ("--thumbnail-size", "1"), ("--slide", "zz")],
    ),
    "extract synthetic": (
        lambda ctx, tmp: (["extract", "synthetic", tmp / "out"], tmp / "out"),
        [
            ("--n-slides", "0"),
            ("--size", "10"),
            ("--format", "bmp"),
            ("--mpp", "0"),
            ("--positive-fraction", "2"),
            ("--lesion-fraction", "-1"),
        ],
    ),
}
# What an error names when it is not the option itself.
OPTION_CULPRITS = {
    ("train", "--folds", "30"): "30-fold",
    ("evaluate run", "--features", "/no/such/folder"): "/no/such/folder",
    ("train", "--lr", "nan"): "--lr",
    ("evaluate compare", "--split", "val"): "--split val",
    ("evaluate heatmap", "--slide", "zz"): "'zz'",
    ("tiles", "--mask-mpp", "0"): "mask_mpp",
    ("tiles", "--saturation-threshold", "2"): "saturation threshold",
    ("features", "--weights", "/no/such/weights.pt"): "--weights",
    ("train", "--head", "bogus"): "head name among",
}
for _cmd, (_build, _opts) in OPTIONS.items():
    for _opt, _value in _opts:
        case(f"{_cmd}/option:{_opt} {_value}")(
            lambda ctx, tmp, b=_build, o=_opt, v=_value, c=_cmd: ([*(x := b(ctx, tmp))[0], o, v], x[1], OPTION_CULPRITS.get((c, o, v), o))
        )


@case("extract import-csv/table:ragged")
def _(ctx, tmp):
    (tmp / "t.csv").write_text("1,bagA,0.1,0.2\n0,bagB,0.3\n")
    return ["extract", "import-csv", tmp / "t.csv", "--out", tmp / "out"], tmp / "out", "line 2"


@case("extract import-csv/table:bad_label")
def _(ctx, tmp):
    (tmp / "t.csv").write_text("1,bagA,0.1,0.2\n2,bagB,0.3,0.4\n")
    return ["extract", "import-csv", tmp / "t.csv", "--out", tmp / "out"], tmp / "out", "line 2"


@case("extract import-csv/table:nan")
def _(ctx, tmp):
    (tmp / "t.csv").write_text("1,bagA,nan,0.2\n")
    return ["extract", "import-csv", tmp / "t.csv", "--out", tmp / "out"], tmp / "out", "line 1"


@case("extract import-csv/table:empty")
def _(ctx, tmp):
    (tmp / "t.csv").write_bytes(b"")
    return ["extract", "import-csv", tmp / "t.csv", "--out", tmp / "out"], tmp / "out", "t.csv"


@case("extract import-csv/table:missing")
def _(ctx, tmp):
    return ["extract", "import-csv", tmp / "nope.csv", "--out", tmp / "out"], tmp / "out", "nope.csv"


@case("extract tiles/input:missing")
def _(ctx, tmp):
    return ["extract", "tiles", tmp / "nope.csv", "--out", tmp / "out"], tmp / "out", "nope.csv"


@case("extract tiles/input:folder_without_slides")
def _(ctx, tmp):
    (tmp / "empty").mkdir()
    return ["extract", "tiles", tmp / "empty", "--out", tmp / "out"], tmp / "out", "empty"


@case("extract features/weights:pickled_code")
def _(ctx, tmp):
    torch.save({"state_dict": Evil()}, tmp / "evil.pt")
    return [*_features(ctx, tmp, ctx.slides)[0], "--weights", tmp / "evil.pt"], tmp / "out", "evil.pt"


# ----------------------------------------------------------------------------------------------


def check_refusal(result, culprit: str, before, after) -> list[str]:
    """What is wrong with a refusal (empty list: nothing)."""
    problems = []
    if result.returncode != 2:
        problems.append(f"exit status {result.returncode}, expected 2")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'error:' lines, expected 1")
    elif culprit not in errors[0]:
        problems.append(f"the error does not name {culprit!r}")
    if "Traceback" in result.stderr:
        problems.append("a traceback was printed")
    if before != after:
        problems.append("the output folder changed" if before is not None else "the output folder was created")
    if EVIL_MARKER.exists():
        problems.append("code from an input file was executed")
    return problems


def try_case(build, ctx, tmp: Path) -> tuple[list[str], str]:
    """Run the case `build(ctx, tmp) -> (argv, watched, culprit)`; return what is wrong with its refusal and its stderr."""
    argv, watched, culprit = build(ctx, tmp)
    before = snapshot(watched)
    r = invoke(*argv)
    return check_refusal(r, culprit, before, snapshot(watched)), r.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_in_one_line_and_writes_nothing(ctx, tmp_path, name):
    problems, stderr = try_case(CASES[name], ctx, tmp_path)
    assert not problems, f"{name}: {problems}\nstderr: {stderr}"
