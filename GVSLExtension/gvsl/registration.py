"""Register two 3D volumes with a GVSL model and export the result as exact physical transforms.

Frames and units
----------------
Everything physical here is **LPS millimetres** (SimpleITK/ITK, and what .tfm/.h5/.nii.gz files
hold). Transforms follow the **ITK resampling convention**: they map *fixed* points to *moving*
points, so ``sitk.Resample(moving, fixed, result.composite)`` is the registered moving image.

How it works
------------
1. **Network grid.** The network works on a grid with the fixed image's *direction*, isotropic
   spacing ``s`` (``network_spacing_mm``, 1 mm as in GVSL pre-training) and the fixed image's
   physical extent (same centre; sizes rounded up so that every fixed voxel centre lies inside).
   If that grid has more than ``max_network_voxels`` voxels, ``s`` is coarsened (a warning in
   ``metrics["warnings"]``). Both images are intensity-normalised (CT/MR preset of
   :mod:`gvsl.io`) and resampled onto it by their physical coordinates (linear, 0 outside).
2. **Network.** ``model.register(fixed, moving)`` gives the affine matrix ``mat`` (4x4 on (x, y, z)
   voxel coordinates about the centre ``c = (size - 1) / 2``, translation in voxels) and the
   deformable flow ``u`` (voxels, channels (z, y, x)); the fused voxel map is
   ``phi(p) = A(p + u(p))`` (:func:`gvsl.geometry.fuse`).
3. **Exact physical conversion.** With network grid origin ``O``, direction ``D`` (3x3, columns
   = axis directions) and spacing ``s``, voxel ``p`` (x, y, z) sits at ``P = O + s D p``. The
   voxel affine ``q = L (p - c) + c + t`` is the physical affine
   ``Q = C + M (P - C) + T`` with ``M = D L D^-1``, centre ``C = O + s D c``, translation
   ``T = s D t`` (:func:`affine_to_sitk`). The flow becomes the physical displacement
   ``s D u(p)`` (:func:`flow_to_displacement_lps`), resampled linearly onto the fixed image's
   full-resolution grid to make a :class:`SimpleITK.DisplacementFieldTransform`. The composite is
   ``CompositeTransform([affine, deformable])``; ITK applies the last-added transform first, so
   a fixed point goes ``P -> P + u(P) -> affine``: exactly ``phi`` in physical space.
4. **Outputs and metrics**: warped images, total displacement, Jacobian determinant, global NCC
   before/after, folding, Dice per label.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

DEFAULT_MAX_NETWORK_VOXELS = 160 ** 3  # ~4.1 M voxels: a CPU forward pass fits in a few GB
CT_MIN_THRESHOLD_HU = -500.0  # an image whose minimum is below this is treated as CT
STAGES = ("resample", "network", "export", "metrics")


class RegistrationError(ValueError):
    """Inputs that cannot be registered, with what is wrong and what to do."""


@dataclass
class RegistrationResult:
    """The registration of ``moving`` onto ``fixed``; every transform maps FIXED points (LPS mm)
    to MOVING points (ITK resampling convention).

    affine:        physical affine (LPS mm).
    deformable:    the deformable part only: displacement (LPS mm) defined on the fixed image's
                   full-resolution grid, applied to the point *before* the affine.
    composite:     ``affine(p + u(p))``; usable directly as ``sitk.Resample(moving, fixed, composite)``.
    displacement:  total displacement of the composite on the fixed grid, ``composite(p) - p``,
                   vector float64 (x, y, z) LPS mm.
    warped:        moving resampled onto the fixed grid with the composite (linear), float32.
    warped_affine: moving resampled onto the fixed grid with the affine only (linear), float32.
    jacobian:      determinant of the Jacobian of the composite mapping on the fixed grid, float32
                   (physical derivatives; <= 0 marks folding).
    metrics:       numbers and notes (see :func:`register`).
    warped_labels: moving labels warped with the composite (nearest neighbour), or None.
    """

    affine: sitk.AffineTransform
    deformable: sitk.DisplacementFieldTransform
    composite: sitk.CompositeTransform
    displacement: sitk.Image
    warped: sitk.Image
    warped_affine: sitk.Image
    jacobian: sitk.Image
    metrics: dict = field(default_factory=dict)
    warped_labels: Optional[sitk.Image] = None


# ---------------------------------------------------------------------------------------------
# The network grid and the exact voxel <-> physical conversions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetworkGrid:
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

    def reference(self) -> sitk.Image:
        """A small-footprint reference image (uint8 zeros) with this grid's geometry."""
        ref = sitk.Image([int(v) for v in self.size], sitk.sitkUInt8)
        self.apply_to(ref)
        return ref

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetOrigin(tuple(float(v) for v in self.origin_lps))
        image.SetSpacing((float(self.spacing_mm),) * 3)
        image.SetDirection(tuple(float(v) for v in self.direction))
        return image

    def voxel_to_lps(self, p_xyz: np.ndarray) -> np.ndarray:
        """(..., 3) voxel (x, y, z) -> (..., 3) LPS mm."""
        d = self.direction_matrix * self.spacing_mm
        return np.asarray(p_xyz, dtype=np.float64) @ d.T + np.asarray(self.origin_lps)

    def lps_to_voxel(self, p_lps: np.ndarray) -> np.ndarray:
        """(..., 3) LPS mm -> (..., 3) continuous voxel (x, y, z)."""
        d_inv = np.linalg.inv(self.direction_matrix * self.spacing_mm)
        return (np.asarray(p_lps, dtype=np.float64) - np.asarray(self.origin_lps)) @ d_inv.T


