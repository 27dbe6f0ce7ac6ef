"""The ONE preprocessing contract: what every command feeds the network, saved in checkpoints.

Pre-training (and its cache), registration, fine-tuning and segmentation all call
:func:`preprocess` with the :class:`PreprocessSpec` of the checkpoint they use, so a model always
sees data prepared the way it was trained (as nnU-Net's plans do).

``preprocess(image, spec, grid=None)``, in this order:

1. **Canonical orientation** (``spec.orientation``, default "LPS"): the voxel array is permuted
   and flipped (``sitk.DICOMOrient``: exact, no interpolation) so that its axes point as close as
   possible to L, P, S. A scan stored RAS (NIfTI) and the same scan stored LPS (DICOM) give the
   same array; oblique scans keep their (now nearly identity) direction.
2. **Intensity** (``spec.preset``), computed from the image's own voxels, independent of any
   grid: ``ct``: (HU + 1024) clipped to [0, 2048] / 2048 (-1024 HU -> 0, +1024 HU -> 1);
   ``mr``: the 0.5th and 99.5th percentiles map to 0 and 1, clipped (full min/max if those are
   equal; a constant image -> 0).
3. **Anti-aliasing** (``spec.antialias``): along every image axis whose spacing is finer than
   the network spacing ``s``, a Gaussian of variance ``(s^2 - sp^2) / (8 ln 2)`` mm^2 (the FWHM
   of the blurred voxel then equals ``s``) before downsampling.
4. **Resampling** (linear) onto the network grid (``spec.anchor`` "center": isotropic ``s``, the
   canonical direction, centred on the image, ``ceil((n - 1) sp / s) + 1`` voxels per axis so every
   voxel centre of the image lies inside), padding with ``spec.pad_value`` (normalised units;
   0 = air for CT). With another image's ``grid`` (registration: the moving image on the fixed
   image's grid) steps 1-3 are the same and only the target grid differs.

Grids beyond :data:`MAX_GRID_VOXELS` are refused with the numbers (a 6-voxel image at 100 mm
spacing would otherwise become a 600^3 array); ``max_voxels`` instead coarsens the spacing with a
warning (registration's ``max_network_voxels``).

Checkpoints store ``spec.to_dict()`` under ``"preprocessing"`` (format 2). Format-1 checkpoints
recorded only ``{preset, spacing_mm}`` and the published GVSL weights record nothing: they load
with :func:`spec_from_checkpoint`'s documented defaults (their preset, else "ct"; 1 mm; the rest
as :class:`PreprocessSpec`'s defaults).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from gvsl.grid import Grid, centered_grid, coarsen_spacing, grid_sizes
from gvsl.io import VolumeError

SPEC_VERSION = 1
MAX_GRID_VOXELS = 400 ** 3  # 64 M voxels = 256 MB of float32: far beyond any 1 mm body CT at 1 mm
MIN_SIZE_VOXELS = 4
FWHM_TO_SIGMA2 = 1.0 / (8.0 * math.log(2.0))  # variance of a Gaussian per squared FWHM
CT_MIN_THRESHOLD_HU = -500.0  # an image whose minimum is below this is taken for CT when guessing

PRESETS = {
    "ct": {"name": "ct", "modality": "CT",
           "description": "HU + 1024, clipped to [0, 2048], divided by 2048",
           "offset": 1024.0, "clip": [0.0, 2048.0], "scale": 2048.0},
    "mr": {"name": "mr", "modality": "MR",
           "description": "0.5th..99.5th percentile -> [0, 1], clipped (full min..max if those are "
                          "equal; constant images -> 0)",
           "percentiles": [0.5, 99.5]},
}
ORIENTATION_LETTERS = ({"L", "R"}, {"P", "A"}, {"S", "I"})


def check_preset(preset: str) -> dict:
    """The preset's parameters; :class:`VolumeError` listing the choices for an unknown one."""
    if preset not in PRESETS:
        raise VolumeError(f"unknown intensity preset {preset!r}; choose one of {', '.join(PRESETS)} "
                          "(ct: HU images; mr: any other modality)")
    return PRESETS[preset]


