"""The levers beyond the paper (docs/method.md §8) and the benchmark's diagnostics."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from medoe.class_stats import expert_sets
from medoe.config import ModelConfig, TrainConfig
from medoe.losses import (
    expert_log_priors,
    expert_loss,
    expert_reweights,
    inverse_sqrt_frequency_weights,
    masked_ce,
    stage1_loss,
    weighted_ce,
)
from medoe.model import MEDOE, DecisionMaker
from training import train
from training.common import SeededBatches, get_dataset, split_holdout
from training.diagnostics import _ensembles, expert_diagnostics, gain_recovered
from training.evaluate import evaluate

COUNTS = [800, 150, 40, 10]  # a long tail over 4 classes
SETS = expert_sets([[0], [1], [2, 3]], 4)  # S_1 = all, S_2 = {1,2,3}, S_3 = {2,3}


def test_log_priors_by_hand():
    adjust = expert_log_priors(COUNTS, SETS, tau=1.0)
    # Row k: log(count / largest count in S_k) inside S_k, 0 outside (and for S_k's top class).
    expected = [
        [0, math.log(150 / 800), math.log(40 / 800), math.log(10 / 800)],
        [0, 0, math.log(40 / 150), math.log(10 / 150)],
        [0, 0, 0, math.log(10 / 40)],
    ]
    torch.testing.assert_close(adjust, torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        expert_log_priors(COUNTS, SETS, tau=0.5), 0.5 * torch.tensor(expected), atol=1e-6, rtol=0
    )
    # A class without training pixels counts as one pixel, not log(0).
    assert torch.isfinite(expert_log_priors([5, 0, 1, 1], SETS, 1.0)).all()


def test_adjusted_expert_loss_is_balanced_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    target = torch.randint(0, 4, (2, 3, 5))
    adjust = expert_log_priors(COUNTS, SETS, tau=1.0)
    part = expert_loss(logits, target, SETS[0], alpha=0.0, adjustment=adjust[0])
    # Balanced softmax (Ren et al. 2020): CE of logits + log prior; shifts common to all classes cancel.
    prior = torch.tensor(COUNTS, dtype=torch.float) / sum(COUNTS)
    balanced = F.cross_entropy(logits + prior.log().view(1, -1, 1, 1), target)
    assert part.ce.item() == pytest.approx(balanced.item(), rel=1e-5)
    # Without an adjustment nothing changes; the rare classes' loss grows with one.
    plain = expert_loss(logits, target, SETS[0], alpha=0.0)
    assert plain.ce.item() == pytest.approx(masked_ce(logits, target, SETS[0]).item(), rel=1e-6)
    rare = torch.full_like(target, 3)
    assert expert_loss(logits, rare, SETS[0], adjustment=adjust[0]).ce > expert_loss(logits, rare, SETS[0]).ce


def test_expert_reweights_are_the_reweight_baselines_inside_each_set():
    weights = expert_reweights(COUNTS, SETS)
    # Row k: 1/sqrt(frequency within S_k), mean 1 over S_k, 0 outside it.
    for k, in_set in enumerate(SETS):
        counts = torch.tensor(COUNTS, dtype=torch.float)[in_set]
        expected = (counts / counts.sum()).rsqrt()
        torch.testing.assert_close(weights[k, in_set], expected / expected.mean(), atol=1e-6, rtol=0)
        assert (weights[k, ~in_set] == 0).all()
    torch.testing.assert_close(weights[0], inverse_sqrt_frequency_weights(COUNTS))
    assert (expert_reweights([5, 0, 0, 0], SETS)[2] == torch.tensor([0.0, 0.0, 1.0, 1.0])).all()  # no pixels in S_3

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    target = torch.randint(0, 4, (2, 3, 5))
    target[0, 0, 0] = 255
    # Expert 1's re-weighted CE is exactly the reweight baseline's loss.
    ce = masked_ce(logits, target, SETS[0], class_weights=weights[0])
    assert ce.item() == pytest.approx(weighted_ce(logits, target, weights[0]).item(), rel=1e-6)
    assert ce.item() != pytest.approx(masked_ce(logits, target, SETS[0]).item(), rel=1e-3)
    total, parts = stage1_loss([logits] * 3, target, SETS, alpha=0.0, class_weights=weights)
    assert parts[0].ce.item() == pytest.approx(ce.item(), rel=1e-6)
    with pytest.raises(ValueError, match="class_weights has shape"):
        stage1_loss([logits] * 3, target, SETS, class_weights=weights[:2])


def test_holdout_split_is_disjoint_seeded_and_off_at_zero():
    config = TrainConfig.from_dict(
        dict(dataset="synthetic", synthetic_train_images=50, synthetic_size=[16, 32], num_classes=14)
    )
    dataset = get_dataset(config, "train")
    fit, held = split_holdout(dataset, 0.2, seed=3)
    assert len(held) == 10 and len(fit) == 40
    assert not set(fit.indices) & set(held.indices) and sorted(fit.indices + held.indices) == list(range(50))
    assert split_holdout(dataset, 0.2, seed=3)[1].indices == held.indices
    assert split_holdout(dataset, 0.2, seed=4)[1].indices != held.indices
    image, label = held.load(0)
    assert (label == dataset.label_map(held.indices[0])).all() and held.class_names == dataset.class_names
    assert torch.equal(held[0][1], dataset[held.indices[0]][1])  # the tensor path (evaluation) too
    assert split_holdout(dataset, 0.0, seed=3) == (dataset, dataset)
    assert len(list(SeededBatches(len(held), 4, 0, 3))) == 3


def test_decision_kernel_three_sees_neighbours():
    torch.manual_seed(0)
    probs = torch.rand(1, 3, 4, 5, 5)
    moved = probs.clone()
    moved[..., 2, 3] = torch.rand(3, 4)  # change one neighbour of pixel (2, 2)
    for kernel, changes in ((1, False), (3, True)):
        decision = DecisionMaker(3, 4, hidden=8, kernel=kernel)
        a, b = decision(probs), decision(moved)
        assert a.shape == (1, 3, 5, 5)
        assert (not torch.allclose(a[..., 2, 2], b[..., 2, 2])) == changes


def test_decision_features_reach_the_decision_and_are_absent_when_off():
    torch.manual_seed(0)
    probs, features = torch.rand(1, 3, 4, 5, 5), torch.randn(1, 6, 3, 3)  # features at a coarser stride
    decision = DecisionMaker(3, 4, hidden=8, feature_channels=6)
    a, b = decision(probs, features), decision(probs, features + 1)
    assert a.shape == (1, 3, 5, 5) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="reads the backbone features"):
        decision(probs)
    plain = DecisionMaker(3, 4, hidden=8)
    assert not any(key.startswith("project") for key in plain.state_dict())  # older checkpoints keep their keys
    assert torch.equal(plain(probs), plain(probs, features))


def test_user_specified_ensembles_by_hand():
    # One pixel, K=3 experts, C=3 classes; S_1 = all, S_2 = {1, 2}, S_3 = {2}.
    sets = expert_sets([[0], [1], [2]], 3)
    full = torch.tensor([[0.4, 0.35, 0.25], [0.1, 0.6, 0.3], [0.7, 0.1, 0.2]]).view(1, 3, 3, 1, 1)
    rules = _ensembles(full, sets, full.max(2))
    assert rules["expert1"].item() == 0 and rules["expert2"].item() == 1 and rules["expert3"].item() == 0
    # Expert 3's best in-set class (2) has 0.2 < beta; expert 2's (1) has 0.6 > beta: class 1.
    assert rules["softmax_threshold"].item() == 1
    assert rules["max_confidence"].item() == 0  # expert 3's 0.7 is the surest
    # Class means over owners: c0 = 0.4, c1 = (0.35 + 0.6) / 2, c2 = (0.25 + 0.3 + 0.2) / 3.
    assert rules["group_average"].item() == 1
    assert gain_recovered(
        {"expert1": {"mIoU": 40.0}, "oracle": {"mIoU": 50.0}, "moe": {"mIoU": 46.0}}
    ) == pytest.approx(0.6)
    assert gain_recovered({"expert1": {"mIoU": 40.0}, "oracle": {"mIoU": 40.0}, "moe": {"mIoU": 46.0}}) is None


@pytest.mark.parametrize("mixing, features", [("paper", False), ("nested", True), ("refine", False)])
def test_diagnostics_agree_with_evaluate(mixing, features):
    config, dataset, stats = tiny_val_split(
        mixing=mixing, synthetic_val_images=6, decision_kernel=3, decision_features=features
    )
    torch.manual_seed(0)
    model = MEDOE(config.network)
    model.set_groups(stats.groups(config.network.group_thresholds))
    report = expert_diagnostics(model, dataset, "cpu", config, stats)
    metrics = evaluate(model, dataset, "cpu", config, stats)
    assert report["rules"]["moe"]["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-6)
    assert report["rules"]["oracle"]["mIoU"] == pytest.approx(metrics["oracle"]["mIoU"], abs=1e-6)
    experts = report["experts"]
    assert [e["expert"] for e in experts] == [1, 2, 3]
    assert sum(e["owned_pixels"] for e in experts) == 6 * 32 * 64
    assert ("group_prior" in report["rules"]) == (mixing != "paper")
    assert ("oracle_expert1" in report["rules"]) == (mixing != "paper")
    if mixing != "paper":  # kept to the true group, a pixel expert 1 gets right stays right
        kept, alone = report["rules"]["oracle_expert1"]["per_class"], report["rules"]["expert1"]["per_class"]
        for a, b in zip(kept, alone, strict=True):
            assert b["Acc"] is None or a["Acc"] >= b["Acc"] - 1e-9
        assert report["rules"]["oracle_expert1"]["mAcc"] > report["rules"]["expert1"]["mAcc"]
    for e in experts:
        assert 0 <= e["selection_accuracy"] <= 100 and 0 <= e["ece"] <= 100


def tiny_run(tmp_path, **changes) -> tuple[list[str], object]:
    """train.py arguments of a two-iteration run of the synthetic config at 32x64, and its work dir."""
    values = json.loads(open("configs/deeplabv3plus_tiny_synthetic_cpu.json").read())
    values.update(
        synthetic_size=[32, 64],
        crop_size=[32, 32],
        synthetic_train_images=20,
        synthetic_val_images=2,
        batch_size=2,
        num_workers=0,
        **changes,
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    work = tmp_path / "run"
    return ["--config", str(path), "--work-dir", str(work), "--iters", "2", "--stage2-iters", "2", "--no-eval"], work


def test_stage2_alone_rebuilds_the_decision_maker_and_records_it(tmp_path):
    # The shipped configs' opposite of each field the flags below set, so each flag is seen to act.
    common, work = tiny_run(
        tmp_path,
        decision_kernel=1,
        stage2_holdout=0.25,
        expert_balance=1.0,
        expert_reweight=False,
        select_balance=True,
    )
    assert train.main([*common, "--expert-reweight"]) == 0
    first = json.loads((work / "final" / "config.json").read_text())
    assert first["decision_kernel"] == 1 and first["stage2_holdout"] == 0.25 and first["expert_balance"] == 1.0
    assert first["expert_reweight"] is True
    assert train.main([*common, "--stage", "2", "--decision-kernel", "3", "--no-select-balance"]) == 0
    second = json.loads((work / "final" / "config.json").read_text())
    assert second["decision_kernel"] == 3 and second["select_balance"] is False
    assert second["stage2_holdout"] == 0.25  # fixed by stage 1
    from medoe.checkpoint import load_checkpoint

    model = load_checkpoint(work / "final").model
    assert model.decision.net[0].kernel_size == (3, 3)


def nested_model(**changes):
    config = ModelConfig(
        **{
            "backbone": "tiny",
            "decoder_channels": 8,
            "decision_hidden": 8,
            "num_classes": 4,
            "mixing": "nested",
            **changes,
        }
    )
    model = MEDOE(config)
    model.set_groups([[0], [1], [2, 3]])
    return model


def tiny_val_split(**changes):
    """A 14-class tiny network's run (4 `val` images unless changed), its `val` set and its class statistics."""
    from medoe.class_stats import ClassStats

    values = dict(
        backbone="tiny",
        decoder_channels=8,
        decision_hidden=8,
        num_classes=14,
        mixing="nested",
        synthetic_size=[32, 64],
        synthetic_val_images=4,
        crop_size=[32, 32],
    )
    config = TrainConfig.from_dict({**values, **changes})
    dataset = get_dataset(config, "val")
    stats = ClassStats.from_label_maps((dataset.label_map(i) for i in range(len(dataset))), dataset.class_names)
    return config, dataset, stats


