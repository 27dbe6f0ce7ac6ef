"""Register two volume nodes with GVSL and put every result into the scene (no Qt).

Data flow: volume nodes -> :mod:`gvsl_mrml` (SimpleITK, LPS) -> :func:`gvsl.register`
-> :mod:`gvsl_mrml` -> new (or given) nodes. Input nodes are never modified.

Outputs (:class:`RegistrationOutputs`)
--------------------------------------
* ``warped_volume`` / ``warped_affine_volume``: the moving volume resampled onto the fixed grid
  with affine + deformable / the affine only (world geometry, no parent transform).
* ``affine_transform`` (vtkMRMLLinearTransformNode) and ``deformable_transform``
  (vtkMRMLGridTransformNode): the registration as transforms, the affine nested **under** the
  deformable node. Place the moving volume (or its segmentation, models, markups) under
  ``affine_transform`` and it is displayed aligned with the fixed volume: its resampling
  transform is then ``A(p + u(p))``, exactly the engine's composite (see
  :mod:`gvsl_mrml.transforms`). Hardening it there is equivalent to ``warped_volume``.
* ``warped_network_volume``: with refinement (``refine=N`` in the engine options), the moving
  volume warped by the network's own prediction, before refinement (the main outputs are the
  refined ones), so the panel can switch between what GVSL predicted and what refinement added.
* ``jacobian_volume``: determinant of the Jacobian of the composite on the fixed grid
  (<= 0: folding).
* ``propagated_segmentation``: the moving segmentation warped onto the fixed volume (same
  segment names, colours and terminology), when a moving segmentation is given.
* ``metrics``: the engine's metrics (NCC before/affine/after, folding, Jacobian range, Dice per
  label value when both segmentations are given, timings, warnings) plus ``segment_values``
  ({segment name: label value}) and ``dice_before_by_segment`` / ``dice_after_by_segment``.

Node references (roles) set on every output node: ``GVSL.fixed`` -> the fixed volume,
``GVSL.moving`` -> the moving volume. The deformable transform node also holds the metrics as
JSON in its ``GVSL.metrics`` attribute.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePath
from typing import Callable, Optional, Union

import gvsl_mrml
from gvsl.errors import GVSLError
from gvsl.progress import json_safe
from gvsl_mrml.volumes import MRMLConversionError, volume_ijk_to_world_ras

REFERENCE_FIXED = "GVSL.fixed"
REFERENCE_MOVING = "GVSL.moving"
ATTRIBUTE_METRICS = "GVSL.metrics"
OUTPUT_SUFFIX = "(GVSL)"


class RegistrationInputError(GVSLError, ValueError):
    """Inputs that cannot be registered; the message says what to change."""


@dataclass
class RegistrationOutputs:
    """The nodes of one registration (see the module docstring). Pass an instance with some
    nodes set as ``outputs`` to :func:`register_volumes` to fill those nodes instead of
    creating new ones."""
    warped_volume: object = None
    warped_affine_volume: object = None
    warped_network_volume: object = None
    affine_transform: object = None
    deformable_transform: object = None
    jacobian_volume: object = None
    propagated_segmentation: object = None
    fixed_volume: object = None
    moving_volume: object = None
    metrics: dict = field(default_factory=dict)

    def nodes(self) -> dict:
        """{field name: node} of the output nodes that exist."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("metrics", "fixed_volume", "moving_volume") and getattr(self, f.name) is not None}


def gvsl_transform_of(node):
    """The GVSL output transform (a node with the ``GVSL.moving`` reference) that ``node`` sits
    under, directly or through other transforms; None when there is none."""
    transform = node.GetParentTransformNode() if node is not None else None
    while transform is not None:
        if transform.GetNodeReference(REFERENCE_MOVING) is not None:
            return transform
        transform = transform.GetParentTransformNode()
    return None


def remove_gvsl_transform(node) -> bool:
    """Take ``node`` out from under GVSL's own transform (never hardens it; the voxels and the
    geometry of ``node`` are untouched). Only when that transform is the direct parent; returns
    True when the node was moved."""
    transform = gvsl_transform_of(node)
    if transform is None or node.GetParentTransformNode() is not transform:
        return False
    node.SetAndObserveTransformNodeID(None)
    return True


def _gvsl_transform_problem(node, what: str) -> Optional[str]:
    transform = gvsl_transform_of(node)
    if transform is None:
        return None
    how = ("press 'Remove GVSL transform' (or in the Data module drag it out of the transform)"
           if node.GetParentTransformNode() is transform else
           f"move it out of the transforms above it (its parent is '{node.GetParentTransformNode().GetName()}')")
    return (f"The {what} '{node.GetName()}' is under '{transform.GetName()}', GVSL's transform from an earlier "
            "registration, which shows it aligned. Registering it again would register the already aligned "
            f"image: {how}. Do not harden that transform: it would bake the old registration into the volume.")