@dataclass(frozen=True)
class PreprocessSpec:
    """How a volume becomes the network's input (see the module docstring for each field)."""

    preset: str = "ct"
    spacing_mm: float = 1.0
    orientation: str = "LPS"
    anchor: str = "center"
    pad_value: float = 0.0
    antialias: bool = True
    spec_version: int = field(default=SPEC_VERSION)

    def __post_init__(self):
        check_preset(self.preset)
        if not (isinstance(self.spacing_mm, (int, float)) and math.isfinite(self.spacing_mm)
                and self.spacing_mm > 0):
            raise VolumeError(f"--spacing must be a positive number of millimetres, got {self.spacing_mm!r}")
        letters = str(self.orientation).upper()
        if len(letters) != 3 or sorted(sum(1 for c in letters if c in s) for s in ORIENTATION_LETTERS) != [1, 1, 1]:
            raise VolumeError(f"orientation {self.orientation!r} must be three letters, one of L/R, P/A and "
                              "S/I each (e.g. LPS or RAS)")
        if self.anchor != "center":
            raise VolumeError(f"grid anchor {self.anchor!r} is not supported; the contract uses 'center'")
        if not math.isfinite(float(self.pad_value)):
            raise VolumeError(f"pad_value must be finite, got {self.pad_value!r}")
        object.__setattr__(self, "spacing_mm", float(self.spacing_mm))
        object.__setattr__(self, "orientation", letters)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if int(known.get("spec_version", SPEC_VERSION)) > SPEC_VERSION:
            raise VolumeError(f"preprocessing spec version {known['spec_version']} is newer than this gvsl "
                              f"reads ({SPEC_VERSION}); update the extension.")
        return cls(**known)

    def describe(self) -> str:
        return (f"{self.preset} ({PRESETS[self.preset]['description']}), {self.spacing_mm:g} mm isotropic, "
                f"oriented {self.orientation}, grid centred on the image, padding {self.pad_value:g}, "
                f"anti-aliasing {'on' if self.antialias else 'off'}")


@dataclass
class Prepared:
    """A volume as the network sees it: ``array_zyx`` float32 (z, y, x) on ``grid``."""

    array_zyx: np.ndarray
    grid: Grid
    spec: PreprocessSpec
    warnings: List[str] = field(default_factory=list)

    def image(self) -> sitk.Image:
        """``array_zyx`` as a SimpleITK image with the grid's geometry (a copy)."""
        return self.grid.image(self.array_zyx)


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------
def spec_from_checkpoint(info: Optional[dict]) -> Tuple[PreprocessSpec, str]:
    """The spec a checkpoint (or ``model.info``) was trained with -> (spec, source).

    source: "checkpoint" (format 2 spec), "checkpoint-v1" (only preset and spacing recorded; the
    rest are the defaults), or "default" (nothing recorded, e.g. the published weights or a bare
    model: ``PreprocessSpec()``, and callers may guess the preset from the image).
    """
    prep = dict((info or {}).get("preprocessing") or {})
    if "spec_version" in prep:
        return PreprocessSpec.from_dict(prep), "checkpoint"
    if prep.get("preset"):
        return PreprocessSpec(preset=prep["preset"], spacing_mm=float(prep.get("spacing_mm") or 1.0)), "checkpoint-v1"
    return PreprocessSpec(), "default"


def with_overrides(spec: PreprocessSpec, source: str, preset: Optional[str] = None,
                   spacing_mm: Optional[float] = None) -> Tuple[PreprocessSpec, List[str]]:
    """``spec`` with the user's ``--preset`` / spacing applied -> (spec, warnings). Overriding
    what a checkpoint recorded is allowed but warned: the network was trained otherwise."""
    notes = []
    changes = {}
    if preset is not None and preset != spec.preset:
        check_preset(preset)
        changes["preset"] = preset
        if source.startswith("checkpoint"):
            notes.append(f"--preset {preset} overrides the checkpoint's '{spec.preset}' preset: the network "
                         "was trained on differently normalised intensities, results may be worse.")
    if spacing_mm is not None and float(spacing_mm) != spec.spacing_mm:
        changes["spacing_mm"] = float(spacing_mm)
        if source.startswith("checkpoint"):
            notes.append(f"network spacing {float(spacing_mm):g} mm overrides the checkpoint's {spec.spacing_mm:g} mm: "
                         "the network was trained at another scale, results may be worse.")
    return (replace(spec, **changes) if changes else spec), notes


