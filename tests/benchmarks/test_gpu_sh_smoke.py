"""Smoke test of benchmarks/gpu.sh on CPU (``--device cpu --quick``) and of the nvidia-smi parsing in gpu_util.py."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.benchmarks import REPO, load_benchmark

SCRIPT = REPO / "benchmarks" / "gpu.sh"
# one summary line per measurement: "<what>  <rate> <unit>  <GPU utilisation>"
MEASUREMENTS = {
    "extraction, encoder alone": (r"^extract \S+ \S+: encoder alone", "tiles/s"),
    "extraction, pipeline": (r"^extract \S+ \S+: pipeline", "tiles/s"),
    "BagNet training step": (r"^bagnet train step", "images/s"),
    "MIL training step": (r"^mil train step abmil", "bags/s"),
}


def _run(out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    cmd = ["bash", str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # ~30 s on 2 cores: five Python processes (extraction, BagNet and MIL steps at tiny sizes)
def test_gpu_sh_quick_on_cpu_reports_every_measurement(tmp_path: Path) -> None:
    r = _run(tmp_path / "out")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    head, summary = r.stdout.split("== summary", 1)
    assert "CPU cores:" in head and "torch " in head and "device: cpu" in head
    for step in ("env", "extract", "bagnet", "mil"):
        assert re.search(rf"^== {step}: \d+\.\d s wall$", head, re.M), step  # each step's wall time
        assert (tmp_path / "out" / f"{step}.log").is_file()
    lines = summary.splitlines()
    for name, (pattern, unit) in MEASUREMENTS.items():
        found = [ln for ln in lines if re.search(pattern, ln)]
        assert len(found) == 1, (name, summary)
        m = re.search(rf"\s([\d,]+\.\d) {re.escape(unit)}\s+n/a$", found[0])  # no nvidia-smi sampling on CPU
        assert m and float(m.group(1).replace(",", "")) > 0, (name, found[0])
    assert (tmp_path / "out" / "summary.txt").read_text() == summary.split("\n", 1)[1]


def test_gpu_sh_stops_with_the_failing_step(tmp_path: Path) -> None:
    """A step that errors ends the script with a non-zero status, names the step and prints no summary."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$2" = extract ]; then echo boom >&2; exit 3; fi\nexec "{sys.executable}" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    r = _run(tmp_path / "out", {"PYTHON": str(fake)})
    assert r.returncode != 0
    assert "error: step extract failed" in r.stderr and "boom" in r.stdout  # the step's output is tee'd to stdout
    assert "== summary" not in r.stdout and "== bagnet" not in r.stdout


def test_nvidia_smi_samples_parse_and_summarise() -> None:
    gpu_util = load_benchmark("gpu_util")
    text = "2025/01/02 03:04:05.000, 10, 1000\n2025/01/02 03:04:05.500, [N/A], 1000\n2025/01/02 03:04:06.000, 90, 3000\nbad line\n"
    samples = gpu_util.parse_samples(text)
    assert [s[1:] for s in samples] == [(10.0, 1000.0), (90.0, 3000.0)] and samples[1][0] - samples[0][0] == 1.0
    st = gpu_util.summarise(samples)
    assert st == {"mean": 50.0, "max": 90.0, "mem_max_mib": 3000.0, "n": 2}
    assert gpu_util.fmt(st) == "mean 50% / max 90%"
    t1 = samples[1][0]
    assert gpu_util.summarise(samples, [(t1 - 0.1, t1 + 0.1)])["mean"] == 90.0
    assert gpu_util.fmt(gpu_util.summarise(samples, [(0.0, 1.0)])) == "n/a"
    with gpu_util.GpuSampler(enabled=False) as s:  # CPU: nothing sampled, no nvidia-smi needed
        pass
    assert gpu_util.fmt(s.stats()) == "n/a"


def test_sampler_reads_a_looping_nvidia_smi(tmp_path: Path, monkeypatch, capsys) -> None:
    """A fake nvidia-smi on PATH that prints one timestamped sample every 0.1 s until SIGINT."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\ntrap 'exit 0' INT\nwhile :; do date '+%Y/%m/%d %H:%M:%S.%3N, 42, 1234'; sleep 0.1; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    gpu_util = load_benchmark("gpu_util")
    out = tmp_path / "stats.json"
    assert gpu_util.main(["--interval-ms", "100", "--log", str(tmp_path / "raw.csv"), "--json", str(out), "--", "sleep", "0.5"]) == 0
    st = json.loads(out.read_text())
    assert st["mean"] == st["max"] == 42.0 and st["mem_max_mib"] == 1234.0 and st["n"] >= 3 and st["returncode"] == 0
    assert "GPU utilisation mean 42% / max 42%" in capsys.readouterr().out
    with gpu_util.GpuSampler(interval_ms=100) as s:
        t0 = time.time()
        time.sleep(0.4)
        t1 = time.time()
    assert s.enabled and s.stats([(t0, t1)])["n"] >= 2  # nvidia-smi's clock and time.time() agree
    assert s.stats([(t1 + 60, t1 + 61)])["n"] == 0
