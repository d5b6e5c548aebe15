"""The network's config and the training run's, saved together inside every checkpoint.

`ModelConfig` holds only what rebuilds the network and names its classes (as nanoGPT's
`GPTConfig` does): export and serving see nothing else. `TrainConfig` is one training run: its
`network` plus data, losses and schedule. Both are written flat into a checkpoint's (and a
config file's) `config.json`, one JSON object of field -> value; any program rebuilds the model
from that file alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from medoe.io import atomic_write_text

MODEL_TYPES = ("medoe", "baseline", "focal", "reweight")
MIXINGS = ("paper", "nested", "refine")
STAGE2_LOSSES = ("selection", "output")
KL_SUPPORTS = ("set", "present")
BACKBONES = (
    "tiny",
    "resnet18c",
    "resnet50c",
    "resnet101c",
    *(f"mit_b{i}" for i in range(6)),
    "hrnet_w18_small",
    "hrnet_w18",
    "hrnet_w48",
)  # mit_*: medoe.mit, hrnet_*: medoe.hrnet
CONTEXTS = ("aspp", "ppm", "ocr", "mlp", "light")  # mlp: SegFormer's all-MLP decoder (for the mit_* backbones)
OPTIMIZERS = ("sgd", "adamw")
DATASETS = (
    "synthetic",
    "aerial",
    "cityscapes",
    "ade20k",
    "folder",
)  # medoe.data.DATASETS, without importing the loaders
GENERATED = ("synthetic", "aerial")  # drawn on the fly from (seed, split, index): same-size images, no root
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the named configs of `--config NAME`


class _Checked:
    """Every field's type checked from its annotation, then its range from RULES, on creation:
    a bad config is refused when it is read, not with a TypeError once training has begun."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            if f.name in NESTED:
                continue
            value, hint = getattr(self, f.name), hints[f.name]
            rule, expected = RULES.get(f.name, (None, _describe(hint)))
            _check(_matches(value, hint), f"{f.name}={value!r}, expected {expected}")
            _check(rule is None or rule(value), f"{f.name}={value!r}, expected {expected}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass
class ModelConfig(_Checked):
    """What rebuilds the network: its shape, its classes and its input normalisation."""

    model: str = "medoe"  # medoe | baseline | focal | reweight (the last three: one decoder, differing in their loss)
    # tiny | resnet18c | resnet50c | resnet101c | mit_b0..mit_b5 (Mix Transformer) | hrnet_w18_small | hrnet_w18 |
    # hrnet_w48 (HRNetV2: OCRNet's backbone)
    backbone: str = "resnet50c"
    output_stride: int = 8  # 8 or 16: later ResNet stages are dilated instead of strided (mit_*: always 32; hrnet_*: 4)
    context: str = "aspp"  # context module of expert 1 (and of the baselines): aspp | ppm | ocr | mlp | light
    light_experts: bool = True  # experts 2..K use the light context module (paper: "a small number of convolutions")
    decoder_channels: int = 256  # width of every context module
    num_experts: int = 3  # K >= 2; expert k is trained on the classes of groups k..K
    stop_gradient: bool = True  # experts 2..K see detached features: only expert 1 trains the backbone
    decision_hidden: int = 64  # hidden width of the stage-2 decision maker (conv -> ReLU -> 1x1 conv)
    decision_kernel: int = (
        1  # its first conv's size: 1 = one pixel's K*C probabilities (paper), 3 = a 3x3 neighbourhood
    )
    decision_features: bool = False  # the decision maker also reads the backbone's last map (1x1-projected)
    # paper: p = sum_k s_k p_k | nested: s_k = chain-rule group prior + learned correction, p_k kept to
    # group k | refine: the same with expert 1's group mass as the prior (docs/method.md §8)
    mixing: str = "paper"
    # nested/refine: inside each group k >= 2 the decision maker also blends expert 1's own distribution
    # (kept to G_k) with expert k's, per pixel, so a specialist that is worse there than expert 1 costs nothing
    blend_within: bool = False
    # tau of the post-hoc logit adjustment of the final probabilities, p(c) / prior(c)^tau with the
    # training pixel frequency as prior (Menon et al. 2021): 0 = off (paper), 1 = balanced decision
    output_balance: float = 0.0
    dropout: float = 0.1  # dropout before each 1x1 classifier
    num_classes: int = 19  # C; every expert predicts all C classes so outputs can be ensembled
    class_names: list[str] = field(default_factory=list)  # C names, index order
    palette: list[list[int]] = field(default_factory=list)  # C RGB colours, index order
    ignore_index: int = 255  # label value that is no class: losses, metrics and the expert lookup skip it
    group_thresholds: list[float] = field(default_factory=lambda: [0.80, 0.95])  # K-1 cumulative pixel shares
    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])  # RGB mean on 0..255 input
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])  # RGB std on 0..255 input

    def validate(self) -> None:
        super().validate()
        k = self.num_experts
        _check(
            len(self.group_thresholds) == k - 1 or self.model != "medoe",
            f"group_thresholds={self.group_thresholds}, expected K-1 = {k - 1} values for num_experts={k}",
        )
        for name in ("class_names", "palette"):
            values = getattr(self, name)
            _check(
                not values or len(values) == self.num_classes,
                f"{name} has {len(values)} entries, expected num_classes={self.num_classes} (or none)",
            )
        _check(
            self.ignore_index >= self.num_classes,
            f"ignore_index={self.ignore_index}, expected a value >= num_classes={self.num_classes} (255): it is a "
            "class id",
        )
        _check(
            not self.blend_within or self.mixing != "paper",
            "blend_within=True needs mixing='nested' or 'refine' (the paper's mixing has no groups to blend inside)",
        )

    @property
    def is_medoe(self) -> bool:
        return self.model == "medoe"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


