"""The ``gvsl`` command: ``gvsl <command> [options]``; ``gvsl --help`` lists the commands.

Each command's options are declared here (argparse only, so ``--help`` is instant and imports
no torch) and its work is imported on use. Failures, each one ``error:`` line on stderr and,
with ``--progress json``, exactly one ``{"event": "error", "kind": ..., "message": ...}`` line:

* a :class:`gvsl.errors.GVSLError` (bad input or option; ``kind`` "user"): exit 2;
* disk full, permission denied, read-only file system (``kind`` "environment"): exit 1;
* anything else is a bug (``kind`` "unexpected"): a short message naming a log file that holds
  the traceback (``$GVSL_LOG_DIR`` or ``<tmp>/gvsl-logs``), exit 1;
* bad options (``kind`` "usage"): argparse's message, exit 2. Numbers are checked at parsing
  (finite, in range), so ``--lr nan`` never reaches the computation.

Warnings (:func:`gvsl.errors.warn` and Python warnings) are ``warning:`` lines on stderr, or
``{"event": "warning"}`` lines with ``--progress json``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

from gvsl import __version__, errors
from gvsl.errors import GVSLError
from gvsl.progress import Cancelled

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


class _ParseError(Exception):
    def __init__(self, message: str, parser: argparse.ArgumentParser, command: Optional[str]):
        super().__init__(message)
        self.parser = parser
        self.command = command


class _Parser(argparse.ArgumentParser):
    """argparse that raises (so ``main`` can also report the error as a JSON event)."""

    def error(self, message):  # noqa: D401 - argparse's hook
        command = self.prog.split()[1] if len(self.prog.split()) > 1 else None
        # "argument --lr: must be ..." (our type functions) -> "--lr must be ...", the house style
        match = re.match(r"^argument (--[\w-]+)(?:/[^:]*)?: (must be .*)$", message)
        if match:
            message = f"{match.group(1)} {match.group(2)}"
        raise _ParseError(message, self, command)


def _json_mode(argv: List[str]) -> bool:
    for i, a in enumerate(argv):
        if a == "--progress" and i + 1 < len(argv) and argv[i + 1] == "json":
            return True
        if a == "--progress=json":
            return True
    return False


# argparse type functions: numbers are refused at parsing unless finite (and in range)
def _number(kind: type, minimum: Optional[float] = None, strict: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'} (got {text!r})") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g} (got {text})")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_float = _number(float, 0.0, strict=True)
positive_int = _number(int, 1)
nonnegative_int = _number(int, 0)


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (only once every new file is "
                        "written and verified; the earlier run's other files are then removed)")


def _cancel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cancel-file", metavar="PATH",
                   help="stop cleanly (after the current step/stage, saving what is resumable) once PATH "
                        "exists; how the Slicer panels cancel a background job on every OS")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gvsl",
        description="GVSL (Geometric Visual Similarity Learning): self-supervised pre-training, "
                    "registration and segmentation of 3D medical images.")
    parser.add_argument("--version", action="version", version=f"gvsl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for add in _ADDERS:
        add(sub)
    return parser


UserError = GVSLError  # the former name of the user-error base class, kept for callers


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``gvsl``; returns the exit code (0 ok, 2 a user-fixable error, 1 an environment
    fault or a bug, 130/143 interrupted). With ``--progress json`` every failure is also
    exactly one ``{"event": "error", ...}`` line on stdout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode = _json_mode(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ParseError as exc:
        exc.parser.print_usage(sys.stderr)
        report = _Report(exc.command or "gvsl", json_mode)
        return report.error(f"{exc}", kind="usage", exit_code=2)
    if not args.command:
        parser.print_help()
        return 0
    report = _Report(args.command, getattr(args, "progress", None) == "json")
    module_name, func_name = HANDLERS[args.command].split(":")
    try:
        with errors.warnings_to(report.warning):
            handler = getattr(importlib.import_module(module_name), func_name)
            return int(handler(args) or 0)
    except KeyboardInterrupt:
        return report.error("interrupted", kind="interrupted", exit_code=130)
    except Cancelled as exc:
        if report.json_mode:
            report._json({"event": "cancelled", "task": args.command, "stopped_by": str(exc)})
        print(f"gvsl {args.command}: cancelled ({exc})", file=sys.stderr, flush=True)
        return 130
    except GVSLError as exc:
        kind = "environment" if isinstance(exc, errors.EnvironmentFault) else "user"
        return report.error(str(exc), kind=kind, exit_code=exc.exit_code)
    except FileNotFoundError as exc:
        return report.error(f"{exc.filename or exc}: file or folder not found", kind="user", exit_code=2)
    except OSError as exc:
        if errors.is_environment_fault(exc):
            fault = errors.environment_fault(exc)
            return report.error(str(fault), kind="environment", exit_code=fault.exit_code)
        return report.unexpected(exc)
    except Exception as exc:  # noqa: BLE001 - a bug: short message + traceback in a log file
        return report.unexpected(exc)


class _Report:
    """How one command reports warnings and its failure: one line on stderr, and one JSON
    event on stdout with ``--progress json``."""

    def __init__(self, command: str, json_mode: bool):
        self.command = command
        self.json_mode = json_mode

    def _json(self, record: dict) -> None:
        from gvsl.progress import json_safe
        print(json.dumps(json_safe(record)), flush=True)

    def warning(self, message: str) -> None:
        if self.json_mode:
            self._json({"event": "warning", "task": self.command, "message": message})
        else:
            print(f"gvsl {self.command}: warning: {message}", file=sys.stderr, flush=True)

    def error(self, message: str, kind: str, exit_code: int, **extra) -> int:
        message = " ".join(str(message).splitlines())  # one line, whatever the exception held
        if self.json_mode:
            self._json({"event": "error", "task": self.command, "kind": kind, "message": message,
                        "exit_code": exit_code, **extra})
        print(f"gvsl {self.command}: error: {message}", file=sys.stderr, flush=True)
        return exit_code

    def unexpected(self, exc: BaseException) -> int:
        log = _write_crash_log(self.command, exc)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        where = f"the traceback is in {log}" if log else "the traceback could not be saved"
        message = (f"unexpected {type(exc).__name__}: {first} (this is a bug in gvsl; {where}; "
                   "please include that file in a bug report)")
        return self.error(message, kind="unexpected", exit_code=1, log=str(log) if log else None)


def _write_crash_log(command: str, exc: BaseException) -> Optional[Path]:
    """Save ``exc``'s traceback (and the command line) to a new file; returns its path."""
    text = (f"gvsl {__version__} {command}\nargv: {sys.argv!r}\npython: {sys.version}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    folder = Path(os.environ.get("GVSL_LOG_DIR") or Path(tempfile.gettempdir()) / "gvsl-logs")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"gvsl-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(text, encoding="utf-8")
        return path
    except OSError:
        return None


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
    p.add_argument("--network-spacing", type=positive_float, default=None, metavar="MM",
                   help="isotropic spacing of the network grid in mm (default: the checkpoint's, else 1.0)")
    p.add_argument("--max-network-voxels", type=_number(int, 8), default=160 ** 3, metavar="N",
                   help="coarsen the network grid beyond N voxels (default 160^3 = 4096000)")
    p.add_argument("--full-resolution", action="store_true",
                   help="write displacement.nii.gz and jacobian.nii.gz on the fixed image's grid (default: on the "
                        "network grid, where the field is exact and small)")
    p.add_argument("--refine", default="auto", metavar="N",
                   help="test-time refinement steps on this pair after the network (NCC + smoothness, "
                        "multi-resolution; the network-only result is kept beside it): 0 = network only, "
                        "auto (default) = 150 on a CPU, 400 on a GPU")
    p.add_argument("--fixed-mask", help="mask of the fixed volume (non-zero = inside): refinement counts the "
                                        "similarity only there")
    p.add_argument("--no-overview", action="store_true", help="do not draw overview.png")
    _overwrite_arg(p)
    _cancel_arg(p)
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
    p.add_argument("--spacing", type=positive_float, default=1.0, help="isotropic resampling spacing in mm (default 1)")
    p.add_argument("--steps", type=positive_int, default=1000, help="optimisation steps (default 1000)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="pairs per step and process (default 2)")
    p.add_argument("--crop", type=positive_int, default=128, help="cubic crop side in voxels (default 128)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate (default 1e-4)")
    _device_arg(p)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast precision (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/gvsl_last.pt exactly")
    p.add_argument("--init", metavar="CKPT", help="start from these weights (ours or the published GVSL weights)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    p.add_argument("--save-every", type=nonnegative_int, default=500, help="checkpoint every N steps (default 500)")
    p.add_argument("--cache-dir", help="where preprocessed volumes are cached (default OUT/cache)")
    p.add_argument("--no-augment", action="store_true", help="disable the spatial/appearance augmentation")
    _overwrite_arg(p)
    p.add_argument("--model-channels", type=int, nargs=9, metavar="C",
                   help="advanced: the U-Net's 9 channel widths (default the published 32 64 128 256 512 256 "
                        "128 64 32); smaller widths give a faster, weaker model for quick trials")
    _cancel_arg(p)
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
    p.add_argument("--steps", type=positive_int, default=2000, help="optimisation steps (default 2000)")
    p.add_argument("--crop", type=positive_int, default=96, help="cubic patch side in voxels, also the inference window (default 96)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="patches per step and process (default 2)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--lr-schedule", choices=("constant", "poly"), default="constant",
                   help="constant (the paper's, default) or poly: lr * (1 - step/steps)^0.9, better for short runs")
    p.add_argument("--val-every", type=nonnegative_int, default=200, help="validate every N steps (default 200)")
    p.add_argument("--save-every", type=nonnegative_int, default=200, help="resumable checkpoint every N steps (default 200)")
    p.add_argument("--preset", choices=("ct", "mr"), default=None,
                   help="intensity preset (default: the pretrained checkpoint's, else ct for heart/coronary, mr for brain)")
    p.add_argument("--spacing", type=positive_float, default=None, help="isotropic spacing in mm (default: the checkpoint's, else 1)")
    p.add_argument("--ignore-unknown-labels", action="store_true",
                   help="label values outside the task's table become background (default: an error listing them)")
    p.add_argument("--remap", metavar="TSV", help="label remapping table: lines 'source<TAB>target' (target 0 = background)")
    _device_arg(p)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast precision (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/seg_last.pt exactly")
    p.add_argument("--model-channels", type=int, nargs=9, metavar="C",
                   help="advanced: the U-Net's 9 widths when training from scratch (default: the pre-trained "
                        "backbone's, else the published 32 64 128 256 512 256 128 64 32)")
    _overwrite_arg(p)
    _cancel_arg(p)
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
    p.add_argument("--window", type=positive_int, default=None, help="sliding-window side (default: the training crop)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap fraction (default 0.25)")
    _cancel_arg(p)
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


@command("protocol", "gvsl.protocol:run_cli")
def _add_protocol(sub) -> None:
    p = sub.add_parser(
        "protocol", help="the paper's transfer protocol: fine-tune and linear evaluation from each pre-trained "
                         "checkpoint and from scratch, on a public dataset's layout -> report.md, dice_bars.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Runs the GVSL paper's transfer evaluation (Table 1) on your copy of a dataset:
  1. reads --data in a known layout (--layout auto detects it):
       mmwhs  MM-WHS CT: ct_train_1001_image.nii.gz + ct_train_1001_label.nii.gz (also ct_test_*)
       asoca  ASOCA: Normal/CTCA/Normal_1.nrrd + Normal/Annotations/Normal_1.nrrd (and Diseased/...)
       candi  CANDI: <group>/<subject>/<subject>_procimg.nii.gz + <subject>_seg.nii.gz
              (FreeSurfer labels outside the 28 of the brain table become background)
       plain  DIR/images/<name> + DIR/labels/<name>, matched by file name
  2. splits the cases with the paper's train/val/test numbers (heart 15/5/rest, coronary 15/5/20,
     brain 40/20/43; --split overrides), seeded, written to OUT/splits.json;
  3. for each --pretrained checkpoint and for scratch, in each mode (finetune: all weights; linear:
     frozen backbone), fine-tunes on train with the same budget, keeps the best validation Dice,
     segments every test case and measures Dice and HD95 per structure (OUT/runs/<init>-<mode>/);
  4. writes OUT/results.json, OUT/report.md (a Table-1-like table next to the paper's numbers)
     and OUT/dice_bars.png.
Running the same command again resumes: finished runs are skipped, an interrupted one continues.
Example: gvsl protocol --task heart --data MM-WHS/ --out protocol-heart --pretrained gvsl_final.pt""")
    p.add_argument("--task", required=True, choices=("heart", "coronary", "brain"),
                   help="heart (MM-WHS 7 structures), coronary (ASOCA, binary) or brain (CANDI, 28 structures)")
    p.add_argument("--data", required=True, metavar="DIR", help="the dataset's root folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (outside --data)")
    p.add_argument("--pretrained", nargs="+", metavar="CKPT", default=[],
                   help="pre-training checkpoints (gvsl pretrain) or the published GVSL weights to compare; each "
                        "is named by its file stem. Scratch always runs too")
    p.add_argument("--layout", choices=("auto", "mmwhs", "asoca", "candi", "plain"), default="auto",
                   help="layout of --data (default auto: detected)")
    p.add_argument("--split", metavar="TRAIN/VAL/TEST",
                   help="case counts, the last may be 'rest' (default: the paper's, e.g. 15/5/rest for heart)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the split and of every run (default 0)")
    p.add_argument("--steps", type=positive_int, default=2000, help="fine-tuning steps of every run (default 2000)")
    p.add_argument("--crop", type=positive_int, default=96, help="patch side in voxels, also the inference window (default 96)")
    p.add_argument("--batch-size", type=positive_int, default=2, help="patches per step (default 2)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--lr-schedule", choices=("constant", "poly"), default="constant",
                   help="constant (the paper's) or poly: lr x (1 - step/steps)^0.9, for short runs (default constant)")
    p.add_argument("--spacing", type=positive_float, default=None, metavar="MM",
                   help="network grid spacing in mm (default: the task's preprocessing, 1 mm; coarser is faster)")
    p.add_argument("--val-every", type=positive_int, default=None,
                   help="validate every N steps, the best is kept (default: steps / 10)")
    p.add_argument("--modes", default="finetune,linear", metavar="finetune,linear",
                   help="comma-separated modes to run (default finetune,linear)")
    p.add_argument("--model-channels", type=int, nargs=9, metavar="C",
                   help="advanced: the U-Net's 9 widths (default: the pre-trained backbone's, else the published "
                        "32 64 128 256 512 256 128 64 32); scratch trains the same width")
    _device_arg(p)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast precision (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--ignore-unknown-labels", action="store_true",
                   help="label values outside the task's table become background (always on for --layout candi)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every run (default: finished runs are skipped and an interrupted one resumes)")
    _cancel_arg(p)
    _progress_arg(p)


@command("demo", "gvsl.demo:run_cli")
def _add_demo(sub) -> None:
    from gvsl.demo import DEFAULTS
    p = sub.add_parser("demo", help="phantoms -> short pre-training -> registration -> pictures (minutes, CPU ok)",
                       description="Runs the whole GVSL pipeline on built-in synthetic heart phantoms and writes "
                                   "pictures and a summary into --out.")
    p.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    p.add_argument("--n", type=positive_int, default=DEFAULTS["n"], help=f"phantoms to make (default {DEFAULTS['n']})")
    p.add_argument("--size", type=positive_int, default=DEFAULTS["size"], help=f"phantom size in voxels (default {DEFAULTS['size']})")
    p.add_argument("--steps", type=positive_int, default=DEFAULTS["steps"], help=f"pre-training steps (default {DEFAULTS['steps']})")
    p.add_argument("--crop", type=positive_int, default=DEFAULTS["crop"], help=f"training crop (default {DEFAULTS['crop']})")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULTS["batch_size"],
                   help=f"pairs per step (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=positive_float, default=DEFAULTS["lr"], help=f"Adam learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--refine", default=DEFAULTS["refine"], metavar="N",
                   help="test-time refinement steps of each registration (0 = network only; default auto)")
    p.add_argument("--finetune-steps", type=nonnegative_int, default=DEFAULTS["finetune_steps"],
                   help=f"segmentation fine-tuning steps after pre-training; 0 skips it (default {DEFAULTS['finetune_steps']})")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    _device_arg(p)
    _progress_arg(p)


@command("phantom", "gvsl.phantoms:run_cli")
def _add_phantom(sub) -> None:
    p = sub.add_parser("phantom", help="write synthetic CT heart or MR brain volumes with label maps")
    p.add_argument("--kind", choices=("heart", "brain"), default="heart",
                   help="heart: cardiac CT (HU) + 7 MM-WHS labels + coronary tree; "
                        "brain: T1 MR + 28 FreeSurfer aseg labels (default: heart)")
    p.add_argument("--n", type=positive_int, default=4, help="number of cases (default: 4)")
    p.add_argument("--size", type=positive_int, default=96, help="voxels per axis, 32..512 (default: 96)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="case i uses seed seed*1000+i (default: 0)")
    p.add_argument("--out", required=True,
                   help="output folder: images/, labels/ (and labels-coronary/ for heart), <kind>_<iii>.nii.gz")
    _progress_arg(p)
