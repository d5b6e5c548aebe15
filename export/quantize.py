"""Static int8 quantization of the fused graph for CPU: fp32 ONNX + calibration images -> int8 QDQ ONNX.

onnxruntime's QDQ tools (`quantize_static`, `QuantFormat.QDQ`, per-channel int8 weights, uint8
activations calibrated by MinMax) on the backbone and the experts' context modules: the
convolutions and the ops between them, where the time goes. What stays float, and why (tiny
MEDOE measurements in tests/test_quantize.py and docs/benchmark_cpu_int8.md):

- the front: uint8 NHWC -> float, normalisation (not quantizable ops) and the input
  convolution(s) (the first Conv on the path from `images`). Its input, the normalised image, has
  three channels of different spread under one per-tensor scale, and with K = 3x3x3 it gains
  little from int8: on the shipped model, keeping it float raised label agreement with fp32 from
  99.60% to 99.70% and the test-split mIoU drop from 0.16 to 0.00 points (30 test images).
- the float tail: every classifier convolution (a Conv whose output reaches a softmax / ArgMax
  without passing another Conv) and every node downstream of one: the expert softmaxes, the
  decision maker, the soft weighting, the final resize, ReduceMax (`confidence`), ArgMax and the
  uint8 cast (`labels`). Int8 logits have 256 levels (argmax ties go to the lowest class id) and
  int8 probabilities would put `confidence` and `expert_weights` on a 1/255 grid; onnxruntime has
  no int8 kernels for the reductions and Exp anyway, so quantizing them only adds Q/DQ steps.
  Measured on the shipped model (30 test images): with the tail quantized too, label agreement
  with fp32 99.56% against 99.60%, and the graph got slower instead of faster.

Equal constants that the exporter shares through Identity nodes are inlined first (see
`inline_constant_identities`: otherwise most R50c convolutions stay float). OpenVINO compiles the
int8 graph but computes part of it differently (bench/cpu_int8.py reports it); serve it on onnxruntime.
The graph keeps its input/output names, its metadata_props, producer and doc string.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from medoe.contract import IMAGES

# Ops that end a classifier's path: a Conv reaching one of these without another Conv is a classifier.
PROBABILITY_OPS = ("Exp", "Softmax", "ArgMax", "LogSoftmax")
NAME_PREFIX = "int8_keep/"  # names given to unnamed nodes (the decomposed softmaxes) so they can be excluded
# export.to_onnx's int8 gate, on random uint8 pixels against PyTorch (export.parity.verify). Noise is far from
# the calibration images, so it is the harsh case: the random-weight test model of tests/test_export.py agrees
# on 94% of the labels at the CLI's default sizes, 87% at the tests' smaller ones, and on 98% of the
# calibration images' labels; a float output moves by up to ~0.5 where a label flips, so the float outputs'
# bound only catches a broken graph. The label agreement is the check.
INT8_MIN_AGREEMENT = 0.80
INT8_ATOL = 0.75
INT8_REAL_IMAGES = 8  # calibration images export.to_onnx also compares on, for information


class QuantizeError(RuntimeError):
    pass


@dataclass
class Quantized:
    model: onnx.ModelProto  # int8 QDQ graph, names and metadata of the fp32 one
    float_nodes: list[str]  # nodes kept float on purpose (input conv + tail), by name
    quantized_ops: dict[str, int]  # op type -> how many fp32 nodes of that type got QDQ inputs
    calibration_batches: int


class ImageBatches:
    """onnxruntime's CalibrationDataReader over uint8 NHWC batches (e.g. export.calibration.CalibrationImages)."""

    def __init__(self, batches: Iterable[np.ndarray], input_name: str = IMAGES):
        self.batches, self.input_name, self.count = batches, input_name, 0
        self._iterator: Iterator[np.ndarray] | None = None

    def get_next(self) -> dict | None:
        if self._iterator is None:
            self._iterator = iter(self.batches)
        batch = next(self._iterator, None)
        if batch is None:
            return None
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3:
            raise QuantizeError(f"calibration batch must be uint8 [N, H, W, 3], got {batch.dtype}{list(batch.shape)}")
        self.count += 1
        return {self.input_name: np.ascontiguousarray(batch)}

    def rewind(self) -> None:
        self._iterator = None


