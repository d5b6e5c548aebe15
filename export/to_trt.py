"""Build a TensorRT engine from the exported ONNX graph, check it against onnxruntime, write it and its Triton config.

    python export/to_trt.py --onnx model_repository/medoe/1/model.onnx --out model_repository/medoe_trt/1/model.plan \
        --min-shape 1x256x256x3 --opt-shape 1x512x1024x3 --max-shape 4x1024x2048x3 \
        [--fp16] [--int8 --calib-dir DIR] [--timing-cache FILE] [--workspace-gb 4]

Needs an NVIDIA GPU, the `tensorrt` package and a CUDA build of torch (the check's buffers);
without them it exits 2 saying which is missing. The plan is written only after the check passes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

if __package__ in (None, ""):  # run as `python export/to_trt.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from export.calibration import CalibrationImages
from export.graph import random_images
from export.parity import Parity, run_onnxruntime
from export.triton_config import triton_model_dir, write_triton_config
from export.trt_precision import keep_fp32
from medoe.cli import CliParser, parse_dims
from medoe.contract import IMAGES, read_graph_metadata
from medoe.io import atomic_write_bytes, check_writable
from serving.ort_memory import cpu_session

Shape = tuple[int, int, int, int]
# Engine vs onnxruntime (fp32 on CPU): max |delta| of float outputs, label agreement.
TOLERANCES = {"fp32": (1e-3, 0.999), "tf32": (1e-2, 0.995), "fp16": (2e-2, 0.99), "int8": (1e-1, 0.95)}


class Missing(RuntimeError):
    """A requirement of this machine (GPU, TensorRT, CUDA torch) is absent: exit 2."""


def parse_shape(text: str) -> Shape:
    shape = parse_dims(text, "NxHxWx3", "shape")
    if shape[3] != 3:
        raise ValueError(f"shape {text!r}: the last dimension is the 3 RGB channels (images are NHWC), got {shape[3]}")
    return shape  # type: ignore[return-value]


def check_profile(low: Shape, opt: Shape, high: Shape, graph_dims: list[int] | None = None) -> None:
    names = "NHWC"
    for axis in range(4):
        if not low[axis] <= opt[axis] <= high[axis]:
            raise ValueError(
                f"profile needs min <= opt <= max in every dimension; {names[axis]} is "
                f"{low[axis]}, {opt[axis]}, {high[axis]}"
            )
    if graph_dims is not None:
        if len(graph_dims) != 4:
            raise ValueError(f"the ONNX input {IMAGES!r} has {len(graph_dims)} dimensions, expected 4 (NHWC)")
        for axis, fixed in enumerate(graph_dims):
            if fixed > 0 and not low[axis] == opt[axis] == high[axis] == fixed:
                raise ValueError(f"the ONNX input fixes {names[axis]} = {fixed}; the profile must use it everywhere")


def check_shapes(low: Shape, opt: Shape, high: Shape) -> list[Shape]:
    """The engine is checked at opt, at min, and at an odd size between with the largest batch."""

    def odd_between(a: int, b: int) -> int:
        middle = (a + b) // 2
        return middle if middle % 2 or middle + 1 > b else middle + 1

    between = (high[0], odd_between(low[1], opt[1]), odd_between(low[2], opt[2]), 3)
    return list(dict.fromkeys([opt, low, between]))


def load_tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as err:
        raise Missing(
            f"TensorRT is not available ({err}); build engines on a machine with an NVIDIA GPU "
            "after `pip install tensorrt`"
        ) from None
    try:
        import torch
    except ImportError:
        raise Missing("torch is not installed") from None
    if not torch.cuda.is_available():
        raise Missing(f"no CUDA GPU is visible to torch {torch.__version__} (a CUDA build and a driver are needed)")
    return trt


def build_engine(trt, onnx_path: Path, shapes: tuple[Shape, Shape, Shape], args, calibrator=None) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; older versions need the flag.
    flags = (
        0 if int(trt.__version__.split(".")[0]) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    )
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        for index in range(parser.num_errors):
            print(f"  ONNX parser: {parser.get_error(index)}")
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path} ({parser.num_errors} error(s) above)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(args.workspace_gb * 2**30))
    # A shape profile is the range of input shapes the engine accepts: every dynamic dimension
    # gets min and max (requests outside are refused) and opt, the shape TensorRT times its
    # kernels for; one profile here, so one engine serves every batch and size in the range.
    profile = builder.create_optimization_profile()
    profile.set_shape(IMAGES, *shapes)
    config.add_optimization_profile(profile)
    if not args.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 convolutions drift by ~1e-3 from fp32
    if args.fp16 or args.int8:
        config.set_flag(trt.BuilderFlag.FP16)  # with --int8: the fallback for layers without int8 kernels
        # LayerNorm, softmax, reductions and exp stay fp32 (export/trt_precision.py says why).
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        print(f"  kept in fp32: {len(keep_fp32(trt, network))} layers (normalisation, softmax, reductions, exp)")
    if args.int8:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        calibration = builder.create_optimization_profile()
        calibration.set_shape(IMAGES, shapes[1], shapes[1], shapes[1])  # calibrate at opt
        config.set_calibration_profile(calibration)
    cache_path = Path(args.timing_cache) if args.timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if calibrator is not None and calibrator.error is not None:
        raise RuntimeError(f"calibration failed: {calibrator.error}")
    if engine is None:
        raise RuntimeError("TensorRT could not build the engine (see its log above)")
    if cache_path:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(engine)


class EngineRunner:
    def __init__(self, trt, plan: bytes):
        import torch

        self.trt, self.torch = trt, torch
        # The logger and runtime must outlive the engine deserialised from them.
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialise the engine it just built")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {
            getattr(trt, k): v
            for k, v in {
                "float32": torch.float32,
                "float16": torch.float16,
                "int32": torch.int32,
                "int64": torch.int64,
                "int8": torch.int8,
                "uint8": torch.uint8,
                "bool": torch.bool,
            }.items()
            if hasattr(trt, k)
        }

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        device_images = torch.from_numpy(images).cuda()
        self.context.set_input_shape(IMAGES, tuple(images.shape))
        self.context.set_tensor_address(IMAGES, device_images.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = torch.empty(shape, dtype=self.dtypes[self.engine.get_tensor_dtype(name)], device="cuda")
            self.context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for input {images.shape}")
        stream.synchronize()
        return {name: t.cpu().numpy() for name, t in results.items()}


def precision(args) -> str:
    return "int8" if args.int8 else "fp16" if args.fp16 else "tf32" if args.tf32 else "fp32"


def get_args(argv=None):
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", required=True, help="graph from export/to_onnx.py")
    parser.add_argument("--out", required=True, help="the .plan file to write")
    parser.add_argument("--min-shape", default="1x256x256x3", help="smallest NxHxWx3 the engine accepts")
    parser.add_argument("--opt-shape", default="1x512x1024x3", help="the shape kernels are tuned for")
    parser.add_argument("--max-shape", default="4x1024x2048x3", help="largest NxHxWx3 the engine accepts")
    parser.add_argument(
        "--fp16", action="store_true", help="allow fp16 kernels (LayerNorm, softmax, reductions and exp stay fp32)"
    )
    parser.add_argument("--int8", action="store_true", help="int8 (with fp16 fallback), calibrated on --calib-dir")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 layers (faster, ~1e-3 off)")
    parser.add_argument("--calib-dir", help="images for int8 calibration, resized and cropped to --opt-shape")
    parser.add_argument("--calib-images", type=int, default=512, help="use at most this many calibration images")
    parser.add_argument("--calib-cache", help="calibration cache (default: beside --out)")
    parser.add_argument("--timing-cache", help="read (if present) and update this timing cache: faster rebuilds")
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="builder scratch memory limit")
    parser.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare the engine with onnxruntime before writing it",
    )
    parser.add_argument("--atol", type=float, help="max |delta| of float outputs (default by precision)")
    parser.add_argument("--min-agreement", type=float, help="label agreement fraction (default by precision)")
    parser.add_argument(
        "--triton-config",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write <repo>/<model>/config.pbtxt when --out is <repo>/<model>/<version>/model.plan",
    )
    return parser.parse_args(argv)


def write_plan_config(onnx_model: onnx.ModelProto, plan_path: Path, shapes: tuple[Shape, Shape, Shape]) -> Path | None:
    """The plan's config takes names, dtypes and dims from the ONNX it was built from; batch up to max."""
    model_dir = triton_model_dir(plan_path)
    if model_dir is None:
        return None
    opt = shapes[1]
    return write_triton_config(
        onnx_model,
        model_dir,
        "tensorrt_plan",
        source=f"{plan_path.name} (built from ONNX)",
        max_batch_size=shapes[2][0],
        warmup=(opt[0], opt[1], opt[2]),
    )


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = get_args(argv)
    onnx_path, out = Path(args.onnx), Path(args.out)
    try:
        shapes = (parse_shape(args.min_shape), parse_shape(args.opt_shape), parse_shape(args.max_shape))
        if args.workspace_gb <= 0:
            raise ValueError(f"--workspace-gb must be positive, got {args.workspace_gb}")
        if args.int8 and not args.calib_dir:
            raise ValueError("--int8 needs --calib-dir with representative images")
        if not onnx_path.is_file():
            raise ValueError(f"ONNX file not found: {onnx_path}")
        try:
            graph = onnx.load(str(onnx_path), load_external_data=False)
        except Exception as err:
            raise ValueError(f"{onnx_path} is not a readable ONNX file ({type(err).__name__})") from None
        inputs = [v for v in graph.graph.input if v.name == IMAGES]
        if not inputs:
            raise ValueError(f"{onnx_path} has no input named {IMAGES!r}; export it with export/to_onnx.py")
        check_profile(*shapes, [d.dim_value for d in inputs[0].type.tensor_type.shape.dim])
        metadata = read_graph_metadata(graph)  # class names and groups for the parity report
        images = None
        if args.int8:
            images = CalibrationImages(args.calib_dir, shapes[1], args.calib_images)
        check_writable(out)
    except ValueError as err:
        return fail(str(err), 2)
    except OSError as err:
        return fail(f"cannot write {out}: {err.strerror or err}", 2)
    try:
        trt = load_tensorrt()
    except Missing as err:
        return fail(str(err), 2)

    mode = precision(args)
    calibrator = None
    if images is not None:
        from export.calibration import EntropyCalibrator

        calibrator = EntropyCalibrator(images, args.calib_cache or out.with_suffix(".calib"))
    tic = time.perf_counter()
    try:
        plan = build_engine(trt, onnx_path, shapes, args, calibrator)
    except RuntimeError as err:
        return fail(str(err), 1)
    print(
        f"built {mode} engine from {onnx_path} in {time.perf_counter() - tic:.0f} s, profile "
        + " / ".join("x".join(map(str, s)) for s in shapes)
    )
    if args.check:
        atol, agreement = TOLERANCES[mode]
        parity = Parity(
            metadata.class_names,
            metadata.groups,
            args.atol if args.atol is not None else atol,
            args.min_agreement if args.min_agreement is not None else agreement,
        )
        engine, session = EngineRunner(trt, plan), cpu_session(onnx_path)
        names = [o.name for o in graph.graph.output]
        for index, shape in enumerate(check_shapes(*shapes)):
            sample = random_images(*shape[:3], seed=index)
            parity.add(run_onnxruntime(session, sample, names), engine(sample), "x".join(map(str, shape)))
        print(
            f"engine vs onnxruntime ({mode}) at "
            + ", ".join("x".join(map(str, s)) for s in check_shapes(*shapes))
            + " (agreement per onnxruntime label):"
        )
        print("\n".join(parity.report()))
        if parity.failures():
            return fail(f"engine check failed, {out} not written: {'; '.join(parity.failures())}", 1)
    try:
        atomic_write_bytes(out, plan)
        print(f"wrote {out} ({len(plan) / 2**20:.1f} MiB)")
        config = write_plan_config(graph, out, shapes) if args.triton_config else None
        if config is not None:
            print(f"wrote {config}")
    except OSError as err:
        return fail(f"cannot write {err.filename or out}: {err.strerror or err}", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
