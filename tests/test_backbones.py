"""ImageNet weights come from a local file, mapped by key; nothing is downloaded."""

import pytest
import torch
from safetensors.torch import save_file

from medoe.backbones import ResNetC, load_imagenet_weights
from medoe.config import ModelConfig
from medoe.model import build_model


def timm_layout(state):
    # timm resnet*c: deep stem at conv1.{0,1,3,4,6}, its last BN at bn1, plus a classifier.
    out = {}
    for key, value in state.items():
        if key.startswith("stem.7."):
            out["bn1." + key[7:]] = value
        elif key.startswith("stem."):
            out["conv1." + key[5:]] = value
        else:
            out[key] = value
    out["fc.weight"] = torch.zeros(1000, 512)
    out["fc.bias"] = torch.zeros(1000)
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_layout_loads_every_key(tmp_path, suffix):
    source = ResNetC("resnet18c")
    path = tmp_path / f"weights{suffix}"
    state = timm_layout({k: v.clone() for k, v in source.state_dict().items()})
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    target = ResNetC("resnet18c")
    report = load_imagenet_weights(target, path)
    assert report.missing == []
    assert report.unused == ["fc.bias (no such key)", "fc.weight (no such key)"]
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_torchvision_layout_reports_the_7x7_stem(tmp_path):
    source = ResNetC("resnet18c")
    state = {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("stem.")}
    state["conv1.weight"] = torch.zeros(64, 3, 7, 7)
    state["bn1.weight"] = torch.ones(64)
    torch.save(state, tmp_path / "tv.pth")
    report = load_imagenet_weights(ResNetC("resnet18c"), tmp_path / "tv.pth")
    assert "conv1.weight (7x7 stem, no counterpart in the deep stem)" in report.unused
    assert report.missing and all(k.startswith("stem.") for k in report.missing)
    assert "layer4.1.conv2.weight" in report.loaded


def test_shape_mismatch_is_reported_not_loaded(tmp_path):
    state = ResNetC("resnet18c").state_dict()
    torch.save(state, tmp_path / "r18.pth")
    report = load_imagenet_weights(ResNetC("resnet50c"), tmp_path / "r18.pth")
    assert any("shape" in u for u in report.unused)


def test_missing_file_is_a_clear_error_and_config_loads_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_imagenet_weights(ResNetC("tiny"), tmp_path / "absent.pth")
    torch.save(ResNetC("tiny").state_dict(), tmp_path / "tiny.pth")
    model = build_model(ModelConfig(backbone="tiny", num_classes=3), pretrained=str(tmp_path / "tiny.pth"))
    assert model.load_report.missing == []


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"layer1.0.conv1.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_imagenet_weights(ResNetC("tiny"), tmp_path / "evil.pth")


@pytest.mark.parametrize("output_stride,strides", [(8, (4, 8, 8, 8)), (16, (4, 8, 16, 16))])
def test_output_stride(output_stride, strides):
    features = ResNetC("tiny", output_stride).eval()(torch.zeros(1, 3, 64, 64))
    assert [64 // f.shape[-1] for f in features] == list(strides)
