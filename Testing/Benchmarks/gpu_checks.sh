#!/usr/bin/env bash
# All GPU checks and benchmarks in one call, for a session that is lent a CUDA machine.
#
# The lent machine has PyTorch but neither SimpleITK nor MONAI: download their wheels here first
# (see the device tool's README: `pip download --no-deps --only-binary=:all: --python-version 3.12
# ... -d .whl SimpleITK==2.5.* monai==1.6.*`, plus any missing dependency), then run this with
# `.whl` carried:   bash Testing/Benchmarks/gpu_checks.sh
# Logs go to $OUT (or ./gpu-checks when OUT is unset). Exits non-zero on the first failed check.
# GVSL_DEVICE=cpu GVSL_SIZE=48 GVSL_SKIP_BENCH=1 runs the same logic on a CPU (to check the script).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu-checks}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/GVSLExtension:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
DEV="${GVSL_DEVICE:-cuda}"; S="${GVSL_SIZE:-96}"
py() { python3 "$@"; }
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "1. device and precision"
py -m gvsl info --device "$DEV" | tee "$OUT/info.json"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/summary.txt"
fi

log "2. CUDA smoke: phantoms -> pre-train 3 steps (bf16) -> resume to 5 -> register"
W=$(mktemp -d)
py -m gvsl phantom --kind heart --n 3 --size "$S" --seed 0 --out "$W/data" --progress none
py -m gvsl pretrain --images "$W/data/images" --out "$W/run" --steps 3 --crop "$S" --batch-size 2 \
   --device "$DEV" --save-every 0 --progress json > "$OUT/pretrain.jsonl"
py -m gvsl pretrain --images "$W/data/images" --out "$W/run" --steps 5 --crop "$S" --batch-size 2 \
   --device "$DEV" --resume --progress json > "$OUT/pretrain_resume.jsonl"
grep -q '"event": "done"' "$OUT/pretrain_resume.jsonl"
imgs=("$W"/data/images/*.nii.gz)
py -m gvsl register --fixed "${imgs[0]}" --moving "${imgs[1]}" --model "$W/run/gvsl_final.pt" \
   --fixed-labels "$W/data/labels/$(basename "${imgs[0]}")" --moving-labels "$W/data/labels/$(basename "${imgs[1]}")" \
   --out "$OUT/register" --device "$DEV" --progress json > "$OUT/register.jsonl"
py - "$OUT/register/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
import os
assert m["device"].startswith(os.environ.get("GVSL_DEVICE", "cuda")), m["device"]
print("register on", m["device"], m["precision"], "NCC", m["ncc_before"], "->", m["ncc_after"])
PY

log "3. bf16 vs fp32 registration on the GPU (same model, same pair)"
py -m gvsl register --fixed "${imgs[0]}" --moving "${imgs[1]}" --model "$W/run/gvsl_final.pt" \
   --out "$OUT/register_fp32" --device "$DEV" --precision fp32 --no-overview --progress none
py - "$OUT/register/displacement.nii.gz" "$OUT/register_fp32/displacement.nii.gz" <<'PY' | tee -a "$OUT/summary.txt"
import sys, numpy as np, SimpleITK as sitk
a, b = (sitk.GetArrayFromImage(sitk.ReadImage(p)) for p in sys.argv[1:3])
print(f"bf16 vs fp32 total displacement: max {np.abs(a - b).max():.4f} mm, mean {np.abs(a - b).mean():.5f} mm")
PY

log "3b. refinement on the GPU (default steps for the device), network-only vs refined"
py -m gvsl register --fixed "${imgs[0]}" --moving "${imgs[1]}" --model "$W/run/gvsl_final.pt" \
   --fixed-labels "$W/data/labels/$(basename "${imgs[0]}")" --moving-labels "$W/data/labels/$(basename "${imgs[1]}")" \
   --out "$OUT/register_refined" --device "$DEV" --refine auto --no-overview --progress none
py - "$OUT/register_refined/metrics.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
m = json.load(open(sys.argv[1]))
r = m.get("refine") or {}
print(f"refine {r.get('steps')} steps in {r.get('seconds')} s on {m['device']}: Dice {m['dice_network']['mean']:.3f} -> "
      f"{m['dice_after']['mean']:.3f}, NCC {m['ncc_network']:.3f} -> {m['ncc_after']:.3f}, folding {m['folding_percent']:.3f} %")
PY

log "3c. segmentation on the GPU: fine-tune (autocast) -> resume -> segment -> evaluate"
py -m gvsl finetune --task heart --images "$W/data/images" --labels "$W/data/labels" --out "$W/seg" \
   --steps 10 --crop "$S" --val-every 5 --save-every 5 --device "$DEV" --progress json > "$OUT/finetune.jsonl"
py -m gvsl finetune --task heart --images "$W/data/images" --labels "$W/data/labels" --out "$W/seg" \
   --steps 20 --crop "$S" --val-every 5 --save-every 5 --device "$DEV" --resume --progress json > "$OUT/finetune_resume.jsonl"
grep -q '"event": "done"' "$OUT/finetune_resume.jsonl"
py -m gvsl segment --model "$W/seg/seg_best.pt" --image "${imgs[0]}" --out "$OUT/segment/labels.nii.gz" \
   --device "$DEV" --progress none | tee "$OUT/segment.json"
py -m gvsl evaluate --pred "$OUT/segment/labels.nii.gz" --truth "$W/data/labels/$(basename "${imgs[0]}")" \
   --task heart --json "$OUT/segment/evaluate.json" | tee -a "$OUT/summary.txt"

if [ -n "${GVSL_SKIP_BENCH:-}" ]; then log "benchmarks skipped"; exit 0; fi
log "4. benchmarks"
py Testing/Benchmarks/bench_engine.py --device "$DEV" --size 128 --repeats 5 | tee "$OUT/bench_engine.txt"
py Testing/Benchmarks/bench_pretrain.py --device "$DEV" --sizes 64 96 128 --batch-size 2 --repeats 5 | tee "$OUT/bench_pretrain.txt"
py Testing/Benchmarks/bench_register.py --device "$DEV" --skip-sitk | tee "$OUT/bench_register.txt"
py Testing/Benchmarks/bench_segment.py --device "$DEV" | tee "$OUT/bench_segment.txt"
log "all GPU checks passed"
