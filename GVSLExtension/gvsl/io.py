"""Volume input: find and read 3D scans, and a cache of preprocessed volumes.

Inputs are image files (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) or DICOM
series folders, read with SimpleITK. Geometry stays SimpleITK's: LPS millimetres, arrays from
``sitk.GetArrayFromImage`` are (z, y, x) = (k, j, i). Reading never reorients an image
(:mod:`gvsl.preprocessing` does, for the network).

DICOM: a folder holding one series is that series' volume. A folder holding several series
yields one path per series, ``<folder>/<SeriesInstanceUID>`` (a *virtual* path: it does not
exist on disk; :func:`read_volume` reads that series of ``<folder>``).

Non-finite voxels (NaN/Inf) are replaced by the finite minimum of the image with a warning
(:func:`gvsl.errors.warn`, a :class:`VolumeWarning` outside the command) naming the file and the
count (an image with no finite voxel is an error); for every format, NIfTI included (whose reader
hides them: :mod:`gvsl.verify` finds them in the raw data). A NIfTI file shorter than its header
says (SimpleITK zero-fills it) and a DICOM series with missing or unevenly spaced slices are
refused (:mod:`gvsl.verify`).

Preprocessing is :mod:`gvsl.preprocessing` (the one contract of every command);
:func:`preprocess` here is its shortcut returning an image.

:class:`VolumeCache` keeps preprocessed arrays in memory and, with a ``cache_dir``, on disk as
``.npy`` files keyed by (resolved path, mtime, size, the preprocessing spec, CACHE_VERSION).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from gvsl import errors, verify
from gvsl.errors import GVSLError, GVSLWarning

PathLike = Union[str, os.PathLike]

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MIN_SIZE_VOXELS = 4
CACHE_VERSION = 2  # 2: the gvsl.preprocessing contract (canonical orientation, centred grid)

class VolumeError(GVSLError, ValueError):
    """A volume (or set of volumes) that cannot be used, with what is wrong and what to do."""


class VolumeWarning(GVSLWarning):
    """Something in a volume was repaired (e.g. NaN voxels); the message names the file."""


# ---------------------------------------------------------------------------------------
# Finding volumes
# ---------------------------------------------------------------------------------------
def is_image_file(path: PathLike) -> bool:
    """True for a file name with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def image_stem(path: PathLike) -> str:
    """A file name without its image extension (``case_01.nii.gz`` -> ``case_01``), the name that
    matches an image with its label map; other names lose their last suffix (``Path.stem``)."""
    name = Path(path).name
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


