"""GVSL (network only, and refined on the pair) vs classical registration, on pairs with a KNOWN answer.

Pairs (:mod:`gvsl.known_pairs`): a brain (MR) and a heart (CT) phantom, each warped by a known
random smooth transform (cubic B-spline, 4^3 mesh, N(0, 4 mm) coefficients at 96^3, plus a
small rotation/translation), with labels warped by the same transform. One run, same pairs,
same process, same thread count for every method:

* ``gvsl network``: one forward pass (``gvsl.register(refine=0)``): time excludes refinement;
* ``gvsl refined``: the same forward pass + ``--steps`` of test-time refinement
  (:mod:`gvsl.refine`); time = everything ``gvsl.register`` does (preprocessing, network,
  refinement, export, metrics);
* ``sitk affine+bspline``: SimpleITK affine then B-spline (8^3 mesh), Mattes MI, 3 levels,
  LBFGSB (the settings of ``bench_register.py``);
* ``elastix``: itk-elastix (the engine of SlicerElastix) with its default "affine" and
  "bspline" parameter maps; skipped with a message when ``itk-elastix`` is not installed
  (``pip install itk-elastix``: a benchmark-only dependency).

Per method: seconds, mean label Dice, TRE (mm, mean over the fixed foreground: the estimated
transform vs the known one), % folding (Jacobian determinant <= 0 on the fixed grid), global
NCC (the same function for all, within the overlap); then the ratios of each gvsl result to
the best classical method (highest Dice). Without ``--model`` the network is a full-width GVSL
with random weights (seed 0): say so when quoting the network-only row.

    python Testing/Benchmarks/bench_classical.py [--kinds brain heart] [--size 96] [--steps 150 300]
                                                 [--threads 2] [--model CKPT] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_register import sitk_registration  # noqa: E402

from gvsl import known_pairs, phantoms  # noqa: E402
from gvsl import registration as R  # noqa: E402
from gvsl.grid import jacobian_determinant_lps, transform_displacement  # noqa: E402
from gvsl.progress import json_safe  # noqa: E402


def make_pair(kind: str, size: int):
    if kind == "brain":
        img, lab = phantoms.make_brain_phantom(size, seed=3)
    else:
        img, lab, _ = phantoms.make_heart_phantom(size, seed=3)
    return known_pairs.make_known_pair(img, lab, seed=1, std_mm=4.0 * size / 96)


def score(pair, transform: sitk.Transform) -> dict:
    fixed, moving = pair.fixed, pair.moving
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ncc = R.global_ncc(sitk.GetArrayViewFromImage(fixed), sitk.GetArrayViewFromImage(warped),
                       R.overlap_mask(moving, fixed, transform))
    wl = sitk.Resample(pair.moving_labels, fixed, transform, sitk.sitkNearestNeighbor, 0,
                       pair.moving_labels.GetPixelID())
    fl = sitk.GetArrayViewFromImage(pair.fixed_labels)
    dice = R.dice_per_label(fl, sitk.GetArrayViewFromImage(wl))["mean"]
    tre = known_pairs.tre_mm(transform, pair.truth, fixed, fl > 0)
    jac = sitk.GetArrayFromImage(jacobian_determinant_lps(transform_displacement(transform, fixed)))
    return {"dice": dice, "tre_mm": tre["mean"], "tre_p95_mm": tre["p95"],
            "folding_percent": float((jac <= 0).mean() * 100.0), "ncc": ncc}


def _to_itk(image: sitk.Image):
    import itk
    out = itk.GetImageFromArray(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)))
    out.SetSpacing(image.GetSpacing())
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(itk.matrix_from_array(np.array(image.GetDirection()).reshape(3, 3)))
    return out


def elastix_registration(fixed: sitk.Image, moving: sitk.Image, threads: int):
    """Default affine + B-spline maps -> (sitk displacement-field transform, seconds, field seconds)."""
    import itk
    if threads:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    f, m = _to_itk(fixed), _to_itk(moving)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("affine"))
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    t0 = time.perf_counter()
    # threads via ITK's global default only: itk-elastix 0.2x segfaults in UpdateLargestPossibleRegion
    # when number_of_threads= is also passed (measured here, Dec 2026)
    _, result = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
    seconds = time.perf_counter() - t0
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:  # transformix writes deformationField.nii into the cwd
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            field = itk.transformix_deformation_field(m, result)  # on the fixed grid, fixed -> moving, mm
        finally:
            os.chdir(cwd)
    arr = itk.GetArrayFromImage(field).astype(np.float64)
    disp = sitk.GetImageFromArray(arr, isVector=True)
    disp.CopyInformation(fixed)
    return sitk.DisplacementFieldTransform(disp), seconds


def run(kind: str, size: int, steps_list: list, model, threads: int, skip: set) -> list:
    pair = make_pair(kind, size)
    rows = [dict(method="before (identity)", seconds=0.0, **score(pair, sitk.Transform(3, sitk.sitkIdentity)))]
    preset = "mr" if kind == "brain" else "ct"
    R.register(pair.fixed, pair.moving, model, "cpu", preset=preset, refine=0)  # warm-up
    for i, steps in enumerate(steps_list):
        res = R.register(pair.fixed, pair.moving, model, "cpu", preset=preset, refine=steps)
        t = res.metrics["timings_s"]
        if i == 0:
            rows.append(dict(method="gvsl network", seconds=t["total"] - t.get("refine", 0.0),
                             **score(pair, res.network.composite)))
        rows.append(dict(method=f"gvsl refined ({steps} steps)", seconds=t["total"], refine_s=t["refine"],
                         **score(pair, res.composite)))
    if "sitk" not in skip:
        tx, info = sitk_registration(pair.fixed, pair.moving)
        rows.append(dict(method="sitk affine+bspline", seconds=info["total_s"], **score(pair, tx)))
    if "elastix" not in skip:
        try:
            import itk  # noqa: F401
            has_elastix = hasattr(itk, "elastix_registration_method")
        except ImportError:
            has_elastix = False
        if has_elastix:
            tx, seconds = elastix_registration(pair.fixed, pair.moving, threads)
            rows.append(dict(method="elastix affine+bspline", seconds=seconds, **score(pair, tx)))
        else:
            print("elastix skipped: `pip install itk-elastix` to include it (benchmark only, not a gvsl "
                  "dependency)", flush=True)
    for r in rows:
        r["kind"] = kind
    return rows


def table(rows: list) -> str:
    lines = ["| pair | method | seconds | mean Dice | TRE mean (mm) | TRE p95 (mm) | folding % | NCC |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['method']} | {r['seconds']:.1f} | {r['dice']:.3f} | {r['tre_mm']:.2f} | "
                     f"{r['tre_p95_mm']:.2f} | {r['folding_percent']:.3f} | {r['ncc']:.4f} |")
    return "\n".join(lines)


def ratios(rows: list) -> list:
    out = []
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        classical = [r for r in mine if r["method"].startswith(("sitk", "elastix"))]
        if not classical:
            continue
        best = max(classical, key=lambda r: r["dice"])
        for r in mine:
            if r["method"].startswith("gvsl"):
                out.append(f"{kind}: {r['method']} vs best classical ({best['method']}): time x"
                           f"{r['seconds'] / best['seconds']:.2f}, Dice {r['dice'] - best['dice']:+.3f}, "
                           f"TRE x{r['tre_mm'] / max(best['tre_mm'], 1e-9):.2f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["brain", "heart"], choices=["brain", "heart"])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--steps", type=int, nargs="+", default=[150, 300],
                    help="refinement step counts, one gvsl refined row each (default 150 = the CPU default, 300)")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch, SimpleITK and elastix (default 2)")
    ap.add_argument("--model", help="GVSL checkpoint (default: full-width GVSL, random weights, seed 0)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["sitk", "elastix"])
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    if args.model:
        from gvsl.checkpoint import load_model
        model, what = load_model(args.model), args.model
    else:
        from gvsl.network import GVSL
        torch.manual_seed(0)
        model, what = GVSL().eval(), "full-width GVSL, random weights (untrained)"
    print(f"network: {what}; {args.threads} threads; pairs {args.size}^3", flush=True)
    rows = []
    for kind in args.kinds:
        rows += run(kind, args.size, args.steps, model, args.threads, set(args.skip))
        print(table([r for r in rows if r["kind"] == kind]), flush=True)
    print()
    print(table(rows))
    for line in ratios(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe({"network": what, "threads": args.threads, "rows": rows}),
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
