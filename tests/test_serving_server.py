"""The bundled tritonserver serves the repository: `medoe` matches onnxruntime, `segment` answers SPEC §9.

One server for the module (start ~2 s, tiny model); every client is closed before it stops,
since Triton waits for open HTTP connections on shutdown.
"""

import shutil
import subprocess
import sys
from http.client import HTTPConnection
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton ships the tritonserver binary")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

from export import to_onnx  # noqa: E402
from export.graph import random_images  # noqa: E402
from serving.ort_memory import cpu_session  # noqa: E402
from serving.processes import free_ports  # noqa: E402, F401 (shared with other tests)
from serving.repository import ServerError  # noqa: E402
from serving.supervisor import start_server  # noqa: E402
from tests.test_export import make_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEGMENT_OUTPUTS = ("labels", "overlay", "class_share", "confidence", "expert_weights")


def exported_repository(root: Path, checkpoint: Path, *verify: str) -> Path:
    """A copy of model_repository/ under `root` with `checkpoint` exported as its `medoe`."""
    repo = root / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo)
    out = repo / "medoe" / "1" / "model.onnx"
    assert to_onnx.main(["--checkpoint", str(checkpoint), "--out", str(out), *verify]) == 0
    return repo


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    return exported_repository(
        root, make_checkpoint(root / "checkpoint"), "--verify-sizes", "48x64", "--verify-batches", "1"
    )


@pytest.fixture(scope="module")
def server(repository):
    http_port, grpc_port, metrics_port = free_ports(3)
    handle = start_server(repository, http_port, grpc_port, metrics_port, timeout=60)
    yield handle
    handle.stop()


@pytest.fixture(params=["http", "grpc"])
def protocol(request, server):
    module = httpclient if request.param == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if request.param == "http" else server.grpc_url)
    yield module, client
    client.close()


@pytest.fixture()
def http(server):
    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()


@pytest.fixture()
def grpc(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def reference(repository: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = cpu_session(repository / "medoe" / "1" / "model.onnx")
    return to_onnx.run_onnxruntime(session, images, ["labels", "confidence", "expert_weights"])


def segment_request(module, data: bytes):
    tensor = module.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=object))
    return [tensor]


