"""gvsl.phantoms (heart CT, brain MR, `gvsl phantom`) and gvsl.labels (tables, terminology)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl import phantoms
from gvsl.labels import Label, LabelError, LabelTable, TASKS, load_task_table

HEART = [205, 420, 500, 550, 600, 820, 850]


def _arr(img):
    return sitk.GetArrayFromImage(img)


@pytest.fixture(scope="module")
def heart64():
    return phantoms.make_heart_phantom(64, seed=3)


@pytest.fixture(scope="module")
def brain64():
    return phantoms.make_brain_phantom(64, seed=3)


# ---------------------------------------------------------------------------------------
# heart
# ---------------------------------------------------------------------------------------
def test_heart_is_deterministic_per_seed_and_seeds_differ():
    a = phantoms.make_heart_phantom(48, seed=7)
    b = phantoms.make_heart_phantom(48, seed=7)
    c = phantoms.make_heart_phantom(48, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(_arr(x), _arr(y))
        assert x.GetOrigin() == y.GetOrigin() and x.GetSpacing() == y.GetSpacing()
    assert not np.array_equal(_arr(a[0]), _arr(c[0]))
    assert not np.array_equal(_arr(a[1]), _arr(c[1]))


def test_heart_types_geometry_and_exact_label_values(heart64):
    ct, heart, coronary = heart64
    assert ct.GetPixelID() == sitk.sitkInt16 and heart.GetPixelID() == sitk.sitkUInt16
    assert coronary.GetPixelID() == sitk.sitkUInt8
    for img in heart64:
        assert img.GetSize() == (64, 64, 64)
        assert img.GetSpacing()[:2] == (1.0, 1.0) and img.GetSpacing()[2] in (1.0, 1.2)
        assert img.GetDirection() == (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
        assert img.GetOrigin() == ct.GetOrigin()
    for seed in (3, 11):
        lab = _arr(heart64[1]) if seed == 3 else _arr(phantoms.make_heart_phantom(64, seed)[1])
        values, counts = np.unique(lab, return_counts=True)
        assert values.tolist() == [0] + HEART
        assert counts[1:].min() >= 150  # every structure is a real blob, not a speck
    assert set(np.unique(_arr(coronary)).tolist()) == {0, 1}


def test_heart_intensities_are_ct_like(heart64):
    ct, heart = _arr(heart64[0]).astype(float), _arr(heart64[1])
    med = {v: np.median(ct[heart == v]) for v in HEART}
    for v in (500, 420, 820):  # contrast-enhanced left heart and aorta
        assert 250 < med[v] < 520, (v, med[v])
    assert 50 < med[205] < 200  # myocardium
    assert med[500] - med[205] > 120  # blood pool vs myocardium contrast
    assert -1050 <= ct[0, 0, 0] < -900 and ct.min() >= -1024  # air outside the body
    assert (ct < -700).mean() > 0.2  # lungs + air
    assert (ct > 500).mean() > 0.002  # bone (ribs, spine)


def test_coronary_tree_is_present_thin_and_outside_the_chambers(heart64):
    ct, heart, coronary = heart64
    cor = _arr(coronary).astype(bool)
    assert 0.0005 < cor.mean() < 0.005  # a thin tree: well under 1 % of the volume
    eroded = _arr(sitk.BinaryErode(coronary, [2, 2, 2]))
    assert eroded.sum() <= 0.02 * cor.sum()  # radius ~1-1.6 voxels: nearly gone after a 2-voxel erosion
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(coronary, True))
    sizes = np.bincount(_arr(cc).ravel())[1:]
    assert sizes[:2].sum() >= 0.6 * cor.sum()  # mostly two trees (left and right)
    lab = _arr(heart)[cor]
    assert not np.isin(lab, [500, 600, 420, 550, 820]).any()  # never inside a chamber or the aorta
    assert np.median(_arr(ct)[cor]) > 150  # contrast-filled


# ---------------------------------------------------------------------------------------
# brain
# ---------------------------------------------------------------------------------------
def test_brain_is_deterministic_and_has_all_28_labels(brain64):
    t1, lab = brain64
    again = phantoms.make_brain_phantom(64, seed=3)
    np.testing.assert_array_equal(_arr(again[0]), _arr(t1))
    np.testing.assert_array_equal(_arr(again[1]), _arr(lab))
    assert t1.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt16
    want = load_task_table("brain").values
    assert len(want) == 28
    for seed, arr in ((3, _arr(lab)), (4, _arr(phantoms.make_brain_phantom(64, 4)[1]))):
        values, counts = np.unique(arr, return_counts=True)
        assert values.tolist() == [0] + want, seed
        assert counts[1:].min() >= 20, dict(zip(values.tolist(), counts.tolist()))


def test_brain_left_labels_are_on_the_patient_left_and_t1_contrast(brain64):
    t1, lab = _arr(brain64[0]).astype(float), _arr(brain64[1])
    # identity direction: +x index = +x LPS = patient left
    for left, right in ((2, 41), (3, 42), (10, 49), (12, 51), (17, 53), (8, 47)):
        xl = np.nonzero(lab == left)[2].mean()
        xr = np.nonzero(lab == right)[2].mean()
        assert xl > xr, (left, right)
    wm = np.median(t1[np.isin(lab, [2, 41])])
    gm = np.median(t1[np.isin(lab, [3, 42])])
    csf = np.median(t1[np.isin(lab, [4, 43])])
    assert wm > gm + 120 and gm > csf + 200 and 500 < wm < 1200
    assert np.median(t1[lab == 13]) > np.median(t1[lab == 12])  # pallidum brighter than putamen (T1)
    assert t1[0, 0, 0] < 100  # air


# ---------------------------------------------------------------------------------------
# writing and the `gvsl phantom` command
# ---------------------------------------------------------------------------------------
def test_write_phantoms_layout_and_seeds(tmp_path):
    paths = phantoms.write_phantoms("brain", 2, 40, 5, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["images/brain_000.nii.gz",
                                                                   "images/brain_001.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["brain_000.nii.gz", "brain_001.nii.gz"]
    assert not (tmp_path / "labels-coronary").exists()
    t1, lab = phantoms.make_brain_phantom(40, 5 * 1000 + 1)
    np.testing.assert_array_equal(_arr(sitk.ReadImage(str(paths[1]))), _arr(t1))
    read_lab = sitk.ReadImage(str(tmp_path / "labels" / "brain_001.nii.gz"))
    np.testing.assert_array_equal(_arr(read_lab), _arr(lab))
    np.testing.assert_allclose(read_lab.GetOrigin(), t1.GetOrigin(), atol=1e-4)
    with pytest.raises(ValueError, match="choose one of heart, brain"):
        phantoms.write_phantoms("liver", 1, 40, 0, tmp_path)


def test_cli_phantom_heart_end_to_end(tmp_path, capsys):
    from gvsl.cli import main
    out = tmp_path / "ph"
    rc = main(["phantom", "--kind", "heart", "--n", "2", "--size", "40", "--seed", "2", "--out", str(out),
               "--progress", "json"])
    assert rc == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[0]["event"] == "start" and records[-1]["event"] == "done"
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2]
    assert all(r["task"] == "phantom" for r in records)
    for folder in ("images", "labels", "labels-coronary"):
        files = sorted(p.name for p in (out / folder).iterdir())
        assert files == ["heart_000.nii.gz", "heart_001.nii.gz"], folder  # no temp files left behind
    ct, heart, cor = phantoms.make_heart_phantom(40, 2000)
    np.testing.assert_array_equal(_arr(sitk.ReadImage(str(out / "images" / "heart_000.nii.gz"))), _arr(ct))
    lab = _arr(sitk.ReadImage(str(out / "labels" / "heart_000.nii.gz")))
    assert np.unique(lab).tolist() == [0] + HEART
    np.testing.assert_array_equal(_arr(sitk.ReadImage(str(out / "labels-coronary" / "heart_000.nii.gz"))), _arr(cor))


def test_cli_phantom_bad_size_is_a_one_line_error(tmp_path, capsys):
    from gvsl.cli import main
    rc = main(["phantom", "--kind", "brain", "--n", "1", "--size", "8", "--out", str(tmp_path), "--progress", "none"])
    assert rc == 2
    assert "phantom size 8 is out of range: use 32..512" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# label tables and terminology
# ---------------------------------------------------------------------------------------
def test_heart_table_values_codes_and_terminology_tag():
    table = load_task_table("heart")
    assert table.values == HEART
    codes = {lab.value: lab.type.split("^")[1] for lab in table}
    assert codes == {205: "74281007", 420: "82471001", 500: "87878005", 550: "73829009",
                     600: "53085002", 820: "54247002", 850: "81040000"}
    lv = table[500]
    tag = lv.terminology_tag()
    parts = tag.split("~")
    assert len(parts) == 7
    assert parts == ["Segmentation category and type - DICOM master list", "SCT^123037004^Anatomical Structure",
                     "SCT^87878005^Left ventricle", "^^", "Anatomic codes - DICOM master list", "^^", "^^"]
    assert table[850].color_rgb == (0, 122, 171)
    assert all(len(lab.terminology_tag().split("~")) == 7 for t in TASKS for lab in load_task_table(t))


def test_coronary_and_brain_tables():
    cor = load_task_table("coronary")
    assert cor.values == [1] and cor[1].type == "SCT^41801008^Coronary artery"
    brain = load_task_table("brain")
    assert brain.values == [2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28,
                            41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60]
    putamen = brain[12]
    assert putamen.name == "Left-Putamen" and putamen.color_rgb == (236, 13, 176)
    assert putamen.terminology_tag() == ("Segmentation category and type - DICOM master list~"
                                         "SCT^123037004^Anatomical Structure~SCT^89278009^Putamen~"
                                         "SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^")
    assert brain[51].type_modifier == "SCT^24028007^Right" and brain[16].type_modifier == ""
    assert all(lab.name.startswith("Left-") == (lab.type_modifier == "SCT^7771000^Left") for lab in brain)


def test_from_values_accepts_other_aseg_subsets_and_refuses_unknown_values():
    t = LabelTable.from_values([0, 44, 5, 17, 26, 63])
    assert t.values == [5, 17, 26, 44, 63]
    assert t[5].name == "Left-Inf-Lat-Vent" and t[26].type == "SCT^427667007^Nucleus accumbens"
    with pytest.raises(LabelError, match=r"\[999\] are not in the bundled tables.*write a .tsv label table"):
        LabelTable.from_values([2, 999])
    with pytest.raises(LabelError, match="unknown task 'liver'"):
        load_task_table("liver")


def test_custom_table_file_round_trip_and_errors(tmp_path):
    table = LabelTable("mine", [Label(7, "Tumour", (255, 0, 0), "SCT^49755003^Morphologically Altered Structure",
                                      "SCT^108369006^Neoplasm", "")])
    path = tmp_path / "mine.tsv"
    path.write_text("# my labels\n" + table.to_tsv())
    loaded = LabelTable.load(path)
    assert loaded.name == "mine" and loaded.labels == table.labels
    path.write_text("value\tname\tr\tg\tb\tcategory\ttype\ttype_modifier\n3\tX\t1\t2\t3\tSCT^1^A\tnot-a-code\t\n")
    with pytest.raises(LabelError, match="column 'type' must be a code 'scheme\\^value\\^meaning'"):
        LabelTable.load(path)
    with pytest.raises(LabelError, match="not found: pass one of"):
        LabelTable.load("no-such-table")