@dataclass
class TrainConfig(_Checked):
    """One training run: the network it trains and how (data, losses, schedule)."""

    network: ModelConfig = field(default_factory=ModelConfig)
    pretrained: str = ""  # local ImageNet state dict for the backbone (torchvision/timm/mmseg layout); "" = random init
    # --- losses --------------------------------------------------------------------------
    alpha: float = 0.2  # weight of the auxiliary (L2 + KL) term in every expert's stage-1 loss
    # classes the KL term compares the batch's mean prediction and label histogram over: "set" =
    # all of S_k, a class with no pixel in the batch at q = eps (SPEC §3); "present" = those of
    # S_k with pixels in the batch (a class missing from 8 crops is a sampling zero, not q = 0)
    kl_support: str = "set"
    # expert 1's auxiliary term: over all C classes its L2 is zero, so it is the KL term alone;
    # off, expert 1's loss is its CE alone (the baselines' loss) and alpha acts on experts 2..K
    expert1_aux: bool = True
    expert_balance: float = (
        0.0  # tau of each expert's logit adjustment by its class prior over S_k (0 = plain CE, paper)
    )
    expert_reweight: bool = False  # each expert's CE weighted by 1/sqrt(class frequency) inside its S_k (as reweight)
    stage2_holdout: float = 0.0  # share of training images stage 1 never sees; stage 2 learns on them only (0 = paper)
    select_balance: bool = False  # stage 2: inverse-frequency weights on the K selection targets
    select_balance_power: float = 1.0  # those weights are share_k ** -power (1 = inverse frequency, 0.5 = inverse sqrt)
    # stage 2's loss: "selection" = CE on the expert that owns the label (paper); "output" = the
    # mixture's NLL at the label, class-weighted as stage 1 was (1/sqrt f with expert_reweight);
    # select_balance weights the selection targets and so applies to "selection" only
    stage2_loss: str = "selection"
    focal_gamma: float = 2.0  # focal baseline's gamma
    # --- data ----------------------------------------------------------------------------
    dataset: str = (
        "synthetic"  # synthetic (street scenes) | aerial (synthetic top-down suburbs) | cityscapes | ade20k | folder
    )
    data_root: str = ""  # dataset root (unused for synthetic)
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])  # training crop, H W
    synthetic_size: list[int] = field(
        default_factory=lambda: [256, 512]
    )  # generated (synthetic, aerial) image size, H W
    synthetic_train_images: int = 2000  # synthetic images per epoch (generated on the fly)
    synthetic_val_images: int = 100  # held-out synthetic images
    # --- schedule ------------------------------------------------------------------------
    optimizer: str = "sgd"  # sgd (CNN recipe) | adamw (transformer recipe)
    lr: float = 0.01  # initial learning rate, poly-decayed
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD: 5e-4; AdamW: 0.01
    poly_power: float = 0.9  # lr = lr0 * (1 - it / iters) ** poly_power
    head_lr_mult: float = 1.0  # stage 1: lr of everything but the backbone = lr * this (SegFormer recipe: 10)
    warmup_iters: int = 0  # stage 1: lr ramps linearly from lr * 1e-6 over these iterations (SegFormer: 1500)
    batch_size: int = 8  # images per step (per process under torchrun)
    iters: int = 80000  # stage-1 iterations (baselines: the whole budget)
    stage2_iters: int = 0  # stage-2 iterations; 0 = iters // 10
    stage2_lr: float = 0.01  # stage-2 learning rate (decision maker only)
    num_workers: int = 2  # DataLoader workers
    seed: int = 0  # seeds data order, augmentation and initialisation
    amp: bool = True  # automatic mixed precision, used on CUDA only

    def validate(self) -> None:
        _check(isinstance(self.network, ModelConfig), f"network={self.network!r}, expected a ModelConfig")
        super().validate()

    def replace(self, **changes) -> TrainConfig:
        """Flat field names, as in config.json: network fields go to `network`."""
        network = {k: changes.pop(k) for k in list(changes) if k in MODEL_FIELDS}
        if network:
            changes["network"] = self.network.replace(**network)
        return dataclasses.replace(self, **changes)

    @property
    def stage2_steps(self) -> int:
        return self.stage2_iters or max(1, self.iters // 10)

    def to_dict(self) -> dict:
        """Flat: the network's fields first, then the run's."""
        values = dataclasses.asdict(self)
        return {**values.pop("network"), **values}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = set(MODEL_FIELDS) | {f.name for f in dataclasses.fields(cls)} - {"network"}
        for name in sorted(set(values) - known, key=str):
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"invalid config: unknown field {name!r}{hint}")
        network = ModelConfig(**{k: v for k, v in values.items() if k in MODEL_FIELDS})
        return cls(network=network, **{k: v for k, v in values.items() if k not in MODEL_FIELDS})

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        return cls.from_dict(values)


