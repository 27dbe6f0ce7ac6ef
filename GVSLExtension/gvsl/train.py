"""GVSL pre-training (Algorithm 1 of the paper): volumes in, a trained checkpoint out.

The pre-training *task* on the shared training core (:mod:`gvsl.trainer`: distributed init,
exact resume, signals, progress, checkpoints, history and loss curve). One step, for a batch of
pairs (x_A, x_B) of two *different* volumes (published ``Train_GVSL.py``, ``train_iterator``):

1. paired spatial augmentation (the same draw for x_A, t(x_A) and x_B, see :mod:`gvsl.augment`),
   appearance transformation t (pixel shuffling, Bezier intensity, in-painting) of x_A;
2. ``restored, warped_b, affine, flow = model(t(x_A), x_B)``;
3. loss = NCC_9(warped_b, clean x_A) + smoothness(flow) + MSE(restored, clean x_A); Adam, lr 1e-4
   (:func:`algorithm1_losses`).

Output folder: ``gvsl_last.pt`` (resumable, every ``save_every`` steps and at the end),
``gvsl_final.pt`` (weights + metadata only, at the end), ``history.json``, ``loss_curve.png``,
``config.json``. ``resume`` takes the settings from ``gvsl_last.pt`` and refuses a change other
than ``--steps``/``--lr``. Under ``torchrun`` rank 0 reads, preprocesses and caches the volumes,
then the other ranks read the cache.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Dict, List, Optional

import numpy as np
import torch

from gvsl import augment, checkpoint, losses
from gvsl.network import GVSL, ModelConfig
from gvsl.progress import CancelToken
from gvsl.trainer import Trainer, TrainingError, TrainingTask, check_common_settings, run_from_cli, run_task

__all__ = ["PretrainConfig", "PretrainTask", "Pretrainer", "TrainingError", "algorithm1_losses",
           "crop_or_pad", "pretrain", "run_cli", "sample_pairs"]

LAST = "gvsl_last.pt"
FINAL = "gvsl_final.pt"
LOSS_TERMS = ("loss", "ncc", "smooth", "mse")
MAX_CROP = 512  # a 512^3 float32 crop pair is 1 GB before the network: beyond is a typo


@dataclass
class PretrainConfig:
    """Options of ``gvsl pretrain`` (all saved in the checkpoint and config.json).

    Checked on construction (:class:`TrainingError` naming the option as typed on the command line).
    """

    OPTION_NAMES: ClassVar[Dict[str, str]] = {"spacing_mm": "--spacing", "augment": "--no-augment",
                                               "model_channels": "model_channels (network width)",
                                               "loss_weights": "loss_weights"}

    images: List[str]
    out: str
    preset: str = "ct"
    spacing_mm: float = 1.0
    steps: int = 1000
    batch_size: int = 2
    crop: int = 128
    lr: float = 1e-4
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    save_every: int = 500
    progress: str = "bar"
    resume: bool = False
    init: Optional[str] = None
    augment: bool = True
    cache_dir: Optional[str] = None
    overwrite: bool = False  # replace an earlier run in `out` (gvsl.outputs.RunFolder)
    model_channels: Optional[List[int]] = None  # None: the published 32-64-128-256-512-... U-Net
    loss_weights: dict = field(default_factory=lambda: {"ncc": 1.0, "smooth": 1.0, "mse": 1.0})

    def __post_init__(self):
        # absolute paths: a resumed run from another working folder names the same files
        self.images = [str(Path(p).expanduser().absolute()) for p in self.images]
        check_common_settings(self)
        if isinstance(self.crop, bool) or not isinstance(self.crop, int) or not 16 <= self.crop <= MAX_CROP:
            raise TrainingError(f"--crop must be an integer from 16 to {MAX_CROP} voxels (got {self.crop!r}): "
                                "the U-Net pools 4 times")
        if not isinstance(self.spacing_mm, (int, float)) or not math.isfinite(self.spacing_mm) \
                or self.spacing_mm <= 0:
            raise TrainingError(f"--spacing must be a finite number of mm > 0 (got {self.spacing_mm!r})")
        if self.preset not in ("ct", "mr"):
            raise TrainingError(f"--preset must be ct or mr (got {self.preset!r})")
        if set(self.loss_weights) != {"ncc", "smooth", "mse"} or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in self.loss_weights.values()):
            raise TrainingError(f"loss_weights must give finite weights >= 0 for ncc, smooth and mse "
                                f"(got {self.loss_weights!r})")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------
# data: pairs of different volumes, random crops
# ----------------------------------------------------------------------------------------
def crop_or_pad(volume: np.ndarray, crop: int, rel: torch.Tensor) -> np.ndarray:
    """A ``crop``^3 block of ``volume`` (z, y, x) starting at ``rel`` (3 fractions in [0, 1]) of
    the free range per axis; axes shorter than ``crop`` are zero-padded (centred)."""
    out = np.zeros((crop, crop, crop), dtype=np.float32)
    src, dst = [], []
    for axis, size in enumerate(volume.shape):
        if size >= crop:
            start = int(math.floor(float(rel[axis]) * (size - crop)))
            src.append(slice(start, start + crop))
            dst.append(slice(0, crop))
        else:
            before = (crop - size) // 2
            src.append(slice(0, size))
            dst.append(slice(before, before + size))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def sample_pairs(volumes: List[np.ndarray], batch: int, crop: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_A, x_B), each (batch, 1, crop, crop, crop): crops of two different volumes.

    The crop starts at the same *relative* position in both volumes, so the pair shows roughly
    corresponding anatomy, as a registration pair should.
    """
    n = len(volumes)
    a_list, b_list = [], []
    for _ in range(batch):
        i = int(torch.randint(n, (1,), generator=generator))
        j = int(torch.randint(n - 1, (1,), generator=generator))
        j = j + 1 if j >= i else j
        rel = torch.rand(3, generator=generator)
        a_list.append(crop_or_pad(volumes[i], crop, rel))
        b_list.append(crop_or_pad(volumes[j], crop, rel))
    to_t = lambda arrs: torch.from_numpy(np.stack(arrs)[:, None])  # noqa: E731
    return to_t(a_list), to_t(b_list)


