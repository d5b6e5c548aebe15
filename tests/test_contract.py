"""medoe.contract is the one home of the wire names: the hand-written Triton configs use the
same names, the metadata survives a round trip through strings, and bad metadata is named."""

import json
from pathlib import Path

import pytest

from medoe import contract
from medoe.contract import MetadataError, ModelMetadata

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"


def read_config(name: str):
    return text_format.Parse((REPOSITORY / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def names(tensors) -> list[str]:
    return [t.name for t in tensors]


def metadata(**changes) -> ModelMetadata:
    values = dict(
        model_type="medoe",
        backbone="tiny",
        context="aspp",
        num_classes=3,
        class_names=["a", "b", "c"],
        palette=[[1, 2, 3], [4, 5, 6], [7, 8, 9]],
        groups={"head": [0], "body": [1], "tail": [2]},
        group_thresholds=[0.8, 0.95],
        num_experts=2,
        expert_groups=[[0, 1], [2]],
        outputs=list(contract.DEFAULT_OUTPUTS),
    )
    values.update(changes)
    return ModelMetadata(**values)


def test_the_segment_config_uses_the_contract_names():
    # `segment` is one python model (decode, `medoe` through BLS, drawing), no longer an ensemble
    # of preprocess -> medoe -> postprocess; its tensors are the ones the ensemble had.
    segment = read_config(contract.SEGMENT)
    assert segment.backend == "python" and not segment.platform and not segment.ensemble_scheduling.step
    assert names(segment.input) == [contract.IMAGE]
    assert [(t.data_type, list(t.dims)) for t in segment.input] == [(model_config_pb2.TYPE_STRING, [1])]
    assert names(segment.output) == list(contract.SEGMENT_OUTPUTS)
    uint8, fp32 = model_config_pb2.TYPE_UINT8, model_config_pb2.TYPE_FP32
    assert {t.name: (t.data_type, list(t.dims)) for t in segment.output} == {
        contract.LABELS: (uint8, [-1, -1]),
        contract.OVERLAY: (uint8, [-1, -1, 3]),
        contract.CLASS_SHARE: (fp32, [-1]),
        contract.CONFIDENCE: (fp32, [-1, -1]),
        contract.EXPERT_WEIGHTS: (fp32, [-1, -1, -1]),
    }
    assert segment.max_batch_size == 0  # one image per request, the batch axis dropped
    assert segment.parameters["model"].string_value == contract.MODEL


def test_the_segment_model_uses_the_contract_names():
    # What the python model sends to `medoe` and answers, named from the contract, never spelled out.
    import ast

    source = (REPOSITORY / contract.SEGMENT / "1" / "model.py").read_text()
    tree = ast.parse(source)
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "medoe.contract"
        for alias in node.names
    }
    assert {"IMAGE", "IMAGES", "MODEL", "SEGMENT_OUTPUTS", *(n.upper() for n in contract.SEGMENT_OUTPUTS)} <= imported
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not strings & {contract.IMAGE, contract.IMAGES, contract.MODEL, *contract.SEGMENT_OUTPUTS}


@pytest.mark.skipif(
    not (REPOSITORY / contract.MODEL / "config.pbtxt").is_file(), reason="the shipped model is not exported"
)
def test_the_generated_model_config_carries_the_metadata():
    config = read_config(contract.MODEL)
    assert names(config.input) == [contract.IMAGES]
    assert names(config.output) == list(contract.DEFAULT_OUTPUTS)
    served = ModelMetadata.from_props({k: v.string_value for k, v in config.parameters.items()})
    assert served.num_experts == len(served.expert_groups) and served.outputs == list(contract.DEFAULT_OUTPUTS)
    assert sorted(c for group in served.expert_groups for c in group) == list(range(served.num_classes))


def test_metadata_round_trips_through_strings_and_keeps_unknown_keys():
    original = metadata(extra={"max_pixels": "16000000"})
    props = original.to_props()
    assert all(isinstance(v, str) for v in props.values())
    assert json.loads(props["expert_groups"]) == [[0, 1], [2]] and props["num_classes"] == "3"
    assert ModelMetadata.from_props(props) == original


def test_triton_parameters_reads_http_and_grpc_json():
    parameters = {"palette": {"string_value": "[[1, 2, 3]]"}, "alpha": {"string_value": "0.5"}}
    assert contract.triton_parameters({"parameters": parameters}) == {"palette": "[[1, 2, 3]]", "alpha": "0.5"}
    assert contract.triton_parameters({"config": {"parameters": parameters}})["alpha"] == "0.5"  # gRPC's wrapper
    assert contract.triton_parameters({}) == {}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.pop("palette"), "has no palette"),
        (lambda p: p.update(palette="[[1, 2"), "`palette` is not valid JSON"),
        (lambda p: p.update(class_names='["a"]'), "1 class names and 3 colours"),
    ],
)
def test_bad_metadata_is_named_in_one_line(change, message):
    props = metadata().to_props()
    change(props)
    with pytest.raises(MetadataError, match=message) as error:
        ModelMetadata.from_props(props, "model 'medoe'")
    assert len(str(error.value).splitlines()) == 1 and "model 'medoe'" in str(error.value)


def test_the_contract_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, medoe.contract; print(sorted(m for m in ('torch', 'onnx', 'numpy', 'cv2') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"
