"""``mil extract|train|evaluate --config FILE``: command options from a YAML file, the command line winning.

The file has the Snakemake workflow's schema (`workflow/config.yaml`), so one file drives both:

==================  ===============================================================================
key                 given to
==================  ===============================================================================
``manifest``        every command with a ``--manifest`` option
``slides_root``     every command with a ``--slides-root`` option
``tiling:``         ``extract tiles``, ``extract features``, ``extract moco`` (the tiling options)
``features:``       ``extract features``
``moco:``           ``extract moco``
``train:``          ``train features`` (a mapping of its options, e.g. ``{head: abmil, epochs: 40}``)
``bagnet:``         ``train bagnet``
``evaluate:``       ``evaluate run``
``predict:``        ``evaluate predict``
``heatmap:``        ``evaluate heatmap``
==================  ===============================================================================

Option names are written with ``_`` for ``-`` (``tile_size: 224``); ``null`` leaves an option at
its default. The workflow's other keys (``out``, ``threads``, ``training``, ``compare`` …) are
for the workflow and are not read here; a key inside a section that is not an option of its
command is an error naming the file, the key and the command. Values become click's
``default_map``: an option given on the command line overrides the file.
"""

from __future__ import annotations

from pathlib import Path

from mil.errors import OptionError

TOP_LEVEL = ("manifest", "slides_root")
SECTIONS = {  # (stage, command) -> the sections it reads, in order (a later one wins)
    ("extract", "tiles"): ("tiling",),
    ("extract", "features"): ("tiling", "features"),
    ("extract", "moco"): ("tiling", "moco"),
    ("train", "features"): ("train",),
    ("train", "bagnet"): ("bagnet",),
    ("evaluate", "run"): ("evaluate",),
    ("evaluate", "predict"): ("predict",),
    ("evaluate", "heatmap"): ("heatmap",),
}


def read_config(path: str | Path) -> dict:
    """The YAML mapping in `path`; `OptionError` (one line) if it is missing or not a mapping."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise OptionError(f"expected --config to be a readable YAML file, got {str(path)!r} ({e.strerror}).") from None
    except yaml.YAMLError as e:
        raise OptionError(f"{path}: expected YAML, could not parse it: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict):
        raise OptionError(f"{path}: expected a mapping of options (the workflow's config.yaml schema), got {type(doc).__name__} instead.")
    return doc


def default_map(path: str | Path, stage: str, commands: dict[str, list[str]]) -> dict[str, dict]:
    """Click's ``default_map`` for the commands of `stage` (``{command: [option names]}``) from the file at `path`."""
    doc = read_config(path)
    out: dict[str, dict] = {}
    for command, params in commands.items():
        values = {k: doc[k] for k in TOP_LEVEL if k in params and doc.get(k) is not None}
        for section in SECTIONS.get((stage, command), ()):
            options = doc.get(section) or {}
            if not isinstance(options, dict):
                raise OptionError(f"{path}: expected '{section}:' to be a mapping of options, got {type(options).__name__} instead.")
            unknown = [k for k in options if k not in params]
            if unknown:
                raise OptionError(
                    f"{path}: expected options of `mil {stage} {command}` under '{section}:', got {unknown[0]!r}; "
                    f"see `mil {stage} {command} --help` (write - as _)."
                )
            values |= {k: v for k, v in options.items() if v is not None}
        if values:
            out[command] = values
    return out
