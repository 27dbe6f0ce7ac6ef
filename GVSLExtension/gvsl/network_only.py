"""The network's own result, kept beside a refined registration (:func:`gvsl.register` with
``refine=N``), and the refinement arguments.

With refinement the main outputs of :class:`gvsl.registration.RegistrationResult` are the refined
ones; :class:`NetworkOnly` holds what the network predicted (same conventions: transforms map
FIXED points to MOVING points, LPS mm), and :func:`network_metrics` gives its ``*_network``
metrics with the same definitions as the refined ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk

from gvsl.grid import affine_to_sitk, flow_to_displacement_lps, jacobian_determinant_lps, transform_displacement
from gvsl.metrics import dice_per_label, global_ncc, overlap_mask


def _error():
    from gvsl.registration import RegistrationError
    return RegistrationError


@dataclass
class NetworkOnly:
    """What the network alone predicted, when a registration was refined: ``deformable`` and
    ``composite`` (same conventions as :class:`RegistrationResult`), ``warped`` (moving on the
    fixed grid, linear), ``warped_labels`` (or None), ``jacobian`` on the network grid, and the
    network's ``flow_zyx`` (3, z, y, x) voxels."""

    deformable: sitk.DisplacementFieldTransform
    composite: sitk.CompositeTransform
    warped: sitk.Image
    jacobian: sitk.Image
    flow_zyx: np.ndarray
    warped_labels: Optional[sitk.Image] = None


def refine_steps(refine, device) -> int:
    from gvsl import refine as refine_mod
    if refine in (None, False):
        return 0
    if isinstance(refine, str):
        if refine != "auto":
            raise _error()(f"refine must be a number of steps or 'auto' (got '{refine}').")
        from gvsl.device import select_device
        dev = device if hasattr(device, "type") else select_device(device)
        return refine_mod.default_steps(dev)
    steps = int(refine)
    if steps < 0:
        raise _error()(f"refine must be >= 0 steps (got {steps}); 0 means network only.")
    return steps


def network_only(fixed, moving, moving_labels, mat, flow, grid) -> NetworkOnly:
    affine = affine_to_sitk(mat, grid)
    deformable = sitk.DisplacementFieldTransform(flow_to_displacement_lps(flow, grid))
    composite = sitk.CompositeTransform([affine, deformable])
    warped = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, composite, sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    labels = None
    if moving_labels is not None:
        labels = sitk.Resample(moving_labels, fixed, composite, sitk.sitkNearestNeighbor, 0,
                               moving_labels.GetPixelID())
    jacobian = jacobian_determinant_lps(transform_displacement(composite, grid.reference()))
    return NetworkOnly(deformable=deformable, composite=composite, warped=warped, jacobian=jacobian,
                       flow_zyx=np.asarray(flow, dtype=np.float32), warped_labels=labels)


def network_metrics(network: NetworkOnly, fixed, moving, fixed_labels, metrics) -> dict:
    """ncc_network, folding_percent_network, jacobian_min_network, dice_network: the network-only
    values with the same definitions as the refined ones."""
    import torch

    from gvsl import geometry
    jac = sitk.GetArrayFromImage(network.jacobian)
    out = {"ncc_network": global_ncc(sitk.GetArrayViewFromImage(fixed), sitk.GetArrayViewFromImage(network.warped),
                                     overlap_mask(moving, fixed, network.composite)),
           "folding_percent_network": geometry.folding_percentage(torch.from_numpy(jac)),
           "jacobian_min_network": float(jac.min())}
    if network.warped_labels is not None and "dice_after" in metrics:
        fl = sitk.Resample(fixed_labels, fixed, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkNearestNeighbor, 0,
                           fixed_labels.GetPixelID())
        out["dice_network"] = dice_per_label(sitk.GetArrayViewFromImage(fl),
                                             sitk.GetArrayViewFromImage(network.warped_labels))
    return out


def cli_refine(value) -> object:
    """``--refine N|auto`` -> int or "auto" (a clear error otherwise)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise _error()(f"--refine takes a number of steps or 'auto' (got '{value}'); 0 = network only.") \
            from None
