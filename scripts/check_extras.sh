#!/usr/bin/env bash
# Proves each extra (client, embedder, searcher, exporter) installs ALONE into a fresh virtualenv and that its
# entry point does real work there. The dev venv has every extra at once, so a missing dependency, or an import
# that leaks across components (the client pulling in torch, say), would go unnoticed by the test suite.
# Usage: PYTHON=python3 scripts/check_extras.sh   (or `make check-extras`)
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$PWD
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/check-extras.XXXXXX")
pids=()
step="setup"

finish() {
    local rc=$?
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "$rc" != 0 ]; then
        echo "check-extras FAILED at: $step (exit $rc)" >&2
        # The servers' own words are usually the only clue to why a port never showed up.
        for log in "$work"/*.log; do
            [ -f "$log" ] && { echo "----- $(basename "$log") -----" >&2; tail -n 40 "$log" >&2; }
        done
    fi
    rm -rf "$work"
    exit "$rc"
}
trap finish EXIT

# pip's output is only interesting when it fails; this machine's pip.conf also adds harmless
# "WARNING: Location ... is ignored" lines on every install.
quiet() {
    local out
    if ! out=$("$@" 2>&1); then printf '%s\n' "$out" >&2; return 1; fi
    printf '%s\n' "$out" | grep -v -e '^WARNING: Location' -e '^$' >&2 || true
}

# Background a server and wait for "listening on port N"; $port holds N. A dead process or a silent one fails
# fast instead of hanging the check.
start_server() {  # name, command...
    local name=$1 log="$work/$1.log"; shift
    : >"$log"  # exists before the first poll: the backgrounded command may not have opened it yet
    "$@" >"$log" 2>&1 &
    pids+=($!)
    local pid=$! deadline=$((SECONDS + 90))
    port=""
    until port=$(sed -n 's/.*listening on port \([0-9][0-9]*\).*/\1/p' "$log" | head -n 1) && [ -n "$port" ]; do
        kill -0 "$pid" 2>/dev/null || { echo "$name exited before listening" >&2; return 1; }
        [ "$SECONDS" -lt "$deadline" ] || { echo "$name not listening after 90 s" >&2; return 1; }
        sleep 0.2
    done
}

# An extra must not drag in what belongs to another component (torch is gigabytes; hnswlib compiles).
lacks() {  # venv, modules...
    local venv=$1; shift
    "$venv/bin/python" - "$@" <<'EOF'
import importlib.util, sys
found = [m for m in sys.argv[1:] if importlib.util.find_spec(m)]
sys.exit(f"unexpectedly installed: {', '.join(found)}" if found else 0)
EOF
}

# Build from a snapshot of the working tree (tracked and unignored files): setuptools reuses ./build/lib, so
# modules renamed or deleted since an earlier build would otherwise ship in the wheel and hide a broken import.
step="build the wheel"
mkdir -p "$work/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
        | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$work/src"
else
    tar --exclude=./.venv --exclude=./build --exclude='*.egg-info' -cf - . | tar -xf - -C "$work/src"
fi
(cd "$work/src" && quiet "$python" -m pip wheel --quiet --no-deps -w "$work/wheel" .)
wheel=$(ls "$work"/wheel/lookalike-*.whl)

for extra in client embedder searcher exporter; do
    step="extra $extra: install"
    "$python" -m venv "$work/venv-$extra"
    quiet "$work/venv-$extra/bin/pip" install --quiet --constraint "$repo/requirements.lock" "$wheel[$extra]"
done
client=$work/venv-client embedder=$work/venv-embedder searcher=$work/venv-searcher exporter=$work/venv-exporter

# Exporter first: its model is what the embedder serves. Flat colours at 64 px keep the export to seconds.
step="extra exporter: export --help"
"$exporter/bin/lookalike" export --help >/dev/null
step="extra exporter: tiny export"
"$exporter/bin/python" - "$work/catalog" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
colours = {"warm": [(230, 40, 20), (250, 140, 0), (200, 30, 90)], "cool": [(20, 60, 220), (0, 160, 140), (90, 40, 200)]}
for category, bases in colours.items():
    (Path(sys.argv[1]) / category).mkdir(parents=True)
    for i in range(6):
        r, g, b = bases[i % 3]
        image = Image.new("RGB", (64, 64))
        image.putdata([(min(255, r + x), min(255, g + y // 2), b) for y in range(64) for x in range(64)] if i >= 3
                      else [(r, g, b)] * 4096)
        image.save(Path(sys.argv[1]) / category / f"{i}.png")
EOF
"$exporter/bin/lookalike" export --catalog "$work/catalog" --out "$work/model" --input-size 64 >"$work/export.log" 2>&1
test -s "$work/model/model.onnx" && test -s "$work/model/manifest.json"
echo "extra exporter: installed alone, lookalike export wrote model.onnx + manifest.json"

step="extra embedder: no torch or hnswlib"
lacks "$embedder" torch hnswlib
step="extra embedder: serve"
start_server embedder "$embedder/bin/python" -m lookalike.embedder --model "$work/model" --address 127.0.0.1:0
embedder_port=$port
echo "extra embedder: installed alone, python -m lookalike.embedder listening on port $embedder_port ok"

step="extra client: no torch, onnxruntime or hnswlib"
lacks "$client" torch onnxruntime hnswlib
step="extra client: embed --help"
"$client/bin/lookalike" embed --help >/dev/null
step="extra client: embed through the embedder"
embedded=$("$client/bin/lookalike" embed "$work/catalog/warm/0.png" --embedder "127.0.0.1:$embedder_port")
echo "  $embedded"
grep -q "warm" <<<"$embedded" && grep -q "cool" <<<"$embedded"
echo "extra client: installed alone (no torch/onnxruntime/hnswlib), lookalike embed got categories ok"

step="extra searcher: no torch or onnxruntime"
lacks "$searcher" torch onnxruntime
step="extra searcher: serve"
start_server searcher "$searcher/bin/python" -m lookalike.searcher --data "$work/searcher-data" --address 127.0.0.1:0
step="extra searcher: upsert + search from the client venv"
"$client/bin/python" - "127.0.0.1:$port" <<'EOF'
import sys
import numpy as np
from lookalike.client.searcher_client import CatalogueItem, SearcherClient
vector = np.arange(1, 9, dtype=np.float32)
vector /= np.linalg.norm(vector)
with SearcherClient(sys.argv[1]) as client:
    statuses = client.upsert([CatalogueItem("check-1", "a", vector, "check")]).statuses
    assert [s.code for s in statuses] == [0], statuses
    hits = client.search(vector, "check", k=1).hits
assert [h.id for h in hits] == ["check-1"] and hits[0].similarity > 0.999, hits
print(f"  search -> {hits[0].id} in {hits[0].category!r}, similarity {hits[0].similarity:.4f}")
EOF
echo "extra searcher: installed alone (no torch/onnxruntime), upsert + search from the client ok"

step="done"
echo "check-extras: all 4 extras ok in ${SECONDS} s"
