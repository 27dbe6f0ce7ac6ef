"""The ONE place that runs a model over prepared volumes: device, precision, memory format, OOM.

Registration and segmentation (and anything else that runs a trained network on a user's
volume) go through :class:`Inference`::

    inf = Inference(model, device="auto", precision="auto")
    mat, flow, _ = inf.run(lambda m, a, b: m.register(a, b), fixed_zyx, moving_zyx)

``run(fn, *arrays)`` turns each (z, y, x) float32 array into a (1, 1, z, y, x) tensor on the
device in the chosen memory format, calls ``fn(model, *tensors)`` under ``torch.no_grad()`` and
autocast, and returns ``fn``'s result with every tensor detached, float32, on the CPU. On a
CUDA/MPS out-of-memory error it frees the cache, records a warning (``inf.warnings``, and the
progress stream when one is given) and runs again on the CPU, where it stays.

Precision and memory format come from :func:`gvsl.device.choose_precision` ("inference"): CUDA
bf16 (fp16 without bf16 support) + channels-last 3D; CPU: fp32 with channels-last 3D (measured
faster than contiguous on this project's AVX2 CPUs with outputs equal to ~1e-5, see
``Testing/Benchmarks/bench_inference.py``), bf16 only on CPUs with native bf16. The model is put
in eval mode for the call and its training flag restored afterwards.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import torch

from gvsl.device import Precision, choose_precision, describe, is_out_of_memory, select_device


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def return_large_blocks_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Process-wide (glibc only): serve every allocation over ``threshold_bytes`` with its own
    mmap, so a freed tensor goes back to the OS at once (``mallopt(M_MMAP_THRESHOLD)``; it also
    stops glibc's dynamic threshold, which otherwise moves blocks up to 32 MB into a heap that
    never shrinks). Measured on ``gvsl segment``, 256 x 256 x 120 grid, window 96: peak RSS
    757 -> 477 MB above baseline, same speed. Called by the ``gvsl segment`` command (its own
    process); a library caller (e.g. Slicer's own process) decides for itself. -> applied?"""
    try:
        import ctypes
        import ctypes.util
        name = ctypes.util.find_library("c")
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    except OSError:
        return False
    if mallopt is None:
        return False
    m_mmap_threshold = -3  # glibc <malloc.h>
    return bool(mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(int(threshold_bytes))))


class Inference:
    """Run ``model`` on prepared volumes (see the module docstring).

    model: a torch module (or anything with ``.to``/``.eval``); device: "auto" | "cpu" | "cuda" |
    "cuda:N" | "mps" or a torch.device; precision: "auto" | "fp32" | "bf16" | "fp16";
    progress: an optional :class:`gvsl.progress.Progress` that receives warnings.
    """

    def __init__(self, model, device="auto", precision: str = "auto", progress=None):
        self.model = model
        self.device: torch.device = device if isinstance(device, torch.device) else select_device(device)
        self.requested_precision = precision
        self.precision: Precision = choose_precision(self.device, "inference", precision)
        self.progress = progress
        self.warnings: List[str] = []

    def describe(self) -> str:
        return describe(self.device)

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        if self.progress is not None:
            self.progress.event("warning", message=message)

    def tensor(self, array_zyx: np.ndarray) -> torch.Tensor:
        """(z, y, x) array -> (1, 1, z, y, x) float32 tensor on the device, in the memory format."""
        t = torch.from_numpy(np.ascontiguousarray(array_zyx, dtype=np.float32))[None, None]
        return self.precision.prepare_input(t)

    def _call(self, fn: Callable, arrays):
        model = self.precision.prepare_model(self.model)
        tensors = [self.tensor(a) for a in arrays]
        with torch.no_grad(), self.precision.autocast():
            return _to_cpu(fn(model, *tensors))

    def run(self, fn: Callable, *arrays_zyx: np.ndarray, what: Optional[str] = None):
        """``fn(model, *tensors)`` on the device; CPU fallback on out-of-memory (module docstring)."""
        was_training = bool(getattr(self.model, "training", False))
        if hasattr(self.model, "eval"):
            self.model.eval()
        try:
            try:
                return self._call(fn, arrays_zyx)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled
                if self.device.type == "cpu" or not is_out_of_memory(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                shape = " x ".join(str(v) for v in np.shape(arrays_zyx[0])[::-1]) if arrays_zyx else "?"
                self._warn(f"{describe(self.device)} ran out of memory for {what or 'a'} {shape} volume; re-ran on "
                           "the CPU (slower). Crop the images or lower the grid size to stay on the GPU.")
                self.device = torch.device("cpu")
                self.precision = choose_precision(self.device, "inference", "auto")
                return self._call(fn, arrays_zyx)
        finally:
            if was_training and hasattr(self.model, "train"):
                self.model.train(True)