# ----------------------------------------------------------------------------------------
# Algorithm 1
# ----------------------------------------------------------------------------------------
def algorithm1_losses(model, x_a: torch.Tensor, t_x_a: torch.Tensor, x_b: torch.Tensor, ncc: torch.nn.Module,
                      weights: Dict[str, float]) -> Dict[str, torch.Tensor]:
    """The published ``train_iterator``: ``model(t(x_A), x_B)``, NCC(warped x_B, clean x_A),
    MSE(restored, clean x_A), smoothness(flow); inputs (B, 1, D, H, W). Returns 0-dim tensors
    ``loss`` (the weighted sum), ``ncc``, ``smooth``, ``mse``."""
    restored, warped_b, _, flow = model(t_x_a, x_b)
    l_ncc = ncc(warped_b, x_a)
    l_smooth = losses.smoothness_loss(flow)
    l_mse = losses.restoration_loss(restored, x_a)
    loss = weights["ncc"] * l_ncc + weights["smooth"] * l_smooth + weights["mse"] * l_mse
    return {"loss": loss, "ncc": l_ncc, "smooth": l_smooth, "mse": l_mse}


def pretrain_spec(cfg: "PretrainConfig"):
    """The :class:`gvsl.preprocessing.PreprocessSpec` of a pre-training run (saved in its checkpoints)."""
    from gvsl.preprocessing import PreprocessSpec
    return PreprocessSpec(preset=cfg.preset, spacing_mm=cfg.spacing_mm)


