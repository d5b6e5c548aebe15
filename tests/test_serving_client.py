"""serving.client against the real embedded server: both protocols, both models, --check, failures.

Reuses test_serving_server's fixtures (a tiny exported model, one server for the module).
"""

import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton ships the tritonserver binary")
pytest.importorskip("tritonclient.grpc")

from export.graph import random_images  # noqa: E402
from serving import client  # noqa: E402
from serving.client import cli  # noqa: E402
from tests.test_serving_server import free_ports, png, reference, repository, server  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    # Two same-sized images (one medoe batch) and one of another size (no stride multiple).
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, (h, w) in enumerate([(40, 56), (40, 56), (37, 45)]):
        path = folder / f"img{index}.png"
        path.write_bytes(png(random_images(1, h, w, seed=20 + index)[0]))
        paths.append(path)
    return paths


def url(server, protocol):  # noqa: F811
    return server.http_url if protocol == "http" else server.grpc_url


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.client", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("model", ["segment", "medoe"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_library_matches_onnxruntime(protocol, model, server, repository, images):  # noqa: F811
    results, meta = client.segment_images(images, url(server, protocol), protocol, model, retries=0)
    assert meta.class_names and meta.max_batch_size >= 1
    for path, result in zip(images, results, strict=True):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        expected = reference(repository, image[np.newaxis])
        assert result.name == path.stem
        np.testing.assert_array_equal(result.labels, expected["labels"][0])
        assert result.overlay.shape == image.shape and result.overlay.dtype == np.uint8
        assert result.class_share.shape == (len(meta.class_names),)
        assert abs(float(result.class_share.sum()) - 1.0) < 1e-5
        assert result.expert_weights.shape == expected["expert_weights"].shape[1:]


def test_both_models_give_the_same_overlay(server, images):  # noqa: F811
    # The medoe path recomputes overlay/class_share in the client; they must match segment's.
    segment, _ = client.segment_images(images, server.http_url, "http", "segment", retries=0)
    medoe, _ = client.segment_images(images, server.http_url, "http", "medoe", retries=0)
    for a, b in zip(segment, medoe, strict=True):
        np.testing.assert_array_equal(a.overlay, b.overlay)
        np.testing.assert_allclose(a.class_share, b.class_share, atol=1e-6)


def test_bytes_are_accepted(server, images):  # noqa: F811
    results, _ = client.segment_images([images[2].read_bytes()], server.grpc_url, "grpc", retries=0)
    assert results[0].name == "image0" and results[0].labels.shape == (37, 45)


