"""Input files checked below SimpleITK, where SimpleITK is silent (used by :func:`gvsl.io.read_volume`).

Measured with SimpleITK 2.5 (ITK 5.4): a NIfTI file cut short (``.nii`` or ``.nii.gz``) reads
without an error, the missing voxels filled with zeros; and ITK's NIfTI reader turns NaN and
±Inf voxels into 0, so a check on the image it returns cannot see them. (NRRD and MetaImage
raise on truncation and keep NaN.) So for NIfTI files this module reads the header itself
(NIfTI-1 and NIfTI-2, either byte order) and:

* completeness: the voxel payload ends where the header says. ``.nii``: the file size.
  ``.nii.gz``: cheaply, the gzip trailer's recorded length (ISIZE) equals header + payload;
  if it does not (or the data are floating point and get scanned anyway), the whole stream is
  decompressed, which checks its CRC and length;
* non-finite voxels of float data: the payload is streamed in 4 MiB blocks and the flat
  indices of NaN/Inf voxels are returned. NIfTI stores x fastest, then y, then z, and ITK does
  not permute on reading, so these are C-order indices of SimpleITK's (z, y, x) array.

DICOM series: :func:`dicom_slice_gaps` checks that the slice positions (ImagePositionPatient
projected on the slice normal) are evenly spaced. GDCM silently skips an unreadable slice and
ITK then spreads the remaining slices over the whole extent (only a raw stderr line says so);
:func:`gvsl.io.read_volume` refuses such a series (a refusal, not a warning: its geometry would
be wrong by up to one slice everywhere).

Imports only NumPy (no SimpleITK, no torch).
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from gvsl.fsio import IncompleteFile, gzip_recorded_size, gzip_stream_size

# NIfTI datatype codes -> numpy type (the ones ITK reads as scalars)
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4",
                 1024: "i8", 1280: "u8"}
_BLOCK = 4 << 20
SPACING_TOLERANCE = 0.01  # relative: slice gaps may differ from the median by 1 % (min 1e-3 mm)


class InputCheckError(Exception):
    """An input file is truncated or inconsistent; the message says how (without the file name)."""


@dataclass(frozen=True)
class NiftiLayout:
    """Where a NIfTI file's voxels are: ``vox_offset`` bytes in, ``n_voxels`` of ``dtype``."""

    vox_offset: int
    n_voxels: int
    dtype: np.dtype

    @property
    def payload_bytes(self) -> int:
        return self.n_voxels * self.dtype.itemsize

    @property
    def total_bytes(self) -> int:
        return self.vox_offset + self.payload_bytes


def is_nifti(path) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def _open(path: Path):
    return gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")


def parse_nifti_header(head: bytes) -> Optional[NiftiLayout]:
    """The layout from the first 540 bytes of a NIfTI-1/-2 file; None for an unknown header
    (or a datatype ITK would not read as a scalar; SimpleITK then reports the problem itself)."""
    for endian in ("<", ">"):
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, _ = struct.unpack(endian + "2h", head[70:74])
            vox_offset = int(struct.unpack(endian + "f", head[108:112])[0])
            vox_offset = max(vox_offset, 352)
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype, _ = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            vox_offset = int(struct.unpack(endian + "q", head[168:176])[0])
            vox_offset = max(vox_offset, 544)
            break
    else:
        return None
    code = _NIFTI_DTYPES.get(int(datatype))
    ndim = int(dims[0])
    if code is None or not 1 <= ndim <= 7:
        return None
    n = 1
    for d in dims[1:1 + ndim]:
        n *= max(int(d), 1)
    return NiftiLayout(vox_offset, n, np.dtype(endian + code))


