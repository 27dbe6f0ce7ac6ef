"""The training core (gvsl.trainer) with a toy task: validation and the best checkpoint, exact
resume, cancel, the resume settings rule, option checks, and process-group ownership.

The toy task is also the smallest example of the task API (its own checkpoint format through
``save_checkpoint``/``read_checkpoint``, as a non-GVSL model such as a segmentation net would)."""
import json
import math
from dataclasses import asdict, dataclass

import pytest
import torch
import torch.distributed as dist

from gvsl import checkpoint
from gvsl.progress import CancelToken
from gvsl.trainer import (Trainer, TrainingError, TrainingTask, check_common_settings, resolve_resume_config,
                          run_task)


@dataclass
class ToyConfig:
    OPTION_NAMES = {"width": "--width"}
    out: str
    steps: int = 20  # the tests pass steps=10: a value equal to the default counts as 'not given' on resume
    batch_size: int = 4
    lr: float = 0.3
    device: str = "cpu"
    precision: str = "fp32"
    seed: int = 0
    save_every: int = 0
    progress: str = "none"
    resume: bool = False
    validate_every: int = 2
    width: int = 4

    def __post_init__(self):
        check_common_settings(self)

    def to_dict(self):
        return asdict(self)


SCORES = {2: 0.3, 4: 0.7, 6: 0.5, 8: 0.6, 10: 0.65}  # scripted validation: the best is at step 4


