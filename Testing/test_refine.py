"""Test-time refinement (gvsl.refine) and its wiring into gvsl.register.

The "network" is a stand-in with a known prediction (identity, or a chosen affine), so the
refinement alone is measured; the pair has a KNOWN smooth transform (gvsl.known_pairs), so
TRE is measured against the truth, Dice against labels warped by the truth.
"""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl import known_pairs, phantoms, refine as RF
from gvsl import registration as R
from gvsl.losses import NCCLoss
from gvsl.network_only import refine_steps
from gvsl.progress import CancelToken, Cancelled, Progress


class Fixed(torch.nn.Module):
    """register(a, b) -> a chosen voxel affine and a zero flow (what the network 'predicted')."""

    def __init__(self, mat=None):
        super().__init__()
        self.mat = torch.eye(4) if mat is None else torch.as_tensor(mat, dtype=torch.float32)

    def register(self, a, b):
        return self.mat[None], torch.zeros((1, 3) + tuple(a.shape[2:])), None


@pytest.fixture(scope="module")
def pair():
    img, lab = phantoms.make_brain_phantom(40, seed=3)
    return known_pairs.make_known_pair(img, lab, seed=1, std_mm=2.0, rotation_deg=2.0, translation_mm=1.5)


@pytest.fixture(scope="module")
def refined(pair):
    records = []
    res = R.register(pair.fixed, pair.moving, Fixed(), "cpu", fixed_labels=pair.fixed_labels,
                     moving_labels=pair.moving_labels, refine=60, preset="mr",
                     progress=Progress(4, mode="none", callback=records.append, task="register"))
    return res, records


def test_local_ncc_equals_the_training_loss():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 14, 12, 10, generator=g)
    b = 0.5 * a + 0.5 * torch.rand(1, 1, 14, 12, 10, generator=g)
    for window in (3, 9):
        ours = RF.local_ncc_map(a, b, window).mean()
        assert abs(float(1.0 - ours) - float(NCCLoss(window)(a, b))) < 1e-5


def test_refinement_beats_the_network_on_a_known_deformation(pair, refined):
    res, _ = refined
    m = res.metrics
    mask = sitk.GetArrayViewFromImage(pair.fixed_labels) > 0
    tre_net = known_pairs.tre_mm(res.network.composite, pair.truth, pair.fixed, mask)["mean"]
    tre_ref = known_pairs.tre_mm(res.composite, pair.truth, pair.fixed, mask)["mean"]
    # measured (40^3 brain phantom, 60 steps): Dice 0.59 -> 0.94, TRE 1.40 -> 0.13 mm, NCC 0.886 -> 0.998
    assert m["dice_after"]["mean"] > m["dice_network"]["mean"] + 0.15
    assert tre_ref < 0.5 * tre_net
    assert m["ncc_after"] > m["ncc_network"]
    assert m["folding_percent"] < 0.1 and m["folding_percent_network"] == 0.0
    assert m["refine"]["steps"] == 60 and 0 < m["refine"]["local_ncc_last"] <= 1
    # the network's own result is unchanged by refinement (identity here)
    assert np.abs(res.network.flow_zyx).max() == 0.0 and np.abs(res.flow_zyx).max() > 0.1


def test_refined_exports_are_exact(pair, refined, tmp_path):
    """composite.h5 reproduces warped.nii.gz (and the network-only files theirs), and the
    composite equals A(p + u'(p)) with the refined flow, in physical space."""
    res, _ = refined
    files = R.write_outputs(res, tmp_path, overview=False)
    moving = sitk.Cast(pair.moving, sitk.sitkFloat32)
    for warped, composite in (("warped", "composite"), ("warped_network", "composite_network")):
        tx = sitk.ReadTransform(str(files[composite]))
        again = sitk.Resample(moving, pair.fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        written = sitk.ReadImage(str(files[warped]))
        assert np.abs(sitk.GetArrayFromImage(again) - sitk.GetArrayFromImage(written)).max() < 1e-2  # values ~0..900
    affine = sitk.ReadTransform(str(files["affine"]))
    deform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(files["deformable"])),
                                                       sitk.sitkVectorFloat64))
    rebuilt = sitk.Resample(moving, pair.fixed, sitk.CompositeTransform([affine, deform]), sitk.sitkLinear, 0.0,
                            sitk.sitkFloat32)
    assert np.abs(sitk.GetArrayFromImage(rebuilt) - sitk.GetArrayFromImage(res.warped)).max() < 1e-2
    # physical composite == voxel map with the refined flow (at network-grid voxels: no interpolation)
    grid = res.grid
    rng = np.random.default_rng(0)
    p = np.stack([rng.integers(1, n - 1, 200) for n in grid.size], 1).astype(float)  # (x, y, z)
    u_xyz = res.flow_zyx[:, p[:, 2].astype(int), p[:, 1].astype(int), p[:, 0].astype(int)].T[:, ::-1]
    lin, t = res.mat[:3, :3], res.mat[:3, 3]
    c = (np.array(grid.size) - 1) / 2
    expected = grid.voxel_to_lps((p + u_xyz - c) @ lin.T + c + t)
    got = np.array([res.composite.TransformPoint(tuple(q)) for q in grid.voxel_to_lps(p)])
    assert np.abs(got - expected).max() < 1e-3


