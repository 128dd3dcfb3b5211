"""Arbitrary requests against a real searcher and a real embedder (hypothesis): never INTERNAL, never a
crash, data (the searcher's items, the embedder's vectors) intact.

Also the limits that bound memory per request: attributes per item, and RPCs in progress at once.
"""
from __future__ import annotations

import functools
import io
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from lookalike.codec import pack_vector
from lookalike.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, searcher_pb2 as pb, searcher_pb2_grpc
from tests.conftest import start_searcher

DIM = 8
MODEL = "model@1"
# Statuses a refused request may get; INTERNAL (or UNKNOWN) would mean the server did not understand what
# went wrong, which is the bug these tests look for.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}


@pytest.fixture(scope="module")
def searcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[searcher_pb2_grpc.SearcherStub]:
    started, channel = start_searcher(tmp_path_factory.mktemp("arbitrary"), snapshot_interval=0, max_batch=50,
                                      max_attributes=8, max_attribute_bytes=512, max_message_bytes=1 << 20)
    stub = searcher_pb2_grpc.SearcherStub(channel)
    # A known item that every test checks is still there, unchanged.
    stub.Upsert(pb.UpsertRequest(items=[pb.Item(id="anchor", category="hats", model_id=MODEL,
                                                 vector=pack_vector(np.eye(DIM, dtype=np.float32)[0]))]), timeout=10)
    yield stub
    channel.close()
    started.stop(None)


def anchor_intact(stub: searcher_pb2_grpc.SearcherStub) -> bool:
    response = stub.Search(pb.SearchRequest(vector=pack_vector(np.eye(DIM, dtype=np.float32)[0]), model_id=MODEL,
                                            k=1, routing=pb.Routing(explicit=pb.ExplicitRouting(categories=["hats"]))),
                           timeout=10)
    return [(h.id, round(h.similarity, 4)) for h in response.hits] == [("anchor", 1.0)]


texts = st.text(max_size=300)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
vectors = st.builds(lambda values, dimension, raw: common_pb2.Vector(
    values=raw if raw is not None else np.asarray(values, dtype="<f4").tobytes(), dimension=dimension),
    st.lists(floats, max_size=20), st.integers(0, 2**32 - 1), st.none() | st.binary(max_size=64))
# Vectors the searcher takes (the anchor's dimension, finite), so that some items are accepted and read back.
fitting_vectors = st.builds(lambda values: common_pb2.Vector(values=np.asarray(values, dtype="<f4").tobytes(),
                                                            dimension=DIM),
                            st.lists(st.floats(-1, 1, width=32) | st.floats(width=32, allow_nan=False,
                                                                            allow_infinity=False),
                                     min_size=DIM, max_size=DIM))
items = st.builds(lambda i, c, v, m, a: pb.Item(id=i, category=c, vector=v, model_id=m, attributes=a),
                  st.sampled_from(["anchor", "sku-1", ""]) | texts, st.sampled_from(["hats", "coats"]) | texts,
                  fitting_vectors | vectors, st.sampled_from([MODEL, "other@2"]) | texts,
                  st.dictionaries(texts, texts, max_size=12))
routings = st.one_of(st.none(), st.builds(lambda c: pb.Routing(explicit=pb.ExplicitRouting(categories=c)),
                                          st.lists(texts, max_size=5)),
                     st.builds(lambda c, t, m, w: pb.Routing(probabilities=pb.ProbabilityRouting(
                         categories=[common_pb2.CategoryProbability(category=n, probability=p) for n, p in c],
                         threshold=t, max_shards=m, prior_weight=w)),
                         st.lists(st.tuples(texts, floats), max_size=5), floats, st.integers(0, 2**32 - 1), floats))


