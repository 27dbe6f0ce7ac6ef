"""Registration benchmark: ``gvsl.register`` vs a typical SimpleITK affine + B-spline registration.

For each pair size (default a 128^3 pair and a 192x192x160 pair of synthetic cardiac CT phantoms,
:func:`gvsl.phantoms.make_heart_phantom`: two cases with different poses and smooth deformations
of the same anatomy) it times, on the same machine:

* ``gvsl.register`` (one network forward pass + exact export + metrics), after a small warm-up;
* SimpleITK ``ImageRegistrationMethod``: affine (Mattes MI, 50 bins, 1 % random sampling,
  RegularStepGradientDescent 100 iterations/level, physical-shift scales), then a B-spline with
  an 8^3 mesh (Mattes MI, LBFGSB 50 iterations/level) on top of it, both with a 3-level pyramid
  (shrink 4/2/1, smoothing 2/1/0 voxels);

and prints NCC before/after (global Pearson NCC within the overlap, the same function for both,
:func:`gvsl.registration.global_ncc`), mean Dice of the 7 heart labels, the times and the speed ratio,
as a table plus one JSON line. Without ``--model`` the network has random weights, so its
accuracy numbers only show the untrained baseline; the timing is what it measures.

    python Testing/Benchmarks/bench_register.py [--sizes 128 192x192x160] [--device auto]
                                                [--model CKPT] [--threads N] [--sampling 0.01]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import SimpleITK as sitk
import torch

from gvsl import registration as R
from gvsl.device import describe, select_device
from gvsl.progress import json_safe
from gvsl.network import GVSL
from gvsl.phantoms import make_heart_phantom


def parse_size(text: str) -> tuple:
    parts = [int(v) for v in text.lower().split("x")]
    return tuple(parts * 3) if len(parts) == 1 else tuple(parts)


def _centre(image: sitk.Image) -> np.ndarray:
    return np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))


def phantom_pair(size_xyz: tuple):
    """Two heart phantoms (fixed seed 11, moving seed 12) cropped to ``size_xyz`` voxels; the
    moving one is shifted to share the fixed image centre exactly (what SimpleITK's
    CenteredTransformInitializer does; gvsl starts from physical space)."""
    n = max(size_xyz)
    out = []
    for seed in (11, 12):
        ct, labels, _ = make_heart_phantom(size=n, seed=seed)
        lo = [(n - s) // 2 for s in size_xyz]
        crop = tuple(slice(a, a + s) for a, s in zip(lo, size_xyz))
        out.append([ct[crop], labels[crop]])
    shift = _centre(out[0][0]) - _centre(out[1][0])
    for img in out[1]:
        img.SetOrigin((np.array(img.GetOrigin()) + shift).tolist())
    return out


def scores(fixed, moving, fixed_labels, moving_labels, transform) -> dict:
    warped = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, transform, sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    mask = R._overlap_mask(moving, fixed, transform)
    ncc = R.global_ncc(sitk.GetArrayViewFromImage(fixed), sitk.GetArrayViewFromImage(warped), mask)
    wl = sitk.Resample(moving_labels, fixed, transform, sitk.sitkNearestNeighbor, 0, moving_labels.GetPixelID())
    dice = R.dice_per_label(sitk.GetArrayViewFromImage(fixed_labels), sitk.GetArrayViewFromImage(wl))["mean"]
    return {"ncc": ncc, "dice": dice}


def sitk_registration(fixed, moving, mesh: int = 8, affine_iterations: int = 100, bspline_iterations: int = 50,
                      sampling: float = 0.01):
    """Affine then B-spline (on top of the affine), Mattes MI, 3-level pyramid -> (transform, seconds)."""
    f = sitk.Cast(fixed, sitk.sitkFloat32)
    m = sitk.Cast(moving, sitk.sitkFloat32)

    def method():
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(sampling, 1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        return reg

    t0 = time.perf_counter()
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = method()
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                 numberOfIterations=affine_iterations,
                                                 gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=False)
    affine = reg.Execute(f, m)
    t_affine = time.perf_counter() - t0
    bspline = sitk.BSplineTransformInitializer(f, [mesh] * 3, order=3)
    reg = method()
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=bspline_iterations,
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=1000,
                             costFunctionConvergenceFactor=1e7)
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(f, m)
    total = time.perf_counter() - t0
    return sitk.CompositeTransform([affine, bspline]), {"affine_s": t_affine, "total_s": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["128", "192x192x160"], help="pair sizes, N or XxYxZ")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", help="GVSL checkpoint (default: random weights; timing only)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch and SimpleITK (0: default)")
    ap.add_argument("--skip-sitk", action="store_true", help="time gvsl.register only")
    ap.add_argument("--sampling", type=float, default=0.01, help="SimpleITK metric sampling fraction (default 0.01)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    dev = select_device(args.device)
    torch.manual_seed(0)
    if args.model:
        from gvsl.checkpoint import load_model
        model = load_model(args.model)
    else:
        model = GVSL()
    # warm-up: imports, allocator, kernels
    tiny = sitk.GetImageFromArray(np.random.rand(24, 24, 24).astype(np.float32))
    R.register(tiny, tiny, model, dev)

    rows = []
    for text in args.sizes:
        size = parse_size(text)
        (fixed, fixed_labels), (moving, moving_labels) = phantom_pair(size)
        identity = sitk.Transform(3, sitk.sitkIdentity)
        before = scores(fixed, moving, fixed_labels, moving_labels, identity)
        t0 = time.perf_counter()
        res = R.register(fixed, moving, model, dev)
        t_gvsl = time.perf_counter() - t0
        after = scores(fixed, moving, fixed_labels, moving_labels, res.composite)
        row = {"size": "x".join(map(str, size)), "fixed_spacing_mm": list(fixed.GetSpacing()),
               "ncc_before": before["ncc"], "dice_before": before["dice"],
               "gvsl_s": t_gvsl, "gvsl_network_s": res.metrics["timings_s"]["network"],
               "gvsl_grid": res.metrics["network_grid_size"], "gvsl_spacing_mm": res.metrics["network_spacing_mm"],
               "gvsl_ncc_affine": res.metrics["ncc_affine"], "gvsl_ncc_after": after["ncc"],
               "gvsl_dice_after": after["dice"], "gvsl_device": res.metrics["device"],
               "gvsl_precision": res.metrics["precision"]}
        if not args.skip_sitk:
            tx, t = sitk_registration(fixed, moving, sampling=args.sampling)
            s = scores(fixed, moving, fixed_labels, moving_labels, tx)
            row.update({"sitk_s": t["total_s"], "sitk_affine_s": t["affine_s"], "sitk_ncc_after": s["ncc"],
                        "sitk_dice_after": s["dice"], "speedup": t["total_s"] / t_gvsl})
        rows.append(row)
        print(f"# {row['size']} done", flush=True)

    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    weights = args.model or "random weights (timing only)"
    print(f"\ngvsl.register on {describe(dev)}, model: {weights}; SimpleITK with "
          f"{sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()} threads")
    print(f"{'size':>12} {'NCC before':>10} {'gvsl NCC':>9} {'sitk NCC':>9} {'Dice before':>11} {'gvsl Dice':>9} "
          f"{'sitk Dice':>9} {'gvsl s':>7} {'(net s)':>7} {'sitk s':>7} {'speedup':>7}")
    for r in rows:
        print(f"{r['size']:>12} {f(r['ncc_before']):>10} {f(r['gvsl_ncc_after']):>9} {f(r.get('sitk_ncc_after')):>9} "
              f"{f(r['dice_before']):>11} {f(r['gvsl_dice_after']):>9} {f(r.get('sitk_dice_after')):>9} "
              f"{r['gvsl_s']:>7.1f} {r['gvsl_network_s']:>7.1f} {f(r.get('sitk_s'), '{:.1f}'):>7} "
              f"{f(r.get('speedup'), '{:.2f}x'):>7}")
    print(json.dumps({"benchmark": "register", "device": describe(dev), "model": weights,
                      "rows": json_safe(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
