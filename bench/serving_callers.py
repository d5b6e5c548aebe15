"""The callers bench/serving.py times: one factory per run, one caller per client thread.

A caller is `call(image_index, check)`; with `check` it compares the answer's labels with
onnxruntime's (PyTorch with random weights is checked for shapes only).
"""

from __future__ import annotations

import contextlib
import uuid

import numpy as np

from medoe.contract import (
    CONFIDENCE,
    EXPERT_WEIGHTS,
    IMAGE,
    IMAGES,
    LABELS,
    MODEL,
    SEGMENT,
    read_graph_metadata,
)
from serving.decode import decode_image
from serving.ort_memory import cpu_session


def reference_labels(onnx_path, images: np.ndarray, jpegs: list[bytes]) -> dict:
    """onnxruntime's answers: labels of the raw images and of the decoded JPEGs, output shapes."""
    session = cpu_session(onnx_path)
    raw = [session.run(None, {IMAGES: image[np.newaxis]}) for image in images]
    names = [o.name for o in session.get_outputs()]
    return {
        "raw": [r[names.index(LABELS)][0] for r in raw],
        "jpeg": [session.run([LABELS], {IMAGES: decode_image(j)[np.newaxis]})[0][0] for j in jpegs],
        "shapes": {n: list(v.shape) for n, v in zip(names, raw[0], strict=True)},
    }


def _check(labels: np.ndarray, expected: np.ndarray, run: str) -> None:
    if labels.shape != expected.shape or not np.array_equal(labels, expected):
        raise RuntimeError(f"{run}: labels differ from onnxruntime's ({labels.shape} vs {expected.shape})")


