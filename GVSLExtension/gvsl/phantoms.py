"""Synthetic CT heart and MR brain phantoms with exact label maps, for demos and tests.

Each case is built in two steps:

1. **Canonical anatomy** on a 1 mm *tissue-class* grid (LPS frame: +x patient Left,
   +y Posterior, +z Superior, millimetres, centred on the anatomy). Shapes are ellipsoids,
   tubes along smooth centre lines and folded surfaces, painted in anatomical order; their
   sizes and positions are jittered per case. Dimensions are given for ``size=96`` and scale
   with ``size / 96`` (so the anatomy fills the field of view at any size); coronary radii
   stay >= 1 voxel.
2. **Per-case pose and shape**: every output voxel ``p`` (mm) samples the canonical grid at
   ``q = L (p - c) + t + u(p)`` (nearest neighbour, so label values stay exact): ``L`` a rotation
   of up to +-10 degrees about each axis with isotropic scale 1/s, s in [0.9, 1.1]; ``t`` a
   translation of up to +-4 mm per axis (scaled); ``u`` a smooth random displacement
   (a 4x4x4 control grid, std 2.5 mm heart / 2.0 mm brain at size 96, Gaussian-interpolated;
   smooth enough to stay invertible). The image is then
   made from the sampled tissue classes: per-case mean intensities, a Gaussian blur
   (point-spread function) and noise (CT: Gaussian, HU; MR: Rician with a smooth bias field).

Geometry of the returned images: direction identity, spacing ``(1, 1, sz)`` mm with
``sz`` = 1.0 or 1.2 (chosen per case, to exercise resampling), ``size`` voxels per axis, a
volume centre within 2 mm of the physical origin (cases overlap physically, as scans of one
protocol do; registration starts from that physical alignment). Everything is deterministic per ``seed``
(``numpy.random.default_rng(seed)``).

* :func:`make_heart_phantom` -> CT image (int16 HU), heart label map (uint16, exactly the
  7 MM-WHS values 205, 420, 500, 550, 600, 820, 850 and 0), coronary label map (uint8, 1).
* :func:`make_brain_phantom` -> T1-like MR image (int16, arbitrary units: WM ~850, GM ~600,
  CSF ~130) and a label map (uint16) with the 28 FreeSurfer aseg labels of ``brain.tsv``
  (left structures at +x, the patient's left).
* :func:`write_phantoms` writes ``images/``, ``labels/`` (and ``labels-coronary/``) as .nii.gz;
  case ``i`` uses seed ``seed * 1000 + i``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

KINDS = ("heart", "brain")
HEART_LABELS = (205, 420, 500, 550, 600, 820, 850)


# =======================================================================================
# Canonical canvas: a tissue-class map on a 1 mm grid, painted shape by shape
# =======================================================================================
def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _frame(axis, towards) -> np.ndarray:
    """Rows: unit ``axis``, the part of ``towards`` orthogonal to it, and their cross product."""
    a = _unit(axis)
    b = np.asarray(towards, dtype=np.float64)
    b = _unit(b - (b @ a) * a)
    return np.stack([a, b, np.cross(a, b)])


def _rotation(angles_rad) -> np.ndarray:
    ax, ay, az = angles_rad
    cx, cy, cz, sx, sy, sz = np.cos(ax), np.cos(ay), np.cos(az), np.sin(ax), np.sin(ay), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Canvas:
    """uint8 class map ``cls[z, y, x]``; voxel (k, j, i) centre at ``lo + (i, j, k)`` mm (x, y, z)."""

    def __init__(self, lo_xyz, shape_xyz, fill: int = 0):
        self.lo = np.asarray(lo_xyz, dtype=np.float64)
        self.shape_xyz = tuple(int(n) for n in shape_xyz)
        self.cls = np.full(self.shape_xyz[::-1], fill, dtype=np.uint8)

    def block(self, lo_xyz, hi_xyz):
        """Slices and broadcastable (x, y, z) coordinate arrays of the voxels in [lo, hi] mm,
        or None when the box is outside the canvas."""
        i0 = np.maximum(np.floor(np.asarray(lo_xyz) - self.lo).astype(int), 0)
        i1 = np.minimum(np.ceil(np.asarray(hi_xyz) - self.lo).astype(int) + 1, self.shape_xyz)
        if np.any(i1 <= i0):
            return None
        sl = (slice(i0[2], i1[2]), slice(i0[1], i1[1]), slice(i0[0], i1[0]))
        x = (self.lo[0] + np.arange(i0[0], i1[0], dtype=np.float32)).reshape(1, 1, -1)
        y = (self.lo[1] + np.arange(i0[1], i1[1], dtype=np.float32)).reshape(1, -1, 1)
        z = (self.lo[2] + np.arange(i0[2], i1[2], dtype=np.float32)).reshape(-1, 1, 1)
        return sl, x, y, z

    def whole(self):
        return self.block(self.lo, self.lo + np.asarray(self.shape_xyz) - 1)

    def paint(self, sl, mask, value: int, only: Optional[Sequence[int]] = None,
              never: Optional[Sequence[int]] = None) -> None:
        view = self.cls[sl]
        mask = np.broadcast_to(mask, view.shape)
        if only is not None:
            mask = mask & np.isin(view, only)
        if never is not None:
            mask = mask & ~np.isin(view, never)
        view[mask] = value

    def ellipsoid_coords(self, center, radii, axes=None, margin: float = 0.0):
        """(slices, rho, (u0, u1, u2)) over the bounding box: ``u_k`` = offset along axis k
        (mm), ``rho`` = normalised radius (1 on the surface). None if outside the canvas."""
        center = np.asarray(center, dtype=np.float64)
        radii = np.asarray(radii, dtype=np.float64)
        axes = np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64)
        half = np.sqrt(((radii[:, None] * axes) ** 2).sum(0)) * (1.0 + margin) + 1.0
        blk = self.block(center - half, center + half)
        if blk is None:
            return None
        sl, x, y, z = blk
        dx, dy, dz = x - np.float32(center[0]), y - np.float32(center[1]), z - np.float32(center[2])
        us = [np.float32(ax[0]) * dx + np.float32(ax[1]) * dy + np.float32(ax[2]) * dz for ax in axes]
        rho = np.sqrt(sum((u / np.float32(r)) ** 2 for u, r in zip(us, radii)))
        return sl, rho, us

    def ellipsoid(self, center, radii, value: int, axes=None, scale: float = 1.0, **kw):
        """Paint the ellipsoid ``rho <= scale``; returns the mask's (slices, mask) or None."""
        e = self.ellipsoid_coords(center, radii, axes, margin=max(scale - 1.0, 0.0))
        if e is None:
            return None
        sl, rho, _ = e
        mask = rho <= scale
        self.paint(sl, mask, value, **kw)
        return sl, mask

    def balls(self, points, radii, value: int, **kw) -> None:
        """Paint the union of balls (a tube when the points are dense along a centre line)."""
        points = np.asarray(points, dtype=np.float64)
        radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(points),))
        for p, r in zip(points, radii):
            blk = self.block(p - r, p + r)
            if blk is None:
                continue
            sl, x, y, z = blk
            d2 = (x - np.float32(p[0])) ** 2 + (y - np.float32(p[1])) ** 2 + (z - np.float32(p[2])) ** 2
            self.paint(sl, d2 <= np.float32(r * r), value, **kw)

    def lookup(self, points) -> np.ndarray:
        """Class at the nearest voxel of each (x, y, z) point (0 outside)."""
        idx = np.rint(np.asarray(points) - self.lo).astype(int)
        inside = np.all((idx >= 0) & (idx < np.asarray(self.shape_xyz)), axis=-1)
        out = np.zeros(idx.shape[:-1], dtype=np.uint8)
        i = idx[inside]
        out[inside] = self.cls[i[:, 2], i[:, 1], i[:, 0]]
        return out


