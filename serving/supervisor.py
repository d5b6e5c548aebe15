"""Start, watch, restart and stop the bundled tritonserver and the Caddy proxy in front of it.

HTTP and metrics reach clients through Caddy (serving/proxy.py says why: one form-encoded body
of 4.2 MB kills this Triton); tritonserver itself listens for them only on Unix sockets in the
server's private temporary directory. gRPC is tritonserver's own port.

A dead python-backend stub (killed, OOM) is not restarted by this Triton (2.51): the server stays
"ready" and answers every request to that model with HTTP 500 / gRPC INTERNAL "Stub process
'<model>_0_0' is not healthy." So a ServerHandle records the stubs once the server is ready, and
`dead_stubs()` tells whoever watches it (the CLI in serving/server.py) that one died; that is
treated like an exit of tritonserver, and `restart()` kills tritonserver and starts it again on
the same ports. serving/repository.py assembles what tritonserver serves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serving.processes import alive_child, child_processes, die_with_parent, exit_reason, stub_instance
from serving.proxy import DEFAULT_MAX_REQUEST_BYTES, ProxyError, caddy_binary, caddy_config
from serving.repository import (
    ServerError,
    assemble_backends,
    assemble_repository,
    server_environment,
    tritonserver_binary,
)


@dataclass
class ServerHandle:
    process: subprocess.Popen
    workdir: Path
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    models: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)  # tritonserver's argv, for restart()
    stubs: dict[int, tuple[str, str]] = field(default_factory=dict)  # pid -> (instance, shm region), once ready
    proxy: subprocess.Popen | None = None  # Caddy, serving HTTP and metrics (serving/proxy.py)
    proxy_command: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float, abort=lambda: False) -> None:
        """Waits for readiness, then records the stubs; raises ServerError (the caller stops the server)."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proxy_exited():
                self._find_stubs()
                raise ServerError(self.proxy_failure())
            if self.process.poll() is not None or time.monotonic() > deadline or abort():
                if self.process.poll() is not None:
                    reason = exit_reason(self.process.returncode)
                    if self.process.returncode > 0:  # a killed server's log tells nothing about why
                        reason += f": {_first_error(self.log_tail(400))}"
                else:
                    reason = (
                        "start interrupted"
                        if abort()
                        else f"not ready after {timeout:.0f} s: {_first_error(self.log_tail(400))}"
                    )
                self._find_stubs()  # those started so far, so that stop() or restart() removes their shm regions
                raise ServerError(f"tritonserver {reason}")
            time.sleep(0.2)
        self._find_stubs()  # every model is loaded once ready (--model-control-mode=none): every stub exists now

    def _find_stubs(self) -> None:
        self.stubs = {
            pid: (name, argv[2])
            for pid, argv in child_processes(self.process.pid).items()
            if (name := stub_instance(argv))
        }

    def proxy_failure(self) -> str:
        """How the proxy ended, with the reason in Caddy's log
        (JSON lines: {"level": "error", "msg": ..., "error": ...})."""
        try:
            lines = (self.workdir / "caddy.log").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        reason = lines[-1] if lines else "no log"
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
                reason = str(entry.get("error") or entry.get("msg"))
                break
        return f"the HTTP proxy (caddy) {exit_reason(self.proxy.returncode)}: {reason}"

    def proxy_exited(self) -> bool:
        return self.proxy is not None and self.proxy.poll() is not None

    def restart_proxy(self) -> None:
        self.proxy = _spawn(
            self.proxy_command, self.workdir / "caddy.log", self.workdir, _proxy_environment(self.workdir)
        )

    def dead_stubs(self) -> list[str]:
        """Model instances (e.g. `medoe_0_0`) whose python-backend stub has died since the server got ready."""
        return [name for pid, (name, _) in self.stubs.items() if not alive_child(pid, self.process.pid)]

    def restart(self, timeout: float = 120.0, abort=lambda: False) -> None:
        """Kills tritonserver and its stubs and starts it again with the same command: same ports and repository.

        SIGKILL, not SIGTERM: after a stub died, SIGTERM waits the whole --exit-timeout-secs for
        the model that cannot unload, and requests in flight fail either way (clients retry).
        """
        if self.process.poll() is None and not self.dead_stubs() and self.proxy_exited():
            self.restart_proxy()  # only the proxy died: tritonserver keeps its loaded models
            self.wait_ready(timeout, abort)
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._end_stubs()
        self._remove_shm()
        for socket_path in self.workdir.glob("*.sock"):  # a Unix socket left behind blocks the new bind
            socket_path.unlink(missing_ok=True)
        if self.proxy_exited():
            self.restart_proxy()
        self.process = _spawn(self.command, self.log_path, self.workdir)
        self.wait_ready(timeout, abort)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # Triton drains in-flight requests on SIGTERM
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._end_stubs()
        self._remove_shm()
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()  # in-flight requests have ended with tritonserver
            try:
                self.proxy.wait(5)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode

    def _remove_shm(self) -> None:
        # Triton unlinks a stub's /dev/shm region when it unloads the model; after a SIGKILL, or
        # a dead stub whose model cannot unload, nobody does, and each leaks (MiBs, until reboot).
        for _, region in self.stubs.values():
            Path("/dev/shm", region).unlink(missing_ok=True)

    def _end_stubs(self, timeout: float = 5.0) -> None:
        # The python-backend stubs share tritonserver's process group (start_new_session) and
        # notice their parent is gone only at their next health poll: end them now, so that
        # nothing is left running once stop() returns.
        group = self.process.pid
        deadline = time.monotonic() + timeout
        sig = signal.SIGTERM
        while True:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                return
            if time.monotonic() > deadline:
                return  # only unreaped zombies can be left here; they hold no memory or ports
            if sig == signal.SIGTERM and time.monotonic() > deadline - timeout / 2:
                sig = signal.SIGKILL
            time.sleep(0.1)


