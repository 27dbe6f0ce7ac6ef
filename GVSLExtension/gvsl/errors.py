"""Errors and warnings of gvsl: one base class for what a user can fix, one warning channel.

* :class:`GVSLError` is the base of every error a user can fix (a bad file, a bad option, a
  folder in the way). The ``gvsl`` command prints it as one ``error:`` line and exits with
  ``exit_code`` (2); every module's error class derives from it, so the command catches the
  base class, never a list of names.
* :class:`EnvironmentFault` (a :class:`GVSLError` with exit code 1) is a fault of the machine
  rather than of the input: disk full, no permission, read-only file system.
  :func:`environment_fault` turns such an ``OSError`` into one.
* :func:`warn` is the one warning channel. Inside :func:`warnings_to` (the command installs
  it for the whole run) a warning goes to the given sink: the progress stream, which prints
  ``{"event": "warning", ...}`` or a ``warning:`` line. Without a sink (library use) it is a
  Python warning of ``category``, so callers can filter or record it as usual.

Imports nothing heavy (no torch, no SimpleITK).
"""
from __future__ import annotations

import contextlib
import errno
import threading
import warnings
from typing import Callable, Iterator, List, Optional, Type


class GVSLError(Exception):
    """An error the user can fix; its message says what is wrong and what to do."""

    exit_code = 2


class EnvironmentFault(GVSLError):
    """The machine, not the input: disk full, permission denied, read-only file system."""

    exit_code = 1


class DiskFullError(EnvironmentFault):
    """A write ran out of space (or hit a file-size limit); nothing was replaced."""


class UsageError(GVSLError):
    """A bad combination of options (the message names them as typed: ``--spacing``)."""


class GVSLWarning(UserWarning):
    """Base class of gvsl's Python warnings (used only when no sink is active)."""


# errno -> what it means for the user
_FAULTS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or for the process's file-size limit",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.EIO: "input/output error of the storage device",
}
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_environment_fault(exc: BaseException) -> bool:
    """True for an ``OSError`` caused by the machine (see :data:`_FAULTS`)."""
    return isinstance(exc, OSError) and exc.errno in _FAULTS


def environment_fault(exc: OSError, doing: str = "") -> EnvironmentFault:
    """One clear :class:`EnvironmentFault` for ``exc``: what, where, and what to do."""
    what = _FAULTS.get(exc.errno, exc.strerror or type(exc).__name__)
    where = exc.filename or ""
    fix = {errno.ENOSPC: "free some space or choose another --out",
           errno.EDQUOT: "free some space or choose another --out",
           errno.EFBIG: "choose a file system without that limit",
           errno.EACCES: "choose a folder you can write to, or fix its permissions",
           errno.EPERM: "choose a folder you can write to, or fix its permissions",
           errno.EROFS: "choose a writable folder"}.get(exc.errno, "check the storage and try again")
    doing = f" while {doing}" if doing else ""
    where = f" ({where})" if where else ""
    cls = DiskFullError if exc.errno in DISK_FULL_ERRNOS else EnvironmentFault
    return cls(f"{what}{doing}{where}: {fix}")


# ---------------------------------------------------------------------------------------
# the warning channel
# ---------------------------------------------------------------------------------------
_local = threading.local()


def _sinks() -> List[Callable[[str], None]]:
    if not hasattr(_local, "sinks"):
        _local.sinks = []
    return _local.sinks


def warn(message: str, category: Type[Warning] = GVSLWarning, stacklevel: int = 2) -> None:
    """Report ``message`` through the active sink (innermost :func:`warnings_to`), else as a
    Python warning of ``category``. Messages name the file or option they are about."""
    sinks = _sinks()
    if sinks:
        sinks[-1](str(message))
    else:
        warnings.warn(str(message), category, stacklevel=stacklevel + 1)


@contextlib.contextmanager
def warnings_to(sink: Callable[[str], None], python_warnings: bool = True) -> Iterator[None]:
    """Route :func:`warn` (and, with ``python_warnings``, every Python warning raised inside,
    as its message only, without source lines) to ``sink(message)`` in this thread."""
    sinks = _sinks()
    sinks.append(sink)
    try:
        if python_warnings:
            with warnings.catch_warnings():
                warnings.simplefilter("default")

                def show(message, category, filename, lineno, file=None, line=None):
                    sink(str(message))
                warnings.showwarning = show
                yield
        else:
            yield
    finally:
        sinks.pop()


class WarningRecorder:
    """A sink that keeps the messages and passes them on to ``forward`` (e.g. the command's
    stream), so a command can also put them in its result (``metrics["warnings"]``)."""

    def __init__(self, forward: Optional[Callable[[str], None]] = None):
        self.messages: List[str] = []
        self.forward = forward

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        if self.forward is not None:
            self.forward(message)


def current_sink() -> Optional[Callable[[str], None]]:
    """The innermost active sink, or None."""
    sinks = _sinks()
    return sinks[-1] if sinks else None

