"""GVSLSegmentationLib on real MRML (slicer-core): segments with the table's names, colours,
values and terminology; exported label map identical; .seg.nrrd round trip (ours and Slicer's);
input volume unchanged; fine-tune from node pairs -> a model segment_volume uses."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")

import gvsl_mrml  # noqa: E402
from gvsl_mrml import testing as mrml_testing  # noqa: E402

from gvsl.checkpoint import save_checkpoint  # noqa: E402
from gvsl.phantoms import make_heart_phantom  # noqa: E402
from gvsl.segdata import resolve_table  # noqa: E402
from gvsl.segmodel import labels_entry, new_model  # noqa: E402

import GVSLSegmentationLib as lib  # noqa: E402

TINY = [8, 8, 8, 8, 16, 8, 8, 8, 8]


@pytest.fixture
def scene():
    return mrml_testing.headless_scene()


@pytest.fixture(scope="module")
def heart():
    return make_heart_phantom(32, 7)


def _tags(node):
    return gvsl_mrml.segmentations.segment_terminology(node)


def test_labels_to_segments_and_back_identical(scene, heart):
    ct, labels, _ = heart
    table = resolve_table("heart")
    volume = gvsl_mrml.sitk_to_volume_node(ct, scene, "ct")
    node = lib.labels_to_segmentation(labels, table, scene, "seg", volume)
    assert gvsl_mrml.segment_names(node) == table.names
    seg = node.GetSegmentation()
    for i, lab in enumerate(table):
        segment = seg.GetNthSegment(i)
        assert np.allclose(segment.GetColor(), lab.color_float, atol=1e-6)
        assert _tags(node)[lab.name] == lab.terminology_tag()
        import vtk
        value = vtk.reference("")
        assert segment.GetTag(lib.TAG_LABEL_VALUE, value) and str(value) == str(lab.value)
    values = lib.segmentation_label_values(node, table)
    back, _ = gvsl_mrml.segmentation_to_sitk_labels(node, volume, segment_values=values)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
    assert node.GetNodeReference("GVSL.input").GetID() == volume.GetID()


def test_seg_nrrd_written_by_gvsl_loads_in_slicer_with_names_and_values(scene, heart, tmp_path):
    from gvsl.segnrrd import write_seg_nrrd
    ct, labels, _ = heart
    table = resolve_table("heart")
    path = write_seg_nrrd(labels, table, tmp_path / "heart.seg.nrrd")
    node = gvsl_mrml.load_segmentation(path, scene)
    assert gvsl_mrml.segment_names(node) == table.names
    assert _tags(node)["Pulmonary artery"] == table[850].terminology_tag()
    volume = gvsl_mrml.sitk_to_volume_node(ct, scene, "ct")
    back, _ = gvsl_mrml.segmentation_to_sitk_labels(node, volume, segment_values={lab.name: lab.value for lab in table})
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
    # and a segmentation node saved by Slicer and read back keeps everything
    out = gvsl_mrml.save_node(node, tmp_path / "resaved.seg.nrrd")
    again = gvsl_mrml.load_segmentation(out, scene)
    assert gvsl_mrml.segment_names(again) == table.names
    back2, _ = gvsl_mrml.segmentation_to_sitk_labels(again, volume, segment_values={lab.name: lab.value for lab in table})
    assert np.array_equal(sitk.GetArrayFromImage(back2), sitk.GetArrayFromImage(labels))


def test_segment_volume_leaves_input_unchanged_and_matches_engine(scene, heart, tmp_path):
    from gvsl.seginfer import segment
    ct, _, _ = heart
    table = resolve_table("heart")
    torch.manual_seed(1)
    model = new_model(table, tuple(TINY))
    with torch.no_grad():
        model.out_conv.weight.mul_(20)
    path = tmp_path / "seg.pt"
    save_checkpoint(path, model, kind="segmentation", labels=labels_entry(table), train_config={"crop": 32},
                    preprocessing={"preset": "ct", "spacing_mm": 1.0})
    volume = gvsl_mrml.sitk_to_volume_node(ct, scene, "ct")
    before = slicer.util.arrayFromVolume(volume).copy()
    mtime = volume.GetImageData().GetMTime()
    assert lib.validate_inputs(volume, tmp_path / "missing.pt").startswith("Model file not found")
    assert lib.validate_inputs(None, path).startswith("Select the input volume")
    node = lib.segment_volume(volume, str(path), "cpu")
    assert np.array_equal(slicer.util.arrayFromVolume(volume), before)
    assert volume.GetImageData().GetMTime() == mtime
    assert gvsl_mrml.segment_names(node) == table.names  # every structure, even if empty
    engine = segment(gvsl_mrml.volume_node_to_sitk(volume), str(path), "cpu").labels
    back, _ = gvsl_mrml.segmentation_to_sitk_labels(node, volume, segment_values={lab.name: lab.value for lab in table})
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(engine))
    lib.show_3d(node)
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")
    refilled = lib.segment_volume(volume, str(path), "cpu", segmentation_node=node)
    assert refilled is node and gvsl_mrml.segment_names(node) == table.names


def test_finetune_from_node_pairs_gives_a_model_segment_volume_uses(scene, tmp_path):
    table = resolve_table("heart")
    pairs = []
    for i in range(2):
        ct, labels, _ = make_heart_phantom(32, 20 + i)
        v = gvsl_mrml.sitk_to_volume_node(ct, scene, f"ct{i}")
        pairs.append((v, lib.labels_to_segmentation(labels, table, scene, f"seg{i}", v)))
    bad = gvsl_mrml.sitk_labels_to_segmentation(sitk.GetImageFromArray(np.ones((8, 8, 8), np.uint8)), scene, "bad",
                                                None, label_table={1: "Liver"})
    with pytest.raises(lib.SegmentationInputError, match="Liver"):
        lib.finetune_from_nodes([(pairs[0][0], bad)], "heart", tmp_path / "bad")
    summary = lib.finetune_from_nodes(pairs, "heart", tmp_path / "run", validation_pairs=pairs[1:], steps=3, crop=16,
                                      batch_size=1, validate_every=3, save_every=0, device="cpu", model_channels=TINY)
    assert summary["status"] == "done" and summary["model_path"].endswith("seg_best.pt")
    node = lib.segment_volume(pairs[1][0], summary["model_path"], "cpu")
    assert node.GetAttribute(lib.ATTRIBUTE_MODEL) == summary["model_path"]
    assert gvsl_mrml.segment_names(node) == table.names


def test_terms_chart_collects_steps_and_validation(scene):
    chart = lib.TermsChart(scene, "ft")
    chart.append({"event": "step", "step": 1, "loss": 2.0, "dice": 0.9, "ce": 1.1})
    chart.append({"event": "validation", "step": 1, "dice_mean": 0.25})
    chart.append({"event": "warning", "message": "x"})
    assert chart.values("step") == [1.0, 1.0]
    assert chart.values("loss")[0] == 2.0 and np.isnan(chart.values("loss")[1])
    assert chart.values("val_dice_mean")[1] == 0.25
    assert chart.chart.GetNumberOfPlotSeriesNodes() == 4


def test_background_segment_and_finetune_cancel_resume(scene, heart, tmp_path):
    pytest.importorskip("gvsl_slicer.jobs", reason="needs the shared job runner (gvsl_slicer, h/slicer)")
    table = resolve_table("heart")
    ct, labels, _ = heart
    volume = gvsl_mrml.sitk_to_volume_node(ct, scene, "ct")
    seg = lib.labels_to_segmentation(labels, table, scene, "truth", volume)
    run = lib.start_finetune([(volume, seg)], "heart", tmp_path / "ft", scene=scene, steps=400, crop=16,
                             batch_size=1, val_every=0, save_every=1, device="cpu",
                             model_channels=TINY)
    import time
    t0 = time.time()
    while run.poll() == "running" and not run.steps and time.time() - t0 < 120:
        time.sleep(0.2)
    assert run.steps, run.error
    run.cancel()
    assert run.wait(180) == "cancelled", run.error
    last = torch.load(tmp_path / "ft" / "seg_last.pt", weights_only=True)
    assert last["step"] >= 1 and len(run.chart.values("step")) >= 1
    resumed = lib.start_finetune([(volume, seg)], "heart", tmp_path / "ft", resume=True, steps=last["step"] + 1,
                                 crop=16, batch_size=1, val_every=0, save_every=1, device="cpu", model_channels=TINY)
    assert resumed.wait(180) == "done", resumed.error
    assert resumed.summary["step"] == last["step"] + 1
    background = lib.SegmentationRun(volume, resumed.model_path, "cpu").start()
    assert background.wait(180) == "done", background.job.error
    direct = lib.segment_volume(volume, resumed.model_path, "cpu")
    a, _ = gvsl_mrml.segmentation_to_sitk_labels(background.segmentation_node, volume,
                                                 segment_values={lab.name: lab.value for lab in table})
    b, _ = gvsl_mrml.segmentation_to_sitk_labels(direct, volume, segment_values={lab.name: lab.value for lab in table})
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
