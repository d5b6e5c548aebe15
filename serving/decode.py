"""Encoded image bytes -> RGB uint8, for the `segment` python model; importable without Triton.

Every refusal is a `ValueError` whose message names the problem in one line, because the
python backend sends that message to the client as an INVALID_ARG error.

`decode_image` accepts JPEG, PNG, BMP and WebP, recognised by their first bytes, and refuses
anything else (TIFF, GIF, PNM, JPEG 2000, HDR, EXR, ...) before decoding: OpenCV would decode
most of them, and some (TIFF) give their true size only once decoded. Width and height are read
from the header and checked against `max_pixels` and MAX_SIDE before a pixel is allocated; the
decoded size must then equal the header's. One rule per pixel layout, whatever the container;
every image comes out as RGB uint8 [H, W, 3]:

    layout in the file          carried by          becomes
    RGB                         all four            itself
    grey, 1/2/4/8 bits          JPEG, PNG, BMP      the grey value in R, G and B
    grey + alpha                PNG                 the grey value in R, G and B; alpha dropped
    palette, 1/2/4/8 bits       PNG, BMP            each index's colour; its transparency dropped
    RGBA                        PNG, BMP 32, WebP   R, G, B as stored; alpha dropped
    16 bits per channel         PNG                 as above, then each v -> round(v / 257),
                                                    i.e. v * 255 / 65535 to the nearest integer
    CMYK / YCCK                 JPEG                RGB by OpenCV's plain conversion
    animation                   APNG, WebP          the first frame
    EXIF orientation 2..8       JPEG, PNG, WebP     applied: the image is turned upright first

Transparency is ignored, not composited: a transparent pixel is segmented with whatever colour
is stored under it. Colour profiles (ICC) and gamma are not applied. OpenCV alone would turn
16 bits into 8 by dropping the low byte (floor(v / 256)) and would skip WebP's EXIF orientation;
both are done here instead so that every format follows the same rule.

Decoding costs about what the header's size costs, whatever else the file holds. PNG data past
the last row is ignored without being inflated: OpenCV's libpng would inflate and drop all of it
(4.4 s for a 2 MB file), so Pillow, which stops at the last row, decodes 1 to 8 bits, and OpenCV
decodes 16 bits once a bounded inflate has cut the data to the rows. More chunks, markers or
progressive scans than any encoder writes are refused (the MAX_* limits below).
"""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from serving.image_headers import (
    PNG_IEND,
    PngLayout,
    jpeg_scans_end,
    png_chunk,
    png_rows_size,
    read_header,
)
from serving.model_limits import DEFAULT_MAX_PIXELS  # the one home of the limits

MAX_SIDE = 16384  # OpenCV's own decoders refuse wider images; say so before they do
# EXIF orientation -> the steps that turn the stored pixels upright (as PIL.ImageOps.exif_transpose).
UPRIGHT = {
    2: lambda image: cv2.flip(image, 1),
    3: lambda image: cv2.rotate(image, cv2.ROTATE_180),
    4: lambda image: cv2.flip(image, 0),
    5: cv2.transpose,
    6: lambda image: cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE),
    7: lambda image: cv2.flip(cv2.transpose(image), -1),
    8: lambda image: cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


