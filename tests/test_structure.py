"""The layout's one rule, checked on the source: stages share only files and the `mil/` core.

`mil/` (the core) imports no stage; a stage (`extract/`, `train/`, `evaluate/`, installed as
`mil.extract` …) imports the core and itself, never another stage, and no private (`_name`) of
the core. Only `mil/cli.py`, the command's root, mounts the three stages. Imports inside
functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("extract", "train", "evaluate")


def package_of(path: Path, root: Path) -> str:
    """'core' for mil/*.py, else the stage folder's name."""
    top = path.relative_to(root).parts[0]
    return "core" if top == "mil" else top


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


def target_of(module: str) -> str | None:
    """'core', a stage's name, or None (not ours)."""
    parts = module.split(".")
    if parts[0] != "mil":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else "core"


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """What `path` (under `root`) imports against the rule, as 'file:line imports module' lines."""
    if path == root / "mil" / "cli.py":
        return []
    here, bad = package_of(path, root), []
    for line, module, names in imports(path):
        there = target_of(module)
        where = f"{path.relative_to(root)}:{line} imports {module}"
        if there is None:
            continue
        if there != here and there != "core":
            bad.append(f"{where} (the {here} package must not import the {there} stage)")
        elif there == "core" and here != "core" and any(n.startswith("_") for n in names):
            bad.append(f"{where} ({', '.join(n for n in names if n.startswith('_'))}: a private name of the core)")
    return bad


SOURCES = sorted(p for d in ("mil", *STAGES) for p in (ROOT / d).rglob("*.py"))


def test_no_stage_imports_another_stage_and_the_core_imports_none():
    assert len(SOURCES) > 40
    bad = [v for p in SOURCES for v in violations(p)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("folder", "code", "expected"),
    [
        ("evaluate", "from mil.train.loop import predict\n", "the evaluate package must not import the train stage"),
        ("mil", "def f():\n    import mil.extract.wsi.tiles\n", "the core package must not import the extract stage"),
        ("train", "from mil.features import _plain\n", "a private name of the core"),
    ],
)
def test_the_check_sees_a_violation(tmp_path, folder, code, expected):
    """The checker itself, on planted files: it must flag each kind of violation."""
    fake = tmp_path / folder / "planted.py"
    fake.parent.mkdir()
    fake.write_text(code)
    (found,) = violations(fake, root=tmp_path)
    assert expected in found
