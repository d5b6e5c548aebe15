"""MEDOE stage-1 expert losses, the stage-2 losses (expert selection, mixture likelihood), the baselines' losses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_inputs(logits: Tensor, target: Tensor, num_channels: int | None = None, what: str = "logits") -> None:
    if logits.dim() != 4 or target.dim() != 3:
        raise ValueError(
            f"expected {what} [N,C,H,W] and target [N,H,W], got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"{what} {tuple(logits.shape)} and target {tuple(target.shape)} differ in N,H,W; "
            f"the caller must resize {what} to the label size before the loss"
        )
    if num_channels is not None and logits.shape[1] != num_channels:
        raise ValueError(f"{what} have {logits.shape[1]} channels but {num_channels} were expected")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")


def _valid_mask(target: Tensor, num_classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Return (valid pixels, target with ignored pixels replaced by 0 so it can index safely)."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    if valid.any():
        # Ignored pixels hold 0 in `safe`, so its extremes are the valid labels' (no boolean indexing: it is slow).
        lo, hi = int(safe.min()), int(safe.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"target value {bad} is outside [0, {num_classes}) and is not ignore_index={ignore_index}; fix the "
                "label map"
            )
    return valid, safe


def _check_set(in_set: Tensor, num_classes: int) -> Tensor:
    if in_set.dtype != torch.bool or in_set.shape != (num_classes,):
        raise ValueError(
            f"in_set must be a bool tensor of shape ({num_classes},), got {in_set.dtype} {tuple(in_set.shape)}"
        )
    return in_set


def _check_class_weights(class_weights: Tensor, num_classes: int, what: str) -> None:
    if class_weights.shape != (num_classes,):
        raise ValueError(
            f"class_weights must have shape ({num_classes},) to match the {what}, got {tuple(class_weights.shape)}"
        )


def _zero(logits: Tensor) -> Tensor:
    # Still connected to the graph so backward() and DDP's unused-parameter checks behave.
    return logits.sum() * 0


def _in_set_mask(logits: Tensor, target: Tensor, in_set: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    _check_inputs(logits, target)
    num_classes = logits.shape[1]
    in_set = _check_set(in_set, num_classes).to(logits.device)
    valid, safe = _valid_mask(target, num_classes, ignore_index)
    return valid & in_set[safe], valid, safe


def masked_ce(
    logits: Tensor, target: Tensor, in_set: Tensor, ignore_index: int = 255, class_weights: Tensor | None = None
) -> Tensor:
    mask, _, safe = _in_set_mask(logits, target, in_set, ignore_index)
    count = int(mask.sum())
    if count == 0:
        return _zero(logits)
    # Softmax is over all C classes; only the supervised pixels are restricted to S_k.
    per_pixel = F.cross_entropy(logits, safe, reduction="none")
    if class_weights is None:
        return (per_pixel * mask).sum() / count
    # PyTorch's weighted mean over the supervised pixels, as weighted_ce.
    weight = class_weights.to(device=logits.device, dtype=logits.dtype)[safe] * mask
    return (per_pixel * weight).sum() / weight.sum().clamp_min(torch.finfo(weight.dtype).tiny)


def l2_suppression(logits: Tensor, target: Tensor, in_set: Tensor, ignore_index: int = 255) -> Tensor:
    _, valid, _ = _in_set_mask(logits, target, in_set, ignore_index)
    interfering = ~in_set.to(logits.device)
    count = int(valid.sum())
    if count == 0 or not interfering.any():
        return _zero(logits)
    squares = (logits.index_select(1, interfering.nonzero().flatten()) ** 2).sum(dim=1)
    return (squares * valid).sum() / count


def kl_to_label_histogram(
    logits: Tensor,
    target: Tensor,
    in_set: Tensor,
    ignore_index: int = 255,
    eps: float = 1e-6,
    class_weights: Tensor | None = None,
    present_only: bool = False,
) -> Tensor:
    """KL(p || q) of the expert's mean prediction over its pixels against their label histogram.

    With `class_weights` (a re-weighted CE) q is the weighted histogram: the distribution the
    weighted CE fits. Against the raw histogram the KL term would pull the mean prediction back
    to the imbalance the weights remove.

    A class of S_k with no pixel in the batch has q ~ eps / count, and the term's gradient in
    its mean probability, log(p / q) + 1, is ~21 at p = 0.005 over 1e5 pixels: a push against
    that class far stronger than its CE. Rare classes are the ones most often missing from a
    batch, so it falls on them. With `present_only` the comparison is over the classes of S_k that have
    pixels in the batch (p renormalised over them); CE alone answers for the others.
    """
    mask, _, safe = _in_set_mask(logits, target, in_set, ignore_index)
    in_set = in_set.to(logits.device)
    count = int(mask.sum())
    if count == 0:
        return _zero(logits)
    probs = logits.softmax(dim=1)
    weight = mask.unsqueeze(1).to(probs.dtype)
    mean_probs = (probs * weight).sum(dim=(0, 2, 3)) / count
    hist = torch.bincount(safe.flatten(), mask.flatten().to(probs.dtype), minlength=logits.shape[1])
    support = in_set & (hist > 0) if present_only else in_set
    if class_weights is not None:
        hist = hist * class_weights.to(device=hist.device, dtype=hist.dtype)
    p = mean_probs[support]
    p = p / p.sum()
    hist = hist[support]
    q = (hist + eps) / (hist + eps).sum()
    # The clamp only guards log(0); those terms are multiplied by p = 0 anyway.
    return (p * (p.clamp_min(torch.finfo(p.dtype).tiny).log() - q.log())).sum()


class ExpertLoss(NamedTuple):
    total: Tensor
    ce: Tensor
    l2: Tensor
    kl: Tensor


def expert_log_priors(pixel_counts: Sequence[int] | Tensor, expert_sets: Tensor, tau: float) -> Tensor:
    """[K, C] logit adjustments: tau * log(prior of c within S_k), 0 for the most frequent class
    of S_k and for classes outside S_k (Menon et al. 2021, logit adjustment; Ren et al. 2020,
    balanced softmax, at tau = 1).

    Training on `logits + adjustment` makes the raw logits, used unchanged at inference, fit a
    class-balanced version of the expert's own label distribution: each expert is rebalanced
    inside its set without touching the exported graph.
    """
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64).clamp_min(1.0)  # an absent class: one pixel
    log_counts = counts.log().to(expert_sets.device)
    adjustments = torch.zeros(expert_sets.shape, dtype=torch.float64, device=expert_sets.device)
    for k, in_set in enumerate(expert_sets):
        if in_set.any():
            top = log_counts[in_set].max()
            adjustments[k, in_set] = tau * (log_counts[in_set] - top)
    return adjustments.float()


def expert_loss(
    logits: Tensor,
    target: Tensor,
    in_set: Tensor,
    alpha: float = 0.2,
    ignore_index: int = 255,
    adjustment: Tensor | None = None,
    class_weights: Tensor | None = None,
    kl_present_only: bool = False,
) -> ExpertLoss:
    if adjustment is not None:  # CE and KL see the adjusted logits; L2 acts on classes outside S_k, where it is 0
        logits = logits + adjustment.to(logits.dtype).view(1, -1, 1, 1)
    ce = masked_ce(logits, target, in_set, ignore_index, class_weights)
    l2 = l2_suppression(logits, target, in_set, ignore_index)
    kl = kl_to_label_histogram(
        logits, target, in_set, ignore_index, class_weights=class_weights, present_only=kl_present_only
    )
    return ExpertLoss(ce + alpha * (l2 + kl), ce, l2, kl)


def stage1_loss(
    expert_logits: Sequence[Tensor],
    target: Tensor,
    expert_sets: Tensor,
    alpha: float | Sequence[float] = 0.2,
    ignore_index: int = 255,
    adjustments: Tensor | None = None,
    class_weights: Tensor | None = None,
    kl_present_only: bool = False,
) -> tuple[Tensor, list[ExpertLoss]]:
    """sum_k L_k; `alpha` is one weight for every expert's auxiliary term or one per expert."""
    if expert_sets.dim() != 2 or len(expert_logits) != expert_sets.shape[0]:
        raise ValueError(
            f"got {len(expert_logits)} expert logits but expert_sets has shape {tuple(expert_sets.shape)}; "
            "pass one logits tensor per row of expert_sets"
        )
    for name, per_expert in (("adjustments", adjustments), ("class_weights", class_weights)):
        if per_expert is not None and per_expert.shape != expert_sets.shape:
            raise ValueError(
                f"{name} has shape {tuple(per_expert.shape)}, expected {tuple(expert_sets.shape)} (one row per expert)"
            )
    alphas = [float(alpha)] * len(expert_logits) if isinstance(alpha, int | float) else list(alpha)
    if len(alphas) != len(expert_logits):
        raise ValueError(f"got {len(alphas)} alphas for {len(expert_logits)} experts; pass one or one per expert")
    none = [None] * len(expert_logits)
    rows = none if adjustments is None else list(adjustments)
    weights = none if class_weights is None else list(class_weights)
    parts = [
        expert_loss(z, target, s, alpha_k, ignore_index, a, w, kl_present_only)
        for z, s, alpha_k, a, w in zip(expert_logits, expert_sets, alphas, rows, weights, strict=True)
    ]
    total = torch.stack([p.total for p in parts]).sum()
    return total, parts


