"""Backbone forward on the CPU: contiguous fp32 vs channels-last 3D fp32 vs bf16 (vs OpenVINO).

One run per variant after one warm-up, full-width GVSL backbone, batch 1, seeded random input;
prints seconds, the speed-up over contiguous fp32 (the baseline in the same process) and the max
abs difference of f_local against it. OpenVINO is tried only when the ``openvino`` package is
installed (it is never a dependency of gvsl).

    python Testing/Benchmarks/bench_inference.py [--sizes 96 128] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn, repeats: int = 1):
    fn()  # warm-up (one-time kernel selection, allocations)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from gvsl.device import cpu_has_native_bf16, describe
    from gvsl.network import GVSL
    torch.manual_seed(0)
    model = GVSL().eval()
    backbone = model.unet
    rows = []
    for n in args.sizes:
        x = torch.rand(1, 1, n, n, n)
        with torch.no_grad():
            base_s, (_, ref) = timed(lambda: backbone(x))
            rows.append({"size": n, "variant": "fp32 contiguous", "seconds": round(base_s, 2), "speedup": 1.0,
                         "max_abs_diff": 0.0})
            cl = backbone.to(memory_format=torch.channels_last_3d)
            xc = x.contiguous(memory_format=torch.channels_last_3d)
            s, (_, out) = timed(lambda: cl(xc))
            rows.append({"size": n, "variant": "fp32 channels_last_3d", "seconds": round(s, 2),
                         "speedup": round(base_s / s, 2), "max_abs_diff": float((out - ref).abs().max())})
            if cpu_has_native_bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    s, (_, out) = timed(lambda: cl(xc))
                rows.append({"size": n, "variant": "bf16 autocast channels_last_3d", "seconds": round(s, 2),
                             "speedup": round(base_s / s, 2), "max_abs_diff": float((out.float() - ref).abs().max())})
            backbone.to(memory_format=torch.contiguous_format)
        try:
            import openvino as ov
        except ImportError:
            rows.append({"size": n, "variant": "openvino", "skipped": "package not installed"})
            continue
        converted = ov.convert_model(backbone, example_input=x)
        # OpenVINO's CPU plugin runs bf16 by default on AMX CPUs: measure both hints
        for hint in ("f32", "bf16"):
            compiled = ov.compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": hint})
            s, out = timed(lambda: compiled(x.numpy()))
            local = torch.from_numpy(out[1])
            rows.append({"size": n, "variant": f"openvino {hint}", "seconds": round(s, 2),
                         "speedup": round(base_s / s, 2), "max_abs_diff": float((local - ref).abs().max())})
    print(json.dumps({"device": describe(torch.device("cpu")), "reference_max_abs": float(ref.abs().max()),
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
