"""Save and load MRML nodes with storage nodes directly (no ``slicer.app`` needed).

A fresh storage node is used for every write, so saving never changes which file a node is
linked to; files are written atomically (a temporary file in the same folder, then a rename,
through :func:`gvsl.fsio.atomic_write`). Loading creates the node and links it to a new
storage node in the scene, as Slicer's own loaders do.

Formats (chosen by the file name): volumes and label maps ``.nrrd`` / ``.nii.gz`` / ``.mha``;
segmentations ``.seg.nrrd``; transforms ``.h5`` / ``.tfm`` (linear or displacement field) and
displacement-field images ``.nrrd`` / ``.nii.gz`` / ``.mha``. Files hold LPS; Slicer converts.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import SimpleITK as sitk

import slicer

from gvsl_mrml.volumes import MRMLConversionError, _node_label

PathLike = Union[str, os.PathLike]
DISPLACEMENT_IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")


def _storage_class_for(node) -> str:
    if node.IsA("vtkMRMLSegmentationNode"):
        return "vtkMRMLSegmentationStorageNode"
    if node.IsA("vtkMRMLTransformNode"):
        return "vtkMRMLTransformStorageNode"
    if node.IsA("vtkMRMLVolumeNode"):
        return "vtkMRMLVolumeArchetypeStorageNode"
    raise MRMLConversionError(f"saving {_node_label(node)} is not supported (volumes, segmentations and "
                              "transforms are).")


def _full_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".seg.nrrd", ".nii.gz") + DISPLACEMENT_IMAGE_SUFFIXES + (".h5", ".hdf5", ".tfm", ".txt", ".mat"):
        if name.endswith(suffix):
            return path.name[-len(suffix):]
    return path.suffix


def save_node(node, path: PathLike, compress: bool = True) -> Path:
    """Write ``node`` (volume, label map, segmentation or transform) to ``path`` atomically.

    Uses a fresh storage node of the right class; the node itself is not modified and stays
    linked to whatever storage node it had. Raises :class:`MRMLConversionError` on failure.
    """
    from gvsl.fsio import atomic_write

    path = Path(path)
    storage_class = _storage_class_for(node)
    suffix = _full_suffix(path)

    def write(tmp: str) -> None:
        folder = tempfile.mkdtemp(prefix=".gvsl-save-", dir=str(path.parent))
        try:
            target = os.path.join(folder, "node" + suffix)
            storage = getattr(slicer, storage_class)()
            storage.SetFileName(target)
            if hasattr(storage, "SetUseCompression"):
                storage.SetUseCompression(1 if compress else 0)
            if not storage.WriteData(node) or not os.path.exists(target):
                raise MRMLConversionError(f"could not write {_node_label(node)} to {path} (file type "
                                          f"'{suffix}' supported for this node?).")
            os.replace(target, tmp)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def _read(node, storage, path: Path, scene):
    storage.SetFileName(str(path))
    if not path.exists():
        scene.RemoveNode(node)
        raise MRMLConversionError(f"file not found: {path}")
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise MRMLConversionError(f"could not read {path} as {node.GetClassName()}.")
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def _default_name(path: Path) -> str:
    suffix = _full_suffix(path)
    return path.name[:-len(suffix)] if suffix and path.name.endswith(suffix) else path.stem


def load_volume(path: PathLike, scene, name: Optional[str] = None, labelmap: bool = False):
    """Read a volume (or, with ``labelmap``, a label map volume) file into a new node."""
    path = Path(path)
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode",
                                   name or _default_name(path))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetSingleFile(1)
    _read(node, storage, path, scene)
    node.CreateDefaultDisplayNodes()
    return node


def load_segmentation(path: PathLike, scene, name: Optional[str] = None):
    """Read a ``.seg.nrrd`` (or label map) file into a new segmentation node."""
    path = Path(path)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or _default_name(path))
    _read(node, slicer.vtkMRMLSegmentationStorageNode(), path, scene)
    node.CreateDefaultDisplayNodes()
    return node


def load_transform(path: PathLike, scene, name: Optional[str] = None, node_class: Optional[str] = None):
    """Read a transform file into a new transform node.

    ``node_class`` defaults to ``vtkMRMLGridTransformNode`` for displacement fields (image files,
    or .h5/.tfm holding a DisplacementFieldTransform), ``vtkMRMLTransformNode`` for composite
    transforms (e.g. ``gvsl register``'s composite.h5) and ``vtkMRMLLinearTransformNode``
    otherwise. Grid transforms are set to linear interpolation (Slicer reads them as cubic), which
    is what ITK/SimpleITK use, so the node maps points as SimpleITK does.
    """
    path = Path(path)
    if node_class is None:
        if path.name.lower().endswith(DISPLACEMENT_IMAGE_SUFFIXES):
            node_class = "vtkMRMLGridTransformNode"
        else:
            try:
                kind = sitk.ReadTransform(str(path)).Downcast().GetName()
            except RuntimeError as exc:
                raise MRMLConversionError(f"could not read {path} as a transform: {str(exc).splitlines()[-1]}") from None
            node_class = ("vtkMRMLGridTransformNode" if "Displacement" in kind else
                          "vtkMRMLTransformNode" if "Composite" in kind else "vtkMRMLLinearTransformNode")
    node = scene.AddNewNodeByClass(node_class, name or _default_name(path))
    _read(node, slicer.vtkMRMLTransformStorageNode(), path, scene)
    for transform in (node.GetTransformFromParent(), node.GetTransformToParent()):
        _linear_grid_interpolation(transform)
    return node


def _linear_grid_interpolation(transform) -> None:
    """Set every grid transform inside ``transform`` (concatenations included) to linear."""
    if transform is None:
        return
    if transform.IsA("vtkGridTransform"):
        transform.SetInterpolationModeToLinear()
    if transform.IsA("vtkGeneralTransform"):
        for i in range(transform.GetNumberOfConcatenatedTransforms()):
            _linear_grid_interpolation(transform.GetConcatenatedTransform(i))
