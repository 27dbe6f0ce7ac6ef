"""Registration as a background ``gvsl register`` job, so the GUI never waits for the network.

:class:`RegistrationJob`: the inputs are converted (gvsl_mrml) and written to a temporary folder
(uncompressed NRRD), ``gvsl register`` runs as a child process (:class:`gvsl_slicer.jobs.Job`),
its output files are read back by a worker thread (SimpleITK only, no MRML), and the nodes are
made on the caller's thread by :func:`GVSLRegistrationLib.logic.results_to_nodes`, exactly as
the in-process :func:`register_volumes` makes them. ``poll()`` never blocks; Cancel stops the
child at the next stage boundary and kills it one second later (a registration has nothing to
resume, so there is nothing to lose). The temporary folder is removed at the end.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import SimpleITK as sitk

from gvsl_slicer.jobs import FINAL_STATES, Job

from GVSLRegistrationLib.logic import RegistrationOutputs, prepare_inputs, results_to_nodes

CLI_OPTIONS = {"preset": "--preset", "network_spacing_mm": "--network-spacing",
               "max_network_voxels": "--max-network-voxels", "precision": "--precision", "refine": "--refine"}


def read_register_outputs(folder) -> SimpleNamespace:
    """The files of ``gvsl register --out folder`` -> the fields :func:`results_to_nodes` reads."""
    folder = Path(folder)
    labels = folder / "warped_labels.nii.gz"
    network = folder / "warped_network.nii.gz"  # written when the registration was refined
    return SimpleNamespace(
        network=SimpleNamespace(warped=sitk.ReadImage(str(network))) if network.exists() else None,
        warped=sitk.ReadImage(str(folder / "warped.nii.gz")),
        warped_affine=sitk.ReadImage(str(folder / "warped_affine.nii.gz")),
        jacobian=sitk.ReadImage(str(folder / "jacobian.nii.gz")),
        affine=sitk.ReadTransform(str(folder / "affine.tfm")),
        deformable=sitk.ReadImage(str(folder / "deformable.nii.gz"), sitk.sitkVectorFloat64),
        warped_labels=sitk.ReadImage(str(labels)) if labels.exists() else None,
        metrics=json.loads((folder / "metrics.json").read_text(encoding="utf-8")))


class RegistrationJob:
    """One background registration; ``state``: "running" -> "done" | "cancelled" | "failed".

    Arguments as :func:`GVSLRegistrationLib.register_volumes` (model_path must be a file);
    on_event(record) receives the engine's progress records ("stage", "warning", ...).
    After "done", ``outputs`` is the :class:`RegistrationOutputs`.
    """

    def __init__(self, fixed_node, moving_node, model_path, device: str = "auto", *,
                 moving_segmentation=None, fixed_segmentation=None,
                 outputs: Optional[RegistrationOutputs] = None,
                 on_event: Optional[Callable[[dict], None]] = None, cancel_grace_s: float = 1.0,
                 **engine_options):
        from gvsl.io import write_image_atomic
        unknown = set(engine_options) - set(CLI_OPTIONS)
        if unknown:
            raise TypeError(f"unknown registration option(s): {', '.join(sorted(unknown))}")
        self.prepared = prepare_inputs(fixed_node, moving_node, model_path, moving_segmentation=moving_segmentation,
                                       fixed_segmentation=fixed_segmentation, outputs=outputs)
        self._tmp = Path(tempfile.mkdtemp(prefix="gvsl-register-"))
        args = ["register", "--model", str(model_path), "--out", str(self._tmp / "out"), "--device", device,
                "--no-overview"]
        engine_options.setdefault("refine", 0)  # the in-process default (register_volumes); the CLI's is auto
        try:
            for key, image in (("fixed", self.prepared.fixed), ("moving", self.prepared.moving),
                               ("fixed-labels", self.prepared.fixed_labels),
                               ("moving-labels", self.prepared.moving_labels)):
                if image is not None:
                    args += [f"--{key}", str(write_image_atomic(image, self._tmp / f"{key}.nrrd", compress=False))]
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        for key, value in engine_options.items():
            if value is not None:
                args += [CLI_OPTIONS[key], str(value)]
        self.job = Job(args, on_event=on_event, grace_s=cancel_grace_s)
        self.outputs: Optional[RegistrationOutputs] = None
        self.error = ""
        self._state = "pending"
        self._reader: Optional[threading.Thread] = None
        self._read_result = None
        self._cancel_requested = False

    def start(self) -> "RegistrationJob":
        self.job.start()
        self._state = "running"
        return self

    @property
    def state(self) -> str:
        return self._state

    def cancel(self) -> None:
        """Stop: the child within a second; once it has finished, no nodes are made."""
        self._cancel_requested = True
        self.job.cancel("cancelled by the user")

    def kill(self) -> None:
        """Kill the child now (Slicer quitting); no nodes are made."""
        self._cancel_requested = True
        self.job.kill()

    def _read(self) -> None:
        try:
            self._read_result = read_register_outputs(self._tmp / "out")
        except Exception as exc:  # noqa: BLE001 - reported as the job's error
            self._read_result = exc

    def poll(self) -> str:
        """Never blocks (the output files are read by a worker thread); returns the state."""
        if self._state != "running":
            return self._state
        job_state = self.job.poll()
        if job_state not in FINAL_STATES:
            return self._state
        if job_state != "done":
            self.error = self.job.error
            return self._end(job_state)
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, daemon=True, name="gvsl-register-read")
            self._reader.start()
        if self._reader.is_alive():
            return self._state
        if self._cancel_requested:  # e.g. the scene is closing: leave it alone
            return self._end("cancelled")
        if isinstance(self._read_result, Exception):
            self.error = f"could not read the registration results: {self._read_result}"
            return self._end("failed")
        try:
            self.outputs = results_to_nodes(self.prepared, self._read_result)
        except Exception as exc:  # noqa: BLE001 - e.g. the fixed volume was deleted meanwhile
            self.error = f"could not create the result nodes: {exc}"
            return self._end("failed")
        return self._end("done")

    def _end(self, state: str) -> str:
        self._state = state
        shutil.rmtree(self._tmp, ignore_errors=True)
        return state

    def wait(self, timeout: Optional[float] = None, interval_s: float = 0.05) -> str:
        import time
        t0 = time.monotonic()
        while self.poll() not in FINAL_STATES:
            if timeout is not None and time.monotonic() - t0 > timeout:
                self.cancel()
                timeout = None
            time.sleep(interval_s)
        return self._state


def start_registration(fixed_node, moving_node, model_path, device: str = "auto", **kwargs) -> RegistrationJob:
    """Start a background registration (see :class:`RegistrationJob`); returns it running."""
    return RegistrationJob(fixed_node, moving_node, model_path, device, **kwargs).start()
