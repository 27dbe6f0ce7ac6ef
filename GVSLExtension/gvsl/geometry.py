"""Voxel-space geometry of the network: the affine matrix, DVF fusion, the warp, Jacobians.

Conventions (one set, used everywhere in gvsl):

* Volumes are tensors (B, C, D, H, W) = (B, C, z, y, x); voxel index (k, j, i) <-> (z, y, x).
* A *displacement field* is (B, 3, D, H, W) in **voxels**, channels in axis order (z, y, x):
  the output voxel p samples the input at ``p + d(p)`` (resampling / pull convention, like ITK).
* An *affine matrix* is (B, 4, 4) acting on **(x, y, z) voxel coordinates measured from the
  volume centre** ``c = (size - 1) / 2``, translation in voxels: output voxel p samples the input
  at ``L (p - c) + c + t``. The network grid is 1 mm isotropic, so rotations are physical
  rotations and translations are millimetres; :mod:`gvsl.registration` turns this into an exact
  physical transform.
* Sampling is trilinear with ``align_corners=True``: voxel centres sit exactly on grid points,
  so a zero displacement is the identity.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def affine_matrix(rotation: torch.Tensor, scale: torch.Tensor, translation: torch.Tensor,
                  shear: torch.Tensor) -> torch.Tensor:
    """Build ``[[Shear @ Scale @ Rz @ Ry @ Rx, t], [0, 0, 0, 1]]`` with differentiable batched ops.

    rotation (B, 3) rad about x, y, z; scale (B, 3); translation (B, 3) voxels along x, y, z;
    shear (B, 6) rad ordered (xy, xz, yx, yz, zx, zy), entering the matrix as tangents.
    Returns (B, 4, 4) in the dtype of ``rotation`` (float32 recommended).
    """
    b = rotation.shape[0]
    one = torch.ones_like(rotation[:, 0])
    zero = torch.zeros_like(one)
    cx, cy, cz = torch.cos(rotation).unbind(1)
    sx, sy, sz = torch.sin(rotation).unbind(1)

    def mat3(*rows):  # 9 tensors of shape (B,) -> (B, 3, 3)
        return torch.stack(rows, dim=1).reshape(b, 3, 3)

    rx = mat3(one, zero, zero, zero, cx, -sx, zero, sx, cx)
    ry = mat3(cy, zero, sy, zero, one, zero, -sy, zero, cy)
    rz = mat3(cz, -sz, zero, sz, cz, zero, zero, zero, one)
    scl = torch.diag_embed(scale)
    t = torch.tan(shear)
    sh = mat3(one, t[:, 0], t[:, 1], t[:, 2], one, t[:, 3], t[:, 4], t[:, 5], one)
    lin = sh @ scl @ rz @ ry @ rx
    top = torch.cat([lin, translation.unsqueeze(-1)], dim=2)
    bottom = torch.cat([torch.zeros_like(translation), one.unsqueeze(1)], dim=1).unsqueeze(1)
    return torch.cat([top, bottom], dim=1)


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 3, D, H, W) voxel positions, channels (z, y, x)."""
    axes = [torch.arange(int(s), device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


def _linear_zyx(mat: torch.Tensor) -> torch.Tensor:
    """The (B, 3, 3) linear part of an (x, y, z) affine, re-indexed to act on (z, y, x) vectors."""
    return mat[:, :3, :3].flip(1).flip(2)


def _apply_linear_zyx(lin_zyx: torch.Tensor, v_zyx: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) @ (B, 3, D, H, W) per voxel, as one batched matmul."""
    b = v_zyx.shape[0]
    return torch.bmm(lin_zyx.expand(b, -1, -1), v_zyx.reshape(b, 3, -1)).view_as(v_zyx)


def affine_displacement(mat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Displacement (B, 3, D, H, W) voxels, channels (z, y, x), of the affine ``mat`` (B, 4, 4).

    ``d(p) = (L - I)(p - c) + t``, built by broadcasting one axis at a time (no full grid).
    """
    mat = mat.float()
    b, dev = mat.shape[0], mat.device
    m = _linear_zyx(mat) - torch.eye(3, device=dev)  # (B, 3 out, 3 in), in (z, y, x)
    t_zyx = mat[:, :3, 3].flip(1)
    axes = [torch.arange(int(s), device=dev, dtype=mat.dtype) - (int(s) - 1) / 2.0 for s in shape]
    z = axes[0].view(1, 1, -1, 1, 1)
    y = axes[1].view(1, 1, 1, -1, 1)
    x = axes[2].view(1, 1, 1, 1, -1)
    col = lambda k: m[:, :, k].view(b, 3, 1, 1, 1)  # noqa: E731
    return col(0) * z + col(1) * y + col(2) * x + t_zyx.view(b, 3, 1, 1, 1)


def fuse(mat: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Equ. 9: one displacement for the affine followed by the deformable warp.

    The deformable flow u (B, 3, D, H, W) voxels is predicted on the fixed grid between the
    fixed features and the *affine-warped* moving features, so the composed position map is
    ``phi(p) = A(p + u(p))``: the affine position field sampled at the deformed position
    (exact, since A is affine: ``A(p) + L u(p)``). Warping with the result equals warping with
    the affine and then with the flow (tested). Returns ``phi(p) - p`` (B, 3, D, H, W) voxels.
    """
    mat = mat.float()
    return affine_displacement(mat, flow.shape[2:]) + _apply_linear_zyx(_linear_zyx(mat), flow.float())


def warp(image: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """The one warp: output[p] = image[p + displacement[p]] (trilinear, align_corners=True).

    image (B or 1, C, D, H, W); displacement (B, 3, D', H', W') voxels, channels (z, y, x),
    defined on the output grid (D', H', W') which must equal the image grid. ``mode`` is
    ``"bilinear"`` (trilinear) or ``"nearest"`` (label maps). Outside samples get
    ``padding_mode`` ("zeros", "border" or "reflection").
    """
    shape = displacement.shape[2:]
    pos = identity_grid(shape, displacement.device, displacement.dtype) + displacement
    scale = torch.tensor([2.0 / max(int(s) - 1, 1) for s in shape], device=pos.device,
                         dtype=pos.dtype).view(1, 3, 1, 1, 1)
    norm = pos * scale - 1.0
    grid = norm.permute(0, 2, 3, 4, 1).flip(-1)  # (B, D, H, W, 3) as (x, y, z)
    if image.shape[0] != grid.shape[0]:
        image = image.expand(grid.shape[0], *image.shape[1:])
    return F.grid_sample(image.to(grid.dtype), grid, mode=mode, padding_mode=padding_mode,
                         align_corners=True)


def spatial_gradient(field: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Derivatives of (B, C, D, H, W) along (z, y, x): returns (B, C, 3, D, H, W).

    Central differences inside, one-sided at the borders (as numpy.gradient); ``spacing`` per
    axis (z, y, x) in the units of the derivative's denominator.
    """
    grads = torch.gradient(field, spacing=[float(s) for s in spacing], dim=(2, 3, 4))
    return torch.stack(grads, dim=2)


def jacobian_determinant(displacement: torch.Tensor,
                         spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """det(I + grad d) of a displacement (B, 3, D, H, W) -> (B, 1, D, H, W).

    The displacement and ``spacing`` (z, y, x) must be in the same length unit (voxels with
    spacing 1, or mm with the grid's mm spacing). det <= 0 marks folding.
    """
    g = spatial_gradient(displacement.float(), spacing)  # (B, 3 comp, 3 deriv, ...)
    j = g.permute(0, 3, 4, 5, 1, 2) + torch.eye(3, device=g.device, dtype=g.dtype)
    return torch.linalg.det(j).unsqueeze(1)


def folding_percentage(jacobian: torch.Tensor) -> float:
    """Percentage (0-100) of voxels whose Jacobian determinant is <= 0."""
    return float((jacobian <= 0).float().mean().item() * 100.0)
