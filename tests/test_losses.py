import math

import pytest
import torch
import torch.nn.functional as F

from medoe.class_stats import expert_index_lut, expert_sets
from medoe.losses import (
    expert_loss,
    focal_loss,
    inverse_sqrt_frequency_weights,
    kl_to_label_histogram,
    l2_suppression,
    masked_ce,
    mixture_nll,
    selection_balance_weights,
    selection_loss,
    stage1_loss,
    weighted_ce,
)

# N=1, C=4, 2x3 pixels; written per pixel as [class0..class3] so hand computations can read them.
PIXEL_LOGITS = [
    [[1.0, 0.0, 2.0, -1.0], [0.5, 1.5, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]],
    [[-1.0, 2.0, 0.5, 1.0], [9.0, 9.0, 9.0, 9.0], [2.0, -2.0, 0.0, 0.5]],
]
TARGET = torch.tensor([[[0, 1, 2], [3, 255, 2]]])
S_TAIL = torch.tensor([False, False, True, True])  # S_k = {2, 3}
S_ALL = torch.ones(4, dtype=torch.bool)


def make_logits(requires_grad=False):
    return torch.tensor(PIXEL_LOGITS).permute(2, 0, 1).unsqueeze(0).requires_grad_(requires_grad)


def ce_by_hand(z, y):
    return math.log(sum(math.exp(v) for v in z)) - z[y]


def softmax_by_hand(z):
    exps = [math.exp(v) for v in z]
    return [e / sum(exps) for e in exps]


def test_masked_ce_by_hand():
    # Pixels labelled in {2, 3}: (0,2) label 2, (1,0) label 3, (1,2) label 2.
    expected = (
        ce_by_hand(PIXEL_LOGITS[0][2], 2) + ce_by_hand(PIXEL_LOGITS[1][0], 3) + ce_by_hand(PIXEL_LOGITS[1][2], 2)
    ) / 3
    assert masked_ce(make_logits(), TARGET, S_TAIL).item() == pytest.approx(expected, rel=1e-6)


def test_masked_ce_ignores_pixels_outside_set():
    logits = make_logits()
    changed = logits.clone()
    changed[0, :, 0, 0] = torch.tensor([50.0, -7.0, 3.0, 8.0])  # label 0, outside S_k
    changed[0, :, 0, 1] = torch.tensor([-4.0, 20.0, 1.0, 2.0])  # label 1, outside S_k
    changed[0, :, 1, 1] = torch.tensor([0.0, 0.0, -30.0, 30.0])  # ignored
    assert torch.equal(masked_ce(logits, TARGET, S_TAIL), masked_ce(changed, TARGET, S_TAIL))
    # With all classes in the set it is ordinary CE.
    full = masked_ce(logits, TARGET, S_ALL)
    assert full.item() == pytest.approx(F.cross_entropy(logits, TARGET, ignore_index=255).item(), rel=1e-6)


def test_masked_ce_without_pixels_is_connected_zero():
    logits = make_logits(requires_grad=True)
    loss = masked_ce(logits, torch.tensor([[[0, 1, 255], [1, 0, 255]]]), S_TAIL)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_l2_zero_for_all_classes_and_by_hand_otherwise():
    logits = make_logits(requires_grad=True)
    zero = l2_suppression(logits, TARGET, S_ALL)
    assert zero.item() == 0.0 and zero.requires_grad

    valid = [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 2),
    ]  # (1,1) is ignored; labels outside S_k still count
    expected = sum(PIXEL_LOGITS[i][j][0] ** 2 + PIXEL_LOGITS[i][j][1] ** 2 for i, j in valid) / len(valid)
    assert l2_suppression(logits, TARGET, S_TAIL).item() == pytest.approx(expected, rel=1e-6)


