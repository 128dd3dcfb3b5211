#!/usr/bin/env bash
# Runs on a GPU machine without network, from the repository root, with .gpu/ as scripts/gpu_bundle.sh left it
# (all its parts carried): installs onnxruntime-gpu and the serving packages beside the machine's own Python
# packages, then runs `lookalike bench gpu` (parity, in-process by batch size for fp32 and fp16, host decode,
# gRPC from JPEG bytes, GPU utilisation) and the tests marked gpu (only their files: the others need more than
# the embedder's packages), on the small grocery set. Results go to $OUT (or bench-results/).
#   PYTHON     the machine's Python with numpy, Pillow, onnx and torch (default python3)
#   PROVIDERS  the embedder's execution providers (default cuda,cpu; cpu rehearses the whole run on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
providers=${PROVIDERS:-cuda,cpu}
out=${OUT:-bench-results}
site=/tmp/lookalike-gpu-site
mkdir -p "$out"
wheel=/tmp/$(cat .gpu/onnxruntime-gpu-wheel)
cat .gpu/part-*/part-* > "$wheel"
# --target and PYTHONPATH: these wheels come first, the machine's packages (numpy, torch, ...) after them.
rm -rf "$site"
"$python" -m pip install --quiet --no-index --no-deps --target "$site" .gpu/wheels/*.whl "$wheel"
export PYTHONPATH=$site PYTHONUNBUFFERED=1
# CUDA 13 and cuDNN 9 come from the machine's NVIDIA wheels (torch's). onnxruntime.preload_dlls() looks for them
# beside onnxruntime, which --target put elsewhere, so the loader is pointed at their folders instead.
nvidia_libs=$("$python" -c 'import glob, os, site
print(":".join(sorted({os.path.dirname(path) for folder in site.getsitepackages()
                       for path in glob.glob(os.path.join(folder, "nvidia", "**", "lib*.so*"), recursive=True)})))')
export LD_LIBRARY_PATH=${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi || echo "no nvidia-smi: the providers decide where this runs ($providers)"
"$python" -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())"
"$python" -m lookalike.tools.cli bench gpu --model .gpu/model --images .gpu/datasets/grocery/val.txt --providers "$providers" --seconds 2 \
  --json > "$out/bench-gpu.json"
"$python" -c "import json, sys; from lookalike.tools.bench_gpu import print_report; print_report(json.load(open(sys.argv[1])))" \
  "$out/bench-gpu.json"
LOOKALIKE_DATASETS=$PWD/.gpu/datasets "$python" -m pytest -q -p no:cacheprovider -m gpu $(grep -l "pytest.mark.gpu" tests/test_*.py) 2>&1 | tee "$out/gpu-tests.log" | tail -5
