"""Python-backend model that runs a model's `model.onnx` with onnxruntime.

The tritonserver shipped in the nvidia-pytriton wheel has only the python backend, so
serving/repository.py copies this file as `<model>/<version>/model.py` beside the ONNX graph of
a model whose config names platform onnxruntime_onnx. Every request is checked first
(serving/model_limits.py: shape, dtype, `max_pixels` per image, `max_batch_pixels` per request);
requests that Triton's dynamic batcher hands over together run as one onnxruntime call per
image size, split into several calls where one would exceed `max_batch_pixels`. Calls over
`arena_max_pixels` (larger than the usual batches) run without onnxruntime's CPU arena and the
heap is trimmed after them (serving/ort_memory.py), so memory comes back after a large request.
"""

from __future__ import annotations

# First: this import puts the venv on sys.path (the bootstrap serving/repository.py adds to it;
# the stub ignores PYTHONPATH).
import triton_python_backend_utils as pb_utils  # isort: skip

import json
from pathlib import Path

import numpy as np

from serving.model_limits import check_images, pixel_parameter, plan_calls, read_limits
from serving.ort_memory import ARENA_MAX_PIXELS, MemorySession


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        if not path.is_file():
            raise pb_utils.TritonModelException(f"{config['name']}: no ONNX graph at {path}")
        parameters = config.get("parameters", {})
        try:
            self.max_pixels, self.max_batch_pixels = read_limits(parameters)
            arena_max_pixels = pixel_parameter(parameters, "arena_max_pixels", ARENA_MAX_PIXELS)
        except ValueError as err:
            raise pb_utils.TritonModelException(f"{config['name']}: {err}") from None
        self.session = MemorySession(str(path), arena_max_pixels)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o["name"] for o in config["output"]]

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, feeds)

    def _feed(self, request) -> tuple[dict[str, np.ndarray], str | None]:
        feed = {}
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return feed, f"missing input tensor {name!r}"
            feed[name] = tensor.as_numpy()
            if problem := check_images(name, feed[name], self.max_pixels, self.max_batch_pixels):
                return feed, problem
        return feed, None

    def execute(self, requests):
        feeds, errors = [], {}
        for index, request in enumerate(requests):
            feed, problem = self._feed(request)
            feeds.append(feed)
            if problem:
                errors[index] = problem
        good = [i for i in range(len(requests)) if i not in errors]
        results: dict[int, list[np.ndarray]] = {}
        # Requests of one image size share an onnxruntime call (its cost per call is high on a small
        # CPU, and batching is what the dynamic batcher is for), as many as the pixel budget allows.
        for call in plan_calls([feeds[i][self.inputs[0]].shape for i in good], self.max_batch_pixels):
            members = [good[k] for k in call]
            if len(members) > 1:
                results.update(self._run_together(members, feeds))
        return [self._respond(errors.get(i), results.pop(i, None), feeds[i]) for i in range(len(requests))]

    def _respond(self, error: str | None, outputs: list[np.ndarray] | None, feed: dict[str, np.ndarray]):
        if error is None and outputs is None:
            try:
                outputs = self._run(feed)
            except Exception as err:
                message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                error = f"onnxruntime: {message}"
        if error is not None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(error, pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, outputs, strict=True)
            ]
        )

    def _run_together(self, members: list[int], feeds: list[dict]) -> dict[int, list[np.ndarray]]:
        sizes = [len(feeds[i][self.inputs[0]]) for i in members]
        try:
            joined = self._run({n: np.concatenate([feeds[i][n] for i in members]) for n in self.inputs})
        except Exception as err:  # left to one call per request, so that one bad input fails alone
            pb_utils.Logger.log_warn(f"batched run failed ({type(err).__name__}); running requests one by one")
            return {}
        bounds = np.cumsum([0, *sizes])
        return {i: [out[bounds[k] : bounds[k + 1]] for out in joined] for k, i in enumerate(members)}

    def finalize(self):
        self.session = None
