"""The bad-input matrix for the O2I commands (`extract needles`, `extract crops`, `train bagnet`,
`evaluate o2i`): each bad option, image set or run directory gives exit status 2 and one `error:`
line naming the culprit, no traceback, and writes nothing (see test_bad_inputs.py for the rules).

Each case is ``case(o2i, tmp) -> (argv, output folder, culprit)``; `o2i` holds a tiny needle image
set (scikit-learn digits, 32² canvases) and a finished one-epoch BagNet run on it, made once.
"Writes nothing" is checked on the whole case folder `tmp`, files and folders alike: it holds the
output folder and every input copied for the case, so a run directory's ``eval/<split>/`` (which
`evaluate o2i` writes for each run in turn) is watched as well as the plot folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import pytest

from tests.reliability.cases import invoke
from tests.reliability.test_bad_inputs import check_refusal


@dataclass
class O2ICtx:
    data: Path  # image set: canvas_32 of `extract needles --source sklearn-digits`
    run: Path  # a finished `train bagnet` run on `data`


NEEDLES = [
    "extract",
    "needles",
    "--source",
    "sklearn-digits",
    "--target",
    "3",
    "--canvas",
    "32",
    "--max-per-split",
    "16,8,8",
    "--no-progress",
]
TINY_NET = ["--rf", "9", "--width", "0.0625", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def o2i(tmp_path_factory) -> O2ICtx:
    root = tmp_path_factory.mktemp("bad_inputs_o2i")
    r = invoke(*NEEDLES, "--out", root / "sets")
    assert r.returncode == 0, r.stderr
    data = root / "sets" / "canvas_32"
    r = invoke("train", "bagnet", data, "--out", root / "run", "--epochs", "1", *TINY_NET)
    assert r.returncode == 0, r.stderr
    return O2ICtx(data, root / "run")


def copy_set(o2i: O2ICtx, tmp: Path) -> Path:
    d = tmp / "set"
    shutil.copytree(o2i.data, d)
    return d


def copy_run(o2i: O2ICtx, tmp: Path, name: str = "run") -> Path:
    d = tmp / name
    shutil.copytree(o2i.run, d, ignore=shutil.ignore_patterns("eval"))
    return d


def _needles(o2i, tmp):
    return [*NEEDLES, "--out", tmp / "out"], tmp / "out"


def _bagnet(o2i, tmp, data=None):
    return ["train", "bagnet", data or o2i.data, "--out", tmp / "out", "--epochs", "1", *TINY_NET], tmp / "out"


def _o2i(o2i, tmp, run=None, first=()):
    """`evaluate o2i` on the run directories `first` (valid runs scored before it), then `run` (default: a valid copy)."""
    d = run or copy_run(o2i, tmp)
    return ["evaluate", "o2i", *first, d, "--out", tmp / "plot" / "o2i.png", "--device", "cpu", "--n-boot", "10"], tmp / "plot"


CASES: dict[str, callable] = {}


def case(name):
    """Decorator: register a case builder under `name` in this module's CASES."""
    return lambda fn: CASES.setdefault(name, fn)


# Options out of range: (command builder, [(option, value, culprit or None for the option itself)])
OPTIONS = {
    "extract needles": (
        _needles,
        [
            ("--canvas", "8", None),
            ("--canvas", "abc", None),
            ("--target", "11", None),
            ("--duplicates", "0", None),
            ("--max-per-split", "16,8", None),
            ("--clutter-density", "-1", None),
            ("--source", "bogus", None),
            ("--idx-dir", "/no/such/idx", "/no/such/idx"),
        ],
    ),
    "train bagnet": (
        _bagnet,
        [
            ("--rf", "5", "rf"),
            ("--pooling", "bogus", "pooling"),
            ("--norm", "gn", "norm"),
            ("--width", "0", "width"),
            ("--epochs", "0", None),
            ("--accumulate", "0", None),
            ("--lr", "0", None),
            ("--max-train", "1000", None),
            ("--device", "tpu", None),
            ("--workers", "-1", None),
        ],
    ),
    "evaluate o2i": (
        _o2i,
        [
            ("--split", "bogus", None),
            ("--group-by", "colour", None),
            ("--n-boot", "0", None),
            ("--batch-size", "0", None),
            ("--data", "/no/such/set", "/no/such/set"),
        ],
    ),
}
for _cmd, (_build, _opts) in OPTIONS.items():
    for _opt, _value, _culprit in _opts:
        case(f"{_cmd}/option:{_opt} {_value}")(
            lambda o2i, tmp, b=_build, o=_opt, v=_value, c=_culprit: ([*(x := b(o2i, tmp))[0], o, v], x[1], c or o)
        )