def test_group_prior_is_the_chain_rule_by_hand():
    model = nested_model()
    # One pixel; expert 1 over all 4 classes, expert 2 over {1, 2, 3}, expert 3 over {2, 3}.
    probs = torch.tensor([[0.6, 0.2, 0.15, 0.05], [0.1, 0.5, 0.3, 0.1], [0.3, 0.1, 0.2, 0.4]]).view(1, 3, 4, 1, 1)
    prior = model.group_prior_logits(probs).exp().flatten()
    r1 = 0.4 / 1.0  # expert 1: P(y in S_2)
    r2 = 0.4 / 0.9  # expert 2: P(y in S_3 | y in S_2)
    torch.testing.assert_close(prior, torch.tensor([1 - r1, r1 * (1 - r2), r1 * r2]), atol=1e-5, rtol=0)
    # Expert k contributes its own group only: expert 3's {2, 3} renormalised, expert 1's class 0 alone.
    kept = model.expert_distributions(probs)[0, :, :, 0, 0]
    torch.testing.assert_close(kept[2], torch.tensor([0, 0, 1 / 3, 2 / 3]), atol=1e-6, rtol=0)
    torch.testing.assert_close(kept[0], torch.tensor([1.0, 0, 0, 0]), atol=1e-6, rtol=0)
    # The untrained decision maker adds nothing: the MOE starts as the chain rule.
    torch.testing.assert_close(model.selection_logits(probs), model.group_prior_logits(probs))


