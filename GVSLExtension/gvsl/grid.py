"""The network grid and the exact conversions between its voxels and physical space.

Frames and units: everything physical is **LPS millimetres** (SimpleITK/ITK and the files).
A :class:`Grid` is isotropic: voxel index ``p = (x, y, z)`` sits at ``P = O + s D p`` with origin
``O`` (LPS mm), spacing ``s`` (mm) and direction ``D`` (3x3, columns = axis directions in LPS).
Arrays on a grid are (z, y, x) = (k, j, i), as ``sitk.GetArrayFromImage``.

Conversions (each owned here, used by registration, refinement and segmentation):

* :func:`affine_to_sitk`: the network's voxel affine ``q = L (p - c) + c + t`` (about the grid
  centre ``c = (size - 1) / 2``, translation in voxels) is the physical affine
  ``Q = C + D L D^-1 (P - C) + s D t`` with ``C = O + s D c``.
* :func:`flow_to_displacement_lps`: a voxel flow ``u`` (3, z, y, x), channels (z, y, x), is the
  physical displacement ``s D u(p)``.
* :func:`jacobian_determinant_lps`: det(I + du/dP) of an LPS displacement image, direction-aware.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk

from gvsl.errors import GVSLError


class GridError(GVSLError, ValueError):
    """A grid or field that cannot be converted, with what is wrong."""


@dataclass(frozen=True)
class Grid:
    """An isotropic grid: voxel index p = (x, y, z) sits at ``origin_lps + spacing_mm * D @ p``.

    size: (x, y, z) voxels; direction: 9 numbers row-major as SimpleITK (columns of the 3x3 are
    the axis directions in LPS).
    """

    size: tuple
    spacing_mm: float
    origin_lps: tuple
    direction: tuple

    @property
    def shape_zyx(self) -> tuple:
        return tuple(int(v) for v in self.size[::-1])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.size))

    @property
    def center_lps(self) -> np.ndarray:
        return self.voxel_to_lps((np.asarray(self.size, dtype=np.float64) - 1.0) / 2.0)

    def reference(self) -> sitk.Image:
        """A small-footprint reference image (uint8 zeros) with this grid's geometry."""
        ref = sitk.Image([int(v) for v in self.size], sitk.sitkUInt8)
        return self.apply_to(ref)

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this grid's origin, spacing and direction on ``image`` (in place) and return it."""
        image.SetOrigin(tuple(float(v) for v in self.origin_lps))
        image.SetSpacing((float(self.spacing_mm),) * 3)
        image.SetDirection(tuple(float(v) for v in self.direction))
        return image

    def image(self, array_zyx: np.ndarray, is_vector: bool = False) -> sitk.Image:
        """``array_zyx`` ((z, y, x) or (z, y, x, C) with ``is_vector``) as an image on this grid."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx), isVector=is_vector)
        return self.apply_to(img)

    def voxel_to_lps(self, p_xyz: np.ndarray) -> np.ndarray:
        """(..., 3) voxel (x, y, z) -> (..., 3) LPS mm."""
        d = self.direction_matrix * self.spacing_mm
        return np.asarray(p_xyz, dtype=np.float64) @ d.T + np.asarray(self.origin_lps)

    def lps_to_voxel(self, p_lps: np.ndarray) -> np.ndarray:
        """(..., 3) LPS mm -> (..., 3) continuous voxel (x, y, z)."""
        d_inv = np.linalg.inv(self.direction_matrix * self.spacing_mm)
        return (np.asarray(p_lps, dtype=np.float64) - np.asarray(self.origin_lps)) @ d_inv.T

    def to_dict(self) -> dict:
        return {"size": [int(v) for v in self.size], "spacing_mm": float(self.spacing_mm),
                "origin_lps": [float(v) for v in self.origin_lps],
                "direction": [float(v) for v in self.direction]}


NetworkGrid = Grid  # the name registration used before the preprocessing contract


def grid_sizes(extent_mm: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Voxels per axis so that a centred grid of ``spacing_mm`` covers ``extent_mm`` (>= 2)."""
    return np.maximum(np.ceil(np.asarray(extent_mm) / spacing_mm - 1e-6).astype(np.int64) + 1, 2)


