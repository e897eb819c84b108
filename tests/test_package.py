"""Packaging contracts: stage folders install inside `mil`, the core stays light."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_import_does_not_pull_in_heavy_or_cli_modules():
    code = (
        "import sys, mil, mil.manifest, mil.atomic, mil.errors, mil.features; "
        "bad = [m for m in ('openslide', 'typer', 'matplotlib', 'mil.extract', 'mil.cli') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_import_mil_is_lazy_and_every_public_name_resolves():
    """`import mil` imports no torch; each name of `mil.__all__` loads its module on first use."""
    code = (
        "import sys, mil; before = 'torch' in sys.modules; "
        "missing = [n for n in mil.__all__ if getattr(mil, n, None) is None]; "
        "print(before, missing, set(mil.__all__) <= set(dir(mil)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False [] True"
    import mil

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mil.nope  # noqa: B018


TORCH_AFTER = "import sys\nfrom mil.cli import main\ntry:\n    main({args!r})\nexcept SystemExit as e:\n    print('exit', e.code)\nprint('torch' in sys.modules)"


@pytest.mark.parametrize("args", [["--help"], ["extract", "--help"], ["train", "features", "--help"], ["evaluate", "--help"]])
def test_help_never_imports_torch(args):
    out = subprocess.run([sys.executable, "-c", TORCH_AFTER.format(args=args)], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False", out[-500:]


def test_extract_tiles_never_imports_torch(slide_factory, tmp_path):
    """Tiling (tissue detection, grid, thumbnails) is numpy/OpenSlide work: torch stays out of the process."""
    slide = slide_factory("startup", size=2048, mpp=0.5)
    args = ["extract", "tiles", str(slide.parent), "--out", str(tmp_path / "tiles"), "--no-progress"]
    out = subprocess.run([sys.executable, "-c", TORCH_AFTER.format(args=args)], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "False", out[-500:]
    assert len(list((tmp_path / "tiles").glob("*.h5"))) == 1


def test_editable_install_maps_stages_into_mil(tmp_path):
    """From a folder outside the checkout: mil.extract is ours, top-level `extract`/`train`/`evaluate` are not."""
    code = (
        "import importlib.util as u, mil.extract, mil.train, mil.evaluate; "
        "print(mil.extract.__file__); "
        "print([n for n in ('extract', 'train', 'evaluate') "
        f"if (s := u.find_spec(n)) is not None and str(s.origin or '').startswith({str(ROOT)!r})])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    first, second = out.strip().splitlines()
    assert Path(first) == ROOT / "extract" / "__init__.py"
    assert second == "[]"


def test_regular_install_wheel_has_only_the_mil_package(tmp_path):
    """Build a real wheel (what `pip install needle-mil` installs) and check its layout."""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("needle_mil-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"mil"}
    for module in (
        "mil/extract/cli.py",
        "mil/extract/wsi/tiles.py",
        "mil/extract/generate/synthetic.py",
        "mil/extract/moco/builder.py",
        "mil/train/__init__.py",
        "mil/evaluate/__init__.py",
    ):
        assert module in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mil = mil.cli:main" in entry


def test_cli_version_and_help():
    r = subprocess.run([sys.executable, "-m", "mil.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip()
    r = subprocess.run([sys.executable, "-m", "mil.cli", "extract", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "tiles" in r.stdout and "synthetic" in r.stdout


def test_stage_exports_encoder_registry_lazily():
    code = (
        "import sys, mil.extract, mil.extract.cli; loaded = 'timm' in sys.modules; "
        "from mil.extract import create_encoder, list_encoders; "
        "print(loaded, 'resnet50_trunc' in list_encoders(), callable(create_encoder))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]  # `mil extract tiles` does not pay for importing timm


def test_command_line_mistakes_are_one_line_with_exit_status_2():
    """Errors click finds (bad option type, unknown option or command) read like the stages' own errors."""
    from tests.conftest import invoke_mil

    for args, culprit in [
        (["train", "features", "x", "--manifest", "m", "--out", "o", "--epochs", "abc"], "--epochs"),
        (["train", "features", "x", "--manifest", "m", "--out", "o", "--bogus"], "--bogus"),
        (["bogus"], "bogus"),
    ]:
        r = invoke_mil(*args)
        assert r.returncode == 2, (args, r)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], (args, r.stderr)
    assert invoke_mil("--version").returncode == 0


def test_license_and_citation_match_pyproject():
    """LICENSE is the licence pyproject declares; CITATION.cff cites the version pyproject builds."""
    text = (ROOT / "pyproject.toml").read_text()
    license_ = re.search(r'^license = \{ text = "([^"]+)" \}', text, re.M).group(1)
    version = re.search(r'^version = "([^"]+)"', text, re.M).group(1)
    assert (ROOT / "LICENSE").read_text().splitlines()[0] == f"{license_} License"
    cff = (ROOT / "CITATION.cff").read_text()
    assert f"version: {version}\n" in cff and f"license: {license_}\n" in cff
