"""The owner of the last registration's outputs in a scene (no Qt): the panel's display controls
go through it, so a deleted output node or a closed scene never leaves a stale node behind.

:class:`RegistrationSession` observes the scene: when an output (or the fixed/moving volume) is
removed its field becomes None; when the scene closes every field is cleared. The display
methods then do nothing and return False instead of raising on a deleted VTK object.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Optional

import slicer
import vtk

from GVSLRegistrationLib.display import choose_overlay, set_dvf_display, show_overlay
from GVSLRegistrationLib.logic import RegistrationOutputs

_NODE_FIELDS = [f.name for f in fields(RegistrationOutputs) if f.name != "metrics"]


class RegistrationSession:
    def __init__(self, scene):
        self.scene = scene
        self.outputs: Optional[RegistrationOutputs] = None
        self._observers = [
            scene.AddObserver(slicer.vtkMRMLScene.NodeRemovedEvent, self._on_node_removed),
            scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, self._on_close),
        ]

    def close(self) -> None:
        """Stop observing (the widget's cleanup)."""
        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self._observers = []
        self.outputs = None

    def set_outputs(self, outputs: Optional[RegistrationOutputs]) -> None:
        self.outputs = outputs

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _on_node_removed(self, _scene, _event, node) -> None:
        if self.outputs is None or node is None:
            return
        for name in _NODE_FIELDS:
            current = getattr(self.outputs, name)
            if current is not None and (current is node or current.GetID() == node.GetID()):
                setattr(self.outputs, name, None)

    def _on_close(self, *_args) -> None:
        self.outputs = None

    # -- what the panel's controls call ----------------------------------------------------
    def node(self, name: str):
        """An output node that still exists in the scene, else None."""
        if self.outputs is None:
            return None
        node = getattr(self.outputs, name)
        if node is None or node.GetScene() is not self.scene or not self.scene.IsNodePresent(node):
            return None
        return node

    def show(self, stage: str = "deformable", opacity: float = 0.5) -> bool:
        """Fixed in the background, the affine-only, the network's prediction (the final result
        when not refined) or the final affine + deformable result in front."""
        if stage == "network":
            warped = self.node("warped_network_volume") or self.node("warped_volume")
        else:
            warped = self.node("warped_affine_volume" if stage == "affine" else "warped_volume")
        fixed = self.node("fixed_volume")
        if warped is None or fixed is None:
            return False
        choose_overlay(self.outputs, stage)
        show_overlay(fixed, warped, opacity)
        return True

    def set_opacity(self, opacity: float) -> bool:
        if self.node("warped_volume") is None and self.node("warped_affine_volume") is None:
            return False
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").SetForegroundOpacity(float(opacity))
        return True

    def show_dvf(self, mode: str) -> bool:
        transform = self.node("deformable_transform")
        if transform is None:
            return False
        region = self.node("fixed_volume")
        set_dvf_display(transform, mode, region_node=region)
        return True
