from tests.models.base import ModelContract


class TestTinyDeepLabV3Plus(ModelContract):
    backbone = "tiny"
    context = "aspp"


class TestTinyPSPNet(ModelContract):
    backbone = "tiny"
    context = "ppm"


class TestTinyOCRNet(ModelContract):
    backbone = "tiny"
    context = "ocr"