def _curve(control_points, step_mm: float = 0.5) -> np.ndarray:
    """Catmull-Rom spline through ``control_points`` (N, 3), sampled about every ``step_mm``."""
    p = np.asarray(control_points, dtype=np.float64)
    if len(p) < 2:
        return p
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        n = max(2, int(np.ceil(np.linalg.norm(p2 - p1) / step_mm)))
        t = np.linspace(0.0, 1.0, n, endpoint=False)[:, None]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    out.append(p[-1:])
    return np.vstack(out)


def _densify(points, step_mm: float = 0.4) -> np.ndarray:
    """Linear re-sampling of a polyline so consecutive points are <= ``step_mm`` apart."""
    p = np.asarray(points, dtype=np.float64)
    out = [p[:1]]
    for a, b in zip(p[:-1], p[1:]):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / step_mm)))
        t = np.arange(1, n + 1)[:, None] / n
        out.append(a + (b - a) * t)
    return np.vstack(out)


# =======================================================================================
# Per-case pose + smooth deformation, sampling the canonical classes on the output grid
# =======================================================================================
def _smooth_field(rng, shape_zyx, n_ctrl: int, std: float, channels: int) -> np.ndarray:
    """(channels, z, y, x) float32 smooth random field: ``n_ctrl``^3 N(0, std) control values,
    Gaussian-weighted interpolation (weights normalised per voxel)."""
    ctrl = rng.normal(0.0, std, size=(channels, n_ctrl, n_ctrl, n_ctrl))

    def weights(n):
        pos = np.linspace(0.0, n - 1.0, n_ctrl)
        sig = (n - 1.0) / (n_ctrl - 1.0) * 0.6
        w = np.exp(-0.5 * ((np.arange(n)[:, None] - pos[None, :]) / sig) ** 2)
        return (w / w.sum(1, keepdims=True)).astype(np.float32)

    wz, wy, wx = (weights(n) for n in shape_zyx)
    f = np.einsum("cklm,xm->cklx", ctrl.astype(np.float32), wx)
    f = np.einsum("cklx,yl->ckyx", f, wy)
    return np.einsum("ckyx,zk->czyx", f, wz)