@case("extract needles/idx:not_idx")
def _(o2i, tmp):
    idx = tmp / "idx"
    idx.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (idx / name).write_bytes(b"not an idx file at all")
    argv, out = _needles(o2i, tmp)
    argv = [a for a in argv if a not in ("--source", "sklearn-digits")]
    return [*argv, "--idx-dir", idx], out, "train-images-idx3-ubyte"


@case("extract crops/manifest:missing")
def _(o2i, tmp):
    return (
        ["extract", "crops", "--manifest", tmp / "nope.csv", "--masks", tmp, "--size", "64", "--out", tmp / "out", "--no-progress"],
        tmp / "out",
        "nope.csv",
    )


@case("train bagnet/data:not_an_image_set")
def _(o2i, tmp):
    (tmp / "empty").mkdir()
    return (*_bagnet(o2i, tmp, tmp / "empty"), "empty")


@case("train bagnet/data:missing_val")
def _(o2i, tmp):
    d = copy_set(o2i, tmp)
    (d / "val.h5").unlink()
    return (*_bagnet(o2i, tmp, d), "val.h5")


@case("train bagnet/data:truncated_train")
def _(o2i, tmp):
    d = copy_set(o2i, tmp)
    raw = (d / "train.h5").read_bytes()
    (d / "train.h5").write_bytes(raw[: len(raw) // 3])
    return (*_bagnet(o2i, tmp, d), "train.h5")


@case("train bagnet/data:one_class")
def _(o2i, tmp):
    d = copy_set(o2i, tmp)
    with h5py.File(d / "train.h5", "r+") as f:
        f["labels"][...] = 0
    return (*_bagnet(o2i, tmp, d), "train.h5")


def _point_data_elsewhere(d: Path) -> None:
    doc = json.loads((d / "config.json").read_text())
    doc["data"] = str(d.parent / "gone")
    (d / "config.json").write_text(json.dumps(doc))


# Broken copies of the finished run for `evaluate o2i`: kind → (how to break the copy, what the error names)
RUN_BREAKS = {
    "unfinished": (lambda d: (d / "summary.csv").unlink(), "summary.csv"),  # killed between checkpoint and summary
    "config_not_json": (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    "checkpoint_garbage": (lambda d: (d / "checkpoint.pt").write_bytes(b"garbage"), "checkpoint.pt"),
    "image_set_gone": (_point_data_elsewhere, "gone"),
}


def _broken_run(kind: str, second: bool):
    """The broken run alone, or (`second`) after a valid one: the refusal must come before the valid run is scored."""

    def build(o2i, tmp):
        breaker, culprit = RUN_BREAKS[kind]
        first = [copy_run(o2i, tmp, "good")] if second else []
        d = copy_run(o2i, tmp)
        breaker(d)
        return (*_o2i(o2i, tmp, d, first), culprit)

    return build


for _kind in RUN_BREAKS:
    case(f"evaluate o2i/run dir:{_kind}")(_broken_run(_kind, second=False))
    case(f"evaluate o2i/second run dir:{_kind}")(_broken_run(_kind, second=True))


@case("evaluate o2i/run dir:not_a_bagnet_run")
def _(o2i, tmp):
    (tmp / "empty").mkdir()
    return (*_o2i(o2i, tmp, tmp / "empty"), "empty")


def tree(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Every file ``(size, mtime_ns)`` and folder (None) under `folder`, by relative path."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None for p in folder.rglob("*")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_o2i_input_is_refused_in_one_line_and_writes_nothing(o2i, tmp_path, name):
    argv, out, culprit = CASES[name](o2i, tmp_path)
    assert not out.exists()
    before = tree(tmp_path)
    r = invoke(*argv)
    after = tree(tmp_path)
    problems = check_refusal(r, culprit, before, after)
    assert not problems, (
        f"{name}: {problems}, new or changed: {sorted(k for k in after if after[k] != before.get(k, 0))}\nstderr: {r.stderr}"
    )
