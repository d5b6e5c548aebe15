"""Client for the served repository (SPEC §9): a library function and a CLI on top.

    python -m serving.client street.jpg --url 127.0.0.1:8000 --out results/
    python -m serving.client a.png b.png --url 127.0.0.1:8001 --protocol grpc --model medoe \
        --out results/ --check --onnx model_repository/medoe/1/model.onnx

`segment` gets each image's encoded bytes (one request per image, all in flight at once);
`medoe` gets decoded uint8 [N, H, W, 3] batches of same-sized images, and the overlay and
class shares are then computed here. Palette and class names come from `medoe`'s config.
Exit codes: 0 ok, 1 server error (with the server's message) or failed --check, 2 bad input.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from serving.processing import class_share, decode_image, overlay, palette_array

SEGMENT_OUTPUTS = ("labels", "overlay", "class_share", "confidence", "expert_weights")
MEDOE_OUTPUTS = ("labels", "confidence", "expert_weights")
MIN_AGREEMENT = 0.9999


class ClientError(RuntimeError):
    """A one-line failure; `code` is the CLI's exit status (1 server, 2 bad input)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class Result:
    name: str
    labels: np.ndarray  # uint8 [H, W]
    overlay: np.ndarray  # uint8 [H, W, 3] RGB
    class_share: np.ndarray  # float32 [C]
    confidence: np.ndarray  # float32 [H, W], max of the final class probabilities
    expert_weights: np.ndarray  # float32 [K, h, w]
    image: np.ndarray | None = None  # decoded RGB, only when decoded here (medoe, --check)
    seconds: float = 0.0  # wall time of the inference requests this result came back with


@dataclass
class Metadata:
    class_names: list[str]
    palette: np.ndarray  # uint8 [256, 3]
    max_batch_size: int
    groups: dict[str, list[int]] = field(default_factory=dict)  # head/body/tail -> class ids; expert k owns group k


