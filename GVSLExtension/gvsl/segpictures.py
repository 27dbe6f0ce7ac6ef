"""Segmentation overview picture: image, truth and prediction overlays, per-structure Dice.

Rows: axial / coronal / sagittal mid slices (orientation as :mod:`gvsl.pictures`); columns: the
image, the truth over it, the prediction over it (55 % opacity); a last panel with a horizontal
bar per structure (Dice), in the overlay colours, so it doubles as the legend. Written atomically.

Colours: the task table's (Slicer terminology) colours, unless two of them are too alike to tell
apart in a picture (the heart table's chambers are all shades of the same red: the closest pair
differs by 0.02 in RGB), in which case the picture uses matplotlib's qualitative ``tab20``
palettes instead; the segment nodes and ``.seg.nrrd`` files keep the table's colours.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk

from gvsl.pictures import VIEWS, _new_figure, _save, _scaled, _style, _Volume, _window


def _overlay(gray: np.ndarray, labels: np.ndarray, lut: Dict[int, tuple], alpha: float = 0.55) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for value, color in lut.items():
        m = labels == value
        if m.any():
            rgb[m] = (1 - alpha) * rgb[m] + alpha * np.asarray(color)
    return rgb


DISTINCT_RGB = 0.15  # the smallest Euclidean RGB distance (0..1 per channel) two overlay colours may have


def picture_colours(table) -> Dict[int, tuple]:
    """{label value: (r, g, b) in 0..1}: the table's colours, or ``tab20``/``tab20b`` ones when
    two table colours are closer than :data:`DISTINCT_RGB`."""
    colours = {lab.value: tuple(lab.color_float) for lab in table}
    rgb = np.array(list(colours.values()), dtype=float)
    if len(rgb) < 2:
        return colours
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 10
    if dist.min() >= DISTINCT_RGB:
        return colours
    from matplotlib import colormaps
    palette = list(colormaps["tab20"].colors) + list(colormaps["tab20b"].colors)
    return {value: tuple(palette[i % len(palette)][:3]) for i, value in enumerate(colours)}


def _two_lines(name: str, width: int = 20) -> str:
    """A name longer than ``width`` characters broken at the space nearest its middle (no truncation)."""
    if len(name) <= width or " " not in name:
        return name
    cut = min((i for i, ch in enumerate(name) if ch == " "), key=lambda i: abs(i - len(name) / 2))
    return name[:cut] + "\n" + name[cut + 1:]


def segmentation_overview(image: sitk.Image, truth: Optional[sitk.Image], prediction: sitk.Image, table,
                          dice: Optional[Dict[str, Optional[float]]], path, title: str = "") -> Path:
    """Write the overview PNG to ``path``; ``dice``: {structure name: Dice or None}."""
    lut = picture_colours(table)
    vol = _Volume(image)
    columns = [("image", None), ("truth", _Volume(truth) if truth is not None else None),
               ("prediction", _Volume(prediction))]
    columns = [c for c in columns if c[0] == "image" or c[1] is not None]
    fig = _new_figure(2.4 * len(columns) + 3.6, 2.4 * len(VIEWS) + (0.5 if title else 0.2))
    grid = fig.add_gridspec(len(VIEWS), len(columns) + 1, width_ratios=[1] * len(columns) + [1.4])
    win = _window(vol.array)
    for r, view in enumerate(VIEWS):
        sl, extent, _ = vol.view(view)
        gray = _scaled(sl, win)
        for c, (name, labels) in enumerate(columns):
            ax = fig.add_subplot(grid[r, c])
            shown = gray if labels is None else _overlay(gray, labels.view(view)[0], lut)
            ax.imshow(shown, cmap="gray" if labels is None else None, vmin=0, vmax=1, extent=extent,
                      interpolation="nearest")
            _style(ax, name if r == 0 else None, view if c == 0 else None)
            ax.set_aspect("equal")
    ax = fig.add_subplot(grid[:, -1])
    names = [lab.name for lab in table]
    values = [(dice or {}).get(n) for n in names]
    y = np.arange(len(names))
    ax.barh(y, [v if v is not None else 0.0 for v in values], color=[lut[lab.value] for lab in table])
    for yi, v in zip(y, values):
        ax.text(0.01 if v is None else min(v, 0.98), yi, "n/a" if v is None else f" {v:.2f}", va="center", fontsize=7)
    ax.set_yticks(y, [_two_lines(n) for n in names], fontsize=7 if len(names) <= 10 else 5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("Dice", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("per-structure Dice", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
