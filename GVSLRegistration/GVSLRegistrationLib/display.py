"""Show registration results in the slice views and the DVF on transform display nodes (no Qt).

Everything here edits MRML nodes only (slice composite nodes, transform display nodes), so it
works in a headless scene and is what the panel's controls call.
"""
from __future__ import annotations

from typing import Optional

import slicer

from GVSLRegistrationLib.logic import REFERENCE_FIXED, RegistrationOutputs

DVF_MODES = ("none", "glyph", "grid", "contour")
OVERLAY_STAGES = ("affine", "deformable", "network")


def _slice_composites(scene):
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def show_overlay(fixed_node, warped_node, opacity: float = 0.5) -> int:
    """Fixed volume as background, ``warped_node`` as foreground at ``opacity`` in every slice
    view of the scene. Returns the number of slice views changed (0 without views)."""
    if fixed_node is None or warped_node is None:
        raise ValueError("show_overlay needs the fixed and the warped volume.")
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be within 0..1, got {opacity}")
    views = _slice_composites(fixed_node.GetScene())
    for composite in views:
        composite.SetBackgroundVolumeID(fixed_node.GetID())
        composite.SetForegroundVolumeID(warped_node.GetID())
        composite.SetForegroundOpacity(float(opacity))
    return len(views)


def choose_overlay(outputs: RegistrationOutputs, stage: str) -> Optional[object]:
    """Foreground = the affine-only result (``stage="affine"``), the network's prediction before
    refinement (``"network"``; the final result when the registration was not refined), or the
    final affine + deformable result (``"deformable"``, refined when refinement ran); the
    background is the fixed volume. Returns the foreground node."""
    if stage not in OVERLAY_STAGES:
        raise ValueError(f"unknown overlay stage '{stage}'; choose one of {', '.join(OVERLAY_STAGES)}")
    warped = {"affine": outputs.warped_affine_volume,
              "network": outputs.warped_network_volume or outputs.warped_volume}.get(stage, outputs.warped_volume)
    if warped is None:
        raise ValueError("no registration result to show yet; run the registration first.")
    fixed = outputs.fixed_volume or warped.GetNodeReference(REFERENCE_FIXED)
    for composite in _slice_composites(warped.GetScene()):
        if fixed is not None:
            composite.SetBackgroundVolumeID(fixed.GetID())
        composite.SetForegroundVolumeID(warped.GetID())
    return warped


def set_dvf_display(transform_node, mode: str, region_node=None, spacing_mm: Optional[float] = None):
    """Show a transform's displacement in the views: ``"none" | "glyph" | "grid" | "contour"``.

    Uses the transform display node (created when missing): visualization mode, 2D and 3D
    visibility, and the region (``region_node``, default the ``GVSL.fixed`` reference) where 3D
    glyphs/grids/contours are drawn. ``spacing_mm`` sets the glyph/grid spacing (default: 1/12
    of the region's largest extent, at least 2 mm). Returns the display node.
    """
    if mode not in DVF_MODES:
        raise ValueError(f"unknown DVF display '{mode}'; choose one of {', '.join(DVF_MODES)}")
    if transform_node is None:
        raise ValueError("no transform to display; run the registration first.")
    display = transform_node.GetDisplayNode()
    if display is None:
        transform_node.CreateDefaultDisplayNodes()
        display = transform_node.GetDisplayNode()
    if mode == "none":
        display.SetVisibility(False)
        display.SetVisibility2D(False)
        display.SetVisibility3D(False)
        return display
    modes = {"glyph": slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GLYPH,
             "grid": slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID,
             "contour": slicer.vtkMRMLTransformDisplayNode.VIS_MODE_CONTOUR}
    region = region_node if region_node is not None else transform_node.GetNodeReference(REFERENCE_FIXED)
    if region is not None:
        display.SetAndObserveRegionNode(region)
        if spacing_mm is None and region.IsA("vtkMRMLVolumeNode") and region.GetImageData() is not None:
            dims = region.GetImageData().GetDimensions()
            extent = max(d * s for d, s in zip(dims, region.GetSpacing()))
            spacing_mm = max(2.0, extent / 12.0)
    if spacing_mm is not None:
        display.SetGlyphSpacingMm(float(spacing_mm))
        display.SetGridSpacingMm(float(spacing_mm))
    if mode == "contour":
        display.SetContourLevelsMmFromString("1 2 3 4 5 6 8 10")
    display.SetVisualizationMode(modes[mode])
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    display.SetVisibility3D(True)
    return display