class _Pose:
    """Output grid + the map ``q(p)`` from output voxels to canonical millimetres."""

    def __init__(self, rng, size: int, s: float, deform_std_mm: float):
        self.size = size
        self.spacing = (1.0, 1.0, float(rng.choice([1.0, 1.2])))  # (x, y, z) mm
        angles = np.deg2rad(rng.uniform(-10.0, 10.0, 3))
        self.scale = float(rng.uniform(0.9, 1.1))
        self.linear = _rotation(angles) / self.scale  # output mm -> canonical mm
        self.translation = rng.uniform(-4.0, 4.0, 3) * s
        # physical centre of the volume: within 2 mm of (0, 0, 0), so that cases overlap physically
        # (registration starts from physical alignment, as with scans of one scanner/protocol)
        self.origin = np.array([rng.uniform(-2, 2), rng.uniform(-2, 2), rng.uniform(-2, 2)])
        self.shape_zyx = (size, size, size)
        self.deform = _smooth_field(rng, self.shape_zyx, 4, deform_std_mm, 3)  # (x,y,z) comps

    def canonical_coords(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(qx, qy, qz) canonical mm of every output voxel, each (z, y, x) float32."""
        n = self.size
        c = (n - 1) / 2.0
        px = ((np.arange(n) - c) * self.spacing[0]).astype(np.float32).reshape(1, 1, -1)
        py = ((np.arange(n) - c) * self.spacing[1]).astype(np.float32).reshape(1, -1, 1)
        pz = ((np.arange(n) - c) * self.spacing[2]).astype(np.float32).reshape(-1, 1, 1)
        L = self.linear.astype(np.float32)
        q = []
        for r in range(3):
            q.append(L[r, 0] * px + L[r, 1] * py + L[r, 2] * pz + np.float32(self.translation[r])
                     + self.deform[r])
        return q[0], q[1], q[2]

    def image(self, array_zyx: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(array_zyx)
        img.SetSpacing(self.spacing)
        c = (self.size - 1) / 2.0
        img.SetOrigin(tuple(float(o - c * s) for o, s in zip(self.origin, self.spacing)))
        return img


def _sample(canvas_builder: Callable[[np.ndarray, np.ndarray], _Canvas], pose: _Pose) -> np.ndarray:
    """Build the canonical canvas covering every q(p) and sample it (nearest) -> (z, y, x) uint8."""
    qx, qy, qz = pose.canonical_coords()
    lo = np.floor([qx.min(), qy.min(), qz.min()]) - 2
    hi = np.ceil([qx.max(), qy.max(), qz.max()]) + 2
    canvas = canvas_builder(lo, hi)
    ix = np.clip(np.rint(qx - np.float32(canvas.lo[0])).astype(np.intp), 0, canvas.shape_xyz[0] - 1)
    iy = np.clip(np.rint(qy - np.float32(canvas.lo[1])).astype(np.intp), 0, canvas.shape_xyz[1] - 1)
    iz = np.clip(np.rint(qz - np.float32(canvas.lo[2])).astype(np.intp), 0, canvas.shape_xyz[2] - 1)
    return canvas.cls[iz, iy, ix]


def _blur(array: np.ndarray, spacing, sigma_mm: float) -> np.ndarray:
    img = sitk.GetImageFromArray(array.astype(np.float32, copy=False))
    img.SetSpacing(spacing)
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, sigma_mm))


# =======================================================================================
# Heart CT
# =======================================================================================
class _H:  # tissue classes of the heart phantom
    AIR, FAT, SOFT, LUNG, LUNG_VESSEL, BONE, MARROW, DISC, CORD, EPI_FAT = range(10)
    WALL, LV_MYO, LV, RV, LA, RA, AO, PA, ART, VEN, PV, COR, LIVER, ESO = range(10, 24)


_HEART_LABEL_OF = {_H.LV_MYO: 205, _H.LA: 420, _H.LV: 500, _H.RA: 550, _H.RV: 600, _H.AO: 820, _H.PA: 850}
_HEART_SOLID = (_H.WALL, _H.LV_MYO, _H.LV, _H.RV, _H.LA, _H.RA, _H.AO, _H.PA, _H.ART, _H.VEN, _H.PV)
_BLOOD_POOLS = (_H.LV, _H.RV, _H.LA, _H.RA, _H.AO)  # coronaries may graze the PA trunk


def _heart_canvas(rng, s: float):
    """Returns a builder(lo, hi) -> painted _Canvas for one case's canonical thorax."""
    j = lambda sd=1.0: rng.normal(0.0, sd) * s          # position jitter (mm)
    k = lambda: float(rng.uniform(0.9, 1.1))            # size jitter (factor)
    V = lambda *xyz: np.array(xyz, dtype=np.float64) * s  # canonical mm at this size
    # --- parameters (drawn before painting so the case is fully determined by the seed)
    body_ax, body_ay = 45 * s * k(), 37 * s * k()
    fat_mm = (2.5 + rng.uniform(0, 2.5)) * s
    cav_ax, cav_ay = body_ax - 7 * s, body_ay - 10 * s
    H = V(4, -3, -6) + np.array([j(1.5), j(1.5), j(1.5)])
    long_axis = _unit(np.array([0.55, -0.45, -0.70]) + rng.normal(0, 0.08, 3))
    lv_frame = _frame(long_axis, [-1.0, -0.7, 0.1])         # rows: long axis, towards RV, third
    kl = k()
    lv_c = H + 3 * s * long_axis
    lv_in = np.array([17, 9, 9]) * s * kl * np.array([1, k(), k()])
    wall = 5 * s * k()
    lv_out = lv_in + wall
    base_cut = 13 * s * kl
    rv_c = lv_c + 11 * s * kl * lv_frame[1] - 3 * s * long_axis
    rv_r = np.array([16, 10, 15]) * s * k()
    la_c, la_r = V(2, 10, 6) + [j(), j(), j()], V(12, 6, 8) * k()
    ra_c, ra_r = V(-15, 2, 2) + [j(), j(), j()], V(9, 9, 11) * k()
    ao_pts = [V(-3, -1, 0), V(-5, -4, 12), V(-6, -4, 24), V(-4, 2, 35)]
    arch_pts = [V(-4, 2, 35), V(3, 10, 40), V(10, 17, 34), V(12, 19, 20), V(12, 19, -90)]
    jit = np.array([j(), j(), 0.0])
    ao_pts = [p + jit for p in ao_pts]
    arch_pts = [arch_pts[0] + jit] + arch_pts[1:]
    ao_r, desc_r = 6.5 * s * k(), 5.5 * s * k()
    pa_trunk = [V(-3, -11, -4), V(1, -14, 6), V(5, -10, 17), V(5, -2, 25), V(3, 4, 28)]
    pa_left = [V(3, 4, 28), V(14, 8, 29), V(24, 10, 25)]
    pa_right = [V(3, 4, 28), V(-8, 8, 30), V(-22, 9, 26)]
    pa_r = 6 * s * k()
    spine_c = V(0, 26, 0) + [j(0.7), j(0.7), 0]
    rib_phase, rib_slope = rng.uniform(0, 12), rng.uniform(4, 8)
    n_lung_vessels = int(40 * s ** 2)
    lung_vessel_seeds = rng.uniform(-1, 1, (n_lung_vessels, 3))
    lung_vessel_dirs = rng.normal(0, 1, (n_lung_vessels, 3))
    cor_wobble = rng.normal(0, 0.08, 8)

    def build(lo, hi) -> _Canvas:
        cv = _Canvas(lo, hi - lo + 1, fill=_H.AIR)
        sl, x, y, z = cv.whole()
        # --- body (elliptic cylinder), subcutaneous fat, muscle, thoracic cavity = lung
        rb = np.sqrt((x / body_ax) ** 2 + ((y - 6 * s) / body_ay) ** 2)
        cv.paint(sl, rb <= 1.0, _H.FAT)
        cv.paint(sl, rb <= 1.0 - fat_mm / body_ay, _H.SOFT)
        rc = np.sqrt((x / cav_ax) ** 2 + ((y - 4 * s) / cav_ay) ** 2)
        cv.paint(sl, rc <= 1.0, _H.LUNG)
        # ribs: oblique bands on the cavity wall (not at the anterior midline), sternum
        ang = np.arctan2(x, -(y - 4 * s))  # 0 anterior, +-pi posterior
        zr = (z + rib_phase * s + rib_slope * s * np.abs(ang)) % (12 * s)
        rib = (rc > 1.0) & (rc <= 1.0 + 3.5 * s / cav_ay) & (zr < 5 * s) & (np.abs(ang) > 0.45)
        cv.paint(sl, rib, _H.BONE)
        cv.paint(sl, rib & (rc > 1.0 + 1.0 * s / cav_ay) & (rc <= 1.0 + 2.5 * s / cav_ay) & (zr > 1.2 * s)
                 & (zr < 3.8 * s), _H.MARROW)
        stern = (np.abs(x) < 7 * s) & (np.abs(y - (4 * s - cav_ay - 2.5 * s)) < 2.5 * s)
        cv.paint(sl, stern, _H.BONE)
        cv.paint(sl, stern & (np.abs(x) < 5.5 * s) & (np.abs(y - (4 * s - cav_ay - 2.5 * s)) < 1.3 * s),
                 _H.MARROW)
        # mediastinum (soft tissue / fat between the lungs), esophagus
        rm = np.sqrt((x / (13 * s)) ** 2 + ((y - 6 * s) / (cav_ay + 2 * s)) ** 2)
        cv.paint(sl, rm <= 1.0, _H.FAT, only=[_H.LUNG])
        cv.paint(sl, (x - 4 * s) ** 2 + (y - 17 * s) ** 2 <= (4 * s) ** 2, _H.ESO, only=[_H.LUNG, _H.FAT])
        cv.paint(sl, (x - 4 * s) ** 2 + (y - 17 * s) ** 2 <= (1.0 * s) ** 2, _H.AIR, only=[_H.ESO])
        # spine: vertebral bodies with discs, canal with cord, posterior arch
        dxs, dys = x - spine_c[0], y - spine_c[1]
        r_vb = np.sqrt(dxs ** 2 + dys ** 2)
        disc = ((z - spine_c[2]) % (14 * s)) < 3 * s
        cv.paint(sl, r_vb <= 8 * s, _H.BONE)
        cv.paint(sl, (r_vb <= 6.5 * s) & ~disc, _H.MARROW)
        cv.paint(sl, (r_vb <= 8 * s) & disc, _H.DISC)
        r_can = np.sqrt(dxs ** 2 + (dys - 11 * s) ** 2)
        cv.paint(sl, (r_can <= 6.5 * s) | ((np.abs(dxs) < 2 * s) & (dys > 11 * s) & (dys < 19 * s)), _H.BONE)
        cv.paint(sl, r_can <= 4 * s, _H.CORD)
        # lung vessels: short random tubes inside the lungs
        for seed, d in zip(lung_vessel_seeds, lung_vessel_dirs):
            p0 = np.array([seed[0] * cav_ax * 0.85, 4 * s + seed[1] * cav_ay * 0.85, seed[2] * 45 * s])
            pts = _densify([p0, p0 + _unit(d) * 12 * s], 0.5)
            cv.balls(pts, np.linspace(1.6, 0.8, len(pts)) * s, _H.LUNG_VESSEL, only=[_H.LUNG])
        # abdomen under the diaphragm: liver dome (right), left upper quadrant
        cv.ellipsoid(V(-12, 4, -60), V(40, 28, 32), _H.LIVER, only=[_H.LUNG, _H.FAT, _H.LUNG_VESSEL])
        cv.ellipsoid(V(14, 4, -68), V(30, 26, 30), _H.SOFT, only=[_H.LUNG, _H.FAT, _H.LUNG_VESSEL])
        # --- heart: pericardial fat envelope, then chambers back to front
        cv.ellipsoid(H + V(-4, 2, 2), V(26, 21, 24), _H.EPI_FAT, axes=lv_frame,
                     only=[_H.LUNG, _H.FAT, _H.SOFT, _H.LUNG_VESSEL, _H.LIVER])
        # great veins (venous contrast lower) and pulmonary veins into the LA
        cv.balls(_curve([ra_c + V(1, 1, 6), ra_c + V(1, 1, 20), ra_c + V(1, 2, 60)]), 5 * s, _H.VEN)
        cv.balls(_curve([ra_c + V(4, 4, -4), ra_c + V(5, 6, -20), ra_c + V(6, 8, -60)]), 6 * s, _H.VEN)
        for side in (-1, 1):
            for dz in (-3, 4):
                cv.balls(_curve([la_c + V(side * 6, 2, dz), la_c + V(side * 16, 5, dz + 1),
                                 la_c + V(side * 24, 6, dz + 3)]), 3.2 * s, _H.PV)
        cv.ellipsoid(la_c, la_r + 2 * s, _H.WALL)
        cv.ellipsoid(la_c, la_r, _H.LA)
        cv.ellipsoid(ra_c, ra_r + 2 * s, _H.WALL)
        cv.ellipsoid(ra_c, ra_r, _H.RA)
        cv.ellipsoid(rv_c, rv_r + 2.5 * s, _H.WALL, axes=lv_frame)
        cv.ellipsoid(rv_c, rv_r, _H.RV, axes=lv_frame)
        e = cv.ellipsoid_coords(lv_c, lv_out, lv_frame)
        sl2, rho, us = e
        below_base = us[0] >= -base_cut
        cv.paint(sl2, (rho <= 1.0) & below_base, _H.LV_MYO)
        e = cv.ellipsoid_coords(lv_c, lv_in, lv_frame)
        cv.paint(e[0], (e[1] <= 1.0) & (e[2][0] >= -base_cut - 2 * s), _H.LV)
        # pulmonary artery from the RV outflow tract, then the aorta from the LV outflow tract
        cv.balls(_curve(pa_trunk), pa_r, _H.PA)
        for branch in (pa_left, pa_right):
            pts = _curve(branch)
            inner = np.abs(pts[:, 0]) < 20 * s
            cv.balls(pts[inner], 4.5 * s, _H.PA)
            cv.balls(pts[~inner], 4.0 * s, _H.ART)
        cv.balls(_curve(arch_pts), desc_r, _H.ART)
        cv.balls(_curve(ao_pts), ao_r, _H.AO)
        # --- coronary arteries on the epicardial surface
        _coronaries(cv, s, lv_c, lv_out, lv_frame, ao_pts[0], ao_pts[1] - ao_pts[0], ao_r, cor_wobble)
        return cv

    return build


def _surface_points(cv: _Canvas, origin, dirs, offset_mm: float, max_mm) -> np.ndarray:
    """March from ``origin`` along each unit direction; return the first point outside the
    heart and its vessels (classes _HEART_SOLID), at most ``max_mm[i]`` away (so a ray running
    inside a great vessel stops near the heart), pushed ``offset_mm`` further out."""
    steps = np.arange(0.0, 60.0, 0.5)
    pts = origin[None, None, :] + dirs[:, None, :] * steps[None, :, None]
    inside = np.isin(cv.lookup(pts), _HEART_SOLID)
    dist = np.minimum(steps[np.argmax(~inside, axis=1)], max_mm)
    # ride on the outer envelope: the largest exit distance over neighbouring directions, so the
    # centre line does not dip into crevices between chambers
    padded = np.pad(dist, 3, mode="edge")
    dist = np.max(np.stack([padded[i:i + len(dist)] for i in range(7)]), axis=0)
    return origin[None, :] + dirs * (dist + offset_mm)[:, None]


def _coronaries(cv: _Canvas, s: float, lv_c, lv_out, frame, ao_root, ao_axis, ao_r, wobble) -> None:
    """LAD, diagonal, LCx, obtuse marginal, RCA + PDA as tubes of radius ~1-1.6 mm along the
    epicardial surface (directions given as (u along the long axis, angle about it) from the
    LV centre), starting at the aortic root."""
    a, to_rv, third = frame
    ant = third if third[1] < 0 else -third  # the side of the RV crescent facing anterior

    def dirs(u, phi_deg):
        u = np.clip(np.asarray(u, dtype=np.float64), -0.98, 0.98)
        phi = np.deg2rad(np.asarray(phi_deg, dtype=np.float64))
        r = np.sqrt(1 - u ** 2)
        d = (a[None] * u[:, None] + r[:, None] * (np.cos(phi)[:, None] * to_rv[None]
                                                   + np.sin(phi)[:, None] * ant[None]))
        return d / np.linalg.norm(d, axis=1, keepdims=True)

    ao_axis = _unit(ao_axis)

    def vessel(u, phi, r0, r1, start=None, parent=None, ostium=False):
        d = dirs(u, phi)
        to_lv_surface = 1.0 / np.linalg.norm((d @ frame.T) / lv_out[None], axis=1)
        pts = _surface_points(cv, lv_c, d, r0 + 0.7 * s, to_lv_surface + 14.0 * s)
        if parent is not None:  # branch off the nearest point of the parent vessel
            start = parent[np.argmin(np.linalg.norm(parent - pts[0], axis=1))][None]
        if ostium:  # leave the aortic root (a sinus above the valve) towards the first point
            level = ao_root + 6.0 * s * ao_axis
            d = pts[0] - level
            d = _unit(d - (d @ ao_axis) * ao_axis)
            start = np.stack([level + (ao_r + 0.3 * r0) * d, level + (ao_r + 2.5 * r0) * d])
        if start is not None:
            pts = np.vstack([start, pts])
        kernel = np.ones(5) / 5.0
        sm = np.stack([np.convolve(np.pad(pts[:, i], 2, mode="edge"), kernel, mode="valid")
                       for i in range(3)], 1)
        sm[0] = pts[0]  # keep the start on the parent vessel / aortic root
        dense = _densify(sm, 0.4)
        radii = np.maximum(np.linspace(r0, r1, len(dense)), 1.0)
        cv.balls(dense, radii, _H.COR, never=_BLOOD_POOLS)
        if ostium:  # the left main / proximal RCA squeeze between the great vessels and atria
            n_prox = int(np.argmin(np.linalg.norm(dense - pts[2], axis=1))) + 1
            cv.balls(dense[:n_prox], radii[:n_prox], _H.COR, never=(_H.LV, _H.RV))
        return dense

    n = 48
    t = np.linspace(0, 1, n)
    w = wobble
    # left main -> LAD along the anterior interventricular groove to the apex
    # (the left main leaves the root behind the pulmonary trunk, the LAD then turns into the groove)
    lad_u = -0.85 + 1.8 * t
    lad_phi = 78 + 55 * np.exp(-t / 0.08) + 8 * np.sin(3 * t + w[0] * 10) + 10 * w[1] * t
    lad = vessel(lad_u, lad_phi, 1.6 * s, 1.0 * s, ostium=True)
    # diagonal: from the proximal LAD over the anterolateral wall
    vessel(-0.35 + 0.8 * t, 85 + 60 * t + 10 * w[2], 1.2 * s, 1.0 * s, parent=lad)
    # circumflex in the left atrioventricular groove, then an obtuse marginal
    lcx = vessel(np.full(n, -0.82 + 0.04 * w[3]), 95 + 150 * t, 1.4 * s, 1.1 * s, parent=lad[:60])
    vessel(-0.75 + 1.1 * t, 185 + 10 * np.sin(2 * t) + 10 * w[4], 1.2 * s, 1.0 * s, parent=lcx)
    # right coronary: right atrioventricular groove around the RV, then posterior descending
    rca = vessel(np.full(n, -0.88 + 0.04 * w[5]), 60 - 140 * t, 1.5 * s, 1.2 * s, ostium=True)
    vessel(-0.85 + 1.3 * t, -82 + 6 * np.sin(3 * t) + 10 * w[6], 1.2 * s, 1.0 * s, parent=rca)


_CT_HU = {_H.AIR: -1000, _H.FAT: -100, _H.SOFT: 45, _H.LUNG: -850, _H.LUNG_VESSEL: 80, _H.BONE: 750,
          _H.MARROW: 230, _H.DISC: 90, _H.CORD: 35, _H.EPI_FAT: -90, _H.WALL: 100, _H.LV_MYO: 120,
          _H.LV: 380, _H.RV: 320, _H.LA: 370, _H.RA: 300, _H.AO: 390, _H.PA: 320, _H.ART: 390,
          _H.VEN: 220, _H.PV: 360, _H.COR: 380, _H.LIVER: 65, _H.ESO: 40}


def make_heart_phantom(size: int = 96, seed: int = 0) -> Tuple[sitk.Image, sitk.Image, sitk.Image]:
    """A contrast-enhanced cardiac CT phantom.

    Returns ``(ct, heart_labels, coronary)`` on the same grid (``size``^3 voxels, spacing
    (1, 1, 1 or 1.2) mm, identity direction): ``ct`` int16 HU (air -1000, lung ~-850, fat
    ~-100, myocardium ~120, contrast blood ~300-400, bone ~750), ``heart_labels`` uint16 with
    the MM-WHS values {205, 420, 500, 550, 600, 820, 850} (0 elsewhere), ``coronary`` uint8
    (1 = coronary artery tree, radius ~1-1.6 mm). Deterministic per ``seed``.
    """
    size = _check_size(size)
    rng = np.random.default_rng(seed)
    s = size / 96.0
    build = _heart_canvas(rng, s)
    pose = _Pose(rng, size, s, deform_std_mm=2.5 * s)
    cls = _sample(build, pose)
    # intensities: per-case contrast timing and tissue jitter
    hu = np.array([_CT_HU.get(c, 0) for c in range(256)], dtype=np.float32)
    blood = [_H.LV, _H.RV, _H.LA, _H.RA, _H.AO, _H.PA, _H.ART, _H.PV, _H.COR]
    hu[blood] += np.float32(rng.normal(0, 35))
    hu[[_H.RV, _H.RA, _H.PA]] += np.float32(rng.normal(0, 25))
    hu[[_H.SOFT, _H.LV_MYO, _H.WALL, _H.LIVER]] += np.float32(rng.normal(0, 8))
    lut_noise = rng.normal(0, 4, 256).astype(np.float32)
    img = hu[cls] + lut_noise[cls]
    # lung parenchyma texture (smooth) and noise, then the point-spread function, then noise
    tex = _smooth_field(rng, pose.shape_zyx, 8, 25.0, 1)[0]
    img += np.where(cls == _H.LUNG, tex, 0.0).astype(np.float32)
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    img = _blur(img, pose.spacing, 0.6)
    img += rng.normal(0, float(rng.uniform(8, 16)), img.shape).astype(np.float32)
    ct = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    heart_lut = np.zeros(256, np.uint16)
    for c, v in _HEART_LABEL_OF.items():
        heart_lut[c] = v
    heart = heart_lut[cls]
    coronary = (cls == _H.COR).astype(np.uint8)
    return pose.image(ct), pose.image(heart), pose.image(coronary)


# =======================================================================================
# Brain MR (T1-like)
# =======================================================================================
class _B:  # unlabelled tissue classes of the brain phantom (labelled ones use aseg values)
    AIR, SKIN, SCALP_FAT, SKULL, DIPLOE, EXT_CSF, EYE, MUSCLE = 0, 100, 101, 102, 103, 104, 105, 106


_T1 = {_B.AIR: 0, _B.SKIN: 380, _B.SCALP_FAT: 780, _B.SKULL: 60, _B.DIPLOE: 430, _B.EXT_CSF: 120,
       _B.EYE: 110, _B.MUSCLE: 330,
       2: 850, 41: 850, 3: 590, 42: 590, 4: 120, 43: 120, 7: 820, 46: 820, 8: 610, 47: 610,
       10: 720, 49: 720, 11: 600, 50: 600, 12: 650, 51: 650, 13: 770, 52: 770, 14: 120, 15: 120,
       16: 770, 17: 580, 53: 580, 18: 590, 54: 590, 24: 125, 28: 740, 60: 740}


def _fold_field(rng, n_waves: int, freq: Tuple[float, float]):
    """f(directions) = normalised sum of random plane waves on the unit sphere."""
    k = rng.normal(0, 1, (n_waves, 3))
    k = k / np.linalg.norm(k, axis=1, keepdims=True) * rng.uniform(*freq, (n_waves, 1))
    ph = rng.uniform(0, 2 * np.pi, n_waves)

    def f(nx, ny, nz):
        out = 0.0
        for (kx, ky, kz), p in zip(k.astype(np.float32), ph.astype(np.float32)):
            out = out + np.cos(kx * nx + ky * ny + kz * nz + p)
        return out * np.float32(np.sqrt(2.0 / n_waves))

    return f


def _brain_canvas(rng, s: float):
    k = lambda: float(rng.uniform(0.92, 1.08))
    V = lambda *xyz: np.array(xyz, dtype=np.float64) * s
    jit = lambda: rng.normal(0, 0.6, 3) * s
    head_c, head_r = V(0, 2, 2), V(41, 47, 45) * k()
    cer_c, cer_r = V(0, 3, 9) + jit(), V(33, 41, 30) * np.array([k(), k(), k()])
    temp_r = V(11, 20, 12) * k()
    fold = _fold_field(rng, 14, (11.0, 16.0))
    cortex_mm = 3.2 * s * k()
    sulcus_mm = 8.0 * s * k()
    cb_r = V(16, 13, 11) * k()
    cb_phase = rng.uniform(0, 2 * np.pi)
    deep = {name: jit() for name in ("lv", "caud", "thal", "put", "pal", "hip", "amy", "vdc", "v3")}
    asym = rng.normal(0, 0.5, (2, 3)) * s  # mild left/right asymmetry

    def pair(c):
        """(+1, left centre at +x), (-1, mirrored right centre), each with its own jitter."""
        c = np.asarray(c, dtype=np.float64)
        return [(+1, c + asym[0]), (-1, c * [-1, 1, 1] + asym[1])]

    def build(lo, hi) -> _Canvas:
        cv = _Canvas(lo, hi - lo + 1, fill=_B.AIR)
        lobes = [(cer_c, cer_r)] + [(cer_c + V(sd * 24, -9, -19), temp_r) for sd in (-1, 1)]
        cb_c = [cer_c + V(sd * 14, 23, -31) for sd in (-1, 1)]
        C = cer_c
        stem = _curve([C + V(0, 7, -12), C + V(0, 10, -24), C + V(0, 13, -36), C + V(0, 15, -80)], 0.5)
        zrel = (stem[:, 2] - (C[2] - 30 * s)) / (10 * s)
        stem_r = (6.2 + 2.3 * np.exp(-zrel ** 2)) * s
        # --- head: skin, scalp fat, soft tissue; neck
        sl, x, y, z = cv.whole()
        neck = (((x / (24 * s)) ** 2 + ((y - 8 * s) / (24 * s)) ** 2) <= 1.0) & (z < -25 * s)
        cv.paint(sl, neck, _B.MUSCLE)
        mean_r = float(np.mean(head_r))
        sl, rho, _ = cv.ellipsoid_coords(head_c, head_r)
        for r_mm, c in ((0.0, _B.SKIN), (1.2, _B.SCALP_FAT), (3.0, _B.MUSCLE)):
            cv.paint(sl, rho <= 1.0 - r_mm * s / mean_r, c)
        # skull (outer table, diploe, inner table) and CSF following the brain's outline
        envelope = lobes + [(c, cb_r) for c in cb_c]
        for grow, c_new, only in ((6.5, _B.SKULL, [_B.MUSCLE]), (5.2, _B.DIPLOE, [_B.SKULL]),
                                  (2.6, _B.SKULL, [_B.DIPLOE]),
                                  (1.4, _B.EXT_CSF, [_B.SKULL, _B.DIPLOE, _B.MUSCLE])):
            for c, r in envelope:
                cv.ellipsoid(c, r + grow * s, c_new, only=only)
        cv.balls(stem, stem_r + 1.4 * s, _B.EXT_CSF, only=[_B.SKULL, _B.DIPLOE, _B.MUSCLE])
        for side in (-1, 1):
            cv.ellipsoid(V(side * 15, -36, -12), V(5.5, 5.5, 5.5), _B.EYE,
                         only=[_B.MUSCLE, _B.SKULL, _B.DIPLOE, _B.SCALP_FAT])
        # --- cerebrum: folded cortex over white matter, main ellipsoid + temporal lobes
        for c, r in lobes:
            e = cv.ellipsoid_coords(c, r, margin=0.02)
            if e is None:
                continue
            sl, rho, us = e
            rr = np.float32(np.mean(r))
            # sulci: where a random wave field on the sphere of directions (seen from the
            # cerebrum's centre, for every lobe) is near zero, ``sulcus_mm`` deep; white matter
            # stays ``cortex_mm`` below the surface and retreats from the sulci
            d = [(u + np.float32(c[i] - cer_c[i])) / np.float32(cer_r[i]) for i, u in enumerate(us)]
            inv = 1.0 / np.maximum(np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2), np.float32(1e-3))
            f = fold(d[0] * inv, d[1] * inv, d[2] * inv)
            sulc = np.exp(-(f / 0.3) ** 2)
            wide = np.exp(-(f / 0.8) ** 2)
            brain = rho <= 1.0 - sulcus_mm * sulc / rr
            wm = rho <= 1.0 - (cortex_mm + 0.8 * sulcus_mm * wide) / rr
            left = (us[0] + np.float32(c[0] - cer_c[0])) >= 0  # +x = patient left
            cv.paint(sl, brain & left, 3, only=[_B.EXT_CSF])
            cv.paint(sl, brain & ~left, 42, only=[_B.EXT_CSF])
            cv.paint(sl, wm & left, 2, only=[3, 42])
            cv.paint(sl, wm & ~left, 41, only=[3, 42])
        # interhemispheric fissure (CSF) above the corpus callosum and at the poles
        sl, x, y, z = cv.whole()
        fiss = (np.abs(x - np.float32(cer_c[0])) < 1.0 * s) & ((z > cer_c[2] + 11 * s) | (np.abs(y - cer_c[1]) > 27 * s))
        cv.paint(sl, fiss, _B.EXT_CSF, only=[2, 3, 41, 42])
        # --- cerebellum (below the tentorium): folia cortex, arbor-vitae white matter
        for c in cb_c:
            cv.ellipsoid(c, cb_r + 1.5 * s, _B.EXT_CSF, never=[_B.SKULL, _B.DIPLOE, _B.SKIN, _B.SCALP_FAT, _B.AIR])
        for sd, c in zip((-1, 1), cb_c):
            e = cv.ellipsoid_coords(c, cb_r)
            sl, rho, us = e
            folia = np.cos(np.float32(2 * np.pi / (3.2 * s)) * (us[2] + np.float32(0.25) * us[1]) + np.float32(cb_phase))
            ctx = rho <= 1.0 - 0.07 * (folia > 0.4)
            ang = np.arctan2(us[2], us[1])
            arbor = rho <= 0.42 + 0.28 * np.clip(np.cos(7 * ang), 0, 1) ** 2
            cv.paint(sl, ctx, 8 if sd > 0 else 47, only=[_B.EXT_CSF])
            cv.paint(sl, ctx & arbor, 7 if sd > 0 else 46, only=[8, 47])
        # --- deep grey matter, ventricles (paired: +1 = left = +x)
        labels = {"lv": (4, 43), "caud": (11, 50), "thal": (10, 49), "put": (12, 51), "pal": (13, 52),
                  "hip": (17, 53), "amy": (18, 54), "vdc": (28, 60)}
        wm_gm = [2, 3, 41, 42]
        for side, c in pair(V(21, -3, -3) + deep["put"]):
            cv.ellipsoid(C + c, V(4, 10, 7), labels["put"][side < 0], only=wm_gm)
        for side, c in pair(V(16.5, -1, -5) + deep["pal"]):
            cv.ellipsoid(C + c, V(2.7, 6, 4), labels["pal"][side < 0], only=wm_gm + [12, 51])
        for side, c in pair(V(7, 7, -4) + deep["thal"]):
            cv.ellipsoid(C + c, V(5.5, 8, 5.5), labels["thal"][side < 0], only=wm_gm)
        for side, c in pair(V(12, -9, 3) + deep["caud"]):
            cv.ellipsoid(C + c, V(4, 8, 5.5), labels["caud"][side < 0], only=wm_gm)
            cv.ellipsoid(C + c + V(side * -1, 16, 4.5), V(2.5, 9, 2.5), labels["caud"][side < 0], only=wm_gm)
        for side, c in pair(V(6.5, -1, 5) + deep["lv"]):
            lv = labels["lv"][side < 0]
            cv.ellipsoid(C + c, V(4.5, 17, 6), lv, only=wm_gm + [11, 50])
            ax = _frame([side * 0.25, 0.6, -0.75], [1, 0, 0])
            cv.ellipsoid(C + c + V(side * 4, 18, -6), V(8, 3, 3.5), lv, axes=ax, only=wm_gm)
        for side, c in pair(V(8, 5, -14) + deep["vdc"]):
            cv.ellipsoid(C + c, V(4, 6, 3.5), labels["vdc"][side < 0], only=wm_gm)
        for side, c in pair(V(21, 10, -20) + deep["hip"]):
            ax = _frame([0, 1.0, 0.35], [1, 0, 0])
            cv.ellipsoid(C + c, V(11, 4, 4), labels["hip"][side < 0], axes=ax, only=wm_gm)
        for side, c in pair(V(21, -6, -22) + deep["amy"]):
            cv.ellipsoid(C + c, V(5, 5, 5), labels["amy"][side < 0], only=wm_gm + [17, 53])
        cv.ellipsoid(C + V(0, 3, -5) + deep["v3"] * [0, 1, 1], V(1.7, 9, 5), 14)
        # --- brain stem (midbrain, pons, medulla), CSF cistern, 4th ventricle
        cv.ellipsoid(C + V(0, -4, -25), V(6.5, 3.5, 4), 24, never=[_B.EYE])
        cv.balls(stem, stem_r, 16, never=[_B.SKIN, _B.SCALP_FAT, _B.SKULL, _B.DIPLOE])
        cv.ellipsoid(C + V(0, 22.5, -32), V(4, 2.5, 5), 15)
        return cv

    return build