def _grid_sizes(extent_mm: np.ndarray, spacing_mm: float) -> np.ndarray:
    return np.maximum(np.ceil(extent_mm / spacing_mm - 1e-6).astype(np.int64) + 1, 2)


def network_grid(fixed: sitk.Image, spacing_mm: float = 1.0,
                 max_voxels: int = DEFAULT_MAX_NETWORK_VOXELS) -> tuple:
    """The network grid for ``fixed`` -> ``(NetworkGrid, warnings: list[str])``.

    Same direction and centre as ``fixed``; isotropic ``spacing_mm``; size per axis
    ``ceil(extent / spacing) + 1`` so it covers every fixed voxel centre (extent = (n - 1) x
    spacing of the fixed image). When the grid would exceed ``max_voxels`` the spacing is
    coarsened isotropically (rounded up to 0.01 mm) and a warning says so.
    """
    if not spacing_mm or spacing_mm <= 0:
        raise RegistrationError(f"network_spacing_mm must be > 0 (got {spacing_mm}); GVSL was trained at 1.0 mm.")
    if max_voxels < 8:
        raise RegistrationError(f"max_network_voxels must be at least 8 (got {max_voxels}).")
    size_f = np.array(fixed.GetSize(), dtype=np.float64)
    sp_f = np.array(fixed.GetSpacing(), dtype=np.float64)
    d = np.array(fixed.GetDirection(), dtype=np.float64).reshape(3, 3)
    extent = (size_f - 1) * sp_f
    warnings = []
    s = float(spacing_mm)
    sizes = _grid_sizes(extent, s)
    if np.prod(sizes) > max_voxels:
        while np.prod(sizes) > max_voxels:
            s *= max(1.01, (np.prod(sizes) / max_voxels) ** (1.0 / 3.0))
            s = math.ceil(s * 100.0) / 100.0
            sizes = _grid_sizes(extent, s)
        warnings.append(
            f"the fixed image's extent ({' x '.join(f'{e:.0f}' for e in extent)} mm) at "
            f"{spacing_mm:g} mm would exceed max_network_voxels={max_voxels}; the network ran on a "
            f"coarser {s:g} mm grid ({' x '.join(str(int(v)) for v in sizes)}). GVSL was trained at "
            "1 mm: crop the images to the region of interest, or raise max_network_voxels if memory allows.")
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint(((size_f - 1) / 2).tolist()))
    origin = centre - s * d @ ((sizes - 1) / 2.0)
    grid = NetworkGrid(size=tuple(int(v) for v in sizes), spacing_mm=s,
                       origin_lps=tuple(float(v) for v in origin), direction=tuple(fixed.GetDirection()))
    return grid, warnings


