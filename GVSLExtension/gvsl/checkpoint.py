"""Checkpoints: our own format and the published GVSL weights, loaded safely, saved atomically.

Our format is a dict (loadable with ``torch.load(weights_only=True)``: tensors, numbers,
strings, lists and dicts only)::

    {"format": "gvsl-checkpoint", "format_version": 2, "kind": "pretrain",
     "model_config": {...}, "preprocessing": {...}, "step": int,
     "state_dict": {...}, ... optional: "optimizer", "rng", "train_config", "history"}

``preprocessing`` is the :class:`gvsl.preprocessing.PreprocessSpec` the model was trained with
(``spec.to_dict()``), which every command that reads the checkpoint applies. Format 1 stored
only ``{preset, spacing_mm}``; format-1 files and the published weights (no record) are read
with the documented defaults of :func:`gvsl.preprocessing.spec_from_checkpoint`.

The published GVSL3D weights are a plain ``state_dict`` of the reference model (keys listed in
``shared/reference/gvsl_official_state_dict.tsv``). They load into :class:`gvsl.network.GVSL`
unchanged except for one documented conversion: the reference affine transformer divides the
translation by the grid size in normalised [-1, 1] coordinates, which is half a voxel per unit
on cubic grids, so ``fc_trans`` is scaled by 0.5 to give our translation in voxels.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Optional
from pathlib import Path

import torch

from gvsl.errors import GVSLError
from gvsl.fsio import atomic_write, atomic_write_text  # noqa: F401  (re-exported: the writers live in gvsl.fsio)
from gvsl.network import GVSL, ModelConfig

FORMAT = "gvsl-checkpoint"
FORMAT_VERSION = 2  # 2: preprocessing holds the whole PreprocessSpec
KIND_PRETRAIN = "pretrain"
REFERENCE_TRANSLATION_SCALE = 0.5  # reference fc_trans units -> voxels (cubic grids)


class CheckpointError(GVSLError, ValueError):
    """A weights file that cannot be used, with what is wrong and what to do."""


def save_checkpoint(path: str | os.PathLike, model: GVSL, *, step: int = 0, kind: str = KIND_PRETRAIN,
                    preprocessing=None, **extra) -> Path:
    """Save ``model`` (and ``extra`` entries such as optimizer/rng/train_config) atomically.

    ``preprocessing``: the :class:`gvsl.preprocessing.PreprocessSpec` (or its dict) the model was
    trained with; None records nothing (commands then use the defaults)."""
    module = model.module if hasattr(model, "module") else model
    if preprocessing is not None and hasattr(preprocessing, "to_dict"):
        preprocessing = preprocessing.to_dict()
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model_config": module.config.to_dict(),
        "preprocessing": dict(preprocessing or {}),
        "step": int(step),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }
    payload.update(extra)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_weights_file(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` with errors that say what the file is and what to do."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}. Pass a GVSL checkpoint (.pt/.pth) "
                              "from 'gvsl pretrain', or the published GVSL weights.")
    if path.is_dir():
        raise CheckpointError(f"model path {path} is a folder; pass the checkpoint file inside it "
                              f"(e.g. {path}/gvsl_final.pt).")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "invalid load key" in str(exc) or not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"could not read {path} as PyTorch weights: the file is truncated, corrupt or of another "
                "kind (not a torch.save file). Download or copy it again.") from None
        raise CheckpointError(
            f"{path} contains Python objects other than weights, so it was not loaded (loading it "
            f"could run arbitrary code). Re-save it as a plain state_dict. Detail: {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not read {path} as PyTorch weights: the file is truncated, corrupt or of another "
            f"kind ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Download or copy it again.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or GVSL checkpoint.")
    return obj


def _strip_prefix(state: dict, prefix: str) -> dict:
    if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_state_dict(state: dict, model, path) -> None:
    """Raise naming the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise CheckpointError(f"{path}: key '{key}' is missing (expected shape {tuple(ref.shape)}); "
                                  "this is not a complete GVSL model.")
        val = state[key]
        if not isinstance(val, torch.Tensor):
            raise CheckpointError(f"{path}: key '{key}' is a {type(val).__name__}, not a tensor.")
        if tuple(val.shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: key '{key}' has shape {tuple(val.shape)}, expected "
                                  f"{tuple(ref.shape)}; the file is for a different network.")
    for key in state:
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected key '{key}'; the file is for a different network.")


