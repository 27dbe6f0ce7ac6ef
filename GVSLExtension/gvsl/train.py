"""GVSL pre-training (Algorithm 1 of the paper): volumes in, a trained checkpoint out.

One step, for a batch of pairs (x_A, x_B) of two *different* volumes:

1. paired spatial augmentation (the same draw for x_A, t(x_A) and x_B, see :mod:`gvsl.augment`),
   appearance transformation t (pixel shuffling, Bezier intensity, in-painting) of x_A;
2. ``restored, warped_b, affine, flow = model(t(x_A), x_B)``;
3. loss = NCC_9(warped_b, x_A) + smoothness(flow) + MSE(restored, x_A); Adam, lr 1e-4.

Everything random (pair choice, crops, augmentation) comes from one ``torch.Generator`` per
rank whose state is checkpointed with the model, the optimizer and the step, so ``--resume``
continues exactly (same loss trajectory as an uninterrupted run on CPU). SIGINT/SIGTERM finish
the current step, save a checkpoint and exit. Under ``torchrun`` the model is wrapped in
DistributedDataParallel (gloo on CPU, NCCL on CUDA) and only rank 0 writes files.

Output folder: ``gvsl_last.pt`` (resumable, every ``save_every`` steps and at the end),
``gvsl_final.pt`` (at the end), ``history.json``, ``loss_curve.png``, ``config.json``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from gvsl import augment, checkpoint, losses
from gvsl.device import choose_precision, describe, select_device
from gvsl.errors import GVSLError
from gvsl.network import GVSL, ModelConfig
from gvsl.progress import CancelToken, Progress

LAST = "gvsl_last.pt"
FINAL = "gvsl_final.pt"
LOSS_TERMS = ("loss", "ncc", "smooth", "mse")


class TrainingError(GVSLError, ValueError):
    """A problem with the training inputs or state, with what to do about it."""


@dataclass
class PretrainConfig:
    """Options of ``gvsl pretrain`` (all saved in the checkpoint and config.json)."""

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

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------
# distributed helpers
# ----------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), select_device(device_name)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return info, device


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
# trainer
# ----------------------------------------------------------------------------------------
class Pretrainer:
    """Runs Algorithm 1; see the module docstring. ``run()`` returns a summary dict."""

    def __init__(self, config: PretrainConfig, callback: Optional[Callable[[dict], None]] = None,
                 cancel: Optional[CancelToken] = None, volumes: Optional[List[np.ndarray]] = None):
        self.config = config
        self.cancel = cancel or CancelToken()
        self.dist, self.device = _init_distributed(config.device)
        self.precision = choose_precision(self.device, "training", config.precision)
        self.out = Path(config.out)
        from gvsl.preprocessing import PreprocessSpec
        self.spec = PreprocessSpec(preset=config.preset, spacing_mm=config.spacing_mm)  # saved in checkpoints
        if config.steps < 1:
            raise TrainingError(f"--steps must be >= 1 (got {config.steps})")
        if config.batch_size < 1:
            raise TrainingError(f"--batch-size must be >= 1 (got {config.batch_size})")
        if config.crop < 16:
            raise TrainingError(f"--crop must be >= 16 voxels (got {config.crop}): the U-Net pools 4 times")
        mode = config.progress if self.dist.is_main else "none"
        self.progress = Progress(config.steps, mode=mode, callback=callback if self.dist.is_main else None,
                                 task="pretrain")
        self.volumes = volumes if volumes is not None else self._load_volumes()
        if len(self.volumes) < 2:
            raise TrainingError("need at least two volumes to make pairs of different scans; "
                                f"found {len(self.volumes)}")
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.dist.rank)
        torch.manual_seed(config.seed)
        self.model = self._build_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_grad_scaler)
        self.ncc = losses.NCCLoss()
        self.step = 0
        self.history = {"step": [], **{k: [] for k in LOSS_TERMS}}
        if config.resume:
            self._resume()
        self.ddp_model = self.model
        if self.dist.enabled:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- setup -------------------------------------------------------------------------------
    def _load_volumes(self) -> List[np.ndarray]:
        from gvsl import io
        cache = self.config.cache_dir or str(self.out / "cache")
        self.progress.event("loading", message=f"reading and preprocessing volumes ({self.config.preset} preset)")
        volumes, paths = io.load_volumes(self.config.images, self.spec, cache_dir=cache)
        self.volume_paths = [str(p) for p in paths]
        shapes = [v.shape for v in volumes]
        self.progress.event("loaded", n_volumes=len(volumes), shapes=[list(s) for s in shapes[:10]])
        return volumes

    def _build_model(self) -> GVSL:
        if self.config.init:
            model = checkpoint.load_model(self.config.init)
            model.train()
        else:
            channels = self.config.model_channels
            model = GVSL(ModelConfig(channels=tuple(channels)) if channels else None)
        return self.precision.prepare_model(model)

    def _checkpoint_payload(self) -> dict:
        gen_states = [self.generator.get_state()]
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, self.generator.get_state())
            gen_states = gathered
        rng = {"generators": gen_states, "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"optimizer": self.optimizer.state_dict(), "rng": rng, "history": self.history,
                "train_config": self.config.to_dict(), "scaler": self.scaler.state_dict(),
                "world_size": self.dist.world_size}

    def save(self, name: str = LAST) -> Optional[Path]:
        payload = self._checkpoint_payload()  # collective under DDP: every rank calls it
        if not self.dist.is_main:
            return None
        return checkpoint.save_checkpoint(
            self.out / name, self.model, step=self.step,
            preprocessing=self.spec, **payload)

    def _resume(self) -> None:
        path = self.out / LAST
        if not path.exists():
            raise TrainingError(f"--resume: no {LAST} in {self.out}; start without --resume "
                                "or point --out at the folder of the interrupted run")
        ckpt = checkpoint.load_checkpoint(path)
        if "optimizer" not in ckpt or "rng" not in ckpt:
            raise TrainingError(f"{path} holds weights only, not a resumable training state; "
                                "use it as --init instead")
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        gens = ckpt["rng"]["generators"]
        if len(gens) == self.dist.world_size:
            self.generator.set_state(gens[self.dist.rank])
        else:
            self.progress.event("warning", message=f"checkpoint was written by {len(gens)} process(es), "
                                f"now {self.dist.world_size}: data order is re-seeded")
            self.generator.manual_seed(self.config.seed * 1000 + self.dist.rank + int(ckpt["step"]))
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.step = int(ckpt["step"])
        self.history = {k: list(v) for k, v in ckpt.get("history", self.history).items()}
        self.progress = Progress(self.config.steps, mode=self.progress.mode, callback=self.progress.callback,
                                 task="pretrain", start_step=self.step)
        self.progress.event("resumed", step=self.step, checkpoint=str(path))

    # -- training ---------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimisation step on a fresh batch of pairs; returns the loss terms (floats)."""
        cfg = self.config
        x_a, x_b = sample_pairs(self.volumes, cfg.batch_size, cfg.crop, self.generator)
        x_a = self.precision.prepare_input(x_a)
        x_b = self.precision.prepare_input(x_b)
        if cfg.augment:
            x_a, t_x_a, x_b = augment.augment_pair(x_a, x_b, self.generator)
        else:
            t_x_a = x_a
        self.ddp_model.train()
        with self.precision.autocast():
            restored, warped_b, _, flow = self.ddp_model(t_x_a, x_b)
        w = cfg.loss_weights
        l_ncc = self.ncc(warped_b, x_a)
        l_smooth = losses.smoothness_loss(flow)
        l_mse = losses.restoration_loss(restored, x_a)
        loss = w["ncc"] * l_ncc + w["smooth"] * l_smooth + w["mse"] * l_mse
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {loss.item()} at step {self.step + 1}; lower --lr "
                                "or check the volumes (the last checkpoint is kept)")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {"loss": loss.item(), "ncc": l_ncc.item(), "smooth": l_smooth.item(), "mse": l_mse.item()}

    def _mean_over_ranks(self, terms: dict) -> dict:
        """Under DDP, the loss terms averaged over all ranks (what the step optimised)."""
        if not self.dist.enabled:
            return terms
        values = torch.tensor([terms[k] for k in LOSS_TERMS], dtype=torch.float64, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return {k: float(v) / self.dist.world_size for k, v in zip(LOSS_TERMS, values.tolist())}

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.cancel.cancelled else 0.0])
        if self.dist.enabled:
            flag = flag.to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def run(self) -> dict:
        cfg = self.config
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        self.progress.event("start", device=describe(self.device), precision=self.precision.name,
                            world_size=self.dist.world_size, step=self.step, steps=cfg.steps,
                            n_volumes=len(self.volumes))
        t0 = time.perf_counter()
        status = "done"
        while self.step < cfg.steps:
            if self._stop_requested():
                status = "cancelled"
                break
            terms = self._mean_over_ranks(self.train_step())
            self.step += 1
            self.history["step"].append(self.step)
            for k in LOSS_TERMS:
                self.history[k].append(terms[k])
            self.progress.update(self.step, lr=cfg.lr, **terms)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                path = self.save(LAST)
                self.progress.event("checkpoint", step=self.step, path=str(path))
        last = self.save(LAST)
        final = None
        if status == "done":
            final = self.save(FINAL)
        summary = {"status": status, "step": self.step, "steps": cfg.steps, "checkpoint": str(final or last),
                   "seconds": round(time.perf_counter() - t0, 2), "device": describe(self.device),
                   "precision": self.precision.name, "world_size": self.dist.world_size}
        if status == "cancelled":
            summary["stopped_by"] = self.cancel.reason or "request"
        if self.dist.is_main:
            summary.update(self._write_reports())
            self.progress.event(status, **summary)
        return summary

    def _write_reports(self) -> dict:
        checkpoint.atomic_write_text(self.out / "history.json", json.dumps(self.history))
        out = {"history": str(self.out / "history.json")}
        if self.history["step"]:
            from gvsl import pictures
            terms = {k: self.history[k] for k in LOSS_TERMS}
            pictures.loss_curve(terms, self.history["step"], self.out / "loss_curve.png",
                                title=f"GVSL pre-training ({self.config.preset}, crop {self.config.crop})")
            out["loss_curve"] = str(self.out / "loss_curve.png")
            for k in LOSS_TERMS:
                out[f"{k}_first"] = self.history[k][0]
                out[f"{k}_last"] = self.history[k][-1]
        return out


