"""Run under torchrun by test_seg_ddp.py: a short DDP fine-tuning (validation on rank 0 every
step, while the other rank waits), then each rank records a checksum of its weights.

argv: OUT ROOT (ROOT holds images/ and labels/ of three heart phantoms h0..h2)."""
import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

from gvsl.segtrain import FinetuneConfig, FinetuneTask
from gvsl.trainer import Trainer

out, root = Path(sys.argv[1]), Path(sys.argv[2])
config = FinetuneConfig(
    task="heart", images=[str(root / "images" / f"h{i}.nii.gz") for i in (0, 1)],
    labels=[str(root / "labels" / f"h{i}.nii.gz") for i in (0, 1)],
    val_images=[str(root / "images" / "h2.nii.gz")], val_labels=[str(root / "labels" / "h2.nii.gz")],
    out=str(out), steps=3, crop=16, batch_size=1, lr=3e-3, validate_every=1, save_every=0, progress="none",
    device="cpu", seed=5, model_channels=[8, 8, 8, 8, 16, 8, 8, 8, 8])
trainer = Trainer(FinetuneTask(), config)
summary = trainer.run()
digest = hashlib.sha256()
for name, tensor in trainer.model.state_dict().items():
    digest.update(name.encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
record = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
          "sha256": digest.hexdigest(), "step": trainer.step, "losses": trainer.history["loss"],
          "status": summary.get("status"), "best": summary.get("best")}
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record, default=str))
dist.destroy_process_group()
