"""Pre-training from volume nodes as a background ``gvsl pretrain`` job (MRML + gvsl_slicer, no Qt).

:func:`start_pretraining` (non-blocking, what the panel uses) exports the volumes to a temporary
folder (one per output folder: :func:`inputs_folder`, since a resumed run must name the same
``--images`` as the interrupted one; the names are kept in ``gvsl_inputs.json`` and checked), starts ``gvsl pretrain`` through :class:`gvsl_slicer.jobs.Job` and returns a
:class:`PretrainingRun`; call ``run.poll()`` (the panel: from a QTimer) to receive progress,
fill the loss chart and, at the end, register the final checkpoint in the models folder as the
current model. :func:`pretrain` is the blocking console variant. Cancel stops after the current
step with ``gvsl_last.pt`` saved; ``resume=True`` on the same ``output_dir`` continues it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from gvsl_slicer.jobs import FINAL_STATES, Job, JobError
from gvsl_slicer.models import ModelStore

from GVSLPretrainingLib.chart import LossChart
from GVSLPretrainingLib.export import PretrainingInputError, export_volumes, volumes_problem

LAST, FINAL = "gvsl_last.pt", "gvsl_final.pt"


@dataclass
class PretrainOptions:
    """The panel's options (``gvsl pretrain --help`` documents each)."""
    preset: str = "ct"                # "ct" | "mr"
    steps: int = 1000
    batch_size: int = 2
    crop: int = 128                   # voxels (cubic crop side)
    device: str = "auto"              # "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    spacing_mm: float = 1.0
    lr: float = 1e-4
    save_every: int = 50              # resume points (steps)
    seed: int = 0
    init: Optional[str] = None        # start from these weights (e.g. the published GVSL weights)
    augment: bool = True
    model_channels: Optional[Sequence[int]] = None  # advanced: 9 U-Net widths, multiples of 8

    def problem(self) -> str:
        """Why these options cannot run ("" when they can)."""
        if self.preset not in ("ct", "mr"):
            return f"Unknown preset '{self.preset}': choose ct or mr."
        for name, low in (("steps", 1), ("batch_size", 1), ("crop", 16), ("save_every", 1)):
            if int(getattr(self, name)) < low:
                return f"{name.replace('_', ' ')} must be at least {low} (got {getattr(self, name)})."
        if self.spacing_mm <= 0 or self.lr <= 0:
            return "spacing and learning rate must be positive."
        if self.model_channels is not None:
            ch = list(self.model_channels)
            if len(ch) != 9 or any(int(c) < 8 or int(c) % 8 for c in ch):
                return f"model channels must be 9 multiples of 8 (GroupNorm groups of 8), got {ch}."
        if self.init and not Path(self.init).is_file():
            return f"Initial weights not found: {self.init}."
        return ""

    def arguments(self) -> List[str]:
        args = ["--preset", self.preset, "--steps", self.steps, "--batch-size", self.batch_size,
                "--crop", self.crop, "--device", self.device, "--spacing", self.spacing_mm, "--lr", self.lr,
                "--save-every", self.save_every, "--seed", self.seed]
        if self.init:
            args += ["--init", self.init]
        if not self.augment:
            args.append("--no-augment")
        if self.model_channels is not None:
            args += ["--model-channels", *[int(c) for c in self.model_channels]]
        return [str(a) for a in args]


class PretrainingRun:
    """One background pre-training (see the module docstring). Attributes after the end:
    ``state`` ("done" | "cancelled" | "failed"), ``error``, ``summary`` (the engine's last
    record), ``checkpoint`` (final or last checkpoint path), ``model_entry`` (models folder)."""

    def __init__(self, output_dir, options: PretrainOptions, images: List[str], *, resume: bool = False,
                 scene=None, store: Optional[ModelStore] = None, temp_dir: Optional[str] = None,
                 on_event: Optional[Callable[[dict], None]] = None, on_log: Optional[Callable[[str], None]] = None):
        self.output_dir = Path(output_dir)
        self.options = options
        self.resume = resume
        self.store = store if store is not None else ModelStore()
        self._temp_dir = temp_dir
        self._on_event = on_event
        self.chart = LossChart(scene, f"GVSL pre-training loss ({self.output_dir.name})") if scene is not None else None
        self.last_step: Optional[dict] = None
        self.model_entry = None
        self.checkpoint: Optional[str] = None
        args = ["pretrain", "--images", *images, "--out", str(self.output_dir), *options.arguments()]
        if resume:
            args.append("--resume")
        self.job = Job(args, on_event=self._event, on_log=on_log, grace_s=120.0)
        self._finished = False

    # -- job ------------------------------------------------------------------------------
    def start(self) -> "PretrainingRun":
        self.job.start()
        return self

    def _event(self, record: dict) -> None:
        if record.get("event") == "step":
            self.last_step = record
            if self.chart is not None:
                self.chart.append(record)
        if self._on_event is not None:
            self._on_event(record)

    def poll(self) -> str:
        """Handle the child's output so far (never blocks); finishes up once; returns the state."""
        state = self.job.poll()
        if state in FINAL_STATES and not self._finished:
            self._finished = True
            self._finish()
        return self.state

    def _finish(self) -> None:
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
        summary = self.summary
        if self.job.state == "done" and summary.get("checkpoint"):
            self.checkpoint = summary["checkpoint"]
            self.model_entry = self.store.add(self.checkpoint, name=self.output_dir.name,
                                              expected_kind="pretrain", make_current=True)
        elif (self.output_dir / LAST).exists():
            self.checkpoint = str(self.output_dir / LAST)

    @property
    def state(self) -> str:
        return self.job.state if self._finished or self.job.state not in FINAL_STATES else "running"

    @property
    def error(self) -> str:
        return self.job.error

    @property
    def summary(self) -> dict:
        return dict(self.job.result or {})

    def cancel(self) -> None:
        """Stop after the current step (``gvsl_last.pt`` saved; resume later)."""
        self.job.cancel("cancelled by the user")

    def wait(self, timeout: Optional[float] = None) -> str:
        self.job.wait(timeout)
        return self.poll()

    def progress(self) -> dict:
        """{"step", "total", "fraction", "eta_s", "loss"} of the latest step (zeros before)."""
        rec = self.last_step or {}
        total = int(rec.get("total") or self.options.steps)
        step = int(rec.get("step") or 0)
        return {"step": step, "total": total, "fraction": step / total if total else 0.0,
                "eta_s": rec.get("eta_s"), "loss": rec.get("loss")}

    def status_text(self) -> str:
        p = self.progress()
        if self.state == "running":
            eta = p["eta_s"]
            eta_txt = "" if eta is None else f", about {int(eta) // 60} min {int(eta) % 60} s left"
            loss = "" if p["loss"] is None else f", loss {p['loss']:.4f}"
            return f"Step {p['step']} / {p['total']}{loss}{eta_txt}"
        if self.state == "done":
            return f"Done: {p['step']} steps; the model '{self.model_entry.name}' is now the current GVSL model."
        if self.state == "cancelled":
            return f"Cancelled at step {self.summary.get('step', p['step'])}; Resume continues from {LAST}."
        return f"Failed: {self.error}"


