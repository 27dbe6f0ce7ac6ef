"""gvsl_mrml: the one place that converts between MRML nodes and the gvsl engine.

Imports Slicer's MRML (``slicer``; the real application or the ``slicer-core`` wheel), VTK,
SimpleITK, numpy and gvsl; never Qt/CTK, so every ``*Lib`` package and the tests can use it
headless. Frames: MRML nodes are RAS, the engine (SimpleITK) is LPS; arrays are (z, y, x) on
both sides; engine transforms map fixed -> moving points (resampling direction).

Public API::

    volume_node_to_sitk(node) -> sitk.Image                     (gvsl_mrml.volumes)
    sitk_to_volume_node(image, scene, name, node=None, node_class=...) -> node
    sitk_labels_to_segmentation(image, scene, name, reference_volume_node, label_table=None, node=None)
    segmentation_to_sitk_labels(segmentation_node, reference_volume_node) -> (image, {name: value})
    labelmap_node_or_segmentation_to_sitk(node, reference_volume_node=None) -> (image, {name: value})
                                                                (gvsl_mrml.segmentations)
    affine_to_linear_transform_node(affine, scene, name, node=None)
    displacement_to_grid_transform_node(field, scene, name, node=None)
    nest_affine_under_deformable(linear_node, grid_node)
    transform_node_to_sitk(node)                                (gvsl_mrml.transforms)
    save_node(node, path), load_volume / load_segmentation / load_transform(path, scene)
                                                                (gvsl_mrml.io)
    headless_scene()                                            (gvsl_mrml.testing)
"""
from gvsl_mrml.volumes import (MRMLConversionError, check_scalar_volume_node, ijk_to_ras_from_sitk,
                               reference_image_from_volume_node, sitk_to_volume_node,
                               volume_node_to_sitk)
from gvsl_mrml.segmentations import (labelmap_node_or_segmentation_to_sitk, normalize_label_table,
                                     segment_names, segmentation_label_table,
                                     segmentation_to_sitk_labels, sitk_labels_to_segmentation)
from gvsl_mrml.transforms import (affine_matrix_lps, affine_to_linear_transform_node,
                                  displacement_to_grid_transform_node, grid_transform_node_to_sitk,
                                  linear_transform_node_to_sitk, nest_affine_under_deformable,
                                  transform_node_to_sitk, transform_points_from_world)
from gvsl_mrml.io import load_segmentation, load_transform, load_volume, save_node

__all__ = [
    "MRMLConversionError", "check_scalar_volume_node", "ijk_to_ras_from_sitk",
    "reference_image_from_volume_node", "sitk_to_volume_node", "volume_node_to_sitk",
    "labelmap_node_or_segmentation_to_sitk", "normalize_label_table", "segment_names",
    "segmentation_label_table", "segmentation_to_sitk_labels", "sitk_labels_to_segmentation",
    "affine_matrix_lps", "affine_to_linear_transform_node", "displacement_to_grid_transform_node",
    "grid_transform_node_to_sitk", "linear_transform_node_to_sitk", "nest_affine_under_deformable",
    "transform_node_to_sitk", "transform_points_from_world",
    "load_segmentation", "load_transform", "load_volume", "save_node",
]
