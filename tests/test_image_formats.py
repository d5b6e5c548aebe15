"""serving/decode.decode_image: one rule per pixel layout in every accepted format (the table in
its module docstring); every other format refused from its first bytes, every oversized image
from its header, none of them decoded."""

import io
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from serving import decode, image_headers
from serving.decode import decode_image
from serving.image_headers import image_header

ACCEPTED = ("JPEG", "PNG", "BMP", "WebP")
RGB = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
GREY = RGB[..., 1].copy()
ALPHA = RGB[..., 2][::-1].copy()
_Y, _X = np.mgrid[0:12, 0:20]
SMOOTH = np.dstack([_X * 12, _Y * 20, (_X + _Y) * 8]).astype(np.uint8)  # lossy codecs keep gradients well
WIDE16 = np.random.default_rng(1).integers(0, 65536, (12, 20, 3), dtype=np.uint16)


def pillow(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def opencv(array: np.ndarray, ext: str, *params) -> bytes:
    ok, data = cv2.imencode(ext, array, list(params))
    assert ok
    return data.tobytes()


def png_chunks(ihdr: bytes, idat: bytes, *extra: bytes) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(extra) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_raw(samples: np.ndarray, depth: int, colour: int, interlaced: bool = False) -> bytes:
    """A PNG written sample by sample (filter 0): neither OpenCV nor Pillow writes interlaced PNG,
    16-bit grey+alpha (colour type 4) or 2-bit grey."""
    height, width = samples.shape[:2]

    def rows(image):
        flat = image.reshape(len(image), -1)
        if depth == 16:
            packed = flat.astype(">u2").view(np.uint8)
        else:  # the low `depth` bits of each sample, packed from the high bit on
            bits = np.unpackbits(flat.astype(np.uint8)[..., None], axis=-1)[..., 8 - depth :]
            packed = np.packbits(bits.reshape(len(flat), -1), axis=1)
        return b"".join(b"\x00" + row.tobytes() for row in packed)

    passes = ADAM7 if interlaced else ((0, 0, 1, 1),)
    raw = b"".join(rows(samples[y0::dy, x0::dx]) for x0, y0, dx, dy in passes if width > x0 and height > y0)
    return png_chunks(struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlaced)), zlib.compress(raw))


def png_16_bit_grey_alpha(grey: np.ndarray, alpha: np.ndarray) -> bytes:
    return png_raw(np.dstack([grey, alpha]), 16, 4)


def round16(values: np.ndarray) -> np.ndarray:
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v * 255 / 65535)


def palette_image() -> Image.Image:
    return Image.fromarray(RGB).quantize(16)


def transparent_palette_image() -> Image.Image:
    image = palette_image()
    image.info["transparency"] = 3
    return image


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.dstack([grey] * 3)


def rgba() -> np.ndarray:
    return np.dstack([RGB, ALPHA])


