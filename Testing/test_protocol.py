"""``gvsl protocol``: dataset layouts (MM-WHS, ASOCA, CANDI, plain) on phantoms, seeded splits,
clear layout errors, an end-to-end CLI run with a tiny pre-trained checkpoint (every init x mode
row in the report), skip-on-rerun, cancel + resume. Tiny phantoms (32^3), tiny network, few steps."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from gvsl.cli import main as gvsl_main
from gvsl.datasets import DatasetLayoutError, SplitError, asoca_remap, detect_layouts, read_dataset
from gvsl.labels import LabelTable, load_task_table
from gvsl.phantoms import make_brain_phantom, make_heart_phantom
from gvsl.progress import CancelToken
from gvsl.protocol import ProtocolError, init_names, make_splits, parse_split, run_protocol

CHANNELS = [8, 8, 16, 16, 32, 16, 16, 8, 8]
TINY = dict(steps=2, crop=16, batch_size=1, lr=3e-3, val_every=2, device="cpu", progress="none",
            model_channels=CHANNELS)


@pytest.fixture(autouse=True)
def _fast_training_curves(monkeypatch):
    """The trainer's loss/validation curve PNGs (tested in test_trainer/test_seg_finetune) take ~1 s
    each with matplotlib; this file checks the protocol, so they become a minimal valid PNG."""
    from gvsl import pictures
    from gvsl.fsio import atomic_write_bytes
    png = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x00\x00\x00\x00:~\x9bU"
           b"\x00\x00\x00\nIDATx\x9cc`\x00\x00\x00\x02\x00\x01H\xaf\xa4q\x00\x00\x00\x00IEND\xaeB`\x82")
    monkeypatch.setattr(pictures, "loss_curve", lambda history, steps, path, title="": atomic_write_bytes(path, png))


@pytest.fixture(scope="module")
def phantoms():
    heart = [make_heart_phantom(32, 50 + i) for i in range(4)]
    brain = [make_brain_phantom(32, 60 + i) for i in range(3)]
    return {"heart": heart, "brain": brain}


def _write(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def make_mmwhs(root, heart, n=4):
    for i in range(n):
        ct, lab, _ = heart[i]
        folder = root / "ct_train"
        _write(ct, folder / f"ct_train_{1001 + i}_image.nii.gz")
        _write(lab, folder / f"ct_train_{1001 + i}_label.nii.gz")
    return root


def make_plain(root, heart, n=4):
    for i in range(n):
        ct, lab, _ = heart[i]
        _write(ct, root / "images" / f"case{i}.nii.gz")
        _write(lab, root / "labels" / f"case{i}.nii.gz")
    return root


def make_asoca(root, heart):
    for i, (group, k) in enumerate([("Normal", 1), ("Normal", 2), ("Diseased", 1)]):
        ct, _, cor = heart[i]
        _write(ct, root / group / "CTCA" / f"{group}_{k}.nrrd")
        _write(cor, root / group / "Annotations" / f"{group}_{k}.nrrd")
    return root


def make_candi(root, brain):
    for i, group in enumerate(["HC", "SS", "BPDwithPsy"]):
        t1, seg = brain[i]
        arr = sitk.GetArrayFromImage(seg)
        arr[:2, :2, :2] = 77  # a FreeSurfer label outside the 28 of the brain table (WM-hypointensities)
        seg2 = sitk.GetImageFromArray(arr)
        seg2.CopyInformation(seg)
        sid = f"{group}_{i:03d}"
        _write(t1, root / group / sid / f"{sid}_procimg.nii.gz")
        _write(seg2, root / group / sid / f"{sid}_seg.nii.gz")
    return root


def test_each_layout_is_detected_and_read(phantoms, tmp_path):
    mm = make_mmwhs(tmp_path / "mmwhs" / "MM-WHS 2017 Dataset", phantoms["heart"])
    _write(phantoms["heart"][0][0], mm / "ct_test" / "ct_test_2001_image.nii.gz")  # test labels withheld
    ds = read_dataset(tmp_path / "mmwhs")
    assert ds.layout == "mmwhs" and [c[0] for c in ds.cases] == [f"ct_train_{1001 + i}" for i in range(4)]
    assert all(c[2].name == f"{c[0]}_label.nii.gz" for c in ds.cases)
    assert any("ct_test" in n for n in ds.notes)
    asoca = make_asoca(tmp_path / "asoca", phantoms["heart"])
    _write(phantoms["heart"][3][0], asoca / "Testset" / "CTCA" / "Test_1.nrrd")  # released without annotations
    ds = read_dataset(asoca, task="coronary")
    assert ds.layout == "asoca" and [c[0] for c in ds.cases] == ["Diseased_1", "Normal_1", "Normal_2"]
    assert any("Testset" in n and "left out" in n for n in ds.notes)
    assert ds.cases[1][2].parts[-2:] == ("Annotations", "Normal_1.nrrd") and ds.remap == {}
    ds = read_dataset(make_candi(tmp_path / "candi", phantoms["brain"]))
    assert ds.layout == "candi" and ds.ignore_unknown and [c[0] for c in ds.cases] == \
        ["BPDwithPsy_002", "HC_000", "SS_001"]
    assert any("background" in n for n in ds.notes)
    ds = read_dataset(make_plain(tmp_path / "plain", phantoms["heart"]))
    assert ds.layout == "plain" and [c[0] for c in ds.cases] == ["case0", "case1", "case2", "case3"]
    assert not ds.ignore_unknown
    # ASOCA's binary 1 maps onto a coronary table whose value differs; the real table holds 1
    assert asoca_remap(load_task_table("coronary")) == {}
    other = LabelTable.parse("value\tname\tr\tg\tb\tcategory\ttype\ttype_modifier\n"
                             "255\tArtery\t200\t0\t0\tSCT^123037004^Anatomical Structure\tSCT^41801008^Coronary artery\t\n",
                             "cor255")
    assert asoca_remap(other) == {1: 255}


def test_wrong_layouts_name_the_expected_files(phantoms, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(DatasetLayoutError) as e:
        read_dataset(tmp_path / "empty")
    msg = str(e.value)
    for expected in ("ct_train_1001_image.nii.gz", "Normal/CTCA/Normal_1.nrrd", "_procimg.nii.gz", "images/"):
        assert expected in msg
    mm = make_mmwhs(tmp_path / "mm", phantoms["heart"], n=2)
    (mm / "ct_train" / "ct_train_1002_label.nii.gz").unlink()
    with pytest.raises(DatasetLayoutError, match=r"ct_train_1002_image.nii.gz has no label map; expected "
                                                 r"ct_train_1002_label.nii.gz"):
        read_dataset(tmp_path / "mm")
    _write(phantoms["heart"][0][1], mm / "ct_train" / "ct_train_1009_label.nii.gz")
    (mm / "ct_train" / "ct_train_1002_image.nii.gz").unlink()
    with pytest.raises(DatasetLayoutError, match=r"ct_train_1009_label.nii.gz has no image; expected "
                                                 r"ct_train_1009_image.nii.gz"):
        read_dataset(tmp_path / "mm", layout="mmwhs")
    asoca = make_asoca(tmp_path / "asoca", phantoms["heart"])
    (asoca / "Normal" / "Annotations" / "Normal_2.nrrd").unlink()
    with pytest.raises(DatasetLayoutError, match=r"Normal_2.nrrd has no annotation; expected .*Annotations/Normal_2.nrrd"):
        read_dataset(asoca)
    candi = make_candi(tmp_path / "candi", phantoms["brain"])
    (candi / "HC" / "HC_000" / "HC_000_procimg.nii.gz").unlink()
    with pytest.raises(DatasetLayoutError, match=r"HC_000_seg.nii.gz has no image; expected .*HC_000_procimg.nii.gz"):
        read_dataset(candi)
    plain = make_plain(tmp_path / "plain", phantoms["heart"], n=2)
    (plain / "labels" / "case1.nii.gz").unlink()
    with pytest.raises(DatasetLayoutError, match=r"case1.nii.gz has no label map; expected .*labels/case1.nii.gz"):
        read_dataset(plain)
    with pytest.raises(DatasetLayoutError, match=r"plain layout: .*images is not a folder"):
        read_dataset(tmp_path / "asoca", layout="plain")
    assert detect_layouts(tmp_path / "asoca") == ["asoca"]


def test_splits_are_seeded_reproducible_and_checked():
    cases = [(f"c{i}", f"/d/c{i}_img.nii.gz", f"/d/c{i}_lab.nii.gz") for i in range(25)]
    a, b = make_splits(cases, "15/5/rest", 0), make_splits(list(reversed(cases)), "15/5/rest", 0)
    assert a == b and a["counts"] == {"train": 15, "val": 5, "test": 5, "unused": 0}
    ids = [e["id"] for k in ("train", "val", "test") for e in a[k]]
    assert sorted(ids) == sorted(c[0] for c in cases) and len(set(ids)) == 25
    c = make_splits(cases, "15/5/rest", 1)
    assert [e["id"] for e in c["test"]] != [e["id"] for e in a["test"]]
    d = make_splits(cases, "15/5/3", 0)
    assert d["counts"] == {"train": 15, "val": 5, "test": 3, "unused": 2}
    assert parse_split("40/20/43") == (40, 20, 43) and parse_split("2/0/rest") == (2, 0, None)
    with pytest.raises(SplitError, match=r"the split 15/5/rest needs 21 cases .* but --data holds 8; pass --split"):
        make_splits(cases[:8], "15/5/rest", 0)
    with pytest.raises(SplitError, match=r"15/5/20 needs 40 cases"):
        make_splits(cases, "15/5/20", 0)
    for bad in ("15/5", "a/b/c", "0/1/1", "1/1/0"):
        with pytest.raises(SplitError):
            parse_split(bad)
    assert [n for n, _ in init_names(["/a/gvsl_final.pt", "/b/gvsl_final.pt", "/c/scratch.pt"])] == \
        ["a-gvsl_final", "b-gvsl_final", "scratch-pretrained", "scratch"]


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory, phantoms):
    from gvsl.train import PretrainConfig, pretrain
    root = tmp_path_factory.mktemp("pre")
    files = []
    for i in range(2):
        files.append(str(root / f"v{i}.nii.gz"))
        sitk.WriteImage(phantoms["heart"][i][0], files[-1])
    out = root / "run"
    pretrain(PretrainConfig(images=files, out=str(out), steps=2, batch_size=1, crop=16, device="cpu",
                            progress="none", model_channels=CHANNELS, save_every=0))
    return out / "gvsl_final.pt"


def test_cli_end_to_end_writes_the_report_and_a_rerun_skips(phantoms, tiny_pretrained, tmp_path, capsys):
    data = make_mmwhs(tmp_path / "MM-WHS", phantoms["heart"])
    out = tmp_path / "protocol"
    argv = ["protocol", "--task", "heart", "--data", str(data), "--out", str(out), "--pretrained", str(tiny_pretrained),
            "--split", "2/1/1", "--steps", "2", "--val-every", "2", "--crop", "16", "--batch-size", "1", "--lr", "0.003",
            "--lr-schedule", "poly", "--spacing", "1.5",
            "--model-channels", *map(str, CHANNELS), "--device", "cpu", "--progress", "json"]
    assert gvsl_main(argv) == 0, capsys.readouterr().err
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    stages = [e for e in events if e["task"] == "protocol" and e["event"] == "stage" and e["stage"] == "run"]
    assert [e["run"] for e in stages] == ["gvsl_final-finetune", "gvsl_final-linear", "scratch-finetune", "scratch-linear"]
    assert any(e["task"] == "finetune" and e["event"] == "step" for e in events)
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    assert splits["seed"] == 0 and splits["rule"] == "2/1/1" and splits["counts"]["test"] == 1
    again = make_splits(read_dataset(data).cases, "2/1/1", 0)
    assert all(splits[k] == json.loads(json.dumps(again[k])) for k in ("train", "val", "test"))
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "complete" and results["n_runs_done"] == 4
    test_id = splits["test"][0]["id"]
    table = load_task_table("heart")
    for run in results["runs"]:
        assert run["settings"]["steps"] == 2 and run["settings"]["model_channels"] == CHANNELS
        assert run["settings"]["lr_schedule"] == "poly" and run["settings"]["spacing_mm"] == 1.5
        assert set(run["dice_per_structure"]) <= set(table.names)
        case = run["cases"][test_id]
        # the recorded Dice equals an independent Dice of the written prediction vs the truth
        pred = sitk.GetArrayFromImage(sitk.ReadImage(case["prediction"]))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(splits["test"][0]["label"]))
        dices = []
        for lab in table:
            t, p = truth == lab.value, pred == lab.value
            if t.any():
                dices.append(2 * (t & p).sum() / (t.sum() + p.sum()))
                assert case["structures"][lab.name]["dice"] == pytest.approx(dices[-1], abs=1e-6)
        assert run["mean_dice"] == pytest.approx(np.mean(dices), abs=1e-6) and run["sd_dice"] == 0.0
    report = (out / "report.md").read_text(encoding="utf-8")
    for init, mode in [("gvsl_final", "finetune"), ("gvsl_final", "linear"), ("scratch", "finetune"),
                       ("scratch", "linear")]:
        assert f"| {init} | {mode} |" in report
    assert "The paper's numbers, for reference only" in report and "91.2" in report and "21.9" in report
    assert "2 steps" in report and "Left ventricle myocardium" in report
    assert "(poly)" in report and "grid spacing 1.5 mm" in report
    from gvsl.checkpoint import load_checkpoint
    assert load_checkpoint(out / "runs" / "scratch-finetune" / "seg_best.pt")["preprocessing"]["spacing_mm"] == 1.5
    png = (out / "dice_bars.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    before = (out / "runs" / "scratch-linear" / "results.json").read_text(encoding="utf-8")
    # a re-run skips every finished run (and says so)
    assert gvsl_main(argv) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [e["run"] for e in events if e.get("stage") == "skipped"] == [e["run"] for e in stages]
    assert not any(e["task"] == "finetune" for e in events)
    assert (out / "runs" / "scratch-linear" / "results.json").read_text(encoding="utf-8") == before
    # another split of the same folder is refused
    rc = gvsl_main([a if a != "2/1/1" else "1/1/2" for a in argv])
    assert rc == 2 and "another split" in capsys.readouterr().err


def test_asoca_and_candi_end_to_end_cancel_and_resume(phantoms, tmp_path):
    asoca = make_asoca(tmp_path / "ASOCA", phantoms["heart"])
    s = run_protocol(task="coronary", data=str(asoca), out=str(tmp_path / "cor"), split="1/1/1", modes="finetune",
                     **TINY)
    assert s["status"] == "done" and [r["run"] for r in s["runs"]] == ["scratch-finetune"]
    res = json.loads((tmp_path / "cor" / "results.json").read_text(encoding="utf-8"))
    assert set(res["runs"][0]["dice_per_structure"]) == {"Coronary arteries"}
    # a finished run made with other settings is not silently reused; --overwrite redoes it
    with pytest.raises(ProtocolError, match=r"other settings \(steps differ\): pass --overwrite"):
        run_protocol(task="coronary", data=str(asoca), out=str(tmp_path / "cor"), split="1/1/1", modes="finetune",
                     **{**TINY, "steps": 3})
    s = run_protocol(task="coronary", data=str(asoca), out=str(tmp_path / "cor"), split="1/1/1", modes="finetune",
                     overwrite=True, **{**TINY, "steps": 3})
    assert s["status"] == "done" and s["skipped"] == []
    run = json.loads((tmp_path / "cor" / "runs" / "scratch-finetune" / "results.json").read_text(encoding="utf-8"))
    assert run["settings"]["steps"] == 3 and json.loads(
        (tmp_path / "cor" / "runs" / "scratch-finetune" / "history.json").read_text(encoding="utf-8"))["step"] == [1, 2, 3]
    # CANDI: the extra FreeSurfer label becomes background; cancel in the first run, then resume
    candi = make_candi(tmp_path / "CANDI", phantoms["brain"])
    token = CancelToken()

    def stop(record):
        if record.get("task") == "finetune" and record.get("event") == "step" and record["step"] == 1:
            token.cancel("test")
    out = tmp_path / "brain"
    s = run_protocol(task="brain", data=str(candi), out=str(out), split="1/1/1", modes="linear", callback=stop,
                     cancel=token, **TINY)
    assert s["status"] == "cancelled" and s["runs"] == []
    assert (out / "runs" / "scratch-linear" / "seg_last.pt").exists()
    assert not (out / "runs" / "scratch-linear" / "results.json").exists()
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["status"] == "incomplete"
    assert "INCOMPLETE" in (out / "report.md").read_text(encoding="utf-8")
    records = []
    s = run_protocol(task="brain", data=str(candi), out=str(out), split="1/1/1", modes="linear",
                     callback=records.append, **TINY)
    assert s["status"] == "done" and s["skipped"] == []
    assert any(r.get("event") == "resumed" and r.get("step") == 1 for r in records)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| scratch | linear |" in report and "mapped to background" in report
    run = json.loads((out / "runs" / "scratch-linear" / "results.json").read_text(encoding="utf-8"))
    assert run["settings"]["ignore_unknown_labels"] is True
    assert next(iter(run["cases"].values()))["unknown_truth_voxels"] == 8
    with pytest.raises(ProtocolError, match="lies inside --data"):
        run_protocol(task="brain", data=str(candi), out=str(candi / "out"), split="1/1/1", **TINY)
    shutil.rmtree(out)


def test_help_names_the_layouts_and_the_paper_splits(capsys):
    with pytest.raises(SystemExit) as e:
        gvsl_main(["protocol", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for expected in ("ct_train_1001_image.nii.gz", "Normal/CTCA/Normal_1.nrrd", "_procimg.nii.gz", "images/<name>",
                     "15/5/rest", "15/5/20", "40/20/43", "--pretrained", "--modes", "report.md", "dice_bars.png"):
        assert expected in text, expected


def test_sigint_stops_cleanly_and_exits_130(phantoms, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path
    data = make_plain(tmp_path / "data", phantoms["heart"], n=3)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1] / "GVSLExtension"))
    cmd = [sys.executable, "-m", "gvsl", "protocol", "--task", "heart", "--data", str(data), "--out", str(out),
           "--split", "1/1/1", "--modes", "finetune", "--steps", "100000", "--val-every", "100000", "--crop", "16",
           "--batch-size", "1", "--model-channels", *map(str, CHANNELS), "--device", "cpu", "--progress", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if '"event": "step"' in line:
                proc.send_signal(signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert '"event": "cancelled"' in rest and '"stopped_by": "SIGINT"' in rest
    assert (out / "runs" / "scratch-finetune" / "seg_last.pt").exists()
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["status"] == "incomplete"
    assert not (out / ".gvsl.lock").exists()