def centered_grid(center_lps, extent_mm, direction, spacing_mm: float) -> Grid:
    """The isotropic grid of ``spacing_mm`` centred on ``center_lps`` covering ``extent_mm``
    ((x, y, z) lengths along the columns of ``direction``, 9 numbers row-major)."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    sizes = grid_sizes(extent_mm, spacing_mm)
    origin = np.asarray(center_lps, dtype=np.float64) - spacing_mm * d @ ((sizes - 1) / 2.0)
    return Grid(size=tuple(int(v) for v in sizes), spacing_mm=float(spacing_mm),
                origin_lps=tuple(float(v) for v in origin), direction=tuple(float(v) for v in d.ravel()))


def affine_to_sitk(mat_voxel, grid: Grid) -> sitk.AffineTransform:
    """The network's voxel affine (4x4 on (x, y, z) voxels about the grid centre, translation in
    voxels; maps fixed voxels to moving voxels) -> the exact physical ITK affine (LPS mm).

    ``q = L (p - c) + c + t`` with ``P = O + s D p`` gives ``Q = C + D L D^-1 (P - C) + s D t``,
    ``C = O + s D c``.
    """
    mat = np.asarray(mat_voxel, dtype=np.float64).reshape(4, 4)
    lin, t = mat[:3, :3], mat[:3, 3]
    d = grid.direction_matrix
    s = float(grid.spacing_mm)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix((d @ lin @ np.linalg.inv(d)).ravel().tolist())
    tx.SetCenter(grid.center_lps.tolist())
    tx.SetTranslation((s * d @ t).tolist())
    return tx


def flow_to_displacement_lps(flow_zyx_voxels: np.ndarray, grid: Grid) -> sitk.Image:
    """Deformable flow (3, z, y, x) in voxels, channels (z, y, x) -> displacement image on the
    grid: vector float64 (what ``sitk.DisplacementFieldTransform`` takes), components (x, y, z)
    LPS mm, value ``s D u(p)``."""
    flow = np.asarray(flow_zyx_voxels)
    if flow.shape != (3,) + grid.shape_zyx:
        raise GridError(f"flow has shape {flow.shape}, expected {(3,) + grid.shape_zyx} "
                        "(channels z, y, x on the network grid).")
    d = grid.direction_matrix * float(grid.spacing_mm)
    disp = np.einsum("ij,jzyx->zyxi", d, flow[::-1].astype(np.float64))  # u_xyz = flow reversed
    return grid.image(disp, is_vector=True)


def displacement_on_grid(displacement: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Resample a vector displacement image (LPS mm) onto ``reference``'s grid, linear per
    component, zero outside; returns vector float64."""
    disp = sitk.Cast(displacement, sitk.sitkVectorFloat64)
    return sitk.Resample(disp, reference, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear,
                         0.0, sitk.sitkVectorFloat64)


def transform_displacement(transform: sitk.Transform, reference: sitk.Image,
                           slab_voxels: int = 2_000_000) -> sitk.Image:
    """``transform(P) - P`` on ``reference``'s grid -> vector float32 image (LPS mm).

    Computed in z-slabs of about ``slab_voxels`` voxels with ITK's own transform evaluation, so
    a full-resolution field of a large CT costs its float32 size, not several float64 copies.
    """
    nx, ny, nz = reference.GetSize()
    out = np.empty((nz, ny, nx, 3), dtype=np.float32)
    slab = max(1, int(slab_voxels) // max(1, nx * ny))
    for z0 in range(0, nz, slab):
        z1 = min(z0 + slab, nz)
        origin = reference.TransformIndexToPhysicalPoint((0, 0, z0))
        part = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, (nx, ny, z1 - z0), origin,
                                                 reference.GetSpacing(), reference.GetDirection())
        out[z0:z1] = sitk.GetArrayViewFromImage(part)
    img = sitk.GetImageFromArray(out, isVector=True)
    img.CopyInformation(reference)
    return img


