"""Memory bounds through the real server (docs/benchmark_memory.md has the numbers behind them).

An image over `max_pixels` (as a `segment` PNG or a raw `medoe` tensor) and a raw `medoe` batch
over `max_batch_pixels` are refused with HTTP 400 / gRPC INVALID_ARGUMENT naming the limit, and
after one large request that is allowed the stubs' private memory is back near its level before
(onnxruntime's CPU arena used to keep ~0.1 GB per megapixel of the largest request, for good;
it now serves only calls up to serving/ort_memory.ARENA_MAX_PIXELS, the usual batches).
The stubs' shared-memory pools are left out: Triton's python backend grows them and never
shrinks them; the limits bound them.
"""

import math
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton ships the tritonserver binary")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

from serving.model_limits import DEFAULT_MAX_BATCH_PIXELS, DEFAULT_MAX_PIXELS, read_limits  # noqa: E402
from serving.ort_memory import ARENA_MAX_PIXELS  # noqa: E402
from serving.processes import free_ports  # noqa: E402
from serving.repository import read_model_config  # noqa: E402
from serving.supervisor import start_server  # noqa: E402
from tests.test_serving_bad_input import assert_invalid_argument, assert_still_serving, protocol  # noqa: E402, F401
from tests.test_serving_server import repository, segment_request, server  # noqa: E402, F401

# Private memory a stub may keep after the large request, MiB. Measured with the test model and
# LARGE: with onnxruntime's arena alone `medoe` kept 332 MiB; now 27 (the one-time state of the
# arena-less session's first run), segment (no onnxruntime) 2-15.
MARGIN_MIB = 64
LARGE = (2048, 2560)  # H, W: 5.2 MP, over ARENA_MAX_PIXELS and under max_pixels
SETTLE_S = 10.0  # onnx_model.py trims the heap again 1 s after the response: poll up to this long


def limits(repository: Path) -> tuple[int, int]:  # noqa: F811
    config = read_model_config(repository / "medoe" / "config.pbtxt")
    return read_limits({k: {"string_value": v.string_value} for k, v in config.parameters.items()})


def raw_request(module, array: np.ndarray):
    tensor = module.InferInput("images", list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array)
    return [tensor]


def gradient_png(height: int, width: int, flat: bool = False) -> bytes:
    import cv2

    image = np.zeros((height, width, 3), np.uint8)
    if not flat:  # flat: a few KB to send, for images that are refused anyway
        image[..., 0] = (np.arange(width) % 256)[None, :]
        image[..., 1] = (np.arange(height) % 256)[:, None]
    return cv2.imencode(".png", image)[1].tobytes()


def private_mib(server) -> dict[str, float]:  # noqa: F811
    """RssAnon of each python-backend stub (its heap; not the shared-memory pool, RssShmem)."""
    memory = {}
    for pid, (instance, _) in server.stubs.items():
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
        )
        memory[instance] = int(status["RssAnon"].split()[0]) / 1024
    return memory


def test_the_repository_has_the_default_limits(repository):  # noqa: F811
    assert limits(repository) == (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BATCH_PIXELS)


def test_image_over_max_pixels_is_refused(protocol, server, repository):  # noqa: F811
    module, client = protocol
    max_pixels, _ = limits(repository)
    side = math.isqrt(max_pixels) + 1
    with pytest.raises(module.InferenceServerException) as error:
        client.infer("segment", segment_request(module, gradient_png(side, side, flat=True)))  # refused from its header
    assert_invalid_argument(module, error.value, f"PNG image is {side}x{side}, over the limit of {max_pixels} pixels")
    with pytest.raises(module.InferenceServerException) as error:
        client.infer("medoe", raw_request(module, np.zeros((1, side, side, 3), np.uint8)))
    assert_invalid_argument(
        module, error.value, f"images is {side}x{side}, over the limit of {max_pixels} pixels per image (max_pixels)"
    )
    assert_still_serving(server, repository, module, client)


def test_batch_over_max_batch_pixels_is_refused(protocol, server, repository):  # noqa: F811
    module, client = protocol
    _, max_batch_pixels = limits(repository)
    batch = max_batch_pixels // (2048 * 2048) + 1  # 4 with the defaults: the batch that used to pass
    with pytest.raises(module.InferenceServerException) as error:
        client.infer("medoe", raw_request(module, np.zeros((batch, 2048, 2048, 3), np.uint8)))
    assert_invalid_argument(
        module,
        error.value,
        f"images is {batch} images of 2048x2048 = {batch * 2048 * 2048} pixels, "
        f"over the limit of {max_batch_pixels} pixels per batch (max_batch_pixels)",
    )
    assert_still_serving(server, repository, module, client)


@pytest.fixture()
def fresh_server(repository):  # noqa: F811
    # Its own server: with the arena, any earlier large request in this module would have grown
    # `medoe` already, and a second one then looks free.
    handle = start_server(repository, *free_ports(3), timeout=60)
    yield handle
    handle.stop()


def test_private_memory_comes_back_after_a_large_request(fresh_server):
    http = httpclient.InferenceServerClient(fresh_server.http_url, network_timeout=120)
    try:
        kept, before = kept_after_large_request(fresh_server, http)
    finally:
        http.close()
    assert max(kept.values()) <= MARGIN_MIB, (
        f"private MiB kept per stub after a {LARGE} request: {kept} (before {before})"
    )


def kept_after_large_request(server, http) -> tuple[dict[str, float], dict[str, float]]:  # noqa: F811
    small = gradient_png(256, 512)
    for _ in range(2):  # every stub past its first-request allocations
        http.infer("segment", segment_request(httpclient, small))
    before = private_mib(server)
    assert ARENA_MAX_PIXELS < LARGE[0] * LARGE[1] <= DEFAULT_MAX_PIXELS
    result = http.infer("segment", segment_request(httpclient, gradient_png(*LARGE)))
    assert result.as_numpy("labels").shape == LARGE
    del result
    deadline = time.monotonic() + SETTLE_S
    while True:
        after = private_mib(server)
        kept = {name: round(after[name] - before[name], 1) for name in before}
        if max(kept.values()) <= MARGIN_MIB or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return kept, before
