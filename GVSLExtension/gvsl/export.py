"""Writing a registration's results: files in one folder and a human-readable summary.

Files (all atomic; LPS mm; transforms in ITK's resampling convention, fixed -> moving):
warped.nii.gz, warped_affine.nii.gz (moving resampled onto the fixed grid), affine.tfm,
deformable.nii.gz (the deformable part: displacement float32 on the network grid, exact under
linear interpolation, applied before the affine), composite.h5 (affine(p + u(p)): what
``sitk.Resample(moving, fixed, ReadTransform(...))`` needs), displacement.nii.gz and
jacobian.nii.gz (total displacement of the composite and its Jacobian determinant, on the grid the
result holds them: the network grid, or the fixed grid with ``full_resolution``),
warped_labels.nii.gz (with labels), metrics.json, overview.png. A refined registration also
writes what the network alone predicted: warped_network.nii.gz, deformable_network.nii.gz,
composite_network.h5 (same conventions; the affine is shared) and warped_labels_network.nii.gz.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import SimpleITK as sitk


def write_transform(transform: sitk.Transform, path) -> Path:
    """Write a transform atomically (.tfm, .txt or .h5: SimpleITK picks the format by extension)."""
    from gvsl.fsio import write_transform as write  # atomic, verified by reading it back
    return write(transform, path)


def write_outputs(result, out_dir, fixed: Optional[sitk.Image] = None,
                  moving: Optional[sitk.Image] = None, overview: bool = True) -> dict:
    """Write every output of a :class:`gvsl.registration.RegistrationResult` into ``out_dir``
    (atomically; see the module docstring) -> {name: Path}. overview.png needs ``overview``
    and both images."""
    from gvsl.io import write_image_atomic as write_image
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    field = sitk.Cast(result.deformable.GetDisplacementField(), sitk.sitkVectorFloat32)
    files = {
        "warped": write_image(result.warped, out / "warped.nii.gz"),
        "warped_affine": write_image(result.warped_affine, out / "warped_affine.nii.gz"),
        "affine": write_transform(result.affine, out / "affine.tfm"),
        "deformable": write_image(field, out / "deformable.nii.gz"),
        "displacement": write_image(result.displacement, out / "displacement.nii.gz"),
        "composite": write_transform(result.composite, out / "composite.h5"),
        "jacobian": write_image(result.jacobian, out / "jacobian.nii.gz"),
    }
    del field
    if result.warped_labels is not None:
        files["warped_labels"] = write_image(result.warped_labels, out / "warped_labels.nii.gz")
    network = getattr(result, "network", None)
    if network is not None:
        files["warped_network"] = write_image(network.warped, out / "warped_network.nii.gz")
        files["deformable_network"] = write_image(
            sitk.Cast(network.deformable.GetDisplacementField(), sitk.sitkVectorFloat32),
            out / "deformable_network.nii.gz")
        files["composite_network"] = write_transform(network.composite, out / "composite_network.h5")
        if network.warped_labels is not None:
            files["warped_labels_network"] = write_image(network.warped_labels, out / "warped_labels_network.nii.gz")
    if overview and fixed is not None and moving is not None:
        from gvsl.pictures import registration_overview
        files["overview"] = registration_overview(fixed, moving, result, out / "overview.png")
    from gvsl.fsio import atomic_write_text
    from gvsl.progress import json_safe
    files["metrics"] = atomic_write_text(out / "metrics.json", json.dumps(json_safe(result.metrics), indent=2))
    return files


def _fmt(v, fmt="{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def summary(metrics: dict) -> str:
    """A short human-readable summary of a registration's ``metrics``."""
    lines = [f"NCC before {_fmt(metrics.get('ncc_before'))} -> affine {_fmt(metrics.get('ncc_affine'))} "
             f"-> after {_fmt(metrics.get('ncc_after'))}; folding {_fmt(metrics.get('folding_percent'), '{:.2f}')}% "
             f"(Jacobian {_fmt(metrics.get('jacobian_min'), '{:.2f}')}..{_fmt(metrics.get('jacobian_max'), '{:.2f}')})"]
    if "dice_after" in metrics:
        lines.append(f"Dice mean before {_fmt(metrics['dice_before'].get('mean'))} -> affine "
                     f"{_fmt(metrics['dice_affine'].get('mean'))} -> after "
                     f"{_fmt(metrics['dice_after'].get('mean'))}")
    if "refine" in metrics:
        r = metrics["refine"]
        line = (f"network only: NCC {_fmt(metrics.get('ncc_network'))}, folding "
                f"{_fmt(metrics.get('folding_percent_network'), '{:.2f}')}%")
        if isinstance(metrics.get("dice_network"), dict):
            line += f", Dice mean {_fmt(metrics['dice_network'].get('mean'))}"
        lines.append(line + f"; 'after' = refined on this pair ({r['steps']} steps, {r['seconds']:.1f} s)")
    t = metrics.get("timings_s", {})
    lines.append(f"{t.get('total', 0):.1f} s on {metrics.get('device')} ({metrics.get('precision')}), network grid "
                 f"{'x'.join(str(v) for v in metrics.get('network_grid_size', []))} at "
                 f"{metrics.get('network_spacing_mm')} mm")
    lines += [f"warning: {w}" for w in metrics.get("warnings", [])]
    return "\n".join(lines)
