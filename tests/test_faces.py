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

from lookalike.embedder.preprocess import (DLIB_HOG_ALIGNED, FACE_DETECTORS, HAAR_FRONTAL_FACE, FaceCrop, cut_face,
                                           face_box)
from tests.conftest import DATASETS, GROCERY, ROOT

ORL = DATASETS / "orl-faces" / "train"
pytestmark = pytest.mark.skipif(not ORL.is_dir(), reason=f"ORL faces not found at {ORL} (../shared/datasets is absent)")


def orl_face(person: int, photo: int) -> Image.Image:
    return Image.open(ORL / f"s{person}" / f"{photo}.pgm").convert("RGB")

def orl_people(folder: Path, splits: dict[str, range], photos: int) -> None:
    """Copies the first `photos` photos of each ORL person into folder/<split>/s<person>/."""
    for split, people in splits.items():
        for person in people:
            (folder / split / f"s{person}").mkdir(parents=True)
            for photo in range(1, photos + 1):
                (folder / split / f"s{person}" / f"{photo}.pgm").write_bytes(
                    (ORL / f"s{person}" / f"{photo}.pgm").read_bytes())


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


@pytest.mark.parametrize("detector", FACE_DETECTORS)
def test_the_box_lies_on_a_face_pasted_into_a_real_photo(detector: str) -> None:
    """ORL faces pasted at random places and scales onto a grocery photo: the crop covers the face."""
    rng = random.Random(4)
    crop = FaceCrop(detector=detector, margin=0.2)
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
    assert found >= 6  # at their own size the Haar cascade finds 218 of ORL's 240 faces, dlib's HOG all 240


def test_dlib_turns_a_tilted_face_eyes_level() -> None:
    """The same face tilted by -20 to 20 degrees in a scene: in dlib's aligned crop the eyes lie level (the
    landmarks found again in the crop say how far it is turned), while in the Haar crop the tilt stays."""
    import math

    import dlib

    from lookalike.embedder.preprocess import _dlib_models

    def eye_line_degrees(face: Image.Image) -> float:
        detector, landmarks = _dlib_models()
        pixels = np.asarray(face)
        found = detector(pixels, 0)
        assert len(found) == 1
        return math.degrees(dlib.get_face_chip_details(landmarks(pixels, found[0])).angle)

    upright = background()
    upright.paste(orl_face(2, 1).resize((184, 224)), (228, 208))
    haar_found = 0
    for tilt in (-20, 0, 10, 20):
        scene = upright.rotate(tilt, resample=Image.Resampling.BILINEAR, center=(320, 320))
        aligned = cut_face(scene, FaceCrop(detector=DLIB_HOG_ALIGNED), (224, 224))
        haar = cut_face(scene, FaceCrop(detector=HAAR_FRONTAL_FACE), (224, 224))
        assert aligned is not None and abs(eye_line_degrees(aligned[0])) < 3, tilt
        if haar is not None:  # the cascade misses some tilted faces (here at 10 and 20 degrees)
            haar_found += 1
            assert abs(eye_line_degrees(haar[0].resize((224, 224)))) > abs(tilt) / 2, tilt
    assert haar_found >= 2


@pytest.mark.parametrize("detector", FACE_DETECTORS)
def test_several_faces_crop_the_largest(detector: str) -> None:
    scene = background()
    small, large = orl_face(3, 1), orl_face(5, 1).resize((184, 224))
    scene.paste(small, (20, 40))
    scene.paste(large, (380, 300))
    assert face_box(small, FaceCrop(detector=detector)) is not None  # the small face alone is found too
    box = face_box(scene, FaceCrop(detector=detector, margin=0.0))
    assert box is not None
    assert overlap((380, 300, 564, 524), box) > 0.8 and overlap((20, 40, 112, 152), box) == 0


def test_face_crop_round_trips_through_the_manifest() -> None:
    from lookalike.v1 import manifest_pb2

    for crop in (FaceCrop(detector=HAAR_FRONTAL_FACE, margin=0.3, no_face="whole_image", min_neighbors=4),
                 FaceCrop(detector=DLIB_HOG_ALIGNED, margin=0.25, upsample=1)):
        spec = manifest_pb2.InputSpec(face_crop=crop.to_manifest())
        assert FaceCrop.from_manifest(spec) == crop
    assert FaceCrop.from_manifest(manifest_pb2.InputSpec()) is None
    spec.face_crop.detector = "dlib-hog"
    with pytest.raises(ValueError, match="detector is 'dlib-hog'"):
        FaceCrop.from_manifest(spec)