INPUTS_RECORD = "gvsl_inputs.json"  # the names of the exported volumes, checked on resume


def inputs_folder(output_dir) -> Path:
    """The temporary folder the volumes are exported to: one per output folder, so a resumed run
    gets the same ``--images`` path as the interrupted one (the engine requires it); removed
    when each run ends."""
    key = hashlib.sha1(str(Path(output_dir).expanduser().absolute()).encode("utf-8")).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"gvsl-pretrain-inputs-{key}"


def check_same_inputs(output_dir, volume_nodes, resume: bool) -> List[str]:
    """The volume names in export order; on resume they must be those of the interrupted run."""
    names = [node.GetName() for node in volume_nodes]
    record = Path(output_dir) / INPUTS_RECORD
    if resume and record.is_file():
        before = json.loads(record.read_text(encoding="utf-8")).get("volumes", [])
        if before != names:
            raise PretrainingInputError(
                f"Resume needs the volumes of the interrupted run, in the same order: {before}; selected now: "
                f"{names}. Select those volumes, or Start a new run in another output folder.")
    return names


def _write_inputs_record(output_dir, names: List[str]) -> None:
    from gvsl.checkpoint import atomic_write_text
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(output_dir) / INPUTS_RECORD, json.dumps({"volumes": names}, indent=2))


def can_resume(output_dir) -> bool:
    """True when ``output_dir`` holds a resumable ``gvsl_last.pt``."""
    return (Path(output_dir) / LAST).is_file()


def start_pretraining(volume_nodes: Optional[Sequence] = None, output_dir=None, *, images_folder=None,
                      resume: bool = False, scene=None, store: Optional[ModelStore] = None,
                      on_event=None, on_log=None, **options) -> PretrainingRun:
    """Start pre-training in the background; returns the running :class:`PretrainingRun`.

    volume_nodes: scalar volume nodes (>= 2), exported to a temporary folder (removed at the end);
        or images_folder: a folder of volume files / DICOM series passed to ``gvsl pretrain``.
    output_dir: checkpoints, history.json, loss_curve.png (created).
    resume: continue ``output_dir/gvsl_last.pt`` (pass the same volumes and options).
    scene: where the loss chart nodes go (default: the volumes' scene; None without volumes).
    options: :class:`PretrainOptions` fields (preset, steps, batch_size, crop, device, ...).
    """
    opts = PretrainOptions(**options)
    if output_dir is None:
        raise PretrainingInputError("Choose an output folder for the checkpoints.")
    problem = opts.problem()
    if problem:
        raise PretrainingInputError(problem)
    if resume and not can_resume(output_dir):
        raise PretrainingInputError(f"Nothing to resume: {Path(output_dir) / LAST} does not exist. Start instead.")
    temp_dir = None
    if images_folder is not None:
        if not Path(images_folder).exists():
            raise PretrainingInputError(f"Images folder not found: {images_folder}")
        images = [str(images_folder)]
    else:
        problem = volumes_problem(volume_nodes)
        if problem:
            raise PretrainingInputError(problem)
        temp_dir = str(inputs_folder(output_dir))
        names = check_same_inputs(output_dir, volume_nodes, resume)
        shutil.rmtree(temp_dir, ignore_errors=True)  # a stale copy of a crashed run
        images = [temp_dir]
        export_volumes(volume_nodes, temp_dir)
        _write_inputs_record(output_dir, names)
        if scene is None:
            scene = volume_nodes[0].GetScene()
    run = PretrainingRun(output_dir, opts, images, resume=resume, scene=scene, store=store, temp_dir=temp_dir,
                         on_event=on_event, on_log=on_log)
    return run.start()


def pretrain(volume_nodes: Optional[Sequence] = None, output_dir=None, *, timeout: Optional[float] = None,
             **kwargs) -> PretrainingRun:
    """Blocking pre-training (Python console): like :func:`start_pretraining`, waits for the end.
    Raises :class:`gvsl_slicer.jobs.JobError` when the job fails; returns the finished run
    (``run.checkpoint``, ``run.model_entry``, ``run.summary``, ``run.chart``)."""
    run = start_pretraining(volume_nodes, output_dir, **kwargs)
    run.wait(timeout)
    if run.state == "failed":
        raise JobError(run.error)
    return run


