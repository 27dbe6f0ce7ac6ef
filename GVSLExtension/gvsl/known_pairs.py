"""Registration pairs with a KNOWN answer: a phantom and a copy warped by a known smooth transform.

Used by the refinement tests, the classical-registration benchmark, the evidence script and the
demo, wherever a registration must be scored against the truth (TRE) and not only by overlap.

Construction (LPS mm, ITK resampling convention: transforms map FIXED points to MOVING points):

* ``moving`` is the phantom as given (image + labels);
* ``truth`` = ``CompositeTransform([affine, bspline])``: a fixed point ``p`` goes to
  ``affine(bspline(p))`` -- a cubic B-spline with a ``mesh``^3 control mesh over the image and
  N(0, ``std_mm``) random coefficients, then a small rotation (up to ``rotation_deg`` per axis,
  about the image centre) and translation (up to ``translation_mm`` per axis);
* ``fixed`` = ``Resample(moving, truth)`` (linear) plus fresh Gaussian noise of ``noise`` x the
  image's foreground standard deviation, and ``fixed_labels`` = ``Resample(labels, truth)``
  (nearest neighbour).

So ``moving(truth(p)) ~ fixed(p)`` and the ideal registration of ``moving`` onto ``fixed`` IS
``truth``; :func:`tre_mm` measures how far an estimated transform lands from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk


@dataclass
class KnownPair:
    """fixed / moving images and label maps on their own grids; ``truth`` maps fixed -> moving."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image
    moving_labels: sitk.Image
    truth: sitk.Transform


def random_smooth_transform(reference: sitk.Image, seed: int, *, std_mm: float = 4.0, mesh: int = 4,
                            rotation_deg: float = 3.0, translation_mm: float = 3.0) -> sitk.Transform:
    """``CompositeTransform([affine, bspline])`` on ``reference``'s domain (see the module doc)."""
    rng = np.random.default_rng(seed)
    bspline = sitk.BSplineTransformInitializer(reference, [int(mesh)] * 3, order=3)
    n = len(bspline.GetParameters())
    bspline.SetParameters(rng.normal(0.0, float(std_mm), n).tolist())
    centre = reference.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in reference.GetSize()])
    affine = sitk.Euler3DTransform()
    affine.SetCenter(centre)
    affine.SetRotation(*np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3)).tolist())
    affine.SetTranslation(rng.uniform(-translation_mm, translation_mm, 3).tolist())
    return sitk.CompositeTransform([affine, bspline])


def make_known_pair(image: sitk.Image, labels: sitk.Image, seed: int = 0, *, std_mm: float = 4.0,
                    mesh: int = 4, rotation_deg: float = 3.0, translation_mm: float = 3.0,
                    noise: float = 0.05) -> KnownPair:
    """Warp ``image``/``labels`` by a random smooth transform -> :class:`KnownPair` (``moving`` is
    ``image`` itself, float32; nothing given is modified)."""
    moving = sitk.Cast(image, sitk.sitkFloat32)
    truth = random_smooth_transform(moving, seed, std_mm=std_mm, mesh=mesh, rotation_deg=rotation_deg,
                                    translation_mm=translation_mm)
    fixed = sitk.Resample(moving, moving, truth, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    lab = sitk.GetArrayViewFromImage(labels)
    arr = sitk.GetArrayViewFromImage(moving)
    sd = float(arr[lab > 0].std()) if (lab > 0).any() else float(arr.std())
    rng = np.random.default_rng(seed + 7919)
    noisy = sitk.GetArrayFromImage(fixed) + rng.normal(0.0, noise * sd, arr.shape).astype(np.float32)
    fixed_noisy = sitk.GetImageFromArray(noisy)
    fixed_noisy.CopyInformation(fixed)
    fixed_labels = sitk.Resample(labels, moving, truth, sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return KnownPair(fixed=fixed_noisy, moving=moving, fixed_labels=fixed_labels, moving_labels=labels,
                     truth=truth)


def _displacement(transform: sitk.Transform, reference: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) LPS mm: ``transform(p) - p`` at every voxel of ``reference``."""
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, reference.GetSize(),
                                              reference.GetOrigin(), reference.GetSpacing(),
                                              reference.GetDirection())
    return sitk.GetArrayFromImage(field)


def tre_mm(estimated: sitk.Transform, truth: sitk.Transform, fixed: sitk.Image,
           mask: Optional[np.ndarray] = None) -> dict:
    """Target registration error over the fixed voxels in ``mask`` ((z, y, x) bool; default all):
    ``|estimated(p) - truth(p)|`` in mm -> {"mean", "median", "p95", "max"}."""
    err = np.linalg.norm(_displacement(estimated, fixed) - _displacement(truth, fixed), axis=-1)
    if mask is not None:
        err = err[np.asarray(mask, bool)]
    err = err.ravel()
    return {"mean": float(err.mean()), "median": float(np.median(err)), "p95": float(np.percentile(err, 95)),
            "max": float(err.max())}
