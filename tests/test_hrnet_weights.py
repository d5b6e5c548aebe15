"""HRNet weights in the official and mmsegmentation layouts load key for key.

Each layout is written here from a randomly initialised backbone by the key names of the code
bases (HRNet-Image-Classification lib/models/cls_hrnet.py with its ImageNet classification head,
HRNet-Semantic-Segmentation's FullModel under `model.`, mmseg/models/backbones/hrnet.py inside an
mmseg segmentor checkpoint), then loaded into a fresh one.
"""

import pytest
import torch
from safetensors.torch import save_file

from medoe.config import ModelConfig
from medoe.hrnet import HRNet, load_hrnet_weights
from medoe.model import build_model

CLASSIFIER_HEAD = {  # a few of cls_hrnet.py's head keys: incre_modules, downsamp_modules, final_layer, classifier
    "incre_modules.0.0.conv1.weight": torch.zeros(32, 18, 1, 1),
    "downsamp_modules.0.0.weight": torch.zeros(256, 128, 3, 3),
    "final_layer.1.running_mean": torch.zeros(2048),
    "classifier.weight": torch.zeros(1000, 2048),
}


def official_imagenet(state):  # hrnetv2_w18_imagenet_pretrained.pth: our names plus the classifier head
    return {**state, **CLASSIFIER_HEAD}


def official_segmentation(state):  # HRNet-Semantic-Segmentation: FullModel(model, loss), OCR head alongside
    out = {"model." + k: v for k, v in state.items()}
    out["model.last_layer.0.weight"] = torch.zeros(270, 270, 1, 1)
    out["loss.criterion.weight"] = torch.ones(19)
    return {"state_dict": out}


def mmseg_segmentor(state):  # mmcv's build_norm_layer names the BN layers bn1/bn2/bn3, as the official code
    out = {"backbone." + k: v for k, v in state.items()}
    out["decode_head.1.conv_seg.weight"] = torch.zeros(19, 512, 1, 1)
    return {"meta": {"mmseg_version": "1.2.2"}, "state_dict": out}


HEAD_UNUSED = sorted(f"{k} (ImageNet classification head, not part of the backbone)" for k in CLASSIFIER_HEAD)
LAYOUTS = {
    "official_imagenet": (official_imagenet, HEAD_UNUSED),
    "official_segmentation": (
        official_segmentation,
        ["loss.criterion.weight (no such key)", "model.last_layer.0.weight (no such key)"],
    ),
    "mmseg": (mmseg_segmentor, ["decode_head.1.conv_seg.weight (no such key)"]),
    "model_wrapper": (lambda s: {"model": s}, []),
}


@pytest.mark.parametrize(
    "layout, suffix", [(layout, ".pth") for layout in LAYOUTS] + [("official_imagenet", ".safetensors")]
)
def test_layout_loads_every_key_with_equal_tensors(tmp_path, layout, suffix):
    torch.manual_seed(0)
    source = HRNet("hrnet_w18_small")
    with torch.no_grad():  # distinct BN statistics, so a swapped key would show
        for name, buffer in source.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    convert, expected_unused = LAYOUTS[layout]
    state = convert({k: v.clone() for k, v in source.state_dict().items()})
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":  # a flat tensor file: no wrapper, no metadata
        state = next((state[w] for w in ("state_dict", "model") if w in state), state)
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(1)
    target = HRNet("hrnet_w18_small")
    report = load_hrnet_weights(target, path)
    assert report.missing == []
    assert report.unused == expected_unused
    assert sorted(report.loaded) == sorted(source.state_dict())
    loaded = target.state_dict()  # once: a state_dict() per key would take seconds with ~1500 keys
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(source.eval()(x), target.eval()(x), strict=True))


def test_wrong_shape_is_reported_as_mismatched_and_left_missing(tmp_path):
    state = official_imagenet(HRNet("hrnet_w18_small").state_dict())
    state["stage2.0.fuse_layers.0.1.0.weight"] = torch.zeros(18, 36, 3, 3)
    torch.save(state, tmp_path / "w18s.pth")
    report = load_hrnet_weights(HRNet("hrnet_w18_small"), tmp_path / "w18s.pth")
    assert "stage2.0.fuse_layers.0.1.0.weight (shape (18, 36, 3, 3) != (18, 36, 1, 1))" in report.unused
    assert report.missing == ["stage2.0.fuse_layers.0.1.0.weight"]


def test_a_w18_small_file_into_w18_leaves_the_deeper_modules_missing(tmp_path):
    torch.save(HRNet("hrnet_w18_small").state_dict(), tmp_path / "w18s.pth")
    report = load_hrnet_weights(HRNet("hrnet_w18"), tmp_path / "w18s.pth")
    assert "stage3.3.branches.0.0.conv1.weight" in report.missing  # w18 has 4 stage-3 modules, w18_small 3
    assert "layer1.2.conv1.weight" in report.missing and report.unused == []


def test_build_model_loads_hrnet_weights(tmp_path):
    torch.save(mmseg_segmentor(HRNet("hrnet_w18_small").state_dict()), tmp_path / "hr18s.pth")
    config = ModelConfig(backbone="hrnet_w18_small", context="ocr", num_classes=3, decoder_channels=16)
    model = build_model(config, pretrained=str(tmp_path / "hr18s.pth"))
    assert model.load_report.missing == []
    assert model.load_report.unused == ["decode_head.1.conv_seg.weight (no such key)"]


def test_branch_strides_and_widths_then_the_stride_4_concatenation():
    backbone = HRNet("hrnet_w18_small").eval()
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, 64, 96))
    assert backbone.channels == [18, 36, 72, 144, 270] == [f.shape[1] for f in features]
    assert [96 // f.shape[-1] for f in features] == [4, 8, 16, 32, 4]
