"""Label maps (SimpleITK, integer per voxel, LPS) <-> segmentation nodes.

* :func:`sitk_labels_to_segmentation`: a label map becomes segments through Slicer's own
  ``ImportLabelmapToSegmentationNode`` (via a temporary label map volume and a temporary colour
  table holding names and colours, so segments get names); terminology tags come from a
  :class:`gvsl.labels.LabelTable` (``Label.terminology_tag()``) or a plain mapping.
* :func:`segmentation_to_sitk_labels`: visible segments -> one label map on a reference
  volume's grid, value = segment index + 1 (or a given name -> value mapping), plus the
  name -> value map used.
* :func:`labelmap_node_or_segmentation_to_sitk`: either kind of node -> (label map, names).

Temporary nodes are removed again; the input nodes are not modified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import vtk

import slicer

from gvsl_mrml.volumes import (MRMLConversionError, _node_label, reference_image_from_volume_node,
                               sitk_to_volume_node, volume_node_to_sitk)

# A fallback palette (RGB 0..1) for labels without a colour.
_PALETTE = [(0.90, 0.10, 0.10), (0.10, 0.60, 0.90), (0.20, 0.75, 0.25), (0.95, 0.75, 0.10),
            (0.60, 0.30, 0.80), (0.95, 0.50, 0.15), (0.10, 0.80, 0.75), (0.85, 0.35, 0.60),
            (0.55, 0.55, 0.20), (0.40, 0.40, 0.95)]


@dataclass
class LabelSpec:
    """One label value's segment: name, colour (RGB floats 0..1) and terminology tag (or "")."""
    value: int
    name: str
    color: Tuple[float, float, float]
    terminology: str = ""


def _color01(color) -> Tuple[float, float, float]:
    rgb = [float(c) for c in list(color)[:3]]
    if any(c > 1.0 for c in rgb):
        rgb = [c / 255.0 for c in rgb]
    return tuple(min(max(c, 0.0), 1.0) for c in rgb)


def _default_spec(value: int) -> LabelSpec:
    return LabelSpec(int(value), f"Label {int(value)}", _PALETTE[int(value) % len(_PALETTE)])


def normalize_label_table(label_table) -> Dict[int, LabelSpec]:
    """Accepted ``label_table`` forms -> {value: LabelSpec}:

    * None -> {} (names "Label <v>", palette colours);
    * a :class:`gvsl.labels.LabelTable` or any iterable of objects with ``value``, ``name`` and
      optionally ``color_rgb`` (0..255) / ``color`` and ``terminology_tag()`` / ``terminology``;
    * a mapping ``{value: name}``, ``{value: (name, color)}`` or
      ``{value: {"name": ..., "color": ..., "terminology": ...}}`` (colours 0..1 or 0..255).
    """
    specs: Dict[int, LabelSpec] = {}
    if label_table is None:
        return specs
    if isinstance(label_table, Mapping):
        for value, entry in label_table.items():
            value = int(value)
            spec = _default_spec(value)
            if isinstance(entry, str):
                spec.name = entry
            elif isinstance(entry, Mapping):
                spec.name = str(entry.get("name", spec.name))
                if entry.get("color") is not None:
                    spec.color = _color01(entry["color"])
                spec.terminology = str(entry.get("terminology") or "")
            else:
                entry = list(entry)
                spec.name = str(entry[0])
                if len(entry) > 1 and entry[1] is not None:
                    spec.color = _color01(entry[1])
                if len(entry) > 2 and entry[2]:
                    spec.terminology = str(entry[2])
            specs[value] = spec
        return specs
    for label in label_table:
        if not hasattr(label, "value") or not hasattr(label, "name"):
            raise MRMLConversionError(f"label table entries need 'value' and 'name' (got {label!r})")
        spec = _default_spec(int(label.value))
        spec.name = str(label.name)
        color = getattr(label, "color_rgb", None) or getattr(label, "color", None)
        if color is not None:
            spec.color = _color01(color)
        tag = getattr(label, "terminology_tag", None)
        if callable(tag):
            spec.terminology = str(tag() or "")
        elif getattr(label, "terminology", None):
            spec.terminology = str(label.terminology)
        specs[spec.value] = spec
    return specs


