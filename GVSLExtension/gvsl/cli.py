"""The ``gvsl`` command: ``gvsl <command> [options]``; ``gvsl --help`` lists the commands.

Each command's options are declared here (argparse only, so ``--help`` is instant) and its
work is imported on use. Errors that users can fix are printed as one ``error:`` line (and as a
JSON ``{"event": "error"}`` line with ``--progress json``), exit code 2; no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable, Dict, List, Optional

from gvsl import __version__

# command name -> "module:function" taking the parsed args, returning an exit code
HANDLERS: Dict[str, str] = {}
_ADDERS: List[Callable[[argparse._SubParsersAction], None]] = []


def command(name: str, handler: str):
    """Decorator for a function that adds the ``name`` sub-parser."""
    def wrap(add: Callable[[argparse._SubParsersAction], None]):
        HANDLERS[name] = handler
        _ADDERS.append(add)
        return add
    return wrap


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)")


def _progress_arg(p: argparse.ArgumentParser, default: str = "bar") -> None:
    p.add_argument("--progress", choices=("json", "bar", "none"), default=default,
                   help="json: one JSON object per line on stdout (for Slicer and scripts); "
                        f"bar: a progress bar on stderr; none (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvsl",
        description="GVSL (Geometric Visual Similarity Learning): self-supervised pre-training, "
                    "registration and segmentation of 3D medical images.")
    parser.add_argument("--version", action="version", version=f"gvsl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in _ADDERS:
        add(sub)
    return parser


class UserError(Exception):
    """An error caused by the user's input, reported without a traceback."""


def _user_error_types():
    types = [UserError, FileNotFoundError]
    try:
        from gvsl.checkpoint import CheckpointError
        from gvsl.device import DeviceError
        types += [CheckpointError, DeviceError]
    except ImportError:  # pragma: no cover
        pass
    for mod, name in (("gvsl.io", "VolumeError"), ("gvsl.registration", "RegistrationError"),
                      ("gvsl.train", "TrainingError")):
        try:
            types.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    module_name, func_name = HANDLERS[args.command].split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one line, the rest re-raise
        if not isinstance(exc, _user_error_types()):
            raise
        if getattr(args, "progress", None) == "json":
            print(json.dumps({"event": "error", "message": str(exc)}), flush=True)
        print(f"gvsl {args.command}: error: {exc}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------
# Commands. Each adder declares options only; the handler module does the work.
# ---------------------------------------------------------------------------------------
@command("info", "gvsl.cli:run_info")
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show versions, the chosen device/precision, and a model file's metadata")
    p.add_argument("--model", help="a GVSL checkpoint or the published weights to describe")
    _device_arg(p)


@command("register", "gvsl.registration:run_cli")
def _add_register(sub) -> None:
    p = sub.add_parser("register", help="register a moving volume onto a fixed one with a GVSL model "
                                        "(affine + deformable, exported as LPS transforms)")
    p.add_argument("--fixed", required=True, help="fixed (reference) volume: NIfTI, NRRD, MHA or DICOM folder")
    p.add_argument("--moving", required=True, help="moving volume, registered onto the fixed one")
    p.add_argument("--model", required=True, help="GVSL checkpoint (gvsl pretrain) or the published GVSL weights")
    p.add_argument("--out", required=True, help="output folder (created): warped.nii.gz, composite.h5, ...")
    p.add_argument("--fixed-labels", help="label map of the fixed volume (for Dice)")
    p.add_argument("--moving-labels", help="label map of the moving volume (warped; Dice with --fixed-labels)")
    _device_arg(p)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="network precision (default auto: bf16 on CUDA and on CPUs with native bf16)")
    p.add_argument("--preset", choices=("ct", "mr"), default=None,
                   help="intensity normalisation (default: the checkpoint's, else guessed: min < -500 -> ct)")
    p.add_argument("--network-spacing", type=float, default=None, metavar="MM",
                   help="isotropic spacing of the network grid in mm (default: the checkpoint's, else 1.0)")
    p.add_argument("--max-network-voxels", type=int, default=160 ** 3, metavar="N",
                   help="coarsen the network grid beyond N voxels (default 160^3 = 4096000)")
    p.add_argument("--full-resolution", action="store_true",
                   help="write displacement.nii.gz and jacobian.nii.gz on the fixed image's grid (default: on the "
                        "network grid, where the field is exact and small)")
    p.add_argument("--no-overview", action="store_true", help="do not draw overview.png")
    _progress_arg(p)