def _dicom_series_ids(folder: Path) -> List[str]:
    """Series instance UIDs in ``folder``; GDCM's "No Series were found" warning (printed for
    every folder without DICOM files) is silenced."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return []
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _dicom_volumes(folder: Path) -> List[Path]:
    ids = _dicom_series_ids(folder)
    if len(ids) == 1:
        return [folder]
    return [folder / uid for uid in ids]


def find_volumes(paths: Iterable[PathLike]) -> List[Path]:
    """Expand files and folders into a sorted, de-duplicated list of volume paths.

    A file must have an image extension (:data:`IMAGE_EXTENSIONS`). A folder contributes its
    image files (not recursively), its DICOM series, and the DICOM series of its immediate
    subfolders (one path per series, see the module docstring). Hidden files are skipped.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    found: List[Path] = []
    for path in paths:
        if not path.exists():
            raise VolumeError(f"{path} does not exist; pass image files or folders of them.")
        if path.is_file():
            if not is_image_file(path):
                raise VolumeError(f"{path} is not a supported volume file; expected "
                                  f"{'/'.join(IMAGE_EXTENSIONS)} files or DICOM series folders.")
            found.append(path)
            continue
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        found += [p for p in entries if p.is_file() and is_image_file(p)]
        found += _dicom_volumes(path)
        for sub in entries:
            if sub.is_dir():
                found += _dicom_volumes(sub)
    unique = sorted({p.absolute(): None for p in found})
    if not unique:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise VolumeError(f"no volumes found in {where}: expected .nii/.nii.gz/.nrrd/.mha/.mhd "
                          "files or DICOM series folders")
    return unique


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------
def _sitk_message(exc: Exception) -> str:
    """The informative first line of a SimpleITK exception (without file/line prefixes)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")] or lines
    if not lines:
        return type(exc).__name__
    msg = re.sub(r"^(sitk|itk)::ERROR:\s*", "", lines[0])
    msg = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", msg)
    return msg


def _dicom_series_files(path: Path) -> Optional[Tuple[Path, List[str]]]:
    """(folder, file names) for a DICOM series path (folder or ``folder/<SeriesInstanceUID>``)."""
    if path.is_dir():
        ids = _dicom_series_ids(path)
        if not ids:
            return None
        if len(ids) > 1:
            raise VolumeError(f"folder {path} holds {len(ids)} DICOM series ({', '.join(ids[:4])}"
                              f"{', ...' if len(ids) > 4 else ''}); pass one as {path}/<SeriesInstanceUID> "
                              "(find_volumes lists them) or put each series in its own folder.")
        return path, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0]))
    if not path.exists() and path.parent.is_dir() and path.name in _dicom_series_ids(path.parent):
        return path.parent, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), path.name))
    return None


def _replace_non_finite(image: sitk.Image, name: str, bad_flat: Optional[np.ndarray] = None) -> sitk.Image:
    """``image`` with NaN/Inf voxels (and the voxels at C-order ``bad_flat`` indices of its
    (z, y, x) array: those a reader already turned into numbers, see :mod:`gvsl.verify`)
    replaced by the finite minimum, with a warning; an image with no finite voxel is an error."""
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind != "f" and (bad_flat is None or not len(bad_flat)):
        return image
    finite = np.isfinite(array) if array.dtype.kind == "f" else np.ones(array.shape, bool)
    if bad_flat is not None and len(bad_flat):
        finite = finite.copy()
        finite.reshape(-1)[bad_flat] = False
    n_bad = int(finite.size - np.count_nonzero(finite))
    if n_bad == 0:
        return image
    if n_bad == finite.size:
        raise VolumeError(f"{name}: every voxel is NaN or infinite; the file holds no image data. "
                          "Export the volume again.")
    fill = float(array[finite].min())
    fixed = np.where(finite, array, fill).astype(array.dtype)
    out = sitk.GetImageFromArray(fixed)
    out.CopyInformation(image)
    errors.warn(f"{name}: replaced {n_bad} NaN/Inf voxel(s) by the image's finite minimum {fill:g}",
                VolumeWarning, stacklevel=3)
    return out


def validate_volume(image: sitk.Image, name: str = "volume", bad_flat: Optional[np.ndarray] = None) -> sitk.Image:
    """Check that ``image`` is a 3D scalar volume of at least 4 voxels per axis; repair NaN/Inf
    (and the voxels at ``bad_flat``, see :func:`_replace_non_finite`).

    Returns ``image`` itself, or a repaired copy (never modifies ``image``).
    """
    size = tuple(image.GetSize())
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise VolumeError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            f"(vector/RGB/complex image of size {size}); a scalar 3D volume is needed: pick one "
            "channel/time point, e.g. with ExtractImageFilter or VectorIndexSelectionCast, before using it.")
    dim = image.GetDimension()
    if dim == 2:
        raise VolumeError(f"{name} is a 2D image of size {size[0]} x {size[1]}; a 3D volume is needed "
                          "(stack the slices into one volume, e.g. load the whole DICOM series).")
    if dim == 4:
        raise VolumeError(f"{name} is a 4D image of size {' x '.join(map(str, size))} (e.g. a time "
                          "series); pick one channel/time point, e.g. with ExtractImageFilter, before using it.")
    if dim != 3:
        raise VolumeError(f"{name} has {dim} dimensions; a 3D volume is needed.")
    if min(size) < MIN_SIZE_VOXELS:
        raise VolumeError(f"{name} has size {' x '.join(map(str, size))} voxels; each axis needs at "
                          f"least {MIN_SIZE_VOXELS} voxels (a single slice or a thin stack is not a 3D volume).")
    if bad_flat is not None and len(bad_flat) and int(np.max(bad_flat)) >= image.GetNumberOfPixels():
        bad_flat = None  # the file's voxel count differs from the image's: nothing to map
    return _replace_non_finite(image, name, bad_flat)


def read_volume(path: PathLike) -> sitk.Image:
    """Read an image file or a DICOM series (folder or ``folder/<SeriesInstanceUID>``).

    Returns a 3D scalar ``sitk.Image`` with its geometry (origin, spacing, direction; LPS mm)
    and pixel type as stored (NaN/Inf replaced, see the module docstring).
    Raises :class:`VolumeError` for missing/unreadable files, 2D, 4D, vector/RGB and tiny images.
    """
    path = Path(path)
    name = path.name or str(path)
    series = _dicom_series_files(path)
    if series is not None:
        folder, files = series
        if not files:
            raise VolumeError(f"DICOM series {path} has no readable files.")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        shown = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's raw "non uniform sampling" line
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise VolumeError(f"could not read DICOM series in {folder}: {_sitk_message(exc)}") from None
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(shown)
        _check_dicom_spacing(reader, image, files, path)
        return validate_volume(image, f"DICOM series {path}")
    if path.is_dir():
        raise VolumeError(f"folder {path} holds no DICOM series; pass image files "
                          f"({'/'.join(IMAGE_EXTENSIONS)}) or a DICOM series folder.")
    if not path.exists():
        raise VolumeError(f"{path} does not exist.")
    bad_flat = None
    if verify.is_nifti(path):
        try:
            _, bad_flat = verify.check_nifti(path)
        except verify.InputCheckError as exc:
            raise VolumeError(f"{path} is truncated or corrupt: {exc}. SimpleITK would read it with the missing "
                              "voxels set to 0, so it is not used; copy or export the file again "
                              "(for a .nii.gz, 'gzip -t' checks it).") from None
        except OSError as exc:
            raise VolumeError(f"could not read {path}: {exc.strerror or exc}") from None
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise VolumeError(f"could not read {name}: {_sitk_message(exc)} (the file is corrupt, truncated "
                          "or not an image of its extension's format)") from None
    return validate_volume(image, name, bad_flat)


def _check_dicom_spacing(reader: sitk.ImageSeriesReader, image: sitk.Image, files: List[str], path: Path) -> None:
    """Refuse a series whose slices are not evenly spaced (see :mod:`gvsl.verify`)."""
    positions = []
    for i in range(len(files)):
        try:
            text = reader.GetMetaData(i, "0020|0032")
        except RuntimeError:
            return  # no ImagePositionPatient: nothing to check against
        try:
            positions.append([float(v) for v in text.strip().split("\\")])
        except ValueError:
            return
    if image.GetDimension() != 3 or any(len(p) != 3 for p in positions):
        return
    normal = np.asarray(image.GetDirection(), float).reshape(3, 3)[:, 2]
    problem = verify.dicom_slice_gaps(positions, normal)
    if problem:
        raise VolumeError(f"DICOM series {path}: {problem}. Read as one volume it would be stretched "
                          f"(spacing {image.GetSpacing()[2]:.4g} mm for every slice), so it is not used. Add the "
                          "missing slice files, or load the series in 3D Slicer (it regularises the acquisition "
                          "geometry) and save it as one .nrrd/.nii.gz volume.")


def write_image_atomic(image: sitk.Image, path: PathLike, compress: bool = True) -> Path:
    """Write ``image`` with SimpleITK to ``path`` via a verified temporary file and a rename
    (:func:`gvsl.fsio.write_image`: a truncated write is an error, the old file stays).

    The format follows ``path``'s extension (e.g. ``.nii.gz``, ``.nrrd``, ``.mha``); formats
    that write a second data file (``.mhd``, ``.nhdr``) are refused, a rename cannot move both.
    """
    if str(path).lower().endswith((".mhd", ".nhdr")):
        raise VolumeError(f"{path}: write .mha or .nrrd instead of a header + data file pair")
    from gvsl.fsio import write_image  # the one atomic, verified writer

    return write_image(image, path, compress)


# ---------------------------------------------------------------------------------------
# Preprocessing lives in gvsl.preprocessing (the one contract); this is its file-level shortcut
# ---------------------------------------------------------------------------------------
def preprocess(image: sitk.Image, preset: str, spacing_mm: float = 1.0, name: str = "volume") -> sitk.Image:
    """``gvsl.preprocessing.preprocess(image, PreprocessSpec(preset, spacing_mm))`` as an image
    (float32 in [0, 1] on the network grid); its warnings are issued as :class:`VolumeWarning`."""
    from gvsl.preprocessing import PreprocessSpec
    from gvsl.preprocessing import preprocess as _preprocess
    prepared = _preprocess(image, PreprocessSpec(preset=preset, spacing_mm=spacing_mm), name=name)
    for note in prepared.warnings:
        warnings.warn(note, VolumeWarning, stacklevel=2)
    return prepared.image()


# ---------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------
def _file_signature(path: Path) -> Tuple[str, int, int]:
    """(resolved path, mtime_ns, size in bytes); for DICOM series the folder's files combined."""
    series_folder = None
    if path.is_dir():
        series_folder = path
    elif not path.exists() and path.parent.is_dir():
        series_folder = path.parent
    if series_folder is not None:
        mtime, size = 0, 0
        for entry in os.scandir(series_folder):
            if entry.is_file():
                st = entry.stat()
                mtime, size = max(mtime, st.st_mtime_ns), size + st.st_size
        return str(series_folder.resolve() / (path.name if path != series_folder else "")), mtime, size
    if not path.exists():
        raise VolumeError(f"{path} does not exist.")
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


