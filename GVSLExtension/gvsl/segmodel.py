"""The GVSL segmentation network: the pre-trained backbone plus an output convolution.

As in the published GVSL downstream code: ``unet`` is the same :class:`gvsl.network.UNetBackbone`
(same ``unet.*`` key names, so a pre-training checkpoint or the published GVSL weights initialise
it) and ``out_conv = Conv3d(32, n_classes, 3, padding=1)`` on the local features f_local; class
probabilities are ``softmax(logits, dim=1)`` (applied at inference, not in ``forward``).

Shapes: ``forward(x)`` takes (B, 1, z, y, x) float images on the preprocessing grid and returns
logits (B, n_classes, z, y, x); class 0 is the background, class i >= 1 is the i-th label of the
task's :class:`gvsl.labels.LabelTable` (increasing source value).

Checkpoint kind ``segmentation`` (see :mod:`gvsl.checkpoint`): besides the common fields it holds
``labels`` (the table as TSV text plus its name), ``preprocessing`` (``PreprocessSpec.to_dict()``),
``train_config`` and ``scores`` (validation Dice).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn as nn

from gvsl.network import DEFAULT_CHANNELS, UNetBackbone

KIND_SEGMENTATION = "segmentation"


@dataclass
class SegConfig:
    """Everything needed to rebuild a :class:`SegmentationNet` (saved in checkpoints)."""

    n_classes: int = 2
    in_channels: int = 1
    channels: Tuple[int, ...] = field(default=DEFAULT_CHANNELS)

    def to_dict(self) -> dict:
        return {"n_classes": int(self.n_classes), "in_channels": int(self.in_channels),
                "channels": [int(c) for c in self.channels]}

    @classmethod
    def from_dict(cls, d: dict) -> "SegConfig":
        return cls(n_classes=int(d["n_classes"]), in_channels=int(d.get("in_channels", 1)),
                   channels=tuple(int(c) for c in d.get("channels", DEFAULT_CHANNELS)))


class SegmentationNet(nn.Module):
    """GVSL backbone + ``out_conv``; ``forward(x (B,1,z,y,x)) -> logits (B, n_classes, z, y, x)``."""

    def __init__(self, config: SegConfig):
        super().__init__()
        if config.n_classes < 2:
            raise ValueError(f"a segmentation network needs >= 2 classes (background + 1), got {config.n_classes}")
        self.config = config
        self.unet = UNetBackbone(config.in_channels, config.channels)
        self.out_conv = nn.Conv3d(config.channels[8], config.n_classes, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, f_local = self.unet(x)
        return self.out_conv(f_local)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (B, n_classes, z, y, x), computed in fp32."""
        return torch.softmax(self(x).float(), dim=1)

    def backbone_parameters(self):
        return self.unet.parameters()

    def head_parameters(self):
        return self.out_conv.parameters()

    def freeze_backbone(self) -> None:
        """Linear evaluation: only ``out_conv`` trains (the backbone is also kept in eval mode by
        the fine-tuning task; GroupNorm has no running statistics, so this only stops gradients)."""
        for p in self.unet.parameters():
            p.requires_grad_(False)


def init_head_prior(model: SegmentationNet, voxels_per_class) -> None:
    """Start ``out_conv`` at the class frequencies: bias_c = log(voxels_c / all voxels) (every class
    at least one voxel), weights unchanged (small, random). A fresh head otherwise predicts ~1/n for
    every class; on data where the structures are a few % of the voxels (a heart in a CT) the first
    tens of steps then only learn "everything is background" (cross-entropy collapses onto it and
    the Dice gradients of the foreground are tiny), which is all a short run ever sees. Starting at
    the prior skips that phase (the focal-loss paper's prior initialisation, Lin et al. 2017).
    ``voxels_per_class``: (n_classes,) counts over the training labels, class 0 the background."""
    counts = torch.as_tensor([max(float(v), 1.0) for v in voxels_per_class], dtype=torch.float32)
    if counts.numel() != model.config.n_classes:
        raise ValueError(f"{counts.numel()} class counts for a network of {model.config.n_classes} classes")
    with torch.no_grad():
        model.out_conv.bias.copy_(torch.log(counts / counts.sum()))


def backbone_state(state: dict) -> dict:
    """The ``unet.*`` entries of a state dict (a GVSL pre-training model, the published weights
    or a segmentation model), keys kept as they are."""
    return {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("unet.")}


def init_backbone_from(model: SegmentationNet, ckpt: dict, path="checkpoint") -> int:
    """Copy the backbone weights of ``ckpt`` (from :func:`gvsl.checkpoint.load_checkpoint`: a
    pre-training checkpoint, the published weights, or a segmentation checkpoint) into ``model``.

    Every ``unet.*`` key of ``model`` must be present with the same shape (else
    :class:`gvsl.checkpoint.CheckpointError`, naming the key). Returns the number of tensors copied.
    """
    from gvsl.checkpoint import CheckpointError
    src = backbone_state(ckpt.get("state_dict", {}))
    own = {k: v for k, v in model.state_dict().items() if k.startswith("unet.")}
    if not src:
        raise CheckpointError(f"{path} has no 'unet.*' backbone weights to initialise the segmentation "
                              "network from; pass a GVSL pre-training checkpoint or the published weights.")
    for key, ref in own.items():
        if key not in src:
            raise CheckpointError(f"{path}: backbone key '{key}' is missing; the file is for a different network.")
        if tuple(src[key].shape) != tuple(ref.shape):
            widths = ckpt.get("model_config", {}).get("channels")
            raise CheckpointError(
                f"{path}: backbone key '{key}' has shape {tuple(src[key].shape)}, the segmentation network "
                f"expects {tuple(ref.shape)}; the pre-trained backbone has channels {widths}: build the "
                "segmentation network with the same channels.")
    model.load_state_dict({**model.state_dict(), **{k: src[k] for k in own}})
    return len(own)


def build_from_checkpoint(ckpt: dict, path="checkpoint") -> SegmentationNet:
    """Builder of the ``segmentation`` kind (registered in :mod:`gvsl.checkpoint`)."""
    from gvsl.checkpoint import CheckpointError, check_state_dict
    if "labels" not in ckpt:
        raise CheckpointError(f"{path}: segmentation checkpoint without its label table ('labels').")
    model = SegmentationNet(SegConfig.from_dict(ckpt["model_config"]))
    check_state_dict(ckpt["state_dict"], model, path)
    model.load_state_dict(ckpt["state_dict"])
    return model


def label_table_of(model_or_ckpt):
    """The :class:`gvsl.labels.LabelTable` stored with a segmentation model or checkpoint dict."""
    from gvsl.labels import LabelTable
    info = model_or_ckpt if isinstance(model_or_ckpt, dict) else getattr(model_or_ckpt, "info", {})
    labels = info.get("labels")
    if not labels:
        raise ValueError("this model carries no label table; it is not a segmentation model.")
    return LabelTable.parse(labels["tsv"], labels.get("name", "labels"))


def labels_entry(table) -> dict:
    """The ``labels`` checkpoint entry for a :class:`gvsl.labels.LabelTable`: JSON-/weights_only-safe
    (name, TSV text with names, colours and terminology, and the values in class order)."""
    return {"name": table.name, "tsv": table.to_tsv(), "values": [int(v) for v in table.values]}


def new_model(table, channels: Optional[Tuple[int, ...]] = None) -> SegmentationNet:
    """A fresh network for ``table`` (n_classes = len(table) + 1)."""
    return SegmentationNet(SegConfig(n_classes=len(table) + 1, channels=tuple(channels or DEFAULT_CHANNELS)))
