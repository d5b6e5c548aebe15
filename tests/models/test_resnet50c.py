from tests.models.base import ModelContract


class TestResNet50cDeepLabV3Plus(ModelContract):
    backbone = "resnet50c"
    context = "aspp"


class TestResNet50cPSPNet(ModelContract):
    backbone = "resnet50c"
    context = "ppm"


class TestResNet50cOCRNet(ModelContract):
    backbone = "resnet50c"
    context = "ocr"
