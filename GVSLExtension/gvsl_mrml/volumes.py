"""Volume nodes <-> SimpleITK images: the one place where RAS (Slicer) meets LPS (SimpleITK).

Frames
------
* A Slicer volume node holds its voxels in ``vtkImageData`` (origin 0, spacing 1) and its
  geometry in the 4x4 ``IJKToRAS`` matrix: ``ras = IJKToRAS @ (i, j, k, 1)``. Its numpy view is
  (K, J, I) = (z, y, x).
* A SimpleITK image is LPS: ``lps = origin + D @ diag(spacing) @ (i, j, k)``, with
  ``GetArrayFromImage`` also (z, y, x).
* ``F = diag(-1, -1, 1)`` flips RAS <-> LPS, so ``origin_lps = F @ origin_ras``,
  ``D_lps = F @ D_ras``; the spacing and the array are the same.

A node under a *linear* parent transform is converted with its world geometry
(``ToWorld @ IJKToRAS``) when that stays a rigid placement; anything else (scaling/shear, a
non-linear parent) is refused with the fix (harden the transform). Nodes are never modified.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from gvsl.errors import GVSLError

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # F: its own inverse
LPS_FROM_RAS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])


class MRMLConversionError(GVSLError, ValueError):
    """An MRML node that cannot be converted, with what is wrong and how to fix it."""


def _node_label(node) -> str:
    if node is None:
        return "None"
    return f"'{node.GetName()}' ({node.GetClassName()})"


def vtk_matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A 4x4 ``vtkMatrix4x4`` -> (4, 4) float64 numpy array (copy)."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def array_to_vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """(4, 4) numpy array -> new ``vtkMatrix4x4``."""
    array = np.asarray(array, dtype=np.float64)
    if array.shape != (4, 4):
        raise MRMLConversionError(f"expected a 4x4 matrix, got shape {array.shape}")
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


# ---------------------------------------------------------------------------------------------
# Geometry: IJKToRAS <-> (origin, spacing, direction) in LPS
# ---------------------------------------------------------------------------------------------
def ijk_to_ras_from_sitk(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJKToRAS matrix of a 3D SimpleITK image (LPS geometry) -> (4, 4) float64."""
    direction_lps = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = LPS_FROM_RAS @ direction_lps @ np.diag(spacing)
    ijk_to_ras[:3, 3] = LPS_FROM_RAS @ np.array(image.GetOrigin(), dtype=np.float64)
    return ijk_to_ras


