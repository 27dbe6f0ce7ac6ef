"""Progress reporting and cancellation for long loops.

A :class:`Progress` is called once per completed unit of work with a dict of numbers; it
prints JSON lines (``--progress json``: one object per line, for Slicer and scripts), a text
bar on a terminal (``bar``), or nothing (``none``), and adds steps/s and ETA. Cancellation is
cooperative: :class:`CancelToken` is set by a signal handler, a GUI button or a callback, and
loops check ``token.cancelled`` between steps. A token can also watch a *cancel file*
(``gvsl pretrain/register --cancel-file PATH``): it becomes cancelled once that file exists, which
is how the Slicer panels stop a child process on every OS (no signals needed on Windows).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TextIO


class Cancelled(Exception):
    """Raised by loops that were asked to stop (after they saved what they had)."""


class CancelToken:
    """Thread-safe cancel flag; ``reason`` says who asked.

    watch_file: optional path; the token counts as cancelled as soon as that file exists
    (checked on every ``cancelled`` read: one ``stat``, microseconds). Its first line, if any,
    becomes the reason.
    """

    def __init__(self, watch_file: Optional[str] = None):
        self._event = threading.Event()
        self.reason = ""
        self.watch_file = os.fspath(watch_file) if watch_file else None

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        if not self._event.is_set() and self.watch_file and os.path.exists(self.watch_file):
            try:
                with open(self.watch_file, encoding="utf-8", errors="replace") as f:
                    text = f.readline().strip()
            except OSError:
                text = ""
            self.cancel(text or "cancel file")
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled(self.reason)


@contextmanager
def cancel_on_signals(cancel: CancelToken) -> Iterator[CancelToken]:
    """While inside: SIGINT/SIGTERM set ``cancel`` (reason "SIGINT"/"SIGTERM") instead of killing
    the process, so loops stop after their current step and save; the previous handlers come
    back on exit. Only in the main thread (Python allows handlers nowhere else); elsewhere a no-op."""
    previous = {}

    def handler(signum, _frame):
        cancel.cancel(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield cancel
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def json_safe(value):
    """``value`` made JSON-ready: nested dicts/lists/tuples, NumPy/torch scalars as Python
    numbers, NaN/Inf as None (JSON has no NaN). Used by every JSON writer of gvsl."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if not isinstance(value, (str, bytes, int, float, bool)) and hasattr(value, "item") \
            and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Progress:
    """Report ``update(step, **numbers)`` for a loop of ``total`` steps.

    mode: "json" (one JSON object per line on ``stream``), "bar" (a single updating line),
    "none". ``callback(record)`` also receives every record (the Slicer widgets use it).
    Records always hold ``event``, ``step``, ``total``, ``steps_per_s``, ``eta_s``.
    """

    def __init__(self, total: int, mode: str = "bar", stream: Optional[TextIO] = None,
                 callback: Optional[Callable[[dict], None]] = None, task: str = "",
                 start_step: int = 0):
        if mode not in ("json", "bar", "none"):
            raise ValueError(f"unknown progress mode '{mode}'; choose json, bar or none")
        self.total = int(total)
        self.mode = mode
        self.stream = stream or (sys.stdout if mode == "json" else sys.stderr)
        self.callback = callback
        self.task = task
        self._t0 = time.perf_counter()
        self._start_step = int(start_step)
        self._last_bar = 0.0

    def _emit(self, record: dict) -> None:
        if self.callback is not None:
            self.callback(record)
        if self.mode == "json":
            self.stream.write(json.dumps(json_safe(record)) + "\n")
            self.stream.flush()

    def event(self, event: str, **fields) -> None:
        """A non-step record (start, checkpoint, done, warning, ...)."""
        record = {"event": event, "task": self.task}
        record.update(fields)
        self._emit(record)
        if self.mode == "bar" and event not in ("step",):
            msg = fields.get("message") or " ".join(f"{k}={v}" for k, v in fields.items())
            self.stream.write(f"\n[{self.task}] {event}: {msg}\n")
            self.stream.flush()

    def update(self, step: int, **numbers) -> dict:
        elapsed = time.perf_counter() - self._t0
        done = max(step - self._start_step, 0)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        record = {"event": "step", "task": self.task, "step": int(step), "total": self.total}
        record.update({k: (round(float(v), 6) if isinstance(v, float) else v) for k, v in numbers.items()})
        record["steps_per_s"] = round(rate, 4)
        record["eta_s"] = round(eta, 1) if math.isfinite(eta) else float("nan")
        self._emit(record)
        if self.mode == "bar":
            now = time.perf_counter()
            if now - self._last_bar > 0.2 or step >= self.total:
                self._last_bar = now
                frac = step / self.total if self.total else 1.0
                width = 30
                bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
                extras = " ".join(f"{k}={v:.4g}" for k, v in numbers.items() if isinstance(v, (int, float)))
                eta_txt = f"{eta:.0f}s" if math.isfinite(eta) else "?"
                self.stream.write(f"\r[{self.task}] |{bar}| {step}/{self.total} {extras} "
                                  f"{rate:.2f} it/s ETA {eta_txt}   ")
                if step >= self.total:
                    self.stream.write("\n")
                self.stream.flush()
        return record
