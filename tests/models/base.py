"""The contract every backbone x context-module pair honours (as segmentation_models.pytorch's
tests/models/base.py): subclasses set `backbone` and `context` and inherit every test."""

from __future__ import annotations

import pytest
import torch

from medoe.config import ModelConfig
from medoe.model import MEDOE, BaselineModel, build_model

NUM_CLASSES = 5
# One size a multiple of 32, one odd in both directions.
SIZES = [(64, 64), (67, 93)]


class ModelContract:
    backbone = "tiny"
    context = "aspp"
    decoder_channels = 16

    def config(self, **changes) -> ModelConfig:
        values = dict(
            backbone=self.backbone,
            context=self.context,
            num_classes=NUM_CLASSES,
            decoder_channels=self.decoder_channels,
            decision_hidden=8,
        )
        values.update(changes)
        return ModelConfig(**values)

    def medoe(self, k: int = 3) -> MEDOE:
        thresholds = {2: [0.8], 3: [0.8, 0.95], 4: [0.8, 0.875, 0.95]}[k]
        model = build_model(self.config(num_experts=k, group_thresholds=thresholds))
        # Classes 0..K-2 go to experts 1..K-1, the rest to the last expert.
        groups = [[i] for i in range(k - 1)] + [list(range(k - 1, NUM_CLASSES))]
        model.set_groups(groups)
        return model.eval()

    @staticmethod
    def images(n: int, size: tuple[int, int]) -> torch.Tensor:
        torch.manual_seed(0)
        return torch.rand(n, 3, *size) * 255

    @pytest.mark.parametrize("k", [2, 3, 4])
    @pytest.mark.parametrize("size", SIZES)
    def test_medoe_inference_shapes_and_dtypes(self, k, size):
        model = self.medoe(k)
        with torch.no_grad():
            out = model(self.images(2, size))
        assert out.labels.shape == (2, *size) and out.labels.dtype == torch.int64
        assert out.confidence.shape == (2, *size) and out.confidence.dtype == torch.float32
        assert out.probs.shape == (2, NUM_CLASSES, *size)
        n, kk, h, w = out.expert_weights.shape
        assert (n, kk) == (2, k) and h < size[0] and w < size[1]
        assert torch.allclose(out.expert_weights.sum(1), torch.ones(n, h, w), atol=1e-5)
        assert torch.allclose(out.probs.sum(1), torch.ones(2, *size), atol=1e-4)
        assert int(out.labels.min()) >= 0 and int(out.labels.max()) < NUM_CLASSES
        assert torch.equal(out.confidence, out.probs.max(1).values)

    @pytest.mark.parametrize("k", [2, 3, 4])
    def test_stage1_returns_every_experts_logits_at_one_resolution(self, k):
        model = self.medoe(k).train()
        logits = model.expert_logits(self.images(2, SIZES[1]))
        assert len(logits) == k
        assert all(z.shape == logits[0].shape for z in logits)
        assert logits[0].shape[:2] == (2, NUM_CLASSES)

    def test_oracle_takes_the_owning_experts_probabilities(self):
        model = self.medoe(3)
        images = self.images(1, SIZES[1])
        labels = torch.randint(0, NUM_CLASSES, (1, *SIZES[1]))
        labels[0, :3] = 255
        with torch.no_grad():
            out = model.oracle(images, labels)
            owner = model.expert_lut[labels.clamp(max=255)]
            owner[labels == 255] = 0
        assert out.labels.shape == labels.shape
        assert torch.equal(out.expert_weights.argmax(1), owner)

    @pytest.mark.parametrize("size", SIZES)
    def test_baseline_shapes(self, size):
        model = build_model(self.config(model="baseline")).eval()
        assert isinstance(model, BaselineModel)
        with torch.no_grad():
            out = model(self.images(3, size))
        assert out.labels.shape == (3, *size) and out.expert_weights is None
        assert torch.allclose(out.probs.sum(1), torch.ones(3, *size), atol=1e-4)

    def test_rejects_uint8_and_channels_last_input(self):
        model = self.medoe(2)
        with pytest.raises(ValueError, match="float"):
            model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
            model(torch.zeros(1, 32, 32, 3))