# (file bytes, expected RGB, largest difference allowed): lossy codecs only come close.
LAYOUTS = {
    "JPEG RGB": (lambda: pillow(Image.fromarray(SMOOTH), "JPEG", quality=95), lambda: SMOOTH, 16),
    "JPEG grey": (
        lambda: pillow(Image.fromarray(SMOOTH[..., 0]), "JPEG", quality=95),
        lambda: grey_rgb(SMOOTH[..., 0]),
        8,
    ),
    "JPEG CMYK": (lambda: pillow(Image.fromarray(SMOOTH).convert("CMYK"), "JPEG", quality=95), lambda: SMOOTH, 16),
    "PNG RGB": (lambda: pillow(Image.fromarray(RGB), "PNG"), lambda: RGB, 0),
    "PNG grey": (lambda: pillow(Image.fromarray(GREY), "PNG"), lambda: grey_rgb(GREY), 0),
    "PNG grey 1-bit": (
        lambda: pillow(Image.fromarray(GREY > 128), "PNG"),
        lambda: grey_rgb((GREY > 128) * np.uint8(255)),
        0,
    ),
    "PNG grey 2-bit": (lambda: png_raw(GREY >> 6, 2, 0), lambda: grey_rgb((GREY >> 6) * np.uint8(85)), 0),
    "PNG grey+alpha": (
        lambda: pillow(Image.fromarray(np.dstack([GREY, ALPHA]), "LA"), "PNG"),
        lambda: grey_rgb(GREY),
        0,
    ),
    "PNG palette": (lambda: pillow(palette_image(), "PNG"), lambda: np.asarray(palette_image().convert("RGB")), 0),
    "PNG palette 4-bit": (
        lambda: pillow(palette_image(), "PNG", bits=4),
        lambda: np.asarray(palette_image().convert("RGB")),
        0,
    ),
    "PNG palette+transparency": (
        lambda: pillow(transparent_palette_image(), "PNG"),
        lambda: np.asarray(palette_image().convert("RGB")),
        0,
    ),
    "PNG RGBA": (lambda: pillow(Image.fromarray(rgba()), "PNG"), lambda: RGB, 0),
    "PNG grey 16-bit": (lambda: opencv(WIDE16[..., 0], ".png"), lambda: grey_rgb(round16(WIDE16[..., 0])), 0),
    "PNG grey+alpha 16-bit": (
        lambda: png_16_bit_grey_alpha(WIDE16[..., 0], WIDE16[..., 1]),
        lambda: grey_rgb(round16(WIDE16[..., 0])),
        0,
    ),
    "PNG RGB 16-bit": (lambda: opencv(WIDE16[..., ::-1], ".png"), lambda: round16(WIDE16), 0),
    "PNG RGBA 16-bit": (
        lambda: opencv(np.dstack([WIDE16[..., ::-1], WIDE16[..., :1]]), ".png"),
        lambda: round16(WIDE16),
        0,
    ),
    "PNG RGB interlaced": (lambda: png_raw(RGB, 8, 2, interlaced=True), lambda: RGB, 0),
    "PNG RGB 16-bit interlaced": (lambda: png_raw(WIDE16, 16, 2, interlaced=True), lambda: round16(WIDE16), 0),
    "BMP RGB": (lambda: opencv(RGB[..., ::-1], ".bmp"), lambda: RGB, 0),
    "BMP grey": (lambda: pillow(Image.fromarray(GREY), "BMP"), lambda: grey_rgb(GREY), 0),
    "BMP 1-bit": (
        lambda: pillow(Image.fromarray(GREY > 128), "BMP"),
        lambda: grey_rgb((GREY > 128) * np.uint8(255)),
        0,
    ),
    "BMP palette": (lambda: pillow(palette_image(), "BMP"), lambda: np.asarray(palette_image().convert("RGB")), 0),
    "BMP RGBA 32-bit": (lambda: opencv(np.dstack([RGB[..., ::-1], ALPHA]), ".bmp"), lambda: RGB, 0),
    "WebP RGB": (lambda: pillow(Image.fromarray(RGB), "WEBP", lossless=True), lambda: RGB, 0),
    "WebP grey": (lambda: pillow(Image.fromarray(GREY), "WEBP", lossless=True), lambda: grey_rgb(GREY), 0),
    # exact: keep the colour under transparent pixels, which the rule says is what gets segmented
    "WebP RGBA": (lambda: pillow(Image.fromarray(rgba()), "WEBP", lossless=True, exact=True), lambda: RGB, 0),
    "WebP RGBA lossy": (
        lambda: pillow(Image.fromarray(np.dstack([SMOOTH, ALPHA])), "WEBP", quality=95, exact=True),
        lambda: SMOOTH,
        16,
    ),
}


