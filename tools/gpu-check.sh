#!/usr/bin/env bash
# GPU readiness check (issue 25), at most 8 minutes on one GPU (each step has its own time limit: 130 + 100 +
# 45 + 60 + 2 x 70 = 475 s):
#   1. the CUDA tests (pytest -m cuda tests/test_cuda.py);
#   2. fp32 vs bf16 autocast training throughput of Conv-4 and ResNet-12 (fsl-bench perf train --device cuda);
#   3. one epoch of benchmarks/paper_tiny_imagenet.yaml's training setting (ResNet-12 at 64x64, batch 64, bf16,
#      CE and LSSKD) with images/s, on the full Tiny ImageNet archive when it is found, else on generated images
#      in the official archive layout (the epoch's images/s do not depend on pixel values).
#
# Usage: tools/gpu-check.sh OUT_DIR
#   Writes OUT_DIR/gpu-check.txt (a summary: one line per step, with its result or why it was skipped) and each
#   step's full output beside it (OUT_DIR/*.log, *.json). Exit code 0 when every step that ran passed.
# Settings (environment):
#   FSL_BENCH         the fsl-bench command (default: .venv/bin/fsl-bench, else fsl-bench on PATH)
#   PYTHON            the Python of that environment (default: .venv/bin/python, else python3)
#   TINY_IMAGENET_ZIP the full tiny-imagenet-200.zip (default: generated data, see above)
#   GPU_CHECK_DRY=1   check the script only: every step prints the command it would run and is skipped (CPU,
#                     seconds; tests/test_gpu_check.py runs it so)
# Without CUDA every CUDA step is skipped with a line saying so; the script still ends with exit code 0.
set -u -o pipefail

OUT=${1:?usage: tools/gpu-check.sh OUT_DIR}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/gpu-check.txt"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
FSL_BENCH=${FSL_BENCH:-$([ -x .venv/bin/fsl-bench ] && echo .venv/bin/fsl-bench || echo fsl-bench)}
read -r -a FSL <<< "$FSL_BENCH"  # a command of several words, e.g. "python -m fsl_lsskd.cli"
DRY=${GPU_CHECK_DRY:-0}
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }

: > "$SUMMARY"
say "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ "$DRY" = "1" ]; then
  CUDA="dry run"
  say "device: dry run (GPU_CHECK_DRY=1): nothing is run, every step is skipped"
else
  CUDA=$("$PYTHON" - <<'EOF' 2>/dev/null
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"yes {p.name} {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
else:
    print("no")
EOF
)
  [ -n "$CUDA" ] || CUDA="no"
  if [ "${CUDA%% *}" = "yes" ]; then
    say "device: ${CUDA#yes }"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$SUMMARY" 2>/dev/null || true
  else
    say "device: no CUDA GPU (torch.cuda.is_available() is False): the CUDA steps are skipped"
  fi
fi

# step NAME TIMEOUT_S COMMAND...: runs COMMAND (output in OUT/NAME.log) unless dry or without CUDA
step() {
  local name=$1 limit=$2
  shift 2
  if [ "$DRY" = "1" ]; then
    say "SKIP $name: dry run; would run: $*"
    return 0
  fi
  if [ "${CUDA%% *}" != "yes" ]; then
    say "SKIP $name: needs a CUDA GPU, none on this machine"
    return 0
  fi
  local t0=$SECONDS
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    say "PASS $name ($((SECONDS - t0)) s): $*"
  else
    local rc=$?
    FAILED=1
    say "FAIL $name (exit $rc after $((SECONDS - t0)) s; 124 = over ${limit} s): $* -- see $OUT/$name.log"
  fi
}

# 1. CUDA tests (about 1-2 min)
step cuda-tests 130 "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
[ -f "$OUT/cuda-tests.log" ] && tail -n 1 "$OUT/cuda-tests.log" | sed 's/^/  /' | tee -a "$SUMMARY"

# 2. fp32 vs bf16 throughput, Conv-4 and ResNet-12 at 32x32 (and the matmul peak in the same run)
step perf-train 100 "${FSL[@]}" perf train --synthetic 8192 --device cuda --precisions fp32,bf16 \
  --backbones conv4,resnet12 --methods ce,lsskd --batch-size 64 --steps 30 --warmup 5 --repeats 2 \
  --json-out "$OUT/perf-train.json"
[ -f "$OUT/perf-train.log" ] && grep -v '^$' "$OUT/perf-train.log" | sed 's/^/  /' | tee -a "$SUMMARY"

# 3. one epoch of paper_tiny_imagenet's setting (ResNet-12, 64x64, batch 64, bf16), CE and LSSKD
ARCHIVE=${TINY_IMAGENET_ZIP:-}
if [ -n "$ARCHIVE" ] && [ -f "$ARCHIVE" ]; then
  DATA_NOTE="the full archive $ARCHIVE"
  TRAIN_PER_CLASS=()
else
  ARCHIVE="$OUT/data/tiny-imagenet-200.zip"
  DATA_NOTE="generated images in the official layout ($ARCHIVE, 100 train + 5 val per class; set TINY_IMAGENET_ZIP for the real one)"
  TRAIN_PER_CLASS=(--train-per-class 100)
  if [ "$DRY" != "1" ] && [ "${CUDA%% *}" = "yes" ] && [ ! -f "$ARCHIVE" ]; then
    mkdir -p "$OUT/data"
    timeout 45 "$PYTHON" -c "from fsl_lsskd.data.fake import write_fake_tiny_imagenet as w; \
w('$OUT/data', per_class_train=100, per_class_val=5)" > "$OUT/data.log" 2>&1 || { FAILED=1; say "FAIL data: see $OUT/data.log"; }
  fi
fi
say "paper_tiny_imagenet epoch data: $DATA_NOTE"
# decoded once into OUT/cache, outside the epochs' time
step data-prepare 60 env FSL_BENCH_CACHE="$OUT/cache" "${FSL[@]}" data prepare tiny_imagenet --data "tiny_imagenet=$ARCHIVE" \
  "${TRAIN_PER_CLASS[@]}"
for METHOD in ce lsskd; do
  step "epoch-$METHOD" 70 env FSL_BENCH_CACHE="$OUT/cache" "${FSL[@]}" train --method "$METHOD" --backbone resnet12 \
    --data "tiny_imagenet=$ARCHIVE" "${TRAIN_PER_CLASS[@]}" --image-size 64 --batch-size 64 \
    --precision bf16 --device cuda --epochs 1 --val-n-episodes 0 --no-mlflow --no-export --out "$OUT/run-$METHOD"
  if [ -f "$OUT/run-$METHOD/model/model.json" ]; then
    "$PYTHON" - "$OUT/run-$METHOD/model/model.json" "$METHOD" <<'EOF' | tee -a "$SUMMARY"
import json, sys
h = json.load(open(sys.argv[1]))["history"][-1]
print(f"  {sys.argv[2]} resnet12 64x64 bf16 batch 64: 1 epoch, {h['images_per_s']:.0f} images/s, "
      f"{h['epoch_time_s']:.1f} s, loss {h['train_loss']:.4f}")
EOF
  fi
done

say "done: $([ $FAILED = 0 ] && echo 'every step that ran passed' || echo 'some steps FAILED (see above)')"
exit $FAILED
