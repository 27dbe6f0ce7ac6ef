"""Export the chosen volume nodes for `gvsl pretrain` (through gvsl_mrml; inputs never modified)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Sequence

import gvsl_mrml


class PretrainingInputError(ValueError):
    """Inputs that cannot be pre-trained on; the message says what to change."""


def volumes_problem(volume_nodes: Sequence) -> str:
    """Why these nodes cannot be pre-trained on ("" when they can): at least two distinct
    scalar volumes with a world geometry."""
    nodes = [n for n in (volume_nodes or []) if n is not None]
    if len(nodes) < 2:
        return ("Select at least two volumes: GVSL learns by registering pairs of different scans "
                f"({len(nodes)} selected).")
    if len({n.GetID() for n in nodes}) != len(nodes):
        return "The same volume is selected twice; select different volumes."
    for node in nodes:
        try:
            gvsl_mrml.check_scalar_volume_node(node, f"volume '{node.GetName()}'")
        except gvsl_mrml.MRMLConversionError as exc:
            return str(exc)
    return ""


def export_volumes(volume_nodes: Sequence, folder) -> List[Path]:
    """Write each node as ``<folder>/<iii>_<name>.nrrd`` (LPS, world geometry incl. a linear
    parent transform) in the given order; returns the paths."""
    from gvsl.io import write_image_atomic
    problem = volumes_problem(volume_nodes)
    if problem:
        raise PretrainingInputError(problem)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, node in enumerate(volume_nodes):
        image = gvsl_mrml.volume_node_to_sitk(node, what=f"volume '{node.GetName()}'")
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", node.GetName())[:40] or "volume"
        paths.append(write_image_atomic(image, folder / f"{i:03d}_{slug}.nrrd", compress=False))
    return paths
