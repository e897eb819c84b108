"""Reliability checks (issue 8): what the pipeline does with bad slides, kill -9, bad inputs,
repeated seeds and hostile files. Prints one table: check, case, expected, observed, pass.

    .venv/bin/python benchmarks/reliability.py [--kills 10] [--seed 0] [--work-dir DIR] [--out table.csv] [--quick]
        [--only 1,2,…] [--kill-stages features,training]

1. **bad slides** — a batch with a truncated file, a non-slide file, a slide with no tissue, a
   slide without mpp, a zero-byte file, a slide whose level-0 tiles are noise and two good
   slides, through `mil extract tiles` and `mil extract features` (the real executable): the
   good slides finish, each bad one is reported with its reason, nothing partial is left, exit
   status 1 (0 with --skip-errors).
2. **kill -9** — `mil extract features` and `mil train features` killed with SIGKILL inside their
   work, `--kills` times each: a seeded delay after a marker of started work appears in the output
   folder (a slide's first ``.h5``; ``splits.csv``), and each kill must land there — the process
   running, part of its output written, not all of it (a miss is retried with half the delay and
   reported) — then rerun: the result must equal an uninterrupted run's bit for bit and no
   temporary file may remain. The table says what each kill interrupted and how many of them did.
3. **bad inputs** — the matrix of tests/reliability/test_bad_inputs.py (manifests, feature files,
   run directories, options; every command): exit 2, one `error:` line naming the culprit,
   nothing written.
4. **properties** — the hypothesis tests of tests/reliability/test_properties.py (readers and
   collation on arbitrary arrays, garbage and truncated files).
5. **determinism** — two trainings with one seed on CPU: identical metrics, predictions,
   checkpoints and evaluations.
6. **security** — every torch.load is weights_only (source scan); pickles that would run code
   are refused; slide ids escaping the output folder are refused.

Everything is small (2,048² px slides, 64-px tiles, resnet18 with random weights, 24 bags of
16 features): the point is behaviour, not speed. `--quick` runs 1 kill each (2 slides, 4 training
epochs) and a sample of the bad-input matrix; `--kill-stages features` narrows section 2.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the builders live in tests/reliability/cases.py, shared with the tests

import h5py  # noqa: E402
import pandas as pd  # noqa: E402

from tests.reliability import cases  # noqa: E402
from tests.reliability.cases import (  # noqa: E402
    BAD_SLIDES,
    FAST_FEATURES,
    FAST_TILES,
    KILL_FEATURES,
    bad_slide_batch,
    bag_cohort,
    feature_state,
    features_started,
    invoke,
    kill_inside,
    leftovers,
    run,
    run_state,
    same_features,
    same_run_outputs,
    slide_cohort,
    training_started,
    watch,
)

ROWS: list[dict] = []


def row(check: str, case: str, expected: str, observed: str, ok: bool) -> None:
    ROWS.append({"check": check, "case": case, "expected": expected, "observed": observed, "pass": bool(ok)})
    print(f"  [{'pass' if ok else 'FAIL'}] {check} · {case}: {observed}", flush=True)


def short(text: str, n: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------------------------
# 1. bad slides


def check_bad_slides(work: Path) -> None:
    print("1. bad slides", flush=True)
    manifest = bad_slide_batch(work / "bad_slides")
    for stage, col, extra in (("tiles", 1, FAST_TILES), ("features", 2, [*FAST_FEATURES, "--workers", "1"])):
        out = work / f"bad_{stage}"
        r = run("extract", stage, manifest, "--out", out, *extra)
        row(f"bad slides: extract {stage}", "exit status", "1 (some slides failed)", str(r.returncode), r.returncode == 1)
        report = pd.read_csv(out / "extract_report.csv", keep_default_na=False).set_index("slide_id")
        for sid, spec in BAD_SLIDES.items():
            desc, status, reason = spec[0], spec[col], spec[3]
            got = report.loc[sid, "status"] if sid in report.index else "missing"
            err = report.loc[sid, "error"] if sid in report.index else ""
            lines = [line for line in r.stderr.splitlines() if line.startswith(f"error {sid}:")]
            ok = got == status and (status != "error" or (reason in err and len(lines) == 1))
            exp = status if status != "error" else f"error: …{reason}…"
            obs = f"{got}" + (
                f", n_tiles {report.loc[sid, 'n_tiles']}" if got in ("ok", "empty") else f": {short(err.split(': ', 1)[-1], 90)}"
            )
            row(f"bad slides: extract {stage}", f"{sid} ({desc})", exp, obs, ok)
        partial = []
        for p in out.glob("*.h5"):
            with h5py.File(p) as f:
                if stage == "features" and "features" in f and f["features"].shape[0] != f["coords"].shape[0]:
                    partial.append(p.name)
                if stage == "features" and report.loc[p.stem, "status"] == "error" and "features" in f:
                    partial.append(p.name)
        tmp = leftovers(out)
        row(
            f"bad slides: extract {stage}",
            "partial output",
            "no temporaries, no half-written .h5",
            f"{len(tmp)} temporaries, {len(partial)} partial files",
            not tmp and not partial,
        )
        row(
            f"bad slides: extract {stage}",
            "stderr",
            "no traceback",
            "traceback printed" if "Traceback" in r.stderr else "no traceback",
            "Traceback" not in r.stderr and "Exception ignored" not in r.stderr,
        )
        r = run("extract", stage, manifest, "--out", out, *extra, "--skip-errors")
        row(
            f"bad slides: extract {stage}",
            "rerun with --skip-errors",
            "exit 0, good slides skipped",
            f"exit {r.returncode}, good0 {pd.read_csv(out / 'extract_report.csv').set_index('slide_id').loc['good0', 'status']}",
            r.returncode == 0,
        )


# ----------------------------------------------------------------------------------------------
# 2. kill -9

KILL_FOLDS = 2
KILL_SHARE = (0.05, 0.8)  # each kill lands this share (seeded) of the reference's marker-to-exit window after the marker


def _kill_series(check: str, n: int, rng: random.Random, window: float, command, started, state, compare, outs: str) -> None:
    """`n` kills aimed inside the work (`cases.kill_inside`), each followed by the rerun: one row per kill
    saying what it interrupted, and a summary row that passes only if every kill interrupted work."""
    hits = attempts = 0
    for i in range(n):
        out = Path(f"{outs}{i}")
        args = command(out)
        kill = kill_inside(args, out, started=started, state=state, extra=rng.uniform(*KILL_SHARE) * window)
        rerun = invoke(*args)
        same, why = compare(out) if rerun.returncode == 0 else (False, f"rerun exit {rerun.returncode}")
        tmp = leftovers(out)
        hits, attempts = hits + kill.interrupted, attempts + kill.attempts
        row(
            check,
            f"#{i + 1} {kill.describe()}",
            "killed inside the work; rerun = reference, no temporaries",
            f"{'interrupted work' if kill.interrupted else 'MISSED: did not interrupt work'}; rerun {why}, {len(tmp)} temporaries",
            kill.interrupted and same and not tmp,
        )
        shutil.rmtree(out, ignore_errors=True)
    row(
        check,
        "summary",
        f"{n} of {n} kills interrupted work",
        f"{hits} of {n} kills interrupted work ({attempts} attempts; a kill that misses is retried with half the delay)",
        hits == n,
    )


def check_kills(work: Path, n: int, seed: int, quick: bool, stages: set[str]) -> None:
    print(f"2. kill -9 ({n} each: {', '.join(sorted(stages))})", flush=True)
    rng = random.Random(seed)
    if "features" in stages:
        n_slides = 2 if quick else 3
        manifest = slide_cohort(work / "kill_slides", n=n_slides)
        ids = pd.read_csv(manifest)["slide_id"].tolist()
        ref = work / "kill_ref"
        w = watch(["extract", "features", manifest, "--out", ref, *KILL_FEATURES], ref, features_started)
        assert w.returncode == 0, w.stderr
        row(
            "kill -9: extract features",
            f"uninterrupted reference (marker: a slide's first .h5 or its temporary; complete: all {n_slides} feature files)",
            "exit 0",
            f"exit 0 in {w.end_s:.1f} s, first output at {w.marker_s:.1f} s ({n_slides} slides × 21 tiles)",
            True,
        )
        _kill_series(
            "kill -9: extract features",
            n,
            rng,
            w.window_s,
            lambda out: ["extract", "features", manifest, "--out", out, *KILL_FEATURES],
            features_started,
            partial(feature_state, n_slides=n_slides),
            lambda out: same_features(ref, out, ids),
            str(work / "kill_f"),
        )

    if "training" in stages:
        epochs = 4 if quick else 12
        train = ["--epochs", str(epochs), "--patience", str(epochs), "--folds", str(KILL_FOLDS), "--seed", "3", "--no-progress"]
        bags = bag_cohort(work / "kill_bags", n=24, split=False)
        ref = work / "kill_run_ref"
        w = watch(["train", "features", bags.parent, "--manifest", bags, "--out", ref, *train], ref, training_started)
        assert w.returncode == 0, w.stderr
        row(
            "kill -9: train features",
            f"uninterrupted reference (marker: splits.csv; complete: all {KILL_FOLDS} fold checkpoints)",
            "exit 0",
            f"exit 0 in {w.end_s:.1f} s, splits.csv at {w.marker_s:.1f} s ({KILL_FOLDS} folds × {epochs} epochs)",
            True,
        )
        _kill_series(
            "kill -9: train features",
            n,
            rng,
            w.window_s,
            lambda out: ["train", "features", bags.parent, "--manifest", bags, "--out", out, *train],
            training_started,
            partial(run_state, n_folds=KILL_FOLDS),
            lambda out: same_run_outputs(ref, out),
            str(work / "kill_t"),
        )


# ----------------------------------------------------------------------------------------------
# 3. bad-input matrix


def check_bad_inputs(work: Path, quick: bool) -> None:
    from tests.reliability import test_bad_inputs as matrix

    names = sorted(matrix.CASES)
    if quick:
        names = names[::6]
    print(f"3. bad inputs ({len(names)} cases)", flush=True)
    root = work / "bad_inputs"
    slides = slide_cohort(root / "slides", n=2)
    bags = bag_cohort(root / "bags", n=24)
    assert (
        invoke("train", "features", bags.parent, "--manifest", bags, "--out", root / "run", "--epochs", "1", "--no-progress").returncode
        == 0
    )
    assert invoke("evaluate", "run", root / "run", "--n-boot", "10").returncode == 0
    ctx = matrix.Ctx(root, slides, bags, root / "run")
    for i, name in enumerate(names):
        tmp = root / f"case{i:03d}"
        tmp.mkdir()
        argv, watched, culprit = matrix.CASES[name](ctx, tmp)
        before = cases.snapshot(watched)
        r = invoke(*argv)
        problems = matrix.check_refusal(r, culprit, before, cases.snapshot(watched))
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        obs = f"exit {r.returncode}: " + (short(errors[0][len("error: ") :], 100) if errors else short(r.stderr, 100))
        if problems:
            obs += f" — {'; '.join(problems)}"
        row(
            "bad input: " + name.split("/")[0],
            name.split("/", 1)[1],
            f"exit 2, names {short(culprit, 40)!r}, writes nothing",
            obs,
            not problems,
        )
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# 4. properties


def check_properties() -> None:
    print("4. properties (hypothesis)", flush=True)
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests/reliability/test_properties.py")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    last = [line for line in r.stdout.splitlines() if line.strip()][-1] if r.stdout.strip() else r.stderr[-200:]
    row(
        "properties",
        "read_bag / read_bag_attrs / check_finite / BagDataset / check_bag / collate_bags on arbitrary input (50 examples each)",
        "only MilError subclasses, never a crash or NaN from finite input",
        f"{short(last, 60)} ({time.monotonic() - t0:.0f} s)",
        r.returncode == 0,
    )


# ----------------------------------------------------------------------------------------------
# 5. determinism


def check_determinism(work: Path) -> None:
    print("5. determinism", flush=True)
    bags = bag_cohort(work / "det_bags", n=24)
    for run_name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = work / f"det_{run_name}"
        r = invoke(
            "train", "features", bags.parent, "--manifest", bags, "--out", out, "--epochs", "3", "--seed", str(seed), "--no-progress"
        )
        assert r.returncode == 0, r.stderr
        assert invoke("evaluate", "run", out, "--n-boot", "50").returncode == 0
    same, why = same_run_outputs(work / "det_a", work / "det_b")
    row("determinism", "train twice, seed 7 (metrics, predictions, summary, splits, checkpoints)", "identical", why, same)
    pa, pb = (pd.read_csv(work / f"det_{x}" / "eval" / "test" / "predictions.csv") for x in "ab")
    row("determinism", "evaluate both runs (test probabilities)", "identical", "identical" if pa.equals(pb) else "differ", pa.equals(pb))
    diff, why = same_run_outputs(work / "det_a", work / "det_c")
    row("determinism", "seed 8 instead of 7", "different checkpoints", "different" if not diff else "identical", not diff)
    # and in a separate process (the real executable)
    r = run("train", "features", bags.parent, "--manifest", bags, "--out", work / "det_d", "--epochs", "3", "--seed", "7", "--no-progress")
    same, why = same_run_outputs(work / "det_a", work / "det_d") if r.returncode == 0 else (False, f"exit {r.returncode}")
    row("determinism", "seed 7 again, as a subprocess of .venv/bin/mil", "identical", why, same)


# ----------------------------------------------------------------------------------------------
# 6. security


def check_security(work: Path) -> None:
    import pickle

    import torch

    import mil
    from mil.checkpoint import load_head
    from mil.errors import RunError
    from mil.manifest import check_slide_id
    from tests.reliability import test_security as sec

    print("6. security", flush=True)
    files = sec.package_sources()
    problems = [p for f in files for p in sec.unsafe_calls(f)]
    n_loads = sum(f.read_text().count("torch.load(") for f in files)
    row(
        "security",
        f"ast scan of {len(files)} package files: torch.load, pickle, eval/exec, yaml, np.load, shell",
        "every torch.load weights_only=True; no unsafe call",
        f"{n_loads} torch.load calls, {len(problems)} problems " + short("; ".join(problems), 60),
        not problems,
    )

    marker = work / "PWNED"
    evil = sec.Evil(marker)
    ckpt = work / "evil_checkpoint.pt"
    torch.save({"head": "abmil", "in_dim": 4, "head_kwargs": {}, "state_dict": evil}, ckpt)
    try:
        load_head(ckpt)
        obs = "loaded"
    except RunError as e:
        obs = "refused: " + short(str(e).split("(", 1)[-1], 80)
    row(
        "security",
        "checkpoint whose pickle runs os.system",
        "refused, code not run",
        obs + ("; CODE RAN" if marker.exists() else ""),
        obs.startswith("refused") and not marker.exists(),
    )
    bag = work / "evil_bag.pt"
    torch.save({"features": torch.zeros(3, 4), "x": evil}, bag)
    try:
        mil.read_bag(bag)
        obs = "loaded"
    except mil.FeatureFileError as e:
        obs = "refused: " + short(str(e).split(": ", 1)[-1], 80)
    row(
        "security",
        ".pt feature file whose pickle runs os.system",
        "refused, code not run",
        obs + ("; CODE RAN" if marker.exists() else ""),
        obs.startswith("refused") and not marker.exists(),
    )
    weights = work / "evil_weights.pth"
    torch.save({"state_dict": {}, "x": evil}, weights)
    slides = slide_cohort(work / "sec_slides", n=1)
    r = invoke("extract", "features", slides, "--out", work / "sec_out", *FAST_FEATURES[:2], "--weights", weights, *FAST_FEATURES[4:])
    row(
        "security",
        "--weights file whose pickle runs os.system",
        "exit 2, code not run, nothing written",
        f"exit {r.returncode}: {short(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else '', 80)}",
        r.returncode == 2 and not marker.exists() and not (work / "sec_out").exists(),
    )
    raw = work / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(evil))
    try:
        load_head(raw)
        obs = "loaded"
    except RunError:
        obs = "refused"
    row(
        "security", "bare pickle (not a torch file) as a checkpoint", "refused, code not run", obs, obs == "refused" and not marker.exists()
    )

    refused = []
    for sid in ("../x", "/abs/x", "a/b", "..", ".hidden", "x/../../y", "a\\b", "$(touch PWNED)"):
        try:
            check_slide_id(sid)
        except mil.ManifestError:
            refused.append(sid)
    row(
        "security",
        "slide ids ../x, /abs/x, a/b, .., .hidden, x/../../y, a\\b, $(…)",
        "all refused by the manifest reader",
        f"{len(refused)}/8 refused",
        len(refused) == 8,
    )
    m = work / "sec_slides" / "escape.csv"
    pd.DataFrame({"slide_id": ["../../escaped"], "path": ["s0.tiff"]}).to_csv(m, index=False)
    r = invoke("extract", "tiles", m, "--out", work / "sec_tiles", *FAST_TILES)
    escaped = list(work.rglob("escaped*"))
    row(
        "security",
        "extract tiles with slide_id ../../escaped",
        "exit 2, nothing written anywhere",
        f"exit {r.returncode}, {len(escaped)} files named escaped*, out folder {'exists' if (work / 'sec_tiles').exists() else 'absent'}",
        r.returncode == 2 and not escaped and not (work / "sec_tiles").exists(),
    )


# ----------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    print()
    print("| check | case | expected | observed | pass |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = [r["check"], r["case"], r["expected"], r["observed"], "✓" if r["pass"] else "✗ FAIL"]
        print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10, help="kill -9 repetitions per command (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    ap.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temporary folder, removed)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as CSV")
    ap.add_argument("--quick", action="store_true", help="1 kill each (smaller runs) and a sixth of the bad-input matrix")
    ap.add_argument("--kill-stages", default="features,training", help="commands killed in section 2 (default both)")
    ap.add_argument("--only", default="1,2,3,4,5,6", help="comma-separated sections to run (default all)")
    args = ap.parse_args(argv)
    sections = {int(s) for s in args.only.split(",")}
    kills = 1 if args.quick else args.kills
    stages = set(args.kill_stages.split(","))
    if not stages <= {"features", "training"}:
        ap.error(f"--kill-stages: expected features and/or training, got {args.kill_stages!r}")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mil_reliability_"))
    work.mkdir(parents=True, exist_ok=True)
    ROWS.clear()
    t0 = time.monotonic()
    try:
        if 1 in sections:
            check_bad_slides(work)
        if 2 in sections:
            check_kills(work, kills, args.seed, args.quick, stages)
        if 3 in sections:
            check_bad_inputs(work, args.quick)
        if 4 in sections:
            check_properties()
        if 5 in sections:
            check_determinism(work)
        if 6 in sections:
            check_security(work)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    table = pd.DataFrame(ROWS, columns=["check", "case", "expected", "observed", "pass"])
    print_table(ROWS)
    wall = time.monotonic() - t0
    n_fail = int((~table["pass"]).sum())
    print(
        f"\n{len(table) - n_fail}/{len(table)} checks passed in {wall:.0f} s wall time "
        f"({os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()})"
    )
    if args.out is not None:
        table.to_csv(args.out, index=False)
    table.attrs["wall_s"] = wall
    return table


if __name__ == "__main__":
    t = main()
    sys.exit(0 if t["pass"].all() else 1)
