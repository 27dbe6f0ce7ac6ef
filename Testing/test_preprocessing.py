"""gvsl.preprocessing: the one contract shared by pre-training, registration and segmentation."""
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl import io
from gvsl.io import VolumeCache, VolumeError
from gvsl.preprocessing import (MAX_GRID_VOXELS, PreprocessSpec, grid_for, normalize_intensity, preprocess,
                                preprocess_labels, spec_from_checkpoint, with_overrides)


def _rotation_direction(deg):
    a = math.radians(deg)
    return (math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0)


def _ramp_image(size, spacing, origin, direction, fn):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
    pts = np.array(origin) + (np.array(direction).reshape(3, 3) @ (idx * spacing).T).T
    arr = fn(pts).reshape(size).transpose(2, 1, 0).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _ct_blobs(size=(30, 26, 22), spacing=(0.8, 0.9, 1.6), seed=0):
    """A smooth CT-like image (HU), stored LPS (identity direction)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in size[::-1]], indexing="ij")
    arr = np.full(size[::-1], -1000.0, np.float32)
    for _ in range(5):
        c = rng.uniform(0.25, 0.75, 3) * np.array(size[::-1])
        r = rng.uniform(2.5, 6)
        arr += rng.uniform(300, 1500) * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / r ** 2)
    img = sitk.GetImageFromArray(arr + rng.normal(0, 20, arr.shape).astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin((-12.0, 30.0, 7.5))
    return img


def _stored_ras(img):
    """The same volume stored RAS (the first two axes flipped, direction diag(-1, -1, 1))."""
    arr = sitk.GetArrayFromImage(img)[:, ::-1, ::-1]
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    out.SetSpacing(img.GetSpacing())
    out.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    out.SetOrigin(img.TransformIndexToPhysicalPoint([img.GetSize()[0] - 1, img.GetSize()[1] - 1, 0]))
    return out


# ---------------------------------------------------------------------------------------
# intensity presets (moved from test_io with the code)
# ---------------------------------------------------------------------------------------
def test_ct_preset_numbers():
    hu = np.array([-3000, -1024, -24, 0, 1024, 3000], dtype=np.int16)
    out = normalize_intensity(hu, "ct")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 1000 / 2048, 0.5, 1.0, 1.0], atol=1e-7)


def test_mr_preset_robust_minmax_and_constant_image():
    rng = np.random.default_rng(0)
    a = rng.uniform(100, 200, size=(10, 10, 10)).astype(np.float32)
    a[0, 0, 0], a[0, 0, 1] = 1e6, -1e6  # outliers beyond the 0.5/99.5 percentiles
    before = a.copy()
    out = normalize_intensity(a, "mr")
    np.testing.assert_array_equal(a, before)  # input untouched
    lo, hi = np.percentile(a, [0.5, 99.5])
    np.testing.assert_allclose(out[5, 5, 5], (a[5, 5, 5] - lo) / (hi - lo), rtol=1e-5)
    assert out.min() == 0.0 and out.max() == 1.0 and out[0, 0, 0] == 1.0 and out[0, 0, 1] == 0.0
    const = normalize_intensity(np.full((4, 4, 4), 7.0), "mr")
    assert np.all(const == 0) and np.all(np.isfinite(const))
    sparse = np.zeros((10, 10, 10), np.float32)
    sparse[0, 0, :2] = [50, 100]
    np.testing.assert_allclose(normalize_intensity(sparse, "mr")[0, 0, :3], [0.5, 1.0, 0.0])


def test_unknown_preset_lists_choices():
    with pytest.raises(VolumeError, match="choose one of ct, mr"):
        normalize_intensity(np.zeros(3), "pet")
    with pytest.raises(VolumeError, match="choose one of ct, mr"):
        PreprocessSpec(preset="pet")
    with pytest.raises(VolumeError, match="choose one of ct, mr"):
        io.preprocess(_ct_blobs(), "pet")


# ---------------------------------------------------------------------------------------
# the grid and the resampling
# ---------------------------------------------------------------------------------------
def test_grid_is_centred_covers_every_voxel_and_resamples_exactly():
    """Centre anchoring, ceil((n-1) sp / s) + 1 voxels, the canonical direction; linear
    interpolation of a linear ramp is exact (checked against the ramp's formula)."""
    spacing, origin, direction = (0.7, 1.3, 2.5), (5.0, -3.0, 10.0), _rotation_direction(30)
    size = (20, 12, 7)
    img = _ramp_image(size, spacing, origin, direction, lambda p: -1000 + 20 * (p @ [1.0, 2.0, 3.0]))
    prep = preprocess(img, PreprocessSpec("ct", 1.0, antialias=False))
    g = prep.grid
    assert g.spacing_mm == 1.0 and prep.array_zyx.dtype == np.float32
    np.testing.assert_allclose(g.direction, direction, atol=1e-12)  # 30 deg: already closest to LPS
    assert g.size == tuple(math.ceil((n - 1) * s - 1e-6) + 1 for n, s in zip(size, spacing))
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size])
    np.testing.assert_allclose(g.center_lps, centre, atol=1e-9)
    ref = g.reference()
    corners = [img.TransformIndexToPhysicalPoint([c * (n - 1) for c, n in zip(cs, size)]) for cs in np.ndindex(2, 2, 2)]
    idx = np.array([ref.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    assert idx.min() >= -1e-9 and (idx <= np.array(g.size) - 1 + 1e-9).all()
    out = prep.array_zyx
    for i, j, k in [(2, 3, 4), (10, 8, 12), (5, 12, 2)]:
        p = np.array(ref.TransformIndexToPhysicalPoint((i, j, k)))
        expect = np.clip(-1000 + 20 * (p @ [1.0, 2.0, 3.0]) + 1024, 0, 2048) / 2048
        assert abs(out[k, j, i] - expect) < 1e-4
    # outside the image: spec.pad_value (in normalised units)
    from dataclasses import replace
    far = replace(g, origin_lps=tuple(np.add(g.origin_lps, 1000.0)))
    for pad in (0.0, 0.25):
        away = preprocess(img, PreprocessSpec("ct", 1.0, pad_value=pad), grid=far).array_zyx
        assert np.all(away == np.float32(pad))


def test_same_volume_stored_two_ways_gives_identical_arrays(tmp_path):
    """NIfTI stored RAS and the LPS copy (flipped axes, matching direction cosines): identical
    network arrays for both presets, anisotropic spacing (anti-aliasing on), via files."""
    lps = _ct_blobs()
    ras = _stored_ras(lps)
    assert ras.TransformIndexToPhysicalPoint((0, 0, 0)) != lps.TransformIndexToPhysicalPoint((0, 0, 0))
    paths = {}
    for name, img in (("lps", lps), ("ras", ras)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(paths[name]))
    for preset in ("ct", "mr"):
        spec = PreprocessSpec(preset=preset, spacing_mm=1.2)
        a = preprocess(io.read_volume(paths["lps"]), spec)
        b = preprocess(io.read_volume(paths["ras"]), spec)
        assert a.grid.size == b.grid.size
        np.testing.assert_allclose(a.grid.origin_lps, b.grid.origin_lps, atol=1e-6)
        assert np.abs(a.array_zyx - b.array_zyx).max() <= 1e-6
        assert a.array_zyx.std() > 0.05


def test_pretraining_and_registration_see_the_same_array(tmp_path):
    """For CT and MR presets, what pre-training's cache holds before cropping equals what
    registration feeds the network for the same file (a spy model records its inputs)."""
    from gvsl import registration as R
    from gvsl.network import GVSL, ModelConfig

    class Spy(torch.nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.info = {"preprocessing": spec.to_dict()}
            self.seen = []

        def register(self, a, b):
            self.seen.append((a.float().cpu().numpy()[0, 0].copy(), b.float().cpu().numpy()[0, 0].copy()))
            n = a.shape[0]
            return torch.eye(4)[None].repeat(n, 1, 1), torch.zeros((n, 3) + tuple(a.shape[2:])), None

    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(_stored_ras(_ct_blobs(seed=3)), str(path))
    for preset in ("ct", "mr"):
        spec = PreprocessSpec(preset=preset, spacing_mm=1.1)
        cached = VolumeCache(tmp_path / f"cache-{preset}", spec).get(path)
        spy = Spy(spec)
        image = io.read_volume(path)
        R.register(image, image, spy, "cpu", precision="fp32")
        fixed_seen, moving_seen = spy.seen[0]
        np.testing.assert_array_equal(fixed_seen, cached)
        np.testing.assert_array_equal(moving_seen, cached)
    del GVSL, ModelConfig


def test_register_to_own_flipped_copy_is_near_identity():
    """Registering a volume to its RAS-stored copy with an identity network: no displacement,
    NCC after >= NCC before (the network saw the same anatomy in the same order)."""
    from gvsl import registration as R

    class Identity(torch.nn.Module):
        def register(self, a, b):
            return torch.eye(4)[None], torch.zeros((1, 3) + tuple(a.shape[2:])), None

    fixed = _ct_blobs(seed=1)
    moving = _stored_ras(fixed)
    res = R.register(fixed, moving, Identity(), "cpu")
    disp = sitk.GetArrayFromImage(res.displacement)
    assert np.sqrt((disp ** 2).sum(-1)).max() < 0.5
    m = res.metrics
    assert m["ncc_after"] >= m["ncc_before"] - 1e-9 and m["ncc_after"] > 0.999


def test_antialiasing_removes_aliasing_when_downsampling():
    """Every third slice bright at 0.5 mm (a 1.5 mm period) sampled at 2 mm: without smoothing the
    output keeps a large spurious (aliased) contrast, with it the pattern averages out."""
    arr = np.zeros((60, 12, 12), np.float32)
    arr[::3] = 1000.0
    img = sitk.GetImageFromArray(arr - 500.0)
    img.SetSpacing((2.0, 2.0, 0.5))
    inner = (slice(2, -2),) * 3
    sharp = preprocess(img, PreprocessSpec("ct", 2.0, antialias=False)).array_zyx[inner]
    smooth = preprocess(img, PreprocessSpec("ct", 2.0, antialias=True)).array_zyx[inner]
    assert sharp.std() > 0.1  # aliased: every sample hits a bright or a dark slice
    assert smooth.std() < 0.3 * sharp.std()
    assert abs(smooth.mean() - (1000 / 3 - 500 + 1024) / 2048) < 0.02  # the pattern's mean HU


def test_grid_budget_and_coarsening():
    tiny = sitk.Image([6, 6, 6], sitk.sitkInt16)
    tiny.SetSpacing((100.0, 100.0, 100.0))
    with pytest.raises(VolumeError, match=r"501 x 501 x 501 grid .* over the budget .* --spacing"):
        grid_for(tiny, PreprocessSpec())
    assert 501 ** 3 > MAX_GRID_VOXELS
    grid, notes = grid_for(tiny, PreprocessSpec(), max_voxels=20 ** 3)
    assert grid.num_voxels <= 20 ** 3 and grid.spacing_mm > 1.0 and "coarser" in notes[0]
    with pytest.raises(VolumeError, match="--spacing"):
        PreprocessSpec(spacing_mm=float("nan"))
    with pytest.raises(VolumeError, match="--spacing"):
        PreprocessSpec(spacing_mm=-1.0)


def test_labels_nearest_neighbour_on_the_grid():
    img = _ct_blobs()
    lab = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) > -500).astype(np.uint8) * 205)
    lab.CopyInformation(img)
    grid = grid_for(img, PreprocessSpec(spacing_mm=1.0))[0]
    out = preprocess_labels(lab, grid)
    assert out.shape == grid.shape_zyx and out.dtype == np.uint8 and set(np.unique(out)) <= {0, 205}
    flipped = _stored_ras(lab)
    np.testing.assert_array_equal(preprocess_labels(flipped, grid), out)
    bad = sitk.Cast(lab, sitk.sitkFloat32) + 0.5
    with pytest.raises(VolumeError, match="non-integer"):
        preprocess_labels(bad, grid)


