"""The training core shared by every GVSL training task (pre-training, fine-tuning): one trainer,
many tasks.

A *task* says WHAT is trained (model, data, loss terms, checkpoint kind); the :class:`Trainer`
does the rest the same way for every task:

* distributed init under ``torchrun`` (gloo on CPU, NCCL on CUDA; the process group is destroyed
  by :meth:`Trainer.close` only if this trainer created it), DistributedDataParallel, rank-0-only
  files, collective cancel and collective non-finite-loss decision (every rank stops together
  with the same message, no rank is left waiting in an all-reduce);
* one ``torch.Generator`` per rank (``trainer.generator``; seed ``seed * 1000 + rank``), saved in
  the resumable checkpoint with the model, optimizer, GradScaler, torch/CUDA RNG, step, history
  and the task's own state, so ``resume`` continues bit-exactly (same losses and weights as an
  uninterrupted run on the CPU);
* ``resume``: the settings are taken from the checkpoint's saved config; a setting given now that
  differs from the saved one is refused naming the option as the user types it (only
  ``steps`` and ``lr`` may change: :func:`resolve_resume_config`);
* the step loop: Adam (trainable parameters only; rate ``config.lr * task.lr_factor(step, steps)``) + GradScaler (fp16), autocast, progress
  (:class:`gvsl.progress.Progress`: JSON lines / bar), cooperative cancel (:class:`CancelToken`;
  :func:`run_task` maps SIGINT/SIGTERM to it), history, atomic checkpoints, history.json and a
  loss-curve PNG (plus a validation-curve PNG when there is validation);
* optional validation every ``validate_every`` steps (rank 0, eval mode, no grad), its metrics in
  the history and the progress stream, and the best-by-metric checkpoint kept.

Files written in ``config.out`` (rank 0), with ``P = task.prefix``:
``P_last.pt`` (resumable: every ``save_every`` steps, on cancel and at the end), ``P_final.pt``
(weights + metadata only, no optimizer/RNG: about a third of the size), ``P_best.pt`` (weights +
metadata of the best validation, when ``task.best_metric`` is set), ``config.json``,
``history.json``, ``loss_curve.png``, ``validation_curve.png`` (when validating).

Writing a task (e.g. fine-tuning; :mod:`gvsl.train` is the pre-training task)::

    class FinetuneTask(TrainingTask):
        name, prefix, kind = "finetune", "seg", "segmentation"
        loss_terms = ("loss", "dice", "ce")      # floats logged every step; the FIRST is the total
        best_metric, best_mode = "dice_mean", "max"  # None: no best checkpoint

        def load_data(self, trainer):             # every rank; trainer.config is final here
            self.pairs = trainer.main_first(lambda: load_pairs(trainer.config))  # rank 0, then others
        def build_model(self, trainer):            # -> nn.Module on the CPU (the trainer moves it)
            return SegNet(...)
        def compute_losses(self, trainer, model):  # under autocast; sample with trainer.generator
            x, y = sample(self.pairs, trainer.config.batch_size, trainer.generator)
            x = trainer.precision.prepare_input(x)
            ...; return {"loss": dice + ce, "dice": dice, "ce": ce}   # 0-dim tensors
        def validate(self, trainer, model):        # rank 0 only, eval + no_grad + autocast
            return {"dice_mean": ..., "dice_LV": ...}  # floats; must NOT use trainer.generator
        def checkpoint_fields(self, trainer):      # saved in every checkpoint
            return {"kind": self.kind, "preprocessing": spec.to_dict(), "labels": table.to_dict()}
        # optional overrides:
        #  save_checkpoint(trainer, path, model, extra) -> Path and read_checkpoint(path) -> dict when
        #    the model is not a GVSL network for gvsl.checkpoint (write atomically:
        #    checkpoint.atomic_write; read with torch.load(weights_only=True)). ``extra`` holds
        #    history, train_config, world_size, best (+ optimizer, rng, scaler, task_state when
        #    resumable; + validation in P_best.pt); read_checkpoint must give back those keys plus
        #    "state_dict", "step", "kind" (and "model_config" for messages);
        #  state_dict()/load_state_dict(d): task state that resume must restore;
        #  parameters(model): what the optimizer trains (e.g. only out_conv in linear mode; frozen
        #    parameters need requires_grad=False, set in build_model);
        #  describe_data() -> dict for the "start" event; title(trainer) for the PNG titles.

    summary = run_task(FinetuneTask(...), config, callback=None, cancel=None)

Progress events (JSON lines): start, resumed, warning, step (with every loss term and lr),
validation (metrics, best), checkpoint, done / cancelled (the summary). ``run()``'s summary: status,
step, steps, checkpoint, seconds, device, precision, world_size, history, loss_curve, <term>_first,
<term>_last, best {metric, value, step, checkpoint}, stopped_by (cancelled only).

``config``: a dataclass with at least ``out, steps, batch_size, lr, device, precision, seed,
save_every, progress, resume`` (optional ``validate_every``: 0 = never) and ``to_dict()``; check
the common ones in ``__post_init__`` with :func:`check_common_settings`. Option names in messages
come from the class attribute ``OPTION_NAMES`` (field -> "--option"; default ``--field-name``).
User-fixable problems raise :class:`TrainingError`.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from gvsl import checkpoint, distributed
from gvsl.device import choose_precision, describe
from gvsl.distributed import DistInfo, init_distributed
from gvsl.errors import EnvironmentFault
from gvsl.progress import CancelToken, Progress
from gvsl.training_config import TrainingError, check_common_settings, option_name, resolve_resume_config

__all__ = ["DistInfo", "Trainer", "TrainingError", "TrainingTask", "check_common_settings", "init_distributed",
           "option_name", "resolve_resume_config", "run_task"]

# ----------------------------------------------------------------------------------------
# the task interface
# ----------------------------------------------------------------------------------------
class TrainingTask:
    """What a task provides; see the module docstring. Override the methods marked required."""

    name = "train"
    prefix = "model"
    kind = checkpoint.KIND_PRETRAIN
    loss_terms = ("loss",)
    best_metric: Optional[str] = None
    best_mode = "max"
    find_unused_parameters = False

    def load_data(self, trainer: "Trainer") -> None:  # required
        raise NotImplementedError

    def build_model(self, trainer: "Trainer") -> torch.nn.Module:  # required
        raise NotImplementedError

    def compute_losses(self, trainer: "Trainer", model: torch.nn.Module) -> Dict[str, torch.Tensor]:  # required
        raise NotImplementedError

    def validate(self, trainer: "Trainer", model: torch.nn.Module) -> Dict[str, float]:
        return {}

    def parameters(self, model: torch.nn.Module):
        return [p for p in model.parameters() if p.requires_grad]

    def lr_factor(self, step: int, steps: int) -> float:
        """Multiplier of ``config.lr`` for the step about to run (``step`` = steps done so far, of
        ``steps``); a function of the step only, so a resumed run gets the same rates."""
        return 1.0

    def checkpoint_fields(self, trainer: "Trainer") -> dict:
        return {"kind": self.kind}

    def save_checkpoint(self, trainer: "Trainer", path: Path, model: torch.nn.Module, extra: dict) -> Path:
        return checkpoint.save_checkpoint(path, model, step=trainer.step, **self.checkpoint_fields(trainer), **extra)

    def read_checkpoint(self, path: Path) -> dict:
        return checkpoint.load_checkpoint(path)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def title(self, trainer: "Trainer") -> str:
        return self.name

    def describe_data(self) -> dict:
        """Extra fields of the "start" progress event (e.g. the number of volumes)."""
        return {}


# ----------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------
class Trainer:
    """Runs ``task`` with ``config``; ``run()`` returns a summary dict. See the module docstring."""

    def __init__(self, task: TrainingTask, config, callback: Optional[Callable[[dict], None]] = None,
                 cancel: Optional[CancelToken] = None):
        self.task = task
        self.config = config
        self.cancel = cancel or CancelToken()
        self.out = Path(config.out)
        self.last_name, self.final_name, self.best_name = (f"{task.prefix}_{s}.pt" for s in ("last", "final", "best"))
        self.dist, self.device = init_distributed(config.device)
        try:
            self._setup(callback)
        except BaseException:
            self.close()
            raise

    def _setup(self, callback) -> None:
        task, is_main = self.task, self.dist.is_main
        self.callback = callback if is_main else None
        self.mode = self.config.progress if is_main else "none"
        self.progress = Progress(self.config.steps, mode=self.mode, callback=self.callback, task=task.name)
        self.precision = choose_precision(self.device, "training", self.config.precision)
        self.step = 0
        self.history = {"step": [], **{k: [] for k in task.loss_terms}}
        self.best: Optional[dict] = None  # {"metric", "value", "step"}
        resume_ckpt = self._read_resume_checkpoint() if self.config.resume else None
        task.load_data(self)
        self.generator = torch.Generator().manual_seed(self.config.seed * 1000 + self.dist.rank)
        torch.manual_seed(self.config.seed)
        self.model = self.precision.prepare_model(task.build_model(self))
        self.optimizer = torch.optim.Adam(task.parameters(self.model), lr=self.config.lr)
        self.lr = self.config.lr  # this step's rate: config.lr * task.lr_factor(step, steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_grad_scaler)
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        self.ddp_model = self.model
        if self.dist.enabled:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=task.find_unused_parameters)

    def close(self) -> None:
        """Destroy the process group if (and only if) this trainer created it."""
        if self.dist.created_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.dist.created_group = False

    # -- collectives (see gvsl.distributed) --------------------------------------------------
    def main_first(self, fn: Callable[[], object]):
        """``fn()`` on rank 0 first (e.g. preprocess and write a cache), then on the other ranks
        (which read the cache); an error on any rank is raised on every rank."""
        return distributed.main_first(self.dist, self.device, fn)

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Every rank learns every rank's loss (one all-reduce), so all stop together."""
        values = distributed.per_rank(self.dist, self.device, float(loss.detach()))
        bad = [(r, v) for r, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            where = "" if not self.dist.enabled else \
                f" on rank {', '.join(str(r) for r, _ in bad)} of {self.dist.world_size}"
            raise TrainingError(
                f"the loss became {bad[0][1]} at step {self.step + 1}{where}; training stopped on every rank. "
                f"Lower --lr or check the volumes; the last checkpoint ({self.last_name}, step "
                f"{self._last_saved_step}) is kept and --resume continues from it", collective=True)

    # -- resume -----------------------------------------------------------------------------
    def _read_resume_checkpoint(self) -> dict:
        path = self.out / self.last_name
        if not path.exists():
            raise TrainingError(f"--resume: no {self.last_name} in {self.out}; start without --resume "
                                "or point --out at the folder of the interrupted run")
        try:
            ckpt = self.task.read_checkpoint(path)
        except checkpoint.CheckpointError as exc:
            raise TrainingError(f"--resume: {exc}") from None
        if "optimizer" not in ckpt or "rng" not in ckpt or "train_config" not in ckpt:
            raise TrainingError(f"{path} holds weights only, not a resumable training state; "
                                "use it as --init instead")
        if ckpt.get("kind", self.task.kind) != self.task.kind:
            raise TrainingError(f"--resume: {path} is a '{ckpt.get('kind')}' checkpoint, this is a "
                                f"'{self.task.kind}' run; use another --out folder")
        self.config = resolve_resume_config(self.config, ckpt["train_config"], int(ckpt["step"]),
                                            warn=lambda m: self.progress.event("warning", message=m))
        self.progress = Progress(self.config.steps, mode=self.mode, callback=self.callback,
                                 task=self.task.name, start_step=int(ckpt["step"]))
        ckpt["_path"] = str(path)
        return ckpt

    def _restore(self, ckpt: dict) -> None:
        try:
            self.model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            saved = ckpt.get("model_config", {}).get("channels")
            raise TrainingError(
                f"--resume: {ckpt['_path']} holds a different network (channels {saved}) than this run builds; "
                f"resume with the interrupted run's settings or use another --out folder "
                f"({str(exc).splitlines()[0][:160]})") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr  # --lr may change on resume
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
        self.task.load_state_dict(ckpt.get("task_state") or {})
        self.step = int(ckpt["step"])
        self.history = {k: list(v) for k, v in ckpt.get("history", self.history).items()}
        self.best = ckpt.get("best")
        self.progress.event("resumed", step=self.step, checkpoint=ckpt["_path"])

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, name: str, resumable: bool = True, **more) -> Optional[Path]:
        """Write ``name`` in ``out`` (rank 0; the path is returned on every rank). Resumable:
        + optimizer, RNG, scaler, task state; otherwise weights + metadata only. Collective under
        DDP: every rank must call it. An OSError (disk full, permissions) becomes one
        :class:`TrainingError` on every rank; the atomic writer leaves the old file in place."""
        extra = {"history": self.history, "train_config": self.config.to_dict(),
                 "world_size": self.dist.world_size, "best": self.best, **more}
        if resumable:
            gen_states = distributed.gather_objects(self.dist, self.generator.get_state())
            rng = {"generators": gen_states, "torch": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            extra.update(optimizer=self.optimizer.state_dict(), rng=rng, scaler=self.scaler.state_dict(),
                         task_state=self.task.state_dict())
        target = self.out / name

        def write() -> str:  # rank 0; a failed write is raised on every rank (none left waiting)
            try:
                return str(self.task.save_checkpoint(self, target, self.model, extra))
            except EnvironmentFault as exc:  # the verified writer's "disk full: nothing replaced"
                error = TrainingError(str(exc), collective=True)
                error.exit_code = exc.exit_code  # an environment fault: exit code 1
                raise error from None
            except OSError as exc:
                error = TrainingError(
                    f"could not write {target}: {exc.strerror or exc} (disk full or not writable?); "
                    f"nothing was replaced: the previous {name} (if any) is intact", collective=True)
                error.exit_code = 1
                raise error from None

        path = Path(distributed.on_rank0_shared(self.dist, self.device, write))
        if resumable:
            self._last_saved_step = self.step
        return path

    _last_saved_step = 0

    # -- validation -------------------------------------------------------------------------
    def _validate(self) -> dict:
        def run():
            self.model.eval()
            try:
                with torch.no_grad(), self.precision.autocast():
                    return {k: float(v) for k, v in self.task.validate(self, self.model).items()}
            finally:
                self.model.train()
        metrics = distributed.on_rank0_shared(self.dist, self.device, run)
        if not metrics:
            return {}
        self.history.setdefault("val_step", []).append(self.step)
        for k, v in metrics.items():
            self.history.setdefault(f"val_{k}", []).append(v)
        record = dict(metrics)
        metric = self.task.best_metric
        if metric is not None and metric in metrics and math.isfinite(metrics[metric]):
            value = metrics[metric]
            better = self.best is None or (value > self.best["value"] if self.task.best_mode == "max"
                                           else value < self.best["value"])
            if better:
                self.best = {"metric": metric, "value": value, "step": self.step}
                path = self.save(self.best_name, resumable=False, validation=metrics)
                record["best_checkpoint"] = str(path) if path else None
            record["best"] = self.best
        self.progress.event("validation", step=self.step, **record)
        return metrics

    # -- the loop ---------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimisation step; returns this rank's loss terms (floats)."""
        self.ddp_model.train()
        with self.precision.autocast():
            terms = self.task.compute_losses(self, self.ddp_model)
        loss = terms["loss"]
        self._check_finite(loss)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return {k: float(terms[k].detach()) for k in self.task.loss_terms}

    def run(self) -> dict:
        cfg, task = self.config, self.task
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        self.progress.event("start", device=describe(self.device), precision=self.precision.name,
                            world_size=self.dist.world_size, step=self.step, steps=cfg.steps,
                            **self.task.describe_data())
        t0 = time.perf_counter()
        status = "done"
        validate_every = int(getattr(cfg, "validate_every", 0) or 0)
        while self.step < cfg.steps:
            if distributed.any_rank(self.dist, self.device, self.cancel.cancelled):
                status = "cancelled"
                break
            self.lr = cfg.lr * float(task.lr_factor(self.step, cfg.steps))
            terms = distributed.mean_over_ranks(self.dist, self.device, self.train_step())
            self.step += 1
            self.history["step"].append(self.step)
            for k in task.loss_terms:
                self.history[k].append(terms[k])
            self.progress.update(self.step, lr=self.lr, **terms)
            if validate_every and self.step % validate_every == 0:  # multiples only: resume stays exact
                self._validate()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                path = self.save(self.last_name)
                self.progress.event("checkpoint", step=self.step, path=str(path))
        last = self.save(self.last_name)
        final = self.save(self.final_name, resumable=False) if status == "done" else None
        summary = {"status": status, "step": self.step, "steps": cfg.steps, "checkpoint": str(final or last),
                   "seconds": round(time.perf_counter() - t0, 2), "device": describe(self.device),
                   "precision": self.precision.name, "world_size": self.dist.world_size}
        if self.best is not None:
            summary["best"] = dict(self.best, checkpoint=str(self.out / self.best_name))
        if status == "cancelled":
            summary["stopped_by"] = self.cancel.reason or "request"
        if self.dist.is_main:
            summary.update(self._write_reports())
            self.progress.event(status, **summary)
        return summary

    def _write_reports(self) -> dict:
        checkpoint.atomic_write_text(self.out / "history.json", json.dumps(self.history))
        out = {"history": str(self.out / "history.json")}
        if not self.history["step"]:
            return out
        from gvsl import pictures
        title = self.task.title(self)
        terms = {k: self.history[k] for k in self.task.loss_terms}
        pictures.loss_curve(terms, self.history["step"], self.out / "loss_curve.png", title=title)
        out["loss_curve"] = str(self.out / "loss_curve.png")
        for k in self.task.loss_terms:
            out[f"{k}_first"] = self.history[k][0]
            out[f"{k}_last"] = self.history[k][-1]
        val = {k[4:]: v for k, v in self.history.items() if k.startswith("val_") and k != "val_step"}
        if val:
            pictures.loss_curve(val, self.history["val_step"], self.out / "validation_curve.png",
                                title=f"{title}: validation")
            out["validation_curve"] = str(self.out / "validation_curve.png")
        return out


def run_task(task: TrainingTask, config, callback: Optional[Callable[[dict], None]] = None,
             cancel: Optional[CancelToken] = None) -> dict:
    """Build a :class:`Trainer`, run it, close it. SIGINT/SIGTERM (main thread only) set the
    cancel token: the current step finishes, ``P_last.pt`` is saved, the summary says
    ``status: cancelled`` and ``stopped_by``."""
    from gvsl.progress import cancel_on_signals
    cancel = cancel or CancelToken()
    trainer = None
    from gvsl.outputs import training_folder, training_results
    try:
        # rank 0 checks and locks config.out first (an earlier run there needs resume/overwrite)
        with cancel_on_signals(cancel), training_folder(config, task.name, training_results(task.prefix)):
            trainer = Trainer(task, config, callback=callback, cancel=cancel)
            return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()


def run_from_cli(start, progress: str, what: str, done_line) -> int:
    """The end of every training command (``gvsl pretrain``, ``gvsl finetune``): run ``start()``
    -> summary; a collective error is printed once (rank 0: the other ranks exit quietly); rank 0
    prints ``done_line(summary)`` or where the stopped run can resume; exit 0, or 130/143 for a
    run stopped by SIGINT/SIGTERM (or a cancel request)."""
    import os
    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = start()
    except TrainingError as exc:
        if rank != 0 and exc.collective:
            return exc.exit_code  # every rank raised it together: rank 0 prints the one message
        raise
    if rank == 0 and progress != "json":
        if summary["status"] == "done":
            print(done_line(summary))
        else:
            print(f"{what} stopped by {summary.get('stopped_by', 'request')} at step {summary['step']}; "
                  f"checkpoint saved to {summary['checkpoint']}; continue with --resume")
    if summary["status"] == "cancelled":
        return 130 if summary.get("stopped_by") == "SIGINT" else 143
    return 0
