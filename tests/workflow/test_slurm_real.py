"""The workflow's SLURM profile against a real single-node SLURM (tests/workflow/slurm_cluster.py).

The test suite's demo cohort (tests/workflow/test_snakemake.py: 6 synthetic slides, resnet18 with
random weights on the CPU, two trainings of 2 epochs) goes through
`snakemake --profile workflow/profiles/slurm`, unchanged, so that tiles → features → train →
evaluate each run as `sbatch` jobs of snakemake-executor-plugin-slurm; `compare` and `all` are
local rules. The node claims 16 CPUs, 64 GB and a GPU (count only) so that the profile's requests
(features: `-p gpu --gpus=1 --cpus-per-task=9 --mem=32000`) are accepted as written; the test
config runs the encoder on the CPU. Two command-line settings differ from a real cluster: this
cluster has no accounting database, so job states come from `squeue` (`--slurm-status-command
squeue`; the profile leaves the plugin's default, `sacct`), and the first status check comes after
5 s rather than 40 s.

Needs root and Debian's slurm-wlm + munge (`make test-slurm` installs them and runs this file).
Where SLURM cannot run, the test fails with one line saying why: it is never skipped.
Marked `slurm` (kept out of the default run) and `slow`.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.workflow import slurm_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SLURM_RULES = {"tiles": 6, "features": 6, "train": 2, "evaluate": 2}  # one sbatch job each


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node SLURM; fails (not skips) with one line where it cannot start."""
    missing = [m for m in ("snakemake", "snakemake_executor_plugin_slurm") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: pip install -e '.[workflow]'", pytrace=False)
    t0 = time.perf_counter()
    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.SlurmUnavailable as e:
        pytest.fail(f"SLURM cannot run on this machine: {e}", pytrace=False)
    print(f"\nsingle-node SLURM up in {time.perf_counter() - t0:.1f} s")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from mil.extract.generate.synthetic import make_cohort
    from tests.workflow.test_snakemake import N_SLIDES, write_config

    wd = tmp_path_factory.mktemp("workflow_slurm")
    make_cohort(wd / "slides", n_slides=N_SLIDES, size=2048, seed=0, lesion_fraction=0.1)
    write_config(wd / "config.yaml")
    return wd


@pytest.mark.timeout(1800)
def test_demo_cohort_runs_through_the_slurm_profile_as_slurm_jobs(slurm, cohort):
    from tests.workflow.test_snakemake import RUNS, SLIDES

    cmd = [
        str(BIN / "snakemake"),
        "-s",
        str(ROOT / "workflow" / "Snakefile"),
        "--directory",
        str(cohort),
        "--configfile",
        str(cohort / "config.yaml"),
        "--profile",
        str(ROOT / "workflow" / "profiles" / "slurm"),
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "5",
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cohort, capture_output=True, text=True, timeout=1700, env=dict(slurm.env, COLUMNS="200", NO_COLOR="1"))
    wall = time.perf_counter() - t0
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} exited {res.returncode}\n{out[-6000:]}\nslurmctld: {slurm.log_tail('slurmctld', 10)}"
    print(f"\nthe demo cohort through the SLURM profile: {wall:.1f} s wall, {len(slurm.jobs())} SLURM jobs")

    # Every job of the four stages ran as its own SLURM job (the plugin names the rule in the job's
    # comment), with the profile's partition, CPUs, memory and GPU, and SLURM says it completed.
    ran = {}
    for job in slurm.jobs():
        rule = re.match(r"rule_([a-z]+)", job.get("Comment", ""))
        assert rule, f"a SLURM job without the plugin's comment: {job}"
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        ran.setdefault(rule[1], []).append(job)
    assert {rule: len(js) for rule, js in ran.items()} == SLURM_RULES
    expected = {  # rule: (partition, cpus, memory, GPU) as workflow/profiles/slurm/config.yaml asks
        "tiles": ("cpu", "1", "4000M", None),
        "features": ("gpu", "9", "32000M", "gres:gpu:1"),
        "train": ("cpu", "4", "32000M", None),
        "evaluate": ("cpu", "2", "8000M", None),
    }
    for rule, js in ran.items():
        for job in js:
            got = (job["Partition"], job["NumCPUs"], job["MinMemoryNode"], job.get("TresPerJob"))
            assert got == expected[rule], (rule, job)
    assert len(slurm.completed_jobs()) == sum(SLURM_RULES.values())

    # The same outputs as a local run.
    results = cohort / "results"
    for sid in SLIDES:
        assert (results / "tiles" / f"{sid}.h5").exists() and (results / "features" / f"{sid}.h5").exists()
    for name in RUNS:
        run = results / "runs" / "split" / name
        assert (run / "summary.csv").exists() and (run / "eval" / "test" / "metrics.json").exists()
    assert "ΔAUC" in (results / "compare" / "split" / "abmil_vs_meanpool.txt").read_text()

    # And a second run through SLURM has nothing to do.
    again = subprocess.run([*cmd, "-n"], cwd=cohort, capture_output=True, text=True, timeout=300, env=slurm.env)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout + again.stderr