class ToyTask(TrainingTask):
    """Linear regression y = x @ w_true with batches drawn from trainer.generator."""

    name, prefix, kind = "toy", "toy", "toy"
    loss_terms = ("loss", "mse")
    best_metric, best_mode = "score", "max"

    def load_data(self, trainer):
        self.w_true = torch.randn(trainer.config.width, 1, generator=torch.Generator().manual_seed(0))

    def build_model(self, trainer):
        return torch.nn.Linear(trainer.config.width, 1)

    def compute_losses(self, trainer, model):
        x = torch.randn(trainer.config.batch_size, trainer.config.width, generator=trainer.generator)
        mse = ((model(x) - x @ self.w_true) ** 2).mean()
        return {"loss": mse, "mse": mse}

    def validate(self, trainer, model):
        assert not model.training and not torch.is_grad_enabled()
        return {"score": SCORES.get(trainer.step, 0.0), "weight_norm": float(model.weight.norm())}

    def save_checkpoint(self, trainer, path, model, extra):
        payload = {"kind": self.kind, "step": trainer.step, "state_dict": model.state_dict(), **extra}
        return checkpoint.atomic_write(path, lambda tmp: torch.save(payload, tmp))

    def read_checkpoint(self, path):
        return torch.load(path, map_location="cpu", weights_only=True)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_validation_history_and_the_best_checkpoint(tmp_path):
    records = []
    summary = run_task(ToyTask(), ToyConfig(out=str(tmp_path), steps=10), callback=records.append)
    assert summary["status"] == "done" and summary["step"] == 10
    assert summary["best"]["step"] == 4 and summary["best"]["value"] == 0.7
    best = load(tmp_path / "toy_best.pt")
    assert best["step"] == 4 and best["validation"]["score"] == 0.7
    assert "optimizer" not in best and "rng" not in best
    final, last = load(tmp_path / "toy_final.pt"), load(tmp_path / "toy_last.pt")
    assert "optimizer" not in final and "rng" not in final and final["step"] == 10
    assert "optimizer" in last and "rng" in last
    hist = json.loads((tmp_path / "history.json").read_text())
    assert hist["val_step"] == [2, 4, 6, 8, 10] and hist["val_score"] == [SCORES[s] for s in hist["val_step"]]
    assert sum(hist["mse"][-3:]) < 0.5 * sum(hist["mse"][:3])  # it trains
    val_events = [r for r in records if r["event"] == "validation"]
    assert [r["step"] for r in val_events] == [2, 4, 6, 8, 10]
    assert [r["best"]["step"] for r in val_events] == [2, 4, 4, 4, 4]
    assert "best_checkpoint" in val_events[1] and "best_checkpoint" not in val_events[2]
    for name in ("loss_curve.png", "validation_curve.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "config.json").read_text())["validate_every"] == 2


def test_resume_is_exact_and_keeps_the_best(tmp_path):
    straight = Trainer(ToyTask(), ToyConfig(out=str(tmp_path / "a"), steps=10))
    straight.run()
    first = Trainer(ToyTask(), ToyConfig(out=str(tmp_path / "b"), steps=5))
    first.run()
    resumed = Trainer(ToyTask(), ToyConfig(out=str(tmp_path / "b"), steps=10, resume=True))
    assert resumed.step == 5 and resumed.best["step"] == 4
    resumed.run()
    assert resumed.history == straight.history
    assert resumed.best == straight.best
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_cancel_saves_a_resumable_checkpoint(tmp_path):
    cancel = CancelToken()

    def stop_at_3(record):
        if record["event"] == "step" and record["step"] == 3:
            cancel.cancel("test")

    summary = run_task(ToyTask(), ToyConfig(out=str(tmp_path), steps=10), callback=stop_at_3, cancel=cancel)
    assert summary["status"] == "cancelled" and summary["stopped_by"] == "test" and summary["step"] == 3
    assert load(tmp_path / "toy_last.pt")["step"] == 3 and not (tmp_path / "toy_final.pt").exists()
    summary = run_task(ToyTask(), ToyConfig(out=str(tmp_path), resume=True))  # steps=10 from the checkpoint
    assert summary["status"] == "done" and summary["step"] == 10


def test_resume_settings_come_from_the_checkpoint(tmp_path):
    saved = ToyConfig(out="x", steps=40, batch_size=8, lr=0.01, width=6).to_dict()
    # not given now (defaults): the saved values, steps and lr included
    resolved = resolve_resume_config(ToyConfig(out="y", resume=True), saved, done_steps=5)
    assert (resolved.steps, resolved.batch_size, resolved.lr, resolved.width) == (40, 8, 0.01, 6)
    assert resolved.out == "y" and resolved.resume
    # steps and lr may change (with a warning)
    warnings = []
    resolved = resolve_resume_config(ToyConfig(out="y", steps=30, lr=0.002), saved, 5, warn=warnings.append)
    assert (resolved.steps, resolved.lr) == (30, 0.002) and len(warnings) == 1 and "--lr" in warnings[0]
    # anything else is refused, naming the option as typed
    with pytest.raises(TrainingError, match=r"--batch-size was 8 in the interrupted run, now 2"):
        resolve_resume_config(ToyConfig(out="y", batch_size=2), saved, 5)
    with pytest.raises(TrainingError, match="--width"):
        resolve_resume_config(ToyConfig(out="y", width=5), saved, 5)
    with pytest.raises(TrainingError, match="--steps 5 or more"):
        resolve_resume_config(ToyConfig(out="y", steps=3), saved, 5)


def test_resume_refusals_through_the_trainer(tmp_path):
    run_task(ToyTask(), ToyConfig(out=str(tmp_path), steps=3, validate_every=0))
    with pytest.raises(TrainingError, match="--width was 4 in the interrupted run, now 3"):
        Trainer(ToyTask(), ToyConfig(out=str(tmp_path), steps=6, width=3, resume=True))
    # a weights-only file is not resumable
    (tmp_path / "toy_last.pt").write_bytes((tmp_path / "toy_final.pt").read_bytes())
    with pytest.raises(TrainingError, match="weights only"):
        Trainer(ToyTask(), ToyConfig(out=str(tmp_path), steps=6, resume=True))


@pytest.mark.parametrize("field, value, option", [
    ("lr", -1.0, "--lr"), ("lr", math.nan, "--lr"), ("lr", math.inf, "--lr"), ("lr", 0.0, "--lr"),
    ("lr", 5.0, "--lr"), ("steps", 0, "--steps"), ("steps", 2.5, "--steps"), ("batch_size", 0, "--batch-size"),
    ("save_every", -1, "--save-every"), ("seed", -3, "--seed"), ("validate_every", -1, "--validate-every"),
    ("progress", "loud", "--progress")])
def test_bad_common_settings_name_the_option(tmp_path, field, value, option):
    with pytest.raises(TrainingError, match=option):
        ToyConfig(out=str(tmp_path), **{field: value})


def test_a_process_group_the_trainer_did_not_create_survives(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        summary = run_task(ToyTask(), ToyConfig(out=str(tmp_path / "run"), steps=2))
        assert summary["status"] == "done"
        assert dist.is_initialized()  # the caller's group is the caller's to destroy
    finally:
        dist.destroy_process_group()


def test_disk_full_while_saving_is_one_clear_error_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    import errno
    original_save = torch.save
    saves = []

    def save_then_fail(obj, f, *args, **kwargs):
        saves.append(str(f))
        if len(saves) >= 2:  # the second checkpoint write meets a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return original_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(TrainingError, match=r"disk full: nothing replaced: writing .*toy_last.pt .*previous content") as info:
        run_task(ToyTask(), ToyConfig(out=str(tmp_path), steps=6, save_every=2, validate_every=0))
    assert info.value.exit_code == 1 and info.value.collective  # an environment fault, decided on every rank
    monkeypatch.setattr(torch, "save", original_save)
    assert load(tmp_path / "toy_last.pt")["step"] == 2  # the first save, unharmed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left
    summary = run_task(ToyTask(), ToyConfig(out=str(tmp_path), steps=6, save_every=2, validate_every=0, resume=True))
    assert summary["status"] == "done" and summary["step"] == 6