@pytest.mark.parametrize("case", LAYOUTS)
def test_every_layout_becomes_rgb_uint8(case):
    make, expected, tolerance = LAYOUTS[case]
    data = make()
    assert image_header(data).format == case.split()[0]
    decoded = decode_image(data)
    assert decoded.dtype == np.uint8 and decoded.shape == (12, 20, 3) and decoded.flags.c_contiguous
    difference = np.abs(decoded.astype(int) - expected().astype(int))
    if tolerance:  # lossy: close
        assert difference.max() <= tolerance, difference.max()
    else:
        np.testing.assert_array_equal(decoded, expected())


def test_16_bit_rounds_to_nearest_not_truncates():
    # OpenCV alone gives floor(v / 256): 200 -> 0 and 32895 -> 128; the nearest 8-bit values are 1 and 128.
    values = np.array([[0, 200, 32895, 40000, 65535]], np.uint16)
    decoded = decode_image(opencv(values, ".png"))
    np.testing.assert_array_equal(decoded[..., 0], [[0, 1, 128, 156, 255]])


@pytest.mark.parametrize(
    "fmt, options, tolerance",
    [("JPEG", {"quality": 95}, 40), ("PNG", {}, 0), ("WEBP", {"lossless": True, "exact": True}, 0)],
)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_in_every_format(fmt, options, tolerance, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = pillow(Image.fromarray(RGB), fmt, exif=exif.tobytes(), **options)
    assert image_header(data).orientation == orientation
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = decode_image(data)
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).max() <= tolerance
    if fmt == "JPEG":  # the same pixels OpenCV's own orientation handling gives, as before
        own = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(decoded, own)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animation_gives_the_first_frame(fmt):
    frames = [Image.fromarray(np.roll(RGB, shift, axis=1)) for shift in (0, 5, 9)]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = pillow(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **options)
    np.testing.assert_array_equal(decode_image(data), RGB)


def tiff_bomb() -> bytes:
    # A deflate-compressed 30000x30000 grey TIFF in ~9 kB, like the one OpenCV spent 25 s and
    # 5.2 GB on before its own size check refused it.
    ifd = [
        (256, 3, 1, 30000),
        (257, 3, 1, 30000),
        (258, 3, 1, 8),
        (259, 3, 1, 8),
        (262, 3, 1, 1),
        (273, 4, 1, 8 + 2 + 12 * 9 + 4),
        (277, 3, 1, 1),
        (278, 3, 1, 30000),
        (279, 4, 1, 9000),
    ]
    entries = b"".join(struct.pack("<HHII", tag, kind, count, value) for tag, kind, count, value in ifd)
    return (
        b"II*\x00"
        + struct.pack("<I", 8)
        + struct.pack("<H", len(ifd))
        + entries
        + b"\x00" * 4
        + zlib.compress(b"\x00" * 9_000_000)[:9000]
    )


REFUSED = {
    "TIFF": (lambda: opencv(RGB, ".tiff"), "TIFF"),
    "TIFF bomb 30000x30000": (tiff_bomb, "TIFF"),
    "PPM": (lambda: opencv(RGB, ".ppm"), "Netpbm"),
    "PGM": (lambda: opencv(GREY, ".pgm"), "Netpbm"),
    "PBM": (lambda: opencv(GREY, ".pbm"), "Netpbm"),
    "PFM": (lambda: opencv(RGB.astype(np.float32), ".pfm"), "Netpbm"),
    "JPEG 2000": (lambda: opencv(np.zeros((64, 64, 3), np.uint8), ".jp2"), "JPEG 2000"),
    "GIF": (lambda: pillow(Image.fromarray(RGB), "GIF"), "GIF"),
    "Radiance HDR": (lambda: opencv(RGB.astype(np.float32), ".hdr"), "Radiance HDR"),
    "OpenEXR magic": (lambda: b"v/1\x01\x02\x00\x00\x00channels\x00chlist\x00" + bytes(64), "OpenEXR"),
    "Sun raster": (lambda: opencv(RGB, ".ras"), "Sun raster"),
    "plain text": (lambda: b"hello, this is not an image\n" * 4, "not an image: 112 bytes"),
}


