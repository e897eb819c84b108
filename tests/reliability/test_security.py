"""Security: no input file gets to run code, and no slide id writes outside the output folder.

* every `torch.load` in the package passes ``weights_only=True`` (a scan of the source with
  `ast`), and nothing calls `pickle.load(s)`, `eval`/`exec`, unsafe `yaml.load`,
  `np.load(allow_pickle=True)` or a shell;
* a checkpoint, encoder weights file or `.pt` feature file whose pickle would run code is
  refused when loaded, and the code does not run;
* slide ids that would escape the output folder (``../x``, absolute ids, ids with ``/``) are
  refused by the manifest reader (and by `mil extract tiles` given a folder of slides);
* manifests and configs are read as data (CSV, JSON): shell syntax in a manifest is never run.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mil
from mil.errors import ManifestError, MilError
from mil.manifest import check_slide_id, read_manifest
from tests.reliability.cases import FAST_FEATURES, FAST_TILES, bag_cohort, good_slide, invoke, snapshot

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("mil", "extract", "train", "evaluate")


def package_sources() -> list[Path]:
    files = [p for d in PACKAGE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20, files
    return files


def _name(node: ast.AST) -> str:
    """Dotted name of a call's function (``torch.load``, ``pickle.loads``, ``eval`` …)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def unsafe_calls(path: Path) -> list[str]:
    """Calls in `path` that could run code from a file: '<file>:<line> <why>'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    torch_load_aliases = {"torch.load"}
    for node in ast.walk(tree):  # `from torch import load` (as …)
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            torch_load_aliases |= {a.asname or a.name for a in node.names if a.name == "load"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name, where = _name(node.func), f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{node.lineno}"
        if name in torch_load_aliases:
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where} torch.load without weights_only=True")
        elif name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load", "marshal.loads", "shelve.open"):
            found.append(f"{where} {name}")
        elif name in ("eval", "exec", "builtins.eval", "builtins.exec", "os.system", "os.popen"):
            found.append(f"{where} {name}")
        elif name.endswith("yaml.load") or name.endswith("yaml.unsafe_load") or name.endswith("yaml.full_load"):
            loader = _kw(node, "Loader")
            if not (loader is not None and "Safe" in _name(loader)):
                found.append(f"{where} {name} without SafeLoader")
        elif name in ("np.load", "numpy.load"):
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                found.append(f"{where} np.load with allow_pickle")
        elif name.startswith("subprocess.") or name in ("Popen",):
            shell = _kw(node, "shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                found.append(f"{where} {name} with shell=True")
    return found


def test_every_torch_load_is_weights_only_and_nothing_unpickles_or_evals():
    problems = [p for f in package_sources() for p in unsafe_calls(f)]
    assert not problems, "\n".join(problems)
    n_loads = sum(1 for f in package_sources() if "torch.load(" in f.read_text())
    assert n_loads >= 3  # the scan sees the loaders (features, checkpoints, encoder weights)


def test_the_scan_catches_what_it_should(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import torch, pickle, yaml, numpy as np\nfrom torch import load as tl\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\ntl('x')\npickle.loads(b'')\neval('1')\n"
        "yaml.load('a')\nnp.load('x', allow_pickle=True)\nimport subprocess\nsubprocess.run('ls', shell=True)\n"
        "torch.load('x', weights_only=True)\nyaml.load('a', Loader=yaml.SafeLoader)\n"
    )
    found = unsafe_calls(bad)
    assert len(found) == 8, found


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def marker(tmp_path):
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "code from an input file was executed"


def test_checkpoint_with_code_is_refused_by_loading(tmp_path, marker):
    from mil.checkpoint import load_bagnet, load_head
    from mil.errors import RunError

    p = tmp_path / "evil.pt"
    torch.save({"head": "abmil", "in_dim": 4, "head_kwargs": {}, "state_dict": Evil(marker)}, p)
    with pytest.raises(RunError, match="could run code"):
        load_head(p)
    with pytest.raises(RunError, match="could run code"):
        load_bagnet(p)
    p.write_bytes(pickle.dumps(Evil(marker)))  # a bare pickle, not even a torch file
    with pytest.raises(RunError):
        load_head(p)


def test_feature_file_with_code_is_refused(tmp_path, marker):
    p = tmp_path / "bag.pt"
    torch.save({"features": torch.zeros(3, 4), "extra": Evil(marker)}, p)
    with pytest.raises(mil.FeatureFileError, match="could run code"):
        mil.read_bag(p)
    with pytest.raises(mil.FeatureFileError):
        mil.read_bag_attrs(p)


def test_encoder_weights_with_code_are_refused(tmp_path, marker):
    from mil.extract.wsi.encoders import create_encoder

    p = tmp_path / "weights.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "evil": Evil(marker)}, p)
    with pytest.raises(MilError, match="weights.pth"):
        create_encoder("resnet18", weights=str(p), precision="fp32", device="cpu")


@pytest.mark.parametrize(
    "sid",
    [
        "../x",
        "..",
        "a/b",
        "/abs/x",
        "/",
        ".hidden",
        "x/../../y",
        "a\\b",
        "",
        " ",
        "a b",
        "~user",
        "x\x00y",
        "é",
        "a" * 201,
        "$(touch PWNED)",
        "x;rm -rf y",
    ],
)
def test_unsafe_slide_ids_are_refused(sid):
    with pytest.raises(ManifestError, match="filename-safe"):
        check_slide_id(sid)


def test_manifest_refuses_escaping_ids_naming_the_line(tmp_path):
    (tmp_path / "s.tiff").write_bytes(b"x")
    for sid in ("../outside", "/etc/passwd", "sub/dir"):
        m = tmp_path / "m.csv"
        pd.DataFrame({"slide_id": ["ok", sid], "path": ["s.tiff", "s.tiff"]}).to_csv(m, index=False)
        with pytest.raises(ManifestError, match=rf"m.csv line 3: .*{sid!r}"):
            read_manifest(m)


def test_no_output_escapes_the_out_folder(tmp_path):
    """End to end: a manifest with an escaping id writes nothing anywhere (the parent folder is unchanged)."""
    slide = good_slide(tmp_path / "slides" / "s.tiff")
    m = tmp_path / "slides" / "m.csv"
    pd.DataFrame({"slide_id": ["../../escaped"], "path": [slide.name]}).to_csv(m, index=False)
    before = snapshot(tmp_path)
    for cmd in (
        ["extract", "tiles", m, "--out", tmp_path / "a" / "out", *FAST_TILES],
        ["extract", "features", m, "--out", tmp_path / "a" / "out", *FAST_FEATURES],
    ):
        r = invoke(*cmd)
        assert r.returncode == 2 and "'../../escaped'" in r.stderr
    assert snapshot(tmp_path) == before and not list(tmp_path.rglob("escaped*"))


def test_manifest_and_config_are_data_not_code(tmp_path, marker):
    """Shell syntax in a manifest's paths is never run (it is a missing file); a run's config.json
    is parsed as JSON (a YAML/pickle payload is just an unreadable config)."""
    m = tmp_path / "m.csv"
    pd.DataFrame({"slide_id": ["a"], "path": [f"$(touch {marker}).tiff"]}).to_csv(m, index=False)
    r = invoke("extract", "tiles", m, "--out", tmp_path / "out", *FAST_TILES)
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "out").exists()

    bags = bag_cohort(tmp_path / "bags", n=24)
    r = invoke("train", "features", bags.parent, "--manifest", bags, "--out", tmp_path / "run", "--epochs", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    for payload in (f"!!python/object/apply:os.system ['touch {marker}']", pickle.dumps(Evil(marker)).decode("latin-1")):
        (tmp_path / "run" / "config.json").write_text(payload, encoding="latin-1")
        r = invoke("evaluate", "run", tmp_path / "run", "--n-boot", "10")
        assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_feature_values_in_a_manifest_path_column_are_not_interpreted(tmp_path):
    """A manifest is read with every column as a string: nothing is evaluated, numbers stay text."""
    m = tmp_path / "m.csv"
    (tmp_path / "1e3.tiff").write_bytes(b"x")
    pd.DataFrame({"slide_id": ["0x10"], "path": ["1e3.tiff"], "label": ["1"]}).to_csv(m, index=False)
    df = read_manifest(m)
    assert df["slide_id"][0] == "0x10" and df["path"][0].endswith("1e3.tiff") and int(df["label"][0]) == 1
    assert np.isnan(df["mpp"][0])
