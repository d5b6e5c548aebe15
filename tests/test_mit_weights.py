"""MiT weights in the NVlabs, mmsegmentation and Hugging Face layouts load key for key.

Each layout is written here from a randomly initialised backbone, by the key names of the three
code bases (NVlabs/SegFormer mix_transformer.py, mmseg/models/backbones/mit.py,
transformers/models/segformer/modeling_segformer.py), then loaded into a fresh one.
"""

import re

import pytest
import torch
from safetensors.torch import save_file

from medoe.config import ModelConfig
from medoe.mit import MixTransformer, load_mit_weights
from medoe.model import build_model

BLOCK = re.compile(r"block\.(\d)\.(\d+)\.(.+)")
EMBED = re.compile(r"patch_embed\.(\d)\.(proj|norm)\.(\w+)")
NORM = re.compile(r"norm\.(\d)\.(\w+)")


def nvlabs_layout(state):
    out = {}
    for key, value in state.items():
        if m := BLOCK.fullmatch(key):
            rest = m[3].replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
            out[f"block{int(m[1]) + 1}.{m[2]}.{rest}"] = value
        elif m := EMBED.fullmatch(key):
            out[f"patch_embed{int(m[1]) + 1}.{m[2]}.{m[3]}"] = value
        elif m := NORM.fullmatch(key):
            out[f"norm{int(m[1]) + 1}.{m[2]}"] = value
        else:
            raise AssertionError(key)
    out["head.weight"], out["head.bias"] = torch.zeros(1000, 256), torch.zeros(1000)  # ImageNet classifier
    return out


def mmseg_layout(state):
    out = {}
    for key, value in state.items():
        if m := BLOCK.fullmatch(key):
            prefix, rest = f"layers.{m[1]}.1.{m[2]}.", m[3]
            if rest.startswith("attn.q."):
                kind = rest.removeprefix("attn.q.")
                kv = state[key.replace("attn.q.", "attn.kv.")]
                out[prefix + f"attn.attn.in_proj_{kind}"] = torch.cat([value, kv])
            elif rest.startswith("attn.kv."):
                continue
            elif rest.startswith("attn.proj."):
                out[prefix + "attn.attn.out_proj." + rest.removeprefix("attn.proj.")] = value
            elif rest.startswith("mlp."):
                layer = {"fc1": 0, "dwconv": 1, "fc2": 4}[rest.split(".")[1]]
                if layer != 1 and value.ndim == 2:
                    value = value[:, :, None, None]  # 1x1 convs in mmseg
                out[prefix + f"ffn.layers.{layer}." + rest.split(".")[-1]] = value
            else:  # norm1, norm2, attn.sr, attn.norm
                out[prefix + rest] = value
        elif m := EMBED.fullmatch(key):
            out[f"layers.{m[1]}.0.{'projection' if m[2] == 'proj' else 'norm'}.{m[3]}"] = value
        elif m := NORM.fullmatch(key):
            out[f"layers.{m[1]}.2.{m[2]}"] = value
        else:
            raise AssertionError(key)
    return {"state_dict": {"backbone." + k: v for k, v in out.items()}}  # as an mmseg checkpoint


HF_BLOCK = {
    "norm1.": "layer_norm_1.",
    "norm2.": "layer_norm_2.",
    "attn.q.": "attention.self.query.",
    "attn.sr.": "attention.self.sr.",
    "attn.norm.": "attention.self.layer_norm.",
    "attn.proj.": "attention.output.dense.",
    "mlp.fc1.": "mlp.dense1.",
    "mlp.dwconv.": "mlp.dwconv.dwconv.",
    "mlp.fc2.": "mlp.dense2.",
}