def pytorch_model(args, onnx_path):
    import onnx
    import torch

    from export.graph import build_graph
    from medoe.checkpoint import load_checkpoint
    from medoe.config import load_config
    from medoe.model import build_model

    torch.set_num_threads(args.torch_threads)
    if args.checkpoint:
        model = load_checkpoint(args.checkpoint).model
    else:
        torch.manual_seed(0)
        model = build_model(load_config(args.config).network)
        c = model.config.num_classes
        model.set_groups([list(range(0, c // 3)), list(range(c // 3, 2 * c // 3)), list(range(2 * c // 3, c))])
    served = read_graph_metadata(onnx.load(str(onnx_path), load_external_data=False), str(onnx_path))
    mine = {"backbone": model.config.backbone, "context": model.config.context, "num_classes": model.config.num_classes}
    if any(getattr(served, k) != v for k, v in mine.items()):
        raise ValueError(
            f"--config/--checkpoint {mine} is not the served architecture "
            f"{ {k: getattr(served, k) for k in mine} }: the comparison would be unfair"
        )
    return build_graph(model.eval())


def caller_factory(run: str, args, server, images, jpegs, references, outputs):
    """make_caller(slot) for `run`; every thread gets its own client (and shared-memory regions)."""
    onnx_path = f"{args.repository}/{MODEL}/1/model.onnx"
    if run == "pytorch":
        from export.graph import run_torch

        graph = pytorch_model(args, onnx_path)

        def pytorch(index, check):
            result = run_torch(graph, images[index : index + 1])
            if check and result[LABELS].shape[1:] != references["raw"][index].shape:
                raise RuntimeError("pytorch: wrong labels shape")

        return lambda slot: pytorch
    if run == "onnxruntime":
        session = cpu_session(onnx_path)  # one session for all threads, as one server instance

        def onnxruntime(index, check):
            result = session.run(list(outputs), {IMAGES: images[index : index + 1]})
            if check:
                _check(result[0][0], references["raw"][index], run)

        return lambda slot: onnxruntime
    model, protocol, shm = run.split("_")[0], run.split("_")[1], run.endswith("_shm")
    return lambda slot: TritonCaller(run, model, protocol, shm, server, images, jpegs, references, outputs)


class TritonCaller:
    def __init__(self, run, model, protocol, shm, server, images, jpegs, references, outputs):
        if protocol == "http":
            import tritonclient.http as module

            self.client = module.InferenceServerClient(server.http_url, connection_timeout=300, network_timeout=300)
        else:
            import tritonclient.grpc as module

            self.client = module.InferenceServerClient(server.grpc_url)
        self.module, self.protocol, self.run, self.model = module, protocol, run, model
        self.images, self.jpegs, self.references, self.outputs = images, jpegs, references, outputs
        self.regions = {}
        if shm:
            self._register(references["shapes"])

    def _register(self, shapes: dict) -> None:
        import tritonclient.utils.shared_memory as shm

        sizes = {
            IMAGES: int(np.prod(self.images.shape[1:])),
            LABELS: int(np.prod(shapes[LABELS])),
            CONFIDENCE: 4 * int(np.prod(shapes[CONFIDENCE])),
            EXPERT_WEIGHTS: 4 * int(np.prod(shapes[EXPERT_WEIGHTS])),
        }
        for name, size in sizes.items():
            region = f"bench_{uuid.uuid4().hex[:12]}_{name}"
            handle = shm.create_shared_memory_region(region, f"/{region}", size)
            self.client.register_system_shared_memory(region, f"/{region}", size)
            self.regions[name] = (region, handle, size)

    def _inputs_outputs(self, index: int):
        m = self.module
        binary = {"binary_data": True} if self.protocol == "http" else {}
        if self.model == SEGMENT:
            tensor = m.InferInput(IMAGE, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([self.jpegs[index]], dtype=object), **binary)
            return [tensor], [m.InferRequestedOutput(n, **binary) for n in self.outputs]
        image = self.images[index : index + 1]
        tensor = m.InferInput(IMAGES, list(image.shape), "UINT8")
        if not self.regions:
            tensor.set_data_from_numpy(image, **binary)
            return [tensor], [m.InferRequestedOutput(n, **binary) for n in self.outputs]
        import tritonclient.utils.shared_memory as shm

        region, handle, size = self.regions[IMAGES]
        shm.set_shared_memory_region(handle, [image])  # the client's copy into shared memory
        tensor.set_shared_memory(region, size)
        wanted = []
        for name in self.outputs:
            output = m.InferRequestedOutput(name)
            output.set_shared_memory(*self.regions[name][::2])
            wanted.append(output)
        return [tensor], wanted

    def __call__(self, index: int, check: bool) -> None:
        inputs, wanted = self._inputs_outputs(index)
        result = self.client.infer(self.model, inputs, outputs=wanted)
        if not check:
            return
        if self.regions:
            import tritonclient.utils.shared_memory as shm

            _, handle, _ = self.regions[LABELS]
            labels = shm.get_contents_as_numpy(handle, np.uint8, self.references["shapes"][LABELS])[0].copy()
        else:
            labels = result.as_numpy(LABELS)
            labels = labels[0] if labels.ndim == 3 else labels
        expected = self.references["jpeg" if self.model == SEGMENT else "raw"][index]
        _check(labels, expected, self.run)

    def close(self) -> None:
        import tritonclient.utils.shared_memory as shm

        for region, handle, _ in self.regions.values():
            with contextlib.suppress(Exception):
                self.client.unregister_system_shared_memory(region)
            shm.destroy_shared_memory_region(handle)
        self.client.close()


def model_stats(server, models) -> dict:
    """Triton's cumulative per-model counters, summed over versions (HTTP statistics API)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        table = {}
        for model in models:
            totals = dict.fromkeys(
                (
                    "success_count",
                    "inference_count",
                    "execution_count",
                    "queue_ns",
                    "compute_input_ns",
                    "compute_infer_ns",
                    "compute_output_ns",
                ),
                0,
            )
            for entry in client.get_inference_statistics(model)["model_stats"]:
                stats = entry["inference_stats"]
                totals["success_count"] += stats["success"]["count"]
                totals["inference_count"] += entry.get("inference_count", 0)
                totals["execution_count"] += entry.get("execution_count", 0)
                for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
                    totals[f"{phase}_ns"] += stats[phase]["ns"]
            table[model] = totals
        return table
    finally:
        client.close()
