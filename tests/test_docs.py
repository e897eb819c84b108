"""The documentation: the mkdocs site builds with --strict, the library page's snippets run as pasted,
no link of README.md or docs/ points at a file (or heading) that does not exist, and README.md stays short."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 160

FENCE = re.compile(r"^([ \t]*)(```+|~~~+)[ \t]*([^\n`]*)\n(.*?)^\1\2[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def without_code(text: str) -> str:
    """The text with fenced code blocks and inline code spans blanked out: links in code are not links."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "``", text, flags=re.S)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line, code) of every ```python fence in `path`, dedented (a fence may sit inside a list item)."""
    text = path.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group(4)))
        for m in FENCE.finditer(text)
        if m.group(3).strip().split(" ")[0] in ("python", "py")
    ]


def slugify(heading: str) -> str:
    """The id Python-Markdown's toc (mkdocs) gives a heading; GitHub's agree for these pages."""
    text = unicodedata.normalize("NFKD", re.sub(r"[`*]", "", heading)).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def anchors(path: Path) -> set[str]:
    return {slugify(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    # docs/cli.md is made by running `typer mil.cli utils docs`: the typer of this environment must come first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    site = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{(r.stdout + r.stderr)[-3000:]}"
    for page in [p.relative_to(DOCS).with_suffix(".html") for p in DOCS.rglob("*.md")]:
        assert (site / page).is_file(), f"{page} was not built"
    # the generated references are not empty (mkdocs-typer2 writes nothing, silently, when typer fails)
    cli = (site / "cli.html").read_text()
    for command in ("mil extract features", "mil train features", "mil evaluate heatmap", "mil evaluate o2i", "--recipe"):
        assert command in cli, f"the CLI reference lacks {command!r}"
    api = (site / "api.html").read_text()
    for name in ("read_bag", "read_bag_attrs", "create_head", "collate_bags", "load_head", "MilError"):
        assert name in api, f"the API reference lacks {name!r}"


def test_library_snippets_run(tmp_path):
    """Every ```python block of docs/library.md runs as pasted, each in a fresh namespace, in one process."""
    blocks = python_blocks(DOCS / "library.md")
    assert blocks, "docs/library.md has no ```python block"
    script = tmp_path / "run_snippets.py"
    script.write_text(
        "import sys, traceback\n"
        f"blocks = {blocks!r}\n"
        "for line, code in blocks:\n"
        "    try:\n"
        "        exec(compile(code, f'docs/library.md:{line}', 'exec'), {'__name__': '__main__'})\n"
        "    except Exception:\n"
        "        traceback.print_exc()\n"
        "        sys.exit(f'the snippet at docs/library.md line {line} failed')\n"
    )
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_links_point_at_existing_files():
    """Relative links (and images) of README.md and docs/ name files that exist, and headings that exist;
    pages under docs/ link only inside docs/ (the site holds nothing else: repository files are code spans)."""
    bad = []
    for md in markdown_files():
        text = without_code(md.read_text())
        for m in LINK.finditer(text):
            target = m.group(1)
            where = f"{md.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: ({target})"
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: …
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.exists():
                bad.append(f"{where} no such file")
            elif md.is_relative_to(DOCS) and not dest.is_relative_to(DOCS):
                bad.append(f"{where} points outside docs/: write it as a code span")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{where} no heading with the id {anchor!r} in {dest.relative_to(ROOT)}")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, expected at most {README_MAX_LINES}: move detail into docs/"
