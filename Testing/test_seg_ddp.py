"""Fine-tuning under torchrun (gloo, 2 CPU ranks): the shared trainer core's DDP for the
segmentation task -- identical weights on both ranks, the same logged (all-reduced) losses,
validation and the best checkpoint on rank 0 only, without a rank left waiting."""
import json
import os
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk

from gvsl.checkpoint import load_checkpoint
from gvsl.phantoms import make_heart_phantom

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_gloo_finetune_two_ranks_agree(tmp_path):
    data = tmp_path / "data"
    for d in ("images", "labels"):
        (data / d).mkdir(parents=True)
    for i in range(3):
        ct, heart, _ = make_heart_phantom(32, 20 + i)
        sitk.WriteImage(ct, str(data / "images" / f"h{i}.nii.gz"))
        sitk.WriteImage(heart, str(data / "labels" / f"h{i}.nii.gz"))
    out = tmp_path / "ddp"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "GVSLExtension"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "Testing" / "ddp_finetune_worker.py"), str(out), str(data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)  # a hang ends here
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["backend"] == "gloo"
    assert r0["step"] == r1["step"] == 3 and r0["status"] == r1["status"] == "done"
    assert r0["sha256"] == r1["sha256"]
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 3
    best = load_checkpoint(out / "seg_best.pt")
    assert best["kind"] == "segmentation" and best["world_size"] == 2 and "dice_mean" in best["scores"]
    hist = json.loads((out / "history.json").read_text())
    assert hist["val_step"] == [1, 2, 3]