def test_kl_by_hand():
    in_set_pixels = [((0, 2), 2), ((1, 0), 3), ((1, 2), 2)]
    mean = [0.0] * 4
    for (i, j), _ in in_set_pixels:
        mean = [m + p / 3 for m, p in zip(mean, softmax_by_hand(PIXEL_LOGITS[i][j]), strict=True)]
    p = [mean[2] / (mean[2] + mean[3]), mean[3] / (mean[2] + mean[3])]
    eps = 1e-6
    q = [(2 + eps) / (3 + 2 * eps), (1 + eps) / (3 + 2 * eps)]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    # Float64 because this KL is small (~3e-4) and float32 cancellation would blur the check.
    got = kl_to_label_histogram(make_logits().double(), TARGET, S_TAIL, eps=eps)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_kl_with_class_weights_targets_the_weighted_histogram():
    # Labels 2, 2, 3 over S = {2, 3}: weights (1, 2) make the target (2, 2) / 4 instead of (2, 1) / 3.
    eps = 1e-6
    weights = torch.tensor([5.0, 5.0, 1.0, 2.0])
    mean = [0.0] * 4
    for i, j in ((0, 2), (1, 0), (1, 2)):
        mean = [m + p / 3 for m, p in zip(mean, softmax_by_hand(PIXEL_LOGITS[i][j]), strict=True)]
    p = [mean[2] / (mean[2] + mean[3]), mean[3] / (mean[2] + mean[3])]
    q = [(2 + eps) / (4 + 2 * eps), (2 + eps) / (4 + 2 * eps)]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    got = kl_to_label_histogram(make_logits().double(), TARGET, S_TAIL, eps=eps, class_weights=weights.double())
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert got.item() != pytest.approx(kl_to_label_histogram(make_logits().double(), TARGET, S_TAIL).item(), rel=1e-3)
    # expert_loss hands its CE weights to the KL term.
    part = expert_loss(make_logits(), TARGET, S_TAIL, alpha=0.5, class_weights=weights)
    assert part.kl.item() == pytest.approx(expected, rel=1e-4)


def test_kl_over_present_classes_leaves_out_a_class_missing_from_the_batch():
    # Labels 0, 1, 2, 2, 2 over S = {0..3}: class 3 has no pixel. Over the present classes p is the
    # mean softmax renormalised over {0, 1, 2} and q = (1, 1, 3) / 5; over the set, class 3 sits
    # at q = eps / (5 + 4 eps) and its term p3 log(p3 / q3) dominates.
    target = torch.tensor([[[0, 1, 2], [2, 255, 2]]])
    eps = 1e-6
    mean = [0.0] * 4
    for i, j in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2)):
        mean = [m + p / 5 for m, p in zip(mean, softmax_by_hand(PIXEL_LOGITS[i][j]), strict=True)]
    p = [m / sum(mean[:3]) for m in mean[:3]]
    q = [(n + eps) / (5 + 3 * eps) for n in (1, 1, 3)]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    logits = make_logits().double()
    got = kl_to_label_histogram(logits, target, S_ALL, eps=eps, present_only=True)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    over_set = kl_to_label_histogram(logits, target, S_ALL, eps=eps)
    p3 = mean[3]  # the set's p includes class 3 (the renormalisation is over all four, which sum to 1)
    assert over_set.item() > p3 * math.log(p3 / (eps / (5 + 4 * eps))) - 0.1 > 10 * got.item()
    # With every class of the set present, the two supports are the same comparison.
    assert kl_to_label_histogram(logits, TARGET, S_TAIL, present_only=True).item() == pytest.approx(
        kl_to_label_histogram(logits, TARGET, S_TAIL).item(), rel=1e-12
    )
    # expert_loss and stage1_loss hand the choice to the KL term.
    part = expert_loss(make_logits(), target, S_ALL, alpha=0.5, kl_present_only=True)
    assert part.kl.item() == pytest.approx(expected, rel=1e-4)
    _, parts = stage1_loss([make_logits()] * 2, target, torch.stack([S_ALL, S_TAIL]), kl_present_only=True)
    assert parts[0].kl.item() == pytest.approx(expected, rel=1e-4)


def test_stage1_loss_takes_one_alpha_per_expert():
    sets = torch.stack([S_ALL, S_TAIL])
    total, parts = stage1_loss([make_logits(), make_logits() * 2], TARGET, sets, alpha=[0.0, 0.5])
    first, second = expert_loss(make_logits(), TARGET, S_ALL, 0.0), expert_loss(make_logits() * 2, TARGET, S_TAIL, 0.5)
    assert parts[0].total.item() == pytest.approx(first.ce.item()) and first.kl.item() > 0  # its KL is left out
    assert total.item() == pytest.approx(first.total.item() + second.total.item())
    with pytest.raises(ValueError, match="got 3 alphas for 2 experts"):
        stage1_loss([make_logits()] * 2, TARGET, sets, alpha=[0.2] * 3)


