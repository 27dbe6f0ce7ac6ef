"""Poll a :class:`gvsl_slicer.jobs.Job` (or anything with ``poll()``, ``state`` and ``kill()``, such
as GVSLRegistrationLib's RegistrationJob) from a ``QTimer`` (the only Qt code of the job runner).

The timer fires on the GUI thread every ``interval_ms``; each tick calls ``job.poll()``, which
never blocks (the child's output is read by the job's threads), so the GUI stays responsive.
When the job ends, ``on_finished(job)`` is called once. If Slicer quits while a job runs, the
job's process tree is killed (its last checkpoint stays on disk).
"""
from __future__ import annotations

from typing import Callable

from gvsl_slicer.jobs import FINAL_STATES


class JobPoller:
    def __init__(self, job, on_finished: Callable[[object], None], interval_ms: int = 200):
        import qt
        import slicer
        self.job = job
        self.on_finished = on_finished
        self.timer = qt.QTimer()
        self.timer.setInterval(int(interval_ms))
        self.timer.connect("timeout()", self._tick)
        slicer.app.connect("aboutToQuit()", self.job.kill)

    def start(self) -> "JobPoller":
        if getattr(self.job, "state", None) == "pending":
            self.job.start()
        self.timer.start()
        return self

    def _tick(self) -> None:
        if self.job.poll() in FINAL_STATES:
            self.timer.stop()
            self.on_finished(self.job)
