"""`mil evaluate heatmap --slides test|all|ID…`: a cohort's heatmaps in one process, tile scores others can open.

For each slide, in the output folder (default RUN_DIR/heatmaps/):

    <slide_id>.png        the figure of `mil.evaluate.heatmap` (its settings and probability in a PNG text chunk)
    <slide_id>.csv        one row per tile: x, y, width, height (level-0 px), attention (heads with it), instance_score
    <slide_id>.geojson    the same tiles as a GeoJSON FeatureCollection of Polygons in level-0 px, each a QuPath
                          detection (``properties: {objectType: detection, measurements: {score: value}}``)
    <slide_id>.thumb.jpg  the painted thumbnail, small, for the index
    index.html            every selected slide: thumbnail, id, label, probability, links to its files

Each file is written to a temporary name and renamed (`mil.atomic`); the PNG goes last and marks a
slide as done: a rerun with the same settings skips it. A slide that fails (missing slide file,
features made on another slide) is reported on one line and the others go on.

Where a slide file is: the manifest's path (``--manifest``) when it lists the slide, else the
``slide_path`` its feature file records (`mil extract tiles` writes it). ``--slides-root DIR``
re-roots moved data: relative paths start from DIR, and an absolute path that no longer exists is
looked for by its file name under DIR.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mil.errors import MilError, OptionError, SettingsMismatchError, SlideError
from mil.evaluate.heatmap import Heatmap, _pick_fold, check_options, draw_heatmap, heatmap_of
from mil.features import FEATURE_SUFFIXES

THUMB_PX = 256  # longest side of the index thumbnails
OUTPUTS = {"png": ".png", "csv": ".csv", "geojson": ".geojson", "thumb": ".thumb.jpg"}
REPORT_COLUMNS = ["slide_id", "status", "label", "probability", "fold", "held_out", "n_tiles", "error"]


@dataclass
class Job:
    """One slide to draw: its feature file, the slide path as recorded (not yet re-rooted), checkpoint and label."""

    slide_id: str
    feature_file: Path
    slide_path: str
    fold: str
    held_out: str
    label: str


class HeatmapSource:
    """A run, its feature folder, its checkpoints and where its slides lie: loaded once for any number of slides.

    Raises (one line, before any slide is drawn): OptionError, RunError, ManifestError.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        manifest: str | Path | None = None,
        features: str | Path | None = None,
        slides_root: str | Path | None = None,
        fold: str | None = None,
        score: str = "attention",
        top_k: int = 8,
        thumbnail_size: int = 1024,
        device: str = "cpu",
    ) -> None:
        from mil.device import resolve_device
        from mil.evaluate.run import load_run
        from mil.manifest import read_manifest

        check_options(score, top_k, thumbnail_size)
        self.run = load_run(run_dir)
        self.device = resolve_device(device)  # where the heads run
        if fold is not None and fold not in self.run.checkpoints:
            raise OptionError(f"expected --fold to be one of {', '.join(sorted(self.run.checkpoints))}, got {fold!r} instead.")
        self.root = None if slides_root is None else Path(slides_root).expanduser()
        if self.root is not None and not self.root.is_dir():
            raise OptionError(f"expected --slides-root to be a folder holding the slides, got {str(self.root)!r} which is not a folder.")
        self.manifest = None if manifest is None else read_manifest(manifest, check_files=False, slides_root=self.root)
        self.folder = Path(features if features is not None else self.run.config["feature_dir"])
        self.fold, self.score, self.top_k, self.thumbnail_size = fold, score, top_k, thumbnail_size
        self.models: dict[str, tuple] = {}  # fold -> (model, checkpoint dict)
        self._by_name: dict[str, list[Path]] | None = None  # file name -> files under root, built on first need

    def select(self, tokens: list[str]) -> list[str]:
        """Slide ids of ``--slides`` values: ``test`` (each fold's test slides), ``all`` (every feature file), ids; commas split."""
        from mil.manifest import check_slide_id

        ids: list[str] = []
        for tok in (t.strip() for v in tokens for t in str(v).split(",")):
            if tok == "test":
                splits = self.run.splits
                got = list(dict.fromkeys(splits.loc[splits["set"] == "test", "slide_id"]))
                if not got:
                    raise OptionError(
                        f"{self.run.path / 'splits.csv'}: expected test slides for --slides test, got none; use --slides all or ids."
                    )
            elif tok == "all":
                files = sorted(p for p in self.folder.glob("*") if p.suffix.lower() in FEATURE_SUFFIXES) if self.folder.is_dir() else []
                if not files:
                    raise OptionError(f"{self.folder}: expected feature files for --slides all, found none; check --features.")
                got = [p.stem for p in files]
            elif tok:
                got = [check_slide_id(tok, where="--slides: ")]
            else:
                continue
            ids += got
        if not ids:
            raise OptionError("expected --slides test, all or slide ids, got nothing.")
        return list(dict.fromkeys(ids))

    def plan(self, ids: list[str]) -> list[Job]:
        """A `Job` per slide; checks everything that can be checked without drawing (feature files and their
        settings, each fold's checkpoint, a slide path for every slide) and refuses with one line."""
        from mil.checkpoint import load_head
        from mil.data import FeatureSpec, resolve_feature_files
        from mil.features import read_bag_attrs
        from mil.manifest import check_slide_id

        for sid in ids:  # ids name output files: nothing like ../x
            check_slide_id(sid, where="--slide/--slides: ")
        picked = {sid: _pick_fold(self.run, sid, self.fold) for sid in ids}  # sid -> (fold, the slide's set in it)
        for fold in dict.fromkeys(f for f, _ in picked.values()):
            if fold not in self.models:
                self.models[fold] = load_head(self.run.checkpoints[fold])  # one line naming an unreadable checkpoint
                self.models[fold][0].to(self.device)
                if (self.models[fold][1].get("n_classes") or 2) > 2:
                    raise OptionError(
                        f"{self.run.path}: expected a binary run, got a {self.models[fold][1]['n_classes']}-class one; "
                        "heatmaps of multi-class runs are not available yet."
                    )
        unknown = [s for s in ids if not any((self.folder / f"{s}{x}").is_file() for x in FEATURE_SUFFIXES)]
        if unknown and self.folder.is_dir():
            raise OptionError(
                f"{self.folder}: expected a feature file (<slide_id>{' or '.join(FEATURE_SUFFIXES)}) for every slide, got none for "
                f"{len(unknown)}: {', '.join(map(repr, unknown[:10]))}{' …' if len(unknown) > 10 else ''}; check the ids or --features."
            )
        files, spec = resolve_feature_files(pd.DataFrame({"slide_id": ids}), self.folder)
        for fold in dict.fromkeys(f for f, _ in picked.values()):
            diff = FeatureSpec(**self.models[fold][1]["feature_spec"]).first_difference(spec)
            if diff is not None:
                raise SettingsMismatchError(
                    f"{next(iter(files.values()))}: expected {diff[0]}={diff[1]!r} as checkpoint {fold} was trained on, got "
                    f"{diff[0]}={diff[2]!r} instead; use the features the run was trained on (--features)."
                )
        listed = {} if self.manifest is None else dict(zip(self.manifest["slide_id"], self.manifest["path"]))
        labels = dict(zip(self.run.slides["slide_id"], self.run.slides["label"]))
        if self.manifest is not None:
            labels |= {s: v for s, v in zip(self.manifest["slide_id"], self.manifest["label"]) if not pd.isna(v)}
        jobs, pathless = [], []
        for sid in ids:
            path = listed.get(sid) or str(read_bag_attrs(files[sid]).get("slide_path") or "")
            pathless += [] if path else [sid]
            jobs.append(Job(sid, files[sid], path, *picked[sid], _label_text(labels.get(sid))))
        if pathless:
            where = "--manifest has no row for them" if self.manifest is not None else "no --manifest was given"
            raise OptionError(
                f"expected a slide file for every slide, got none for {len(pathless)}: {', '.join(pathless[:10])}"
                f"{' …' if len(pathless) > 10 else ''} (their feature files record no slide_path and {where}); "
                "pass --manifest with their paths."
            )
        return jobs

    def heatmap(self, job: Job) -> Heatmap:
        """Read one slide's bag, score it and paint it (`heatmap_of`)."""
        from mil.features import read_bag

        model, ckpt = self.models[job.fold]
        bag = read_bag(job.feature_file, dtype=np.float32)
        return heatmap_of(
            bag,
            model,
            ckpt,
            self.locate(job.slide_path),
            slide_id=job.slide_id,
            fold=job.fold,
            held_out=job.held_out,
            score=self.score,
            top_k=self.top_k,
            thumbnail_size=self.thumbnail_size,
        )

    def locate(self, recorded: str) -> Path:
        """The slide file of a recorded path: relative paths start from --slides-root (else the working folder); an
        absolute one that no longer exists is looked for by file name under --slides-root. `SlideError` if ambiguous."""
        p = Path(recorded).expanduser()
        if not p.is_absolute():
            p = (self.root or Path.cwd()) / p
        if p.exists() or self.root is None:
            return p  # open_slide says so if it is missing
        if (self.root / p.name).exists():
            return self.root / p.name
        if self._by_name is None:
            self._by_name = {}
            for q in sorted(self.root.rglob("*")):
                self._by_name.setdefault(q.name, []).append(q)
        hits = [q for q in self._by_name.get(p.name, []) if q.is_file()]
        if len(hits) == 1:
            return hits[0]
        found = f"{len(hits)} files named {p.name!r} ({', '.join(map(str, hits[:3]))})" if hits else f"no file named {p.name!r}"
        raise SlideError(f"{p}: slide file does not exist, and --slides-root {self.root} holds {found}; fix the path in the manifest.")


