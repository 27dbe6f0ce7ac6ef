"""Register two 3D volumes with a GVSL model and export the result as exact physical transforms.

Frames and units
----------------
Everything physical here is **LPS millimetres** (SimpleITK/ITK, and what .tfm/.h5/.nii.gz files
hold). Transforms follow the **ITK resampling convention**: they map *fixed* points to *moving*
points, so ``sitk.Resample(moving, fixed, result.composite)`` is the registered moving image.

How it works (one idea per module)
----------------------------------
1. **Preprocessing** (:mod:`gvsl.preprocessing`, the contract shared with training): the fixed
   image defines the network grid (canonical orientation, the checkpoint's isotropic spacing,
   centred, coarsened beyond ``max_network_voxels`` with a warning); both images are normalised
   with the checkpoint's preset and resampled onto it.
2. **Network** (:mod:`gvsl.inference`): ``model.register(fixed, moving)`` gives the voxel affine
   ``mat`` and the deformable flow ``u`` (voxels); the fused map is ``phi(p) = A(p + u(p))``.
3. **Exact physical conversion** (:mod:`gvsl.grid`): the physical affine, and the displacement
   ``s D u(p)`` kept on the network grid (float, exact under linear interpolation: no
   full-resolution copy). The composite is ``CompositeTransform([affine, deformable])``: ITK
   applies the last-added first, so a fixed point goes ``P -> P + u(P) -> affine``: ``phi``.
4. **Outputs and metrics** (:mod:`gvsl.metrics`, :mod:`gvsl.export`): warped images on the fixed
   grid; total displacement and Jacobian on the network grid (``full_resolution=True``: on the
   fixed grid, computed in slabs); global NCC before/after, folding, Dice per label.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import SimpleITK as sitk

from gvsl.errors import GVSLError
from gvsl.export import summary, write_outputs, write_transform  # noqa: F401 - the public API
from gvsl.grid import (Grid, NetworkGrid, affine_to_sitk, boxes_overlap, displacement_on_grid,  # noqa: F401
                       flow_to_displacement_lps, jacobian_determinant_lps, transform_displacement)
from gvsl.metrics import dice_per_label, global_ncc, overlap_mask  # noqa: F401

DEFAULT_MAX_NETWORK_VOXELS = 160 ** 3  # ~4.1 M voxels: a CPU forward pass fits in a few GB
STAGES = ("resample", "network", "export", "metrics")


class RegistrationError(GVSLError, ValueError):
    """Inputs that cannot be registered, with what is wrong and what to do."""


@dataclass
class RegistrationResult:
    """The registration of ``moving`` onto ``fixed``; every transform maps FIXED points (LPS mm)
    to MOVING points (ITK resampling convention).

    affine:        physical affine (LPS mm).
    deformable:    the deformable part only: displacement (LPS mm) on the network grid, applied
                   to the point *before* the affine (zero outside the network grid, which covers
                   every fixed voxel centre).
    composite:     ``affine(p + u(p))``; usable directly as ``sitk.Resample(moving, fixed, composite)``.
    displacement:  total displacement of the composite, ``composite(p) - p``, vector float32
                   (x, y, z) LPS mm, on the network grid (or the fixed grid with ``full_resolution``).
    warped:        moving resampled onto the fixed grid with the composite (linear), float32.
    warped_affine: moving resampled onto the fixed grid with the affine only (linear), float32.
    jacobian:      determinant of the Jacobian of the composite mapping on ``displacement``'s
                   grid, float32 (physical derivatives; <= 0 marks folding).
    metrics:       numbers and notes (see :func:`register`).
    warped_labels: moving labels warped with the composite (nearest neighbour), or None.
    grid:          the network grid; ``flow_zyx``: the flow on it (refined when refining), float32
                   (3, z, y, x) voxels, channels (z, y, x); ``mat``: its 4x4 voxel affine.
    network:       with refinement, the network-only result (:class:`gvsl.network_only.NetworkOnly`),
                   else None.
    """

    affine: sitk.AffineTransform
    deformable: sitk.DisplacementFieldTransform
    composite: sitk.CompositeTransform
    displacement: sitk.Image
    warped: sitk.Image
    warped_affine: sitk.Image
    jacobian: sitk.Image
    metrics: dict = field(default_factory=dict)
    warped_labels: Optional[sitk.Image] = None
    grid: Optional[Grid] = None
    flow_zyx: Optional[np.ndarray] = None
    mat: Optional[np.ndarray] = None
    network: Optional[object] = None  # gvsl.network_only.NetworkOnly


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def check_volume(image, which: str) -> sitk.Image:
    """``image`` if it is a scalar 3D SimpleITK image (NaN/Inf repaired as
    :func:`gvsl.io.validate_volume`), else :class:`RegistrationError` naming ``which`` and the fix."""
    from gvsl.io import VolumeError, validate_volume
    if not isinstance(image, sitk.Image):
        raise RegistrationError(f"the {which} image must be a SimpleITK.Image (got {type(image).__name__}); "
                                "read files with gvsl.io.read_volume or SimpleITK.ReadImage.")
    try:
        return validate_volume(image, f"the {which} image")
    except VolumeError as exc:
        raise RegistrationError(str(exc)) from None


def _check_labels(labels, which: str) -> Optional[sitk.Image]:
    if labels is None:
        return None
    labels = check_volume(labels, which)
    if labels.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayViewFromImage(labels)
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise RegistrationError(f"the {which} map has non-integer values; pass a label map "
                                    "(integer label per voxel), not an intensity image.")
        labels = sitk.Cast(labels, sitk.sitkInt32)
    return labels


def _resolve_model(model):
    from pathlib import PurePath
    if isinstance(model, (str, PurePath)):
        from gvsl.checkpoint import load_model
        return load_model(model, "cpu")
    if model is None or not hasattr(model, "register"):
        raise RegistrationError(f"model must be a GVSL model or the path of a GVSL checkpoint "
                                f"(got {type(model).__name__}).")
    return model


def network_grid(fixed: sitk.Image, spacing_mm: float = 1.0,
                 max_voxels: int = DEFAULT_MAX_NETWORK_VOXELS) -> tuple:
    """The network grid for ``fixed`` -> ``(Grid, warnings)``: :func:`gvsl.preprocessing.grid_for`
    with ``spacing_mm`` (the other fields of the spec do not change the grid)."""
    from gvsl.io import VolumeError
    from gvsl.preprocessing import PreprocessSpec, grid_for
    try:
        return grid_for(fixed, PreprocessSpec(spacing_mm=spacing_mm), max_voxels, name="the fixed image")
    except VolumeError as exc:
        raise RegistrationError(str(exc)) from None


def registration_spec(model, fixed: sitk.Image, moving: sitk.Image, preset: Optional[str] = None,
                      network_spacing_mm: Optional[float] = None):
    """The preprocessing spec for this pair -> (spec, source, warnings).

    The checkpoint's spec (``model.info``); a model that records none (the published weights,
    a bare network) gets the default spec with the preset guessed from the fixed image. ``preset``
    / ``network_spacing_mm`` override it (warned when they contradict the checkpoint).
    source: "argument" | "checkpoint" | "checkpoint-v1" | "guessed".
    """
    from gvsl.io import VolumeError
    from gvsl.preprocessing import guess_preset, spec_from_checkpoint, with_overrides
    try:
        spec, source = spec_from_checkpoint(getattr(model, "info", None))
        notes = []
        if source == "default" and preset is None:
            spec = replace(spec, preset=guess_preset(fixed))
            source = "guessed"
            other = guess_preset(moving)
            if other != spec.preset:
                notes.append(f"the fixed image looks like {spec.preset.upper()} and the moving one like "
                             f"{other.upper()}; both were normalised with the '{spec.preset}' preset. Pass --preset "
                             "to choose.")
        spec, more = with_overrides(spec, source, preset, network_spacing_mm)
        if preset is not None:
            source = "argument"
    except VolumeError as exc:
        raise RegistrationError(str(exc)) from None
    return spec, source, notes + more


# ---------------------------------------------------------------------------------------------
# The registration
# ---------------------------------------------------------------------------------------------
def register(fixed: sitk.Image, moving: sitk.Image, model, device="auto", *,
             fixed_labels: Optional[sitk.Image] = None, moving_labels: Optional[sitk.Image] = None,
             preset: Optional[str] = None, network_spacing_mm: Optional[float] = None,
             max_network_voxels: int = DEFAULT_MAX_NETWORK_VOXELS, precision: str = "auto",
             full_resolution: bool = False, refine=0, refine_settings=None, fixed_mask: Optional[sitk.Image] = None,
             progress=None, cancel=None) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` with a GVSL model (one forward pass, then optionally
    ``refine`` steps of test-time refinement on the pair).

    fixed, moving: scalar 3D SimpleITK images (any size, spacing, direction; not modified).
    model: a :class:`gvsl.network.GVSL` (or anything with its ``register(a, b)``; it is put in
        eval mode and moved to the device) or the path of a GVSL checkpoint / published weights.
    device: "auto" | "cpu" | "cuda" | "cuda:N" | "mps" (or a torch.device). On CUDA
        out-of-memory the network is re-run on the CPU and a warning is recorded.
    fixed_labels, moving_labels: optional integer label maps (any grid); the moving labels are
        warped with the composite (nearest neighbour) and Dice per label is reported.
    preset, network_spacing_mm: override the checkpoint's preprocessing (see
        :func:`registration_spec`); max_network_voxels: coarsen the network grid beyond it.
    precision: "auto" | "fp32" | "bf16" | "fp16" (see :func:`gvsl.device.choose_precision`).
    full_resolution: also give the total displacement and the Jacobian on the fixed image's grid
        (float32, computed in slabs) instead of the network grid.
    refine: Adam steps of test-time refinement (:mod:`gvsl.refine`: the network's flow is
        corrected on this pair by local NCC + smoothness, the affine kept; the result is the same
        affine + displacement kinds, exported exactly as the network's). 0 (default) = network
        only; "auto" = :func:`gvsl.refine.default_steps` for the device (CPU 150, GPU 400).
        refine_settings: a :class:`gvsl.refine.RefineSettings` (default: per device).
        fixed_mask: optional mask image (any grid, non-zero = inside) where the similarity counts.
        With refinement the main outputs are the refined ones; the network-only result is kept
        in ``result.network`` and in the ``*_network`` metrics (side by side).
    progress: a :class:`gvsl.progress.Progress`; receives ``event("stage", stage=..., index=i,
        stages=4, message=...)`` for the stages resample, network, export, metrics, and
        ``event("warning", message=...)``.
    cancel: a :class:`gvsl.progress.CancelToken`, checked between stages
        (raises :class:`gvsl.progress.Cancelled`).

    ``result.metrics``: ncc_before / ncc_affine / ncc_after (global Pearson NCC on the fixed grid
    within the overlap with the moving image), folding_percent (det <= 0), jacobian_min,
    jacobian_max, dice_before / dice_affine / dice_after (per label and "mean", when both label
    maps are given), max_displacement_mm; with refinement also ncc_network, dice_network,
    folding_percent_network, jacobian_min_network (the network-only values, same definitions)
    and ``refine`` (steps, seconds, levels, local NCC of the first and last step, each on its
    level's grid and window, so not comparable across levels); timings_s, device, precision, network_grid_size
    (x, y, z), network_spacing_mm, preset ({fixed, moving, source}), preprocessing (the spec),
    displacement_grid ("network" | "fixed"), affine_matrix_lps / affine_translation_lps_mm /
    affine_center_lps_mm, warnings (list of str).
    """
    from gvsl.inference import Inference
    from gvsl.io import VolumeError
    from gvsl.preprocessing import preprocess

    t_start = time.perf_counter()
    timings = {}
    warnings: list = []

    from gvsl import refine as refine_mod
    from gvsl.network_only import network_metrics, network_only, refine_steps
    steps = refine_steps(refine, device)
    stages = STAGES if steps == 0 else STAGES[:2] + ("refine",) + STAGES[2:]

    def stage(i: int, name: str, message: str) -> None:
        if cancel is not None:
            cancel.raise_if_cancelled()
        if progress is not None:
            progress.event("stage", stage=name, index=stages.index(name), stages=len(stages), message=message)

    def warn(message: str) -> None:
        warnings.append(message)
        if progress is not None:
            progress.event("warning", message=message)

    fixed = check_volume(fixed, "fixed")
    moving = check_volume(moving, "moving")
    fixed_labels = _check_labels(fixed_labels, "fixed labels")
    moving_labels = _check_labels(moving_labels, "moving labels")
    if fixed_labels is not None and moving_labels is None:
        warn("fixed labels were given without moving labels: Dice needs both, so it is not reported.")
    if preset is not None and preset not in ("ct", "mr"):
        raise RegistrationError(f"unknown intensity preset '{preset}'; choose 'ct' or 'mr' (or leave it unset).")
    if not boxes_overlap(fixed, moving):
        warn("the fixed and moving images do not overlap in physical space (LPS): the network's initial "
             "alignment is by physical coordinates, so the moving image is mostly outside its field of view. "
             "Centre both volumes (e.g. set the moving origin so the image centres coincide) or apply an "
             "initial transform to the moving image first.")
    model = _resolve_model(model)
    spec, source, notes = registration_spec(model, fixed, moving, preset, network_spacing_mm)
    for note in notes:
        warn(note)
    inference = Inference(model, device, precision, progress=progress)

    # -- 1. preprocessing onto the network grid ----------------------------------------------
    t0 = time.perf_counter()
    grid, grid_notes = network_grid(fixed, spec.spacing_mm, max_network_voxels)
    stage(0, "resample", f"preprocessing fixed and moving onto the {grid.spacing_mm:g} mm network grid "
                         f"({' x '.join(str(v) for v in grid.size)})")
    try:
        fixed_net = preprocess(fixed, spec, grid=grid, name="the fixed image")
        moving_net = preprocess(moving, spec, grid=grid, name="the moving image")
    except VolumeError as exc:
        raise RegistrationError(str(exc)) from None
    for note in grid_notes + fixed_net.warnings + moving_net.warnings:
        warn(note)
    timings["resample"] = time.perf_counter() - t0

    # -- 2. the network --------------------------------------------------------------------
    t0 = time.perf_counter()
    stage(1, "network", f"running GVSL on {inference.describe()}")
    mat, flow, _ = inference.run(lambda m, a, b: m.register(a, b), fixed_net.array_zyx, moving_net.array_zyx,
                                 what="a registration pair on a")
    mat = mat.numpy()[0].astype(np.float64)
    flow = np.ascontiguousarray(flow.numpy()[0], dtype=np.float32)
    if not (np.all(np.isfinite(mat)) and np.all(np.isfinite(flow))):
        raise RegistrationError("the network produced non-finite values (NaN/inf); the weights are probably "
                                "broken. Check the checkpoint, or use --precision fp32.")
    timings["network"] = time.perf_counter() - t0

    # -- 2b. test-time refinement on the pair (optional) ---------------------------------------
    network, refined = None, None
    if steps > 0:
        t0 = time.perf_counter()
        stage(1, "refine", f"refining the prediction on this pair: {steps} steps on {inference.describe()}")
        mask_zyx = None
        if fixed_mask is not None:
            mask_zyx = sitk.GetArrayFromImage(sitk.Resample(check_volume(fixed_mask, "fixed mask") != 0,
                                                            grid.reference(), sitk.Transform(3, sitk.sitkIdentity),
                                                            sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
            if not mask_zyx.any():
                raise RegistrationError("the fixed mask has no voxel inside the fixed image's field of view; "
                                        "pass a mask (non-zero = inside) that overlaps the fixed image.")
        refined = refine_mod.refine(fixed_net.array_zyx, moving_net.array_zyx, mat, flow, steps,
                                    fixed_mask_zyx=mask_zyx, settings=refine_settings, device=inference.device,
                                    progress=progress, cancel=cancel)
        network = network_only(fixed, moving, moving_labels, mat, flow, grid)
        flow = np.ascontiguousarray(refined.flow, dtype=np.float32)
        timings["refine"] = time.perf_counter() - t0
    del fixed_net, moving_net

    # -- 3. export as physical transforms ----------------------------------------------------
    t0 = time.perf_counter()
    stage(2, "export", "converting to physical (LPS mm) transforms and resampling")
    affine = affine_to_sitk(mat, grid)
    deformable = sitk.DisplacementFieldTransform(flow_to_displacement_lps(flow, grid))
    composite = sitk.CompositeTransform([affine, deformable])
    moving_f = sitk.Cast(moving, sitk.sitkFloat32)
    warped = sitk.Resample(moving_f, fixed, composite, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped_affine = sitk.Resample(moving_f, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    displacement = transform_displacement(composite, fixed if full_resolution else grid.reference())
    jacobian = jacobian_determinant_lps(displacement)
    warped_labels = None
    if moving_labels is not None:
        warped_labels = sitk.Resample(moving_labels, fixed, composite, sitk.sitkNearestNeighbor, 0,
                                      moving_labels.GetPixelID())
    timings["export"] = time.perf_counter() - t0

    # -- 4. metrics ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    stage(3, "metrics", "computing NCC, Jacobian and Dice")
    identity = sitk.Transform(3, sitk.sitkIdentity)
    fixed_arr = sitk.GetArrayViewFromImage(fixed)
    moving_phys = sitk.Resample(moving_f, fixed, identity, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    del moving_f
    metrics = {
        "ncc_before": global_ncc(fixed_arr, sitk.GetArrayViewFromImage(moving_phys),
                                 overlap_mask(moving, fixed, identity)),
        "ncc_affine": global_ncc(fixed_arr, sitk.GetArrayViewFromImage(warped_affine),
                                 overlap_mask(moving, fixed, affine)),
        "ncc_after": global_ncc(fixed_arr, sitk.GetArrayViewFromImage(warped),
                                overlap_mask(moving, fixed, composite)),
    }
    del moving_phys
    import torch

    from gvsl import geometry
    jac = sitk.GetArrayViewFromImage(jacobian)
    disp_arr = sitk.GetArrayViewFromImage(displacement)
    metrics.update({
        "folding_percent": geometry.folding_percentage(torch.from_numpy(sitk.GetArrayFromImage(jacobian))),
        "jacobian_min": float(jac.min()),
        "jacobian_max": float(jac.max()),
        "max_displacement_mm": float(np.sqrt(np.einsum("...i,...i->...", disp_arr, disp_arr)).max()),
    })
    if fixed_labels is not None and moving_labels is not None:
        fl = sitk.Resample(fixed_labels, fixed, identity, sitk.sitkNearestNeighbor, 0, fixed_labels.GetPixelID())
        before = sitk.Resample(moving_labels, fixed, identity, sitk.sitkNearestNeighbor, 0,
                               moving_labels.GetPixelID())
        fl_arr = sitk.GetArrayViewFromImage(fl)
        metrics["dice_before"] = dice_per_label(fl_arr, sitk.GetArrayViewFromImage(before))
        affine_labels = sitk.Resample(moving_labels, fixed, affine, sitk.sitkNearestNeighbor, 0,
                                      moving_labels.GetPixelID())
        metrics["dice_affine"] = dice_per_label(fl_arr, sitk.GetArrayViewFromImage(affine_labels))
        metrics["dice_after"] = dice_per_label(fl_arr, sitk.GetArrayViewFromImage(warped_labels))
    if network is not None:
        metrics.update(network_metrics(network, fixed, moving, fixed_labels, metrics))
        used = refine_settings or refine_mod.default_settings(inference.device)
        metrics["refine"] = {"steps": steps, "seconds": round(refined.seconds, 3),
                             "levels": [list(v) for v in used.levels],
                             "smooth_weight": used.smooth_weight, "fold_weight": used.fold_weight,
                             "local_ncc_first": refined.ncc[0], "local_ncc_last": refined.ncc[-1]}
    timings["metrics"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    for note in inference.warnings:
        if note not in warnings:
            warnings.append(note)
    metrics.update({
        "device": inference.describe(),
        "precision": inference.precision.name,
        "network_grid_size": [int(v) for v in grid.size],
        "network_spacing_mm": float(grid.spacing_mm),
        "preset": {"fixed": spec.preset, "moving": spec.preset, "source": source},
        "preprocessing": spec.to_dict(),
        "displacement_grid": "fixed" if full_resolution else "network",
        "affine_matrix_lps": [list(map(float, affine.GetMatrix()[i:i + 3])) for i in (0, 3, 6)],
        "affine_translation_lps_mm": list(map(float, affine.GetTranslation())),
        "affine_center_lps_mm": list(map(float, affine.GetCenter())),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "warnings": warnings,
    })
    return RegistrationResult(affine=affine, deformable=deformable, composite=composite,
                              displacement=displacement, warped=warped, warped_affine=warped_affine,
                              jacobian=jacobian, metrics=metrics, warped_labels=warped_labels,
                              grid=grid, flow_zyx=flow, mat=mat, network=network)


# ---------------------------------------------------------------------------------------------
# The `gvsl register` command
# ---------------------------------------------------------------------------------------------
def run_cli(args) -> int:
    """``gvsl register``: check ``--out`` (:mod:`gvsl.outputs`), read, register, write every
    output (into a staging folder, moved into ``--out`` once all are written and verified)."""
    from gvsl.errors import WarningRecorder, current_sink, warnings_to
    from gvsl.io import read_volume
    from gvsl.network_only import cli_refine
    from gvsl.outputs import RunFolder
    from gvsl.progress import CancelToken, Progress, json_safe
    refine = cli_refine(getattr(args, "refine", "0"))  # a bad --refine fails before anything is read
    inputs = {"--fixed": args.fixed, "--moving": args.moving, "--model": args.model,
              "--fixed-labels": args.fixed_labels, "--moving-labels": args.moving_labels}
    with RunFolder(args.out, "register", inputs, overwrite=getattr(args, "overwrite", False)) as folder:
        progress = Progress(total=len(STAGES), mode=args.progress, task="register")
        read_warnings = WarningRecorder(forward=current_sink())
        with warnings_to(read_warnings, python_warnings=False):
            fixed = read_volume(args.fixed)
            moving = read_volume(args.moving)
            fixed_labels = read_volume(args.fixed_labels) if args.fixed_labels else None
            moving_labels = read_volume(args.moving_labels) if args.moving_labels else None
            fixed_mask = read_volume(args.fixed_mask) if getattr(args, "fixed_mask", None) else None
        result = register(fixed, moving, args.model, args.device, fixed_labels=fixed_labels,
                          moving_labels=moving_labels, preset=args.preset,
                          network_spacing_mm=args.network_spacing,
                          max_network_voxels=args.max_network_voxels, precision=args.precision,
                          full_resolution=getattr(args, "full_resolution", False), refine=refine,
                          fixed_mask=fixed_mask, progress=progress,
                          cancel=CancelToken(watch_file=getattr(args, "cancel_file", None)))
        result.metrics["warnings"] = read_warnings.messages + list(result.metrics.get("warnings", []))
        files = folder.commit(write_outputs(result, folder.staging(), fixed, moving, overview=not args.no_overview))
    if args.progress == "json":
        print(json.dumps({"event": "done", "task": "register",
                          "outputs": {k: str(v) for k, v in files.items()},
                          "metrics": json_safe(result.metrics)}), flush=True)
    else:
        print(summary(result.metrics))
        print(f"wrote {len(files)} files to {args.out}")
    return 0
