"""Start-up benchmark: how long `mil --help` takes and how much memory it holds, beside `python -c pass`.

    python benchmarks/startup.py [--rounds 15] [--quick]

Each round runs, in turn (the order alternating between rounds), the bare interpreter
(`python -c pass`), `mil --help`, `mil extract --help` and `mil extract tiles --help`, each
as a fresh process of the virtual environment's Python (the `mil` console script is that
Python running `mil.cli:main`). Wall time per process from `time.perf_counter`, peak RSS
as the child's own VmHWM at exit. Prints median and quartiles over rounds, the
ratio to the bare interpreter, and whether torch was imported (it must not be). Goal: `mil
--help` ≤ 0.5 s median on the 2-core reference machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np

GOAL_S = 0.5
HELP = "from mil.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
TORCH = "import sys\n" + HELP + "print('torch' in sys.modules, file=sys.stderr)\n"
COMMANDS = {
    "python -c pass": "pass",
    "mil --help": HELP.format(args=["--help"]),
    "mil extract --help": HELP.format(args=["extract", "--help"]),
    "mil extract tiles --help": HELP.format(args=["extract", "tiles", "--help"]),
}


# The child reports its own peak RSS at exit: VmHWM belongs to the memory map that exec created,
# whereas rusage's ru_maxrss of a child keeps the high-water mark of the parent it was forked from.
PEAK = (
    "import atexit, sys\natexit.register(lambda: print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0], file=sys.stderr))\n"
)


def run_once(code: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh `python -c CODE`."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PEAK + code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: `python -c {code!r}` exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return wall, int(r.stderr.split()[-1]) / 1024  # VmHWM is in kB


def imports_torch(args: list[str]) -> bool:
    """Whether `mil ARGS` imports torch (printed by the child itself)."""
    r = subprocess.run([sys.executable, "-c", TORCH.format(args=args)], capture_output=True, text=True, check=True)
    return r.stderr.strip().splitlines()[-1] == "True"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds")
    args = ap.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    names = list(COMMANDS)
    for name in names:  # warm the page cache and .pyc files; not timed
        run_once(COMMANDS[name])
    wall = {n: [] for n in names}
    rss = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            w, m = run_once(COMMANDS[name])
            wall[name].append(w)
            rss[name].append(m)
    base = np.asarray(wall["python -c pass"])
    print(f"{rounds} interleaved rounds; wall s: median [q1, q3]; ratio to `python -c pass` per round: median")
    print("| command | wall s | ratio | peak RSS MiB | imports torch |")
    print("|---|---|---|---|---|")
    result = {}
    for name in names:
        w = np.asarray(wall[name])
        q1, med, q3 = np.quantile(w, [0.25, 0.5, 0.75])
        ratio = float(np.median(w / base))
        torch = "-" if name == "python -c pass" else imports_torch(name.split()[1:])
        result[name] = {
            "wall_s": float(med),
            "q1": float(q1),
            "q3": float(q3),
            "ratio": ratio,
            "rss_mib": float(np.median(rss[name])),
            "imports_torch": torch,
        }
        print(f"| `{name}` | {med:.2f} [{q1:.2f}, {q3:.2f}] | {ratio:.1f} | {np.median(rss[name]):.0f} | {torch} |")
    met = result["mil --help"]["wall_s"] <= GOAL_S
    print(f"goal: `mil --help` median <= {GOAL_S} s: {'met' if met else 'not met'}")
    return result


if __name__ == "__main__":
    main()
