"""Run under torchrun by test_train.py: a short DDP pre-training, then each rank records a
checksum of its weights so the test can compare the ranks."""
import hashlib
import json
import sys
from pathlib import Path

import torch.distributed as dist

from gvsl.train import PretrainConfig, Pretrainer

out = Path(sys.argv[1])
images = sys.argv[2:]
config = PretrainConfig(images=images, out=str(out), preset="ct", steps=2, batch_size=1, crop=32,
                        device="cpu", seed=3, save_every=0, progress="none",
                        model_channels=[8, 16, 32, 64, 128, 64, 32, 16, 8])
trainer = Pretrainer(config)
summary = trainer.run()
digest = hashlib.sha256()
for name, tensor in trainer.model.state_dict().items():
    digest.update(name.encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
record = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
          "sha256": digest.hexdigest(), "step": trainer.step, "losses": trainer.history["loss"]}
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
dist.destroy_process_group()
