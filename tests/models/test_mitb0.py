from tests.models.base import ModelContract


class TestMitB0SegFormer(ModelContract):
    backbone = "mit_b0"
    context = "mlp"


class TestTinySegFormerHead(ModelContract):  # the all-MLP decoder on a CNN's stages too
    backbone = "tiny"
    context = "mlp"
