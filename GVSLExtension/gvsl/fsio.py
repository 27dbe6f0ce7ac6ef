"""Atomic, verified file writing: a file appears complete or not at all.

:func:`atomic_write` calls ``write(tmp)`` on a temp file in the destination's folder, flushes
it to disk, **verifies** it, then renames it over the destination (atomic on one file system).
If anything fails the temp file is removed and the destination keeps its previous content.
Verification exists because some writers do not report a failed write: SimpleITK renames
nothing itself but returns normally after a gzip write that ran out of space, leaving a
truncated ``.nii.gz`` (or a 0-byte file). Checks made on every file:

* size > 0;
* by extension: ``.gz`` the whole gzip stream decompresses with a correct CRC and length;
  ``.png`` signature and the final IEND chunk; ``.pt``/``.pth`` a readable zip directory
  (``torch.save``'s format); ``.npy`` the header's shape fits the file; ``.json`` parses;
* the caller's ``verify(tmp)`` (images: the header reads back with the right size and the
  voxel payload is all there, :func:`write_image`; transforms read back, :func:`write_transform`).

A failed check, or an ``OSError`` such as ENOSPC/EFBIG, is a :class:`gvsl.errors.DiskFullError`
("disk full: nothing replaced ..."); EACCES/EROFS are :class:`gvsl.errors.EnvironmentFault`.

Temp files are named ``.<name>.gvsl-tmp-<pid>-<random><ext>`` (hidden, with the destination's
extension so format-by-name writers work). A process killed mid-write leaves one behind:
:func:`remove_stale_temps` deletes those whose PID no longer runs; :func:`atomic_write` calls it
for its destination, and :mod:`gvsl.outputs` for the whole output folder at the start of a run.

Imports no torch and no SimpleITK at module level (``gvsl --help`` and ``gvsl phantom`` stay
light); SimpleITK is imported by the two functions that write with it.
"""
from __future__ import annotations

import errno
import gzip
import json
import os
import re
import secrets
import zipfile
import zlib
from pathlib import Path
from typing import Callable, List, Optional, Union

from gvsl.errors import DiskFullError, EnvironmentFault, GVSLError, environment_fault, is_environment_fault

PathLike = Union[str, os.PathLike]
TEMP_TAG = ".gvsl-tmp-"
_TEMP_RE = re.compile(r"^\..+" + re.escape(TEMP_TAG) + r"(\d+)-[0-9a-f]+")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_CHUNK = 1 << 20


class IncompleteFile(Exception):
    """A written (or read) file failed a completeness check; the message says which."""


class WriteFailed(RuntimeError):
    """The writer itself reported a failure (e.g. SimpleITK's RuntimeError); the message says it."""


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def extension(path: PathLike) -> str:
    """The file-type extension of ``path``: ``.nii.gz`` for compressed files, else the last suffix."""
    suffixes = Path(path).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def temp_path(path: PathLike) -> Path:
    """A fresh, recognisable temp path next to ``path`` (see the module docstring)."""
    path = Path(path)
    return path.parent / f".{path.name}{TEMP_TAG}{os.getpid()}-{secrets.token_hex(4)}{extension(path)}"


def remove_stale_temps(folder: PathLike, name: Optional[str] = None) -> List[Path]:
    """Delete gvsl temp files in ``folder`` (of destination ``name`` only, if given) whose
    writing process is gone; returns what was removed. Other files are never touched."""
    folder = Path(folder)
    removed: List[Path] = []
    prefix = f".{name}{TEMP_TAG}" if name else "."
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(prefix) and TEMP_TAG in e.name]
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if not match or pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


