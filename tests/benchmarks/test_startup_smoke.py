"""Smoke test of benchmarks/startup.py: quick mode times `mil --help` beside `python -c pass`."""

from __future__ import annotations

from tests.benchmarks import load_benchmark


def test_startup_quick_measures_help_beside_the_bare_interpreter(capsys) -> None:
    res = load_benchmark("startup").main(["--quick"])
    assert set(res) == {"python -c pass", "mil --help", "mil extract --help", "mil extract tiles --help"}
    for name, r in res.items():
        assert 0 < r["q1"] <= r["wall_s"] <= r["q3"] and r["rss_mib"] > 0, name
    assert res["mil --help"]["imports_torch"] is False
    assert res["mil --help"]["ratio"] > 1  # the CLI does more than the bare interpreter
    assert "goal: `mil --help` median <= 0.5 s:" in capsys.readouterr().out
