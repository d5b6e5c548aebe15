"""serving.client's local side: its one-line errors, the checks of --url and --out made before
any request (a typo in either costs one line on stderr, not a traceback after the inference ran),
reading the images, writing the results and the --check against onnxruntime."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import cv2
import numpy as np

from serving.decode import decode_image

if TYPE_CHECKING:
    from serving.client import Result

# Schemes each protocol takes, and whether they mean TLS (tritonclient's `ssl=True`).
SCHEMES = {"http": {"http": False, "https": True}, "grpc": {"grpc": False, "grpcs": True}}

EPILOG = """\
--url is HOST:PORT ([::1]:PORT for IPv6). HTTP also takes http://HOST:PORT[/PREFIX] and
https://HOST:PORT (TLS, verified against the default CA bundle); gRPC takes grpc://HOST:PORT and
grpcs://HOST:PORT (TLS) and refuses an http(s):// URL, which names the HTTP endpoint.

exit status:
  0  every image segmented (and --check passed)
  1  server, connection or internal failure (after --retries), or a failed --check
  2  bad input: arguments, --url, --out, an unreadable or undecodable image, or a request
     the server refused as invalid (HTTP 400 / gRPC INVALID_ARGUMENT), for both --model
     values and both protocols; everything the client can check is checked before any request
"""


class ClientError(RuntimeError):
    """A one-line failure; `code` is the CLI's exit status (1 server/connection, 2 bad input)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def parse_url(url: str, protocol: str) -> tuple[str, bool]:
    """(address for tritonclient's InferenceServerClient, ssl) from --url (ClientError, code 2, otherwise)."""
    if protocol not in SCHEMES:
        raise ClientError(f"unknown protocol {protocol!r}: use http or grpc", 2)
    text = url.strip() if isinstance(url, str) else ""
    expected = "expected HOST:PORT" + (", http://HOST:PORT or https://HOST:PORT" if protocol == "http"
                                       else ", grpc://HOST:PORT or grpcs://HOST:PORT")
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


def check_out_dir(out: str | Path, names: Sequence[str], suffixes: Sequence[str]) -> Path:
    """--out as a directory the client can create or write <name>_<suffix>.png into (ClientError, code 2, otherwise)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClientError(f"--out {out} exists and is not a directory", 2)
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise ClientError(f"--out {out} is not writable", 2)
    else:
        parent = next(p for p in [*out.absolute().parents] if p.exists())  # "/" always exists
        if not parent.is_dir():
            raise ClientError(f"cannot create --out {out}: {parent} is not a directory", 2)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ClientError(f"cannot create --out {out}: {parent} is not writable", 2)
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:  # a/x.png and b/x.png would both write x_labels.png, the second over the first
            raise ClientError(f"images {seen[name] + 1} and {index + 1} are both named {name!r}: "
                              f"their results would overwrite each other in --out {out}", 2)
        seen[name] = index
        for suffix in suffixes:
            target = out / f"{name}_{suffix}.png"
            if target.exists() and not target.is_file():
                raise ClientError(f"cannot write {target}: it exists and is not a file", 2)
    return out


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


def decode(name: str, data: bytes) -> np.ndarray:
    try:
        return decode_image(data)
    except ValueError as err:
        raise ClientError(f"{name}: {err}", 2) from None


def check_against_onnx(results: list[Result], items: list[tuple[str, bytes]], onnx_path: str | Path) -> float:
    """Fraction of pixels whose server label equals in-process onnxruntime's on `onnx_path`."""
    from serving.ort_memory import cpu_session  # onnxruntime: only for --check

    if not Path(onnx_path).is_file():
        raise ClientError(f"--check: no ONNX file at {onnx_path}", 2)
    session = cpu_session(onnx_path)
    same = total = 0
    for result, (name, data) in zip(results, items, strict=True):
        image = result.image if result.image is not None else decode(name, data)
        expected = session.run(["labels"], {"images": image[np.newaxis]})[0][0]
        if expected.shape != result.labels.shape:
            raise ClientError(f"--check: {name}: server labels {result.labels.shape} vs onnxruntime {expected.shape}", 1)
        same += int((expected == result.labels).sum())
        total += expected.size
    return same / max(total, 1)


def write_results(results: list[Result], out: Path) -> list[Path]:
    try:  # main() checked --out before any request; this is for library callers and races
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ClientError(f"cannot create {out}: {err.strerror or err}", 2) from None
    written = []
    for result in results:
        for suffix, image in (("labels", result.labels), ("overlay", cv2.cvtColor(result.overlay, cv2.COLOR_RGB2BGR))):
            path = out / f"{result.name}_{suffix}.png"
            if not cv2.imwrite(str(path), image):
                raise ClientError(f"cannot write {path}", 2)
            written.append(path)
    return written
