#!/usr/bin/env bash
# Runs on a GPU machine without network, from the repository root, with what scripts/gpu_bundle.sh wrote carried
# there (.gpu/wheels, .gpu/finetune-data, .gpu/finetune-wheels): fine-tunes the whole network on the GPU for the
# quality targets 2 CPU cores cannot reach (issue 19), one exporter run per job, each fitted on its validation
# photos only. Each model folder comes back under $OUT/<job>/ with its ONNX graph cut in parts under the 16 MiB a
# returned file may have; here: `cat model.onnx.part-* > model.onnx`, then `lookalike eval` (BENCHMARKS.md).
#   JOBS      the jobs, in order (default "fashion-mnist clothing"; also clothing-lite1, and clothing-ema and
#             clothing-lite1-ema: the same with weight averaging, --ema-decay 0.99, which lifted the 416-px CPU
#             clothing run, not the 288/352-px ones, and is untried with the whole network). Each returns four
#             files (two parts, manifest, log) and a call returns at most eight: two jobs a call.
#   PYTHON    the machine's Python with torch, numpy, Pillow, onnx and onnxruntime (default python3)
#   DEVICE    where training runs (default cuda)
#   REHEARSE  1: 20 photos per class and 1 epoch, to check every step on a CPU (DEVICE=cpu); no figures
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
out=${OUT:-bench-results}
jobs=${JOBS:-fashion-mnist clothing}
work=/tmp/lookalike-finetune
site=/tmp/lookalike-finetune-site
rm -rf "$site" "$work" && mkdir -p "$out" "$work"
"$python" -m pip install --quiet --no-index --no-deps --target "$site" .gpu/wheels/*.whl .gpu/finetune-wheels/*.whl
export PYTHONPATH=$site PYTHONUNBUFFERED=1
rehearse=() fm_train=5000 fm_val=500
if [ "${REHEARSE:-0}" = 1 ]; then rehearse=(--max-per-category 20 --epochs 1) fm_train=20 fm_val=10; fi
nvidia-smi -L || echo "no nvidia-smi: training runs on $device"
clothing=.gpu/finetune-data/clothing-288

export_model() {  # export_model JOB ARG...: one exporter run, its log and its model folder into $out/JOB
  local job=$1
  shift
  mkdir -p "$out/$job"
  echo "== $job: lookalike.exporter $*"
  local start=$SECONDS
  "$python" -m lookalike.exporter "$@" --out "$work/$job" --device "$device" "${rehearse[@]}" 2>&1 | tee "$out/$job/export.log"
  echo "== $job: $((SECONDS - start)) s"
  cp "$work/$job/manifest.json" "$out/$job/"
  split --bytes=15M --numeric-suffixes=1 --suffix-length=1 "$work/$job/model.onnx" "$out/$job/model.onnx.part-"
}

for job in $jobs; do
  case $job in
    fashion-mnist)
      # The training file's first 5,000 photos per class train; its last 500 per class are the validation photos
      # everything is fitted on; the test file stays the queries (scored here, not there).
      "$python" -c "import sys; from pathlib import Path; from lookalike.quality.fashion_mnist import materialize
source, work, train, val = Path('.gpu/finetune-data/fashion-mnist'), Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
materialize(work / 'fm-train', 'train', train, source=source); materialize(work / 'fm-val', 'validation', val, source=source)" \
        "$work" "$fm_train" "$fm_val"
      export_model fashion-mnist --catalog "$work/fm-train/train" --val "$work/fm-val/validation" --train-embedding cosface \
        --input-size 160 --finetune-from 0 --batch-size 128 --epochs 12 --backbone-learning-rate 3e-4 --train-batchnorm ;;
    clothing)
      export_model clothing --catalog "$clothing/train" --val "$clothing/validation" --train-embedding cosface \
        --input-size 288 --finetune-from 0 --batch-size 128 --epochs 30 --backbone-learning-rate 2e-4 ;;
    clothing-lite1)
      export_model clothing-lite1 --backbone lite1 --catalog "$clothing/train" --val "$clothing/validation" \
        --train-embedding cosface --input-size 288 --finetune-from 0 --batch-size 128 --epochs 30 \
        --backbone-learning-rate 2e-4 ;;
    clothing-ema)
      export_model clothing-ema --catalog "$clothing/train" --val "$clothing/validation" --train-embedding cosface \
        --input-size 288 --finetune-from 0 --batch-size 128 --epochs 30 --backbone-learning-rate 2e-4 --ema-decay 0.99 ;;
    clothing-lite1-ema)
      export_model clothing-lite1-ema --backbone lite1 --catalog "$clothing/train" --val "$clothing/validation" \
        --train-embedding cosface --input-size 288 --finetune-from 0 --batch-size 128 --epochs 30 \
        --backbone-learning-rate 2e-4 --ema-decay 0.99 ;;
    *) echo "unknown job $job: expected fashion-mnist, clothing, clothing-lite1, clothing-ema or clothing-lite1-ema" >&2
       exit 2 ;;
  esac
done