def make_brain_phantom(size: int = 96, seed: int = 0) -> Tuple[sitk.Image, sitk.Image]:
    """A T1-weighted brain MR phantom.

    Returns ``(t1, labels)`` on the same grid (``size``^3 voxels, spacing (1, 1, 1 or 1.2) mm,
    identity direction): ``t1`` int16 in arbitrary units (white matter ~850, grey matter
    ~600, CSF ~120, skull ~60, scalp fat ~780, air ~0; Rician noise, smooth bias field,
    per-case scale 0.8-1.2), ``labels`` uint16 with the 28 FreeSurfer aseg values of
    ``brain.tsv`` (left structures on the patient's left, +x). Deterministic per ``seed``.
    """
    size = _check_size(size)
    rng = np.random.default_rng(seed)
    s = size / 96.0
    build = _brain_canvas(rng, s)
    pose = _Pose(rng, size, s, deform_std_mm=2.0 * s)
    cls = _sample(build, pose)
    lut = np.array([_T1.get(c, 0) for c in range(256)], dtype=np.float32)
    lut *= (1.0 + rng.normal(0, 0.03, 256)).astype(np.float32)
    img = lut[cls]
    img = _blur(img, pose.spacing, 0.5)
    bias = 1.0 + _smooth_field(rng, pose.shape_zyx, 3, 0.08, 1)[0]
    img = img * bias * np.float32(rng.uniform(0.8, 1.2))
    sigma = np.float32(rng.uniform(12, 22))
    n1 = rng.normal(0, 1, img.shape).astype(np.float32) * sigma
    n2 = rng.normal(0, 1, img.shape).astype(np.float32) * sigma
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    t1 = np.clip(np.rint(img), 0, 32767).astype(np.int16)
    labels = np.where(cls < 100, cls, 0).astype(np.uint16)
    return pose.image(t1), pose.image(labels)


