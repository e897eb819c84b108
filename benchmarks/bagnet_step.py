"""BagNet training step on CPU: glibc's default allocator settings vs keeping freed memory in the heap.

    python benchmarks/bagnet_step.py [--canvases 128,256] [--batch-size 32] [--width 0.125] [--steps 3]

Large canvases make activations of tens of MB per tensor. glibc serves every allocation above its
mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when freed,
so each training step faults in and zeroes hundreds of MB of new pages in the kernel. With
``MALLOC_MMAP_MAX_=0`` (no mmap: everything from the heap) and a large ``MALLOC_TRIM_THRESHOLD_``
(freed memory stays in the heap) the pages are reused from the second step on.

Each setting runs in its own subprocess (glibc reads these variables at start-up), one torch thread,
the same seeded network and batch: one warm-up step, then `--steps` timed forward + backward +
RMSprop steps. Prints wall, user and system seconds per step and the ratio of the two wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

KEEP_HEAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}

CHILD = r"""
import json, resource, sys, time, torch
canvas, batch, width, steps = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)
from mil import create_bagnet
net = create_bagnet(rf=33, pooling="max", width=width, norm="bn")
opt = torch.optim.RMSprop(net.parameters(), lr=1e-3, eps=1e-5)
x = torch.rand(batch, 1, canvas, canvas)  # (B, 1, H, W)
y = (torch.rand(batch) > 0.5).float()  # (B,)
rows = []
for i in range(steps + 1):
    t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)  # ()
    opt.zero_grad()
    loss.backward()
    opt.step()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if i:  # the first step is a warm-up
        rows.append([time.perf_counter() - t, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime])
print(json.dumps(rows))
"""


def run(canvas: int, batch: int, width: float, steps: int, env: dict) -> dict:
    """Median wall, user and system seconds per step of one subprocess with environment `env`."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(canvas), str(batch), str(width), str(steps)], env=env, capture_output=True, text=True, check=True
    )
    rows = sorted(json.loads(out.stdout.strip().splitlines()[-1]))
    wall, user, sys_ = rows[len(rows) // 2]
    return {"wall": wall, "user": user, "sys": sys_}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--canvases", default="128,256")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    default_env = {k: v for k, v in os.environ.items() if k not in KEEP_HEAP}
    print(f"BagNet rf 33, width {a.width}, BatchNorm, max pooling, batch {a.batch_size}, 1 thread; median of {a.steps} steps")
    results = []
    for canvas in (int(c) for c in a.canvases.split(",")):
        base = run(canvas, a.batch_size, a.width, a.steps, default_env)
        keep = run(canvas, a.batch_size, a.width, a.steps, {**default_env, **KEEP_HEAP})
        for name, r in (("glibc default", base), ("MALLOC_MMAP_MAX_=0 + trim 64 GiB", keep)):
            print(
                f"  canvas {canvas}² {name:>32}: {r['wall']:.2f} s/step (user {r['user']:.2f}, sys {r['sys']:.2f}), "
                f"{a.batch_size / r['wall']:.1f} images/s"
            )
        print(f"  canvas {canvas}²: speed-up {base['wall'] / keep['wall']:.2f}×")
        results.append({"canvas": canvas, "default": base, "keep_heap": keep, "speedup": base["wall"] / keep["wall"]})
    return results


if __name__ == "__main__":
    main()