def _volumes_problem(fixed_node, moving_node) -> Optional[str]:
    if fixed_node is None:
        return "Select the fixed volume (the image the moving one is aligned to)."
    if moving_node is None:
        return "Select the moving volume (the image that is warped)."
    if fixed_node is moving_node or fixed_node.GetID() == moving_node.GetID():
        return "The fixed and moving volumes are the same node; select two different volumes."
    for node, what in ((fixed_node, "fixed volume"), (moving_node, "moving volume")):
        problem = _gvsl_transform_problem(node, what)
        if problem:
            return problem
        try:
            gvsl_mrml.check_scalar_volume_node(node, what)
            volume_ijk_to_world_ras(node)
        except MRMLConversionError as exc:
            return str(exc)
    return None


def _model_problem(model_path) -> Optional[str]:
    if not model_path:
        return ("Choose a GVSL model file (.pt): a checkpoint from 'gvsl pretrain' / the pre-training "
                "module, or the published GVSL weights.")
    if not isinstance(model_path, (str, os.PathLike, PurePath)):
        return None  # an already loaded model
    path = Path(model_path)
    if not path.exists():
        return f"Model file not found: {path}. Choose an existing GVSL checkpoint (.pt)."
    if path.is_dir():
        return f"The model path {path} is a folder; choose the checkpoint file inside it (e.g. gvsl_final.pt)."
    return None


def validate_inputs(fixed_node, moving_node, model_path) -> Optional[str]:
    """Why registration cannot start yet (the Apply button's tooltip), or None when ready.

    Cheap checks only (the model file is not read): both volumes chosen, different, scalar,
    not under a non-linear transform; the model path set and an existing file.
    """
    return _volumes_problem(fixed_node, moving_node) or _model_problem(model_path)


def _progress_adapter(progress):
    """The engine wants a gvsl.progress.Progress; also accept a plain callable(record: dict)."""
    if progress is None or hasattr(progress, "event"):
        return progress
    if callable(progress):
        from gvsl.progress import Progress
        from gvsl.registration import STAGES
        return Progress(total=len(STAGES), mode="none", callback=progress, task="register")
    raise RegistrationInputError(f"progress must be a gvsl.progress.Progress or a callable, got {type(progress).__name__}")


def _load_model(model_path):
    """A path -> gvsl.checkpoint.load_model (CPU; the engine moves it); a model passes through."""
    if isinstance(model_path, (str, os.PathLike, PurePath)):
        from gvsl.checkpoint import load_model
        return load_model(model_path, "cpu")
    return model_path


def _set_references(node, fixed_node, moving_node) -> None:
    node.SetNodeReferenceID(REFERENCE_FIXED, fixed_node.GetID())
    node.SetNodeReferenceID(REFERENCE_MOVING, moving_node.GetID())


def _dice_by_segment(dice: Optional[dict], name_to_value: dict) -> Optional[dict]:
    if not dice:
        return None
    out = {name: dice[str(value)] for name, value in name_to_value.items() if str(value) in dice}
    out["mean"] = dice.get("mean")
    return out


def register_volumes(fixed_node, moving_node, model_path, device: str = "auto", *,
                     moving_segmentation=None, fixed_segmentation=None,
                     outputs: Optional[RegistrationOutputs] = None,
                     progress: Union[None, Callable[[dict], None], object] = None,
                     cancel=None, **engine_options) -> RegistrationOutputs:
    """Register ``moving_node`` onto ``fixed_node`` with a GVSL model; results become nodes.

    fixed_node, moving_node: scalar volume nodes (a linear parent transform is taken into
        account: world geometry). Not modified.
    model_path: a GVSL checkpoint path (read with :func:`gvsl.checkpoint.load_model`; a
        'segmentation' checkpoint or a broken file raises ``CheckpointError`` with the fix), or an
        already loaded :class:`gvsl.network.GVSL`.
    device: "auto" | "cpu" | "cuda" | "cuda:N" | "mps".
    moving_segmentation: a segmentation (or label map volume) node on the moving volume; it is
        propagated onto the fixed volume (``propagated_segmentation``).
    fixed_segmentation: a segmentation (or label map) on the fixed volume; with a moving
        segmentation, Dice per segment (matched by name) is reported before and after.
    outputs: nodes to fill instead of creating new ones (any subset of the fields).
    progress: a :class:`gvsl.progress.Progress` or a callable receiving its records (dicts with
        "event": "stage" | "warning", "stage", "index", "stages", "message").
    cancel: a :class:`gvsl.progress.CancelToken` (raises ``gvsl.progress.Cancelled``).
    engine_options: passed to :func:`gvsl.register` (preset, network_spacing_mm,
        max_network_voxels, precision, refine: test-time refinement steps or "auto").
    Returns :class:`RegistrationOutputs` (see the module docstring for frames and references).
    """
    import gvsl.registration

    prepared = prepare_inputs(fixed_node, moving_node, model_path, moving_segmentation=moving_segmentation,
                              fixed_segmentation=fixed_segmentation, outputs=outputs)
    model = _load_model(model_path)
    result = gvsl.registration.register(prepared.fixed, prepared.moving, model, device,
                                        fixed_labels=prepared.fixed_labels, moving_labels=prepared.moving_labels,
                                        progress=_progress_adapter(progress), cancel=cancel, **engine_options)
    return results_to_nodes(prepared, result)


