"""Segment a volume with a fine-tuned GVSL model: labels in the task's source values, exact geometry.

How (frames: LPS mm; arrays (z, y, x)):

1. **Preprocessing** from the checkpoint's spec (``PreprocessSpec``: intensity preset, isotropic
   spacing, canonical orientation) puts the image on the network grid ``G``.
2. **Network**: Gaussian-blended sliding windows (``monai.inferers.sliding_window_inference``,
   ``mode="gaussian"``, window = the training crop) through ``Inference.run`` (device, precision,
   CUDA out-of-memory -> CPU) -> softmax class probabilities (C, z, y, x) on ``G``.
3. **Back to the input's geometry before the argmax**: every input voxel centre (index -> LPS ->
   continuous voxel of ``G``) samples the C probability maps trilinearly (``grid_sample``,
   align_corners=True, i.e. voxel centres), slab by slab of input slices with a running argmax,
   so memory stays ~``slab_mb`` MB plus the grid probabilities whatever the input size: a
   full-resolution float32 map of every class is never held. This equals resampling each class
   map with SimpleITK (linear) onto the input and taking the argmax (tested).
4. **Output**: class index -> source label value (e.g. 205...850 for heart), uint8 if every value
   fits, else uint16, on the input's exact grid. Optional per-class probability images
   (float32, one class in memory at a time) and a Slicer ``.seg.nrrd`` (:mod:`gvsl.segnrrd`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from gvsl.errors import GVSLError

DEFAULT_WINDOW = 96
DEFAULT_OVERLAP = 0.25
DEFAULT_SLAB_MB = 64.0


class SegmentationError(GVSLError, ValueError):
    """A problem with segmentation inputs, naming it and the fix."""


@dataclass
class SegmentationResult:
    labels: sitk.Image                 # source label values on the input's grid
    table: object                      # gvsl.labels.LabelTable
    probabilities_grid: Optional[np.ndarray] = None  # (C, z, y, x) float32 on the network grid
    grid: object = None
    timings_s: dict = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    device: str = ""
    precision: str = ""
    window: tuple = ()
    voxels_per_label: dict = field(default_factory=dict)


def resolve_model(model, device="cpu"):
    """A SegmentationNet (with ``info``) or the path of a segmentation checkpoint -> model."""
    from pathlib import PurePath
    if isinstance(model, (str, PurePath)):
        from gvsl.checkpoint import load_model
        return load_model(model, "cpu", kind="segmentation")
    if model is None or not hasattr(model, "out_conv"):
        raise SegmentationError(f"model must be a segmentation model or the path of a segmentation "
                                f"checkpoint (from 'gvsl finetune'), got {type(model).__name__}.")
    return model


def window_of(model, window: Optional[int] = None) -> int:
    if window:
        return int(window)
    crop = (getattr(model, "info", {}).get("train_config") or {}).get("crop")
    return int(crop) if crop else DEFAULT_WINDOW


def network_probabilities(model, array_zyx: np.ndarray, device="auto", precision: str = "auto",
                          window: int = DEFAULT_WINDOW, overlap: float = DEFAULT_OVERLAP,
                          sw_batch_size: int = 1):
    """Softmax probabilities (C, z, y, x) float32 (CPU) of a prepared volume; -> (probs, Inference)."""
    from monai.inferers import sliding_window_inference

    from gvsl.inference import Inference
    inference = Inference(model, device=device, precision=precision)
    roi = tuple(int(window) for _ in range(3))

    def fn(m, x):
        logits = sliding_window_inference(x, roi, sw_batch_size, m, overlap=overlap, mode="gaussian")
        return softmax_inplace(logits[0].float().cpu())

    probs = inference.run(fn, array_zyx, what="segmentation")
    return probs.numpy(), inference


def softmax_inplace(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 0 of (C, z, y, x) scores without a second full-size copy."""
    scores -= scores.max(dim=0, keepdim=True).values
    scores.exp_()
    scores /= scores.sum(dim=0, keepdim=True)
    return scores