def test_refine_prior_is_expert_ones_group_mass_and_refines_inside_groups():
    model = nested_model(mixing="refine")
    probs = torch.tensor([[0.6, 0.2, 0.15, 0.05], [0.1, 0.5, 0.3, 0.1], [0.3, 0.1, 0.2, 0.4]]).view(1, 3, 4, 1, 1)
    prior = model.group_prior_logits(probs).exp().flatten()
    torch.testing.assert_close(prior, torch.tensor([0.6, 0.2, 0.2]), atol=1e-6, rtol=0)  # groups {0}, {1}, {2, 3}
    torch.testing.assert_close(model.selection_logits(probs), model.group_prior_logits(probs))
    # p = p_1(G_k) p_k(c | G_k): the tail group's 0.2 is split 1:2 as expert 3 says, not 3:1 as expert 1 does.
    mixed = model.mixture(probs).probs.flatten()
    torch.testing.assert_close(mixed, torch.tensor([0.6, 0.2, 0.2 / 3, 0.4 / 3]), atol=1e-6, rtol=0)
    # Experts that agree with expert 1 give expert 1's distribution back.
    same = probs[:, :1].expand(1, 3, 4, 1, 1)
    torch.testing.assert_close(model.mixture(same).probs, probs[:, 0], atol=1e-6, rtol=0)


