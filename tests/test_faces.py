"""Face crop (seed 004's preprocessing) on real ORL faces: where the box lies, no face, several faces, the
manifest round trip, and a tiny train -> export -> serve -> search on a few ORL people."""
from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from lookalike.embedder.preprocess import FaceCrop, decode_image, face_box
from lookalike.serving.errors import FailedPrecondition
from tests.conftest import DATASETS, GROCERY, ROOT

ORL = DATASETS / "orl-faces" / "train"
pytestmark = pytest.mark.skipif(not ORL.is_dir(), reason=f"ORL faces not found at {ORL} (../shared/datasets is absent)")


def orl_face(person: int, photo: int) -> Image.Image:
    return Image.open(ORL / f"s{person}" / f"{photo}.pgm").convert("RGB")


def background() -> Image.Image:
    """A real grocery photo with no face in it, enlarged to leave room for pasted faces."""
    return Image.open(GROCERY / "train" / "Fruit" / "Apple" / "Golden-Delicious"
                      / "Golden-Delicious_001.jpg").convert("RGB").resize((640, 640))


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def overlap(box: tuple[int, int, int, int], region: tuple[int, int, int, int]) -> float:
    """Share of `region` that `box` covers."""
    left, top = max(box[0], region[0]), max(box[1], region[1])
    right, bottom = min(box[2], region[2]), min(box[3], region[3])
    area = (region[2] - region[0]) * (region[3] - region[1])
    return max(0, right - left) * max(0, bottom - top) / area