def guess_preset(image: sitk.Image) -> str:
    """"ct" when the image's minimum is below -500 (Hounsfield units), else "mr"."""
    f = sitk.MinimumMaximumImageFilter()
    f.Execute(image)
    return "ct" if f.GetMinimum() < CT_MIN_THRESHOLD_HU else "mr"


# ---------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------
def normalize_intensity(array: np.ndarray, preset: str) -> np.ndarray:
    """Map intensities to [0, 1] with ``preset`` (module docstring, step 2). Returns a new
    float32 array of the same shape; non-finite inputs become 0."""
    p = check_preset(preset)
    a = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(a)
    all_finite = bool(finite.all())
    if not all_finite:
        a = np.where(finite, a, np.float32(np.nan))
    if preset == "ct":
        lo, hi = p["clip"]
        out = (np.clip(a + np.float32(p["offset"]), lo, hi) / np.float32(p["scale"])).astype(np.float32)
    else:
        values = a if all_finite else a[finite]
        if values.size == 0:
            return np.zeros(a.shape, np.float32)
        lo, hi = np.percentile(values, p["percentiles"])
        if not hi > lo:
            lo, hi = float(values.min()), float(values.max())
        if not hi > lo:
            return np.zeros(a.shape, np.float32)
        out = np.clip((a - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0).astype(np.float32)
    if not all_finite:
        out[~finite] = 0.0
    return out


def reorient(image: sitk.Image, orientation: str = "LPS") -> sitk.Image:
    """``image`` with its voxel axes permuted/flipped towards ``orientation`` (exact; the same
    image object when it already is)."""
    target = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    if target == orientation:
        return image
    return sitk.DICOMOrient(image, orientation)


def grid_for(image: sitk.Image, spec: PreprocessSpec, max_voxels: Optional[int] = None,
             name: str = "volume") -> Tuple[Grid, List[str]]:
    """The network grid of ``image`` under ``spec`` (module docstring, step 4) -> (grid, warnings).

    ``max_voxels``: coarsen the spacing (warned) so the grid has at most that many voxels;
    without it a grid over :data:`MAX_GRID_VOXELS` is refused with the numbers.
    """
    probe = sitk.Image([2, 2, 2], sitk.sitkUInt8)  # the canonical direction, without touching the data
    probe.SetDirection(image.GetDirection())
    canonical = reorient(probe, spec.orientation)
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    d_canon = np.asarray(canonical.GetDirection(), dtype=np.float64).reshape(3, 3)
    perm = np.rint(np.abs(np.linalg.solve(d, d_canon))).astype(int)  # image axis i -> canonical axis j
    extent = perm.T @ ((np.asarray(image.GetSize(), np.float64) - 1) * np.asarray(image.GetSpacing()))
    center = image.TransformContinuousIndexToPhysicalPoint(((np.asarray(image.GetSize()) - 1) / 2.0).tolist())
    notes = []
    s = spec.spacing_mm
    if max_voxels is not None:
        if int(max_voxels) < 8:
            raise VolumeError(f"--max-network-voxels must be at least 8 (got {max_voxels}).")
        coarse = coarsen_spacing(extent, s, int(max_voxels))
        if coarse != s:
            sizes = grid_sizes(extent, coarse)
            notes.append(f"{name}: the extent ({' x '.join(f'{e:.0f}' for e in extent)} mm) at {s:g} mm would exceed "
                         f"max_network_voxels={max_voxels}; the network ran on a coarser {coarse:g} mm grid "
                         f"({' x '.join(str(int(v)) for v in sizes)}). The model was trained at {s:g} mm: crop the "
                         "images to the region of interest, or raise --max-network-voxels if memory allows.")
            s = coarse
    sizes = grid_sizes(extent, s)
    if max_voxels is None and int(np.prod(sizes)) > MAX_GRID_VOXELS:
        raise VolumeError(
            f"{name}: resampling its {' x '.join(f'{e:.0f}' for e in extent)} mm extent to {s:g} mm gives a "
            f"{' x '.join(str(int(v)) for v in sizes)} grid ({int(np.prod(sizes)) / 1e6:.0f} M voxels, "
            f"{int(np.prod(sizes)) * 4 / 2 ** 30:.1f} GiB as float32), over the budget of {MAX_GRID_VOXELS / 1e6:.0f} M "
            "voxels. Check the image's spacing (a wrong header?), crop it, or use a coarser --spacing.")
    if min(sizes) < MIN_SIZE_VOXELS:
        raise VolumeError(f"{name} resampled to {s:g} mm has size {' x '.join(str(int(v)) for v in sizes)}; "
                          f"each axis needs at least {MIN_SIZE_VOXELS} voxels: use a smaller --spacing.")
    return centered_grid(center, extent, canonical.GetDirection(), s), notes


def _antialias(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    variances = [max(spacing_mm ** 2 - sp ** 2, 0.0) * FWHM_TO_SIGMA2 if spacing_mm > 1.01 * sp else 0.0
                 for sp in image.GetSpacing()]
    if not any(variances):
        return image
    return sitk.DiscreteGaussian(image, variances, 32, 0.01, True)


def preprocess(image: sitk.Image, spec: PreprocessSpec, grid: Optional[Grid] = None,
               max_voxels: Optional[int] = None, name: str = "volume") -> Prepared:
    """``image`` (scalar 3D, any pixel type and geometry; not modified) -> :class:`Prepared`.

    Steps 1-4 of the module docstring. ``grid``: resample onto this grid instead of the image's
    own (registration puts the moving image on the fixed image's grid); ``max_voxels``: see
    :func:`grid_for`. Warnings (e.g. non-HU data with the ct preset, a coarsened grid) are
    returned in ``.warnings``, not raised or printed: each caller reports them its own way.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{name}: preprocessing needs a scalar 3D image, got a {image.GetDimension()}D image "
                          f"with {image.GetNumberOfComponentsPerPixel()} component(s) per voxel.")
    notes: List[str] = []
    if grid is None:
        grid, notes = grid_for(image, spec, max_voxels, name)
    oriented = reorient(image, spec.orientation)
    raw = sitk.GetArrayViewFromImage(oriented)
    if spec.preset == "ct":
        lo = float(np.nanmin(raw)) if raw.dtype.kind == "f" else float(raw.min())
        if lo >= 0:
            notes.append(f"{name}: minimum intensity {lo:g} does not look like CT in Hounsfield units (air is about "
                         "-1000 HU, fat about -100 HU); if this is not CT use the 'mr' preset, if it is CT stored "
                         "without its rescale intercept, convert it to HU first.")
    normalized = sitk.GetImageFromArray(normalize_intensity(raw, spec.preset))
    normalized.CopyInformation(oriented)
    del raw, oriented
    if spec.antialias:
        normalized = _antialias(normalized, grid.spacing_mm)
    out = sitk.Resample(normalized, grid.reference(), sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear,
                        float(spec.pad_value), sitk.sitkFloat32)
    return Prepared(np.ascontiguousarray(sitk.GetArrayFromImage(out), dtype=np.float32), grid, spec, notes)


def preprocess_labels(labels: sitk.Image, grid: Grid, orientation: str = "LPS") -> np.ndarray:
    """An integer label map resampled with nearest neighbour onto ``grid`` -> (z, y, x) array of
    the map's integer pixel type (0 outside the map). The map is first put in the canonical
    ``orientation`` (as images are), so ties between two voxels break the same way whatever the
    storage order."""
    if labels.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(labels)
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise VolumeError("the label map has non-integer values; pass a label map (an integer label per "
                              "voxel), not an intensity image.")
        labels = sitk.Cast(labels, sitk.sitkInt32)
    labels = reorient(labels, orientation)
    out = sitk.Resample(labels, grid.reference(), sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor,
                        0, labels.GetPixelID())
    return sitk.GetArrayFromImage(out)
