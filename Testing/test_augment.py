"""GVSL augmentation: the appearance transformation T and the paired spatial augmentation.

Checks each stage against what it must do (values permuted only inside dim/20 blocks, the
published Bézier recipe, noise only inside the drawn boxes), the spatial draw against
gvsl.geometry and plain array shifts, the elastic field's statistics against a direct
full-resolution Simard implementation, and determinism per generator state (CPU).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gvsl import augment, geometry
from gvsl.augment import AugmentError, appearance_transform, augment_pair, random_spatial_transform

SHAPE = (40, 36, 32)  # (z, y, x), non-cubic
NO_SPATIAL = dict(rotation=0.0, scale=(1.0, 1.0), translation=0.0, shear=0.0, p_elastic=0.0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def smooth_volume(shape=SHAPE, batch=1, seed=0):
    """A smooth, non-symmetric volume in [0, 1] (B, 1, z, y, x)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        z, y, x = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
        f = rng.uniform(1, 3, 3)
        v = 0.5 + 0.25 * np.sin(2 * np.pi * f[0] * z) * np.cos(2 * np.pi * f[1] * y) + 0.2 * x * np.cos(f[2] * y)
        out.append(np.clip(v, 0, 1))
    return torch.from_numpy(np.stack(out)[:, None].astype(np.float32))