def call(method, request) -> None:
    try:
        method(request, timeout=10)
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, f"{error.code()}: {error.details()}"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(items, max_size=6))
def test_arbitrary_upserts(searcher: searcher_pb2_grpc.SearcherStub, batch: list[pb.Item]) -> None:
    sent = [item for item in batch if item.id != "anchor"]
    try:
        response = searcher.Upsert(pb.UpsertRequest(items=sent), timeout=10)
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, f"{error.code()}: {error.details()}"
    else:
        assert len(response.statuses) == len(sent)
        assert all(s.code != grpc.StatusCode.INTERNAL.value[0] for s in response.statuses)
        # What was accepted is there: the last accepted version of each id is found by its own vector.
        accepted = {item.id: item for item, status in zip(sent, response.statuses) if status.code == 0}
        for item in accepted.values():
            found = searcher.Search(pb.SearchRequest(vector=item.vector, model_id=item.model_id, k=1000, routing=pb.Routing(
                explicit=pb.ExplicitRouting(categories=[item.category]))), timeout=10)
            similarity = {hit.id: hit.similarity for hit in found.hits}
            assert item.id in similarity, f"accepted {item.id!r} is not in {item.category!r}"
            # Stored as given: its own vector finds it at similarity 1 (duplicates may tie, so not rank 1).
            assert similarity[item.id] == pytest.approx(1.0, abs=1e-4)
    assert anchor_intact(searcher)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vectors, st.sampled_from([MODEL]) | texts, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), routings)
def test_arbitrary_searches(searcher: searcher_pb2_grpc.SearcherStub, vector: common_pb2.Vector, model_id: str, k: int,
                            ef: int, routing: pb.Routing | None) -> None:
    call(searcher.Search, pb.SearchRequest(vector=vector, model_id=model_id, k=k, ef=ef, routing=routing))
    assert anchor_intact(searcher)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["sku-1", ""]) | texts, max_size=60))
def test_arbitrary_deletes(searcher: searcher_pb2_grpc.SearcherStub, ids: list[str]) -> None:
    call(searcher.Delete, pb.DeleteRequest(ids=[i for i in ids if i != "anchor"]))
    assert anchor_intact(searcher)


def test_attribute_limits_refuse_the_item_not_the_request(searcher: searcher_pb2_grpc.SearcherStub) -> None:
    vector = pack_vector(np.eye(DIM, dtype=np.float32)[1])
    response = searcher.Upsert(pb.UpsertRequest(items=[
        pb.Item(id="many", category="hats", model_id=MODEL, vector=vector, attributes={str(n): "x" for n in range(9)}),
        pb.Item(id="large", category="hats", model_id=MODEL, vector=vector, attributes={"text": "x" * 600}),
        pb.Item(id="fine", category="hats", model_id=MODEL, vector=vector, attributes={"brand": "a"})]), timeout=10)
    codes = [s.code for s in response.statuses]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 2 + [0]
    assert response.statuses[0].message == "items[0].attributes has 9 entries, limit is 8"
    assert response.statuses[1].message == "items[1].attributes holds 604 bytes of keys and values, limit is 512"


def test_rpcs_past_the_concurrency_limit_get_resource_exhausted(tmp_path: Path) -> None:
    """One slot: while an upsert of 1,000 4096-d items (about a second of graph inserts at this build
    breadth) holds it, other calls are refused with RESOURCE_EXHAUSTED (or, when a probe got there
    first, the upsert is); afterwards the server serves again."""
    started, channel = start_searcher(tmp_path, snapshot_interval=0, max_concurrent_rpcs=1, ef_construction=2000,
                                      m=64, initial_capacity=1000)
    stub = searcher_pb2_grpc.SearcherStub(channel)
    big = np.random.default_rng(0).normal(size=(1000, 4096)).astype(np.float32)
    slow = pb.UpsertRequest(items=[pb.Item(id=f"i{n}", category="c", model_id=MODEL, vector=pack_vector(v))
                                   for n, v in enumerate(big)])
    refused: list[grpc.StatusCode] = []

    def upsert() -> None:
        try:
            stub.Upsert(slow, timeout=120)
        except grpc.RpcError as error:
            refused.append(error.code())

    writer = threading.Thread(target=upsert)
    writer.start()
    while writer.is_alive():
        try:
            stub.GetStats(pb.GetStatsRequest(), timeout=10)
        except grpc.RpcError as error:
            refused.append(error.code())
        time.sleep(0.01)
    writer.join()
    assert refused and set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    stub.Upsert(slow, timeout=120)  # the server keeps serving: the upsert goes through when alone
    assert stub.GetStats(pb.GetStatsRequest(), timeout=10).items == 1000
    channel.close()
    started.stop(None)


# ---------------------------------------------------------------------------------------------------------------
# The embedder: arbitrary Embed requests against the real server of conftest's `embedder` fixture.
# ---------------------------------------------------------------------------------------------------------------

