"""serving/model_limits.py without a server: what a raw `medoe` request may hold, how requests are
packed into onnxruntime calls under the pixel budget, and that the shipped configs agree on the limits."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.triton_config import write_triton_config
from serving.model_limits import (
    DEFAULT_MAX_BATCH_PIXELS,
    DEFAULT_MAX_PIXELS,
    check_images,
    plan_calls,
    read_limits,
)
from serving.ort_memory import ARENA_MAX_PIXELS
from tests.test_triton_config import graph_like_the_export

ROOT = Path(__file__).resolve().parents[1]


def parameters(path) -> dict[str, str]:
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in config.parameters.items()}


@pytest.mark.parametrize(
    "shape,dtype,message",
    [
        (
            (1, 0, 10, 3),
            np.uint8,
            "images has shape [1, 0, 10, 3]: empty, expected at least one image of at least 1x1 pixels",
        ),
        ((0, 8, 8, 3), np.uint8, "empty"),
        ((64, 64, 3), np.uint8, "images has shape [64, 64, 3], expected [N, H, W, 3]"),
        ((1, 8, 8, 4), np.uint8, "expected [N, H, W, 3]"),
        ((1, 8, 8, 3), np.float32, "images is float32, expected uint8"),
        ((1, 101, 100, 3), np.uint8, "images is 100x101, over the limit of 10000 pixels per image (max_pixels)"),
        (
            (3, 60, 60, 3),
            np.uint8,
            "images is 3 images of 60x60 = 10800 pixels, over the limit of 10000 pixels per batch (max_batch_pixels)",
        ),
    ],
)
def test_check_images_refuses(shape, dtype, message):
    problem = check_images("images", np.zeros(shape, dtype), max_pixels=10_000, max_batch_pixels=10_000)
    assert problem is not None and message in problem and "\n" not in problem


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 100, 50, 3), (1, 100, 100, 3)])
def test_check_images_accepts(shape):
    assert check_images("images", np.zeros(shape, np.uint8), max_pixels=10_000, max_batch_pixels=10_000) is None


def test_plan_calls_splits_at_the_budget_and_groups_by_size():
    small, other = (1, 10, 10, 3), (1, 20, 10, 3)  # 100 and 200 pixels
    shapes = [small, other, small, (2, 10, 10, 3), small, other]
    # Budget 300: smalls 0, 2 and the pair 3 (N=2) would make 400, so 3 opens a call that 4 joins; 1 and 5 make 400.
    assert plan_calls(shapes, 300) == [[0, 2], [1], [3, 4], [5]]
    assert plan_calls(shapes, 10_000) == [[0, 2, 3, 4], [1, 5]]
    assert plan_calls(shapes, 100) == [[0], [1], [2], [3], [4], [5]]  # each alone, however over (checked before)
    assert plan_calls([], 100) == []


def test_read_limits():
    assert read_limits({}) == (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BATCH_PIXELS)
    assert read_limits({"max_pixels": {"string_value": "5000"}}) == (5000, DEFAULT_MAX_BATCH_PIXELS)
    with pytest.raises(ValueError, match="max_batch_pixels is 'lots', expected a positive number"):
        read_limits({"max_batch_pixels": {"string_value": "lots"}})
    with pytest.raises(ValueError, match=r"max_pixels \(20\) is over max_batch_pixels \(10\)"):
        read_limits({"max_pixels": {"string_value": "20"}, "max_batch_pixels": {"string_value": "10"}})


def test_defaults_refuse_the_reported_cases():
    # The two requests that used to pass: one 6000x6000 image, a raw batch of four 2048x2048.
    assert 6000 * 6000 > DEFAULT_MAX_PIXELS and 4 * 2048 * 2048 > DEFAULT_MAX_BATCH_PIXELS
    assert DEFAULT_MAX_PIXELS <= DEFAULT_MAX_BATCH_PIXELS and 8 * 512 * 1024 <= DEFAULT_MAX_BATCH_PIXELS


def test_shipped_configs_agree_on_the_limits():
    medoe = parameters(ROOT / "model_repository" / "medoe" / "config.pbtxt")
    segment = parameters(ROOT / "model_repository" / "segment" / "config.pbtxt")
    assert int(medoe["max_pixels"]) == int(segment["max_pixels"]) == DEFAULT_MAX_PIXELS
    assert int(medoe["max_batch_pixels"]) == DEFAULT_MAX_BATCH_PIXELS
    assert int(medoe["arena_max_pixels"]) == ARENA_MAX_PIXELS


def test_generator_writes_the_limits_for_onnxruntime_only(tmp_path):
    model: onnx.ModelProto = graph_like_the_export()
    onnx_config = parameters(
        write_triton_config(
            model, tmp_path / "a", "onnxruntime_onnx", max_pixels=100, max_batch_pixels=200, arena_max_pixels=50
        )
    )
    assert [onnx_config[k] for k in ("max_pixels", "max_batch_pixels", "arena_max_pixels")] == ["100", "200", "50"]
    assert "max_pixels" not in parameters(write_triton_config(model, tmp_path / "b", "tensorrt_plan"))
    with pytest.raises(ValueError, match="at most max_batch_pixels"):
        write_triton_config(model, tmp_path / "c", "onnxruntime_onnx", max_pixels=300, max_batch_pixels=200)
