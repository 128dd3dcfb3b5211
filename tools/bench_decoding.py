"""`lookalike bench decoding`: the embedder's decode threads on a burst of large photos, resident memory and time,
without the pixel budget (as before it) and with it. Each configuration runs in a fresh process (peak RSS is a
process's high-water mark), in interleaved turns."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# (name, budget in pixels or 0 for none, freed memory returned after large decodes)
CONFIGURATIONS = [("no budget, freed memory kept (before)", 0, False),
                  ("budget 80 MP (default), memory returned", 80_000_000, True),
                  ("budget 40 MP, memory returned", 40_000_000, True)]
THREADS, PHOTOS = 4, 8


def _decode_burst(photo: Path, budget_pixels: int, give_back: bool) -> dict[str, float]:
    """In the child: THREADS decode threads (as the embedder's pool on 4 CPUs) take PHOTOS copies of `photo`."""
    from lookalike.embedder import preprocess

    if not give_back:
        preprocess.GLIBC = None
    data = photo.read_bytes()
    budget = preprocess.PixelBudget(budget_pixels) if budget_pixels else None
    limits = preprocess.ImageLimits(max_bytes=len(data))
    # The high-water mark restarts here: the imports' own peak (higher than a burst of small photos) hid the
    # burst's, and measured it as nothing.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mb("VmRSS")
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        list(pool.map(lambda _: preprocess.decode_face_image(data, (224, 224), limits, budget=budget), range(PHOTOS)))
    return {"seconds": time.perf_counter() - started, "peak_mb": _status_mb("VmHWM"), "start_mb": before}


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now; VmHWM: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_decoding_bench(megapixels: int = 36, turns: int = 3, as_json: bool = False) -> int:
    side = int((megapixels * 1_000_000) ** 0.5)
    with tempfile.TemporaryDirectory(prefix="lookalike-decoding-") as scratch:
        photo = Path(scratch) / "large.png"
        # Noise: a PNG that compresses as badly as a detailed photo, so decoding does all its work.
        pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photo, compress_level=1)
        del pixels
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in CONFIGURATIONS}
        for _ in range(turns):
            for name, budget, give_back in CONFIGURATIONS:
                child = subprocess.run([sys.executable, "-m", "lookalike.tools.bench_decoding", str(photo),
                                        str(budget), str(int(give_back))], capture_output=True, text=True, check=True)
                runs[name].append(json.loads(child.stdout))
    baseline = CONFIGURATIONS[0][0]
    base_peak = np.median([run["peak_mb"] - run["start_mb"] for run in runs[baseline]])
    base_seconds = np.median([run["seconds"] for run in runs[baseline]])
    rows = []
    for name, measured in runs.items():
        peak = float(np.median([run["peak_mb"] - run["start_mb"] for run in measured]))
        seconds = float(np.median([run["seconds"] for run in measured]))
        rows.append({"configuration": name, "decode_peak_mb": round(peak, 1), "seconds": round(seconds, 2),
                     "memory_ratio": round(peak / base_peak, 2), "time_ratio": round(seconds / base_seconds, 2)})
    report = {"photo": f"{side}x{side} RGB PNG ({megapixels} MP)", "threads": THREADS, "photos": PHOTOS,
              "turns": turns, "rows": rows}
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{PHOTOS} copies of a {report['photo']} on {THREADS} decode threads, median of {turns} turns "
          "(memory: peak resident above the process's start)")
    for row in rows:
        print(f"  {row['configuration']:<42} {row['decode_peak_mb']:7.0f} MB ({row['memory_ratio']:.2f}x)  "
              f"{row['seconds']:5.2f} s ({row['time_ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    print(json.dumps(_decode_burst(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")))
