"""Shared fixtures: small synthetic slides made on the fly, and a runner for the `mil` command.

Under CI (the ``CI`` environment variable set, as `.ci/run` does):
- Hypothesis runs derandomised (profile ``ci``): the same examples on every run;
- a skipped test fails the run: a skip there hides a missing dependency or data set.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

MIL = [sys.executable, "-m", "mil.cli"]
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

settings.register_profile("ci", derandomize=True, print_blob=True)
if IN_CI:
    settings.load_profile("ci")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Under CI, skips turn a passing run into a failing one (each is listed by `-ra` with its reason)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if IN_CI and skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    if IN_CI and skipped:
        terminalreporter.write_line(
            f"error: {len(skipped)} test(s) skipped under CI, which counts as a failure: install what the skip "
            "reason names (pip install -e '.[dev,workflow]', ../shared/data or $MIL_SHARED_DATA)",
            red=True,
        )


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Benchmarks run in-process by smoke tests set torch's thread count; later tests must not inherit it
    (an in-process reference run with 1 thread and a subprocess rerun with 2 differ in the last bits)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_mil(*args: str, cwd: str | Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `mil` command in a subprocess (exit codes and stderr as a user sees them)."""
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run([*MIL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def invoke_mil(*args: str) -> subprocess.CompletedProcess:
    """Run `mil` in this process (no interpreter start-up, torch already imported): same exit codes
    and streams as `run_mil`, for tests that do not need a separate process."""
    from mil.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("always")  # every run shows its warnings, as a fresh process would
        try:
            main([str(a) for a in args])
            rc = 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def ellipse_mask(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """A bool (h, w) mask holding one filled ellipse; centre and radii in mask pixels."""
    yy, xx = np.mgrid[:h, :w]
    return ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1.0


@pytest.fixture(scope="session")
def slide_factory(tmp_path_factory):
    """make(name, size=4096, mpp=0.25, fmt='tiff', tissue=None) -> path of a synthetic slide.

    `tissue` is a bool mask at 16 level-0 px per pixel; by default one centred ellipse.
    Slides are cached per argument set (the mask included) for the whole session; each set gets a
    folder of its own, so a slide's file name is always `<name>.<fmt>`.
    """
    from mil.extract.generate.slide_writer import write_slide

    root = tmp_path_factory.mktemp("slides")
    cache: dict = {}

    def make(name: str, size: int = 4096, mpp: float | None = 0.25, fmt: str = "tiff", tissue: np.ndarray | None = None):
        key = (name, size, mpp, fmt, None if tissue is None else (tissue.shape, tissue.tobytes()))
        if key in cache:
            return cache[key]
        folder = root / str(len(cache))  # one folder per argument set: same-named slides never overwrite
        folder.mkdir()
        n = size // 16
        if tissue is None:
            tissue = ellipse_mask(n, n, n * 0.5, n * 0.5, n * 0.3, n * 0.4)
        path = write_slide(folder / f"{name}.{fmt}", tissue, None, width=size, height=size, mpp=mpp, fmt=fmt, seed=1)
        cache[key] = Path(path)
        return cache[key]

    return make
