"""serving/decode.py and serving/processing.py: decoding refuses what it cannot serve with one
clear line; colours and shares are exact."""

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from serving.decode import decode_image
from serving.image_headers import image_header
from serving.processing import class_share, colorize, overlay, resize_labels_nearest

PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]


def rgb_image(height=24, width=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(image_rgb, ext):
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []  # quality > 100: lossless WebP
    ok, data = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params)
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp"])
def test_lossless_round_trip_is_rgb(ext):
    image = rgb_image()
    data = encode(image, ext)
    decoded = decode_image(data)
    assert decoded.dtype == np.uint8 and decoded.shape == image.shape
    np.testing.assert_array_equal(decoded, image)
    assert image_header(data)[1:3] == (32, 24)


def test_jpeg_header_and_grey_expands_to_rgb():
    grey = np.full((20, 30), 128, np.uint8)
    ok, data = cv2.imencode(".jpg", grey)
    assert image_header(data.tobytes())[:3] == ("JPEG", 30, 20)
    decoded = decode_image(data.tobytes())
    assert decoded.shape == (20, 30, 3) and abs(int(decoded.mean()) - 128) <= 2


def test_exif_orientation_is_applied():
    image = Image.fromarray(rgb_image(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a 40x20 stored image shows as 20 wide, 40 tall
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    assert decode_image(buffer.getvalue()).shape == (40, 20, 3)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty image"),
        (b"hello, not an image", "not an image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated PNG"),
    ],
)
def test_refuses_non_images(data, message):
    with pytest.raises(ValueError, match=message):
        decode_image(data)


def test_refuses_truncated_files():
    png = encode(rgb_image(64, 64), ".png")
    with pytest.raises(ValueError, match="corrupt or truncated PNG"):
        decode_image(png[: len(png) // 2])
    jpeg = encode(rgb_image(64, 64), ".jpg")
    with pytest.raises(ValueError, match="truncated JPEG"):
        decode_image(jpeg[: len(jpeg) // 2])


def test_16_bit_is_scaled_to_8_bits():
    # Refused until one rule per layout (tests/test_image_formats.py): now round(v / 257).
    ok, data = cv2.imencode(".png", np.full((8, 8, 3), 40000, np.uint16))
    decoded = decode_image(data.tobytes())
    assert decoded.dtype == np.uint8 and decoded.shape == (8, 8, 3)
    np.testing.assert_array_equal(decoded, 156)


def test_refuses_huge_dimensions_before_decoding():
    # A valid-looking 30000x30000 PNG with a few bytes of data: refused from the header alone,
    # never allocated (the pixels would need 2.7 GB).
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")
    with pytest.raises(ValueError, match="30000x30000, over the limit"):
        decode_image(data)
    with pytest.raises(ValueError, match="over the limit of 100 pixels"):
        decode_image(encode(rgb_image(), ".png"), max_pixels=100)


def test_colorize_and_overlay():
    labels = np.array([[0, 1], [2, 7]], np.uint8)  # 7: no palette entry -> black
    colours = colorize(labels, PALETTE)
    np.testing.assert_array_equal(colours, [[[0, 0, 0], [255, 0, 0]], [[0, 255, 0], [0, 0, 0]]])
    image = np.full((2, 2, 3), 100, np.uint8)
    blended = overlay(image, labels, PALETTE, alpha=0.5)
    np.testing.assert_array_equal(blended[0, 1], [178, 50, 50])  # round(0.5 * 100 + 0.5 * 255) = 178
    np.testing.assert_array_equal(overlay(image, labels, PALETTE, alpha=0.0), image)
    with pytest.raises(ValueError, match="differ in size"):
        overlay(image, labels[:1], PALETTE)


def test_class_share():
    labels = np.array([[0, 0, 1, 4]], np.uint8)
    share = class_share(labels, 3)
    assert share.dtype == np.float32 and share.shape == (3,)
    np.testing.assert_allclose(share, [0.5, 0.25, 0.0])  # label 4 >= C counts only in the total


def test_resize_labels_nearest():
    labels = np.array([[0, 1], [2, 3]], np.uint8)
    big = resize_labels_nearest(labels, (4, 6))
    assert big.shape == (4, 6) and big.dtype == np.uint8
    np.testing.assert_array_equal(big[:2, :3], 0)
    np.testing.assert_array_equal(big[2:, 3:], 3)
    np.testing.assert_array_equal(resize_labels_nearest(big, (2, 2)), labels)


def test_resize_map_is_bilinear_and_keeps_range():
    from serving.processing import resize_map

    values = np.array([[0.0, 1.0]], np.float32)
    wide = resize_map(values, (1, 4))
    assert wide.dtype == np.float32 and wide.shape == (1, 4)
    np.testing.assert_allclose(wide, [[0.0, 0.25, 0.75, 1.0]])  # pixel-centre sampling, clamped at the edges
    assert resize_map(values, (1, 2)) is not values
    with pytest.raises(ValueError, match="positive"):
        resize_map(values, (0, 3))


def test_working_size_parsing_and_resize():
    from serving.processing import parse_working_size, resize_to_working_size

    assert parse_working_size("") is None and parse_working_size("512x1024") == (512, 1024)
    for bad in ("512", "ax b", "16x16"):
        with pytest.raises(ValueError, match="working_size"):
            parse_working_size(bad)
    image = np.zeros((37, 45, 3), np.uint8)
    assert resize_to_working_size(image, None) is image
    assert resize_to_working_size(image, (48, 64)).shape == (48, 64, 3)
