"""gvsl.register: exact physical export of the network's transforms, checked against SimpleITK.

The network's outputs are replaced by a known affine matrix and a known smooth flow (a wrapper
with the GVSL ``register(a, b)`` interface), so every expected value is computed independently.
Images are oblique (direction rotated ~20 deg about a tilted axis), anisotropic, with non-zero
origins; fixed and moving have different sizes, spacings and directions.
"""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl import geometry
from gvsl import registration as R
from gvsl.checkpoint import CheckpointError, save_checkpoint
from gvsl.network import GVSL, ModelConfig
from gvsl.progress import CancelToken, Cancelled, Progress

FIXED_GEOM = dict(size=(40, 36, 28), spacing=(1.2, 0.9, 1.5), axis=(0.3, 0.2, 1.0), angle=20.0,
                  origin=(-30.0, 12.0, 55.0))
MOVING_GEOM = dict(size=(34, 38, 30), spacing=(1.4, 1.1, 1.3), axis=(1.0, -0.4, 0.5), angle=-12.0,
                   origin=(-29.0, 10.0, 52.0))


def rotation(axis, angle_deg):
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * kx @ kx


def physical_points(size, spacing, direction, origin):
    """(z, y, x, 3) LPS positions of every voxel centre."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size[::-1]], indexing="ij"), -1)[..., ::-1]
    return idx @ (direction @ np.diag(spacing)).T + np.asarray(origin)


def centre_of(g):
    d = rotation(g["axis"], g["angle"])
    return np.asarray(g["origin"]) + d @ (np.asarray(g["spacing"]) * (np.asarray(g["size"]) - 1) / 2)


CENTRE = centre_of(FIXED_GEOM)


def intensity(p):
    """A smooth phantom (LPS mm -> value): two blobs and a gentle gradient."""
    q = p - CENTRE
    v = 100 * np.exp(-(((q - [4, -2, 3]) / [9, 7, 8]) ** 2).sum(-1))
    v += 60 * np.exp(-(((q - [-8, 5, -4]) / [5, 6, 5]) ** 2).sum(-1))
    return v + 0.8 * q[..., 0] + 0.4 * q[..., 2] + 40


def labels(p):
    q = p - CENTRE
    out = np.zeros(p.shape[:-1], np.uint8)
    out[(((q - [4, -2, 3]) / [10, 8, 9]) ** 2).sum(-1) < 1] = 1
    out[(((q - [-8, 5, -4]) / [6, 6, 6]) ** 2).sum(-1) < 1] = 2
    return out


def make_image(g, fn=intensity, shift_mm=(0.0, 0.0, 0.0), pixel=np.float32):
    """Image with geometry ``g`` whose content is ``fn(P - shift)`` (content moved by +shift)."""
    d = rotation(g["axis"], g["angle"])
    pts = physical_points(g["size"], g["spacing"], d, g["origin"]) - np.asarray(shift_mm)
    img = sitk.GetImageFromArray(fn(pts).astype(pixel))
    img.SetSpacing(g["spacing"])
    img.SetDirection(d.ravel().tolist())
    img.SetOrigin(g["origin"])
    return img


class KnownTransform(torch.nn.Module):
    """Stands in for GVSL: ``register(a, b)`` returns a chosen voxel matrix and smooth flow."""

    def __init__(self, mat=None, flow_amplitude=0.0):
        super().__init__()
        self.mat = torch.eye(4) if mat is None else torch.as_tensor(mat, dtype=torch.float32)
        self.flow_amplitude = flow_amplitude
        self.calls = 0

    def flow(self, shape):
        """(1, 3, z, y, x) voxels, channels (z, y, x): smooth sinusoids of the voxel position."""
        z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
        nz, ny, nx = shape
        f = np.stack([np.sin(2 * np.pi * x / nx + 0.3) * np.cos(np.pi * y / ny),
                      np.cos(2 * np.pi * z / nz) * np.sin(np.pi * x / nx + 0.2),
                      np.sin(2 * np.pi * y / ny + 0.5) * np.cos(np.pi * z / nz)])
        return torch.from_numpy(self.flow_amplitude * f)[None].float()

    def register(self, a, b):
        self.calls += 1
        return self.mat[None].to(a.device), self.flow(a.shape[2:]).to(a.device), None


def voxel_affine(rot=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0), trans=(0.0, 0.0, 0.0), shear=(0.0,) * 6):
    return geometry.affine_matrix(torch.tensor([rot]), torch.tensor([scale]), torch.tensor([trans]),
                                  torch.tensor([shear]))[0].double().numpy()


AFFINE = voxel_affine(rot=(0.06, -0.04, 0.08), scale=(1.05, 0.95, 1.02), trans=(1.5, -2.0, 0.7),
                      shear=(0.02, -0.01, 0.015, 0.0, 0.01, -0.02))
CASES = {"affine": (AFFINE, 0.0), "deformable": (None, 1.5), "both": (AFFINE, 1.5)}


@pytest.fixture(scope="module")
def pair():
    return make_image(FIXED_GEOM), make_image(MOVING_GEOM, shift_mm=(2.0, -1.0, 1.5))


@pytest.fixture(scope="module")
def results(pair):
    fixed, moving = pair
    out = {}
    for name, (mat, amp) in CASES.items():
        model = KnownTransform(mat, amp)
        out[name] = (model, R.register(fixed, moving, model, "cpu"))
    return out


def trilinear(field_czyx, p_xyz):
    """Independent trilinear interpolation of (C, z, y, x) at continuous (x, y, z) points (N, 3)."""
    out = np.zeros((p_xyz.shape[0], field_czyx.shape[0]))
    base = np.floor(p_xyz).astype(int)
    frac = p_xyz - base
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = ((frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
                     * (frac[:, 2] if dz else 1 - frac[:, 2]))
                i = np.minimum(base + [dx, dy, dz], np.array(field_czyx.shape[:0:-1]) - 1)
                out += w[:, None] * field_czyx[:, i[:, 2], i[:, 1], i[:, 0]].T
    return out


# ---------------------------------------------------------------------------------------------
def test_network_grid_geometry(pair):
    fixed, _ = pair
    grid, warnings = R.network_grid(fixed)
    assert warnings == [] and grid.spacing_mm == 1.0
    np.testing.assert_allclose(grid.direction, fixed.GetDirection())
    ref = grid.reference()
    centre = ref.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in grid.size])
    np.testing.assert_allclose(centre, CENTRE, atol=1e-9)
    # every fixed voxel centre lies inside the network grid
    corners = [fixed.TransformIndexToPhysicalPoint([int(c * (s - 1)) for c, s in zip(cs, fixed.GetSize())])
               for cs in np.ndindex(2, 2, 2)]
    idx = np.array([ref.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    assert idx.min() >= -1e-9 and (idx <= np.array(grid.size) - 1 + 1e-9).all()
    assert (np.array(grid.size) - 1 < idx.max(0) + 1).all()  # and not larger than needed
    # coarsening keeps the grid under the voxel budget and says so
    coarse, warnings = R.network_grid(fixed, max_voxels=20000)
    assert coarse.num_voxels <= 20000 and coarse.spacing_mm > 1.0 and "coarser" in warnings[0]


@pytest.mark.parametrize("case", list(CASES))
def test_written_composite_reproduces_warped(pair, results, tmp_path, case):
    fixed, moving = pair
    _, res = results[case]
    files = R.write_outputs(res, tmp_path, overview=False)
    warped_file = sitk.GetArrayFromImage(sitk.ReadImage(str(files["warped"])))
    composite = sitk.ReadTransform(str(files["composite"]))
    resampled = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, composite,
                                                     sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    assert np.abs(resampled - warped_file).max() < 1e-3  # intensities ~40..200
    # the separate files (affine.tfm + deformable.nii.gz) compose to the same transform
    affine = sitk.ReadTransform(str(files["affine"]))
    deform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(files["deformable"])),
                                                       sitk.sitkVectorFloat64))
    rebuilt = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, sitk.CompositeTransform([affine, deform]),
                            sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    assert np.abs(sitk.GetArrayFromImage(rebuilt) - warped_file).max() < 1e-3
    # the total displacement file is composite(p) - p (on its own grid: the network grid by default)
    disp = sitk.ReadImage(str(files["displacement"]))
    assert disp.GetSize() == tuple(res.grid.size)
    last = [n - 1 for n in disp.GetSize()]
    for index in [(0, 0, 0), tuple(n // 2 for n in last), tuple(last), (5, last[1] - 3, last[2] // 3)]:
        p = disp.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(np.array(disp[index]), np.subtract(composite.TransformPoint(p), p), atol=1e-5)
    if case == "affine":
        assert np.abs(sitk.GetArrayFromImage(res.warped_affine) - warped_file).max() < 1e-4


@pytest.mark.parametrize("max_voxels", [R.DEFAULT_MAX_NETWORK_VOXELS, 20000])
def test_physical_conversion_is_exact(pair, max_voxels):
    """composite(P) == the network-grid voxel map phi(p) = A(p + u(p)) in physical space."""
    fixed, moving = pair
    model = KnownTransform(AFFINE, 1.5)
    res = R.register(fixed, moving, model, "cpu", max_network_voxels=max_voxels)
    grid, _ = R.network_grid(fixed, max_voxels=max_voxels)
    assert res.metrics["network_spacing_mm"] == grid.spacing_mm
    s, d, o = grid.spacing_mm, np.array(grid.direction).reshape(3, 3), np.array(grid.origin_lps)
    flow = model.flow(grid.shape_zyx)[0].double().numpy()
    lin, t = AFFINE[:3, :3], AFFINE[:3, 3]
    c = (np.array(grid.size) - 1) / 2
    rng = np.random.default_rng(1)
    index = np.stack([rng.integers(1, n - 1, 300) for n in fixed.GetSize()], 1)
    pts = np.array([fixed.TransformIndexToPhysicalPoint(tuple(int(v) for v in i)) for i in index])
    p = np.linalg.solve(s * d, (pts - o).T).T  # network voxel (x, y, z)
    u_xyz = trilinear(flow, p)[:, ::-1]
    q = (p + u_xyz - c) @ lin.T + c + t
    expected = q @ (s * d).T + o
    got = np.array([res.composite.TransformPoint(tuple(pt)) for pt in pts])
    assert np.abs(got - expected).max() < 1e-3
    # the affine alone is exact everywhere, even far outside the images
    far = pts * 3.0
    pa = np.linalg.solve(s * d, (far - o).T).T
    expected_a = ((pa - c) @ lin.T + c + t) @ (s * d).T + o
    got_a = np.array([res.affine.TransformPoint(tuple(pt)) for pt in far])
    assert np.abs(got_a - expected_a).max() < 1e-6


def test_export_equals_what_the_network_saw(pair, results):
    """gvsl.geometry.warp of the network-grid moving image, resampled to the fixed grid, equals
    the exported warped image (two interpolations vs one: a small tolerance)."""
    fixed, moving = pair
    model, res = results["both"]
    grid, _ = R.network_grid(fixed)
    ref = grid.reference()
    moving_net = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), ref,
                                                      sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0))
    fused = geometry.fuse(torch.from_numpy(AFFINE).float()[None], model.flow(grid.shape_zyx))
    warped_net = geometry.warp(torch.from_numpy(moving_net)[None, None], fused)[0, 0].numpy()
    img = sitk.GetImageFromArray(warped_net)
    img.CopyInformation(ref)
    back = sitk.GetArrayFromImage(sitk.Resample(img, fixed, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear))
    # compare where the composite samples well inside both the moving image and the network grid
    # (the network only sees the moving image within the fixed field of view; zero padding outside)
    mask = np.ones(fixed.GetSize()[::-1], bool)
    for image in (moving, ref):
        inner_arr = np.zeros(image.GetSize()[::-1], np.uint8)
        inner_arr[3:-3, 3:-3, 3:-3] = 1
        inner = sitk.GetImageFromArray(inner_arr)
        inner.CopyInformation(image)
        mask &= sitk.GetArrayFromImage(sitk.Resample(inner, fixed, res.composite, sitk.sitkNearestNeighbor)) > 0
    warped = sitk.GetArrayFromImage(res.warped)
    assert mask.mean() > 0.3
    err = np.abs(back - warped)[mask]
    assert err.mean() < 0.3 and err.max() < 5.0  # intensities span ~40..200; measured 0.12 and 3.2
    assert np.corrcoef(back[mask], warped[mask])[0, 1] > 0.999


def test_jacobian_known_scaling_and_sitk_cross_check(pair):
    fixed, moving = pair
    scales = (1.1, 0.9, 1.2)
    res = R.register(fixed, moving, KnownTransform(voxel_affine(scale=scales)), "cpu")
    jac = sitk.GetArrayFromImage(res.jacobian)
    np.testing.assert_allclose(jac, np.prod(scales), atol=1e-4)  # everywhere, borders included
    assert res.metrics["folding_percent"] == 0.0
    # non-linear case: ours == sitk on the image-axis field, in the interior
    res = R.register(fixed, moving, KnownTransform(AFFINE, 1.5), "cpu")
    # (sitk's filter ignores the direction: on the LPS field of this oblique image it is wrong)
    field = sitk.Cast(res.displacement, sitk.sitkVectorFloat64)
    naive = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    assert np.abs(naive - sitk.GetArrayFromImage(res.jacobian))[1:-1, 1:-1, 1:-1].max() > 0.05  # measured 0.18
    d = np.array(field.GetDirection()).reshape(3, 3)
    v = sitk.GetArrayFromImage(field) @ np.linalg.inv(d).T
    vimg = sitk.GetImageFromArray(v, isVector=True)
    vimg.SetSpacing(field.GetSpacing())
    ref = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(vimg))
    ours = sitk.GetArrayFromImage(res.jacobian)
    np.testing.assert_allclose(ours[1:-1, 1:-1, 1:-1], ref[1:-1, 1:-1, 1:-1], atol=1e-4)
    assert ours.max() - ours.min() > 0.03  # the flow does vary the determinant
    # also equals gvsl.geometry on the whole field at once (slabs are seamless)
    vt = torch.from_numpy(np.ascontiguousarray(v.transpose(3, 0, 1, 2)[::-1]))[None]
    sx, sy, sz = field.GetSpacing()
    whole = geometry.jacobian_determinant(vt.double(), (sz, sy, sx))[0, 0].numpy()
    slabbed = sitk.GetArrayFromImage(R.jacobian_determinant_lps(field, slab=5))
    np.testing.assert_allclose(slabbed, whole, atol=1e-5)


def test_known_translation_improves_dice_and_ncc():
    shift = np.array([6.0, -4.0, 3.0])  # mm, LPS: moving content = fixed content moved by +shift
    fixed = make_image(FIXED_GEOM)
    moving = make_image(MOVING_GEOM, shift_mm=shift)
    fixed_labels = make_image(FIXED_GEOM, labels, pixel=np.uint8)
    moving_labels = make_image(MOVING_GEOM, labels, shift_mm=shift, pixel=np.uint8)
    d = np.array(fixed.GetDirection()).reshape(3, 3)
    mat = np.eye(4)
    mat[:3, 3] = np.linalg.solve(d, shift)  # network voxels are 1 mm along the fixed axes
    res = R.register(fixed, moving, KnownTransform(mat), "cpu", fixed_labels=fixed_labels,
                     moving_labels=moving_labels)
    m = res.metrics
    np.testing.assert_allclose(res.composite.TransformPoint((1.0, 2.0, 3.0)), np.add((1.0, 2.0, 3.0), shift),
                               atol=1e-6)
    # measured: Dice mean 0.29 -> 0.90 (label 2: 0.15 -> 0.93; label 1 is partly cut by the fields of view)
    assert m["dice_after"]["2"] > 0.9 and m["dice_after"]["mean"] > 0.85 and m["dice_after"]["mean"] > m["dice_before"]["mean"] + 0.2
    assert set(m["dice_after"]) == {"1", "2", "mean"}
    assert m["ncc_after"] > 0.995 and m["ncc_after"] > m["ncc_before"] + 0.1
    assert res.warped_labels.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(res.warped_labels.GetOrigin(), fixed.GetOrigin())


def test_progress_stages_and_cancel(pair):
    fixed, moving = pair
    records = []
    progress = Progress(4, mode="none", callback=records.append, task="register")
    R.register(fixed, moving, KnownTransform(), "cpu", progress=progress)
    assert [r["stage"] for r in records if r["event"] == "stage"] == ["resample", "network", "export", "metrics"]
    token = CancelToken()
    token.cancel("user")
    model = KnownTransform()
    with pytest.raises(Cancelled):
        R.register(fixed, moving, model, "cpu", cancel=token)
    assert model.calls == 0


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["fixed", "moving"])
@pytest.mark.parametrize("bad, words", [
    (sitk.Image([32, 32], sitk.sitkFloat32), "2D"),
    (sitk.Image([16, 16, 16], sitk.sitkVectorFloat32, 3), "components"),
    (sitk.Image([16, 16, 16], sitk.sitkVectorUInt8, 3), "RGB"),
    (sitk.Image([16, 16, 16, 3], sitk.sitkFloat32), "4D"),
    (np.zeros((16, 16, 16), np.float32), "SimpleITK.Image"),
])
def test_bad_inputs_are_named(pair, which, bad, words):
    fixed, moving = pair
    args = (bad, moving) if which == "fixed" else (fixed, bad)
    model = KnownTransform()
    with pytest.raises(R.RegistrationError, match=words) as info:
        R.register(*args, model, "cpu")
    assert f"the {which} image" in str(info.value)
    assert model.calls == 0


def test_no_overlap_warns_but_registers(pair):
    fixed, moving = pair
    far = sitk.Image(moving)
    far.SetOrigin(np.add(moving.GetOrigin(), (500.0, 0.0, 0.0)).tolist())
    res = R.register(fixed, far, KnownTransform(), "cpu")
    assert any("do not overlap" in w and "initial transform" in w for w in res.metrics["warnings"])
    assert res.metrics["ncc_before"] is None
    assert moving.GetOrigin() != far.GetOrigin()  # the caller's image was not touched


def test_wrong_kind_checkpoint(pair, tmp_path):
    fixed, moving = pair
    path = save_checkpoint(tmp_path / "seg.pt", GVSL(), kind="segmentation")
    with pytest.raises(CheckpointError, match="'segmentation' checkpoint"):
        R.register(fixed, moving, str(path), "cpu")
    with pytest.raises(R.RegistrationError, match="model must be"):
        R.register(fixed, moving, 42, "cpu")


# ---------------------------------------------------------------------------------------------
# The command, end to end, with a random-weight GVSL checkpoint
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_end_to_end(tmp_path, capsys):
    from gvsl.cli import main
    fixed = make_image(FIXED_GEOM)
    moving = make_image(MOVING_GEOM, shift_mm=(3.0, -2.0, 1.0))
    paths = {}
    for name, img in [("fixed", fixed), ("moving", moving),
                      ("fixed_labels", make_image(FIXED_GEOM, labels, pixel=np.uint8)),
                      ("moving_labels", make_image(MOVING_GEOM, labels, shift_mm=(3.0, -2.0, 1.0), pixel=np.uint8))]:
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(paths[name]))
    model = save_checkpoint(tmp_path / "model.pt", GVSL())
    out = tmp_path / "out"
    rc = main(["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--model", str(model),
               "--out", str(out), "--fixed-labels", str(paths["fixed_labels"]),
               "--moving-labels", str(paths["moving_labels"]), "--device", "cpu", "--progress", "json",
               "--refine", "0"])  # network only (refinement: test_cli_refined)
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["stage"] for r in lines if r["event"] == "stage"] == list(R.STAGES)
    assert lines[-1]["event"] == "done"
    names = ["warped.nii.gz", "warped_affine.nii.gz", "affine.tfm", "deformable.nii.gz", "displacement.nii.gz",
             "composite.h5", "jacobian.nii.gz", "warped_labels.nii.gz", "metrics.json", "overview.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temp files left
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ["ncc_before", "ncc_affine", "ncc_after", "folding_percent", "jacobian_min", "jacobian_max",
                "dice_before", "dice_after", "timings_s", "device", "precision", "network_grid_size",
                "network_spacing_mm", "warnings", "preset"]:
        assert key in metrics, key
    assert metrics["network_grid_size"] == list(R.network_grid(fixed)[0].size)
    assert metrics["preset"]["source"] == "guessed"
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    png = imread(str(out / "overview.png"))
    assert png.shape[0] > 400 and png.shape[1] > 1000 and png[..., :3].std() > 0.05
    # the files agree with each other: composite.h5 reproduces warped.nii.gz
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    again = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, sitk.ReadTransform(str(out / "composite.h5")),
                          sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    assert np.abs(sitk.GetArrayFromImage(again) - sitk.GetArrayFromImage(warped)).max() < 1e-3
    # a bad input is one clear error line, exit code 2
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image([32, 32], sitk.sitkFloat32), str(flat))
    rc = main(["register", "--fixed", str(flat), "--moving", str(paths["moving"]), "--model", str(model),
               "--out", str(tmp_path / "out2"), "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "2D" in err and "Traceback" not in err


def test_cli_refined(tmp_path, capsys):
    """`gvsl register --refine N`: refinement steps stream as JSON, the network-only files sit beside
    the refined ones, metrics carry both; a bad --refine is one clear error line."""
    from gvsl.cli import main
    paths = {}
    for name, img in [("fixed", make_image(FIXED_GEOM)), ("moving", make_image(MOVING_GEOM, shift_mm=(3.0, -2.0, 1.0)))]:
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(paths[name]))
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "model.pt", GVSL(ModelConfig(channels=(8, 16, 32, 64, 128, 64, 32, 16, 8))))
    out = tmp_path / "out"
    rc = main(["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--model", str(model),
               "--out", str(out), "--device", "cpu", "--progress", "json", "--refine", "6", "--no-overview"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["stage"] for r in lines if r["event"] == "stage"] == ["resample", "network", "refine", "export", "metrics"]
    assert [r["step"] for r in lines if r["event"] == "step" and r.get("stage") == "refine"] == list(range(1, 7))
    for name in ("warped_network.nii.gz", "deformable_network.nii.gz", "composite_network.h5", "composite.h5"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["refine"]["steps"] == 6 and metrics["ncc_network"] is not None and metrics["ncc_after"] is not None
    rc = main(["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--model", str(model),
               "--out", str(tmp_path / "out2"), "--refine", "lots", "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "--refine" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------
def _png_pixels(path):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(str(path))


def test_picture_orientation_is_radiological():
    """Whatever the image's index order: axial/coronal show the patient's left on the picture's
    right; anterior is up (axial) / left (sagittal); superior is up (coronal, sagittal)."""
    from gvsl.pictures import _Volume
    size, spacing = (28, 24, 20), (0.8, 1.0, 2.0)
    expect = {  # LPS unit vector of the ramp -> view: (axis of the picture where it grows, +1 right/up)
        (1, 0, 0): {"axial": ("col", 1), "coronal": ("col", 1)},    # patient left
        (0, -1, 0): {"axial": ("row", 1), "sagittal": ("col", -1)},  # anterior
        (0, 0, 1): {"coronal": ("row", 1), "sagittal": ("row", 1)},  # superior
    }
    for direction in [np.eye(3), np.diag([-1.0, -1.0, 1.0]), np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1.0]])]:
        pts = physical_points(size, spacing, direction, (0.0, 0.0, 0.0))
        for ramp, views in expect.items():
            img = sitk.GetImageFromArray((pts @ np.array(ramp, float)).astype(np.float32))
            img.SetDirection(direction.ravel().tolist())
            img.SetSpacing(spacing)
            vol = _Volume(img)
            for view, (axis, sign) in views.items():
                sl, extent, _ = vol.view(view)
                grows = np.diff(sl.mean(0)).mean() if axis == "col" else -np.diff(sl.mean(1)).mean()
                assert np.sign(grows) == sign, (direction, ramp, view)
                # axes in mm: extent = (0, width, height, 0)
                assert extent[1] / extent[2] == pytest.approx(
                    {"axial": 28 * 0.8 / 24, "coronal": 28 * 0.8 / 40, "sagittal": 24 / 40}[view]
                    if direction[0, 0] != 0 else
                    {"axial": 24 / (28 * 0.8), "coronal": 24 / 40, "sagittal": 28 * 0.8 / 40}[view])


def test_loss_curve_and_slices_sheet(tmp_path):
    from gvsl.pictures import loss_curve, slices_sheet
    steps = list(range(0, 200, 2))
    history = {"ncc": list(np.exp(-np.arange(100) / 30) + 0.05 * np.random.rand(100)),
               "smooth": list(0.01 + 0.001 * np.random.rand(100)), "signed": list(np.random.randn(100))}
    png = _png_pixels(loss_curve(history, steps, tmp_path / "loss.png", title="pre-training"))
    assert png.shape[1] >= 900 and png[..., :3].std() > 0.05
    fixed = make_image(FIXED_GEOM)
    arrays = {"fixed": fixed, "array": sitk.GetArrayFromImage(fixed), "tensor": torch.rand(1, 1, 16, 20, 24)}
    png = _png_pixels(slices_sheet(arrays, tmp_path / "sheet.png", title="demo"))
    assert png.shape[0] > 600 and png.shape[1] > 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "sheet.png"]
    with pytest.raises(ValueError):
        loss_curve({}, [], tmp_path / "empty.png")


def test_full_resolution_fields_are_on_the_fixed_grid(pair):
    """With full_resolution the total displacement and Jacobian are on the fixed grid, and the
    displacement still equals composite(p) - p there (computed in slabs, float32)."""
    fixed, moving = pair
    res = R.register(fixed, moving, KnownTransform(AFFINE, 1.5), "cpu", full_resolution=True)
    assert res.metrics["displacement_grid"] == "fixed"
    for img in (res.displacement, res.jacobian):
        assert img.GetSize() == fixed.GetSize()
        np.testing.assert_allclose(img.GetDirection(), fixed.GetDirection())
    for index in [(0, 0, 0), (20, 17, 13), (39, 35, 27), (5, 30, 21)]:
        p = fixed.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(np.array(res.displacement[index]), np.subtract(res.composite.TransformPoint(p), p),
                                   atol=1e-4)
    lean = R.register(fixed, moving, KnownTransform(AFFINE, 1.5), "cpu")
    assert lean.metrics["displacement_grid"] == "network" and lean.displacement.GetSize() == tuple(lean.grid.size)
    # the same transform either way; folding/Jacobian ranges agree closely (different sample points)
    assert abs(lean.metrics["jacobian_min"] - res.metrics["jacobian_min"]) < 0.05
    assert np.abs(sitk.GetArrayFromImage(lean.warped) - sitk.GetArrayFromImage(res.warped)).max() == 0.0
