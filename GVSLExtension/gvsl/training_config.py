"""Training settings shared by every training task: validation of the common options, the
rule for ``--resume`` (settings come from the checkpoint; only ``--steps``/``--lr`` may change),
option names as the user types them, and :class:`TrainingError`.

A task's config is a dataclass; its class attribute ``OPTION_NAMES`` maps field names to the
command-line spelling (``{"spacing_mm": "--spacing"}``); other fields read ``--field-name``.
"""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, fields, replace
from typing import Callable

from gvsl.errors import GVSLError

CHANGEABLE_ON_RESUME = ("steps", "lr")
# not training settings: where/how to run and report; free to differ on resume
IGNORED_ON_RESUME = ("resume", "progress", "out", "device", "cache_dir", "overwrite", "cancel_file")


class TrainingError(GVSLError, ValueError):
    """A problem with the training inputs, settings or state, with what to do about it.

    ``collective``: True when every rank raised the same error together (a CLI under torchrun
    prints it on rank 0 only)."""

    def __init__(self, message: str, collective: bool = False):
        super().__init__(message)
        self.collective = collective


# ----------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------
def option_name(config, name: str) -> str:
    """How the user types setting ``name`` (``--crop``, ``--spacing``): ``config.OPTION_NAMES``."""
    return getattr(config, "OPTION_NAMES", {}).get(name, "--" + name.replace("_", "-"))


def check_common_settings(config) -> None:
    """Raise :class:`TrainingError` naming the option for a non-sane common setting."""
    opt = lambda n: option_name(config, n)  # noqa: E731

    def integer(name: str, low: int) -> None:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TrainingError(f"{opt(name)} must be an integer >= {low} (got {value!r})")

    integer("steps", 1)
    integer("batch_size", 1)
    integer("save_every", 0)
    integer("seed", 0)
    if hasattr(config, "validate_every"):
        integer("validate_every", 0)
    lr = config.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise TrainingError(f"{opt('lr')} must be a finite number > 0 (got {lr!r}); the published value is 1e-4")
    if lr > 1.0:
        raise TrainingError(f"{opt('lr')} {lr} is far too large for Adam (the published value is 1e-4)")
    if config.progress not in ("json", "bar", "none"):
        raise TrainingError(f"{opt('progress')} must be json, bar or none (got {config.progress!r})")


def _plain(value):
    """``value`` as JSON would store it (tuples -> lists), for comparing saved and new settings."""
    return json.loads(json.dumps(value))


def resolve_resume_config(config, saved: dict, done_steps: int, warn: Callable[[str], None] = lambda m: None):
    """The settings of a resumed run: the saved ones, with ``steps``/``lr`` as given now.

    A field equal to its default counts as not given and takes the saved value (so
    ``gvsl pretrain --resume --images ... --out ...`` continues the interrupted run's 5000 steps,
    not the default 1000); a field given now with another value than the saved one raises
    :class:`TrainingError` naming the option (``--crop``), except ``CHANGEABLE_ON_RESUME``
    (used as given, reported through ``warn``) and ``IGNORED_ON_RESUME``.
    """
    updates = {}
    for f in fields(config):
        if f.name not in saved or f.name in IGNORED_ON_RESUME:
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        now, before = _plain(getattr(config, f.name)), _plain(saved[f.name])
        if now == before:
            continue
        if default is not MISSING and now == _plain(default):  # not given now: the saved value
            updates[f.name] = saved[f.name]
            continue
        if f.name in CHANGEABLE_ON_RESUME:
            if f.name != "steps":  # a new --lr changes the trajectory: say so; more steps is routine
                warn(f"resuming with {option_name(config, f.name)} {now} (the interrupted run had {before}): "
                     "the run no longer repeats an uninterrupted one exactly")
            continue
        raise TrainingError(
            f"--resume: {option_name(config, f.name)} was {before!r} in the interrupted run, now {now!r}. "
            f"A resumed run keeps its settings (only {', '.join('--' + c for c in CHANGEABLE_ON_RESUME)} "
            f"may change): drop {option_name(config, f.name)} to continue, or start a new run in another --out folder")
    resolved = replace(config, **updates) if updates else config
    if resolved.steps < done_steps:
        raise TrainingError(f"--resume: the checkpoint is at step {done_steps}, beyond {option_name(config, 'steps')} "
                            f"{resolved.steps}; pass --steps {done_steps} or more")
    return resolved


