"""Fine-tuning (or linear probing) a GVSL backbone on labelled volumes: the segmentation *task* on
the shared training core (:mod:`gvsl.trainer`: distributed init, exact resume, signals, JSON
progress, history, loss/validation curves, atomic checkpoints, best-by-validation checkpoint).

* **Init** (``pretrained``): a GVSL pre-training checkpoint or the published weights (their
  ``unet.*`` backbone; ``out_conv`` starts fresh), a segmentation checkpoint of the same label
  table (everything), or nothing (scratch).
* **Modes**: ``finetune`` trains every weight; ``linear`` freezes the backbone and trains only
  ``out_conv`` (the paper's linear evaluation).
* **Step**: a batch of ``crop``^3 patches, 2/3 centred on a voxel of a random present structure
  (:func:`gvsl.segdata.sample_patch`, drawn from the trainer's seeded generator so resume is
  exact), loss = Dice + cross-entropy, both in fp32 on the logits: MONAI
  ``DiceLoss(softmax=True, to_onehot_y=True, include_background=False, batch=True)`` (the soft Dice
  of the foreground structures, pooled over the batch, as nnU-Net's batch Dice without background)
  + torch cross-entropy; Adam (``lr_schedule``: ``constant``, the paper's, or ``poly``, nnU-Net's
  lr * (1 - step/steps)^0.9, which ends a short run at small steps instead of mid-jump), CUDA
  autocast via the trainer's precision.
* **Head start** (:func:`gvsl.segmodel.init_head_prior`): a fresh ``out_conv`` starts with its
  bias at the log class frequencies of the training labels.

  Why these two (measured on 64^3 heart phantoms, whose 7 structures are 0.1-1.4 % of the voxels
  each): with a uniform head and the default per-patch Dice over all 8 classes, the first ~50
  steps only learned "all background" (the demo's 40 steps segmented nothing, Dice 0 for every
  structure): cross-entropy collapses onto the 95 % background, the background's Dice term is ~1
  for free, and a structure absent from a patch scores a perfect Dice for predicting nothing.
  With the prior head and foreground batch Dice the structures appear within ~15-30 steps.
  The published recipe (Adam, lr 1e-4, large crops, long GPU runs) is the default here; a short
  CPU run needs a larger lr (1e-3..3e-3) and crops that hold the whole structure (see
  :mod:`gvsl.demo`).
* **Validation** every ``validate_every`` steps: Gaussian sliding windows (window = ``crop``) over
  each validation case on its preprocessing grid (:func:`gvsl.slidingwindow.stream_sliding_window`,
  the blend ``gvsl segment`` uses, holding one window depth of scores), argmax, Dice per structure; ``dice_mean`` (over
  the structures present in each case, averaged over cases) picks ``seg_best.pt``. Without a
  validation set the training cases are used (the best checkpoint is then best on training data;
  a warning says so).
* **Preprocessing**: the spec is the pre-trained checkpoint's (so the backbone sees data as it was
  pre-trained), else the task's default (ct for heart/coronary, mr for brain); ``preset``/
  ``spacing_mm`` override. It is saved in every checkpoint with the label table and the scores.

Files in ``out``: ``seg_last.pt`` (resumable), ``seg_final.pt``, ``seg_best.pt``,
``config.json``, ``history.json``, ``loss_curve.png``, ``validation_curve.png``.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from gvsl.progress import CancelToken
from gvsl.trainer import TrainingError, TrainingTask, check_common_settings, run_task

MODES = ("finetune", "linear")
LR_SCHEDULES = ("constant", "poly")
TASK_PRESETS = {"heart": "ct", "coronary": "ct", "brain": "mr"}
BEST = "seg_best.pt"
FINAL = "seg_final.pt"
LAST = "seg_last.pt"


@dataclass
class FinetuneConfig:
    """Options of ``gvsl finetune`` (saved in the checkpoints and config.json; checked here)."""

    OPTION_NAMES: ClassVar[Dict[str, str]] = {"spacing_mm": "--spacing", "validate_every": "--val-every",
                                               "model_channels": "model_channels (network width)"}

    task: str
    images: List[str]
    labels: List[str]
    out: str
    val_images: Optional[List[str]] = None
    val_labels: Optional[List[str]] = None
    pretrained: Optional[str] = None
    mode: str = "finetune"
    steps: int = 2000
    crop: int = 96
    batch_size: int = 2
    lr: float = 1e-4
    lr_schedule: str = "constant"  # the paper's; "poly": lr * (1 - step/steps)^0.9 (nnU-Net), for short runs
    validate_every: int = 200
    save_every: int = 200
    preset: Optional[str] = None
    spacing_mm: Optional[float] = None
    ignore_unknown_labels: bool = False
    remap: Optional[str] = None
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    progress: str = "bar"
    resume: bool = False
    overwrite: bool = False  # replace an earlier run in `out` (gvsl.outputs.RunFolder)
    model_channels: Optional[List[int]] = None  # None: the pre-trained backbone's (or the published width)
    pos_fraction: float = 2 / 3

    def __post_init__(self):
        def absolute(paths):
            if paths is None:
                return None
            paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
            return [str(Path(p).expanduser().absolute()) for p in paths]
        self.images, self.labels = absolute(self.images), absolute(self.labels)
        self.val_images, self.val_labels = absolute(self.val_images), absolute(self.val_labels)
        if self.pretrained:
            self.pretrained = str(Path(self.pretrained).expanduser().absolute())
        if self.task in TASK_PRESETS:
            pass
        elif str(self.task).endswith(".tsv"):
            self.task = str(Path(self.task).expanduser().absolute())
        check_common_settings(self)
        if self.lr_schedule not in LR_SCHEDULES:
            raise TrainingError(f"--lr-schedule must be constant or poly (got {self.lr_schedule!r})")
        if self.mode not in MODES:
            raise TrainingError(f"--mode must be finetune or linear (got {self.mode!r})")
        if isinstance(self.crop, bool) or not isinstance(self.crop, int) or not 16 <= self.crop <= 512:
            raise TrainingError(f"--crop must be an integer from 16 to 512 voxels (got {self.crop!r}): the U-Net pools 4 times")
        if self.preset not in (None, "ct", "mr"):
            raise TrainingError(f"--preset must be ct or mr (got {self.preset!r})")
        if self.spacing_mm is not None and not (isinstance(self.spacing_mm, (int, float))
                                                and math.isfinite(self.spacing_mm) and self.spacing_mm > 0):
            raise TrainingError(f"--spacing must be a finite number of mm > 0 (got {self.spacing_mm!r})")
        if (self.val_images is None) != (self.val_labels is None):
            raise TrainingError("give both --val-images and --val-labels, or neither")
        if not 0.0 <= float(self.pos_fraction) <= 1.0:
            raise TrainingError(f"pos_fraction must be in [0, 1] (got {self.pos_fraction})")

    def to_dict(self) -> dict:
        return asdict(self)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> Dict[int, float]:
    """{class: Dice} for the foreground classes present in ``truth`` (integer arrays, same shape)."""
    out = {}
    for c in range(1, n_classes):
        t = truth == c
        if not t.any():
            continue
        p = pred == c
        out[c] = float(2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    return out


class FinetuneTask(TrainingTask):
    """The segmentation task for :class:`gvsl.trainer.Trainer` (see the module docstring)."""

    name, prefix, kind = "finetune", "seg", "segmentation"
    loss_terms = ("loss", "dice", "ce")
    best_metric, best_mode = "dice_mean", "max"

    def __init__(self):
        self.scores: dict = {}
        self._dice = None
        self._schedule = "constant"

    # -- data -------------------------------------------------------------------------------
    def load_data(self, trainer) -> None:
        from gvsl import segdata
        from gvsl.checkpoint import CheckpointError, load_checkpoint
        from gvsl.io import VolumeError
        from gvsl.preprocessing import PreprocessSpec, spec_from_checkpoint, with_overrides
        cfg = trainer.config
        self._schedule = cfg.lr_schedule
        try:
            self.table = segdata.resolve_table(cfg.task)
            remap = segdata.load_remap(cfg.remap) if cfg.remap else {}
            self.encoder = segdata.LabelEncoder(self.table, remap, cfg.ignore_unknown_labels)
            self.init_ckpt = None
            if cfg.pretrained:
                try:
                    self.init_ckpt = load_checkpoint(cfg.pretrained)
                except CheckpointError as exc:
                    raise TrainingError(f"--pretrained: {exc}") from None
            base, source = spec_from_checkpoint(self.init_ckpt)
            if source == "default":  # scratch, or the published weights (which record nothing)
                base = PreprocessSpec(preset=TASK_PRESETS.get(str(cfg.task), base.preset))
            self.spec, notes = with_overrides(base, source, cfg.preset, cfg.spacing_mm)
            for note in notes:
                trainer.progress.event("warning", message=note)
            pairs = segdata.find_pairs(cfg.images, cfg.labels)
            self.cases = [segdata.load_case(i, lab, self.spec, self.encoder) for i, lab in pairs]
            if cfg.val_images:
                vpairs = segdata.find_pairs(cfg.val_images, cfg.val_labels)
                self.val_cases = [segdata.load_case(i, lab, self.spec, self.encoder) for i, lab in vpairs]
            else:
                self.val_cases = self.cases
        except (segdata.SegmentationDataError, VolumeError) as exc:
            raise TrainingError(str(exc)) from None
        for case in self.cases + (self.val_cases if cfg.val_images else []):
            for note in case.warnings:
                trainer.progress.event("warning", message=note)
        unknown = sum(c.unknown_voxels for c in self.cases + (self.val_cases if cfg.val_images else []))
        if unknown:
            trainer.progress.event("warning", message=f"{unknown} voxels had label values outside the "
                                   f"'{self.table.name}' table and were treated as background (--ignore-unknown-labels)")
        if not cfg.val_images and cfg.validate_every:
            trainer.progress.event("warning", message="no validation set (--val-images/--val-labels): validation "
                                   "Dice and the best checkpoint are measured on the training cases")

    def describe_data(self) -> dict:
        from gvsl.segdata import voxel_count_summary
        return {"task_table": self.table.name, "n_train": len(self.cases), "n_val": len(self.val_cases),
                "n_classes": len(self.table) + 1, "preprocessing": self.spec.to_dict(),
                "voxels_per_class": voxel_count_summary(self.cases, len(self.table) + 1),
                "init": self._init_name()}

    def _init_name(self) -> str:
        if self.init_ckpt is None:
            return "scratch"
        return f"{self.init_ckpt.get('kind')} ({self.init_ckpt.get('source')})"

    # -- model ------------------------------------------------------------------------------
    def build_model(self, trainer):
        from gvsl.checkpoint import CheckpointError
        from gvsl.network import DEFAULT_CHANNELS
        from gvsl.segdata import voxel_count_summary
        from gvsl.segmodel import init_backbone_from, init_head_prior, new_model
        cfg = trainer.config
        ckpt = self.init_ckpt
        channels = cfg.model_channels or (ckpt or {}).get("model_config", {}).get("channels") or DEFAULT_CHANNELS
        model = new_model(self.table, tuple(channels))
        try:
            if ckpt is not None and ckpt.get("kind") == "segmentation" and \
                    ckpt.get("labels", {}).get("values") == self.table.values:
                model.load_state_dict(ckpt["state_dict"])
            else:
                if ckpt is not None:
                    init_backbone_from(model, ckpt, cfg.pretrained)
                init_head_prior(model, voxel_count_summary(self.cases, len(self.table) + 1))
        except (CheckpointError, RuntimeError) as exc:
            raise TrainingError(f"--pretrained: {str(exc).splitlines()[0]}") from None
        if cfg.mode == "linear":
            model.freeze_backbone()
            if ckpt is None:
                trainer.progress.event("warning", message="--mode linear without --pretrained trains a linear "
                                       "layer on a random backbone (the paper's scratch baseline)")
        return model

    def lr_factor(self, step: int, steps: int) -> float:
        if self._schedule == "poly":  # nnU-Net's: (1 - step/steps)^0.9, from 1 at the first step
            return (1.0 - step / max(steps, 1)) ** 0.9
        return 1.0

    def compute_losses(self, trainer, model) -> Dict[str, torch.Tensor]:
        from gvsl.segdata import sample_batch
        cfg = trainer.config
        if self._dice is None:
            from monai.losses import DiceLoss
            self._dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        x, y = sample_batch(self.cases, cfg.batch_size, cfg.crop, trainer.generator, cfg.pos_fraction)
        x = trainer.precision.prepare_input(x)
        y = y.to(trainer.device)
        logits = model(x).float()
        dice = self._dice(logits, y)
        ce = F.cross_entropy(logits, y[:, 0])
        return {"loss": dice + ce, "dice": dice, "ce": ce}

    def validate(self, trainer, model) -> Dict[str, float]:
        from gvsl.slidingwindow import stream_sliding_window
        cfg = trainer.config
        n_classes = len(self.table) + 1
        per_class: Dict[int, List[float]] = {c: [] for c in range(1, n_classes)}
        means = []
        for case in self.val_cases:
            x = trainer.precision.prepare_input(torch.from_numpy(case.image_zyx)[None, None])
            # the streaming Gaussian window of gvsl segment (MONAI's blend, one window deep in memory)
            pred = np.zeros(case.classes_zyx.shape, dtype=np.int64)

            def keep_argmax(z0, probs, pred=pred):
                pred[z0:z0 + probs.shape[1]] = probs.argmax(dim=0).numpy()
            stream_sliding_window(model, x, (cfg.crop,) * 3, keep_argmax, overlap=0.25)
            d = dice_per_class(pred, case.classes_zyx, n_classes)
            for c, v in d.items():
                per_class[c].append(v)
            if d:
                means.append(float(np.mean(list(d.values()))))
        scores = {"dice_mean": float(np.mean(means)) if means else float("nan")}
        for c, lab in enumerate(self.table, start=1):
            if per_class[c]:
                scores[f"dice_{_safe(lab.name)}"] = float(np.mean(per_class[c]))
        self.scores = {"step": trainer.step, **scores}
        return scores

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_fields(self, trainer) -> dict:
        from gvsl.segmodel import labels_entry
        return {"kind": self.kind, "task": self.table.name, "preprocessing": self.spec.to_dict(),
                "labels": labels_entry(self.table),
                "scores": dict(self.scores), "mode": trainer.config.mode, "init": self._init_name()}

    def state_dict(self) -> dict:
        return {"scores": dict(self.scores)}

    def load_state_dict(self, state: dict) -> None:
        self.scores = dict(state.get("scores") or {})

    def title(self, trainer) -> str:
        return f"GVSL fine-tuning ({self.table.name}, {trainer.config.mode}, init {self._init_name()})"


def finetune(config: Optional[FinetuneConfig] = None, callback: Optional[Callable[[dict], None]] = None,
             cancel: Optional[CancelToken] = None, **options) -> dict:
    """Run fine-tuning: ``finetune(FinetuneConfig(...))`` or ``finetune(task=..., images=..., labels=...,
    out=..., **options)`` (the fields of :class:`FinetuneConfig`). Returns the trainer's summary
    (status, step, checkpoint, best {metric, value, step, checkpoint}, curves...).
    SIGINT/SIGTERM (main thread) or ``cancel`` stop after the current step with ``seg_last.pt`` saved."""
    if config is None:
        config = FinetuneConfig(**options)
    elif options:
        raise TypeError("pass either a FinetuneConfig or keyword options, not both")
    return run_task(FinetuneTask(), config, callback=callback, cancel=cancel)


def run_cli(args) -> int:
    """Handler of ``gvsl finetune``."""
    from gvsl.progress import CancelToken
    config = FinetuneConfig(
        task=args.task, images=args.images, labels=args.labels, out=args.out, val_images=args.val_images,
        val_labels=args.val_labels, pretrained=args.pretrained, mode=args.mode, steps=args.steps,
        crop=args.crop, batch_size=args.batch_size, lr=args.lr, lr_schedule=args.lr_schedule, validate_every=args.val_every,
        save_every=args.save_every, preset=args.preset, spacing_mm=args.spacing,
        ignore_unknown_labels=args.ignore_unknown_labels, remap=args.remap, device=args.device,
        precision=args.precision, seed=args.seed, progress=args.progress, resume=args.resume, overwrite=args.overwrite,
        model_channels=list(args.model_channels) if getattr(args, "model_channels", None) else None)
    from gvsl.trainer import run_from_cli

    def done(sm: dict) -> str:
        best = sm.get("best") or {}
        return (f"fine-tuning done: {sm['step']} steps in {sm['seconds']} s on {sm['device']}; "
                f"best validation Dice {best.get('value', float('nan')):.4f} at step {best.get('step')}; "
                f"model {best.get('checkpoint', sm['checkpoint'])}")
    return run_from_cli(lambda: finetune(config, cancel=CancelToken(watch_file=getattr(args, "cancel_file", None))),
                        args.progress, "fine-tuning", done)
