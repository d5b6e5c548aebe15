"""Pure image functions the `segment` ensemble's python models use; importable without Triton.

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
"""

from __future__ import annotations

import io
import re
import struct
from typing import NamedTuple

import cv2
import numpy as np
from PIL import BmpImagePlugin, Image, JpegImagePlugin, PngImagePlugin

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 8000x5000; a 30000x30000 image would need 2.7 GB as RGB
MAX_SIDE = 16384  # OpenCV's own decoders refuse wider images; say so before they do
ACCEPTED = "JPEG, PNG, BMP or WebP"
# Refused by name so that the message says what was sent (prefix -> name).
REFUSED_MAGIC = {
    b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"II+\x00": "BigTIFF", b"MM\x00+": "BigTIFF",
    b"GIF87a": "GIF", b"GIF89a": "GIF",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n": "JPEG 2000", b"\xff\x4f\xff\x51": "JPEG 2000",
    b"\x00\x00\x00\x0cJXL \r\n\x87\n": "JPEG XL", b"\xff\x0a": "JPEG XL",
    b"#?RADIANCE": "Radiance HDR", b"#?RGBE": "Radiance HDR", b"v/1\x01": "OpenEXR",
    b"\x59\xa6\x6a\x95": "Sun raster",
}
NETPBM = re.compile(rb"P[1-7Ff]\s")  # PBM, PGM, PPM (P1-P6), PAM (P7), PFM (PF, Pf)
# Pillow's header readers, built directly: Image.open would add Pillow's process-wide
# decompression-bomb check, whose error would pre-empt the size message below. They read up to
# the first scan (JPEG) or image data chunk (PNG) and never decode pixels.
HEADER_READERS = {"JPEG": JpegImagePlugin.JpegImageFile, "PNG": PngImagePlugin.PngImageFile,
                  "BMP": BmpImagePlugin.BmpImageFile}
ORIENTATION = 0x0112
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


class ImageHeader(NamedTuple):
    format: str  # "JPEG", "PNG", "BMP" or "WebP"
    width: int  # as stored, before the orientation is applied
    height: int
    orientation: int  # EXIF 1..8; 1 (as stored) when absent or unreadable


def image_format(data: bytes) -> str:
    """The accepted format the first bytes announce; anything else is refused."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    name = next((name for magic, name in REFUSED_MAGIC.items() if data.startswith(magic)), None)
    if name is None and NETPBM.match(data):
        name = "Netpbm (PBM/PGM/PPM/PAM/PFM)"
    if name is None and data[4:8] == b"ftyp":
        name = "HEIF/AVIF"
    if name:
        raise ValueError(f"{name} images are not accepted: send {ACCEPTED}")
    raise ValueError(f"not an image: {len(data)} bytes in none of the accepted formats ({ACCEPTED})")


def image_header(data: bytes) -> ImageHeader:
    """What the header alone says, read before decoding so that a 30000x30000 PNG of a few kB is
    refused without allocating it."""
    kind = image_format(data)
    if kind == "WebP":
        return _webp_header(data)
    try:
        with HEADER_READERS[kind](io.BytesIO(data)) as image:
            width, height = image.size
            exif = image.info.get("exif")
    except Exception as err:  # Pillow signals bad data with SyntaxError, OSError, ValueError, ...
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"corrupt or truncated {kind}: its header could not be read ({reason})") from None
    return ImageHeader(kind, width, height, _orientation(exif))


def _webp_header(data: bytes) -> ImageHeader:
    # Fixed offsets of the RIFF layout. Pillow's WebP reader is no header reader: it hands the
    # whole file to libwebp's animation decoder, which allocates the canvas before we could check it.
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return ImageHeader("WebP", width, height, _orientation(_riff_chunk(data, b"EXIF")))
    if chunk == b"VP8 " and len(data) >= 30:  # simple lossy: no room for EXIF
        width, height = struct.unpack("<HH", data[26:30])
        return ImageHeader("WebP", width & 0x3FFF, height & 0x3FFF, 1)
    if chunk == b"VP8L" and len(data) >= 25:  # simple lossless: no room for EXIF
        bits = int.from_bytes(data[21:25], "little")
        return ImageHeader("WebP", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF), 1)
    raise ValueError("corrupt or truncated WebP: the header is incomplete")


def _riff_chunk(data: bytes, fourcc: bytes) -> bytes | None:
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        if data[pos:pos + 4] == fourcc:
            return data[pos + 8:pos + 8 + size]
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


def _orientation(exif: bytes | None) -> int:
    if not exif:
        return 1
    try:
        tags = Image.Exif()
        tags.load(exif)
        value = tags.get(ORIENTATION, 1)
    except Exception:  # broken metadata is ignored, as OpenCV ignores it: the pixels are still fine
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _scan_after_last_eoi(data: bytes) -> bool:
    end = data.rfind(b"\xff\xd9")
    return end < 0 or data.find(b"\xff\xda", end + 2) >= 0


def _png_chunk_past_the_end(data: bytes) -> int | None:
    """The declared length of the first chunk that runs past the data, if any."""
    pos, size = 8, len(data)
    while pos + 8 <= size:
        length = int.from_bytes(data[pos:pos + 4], "big")
        if pos + 12 + length > size:
            return length
        if data[pos + 4:pos + 8] == b"IEND":
            return None
        pos += 12 + length
    return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded JPEG/PNG/BMP/WebP bytes -> RGB uint8 [H, W, 3] by the rules in the module docstring."""
    if isinstance(data, np.ndarray):  # a BYTES tensor element may arrive as np.bytes_/object
        data = data.tobytes()
    data = bytes(data)
    if not data:
        raise ValueError("empty image: the request carried 0 bytes")
    kind, width, height, orientation = image_header(data)
    if width < 1 or height < 1:
        raise ValueError(f"{kind} header gives an empty image ({width}x{height})")
    if width * height > max_pixels or max(width, height) > MAX_SIDE:
        raise ValueError(f"{kind} image is {width}x{height}, over the limit of {max_pixels} pixels "
                         f"and {MAX_SIDE} per side")
    # A JPEG cut short inside its last scan has no end-of-image marker after that scan's start;
    # OpenCV would decode it anyway with grey rows, so refuse it here. Inside a scan 0xFF is
    # always followed by 0x00 or a restart marker, so searching from the last EOI for a later
    # start-of-scan finds exactly that (and reads only the few bytes after the EOI).
    if kind == "JPEG" and _scan_after_last_eoi(data):
        raise ValueError("truncated JPEG: the image data ends before the end-of-image marker")
    # OpenCV 4.11's PNG reader allocates and zero-fills each chunk's declared length before
    # reading it: a 2 kB file whose chunk claimed 2.6 GB cost 2.5 GB and 1.5 s. Every chunk must fit.
    if kind == "PNG" and (length := _png_chunk_past_the_end(data)) is not None:
        raise ValueError(f"corrupt or truncated PNG: a chunk declares {length} bytes, past the end of the data")
    # IMREAD_COLOR expands grey and palettes and drops alpha; the orientation is applied below,
    # alike for every format; ANYDEPTH keeps PNG's 16 bits so that they are rounded, not truncated.
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION | (cv2.IMREAD_ANYDEPTH if kind == "PNG" else 0)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise ValueError(f"corrupt or truncated {kind}: OpenCV could not decode it")
    if image.shape[:2] != (height, width):  # the header checked above is not the one decoded
        raise ValueError(f"corrupt {kind}: the header says {width}x{height} but the data decodes "
                         f"to {image.shape[1]}x{image.shape[0]}")
    if image.dtype == np.uint16:
        image = cv2.convertScaleAbs(image, alpha=1 / 257)  # round(v / 257), saturated to 0..255
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if orientation in UPRIGHT:
        image = UPRIGHT[orientation](image)
    return np.ascontiguousarray(image)