@dataclass
class PreparedInputs:
    """The inputs of one registration as SimpleITK images (LPS), and where its results go."""
    fixed_node: object
    moving_node: object
    moving_segmentation: object
    fixed_segmentation: object
    outputs: RegistrationOutputs
    fixed: object
    moving: object
    moving_labels: object = None
    fixed_labels: object = None
    name_to_value: dict = field(default_factory=dict)


def prepare_inputs(fixed_node, moving_node, model_path, *, moving_segmentation=None, fixed_segmentation=None,
                   outputs: Optional[RegistrationOutputs] = None) -> PreparedInputs:
    """Validate the inputs (:func:`validate_inputs`, outputs not among the inputs) and convert
    them with gvsl_mrml; raises :class:`RegistrationInputError` with the fix."""
    reason = validate_inputs(fixed_node, moving_node, model_path)
    if reason is not None:
        raise RegistrationInputError(reason)
    outputs = outputs if outputs is not None else RegistrationOutputs()
    for name, node in outputs.nodes().items():
        if node is fixed_node or node is moving_node or node is moving_segmentation or node is fixed_segmentation:
            raise RegistrationInputError(f"output '{name}' is one of the input nodes ('{node.GetName()}'); "
                                         "choose another node or 'Create new'.")
    fixed = gvsl_mrml.volume_node_to_sitk(fixed_node, what="fixed volume")
    moving = gvsl_mrml.volume_node_to_sitk(moving_node, what="moving volume")
    moving_labels = fixed_labels = None
    name_to_value: dict = {}
    if moving_segmentation is not None:
        moving_labels, name_to_value = gvsl_mrml.labelmap_node_or_segmentation_to_sitk(
            moving_segmentation, moving_node)
        if not name_to_value:
            raise RegistrationInputError(f"the moving segmentation '{moving_segmentation.GetName()}' has no "
                                         "visible segment to propagate; show at least one segment.")
    if fixed_segmentation is not None:
        fixed_labels, _ = gvsl_mrml.labelmap_node_or_segmentation_to_sitk(
            fixed_segmentation, fixed_node, segment_values=name_to_value or None)
    return PreparedInputs(fixed_node, moving_node, moving_segmentation, fixed_segmentation, outputs,
                          fixed, moving, moving_labels, fixed_labels, name_to_value)


