"""Client for the served repository (SPEC §9): a library function and a CLI on top.

    python -m serving.client street.jpg --url 127.0.0.1:8000 --out results/
    python -m serving.client a.png b.png --url 127.0.0.1:8001 --protocol grpc --model medoe \
        --out results/ --check --onnx model_repository/medoe/1/model.onnx

`segment` gets each image's encoded bytes (one request per image, all in flight at once);
`medoe` gets decoded uint8 [N, H, W, 3] batches of same-sized images, and the overlay and
class shares are then computed here. Palette and class names come from `medoe`'s config.
Exit codes (the --help epilog has the whole convention): 0 ok, 1 server, connection or internal
failure or a failed --check, 2 bad input, including an image the server refused as invalid.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import queue
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The local side lives in client_io; its names stay importable from here (serving.client.ClientError ...).
from serving.client_io import (
    EPILOG,
    ClientError,
    check_against_onnx,
    check_out_dir,
    decode,
    parse_url,
    read_inputs,
    write_results,
)
from serving.processing import class_share, overlay, palette_array

__all__ = ["ClientError", "Metadata", "Result", "check_against_onnx", "get_metadata", "read_inputs",
           "segment_images", "with_retries", "write_results"]

SEGMENT_OUTPUTS = ("labels", "overlay", "class_share", "confidence", "expert_weights")
MEDOE_OUTPUTS = ("labels", "confidence", "expert_weights")
MIN_AGREEMENT = 0.9999


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


def _connect(module, protocol: str, url: str, concurrency: int = 1, timeout: float = 60.0):
    address, ssl = parse_url(url, protocol)
    if protocol == "http":
        return module.InferenceServerClient(address, concurrency=concurrency, connection_timeout=timeout,
                                            network_timeout=timeout, ssl=ssl)
    return module.InferenceServerClient(address, ssl=ssl)


def _is_connection_error(err: Exception) -> bool:
    # HTTP surfaces socket errors as OSError, a connection the server closed mid-request (it was
    # killed) as geventhttpclient's HTTPConnectionClosed, an http.client.HTTPException; gRPC as UNAVAILABLE.
    return isinstance(err, OSError | http.client.HTTPException) or "UNAVAILABLE" in str(getattr(err, "status", lambda: "")())


# Answers that a retry can fix: the server (or a python-backend stub, "Stub process ... is not
# healthy") failed, is restarting or is overloaded. A bad request (HTTP 400 / INVALID_ARGUMENT)
# gets the same answer every time, so it fails at once with the server's message.
TRANSIENT_STATUSES = {"500", "502", "503", "504", "StatusCode.INTERNAL", "StatusCode.UNAVAILABLE"}
# The server refused what it was sent (a python backend's TritonError.INVALID_ARG): for an
# inference request that is the caller's image, so bad input (exit 2) like a file the client
# could not decode; for the metadata request it means a wrong server (exit 1).
INVALID_STATUSES = {"400", "StatusCode.INVALID_ARGUMENT"}


def _is_transient(err: Exception) -> bool:
    return _is_connection_error(err) or str(getattr(err, "status", lambda: "")()) in TRANSIENT_STATUSES


def _server_message(err: Exception) -> str:
    message = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
    return " ".join(str(message or type(err).__name__).split())  # one line, even for a multi-line message


def with_retries(call: Callable, retries: int, backoff: float, url: str, inference: bool = False):
    """call() retried on connection errors and transient server errors (HTTP 5xx, gRPC
    UNAVAILABLE/INTERNAL) after backoff, 2*backoff, 4*backoff ... seconds. With `inference`,
    a request refused as invalid is bad input (code 2), named by its `request_name`."""
    _, server_error = _modules("http")
    for attempt in range(retries + 1):
        try:
            return call()
        except (OSError, http.client.HTTPException, server_error) as err:
            if not _is_transient(err):
                invalid = inference and str(getattr(err, "status", lambda: "")()) in INVALID_STATUSES
                name = f"{err.request_name}: " if invalid and getattr(err, "request_name", None) else ""
                raise ClientError(f"server: {name}{_server_message(err)}", 2 if invalid else 1) from None
            if attempt == retries:
                if _is_connection_error(err):
                    raise ClientError(f"cannot reach {url} after {retries + 1} attempts: {_server_message(err)}", 1) from None
                tries = f" (after {retries + 1} attempts)" if retries else ""
                raise ClientError(f"server: {_server_message(err)}{tries}", 1) from None
            time.sleep(backoff * 2 ** attempt)


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
    client = _connect(module, protocol, url)
    try:
        return with_retries(lambda: fetch_metadata(client, protocol), retries, backoff, url)
    finally:
        client.close()


def _gather(client, protocol: str, module, model: str, requests: list[list], outputs: Sequence[str],
            names: Sequence[str]) -> list:
    """All requests in flight at once; results in request order (the server's error raised first,
    with the request's image names as `request_name`, so a refusal says which image)."""
    wanted = [module.InferRequestedOutput(n, binary_data=True) if protocol == "http"
              else module.InferRequestedOutput(n) for n in outputs]
    _, server_error = _modules(protocol)
    results: list = [None] * len(requests)
    if protocol == "http":
        pending = [client.async_infer(model, inputs, outputs=wanted) for inputs in requests]
        for index, request in enumerate(pending):
            try:
                results[index] = request.get_result()
            except server_error as err:
                err.request_name = names[index]
                raise
        return results
    done: queue.Queue = queue.Queue()
    for index, inputs in enumerate(requests):
        client.async_infer(model, inputs, lambda result, error, i=index: done.put((i, result, error)), outputs=wanted)
    for _ in requests:
        index, result, error = done.get()
        if error is not None:
            error.request_name = names[index]
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
    parse_url(url, protocol)  # a bad --url before reading or decoding anything
    items = read_inputs(paths_or_bytes)
    decoded = [decode(name, data) for name, data in items] if model == "medoe" else None
    client = _connect(module, protocol, url, max(1, min(len(items), 16)), timeout)
    try:
        meta = with_retries(lambda: fetch_metadata(client, protocol), retries, backoff, url)
        if model == "segment":
            requests = [[_tensor(module, protocol, "image", np.array([data], dtype=object), "BYTES")] for _, data in items]
            start = time.perf_counter()
            names = [name for name, _ in items]
            answers = with_retries(lambda: _gather(client, protocol, module, "segment", requests, SEGMENT_OUTPUTS, names),
                                   retries, backoff, url, inference=True)
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
        names = [", ".join(items[i][0] for i in ids) for ids in batches]
        answers = with_retries(lambda: _gather(client, protocol, module, "medoe", requests, MEDOE_OUTPUTS, names),
                               retries, backoff, url, inference=True)
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


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="encoded image files (JPEG/PNG/BMP/WebP)")
    parser.add_argument("--url", default="127.0.0.1:8000", help="HOST:PORT, or a URL as below (8000 HTTP, 8001 gRPC by default)")
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
        # Every argument, file and output location first: nothing is sent before all of them pass.
        if args.check and not args.onnx:
            raise ClientError("--check needs --onnx PATH", 2)
        if args.check and not Path(args.onnx).is_file():
            raise ClientError(f"--check: no ONNX file at {args.onnx}", 2)
        if args.retries < 0 or not 0 <= args.backoff < math.inf:  # `not` also catches nan
            raise ClientError("--retries and --backoff must be >= 0", 2)
        if not 0 < args.timeout < math.inf:
            raise ClientError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}", 2)
        parse_url(args.url, args.protocol)
        items = read_inputs(args.images)
        out = check_out_dir(args.out, [name for name, _ in items], ("labels", "overlay"))
        results, meta = segment_images(items, args.url, args.protocol, args.model, args.retries, args.backoff, args.timeout)
        write_results(results, out)
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