def lps_geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, what: str = "volume",
                                 tolerance: float = 1e-4) -> Tuple[tuple, tuple, tuple]:
    """(4, 4) IJKToRAS -> ``(origin_lps, spacing, direction_lps)`` as SimpleITK wants them.

    The columns of the 3x3 part are ``D_ras[:, a] * spacing[a]``. Raises
    :class:`MRMLConversionError` if the columns are not orthogonal (a sheared grid, which
    SimpleITK cannot represent).
    """
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    columns = m[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise MRMLConversionError(f"{what}: zero voxel spacing in the IJK-to-RAS matrix {m.tolist()}")
    direction_ras = columns / spacing
    if np.abs(direction_ras.T @ direction_ras - np.eye(3)).max() > tolerance:
        raise MRMLConversionError(
            f"{what}: its voxel axes are not orthogonal (sheared grid, e.g. from a parent transform with "
            "shear or non-uniform scaling); SimpleITK cannot represent that. Harden the transform and "
            "resample the volume (Resample Scalar/Vector/DWI Volume module) first.")
    direction_lps = LPS_FROM_RAS @ direction_ras
    origin_lps = LPS_FROM_RAS @ m[:3, 3]
    return (tuple(float(v) for v in origin_lps), tuple(float(v) for v in spacing),
            tuple(float(v) for v in direction_lps.ravel()))


def _parent_to_world(node, what: str) -> Optional[np.ndarray]:
    parent = node.GetParentTransformNode()
    if parent is None:
        return None
    if not parent.IsTransformToWorldLinear():
        raise MRMLConversionError(
            f"{what} is under the non-linear transform {_node_label(parent)}. Harden the transform "
            "(Data module: right-click the volume > Harden transform) or remove it, then try again.")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return vtk_matrix_to_array(matrix)


def volume_ijk_to_world_ras(node, apply_parent_transform: bool = True) -> np.ndarray:
    """The node's IJK -> world RAS matrix (4, 4): ``ToWorld @ IJKToRAS`` (ToWorld = identity
    without a parent transform or with ``apply_parent_transform=False``)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = vtk_matrix_to_array(matrix)
    if apply_parent_transform:
        to_world = _parent_to_world(node, f"volume {_node_label(node)}")
        if to_world is not None:
            ijk_to_ras = to_world @ ijk_to_ras
    return ijk_to_ras


def check_scalar_volume_node(node, what: str = "volume") -> None:
    """Raise :class:`MRMLConversionError` unless ``node`` is a 3D single-component scalar volume."""
    if node is None:
        raise MRMLConversionError(f"no {what} selected; choose a scalar volume node.")
    if node.IsA("vtkMRMLSequenceNode"):
        raise MRMLConversionError(
            f"the {what} {_node_label(node)} is a sequence (4D data); select its proxy volume (the "
            "time point shown by the Sequences module) or extract one frame first.")
    if not node.IsA("vtkMRMLVolumeNode"):
        raise MRMLConversionError(f"the {what} {_node_label(node)} is not a volume node; choose a scalar volume.")
    if node.IsA("vtkMRMLTensorVolumeNode") or node.IsA("vtkMRMLMultiVolumeNode"):
        raise MRMLConversionError(
            f"the {what} {_node_label(node)} is a vector/RGB/tensor/multi-volume, but GVSL needs one "
            "intensity per voxel. Convert it with the 'Vector to Scalar Volume' module (e.g. luminance) "
            "or pick a single component/frame, then select the scalar volume.")
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise MRMLConversionError(f"the {what} {_node_label(node)} has no image data (empty volume); "
                                  "load or create the volume first.")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise MRMLConversionError(
            f"the {what} {_node_label(node)} has {components} components per voxel (vector/RGB), but GVSL "
            "needs one intensity per voxel. Convert it with the 'Vector to Scalar Volume' module first.")
    dims = image.GetDimensions()
    if min(dims) < 1 or np.prod(dims) == 0:
        raise MRMLConversionError(f"the {what} {_node_label(node)} is empty (dimensions {dims}).")


def volume_array_zyx(node) -> np.ndarray:
    """A *copy* of the node's voxels as (K, J, I) = (z, y, x) numpy array (scalar volumes)."""
    image = node.GetImageData()
    i, j, k = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return np.array(scalars, copy=True).reshape(k, j, i)


def volume_node_to_sitk(node, apply_parent_transform: bool = True, what: str = "volume") -> sitk.Image:
    """A scalar (or label map) volume node -> a new SimpleITK image (voxels copied, LPS geometry).

    The voxel type is kept. With ``apply_parent_transform`` a linear parent transform is folded
    into the geometry (world coordinates); a non-linear parent, shear or scaling is refused.
    Vector/RGB/tensor volumes, sequences and empty nodes raise :class:`MRMLConversionError`
    naming the node and the fix. The node is not modified.
    """
    check_scalar_volume_node(node, what)
    label = f"{what} {_node_label(node)}"
    origin, spacing, direction = lps_geometry_from_ijk_to_ras(
        volume_ijk_to_world_ras(node, apply_parent_transform), label)
    image = sitk.GetImageFromArray(volume_array_zyx(node))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def reference_image_from_volume_node(node, apply_parent_transform: bool = True,
                                     pixel_type=sitk.sitkUInt8) -> sitk.Image:
    """An empty (zero) SimpleITK image with the node's grid (LPS), without copying its voxels."""
    image = node.GetImageData()
    if image is None:
        raise MRMLConversionError(f"volume {_node_label(node)} has no image data.")
    origin, spacing, direction = lps_geometry_from_ijk_to_ras(
        volume_ijk_to_world_ras(node, apply_parent_transform), f"volume {_node_label(node)}")
    ref = sitk.Image([int(v) for v in image.GetDimensions()], pixel_type)
    ref.SetOrigin(origin)
    ref.SetSpacing(spacing)
    ref.SetDirection(direction)
    return ref


# numpy dtypes that VTK/Slicer display well; the rest are converted
_VTK_UNSAFE = {np.dtype(np.int64): np.int32, np.dtype(np.uint64): np.uint32, np.dtype(np.bool_): np.uint8}


def _vtk_image_from_array(array: np.ndarray, components: int) -> vtk.vtkImageData:
    if array.dtype in _VTK_UNSAFE:
        target = _VTK_UNSAFE[array.dtype]
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise MRMLConversionError(f"voxel values {array.min()}..{array.max()} do not fit {np.dtype(target).name}; "
                                      "rescale the image before converting it to a volume node.")
        array = array.astype(target)
    array = np.ascontiguousarray(array)
    k, j, i = array.shape[:3]
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    flat = array.reshape(-1, components) if components > 1 else array.reshape(-1)
    vtk_array = numpy_support.numpy_to_vtk(flat, deep=True,
                                           array_type=numpy_support.get_vtk_array_type(array.dtype))
    vtk_array.SetNumberOfComponents(components)
    image.GetPointData().SetScalars(vtk_array)
    return image


def sitk_to_volume_node(image: sitk.Image, scene, name: str, node=None,
                        node_class: str = "vtkMRMLScalarVolumeNode"):
    """Create (or fill ``node``) a volume node from a 3D SimpleITK image: voxels copied, LPS -> RAS.

    ``node_class``: ``vtkMRMLScalarVolumeNode`` (default), ``vtkMRMLLabelMapVolumeNode``, or
    ``vtkMRMLVectorVolumeNode`` (needed for multi-component images). A given ``node`` keeps its
    name and parent transform; the geometry set is its local IJKToRAS. Display nodes are created.
    Returns the node.
    """
    if not isinstance(image, sitk.Image):
        raise MRMLConversionError(f"expected a SimpleITK.Image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise MRMLConversionError(f"only 3D images can become volume nodes (got {image.GetDimension()}D '{name}').")
    components = image.GetNumberOfComponentsPerPixel()
    target_class = node.GetClassName() if node is not None else node_class
    if components > 1 and not (node is not None and node.IsA("vtkMRMLVectorVolumeNode")) \
            and target_class != "vtkMRMLVectorVolumeNode":
        raise MRMLConversionError(f"image '{name}' has {components} components per voxel; use "
                                  "node_class='vtkMRMLVectorVolumeNode' for vector images.")
    if node is None:
        if scene is None:
            raise MRMLConversionError("no MRML scene given to create the volume node in.")
        node = scene.AddNewNodeByClass(node_class, name)
        if node is None:
            raise MRMLConversionError(f"could not create a '{node_class}' node (not a volume node class?).")
    array = sitk.GetArrayFromImage(image)  # a copy, (z, y, x[, c])
    vtk_image = _vtk_image_from_array(array, components)
    node.SetIJKToRASMatrix(array_to_vtk_matrix(ijk_to_ras_from_sitk(image)))
    node.SetAndObserveImageData(vtk_image)
    if node.GetScene() is not None and node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node
