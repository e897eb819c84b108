"""Smoke test of benchmarks/reliability.py's kill section: one `kill -9` of `mil extract features`, aimed
inside the work, reported with what it interrupted and counted in the summary."""

from __future__ import annotations

from tests.benchmarks import load_benchmark


def test_reliability_kill_section_reports_what_each_kill_interrupted(capsys) -> None:
    bench = load_benchmark("reliability")
    table = bench.main(["--only", "2", "--quick", "--kill-stages", "features"])
    assert table["pass"].all(), table.to_string()
    kills = table[table["case"].str.startswith("#")]
    assert len(kills) == 1 and kills["observed"].str.startswith("interrupted work").all()
    assert kills["case"].str.contains(r"killed at .* → [01]/2 feature files", regex=True).all(), kills["case"].tolist()
    (summary,) = table.loc[table["case"] == "summary", "observed"]
    assert summary.startswith("1 of 1 kills interrupted work")
    assert "1 of 1 kills interrupted work" in capsys.readouterr().out
