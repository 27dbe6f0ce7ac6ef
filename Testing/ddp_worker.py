"""Run under torchrun by test_train.py: a short DDP pre-training, then each rank records a
checksum of its weights so the test can compare the ranks.

argv: OUT IMAGES... ; env GVSL_TEST_MODE: "" (train 2 steps) or "nan" (rank 1 alone meets a
non-finite loss at step 2; every rank records the error it ended with)."""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from gvsl import io
from gvsl.train import PretrainConfig, Pretrainer, PretrainTask, TrainingError

out = Path(sys.argv[1])
images = sys.argv[2:]
mode = os.environ.get("GVSL_TEST_MODE", "")
rank = int(os.environ["RANK"])
cache = out / "cache"

# record how many cached volumes each rank finds when it starts loading (rank 0 first, then the others)
cache_seen = {}
original_load = io.load_volumes


def spy_load(*args, **kwargs):
    cache_seen["npy_before"] = len(list(cache.glob("*.npy"))) if cache.exists() else 0
    return original_load(*args, **kwargs)


io.load_volumes = spy_load

if mode == "nan":
    original_losses = PretrainTask.compute_losses

    def losses_nan_on_rank1(self, trainer, model):
        terms = original_losses(self, trainer, model)
        if trainer.dist.rank == 1 and trainer.step >= 1:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    PretrainTask.compute_losses = losses_nan_on_rank1

config = PretrainConfig(images=images, out=str(out), preset="ct", steps=2 if mode == "" else 5, batch_size=1,
                        crop=32, device="cpu", seed=3, save_every=0, progress="none",
                        model_channels=[8, 16, 32, 64, 128, 64, 32, 16, 8])
trainer = Pretrainer(config)
record = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
          "npy_before_load": cache_seen.get("npy_before")}
try:
    summary = trainer.run()
except TrainingError as exc:
    record.update(error=str(exc), collective=exc.collective)
digest = hashlib.sha256()
for name, tensor in trainer.model.state_dict().items():
    digest.update(name.encode())
    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
record.update(sha256=digest.hexdigest(), step=trainer.step, losses=trainer.history["loss"])
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
dist.destroy_process_group()