def affine_to_sitk(mat_voxel, grid: NetworkGrid) -> sitk.AffineTransform:
    """The network's voxel affine (4x4 on (x, y, z) voxels about the grid centre, translation in
    voxels; maps fixed voxels to moving voxels) -> the exact physical ITK affine (LPS mm).

    ``q = L (p - c) + c + t`` with ``P = O + s D p`` gives ``Q = C + D L D^-1 (P - C) + s D t``,
    ``C = O + s D c``.
    """
    mat = np.asarray(mat_voxel, dtype=np.float64).reshape(4, 4)
    lin, t = mat[:3, :3], mat[:3, 3]
    d = grid.direction_matrix
    s = float(grid.spacing_mm)
    c = (np.asarray(grid.size, dtype=np.float64) - 1.0) / 2.0
    tx = sitk.AffineTransform(3)
    tx.SetMatrix((d @ lin @ np.linalg.inv(d)).ravel().tolist())
    tx.SetCenter((np.asarray(grid.origin_lps) + s * d @ c).tolist())
    tx.SetTranslation((s * d @ t).tolist())
    return tx


def flow_to_displacement_lps(flow_zyx_voxels: np.ndarray, grid: NetworkGrid) -> sitk.Image:
    """Deformable flow (3, z, y, x) in voxels, channels (z, y, x) -> displacement image on the
    network grid: vector float64, components (x, y, z) LPS mm, value ``s D u(p)``."""
    flow = np.asarray(flow_zyx_voxels, dtype=np.float64)
    if flow.shape != (3,) + grid.shape_zyx:
        raise RegistrationError(f"flow has shape {flow.shape}, expected {(3,) + grid.shape_zyx} "
                                "(channels z, y, x on the network grid).")
    d = grid.direction_matrix * float(grid.spacing_mm)
    disp = np.einsum("ij,jzyx->zyxi", d, flow[::-1])  # u_xyz = flow reversed
    img = sitk.GetImageFromArray(np.ascontiguousarray(disp), isVector=True)
    return grid.apply_to(img)


