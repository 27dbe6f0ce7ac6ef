"""Output folders that protect results and inputs: checked before any computation.

:class:`RunFolder` is the ``--out`` of one command run (``gvsl register``, ``gvsl pretrain``)::

    with RunFolder(out, "register", inputs={"--moving": path, ...}, overwrite=False) as folder:
        ...compute...
        files = write_outputs(result, folder.staging())   # every file written and verified
        files = folder.commit(files)                        # then moved into --out

:meth:`RunFolder.prepare` (``__enter__``), before anything is computed:

* ``--out`` is a folder (an existing file is refused), created if missing, and writable (a
  probe file is written and removed: permission and read-only errors surface now, not after
  minutes of computing);
* no input lies in ``--out`` (or below it): ``register --out`` = the moving image's folder would
  overwrite or mix with the input;
* results of an earlier run are recognised by their file names (:data:`RESULTS`, kept in step
  with the writers by a test). Another command's results are always refused. Results of the same
  command are refused unless ``--overwrite`` (``pretrain``: or ``--resume``, which continues
  them). With ``--overwrite``, ``register`` writes every new file into a hidden staging folder
  and moves them in only once all are written and verified, then removes the earlier run's
  leftovers (e.g. an ``overview.png`` that ``--no-overview`` would not replace); ``pretrain``
  moves the earlier run's files into a hidden ``.gvsl-replaced-<pid>`` folder first, removes it
  when the new run ends, and puts them back if the new run fails (the failed run's own files
  then go to ``failed-run-<time>-<pid>/``, where ``--resume`` can continue it);
* ``lock=True`` (pre-training) holds ``.gvsl.lock`` for the whole run: a second process gets an
  error naming the first one's PID. The lock is an ``flock`` on that file, released by the
  kernel when its holder dies, so the lock of a killed run is simply taken over;
* gvsl temp files and staging folders left by killed processes are removed
  (:func:`gvsl.fsio.remove_stale_temps`).

Imports no torch.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

from gvsl.errors import GVSLError, UsageError, environment_fault, is_environment_fault, warn
from gvsl.fsio import pid_alive, remove_stale_temps

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_EXCL lock file with a PID check instead
    fcntl = None

PathLike = Union[str, os.PathLike]

REGISTER_OUTPUTS = ("warped.nii.gz", "warped_affine.nii.gz", "affine.tfm", "deformable.nii.gz",
                    "displacement.nii.gz", "composite.h5", "jacobian.nii.gz", "warped_labels.nii.gz",
                    "metrics.json", "overview.png",
                    # with --refine: the network's own prediction beside the refined result
                    "warped_network.nii.gz", "deformable_network.nii.gz", "composite_network.h5",
                    "warped_labels_network.nii.gz")


def training_results(prefix: str) -> tuple:
    """The files a training run of :mod:`gvsl.trainer` writes, ``P = prefix`` (``gvsl`` for
    pre-training): ``P_final.pt``, ``P_last.pt``, ``P_best.pt``, history, curves, config."""
    return (f"{prefix}_final.pt", f"{prefix}_last.pt", f"{prefix}_best.pt", "history.json", "loss_curve.png",
            "validation_curve.png", "config.json")


PRETRAIN_OUTPUTS = training_results("gvsl")
RESULTS: Dict[str, tuple] = {"register": REGISTER_OUTPUTS, "pretrain": PRETRAIN_OUTPUTS}
LOCK_NAME = ".gvsl.lock"
STAGING_PREFIX = ".gvsl-staging-"
REPLACED_PREFIX = ".gvsl-replaced-"


class OutputFolderError(GVSLError):
    """``--out`` cannot be used as asked; the message says why and what to pass instead."""


class FolderLockedError(OutputFolderError):
    """Another running gvsl process holds the folder's lock."""