# conftest's `embedder` fixture limits (checked against GetModelInfo below, so the two cannot drift apart).
MAX_IMAGES = 8
MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_IMAGE_PIXELS = 12_000_000
# The conftest model's input (width, height): a JPEG is decoded at the reduced scale Pillow's draft picks for it.
MODEL_INPUT = (224, 224)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # not in GetModelInfo: gRPC itself refuses a larger request

# What a payload must get back: an embedding (EMBEDS; ANCHOR: and the known vector), its own error with
# that code, or either an embedding or an INVALID_ARGUMENT / RESOURCE_EXHAUSTED error (EITHER: garbage
# that might, by chance, parse).
EMBEDS, ANCHOR, INVALID, EXHAUSTED, EITHER = "embeds", "anchor", "invalid", "exhausted", "either"
CODE = {INVALID: grpc.StatusCode.INVALID_ARGUMENT.value[0], EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}


@dataclass(frozen=True)
class Payload:
    """One generated image's bytes, how they were made (label) and what the server must answer."""

    label: str
    data: bytes
    expect: str

    def __repr__(self) -> str:  # hypothesis prints failing examples: no megabytes of bytes
        shown = self.data if len(self.data) <= 48 else self.data[:48] + b"..."
        return f"Payload({self.label!r}, {len(self.data)} bytes {shown!r}, expect={self.expect})"


@dataclass(frozen=True)
class EmbedCase:
    payloads: list[Payload]
    ids: list[str]
    image_unknown_fields: list[bytes]
    top_categories: int
    unknown_fields: bytes


@dataclass(frozen=True)
class EmbedderUnderTest:
    stub: embedder_pb2_grpc.EmbedderStub
    anchor: bytes
    reference: np.ndarray
    model_id: str
    dimension: int
    labels: list[str]


