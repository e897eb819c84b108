"""GPU utilisation and memory sampled with nvidia-smi while a block of code or a command runs.

    python benchmarks/gpu_util.py [--interval-ms 500] [--log FILE] [--json FILE] -- COMMAND [ARGS...]

`GpuSampler` runs ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits
-lms 500`` in the background on one GPU (the first entry of ``CUDA_VISIBLE_DEVICES``, else index 0), line-buffered
with ``stdbuf -oL`` where available and stopped with SIGINT, and parses its samples when stopped;
`GpuSampler.stats` gives the mean and max utilisation (%) and the max memory used (MiB) over the whole run
or over time windows (e.g. only the rounds of one phase). nvidia-smi's utilisation is the share of each
sample period in which any kernel ran, not how full the SMs were.
Without nvidia-smi, or when it prints nothing usable, every statistic is None ("n/a"). The command
line form runs COMMAND under the sampler, prints one line of statistics and exits with its status.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

QUERY = "timestamp,utilization.gpu,memory.used"


def gpu_id() -> str:
    """The GPU to sample: the first of ``CUDA_VISIBLE_DEVICES`` (an index or UUID, as nvidia-smi -i takes), else 0."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return first or "0"


def parse_samples(text: str) -> list[tuple[float, float, float]]:
    """``(unix time, utilisation %, memory MiB)`` per line of nvidia-smi's csv; lines with N/A fields are skipped."""
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # nvidia-smi prints local time
            rows.append((t, float(parts[1]), float(parts[2])))
        except ValueError:
            continue
    return rows


def summarise(samples: list[tuple[float, float, float]], windows: list[tuple[float, float]] | None = None) -> dict:
    """``{"mean", "max", "mem_max_mib", "n"}`` of the samples inside `windows` (unix-time intervals; None = all)."""
    if windows is not None:
        samples = [s for s in samples if any(a <= s[0] <= b for a, b in windows)]
    if not samples:
        return {"mean": None, "max": None, "mem_max_mib": None, "n": 0}
    util = [s[1] for s in samples]
    return {"mean": sum(util) / len(util), "max": max(util), "mem_max_mib": max(s[2] for s in samples), "n": len(util)}


def fmt(stats: dict | None) -> str:
    """``"mean 87% / max 100%"``, or ``"n/a"`` when nothing was sampled."""
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"mean {stats['mean']:.0f}% / max {stats['max']:.0f}%"


class GpuSampler:
    """Context manager sampling one GPU every `interval_ms` ms; ``enabled=False`` (e.g. on CPU) samples nothing.

    ``with GpuSampler(log=out / "gpu.csv") as s: ...`` then ``s.stats()`` or ``s.stats([(t0, t1), ...])``
    with ``time.time()`` stamps taken inside the block.
    """

    def __init__(self, log: str | Path | None = None, interval_ms: int = 500, enabled: bool = True) -> None:
        self.log, self.interval_ms = log, interval_ms
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, float, float]] = []
        self._proc = self._file = None

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self._file = open(self.log, "w+") if self.log else tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in __exit__)
            cmd = ["nvidia-smi", "-i", gpu_id(), f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)]
            line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []  # every sample reaches the file as it is taken
            self._proc = subprocess.Popen(line_buffered + cmd, stdout=self._file, stderr=subprocess.DEVNULL)
            time.sleep(min(self.interval_ms, 500) / 1000)  # let the first sample land before the work starts
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            time.sleep(self.interval_ms / 1000)  # one more sample covering the end of the block
            for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):  # Ctrl+C ends nvidia-smi's loop cleanly
                self._proc.send_signal(stop)
                try:
                    self._proc.wait(timeout=3)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self._file.seek(0)
            self.samples = parse_samples(self._file.read())
            self._file.close()
            self._proc = None

    def stats(self, windows: list[tuple[float, float]] | None = None) -> dict:
        return summarise(self.samples, windows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: gpu_util.py [--interval-ms 500] [--log FILE] [--json FILE] -- COMMAND [ARGS...]")
    k = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval-ms", type=int, default=500)
    ap.add_argument("--log", default=None, help="keep nvidia-smi's raw csv here")
    ap.add_argument("--json", default=None, help="write the statistics here")
    a = ap.parse_args(argv[:k])
    t0 = time.perf_counter()
    with GpuSampler(a.log, a.interval_ms) as s:
        rc = subprocess.call(argv[k + 1 :])
    st = {**s.stats(), "seconds": time.perf_counter() - t0, "returncode": rc}
    mem = f", memory max {st['mem_max_mib']:,.0f} MiB" if st["mem_max_mib"] is not None else ""
    print(f"GPU utilisation {fmt(st)}{mem} over {st['seconds']:.1f} s ({st['n']} samples)")
    if a.json:
        Path(a.json).write_text(json.dumps(st))
    return rc


if __name__ == "__main__":
    sys.exit(main())
