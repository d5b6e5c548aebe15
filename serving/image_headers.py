"""Which image format a request carries, and its size, read from the header alone.

`read_header` recognises JPEG, PNG, BMP and WebP by their first bytes and refuses anything else
by name (TIFF, GIF, PNM, JPEG 2000, HDR, EXR, ...): OpenCV would decode most of them, and some
(TIFF) give their true size only once decoded. Width, height and EXIF orientation come from
the header without decoding, so serving/decode.py checks the size before a pixel is allocated.
More chunks, markers or progressive scans than any encoder writes are refused (the MAX_*
limits below): walking them costs CPU, and libjpeg spends seconds on thousands of empty scans.
Every refusal is a one-line `ValueError`.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from typing import NamedTuple

from PIL import BmpImagePlugin, Image, PngImagePlugin

ACCEPTED = "JPEG, PNG, BMP or WebP"
# Refused by name so that the message says what was sent (prefix -> name).
REFUSED_MAGIC = {
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "BigTIFF",
    b"MM\x00+": "BigTIFF",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"\x00\x00\x00\x0cjP  \r\n\x87\n": "JPEG 2000",
    b"\xff\x4f\xff\x51": "JPEG 2000",
    b"\x00\x00\x00\x0cJXL \r\n\x87\n": "JPEG XL",
    b"\xff\x0a": "JPEG XL",
    b"#?RADIANCE": "Radiance HDR",
    b"#?RGBE": "Radiance HDR",
    b"v/1\x01": "OpenEXR",
    b"\x59\xa6\x6a\x95": "Sun raster",
}
NETPBM = re.compile(rb"P[1-7Ff]\s")  # PBM, PGM, PPM (P1-P6), PAM (P7), PFM (PF, Pf)
# Pillow's header readers, built directly: Image.open would add Pillow's process-wide
# decompression-bomb check, whose error would pre-empt the size message below. They read up to
# the first image data chunk (PNG) and never decode pixels. JPEG's markers are walked here
# instead: Pillow's JPEG reader steps through fill bytes one at a time in Python (3 s for 10 MB).
HEADER_READERS = {"PNG": PngImagePlugin.PngImageFile, "BMP": BmpImagePlugin.BmpImageFile}
# Structure limits, far above what encoders write. Without them the walks in Python below (and
# Pillow's PNG header reader) were the slow part, 0.4-2.5 s for 10 MB of empty PNG chunks, JPEG
# markers or WebP chunks; and libjpeg visits every block in every progressive scan, even an
# empty one of 12 bytes: 10000 of them over a 1024x1024 image took 7 s.
MAX_PNG_CHUNKS = 100_000  # one IDAT chunk per row of a 16384-row image would be 16384
MAX_PNG_CHUNKS_BEFORE_DATA = 1_000  # the header reader's chunks (metadata): a handful
MAX_JPEG_MARKERS = 2_000  # each walk: a few dozen before the first scan, one or two per scan
MAX_JPEG_SCANS = 100  # progressive encoders write about 10
MAX_WEBP_CHUNKS = 100_000  # one per animation frame, plus a few
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)  # x0, y0, dx, dy
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
JPEG_NEXT_MARKER = re.compile(rb"[^\xff]*\xff+")  # junk, then fill bytes: the marker's code follows
JPEG_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # in a scan 0xFF is followed by 0 or RSTn only
ORIENTATION = 0x0112


class ImageHeader(NamedTuple):
    format: str  # "JPEG", "PNG", "BMP" or "WebP"
    width: int  # as stored, before the orientation is applied
    height: int
    orientation: int  # EXIF 1..8; 1 (as stored) when absent or unreadable


class PngLayout(NamedTuple):
    depth: int  # bits per sample
    colour: int  # colour type
    interlaced: bool
    data_at: int  # offset of the first IDAT chunk, -1 if none
    data: list[tuple[int, int]]  # (start, end) of the data of each chunk in the first run of IDAT chunks


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
    return read_header(data)[0]


def read_header(data: bytes) -> tuple[ImageHeader, PngLayout | int | None]:
    """The header, and what decoding needs next: PNG's layout, or where JPEG's first scan starts."""
    kind = image_format(data)
    if kind == "WebP":
        return _webp_header(data), None
    if kind == "JPEG":
        return _jpeg_header(data)
    layout = _png_layout(data) if kind == "PNG" else None  # its chunks walked before Pillow's reader
    try:
        with HEADER_READERS[kind](io.BytesIO(data)) as image:
            width, height = image.size
            exif = image.info.get("exif")
    except Exception as err:  # Pillow signals bad data with SyntaxError, OSError, ValueError, ...
        raise _unreadable_header(kind, " ".join(str(err).split()) or type(err).__name__) from None
    return ImageHeader(kind, width, height, _orientation(exif)), layout


def _unreadable_header(kind: str, reason: str) -> ValueError:
    return ValueError(f"corrupt or truncated {kind}: its header could not be read ({reason})")


def _png_layout(data: bytes) -> PngLayout:
    """One walk over the chunks: each must fit in the data, and there may not be too many."""
    pos, size, chunks, ihdr, data_at, spans, in_data = 8, len(data), 0, b"", -1, [], False
    while pos + 8 <= size:
        length = int.from_bytes(data[pos : pos + 4], "big")
        # OpenCV 4.11's PNG reader allocates and zero-fills each chunk's declared length before
        # reading it: a 2 kB file whose chunk claimed 2.6 GB cost 2.5 GB and 1.5 s.
        if pos + 12 + length > size:
            raise ValueError(f"corrupt or truncated PNG: a chunk declares {length} bytes, past the end of the data")
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise ValueError(f"PNG has more than {MAX_PNG_CHUNKS} chunks, over the limit")
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            if data_at < 0:
                data_at, in_data = pos, True
            if in_data:  # decoders read only the first run of IDAT chunks
                spans.append((pos + 8, pos + 8 + length))
        else:
            in_data = False
            if data_at < 0 and chunks > MAX_PNG_CHUNKS_BEFORE_DATA:
                raise ValueError(
                    f"PNG has more than {MAX_PNG_CHUNKS_BEFORE_DATA} chunks before its image data, over the limit"
                )
            if kind == b"IHDR" and not ihdr:
                ihdr = data[pos + 8 : pos + 8 + length]
            elif kind == b"IEND":
                break
        pos += 12 + length
    depth, colour, interlace = (ihdr[8], ihdr[9], ihdr[12]) if len(ihdr) == 13 else (0, 0, 0)
    return PngLayout(depth, colour, interlace == 1, data_at, spans)


def png_rows_size(width: int, height: int, layout: PngLayout) -> int:
    """Bytes of filtered rows (a filter byte, then the packed samples) the header's size needs."""
    bits = PNG_CHANNELS.get(layout.colour, 4) * layout.depth
    total = 0
    for x0, y0, dx, dy in ADAM7 if layout.interlaced else ((0, 0, 1, 1),):
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            total += rows * (1 + (columns * bits + 7) // 8)
    return total


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _jpeg_header(data: bytes) -> tuple[ImageHeader, int]:
    """The frame's size and the EXIF orientation, from the markers before the first scan, and
    the offset of that scan's marker. Junk and fill bytes between markers are skipped, as libjpeg
    skips them."""
    pos, size, markers, frame, exif = 2, len(data), 0, None, None
    while True:
        fill = JPEG_NEXT_MARKER.match(data, pos)
        if fill is None or fill.end() >= size:
            raise _unreadable_header("JPEG", "it ends before the image data")
        code, pos = data[fill.end()], fill.end() + 1
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise ValueError(f"JPEG has more than {MAX_JPEG_MARKERS} markers before its image data, over the limit")
        if code == 0x00 or code == 0x01 or 0xD0 <= code <= 0xD8:  # junk, or a marker without a length
            continue
        if code == 0xD9:
            raise _unreadable_header("JPEG", "the end-of-image marker comes before the image data")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if pos + 2 > size or length < 2 or pos + length > size:
            raise _unreadable_header("JPEG", f"a marker segment declares {length} bytes, past the end of the data")
        if code == 0xDA:
            if frame is None:
                raise _unreadable_header("JPEG", "no frame header before the image data")
            return ImageHeader("JPEG", frame[1], frame[0], _orientation(exif)), pos - 2
        if code in JPEG_SOF and frame is None:
            if length < 8:
                raise _unreadable_header("JPEG", "the frame header is too short")
            bits, height, width, components = struct.unpack(">BHHB", data[pos + 2 : pos + 8])
            if bits != 8:  # as Pillow's reader, which this replaces, refused them
                raise ValueError(f"JPEG with {bits}-bit samples is not accepted: send 8-bit JPEG, PNG, BMP or WebP")
            if components not in (1, 3, 4):
                raise ValueError(f"JPEG with {components} colour components is not accepted: 1 (grey), 3 or 4 are")
            frame = (height, width)
        elif code == 0xE1 and exif is None and data.startswith(b"Exif\x00\x00", pos + 2):
            exif = data[pos + 2 : pos + length]
        pos += length


def jpeg_scans_end(data: bytes, pos: int) -> bool:
    """Walks from the first scan's marker at `pos` to the end-of-image marker, skipping each scan's
    coded data and counting the scans; False if the data ends first."""
    size, scans, markers = len(data), 0, 0
    while True:
        code = data[pos + 1]
        pos += 2
        if code == 0xD9:
            return True
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise ValueError(f"JPEG has more than {MAX_JPEG_MARKERS} markers in its image data, over the limit")
        if code != 0x01 and code != 0xD8:  # the rest carry a length
            length = int.from_bytes(data[pos : pos + 2], "big")
            if pos + 2 > size or length < 2 or pos + length > size:
                return False
            if code == 0xDA:
                scans += 1
                if scans > MAX_JPEG_SCANS:
                    raise ValueError(
                        f"JPEG has more than {MAX_JPEG_SCANS} scans, over the limit "
                        "(progressive encoders write about 10)"
                    )
            pos += length
        end = JPEG_SCAN_END.search(data, pos)
        if end is None:
            return False
        pos = end.start()


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
    pos, chunks = 12, 0
    while pos + 8 <= len(data):
        chunks += 1
        if chunks > MAX_WEBP_CHUNKS:
            raise ValueError(f"WebP has more than {MAX_WEBP_CHUNKS} chunks, over the limit")
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if data[pos : pos + 4] == fourcc:
            return data[pos + 8 : pos + 8 + size]
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
