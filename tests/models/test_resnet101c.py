from tests.models.base import ModelContract


class TestResNet101cDeepLabV3Plus(ModelContract):
    backbone = "resnet101c"
    context = "aspp"


class TestResNet101cPSPNet(ModelContract):
    backbone = "resnet101c"
    context = "ppm"


class TestResNet101cOCRNet(ModelContract):
    backbone = "resnet101c"
    context = "ocr"