def test_blend_within_mixes_expert_ones_distribution_into_each_later_group_by_hand():
    model = nested_model(mixing="refine", blend_within=True)
    probs = torch.tensor([[0.6, 0.2, 0.15, 0.05], [0.1, 0.5, 0.3, 0.1], [0.3, 0.1, 0.2, 0.4]]).view(1, 3, 4, 1, 1)
    assert model.decision.net[-1].out_channels == 3 + 2  # K selection logits, K-1 blend logits
    torch.testing.assert_close(model.selection_logits(probs), model.group_prior_logits(probs))
    # Zero blend logits: the tail group {2, 3} is the average of expert 1's 3:1 and expert 3's 1:2.
    tail = 0.5 * torch.tensor([0.75, 0.25]) + 0.5 * torch.tensor([1 / 3, 2 / 3])
    torch.testing.assert_close(
        model.mixture(probs).probs.flatten(), torch.tensor([0.6, 0.2, *(0.2 * tail)]), atol=1e-6, rtol=0
    )
    bias = model.decision.net[-1].bias
    with torch.no_grad():
        bias[3:] = 30.0  # trust expert 1 inside every group: the mixture is expert 1 itself
    torch.testing.assert_close(model.mixture(probs).probs, probs[:, 0], atol=1e-6, rtol=0)
    with torch.no_grad():
        bias[3:] = -30.0  # trust the specialists: refine's mixture
    refine = nested_model(mixing="refine")
    torch.testing.assert_close(model.mixture(probs).probs, refine.mixture(probs).probs, atol=1e-6, rtol=0)
    assert model.mixture(probs).weights.shape == (1, 3, 1, 1)  # the served weights stay K channels


