"""The Snakemake workflow (workflow/Snakefile): the whole pipeline on a small synthetic cohort.

Snakemake is optional (`pip install needle-mil[workflow]`): without it this module is skipped.
It runs as `snakemake` from this interpreter's bin folder, in a subprocess, as a user runs it.
The end-to-end tests share one run of the pipeline (module fixture) and, in file order, check
its outputs, that nothing is left to do afterwards (for Snakemake and for the stages' own
skip logic), and that deleting one slide's feature file re-makes that slide only.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest

pytest.importorskip("snakemake", reason="the workflow extra is not installed: pip install needle-mil[workflow]")

from tests.conftest import invoke_mil  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
BIN = Path(sys.executable).parent  # not resolved: a venv's python is a link out of the venv
SNAKEMAKE = BIN / "snakemake"
MIL = BIN / "mil"
if not SNAKEMAKE.exists() or not MIL.exists():
    pytest.skip(f"expected the snakemake and mil commands in {BIN}", allow_module_level=True)

N_SLIDES = 6
SLIDES = [f"synth_{i:03d}" for i in range(N_SLIDES)]
RUNS = ["abmil", "meanpool"]
CONFIG = {
    "manifest": "slides/manifest.csv",
    "out": "results",
    "mil": str(MIL),
    "tiling": {"target_mpp": 0.5, "tile_size": 224},
    "features": {
        "encoder": "resnet18",
        "weights": "none",
        "precision": "fp32",
        "dtype": "float32",
        "device": "cpu",
        "batch_size": 16,
        "workers": 0,
    },
    "threads": {"tiles": 1, "features": 1, "train": 1, "evaluate": 1},
    "fold_sets": {"split": ""},
    # 4 training slides (2 + 2): half of them carved out for validation
    "training": {name: f"--head {name} --epochs 2 --patience 2 --val-fraction 0.5 --seed 0" for name in RUNS},
    "evaluate": {"split": "test", "n_boot": 20, "seed": 0},
    "compare": [RUNS],
    "compare_options": {"n_boot": 20, "seed": 0},
}


def write_config(path: Path, **changes) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({**CONFIG, **changes}, sort_keys=False))
    return path


def snakemake(workdir: Path, *args: str, config: str = "config.yaml", check: bool = True) -> subprocess.CompletedProcess:
    """`snakemake -s workflow/Snakefile --directory WORKDIR --configfile WORKDIR/config ARGS`."""
    cmd = [str(SNAKEMAKE), "-s", str(SNAKEFILE), "--directory", str(workdir), "--configfile", str(workdir / config), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, COLUMNS="200", NO_COLOR="1"))
    if check and res.returncode != 0:
        logs = (
            "".join(
                f"\n--- {p.relative_to(workdir)}\n{p.read_text()[-2000:]}" for p in sorted((workdir / "results" / "logs").rglob("*.log"))
            )
            if (workdir / "results" / "logs").exists()
            else ""
        )
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}{logs}")
    return res


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> number of jobs (total left out)."""
    _, _, table = dry_run_output.partition("Job stats:")
    counts = {}
    for line in table.splitlines()[3:]:
        m = re.fullmatch(r"\s*(\w+)\s+(\d+)\s*", line)
        if not m or m[1] == "total":
            break
        counts[m[1]] = int(m[2])
    return counts


def job_blocks(dry_run_output: str, rule: str) -> list[str]:
    """The text of each job of `rule` in a dry run's job listing."""
    return re.findall(rf"^(?:local)?rule {rule}:\n((?:[ \t]+.*\n)+)", dry_run_output, flags=re.M)