def displacement_on_grid(displacement: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Resample a vector displacement image (LPS mm) onto ``reference``'s grid, linear per
    component, zero outside; returns vector float64."""
    disp = sitk.Cast(displacement, sitk.sitkVectorFloat64)
    return sitk.Resample(disp, reference, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear,
                         0.0, sitk.sitkVectorFloat64)


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
    slab = int(slab) if slab else max(1, 2_000_000 // max(1, u.shape[1] * u.shape[2]))
    out = np.empty(u.shape[:3], dtype=np.float32)
    for z0 in range(0, nz, slab):
        z1 = min(z0 + slab, nz)
        lo, hi = max(z0 - 1, 0), min(z1 + 1, nz)
        v = np.einsum("ij,zyxj->izyx", d_inv, np.asarray(u[lo:hi], dtype=np.float64))  # image axes (x, y, z)
        v = torch.from_numpy(np.ascontiguousarray(v[::-1]))[None]  # channels (z, y, x)
        if hi - lo < 2:  # a single slice in z cannot be differentiated along z
            raise RegistrationError("the fixed image needs at least 2 slices along every axis.")
        det = geometry.jacobian_determinant(v.double(), spacing=(sz, sy, sx))[0, 0].numpy()
        out[z0:z1] = det[z0 - lo:z0 - lo + (z1 - z0)]
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(displacement)
    return img


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def global_ncc(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> Optional[float]:
    """Pearson correlation of ``a`` and ``b`` (same shape) over ``mask`` (bool); None when the
    mask has fewer than 2 voxels or either image is constant there."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    else:
        a, b = a.ravel(), b.ravel()
    if a.size < 2:
        return None
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    if den <= 0:
        return None
    return float(np.dot(a, b) / den)


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
    vals = [x for k, x in out.items()]
    out["mean"] = float(np.mean(vals)) if vals else None
    return out


def _overlap_mask(moving: sitk.Image, fixed: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """(z, y, x) bool on the fixed grid: where ``transform`` maps into the moving image's extent."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    m = sitk.Resample(ones, fixed, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayViewFromImage(m) > 0


def _bounding_box_lps(image: sitk.Image) -> tuple:
    size = np.array(image.GetSize(), dtype=np.float64)
    corners = []
    for cx in (-0.5, size[0] - 0.5):
        for cy in (-0.5, size[1] - 0.5):
            for cz in (-0.5, size[2] - 0.5):
                corners.append(image.TransformContinuousIndexToPhysicalPoint((cx, cy, cz)))
    corners = np.array(corners)
    return corners.min(0), corners.max(0)


def boxes_overlap(fixed: sitk.Image, moving: sitk.Image) -> bool:
    """Whether the physical (LPS) bounding boxes of the two images intersect."""
    lo_f, hi_f = _bounding_box_lps(fixed)
    lo_m, hi_m = _bounding_box_lps(moving)
    return bool(np.all(lo_f < hi_m) and np.all(lo_m < hi_f))


# ---------------------------------------------------------------------------------------------
# Input checks and preprocessing
# ---------------------------------------------------------------------------------------------
def check_volume(image, which: str) -> sitk.Image:
    """``image`` if it is a scalar 3D SimpleITK image (NaN/Inf repaired as
    :func:`gvsl.io.validate_volume`), else :class:`RegistrationError` naming ``which`` and the fix."""
    from gvsl.io import VolumeError, validate_volume
    if not isinstance(image, sitk.Image):
        raise RegistrationError(f"the {which} image must be a SimpleITK.Image (got {type(image).__name__}); "
                                "read files with gvsl.io.read_volume or SimpleITK.ReadImage.")
    try:
        return validate_volume(image, f"the {which} image")
    except VolumeError as exc:
        raise RegistrationError(str(exc)) from None


def _check_labels(labels, which: str) -> Optional[sitk.Image]:
    if labels is None:
        return None
    labels = check_volume(labels, which)
    if labels.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(labels)
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise RegistrationError(f"the {which} map has non-integer values; pass a label map "
                                    "(integer label per voxel), not an intensity image.")
        labels = sitk.Cast(labels, sitk.sitkInt32)
    return labels


def guess_preset(image: sitk.Image) -> str:
    """"ct" when the image's minimum is below -500 (Hounsfield units), else "mr"."""
    f = sitk.MinimumMaximumImageFilter()
    f.Execute(image)
    return "ct" if f.GetMinimum() < CT_MIN_THRESHOLD_HU else "mr"


def _normalized(image: sitk.Image, preset: str) -> sitk.Image:
    from gvsl.io import normalize_intensity
    arr = normalize_intensity(sitk.GetArrayViewFromImage(image), preset)
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
    out.CopyInformation(image)
    return out


def _to_grid(image: sitk.Image, grid: NetworkGrid) -> np.ndarray:
    """Resample ``image`` onto the network grid by physical coordinates -> (z, y, x) float32."""
    out = sitk.Resample(image, grid.reference(), sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear,
                        0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _resolve_model(model):
    from pathlib import PurePath
    if isinstance(model, (str, PurePath)):
        from gvsl.checkpoint import load_model
        return load_model(model, "cpu")
    if model is None or not hasattr(model, "register"):
        raise RegistrationError(f"model must be a GVSL model or the path of a GVSL checkpoint "
                                f"(got {type(model).__name__}).")
    return model


def _run_network(model, fixed_zyx: np.ndarray, moving_zyx: np.ndarray, dev, precision: str):
    """-> (mat (4, 4) float64, flow (3, z, y, x) float64, Precision)."""
    import torch

    from gvsl.device import choose_precision
    prec = choose_precision(dev, "inference", precision)
    model = prec.prepare_model(model)
    a = prec.prepare_input(torch.from_numpy(np.ascontiguousarray(fixed_zyx))[None, None].float())
    b = prec.prepare_input(torch.from_numpy(np.ascontiguousarray(moving_zyx))[None, None].float())
    with torch.no_grad(), prec.autocast():
        mat, flow, _ = model.register(a, b)
    mat = mat.detach().float().cpu().numpy()[0].astype(np.float64)
    flow = flow.detach().float().cpu().numpy()[0].astype(np.float64)
    return mat, flow, prec


# ---------------------------------------------------------------------------------------------
# The registration
# ---------------------------------------------------------------------------------------------
def register(fixed: sitk.Image, moving: sitk.Image, model, device="auto", *,
             fixed_labels: Optional[sitk.Image] = None, moving_labels: Optional[sitk.Image] = None,
             preset: Optional[str] = None, network_spacing_mm: Optional[float] = None,
             max_network_voxels: int = DEFAULT_MAX_NETWORK_VOXELS, precision: str = "auto",
             progress=None, cancel=None) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with a GVSL model (one forward pass).

    fixed, moving: scalar 3D SimpleITK images (any size, spacing, direction; not modified).
    model: a :class:`gvsl.network.GVSL` (or anything with its ``register(a, b)``; it is put in
        eval mode and moved to the device) or the path of a GVSL checkpoint / published weights.
    device: "auto" | "cpu" | "cuda" | "cuda:N" | "mps" (or a torch.device). On CUDA
        out-of-memory the network is re-run on the CPU and a warning is recorded.
    fixed_labels, moving_labels: optional integer label maps (any grid); the moving labels are
        warped with the composite (nearest neighbour) and Dice per label is reported.
    preset: intensity normalisation "ct" | "mr"; default: the checkpoint's preprocessing preset,
        else guessed per image (minimum < -500 -> "ct").
    network_spacing_mm, max_network_voxels: the network grid (see :func:`network_grid`);
        the spacing defaults to the checkpoint's preprocessing ``spacing_mm``, else 1.0 mm.
    precision: "auto" | "fp32" | "bf16" | "fp16" (see :func:`gvsl.device.choose_precision`).
    progress: a :class:`gvsl.progress.Progress`; receives ``event("stage", stage=..., index=i,
        stages=4, message=...)`` for the stages resample, network, export, metrics, and
        ``event("warning", message=...)``.
    cancel: a :class:`gvsl.progress.CancelToken`, checked between stages
        (raises :class:`gvsl.progress.Cancelled`).

    ``result.metrics``: ncc_before / ncc_affine / ncc_after (global Pearson NCC on the fixed grid
    within the overlap with the moving image), folding_percent (det <= 0), jacobian_min,
    jacobian_max, dice_before / dice_affine / dice_after (per label and "mean", when both label maps are given),
    max_displacement_mm, timings_s, device, precision, network_grid_size (x, y, z),
    network_spacing_mm, preset, affine_matrix_lps / affine_translation_lps_mm / affine_center_lps_mm,
    warnings (list of str).
    """
    from gvsl.device import describe, is_out_of_memory, select_device

    t_start = time.perf_counter()
    timings = {}
    warnings: list = []

    def stage(i: int, name: str, message: str) -> None:
        if cancel is not None:
            cancel.raise_if_cancelled()
        if progress is not None:
            progress.event("stage", stage=name, index=i, stages=len(STAGES), message=message)

    def warn(message: str) -> None:
        warnings.append(message)
        if progress is not None:
            progress.event("warning", message=message)

    fixed = check_volume(fixed, "fixed")
    moving = check_volume(moving, "moving")
    fixed_labels = _check_labels(fixed_labels, "fixed labels")
    moving_labels = _check_labels(moving_labels, "moving labels")
    if (fixed_labels is None) != (moving_labels is None) and moving_labels is None:
        warn("fixed labels were given without moving labels: Dice needs both, so it is not reported.")
    if preset is not None and preset not in ("ct", "mr"):
        raise RegistrationError(f"unknown intensity preset '{preset}'; choose 'ct' or 'mr' (or leave it unset).")
    if not boxes_overlap(fixed, moving):
        warn("the fixed and moving images do not overlap in physical space (LPS): the network's initial "
             "alignment is by physical coordinates, so the moving image is mostly outside its field of view. "
             "Centre both volumes (e.g. set the moving origin so the image centres coincide) or apply an "
             "initial transform to the moving image first.")
    model = _resolve_model(model)
    dev = select_device(device) if not hasattr(device, "type") else device
    model_prep = (getattr(model, "info", None) or {}).get("preprocessing", {}) or {}
    if network_spacing_mm is None:
        network_spacing_mm = float(model_prep.get("spacing_mm") or 1.0)

    # -- 1. resample onto the network grid -------------------------------------------------
    t0 = time.perf_counter()
    grid, grid_warnings = network_grid(fixed, network_spacing_mm, max_network_voxels)
    for w in grid_warnings:
        warn(w)
    stage(0, "resample", f"resampling fixed and moving onto the {grid.spacing_mm:g} mm network grid "
                         f"({' x '.join(str(v) for v in grid.size)})")
    info_preset = model_prep.get("preset")
    if preset is not None:
        presets = {"fixed": preset, "moving": preset, "source": "argument"}
    elif info_preset in ("ct", "mr"):
        presets = {"fixed": info_preset, "moving": info_preset, "source": "checkpoint"}
    else:
        presets = {"fixed": guess_preset(fixed), "moving": guess_preset(moving), "source": "guessed"}
    fixed_net = _to_grid(_normalized(fixed, presets["fixed"]), grid)
    moving_net = _to_grid(_normalized(moving, presets["moving"]), grid)
    timings["resample"] = time.perf_counter() - t0

    # -- 2. the network --------------------------------------------------------------------
    t0 = time.perf_counter()
    stage(1, "network", f"running GVSL on {describe(dev)}")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        try:
            mat, flow, prec = _run_network(model, fixed_net, moving_net, dev, precision)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
            if dev.type == "cpu" or not is_out_of_memory(exc):
                raise
            import torch
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            warn(f"{describe(dev)} ran out of memory for a {' x '.join(str(v) for v in grid.size)} grid; "
                 "re-ran on the CPU (slower). Crop the images or lower max_network_voxels to stay on the GPU.")
            dev = select_device("cpu")
            mat, flow, prec = _run_network(model, fixed_net, moving_net, dev, "auto")
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)
    if not (np.all(np.isfinite(mat)) and np.all(np.isfinite(flow))):
        raise RegistrationError("the network produced non-finite values (NaN/inf); the weights are probably "
                                "broken. Check the checkpoint, or use --precision fp32.")
    timings["network"] = time.perf_counter() - t0

    # -- 3. export as physical transforms ----------------------------------------------------
    t0 = time.perf_counter()
    stage(2, "export", "converting to physical (LPS mm) transforms and resampling")
    affine = affine_to_sitk(mat, grid)
    field_fixed = displacement_on_grid(flow_to_displacement_lps(flow, grid), fixed)
    deformable = sitk.DisplacementFieldTransform(sitk.Image(field_fixed))
    composite = sitk.CompositeTransform([affine, deformable])
    moving_f = sitk.Cast(moving, sitk.sitkFloat32)
    warped = sitk.Resample(moving_f, fixed, composite, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped_affine = sitk.Resample(moving_f, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    displacement = sitk.TransformToDisplacementField(composite, sitk.sitkVectorFloat64, fixed.GetSize(),
                                                     fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
    jacobian = jacobian_determinant_lps(displacement)
    warped_labels = None
    if moving_labels is not None:
        warped_labels = sitk.Resample(moving_labels, fixed, composite, sitk.sitkNearestNeighbor, 0,
                                      moving_labels.GetPixelID())
    timings["export"] = time.perf_counter() - t0

    # -- 4. metrics ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    stage(3, "metrics", "computing NCC, Jacobian and Dice")
    identity = sitk.Transform(3, sitk.sitkIdentity)
    fixed_arr = sitk.GetArrayViewFromImage(fixed)
    moving_phys = sitk.Resample(moving_f, fixed, identity, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    metrics = {
        "ncc_before": global_ncc(fixed_arr, sitk.GetArrayViewFromImage(moving_phys),
                                 _overlap_mask(moving, fixed, identity)),
        "ncc_affine": global_ncc(fixed_arr, sitk.GetArrayViewFromImage(warped_affine),
                                 _overlap_mask(moving, fixed, affine)),
        "ncc_after": global_ncc(fixed_arr, sitk.GetArrayViewFromImage(warped),
                                _overlap_mask(moving, fixed, composite)),
    }
    import torch

    from gvsl import geometry
    jac = sitk.GetArrayViewFromImage(jacobian)
    disp_arr = sitk.GetArrayViewFromImage(displacement)
    metrics.update({
        "folding_percent": geometry.folding_percentage(torch.from_numpy(sitk.GetArrayFromImage(jacobian))),
        "jacobian_min": float(jac.min()),
        "jacobian_max": float(jac.max()),
        "max_displacement_mm": float(np.sqrt((disp_arr ** 2).sum(-1)).max()),
    })
    if fixed_labels is not None and moving_labels is not None:
        fl = sitk.Resample(fixed_labels, fixed, identity, sitk.sitkNearestNeighbor, 0, fixed_labels.GetPixelID())
        before = sitk.Resample(moving_labels, fixed, identity, sitk.sitkNearestNeighbor, 0,
                               moving_labels.GetPixelID())
        fl_arr = sitk.GetArrayViewFromImage(fl)
        metrics["dice_before"] = dice_per_label(fl_arr, sitk.GetArrayViewFromImage(before))
        affine_labels = sitk.Resample(moving_labels, fixed, affine, sitk.sitkNearestNeighbor, 0,
                                      moving_labels.GetPixelID())
        metrics["dice_affine"] = dice_per_label(fl_arr, sitk.GetArrayViewFromImage(affine_labels))
        metrics["dice_after"] = dice_per_label(fl_arr, sitk.GetArrayViewFromImage(warped_labels))
    timings["metrics"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    metrics.update({
        "device": describe(dev),
        "precision": prec.name,
        "network_grid_size": [int(v) for v in grid.size],
        "network_spacing_mm": float(grid.spacing_mm),
        "preset": presets,
        "affine_matrix_lps": [list(map(float, affine.GetMatrix()[i:i + 3])) for i in (0, 3, 6)],
        "affine_translation_lps_mm": list(map(float, affine.GetTranslation())),
        "affine_center_lps_mm": list(map(float, affine.GetCenter())),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "warnings": warnings,
    })
    return RegistrationResult(affine=affine, deformable=deformable, composite=composite,
                              displacement=displacement, warped=warped, warped_affine=warped_affine,
                              jacobian=jacobian, metrics=metrics, warped_labels=warped_labels)


# ---------------------------------------------------------------------------------------------
# Files and the `gvsl register` command
# ---------------------------------------------------------------------------------------------
def write_transform(transform: sitk.Transform, path) -> Path:
    """Write a transform atomically (.tfm, .txt or .h5: SimpleITK picks the format by extension)."""
    from gvsl.checkpoint import atomic_write
    return atomic_write(path, lambda tmp: sitk.WriteTransform(transform, tmp))


def write_outputs(result: RegistrationResult, out_dir, fixed: Optional[sitk.Image] = None,
                  moving: Optional[sitk.Image] = None, overview: bool = True) -> dict:
    """Write every output of a registration into ``out_dir`` (atomically) -> {name: Path}.

    warped.nii.gz, warped_affine.nii.gz, affine.tfm, deformable.nii.gz (deformable part,
    displacement LPS mm on the fixed grid), displacement.nii.gz (total, LPS mm), composite.h5,
    jacobian.nii.gz, warped_labels.nii.gz (with labels), metrics.json, overview.png (when
    ``overview`` and both images are given).
    """
    from gvsl.io import write_image_atomic as write_image
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "warped": write_image(result.warped, out / "warped.nii.gz"),
        "warped_affine": write_image(result.warped_affine, out / "warped_affine.nii.gz"),
        "affine": write_transform(result.affine, out / "affine.tfm"),
        "deformable": write_image(result.deformable.GetDisplacementField(), out / "deformable.nii.gz"),
        "displacement": write_image(result.displacement, out / "displacement.nii.gz"),
        "composite": write_transform(result.composite, out / "composite.h5"),
        "jacobian": write_image(result.jacobian, out / "jacobian.nii.gz"),
    }
    if result.warped_labels is not None:
        files["warped_labels"] = write_image(result.warped_labels, out / "warped_labels.nii.gz")
    if overview and fixed is not None and moving is not None:
        from gvsl.pictures import registration_overview
        files["overview"] = registration_overview(fixed, moving, result, out / "overview.png")
    from gvsl.checkpoint import atomic_write_text
    from gvsl.progress import json_safe
    files["metrics"] = atomic_write_text(out / "metrics.json", json.dumps(json_safe(result.metrics), indent=2))
    return files


def _fmt(v, fmt="{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def summary(metrics: dict) -> str:
    """A short human-readable summary of ``metrics``."""
    lines = [f"NCC before {_fmt(metrics.get('ncc_before'))} -> affine {_fmt(metrics.get('ncc_affine'))} "
             f"-> after {_fmt(metrics.get('ncc_after'))}; folding {_fmt(metrics.get('folding_percent'), '{:.2f}')}% "
             f"(Jacobian {_fmt(metrics.get('jacobian_min'), '{:.2f}')}..{_fmt(metrics.get('jacobian_max'), '{:.2f}')})"]
    if "dice_after" in metrics:
        lines.append(f"Dice mean before {_fmt(metrics['dice_before'].get('mean'))} -> affine "
                     f"{_fmt(metrics['dice_affine'].get('mean'))} -> after "
                     f"{_fmt(metrics['dice_after'].get('mean'))}")
    t = metrics.get("timings_s", {})
    lines.append(f"{t.get('total', 0):.1f} s on {metrics.get('device')} ({metrics.get('precision')}), network grid "
                 f"{'x'.join(str(v) for v in metrics.get('network_grid_size', []))} at "
                 f"{metrics.get('network_spacing_mm')} mm")
    lines += [f"warning: {w}" for w in metrics.get("warnings", [])]
    return "\n".join(lines)


def run_cli(args) -> int:
    """``gvsl register``: read, register, write every output into ``--out``."""
    from gvsl.io import read_volume
    from gvsl.progress import Progress, json_safe
    progress = Progress(total=len(STAGES), mode=args.progress, task="register")
    fixed = read_volume(args.fixed)
    moving = read_volume(args.moving)
    fixed_labels = read_volume(args.fixed_labels) if args.fixed_labels else None
    moving_labels = read_volume(args.moving_labels) if args.moving_labels else None
    result = register(fixed, moving, args.model, args.device, fixed_labels=fixed_labels,
                      moving_labels=moving_labels, preset=args.preset,
                      network_spacing_mm=args.network_spacing,
                      max_network_voxels=args.max_network_voxels, precision=args.precision,
                      progress=progress)
    files = write_outputs(result, args.out, fixed, moving, overview=not args.no_overview)
    if args.progress == "json":
        print(json.dumps({"event": "done", "task": "register",
                          "outputs": {k: str(v) for k, v in files.items()},
                          "metrics": json_safe(result.metrics)}), flush=True)
    else:
        print(summary(result.metrics))
        print(f"wrote {len(files)} files to {args.out}")
    return 0
