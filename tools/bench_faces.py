"""`lookalike bench faces`: what each face detector's crop costs per image, against decoding the same photos
without it, and in how many photos it finds a face.

One thread, the embedder's own decode function (lookalike.embedder.preprocess), the same photos for every
row, in the same run; the ratio is a row's time per image over the plain decode's.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from lookalike.embedder.preprocess import FACE_DETECTORS, FaceCrop, decode_face_image
from lookalike.quality.labelled_images import read_labelled_images
from lookalike.tools.benchmarking import measure, p50_p99_ms

SIZE = (224, 224)


def run_faces_bench(images: Path, seconds: float = 6.0, as_json: bool = False) -> int:
    photos = [image.read_bytes() for image in read_labelled_images(images)]
    crops = [FaceCrop(detector=detector, no_face="whole_image") for detector in FACE_DETECTORS]
    rows = []
    for face_crop in [None, *crops]:
        cycle = iter(range(1 << 62))

        def decode() -> int:
            decode_face_image(photos[next(cycle) % len(photos)], SIZE, face_crop=face_crop)
            return 1

        found = None if face_crop is None else sum(
            decode_face_image(photo, SIZE, face_crop=face_crop)[1] is not None for photo in photos)
        rate, latencies = measure(decode, seconds, 1)
        rows.append({"scenario": "decode + resize (no crop)" if face_crop is None else
                     f"decode + face crop ({face_crop.detector}) + resize", "faces_found": found,
                     "images_per_second": round(rate, 1),
                     "ms_per_image": round(1000 / rate, 2), "p50_p99_ms": p50_p99_ms(latencies)})
    for row in rows:
        row["ratio"] = round(rows[0]["images_per_second"] / row["images_per_second"], 2)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    report = {"machine": machine, "images": str(images), "photos": len(photos), "rows": rows}
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"face crop on {machine}; {len(photos)} photos from {images}; one thread, {seconds:.0f} s per row; "
          "ratio = time per image over the plain decode's")
    for row in rows:
        faces = "" if row["faces_found"] is None else f"  faces found {row['faces_found']}/{len(photos)}"
        print(f"  {row['scenario']:<62} {row['images_per_second']:>8} img/s {row['ms_per_image']:>7} ms/img "
              f"p50/p99 {row['p50_p99_ms'][0]}/{row['p50_p99_ms'][1]} ms  ratio {row['ratio']}{faces}")
    return 0