def hf_layout(state, prefix="segformer."):
    out = {}
    for key, value in state.items():
        if m := BLOCK.fullmatch(key):
            head, rest = f"{prefix}encoder.block.{m[1]}.{m[2]}.", m[3]
            if rest.startswith("attn.kv."):
                kind = rest.removeprefix("attn.kv.")
                key_half, value_half = value.chunk(2)
                out[head + f"attention.self.key.{kind}"] = key_half
                out[head + f"attention.self.value.{kind}"] = value_half
                continue
            ours = next(p for p in HF_BLOCK if rest.startswith(p))
            out[head + HF_BLOCK[ours] + rest.removeprefix(ours)] = value
        elif m := EMBED.fullmatch(key):
            out[f"{prefix}encoder.patch_embeddings.{m[1]}.{'proj' if m[2] == 'proj' else 'layer_norm'}.{m[3]}"] = value
        elif m := NORM.fullmatch(key):
            out[f"{prefix}encoder.layer_norm.{m[1]}.{m[2]}"] = value
        else:
            raise AssertionError(key)
    if prefix:  # SegformerForSemanticSegmentation: its decode head has no place in a backbone
        out["decode_head.classifier.weight"] = torch.zeros(19, 256, 1, 1)
    return out


LAYOUTS = {
    "nvlabs": (nvlabs_layout, ["head.bias (no such key)", "head.weight (no such key)"]),
    "mmseg": (mmseg_layout, []),
    "hf": (hf_layout, ["decode_head.classifier.weight (no such key)"]),
    "hf_model": (lambda s: hf_layout(s, prefix=""), []),  # SegformerModel saved alone
    "ours": (dict, []),
}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_loads_every_key_with_equal_tensors(tmp_path, layout, suffix):
    torch.manual_seed(0)
    source = MixTransformer("mit_b0")
    convert, expected_unused = LAYOUTS[layout]
    state = convert({k: v.clone() for k, v in source.state_dict().items()})
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        if "state_dict" in state:
            state = state["state_dict"]
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(1)
    target = MixTransformer("mit_b0")
    report = load_mit_weights(target, path)
    assert report.missing == []
    assert report.unused == expected_unused
    assert sorted(report.loaded) == sorted(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(source.eval()(x), target.eval()(x), strict=True))


def test_wrong_shape_is_reported_as_mismatched_and_left_missing(tmp_path):
    state = nvlabs_layout(MixTransformer("mit_b0").state_dict())
    state["block1.0.attn.q.weight"] = torch.zeros(16, 32)
    state["block4.1.mlp.fc1.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "b0.pth")
    report = load_mit_weights(MixTransformer("mit_b0"), tmp_path / "b0.pth")
    assert "block1.0.attn.q.weight (shape (16, 32) != (32, 32))" in report.unused
    assert "block4.1.mlp.fc1.bias (shape (7,) != (1024,))" in report.unused
    assert report.missing == ["block.0.0.attn.q.weight", "block.3.1.mlp.fc1.bias"]


def test_other_widths_are_mismatched_everywhere(tmp_path):
    torch.save(MixTransformer("mit_b0").state_dict(), tmp_path / "b0.pth")
    report = load_mit_weights(MixTransformer("mit_b1"), tmp_path / "b0.pth")
    assert any("shape" in u for u in report.unused)
    assert "patch_embed.0.proj.weight" in report.missing


def test_incomplete_hf_key_value_pair_is_unused(tmp_path):
    state = hf_layout(MixTransformer("mit_b0").state_dict())
    del state["segformer.encoder.block.0.0.attention.self.value.weight"]
    torch.save(state, tmp_path / "hf.pth")
    report = load_mit_weights(MixTransformer("mit_b0"), tmp_path / "hf.pth")
    key = "segformer.encoder.block.0.0.attention.self.key.weight"
    assert f"{key} (its key/value counterpart is absent)" in report.unused
    assert report.missing == ["block.0.0.attn.kv.weight"]


def test_build_model_loads_mit_weights(tmp_path):
    torch.save(mmseg_layout(MixTransformer("mit_b0").state_dict()), tmp_path / "mit_b0.pth")
    config = ModelConfig(backbone="mit_b0", context="mlp", num_classes=3, decoder_channels=16)
    model = build_model(config, pretrained=str(tmp_path / "mit_b0.pth"))
    assert model.load_report.missing == [] and model.load_report.unused == []


@pytest.mark.parametrize("name,widths", [("mit_b0", [32, 64, 160, 256]), ("mit_b3", [64, 128, 320, 512])])
def test_stage_strides_and_widths(name, widths):
    backbone = MixTransformer(name).eval()
    with torch.no_grad():
        features = backbone(torch.zeros(1, 3, 64, 96))
    assert backbone.channels == widths == [f.shape[1] for f in features]
    assert [96 // f.shape[-1] for f in features] == [4, 8, 16, 32]