def test_kl_zero_when_p_equals_q():
    # Uniform logits give p = (1/2, 1/2) over {2, 3}; two pixels of each label give q = (1/2, 1/2).
    target = torch.tensor([[[0, 2, 3], [3, 255, 2]]])
    assert kl_to_label_histogram(torch.zeros(1, 4, 2, 3), target, S_TAIL).abs().item() < 1e-7
    # Confident logits that match the labels give p close to the label histogram.
    one_hot = F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 30.0
    assert kl_to_label_histogram(one_hot, target, S_TAIL).abs().item() < 1e-5
    assert kl_to_label_histogram(one_hot, target, S_ALL).abs().item() < 1e-5


def test_kl_without_pixels_is_connected_zero():
    logits = make_logits(requires_grad=True)
    loss = kl_to_label_histogram(logits, torch.full((1, 2, 3), 255), S_TAIL)
    assert loss.item() == 0.0 and loss.requires_grad


def test_expert_and_stage1_loss_combine_terms():
    logits = make_logits()
    part = expert_loss(logits, TARGET, S_TAIL, alpha=0.2)
    assert part.total.item() == pytest.approx((part.ce + 0.2 * (part.l2 + part.kl)).item(), rel=1e-6)
    assert part.l2.item() > 0 and part.kl.item() > 0

    sets = expert_sets([[0, 1], [2, 3]], 4)
    total, parts = stage1_loss([logits, logits * 0.5], TARGET, sets)
    assert len(parts) == 2
    assert parts[0].l2.item() == 0.0
    assert total.item() == pytest.approx(sum(p.total.item() for p in parts), rel=1e-6)
    with pytest.raises(ValueError, match="one logits tensor per row"):
        stage1_loss([logits], TARGET, sets)


SELECT_PIXELS = [  # [N=1, K=2, 2x3], per pixel [expert0, expert1]
    [[1.0, 0.0], [0.0, 2.0], [0.5, -0.5]],
    [[3.0, 1.0], [-1.0, 1.0], [2.0, 2.0]],
]
GROUPS = [[0, 1], [2, 3]]


def select_logits():
    return torch.tensor(SELECT_PIXELS).permute(2, 0, 1).unsqueeze(0)


def test_selection_loss_by_hand_and_ignore():
    lut = expert_index_lut(GROUPS)
    # Labels 0,1 -> expert 0; 2,3 -> expert 1; 255 ignored.
    losses = [
        ce_by_hand(SELECT_PIXELS[0][0], 0),
        ce_by_hand(SELECT_PIXELS[0][1], 0),
        ce_by_hand(SELECT_PIXELS[0][2], 1),
        ce_by_hand(SELECT_PIXELS[1][0], 1),
        ce_by_hand(SELECT_PIXELS[1][2], 1),
    ]
    logits = select_logits()
    assert selection_loss(logits, TARGET, lut).item() == pytest.approx(sum(losses) / 5, rel=1e-6)

    changed = logits.clone()
    changed[0, :, 1, 1] = torch.tensor([-40.0, 40.0])
    assert torch.equal(selection_loss(logits, TARGET, lut), selection_loss(changed, TARGET, lut))

    # Weighted: PyTorch's weighted mean, sum(w_t * l) / sum(w_t).
    w = torch.tensor([0.5, 1.5])
    weights_per_pixel = [0.5, 0.5, 1.5, 1.5, 1.5]
    expected = sum(a * b for a, b in zip(weights_per_pixel, losses, strict=True)) / sum(weights_per_pixel)
    got = selection_loss(logits, TARGET, lut, weights=w)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() != pytest.approx(sum(losses) / 5, rel=1e-3)


def test_selection_loss_all_ignored_and_errors():
    logits = select_logits().requires_grad_(True)
    lut = expert_index_lut(GROUPS)
    loss = selection_loss(logits, torch.full((1, 2, 3), 255), lut)
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="weights must have shape"):
        selection_loss(logits, TARGET, lut, weights=torch.ones(3))
    with pytest.raises(ValueError, match="resize"):
        selection_loss(logits, TARGET[:, :, :2], lut)


def test_selection_balance_weights():
    # Group shares 0.85, 0.12, 0.03 -> weights proportional to their inverses, mean 1.
    w = selection_balance_weights([60, 25, 8, 4, 3], [[0, 1], [2, 3], [4]])
    inv = torch.tensor([1 / 0.85, 1 / 0.12, 1 / 0.03])
    torch.testing.assert_close(w, (inv / inv.mean()).float())
    assert w.mean().item() == pytest.approx(1.0)


