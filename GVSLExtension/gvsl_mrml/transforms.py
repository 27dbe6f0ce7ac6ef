"""Engine transforms (SimpleITK, LPS, resampling direction) <-> Slicer transform nodes (RAS).

Conventions, derived once
-------------------------
* The engine (ITK) transform ``T`` maps a FIXED point to the MOVING point it samples
  (resampling direction), in LPS mm: ``x_moving = T(x_fixed)``.
* Slicer: a node placed under transform node ``N`` is shown at ``world = N.ToParent(local)``;
  so the moving volume under ``N`` lines up with the fixed one when, for every fixed world
  point ``p`` (RAS), ``N.FromParent(p)`` is the moving point (RAS) that belongs there. Hence
  ``FromParent = F o T o F`` with ``F = diag(-1, -1, 1)`` (RAS <-> LPS), i.e. FromParent is the
  *resampling* transform, and ToParent is its inverse. That is also what Slicer writes to
  .tfm/.h5 files (``T_file = F . FromParent . F = T``), so files written here read back in
  SimpleITK as the engine's transform.
* Grid transforms: a ``vtkOrientedGridTransform`` built from a displacement image maps
  ``p -> p + d(p)`` (world RAS, linear interpolation, edge values extended outside the grid).
  Set with ``SetAndObserveTransformFromParent``, ``FromParent.TransformPoint(p) = p + d(p)``
  (measured): it is the resampling transform. (Set with ``SetAndObserveTransformToParent``
  instead, ToParent would move points by +d and FromParent, its inverse, by about -d.) ITK's
  ``DisplacementFieldTransform`` is ``x -> x + u(x)`` in LPS, so ``d(p) = F u(F p)``: the
  vectors' x and y components flip sign, the grid's origin and direction flip like any image.
  Inside the grid the two agree to float precision; outside, ITK uses zero displacement while
  VTK extends the edge.
* Composition. The engine's composite is ``p -> A(p + u(p))`` (deformable first, then the
  affine; ``sitk.CompositeTransform([affine, deformable])``). Slicer concatenates the
  resampling transforms of a hierarchy from the world inward: a node under ``L`` under ``G``
  has ``FromWorld = L.FromParent o G.FromParent``. So the hierarchy that reproduces the
  composite is **moving volume -> under the linear (affine) node -> under the grid
  (deformable) node**: ``FromWorld(p) = F A F (p + d(p))``. :func:`nest_affine_under_deformable`
  builds it; ``linear_node.GetTransformFromWorld(t)`` then equals the composite (tested).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

from gvsl_mrml.volumes import (LPS_FROM_RAS, LPS_FROM_RAS_4, MRMLConversionError, _node_label,
                               array_to_vtk_matrix, vtk_matrix_to_array)

RAS_FROM_LPS_VECTOR = np.array([-1.0, -1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------
def _downcast(transform: sitk.Transform) -> sitk.Transform:
    return transform.Downcast() if hasattr(transform, "Downcast") else transform


def affine_matrix_lps(affine: sitk.Transform) -> np.ndarray:
    """A linear SimpleITK transform (Affine, Euler, Similarity, Versor..., LPS mm, fixed -> moving)
    -> (4, 4) homogeneous matrix ``T`` with ``T @ (x, 1) = A (x - c) + c + t``."""
    affine = _downcast(affine)
    if not all(hasattr(affine, m) for m in ("GetMatrix", "GetTranslation")):
        raise MRMLConversionError(f"expected a linear SimpleITK transform (e.g. AffineTransform), got "
                                  f"{affine.GetName() if hasattr(affine, 'GetName') else type(affine).__name__}")
    if affine.GetDimension() != 3:
        raise MRMLConversionError(f"expected a 3D transform, got {affine.GetDimension()}D")
    a = np.array(affine.GetMatrix(), dtype=np.float64).reshape(3, 3)
    t = np.array(affine.GetTranslation(), dtype=np.float64)
    c = np.array(affine.GetCenter(), dtype=np.float64) if hasattr(affine, "GetCenter") else np.zeros(3)
    matrix = np.eye(4)
    matrix[:3, :3] = a
    matrix[:3, 3] = t + c - a @ c
    return matrix


def resampling_matrix_ras(affine: sitk.Transform) -> np.ndarray:
    """``F T F``: the engine affine as a RAS 4x4 matrix mapping fixed (world) to moving points."""
    return LPS_FROM_RAS_4 @ affine_matrix_lps(affine) @ LPS_FROM_RAS_4


def affine_to_linear_transform_node(affine: sitk.Transform, scene, name: str, node=None):
    """Create (or fill ``node``) a ``vtkMRMLLinearTransformNode`` from an engine affine.

    ``affine`` maps FIXED to MOVING points in LPS mm (ITK resampling direction). The node's
    FromParent is set to ``F . T . F`` (RAS; ``F = diag(-1, -1, 1, 1)``), so its ToParent is the
    inverse: a moving volume placed under the node is displayed aligned with the fixed volume
    (see the module docstring for the derivation). Returns the node.
    """
    matrix = resampling_matrix_ras(affine)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    elif not node.IsA("vtkMRMLLinearTransformNode"):
        raise MRMLConversionError(f"{_node_label(node)} is not a linear transform node.")
    node.SetMatrixTransformFromParent(array_to_vtk_matrix(matrix))
    return node


def linear_transform_node_to_sitk(node) -> sitk.AffineTransform:
    """The node's FromParent (RAS) -> the engine affine (LPS, fixed -> moving): ``F . M . F``."""
    if node is None or not node.IsLinear():
        raise MRMLConversionError(f"{_node_label(node)} is not a linear transform.")
    matrix = vtk.vtkMatrix4x4()
    node.GetMatrixTransformFromParent(matrix)
    t = LPS_FROM_RAS_4 @ vtk_matrix_to_array(matrix) @ LPS_FROM_RAS_4
    out = sitk.AffineTransform(3)
    out.SetMatrix(t[:3, :3].ravel().tolist())
    out.SetTranslation(t[:3, 3].tolist())
    return out