@pytest.fixture(scope="module")
def embedder_under_test(embedder, grocery_val: list) -> EmbedderUnderTest:
    """conftest's real embedder server, plus a real photo and the vector it got before any generated request."""
    _, channel = embedder
    stub = embedder_pb2_grpc.EmbedderStub(channel)
    info = stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=10)
    assert (info.max_images_per_request, info.max_image_bytes, info.max_image_pixels) == (
        MAX_IMAGES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS), "conftest's embedder limits changed: update the constants"
    assert (info.manifest.input.width, info.manifest.input.height) == MODEL_INPUT, "update MODEL_INPUT"
    anchor = grocery_val[0].read_bytes()
    result = stub.Embed(embedder_pb2.EmbedRequest(images=[embedder_pb2.Image(data=anchor)]), timeout=30).results[0]
    reference = np.frombuffer(result.embedding.vector.values, "<f4").copy()
    assert reference.shape == (info.dimension,)
    return EmbedderUnderTest(stub, anchor, reference, info.model_id, info.dimension, list(info.labels))


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def random_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels (and palette) in any Pillow mode, from the raw bytes of that mode."""
    rng = np.random.default_rng(seed)
    image = Image.frombytes(mode, size, rng.bytes(len(Image.new(mode, size).tobytes())))
    if mode in ("P", "PA"):
        image.putpalette(rng.bytes(768))
    return image


# (format, mode) pairs Pillow writes as such: greyscale, alpha, palette, 16-bit, bilevel, float, CMYK, Lab, YCbCr.
ENCODINGS = [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"),
             ("PNG", "LA"), ("PNG", "P"), ("PNG", "I;16"), ("PNG", "1"), ("WEBP", "RGB"), ("WEBP", "RGBA"),
             ("GIF", "P"), ("GIF", "L"), ("BMP", "RGB"), ("BMP", "1"), ("BMP", "P"), ("TIFF", "I;16"), ("TIFF", "F"),
             ("TIFF", "I"), ("TIFF", "CMYK"), ("TIFF", "YCbCr"), ("TIFF", "LAB"), ("TIFF", "PA"), ("TIFF", "RGBA")]
# EXIF orientations, valid (1-8) and not (0, 9, 65535): the server applies or ignores them, never fails on them.
ORIENTATIONS = [None, 1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 65535]


@st.composite
def valid_images(draw: st.DrawFn) -> Payload:
    """A small random picture, well encoded: 1x1 up to 40x40, any mode, optionally EXIF-rotated or animated."""
    fmt, mode = draw(st.sampled_from(ENCODINGS))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    seed = draw(st.integers(0, 2**32 - 1))
    image = random_image(mode, size, seed)
    params: dict[str, object] = {}
    label = f"{fmt} {mode} {size[0]}x{size[1]} seed={seed}"
    if fmt == "JPEG":
        params.update(quality=draw(st.integers(1, 95)), progressive=draw(st.booleans()))
    if fmt in ("PNG", "GIF", "WEBP", "TIFF") and draw(st.booleans()):
        params.update(save_all=True, append_images=[random_image(mode, size, seed + 1)])
    elif fmt in ("PNG", "GIF") and mode in ("P", "L") and draw(st.booleans()):
        params["transparency"] = draw(st.integers(0, 255))
    orientation = draw(st.sampled_from(ORIENTATIONS)) if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else None
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    label += "".join(f" {k}={v}" for k, v in params.items() if k not in ("exif", "append_images"))
    label += f" orientation={orientation}" if orientation is not None else ""
    return Payload(label, encode(image, fmt, **params), EMBEDS)


@st.composite
def damaged_images(draw: st.DrawFn) -> Payload:
    """A valid image truncated, with bytes overwritten, or with junk appended."""
    image = draw(valid_images())
    data = bytearray(image.data)
    how = draw(st.sampled_from(["truncated", "overwritten", "junk appended"]))
    if how == "truncated":
        cut = draw(st.integers(0, len(data) - 1))
        return Payload(f"{image.label}, truncated to {cut} bytes", bytes(data[:cut]), INVALID if cut == 0 else EITHER)
    if how == "overwritten":
        for position, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                             min_size=1, max_size=8)):
            data[position] = value
        return Payload(f"{image.label}, bytes overwritten", bytes(data), EITHER)
    return Payload(f"{image.label}, junk appended", bytes(data) + draw(st.binary(min_size=1, max_size=64)), EITHER)


def claiming(fmt: str, width: int, height: int) -> bytes:
    """A tiny valid image whose header is rewritten to claim width x height (a decompression bomb header)."""
    if fmt == "PNG":
        data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    elif fmt == "JPEG":
        data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
        at = data.index(b"\xff\xc0")
        data[at + 5:at + 9] = struct.pack(">HH", height, width)
    elif fmt == "GIF":
        data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
        data[6:10] = struct.pack("<HH", width, height)
    else:  # BMP: signed; a negative height means top-down rows
        data = bytearray(encode(Image.new("RGB", (1, 1)), "BMP"))
        data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


@st.composite
def bomb_headers(draw: st.DrawFn) -> Payload:
    """Headers declaring any size (0 up to 2^32 - 1 a side) over a 1-pixel body: over the pixel limit is
    RESOURCE_EXHAUSTED, checked before decoding (a JPEG's at the reduced scale it is decoded at); an empty
    side is INVALID_ARGUMENT."""
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP"]))
    side = {"PNG": st.integers(0, 2**32 - 1), "BMP": st.integers(-2**31, 2**31 - 1)}.get(fmt, st.integers(0, 2**16 - 1))
    small = st.integers(-3 if fmt == "BMP" else 0, 5000)
    width, height = draw(small | side), draw(small | side)
    data = claiming(fmt, width, height)
    decoded = width * height
    if fmt == "JPEG" and decoded:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", MODEL_INPUT)
        decoded = image.size[0] * image.size[1]
    if width < 0 or height < 0:
        expect = EITHER  # BMP: Pillow reads some negative sizes as top-down, others as huge
    elif decoded > MAX_IMAGE_PIXELS:
        expect = EXHAUSTED
    elif fmt in ("PNG", "JPEG", "BMP") and width * height == 0:
        expect = INVALID
    else:
        expect = EITHER  # a declared size the 1-pixel body cannot fill: usually truncated, sometimes padded out
    return Payload(f"{fmt} header claiming {width}x{height}", data, expect)


@functools.cache
def at_the_pixel_limit() -> bytes:
    return encode(Image.new("L", (4000, 3000), 128), "JPEG")  # exactly MAX_IMAGE_PIXELS, really encoded


@functools.cache
def one_row_over_the_pixel_limit() -> bytes:
    return encode(Image.new("L", (4000, 3001), 128), "PNG")  # about 12 kB, really encoded


@functools.cache
def small_jpeg() -> bytes:
    return encode(random_image("RGB", (16, 16), 0), "JPEG")


def padded_to(size: int) -> Payload:
    """A valid JPEG with zero bytes after its end marker, `size` bytes in all."""
    data = small_jpeg() + b"\0" * (size - len(small_jpeg()))
    return Payload(f"JPEG padded to {size} bytes", data, EMBEDS if size <= MAX_IMAGE_BYTES else EXHAUSTED)


MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"BM", b"II*\x00", b"MM\x00*",
          b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"RIFF\xff\xff\xff\xffWEBPVP8L", b"\x00\x00\x01\x00", b"8BPS", b"P6\n"]

image_payloads = st.one_of(
    st.just(Payload("the anchor photo", b"", ANCHOR)),  # the real photo's bytes go in at request time
    valid_images(),
    valid_images(),  # twice: more of the examples' images are well-formed ones that must embed
    damaged_images(),
    bomb_headers(),
    st.binary(max_size=1024).map(lambda b: Payload("random bytes", b, INVALID if not b else EITHER)),
    st.builds(lambda magic, rest: Payload("a format's magic, then random bytes", magic + rest, EITHER),
              st.sampled_from(MAGICS), st.binary(max_size=256)),
    st.sampled_from([Payload("JPEG 4000x3000, exactly the pixel limit", b"", EMBEDS),
                     Payload("PNG 4000x3001, a row over the pixel limit", b"", EXHAUSTED)]).map(
        lambda p: Payload(p.label, at_the_pixel_limit() if p.expect == EMBEDS else one_row_over_the_pixel_limit(),
                          p.expect)),
    st.sampled_from([MAX_IMAGE_BYTES - 1, MAX_IMAGE_BYTES, MAX_IMAGE_BYTES + 1, MAX_IMAGE_BYTES + 4096]).map(padded_to),
)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def encode_unknown_fields(fields: list[tuple[int, int, int, bytes]]) -> bytes:
    """Well-formed fields the schema does not know (a newer client's): the server must ignore them."""
    out = bytearray()
    for number, wire_type, integer, blob in fields:
        out += varint(number << 3 | wire_type)
        out += {0: varint(integer), 1: struct.pack("<Q", integer), 5: struct.pack("<I", integer & 0xFFFFFFFF),
                2: varint(len(blob)) + blob}[wire_type]
    return bytes(out)


unknown_fields = st.lists(st.tuples(st.integers(3, 2**29 - 1), st.sampled_from([0, 1, 2, 5]),
                                    st.integers(0, 2**64 - 1), st.binary(max_size=32)),
                          max_size=3).map(encode_unknown_fields)


@st.composite
def embed_cases(draw: st.DrawFn, min_images: int = 0, max_images: int = MAX_IMAGES + 2) -> EmbedCase:
    payloads = draw(st.lists(image_payloads, min_size=min_images, max_size=max_images))
    ids = draw(st.lists(st.sampled_from(["", "img-1"]) | st.text(max_size=40), min_size=len(payloads),
                        max_size=len(payloads)))
    extras = draw(st.lists(st.just(b"") | unknown_fields, min_size=len(payloads), max_size=len(payloads)))
    top = draw(st.integers(0, 50) | st.integers(0, 2**32 - 1))
    return EmbedCase(payloads, ids, extras, top, draw(st.just(b"") | unknown_fields))


def embed_request(case: EmbedCase, anchor: bytes) -> embedder_pb2.EmbedRequest:
    request = embedder_pb2.EmbedRequest(top_categories=case.top_categories)
    for payload, id_, extra in zip(case.payloads, case.ids, case.image_unknown_fields):
        image = request.images.add(data=anchor if payload.expect == ANCHOR else payload.data, id=id_)
        image.MergeFromString(extra)
    request.MergeFromString(case.unknown_fields)
    return request


def expected_status(request: embedder_pb2.EmbedRequest) -> grpc.StatusCode:
    """What embedder.proto documents for the whole request."""
    if request.ByteSize() > MAX_MESSAGE_BYTES:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if not 1 <= len(request.images) <= MAX_IMAGES:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.OK


def check_embed_outcome(under_test: EmbedderUnderTest, case: EmbedCase, request: embedder_pb2.EmbedRequest,
                        call: object) -> None:
    """`call`: the EmbedResponse, or the grpc.RpcError the call raised."""
    expected = expected_status(request)
    if isinstance(call, grpc.RpcError):
        assert call.code() == expected, f"{call.code()}: {call.details()} (expected {expected})"
        assert call.details(), f"{call.code()} without a message"
        return
    assert expected == grpc.StatusCode.OK, f"OK, expected {expected}"
    response: embedder_pb2.EmbedResponse = call  # type: ignore[assignment]
    assert response.model_id == under_test.model_id
    assert [r.id for r in response.results] == case.ids, "results do not line up with the images"
    top = request.top_categories
    for index, (payload, result) in enumerate(zip(case.payloads, response.results)):
        outcome = result.WhichOneof("outcome")
        where = f"images[{index}] ({payload!r})"
        assert outcome in ("embedding", "error"), f"{where} has no outcome"
        if outcome == "error":
            allowed = set(CODE.values()) if payload.expect == EITHER else {CODE.get(payload.expect)}
            assert result.error.code in allowed, f"{where}: {result.error}"
            assert f"images[{index}]" in result.error.message, f"{where}: {result.error.message!r}"
            continue
        assert payload.expect in (EMBEDS, ANCHOR, EITHER), f"{where} was embedded"
        vector = np.frombuffer(result.embedding.vector.values, "<f4")
        assert result.embedding.vector.dimension == len(vector) == under_test.dimension, where
        assert np.isfinite(vector).all(), where
        assert abs(float(np.linalg.norm(vector.astype(np.float64))) - 1.0) < 1e-5, where
        if payload.expect == ANCHOR:  # batched with other images: the same vector up to float rounding
            np.testing.assert_allclose(vector, under_test.reference, atol=1e-5, err_msg=where)
        categories = result.embedding.categories
        assert len(categories) == (min(top, len(under_test.labels)) if top else len(under_test.labels)), where
        names = [c.category for c in categories]
        assert len(set(names)) == len(names) and set(names) <= set(under_test.labels), where
        probabilities = np.array([c.probability for c in categories], dtype=np.float64)
        assert np.isfinite(probabilities).all() and (probabilities >= 0).all() and (probabilities <= 1 + 1e-6).all()
        assert (np.diff(probabilities) <= 0).all(), f"{where}: categories not most probable first"
        if len(categories) == len(under_test.labels):
            assert abs(probabilities.sum() - 1.0) < 1e-4, where


def assert_anchor_unchanged(under_test: EmbedderUnderTest) -> None:
    """The server still answers the real photo, alone, with the vector it gave before any generated request."""
    response = under_test.stub.Embed(embedder_pb2.EmbedRequest(images=[embedder_pb2.Image(data=under_test.anchor)]),
                                     timeout=30)
    np.testing.assert_allclose(np.frombuffer(response.results[0].embedding.vector.values, "<f4"),
                               under_test.reference, rtol=0, atol=1e-6)


# Pillow warns (UserWarning) about the corrupt TIFFs and EXIF blocks it reads inside the in-process server.
quiet_pillow = pytest.mark.filterwarnings("ignore::UserWarning:PIL")
EMBEDDER_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@quiet_pillow
@settings(max_examples=120, **EMBEDDER_SETTINGS)
@given(embed_cases())
def test_arbitrary_embed_requests(embedder_under_test: EmbedderUnderTest, case: EmbedCase) -> None:
    request = embed_request(case, embedder_under_test.anchor)
    try:
        call: object = embedder_under_test.stub.Embed(request, timeout=60)
    except grpc.RpcError as error:
        call = error
    check_embed_outcome(embedder_under_test, case, request, call)
    assert_anchor_unchanged(embedder_under_test)


@quiet_pillow
@settings(max_examples=20, **EMBEDDER_SETTINGS)
@given(st.lists(embed_cases(min_images=1, max_images=MAX_IMAGES), min_size=2, max_size=4))
def test_arbitrary_concurrent_embed_requests(embedder_under_test: EmbedderUnderTest, cases: list[EmbedCase]) -> None:
    """Requests at once share inference batches (the fixture waits 20 ms for a batch to fill): each request
    still gets its own images' results, in its own order."""
    requests = [embed_request(case, embedder_under_test.anchor) for case in cases]
    futures = [embedder_under_test.stub.Embed.future(request, timeout=60) for request in requests]
    for case, request, future in zip(cases, requests, futures):
        try:
            call: object = future.result()
        except grpc.RpcError as error:
            call = error
        check_embed_outcome(embedder_under_test, case, request, call)
    assert_anchor_unchanged(embedder_under_test)


def every_encoding() -> list[Payload]:
    """Each (format, mode) pair at 1x1 and 37x23, animated where the format can be, with each EXIF orientation
    and palette transparency: the random draws above may miss a pair, this list does not."""
    payloads = []
    for fmt, mode in ENCODINGS:
        for size in [(1, 1), (37, 23)]:
            image = random_image(mode, size, 7)
            payloads.append(Payload(f"{fmt} {mode} {size}", encode(image, fmt), EMBEDS))
        if fmt in ("PNG", "GIF", "WEBP", "TIFF"):
            frames = dict(save_all=True, append_images=[random_image(mode, (5, 4), 8)])
            payloads.append(Payload(f"{fmt} {mode} animated", encode(random_image(mode, (5, 4), 9), fmt, **frames),
                                    EMBEDS))
        if fmt in ("PNG", "GIF") and mode in ("P", "L"):
            payloads.append(Payload(f"{fmt} {mode} transparent", encode(image, fmt, transparency=3), EMBEDS))
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        for orientation in ORIENTATIONS[1:]:
            exif = Image.Exif()
            exif[0x0112] = orientation
            payloads.append(Payload(f"{fmt} orientation={orientation}",
                                    encode(random_image("RGB", (9, 5), 10), fmt, exif=exif.tobytes()), EMBEDS))
    return payloads


@quiet_pillow
def test_every_format_mode_and_orientation_embeds(embedder_under_test: EmbedderUnderTest) -> None:
    payloads = every_encoding()
    for start in range(0, len(payloads), MAX_IMAGES):
        batch = payloads[start:start + MAX_IMAGES]
        case = EmbedCase(batch, [p.label for p in batch], [b""] * len(batch), 0, b"")
        request = embed_request(case, embedder_under_test.anchor)
        check_embed_outcome(embedder_under_test, case, request, embedder_under_test.stub.Embed(request, timeout=60))
    assert_anchor_unchanged(embedder_under_test)


@settings(max_examples=20, **EMBEDDER_SETTINGS)
@given(unknown_fields)
def test_model_info_ignores_unknown_fields(embedder_under_test: EmbedderUnderTest, extra: bytes) -> None:
    request = embedder_pb2.GetModelInfoRequest()
    request.MergeFromString(extra)
    info = embedder_under_test.stub.GetModelInfo(request, timeout=10)
    assert (info.model_id, info.dimension) == (embedder_under_test.model_id, embedder_under_test.dimension)


# A request whose bytes are not a valid EmbedRequest (broken wire format, a string field that is not UTF-8)
# gets INVALID_ARGUMENT from the servers' decode guard (grpcio alone would answer INTERNAL).
UNPARSEABLE = "the request to /lookalike.v1.Embedder/Embed is not a valid message"


@st.composite
def wire_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or a small real EmbedRequest's bytes truncated, overwritten or with bytes inserted."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    payloads = draw(st.lists(valid_images() | bomb_headers(), min_size=1, max_size=3))
    ids = draw(st.lists(st.text(max_size=12), min_size=len(payloads), max_size=len(payloads)))
    request = embedder_pb2.EmbedRequest(images=[embedder_pb2.Image(data=p.data, id=i) for p, i in zip(payloads, ids)],
                                        top_categories=draw(st.integers(0, 2**32 - 1)))
    data = bytearray(request.SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["truncate", "overwrite", "insert"]))
        if how == "truncate":
            del data[position:]
        elif how == "overwrite" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@quiet_pillow
@settings(max_examples=80, **EMBEDDER_SETTINGS)
@given(wire_bytes())
def test_arbitrary_embed_wire_bytes(embedder, embedder_under_test: EmbedderUnderTest, data: bytes) -> None:
    _, channel = embedder
    raw = channel.unary_unary("/lookalike.v1.Embedder/Embed")  # bytes in, bytes out: no client-side (de)serializing
    try:
        request = embedder_pb2.EmbedRequest.FromString(data)
    except DecodeError:
        request = None
    try:
        call: object = embedder_pb2.EmbedResponse.FromString(raw(data, timeout=60))
    except grpc.RpcError as error:
        if request is None:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith(UNPARSEABLE)
            assert_anchor_unchanged(embedder_under_test)
            return
        call = error
    assert request is not None, "the server accepted bytes this process's protobuf cannot parse"
    case = EmbedCase([Payload("from wire bytes", image.data, EITHER) for image in request.images],
                     [image.id for image in request.images], [b""] * len(request.images), request.top_categories, b"")
    check_embed_outcome(embedder_under_test, case, request, call)
    assert_anchor_unchanged(embedder_under_test)
