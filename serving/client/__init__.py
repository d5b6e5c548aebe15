"""serving.client: segments images on the served repository (SPEC §9), as a library.

    results, meta = segment_images(["street.jpg"], "127.0.0.1:8000")                 # `segment`: encoded images
    results, meta = segment_images(paths, "127.0.0.1:8001", "grpc", model="medoe", outputs=("labels",))

`segment` gets each image's encoded bytes (one request per image, all in flight at once);
`medoe` gets decoded uint8 [N, H, W, 3] batches of same-sized images (decoded here, or given
decoded), and the overlay and class shares are then computed here. The metadata (class names,
palette, groups, what each expert owns) is `medoe`'s config parameters, read by medoe.contract.

One job per module: this file is the library (requests, retries, metadata); `connection`
reaches Triton (--url, tritonclient, requests in flight); `files` is the local side (inputs,
decoding, --out, PNGs); `check` compares with onnxruntime (--check); `cli` is
`python -m serving.client` (its --help has the exit codes).
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medoe.contract import (
    CLASS_SHARE,
    CONFIDENCE,
    DEFAULT_OUTPUTS,
    EXPERT_WEIGHTS,
    IMAGE,
    IMAGES,
    LABELS,
    MODEL,
    OVERLAY,
    SEGMENT,
    SEGMENT_OUTPUTS,
    MetadataError,
    ModelMetadata,
    triton_parameters,
)
from serving.client.check import MIN_AGREEMENT, check_against_onnx
from serving.client.connection import connect, gather, parse_url, protocol_modules, tensor
from serving.client.errors import ClientError
from serving.client.files import decode, read_inputs, write_results
from serving.processing import class_share, overlay, palette_array

__all__ = [
    "MIN_AGREEMENT",
    "ClientError",
    "Metadata",
    "Result",
    "check_against_onnx",
    "fetch_metadata",
    "get_metadata",
    "read_inputs",
    "segment_images",
    "with_retries",
    "write_results",
]


@dataclass
class Result:
    """One image's answer; a field whose output was not requested is None."""

    name: str
    labels: np.ndarray | None = None  # uint8 [H, W]
    overlay: np.ndarray | None = None  # uint8 [H, W, 3] RGB
    class_share: np.ndarray | None = None  # float32 [C]
    confidence: np.ndarray | None = None  # float32 [H, W], max of the final class probabilities
    expert_weights: np.ndarray | None = None  # float32 [K, h, w]
    image: np.ndarray | None = None  # decoded RGB, only when decoded here or given decoded (medoe)
    seconds: float = 0.0  # wall time of the inference requests this result came back with


@dataclass(frozen=True)
class Metadata:
    """`medoe`'s metadata as served: the decoded contract, its palette as a lookup table and the batch limit."""

    model: ModelMetadata
    palette: np.ndarray  # uint8 [256, 3]: any uint8 label indexes it
    max_batch_size: int

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def groups(self) -> dict[str, list[int]]:
        """head/body/tail -> class ids at the report's fixed thresholds: for reports, not experts."""
        return self.model.groups

    @property
    def expert_groups(self) -> list[list[int]]:
        """Expert k's own classes (K lists)."""
        return self.model.expert_groups

    @property
    def num_experts(self) -> int:
        return self.model.num_experts


# Answers that a retry can fix: the server (or a python-backend stub, "Stub process ... is not
# healthy") failed, is restarting or is overloaded. A bad request (HTTP 400 / INVALID_ARGUMENT)
# gets the same answer every time, so it fails at once with the server's message.
TRANSIENT_STATUSES = {"500", "502", "503", "504", "StatusCode.INTERNAL", "StatusCode.UNAVAILABLE"}
# The server refused what it was sent (a python backend's TritonError.INVALID_ARG): for an
# inference request that is the caller's image, so bad input (exit 2) like a file the client
# could not decode; for the metadata request it means a wrong server (exit 1).
INVALID_STATUSES = {"400", "StatusCode.INVALID_ARGUMENT"}


def _status(err: Exception) -> str:
    return str(getattr(err, "status", lambda: "")())


