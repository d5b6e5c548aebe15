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


def test_the_ensemble_config_uses_the_contract_names():
    segment = read_config(contract.ENSEMBLE)
    assert names(segment.input) == [contract.IMAGE]
    assert names(segment.output) == list(contract.SEGMENT_OUTPUTS)
    steps = [step.model_name for step in segment.ensemble_scheduling.step]
    assert steps == [contract.PREPROCESS, contract.MODEL, contract.POSTPROCESS]
    preprocess, model, postprocess = segment.ensemble_scheduling.step
    assert set(preprocess.input_map) == {contract.IMAGE}
    assert set(preprocess.output_map) == {contract.IMAGES, contract.ORIGINAL}
    assert set(model.input_map) == {contract.IMAGES}
    assert set(model.output_map) == {contract.LABELS, contract.CONFIDENCE, contract.EXPERT_WEIGHTS}
    assert set(postprocess.output_map) == set(contract.SEGMENT_OUTPUTS)


def test_the_python_model_configs_use_the_contract_names():
    preprocess, postprocess = read_config(contract.PREPROCESS), read_config(contract.POSTPROCESS)
    assert names(preprocess.input) == [contract.IMAGE]
    assert names(preprocess.output) == [contract.IMAGES, contract.ORIGINAL]
    assert names(postprocess.input) == [contract.IMAGES, contract.LABELS, contract.CONFIDENCE, contract.EXPERT_WEIGHTS]
    assert names(postprocess.output) == list(contract.SEGMENT_OUTPUTS)


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
