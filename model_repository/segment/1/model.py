"""`segment`: one encoded image (`image` BYTES [1]) in; `labels` [H, W], `overlay` [H, W, 3],
`class_share` [C], `confidence` [H, W] and `expert_weights` [K, h, w] out (SPEC §9).

One python model that decodes (serving/decode.py), runs the `model` parameter's model (`medoe`)
through Triton with a BLS request for only the tensors the answer needs, and draws only the
outputs the client asked for (serving/processing.py). It replaced an ensemble of two python
models around `medoe`: each python step cost a fixed 2-3 ms on the 2-core machine, the ensemble
moved the decoded image through two of them, and its steps saw every output requested whatever
the client asked for (README, "Serving speed, soak and faults").

Requests are answered from a pool of threads (the response sender, Triton's default mode), so
several are in flight at once and `medoe`'s dynamic batcher merges their images, as it did for
the ensemble. A bad image is INVALID_ARG with a one-line message.
"""

# First: this import puts the venv on sys.path (the bootstrap serving/repository.py adds to it;
# the stub ignores PYTHONPATH).
import triton_python_backend_utils as pb_utils  # isort: skip

import ctypes
import ctypes.util
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medoe.contract import (
    CLASS_SHARE,
    CONFIDENCE,
    EXPERT_WEIGHTS,
    IMAGE,
    IMAGES,
    LABELS,
    MODEL,
    OVERLAY,
    SEGMENT_ANSWERS_METRIC,
    SEGMENT_OUTPUTS,
    SEGMENT_PHASE_METRIC,
    SEGMENT_PHASES,
    MetadataError,
    ModelMetadata,
    triton_parameters,
)
from serving.decode import decode_image
from serving.model_limits import DEFAULT_MAX_PIXELS, pixel_parameter
from serving.processing import (
    class_share,
    overlay,
    palette_array,
    parse_working_size,
    resize_labels_nearest,
    resize_map,
    resize_to_working_size,
)

# The model's output each of ours is made from.
SOURCE = {LABELS: LABELS, OVERLAY: LABELS, CLASS_SHARE: LABELS, CONFIDENCE: CONFIDENCE, EXPERT_WEIGHTS: EXPERT_WEIGHTS}
# Requests in flight at once: the most `medoe` batches (its max_batch_size).
DEFAULT_THREADS = 8
# Where each answer's time goes, summed in microseconds, as Triton metrics (SEGMENT_PHASES; bench/serving.py
# reads them): decode (and resize to the working size), model (the BLS round trip to `medoe`, its queue
# included), draw (resize back, overlay, shares) and send (outputs into shared memory, handed over).
FLUSH_S = 0.25  # the sums reach the metrics at most this often: each update is a message to Triton
# After an image this large (pixels), glibc's heap is trimmed, so the stub does not keep its peak.
TRIM_PIXELS = 4 * 1024 * 1024


def _model_parameters(config_path: Path) -> dict[str, str]:
    # The generated config.pbtxt is protobuf text; Triton's own schema (from tritonclient) reads it.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in config.parameters.items()}


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # no glibc (musl): nothing to trim
        return lambda _pad: 0


class PhaseTimes:
    """Sums per phase, flushed to Triton counters `medoe_segment_phase_us{phase=...}` and
    `medoe_segment_answers` from a timer thread; a no-op where Triton has metrics off."""

    def __init__(self):
        self.lock, self.sums, self.timer = threading.Lock(), dict.fromkeys((*SEGMENT_PHASES, "answers"), 0.0), None
        try:
            phases = pb_utils.MetricFamily(
                name=SEGMENT_PHASE_METRIC,
                description="segment: microseconds spent per phase, summed over answers",
                kind=pb_utils.MetricFamily.COUNTER,
            )
            answers = pb_utils.MetricFamily(
                name=SEGMENT_ANSWERS_METRIC,
                description=f"segment: answers timed in {SEGMENT_PHASE_METRIC}",
                kind=pb_utils.MetricFamily.COUNTER,
            )
            self.families = (phases, answers)  # a family that is collected takes its metrics with it
            self.metrics = {p: phases.Metric(labels={"phase": p}) for p in SEGMENT_PHASES}
            self.metrics["answers"] = answers.Metric(labels={})
        except Exception:  # Triton runs with metrics off
            self.metrics = None

    def add(self, seconds: dict[str, float]) -> None:
        if self.metrics is None:
            return
        with self.lock:
            for phase, value in seconds.items():
                self.sums[phase] += value * 1e6
            self.sums["answers"] += 1
            if self.timer is None:
                self.timer = threading.Timer(FLUSH_S, self.flush)
                self.timer.daemon = True
                self.timer.start()

    def flush(self) -> None:
        with self.lock:
            sums, self.sums, self.timer = self.sums, dict.fromkeys(self.sums, 0.0), None
        for phase, value in sums.items():
            if value:
                self.metrics[phase].increment(value)