class PretrainTask(TrainingTask):
    """GVSL pre-training on the shared trainer (see :mod:`gvsl.trainer`)."""

    name = "pretrain"
    prefix = "gvsl"
    kind = checkpoint.KIND_PRETRAIN
    loss_terms = LOSS_TERMS

    def __init__(self, volumes: Optional[List[np.ndarray]] = None):
        self.volumes = volumes
        self.volume_paths: List[str] = []
        self.ncc = losses.NCCLoss()

    def load_data(self, trainer: Trainer) -> None:
        if self.volumes is None:
            self.volumes = trainer.main_first(lambda: self._read_volumes(trainer))
        if len(self.volumes) < 2:
            raise TrainingError("need at least two volumes to make pairs of different scans; "
                                f"found {len(self.volumes)}")

    def _read_volumes(self, trainer: Trainer) -> List[np.ndarray]:
        from gvsl import io
        cfg = trainer.config
        trainer.progress.event("loading", message=f"reading and preprocessing volumes ({cfg.preset} preset)")
        volumes, paths = io.load_volumes(cfg.images, pretrain_spec(cfg),
                                         cache_dir=cfg.cache_dir or str(Path(cfg.out) / "cache"))
        self.volume_paths = [str(p) for p in paths]
        trainer.progress.event("loaded", n_volumes=len(volumes), shapes=[list(v.shape) for v in volumes[:10]])
        return volumes

    def describe_data(self) -> dict:
        return {"n_volumes": len(self.volumes)}

    def build_model(self, trainer: Trainer) -> GVSL:
        cfg = trainer.config
        if cfg.init:
            try:
                model = checkpoint.load_model(cfg.init)
            except checkpoint.CheckpointError as exc:
                raise TrainingError(f"--init: {exc}") from None
            return model.train()
        return GVSL(ModelConfig(channels=tuple(cfg.model_channels)) if cfg.model_channels else None)

    def compute_losses(self, trainer: Trainer, model) -> Dict[str, torch.Tensor]:
        cfg = trainer.config
        x_a, x_b = sample_pairs(self.volumes, cfg.batch_size, cfg.crop, trainer.generator)
        x_a = trainer.precision.prepare_input(x_a)
        x_b = trainer.precision.prepare_input(x_b)
        if cfg.augment:
            x_a, t_x_a, x_b = augment.augment_pair(x_a, x_b, trainer.generator)
        else:
            t_x_a = x_a
        return algorithm1_losses(model, x_a, t_x_a, x_b, self.ncc, cfg.loss_weights)

    def checkpoint_fields(self, trainer: Trainer) -> dict:
        cfg = trainer.config
        return {"kind": self.kind, "preprocessing": pretrain_spec(cfg).to_dict()}

    def title(self, trainer: Trainer) -> str:
        return f"GVSL pre-training ({trainer.config.preset}, crop {trainer.config.crop})"


class Pretrainer(Trainer):
    """The :class:`~gvsl.trainer.Trainer` running :class:`PretrainTask`; ``run()`` -> summary dict.
    (Construct it directly only from scripts that handle signals and call ``close()``
    themselves; :func:`pretrain` does both.)"""

    def __init__(self, config: PretrainConfig, callback: Optional[Callable[[dict], None]] = None,
                 cancel: Optional[CancelToken] = None, volumes: Optional[List[np.ndarray]] = None):
        super().__init__(PretrainTask(volumes), config, callback=callback, cancel=cancel)

    @property
    def volumes(self) -> List[np.ndarray]:
        return self.task.volumes


def pretrain(config: PretrainConfig, callback: Optional[Callable[[dict], None]] = None,
             cancel: Optional[CancelToken] = None, volumes: Optional[List[np.ndarray]] = None) -> dict:
    """Run pre-training; SIGINT/SIGTERM (main thread only) stop after the current step, saved."""
    return run_task(PretrainTask(volumes), config, callback=callback, cancel=cancel)


def run_cli(args) -> int:
    """Handler of ``gvsl pretrain``."""
    config = PretrainConfig(
        images=args.images, out=args.out, preset=args.preset, spacing_mm=args.spacing, steps=args.steps,
        batch_size=args.batch_size, crop=args.crop, lr=args.lr, device=args.device,
        precision=args.precision, seed=args.seed, save_every=args.save_every, progress=args.progress,
        resume=args.resume, init=args.init, augment=not args.no_augment, cache_dir=args.cache_dir,
        overwrite=args.overwrite, model_channels=getattr(args, "model_channels", None))
    return run_from_cli(
        lambda: pretrain(config, cancel=CancelToken(watch_file=getattr(args, "cancel_file", None))),
        args.progress, "pre-training",
        lambda sm: (f"pre-training done: {sm['step']} steps in {sm['seconds']} s on {sm['device']}; "
                    f"loss {sm.get('loss_first', float('nan')):.4f} -> {sm.get('loss_last', float('nan')):.4f}; "
                    f"checkpoint {sm['checkpoint']}"))
