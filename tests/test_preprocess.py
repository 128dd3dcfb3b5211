"""Preprocessing against Pillow's own reference output: EXIF rotation, colour modes, resize, limits."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lookalike.embedder.preprocess import ImageLimits, decode_image
from lookalike.serving.errors import InvalidArgument, ResourceExhausted

SIZE = (64, 48)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def gradient(width: int = 120, height: int = 80) -> Image.Image:
    """An asymmetric RGB picture, so a wrong rotation or flip cannot go unnoticed."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    array = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                            np.full((height, width, 1), 40, np.float32)], axis=2)
    return Image.fromarray(array.astype(np.uint8))


def reference(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize(SIZE, Image.Resampling.BILINEAR))


def test_png_resize_matches_pillow_bilinear() -> None:
    image = gradient()
    decoded = decode_image(encode(image, "PNG"), SIZE)
    assert decoded.shape == (SIZE[1], SIZE[0], 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, reference(image))


@pytest.mark.parametrize("orientation, transpose", [
    (3, Image.Transpose.ROTATE_180),
    (6, Image.Transpose.ROTATE_270),
    (8, Image.Transpose.ROTATE_90),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_orientation_is_applied(orientation: int, transpose: Image.Transpose) -> None:
    image = gradient()
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(image, "PNG", exif=exif.tobytes()), SIZE)
    np.testing.assert_array_equal(decoded, reference(image.transpose(transpose)))


def test_jpeg_with_exif_rotation_is_upright() -> None:
    image = gradient(160, 90)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    decoded = decode_image(data, SIZE)
    expected = reference(Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_270))
    assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 2.0


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1"])
def test_colour_modes_become_rgb_like_pillow(mode: str) -> None:
    image = gradient().convert(mode)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    decoded = decode_image(encode(image, fmt), SIZE)
    np.testing.assert_array_equal(decoded, reference(image))


def test_sixteen_bit_greyscale_is_rescaled_not_clipped() -> None:
    array = np.linspace(0, 65535, 120 * 80).reshape(80, 120).astype(np.uint16)
    decoded = decode_image(encode(Image.fromarray(array), "PNG"), SIZE)
    assert decoded.max() > 250 and decoded.min() < 5
    assert abs(float(decoded.mean()) - 127.5) < 3, "clipping would push the mean towards 255"
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 1])


def test_sixteen_bit_pgm_is_rescaled_not_clipped() -> None:
    """Pillow opens a 16-bit PGM as mode I, which the rescaling missed: a mid-grey photo came out white."""
    header = b"P5 120 80 65535\n"
    array = np.linspace(0, 65535, 120 * 80).reshape(80, 120).astype(">u2")
    decoded = decode_image(header + array.tobytes(), SIZE)
    assert decoded.max() > 250 and decoded.min() < 5
    assert abs(float(decoded.mean()) - 127.5) < 3, "clipping would push the mean towards 255"


def test_partial_transparency_is_blended_over_white_as_compositing_does() -> None:
    """Flattened by pasting through the alpha (two full-size copies fewer than compositing in RGBA): the
    same pixels as Pillow's alpha_composite over white, to within one level of rounding."""
    from lookalike.pixels import to_rgb

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, size=(64, 64, 4), dtype=np.uint8), "RGBA")
    composited = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    difference = np.abs(np.asarray(to_rgb(rgba), np.int16) - np.asarray(composited, np.int16))
    assert difference.max() <= 1


def test_transparency_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))
    decoded = decode_image(encode(rgba, "PNG"), (40, 40))
    assert tuple(decoded[20, 35]) == (255, 255, 255)
    assert tuple(decoded[20, 5]) == (0, 0, 255)


def test_webp_decodes() -> None:
    image = gradient()
    decoded = decode_image(encode(image, "WEBP", lossless=True), SIZE)
    np.testing.assert_array_equal(decoded, reference(image))


def test_empty_bytes_are_invalid() -> None:
    with pytest.raises(InvalidArgument, match=r"photo is empty \(0 bytes\)"):
        decode_image(b"", SIZE, name="photo")


def test_text_is_not_an_image() -> None:
    with pytest.raises(InvalidArgument, match="images\\[2\\] is not a readable image"):
        decode_image(b"just some text, not a picture\n" * 10, SIZE, name="images[2]")


def test_truncated_jpeg_is_invalid() -> None:
    data = encode(gradient(400, 300), "JPEG", quality=90)
    with pytest.raises(InvalidArgument, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2], SIZE)


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to claim width x height (a decompression bomb header)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = data[12:29]  # chunk type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def test_pixel_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(ResourceExhausted, match=r"20000x20000 = 400000000 pixels, limit is 40000000"):
        decode_image(png_claiming(20000, 20000), SIZE)


