"""Registration of a large synthetic CT on the CPU: seconds and peak RSS (issue 7's memory target).

A 512 x 512 x 300 CT at 0.7 x 0.7 x 1.0 mm (int16 HU, smooth blobs in air/soft tissue) is
registered onto a shifted, mildly deformed copy of itself with a random-weight full-width GVSL
network (the timing and memory do not depend on the weights). Each run happens in a fresh child
process so its peak RSS (``ru_maxrss``) is its own; the child prints one JSON line.

    python Testing/Benchmarks/bench_register_large.py [--size 512 512 300] [--out DIR]
        [--gvsl-path GVSLExtension]   # e.g. the GVSLExtension folder of an older checkout

Target (issue 7): peak RSS <= 6 GB. Memory is what this measures; seconds are one noisy run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_ct(size, spacing, shift_mm=(0.0, 0.0, 0.0), seed=0):
    """int16 HU volume (x, y, z) = ``size`` with ``spacing`` mm: air, a body ellipsoid, blobs."""
    import numpy as np
    import SimpleITK as sitk
    nx, ny, nz = size
    z = (np.arange(nz, dtype=np.float32) * spacing[2] - shift_mm[2])[:, None, None]
    y = (np.arange(ny, dtype=np.float32) * spacing[1] - shift_mm[1])[None, :, None]
    x = (np.arange(nx, dtype=np.float32) * spacing[0] - shift_mm[0])[None, None, :]
    cx, cy, cz = nx * spacing[0] / 2, ny * spacing[1] / 2, nz * spacing[2] / 2
    arr = np.full((nz, ny, nx), -1000, np.int16)
    body = ((x - cx) / (0.42 * nx * spacing[0])) ** 2 + ((y - cy) / (0.35 * ny * spacing[1])) ** 2 \
        + ((z - cz) / (0.48 * nz * spacing[2])) ** 2 < 1
    arr[body] = 40
    rng = np.random.default_rng(seed)
    for _ in range(12):
        c = rng.uniform(0.3, 0.7, 3) * [cx * 2, cy * 2, cz * 2]
        r = rng.uniform(15, 45)
        blob = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < r * r
        arr[blob & body] = int(rng.uniform(-100, 900))
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    return img


def child(size, spacing) -> None:
    import resource
    import time

    import torch

    import gvsl
    from gvsl.network import GVSL
    torch.manual_seed(0)
    fixed = make_ct(size, spacing)
    moving = make_ct(size, spacing, shift_mm=(4.0, -3.0, 2.0), seed=0)
    model = GVSL().eval()
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    t0 = time.perf_counter()
    result = gvsl.register(fixed, moving, model, "cpu")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        from gvsl import registration
        writer = getattr(registration, "write_outputs")
        writer(result, tmp, overview=False)
        write_s = time.perf_counter() - t1
    peak_written = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"seconds_register": round(seconds, 1), "seconds_write": round(write_s, 1),
                      "peak_rss_gib_inputs": round(rss_inputs, 2), "peak_rss_gib_register": round(peak, 2),
                      "peak_rss_gib_with_outputs": round(peak_written, 2),
                      "network_grid": result.metrics.get("network_grid_size"),
                      "timings_s": result.metrics.get("timings_s")}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, nargs=3, default=[512, 512, 300])
    p.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 1.0])
    p.add_argument("--gvsl-path", default=str(ROOT / "GVSLExtension"),
                   help="folder holding the gvsl package to measure (default: this checkout)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.size, args.spacing)
        return
    env = dict(os.environ, PYTHONPATH=args.gvsl_path)
    cmd = [sys.executable, __file__, "--child", "--size", *map(str, args.size), "--spacing", *map(str, args.spacing)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"benchmark child failed:\n{out.stderr[-3000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["gvsl_path"] = args.gvsl_path
    record["target_peak_rss_gib"] = 6.0
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
