"""One flat config for model, data and training, saved inside every checkpoint.

Any program rebuilds the model from a checkpoint's `config.json` alone (as nanoGPT does),
so everything the network's shape depends on lives here, with the training recipe beside it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MODEL_TYPES = ("medoe", "baseline", "focal", "reweight")
BACKBONES = ("tiny", "resnet18c", "resnet50c", "resnet101c")
CONTEXTS = ("aspp", "ppm", "ocr", "light")


@dataclass
class MEDOEConfig:
    # --- model -------------------------------------------------------------------------
    model: str = "medoe"  # medoe | baseline | focal | reweight (the last three: one decoder)
    backbone: str = "resnet50c"  # tiny | resnet18c | resnet50c | resnet101c
    output_stride: int = 8  # 8 or 16: later ResNet stages are dilated instead of strided
    context: str = "aspp"  # context module of expert 1 (and of the baselines): aspp | ppm | ocr | light
    light_experts: bool = True  # experts 2..K use the light context module (paper: "a small number of convolutions")
    decoder_channels: int = 256  # width of every context module
    num_experts: int = 3  # K >= 2; expert k is trained on the classes of groups k..K
    stop_gradient: bool = True  # experts 2..K see detached features: only expert 1 trains the backbone
    decision_hidden: int = 64  # hidden width of the stage-2 decision maker (1x1 conv -> ReLU -> 1x1 conv)
    dropout: float = 0.1  # dropout before each 1x1 classifier
    pretrained: str = ""  # local ImageNet state dict (torchvision/timm/mmseg layout); "" = random init
    # --- classes -------------------------------------------------------------------------
    num_classes: int = 19  # C; every expert predicts all C classes so outputs can be ensembled
    class_names: list[str] = field(default_factory=list)  # C names, index order
    palette: list[list[int]] = field(default_factory=list)  # C RGB colours, index order
    ignore_index: int = 255  # label value that losses and metrics skip
    group_thresholds: list[float] = field(default_factory=lambda: [0.80, 0.95])  # K-1 cumulative pixel shares
    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])  # RGB mean on 0..255 input
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])  # RGB std on 0..255 input
    # --- losses --------------------------------------------------------------------------
    alpha: float = 0.2  # weight of the auxiliary (L2 + KL) term in every expert's stage-1 loss
    select_balance: bool = False  # stage 2: inverse-frequency weights on the K selection targets
    select_balance_power: float = 1.0  # those weights are share_k ** -power (1 = inverse frequency, 0.5 = inverse sqrt)
    focal_gamma: float = 2.0  # focal baseline's gamma
    # --- data ----------------------------------------------------------------------------
    dataset: str = "synthetic"  # synthetic | cityscapes | ade20k | folder
    data_root: str = ""  # dataset root (unused for synthetic)
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])  # training crop, H W
    synthetic_size: list[int] = field(default_factory=lambda: [256, 512])  # synthetic image size, H W
    synthetic_train_images: int = 2000  # synthetic images per epoch (generated on the fly)
    synthetic_val_images: int = 100  # held-out synthetic images
    # --- training ------------------------------------------------------------------------
    optimizer: str = "sgd"  # sgd (CNN recipe) | adamw (transformer recipe)
    lr: float = 0.01  # initial learning rate, poly-decayed
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD: 5e-4; AdamW: 0.01
    poly_power: float = 0.9  # lr = lr0 * (1 - it / iters) ** poly_power
    batch_size: int = 8  # images per step (per process under torchrun)
    iters: int = 80000  # stage-1 iterations (baselines: the whole budget)
    stage2_iters: int = 0  # stage-2 iterations; 0 = iters // 10
    stage2_lr: float = 0.01  # stage-2 learning rate (decision maker only)
    num_workers: int = 2  # DataLoader workers
    seed: int = 0  # seeds data order, augmentation and initialisation
    amp: bool = True  # automatic mixed precision, used on CUDA only

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"invalid config: {message}")

        check(self.model in MODEL_TYPES, f"model={self.model!r}, expected one of {MODEL_TYPES}")
        check(self.backbone in BACKBONES, f"backbone={self.backbone!r}, expected one of {BACKBONES}")
        check(self.context in CONTEXTS, f"context={self.context!r}, expected one of {CONTEXTS}")
        check(self.output_stride in (8, 16), f"output_stride={self.output_stride}, expected 8 or 16")
        check(self.num_experts >= 2, f"num_experts={self.num_experts}, MEDOE needs K >= 2")
        check(self.num_classes >= 2, f"num_classes={self.num_classes}, need at least 2")
        check(
            len(self.group_thresholds) == self.num_experts - 1
            or self.model != "medoe",
            f"group_thresholds has {len(self.group_thresholds)} values, K={self.num_experts} needs K-1",
        )
        check(
            all(0 < t < 1 for t in self.group_thresholds)
            and all(a < b for a, b in itertools.pairwise(self.group_thresholds)),
            f"group_thresholds={self.group_thresholds} must increase strictly inside (0, 1)",
        )
        for name in ("class_names", "palette"):
            values = getattr(self, name)
            check(
                not values or len(values) == self.num_classes,
                f"{name} has {len(values)} entries, num_classes={self.num_classes}",
            )
        check(len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values (RGB)")

    @property
    def is_medoe(self) -> bool:
        return self.model == "medoe"

    def replace(self, **changes) -> MEDOEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MEDOEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"invalid config: unknown field(s) {unknown}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MEDOEConfig:
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        return cls.from_dict(values)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    # Write beside the target and rename: a reader never sees a half-written file.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