# ---------------------------------------------------------------------------------------
# appearance transformation
# ---------------------------------------------------------------------------------------
def test_appearance_is_deterministic_per_generator_state_and_differs_between_seeds():
    x = torch.rand(2, 1, *SHAPE, generator=gen(7))
    a = appearance_transform(x, gen(1), p_shuffle=1.0, p_bezier=1.0)
    b = appearance_transform(x, gen(1), p_shuffle=1.0, p_bezier=1.0)
    c = appearance_transform(x, gen(2), p_shuffle=1.0, p_bezier=1.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each batch item its own draws
    # the generator advances identically, so a second call continues identically too
    g1, g2 = gen(3), gen(3)
    appearance_transform(x, g1)
    appearance_transform(x, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_appearance_output_range_shape_dtype_and_input_untouched():
    x = torch.rand(2, 1, *SHAPE, generator=gen(0))
    before = x.clone()
    for dtype in (torch.float32, torch.float64):
        xi = x.to(dtype)
        out = appearance_transform(xi, gen(5), p_shuffle=1.0, p_bezier=1.0)
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        assert out.min() >= 0 and out.max() <= 1
        assert (out != xi).float().mean() > 0.1  # something happened
    assert torch.equal(x, before)
    # all stages off: exact copy (not the same object)
    same = appearance_transform(x, gen(5), p_shuffle=0.0, p_bezier=0.0, p_inpaint=0.0)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()


def test_pixel_shuffling_permutes_values_only_inside_lattice_blocks():
    shape = (48, 44, 40)  # block side dim // 20 = 2 on every axis
    x = torch.rand(1, 1, *shape, generator=gen(11))
    out = appearance_transform(x, gen(4), p_shuffle=1.0, p_bezier=0.0, p_inpaint=0.0)
    # the multiset of values is preserved (blocks never overlap) ...
    assert torch.equal(torch.sort(out.flatten()).values, torch.sort(x.flatten()).values)
    changed = (out != x).float().mean().item()
    # ... the reference's shuffled fraction (0.402) minus the expected fixed points (1 in 8)
    assert 0.25 < changed < 0.45, changed
    # ... and every 2x2x2 cell of one lattice offset holds the same values as before
    found = []
    for off in np.ndindex(2, 2, 2):
        a = x[0, 0, off[0]:, off[1]:, off[2]:]
        b = out[0, 0, off[0]:, off[1]:, off[2]:]
        n = [s // 2 * 2 for s in a.shape]
        a, b = a[:n[0], :n[1], :n[2]], b[:n[0], :n[1], :n[2]]
        cells = lambda t: t.reshape(n[0] // 2, 2, n[1] // 2, 2, n[2] // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(-1, 8)
        ok = torch.equal(torch.sort(cells(a), 1).values, torch.sort(cells(b), 1).values)
        outside = torch.ones(shape, dtype=torch.bool)
        outside[off[0]:off[0] + n[0], off[1]:off[1] + n[1], off[2]:off[2] + n[2]] = False
        if ok and torch.equal(out[0, 0][outside], x[0, 0][outside]):
            found.append(off)
    assert len(found) == 1, found


def test_pixel_shuffling_block_count_keeps_the_reference_fraction():
    assert augment.SHUFFLE_FRACTION == pytest.approx(1 - math.exp(-5000 * 216 / 128 ** 3))
    # 1-voxel blocks (dims < 40) are a no-op, as in the reference
    x = torch.rand(1, 1, 32, 32, 32, generator=gen(0))
    assert torch.equal(appearance_transform(x, gen(0), p_shuffle=1.0, p_bezier=0.0, p_inpaint=0.0), x)


def reference_bezier(points, values, invert=False):
    """The published GVSL recipe in numpy (100000 curve samples, x and y sorted separately)."""
    from math import comb
    t = np.linspace(0.0, 1.0, 100000)
    poly = np.array([comb(3, i) * t ** (3 - i) * (1 - t) ** i for i in range(4)])
    xs = np.sort(np.dot(np.array([p[0] for p in points]), poly))
    ys = np.sort(np.dot(np.array([p[1] for p in points]), poly))
    out = np.interp(values, xs, ys)
    return 1 - out if invert else out


@pytest.mark.parametrize("invert", [False, True])
def test_bezier_matches_the_published_recipe_and_is_monotone(invert):
    ramp = torch.linspace(0, 1, 40 * 36 * 32).reshape(1, 1, *SHAPE)
    for seed in range(4):
        out = appearance_transform(ramp, gen(seed), p_shuffle=0.0, p_bezier=1.0, p_inpaint=0.0,
                                   p_bezier_invert=1.0 if invert else 0.0).flatten()
        if invert:
            assert out[0] == 1 and out[-1] == 0
            assert torch.all(out[1:] <= out[:-1])
        else:
            assert out[0] == 0 and out[-1] == 1
            assert torch.all(out[1:] >= out[:-1])
        # replay the draws: coin(shuffle), coin(bezier), coin(invert), then 4 control coordinates
        g = gen(seed)
        torch.rand(3, generator=g, dtype=torch.float64)
        x1, y1, x2, y2 = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        points = [[1, 1], [x2, y2], [x1, y1], [0, 0]]  # the reference's Bernstein order
        expected = reference_bezier(points, ramp.flatten().double().numpy(), invert)
        np.testing.assert_allclose(out.numpy(), expected, atol=2e-3)
    assert not torch.allclose(out, ramp.flatten(), atol=0.01)  # a real non-linearity


def test_inpainting_changes_only_the_drawn_boxes():
    x = smooth_volume()
    seed = 3
    out = appearance_transform(x, gen(seed), p_shuffle=0.0, p_bezier=0.0, p_inpaint=0.95)
    g = gen(seed)
    torch.rand(2, generator=g, dtype=torch.float64)  # coin(shuffle), coin(bezier)
    boxes = augment._draw_inpaint_boxes(SHAPE, g, 0.95, 30)
    assert 1 <= len(boxes) <= 30
    inside = torch.zeros(SHAPE, dtype=torch.bool)
    for origin, size in boxes:
        for n, o, s in zip(SHAPE, origin, size):
            assert max(1, n // 10) <= s < n // 5
            assert 3 <= o and o + s <= n - 3
        inside[tuple(slice(o, o + s) for o, s in zip(origin, size))] = True
    assert torch.equal(out[0, 0][~inside], x[0, 0][~inside])
    noise = out[0, 0][inside]
    assert (noise != x[0, 0][inside]).float().mean() > 0.99
    assert noise.min() >= 0 and noise.max() < 1 and abs(noise.mean().item() - 0.5) < 0.05
    # in-painting off: nothing changes
    assert torch.equal(appearance_transform(x, gen(seed), p_shuffle=0.0, p_bezier=0.0, p_inpaint=0.0), x)


def test_inpainting_box_count_follows_the_continue_probability():
    counts = [len(augment._draw_inpaint_boxes(SHAPE, gen(s), 0.95, 30)) for s in range(300)]
    # P(n boxes) = 0.95^n * 0.05 for n < 30, P(30) = 0.95^30: mean = sum_{k=1..30} 0.95^k = 14.7
    expected = sum(0.95 ** k for k in range(1, 31))
    assert abs(np.mean(counts) - expected) < 1.5
    assert max(counts) == 30 and min(counts) < 5


# ---------------------------------------------------------------------------------------
# spatial augmentation
# ---------------------------------------------------------------------------------------
def test_zero_strength_spatial_transform_is_exactly_the_identity():
    d = random_spatial_transform(2, SHAPE, gen(0), "cpu", rotation=0.0, scale=(1.0, 1.0), translation=0.0,
                                 shear=0.0, elastic_alpha=(0.0, 0.0))
    assert d.shape == (2, 3, *SHAPE) and d.dtype == torch.float32
    assert torch.count_nonzero(d) == 0
    x_a, x_b = smooth_volume(batch=2), smooth_volume(batch=2, seed=1)
    a, t, b = augment_pair(x_a, x_b, gen(0), appearance=False,
                           spatial_options=dict(NO_SPATIAL, p_affine=0.0))
    # zero displacement; the warp's grid normalisation rounds at the 1e-7 level
    for out, ref in ((a, x_a), (t, x_a), (b, x_b)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_pure_translation_matches_geometry_and_an_array_shift():
    frac = 0.1  # 4, 3.6, 3.2 voxels along z, y, x
    d = random_spatial_transform(1, SHAPE, gen(0), "cpu", rotation=0.0, scale=(1.0, 1.0),
                                 translation=(frac, frac), shear=0.0, p_elastic=0.0)
    for axis, n in enumerate(SHAPE):
        torch.testing.assert_close(d[0, axis], torch.full(SHAPE, frac * n), atol=1e-5, rtol=0)
    # augment_pair applies exactly that draw with geometry.warp
    x = smooth_volume()
    options = dict(NO_SPATIAL, translation=(frac, frac))
    a, _, _ = augment_pair(x, x, gen(0), appearance=False, spatial_options=options)
    shift = random_spatial_transform(1, SHAPE, gen(0), "cpu", **options)
    torch.testing.assert_close(a, geometry.warp(x, shift))
    # a fixed rotation/scale/shear equals geometry's own matrix
    d = random_spatial_transform(3, SHAPE, gen(0), "cpu", rotation=(0.2, 0.2), scale=(0.8, 0.8),
                                 translation=(-0.05, -0.05), shear=(0.1, 0.1), p_elastic=0.0)
    mat = geometry.affine_matrix(torch.full((1, 3), 0.2), torch.full((1, 3), 0.8),
                                 -0.05 * torch.tensor([SHAPE[::-1]], dtype=torch.float32), torch.full((1, 6), 0.1))
    expected = geometry.affine_displacement(mat, SHAPE)
    for b in range(3):
        torch.testing.assert_close(d[b:b + 1], expected, atol=1e-4, rtol=1e-5)


def test_integer_translation_is_an_exact_shift():
    shape = (40, 40, 40)  # 10 % = 4 voxels on every axis
    x = torch.rand(1, 1, *shape, generator=gen(9))
    a, _, _ = augment_pair(x, x, gen(0), appearance=False, spatial_options=dict(NO_SPATIAL, translation=(0.1, 0.1)))
    # output voxel p samples input p + 4 (pull convention)
    torch.testing.assert_close(a[..., :-4, :-4, :-4], x[..., 4:, 4:, 4:], atol=1e-5, rtol=0)
    assert torch.count_nonzero(a[..., -4:, :, :]) == 0


def test_default_draws_stay_in_the_published_ranges_without_folding():
    shape = (33, 31, 29)  # odd: the centre voxel is exact, where the affine displacement is t
    for seed in range(4):
        d = random_spatial_transform(2, shape, gen(seed), "cpu", p_elastic=0.0)
        centre = d[:, :, 16, 15, 14]
        for axis, n in enumerate(shape):
            assert torch.all(centre[:, axis].abs() <= 0.1 * n + 1e-4)
        d = random_spatial_transform(2, shape, gen(seed), "cpu")
        jac = geometry.jacobian_determinant(d)
        # |det| of Shear·Scale·R is within [0.75^3 * 0.9, 1.25^3 * 1.1] roughly; elastic adds little
        assert jac.min() > 0.3 and jac.max() < 2.5, (jac.min(), jac.max())
    assert not torch.equal(d[0], d[1])  # each batch item its own draw


def published_translation_fraction(n=32, drawn=0.1):
    """The shift, as a fraction of the size, that the published augmentation applies for its
    largest translation draw (``trans_x=(-0.1, 0.1)``), restated from the published code and
    MEASURED by sampling (no assumption about normalised units): ``rand_coords`` puts
    ``drawn * N`` in the matrix's last column, ``AffineTransformer`` divides that column by N
    and calls ``F.affine_grid`` + ``F.grid_sample`` (PyTorch defaults, align_corners=False)."""
    mat = torch.zeros(1, 3, 4)
    mat[0, :, :3] = torch.eye(3)
    mat[0, :, 3] = drawn * n
    norm = torch.tensor([[1, 1, 1, n], [1, 1, 1, n], [1, 1, 1, n]], dtype=torch.float)[None]
    grid = F.affine_grid(mat / norm, [1, 1, n, n, n], align_corners=False)
    ramp = torch.arange(n, dtype=torch.float32).view(1, 1, 1, 1, n).expand(1, 1, n, n, n).contiguous()  # value = x index
    sampled = F.grid_sample(ramp, grid, mode="bilinear", align_corners=False)
    c = n // 2
    shift_voxels = float(sampled[0, 0, c, c, c] - ramp[0, 0, c, c, c])
    return shift_voxels / n


def test_default_translation_is_the_published_five_percent():
    fraction = published_translation_fraction()
    assert abs(fraction - 0.05) < 1e-4  # the published settings move ±5 %, not ±10 %
    assert augment.TRANSLATION_FRACTION == pytest.approx(fraction, abs=1e-4)
    shape = (33, 31, 29)  # odd: the centre voxel's affine displacement is the translation
    d = random_spatial_transform(64, shape, gen(3), "cpu", rotation=0.0, scale=(1.0, 1.0), shear=0.0, p_elastic=0.0)
    centre = d[:, :, 16, 15, 14]
    for axis, n in enumerate(shape):
        t = centre[:, axis] / n
        assert torch.all(t.abs() <= fraction + 1e-4), (axis, float(t.abs().max()))
        assert t.max() > 0.8 * fraction and t.min() < -0.8 * fraction  # the whole ±5 % range is used


def direct_simard(shape, alpha, sigma, rng):
    """Reference elastic field: uniform [-1, 1] per voxel smoothed by a normalised Gaussian
    (radius int(4 sigma + 0.5), as the published code / scipy), times alpha. The noise extends
    beyond the volume by the radius (valid convolution), so there is no border attenuation."""
    radius = int(4 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = torch.from_numpy(k / k.sum()).double()
    padded = [n + 2 * radius for n in shape]
    noise = torch.from_numpy(rng.uniform(-1, 1, (3, 1, *padded)))
    f = F.conv3d(noise, k.view(1, 1, -1, 1, 1))
    f = F.conv3d(f, k.view(1, 1, 1, -1, 1))
    f = F.conv3d(f, k.view(1, 1, 1, 1, -1))
    return alpha * f[:, 0]


def test_elastic_field_statistics_match_a_direct_full_resolution_simard_field():
    shape, alpha, sigma = (24, 24, 24), 200.0, 4.0
    rng = np.random.default_rng(0)
    ours, ref = [], []
    for seed in range(12):
        ours.append(augment._elastic_displacement(shape, alpha, sigma, gen(seed), "cpu").double())
        ref.append(direct_simard(shape, alpha, sigma, rng))
    ours, ref = torch.stack(ours), torch.stack(ref)

    def rms(t):
        return t.pow(2).mean().sqrt().item()

    def grad_rms(t):
        return rms(geometry.spatial_gradient(t)[..., 1:-1, 1:-1, 1:-1])

    theory = alpha * math.sqrt(1 / 3) * (2 * math.sqrt(math.pi) * sigma) ** -1.5
    assert rms(ref) == pytest.approx(theory, rel=0.15)
    assert rms(ours) == pytest.approx(rms(ref), rel=0.15)
    assert grad_rms(ours) == pytest.approx(grad_rms(ref), rel=0.15)
    # components are independent and centred; no attenuation at the faces
    assert abs(ours.mean().item()) < 0.2 * theory
    border = ours[..., :2, :, :].pow(2).mean().sqrt().item()
    assert border > 0.8 * rms(ours)
    # the published ranges give about a voxel: alpha 512, sigma 10 -> 1.39 voxels RMS per component
    big = augment._elastic_displacement((48, 48, 48), 512.0, 10.0, gen(1), "cpu")
    assert 0.7 < rms(big) < 2.5


def test_elastic_only_transform_is_the_elastic_field():
    d = random_spatial_transform(1, SHAPE, gen(5), "cpu", p_affine=0.0, elastic_alpha=(300.0, 300.0),
                                 elastic_sigma=(6.0, 6.0))
    g = gen(5)
    torch.rand(2, generator=g, dtype=torch.float64)  # coin(affine), coin(elastic)
    torch.rand(2, generator=g, dtype=torch.float64)  # alpha, sigma (fixed ranges)
    expected = augment._elastic_displacement(SHAPE, 300.0, 6.0, g, "cpu")
    torch.testing.assert_close(d[0], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# augment_pair
# ---------------------------------------------------------------------------------------
def test_pair_uses_one_displacement_for_all_three_volumes():
    x = smooth_volume(batch=2)
    before = x.clone()
    a, t, b = augment_pair(x, x.clone(), gen(2))
    assert torch.equal(a, b)  # the same warp on x_a and x_b
    assert not torch.equal(a, x) and not torch.equal(a[0], a[1])
    assert torch.equal(x, before)
    # replay: T first, then one spatial draw per item, applied to t(x_a) as well
    g = gen(2)
    t_ref = appearance_transform(x, g)
    d = random_spatial_transform(2, SHAPE, g, "cpu")
    torch.testing.assert_close(t, geometry.warp(t_ref, d))
    torch.testing.assert_close(a, geometry.warp(x, d))
    for out in (a, t, b):
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
        assert out.min() >= 0 and out.max() <= 1


def test_pair_is_deterministic_per_generator_state():
    x_a, x_b = smooth_volume(batch=2), smooth_volume(batch=2, seed=4)
    r1 = augment_pair(x_a, x_b, gen(8))
    r2 = augment_pair(x_a, x_b, gen(8))
    r3 = augment_pair(x_a, x_b, gen(9))
    for u, v in zip(r1, r2):
        assert torch.equal(u, v)
    assert not torch.equal(r1[0], r3[0])


def test_bad_inputs_raise_clear_errors():
    x = torch.rand(1, 1, *SHAPE)
    with pytest.raises(AugmentError, match=r"\(B, 1, D, H, W\)"):
        appearance_transform(x[0], gen())
    with pytest.raises(AugmentError, match="floating-point"):
        appearance_transform((x * 100).long(), gen())
    with pytest.raises(AugmentError, match="torch.Generator"):
        appearance_transform(x, 0)
    with pytest.raises(AugmentError, match="p_shuffle"):
        appearance_transform(x, gen(), p_shuffle=1.5)
    with pytest.raises(AugmentError, match="same shape"):
        augment_pair(x, torch.rand(1, 1, 8, 8, 8), gen())
    with pytest.raises(AugmentError, match="scale"):
        random_spatial_transform(1, SHAPE, gen(), scale=(-1.0, 1.0))
    with pytest.raises(ValueError, match="elastic"):
        random_spatial_transform(1, SHAPE, gen(), elastic_sigma=(0.0, 1.0))
