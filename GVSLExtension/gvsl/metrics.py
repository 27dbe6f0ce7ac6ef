"""Registration and segmentation metrics on arrays: global NCC, Dice per label, overlap masks.

Arrays are (z, y, x) on one grid; nothing here knows about the network.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

CHUNK_VOXELS = 4_000_000


def global_ncc(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> Optional[float]:
    """Pearson correlation of ``a`` and ``b`` (same shape) over ``mask`` (bool); None when the
    mask has fewer than 2 voxels or either image is constant there.

    Two passes in float64 over chunks of :data:`CHUNK_VOXELS` voxels (means, then centred
    sums), so a full-resolution CT costs no float64 copy of the whole image.
    """
    a = np.asarray(a).reshape(-1)
    b = np.asarray(b).reshape(-1)
    m = None if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
    chunks = [slice(i, min(i + CHUNK_VOXELS, a.size)) for i in range(0, a.size, CHUNK_VOXELS)]

    def part(sl):
        x = a[sl].astype(np.float64)
        y = b[sl].astype(np.float64)
        if m is not None:
            x, y = x[m[sl]], y[m[sl]]
        return x, y

    n = sa = sb = 0.0
    for sl in chunks:
        x, y = part(sl)
        n += x.size
        sa += float(x.sum())
        sb += float(y.sum())
    if n < 2:
        return None
    ma, mb = sa / n, sb / n
    saa = sbb = sab = 0.0
    for sl in chunks:
        x, y = part(sl)
        x -= ma
        y -= mb
        saa += float(np.dot(x, x))
        sbb += float(np.dot(y, y))
        sab += float(np.dot(x, y))
    den = math.sqrt(saa * sbb)
    if den <= 0:
        return None
    return float(sab / den)


def dice_per_label(fixed_labels: np.ndarray, warped_labels: np.ndarray,
                   labels: Optional[Sequence[int]] = None) -> dict:
    """Dice ``2|A n B| / (|A| + |B|)`` per label value (keys are str(label)) and their ``"mean"``.

    ``labels`` defaults to every non-zero value in either map; labels absent from both are skipped.
    """
    if labels is None:
        labels = sorted(set(np.unique(fixed_labels).tolist()) | set(np.unique(warped_labels).tolist()))
        labels = [v for v in labels if v != 0]
    out = {}
    for v in labels:
        a = fixed_labels == v
        b = warped_labels == v
        total = int(a.sum()) + int(b.sum())
        if total == 0:
            continue
        out[str(int(v))] = 2.0 * int(np.logical_and(a, b).sum()) / total
    vals = list(out.values())
    out["mean"] = float(np.mean(vals)) if vals else None
    return out


def overlap_mask(moving: sitk.Image, fixed: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """(z, y, x) bool on the fixed grid: where ``transform`` maps into the moving image's extent."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    m = sitk.Resample(ones, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayViewFromImage(m) > 0
