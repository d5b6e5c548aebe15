"""Export a checkpoint to one ONNX graph (SPEC §9), check it against PyTorch, write it atomically.

    python -m export.to_onnx --checkpoint work/run/final --out model_repository/medoe/1/model.onnx
    python export/to_onnx.py --checkpoint work/base/final --out model.onnx --outputs labels confidence probs

The graph is verified with onnxruntime before anything is written: on a parity failure the
command exits 1 and leaves --out as it was. Inside a Triton layout
(`<repo>/<model>/<version>/model.onnx`) the model's config.pbtxt is generated beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python export/to_onnx.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from export.exporter import EXPORTERS, ExportError, export_onnx
from export.graph import build_graph, graph_metadata, run_model
from export.parity import Parity, run_onnxruntime, verify
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
    try:
        warmup = parse_warmup(args.warmup) if args.warmup else None
        checkpoint = load_checkpoint(args.checkpoint)
        graph = build_graph(checkpoint.model, args.outputs)
        check_writable(out)
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
            Parity(metadata.class_names, metadata.groups, args.atol, args.min_agreement),
        )
        sizes = ", ".join(f"{h}x{w}" for h, w in args.verify_sizes)
        print(f"parity onnxruntime vs PyTorch at {sizes}, batches {args.verify_batches} (agreement per PyTorch label):")
        print("\n".join(parity.report()))
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
