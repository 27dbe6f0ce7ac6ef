"""`gvsl demo` (the README's first command) end to end, at toy size so it runs in seconds."""
import json

from gvsl.cli import main as gvsl_main


def test_demo_end_to_end_writes_summary_and_pictures(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = gvsl_main(["demo", "--out", str(out), "--n", "3", "--size", "32", "--steps", "2", "--crop", "32", "--refine", "10",
                    "--finetune-steps", "2",
                    "--device", "cpu", "--progress", "none"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "# GVSL demo summary" in printed and "pre-trained network" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrain"]["step"] == 2 and summary["pretrain"]["lr"] == 1e-4
    for run in ("registration_pretrained", "registration_untrained"):
        metrics = summary[run]
        assert metrics["ncc_before"] is not None and -1 <= metrics["ncc_after"] <= 1
        assert 0 <= metrics["dice_mean_before"] <= 1 and 0 <= metrics["dice_mean_after"] <= 1
    for picture in summary["pictures"]:
        with open(picture, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for name in ("warped.nii.gz", "composite.h5", "metrics.json", "overview.png"):
        assert (out / "register-pretrained" / name).exists()
    assert (out / "summary.md").read_text(encoding="utf-8").startswith("# GVSL demo summary")
    seg = summary["segmentation"]
    assert seg["steps"] == 2 and set(seg["dice"]) == {
        "Left ventricle myocardium", "Left atrium blood cavity", "Left ventricle blood cavity",
        "Right atrium blood cavity", "Right ventricle blood cavity", "Ascending aorta", "Pulmonary artery"}
    assert (out / "segment" / "prediction.seg.nrrd").exists() and seg["picture"] in summary["pictures"]
    assert "Segmentation of the held-out phantom" in printed