@pytest.mark.parametrize("model", ["segment", "medoe"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_only_the_requested_outputs_are_asked_for(protocol, model, server, images, monkeypatch):  # noqa: F811
    # `medoe` computes overlay and class shares here from the labels; nothing else is fetched.
    asked, gather = [], client.gather
    monkeypatch.setattr(client, "gather", lambda *args: asked.append((args[2], list(args[4]))) or gather(*args))
    everything, _ = client.segment_images(images, url(server, protocol), protocol, model, retries=0)
    asked.clear()
    results, _ = client.segment_images(
        images, url(server, protocol), protocol, model, retries=0, outputs=["class_share", "confidence"]
    )
    assert asked == [(model, ["class_share", "confidence"] if model == "segment" else ["labels", "confidence"])]
    for full, result in zip(everything, results, strict=True):
        assert result.labels is None and result.overlay is None and result.expert_weights is None
        np.testing.assert_allclose(result.class_share, full.class_share, atol=1e-6)
        np.testing.assert_array_equal(result.confidence, full.confidence)


def test_an_unknown_or_empty_output_list_is_bad_input(images):
    for outputs, message in ((["labels", "probs"], "unknown output 'probs'"), ([], "no outputs requested")):
        with pytest.raises(client.ClientError, match=message) as error:
            client.segment_images(images[:1], "127.0.0.1:1", outputs=outputs)  # refused before any request
        assert error.value.code == 2 and "labels, overlay, class_share, confidence, expert_weights" in str(error.value)


def test_decoded_pixels_go_to_medoe_as_they_are(server, images):  # noqa: F811
    image = cv2.cvtColor(cv2.imread(str(images[2])), cv2.COLOR_BGR2RGB)
    (result,), _ = client.segment_images(
        [("pixels", image)], server.http_url, model="medoe", retries=0, outputs=["labels"]
    )
    (expected,), _ = client.segment_images(images[2:], server.http_url, retries=0, outputs=["labels"])
    np.testing.assert_array_equal(result.labels, expected.labels)
    assert result.image is image and result.name == "pixels"
    with pytest.raises(client.ClientError, match="^pixels: segment takes encoded images") as error:
        client.segment_images([("pixels", image)], server.http_url, retries=0)
    assert error.value.code == 2
    with pytest.raises(client.ClientError, match=r"^grey: a decoded image must be RGB uint8 \[H, W, 3\]"):
        client.segment_images([("grey", image[..., 0])], server.http_url, model="medoe", retries=0)


def test_metadata_is_the_contracts(server, repository):  # noqa: F811
    import onnx

    from medoe.contract import ModelMetadata, read_graph_metadata

    meta = client.get_metadata(server.grpc_url, "grpc", retries=0)
    assert isinstance(meta.model, ModelMetadata)
    graph = read_graph_metadata(onnx.load(str(repository / "medoe" / "1" / "model.onnx"), load_external_data=False))
    assert (meta.class_names, meta.groups, meta.expert_groups) == (graph.class_names, graph.groups, graph.expert_groups)
    assert meta.num_experts == graph.num_experts == len(meta.expert_groups) == 3
    assert meta.palette.shape == (256, 3) and meta.palette.dtype == np.uint8
    assert meta.palette[: len(graph.palette)].tolist() == graph.palette
    assert meta.max_batch_size >= 1 and client.get_metadata(server.http_url, retries=0).model == meta.model


def test_a_server_without_metadata_is_one_line_exit_1():
    class Bare:  # a `medoe` config with no parameters: some other model under that name
        def get_model_config(self, name, as_json=False):
            return {"config": {"name": name, "max_batch_size": 8}} if as_json else {"name": name, "max_batch_size": 8}

    for protocol in ("http", "grpc"):
        with pytest.raises(client.ClientError) as error:
            client.fetch_metadata(Bare(), protocol)
        assert error.value.code == 1
        assert str(error.value).startswith("server: model 'medoe' has no class_names, palette, num_classes")
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("protocol, model", [("http", "segment"), ("grpc", "medoe")])
def test_cli_writes_pngs_and_check_passes(protocol, model, server, repository, images, tmp_path):  # noqa: F811
    process = run_cli(
        *images,
        "--url",
        url(server, protocol),
        "--protocol",
        protocol,
        "--model",
        model,
        "--out",
        tmp_path,
        "--check",
        "--onnx",
        repository / "medoe" / "1" / "model.onnx",
    )
    assert process.returncode == 0, process.stderr
    assert "check: labels agree with onnxruntime on 100.0000% of pixels" in process.stdout
    for path in images:
        labels = cv2.imread(str(tmp_path / f"{path.stem}_labels.png"), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(tmp_path / f"{path.stem}_overlay.png"), cv2.IMREAD_UNCHANGED)
        assert labels.ndim == 2 and overlay.shape == (*labels.shape, 3)


def test_check_fails_on_disagreeing_labels(server, images):  # noqa: F811
    # Labels that disagree with onnxruntime must fail the smoke test with exit 1.
    results, _ = client.segment_images(images[:1], server.http_url, retries=0)
    results[0].labels = results[0].labels + 1
    items = client.read_inputs(images[:1])
    onnx_path = Path(server.workdir) / "models" / "medoe" / "1" / "model.onnx"
    assert client.check_against_onnx(results, items, onnx_path) < client.MIN_AGREEMENT


def test_missing_file_is_exit_2_one_line(server, tmp_path):  # noqa: F811
    process = run_cli(tmp_path / "nope.png", "--url", server.http_url, "--out", tmp_path)
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read") and "nope.png" in lines[0]


@pytest.mark.parametrize("model", ["segment", "medoe"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_bad_image_is_exit_2_for_both_models_and_protocols(protocol, model, server, tmp_path):  # noqa: F811
    # `segment` sends the bytes and the server refuses them (HTTP 400 / INVALID_ARGUMENT); `medoe`
    # decodes here first. Either way it is the caller's bad input: exit 2, the image named, no retry
    # (a retry would sleep the 20 s backoff first).
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not an image")
    start = time.monotonic()
    process = run_cli(
        bad,
        "--url",
        url(server, protocol),
        "--protocol",
        protocol,
        "--model",
        model,
        "--out",
        tmp_path / "out",
        "--retries",
        "3",
        "--backoff",
        "20",
    )
    assert time.monotonic() - start < 15
    assert process.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an image" in lines[0] and "attempts" not in lines[0], process.stderr
    assert lines[0].startswith("error: server: bad: " if model == "segment" else "error: bad: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "status, inference, code",
    [
        ("400", True, 2),
        ("StatusCode.INVALID_ARGUMENT", True, 2),
        ("404", True, 1),
        ("400", False, 1),
        ("StatusCode.INVALID_ARGUMENT", False, 1),
    ],
)
def test_a_refused_inference_request_is_bad_input(status, inference, code):
    # Refused as invalid: the caller's image (exit 2) for an inference request; for the metadata
    # request (inference=False) the server is the wrong one, a server failure (exit 1).
    from tritonclient.utils import InferenceServerException

    def refused():
        error = InferenceServerException("image is 9000x9000, over the limit", status=status)
        error.request_name = "big"
        raise error

    with pytest.raises(client.ClientError) as error:
        client.with_retries(refused, 3, 10.0, "host:1", inference=inference)
    assert error.value.code == code
    assert str(error.value) == ("server: big: " if code == 2 else "server: ") + "image is 9000x9000, over the limit"


@pytest.mark.parametrize("protocol, scheme", [("http", "http://"), ("grpc", "grpc://")])
def test_a_url_with_its_scheme_works(protocol, scheme, server, images):  # noqa: F811
    address = url(server, protocol)
    results, _ = client.segment_images(images[:1], f"{scheme}{address}/", protocol, retries=0)
    assert results[0].labels.shape == (40, 56)
    assert client.get_metadata(f"{scheme}{address}", protocol, retries=0).class_names


@pytest.mark.parametrize(
    "protocol, bad_url, message",
    [
        ("http", ":::", "has no valid port"),
        ("http", "host:notaport", "has no valid port"),
        ("http", "", "empty --url"),
        ("http", "127.0.0.1", "has no port"),
        ("http", "127.0.0.1:99999", "has no valid port"),
        ("http", "ftp://127.0.0.1:8000", "unknown scheme 'ftp'"),
        ("http", "grpc://127.0.0.1:8001", "unknown scheme 'grpc'"),
        ("grpc", "http://127.0.0.1:8001", "is an HTTP URL but --protocol is grpc"),
        ("grpc", "https://127.0.0.1:8001", "is an HTTP URL but --protocol is grpc"),
        ("grpc", "127.0.0.1:8001/v2", "a gRPC address has no path"),
        ("grpc", ":::", "has no valid port"),
        ("http", "user@127.0.0.1:8000", "more than an address"),
    ],
)
def test_a_bad_url_is_exit_2_one_line(protocol, bad_url, message, images, tmp_path, capsys):
    assert cli.main([str(images[0]), "--url", bad_url, "--protocol", protocol, "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    with pytest.raises(client.ClientError, match=message) as error:  # the library refuses it too
        client.segment_images(images[:1], bad_url, protocol)
    assert error.value.code == 2


def test_a_scheme_in_the_url_is_no_traceback_from_the_cli(images, tmp_path):
    port = free_ports(1)[0]  # nothing listens: the scheme is stripped and the connection is tried
    process = run_cli(images[0], "--url", f"http://127.0.0.1:{port}", "--out", tmp_path, "--retries", "0")
    assert process.returncode == 1 and "Traceback" not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach http://127.0.0.1:{port} after 1 attempts")


def test_https_to_a_plain_server_is_one_line_exit_1(server, images, tmp_path):  # noqa: F811
    # https:// is TLS through tritonclient's ssl option; this server speaks plain HTTP, so the
    # handshake fails: a connection failure, one line.
    process = run_cli(images[0], "--url", f"https://{server.http_url}", "--out", tmp_path, "--retries", "0")
    assert process.returncode == 1 and "Traceback" not in process.stderr, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach https://{server.http_url}"), lines


def _out_cases(tmp_path, images):
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / f"{images[0].stem}_overlay.png").mkdir()  # a directory where a result goes
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / images[0].name).write_bytes(images[0].read_bytes())
    return {
        "an existing file": ([images[0]], existing, f"--out {existing} exists and is not a directory"),
        "under a file": (
            [images[0]],
            existing / "sub",
            f"cannot create --out {existing / 'sub'}: {existing} is not a directory",
        ),
        "a directory in the way": ([images[0]], tmp_path / "taken", "it exists and is not a file"),
        "two images, one name": ([images[0], twin / images[0].name], tmp_path / "new", "are both named 'img0'"),
    }


@pytest.mark.parametrize("case", ["an existing file", "under a file", "a directory in the way", "two images, one name"])
def test_a_bad_out_is_exit_2_before_any_request(case, images, tmp_path, capsys):
    inputs, out, message = _out_cases(tmp_path, images)[case]
    port = free_ports(1)[0]  # nothing listens: an error about the connection would mean a request was tried
    assert cli.main([*map(str, inputs), "--url", f"127.0.0.1:{port}", "--out", str(out), "--retries", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "cannot reach" not in lines[0], lines


def test_an_existing_out_file_is_refused_by_the_cli(images, tmp_path):
    existing = tmp_path / "results"
    existing.write_text("not a directory")
    port = free_ports(1)[0]
    process = run_cli(images[0], "--url", f"127.0.0.1:{port}", "--out", existing, "--retries", "0")
    assert process.returncode == 2 and "Traceback" not in process.stderr
    assert process.stderr.strip() == f"error: --out {existing} exists and is not a directory"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--check"], "--check needs --onnx PATH"),
        (["--check", "--onnx", "absent.onnx"], "--check: no ONNX file at absent.onnx"),
        (["--timeout", "0"], "--timeout must be"),
        (["--timeout", "nan"], "--timeout must be"),
        (["--backoff", "nan"], "--retries and --backoff must be >= 0"),
        (["--retries", "-1"], "--retries and --backoff"),
    ],
)
def test_bad_arguments_are_exit_2_before_any_request(extra, message, images, tmp_path, capsys):
    port = free_ports(1)[0]
    assert cli.main([str(images[0]), "--url", f"127.0.0.1:{port}", "--out", str(tmp_path), *extra]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unreachable_server_is_one_line_after_retries(protocol, images, tmp_path):
    port = free_ports(1)[0]  # nothing listens there
    process = run_cli(
        images[0],
        "--url",
        f"127.0.0.1:{port}",
        "--protocol",
        protocol,
        "--out",
        tmp_path,
        "--retries",
        "2",
        "--backoff",
        "0.01",
    )
    assert process.returncode == 1
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach 127.0.0.1:{port} after 3 attempts")


def test_retries_back_off_exponentially(monkeypatch):
    sleeps, calls = [], []
    monkeypatch.setattr(client.time, "sleep", sleeps.append)

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    assert client.with_retries(flaky, 3, 0.1, "host:1") == "ok"
    assert sleeps == [0.1, 0.2]


@pytest.mark.parametrize(
    "status, retried",
    [
        ("500", True),
        ("503", True),
        ("StatusCode.INTERNAL", True),
        ("400", False),
        ("StatusCode.INVALID_ARGUMENT", False),
        ("404", False),
    ],
)
def test_only_transient_server_errors_are_retried(status, retried, monkeypatch):
    # A dead python-backend stub answers 500 / INTERNAL until serving.server restarts Triton;
    # a bad request answers 400 / INVALID_ARGUMENT every time and must fail at once.
    # (gRPC UNAVAILABLE is retried as a connection error: test_unreachable_server_is_one_line_after_retries.)
    from tritonclient.utils import InferenceServerException

    sleeps, calls = [], []
    monkeypatch.setattr(client.time, "sleep", sleeps.append)

    def failing():
        calls.append(1)
        raise InferenceServerException("Stub process 'medoe_0_0' is not healthy.", status=status)

    with pytest.raises(client.ClientError, match="^server: Stub process 'medoe_0_0' is not healthy") as error:
        client.with_retries(failing, 2, 0.1, "host:1")
    assert len(calls) == (3 if retried else 1) and sleeps == ([0.1, 0.2] if retried else [])
    assert ("after 3 attempts" in str(error.value)) == retried


def test_connection_closed_mid_request_is_retried(monkeypatch):
    # geventhttpclient's HTTPConnectionClosed (the server was killed mid-request) is no OSError.
    from geventhttpclient.response import HTTPConnectionClosed

    monkeypatch.setattr(client.time, "sleep", lambda _: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise HTTPConnectionClosed("connection closed.")
        return "ok"

    assert client.with_retries(flaky, 1, 0.1, "host:1") == "ok" and len(calls) == 2
