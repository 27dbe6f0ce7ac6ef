"""gvsl: Geometric Visual Similarity Learning (He et al., CVPR 2023) for 3D medical images.

The core engine of the GVSL Slicer extension; it needs PyTorch, NumPy, SimpleITK and MONAI,
never Slicer or Qt. Heavy modules are imported on first use, so ``import gvsl`` is cheap.

Public API::

    gvsl.GVSL, gvsl.ModelConfig           the network (gvsl.network)
    gvsl.load_model(path, device)         our checkpoints or the published weights (gvsl.checkpoint)
    gvsl.save_checkpoint(path, model, ...)
    gvsl.select_device("auto")            (gvsl.device)
    gvsl.finetune(...), gvsl.segment(image, model), gvsl.evaluate(pred, truth, task)
                                          segmentation (gvsl.segtrain, gvsl.seginfer, gvsl.segeval)
    gvsl.run_protocol(task=..., data=..., out=..., pretrained=[...])
                                          the paper's transfer protocol (gvsl.protocol)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "GVSL": "gvsl.network",
    "ModelConfig": "gvsl.network",
    "load_model": "gvsl.checkpoint",
    "load_checkpoint": "gvsl.checkpoint",
    "save_checkpoint": "gvsl.checkpoint",
    "CheckpointError": "gvsl.checkpoint",
    "select_device": "gvsl.device",
    "register": "gvsl.registration",
    "RegistrationResult": "gvsl.registration",
    "finetune": "gvsl.segtrain",
    "segment": "gvsl.seginfer",
    "evaluate": "gvsl.segeval",
    "run_protocol": "gvsl.protocol",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gvsl' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
