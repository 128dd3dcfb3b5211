"""A photo's pixels as the embedder reads them: turned as its EXIF orientation says, transparency over white,
16-bit grey rescaled to 8 bits. Shared by the embedder and the web page, which shows each photo as the embedder
took it."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# Transparent pixels become white: catalogue cut-outs are shot on white, not black.
BACKGROUND = (255, 255, 255)


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as it is when the EXIF block is unreadable (browsers
    show such photos too, so refusing them would surprise the shopper; a PNG's bad eXIf chunk makes Pillow
    raise SyntaxError, others other types)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block surfaces as many types
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited over a white background."""
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        # A palette entry, grey level or colour marked transparent (PNG's tRNS chunk): an alpha channel
        # stored as one colour, as PNG optimisers write an on/off alpha.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        # Pasted through its alpha onto white rather than composited in RGBA: two full-size copies fewer
        # (a 40-megapixel cut-out took 610 MB at its peak).
        flattened = Image.new("RGB", rgba.size, BACKGROUND)
        flattened.paste(rgba, mask=rgba.getchannel("A"))
        return flattened
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit greyscale (PNG's I;16, and PNM's, which Pillow opens as I): convert would clip at 255
        # instead of rescaling.
        array = np.clip(np.asarray(image, dtype=np.float32), 0, 65535) / 257.0
        image = Image.fromarray(array.round().astype(np.uint8))
    return image.convert("RGB")