def run_info(args) -> int:
    import torch

    from gvsl.device import choose_precision, describe, select_device
    dev = select_device(args.device)
    info = {"gvsl": __version__, "torch": torch.__version__, "device": describe(dev),
            "inference_precision": choose_precision(dev, "inference").name,
            "training_precision": choose_precision(dev, "training").name}
    if args.model:
        from gvsl.checkpoint import load_model
        from gvsl.network import count_parameters
        from gvsl.preprocessing import spec_from_checkpoint
        model = load_model(args.model, kind=None)  # any kind: pre-training or segmentation
        spec, source = spec_from_checkpoint(model.info)
        info["model"] = dict(model.info, parameters=count_parameters(model))
        info["preprocessing"] = {"spec": spec.to_dict(), "source": source, "description": spec.describe()}
    print(json.dumps(info, indent=2, default=str))
    return 0


@command("pretrain", "gvsl.train:run_cli")
def _add_pretrain(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pre-train GVSL on unlabelled volumes (Algorithm 1); torchrun-ready",
        description="Self-supervised GVSL pre-training. Under torchrun (torchrun --nproc_per_node N -m gvsl "
                    "pretrain ...) it trains with DistributedDataParallel; only rank 0 writes.")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="volume files (.nii/.nii.gz/.nrrd/.mha/.mhd), folders of them, or DICOM series folders")
    p.add_argument("--out", required=True, help="output folder (checkpoints, history, loss curve)")
    p.add_argument("--preset", choices=("ct", "mr"), default="ct",
                   help="intensity preset: ct = (HU + 1024) clipped to [0, 2048] / 2048; mr = min-max (default ct)")
    p.add_argument("--spacing", type=float, default=1.0, help="isotropic resampling spacing in mm (default 1)")
    p.add_argument("--steps", type=int, default=1000, help="optimisation steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per step and process (default 2)")
    p.add_argument("--crop", type=int, default=128, help="cubic crop side in voxels (default 128)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    _device_arg(p)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast precision (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/gvsl_last.pt exactly")
    p.add_argument("--init", metavar="CKPT", help="start from these weights (ours or the published GVSL weights)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default 500)")
    p.add_argument("--cache-dir", help="where preprocessed volumes are cached (default OUT/cache)")
    p.add_argument("--no-augment", action="store_true", help="disable the spatial/appearance augmentation")
    _progress_arg(p)


@command("finetune", "gvsl.segtrain:run_cli")
def _add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune (or linear-probe) a GVSL backbone on labelled volumes -> a segmentation model",
        description="Trains backbone + output convolution (Dice + cross-entropy) on image/label pairs; keeps "
                    "the best validation Dice. Under torchrun it trains with DistributedDataParallel.")
    p.add_argument("--task", required=True, metavar="heart|coronary|brain|TABLE.tsv",
                   help="label table: heart (MM-WHS 205...850), coronary (1), brain (28 FreeSurfer aseg) or a .tsv")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH", help="a folder of images, or image files")
    p.add_argument("--labels", nargs="+", required=True, metavar="PATH",
                   help="a folder of label maps with the images' file names, or label files in the images' order")
    p.add_argument("--val-images", nargs="+", metavar="PATH", help="validation images (folder or files)")
    p.add_argument("--val-labels", nargs="+", metavar="PATH", help="validation label maps (folder or files)")
    p.add_argument("--pretrained", metavar="CKPT",
                   help="GVSL pre-training checkpoint, the published GVSL weights, or a segmentation checkpoint "
                        "(default: train from scratch)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, history, curves)")
    p.add_argument("--mode", choices=("finetune", "linear"), default="finetune",
                   help="finetune: all weights train; linear: frozen backbone, only the output layer (default finetune)")
    p.add_argument("--steps", type=int, default=2000, help="optimisation steps (default 2000)")
    p.add_argument("--crop", type=int, default=96, help="cubic patch side in voxels, also the inference window (default 96)")
    p.add_argument("--batch-size", type=int, default=2, help="patches per step and process (default 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--val-every", type=int, default=200, help="validate every N steps (default 200)")
    p.add_argument("--save-every", type=int, default=200, help="resumable checkpoint every N steps (default 200)")
    p.add_argument("--preset", choices=("ct", "mr"), default=None,
                   help="intensity preset (default: the pretrained checkpoint's, else ct for heart/coronary, mr for brain)")
    p.add_argument("--spacing", type=float, default=None, help="isotropic spacing in mm (default: the checkpoint's, else 1)")
    p.add_argument("--ignore-unknown-labels", action="store_true",
                   help="label values outside the task's table become background (default: an error listing them)")
    p.add_argument("--remap", metavar="TSV", help="label remapping table: lines 'source<TAB>target' (target 0 = background)")
    _device_arg(p)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast precision (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/seg_last.pt exactly")
    p.add_argument("--model-channels", type=int, nargs=9, metavar="C",
                   help="advanced: the U-Net's 9 widths when training from scratch (default: the pre-trained "
                        "backbone's, else the published 32 64 128 256 512 256 128 64 32)")
    p.add_argument("--cancel-file", metavar="PATH", help="stop cleanly (seg_last.pt saved) once PATH exists")
    _progress_arg(p)


@command("segment", "gvsl.seginfer:run_cli")
def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="segment a volume with a fine-tuned GVSL model (labels in the task's values)")
    p.add_argument("--model", required=True, help="segmentation checkpoint from 'gvsl finetune'")
    p.add_argument("--image", required=True, help="volume: NIfTI, NRRD, MHA or DICOM folder")
    p.add_argument("--out", required=True, help="label map to write (e.g. labels.nii.gz), on the input's exact grid")
    p.add_argument("--seg-nrrd", metavar="OUT.seg.nrrd", help="also write a Slicer segmentation file")
    p.add_argument("--probabilities", metavar="DIR", help="also write one probability image per structure")
    _device_arg(p)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--window", type=int, default=None, help="sliding-window side (default: the training crop)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap fraction (default 0.25)")
    p.add_argument("--cancel-file", metavar="PATH", help="stop between stages once PATH exists")
    _progress_arg(p, default="none")


