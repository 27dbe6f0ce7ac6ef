"""GVSL training losses (Algorithm 1): local NCC (9^3 window), L2 flow smoothness, restoration MSE.

Each is the published formula (``utils/losses.py`` of the GVSL code: ``ncc_loss``,
``gradient_loss``, ``MSE``), tested against an independent restatement in
``Testing/test_losses.py``. All are computed in float32 even under autocast: windowed variances
in bf16/fp16 lose most of their digits. No MONAI import (a stock Slicer has no MONAI).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NCC_WINDOW = 9
NCC_EPSILON = 1e-5  # published: added to the product of the windowed variance SUMS


def local_ncc_map(warped: torch.Tensor, target: torch.Tensor, window: int = NCC_WINDOW) -> torch.Tensor:
    """Squared local NCC ``cc`` per voxel (B, 1, D, H, W), as the published ``ncc_loss``.

    With zero-padded ``window``^3 box sums S(.) (n = window^3 voxels) and means u = S/n::

        cross = S(IJ) - u_J S(I) - u_I S(J) + u_I u_J n
        I_var = S(I^2) - 2 u_I S(I) + u_I^2 n        (and J_var alike)
        cc    = cross^2 / (I_var * J_var + 1e-5)

    The sums are zero-padded box sums, as the published full ``conv3d`` with a ones kernel, made
    separable: ``avg_pool3d`` (stride 1, zero padding counted) along z, then y, then x, times n.
    Equal to the full convolution to float32 rounding (tested); measured on this 2-core CPU at
    64^3, batch 2, five sums forward + backward: one 9^3 ``avg_pool3d`` 3.9-5.2 s, separable
    0.6-1.3 s; the published 9^3 ``conv3d`` is slower still (GUIDE.md: 2.9x the box filter).

    Flat windows (CT air after clipping: exactly 0) give cc ~ 0 (uncorrelated), and windows
    whose variance sums are small next to sqrt(1e-5) are damped towards 0 (the published
    epsilon). The variances come from sums, as published: in float32 the published full
    ``conv3d`` cancels catastrophically in windows of a constant non-zero value (cc noise up to
    ~0.07 at 0.3, loss 0.2375 instead of 0.2545 on a constant 0.3 volume, measured); the
    separable sums here stay within 1e-4 of the exact (float64) value there (tested).
    """
    if warped.shape != target.shape or warped.dim() != 5:
        raise ValueError(f"local_ncc_map needs two (B, C, D, H, W) tensors of one shape, got "
                         f"{tuple(warped.shape)} and {tuple(target.shape)}")
    with torch.autocast(device_type=warped.device.type, enabled=False):
        i, j = warped.float(), target.float()
        n = float(window ** 3)

        def box_sum(x: torch.Tensor) -> torch.Tensor:
            half = window // 2
            for axis in range(3):
                kernel, pad = [1, 1, 1], [0, 0, 0]
                kernel[axis], pad[axis] = window, half
                x = F.avg_pool3d(x, tuple(kernel), stride=1, padding=tuple(pad), count_include_pad=True)
            return x * n

        s_i, s_j = box_sum(i), box_sum(j)
        s_ii, s_jj, s_ij = box_sum(i * i), box_sum(j * j), box_sum(i * j)
        u_i, u_j = s_i / n, s_j / n
        cross = s_ij - u_j * s_i - u_i * s_j + u_i * u_j * n
        var_i = s_ii - 2 * u_i * s_i + u_i * u_i * n
        var_j = s_jj - 2 * u_j * s_j + u_j * u_j * n
        return cross * cross / (var_i * var_j + NCC_EPSILON)


class NCCLoss(torch.nn.Module):
    """``1 - mean(local squared NCC)`` over a ``window``^3 box (the published GVSL/VoxelMorph loss).

    Inputs (B, 1, D, H, W), any float dtype; returns a float32 scalar, 0 = perfectly correlated
    everywhere, 1 = uncorrelated (or flat) everywhere. See :func:`local_ncc_map`.
    """

    def __init__(self, window: int = NCC_WINDOW):
        super().__init__()
        if int(window) < 1 or int(window) % 2 == 0:
            raise ValueError(f"NCC window must be an odd number of voxels >= 1, got {window}")
        self.window = int(window)

    def forward(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - local_ncc_map(warped, target, self.window).mean()


def smoothness_loss(flow: torch.Tensor) -> torch.Tensor:
    """L2 gradient penalty of a displacement (B, 3, D, H, W) in voxels: the mean squared forward
    difference along each axis, averaged over the 3 axes (published ``gradient_loss``, l2)."""
    with torch.autocast(device_type=flow.device.type, enabled=False):
        flow = flow.float()
        dz = flow[:, :, 1:] - flow[:, :, :-1]
        dy = flow[:, :, :, 1:] - flow[:, :, :, :-1]
        dx = flow[:, :, :, :, 1:] - flow[:, :, :, :, :-1]
        return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean()) / 3.0


def restoration_loss(restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all voxels, float32 (published ``MSE``)."""
    with torch.autocast(device_type=restored.device.type, enabled=False):
        return F.mse_loss(restored.float(), target.float())
