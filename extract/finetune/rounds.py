"""The HNM-WSI / ItS2CLR loop as one resumable command: fine-tune → re-extract → retrain, R rounds.

Output folder ``OUT``::

    round_<r>/encoder/   one fine-tuning round (`mil.extract.finetune.train`): encoder.pt, checkpoint.pt, …
    round_<r>/features/  every manifest slide re-embedded with that encoder (the round-0 tiles reused)
    round_<r>/run/       `mil train features` on them with the options of ``--train-config``
    rounds.csv           round, source_run, source_val_auc, val_auc, encoder, features, run

Round r's pseudo-labels come from the best run so far (`pseudo.pick_source`: round 0's ``--run``
and the runs of rounds 1 … r-1); its starting weights are round r-1's ``encoder.pt`` (round 1:
``--weights``), so the encoder trains on through the rounds as in the seed.

Resumable: each part is skipped when its output is finished with the same settings (the
encoder's ``encoder.pt``, the feature files, the run's ``summary.csv``); a killed fine-tuning
round continues from its last epoch, a killed extraction from its last slide, a killed training
run starts that run again. Training runs as a `mil train features` subprocess: stages meet only
through files.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd

from mil.atomic import write_csv
from mil.errors import MilError, OptionError
from mil.extract.finetune.pseudo import pick_source, read_run, score_training_tiles
from mil.extract.finetune.train import FinetuneConfig, run_finetune


def reextract(
    slides: pd.DataFrame, features_dir: Path, out: Path, encoder_name: str, weights: Path, *, device: str, workers: int, progress: bool
):
    """Embed every slide again with `weights`, with the encoder options and tiles of `features_dir`."""
    from mil.extract.wsi.encoders import create_encoder
    from mil.extract.wsi.features import FeatureConfig, run_features
    from mil.extract.wsi.grid import GridSpec
    from mil.extract.wsi.tiles import TilingConfig
    from mil.extract.wsi.tissue import TissueParams

    path = features_dir / "features_config.json"
    if not path.is_file():
        raise OptionError(
            f"expected the round-0 features to hold features_config.json (written by `mil extract features`), got none in {features_dir}; "
            "features made by the workflow's per-slide jobs are re-extracted by its finetune rules instead."
        )
    doc = json.loads(path.read_text())
    t = doc["tiling"]
    tiling = TilingConfig(GridSpec(**t["grid"]), TissueParams(**t["tissue"]), t["tissue_threshold"], t["mpp"])
    e = doc["encoder"]
    enc = create_encoder(
        encoder_name,
        weights=str(weights),
        precision=e["precision"],
        device=device,
        input_size=e["input_size"],
        mean=tuple(e["mean"]),
        std=tuple(e["std"]),
        seed=e["seed"],
    )
    config = FeatureConfig(tiling=tiling, batch_size=doc["batch_size"], workers=workers, dtype=doc["dtype"])
    report = run_features(slides, out, enc, config, coords_dir=Path(doc["coords_dir"]), progress=progress)
    bad = report[report["status"] == "error"]
    if len(bad):
        raise MilError(f"{out}: {len(bad)} slide(s) failed to re-extract ({', '.join(bad['slide_id'][:3])}); see extract_report.csv.")


def retrain(features: Path, manifest: Path, out: Path, train_config: Path, progress: bool) -> None:
    """`mil train --config FILE features FEATURES --manifest M --out OUT` in a subprocess."""
    cmd = [sys.executable, "-m", "mil.cli", "train", "--config", str(train_config), "features", str(features)]
    cmd += ["--manifest", str(manifest), "--out", str(out)] + ([] if progress else ["--no-progress"])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise MilError(f"{out}: `mil train features` failed (exit {done.returncode}): {last}")


def run_rounds(
    slides: pd.DataFrame,
    manifest: Path,
    run: Path,
    out_dir: str | Path,
    encoder_name: str,
    weights: str,
    config: FinetuneConfig,
    train_config: Path,
    *,
    device: str = "cpu",
    precision: str = "fp32",
    workers: int = 2,
    progress: bool = True,
) -> pd.DataFrame:
    """Run rounds 1 … ``config.rounds`` into `out_dir` (module docstring); returns rounds.csv's table."""
    if not Path(train_config).is_file():
        raise OptionError(
            f"expected --train-config to be a YAML file of `mil train features` options, got {str(train_config)!r} (no such file)."
        )
    out = Path(out_dir)
    runs = [read_run(run)]
    features0 = runs[0].feature_dir
    start, rows = str(weights), []
    for r in range(1, config.rounds + 1):
        rd = out / f"round_{r}"
        source = pick_source(runs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder = run_finetune(
                slides,
                source,
                score_training_tiles(source),
                rd / "encoder",
                encoder_name,
                start,
                replace(config, round=r),
                device=device,
                precision=precision,
                workers=workers,
                progress=progress,
            )
        reextract(slides, features0, rd / "features", encoder_name, encoder, device=device, workers=workers, progress=progress)
        retrain(rd / "features", manifest, rd / "run", train_config, progress)
        runs.append(read_run(rd / "run"))
        rows.append(
            {
                "round": r,
                "source_run": str(source.path),
                "source_val_auc": source.val_auc,
                "val_auc": runs[-1].val_auc,
                "encoder": str(encoder),
                "features": str(rd / "features"),
                "run": str(rd / "run"),
            }
        )
        write_csv(out / "rounds.csv", pd.DataFrame(rows))
        start = str(encoder)
    return pd.DataFrame(rows)