# ---------------------------------------------------------------------------------------
# completeness checks
# ---------------------------------------------------------------------------------------
def gzip_stream_size(path: PathLike) -> int:
    """Decompress the whole gzip file ``path`` (in 1 MiB chunks, checking CRC and length) and
    return its uncompressed size; raise :class:`IncompleteFile` if it is truncated or corrupt."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while True:
                block = f.read(_CHUNK)
                if not block:
                    break
                total += len(block)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IncompleteFile(f"the gzip stream is truncated or corrupt ({exc or type(exc).__name__})") from None
    return total


def gzip_recorded_size(path: PathLike) -> int:
    """The uncompressed size (mod 2**32) recorded in the last 4 bytes of a gzip file (ISIZE).
    Cheap, but on a truncated file these bytes are arbitrary: compare with an expected size."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            raise IncompleteFile("the file is too short to be a gzip stream")
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def _check_png(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(max(os.path.getsize(path) - len(_PNG_IEND), 0))
        tail = f.read()
    if head != _PNG_SIGNATURE or tail != _PNG_IEND:
        raise IncompleteFile("the PNG has no signature or no final IEND chunk")


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise IncompleteFile(f"the zip container (torch.save format) is incomplete ({exc})") from None


def _check_npy(path: Path) -> None:
    import numpy as np
    try:
        np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise IncompleteFile(f"the .npy file is incomplete ({exc})") from None


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IncompleteFile(f"the JSON does not parse ({exc})") from None


def check_complete(path: PathLike, kind: Optional[str] = None) -> None:
    """The checks by extension (module docstring) on ``path``; ``kind`` overrides the extension
    (for temp files). Raises :class:`IncompleteFile`."""
    path = Path(path)
    size = os.path.getsize(path)
    if size == 0:
        raise IncompleteFile("the file is empty (0 bytes)")
    name = (kind or path.name).lower()
    if name.endswith(".gz"):
        gzip_stream_size(path)
    elif name.endswith(".png"):
        _check_png(path)
    elif name.endswith((".pt", ".pth")):
        _check_zip(path)
    elif name.endswith(".npy"):
        _check_npy(path)
    elif name.endswith(".json"):
        _check_json(path)


# ---------------------------------------------------------------------------------------
# the writer
# ---------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def out_of_space(tmp: PathLike) -> Optional[str]:
    """Why a write into ``tmp`` may have failed for lack of space, or None: the file system
    has (almost) no free blocks, or ``tmp`` reached the process's file-size limit. Used when
    a writer fails with its own exception (``torch.save`` raises RuntimeError on EFBIG/ENOSPC,
    SimpleITK its RuntimeError) rather than an ``OSError``."""
    tmp = Path(tmp)
    try:
        st = os.statvfs(tmp.parent)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return "no free space left on the file system"
    except (OSError, AttributeError):
        pass
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY and tmp.exists() and os.path.getsize(tmp) >= soft - (1 << 16):
            return f"the file reached the process's file-size limit ({soft} bytes)"
    except (ImportError, OSError, ValueError):
        pass
    return None


def _nothing_replaced(path: Path, existed: bool) -> str:
    return (f"{path.name} keeps its previous content" if existed
            else f"{path.name} was not written")


def atomic_write(path: PathLike, write: Callable[[str], None],
                 verify: Optional[Callable[[str], None]] = None) -> Path:
    """Call ``write(tmp_path)``, flush, verify (module docstring; then ``verify(tmp_path)``,
    which raises :class:`IncompleteFile` or ``OSError``), and rename over ``path``.

    Returns ``path``. Raises :class:`gvsl.errors.DiskFullError` when the disk is full or the
    written file is incomplete, :class:`gvsl.errors.EnvironmentFault` on permission or
    read-only errors; in every failure the temp file is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_environment_fault(exc):
            raise environment_fault(exc, f"creating the folder of {path}") from exc
        raise
    remove_stale_temps(path.parent, path.name)
    existed = path.exists()
    tmp = temp_path(path)
    try:
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
            try:
                write(str(tmp))
            except (OSError, IncompleteFile, GVSLError):
                raise
            except Exception as exc:  # noqa: BLE001 - a writer's own error: was it the disk?
                reason = out_of_space(tmp)
                if reason is None:
                    raise
                detail = str(exc) if isinstance(exc, WriteFailed) else f"{type(exc).__name__} from the writer"
                raise IncompleteFile(f"{detail}; {reason}") from exc
            _fsync(tmp)
            check_complete(tmp, kind=path.name)
            if verify is not None:
                verify(str(tmp))
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise
    except WriteFailed as exc:
        raise EnvironmentFault(
            f"could not write {path}: {exc}; nothing replaced ({_nothing_replaced(path, existed)}). "
            "Check that the folder is writable and the disk is not full.") from None
    except IncompleteFile as exc:
        raise DiskFullError(
            f"disk full: nothing replaced: writing {path} gave an incomplete file ({exc}), so it was "
            f"discarded and {_nothing_replaced(path, existed)}. The disk (or a file-size limit) is "
            "probably full: free some space or choose another --out, then run again.") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFullError(
                f"disk full: nothing replaced: writing {path} failed ({os.strerror(exc.errno)}) and "
                f"{_nothing_replaced(path, existed)}. Free some space or choose another --out, "
                "then run again.") from None
        if is_environment_fault(exc):
            raise environment_fault(exc, f"writing {path}") from None
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; verified by its byte length."""
    data = text.encode("utf-8")

    def verify(tmp: str) -> None:
        if os.path.getsize(tmp) != len(data):
            raise IncompleteFile(f"{os.path.getsize(tmp)} of {len(data)} bytes were written")
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), verify)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; verified by its length."""
    def verify(tmp: str) -> None:
        if os.path.getsize(tmp) != len(data):
            raise IncompleteFile(f"{os.path.getsize(tmp)} of {len(data)} bytes were written")
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), verify)


# ---------------------------------------------------------------------------------------
# SimpleITK outputs
# ---------------------------------------------------------------------------------------
def _verify_image(tmp: str, image, compressed: bool) -> None:
    """The header of ``tmp`` reads back with ``image``'s size, pixel type and components, and
    the voxel payload is all there (``.nii.gz``: the decompressed stream; uncompressed formats:
    the file size; other compressed formats: a full read-back)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(tmp)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise IncompleteFile(f"SimpleITK cannot read the header back ({str(exc).splitlines()[0]})") from None
    if (tuple(reader.GetSize()) != tuple(image.GetSize())
            or reader.GetNumberOfComponents() != image.GetNumberOfComponentsPerPixel()):
        raise IncompleteFile(f"the header read back says size {reader.GetSize()} with "
                             f"{reader.GetNumberOfComponents()} component(s), expected {image.GetSize()}")
    payload = sitk.GetArrayViewFromImage(image).nbytes
    name = tmp.lower()
    if name.endswith(".gz"):
        size = gzip_stream_size(tmp)  # check_complete did it already for .gz; cheap relative to the write
        if size < payload:
            raise IncompleteFile(f"the stream holds {size} bytes, less than the {payload} bytes of voxels")
    elif not compressed or name.endswith((".nii", ".hdr", ".img")):
        if os.path.getsize(tmp) < payload:
            raise IncompleteFile(f"{os.path.getsize(tmp)} bytes on disk, less than the {payload} bytes of voxels")
    else:
        try:
            back = sitk.ReadImage(tmp)
        except RuntimeError as exc:
            raise IncompleteFile(f"SimpleITK cannot read the file back ({str(exc).splitlines()[0]})") from None
        if tuple(back.GetSize()) != tuple(image.GetSize()):
            raise IncompleteFile("the file read back has another size")