def results_to_nodes(prepared: PreparedInputs, result) -> RegistrationOutputs:
    """Put a registration result into the scene (new nodes, or the given output nodes).

    result: anything with the :class:`gvsl.registration.RegistrationResult` fields warped,
    warped_affine, jacobian (images), affine (transform), deformable (displacement field
    transform or image, LPS mm), warped_labels (image or None), metrics (dict), e.g. the files
    of ``gvsl register`` read back (see :mod:`GVSLRegistrationLib.background`).
    """
    fixed_node, moving_node = prepared.fixed_node, prepared.moving_node
    moving_segmentation, name_to_value = prepared.moving_segmentation, prepared.name_to_value
    outputs = prepared.outputs
    scene = fixed_node.GetScene()
    base = moving_node.GetName()
    outputs.warped_volume = gvsl_mrml.sitk_to_volume_node(
        result.warped, scene, f"{base} warped {OUTPUT_SUFFIX}", node=outputs.warped_volume)
    outputs.warped_affine_volume = gvsl_mrml.sitk_to_volume_node(
        result.warped_affine, scene, f"{base} warped affine {OUTPUT_SUFFIX}", node=outputs.warped_affine_volume)
    if getattr(result, "network", None) is not None:
        outputs.warped_network_volume = gvsl_mrml.sitk_to_volume_node(
            result.network.warped, scene, f"{base} warped network {OUTPUT_SUFFIX}",
            node=outputs.warped_network_volume)
        outputs.warped_network_volume.SetAndObserveTransformNodeID(None)
    outputs.jacobian_volume = gvsl_mrml.sitk_to_volume_node(
        result.jacobian, scene, f"{base} Jacobian {OUTPUT_SUFFIX}", node=outputs.jacobian_volume)
    outputs.affine_transform = gvsl_mrml.affine_to_linear_transform_node(
        result.affine, scene, f"{base} affine {OUTPUT_SUFFIX}", node=outputs.affine_transform)
    outputs.deformable_transform = gvsl_mrml.displacement_to_grid_transform_node(
        result.deformable, scene, f"{base} deformable {OUTPUT_SUFFIX}", node=outputs.deformable_transform)
    outputs.deformable_transform.SetAndObserveTransformNodeID(None)
    gvsl_mrml.nest_affine_under_deformable(outputs.affine_transform, outputs.deformable_transform)
    for node in (outputs.warped_volume, outputs.warped_affine_volume, outputs.jacobian_volume):
        node.SetAndObserveTransformNodeID(None)  # their geometry is already in world coordinates

    if moving_segmentation is not None and result.warped_labels is not None:
        if moving_segmentation.IsA("vtkMRMLSegmentationNode"):
            table = gvsl_mrml.segmentation_label_table(moving_segmentation, name_to_value)
        else:
            table = {value: name for name, value in name_to_value.items()}
        outputs.propagated_segmentation = gvsl_mrml.sitk_labels_to_segmentation(
            result.warped_labels, scene, f"{moving_segmentation.GetName()} propagated {OUTPUT_SUFFIX}",
            fixed_node, label_table=table, node=outputs.propagated_segmentation, include_empty=True)
        outputs.propagated_segmentation.SetAndObserveTransformNodeID(None)

    metrics = dict(result.metrics)
    if name_to_value:
        metrics["segment_values"] = dict(name_to_value)
        for key in ("dice_before", "dice_network", "dice_after"):
            by_segment = _dice_by_segment(metrics.get(key), name_to_value)
            if by_segment is not None:
                metrics[f"{key}_by_segment"] = by_segment
    outputs.metrics = metrics
    outputs.fixed_volume, outputs.moving_volume = fixed_node, moving_node
    for node in outputs.nodes().values():
        _set_references(node, fixed_node, moving_node)
    outputs.deformable_transform.SetAttribute(ATTRIBUTE_METRICS, json.dumps(json_safe(metrics)))
    return outputs


def format_metrics(metrics: dict) -> str:
    """A few lines for the panel's metrics label."""
    def num(key, fmt="{:.3f}"):
        value = metrics.get(key)
        return "n/a" if value is None else fmt.format(value)

    lines = [f"NCC: before {num('ncc_before')}, affine {num('ncc_affine')}, after {num('ncc_after')}"
             + (f" (network prediction {num('ncc_network')}; after = refined, {metrics['refine']['steps']} steps)"
                if metrics.get("refine") else ""),
             f"Folding: {num('folding_percent', '{:.2f}')} % of voxels (Jacobian "
             f"{num('jacobian_min', '{:.2f}')} .. {num('jacobian_max', '{:.2f}')}); max displacement "
             f"{num('max_displacement_mm', '{:.1f}')} mm"]
    before, after = metrics.get("dice_before_by_segment"), metrics.get("dice_after_by_segment")
    network = metrics.get("dice_network_by_segment")
    if after:
        lines.append("Dice (before -> network -> refined):" if network else "Dice (before -> after):")
        for name, value in after.items():
            if name == "mean" or value is None:
                continue
            prev = (before or {}).get(name)
            mid = f"{(network or {}).get(name, 0.0):.3f} -> " if network else ""
            lines.append(f"  {name}: {'n/a' if prev is None else f'{prev:.3f}'} -> {mid}{value:.3f}")
        if after.get("mean") is not None:
            prev = (before or {}).get("mean")
            mid = f"{network['mean']:.3f} -> " if network and network.get("mean") is not None else ""
            lines.append(f"  mean: {'n/a' if prev is None else f'{prev:.3f}'} -> {mid}{after['mean']:.3f}")
    timings = metrics.get("timings_s") or {}
    if timings:
        lines.append(f"{timings.get('total', 0):.1f} s on {metrics.get('device', '?')} ({metrics.get('precision', '?')})")
    lines += [f"Warning: {w}" for w in metrics.get("warnings", [])]
    return "\n".join(lines)
