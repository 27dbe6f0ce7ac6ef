"""Segment a volume with a fine-tuned GVSL model: labels in the task's source values, exact geometry.

How (frames: LPS mm; arrays (z, y, x)):

1. **Preprocessing** from the checkpoint's spec (``PreprocessSpec``: intensity preset, isotropic
   spacing, canonical orientation) puts the image on the network grid ``G``.
2. **Network, streamed**: Gaussian-blended sliding windows (:mod:`gvsl.slidingwindow`: the same
   windows, weights and scores as ``monai.inferers.sliding_window_inference(mode="gaussian")``,
   window = the training crop) through ``Inference.run`` (device, precision, CUDA out-of-memory ->
   CPU); each finished z-slab of softmax probabilities (C, dz, y, x) goes straight to step 3.
3. **Back to the input's geometry before the argmax** (:class:`LabelResampler`): every input voxel
   centre (index -> LPS -> continuous voxel of ``G``) samples the C probabilities trilinearly
   (``grid_sample``'s arithmetic, align_corners=True, border padding) once the grid planes it needs
   have arrived, and takes the argmax then. This equals resampling each class map with SimpleITK
   (linear) onto the input and taking the argmax (tested), and the former whole-grid path exactly.
   Memory besides the input and its float32 copy on ``G``: the window's rolling buffer
   ``(C + 1) * window * Y * X * 4`` bytes, one slab (~``slab_mb`` MB) and the labels; a
   full-resolution float32 map of every class is never held, unless ``keep_probabilities`` asks
   for the whole grid ``C * Z * Y * X * 4`` bytes (``--probabilities``).
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

from gvsl.errors import GVSLError

DEFAULT_WINDOW = 96
DEFAULT_OVERLAP = 0.25
DEFAULT_SLAB_MB = 16.0


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
    """Softmax probabilities (C, z, y, x) float32 (CPU) of a prepared volume; -> (probs, Inference).

    The whole grid of every class (``C * z * y * x * 4`` bytes): for callers that want it;
    :func:`segment` streams instead (:mod:`gvsl.slidingwindow`).
    """
    from gvsl.inference import Inference
    from gvsl.slidingwindow import GridCollector, stream_sliding_window
    inference = Inference(model, device=device, precision=precision)
    collector = GridCollector()
    inference.run(lambda m, x: stream_sliding_window(m, x, (int(window),) * 3, collector, overlap, sw_batch_size),
                  array_zyx, what="segmentation")
    return collector.probs.numpy(), inference


def _index_to_grid_voxel(image: sitk.Image, grid) -> tuple:
    """(A, b) with grid voxel (x, y, z) = A @ image index (i, j, k) + b."""
    d_img = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3) * np.array(image.GetSpacing())
    d_grid_inv = np.linalg.inv(grid.direction_matrix * float(grid.spacing_mm))
    a = d_grid_inv @ d_img
    b = d_grid_inv @ (np.array(image.GetOrigin()) - np.array(grid.origin_lps))
    return a, b


class LabelResampler:
    """Slab consumer of :func:`gvsl.slidingwindow.stream_sliding_window`: grid probabilities ->
    argmax label map on ``image``'s grid (source values), each input voxel decided exactly once.

    Every input voxel centre (index -> LPS -> continuous voxel (x, y, z) of ``grid``) samples the
    C class probabilities trilinearly with border padding and align_corners=True (voxel centres),
    with the arithmetic of ``torch.nn.functional.grid_sample`` (same float32 normalised
    coordinates, same weights, same sum order: bit-identical values, tested), as soon as both grid
    planes it needs (``floor(z)`` and the one above, clamped) have arrived; the argmax is taken
    then. One previous plane is kept for voxels between two slabs. Input slices are visited only
    for the slabs their z-range touches (an oblique slice spans several slabs).

    Memory: the labels (input voxels x 1 or 2 bytes), one slab + one plane ``C * (dz + 1) * Y * X *
    4`` bytes, and work arrays of ~``slab_mb`` MB (at least one input slice, ~(160 + 16 C) bytes
    per voxel); with ``keep_probabilities`` also the whole grid
    ``C * Z * Y * X * 4`` bytes (``self.probabilities``, only when asked).
    """

    def __init__(self, grid, image: sitk.Image, class_values, slab_mb: float = DEFAULT_SLAB_MB,
                 keep_probabilities: bool = False, cancel=None):
        self.grid, self.cancel, self.slab_mb = grid, cancel, float(slab_mb)
        self.values = np.asarray(class_values)
        self.out_dtype = np.uint8 if self.values.max() <= 255 else np.uint16
        self.keep_probabilities = bool(keep_probabilities)
        self.size_in = tuple(int(v) for v in image.GetSize())          # (x, y, z)
        self.size_grid = np.array(grid.size, dtype=np.int64)           # (x, y, z)
        self.a, self.b = _index_to_grid_voxel(image, grid)
        self.scale = 2.0 / np.maximum(self.size_grid.astype(np.float64) - 1.0, 1.0)
        nx, ny, nz = self.size_in
        corners = np.array([[i, j] for i in (0, nx - 1) for j in (0, ny - 1)], dtype=np.float64)
        kk = np.arange(nz, dtype=np.float64)
        hi = np.stack([self._hi_plane(self._coord(2, ci, cj, kk)) for ci, cj in corners])
        self.slice_lo = hi.min(axis=0) - 1   # the grid planes each input slice needs (+-1: rounding)
        self.slice_hi = hi.max(axis=0) + 1
        self.seconds = 0.0
        self.start(None, None)

    def start(self, n_classes, shape_zyx) -> None:
        """(Re)start a pass: clear the labels (a rerun after out-of-memory starts from scratch)."""
        nx, ny, nz = self.size_in
        self.labels = np.zeros((nz, ny, nx), dtype=self.out_dtype)
        self.prev = None
        self.done_voxels = 0
        self.probabilities = None
        self.next_plane = 0

    def _coord(self, axis: int, i, j, k) -> np.ndarray:
        """Grid voxel coordinate ``axis`` of input index (i, j, k), float64, elementwise."""
        a, b = self.a, self.b
        return a[axis, 0] * i + a[axis, 1] * j + a[axis, 2] * k + b[axis]

    def _source(self, axis: int, p: np.ndarray) -> np.ndarray:
        """Float32 source coordinate as grid_sample computes it (align_corners, border clip)."""
        n1 = np.float32(self.size_grid[axis] - 1)
        norm = (p * self.scale[axis] - 1.0).astype(np.float32)
        c = ((norm + np.float32(1)) / np.float32(2)) * n1
        return np.minimum(np.maximum(c, np.float32(0)), n1)

    def _hi_plane(self, pz: np.ndarray) -> np.ndarray:
        return np.minimum(np.floor(self._source(2, pz)).astype(np.int64) + 1, self.size_grid[2] - 1)

    def __call__(self, z0: int, slab) -> None:
        """Grid planes [z0, z0 + dz) of probabilities (C, dz, Y, X) float32 have arrived."""
        t0 = time.perf_counter()
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()
        slab = torch.as_tensor(slab, dtype=torch.float32)
        n_c, dz = int(slab.shape[0]), int(slab.shape[1])
        z0 = int(z0)
        if z0 != self.next_plane or tuple(slab.shape[1:][::-1]) != tuple(int(v) for v in self.grid.size[:2]) + (dz,):
            raise ValueError(f"slab of planes {z0}..{z0 + dz} {tuple(slab.shape)} does not continue plane "
                             f"{self.next_plane} of a grid of size {tuple(self.grid.size)}")
        if self.keep_probabilities:
            if self.probabilities is None:
                self.probabilities = np.empty((n_c,) + tuple(self.grid.shape_zyx), dtype=np.float32)
            self.probabilities[:, z0:z0 + dz] = slab.numpy()
        z1 = z0 + dz
        local = slab if self.prev is None else torch.cat([self.prev[:, None], slab], dim=1)
        offset = z0 if self.prev is None else z0 - 1       # grid plane of local plane 0
        gx, gy = int(self.size_grid[0]), int(self.size_grid[1])
        flat = local.permute(1, 2, 3, 0).contiguous().reshape(-1, n_c).numpy()  # (voxel, class): a corner = C adjacent floats
        nx, ny, _ = self.size_in
        per_batch = max(1, int(self.slab_mb * 2 ** 20 // ((160 + 16 * n_c) * nx * ny)))
        ks = np.nonzero((self.slice_hi >= z0) & (self.slice_lo < z1))[0]
        ii = np.arange(nx, dtype=np.float64)[None, None, :]
        jj = np.arange(ny, dtype=np.float64)[None, :, None]
        for s in range(0, len(ks), per_batch):
            kb = ks[s:s + per_batch]
            pz = self._coord(2, ii, jj, kb.astype(np.float64)[:, None, None])
            hi = self._hi_plane(pz)
            sel_k, sel_j, sel_i = np.nonzero((hi >= z0) & (hi < z1))
            if not len(sel_k):
                continue
            k = kb[sel_k]
            i, j = sel_i.astype(np.float64), sel_j.astype(np.float64)
            kf = k.astype(np.float64)
            cx = self._source(0, self._coord(0, i, j, kf))
            cy = self._source(1, self._coord(1, i, j, kf))
            cz = self._source(2, pz[sel_k, sel_j, sel_i])
            probs = self._trilinear(flat, (cx, cy, cz), (gx, gy), offset)
            self.labels[k, sel_j, sel_i] = self.values[probs.argmax(axis=1)].astype(self.out_dtype)
            self.done_voxels += len(k)
        self.prev = local[:, -1].clone()
        self.next_plane = z1
        self.seconds += time.perf_counter() - t0

    def _trilinear(self, flat: np.ndarray, c_xyz, size_xy, offset: int) -> np.ndarray:
        """(N, C) samples; grid_sample's 3D bilinear kernel: weights (x1 - x)(y1 - y)(z1 - z)..., sum
        over the corners tnw, tne, tsw, tse, bnw, bne, bsw, bse in that order."""
        lo, hi, w_lo, w_hi = [], [], [], []
        for axis, c in enumerate(c_xyz):
            i0 = np.floor(c).astype(np.int64)
            lo.append(i0)
            hi.append(np.minimum(i0 + 1, self.size_grid[axis] - 1))  # out of range only with weight 0
            w_hi.append(c - i0.astype(np.float32))
            w_lo.append((i0 + 1).astype(np.float32) - c)
        gx, gy = size_xy
        out = None
        for zc, wz in ((lo[2], w_lo[2]), (hi[2], w_hi[2])):
            for yc, wy in ((lo[1], w_lo[1]), (hi[1], w_hi[1])):
                for xc, wx in ((lo[0], w_lo[0]), (hi[0], w_hi[0])):
                    term = np.take(flat, ((zc - offset) * gy + yc) * gx + xc, axis=0)
                    term *= (wx * wy * wz)[:, None]
                    out = term if out is None else np.add(out, term, out=out)
        return out

    def finish(self) -> sitk.Image:
        total = int(np.prod(self.size_in))
        if self.done_voxels != total or self.next_plane != int(self.size_grid[2]):
            raise AssertionError(f"resampling decided {self.done_voxels} of {total} voxels after grid plane "
                                 f"{self.next_plane} of {int(self.size_grid[2])}")
        return sitk.GetImageFromArray(self.labels)


def labels_on_image(probs_grid: np.ndarray, grid, image: sitk.Image, class_values: np.ndarray,
                    slab_mb: float = DEFAULT_SLAB_MB, cancel=None) -> sitk.Image:
    """Class probabilities (C, z, y, x) on ``grid`` -> argmax label map on ``image``'s grid (source
    values): :class:`LabelResampler` fed the grid in slabs of ~``slab_mb`` MB."""
    resampler = LabelResampler(grid, image, class_values, slab_mb, cancel=cancel)
    n_c, nz, ny, nx = probs_grid.shape
    step = max(1, int(slab_mb * 2 ** 20 // (4 * n_c * ny * nx)))
    for z0 in range(0, nz, step):
        resampler(z0, torch.from_numpy(np.ascontiguousarray(probs_grid[:, z0:z0 + step], dtype=np.float32)))
    labels = resampler.finish()
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
    fraction; keep_probabilities: also return the (C, z, y, x) float32 probabilities of the whole
    network grid (``C * Z * Y * X * 4`` bytes more: only when asked, e.g. ``--probabilities``);
    slab_mb: size of the probability slabs handed from the sliding window to the resampling and
    of the resampling's work arrays (at least one input slice).
    progress: a :class:`gvsl.progress.Progress` (``event("stage", ...)``, one ``"window_row"``
    event per row of windows); cancel: a CancelToken, checked before every row of windows and
    every slab.
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
    stage("network", f"sliding window {win}^3 (Gaussian blending) on a {'x'.join(map(str, prepared.grid.size))} "
                     "grid, streamed onto the input grid (argmax)")
    from gvsl.inference import Inference
    from gvsl.slidingwindow import stream_sliding_window
    resampler = LabelResampler(prepared.grid, image, class_values, slab_mb, keep_probabilities, cancel)
    n_c, (_, ny, nx) = len(class_values), prepared.grid.shape_zyx
    slab_planes = max(1, int(slab_mb * 2 ** 20 // (4 * n_c * ny * nx)))
    inference = Inference(model, device=device, precision=precision, progress=progress)
    inference.run(lambda m, x: stream_sliding_window(m, x, (win,) * 3, resampler, overlap, sw_batch_size,
                                                     slab_planes, cancel, progress),
                  prepared.array_zyx, what="segmentation")
    labels = resampler.finish()
    labels.CopyInformation(image)
    timings["network"] = time.perf_counter() - t - resampler.seconds
    timings["export"] = resampler.seconds
    counts = np.bincount(np.searchsorted(class_values, sitk.GetArrayViewFromImage(labels).ravel()),
                         minlength=len(class_values))
    return SegmentationResult(
        labels=labels, table=table, probabilities_grid=resampler.probabilities,
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
    from gvsl.inference import return_large_blocks_to_os
    return_large_blocks_to_os()  # this process only: freed window tensors go back to the OS
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
