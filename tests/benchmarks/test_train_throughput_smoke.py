"""Smoke test of benchmarks/train_throughput.py: quick mode writes a cohort and runs every mode in its own process."""

from __future__ import annotations

import math
from pathlib import Path

from tests.benchmarks import load_benchmark


def test_train_throughput_quick_has_every_mode(tmp_path: Path) -> None:
    bench = load_benchmark("train_throughput")
    work = tmp_path / "work"
    table = bench.main(["--quick", "--work-dir", str(work)])
    assert list(table["mode"]) == ["plain", "ram", "stream", "stream-small"]
    assert list(table["bags"]) == [12, 12, 12, 6]
    for col in ("epoch 1 s", "epoch s", "ms/step", "peak RSS MiB", "RSS after imports MiB"):
        assert (table[col] > 0).all(), table[col]
    assert (table["peak RSS MiB"] >= table["RSS after imports MiB"]).all()
    assert math.isnan(table["load s"][0]) and (table["load s"][1:] >= 0).all()  # plain has no load step
    ratios = table.attrs["ratios"]
    assert all(math.isfinite(v) for v in ratios.values()), ratios
    # whole-process ratios are positive; growth above the imports can be 0 MiB on a cohort this small
    assert all(v > 0 for k, v in ratios.items() if not k.startswith("RSS above imports")), ratios
    assert all(v >= 0 for k, v in ratios.items() if k.startswith("RSS above imports")), ratios
    assert (work / "cohort.json").is_file() and len(list(work.glob("*.h5"))) == 12 + 8  # a given work dir is kept
