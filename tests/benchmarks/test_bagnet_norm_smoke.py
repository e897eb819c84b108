"""Smoke test of benchmarks/bagnet_norm.py: quick mode trains one BagNet per norm on the same needle set."""

from __future__ import annotations

from pathlib import Path

from tests.benchmarks import load_benchmark


def test_bagnet_norm_quick_trains_both_norms(tmp_path: Path) -> None:
    bench = load_benchmark("bagnet_norm")
    table = bench.main(["--quick", "--source", "sklearn-digits", "--work-dir", str(tmp_path)])
    assert list(table["norm"]) == ["in_aff", "bn"] and (table["epoch"] == 1).all()
    assert table["val_acc"].between(0, 1).all() and (table["train_images_per_s"] > 0).all()
    assert table["train_loss"].notna().all()


def test_bagnet_norm_without_fashion_mnist_fails_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """No silent fallback to digits: without the data and without --source, exit 2, one line naming the package."""
    import pytest

    bench = load_benchmark("bagnet_norm")
    monkeypatch.setattr(bench, "FASHION", tmp_path / "no-fashion-mnist")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: Fashion-MNIST not found")
    assert "no-fashion-mnist" in err[0] and "dataset-fashion-mnist" in err[0] and not (tmp_path / "w").exists()
