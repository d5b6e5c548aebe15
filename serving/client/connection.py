"""How serving.client reaches Triton: --url as tritonclient's address (checked before any
request, so a typo costs one line on stderr, not a traceback), the tritonclient module of each
protocol, the input tensors, and a list of requests sent all at once."""

from __future__ import annotations

import queue
from collections.abc import Sequence
from urllib.parse import urlsplit

import numpy as np

from serving.client.errors import ClientError

# Schemes each protocol takes, and whether they mean TLS (tritonclient's `ssl=True`).
SCHEMES = {"http": {"http": False, "https": True}, "grpc": {"grpc": False, "grpcs": True}}


def parse_url(url: str, protocol: str) -> tuple[str, bool]:
    """(address for tritonclient's InferenceServerClient, ssl) from --url (ClientError, code 2, otherwise)."""
    if protocol not in SCHEMES:
        raise ClientError(f"unknown protocol {protocol!r}: use http or grpc", 2)
    text = url.strip() if isinstance(url, str) else ""
    expected = "expected HOST:PORT" + (
        ", http://HOST:PORT or https://HOST:PORT" if protocol == "http" else ", grpc://HOST:PORT or grpcs://HOST:PORT"
    )
    if not text:
        raise ClientError(f"empty --url: {expected}", 2)
    scheme, ssl = "", False
    if "://" in text:
        scheme, text = text.split("://", 1)
        scheme = scheme.lower()
        if scheme in ("http", "https") and protocol == "grpc":
            raise ClientError(f"--url {url!r} is an HTTP URL but --protocol is grpc: {expected}", 2)
        if scheme not in SCHEMES[protocol]:
            raise ClientError(f"--url {url!r}: unknown scheme {scheme!r} for {protocol}: {expected}", 2)
        ssl = SCHEMES[protocol][scheme]
    parts = urlsplit("//" + text)
    try:
        port = parts.port
    except ValueError:  # "host:notaport", ":::", a port above 65535
        raise ClientError(f"--url {url!r} has no valid port: {expected}", 2) from None
    if parts.username is not None or parts.query or parts.fragment:
        raise ClientError(f"--url {url!r} has more than an address (user@, ?query or #fragment): {expected}", 2)
    if not parts.hostname:
        raise ClientError(f"--url {url!r} has no host: {expected}", 2)
    if not port:
        raise ClientError(f"--url {url!r} has no port (1..65535): {expected}", 2)
    path = parts.path.rstrip("/")
    if path and protocol == "grpc":  # gRPC addresses have no path; HTTP keeps a proxy's prefix
        raise ClientError(f"--url {url!r}: a gRPC address has no path: {expected}", 2)
    return parts.netloc + path, ssl


def protocol_modules(protocol: str):
    """(tritonclient.http or tritonclient.grpc, InferenceServerException), imported on first use."""
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ClientError(f"unknown protocol {protocol!r}: use http or grpc", 2)
    from tritonclient.utils import InferenceServerException

    return module, InferenceServerException


def connect(protocol: str, url: str, concurrency: int = 1, timeout: float = 60.0):
    module, _ = protocol_modules(protocol)
    address, ssl = parse_url(url, protocol)
    if protocol == "http":
        return module.InferenceServerClient(
            address, concurrency=concurrency, connection_timeout=timeout, network_timeout=timeout, ssl=ssl
        )
    return module.InferenceServerClient(address, ssl=ssl)


def tensor(protocol: str, name: str, array: np.ndarray, dtype: str):
    """One input tensor, sent as binary data over HTTP too."""
    module, _ = protocol_modules(protocol)
    value = module.InferInput(name, list(array.shape), dtype)
    if protocol == "http":
        value.set_data_from_numpy(array, binary_data=True)
    else:
        value.set_data_from_numpy(array)
    return value


def gather(
    client, protocol: str, model: str, requests: list[list], outputs: Sequence[str], names: Sequence[str]
) -> list:
    """All requests in flight at once, each asking for `outputs` only; results in request order
    (the server's error raised first, with the request's image names as `request_name`, so a
    refusal says which image)."""
    module, server_error = protocol_modules(protocol)
    wanted = [
        module.InferRequestedOutput(n, binary_data=True) if protocol == "http" else module.InferRequestedOutput(n)
        for n in outputs
    ]
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