# ---------------------------------------------------------------------------------------------
# Deformable (grid)
# ---------------------------------------------------------------------------------------------
def _displacement_image(field: Union[sitk.Image, sitk.Transform]) -> sitk.Image:
    if isinstance(field, sitk.Transform):
        field = _downcast(field)
        if not hasattr(field, "GetDisplacementField"):
            raise MRMLConversionError(f"expected a DisplacementFieldTransform, got {field.GetName()}")
        field = field.GetDisplacementField()  # a copy
    if not isinstance(field, sitk.Image):
        raise MRMLConversionError(f"expected a displacement image or DisplacementFieldTransform, got "
                                  f"{type(field).__name__}")
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise MRMLConversionError(
            f"a displacement field must be a 3D image with 3 components (x, y, z in LPS mm) per voxel; got "
            f"{field.GetDimension()}D with {field.GetNumberOfComponentsPerPixel()} component(s).")
    return field


def displacement_to_grid_transform_node(displacement_field: Union[sitk.Image, sitk.Transform], scene,
                                        name: str, node=None, dtype=np.float32):
    """Create (or fill ``node``) a ``vtkMRMLGridTransformNode`` whose FromParent (resampling
    direction) is ``p -> p + d(p)``, the field given in LPS.

    displacement_field: a vector image (components (x, y, z) LPS mm, on any oblique grid) or a
        ``sitk.DisplacementFieldTransform`` (its field is copied; the transform is not modified).
    The vtkImageData gets dims (I, J, K), the RAS origin ``F @ origin`` and the spacing; the
    grid direction matrix is ``F @ D``; vectors become RAS (``d = F u``). Linear interpolation
    (ITK's); stored as ``dtype`` (float32 halves the memory, ~1e-6 mm rounding). Returns the node.
    """
    field = _displacement_image(displacement_field)
    vectors_lps = sitk.GetArrayViewFromImage(field)  # (K, J, I, 3), a view
    vectors_ras = np.ascontiguousarray(vectors_lps * RAS_FROM_LPS_VECTOR, dtype=dtype)
    k, j, i = vectors_ras.shape[:3]
    grid = vtk.vtkImageData()
    grid.SetDimensions(i, j, k)
    grid.SetOrigin(*(LPS_FROM_RAS @ np.array(field.GetOrigin(), dtype=np.float64)).tolist())
    grid.SetSpacing(*[float(v) for v in field.GetSpacing()])
    vtk_vectors = numpy_support.numpy_to_vtk(vectors_ras.reshape(-1, 3), deep=True)
    vtk_vectors.SetNumberOfComponents(3)
    vtk_vectors.SetName("displacement_ras_mm")
    grid.GetPointData().SetScalars(vtk_vectors)
    direction = np.eye(4)
    direction[:3, :3] = LPS_FROM_RAS @ np.array(field.GetDirection(), dtype=np.float64).reshape(3, 3)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(array_to_vtk_matrix(direction))
    transform.SetInterpolationModeToLinear()
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    elif not node.IsA("vtkMRMLTransformNode"):
        raise MRMLConversionError(f"{_node_label(node)} is not a transform node.")
    node.SetAndObserveTransformFromParent(transform)
    return node


