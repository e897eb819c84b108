"""Users' habits on the command line: `--config FILE` (the workflow's YAML schema, the command line
winning), `--patch-size` for `--tile-size`, `--mag` for `--target-mpp`, choices said as choices."""

from __future__ import annotations

import h5py
import pandas as pd
import pytest
import yaml

from mil.config_file import default_map
from mil.errors import OptionError
from tests.conftest import invoke_mil


@pytest.fixture()
def cohort(tmp_path, slide_factory):
    rows = [{"slide_id": "s0", "path": slide_factory("cfg0", size=3072)}]
    p = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def _config(tmp_path, doc) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def _patch_size(path) -> int:
    with h5py.File(path) as f:
        return int(f["coords"].attrs["patch_size"])


def test_config_file_gives_defaults_and_the_command_line_wins(tmp_path, cohort):
    doc = {
        "manifest": str(cohort),
        "out": "ignored: the workflow's key",
        "tiling": {"target_mpp": 1.0, "tile_size": 64, "saturation_threshold": None},
        "features": {"encoder": "resnet18", "weights": "none", "precision": "fp32", "batch_size": 16, "workers": 0},
    }
    cfg = _config(tmp_path, doc)
    r = invoke_mil("extract", "--config", cfg, "features", "--out", tmp_path / "a", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert _patch_size(tmp_path / "a" / "s0.h5") == 64
    cfg_b = _config(tmp_path, {**doc, "features": {**doc["features"], "dtype": "float16"}})
    r = invoke_mil("extract", "--config", cfg_b, "features", "--out", tmp_path / "b", "--patch-size", "32", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert _patch_size(tmp_path / "b" / "s0.h5") == 32  # the command line beats the file
    with h5py.File(tmp_path / "b" / "s0.h5") as f:
        assert f["features"].dtype == "float16"  # the file beats the default
    bad = _config(tmp_path, {**doc, "features": {"encoder": "resnet18", "batchsize": 8}})
    r = invoke_mil("extract", "--config", bad, "features", "--out", tmp_path / "c")
    assert r.returncode == 2 and "'batchsize'" in r.stderr and "mil extract features" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_the_workflow_config_maps_onto_every_command():
    """workflow/config.yaml itself is a valid --config for the commands whose sections it has."""
    from typer.main import get_command

    from mil.cli import app

    root = get_command(app)
    for stage in ("extract", "train", "evaluate"):
        group = root.commands[stage]
        params = {name: [p.name for p in cmd.params] for name, cmd in group.commands.items()}
        dm = default_map("workflow/config.yaml", stage, params)
        if stage == "extract":
            assert dm["tiles"]["tile_size"] == 224 and dm["features"]["encoder"] == "resnet18" and "manifest" in dm["features"]
        if stage == "evaluate":
            assert dm["run"] == {"manifest": "demo_out/slides/manifest.csv", "split": "test", "n_boot": 1000, "seed": 0}


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(OptionError, match="readable YAML"):
        default_map(tmp_path / "none.yaml", "extract", {})
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(OptionError, match="mapping of options"):
        default_map(tmp_path / "list.yaml", "extract", {})


def test_mag_is_a_target_mpp_and_contradictions_are_refused(tmp_path, cohort):
    r = invoke_mil("extract", "tiles", "--manifest", cohort, "--out", tmp_path / "t", "--mag", "10", "--patch-size", "64", "--no-progress")
    assert r.returncode == 0, r.stderr
    with h5py.File(tmp_path / "t" / "s0.h5") as f:
        assert f["coords"].attrs["target_mpp"] == pytest.approx(1.0) and f["coords"].attrs["patch_size"] == 64
    r = invoke_mil("extract", "tiles", "--manifest", cohort, "--out", tmp_path / "u", "--mag", "20", "--target-mpp", "1.0")
    assert r.returncode == 2 and "--mag" in r.stderr and not (tmp_path / "u").exists()


def test_a_choice_outside_the_choices_is_said_in_house_style(tmp_path, cohort):
    r = invoke_mil("extract", "features", cohort, "--out", tmp_path / "o", "--precision", "fp8")
    assert r.returncode == 2
    assert "expected --precision to be one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8' instead." in r.stderr