def test_refinement_progress_stages_and_cancel(pair, refined, tmp_path):
    _, records = refined
    assert [r["stage"] for r in records if r["event"] == "stage"] == ["resample", "network", "refine", "export",
                                                                       "metrics"]
    steps = [r for r in records if r["event"] == "step" and r.get("stage") == "refine"]
    assert [r["step"] for r in steps] == list(range(1, 61)) and steps[-1]["total"] == 60
    assert {"loss", "ncc", "level"} <= set(steps[0])
    # cancel at the 3rd refinement step: Cancelled, no 4th step, nothing written
    token, seen = CancelToken(), []

    def on_record(rec):
        if rec["event"] == "step" and rec.get("stage") == "refine":
            seen.append(rec["step"])
            if rec["step"] == 3:
                token.cancel("test")

    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        res = R.register(pair.fixed, pair.moving, Fixed(), "cpu", refine=40, preset="mr", cancel=token,
                         progress=Progress(4, mode="none", callback=on_record))
        R.write_outputs(res, out)
    assert seen == [1, 2, 3] and not out.exists()


def test_refine_arguments():
    with pytest.raises(R.RegistrationError, match="steps or 'auto'"):
        refine_steps("many", "cpu")
    with pytest.raises(R.RegistrationError, match=">= 0"):
        refine_steps(-1, "cpu")
    assert refine_steps("auto", "cpu") == RF.DEFAULT_STEPS_CPU and refine_steps(0, "cpu") == 0
    out = RF.refine(np.zeros((6, 6, 6)), np.zeros((6, 6, 6)), np.eye(4), np.ones((3, 6, 6, 6)), 0)
    assert np.array_equal(out.flow, np.ones((3, 6, 6, 6)))
    assert RF.RefineSettings().split(151) == [68, 68, 15] and sum(RF.RefineSettings().split(7)) == 7


def test_mask_restricts_the_similarity(pair):
    """Voxels outside the mask do not drive the correction: the images differ (a 2-voxel shift
    along x) only where the mask is not, so only the unmasked refinement recovers the shift."""
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(20, 20, 20, generator=g)
    moving = fixed.clone()
    moving[12:] = torch.roll(fixed, 2, dims=2)[12:]  # content moved by +2 voxels along x, for z >= 12 only
    settings = RF.RefineSettings(levels=((2, 0.5), (1, 0.5)), windows=(3, 5))
    free = RF.refine(fixed, moving, np.eye(4), np.zeros((3, 20, 20, 20)), 20, settings=settings)
    assert free.flow[2, 14:18, 5:15, 5:15].mean() > 1.5  # measured 1.98: the 2-voxel shift
    mask = np.zeros((20, 20, 20), bool)
    mask[:4] = True  # far (> the NCC windows) from z >= 12
    masked = RF.refine(fixed, moving, np.eye(4), np.zeros((3, 20, 20, 20)), 20, fixed_mask_zyx=mask,
                       settings=settings)
    # measured 0.02 (not exactly 0: Adam normalises the round-off gradients at the optimum)
    assert abs(masked.flow[2, 14:18, 5:15, 5:15].mean()) < 0.2
    # through gvsl.register: a mask outside the fixed image's field of view is a clear error
    empty = sitk.Image(pair.fixed.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(pair.fixed)
    with pytest.raises(R.RegistrationError, match="fixed mask has no voxel"):
        R.register(pair.fixed, pair.moving, Fixed(), "cpu", refine=2, preset="mr", fixed_mask=empty)


def test_folding_penalty_is_the_jacobian_determinant_of_a_linear_field():
    # u(p) = M p (full-grid voxels, (z, y, x)): forward differences are exact, det(I + M) everywhere
    zyx = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (6, 5, 4)), indexing="ij"))
    for m in (np.array([[-1.5, 0.2, 0.0], [0.1, 0.0, 0.3], [0.0, 0.0, 0.0]]), np.diag([0.5, 0.2, 0.0]),
              np.array([[0.0, 0.0, 0.0], [0.0, -0.97, 0.0], [0.0, 0.0, 0.0]])):
        u = torch.einsum("ij,jzyx->izyx", torch.from_numpy(m), zyx)[None]
        det = float(np.linalg.det(np.eye(3) + m))
        expected = max(0.0, 0.05 - det)
        assert abs(float(RF._folding(u, [1.0, 1.0, 1.0])) - expected) < 1e-9
        # on a level grid twice as coarse the same physical field has the same determinant
        assert abs(float(RF._folding(u * 2.0, [2.0, 2.0, 2.0])) - expected) < 1e-9


def test_folding_penalty_removes_folds_without_losing_overlap():
    # two different heart phantoms (inter-subject, as in the demo): refinement without the penalty
    # folds a little; with the default penalty it must not fold more and keep the Dice
    a, la, _ = phantoms.make_heart_phantom(40, seed=1)
    b, lb, _ = phantoms.make_heart_phantom(40, seed=4)
    runs = {}
    for weight in (0.0, RF.RefineSettings().fold_weight):
        res = R.register(a, b, Fixed(), "cpu", fixed_labels=la, moving_labels=lb, refine=60, preset="ct",
                         refine_settings=RF.RefineSettings(fold_weight=weight))
        runs[weight] = res.metrics
    free, default = runs[0.0], runs[RF.RefineSettings().fold_weight]
    # measured: folding 0.0078 % -> 0 %, Dice 0.695 -> 0.695 (64^3 demo pair, 150 steps: 2.3 % -> 0.03 %, 0.785 -> 0.788)
    assert default["folding_percent"] <= free["folding_percent"]
    assert default["dice_after"]["mean"] > free["dice_after"]["mean"] - 0.02
    assert default["dice_after"]["mean"] > default["dice_network"]["mean"] + 0.3
