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
    for mod, name in (("gvsl.io", "VolumeError"), ("gvsl.register", "RegistrationError")):
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
        model = load_model(args.model)
        info["model"] = dict(model.info, parameters=count_parameters(model))
    print(json.dumps(info, indent=2, default=str))
    return 0
