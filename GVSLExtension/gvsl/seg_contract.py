"""TEMPORARY adapter to the foundation interfaces (CONTRACT.md: gvsl.preprocessing, gvsl.inference).

Segmentation imports ``PreprocessSpec``, ``preprocess``, ``preprocess_labels``,
``spec_from_checkpoint`` and ``Inference`` from here and nowhere else. When the lead's
``gvsl/preprocessing.py`` and ``gvsl/inference.py`` exist they are used as they are; until then a
minimal stand-in with the contract's signatures and semantics is defined below (CT/MR presets of
:mod:`gvsl.io`, canonical LPS storage order via ``DICOMOrient``, grid centred on the image with
``ceil((n-1)*s/sp)+1`` voxels per axis, linear resampling; no antialiasing). Delete the stand-in
once the foundation lands on main.
"""
from __future__ import annotations

import numpy as np

try:  # pragma: no cover - taken once the foundation issue is merged
    from gvsl.preprocessing import (PreprocessSpec, Prepared, preprocess, preprocess_labels,  # noqa: F401
                                    spec_from_checkpoint)
    HAVE_FOUNDATION_PREPROCESSING = True
except ImportError:
    HAVE_FOUNDATION_PREPROCESSING = False

try:  # pragma: no cover
    from gvsl.inference import Inference  # noqa: F401
    HAVE_FOUNDATION_INFERENCE = True
except ImportError:
    HAVE_FOUNDATION_INFERENCE = False

if not HAVE_FOUNDATION_PREPROCESSING:
    import math
    from dataclasses import asdict, dataclass
    from typing import Optional

    import SimpleITK as sitk

    from gvsl.registration import NetworkGrid as Grid

    @dataclass(frozen=True)
    class PreprocessSpec:  # type: ignore[no-redef]
        preset: str = "ct"
        spacing_mm: float = 1.0
        orientation: str = "LPS"
        anchor: str = "center"
        pad_value: float = 0.0
        antialias: bool = True

        def to_dict(self) -> dict:
            return asdict(self)

        @classmethod
        def from_dict(cls, d: Optional[dict]) -> "PreprocessSpec":
            d = dict(d or {})
            known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            return cls(**known)

    @dataclass
    class Prepared:  # type: ignore[no-redef]
        array_zyx: np.ndarray
        grid: Grid

    def spec_from_checkpoint(ckpt_or_info) -> PreprocessSpec:  # type: ignore[no-redef]
        return PreprocessSpec.from_dict((ckpt_or_info or {}).get("preprocessing"))

    def grid_for(image: sitk.Image, spec: PreprocessSpec, max_voxels=None):
        ref = sitk.Image([int(v) for v in image.GetSize()], sitk.sitkUInt8)
        ref.CopyInformation(image)
        oriented = sitk.DICOMOrient(ref, spec.orientation)
        n = np.array(oriented.GetSize(), dtype=np.float64)
        sp = np.array(oriented.GetSpacing(), dtype=np.float64)
        s = float(spec.spacing_mm)
        sizes = np.array([int(math.ceil((ni - 1) * si / s - 1e-6)) + 1 for ni, si in zip(n, sp)])
        d = np.array(oriented.GetDirection(), dtype=np.float64).reshape(3, 3)
        centre = np.array(oriented.TransformContinuousIndexToPhysicalPoint(((n - 1) / 2).tolist()))
        origin = centre - s * d @ ((sizes - 1) / 2.0)
        return Grid(size=tuple(int(v) for v in sizes), spacing_mm=s,
                    origin_lps=tuple(float(v) for v in origin), direction=tuple(oriented.GetDirection())), []

    def preprocess(image: sitk.Image, spec: PreprocessSpec, grid=None, max_voxels=None,  # type: ignore[no-redef]
                   name: str = "volume") -> Prepared:
        from gvsl.io import normalize_intensity
        if grid is None:
            grid, _ = grid_for(image, spec, max_voxels)
        arr = normalize_intensity(sitk.GetArrayViewFromImage(image), spec.preset)
        norm = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
        norm.CopyInformation(image)
        out = sitk.Resample(norm, grid.reference(), sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear,
                            float(spec.pad_value), sitk.sitkFloat32)
        return Prepared(sitk.GetArrayFromImage(out), grid)

    def preprocess_labels(labels: sitk.Image, grid) -> np.ndarray:  # type: ignore[no-redef]
        out = sitk.Resample(labels, grid.reference(), sitk.Transform(3, sitk.sitkIdentity),
                            sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
        return sitk.GetArrayFromImage(out)

if not HAVE_FOUNDATION_INFERENCE:
    import torch

    class Inference:  # type: ignore[no-redef]
        """Stand-in of ``gvsl.inference.Inference``: device, precision, memory format, CUDA OOM -> CPU."""

        def __init__(self, model, device="auto", precision="auto", progress=None):
            from gvsl.device import choose_precision, select_device
            self.device = device if isinstance(device, torch.device) else select_device(device)
            self.precision = choose_precision(self.device, "inference", precision)
            self.model = self.precision.prepare_model(model).eval()
            self.progress = progress
            self.warnings: list = []

        def tensor(self, array_zyx) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(array_zyx, dtype=np.float32))[None, None]
            return self.precision.prepare_input(t)

        def run(self, fn, *arrays_zyx):
            from gvsl.device import choose_precision, is_out_of_memory
            try:
                with torch.no_grad(), self.precision.autocast():
                    return fn(self.model, *[self.tensor(a) for a in arrays_zyx])
            except RuntimeError as exc:
                if self.device.type == "cpu" or not is_out_of_memory(exc):
                    raise
            self.warnings.append(f"out of memory on {self.device}; the model ran on the CPU instead")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.device = torch.device("cpu")
            self.precision = choose_precision(self.device, "inference")
            self.model = self.precision.prepare_model(self.model)
            with torch.no_grad(), self.precision.autocast():
                return fn(self.model, *[self.tensor(a) for a in arrays_zyx])