def test_the_box_lies_on_a_face_pasted_into_a_real_photo() -> None:
    """ORL faces pasted at random places and scales onto a grocery photo: the crop covers the face."""
    rng = random.Random(4)
    crop = FaceCrop(margin=0.2)
    found = 0
    for person in range(1, 9):
        face = orl_face(person, 1)
        scale = rng.uniform(1.2, 2.5)
        face = face.resize((round(face.width * scale), round(face.height * scale)))
        scene = background()
        left, top = rng.randrange(0, 640 - face.width), rng.randrange(0, 640 - face.height)
        scene.paste(face, (left, top))
        box = face_box(scene, crop)
        if box is None:
            continue
        found += 1
        # The detector's box is the inner face (eyes to mouth), grown by the margin: it lies inside the pasted
        # photo's neighbourhood and covers most of the pasted face's middle.
        face_region = (left, top, left + face.width, top + face.height)
        middle = (left + face.width // 4, top + face.height // 4, left + 3 * face.width // 4,
                  top + 3 * face.height // 4)
        assert overlap(box, middle) > 0.8, (person, box, face_region)
        assert overlap(face_region, box) > 0.5, (person, box, face_region)
    assert found >= 6  # the Haar cascade finds 218 of ORL's 240 faces at their own size


def test_no_face_is_refused_or_embedded_whole_as_the_manifest_says() -> None:
    data = (GROCERY / "train" / "Fruit" / "Apple" / "Golden-Delicious" / "Golden-Delicious_001.jpg").read_bytes()
    with pytest.raises(FailedPrecondition, match=r"images\[3\] shows no face"):
        decode_image(data, (64, 64), name="images[3]", face_crop=FaceCrop(no_face="fail"))
    whole = decode_image(data, (64, 64), face_crop=FaceCrop(no_face="whole_image"))
    # The whole photo at full resolution (a face crop never decodes a JPEG at reduced scale), resized.
    photo = Image.open(io.BytesIO(data)).convert("RGB")
    assert np.array_equal(whole, np.asarray(photo.resize((64, 64), Image.Resampling.BILINEAR)))


def test_several_faces_crop_the_largest() -> None:
    scene = background()
    small, large = orl_face(3, 1), orl_face(5, 1).resize((184, 224))
    scene.paste(small, (20, 40))
    scene.paste(large, (380, 300))
    assert face_box(small, FaceCrop()) is not None  # the small face alone is found too
    box = face_box(scene, FaceCrop(margin=0.0))
    assert box is not None
    assert overlap((380, 300, 564, 524), box) > 0.8 and overlap((20, 40, 112, 152), box) == 0


def test_face_crop_round_trips_through_the_manifest() -> None:
    from lookalike.v1 import manifest_pb2

    crop = FaceCrop(margin=0.3, no_face="whole_image", min_neighbors=4)
    spec = manifest_pb2.InputSpec(face_crop=crop.to_manifest())
    assert FaceCrop.from_manifest(spec) == crop
    assert FaceCrop.from_manifest(manifest_pb2.InputSpec()) is None
    spec.face_crop.detector = "dlib-hog"
    with pytest.raises(ValueError, match="detector is 'dlib-hog'"):
        FaceCrop.from_manifest(spec)


@pytest.mark.slow
def test_train_export_serve_search_on_a_few_orl_people(tmp_path: Path) -> None:
    """Identity retrieval end to end: 6 people train the embedding, 3 others (never seen in training) are the
    validation; the model crops faces (its manifest says so); the embedder refuses a photo without a face
    with FAILED_PRECONDITION and embeds faces; eval searches the unseen people's photos."""
    for split, people in (("train", range(1, 7)), ("validation", range(7, 10))):
        for person in people:
            (tmp_path / split / f"s{person}").mkdir(parents=True)
            for photo in range(1, 11):
                (tmp_path / split / f"s{person}" / f"{photo}.pgm").write_bytes(
                    (ORL / f"s{person}" / f"{photo}.pgm").read_bytes())
    run = lambda *args: subprocess.run([sys.executable, "-m", "lookalike.tools.cli", *args], cwd=ROOT,  # noqa: E731
                                       capture_output=True, text=True, timeout=600)
    exported = run("export", "--catalog", str(tmp_path / "train"), "--val", str(tmp_path / "validation"),
                   "--out", str(tmp_path / "model"), "--train-embedding", "cosface", "--epochs", "20",
                   "--face-crop", "--no-face", "whole-image", "--one-category", "face", "--input-size", "128")
    assert exported.returncode == 0, exported.stderr
    from lookalike.codec import read_manifest

    manifest = read_manifest(tmp_path / "model")
    assert manifest.input.face_crop.detector == "opencv-haar-frontalface-default"
    assert list(manifest.labels) == ["face"] and manifest.parity.passed
    # The crop is part of the model's identity: the same graph without it would be another model.
    from lookalike.exporter.export import model_identity

    assert manifest.model_id.split("@")[1] == model_identity(manifest.sha256, manifest.input)[:12]
    assert manifest.model_id.split("@")[1] != manifest.sha256[:12]
    evaluated = run("eval", "--model", str(tmp_path / "model"), "--catalog", str(tmp_path / "validation"),
                    "--queries", str(tmp_path / "validation"), "--one-category", "face", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["queries"] == 30 and report["catalogue_items"] == 30
    # Each query finds itself first; R@1 counts it, so the identity figure that matters is mAP@10.
    assert report["modes"]["global"]["R@1"] == 1.0 and 0 < report["modes"]["global"]["mAP@10"] <= 1


def test_embedder_refuses_a_photo_without_a_face_and_embeds_faces(tmp_path: Path, model_dir: Path) -> None:
    """A model whose manifest asks for the crop with no_face 'fail', served: a grocery photo gets its own
    FAILED_PRECONDITION naming it, and the face in the same request is embedded."""
    import shutil

    from lookalike.client.embedder_client import EmbedderClient
    from lookalike.codec import read_manifest, write_manifest
    from lookalike.embedder.config import EmbedderConfig
    from lookalike.embedder.server import create_server
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    manifest = read_manifest(folder)
    manifest.input.face_crop.CopyFrom(FaceCrop(no_face="fail").to_manifest())
    write_manifest(folder, manifest)
    started, port = create_server(EmbedderConfig(model_dir=folder, address="127.0.0.1:0"))
    try:
        scene = background()
        scene.paste(orl_face(3, 1).resize((184, 224)), (200, 200))
        grocery = (GROCERY / "train" / "Fruit" / "Apple" / "Golden-Delicious" / "Golden-Delicious_001.jpg").read_bytes()
        with EmbedderClient(f"127.0.0.1:{port}") as client:
            results = client.embed([encoded(scene), grocery])
        assert results[0].ok and len(results[0].vector) == manifest.embedding_dim
        # The response says which region was embedded: the pasted face (at 200, 200, 184 x 224).
        assert results[0].face is not None and overlap(results[0].face, (246, 256, 338, 368)) > 0.8
        assert not results[1].ok and results[1].error_code == grpc.StatusCode.FAILED_PRECONDITION
        assert "images[1] shows no face" in results[1].error
    finally:
        started.stop(None)


def test_web_query_preview_draws_the_face_box() -> None:
    """The web demo shows which face a face model embedded: a green box on the query photo."""
    from lookalike.web.app import FACE_BOX_COLOUR, query_preview

    scene = background()
    plain = np.asarray(Image.open(io.BytesIO(query_preview(encoded(scene), size=640))).convert("RGB"))
    boxed = np.asarray(Image.open(io.BytesIO(query_preview(encoded(scene), size=640,
                                                           face=(100, 120, 300, 320)))).convert("RGB"))
    assert tuple(boxed[120, 200]) == FACE_BOX_COLOUR and tuple(boxed[200, 100]) == FACE_BOX_COLOUR
    assert np.array_equal(boxed[200:260, 150:250], plain[200:260, 150:250])  # inside the box: the photo


def test_cli_bench_faces_measures_the_crop_against_plain_decoding(tmp_path: Path) -> None:
    for person in (1, 3):
        (tmp_path / f"s{person}").mkdir()
        (tmp_path / f"s{person}" / "1.png").write_bytes(encoded(orl_face(person, 1)))
    result = subprocess.run([sys.executable, "-m", "lookalike.tools.cli", "bench", "faces", "--images", str(tmp_path),
                             "--seconds", "0.2", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["photos"] == 2 and report["faces_found"] == 2
    assert [row["scenario"] for row in report["rows"]] == ["decode + resize (no crop)", "decode + face crop + resize"]
    assert report["rows"][0]["ratio"] == 1.0 and all(row["images_per_second"] > 0 for row in report["rows"])


def test_decode_threads_loading_the_detector_at_once_all_get_it() -> None:
    """cv2's first import is not safe from several threads at once (a thread saw a module without cv2.data);
    a fresh process whose decode threads all need the detector at the same moment must find faces in all."""
    code = """
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
from lookalike.embedder.preprocess import FaceCrop, face_box
face = Image.open(%r).convert("RGB")
with ThreadPoolExecutor(8) as pool:
    print(sum(box is not None for box in pool.map(lambda _: face_box(face, FaceCrop()), range(16))))
""" % str(ORL / "s1" / "1.pgm")
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "16"
