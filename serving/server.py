"""Serve a model repository with the tritonserver bundled in the nvidia-pytriton wheel.

    python -m serving.server --model-repository model_repository --http-port 8000 --grpc-port 8001 \
        --metrics-port 8002 --host 127.0.0.1

The command line around serving/supervisor.py (which starts tritonserver behind the Caddy proxy
and watches its python-backend stubs) and serving/repository.py (which turns the repository into
one that tritonserver can serve). It prints one `ready:` block, then watches: an exit of
tritonserver or the proxy, or a dead stub (which this Triton, 2.51, does not restart), is a
failure. With --restart it kills tritonserver and starts it again on the same ports (at most
--max-restarts times within --restart-window seconds), without it it stops and exits 1.
Exit codes: 2 when the server cannot start, 1 on a failure, else 0 once SIGTERM or SIGINT stopped it cleanly.
"""

from __future__ import annotations

import argparse
import collections
import signal
import sys
import time
from pathlib import Path

from serving.processes import exit_reason
from serving.proxy import DEFAULT_MAX_REQUEST_BYTES
from serving.repository import ServerError
from serving.supervisor import start_server

ROOT = Path(__file__).resolve().parents[1]


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="larger HTTP request bodies are answered 413 by the proxy",
    )
    parser.add_argument("--log-file", help="tritonserver's log (default: a file in the temporary directory)")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="start tritonserver again when it exits unexpectedly or a python-backend stub dies",
    )
    parser.add_argument(
        "--max-restarts", type=int, default=5, help="with --restart: give up (exit 1) after this many ..."
    )
    parser.add_argument("--restart-window", type=float, default=60.0, help="... restarts within this many seconds")
    args = parser.parse_args(argv)
    if args.max_restarts < 0 or args.restart_window <= 0:
        parser.error("--max-restarts must be >= 0 and --restart-window > 0")
    if args.max_request_bytes < 1:
        parser.error("--max-request-bytes must be positive")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        handle = start_server(
            args.model_repository,
            args.http_port,
            args.grpc_port,
            args.metrics_port,
            args.host,
            args.timeout,
            args.log_file,
            args.max_request_bytes,
        )
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)  # main loop below stops the server and exits

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(
        f"ready: models {', '.join(handle.models)}\n  HTTP    http://{handle.http_url} (through caddy)\n"
        f"  gRPC    {handle.grpc_url}\n  metrics {handle.metrics_url}\n  log     {handle.log_path}",
        flush=True,
    )
    restarts: collections.deque[float] = collections.deque()  # times of the restarts within the window
    failure = None
    while not stopping:
        if failure is None and handle.process.poll() is not None:
            failure = f"tritonserver {exit_reason(handle.process.returncode)}"
            if handle.process.returncode > 0:
                failure += f": {handle.log_tail(1)}"
        elif failure is None and handle.proxy_exited():
            failure = handle.proxy_failure()
        elif failure is None and (dead := handle.dead_stubs()):
            failure = f"python-backend stub of {', '.join(dead)} died; Triton 2.51 does not restart it"
        elif failure is None:
            time.sleep(0.5)
            continue
        while restarts and restarts[0] < time.monotonic() - args.restart_window:
            restarts.popleft()
        if not args.restart or len(restarts) >= args.max_restarts:
            limit = f" ({len(restarts)} restarts within {args.restart_window:.0f} s)" if args.restart else ""
            print(f"error: {failure}{limit}", file=sys.stderr, flush=True)
            handle.stop(2)  # short: with a dead stub, Triton's SIGTERM waits its whole exit timeout in vain
            return 1
        restarts.append(time.monotonic())
        backoff = min(0.5 * 2 ** (len(restarts) - 1), 8.0)  # a crash loop must not spin
        print(
            f"restart: {failure}; starting it again on the same ports in {backoff:.1f} s "
            f"({len(restarts)}/{args.max_restarts} within {args.restart_window:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            handle.restart(args.timeout, abort=lambda: bool(stopping))
            failure = None
        except ServerError as err:  # e.g. killed again while starting: one more failure towards the cap
            failure = f"restart failed: {err}"
    code = handle.stop()
    return 0 if code in (0, -signal.SIGTERM) else 1


if __name__ == "__main__":
    sys.exit(main())
