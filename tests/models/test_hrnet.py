from tests.models.base import ModelContract


class TestHRNetW18SmallOCRNet(ModelContract):  # OCRNet as the paper runs it, on the smallest HRNetV2
    backbone = "hrnet_w18_small"
    context = "ocr"