def test_selection_balance_power_tempers_the_weights():
    shares = torch.tensor([0.85, 0.12, 0.03])
    w = selection_balance_weights([60, 25, 8, 4, 3], [[0, 1], [2, 3], [4]], power=0.5)
    torch.testing.assert_close(w, (shares.rsqrt() / shares.rsqrt().mean()).float())
    flat = selection_balance_weights([60, 25, 8, 4, 3], [[0, 1], [2, 3], [4]], power=0.0)
    torch.testing.assert_close(flat, torch.ones(3))


def test_focal_gamma_zero_equals_ce_and_gamma_two_by_hand():
    logits = make_logits()
    ce = F.cross_entropy(logits, TARGET, ignore_index=255)
    assert focal_loss(logits, TARGET, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-6)

    valid = [((0, 0), 0), ((0, 1), 1), ((0, 2), 2), ((1, 0), 3), ((1, 2), 2)]
    terms = []
    for (i, j), y in valid:
        pt = softmax_by_hand(PIXEL_LOGITS[i][j])[y]
        terms.append(-((1 - pt) ** 2) * math.log(pt))
    assert focal_loss(logits, TARGET).item() == pytest.approx(sum(terms) / 5, rel=1e-6)


def test_weighted_ce_uniform_equals_ce():
    logits = make_logits()
    ce = F.cross_entropy(logits, TARGET, ignore_index=255)
    assert weighted_ce(logits, TARGET, torch.full((4,), 3.0)).item() == pytest.approx(ce.item(), rel=1e-6)
    with pytest.raises(ValueError, match="class_weights must have shape"):
        weighted_ce(logits, TARGET, torch.ones(3))


def test_inverse_sqrt_frequency_weights():
    # 1/sqrt(freq) is proportional to 1/10, 1/5, -, 1/2; normalised to mean 1 over present classes.
    w = inverse_sqrt_frequency_weights([100, 25, 0, 4])
    torch.testing.assert_close(w, torch.tensor([0.375, 0.75, 1.875, 1.875]))
    with pytest.raises(ValueError, match="zero"):
        inverse_sqrt_frequency_weights([0, 0])


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda z, y: masked_ce(z, y, S_TAIL),
        lambda z, y: l2_suppression(z, y, S_TAIL),
        lambda z, y: kl_to_label_histogram(z, y, S_TAIL),
        lambda z, y: expert_loss(z, y, S_TAIL),
        lambda z, y: focal_loss(z, y),
        lambda z, y: weighted_ce(z, y, torch.ones(4)),
    ],
)
def test_shape_mismatch_errors(loss_fn):
    logits = make_logits()
    with pytest.raises(ValueError, match="resize"):
        loss_fn(logits, torch.zeros(1, 4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in N,H,W"):
        loss_fn(logits, torch.zeros(2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N,C,H,W\]"):
        loss_fn(logits[0], TARGET)


def test_bad_target_value_is_named():
    with pytest.raises(ValueError, match="target value 7"):
        masked_ce(make_logits(), torch.tensor([[[0, 1, 2], [7, 255, 2]]]), S_TAIL)


def test_mixture_nll_by_hand_weights_and_errors():
    probs = make_logits().softmax(dim=1)
    pixels = [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 3), (1, 2, 2)]  # (row, col, label), 255 skipped
    nll = [-math.log(softmax_by_hand(PIXEL_LOGITS[r][c])[y]) for r, c, y in pixels]
    assert mixture_nll(probs, TARGET).item() == pytest.approx(sum(nll) / 5, rel=1e-5)
    # On a softmax it is the CE of the logits (which a one-expert mixture gives back).
    torch.testing.assert_close(mixture_nll(probs, TARGET), F.cross_entropy(make_logits(), TARGET, ignore_index=255))
    w = torch.tensor([0.5, 1.0, 2.0, 4.0])
    per_pixel = [w[y].item() for _, _, y in pixels]
    expected = sum(a * b for a, b in zip(per_pixel, nll, strict=True)) / sum(per_pixel)
    assert mixture_nll(probs, TARGET, w).item() == pytest.approx(expected, rel=1e-5)
    # A zero probability is a large finite loss, not inf or NaN.
    hard = torch.zeros_like(probs)
    hard[:, 0] = 1.0
    assert math.isfinite(mixture_nll(hard, TARGET).item())
    empty = mixture_nll(probs.requires_grad_(True), torch.full((1, 2, 3), 255))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="class_weights must have shape"):
        mixture_nll(probs, TARGET, torch.ones(3))
    with pytest.raises(ValueError, match="resize"):
        mixture_nll(probs, TARGET[:, :, :2])