def _modules(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ClientError(f"unknown protocol {protocol!r}: use http or grpc", 2)
    from tritonclient.utils import InferenceServerException

    return module, InferenceServerException


def _is_connection_error(err: Exception) -> bool:
    # HTTP surfaces socket errors as OSError, a connection the server closed mid-request (it was
    # killed) as geventhttpclient's HTTPConnectionClosed, an http.client.HTTPException; gRPC as UNAVAILABLE.
    return isinstance(err, OSError | http.client.HTTPException) or "UNAVAILABLE" in str(getattr(err, "status", lambda: "")())


# Answers that a retry can fix: the server (or a python-backend stub, "Stub process ... is not
# healthy") failed, is restarting or is overloaded. A bad request (HTTP 400 / INVALID_ARGUMENT)
# gets the same answer every time, so it fails at once with the server's message.
TRANSIENT_STATUSES = {"500", "502", "503", "504", "StatusCode.INTERNAL", "StatusCode.UNAVAILABLE"}


def _is_transient(err: Exception) -> bool:
    return _is_connection_error(err) or str(getattr(err, "status", lambda: "")()) in TRANSIENT_STATUSES


def _server_message(err: Exception) -> str:
    message = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
    return " ".join(str(message or type(err).__name__).split())  # one line, even for a multi-line message


def with_retries(call: Callable, retries: int, backoff: float, url: str):
    """call() retried on connection errors and transient server errors (HTTP 5xx, gRPC
    UNAVAILABLE/INTERNAL) after backoff, 2*backoff, 4*backoff ... seconds."""
    _, server_error = _modules("http")
    for attempt in range(retries + 1):
        try:
            return call()
        except (OSError, http.client.HTTPException, server_error) as err:
            if not _is_transient(err):
                raise ClientError(f"server: {_server_message(err)}", 1) from None
            if attempt == retries:
                if _is_connection_error(err):
                    raise ClientError(f"cannot reach {url} after {retries + 1} attempts: {_server_message(err)}", 1) from None
                tries = f" (after {retries + 1} attempts)" if retries else ""
                raise ClientError(f"server: {_server_message(err)}{tries}", 1) from None
            time.sleep(backoff * 2 ** attempt)


def read_inputs(paths_or_bytes: Sequence[str | Path | bytes | tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) per item; a missing or unreadable file is a bad input (code 2)."""
    items = []
    for index, item in enumerate(paths_or_bytes):
        if isinstance(item, bytes | bytearray | memoryview):
            items.append((f"image{index}", bytes(item)))
            continue
        if isinstance(item, tuple):  # (name, bytes), already read
            items.append((str(item[0]), bytes(item[1])))
            continue
        path = Path(item)
        try:
            items.append((path.stem, path.read_bytes()))
        except OSError as err:
            raise ClientError(f"cannot read {path}: {err.strerror or err}", 2) from None
    if not items:
        raise ClientError("no images given", 2)
    return items


def fetch_metadata(client, protocol: str) -> Metadata:
    """Palette, class names and max_batch_size from `medoe`'s config parameters."""
    config = client.get_model_config("medoe", as_json=True) if protocol == "grpc" else client.get_model_config("medoe")
    config = config.get("config", config)  # gRPC's JSON wraps the config
    parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    if "palette" not in parameters:
        raise ClientError("server: model 'medoe' has no `palette` parameter in its config", 1)
    palette = json.loads(parameters["palette"])
    names = json.loads(parameters.get("class_names", "null")) or [str(i) for i in range(len(palette))]
    groups = {str(k): [int(c) for c in v] for k, v in json.loads(parameters.get("groups", "{}")).items()}
    return Metadata(names, palette_array(palette), int(config.get("max_batch_size", 0) or 0), groups)


def get_metadata(url: str, protocol: str = "http", retries: int = 3, backoff: float = 0.5) -> Metadata:
    """`medoe`'s metadata alone (what a UI needs before the first image)."""
    module, _ = _modules(protocol)
    client = module.InferenceServerClient(url)
    try:
        return with_retries(lambda: fetch_metadata(client, protocol), retries, backoff, url)
    finally:
        client.close()


def _decode(name: str, data: bytes) -> np.ndarray:
    try:
        return decode_image(data)
    except ValueError as err:
        raise ClientError(f"{name}: {err}", 2) from None


def _gather(client, protocol: str, module, model: str, requests: list[list], outputs: Sequence[str]) -> list:
    """All requests in flight at once; results in request order (the server's error raised first)."""
    wanted = [module.InferRequestedOutput(n, binary_data=True) if protocol == "http"
              else module.InferRequestedOutput(n) for n in outputs]
    if protocol == "http":
        pending = [client.async_infer(model, inputs, outputs=wanted) for inputs in requests]
        return [p.get_result() for p in pending]
    done: queue.Queue = queue.Queue()
    for index, inputs in enumerate(requests):
        client.async_infer(model, inputs, lambda result, error, i=index: done.put((i, result, error)), outputs=wanted)
    results: list = [None] * len(requests)
    for _ in requests:
        index, result, error = done.get()
        if error is not None:
            raise error
        results[index] = result
    return results


def _tensor(module, protocol: str, name: str, array: np.ndarray, dtype: str):
    tensor = module.InferInput(name, list(array.shape), dtype)
    if protocol == "http":
        tensor.set_data_from_numpy(array, binary_data=True)
    else:
        tensor.set_data_from_numpy(array)
    return tensor


def segment_images(paths_or_bytes: Sequence[str | Path | bytes], url: str, protocol: str = "http",
                   model: str = "segment", retries: int = 3, backoff: float = 0.5,
                   timeout: float = 60.0) -> tuple[list[Result], Metadata]:
    """Segments every image on the server at `url`; results in input order, plus `medoe`'s metadata."""
    if model not in ("segment", "medoe"):
        raise ClientError(f"unknown model {model!r}: use segment or medoe", 2)
    module, _ = _modules(protocol)
    items = read_inputs(paths_or_bytes)
    decoded = [_decode(name, data) for name, data in items] if model == "medoe" else None
    if protocol == "http":
        client = module.InferenceServerClient(url, concurrency=max(1, min(len(items), 16)),
                                              connection_timeout=timeout, network_timeout=timeout)
    else:
        client = module.InferenceServerClient(url)
    try:
        meta = with_retries(lambda: fetch_metadata(client, protocol), retries, backoff, url)
        if model == "segment":
            requests = [[_tensor(module, protocol, "image", np.array([data], dtype=object), "BYTES")] for _, data in items]
            start = time.perf_counter()
            answers = with_retries(lambda: _gather(client, protocol, module, "segment", requests, SEGMENT_OUTPUTS),
                                   retries, backoff, url)
            seconds = time.perf_counter() - start
            return [Result(name, *(a.as_numpy(n) for n in SEGMENT_OUTPUTS), seconds=seconds)
                    for (name, _), a in zip(items, answers, strict=True)], meta
        # Same-sized images go together, at most max_batch_size per request (0: no batching).
        groups: dict[tuple, list[int]] = {}
        for index, image in enumerate(decoded):
            groups.setdefault(image.shape, []).append(index)
        step = meta.max_batch_size or 1
        batches = [ids[i:i + step] for ids in groups.values() for i in range(0, len(ids), step)]
        requests = [[_tensor(module, protocol, "images", np.stack([decoded[i] for i in ids]), "UINT8")] for ids in batches]
        start = time.perf_counter()
        answers = with_retries(lambda: _gather(client, protocol, module, "medoe", requests, MEDOE_OUTPUTS),
                               retries, backoff, url)
        seconds = time.perf_counter() - start
        results: list[Result | None] = [None] * len(items)
        for ids, answer in zip(batches, answers, strict=True):
            labels, confidence, weights = (answer.as_numpy(n) for n in MEDOE_OUTPUTS)
            for row, i in enumerate(ids):
                results[i] = Result(items[i][0], labels[row], overlay(decoded[i], labels[row], meta.palette),
                                    class_share(labels[row], len(meta.class_names)), confidence[row], weights[row],
                                    decoded[i], seconds)
        return results, meta
    finally:
        client.close()


def check_against_onnx(results: list[Result], items: list[tuple[str, bytes]], onnx_path: str | Path) -> float:
    """Fraction of pixels whose server label equals in-process onnxruntime's on `onnx_path`."""
    import onnxruntime as ort

    if not Path(onnx_path).is_file():
        raise ClientError(f"--check: no ONNX file at {onnx_path}", 2)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    same = total = 0
    for result, (name, data) in zip(results, items, strict=True):
        image = result.image if result.image is not None else _decode(name, data)
        expected = session.run(["labels"], {"images": image[np.newaxis]})[0][0]
        if expected.shape != result.labels.shape:
            raise ClientError(f"--check: {name}: server labels {result.labels.shape} vs onnxruntime {expected.shape}", 1)
        same += int((expected == result.labels).sum())
        total += expected.size
    return same / max(total, 1)


def write_results(results: list[Result], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for result in results:
        for suffix, image in (("labels", result.labels), ("overlay", cv2.cvtColor(result.overlay, cv2.COLOR_RGB2BGR))):
            path = out / f"{result.name}_{suffix}.png"
            if not cv2.imwrite(str(path), image):
                raise ClientError(f"cannot write {path}", 2)
            written.append(path)
    return written


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="encoded image files (JPEG/PNG/BMP/WebP)")
    parser.add_argument("--url", default="127.0.0.1:8000", help="HOST:PORT (8000 HTTP, 8001 gRPC by default)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--model", choices=("segment", "medoe"), default="segment")
    parser.add_argument("--out", required=True, help="directory for <stem>_labels.png and <stem>_overlay.png")
    parser.add_argument("--check", action="store_true", help="compare labels with onnxruntime on --onnx")
    parser.add_argument("--onnx", help="local ONNX graph for --check")
    parser.add_argument("--retries", type=int, default=3, help="retries on connection errors and HTTP 5xx / gRPC UNAVAILABLE, INTERNAL")
    parser.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds, doubled each time")
    parser.add_argument("--timeout", type=float, default=60.0, help="HTTP connection/network timeout in seconds")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        if args.check and not args.onnx:
            raise ClientError("--check needs --onnx PATH", 2)
        if args.retries < 0 or args.backoff < 0:
            raise ClientError("--retries and --backoff must be >= 0", 2)
        items = read_inputs(args.images)
        results, meta = segment_images(items, args.url, args.protocol, args.model, args.retries, args.backoff, args.timeout)
        write_results(results, Path(args.out))
        for result in results:
            top = np.argsort(result.class_share)[::-1][:3]
            shares = ", ".join(f"{meta.class_names[c]} {result.class_share[c]:.1%}" for c in top if result.class_share[c] > 0)
            print(f"{result.name}: {result.labels.shape[1]}x{result.labels.shape[0]} {shares}")
        if args.check:
            agreement = check_against_onnx(results, items, args.onnx)
            print(f"check: labels agree with onnxruntime on {agreement:.4%} of pixels (need {MIN_AGREEMENT:.2%})")
            if agreement < MIN_AGREEMENT:
                raise ClientError(f"check failed: agreement {agreement:.4%} is below {MIN_AGREEMENT:.2%}", 1)
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