@command("evaluate", "gvsl.segeval:run_cli")
def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="per-structure Dice and HD95 of a predicted label map against the truth")
    p.add_argument("--pred", required=True, help="predicted label map (the task's label values)")
    p.add_argument("--truth", required=True, help="reference label map on the same grid")
    p.add_argument("--task", required=True, metavar="heart|coronary|brain|TABLE.tsv")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--ignore-unknown-labels", action="store_true", help="truth values outside the table count as background")
    p.add_argument("--remap", metavar="TSV", help="truth remapping table 'source<TAB>target'")
    _progress_arg(p, default="none")


@command("demo", "gvsl.demo:run_cli")
def _add_demo(sub) -> None:
    from gvsl.demo import DEFAULTS
    p = sub.add_parser("demo", help="phantoms -> short pre-training -> registration -> pictures (minutes, CPU ok)",
                       description="Runs the whole GVSL pipeline on built-in synthetic heart phantoms and writes "
                                   "pictures and a summary into --out.")
    p.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    p.add_argument("--n", type=int, default=DEFAULTS["n"], help=f"phantoms to make (default {DEFAULTS['n']})")
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help=f"phantom size in voxels (default {DEFAULTS['size']})")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help=f"pre-training steps (default {DEFAULTS['steps']})")
    p.add_argument("--crop", type=int, default=DEFAULTS["crop"], help=f"training crop (default {DEFAULTS['crop']})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help=f"pairs per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help=f"Adam learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--finetune-steps", type=int, default=DEFAULTS["finetune_steps"],
                   help=f"segmentation fine-tuning steps after pre-training; 0 skips it (default {DEFAULTS['finetune_steps']})")
    p.add_argument("--seed", type=int, default=0)
    _device_arg(p)
    _progress_arg(p)


@command("phantom", "gvsl.phantoms:run_cli")
def _add_phantom(sub) -> None:
    p = sub.add_parser("phantom", help="write synthetic CT heart or MR brain volumes with label maps")
    p.add_argument("--kind", choices=("heart", "brain"), default="heart",
                   help="heart: cardiac CT (HU) + 7 MM-WHS labels + coronary tree; "
                        "brain: T1 MR + 28 FreeSurfer aseg labels (default: heart)")
    p.add_argument("--n", type=int, default=4, help="number of cases (default: 4)")
    p.add_argument("--size", type=int, default=96, help="voxels per axis, 32..512 (default: 96)")
    p.add_argument("--seed", type=int, default=0, help="case i uses seed seed*1000+i (default: 0)")
    p.add_argument("--out", required=True,
                   help="output folder: images/, labels/ (and labels-coronary/ for heart), <kind>_<iii>.nii.gz")
    _progress_arg(p)