def png(image_rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def test_ready(server, http, grpc):
    assert server.ready() and http.is_server_ready() and grpc.is_server_ready()
    assert set(server.models) == {"medoe", "segment"}
    for name in server.models:
        assert http.is_model_ready(name)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_medoe_matches_onnxruntime(protocol, repository, request):
    client = request.getfixturevalue(protocol)
    module = httpclient if protocol == "http" else grpcclient
    images = random_images(2, 48, 64, seed=3)
    tensor = module.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    result = client.infer("medoe", [tensor])
    expected = reference(repository, images)
    np.testing.assert_array_equal(result.as_numpy("labels"), expected["labels"])
    np.testing.assert_allclose(result.as_numpy("confidence"), expected["confidence"], atol=1e-6)
    assert result.as_numpy("expert_weights").shape == expected["expert_weights"].shape


def test_segment_png(http, repository):
    image = random_images(1, 37, 45, seed=5)[0]  # 37x45: no multiple of the stride
    result = http.infer("segment", segment_request(httpclient, png(image)))
    outputs = {name: result.as_numpy(name) for name in SEGMENT_OUTPUTS}
    expected = reference(repository, image[np.newaxis])
    assert outputs["labels"].dtype == np.uint8 and outputs["labels"].shape == (37, 45)
    np.testing.assert_array_equal(outputs["labels"], expected["labels"][0])
    assert outputs["overlay"].dtype == np.uint8 and outputs["overlay"].shape == (37, 45, 3)
    assert outputs["class_share"].dtype == np.float32 and outputs["class_share"].shape == (5,)
    assert abs(float(outputs["class_share"].sum()) - 1.0) < 1e-5
    np.testing.assert_allclose(outputs["confidence"], expected["confidence"][0], atol=1e-6)
    assert outputs["expert_weights"].shape == expected["expert_weights"].shape[1:]


def test_not_an_image_is_invalid_argument_and_server_survives(server, http, grpc):
    with pytest.raises(httpclient.InferenceServerException) as http_error:
        http.infer("segment", segment_request(httpclient, b"definitely not an image"))
    assert http_error.value.status() == "400" or http_error.value.status() == 400
    assert "not an image" in http_error.value.message()
    with pytest.raises(grpcclient.InferenceServerException) as grpc_error:
        grpc.infer("segment", segment_request(grpcclient, b""))
    assert "INVALID_ARGUMENT" in str(grpc_error.value.status()) and "empty image" in grpc_error.value.message()
    assert server.ready()
    result = grpc.infer("segment", segment_request(grpcclient, png(random_images(1, 32, 40, seed=1)[0])))
    assert result.as_numpy("labels").shape == (32, 40)


def test_missing_model_is_one_line_error(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repository", repo)
    # A repository whose medoe was never exported: its generated files are absent.
    (repo / "medoe" / "config.pbtxt").unlink(missing_ok=True)
    (repo / "medoe" / "1" / "model.onnx").unlink(missing_ok=True)
    with pytest.raises(ServerError, match="needs model .medoe., which has no config.pbtxt"):
        start_server(repo, *free_ports(3))
    process = subprocess.run(
        [sys.executable, "-m", "serving.server", "--model-repository", str(repo)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "model.onnx" in lines[0]


def test_config_without_onnx_is_one_line_error(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    (repo / "medoe" / "1" / "model.onnx").unlink()
    with pytest.raises(ServerError, match="'medoe' has no <version>/model.onnx"):
        start_server(repo, *free_ports(3))


def test_concurrent_requests_each_get_their_own_answer(server, repository):
    # Same-size requests may reach onnx_model.py together and run as one batch; each must
    # still get its own rows back.
    images = [random_images(1, 40, 56, seed=10 + i) for i in range(6)]
    client = httpclient.InferenceServerClient(server.http_url, concurrency=6)
    try:
        pending = []
        for image in images:
            tensor = httpclient.InferInput("images", list(image.shape), "UINT8")
            tensor.set_data_from_numpy(image)
            pending.append(client.async_infer("medoe", [tensor]))
        results = [p.get_result() for p in pending]
    finally:
        client.close()
    expected = reference(repository, np.concatenate(images))["labels"]
    for index, result in enumerate(results):
        np.testing.assert_array_equal(result.as_numpy("labels")[0], expected[index])


def test_working_size_batches_sizes_and_answers_at_the_original_size(repository, tmp_path):
    from serving.processing import resize_labels_nearest, resize_map, resize_to_working_size

    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    config = repo / "segment" / "config.pbtxt"
    text = config.read_text()
    assert 'key: "working_size"\n  value: { string_value: "" }' in text
    config.write_text(
        text.replace(
            'key: "working_size"\n  value: { string_value: "" }',
            'key: "working_size"\n  value: { string_value: "48x64" }',
        )
    )
    handle = start_server(repo, *free_ports(3), timeout=60)
    client = httpclient.InferenceServerClient(handle.http_url)
    try:
        for seed, (height, width) in enumerate([(37, 45), (90, 70)]):
            image = random_images(1, height, width, seed=seed)[0]
            result = client.infer("segment", segment_request(httpclient, png(image)))
            labels = result.as_numpy("labels")
            expected = reference(repo, resize_to_working_size(image, (48, 64))[np.newaxis])
            assert labels.shape == (height, width) and result.as_numpy("overlay").shape == (height, width, 3)
            np.testing.assert_array_equal(labels, resize_labels_nearest(expected["labels"][0], (height, width)))
            np.testing.assert_allclose(
                result.as_numpy("confidence"), resize_map(expected["confidence"][0], (height, width)), atol=1e-6
            )
    finally:
        client.close()
        handle.stop()


@pytest.mark.parametrize("accept", [None, "gzip"])
def test_the_proxy_compresses_a_response_only_when_the_client_asks(server, accept):
    # Go's transport in Caddy asked Triton for gzip on every request, so every response was
    # gzipped and inflated again on the way (250 ms for 3 MB of outputs at 512x1024, issue 14).
    images = random_images(1, 256, 512, seed=3)
    tensor = httpclient.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    outputs = [httpclient.InferRequestedOutput("confidence", binary_data=True)]
    body, header_length = httpclient.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    host, port = server.http_url.rsplit(":", 1)
    connection = HTTPConnection(host, int(port), timeout=60)
    # skip_accept_encoding: as tritonclient.http, send no Accept-Encoding unless the client asks.
    connection.putrequest("POST", "/v2/models/medoe/infer", skip_accept_encoding=True)
    headers = {"Inference-Header-Content-Length": header_length, "Content-Length": len(body)}
    for name, value in {**headers, **({"Accept-Encoding": accept} if accept else {})}.items():
        connection.putheader(name, str(value))
    connection.endheaders(body)
    response = connection.getresponse()
    encoding, length, size = (
        response.getheader("Content-Encoding"),
        response.getheader("Content-Length"),
        len(response.read()),
    )
    connection.close()
    # A response the proxy inflated itself comes without Content-Length (Go drops it); Triton's own has one.
    assert encoding == accept and length == str(size), (encoding, length, size)


# SegFormer (its all-MLP decoder) and OCRNet on HRNetV2 (the OCR head on the stride-4 concatenation)
# both put expert 1, and so the expert weights, at stride 4.
@pytest.mark.parametrize("backbone, context", [("mit_b0", "mlp"), ("hrnet_w18_small", "ocr")])
def test_the_papers_other_segmenters_are_served_over_http_and_grpc(tmp_path, backbone, context):
    # A transformer and a multi-branch backbone go through export and Triton unchanged.
    checkpoint = make_checkpoint(tmp_path / "checkpoint", "medoe", context, backbone)
    repo = exported_repository(tmp_path, checkpoint, "--verify-sizes", "48x64")
    images = random_images(1, 48, 64, seed=5)
    expected = reference(repo, images)
    http_port, grpc_port, metrics_port = free_ports(3)
    handle = start_server(repo, http_port, grpc_port, metrics_port, timeout=60)
    try:
        for module, url in ((httpclient, handle.http_url), (grpcclient, handle.grpc_url)):
            client = module.InferenceServerClient(url)
            tensor = module.InferInput("images", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(images)
            result = client.infer("medoe", [tensor])
            np.testing.assert_array_equal(result.as_numpy("labels"), expected["labels"])
            np.testing.assert_allclose(result.as_numpy("confidence"), expected["confidence"], atol=1e-6)
            assert result.as_numpy("expert_weights").shape == (1, 3, 12, 16)
            labels = client.infer("segment", segment_request(module, png(images[0]))).as_numpy("labels")
            np.testing.assert_array_equal(labels, expected["labels"][0])
            client.close()
    finally:
        handle.stop()