class VolumeCache:
    """Preprocessed volumes by path: in memory, and on disk under ``cache_dir`` when given.

    ``get(path)`` returns the float32 (z, y, x) array of
    ``gvsl.preprocessing.preprocess(read_volume(path), spec)`` (``spec``: a
    :class:`gvsl.preprocessing.PreprocessSpec`, or a preset name with ``spacing_mm``). The key
    hashes (resolved path, mtime, size, the whole spec, CACHE_VERSION), so an edited file or
    another spec is preprocessed again. Disk entries are
    ``<cache_dir>/<key>.npy`` written atomically; an unreadable entry is rebuilt.
    Returned arrays are shared with the cache: do not modify them in place (copy or crop first).
    """

    def __init__(self, cache_dir: Optional[PathLike], spec, spacing_mm: float = 1.0):
        from gvsl.preprocessing import PreprocessSpec
        if not isinstance(spec, PreprocessSpec):
            spec = PreprocessSpec(preset=spec, spacing_mm=spacing_mm)
        self.spec = spec
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: Dict[str, np.ndarray] = {}

    @property
    def preset(self) -> str:
        return self.spec.preset

    @property
    def spacing_mm(self) -> float:
        return self.spec.spacing_mm

    def key(self, path: PathLike) -> str:
        resolved, mtime, size = _file_signature(Path(path))
        blob = json.dumps([resolved, mtime, size, self.spec.to_dict(), CACHE_VERSION], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get(self, path: PathLike) -> np.ndarray:
        key = self.key(path)
        array = self._memory.get(key)
        if array is not None:
            return array
        disk = self.cache_dir / f"{key}.npy" if self.cache_dir is not None else None
        if disk is not None and disk.is_file():
            try:
                array = np.load(disk, allow_pickle=False)
                if array.dtype != np.float32 or array.ndim != 3:
                    raise ValueError(f"unexpected {array.dtype} array of shape {array.shape}")
            except (OSError, ValueError) as exc:
                warnings.warn(f"cache entry {disk} for {path} is unreadable ({exc}); rebuilding it",
                              VolumeWarning, stacklevel=2)
                array = None
        if array is None:
            from gvsl.preprocessing import preprocess as _preprocess
            prepared = _preprocess(read_volume(path), self.spec, name=Path(path).name)
            for note in prepared.warnings:
                warnings.warn(note, VolumeWarning, stacklevel=2)
            array = prepared.array_zyx
            if disk is not None:
                from gvsl.fsio import atomic_write

                def write(tmp: str, a=array) -> None:
                    with open(tmp, "wb") as f:
                        np.save(f, a)
                atomic_write(disk, write)
        self._memory[key] = array
        return array

    def __len__(self) -> int:
        return len(self._memory)

    def clear_memory(self) -> None:
        self._memory.clear()


def load_volumes(paths: Sequence[PathLike], preset, spacing_mm: float = 1.0,
                 cache_dir: Optional[PathLike] = None, progress=None) -> Tuple[List[np.ndarray], List[Path]]:
    """Find (:func:`find_volumes`) and load every volume preprocessed, through a :class:`VolumeCache`.

    ``preset``: a :class:`gvsl.preprocessing.PreprocessSpec`, or a preset name with ``spacing_mm``.
    Returns (arrays float32 (z, y, x) in [0, 1] on each volume's network grid, their paths).
    ``progress``: a :class:`gvsl.progress.Progress` (its ``total`` is set to the number of
    volumes; ``update(i, volume=name)`` after each) or None.
    Raises :class:`VolumeError` when fewer than two volumes are found (pairs of different scans
    are needed) or when one cannot be read.
    """
    files = find_volumes(paths)
    if len(files) < 2:
        raise VolumeError(f"need at least two volumes to make pairs of different scans; found "
                          f"{len(files)}: {', '.join(str(f) for f in files)}. Add more scans.")
    cache = VolumeCache(cache_dir, preset, spacing_mm)  # checks the preset/spec first
    if progress is not None:
        progress.total = len(files)
    arrays = []
    for i, f in enumerate(files, start=1):
        arrays.append(cache.get(f))
        if progress is not None:
            progress.update(i, volume=f.name)
    return arrays, files
