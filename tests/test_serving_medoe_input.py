"""Raw `medoe` tensors the model cannot run, through the real server, over HTTP and gRPC.

What reaches serving/onnx_model.py is refused there in the project's words (an empty image used
to answer with onnxruntime's node names). What Triton refuses from the config (max_batch_size 8:
the first dimension is the batch, dims [-1, -1, 3] after it) never reaches the model, so its
own message is what the client gets; these tests pin that text, so a Triton upgrade that
changes it is noticed.
"""

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton ships the tritonserver binary")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

from tests.test_serving_bad_input import assert_invalid_argument, assert_still_serving, protocol  # noqa: E402, F401
from tests.test_serving_server import repository, server  # noqa: E402, F401

CASES = {
    # Refused by onnx_model.py (serving/model_limits.py).
    "empty height": (
        (1, 0, 10, 3),
        "images has shape [1, 0, 10, 3]: empty, expected at least one image of at least 1x1 pixels",
    ),
    "empty width": ((2, 10, 0, 3), "images has shape [2, 10, 0, 3]: empty"),
    # Refused by Triton before the model runs: a [H, W, 3] image without the batch dimension is
    # read as a batch of H images of shape [W, 3]. Over 8 rows, the batch size is what it names...
    "no batch dimension, 64 rows": ((64, 64, 3), "inference request batch-size must be <= 8 for 'medoe'"),
    # ... and at most 8 rows, the shape, with its own hint about max_batch_size.
    "no batch dimension, 8 rows": (
        (8, 8, 3),
        "unexpected shape for input 'images' for model 'medoe'. "
        "Expected [-1,-1,-1,3], got [8,8,3]. NOTE: Setting a non-zero max_batch_size",
    ),
    # A batch of 0 images: Triton computes the expected size from the dims it was given.
    "zero images": ((0, 8, 8, 3), "input byte size mismatch for input 'images' for model 'medoe'. Expected 192, got 0"),
}


@pytest.mark.parametrize("case", CASES)
def test_medoe_refuses(case, protocol, server, repository):  # noqa: F811
    module, client = protocol
    shape, message = CASES[case]
    tensor = module.InferInput("images", list(shape), "UINT8")
    tensor.set_data_from_numpy(np.zeros(shape, np.uint8))
    with pytest.raises(module.InferenceServerException) as error:
        client.infer("medoe", [tensor])
    assert_invalid_argument(module, error.value, message)
    assert "onnxruntime" not in error.value.message().lower()
    assert_still_serving(server, repository, module, client)


def test_smallest_image_the_graph_runs(protocol):  # noqa: F811
    module, client = protocol
    tensor = module.InferInput("images", [1, 1, 1, 3], "UINT8")  # the graph runs any size from 1x1 up
    tensor.set_data_from_numpy(np.full((1, 1, 1, 3), 200, np.uint8))
    result = client.infer("medoe", [tensor])
    assert result.as_numpy("labels").shape == (1, 1, 1) and result.as_numpy("confidence").shape == (1, 1, 1)