def selection_loss(
    select_logits: Tensor,
    target: Tensor,
    expert_lut: Tensor,
    weights: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    _check_inputs(select_logits, target, what="selection logits")
    num_experts = select_logits.shape[1]
    if expert_lut.shape != (256,):
        raise ValueError(
            f"expert_lut must have shape (256,), got {tuple(expert_lut.shape)}; build it with expert_index_lut"
        )
    if weights is not None and weights.shape != (num_experts,):
        raise ValueError(
            f"weights must have shape ({num_experts},) to match the selection logits, got {tuple(weights.shape)}"
        )
    target = target.long()
    if int(target.min()) < 0 or int(target.max()) > 255:
        raise ValueError("target values must lie in [0, 255] to index the 256-entry expert LUT")
    se_target = expert_lut.to(target.device)[target]
    valid = se_target != ignore_index
    if not valid.any():
        return _zero(select_logits)
    if int(se_target[valid].max()) >= num_experts:
        raise ValueError(
            f"expert_lut maps a label to expert index {int(se_target[valid].max())} but there are {num_experts} experts"
        )
    if weights is not None:
        weights = weights.to(device=select_logits.device, dtype=select_logits.dtype)
    # With weights this is PyTorch's weighted mean, sum(w_y * l) / sum(w_y): with inverse-share
    # weights every expert target then contributes equally, whatever the weights' scale.
    return F.cross_entropy(select_logits, se_target, weight=weights, ignore_index=ignore_index)


def mixture_nll(probs: Tensor, target: Tensor, class_weights: Tensor | None = None, ignore_index: int = 255) -> Tensor:
    """Stage 2's "output" loss: -log p_final(y) of the mixed distribution, at the label's size.

    The decision maker is then fitted to the prediction it makes (the mixture-of-experts
    likelihood, Jacobs et al. 1991), not to a proxy target: sending a pixel to an expert costs
    only as much as that expert's probability of the true class falls short.
    """
    _check_inputs(probs, target, what="probabilities")
    num_classes = probs.shape[1]
    if class_weights is not None:
        _check_class_weights(class_weights, num_classes, "probabilities")
    valid, _ = _valid_mask(target, num_classes, ignore_index)
    if not valid.any():
        return _zero(probs)
    log_probs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
    if class_weights is not None:
        class_weights = class_weights.to(device=probs.device, dtype=probs.dtype)
    return F.nll_loss(log_probs, target.long(), weight=class_weights, ignore_index=ignore_index)


def selection_balance_weights(
    pixel_counts: Sequence[int] | Tensor, groups: Sequence[Sequence[int]], power: float = 1.0
) -> Tensor:
    # w_k ∝ share_k^-power: 1 is plain inverse frequency, smaller powers temper it.
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    if counts.sum() <= 0:
        raise ValueError("all pixel counts are zero; compute class statistics on labelled training images")
    shares = torch.stack([counts[list(g)].sum() for g in groups]) / counts.sum()
    weights = torch.zeros_like(shares)
    present = shares > 0
    weights[present] = shares[present] ** -power
    # A group without training pixels gets the largest weight, as in inverse_sqrt_frequency_weights.
    weights[~present] = weights[present].max()
    return (weights / weights.mean()).float()


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, ignore_index: int = 255) -> Tensor:
    _check_inputs(logits, target)
    valid, safe = _valid_mask(target, logits.shape[1], ignore_index)
    count = int(valid.sum())
    if count == 0:
        return _zero(logits)
    log_pt = logits.log_softmax(dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = -((1 - log_pt.exp()) ** gamma) * log_pt
    return (loss * valid).sum() / count


def weighted_ce(logits: Tensor, target: Tensor, class_weights: Tensor, ignore_index: int = 255) -> Tensor:
    _check_inputs(logits, target)
    num_classes = logits.shape[1]
    _check_class_weights(class_weights, num_classes, "logits")
    valid, _ = _valid_mask(target, num_classes, ignore_index)
    if not valid.any():
        return _zero(logits)
    weights = class_weights.to(device=logits.device, dtype=logits.dtype)
    # PyTorch's weighted mean (divides by the summed weights of the valid pixels).
    return F.cross_entropy(logits, target.long(), weight=weights, ignore_index=ignore_index)


def expert_reweights(pixel_counts: Sequence[int] | Tensor, expert_sets: Tensor) -> Tensor:
    """[K, C] class weights for each expert's CE: the reweight baseline's 1/sqrt(frequency), taken
    over S_k alone (mean 1 there, 0 outside), so every expert is re-weighted inside its own set and
    expert 1, whose set is every class, has exactly the reweight baseline's loss."""
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    weights = torch.zeros(expert_sets.shape, dtype=torch.float32)
    for k, in_set in enumerate(expert_sets.cpu()):
        if counts[in_set].sum() > 0:
            weights[k, in_set] = inverse_sqrt_frequency_weights(counts[in_set])
        else:  # no training pixel in S_k: its CE is empty anyway
            weights[k, in_set] = 1.0
    return weights.to(expert_sets.device)


def inverse_sqrt_frequency_weights(pixel_counts: Sequence[int] | Tensor) -> Tensor:
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("all pixel counts are zero; compute class statistics on labelled training images")
    freq = counts / counts.sum()
    weights = torch.zeros_like(counts)
    weights[present] = freq[present].rsqrt()
    weights = weights / weights[present].mean()
    weights[~present] = weights[present].max()
    return weights.float()