def _integer_labels(image: sitk.Image, what: str) -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MRMLConversionError(f"{what} must have one value per voxel (a label map).")
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(np.mod(arr, 1) == 0):
            raise MRMLConversionError(f"{what} has non-integer values; pass a label map (integer per voxel).")
    if arr.size and (arr.min() < 0):
        raise MRMLConversionError(f"{what} has negative values ({arr.min()}); label values must be >= 0.")
    if arr.size and arr.max() > np.iinfo(np.int32).max:
        raise MRMLConversionError(f"{what} has values above {np.iinfo(np.int32).max}.")
    return image if image.GetPixelID() == sitk.sitkInt32 else sitk.Cast(image, sitk.sitkInt32)


def _segmentations_logic_class():
    return slicer.vtkSlicerSegmentationsModuleLogic


def _color_table_node(scene, specs: List[LabelSpec]):
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "GVSL temporary labels")
    table.SetTypeToUser()
    table.SetHideFromEditors(True)
    table.SetNumberOfColors(max([s.value for s in specs] + [0]) + 1)
    table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for spec in specs:
        table.SetColor(spec.value, spec.name, *spec.color, 1.0)
    return table


def sitk_labels_to_segmentation(image: sitk.Image, scene, name: str, reference_volume_node,
                                label_table=None, node=None, include_empty: bool = False):
    """A label map (integer per voxel, LPS geometry) -> a segmentation node (created, or ``node``
    emptied and filled). One segment per non-zero value present, named and coloured from
    ``label_table`` (see :func:`normalize_label_table`; default "Label <v>") with its terminology
    tag when known. ``include_empty`` adds an empty segment for every table entry absent from
    the image (so a propagated segmentation keeps every name). Segments are ordered by value.
    The segmentation's reference geometry is ``reference_volume_node``. Returns the node.
    """
    if scene is None:
        raise MRMLConversionError("no MRML scene given to create the segmentation in.")
    labels = _integer_labels(image, f"label map for '{name}'")
    table = normalize_label_table(label_table)
    present = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v != 0]
    specs = {v: table.get(v, _default_spec(v)) for v in present}
    if include_empty:
        for value, spec in table.items():
            specs.setdefault(value, spec)
    ordered = [specs[v] for v in sorted(specs)]
    names = [s.name for s in ordered]
    if len(set(names)) != len(names):
        raise MRMLConversionError(f"label names must be unique to become segments, got {names}")

    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
    elif not node.IsA("vtkMRMLSegmentationNode"):
        raise MRMLConversionError(f"{_node_label(node)} is not a segmentation node.")
    else:
        node.GetSegmentation().RemoveAllSegments()
    if reference_volume_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)

    temp_nodes = []
    try:
        if present:
            labelmap = sitk_to_volume_node(labels, scene, "GVSL temporary labelmap",
                                           node_class="vtkMRMLLabelMapVolumeNode")
            temp_nodes.append(labelmap)
            colors = _color_table_node(scene, [specs[v] for v in present])
            temp_nodes.append(colors)
            labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
            if not _segmentations_logic_class().ImportLabelmapToSegmentationNode(labelmap, node):
                raise MRMLConversionError(
                    f"Slicer could not import the label map into segmentation '{name}' (are the "
                    "Segmentations module's converters registered? In a headless scene use "
                    "gvsl_mrml.testing.headless_scene()).")
    finally:
        for temp in temp_nodes:
            scene.RemoveNode(temp)

    segmentation = node.GetSegmentation()
    by_name = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
               for i in range(segmentation.GetNumberOfSegments())}
    for spec in ordered:
        segment_id = by_name.get(spec.name)
        if segment_id is None:
            segment_id = segmentation.AddEmptySegment("", spec.name, list(spec.color))
        segment = segmentation.GetSegment(segment_id)
        segment.SetColor(*spec.color)
        if spec.terminology:
            segment.SetTag(segment.GetTerminologyEntryTagName(), spec.terminology)
    for index, spec in enumerate(ordered):
        segmentation.SetSegmentIndex(segmentation.GetSegmentIdBySegmentName(spec.name), index)
    return node


