#!/usr/bin/env bash
# The container's server: `serve.sh tritonserver FLAGS...` runs tritonserver with its HTTP and
# metrics on Unix sockets and Caddy in front of them on 8000 and 8002 (serving/proxy.py says
# why: one form-encoded body of 4.2 MB kills this Triton's HTTP server). gRPC (8001) is
# tritonserver's own. Either process exiting stops the other and the container, so Docker's
# restart policy or the kubelet starts both again. SIGTERM drains: tritonserver first (it
# finishes the requests in flight), then the proxy that carries their answers.
#
# SERVE_SOCKETS and SERVE_PROXY_CONFIG exist for tests/test_dockerfile.py, which runs this script
# with the bundled tritonserver; the config's socket paths must match SERVE_SOCKETS.
set -uo pipefail
sockets=${SERVE_SOCKETS:-/run/triton}
config=${SERVE_PROXY_CONFIG:-/opt/medoe/proxy-config.json}
if [ $# -eq 0 ]; then
    echo "usage: serve.sh tritonserver [FLAGS...]" >&2
    exit 2
fi
mkdir -p "$sockets" && rm -f "$sockets/http.sock" "$sockets/metrics.sock" || exit 1

"$@" "--http-address=unix:$sockets/http.sock" --http-port=0 \
     "--metrics-address=unix:$sockets/metrics.sock" --metrics-port=0 &
triton=$!
# Caddy keeps no state here (no TLS, no autosaved config), but it wants writable XDG dirs.
HOME=/tmp XDG_DATA_HOME=/tmp/caddy XDG_CONFIG_HOME=/tmp/caddy caddy run --config "$config" &
proxy=$!

drain() {
    kill -TERM "$triton" 2>/dev/null
    wait "$triton"
    kill -TERM "$proxy" 2>/dev/null
    wait "$proxy"
    exit 0
}
trap drain TERM INT

wait -n "$triton" "$proxy"
status=$?
if kill -0 "$triton" 2>/dev/null; then
    echo "serve.sh: the proxy (caddy) exited with $status; stopping tritonserver" >&2
else
    echo "serve.sh: tritonserver exited with $status; stopping the proxy" >&2
fi
kill -TERM "$triton" "$proxy" 2>/dev/null
wait
exit $(( status == 0 ? 1 : status ))