def start_server(
    repository: str | Path,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    host: str = "127.0.0.1",
    timeout: float = 120.0,
    log_file: str | Path | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> ServerHandle:
    """Starts tritonserver on a variant of `repository`, and Caddy in front of its HTTP and
    metrics, and waits until it is ready."""
    repository = Path(repository).resolve()
    if not repository.is_dir():
        raise ServerError(f"model repository not found: {repository}")
    binary = tritonserver_binary()
    try:
        caddy = caddy_binary()
    except ProxyError as err:
        raise ServerError(str(err)) from None
    if max_request_bytes < 1:
        raise ServerError(f"max request size {max_request_bytes} must be positive")
    workdir = Path(tempfile.mkdtemp(prefix="medoe-triton-"))  # mode 0700: only this user reaches the sockets
    try:
        backends = assemble_backends(workdir / "backends")
        (workdir / "models").mkdir()
        models = assemble_repository(repository, workdir / "models")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    log_path = Path(log_file) if log_file else workdir / "tritonserver.log"
    http_socket, metrics_socket = workdir / "http.sock", workdir / "metrics.sock"
    # libevhtp binds "unix:PATH" addresses (the port is ignored): no TCP port reaches Triton's HTTP.
    command = [
        str(binary),
        f"--model-repository={workdir / 'models'}",
        f"--backend-directory={backends}",
        "--model-control-mode=none",
        f"--http-address=unix:{http_socket}",
        "--http-port=0",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        f"--metrics-address=unix:{metrics_socket}",
        "--metrics-port=0",
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--exit-timeout-secs=10",
        "--log-verbose=0",
        # Each stub's shared-memory pool starts at 1 MiB and grows 1 MiB at a time; one
        # 512x1024 answer moves ~4.5 MB through it, so start it where it ends up anyway.
        "--backend-config=python,shm-default-byte-size=33554432",
        "--backend-config=python,shm-growth-byte-size=16777216",
    ]
    listen = f"[{host}]" if ":" in host else host
    config = caddy_config(
        f"{listen}:{http_port}", f"{listen}:{metrics_port}", str(http_socket), str(metrics_socket), max_request_bytes
    )
    (workdir / "caddy.json").write_text(json.dumps(config))
    proxy_command = [str(caddy), "run", "--config", str(workdir / "caddy.json")]
    handle = ServerHandle(
        _spawn(command, log_path, workdir),
        workdir,
        host,
        http_port,
        grpc_port,
        metrics_port,
        log_path,
        models,
        command,
        proxy_command=proxy_command,
    )
    handle.restart_proxy()
    try:
        handle.wait_ready(timeout)
    except ServerError:
        handle.stop(5)
        raise
    return handle


def _proxy_environment(workdir: Path) -> dict[str, str]:
    # Caddy keeps certificates and autosaved configs under HOME/XDG dirs: keep it in the workdir.
    return dict(os.environ, HOME=str(workdir), XDG_DATA_HOME=str(workdir / "xdg"), XDG_CONFIG_HOME=str(workdir / "xdg"))


def _spawn(command: list[str], log_path: Path, workdir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    # PR_SET_PDEATHSIG ties the child to the *thread* that forks it: start servers from a
    # thread that lives as long as they should (the main thread everywhere in this project).
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            env=env or server_environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()),
        )


def _first_error(log: str) -> str:
    """The most telling line of a failed start: a model's load error, else the last error line."""
    lines = log.splitlines()
    loads = [line for line in lines if "failed to load '" in line]
    errors = [line for line in lines if line.startswith("E") or "error" in line.lower()]
    line = (loads[:1] or errors[-1:] or lines[-1:] or ["no log"])[0]
    line = line.split('] "', 1)[-1] if '] "' in line else line  # drop Triton's "E1124 time pid file:line]" prefix
    return line.split("\\n")[0].strip().strip('"')  # the log escapes a traceback's newlines as \n