def check_nifti(path) -> Tuple[Optional[NiftiLayout], np.ndarray]:
    """Check a NIfTI file -> (layout or None, flat indices of non-finite voxels).

    Raises :class:`InputCheckError` when the file is shorter than its header says (or its gzip
    stream is cut or corrupt). See the module docstring for what is read and when.
    """
    path = Path(path)
    none = np.zeros(0, np.int64)
    gz = str(path).lower().endswith(".gz")
    if gz:
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                return None, none  # not gzip at all: SimpleITK says what it is not
    try:
        with _open(path) as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        if gz:
            raise InputCheckError(f"its gzip stream is truncated or corrupt ({exc})") from None
        return None, none
    layout = parse_nifti_header(head)
    if layout is None:
        return None, none
    if layout.dtype.kind == "f":
        return layout, _scan_non_finite(path, layout)
    if not gz:
        size = os.path.getsize(path)
        if size < layout.total_bytes:
            raise InputCheckError(f"the file has {size} bytes but its header describes {layout.total_bytes} "
                                  f"({layout.n_voxels} voxels)")
        return layout, none
    if gzip_recorded_size(path) == layout.total_bytes % (1 << 32):
        return layout, none  # the trailer matches: complete unless astronomically unlucky
    try:
        size = gzip_stream_size(path)
    except IncompleteFile as exc:
        raise InputCheckError(str(exc).replace("the gzip stream", "its gzip stream")) from None
    if size < layout.total_bytes:
        raise InputCheckError(f"it decompresses to {size} bytes but its header describes {layout.total_bytes} "
                              f"({layout.n_voxels} voxels)")
    return layout, none


def _scan_non_finite(path: Path, layout: NiftiLayout) -> np.ndarray:
    """Stream the float payload; flat indices of NaN/Inf voxels (checks completeness too)."""
    bad: List[np.ndarray] = []
    item = layout.dtype.itemsize
    per_block = max(_BLOCK // item, 1)
    done = 0
    try:
        with _open(path) as f:
            skip = layout.vox_offset
            while skip > 0:
                got = len(f.read(min(skip, _BLOCK)))
                if got == 0:
                    break
                skip -= got
            while done < layout.n_voxels:
                want = min(per_block, layout.n_voxels - done)
                block = f.read(want * item)
                if len(block) < want * item:
                    raise InputCheckError(f"it holds {done + len(block) // item} of the {layout.n_voxels} voxels "
                                          "its header describes")
                values = np.frombuffer(block, dtype=layout.dtype)
                idx = np.flatnonzero(~np.isfinite(values))
                if idx.size:
                    bad.append(idx + done)
                done += want
            if str(path).lower().endswith(".gz"):
                while f.read(_BLOCK):  # to the end: gzip checks CRC and length there
                    pass
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputCheckError(f"its gzip stream is truncated or corrupt ({exc or type(exc).__name__})") from None
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------
# DICOM slice spacing
# ---------------------------------------------------------------------------------------
def dicom_slice_gaps(positions_lps: Sequence[Sequence[float]], normal: Sequence[float]) -> Optional[str]:
    """None if the slices (in reading order) are evenly spaced along ``normal``, else a
    sentence naming the median spacing and the worst gap (1-based slice numbers)."""
    pos = np.asarray(positions_lps, dtype=float)
    if len(pos) < 3:
        return None
    d = pos @ np.asarray(normal, dtype=float)
    gaps = np.diff(d)
    median = float(np.median(np.abs(gaps)))
    if np.any(np.abs(gaps) < 1e-6) or median == 0:
        i = int(np.argmin(np.abs(gaps)))
        return (f"slices {i + 1} and {i + 2} are at the same position: the folder mixes two series or "
                "acquisitions (or holds duplicate files)")
    tol = max(SPACING_TOLERANCE * median, 1e-3)
    dev = np.abs(np.abs(gaps) - median)
    worst = int(np.argmax(dev))
    if dev[worst] <= tol and np.all(np.sign(gaps) == np.sign(gaps[0])):
        return None
    n_missing = int(round(abs(gaps[worst]) / median)) - 1
    hint = (f"about {n_missing} slice(s) missing there" if n_missing >= 1
            else "the slices are unevenly spaced")
    return (f"the slices are not evenly spaced: {median:.4g} mm apart, but {abs(gaps[worst]):.4g} mm "
            f"between slices {worst + 1} and {worst + 2} of {len(pos)} ({hint})")
