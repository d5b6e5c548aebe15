"""Python-backend model that runs a model's `model.onnx` with onnxruntime.

The tritonserver shipped in the nvidia-pytriton wheel has only the python backend, so
serving/server.py copies this file as `<model>/<version>/model.py` beside the ONNX graph of
a model whose config names platform onnxruntime_onnx. Requests that Triton's dynamic
batcher hands over together run as one onnxruntime call when their image sizes match.
"""

from __future__ import annotations

# First: under serving/server.py this import puts the venv on sys.path (the stub ignores PYTHONPATH).
import triton_python_backend_utils as pb_utils  # isort: skip

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.processing import DEFAULT_MAX_PIXELS


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        if not path.is_file():
            raise pb_utils.TritonModelException(f"{config['name']}: no ONNX graph at {path}")
        options = ort.SessionOptions()
        # One Triton instance per process; leave threads to onnxruntime unless told (SERVING_ORT_THREADS).
        options.intra_op_num_threads = int(os.environ.get("SERVING_ORT_THREADS", "0"))
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o["name"] for o in config["output"]]
        # `preprocess` limits what `segment` decodes; a client calling this model directly with
        # raw [N, H, W, 3] tensors meets the same limit here, before any activation is allocated.
        parameters = config.get("parameters", {})
        self.max_pixels = int(parameters.get("max_pixels", {}).get("string_value", DEFAULT_MAX_PIXELS))

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, feeds)

    def execute(self, requests):
        feeds, errors = [], {}
        for index, request in enumerate(requests):
            feed = {}
            for name in self.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    errors[index] = f"missing input tensor {name!r}"
                    break
                feed[name] = tensor.as_numpy()
                if feed[name].ndim == 4 and feed[name].shape[1] * feed[name].shape[2] > self.max_pixels:
                    height, width = feed[name].shape[1:3]
                    errors[index] = f"{name} is {width}x{height}, over the limit of {self.max_pixels} pixels per image"
                    break
            feeds.append(feed)
        results: dict[int, list[np.ndarray]] = {}
        good = [i for i in range(len(requests)) if i not in errors]
        # One onnxruntime call for all requests when every input's trailing shape matches:
        # onnxruntime's cost per call is high on a small CPU, and batching is what the
        # dynamic batcher is for.
        if len(good) > 1 and all(len({feeds[i][n].shape[1:] for i in good}) == 1 for n in self.inputs):
            sizes = [len(feeds[i][self.inputs[0]]) for i in good]
            try:
                joined = self._run({n: np.concatenate([feeds[i][n] for i in good]) for n in self.inputs})
                bounds = np.cumsum([0, *sizes])
                for k, i in enumerate(good):
                    results[i] = [out[bounds[k]:bounds[k + 1]] for out in joined]
            except Exception as err:  # fall back to one call per request, so one bad input fails alone
                pb_utils.Logger.log_warn(f"batched run failed ({type(err).__name__}); running requests one by one")
        responses = []
        for index in range(len(requests)):
            if index in errors:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(errors[index], pb_utils.TritonError.INVALID_ARG)))
                continue
            try:
                outputs = results[index] if index in results else self._run(feeds[index])
            except Exception as err:
                message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"onnxruntime: {message}", pb_utils.TritonError.INVALID_ARG)))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, outputs, strict=True)]))
        return responses

    def finalize(self):
        self.session = None
