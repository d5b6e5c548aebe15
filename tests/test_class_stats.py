import json

import numpy as np
import pytest
import torch

from medoe.class_stats import (
    DEFAULT_THRESHOLDS,
    ClassStats,
    GroupSplitError,
    default_thresholds,
    expert_index_lut,
    expert_sets,
    split_groups,
)

# Shares 0.60, 0.25, 0.08, 0.04, 0.03: class 1 crosses 0.80 (head), class 3 crosses 0.95 (body).
COUNTS = [60, 25, 8, 4, 3]


def test_default_thresholds():
    assert DEFAULT_THRESHOLDS == (0.80, 0.95)
    assert default_thresholds(3) == (0.80, 0.95)
    assert default_thresholds(2) == (0.80,)
    assert default_thresholds(4) == (0.80, 0.875, 0.95)
    five = default_thresholds(5)
    assert five[0] == 0.80 and five[-1] == 0.95 and len(five) == 4
    with pytest.raises(ValueError, match=">= 2"):
        default_thresholds(1)


def test_crossing_class_is_head():
    assert split_groups(COUNTS, (0.80, 0.95)) == [[0, 1], [2, 3], [4]]


def test_class_reaching_threshold_exactly_stays_in_lower_group():
    # Class 1 brings the cumulative share to exactly 0.80, class 5 to exactly 0.95.
    assert split_groups([50, 30, 10, 2, 3, 5], (0.80, 0.95)) == [[0, 1], [2, 5], [4, 3]]


def test_ties_rank_lower_index_first():
    # Classes 1 and 2 tie, as do 3 and 4: rank order is 1, 2, 0, 3, 4.
    assert split_groups([10, 40, 40, 5, 5], (0.80, 0.95)) == [[1, 2], [0, 3], [4]]


def test_two_and_four_groups():
    assert split_groups(COUNTS, default_thresholds(2)) == [[0, 1], [2, 3, 4]]
    assert split_groups(COUNTS, default_thresholds(4)) == [[0, 1], [2], [3], [4]]


def test_absent_classes_fall_into_tail():
    assert split_groups([80, 15, 0, 5], (0.80, 0.95)) == [[0], [1], [3, 2]]


def test_empty_group_error_names_thresholds_and_shares():
    # Class 0 alone jumps from 0 to 0.95, so the body is empty.
    with pytest.raises(GroupSplitError, match=r"\[2\].*\(0\.8, 0\.95\).*0:0\.9500"):
        split_groups([95, 4, 1], (0.80, 0.95))


@pytest.mark.parametrize("thresholds", [(0.95, 0.80), (0.8, 0.8), (0.0, 0.5), (0.5, 1.0), ()])
def test_bad_thresholds(thresholds):
    with pytest.raises(GroupSplitError):
        split_groups(COUNTS, thresholds)


def test_all_zero_counts():
    with pytest.raises(GroupSplitError, match="zero"):
        split_groups([0, 0, 0], (0.8, 0.95))


def test_from_label_maps_counts_pixels_and_images():
    maps = [
        np.array([[0, 0, 1], [255, 2, 2]], dtype=np.uint8),
        np.array([[0, 255], [255, 0]], dtype=np.uint8),
    ]
    stats = ClassStats.from_label_maps(iter(maps), ["a", "b", "c", "d"])
    assert stats.pixel_counts == [4, 1, 2, 0]
    assert stats.image_counts == [2, 1, 1, 0]
    assert stats.num_images == 2
    assert stats.num_classes == 4
    np.testing.assert_allclose(stats.pixel_share, [4 / 7, 1 / 7, 2 / 7, 0])
    assert stats.pixel_share.dtype == np.float64
    assert stats.ranking() == [0, 2, 1, 3]


def test_from_label_maps_rejects_unknown_value():
    with pytest.raises(ValueError, match="label value 7"):
        ClassStats.from_label_maps([np.array([[0, 7]])], ["a", "b"])


def test_groups_and_group_dict():
    stats = ClassStats([f"c{i}" for i in range(5)], COUNTS, [1] * 5, 1)
    assert stats.groups() == [[0, 1], [2, 3], [4]]
    assert stats.group_dict() == {"head": [0, 1], "body": [2, 3], "tail": [4]}
    assert stats.group_dict((0.8,)) == {"group1": [0, 1], "group2": [2, 3, 4]}


def test_expert_sets_and_lut():
    groups = [[1, 2], [0, 3], [4]]
    sets = expert_sets(groups, 6)
    assert sets.dtype == torch.bool and sets.shape == (3, 6)
    # Class 5 is in no group, so it belongs to no expert set and maps to ignore.
    assert sets[0].tolist() == [True, True, True, True, True, False]
    assert sets[1].tolist() == [True, False, False, True, True, False]
    assert sets[2].tolist() == [False, False, False, False, True, False]

    full = expert_sets(groups, 5)
    assert full[0].all()
    assert full[-1].nonzero().flatten().tolist() == groups[-1]

    lut = expert_index_lut(groups)
    assert lut.dtype == torch.long and lut.shape == (256,)
    assert lut[[0, 1, 2, 3, 4]].tolist() == [1, 0, 0, 1, 2]
    assert lut[5] == 255 and lut[255] == 255


def test_expert_sets_rejects_bad_groups():
    with pytest.raises(ValueError, match="more than one group"):
        expert_sets([[0, 1], [1]], 3)
    with pytest.raises(ValueError, match="outside"):
        expert_sets([[0], [5]], 3)
    with pytest.raises(GroupSplitError, match="empty"):
        expert_index_lut([[0], []])


def test_save_load_round_trip(tmp_path):
    stats = ClassStats(["road", "car", "bike"], [100, 20, 3], [5, 4, 1], 5)
    path = tmp_path / "sub" / "class_stats.json"
    stats.save(path)
    assert ClassStats.load(path) == stats
    assert ClassStats.from_dict(stats.to_dict()) == stats
    # The atomic write leaves no temporary file behind.
    assert [p.name for p in path.parent.iterdir()] == ["class_stats.json"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClassStats.load(tmp_path / "missing.json")

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"class_names": ["a"', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        ClassStats.load(corrupt)

    uneven = tmp_path / "uneven.json"
    uneven.write_text(
        json.dumps(
            {
                "class_names": ["a", "b"],
                "pixel_counts": [1],
                "image_counts": [1, 1],
                "num_images": 1,
            }
        ),
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="inconsistent lengths"):
        ClassStats.load(uneven)

    missing_key = tmp_path / "missing_key.json"
    missing_key.write_text(json.dumps({"class_names": ["a"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="lack keys"):
        ClassStats.load(missing_key)
