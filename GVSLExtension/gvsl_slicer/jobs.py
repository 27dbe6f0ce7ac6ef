"""Background ``gvsl`` jobs: a child process of Slicer's Python, read without blocking, cancellable.

A :class:`Job` runs ``<python> -m gvsl <command> ... --progress json --cancel-file <file>`` (in
Slicer ``<python>`` is ``PythonSlicer``; elsewhere ``sys.executable``) with the folder holding the
``gvsl`` package on ``PYTHONPATH``. Two reader threads put the child's stdout (JSON progress
records, one per line) and stderr (log text) into a queue; :meth:`Job.poll` drains it without
ever blocking, so a widget calls it from a ``QTimer`` (see :mod:`gvsl_slicer.qtjob`) and a
script calls :meth:`Job.wait`. No Qt here.

Cancel (:meth:`Job.cancel`) works the same on every OS: it creates the cancel file, which the
engine checks between steps (pre-training: then it saves ``gvsl_last.pt`` and exits; registration:
between stages). If the child is still alive ``grace_s`` seconds later, :meth:`poll` kills the
whole process tree (POSIX: its own process group; Windows: ``taskkill /T /F``). Checkpoints are
written atomically by the engine, so even a kill leaves the last complete checkpoint intact.

States: "pending" -> "running" -> "done" | "cancelled" | "failed". ``job.error`` is a one-line
message for "failed" (the engine's ``error`` record, else the exit code and the last stderr
lines); ``job.result`` is the last "done"/"cancelled" record (the engine's summary).
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Deque, List, Optional

FINAL_STATES = ("done", "cancelled", "failed")


def python_executable() -> str:
    """The Python that runs jobs: ``PythonSlicer`` inside the Slicer application (what
    ``slicer.util.executePythonModule`` uses), else the current interpreter."""
    try:
        from slicer import app  # noqa: F401  (only the Slicer application has it)
    except ImportError:
        return sys.executable
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    found = shutil.which("PythonSlicer") or str(Path(sys.executable).with_name(name))
    return found if os.path.exists(found) else sys.executable


def gvsl_package_root() -> str:
    """The folder that contains the ``gvsl`` package (found without importing it)."""
    spec = importlib.util.find_spec("gvsl")
    if spec is None or not spec.origin:
        raise RuntimeError("the gvsl package is not importable; reinstall the GVSL extension.")
    return str(Path(spec.origin).resolve().parents[1])


def job_environment(extra: Optional[dict] = None) -> dict:
    """The child's environment: ours + the gvsl folder first on PYTHONPATH, unbuffered output."""
    env = dict(os.environ)
    root = gvsl_package_root()
    parts = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def kill_process_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and every process it started (it was started in its own group/session)."""
    if proc.poll() is not None:
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a zombie the OS will reap
        pass


class Job:
    """One background ``gvsl`` command (see the module docstring).

    args: the gvsl arguments, e.g. ``["pretrain", "--images", d, "--out", o, "--steps", "100"]``;
        ``--progress json`` and ``--cancel-file`` are appended (the command must accept them).
    on_event(record): called from :meth:`poll` (the caller's thread) for every JSON record.
    on_log(line): called from :meth:`poll` for every non-JSON output line.
    grace_s: seconds between Cancel and killing the process tree.
    command: the full command line (default ``[python_executable(), "-m", "gvsl", *args]``).
    """

    def __init__(self, args: List[str], *, on_event: Optional[Callable[[dict], None]] = None,
                 on_log: Optional[Callable[[str], None]] = None, grace_s: float = 60.0,
                 env: Optional[dict] = None, command: Optional[List[str]] = None, log_lines: int = 2000):
        self.args = [str(a) for a in args]
        self.task = self.args[0] if self.args else "gvsl"
        self.on_event, self.on_log = on_event, on_log
        self.grace_s = float(grace_s)
        self._tmp: Optional[str] = None  # made by start(), removed at the end
        self.cancel_file = ""
        self.command = list(command) if command else [python_executable(), "-m", "gvsl", *self.args]
        self._env = env
        self.state = "pending"
        self.returncode: Optional[int] = None
        self.error = ""
        self.result: Optional[dict] = None
        self.last_step: Optional[dict] = None
        self.events: List[dict] = []
        self.log: Deque[str] = collections.deque(maxlen=log_lines)
        self._queue: "queue.Queue" = queue.Queue()
        self._readers: List[threading.Thread] = []
        self._proc: Optional[subprocess.Popen] = None
        self._cancel_time: Optional[float] = None
        self._killed = False
        self._error_record: Optional[dict] = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "Job":
        if self.state != "pending":
            raise RuntimeError(f"job already {self.state}")
        self._tmp = tempfile.mkdtemp(prefix="gvsl-job-")
        self.cancel_file = os.path.join(self._tmp, "cancel")
        self.command += ["--progress", "json", "--cancel-file", self.cancel_file]
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: the tree can be killed at once
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, env=self._env or job_environment(),
                                      text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        self.state = "running"
        for name, stream in (("stdout", self._proc.stdout), ("stderr", self._proc.stderr)):
            thread = threading.Thread(target=self._read, args=(name, stream), daemon=True,
                                      name=f"gvsl-job-{name}")
            thread.start()
            self._readers.append(thread)
        return self

    def _read(self, name: str, stream) -> None:
        for line in iter(stream.readline, ""):
            self._queue.put((name, line.rstrip("\r\n")))
        stream.close()
        self._queue.put((name, None))

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Ask the child to stop (cancel file); :meth:`poll` kills it after ``grace_s``."""
        if self.state != "running" or self._cancel_time is not None:
            return
        Path(self.cancel_file).write_text(reason + "\n", encoding="utf-8")
        self._cancel_time = time.monotonic()

    def kill(self) -> None:
        """Kill the process tree now (the last resort; also used when Slicer closes)."""
        if self._proc is not None and self._proc.poll() is None:
            self._killed = True
            kill_process_tree(self._proc)

    # -- reading ----------------------------------------------------------------------------
    def poll(self) -> str:
        """Handle everything the child wrote so far (never blocks); returns the state."""
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self._handle(name, line)
        if self.state == "running":
            if (self._cancel_time is not None and time.monotonic() - self._cancel_time > self.grace_s
                    and self._proc.poll() is None):
                self.log.append(f"GVSL: the job did not stop within {self.grace_s:.0f} s of Cancel; killing it.")
                self.kill()
            if self._proc.poll() is not None and not any(t.is_alive() for t in self._readers):
                self._drain_rest()
                self._finish(self._proc.returncode)
        return self.state

    def _drain_rest(self) -> None:
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self._handle(name, line)

    def _handle(self, name: str, line: str) -> None:
        record = None
        if name == "stdout" and line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
        if not isinstance(record, dict):
            self.log.append(line)
            if self.on_log is not None:
                self.on_log(line)
            return
        event = record.get("event")
        if event != "step":
            self.events.append(record)
        if event == "step":
            self.last_step = record
        elif event in ("done", "cancelled"):
            self.result = record
        elif event == "error":
            self._error_record = record
        if self.on_event is not None:
            self.on_event(record)

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        event = (self.result or {}).get("event")
        if event == "done" and returncode == 0:
            self.state = "done"
        elif event == "cancelled" or (self._cancel_time is not None and (self._killed or returncode != 0)):
            self.state = "cancelled"
        else:
            self.state = "failed"
            if self._error_record is not None:
                self.error = str(self._error_record.get("message", "unknown error"))
            else:
                tail = " | ".join(line for line in list(self.log)[-6:] if line.strip())
                self.error = (f"gvsl {self.task} stopped unexpectedly (exit code {returncode})"
                              + (f": {tail}" if tail else "; it printed nothing."))
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def wait(self, timeout: Optional[float] = None, interval_s: float = 0.05) -> str:
        """Block until the job ends (for scripts and tests); returns the final state.
        ``timeout`` (s): cancel, then kill after ``grace_s``, and raise TimeoutError."""
        t0 = time.monotonic()
        while self.poll() not in FINAL_STATES:
            if timeout is not None and time.monotonic() - t0 > timeout:
                self.cancel("timeout")
                self.grace_s = min(self.grace_s, 5.0)
                while self.poll() not in FINAL_STATES:
                    time.sleep(interval_s)
                raise TimeoutError(f"gvsl {self.task} did not finish within {timeout} s (stopped)")
            time.sleep(interval_s)
        return self.state

    def raise_for_state(self) -> None:
        """Raise :class:`JobError` if the job failed."""
        if self.state == "failed":
            raise JobError(self.error)


class JobError(RuntimeError):
    """A background gvsl job that failed; the message says why (one line)."""