def segment_names(segmentation_node, visible_only: bool = False) -> List[str]:
    """Segment names in the segmentation's order (only visible ones with ``visible_only``)."""
    return [segmentation_node.GetSegmentation().GetSegment(sid).GetName()
            for sid in _segment_ids(segmentation_node, visible_only)]


def _segment_ids(segmentation_node, visible_only: bool) -> List[str]:
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    display = segmentation_node.GetDisplayNode()
    if visible_only and display is not None:
        ids = [sid for sid in ids if display.GetSegmentVisibility(sid)]
    return ids


def segment_terminology(segmentation_node) -> Dict[str, str]:
    """{segment name: terminology tag} for segments that carry one."""
    out = {}
    segmentation = segmentation_node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        tag = vtk.reference("")
        if segment.GetTag(segment.GetTerminologyEntryTagName(), tag) and str(tag):
            out[segment.GetName()] = str(tag)
    return out


def segmentation_label_table(segmentation_node, name_to_value: Mapping[str, int]) -> Dict[int, dict]:
    """A ``label_table`` mapping for :func:`sitk_labels_to_segmentation` that copies names,
    colours and terminology of ``segmentation_node``'s segments: {value: {name, color, terminology}}."""
    segmentation = segmentation_node.GetSegmentation()
    tags = segment_terminology(segmentation_node)
    table = {}
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        if segment.GetName() in name_to_value:
            table[int(name_to_value[segment.GetName()])] = {
                "name": segment.GetName(), "color": tuple(segment.GetColor()),
                "terminology": tags.get(segment.GetName(), "")}
    return table