def test_blend_within_needs_groups_and_training_needs_the_output_loss():
    with pytest.raises(ValueError, match=r"blend_within=True needs mixing='nested' or 'refine'"):
        ModelConfig(mixing="paper", blend_within=True)
    args = train.get_args(["--work-dir", "w", "--mixing", "refine", "--blend-within", "--stage2-loss", "selection"])
    with pytest.raises(ValueError, match=r"blend_within=True needs stage2_loss='output', got 'selection': only that"):
        train.config_from_args(args)
    # A network-only checkpoint config (the run's fields at their defaults) stays loadable.
    TrainConfig(network=ModelConfig(mixing="refine", blend_within=True), stage2_loss="selection").validate()


def test_nested_forward_is_a_distribution_and_the_paper_mixing_is_unchanged():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 48) * 255
    nested = nested_model()
    result = nested(images)
    torch.testing.assert_close(result.probs.sum(1), torch.ones(2, 32, 48), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        result.expert_weights.sum(1), torch.ones_like(result.expert_weights[:, 0]), atol=1e-5, rtol=0
    )
    paper = MEDOE(nested.config.replace(mixing="paper"))
    paper.load_state_dict(nested.state_dict())
    probs = paper.expert_probs(images)
    assert torch.equal(paper.expert_distributions(probs), probs)
    torch.testing.assert_close(paper.selection_logits(probs), paper.decision(probs))


def test_benchmark_report_names_every_section_and_goal():
    from bench.longtail_report import goals_for, markdown
    from bench.report import machine_info
    from medoe.model import BaselineModel

    config, dataset, stats = tiny_val_split()
    torch.manual_seed(0)
    runs = {}
    for name in ("baseline", "reweight"):
        run = config.replace(model=name)
        runs[name] = {
            "metrics": evaluate(BaselineModel(run.network), dataset, "cpu", run, stats),
            "params": 1,
            "config": run.to_dict(),
            "images": len(dataset),
        }
    for name, alpha in (("medoe_paper", 0.2), ("medoe", 0.2), ("medoe_alpha0", 0.0)):
        run = config.replace(alpha=alpha)
        model = MEDOE(run.network)
        model.set_groups(stats.groups(config.network.group_thresholds))
        diagnostics = expert_diagnostics(model, dataset, "cpu", run, stats)
        runs[name] = {
            "metrics": {**diagnostics["rules"]["moe"], "oracle": diagnostics["rules"]["oracle"]},
            "diagnostics": diagnostics,
            "diagnostics_stage2_images": diagnostics["experts"],
            "params": 2,
            "config": run.to_dict(),
            "images": len(dataset),
        }
    goals = goals_for("streets", runs)
    assert [g["name"] for g in goals] == [
        "streets_medoe_mIoU_minus_reweight",
        "streets_medoe_tail_mAcc_minus_reweight",
        "streets_medoe_mIoU_minus_baseline",
        "streets_medoe_tail_mAcc_minus_baseline",
        "streets_medoe_oracle_gain_recovered",
    ]
    report = {
        "machine": machine_info(),
        "date": "today",
        "command": "python -m bench.longtail",
        "split": "val",
        "domains": {
            "streets": {
                "config": "c",
                "train_seconds": {"medoe": 1.0},
                "runs": runs,
                "plot": "p.png",
                "groups": {"head": ["road"], "body": [], "tail": []},
            }
        },
        "alpha_plot": "a.png",
        "total_seconds": 60.0,
        "goals": goals,
    }
    text = "\n".join(markdown(report))
    for part in (
        "## streets",
        "| group_prior |",
        "| softmax_threshold |",
        "selection (held-out)",
        "## alpha (Figure 5)",
        "| 0 |",
        "| 0.2 |",
        "streets_medoe_oracle_gain_recovered",
    ):
        assert part in text
    assert goals_for("streets", {n: r for n, r in runs.items() if n != "reweight"}) == []


