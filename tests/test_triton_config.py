"""Triton configs come from the graph: names, dtypes, dims and metadata, for both platforms."""

import json

import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2

from export import triton_config
from export.triton_config import onnx_io, render_config, triton_model_dir, write_triton_config

# Quotes, a backslash and non-ASCII must survive pbtxt escaping and JSON decoding.
CLASS_NAMES = ['road "main"', "sidewalk\\kerb", "Straßenbahn", "sky"]


def graph_like_the_export(batch="batch") -> onnx.ModelProto:
    images = helper.make_tensor_value_info("images", TensorProto.UINT8, [batch, "height", "width", 3])
    outputs = [
        helper.make_tensor_value_info("labels", TensorProto.UINT8, [batch, "height", "width"]),
        helper.make_tensor_value_info("confidence", TensorProto.FLOAT, [batch, "height", "width"]),
        helper.make_tensor_value_info("expert_weights", TensorProto.FLOAT, [batch, 3, "fh", "fw"]),
    ]
    model = helper.make_model(helper.make_graph([], "g", [images], outputs))
    for key, value in {
        "class_names": json.dumps(CLASS_NAMES),
        "num_experts": "3",
        "groups": json.dumps({"head": [0, 3], "body": [1], "tail": [2]}),
    }.items():
        model.metadata_props.add(key=key, value=value)
    return model


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("platform,kind", [("onnxruntime_onnx", "KIND_AUTO"), ("tensorrt_plan", "KIND_GPU")])
def test_config_matches_the_graph(tmp_path, platform, kind):
    model_dir = tmp_path / "repo" / "medoe_x"
    path = write_triton_config(
        graph_like_the_export(), model_dir, platform, max_batch_size=4, max_queue_delay_us=250, warmup=(1, 512, 1024)
    )
    config = parse(path.read_text())
    assert config.name == "medoe_x" and config.platform == platform and config.max_batch_size == 4
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("images", "TYPE_UINT8", [-1, -1, 3])
    ]
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [
        ("labels", "TYPE_UINT8", [-1, -1]),
        ("confidence", "TYPE_FP32", [-1, -1]),
        ("expert_weights", "TYPE_FP32", [3, -1, -1]),
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == kind
    assert json.loads(config.parameters["class_names"].string_value) == CLASS_NAMES
    assert json.loads(config.parameters["groups"].string_value) == {"head": [0, 3], "body": [1], "tail": [2]}
    assert config.parameters["num_experts"].string_value == "3"
    warmup = config.model_warmup[0]
    assert warmup.batch_size == 1 and list(warmup.inputs["images"].dims) == [512, 1024, 3]


def test_no_batching_keeps_the_batch_dimension():
    inputs, outputs = onnx_io(graph_like_the_export())
    config = parse(render_config("m", "onnxruntime_onnx", inputs, outputs, {}, max_batch_size=0))
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [-1, -1, -1, 3]


def test_fixed_batch_cannot_be_batched_by_triton():
    inputs, outputs = onnx_io(graph_like_the_export(batch=1))
    with pytest.raises(ValueError, match="fixed leading dimension"):
        render_config("m", "onnxruntime_onnx", inputs, outputs, {}, max_batch_size=8)


def test_unmapped_dtype_is_a_clear_error():
    model = graph_like_the_export()
    model.graph.output[1].type.tensor_type.elem_type = TensorProto.COMPLEX64
    with pytest.raises(ValueError, match="confidence.*COMPLEX64"):
        onnx_io(model)


@pytest.mark.parametrize(
    "path,expected",
    [
        ("model_repository/medoe/1/model.onnx", "model_repository/medoe"),
        ("model_repository/medoe_trt/12/model.plan", "model_repository/medoe_trt"),
        ("out/model.onnx", None),
        ("model_repository/medoe/1/other.onnx", None),
    ],
)
def test_triton_layout(path, expected):
    found = triton_model_dir(path)
    assert (str(found) if found else None) == expected


def test_cli_writes_beside_the_version_dir_and_fails_in_one_line(tmp_path, capsys):
    onnx_path = tmp_path / "repo" / "medoe" / "1" / "model.onnx"
    onnx_path.parent.mkdir(parents=True)
    onnx.save(graph_like_the_export(), str(onnx_path))
    assert triton_config.main(["--onnx", str(onnx_path), "--max-batch-size", "2"]) == 0
    assert parse((tmp_path / "repo" / "medoe" / "config.pbtxt").read_text()).max_batch_size == 2
    capsys.readouterr()
    loose = tmp_path / "model.onnx"
    loose.write_bytes(onnx_path.read_bytes())
    assert triton_config.main(["--onnx", str(loose)]) == 2
    assert triton_config.main(["--onnx", str(tmp_path / "absent" / "1" / "model.onnx")]) == 2
    assert triton_config.main(["--onnx", str(onnx_path), "--warmup", "512x1024"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors)
    assert "--model-dir" in errors[0] and "not found" in errors[1] and "NxHxW" in errors[2]