@pytest.fixture()
def no_decoding(monkeypatch):
    def refuse(*args):
        raise AssertionError("a decoder ran: the refusal came too late")

    monkeypatch.setattr(decode.cv2, "imdecode", refuse)
    monkeypatch.setattr(decode.PngImagePlugin.PngImageFile, "load", refuse)  # 1- to 8-bit PNG


@pytest.mark.parametrize("case", REFUSED)
def test_other_formats_are_refused_before_decoding(case, no_decoding):
    make, named = REFUSED[case]
    data = make()
    start = time.perf_counter()
    with pytest.raises(ValueError) as error:
        decode_image(data)
    assert time.perf_counter() - start < 1.0
    message = str(error.value)
    assert named in message and "\n" not in message
    assert "JPEG, PNG, BMP or WebP" in message, message


def huge(fmt: str) -> bytes:
    """A small valid file whose header is patched to say 30000x30000."""
    if fmt == "PNG":
        return png_chunks(struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0), zlib.compress(b"\x00" * 64))
    if fmt == "JPEG":
        data = bytearray(pillow(Image.fromarray(RGB), "JPEG"))
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)
        return bytes(data)
    if fmt == "BMP":
        data = bytearray(opencv(RGB, ".bmp"))
        data[18:26] = struct.pack("<ii", 30000, 30000)
        return bytes(data)
    return webp_canvas(30000, 30000, pillow(Image.fromarray(RGB), "WEBP", lossless=True)[12:])


def webp_canvas(width: int, height: int, image_chunk: bytes) -> bytes:
    """An extended (VP8X) WebP whose canvas says width x height around the given image chunk."""
    vp8x = (
        b"VP8X"
        + struct.pack("<I", 10)
        + bytes(4)
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little")
    )
    body = b"WEBP" + vp8x + image_chunk
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("fmt", ACCEPTED)
def test_30000x30000_header_is_refused_from_the_header(fmt, no_decoding):
    data = huge(fmt)
    assert image_header(data)[:3] == (fmt, 30000, 30000)
    with pytest.raises(ValueError, match=f"{fmt} image is 30000x30000, over the limit"):
        decode_image(data)


@pytest.mark.parametrize("canvas, stored", [((16, 16), (3000, 3000)), ((3000, 3000), (16, 16))])
def test_webp_whose_header_lies_is_refused_without_a_large_allocation(canvas, stored):
    # One colour compresses to a few hundred bytes whatever its size.
    image_chunk = opencv(np.zeros((*stored, 3), np.uint8), ".webp", cv2.IMWRITE_WEBP_QUALITY, 101)[12:]
    start = time.perf_counter()
    with pytest.raises(ValueError, match="corrupt or truncated WebP"):
        decode_image(webp_canvas(*canvas, image_chunk))
    assert time.perf_counter() - start < 0.5  # 3000x3000 decoded would take longer than refusing


@pytest.mark.parametrize("depth", [8, 16])  # Pillow decodes 8 bits, OpenCV 16 after a bounded inflate
def test_png_is_decoded_at_its_header_size_whatever_its_data_holds(depth):
    def png(width, height, rows, row_bytes):
        raw = (b"\x00" + bytes(row_bytes)) * rows
        return png_chunks(struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0), zlib.compress(raw))

    pixel = 3 * depth // 8
    assert decode_image(png(16, 16, 2000, pixel * 2000)).shape == (16, 16, 3)  # surplus data ignored
    with pytest.raises(ValueError, match="corrupt or truncated PNG"):
        decode_image(png(2000, 2000, 16, pixel * 16))  # too little data: refused