def _decode_png(data: bytes, layout: PngLayout, width: int, height: int) -> np.ndarray:
    """RGB uint8 by the module docstring's rules, at the cost of the header's size whatever the
    data holds. OpenCV's libpng inflates (and drops) all the data past the last row: 4.4 s for a
    2 MB file that inflates to 2 GB. Pillow stops at the last row, so it decodes 1 to 8 bits; it
    would cut 16 bits to 8 by dropping the low byte, so OpenCV decodes those, after an inflate
    bounded by the rows' size (+70% of their decode time; Pillow costs what OpenCV did, +1-10%)."""
    if layout.data_at < 0 or not layout.data:
        raise ValueError("corrupt or truncated PNG: it has no image data chunk")
    view = memoryview(data)
    head = view[: layout.data_at]  # signature, IHDR and whatever else comes before the image data
    parts = [view[start:end] for start, end in layout.data]
    if layout.depth <= 8:
        # As one IDAT chunk (Pillow reads each chunk's header in Python) with nothing after it.
        # Pillow skips the IDAT checksum, so it is not computed here.
        length = struct.pack(">I", sum(end - start for start, end in layout.data))
        merged = b"".join((head, length, b"IDAT", *parts, bytes(4), PNG_IEND))
        try:
            with PngImagePlugin.PngImageFile(io.BytesIO(merged)) as image:
                image.load()
                return _pillow_rgb(image)
        except Exception as err:  # Pillow signals bad data with OSError, SyntaxError, zlib.error, ...
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ValueError(f"corrupt or truncated PNG: its image data could not be decoded ({reason})") from None
    need = png_rows_size(width, height, layout)
    try:
        rows = zlib.decompressobj().decompress(b"".join(parts), need + 1)
    except zlib.error as err:
        raise ValueError(f"corrupt PNG: its image data does not inflate ({err})") from None
    if len(rows) < need:
        raise ValueError(
            f"corrupt or truncated PNG: its image data holds {len(rows)} of the {need} bytes "
            f"its {width}x{height} header needs"
        )
    if len(rows) > need:  # more than the rows: OpenCV decodes them alone, the surplus ignored as by Pillow
        data = b"".join((head, png_chunk(b"IDAT", zlib.compress(rows[:need], 0)), PNG_IEND))
    # IMREAD_COLOR expands grey and drops alpha; ANYDEPTH keeps the 16 bits, to be rounded here.
    image = cv2.imdecode(
        np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION | cv2.IMREAD_ANYDEPTH
    )
    if image is None:
        raise ValueError("corrupt or truncated PNG: OpenCV could not decode it")
    if image.dtype == np.uint16:
        image = cv2.convertScaleAbs(image, alpha=1 / 257)  # round(v / 257), saturated to 0..255
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _pillow_rgb(image: Image.Image) -> np.ndarray:
    """A decoded 1- to 8-bit PNG as a new RGB uint8 array, by the module docstring's rules."""
    if image.mode == "RGB":
        return np.array(image)
    if image.mode == "RGBA":
        return cv2.cvtColor(np.asarray(image), cv2.COLOR_RGBA2RGB)  # alpha dropped, not composited
    if image.mode in ("P", "PA"):
        image.info.pop("transparency", None)  # dropped; kept, convert() would warn about it
        return np.array(image.convert("RGB"))  # each index's colour
    if image.mode != "L":
        image = image.convert("L")  # "1": 0 or 255; "LA": alpha dropped
    return cv2.cvtColor(np.asarray(image), cv2.COLOR_GRAY2RGB)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded JPEG/PNG/BMP/WebP bytes -> RGB uint8 [H, W, 3] by the rules in the module docstring."""
    if isinstance(data, np.ndarray):  # a BYTES tensor element may arrive as np.bytes_/object
        data = data.tobytes()
    data = bytes(data)
    if not data:
        raise ValueError("empty image: the request carried 0 bytes")
    (kind, width, height, orientation), found = read_header(data)
    if width < 1 or height < 1:
        raise ValueError(f"{kind} header gives an empty image ({width}x{height})")
    if width * height > max_pixels or max(width, height) > MAX_SIDE:
        raise ValueError(
            f"{kind} image is {width}x{height}, over the limit of {max_pixels} pixels and {MAX_SIDE} per side"
        )
    # A JPEG cut short inside its last scan has no end-of-image marker after that scan; OpenCV
    # would decode it anyway with grey rows, so refuse it here. The walk also counts the scans.
    if kind == "JPEG" and not jpeg_scans_end(data, found):
        raise ValueError("truncated JPEG: the image data ends before the end-of-image marker")
    if kind == "PNG":
        image = _decode_png(data, found, width, height)
    else:
        # IMREAD_COLOR expands grey and palettes and drops alpha; the orientation is applied
        # below, alike for every format.
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            raise ValueError(f"corrupt or truncated {kind}: OpenCV could not decode it")
    if image.shape[:2] != (height, width):  # the header checked above is not the one decoded
        raise ValueError(
            f"corrupt {kind}: the header says {width}x{height} but the data decodes "
            f"to {image.shape[1]}x{image.shape[0]}"
        )
    if kind != "PNG":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if orientation in UPRIGHT:
        image = UPRIGHT[orientation](image)
    return np.ascontiguousarray(image)