def test_a_large_jpeg_counts_the_pixels_it_is_decoded_at() -> None:
    """The pixel limit was checked before JPEG's reduced-scale decoding: a 45-60-megapixel camera photo, which
    decodes at an eighth of its size in milliseconds, was refused."""
    photo = encode(gradient(2400, 1800), "JPEG", quality=90)  # 4.32 megapixels, decoded at 300x225
    limits = ImageLimits(max_pixels=1_000_000)
    assert decode_image(photo, SIZE, limits).shape == (SIZE[1], SIZE[0], 3)
    with pytest.raises(ResourceExhausted, match=r"2400x1800, decoded at 600x450 = 270000 pixels, limit is 100000"):
        decode_image(photo, (500, 400), ImageLimits(max_pixels=100_000))  # draft stops at 1/4 for 500x400


def test_byte_limit() -> None:
    with pytest.raises(ResourceExhausted, match="has 2000 bytes, limit is 1000 bytes"):
        decode_image(b"\xff" * 2000, SIZE, ImageLimits(max_bytes=1000))


def ico_holding_png(width: int, height: int) -> bytes:
    """An ICO file whose one entry is a real greyscale PNG of width x height (all black, so it compresses to
    a few hundred KB): Pillow decodes it whole while opening the ICO, before any size can be checked."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    rows = b"".join(compressor.compress(b"\x00" * (width + 1)) for _ in range(height)) + compressor.flush()
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png


def test_formats_outside_the_list_are_refused_unopened() -> None:
    """An ICO wrapping a 12000x12000 PNG (about 100 KB) made Pillow decode 144 megapixels while opening it, past
    the pixel limit checked after opening; only the listed formats are opened now."""
    with pytest.raises(InvalidArgument, match=r"images\[0\] is not a readable image .* expected JPEG, PNG, WebP, GIF, "
                                              r"BMP, TIFF or PNM \(PGM/PPM\)"):
        decode_image(ico_holding_png(12_000, 12_000), SIZE, name="images[0]")
    for fmt in ("BMP", "TIFF", "GIF", "PPM"):
        assert decode_image(encode(gradient(), fmt), SIZE).shape == (48, 64, 3), fmt


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_transparency_of_greyscale_and_rgb_pngs_is_composited_over_white(mode: str) -> None:
    """PNG optimisers store an on/off alpha as one transparent colour (a tRNS chunk) in an L or RGB image:
    its transparent pixels must be white, as with an alpha channel, not the colour they hide."""
    image = Image.new(mode, (40, 40), 0 if mode == "L" else (0, 0, 0))
    image.paste(200 if mode == "L" else (0, 0, 255), (0, 0, 20, 40))
    transparent = 0 if mode == "L" else (0, 0, 0)
    decoded = decode_image(encode(image, "PNG", transparency=transparent), (40, 40))
    assert tuple(decoded[20, 35]) == (255, 255, 255)
    assert tuple(decoded[20, 5]) == ((200, 200, 200) if mode == "L" else (0, 0, 255))


def test_decodes_hold_their_pixels_in_one_budget_across_threads() -> None:
    """Decode threads sized to the cores each peak near 4 bytes a decoded pixel (10 for 16-bit grey): a burst
    of large photos took them all at once, past a pod's memory limit. Each decode now holds its pixels in a
    shared budget while it runs; one larger than the budget runs alone."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import contextmanager

    from lookalike.embedder.preprocess import PixelBudget, decode_face_image

    class Watched(PixelBudget):
        most = 0

        @contextmanager
        def holding(self, pixels: int):  # type: ignore[no-untyped-def]
            with super().holding(pixels):
                Watched.most = max(Watched.most, self.held)
                yield

    photo = encode(Image.new("RGB", (1000, 800), (200, 30, 30)), "PNG")
    budget = Watched(2 * 800_000)  # two of these at once
    with ThreadPoolExecutor(max_workers=6) as pool:
        decoded = list(pool.map(lambda _: decode_face_image(photo, (32, 32), budget=budget)[0], range(24)))
    assert all(pixels.shape == (32, 32, 3) for pixels in decoded)
    assert 800_000 <= Watched.most <= 1_600_000 and budget.held == 0
    alone = Watched(100)
    assert decode_face_image(photo, (32, 32), budget=alone)[0].shape == (32, 32, 3) and alone.held == 0
    done = threading.Event()
    with budget.holding(1_600_000):  # the budget is full: a decode waits for it
        waiting = threading.Thread(target=lambda: (decode_face_image(photo, (32, 32), budget=budget), done.set()))
        waiting.start()
        assert not done.wait(0.5)
    waiting.join(10)
    assert done.is_set()


def test_bench_decoding_compares_the_budget_with_none() -> None:
    """`lookalike bench decoding` on small photos: each configuration ran, against the first (no budget)."""
    import contextlib
    import json

    from lookalike.tools.bench_decoding import CONFIGURATIONS, run_decoding_bench

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_decoding_bench(megapixels=4, turns=1, as_json=True) == 0
    rows = json.loads(printed.getvalue())["rows"]
    assert [row["configuration"] for row in rows] == [name for name, _, _ in CONFIGURATIONS]
    assert rows[0]["memory_ratio"] == rows[0]["time_ratio"] == 1.0
    assert all(row["decode_peak_mb"] > 0 and row["seconds"] > 0 for row in rows)
