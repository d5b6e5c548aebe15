"""MEDOE and the single-decoder baseline, composed from a backbone and context modules.

Both models take float RGB images `[N, 3, H, W]` with values in 0..255 and normalise them
themselves, so the exported graph and every caller feed raw pixels.

MEDOE (SPEC §2-§4): a shared backbone, K experts (context module + 1x1 classifier) that all
predict the C classes, and a decision maker that soft-weights the experts' probabilities.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from medoe.backbones import build_backbone, load_backbone_weights
from medoe.config import ModelConfig
from medoe.heads import build_context
from medoe.ops import resize


class Segmentation(NamedTuple):
    labels: Tensor  # [N, H, W] int64 class index at input size
    confidence: Tensor  # [N, H, W] float, max of the final probabilities
    probs: Tensor  # [N, C, H, W] final probabilities at input size
    expert_weights: Tensor | None  # [N, K, h, w] MOE weights at decoder resolution; None for baselines


class ExpertOutputs(NamedTuple):
    probs: Tensor  # [N, K, C, h, w] every expert's softmax at expert 1's resolution
    features: Tensor  # [N, F, h', w'] the backbone's last map, which the decision maker may also read


class Mixture(NamedTuple):
    probs: Tensor  # [N, C, h, w] p_final = sum_k s_k q_k at the experts' resolution
    weights: Tensor  # [N, K, h, w] the decision maker's s_k


class Expert(nn.Module):
    def __init__(self, context: nn.Module, num_classes: int, dropout: float):
        super().__init__()
        self.context = context
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(context.out_channels, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.context(features)))


class DecisionMaker(nn.Module):
    """Stage 2: `kxk conv (K*C -> hidden) -> ReLU -> 1x1 conv (hidden -> outputs)`.

    outputs = K selection logits, plus K-1 blend logits with blend_within (MEDOE.mixture).

    k = 1 is the paper's per-pixel decision; k = 3 also sees the neighbours' expert outputs,
    so a pixel inside an object the tail expert is sure about can follow that object. With
    `feature_channels`, a 1x1 projection of the backbone's last map is added to the first
    layer's output: the decision then sees what the pixel looks like, not only what the
    experts say about it.
    """

    def __init__(
        self,
        num_experts: int,
        num_classes: int,
        hidden: int,
        kernel: int = 1,
        feature_channels: int = 0,
        outputs: int | None = None,
    ):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(num_experts * num_classes, hidden, kernel, padding=kernel // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, outputs or num_experts, 1),
        )
        # Only when on, so checkpoints without it keep their keys.
        self.project = nn.Conv2d(feature_channels, hidden, 1) if feature_channels else None

    def forward(self, expert_probs: Tensor, features: Tensor | None = None) -> Tensor:
        # [N, K, C, h, w] (+ [N, F, h', w']) -> [N, outputs, h, w]
        if self.project is None:  # through the Sequential, so exported node names stay as they were
            return self.net(expert_probs.flatten(1, 2))
        if features is None:
            raise ValueError("this decision maker reads the backbone features too: pass them")
        hidden = self.net[0](expert_probs.flatten(1, 2))
        hidden = hidden + resize(self.project(features), hidden.shape[-2:])
        return self.net[2](self.net[1](hidden))


class SegmentationModel(nn.Module):
    """What both models share: input checks, normalisation and the backbone."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.backbone = build_backbone(config.backbone, config.output_stride)
        if config.output_balance > 0:  # only then, so checkpoints without the adjustment load unchanged
            self.register_buffer("class_log_prior", torch.zeros(config.num_classes))

    def set_class_prior(self, pixel_counts) -> None:
        """The training pixel frequency the output adjustment divides out; an absent class counts
        as the rarest present one (a prior of zero would make it win wherever it has any mass)."""
        counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
        counts = counts.clamp_min(counts[counts > 0].min().item() if bool((counts > 0).any()) else 1.0)
        log_prior = (counts / counts.sum()).log().float()
        if "class_log_prior" in self._buffers:
            self.class_log_prior.copy_(log_prior)
        else:  # a stage-1 model that stage 2 gives the adjustment
            self.register_buffer("class_log_prior", log_prior.to(self.mean.device))

    def features(self, images: Tensor) -> list[Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be [N, 3, H, W] RGB, got shape {tuple(images.shape)}; "
                "convert HWC arrays with .permute(2, 0, 1) and add a batch dimension"
            )
        if not images.is_floating_point():
            raise ValueError(f"images must be float (0..255 values), got {images.dtype}; call .float() first")
        return self.backbone((images - self.mean) / self.std)

    def balanced(self, probs: Tensor) -> Tensor:
        """[N, C, h, w] probabilities -> p(c|x) / prior(c)^tau, renormalised (tau = output_balance).

        The argmax is then the decision of a class-balanced risk rather than of the training
        distribution's (post-hoc logit adjustment, Menon et al. 2021): the rarest class keeps
        its mass, the others shrink by their frequency ratio to it.
        """
        tau = self.config.output_balance
        if tau <= 0:
            return probs
        scale = torch.exp(-tau * (self.class_log_prior - self.class_log_prior.min()))
        probs = probs * scale.view(1, -1, 1, 1)
        return probs / probs.sum(dim=1, keepdim=True)

    def _finish(self, probs: Tensor, size, expert_weights: Tensor | None) -> Segmentation:
        probs = resize(self.balanced(probs), size)
        confidence, labels = probs.max(dim=1)
        return Segmentation(labels, confidence, probs, expert_weights)


