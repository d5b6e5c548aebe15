"""Export: a checkpoint to one fused ONNX graph, TensorRT engines and the Triton configs for both."""