def zeros_after(data: bytes, mib: int) -> bytes:
    """A zlib stream of `data` then `mib` MiB of zeros, about 1 kB per MiB, built without
    compressing them: after a full flush the compressor writes the same bytes for the same input."""
    deflate = zlib.compressobj(9)
    head = deflate.compress(data) + deflate.flush(zlib.Z_FULL_FLUSH)
    one_mib = deflate.compress(bytes(1 << 20)) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = deflate.flush()[:-4]  # the last block, without the checksum of what this compressor saw
    # Adler-32 of data + zeros: a zero leaves the low sum alone and adds it to the high sum.
    low, high = zlib.adler32(data) & 0xFFFF, zlib.adler32(data) >> 16
    high = (high + (mib << 20) * low) % 65521
    return head + one_mib * mib + end + struct.pack(">I", high << 16 | low)


def test_zeros_after_is_a_valid_stream():
    assert zlib.decompress(zeros_after(b"rows", 3)) == b"rows" + bytes(3 << 20)


@pytest.mark.parametrize("depth", [8, 16])
def test_png_bomb_is_decoded_without_inflating_the_surplus(depth):
    # A 64x64 image whose stream holds 2 GiB of zeros after its rows, in 2 MB: OpenCV's libpng
    # inflated and dropped them all (4.4 s; a 64 MiB request would have taken 2 minutes).
    rows = bytes((1 + 64 * 3 * depth // 8) * 64)  # filter 0, all samples 0
    data = png_chunks(struct.pack(">IIBBBBB", 64, 64, depth, 2, 0, 0, 0), zeros_after(rows, 2048))
    assert len(data) < 2_200_000
    start = time.perf_counter()
    decoded = decode_image(data)
    assert time.perf_counter() - start < 1.0
    assert decoded.shape == (64, 64, 3) and not decoded.any()


def jpeg_with_empty_scans(scans: int) -> bytes:
    """A 1024x1024 grey progressive JPEG with `scans` more scans of 12 bytes each: refinement scans
    that code one end-of-band run over all 16384 blocks, which libjpeg still visits one by one."""
    data = pillow(Image.new("L", (1024, 1024), 128), "JPEG", progressive=True)
    end = data.rindex(b"\xff\xd9")
    # AC table 1 with a single symbol, 0xE0 (an end-of-band run of 2^14 + 14 more bits), coded "0"
    table = b"\xff\xc4" + struct.pack(">H", 20) + b"\x11" + bytes([1] + [0] * 15) + b"\xe0"
    # component 1 with AC table 1, coefficients 1..63, refining bit 0; "0" + 14 zero bits, padded with 1
    scan = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x01" + bytes([1, 63, 0x10]) + b"\x00\x01"
    return data[:end] + table + scan * scans + data[end:]


def test_jpeg_scans_are_limited():
    own = pillow(Image.new("L", (1024, 1024), 128), "JPEG", progressive=True).count(b"\xff\xda")
    decoded = decode_image(jpeg_with_empty_scans(image_headers.MAX_JPEG_SCANS - own))
    assert decoded.shape == (1024, 1024, 3) and abs(int(decoded.mean()) - 128) <= 1
    with pytest.raises(ValueError, match=f"JPEG has more than {image_headers.MAX_JPEG_SCANS} scans, over the limit"):
        decode_image(jpeg_with_empty_scans(image_headers.MAX_JPEG_SCANS - own + 1))
    # 10000 such scans in 124 kB kept libjpeg busy for 7 s (10 MB would hold 800000); refused undecoded.
    start = time.perf_counter()
    with pytest.raises(ValueError, match="scans, over the limit"):
        decode_image(jpeg_with_empty_scans(10_000))
    assert time.perf_counter() - start < 1.0


def small_png() -> bytes:
    return pillow(Image.fromarray(RGB), "PNG")


def small_webp_with_chunks(chunks: bytes) -> bytes:
    return webp_canvas(20, 12, chunks + pillow(Image.fromarray(RGB), "WEBP", lossless=True)[12:])


def empty_chunk(kind: bytes) -> bytes:
    return struct.pack(">I", 0) + kind + struct.pack(">I", zlib.crc32(kind))


# 10 MB of chunks or markers that hold nothing around a 20x12 image (file, message or None when it
# decodes): walking them one by one in Python, here or in Pillow's header readers, took 0.3-2.5 s.
STRUCTURE_BOMBS = {
    "PNG: 830000 empty chunks before the image data": (
        lambda: small_png()[:33] + empty_chunk(b"abCd") * 830_000 + small_png()[33:],
        "PNG has more than 1000 chunks before its image data, over the limit",
    ),
    "PNG: 830000 empty chunks after it": (
        lambda: small_png()[:-12] + empty_chunk(b"abCd") * 830_000 + small_png()[-12:],
        "PNG has more than 100000 chunks, over the limit",
    ),
    "JPEG: 2500000 empty comments": (
        lambda: b"\xff\xd8" + b"\xff\xfe\x00\x02" * 2_500_000 + pillow(Image.fromarray(SMOOTH), "JPEG")[2:],
        "JPEG has more than 2000 markers before its image data, over the limit",
    ),
    "JPEG: 10 MB of fill bytes before a marker": (
        lambda: b"\xff\xd8" + b"\xff" * 10_000_000 + pillow(Image.fromarray(SMOOTH), "JPEG")[2:],
        None,
    ),
    "WebP: 1250000 empty chunks": (
        lambda: small_webp_with_chunks((b"abcd" + bytes(4)) * 1_250_000),
        "WebP has more than 100000 chunks, over the limit",
    ),
}


@pytest.mark.parametrize("case", STRUCTURE_BOMBS)
def test_structure_bombs_cost_little(case):
    make, message = STRUCTURE_BOMBS[case]
    data = make()
    start = time.perf_counter()
    if message is None:
        assert decode_image(data).shape == (12, 20, 3)
    else:
        with pytest.raises(ValueError, match=message):
            decode_image(data)
    assert time.perf_counter() - start < 1.0


def test_jpeg_with_data_after_its_end_is_decoded():
    # Motion photos append a video; random data holds a scan marker (0xFF 0xDA) every 64 kB on
    # average, which the image must not be refused for.
    data = pillow(Image.fromarray(SMOOTH), "JPEG", quality=95)
    np.testing.assert_array_equal(
        decode_image(data + bytes(100) + b"\xff\xda\x00\x08" + bytes(100)), decode_image(data)
    )


def test_jpeg_other_than_8_bits_is_refused_from_its_header(no_decoding):
    data = bytearray(pillow(Image.fromarray(SMOOTH), "JPEG"))
    data[data.index(b"\xff\xc0") + 4] = 12  # the frame's sample precision
    with pytest.raises(ValueError, match="JPEG with 12-bit samples is not accepted"):
        decode_image(bytes(data))


@pytest.mark.parametrize("case", ["BMP RGB", "PNG RGB 16-bit"])  # the formats OpenCV decodes
def test_decoded_size_must_match_the_header(monkeypatch, case):
    monkeypatch.setattr(decode.cv2, "imdecode", lambda *args: np.zeros((5, 7, 3), np.uint8))
    with pytest.raises(ValueError, match="the header says 20x12 but the data decodes to 7x5"):
        decode_image(LAYOUTS[case][0]())


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_is_ignored():
    data = pillow(Image.fromarray(RGB), "PNG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff")
    np.testing.assert_array_equal(decode_image(data), RGB)


def test_png_chunk_longer_than_the_data_is_refused_before_decoding(no_decoding):
    # OpenCV 4.11 allocated and zero-filled the 2.6 GB such a 2 kB file declared (1.5 s, 2.5 GB).
    data = bytearray(pillow(Image.fromarray(RGB), "PNG"))
    length = data.index(b"IDAT") - 4
    data[length : length + 4] = struct.pack(">I", 2_617_248_035)
    with pytest.raises(ValueError, match="corrupt or truncated PNG: a chunk declares 2617248035 bytes, past the end"):
        decode_image(bytes(data))