_check_state_dict = check_state_dict  # former private name


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read our checkpoint or a published state dict -> normalised checkpoint dict.

    The result always has "format", "kind", "model_config", "preprocessing", "step",
    "state_dict" and "source" ("gvsl" or "reference"); shapes are validated.
    """
    obj = read_weights_file(path)
    if obj.get("format") == FORMAT:
        version = int(obj.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by a newer gvsl (format {version}); "
                                  f"this one reads format {FORMAT_VERSION}. Update the extension.")
        ckpt = dict(obj)
        ckpt["source"] = "gvsl"
    elif "format" in obj or "kind" in obj:
        raise CheckpointError(f"{path} is not a GVSL model checkpoint (format={obj.get('format')!r}).")
    else:
        state = obj
        for wrapper in ("state_dict", "model", "net"):
            if isinstance(state.get(wrapper), dict) and len(state) <= 4:
                state = state[wrapper]
        state = _strip_prefix(_strip_prefix(state, "module."), "_orig_mod.")
        if not any(isinstance(k, str) and k.startswith("unet.") for k in state):
            first = next(iter(state), None)
            raise CheckpointError(f"{path} is not GVSL weights: no 'unet.*' keys (first key: {first!r}). "
                                  "Pass a checkpoint written by 'gvsl pretrain' or the published GVSL weights.")
        state = dict(state)
        ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": KIND_PRETRAIN,
                "model_config": ModelConfig().to_dict(), "preprocessing": {}, "step": 0,
                "state_dict": state, "source": "reference"}
    ckpt.setdefault("model_config", ModelConfig().to_dict())
    ckpt.setdefault("preprocessing", {})
    ckpt.setdefault("step", 0)
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: checkpoint has no 'state_dict'.")
    return ckpt


# Model kinds: kind -> builder(ckpt, path) -> nn.Module ("module:function" strings import lazily).
BUILDERS = {KIND_PRETRAIN: "gvsl.checkpoint:_build_pretrain",
            "segmentation": "gvsl.segmodel:build_from_checkpoint"}
_WHAT_NEEDS = {KIND_PRETRAIN: "registration and pre-training need a GVSL pre-training checkpoint "
                              "(from 'gvsl pretrain') or the published GVSL weights",
               "segmentation": "segmentation needs a segmentation checkpoint (from 'gvsl finetune'); "
                               "a pre-training checkpoint or the published weights are the starting "
                               "point of 'gvsl finetune --pretrained CKPT'"}
_KIND_NAMES = {KIND_PRETRAIN: "a 'pretrain' checkpoint (GVSL pre-training or the published weights)",
               "segmentation": "a 'segmentation' checkpoint (from 'gvsl finetune')"}


def _build_pretrain(ckpt: dict, path) -> GVSL:
    model = GVSL(ModelConfig.from_dict(ckpt["model_config"]))
    state = dict(ckpt["state_dict"])
    check_state_dict(state, model, path)
    if ckpt.get("source") == "reference":
        state["fc_trans.weight"] = state["fc_trans.weight"] * REFERENCE_TRANSLATION_SCALE
        state["fc_trans.bias"] = state["fc_trans.bias"] * REFERENCE_TRANSLATION_SCALE
    model.load_state_dict(state)
    return model


def model_from_checkpoint(ckpt: dict, path="checkpoint", kind: Optional[str] = KIND_PRETRAIN):
    """Build the model of a dict returned by :func:`load_checkpoint`.

    ``kind``: the kind the caller needs (default ``pretrain``, a :class:`GVSL`; ``segmentation``,
    a :class:`gvsl.segmodel.SegmentationNet`; None: whatever the file holds). A file of another
    kind is one :class:`CheckpointError` saying what it is and what is needed.
    """
    import importlib
    have = ckpt.get("kind", KIND_PRETRAIN)
    if have not in BUILDERS:
        raise CheckpointError(f"{path} holds a model of unknown kind '{have}'; this gvsl builds "
                              f"{sorted(BUILDERS)}. Update the extension.")
    if kind is not None and have != kind:
        raise CheckpointError(f"{path} is {_KIND_NAMES.get(have, repr(have))}; "
                              f"{_WHAT_NEEDS.get(kind, f'a {kind!r} model is needed')}.")
    module_name, func = BUILDERS[have].split(":")
    model = getattr(importlib.import_module(module_name), func)(ckpt, path)
    model.info = {k: ckpt[k] for k in ("kind", "source", "step", "preprocessing", "model_config")}
    for key in ("labels", "train_config", "scores"):
        if key in ckpt:
            model.info[key] = ckpt[key]
    model.info["path"] = str(path)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               kind: Optional[str] = KIND_PRETRAIN):
    """Load a model (our checkpoint or the published weights) in eval mode on ``device``.

    ``kind``: see :func:`model_from_checkpoint` (default: a GVSL pre-training model).
    ``model.info`` holds the checkpoint metadata (kind, source, step, preprocessing, config;
    segmentation models also labels, train_config, scores).
    """
    model = model_from_checkpoint(load_checkpoint(path), path, kind=kind)
    return model.to(device).eval()
