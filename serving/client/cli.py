"""Client for the served repository (SPEC §9): a library function and a CLI on top.

    python -m serving.client street.jpg --url 127.0.0.1:8000 --out results/
    python -m serving.client a.png b.png --url 127.0.0.1:8001 --protocol grpc --model medoe \
        --out results/ --check --onnx model_repository/medoe/1/model.onnx

Writes <stem>_labels.png and <stem>_overlay.png per image into --out and prints each image's
size and largest classes. Exit codes (the --help epilog has the whole convention): 0 ok, 1
server, connection or internal failure or a failed --check, 2 bad input, including an image the
server refused as invalid.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from medoe.contract import LABELS, MODEL, OVERLAY, SEGMENT
from serving.client import segment_images
from serving.client.check import MIN_AGREEMENT, check_against_onnx
from serving.client.connection import parse_url
from serving.client.errors import ClientError
from serving.client.files import check_out_dir, read_inputs, write_results

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


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serving.client",
        description=__doc__.split("\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", help="encoded image files (JPEG/PNG/BMP/WebP)")
    parser.add_argument(
        "--url", default="127.0.0.1:8000", help="HOST:PORT, or a URL as below (8000 HTTP, 8001 gRPC by default)"
    )
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--model", choices=(SEGMENT, MODEL), default=SEGMENT)
    parser.add_argument("--out", required=True, help="directory for <stem>_labels.png and <stem>_overlay.png")
    parser.add_argument("--check", action="store_true", help="compare labels with onnxruntime on --onnx")
    parser.add_argument("--onnx", help="local ONNX graph for --check")
    parser.add_argument(
        "--retries", type=int, default=3, help="retries on connection errors and HTTP 5xx / gRPC UNAVAILABLE, INTERNAL"
    )
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
        out = check_out_dir(args.out, [name for name, _ in items], (LABELS, OVERLAY))
        results, meta = segment_images(
            items, args.url, args.protocol, args.model, args.retries, args.backoff, args.timeout
        )
        write_results(results, out)
        for result in results:
            share = result.class_share
            top = [c for c in np.argsort(share)[::-1][:3] if share[c] > 0]
            shares = ", ".join(f"{meta.class_names[c]} {share[c]:.1%}" for c in top)
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