def settings_of(src: HeatmapSource) -> dict:
    """The options that change a slide's outputs: a rerun with others draws the slide again."""
    return {"score": src.score, "fold": src.fold, "top_k": src.top_k, "thumbnail_size": src.thumbnail_size, "features": str(src.folder)}


def output_paths(png: Path) -> dict[str, Path]:
    """The files of one slide, beside its PNG (`OUTPUTS`)."""
    stem = png.name[: -len(png.suffix)] if png.suffix else png.name
    return {k: png.with_name(stem + ext) for k, ext in OUTPUTS.items()}


def tile_table(hm: Heatmap) -> pd.DataFrame:
    """One row per tile: x, y, width, height in level-0 px, then ``attention`` (heads with it) and ``instance_score``."""
    x, y = hm.coords[:, 0].astype(np.int64), hm.coords[:, 1].astype(np.int64)  # (N,) each
    table = {"x": x, "y": y, "width": np.full_like(x, hm.size0), "height": np.full_like(x, hm.size0)}
    table |= {} if hm.attention is None else {"attention": hm.attention}
    return pd.DataFrame(table | {"instance_score": hm.instance})


def geojson(table: pd.DataFrame) -> dict:
    """`tile_table` as a GeoJSON FeatureCollection of tile squares (level-0 px), each a QuPath detection with its scores."""
    scores = [c for c in table.columns if c not in ("x", "y", "width", "height")]
    features = []
    for row in table.itertuples(index=False):
        x, y, w, h = int(row.x), int(row.y), int(row.width), int(row.height)
        ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        measurements = {c: float(getattr(row, c)) for c in scores}
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "detection", "measurements": measurements},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_outputs(hm: Heatmap, png: str | Path, settings: dict | None = None, thumb: bool = False) -> dict:
    """Write a slide's CSV, GeoJSON (and, with `thumb`, index thumbnail), then its PNG, each atomically; return the
    metadata stored in the PNG (``mil`` text chunk: slide, checkpoint, probability, tiles, `settings`)."""
    from PIL.PngImagePlugin import PngInfo

    from mil.atomic import atomic_path

    paths = output_paths(Path(png))
    paths["png"].parent.mkdir(parents=True, exist_ok=True)
    table = tile_table(hm)
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(paths["geojson"]) as tmp:
        tmp.write_text(json.dumps(geojson(table), separators=(",", ":"), allow_nan=False))
    page, painted = draw_heatmap(hm)
    if thumb:
        painted.thumbnail((THUMB_PX, THUMB_PX))
        with atomic_path(paths["thumb"]) as tmp:
            painted.save(tmp, format="JPEG", quality=85)
    meta = {
        "slide_id": hm.slide_id,
        "fold": hm.fold,
        "held_out": hm.held_out,
        "probability": hm.probability,
        "score_name": hm.score_name,
        "n_tiles": len(hm.values),
        "settings": settings,
    }
    info = PngInfo()
    info.add_text("mil", json.dumps(meta))
    with atomic_path(paths["png"]) as tmp:
        page.save(tmp, format="PNG", pnginfo=info)
    return meta


