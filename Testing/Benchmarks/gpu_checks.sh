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

if [ -n "${GVSL_SKIP_BENCH:-}" ]; then log "benchmarks skipped"; exit 0; fi
log "4. benchmarks"
py Testing/Benchmarks/bench_engine.py --device "$DEV" --size 128 --repeats 5 | tee "$OUT/bench_engine.txt"
py Testing/Benchmarks/bench_pretrain.py --device "$DEV" --sizes 64 96 128 --batch-size 2 --repeats 5 | tee "$OUT/bench_pretrain.txt"
py Testing/Benchmarks/bench_register.py --device "$DEV" --skip-sitk | tee "$OUT/bench_register.txt"
log "all GPU checks passed"
