"""Export a checkpoint to one ONNX graph (SPEC §9), check it against PyTorch, write it atomically.

    python -m export.to_onnx --checkpoint work/run/final --out model_repository/medoe/1/model.onnx
    python export/to_onnx.py --checkpoint work/base/final --out model.onnx --outputs labels confidence probs

The graph is verified with onnxruntime before anything is written: on a parity failure the
command exits 1 and leaves --out as it was. Inside a Triton layout
(`<repo>/<model>/<version>/model.onnx`) the model's config.pbtxt is generated beside it.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

if __package__ in (None, ""):  # run as `python export/to_onnx.py`: import from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from export import CliParser
from export.graph import (
    DYNAMIC_AXES,
    INPUT,
    OUTPUTS,
    ExportGraph,
    build_graph,
    decode_metadata,
    graph_metadata,
    random_images,
    run_model,
    set_metadata,
)
from export.triton_config import parse_warmup, triton_model_dir, write_triton_config
from medoe.checkpoint import CheckpointError, load_checkpoint
from medoe.config import atomic_write_bytes

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_SIZES = ((96, 128), (67, 93), (160, 224))  # 67x93: not a multiple of the backbone's stride
TRACE_SHAPE = (2, 64, 96)  # batch 2: the dynamo exporter would specialise a batch of 1


class ExportError(RuntimeError):
    pass


def export_graph(graph: ExportGraph, opset: int | None = None, exporter: str = "torchscript") -> onnx.ModelProto:
    example = torch.from_numpy(random_images(*TRACE_SHAPE, seed=0))
    names = list(graph.outputs)
    with torch.no_grad(), warnings.catch_warnings():
        # The model's "3 channels" input check is constant for this graph; the legacy
        # exporter's deprecation notice is ours to know about, not the user's.
        warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`")
        if exporter == "dynamo":
            program = _export_dynamo(graph, example, names, opset or 18)
            model = program.model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(graph, (example,), buffer, dynamo=False, opset_version=opset or 17,
                              input_names=[INPUT], output_names=names, do_constant_folding=True,
                              dynamic_axes={n: DYNAMIC_AXES[n] for n in [INPUT, *names]})
            model = onnx.load_from_string(buffer.getvalue())
    graph.eval()  # the exporter restores the train/eval mode it found; keep the reference in eval
    return model


def _export_dynamo(graph: ExportGraph, example: torch.Tensor, names: list[str], opset: int):
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency)
    except ImportError:
        raise ExportError("--exporter dynamo needs the onnxscript package: pip install onnxscript") from None
    dim = torch.export.Dim
    shapes = {"images": {0: dim("batch", min=1, max=1024), 1: dim("height", min=16, max=8192),
                         2: dim("width", min=16, max=8192)}}
    return torch.onnx.export(graph, (example,), dynamo=True, opset_version=max(opset, 18), input_names=[INPUT],
                             output_names=names, dynamic_shapes=shapes, verbose=False)


def decompose_channel_softmax(model: onnx.ModelProto) -> int:
    """Softmax over axis 1 -> exp(x - max) / sum, in place; returns how many were replaced.

    onnxruntime computes a Softmax over a non-last axis by transposing to the last axis and
    back; the reductions are cheaper (tiny MEDOE at 512x1024 on 2 cores: 145 -> 120 ms).
    The formula is Softmax's own, so outputs stay within 1e-7 of it.
    """
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    axes = "channel_softmax_axes"
    nodes, replaced = [], 0
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if node.op_type != "Softmax" or axis != 1:
            nodes.append(node)
            continue
        x, y, name = node.input[0], node.output[0], node.name or node.output[0]
        # ReduceMax takes its axes as an input from opset 18 on, as an attribute before.
        reduce_max = (onnx.helper.make_node("ReduceMax", [x, axes], [f"{name}/max"], keepdims=1) if opset >= 18
                      else onnx.helper.make_node("ReduceMax", [x], [f"{name}/max"], axes=[1], keepdims=1))
        nodes += [reduce_max,
                  onnx.helper.make_node("Sub", [x, f"{name}/max"], [f"{name}/shifted"]),
                  onnx.helper.make_node("Exp", [f"{name}/shifted"], [f"{name}/exp"]),
                  onnx.helper.make_node("ReduceSum", [f"{name}/exp", axes], [f"{name}/sum"], keepdims=1),
                  onnx.helper.make_node("Div", [f"{name}/exp", f"{name}/sum"], [y])]
        replaced += 1
    if replaced:
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), axes))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return replaced


def finish_model(model: onnx.ModelProto, metadata: dict[str, str]) -> bytes:
    set_metadata(model, metadata)
    model.producer_name, model.doc_string = "medoe export/to_onnx.py", "MEDOE segmentation graph (SPEC §9)"
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def onnxruntime_session(model: bytes | str | Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnxruntime(session: ort.InferenceSession, images: np.ndarray, names) -> dict[str, np.ndarray]:
    return dict(zip(names, session.run(list(names), {INPUT: images}), strict=True))


@dataclass
class Parity:
    """Accumulates the candidate-vs-reference differences of many runs."""

    class_names: list[str]
    groups: dict[str, list[int]]
    atol: float = 1e-4
    min_agreement: float = 0.9999
    max_abs: dict[str, float] = field(default_factory=dict)
    pixels: np.ndarray | None = None  # reference label count per class
    agreed: np.ndarray | None = None  # ... of which the candidate gave the same label
    problems: list[str] = field(default_factory=list)

    def add(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], where: str) -> None:
        num_classes = len(self.class_names)
        if self.pixels is None:
            self.pixels, self.agreed = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
        for name, expected in reference.items():
            got = candidate[name]
            if got.shape != expected.shape or got.dtype != expected.dtype:
                self.problems.append(f"{name} at {where}: got {got.dtype}{list(got.shape)}, expected {expected.dtype}{list(expected.shape)}")
            elif name == "labels":
                truth = expected.ravel().astype(np.int64)
                self.pixels += np.bincount(truth, minlength=num_classes)[:num_classes]
                self.agreed += np.bincount(truth[got.ravel() == expected.ravel()], minlength=num_classes)[:num_classes]
            else:
                delta = float(np.abs(got.astype(np.float64) - expected).max()) if expected.size else 0.0
                self.max_abs[name] = max(self.max_abs.get(name, 0.0), delta)

    @property
    def agreement(self) -> float:
        return float(self.agreed.sum() / max(self.pixels.sum(), 1)) if self.pixels is not None else 1.0

    def failures(self) -> list[str]:
        failed = list(self.problems)
        failed += [f"max |delta {n}| {d:.2e} > {self.atol:g}" for n, d in self.max_abs.items() if not d <= self.atol]
        if self.agreement < self.min_agreement:
            failed.append(f"label agreement {100 * self.agreement:.4f}% < {100 * self.min_agreement:.4f}%")
        return failed

    def report(self) -> list[str]:
        group_of = {c: g for g, members in self.groups.items() for c in members}
        width = max([len(n) for n in self.class_names] + [5])
        lines = [f"  {'class':<{width}}  group  {'pixels':>10}  agreement"]
        for c, name in enumerate(self.class_names):
            if self.pixels is not None and self.pixels[c]:
                lines.append(f"  {name:<{width}}  {group_of.get(c, '-'):<5}  {self.pixels[c]:>10}  {100 * self.agreed[c] / self.pixels[c]:8.4f}%")
        for group, members in self.groups.items():
            total = int(self.pixels[members].sum()) if self.pixels is not None and members else 0
            if total:
                lines.append(f"  {'[' + group + ']':<{width}}  {group:<5}  {total:>10}  {100 * self.agreed[members].sum() / total:8.4f}%")
        lines.append(f"  label agreement {100 * self.agreement:.4f}% over {int(self.pixels.sum()) if self.pixels is not None else 0} pixels; "
                     + ", ".join(f"max |delta {n}| {d:.2e}" for n, d in self.max_abs.items()))
        return lines


def verify(run_reference, run_candidate, sizes, batches, parity: Parity) -> Parity:
    """Runs both on the same random uint8 images at every (batch, size)."""
    for index, (batch, (height, width)) in enumerate((b, s) for s in sizes for b in batches):
        images = random_images(batch, height, width, seed=index)
        parity.add(run_reference(images), run_candidate(images), f"{batch}x{height}x{width}")
    return parity


def prepare_output(path: Path) -> None:
    """Fails before the slow export if --out cannot be written (a file in the way, no permission)."""
    if path.is_dir():
        raise OSError(f"--out {path} is a directory; give a file path such as {path / 'model.onnx'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
        pass


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW with positive integers, e.g. 67x93")
    return int(parts[0]), int(parts[1])


def get_args(argv=None) -> argparse.Namespace:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (model.safetensors + config.json)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--outputs", nargs="+", choices=OUTPUTS, help="default: labels confidence (+ expert_weights for MEDOE)")
    parser.add_argument("--opset", type=int, help="ONNX opset (>= 17; default 17, 18 for dynamo)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript", help="torch.onnx path: legacy tracer or torch.export")
    parser.add_argument("--decompose-softmax", action=argparse.BooleanOptionalAction, default=True,
                        help="rewrite channel Softmax as exp/sum (faster in onnxruntime, same outputs)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help="onnxruntime vs PyTorch before writing")
    parser.add_argument("--verify-sizes", nargs="+", type=parse_size, default=list(DEFAULT_SIZES), metavar="HxW")
    parser.add_argument("--verify-batches", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--atol", type=float, default=1e-4, help="max |delta| of float outputs")
    parser.add_argument("--min-agreement", type=float, default=0.9999, help="label agreement, as a fraction")
    parser.add_argument("--triton-config", action=argparse.BooleanOptionalAction, default=True,
                        help="write <repo>/<model>/config.pbtxt when --out is <repo>/<model>/<version>/model.onnx")
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
        prepare_output(out)
    except (CheckpointError, ValueError) as err:
        return fail(str(err), 2)
    except OSError as err:
        return fail(f"cannot write {out}: {err.strerror or err}", 2)
    metadata = graph_metadata(checkpoint.model, checkpoint.class_stats, graph.outputs)
    tic = time.perf_counter()
    try:
        model = export_graph(graph, args.opset, args.exporter)
        softmaxes = decompose_channel_softmax(model) if args.decompose_softmax else 0
        data = finish_model(model, metadata)
    except ExportError as err:
        return fail(str(err), 2)
    except Exception as err:  # an exporter or checker failure: one line, the cause first
        return fail(f"export failed: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}", 1)
    print(f"exported {checkpoint.config.model} ({checkpoint.config.backbone}/{checkpoint.config.context}) with {args.exporter}, "
          f"opset {model.opset_import[0].version}, {len(model.graph.node)} nodes, outputs {list(graph.outputs)} "
          f"in {time.perf_counter() - tic:.1f} s ({softmaxes} channel softmax(es) decomposed); check_model(full_check) passed")
    if args.verify:
        info = decode_metadata(metadata)
        try:
            session = onnxruntime_session(data)
        except Exception as err:
            return fail(f"onnxruntime cannot load the exported graph: {str(err).splitlines()[0]}", 1)
        parity = verify(lambda x: run_model(graph.model, x, graph.outputs), lambda x: run_onnxruntime(session, x, graph.outputs),
                        args.verify_sizes, args.verify_batches,
                        Parity(info["class_names"], info["groups"], args.atol, args.min_agreement))
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
            config = write_triton_config(model, model_dir, "onnxruntime_onnx", source=out.name, max_batch_size=args.max_batch_size,
                                         max_queue_delay_us=args.max_queue_delay_us, warmup=warmup)
            print(f"wrote {config}")
    except OSError as err:
        return fail(f"cannot write {err.filename or out}: {err.strerror or err}", 2)
    except ValueError as err:
        return fail(str(err), 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
