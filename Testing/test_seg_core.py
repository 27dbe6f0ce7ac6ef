"""Segmentation engine: model + checkpoints, label encoding and pairs, inference geometry, evaluation."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from gvsl.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from gvsl.network import GVSL, ModelConfig
from gvsl.phantoms import HEART_LABELS, make_heart_phantom
from gvsl.segdata import (Case, LabelEncoder, SegmentationDataError, find_pairs, load_case,
                          load_remap, resolve_table, sample_batch, sample_patch)
from gvsl.segmodel import SegmentationNet, init_backbone_from, label_table_of, labels_entry, new_model

TINY = (8, 8, 8, 8, 16, 8, 8, 8, 8)


def save_seg(path, table, model=None, crop=32, preprocessing=None):
    model = model or new_model(table, TINY)
    return save_checkpoint(path, model, kind="segmentation", labels=labels_entry(table),
                           preprocessing=preprocessing or {"preset": "ct", "spacing_mm": 1.0},
                           train_config={"crop": crop}, scores={})


# ------------------------------------------------------------------ model and checkpoints
def test_backbone_keys_match_gvsl_and_published_layout(data_dir):
    seg = new_model(resolve_table("heart"))
    keys = {k for k in seg.state_dict() if k.startswith("unet.")}
    published = {ln.split("\t")[0] for ln in (data_dir / "gvsl_official_state_dict.tsv").read_text().splitlines()
                 if ln and not ln.startswith("#") and ln.startswith("unet.")}
    assert keys == published
    assert tuple(seg.out_conv.weight.shape) == (8, 32, 3, 3, 3)
    assert seg.out_conv.padding == (1, 1, 1)


def test_init_from_pretraining_checkpoint_copies_the_backbone(tmp_path):
    pre = GVSL(ModelConfig(channels=TINY))
    save_checkpoint(tmp_path / "pre.pt", pre)
    seg = new_model(resolve_table("coronary"), TINY)
    n = init_backbone_from(seg, load_checkpoint(tmp_path / "pre.pt"))
    assert n == len([k for k in pre.state_dict() if k.startswith("unet.")])
    for k, v in pre.state_dict().items():
        if k.startswith("unet."):
            assert torch.equal(seg.state_dict()[k], v)
    x = torch.rand(1, 1, 16, 16, 16)
    assert torch.allclose(seg.unet(x)[1], pre.unet(x)[1])
    wide = new_model(resolve_table("coronary"))
    with pytest.raises(CheckpointError, match="same channels"):
        init_backbone_from(wide, load_checkpoint(tmp_path / "pre.pt"), "pre.pt")


def test_segmentation_checkpoint_round_trip_and_kind_errors(tmp_path):
    table = resolve_table("heart")
    model = new_model(table, TINY)
    save_seg(tmp_path / "seg.pt", table, model)
    loaded = load_model(tmp_path / "seg.pt", kind="segmentation")
    assert isinstance(loaded, SegmentationNet)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    back = label_table_of(loaded)
    assert back.values == list(HEART_LABELS)
    assert [lab.terminology_tag() for lab in back] == [lab.terminology_tag() for lab in table]
    assert [lab.color_rgb for lab in back] == [lab.color_rgb for lab in table]
    raw = torch.load(tmp_path / "seg.pt", weights_only=True)
    assert raw["kind"] == "segmentation" and raw["labels"]["values"] == list(HEART_LABELS)
    with pytest.raises(CheckpointError, match="'segmentation' checkpoint.*registration"):
        load_model(tmp_path / "seg.pt")
    save_checkpoint(tmp_path / "pre.pt", GVSL(ModelConfig(channels=TINY)))
    with pytest.raises(CheckpointError, match="'pretrain' checkpoint.*segmentation needs"):
        load_model(tmp_path / "pre.pt", kind="segmentation")
    assert load_model(tmp_path / "pre.pt", kind=None).info["kind"] == "pretrain"


# ------------------------------------------------------------------ labels and data
def test_encoder_maps_mmwhs_values_and_refuses_unknown_ones():
    enc = LabelEncoder(resolve_table("heart"))
    arr = np.array([[[0, 205, 420, 500, 550, 600, 820, 850]]], dtype=np.uint16)
    cls, n = enc.encode(arr)
    assert cls.tolist() == [[[0, 1, 2, 3, 4, 5, 6, 7]]] and n == 0
    assert enc.class_values().tolist() == [0, 205, 420, 500, 550, 600, 820, 850]
    bad = np.array([[[0, 205, 421, 999, 999]]])
    with pytest.raises(SegmentationDataError, match=r"\[421, 999\] \(3 voxels\).*--ignore-unknown-labels"):
        enc.encode(bad, "case.nii.gz")
    cls, n = LabelEncoder(resolve_table("heart"), ignore_unknown=True).encode(bad)
    assert cls.tolist() == [[[0, 1, 0, 0, 0]]] and n == 3
    cls, n = LabelEncoder(resolve_table("heart"), remap={421: 420, 999: 0}).encode(bad)
    assert cls.tolist() == [[[0, 1, 2, 0, 0]]] and n == 0
    with pytest.raises(SegmentationDataError, match="remapping targets"):
        LabelEncoder(resolve_table("heart"), remap={1: 7})


def test_full_freesurfer_aseg_works_for_brain_with_ignore_or_remap(tmp_path):
    brain = resolve_table("brain")
    aseg_values = sorted(set(brain.values) | {5, 24, 26, 30, 31, 44, 58, 62, 63, 72, 77, 80, 85, 251, 252, 253,
                                              254, 255})
    assert len(aseg_values) >= 40
    arr = np.array(aseg_values, dtype=np.int32).reshape(1, 1, -1)
    with pytest.raises(SegmentationDataError, match="not in the 'brain' table"):
        LabelEncoder(brain).encode(arr)
    cls, n = LabelEncoder(brain, ignore_unknown=True).encode(arr)
    assert sorted(set(cls.ravel().tolist()) - {0}) == list(range(1, 29))
    assert n == len(aseg_values) - 28
    remap = tmp_path / "remap.tsv"
    remap.write_text("source\ttarget\n# Inf-Lat-Vent into the lateral ventricles\n5\t4\n44\t43\n")
    assert load_remap(remap) == {5: 4, 44: 43}


def test_pairs_from_folders_and_clear_errors(tmp_path):
    ct, heart, _ = make_heart_phantom(32, 0)
    for d in ("images", "labels"):
        (tmp_path / d).mkdir()
    sitk.WriteImage(ct, str(tmp_path / "images" / "a.nii.gz"))
    sitk.WriteImage(heart, str(tmp_path / "labels" / "a.nii.gz"))
    sitk.WriteImage(ct, str(tmp_path / "images" / "b.nrrd"))
    with pytest.raises(SegmentationDataError, match=r"same name as image\(s\) \['b.nrrd'\]"):
        find_pairs(tmp_path / "images", tmp_path / "labels")
    sitk.WriteImage(heart, str(tmp_path / "labels" / "b.nii.gz"))
    pairs = find_pairs(tmp_path / "images", tmp_path / "labels")
    assert [(p.name, q.name) for p, q in pairs] == [("a.nii.gz", "a.nii.gz"), ("b.nrrd", "b.nii.gz")]
    with pytest.raises(SegmentationDataError, match="2 image"):
        find_pairs([ct, ct], [heart])


def test_load_case_checks_geometry_emptiness_and_dimension():
    from gvsl.preprocessing import PreprocessSpec
    ct, heart, _ = make_heart_phantom(32, 1)
    enc = LabelEncoder(resolve_table("heart"))
    spec = PreprocessSpec()
    case = load_case(ct, heart, spec, enc)
    assert case.image_zyx.dtype == np.float32 and case.classes_zyx.dtype == np.uint8
    assert case.image_zyx.shape == case.classes_zyx.shape
    assert set(np.unique(case.classes_zyx)) == set(range(8))
    shifted = sitk.Image(heart)
    shifted.SetOrigin([o + 3 for o in heart.GetOrigin()])
    with pytest.raises(SegmentationDataError, match="different origin"):
        load_case(ct, shifted, spec, enc)
    with pytest.raises(SegmentationDataError, match="has size"):
        load_case(ct, heart[:, :, :20], spec, enc)
    empty = sitk.Image(heart) * 0
    with pytest.raises(SegmentationDataError, match="no voxel of any 'heart' structure"):
        load_case(ct, empty, spec, enc)
    with pytest.raises(SegmentationDataError, match="2D image"):
        load_case(ct[:, :, 5], heart[:, :, 5], spec, enc)
    four = sitk.JoinSeries([ct, ct])
    with pytest.raises(SegmentationDataError, match="4D image"):
        load_case(four, sitk.JoinSeries([heart, heart]), spec, enc)


def test_patches_oversample_rare_foreground_and_are_seeded():
    classes = np.zeros((40, 40, 40), np.uint8)
    classes[20, 20, 20:23] = 1  # 3 voxels of a rare structure
    case = Case("c", np.random.rand(40, 40, 40).astype(np.float32), classes)
    g = torch.Generator().manual_seed(0)
    hits = sum(int((sample_patch(case, 16, g)[1] == 1).any()) for _ in range(60))
    assert hits >= 30  # ~2/3 expected; uniform crops would hit ~(16/40)^3 = 6 %
    a = sample_batch([case], 2, 16, torch.Generator().manual_seed(5))
    b = sample_batch([case], 2, 16, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    small = Case("s", np.ones((10, 12, 14), np.float32), np.ones((10, 12, 14), np.uint8))
    img, lab = sample_patch(small, 16, g)
    assert img.shape == (16, 16, 16) and img.sum() == 10 * 12 * 14 and lab.sum() == 10 * 12 * 14


def test_segmentation_modules_do_not_import_monai_at_import_time():
    import subprocess
    import sys
    code = ("import sys, gvsl.segtrain, gvsl.seginfer, gvsl.segeval, gvsl.segdata, gvsl.segmodel, gvsl.segnrrd, "
            "gvsl.segpictures, gvsl.cli; assert 'monai' not in sys.modules, 'monai imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gvsl_info_describes_a_segmentation_model(tmp_path, capsys):
    from gvsl.cli import main
    save_seg(tmp_path / "seg.pt", resolve_table("coronary"))
    assert main(["info", "--model", str(tmp_path / "seg.pt"), "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["kind"] == "segmentation" and info["model"]["labels"]["values"] == [1]


def test_picture_colours_tell_the_structures_apart(tmp_path):
    import numpy as np

    from gvsl.labels import load_task_table
    from gvsl.segpictures import DISTINCT_RGB, _two_lines, picture_colours
    for task in ("heart", "brain"):
        table = load_task_table(task)
        colours = np.array(list(picture_colours(table).values()))
        assert len(colours) == len(table)
        dist = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(len(colours)) * 10
        assert dist.min() >= DISTINCT_RGB * 0.5, task  # the heart table's own reds differ by ~0.02
    coronary = load_task_table("coronary")  # one structure: its terminology colour is kept
    assert picture_colours(coronary) == {lab.value: tuple(lab.color_float) for lab in coronary}
    assert _two_lines("Left ventricle blood cavity") == "Left ventricle\nblood cavity"
    assert _two_lines("Aorta") == "Aorta"
