"""`image` BYTES [1] -> `images` uint8 [1, h, w, 3] for the model (resized to the optional
working size) and `original` uint8 [1, H, W, 3] for postprocess; a bad image is INVALID_ARG."""

# First: this import puts the venv on sys.path (the bootstrap serving/repository.py adds to it;
# the stub ignores PYTHONPATH).
import triton_python_backend_utils as pb_utils  # isort: skip

import json

import numpy as np

from medoe.contract import IMAGE, IMAGES, ORIGINAL
from serving.decode import decode_image
from serving.model_limits import DEFAULT_MAX_PIXELS, pixel_parameter
from serving.processing import parse_working_size, resize_to_working_size


class TritonPythonModel:
    def initialize(self, args):
        parameters = json.loads(args["model_config"]).get("parameters", {})
        try:
            self.max_pixels = pixel_parameter(parameters, "max_pixels", DEFAULT_MAX_PIXELS)
        except ValueError as err:
            raise pb_utils.TritonModelException(f"preprocess: {err}") from None
        self.working_size = parse_working_size(parameters.get("working_size", {}).get("string_value", ""))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                data = pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy().reshape(-1)
                if data.size != 1:
                    raise ValueError(f"send exactly one encoded image per request, got {data.size}")
                image = decode_image(data[0], self.max_pixels)
            except ValueError as err:
                # The client sees this message with HTTP 400 / gRPC INVALID_ARGUMENT.
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG))
                )
                continue
            model_input = resize_to_working_size(image, self.working_size)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(IMAGES, model_input[np.newaxis]),
                        pb_utils.Tensor(ORIGINAL, image[np.newaxis]),
                    ]
                )
            )
        return responses