def _sitk_message(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def write_image(image, path: PathLike, compress: bool = True) -> Path:
    """Write a SimpleITK image to ``path`` atomically and verified (format from the extension).

    ``.mhd``/``.nhdr`` (a header plus a second data file) are refused: one rename cannot move
    both. Raises :class:`gvsl.errors.GVSLError` subclasses (see :func:`atomic_write`).
    """
    import SimpleITK as sitk

    if str(path).lower().endswith((".mhd", ".nhdr")):
        raise GVSLError(f"{path}: write .mha or .nrrd instead of a header + data file pair")
    gz = str(path).lower().endswith(".gz")

    def write(tmp: str) -> None:
        try:
            sitk.WriteImage(image, tmp, compress)
        except RuntimeError as exc:
            raise WriteFailed(_sitk_message(exc)) from None
    return atomic_write(path, write, lambda tmp: _verify_image(tmp, image, compress or gz))


def write_transform(transform, path: PathLike) -> Path:
    """Write a SimpleITK transform (.tfm, .txt, .h5) atomically; verified by reading it back."""
    import SimpleITK as sitk

    def write(tmp: str) -> None:
        try:
            sitk.WriteTransform(transform, tmp)
        except RuntimeError as exc:
            raise WriteFailed(_sitk_message(exc)) from None

    def verify(tmp: str) -> None:
        try:
            sitk.ReadTransform(tmp)
        except RuntimeError as exc:
            raise IncompleteFile(f"the transform does not read back ({str(exc).splitlines()[0]})") from None
    return atomic_write(path, write, verify)