def load_model(model: onnx.ModelProto | bytes | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(os.fspath(model))


def name_nodes(model: onnx.ModelProto) -> None:
    """Gives every unnamed node a unique name (nodes_to_exclude works by name), in place."""
    taken = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{NAME_PREFIX}{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _consumers(nodes: list[onnx.NodeProto]) -> dict[str, list[int]]:
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    return consumers


def _reached(nodes, consumers, starts: list[str]) -> list[int]:
    """Nodes reached forward from the tensors `starts`, not walking past a Conv (Convs are included)."""
    seen, stack = set(), list(starts)
    while stack:
        for index in consumers.get(stack.pop(), []):
            if index not in seen:
                seen.add(index)
                if nodes[index].op_type != "Conv":
                    stack.extend(nodes[index].output)
    return sorted(seen)


def input_convs(model: onnx.ModelProto) -> list[str]:
    """The Conv(s) first reached from the graph's input: the stem's first convolution."""
    nodes = list(model.graph.node)
    reached = _reached(nodes, _consumers(nodes), [v.name for v in model.graph.input])
    return [nodes[i].name for i in reached if nodes[i].op_type == "Conv"]


def inline_constant_identities(model: onnx.ModelProto) -> int:
    """Identity nodes that copy an initializer -> initializers of their own, in place; returns how many.

    The torchscript exporter shares equal constants through Identity nodes (a random-weight model's
    BatchNorm-folded biases are all zero, hence all equal). The quantizer leaves such a bias float,
    and onnxruntime then cannot fuse DQ -> Conv -> Q into QLinearConv: the convolution runs in float
    on dequantized weights, slower than the fp32 graph (R50c: 67 int8 convolutions, 33 of them float).
    """
    initializers = {t.name: t for t in model.graph.initializer}
    outputs = {v.name for v in model.graph.output}
    kept, inlined = [], 0
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
            inlined += 1
        else:
            kept.append(node)
    if inlined:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return inlined


def float_tail(model: onnx.ModelProto) -> list[str]:
    """Names of the classifier convolutions and of every node downstream of one (see the module doc)."""
    nodes = list(model.graph.node)
    consumers = _consumers(nodes)
    classifiers = [
        i
        for i, n in enumerate(nodes)
        if n.op_type == "Conv"
        and any(nodes[j].op_type in PROBABILITY_OPS for j in _reached(nodes, consumers, list(n.output)))
    ]
    if not classifiers:
        raise QuantizeError("no classifier convolution found (a Conv feeding a softmax or ArgMax): not a MEDOE graph?")
    tail, stack = set(classifiers), [o for i in classifiers for o in nodes[i].output]
    while stack:
        for index in consumers.get(stack.pop(), []):
            if index not in tail:
                tail.add(index)
                stack.extend(nodes[index].output)
    return [nodes[i].name for i in sorted(tail)]


def quantize_int8(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    calibration: Iterable[np.ndarray],
    per_channel: bool = True,
    reduce_range: bool = False,
    keep_float: Iterable[str] = (),
) -> Quantized:
    """fp32 fused graph + uint8 NHWC calibration batches -> int8 QDQ graph (module doc: what stays float).

    `keep_float`: more node names to leave float. `reduce_range` (7-bit weights) is onnxruntime's advice
    for CPUs without VNNI against int16 saturation; per-channel weights: per output channel of every Conv.
    """
    source = load_model(model)
    inline_constant_identities(source)
    name_nodes(source)
    kept = list(dict.fromkeys([*input_convs(source), *float_tail(source), *keep_float]))
    reader = ImageBatches(calibration, source.graph.input[0].name)
    with tempfile.TemporaryDirectory(prefix="medoe-int8-") as tmp, _quiet_root_logger():
        fp32_path, int8_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(source, str(fp32_path))
        try:
            _quantize_static(str(fp32_path), str(int8_path), reader, per_channel, reduce_range, kept)
        except QuantizeError:
            raise
        except Exception as err:
            if reader.count == 0:  # the calibrator's own message for this is "No data is collected."
                raise QuantizeError("the calibration images gave no batch") from err
            raise
        if reader.count == 0:
            raise QuantizeError("the calibration images gave no batch")
        quantized = onnx.load(str(int8_path))
    keep_identity(source, quantized)
    onnx.checker.check_model(quantized)
    return Quantized(quantized, kept, quantized_ops(quantized, set(kept)), reader.count)


def quantized_ops(model: onnx.ModelProto, kept: set[str]) -> dict[str, int]:
    """Op type -> count of the nodes that compute on dequantized int8 inputs (onnxruntime fuses them into
    QLinear* kernels where it has one), leaving out the kept-float ones and shape-only ops."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Shape", "Identity") or node.name in kept:
            continue
        if any(i in dq_outputs for i in node.input):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _quantize_static(fp32: str, int8: str, reader: ImageBatches, per_channel, reduce_range, excluded) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        fp32,
        int8,
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,  # asymmetric uint8 activations, int8 weights: onnxruntime's CPU advice
        weight_type=QuantType.QInt8,
        nodes_to_exclude=list(excluded),
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )


class _quiet_root_logger:  # noqa: N801  quantize_static advises pre-processing on the root logger, every call
    def __enter__(self):
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self.level)


def parity_on_images(run_reference, run_candidate, images: Iterable[np.ndarray], limit: int, parity):
    """export.parity.Parity over the first `limit` batches of real images (verify() uses random pixels)."""
    for index, batch in enumerate(itertools.islice(images, limit)):
        parity.add(run_reference(batch), run_candidate(batch), f"image batch {index}")
    return parity


def keep_identity(source: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    """The int8 graph says what the fp32 one said: metadata, producer, doc string, I/O names (checked)."""
    del quantized.metadata_props[:]
    for prop in source.metadata_props:
        quantized.metadata_props.add(key=prop.key, value=prop.value)
    quantized.metadata_props.add(key="quantization", value="int8 QDQ (onnxruntime quantize_static, export/quantize.py)")
    quantized.producer_name, quantized.doc_string = source.producer_name, source.doc_string
    for kind in ("input", "output"):
        expected = [v.name for v in getattr(source.graph, kind)]
        got = [v.name for v in getattr(quantized.graph, kind)]
        if got != expected:
            raise QuantizeError(f"quantization changed the graph's {kind}s: {got} != {expected}")