class BaselineModel(SegmentationModel):
    """One context module + classifier: the `baseline`, `focal` and `reweight` models."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        in_channels = self.backbone.channels
        context = build_context(
            config.context, in_channels, config.decoder_channels, config.num_classes, config.output_stride
        )
        self.decoder = Expert(context, config.num_classes, config.dropout)

    def logits(self, images: Tensor) -> Tensor:
        return self.decoder(self.features(images))

    def forward(self, images: Tensor) -> Segmentation:
        # Resize logits, not probabilities: the usual single-model inference.
        logits = resize(self.logits(images), images.shape[-2:])
        return self._finish(torch.softmax(logits, dim=1), images.shape[-2:], None)


class MEDOE(SegmentationModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        if not config.is_medoe:
            raise ValueError(f"MEDOE needs config.model='medoe', got {config.model!r}; use build_model()")
        in_channels, c, k = self.backbone.channels, config.num_classes, config.num_experts
        experts = []
        for index in range(k):
            name = "light" if index > 0 and config.light_experts else config.context
            experts.append(
                Expert(
                    build_context(name, in_channels, config.decoder_channels, c, config.output_stride),
                    c,
                    config.dropout,
                )
            )
        self.experts = nn.ModuleList(experts)
        self.decision = self.new_decision_maker(config)
        # label -> 0-based index of the expert that owns it (y_se - 1); 255 = not owned.
        # Saved in the weights so the oracle and stage 2 work from a checkpoint alone.
        self.register_buffer("expert_lut", torch.full((256,), config.ignore_index, dtype=torch.long))
        self.stage = 1
        self.set_stage(1)

    def new_decision_maker(self, config: ModelConfig) -> DecisionMaker:
        """A fresh decision maker for this model's backbone, shaped by `config`'s stage-2 fields."""
        decision = DecisionMaker(
            config.num_experts,
            config.num_classes,
            config.decision_hidden,
            config.decision_kernel,
            self.backbone.channels[-1] if config.decision_features else 0,
            config.num_experts + (config.num_experts - 1 if config.blend_within else 0),
        )
        if config.mixing != "paper":  # start from the group prior alone
            nn.init.zeros_(decision.net[-1].weight)
            nn.init.zeros_(decision.net[-1].bias)
        return decision

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def set_groups(self, groups: list[list[int]]) -> None:
        if len(groups) != self.num_experts:
            raise ValueError(f"{len(groups)} class groups for {self.num_experts} experts")
        self.expert_lut.fill_(self.config.ignore_index)
        for index, group in enumerate(groups):
            self.expert_lut[torch.as_tensor(group, dtype=torch.long)] = index

    def groups(self) -> list[list[int]]:
        owner = self.expert_lut[: self.config.num_classes].tolist()
        return [[c for c, k in enumerate(owner) if k == index] for index in range(self.num_experts)]

    def expert_sets(self) -> Tensor:
        # S_k = classes owned by experts k..K: [K, C] bool
        owner = self.expert_lut[: self.config.num_classes]
        return torch.stack([owner >= k for k in range(self.num_experts)]) & (owner != self.config.ignore_index)

    def expert_logits(self, images: Tensor) -> list[Tensor]:
        """Stage 1: every expert's logits, all at expert 1's (decoder) resolution."""
        return self._expert_logits(self.features(images))

    def _expert_logits(self, features: list[Tensor]) -> list[Tensor]:
        # Experts 2..K read detached features: "the head expert updates the backbone".
        detached = [f.detach() for f in features] if self.config.stop_gradient else features
        logits = [self.experts[0](features)]
        size = logits[0].shape[-2:]
        logits += [resize(expert(detached), size) for expert in self.experts[1:]]
        return logits

    def expert_outputs(self, images: Tensor) -> ExpertOutputs:
        """What stage 2 decides from: the experts' probabilities and the backbone's last map."""
        features = self.features(images)
        probs = torch.stack([torch.softmax(z, dim=1) for z in self._expert_logits(features)], dim=1)
        return ExpertOutputs(probs, features[-1])

    def expert_probs(self, images: Tensor) -> Tensor:
        return self.expert_outputs(images).probs

    def group_masks(self) -> Tensor:
        # G_k = the classes expert k owns (S_k minus S_{k+1}): [K, C] bool
        owner = self.expert_lut[: self.config.num_classes]
        return torch.stack([owner == k for k in range(self.num_experts)])

    def group_prior_logits(self, expert_probs: Tensor) -> Tensor:
        """log P(group k | x) before the decision maker's correction: [N, K, h, w].

        refine: expert 1's own group mass p_1(G_k); expert 1 is the only expert trained on
        every class, so the group decision starts as its decision and the experts after it
        only refine the class inside the group. nested: the chain rule below.
        """
        if self.config.mixing == "refine":
            groups = self.group_masks().to(expert_probs.dtype)  # [K, C]
            mass = torch.einsum("nchw,kc->nkhw", expert_probs[:, 0], groups)
            return mass.clamp_min(torch.finfo(mass.dtype).tiny).log()
        return self.chain_rule_logits(expert_probs)

    def chain_rule_logits(self, expert_probs: Tensor) -> Tensor:
        """log P(group k | x) by the chain rule over the nested sets S_1 > S_2 > ... > S_K.

        Expert j is trained on the pixels of S_j, so p_j(S_{j+1}) / p_j(S_j) estimates
        P(y in S_{j+1} | y in S_j): each "rarer or not" decision is made by the expert that
        saw the most pixels of both sides. P(G_k) = prod_{j<k} r_j * (1 - r_k), r_K = 0.
        """
        k = self.num_experts
        sets = self.expert_sets().to(expert_probs.dtype).view(1, k, -1, 1, 1)  # [1, K, C, 1, 1]
        tiny = torch.finfo(expert_probs.dtype).tiny
        mass = (expert_probs * sets).sum(dim=2)  # p_k(S_k)
        rarer = (expert_probs[:, :-1] * sets[:, 1:]).sum(dim=2)  # p_k(S_{k+1}), k < K
        log_r = (rarer / mass[:, :-1].clamp_min(tiny)).clamp(1e-6, 1 - 1e-6).log()
        log_stay = torch.log1p(-log_r.exp())
        # log P(G_k) = sum_{j<k} log r_j + log(1 - r_k)
        before = torch.cat([torch.zeros_like(log_r[:, :1]), log_r.cumsum(dim=1)], dim=1)
        stay = torch.cat([log_stay, torch.zeros_like(log_stay[:, :1])], dim=1)
        return before + stay

    def expert_distributions(self, expert_probs: Tensor) -> Tensor:
        """What each expert contributes to the mixture: [N, K, C, h, w], each a distribution.

        paper: its softmax over all C. nested and refine: its softmax kept to its own group G_k
        and renormalised, so a pixel's weight on k means "the class is in G_k" and nothing else.
        """
        if self.config.mixing == "paper":
            return expert_probs
        groups = self.group_masks().to(expert_probs.dtype).view(1, self.num_experts, -1, 1, 1)
        kept = expert_probs * groups
        return kept / kept.sum(dim=2, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny)

    def blended_distributions(self, expert_probs: Tensor, blend_logits: Tensor) -> Tensor:
        """blend_within: group k's distribution is b_k q_1(.|G_k) + (1 - b_k) q_k(.|G_k), [N, K, C, h, w].

        b_k = sigmoid(blend_logits[:, k - 2]) per pixel for k >= 2 (group 1's is expert 1's own).
        Expert 1 sees every class and trains the backbone, so inside a group it can be the better
        classifier (docs/method.md §8 measures it); the decision maker then learns whose word to
        take there instead of always taking the specialist's. Zero logits start at the average.
        """
        specialists = self.expert_distributions(expert_probs)
        own = self.expert_distributions(expert_probs[:, :1].expand_as(expert_probs))  # expert 1 kept to each group
        trust = torch.sigmoid(blend_logits).unsqueeze(2)  # [N, K-1, 1, h, w]
        rest = trust * own[:, 1:] + (1 - trust) * specialists[:, 1:]
        return torch.cat([specialists[:, :1], rest], dim=1)

    def _decide(self, expert_probs: Tensor, features: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The selection logits [N, K, h, w] and, with blend_within, the blend logits [N, K-1, h, w]."""
        raw = self.decision(expert_probs, features)
        k = self.num_experts
        select, blend = (raw[:, :k], raw[:, k:]) if self.config.blend_within else (raw, None)
        if self.config.mixing == "paper":
            return select, blend
        # The decision maker learns a correction to the group prior (zero at initialisation).
        return self.group_prior_logits(expert_probs) + select, blend

    def selection_logits(self, expert_probs: Tensor, features: Tensor | None = None) -> Tensor:
        """[N, K, h, w]; `features` (ExpertOutputs.features) only matter with decision_features."""
        return self._decide(expert_probs, features)[0]

    def mixture(self, expert_probs: Tensor, features: Tensor | None = None) -> Mixture:
        """What forward() and an "output" stage 2 share: the decision maker's weights and p_final."""
        select, blend = self._decide(expert_probs, features)
        weights = torch.softmax(select, dim=1)
        kept = (
            self.blended_distributions(expert_probs, blend)
            if blend is not None
            else self.expert_distributions(expert_probs)
        )
        # p_final = sum_k s_k q_k; the weights sum to 1 so p_final is a distribution.
        probs = (weights.unsqueeze(2) * kept).sum(dim=1)
        return Mixture(probs, weights)

    def forward(self, images: Tensor) -> Segmentation:
        probs, weights = self.mixture(*self.expert_outputs(images))
        return self._finish(probs, images.shape[-2:], weights)

    def oracle(self, images: Tensor, labels: Tensor) -> Segmentation:
        """Evaluation only: each pixel takes the expert that owns its true class."""
        expert_probs = self.expert_distributions(self.expert_probs(images))
        n, k, c, h, w = expert_probs.shape
        full = resize(expert_probs.flatten(1, 2), labels.shape[-2:]).view(n, k, c, *labels.shape[-2:])
        owner = self.expert_lut[labels.long().clamp(0, 255)]
        owner = torch.where(owner == self.config.ignore_index, torch.zeros_like(owner), owner)
        one_hot = torch.nn.functional.one_hot(owner, k).permute(0, 3, 1, 2).to(full.dtype)
        probs = (one_hot.unsqueeze(2) * full).sum(dim=1)
        return self._finish(probs, labels.shape[-2:], one_hot)

    def set_stage(self, stage: int) -> None:
        """Stage 2 trains the decision maker only: backbone and experts frozen, BN in eval."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.stage = stage
        for module in (self.backbone, self.experts):
            module.requires_grad_(stage == 1)
        self.decision.requires_grad_(stage == 2)
        self.train(self.training)

    def train(self, mode: bool = True) -> MEDOE:
        super().train(mode)
        if self.stage == 2:
            self.backbone.eval()
            self.experts.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_model(config: ModelConfig, pretrained: str = "") -> SegmentationModel:
    """The network of `config`; `pretrained` is a local ImageNet state dict for its backbone,
    whose load report (unused, missing and mismatched keys) is kept as `model.load_report`."""
    model = MEDOE(config) if config.is_medoe else BaselineModel(config)
    model.load_report = load_backbone_weights(model.backbone, pretrained) if pretrained else None
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
