"""Geometry of the network checked against SimpleITK (an independent implementation)."""
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl import geometry

SHAPE = (22, 26, 30)  # (z, y, x), non-cubic


def smooth_image(shape=SHAPE, seed=0):
    """A smooth, non-symmetric test image (z, y, x) so trilinear interpolation errors stay small."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    img = np.zeros(shape)
    for _ in range(4):
        f = rng.uniform(0.5, 2.0, 3)
        ph = rng.uniform(0, 2 * np.pi, 3)
        img += np.sin(2 * np.pi * f[0] * z + ph[0]) * np.cos(2 * np.pi * f[1] * y + ph[1]) * np.sin(2 * np.pi * f[2] * x + ph[2])
    img += 3 * x + 2 * y + z  # breaks symmetries
    return img.astype(np.float32)


def to_torch(arr):
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None].float()


def interior_mask(shape, margin):
    m = np.zeros(shape, bool)
    m[margin:-margin, margin:-margin, margin:-margin] = True
    return m


def test_zero_parameters_give_identity():
    img = to_torch(smooth_image())
    mat = geometry.affine_matrix(torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(1, 6))
    torch.testing.assert_close(mat, torch.eye(4)[None])
    flow = torch.zeros(1, 3, *SHAPE)
    out = geometry.warp(img, geometry.fuse(mat, flow))
    assert (out - img).abs().max().item() <= 1e-5


def test_matrix_is_shear_scale_rz_ry_rx():
    rot = torch.tensor([[0.1, -0.2, 0.3]])
    scl = torch.tensor([[1.1, 0.9, 1.2]])
    tr = torch.tensor([[1.0, 2.0, -3.0]])
    sh = torch.tensor([[0.05, -0.02, 0.03, 0.01, -0.04, 0.02]])
    m = geometry.affine_matrix(rot, scl, tr, sh)[0].double().numpy()
    ax, ay, az = rot[0].double().numpy()
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    t = np.tan(sh[0].double().numpy())
    shear = np.array([[1, t[0], t[1]], [t[2], 1, t[3]], [t[4], t[5], 1]])
    expected = shear @ np.diag(scl[0].double().numpy()) @ rz @ ry @ rx
    np.testing.assert_allclose(m[:3, :3], expected, atol=1e-6)
    np.testing.assert_allclose(m[:3, 3], [1, 2, -3], atol=1e-6)
    np.testing.assert_allclose(m[3], [0, 0, 0, 1])


def sitk_image(arr):
    return sitk.GetImageFromArray(arr.astype(np.float64))  # spacing 1, origin 0, identity: index == mm


def sitk_affine(mat, shape):
    """Our voxel affine as an ITK AffineTransform: x -> L (x - c) + c + t, c = centre (x, y, z)."""
    m = mat[0].double().numpy()
    t = sitk.AffineTransform(3)
    t.SetMatrix(m[:3, :3].ravel().tolist())
    t.SetCenter([(s - 1) / 2.0 for s in shape[::-1]])
    t.SetTranslation(m[:3, 3].tolist())
    return t


def sitk_displacement(flow):
    """Our (1, 3, D, H, W) (z, y, x) voxel flow as an ITK displacement field (x, y, z) in mm."""
    d = flow[0].double().numpy()
    vec = np.stack([d[2], d[1], d[0]], axis=-1)
    field = sitk.GetImageFromArray(vec, isVector=True)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def smooth_flow(shape=SHAPE, amplitude=2.0, seed=1):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    comps = []
    for _ in range(3):
        f = rng.uniform(0.5, 1.5, 3)
        comps.append(amplitude * np.sin(2 * np.pi * (f[0] * z + f[1] * y + f[2] * x) + rng.uniform(0, 6)))
    return torch.from_numpy(np.stack(comps)[None].astype(np.float32))


AFFINE = dict(rotation=torch.tensor([[0.12, -0.08, 0.2]]), scale=torch.tensor([[1.1, 0.92, 1.05]]),
              translation=torch.tensor([[1.5, -2.0, 0.7]]),
              shear=torch.tensor([[0.04, -0.03, 0.02, 0.05, -0.02, 0.03]]))


def test_affine_warp_matches_simpleitk():
    arr = smooth_image()
    mat = geometry.affine_matrix(**AFFINE)
    ours = geometry.warp(to_torch(arr), geometry.affine_displacement(mat, SHAPE))[0, 0].numpy()
    ref = sitk.GetArrayFromImage(sitk.Resample(sitk_image(arr), sitk_image(arr), sitk_affine(mat, SHAPE),
                                               sitk.sitkLinear, 0.0))
    m = interior_mask(SHAPE, 5)
    # both are trilinear interpolation at the same points: agreement to float32 precision
    assert np.abs(ours - ref)[m].max() < 1e-4


def test_displacement_warp_matches_simpleitk():
    arr = smooth_image()
    flow = smooth_flow()
    ours = geometry.warp(to_torch(arr), flow)[0, 0].numpy()
    ref = sitk.GetArrayFromImage(sitk.Resample(sitk_image(arr), sitk_image(arr), sitk_displacement(flow),
                                               sitk.sitkLinear, 0.0))
    m = interior_mask(SHAPE, 3)
    assert np.abs(ours - ref)[m].max() < 1e-4


def test_fusion_equals_simpleitk_composite_and_sequential_warps():
    arr = smooth_image()
    mat = geometry.affine_matrix(**AFFINE)
    flow = smooth_flow(amplitude=1.5)
    img = to_torch(arr)
    fused = geometry.warp(img, geometry.fuse(mat, flow))[0, 0].numpy()
    # ITK composite: the displacement is applied to the point first, then the affine.
    composite = sitk.CompositeTransform([sitk_affine(mat, SHAPE), sitk_displacement(flow)])
    p = (10.0, 11.0, 12.0)
    d = flow[0, :, 12, 11, 10].double().numpy()[::-1]
    expected_point = sitk_affine(mat, SHAPE).TransformPoint(tuple(np.add(p, d)))
    np.testing.assert_allclose(composite.TransformPoint(p), expected_point, atol=1e-5)
    ref = sitk.GetArrayFromImage(sitk.Resample(sitk_image(arr), sitk_image(arr), composite, sitk.sitkLinear, 0.0))
    m = interior_mask(SHAPE, 6)
    assert np.abs(fused - ref)[m].max() < 1e-4
    # affine warp, then deformable warp of the result (two interpolations): equal up to
    # interpolation error of this smooth image (values span ~[-4, 10]).
    seq = geometry.warp(geometry.warp(img, geometry.affine_displacement(mat, SHAPE)), flow)[0, 0].numpy()
    assert np.abs(fused - seq)[m].mean() < 0.02
    assert np.abs(fused - seq)[m].max() < 0.15


def test_nearest_warp_keeps_labels():
    labels = np.zeros(SHAPE, np.float32)
    labels[5:15, 6:20, 8:22] = 3
    labels[8:12, 10:14, 12:16] = 7
    out = geometry.warp(to_torch(labels), smooth_flow(amplitude=1.3), mode="nearest")
    assert set(np.unique(out.numpy())) <= {0.0, 3.0, 7.0}


def test_jacobian_determinant():
    # a pure scaling x -> 1.2 x about the centre has det 1.2 * 0.9 * 1.1 everywhere
    mat = geometry.affine_matrix(torch.zeros(1, 3), torch.tensor([[1.2, 0.9, 1.1]]), torch.zeros(1, 3), torch.zeros(1, 6))
    det = geometry.jacobian_determinant(geometry.affine_displacement(mat, SHAPE))
    torch.testing.assert_close(det, torch.full_like(det, 1.2 * 0.9 * 1.1), atol=1e-4, rtol=1e-4)
    # spacing: a displacement of 0.1 * z voxels on a 2 mm grid is 0.2 mm per 2 mm -> det 1.1
    d = torch.zeros(1, 3, *SHAPE)
    d[:, 0] = 0.2 * torch.arange(SHAPE[0]).view(-1, 1, 1).float()  # mm, along z
    det = geometry.jacobian_determinant(d, spacing=(2.0, 1.0, 1.0))
    torch.testing.assert_close(det, torch.full_like(det, 1.1), atol=1e-5, rtol=1e-5)
    # a folding field: d_x = -2 x gives det -1
    d = torch.zeros(1, 3, *SHAPE)
    d[:, 2] = -2.0 * torch.arange(SHAPE[2]).float()
    det = geometry.jacobian_determinant(d)
    assert geometry.folding_percentage(det) == pytest.approx(100.0)
    assert geometry.folding_percentage(torch.ones(1, 1, 4, 4, 4)) == 0.0
