"""`segment` (one python model: decode, `medoe` through a BLS request, drawing) answers what the
client asks for, and what it answers is what raw `medoe` and serving/processing.py give for the
decoded image: the same labels, confidence and expert weights, the same overlay and shares."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton ships the tritonserver binary")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

from export.graph import random_images  # noqa: E402
from medoe.contract import SEGMENT_OUTPUTS, ModelMetadata  # noqa: E402
from serving.decode import decode_image  # noqa: E402
from serving.processing import class_share, overlay  # noqa: E402
from serving.repository import read_model_config  # noqa: E402
from tests.test_serving_server import png, protocol, repository, segment_request, server  # noqa: E402, F401


def metadata(repository) -> ModelMetadata:  # noqa: F811
    config = read_model_config(repository / "medoe" / "config.pbtxt")
    return ModelMetadata.from_props({k: v.string_value for k, v in config.parameters.items()})


def raw_medoe(module, client, image: np.ndarray) -> dict[str, np.ndarray]:
    tensor = module.InferInput("images", [1, *image.shape], "UINT8")
    tensor.set_data_from_numpy(image[np.newaxis])
    result = client.infer("medoe", [tensor])
    return {name: result.as_numpy(name)[0] for name in ("labels", "confidence", "expert_weights")}


def segment(module, client, data: bytes, outputs=None):
    wanted = None if outputs is None else [module.InferRequestedOutput(name) for name in outputs]
    result = client.infer("segment", segment_request(module, data), outputs=wanted)
    return {name: result.as_numpy(name) for name in SEGMENT_OUTPUTS}


def test_segment_equals_raw_medoe_on_the_decoded_image(protocol, repository):  # noqa: F811
    module, client = protocol
    data = png(random_images(1, 45, 61, seed=21)[0])
    image = decode_image(data)
    expected = raw_medoe(module, client, image)
    got = segment(module, client, data)  # no outputs named: all of them
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    np.testing.assert_array_equal(got["confidence"], expected["confidence"])
    np.testing.assert_array_equal(got["expert_weights"], expected["expert_weights"])
    served = metadata(repository)
    np.testing.assert_array_equal(got["overlay"], overlay(image, expected["labels"], served.palette, 0.5))
    np.testing.assert_array_equal(got["class_share"], class_share(expected["labels"], served.num_classes))
    assert got["class_share"].shape == (served.num_classes,) and got["class_share"].dtype == np.float32


@pytest.mark.parametrize(
    "outputs", [["labels"], ["overlay"], ["class_share"], ["confidence", "expert_weights"], ["expert_weights"]]
)
def test_segment_answers_only_the_outputs_asked_for(outputs, protocol, repository):  # noqa: F811
    module, client = protocol
    data = png(random_images(1, 40, 48, seed=22)[0])
    every = segment(module, client, data)
    got = segment(module, client, data, outputs)
    for name in SEGMENT_OUTPUTS:
        if name in outputs:
            assert got[name] is not None, f"{name} was asked for and not answered"
            np.testing.assert_array_equal(got[name], every[name])
            assert got[name].dtype == every[name].dtype
        else:
            assert got[name] is None, f"{name} was answered without being asked for"


def test_concurrent_segment_requests_each_get_their_own_answer(server, repository):  # noqa: F811
    # Answered from several threads at once, so `medoe` may batch them: each keeps its own rows.
    images = [random_images(1, 36, 52, seed=30 + i)[0] for i in range(8)]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        expected = [raw_medoe(grpcclient, client, decode_image(png(image)))["labels"] for image in images]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda im: segment(grpcclient, client, png(im), ["labels"])["labels"], images))
    finally:
        client.close()
    for got, want in zip(answers, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_baseline_behind_segment_answers_its_four_outputs_and_refuses_expert_weights(tmp_path):
    from serving.processes import free_ports
    from serving.supervisor import start_server
    from tests.test_export import make_checkpoint
    from tests.test_serving_server import exported_repository

    repo = exported_repository(
        tmp_path, make_checkpoint(tmp_path / "checkpoint", "baseline"), "--verify-sizes", "48x64"
    )
    data = png(random_images(1, 48, 64, seed=2)[0])
    handle = start_server(repo, *free_ports(3), timeout=60)
    try:
        for module, url in ((httpclient, handle.http_url), (grpcclient, handle.grpc_url)):
            client = module.InferenceServerClient(url)
            result = client.infer("segment", segment_request(module, data))  # no outputs named: all it has
            assert result.as_numpy("labels").shape == (48, 64) and result.as_numpy("expert_weights") is None
            assert result.as_numpy("overlay").shape == (48, 64, 3)
            with pytest.raises(module.InferenceServerException) as error:
                outputs = [module.InferRequestedOutput(name) for name in ("labels", "expert_weights")]
                client.infer("segment", segment_request(module, data), outputs=outputs)
            assert str(error.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), error.value.status()
            assert "(baseline) has no output expert_weights" in error.value.message(), error.value.message()
            assert client.is_server_live()
            client.close()
    finally:
        handle.stop()