def test_output_balance_divides_out_the_prior_by_hand():
    model = nested_model(output_balance=0.5)
    model.set_class_prior([800, 200, 0, 50])  # class 2 has no pixels: it counts as the rarest present one (50)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1]).view(1, 4, 1, 1)
    scale = torch.tensor([800, 200, 50, 50], dtype=torch.float).pow(-0.5)
    expected = probs.flatten() * scale / (probs.flatten() * scale).sum()
    torch.testing.assert_close(model.balanced(probs).flatten(), expected, atol=1e-6, rtol=0)
    assert model.balanced(probs).flatten().argmax() == 2  # the head class no longer wins by its frequency
    # Off (the paper), nothing changes and the model carries no prior: old checkpoints load unchanged.
    plain = nested_model()
    assert torch.equal(plain.balanced(probs), probs) and "class_log_prior" not in plain.state_dict()


def test_output_balance_reaches_forward_evaluate_and_the_diagnostics():
    config, dataset, stats = tiny_val_split(output_balance=1.0)
    torch.manual_seed(0)
    model = MEDOE(config.network)
    model.set_groups(stats.groups(config.network.group_thresholds))
    model.set_class_prior(stats.pixel_counts)
    images = torch.stack([dataset[i][0] for i in range(2)])
    result = model(images)
    torch.testing.assert_close(result.probs.sum(1), torch.ones(2, 32, 64), atol=1e-5, rtol=0)
    unbalanced = MEDOE(config.network.replace(output_balance=0.0))
    unbalanced.load_state_dict({k: v for k, v in model.state_dict().items() if k != "class_log_prior"})
    assert not torch.equal(model(images).labels, unbalanced(images).labels)  # the adjustment moved decisions
    report = expert_diagnostics(model, dataset, "cpu", config, stats)
    metrics = evaluate(model, dataset, "cpu", config, stats)
    assert report["rules"]["moe"]["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-6)
    assert report["rules"]["oracle"]["mIoU"] == pytest.approx(metrics["oracle"]["mIoU"], abs=1e-6)


def test_stage2_gives_a_stage1_model_output_balance_and_decision_features_and_they_round_trip(tmp_path):
    common, work = tiny_run(tmp_path)
    assert train.main(common) == 0
    assert train.main([*common, "--stage", "2", "--output-balance", "0.5", "--decision-features"]) == 0
    from medoe.checkpoint import load_checkpoint
    from medoe.class_stats import ClassStats

    checkpoint = load_checkpoint(work / "final")
    assert checkpoint.config.output_balance == 0.5 and checkpoint.config.decision_features
    assert checkpoint.model.decision.project.in_channels == checkpoint.model.backbone.channels[-1]
    counts = torch.tensor(ClassStats.load(work / "class_stats.json").pixel_counts, dtype=torch.float64)
    counts = counts.clamp_min(counts[counts > 0].min())
    torch.testing.assert_close(checkpoint.model.class_log_prior, (counts / counts.sum()).log().float())
    # The adjustment and the feature-reading decision are part of the one exported graph:
    # onnxruntime agrees with eager.
    from export.to_onnx import main as export_main

    assert (
        export_main(
            [
                "--checkpoint",
                str(work / "final"),
                "--out",
                str(tmp_path / "m.onnx"),
                "--verify-sizes",
                "40x56",
                "--verify-batches",
                "1",
            ]
        )
        == 0
    )


@pytest.mark.parametrize("mixing, blend", [("paper", False), ("nested", False), ("refine", False), ("refine", True)])
def test_output_stage2_loss_is_the_served_prediction_nll(mixing, blend):
    # Stage 2's "output" loss scores exactly what forward() serves, class-weighted as the experts were.
    config, dataset, stats = tiny_val_split(
        mixing=mixing,
        blend_within=blend,
        model="medoe",
        stage2_loss="output",
        expert_reweight=True,
        select_balance=True,
    )
    torch.manual_seed(0)
    model = MEDOE(config.network)
    model.set_groups(stats.groups(config.network.group_thresholds))
    model.set_stage(2)
    loss = train.StageLoss(model, config, 2, stats)
    images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(2)]).float()
    labels = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(2)]).long()
    weights = inverse_sqrt_frequency_weights(stats.pixel_counts)  # not the selection-balance weights
    value, _ = loss(images, labels)
    torch.testing.assert_close(value, F.nll_loss(model(images).probs.log(), labels, weight=weights, ignore_index=255))
    value.backward()
    assert all(p.grad is not None for p in model.decision.parameters())
    assert all(p.grad is None for p in model.experts.parameters())


