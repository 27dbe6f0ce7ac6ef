"""gvsl.segment vs plain MONAI sliding_window_inference: time and peak memory, one run, ratios.

A synthetic 256 x 256 x 200 CT (int16, 1 mm, so the network grid has the input's size) is
segmented twice, each in a fresh child process so peak RSS is measured separately:

* ``plain``: the volume already normalised to [0, 1] (float32, (z, y, x)), then
  ``sliding_window_inference(mode="gaussian")`` with the same network and window, argmax;
* ``gvsl``: ``gvsl.seginfer.segment`` from the raw int16 image: preprocessing, the same Gaussian
  windows streamed (``gvsl.slidingwindow``: rolling buffer of one window depth) through
  ``gvsl.inference.Inference``, each finished z-slab's softmax resampled onto the input grid and
  argmax'd at once (``LabelResampler``), source label values;
* ``window``: one window forward through ``gvsl.inference.Inference`` (what the model costs).

Printed: seconds for each and the ratio (target: gvsl <= 1.05 x plain), peak RSS above the
process's baseline (after imports, model and input in memory) against the budget
``3 x input float32 size + model`` for each, where model = weights + the peak RSS of one window
forward measured in this run (``window``), and the rolling buffer the formula predicts. Every
child first sets glibc to return blocks over 1 MB to the OS at once, as ``gvsl segment`` does
(``--allocator default`` keeps glibc's dynamic threshold, which holds freed window tensors). Run from
the repository root:

    PYTHONPATH=GVSLExtension python Testing/Benchmarks/bench_segment.py [--width 8 16 32 64 128 64 32 16 8]
        [--window 96] [--task heart] [--device cpu] [--size 256 256 200] [--allocator mmap|default]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(args) -> None:
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.inferers import sliding_window_inference

    import gvsl.inference, gvsl.io, gvsl.segmodel, gvsl.slidingwindow  # noqa: F401  (imports before the baseline)
    if args.allocator == "mmap":  # as `gvsl segment` does; the same for every mode
        assert gvsl.inference.return_large_blocks_to_os()
    from gvsl.checkpoint import load_model
    from gvsl.preprocessing import normalize_intensity
    from gvsl.seginfer import segment
    nx, ny, nz = args.size
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 30, (nz, ny, nx)).astype(np.float32) - 900
    zz, yy, xx = np.ogrid[:nz, :ny, :nx]
    arr[((zz - nz / 2) / (nz / 3)) ** 2 + ((yy - ny / 2) / (ny / 3)) ** 2 + ((xx - nx / 2) / (nx / 3)) ** 2 < 1] += 1000
    image = sitk.GetImageFromArray(arr.astype(np.int16))
    del arr, zz, yy, xx
    model = load_model(args.model, args.device, kind="segmentation")
    if args.mode == "window":
        from gvsl.inference import Inference
        x = np.zeros((args.window,) * 3, np.float32)
        base = _rss_mb()
        t = time.perf_counter()
        Inference(model, args.device).run(lambda m, v: m(v).shape, x)
        print(json.dumps({"mode": "window", "seconds": time.perf_counter() - t, "baseline_mb": base,
                          "peak_mb": _peak_mb()}))
        return
    if args.mode == "plain":
        x = normalize_intensity(sitk.GetArrayViewFromImage(image), "ct")
        del image
    base = _rss_mb()
    t = time.perf_counter()
    with torch.no_grad():
        if args.mode == "plain":
            logits = sliding_window_inference(torch.from_numpy(x)[None, None].to(args.device), (args.window,) * 3, 1,
                                              model, overlap=0.25, mode="gaussian")
            labels = logits[0].argmax(dim=0).cpu().numpy().astype(np.uint16)
        else:
            res = segment(image, model, args.device, window=args.window)
            labels, timings = sitk.GetArrayFromImage(res.labels), res.timings_s
    seconds = time.perf_counter() - t
    print(json.dumps({"mode": args.mode, "timings_s": locals().get("timings"), "seconds": seconds, "baseline_mb": base, "peak_mb": _peak_mb(),
                      "labels_shape": list(labels.shape)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, nargs=9, default=[8, 16, 32, 64, 128, 64, 32, 16, 8])
    ap.add_argument("--window", type=int, default=96)
    ap.add_argument("--task", default="heart")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, nargs=3, default=[256, 256, 200], metavar=("X", "Y", "Z"))
    ap.add_argument("--allocator", choices=("mmap", "default"), default="mmap",
                    help="mmap: every child returns blocks > 1 MB to the OS at once, as `gvsl segment` does "
                         "(gvsl.inference.return_large_blocks_to_os); default: glibc's dynamic threshold")
    ap.add_argument("--mode", choices=("plain", "gvsl", "window"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:
        child(args)
        return 0
    import torch

    from gvsl.checkpoint import save_checkpoint
    from gvsl.network import count_parameters
    from gvsl.segdata import resolve_table
    from gvsl.segmodel import labels_entry, new_model
    table = resolve_table(args.task)
    torch.manual_seed(0)
    model = new_model(table, tuple(args.width))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "seg.pt")
        save_checkpoint(path, model, kind="segmentation", labels=labels_entry(table), train_config={"crop": args.window},
                        preprocessing={"preset": "ct", "spacing_mm": 1.0})
        results = {}
        for mode in ("window", "plain", "gvsl"):
            cmd = [sys.executable, __file__, "--mode", mode, "--model", path, "--window", str(args.window),
                   "--device", args.device, "--size", *map(str, args.size), "--allocator", args.allocator]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[mode] = json.loads(out)
            print(f"{mode}: {results[mode]['seconds']:.1f} s, peak RSS {results[mode]['peak_mb']:.0f} MB "
                  f"(baseline {results[mode]['baseline_mb']:.0f} MB)"
                  + (f", stages {results[mode]['timings_s']}" if results[mode].get("timings_s") else ""), flush=True)
    nx, ny, nz = args.size
    n_classes = len(table) + 1
    input_mb = nx * ny * nz * 4 / 2 ** 20
    weights_mb = count_parameters(model) * 4 / 2 ** 20
    forward_mb = results["window"]["peak_mb"] - results["window"]["baseline_mb"]
    budget = 3 * input_mb + weights_mb + forward_mb
    buffer_mb = (n_classes + 1) * args.window * max(ny, args.window) * max(nx, args.window) * 4 / 2 ** 20
    print(f"\nvolume {nx}x{ny}x{nz}, {n_classes} classes, window {args.window}, width {args.width}, {args.device}, "
          f"allocator {args.allocator}")
    print(f"time: gvsl / plain = {results['gvsl']['seconds'] / results['plain']['seconds']:.3f} (target <= 1.05)")
    print(f"model: weights {weights_mb:.1f} MB + one {args.window}^3 window forward {forward_mb:.0f} MB (peak RSS above "
          f"baseline, {results['window']['seconds']:.1f} s)")
    print(f"budget: 3 x input float32 {input_mb:.0f} MB + model {weights_mb + forward_mb:.0f} MB = {budget:.0f} MB; "
          f"gvsl's rolling buffer (C + 1) x window x Y x X x 4 B = {buffer_mb:.0f} MB of it")
    for mode in ("plain", "gvsl"):
        extra = results[mode]["peak_mb"] - results[mode]["baseline_mb"]
        print(f"peak RSS above baseline, {mode}: {extra:.0f} MB = {extra / budget:.2f} x the budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
