"""Everything of the TensorRT step that runs without TensorRT: profiles, arguments, calibration data, config."""

import sys
import types

import cv2
import numpy as np
import onnx
import pytest
import torch

from export import calibration, to_onnx, to_trt
from export.calibration import CalibrationImages, cover_and_crop
from export.to_trt import check_profile, check_shapes, parse_shape, write_plan_config
from tests.test_export import assert_config_matches_graph, make_checkpoint, parse_config

PROFILE = ["--min-shape", "1x256x256x3", "--opt-shape", "1x512x1024x3", "--max-shape", "4x1024x2048x3"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    out = root / "repo" / "medoe" / "1" / "model.onnx"
    assert to_onnx.main(["--checkpoint", str(make_checkpoint(root / "ckpt")), "--out", str(out), "--no-verify"]) == 0
    return out


def test_parse_shape():
    assert parse_shape("1x512x1024x3") == (1, 512, 1024, 3)
    assert parse_shape("4X64X64X3") == (4, 64, 64, 3)
    for bad, message in [
        ("1x512x1024", "NxHxWx3"),
        ("1x512x1024x3x1", "NxHxWx3"),
        ("0x64x64x3", "positive"),
        ("1x-4x64x3", "positive"),
        ("axbxcx3", "NxHxWx3"),
        ("1x3x512x1024", "3 RGB channels"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_shape(bad)


def test_check_profile():
    low, opt, high = (1, 256, 256, 3), (1, 512, 1024, 3), (4, 1024, 2048, 3)
    check_profile(low, opt, high, [0, 0, 0, 3])
    check_profile(opt, opt, opt)
    with pytest.raises(ValueError, match="H is 512, 256, 1024"):
        check_profile((1, 512, 256, 3), (1, 256, 1024, 3), high)
    with pytest.raises(ValueError, match="N is 1, 8, 4"):
        check_profile(low, (8, 512, 1024, 3), high)
    with pytest.raises(ValueError, match="3 dimensions"):
        check_profile(low, opt, high, [0, 0, 3])
    with pytest.raises(ValueError, match="fixes N = 1"):
        check_profile(low, opt, high, [1, 0, 0, 3])


def test_check_shapes_stay_inside_the_profile_and_include_an_odd_size():
    low, opt, high = (1, 256, 256, 3), (1, 512, 1024, 3), (4, 1024, 2048, 3)
    shapes = check_shapes(low, opt, high)
    assert opt in shapes and low in shapes and len(shapes) == 3
    for shape in shapes:
        check_profile(low, shape, high)
    assert any(s[1] % 2 and s[2] % 2 and s[0] == 4 for s in shapes)
    assert check_shapes(opt, opt, opt) == [opt]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--min-shape", "1x256x256"], "NxHxWx3"),
        (["--opt-shape", "1x512x1024x4"], "3 RGB channels"),
        (["--min-shape", "2x256x256x3"], "min <= opt <= max"),
        (["--int8"], "--int8 needs --calib-dir"),
        (["--workspace-gb", "0"], "--workspace-gb must be positive"),
        (["--fp16", "--bogus"], "unrecognized arguments"),
    ],
)
def test_argument_errors_exit_2_in_one_line(tmp_path, capsys, exported, args, message):
    assert_exit_2(capsys, ["--onnx", str(exported), "--out", str(tmp_path / "m.plan"), *PROFILE, *args], message)


def test_input_errors_exit_2_in_one_line(tmp_path, capsys, exported):
    out = str(tmp_path / "m.plan")
    assert_exit_2(capsys, ["--onnx", str(tmp_path / "absent.onnx"), "--out", out], "ONNX file not found")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not protobuf\xff" * 10)
    assert_exit_2(capsys, ["--onnx", str(tmp_path / "junk.onnx"), "--out", out], "not a readable ONNX file")
    (tmp_path / "empty").mkdir()
    assert_exit_2(
        capsys,
        ["--onnx", str(exported), "--out", out, "--int8", "--calib-dir", str(tmp_path / "empty")],
        "holds 0 images",
    )
    (tmp_path / "file").write_text("in the way")
    assert_exit_2(capsys, ["--onnx", str(exported), "--out", str(tmp_path / "file" / "m.plan")], "cannot write")


def assert_exit_2(capsys, argv, message):
    try:
        code = to_trt.main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_without_tensorrt_exits_2_naming_it(tmp_path, capsys, exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert_exit_2(capsys, ["--onnx", str(exported), "--out", str(tmp_path / "m.plan")], "TensorRT is not available")
    assert not (tmp_path / "m.plan").exists()


def test_without_gpu_exits_2_naming_it(tmp_path, capsys, exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_exit_2(capsys, ["--onnx", str(exported), "--out", str(tmp_path / "m.plan")], "no CUDA GPU")


def test_plan_config_comes_from_the_onnx_graph(tmp_path, exported):
    shapes = ((1, 256, 256, 3), (2, 512, 1024, 3), (4, 1024, 2048, 3))
    assert write_plan_config(onnx.load(str(exported)), tmp_path / "plan.plan", shapes) is None  # not a Triton layout
    path = write_plan_config(onnx.load(str(exported)), tmp_path / "repo" / "medoe_trt" / "1" / "model.plan", shapes)
    config = parse_config(path)
    assert config.name == "medoe_trt" and config.max_batch_size == 4
    assert_config_matches_graph(config, onnx.load(str(exported)), "tensorrt_plan")
    assert config.model_warmup[0].batch_size == 2 and list(config.model_warmup[0].inputs["images"].dims) == [
        512,
        1024,
        3,
    ]


def write_image(path, height, width, bgr=(0, 0, 255)):
    cv2.imwrite(str(path), np.full((height, width, 3), bgr, np.uint8))


def test_calibration_batches_are_uint8_nhwc_rgb_of_the_opt_shape(tmp_path):
    sizes = [(40, 60), (100, 50), (64, 64), (300, 200), (33, 47)]
    for index, (h, w) in enumerate(sizes):
        write_image(tmp_path / f"{index}.{'png' if index % 2 else 'jpg'}", h, w)
    (tmp_path / "notes.txt").write_text("not an image")
    images = CalibrationImages(tmp_path, (2, 32, 48, 3))
    batches = list(images)
    assert len(images) == len(batches) == 2  # 5 images: the partial third batch is dropped
    for batch in batches:
        assert batch.dtype == np.uint8 and batch.shape == (2, 32, 48, 3) and batch.flags.c_contiguous
        assert np.abs(batch.astype(int) - [255, 0, 0]).max() <= 2  # cv2's BGR red arrives as RGB red
    assert len(CalibrationImages(tmp_path, (1, 32, 48, 3), limit=3)) == 3


def test_cover_and_crop_keeps_the_centre_without_distortion():
    image = np.zeros((50, 100, 3), np.uint8)
    image[:, 50:] = 255  # left half black, right half white
    crop = cover_and_crop(image, 50, 50)
    assert crop.shape == (50, 50, 3)
    assert (crop[:, :25] == 0).all() and (crop[:, 25:] == 255).all()
    assert cover_and_crop(image, 100, 400).shape == (100, 400, 3)  # upscaled to cover, then cropped


def test_calibration_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        CalibrationImages(tmp_path / "absent", (1, 8, 8, 3))
    write_image(tmp_path / "a.png", 8, 8)
    with pytest.raises(ValueError, match="holds 1 images"):
        CalibrationImages(tmp_path, (2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        CalibrationImages(tmp_path, (1, 3, 8, 8))
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read calibration image"):
        list(CalibrationImages(tmp_path, (2, 8, 8, 3)))


def test_entropy_calibrator_exists_only_with_tensorrt():
    assert hasattr(calibration, "EntropyCalibrator") == (calibration.trt is not None)


def test_fp16_keeps_normalisation_softmax_reductions_and_exp_in_fp32():
    from export.trt_precision import is_fp32_layer

    for kept in (("NORMALIZATION", None), ("SOFTMAX", None), ("REDUCE", None), ("UNARY", "EXP"), ("UNARY", "SQRT")):
        assert is_fp32_layer(*kept), kept
    for fast in (("CONVOLUTION", None), ("MATRIX_MULTIPLY", None), ("ELEMENTWISE", None), ("UNARY", "ABS")):
        assert not is_fp32_layer(*fast), fast


def test_a_segformer_graph_holds_the_ops_fp16_keeps_in_fp32(tmp_path):
    # What --fp16 protects must be in the graphs it is for: the MiT's LayerNorms and attention
    # softmaxes, and MEDOE's mixing softmaxes (decomposed into Exp / ReduceSum by the exporter).
    from export.trt_precision import fp32_onnx_ops

    out = tmp_path / "repo" / "medoe" / "1" / "model.onnx"
    checkpoint = make_checkpoint(tmp_path / "ckpt", "medoe", "mlp", "mit_b0")
    assert to_onnx.main(["--checkpoint", str(checkpoint), "--out", str(out), "--no-verify"]) == 0
    ops = fp32_onnx_ops(onnx.load(str(out)))
    assert ops["LayerNormalization"] + ops["ReduceMean"] >= 8, ops  # 8 blocks x 2 norms in mit_b0, at least
    assert ops["Softmax"] + ops["Exp"] >= 8, ops  # one attention softmax per block
