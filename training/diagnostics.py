"""Where MEDOE's accuracy goes: one pass over a split scores the learned MOE next to every
expert alone, the oracle and the paper's user-specified ensembles (Table 6), and measures the
decision maker's selection accuracy, each expert's calibration and its per-class bias (Table 9).

    rules = expert_diagnostics(model, dataset, device, config, stats)

Rules, all on the experts' probabilities resized to the label size:
- `moe`: the learned decision maker (what the exported graph computes).
- `group_prior` (nested and refine mixing): the group prior without the learned correction.
- `expertK`: expert K alone, argmax over all C classes.
- `oracle`: each pixel takes the expert that owns its true class (an upper bound).
- `oracle_expert1` (nested and refine mixing): expert 1 kept to each pixel's true group, the
  oracle with expert 1 in every group's place; against `oracle` it says whether the group's
  expert is the better classifier inside its group.
- `softmax_threshold`: the most specialised expert whose top in-set probability exceeds
  beta = 0.3 decides, expert 1 otherwise (the paper's "Softmax method").
- `max_confidence`: the expert with the highest top probability decides ("Argmax method").
- `group_average`: class c's probability is the mean over the experts whose set holds c
  ("Group average method").
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from medoe.class_stats import DEFAULT_THRESHOLDS, ClassStats
from medoe.config import GENERATED, TrainConfig
from medoe.metrics import ConfusionMatrix
from medoe.model import MEDOE
from medoe.ops import resize

SOFTMAX_BETA = 0.3  # Table 6's beta
CALIBRATION_BINS = 15  # equal-width confidence bins of the expected calibration error


def _ensembles(full: torch.Tensor, sets: torch.Tensor, best) -> dict[str, torch.Tensor]:
    """full [N, K, C, H, W] expert probabilities, best = full.max(2) -> labels per user-specified rule."""
    k = full.shape[1]
    rules = {f"expert{i + 1}": best.indices[:, i] for i in range(k)}
    in_set = full * sets.view(1, k, -1, 1, 1)
    top, top_class = in_set.max(2)  # [N, K, H, W]: each expert's best class inside its own set
    chosen = top_class[:, 0].clone()
    for i in range(1, k):  # later experts are more specialised: they override when sure
        chosen = torch.where(top[:, i] > SOFTMAX_BETA, top_class[:, i], chosen)
    rules["softmax_threshold"] = chosen
    surest = best.values.argmax(1, keepdim=True)  # [N, 1, H, W]: the expert with the highest top probability
    rules["max_confidence"] = best.indices.gather(1, surest).squeeze(1)
    owners = sets.sum(0).clamp_min(1).view(1, -1, 1, 1).to(full.dtype)
    rules["group_average"] = (in_set.sum(1) / owners).argmax(1)
    return rules


@torch.no_grad()
def expert_diagnostics(
    model: MEDOE, dataset, device, config: TrainConfig, stats: ClassStats, batch_size: int = 4
) -> dict:
    """metrics per rule (percent, as evaluate()), plus selection, calibration and bias tables."""
    model.eval()
    c, k, ignore = config.network.num_classes, model.num_experts, config.network.ignore_index
    sets = model.expert_sets().to(device)
    matrices: dict[str, ConfusionMatrix] = {}
    select_hits = torch.zeros(k, dtype=torch.float64)  # per owner expert: argmax weight == owner
    select_mass = torch.zeros(k, dtype=torch.float64)  # per owner expert: summed weight on the owner
    select_count = torch.zeros(k, dtype=torch.float64)
    bins = torch.zeros(k, 3, CALIBRATION_BINS, dtype=torch.float64)  # count, confidence, correct
    true_prob = torch.zeros(k, c, dtype=torch.float64)  # summed p_k(true class) per class
    class_count = torch.zeros(c, dtype=torch.float64)
    for images, labels in DataLoader(dataset, batch_size=batch_size if config.dataset in GENERATED else 1):
        images, labels = images.to(device), labels.to(device).long()
        probs, features = model.expert_outputs(images)  # [N, K, C, h, w], the backbone's last map
        mixed = model.expert_distributions(probs)  # what the MOE mixes (= probs for the paper's mixing)
        moe = model.mixture(probs, features)  # what forward() serves, at decoder resolution
        n, size = probs.shape[0], labels.shape[-2:]
        full = resize(probs.flatten(1, 2), size).view(n, k, c, *size)
        full_mixed = resize(mixed.flatten(1, 2), size).view(n, k, c, *size)
        valid = labels != ignore
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        owner = model.expert_lut[safe]
        oracle = torch.nn.functional.one_hot(owner.clamp(0, k - 1), k).permute(0, 3, 1, 2).to(full.dtype)
        best = full.max(2)  # each expert's top probability and class: [N, K, H, W] each
        rules = _ensembles(full, sets, best)
        # Each expert alone, the MOE and the oracle pass through the model's output adjustment
        # (model.balanced; none by default), so their differences are the mixing's alone.
        # The paper's Table 6 rules stay on the raw probabilities, as the paper defines them.
        for i in range(k):
            rules[f"expert{i + 1}"] = model.balanced(full[:, i]).argmax(1)
        # As the model computes them: mixed at decoder resolution, then resized.
        rules["moe"] = resize(model.balanced(moe.probs), size).argmax(1)
        if model.config.mixing != "paper":
            prior = torch.softmax(model.group_prior_logits(probs), dim=1)
            rules["group_prior"] = resize(model.balanced((prior.unsqueeze(2) * mixed).sum(1)), size).argmax(1)
        rules["oracle"] = model.balanced((oracle.unsqueeze(2) * full_mixed).sum(1)).argmax(1)
        if model.config.mixing != "paper":
            own = model.expert_distributions(full[:, :1].expand_as(full))  # expert 1 kept to each group
            rules["oracle_expert1"] = model.balanced((oracle.unsqueeze(2) * own).sum(1)).argmax(1)
        weights = resize(moe.weights, size)
        for name, predicted in rules.items():
            matrices.setdefault(name, ConfusionMatrix(c, ignore, device)).update(predicted, labels)
        picked = weights.argmax(1)
        owner_weight = weights.gather(1, owner.clamp(0, k - 1).unsqueeze(1)).squeeze(1)
        for i in range(k):
            mine = valid & (owner == i)
            select_count[i] += mine.sum().item()
            select_hits[i] += (mine & (picked == i)).sum().item()
            select_mass[i] += owner_weight[mine].sum().item()
            # Calibration of expert i on the pixels it is trained on (true class in S_i).
            supervised = valid & sets[i][safe]
            confidence, guess = best.values[:, i], best.indices[:, i]
            index = (confidence[supervised] * CALIBRATION_BINS).long().clamp_max(CALIBRATION_BINS - 1)
            bins[i, 0] += torch.bincount(index, minlength=CALIBRATION_BINS).double().cpu()
            bins[i, 1] += torch.bincount(index, confidence[supervised].double(), CALIBRATION_BINS).cpu()
            hit = (guess == safe)[supervised].double()
            bins[i, 2] += torch.bincount(index, hit, CALIBRATION_BINS).cpu()
            p_true = full[:, i].gather(1, safe.unsqueeze(1)).squeeze(1)
            true_prob[i] += torch.bincount(safe[valid], p_true[valid].double(), c).cpu()
        class_count += torch.bincount(safe[valid], minlength=c).double().cpu()
    names = config.network.class_names or stats.class_names
    groups = stats.group_dict(DEFAULT_THRESHOLDS)
    results = {name: m.compute().to_dict(names, groups) for name, m in matrices.items()}
    present = class_count > 0
    experts = []
    for i in range(k):
        count, confidence, correct = bins[i]
        seen = count.sum().clamp_min(1)
        ece = ((confidence - correct).abs().sum() / seen).item()
        members = sets[i].cpu() & present
        mean_true = true_prob[i] / class_count.clamp_min(1)
        # Per-category bias as RIDE (Wang et al. 2020) measures it: (1 - E[p(y)])^2 per class.
        bias = (1 - mean_true) ** 2
        per_class_acc = [results[f"expert{i + 1}"]["per_class"][j]["Acc"] for j in range(c)]
        set_acc = [a for j, a in enumerate(per_class_acc) if members[j] and a is not None]
        experts.append(
            {
                "expert": i + 1,
                "classes": [names[j] for j in range(c) if sets[i][j]],
                "set_mAcc": sum(set_acc) / max(1, len(set_acc)),
                "set_mean_bias": bias[members].mean().item() if members.any() else None,
                "ece": 100 * ece,
                "mean_confidence": 100 * (confidence.sum() / seen).item(),
                "accuracy": 100 * (correct.sum() / seen).item(),
                "per_class_bias": [round(b, 5) if present[j] else None for j, b in enumerate(bias.tolist())],
                "selection_accuracy": 100 * (select_hits[i] / select_count[i].clamp_min(1)).item(),
                "owner_weight": 100 * (select_mass[i] / select_count[i].clamp_min(1)).item(),
                "owned_pixels": int(select_count[i]),
            }
        )
    return {"rules": results, "experts": experts}


def gain_recovered(rules: dict) -> float | None:
    """(MOE - expert 1) / (oracle - expert 1) in mIoU: the share of the oracle's gain the decision keeps."""
    base, oracle = rules["expert1"]["mIoU"], rules["oracle"]["mIoU"]
    return None if oracle - base <= 1e-9 else (rules["moe"]["mIoU"] - base) / (oracle - base)
