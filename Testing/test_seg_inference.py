"""Segmentation inference geometry (exact, bounded memory), .seg.nrrd header, evaluation metrics."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl.checkpoint import save_checkpoint
from gvsl.segeval import evaluate, format_table
from gvsl.phantoms import make_heart_phantom
from gvsl.segdata import SegmentationDataError, resolve_table
from gvsl.seginfer import labels_on_image, probability_image, segment
from gvsl.segmodel import labels_entry, new_model
from gvsl.grid import Grid as NetworkGrid

TINY = (8, 8, 8, 8, 16, 8, 8, 8, 8)


@pytest.fixture(scope="module")
def heart_model(tmp_path_factory):
    torch.manual_seed(3)
    table = resolve_table("heart")
    model = new_model(table, TINY)
    with torch.no_grad():  # a strong, spatially varying head so the argmax is not constant
        model.out_conv.weight.mul_(20)
    path = tmp_path_factory.mktemp("m") / "seg.pt"
    save_checkpoint(path, model, kind="segmentation", labels=labels_entry(table),
                    preprocessing={"preset": "ct", "spacing_mm": 1.0}, train_config={"crop": 32})
    return path


def test_labels_on_image_equals_sitk_resampling_then_argmax():
    rng = np.random.default_rng(0)
    grid = NetworkGrid(size=(11, 9, 7), spacing_mm=1.5, origin_lps=(-7.0, -5.0, -4.0),
                       direction=tuple(np.eye(3).ravel()))
    probs = rng.random((4, 7, 9, 11)).astype(np.float32)
    image = sitk.Image([13, 10, 8], sitk.sitkInt16)
    image.SetSpacing((1.1, 1.2, 1.3))
    image.SetOrigin((-6.0, -4.5, -3.5))
    c, s = np.cos(0.2), np.sin(0.2)
    image.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    values = np.array([0, 3, 10, 300])
    fast = sitk.GetArrayFromImage(labels_on_image(probs, grid, image, values, slab_mb=0.001))
    stack = np.stack([sitk.GetArrayFromImage(probability_image(probs, i, grid, image)) for i in range(4)])
    inside = stack.sum(axis=0) > 0  # sitk gives 0 outside the grid, we clamp to the border
    ref = values[stack.argmax(axis=0)]
    assert inside.mean() > 0.8
    assert (fast[inside] == ref[inside]).mean() > 0.999


def test_segment_keeps_geometry_and_values_and_is_invariant_to_storage_order(heart_model):
    ct, heart, _ = make_heart_phantom(32, 4)
    before = sitk.GetArrayFromImage(ct).copy()
    res = segment(ct, heart_model, "cpu")
    out = res.labels
    assert np.array_equal(sitk.GetArrayFromImage(ct), before)  # input untouched
    assert out.GetSize() == ct.GetSize() and out.GetSpacing() == ct.GetSpacing()
    assert out.GetOrigin() == ct.GetOrigin() and out.GetDirection() == ct.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 205, 420, 500, 550, 600, 820, 850}
    assert len(np.unique(sitk.GetArrayFromImage(out))) >= 3
    assert res.window == (32, 32, 32)
    for order in ("RAS", "SLP", "AIR"):
        rotated = sitk.DICOMOrient(ct, order)  # same physical image, other storage order
        assert rotated.GetDirection() != ct.GetDirection()
        back = sitk.DICOMOrient(segment(rotated, heart_model, "cpu").labels, "LPS")
        assert back.GetSize() == ct.GetSize()
        np.testing.assert_allclose(back.GetOrigin(), ct.GetOrigin(), atol=1e-6)
        agree = (sitk.GetArrayFromImage(back) == sitk.GetArrayFromImage(out)).mean()
        assert agree > 0.999, (order, agree)


def test_segment_bad_inputs(heart_model, tmp_path):
    from gvsl.checkpoint import CheckpointError
    from gvsl.network import GVSL, ModelConfig
    from gvsl.seginfer import SegmentationError
    ct, _, _ = make_heart_phantom(32, 0)
    with pytest.raises(SegmentationError, match="2D image"):
        segment(ct[:, :, 3], heart_model, "cpu")
    with pytest.raises(SegmentationError, match="SimpleITK.Image"):
        segment(np.zeros((4, 4, 4)), heart_model, "cpu")
    save_checkpoint(tmp_path / "pre.pt", GVSL(ModelConfig(channels=TINY)))
    with pytest.raises(CheckpointError, match="segmentation needs a segmentation checkpoint"):
        segment(ct, tmp_path / "pre.pt", "cpu")


def _cube(shape, lo, hi, value):
    a = np.zeros(shape, np.uint16)
    a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return a


def test_evaluate_agrees_with_independent_dice_and_hd95():
    shape = (30, 30, 30)
    truth = _cube(shape, (5, 5, 5), (15, 15, 15), 205) + _cube(shape, (18, 18, 18), (26, 26, 26), 850)
    pred = _cube(shape, (5, 5, 7), (15, 15, 17), 205) + _cube(shape, (20, 20, 20), (24, 24, 24), 850)
    pred[0, 0, 0] = 420  # a false positive of a structure absent from the truth
    t_img, p_img = sitk.GetImageFromArray(truth), sitk.GetImageFromArray(pred)
    for im in (t_img, p_img):
        im.SetSpacing((0.5, 0.5, 0.5))
    res = evaluate(p_img, t_img, "heart")
    for value, name in ((205, "Left ventricle myocardium"), (850, "Pulmonary artery")):
        p, t = pred == value, truth == value
        dice = 2 * (p & t).sum() / (p.sum() + t.sum())
        assert res["structures"][name]["dice"] == pytest.approx(dice, abs=1e-6)
    assert res["structures"]["Left ventricle myocardium"]["hd95_mm"] == pytest.approx(1.0, abs=0.01)  # 2 vox x 0.5
    assert res["structures"]["Left atrium blood cavity"]["dice"] == 0.0
    assert res["structures"]["Right atrium blood cavity"]["dice"] is None
    assert res["mean_dice"] == pytest.approx(np.mean([res["structures"][n]["dice"] for n in
                                                      ("Left ventricle myocardium", "Pulmonary artery")]))
    assert "Pulmonary artery" in format_table(res)
    json.dumps(res)
    wrong = sitk.GetImageFromArray(pred[:, :, :20])
    with pytest.raises(SegmentationDataError, match="has size"):
        evaluate(wrong, t_img, "heart")
    with pytest.raises(SegmentationDataError, match="not in the 'heart' table"):
        shifted = sitk.GetImageFromArray(truth + 1)
        shifted.CopyInformation(t_img)
        evaluate(p_img, shifted, "heart")


def test_seg_nrrd_header_carries_names_colours_terminology(tmp_path):
    from gvsl.segnrrd import write_seg_nrrd
    table = resolve_table("heart")
    _, heart, _ = make_heart_phantom(32, 0)
    path = write_seg_nrrd(heart, table, tmp_path / "h.seg.nrrd")
    back = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(heart))
    assert back.GetMetaData("Segment0_Name") == "Left ventricle myocardium"
    assert back.GetMetaData("Segment6_LabelValue") == "850"
    assert "SCT^81040000^Pulmonary artery" in back.GetMetaData("Segment6_Tags")


def test_hd95_matches_brute_force_monai_definition():
    from gvsl.segeval import hd95_mm
    rng = np.random.default_rng(1)
    a = np.zeros((14, 15, 16), bool)
    b = np.zeros_like(a)
    a[3:10, 2:9, 4:12] = True
    b[4:12, 3:12, 2:9] = True
    b[rng.random(b.shape) > 0.97] = True
    spacing = (1.3, 0.7, 0.9)

    def surface(m):
        pad = np.pad(m, 1)
        core = pad[1:-1, 1:-1, 1:-1].copy()
        for ax in range(3):
            for sh in (-1, 1):
                core &= np.roll(pad, sh, axis=ax)[1:-1, 1:-1, 1:-1]
        return m & ~core

    def directed(x, y):
        px = np.argwhere(surface(x)) * spacing
        py = np.argwhere(surface(y)) * spacing
        d = np.sqrt(((px[:, None, :] - py[None, :, :]) ** 2).sum(-1)).min(axis=1)
        return np.percentile(d, 95)

    assert hd95_mm(a, b, spacing) == pytest.approx(max(directed(a, b), directed(b, a)), abs=1e-4)


def test_cli_segment_and_evaluate(heart_model, tmp_path, capsys):
    from gvsl.cli import main
    ct, heart, _ = make_heart_phantom(32, 2)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(heart, str(tmp_path / "truth.nii.gz"))
    rc = main(["segment", "--model", str(heart_model), "--image", str(tmp_path / "ct.nii.gz"),
               "--out", str(tmp_path / "pred.nii.gz"), "--seg-nrrd", str(tmp_path / "pred.seg.nrrd"),
               "--probabilities", str(tmp_path / "probs"), "--device", "cpu"])
    assert rc == 0
    pred = sitk.ReadImage(str(tmp_path / "pred.nii.gz"))
    assert pred.GetSize() == ct.GetSize()
    probs = sorted(p.name for p in (tmp_path / "probs").iterdir())
    assert len(probs) == 7 and probs[0].startswith("205_")
    p0 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "probs" / probs[0])))
    assert p0.min() >= 0 and p0.max() <= 1
    capsys.readouterr()
    rc = main(["evaluate", "--pred", str(tmp_path / "pred.nii.gz"), "--truth", str(tmp_path / "truth.nii.gz"),
               "--task", "heart", "--json", str(tmp_path / "m.json")])
    assert rc == 0
    assert "Pulmonary artery" in capsys.readouterr().out
    m = json.loads((tmp_path / "m.json").read_text())
    p, t = sitk.GetArrayFromImage(pred) == 205, sitk.GetArrayFromImage(heart) == 205
    assert m["structures"]["Left ventricle myocardium"]["dice"] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()))
    rc = main(["evaluate", "--pred", str(tmp_path / "pred.nii.gz"), "--truth", str(tmp_path / "ct.nii.gz"),
               "--task", "heart"])
    assert rc == 2 and "--ignore-unknown-labels" in capsys.readouterr().err


# -- streaming sliding window (gvsl.slidingwindow) and streamed resampling (LabelResampler) ----------

def _reference_labels_grid_sample(probs, grid, image, values):
    """The former whole-grid path: every input voxel -> normalised grid coordinate -> one
    grid_sample over the whole (C, z, y, x) grid (border, align_corners=True) -> argmax."""
    import torch.nn.functional as F
    from gvsl.seginfer import _index_to_grid_voxel
    nx, ny, nz = image.GetSize()
    a, b = _index_to_grid_voxel(image, grid)
    scale = 2.0 / np.maximum(np.array(grid.size, dtype=np.float64) - 1.0, 1.0)
    kk, jj, ii = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    p = np.stack([a[ax, 0] * ii + a[ax, 1] * jj + a[ax, 2] * kk + b[ax] for ax in range(3)], axis=-1)
    norm = torch.from_numpy((p * scale - 1.0).astype(np.float32))[None]
    sampled = F.grid_sample(torch.from_numpy(probs)[None], norm, mode="bilinear", padding_mode="border",
                            align_corners=True)
    return np.asarray(values)[sampled[0].argmax(dim=0).numpy()]


def _rotated_image(size, spacing, origin, angles):
    (ca, sa), (cb, sb), (cc, sc) = [(np.cos(t), np.sin(t)) for t in angles]
    rot = (np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]]) @ np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
           @ np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]]))
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(rot.ravel()))
    return image


def test_label_resampler_streams_oblique_input_bit_identical_to_whole_grid():
    from gvsl.seginfer import LabelResampler, _index_to_grid_voxel
    rng = np.random.default_rng(5)
    grid = NetworkGrid(size=(12, 10, 9), spacing_mm=1.5, origin_lps=(-8.0, -6.0, -6.0),
                       direction=tuple(np.eye(3).ravel()))
    probs = rng.random((5, 9, 10, 12)).astype(np.float32)
    probs /= probs.sum(axis=0, keepdims=True)
    image = _rotated_image((14, 11, 9), (0.8, 0.9, 1.0), (-3.0, -6.0, -3.0), (0.7, -0.5, 0.3))
    a, _ = _index_to_grid_voxel(image, grid)
    assert abs(a[2, 0]) * 13 + abs(a[2, 1]) * 10 > 3  # one input slice spans > 3 grid planes
    values = np.array([0, 3, 10, 300, 1000])
    ref = _reference_labels_grid_sample(probs, grid, image, values)
    for slab_mb in (1e-4, 0.002, 64.0):  # 1-plane slabs, a few planes, the whole grid at once
        fast = sitk.GetArrayFromImage(labels_on_image(probs, grid, image, values, slab_mb=slab_mb))
        assert fast.dtype == np.uint16
        np.testing.assert_array_equal(fast, ref)
    # a restarted pass (what Inference.run does after a CUDA out-of-memory error) starts clean
    res = LabelResampler(grid, image, values, slab_mb=1e-4)
    for z0 in range(0, 4):
        res(z0, torch.from_numpy(probs[:, z0:z0 + 1].copy()))
    res.start(None, None)
    with pytest.raises(ValueError, match="does not continue plane 0"):
        res(3, torch.from_numpy(probs[:, 3:4].copy()))
    for z0 in range(0, 9, 2):
        res(z0, torch.from_numpy(probs[:, z0:z0 + 2].copy()))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(res.finish()), ref)
    # and it is linear resampling of each class + argmax (independent implementation: SimpleITK)
    stack = np.stack([sitk.GetArrayFromImage(probability_image(probs, i, grid, image)) for i in range(5)])
    inside = stack.sum(axis=0) > 0
    assert inside.mean() > 0.5
    assert (ref[inside] == values[stack.argmax(axis=0)][inside]).mean() > 0.999


def _tiny_net(seed, n_classes):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Conv3d(4, n_classes, 3, padding=1)).eval()


@pytest.mark.parametrize("shape_zyx, roi, overlap, batch, planes", [
    ((30, 26, 20), (12, 12, 12), 0.25, 1, 0),     # several rows, whole rows per slab
    ((9, 30, 6), (12, 10, 8), 0.5, 3, 2),         # z and x shorter than the window (padded), batches of 3
    ((40, 7, 21), (16, 8, 8), 0.25, 2, 1),        # y shorter than the window, 1-plane slabs
    ((16, 16, 16), (16, 16, 16), 0.25, 1, 5),     # one window
])
def test_stream_sliding_window_equals_monai_then_softmax(shape_zyx, roi, overlap, batch, planes):
    from monai.inferers import sliding_window_inference
    from gvsl.slidingwindow import GridCollector, stream_sliding_window
    net = _tiny_net(sum(shape_zyx), 5)
    x = torch.rand((1, 1) + shape_zyx, generator=torch.Generator().manual_seed(1)) * 4 - 2
    with torch.no_grad():
        ref = torch.softmax(sliding_window_inference(x, roi, batch, net, overlap=overlap, mode="gaussian")[0], 0)
        seen = []

        class Consumer(GridCollector):
            def __call__(self, z0, slab):
                assert slab.dtype == torch.float32 and slab.shape[2:] == shape_zyx[1:]
                assert planes == 0 or slab.shape[1] <= planes
                seen.append((z0, slab.shape[1]))
                super().__call__(z0, slab)

        consumer = Consumer()
        n = stream_sliding_window(net, x, roi, consumer, overlap=overlap, sw_batch_size=batch, slab_planes=planes)
    assert n >= 1
    assert [z for z, _ in seen] == list(np.cumsum([0] + [d for _, d in seen])[:-1])  # in order, each plane once
    assert sum(d for _, d in seen) == shape_zyx[0]
    assert float((consumer.probs - ref).abs().max()) < 1e-6


def test_segment_streams_equal_to_monai_whole_grid_path_with_progress_and_cancel(heart_model):
    from monai.inferers import sliding_window_inference
    from gvsl.checkpoint import load_model
    from gvsl.preprocessing import preprocess, spec_from_checkpoint
    from gvsl.progress import CancelToken, Cancelled, Progress
    ct, _, _ = make_heart_phantom(32, 1)
    image = sitk.Resample(ct, _rotated_image((30, 28, 26), (1.2, 1.1, 1.3), ct.TransformContinuousIndexToPhysicalPoint(
        (1.0, 0.0, 2.0)), (0.2, 0.15, -0.1)), sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkInt16)
    model = load_model(heart_model, "cpu", kind="segmentation")
    records = []
    res = segment(image, model, "cpu", window=16, keep_probabilities=True, slab_mb=0.05,
                  progress=Progress(3, mode="none", callback=records.append))
    prepared = preprocess(image, spec_from_checkpoint(model.info)[0])
    with torch.no_grad():
        logits = sliding_window_inference(torch.from_numpy(prepared.array_zyx)[None, None], (16,) * 3, 1, model,
                                          overlap=0.25, mode="gaussian")
    ref_probs = torch.softmax(logits[0], 0).numpy()
    assert float(np.abs(res.probabilities_grid - ref_probs).max()) < 1e-5
    values = np.array([0] + res.table.values)
    ref = _reference_labels_grid_sample(ref_probs, prepared.grid, image, values)
    got = sitk.GetArrayFromImage(res.labels)
    assert len(np.unique(got)) >= 3
    assert (got == ref).mean() > 0.9999  # equal up to ties within float rounding
    rows = [r for r in records if r["event"] == "window_row"]
    assert len(rows) >= 2 and rows[-1]["row"] == rows[-1]["rows"] == len(rows)
    assert segment(image, model, "cpu", window=16).probabilities_grid is None
    token = CancelToken()

    def cancel_after_first_row(record):
        if record["event"] == "window_row":
            token.cancel("test")

    with pytest.raises(Cancelled):
        segment(image, model, "cpu", window=16, progress=Progress(3, mode="none", callback=cancel_after_first_row),
                cancel=token)


def test_out_of_memory_midway_reruns_the_stream_from_scratch_through_inference_run():
    """Inference.run's CUDA out-of-memory fallback reruns the whole pass: the resampler, which
    already got slabs, must restart clean (LabelResampler.start) and give the same labels."""
    from gvsl.inference import Inference
    from gvsl.seginfer import LabelResampler
    from gvsl.slidingwindow import stream_sliding_window
    net = _tiny_net(2, 4)
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 5:  # the second row of the first pass: slabs were already handed on
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return net(x)

    grid = NetworkGrid(size=(20, 18, 30), spacing_mm=1.0, origin_lps=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    image = _rotated_image((16, 15, 25), (1.0, 1.1, 1.05), (1.0, 1.0, 1.0), (0.3, 0.2, 0.1))
    vol = np.random.default_rng(3).random(grid.shape_zyx).astype(np.float32)
    values = np.arange(4)
    got = []
    for model in (flaky, net):
        res = LabelResampler(grid, image, values, slab_mb=0.01)
        inf = Inference(net, device="cpu")
        if model is flaky:
            inf.device = torch.device("mps")  # pretend (no GPU here): the fallback only runs off the CPU
        inf.run(lambda m, x: stream_sliding_window(model, x, (12, 12, 12), res, slab_planes=3), vol)
        got.append(sitk.GetArrayFromImage(res.finish()))
        if model is flaky:
            assert inf.device.type == "cpu" and "ran out of memory" in inf.warnings[0]
    assert calls["n"] > 5
    np.testing.assert_array_equal(got[0], got[1])