# ---------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------
def check_writable(out: PathLike) -> Path:
    """Create ``out`` if needed and prove it writable; raise a clear error otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file, not a folder; pass a folder (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputFolderError(f"--out {out}: a part of the path is a file, not a folder; pass another --out.") from None
    except OSError as exc:
        if is_environment_fault(exc):
            raise environment_fault(exc, f"creating --out {out}") from None
        raise
    probe = out / f".gvsl-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(probe, "wb") as f:
            f.write(b"gvsl")
    except OSError as exc:
        if is_environment_fault(exc):
            raise environment_fault(exc, f"writing into --out {out}") from None
        raise
    finally:
        if os.path.lexists(probe):
            os.unlink(probe)
    return out


def _input_location(path: PathLike) -> Path:
    """The real location of an input: a DICOM ``<folder>/<SeriesInstanceUID>`` is its folder."""
    p = Path(path)
    if not p.exists() and p.parent.is_dir():
        p = p.parent
    return p.resolve()


def check_not_inputs(out: PathLike, inputs: Mapping[str, object]) -> None:
    """Refuse an ``out`` that holds an input (``inputs``: option as typed -> path or paths)."""
    out_r = Path(out).resolve()
    for option, value in inputs.items():
        if value is None:
            continue
        for path in (value if isinstance(value, (list, tuple)) else [value]):
            loc = _input_location(path)
            if loc == out_r or out_r in loc.parents:
                raise OutputFolderError(
                    f"--out {out} holds the input {option} {path}: the outputs could overwrite or mix with it. "
                    f"Choose another --out (e.g. {out_r / 'gvsl-output'} if you want it nearby).")


def existing_results(out: PathLike) -> Dict[str, List[str]]:
    """command -> names of its result files present in ``out``."""
    out = Path(out)
    found = {}
    for command, names in RESULTS.items():
        present = [n for n in names if (out / n).exists()]
        if present:
            found[command] = present
    return found


def _owners(name: str) -> List[str]:
    """The commands whose results include the file ``name``."""
    return [c for c, names in RESULTS.items() if name in names]


def _listing(names: List[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def remove_stale_work(out: PathLike) -> List[Path]:
    """Remove gvsl temp files and staging folders of processes that no longer run."""
    out = Path(out)
    removed = remove_stale_temps(out)
    for entry in out.glob(STAGING_PREFIX + "*"):
        pid = _pid_of(entry.name, STAGING_PREFIX)
        if pid is not None and not pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _pid_of(name: str, prefix: str) -> Optional[int]:
    try:
        return int(name[len(prefix):].split("-")[0])
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------
# the lock
# ---------------------------------------------------------------------------------------
class FolderLock:
    """An exclusive lock on ``<folder>/.gvsl.lock`` naming its holder (see the module docstring)."""

    def __init__(self, folder: PathLike, command: str):
        self.path = Path(folder) / LOCK_NAME
        self.command = command
        self._fd: Optional[int] = None
        self.took_over: Optional[dict] = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict) -> None:
        pid = holder.get("pid", "?")
        what = holder.get("command", "gvsl")
        since = holder.get("started", "")
        host = holder.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        raise FolderLockedError(
            f"another gvsl {what} (PID {pid}{where}{', started ' + since if since else ''}) is writing into "
            f"{self.path.parent}: wait for it to finish, stop it (kill {pid}), or choose another --out.")

    def acquire(self) -> "FolderLock":
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if fcntl is None:  # pragma: no cover
            return self._acquire_exclusive(info)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                self._refuse(holder)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock
                os.close(fd)
                continue
            previous = self._holder()
            if previous.get("pid") and previous.get("pid") != os.getpid():
                self.took_over = previous
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise OutputFolderError(f"could not lock {self.path}: it keeps changing; is another gvsl starting there?")

    def _acquire_exclusive(self, info: dict) -> "FolderLock":  # pragma: no cover - no fcntl
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self._holder()
                if pid_alive(int(holder.get("pid", 0) or 0)):
                    self._refuse(holder)
                self.took_over = holder
                os.unlink(self.path)
                continue
            os.write(fd, json.dumps(info).encode())
            self._fd = fd
            return self
        raise OutputFolderError(f"could not lock {self.path}")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


# ---------------------------------------------------------------------------------------
# one run's folder
# ---------------------------------------------------------------------------------------
class RunFolder:
    """The ``--out`` of one run of ``command`` (see the module docstring).

    inputs: option as the user typed it -> path (or list of paths), e.g. ``{"--moving": p}``.
    overwrite / resume: the command's ``--overwrite`` / ``--resume``; lock: hold ``.gvsl.lock``.
    results: the file names a new command writes (``register``/``pretrain`` are known).
    """

    def __init__(self, out: PathLike, command: str, inputs: Optional[Mapping[str, object]] = None,
                 overwrite: bool = False, resume: bool = False, lock: bool = False,
                 results: Optional[tuple] = None):
        if results is not None:  # a new command declares its result files (kept for later runs)
            RESULTS[command] = tuple(results)
        if command not in RESULTS:
            raise ValueError(f"unknown command {command!r}: pass results=(its file names)")
        if overwrite and resume:
            raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them.")
        self.out = Path(out)
        self.command = command
        self.inputs = dict(inputs or {})
        self.overwrite = overwrite
        self.resume = resume
        self._lock = FolderLock(self.out, command) if lock else None
        self._staging: Optional[Path] = None
        self._replaced: Optional[Path] = None
        self.replaced_names: List[str] = []

    # -- before the computation --------------------------------------------------------------
    def prepare(self) -> "RunFolder":
        check_not_inputs(self.out, self.inputs)
        check_writable(self.out)
        if self._lock is not None:
            self._lock.acquire()
            if self._lock.took_over:
                warn(f"took over the lock of {self.out} from PID {self._lock.took_over.get('pid')}, "
                     "which is no longer running")
        try:
            remove_stale_work(self.out)
            self._restore_stale_replaced()
            self._check_earlier_results()
        except BaseException:
            self.close(ok=False)
            raise
        return self

    def _check_earlier_results(self) -> None:
        found = existing_results(self.out)
        for command, names in found.items():
            names = [n for n in names if _owners(n) == [command]]  # shared names (history.json) say nothing
            if command != self.command and names:
                raise OutputFolderError(
                    f"--out {self.out} holds the results of a 'gvsl {command}' run ({_listing(names)}); "
                    f"'gvsl {self.command}' does not write there (it would mix or remove them). Choose another --out.")
        mine = found.get(self.command, [])
        if not mine or self.resume:
            return
        if not self.overwrite:
            raise OutputFolderError(self._earlier_run_message(mine))
        if self.command == "pretrain":
            self._move_aside(mine)

    def _earlier_run_message(self, names: List[str]) -> str:
        listing = _listing(names)
        if self.command == "register":
            return (f"--out {self.out} already holds the results of an earlier registration ({listing}). "
                    "Pass --overwrite to replace them (the earlier files stay until every new one is written "
                    "and verified), or choose another --out.")
        kind = "pre-training" if self.command == "pretrain" else f"'gvsl {self.command}'"
        if any(n.endswith("_final.pt") for n in names):
            state = f"a finished {kind} run"
            how = "continue training it with --resume (and a larger --steps)"
        elif any(n.endswith("_last.pt") for n in names):
            state = f"an unfinished {kind} run"
            how = "continue it with --resume"
        else:
            state = f"files of an earlier {kind} run"
            how = "remove them"
        return (f"--out {self.out} holds {state} ({listing}): {how}, replace it with --overwrite, "
                "or choose another --out.")

    def _move_aside(self, names: List[str]) -> None:
        self._replaced = self.out / f"{REPLACED_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self._replaced.mkdir()
        for name in names:
            os.replace(self.out / name, self._replaced / name)
        self.replaced_names = list(names)

    def _restore_stale_replaced(self) -> None:
        """A killed ``--overwrite`` run left ``.gvsl-replaced-<pid>``: put the earlier run back if
        the killed one wrote nothing yet, else drop it (the replacement had been asked for)."""
        for entry in sorted(self.out.glob(REPLACED_PREFIX + "*")):
            pid = _pid_of(entry.name, REPLACED_PREFIX)
            if pid is None or pid_alive(pid):
                continue
            if not existing_results(self.out).get(self.command):
                for f in entry.iterdir():
                    os.replace(f, self.out / f.name)
                warn(f"restored the earlier run's files in {self.out}: the --overwrite run that replaced them "
                     f"(PID {pid}) was killed before it wrote anything")
            shutil.rmtree(entry, ignore_errors=True)

    # -- writing ---------------------------------------------------------------------------
    def staging(self) -> Path:
        """A fresh hidden folder inside ``out`` to write this run's files into (see :meth:`commit`)."""
        if self._staging is None:
            self._staging = self.out / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
            try:
                self._staging.mkdir()
            except OSError as exc:
                if is_environment_fault(exc):
                    raise environment_fault(exc, f"writing into --out {self.out}") from None
                raise
        return self._staging

    def commit(self, files: Mapping[str, PathLike]) -> Dict[str, Path]:
        """Move the staged ``files`` (name -> path in :meth:`staging`; every one written and
        verified) into ``out``, then remove the earlier run's leftovers -> name -> final path."""
        staging = self._staging
        final: Dict[str, Path] = {}
        for key, path in files.items():
            path = Path(path)
            target = self.out / path.name
            if staging is not None and path.parent.resolve() == staging.resolve():
                os.replace(path, target)
            final[key] = target if staging is not None and path.parent.resolve() == staging.resolve() else path
        written = {p.name for p in final.values()}
        for name in RESULTS[self.command]:
            if name not in written and (self.out / name).exists():
                os.unlink(self.out / name)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            self._staging = None
        return final

    # -- the end -------------------------------------------------------------------------
    def close(self, ok: bool) -> None:
        """End the run: drop the staging folder; pre-training's replaced earlier run is removed
        (``ok``) or put back (failure, the failed run's files moved aside); release the lock."""
        try:
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None
            if self._replaced is not None:
                if ok:
                    shutil.rmtree(self._replaced, ignore_errors=True)
                else:
                    self._keep_failed_run()
                    for f in self._replaced.iterdir():
                        os.replace(f, self.out / f.name)
                    self._replaced.rmdir()
                self._replaced = None
        finally:
            if self._lock is not None:
                self._lock.release()

    def _keep_failed_run(self) -> None:
        """Move the files a failed ``--overwrite`` run wrote into ``failed-run-<time>/`` (it
        may be resumable there with ``--out`` that folder and ``--resume``)."""
        names = [n for n in RESULTS[self.command] if (self.out / n).exists()]
        if not names:
            return
        keep = self.out / f"failed-run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        keep.mkdir()
        for name in names:
            os.replace(self.out / name, keep / name)
        warn(f"the run failed, so the earlier run in {self.out} was put back; the failed run's files "
             f"({_listing(names)}) are in {keep}")

    def __enter__(self) -> "RunFolder":
        return self.prepare()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


def training_folder(config, command: str = "pretrain", results: Optional[tuple] = None):
    """The guard of a training run (a context manager, :func:`gvsl.trainer.run_task` uses it;
    ``results``: the task's files, :func:`training_results`): on rank 0 (``$RANK``, default 0) a
    prepared, locked :class:`RunFolder` for ``config.out`` (inputs ``config.images`` as
    ``--images`` and ``config.init`` as ``--init``; ``config.overwrite`` / ``config.resume``),
    closed when the run ends (a failure puts an earlier run back); other ranks: nothing."""
    import contextlib
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return RunFolder(config.out, command, {"--images": list(getattr(config, "images", None) or []),
                                           "--init": getattr(config, "init", None)},
                     overwrite=bool(getattr(config, "overwrite", False)), resume=bool(getattr(config, "resume", False)),
                     lock=True, results=results)
