"""A headless MRML scene with the module logics GVSL needs (slicer-core wheel, no Qt).

:func:`headless_scene` builds once per process, as the GUIDE's checked recipe says:
``vtkSlicerApplicationLogic`` on a new ``vtkMRMLScene`` (set as ``slicer.mrmlScene``), its
colour logic with the default colour nodes, and the Volumes, Segmentations and Transforms
logics (``SetMRMLApplicationLogic`` -> ``SetMRMLScene`` -> ``app.SetModuleLogic``). The
Segmentations logic's ``SetMRMLScene`` registers the segmentation converter rules. When
``slicer.modules`` does not exist (no Slicer application), a small stand-in exposes
``slicer.modules.<name>.logic()`` for ``volumes``, ``segmentations`` and ``transforms``.

Later calls return the same scene after ``scene.Clear(0)`` (a few ms) unless ``clear=False``.
Inside the real Slicer application use ``slicer.mrmlScene`` instead.
"""
from __future__ import annotations

import types

import slicer

_STATE: dict = {}

_LOGICS = (("Volumes", "volumes", "vtkSlicerVolumesLogic"),
           ("Segmentations", "segmentations", "vtkSlicerSegmentationsModuleLogic"),
           ("Transforms", "transforms", "vtkSlicerTransformLogic"))


def _build():
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    color_logic = app.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    logics = {}
    for name, attribute, class_name in _LOGICS:
        logic = getattr(slicer, class_name)()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[attribute] = logic
    if not hasattr(slicer, "modules"):
        modules = types.SimpleNamespace()
        for attribute, logic in logics.items():
            setattr(modules, attribute, types.SimpleNamespace(logic=(lambda lg=logic: lg)))
        slicer.modules = modules
        _STATE["own_modules"] = True
    _STATE.update(scene=scene, app=app, color_logic=color_logic, logics=logics)


def headless_scene(clear: bool = True):
    """The process-wide headless scene (also ``slicer.mrmlScene``), cleared unless ``clear=False``."""
    if "scene" not in _STATE:
        _build()
    scene = _STATE["scene"]
    if clear:
        scene.Clear(0)
    slicer.mrmlScene = scene
    return scene


def module_logic(name: str):
    """``"volumes"`` | ``"segmentations"`` | ``"transforms"`` logic of the headless scene."""
    if "scene" not in _STATE:
        _build()
    return _STATE["logics"][name]


def add_slice_views(scene, names=("Red", "Yellow", "Green")):
    """Add one slice composite node per view name (what a layout would create), for overlay tests."""
    out = []
    for name in names:
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        out.append(composite)
    return out
