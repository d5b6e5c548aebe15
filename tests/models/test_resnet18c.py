from tests.models.base import ModelContract


class TestResNet18cDeepLabV3Plus(ModelContract):
    backbone = "resnet18c"
    context = "aspp"


class TestResNet18cPSPNet(ModelContract):
    backbone = "resnet18c"
    context = "ppm"


class TestResNet18cOCRNet(ModelContract):
    backbone = "resnet18c"
    context = "ocr"
