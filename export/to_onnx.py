"""Export a checkpoint to one ONNX graph (SPEC §9), check it against PyTorch, write it atomically.

    python -m export.to_onnx --checkpoint work/run/final --out model_repository/medoe/1/model.onnx
    python export/to_onnx.py --checkpoint work/base/final --out model.onnx --outputs labels confidence probs
    python -m export.to_onnx --checkpoint work/run/final --out int8.onnx --int8-calib-dir data/train_images

The graph is verified with onnxruntime before anything is written: on a parity failure the
command exits 1 and leaves --out as it was. Inside a Triton layout
(`<repo>/<model>/<version>/model.onnx`) the model's config.pbtxt is generated beside it.
With --int8-calib-dir the graph written is the int8 QDQ one (export/quantize.py), checked
against PyTorch with the looser --int8-* thresholds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python export/to_onnx.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from export.calibration import CalibrationImages
from export.exporter import EXPORTERS, ExportError, export_onnx
from export.graph import build_graph, graph_metadata, run_model
from export.parity import Parity, run_onnxruntime, verify
from export.quantize import INT8_ATOL, INT8_MIN_AGREEMENT, INT8_REAL_IMAGES, parity_on_images, quantize_int8
from export.triton_config import parse_warmup, triton_model_dir, write_triton_config
from medoe.checkpoint import CheckpointError, load_checkpoint
from medoe.cli import CliParser, parse_hw
from medoe.contract import GRAPH_OUTPUTS
from medoe.io import atomic_write_bytes, check_writable
from serving.ort_memory import cpu_session

DEFAULT_SIZES = ((96, 128), (67, 93), (160, 224))  # 67x93: not a multiple of the backbone's stride


def get_args(argv=None) -> argparse.Namespace:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (model.safetensors + config.json)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--outputs", nargs="+", choices=GRAPH_OUTPUTS, help="default: labels confidence (+ expert_weights for MEDOE)"
    )
    parser.add_argument("--opset", type=int, help="ONNX opset (>= 17; default 17, 18 for dynamo)")
    parser.add_argument(
        "--exporter", choices=EXPORTERS, default="torchscript", help="torch.onnx path: legacy tracer or torch.export"
    )
    parser.add_argument(
        "--decompose-softmax",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rewrite channel Softmax as exp/sum (faster in onnxruntime, same outputs)",
    )
    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=True, help="onnxruntime vs PyTorch before writing"
    )
    parser.add_argument("--verify-sizes", nargs="+", type=parse_hw, default=list(DEFAULT_SIZES), metavar="HxW")
    parser.add_argument("--verify-batches", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--atol", type=float, default=1e-4, help="max |delta| of float outputs")
    parser.add_argument("--min-agreement", type=float, default=0.9999, help="label agreement, as a fraction")
    parser.add_argument(
        "--triton-config",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write <repo>/<model>/config.pbtxt when --out is <repo>/<model>/<version>/model.onnx",
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="Triton max_batch_size")
    parser.add_argument("--max-queue-delay-us", type=int, default=100, help="Triton dynamic batcher delay")
    parser.add_argument("--warmup", help="Triton warmup NxHxW, e.g. 1x512x1024")
    int8 = parser.add_argument_group("int8 (export/quantize.py: static QDQ quantization for CPU)")
    int8.add_argument("--int8-calib-dir", help="write the int8 QDQ graph calibrated on these images, not fp32")
    int8.add_argument("--int8-calib-images", type=int, default=32, help="calibration images (sorted file names)")
    int8.add_argument("--int8-calib-size", type=parse_hw, default=(256, 512), metavar="HxW", help="images cropped to")
    int8.add_argument("--int8-atol", type=float, default=INT8_ATOL, help="int8: max |delta| of float outputs")
    int8.add_argument("--int8-min-agreement", type=float, default=INT8_MIN_AGREEMENT, help="int8: label agreement")
    return parser.parse_args(argv)


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = get_args(argv)
    out = Path(args.out)
    if args.opset is not None and args.opset < 17:
        return fail(f"--opset {args.opset}: the graph needs opset 17 or newer", 2)
    if min(args.verify_batches) < 1:
        return fail("--verify-batches must be positive", 2)
    if args.int8_calib_images < 1:
        return fail("--int8-calib-images must be positive", 2)
    try:
        warmup = parse_warmup(args.warmup) if args.warmup else None
        checkpoint = load_checkpoint(args.checkpoint)
        graph = build_graph(checkpoint.model, args.outputs)
        check_writable(out)
        calibration = (
            CalibrationImages(args.int8_calib_dir, (1, *args.int8_calib_size, 3), limit=args.int8_calib_images)
            if args.int8_calib_dir
            else None
        )
    except (CheckpointError, ValueError) as err:
        return fail(str(err), 2)
    except OSError as err:
        return fail(f"cannot write {out}: {err.strerror or err}", 2)
    metadata = graph_metadata(checkpoint.model, checkpoint.class_stats, graph.outputs)
    tic = time.perf_counter()
    try:
        exported = export_onnx(graph, metadata, args.opset, args.exporter, args.decompose_softmax)
        model, data = exported.model, exported.model.SerializeToString()
    except ExportError as err:
        return fail(str(err), 2)
    except Exception as err:  # an exporter or checker failure: one line, the cause first
        return fail(
            f"export failed: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}", 1
        )
    print(
        f"exported {checkpoint.config.model} ({checkpoint.config.backbone}/{checkpoint.config.context}) with "
        f"{args.exporter}, "
        f"opset {model.opset_import[0].version}, {len(model.graph.node)} nodes, outputs {list(graph.outputs)} "
        f"in {time.perf_counter() - tic:.1f} s ({exported.softmaxes_decomposed} channel softmax(es) decomposed); "
        "check_model(full_check) passed"
    )
    atol, min_agreement = args.atol, args.min_agreement
    if calibration is not None:
        try:
            tic, quantized = time.perf_counter(), quantize_int8(model, calibration)
        except Exception as err:  # a calibration image that cannot be read, or the quantizer's own failure
            cause = (str(err).strip() or "-").splitlines()[0]
            return fail(f"int8 quantization failed: {type(err).__name__}: {cause}", 1)
        model, data = quantized.model, quantized.model.SerializeToString()
        atol, min_agreement = args.int8_atol, args.int8_min_agreement
        print(
            f"int8 QDQ graph from {quantized.calibration_batches} calibration image(s) of {calibration.directory} in "
            f"{time.perf_counter() - tic:.1f} s: quantized {quantized.quantized_ops}; "
            f"{len(quantized.float_nodes)} nodes kept float (input conv, classifiers and everything after them)"
        )
    if args.verify:
        try:
            session = cpu_session(data)
        except Exception as err:
            return fail(f"onnxruntime cannot load the exported graph: {str(err).splitlines()[0]}", 1)
        parity = verify(
            lambda x: run_model(graph.model, x, graph.outputs),
            lambda x: run_onnxruntime(session, x, graph.outputs),
            args.verify_sizes,
            args.verify_batches,
            Parity(metadata.class_names, metadata.groups, atol, min_agreement),
        )
        sizes = ", ".join(f"{h}x{w}" for h, w in args.verify_sizes)
        print(f"parity onnxruntime vs PyTorch at {sizes}, batches {args.verify_batches} (agreement per PyTorch label):")
        print("\n".join(parity.report()))
        if calibration is not None:  # random pixels are no images: the agreement on real ones, for information
            real = parity_on_images(
                lambda x: run_model(graph.model, x, graph.outputs),
                lambda x: run_onnxruntime(session, x, graph.outputs),
                calibration,
                INT8_REAL_IMAGES,
                Parity(metadata.class_names, metadata.groups),
            )
            count = min(INT8_REAL_IMAGES, len(calibration))
            print(f"int8 on {count} of the calibration images (not a gate): {real.report()[-1].strip()}")
        if parity.failures():
            return fail(f"parity check failed, {out} not written: {'; '.join(parity.failures())}", 1)
    try:
        atomic_write_bytes(out, data)
        print(f"wrote {out} ({len(data) / 2**20:.1f} MiB)")
        model_dir = triton_model_dir(out) if args.triton_config else None
        if model_dir is not None:
            config = write_triton_config(
                model,
                model_dir,
                "onnxruntime_onnx",
                source=out.name,
                max_batch_size=args.max_batch_size,
                max_queue_delay_us=args.max_queue_delay_us,
                warmup=warmup,
            )
            print(f"wrote {config}")
    except OSError as err:
        return fail(f"cannot write {err.filename or out}: {err.strerror or err}", 2)
    except ValueError as err:
        return fail(str(err), 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
