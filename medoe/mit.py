"""Mix Transformer (MiT, SegFormer's encoder) backbones mit_b0..mit_b5, and their weights from a local file.

Four stages, each an overlapping patch embedding (a strided conv: 7x7/4, then 3x3/2), a stack of
transformer blocks (efficient self-attention whose keys and values come from a map shrunk by the
stage's spatial-reduction ratio, then a Mix-FFN with a 3x3 depthwise conv in place of position
embeddings) and a LayerNorm. Returns the four stage maps at strides 4, 8, 16 and 32, as `ResNetC`
returns its stages; MiT has no dilated variant, so `output_stride` does not apply to it.

Every shape in `forward` is read from the tensors (`x.shape`, `-1`), so a traced graph keeps N, H
and W dynamic. The module names follow NVlabs' original (`patch_embed`, `block`, `attn.q`,
`attn.kv`, `mlp.fc1`, ...) with the stages as list indices; `load_mit_weights` also reads the
mmsegmentation and Hugging Face layouts.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medoe.backbones import LoadReport, copy_matching, read_state_dict

HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
# name -> (stage widths, blocks per stage)
MIT_ARCHS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
EPS = 1e-6  # LayerNorm eps of NVlabs' blocks and of mmsegmentation


def to_tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)  # [N, C, H, W] -> [N, HW, C]


def to_map(tokens: Tensor, hw: tuple) -> Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, hw[0], hw[1])  # [N, HW, C] -> [N, C, H, W]


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride, kernel // 2)
        self.norm = nn.LayerNorm(cout, eps=EPS)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple]:
        x = self.proj(x)
        return self.norm(to_tokens(x)), x.shape[-2:]


class EfficientAttention(nn.Module):
    """Multi-head attention whose keys/values come from the map shrunk `sr_ratio` times per side."""

    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)  # keys then values, as NVlabs stores them
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=EPS)

    def forward(self, x: Tensor, hw: tuple) -> Tensor:
        n, _, dim = x.shape
        q = self.q(x).reshape(n, -1, self.heads, dim // self.heads).transpose(1, 2)  # [N, h, L, d]
        if self.sr_ratio > 1:
            x = self.norm(to_tokens(self.sr(to_map(x, hw))))
        k, v = self.kv(x).reshape(n, -1, 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # exports to MatMul/Softmax/MatMul at opset 17
        return self.proj(out.transpose(1, 2).reshape(n, -1, dim))


class MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)  # the only position information
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, hw: tuple) -> Tensor:
        return self.fc2(self.act(to_tokens(self.dwconv(to_map(self.fc1(x), hw)))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = EfficientAttention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = MixFFN(dim, dim * MLP_RATIO)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, hw: tuple) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))


class MixTransformer(nn.Module):
    """Returns the four stage outputs [N, C_i, H/s, W/s] at strides s = 4, 8, 16, 32."""

    def __init__(self, name: str = "mit_b0", drop_path_rate: float = 0.1):
        super().__init__()
        if name not in MIT_ARCHS:
            raise ValueError(f"unknown backbone {name!r}, expected one of {sorted(MIT_ARCHS)}")
        widths, depths = MIT_ARCHS[name]
        self.name = name
        self.output_stride = 32
        self.channels: list[int] = list(widths)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth grows with depth
        self.patch_embed, self.block, self.norm = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        cin, first = 3, 0
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            self.patch_embed.append(PatchEmbed(cin, width, 7 if i == 0 else 3, 4 if i == 0 else 2))
            self.block.append(
                nn.ModuleList(Block(width, HEADS[i], SR_RATIOS[i], rates[first + j]) for j in range(depth))
            )
            self.norm.append(nn.LayerNorm(width, eps=EPS))
            cin, first = width, first + depth
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for embed, blocks, norm in zip(self.patch_embed, self.block, self.norm, strict=True):
            x, hw = embed(x)
            for block in blocks:
                x = block(x, hw)
            x = to_map(norm(x), hw)
            features.append(x)
        return features


# --- weights ---------------------------------------------------------------------------------
# Inside one block: the source's sub-key prefix -> ours. NVlabs' names are ours but for the
# dwconv's nesting; `attention.self.key/value` (HF) and `attn.attn.in_proj_*` (mmseg) are split or
# merged into our `attn.q` / `attn.kv` by the loader.
_BLOCK_RENAMES = {
    "mlp.dwconv.dwconv.": "mlp.dwconv.",  # NVlabs and HF
    "layer_norm_1.": "norm1.",  # HF
    "layer_norm_2.": "norm2.",
    "attention.self.query.": "attn.q.",
    "attention.self.sr.": "attn.sr.",
    "attention.self.layer_norm.": "attn.norm.",
    "attention.output.dense.": "attn.proj.",
    "mlp.dense1.": "mlp.fc1.",
    "mlp.dense2.": "mlp.fc2.",
    "attn.attn.out_proj.": "attn.proj.",  # mmseg
    "ffn.layers.0.": "mlp.fc1.",  # 1x1 convs there, linear layers here
    "ffn.layers.1.": "mlp.dwconv.",
    "ffn.layers.4.": "mlp.fc2.",
}
_STAGE_KEYS = [  # (pattern, our key template, stage index offset); {i} stage, {j} block, {rest}
    (r"patch_embed(\d)\.(?P<rest>proj\..+|norm\..+)", "patch_embed.{i}.{rest}", 1),  # NVlabs
    (r"norm(\d)\.(?P<rest>[^.]+)", "norm.{i}.{rest}", 1),
    (r"block(\d)\.(\d+)\.(?P<rest>.+)", "block.{i}.{j}.{rest}", 1),
    (r"patch_embeddings\.(\d)\.(?P<rest>.+)", "patch_embed.{i}.{rest}", 0),  # HF
    (r"layer_norm\.(\d)\.(?P<rest>[^.]+)", "norm.{i}.{rest}", 0),
    (r"block\.(\d)\.(\d+)\.(?P<rest>.+)", "block.{i}.{j}.{rest}", 0),
    (r"layers\.(\d)\.0\.(?P<rest>.+)", "patch_embed.{i}.{rest}", 0),  # mmseg
    (r"layers\.(\d)\.1\.(\d+)\.(?P<rest>.+)", "block.{i}.{j}.{rest}", 0),
    (r"layers\.(\d)\.2\.(?P<rest>[^.]+)", "norm.{i}.{rest}", 0),
]


def _our_key(key: str) -> tuple[str, str] | None:
    """A source key -> (our key, how to convert: '' | 'squeeze' | 'qkv' | 'k' | 'v'); None if no place."""
    key = key.removeprefix("segformer.").removeprefix("encoder.")
    found = next(((m, t, o) for p, t, o in _STAGE_KEYS if (m := re.fullmatch(p, key))), None)
    if found is None:
        return None
    match, template, offset = found
    groups = match.groups()
    i, j, rest = int(groups[0]) - offset, groups[1] if len(groups) > 2 else "", match["rest"]
    if template.startswith("patch_embed"):  # HF layer_norm, mmseg projection
        rest = rest.replace("layer_norm.", "norm.", 1).replace("projection.", "proj.", 1)
    how = ""
    for prefix, ours in _BLOCK_RENAMES.items():
        if rest.startswith(prefix):
            how = "squeeze" if prefix in ("ffn.layers.0.", "ffn.layers.4.") else ""
            rest = ours + rest[len(prefix) :]
            break
    for prefix, ours, kind in (
        ("attention.self.key.", "attn.kv.", "k"),
        ("attention.self.value.", "attn.kv.", "v"),
        ("attn.attn.in_proj_", "attn.qkv.", "qkv"),
    ):
        if rest.startswith(prefix):
            rest, how = ours + rest[len(prefix) :], kind
    return template.format(i=i, j=j, rest=rest), how


def load_mit_weights(backbone: MixTransformer, path: str | Path) -> LoadReport:
    """Copy an NVlabs-, mmsegmentation- or Hugging Face-layout MiT state dict into `backbone`.

    Classifier and decode-head keys (`head.*`, `classifier.*`, `decode_head.*`) are unused; a key
    whose shape differs from ours is unused with both shapes, and ours stays missing.
    """
    ours = backbone.state_dict()
    source = read_state_dict(path)
    converted: dict[str, tuple[Tensor, list[str]]] = {}
    halves: dict[str, dict[str, tuple[Tensor, str]]] = {}  # HF key/value waiting for each other
    unused: list[str] = []
    for key, value in source.items():
        mapped = (key, "") if key in ours else _our_key(key)
        if mapped is None:
            unused.append(f"{key} (no such key)")
            continue
        target, how = mapped
        if how == "squeeze" and value.ndim == 4 and value.shape[-2:] == (1, 1):
            value = value.flatten(1)
        if how in ("k", "v"):
            halves.setdefault(target, {})[how] = (value, key)
        elif how == "qkv":  # in_proj_weight / in_proj_bias: q, k, v stacked on dim 0
            if value.shape[0] % 3:
                unused.append(f"{key} (shape {tuple(value.shape)}: not q, k and v stacked)")
                continue
            c = value.shape[0] // 3
            converted[target.replace(".qkv.", ".q.")] = (value[:c], [key])
            converted[target.replace(".qkv.", ".kv.")] = (value[c:], [key])
        else:
            converted[target] = (value, [key])
    for target, parts in halves.items():
        if set(parts) == {"k", "v"}:
            converted[target] = (torch.cat([parts["k"][0], parts["v"][0]]), [parts["k"][1], parts["v"][1]])
        else:
            unused += [f"{key} (its key/value counterpart is absent)" for _, key in parts.values()]
    return copy_matching(ours, [(target, value, keys) for target, (value, keys) in converted.items()], unused)