def pretrain(config: PretrainConfig, callback: Optional[Callable[[dict], None]] = None,
             cancel: Optional[CancelToken] = None, volumes: Optional[List[np.ndarray]] = None) -> dict:
    """Run pre-training; SIGINT/SIGTERM (main thread only) stop after the current step, saved.

    Rank 0 first checks and locks ``config.out`` (:class:`gvsl.outputs.RunFolder`: a finished or
    unfinished earlier run there needs ``resume`` or ``overwrite``; a second process is refused).
    """
    from gvsl.outputs import training_folder
    with training_folder(config, "pretrain"):
        return _pretrain(config, callback, cancel, volumes)


def _pretrain(config, callback, cancel, volumes) -> dict:
    cancel = cancel or CancelToken()
    previous = {}

    def handler(signum, _frame):
        cancel.cancel(signal.Signals(signum).name)

    import threading
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        trainer = Pretrainer(config, callback=callback, cancel=cancel, volumes=volumes)
        return trainer.run()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_cli(args) -> int:
    """Handler of ``gvsl pretrain``."""
    config = PretrainConfig(
        images=args.images, out=args.out, preset=args.preset, spacing_mm=args.spacing, steps=args.steps,
        batch_size=args.batch_size, crop=args.crop, lr=args.lr, device=args.device,
        precision=args.precision, seed=args.seed, save_every=args.save_every, progress=args.progress,
        resume=args.resume, init=args.init, augment=not args.no_augment, cache_dir=args.cache_dir,
        overwrite=args.overwrite)
    summary = pretrain(config)
    if int(os.environ.get("RANK", "0")) == 0 and args.progress != "json":
        if summary["status"] == "done":
            print(f"pre-training done: {summary['step']} steps in {summary['seconds']} s on {summary['device']}; "
                  f"loss {summary.get('loss_first', float('nan')):.4f} -> {summary.get('loss_last', float('nan')):.4f}; "
                  f"checkpoint {summary['checkpoint']}")
        else:
            print(f"pre-training stopped by {summary.get('stopped_by', 'request')} at step {summary['step']}; "
                  f"checkpoint saved to {summary['checkpoint']}; continue with --resume")
    if summary["status"] == "cancelled":
        return 130 if summary.get("stopped_by") == "SIGINT" else 143
    return 0
