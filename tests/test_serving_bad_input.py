"""Bad input through the real server: each answered with HTTP 400 / gRPC INVALID_ARGUMENT naming
the problem, and the server still ready and answering a good request correctly afterwards.

`segment` refusals come from serving/decode.decode_image (inside the `segment` model); `medoe`'s
wrong names, dtypes and shapes are refused by Triton itself from the model config.
"""

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pytriton", reason="nvidia-pytriton ships the tritonserver binary")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

from export.graph import random_images  # noqa: E402
from tests.test_serving_server import png, protocol, reference, repository, segment_request, server  # noqa: E402, F401

GOOD = random_images(1, 32, 40, seed=7)[0]


def huge_png_header() -> bytes:
    # 30000x30000 RGB announced in a few bytes: refused from the header, never allocated.
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def tiff_bomb() -> bytes:
    # 30000x30000 grey TIFF in ~9 kB; OpenCV would decode for 25 s and 5 GB before refusing it.
    ifd = [
        (256, 3, 30000),
        (257, 3, 30000),
        (258, 3, 8),
        (259, 3, 8),
        (262, 3, 1),
        (273, 4, 8 + 2 + 12 * 8 + 4),
        (278, 3, 30000),
        (279, 4, 9000),
    ]
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in ifd)
    pixels = zlib.compress(bytes(9_000_000))[:9000]
    return b"II*\x00" + struct.pack("<IH", 8, len(ifd)) + entries + bytes(4) + pixels


def palette_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(GOOD).convert("P").save(buffer, "PNG")
    return buffer.getvalue()


def encoded(ext: str, image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


SEGMENT_CASES = {
    "not an image": (lambda: b"hello, not an image", "not an image"),
    "truncated JPEG": (lambda: encoded(".jpg", GOOD)[:400], "truncated JPEG"),
    "empty": (lambda: b"", "empty image"),
    "30000x30000 PNG": (huge_png_header, "30000x30000, over the limit"),
    "TIFF bomb": (tiff_bomb, "TIFF images are not accepted: send JPEG, PNG, BMP or WebP"),
}

# Refused until one rule per pixel layout (serving/decode.py's docstring): each now segmented
# exactly as the RGB image the rule gives. (file bytes, that RGB image)
LAYOUT_CASES = {
    "grayscale PNG": (lambda: encoded(".png", GOOD[..., 0]), lambda: np.dstack([GOOD[..., 0]] * 3)),
    "palette PNG": (palette_png, lambda: np.asarray(Image.open(io.BytesIO(palette_png())).convert("RGB"))),
    "RGBA PNG": (lambda: encoded(".png", np.dstack([GOOD[..., ::-1], GOOD[..., :1]])), lambda: GOOD),
    "16-bit PNG": (lambda: encoded(".png", GOOD[..., ::-1].astype(np.uint16) * 257), lambda: GOOD),
}

MEDOE_CASES = {
    "wrong name": ("image", np.zeros((1, 8, 8, 3), np.uint8), "UINT8", "unexpected inference input 'image'"),
    "float32": (
        "images",
        np.zeros((1, 8, 8, 3), np.float32),
        "FP32",
        "data-type is 'FP32', but model 'medoe' expects 'UINT8'",
    ),
    "4 channels": ("images", np.zeros((1, 8, 8, 4), np.uint8), "UINT8", "unexpected shape for input 'images'"),
    "rank 3": ("images", np.zeros((8, 8, 3), np.uint8), "UINT8", "unexpected shape for input 'images'"),
}


def assert_invalid_argument(module, error, message: str) -> None:
    if module is httpclient:
        assert str(error.status()) == "400", error
    else:
        assert "INVALID_ARGUMENT" in str(error.status()), error
    assert message in error.message(), error.message()
    assert "\n" not in error.message().strip()


def assert_still_serving(server, repository, module, client):  # noqa: F811
    assert server.ready() and client.is_server_ready()
    result = client.infer("segment", segment_request(module, png(GOOD)))
    np.testing.assert_array_equal(result.as_numpy("labels"), reference(repository, GOOD[np.newaxis])["labels"][0])


@pytest.mark.parametrize("case", SEGMENT_CASES)
def test_segment_refuses(case, protocol, server, repository):  # noqa: F811
    module, client = protocol
    make, message = SEGMENT_CASES[case]
    with pytest.raises(module.InferenceServerException) as error:
        client.infer("segment", segment_request(module, make()))
    assert_invalid_argument(module, error.value, message)
    assert_still_serving(server, repository, module, client)


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_segment_accepts_every_layout_as_rgb(case, protocol, repository):  # noqa: F811
    module, client = protocol
    make, rgb = LAYOUT_CASES[case]
    labels = client.infer("segment", segment_request(module, make())).as_numpy("labels")
    assert labels.shape == GOOD.shape[:2]
    np.testing.assert_array_equal(labels, reference(repository, rgb()[np.newaxis])["labels"][0])


@pytest.mark.parametrize("case", MEDOE_CASES)
def test_medoe_refuses(case, protocol, server, repository):  # noqa: F811
    module, client = protocol
    name, array, dtype, message = MEDOE_CASES[case]
    tensor = module.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    with pytest.raises(module.InferenceServerException) as error:
        client.infer("medoe", [tensor])
    assert_invalid_argument(module, error.value, message)
    assert_still_serving(server, repository, module, client)
