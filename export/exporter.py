"""The one export function: an `ExportGraph` -> a checked ONNX model with its metadata.

Every path that makes a graph goes through `export_onnx` (export/to_onnx.py's CLI, the
inference benchmark, the tests), as timm's `utils/onnx.py` does: explicit input and output
names from medoe.contract, dynamic N/H/W, `onnx.checker` with full shape inference.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from export.graph import ExportGraph, random_images
from medoe.contract import DYNAMIC_AXES, IMAGES, ModelMetadata

EXPORTERS = ("torchscript", "dynamo")
TRACE_SHAPE = (2, 64, 96)  # batch 2: the dynamo exporter would specialise a batch of 1


class ExportError(RuntimeError):
    pass


@dataclass
class Exported:
    model: onnx.ModelProto  # checked, metadata set
    softmaxes_decomposed: int  # channel Softmax nodes rewritten as exp / sum


def export_onnx(
    graph: ExportGraph,
    metadata: ModelMetadata,
    opset: int | None = None,
    exporter: str = "torchscript",
    decompose_softmax: bool = True,
) -> Exported:
    """Traced, its channel softmaxes decomposed (optional), its metadata set and fully checked."""
    model = export_graph(graph, opset, exporter)
    softmaxes = decompose_channel_softmax(model) if decompose_softmax else 0
    set_metadata(model, metadata)
    model.producer_name, model.doc_string = "medoe export", "MEDOE segmentation graph (SPEC §9)"
    onnx.checker.check_model(model, full_check=True)
    return Exported(model, softmaxes)


def set_metadata(model: onnx.ModelProto, metadata: ModelMetadata) -> None:
    del model.metadata_props[:]
    for key, value in metadata.to_props().items():
        model.metadata_props.add(key=key, value=value)


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
            torch.onnx.export(
                graph,
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset or 17,
                input_names=[IMAGES],
                output_names=names,
                do_constant_folding=True,
                dynamic_axes={n: DYNAMIC_AXES[n] for n in [IMAGES, *names]},
            )
            model = onnx.load_from_string(buffer.getvalue())
    graph.eval()  # the exporter restores the train/eval mode it found; keep the reference in eval
    return model


def _export_dynamo(graph: ExportGraph, example: torch.Tensor, names: list[str], opset: int):
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency)
    except ImportError:
        raise ExportError("--exporter dynamo needs the onnxscript package: pip install onnxscript") from None
    dim = torch.export.Dim
    shapes = {
        IMAGES: {
            0: dim("batch", min=1, max=1024),
            1: dim("height", min=16, max=8192),
            2: dim("width", min=16, max=8192),
        }
    }
    return torch.onnx.export(
        graph,
        (example,),
        dynamo=True,
        opset_version=max(opset, 18),
        input_names=[IMAGES],
        output_names=names,
        dynamic_shapes=shapes,
        verbose=False,
    )


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
        reduce_max = (
            onnx.helper.make_node("ReduceMax", [x, axes], [f"{name}/max"], keepdims=1)
            if opset >= 18
            else onnx.helper.make_node("ReduceMax", [x], [f"{name}/max"], axes=[1], keepdims=1)
        )
        nodes += [
            reduce_max,
            onnx.helper.make_node("Sub", [x, f"{name}/max"], [f"{name}/shifted"]),
            onnx.helper.make_node("Exp", [f"{name}/shifted"], [f"{name}/exp"]),
            onnx.helper.make_node("ReduceSum", [f"{name}/exp", axes], [f"{name}/sum"], keepdims=1),
            onnx.helper.make_node("Div", [f"{name}/exp", f"{name}/sum"], [y]),
        ]
        replaced += 1
    if replaced:
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), axes))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return replaced
