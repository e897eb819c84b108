"""Write-then-rename, so a file that exists under its final name is always whole.

A killed process leaves at most a hidden ``.<name>.tmp-<pid>`` file beside the target; the
stages delete such leftovers (`remove_stale_temporaries`) when they next run in that folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARKER = ".tmp-"


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the
    exception propagates; `final` is untouched.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}{TMP_MARKER}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, doc) -> None:
    """Write `doc` as indented JSON (one trailing newline) to `path` atomically."""
    write_text(path, json.dumps(doc, indent=2) + "\n")


@contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block succeeds, it replaces `final`.

    Readers see the old folder or the new one, whole, never a mix; on any exception the temporary
    folder is removed and `final` is untouched. Leftovers of a killed writer are hidden
    ``.<name>.tmp-<pid>`` folders that `remove_stale_temporaries` deletes.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}{TMP_MARKER}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_csv(path: str | Path, df) -> None:
    """Write a pandas DataFrame to `path` as CSV (no index) atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files (or folders) left in `folder` by killed runs; return what was removed.

    Only files whose writer process is gone are removed, so two runs sharing a folder do not
    delete each other's work in progress.
    """
    removed = []
    for p in Path(folder).glob(f".*{TMP_MARKER}*"):
        pid = p.name.rsplit(TMP_MARKER, 1)[-1]
        if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
            continue
        if p.is_dir() and not p.is_symlink():  # a temporary folder (e.g. `mil evaluate run`'s eval/.<split>.tmp-<pid>)
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
