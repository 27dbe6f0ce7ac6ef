"""Evidence: does GVSL pre-training help registration of held-out scans, before and after refinement?

Held-out heart phantoms (seeds never used for training) are registered onto training phantoms
with (a) a pre-trained GVSL checkpoint and (b) the same architecture with random weights
(seed 0), each as the network's own prediction and after ``--refine`` steps of test-time
refinement (:mod:`gvsl.refine`). Reported per network: mean +- sd over the pairs of the mean
label Dice (7 heart structures) and of the global NCC, before registration, network only, and
refined; plus the paired difference pre-trained - untrained.

The checkpoint is typically the one ``gvsl demo`` trains (``demo-output/pretrain/gvsl_final.pt``,
trained on ``demo-output/data/images``); or pre-train one here with ``--pretrain-steps``:

    python Testing/Benchmarks/evidence_registration.py --checkpoint demo-output/pretrain/gvsl_final.pt \
        --train-images demo-output/data/images [--held-out 3] [--fixed 2] [--refine 150]
    python Testing/Benchmarks/evidence_registration.py --pretrain-steps 200 --out /tmp/evidence

Not a test: it runs for minutes; say plainly what the numbers show.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from gvsl import phantoms
from gvsl import registration as R
from gvsl.checkpoint import load_model
from gvsl.network import GVSL, ModelConfig
from gvsl.progress import json_safe


def _stats(values) -> str:
    v = np.array([x for x in values if x is not None], dtype=float)
    return "n/a" if v.size == 0 else f"{v.mean():.3f} +- {v.std():.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="pre-trained GVSL checkpoint (else pre-train one with --pretrain-steps)")
    ap.add_argument("--train-images", help="the folder of images the checkpoint was trained on (fixed images)")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--held-out", type=int, default=3, help="new held-out phantoms (moving images)")
    ap.add_argument("--fixed", type=int, default=2, help="training phantoms used as fixed images")
    ap.add_argument("--refine", type=int, default=150)
    ap.add_argument("--out", default=None, help="working folder (default: a temp folder)")
    ap.add_argument("--json", help="write the per-pair numbers here")
    args = ap.parse_args(argv)
    work = Path(args.out or tempfile.mkdtemp(prefix="gvsl-evidence-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        train_dir = Path(args.train_images)
    else:
        from gvsl.train import PretrainConfig, pretrain
        train = phantoms.write_phantoms("heart", 6, args.size, 0, work / "train")
        train_dir = work / "train" / "images"
        summary = pretrain(PretrainConfig(images=[str(p) for p in train], out=str(work / "pretrain"), preset="ct",
                                          steps=args.pretrain_steps, batch_size=1, crop=min(48, args.size),
                                          lr=1e-4, device="cpu", seed=0, save_every=args.pretrain_steps,
                                          progress="none"))
        ckpt = Path(summary["checkpoint"])
    trained = load_model(ckpt, "cpu")
    torch.manual_seed(0)
    untrained = GVSL(ModelConfig.from_dict(trained.config.to_dict())).eval()  # same architecture, random weights
    untrained.info = {"preprocessing": {"preset": "ct"}}
    fixed_paths = sorted(train_dir.glob("*.nii.gz"))[:args.fixed]
    labels_dir = train_dir.parent / "labels"
    held = phantoms.write_phantoms("heart", args.held_out, sitk.ReadImage(str(fixed_paths[0])).GetSize()[0],
                                   777, work / "held-out")
    rows = []
    for mpath in held:
        moving = sitk.ReadImage(str(mpath))
        moving_labels = sitk.ReadImage(str(mpath.parent.parent / "labels" / mpath.name))
        for fpath in fixed_paths:
            fixed = sitk.ReadImage(str(fpath))
            fixed_labels = sitk.ReadImage(str(labels_dir / fpath.name))
            row = {"moving": f"held-out/{mpath.name}", "fixed": f"train/{fpath.name}"}
            for name, model in (("pretrained", trained), ("untrained", untrained)):
                res = R.register(fixed, moving, model, "cpu", fixed_labels=fixed_labels, moving_labels=moving_labels,
                                 refine=args.refine)
                m = res.metrics
                row[name] = {"dice_before": m["dice_before"]["mean"], "dice_network": m["dice_network"]["mean"],
                             "dice_refined": m["dice_after"]["mean"], "ncc_before": m["ncc_before"],
                             "ncc_network": m["ncc_network"], "ncc_refined": m["ncc_after"],
                             "folding_network": m["folding_percent_network"], "folding_refined": m["folding_percent"]}
            rows.append(row)
            print(json.dumps(json_safe(row)), flush=True)

    print(f"\ncheckpoint {ckpt}; {len(rows)} held-out pairs; refinement {args.refine} steps; "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| network | Dice before | Dice network | Dice refined | NCC network | NCC refined | folding % refined |")
    print("|---|---|---|---|---|---|---|")
    for name in ("untrained", "pretrained"):
        col = lambda k: [r[name][k] for r in rows]  # noqa: E731
        print(f"| {name} | {_stats(col('dice_before'))} | {_stats(col('dice_network'))} | "
              f"{_stats(col('dice_refined'))} | {_stats(col('ncc_network'))} | {_stats(col('ncc_refined'))} | "
              f"{_stats(col('folding_refined'))} |")
    for k in ("dice_network", "dice_refined"):
        d = [r["pretrained"][k] - r["untrained"][k] for r in rows]
        print(f"paired difference pre-trained - untrained, {k}: {_stats(d)} "
              f"(pre-trained better in {sum(x > 0 for x in d)}/{len(d)} pairs)")
    if args.json:
        Path(args.json).write_text(json.dumps(json_safe({"checkpoint": str(ckpt), "rows": rows}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