def _grid_from_parent(node):
    if node is None or not node.IsA("vtkMRMLTransformNode"):
        raise MRMLConversionError(f"{_node_label(node)} is not a transform node.")
    transform = node.GetTransformFromParent()
    if transform is None or not transform.IsA("vtkOrientedGridTransform"):
        name = transform.GetClassName() if transform is not None else "nothing"
        raise MRMLConversionError(f"{_node_label(node)} holds {name}, not a single grid transform.")
    if transform.GetInverseFlag():
        raise MRMLConversionError(
            f"{_node_label(node)} stores its grid as ToParent, so its resampling transform is only the "
            "iterative inverse of the grid; it cannot be exported exactly as a displacement field.")
    transform.Update()
    return transform


def grid_transform_node_to_sitk(node) -> sitk.DisplacementFieldTransform:
    """A grid node whose FromParent is a grid -> ``sitk.DisplacementFieldTransform`` (LPS)."""
    transform = _grid_from_parent(node)
    grid = transform.GetDisplacementGrid()
    i, j, k = grid.GetDimensions()
    vectors_ras = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).reshape(k, j, i, 3)
    image = sitk.GetImageFromArray(np.asarray(vectors_ras * RAS_FROM_LPS_VECTOR, dtype=np.float64),
                                   isVector=True)
    image.SetOrigin((LPS_FROM_RAS @ np.array(grid.GetOrigin())).tolist())
    image.SetSpacing(grid.GetSpacing())
    direction = vtk_matrix_to_array(transform.GetGridDirectionMatrix())[:3, :3] \
        if transform.GetGridDirectionMatrix() is not None else np.eye(3)
    image.SetDirection((LPS_FROM_RAS @ direction).ravel().tolist())
    return sitk.DisplacementFieldTransform(image)


def transform_node_to_sitk(node) -> sitk.Transform:
    """A linear or grid transform node (its own FromParent, parents ignored) -> SimpleITK (LPS)."""
    if node is not None and node.IsA("vtkMRMLTransformNode") and node.IsLinear():
        return linear_transform_node_to_sitk(node)
    return grid_transform_node_to_sitk(node)


# ---------------------------------------------------------------------------------------------
# Hierarchy and point mapping
# ---------------------------------------------------------------------------------------------
def nest_affine_under_deformable(linear_node, grid_node) -> None:
    """Put ``linear_node`` under ``grid_node``, so that a volume placed under ``linear_node`` is
    resampled with ``p -> A(p + u(p))``, the engine's composite (see the module docstring)."""
    linear_node.SetAndObserveTransformNodeID(grid_node.GetID() if grid_node is not None else None)


def transform_points_from_world(node, points_ras: np.ndarray) -> np.ndarray:
    """Map world RAS points (N, 3) into the local frame of children of ``node`` (through the
    whole hierarchy above and including it): the resampling direction."""
    transform = vtk.vtkGeneralTransform()
    node.GetTransformFromWorld(transform)
    pts = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    return np.array([transform.TransformPoint(p.tolist()) for p in pts])


def transform_points_lps(transform: sitk.Transform, points_lps: np.ndarray) -> np.ndarray:
    """SimpleITK ``TransformPoint`` on (N, 3) LPS points."""
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    return np.array([transform.TransformPoint(p.tolist()) for p in pts])


def ras_to_lps_points(points: np.ndarray) -> np.ndarray:
    """(N, 3) RAS <-> LPS (the same flip both ways)."""
    return np.asarray(points, dtype=np.float64) * RAS_FROM_LPS_VECTOR
