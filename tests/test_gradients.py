"""Gradient flow: who trains what in stage 1 and stage 2."""

import torch

from medoe.config import ModelConfig
from medoe.model import build_model


def tiny_medoe(**changes):
    config = ModelConfig(
        backbone="tiny", context="aspp", num_classes=4, decoder_channels=16, decision_hidden=8, **changes
    )
    model = build_model(config)
    model.set_groups([[0], [1], [2, 3]])
    return model


def images():
    torch.manual_seed(0)
    return torch.rand(2, 3, 48, 64) * 255


def backbone_grads(model):
    return [p.grad for p in model.backbone.parameters()]


def test_stop_gradient_keeps_experts_2_to_k_out_of_the_backbone():
    model = tiny_medoe(stop_gradient=True).train()
    logits = model.expert_logits(images())
    sum(z.square().mean() for z in logits[1:]).backward()
    assert all(g is None for g in backbone_grads(model))
    assert all(p.grad is not None for p in model.experts[1].parameters())


def test_without_stop_gradient_every_expert_reaches_the_backbone():
    model = tiny_medoe(stop_gradient=False).train()
    logits = model.expert_logits(images())
    sum(z.square().mean() for z in logits[1:]).backward()
    assert any(g is not None and g.abs().sum() > 0 for g in backbone_grads(model))


def test_expert_1_trains_the_backbone_under_stop_gradient():
    model = tiny_medoe(stop_gradient=True).train()
    model.expert_logits(images())[0].square().mean().backward()
    assert all(g is not None for g in backbone_grads(model))


def test_stage2_changes_only_the_decision_maker():
    model = tiny_medoe()
    model.set_stage(2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        probs = model.expert_probs(images())
        model.selection_logits(probs).logsumexp(1).mean().backward()
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decision.") for k in changed), changed
    # BatchNorm running statistics of the frozen parts stay put too (eval mode in stage 2).
    assert not model.backbone.training and not model.experts.training and model.decision.training


def test_stage1_leaves_the_decision_maker_frozen():
    model = tiny_medoe()
    assert all(not p.requires_grad for p in model.decision.parameters())
    assert all(p.requires_grad for p in model.backbone.parameters())