def done_meta(png: Path, settings: dict) -> dict | None:
    """The stored metadata of a slide whose outputs all exist and were drawn with `settings`, else None."""
    if not all(p.is_file() for p in output_paths(png).values()):
        return None
    try:
        with Image.open(png) as im:
            meta = json.loads(im.info.get("mil", "null"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("settings") == settings else None


def render_cohort(
    run_dir: str | Path,
    slides: list[str],
    *,
    out: str | Path | None = None,
    manifest: str | Path | None = None,
    features: str | Path | None = None,
    slides_root: str | Path | None = None,
    fold: str | None = None,
    score: str = "attention",
    top_k: int = 8,
    thumbnail_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> tuple[pd.DataFrame, Path]:
    """Draw every slide of `slides` (`HeatmapSource.select`) into `out` (default RUN_DIR/heatmaps) and write index.html.

    Returns:
        The report (`REPORT_COLUMNS`; status ``written``, ``skipped`` or ``error``, one row per slide) and the index path.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mil.atomic import remove_stale_temporaries

    src = HeatmapSource(
        run_dir,
        manifest=manifest,
        features=features,
        slides_root=slides_root,
        fold=fold,
        score=score,
        top_k=top_k,
        thumbnail_size=thumbnail_size,
        device=device,
    )
    jobs = src.plan(src.select(slides))
    out = Path(out) if out is not None else src.run.path / "heatmaps"
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: expected --out to be a folder for the cohort's heatmaps, got a file; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # left by a killed run
    settings = settings_of(src)
    console = Console(stderr=True)
    rows = []
    columns = (TextColumn("[bold]heatmaps"), BarColumn(), MofNCompleteColumn(), TextColumn("slides"), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("heatmaps", total=len(jobs))
        for job in jobs:
            png = out / f"{job.slide_id}.png"
            meta = None if overwrite else done_meta(png, settings)
            status, error = "skipped", ""
            if meta is None:
                try:
                    meta, status = write_outputs(src.heatmap(job), png, settings, thumb=True), "written"
                except Exception as e:  # noqa: BLE001 — one bad slide must not stop the cohort
                    status, meta = "error", {}
                    error = " ".join((str(e) if isinstance(e, MilError) else f"{job.feature_file}: {type(e).__name__}: {e}").split())
                    console.print(f"error: {job.slide_id}: {error}", markup=False, highlight=False, soft_wrap=True)
            rows.append(
                {
                    "slide_id": job.slide_id,
                    "status": status,
                    "label": job.label,
                    "probability": meta.get("probability", np.nan),
                    "fold": meta.get("fold", job.fold),
                    "held_out": meta.get("held_out", job.held_out),
                    "n_tiles": meta.get("n_tiles", 0),
                    "error": error,
                }
            )
            bar.update(task, advance=1)
    report = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    index = write_index(out, report, src)
    return report, index


def write_index(out: Path, report: pd.DataFrame, src: HeatmapSource) -> Path:
    """``out/index.html``: one row per slide of `report` — thumbnail (linking the PNG), id, label, probability,
    checkpoint, links to its PNG, CSV and GeoJSON; failed slides with their error."""
    from mil.atomic import atomic_path

    e = html.escape
    rows = []
    for r in report.itertuples(index=False):
        files = {k: p.name for k, p in output_paths(out / f"{r.slide_id}.png").items()}
        head = f"<td>{e(r.slide_id)}</td><td>{e(r.label)}</td>"
        if r.status == "error":
            rows.append(f'<tr class="error"><td></td>{head}<td colspan="3">error: {e(r.error)}</td></tr>')
            continue
        links = " ".join(f'<a href="{e(files[k])}">{name}</a>' for k, name in (("png", "PNG"), ("csv", "CSV"), ("geojson", "GeoJSON")))
        rows.append(
            f'<tr><td><a href="{e(files["png"])}"><img src="{e(files["thumb"])}" alt="{e(r.slide_id)}" loading="lazy"></a></td>'
            f"{head}<td>{r.probability:.3f}</td><td>{e(str(r.fold))} ({e(str(r.held_out))})</td><td>{links}</td></tr>"
        )
    n_err = int((report["status"] == "error").sum())
    title = f"Heatmaps · {src.run.path.name}"
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: middle; }}
img {{ max-width: {THUMB_PX}px; max-height: {THUMB_PX}px; }}
tr.error td {{ color: #b00; }}
</style></head><body>
<h1>{e(title)}</h1>
<p>{len(report)} slides{f", {n_err} failed" if n_err else ""} · {e(src.score)} (instance scores for heads without attention) ·
features {e(str(src.folder))} · tile scores in level-0 px: CSV, and GeoJSON for QuPath (File → Import objects)</p>
<table>
<tr><th>heatmap</th><th>slide</th><th>label</th><th>P(positive)</th><th>checkpoint (slide's set)</th><th>files</th></tr>
{chr(10).join(rows)}
</table>
</body></html>
"""
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text(doc)
    return out / "index.html"


def _label_text(label) -> str:
    """A label as the index shows it: "" when unknown, 1 rather than 1.0."""
    if label is None or (not isinstance(label, str) and pd.isna(label)):
        return ""
    try:
        return str(int(label)) if float(label).is_integer() else str(label)
    except (TypeError, ValueError):
        return str(label)
