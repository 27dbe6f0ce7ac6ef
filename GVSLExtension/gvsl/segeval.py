"""Per-structure Dice and HD95 of a predicted label map against the truth.

Both maps hold the task's source label values (e.g. heart 205...850) on the same voxel grid.
For each structure of the task's table: Dice (``monai.metrics.compute_dice``) and the 95th
percentile symmetric Hausdorff distance in **mm** with MONAI's definition
(``compute_hausdorff_distance(percentile=95)``: surface voxels = mask minus its 6-connected
erosion; per direction the 95th percentile (linear interpolation) of the distances from one
surface's voxel centres to the nearest voxel centre of the other; the larger of the two). The
distances come from SimpleITK's exact Euclidean distance map with the voxel spacing, because
MONAI's CPU path needs SciPy, which is not a dependency of this package (the test checks it
against brute-force distances). Both are computed on the structure's bounding box (union of
prediction and truth, 2-voxel margin: the values are those of the whole volume, cheaper).
A structure absent from both maps has Dice and HD95 ``None``; present in one only: Dice 0 and
HD95 ``None`` (infinite). ``mean_dice`` averages the structures present in the truth.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np
import SimpleITK as sitk

MARGIN_VOXELS = 2


def _crop_box(a: np.ndarray, b: np.ndarray) -> Optional[tuple]:
    both = a | b
    if not both.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(i for i in range(3) if i != axis)
        idx = np.nonzero(both.any(axis=other))[0]
        box.append(slice(max(int(idx[0]) - MARGIN_VOXELS, 0), int(idx[-1]) + MARGIN_VOXELS + 1))
    return tuple(box)


def _surface(mask: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    erode = sitk.BinaryErodeImageFilter()
    erode.SetKernelType(sitk.sitkCross)
    erode.SetKernelRadius(1)
    erode.SetForegroundValue(1)
    erode.SetBoundaryToForeground(False)
    return sitk.And(img, sitk.Not(erode.Execute(img)))


def _directed_distances_mm(from_mask: np.ndarray, to_mask: np.ndarray, spacing_zyx) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``from_mask`` to the nearest surface voxel of ``to_mask``."""
    to_surface = _surface(to_mask)
    to_surface.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    dist = sitk.SignedMaurerDistanceMap(to_surface, insideIsPositive=False, squaredDistance=False,
                                        useImageSpacing=True)
    from_surface = sitk.GetArrayFromImage(_surface(from_mask)).astype(bool)
    return np.abs(sitk.GetArrayViewFromImage(dist)[from_surface])


def hd95_mm(pred_mask: np.ndarray, truth_mask: np.ndarray, spacing_zyx) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) of two non-empty boolean masks."""
    return float(max(np.percentile(_directed_distances_mm(pred_mask, truth_mask, spacing_zyx), 95),
                     np.percentile(_directed_distances_mm(truth_mask, pred_mask, spacing_zyx), 95)))


def structure_metrics(pred_mask: np.ndarray, truth_mask: np.ndarray, spacing_zyx) -> dict:
    """Dice and HD95 (mm) of two boolean (z, y, x) masks."""
    import torch
    from monai.metrics import compute_dice
    box = _crop_box(pred_mask, truth_mask)
    if box is None:
        return {"dice": None, "hd95_mm": None, "pred_voxels": 0, "truth_voxels": 0}
    p = torch.from_numpy(np.ascontiguousarray(pred_mask[box]))[None, None].float()
    t = torch.from_numpy(np.ascontiguousarray(truth_mask[box]))[None, None].float()
    dice = float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0])
    hd = None
    if pred_mask.any() and truth_mask.any():
        hd = hd95_mm(pred_mask[box], truth_mask[box], spacing_zyx)
    return {"dice": dice, "hd95_mm": hd, "pred_voxels": int(pred_mask.sum()), "truth_voxels": int(truth_mask.sum())}


def evaluate(pred: sitk.Image, truth: sitk.Image, task, ignore_unknown: bool = False, remap=None) -> dict:
    """-> {"structures": {name: {value, dice, hd95_mm, pred_voxels, truth_voxels}}, "mean_dice",
    "mean_hd95_mm", "task"}. ``task``: heart | coronary | brain | a TSV table | a LabelTable;
    truth values outside the table: error, or background with ``ignore_unknown`` / ``remap``."""
    from gvsl.segdata import LabelEncoder, SegmentationDataError, check_label_image, resolve_table
    table = resolve_table(task)
    check_label_image(pred, truth, "the prediction", "the truth")
    encoder = LabelEncoder(table, dict(remap or {}), ignore_unknown)
    truth_cls, n_unknown = encoder.encode(sitk.GetArrayViewFromImage(truth), "the truth")
    try:
        pred_cls, _ = LabelEncoder(table).encode(sitk.GetArrayViewFromImage(pred), "the prediction")
    except SegmentationDataError as exc:
        raise SegmentationDataError(f"{exc} (the prediction must use the task's label values)") from None
    spacing_zyx = tuple(pred.GetSpacing())[::-1]
    out = {}
    for i, lab in enumerate(table, start=1):
        m = structure_metrics(pred_cls == i, truth_cls == i, spacing_zyx)
        out[lab.name] = {"value": lab.value, **m}
    present = [m for m in out.values() if m["truth_voxels"] > 0]
    dices = [m["dice"] for m in present if m["dice"] is not None]
    hds = [m["hd95_mm"] for m in present if m["hd95_mm"] is not None]
    return {"task": table.name, "structures": out,
            "mean_dice": float(np.mean(dices)) if dices else None,
            "mean_hd95_mm": float(np.mean(hds)) if hds else None,
            "unknown_truth_voxels": n_unknown}


def format_table(result: dict) -> str:
    """A plain-text table: structure, value, Dice, HD95 (mm), voxels."""
    def f(v, fmt):
        return "-" if v is None else fmt.format(v)
    rows = [f"{'structure':<32} {'value':>6} {'Dice':>7} {'HD95 mm':>8} {'truth vox':>10} {'pred vox':>9}"]
    for name, m in result["structures"].items():
        rows.append(f"{name:<32} {m['value']:>6} {f(m['dice'], '{:.4f}'):>7} {f(m['hd95_mm'], '{:.2f}'):>8} "
                    f"{m['truth_voxels']:>10} {m['pred_voxels']:>9}")
    rows.append(f"{'mean (structures in the truth)':<39} {f(result['mean_dice'], '{:.4f}'):>7} "
                f"{f(result['mean_hd95_mm'], '{:.2f}'):>8}")
    return "\n".join(rows)


def run_cli(args) -> int:
    """Handler of ``gvsl evaluate``."""
    from gvsl.checkpoint import atomic_write_text
    from gvsl.io import read_volume
    from gvsl.progress import json_safe
    from gvsl.segdata import load_remap
    result = evaluate(read_volume(args.pred), read_volume(args.truth), args.task,
                      ignore_unknown=args.ignore_unknown_labels, remap=load_remap(args.remap) if args.remap else None)
    text = json.dumps(json_safe(result), indent=2)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    if args.progress == "json":
        print(json.dumps(json_safe({"event": "done", "task": "evaluate", **result})))
    else:
        print(format_table(result))
    return 0