# ---------------------------------------------------------------------------------------
# the spec in checkpoints
# ---------------------------------------------------------------------------------------
def test_spec_round_trip_and_checkpoint_sources(tmp_path):
    from gvsl.checkpoint import FORMAT_VERSION, load_checkpoint, load_model, save_checkpoint
    from gvsl.network import GVSL, ModelConfig
    spec = PreprocessSpec(preset="mr", spacing_mm=1.5, orientation="ras")
    assert spec.orientation == "RAS" and PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(VolumeError, match="newer"):
        PreprocessSpec.from_dict(dict(spec.to_dict(), spec_version=99))
    with pytest.raises(VolumeError, match="three letters"):
        PreprocessSpec(orientation="LLS")
    model = GVSL(ModelConfig(channels=(8, 16, 16, 16, 16, 16, 16, 16, 8)))
    path = save_checkpoint(tmp_path / "m.pt", model, preprocessing=spec)
    ckpt = load_checkpoint(path)
    assert FORMAT_VERSION == 2 and ckpt["format_version"] == 2
    assert spec_from_checkpoint(ckpt) == (spec, "checkpoint")
    assert spec_from_checkpoint(load_model(path).info) == (spec, "checkpoint")
    v1 = {"preprocessing": {"preset": "mr", "spacing_mm": 2.0}}
    assert spec_from_checkpoint(v1) == (PreprocessSpec(preset="mr", spacing_mm=2.0), "checkpoint-v1")
    assert spec_from_checkpoint({"preprocessing": {}}) == (PreprocessSpec(), "default")
    same, notes = with_overrides(spec, "checkpoint", preset="mr")
    assert same == spec and notes == []
    other, notes = with_overrides(spec, "checkpoint", preset="ct", spacing_mm=1.0)
    assert other.preset == "ct" and other.spacing_mm == 1.0 and len(notes) == 2 and "--preset ct" in notes[0]


def test_info_prints_the_spec(tmp_path, capsys):
    import json

    from gvsl.checkpoint import save_checkpoint
    from gvsl.cli import main
    from gvsl.network import GVSL, ModelConfig
    spec = PreprocessSpec(preset="mr", spacing_mm=1.25)
    path = save_checkpoint(tmp_path / "m.pt", GVSL(ModelConfig(channels=(8, 16, 16, 16, 16, 16, 16, 16, 8))),
                           preprocessing=spec)
    assert main(["info", "--model", str(path), "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preprocessing"]["spec"] == spec.to_dict() and info["preprocessing"]["source"] == "checkpoint"
    assert "1.25 mm" in info["preprocessing"]["description"]
