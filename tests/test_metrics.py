import json
import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from medoe.metrics import ConfusionMatrix, SegMetrics

C = 6
ABSENT = 4


def random_batch(seed, predict_absent):
    """Random labels with ~20% ignored pixels; class ABSENT never occurs in the ground truth."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C - 1, (4, 16, 16), generator=gen)
    target[target >= ABSENT] += 1  # skip the absent class
    target[torch.rand(target.shape, generator=gen) < 0.2] = 255
    pred = torch.randint(0, C, target.shape, generator=gen)
    # Bias predictions towards the truth so scores are not all near chance.
    agree = torch.rand(target.shape, generator=gen) < 0.5
    pred = torch.where(agree & (target != 255), target, pred)
    if not predict_absent:
        pred[pred == ABSENT] = 0
    return pred, target


def torchmetrics_scores(pred, target, average):
    jac = MulticlassJaccardIndex(num_classes=C, average=average, ignore_index=255)
    acc = MulticlassAccuracy(num_classes=C, average=average, ignore_index=255)
    return jac(pred, target).double(), acc(pred, target).double()


def test_matches_torchmetrics_when_absent_class_is_never_predicted():
    # torchmetrics 1.9 drops classes with tp + fp + fn == 0 from macro means; with the absent
    # class never predicted that is exactly our rule (no ground truth -> NaN, left out).
    pred, target = random_batch(0, predict_absent=False)
    cm = ConfusionMatrix(C)
    cm.update(pred, target)
    m = cm.compute()
    assert math.isnan(m.iou[ABSENT]) and math.isnan(m.acc[ABSENT])
    tm_iou, tm_acc = torchmetrics_scores(pred, target, "macro")
    assert m.mIoU == pytest.approx(tm_iou.item(), abs=1e-6)
    assert m.mAcc == pytest.approx(tm_acc.item(), abs=1e-6)


def test_per_class_matches_torchmetrics_when_absent_class_is_predicted():
    # Here the rules differ: torchmetrics scores a predicted-but-absent class as 0 in its macro
    # mean; we leave it out. Per-class values on present classes must still agree exactly.
    pred, target = random_batch(1, predict_absent=True)
    assert (pred[target != 255] == ABSENT).any()
    cm = ConfusionMatrix(C)
    cm.update(pred, target)
    m = cm.compute()
    present = [c for c in range(C) if c != ABSENT]
    tm_iou, tm_acc = torchmetrics_scores(pred, target, "none")
    np.testing.assert_allclose(m.iou[present], tm_iou[present].numpy(), atol=1e-6)
    np.testing.assert_allclose(m.acc[present], tm_acc[present].numpy(), atol=1e-6)
    assert math.isnan(m.iou[ABSENT])
    # The documented difference, made explicit: torchmetrics' macro = our sum / (present + 1).
    tm_macro_iou, tm_macro_acc = torchmetrics_scores(pred, target, "macro")
    assert tm_macro_iou.item() == pytest.approx(m.mIoU * len(present) / (len(present) + 1), abs=1e-6)
    assert tm_macro_acc.item() == pytest.approx(m.mAcc * len(present) / (len(present) + 1), abs=1e-6)


def test_merge_of_halves_equals_whole_and_numpy_input():
    pred, target = random_batch(2, predict_absent=True)
    whole = ConfusionMatrix(C)
    whole.update(pred, target)
    first, second = ConfusionMatrix(C), ConfusionMatrix(C)
    first.update(pred[:2], target[:2])
    second.update(pred[2:].numpy(), target[2:].numpy().astype(np.uint8))
    merged = ConfusionMatrix(C).merge(first)
    merged += second
    assert torch.equal(merged.mat, whole.mat)
    assert merged.compute().mIoU == whole.compute().mIoU
    with pytest.raises(ValueError, match="same settings"):
        whole.merge(ConfusionMatrix(C + 1))


def test_all_reduce_without_distributed_is_noop_and_reset():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    before = cm.mat.clone()
    cm.all_reduce()
    assert torch.equal(cm.mat, before)
    cm.reset()
    assert cm.mat.sum() == 0 and cm.mat.dtype == torch.int64


def test_hand_example_aacc_iou_acc():
    # 6 valid pixels, 4 correct; class 2 has no ground truth but one false positive.
    target = np.array([[0, 0, 0, 1], [1, 1, 255, 255]])
    pred = np.array([[0, 0, 1, 1], [1, 2, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.mat.tolist() == [[2, 1, 0], [0, 2, 1], [0, 0, 0]]
    m = cm.compute()
    assert m.aAcc == pytest.approx(4 / 6)
    np.testing.assert_allclose(m.iou, [2 / 3, 2 / 4, np.nan])
    np.testing.assert_allclose(m.acc, [2 / 3, 2 / 3, np.nan])
    assert m.mIoU == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m.mAcc == pytest.approx(2 / 3)
    assert m.pixels.tolist() == [3, 3, 0]


def metrics_fixture():
    return SegMetrics(
        aAcc=0.9,
        mIoU=0.5,
        mAcc=0.6,
        iou=np.array([0.8, 0.4, np.nan, 0.2]),
        acc=np.array([0.9, 0.5, np.nan, 0.4]),
        pixels=np.array([100, 50, 0, 10]),
    )


def test_group_means():
    groups = {"head": [0], "body": [1, 2], "tail": [3], "empty": [2]}
    means = metrics_fixture().group_means(groups)
    assert means["head"] == {"mIoU": pytest.approx(0.8), "mAcc": pytest.approx(0.9)}
    assert means["body"] == {"mIoU": pytest.approx(0.4), "mAcc": pytest.approx(0.5)}
    assert means["tail"]["mIoU"] == pytest.approx(0.2)
    assert math.isnan(means["empty"]["mIoU"]) and math.isnan(means["empty"]["mAcc"])
    with pytest.raises(ValueError, match="outside"):
        metrics_fixture().group_means({"head": [7]})


def test_to_dict_percent_and_nan_as_none():
    out = metrics_fixture().to_dict(["road", "car", "train", "bike"], {"head": [0, 1], "tail": [2]})
    assert set(out) == {"aAcc", "mIoU", "mAcc", "groups", "per_class"}
    assert out["aAcc"] == pytest.approx(90.0) and out["mIoU"] == pytest.approx(50.0)
    assert out["groups"]["head"]["mIoU"] == pytest.approx(60.0)
    assert out["groups"]["tail"] == {"mIoU": None, "mAcc": None}
    assert out["per_class"][2] == {"name": "train", "IoU": None, "Acc": None, "pixels": 0}
    assert out["per_class"][0]["IoU"] == pytest.approx(80.0)
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN literals
    assert metrics_fixture().to_dict(["a", "b", "c", "d"])["groups"] == {}
    with pytest.raises(ValueError, match="one name per class"):
        metrics_fixture().to_dict(["a"])


def test_empty_matrix_is_nan():
    m = ConfusionMatrix(3).compute()
    assert math.isnan(m.aAcc) and math.isnan(m.mIoU) and math.isnan(m.mAcc)


def test_update_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="prediction value 3"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prediction value -1"):
        cm.update(torch.tensor([0, -1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target value 5"):
        cm.update(torch.tensor([0, 1]), torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="argmax"):
        cm.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    # Out-of-range predictions on ignored pixels are fine; nothing was counted by the failures above.
    cm.update(torch.tensor([9, 1]), torch.tensor([255, 1]))
    assert cm.mat.sum() == 1
