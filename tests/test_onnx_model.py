"""serving/onnx_model.py's execute() without a server: a stand-in for triton_python_backend_utils,
the shipped model.onnx, and a session that records every onnxruntime call. Shows what a server
test cannot: how the requests one execute() gets are split into calls under `max_batch_pixels`."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 2 * 48 * 64  # two 48x64 images per onnxruntime call
ARENA_MAX = 48 * 64  # calls of one 48x64 image use the arena, larger ones not


class TritonError:
    INVALID_ARG = "INVALID_ARG"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


class Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


def stand_in() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.TritonError, module.InferenceResponse, module.Tensor = TritonError, InferenceResponse, Tensor
    module.TritonModelException = RuntimeError
    module.get_input_tensor_by_name = lambda request, name: request.get(name)
    module.Logger = types.SimpleNamespace(log_warn=lambda message: None)
    return module


@pytest.fixture()
def model(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stand_in())
    spec = importlib.util.spec_from_file_location("onnx_model_under_test", ROOT / "serving" / "onnx_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.TritonPythonModel()
    config = {
        "name": "medoe",
        "output": [{"name": n} for n in ("labels", "confidence", "expert_weights")],
        "parameters": {
            "max_pixels": {"string_value": str(BUDGET)},
            "max_batch_pixels": {"string_value": str(BUDGET)},
            "arena_max_pixels": {"string_value": str(ARENA_MAX)},
        },
    }
    instance.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(ROOT / "model_repository" / "medoe"),
            "model_version": "1",
        }
    )
    session = instance.session  # serving/ort_memory.MemorySession
    assert session.arena.get_session_options().enable_cpu_mem_arena
    assert not session.no_arena.get_session_options().enable_cpu_mem_arena
    assert session.arena_max_pixels == ARENA_MAX
    calls, arena_less = [], []

    class Recording:  # every onnxruntime call, and those of the arena-less session apart
        def __init__(self, inner, log):
            self.inner, self.log = inner, log

        def run(self, outputs, feeds):
            self.log.append(feeds["images"].shape)
            return self.inner.run(outputs, feeds)

    session._no_arena = Recording(session.no_arena, arena_less)  # made on first use: made here
    instance.session = Recording(session, calls)
    instance.calls, instance.arena_less = calls, arena_less
    yield instance
    instance.finalize()


def image(seed: int, height: int = 48, width: int = 64, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def test_requests_handed_over_together_are_split_at_the_budget(model):
    images = [image(0), image(1), image(2), image(3, 40, 40), image(4), image(5, batch=2)]
    responses = model.execute([{"images": Tensor("images", x)} for x in images])
    # 48x64: requests 0+1 fill a call, 2+4 the next, the pair 5 a third; 40x40 runs on its own.
    assert sorted(model.calls) == sorted([(2, 48, 64, 3), (2, 48, 64, 3), (2, 48, 64, 3), (1, 40, 40, 3)])
    assert model.arena_less == [(2, 48, 64, 3)] * 3  # over arena_max_pixels: run without the arena
    model.calls.clear()
    for x, response in zip(images, responses, strict=True):
        assert response.error is None
        alone = model.execute([{"images": Tensor("images", x)}])[0]
        np.testing.assert_array_equal(response.outputs["labels"], alone.outputs["labels"])
        np.testing.assert_allclose(response.outputs["confidence"], alone.outputs["confidence"], atol=1e-6)


def test_refusals_are_per_request_and_in_the_projects_words(model):
    requests = [
        {"images": Tensor("images", image(0, batch=3))},  # 3 x 48x64: over the budget
        {"images": Tensor("images", np.zeros((1, 0, 10, 3), np.uint8))},
        {"images": Tensor("images", image(1))},
        {},
    ]
    responses = model.execute(requests)
    assert [r.error.code if r.error else None for r in responses] == ["INVALID_ARG", "INVALID_ARG", None, "INVALID_ARG"]
    assert responses[0].error.message == (
        f"images is 3 images of 64x48 = 9216 pixels, over the limit of {BUDGET} pixels per "
        "batch (max_batch_pixels); send fewer images per request"
    )
    assert responses[1].error.message == (
        "images has shape [1, 0, 10, 3]: empty, expected at least one image of at least 1x1 pixels"
    )
    assert responses[3].error.message == "missing input tensor 'images'"
    assert model.calls == [(1, 48, 64, 3)]  # onnxruntime saw only the good request