def _invalid(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = triton_parameters(config)
        raw = config.get("parameters", {})
        try:
            self.max_pixels = pixel_parameter(raw, "max_pixels", DEFAULT_MAX_PIXELS)
            self.working_size = parse_working_size(parameters.get("working_size", ""))
            threads = int(parameters.get("threads", "") or DEFAULT_THREADS)
            if threads < 1:
                raise ValueError(f"parameter threads is {threads}, expected at least 1")
        except ValueError as err:
            raise pb_utils.TritonModelException(f"segment: {err}") from None
        self.model = parameters.get("model", MODEL)
        # args["model_repository"] is this model's own directory; the model it calls is its sibling.
        here = Path(args["model_repository"])
        source = here.parent / self.model / "config.pbtxt"
        if not source.is_file():
            # serving/repository.py links the files of the repository it serves: name that one.
            repository = (here / "config.pbtxt").resolve().parent.parent
            raise pb_utils.TritonModelException(
                f"segment needs model {self.model!r}, which has no config.pbtxt in {repository}; "
                f"export it: python -m export.to_onnx --checkpoint ... --out {repository / self.model}/1/model.onnx"
            )
        if "palette" not in parameters:
            parameters = {**_model_parameters(source), **parameters}
        if "palette" not in parameters:
            raise pb_utils.TritonModelException(f"segment: the config of {self.model!r} has no `palette` parameter")
        try:
            metadata = ModelMetadata.from_props(parameters, f"segment: the config of {self.model!r}")
        except MetadataError as err:
            raise pb_utils.TritonModelException(str(err)) from None
        self.num_classes = metadata.num_classes
        # What this model can answer: a baseline graph has no expert_weights.
        self.outputs = [name for name in SEGMENT_OUTPUTS if SOURCE[name] in metadata.outputs]
        self.model_type = metadata.model_type
        self.palette = palette_array(metadata.palette)
        self.alpha = float(parameters.get("alpha", 0.5))
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="segment")
        self.trim = _malloc_trim()
        self.times = PhaseTimes()

    def execute(self, requests):
        for request in requests:
            self.pool.submit(self._answer, request)
        return None  # each request is answered through its response sender

    def _answer(self, request) -> None:
        sender = request.get_response_sender()
        pixels, times = 0, {}
        try:
            # `answer` (the model's response) holds the memory our output tensors view until they are sent.
            response, answer, pixels = self._segment(request, times)
        except Exception as err:  # whatever happens, the request gets an answer
            response, answer = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"segment: {err!r}")), None
        sent = time.perf_counter()
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        del response, answer
        if times:  # answered with outputs (filled only then)
            self.times.add({**times, "send": time.perf_counter() - sent})
        if pixels > TRIM_PIXELS:
            self.trim(0)
            later = threading.Timer(1.0, self.trim, (0,))  # what the stub frees once the answer is sent
            later.daemon = True
            later.start()

    def _segment(self, request, times: dict[str, float]):
        start = time.perf_counter()
        wanted = set(request.requested_output_names())
        # Triton names every output of the config for a request that names none: that means
        # "all this model has"; one that names an output the graph lacks is refused.
        if not wanted or wanted == set(SEGMENT_OUTPUTS):
            wanted = set(self.outputs)
        if missing := sorted(wanted - set(self.outputs)):
            return (
                _invalid(
                    f"model {self.model!r} ({self.model_type}) has no output {', '.join(missing)}; "
                    f"it answers {', '.join(self.outputs)}"
                ),
                None,
                0,
            )
        wanted = [name for name in SEGMENT_OUTPUTS if name in wanted]
        try:
            data = pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy().reshape(-1)
            if data.size != 1:
                raise ValueError(f"send exactly one encoded image per request, got {data.size}")
            image = decode_image(data[0], self.max_pixels)
        except ValueError as err:
            # The client sees this message with HTTP 400 / gRPC INVALID_ARGUMENT.
            return _invalid(str(err)), None, 0
        pixels = image.shape[0] * image.shape[1]
        model_input = resize_to_working_size(image, self.working_size)
        needed = list(dict.fromkeys(SOURCE[name] for name in wanted))
        decoded = time.perf_counter()
        answer = pb_utils.InferenceRequest(
            model_name=self.model,
            requested_output_names=needed,
            inputs=[pb_utils.Tensor(IMAGES, model_input[np.newaxis])],
            # On a GPU instance (the Docker image's native backend) the outputs would otherwise stay on the GPU.
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        ).exec()
        if answer.has_error():
            error = answer.error()
            code = error.code() if hasattr(error, "code") else pb_utils.TritonError.INTERNAL
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(error.message(), code)), None, pixels
        got = {name: pb_utils.get_output_tensor_by_name(answer, name).as_numpy()[0] for name in needed}
        ran = time.perf_counter()
        size = image.shape[:2]
        # Resized only when a working size made them smaller or larger than the image.
        if LABELS in got and got[LABELS].shape != size:
            got[LABELS] = resize_labels_nearest(got[LABELS], size)
        if CONFIDENCE in got and got[CONFIDENCE].shape != size:
            got[CONFIDENCE] = resize_map(got[CONFIDENCE], size)
        made = {
            LABELS: lambda: got[LABELS],
            OVERLAY: lambda: overlay(image, got[LABELS], self.palette, self.alpha),
            CLASS_SHARE: lambda: class_share(got[LABELS], self.num_classes),
            CONFIDENCE: lambda: got[CONFIDENCE],
            EXPERT_WEIGHTS: lambda: got[EXPERT_WEIGHTS],
        }
        tensors = [pb_utils.Tensor(name, made[name]()) for name in wanted]
        times.update(decode=decoded - start, model=ran - decoded, draw=time.perf_counter() - ran)
        return pb_utils.InferenceResponse(output_tensors=tensors), answer, pixels

    def finalize(self):
        self.pool.shutdown(wait=True)
        timer = self.times.timer
        if timer is not None:
            timer.cancel()