@pytest.mark.slow
def test_train_export_serve_search_on_a_few_orl_people(tmp_path: Path) -> None:
    """Identity retrieval end to end: 6 people train the embedding, 3 others (never seen in training) are the
    validation; the model crops faces (its manifest says so); eval, through the real services, finds each unseen
    person's other photos. (A photo without a face: the next test.)"""
    orl_people(tmp_path, {"train": range(1, 7), "validation": range(7, 10)}, photos=10)
    run = lambda *args: subprocess.run([sys.executable, "-m", "lookalike.tools.cli", *args], cwd=ROOT,  # noqa: E731
                                       capture_output=True, text=True, timeout=600)
    exported = run("export", "--catalog", str(tmp_path / "train"), "--val", str(tmp_path / "validation"),
                   "--out", str(tmp_path / "model"), "--train-embedding", "cosface", "--epochs", "20",
                   "--face-crop", "--no-face", "whole-image", "--one-category", "face", "--input-size", "128")
    assert exported.returncode == 0, exported.stderr
    from lookalike.codec import read_manifest

    manifest = read_manifest(tmp_path / "model")
    assert manifest.input.face_crop.detector == DLIB_HOG_ALIGNED  # the default detector
    assert list(manifest.labels) == ["face"] and manifest.parity.passed
    # The crop is part of the model's identity: the same graph without it would be another model.
    from lookalike.exporter.export import model_identity

    assert manifest.model_id.split("@")[1] == model_identity(manifest.sha256, manifest.input)[:12]
    assert manifest.model_id.split("@")[1] != manifest.sha256[:12]
    # The unseen people's photos 1-5 are the catalogue, 6-10 the queries (eval refuses a query that is also in
    # the catalogue: it would find itself).
    for person in range(7, 10):
        (tmp_path / "queries" / f"s{person}").mkdir(parents=True)
        for photo in range(6, 11):
            (tmp_path / "validation" / f"s{person}" / f"{photo}.pgm").rename(
                tmp_path / "queries" / f"s{person}" / f"{photo}.pgm")
    evaluated = run("eval", "--model", str(tmp_path / "model"), "--catalog", str(tmp_path / "validation"),
                    "--queries", str(tmp_path / "queries"), "--one-category", "face", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["queries"] == 15 and report["catalogue_items"] == 15
    # Measured: R@1 1.0, mAP@10 0.998 (each query's five photos of the same person in the catalogue).
    assert report["modes"]["global"]["R@1"] >= 0.9 and report["modes"]["global"]["mAP@10"] >= 0.9


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


def test_reduced_precision_twins_of_a_face_model_use_only_photos_with_a_face(tmp_path: Path, model_dir: Path) -> None:
    """A model that refuses photos without a face: its int8 and fp16 twins calibrate and measure their drift
    on the photos it takes, and say how many. A grocery photo among the faces made decoding fail and the
    conversion abort (FAILED_PRECONDITION), as the export itself already left such photos out."""
    import shutil

    from lookalike.codec import read_manifest, write_manifest
    from lookalike.exporter.export import with_faces
    from lookalike.exporter.quantize import half_precision_model, quantize_model
    from lookalike.quality.labelled_images import LabelledImage

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    manifest = read_manifest(folder)
    crop = FaceCrop(no_face="fail")
    manifest.input.face_crop.CopyFrom(crop.to_manifest())
    write_manifest(folder, manifest)
    faces = [LabelledImage(f"s{person}-{photo}", ORL / f"s{person}" / f"{photo}.pgm", f"s{person}", f"s{person}")
             for person in (1, 2) for photo in (1, 2, 3)]
    apple = LabelledImage("apple", GROCERY / "train" / "Fruit" / "Apple" / "Golden-Delicious" / "Golden-Delicious_001.jpg",
                          "Apple", "Apple")
    with_a_face = len(with_faces(faces, crop))
    assert with_a_face >= 4
    int8 = quantize_model(folder, tmp_path / "int8", [apple, *faces], [*faces, apple])
    assert (int8.quantization.calibration_images, int8.quantization.validation_images) == (with_a_face, with_a_face)
    fp16 = half_precision_model(folder, tmp_path / "fp16", [apple, *faces])
    assert fp16.quantization.validation_images == with_a_face and fp16.quantization.mean_cosine > 0.99


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
    assert report["photos"] == 2
    assert [row["scenario"] for row in report["rows"]] == ["decode + resize (no crop)"] + [
        f"decode + face crop ({detector}) + resize" for detector in FACE_DETECTORS]
    assert [row["faces_found"] for row in report["rows"]] == [None, 2, 2]
    assert report["rows"][0]["ratio"] == 1.0 and all(row["images_per_second"] > 0 for row in report["rows"])


@pytest.mark.parametrize("detector", FACE_DETECTORS)
def test_decode_threads_loading_the_detector_at_once_all_get_it(detector: str) -> None:
    """cv2's first import is not safe from several threads at once (a thread saw a module without cv2.data);
    a fresh process whose decode threads all need the detector at the same moment must find faces in all."""
    code = """
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
from lookalike.embedder.preprocess import FaceCrop, face_box
face = Image.open(%r).convert("RGB")
with ThreadPoolExecutor(8) as pool:
    print(sum(box is not None for box in pool.map(lambda _: face_box(face, FaceCrop(detector=%r)), range(16))))
""" % (str(ORL / "s1" / "1.pgm"), detector)
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "16"


def test_a_trained_embedding_worse_than_the_frozen_features_is_not_kept(tmp_path: Path) -> None:
    """A head that cannot learn (learning rate 0: it stays at its random start) scores below the ImageNet
    features on the unseen validation people, so the exporter keeps the features: the same model, byte for
    byte, as an export that trains no embedding."""
    from lookalike.codec import read_manifest
    from lookalike.exporter.export import ExportSettings, export_default_model
    from lookalike.exporter.train import TrainSettings
    from lookalike.quality.labelled_images import in_one_category, read_labelled_images

    orl_people(tmp_path, {"train": range(1, 5), "validation": range(5, 8)}, photos=5)
    train, validation = (in_one_category(read_labelled_images(tmp_path / split), "face")
                         for split in ("train", "validation"))
    frozen = ExportSettings(input_size=96, parity_images=4)
    export_default_model(train, tmp_path / "frozen", frozen, validation=validation)
    untrainable = ExportSettings(input_size=96, parity_images=4, embedding=TrainSettings(
        loss="triplet", head_epochs=1, head_patience=1, learning_rate=0.0, views=1))
    export_default_model(train, tmp_path / "kept", untrainable, validation=validation)
    manifests = [read_manifest(tmp_path / name) for name in ("frozen", "kept")]
    assert manifests[1].model_id == manifests[0].model_id and manifests[1].embedding_dim == 1280
    assert "'kept': 'frozen features (better on validation)'" in manifests[1].backbone
    assert "(frozen)" in manifests[1].backbone