# =======================================================================================
# Writing cases, the `gvsl phantom` command
# =======================================================================================
def _check_size(size: int) -> int:
    size = int(size)
    if size < 32 or size > 512:
        raise ValueError(f"phantom size {size} is out of range: use 32..512 voxels per axis "
                         "(96 is the default; 64 is enough for quick tests).")
    return size


def _check_args(kind: str, n: int, size: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; choose one of {', '.join(KINDS)}")
    if int(n) < 1:
        raise ValueError(f"number of phantoms must be >= 1, got {n}")
    _check_size(size)


def write_phantoms(kind: str, n: int, size: int, seed: int, out, progress=None) -> List[Path]:
    """Write ``n`` phantom cases of ``kind`` ("heart" or "brain") under ``out``.

    Layout: ``out/images/<kind>_<iii>.nii.gz``, ``out/labels/<kind>_<iii>.nii.gz`` and, for
    heart, ``out/labels-coronary/<kind>_<iii>.nii.gz``; case ``i`` (0-based) uses seed
    ``seed * 1000 + i``. Files are written atomically. ``progress``: a
    :class:`gvsl.progress.Progress` (``update(i + 1, case=name)`` per case) or None.
    Returns the image paths.
    """
    from gvsl.io import write_image_atomic

    _check_args(kind, n, size)
    out = Path(out)
    paths = []
    for i in range(int(n)):
        name = f"{kind}_{i:03d}"
        case_seed = int(seed) * 1000 + i
        if kind == "heart":
            image, labels, coronary = make_heart_phantom(size, case_seed)
            write_image_atomic(coronary, out / "labels-coronary" / f"{name}.nii.gz")
        else:
            image, labels = make_brain_phantom(size, case_seed)
        write_image_atomic(labels, out / "labels" / f"{name}.nii.gz")
        paths.append(write_image_atomic(image, out / "images" / f"{name}.nii.gz"))
        if progress is not None:
            progress.update(i + 1, case=name)
    return paths


def run_cli(args) -> int:
    """``gvsl phantom``: write synthetic cases and print a summary."""
    from gvsl.errors import GVSLError
    from gvsl.progress import Progress

    try:
        _check_args(args.kind, args.n, args.size)
    except ValueError as exc:
        raise GVSLError(str(exc)) from None
    from gvsl.outputs import check_writable
    check_writable(args.out)  # --out is a writable folder before anything is made
    progress = Progress(args.n, mode=args.progress, task="phantom")
    progress.event("start", kind=args.kind, n=args.n, size=args.size, seed=args.seed, out=str(args.out))
    t0 = time.perf_counter()
    paths = write_phantoms(args.kind, args.n, args.size, args.seed, args.out, progress=progress)
    elapsed = time.perf_counter() - t0
    out = Path(args.out)
    folders = ["images", "labels"] + (["labels-coronary"] if args.kind == "heart" else [])
    summary = {"kind": args.kind, "n": len(paths), "size": args.size, "out": str(out),
               "folders": folders, "seconds": round(elapsed, 2)}
    progress.event("done", **summary)
    if args.progress != "json":
        print(f"wrote {len(paths)} {args.kind} phantom(s) of {args.size}^3 voxels to {out} "
              f"({', '.join(f + '/' for f in folders)}) in {elapsed:.1f} s")
    return 0
