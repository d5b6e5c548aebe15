"""Which layers of a reduced-precision (--fp16 / --int8) TensorRT engine stay fp32, and why.

fp16 tops out at 65504 and keeps 11 bits: LayerNorm's mean of squares, a softmax's exponent and
sum, and reductions over thousands of elements overflow or round away there. That is the known
way transformer engines (SegFormer, ViT) go wrong in fp16, and MEDOE's mixing has the same
softmaxes and sums. Those layers are pinned to fp32 (`OBEY_PRECISION_CONSTRAINTS`); the
convolutions and matrix products, where the time goes, run in fp16.
"""

from __future__ import annotations

from collections import Counter

import onnx

# TensorRT layer types (trt.LayerType names) kept in fp32 ...
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")
# ... and unary ops (trt.UnaryOperation names): exp overflows past 11.1, sqrt / reciprocal of a
# variance lose what LayerNorm divides by.
FP32_UNARY_OPS = ("EXP", "SQRT", "RECIP")
# The ONNX ops the parser turns into those layers (`fp32_onnx_ops` counts them in a graph).
FP32_ONNX_OPS = (
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceL2",
    "Exp",
    "Sqrt",
    "Reciprocal",
)


def is_fp32_layer(layer_type: str, unary_op: str | None = None) -> bool:
    """True for a layer (its trt.LayerType name, and trt.UnaryOperation name if unary) kept in fp32."""
    return layer_type in FP32_LAYER_TYPES or (layer_type == "UNARY" and unary_op in FP32_UNARY_OPS)


def keep_fp32(trt, network) -> list[str]:
    """Pins every such layer with float outputs to fp32 in `network`; returns their names.
    The builder config also needs `trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS`."""
    floats = (trt.float32, trt.float16)
    kept = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        unary_op = None
        if layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer  # get_layer returns the base ILayer (as Polygraphy does)
            unary_op = layer.op.name
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if not is_fp32_layer(layer.type.name, unary_op) or not all(out.dtype in floats for out in outputs):
            continue
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
        kept.append(layer.name)
    return kept


def fp32_onnx_ops(model: onnx.ModelProto) -> Counter:
    """How many nodes of each op in FP32_ONNX_OPS `model` holds: what --fp16 keeps in fp32."""
    return Counter(node.op_type for node in model.graph.node if node.op_type in FP32_ONNX_OPS)
