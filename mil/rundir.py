"""Output folders that exist already: one rule for every stage.

Each stage that writes a run directory, an image set or one file per slide decides the same way
when its output is there before it starts:

* nothing there → start;
* made with the same settings → skip what is finished (a stage that can resume continues);
* made with other settings → refused before any work, naming the first setting that differs and
  both values (`refuse_other_settings`), unless ``--overwrite``;
* ``--overwrite`` → replaced: a run directory is rebuilt in a hidden sibling folder that takes its
  place only once the new run has finished (`replacing`), so a replacement that fails or is killed
  keeps the old outputs.

Settings are the JSON-able values a stage stores beside its outputs (``config.json``, an image
set's ``meta.json``, a feature file's attrs); keys that describe how a run ran rather than what
it computes (``mil_version``, ``runtime``) are left out of the comparison. Writes are atomic
(`mil.atomic`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from mil.atomic import atomic_folder, remove_stale_temporaries
from mil.errors import SettingsMismatchError

NOT_COMPARED = ("mil_version", "runtime")  # how a run ran, not what it computes


def changed_settings(old: Mapping, new: Mapping, ignore: Iterable[str] = NOT_COMPARED) -> list[str]:
    """Keys whose values differ between `old` and `new` (either side may lack a key), in `new`'s order."""
    skip = set(ignore)
    return [k for k in dict.fromkeys([*new, *old]) if k not in skip and old.get(k) != new.get(k)]


def refuse_other_settings(
    where: str | Path, old: Mapping, new: Mapping, *, what: str = "run", ignore: Iterable[str] = NOT_COMPARED, redo: str = "replace it"
) -> None:
    """Raise `SettingsMismatchError` if `old` (found at `where`) and `new` differ in any compared setting."""
    changed = changed_settings(old, new, ignore)
    if not changed:
        return
    k, rest = changed[0], changed[1:]
    also = f"; {', '.join(map(repr, rest))} differ too" if rest else ""
    raise SettingsMismatchError(
        f"{where}: holds a {what} with a different {k!r} ({k}={_short(old.get(k))} there, {k}={_short(new.get(k))} asked for{also}); "
        f"choose another --out, or pass --overwrite to {redo}."
    )


@contextmanager
def replacing(out: str | Path) -> Iterator[Path]:
    """``--overwrite`` of a run directory: yield an empty hidden sibling of `out` to write the new run
    into; it replaces `out` when the block succeeds. On an error (or a kill) `out` is left as it was;
    a killed replacement's folder is removed by the next call.
    """
    out = Path(out)
    remove_stale_temporaries(out.parent)
    with atomic_folder(out) as tmp:
        yield tmp


def read_settings(path: str | Path, writer: str, key: str | None = None) -> dict:
    """The JSON object in `path` (its `key` entry if given), or `SettingsMismatchError` saying `writer` did not write it."""
    try:
        doc = json.loads(Path(path).read_text())
        doc = doc[key] if key is not None else doc
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except (OSError, ValueError, KeyError, TypeError):
        raise SettingsMismatchError(f"{path}: exists but was not written by {writer}; choose another --out, or pass --overwrite.") from None
    return doc


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
