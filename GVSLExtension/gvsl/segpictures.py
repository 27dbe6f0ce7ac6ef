"""Segmentation overview picture: image, truth and prediction overlays, per-structure Dice.

Rows: axial / coronal / sagittal mid slices (orientation as :mod:`gvsl.pictures`); columns: the
image, the truth over it, the prediction over it (label colours from the task's table, 55 %
opacity); a last panel with a horizontal bar per structure (Dice). Written atomically.
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


def segmentation_overview(image: sitk.Image, truth: Optional[sitk.Image], prediction: sitk.Image, table,
                          dice: Optional[Dict[str, Optional[float]]], path, title: str = "") -> Path:
    """Write the overview PNG to ``path``; ``dice``: {structure name: Dice or None}."""
    lut = {lab.value: lab.color_float for lab in table}
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
    ax.set_yticks(y, [n if len(n) <= 22 else n[:21] + "." for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("Dice", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("per-structure Dice", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