def load_config(name_or_path: str) -> TrainConfig:
    """A config file holds only the fields that differ from the defaults above."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"config {name_or_path!r} not found; known configs: {', '.join(known)}")
    try:
        return TrainConfig.load(path)  # checks every field's type and range, before any dataset is built
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"invalid config: {message}")


NESTED = ("network",)


# --- checks ----------------------------------------------------------------------------
# The type of every field comes from its annotation; RULES add the range, as
# (predicate on a value of the right type, what is expected: the whole description, type included).
def _size(n: int, low: float, what: str):
    return (lambda v: len(v) == n and all(x >= low for x in v)), what


RULES: dict[str, tuple[typing.Callable[[typing.Any], bool], str]] = {
    "model": ((lambda v: v in MODEL_TYPES), f"one of {MODEL_TYPES}"),
    "backbone": ((lambda v: v in BACKBONES), f"one of {BACKBONES}"),
    "context": ((lambda v: v in CONTEXTS), f"one of {CONTEXTS}"),
    "optimizer": ((lambda v: v in OPTIMIZERS), f"one of {OPTIMIZERS}"),
    "dataset": ((lambda v: v in DATASETS), f"one of {DATASETS}"),
    "output_stride": ((lambda v: v in (8, 16)), "8 or 16"),
    "decoder_channels": ((lambda v: v >= 1), "an integer >= 1"),
    "num_experts": ((lambda v: v >= 2), "an integer >= 2 (MEDOE needs K >= 2)"),
    "decision_hidden": ((lambda v: v >= 1), "an integer >= 1"),
    "decision_kernel": ((lambda v: v in (1, 3)), "1 or 3"),
    "mixing": ((lambda v: v in MIXINGS), f"one of {MIXINGS}"),
    "stage2_loss": ((lambda v: v in STAGE2_LOSSES), f"one of {STAGE2_LOSSES}"),
    "kl_support": ((lambda v: v in KL_SUPPORTS), f"one of {KL_SUPPORTS}"),
    "dropout": ((lambda v: 0 <= v < 1), "a number in [0, 1)"),
    # Labels are uint8 maps with 255 = ignore, so at most 255 classes.
    "num_classes": ((lambda v: 2 <= v <= 255), "an integer in 2..255"),
    "palette": (
        (lambda v: all(len(c) == 3 and all(0 <= x <= 255 for x in c) for c in v)),
        "a list of [R, G, B] triples of integers in 0..255",
    ),
    "ignore_index": ((lambda v: 0 <= v <= 255), "an integer in 0..255"),
    "group_thresholds": (
        (lambda v: all(0 < t < 1 for t in v) and all(a < b for a, b in itertools.pairwise(v))),
        "a list of numbers increasing strictly inside (0, 1)",
    ),
    "mean": _size(3, -math.inf, "a list of 3 finite numbers (RGB)"),
    "std": ((lambda v: len(v) == 3 and all(x > 0 for x in v)), "a list of 3 finite numbers > 0 (RGB)"),
    "alpha": ((lambda v: 0 <= v <= 1), "a number in [0, 1]"),
    "expert_balance": ((lambda v: 0 <= v <= 2), "a number in [0, 2]"),
    "output_balance": ((lambda v: 0 <= v <= 2), "a number in [0, 2]"),
    "stage2_holdout": ((lambda v: 0 <= v <= 0.5), "a number in [0, 0.5]"),
    "select_balance_power": ((lambda v: v >= 0), "a finite number >= 0"),
    "focal_gamma": ((lambda v: v >= 0), "a finite number >= 0"),
    "crop_size": _size(2, 1, "a list of 2 integers >= 1"),
    "synthetic_size": _size(2, 1, "a list of 2 integers >= 1"),
    "synthetic_train_images": ((lambda v: v >= 1), "an integer >= 1"),
    "synthetic_val_images": ((lambda v: v >= 1), "an integer >= 1"),
    "lr": ((lambda v: v > 0), "a finite number > 0"),
    "momentum": ((lambda v: 0 <= v < 1), "a number in [0, 1)"),
    "weight_decay": ((lambda v: v >= 0), "a finite number >= 0"),
    "poly_power": ((lambda v: v >= 0), "a finite number >= 0"),
    "head_lr_mult": ((lambda v: v > 0), "a finite number > 0"),
    "warmup_iters": ((lambda v: v >= 0), "an integer >= 0"),
    "batch_size": ((lambda v: v >= 1), "an integer >= 1"),
    "iters": ((lambda v: v >= 1), "an integer >= 1"),
    "stage2_iters": ((lambda v: v >= 0), "an integer >= 0 (0 = iters // 10)"),
    "stage2_lr": ((lambda v: v > 0), "a finite number > 0"),
    "num_workers": ((lambda v: v >= 0), "an integer >= 0"),
    "seed": ((lambda v: 0 <= v < 2**32), "an integer in 0..2**32-1"),  # numpy refuses negative seeds
}


@functools.cache
def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)  # the annotations are strings (`from __future__ import annotations`)


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # bool is an int subclass, but `true` is no iteration count
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is fine where a float is expected; NaN and inf are not
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
        return all(_matches(v, args[0]) for v in value) if args else True
    return isinstance(value, origin or hint)


def _describe(hint, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return f"one of {args}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    if origin in (list, tuple):
        return ("lists of " if plural else "a list of ") + (_describe(args[0], True) if args else "values")
    names = {
        bool: ("true or false", "booleans"),
        int: ("an integer", "integers"),
        float: ("a finite number", "finite numbers"),
        str: ("a string", "strings"),
        type(None): ("null", "nulls"),
    }
    single, many = names.get(
        hint, (f"a {getattr(hint, '__name__', hint)}", f"{getattr(hint, '__name__', hint)} values")
    )
    return many if plural else single