def _is_connection_error(err: Exception) -> bool:
    # HTTP surfaces socket errors as OSError, a connection the server closed mid-request (it was
    # killed) as geventhttpclient's HTTPConnectionClosed, an http.client.HTTPException; gRPC as UNAVAILABLE.
    return isinstance(err, OSError | http.client.HTTPException) or "UNAVAILABLE" in _status(err)


def _is_transient(err: Exception) -> bool:
    return _is_connection_error(err) or _status(err) in TRANSIENT_STATUSES


def _server_message(err: Exception) -> str:
    message = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
    return " ".join(str(message or type(err).__name__).split())  # one line, even for a multi-line message


def with_retries(call: Callable, retries: int, backoff: float, url: str, inference: bool = False):
    """call() retried on connection errors and transient server errors (HTTP 5xx, gRPC
    UNAVAILABLE/INTERNAL) after backoff, 2*backoff, 4*backoff ... seconds. With `inference`,
    a request refused as invalid is bad input (code 2), named by its `request_name`."""
    _, server_error = protocol_modules("http")
    for attempt in range(retries + 1):
        try:
            return call()
        except (OSError, http.client.HTTPException, server_error) as err:
            if not _is_transient(err):
                invalid = inference and _status(err) in INVALID_STATUSES
                name = f"{err.request_name}: " if invalid and getattr(err, "request_name", None) else ""
                raise ClientError(f"server: {name}{_server_message(err)}", 2 if invalid else 1) from None
            if attempt == retries:
                if _is_connection_error(err):
                    message = f"cannot reach {url} after {retries + 1} attempts: {_server_message(err)}"
                    raise ClientError(message, 1) from None
                tries = f" (after {retries + 1} attempts)" if retries else ""
                raise ClientError(f"server: {_server_message(err)}{tries}", 1) from None
            time.sleep(backoff * 2**attempt)


def fetch_metadata(client, protocol: str, name: str = MODEL) -> Metadata:
    """`medoe`'s (or model `name`'s) config parameters as medoe.contract's ModelMetadata (a server
    whose model lacks them is a server failure, code 1), with its palette table and max_batch_size."""
    config = client.get_model_config(name, as_json=True) if protocol == "grpc" else client.get_model_config(name)
    try:
        model = ModelMetadata.from_props(triton_parameters(config), f"model '{name}'")
        palette = palette_array(model.palette)
    except (MetadataError, ValueError) as err:
        raise ClientError(f"server: {' '.join(str(err).split())}", 1) from None
    config = config.get("config", config)  # gRPC's JSON wraps the config
    return Metadata(model, palette, int(config.get("max_batch_size", 0) or 0))


def get_metadata(url: str, protocol: str = "http", retries: int = 3, backoff: float = 0.5) -> Metadata:
    """`medoe`'s metadata alone (what a UI needs before the first image)."""
    client = connect(protocol, url)
    try:
        return with_retries(lambda: fetch_metadata(client, protocol), retries, backoff, url)
    finally:
        client.close()


def requested_outputs(outputs: Iterable[str] | None) -> tuple[str, ...]:
    """The Result fields asked for, in SEGMENT_OUTPUTS order (None: all of them)."""
    if outputs is None:
        return SEGMENT_OUTPUTS
    outputs = [outputs] if isinstance(outputs, str) else list(outputs)
    unknown = [name for name in outputs if name not in SEGMENT_OUTPUTS]
    if unknown or not outputs:
        what = f"unknown output {unknown[0]!r}" if unknown else "no outputs requested"
        raise ClientError(f"{what}: choose from {', '.join(SEGMENT_OUTPUTS)}", 2)
    return tuple(name for name in SEGMENT_OUTPUTS if name in outputs)


