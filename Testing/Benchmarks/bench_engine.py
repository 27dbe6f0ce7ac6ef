"""Engine benchmark: is the network, not overhead, the cost of a training step?

Prints, in one run on one device: the forward+backward time of one training pair (the full
GVSL loss: NCC + smoothness + MSE), its FLOPs (torch.utils.flop_counter) and FLOP/s; the FLOP/s
of a bare conv3d forward+backward probe shaped like the network's dominant layers (32 -> 32
channels, 3x3x3, at the crop size, batch 2 = the two images of the pair); and their ratio.
Target on CPU: ratio >= 0.8. On CUDA it adds the bf16 autocast figures.

    python Testing/Benchmarks/bench_engine.py [--size 64] [--device auto] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gvsl import losses
from gvsl.device import choose_precision, describe, select_device
from gvsl.network import GVSL


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def count_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def model_step_fn(model, a, b, precision, ncc):
    def step():
        with precision.autocast():
            restored, warped, _, flow = model(a, b)
        loss = ncc(warped, a) + losses.smoothness_loss(flow) + losses.restoration_loss(restored, a)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def probe_fn(x, w, precision):
    def step():
        with precision.autocast():
            y = F.conv3d(x, w, padding=1)
        y.float().sum().backward()
        w.grad = None
        x.grad = None
    return step


def run(size: int, device_name: str, repeats: int) -> dict:
    device = select_device(device_name)
    results = {"device": describe(device), "size": size, "torch": torch.__version__}
    configs = [("fp32", "fp32")]
    if device.type == "cuda":
        configs.append(("bf16", "bf16"))
    for label, prec_name in configs:
        precision = choose_precision(device, "training", prec_name)
        torch.manual_seed(0)
        model = precision.prepare_model(GVSL()).train()
        a = precision.prepare_input(torch.rand(1, 1, size, size, size))
        b = precision.prepare_input(torch.rand(1, 1, size, size, size))
        step = model_step_fn(model, a, b, precision, losses.NCCLoss())
        flops = count_flops(step)
        t_model = timed(step, device, repeats)
        x = precision.prepare_input(torch.rand(2, 32, size, size, size)).requires_grad_(True)
        w = torch.randn(32, 32, 3, 3, 3, device=device, requires_grad=True)
        probe = probe_fn(x, w, precision)
        probe_flops = count_flops(probe)
        t_probe = timed(probe, device, repeats)
        r = {
            "pair_fwd_bwd_s": round(t_model, 3),
            "pair_gflop": round(flops / 1e9, 1),
            "model_gflops_per_s": round(flops / t_model / 1e9, 1),
            "probe_gflops_per_s": round(probe_flops / t_probe / 1e9, 1),
        }
        r["ratio_model_to_probe"] = round(r["model_gflops_per_s"] / r["probe_gflops_per_s"], 3)
        if device.type == "cuda":
            r["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            torch.cuda.reset_peak_memory_stats(device)
        results[label] = r
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    res = run(args.size, args.device, args.repeats)
    print(f"GVSL engine benchmark on {res['device']}, one {args.size}^3 training pair (batch 1)")
    for key in ("fp32", "bf16"):
        if key in res:
            r = res[key]
            print(f"  {key}: fwd+bwd {r['pair_fwd_bwd_s']:.3f} s, {r['pair_gflop']} GFLOP, "
                  f"model {r['model_gflops_per_s']} GFLOP/s, conv3d probe {r['probe_gflops_per_s']} GFLOP/s, "
                  f"ratio {r['ratio_model_to_probe']:.2f} (target >= 0.8)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