def jacobian_determinant_lps(displacement: sitk.Image, slab: Optional[int] = None) -> sitk.Image:
    """det(I + du/dP) of a displacement image (vector, LPS mm) with physical derivatives -> float32.

    The vectors are first expressed along the image axes (``D^-1 u``), then differentiated along
    the axes with the voxel spacing (:func:`gvsl.geometry.jacobian_determinant`: central
    differences inside, one-sided at the borders, so a linear field gives its exact determinant
    everywhere). ``sitk.DisplacementFieldJacobianDeterminant`` alone ignores the image direction
    (measured: wrong for oblique images). Computed in slabs of ``slab`` z-slices (default: about
    2 M voxels per slab) to bound memory.
    """
    import torch

    from gvsl import geometry

    d_inv = np.linalg.inv(np.array(displacement.GetDirection(), dtype=np.float64).reshape(3, 3))
    u = sitk.GetArrayViewFromImage(displacement)  # (z, y, x, 3) LPS
    sx, sy, sz = displacement.GetSpacing()
    nz = u.shape[0]
    if nz < 2 or min(u.shape[1:3]) < 2:
        raise GridError("a displacement field needs at least 2 voxels along every axis to be differentiated.")
    slab = int(slab) if slab else max(1, 2_000_000 // max(1, u.shape[1] * u.shape[2]))
    out = np.empty(u.shape[:3], dtype=np.float32)
    for z0 in range(0, nz, slab):
        z1 = min(z0 + slab, nz)
        lo, hi = max(z0 - 1, 0), min(z1 + 1, nz)
        v = np.einsum("ij,zyxj->izyx", d_inv, np.asarray(u[lo:hi], dtype=np.float64))  # image axes (x, y, z)
        v = torch.from_numpy(np.ascontiguousarray(v[::-1]))[None]  # channels (z, y, x)
        det = geometry.jacobian_determinant(v.double(), spacing=(sz, sy, sx))[0, 0].numpy()
        out[z0:z1] = det[z0 - lo:z0 - lo + (z1 - z0)]
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(displacement)
    return img


def bounding_box_lps(image: sitk.Image) -> tuple:
    """(min corner, max corner) LPS mm of the image's voxel boxes (centres +- half a voxel)."""
    size = np.array(image.GetSize(), dtype=np.float64)
    corners = [image.TransformContinuousIndexToPhysicalPoint((cx, cy, cz))
               for cx in (-0.5, size[0] - 0.5) for cy in (-0.5, size[1] - 0.5) for cz in (-0.5, size[2] - 0.5)]
    corners = np.array(corners)
    return corners.min(0), corners.max(0)


def boxes_overlap(fixed: sitk.Image, moving: sitk.Image) -> bool:
    """Whether the physical (LPS) bounding boxes of the two images intersect."""
    lo_f, hi_f = bounding_box_lps(fixed)
    lo_m, hi_m = bounding_box_lps(moving)
    return bool(np.all(lo_f < hi_m) and np.all(lo_m < hi_f))


def coarsen_spacing(extent_mm, spacing_mm: float, max_voxels: int) -> float:
    """The smallest spacing >= ``spacing_mm`` (rounded up to 0.01 mm) whose centred grid over
    ``extent_mm`` has at most ``max_voxels`` voxels."""
    s = float(spacing_mm)
    sizes = grid_sizes(extent_mm, s)
    while np.prod(sizes) > max_voxels:
        s *= max(1.01, (np.prod(sizes) / max_voxels) ** (1.0 / 3.0))
        s = math.ceil(s * 100.0) / 100.0
        sizes = grid_sizes(extent_mm, s)
    return s