def segment_images(
    paths_or_bytes: Sequence[str | Path | bytes | np.ndarray | tuple],
    url: str,
    protocol: str = "http",
    model: str = SEGMENT,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 60.0,
    outputs: Iterable[str] | None = None,
) -> tuple[list[Result], Metadata]:
    """Segments every image on the server at `url`; results in input order, plus `medoe`'s metadata.

    Items are paths, encoded bytes, decoded RGB uint8 [H, W, 3] arrays (`medoe` only) or
    (name, bytes or array) pairs. `outputs` names the Result fields wanted, of SEGMENT_OUTPUTS
    (default: all); only what they need is requested, and the other fields are None."""
    if model not in (SEGMENT, MODEL):
        raise ClientError(f"unknown model {model!r}: use {SEGMENT} or {MODEL}", 2)
    wanted = requested_outputs(outputs)
    parse_url(url, protocol)  # a bad --protocol or --url before reading or decoding anything
    items = read_inputs(paths_or_bytes)
    if model == SEGMENT and (given := next((name for name, data in items if isinstance(data, np.ndarray)), None)):
        raise ClientError(f"{given}: {SEGMENT} takes encoded images; send the file's bytes, or use model {MODEL}", 2)
    decoded = [decode(name, data) for name, data in items] if model == MODEL else None
    client = connect(protocol, url, max(1, min(len(items), 16)), timeout)
    try:
        meta = with_retries(lambda: fetch_metadata(client, protocol), retries, backoff, url)
        if model == SEGMENT:
            return _segment_encoded(client, protocol, items, wanted, retries, backoff, url), meta
        return _segment_decoded(client, protocol, items, decoded, wanted, meta, retries, backoff, url), meta
    finally:
        client.close()


def _segment_encoded(
    client, protocol: str, items, wanted: tuple[str, ...], retries: int, backoff: float, url: str
) -> list[Result]:
    """`segment`: one request per encoded image; the server decodes, segments and draws."""
    requests = [[tensor(protocol, IMAGE, np.array([data], dtype=object), "BYTES")] for _, data in items]
    names = [name for name, _ in items]
    start = time.perf_counter()
    answers = with_retries(
        lambda: gather(client, protocol, SEGMENT, requests, wanted, names), retries, backoff, url, inference=True
    )
    seconds = time.perf_counter() - start
    return [
        Result(name, **{n: answer.as_numpy(n) for n in wanted}, seconds=seconds)
        for name, answer in zip(names, answers, strict=True)
    ]


def _segment_decoded(
    client,
    protocol: str,
    items,
    decoded: list[np.ndarray],
    wanted: tuple[str, ...],
    meta: Metadata,
    retries: int,
    backoff: float,
    url: str,
) -> list[Result]:
    """`medoe`: same-sized images batched, at most max_batch_size per request (0: no batching);
    overlay and class shares drawn here from the labels."""
    drawn = {OVERLAY, CLASS_SHARE} & set(wanted)
    fetched = [n for n in DEFAULT_OUTPUTS if n in wanted or (n == LABELS and drawn)]
    groups: dict[tuple, list[int]] = {}
    for index, image in enumerate(decoded):
        groups.setdefault(image.shape, []).append(index)
    step = meta.max_batch_size or 1
    batches = [ids[i : i + step] for ids in groups.values() for i in range(0, len(ids), step)]
    requests = [[tensor(protocol, IMAGES, np.stack([decoded[i] for i in ids]), "UINT8")] for ids in batches]
    names = [", ".join(items[i][0] for i in ids) for ids in batches]
    start = time.perf_counter()
    answers = with_retries(
        lambda: gather(client, protocol, MODEL, requests, fetched, names), retries, backoff, url, inference=True
    )
    seconds = time.perf_counter() - start
    results: list[Result | None] = [None] * len(items)
    for ids, answer in zip(batches, answers, strict=True):
        values = {n: answer.as_numpy(n) for n in fetched}
        for row, i in enumerate(ids):
            labels = values[LABELS][row] if LABELS in values else None
            results[i] = Result(
                items[i][0],
                labels=labels if LABELS in wanted else None,
                overlay=overlay(decoded[i], labels, meta.palette) if OVERLAY in wanted else None,
                class_share=class_share(labels, len(meta.class_names)) if CLASS_SHARE in wanted else None,
                confidence=values[CONFIDENCE][row] if CONFIDENCE in wanted else None,
                expert_weights=values[EXPERT_WEIGHTS][row] if EXPERT_WEIGHTS in wanted else None,
                image=decoded[i],
                seconds=seconds,
            )
    return results