def nothing_to_do(res: subprocess.CompletedProcess) -> bool:
    return "Nothing to be done" in res.stdout + res.stderr


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A working folder: slides/ (what `mil extract synthetic` makes: 6 slides of 2048² px) and config.yaml."""
    from mil.extract.generate.synthetic import make_cohort

    wd = tmp_path_factory.mktemp("workflow")
    make_cohort(wd / "slides", n_slides=N_SLIDES, size=2048, seed=0, lesion_fraction=0.1)
    write_config(wd / "config.yaml")
    return wd


@pytest.fixture(scope="module")
def plan_only(tmp_path_factory) -> Path:
    """Like `cohort`, with empty slide files: enough for dry runs, which open no slide."""
    wd = tmp_path_factory.mktemp("workflow_plan")
    (wd / "slides").mkdir()
    rows = ["slide_id,path,label,split,patient_id"]
    for i, sid in enumerate(SLIDES):
        (wd / "slides" / f"{sid}.tiff").touch()
        rows.append(f"{sid},{sid}.tiff,{i % 2},{'test' if i < 2 else 'train'},{sid}")
    (wd / "slides" / "manifest.csv").write_text("\n".join(rows) + "\n")
    write_config(wd / "config.yaml")
    return wd


@pytest.fixture(scope="module")
def first_run(cohort) -> Path:
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    snakemake(cohort, "-c2")
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    print(f"\nfirst run of the workflow: {time.perf_counter() - t0:.1f} s wall, {cpu_s:.1f} s CPU")
    return cohort


# ---------------------------------------------------------------- no pipeline run (fast)
def test_slurm_profile_dry_run_gives_features_a_gpu(plan_only):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    # Every job is pending. -c 64: a dry run caps threads at its --cores. No sbatch needed.
    res = snakemake(plan_only, "-n", "-c", "64", "--profile", str(PROFILE))
    out = res.stdout + res.stderr
    assert job_counts(out) == {"tiles": N_SLIDES, "features": N_SLIDES, "train": 2, "evaluate": 2, "compare": 1, "all": 1}
    features = job_blocks(out, "features")
    assert len(features) == N_SLIDES
    for block in features:
        resources = re.search(r"resources: (.*)", block)[1]
        assert "slurm_partition=gpu" in resources and "gpu=1" in resources and "mem_mb=32000" in resources, resources
    for block in job_blocks(out, "tiles"):
        assert "gpu" not in re.search(r"resources: (.*)", block)[1]
    # the profile's set-threads reach the jobs (--cpus-per-task, and the threads each command uses)
    assert out.count("export OMP_NUM_THREADS=9 ") == N_SLIDES
    assert out.count("export OMP_NUM_THREADS=4 ") == 2  # train
    assert not (plan_only / "results").exists()


def test_finetune_rounds_plan_encoder_then_every_slide_then_the_run_per_round(plan_only):
    write_config(plan_only / "finetune.yaml", finetune={"from": "abmil", "rounds": 2, "options": "--epochs 1"})
    res = snakemake(plan_only, "-n", "-c2", "-p", config="finetune.yaml")
    out = res.stdout + res.stderr
    counts = job_counts(out)
    assert {k: counts[k] for k in ("finetune_encoder", "finetune_features", "finetune_train")} == {
        "finetune_encoder": 2,
        "finetune_features": 2 * N_SLIDES,
        "finetune_train": 2,
    }
    enc = sorted(job_blocks(out, "finetune_encoder"), key=lambda b: "round_2" in b)
    # round 1 learns from round 0's run and features.weights; round 2 from both runs and round 1's encoder
    assert "runs/split/abmil/summary.csv" in enc[0] and "--weights none" in out and "--round 1 --rounds 2" in out
    assert "finetune/round_1/run/summary.csv" in enc[1] and "finetune/round_1/encoder/encoder.pt" in enc[1]
    assert "--run results/runs/split/abmil --run results/finetune/round_1/run" in out
    assert not (plan_only / "results").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"finetune": {"from": "nope"}}, "config finetune: expected a mapping with 'from: <a training configuration>'"),
        ({"manifest": "missing.csv"}, "config manifest: expected a manifest CSV file, got 'missing.csv' which does not exist"),
        ({"compare": [["abmil", "nope"]]}, "['nope'] not among the training configurations"),
        ({"training": {"../x": "--head abmil"}}, "expected a filename-safe name"),
        ({"out": "../elsewhere"}, "expected a folder inside the working directory"),
    ],
)
def test_config_mistakes_are_named_before_any_job(plan_only, changes, message):
    write_config(plan_only / "bad.yaml", **changes)
    res = snakemake(plan_only, "-n", "-c1", config="bad.yaml", check=False)
    assert res.returncode != 0
    assert message in res.stdout + res.stderr


# ---------------------------------------------------------------- the pipeline, end to end
slow = pytest.mark.slow  # the first run alone is 6 × 2 per-slide `mil` processes (each imports torch)


@slow
def test_outputs_are_the_stages_own_layouts(first_run):
    res = first_run / "results"
    for sid in SLIDES:
        with h5py.File(res / "tiles" / f"{sid}.h5", "r") as f:
            assert f["coords"].shape[1] == 2 and f.attrs["slide_id"] == sid
        assert (res / "tiles" / "thumbnails" / f"{sid}.png").stat().st_size > 0
        with h5py.File(res / "features" / f"{sid}.h5", "r") as f:
            assert f["features"].shape == (f["coords"].shape[0], 512) and f.attrs["encoder"] == "resnet18"
    # per-slide jobs work in private shadow folders: only the slides' files land in the shared folders
    assert sorted(p.name for p in (res / "features").iterdir()) == sorted(f"{sid}.h5" for sid in SLIDES)
    for name in RUNS:
        run = res / "runs" / "split" / name
        assert json.loads((run / "config.json").read_text())["train"]["head"] == name
        assert list(pd.read_csv(run / "summary.csv")["fold"].astype(str)) == ["split"]
        assert (run / "checkpoints" / "split.pt").exists()
        metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
        assert metrics["split"] == "test" and metrics["n_slides"] == 2
        assert (run / "eval" / "test" / "roc.png").exists()
    table = (res / "compare" / "split" / "abmil_vs_meanpool.txt").read_text()
    assert "results/runs/split/meanpool" in table and "ΔAUC" in table
    assert (res / "logs" / "features" / "synth_000.log").exists()


@slow
def test_second_run_has_nothing_to_do_and_the_stages_agree(first_run, monkeypatch):
    assert nothing_to_do(snakemake(first_run, "-n", "-c2"))
    # Running with other thread counts (locally with more cores, or the SLURM profile) is not a change.
    assert nothing_to_do(snakemake(first_run, "-n", "-c8", "--set-threads", "features=4", "train=3"))

    # The stages' own skip logic agrees: the same commands by hand find every slide and run done.
    res = first_run / "results"
    before = {p: p.stat().st_mtime_ns for p in res.rglob("*") if p.is_file()}
    monkeypatch.chdir(first_run)
    tiling = ["--target-mpp", "0.5", "--tile-size", "224"]
    r = invoke_mil("extract", "tiles", "slides/manifest.csv", "--out", "results/tiles", *tiling, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert set(pd.read_csv(res / "tiles" / "extract_report.csv")["status"]) == {"skipped"}
    r = invoke_mil(
        "extract",
        "features",
        "slides/manifest.csv",
        "--out",
        "results/features",
        "--coords-dir",
        "results/tiles",
        *tiling,
        "--encoder",
        "resnet18",
        "--weights",
        "none",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert set(pd.read_csv(res / "features" / "extract_report.csv")["status"]) == {"skipped"}
    r = invoke_mil(
        "train",
        "features",
        "results/features",
        "--manifest",
        "slides/manifest.csv",
        "--out",
        "results/runs/split/abmil",
        *CONFIG["training"]["abmil"].split(),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing was re-made
    assert nothing_to_do(snakemake(first_run, "-n", "-c2"))


@slow
def test_deleting_a_runs_summary_plans_to_retrain_that_run_only(first_run, tmp_path):
    summary = first_run / "results" / "runs" / "split" / "meanpool" / "summary.csv"
    shutil.copy2(summary, tmp_path / "summary.csv")
    summary.unlink()
    try:
        dry = snakemake(first_run, "-n", "-c2")
        out = dry.stdout + dry.stderr
        assert job_counts(out) == {"train": 1, "evaluate": 1, "compare": 1, "all": 1}
        assert [re.search(r"wildcards: (.*)", b)[1] for b in job_blocks(out, "train")] == ["fold_set=split, name=meanpool"]
    finally:
        shutil.copy2(tmp_path / "summary.csv", summary)  # mtime kept: the run is up to date again
    assert nothing_to_do(snakemake(first_run, "-n", "-c2"))


@slow
def test_deleting_one_feature_file_reruns_that_slide_and_what_depends_on_it(first_run):
    res = first_run / "results"
    slide_files = {p: p.stat().st_mtime_ns for d in ("tiles", "features") for p in (res / d).glob("*.h5")}
    downstream = [res / "runs" / "split" / n / f for n in RUNS for f in ("summary.csv", "eval/test/metrics.json")]
    downstream.append(res / "compare" / "split" / "abmil_vs_meanpool.txt")
    downstream_before = {p: p.stat().st_mtime_ns for p in downstream}
    gone = res / "features" / "synth_003.h5"
    gone.unlink()

    dry = snakemake(first_run, "-n", "-c2")
    out = dry.stdout + dry.stderr
    assert job_counts(out) == {"features": 1, "train": 2, "evaluate": 2, "compare": 1, "all": 1}
    assert [re.search(r"wildcards: slide=(\S+)", b)[1] for b in job_blocks(out, "features")] == ["synth_003"]

    snakemake(first_run, "-c2")
    assert gone.exists()
    for p, mtime in slide_files.items():
        if p != gone:
            assert p.stat().st_mtime_ns == mtime, f"{p} was re-made"
    for p, mtime in downstream_before.items():
        assert p.stat().st_mtime_ns > mtime, f"{p} was not re-made"
    assert nothing_to_do(snakemake(first_run, "-n", "-c2"))