def _index_to_grid_voxel(image: sitk.Image, grid) -> tuple:
    """(A, b) with grid voxel (x, y, z) = A @ image index (i, j, k) + b."""
    d_img = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3) * np.array(image.GetSpacing())
    d_grid_inv = np.linalg.inv(grid.direction_matrix * float(grid.spacing_mm))
    a = d_grid_inv @ d_img
    b = d_grid_inv @ (np.array(image.GetOrigin()) - np.array(grid.origin_lps))
    return a, b


def labels_on_image(probs_grid: np.ndarray, grid, image: sitk.Image, class_values: np.ndarray,
                    slab_mb: float = DEFAULT_SLAB_MB, cancel=None) -> sitk.Image:
    """Class probabilities on ``grid`` -> argmax label map on ``image``'s grid (source values).

    Slab-wise trilinear resampling of all classes (bounded memory) with the argmax per slab.
    """
    n_c = probs_grid.shape[0]
    nx, ny, nz = image.GetSize()
    a, b = _index_to_grid_voxel(image, grid)
    size_xyz = np.array(grid.size, dtype=np.float64)
    scale = 2.0 / np.maximum(size_xyz - 1.0, 1.0)
    # bytes per output voxel of a slab: C float32 samples + float64 index/grid coordinates
    slab = max(1, int(slab_mb * 2 ** 20 // ((4 * n_c + 64) * nx * ny)))
    vol = torch.from_numpy(np.ascontiguousarray(probs_grid, dtype=np.float32))[None]
    values = np.asarray(class_values)
    out_dtype = np.uint8 if values.max() <= 255 else np.uint16
    out = np.zeros((nz, ny, nx), dtype=out_dtype)
    ii, jj = np.meshgrid(np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64), indexing="xy")
    for k0 in range(0, nz, slab):
        if cancel is not None:
            cancel.raise_if_cancelled()
        k1 = min(nz, k0 + slab)
        kk = np.arange(k0, k1, dtype=np.float64)[:, None, None]
        idx = np.stack(np.broadcast_arrays(ii[None], jj[None], kk), axis=-1)  # (nk, ny, nx, 3) (i, j, k)
        p = idx @ a.T + b                                                      # grid voxel (x, y, z)
        norm = torch.from_numpy((p * scale - 1.0).astype(np.float32))[None]
        sampled = F.grid_sample(vol, norm, mode="bilinear", padding_mode="border", align_corners=True)
        out[k0:k1] = values[sampled[0].argmax(dim=0).numpy()].astype(out_dtype)
    labels = sitk.GetImageFromArray(out)
    labels.CopyInformation(image)
    return labels


def probability_image(probs_grid: np.ndarray, cls: int, grid, image: sitk.Image) -> sitk.Image:
    """Class ``cls``'s probability resampled (linear) onto ``image``'s grid, float32."""
    g = sitk.GetImageFromArray(np.ascontiguousarray(probs_grid[cls], dtype=np.float32))
    grid.apply_to(g)
    ref = sitk.Image([int(v) for v in image.GetSize()], sitk.sitkUInt8)
    ref.CopyInformation(image)
    return sitk.Resample(g, ref, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def segment(image: sitk.Image, model, device="auto", *, precision: str = "auto", window: Optional[int] = None,
            overlap: float = DEFAULT_OVERLAP, sw_batch_size: int = 1, keep_probabilities: bool = False,
            slab_mb: float = DEFAULT_SLAB_MB, progress=None, cancel=None) -> SegmentationResult:
    """Segment ``image`` (scalar 3D SimpleITK image, any geometry; not modified) with ``model``
    (a segmentation checkpoint path or a loaded SegmentationNet). See the module docstring.

    window: sliding-window side in voxels (default: the training crop); overlap: window overlap
    fraction; keep_probabilities: also return the (C, z, y, x) probabilities on the network grid.
    progress: a :class:`gvsl.progress.Progress` (``event("stage", ...)``); cancel: a CancelToken.
    """
    from gvsl.device import describe
    from gvsl.io import VolumeError, validate_volume
    from gvsl.preprocessing import preprocess, spec_from_checkpoint
    from gvsl.segmodel import label_table_of

    if not isinstance(image, sitk.Image):
        raise SegmentationError(f"image must be a SimpleITK.Image (got {type(image).__name__}); read files "
                                "with gvsl.io.read_volume.")
    try:
        image = validate_volume(image, "the input image")
    except VolumeError as exc:
        raise SegmentationError(str(exc)) from None
    model = resolve_model(model)
    table = label_table_of(model)
    class_values = np.array([0] + table.values, dtype=np.int64)
    if model.config.n_classes != len(class_values):
        raise SegmentationError(f"model has {model.config.n_classes} classes but its label table "
                                f"{len(table)} labels + background.")
    timings = {}

    def stage(name, message):
        if cancel is not None:
            cancel.raise_if_cancelled()
        if progress is not None:
            progress.event("stage", stage=name, message=message)

    t = time.perf_counter()
    stage("preprocess", "intensity normalisation and resampling onto the network grid")
    spec, _ = spec_from_checkpoint(model.info)
    try:
        prepared = preprocess(image, spec, name="the input image")
    except VolumeError as exc:
        raise SegmentationError(str(exc)) from None
    timings["preprocess"] = time.perf_counter() - t
    win = window_of(model, window)
    t = time.perf_counter()
    stage("network", f"sliding window {win}^3 (Gaussian blending) on a {'x'.join(map(str, prepared.grid.size))} grid")
    probs, inference = network_probabilities(model, prepared.array_zyx, device, precision, win, overlap,
                                             sw_batch_size)
    timings["network"] = time.perf_counter() - t
    t = time.perf_counter()
    stage("export", "class scores resampled onto the input grid, argmax")
    labels = labels_on_image(probs, prepared.grid, image, class_values, slab_mb, cancel)
    timings["export"] = time.perf_counter() - t
    counts = np.bincount(np.searchsorted(class_values, sitk.GetArrayViewFromImage(labels).ravel()),
                         minlength=len(class_values))
    return SegmentationResult(
        labels=labels, table=table, probabilities_grid=probs if keep_probabilities else None,
        grid=prepared.grid, timings_s={k: round(v, 3) for k, v in timings.items()},
        warnings=list(prepared.warnings) + list(inference.warnings), device=describe(inference.device),
        precision=inference.precision.name, window=(win,) * 3,
        voxels_per_label={lab.name: int(counts[i + 1]) for i, lab in enumerate(table)})


def write_probabilities(result: SegmentationResult, image: sitk.Image, folder) -> List[Path]:
    """One float32 probability image per structure: ``folder/<value>_<name>.nii.gz``."""
    from gvsl.io import write_image_atomic
    if result.probabilities_grid is None:
        raise SegmentationError("run segment(..., keep_probabilities=True) to write probabilities.")
    paths = []
    for i, lab in enumerate(result.table, start=1):
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in lab.name)
        img = probability_image(result.probabilities_grid, i, result.grid, image)
        paths.append(write_image_atomic(img, Path(folder) / f"{lab.value}_{safe}.nii.gz"))
    return paths


def run_cli(args) -> int:
    """Handler of ``gvsl segment``."""
    from gvsl.progress import CancelToken
    from gvsl.io import read_volume, write_image_atomic
    from gvsl.progress import Progress
    progress = Progress(3, mode=args.progress, task="segment")
    image = read_volume(args.image)
    result = segment(image, args.model, args.device, precision=args.precision, window=args.window,
                     overlap=args.overlap, keep_probabilities=bool(args.probabilities), progress=progress,
                     cancel=CancelToken(watch_file=getattr(args, "cancel_file", None)))
    out = write_image_atomic(result.labels, args.out)
    summary = {"labels": str(out), "device": result.device, "precision": result.precision,
               "timings_s": result.timings_s, "voxels_per_label": result.voxels_per_label,
               "warnings": result.warnings}
    if args.seg_nrrd:
        from gvsl.segnrrd import write_seg_nrrd
        summary["seg_nrrd"] = str(write_seg_nrrd(result.labels, result.table, args.seg_nrrd))
    if args.probabilities:
        summary["probabilities"] = [str(p) for p in write_probabilities(result, image, args.probabilities)]
    progress.event("done", **summary)
    if args.progress != "json":
        print(json.dumps(summary, indent=2))
    return 0
