"""Evidence: does GVSL pre-training help segmentation? Same phantom data, same budget, four runs.

GVSL-pretrained vs scratch, each with ``finetune`` (all weights) and ``linear`` (frozen backbone),
Dice per structure on held-out heart phantoms (``gvsl evaluate``'s metrics). Reduced width and
tiny phantoms so that it runs in minutes on a CPU; the numbers are what they are (print them,
do not tune them). Run from the repository root:

    PYTHONPATH=GVSLExtension python Testing/Benchmarks/evidence_finetune.py [--size 32] [--pretrain-steps 80]
        [--steps 200] [--out /tmp/gvsl-evidence]

Fine-tuning recipe (gvsl.segtrain's: foreground batch Dice + cross-entropy, head started at the
class frequencies): batch 2 of ``--crop`` (default 32 = the whole 32^3 phantom, so every step sees
every structure), Adam lr 3e-3 with the poly schedule, validation every steps/4 on one labelled case, best checkpoint.

Writes ``<out>/evidence.json`` and prints a table (structures x runs).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

WIDTH = [8, 16, 16, 32, 32, 16, 16, 8, 8]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n-unlabelled", type=int, default=6)
    ap.add_argument("--n-train", type=int, default=2)
    ap.add_argument("--n-test", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=80)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="/tmp/gvsl-evidence")
    args = ap.parse_args(argv)

    from gvsl.phantoms import write_phantoms
    from gvsl.segeval import evaluate
    from gvsl.seginfer import segment
    from gvsl.segtrain import finetune
    from gvsl.train import PretrainConfig, pretrain

    out = Path(args.out)
    t0 = time.perf_counter()
    n_lab = args.n_train + 1 + args.n_test
    write_phantoms("heart", args.n_unlabelled, args.size, 7, out / "unlabelled")
    write_phantoms("heart", n_lab, args.size, 8, out / "labelled")
    imgs = sorted((out / "labelled" / "images").iterdir())
    labs = sorted((out / "labelled" / "labels").iterdir())
    train = (imgs[:args.n_train], labs[:args.n_train])
    val = (imgs[args.n_train:args.n_train + 1], labs[args.n_train:args.n_train + 1])
    test = list(zip(imgs[args.n_train + 1:], labs[args.n_train + 1:]))
    print(f"phantoms written ({time.perf_counter() - t0:.0f} s)", flush=True)

    t = time.perf_counter()
    pre = pretrain(PretrainConfig(images=[str(out / "unlabelled" / "images")], out=str(out / "pretrain"),
                                  steps=args.pretrain_steps, batch_size=2, crop=args.crop, lr=1e-3, device="cpu",
                                  save_every=0, progress="none", model_channels=WIDTH))
    print(f"pre-training: {pre['step']} steps in {time.perf_counter() - t:.0f} s, loss "
          f"{pre.get('loss_first', float('nan')):.4f} -> {pre.get('loss_last', float('nan')):.4f}", flush=True)
    runs = {}
    for init in ("gvsl", "scratch"):
        for mode in ("finetune", "linear"):
            name = f"{init}-{mode}"
            t = time.perf_counter()
            summary = finetune(task="heart", images=[str(p) for p in train[0]], labels=[str(p) for p in train[1]],
                               val_images=[str(p) for p in val[0]], val_labels=[str(p) for p in val[1]],
                               out=str(out / name), pretrained=pre["checkpoint"] if init == "gvsl" else None,
                               mode=mode, steps=args.steps, crop=args.crop, batch_size=2, lr=args.lr, lr_schedule="poly",
                               validate_every=max(args.steps // 4, 1), save_every=0, device="cpu", progress="none",
                               model_channels=None if init == "gvsl" else WIDTH, seed=0)
            model_path = (summary.get("best") or {}).get("checkpoint") or summary["checkpoint"]
            per = {}
            for img, lab in test:
                res = evaluate(segment(sitk.ReadImage(str(img)), model_path, "cpu").labels, sitk.ReadImage(str(lab)),
                               "heart")
                for s, m in res["structures"].items():
                    per.setdefault(s, []).append(m["dice"] if m["dice"] is not None else np.nan)
            runs[name] = {"dice": {s: float(np.nanmean(v)) for s, v in per.items()},
                          "seconds": round(time.perf_counter() - t, 1), "best_val": summary.get("best"),
                          "loss_first": summary.get("loss_first"), "loss_last": summary.get("loss_last")}
            runs[name]["mean"] = float(np.nanmean(list(runs[name]["dice"].values())))
            print(f"{name}: mean test Dice {runs[name]['mean']:.3f} ({runs[name]['seconds']:.0f} s)", flush=True)
    structures = list(next(iter(runs.values()))["dice"])
    print(f"\nDice on {len(test)} held-out {args.size}^3 heart phantoms, {args.steps} steps, width {WIDTH}, "
          f"pre-training {args.pretrain_steps} steps on {args.n_unlabelled} unlabelled phantoms")
    print(f"{'structure':<30}" + "".join(f"{n:>17}" for n in runs))
    for s in structures + ["mean"]:
        vals = [r["mean"] if s == "mean" else r["dice"][s] for r in runs.values()]
        print(f"{s:<30}" + "".join(f"{v:>17.3f}" for v in vals))
    result = {"settings": vars(args), "width": WIDTH, "pretrain": {k: pre.get(k) for k in ("step", "loss_first", "loss_last")},
              "runs": runs, "total_seconds": round(time.perf_counter() - t0, 1)}
    (out / "evidence.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwritten {out / 'evidence.json'} ({result['total_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
