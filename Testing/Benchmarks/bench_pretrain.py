"""Pre-training benchmark: steps/s per crop size, augmentation share, peak memory.

For each crop size (default 64, 96, 128) it times, in one process on one device: a full
training step of the trainer (pair sampling + augmentation + forward/backward + Adam), and
the augmentation alone (``augment_pair``), and prints steps/s, pairs/s, the augmentation time
as a fraction of the step, and the peak memory (CUDA: max allocated; CPU: max RSS growth). On
CUDA it adds the bf16 FLOP/s and its share of the GPU's bf16 dense peak (``--peak-tflops``,
default 989 for an H100 SXM / 989 for an H200).

    python Testing/Benchmarks/bench_pretrain.py [--sizes 64 96 128] [--batch-size 2] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_engine import _sync  # same folder: one device-synchronising helper
from gvsl import augment
from gvsl.device import describe
from gvsl.train import PretrainConfig, Pretrainer


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synthetic_volumes(n: int, size: int, seed: int = 0):
    """Smooth random volumes in [0, 1] (z, y, x), a bit larger than the crop."""
    g = torch.Generator().manual_seed(seed)
    vols = []
    for _ in range(n):
        coarse = torch.rand(1, 1, 6, 6, 6, generator=g)
        v = torch.nn.functional.interpolate(coarse, size=(size + 8,) * 3, mode="trilinear", align_corners=True)
        vols.append(v[0, 0].numpy().astype(np.float32))
    return vols


def bench_size(size: int, batch: int, device_name: str, repeats: int, precision: str) -> dict:
    rss0 = _rss_gib()
    cfg = PretrainConfig(images=[], out=tempfile.mkdtemp(prefix="gvsl-bench-"), steps=10**6, batch_size=batch, crop=size,
                         device=device_name, precision=precision, save_every=0, progress="none")
    trainer = Pretrainer(cfg, volumes=synthetic_volumes(4, size))
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train_step()  # warm-up
    _sync(device)
    step_times = []
    for _ in range(repeats):
        t = time.perf_counter()
        trainer.train_step()
        _sync(device)
        step_times.append(time.perf_counter() - t)
    # augmentation alone on a batch like the trainer's
    x = trainer.precision.prepare_input(torch.rand(batch, 1, size, size, size))
    g = torch.Generator().manual_seed(0)
    augment.augment_pair(x, x, g)
    aug_times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        augment.augment_pair(x, x, g)
        _sync(device)
        aug_times.append(time.perf_counter() - t)
    step = statistics.median(step_times)
    aug = statistics.median(aug_times)
    r = {"crop": size, "batch": batch, "precision": trainer.precision.name, "step_s": round(step, 3),
         "steps_per_s": round(1 / step, 4), "pairs_per_s": round(batch / step, 4),
         "augment_s_per_batch": round(aug, 4), "augment_fraction_of_step": round(aug / step, 4)}
    if device.type == "cuda":
        r["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        counter = FlopCounterMode(display=False)
        with counter:
            trainer.train_step()
        r["tflops_per_s"] = round(counter.get_total_flops() / step / 1e12, 1)
    else:
        r["peak_rss_growth_gib"] = round(max(_rss_gib() - rss0, 0.0), 2)
    return r, device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak in TFLOP/s (H100 SXM / H200: 989)")
    args = parser.parse_args()
    rows = []
    device = None
    for size in args.sizes:
        r, device = bench_size(size, args.batch_size, args.device, args.repeats, args.precision)
        if "tflops_per_s" in r:
            r["share_of_peak"] = round(r["tflops_per_s"] / args.peak_tflops, 3)
        rows.append(r)
        print(f"crop {size:>3}^3 batch {r['batch']} {r['precision']}: {r['step_s']:.2f} s/step "
              f"({r['pairs_per_s']:.3f} pairs/s), augmentation {r['augment_s_per_batch']:.3f} s "
              f"= {100 * r['augment_fraction_of_step']:.1f} % of the step, "
              + (f"peak {r['peak_memory_gib']} GiB, {r['tflops_per_s']} TFLOP/s = "
                 f"{100 * r['share_of_peak']:.0f} % of peak" if "tflops_per_s" in r
                 else f"peak RSS growth {r['peak_rss_growth_gib']} GiB"), flush=True)
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            r["step_time_ratio_vs_first"] = round(r["step_s"] / base["step_s"], 2)
    print(json.dumps({"device": describe(device), "results": rows}))


if __name__ == "__main__":
    main()