def palette_array(palette, num_entries: int = 256) -> np.ndarray:
    """[C, 3] palette padded with black to 256 rows, so any uint8 label indexes it safely."""
    colours = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    if colours.size and (colours.min() < 0 or colours.max() > 255):
        raise ValueError("palette colours must be within 0..255")
    table = np.zeros((max(num_entries, len(colours)), 3), np.uint8)
    table[:len(colours)] = colours
    return table


def colorize(labels: np.ndarray, palette) -> np.ndarray:
    """[H, W] labels -> [H, W, 3] uint8 colours; labels without a palette entry are black."""
    table = palette if isinstance(palette, np.ndarray) and palette.dtype == np.uint8 and len(palette) >= 256 \
        else palette_array(palette)
    labels = np.asarray(labels)
    if labels.dtype == np.uint8 and labels.ndim == 2 and len(table) == 256:
        # A 3-channel lookup table: ~7x faster than fancy indexing at 512x1024, same result.
        return cv2.LUT(cv2.merge([labels, labels, labels]), np.ascontiguousarray(table[:256]).reshape(256, 1, 3))
    return table[labels.astype(np.intp)]


def overlay(image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """The colour mask blended over the image: (1 - alpha) * image + alpha * colour, rounded."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} must be within 0..1")
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    # OpenCV's saturating uint8 blend: 2x faster than the float formula at 512x1024 and equal
    # to it at alpha 0.5 (elsewhere at most 1 apart where a value falls on .5).
    return cv2.addWeighted(np.ascontiguousarray(image), 1.0 - alpha, colorize(labels, palette), alpha, 0.0)


def class_share(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[C] float32 fraction of all pixels per class; pixels labelled >= C count only in the total."""
    labels = np.asarray(labels)
    if labels.dtype == np.uint8 and labels.size:  # OpenCV's histogram: ~8x faster than bincount
        counts = cv2.calcHist([np.ascontiguousarray(labels)], [0], None, [256], [0, 256]).ravel()[:num_classes]
    else:
        counts = np.bincount(labels.ravel().astype(np.intp), minlength=num_classes)[:num_classes]
    return (counts / max(labels.size, 1)).astype(np.float32)


def resize_labels_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w] labels -> [H, W] by nearest neighbour; size is (H, W).

    INTER_NEAREST_EXACT samples pixel centres (what PIL and torch 'nearest-exact' do);
    plain INTER_NEAREST is shifted by half a pixel.
    """
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"target size {size} must be positive")
    if labels.shape == (height, width):
        return labels.copy()
    return cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w] float map (confidence, one expert's weight) -> float32 [H, W] by bilinear resize."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"target size {size} must be positive")
    values = np.ascontiguousarray(values, np.float32)
    if values.shape == (height, width):
        return values.copy()
    return cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)


def parse_working_size(text: str) -> tuple[int, int] | None:
    """`"HxW"` -> (H, W); `""` -> None (keep each image's own size)."""
    if not text.strip():
        return None
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"working_size {text!r}: expected HxW, e.g. 512x1024, or empty") from None
    if height < 32 or width < 32:
        raise ValueError(f"working_size {text!r}: both sides must be at least 32")
    return height, width


def resize_to_working_size(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """One size for every request, so Triton can batch requests of different sizes."""
    if size is None or image.shape[:2] == tuple(size):
        return image
    shrinking = image.shape[0] * image.shape[1] > size[0] * size[1]
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
