"""The GVSL network: a 3D U-Net backbone with affine, deformable and restoration heads.

Layer names and shapes follow the published GVSL model, so its state dict loads as is
(see :mod:`gvsl.checkpoint`). What differs from the published code is what it got wrong:
the affine matrix is built with differentiable batched tensor ops (the published one had no
gradient reaching the affine head, failed for batch size > 1 and required CUDA), and every warp
goes through the one exact :func:`gvsl.geometry.warp`.

Shapes: images are (B, 1, D, H, W) = (B, 1, z, y, x) float tensors on a 1 mm isotropic grid.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gvsl import geometry

DEFAULT_CHANNELS = (32, 64, 128, 256, 512, 256, 128, 64, 32)
PAD_MULTIPLE = 16  # four 2x max-pools


def _full_precision(x: torch.Tensor):
    """Context that disables autocast on ``x``'s device."""
    return torch.autocast(device_type=x.device.type, enabled=False)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`GVSL` network (saved in checkpoints)."""

    in_channels: int = 1
    channels: Tuple[int, ...] = field(default=DEFAULT_CHANNELS)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(in_channels=int(d.get("in_channels", 1)),
                   channels=tuple(int(c) for c in d.get("channels", DEFAULT_CHANNELS)))


class DoubleConv(nn.Module):
    """Two (3x3x3 conv, GroupNorm(C/8), LeakyReLU(0.2)) layers."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.GroupNorm(out_channels // 8, out_channels),
            nn.LeakyReLU(0.2),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.GroupNorm(out_channels // 8, out_channels),
            nn.LeakyReLU(0.2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2x max-pool then :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool3d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Trilinear 2x upsampling (align_corners=True), concat with the skip, :class:`DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # rebinding x frees the upsampled tensor once it is concatenated: at full resolution that
        # is ~1 GB less peak memory for a 4 M-voxel inference (same numbers)
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
        x = torch.cat([skip, x], dim=1)
        return self.conv(x)


class UNetBackbone(nn.Module):
    """3D U-Net, channels 32-64-128-256-512-256-128-64-32, any input size.

    ``forward(x)`` with x (B, C, D, H, W) returns ``(f_global, f_local)``:
    f_global (B, 512, ceil16(D)/16, ceil16(H)/16, ceil16(W)/16) is the bottleneck and
    f_local (B, 32, D, H, W) the last decoder level. The input is zero-padded to a multiple of 16
    (half before, half after, as the published code) and f_local is cropped back.
    """

    def __init__(self, in_channels: int = 1, channels: Tuple[int, ...] = DEFAULT_CHANNELS):
        super().__init__()
        c = channels
        self.inc = DoubleConv(in_channels, c[0])
        self.down1 = Down(c[0], c[1])
        self.down2 = Down(c[1], c[2])
        self.down3 = Down(c[2], c[3])
        self.down4 = Down(c[3], c[4])
        self.up1 = Up(c[4] + c[3], c[5])
        self.up2 = Up(c[5] + c[2], c[6])
        self.up3 = Up(c[6] + c[1], c[7])
        self.up4 = Up(c[7] + c[0], c[8])
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        size = x.shape[2:]
        pad = [(-s) % PAD_MULTIPLE for s in size]  # per axis (z, y, x)
        before = [p // 2 for p in pad]
        # F.pad takes (x_before, x_after, y_before, y_after, z_before, z_after)
        x = F.pad(x, [v for axis in (2, 1, 0) for v in (before[axis], pad[axis] - before[axis])])
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        y = self.up1(x5, x4)
        y = self.up2(y, x3)
        y = self.up3(y, x2)
        y = self.up4(y, x1)
        y = y[:, :, before[0]:before[0] + size[0], before[1]:before[1] + size[1],
              before[2]:before[2] + size[2]]
        return x5, y


class GVSL(nn.Module):
    """GVSL: backbone + affine head + deformable head + restoration head.

    ``forward(a, b)`` registers b (moving) to a (fixed) and restores a; returns, in the published
    order, ``(restored_a, warped_b, affine, flow)``:

    * restored_a (B, 1, D, H, W): restoration head on a's local features;
    * warped_b (B, 1, D, H, W): b warped by the fused transform ``phi(p) = A(u(p))``, i.e. the
      affine warp followed by the deformable warp (see :func:`gvsl.geometry.fuse`);
    * affine (B, 4, 4): voxel-space matrix about the volume centre, acting on (x, y, z) = (i, j, k)
      voxel coordinates (see :func:`gvsl.geometry.affine_matrix`);
    * flow (B, 3, D, H, W): deformable displacement in voxels, channels along (z, y, x).
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        ch = self.config.channels
        self.unet = UNetBackbone(self.config.in_channels, ch)
        self.f_conv = DoubleConv(2 * ch[4], 256)
        self.sp_conv = DoubleConv(2 * ch[8], 16)
        self.res_conv = nn.Sequential(nn.Conv3d(ch[8], 16, 3, padding=1), nn.GroupNorm(4, 16),
                                      nn.LeakyReLU(0.2), nn.Conv3d(16, 1, 1))
        self.out_flow = nn.Conv3d(16, 3, 3, padding=1)
        self.fc_rot = nn.Linear(256, 3)
        self.fc_scl = nn.Linear(256, 3)
        self.fc_trans = nn.Linear(256, 3)
        self.fc_shear = nn.Linear(256, 6)
        # Start near the identity transform (as spatial-transformer and VoxelMorph nets do): small
        # head weights, zero biases. The published model never trained its affine head (no
        # gradient reached it), so nothing is lost for its weights, which overwrite these.
        for fc in (self.fc_rot, self.fc_scl, self.fc_trans, self.fc_shear):
            nn.init.normal_(fc.weight, std=1e-3)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.out_flow.weight, std=1e-5)
        nn.init.zeros_(self.out_flow.bias)

    # -- backbone -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, D, H, W) -> (f_global (B, 512, ...), f_local (B, 32, D, H, W))."""
        return self.unet(x)

    # -- heads ----------------------------------------------------------------------------
    def affine_parameters(self, g_moving: torch.Tensor, g_fixed: torch.Tensor) -> dict:
        """Global features of moving and fixed -> bounded affine parameters, each (B, n).

        rotation (rad, about x, y, z) in (-pi/9, pi/9); scale in (0.75, 1.25);
        translation (voxels along x, y, z), unbounded; shear (rad) in (-pi/18, pi/18),
        ordered (xy, xz, yx, yz, zx, zy).

        The paper bounds the outputs with clamp(-1, 1); we use tanh, which has the same bounds
        and the same slope at 0 but never a zero gradient: with clamp, a head pushed past a
        bound once (Adam overshoots easily) stays stuck there for the rest of training, which
        we saw within 60 CPU steps (scale pinned at 0.75).
        """
        h = self.f_conv(torch.cat([g_moving, g_fixed], dim=1))
        with _full_precision(h):  # the 15 numbers that move every voxel: fp32 even under autocast
            h = h.float().mean(dim=(2, 3, 4))
            return {
                "rotation": torch.tanh(self.fc_rot(h)) * (math.pi / 9),
                "scale": 1 + torch.tanh(self.fc_scl(h)) * 0.25,
                "translation": self.fc_trans(h),
                "shear": torch.tanh(self.fc_shear(h)) * (math.pi / 18),
            }

    def affine(self, g_moving: torch.Tensor, g_fixed: torch.Tensor) -> torch.Tensor:
        """Affine head: (B, 4, 4) voxel matrix mapping fixed voxel positions to moving ones."""
        p = self.affine_parameters(g_moving, g_fixed)
        return geometry.affine_matrix(p["rotation"], p["scale"], p["translation"], p["shear"])

    def deformable(self, l_moving_affine: torch.Tensor, l_fixed: torch.Tensor) -> torch.Tensor:
        """Deformable head: affine-warped moving and fixed local features -> (B, 3, D, H, W) voxels.

        The last 16 -> 3 convolution runs in fp32 even under autocast (cheap; keeps the flow's
        digits)."""
        h = self.sp_conv(torch.cat([l_moving_affine, l_fixed], dim=1))
        with _full_precision(h):
            return self.out_flow(h.float())

    def restore(self, l_features: torch.Tensor) -> torch.Tensor:
        """Restoration head: (B, 32, D, H, W) -> (B, 1, D, H, W)."""
        return self.res_conv(l_features)

    # -- whole model ----------------------------------------------------------------------
    def register(self, a: torch.Tensor, b: torch.Tensor, features=None):
        """Predict the transform taking b (moving) onto a (fixed).

        Returns ``(affine (B, 4, 4), flow (B, 3, D, H, W) voxels, f_local_a)``.
        ``features`` may pass precomputed ``(encode(a), encode(b))``.
        """
        (ga, la), (gb, lb) = features if features is not None else (self.encode(a), self.encode(b))
        mat = self.affine(gb, ga)
        lb_affine = geometry.warp(lb, geometry.affine_displacement(mat, lb.shape[2:]))
        flow = self.deformable(lb_affine, la)
        return mat, flow, la

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        features = (self.encode(a), self.encode(b))
        mat, flow, la = self.register(a, b, features)
        warped_b = geometry.warp(b, geometry.fuse(mat, flow))
        return self.restore(la), warped_b, mat, flow


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