@pytest.mark.parametrize("support", ["set", "present"])
def test_stage1_loss_takes_the_kl_support_from_the_config(support):
    config, dataset, stats = tiny_val_split(model="medoe", kl_support=support, expert_reweight=True)
    torch.manual_seed(0)
    model = MEDOE(config.network)
    model.set_groups(stats.groups(config.network.group_thresholds))
    model.eval()  # no dropout: the loss and the check below see the same logits
    loss = train.StageLoss(model, config, 1, stats)
    images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(2)]).float()
    labels = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(2)]).long()
    value, _ = loss(images, labels)
    logits = [F.interpolate(z, labels.shape[-2:], mode="bilinear") for z in model.expert_logits(images)]
    sets, weights = model.expert_sets(), loss.expert_weights
    expected, _ = stage1_loss(
        logits, labels, sets, config.alpha, class_weights=weights, kl_present_only=support == "present"
    )
    other, _ = stage1_loss(logits, labels, sets, config.alpha, class_weights=weights, kl_present_only=support == "set")
    torch.testing.assert_close(value, expected)
    assert value.item() != pytest.approx(other.item(), rel=1e-4)  # two crops miss some class of every set


def test_without_its_aux_term_expert1_trains_on_the_reweight_loss():
    config, dataset, stats = tiny_val_split(model="medoe", expert_reweight=True)
    torch.manual_seed(0)
    model = MEDOE(config.network)
    model.set_groups(stats.groups(config.network.group_thresholds))
    model.eval()  # no dropout: the losses and the check below see the same logits
    images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(2)]).float()
    labels = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(2)]).long()
    _, paper = train.StageLoss(model, config, 1, stats)(images, labels)
    _, ablated = train.StageLoss(model, config.replace(expert1_aux=False), 1, stats)(images, labels)
    logits = F.interpolate(model.expert_logits(images)[0], labels.shape[-2:], mode="bilinear")
    reweight = weighted_ce(logits, labels, inverse_sqrt_frequency_weights(stats.pixel_counts)).item()
    assert ablated["expert1"] == pytest.approx(reweight, rel=1e-5) and paper["expert1"] > reweight + 1e-4
    assert paper["expert2"] == ablated["expert2"] and paper["expert3"] == ablated["expert3"]  # alpha acts on them


def test_output_stage2_loss_is_a_stage2_field(tmp_path):
    # A first run with the paper's stage 2 (the shipped configs' is the output loss with the blend).
    common, work = tiny_run(tmp_path, stage2_loss="selection", mixing="paper", blend_within=False)
    assert train.main(common) == 0
    assert json.loads((work / "final" / "config.json").read_text())["stage2_loss"] == "selection"
    assert train.main([*common, "--stage", "2", "--stage2-loss", "output", "--mixing", "refine"]) == 0
    second = json.loads((work / "final" / "config.json").read_text())
    assert second["stage2_loss"] == "output" and second["mixing"] == "refine"
    # Refine mixing is part of the one exported graph: onnxruntime agrees with eager. (The
    # shipped configs' blend is exported by the output_balance / decision_features test above.)
    from export.to_onnx import main as export_main

    out = str(tmp_path / "m.onnx")
    assert export_main(["--checkpoint", str(work / "final"), "--out", out, "--verify-sizes", "40x56"]) == 0
    # The blend is a stage-2 field too, and widens the decision maker by K-1 outputs.
    blend = ["--stage", "2", "--stage2-loss", "output", "--mixing", "refine", "--blend-within"]
    assert train.main([*common, *blend]) == 0
    assert json.loads((work / "final" / "config.json").read_text())["blend_within"]
    from medoe.checkpoint import load_checkpoint

    model = load_checkpoint(work / "final").model
    assert model.decision.net[-1].out_channels == 2 * model.num_experts - 1