def _color_node_ids(scene) -> set:
    return {scene.GetNthNodeByClass(i, "vtkMRMLColorNode").GetID()
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorNode"))}


UNNAMED_COLOR_NAMES = ("", "(none)", "invalid")  # "(none)": Slicer 5.8; "": 5.10+


def label_names(color_node, values) -> Dict[str, int]:
    """{name: value} for label ``values`` from a colour node: unnamed entries ("", "(none)",
    "invalid", any case) become "Label <v>"; a name used by two values gets " (<v>)" appended,
    so no label is merged with another or lost."""
    names: Dict[str, int] = {}
    for value in values:
        name = ""
        if color_node is not None and 0 <= value < color_node.GetNumberOfColors():
            name = (color_node.GetColorName(value) or "").strip()
        if name.lower() in UNNAMED_COLOR_NAMES:
            name = f"Label {value}"
        if name in names:
            name = f"{name} ({value})"
        names[name] = value
    return names


def _smallest_label_type(max_value: int):
    if max_value <= np.iinfo(np.uint8).max:
        return np.uint8
    if max_value <= np.iinfo(np.uint16).max:
        return np.uint16
    return np.int32


def segmentation_to_sitk_labels(segmentation_node, reference_volume_node,
                                segment_values: Optional[Mapping[str, int]] = None,
                                visible_only: bool = True) -> Tuple[sitk.Image, Dict[str, int]]:
    """Visible segments -> one label map on ``reference_volume_node``'s grid (LPS, world
    geometry as :func:`gvsl_mrml.volumes.volume_node_to_sitk` gives it).

    Value of a segment: its index in the segmentation + 1, or ``segment_values[name]`` when a
    mapping is given (then only segments named in it are exported). Where segments overlap the
    later one wins. Returns ``(label image (uint8/uint16/int32), {segment name: value})``.
    The segmentation node is not modified.
    """
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise MRMLConversionError(f"{_node_label(segmentation_node)} is not a segmentation node.")
    if reference_volume_node is None:
        raise MRMLConversionError(f"a reference volume is needed to export segmentation "
                                  f"{_node_label(segmentation_node)} to a label map.")
    segmentation = segmentation_node.GetSegmentation()
    all_ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    ids = _segment_ids(segmentation_node, visible_only)
    values: Dict[str, int] = {}
    export_ids: List[str] = []
    for sid in ids:
        seg_name = segmentation.GetSegment(sid).GetName()
        if segment_values is not None:
            if seg_name not in segment_values:
                continue
            value = int(segment_values[seg_name])
        else:
            value = all_ids.index(sid) + 1
        if value <= 0:
            raise MRMLConversionError(f"segment '{seg_name}': label value must be >= 1 (got {value}).")
        if seg_name in values:
            raise MRMLConversionError(f"segmentation {_node_label(segmentation_node)} has two segments "
                                      f"named '{seg_name}'; rename one.")
        values[seg_name] = value
        export_ids.append(sid)

    reference = reference_image_from_volume_node(reference_volume_node)
    if not export_ids:
        return reference, values
    scene = segmentation_node.GetScene()
    colors_before = _color_node_ids(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "GVSL temporary export")
    try:
        id_array = vtk.vtkStringArray()
        for sid in export_ids:
            id_array.InsertNextValue(sid)
        ok = _segmentations_logic_class().ExportSegmentsToLabelmapNode(
            segmentation_node, id_array, labelmap, reference_volume_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if not ok:
            raise MRMLConversionError(f"Slicer could not export segmentation {_node_label(segmentation_node)} "
                                      "to a label map.")
        exported = volume_node_to_sitk(labelmap, apply_parent_transform=False, what="exported label map")
    finally:
        scene.RemoveNode(labelmap)
        # ExportSegmentsToLabelmapNode also adds a visible "<segmentation>_ColorTable" node
        for node_id in _color_node_ids(scene) - colors_before:
            scene.RemoveNode(scene.GetNodeByID(node_id))
    order = np.asarray(sitk.GetArrayViewFromImage(exported)).astype(np.int64)
    lut = np.zeros(len(export_ids) + 1, dtype=np.int64)
    for position, sid in enumerate(export_ids, start=1):
        lut[position] = values[segmentation.GetSegment(sid).GetName()]
    dtype = _smallest_label_type(int(lut.max()))
    out = sitk.GetImageFromArray(lut[np.clip(order, 0, len(export_ids))].astype(dtype))
    if tuple(exported.GetSize()) == tuple(reference.GetSize()):
        out.CopyInformation(reference)
    else:  # defensive: Slicer used another extent; put the labels on the reference grid
        out.CopyInformation(exported)
        out = sitk.Resample(out, reference, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor, 0,
                            out.GetPixelID())
    return out, values


def labelmap_node_or_segmentation_to_sitk(node, reference_volume_node=None,
                                          segment_values: Optional[Mapping[str, int]] = None,
                                          visible_only: bool = True) -> Tuple[sitk.Image, Dict[str, int]]:
    """A segmentation node or a label map volume node -> ``(label image, {name: value})``.

    Segmentation: see :func:`segmentation_to_sitk_labels` (reference defaults to the
    segmentation's reference-geometry volume). Label map volume: its voxels (values kept, or
    renamed to ``segment_values[name]`` when given; names from its colour table, else
    "Label <v>"), resampled (nearest) onto ``reference_volume_node``'s grid when given.
    """
    if node is None:
        raise MRMLConversionError("no segmentation or label map selected.")
    if node.IsA("vtkMRMLSegmentationNode"):
        if reference_volume_node is None:
            reference_volume_node = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole())
        return segmentation_to_sitk_labels(node, reference_volume_node, segment_values, visible_only)
    if not node.IsA("vtkMRMLVolumeNode"):
        raise MRMLConversionError(f"{_node_label(node)} is neither a segmentation nor a label map volume.")
    image = _integer_labels(volume_node_to_sitk(node, what="label map"), f"label map {_node_label(node)}")
    arr = sitk.GetArrayFromImage(image)
    display = node.GetDisplayNode()
    colors = display.GetColorNode() if display is not None else None
    names = label_names(colors, [int(v) for v in np.unique(arr) if v != 0])
    if segment_values is not None:
        lut_out = np.zeros_like(arr)
        kept = {}
        for label_name, value in names.items():
            if label_name in segment_values:
                lut_out[arr == value] = int(segment_values[label_name])
                kept[label_name] = int(segment_values[label_name])
        new = sitk.GetImageFromArray(lut_out)
        new.CopyInformation(image)
        image, names = new, kept
    if reference_volume_node is not None:
        reference = reference_image_from_volume_node(reference_volume_node)
        image = sitk.Resample(image, reference, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor, 0,
                              image.GetPixelID())
    return image, names
