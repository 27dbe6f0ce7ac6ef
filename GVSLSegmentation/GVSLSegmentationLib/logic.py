"""Segment a volume node with a fine-tuned GVSL model into a segmentation node (MRML, no Qt).

Data flow: volume node -> :func:`gvsl_mrml.volume_node_to_sitk` (the node's own frame, LPS) ->
:func:`gvsl.seginfer.segment` (labels in the task's source values on the volume's exact grid) ->
:func:`gvsl_mrml.sitk_labels_to_segmentation` with the model's label table: one segment per
structure with the table's name, colour and terminology tag (``include_empty``: every structure
of the table gets a segment, even when nothing was found, so names are stable). The
segmentation's reference geometry is the input volume and it is placed under the volume's
parent transform, so it overlays the volume wherever the volume is. The input volume is never
modified. Each segment keeps its source label value in the ``GVSL.labelValue`` tag, and the node
remembers the model in the ``GVSL.model`` attribute.
"""
from __future__ import annotations

import os
from pathlib import PurePath
from typing import Optional

import gvsl_mrml
from gvsl_mrml.volumes import MRMLConversionError

ATTRIBUTE_MODEL = "GVSL.model"
TAG_LABEL_VALUE = "GVSL.labelValue"
REFERENCE_INPUT = "GVSL.input"


class SegmentationInputError(ValueError):
    """Inputs that cannot be segmented; the message says what to change."""


def validate_inputs(volume_node, model_path) -> Optional[str]:
    """Why Apply cannot run (shown on the disabled button), or None."""
    if volume_node is None:
        return "Select the input volume to segment."
    try:
        gvsl_mrml.check_scalar_volume_node(volume_node, "input volume")
    except MRMLConversionError as exc:
        return str(exc)
    if not model_path:
        return "Choose a segmentation model (a seg_best.pt from 'gvsl finetune' or the Fine-tune section)."
    if not os.path.isfile(str(model_path)):
        return f"Model file not found: {model_path}"
    return None


def load_segmentation_model(model, device="cpu"):
    """A model path -> loaded segmentation model (errors say when it is another kind of file)."""
    if isinstance(model, (str, PurePath)):
        from gvsl.checkpoint import load_model
        return load_model(model, "cpu", kind="segmentation")
    return model


def labels_to_segmentation(labels, table, scene, name: str, reference_volume_node, node=None):
    """A label map (sitk, the table's source values) -> segmentation node with the table's
    names, colours, terminology and ``GVSL.labelValue`` tags; reference geometry = the volume."""
    node = gvsl_mrml.sitk_labels_to_segmentation(labels, scene, name, reference_volume_node, label_table=table,
                                                 node=node, include_empty=True)
    segmentation = node.GetSegmentation()
    by_name = {lab.name: lab.value for lab in table}
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        if segment.GetName() in by_name:
            segment.SetTag(TAG_LABEL_VALUE, str(by_name[segment.GetName()]))
    parent = reference_volume_node.GetParentTransformNode() if reference_volume_node is not None else None
    node.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)
    if reference_volume_node is not None:
        node.SetNodeReferenceID(REFERENCE_INPUT, reference_volume_node.GetID())
    return node


def show_3d(segmentation_node, show: bool = True) -> None:
    """Create (or remove) the closed-surface representation so the segments show in 3D views."""
    if show:
        segmentation_node.CreateClosedSurfaceRepresentation()
    else:
        segmentation_node.RemoveClosedSurfaceRepresentation()


def segment_volume(volume_node, model_path, device: str = "auto", segmentation_node=None, *,
                   show_3d_surfaces: bool = False, progress=None, cancel=None, window: Optional[int] = None):
    """Segment ``volume_node`` with a segmentation model -> the segmentation node (new unless
    ``segmentation_node`` is given, then emptied and filled). Console API; blocking.

    model_path: a segmentation checkpoint from ``gvsl finetune`` (or a loaded model); device:
    "auto" | "cpu" | "cuda" | "cuda:N" | "mps". Timings, device and voxel counts per structure are
    in the node's ``GVSL.result`` attribute (JSON).
    """
    import json

    from gvsl.progress import json_safe
    from gvsl.seginfer import segment
    is_path = isinstance(model_path, (str, PurePath))
    problem = validate_inputs(volume_node, model_path) if is_path else \
        (None if volume_node is not None else "Select the input volume to segment.")
    if problem:
        raise SegmentationInputError(problem)
    model = load_segmentation_model(model_path)
    image = gvsl_mrml.volume_node_to_sitk(volume_node, apply_parent_transform=False, what="input volume")
    result = segment(image, model, device, progress=progress, cancel=cancel, window=window)
    scene = volume_node.GetScene()
    name = segmentation_node.GetName() if segmentation_node is not None else f"{volume_node.GetName()} segmentation (GVSL)"
    node = labels_to_segmentation(result.labels, result.table, scene, name, volume_node, node=segmentation_node)
    node.SetAttribute(ATTRIBUTE_MODEL, str(model.info.get("path", "")))
    node.SetAttribute("GVSL.result", json.dumps(json_safe({
        "timings_s": result.timings_s, "device": result.device, "precision": result.precision,
        "voxels_per_label": result.voxels_per_label, "warnings": result.warnings})))
    if show_3d_surfaces:
        show_3d(node, True)
    return node


def segmentation_label_values(segmentation_node, table) -> dict:
    """{segment name: table value} for the segments named like the table's labels (case-insensitive);
    :class:`SegmentationInputError` listing unmatched segment names."""
    names = gvsl_mrml.segment_names(segmentation_node)
    lookup = {lab.name.lower(): lab.value for lab in table}
    values, unmatched = {}, []
    for n in names:
        if n.lower() in lookup:
            values[n] = lookup[n.lower()]
        else:
            unmatched.append(n)
    if not values:
        raise SegmentationInputError(
            f"segmentation '{segmentation_node.GetName()}' has no segment named like a '{table.name}' structure "
            f"(segments: {names[:10]}; expected names such as {table.names[:4]}). Rename the segments.")
    if unmatched:
        raise SegmentationInputError(
            f"segmentation '{segmentation_node.GetName()}' has segment(s) {unmatched[:10]} that are not "
            f"'{table.name}' structures ({table.names[:8]}{'...' if len(table) > 8 else ''}); rename or delete them.")
    return values
