"""Device and precision selection: pick once, fall back to the CPU, say what was chosen.

* ``select_device("auto" | "cpu" | "cuda" | "cuda:N" | "mps")``: auto prefers CUDA, then Apple
  MPS, then the CPU. Asking for a device that is not there is an error that says what to do.
* :class:`Precision`: the autocast dtype and memory format for a device and a purpose.
  CUDA: bf16 when the GPU supports it, else fp16 (training then uses a gradient scaler),
  channels-last 3D. CPU: fp32 unless ``--precision bf16`` is asked for (bf16 is emulated and
  >100x *slower* without AVX512-BF16/AMX: AVX2 EPYC 64^3 backbone fp32 1.5 s, bf16 > 200 s; with
  AMX it is native but moves the predicted field by up to 0.34 voxel); inference channels-last
  3D, training contiguous.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from gvsl.errors import GVSLError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


class DeviceError(GVSLError, RuntimeError):
    """A requested device is not available."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(name: str = "auto") -> torch.device:
    """Resolve a device name; raises :class:`DeviceError` with the fix when it is unavailable."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device '{name}' was requested but this PyTorch ({torch.__version__}) sees no CUDA GPU "
                "(a CPU-only build, or no driver). Use --device cpu or auto, or install a CUDA build of "
                "PyTorch (in Slicer: the PyTorch extension's 'Install PyTorch' with a CUDA computation backend).")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s) visible.")
        return dev
    if name == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' was requested but Apple MPS is not available; use --device cpu or auto.")
        return torch.device("mps")
    raise DeviceError(f"unknown device '{name}'; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N).")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, where bf16 convolutions are fast."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in checks:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover - very old torch
            pass
    return False


@dataclass(frozen=True)
class Precision:
    """How to run a model on a device: autocast dtype (None = fp32) and memory format."""

    device: torch.device
    dtype: Optional[torch.dtype]
    channels_last: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        """Context manager: autocast to ``dtype`` on ``device`` (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        return model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x


def choose_precision(device: torch.device, purpose: str = "inference", requested: str = "auto") -> Precision:
    """Precision for ``purpose`` ("inference" or "training"); ``requested``: auto | fp32 | bf16 | fp16."""
    requested = (requested or "auto").lower()
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision '{requested}'; choose auto, fp32, bf16 or fp16")
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if device.type == "cuda":
        if requested == "auto":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = dtypes[requested]
        return Precision(device, dtype, channels_last=True)
    if device.type == "cpu":
        if requested == "auto":
            # fp32 always: bf16 is emulated (>100x slower) without AVX512-BF16/AMX, and with them
            # it moves the predicted field by up to 0.34 voxel (test_network); --precision bf16
            # asks for it. Inference runs channels-last 3D: measured faster than contiguous,
            # equal to ~1e-5 relative (Testing/Benchmarks/bench_inference.py).
            return Precision(device, None, channels_last=purpose == "inference")
        if requested == "fp16":
            raise ValueError("fp16 autocast is not supported on the CPU; use bf16 or fp32")
        dtype = dtypes[requested]
        return Precision(device, dtype, channels_last=dtype is not None or purpose == "inference")
    # mps and others: fp32 unless asked
    return Precision(device, dtypes[requested] if requested != "auto" else None, channels_last=False)


def describe(device: torch.device) -> str:
    """Human-readable device name, e.g. 'cuda:0 (NVIDIA H100 80GB HBM3)' or 'cpu (2 threads)'."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"
    return str(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors (so callers can fall back to the CPU)."""
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
