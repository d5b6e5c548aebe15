"""`medoe` outputs + decoded image -> `labels` [H, W], `overlay` [H, W, 3], `class_share` [C],
`confidence` [H, W] and `expert_weights` [K, h, w]."""

# First: this import puts the venv on sys.path (the bootstrap serving/repository.py adds to it;
# the stub ignores PYTHONPATH).
import triton_python_backend_utils as pb_utils  # isort: skip

import json
from pathlib import Path

import numpy as np

from medoe.contract import (
    CLASS_SHARE,
    CONFIDENCE,
    EXPERT_WEIGHTS,
    IMAGES,
    LABELS,
    MODEL,
    OVERLAY,
    MetadataError,
    ModelMetadata,
    triton_parameters,
)
from serving.processing import (
    class_share,
    overlay,
    palette_array,
    resize_labels_nearest,
    resize_map,
)


def _model_parameters(config_path: Path) -> dict[str, str]:
    # The generated config.pbtxt is protobuf text; Triton's own schema (from tritonclient) reads it.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in config.parameters.items()}


class TritonPythonModel:
    def initialize(self, args):
        parameters = triton_parameters(json.loads(args["model_config"]))
        if "palette" not in parameters:
            # args["model_repository"] is this model's own directory; the metadata model is its sibling.
            source = Path(args["model_repository"]).parent / parameters.get("metadata_model", MODEL) / "config.pbtxt"
            if not source.is_file():
                raise pb_utils.TritonModelException(
                    f"postprocess: no palette parameter and no {source} to read it from"
                )
            parameters = {**_model_parameters(source), **parameters}
        if "palette" not in parameters:
            raise pb_utils.TritonModelException("postprocess: the metadata model's config has no `palette` parameter")
        try:
            metadata = ModelMetadata.from_props(parameters, "postprocess: the metadata model's config")
        except MetadataError as err:
            raise pb_utils.TritonModelException(str(err)) from None
        self.num_classes = metadata.num_classes
        self.palette = palette_array(metadata.palette)
        self.alpha = float(parameters.get("alpha", 0.5))

    def execute(self, requests):
        responses = []
        for request in requests:
            image = pb_utils.get_input_tensor_by_name(request, IMAGES).as_numpy()[0]
            labels = pb_utils.get_input_tensor_by_name(request, LABELS).as_numpy()[0]
            confidence = pb_utils.get_input_tensor_by_name(request, CONFIDENCE).as_numpy()[0]
            weights = pb_utils.get_input_tensor_by_name(request, EXPERT_WEIGHTS).as_numpy()[0]
            # `images` is the original image; labels come at the working size when preprocess resized.
            # Resized only when preprocess used a working size: a copy of 2.5 MB costs ~1 ms.
            if labels.shape != image.shape[:2]:
                labels, confidence = (
                    resize_labels_nearest(labels, image.shape[:2]),
                    resize_map(confidence, image.shape[:2]),
                )
            outputs = {
                LABELS: labels,
                OVERLAY: overlay(image, labels, self.palette, self.alpha),
                CLASS_SHARE: class_share(labels, self.num_classes),
                CONFIDENCE: np.ascontiguousarray(confidence, np.float32),
                EXPERT_WEIGHTS: np.ascontiguousarray(weights, np.float32),
            }
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
            )
        return responses
